//! `ktctl connect` against the paths a developer has without it, in one run on one testbed
//! (agent installed, `echo` Service with one pod):
//!
//! - `plain`: the workstation routed to the pod networks through the nodes, no tunnel (the
//!   baseline: what a VPN into the cluster network would give);
//! - `connect/agent`: `sudo ktctl connect` through kt's agent (SSH straight to the node),
//!   to the pod's IP and to the ClusterIP; `connect/agent pf`: the same over the API
//!   server's port-forward (`--transport portForward`);
//! - `connect/kt-shadow`: through kt's shadow pod (`--via shadow -i kt-shadow:dev`);
//! - `connect/sshuttle`: `--mode sshuttle` (the system's sshuttle over the v0.3.7 shadow);
//! - `forward`: `ktctl forward` to the same pod (one port, through the API server);
//!
//! each measured as the tunnel benchmark does (echo MiB/s with 1 and 8 streams, 64-byte round
//! trips p50/p99). Also: DNS answer time (p50/p99 of 200 lookups) for a cluster name and a
//! non-cluster name through connect's local resolver, against asking the workstation's
//! resolver directly; the time from start to the banner (which comes after a cluster name
//! resolved) of each path's first connect, and the median of at least 5 agent-mode starts
//! with the testbed's Services and with `KT_BENCH_SERVICES` (default 10 000, issue 13's
//! figure) more, each set once the machine is quiet; ktctl's RSS in hosts mode with the
//! testbed's few Services and with the many.
//!
//! Only one connect runs at a time, so its paths are measured one after another (rounds
//! interleave within a phase). Results: a table, ratios to `plain`, and
//! `target/kt-bench/connect.json`. Run as root: `cargo bench -p kt-tests --bench connect`.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use kt_testbed::cluster::Testbed;
use kt_tests::harness::{
    apps::{apply, create_services, install_agent, start_testbed},
    bench_rounds,
    echo_bench::{self, Samples, wait_until_echoes},
    kubectl::kubectl_ok,
    results::{Results, median},
    run_bench,
    workstation::{self, Background, ECHO},
};
use kube::api::Api;

fn main() {
    run_bench("connect", run());
}

