//! The agent's reconcile at scale, without a cluster (issue 17, item 1): the pure part of one
//! pass as the agent runs it — one EndpointSlice changed (applied to the agent's index, as
//! its watch does), then the trust verdicts of every session against the holder's record
//! (`kt_node_agent::agent::trust::Judge`, which keeps them from the last pass as the agent
//! does), the fingerprint, the mesh routes, the service map brought up to date
//! (`kt_node_agent::agent::ledger`, kept from the last pass) with the ports it programs,
//! and the node-port entries — over 10 000 Services (one TCP port each, ClusterIP plus one
//! EndpointSlice of 3 ready endpoints: 30 000 endpoints) with 0, 10, 100 and 1 000 live
//! sessions (nine in ten exchange, one in ten mesh, each on its own Service). Also timed,
//! once: building the index from the 10 000 Services and slices, what a watch's (re)list
//! costs, and per case the first pass, with nothing kept (an agent's start). Not timed:
//! writing the eBPF map.
//!
//! Also timed per case: the part of a pass after a write that changes nothing the map is
//! made of (a renewal or an acknowledgement) that grows with sessions here: the trust
//! verdicts and `redirects::fingerprint`, which the agent compares with its last pass's
//! before computing anything else (such a pass also builds its acknowledgements and
//! Events, not timed here); and the same after the holder's record was written again
//! listing one session more or one fewer (a hold or a release of a session this pass does
//! not see yet: every hold rewrites the holder's record of all its sessions).
//!
//! Medians over `KT_BENCH_ROUNDS` passes (default 20) per case; ratios to the 10-session
//! case show how a pass grows with sessions. Results: a table and
//! `target/kt-bench/reconcile.json`. Needs no root:
//! `cargo bench -p kt-tests --bench reconcile`.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    time::Instant,
};

use chrono::Utc;
use k8s_openapi::api::{
    core::v1::{ConfigMap, Node, Service},
    discovery::v1::EndpointSlice,
};
use kt_node_agent::agent::{
    index::{Change, Index, SliceView},
    ledger::Ledger,
    mesh, node_ports,
    redirects::{self, KeptHashes},
    trust::{self, HeldSession, Judge},
};
use kt_proto::session::KtSession;
use kt_tests::harness::{bench_rounds, results::Results};
use serde_json::json;

const SERVICES: u32 = 10_000;
const ENDPOINTS_PER_SERVICE: u32 = 3;
const SESSION_COUNTS: [u32; 4] = [0, 10, 100, 1_000];

/// The `i`-th address of the 10.x.0.0/16 range `second`.
fn ip(second: u8, i: u32) -> String {
    Ipv4Addr::new(10, second, (i >> 8) as u8, i as u8).to_string()
}

fn service(i: u32) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": format!("s{i}"), "namespace": "default"},
        "spec": {"clusterIP": ip(96, i), "clusterIPs": [ip(96, i)],
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
    }))
    .expect("Service")
}

fn slice(i: u32) -> EndpointSlice {
    let endpoints: Vec<serde_json::Value> = (0..ENDPOINTS_PER_SERVICE)
        .map(|e| {
            json!({"addresses": [ip(244, i * ENDPOINTS_PER_SERVICE + e)],
                   "conditions": {"ready": true}})
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": format!("s{i}-abcde"), "namespace": "default",
                     "labels": {"kubernetes.io/service-name": format!("s{i}")}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints
    }))
    .expect("EndpointSlice")
}

/// The address of node-1, whose agent holds every session.
const HOLDER_IP: &str = "172.30.0.11";

fn holder() -> Node {
    serde_json::from_value(json!({"metadata": {"name": "node-1"},
        "status": {"addresses": [{"type": "InternalIP", "address": HOLDER_IP}]}}))
    .expect("Node")
}

/// Node-1's agent record listing `sessions`, written at `version` (in reverse order: the
/// record is not sorted when written).
fn record(sessions: &[KtSession], version: u32) -> ConfigMap {
    let held: Vec<HeldSession> = sessions
        .iter()
        .rev()
        .map(|s| HeldSession {
            udp_listeners: Vec::new(),
            namespace: "default".into(),
            name: s.metadata.name.clone().expect("named"),
            uid: s.metadata.uid.clone().expect("a uid"),
            listeners: s.status.as_ref().expect("held").listeners.clone(),
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": trust::record_name("node-1"), "namespace": "kt-system",
                     "resourceVersion": version.to_string()},
        "data": {"node": "node-1",
                 "sessions": serde_json::to_string(&held).expect("serialisable")}
    }))
    .expect("ConfigMap")
}

