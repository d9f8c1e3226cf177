//! What every agent's service map should hold, from the cluster's state alone (no I/O):
//! for each session whose lease is in force, the Service's ClusterIP:port **and every ready
//! endpoint IP:port behind it** → where that traffic goes. Clients that dial endpoints
//! directly (ingress controllers, headless clients) are redirected as well as those that go
//! through the ClusterIP.
//!
//! - An `exchange` session's addresses go to the holding agent's listener (`status.address`:
//!   `listenerPort`): its TCP ports' to `status.listeners`, its UDP ports' (`spec.udpPorts`)
//!   to `status.udpListeners`, each under its own transport, so that exchanging one leaves
//!   the other on the same number with the pods.
//! - A `mesh` session's addresses go to **this node's** router for that Service port
//!   ([`super::mesh`]), which sends each request on by its header: no cross-node hop for the
//!   requests that stay with the pods.

use std::{
    borrow::Cow,
    cell::OnceCell,
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
};

use chrono::{DateTime, Utc};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kt_proto::session::{KtSession, SessionMode};

use super::{
    index::{Index, ServiceView, SliceView},
    kept::PerSession,
    mesh::{Route, RouteKey},
};
use crate::ebpf::{ServiceKey, Transport};

/// Where connects to one address go, and which session (or mesh route) and Service port that
/// is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub to: SocketAddr,
    /// `namespace/name` of the session, or `namespace/service:mesh` for a mesh route.
    pub session: String,
    /// The Service port the entry stands for.
    pub port: u16,
    pub mode: SessionMode,
}

/// The cluster objects the map is computed from: the sessions, and the Services and their
/// EndpointSlices by Service ([`Index`]), so that a session's lookup costs what its Service
/// has, not the cluster's size (issue 17). The agent keeps its index from watch events and
/// lends it to each pass; [`ClusterState::new`] builds one from whole objects.
pub struct ClusterState<'a> {
    pub sessions: &'a [&'a KtSession],
    index: Cow<'a, Index>,
    /// Per session (in the order of `sessions`), what its part of the map is made of
    /// ([`ClusterState::inputs`]): computed once, when first needed, or given.
    inputs: OnceCell<Vec<u64>>,
}

impl<'a> ClusterState<'a> {
    /// The state of `sessions`, `services` and `slices`, indexed by Service (O(Services +
    /// slices); the agent uses [`ClusterState::indexed`]).
    pub fn new(
        sessions: &'a [&'a KtSession],
        services: &[&Service],
        slices: &[&EndpointSlice],
    ) -> Self {
        Self {
            sessions,
            index: Cow::Owned(Index::of(services, slices)),
            inputs: OnceCell::new(),
        }
    }

    /// The state of `sessions` over an index kept elsewhere (O(1)).
    pub fn indexed(sessions: &'a [&'a KtSession], index: &'a Index) -> Self {
        Self {
            sessions,
            index: Cow::Borrowed(index),
            inputs: OnceCell::new(),
        }
    }

    /// [`ClusterState::indexed`], with what each session's part is made of taken from
    /// `kept` for the sessions that did not change since it last saw them: what the agent's
    /// passes use (O(sessions), a lookup each).
    pub fn indexed_kept(
        sessions: &'a [&'a KtSession],
        index: &'a Index,
        kept: &mut KeptHashes,
    ) -> Self {
        Self {
            sessions,
            index: Cow::Borrowed(index),
            inputs: OnceCell::from(kept.inputs(sessions, index)),
        }
    }

    /// Per session, in the order of `sessions`, a hash of what its part of the map is made
    /// of (see [`fingerprint`]), its lease aside: the session's own fields and its
    /// Service's [`Index::revision_of`].
    pub(super) fn inputs(&self) -> &[u64] {
        self.inputs.get_or_init(|| {
            self.sessions
                .iter()
                .map(|session| with_revision(&self.index, object_hash(session), session))
                .collect()
        })
    }

    /// The Service `namespace/name`.
    pub(super) fn service(&self, namespace: &str, name: &str) -> Option<&ServiceView> {
        self.index.service(namespace, name)
    }

    /// The EndpointSlices of the Service `namespace/name`.
    pub(super) fn slices_of(&self, namespace: &str, name: &str) -> Vec<&SliceView> {
        self.index.slices(namespace, name).collect()
    }

    /// The names of the EndpointSlices of the Service `namespace/name`, in order.
    pub fn slice_names(&self, namespace: &str, name: &str) -> Vec<&str> {
        self.index.slice_names(namespace, name)
    }

    /// The live sessions of `mode`, oldest first (by creation, then name, then namespace):
    /// not being deleted, lease in force at `now`.
    pub(super) fn live(&self, mode: SessionMode, now: DateTime<Utc>) -> Vec<&'a KtSession> {
        self.live_where(mode, now, |_| true)
    }

    /// [`ClusterState::live`], of the sessions `keep` picks (picked before they are
    /// ordered: a pass that needs a few of 1 000 sessions sorts those few).
    pub(super) fn live_where(
        &self,
        mode: SessionMode,
        now: DateTime<Utc>,
        keep: impl Fn(&KtSession) -> bool,
    ) -> Vec<&'a KtSession> {
        let mut live: Vec<&KtSession> = self
            .sessions
            .iter()
            .copied()
            .filter(|s| s.spec.mode == mode)
            .filter(|s| s.metadata.deletion_timestamp.is_none())
            .filter(|s| s.lease_live(now))
            .filter(|s| keep(s))
            .collect();
        // The namespace settles a tie of two sessions created in the same second under one
        // name: the sessions come in no set order, and the order decides claims.
        fn rank(
            s: &KtSession,
        ) -> (
            Option<k8s_openapi::jiff::Timestamp>,
            Option<&str>,
            Option<&str>,
        ) {
            let meta = &s.metadata;
            (
                meta.creation_timestamp.as_ref().map(|t| t.0),
                meta.name.as_deref(),
                meta.namespace.as_deref(),
            )
        }
        live.sort_by(|a, b| rank(a).cmp(&rank(b)));
        live
    }
}

