//! Building blocks of the privileged tests, benchmarks and the demo: namespaces, cgroups,
//! servers and probes that clean up after themselves.

pub mod apps;
pub mod cgroup;
pub mod kubectl;
pub mod netns;
pub mod probe;
pub mod server;
pub mod tempdir;
pub mod workstation;

use std::sync::atomic::{AtomicU32, Ordering};

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
