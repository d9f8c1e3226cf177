//! The Kubernetes Events agents record on a `KtSession` (pure), so that
//! `kubectl describe kts <name>` and `kubectl get events` tell a session's life:
//!
//! | reason | type | recorded by | when |
//! |---|---|---|---|
//! | `Seen` | Normal | the first agent to see the session | once per session (uid) |
//! | `Held` | Normal | the holding agent | its first status write for a connection |
//! | `Released` | Normal | the holding agent | it cleared the status as the connection ended |
//! | `LeaseExpired` | Warning | the first agent to notice | once per expired renewal |
//! | `Collected` | Normal | the agent whose deletion succeeded | once (see [`super::collect`]) |
//! | `ForgedStatus` | Warning | every agent that does not believe the status | once per version ([`super::trust`]) |
//!
//! `Seen` and `LeaseExpired` are noticed by every agent: each remembers what it reported
//! ([`Transitions`]) so that a reconcile does not repeat it, and all of them give the Event
//! the same name ([`SessionEvent::dedupe`]), so the first create wins and the others meet
//! `AlreadyExists` — one Event per transition in the cluster, recorded by whichever agent is
//! alive to see it. Each Event names the reporting agent's node (message, `source.host`,
//! `reportingInstance`).

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
// foldhash, not SipHash: looked up per session or Service each pass (see `kept`).
use foldhash::HashSet;
use kt_proto::session::{KtSession, Listener};

use super::trust::Rejected;

/// `Seen`: a session appeared.
pub const SEEN: &str = "Seen";
/// `Held`: an agent holds the session's tunnel.
pub const HELD: &str = "Held";
/// `Released`: the holder cleared the status as the connection ended.
pub const RELEASED: &str = "Released";
/// `LeaseExpired`: the last renewal is older than the lease; nothing is redirected.
pub const LEASE_EXPIRED: &str = "LeaseExpired";
/// `Collected`: an agent deleted the session nobody held.
pub const COLLECTED: &str = "Collected";
/// `ForgedStatus`: a status no agent vouches for.
pub const FORGED_STATUS: &str = "ForgedStatus";
/// The Event's `reason` for a spec that breaks a rule ([`kt_proto::validate::spec`]).
pub const INVALID_SPEC: &str = "InvalidSpec";

/// One Event to record on a session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionEvent {
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
    pub resource_version: Option<String>,
    /// `Normal` or `Warning`.
    pub type_: &'static str,
    /// One of this module's reasons.
    pub reason: &'static str,
    pub message: String,
    /// The Event's name when every agent records the same transition (the first create
    /// wins); `None` for a fresh name.
    pub dedupe: Option<String>,
}

/// The first 8 characters of a uid: enough to tell a recreated session's Events apart.
fn short_uid(uid: Option<&str>) -> &str {
    uid.map_or("", |u| u.get(..8).unwrap_or(u))
}

/// An Event name from parts: a DNS subdomain (the session name is one), at most 253 bytes.
fn event_name(session: &str, parts: &[&str]) -> String {
    let tail: String = parts
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| format!(".{p}"))
        .collect();
    let keep = 253usize.saturating_sub(tail.len());
    let head = session.get(..keep.min(session.len())).unwrap_or(session);
    format!("{}{tail}", head.trim_end_matches(['.', '-']))
}

/// The mode as the CRD spells it (`exchange`).
fn mode_name(mode: kt_proto::session::SessionMode) -> String {
    serde_json::to_value(mode)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("{mode:?}").to_lowercase())
}

fn listeners_text(listeners: &[Listener], udp_listeners: &[Listener]) -> String {
    let sorted = |list: &[Listener], suffix: &str| {
        let mut sorted: Vec<&Listener> = list.iter().collect();
        sorted.sort_by_key(|l| (l.port, l.listener_port));
        sorted
            .iter()
            .map(|l| format!("{}{suffix}→{}", l.port, l.listener_port))
            .collect::<Vec<String>>()
    };
    let mut all = sorted(listeners, "");
    all.extend(sorted(udp_listeners, "/udp"));
    if all.is_empty() {
        "no listeners".into()
    } else {
        format!("listeners {}", all.join(", "))
    }
}

