//! The agent at scale (issue 17, item 1): a 2-node testbed with 10 000 Services, each with
//! one EndpointSlice of 3 ready endpoints (30 000 endpoints; the Services have no selector
//! and the slices are written as another controller would write them, so no pods are
//! needed), then 10, 100 and 1 000 live exchange sessions, each on its own Service and held
//! as node-1's agent holds one: its record lists the session, then the status names it
//! (`kt_node_agent::agent::trust`). For each agent, at each step:
//!
//! - RSS (`VmRSS`) once the step has settled;
//! - CPU seconds per 1 000 watch events: the process's user + system CPU over the step
//!   divided by the increase of its `kt_agent_watch_events_total`;
//! - reconcile p50 and p99 over the step's passes, from `kt_agent_reconcile_seconds`, and
//!   the same of their CPU time (`kt_agent_reconcile_cpu_seconds`: the testbed's API
//!   server, both agents and this bench share the machine's cores, so a pass may wait);
//!   upper bucket bounds, in steps of 1, 2 and 5: 5 ms means 2–5 ms;
//! - "session held → every agent programmed", for the last [`SAMPLES`] sessions of the
//!   step, added one at a time after the others were added together (each part is a line
//!   of its own: a pass that programs hundreds of sessions at once costs what it writes):
//!   from the holder's record write to both agents' acknowledgement in
//!   `status.programmed` (an agent acknowledges after writing its eBPF map), as a watch of
//!   the bench sees it; p50, p99 (rank rule) and max.
//!
//! The baseline is the same agents idle, installed on the empty cluster. Goals (issue 17)
//! at 1 000 sessions: RSS ≤ 64 MiB, reconcile p99 ≤ 5 ms, programmed p99 ≤ 200 ms.
//! Results: a table and `target/kt-bench/agent_scale.json`. Run as root: `tests/run bench`.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::{StreamExt as _, stream};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kt_node_agent::agent::trust::HeldSession;
use kt_proto::session::{KtSession, Listener};
use kt_testbed::{cluster::Testbed, topology::node_ip};
use kt_tests::harness::{
    apps::{agent_pid, deploy_web, in_pod, install_agent, start_testbed, write_agent_record},
    eventually::poll_within,
    metrics::Histogram,
    results::{Results, percentile},
    run_bench,
};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt as _, watcher},
};
use serde_json::json;
use tokio::sync::Notify;

const SERVICES: usize = 10_000;
const ENDPOINTS_PER_SERVICE: usize = 3;
/// The live sessions after each step.
const STEPS: [usize; 3] = [10, 100, 1_000];
/// Sessions per step added one at a time and timed (all of the first step's).
const SAMPLES: usize = 20;
const NODES: [&str; 2] = ["node-1", "node-2"];
/// How many creates and patches the bench keeps in flight.
const IN_FLIGHT: usize = 32;

fn main() {
    run_bench("agent scale", run());
}

/// The `i`-th address of 10.200.0.0/16: endpoint addresses nothing answers at; the map's
/// entries are what is measured.
fn endpoint_ip(i: usize) -> String {
    format!("10.200.{}.{}", (i >> 8) & 0xff, i & 0xff)
}

/// The listener port session `i` says node-1's agent opened for it.
fn listener_port(i: usize) -> u16 {
    20_000 + u16::try_from(i).expect("fewer than 45 536 sessions")
}

fn session_name(i: usize) -> String {
    format!("s{i}-bench")
}

/// One agent's state at a moment.
struct Reading {
    rss_kib: u64,
    /// User + system CPU since the process started.
    cpu_s: f64,
    watch_events: f64,
    /// Of `watch_events`, those of the Services and EndpointSlices watches.
    index_events: f64,
    redirect_entries: u64,
    reconcile: Histogram,
    /// The passes' CPU time.
    reconcile_cpu: Histogram,
}

