//! Collecting dead sessions (pure): a `KtSession` stays in the cluster after `kill -9` of
//! its ktctl — its lease runs out, so no traffic goes to the dead workstation, but the
//! objects would pile up. Every agent deletes a session that nobody has held for long
//! enough:
//!
//! - a `preview` session after its lease (its Service answers nothing meanwhile, so it
//!   should go soon; the cluster's garbage collector then removes the Service and the
//!   EndpointSlice it owns);
//! - any other session after the grace period (`--session-grace-seconds`, default 5
//!   minutes), plus its lease when it was never held at all.
//!
//! "Unheld for long enough" is measured by this agent from the moment it first saw the
//! session unheld, and the lease end it compares with is written by the holding agent: no
//! workstation's clock takes part, so a developer whose clock is an hour off can neither
//! keep a dead session nor have a live one collected. The deletion carries the session's
//! `resourceVersion` as a precondition, so a renewal this agent has not seen yet wins.

use std::collections::HashMap;

use chrono::{DateTime, TimeDelta, Utc};
use kt_proto::session::{KtSession, SessionMode};

/// The default grace period of a dead non-preview session.
pub const DEFAULT_GRACE: std::time::Duration = std::time::Duration::from_secs(5 * 60);

/// One session to delete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Due {
    pub namespace: String,
    pub name: String,
    /// The version judged dead: the deletion's precondition.
    pub resource_version: Option<String>,
    /// The session's uid, for the `Collected` Event.
    pub uid: Option<String>,
    pub mode: SessionMode,
}

/// When each session was first seen unheld (by `namespace/name`).
#[derive(Debug, Default)]
pub struct Unheld(HashMap<String, DateTime<Utc>>);

impl Unheld {
    /// The sessions to delete at `now`, given the `grace` period (see the module doc).
    /// Forgets sessions that are held again or gone; a session being deleted is left alone.
    pub fn due(
        &mut self,
        sessions: &[&KtSession],
        now: DateTime<Utc>,
        grace: TimeDelta,
    ) -> Vec<Due> {
        let mut seen = HashMap::new();
        let mut due = Vec::new();
        for session in sessions {
            if session.lease_live(now) || session.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let key = session.key();
            let since = self.0.get(&key).copied().unwrap_or(now);
            let lease = TimeDelta::seconds(i64::from(session.spec.lease_seconds));
            let never_held = session.lease_end().is_none();
            let wait = match session.spec.mode {
                SessionMode::Preview => lease,
                _ if never_held => lease + grace,
                _ => grace,
            };
            if now - since >= wait
                && let (Some(namespace), Some(name)) =
                    (&session.metadata.namespace, &session.metadata.name)
            {
                due.push(Due {
                    namespace: namespace.clone(),
                    name: name.clone(),
                    resource_version: session.metadata.resource_version.clone(),
                    uid: session.metadata.uid.clone(),
                    mode: session.spec.mode,
                });
            }
            seen.insert(key, since);
        }
        self.0 = seen;
        due
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn session(mode: &str, renewed: Option<DateTime<Utc>>) -> KtSession {
        serde_json::from_value(json!({
            "apiVersion": "kt.dev/v1alpha1", "kind": "KtSession",
            "metadata": {"name": "nginx-v2-kt-abcde", "namespace": "dev", "resourceVersion": "7"},
            "spec": {"owner": "a@b", "mode": mode, "service": "nginx-v2",
                     "ports": [{"port": 80, "localPort": 80}], "publicKey": "k"},
            "status": renewed.map(|r| json!({"renewTime": r, "address": "172.30.0.11"})),
        }))
        .unwrap()
    }

    fn names(due: &[Due]) -> Vec<(&str, &SessionMode)> {
        due.iter().map(|d| (d.name.as_str(), &d.mode)).collect()
    }

    const GRACE: TimeDelta = TimeDelta::seconds(300);

    #[test]
    fn a_preview_unheld_for_its_lease_is_ended_and_a_held_one_is_not() {
        let start = Utc::now();
        let later = |s: i64| start + TimeDelta::seconds(s);
        let mut unheld = Unheld::default();
        let dead = session("preview", None);
        let held = session("preview", Some(start));
        assert!(unheld.due(&[&dead, &held], start, GRACE).is_empty());
        assert!(
            unheld.due(&[&dead], later(9), GRACE).is_empty(),
            "within the lease"
        );
        let due = unheld.due(&[&dead], later(10), GRACE);
        assert_eq!(
            due,
            [Due {
                namespace: "dev".into(),
                name: "nginx-v2-kt-abcde".into(),
                resource_version: Some("7".into()),
                uid: None,
                mode: SessionMode::Preview,
            }]
        );
        // Held again in between: the count starts over.
        let mut unheld = Unheld::default();
        assert!(unheld.due(&[&dead], start, GRACE).is_empty());
        let renewed = session("preview", Some(later(5)));
        assert!(unheld.due(&[&renewed], later(6), GRACE).is_empty());
        assert!(
            unheld.due(&[&dead], later(12), GRACE).is_empty(),
            "unheld since 12 s only"
        );
        assert_eq!(unheld.due(&[&dead], later(22), GRACE).len(), 1);
    }

    #[test]
    fn every_mode_is_collected_after_the_grace_and_a_never_held_one_after_its_lease_too() {
        let start = Utc::now();
        let later = |s: i64| start + TimeDelta::seconds(s);
        // Renewed 10 s before start: the lease (10 s) ended at start.
        let ended = |mode| session(mode, Some(start - TimeDelta::seconds(10)));
        let modes = ["exchange", "mesh", "connect"];
        let dead: Vec<KtSession> = modes.iter().map(|m| ended(m)).collect();
        let never_held = session("exchange", None);
        let mut all: Vec<&KtSession> = dead.iter().collect();
        all.push(&never_held);
        let mut unheld = Unheld::default();
        assert!(unheld.due(&all, start, GRACE).is_empty());
        assert!(
            unheld.due(&all, later(299), GRACE).is_empty(),
            "within the grace"
        );
        assert_eq!(
            names(&unheld.due(&all, later(300), GRACE)),
            [
                ("nginx-v2-kt-abcde", &SessionMode::Exchange),
                ("nginx-v2-kt-abcde", &SessionMode::Mesh),
                ("nginx-v2-kt-abcde", &SessionMode::Connect),
            ]
        );
        assert_eq!(
            unheld.due(&all, later(310), GRACE).len(),
            4,
            "lease + grace"
        );
    }

    #[test]
    fn a_live_or_deleting_session_is_never_due_whatever_the_time() {
        let start = Utc::now();
        let mut live = session("exchange", Some(start));
        let mut unheld = Unheld::default();
        for s in [0, 5, 10] {
            live.status.as_mut().unwrap().renew_time = Some(start + TimeDelta::seconds(s));
            assert!(
                unheld
                    .due(&[&live], start + TimeDelta::seconds(s), GRACE)
                    .is_empty()
            );
        }
        let mut deleting = serde_json::to_value(session("exchange", None)).unwrap();
        deleting["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        let deleting: KtSession = serde_json::from_value(deleting).unwrap();
        assert!(
            unheld
                .due(&[&deleting], start, TimeDelta::zero())
                .is_empty()
        );
        assert!(
            unheld
                .due(&[&deleting], start + TimeDelta::hours(1), TimeDelta::zero())
                .is_empty()
        );
    }
}
