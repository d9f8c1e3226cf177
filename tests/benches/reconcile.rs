//! The agent's reconcile at scale, without a cluster (issue 17, item 1): the pure part of one
//! pass as the agent runs it — one EndpointSlice changed (applied to the agent's index, as
//! its watch does), then the mesh routes, the desired service map and which session ports
//! it programs — over 10 000 Services (one TCP port each, ClusterIP plus one EndpointSlice
//! of 3 ready endpoints: 30 000 endpoints) with 0, 10, 100 and 1 000 live sessions (nine in
//! ten exchange, one in ten mesh, each on its own Service). Also timed, once: building the
//! index from the 10 000 Services and slices, what a watch's (re)list costs. Not timed:
//! the trust check, writing the eBPF map.
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
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kt_node_agent::agent::{
    index::{Change, Index, SliceView},
    mesh, redirects,
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
        "metadata": {"name": format!("x{i}"), "namespace": "default",
                     "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": spec,
        "status": {"node": "node-1", "address": "172.30.0.11",
                   "listeners": [{"port": 80, "listenerPort": 40000 + i}],
                   "renewTime": Utc::now()}
    }))
    .expect("KtSession")
}

/// One pass after the slice `changed` changed; how many map entries it wants and how many
/// sessions have a programmed port (kept so the work cannot be optimised away, and checked).
fn pass(sessions: &[&KtSession], index: &mut Index, changed: &EndpointSlice) -> (usize, usize) {
    let now = Utc::now();
    let key = (
        "default".to_owned(),
        changed.metadata.name.clone().expect("named"),
    );
    index.apply_slice(Change::Applied(key, SliceView::from(changed)));
    let state = redirects::ClusterState::indexed(sessions, index);
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
    let desired = redirects::desired(&state, now, &routes, &routers);
    let programmed = desired
        .programmed_ports()
        .values()
        .filter(|ports| !ports.is_empty())
        .count();
    (desired.map.len(), programmed)
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
        "{:<12} {:>10} {:>10} {:>10} {:>12}",
        "sessions", "p50 ms", "min ms", "max ms", "map entries"
    );
    let name = |n: u32| format!("reconcile, {n} sessions");
    for count in SESSION_COUNTS {
        let all: Vec<KtSession> = (0..count).map(session).collect();
        let sessions: Vec<&KtSession> = all.iter().collect();
        let mut times = Vec::new();
        let mut entries = 0;
        for round in 0..rounds {
            // A slice of some session's Service (or of a Service nobody exchanged, with no
            // session) changes, as the same slice again: the map stays the same.
            let changed = slices[(round * 7919) % slices.len()];
            let started = Instant::now();
            let (wanted, programmed) = pass(&sessions, &mut index, changed);
            times.push(started.elapsed().as_secs_f64() * 1000.0);
            // ClusterIP + 3 endpoints per session, every one of them programmed.
            assert_eq!(
                wanted,
                count as usize * (1 + ENDPOINTS_PER_SERVICE as usize)
            );
            assert_eq!(programmed, count as usize);
            entries = wanted;
        }
        results.figure(&name(count), "ms", &times).expect("passes");
        let figure = results.get(&name(count)).expect("recorded");
        println!(
            "{count:<12} {:>10.3} {:>10.3} {:>10.3} {entries:>12}",
            figure.median, figure.min, figure.max
        );
    }
    for count in [100, 1_000] {
        let ratio = results.ratio(&name(count), &name(10)).expect("recorded");
        println!("{} / {}: ×{ratio:.1}", name(count), name(10));
    }
    results.write();
}
