//! A pod's network: its own namespace with a routed /32 veth from the node (or the node's
//! namespace for hostNetwork pods), and the name-resolution files every container gets.
//!
//! Teardown is explicit and ordered: the node's end of the veth (and with it the pod's /32
//! route) is deleted first, then the namespace, and only then is the IP given back. Deleting
//! a namespace only unlinks its name; the kernel destroys it (and the veth inside) later and
//! asynchronously, or never while a socket or process still holds it. Were the IP given back
//! before, the next pod handed that IP would find the old route still there
//! (`RTNETLINK answers: File exists`).

use std::{io, net::Ipv4Addr, path::Path};

use super::{CLUSTER_DNS, NodeInfo};
use crate::{
    sys::netns::NetNs,
    topology::{self, POD_GATEWAY},
};

/// What a pod network holds while the pod runs: the node's end of its veth, its namespace
/// and its IP's lease on the node; `None` parts for a hostNetwork pod. Fields drop in this
/// order, which is the teardown order.
pub(super) struct PodNetwork<'a> {
    pub(super) ip: Ipv4Addr,
    _veth: Option<NodeVeth>,
    _netns: Option<NetNs>,
    _lease: Option<IpLease<'a>>,
}

/// The pod's network: the node's for hostNetwork pods, else a namespace `<prefix>p<seq>`
/// with a /32 veth the node routes to and answers ARP on (proxy ARP for the gateway). A
/// failure part-way undoes what was made.
pub(super) fn attach<'a>(
    node: &'a NodeInfo,
    prefix: &str,
    seq: u32,
    host_network: bool,
) -> io::Result<PodNetwork<'a>> {
    if host_network {
        return Ok(PodNetwork {
            ip: node.ip,
            _veth: None,
            _netns: None,
            _lease: None,
        });
    }
    let ip = node
        .allocate_ip()
        .ok_or_else(|| io::Error::other("node is out of pod IPs"))?;
    let lease = IpLease(node, ip);
    let netns = NetNs::new(format!("{prefix}p{seq}"))?;
    let veth = NodeVeth {
        node_netns: node.netns_name.clone(),
        name: format!("vp{seq}"),
    };
    topology::ip_batch(
        &node.netns_name,
        &[format!(
            "link add {} type veth peer name eth0 netns {}",
            veth.name,
            netns.name()
        )],
    )?;
    topology::ip_batch(
        &node.netns_name,
        &[
            format!("link set {} up", veth.name),
            // `replace`: the lease makes this pod the IP's only holder, so a route left by
            // a pod whose teardown failed is stale and taken over.
            format!("route replace {ip}/32 dev {}", veth.name),
        ],
    )?;
    topology::sysctl(
        &node.netns_name,
        &format!("net.ipv4.conf.{}.proxy_arp", veth.name),
        "1",
    )?;
    // Answer the pod's ARP for its gateway at once, as Calico configures its veths;
    // the kernel's default delays proxy replies by up to 0.8 s.
    topology::sysctl(
        &node.netns_name,
        &format!("net.ipv4.neigh.{}.proxy_delay", veth.name),
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
        _veth: Some(veth),
        _netns: Some(netns),
        _lease: Some(lease),
    })
}

/// `resolv.conf` (the cluster DNS and the pod's search path), `hosts` and `hostname`, as
/// the kubelet writes them, in the pod's state directory. A pod with a `subdomain` gets its
/// fully qualified name in `hosts`, as the kubelet writes it.
pub(super) fn write_name_files(
    dir: &Path,
    ns: &str,
    hostname: &str,
    subdomain: Option<&str>,
    pod_ip: Ipv4Addr,
) -> io::Result<()> {
    std::fs::write(
        dir.join("resolv.conf"),
        format!(
            "search {ns}.svc.cluster.local svc.cluster.local cluster.local\nnameserver {CLUSTER_DNS}\noptions ndots:5\n"
        ),
    )?;
    let names = match subdomain {
        Some(sub) => format!("{hostname}.{sub}.{ns}.svc.cluster.local\t{hostname}"),
        None => hostname.to_owned(),
    };
    std::fs::write(
        dir.join("hosts"),
        format!(
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{pod_ip}\t{names}\n"
        ),
    )?;
    std::fs::write(dir.join("hostname"), format!("{hostname}\n"))
}

/// The node's end of a pod's veth, deleted on drop: that removes both ends and the pod's
/// /32 route at once, whatever still holds the pod's namespace.
struct NodeVeth {
    node_netns: String,
    name: String,
}

impl Drop for NodeVeth {
    fn drop(&mut self) {
        // Gone already when `link add` failed, or when the kernel destroyed the namespace.
        let _ = topology::ip_batch(&self.node_netns, &[format!("link del {}", self.name)]);
    }
}

/// A pod IP taken from the node's range, given back on drop.
struct IpLease<'a>(&'a NodeInfo, Ipv4Addr);

impl Drop for IpLease<'_> {
    fn drop(&mut self) {
        self.0.release_ip(self.1);
    }
}
