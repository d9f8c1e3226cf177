//! Traffic that never calls `connect()` in a pod (issue 16, item 6): a client outside the
//! cluster dialling `node_ip:nodePort` of an exchanged Service, or its LoadBalancer ingress
//! IP where the node owns it, is sent to the holding agent's listener too.
//!
//! Why nftables and not eBPF: the cgroup `connect4` programs see only sockets of the pods'
//! cgroup, and an outside connection has no socket on the node — it is a packet that
//! kube-proxy DNATs in `prerouting`. The cheapest place to take it first is the same hook at
//! a higher priority: every agent keeps an nftables table of its own, `ip kt_nodeport`:
//!
//! - `prerouting` (priority `dstnat - 10`, before kube-proxy's `dstnat`): `fib daddr type
//!   local tcp dport <nodePort> dnat to <holder>:<listenerPort>` per exchanged Service port,
//!   and `ip daddr <address> tcp dport <port> dnat …` per LoadBalancer ingress IP and
//!   external IP (`spec.externalIPs`). A Service with `loadBalancerSourceRanges` gets one
//!   `ip saddr <range> ip daddr <ingress IP> …` rule per IPv4 range instead, so other
//!   sources still meet kube-proxy's filter (as in kube-proxy, no IPv4 range or a /0 among
//!   them is no filter); an ingress IP with `ipMode: Proxy` is left alone, as kube-proxy
//!   leaves it. The first NAT binding of a connection wins, so kube-proxy's
//!   rules never see a connection these rules take.
//! - `output` (priority -110): the same rules, for host-network processes of the node.
//!
//! When the holder is another node, the DNAT goes to a relay of this agent instead
//! ([`relay`]), which dials the holder: straight to the holder, the packets would be
//! forwarded, and many nodes drop forwarded traffic kube-proxy did not mark (Docker's
//! FORWARD policy DROP).
//!
//! The table is derived from the same believed sessions, Services and lease clock as the
//! service map ([`desired`], pure), and each change is one nftables transaction holding
//! the whole table ([`ruleset`], [`netlink::OwnedTable::apply`]), so no reader sees half of
//! it.
//!
//! Fail-open: an nftables table would survive a `kill -9` of the agent, unlike its eBPF
//! links. The table is created with `flags owner` (Linux ≥ 5.12) over a netlink socket the
//! agent opens itself ([`netlink`]; no `nft` program, which the `FROM scratch` image does
//! not have): the kernel deletes the table when that socket closes, which it does when the
//! agent exits, however it exits (measured in `tests/suites/agent.rs`: gone 34 ms after a
//! `kill -9`). Clearing the table at start instead would leave it in force until the
//! DaemonSet's replacement runs. No session: no table and no socket ([`converge`]).
//!
//! A meshed Service port's frontends go to this node's mesh router for the port (a local
//! listener), which sends each request by its header, as it does for pods.
//!
//! Not covered: IPv6 node ports, ingress and external IPs (the table is `ip`; an IPv6
//! holder address is skipped); LoadBalancer ingress IPs a cloud load balancer owns (such
//! an LB forwards to the nodePorts, which are covered); kube-proxy's admitting the LB IP
//! itself as a source when a source range holds a node address (that hairpin traffic goes
//! to the pods). `fib daddr type local` matches every local address of the node, where
//! kube-proxy's `--nodeport-addresses` may narrow the nodePorts to some of them. Without
//! `CAP_NET_ADMIN` or nf_tables, NodePort traffic is left to kube-proxy and the agent says
//! so once.

pub mod netlink;
pub mod relay;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    time::Duration,
};

use chrono::{DateTime, Utc};
use kt_proto::{
    net::Cidr,
    session::{KtSession, SessionMode},
};
use tokio_util::sync::CancellationToken;

use self::netlink::{NftError, OwnedTable};
use super::{
    index::ServiceView,
    mesh::{Route, RouteKey},
    redirects::ClusterState,
};

/// The agent's nftables table (family `ip`).
pub const TABLE: &str = "kt_nodeport";