/// The user + system CPU seconds the agent of `node` has used, from /proc (fields 14 and
/// 15 of `stat`, counted after the command's closing paren).
fn agent_cpu(tb: &Testbed, node: usize) -> f64 {
    let name = NODES[node];
    let pid = agent_pid(tb, name).unwrap_or_else(|| panic!("no agent on {name}"));
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after_comm: Vec<&str> = stat
        .rsplit_once(')')
        .expect("stat")
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = after_comm[11..13]
        .iter()
        .map(|t| t.parse::<f64>().expect("ticks"))
        .sum();
    // SAFETY: sysconf has no failure mode for this name.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// The agent of `node` now: /proc for memory and CPU, its `/metrics` (read from the
/// client pod) for the rest. The CPU is read first: the scrape costs the agent some.
fn read_agent(tb: &Testbed, node: usize) -> Reading {
    let name = NODES[node];
    let cpu_s = agent_cpu(tb, node);
    let pid = agent_pid(tb, name).unwrap_or_else(|| panic!("no agent on {name}"));
    let rss_kib = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS");
    let url = format!("http://{}:9966/metrics", node_ip(node as u8 + 1));
    let page = in_pod(tb, "client", &["curl", "-s", &url]).1;
    let value = |line: &str| line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
    let watch_events = page
        .lines()
        .filter(|l| l.starts_with("kt_agent_watch_events_total{"))
        .filter_map(value)
        .sum();
    let redirect_entries = page
        .lines()
        .find(|l| l.starts_with("kt_agent_redirect_entries "))
        .and_then(value)
        .unwrap_or_else(|| panic!("no kt_agent_redirect_entries on {name}: {page}"))
        as u64;
    let index_events = page
        .lines()
        .filter(|l| {
            l.starts_with("kt_agent_watch_events_total{watch=\"watch-services\"}")
                || l.starts_with("kt_agent_watch_events_total{watch=\"watch-endpointslices\"}")
        })
        .filter_map(value)
        .sum();
    Reading {
        rss_kib,
        cpu_s,
        watch_events,
        index_events,
        redirect_entries,
        reconcile: Histogram::parse(&page, "kt_agent_reconcile_seconds")
            .unwrap_or_else(|| panic!("no reconcile histogram on {name}: {page}")),
        reconcile_cpu: Histogram::parse(&page, "kt_agent_reconcile_cpu_seconds")
            .unwrap_or_else(|| panic!("no reconcile CPU histogram on {name}: {page}")),
    }
}

fn read_agents(tb: &Testbed) -> Vec<Reading> {
    (0..NODES.len()).map(|n| read_agent(tb, n)).collect()
}

/// When each session was first seen acknowledged by every agent, from a watch of all
/// sessions the bench runs.
#[derive(Clone, Default)]
struct Programmed {
    at: Arc<Mutex<HashMap<String, Instant>>>,
    seen: Arc<Notify>,
}

impl Programmed {
    /// Watches every session in `api` until the runtime ends.
    fn follow(&self, api: Api<KtSession>) {
        let this = self.clone();
        tokio::spawn(async move {
            let events = watcher(api, watcher::Config::default())
                .default_backoff()
                .touched_objects();
            let mut events = std::pin::pin!(events);
            // An error (the testbed stopping, at the end) is retried with back-off; a
            // session never seen acknowledged fails `all` instead.
            while let Some(event) = events.next().await {
                let Ok(session) = event else { continue };
                let acknowledged = session.status.as_ref().is_some_and(|s| {
                    NODES
                        .iter()
                        .all(|n| s.programmed.get(*n).is_some_and(|p| p.ports == [80]))
                });
                if acknowledged {
                    let name = session.metadata.name.clone().expect("named");
                    this.at
                        .lock()
                        .expect("not poisoned")
                        .entry(name)
                        .or_insert_with(Instant::now);
                    this.seen.notify_waiters();
                }
            }
        });
    }

    /// Waits until every session of `names` is acknowledged by every agent; when the last
    /// one was.
    async fn all(&self, names: &[String]) -> Instant {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let seen = self.seen.notified();
            {
                let at = self.at.lock().expect("not poisoned");
                let times: Option<Vec<Instant>> =
                    names.iter().map(|n| at.get(n).copied()).collect();
                if let Some(times) = times {
                    return times.into_iter().max().unwrap_or_else(Instant::now);
                }
            }
            assert!(
                Instant::now() < deadline,
                "the agents did not acknowledge {names:?}"
            );
            let _ = tokio::time::timeout(Duration::from_secs(1), seen).await;
        }
    }
}

/// What the bench holds: the sessions node-1's record lists.
struct Holder {
    /// One client for every write (a fresh one would add a TLS handshake to what is timed).
    client: kube::Client,
    sessions: Api<KtSession>,
    held: Vec<HeldSession>,
}

