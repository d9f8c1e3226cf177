//! The agent's memory at scale: resident set size of each node's `kt-node-agent agent` with
//! the agent just installed (the baseline, same run), then with 1 000 Services and 100 live
//! sessions programmed (each session's ClusterIP redirected on every node).
//! Results: the readings, the ratio, and `target/kt-bench/agent_rss.json`.
//! Run as root: `tests/run bench`.

use std::time::Duration;

use futures::{StreamExt as _, stream};
use k8s_openapi::api::core::v1::Service;
use kt_node_agent::agent::trust::HeldSession;
use kt_proto::session::{KtSession, Listener};
use kt_testbed::{cluster::Testbed, topology::node_ip};
use kt_tests::harness::{
    apps::{
        agent_rss, create_services, deploy_web, in_pod, install_agent, start_testbed,
        write_agent_record,
    },
    eventually::poll_within,
    results::Results,
    run_bench,
};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

const SERVICES: usize = 1000;
const SESSIONS: usize = 100;

fn main() {
    run_bench("agent RSS", run());
}

/// The listener port session `i` says node-1's agent opened for it.
fn listener_port(i: usize) -> u16 {
    40_000 + u16::try_from(i).expect("fewer than 25 536 sessions")
}

/// Waits until both agents report `entries` redirect entries.
async fn until_programmed(tb: &Testbed, entries: usize) {
    let want = format!("kt_agent_redirect_entries {entries}");
    // A thousand Services take the agents a while: a bound of its own, beyond test patience.
    poll_within(Duration::from_secs(300), async || {
        [1, 2].iter().all(|node| {
            let url = format!("http://{}:9966/metrics", node_ip(*node));
            in_pod(tb, "client", &["curl", "-s", &url])
                .1
                .contains(&want)
        })
    })
    .await
    .unwrap_or_else(|_| panic!("the agents did not program {entries} entries"));
}

async fn run() {
    let tb = start_testbed(true).await;
    deploy_web(&tb);
    install_agent(&tb);
    until_programmed(&tb, 0).await;
    // Settling time before a memory reading, on purpose.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let baseline = agent_rss(&tb);

    let client = tb.client().await;
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let sessions: Api<KtSession> = Api::namespaced(client, "default");
    let started = std::time::Instant::now();
    create_services(&services, SERVICES).await;
    // Created first, then vouched for as node-1's agent would: its record (the ConfigMap
    // every agent trusts, `kt_node_agent::agent::trust`) lists every session with its
    // listener, and only then are the statuses written; a status no record lists redirects
    // nothing.
    let held: Vec<HeldSession> = stream::iter(0..SESSIONS)
        .map(|i| {
            let sessions = sessions.clone();
            async move {
                let name = format!("s{i}-bench");
                let session: KtSession = serde_json::from_value(json!({
                    "apiVersion": "kt.dev/v1alpha1", "kind": "KtSession",
                    "metadata": {"name": name},
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
                    namespace: "default".into(),
                    name,
                    uid: created.metadata.uid.expect("a uid"),
                    listeners: vec![Listener {
                        port: 80,
                        listener_port: listener_port(i),
                    }],
                }
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    write_agent_record(tb.client().await, "node-1", &held).await;
    stream::iter(0..SESSIONS)
        .for_each_concurrent(16, |i| {
            let sessions = sessions.clone();
            async move {
                let status = json!({"status": {
                    "node": "node-1", "address": node_ip(1).to_string(),
                    "listeners": [{"port": 80, "listenerPort": listener_port(i)}],
                    "renewTime": chrono::Utc::now(),
                }});
                sessions
                    .patch_status(
                        &format!("s{i}-bench"),
                        &PatchParams::default(),
                        &Patch::Merge(&status),
                    )
                    .await
                    .expect("status");
            }
        })
        .await;
    until_programmed(&tb, SESSIONS).await;
    let setup = started.elapsed();
    // Settling time before a memory reading, on purpose.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let loaded = agent_rss(&tb);

    println!(
        "agent RSS benchmark ({SERVICES} Services, {SESSIONS} live sessions; set up in {setup:.1?})"
    );
    println!("agent RSS baseline (installed, idle): {baseline:?} KiB");
    println!("agent RSS loaded: {loaded:?} KiB");
    let mut results = Results::new("agent_rss");
    let kib = |v: &[u64]| v.iter().map(|k| *k as f64).collect::<Vec<f64>>();
    let total = |v: &[u64]| [v.iter().sum::<u64>() as f64];
    // Per agent (one sample per node's agent: the max is the largest agent), and all agents.
    const IDLE: &str = "agents, idle: total";
    let loaded_total = format!("agents, {SERVICES} Services, {SESSIONS} sessions: total");
    for (name, values) in [
        ("agents, idle: per agent".to_owned(), kib(&baseline)),
        (IDLE.to_owned(), total(&baseline).to_vec()),
        (
            format!("agents, {SERVICES} Services, {SESSIONS} sessions: per agent"),
            kib(&loaded),
        ),
        (loaded_total.clone(), total(&loaded).to_vec()),
    ] {
        results.figure(&name, "KiB", &values).expect("readings");
    }
    results
        .figure("set-up time", "s", &[setup.as_secs_f64()])
        .expect("one reading");
    let ratio = results.ratio(&loaded_total, IDLE).expect("both recorded");
    println!("loaded / baseline: ×{ratio:.2}");
    results.write();
    tb.stop().await;
}
