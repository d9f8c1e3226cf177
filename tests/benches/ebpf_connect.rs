//! connect() latency through kt's eBPF redirect, as ratios against no program, in one run.
//!
//! Four sibling cgroups in one network namespace: `plain` (nothing attached), `small`
//! (programs attached, 10 redirects), `large` (programs attached, 10 000 exchange
//! redirects) and `mixed` (programs attached, 10 000 redirects as the agent writes them
//! for a cluster with exchanges and meshes together: each exchanged Service's ClusterIP
//! port to a listener, each meshed Service's ClusterIP port and its pods' addresses to the
//! node's router, as `Mode::Mesh`; a preview adds no redirect, it publishes a Service —
//! issue 17, item 6: connect()'s cost stays flat with every kind of entry).
//! This process moves itself between them between rounds, so the cases interleave and
//! share the machine's state. Only the connect() call is timed (socket creation is not);
//! sockets close with SO_LINGER 0 so that TIME_WAIT cannot exhaust ports. Percentiles, not
//! means: a rare scheduler stall of the 2-core machine would dominate a mean. Each round
//! gives a case's p50/p90/p99; the table shows their medians over the rounds, and
//! `target/kt-bench/ebpf_connect.json` has them with min and max.
//!
//! Run as root: `cargo bench -p kt-tests --bench ebpf_connect` (README: tests/run bench).
//! `KT_BENCH_ROUNDS` (default 40) and `KT_BENCH_CONNECTS` (per round and case, default
//! 500) size it.

use std::{
    net::{SocketAddr, TcpListener},
    thread,
    time::{Duration, Instant},
};

use kt_ebpf_common::{Mode, Redirect};
use kt_node_agent::{cgroup, ebpf::Redirector};
use kt_tests::harness::{
    self,
    cgroup::TestCgroup,
    netns::NetNs,
    results::{Results, percentile},
    unique_name,
};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

struct Case {
    name: &'static str,
    cgroup: usize,
    dst: SocketAddr,
    samples_ns: Vec<u64>,
}

fn main() {
    if let Some(reason) = harness::ebpf_unsupported_reason() {
        println!("skipping ebpf_connect benchmark: {reason}");
        return;
    }
    harness::require_root();
    let rounds = harness::bench_rounds(40);
    let per_round = env_usize("KT_BENCH_CONNECTS", 500);

    let netns = NetNs::new(unique_name("bench")).expect("netns");
    netns.enter_current_thread().expect("enter netns");
    // A deep backlog: with the default 128 the acceptor falls behind, SYNs are dropped and
    // the client waits a second for the retransmit, which measures nothing of interest.
    let listener = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("socket");
    listener
        .bind(&SockAddr::from(SocketAddr::from(([127, 0, 0, 1], 0))))
        .expect("bind");
    listener.listen(4096).expect("listen");
    let listener = TcpListener::from(listener);
    let target = listener.local_addr().unwrap();
    // Accept and drop; runs until the process exits.
    thread::spawn(move || {
        for conn in listener.incoming() {
            drop(conn);
        }
    });

    let cgroups: Vec<TestCgroup> = ["plain", "small", "large", "mixed"]
        .iter()
        .map(|kind| TestCgroup::new(&unique_name(kind)).expect("cgroup"))
        .collect();
    let service = |i: u32| SocketAddr::from(([10, 100, (i >> 8) as u8, i as u8], 80));
    // The mixed map: 2 000 exchanged Services (one entry each) and 2 000 meshed Services of
    // three pods each (four entries each: the ClusterIP and the pods' 8080s).
    let mesh_pod = |i: u32, pod: u32| {
        SocketAddr::from((
            [10, 244, (i >> 4) as u8, ((i & 0xf) << 4 | pod) as u8],
            8080,
        ))
    };
    let mixed: Vec<(SocketAddr, Mode)> = (0..2_000u32)
        .map(|i| (service(i), Mode::Exchange))
        .chain((2_000..4_000u32).flat_map(|i| {
            [(service(i), Mode::Mesh)]
                .into_iter()
                .chain((1..=3).map(move |pod| (mesh_pod(i, pod), Mode::Mesh)))
        }))
        .collect();
    assert_eq!(mixed.len(), 10_000);
    let exchange_only = |entries: u32| -> Vec<(SocketAddr, Mode)> {
        (0..entries).map(|i| (service(i), Mode::Exchange)).collect()
    };
    let redirectors: Vec<Redirector> = [
        (1usize, exchange_only(10)),
        (2, exchange_only(10_000)),
        (3, mixed),
    ]
    .into_iter()
    .map(|(cg, entries)| {
        let mut r = Redirector::load().expect("load");
        r.attach(cgroups[cg].path()).expect("attach");
        for (i, (address, mode)) in (0u32..).zip(entries) {
            r.insert(address, Redirect::to(target, i, mode))
                .expect("insert");
        }
        r
    })
    .collect();

    let mut cases = vec![
        Case {
            name: "no program (baseline)",
            cgroup: 0,
            dst: target,
            samples_ns: vec![],
        },
        Case {
            name: "redirected, 10 entries",
            cgroup: 1,
            dst: service(7),
            samples_ns: vec![],
        },
        Case {
            name: "redirected, 10 000 entries",
            cgroup: 2,
            dst: service(7_777),
            samples_ns: vec![],
        },
        Case {
            name: "not matching, 10 000 entries",
            cgroup: 2,
            dst: target,
            samples_ns: vec![],
        },
        Case {
            name: "exchange entry, 10 000 mixed",
            cgroup: 3,
            dst: service(1_777),
            samples_ns: vec![],
        },
        Case {
            name: "mesh pod entry, 10 000 mixed",
            cgroup: 3,
            dst: mesh_pod(3_777, 2),
            samples_ns: vec![],
        },
    ];
    let home = cgroup::cgroup_of_pid(&cgroup::cgroup2_mount().unwrap(), std::process::id())
        .expect("own cgroup");
    let pid = std::process::id();
    let case_count = cases.len();
    for round in 0..rounds {
        // Rotate the order so that every case runs in every position equally often.
        for i in 0..case_count {
            let case = &mut cases[(round + i) % case_count];
            cgroups[case.cgroup].add_pid(pid).expect("join cgroup");
            for _ in 0..per_round {
                case.samples_ns.push(time_connect(case.dst));
            }
        }
    }
    std::fs::write(home.join("cgroup.procs"), pid.to_string()).expect("leave cgroups");

    report(&cases, per_round);
    // Each redirected case's entry counted its connects (svc_id is the entry's index).
    for (redirector, ids) in redirectors.iter().zip([
        &[7u32][..],
        &[7_777][..],
        // service(1_777) is entry 1 777; mesh_pod(3_777, 2) is entry 2 000 + 4 × 1 777 + 2.
        &[1_777, 9_110][..],
    ]) {
        for id in ids {
            let redirected = redirector.service_stats(*id).unwrap().connects_redirected;
            assert!(redirected > 0, "entry {id} was not redirected");
        }
    }
    drop(redirectors);
    drop(cgroups);
}

