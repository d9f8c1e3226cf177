//! The service map kept from pass to pass (no I/O), so that a pass costs what changed, not
//! what the cluster holds (issue 17: 1 000 sessions over 10 000 Services). Each exchange
//! session's part of the map (`redirects::exchange_part`) and each mesh route's entries
//! are kept with what they were computed from; every address keeps all the entries that
//! want it, ranked as [`redirects::desired`] settles them (an exchange before a mesh, the
//! older session first, the later of one session's entries first, the greater route key
//! first). A pass recomputes the parts whose inputs changed, then the winners of the
//! addresses those parts touched, then the programmed ports of the sessions that claim
//! those addresses. [`Ledger::update`] holds the same map and programmed ports as
//! `desired` over the same state (a test compares them over random changes).

use std::{
    cmp::Reverse,
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
};

use chrono::{DateTime, Utc};
// foldhash, not SipHash: looked up per session or Service each pass (see `kept`).
use foldhash::HashMap;
use kt_proto::session::{KtSession, SessionMode};

use super::{
    kept,
    mesh::{Route, RouteKey},
    redirects::{self, Claim, ClusterState, ExchangePart, PortsDone, Target},
};
use crate::ebpf::ServiceKey;

/// One change of the map: the address and what it now goes to (`None`: removed).
pub type Change = (ServiceKey, Option<Target>);

/// The map in force and what it is made of (see the module doc).
#[derive(Debug, Default)]
pub struct Ledger {
    /// Per live exchange session (`namespace/name`) that wants something.
    exchanges: HashMap<String, Held>,
    /// Per mesh route with a router: what its entries were made of.
    routes: BTreeMap<RouteKey, (Route, SocketAddr)>,
    /// Per mesh session (`namespace/name`): its claim, from the routes.
    mesh_claims: BTreeMap<String, Claim>,
    /// Per address, every entry that wants it, the one in force first.
    wanting: HashMap<ServiceKey, BTreeMap<Rank, Target>>,
    /// What the service map should hold: the first of each address's `wanting`.
    map: BTreeMap<ServiceKey, Target>,
    /// Per session with a claim, its programmed ports (looked up per session each pass by
    /// the acknowledgements).
    programmed: HashMap<String, PortsDone>,
    /// Counts passes, to find the sessions a pass did not see.
    pass: u64,
}

/// An exchange session's part, with what it was computed from.
#[derive(Debug)]
struct Held {
    /// [`ClusterState::inputs`] of the session it was computed from.
    inputs: u64,
    rank: SessionRank,
    part: ExchangePart,
    /// The last pass that saw the session live.
    seen: u64,
}

/// How an exchange session ranks against another for one address: the older first (as
/// [`ClusterState::live`] orders them: creation, name, namespace), the key settling the
/// ties left.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct SessionRank {
    created: Option<k8s_openapi::jiff::Timestamp>,
    name: Option<String>,
    namespace: Option<String>,
    key: String,
}

/// How an entry ranks for its address: the least is in force. Variants in this order: any
/// exchange before any mesh route.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Rank {
    /// The entry at this index of the session's part; of one session's entries for one
    /// address the later stands.
    Exchange(SessionRank, Reverse<usize>),
    /// A mesh route's entry; of two routes' the greater key stands.
    Mesh(Reverse<RouteKey>),
}

/// What a pass touched: the addresses whose wanting entries changed, and the sessions
/// whose programmed ports must be computed again.
#[derive(Default)]
struct Touched {
    addresses: BTreeSet<ServiceKey>,
    sessions: BTreeSet<String>,
}

impl Ledger {
    /// What the service map should hold, as of the last [`Ledger::update`].
    pub fn map(&self) -> &BTreeMap<ServiceKey, Target> {
        &self.map
    }

    /// Per session with a claim (`namespace/name`), the Service ports programmed for it, as
    /// [`redirects::Desired::programmed_ports`] gives them.
    pub fn programmed(&self) -> &HashMap<String, PortsDone> {
        &self.programmed
    }

