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
//! Medians over `KT_BENCH_RUNS` rounds (default 3). Run as root: `tests/run bench`.

use std::{path::Path, time::Instant};

use kt_tests::{
    harness::{
        apps::{answered_by, apply, deploy_shadow, deploy_web, in_pod, start_testbed},
        kubectl::{kubectl, kubectl_ok},
        workstation::{Background, ECHO},
    },
    testbed::{
        cluster::Testbed,
        topology::{WORKSTATION_IP, pod_cidr},
    },
};

const TESTBED: &str = env!("CARGO_BIN_EXE_kt-testbed");
const OPENSSH_SHADOW: &str =
    "registry.cn-hangzhou.aliyuncs.com/rdc-incubator/kt-connect-shadow:v0.3.7";
const MIB: usize = 1 << 20;
const LOCAL_ECHO: u16 = 19000;
const LOCAL_HTTP: u16 = 18090;

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");

/// More Services in front of the echo pods, so that several exchanges can run at once.
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
apiVersion: v1
kind: Service
metadata: {name: echo-direct}
spec:
  selector: {app: echo}
  ports: [{port: 9000}]
"#;

fn main() {
    // SAFETY: getuid has no failure mode.
    if unsafe { libc::getuid() } != 0 {
        println!("skipping exchange benchmark: needs root");
        return;
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(run());
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn run() {
    let rounds: usize = std::env::var("KT_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let testbed = Path::new(TESTBED);
    let tb = start_testbed(TESTBED, true).await;
    deploy_web(&tb);
    apply(&tb.kubeconfig, ECHO);
    apply(&tb.kubeconfig, ECHO_MORE);
    kubectl_ok(&tb.kubeconfig, &["apply", "-k", DEPLOY]);
    kubectl_ok(
        &tb.kubeconfig,
        &[
            "rollout",
            "status",
            "daemonset/kt-node-agent",
            "-n",
            "kt-system",
            "--timeout=60s",
        ],
    );
    kubectl_ok(
        &tb.kubeconfig,
        &["rollout", "status", "deploy/echo", "--timeout=60s"],
    );
    let _http = local_server(&tb, "http-echo", LOCAL_HTTP);
    let _echo = local_server(&tb, "tcp-echo", LOCAL_ECHO);

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

    // The data paths.
    let topology = tb.topology();
    for node in &topology.nodes {
        let via = node.ip().to_string();
        let out = topology
            .workstation
            .ip(&["route", "add", &pod_cidr(node.index), "via", &via])
            .expect("ip runs");
        assert!(out.status.success(), "{out:?}");
    }
    let (key, shadow_ip) = deploy_shadow(&tb, OPENSSH_SHADOW, &[], &[], "ed25519");
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
    let remote = format!("0.0.0.0:9100:127.0.0.1:{LOCAL_ECHO}");
    let ssh_r = Background::spawn(
        testbed,
        &tb,
        Path::new("ssh"),
        &[
            "-N",
            "-p",
            "17022",
            "-i",
            key.to_str().expect("UTF-8 path"),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "ExitOnForwardFailure=yes",
            "-R",
            &remote,
            "root@127.0.0.1",
        ],
    );
    let expose = format!("{LOCAL_ECHO}:9000");
    let exchange = |service: &str, extra: &[&str]| {
        let mut args = vec!["exchange", service, "--expose", &expose];
        args.extend_from_slice(extra);
        Background::ktctl(testbed, &tb, &args)
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
        ("ssh -R", format!("{shadow_ip}:9100")),
        ("ktctl/openssh", "echo:9000".to_owned()),
        ("ktctl/kt", "echo-kt:9000".to_owned()),
        ("ktctl/agent", "echo-agent:9000".to_owned()),
        ("agent direct", "echo-direct:9000".to_owned()),
    ];
    let behind: Vec<&Background> = std::iter::once(&ssh_r).chain(&exchanges).collect();
    for (name, addr) in &paths {
        wait_until_echoes(&tb, addr, &behind).await;
        eprintln!("{name} ready at {addr}");
    }
    let mut samples = vec![[Vec::new(), Vec::new(), Vec::new(), Vec::new()]; paths.len()];
    for round in 0..rounds {
        for ((name, addr), s) in paths.iter().zip(&mut samples) {
            let one = 64.0 / seconds(&tb, &["bulk", addr, "1", &(64 * MIB).to_string()]);
            let eight = 64.0 / seconds(&tb, &["bulk", addr, "8", &(8 * MIB).to_string()]);
            let out = client(&tb, &["rr", addr, "2000", "64"]);
            let mut rr = out
                .split_whitespace()
                .map(|n| n.parse::<f64>().expect("µs"));
            let (p50, p99) = (rr.next().expect("p50"), rr.next().expect("p99"));
            eprintln!(
                "round {round} {name}: {one:.0} / {eight:.0} MiB/s, p50 {p50:.0} µs, p99 {p99:.0} µs"
            );
            for (v, x) in s.iter_mut().zip([one, eight, p50, p99]) {
                v.push(x);
            }
        }
    }

    println!("exchange benchmark, medians of {rounds} rounds");
    let ready: Vec<f64> = ready.iter().map(|t| median(t)).collect();
    println!(
        "ready time: agent {:.2} s, selector {:.2} s, scale {:.2} s (agent/selector ×{:.2}, scale/selector ×{:.2})",
        ready[0],
        ready[1],
        ready[2],
        ready[0] / ready[1],
        ready[2] / ready[1]
    );
    println!(
        "pod → workstation (echo: MiB/s each way; round trip of 64 B)\n{:<14} {:>10} {:>10} {:>10} {:>10}",
        "path", "1 stream", "8 streams", "p50 µs", "p99 µs"
    );
    let rows: Vec<[f64; 4]> = samples
        .iter()
        .map(|s| std::array::from_fn(|i| median(&s[i])))
        .collect();
    for ((name, _), row) in paths.iter().zip(&rows) {
        println!(
            "{name:<14} {:>10.1} {:>10.1} {:>10.0} {:>10.0}",
            row[0], row[1], row[2], row[3]
        );
    }
    let (plain, ssh) = (&rows[0], &rows[1]);
    for (name, row) in [
        ("ktctl/kt", &rows[3]),
        ("ktctl/agent", &rows[4]),
        ("agent direct", &rows[5]),
    ] {
        println!(
            "{name} vs ssh -R: throughput ×{:.2} (1 stream), ×{:.2} (8 streams); latency p50 ×{:.2}, p99 ×{:.2}; vs plain: ×{:.2}, ×{:.2}; p50 ×{:.2}",
            row[0] / ssh[0],
            row[1] / ssh[1],
            row[2] / ssh[2],
            row[3] / ssh[3],
            row[0] / plain[0],
            row[1] / plain[1],
            row[2] / plain[2]
        );
    }
    for running in exchanges {
        running.interrupt();
    }
    drop((ssh_r, to_sshd));
    tb.stop().await;
}

/// A test server on the workstation (`kt-testbed image NAME` on `port`).
fn local_server(tb: &Testbed, image: &str, port: u16) -> Background {
    Background::spawn(
        Path::new(TESTBED),
        tb,
        Path::new("env"),
        &[
            &format!("PORT={port}"),
            "HOSTNAME=workstation",
            TESTBED,
            "image",
            image,
        ],
    )
}

/// Seconds from `ktctl exchange web` to the first request from the client pod that the
/// workstation answers; then Ctrl-C, and back to the pods.
async fn ready_time(tb: &Testbed, extra: &[&str]) -> f64 {
    let expose = format!("{LOCAL_HTTP}:80");
    let started = Instant::now();
    let exchange = Background::ktctl(
        Path::new(TESTBED),
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
    while answered_by(tb, "client", "http://web/").is_none_or(|who| who == "workstation") {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    seconds
}

/// A kt-testbed echo client in the client pod; its output.
fn client(tb: &Testbed, args: &[&str]) -> String {
    let mut cmd = vec![TESTBED];
    cmd.extend_from_slice(args);
    let (ok, out) = in_pod(tb, "client", &cmd);
    assert!(ok, "{args:?}: {out}");
    out
}

fn seconds(tb: &Testbed, args: &[&str]) -> f64 {
    client(tb, args).trim().parse().expect("seconds")
}

async fn wait_until_echoes(tb: &Testbed, addr: &str, behind: &[&Background]) {
    for _ in 0..100 {
        if in_pod(tb, "client", &[TESTBED, "rr", addr, "1", "8"]).0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let logs: Vec<String> = behind.iter().map(|b| b.log()).collect();
    panic!("{addr} does not echo: {logs:?}");
}