/// What an outside connection is matched on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Frontend {
    /// Any local address of the node, this TCP port (`spec.ports[].nodePort`).
    NodePort(u16),
    /// An address outside clients dial and the Service port: a LoadBalancer ingress IP
    /// (`status.loadBalancer.ingress[].ip`) of a Service with no IPv4 source range (or a /0
    /// among them), or an external IP (`spec.externalIPs`).
    Address(SocketAddrV4),
    /// A LoadBalancer ingress IP and the Service port, from sources in this range only (one
    /// of `loadBalancerSourceRanges`).
    AddressFrom(SocketAddrV4, SourceRange),
}

/// An IPv4 source range of a [`Frontend::AddressFrom`]: prefix 1 to 32, host bits clear.
/// Only [`SourceRange::of`] makes one, so a rule can never lose its source match (an IPv6
/// range has no place in the `ip` table, and a /0 one is no filter).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SourceRange {
    network: Ipv4Addr,
    prefix: u8,
}

impl SourceRange {
    /// `range` when it is IPv4 with a prefix of 1 to 32; `None` otherwise.
    pub fn of(range: Cidr) -> Option<Self> {
        match (range.network(), range.prefix()) {
            (IpAddr::V4(network), prefix @ 1..=32) => Some(Self { network, prefix }),
            _ => None,
        }
    }

    /// The first address.
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    /// The prefix length, 1 to 32.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }
}

impl std::fmt::Display for SourceRange {
    /// `10.0.0.0/8`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl std::fmt::Display for Frontend {
    /// `nodePort 30080`, `192.0.2.7:80` or `192.0.2.7:80 from 10.0.0.0/8`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NodePort(port) => write!(f, "nodePort {port}"),
            Self::Address(at) => write!(f, "{at}"),
            Self::AddressFrom(at, from) => write!(f, "{at} from {from}"),
        }
    }
}

impl Frontend {
    /// The frontend's match in `nft` syntax, e.g. `ip saddr 10.0.0.0/8 ip daddr 192.0.2.7
    /// tcp dport 80`.
    fn matched(&self) -> String {
        match self {
            Self::NodePort(port) => format!("fib daddr type local tcp dport {port}"),
            Self::Address(at) => format!("ip daddr {} tcp dport {}", at.ip(), at.port()),
            Self::AddressFrom(at, from) => {
                format!(
                    "ip saddr {from} ip daddr {} tcp dport {}",
                    at.ip(),
                    at.port()
                )
            }
        }
    }
}

/// Where connections to one [`Frontend`] go, and for which session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The holder's listener (`status.address`:`listenerPort`).
    pub to: SocketAddrV4,
    /// `namespace/name` of the session.
    pub session: String,
}

/// The node-port redirects in force at `now` on the node whose address is `node_ip`: for
/// each live exchange session (oldest first; the older keeps a frontend two sessions
/// claim, as in [`super::redirects::desired`]) and each of its listeners, the TCP Service
/// port's nodePort and its LoadBalancer ingress IPs → the holder's listener; then for each
/// mesh route of `routes` with a listener of this node's router (`routers`), the same
/// frontends → that router, which sends each request by its header (an exchange keeps a
/// frontend a mesh claims too, as in the service map). A Service port without a nodePort
/// (ClusterIP Services) adds nothing; nor does an IPv6 holder or router.
pub fn desired(
    state: &ClusterState<'_>,
    now: DateTime<Utc>,
    routes: &BTreeMap<RouteKey, Route>,
    routers: &BTreeMap<RouteKey, SocketAddr>,
) -> BTreeMap<Frontend, Entry> {
    let mut out = BTreeMap::new();
    // Most Services are reached only inside the cluster: their sessions are left out
    // before the rest are ordered.
    let reached_from_outside = |session: &KtSession| {
        session
            .metadata
            .namespace
            .as_deref()
            .and_then(|ns| state.service(ns, &session.spec.service))
            .is_some_and(|service| {
                !(service.node_ports.is_empty()
                    && service.ingress_ips.is_empty()
                    && service.external_ips.is_empty())
            })
    };
    for session in state.live_where(SessionMode::Exchange, now, reached_from_outside) {
        let (Some(ns), Some(status)) = (session.metadata.namespace.as_deref(), &session.status)
        else {
            continue;
        };
        let Some(IpAddr::V4(holder)) = status.address else {
            continue;
        };
        let Some(service) = state.service(ns, &session.spec.service) else {
            continue;
        };
        for listener in &status.listeners {
            let entry = Entry {
                to: SocketAddrV4::new(holder, listener.listener_port),
                session: session.key(),
            };
            for frontend in frontends(service, listener.port) {
                out.entry(frontend).or_insert_with(|| entry.clone());
            }
        }
    }
    for key in routes.keys() {
        let (Some(SocketAddr::V4(router)), Some(service)) = (
            routers.get(key),
            state.service(&key.namespace, &key.service),
        ) else {
            continue;
        };
        let entry = Entry {
            to: *router,
            session: key.target_name(),
        };
        for frontend in frontends(service, key.port) {
            out.entry(frontend).or_insert_with(|| entry.clone());
        }
    }
    out
}

