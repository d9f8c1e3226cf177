//! How long `kt-testbed up` takes until the cluster is usable (API answering, nodes
//! registered, cluster DNS ready), against the goal of 5 s and against a baseline measured
//! in the same run: creating and deleting the same number of bare network namespaces.
//!
//! Run as root: `cargo bench -p kt-tests --bench testbed_up` (README: tests/run bench).
//! `KT_BENCH_ROUNDS` (default 5) sets the repetitions. Results: a table, ratios, and
//! `target/kt-bench/testbed_up.json`.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use kt_tests::harness::{bins, netns::NetNs, results::Results, unique_name};

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
    let mut results = Results::new("testbed_up");
    let mut figure = |name: &str, times: &[Duration]| {
        let ms: Vec<f64> = times.iter().map(|t| t.as_secs_f64() * 1000.0).collect();
        results.figure(name, "ms", &ms).expect("runs")
    };
    const UP: &str = "up (API, nodes, DNS ready)";
    const BARE: &str = "baseline: 5 bare netns add+del";
    let (up, down, bare) = (
        figure(UP, &up),
        figure("down (everything removed)", &down),
        figure(BARE, &bare),
    );
    println!("kt-testbed up → usable, 2 nodes, median of {runs} runs");
    println!("{:<36} {:>10}", "measure", "ms");
    println!("{:<36} {:>10.0}", UP, up);
    println!("{:<36} {:>10.0}", "down (everything removed)", down);
    println!("{:<36} {:>10.0}", BARE, bare);
    let to_goal = results
        .goal(UP, GOAL.as_secs_f64() * 1000.0)
        .expect("up recorded");
    println!("up / goal (5 s): {to_goal:.3}");
    let to_bare = results.ratio(UP, BARE).expect("both recorded");
    println!("up / baseline:   {to_bare:.1}");
    results.write();
}
