//! Privileged tests of the agent's node-port table over netlink
//! (`kt_node_agent::agent::node_ports::netlink`), against the real kernel, each in a network
//! namespace of its own: what the agent's transaction makes is what `nft` makes of the same
//! ruleset in `nft` syntax, and the table belongs to the agent's socket alone.

use std::{net::SocketAddrV4, process::Command};

use kt_node_agent::agent::node_ports::{
    Frontend, Ruleset, SourceRange, TABLE,
    netlink::{NftError, OwnedTable},
};
use kt_tests::harness::{netns::NetNs, unique_name};

fn to(s: &str) -> SocketAddrV4 {
    s.parse().unwrap()
}

/// Every kind of rule: a nodePort and an ingress IP to a holder's listener, a second nodePort
/// to another address (a relay to a holder on another node), an ingress IP from source
/// ranges (not byte-aligned, byte-aligned, a single address).
fn full() -> Ruleset {
    let from = |range: &str| SourceRange::of(range.parse().unwrap()).unwrap();
    Ruleset {
        redirects: vec![
            (Frontend::NodePort(30080), to("10.0.0.7:40001")),
            (Frontend::NodePort(30090), to("10.0.0.8:40002")),
            (Frontend::Address(to("192.0.2.10:80")), to("10.0.0.7:40001")),
            (
                Frontend::AddressFrom(to("192.0.2.11:80"), from("172.16.0.0/12")),
                to("10.0.0.7:40001"),
            ),
            (
                Frontend::AddressFrom(to("192.0.2.11:80"), from("10.0.0.0/8")),
                to("10.0.0.7:40001"),
            ),
            (
                Frontend::AddressFrom(to("192.0.2.11:80"), from("198.51.100.7/32")),
                to("10.0.0.7:40001"),
            ),
        ],
    }
}

/// Runs `nft args…` in `netns`, with `stdin`; returns success and stdout + stderr.
fn nft(netns: &NetNs, args: &[&str], stdin: Option<&str>) -> (bool, String) {
    use std::io::Write as _;
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns.name(), "nft"])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("nft runs");
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `nft list table ip kt_nodeport`, without what only an owned table shows (the `flags
/// owner` line and the blank line after it, the owner's `# progname` comment); `None` when
/// there is no such table.
fn listing(netns: &NetNs) -> Option<String> {
    let (ok, out) = nft(netns, &["list", "table", "ip", TABLE], None);
    ok.then(|| {
        out.replace("\tflags owner\n\n", "")
            .lines()
            .map(|l| l.split(" # progname").next().unwrap_or(l).trim_end())
            .collect::<Vec<_>>()
            .join("\n")
    })
}

/// Opens an [`OwnedTable`] in `netns` (a socket lives in the namespace it was made in).
fn open_in(netns: &NetNs) -> Result<OwnedTable, NftError> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                netns.enter_current_thread().unwrap();
                OwnedTable::open()
            })
            .join()
            .unwrap()
    })
}

fn reference(ruleset: &Ruleset) -> String {
    let netns = NetNs::new(unique_name("nftref")).unwrap();
    let (ok, out) = nft(&netns, &["-f", "-"], Some(&ruleset.script()));
    assert!(
        ok,
        "nft refused the reference script: {out}\n{}",
        ruleset.script()
    );
    listing(&netns).expect("the reference table")
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "needs root and network namespaces: tests/run test"
)]
fn the_agents_transaction_makes_the_table_nft_makes_of_the_same_script() {
    let netns = NetNs::new(unique_name("nft")).unwrap();
    let mut table = open_in(&netns).unwrap();
    table.apply(&full()).unwrap();
    let got = listing(&netns).expect("the table exists after apply");
    assert_eq!(got, reference(&full()));
    let (_, raw) = nft(&netns, &["list", "table", "ip", TABLE], None);
    assert!(raw.contains("flags owner"), "{raw}");

    // A second transaction replaces every rule; the same one again changes nothing.
    let smaller = Ruleset {
        redirects: vec![(Frontend::NodePort(31000), to("10.0.0.7:40005"))],
    };
    table.apply(&smaller).unwrap();
    table.apply(&smaller).unwrap();
    assert_eq!(listing(&netns).unwrap(), reference(&smaller));
    assert!(!listing(&netns).unwrap().contains("30080"));

    drop(table);
    assert_eq!(
        listing(&netns),
        None,
        "closing the socket deletes the table"
    );
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "needs root and network namespaces: tests/run test"
)]
fn no_one_else_may_change_the_table_and_a_second_owner_is_refused_with_a_reason() {
    let netns = NetNs::new(unique_name("nft")).unwrap();
    let mut table = open_in(&netns).unwrap();
    table.apply(&full()).unwrap();
    let before = listing(&netns).unwrap();

    let (ok, out) = nft(
        &netns,
        &["add", "rule", "ip", TABLE, "output", "accept"],
        None,
    );
    assert!(!ok, "nft changed an owned table: {out}");
    assert!(out.contains("Operation not permitted"), "{out}");
    let (ok, out) = nft(&netns, &["flush", "ruleset"], None);
    assert!(ok, "{out}");
    assert_eq!(listing(&netns).unwrap(), before, "flush ruleset skips it");

    // Another agent socket: the kernel refuses the whole transaction and says which step.
    let mut second = open_in(&netns).unwrap();
    assert_ne!(second.port_id(), table.port_id());
    match second.apply(&Ruleset::default()) {
        Err(NftError::Refused { what, errno, .. }) => {
            assert_eq!(what, format!("add table ip {TABLE}"));
            assert_eq!(errno.raw_os_error(), Some(libc::EPERM), "{errno}");
        }
        other => panic!("a second owner was not refused: {other:?}"),
    }
    assert_eq!(listing(&netns).unwrap(), before, "nothing of it applied");
    // The refused socket can be dropped without touching the table; ours still works.
    drop(second);
    table.apply(&full()).unwrap();
    assert_eq!(listing(&netns).unwrap(), before);

    // Once ours is gone, a new socket takes the name over.
    drop(table);
    let mut next = open_in(&netns).unwrap();
    next.apply(&full()).unwrap();
    assert_eq!(listing(&netns).unwrap(), before);
}

/// Drops `CAP_NET_ADMIN` (12) from the calling thread's effective set: capabilities are per
/// thread at the system call, so the rest of the test process keeps it.
fn drop_net_admin_in_this_thread() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    // _LINUX_CAPABILITY_VERSION_3: two 32-bit words of each set.
    let mut header = Header {
        version: 0x2008_0522,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: a valid header and two data words, as capget(2) wants for version 3.
    let got = unsafe { libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr()) };
    assert_eq!(got, 0, "{}", std::io::Error::last_os_error());
    data[0].effective &= !(1 << 12);
    // SAFETY: as above.
    let set = unsafe { libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) };
    assert_eq!(set, 0, "{}", std::io::Error::last_os_error());
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "needs root and network namespaces: tests/run test"
)]
fn without_cap_net_admin_the_transaction_is_refused_as_nftables_unavailable() {
    let netns = NetNs::new(unique_name("nft")).unwrap();
    let result = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                netns.enter_current_thread().unwrap();
                drop_net_admin_in_this_thread();
                let mut table = OwnedTable::open().expect("opening the socket needs no capability");
                table.apply(&full())
            })
            .join()
            .unwrap()
    });
    assert!(
        matches!(result, Err(NftError::Unavailable(_))),
        "{result:?}"
    );
    assert_eq!(listing(&netns), None);
}