/// Where outside clients reach TCP Service port `port` of `service`: its nodePort; per IPv4
/// LoadBalancer ingress IP, that IP and the port, from each IPv4 source range when the
/// Service has some (as kube-proxy: no IPv4 range, or a /0 among them, is no filter); per
/// IPv4 external IP, that IP and the port. None for a UDP port: an exchanged UDP port is
/// redirected for pods' sockets only (the eBPF programs), not for datagrams from outside.
fn frontends(service: &ServiceView, port: u16) -> Vec<Frontend> {
    if !service
        .ports
        .iter()
        .any(|p| p.port == port && p.transport == Some(crate::ebpf::Transport::Tcp))
    {
        return Vec::new();
    }
    let v4 = |ip: &IpAddr| match ip {
        IpAddr::V4(v4) => Some(SocketAddrV4::new(*v4, port)),
        IpAddr::V6(_) => None,
    };
    let node_port = service
        .node_ports
        .iter()
        .find(|(p, _)| *p == port)
        .map(|(_, node_port)| Frontend::NodePort(*node_port));
    // As kube-proxy: the ranges of this family; none left, or a /0 among them, is no filter.
    let ranges: Vec<Cidr> = service
        .source_ranges
        .iter()
        .filter(|range| range.network().is_ipv4())
        .copied()
        .collect();
    let sources: Option<Vec<SourceRange>> = ranges.iter().map(|r| SourceRange::of(*r)).collect();
    let sources = sources.filter(|s| !s.is_empty());
    let ingress = service
        .ingress_ips
        .iter()
        .filter_map(v4)
        .flat_map(|at| match &sources {
            None => vec![Frontend::Address(at)],
            Some(sources) => sources
                .iter()
                .map(|from| Frontend::AddressFrom(at, *from))
                .collect(),
        });
    let external = service
        .external_ips
        .iter()
        .filter_map(v4)
        .map(Frontend::Address);
    node_port
        .into_iter()
        .chain(ingress)
        .chain(external)
        .collect()
}

/// What [`TABLE`] must hold (pure, compared to skip passes that change nothing).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ruleset {
    /// Each frontend → a local address (the holder's listener on this node, or the relay
    /// to a holder on another node): a DNAT rule in `prerouting` and one in `output` each,
    /// in this order.
    pub redirects: Vec<(Frontend, SocketAddrV4)>,
}

impl Ruleset {
    /// Whether a rule DNATs to `address` (a holder's listener, a relay, a mesh router's
    /// listener); never to an IPv6 one.
    pub fn sends_to(&self, address: SocketAddr) -> bool {
        self.redirects
            .iter()
            .any(|(_, to)| SocketAddr::V4(*to) == address)
    }

