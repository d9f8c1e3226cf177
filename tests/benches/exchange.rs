//! `ktctl exchange` in agent, selector and scale modes, in one run on the testbed with the
//! agent installed from `deploy/`:
//!
//! - **ready time**: command start → first request from a pod answered by the workstation,
//!   per mode;
//! - **pod → workstation data path**: bulk echo (1 × 64 MiB, 8 × 8 MiB) and 2 000 × 64 B
//!   round trips from a pod on node-1 to an echo server on the workstation, through
//!   `plain` TCP (the workstation routes the pod ranges via the nodes: the testbed's
//!   physical limit), OpenSSH `ssh -R` through the v0.3.7 shadow (what v0.3.7 does),
//!   `ktctl exchange` through the v0.3.7 shadow, through kt's shadow, and in agent mode
//!   (eBPF redirect to the agent's listener, SSH to ktctl). These SSH paths go over the API
//!   server's port-forward (`--transport portForward`); `ktctl/agent direct` reaches the
//!   agent's node port straight (the workstation reaches the nodes).
//!
//! Medians over `KT_BENCH_ROUNDS` rounds (default 3); also `target/kt-bench/exchange.json`.
//! Run as root: `tests/run bench`.

use std::time::Instant;

use kt_testbed::{cluster::Testbed, topology::WORKSTATION_IP};
use kt_tests::harness::{
    apps::{answered_by, apply, deploy_web, in_pod, install_agent, start_testbed},
    bench_rounds,
    bins::{self, utf8},
    echo_bench::{self, wait_until_echoes},
    eventually::eventually,
    kubectl::{kubectl, kubectl_ok},
    results::Results,
    run_bench,
    workstation::{self, Background, ECHO, OpensshPath},
};
const LOCAL_ECHO: u16 = 19000;
const LOCAL_HTTP: u16 = 18090;

/// More Services in front of the echo pods, so that several exchanges can run at once; the
/// second agent-mode one has pods of its own (an agent-mode exchange is announced only when
/// every endpoint address it redirects is its own, so a second one over the same pods
/// never would be).
const ECHO_MORE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: echo-kt}
spec:
  selector: {app: echo}
  ports: [{port: 9000}]
---
apiVersion: v1
kind: Service
metadata: {name: echo-agent}
spec:
  selector: {app: echo}
  ports: [{port: 9000}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: echo-direct}
spec:
  replicas: 1
  selector: {matchLabels: {app: echo-direct}}
  template:
    metadata: {labels: {app: echo-direct}}
    spec:
      containers: [{name: e, image: kt-testbed/tcp-echo, ports: [{containerPort: 9000}], readinessProbe: {tcpSocket: {port: 9000}}}]
---
apiVersion: v1
kind: Service
metadata: {name: echo-direct}
spec:
  selector: {app: echo-direct}
  ports: [{port: 9000}]
"#;

fn main() {
    run_bench("exchange", run());
}

