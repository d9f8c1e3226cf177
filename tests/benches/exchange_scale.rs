//! `ktctl exchange --mode agent` ready time on a large cluster (issue 17: "exchange ready in
//! agent mode ≤ 100 ms median with 10 000 Services in the cluster, and within 1.2× of the
//! empty cluster"), in one run on a two-node testbed with the agent installed from
//! `deploy/`:
//!
//! - **ready time**: command start → the first request from the `client` pod to the
//!   exchanged Service's ClusterIP that the workstation answers. A probe loop inside the
//!   pod (`curl` every few milliseconds, so within the pod's cgroup, where the agent's
//!   redirect applies) prints the wall clock of that first answer; the pod and the
//!   benchmark share the kernel's clock. Each round ends with Ctrl-C and waits until the
//!   pods answer again. Measured with the cluster as the testbed starts it (the baseline,
//!   "empty") and again after [`SERVICES`] more Services, each with a selector matching one
//!   of [`POOLS`] Deployments of [`ENDPOINTS`] pods (so 3 endpoints each, 30 000 in all,
//!   written by the testbed's EndpointSlice controller).
//! - **Service creation rate** (kube-rs creates, 16 in flight) per batch of 1 000: what
//!   the simulated cluster sustains, at 1 000, 5 000 and 10 000 Services.
//! - At 10 000 Services: each node agent's **RSS** (VmRSS from /proc) and its
//!   **`kt_agent_reconcile_seconds`** histogram (passes, mean, p50/p99 as bucket bounds).
//! - Where the time goes: per round, when the agents logged the session connected, its
//!   tunnel listener and their redirects (ms after the start); each API call ktctl makes
//!   before its session exists, empty and loaded; and which processes used the CPU over
//!   3 s with nothing happening (the testbed's own work competes with kt for two cores).
//!
//! Medians over `KT_BENCH_ROUNDS` rounds (default 5); also
//! `target/kt-bench/exchange_scale.json`. Run as root: `tests/run bench`, or alone:
//! `cargo bench -p kt-tests --bench exchange_scale`.