    /// The same ruleset in `nft` syntax, as `nft -f` loads it, one statement per line:
    /// for the logs, and the reference the tests load with `nft` to compare with what
    /// [`netlink::encode`] makes. Without `flags owner` (an owned table would go with the
    /// `nft` process that loaded it).
    pub fn script(&self) -> String {
        let t = format!("ip {TABLE}");
        let mut s = format!(
            "add table {t}\n\
             add chain {t} prerouting {{ type nat hook prerouting priority dstnat - 10; policy accept; }}\n\
             add chain {t} output {{ type nat hook output priority -110; policy accept; }}\n\
             flush table {t}\n"
        );
        for (frontend, to) in &self.redirects {
            let matched = frontend.matched();
            for chain in ["prerouting", "output"] {
                let _ = writeln!(s, "add rule {t} {chain} {matched} dnat to {to}");
            }
        }
        s
    }
}

/// The holders' listeners among `entries` that are not on the node whose address is
/// `node_ip`: each needs a relay ([`relay::Relays::update`]). None on a node whose address
/// is IPv6: its relay could not be reached by the `ip` table's DNAT (not covered, see the
/// module's notes), so none is opened.
pub fn remote_holders(
    entries: &BTreeMap<Frontend, Entry>,
    node_ip: IpAddr,
) -> BTreeSet<SocketAddrV4> {
    if node_ip.is_ipv6() {
        return BTreeSet::new();
    }
    entries
        .values()
        .map(|entry| entry.to)
        .filter(|to| IpAddr::V4(*to.ip()) != node_ip)
        .collect()
}

/// The [`Ruleset`] that sends `entries` to their holders from the node whose address is
/// `node_ip`: straight to a holder's listener on this node, else to its relay in `relays`
/// (holder → relay); a remote holder without a relay (it could not be opened) is left out,
/// so its frontends stay with kube-proxy.
pub fn ruleset(
    entries: &BTreeMap<Frontend, Entry>,
    node_ip: IpAddr,
    relays: &BTreeMap<SocketAddrV4, SocketAddrV4>,
) -> Ruleset {
    Ruleset {
        redirects: entries
            .iter()
            .filter_map(|(frontend, entry)| {
                let to = if IpAddr::V4(*entry.to.ip()) == node_ip {
                    entry.to
                } else {
                    *relays.get(&entry.to)?
                };
                Some((*frontend, to))
            })
            .collect(),
    }
}

/// How long to wait before opening the table again after a failure; doubled after each
/// failure in a row, up to [`RETRY_MAX`].
const RETRY: Duration = Duration::from_secs(2);
const RETRY_MAX: Duration = Duration::from_secs(300);

/// What [`converge`] did.
enum Converged {
    /// The table holds this many redirects.
    Applied(usize),
    /// No redirect is wanted: the socket was closed, and the table went with it.
    Removed,
    /// No redirect is wanted and none was there.
    Nothing,
}

/// Makes [`TABLE`] hold `ruleset`: the owning socket is opened when redirects are wanted
/// and closed when none are (the kernel deletes the table it owns), so with no session
/// there is no table. Blocking: the kernel runs the transaction inside `send()`, usually
/// well under a millisecond, but it waits there for the nftables lock (kube-proxy's
/// transactions take it too) and, the first time, for modules to load.
fn converge(table: &mut Option<OwnedTable>, ruleset: &Ruleset) -> Result<Converged, NftError> {
    if ruleset.redirects.is_empty() {
        return Ok(match table.take() {
            Some(_closed) => Converged::Removed,
            None => Converged::Nothing,
        });
    }
    let owned = match table {
        Some(owned) => owned,
        None => table.insert(OwnedTable::open()?),
    };
    owned.apply(ruleset)?;
    Ok(Converged::Applied(ruleset.redirects.len()))
}