impl Holder {
    /// Creates the sessions `range` (unheld: no status yet).
    async fn create(&mut self, range: std::ops::Range<usize>) {
        let created: Vec<HeldSession> = stream::iter(range)
            .map(|i| {
                let sessions = self.sessions.clone();
                async move {
                    let session: KtSession = serde_json::from_value(json!({
                        "apiVersion": "kt.dev/v1alpha1", "kind": "KtSession",
                        "metadata": {"name": session_name(i)},
                        "spec": {"owner": "bench", "mode": "exchange", "service": format!("s{i}"),
                                 "ports": [{"port": 80, "localPort": 8080}],
                                 "publicKey": "ssh-ed25519 AAAA bench", "leaseSeconds": 3600}
                    }))
                    .expect("session");
                    let created = sessions
                        .create(&PostParams::default(), &session)
                        .await
                        .expect("created");
                    HeldSession {
                        udp_listeners: Vec::new(),
                        namespace: "default".into(),
                        name: session_name(i),
                        uid: created.metadata.uid.expect("a uid"),
                        listeners: vec![Listener {
                            port: 80,
                            listener_port: listener_port(i),
                        }],
                    }
                }
            })
            .buffer_unordered(IN_FLIGHT)
            .collect()
            .await;
        self.held.extend(created);
    }

    /// Holds the sessions `range`, created before: node-1's record lists them, then each
    /// status names node-1 and its listener.
    async fn hold(&self, range: std::ops::Range<usize>) {
        write_agent_record(self.client.clone(), "node-1", &self.held).await;
        stream::iter(range)
            .for_each_concurrent(IN_FLIGHT, |i| async move {
                let status = json!({"status": {
                    "node": "node-1", "address": node_ip(1).to_string(),
                    "listeners": [{"port": 80, "listenerPort": listener_port(i)}],
                    "renewTime": chrono::Utc::now(),
                }});
                self.sessions
                    .patch_status(
                        &session_name(i),
                        &PatchParams::default(),
                        &Patch::Merge(&status),
                    )
                    .await
                    .expect("status");
            })
            .await;
    }
}

/// Creates the Services and their slices.
async fn create_cluster(client: kube::Client) {
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let slices: Api<EndpointSlice> = Api::namespaced(client, "default");
    stream::iter(0..SERVICES)
        .for_each_concurrent(IN_FLIGHT, |i| {
            let (services, slices) = (services.clone(), slices.clone());
            async move {
                let service: Service = serde_json::from_value(json!({
                    "metadata": {"name": format!("s{i}")},
                    "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
                }))
                .expect("Service");
                services
                    .create(&PostParams::default(), &service)
                    .await
                    .expect("Service created");
                let endpoints: Vec<_> = (0..ENDPOINTS_PER_SERVICE)
                    .map(|e| {
                        json!({"addresses": [endpoint_ip(i * ENDPOINTS_PER_SERVICE + e)],
                               "conditions": {"ready": true}})
                    })
                    .collect();
                let slice: EndpointSlice = serde_json::from_value(json!({
                    "metadata": {"name": format!("s{i}-bench"),
                                 "labels": {"kubernetes.io/service-name": format!("s{i}"),
                                            "endpointslice.kubernetes.io/managed-by": "bench.kt.dev"}},
                    "addressType": "IPv4",
                    "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                    "endpoints": endpoints
                }))
                .expect("EndpointSlice");
                slices
                    .create(&PostParams::default(), &slice)
                    .await
                    .expect("EndpointSlice created");
            }
        })
        .await;
}

/// Waits until both agents' maps hold `entries` entries.
async fn until_entries(tb: &Testbed, entries: u64) {
    poll_within(Duration::from_secs(300), async || {
        read_agents(tb)
            .iter()
            .all(|r| r.redirect_entries == entries)
    })
    .await
    .unwrap_or_else(|_| panic!("the agents did not program {entries} entries"));
}

/// Waits until both agents are quiet: less than 20 ms of CPU each over a second (the
/// work a step started, such as its Events and acknowledgements, is then done and not
/// counted in the next step); at most a minute.
async fn until_quiet(tb: &Testbed) {
    let deadline = Instant::now() + Duration::from_secs(60);
    // /proc only: a scrape of `/metrics` would keep the agent busy.
    let cpu = || -> Vec<f64> { (0..NODES.len()).map(|n| agent_cpu(tb, n)).collect() };
    let mut last = cpu();
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = cpu();
        if now.iter().zip(&last).all(|(n, l)| n - l < 0.02) {
            return;
        }
        last = now;
    }
    println!("(the agents were still busy after a minute)");
}

