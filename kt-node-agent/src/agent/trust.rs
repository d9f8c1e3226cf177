//! Which session statuses an agent believes (no I/O). `status` says where a Service's traffic
//! goes, so a status nobody can vouch for must redirect nothing: a developer may create and
//! edit `KtSession` objects in their namespace (and an admin may write `status`), but only
//! the agents' ServiceAccount may write the agents' records in `kt-system`
//! (`deploy/base/rbac.yaml`). Each agent publishes one record, the ConfigMap
//! [`record_name`]`(node)`, listing the sessions it holds (namespace, name, uid) and their
//! listeners, rewritten when that set changes (not per renewal), and *before* it writes a
//! session's status.
//!
//! An exchange or mesh session's status is accepted ([`check`]) only when
//! - `status.node` is a Node of the cluster and `status.address` one of its `InternalIP` or
//!   `ExternalIP` addresses (the address the holder's listeners are bound to is its
//!   `KT_NODE_IP`, the downward API's `status.hostIP`: the Node's address);
//! - that node's agent record lists the session (same namespace, name and uid) with every
//!   listener the status names;
//! - `renewTime` is at most [`MAX_CLOCK_SKEW`] ahead of this agent's clock.
//!
//! Anything else is ignored (fail-open: the Service's traffic goes to its pods) and reported.
//! So is a session of any mode whose spec breaks a rule of [`kt_proto::validate::spec`]
//! (another namespace's Service, hundreds of ports, a 1 MiB header), held or not.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use chrono::{DateTime, TimeDelta, Utc};
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use kt_proto::{
    session::{KtSession, Listener, SessionMode},
    validate::SpecError,
};
use serde::{Deserialize, Serialize};

use super::kept::PerSession;

/// How far a `renewTime` may be ahead of this agent's clock. The holder writes it from its
/// own node's clock; nodes of one cluster are NTP-synchronised far closer than this (the
/// kubelet's own node lease tolerates tens of seconds), so 30 s rejects no honest holder
/// while a status "renewed an hour from now" — a lease taken on trust — is refused, and
/// whatever a skewed holder writes lives at most this much longer than its lease.
pub const MAX_CLOCK_SKEW: TimeDelta = TimeDelta::seconds(30);

/// The record's data key holding the JSON list of [`HeldSession`]s.
pub const RECORD_SESSIONS_KEY: &str = "sessions";
/// The record's data key naming its node.
pub const RECORD_NODE_KEY: &str = "node";
/// The record's data key with the time its agent started (RFC 3339, the node's clock).
pub const RECORD_STARTED_KEY: &str = "started";
/// The label every agent record carries (its value is the node), for the agents' watch.
pub const RECORD_LABEL: &str = "kt.dev/agent-record";

/// The name of `node`'s agent record in `kt-system`.
pub fn record_name(node: &str) -> String {
    format!("kt-node-agent-{node}")
}

/// One session an agent holds, as its record lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeldSession {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub listeners: Vec<Listener>,
    /// The UDP listeners (`status.udpListeners`); absent in records of agents that predate
    /// UDP exchange.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub udp_listeners: Vec<Listener>,
}

/// One node's agent record.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Record {
    /// When the agent that wrote it started.
    pub started: Option<DateTime<Utc>>,
    /// Sorted by namespace and name: every pass looks up every session's holder here, so
    /// with 1 000 held sessions a scan per lookup would be a million comparisons a pass.
    sessions: Vec<HeldSession>,
}

impl Record {
    /// The record of an agent started at `started` that holds `sessions` (in any order).
    pub fn new(started: Option<DateTime<Utc>>, mut sessions: Vec<HeldSession>) -> Self {
        sessions.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        Self { started, sessions }
    }

    /// The sessions it lists, by namespace and name.
    pub fn sessions(&self) -> &[HeldSession] {
        &self.sessions
    }

