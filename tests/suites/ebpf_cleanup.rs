//! After a full redirect lifecycle nothing is left behind: no namespace, cgroup, mount or
//! loaded eBPF program. A test binary of its own, so that no other test's programs are
//! loaded while it checks (cargo runs test binaries one after another).

use std::{net::SocketAddr, path::PathBuf, thread, time::Duration};

use kt_ebpf_common::{Mode, Redirect};
use kt_node_agent::ebpf::{Redirector, loaded_kt_programs};
use kt_tests::harness::{
    self, PREFIX, cgroup::TestCgroup, netns, netns::NetNs, probe, server::TagServer, unique_name,
};

#[test]
fn a_redirect_lifecycle_leaves_nothing_behind() {
    if let Some(reason) = harness::ebpf_unsupported_reason() {
        eprintln!("skipping: {reason}");
        return;
    }
    harness::require_root();
    let service: SocketAddr = "10.96.0.10:80".parse().unwrap();
    let (ns_name, cgroup_path): (String, PathBuf);
    {
        let ns = NetNs::new(unique_name("ns")).unwrap();
        ns.add_local_addrs(&["10.96.0.10/32"]).unwrap();
        let target = TagServer::start(&ns, "127.0.0.1:0".parse().unwrap(), "target").unwrap();
        let cgroup = TestCgroup::new(&unique_name("cg")).unwrap();
        let mut redirector = Redirector::load().unwrap();
        redirector.attach(cgroup.path()).unwrap();
        redirector
            .insert(service, Redirect::to(target.addr(), 1, Mode::Exchange))
            .unwrap();
        assert_eq!(
            probe::connect(&ns, Some(cgroup.path()), service)
                .unwrap()
                .server,
            "target"
        );
        assert!(
            !loaded_kt_programs().unwrap().is_empty(),
            "programs are loaded while in use"
        );
        (ns_name, cgroup_path) = (ns.name().to_owned(), cgroup.path().to_owned());
        drop((redirector, target, cgroup, ns));
    }

    assert!(!netns::exists(&ns_name), "netns {ns_name} left behind");
    assert!(
        !cgroup_path.exists(),
        "cgroup {} left behind",
        cgroup_path.display()
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&ns_name), "a mount of {ns_name} is left");

    // The kernel frees programs shortly after their last fd closes.
    let mut left = loaded_kt_programs().unwrap();
    for _ in 0..100 {
        if left.is_empty() {
            break;
        }
        thread::sleep(Duration::from_millis(20));
        left = loaded_kt_programs().unwrap();
    }
    assert!(left.is_empty(), "eBPF programs still loaded: {left:?}");

    let leftovers = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    let leftovers = String::from_utf8_lossy(&leftovers.stdout);
    let ours = format!("{PREFIX}ns-{}-", std::process::id());
    assert!(!leftovers.contains(&ours), "namespaces left: {leftovers}");
}