/// Waits until both agents' Services and EndpointSlices watches have seen `events` events
/// more than in `before`.
async fn until_watched(tb: &Testbed, before: &[Reading], events: f64) {
    poll_within(Duration::from_secs(300), async || {
        read_agents(tb)
            .iter()
            .zip(before)
            .all(|(now, then)| now.index_events - then.index_events >= events)
    })
    .await
    .unwrap_or_else(|_| panic!("the agents did not see {events} Service and slice events"));
}

/// The label of the step that ends with `sessions` live, the last ones added one at a time.
fn one_at_a_time(sessions: usize) -> String {
    format!("{SERVICES} Services, {sessions} sessions, one at a time")
}

/// Records one step's figures: from `before` to `after`, with `held_ms` the timed
/// sessions' "held → every agent programmed".
fn record_step(
    results: &mut Results,
    label: &str,
    before: &[Reading],
    after: &[Reading],
    held_ms: &[f64],
) {
    let per_agent = |f: &dyn Fn(&Reading, &Reading) -> f64| -> Vec<f64> {
        before.iter().zip(after).map(|(b, a)| f(b, a)).collect()
    };
    let rss = per_agent(&|_, a| a.rss_kib as f64);
    let cpu = per_agent(&|b, a| {
        (a.cpu_s - b.cpu_s) / (a.watch_events - b.watch_events).max(1.0) * 1000.0
    });
    let events = per_agent(&|b, a| a.watch_events - b.watch_events);
    let passes: Vec<Histogram> = before
        .iter()
        .zip(after)
        .map(|(b, a)| a.reconcile.since(&b.reconcile))
        .collect();
    let cpu_of_passes: Vec<Histogram> = before
        .iter()
        .zip(after)
        .map(|(b, a)| a.reconcile_cpu.since(&b.reconcile_cpu))
        .collect();
    let ms = |histograms: &[Histogram], q: f64| -> Vec<f64> {
        histograms
            .iter()
            .map(|h| h.quantile(q).unwrap_or(0.0) * 1000.0)
            .collect()
    };
    let (p50, p99) = (ms(&passes, 0.5), ms(&passes, 0.99));
    let (cpu_p50, cpu_p99) = (ms(&cpu_of_passes, 0.5), ms(&cpu_of_passes, 0.99));
    let figures: [(&str, &str, &[f64]); 8] = [
        ("RSS per agent", "KiB", &rss),
        (
            "largest agent RSS",
            "KiB",
            &[rss.iter().copied().fold(0.0, f64::max)],
        ),
        ("CPU per 1000 watch events per agent", "s", &cpu),
        ("watch events per agent", "count", &events),
        ("reconcile p50 per agent (bucket bound)", "ms", &p50),
        ("reconcile p99 per agent (bucket bound)", "ms", &p99),
        ("reconcile CPU p50 per agent (bucket bound)", "ms", &cpu_p50),
        ("reconcile CPU p99 per agent (bucket bound)", "ms", &cpu_p99),
    ];
    for (what, unit, values) in figures {
        results
            .figure(&format!("{what}, {label}"), unit, values)
            .expect("readings");
    }
    let worst_p99 = p99.iter().copied().fold(0.0, f64::max);
    results
        .figure(
            &format!("largest reconcile p99, {label}"),
            "ms",
            &[worst_p99],
        )
        .expect("reading");
    let mut line = format!(
        "{label:<46} RSS {:>6.1} {:>6.1} MiB  CPU/1000 ev {:>6.3} {:>6.3} s  reconcile p50 {:>5.1} {:>5.1} p99 {:>5.1} {:>5.1} ms, CPU p50 {:>5.1} {:>5.1} p99 {:>5.1} {:>5.1} ms ({} {} passes)",
        rss[0] / 1024.0,
        rss[1] / 1024.0,
        cpu[0],
        cpu[1],
        p50[0],
        p50[1],
        p99[0],
        p99[1],
        cpu_p50[0],
        cpu_p50[1],
        cpu_p99[0],
        cpu_p99[1],
        passes[0].count,
        passes[1].count
    );
    if !held_ms.is_empty() {
        let name = format!("session held → every agent programmed, {label}");
        let p50 = results.figure(&name, "ms", held_ms).expect("samples");
        let p99 = percentile(held_ms, 0.99).expect("samples");
        let max = held_ms.iter().copied().fold(0.0, f64::max);
        results
            .figure(&format!("{name}: p99"), "ms", &[p99])
            .expect("reading");
        line.push_str(&format!(
            "  programmed p50 {p50:.1} p99 {p99:.1} max {max:.1} ms"
        ));
    }
    println!("{line}");
}

