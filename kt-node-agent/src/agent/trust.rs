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
    config_maps.iter().filter_map(|cm| record_of(cm)).collect()
}

/// The record `cm` holds, and its node; a record that does not parse, or names another
/// node than its name says, reads as absent.
fn record_of(cm: &ConfigMap) -> Option<(String, Record)> {
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
}

/// [`records`] kept from pass to pass: a ConfigMap is parsed again only when it changed (by
/// name and `resourceVersion`). A record of 1 000 sessions is about 100 KiB of JSON, every
/// hold rewrites its holder's record, and the other nodes' records stay as they were.
#[derive(Debug, Default)]
pub struct RecordCache {
    /// Per ConfigMap name: its resourceVersion when read, and the node of the record it held.
    read_from: BTreeMap<String, (Option<String>, Option<String>)>,
    records: BTreeMap<String, Record>,
}

/// What [`RecordCache::refresh`] found changed in the records.
#[derive(Debug, PartialEq, Eq)]
pub enum RecordsChanged {
    /// No record changed.
    Nothing,
    /// Only the entries of these sessions (`namespace/name`, as [`super::kept::write_key`]
    /// writes it): every record's node and start time stayed.
    Sessions(BTreeSet<String>),
    /// A record came or went, or its agent started again: any verdict may change.
    All,
}

impl RecordCache {
    /// The records as last read.
    pub fn records(&self) -> &BTreeMap<String, Record> {
        &self.records
    }

    /// Reads again the records of `config_maps` that changed since the last call, and says
    /// what changed. A holder rewrites its record each time it takes or lets go a session,
    /// so with 1 000 sessions most changes touch one entry of a thousand.
    pub fn refresh(&mut self, config_maps: &[&ConfigMap]) -> RecordsChanged {
        fn name_of(cm: &ConfigMap) -> &str {
            cm.metadata.name.as_deref().unwrap_or_default()
        }
        let (mut any, mut all) = (false, false);
        let mut changed = BTreeSet::new();
        // Called on every pass: nothing is copied for a ConfigMap that did not change.
        let present: BTreeSet<&str> = config_maps.iter().map(|cm| name_of(cm)).collect();
        let gone: Vec<String> = self
            .read_from
            .keys()
            .filter(|name| !present.contains(name.as_str()))
            .cloned()
            .collect();
        for name in gone {
            any = true;
            if let Some((_, Some(node))) = self.read_from.remove(&name) {
                self.records.remove(&node);
                all = true;
            }
        }
        for cm in config_maps {
            let name = name_of(cm);
            let version = &cm.metadata.resource_version;
            // Without a resourceVersion (not from an API server) nothing tells a change
            // apart: always read.
            if version.is_some()
                && self
                    .read_from
                    .get(name)
                    .is_some_and(|(read, _)| read == version)
            {
                continue;
            }
            any = true;
            let new = record_of(cm);
            let old = self
                .read_from
                .insert(
                    name.to_owned(),
                    (version.clone(), new.as_ref().map(|(node, _)| node.clone())),
                )
                .and_then(|(_, node)| node)
                .and_then(|node| self.records.remove(&node).map(|old| (node, old)));
            match (old, new) {
                (None, None) => {}
                (Some((old_node, old)), Some((node, new)))
                    if old_node == node && old.started == new.started =>
                {
                    changed_entries(&old.sessions, &new.sessions, &mut changed);
                    self.records.insert(node, new);
                }
                (_, new) => {
                    all = true;
                    if let Some((node, new)) = new {
                        self.records.insert(node, new);
                    }
                }
            }
        }
        match (any, all) {
            (false, _) => RecordsChanged::Nothing,
            (true, true) => RecordsChanged::All,
            (true, false) => RecordsChanged::Sessions(changed),
        }
    }
}

