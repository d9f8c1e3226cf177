//! Whether the agent's sessions cache still follows the cluster, and so by which clock
//! leases are judged. A lease is renewed by its holder writing `status.renewTime`; an agent
//! whose sessions watch is down cannot see those renewals, so judging leases by the wall
//! clock would fail every session open during an API server outage — sessions the holder
//! keeps renewing as soon as it can (issue 16, item 1: "agents must not expire leases they
//! cannot see renewed while their own watch is down"). While the watch is down, leases are
//! judged as of the moment it went down; once a fresh list has completed, by the wall clock
//! again (then a holder that died during the outage is seen, and its lease runs out).

use chrono::{DateTime, Utc};

/// The sessions watch's state: following the cluster, or blind since a moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Freshness {
    /// When the watch failed, if it has not completed a list since.
    blind_since: Option<DateTime<Utc>>,
}

impl Freshness {
    /// The watch failed at `at` (a watch or list error: the API server is unreachable or
    /// refuses). Keeps the earliest failure of an outage. Returns whether this changed the
    /// state.
    pub fn failed(&mut self, at: DateTime<Utc>) -> bool {
        if self.blind_since.is_some() {
            return false;
        }
        self.blind_since = Some(at);
        true
    }

    /// A complete list was applied to the cache: it follows the cluster again. Returns
    /// whether this changed the state.
    pub fn listed(&mut self) -> bool {
        self.blind_since.take().is_some()
    }

    /// Whether the cache is blind (the watch failed and has not listed since).
    pub fn blind(&self) -> bool {
        self.blind_since.is_some()
    }

    /// The time at which leases are judged when the wall clock says `now`: `now`, or while
    /// blind the moment the watch failed (never later than `now`).
    pub fn lease_clock(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        self.blind_since.map_or(now, |since| since.min(now))
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeDelta;

    use super::*;

    #[test]
    fn leases_are_judged_by_the_wall_clock_while_the_watch_follows() {
        let now = Utc::now();
        let fresh = Freshness::default();
        assert!(!fresh.blind());
        assert_eq!(fresh.lease_clock(now), now);
    }

    #[test]
    fn while_blind_leases_are_judged_as_of_the_first_failure_until_a_list() {
        let down = Utc::now();
        let mut f = Freshness::default();
        assert!(f.failed(down));
        // Retries failing later keep the start of the outage.
        assert!(!f.failed(down + TimeDelta::seconds(5)));
        assert!(f.blind());
        assert_eq!(f.lease_clock(down + TimeDelta::seconds(30)), down);
        // A clock stepped back before the failure is not moved forward.
        let earlier = down - TimeDelta::seconds(1);
        assert_eq!(f.lease_clock(earlier), earlier);
        assert!(f.listed());
        assert!(!f.listed(), "a second list changes nothing");
        let later = down + TimeDelta::seconds(40);
        assert_eq!(f.lease_clock(later), later);
    }

    #[test]
    fn a_lease_live_when_the_watch_failed_stays_live_through_the_outage_only() {
        use kt_proto::session::KtSession;
        let renewed = Utc::now();
        let session: KtSession = serde_json::from_value(serde_json::json!({
            "apiVersion": "kt.dev/v1alpha1", "kind": "KtSession",
            "metadata": {"name": "web-alice", "namespace": "default"},
            "spec": {"owner": "alice", "mode": "exchange", "service": "web",
                     "ports": [{"port": 80, "localPort": 8080}], "publicKey": "k"},
            "status": {"renewTime": renewed}
        }))
        .expect("session parses");
        let mut f = Freshness::default();
        f.failed(renewed + TimeDelta::seconds(2));
        let outage_end = renewed + TimeDelta::seconds(30);
        assert!(session.lease_live(f.lease_clock(outage_end)));
        f.listed();
        assert!(!session.lease_live(f.lease_clock(outage_end)));
    }
}