    /// The entry for the session `namespace/name` with `uid`, if listed.
    pub fn held(&self, namespace: &str, name: &str, uid: &str) -> Option<&HeldSession> {
        let first = self
            .sessions
            .partition_point(|h| (h.namespace.as_str(), h.name.as_str()) < (namespace, name));
        self.sessions[first..]
            .iter()
            .take_while(|h| h.namespace == namespace && h.name == name)
            .find(|h| h.uid == uid)
    }
}

/// Each node's agent record (node → the record), from the watched ConfigMaps; a record that
/// does not parse, or names another node than its name says, reads as absent.
pub fn records(config_maps: &[&ConfigMap]) -> BTreeMap<String, Record> {
    config_maps
        .iter()
        .filter_map(|cm| {
            let data = cm.data.as_ref()?;
            let node = data.get(RECORD_NODE_KEY)?;
            if cm.metadata.name.as_deref() != Some(record_name(node).as_str()) {
                return None;
            }
            let sessions = serde_json::from_str(data.get(RECORD_SESSIONS_KEY)?).ok()?;
            let started = data
                .get(RECORD_STARTED_KEY)
                .and_then(|t| t.parse::<DateTime<Utc>>().ok());
            Some((node.clone(), Record::new(started, sessions)))
        })
        .collect()
}

/// [`records`] kept from pass to pass: the records are parsed again only when one of the
/// ConfigMaps changed (by name and `resourceVersion`). A record of 1 000 sessions is about
/// 100 KiB of JSON, and every session write wakes a pass.
#[derive(Debug, Default)]
pub struct RecordCache {
    /// The (name, resourceVersion) of each ConfigMap the records were read from.
    read_from: Vec<(Option<String>, Option<String>)>,
    records: BTreeMap<String, Record>,
    /// Bumped whenever the records are parsed again.
    generation: u64,
}

impl RecordCache {
    /// The records of `config_maps`, parsed again only if they changed since the last call.
    pub fn current(&mut self, config_maps: &[&ConfigMap]) -> &BTreeMap<String, Record> {
        let mut versions: Vec<_> = config_maps
            .iter()
            .map(|cm| {
                (
                    cm.metadata.name.clone(),
                    cm.metadata.resource_version.clone(),
                )
            })
            .collect();
        versions.sort();
        // Without a resourceVersion (not from an API server) nothing tells a change apart.
        let known = versions.iter().all(|(_, version)| version.is_some());
        if !known || versions != self.read_from {
            self.records = records(config_maps);
            self.read_from = versions;
            self.generation += 1;
        }
        &self.records
    }
}

/// [`check`] from pass to pass: the records kept as [`RecordCache`] keeps them, and each
/// session's verdict kept until the session changes (its `resourceVersion`), the Nodes'
/// addresses or the records do, or the clock goes back. With 1 000 sessions, checking each
/// on every pass was most of a pass that programs nothing new (the `reconcile` benchmark,
/// issue 17).
#[derive(Debug, Default)]
pub struct Judge {
    records: RecordCache,
    /// What the kept verdicts were reached on: the records' generation and the Nodes'
    /// names and addresses, hashed.
    on: u64,
    /// Per session, its verdict.
    verdicts: PerSession<(), Result<(), Rejected>>,
    /// The `now` of the last call: a clock that went back may make a kept verdict wrong
    /// (a renewal now in the future), so the verdicts are reached again. The lease clock
    /// goes back once each time the sessions watch goes down (it stands at when the watch
    /// went down: [`super::freshness`]), which costs one pass of judging afresh.
    last_now: Option<DateTime<Utc>>,
}