/// Nanoseconds spent in connect() to `dst` (loopback three-way handshake included).
fn time_connect(dst: SocketAddr) -> u64 {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("socket");
    let dst = SockAddr::from(dst);
    let start = Instant::now();
    socket.connect(&dst).expect("connect");
    let elapsed = start.elapsed();
    socket.set_linger(Some(Duration::ZERO)).expect("linger");
    elapsed.as_nanos() as u64
}

/// Prints and writes every case's per-round percentiles (`per_round` connects a round), as
/// medians over the rounds and ratios to the first case.
fn report(cases: &[Case], per_round: usize) {
    const PERCENTILES: [(&str, f64); 3] = [("p50", 0.50), ("p90", 0.90), ("p99", 0.99)];
    let rounds = cases[0].samples_ns.len() / per_round;
    println!(
        "connect() latency, {per_round} connects per round and case, medians of {rounds} rounds' percentiles, loopback in a test netns"
    );
    println!(
        "{:<30} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8}",
        "case", "p50 ns", "p90 ns", "p99 ns", "p50 x", "p90 x", "p99 x"
    );
    let mut results = Results::new("ebpf_connect");
    let base = cases[0].name;
    for case in cases {
        let medians = PERCENTILES.map(|(label, p)| {
            let per_round: Vec<f64> = case
                .samples_ns
                .chunks(per_round)
                .map(|round| {
                    let ns: Vec<f64> = round.iter().map(|n| *n as f64).collect();
                    percentile(&ns, p).expect("connects")
                })
                .collect();
            results
                .figure(&format!("{}: {label}", case.name), "ns", &per_round)
                .expect("rounds")
        });
        let ratios = PERCENTILES.map(|(label, _)| {
            results
                .ratio(
                    &format!("{}: {label}", case.name),
                    &format!("{base}: {label}"),
                )
                .expect("both recorded")
        });
        println!(
            "{:<30} {:>9.0} {:>9.0} {:>9.0} {:>8.3} {:>8.3} {:>8.3}",
            case.name, medians[0], medians[1], medians[2], ratios[0], ratios[1], ratios[2]
        );
    }
    results.write();
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