async fn run() {
    let rounds = bench_rounds(3);
    let tb = start_testbed(true).await;
    deploy_web(&tb);
    apply(&tb.kubeconfig, ECHO);
    apply(&tb.kubeconfig, ECHO_MORE);
    install_agent(&tb);
    for deployment in ["deploy/echo", "deploy/echo-direct"] {
        kubectl_ok(
            &tb.kubeconfig,
            &["rollout", "status", deployment, "--timeout=60s"],
        );
    }
    let _http = workstation::test_server(&tb, "http-echo", LOCAL_HTTP);
    let _echo = workstation::test_server(&tb, "tcp-echo", LOCAL_ECHO);

    // Ready time, alternating modes.
    let modes: [(&str, &[&str]); 3] = [
        ("agent", &["--mode", "agent"]),
        ("selector", &["--mode", "selector"]),
        ("scale", &["--mode", "scale", "--recoverWaitTime", "30"]),
    ];
    let mut ready = vec![Vec::new(); modes.len()];
    for _ in 0..rounds {
        for ((_, args), times) in modes.iter().zip(&mut ready) {
            times.push(ready_time(&tb, args).await);
        }
    }

    // The data paths, measured from the client pod.
    workstation::route_pods_via_nodes(&tb);
    let remote = format!("0.0.0.0:9100:127.0.0.1:{LOCAL_ECHO}");
    let openssh = OpensshPath::start(&tb, ["-R", &remote]).await;
    let expose = format!("{LOCAL_ECHO}:9000");
    let exchange = |service: &str, extra: &[&str]| {
        let mut args = vec!["exchange", service, "--expose", &expose];
        args.extend_from_slice(extra);
        Background::ktctl(&tb, &args)
    };
    let via_port_forward = ["--transport", "portForward"];
    let mut exchanges = [
        exchange(
            "echo",
            &[&["--mode", "selector"][..], &via_port_forward].concat(),
        ),
        exchange(
            "echo-kt",
            &[
                &["--mode", "selector", "--image", "kt-shadow:dev"][..],
                &via_port_forward,
            ]
            .concat(),
        ),
        exchange(
            "echo-agent",
            &[&["--mode", "agent"][..], &via_port_forward].concat(),
        ),
        exchange("echo-direct", &["--mode", "agent"]),
    ];
    for running in &mut exchanges {
        running.wait_for("will be redirected to local").await;
    }
    let paths = [
        ("plain", format!("{WORKSTATION_IP}:{LOCAL_ECHO}")),
        ("ssh -R", format!("{}:9100", openssh.shadow_ip)),
        ("ktctl/openssh", "echo:9000".to_owned()),
        ("ktctl/kt", "echo-kt:9000".to_owned()),
        ("ktctl/agent", "echo-agent:9000".to_owned()),
        ("agent direct", "echo-direct:9000".to_owned()),
    ];
    let tools = bins::kt_tools();
    let client = |args: &[&str]| {
        let cmd: Vec<&str> = std::iter::once(utf8(&tools))
            .chain(args.iter().copied())
            .collect();
        match in_pod(&tb, "client", &cmd) {
            (true, out) => Ok(out),
            (false, out) => Err(out),
        }
    };
    let behind: Vec<&Background> = [&openssh.ssh, &openssh.port_forward]
        .into_iter()
        .chain(&exchanges)
        .collect();
    for (_, addr) in &paths {
        wait_until_echoes(&client, addr, &behind).await;
    }
    let samples = echo_bench::measure(&paths, rounds, &client);
    let mut results = Results::new("exchange");
    println!("exchange benchmark, medians of {rounds} rounds");
    let ready: Vec<f64> = modes
        .iter()
        .zip(&ready)
        .map(|((mode, _), times)| {
            results
                .figure(&format!("ready: {mode}"), "s", times)
                .expect("ready times")
        })
        .collect();
    let rows = echo_bench::record(&mut results, &paths, &samples);
    println!(
        "ready time: agent {:.2} s, selector {:.2} s, scale {:.2} s (agent/selector ×{:.2}, scale/selector ×{:.2})",
        ready[0],
        ready[1],
        ready[2],
        ready[0] / ready[1],
        ready[2] / ready[1]
    );
    echo_bench::print_table("pod → workstation", &paths, &rows);
    let (plain, ssh) = (&rows[0], &rows[1]);
    for (name, row) in [
        ("ktctl/kt", &rows[3]),
        ("ktctl/agent", &rows[4]),
        ("agent direct", &rows[5]),
    ] {
        echo_bench::print_ratio(name, row, "ssh -R", ssh);
        echo_bench::print_ratio(name, row, "plain", plain);
        echo_bench::record_ratio(&mut results, name, "ssh -R");
        echo_bench::record_ratio(&mut results, name, "plain");
    }
    for mode in ["agent", "scale"] {
        results
            .ratio(&format!("ready: {mode}"), "ready: selector")
            .expect("ready times");
    }
    results.write();
    for running in exchanges {
        running.interrupt();
    }
    drop(openssh);
    tb.stop().await;
}

/// Seconds from `ktctl exchange web` to the first request from the client pod that the
/// workstation answers; then Ctrl-C, and back to the pods.
async fn ready_time(tb: &Testbed, extra: &[&str]) -> f64 {
    let expose = format!("{LOCAL_HTTP}:80");
    let started = Instant::now();
    let mut exchange = Background::ktctl(
        tb,
        &[&["exchange", "web", "--expose", &expose][..], extra].concat(),
    );
    loop {
        if answered_by(tb, "client", "http://web/").as_deref() == Some("workstation") {
            break;
        }
        assert!(
            started.elapsed().as_secs() < 60,
            "not redirected: {}",
            exchange.log()
        );
    }
    let seconds = started.elapsed().as_secs_f64();
    // The shadow modes may answer before ktctl announces (the old pods are still going);
    // Ctrl-C before the banner is "nothing was exchanged" and exits 130.
    exchange.wait_for("will be redirected to local").await;
    let (status, log) = exchange.interrupt();
    assert!(status.success(), "{log}");
    let rollout = kubectl(
        &tb.kubeconfig,
        &["rollout", "status", "deploy/web", "--timeout=60s"],
    );
    if !rollout.status.success() {
        let pods = kubectl(&tb.kubeconfig, &["get", "pods", "-A", "-o", "wide"]);
        let describe = kubectl(&tb.kubeconfig, &["describe", "pods", "-l", "app=web"]);
        panic!(
            "web did not come back after {extra:?}: {}\n{}\n{}\nktctl: {log}",
            String::from_utf8_lossy(&rollout.stdout),
            String::from_utf8_lossy(&pods.stdout),
            String::from_utf8_lossy(&describe.stdout)
        );
    }
    eventually("the pods answer again", async || {
        answered_by(tb, "client", "http://web/").filter(|who| who != "workstation")
    })
    .await;
    seconds
}
