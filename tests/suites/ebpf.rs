//! Privileged tests of the eBPF redirect (root). Each test gets its own network namespace
//! with a fake ClusterIP on a dummy interface, a server on it ("original"), a redirect
//! target ("target"), and a child cgroup that the programs are attached to. Clients are
//! `kt-probe` processes, so each one's cgroup is its own. Each test's teardown checks that
//! the programs it loaded are unloaded (other tests of this binary load their own meanwhile).

use std::{net::SocketAddr, path::PathBuf};

use kt_ebpf_common::{Counter, Mode, Redirect};
use kt_node_agent::ebpf::{Redirector, ServiceKey};
use kt_tests::harness::{
    self,
    cgroup::TestCgroup,
    netns,
    netns::NetNs,
    own_programs::{UnloadedOnDrop, redirector_attached_to},
    probe,
    server::TagServer,
    unique_name,
};

const SERVICE: &str = "10.96.0.10:80";
const SVC_ID: u32 = 1;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Fields drop in order: detach first, then servers, then the cgroup and the namespace, and
/// last the check that the programs are unloaded.
struct Fixture {
    redirector: Redirector,
    target: TagServer,
    _original: TagServer,
    cgroup: TestCgroup,
    netns: NetNs,
    _unloaded: UnloadedOnDrop,
}

impl Fixture {
    /// Panics when the kernel cannot run the programs: a privileged test never passes
    /// without them.
    fn new() -> Self {
        harness::require_ebpf();
        let netns = NetNs::new(unique_name("ns")).unwrap();
        netns.add_local_addrs(&["10.96.0.10/32"]).unwrap();
        let original = TagServer::start(&netns, addr(SERVICE), "original").unwrap();
        let target = TagServer::start(&netns, addr("127.0.0.1:0"), "target").unwrap();
        let cgroup = TestCgroup::new(&unique_name("cg")).unwrap();
        let (mut redirector, programs) = redirector_attached_to(cgroup.path());
        redirector
            .insert(
                addr(SERVICE),
                Redirect::to(target.addr(), SVC_ID, Mode::Exchange),
            )
            .unwrap();
        Self {
            redirector,
            target,
            _original: original,
            cgroup,
            netns,
            _unloaded: UnloadedOnDrop(programs),
        }
    }

    fn counter(&self, counter: Counter) -> u64 {
        self.redirector.counters().unwrap().get(counter)
    }

