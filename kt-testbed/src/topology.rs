//! The simulated cluster's networks, all inside namespaces the testbed creates:
//!
//! ```text
//!   <p>cp  control plane: bridge br0 172.30.0.1/24, the API server on :6443
//!    ├── <p>n1  node-1  eth0 172.30.0.11   pods 10.244.1.0/24 (routed /32 veths)
//!    ├── <p>n2  node-2  eth0 172.30.0.12   pods 10.244.2.0/24
//!    └── <p>ws  workstation eth0 172.30.0.100 (reaches the API and the nodes only)
//! ```
//!
//! Nodes route each other's pod ranges over the bridge; the control plane routes them back
//! for API replies. Nothing is routed from the host namespace.

use std::{
    io,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use crate::sys::{cgroup::TestCgroup, netns::NetNs};

pub const API_IP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 1);
pub const API_PORT: u16 = 6443;
pub const WORKSTATION_IP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 100);
/// The link-local gateway every pod routes through (answered by proxy ARP on the node).
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

pub fn node_ip(index: u8) -> Ipv4Addr {
    Ipv4Addr::new(172, 30, 0, 10 + index)
}

pub fn pod_cidr(index: u8) -> String {
    format!("10.244.{index}.0/24")
}

/// Runs `ip -batch -` inside a namespace (one process for many commands).
pub fn ip_batch(netns: &str, commands: &[String]) -> io::Result<()> {
    let mut child = Command::new("ip")
        .args(["-n", netns, "-batch", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().expect("piped");
        stdin.write_all(commands.join("\n").as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "ip -n {netns} -batch failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// A sysctl inside a namespace.
pub fn sysctl(netns: &str, key: &str, value: &str) -> io::Result<()> {
    crate::sys::netns::run_checked(Command::new("ip").args([
        "netns",
        "exec",
        netns,
        "sysctl",
        "-qw",
        &format!("{key}={value}"),
    ]))?;
    Ok(())
}

pub struct Node {
    pub index: u8,
    pub name: String,
    pub netns: NetNs,
    /// The node's pods cgroup (what kubepods is on a real node).
    pub pods_cgroup: TestCgroup,
}

impl Node {
    pub fn ip(&self) -> Ipv4Addr {
        node_ip(self.index)
    }
}

/// Fields drop in order: nodes (and their pods' cgroups) first, the root cgroup last.
pub struct Topology {
    pub prefix: String,
    pub nodes: Vec<Node>,
    pub workstation: NetNs,
    pub control_plane: NetNs,
    /// Where `kt-testbed exec` puts workstation commands, so that stopping the testbed ends
    /// them with everything else.
    pub workstation_cgroup: TestCgroup,
    pub cgroup: TestCgroup,
}

impl Topology {
    /// `prefix` is short (`ktt-ab12-`): it names namespaces and cgroups.
    pub fn create(prefix: &str, nodes: u8) -> io::Result<Self> {
        let cgroup = TestCgroup::new(prefix.trim_end_matches('-'))?;
        let cp = NetNs::new(format!("{prefix}cp"))?;
        ip_batch(
            cp.name(),
            &[
                "link add br0 type bridge".into(),
                format!("addr add {API_IP}/24 dev br0"),
                "link set br0 up".into(),
            ],
        )?;
        sysctl(cp.name(), "net.ipv4.ip_forward", "1")?;
        let mut built = Vec::new();
        for index in 1..=nodes {
            let name = format!("node-{index}");
            let netns = NetNs::new(format!("{prefix}n{index}"))?;
            let ip = node_ip(index);
            let cp_cmds = vec![
                format!(
                    "link add n{index} type veth peer name eth0 netns {}",
                    netns.name()
                ),
                format!("link set n{index} master br0"),
                format!("link set n{index} up"),
                format!("route add {} via {ip}", pod_cidr(index)),
            ];
            ip_batch(cp.name(), &cp_cmds)?;
            // The default route also gives proxy ARP a route to answer the pods' gateway with.
            let mut node_cmds = vec![
                format!("addr add {ip}/24 dev eth0"),
                "link set eth0 up".into(),
                format!("route add default via {API_IP}"),
            ];
            for other in (1..=nodes).filter(|o| *o != index) {
                node_cmds.push(format!(
                    "route add {} via {}",
                    pod_cidr(other),
                    node_ip(other)
                ));
            }
            ip_batch(netns.name(), &node_cmds)?;
            for (key, value) in [
                ("net.ipv4.ip_forward", "1"),
                ("net.ipv4.conf.all.rp_filter", "0"),
                ("net.ipv4.conf.default.rp_filter", "0"),
            ] {
                sysctl(netns.name(), key, value)?;
            }
            let pods_cgroup = cgroup.child(&name)?;
            built.push(Node {
                index,
                name,
                netns,
                pods_cgroup,
            });
        }
        let workstation = NetNs::new(format!("{prefix}ws"))?;
        ip_batch(
            cp.name(),
            &[
                format!(
                    "link add ws type veth peer name eth0 netns {}",
                    workstation.name()
                ),
                "link set ws master br0".into(),
                "link set ws up".into(),
            ],
        )?;
        ip_batch(
            workstation.name(),
            &[
                format!("addr add {WORKSTATION_IP}/24 dev eth0"),
                "link set eth0 up".into(),
            ],
        )?;
        let workstation_cgroup = cgroup.child("workstation")?;
        Ok(Self {
            prefix: prefix.to_owned(),
            nodes: built,
            workstation,
            control_plane: cp,
            workstation_cgroup,
            cgroup,
        })
    }

    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    pub fn cgroup_path(&self) -> &Path {
        self.cgroup.path()
    }
}

/// `/run/netns/<name>`.
pub fn netns_path(name: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(name)
}