impl Judge {
    /// [`check`] of each of `sessions`, in their order, against `nodes` and the agent
    /// records in `config_maps`, at `now`. A verdict is reached again only for a session
    /// without a `resourceVersion` (not from an API server), one that changed (another
    /// version or uid: [`PerSession`]), one renewed in the future (time may make it
    /// right), or after something it was reached on changed or the clock went back.
    pub fn verdicts(
        &mut self,
        sessions: &[&KtSession],
        nodes: &[&Node],
        config_maps: &[&ConfigMap],
        now: DateTime<Utc>,
    ) -> Vec<Result<(), Rejected>> {
        use std::hash::{DefaultHasher, Hash as _, Hasher as _};
        self.records.current(config_maps);
        let records = &self.records.records;
        // The Nodes come in no set order: their hashes are summed.
        let nodes_hash = nodes.iter().fold(0u64, |sum, node| {
            let mut h = DefaultHasher::new();
            node.metadata.name.hash(&mut h);
            for address in node
                .status
                .iter()
                .flat_map(|s| s.addresses.iter().flatten())
            {
                (&address.type_, &address.address).hash(&mut h);
            }
            sum.wrapping_add(h.finish())
        });
        let mut h = DefaultHasher::new();
        (self.records.generation, nodes.len(), nodes_hash).hash(&mut h);
        let on = h.finish();
        let clock_back = self.last_now.is_some_and(|last| now < last);
        if on != self.on || clock_back {
            self.verdicts.clear();
            self.on = on;
        }
        self.last_now = Some(now);
        self.verdicts.start_pass();
        let out = sessions
            .iter()
            .map(|session| {
                if let Some(kept) = self.verdicts.kept(session, |()| true) {
                    return kept.clone();
                }
                let result = check(session, nodes, records, now);
                // Time may make it right: not kept.
                let reusable = !matches!(result, Err(Rejected::RenewedInTheFuture(_)));
                self.verdicts.keep(session, (), result.clone(), reusable);
                result
            })
            .collect();
        self.verdicts.forget_unseen();
        out
    }
}

/// Why a session's status is not believed, or the session not programmed at all.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    /// The spec breaks a rule: nothing of the session is held or programmed.
    #[error("invalid spec: {0}")]
    InvalidSpec(#[from] SpecError),
    #[error("status.node {0:?} is not a node of the cluster")]
    NoSuchNode(String),
    #[error("status.address {address} is not an address of node {node}")]
    NotTheNodesAddress { address: IpAddr, node: String },
    #[error("the agent on node {0} does not hold this session")]
    NotHeld(String),
    /// Not held by the agent now on the node, and renewed before it started: what an
    /// earlier agent there wrote (it died or was replaced), not a forgery. Still ignored, but
    /// not reported as forged.
    #[error("renewed by an earlier agent on node {0}, which is gone")]
    EarlierHolder(String),
    #[error("the agent on node {node} has no {transport} listener {listener_port} for port {port}")]
    NotItsListener {
        node: String,
        /// `TCP` or `UDP`.
        transport: &'static str,
        port: u16,
        listener_port: u16,
    },
    #[error("status.renewTime {0} is in the future")]
    RenewedInTheFuture(DateTime<Utc>),
}

impl Rejected {
    /// Whether this rejection is reported as a forged status (an earlier holder is not).
    pub fn forged(&self) -> bool {
        !matches!(self, Self::EarlierHolder(_) | Self::InvalidSpec(_))
    }

    /// Whether it is reported as an Event: forged statuses and invalid specs.
    pub fn reported(&self) -> bool {
        !matches!(self, Self::EarlierHolder(_))
    }
}

/// The addresses of `node` a holder's listeners may be bound to.
fn node_addresses(node: &Node) -> BTreeSet<IpAddr> {
    node.status
        .iter()
        .flat_map(|s| s.addresses.iter().flatten())
        .filter(|a| matches!(a.type_.as_str(), "InternalIP" | "ExternalIP"))
        .filter_map(|a| a.address.parse().ok())
        .collect()
}