impl SessionEvent {
    fn of(session: &KtSession, type_: &'static str, reason: &'static str, message: String) -> Self {
        Self {
            namespace: session.metadata.namespace.clone().unwrap_or_default(),
            name: session.metadata.name.clone().unwrap_or_default(),
            uid: session.metadata.uid.clone(),
            resource_version: session.metadata.resource_version.clone(),
            type_,
            reason,
            message,
            dedupe: None,
        }
    }

    /// `Seen`, named alike by every agent.
    pub fn seen(session: &KtSession, node: &str) -> Self {
        let mut event = Self::of(
            session,
            "Normal",
            SEEN,
            format!(
                "{} session of {} seen by the agent on {node}",
                mode_name(session.spec.mode),
                session.spec.owner
            ),
        );
        event.dedupe = Some(event_name(
            &event.name,
            &[short_uid(event.uid.as_deref()), "seen"],
        ));
        event
    }

    /// `Held` by the agent on `node` at `address` with `listeners` (TCP) and
    /// `udp_listeners`.
    pub fn held(
        namespace: &str,
        name: &str,
        uid: &str,
        node: &str,
        address: std::net::IpAddr,
        listeners: &[Listener],
        udp_listeners: &[Listener],
    ) -> Self {
        Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            uid: Some(uid.to_owned()).filter(|u| !u.is_empty()),
            resource_version: None,
            type_: "Normal",
            reason: HELD,
            message: format!(
                "held by the agent on {node} ({address}, {})",
                listeners_text(listeners, udp_listeners)
            ),
            dedupe: None,
        }
    }

    /// `Released` by the agent on `node`: its connection ended.
    pub fn released(namespace: &str, name: &str, uid: &str, node: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            uid: Some(uid.to_owned()).filter(|u| !u.is_empty()),
            resource_version: None,
            type_: "Normal",
            reason: RELEASED,
            message: format!("released by the agent on {node}: the workstation's connection ended"),
            dedupe: None,
        }
    }

    /// `LeaseExpired` of the renewal at `renewed` by the holder on `holder`, seen by the
    /// agent on `node`; named alike by every agent.
    fn lease_expired(
        session: &KtSession,
        holder: &str,
        renewed: DateTime<Utc>,
        node: &str,
    ) -> Self {
        let mut event = Self::of(
            session,
            "Warning",
            LEASE_EXPIRED,
            format!(
                "the lease of the holder on {holder} ran out ({} s after its last renewal at {}); \
                 nothing is redirected for it (seen by the agent on {node})",
                session.spec.lease_seconds,
                renewed.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ),
        );
        let at = format!("{:x}", renewed.timestamp_millis());
        event.dedupe = Some(event_name(
            &event.name,
            &[short_uid(event.uid.as_deref()), "lease-expired", &at],
        ));
        event
    }

    /// `Collected` by the agent on `node`, after it deleted the session `namespace/name`
    /// (`why`: which wait ran out).
    pub fn collected(
        namespace: &str,
        name: &str,
        uid: Option<String>,
        node: &str,
        why: &str,
    ) -> Self {
        Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            uid,
            resource_version: None,
            type_: "Normal",
            reason: COLLECTED,
            message: format!("deleted by the agent on {node}: {why}"),
            dedupe: None,
        }
    }

    /// `InvalidSpec` when the spec breaks a rule ([`kt_proto::validate::spec`]), else
    /// `ForgedStatus`: the agent on `node` does not believe the status, for `reason`.
    pub fn rejected(session: &KtSession, node: &str, reason: &Rejected) -> Self {
        let (event_reason, what) = if matches!(reason, Rejected::InvalidSpec(_)) {
            (INVALID_SPEC, "session refused")
        } else {
            (FORGED_STATUS, "status ignored")
        };
        Self::of(
            session,
            "Warning",
            event_reason,
            format!("{what} by the agent on {node}: {reason}; nothing is redirected for it"),
        )
    }
}

