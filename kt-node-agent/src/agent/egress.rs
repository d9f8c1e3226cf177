//! Where the agent dials for a connecting workstation (`connect` sessions): into the
//! cluster's pod and Service ranges only — never the node's own addresses, loopback,
//! link-local (which holds the cloud metadata endpoint 169.254.169.254), multicast or
//! unspecified addresses — unless the agent's configuration widens it. Pure: the ranges come
//! from the caller.

use std::{collections::HashSet, net::IpAddr};

use kt_proto::net::Cidr;

/// Why a destination is refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("{0} is a loopback, link-local, multicast or unspecified address")]
    Special(IpAddr),
    #[error("{0} is a node's address")]
    Node(IpAddr),
    #[error("{0} is outside the cluster's pod and Service ranges")]
    Outside(IpAddr),
}

/// What a connecting workstation may reach through this agent.
#[derive(Clone, Debug, Default)]
pub struct Egress {
    /// The pods' ranges (nodes' `podCIDRs`).
    pub pod_cidrs: Vec<Cidr>,
    /// The Services' ranges.
    pub service_cidrs: Vec<Cidr>,
    /// Every ClusterIP (a Service outside the known ranges is still a Service).
    pub cluster_ips: HashSet<IpAddr>,
    /// The nodes' own addresses (host-network pods live there: never dialled).
    pub node_ips: HashSet<IpAddr>,
    /// Ranges the admin allowed besides (`--egress-allow`).
    pub allowed: Vec<Cidr>,
}

impl Egress {
    /// Whether the agent may dial `address` for a workstation.
    pub fn check(&self, address: IpAddr) -> Result<(), Refused> {
        let in_any = |ranges: &[Cidr]| ranges.iter().any(|c| c.contains(address));
        if in_any(&self.allowed) {
            return Ok(());
        }
        let special = match address {
            IpAddr::V4(a) => {
                a.is_loopback()
                    || a.is_link_local()
                    || a.is_multicast()
                    || a.is_unspecified()
                    || a.is_broadcast()
            }
            IpAddr::V6(a) => {
                a.is_loopback()
                    || a.is_multicast()
                    || a.is_unspecified()
                    || a.is_unicast_link_local()
                    || a.to_ipv4_mapped().is_some()
            }
        };
        if special {
            return Err(Refused::Special(address));
        }
        if self.node_ips.contains(&address) {
            return Err(Refused::Node(address));
        }
        if in_any(&self.pod_cidrs)
            || in_any(&self.service_cidrs)
            || self.cluster_ips.contains(&address)
        {
            Ok(())
        } else {
            Err(Refused::Outside(address))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn egress() -> Egress {
        Egress {
            pod_cidrs: vec![
                "10.244.1.0/24".parse().unwrap(),
                "10.244.2.0/24".parse().unwrap(),
            ],
            service_cidrs: vec!["10.96.0.0/12".parse().unwrap()],
            cluster_ips: [ip("10.200.0.7")].into(),
            node_ips: [ip("172.30.0.11"), ip("10.244.1.1")].into(),
            allowed: Vec::new(),
        }
    }

    #[test]
    fn pods_and_services_are_reachable() {
        let e = egress();
        for ok in [
            "10.244.1.7",
            "10.244.2.250",
            "10.96.0.10",
            "10.111.3.4",
            "10.200.0.7",
        ] {
            assert_eq!(e.check(ip(ok)), Ok(()), "{ok}");
        }
    }

    #[test]
    fn the_node_loopback_metadata_and_the_outside_are_refused() {
        let e = egress();
        assert_eq!(
            e.check(ip("172.30.0.11")),
            Err(Refused::Node(ip("172.30.0.11")))
        );
        assert_eq!(
            e.check(ip("10.244.1.1")),
            Err(Refused::Node(ip("10.244.1.1"))),
            "a node address inside a pod range"
        );
        for special in [
            "127.0.0.1",
            "169.254.169.254",
            "0.0.0.0",
            "224.0.0.1",
            "::1",
            "fe80::1",
            "::ffff:10.244.1.7",
        ] {
            assert_eq!(
                e.check(ip(special)),
                Err(Refused::Special(ip(special))),
                "{special}"
            );
        }
        assert_eq!(e.check(ip("8.8.8.8")), Err(Refused::Outside(ip("8.8.8.8"))));
        assert_eq!(
            Refused::Special(ip("169.254.169.254")).to_string(),
            "169.254.169.254 is a loopback, link-local, multicast or unspecified address"
        );
    }

    #[test]
    fn an_admin_may_widen_it() {
        let mut e = egress();
        e.allowed.push("192.168.50.0/24".parse().unwrap());
        assert_eq!(e.check(ip("192.168.50.9")), Ok(()));
    }
}