    /// Brings the map up to `state` at `now`, with the mesh `routes` and this node's
    /// `routers` for them, and returns what changed in it. Costs a hash per session (to
    /// find the changed ones) plus work for what changed. `state`'s index must be the one
    /// earlier updates saw, changed in place: a Service's change is seen by its
    /// [`super::index::Index::revision_of`], which grows with every change of one index.
    pub fn update(
        &mut self,
        state: &ClusterState<'_>,
        now: DateTime<Utc>,
        routes: &BTreeMap<RouteKey, Route>,
        routers: &BTreeMap<RouteKey, SocketAddr>,
    ) -> Vec<Change> {
        self.pass += 1;
        let mut touched = Touched::default();
        let mut key = String::new();
        for (&session, &inputs) in state.sessions.iter().zip(state.inputs()) {
            if !is_live_exchange(session, now) {
                continue;
            }
            kept::write_key(&mut key, session);
            if let Some(held) = self.exchanges.get_mut(key.as_str())
                && held.inputs == inputs
            {
                held.seen = self.pass;
                continue;
            }
            let part = redirects::exchange_part(state, session);
            self.replace_exchange(&key, part.map(|part| (inputs, session, part)), &mut touched);
        }
        let gone: Vec<String> = self
            .exchanges
            .iter()
            .filter(|(_, held)| held.seen != self.pass)
            .map(|(key, _)| key.clone())
            .collect();
        for key in gone {
            self.replace_exchange(&key, None, &mut touched);
        }
        self.update_routes(routes, routers, &mut touched);
        let changes = self.settle(&touched.addresses, &mut touched.sessions);
        for session in &touched.sessions {
            let claim = self
                .exchanges
                .get(session)
                .map(|held| &held.part.claim)
                .or_else(|| self.mesh_claims.get(session));
            match claim {
                Some(claim) => {
                    self.programmed
                        .insert(session.clone(), claim.programmed_in(&self.map));
                }
                None => {
                    self.programmed.remove(session);
                }
            }
        }
        changes
    }

    /// Puts `new` (its inputs, the session and its part) in place of what the exchange
    /// session `key` had; `None` removes it.
    fn replace_exchange(
        &mut self,
        key: &str,
        new: Option<(u64, &KtSession, ExchangePart)>,
        touched: &mut Touched,
    ) {
        let old = self.exchanges.remove(key);
        if let Some(old) = &old {
            for (at, (address, _)) in old.part.entries.iter().enumerate() {
                let rank = Rank::Exchange(old.rank.clone(), Reverse(at));
                if let Some(wanting) = self.wanting.get_mut(address) {
                    wanting.remove(&rank);
                    if wanting.is_empty() {
                        self.wanting.remove(address);
                    }
                }
                touched.addresses.insert(*address);
            }
        }
        touched.sessions.insert(key.to_owned());
        let Some((inputs, session, part)) = new else {
            return;
        };
        let rank = SessionRank {
            created: session.metadata.creation_timestamp.as_ref().map(|t| t.0),
            name: session.metadata.name.clone(),
            namespace: session.metadata.namespace.clone(),
            key: key.to_owned(),
        };
        for (at, (address, target)) in part.entries.iter().enumerate() {
            self.wanting
                .entry(*address)
                .or_default()
                .insert(Rank::Exchange(rank.clone(), Reverse(at)), target.clone());
            touched.addresses.insert(*address);
        }
        self.exchanges.insert(
            key.to_owned(),
            Held {
                inputs,
                rank,
                part,
                seen: self.pass,
            },
        );
    }

    /// Brings the mesh routes' entries and the mesh sessions' claims up to `routes` with
    /// `routers` (a route without a router has no entry).
    fn update_routes(
        &mut self,
        routes: &BTreeMap<RouteKey, Route>,
        routers: &BTreeMap<RouteKey, SocketAddr>,
        touched: &mut Touched,
    ) {
        let wanted: BTreeMap<&RouteKey, (&Route, SocketAddr)> = routes
            .iter()
            .filter_map(|(key, route)| Some((key, (route, *routers.get(key)?))))
            .collect();
        let unchanged = wanted.len() == self.routes.len()
            && wanted.iter().zip(&self.routes).all(
                |((key, (route, router)), (old_key, (old_route, old_router)))| {
                    *key == old_key && *route == old_route && router == old_router
                },
            );
        if unchanged {
            return;
        }
        for (key, (route, _)) in std::mem::take(&mut self.routes) {
            let rank = Rank::Mesh(Reverse(key));
            for address in &route.addresses {
                let address = ServiceKey::tcp(*address);
                if let Some(wanting) = self.wanting.get_mut(&address) {
                    wanting.remove(&rank);
                    if wanting.is_empty() {
                        self.wanting.remove(&address);
                    }
                }
                touched.addresses.insert(address);
            }
        }
        touched
            .sessions
            .extend(std::mem::take(&mut self.mesh_claims).into_keys());
        for (key, (route, router)) in wanted {
            let target = Target {
                to: router,
                session: key.target_name(),
                port: key.port,
                mode: SessionMode::Mesh,
            };
            for address in &route.addresses {
                let address = ServiceKey::tcp(*address);
                self.wanting
                    .entry(address)
                    .or_default()
                    .insert(Rank::Mesh(Reverse(key.clone())), target.clone());
                touched.addresses.insert(address);
            }
            redirects::claim_route(&mut self.mesh_claims, key, route);
            touched
                .sessions
                .extend(route.sessions.iter().map(|s| s.session.clone()));
            self.routes.insert(key.clone(), (route.clone(), router));
        }
    }