use std::{
    process::Stdio,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use futures::{StreamExt as _, stream};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kt_testbed::{cluster::Testbed, topology::node_ip};
use kt_tests::harness::{
    apps::{agent_rss, answered_by, apply, deploy_web, in_pod, install_agent, start_testbed},
    bench_rounds,
    eventually::{eventually, poll_within},
    kubectl::kubectl_ok,
    metrics::Histogram,
    results::Results,
    run_bench,
    workstation::{self, Background},
};
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;
use tokio::io::{AsyncBufReadExt as _, BufReader};

/// Services added for the loaded case (issue 17's large cluster).
const SERVICES: usize = 10_000;
/// Services created per timed batch.
const BATCH: usize = 1_000;
/// Deployments the Services select, round robin.
const POOLS: usize = 2;
/// Replicas per pool: the endpoints of each Service.
const ENDPOINTS: usize = 3;
/// Where the workstation's app listens.
const LOCAL_HTTP: u16 = 18090;
/// Issue 17's goals: the median at 10 000 Services, in ms, and its ratio to the empty one.
const READY_GOAL_MS: f64 = 100.0;
const RATIO_GOAL: f64 = 1.2;

const EMPTY: &str = "ready: empty cluster";
const LOADED: &str = "ready: 10000 Services";

fn main() {
    run_bench("exchange_scale", run());
}

/// The pool Deployments: HTTP echo pods, ready when they answer.
fn pools() -> String {
    (0..POOLS)
        .map(|j| {
            format!(
                r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: pool-{j}}}
spec:
  replicas: {ENDPOINTS}
  selector: {{matchLabels: {{app: pool-{j}}}}}
  template:
    metadata: {{labels: {{app: pool-{j}}}}}
    spec:
      containers:
      - name: app
        image: kt-testbed/http-echo:1
        ports: [{{name: http, containerPort: 8080}}]
        readinessProbe: {{httpGet: {{path: /, port: 8080}}, periodSeconds: 1}}
"#
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

async fn run() {
    let rounds = bench_rounds(5);
    let tb = start_testbed(true).await;
    deploy_web(&tb);
    apply(&tb.kubeconfig, &pools());
    install_agent(&tb);
    for j in 0..POOLS {
        kubectl_ok(
            &tb.kubeconfig,
            &[
                "rollout",
                "status",
                &format!("deploy/pool-{j}"),
                "--timeout=120s",
            ],
        );
    }
    let _app = workstation::http_echo(&tb, LOCAL_HTTP).await;
    let web_ip = kubectl_ok(
        &tb.kubeconfig,
        &["get", "svc", "web", "-o", "jsonpath={.spec.clusterIP}"],
    );
    let mut results = Results::new("exchange_scale");

    let mut empty = Vec::new();
    for _ in 0..rounds {
        empty.push(ready_ms(&tb, &web_ip).await);
    }
    println!("ready, empty cluster: {empty:.1?} ms");
    let client = tb.client().await;
    let calls_empty = api_calls(&client, rounds).await;

    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let rates = create_services(&services).await;
    for (done, rate) in &rates {
        println!("created {done} Services: {rate:.0} Services/s over the last {BATCH}");
    }
    for at in [1_000, 5_000, 10_000] {
        if let Some((_, rate)) = rates.iter().find(|(done, _)| *done == at) {
            results
                .figure(&format!("create rate at {at} Services"), "1/s", &[*rate])
                .expect("one reading");
        }
    }
    let settled = Instant::now();
    until_endpoints(&Api::namespaced(client, "default")).await;
    println!(
        "every Service has its {ENDPOINTS} endpoints {:.1?} after the last create",
        settled.elapsed()
    );
    // Let the agents' watches and reconciles catch up before timing.
    tokio::time::sleep(Duration::from_secs(5)).await;

    let mut loaded = Vec::new();
    for _ in 0..rounds {
        loaded.push(ready_ms(&tb, &web_ip).await);
    }
    println!("ready, {SERVICES} Services: {loaded:.1?} ms");
    let calls_loaded = api_calls(&tb.client().await, rounds).await;
    println!(
        "CPU over 3 s with nothing happening, at {SERVICES} Services: {}",
        idle_cpu()
    );
    for ((call, empty), (_, loaded)) in calls_empty.iter().zip(&calls_loaded) {
        let name = |at: &str| format!("API call before the session, {at}: {call}");
        let empty = results.figure(&name("empty"), "ms", empty).expect("rounds");
        let loaded = results
            .figure(&name(&format!("{SERVICES} Services")), "ms", loaded)
            .expect("rounds");
        println!("{call}: median {empty:.2} ms empty, {loaded:.2} ms at {SERVICES} Services");
    }

    let rss = agent_rss(&tb);
    let histograms: Vec<Histogram> = [1, 2]
        .iter()
        .map(|node| {
            let url = format!("http://{}:9966/metrics", node_ip(*node));
            let page = in_pod(&tb, "client", &["curl", "-s", &url]).1;
            Histogram::parse(&page, "kt_agent_reconcile_seconds")
                .unwrap_or_else(|| panic!("no reconcile histogram on node-{node}: {page}"))
        })
        .collect();

    let empty_median = results.figure(EMPTY, "ms", &empty).expect("rounds");
    let loaded_median = results.figure(LOADED, "ms", &loaded).expect("rounds");
    let ratio = results.ratio(LOADED, EMPTY).expect("both recorded");
    let goal = results.goal(LOADED, READY_GOAL_MS).expect("recorded");
    let rss: Vec<f64> = rss.iter().map(|kib| *kib as f64).collect();
    results
        .figure("agent RSS at 10000 Services: per agent", "KiB", &rss)
        .expect("agents running");
    for (node, h) in (1..).zip(&histograms) {
        let ms = |s: Option<f64>| s.unwrap_or(f64::NAN) * 1000.0;
        let prefix = format!("agent node-{node} reconcile at 10000 Services");
        for (what, value) in [
            ("passes", h.count as f64),
            ("mean ms", ms(h.mean())),
            ("p50 ms (bucket bound)", ms(h.quantile(0.5))),
            ("p99 ms (bucket bound)", ms(h.quantile(0.99))),
        ] {
            let unit = if what == "passes" { "count" } else { "ms" };
            let name = format!("{prefix}: {what}");
            // A quantile past the last bucket is +Inf: not a figure JSON can hold.
            if value.is_finite() {
                results.figure(&name, unit, &[value]).expect("one reading");
            }
            println!("{name}: {value:.3}");
        }
    }
    println!(
        "exchange ready (agent mode), medians of {rounds}: empty {empty_median:.1} ms, \
         {SERVICES} Services {loaded_median:.1} ms (×{ratio:.2}, goal ≤ ×{RATIO_GOAL}; \
         {goal:.2} of the {READY_GOAL_MS} ms goal)"
    );
    println!("agent RSS at {SERVICES} Services: {rss:?} KiB");
    results.write();
    tb.stop().await;
}

/// The processes that used the most CPU over 3 s (ms each), from `/proc/<pid>/stat`.
fn idle_cpu() -> String {
    let ticks = || -> std::collections::BTreeMap<u32, (String, u64)> {
        let mut out = std::collections::BTreeMap::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
                continue;
            };
            let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
            let used = fields
                .get(11)
                .and_then(|u| u.parse::<u64>().ok())
                .unwrap_or(0)
                + fields
                    .get(12)
                    .and_then(|s| s.parse::<u64>().ok())
                    .unwrap_or(0);
            out.insert(pid, (stat[open + 1..close].to_owned(), used));
        }
        out
    };
    let before = ticks();
    std::thread::sleep(Duration::from_secs(3));
    let mut used: Vec<(u64, String)> = ticks()
        .into_iter()
        .filter_map(|(pid, (name, after))| {
            let was = before.get(&pid).map_or(0, |(_, t)| *t);
            (after > was).then(|| ((after - was) * 10, format!("{name}[{pid}]")))
        })
        .collect();
    used.sort_by(|a, b| b.cmp(a));
    used.iter()
        .take(6)
        .map(|(ms, who)| format!("{who} {ms} ms"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// When each agent logged, after `started_ns` (unix ns), the session connected, its tunnel
/// listener and its first redirect, in ms after `started_ns`: where a round's time went.
fn timeline(tb: &Testbed, started_ns: u128) -> String {
    let out = std::process::Command::new("kubectl")
        .args([
            "logs",
            "-n",
            "kt-system",
            "-l",
            "app.kubernetes.io/name=kt-node-agent",
            "--prefix",
            "--tail=400",
        ])
        .env("KUBECONFIG", &tb.kubeconfig)
        .output()
        .expect("kubectl runs");
    // Each line: `[pod/<name>/<container>] <RFC 3339 time> <level> <message>`.
    let text = String::from_utf8_lossy(&out.stdout);
    let mut seen: std::collections::BTreeMap<(String, &str), f64> = Default::default();
    for line in text.lines() {
        let Some((prefix, rest)) = line.split_once("] ") else {
            continue;
        };
        let Some((stamp, message)) = rest.trim_start().split_once(' ') else {
            continue;
        };
        let Ok(at) = chrono::DateTime::parse_from_rfc3339(stamp) else {
            continue;
        };
        let at_ns = at.timestamp_nanos_opt().unwrap_or_default() as u128;
        if at_ns < started_ns {
            continue;
        }
        let what = if message.contains("session connected") {
            "connected"
        } else if message.contains("tunnel listener") {
            "listener"
        } else if message.contains(": redirect service=") {
            "redirect"
        } else {
            continue;
        };
        let pod = prefix.rsplit('/').nth(1).unwrap_or(prefix).to_owned();
        seen.entry((pod, what))
            .or_insert((at_ns - started_ns) as f64 / 1e6);
    }
    seen.iter()
        .map(|((pod, what), ms)| format!("{pod} {what} {ms:.1}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What each API call ktctl makes before its agent-mode session exists costs (ms, `rounds`
/// of each, one at a time), and the one it no longer makes: where the ready time grows
/// with the cluster.
async fn api_calls(client: &kube::Client, rounds: usize) -> Vec<(&'static str, Vec<f64>)> {
    use k8s_openapi::api::{apps::v1::Deployment, core::v1::Pod};
    use kt_proto::session::KtSession;
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let agents: Api<Pod> = Api::namespaced(client.clone(), "kt-system");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let by_selector = ListParams::default().labels("app=web");
    let sessions: Api<KtSession> = Api::namespaced(client.clone(), "default");
    let all_sessions: Api<KtSession> = Api::all(client.clone());
    let by_service = ListParams::default().labels("kubernetes.io/service-name=web");
    let agent_pods = ListParams::default().labels("app.kubernetes.io/name=kt-node-agent");
    let mut out: Vec<(&'static str, Vec<f64>)> = Vec::new();
    macro_rules! time {
        ($name:expr, $call:expr) => {{
            let mut ms = Vec::new();
            for _ in 0..rounds {
                let began = Instant::now();
                $call.await.expect($name);
                ms.push(began.elapsed().as_secs_f64() * 1e3);
            }
            out.push(($name, ms));
        }};
    }
    time!("get the Service", services.get("web"));
    time!(
        "list the Service's pods by selector",
        pods.list(&by_selector)
    );
    // What ktctl listed to pick the agent before it counted the pods above: kept to show
    // why (a label selector the API server answers by scanning every slice).
    time!(
        "(no longer made) list the Service's EndpointSlices by label",
        slices.list(&by_service)
    );
    time!("list Deployments", deployments.list(&ListParams::default()));
    time!("list KtSessions", sessions.list(&ListParams::default()));
    time!(
        "list KtSessions, all namespaces",
        all_sessions.list(&ListParams::default())
    );
    time!("list the agents' pods", agents.list(&agent_pods));
    out
}

/// Creates [`SERVICES`] Services `bulk-<i>` (selector `app: pool-<i mod POOLS>`, port 80 →
/// the pods' `http`), 16 at a time; after each [`BATCH`], (Services so far, that batch's
/// creates per second).
async fn create_services(services: &Api<Service>) -> Vec<(usize, f64)> {
    let mut rates = Vec::new();
    for start in (0..SERVICES).step_by(BATCH) {
        let began = Instant::now();
        stream::iter(start..(start + BATCH).min(SERVICES))
            .for_each_concurrent(16, |i| async move {
                let svc: Service = serde_json::from_value(json!({
                    "metadata": {"name": format!("bulk-{i}")},
                    "spec": {"selector": {"app": format!("pool-{}", i % POOLS)},
                             "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}
                }))
                .expect("Service");
                services
                    .create(&PostParams::default(), &svc)
                    .await
                    .expect("created");
            })
            .await;
        let done = (start + BATCH).min(SERVICES);
        rates.push((done, (done - start) as f64 / began.elapsed().as_secs_f64()));
    }
    rates
}

/// Waits until every `bulk-*` Service has an EndpointSlice with its [`ENDPOINTS`] ready
/// endpoints.
async fn until_endpoints(slices: &Api<EndpointSlice>) {
    let complete = async || -> usize {
        let Ok(list) =
            slices
                .list(&ListParams::default().labels(
                    "endpointslice.kubernetes.io/managed-by=endpointslice-controller.k8s.io",
                ))
                .await
        else {
            return 0;
        };
        list.items
            .iter()
            .filter(|s| {
                s.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get("kubernetes.io/service-name"))
                    .is_some_and(|n| n.starts_with("bulk-"))
                    && s.endpoints
                        .iter()
                        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
                        .count()
                        == ENDPOINTS
            })
            .count()
    };
    // Listing 10 000 slices is not free: every 2 s, for as long as a slow machine needs.
    poll_within(Duration::from_secs(600), async || {
        let done = complete().await;
        if done < SERVICES {
            tokio::time::sleep(Duration::from_secs(2)).await;
            return Err(done);
        }
        Ok(())
    })
    .await
    .unwrap_or_else(|done| panic!("{done} of {SERVICES} Services got their {ENDPOINTS} endpoints"));
}

/// Milliseconds from `ktctl exchange web --mode agent` to the first request to `ip:80`
/// from the client pod that the workstation answers; then Ctrl-C, and back to the pods.
async fn ready_ms(tb: &Testbed, ip: &str) -> f64 {
    // The probe: one line when it starts, then the wall clock (ns) of the first answer
    // from the workstation. curl with a short timeout, a few ms apart.
    let script = format!(
        "echo probing; while :; do \
           case \"$(curl -s --max-time 1 http://{ip}/)\" in pod=workstation*) date +%s%N; exit 0;; esac; \
           sleep 0.002; \
         done"
    );
    let mut probe = tokio::process::Command::new("kubectl")
        .args(["exec", "client", "--", "sh", "-c", &script])
        .env("KUBECONFIG", &tb.kubeconfig)
        .env(
            "HOME",
            tb.kubeconfig.parent().expect("the testbed's directory"),
        )
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("kubectl runs");
    let mut lines = BufReader::new(probe.stdout.take().expect("piped")).lines();
    assert_eq!(
        lines.next_line().await.expect("probe output").as_deref(),
        Some("probing")
    );
    let expose = format!("{LOCAL_HTTP}:80");
    let started = SystemTime::now();
    let mut exchange = Background::ktctl(
        tb,
        &["exchange", "web", "--expose", &expose, "--mode", "agent"],
    );
    let answered = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .unwrap_or_else(|_| panic!("not redirected within 60 s: {}", exchange.log()))
        .expect("probe output")
        .and_then(|ns| ns.trim().parse::<u128>().ok())
        .unwrap_or_else(|| panic!("the probe ended without an answer: {}", exchange.log()));
    let started_ns = started
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_nanos();
    let ms = answered.saturating_sub(started_ns) as f64 / 1e6;
    let _ = probe.wait().await;
    exchange.wait_for("will be redirected to local").await;
    println!("  round: answered {ms:.1} ms; {}", timeline(tb, started_ns));
    let (status, log) = exchange.interrupt();
    assert!(status.success(), "{log}");
    eventually("the pods answer again", async || {
        answered_by(tb, "client", "http://web/").filter(|who| who != "workstation")
    })
    .await;
    ms
}
