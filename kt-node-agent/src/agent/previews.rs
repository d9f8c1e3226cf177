//! Ending dead `preview` sessions (pure): a preview's Service and EndpointSlice are owned by
//! its session, so they stay while the session object does — also after `kill -9` of
//! ktctl, when nobody holds it any more. Every agent ends (deletes) a preview session that
//! has stayed unheld for its lease; the cluster's garbage collector then removes the
//! Service and the EndpointSlice.

use std::collections::HashMap;

use chrono::{DateTime, TimeDelta, Utc};
use kt_proto::session::{KtSession, SessionMode};

/// When each preview session was first seen unheld (by `namespace/name`).
#[derive(Debug, Default)]
pub struct Unheld(HashMap<String, DateTime<Utc>>);

impl Unheld {
    /// The preview sessions (namespace, name) to end at `now`: unheld — no lease in force,
    /// a fresh one not held yet included — since at least their lease. Forgets sessions that
    /// are held again or gone.
    pub fn due(&mut self, sessions: &[&KtSession], now: DateTime<Utc>) -> Vec<(String, String)> {
        let mut seen = HashMap::new();
        let mut due = Vec::new();
        for session in sessions {
            if session.spec.mode != SessionMode::Preview
                || session.lease_live(now)
                || session.metadata.deletion_timestamp.is_some()
            {
                continue;
            }
            let key = session.key();
            let since = self.0.get(&key).copied().unwrap_or(now);
            if now - since >= TimeDelta::seconds(i64::from(session.spec.lease_seconds))
                && let (Some(namespace), Some(name)) =
                    (&session.metadata.namespace, &session.metadata.name)
            {
                due.push((namespace.clone(), name.clone()));
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

    fn preview(mode: &str, renewed: Option<DateTime<Utc>>) -> KtSession {
        serde_json::from_value(json!({
            "apiVersion": "kt.dev/v1alpha1", "kind": "KtSession",
            "metadata": {"name": "nginx-v2-kt-preview-abcde", "namespace": "dev"},
            "spec": {"owner": "a@b", "mode": mode, "service": "nginx-v2",
                     "ports": [{"port": 80, "localPort": 80}], "publicKey": "k"},
            "status": renewed.map(|r| json!({"renewTime": r, "address": "172.30.0.11"})),
        }))
        .unwrap()
    }

    #[test]
    fn a_preview_unheld_for_its_lease_is_ended_and_a_held_one_is_not() {
        let start = Utc::now();
        let later = |s: i64| start + TimeDelta::seconds(s);
        let mut unheld = Unheld::default();
        let dead = preview("preview", None);
        let held = preview("preview", Some(start));
        let exchange = preview("exchange", None);
        assert!(unheld.due(&[&dead, &held, &exchange], start).is_empty());
        assert!(
            unheld.due(&[&dead], later(9)).is_empty(),
            "within the lease"
        );
        assert_eq!(
            unheld.due(&[&dead], later(10)),
            [("dev".to_owned(), "nginx-v2-kt-preview-abcde".to_owned())]
        );
        // Held again in between: the count starts over.
        let mut unheld = Unheld::default();
        assert!(unheld.due(&[&dead], start).is_empty());
        let renewed = preview("preview", Some(later(5)));
        assert!(unheld.due(&[&renewed], later(6)).is_empty());
        assert!(
            unheld.due(&[&dead], later(12)).is_empty(),
            "unheld since 12 s only"
        );
        assert_eq!(unheld.due(&[&dead], later(22)).len(), 1);
    }
}
