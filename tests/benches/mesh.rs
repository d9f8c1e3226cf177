//! `ktctl mesh` in agent mode: what the node's router costs, in one run on the testbed with
//! the agent installed from `deploy/` (`web`: 2 http-echo pods; `client` on node-1):
//!
//! - **request time** (1 keep-alive connection, requests back to back, p50/p99): a request
//!   without the header through the router, against the same request straight to a pod
//!   before anything is meshed (goal: ≤ 150 µs added at p50); a request with the header
//!   (to the workstation), against the same request through `exchange` in agent mode;
//! - **requests/s** with 64 keep-alive connections: through the router against straight to
//!   the pod;
//! - both again with 10 developers meshing `web` (10 sessions, one route with 10 headers).
//!
//! Medians over `KT_BENCH_ROUNDS` rounds (default 3). Results as JSON in
//! `target/kt-bench/mesh.json`. Run as root: `tests/run bench`.

use kt_testbed::cluster::Testbed;
use kt_tests::harness::{
    apps::{deploy_web, install_agent, start_testbed, web_pods_field},
    bench_rounds,
    bins::{self, utf8},
    kubectl::kubectl,
    results::Results,
    run_bench,
    workstation::{self, Background},
};

const LOCAL_HTTP: u16 = 18080;
/// Seconds each load runs.
const SECONDS: &str = "3";

fn main() {
    run_bench("mesh", run());
}

/// (requests/s, p50 µs, p99 µs) of `kt-tools http-load` from the client pod.
fn load(tb: &Testbed, addr: &str, connections: usize, header: &str) -> [f64; 3] {
    let tools = bins::kt_tools();
    let connections = connections.to_string();
    let run = kubectl(
        &tb.kubeconfig,
        &[
            "exec",
            "client",
            "--",
            utf8(&tools),
            "http-load",
            addr,
            &connections,
            SECONDS,
            header,
        ],
    );
    let (out, err) = (
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr),
    );
    assert!(run.status.success(), "http-load {addr} failed: {out}{err}");
    if !err.trim().is_empty() {
        println!("   {}", err.trim());
    }
    let field = |name: &str| -> f64 {
        out.split_whitespace()
            .find_map(|f| f.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {out}"))
    };
    let errors = field("errors");
    if errors > 0.0 {
        println!("   {addr} ({header}, {connections} connections): {errors} failed request(s)");
    }
    [field("requests_per_s"), field("p50_us"), field("p99_us")]
}

/// One path's numbers: (p50 µs, p99 µs) on one connection, and requests/s on 64.
#[derive(Clone, Copy, Default)]
struct Path {
    p50: f64,
    p99: f64,
    rps64: f64,
}

/// One path's samples, one per round: p50 µs, p99 µs, requests/s on 64 connections.
type Samples = [Vec<f64>; 3];

fn measure(tb: &Testbed, addr: &str, header: &str, rounds: usize) -> Samples {
    let mut samples = Samples::default();
    for _ in 0..rounds {
        let one = load(tb, addr, 1, header);
        samples[0].push(one[1]);
        samples[1].push(one[2]);
        samples[2].push(load(tb, addr, 64, header)[0]);
    }
    samples
}

/// Records `samples` as the figures `<name>: p50`, `: p99`, `: req/s (64)`; their medians.
fn record(results: &mut Results, name: &str, samples: &Samples) -> Path {
    let mut figure = |column: &str, unit: &str, values: &[f64]| {
        results
            .figure(&format!("{name}: {column}"), unit, values)
            .expect("a figure per path")
    };
    Path {
        p50: figure("p50", "µs", &samples[0]),
        p99: figure("p99", "µs", &samples[1]),
        rps64: figure("req/s (64)", "requests/s", &samples[2]),
    }
}

/// `ktctl ARGS` on the workstation, once `banner` is out.
async fn ktctl(tb: &Testbed, args: &[&str], banner: &str) -> Background {
    let mut running = Background::ktctl(tb, args);
    running.wait_for(banner).await;
    running
}