async fn run() {
    let tb = start_testbed(true).await;
    deploy_web(&tb);
    install_agent(&tb);
    until_entries(&tb, 0).await;
    // Settling time before a memory reading, on purpose.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut results = Results::new("agent_scale");
    let idle = read_agents(&tb);
    println!(
        "agent at scale: {SERVICES} Services ({} endpoints), then {STEPS:?} sessions; {SAMPLES} timed per step",
        SERVICES * ENDPOINTS_PER_SERVICE
    );
    let idle_rss: Vec<f64> = idle.iter().map(|r| r.rss_kib as f64).collect();
    results
        .figure("RSS per agent, idle", "KiB", &idle_rss)
        .expect("readings");
    println!(
        "{:<46} RSS {:>6.1} {:>6.1} MiB",
        "idle",
        idle_rss[0] / 1024.0,
        idle_rss[1] / 1024.0
    );

    let started = Instant::now();
    create_cluster(tb.client().await).await;
    // Each Service and slice is one event of each agent's watch.
    until_watched(&tb, &idle, (2 * SERVICES) as f64).await;
    let created = started.elapsed();
    until_quiet(&tb).await;
    let mut before = read_agents(&tb);
    let label = format!("{SERVICES} Services, 0 sessions");
    record_step(&mut results, &label, &idle, &before, &[]);
    results
        .figure(
            "Services and slices created and watched",
            "s",
            &[created.as_secs_f64()],
        )
        .expect("reading");

    let client = tb.client().await;
    let sessions: Api<KtSession> = Api::namespaced(client.clone(), "default");
    let programmed = Programmed::default();
    programmed.follow(sessions.clone());
    let mut holder = Holder {
        client,
        sessions,
        held: Vec::new(),
    };
    let mut live = 0;
    for step in STEPS {
        let timed_from = step - SAMPLES.min(step - live);
        // The bulk: created, held and programmed together.
        if timed_from > live {
            holder.create(live..timed_from).await;
            holder.hold(live..timed_from).await;
            let names: Vec<String> = (live..timed_from).map(session_name).collect();
            programmed.all(&names).await;
            until_entries(&tb, (timed_from * (1 + ENDPOINTS_PER_SERVICE)) as u64).await;
            until_quiet(&tb).await;
            let after = read_agents(&tb);
            let label = format!(
                "{} sessions added together, to {timed_from}",
                timed_from - live
            );
            record_step(&mut results, &label, &before, &after, &[]);
            before = after;
        }
        let mut held_ms = Vec::new();
        for i in timed_from..step {
            holder.create(i..i + 1).await;
            let start = Instant::now();
            holder.hold(i..i + 1).await;
            let done = programmed.all(&[session_name(i)]).await;
            held_ms.push(done.duration_since(start).as_secs_f64() * 1000.0);
        }
        live = step;
        until_entries(&tb, (step * (1 + ENDPOINTS_PER_SERVICE)) as u64).await;
        until_quiet(&tb).await;
        let after = read_agents(&tb);
        record_step(
            &mut results,
            &one_at_a_time(step),
            &before,
            &after,
            &held_ms,
        );
        before = after;
    }

    let at = |what: &str, sessions: usize| format!("{what}, {}", one_at_a_time(sessions));
    let last = STEPS[STEPS.len() - 1];
    for (figure, goal) in [
        (at("largest agent RSS", last), 64.0 * 1024.0),
        (at("largest reconcile p99", last), 5.0),
        (
            format!("{}: p99", at("session held → every agent programmed", last)),
            200.0,
        ),
    ] {
        let ratio = results.goal(&figure, goal).expect("recorded");
        println!("{figure} / goal {goal}: ×{ratio:.2}");
    }
    let ratio = results
        .ratio(&at("RSS per agent", last), "RSS per agent, idle")
        .expect("recorded");
    println!("RSS at {last} sessions / idle: ×{ratio:.2}");
    let first = STEPS[0];
    let ratio = results
        .ratio(
            &at("session held → every agent programmed", last),
            &at("session held → every agent programmed", first),
        )
        .expect("recorded");
    println!("programmed p50 at {last} / at {first} sessions: ×{ratio:.2}");
    results.write();
    tb.stop().await;
}