/// Session `i` on Service `s<i>`: a mesh session every tenth, else an exchange; held by
/// node-1 with a fresh lease.
fn session(i: u32) -> KtSession {
    let mut spec = json!({"owner": format!("dev{i}"), "mode": "exchange",
                          "service": format!("s{i}"),
                          "ports": [{"port": 80, "localPort": 8080}], "publicKey": "k",
                          "leaseSeconds": 3600});
    if i % 10 == 9 {
        spec["mode"] = json!("mesh");
        spec["header"] = json!({"name": "Version", "value": format!("dev{i}")});
    }
    serde_json::from_value(json!({
        "apiVersion": "kt.dev/v1alpha1", "kind": "KtSession",
        "metadata": {"name": format!("x{i}"), "namespace": "default", "uid": format!("u{i}"),
                     "resourceVersion": "1", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": spec,
        "status": {"node": "node-1", "address": HOLDER_IP,
                   "listeners": [{"port": 80, "listenerPort": 40_000 + i}],
                   "renewTime": Utc::now()}
    }))
    .expect("KtSession")
}

/// What a pass reads besides the index: the sessions, the Nodes and the agent records.
struct Cluster<'a> {
    sessions: &'a [&'a KtSession],
    nodes: &'a [&'a Node],
    records: &'a [&'a ConfigMap],
}

/// The sessions whose status the holder's record vouches for, as the agent's pass finds
/// them (`trust::Judge`, its verdicts kept from the last pass as the agent keeps them).
fn believed<'a>(
    cluster: &Cluster<'a>,
    judge: &mut Judge,
    now: chrono::DateTime<Utc>,
) -> Vec<&'a KtSession> {
    let verdicts = judge.verdicts(cluster.sessions, cluster.nodes, cluster.records, now);
    cluster
        .sessions
        .iter()
        .zip(verdicts)
        .filter(|(_, verdict)| verdict.is_ok())
        .map(|(session, _)| *session)
        .collect()
}

/// What the agent keeps from pass to pass.
#[derive(Default)]
struct Kept {
    judge: Judge,
    hashes: KeptHashes,
    ledger: Ledger,
}

/// One pass after the slice `changed` changed, as the agent's (computed when the
/// fingerprint changed, as a slice of a session's Service changes it): how many map
/// entries it wants and how many sessions have a programmed port (kept so the work cannot
/// be optimised away, and checked).
fn pass(
    cluster: &Cluster,
    kept: &mut Kept,
    index: &mut Index,
    changed: &EndpointSlice,
) -> (usize, usize) {
    let now = Utc::now();
    let key = (
        "default".to_owned(),
        changed.metadata.name.clone().expect("named"),
    );
    index.apply_slice(Change::Applied(key, SliceView::from(changed)));
    let believed = believed(cluster, &mut kept.judge, now);
    let state = redirects::ClusterState::indexed_kept(&believed, index, &mut kept.hashes);
    std::hint::black_box(redirects::fingerprint(&state, now));
    let routes = mesh::routes(&state, now);
    // A router per route, as this node's router would give.
    let routers: BTreeMap<_, _> = routes
        .keys()
        .enumerate()
        .map(|(n, key)| {
            (
                key.clone(),
                SocketAddr::from(([127, 0, 0, 1], 30000 + n as u16)),
            )
        })
        .collect();
    std::hint::black_box(kept.ledger.update(&state, now, &routes, &routers));
    std::hint::black_box(node_ports::desired(&state, now, &routes, &routers));
    let programmed = kept
        .ledger
        .programmed()
        .values()
        .filter(|ports| !ports.is_empty())
        .count();
    (kept.ledger.map().len(), programmed)
}

/// A pass after a write that changes nothing the map is made of (a renewal, an
/// acknowledgement: most writes while sessions are held): the trust verdicts and the
/// fingerprint, which the agent compares with its last pass's before computing anything
/// else. Returns the fingerprint.
fn unchanged_pass(cluster: &Cluster, kept: &mut Kept, index: &Index) -> u64 {
    let now = Utc::now();
    let believed = believed(cluster, &mut kept.judge, now);
    let state = redirects::ClusterState::indexed_kept(&believed, index, &mut kept.hashes);
    redirects::fingerprint(&state, now)
}