/// What this agent has reported of the transitions every agent notices (`Seen`,
/// `LeaseExpired`), to report each once.
#[derive(Debug, Default)]
pub struct Transitions {
    /// Sessions (uid) reported as seen.
    seen: HashSet<String>,
    /// Expired renewals (uid, renewal) reported.
    expired: BTreeSet<(String, DateTime<Utc>)>,
}

impl Transitions {
    /// The Events due at `now` for `sessions` as the agent on `node` sees them; forgets
    /// sessions that are gone. A session being deleted reports nothing.
    pub fn due(
        &mut self,
        sessions: &[&KtSession],
        node: &str,
        now: DateTime<Utc>,
    ) -> Vec<SessionEvent> {
        let mut events = Vec::new();
        // How many of `seen` are still there: when all are, no session is gone, and the
        // sessions are not walked again (with 1 000 sessions that walk was a tenth of a
        // pass: issue 17). Every uid in `expired` is in `seen`.
        let mut found = 0;
        for session in sessions {
            let Some(uid) = session.metadata.uid.as_deref() else {
                continue;
            };
            if session.metadata.deletion_timestamp.is_some() {
                found += usize::from(self.seen.contains(uid));
                continue;
            }
            found += 1;
            if !self.seen.contains(uid) {
                self.seen.insert(uid.to_owned());
                events.push(SessionEvent::seen(session, node));
            }
            let Some(status) = &session.status else {
                continue;
            };
            let (Some(renewed), false) = (status.renew_time, status.node.is_empty()) else {
                continue;
            };
            if !session.lease_live(now) && self.expired.insert((uid.to_owned(), renewed)) {
                events.push(SessionEvent::lease_expired(
                    session,
                    &status.node,
                    renewed,
                    node,
                ));
            }
        }
        if self.seen.len() > found {
            let live: HashSet<&str> = sessions
                .iter()
                .filter_map(|s| s.metadata.uid.as_deref())
                .collect();
            self.seen.retain(|uid| live.contains(uid.as_str()));
            self.expired.retain(|(uid, _)| live.contains(uid.as_str()));
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn session(uid: &str, status: serde_json::Value) -> KtSession {
        serde_json::from_value(json!({
            "apiVersion": "kt.dev/v1alpha1", "kind": "KtSession",
            "metadata": {"name": "web-alice", "namespace": "dev", "uid": uid, "resourceVersion": "7"},
            "spec": {"owner": "alice@laptop", "mode": "exchange", "service": "web",
                     "ports": [{"port": 80, "localPort": 8080}], "publicKey": "k",
                     "leaseSeconds": 10},
            "status": status,
        }))
        .unwrap()
    }

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn reasons(events: &[SessionEvent]) -> Vec<&str> {
        events.iter().map(|e| e.reason).collect()
    }

    #[test]
    fn a_session_is_seen_once_and_again_only_when_recreated() {
        let mut t = Transitions::default();
        let s = session("0123456789ab", json!(null));
        let now = at("2026-01-01T00:00:00Z");
        let first = t.due(&[&s], "node-1", now);
        assert_eq!(reasons(&first), ["Seen"]);
        assert_eq!(first[0].dedupe.as_deref(), Some("web-alice.01234567.seen"));
        assert_eq!(
            first[0].message,
            "exchange session of alice@laptop seen by the agent on node-1"
        );
        assert!(t.due(&[&s], "node-1", now).is_empty(), "not on every pass");
        // Gone, then recreated with another uid: seen again.
        assert!(t.due(&[], "node-1", now).is_empty());
        let again = session("fedcba9876", json!(null));
        assert_eq!(reasons(&t.due(&[&again], "node-1", now)), ["Seen"]);
    }

    #[test]
    fn a_session_gone_in_the_pass_another_came_is_forgotten() {
        let mut t = Transitions::default();
        let now = at("2026-01-01T00:00:00Z");
        let (a, b) = (session("a1", json!(null)), session("b2", json!(null)));
        assert_eq!(reasons(&t.due(&[&a], "node-1", now)), ["Seen"]);
        // As many sessions as before, but a is gone: forgotten, so seen again when back.
        assert_eq!(reasons(&t.due(&[&b], "node-1", now)), ["Seen"]);
        assert_eq!(reasons(&t.due(&[&a, &b], "node-1", now)), ["Seen"]);
        // Being deleted is not gone: not seen again after.
        let mut deleting = a.clone();
        deleting.metadata.deletion_timestamp =
            Some(serde_json::from_value(json!("2026-01-01T00:00:00Z")).unwrap());
        assert!(t.due(&[&deleting, &b], "node-1", now).is_empty());
        assert!(t.due(&[&a, &b], "node-1", now).is_empty());
    }

    #[test]
    fn an_expired_lease_is_reported_once_per_renewal() {
        let mut t = Transitions::default();
        let held = json!({"node": "node-1", "address": "10.0.0.1",
                          "renewTime": "2026-01-01T00:00:00Z", "listeners": []});
        let s = session("0123456789ab", held);
        let live = at("2026-01-01T00:00:05Z");
        assert_eq!(reasons(&t.due(&[&s], "node-2", live)), ["Seen"]);
        assert!(t.due(&[&s], "node-2", live).is_empty(), "lease still live");
        let after = at("2026-01-01T00:00:11Z");
        let expired = t.due(&[&s], "node-2", after);
        assert_eq!(reasons(&expired), ["LeaseExpired"]);
        assert_eq!(expired[0].type_, "Warning");
        assert!(
            expired[0]
                .message
                .starts_with("the lease of the holder on node-1 ran out")
                && expired[0]
                    .message
                    .ends_with("(seen by the agent on node-2)"),
            "{}",
            expired[0].message
        );
        assert_eq!(
            expired[0].dedupe.as_deref(),
            Some("web-alice.01234567.lease-expired.19b76daa800"),
            "the renewal's Unix milliseconds (1767225600000), in hex"
        );
        assert!(t.due(&[&s], "node-2", after).is_empty(), "once");
        // Renewed and expired again: a new transition.
        let renewed = session(
            "0123456789ab",
            json!({"node": "node-1", "renewTime": "2026-01-01T00:01:00Z"}),
        );
        assert!(
            t.due(&[&renewed], "node-2", at("2026-01-01T00:01:05Z"))
                .is_empty()
        );
        assert_eq!(
            reasons(&t.due(&[&renewed], "node-2", at("2026-01-01T00:01:11Z"))),
            ["LeaseExpired"]
        );
    }

    #[test]
    fn a_released_or_never_held_session_has_no_lease_to_expire() {
        let mut t = Transitions::default();
        let never = session("a1", json!(null));
        let released = session("b2", json!({"node": "", "listeners": []}));
        let late = at("2030-01-01T00:00:00Z");
        assert_eq!(
            reasons(&t.due(&[&never, &released], "node-1", late)),
            ["Seen", "Seen"]
        );
        assert!(t.due(&[&never, &released], "node-1", late).is_empty());
    }

    #[test]
    fn event_names_stay_dns_subdomains_of_at_most_253_bytes() {
        let long = "a".repeat(253);
        let name = event_name(&long, &["01234567", "lease-expired", "19b76f66000"]);
        assert_eq!(name.len(), 253);
        assert!(name.ends_with(".01234567.lease-expired.19b76f66000"));
        assert_eq!(
            event_name("web", &["", "seen"]),
            "web.seen",
            "no empty label"
        );
    }

    #[test]
    fn held_names_the_node_its_address_and_listeners() {
        let event = SessionEvent::held(
            "dev",
            "web-alice",
            "u1",
            "node-1",
            "10.0.0.1".parse().unwrap(),
            &[
                Listener {
                    port: 8080,
                    listener_port: 40002,
                },
                Listener {
                    port: 80,
                    listener_port: 40001,
                },
            ],
            &[Listener {
                port: 53,
                listener_port: 40003,
            }],
        );
        assert_eq!(event.reason, "Held");
        assert_eq!(
            event.message,
            "held by the agent on node-1 (10.0.0.1, listeners 80→40001, 8080→40002, 53/udp→40003)"
        );
    }
}
