//! The names the relay asks for: the pod's resolver configuration (`/etc/resolv.conf`), and
//! the candidates a name expands to — the workstation's own domain stripped, then the pod's
//! search list applied the way a pod's resolver applies it (`ndots`). Pure, no I/O but
//! reading the file.

use std::{net::SocketAddr, path::Path};

use super::DnsRelayError;

/// The parts of resolv.conf the relay follows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvConf {
    pub nameserver: SocketAddr,
    pub search: Vec<String>,
    pub ndots: usize,
}

impl ResolvConf {
    /// Parses resolv.conf text: the first `nameserver`, the last `search`/`domain` line, and
    /// `options ndots:N` (default 1, as glibc has it). `None` without a nameserver.
    pub fn parse(text: &str) -> Option<Self> {
        let (mut nameserver, mut search, mut ndots) = (None, Vec::new(), 1);
        for line in text.lines() {
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") if nameserver.is_none() => {
                    nameserver = words
                        .next()
                        .and_then(|ip| ip.parse().ok())
                        .map(|ip| SocketAddr::new(ip, 53));
                }
                Some("search" | "domain") => {
                    search = words.map(|d| normalize(d).to_owned()).collect();
                }
                Some("options") => {
                    if let Some(n) = words.find_map(|o| o.strip_prefix("ndots:")) {
                        ndots = n.parse().unwrap_or(ndots);
                    }
                }
                _ => {}
            }
        }
        Some(Self {
            nameserver: nameserver?,
            search,
            ndots,
        })
    }

    pub fn read(path: &Path) -> Result<Self, DnsRelayError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| DnsRelayError::ReadResolvConf {
                path: path.to_owned(),
                source,
            })?;
        Self::parse(&text).ok_or_else(|| DnsRelayError::NoNameserver {
            path: path.to_owned(),
        })
    }
}

/// Lower case, no trailing dot.
fn normalize(name: &str) -> &str {
    name.trim_end_matches('.')
}

/// The names to ask upstream for `asked`, in order: the workstation's domain suffix removed,
/// then the pod resolver's expansion (search list first when the name has fewer than ndots
/// dots, the name itself first otherwise).
pub fn candidates(asked: &str, conf: &ResolvConf, local_domains: &[String]) -> Vec<String> {
    let asked = normalize(asked).to_ascii_lowercase();
    let name = local_domains
        .iter()
        .map(|d| normalize(d).to_ascii_lowercase())
        .filter(|d| !d.is_empty())
        .find_map(|d| {
            asked
                .strip_suffix(d.as_str())
                .and_then(|n| n.strip_suffix('.'))
                .map(str::to_owned)
        })
        .unwrap_or(asked);
    let expanded = conf.search.iter().map(|d| format!("{name}.{d}"));
    if name.matches('.').count() >= conf.ndots {
        std::iter::once(name.clone()).chain(expanded).collect()
    } else {
        expanded.chain(std::iter::once(name.clone())).collect()
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in crate::dns_relay) fn kube_pod() -> ResolvConf {
        ResolvConf::parse(
            "search default.svc.cluster.local svc.cluster.local cluster.local\n\
             nameserver 10.96.0.10\noptions ndots:5\n",
        )
        .expect("parses")
    }

    #[test]
    fn resolv_conf_parses_the_parts_the_relay_follows() {
        let conf = kube_pod();
        assert_eq!(conf.nameserver, "10.96.0.10:53".parse().unwrap());
        assert_eq!(
            conf.search,
            [
                "default.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local"
            ]
        );
        assert_eq!(conf.ndots, 5);
        let plain = ResolvConf::parse("# x\nnameserver 1.1.1.1\nnameserver 8.8.8.8\n").unwrap();
        assert_eq!(plain.nameserver, "1.1.1.1:53".parse().unwrap());
        assert_eq!(plain.ndots, 1);
        assert!(ResolvConf::parse("search a\n").is_none());
    }

    #[test]
    fn short_names_expand_with_the_pod_search_list_first() {
        assert_eq!(
            candidates("Web.", &kube_pod(), &[]),
            [
                "web.default.svc.cluster.local",
                "web.svc.cluster.local",
                "web.cluster.local",
                "web"
            ]
        );
    }

    #[test]
    fn the_workstation_domain_is_stripped_before_expansion() {
        let local = ["corp.example".to_owned(), "lab.example".to_owned()];
        let names = candidates("web.other.lab.example.", &kube_pod(), &local);
        assert_eq!(names[0], "web.other.default.svc.cluster.local");
        assert!(names.contains(&"web.other.svc.cluster.local".to_owned()));
        // Only a whole-label suffix is the local domain.
        let names = candidates("webcorp.example", &kube_pod(), &local);
        assert_eq!(names.last().unwrap(), "webcorp.example");
    }

    #[test]
    fn names_with_enough_dots_are_tried_as_given_first() {
        let conf = ResolvConf {
            ndots: 2,
            ..kube_pod()
        };
        assert_eq!(candidates("a.b.c", &conf, &[])[0], "a.b.c");
        assert_eq!(
            candidates("a.b", &conf, &[])[0],
            "a.b.default.svc.cluster.local"
        );
    }
}