fn main() {
    let rounds = bench_rounds(20);
    let services: Vec<Service> = (0..SERVICES).map(service).collect();
    let slices: Vec<EndpointSlice> = (0..SERVICES).map(slice).collect();
    let (services, slices): (Vec<&Service>, Vec<&EndpointSlice>) =
        (services.iter().collect(), slices.iter().collect());
    let mut results = Results::new("reconcile");
    let mut builds = Vec::new();
    let mut index = Index::default();
    for _ in 0..rounds.min(5) {
        let started = Instant::now();
        index = Index::of(&services, &slices);
        builds.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    assert_eq!(index.services(), SERVICES as usize);
    let build = results
        .figure("index built from every Service and slice", "ms", &builds)
        .expect("builds");
    println!("index from {SERVICES} Services and their slices (a watch's list): {build:.1} ms");
    println!(
        "agent reconcile, pure part: {SERVICES} Services, {} endpoints; medians of {rounds} passes",
        SERVICES * ENDPOINTS_PER_SERVICE
    );
    println!(
        "{:<12} {:>10} {:>10} {:>10} {:>12} {:>14} {:>14} {:>10}",
        "sessions",
        "p50 ms",
        "min ms",
        "max ms",
        "map entries",
        "unchanged ms",
        "record ms",
        "first ms"
    );
    let name = |n: u32| format!("reconcile, {n} sessions");
    let unchanged = |n: u32| {
        format!(
            "reconcile, {n} sessions, nothing the map reads changed: trust check and fingerprint"
        )
    };
    let first = |n: u32| format!("reconcile, {n} sessions, first pass (nothing kept)");
    let record_rewritten = |n: u32| {
        format!(
            "reconcile, {n} sessions, the holder's record written again: trust check and fingerprint"
        )
    };
    for count in SESSION_COUNTS {
        let all: Vec<KtSession> = (0..count).map(session).collect();
        let sessions: Vec<&KtSession> = all.iter().collect();
        let (node, holders_record) = (holder(), record(&all, count));
        let cluster = Cluster {
            sessions: &sessions,
            nodes: &[&node],
            records: &[&holders_record],
        };
        // The first pass, from nothing: what an agent's start costs.
        let mut kept = Kept::default();
        let started = Instant::now();
        let (wanted, _) = pass(&cluster, &mut kept, &mut index, slices[0]);
        results
            .figure(
                &first(count),
                "ms",
                &[started.elapsed().as_secs_f64() * 1000.0],
            )
            .expect("a pass");
        assert_eq!(
            wanted,
            count as usize * (1 + ENDPOINTS_PER_SERVICE as usize)
        );
        let mut times = Vec::new();
        let mut entries = 0;
        for round in 0..rounds {
            // A slice of some session's Service (or of a Service nobody exchanged, with no
            // session) changes, as the same slice again: the map stays the same.
            let changed = slices[(round * 7919) % slices.len()];
            let started = Instant::now();
            let (wanted, programmed) = pass(&cluster, &mut kept, &mut index, changed);
            times.push(started.elapsed().as_secs_f64() * 1000.0);
            // ClusterIP + 3 endpoints per session, every one of them believed and programmed.
            assert_eq!(
                wanted,
                count as usize * (1 + ENDPOINTS_PER_SERVICE as usize)
            );
            assert_eq!(programmed, count as usize);
            entries = wanted;
        }
        results.figure(&name(count), "ms", &times).expect("passes");
        let mut quiet = Vec::new();
        let first_print = unchanged_pass(&cluster, &mut kept, &index);
        for _ in 0..rounds {
            let started = Instant::now();
            let fingerprint = unchanged_pass(&cluster, &mut kept, &index);
            quiet.push(started.elapsed().as_secs_f64() * 1000.0);
            assert_eq!(
                fingerprint, first_print,
                "the same inputs, the same fingerprint"
            );
        }
        let quiet = results
            .figure(&unchanged(count), "ms", &quiet)
            .expect("passes");
        let (without, with) = (
            record(&all, 0),
            record(&[all.as_slice(), &[session(count)]].concat(), 0),
        );
        let mut rewritten = Vec::new();
        for round in 0..rounds {
            let mut written = if round % 2 == 0 { &with } else { &without }.clone();
            written.metadata.resource_version = Some((count + 1 + round as u32).to_string());
            let cluster = Cluster {
                records: &[&written],
                ..cluster
            };
            let started = Instant::now();
            let fingerprint = unchanged_pass(&cluster, &mut kept, &index);
            rewritten.push(started.elapsed().as_secs_f64() * 1000.0);
            assert_eq!(fingerprint, first_print, "the map reads the same");
        }
        let rewritten = results
            .figure(&record_rewritten(count), "ms", &rewritten)
            .expect("passes");
        let figure = results.get(&name(count)).expect("recorded");
        let cold = results.get(&first(count)).expect("recorded").median;
        println!(
            "{count:<12} {:>10.3} {:>10.3} {:>10.3} {entries:>12} {quiet:>14.3} {rewritten:>14.3} {cold:>10.3}",
            figure.median, figure.min, figure.max
        );
    }
    for count in [100, 1_000] {
        let ratio = results.ratio(&name(count), &name(10)).expect("recorded");
        println!("{} / {}: ×{ratio:.1}", name(count), name(10));
    }
    for count in [100, 1_000] {
        let ratio = results
            .ratio(&unchanged(count), &name(count))
            .expect("recorded");
        println!("{} / {}: ×{ratio:.2}", unchanged(count), name(count));
    }
    results.write();
}