    fn probe_in_cgroup(&self, to: &str) -> probe::Seen {
        probe::connect(&self.netns, Some(self.cgroup.path()), addr(to)).unwrap()
    }
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "needs root, cgroup2 and eBPF: tests/run test"
)]
fn connect_in_cgroup_reaches_target_and_peer_name_is_the_cluster_ip() {
    let f = Fixture::new();
    let seen = f.probe_in_cgroup(SERVICE);
    assert_eq!(seen.server, "target", "{seen:?}");
    assert_eq!(
        seen.peer,
        addr(SERVICE),
        "getpeername must report the ClusterIP:port"
    );

    assert_eq!(f.counter(Counter::ConnectRedirected), 1);
    assert!(f.counter(Counter::PeernameRestored) >= 1);
    let stats = f.redirector.service_stats(SVC_ID).unwrap();
    assert_eq!(stats.connects_redirected, 1);
    assert_eq!(stats.errors, 0);
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "needs root, cgroup2 and eBPF: tests/run test"
)]
fn process_outside_the_cgroup_is_not_redirected() {
    let f = Fixture::new();
    let seen = probe::connect(&f.netns, None, addr(SERVICE)).unwrap();
    assert_eq!(seen.server, "original", "{seen:?}");
    assert_eq!(f.counter(Counter::ConnectSeen), 0);
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "needs root, cgroup2 and eBPF: tests/run test"
)]
fn cgroup_in_the_skip_map_is_not_redirected() {
    let mut f = Fixture::new();
    // Both are below the attach point, so both run the programs; only one is skipped.
    let agent = f.cgroup.child("agent").unwrap();
    let app = f.cgroup.child("app").unwrap();
    f.redirector.skip_cgroup(agent.path()).unwrap();

    let from_agent = probe::connect(&f.netns, Some(agent.path()), addr(SERVICE)).unwrap();
    assert_eq!(from_agent.server, "original", "{from_agent:?}");
    let from_app = probe::connect(&f.netns, Some(app.path()), addr(SERVICE)).unwrap();
    assert_eq!(from_app.server, "target", "{from_app:?}");

    assert_eq!(f.redirector.service_stats(SVC_ID).unwrap().skipped_self, 1);
    assert_eq!(f.counter(Counter::ConnectSkipped), 1);
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "needs root, cgroup2 and eBPF: tests/run test"
)]
fn removing_the_entry_restores_the_original_destination() {
    let mut f = Fixture::new();
    assert_eq!(f.probe_in_cgroup(SERVICE).server, "target");
    assert!(f.redirector.remove(addr(SERVICE)).unwrap());
    assert!(
        !f.redirector.remove(addr(SERVICE)).unwrap(),
        "second removal finds nothing"
    );
    assert_eq!(f.redirector.get(addr(SERVICE)).unwrap(), None);
    let seen = f.probe_in_cgroup(SERVICE);
    assert_eq!(seen.server, "original", "{seen:?}");
    assert_eq!(seen.peer, addr(SERVICE));
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "needs root, cgroup2 and eBPF: tests/run test"
)]
fn a_udp_entry_redirects_unconnected_and_connected_sockets_and_replies_show_the_service() {
    let mut f = Fixture::new();
    let _original = TagServer::start_udp(&f.netns, addr(SERVICE), "udp-original").unwrap();
    let target = TagServer::start_udp(&f.netns, addr("127.0.0.1:0"), "udp-target").unwrap();
    let udp =
        |connected| probe::udp(&f.netns, Some(f.cgroup.path()), addr(SERVICE), connected).unwrap();
    // The fixture's TCP entry of the same address leaves UDP alone.
    for connected in [false, true] {
        assert_eq!(udp(connected).server, "udp-original", "{connected}");
    }
    assert_eq!(f.counter(Counter::UdpSendRedirected), 0);

    let udp_id = SVC_ID + 1;
    f.redirector
        .insert(
            ServiceKey::udp(addr(SERVICE)),
            Redirect::to(target.addr(), udp_id, Mode::Exchange),
        )
        .unwrap();
    // sendto goes to the target (sendmsg4) and recvfrom names the Service (recvmsg4).
    let unconnected = udp(false);
    assert_eq!(unconnected.server, "udp-target", "{unconnected:?}");
    assert_eq!(
        unconnected.peer,
        addr(SERVICE),
        "the reply's source is the Service"
    );
    // connect goes to the target (connect4) and getpeername names the Service.
    let connected = udp(true);
    assert_eq!(connected.server, "udp-target", "{connected:?}");
    assert_eq!(connected.peer, addr(SERVICE));
    assert_eq!(f.counter(Counter::UdpSendRedirected), 1);
    assert_eq!(f.counter(Counter::UdpReplyRestored), 1);
    let stats = f.redirector.service_stats(udp_id).unwrap();
    assert_eq!(
        (
            stats.datagrams_redirected,
            stats.replies_restored,
            stats.connects_redirected
        ),
        (1, 1, 1)
    );
    // TCP still goes where its own entry says, UDP's entry aside.
    assert_eq!(f.probe_in_cgroup(SERVICE).server, "target");
    assert!(f.redirector.remove(ServiceKey::udp(addr(SERVICE))).unwrap());
    assert_eq!(udp(false).server, "udp-original");
    assert_eq!(
        f.probe_in_cgroup(SERVICE).server,
        "target",
        "TCP's entry stays"
    );
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "needs root, cgroup2 and eBPF: tests/run test"
)]
fn udp_from_ipv6_sockets_native_and_v4_mapped_is_redirected_and_replies_show_the_service() {
    let mut f = Fixture::new();
    let target4 = TagServer::start_udp(&f.netns, addr("127.0.0.1:0"), "udp-target").unwrap();
    let target6 = TagServer::start_udp(&f.netns, addr("[::1]:0"), "udp-target6").unwrap();
    let service6 = "[fd00:96::10]:8080";
    let mapped = "[::ffff:10.96.0.10]:80";
    f.redirector
        .insert(
            ServiceKey::udp(addr(SERVICE)),
            Redirect::to(target4.addr(), 2, Mode::Exchange),
        )
        .unwrap();
    f.redirector
        .insert(
            ServiceKey::udp(addr(service6)),
            Redirect::to(target6.addr(), 3, Mode::Exchange),
        )
        .unwrap();
    for connected in [false, true] {
        let udp =
            |to: &str| probe::udp(&f.netns, Some(f.cgroup.path()), addr(to), connected).unwrap();
        // A dual-stack socket to a v4-mapped Service: the IPv4 path (sendmsg4, or connect6
        // to the v4-mapped target), the reply shown v4-mapped (recvmsg6) or the peer name
        // kept (getpeername6).
        let seen = udp(mapped);
        assert_eq!(seen.server, "udp-target", "{connected}: {seen:?}");
        assert_eq!(seen.peer, addr(mapped), "{connected}");
        // A native IPv6 Service (sendmsg6 and recvmsg6, or connect6).
        let seen = udp(service6);
        assert_eq!(seen.server, "udp-target6", "{connected}: {seen:?}");
        assert_eq!(seen.peer, addr(service6), "{connected}");
    }
    assert_eq!(
        f.counter(Counter::UdpSendRedirected),
        2,
        "the unconnected sends"
    );
    assert_eq!(f.counter(Counter::UdpReplyRestored), 2, "their replies");
    assert_eq!(f.counter(Counter::UdpV6ToV4Skipped), 0);
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "needs root, cgroup2 and eBPF: tests/run test"
)]
fn ipv6_socket_to_a_v4_mapped_address_is_redirected() {
    let f = Fixture::new();
    let mapped = "[::ffff:10.96.0.10]:80";
    let seen = f.probe_in_cgroup(mapped);
    assert_eq!(seen.server, "target", "{seen:?}");
    assert_eq!(
        seen.peer,
        addr(mapped),
        "getpeername6 must report the v4-mapped original"
    );
    assert_eq!(f.counter(Counter::V4MappedRedirected), 1);
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "needs root, cgroup2 and eBPF: tests/run test"
)]
fn native_ipv6_service_is_redirected_to_an_ipv6_target() {
    let mut f = Fixture::new();
    let target6 = TagServer::start(&f.netns, addr("[::1]:0"), "target6").unwrap();
    let service6 = "[fd00:96::10]:8080";
    f.redirector
        .insert(addr(service6), Redirect::to(target6.addr(), 2, Mode::Mesh))
        .unwrap();
    let seen = f.probe_in_cgroup(service6);
    assert_eq!(seen.server, "target6", "{seen:?}");
    assert_eq!(seen.peer, addr(service6));
    assert_eq!(
        f.redirector.service_stats(2).unwrap().connects_redirected,
        1
    );
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "needs root, cgroup2 and eBPF: tests/run test"
)]
fn ten_thousand_entries_still_redirect_correctly() {
    let mut f = Fixture::new();
    let targets: Vec<TagServer> = (0..10)
        .map(|i| TagServer::start(&f.netns, addr("127.0.0.1:0"), &format!("t{i}")).unwrap())
        .collect();
    let service = |i: u32| SocketAddr::from(([10, 100, (i >> 8) as u8, i as u8], 80));
    for i in 0..10_000 {
        let target = targets[i as usize % targets.len()].addr();
        f.redirector
            .insert(service(i), Redirect::to(target, 100 + i, Mode::Exchange))
            .unwrap();
    }
    assert_eq!(f.redirector.entries().unwrap().len(), 10_001);
    for i in [0, 1, 4_999, 7_777, 9_998, 9_999] {
        let seen = f.probe_in_cgroup(&service(i).to_string());
        assert_eq!(seen.server, format!("t{}", i % 10), "entry {i}: {seen:?}");
        assert_eq!(seen.peer, service(i));
        assert_eq!(
            f.redirector
                .service_stats(100 + i)
                .unwrap()
                .connects_redirected,
            1
        );
    }
    // The first entry still works with the map full of others.
    assert_eq!(f.probe_in_cgroup(SERVICE).server, "target");
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "needs root, cgroup2 and eBPF: tests/run test"
)]
fn dropping_the_redirector_detaches_the_programs() {
    let f = Fixture::new();
    assert_eq!(f.probe_in_cgroup(SERVICE).server, "target");
    let Fixture {
        redirector,
        target,
        _original,
        cgroup,
        netns,
        _unloaded,
    } = f;
    drop(redirector);
    let seen = probe::connect(&netns, Some(cgroup.path()), addr(SERVICE)).unwrap();
    assert_eq!(seen.server, "original", "fail-open after detach: {seen:?}");
    drop((target, _original));
}