async fn mesh(tb: &Testbed, mark: &str) -> Background {
    let expose = format!("{LOCAL_HTTP}:8080");
    ktctl(
        tb,
        &["mesh", "web", "--expose", &expose, "--versionMark", mark],
        "Now you can access your service by header",
    )
    .await
}

async fn run() {
    let rounds = bench_rounds(3);
    let tb = start_testbed(true).await;
    deploy_web(&tb);
    install_agent(&tb);
    let _app = workstation::http_echo(&tb, LOCAL_HTTP).await;
    let pod = web_pods_field(&tb, "status.podIP")
        .into_iter()
        .next()
        .expect("a web pod");
    let pod_addr = format!("{pod}:8080");

    let straight = measure(&tb, &pod_addr, "-", rounds);

    let expose = format!("{LOCAL_HTTP}:8080");
    let exchange = ktctl(
        &tb,
        &["exchange", "web", "--expose", &expose, "--mode", "agent"],
        "will be redirected to local",
    )
    .await;
    let exchanged = measure(&tb, &pod_addr, "-", rounds);
    let (status, log) = exchange.interrupt();
    assert!(status.success(), "{log}");

    let first = mesh(&tb, "dev00").await;
    let unmatched_1 = measure(&tb, &pod_addr, "-", rounds);
    let matched_1 = measure(&tb, &pod_addr, "version:dev00", rounds);
    let mut others = Vec::new();
    for n in 1..10 {
        others.push(mesh(&tb, &format!("dev{n:02}")).await);
    }
    let unmatched_10 = measure(&tb, &pod_addr, "-", rounds);
    // The last developer's header: every other header is compared first.
    let matched_10 = measure(&tb, &pod_addr, "version:dev09", rounds);
    for running in others.into_iter().chain([first]) {
        let (status, log) = running.interrupt();
        assert!(status.success(), "{log}");
    }

    println!(
        "\nmesh, agent mode: request time on 1 keep-alive connection, requests/s on 64 ({rounds} rounds, medians)"
    );
    println!(
        "{:<34} {:>9} {:>9} {:>11}",
        "path", "p50 µs", "p99 µs", "req/s (64)"
    );
    let mut results = Results::new("mesh");
    let rows = [
        ("straight to the pod", straight),
        ("exchange (agent), to workstation", exchanged),
        ("mesh: no header → pod", unmatched_1),
        ("mesh: header → workstation", matched_1),
        ("10 meshes: no header → pod", unmatched_10),
        ("10 meshes: header → workstation", matched_10),
    ]
    .map(|(name, samples)| (name, record(&mut results, name, &samples)));
    let [straight, exchanged, unmatched_1, matched_1, _, _] = rows.map(|(_, p)| p);
    for (name, p) in rows {
        println!("{name:<34} {:>9.0} {:>9.0} {:>11.0}", p.p50, p.p99, p.rps64);
    }
    let added = unmatched_1.p50 - straight.p50;
    println!(
        "router adds {added:.0} µs at p50 to a request that stays with the pods (goal ≤ 150); ×{:.2} of straight requests/s; matched ×{:.2} of exchange's p50",
        unmatched_1.rps64 / straight.rps64,
        matched_1.p50 / exchanged.p50
    );
    for (figure, baseline) in [
        ("mesh: no header → pod: p50", "straight to the pod: p50"),
        (
            "mesh: no header → pod: req/s (64)",
            "straight to the pod: req/s (64)",
        ),
        (
            "10 meshes: no header → pod: req/s (64)",
            "straight to the pod: req/s (64)",
        ),
        (
            "mesh: header → workstation: p50",
            "exchange (agent), to workstation: p50",
        ),
    ] {
        results.ratio(figure, baseline).expect("both recorded");
    }
    results.write();
    tb.stop().await;
}
