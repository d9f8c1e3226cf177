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
//! p99). Rounds interleave the paths; medians over `KT_BENCH_RUNS` rounds (default 3).
//! Run as root: `cargo bench -p kt-tests --bench tunnel` (README: `tests/run bench`).

use std::path::Path;

use kt_tests::{
    harness::{
        apps::{apply, deploy_shadow, start_testbed},
        kubectl::kubectl_ok,
        workstation::{self, Background, ECHO},
    },
    testbed::cluster::Testbed,
};

const TESTBED: &str = env!("CARGO_BIN_EXE_kt-testbed");
const OPENSSH_SHADOW: &str =
    "registry.cn-hangzhou.aliyuncs.com/rdc-incubator/kt-connect-shadow:v0.3.7";
const MIB: usize = 1 << 20;

/// One way from the workstation to the echo service: a local port.
struct Route {
    name: &'static str,
    port: u16,
}

#[derive(Default)]
struct Samples {
    one_stream: Vec<f64>,
    eight_streams: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
}

fn main() {
    // SAFETY: getuid has no failure mode.
    if unsafe { libc::getuid() } != 0 {
        println!("skipping tunnel benchmark: needs root");
        return;
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(run());
}

async fn run() {
    let rounds: usize = std::env::var("KT_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let testbed = Path::new(TESTBED);
    let tb = start_testbed(TESTBED, true).await;
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

    let mut plain = Background::spawn(
        testbed,
        &tb,
        testbed,
        &["forward", "default", &echo_pod, "17000", "9000"],
    );
    plain.wait_for("forwarding").await;

    let (key, _) = deploy_shadow(&tb, OPENSSH_SHADOW, &[], &[], "ed25519");
    let mut to_sshd = Background::spawn(
        testbed,
        &tb,
        testbed,
        &[
            "forward",
            "default",
            "kt-connect-shadow-abcde",
            "17022",
            "22",
        ],
    );
    to_sshd.wait_for("forwarding").await;
    let key = key.to_str().expect("UTF-8 path").to_owned();
    let ssh = Background::spawn(
        testbed,
        &tb,
        Path::new("ssh"),
        &[
            "-N",
            "-p",
            "17022",
            "-i",
            &key,
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=VERBOSE",
            "-o",
            "ExitOnForwardFailure=yes",
            "-L",
            "127.0.0.1:17001:echo:9000",
            "root@127.0.0.1",
        ],
    );
    if let Err(logs) = wait_until_echoes(&tb, 17001, &[&ssh, &to_sshd]).await {
        let sshd = kubectl_ok(&tb.kubeconfig, &["logs", "kt-connect-shadow-abcde"]);
        panic!("ssh -L does not echo: {logs:?}; sshd: {sshd}");
    }

    let mut ktctl_openssh = Background::ktctl(testbed, &tb, &["forward", "echo", "17002:9000"]);
    let mut ktctl_kt = Background::ktctl(
        testbed,
        &tb,
        &["forward", "echo", "17003:9000", "--image", "kt-shadow:dev"],
    );
    let mut ktctl_kt_one = Background::ktctl(
        testbed,
        &tb,
        &[
            "forward",
            "echo",
            "17004:9000",
            "--image",
            "kt-shadow:dev",
            "--sshConnections",
            "1",
        ],
    );
    ktctl_openssh.ready().await;
    ktctl_kt.ready().await;
    ktctl_kt_one.ready().await;

    let paths = [
        Route {
            name: "plain",
            port: 17000,
        },
        Route {
            name: "ssh -L",
            port: 17001,
        },
        Route {
            name: "ktctl/openssh",
            port: 17002,
        },
        Route {
            name: "ktctl/kt",
            port: 17003,
        },
        Route {
            name: "ktctl/kt 1 SSH",
            port: 17004,
        },
    ];
    let mut samples: Vec<Samples> = paths.iter().map(|_| Samples::default()).collect();
    for round in 0..rounds {
        for (path, samples) in paths.iter().zip(&mut samples) {
            let addr = format!("127.0.0.1:{}", path.port);
            let one = seconds(&tb, &["bulk", &addr, "1", &(64 * MIB).to_string()]);
            samples.one_stream.push(64.0 / one);
            let eight = seconds(&tb, &["bulk", &addr, "8", &(8 * MIB).to_string()]);
            samples.eight_streams.push(64.0 / eight);
            let (p50, p99) = latency(&tb, &addr);
            samples.p50.push(p50);
            samples.p99.push(p99);
            eprintln!(
                "round {round} {}: {:.0} / {:.0} MiB/s, p50 {p50:.0} µs, p99 {p99:.0} µs",
                path.name,
                64.0 / one,
                64.0 / eight
            );
        }
    }

    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let rows: Vec<[f64; 4]> = samples
        .iter()
        .map(|s| {
            [
                median(&s.one_stream),
                median(&s.eight_streams),
                median(&s.p50),
                median(&s.p99),
            ]
        })
        .collect();
    println!(
        "tunnel benchmark, medians of {rounds} rounds (echo: MiB/s each way; round trip of 64 B)"
    );
    println!(
        "{:<14} {:>10} {:>10} {:>10} {:>10}",
        "path", "1 stream", "8 streams", "p50 µs", "p99 µs"
    );
    for (path, row) in paths.iter().zip(&rows) {
        println!(
            "{:<14} {:>10.1} {:>10.1} {:>10.0} {:>10.0}",
            path.name, row[0], row[1], row[2], row[3]
        );
    }
    let (ssh, kt) = (&rows[1], &rows[3]);
    println!(
        "ktctl/kt vs ssh -L: throughput ×{:.2} (1 stream), ×{:.2} (8 streams); latency p50 ×{:.2}, p99 ×{:.2}",
        kt[0] / ssh[0],
        kt[1] / ssh[1],
        kt[2] / ssh[2],
        kt[3] / ssh[3]
    );
    let plain = &rows[0];
    println!(
        "ktctl/kt vs plain: throughput ×{:.2} (1 stream), ×{:.2} (8 streams); latency p50 ×{:.2}, p99 ×{:.2}",
        kt[0] / plain[0],
        kt[1] / plain[1],
        kt[2] / plain[2],
        kt[3] / plain[3]
    );

    let one = &rows[4];
    println!(
        "ktctl/kt with 2 SSH connections (default) vs 1: throughput ×{:.2} (1 stream), ×{:.2} (8 streams)",
        kt[0] / one[0],
        kt[1] / one[1]
    );

    ktctl_kt_one.interrupt();
    ktctl_kt.interrupt();
    ktctl_openssh.interrupt();
    drop((plain, to_sshd, ssh));
    tb.stop().await;
}

/// Runs a kt-testbed echo client on the workstation; its output.
fn client(tb: &Testbed, args: &[&str]) -> String {
    let out = workstation::exec(Path::new(TESTBED), tb)
        .arg(TESTBED)
        .args(args)
        .output()
        .expect("kt-testbed exec runs");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn seconds(tb: &Testbed, args: &[&str]) -> f64 {
    let out = client(tb, args);
    out.trim().parse().expect("seconds")
}

fn latency(tb: &Testbed, addr: &str) -> (f64, f64) {
    let out = client(tb, &["rr", addr, "2000", "64"]);
    let mut numbers = out
        .split_whitespace()
        .map(|n| n.parse::<f64>().expect("µs"));
    (numbers.next().expect("p50"), numbers.next().expect("p99"))
}

async fn wait_until_echoes(
    tb: &Testbed,
    port: u16,
    behind: &[&Background],
) -> Result<(), Vec<String>> {
    let addr = format!("127.0.0.1:{port}");
    let mut last_error = String::new();
    for _ in 0..100 {
        let out = workstation::exec(Path::new(TESTBED), tb)
            .args([TESTBED, "rr", &addr, "1", "8"])
            .output()
            .expect("kt-testbed exec runs");
        if out.status.success() {
            return Ok(());
        }
        last_error = String::from_utf8_lossy(&out.stderr).into_owned();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let mut logs = vec![format!("last attempt: {last_error}")];
    logs.extend(behind.iter().map(|b| b.log()));
    Err(logs)
}