/// A fingerprint of everything [`desired`], [`super::mesh::routes`] and
/// [`super::node_ports::desired`] read of `state` at `now`: equal fingerprints give equal
/// results, so a pass whose fingerprint is the last pass's keeps what that pass programmed.
/// Per session: uid, namespace, name, creation time (the order claims are settled by),
/// whether it is being deleted, its whole spec, `status.node`, `status.address`,
/// `status.listeners` and `status.udpListeners`, whether its lease is live at `now`, and its Service's
/// [`Index::revision_of`]. Not `renewTime` itself nor `status.programmed`: renewals and
/// acknowledgements, most of the writes while sessions are held, change nothing here; nor
/// a change to any other Service. Costs a hash per session, where computing the results
/// costs lookups and allocations per address (issue 17: 1 000 sessions).
pub fn fingerprint(state: &ClusterState<'_>, now: DateTime<Utc>) -> u64 {
    use std::hash::{DefaultHasher, Hash as _, Hasher as _};
    // The sessions come in no set order: their hashes are summed.
    let mut sum: u64 = 0;
    for (session, inputs) in state.sessions.iter().zip(state.inputs()) {
        let mut h = DefaultHasher::new();
        (inputs, session.lease_live(now)).hash(&mut h);
        sum = sum.wrapping_add(h.finish());
    }
    let mut h = DefaultHasher::new();
    (state.sessions.len(), sum).hash(&mut h);
    h.finish()
}

/// A hash of the fields of `session` its part of the map is made of (see [`fingerprint`]).
fn object_hash(session: &KtSession) -> u64 {
    use std::hash::{DefaultHasher, Hash as _, Hasher as _};
    let mut h = DefaultHasher::new();
    let meta = &session.metadata;
    (
        meta.uid.as_deref(),
        meta.namespace.as_deref(),
        meta.name.as_deref(),
    )
        .hash(&mut h);
    meta.creation_timestamp.as_ref().map(|t| t.0).hash(&mut h);
    meta.deletion_timestamp.is_some().hash(&mut h);
    session.spec.hash(&mut h);
    session
        .status
        .as_ref()
        .map(|s| (&s.node, s.address, &s.listeners, &s.udp_listeners))
        .hash(&mut h);
    h.finish()
}

/// `object`, the [`object_hash`] of `session`, with its Service's revision in `index`.
fn with_revision(index: &Index, object: u64, session: &KtSession) -> u64 {
    use std::hash::{DefaultHasher, Hash as _, Hasher as _};
    let namespace = session.metadata.namespace.as_deref().unwrap_or_default();
    let mut h = DefaultHasher::new();
    (object, index.revision_of(namespace, &session.spec.service)).hash(&mut h);
    h.finish()
}

/// Each session's [`ClusterState::inputs`] kept from pass to pass ([`PerSession`]: same
/// object, same `resourceVersion`): hashing every session's spec and status, and looking
/// its Service up in the index, on every pass was most of a pass with 1 000 sessions (the
/// `reconcile` and `agent_scale` benchmarks, issue 17). Use it with one index, changed in
/// place (the agent's): a Service's revision is looked up again only when the index's
/// [`Index::revision`] moved.
#[derive(Debug, Default)]
pub struct KeptHashes(PerSession<(), KeptHash>);

/// One session's hashes.
#[derive(Debug)]
struct KeptHash {
    /// [`object_hash`] of the session.
    object: u64,
    /// The [`Index::revision`] `input` was computed at.
    at: u64,
    /// [`with_revision`] of `object`.
    input: u64,
}

impl KeptHashes {
    /// [`ClusterState::inputs`] of `sessions` with `index`, in their order: kept where the
    /// session is as it was, the Service's revision looked up again where the index
    /// changed, computed (and kept) otherwise.
    fn inputs(&mut self, sessions: &[&KtSession], index: &Index) -> Vec<u64> {
        self.0.start_pass();
        let at = index.revision();
        let out = sessions
            .iter()
            .map(|session| {
                if let Some(kept) = self.0.kept_mut(session, |()| true) {
                    if kept.at != at {
                        kept.input = with_revision(index, kept.object, session);
                        kept.at = at;
                    }
                    return kept.input;
                }
                let object = object_hash(session);
                let input = with_revision(index, object, session);
                self.0
                    .keep(session, (), KeptHash { object, at, input }, true);
                input
            })
            .collect();
        self.0.forget_unseen();
        out
    }
}

