//! The SSH tunnel against OpenSSH, in one run over the same workstation → pod path: the API
//! server's port-forward (the workstation reaches the API and the nodes, not pods).
//!
//! - `plain`: a port-forward straight to the echo pod, no SSH (the baseline);
//! - `ssh -L`: OpenSSH's client through the v0.3.7 shadow (OpenSSH `sshd`), itself reached
//!   over a port-forward to its port 22 — what ktctl v0.3.7 does;
//! - `ktctl/openssh`: `ktctl forward` through the v0.3.7 shadow image;
//! - `ktctl/kt`: `ktctl forward` through kt's shadow (`--image kt-shadow:dev`), with its
//!   default two SSH connections, and `ktctl/kt 1 SSH` with one (`--sshConnections 1`).
//!
//! Each measures bulk echo throughput (1 stream × 64 MiB and 8 streams × 8 MiB, data each
//! way at once) and request/response latency (2 000 sequential 64-byte round trips, p50 and
//! p99). Rounds interleave the paths; medians over `KT_BENCH_ROUNDS` rounds (default 3).
//! Results: a table, ratios, and `target/kt-bench/tunnel.json`.
//! Run as root: `cargo bench -p kt-tests --bench tunnel` (README: `tests/run bench`).

use kt_tests::harness::{
    apps::{apply, start_testbed},
    bench_rounds,
    echo_bench::{self, wait_until_echoes},
    kubectl::kubectl_ok,
    results::Results,
    run_bench,
    workstation::{self, Background, ECHO, OpensshPath},
};

fn main() {
    run_bench("tunnel", run());
}

async fn run() {
    let rounds = bench_rounds(3);
    let tb = start_testbed(true).await;
    apply(&tb.kubeconfig, ECHO);
    kubectl_ok(
        &tb.kubeconfig,
        &["rollout", "status", "deploy/echo", "--timeout=60s"],
    );
    let echo_pod = kubectl_ok(
        &tb.kubeconfig,
        &[
            "get",
            "pods",
            "-l",
            "app=echo",
            "-o",
            "jsonpath={.items[0].metadata.name}",
        ],
    );
    let client = workstation::tools_command(&tb);

    let plain = workstation::forward_to_pod(&tb, &echo_pod, 17000, 9000).await;
    let openssh = OpensshPath::start(&tb, ["-L", "127.0.0.1:17001:echo:9000"]).await;
    let ktctl = |port: u16, extra: &[&str]| {
        let forward = format!("{port}:9000");
        let mut args = vec!["forward", "echo", &forward];
        args.extend_from_slice(extra);
        Background::ktctl(&tb, &args)
    };
    let mut forwards = [
        ktctl(17002, &[]),
        ktctl(17003, &["--image", "kt-shadow:dev"]),
        ktctl(
            17004,
            &["--image", "kt-shadow:dev", "--sshConnections", "1"],
        ),
    ];
    for forward in &mut forwards {
        forward.ready().await;
    }
    let paths: Vec<(&str, String)> = [
        ("plain", 17000),
        ("ssh -L", 17001),
        ("ktctl/openssh", 17002),
        ("ktctl/kt", 17003),
        ("ktctl/kt 1 SSH", 17004),
    ]
    .into_iter()
    .map(|(name, port)| (name, format!("127.0.0.1:{port}")))
    .collect();
    let behind = [&openssh.ssh, &openssh.port_forward, &plain];
    for (_, addr) in &paths {
        wait_until_echoes(&client, addr, &behind).await;
    }

    let samples = echo_bench::measure(&paths, rounds, &client);
    let mut results = Results::new("tunnel");
    let rows = echo_bench::record(&mut results, &paths, &samples);
    echo_bench::print_table(
        &format!("tunnel benchmark, medians of {rounds} rounds"),
        &paths,
        &rows,
    );
    let (plain_row, ssh, kt, one) = (&rows[0], &rows[1], &rows[3], &rows[4]);
    echo_bench::print_ratio("ktctl/kt", kt, "ssh -L", ssh);
    echo_bench::print_ratio("ktctl/kt", kt, "plain", plain_row);
    echo_bench::print_ratio("ktctl/kt (2 SSH connections)", kt, "1", one);
    for (a, b) in [
        ("ktctl/kt", "ssh -L"),
        ("ktctl/kt", "plain"),
        ("ktctl/kt", "ktctl/kt 1 SSH"),
    ] {
        echo_bench::record_ratio(&mut results, a, b);
    }
    results.write();

    for forward in forwards {
        forward.interrupt();
    }
    drop((plain, openssh, client));
    tb.stop().await;
}