/// A connect started with `args`: the process and how long it took to print its banner
/// (its log read every 2 ms: `Background::wait_for`'s 100 ms would be most of a start).
async fn connected(tb: &Testbed, args: &[&str]) -> (Background, Duration) {
    let mut all = vec!["connect"];
    all.extend_from_slice(args);
    let started = Instant::now();
    let mut connect = Background::ktctl(tb, &all);
    while !connect.log().contains("All looks good") {
        if let Some(status) = connect.try_wait() {
            panic!("connect exited with {status}: {}", connect.log());
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no banner within a minute: {}",
            connect.log()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    (connect, started.elapsed())
}

/// Seconds from start to banner of `n` connects in the default mode, one after another,
/// each stopped with Ctrl-C before the next starts.
async fn start_times(tb: &Testbed, n: usize) -> Vec<f64> {
    let mut took = Vec::with_capacity(n);
    for _ in 0..n {
        let (connect, start) = connected(tb, &[]).await;
        let (status, log) = connect.interrupt();
        assert!(status.success(), "{log}");
        took.push(start.as_secs_f64());
    }
    took
}

/// This machine's busy share of its CPU time over one second (`/proc/stat`'s first line).
async fn machine_busy() -> f64 {
    let sample = || -> (u64, u64) {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let fields: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        // idle and iowait
        let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
        (fields.iter().sum(), idle)
    };
    let (total, idle) = sample();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (total_now, idle_now) = sample();
    let spent = total_now.saturating_sub(total).max(1) as f64;
    1.0 - idle_now.saturating_sub(idle) as f64 / spent
}

/// Waits until the testbed has digested what a step created (agents, controllers,
/// kube-proxy's rules: its processes share this machine with ktctl): under a quarter of the
/// machine busy over a second; at most two minutes. What a workstation would not see, with
/// the cluster elsewhere.
async fn until_machine_quiet() {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if machine_busy().await < 0.25 {
            return;
        }
    }
    println!("(the machine was still busy after two minutes)");
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// p50 and p99 µs of 200 lookups of `name` (through /etc/resolv.conf, or `server`).
fn dns_times(
    client: &impl Fn(&[&str]) -> Result<String, String>,
    name: &str,
    server: Option<&str>,
) -> [f64; 2] {
    let mut args = vec!["dig", name, "A", "--count", "200"];
    if let Some(server) = server {
        args.extend(["--server", server]);
    }
    let out = client(&args).unwrap_or_else(|e| panic!("dig {name}: {e}"));
    let mut values = out
        .split_whitespace()
        .map(|v| v.parse::<f64>().expect("µs"));
    [values.next().expect("p50"), values.next().expect("p99")]
}

async fn run() {
    let rounds = bench_rounds(3);
    let extra_services: usize = std::env::var("KT_BENCH_SERVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let tb = start_testbed(true).await;
    apply(&tb.kubeconfig, ECHO);
    kubectl_ok(
        &tb.kubeconfig,
        &["rollout", "status", "deploy/echo", "--timeout=60s"],
    );
    install_agent(&tb);
    let pod_ip = kubectl_ok(
        &tb.kubeconfig,
        &[
            "get",
            "pods",
            "-l",
            "app=echo",
            "-o",
            "jsonpath={.items[0].status.podIP}",
        ],
    );
    let cluster_ip = kubectl_ok(
        &tb.kubeconfig,
        &["get", "svc", "echo", "-o", "jsonpath={.spec.clusterIP}"],
    );
    let pod_addr = format!("{pod_ip}:9000");
    let client = workstation::tools_command(&tb);
    let topology = tb.topology();
    let mut paths: Vec<(&str, String)> = Vec::new();
    let mut samples: Vec<Samples> = Vec::new();
    let measure = async |names: &[(&'static str, String)], behind: &[&Background]| {
        for (_, addr) in names {
            wait_until_echoes(&client, addr, behind).await;
        }
        (names.to_vec(), echo_bench::measure(names, rounds, &client))
    };

    // The baseline, and the workstation resolver's own answer time.
    workstation::route_pods_via_nodes(&tb);
    let (names, measured) = measure(&[("plain", pod_addr.clone())], &[]).await;
    paths.extend(names);
    samples.extend(measured);
    for node in &topology.nodes {
        let cidr = kt_testbed::topology::pod_cidr(node.index);
        let out = topology
            .workstation
            .ip(&["route", "del", &cidr])
            .expect("ip runs");
        assert!(out.status.success(), "{out:?}");
    }
    let upstream_direct = dns_times(&client, "www.example.test", None);

    let (agent, agent_start) = connected(&tb, &[]).await;
    let (names, measured) = measure(
        &[
            ("connect/agent", pod_addr.clone()),
            ("connect/agent svc", format!("{cluster_ip}:9000")),
        ],
        &[&agent],
    )
    .await;
    paths.extend(names);
    samples.extend(measured);
    let cluster_name = dns_times(&client, "echo.default.svc.cluster.local", None);
    let upstream_via_connect = dns_times(&client, "www.example.test", None);
    let cluster_direct = dns_times(
        &client,
        "echo.default.svc.cluster.local",
        Some("10.96.0.10:53"),
    );
    let _ = agent.interrupt();

    let (agent_pf, agent_pf_start) = connected(&tb, &["--transport", "portForward"]).await;
    let (names, measured) = measure(&[("connect/agent pf", pod_addr.clone())], &[&agent_pf]).await;
    paths.extend(names);
    samples.extend(measured);
    let _ = agent_pf.interrupt();

    let (shadow, shadow_start) = connected(&tb, &["--via", "shadow", "-i", "kt-shadow:dev"]).await;
    let (names, measured) = measure(&[("connect/kt-shadow", pod_addr.clone())], &[&shadow]).await;
    paths.extend(names);
    samples.extend(measured);
    let _ = shadow.interrupt();

    // sshuttle redirects after routing: the workstation needs a default route (as real ones
    // have).
    let out = topology
        .workstation
        .ip(&["route", "add", "default", "via", "172.30.0.1"])
        .expect("ip runs");
    assert!(out.status.success(), "{out:?}");
    let (sshuttle, sshuttle_start) = connected(&tb, &["--mode", "sshuttle"]).await;
    let (names, measured) = measure(&[("connect/sshuttle", pod_addr.clone())], &[&sshuttle]).await;
    paths.extend(names);
    samples.extend(measured);
    let _ = sshuttle.interrupt();
    let out = topology
        .workstation
        .ip(&["route", "del", "default"])
        .expect("ip runs");
    assert!(out.status.success(), "{out:?}");

    let mut forward = Background::ktctl(
        &tb,
        &["forward", "echo", "17002:9000", "--image", "kt-shadow:dev"],
    );
    forward.ready().await;
    let (names, measured) =
        measure(&[("forward", "127.0.0.1:17002".to_owned())], &[&forward]).await;
    paths.extend(names);
    samples.extend(measured);
    let _ = forward.interrupt();

    // Start time, the testbed's Services only (medians against medians, below).
    until_machine_quiet().await;
    let starts_few = start_times(&tb, rounds.max(5)).await;

    // Memory: hosts mode keeps every Service of its namespaces in memory.
    let (hosts, _) = connected(&tb, &["--dnsMode", "hosts"]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_few = rss_kib(hosts.pid());
    let services: Api<Service> = Api::namespaced(tb.client().await, "default");
    let created = Instant::now();
    create_services(&services, extra_services).await;
    let last = format!(" s{} ", extra_services.saturating_sub(1));
    let hosts_written = Instant::now();
    for _ in 0..600 {
        let (_, file) = workstation::run(&tb, &["cat", "/etc/hosts"]);
        if file.replace('\n', " ").contains(&last) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let hosts_after = hosts_written.elapsed();
    let rss_many = rss_kib(hosts.pid());
    let _ = hosts.interrupt();
    // Start time with many Services: the default mode, then hosts mode (which lists them).
    until_machine_quiet().await;
    let starts_many = start_times(&tb, rounds.max(5)).await;
    let (again, hosts_start_many) = connected(&tb, &["--dnsMode", "hosts"]).await;
    let _ = again.interrupt();

    let mut results = Results::new("connect");
    let rows = echo_bench::record(&mut results, &paths, &samples);
    echo_bench::print_table(
        &format!("connect benchmark, medians of {rounds} rounds"),
        &paths,
        &rows,
    );
    let plain = rows[0];
    for (i, (name, _)) in paths.iter().enumerate().skip(1) {
        echo_bench::print_ratio(name, &rows[i], "plain", &plain);
        echo_bench::record_ratio(&mut results, name, "plain");
    }
    println!(
        "DNS p50/p99 µs: cluster name via connect {:.0}/{:.0}, cluster DNS asked through kt0 {:.0}/{:.0}; non-cluster name via connect {:.0}/{:.0}, workstation resolver direct {:.0}/{:.0}",
        cluster_name[0],
        cluster_name[1],
        cluster_direct[0],
        cluster_direct[1],
        upstream_via_connect[0],
        upstream_via_connect[1],
        upstream_direct[0],
        upstream_direct[1]
    );
    println!(
        "start to banner (first start of each): agent {agent_start:.1?}, agent over port-forward {agent_pf_start:.1?}, kt shadow {shadow_start:.1?}, sshuttle {sshuttle_start:.1?}; hosts mode with {extra_services} more Services {hosts_start_many:.1?}"
    );
    println!(
        "start to banner, agent, {} starts on a quiet machine: median {:.3} s with the testbed's Services, {:.3} s with {extra_services} more",
        starts_few.len(),
        median(&starts_few).unwrap_or_default(),
        median(&starts_many).unwrap_or_default(),
    );
    println!(
        "ktctl RSS in hosts mode: {rss_few} KiB with the testbed's Services, {rss_many} KiB with {extra_services} more (created in {:.1?}, all in /etc/hosts {hosts_after:.1?} later)",
        created.elapsed()
    );
    results
        .figure("start to banner: agent, quiet", "s", &starts_few)
        .expect("start figures");
    results
        .figure(
            "start to banner: agent, many Services, quiet",
            "s",
            &starts_many,
        )
        .expect("start figures");
    // One measurement each (a DNS figure is itself a percentile of 200 lookups).
    let mut single = |name: &str, unit: &str, value: f64| {
        results.figure(name, unit, &[value]).expect("one figure");
    };
    for (name, [p50, p99]) in [
        ("cluster name via connect", cluster_name),
        ("cluster DNS through kt0", cluster_direct),
        ("non-cluster name via connect", upstream_via_connect),
        ("workstation resolver direct", upstream_direct),
    ] {
        single(&format!("DNS {name}: p50"), "µs", p50);
        single(&format!("DNS {name}: p99"), "µs", p99);
    }
    for (name, took) in [
        ("agent", agent_start),
        ("agent over port-forward", agent_pf_start),
        ("hosts mode, many Services", hosts_start_many),
        ("kt shadow", shadow_start),
        ("sshuttle", sshuttle_start),
    ] {
        single(&format!("start to banner: {name}"), "s", took.as_secs_f64());
    }
    single("hosts mode RSS: testbed's Services", "KiB", rss_few as f64);
    single(
        &format!("hosts mode RSS: {extra_services} more Services"),
        "KiB",
        rss_many as f64,
    );
    single(
        "hosts mode: all Services in /etc/hosts after creation",
        "s",
        hosts_after.as_secs_f64(),
    );
    for (name, baseline) in [
        (
            "DNS cluster name via connect",
            "DNS cluster DNS through kt0",
        ),
        (
            "DNS non-cluster name via connect",
            "DNS workstation resolver direct",
        ),
    ] {
        for p in ["p50", "p99"] {
            results
                .ratio(&format!("{name}: {p}"), &format!("{baseline}: {p}"))
                .expect("DNS figures");
        }
    }
    results
        .ratio(
            "start to banner: agent, many Services, quiet",
            "start to banner: agent, quiet",
        )
        .expect("start figures");
    results
        .ratio(
            &format!("hosts mode RSS: {extra_services} more Services"),
            "hosts mode RSS: testbed's Services",
        )
        .expect("RSS figures");
    results.write();
    drop(client);
    tb.stop().await;
}