    /// Makes the map's entry for each of `addresses` the first that wants it; adds to
    /// `sessions` every session that claims an address whose entry changed.
    fn settle(
        &mut self,
        addresses: &BTreeSet<ServiceKey>,
        sessions: &mut BTreeSet<String>,
    ) -> Vec<Change> {
        let mut changes = Vec::new();
        for address in addresses {
            let wanting = self.wanting.get(address);
            let now = wanting.and_then(|w| w.values().next());
            if now == self.map.get(address) {
                continue;
            }
            for rank in wanting.into_iter().flat_map(|w| w.keys()) {
                match rank {
                    Rank::Exchange(session, _) => {
                        sessions.insert(session.key.clone());
                    }
                    Rank::Mesh(Reverse(route)) => {
                        let route_sessions = self.routes.get(route).into_iter();
                        sessions.extend(
                            route_sessions
                                .flat_map(|(r, _)| r.sessions.iter().map(|s| s.session.clone())),
                        );
                    }
                }
            }
            match now {
                Some(target) => {
                    self.map.insert(*address, target.clone());
                }
                None => {
                    self.map.remove(address);
                }
            }
            changes.push((*address, now.cloned()));
        }
        changes
    }
}

/// Whether `session` is an exchange whose entries are in force at `now` (as
/// [`ClusterState::live`] picks them).
fn is_live_exchange(session: &KtSession, now: DateTime<Utc>) -> bool {
    session.spec.mode == SessionMode::Exchange
        && session.metadata.deletion_timestamp.is_none()
        && session.lease_live(now)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
    use rand::{Rng, SeedableRng, rngs::StdRng};
    use serde_json::json;

    use super::*;
    use crate::agent::{
        index::{Change as Event, Index, SliceView},
        mesh,
    };

    const SERVICES: [&str; 4] = ["web", "web-internal", "dns", "gone"];
    /// Sessions and Services live in both: one name in two namespaces is two objects.
    const NAMESPACES: [&str; 2] = ["dev", "other"];

    /// Service `name` in `namespace` (`gone` has none): two TCP ports on one targetPort,
    /// and 53 over UDP and TCP.
    fn service(namespace: &str, name: &str, at: usize) -> Option<Service> {
        (name != "gone").then(|| {
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": namespace},
                "spec": {"clusterIP": format!("10.96.{}.{at}", usize::from(namespace != "dev")),
                         "ports": [{"name": "http", "port": 80, "targetPort": 8080},
                                   {"name": "alt", "port": 81, "targetPort": 8080},
                                   {"name": "dns-udp", "port": 53, "protocol": "UDP"},
                                   {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]}
            }))
            .unwrap()
        })
    }

    /// Every Service of [`SERVICES`] in every namespace.
    fn services() -> Vec<Service> {
        NAMESPACES
            .iter()
            .flat_map(|ns| {
                SERVICES
                    .iter()
                    .enumerate()
                    .filter_map(|(at, name)| service(ns, name, at + 1))
            })
            .collect()
    }

    /// A slice of `service` in `namespace` with the pods `pods` (of one pool: Services
    /// share pods), each ready or not.
    fn slice(namespace: &str, service: &str, pods: &[(u8, bool)]) -> EndpointSlice {
        let endpoints: Vec<_> = pods
            .iter()
            .map(|(pod, ready)| {
                json!({"addresses": [format!("10.244.1.{pod}")], "conditions": {"ready": ready}})
            })
            .collect();
        serde_json::from_value(json!({
            "metadata": {"name": format!("{service}-x"), "namespace": namespace,
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                      {"name": "alt", "port": 8080, "protocol": "TCP"},
                      {"name": "dns-udp", "port": 53, "protocol": "UDP"},
                      {"name": "dns-tcp", "port": 53, "protocol": "TCP"}],
            "endpoints": endpoints
        }))
        .unwrap()
    }

    /// A random session in slot `n` (`s{n / 2}` in one of the namespaces: names repeat
    /// across them), at its `version`: exchange or mesh, of a random Service, created at
    /// one of three times, held or not, renewed now or long ago, being deleted or not.
    fn session(rng: &mut StdRng, n: usize, version: u64, now: DateTime<Utc>) -> KtSession {
        let mesh = rng.random_bool(0.3);
        let ports: Vec<u16> = [80, 81, 53, 99]
            .into_iter()
            .filter(|_| rng.random_bool(0.5))
            .collect();
        let listener =
            |port: &u16| json!({"port": port, "listenerPort": 40_000 + n as u16 * 10 + port % 10});
        let udp: Vec<u16> = if mesh || !rng.random_bool(0.3) {
            Vec::new()
        } else {
            vec![53]
        };
        let renewed = if rng.random_bool(0.9) {
            now
        } else {
            now - chrono::TimeDelta::seconds(600)
        };
        let mut value = json!({
            "apiVersion": "kt.dev/v1alpha1", "kind": "KtSession",
            "metadata": {"name": format!("s{}", n / 2), "namespace": NAMESPACES[n % 2],
                         "uid": format!("u{n}-{}", rng.random_range(0..2)),
                         "resourceVersion": version.to_string(),
                         "creationTimestamp": format!("2026-01-0{}T00:00:00Z", rng.random_range(1..4))},
            "spec": {"owner": "a@b", "mode": if mesh { "mesh" } else { "exchange" },
                     "service": SERVICES[rng.random_range(0..SERVICES.len())],
                     "ports": ports.iter().map(|p| json!({"port": p, "localPort": 8080})).collect::<Vec<_>>(),
                     "udpPorts": udp.iter().map(|p| json!({"port": p, "localPort": 5353})).collect::<Vec<_>>(),
                     "header": {"name": "Version", "value": format!("v{n}")},
                     "publicKey": "k", "leaseSeconds": 60},
        });
        if rng.random_bool(0.85) {
            value["status"] = json!({"node": "node-1", "address": "172.30.0.11",
                "listeners": ports.iter().map(listener).collect::<Vec<_>>(),
                "udpListeners": udp.iter().map(listener).collect::<Vec<_>>(),
                "renewTime": renewed});
        }
        if rng.random_bool(0.1) {
            value["metadata"]["deletionTimestamp"] = json!("2026-01-05T00:00:00Z");
        }
        serde_json::from_value(value).unwrap()
    }

    fn random_slice(rng: &mut StdRng, namespace: &str, service: &str) -> EndpointSlice {
        let mut pods = Vec::new();
        for pod in 1..6 {
            if rng.random_bool(0.5) {
                pods.push((pod, rng.random_bool(0.8)));
            }
        }
        slice(namespace, service, &pods)
    }

    /// Over random sessions, slices and routers, changed a few at a time while the clock
    /// runs (leases end), the ledger holds what `desired` computes from scratch, and its
    /// changes lead from one to the next. Session hashes come from
    /// [`redirects::KeptHashes`], as in the agent; a session may be created again under its
    /// name (another uid) and the same name is used in two namespaces.
    #[test]
    fn the_ledger_keeps_what_desired_computes_from_scratch() {
        let mut rng = StdRng::seed_from_u64(17);
        let mut now = Utc::now();
        let services = services();
        let slices: Vec<EndpointSlice> = NAMESPACES
            .iter()
            .flat_map(|ns| SERVICES.iter().map(move |name| (ns, name)))
            .map(|(ns, name)| random_slice(&mut rng, ns, name))
            .collect();
        // One index changed in place, as the agent's watches keep it.
        let mut index = Index::of(
            &services.iter().collect::<Vec<_>>(),
            &slices.iter().collect::<Vec<_>>(),
        );
        let mut sessions: Vec<Option<KtSession>> = (0..12).map(|_| None).collect();
        let mut version = 0;
        let mut ledger = Ledger::default();
        let mut hashes = redirects::KeptHashes::default();
        let mut map = BTreeMap::new();
        let mut routers_up = true;
        for step in 0..600 {
            match rng.random_range(0..12) {
                0..6 => {
                    let n = rng.random_range(0..sessions.len());
                    version += 1;
                    sessions[n] = rng
                        .random_bool(0.8)
                        .then(|| session(&mut rng, n, version, now));
                }
                6..9 => {
                    let namespace = NAMESPACES[rng.random_range(0..NAMESPACES.len())];
                    let service = SERVICES[rng.random_range(0..SERVICES.len())];
                    let slice = random_slice(&mut rng, namespace, service);
                    index.apply_slice(Event::Applied(
                        (namespace.into(), format!("{service}-x")),
                        SliceView::from(&slice),
                    ));
                }
                9..11 => now += chrono::TimeDelta::seconds(rng.random_range(0..40)),
                _ => routers_up = !routers_up,
            }
            let live: Vec<&KtSession> = sessions.iter().flatten().collect();
            let state = ClusterState::indexed_kept(&live, &index, &mut hashes);
            let routes = mesh::routes(&state, now);
            // Every other route has a router while they are up.
            let routers: BTreeMap<RouteKey, SocketAddr> = routes
                .keys()
                .enumerate()
                .filter(|(at, _)| routers_up || at % 2 == 0)
                .map(|(at, key)| {
                    (
                        key.clone(),
                        SocketAddr::from(([127, 0, 0, 1], 30_000 + at as u16)),
                    )
                })
                .collect();
            let fresh = ClusterState::indexed(&live, &index);
            let wanted = redirects::desired(&fresh, now, &routes, &routers);
            let changes = ledger.update(&state, now, &routes, &routers);
            assert_eq!(ledger.map(), &wanted.map, "step {step}: the map");
            let programmed: BTreeMap<String, PortsDone> = wanted
                .programmed_ports()
                .into_iter()
                .map(|(session, ports)| (session.to_owned(), ports))
                .collect();
            assert_eq!(
                ledger
                    .programmed()
                    .iter()
                    .map(|(session, ports)| (session.clone(), ports.clone()))
                    .collect::<BTreeMap<_, _>>(),
                programmed,
                "step {step}: programmed ports"
            );
            for (address, target) in changes {
                match target {
                    Some(target) => map.insert(address, target),
                    None => map.remove(&address),
                };
            }
            assert_eq!(&map, ledger.map(), "step {step}: the changes");
        }
    }

    /// A pass over the same state changes nothing, nor does a renewal (a new
    /// resourceVersion and renewTime).
    #[test]
    fn a_pass_over_what_did_not_change_changes_nothing() {
        let mut rng = StdRng::seed_from_u64(5);
        let now = Utc::now();
        let services = services();
        let slices: Vec<EndpointSlice> = NAMESPACES
            .iter()
            .flat_map(|ns| SERVICES.iter().map(move |name| (ns, name)))
            .map(|(ns, name)| slice(ns, name, &[(1, true), (2, true)]))
            .collect();
        let index = Index::of(
            &services.iter().collect::<Vec<_>>(),
            &slices.iter().collect::<Vec<_>>(),
        );
        let mut all: Vec<KtSession> = (0..8).map(|n| session(&mut rng, n, 1, now)).collect();
        let mut ledger = Ledger::default();
        let update = |ledger: &mut Ledger, all: &[KtSession]| {
            let live: Vec<&KtSession> = all.iter().collect();
            let state = ClusterState::indexed(&live, &index);
            let routes = mesh::routes(&state, now);
            ledger.update(&state, now, &routes, &BTreeMap::new())
        };
        assert!(
            !update(&mut ledger, &all).is_empty(),
            "the first pass writes the map"
        );
        assert!(update(&mut ledger, &all).is_empty());
        let held = all.iter_mut().find(|s| s.status.is_some()).unwrap();
        held.metadata.resource_version = Some("2".into());
        held.status.as_mut().unwrap().renew_time = Some(now + chrono::TimeDelta::seconds(1));
        assert!(
            update(&mut ledger, &all).is_empty(),
            "a renewal changes nothing"
        );
    }
}