/// What a session's entries must point at for its ports to count as programmed, and the
/// addresses each of its Service ports wanted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Claim {
    /// The [`Target::session`] of its entries.
    pub(super) target: String,
    /// Per Service port and transport, the map keys it wanted.
    pub(super) ports: BTreeMap<(Transport, u16), Vec<ServiceKey>>,
}

impl Claim {
    /// The ports of this claim programmed in `map`: every address the port wanted goes to
    /// the claim's target, and there is at least one.
    pub(super) fn programmed_in(&self, map: &BTreeMap<ServiceKey, Target>) -> PortsDone {
        let mut done = PortsDone::default();
        for ((transport, port), keys) in &self.ports {
            let all_here = !keys.is_empty()
                && keys
                    .iter()
                    .all(|k| map.get(k).is_some_and(|t| t.session == self.target));
            if all_here {
                match transport {
                    Transport::Tcp => done.tcp.insert(*port),
                    Transport::Udp => done.udp.insert(*port),
                };
            }
        }
        done
    }
}

/// The redirects in force, and what each session asked for.
#[derive(Debug, Default)]
pub struct Desired {
    /// What the service map should hold.
    pub map: BTreeMap<ServiceKey, Target>,
    /// Per session (`namespace/name`).
    claims: BTreeMap<String, Claim>,
}

/// The Service ports programmed for one session, by transport.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortsDone {
    pub tcp: BTreeSet<u16>,
    pub udp: BTreeSet<u16>,
}

impl PortsDone {
    /// Whether no port of either transport is programmed.
    pub fn is_empty(&self) -> bool {
        self.tcp.is_empty() && self.udp.is_empty()
    }
}

impl Desired {
    /// Per session, the Service ports programmed for it: every address the port wanted goes
    /// to this session (or its mesh route) — an address an older session holds, a second
    /// Service over the same pods, does not count — and there is at least one.
    pub fn programmed_ports(&self) -> BTreeMap<&str, PortsDone> {
        self.claims
            .iter()
            .map(|(session, claim)| (session.as_str(), claim.programmed_in(&self.map)))
            .collect()
    }
}

/// Adds to `claims` (by session, `namespace/name`) what each session of the mesh route
/// `key` wants: its port's addresses, each to the route's [`RouteKey::target_name`] (a
/// session's routes are all of its one Service, so they share that name).
pub(super) fn claim_route(claims: &mut BTreeMap<String, Claim>, key: &RouteKey, route: &Route) {
    for session in &route.sessions {
        let claim = claims
            .entry(session.session.clone())
            .or_insert_with(|| Claim {
                target: key.target_name(),
                ports: BTreeMap::new(),
            });
        claim.ports.insert(
            (Transport::Tcp, key.port),
            route
                .addresses
                .iter()
                .copied()
                .map(ServiceKey::tcp)
                .collect(),
        );
    }
}

/// The redirects in force at `now`: the mesh `routes`, each to this node's router for it
/// (`routers`; a route without a router is left out), then the exchange sessions. When two
/// live sessions claim one address, the older exchange wins, and an exchange wins over a
/// mesh (ktctl refuses both; this only settles races and Services that share pods).
pub fn desired(
    state: &ClusterState<'_>,
    now: DateTime<Utc>,
    routes: &BTreeMap<RouteKey, Route>,
    routers: &BTreeMap<RouteKey, SocketAddr>,
) -> Desired {
    let mut out = Desired::default();
    for (key, route) in routes {
        let Some(router) = routers.get(key) else {
            continue;
        };
        let target = key.target_name();
        claim_route(&mut out.claims, key, route);
        for address in &route.addresses {
            out.map.insert(
                ServiceKey::tcp(*address),
                Target {
                    to: *router,
                    session: target.clone(),
                    port: key.port,
                    mode: SessionMode::Mesh,
                },
            );
        }
    }
    let live = state.live(SessionMode::Exchange, now);
    for session in live.iter().rev() {
        // Reverse order with overwrite: the oldest session's entries are written last.
        let Some(part) = exchange_part(state, session) else {
            continue;
        };
        out.map.extend(part.entries);
        out.claims.insert(part.claim.target.clone(), part.claim);
    }
    out
}

/// One exchange session's part of the map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct ExchangePart {
    /// Its claim; the target is the session's `namespace/name`.
    pub(super) claim: Claim,
    /// The entries it wants, in the order it writes them: of two for one address (two
    /// Service ports on one targetPort), the later stands.
    pub(super) entries: Vec<(ServiceKey, Target)>,
}

