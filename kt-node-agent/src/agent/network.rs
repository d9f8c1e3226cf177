//! The cluster's network as the agent tells a connecting workstation about it (what to route
//! into its tunnel, where the cluster DNS is) and as it polices the workstation's
//! connections ([`Egress`]), from the Nodes and Services it watches and its own resolver.
//! Pure: the objects come from the caller.

use std::{collections::HashSet, net::IpAddr};

use k8s_openapi::api::core::v1::Node;
use kt_proto::{
    net::{Cidr, covering_ranges},
    session::ClusterNetwork,
};

use super::egress::Egress;
use crate::dns_relay::ResolvConf;

/// What connect sessions get: the egress rule and the network they are told about.
#[derive(Clone, Debug, Default)]
pub struct Network {
    pub egress: Egress,
    pub info: ClusterNetwork,
}

/// The network from `nodes` (their `podCIDRs` and addresses), the Services' ClusterIPs, the
/// agent's resolver (the cluster DNS and domain) and the admin's extra ranges. O(nodes +
/// ClusterIPs): the agent computes it again only when one of them changed.
pub fn network(
    nodes: &[&Node],
    cluster_ips: impl IntoIterator<Item = IpAddr>,
    resolver: Option<&ResolvConf>,
    allowed: &[Cidr],
) -> Network {
    let pod_cidrs: Vec<Cidr> = nodes
        .iter()
        .filter_map(|n| n.spec.as_ref())
        .flat_map(|s| {
            s.pod_cidrs
                .clone()
                .unwrap_or_else(|| s.pod_cidr.clone().into_iter().collect())
        })
        .filter_map(|c| c.parse().ok())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let node_ips: HashSet<IpAddr> = nodes
        .iter()
        .filter_map(|n| n.status.as_ref()?.addresses.as_ref())
        .flatten()
        .filter_map(|a| a.address.parse().ok())
        .collect();
    let cluster_ips: HashSet<IpAddr> = cluster_ips.into_iter().collect();
    let service_cidrs = covering_ranges(cluster_ips.iter().copied());
    let cluster_domain = resolver
        .and_then(|r| {
            r.search
                .iter()
                .find_map(|d| d.strip_prefix("svc.").map(str::to_owned))
        })
        .unwrap_or_else(|| "cluster.local".into());
    let info = ClusterNetwork {
        pod_cidrs: pod_cidrs.iter().map(ToString::to_string).collect(),
        service_cidrs: service_cidrs.iter().map(ToString::to_string).collect(),
        dns: resolver.map(|r| r.nameserver.ip()),
        cluster_domain,
    };
    Network {
        egress: Egress {
            pod_cidrs,
            service_cidrs,
            cluster_ips,
            node_ips,
            allowed: allowed.to_vec(),
        },
        info,
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Service;
    use serde_json::json;

    use super::*;
    use crate::agent::index::ServiceView;

    #[test]
    fn the_network_comes_from_nodes_services_and_the_resolver() {
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": "node-1"},
            "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"]},
            "status": {"addresses": [{"type": "InternalIP", "address": "172.30.0.11"}]}
        }))
        .unwrap();
        let svc = |ip: &str| -> Service {
            serde_json::from_value(json!({"metadata": {"name": "s"}, "spec": {"clusterIP": ip}}))
                .unwrap()
        };
        let (a, b, headless) = (svc("10.96.0.1"), svc("10.96.0.10"), svc("None"));
        let resolver = ResolvConf::parse(
            "nameserver 10.96.0.10\nsearch default.svc.cluster.local svc.cluster.local cluster.local\n",
        )
        .unwrap();
        let ips = [&a, &b, &headless]
            .into_iter()
            .flat_map(|s| ServiceView::from(s).cluster_ips);
        let net = network(&[&node], ips, Some(&resolver), &[]);
        assert_eq!(net.info.pod_cidrs, ["10.244.1.0/24"]);
        assert_eq!(net.info.service_cidrs, ["10.96.0.0/24"]);
        assert_eq!(net.info.dns, Some("10.96.0.10".parse().unwrap()));
        assert_eq!(net.info.cluster_domain, "cluster.local");
        assert!(
            net.egress.check("172.30.0.11".parse().unwrap()).is_err(),
            "the node is refused"
        );
        assert!(net.egress.check("10.244.1.9".parse().unwrap()).is_ok());
    }
}