/// After a full redirect lifecycle nothing is left behind: no namespace, cgroup, mount or
/// loaded eBPF program of this test.
#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "needs root, cgroup2 and eBPF: tests/run test"
)]
fn a_redirect_lifecycle_leaves_nothing_behind() {
    harness::require_ebpf();
    let service: SocketAddr = "10.96.0.10:80".parse().unwrap();
    let (ns_name, cgroup_path, programs): (String, PathBuf, _);
    {
        let ns = NetNs::new(unique_name("ns")).unwrap();
        ns.add_local_addrs(&["10.96.0.10/32"]).unwrap();
        let target = TagServer::start(&ns, "127.0.0.1:0".parse().unwrap(), "target").unwrap();
        let cgroup = TestCgroup::new(&unique_name("cg")).unwrap();
        let (mut redirector, loaded) = redirector_attached_to(cgroup.path());
        redirector
            .insert(service, Redirect::to(target.addr(), 1, Mode::Exchange))
            .unwrap();
        assert_eq!(
            probe::connect(&ns, Some(cgroup.path()), service)
                .unwrap()
                .server,
            "target"
        );
        assert!(!loaded.is_empty(), "programs are loaded while in use");
        (ns_name, cgroup_path, programs) = (ns.name().to_owned(), cgroup.path().to_owned(), loaded);
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
    programs.assert_unloaded();

    let leftovers = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    let leftovers = String::from_utf8_lossy(&leftovers.stdout);
    assert!(
        !leftovers
            .lines()
            .any(|l| l.split_whitespace().next() == Some(ns_name.as_str())),
        "namespace left: {leftovers}"
    );
}