/// What the exchange session `session` wants of the map, whether or not it is live: `None`
/// when it wants nothing (no namespace, no such Service, no holder's address yet). A port
/// the Service does not have is claimed with no address (never programmed).
pub(super) fn exchange_part(state: &ClusterState<'_>, session: &KtSession) -> Option<ExchangePart> {
    let ns = session.metadata.namespace.as_deref()?;
    let service = state.service(ns, &session.spec.service)?;
    let status = session.status.as_ref()?;
    let holder = status.address?;
    let key = session.key();
    let slices = state.slices_of(ns, &session.spec.service);
    let mut claim = Claim {
        target: key.clone(),
        ports: BTreeMap::new(),
    };
    let mut entries = Vec::new();
    let listeners = (status.listeners.iter().map(|l| (Transport::Tcp, l)))
        .chain(status.udp_listeners.iter().map(|l| (Transport::Udp, l)));
    for (transport, listener) in listeners {
        let to = SocketAddr::new(holder, listener.listener_port);
        let wanted = claim.ports.entry((transport, listener.port)).or_default();
        let Some(addresses) = addresses_of(service, &slices, listener.port, transport) else {
            continue;
        };
        let all = addresses.all();
        wanted.extend(all.iter().map(|a| ServiceKey::new(*a, transport)));
        for address in all {
            entries.push((
                ServiceKey::new(address, transport),
                Target {
                    to,
                    session: key.clone(),
                    port: listener.port,
                    mode: SessionMode::Exchange,
                },
            ));
        }
    }
    Some(ExchangePart { claim, entries })
}

/// The first moment after `now` at which a live session's lease runs out: the map must be
/// recomputed then, not a check interval later.
pub fn next_expiry(sessions: &[&KtSession], now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    sessions
        .iter()
        .filter_map(|s| s.lease_end())
        .filter(|end| *end >= now)
        .min()
}

/// The addresses clients dial for one Service port.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct PortAddresses {
    /// Every ClusterIP with the Service port.
    pub cluster: Vec<SocketAddr>,
    /// Every ready endpoint with its port (the targetPort as the EndpointSlice says).
    pub endpoints: Vec<SocketAddr>,
}

impl PortAddresses {
    pub(super) fn all(&self) -> Vec<SocketAddr> {
        self.cluster
            .iter()
            .chain(&self.endpoints)
            .copied()
            .collect()
    }
}

