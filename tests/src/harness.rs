//! Building blocks of the privileged tests, benchmarks and the demo: namespaces, cgroups,
//! servers and probes that clean up after themselves.

pub mod apps;
pub mod bins;
pub mod echo_bench;
pub mod eventually;
pub mod faults;
pub mod kubectl;
pub mod metrics;
pub mod own_programs;
pub mod probe;
pub mod resolved;
pub mod results;
pub mod server;
pub mod workstation;

use std::future::Future;

pub use kt_testbed::sys::{PREFIX, cgroup, netns, tempdir, unique_name};

/// Why this machine cannot run kt's eBPF programs, if it cannot: no cgroup2 hierarchy, or a
/// kernel without the features.
pub fn ebpf_unsupported_reason() -> Option<String> {
    if kt_node_agent::cgroup::cgroup2_mount().is_none() {
        return Some("no cgroup2 hierarchy is mounted".into());
    }
    kt_node_agent::ebpf::check_kernel()
        .err()
        .map(|e| e.to_string())
}

/// Panics unless this machine can run kt's eBPF programs: a privileged test fails, never
/// passes silently, on a kernel that lacks them.
pub fn require_ebpf() {
    require_root();
    if let Some(reason) = ebpf_unsupported_reason() {
        panic!("this kernel cannot run kt's eBPF programs: {reason}");
    }
}

/// Panics unless running as root: privileged tests must not silently pass without it.
pub fn require_root() {
    // SAFETY: getuid has no failure mode.
    let uid = unsafe { libc::getuid() };
    assert_eq!(
        uid, 0,
        "privileged tests need root: run them as README.md says"
    );
}

/// OpenSSH client options for a throwaway session: no host key checked or remembered, no
/// prompts.
pub const SSH_THROWAWAY: [&str; 6] = [
    "-o",
    "StrictHostKeyChecking=no",
    "-o",
    "UserKnownHostsFile=/dev/null",
    "-o",
    "BatchMode=yes",
];

/// Runs the async benchmark `name` on a multi-threaded runtime, or says that it is skipped:
/// benchmarks need root.
pub fn run_bench(name: &str, bench: impl Future<Output = ()>) {
    // SAFETY: getuid has no failure mode.
    if unsafe { libc::getuid() } != 0 {
        println!("skipping {name} benchmark: needs root");
        return;
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(bench);
}

/// How many rounds a benchmark measures: `KT_BENCH_ROUNDS`, else `default`.
pub fn bench_rounds(default: usize) -> usize {
    std::env::var("KT_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