/// Whether `session` may be programmed (see the module doc): its spec first, then its
/// status. A valid session whose mode redirects nothing (connect, preview), or without a
/// holder's address, is accepted: there is nothing in it to program.
pub fn check(
    session: &KtSession,
    nodes: &[&Node],
    records: &BTreeMap<String, Record>,
    now: DateTime<Utc>,
) -> Result<(), Rejected> {
    kt_proto::validate::spec(&session.spec)?;
    let Some(status) = &session.status else {
        return Ok(());
    };
    let Some(address) = status.address else {
        return Ok(());
    };
    if !matches!(session.spec.mode, SessionMode::Exchange | SessionMode::Mesh) {
        return Ok(());
    }
    if let Some(renewed) = status.renew_time
        && renewed > now + MAX_CLOCK_SKEW
    {
        return Err(Rejected::RenewedInTheFuture(renewed));
    }
    let node = nodes
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(status.node.as_str()))
        .ok_or_else(|| Rejected::NoSuchNode(status.node.clone()))?;
    if !node_addresses(node).contains(&address) {
        return Err(Rejected::NotTheNodesAddress {
            address,
            node: status.node.clone(),
        });
    }
    let record = records.get(&status.node);
    let meta = &session.metadata;
    let held = record
        .zip(meta.namespace.as_deref())
        .zip(meta.name.as_deref())
        .zip(meta.uid.as_deref())
        .and_then(|(((record, namespace), name), uid)| record.held(namespace, name, uid))
        .ok_or_else(|| {
            let started = record.and_then(|r| r.started);
            match (started, status.renew_time) {
                (Some(started), Some(renewed)) if renewed < started => {
                    Rejected::EarlierHolder(status.node.clone())
                }
                _ => Rejected::NotHeld(status.node.clone()),
            }
        })?;
    let claimed = [
        ("TCP", &status.listeners, &held.listeners),
        ("UDP", &status.udp_listeners, &held.udp_listeners),
    ];
    for (transport, listeners, vouched) in claimed {
        if let Some(l) = listeners.iter().find(|l| !vouched.contains(l)) {
            return Err(Rejected::NotItsListener {
                node: status.node.clone(),
                transport,
                port: l.port,
                listener_port: l.listener_port,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn node(name: &str, ip: &str) -> Node {
        serde_json::from_value(json!({"metadata": {"name": name},
            "status": {"addresses": [{"type": "InternalIP", "address": ip},
                                     {"type": "Hostname", "address": name}]}}))
        .unwrap()
    }

    fn session(status: serde_json::Value) -> KtSession {
        serde_json::from_value(json!({
            "apiVersion": "kt.dev/v1alpha1", "kind": "KtSession",
            "metadata": {"name": "web-alice", "namespace": "dev", "uid": "u1"},
            "spec": {"owner": "a", "mode": "exchange", "service": "web",
                     "ports": [{"port": 80, "localPort": 8080}], "publicKey": "k"},
            "status": status
        }))
        .unwrap()
    }

    fn status(node: &str, address: &str, renewed: DateTime<Utc>) -> serde_json::Value {
        json!({"node": node, "address": address, "renewTime": renewed,
               "listeners": [{"port": 80, "listenerPort": 40001}]})
    }

    fn held(uid: &str, listener_port: u16) -> BTreeMap<String, Record> {
        BTreeMap::from([(
            "node-1".to_owned(),
            Record::new(
                None,
                vec![HeldSession {
                    udp_listeners: Vec::new(),
                    namespace: "dev".into(),
                    name: "web-alice".into(),
                    uid: uid.into(),
                    listeners: vec![Listener {
                        port: 80,
                        listener_port,
                    }],
                }],
            ),
        )])
    }

    #[test]
    fn an_invalid_spec_is_refused_held_or_not_and_reported_but_not_as_forged() {
        let now = Utc::now();
        let n1 = node("node-1", "172.30.0.11");
        let mut s = session(status("node-1", "172.30.0.11", now));
        s.spec.service = "web.other-namespace".into();
        let refused = check(&s, &[&n1], &held("u1", 40001), now).unwrap_err();
        assert!(
            matches!(refused, Rejected::InvalidSpec(SpecError::ServiceName(_))),
            "{refused:?}"
        );
        assert!(refused.reported() && !refused.forged());
        s.status = None;
        s.spec.service = "web".into();
        s.spec.header = Some(kt_proto::session::HeaderMatch {
            name: "version".into(),
            value: "v".repeat(1 << 20),
        });
        assert!(matches!(
            check(&s, &[&n1], &BTreeMap::new(), now),
            Err(Rejected::InvalidSpec(SpecError::HeaderTooLong(_)))
        ));
    }

    #[test]
    fn a_status_its_holder_lists_is_accepted() {
        let now = Utc::now();
        let (n1, n2) = (node("node-1", "172.30.0.11"), node("node-2", "172.30.0.12"));
        let s = session(status("node-1", "172.30.0.11", now));
        assert_eq!(check(&s, &[&n1, &n2], &held("u1", 40001), now), Ok(()));
        let skewed = session(status(
            "node-1",
            "172.30.0.11",
            now + TimeDelta::seconds(20),
        ));
        assert_eq!(
            check(&skewed, &[&n1], &held("u1", 40001), now),
            Ok(()),
            "a holder's clock a little ahead is fine"
        );
    }

    /// The forged status: an address no node has, a listener, renewed an hour ahead.
    #[test]
    fn forged_statuses_are_rejected_with_their_reason() {
        let now = Utc::now();
        let n1 = node("node-1", "172.30.0.11");
        let nodes = [&n1];
        let records = held("u1", 40001);
        let hour = now + TimeDelta::hours(1);
        let cases = [
            (
                status("node-1", "172.30.0.100", hour),
                Rejected::RenewedInTheFuture(hour),
            ),
            (
                status("node-9", "172.30.0.11", now),
                Rejected::NoSuchNode("node-9".into()),
            ),
            (
                status("node-1", "172.30.0.100", now),
                Rejected::NotTheNodesAddress {
                    address: "172.30.0.100".parse().unwrap(),
                    node: "node-1".into(),
                },
            ),
            (
                json!({"node": "node-1", "address": "172.30.0.11", "renewTime": now,
                       "listeners": [{"port": 80, "listenerPort": 22}]}),
                Rejected::NotItsListener {
                    node: "node-1".into(),
                    transport: "TCP",
                    port: 80,
                    listener_port: 22,
                },
            ),
            (
                // The TCP listener is the agent's; a UDP one it never opened is not.
                json!({"node": "node-1", "address": "172.30.0.11", "renewTime": now,
                       "listeners": [{"port": 80, "listenerPort": 40001}],
                       "udpListeners": [{"port": 80, "listenerPort": 40001}]}),
                Rejected::NotItsListener {
                    node: "node-1".into(),
                    transport: "UDP",
                    port: 80,
                    listener_port: 40001,
                },
            ),
        ];
        for (forged, reason) in cases {
            assert_eq!(
                check(&session(forged.clone()), &nodes, &records, now),
                Err(reason),
                "{forged}"
            );
        }
        let s = session(status("node-1", "172.30.0.11", now));
        assert_eq!(
            check(&s, &nodes, &BTreeMap::new(), now),
            Err(Rejected::NotHeld("node-1".into())),
            "no record: nobody holds it"
        );
        let restarted = BTreeMap::from([(
            "node-1".to_owned(),
            Record::new(Some(now + TimeDelta::seconds(1)), Vec::new()),
        )]);
        let stale = check(&s, &nodes, &restarted, now + TimeDelta::seconds(2));
        assert_eq!(stale, Err(Rejected::EarlierHolder("node-1".into())));
        assert!(!stale.unwrap_err().forged(), "ignored, not reported");
        assert_eq!(
            check(&s, &nodes, &held("u0", 40001), now),
            Err(Rejected::NotHeld("node-1".into())),
            "a record for an earlier object of the same name"
        );
    }

    #[test]
    fn sessions_that_redirect_nothing_are_not_judged() {
        let now = Utc::now();
        let mut connect = session(status("node-9", "10.0.0.1", now + TimeDelta::hours(1)));
        connect.spec.mode = SessionMode::Connect;
        assert_eq!(check(&connect, &[], &BTreeMap::new(), now), Ok(()));
        let unheld = session(serde_json::Value::Null);
        assert_eq!(check(&unheld, &[], &BTreeMap::new(), now), Ok(()));
    }

    /// node-1's record ConfigMap at `version`, listing `web-alice` (uid `u1`) with listener
    /// `listener_port`.
    fn record_config_map(version: &str, listener_port: u16) -> ConfigMap {
        let sessions = held("u1", listener_port)["node-1"].sessions().to_vec();
        serde_json::from_value(json!({
            "metadata": {"name": "kt-node-agent-node-1", "namespace": "kt-system",
                         "resourceVersion": version},
            "data": {"node": "node-1", "sessions": serde_json::to_string(&sessions).unwrap()}}))
        .unwrap()
    }

    /// A kept verdict is reached again when the session, the records or the Nodes'
    /// addresses change, and a status renewed in the future is judged again each time.
    #[test]
    fn the_judge_keeps_a_verdict_until_what_it_was_reached_on_changes() {
        let now = Utc::now();
        let mut judge = Judge::default();
        let mut n1 = node("node-1", "172.30.0.11");
        let mut s = session(status("node-1", "172.30.0.11", now));
        s.metadata.resource_version = Some("1".into());
        let elsewhere = record_config_map("1", 40999);
        let verdict = |judge: &mut Judge, s: &KtSession, n1: &Node, cm: &ConfigMap, at| {
            judge.verdicts(&[s], &[n1], &[cm], at).remove(0)
        };
        let not_its = verdict(&mut judge, &s, &n1, &elsewhere, now);
        assert!(
            matches!(not_its, Err(Rejected::NotItsListener { .. })),
            "{not_its:?}"
        );
        let listed = record_config_map("2", 40001);
        assert_eq!(
            verdict(&mut judge, &s, &n1, &listed, now),
            Ok(()),
            "the record changed"
        );

        n1.status.as_mut().unwrap().addresses.as_mut().unwrap()[0].address = "172.30.0.99".into();
        assert!(matches!(
            verdict(&mut judge, &s, &n1, &listed, now),
            Err(Rejected::NotTheNodesAddress { .. })
        ));
        s.status.as_mut().unwrap().address = Some("172.30.0.99".parse().unwrap());
        s.metadata.resource_version = Some("2".into());
        assert_eq!(
            verdict(&mut judge, &s, &n1, &listed, now),
            Ok(()),
            "the session changed"
        );
        // Kept by resourceVersion: a change an API server would have given a new version
        // to is not looked at (it shows the verdict is kept, not reached again).
        let mut same_version = s.clone();
        same_version.status.as_mut().unwrap().address = Some("172.30.0.50".parse().unwrap());
        assert_eq!(
            verdict(&mut judge, &same_version, &n1, &listed, now),
            Ok(()),
            "kept"
        );

        let ahead = now + TimeDelta::hours(1);
        s.status.as_mut().unwrap().renew_time = Some(ahead);
        s.metadata.resource_version = Some("3".into());
        assert!(matches!(
            verdict(&mut judge, &s, &n1, &listed, now),
            Err(Rejected::RenewedInTheFuture(_))
        ));
        assert_eq!(
            verdict(&mut judge, &s, &n1, &listed, ahead),
            Ok(()),
            "the same version, judged again once its renewal is no longer ahead"
        );
        assert!(
            matches!(
                verdict(&mut judge, &s, &n1, &listed, now),
                Err(Rejected::RenewedInTheFuture(_))
            ),
            "the clock went back: the renewal is ahead again"
        );
    }

    #[test]
    fn records_are_read_from_config_maps_named_for_their_node() {
        let cm = |name: &str, node: &str| -> ConfigMap {
            serde_json::from_value(json!({"metadata": {"name": name, "namespace": "kt-system"},
                "data": {"node": node, "started": "2026-01-01T00:00:00Z",
                         "sessions": serde_json::to_string(held("u1", 1)["node-1"].sessions()).unwrap()}}))
            .unwrap()
        };
        let (good, misnamed) = (
            cm("kt-node-agent-node-1", "node-1"),
            cm("kt-node-agent-node-1", "node-2"),
        );
        let read = records(&[&good, &misnamed]);
        assert_eq!(read.keys().collect::<Vec<_>>(), ["node-1"]);
        assert_eq!(read["node-1"].sessions()[0].uid, "u1");
        assert!(read["node-1"].started.is_some());
    }

    #[test]
    fn a_record_finds_each_session_it_lists_by_name_and_uid() {
        let held = |ns: &str, name: &str, uid: &str| HeldSession {
            udp_listeners: Vec::new(),
            namespace: ns.into(),
            name: name.into(),
            uid: uid.into(),
            listeners: Vec::new(),
        };
        // Unsorted, with two objects of one name (a record written across a re-creation).
        let record = Record::new(
            None,
            vec![
                held("dev", "web-z", "u3"),
                held("b", "web", "u1"),
                held("dev", "web-a", "old"),
                held("dev", "web-a", "u2"),
                held("a", "web", "u0"),
            ],
        );
        let names: Vec<_> = record.sessions().iter().map(|h| &h.uid).collect();
        assert_eq!(
            names,
            ["u0", "u1", "old", "u2", "u3"],
            "sorted by namespace, name"
        );
        for (ns, name, uid) in [
            ("a", "web", "u0"),
            ("dev", "web-a", "u2"),
            ("dev", "web-a", "old"),
            ("dev", "web-z", "u3"),
        ] {
            assert_eq!(
                record.held(ns, name, uid).map(|h| h.uid.as_str()),
                Some(uid)
            );
        }
        for (ns, name, uid) in [
            ("dev", "web-a", "u9"),
            ("dev", "web", "u1"),
            ("c", "web", "u1"),
            ("", "", ""),
        ] {
            assert_eq!(record.held(ns, name, uid), None, "{ns}/{name} {uid}");
        }
    }

    #[test]
    fn cached_records_are_parsed_again_only_when_a_config_map_changes() {
        let cm = |version: &str, uid: &str| -> ConfigMap {
            serde_json::from_value(json!({"metadata": {"name": "kt-node-agent-node-1",
                    "namespace": "kt-system", "resourceVersion": version},
                "data": {"node": "node-1",
                         "sessions": serde_json::to_string(held(uid, 1)["node-1"].sessions()).unwrap()}}))
            .unwrap()
        };
        let mut cache = RecordCache::default();
        let uid = |records: &BTreeMap<String, Record>| records["node-1"].sessions()[0].uid.clone();
        assert_eq!(uid(cache.current(&[&cm("1", "u1")])), "u1");
        // Same version, other content: only an API server's write changes the version, so
        // this is what shows the parse was skipped.
        assert_eq!(uid(cache.current(&[&cm("1", "u2")])), "u1");
        assert_eq!(uid(cache.current(&[&cm("2", "u2")])), "u2");
        assert!(cache.current(&[]).is_empty(), "record gone");
        let mut unversioned = cm("1", "u3");
        unversioned.metadata.resource_version = None;
        assert_eq!(uid(cache.current(&[&unversioned])), "u3");
        unversioned = cm("1", "u4");
        unversioned.metadata.resource_version = None;
        assert_eq!(
            uid(cache.current(&[&unversioned])),
            "u4",
            "no version: always parsed"
        );
    }
}
