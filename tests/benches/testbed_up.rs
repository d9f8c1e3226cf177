//! How long `kt-testbed up` takes until the cluster is usable (API answering, nodes
//! registered, cluster DNS ready), against the goal of 5 s and against a baseline measured
//! in the same run: creating and deleting the same number of bare network namespaces.
//!
//! Run as root: `cargo bench -p kt-tests --bench testbed_up` (README: tests/run bench).
//! `KT_BENCH_ROUNDS` (default 5) sets the repetitions.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use kt_tests::harness::{bins, netns::NetNs, unique_name};

const GOAL: Duration = Duration::from_secs(5);

fn main() {
    // SAFETY: getuid has no failure mode.
    if unsafe { libc::getuid() } != 0 {
        println!("skipping testbed_up benchmark: needs root");
        return;
    }
    let runs = kt_tests::harness::bench_rounds(5);
    let mut up = Vec::new();
    let mut down = Vec::new();
    let mut bare = Vec::new();
    for _ in 0..runs {
        let dir = std::env::temp_dir().join(unique_name("bench-up"));
        let start = Instant::now();
        let out = Command::new(bins::kt_testbed())
            .args(["up", "--dir", dir.to_str().unwrap()])
            .output()
            .expect("kt-testbed runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        up.push(start.elapsed());
        let start = Instant::now();
        let out = Command::new(bins::kt_testbed())
            .args(["down", "--dir", dir.to_str().unwrap()])
            .output()
            .expect("kt-testbed runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        down.push(start.elapsed());

        // Baseline: the 5 namespaces a 2-node testbed has before any pod (cp, 2 nodes,
        // workstation, DNS pod), created and removed.
        let start = Instant::now();
        let spaces: Vec<NetNs> = (0..5)
            .map(|_| NetNs::new(unique_name("bench-ns")).expect("netns"))
            .collect();
        drop(spaces);
        bare.push(start.elapsed());
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (up, down, bare) = (median(&mut up), median(&mut down), median(&mut bare));
    println!("kt-testbed up → usable, 2 nodes, median of {runs} runs");
    println!("{:<36} {:>10}", "measure", "ms");
    println!(
        "{:<36} {:>10.0}",
        "up (API, nodes, DNS ready)",
        up.as_secs_f64() * 1000.0
    );
    println!(
        "{:<36} {:>10.0}",
        "down (everything removed)",
        down.as_secs_f64() * 1000.0
    );
    println!(
        "{:<36} {:>10.0}",
        "baseline: 5 bare netns add+del",
        bare.as_secs_f64() * 1000.0
    );
    println!(
        "up / goal (5 s): {:.3}",
        up.as_secs_f64() / GOAL.as_secs_f64()
    );
    println!(
        "up / baseline:   {:.1}",
        up.as_secs_f64() / bare.as_secs_f64()
    );
}