/// Adds to `changed` `namespace/name` of each session whose entries differ between `old`
/// and `new` (both sorted by namespace and name, as [`Record::new`] keeps them): a merge of
/// the two lists, comparing the entries of one name (a name may be listed under two uids)
/// as a whole.
fn changed_entries(old: &[HeldSession], new: &[HeldSession], changed: &mut BTreeSet<String>) {
    use std::cmp::Ordering;
    fn name(h: &HeldSession) -> (&str, &str) {
        (&h.namespace, &h.name)
    }
    // The end of the entries named as the one at `at`.
    let run_end = |list: &[HeldSession], at: usize| {
        at + list[at..]
            .iter()
            .take_while(|h| name(h) == name(&list[at]))
            .count()
    };
    let (mut i, mut j) = (0, 0);
    while i < old.len() || j < new.len() {
        let order = match (old.get(i), new.get(j)) {
            (Some(a), Some(b)) => name(a).cmp(&name(b)),
            (Some(_), None) => Ordering::Less,
            (None, _) => Ordering::Greater,
        };
        let (old_end, new_end) = match order {
            Ordering::Less => (run_end(old, i), j),
            Ordering::Greater => (i, run_end(new, j)),
            Ordering::Equal => (run_end(old, i), run_end(new, j)),
        };
        if old[i..old_end] != new[j..new_end] {
            let h = if old_end > i { &old[i] } else { &new[j] };
            let mut key = String::new();
            super::kept::write_name_key(&mut key, &h.namespace, &h.name);
            changed.insert(key);
        }
        (i, j) = (old_end, new_end);
    }
}

/// [`check`] from pass to pass: the records kept as [`RecordCache`] keeps them, and each
/// session's verdict kept until the session changes (its `resourceVersion`), its entry in
/// the records does, a record comes, goes or its agent starts again, the Nodes' addresses
/// change, or the clock goes back. With 1 000 sessions, checking each
/// on every pass was most of a pass that programs nothing new (the `reconcile` benchmark,
/// issue 17).
#[derive(Debug, Default)]
pub struct Judge {
    records: RecordCache,
    /// What the kept verdicts were reached on besides the records: the Nodes' names and
    /// addresses, hashed.
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
        let records_changed = self.records.refresh(config_maps);
        let records = self.records.records();
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
        (nodes.len(), nodes_hash).hash(&mut h);
        let on = h.finish();
        let clock_back = self.last_now.is_some_and(|last| now < last);
        let same_nodes_and_clock = on == self.on && !clock_back;
        match records_changed {
            RecordsChanged::Nothing if same_nodes_and_clock => {}
            // A holder taking one more session rewrites its record of a thousand: only the
            // verdicts of the sessions whose entries changed are reached again.
            RecordsChanged::Sessions(keys) if same_nodes_and_clock => {
                for key in keys {
                    self.verdicts.forget(&key);
                }
            }
            _ => self.verdicts.clear(),
        }
        self.on = on;
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
    fn cached_records_are_parsed_again_only_when_a_config_map_changes_and_say_what_did() {
        let cm = |version: &str, uid: &str| -> ConfigMap {
            serde_json::from_value(json!({"metadata": {"name": "kt-node-agent-node-1",
                    "namespace": "kt-system", "resourceVersion": version},
                "data": {"node": "node-1",
                         "sessions": serde_json::to_string(held(uid, 1)["node-1"].sessions()).unwrap()}}))
            .unwrap()
        };
        let alice = || RecordsChanged::Sessions(BTreeSet::from(["dev/web-alice".to_owned()]));
        let mut cache = RecordCache::default();
        let uid = |cache: &RecordCache| cache.records()["node-1"].sessions()[0].uid.clone();
        assert_eq!(
            cache.refresh(&[&cm("1", "u1")]),
            RecordsChanged::All,
            "a record came"
        );
        assert_eq!(uid(&cache), "u1");
        // Same version, other content: only an API server's write changes the version, so
        // this is what shows the parse was skipped.
        assert_eq!(cache.refresh(&[&cm("1", "u2")]), RecordsChanged::Nothing);
        assert_eq!(uid(&cache), "u1");
        assert_eq!(cache.refresh(&[&cm("2", "u2")]), alice());
        assert_eq!(uid(&cache), "u2");
        // Another node's record comes; then node-1's changes and node-2's is given other
        // content at its version: only node-1's is read again.
        let other = |version: &str, uid: &str| {
            let mut cm = cm(version, uid);
            cm.metadata.name = Some(record_name("node-2"));
            cm.data
                .as_mut()
                .unwrap()
                .insert(RECORD_NODE_KEY.into(), "node-2".into());
            cm
        };
        assert_eq!(
            cache.refresh(&[&cm("2", "u2"), &other("1", "u7")]),
            RecordsChanged::All
        );
        assert_eq!(
            cache.refresh(&[&other("1", "u8"), &cm("3", "u3")]),
            alice(),
            "in any order"
        );
        assert_eq!(uid(&cache), "u3");
        assert_eq!(cache.records()["node-2"].sessions()[0].uid, "u7");
        assert_eq!(
            cache.refresh(&[&cm("3", "u3")]),
            RecordsChanged::All,
            "node-2's went"
        );
        assert_eq!(cache.records().len(), 1);
        assert_eq!(cache.refresh(&[&cm("2", "u2")]), alice());
        assert_eq!(
            cache.refresh(&[&cm("4", "u2")]),
            RecordsChanged::Sessions(BTreeSet::new()),
            "written again, the same"
        );
        assert_eq!(cache.refresh(&[]), RecordsChanged::All, "record gone");
        assert!(cache.records().is_empty());
        let mut unversioned = cm("1", "u3");
        unversioned.metadata.resource_version = None;
        assert_eq!(cache.refresh(&[&unversioned]), RecordsChanged::All);
        unversioned = cm("1", "u4");
        unversioned.metadata.resource_version = None;
        assert_eq!(
            cache.refresh(&[&unversioned]),
            alice(),
            "no version: always parsed"
        );
        assert_eq!(uid(&cache), "u4");
        let mut restarted = cm("5", "u4");
        restarted
            .data
            .as_mut()
            .unwrap()
            .insert(RECORD_STARTED_KEY.into(), "2026-01-01T00:00:00Z".into());
        assert_eq!(
            cache.refresh(&[&restarted]),
            RecordsChanged::All,
            "its agent started again"
        );
    }

