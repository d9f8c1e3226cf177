//! A pod's network: its own namespace with a routed /32 veth from the node (or the node's
//! namespace for hostNetwork pods), and the name-resolution files every container gets.

use std::{io, net::Ipv4Addr, path::Path};

use super::{CLUSTER_DNS, NodeInfo};
use crate::{
    sys::netns::NetNs,
    topology::{self, POD_GATEWAY},
};

/// What a pod network holds while the pod runs: its namespace and its IP's lease on the
/// node; `None` parts for a hostNetwork pod.
pub(super) struct PodNetwork<'a> {
    pub(super) ip: Ipv4Addr,
    _netns: Option<NetNs>,
    _lease: Option<IpLease<'a>>,
}

/// The pod's network: the node's for hostNetwork pods, else a namespace `<prefix>p<seq>`
/// with a /32 veth the node routes to and answers ARP on (proxy ARP for the gateway).
pub(super) fn attach<'a>(
    node: &'a NodeInfo,
    prefix: &str,
    seq: u32,
    host_network: bool,
) -> io::Result<PodNetwork<'a>> {
    if host_network {
        return Ok(PodNetwork {
            ip: node.ip,
            _netns: None,
            _lease: None,
        });
    }
    let ip = node
        .allocate_ip()
        .ok_or_else(|| io::Error::other("node is out of pod IPs"))?;
    let lease = IpLease(node, ip);
    let netns = NetNs::new(format!("{prefix}p{seq}"))?;
    let veth = format!("vp{seq}");
    topology::ip_batch(
        &node.netns_name,
        &[
            format!(
                "link add {veth} type veth peer name eth0 netns {}",
                netns.name()
            ),
            format!("link set {veth} up"),
            format!("route add {ip}/32 dev {veth}"),
        ],
    )?;
    topology::sysctl(
        &node.netns_name,
        &format!("net.ipv4.conf.{veth}.proxy_arp"),
        "1",
    )?;
    // Answer the pod's ARP for its gateway at once, as Calico configures its veths;
    // the kernel's default delays proxy replies by up to 0.8 s.
    topology::sysctl(
        &node.netns_name,
        &format!("net.ipv4.neigh.{veth}.proxy_delay"),
        "0",
    )?;
    topology::ip_batch(
        netns.name(),
        &[
            format!("addr add {ip}/32 dev eth0"),
            "link set eth0 up".into(),
            format!("route add {POD_GATEWAY} dev eth0 scope link"),
            format!("route add default via {POD_GATEWAY} dev eth0"),
        ],
    )?;
    Ok(PodNetwork {
        ip,
        _netns: Some(netns),
        _lease: Some(lease),
    })
}

/// `resolv.conf` (the cluster DNS and the pod's search path), `hosts` and `hostname`, as
/// the kubelet writes them, in the pod's state directory.
pub(super) fn write_name_files(
    dir: &Path,
    ns: &str,
    hostname: &str,
    pod_ip: Ipv4Addr,
) -> io::Result<()> {
    std::fs::write(
        dir.join("resolv.conf"),
        format!(
            "search {ns}.svc.cluster.local svc.cluster.local cluster.local\nnameserver {CLUSTER_DNS}\noptions ndots:5\n"
        ),
    )?;
    std::fs::write(
        dir.join("hosts"),
        format!(
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{pod_ip}\t{hostname}\n"
        ),
    )?;
    std::fs::write(dir.join("hostname"), format!("{hostname}\n"))
}

/// A pod IP taken from the node's range, given back on drop.
struct IpLease<'a>(&'a NodeInfo, Ipv4Addr);

impl Drop for IpLease<'_> {
    fn drop(&mut self) {
        self.0.release_ip(self.1);
    }
}
