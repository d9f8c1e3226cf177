//! Operating-system pieces the testbed (and kt's privileged tests) build on: network
//! namespaces, cgroups and temporary directories, each removed when dropped, with names that
//! start with [`PREFIX`].

pub mod cgroup;
pub mod netns;
pub mod tempdir;

use std::sync::atomic::{AtomicU32, Ordering};

/// Every namespace, cgroup or device the testbed and the tests create starts with this, so
/// leftovers are easy to find (`ip netns | grep ktt-`).
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
