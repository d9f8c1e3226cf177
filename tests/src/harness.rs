//! Building blocks of the privileged tests, benchmarks and the demo: namespaces, cgroups,
//! servers and probes that clean up after themselves.

pub mod apps;
pub mod cgroup;
pub mod echo_bench;
pub mod kubectl;
pub mod netns;
pub mod probe;
pub mod server;
pub mod tempdir;
pub mod workstation;

use std::{
    future::Future,
    sync::atomic::{AtomicU32, Ordering},
};

/// Every namespace, cgroup or device the tests create starts with this, so leftovers are
/// easy to find (`ip netns | grep ktt-`).
pub const PREFIX: &str = "ktt-";

/// A name unique on this machine for the life of this process: `ktt-<kind>-<pid>-<n>`.
pub fn unique_name(kind: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{PREFIX}{kind}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Why privileged tests cannot run here, if they cannot: not root, no cgroup2, or a kernel
/// without the eBPF features. Tests print it and skip only for the kernel reasons.
pub fn ebpf_unsupported_reason() -> Option<String> {
    if kt_node_agent::cgroup::cgroup2_mount().is_none() {
        return Some("no cgroup2 hierarchy is mounted".into());
    }
    kt_node_agent::ebpf::check_kernel()
        .err()
        .map(|e| e.to_string())
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

/// How many rounds a benchmark measures: `KT_BENCH_RUNS`, else `default`.
pub fn bench_rounds(default: usize) -> usize {
    std::env::var("KT_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
