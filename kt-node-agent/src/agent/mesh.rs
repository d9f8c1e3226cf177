//! Mesh routes, from the cluster's state alone (no I/O): for every Service port that live
//! `mesh` sessions share, which session each header value goes to and which endpoints take
//! every other request. [`super::router`] serves them; [`super::redirects`] points the
//! port's addresses at this node's router.

use std::{collections::BTreeMap, net::SocketAddr};

use chrono::{DateTime, Utc};
use kt_proto::session::{HeaderMatch, SessionMode};

use super::redirects::{ClusterState, addresses_of};
use crate::ebpf::Transport;

/// One meshed Service port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteKey {
    pub namespace: String,
    pub service: String,
    /// The Service `port`.
    pub port: u16,
}

impl RouteKey {
    /// How the map entries of the route are named ([`super::redirects::Target::session`]):
    /// `namespace/service:mesh`.
    pub fn target_name(&self) -> String {
        format!("{}/{}:mesh", self.namespace, self.service)
    }
}

/// Where the requests of one meshed Service port go.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Route {
    /// The sessions, oldest first: a request goes to the first whose header matches (so of
    /// two sessions with one value, which ktctl refuses, the older wins).
    pub sessions: Vec<MeshTarget>,
    /// The port's ready endpoints (pod IP:targetPort): every other request goes to one.
    pub endpoints: Vec<SocketAddr>,
    /// What clients dial for the port: ClusterIPs:port and the endpoints. The router's own
    /// connects to endpoints are not redirected (its cgroup is skipped).
    pub addresses: Vec<SocketAddr>,
}

/// A session of a route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshTarget {
    /// `namespace/name`.
    pub session: String,
    pub owner: String,
    pub header: HeaderMatch,
    /// The holding agent's listener for this port (it forwards to the workstation).
    pub to: SocketAddr,
}

impl MeshTarget {
    /// Whether a request with `headers` goes to this session: the header is present with
    /// exactly the value (a repeated header matches when any of its values does).
    pub fn matches(&self, headers: &http::HeaderMap) -> bool {
        headers
            .get_all(self.header.name.as_str())
            .iter()
            .any(|v| v.as_bytes() == self.header.value.as_bytes())
    }
}