    #[test]
    fn the_entries_that_changed_between_two_records_are_found_by_name() {
        let entry = |name: &str, uid: &str, listener_port: u16| HeldSession {
            namespace: "dev".into(),
            name: name.into(),
            uid: uid.into(),
            listeners: vec![Listener {
                port: 80,
                listener_port,
            }],
            udp_listeners: Vec::new(),
        };
        let old = Record::new(
            None,
            vec![
                entry("a", "u1", 1),
                entry("b", "u2", 2),
                entry("b", "u3", 3),
                entry("d", "u5", 5),
                entry("e", "u6", 6),
            ],
        );
        let new = Record::new(
            None,
            vec![
                entry("a", "u1", 1),
                entry("b", "u3", 3),
                entry("c", "u4", 4),
                entry("d", "u5", 9),
                entry("e", "u6", 6),
                entry("f", "u7", 7),
            ],
        );
        let mut changed = BTreeSet::new();
        changed_entries(old.sessions(), new.sessions(), &mut changed);
        assert_eq!(
            changed,
            BTreeSet::from(["dev/b", "dev/c", "dev/d", "dev/f"].map(String::from)),
            "one of b's two uids went, c and f came, d's listener changed"
        );
        // Two uids under one name: the second's listener changes, or it goes.
        let two = Record::new(None, vec![entry("b", "u2", 2), entry("b", "u3", 3)]);
        for second in [
            vec![entry("b", "u2", 2), entry("b", "u3", 4)],
            vec![entry("b", "u2", 2)],
        ] {
            changed.clear();
            changed_entries(
                two.sessions(),
                Record::new(None, second).sessions(),
                &mut changed,
            );
            assert_eq!(changed, BTreeSet::from(["dev/b".to_owned()]));
        }
        changed.clear();
        changed_entries(new.sessions(), &[], &mut changed);
        assert_eq!(changed.len(), 6, "all gone");
    }

