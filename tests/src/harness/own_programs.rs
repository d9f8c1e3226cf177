//! kt's eBPF programs that one test loaded, so that the test's teardown can check that they
//! were unloaded while other tests of the same process (and other processes) load their own.

use std::{collections::HashSet, path::Path, sync::Mutex};

use kt_node_agent::ebpf::{Redirector, loaded_kt_programs};

use super::eventually::{eventually_blocking, seen};

/// Held while this process opens program descriptors: loading, attaching, listing.
static FD_CHANGES: Mutex<()> = Mutex::new(());

/// Loads kt's redirect programs and attaches them to `cgroup` (a test's own, never a host's
/// root). The program ids are those this process gained a file descriptor for while doing
/// so: loads and attaches are serialised within the process to keep that set exact.
pub fn redirector_attached_to(cgroup: &Path) -> (Redirector, OwnPrograms) {
    let _one_at_a_time = FD_CHANGES.lock().unwrap_or_else(|e| e.into_inner());
    let before = program_ids_held();
    let mut redirector = Redirector::load().expect("kt's programs load");
    redirector.attach(cgroup).expect("kt's programs attach");
    let ids = program_ids_held().difference(&before).copied().collect();
    (redirector, OwnPrograms(ids))
}

/// The ids of programs a test loaded.
#[derive(Debug)]
pub struct OwnPrograms(HashSet<u32>);

impl OwnPrograms {
    /// Whether any were found (the load gave this process program descriptors).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Waits until none of them is loaded any more (the kernel frees a program shortly
    /// after its last descriptor and link close); panics with those left.
    pub fn assert_unloaded(&self) {
        eventually_blocking("the test's eBPF programs are unloaded", || {
            // Listing opens a descriptor on every program for a moment.
            let listed = {
                let _one_at_a_time = FD_CHANGES.lock().unwrap_or_else(|e| e.into_inner());
                loaded_kt_programs().expect("list loaded programs")
            };
            let loaded: HashSet<u32> = listed.into_iter().collect();
            let left: Vec<u32> = self.0.intersection(&loaded).copied().collect();
            seen(left, Vec::is_empty)
        });
    }
}

/// Checks, when dropped after the redirector (declare it last), that the programs are gone;
/// not while the test is already failing.
#[derive(Debug)]
pub struct UnloadedOnDrop(pub OwnPrograms);

impl Drop for UnloadedOnDrop {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.0.assert_unloaded();
        }
    }
}

/// The ids of the BPF programs this process holds a descriptor for (a program's or a link's
/// `prog_id` in `/proc/self/fdinfo`).
fn program_ids_held() -> HashSet<u32> {
    let Ok(fds) = std::fs::read_dir("/proc/self/fdinfo") else {
        return HashSet::new();
    };
    fds.filter_map(Result::ok)
        .filter_map(|fd| std::fs::read_to_string(fd.path()).ok())
        .flat_map(|info| {
            info.lines()
                .filter_map(|line| line.strip_prefix("prog_id:"))
                .filter_map(|id| id.trim().parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}