/// The routes in force at `now`: one per TCP Service port of every live, held mesh session
/// with a header, holding each session whose holder listens for that port. A port whose
/// Service is gone has no route.
pub fn routes(state: &ClusterState<'_>, now: DateTime<Utc>) -> BTreeMap<RouteKey, Route> {
    let mut routes: BTreeMap<RouteKey, Route> = BTreeMap::new();
    for session in state.live(SessionMode::Mesh, now) {
        let (Some(namespace), Some(header), Some(status)) = (
            session.metadata.namespace.as_deref(),
            session.spec.header.as_ref(),
            session.status.as_ref(),
        ) else {
            continue;
        };
        let (Some(holder), Some(service)) = (
            status.address,
            state.service(namespace, &session.spec.service),
        ) else {
            continue;
        };
        let slices = state.slices_of(namespace, &session.spec.service);
        for listener in &status.listeners {
            let Some(addresses) = addresses_of(service, &slices, listener.port, Transport::Tcp)
            else {
                continue;
            };
            let key = RouteKey {
                namespace: namespace.to_owned(),
                service: session.spec.service.clone(),
                port: listener.port,
            };
            let route = routes.entry(key).or_insert_with(|| Route {
                sessions: Vec::new(),
                addresses: addresses.all(),
                endpoints: addresses.endpoints,
            });
            route.sessions.push(MeshTarget {
                session: session.key(),
                owner: session.spec.owner.clone(),
                header: HeaderMatch {
                    name: header.name.to_ascii_lowercase(),
                    value: header.value.clone(),
                },
                to: SocketAddr::new(holder, listener.listener_port),
            });
        }
    }
    routes
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
    use kt_proto::session::KtSession;
    use serde_json::json;

    use super::*;
    use crate::agent::redirects::desired;

    fn service() -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "dev"},
            "spec": {"clusterIP": "10.96.0.20", "ports": [{"port": 80, "targetPort": 8080}]}
        }))
        .unwrap()
    }

    fn slice() -> EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {"name": "web-x", "namespace": "dev",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "", "port": 8080}],
            "endpoints": [{"addresses": ["10.244.1.5"]}, {"addresses": ["10.244.2.7"]},
                          {"addresses": ["10.244.2.9"], "conditions": {"ready": false}}]
        }))
        .unwrap()
    }

    fn mesh(
        name: &str,
        created: &str,
        value: &str,
        listener: u16,
        renewed: DateTime<Utc>,
    ) -> KtSession {
        serde_json::from_value(json!({
            "apiVersion": "kt.dev/v1alpha1", "kind": "KtSession",
            "metadata": {"name": name, "namespace": "dev", "creationTimestamp": created},
            "spec": {"owner": format!("{name}@laptop"), "mode": "mesh", "service": "web",
                     "ports": [{"port": 80, "localPort": 8080}], "publicKey": "k",
                     "header": {"name": "Version", "value": value}},
            "status": {"node": "node-2", "address": "172.30.0.12",
                       "listeners": [{"port": 80, "listenerPort": listener}],
                       "renewTime": renewed}
        }))
        .unwrap()
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn two_developers_share_one_route_oldest_first() {
        let now = Utc::now();
        let (svc, slice) = (service(), slice());
        let bob = mesh("bob", "2026-01-02T00:00:00Z", "b", 40002, now);
        let alice = mesh("alice", "2026-01-01T00:00:00Z", "a", 40001, now);
        let state_of = (&[&bob, &alice], &[&svc], &[&slice]);
        let state = ClusterState::new(state_of.0, state_of.1, state_of.2);
        let routes = routes(&state, now);
        let key = RouteKey {
            namespace: "dev".into(),
            service: "web".into(),
            port: 80,
        };
        let route = &routes[&key];
        let owners: Vec<&str> = route.sessions.iter().map(|s| s.owner.as_str()).collect();
        assert_eq!(owners, ["alice@laptop", "bob@laptop"]);
        assert_eq!(route.sessions[0].header.name, "version", "lower-cased");
        assert_eq!(route.sessions[1].to, addr("172.30.0.12:40002"));
        assert_eq!(
            route.endpoints,
            [addr("10.244.1.5:8080"), addr("10.244.2.7:8080")],
            "unready endpoints take no requests"
        );
        assert_eq!(route.addresses.len(), 3, "the ClusterIP and both endpoints");

        // Every address goes to this node's router, and both sessions count as programmed.
        let router = addr("172.30.0.11:41000");
        let wanted = desired(&state, now, &routes, &BTreeMap::from([(key, router)]));
        assert!(wanted.map.values().all(|t| t.to == router));
        let programmed = wanted.programmed_ports();
        assert_eq!(
            programmed["dev/alice"]
                .tcp
                .iter()
                .copied()
                .collect::<Vec<_>>(),
            [80]
        );
        assert_eq!(
            programmed["dev/bob"]
                .tcp
                .iter()
                .copied()
                .collect::<Vec<_>>(),
            [80]
        );
    }

    #[test]
    fn expired_and_headerless_sessions_make_no_route() {
        let now = Utc::now();
        let (svc, slice) = (service(), slice());
        let expired = mesh(
            "alice",
            "2026-01-01T00:00:00Z",
            "a",
            40001,
            now - chrono::TimeDelta::seconds(60),
        );
        let mut headerless = mesh("bob", "2026-01-01T00:00:00Z", "b", 40002, now);
        headerless.spec.header = None;
        let state_of = (&[&expired, &headerless], &[&svc], &[&slice]);
        let state = ClusterState::new(state_of.0, state_of.1, state_of.2);
        assert!(routes(&state, now).is_empty());
    }

    #[test]
    fn a_route_without_a_router_redirects_nothing_and_an_exchange_wins() {
        let now = Utc::now();
        let (svc, slice) = (service(), slice());
        let alice = mesh("alice", "2026-01-01T00:00:00Z", "a", 40001, now);
        let mut carol = mesh("carol", "2026-01-03T00:00:00Z", "c", 40003, now);
        carol.spec.mode = SessionMode::Exchange;
        carol.spec.header = None;
        let state_of = (&[&alice], &[&svc], &[&slice]);
        let state = ClusterState::new(state_of.0, state_of.1, state_of.2);
        let routes_now = routes(&state, now);
        assert!(
            desired(&state, now, &routes_now, &BTreeMap::new())
                .map
                .is_empty()
        );

        let both_of = (&[&alice, &carol], &[&svc], &[&slice]);
        let both = ClusterState::new(both_of.0, both_of.1, both_of.2);
        let routers = routes_now
            .keys()
            .map(|k| (k.clone(), addr("172.30.0.11:41000")))
            .collect();
        let wanted = desired(&both, now, &routes(&both, now), &routers);
        assert!(wanted.map.values().all(|t| t.session == "dev/carol"));
        assert!(wanted.programmed_ports()["dev/alice"].tcp.is_empty());
    }

    #[test]
    fn a_header_matches_by_exact_value_in_any_of_its_fields() {
        let target = MeshTarget {
            session: "dev/a".into(),
            owner: "a".into(),
            header: HeaderMatch {
                name: "version".into(),
                value: "feo3x".into(),
            },
            to: addr("172.30.0.12:40001"),
        };
        let mut headers = http::HeaderMap::new();
        assert!(!target.matches(&headers));
        headers.append("VERSION", "feo3X".parse().unwrap());
        assert!(!target.matches(&headers), "values are compared exactly");
        headers.append("Version", "feo3x".parse().unwrap());
        assert!(target.matches(&headers), "names are compared without case");
    }
}