    /// Over random edits of two nodes' records and of the sessions, the judge's kept
    /// verdicts are always what [`check`] gives afresh.
    #[test]
    fn kept_verdicts_match_fresh_checks_over_random_record_and_session_edits() {
        use rand::{Rng, SeedableRng, rngs::StdRng};
        const SESSIONS: usize = 12;
        let mut rng = StdRng::seed_from_u64(17);
        let now = Utc::now();
        let nodes = [node("node-1", "172.30.0.11"), node("node-2", "172.30.0.12")];
        let node_refs: Vec<&Node> = nodes.iter().collect();
        let session_at = |n: usize, node: usize, uid: u8, port: u16, version: u64| -> KtSession {
            let mut s = session(status(
                &format!("node-{}", node + 1),
                &format!("172.30.0.1{}", node + 1),
                now,
            ));
            s.metadata.name = Some(format!("s{}", n / 2));
            s.metadata.namespace = Some(["dev", "other"][n % 2].into());
            s.metadata.uid = Some(format!("u{n}-{uid}"));
            s.metadata.resource_version = Some(version.to_string());
            s.status.as_mut().unwrap().listeners[0].listener_port = port;
            s
        };
        // Per session slot: node, uid, listener port, version.
        let mut slots: Vec<(usize, u8, u16, u64)> =
            (0..SESSIONS).map(|n| (n % 2, 0, 40_000, 1)).collect();
        // Per node: its entries (slot, uid, listener port), its start, its version.
        let mut listed: [Vec<(usize, u8, u16)>; 2] = [Vec::new(), Vec::new()];
        let mut started = [0u8; 2];
        let mut present = [true; 2];
        let mut versions = [1u64; 2];
        let mut judge = Judge::default();
        for step in 0..600 {
            // Up to three edits between two passes: several records may change in one.
            for _ in 0..rng.random_range(1..=3) {
                match rng.random_range(0..10) {
                    0..=3 => {
                        let node = rng.random_range(0..2);
                        let slot = rng.random_range(0..SESSIONS);
                        let entries = &mut listed[node];
                        match entries.iter().position(|e| e.0 == slot) {
                            Some(at) if rng.random_bool(0.5) => {
                                entries.remove(at);
                            }
                            Some(at) => entries[at].2 = 40_000 + rng.random_range(0..2),
                            None => entries.push((
                                slot,
                                rng.random_range(0..2),
                                40_000 + rng.random_range(0..2),
                            )),
                        }
                        versions[node] += 1;
                    }
                    4..=6 => {
                        let slot = &mut slots[rng.random_range(0..SESSIONS)];
                        *slot = (
                            rng.random_range(0..2),
                            rng.random_range(0..2),
                            40_000 + rng.random_range(0..2),
                            slot.3 + 1,
                        );
                    }
                    7 => {
                        let node = rng.random_range(0..2);
                        started[node] = rng.random_range(0..2);
                        versions[node] += 1;
                    }
                    8 => {
                        let node = rng.random_range(0..2);
                        present[node] = !present[node];
                        versions[node] += 1;
                    }
                    _ => {}
                }
            }
            let sessions: Vec<KtSession> = slots
                .iter()
                .enumerate()
                .map(|(n, &(node, uid, port, version))| session_at(n, node, uid, port, version))
                .collect();
            let config_maps: Vec<ConfigMap> = (0..2)
                .filter(|&node| present[node])
                .map(|node| {
                    let held: Vec<HeldSession> = listed[node]
                        .iter()
                        .map(|&(slot, uid, port)| {
                            let s = session_at(slot, node, uid, port, 0);
                            HeldSession {
                                namespace: s.metadata.namespace.unwrap(),
                                name: s.metadata.name.unwrap(),
                                uid: s.metadata.uid.unwrap(),
                                listeners: s.status.unwrap().listeners,
                                udp_listeners: Vec::new(),
                            }
                        })
                        .collect();
                    let name = format!("node-{}", node + 1);
                    // Before the renewals, or after them (what an agent started again
                    // finds: an earlier holder's statuses).
                    let started = match started[node] {
                        0 => now - TimeDelta::days(1),
                        _ => now + TimeDelta::days(1),
                    };
                    serde_json::from_value(json!({
                        "metadata": {"name": record_name(&name), "namespace": "kt-system",
                                     "resourceVersion": versions[node].to_string()},
                        "data": {"node": name,
                                 "started": started.to_rfc3339(),
                                 "sessions": serde_json::to_string(&held).unwrap()}}))
                    .unwrap()
                })
                .collect();
            let (session_refs, cm_refs): (Vec<&KtSession>, Vec<&ConfigMap>) =
                (sessions.iter().collect(), config_maps.iter().collect());
            let fresh_records = records(&cm_refs);
            let fresh: Vec<_> = sessions
                .iter()
                .map(|s| check(s, &node_refs, &fresh_records, now))
                .collect();
            assert_eq!(
                judge.verdicts(&session_refs, &node_refs, &cm_refs, now),
                fresh,
                "step {step}"
            );
        }
    }
}