/// Keeps [`TABLE`] equal to the latest ruleset in `wanted` ([`ruleset`], [`converge`])
/// until `shutdown`, then removes it, publishing in `applied_to` what the kernel may hold
/// (while a transaction is in flight, the old and the new rules together; an empty
/// ruleset while there is no table). A failure closes the socket (the kernel deletes the
/// table with it, so nothing half-known stays) and is logged and retried with a fresh
/// socket after [`RETRY`], twice as long after each failure in a row up to [`RETRY_MAX`];
/// a new ruleset ends the wait (and, if it differs from the one that failed, the back-off
/// starts afresh). No `CAP_NET_ADMIN` or no nf_tables is said once, as NodePort traffic
/// then simply stays with kube-proxy. Never fails the agent.
pub async fn run(
    mut wanted: tokio::sync::watch::Receiver<Ruleset>,
    applied_to: tokio::sync::watch::Sender<Ruleset>,
    shutdown: CancellationToken,
) -> Result<(), std::convert::Infallible> {
    let mut table: Option<OwnedTable> = None;
    let mut applied: Option<Ruleset> = None;
    let mut said_unavailable = false;
    let mut retry = RETRY;
    loop {
        let ruleset = wanted.borrow_and_update().clone();
        if applied.as_ref() != Some(&ruleset) {
            // While the transaction is in flight either table may be in force: a relay the
            // new one sends to must not close meanwhile.
            applied_to.send_modify(|in_force| {
                in_force.redirects.extend(ruleset.redirects.iter().copied());
            });
            // Off the async workers: the table goes to a blocking thread and back.
            let mut owned = table.take();
            let for_thread = ruleset.clone();
            let converged = tokio::task::spawn_blocking(move || {
                let result = converge(&mut owned, &for_thread);
                (owned, result)
            })
            .await;
            let result = match converged {
                Ok((owned, result)) => {
                    table = owned;
                    result
                }
                Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
                // The runtime is shutting down (the socket went with the thread's task).
                Err(_) => break,
            };
            match result {
                Ok(converged) => {
                    match converged {
                        Converged::Applied(redirects) => {
                            tracing::info!(table = TABLE, redirects, "node-port redirects applied");
                            tracing::debug!(script = ruleset.script(), "node-port ruleset");
                        }
                        Converged::Removed => {
                            tracing::info!(table = TABLE, "node-port redirects removed");
                        }
                        Converged::Nothing => {}
                    }
                    applied_to.send_replace(ruleset.clone());
                    applied = Some(ruleset);
                    retry = RETRY;
                }
                Err(error) => {
                    let unavailable = match &error {
                        NftError::Unavailable(_) => true,
                        NftError::Open(e) => e.raw_os_error() == Some(libc::EPROTONOSUPPORT),
                        _ => false,
                    };
                    if !unavailable {
                        tracing::warn!(error = %kt_proto::error_chain(&error), ?retry, "failed to apply node-port redirects; retrying");
                    } else if !said_unavailable {
                        tracing::warn!(error = %kt_proto::error_chain(&error),
                            "nftables is not available to the agent (it needs CAP_NET_ADMIN and nf_tables): NodePort and LoadBalancer traffic is not redirected; retrying now and then");
                        said_unavailable = true;
                    }
                    // Closing the socket deletes the table.
                    table = None;
                    applied_to.send_replace(Ruleset::default());
                    applied = None;
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(retry) => retry = (retry * 2).min(RETRY_MAX),
                        changed = wanted.changed() => {
                            if changed.is_err() {
                                break;
                            }
                            if *wanted.borrow() != ruleset {
                                retry = RETRY;
                            }
                        }
                    }
                    continue;
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            changed = wanted.changed() => if changed.is_err() {
                break;
            },
        }
    }
    // Closing the socket deletes the table.
    drop(table);
    applied_to.send_replace(Ruleset::default());
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use k8s_openapi::api::core::v1::Service;
    use kt_proto::session::KtSession;

    fn service(name: &str, ports: serde_json::Value, ingress: &[&str]) -> Service {
        let ingress: Vec<_> = ingress.iter().map(|ip| json!({"ip": ip})).collect();
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "dev"},
            "spec": {"type": "NodePort", "clusterIP": "10.96.0.20", "ports": ports},
            "status": {"loadBalancer": {"ingress": ingress}}
        }))
        .unwrap()
    }

    fn session(
        name: &str,
        service: &str,
        created: &str,
        holder: &str,
        listeners: &[(u16, u16)],
        now: DateTime<Utc>,
    ) -> KtSession {
        let ports: Vec<_> = listeners
            .iter()
            .map(|(p, _)| json!({"port": p, "localPort": 18080}))
            .collect();
        let listeners: Vec<_> = listeners
            .iter()
            .map(|(p, l)| json!({"port": p, "listenerPort": l}))
            .collect();
        serde_json::from_value(json!({
            "apiVersion": "kt.dev/v1alpha1", "kind": "KtSession",
            "metadata": {"name": name, "namespace": "dev", "creationTimestamp": created},
            "spec": {"owner": "a@b", "mode": "exchange", "service": service,
                     "ports": ports, "publicKey": "k"},
            "status": {"node": "node-1", "address": holder,
                       "listeners": listeners, "renewTime": now}
        }))
        .unwrap()
    }

    /// Session `s` on Service `web`, port 80 held by node-2's listener 40001.
    fn held_on_node_2(now: DateTime<Utc>) -> KtSession {
        session(
            "s",
            "web",
            "2026-01-01T00:00:00Z",
            "172.30.0.12",
            &[(80, 40001)],
            now,
        )
    }

    fn to(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    #[test]
    fn only_the_exchanged_ports_node_port_and_ingress_go_to_the_holder() {
        let now = Utc::now();
        let svc = service(
            "web",
            json!([{"name": "http", "port": 80, "nodePort": 30080},
                   {"name": "admin", "port": 81, "nodePort": 30081},
                   {"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053}]),
            &["192.0.2.7"],
        );
        let s = held_on_node_2(now);
        let got = desired(
            &ClusterState::new(&[&s], &[&svc], &[]),
            now,
            &BTreeMap::new(),
            &BTreeMap::new(),
        );
        let entry = Entry {
            to: to("172.30.0.12:40001"),
            session: "dev/s".into(),
        };
        assert_eq!(
            got,
            BTreeMap::from([
                (Frontend::NodePort(30080), entry.clone()),
                (Frontend::Address(to("192.0.2.7:80")), entry),
            ]),
            "81 is not exchanged"
        );
    }

    #[test]
    fn source_ranges_ip_mode_and_external_ips_are_handled_as_kube_proxy_does() {
        let now = Utc::now();
        let with = |spec: serde_json::Value, ingress: serde_json::Value| -> Service {
            let mut spec_all = json!({"type": "LoadBalancer", "clusterIP": "10.96.0.20",
                                      "ports": [{"port": 80, "nodePort": 30080}]});
            spec_all
                .as_object_mut()
                .unwrap()
                .extend(spec.as_object().unwrap().clone());
            serde_json::from_value(json!({
                "metadata": {"name": "web", "namespace": "dev"},
                "spec": spec_all,
                "status": {"loadBalancer": {"ingress": ingress}}
            }))
            .unwrap()
        };
        let s = held_on_node_2(now);
        let frontends = |svc: &Service| -> Vec<Frontend> {
            desired(
                &ClusterState::new(&[&s], &[svc], &[]),
                now,
                &BTreeMap::new(),
                &BTreeMap::new(),
            )
            .into_keys()
            .collect()
        };
        let range = |r: &str| SourceRange::of(r.parse().unwrap()).unwrap();
        let ranged = with(
            json!({"loadBalancerSourceRanges": ["10.0.0.0/8", "fd00::/8", "198.51.100.0/24"],
                   "externalIPs": ["203.0.113.9", "2001:db8::9"]}),
            json!([{"ip": "192.0.2.7"}, {"ip": "192.0.2.8", "ipMode": "Proxy"}]),
        );
        assert_eq!(
            frontends(&ranged),
            [
                Frontend::NodePort(30080),
                // External IPs are not filtered by the LoadBalancer's source ranges.
                Frontend::Address(to("203.0.113.9:80")),
                Frontend::AddressFrom(to("192.0.2.7:80"), range("10.0.0.0/8")),
                Frontend::AddressFrom(to("192.0.2.7:80"), range("198.51.100.0/24")),
            ],
            "one rule per IPv4 range; the proxying LB's IP and IPv6 addresses are left alone"
        );
        // As kube-proxy: no range of the family left, or a /0 among them, is no filter.
        for ranges in [
            json!(["fd00::/8"]),
            json!(["10.0.0.0/8", "0.0.0.0/0"]),
            json!([]),
        ] {
            let open = with(
                json!({"loadBalancerSourceRanges": ranges}),
                json!([{"ip": "192.0.2.7"}]),
            );
            assert_eq!(
                frontends(&open),
                [
                    Frontend::NodePort(30080),
                    Frontend::Address(to("192.0.2.7:80"))
                ],
                "{ranges}"
            );
        }
        assert_eq!(SourceRange::of("fd00::/8".parse().unwrap()), None);
        assert_eq!(SourceRange::of("0.0.0.0/0".parse().unwrap()), None);
        assert_eq!(range("10.1.2.3/8").to_string(), "10.0.0.0/8");
        let rules = ruleset(
            &desired(
                &ClusterState::new(&[&s], &[&ranged], &[]),
                now,
                &BTreeMap::new(),
                &BTreeMap::new(),
            ),
            "172.30.0.12".parse().unwrap(),
            &BTreeMap::new(),
        );
        assert!(rules.script().contains(
            "add rule ip kt_nodeport prerouting ip saddr 10.0.0.0/8 ip daddr 192.0.2.7 tcp dport 80 dnat to 172.30.0.12:40001\n"
        ), "{}", rules.script());
    }

    #[test]
    fn the_older_session_keeps_a_node_port_and_expired_or_clusterip_ones_add_nothing() {
        let now = Utc::now();
        let svc = service("web", json!([{"port": 80, "nodePort": 30080}]), &[]);
        let plain: Service = serde_json::from_value(json!({
            "metadata": {"name": "plain", "namespace": "dev"},
            "spec": {"clusterIP": "10.96.0.21", "ports": [{"port": 80}]}
        }))
        .unwrap();
        let old = session(
            "alice",
            "web",
            "2026-01-01T00:00:00Z",
            "172.30.0.11",
            &[(80, 40001)],
            now,
        );
        let new = session(
            "bob",
            "web",
            "2026-01-02T00:00:00Z",
            "172.30.0.12",
            &[(80, 40002)],
            now,
        );
        let on_plain = session(
            "carol",
            "plain",
            "2026-01-01T00:00:00Z",
            "172.30.0.11",
            &[(80, 40003)],
            now,
        );
        let got = desired(
            &ClusterState::new(&[&new, &old, &on_plain], &[&svc, &plain], &[]),
            now,
            &BTreeMap::new(),
            &BTreeMap::new(),
        );
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[&Frontend::NodePort(30080)].session, "dev/alice");

        let expired = session(
            "alice",
            "web",
            "2026-01-01T00:00:00Z",
            "172.30.0.11",
            &[(80, 40001)],
            now - chrono::TimeDelta::seconds(60),
        );
        assert!(
            desired(
                &ClusterState::new(&[&expired], &[&svc], &[]),
                now,
                &BTreeMap::new(),
                &BTreeMap::new()
            )
            .is_empty()
        );
    }

    #[test]
    fn a_meshed_ports_node_port_goes_to_this_nodes_router_unless_an_exchange_holds_it() {
        let now = Utc::now();
        let svc = service(
            "web",
            json!([{"port": 80, "nodePort": 30080}, {"port": 81, "nodePort": 30081}]),
            &["192.0.2.7"],
        );
        let key = |port| RouteKey {
            namespace: "dev".into(),
            service: "web".into(),
            port,
        };
        let routes = BTreeMap::from([
            (key(80), Route::default()),
            (key(81), Route::default()),
            (key(82), Route::default()),
        ]);
        let router: SocketAddr = "172.30.0.11:45000".parse().unwrap();
        // Port 82's router could not listen: no entry for it.
        let routers = BTreeMap::from([(key(80), router), (key(81), router)]);
        let state = ClusterState::new(&[], &[&svc], &[]);
        let got = desired(&state, now, &routes, &routers);
        let mesh = Entry {
            to: to("172.30.0.11:45000"),
            session: "dev/web:mesh".into(),
        };
        assert_eq!(
            got,
            BTreeMap::from([
                (Frontend::NodePort(30080), mesh.clone()),
                (Frontend::NodePort(30081), mesh.clone()),
                (Frontend::Address(to("192.0.2.7:80")), mesh.clone()),
                (Frontend::Address(to("192.0.2.7:81")), mesh.clone()),
            ])
        );

        let exchange = session(
            "alice",
            "web",
            "2026-01-01T00:00:00Z",
            "172.30.0.12",
            &[(80, 40001)],
            now,
        );
        let sessions = [&exchange];
        let state = ClusterState::new(&sessions, &[&svc], &[]);
        let got = desired(&state, now, &routes, &routers);
        assert_eq!(got[&Frontend::NodePort(30080)].session, "dev/alice");
        assert_eq!(got[&Frontend::NodePort(30081)], mesh);
    }

    #[test]
    fn a_holder_on_another_node_is_reached_through_its_relay() {
        let node: IpAddr = "172.30.0.11".parse().unwrap();
        let entry = |at: &str, session: &str| Entry {
            to: to(at),
            session: session.into(),
        };
        let entries = BTreeMap::from([
            (
                Frontend::NodePort(30080),
                entry("172.30.0.11:40001", "dev/a"),
            ),
            (
                Frontend::NodePort(30090),
                entry("172.30.0.12:40002", "dev/b"),
            ),
            (
                Frontend::Address(to("192.0.2.7:90")),
                entry("172.30.0.12:40002", "dev/b"),
            ),
            (
                Frontend::NodePort(30100),
                entry("172.30.0.13:40003", "dev/c"),
            ),
        ]);
        assert_eq!(
            remote_holders(&entries, node),
            BTreeSet::from([to("172.30.0.12:40002"), to("172.30.0.13:40003")]),
            "each remote holder once; the local one needs no relay"
        );
        assert_eq!(
            remote_holders(&entries, "fd00::11".parse().unwrap()),
            BTreeSet::new(),
            "an IPv6 node opens no relay"
        );
        // 172.30.0.13's relay could not be opened.
        let relays = BTreeMap::from([(to("172.30.0.12:40002"), to("172.30.0.11:45000"))]);
        let got = ruleset(&entries, node, &relays);
        assert_eq!(
            got,
            Ruleset {
                redirects: vec![
                    (Frontend::NodePort(30080), to("172.30.0.11:40001")),
                    (Frontend::NodePort(30090), to("172.30.0.11:45000")),
                    (
                        Frontend::Address(to("192.0.2.7:90")),
                        to("172.30.0.11:45000")
                    ),
                ],
            },
            "local holder direct, remote holder through its relay, no relay no rule"
        );
        let s = got.script();
        assert!(s.starts_with("add table ip kt_nodeport\n"), "{s}");
        assert!(s.contains("priority dstnat - 10"), "before kube-proxy: {s}");
        assert!(s.contains("\nflush table ip kt_nodeport\n"), "{s}");
        assert!(
            !s.contains("postrouting"),
            "nothing is forwarded, nothing masqueraded: {s}"
        );
        for chain in ["prerouting", "output"] {
            assert!(s.contains(&format!(
                "add rule ip kt_nodeport {chain} fib daddr type local tcp dport 30080 dnat to 172.30.0.11:40001\n"
            )), "{s}");
        }
        assert!(s.ends_with("add rule ip kt_nodeport output ip daddr 192.0.2.7 tcp dport 90 dnat to 172.30.0.11:45000\n"), "{s}");
        assert_eq!(
            ruleset(&BTreeMap::new(), node, &BTreeMap::new()),
            Ruleset::default()
        );
    }
}