/// The addresses of `service`'s `transport` port `port` (kt-proto's contract: a session's
/// `ports` are TCP Service ports, its `udpPorts` UDP ones), `None` when the Service has no
/// such port. Its endpoints are the EndpointSlice ports of the same name and protocol, an
/// unnamed Service port matching the slice port named `""` (what the EndpointSlice
/// controller writes for it).
pub(super) fn addresses_of(
    service: &ServiceView,
    slices: &[&SliceView],
    port: u16,
    transport: Transport,
) -> Option<PortAddresses> {
    let service_port = service
        .ports
        .iter()
        .find(|p| p.port == port && p.transport == Some(transport))?;
    let mut out = PortAddresses {
        cluster: service
            .cluster_ips
            .iter()
            .map(|ip| SocketAddr::new(*ip, port))
            .collect(),
        endpoints: Vec::new(),
    };
    for slice in slices {
        let Some(endpoint_port) = slice
            .ports
            .iter()
            .find(|p| p.name == service_port.name && p.transport == Some(transport))
            .map(|p| p.port)
        else {
            continue;
        };
        out.endpoints.extend(
            slice
                .ready
                .iter()
                .map(|ip| SocketAddr::new(*ip, endpoint_port)),
        );
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn service() -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "dev"},
            "spec": {"clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20"],
                     "ports": [{"name": "http", "port": 80, "targetPort": "http"},
                               {"name": "admin", "port": 81, "targetPort": 9001}]}
        }))
        .unwrap()
    }

    fn slice() -> EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {"name": "web-x", "namespace": "dev",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                      {"name": "admin", "port": 9001, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": ["10.244.1.5"], "conditions": {"ready": true}},
                {"addresses": ["10.244.2.7"], "conditions": {"ready": true}},
                {"addresses": ["10.244.2.9"], "conditions": {"ready": false}}
            ]
        }))
        .unwrap()
    }

    fn session(name: &str, created: &str, renewed: DateTime<Utc>) -> KtSession {
        serde_json::from_value(json!({
            "apiVersion": "kt.dev/v1alpha1", "kind": "KtSession",
            "metadata": {"name": name, "namespace": "dev", "creationTimestamp": created},
            "spec": {"owner": name, "mode": "exchange", "service": "web",
                     "ports": [{"port": 80, "localPort": 8080}], "publicKey": "k"},
            "status": {"node": "node-1", "address": "172.30.0.11",
                       "listeners": [{"port": 80, "listenerPort": 40001}],
                       "renewTime": renewed}
        }))
        .unwrap()
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_fingerprint_changes_with_what_the_map_is_made_of_and_not_with_renewals_or_acks() {
        let now = Utc::now();
        let (svc, slice) = (service(), slice());
        let alice = session("alice", "2026-01-01T00:00:00Z", now);
        let bob = session("bob", "2026-01-02T00:00:00Z", now);
        let mut index = Index::of(&[&svc], &[&slice]);
        let of = |sessions: &[&KtSession], index: &Index, at: DateTime<Utc>| {
            fingerprint(&ClusterState::indexed(sessions, index), at)
        };
        let base = of(&[&alice, &bob], &index, now);
        assert_eq!(of(&[&bob, &alice], &index, now), base, "in any order");

        let mut renewed = alice.clone();
        renewed.status.as_mut().unwrap().renew_time = Some(now + chrono::TimeDelta::seconds(3));
        renewed.status.as_mut().unwrap().programmed.insert(
            "node-2".into(),
            kt_proto::session::Programmed {
                holder: "x".into(),
                ports: vec![80],
                udp_ports: Some(Vec::new()),
            },
        );
        renewed.metadata.resource_version = Some("99".into());
        assert_eq!(
            of(&[&renewed, &bob], &index, now),
            base,
            "a renewal and an ack change nothing"
        );

        let mut changed = Vec::new();
        let mut moved = alice.clone();
        moved.status.as_mut().unwrap().listeners[0].listener_port = 40002;
        changed.push(("another listener", of(&[&moved, &bob], &index, now)));
        let mut other_port = alice.clone();
        other_port.spec.ports[0].local_port = 9090;
        changed.push(("the spec", of(&[&other_port, &bob], &index, now)));
        let mut deleting = alice.clone();
        deleting.metadata.deletion_timestamp =
            Some(serde_json::from_value(json!("2026-01-03T00:00:00Z")).unwrap());
        changed.push(("being deleted", of(&[&deleting, &bob], &index, now)));
        changed.push(("a session gone", of(&[&bob], &index, now)));
        // The 10 s default lease of both has run out by then.
        changed.push((
            "the leases ran out",
            of(
                &[&alice, &bob],
                &index,
                now + chrono::TimeDelta::seconds(60),
            ),
        ));
        let mut other_slice = slice.clone();
        other_slice.metadata.name = Some("web-y".into());
        index.apply_slice(super::super::index::Change::Applied(
            ("dev".into(), "web-y".into()),
            SliceView::from(&other_slice),
        ));
        changed.push(("a slice of the Service", of(&[&alice, &bob], &index, now)));
        for (what, fingerprint) in &changed {
            assert_ne!(*fingerprint, base, "{what}");
        }
        let after_slice = changed.last().unwrap().1;
        let mut unrelated = slice.clone();
        unrelated.metadata.name = Some("other-x".into());
        unrelated.metadata.labels =
            Some([("kubernetes.io/service-name".to_owned(), "other".to_owned())].into());
        index.apply_slice(super::super::index::Change::Applied(
            ("dev".into(), "other-x".into()),
            SliceView::from(&unrelated),
        ));
        assert_eq!(
            of(&[&alice, &bob], &index, now),
            after_slice,
            "another Service's slice changes nothing"
        );
    }

    #[test]
    fn cluster_ip_and_ready_endpoints_go_to_the_holders_listener() {
        let now = Utc::now();
        let (svc, slice, s) = (
            service(),
            slice(),
            session("alice", "2026-01-01T00:00:00Z", now),
        );
        let state_of = (&[&s], &[&svc], &[&slice]);
        let state = ClusterState::new(state_of.0, state_of.1, state_of.2);
        let map = desired(&state, now, &BTreeMap::new(), &BTreeMap::new()).map;
        let listener = addr("172.30.0.11:40001");
        let keys: Vec<SocketAddr> = map.keys().map(|k| k.addr).collect();
        assert_eq!(
            keys,
            [
                addr("10.96.0.20:80"),
                addr("10.244.1.5:8080"),
                addr("10.244.2.7:8080")
            ],
            "port 81 is not exchanged; the unready endpoint is left alone"
        );
        assert!(
            map.values()
                .all(|t| t.to == listener && t.session == "dev/alice")
        );
    }

    /// `session` of `service` held with one listener per (Service port, listener port).
    fn holding(service: &str, listeners: &[(u16, u16)], now: DateTime<Utc>) -> KtSession {
        let listeners: Vec<serde_json::Value> = listeners
            .iter()
            .map(|(port, listener)| json!({"port": port, "listenerPort": listener}))
            .collect();
        let ports: Vec<serde_json::Value> = listeners
            .iter()
            .map(|l| json!({"port": l["port"], "localPort": 18080}))
            .collect();
        serde_json::from_value(json!({
            "apiVersion": "kt.dev/v1alpha1", "kind": "KtSession",
            "metadata": {"name": "s", "namespace": "dev", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"owner": "a@b", "mode": "exchange", "service": service,
                     "ports": ports, "publicKey": "k"},
            "status": {"node": "node-1", "address": "172.30.0.11",
                       "listeners": listeners, "renewTime": now}
        }))
        .unwrap()
    }

    fn object<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> T {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn an_unnamed_port_matches_the_slice_port_named_empty() {
        let now = Utc::now();
        let svc: Service = object(json!({
            "metadata": {"name": "web", "namespace": "dev"},
            "spec": {"clusterIP": "10.96.0.20", "ports": [{"port": 80, "targetPort": 8080}]}
        }));
        // The EndpointSlice controller writes `name: ""` for an unnamed Service port.
        let slice: EndpointSlice = object(json!({
            "metadata": {"name": "web-x", "namespace": "dev",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["10.244.1.5"], "conditions": {"ready": true}}]
        }));
        let s = holding("web", &[(80, 40001)], now);
        let wanted = desired(
            &ClusterState::new(&[&s], &[&svc], &[&slice]),
            now,
            &BTreeMap::new(),
            &BTreeMap::new(),
        );
        assert_eq!(
            wanted.map.keys().copied().collect::<Vec<_>>(),
            [
                ServiceKey::tcp(addr("10.96.0.20:80")),
                ServiceKey::tcp(addr("10.244.1.5:8080"))
            ]
        );
        assert_eq!(
            wanted.programmed_ports(),
            BTreeMap::from([(
                "dev/s",
                PortsDone {
                    tcp: BTreeSet::from([80]),
                    udp: BTreeSet::new()
                }
            )])
        );
    }

    #[test]
    fn a_port_whose_pods_an_older_session_holds_is_not_programmed_for_the_newer_one() {
        let now = Utc::now();
        // `web` and `web-internal` select the same pods; alice holds web, bob exchanges
        // web-internal afterwards: the pod's address stays alice's.
        let svc = |name: &str, ip: &str| -> Service {
            object(json!({"metadata": {"name": name, "namespace": "dev"},
                          "spec": {"clusterIP": ip, "ports": [{"port": 80, "targetPort": 8080}]}}))
        };
        let slice = |service: &str| -> EndpointSlice {
            object(
                json!({"metadata": {"name": format!("{service}-x"), "namespace": "dev",
                                       "labels": {"kubernetes.io/service-name": service}},
                          "addressType": "IPv4", "ports": [{"name": "", "port": 8080}],
                          "endpoints": [{"addresses": ["10.244.1.5"]}]}),
            )
        };
        let (web, internal) = (svc("web", "10.96.0.20"), svc("web-internal", "10.96.0.21"));
        let (web_slice, internal_slice) = (slice("web"), slice("web-internal"));
        let mut alice = holding("web", &[(80, 40001)], now);
        alice.metadata.name = Some("alice".into());
        let mut bob = holding("web-internal", &[(80, 40002)], now);
        bob.metadata.name = Some("bob".into());
        bob.metadata.creation_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                "2026-01-02T00:00:00Z".parse().unwrap(),
            ));
        let wanted = desired(
            &ClusterState::new(
                &[&bob, &alice],
                &[&web, &internal],
                &[&web_slice, &internal_slice],
            ),
            now,
            &BTreeMap::new(),
            &BTreeMap::new(),
        );
        let session_of = |a: &str| wanted.map[&ServiceKey::tcp(addr(a))].session.as_str();
        assert_eq!(session_of("10.244.1.5:8080"), "dev/alice");
        assert_eq!(session_of("10.96.0.21:80"), "dev/bob");
        let ports = wanted.programmed_ports();
        assert_eq!(ports["dev/alice"].tcp, BTreeSet::from([80]));
        assert!(
            ports["dev/bob"].tcp.is_empty(),
            "bob's pod address goes to alice"
        );
    }

    #[test]
    fn a_session_port_is_the_tcp_port_of_that_number() {
        let now = Utc::now();
        let svc: Service = object(json!({
            "metadata": {"name": "mixed", "namespace": "dev"},
            "spec": {"clusterIP": "10.96.0.30", "ports": [
                {"name": "dns-udp", "port": 53, "targetPort": 5353, "protocol": "UDP"},
                {"name": "dns-tcp", "port": 53, "targetPort": 5353, "protocol": "TCP"}]}
        }));
        let slice: EndpointSlice = object(json!({
            "metadata": {"name": "mixed-x", "namespace": "dev",
                         "labels": {"kubernetes.io/service-name": "mixed"}},
            "addressType": "IPv4",
            "ports": [{"name": "dns-udp", "port": 5353, "protocol": "UDP"},
                      {"name": "dns-tcp", "port": 5353, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["10.244.1.9"]}]
        }));
        let s = holding("mixed", &[(53, 40001)], now);
        let map = desired(
            &ClusterState::new(&[&s], &[&svc], &[&slice]),
            now,
            &BTreeMap::new(),
            &BTreeMap::new(),
        )
        .map;
        assert_eq!(
            map.keys().copied().collect::<Vec<_>>(),
            [
                ServiceKey::tcp(addr("10.96.0.30:53")),
                ServiceKey::tcp(addr("10.244.1.9:5353"))
            ],
            "the TCP port is redirected although the UDP one is listed first"
        );

        // The UDP port too (`spec.udpPorts`, `status.udpListeners`): each transport's
        // addresses to its own listener, each programmed on its own.
        let mut both = s.clone();
        both.spec.udp_ports = both.spec.ports.clone();
        both.status.as_mut().unwrap().udp_listeners = vec![kt_proto::session::Listener {
            port: 53,
            listener_port: 40002,
        }];
        let wanted = desired(
            &ClusterState::new(&[&both], &[&svc], &[&slice]),
            now,
            &BTreeMap::new(),
            &BTreeMap::new(),
        );
        let to = |key: ServiceKey| wanted.map[&key].to.port();
        assert_eq!(to(ServiceKey::tcp(addr("10.96.0.30:53"))), 40001);
        assert_eq!(to(ServiceKey::udp(addr("10.96.0.30:53"))), 40002);
        assert_eq!(to(ServiceKey::udp(addr("10.244.1.9:5353"))), 40002);
        assert_eq!(wanted.map.len(), 4);
        let done = &wanted.programmed_ports()["dev/s"];
        assert_eq!(
            (&done.tcp, &done.udp),
            (&BTreeSet::from([53]), &BTreeSet::from([53]))
        );
    }

    #[test]
    fn two_service_ports_on_one_target_port_share_the_endpoint_entry() {
        let now = Utc::now();
        let svc: Service = object(json!({
            "metadata": {"name": "api", "namespace": "dev"},
            "spec": {"clusterIP": "10.96.0.40", "ports": [
                {"name": "http", "port": 80, "targetPort": 8080},
                {"name": "http-alt", "port": 8080, "targetPort": 8080},
                {"name": "admin", "port": 9090}]}
        }));
        let slice: EndpointSlice = object(json!({
            "metadata": {"name": "api-x", "namespace": "dev",
                         "labels": {"kubernetes.io/service-name": "api"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}, {"name": "http-alt", "port": 8080},
                      {"name": "admin", "port": 9090}],
            "endpoints": [{"addresses": ["10.244.2.3"]}]
        }));
        let s = holding("api", &[(80, 40001), (8080, 40002)], now);
        let map = desired(
            &ClusterState::new(&[&s], &[&svc], &[&slice]),
            now,
            &BTreeMap::new(),
            &BTreeMap::new(),
        )
        .map;
        assert_eq!(
            map.keys().map(|k| k.addr).collect::<Vec<_>>(),
            [
                addr("10.96.0.40:80"),
                addr("10.96.0.40:8080"),
                addr("10.244.2.3:8080")
            ],
            "admin (9090) is not exchanged"
        );
        assert_eq!(
            map[&ServiceKey::tcp(addr("10.96.0.40:8080"))].to,
            addr("172.30.0.11:40002")
        );
    }

    #[test]
    fn an_expired_lease_leaves_nothing() {
        let now = Utc::now();
        let stale = session(
            "alice",
            "2026-01-01T00:00:00Z",
            now - chrono::TimeDelta::seconds(11),
        );
        let (svc, slice) = (service(), slice());
        let state_of = (&[&stale], &[&svc], &[&slice]);
        let state = ClusterState::new(state_of.0, state_of.1, state_of.2);
        assert!(
            desired(&state, now, &BTreeMap::new(), &BTreeMap::new())
                .map
                .is_empty()
        );
    }

    #[test]
    fn the_older_of_two_sessions_wins() {
        let now = Utc::now();
        let old = session("alice", "2026-01-01T00:00:00Z", now);
        let mut new = session("bob", "2026-01-02T00:00:00Z", now);
        new.status.as_mut().unwrap().listeners[0].listener_port = 40002;
        let (svc, slice) = (service(), slice());
        let state_of = (&[&new, &old], &[&svc], &[&slice]);
        let state = ClusterState::new(state_of.0, state_of.1, state_of.2);
        let map = desired(&state, now, &BTreeMap::new(), &BTreeMap::new()).map;
        assert!(map.values().all(|t| t.session == "dev/alice"), "{map:?}");
    }

    #[test]
    fn the_next_expiry_is_the_earliest_lease_end_to_come() {
        let now = Utc::now();
        let soon = session(
            "a",
            "2026-01-01T00:00:00Z",
            now - chrono::TimeDelta::seconds(7),
        );
        let later = session(
            "b",
            "2026-01-01T00:00:00Z",
            now - chrono::TimeDelta::seconds(2),
        );
        let gone = session(
            "c",
            "2026-01-01T00:00:00Z",
            now - chrono::TimeDelta::seconds(30),
        );
        let end = next_expiry(&[&later, &gone, &soon], now).unwrap();
        let in_three = now + chrono::TimeDelta::seconds(3);
        assert!(
            (end - in_three).num_milliseconds().abs() <= 1,
            "{end} vs {in_three}"
        );
        assert_eq!(next_expiry(&[&gone], now), None);
    }

    #[test]
    fn a_missing_service_or_unheld_session_leaves_nothing() {
        let now = Utc::now();
        let mut unheld = session("alice", "2026-01-01T00:00:00Z", now);
        unheld.status = None;
        let slice = slice();
        let svc = service();
        assert!(
            desired(
                &ClusterState::new(&[&unheld], &[&svc], &[&slice]),
                now,
                &BTreeMap::new(),
                &BTreeMap::new()
            )
            .map
            .is_empty()
        );
        let held = session("alice", "2026-01-01T00:00:00Z", now);
        assert!(
            desired(
                &ClusterState::new(&[&held], &[], &[&slice]),
                now,
                &BTreeMap::new(),
                &BTreeMap::new()
            )
            .map
            .is_empty()
        );
    }

    /// An EndpointSlice named `name` in `namespace`, of the Service `service` (no label if
    /// `None`), with one ready endpoint at `ip`.
    fn slice_of(
        namespace: Option<&str>,
        name: &str,
        service: Option<&str>,
        ip: &str,
    ) -> EndpointSlice {
        let mut metadata = json!({"name": name});
        if let Some(namespace) = namespace {
            metadata["namespace"] = json!(namespace);
        }
        if let Some(service) = service {
            metadata["labels"] = json!({"kubernetes.io/service-name": service});
        }
        object(json!({
            "metadata": metadata, "addressType": "IPv4",
            "ports": [{"name": "", "port": 8080}],
            "endpoints": [{"addresses": [ip]}]
        }))
    }

    #[test]
    fn the_index_gives_exactly_a_services_slices() {
        let svc = |namespace: &str, name: &str| -> Service {
            object(json!({"metadata": {"name": name, "namespace": namespace},
                          "spec": {"clusterIP": "10.96.0.9", "ports": [{"port": 80}]}}))
        };
        let (web, web_prod, api) = (svc("dev", "web"), svc("prod", "web"), svc("dev", "api"));
        let slices = [
            slice_of(Some("dev"), "web-b", Some("web"), "10.244.1.4"),
            slice_of(Some("prod"), "web-p", Some("web"), "10.244.1.2"),
            slice_of(Some("dev"), "api-a", Some("api"), "10.244.1.3"),
            slice_of(Some("dev"), "web-a", Some("web"), "10.244.1.1"),
            slice_of(Some("dev"), "unlabelled", None, "10.244.1.5"),
            slice_of(None, "nowhere", Some("web"), "10.244.1.6"),
            slice_of(Some("dev"), "gone-svc", Some("gone"), "10.244.1.7"),
        ];
        let slices: Vec<&EndpointSlice> = slices.iter().collect();
        let state = ClusterState::new(&[], &[&web, &web_prod, &api], &slices);
        assert_eq!(state.slice_names("dev", "web"), ["web-a", "web-b"]);
        assert_eq!(state.slice_names("prod", "web"), ["web-p"]);
        assert_eq!(state.slice_names("dev", "api"), ["api-a"]);
        assert_eq!(
            state.slice_names("dev", "gone"),
            ["gone-svc"],
            "a slice outlives its Service"
        );
        assert!(state.slice_names("prod", "api").is_empty());
        assert!(state.service("prod", "web").is_some());
        assert!(state.service("dev", "gone").is_none());
    }

    #[test]
    fn the_next_pass_follows_a_slice_that_changes_service_or_is_deleted() {
        // The agent's index follows watch events: what the next pass sees after a slice
        // moved from web to api and another was deleted.
        use super::super::index::{Change, SliceView};
        let now = Utc::now();
        let svc = |name: &str, ip: &str| -> Service {
            object(json!({"metadata": {"name": name, "namespace": "dev"},
                          "spec": {"clusterIP": ip, "ports": [{"port": 80, "targetPort": 8080}]}}))
        };
        let (web, api) = (svc("web", "10.96.0.20"), svc("api", "10.96.0.21"));
        let mut on_api = holding("api", &[(80, 40002)], now);
        on_api.metadata.name = Some("bob".into());
        let moving = slice_of(Some("dev"), "m", Some("web"), "10.244.1.1");
        let staying = slice_of(Some("dev"), "k", Some("web"), "10.244.1.2");
        let mut index = Index::of(&[&web, &api], &[&moving, &staying]);
        let sessions = [&on_api];
        let before = ClusterState::indexed(&sessions, &index);
        assert_eq!(before.slice_names("dev", "web"), ["k", "m"]);
        assert_eq!(
            desired(&before, now, &BTreeMap::new(), &BTreeMap::new())
                .map
                .keys()
                .map(|k| k.addr)
                .collect::<Vec<_>>(),
            [addr("10.96.0.21:80")],
            "api has no endpoints yet"
        );

        let mut moved = moving.clone();
        moved
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("kubernetes.io/service-name".into(), "api".into());
        let key = |name: &str| ("dev".to_owned(), name.to_owned());
        index.apply_slice(Change::Applied(key("m"), SliceView::from(&moved)));
        index.apply_slice(Change::Deleted(key("k")));
        let after = ClusterState::indexed(&sessions, &index);
        assert!(after.slice_names("dev", "web").is_empty());
        assert_eq!(after.slice_names("dev", "api"), ["m"]);
        let map = desired(&after, now, &BTreeMap::new(), &BTreeMap::new()).map;
        assert_eq!(
            map.keys().map(|k| k.addr).collect::<Vec<_>>(),
            [addr("10.96.0.21:80"), addr("10.244.1.1:8080")]
        );
        assert!(map.values().all(|t| t.session == "dev/bob"));
    }
}
