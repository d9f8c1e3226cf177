//! The cluster's clock as seen from this workstation. Heartbeats (`kt-last-heart-beat`)
//! and every staleness judgement use it, so that a workstation whose clock is off neither
//! writes heartbeats that look dead to others nor deletes objects that are alive.
//!
//! ktctl v0.3.7 measures the difference by running a "rectifier" pod and reading its
//! `date +%s` (`cluster/heartbeat.go`); kt reads the API server's `Date` response header
//! instead (RFC 9110 §6.6.1: an origin server with a clock must send it; the Kubernetes API
//! server, a Go `net/http` server, does), which costs one request and starts no pod.

use chrono::{DateTime, TimeDelta, Utc};

/// The cluster's time: this machine's clock plus the difference measured at start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClusterClock {
    /// Cluster time minus local time.
    offset: TimeDelta,
}

impl ClusterClock {
    /// This machine's clock, unadjusted (`--useLocalTime`, and the fallback when the API
    /// server sends no `Date`).
    pub const LOCAL: Self = Self {
        offset: TimeDelta::zero(),
    };

    /// Measures the difference with one `GET /version`: the `Date` header against the middle
    /// of the request's local send and receive times. Any failure (no header, a header that
    /// is not an RFC 2822 date, a failed request) yields [`ClusterClock::LOCAL`] with a debug
    /// line: a heartbeat off by the local clock's error is what v0.3.7 writes with
    /// `--useLocalTime`, never a reason to fail a command.
    pub async fn measure(client: &kube::Client) -> Self {
        let sent = Utc::now();
        let request = http::Request::get("/version").body(kube::client::Body::empty());
        let response = match request {
            Ok(request) => client.send(request).await,
            Err(error) => {
                tracing::debug!(%error, "cannot build the clock request");
                return Self::LOCAL;
            }
        };
        let received = Utc::now();
        let date = response.ok().and_then(|r| {
            r.headers()
                .get(http::header::DATE)
                .and_then(|d| d.to_str().ok())
                .map(str::to_owned)
        });
        match date
            .as_deref()
            .and_then(|d| Self::from_date_header(d, sent, received))
        {
            Some(clock) => {
                tracing::debug!(offset_seconds = clock.offset.num_seconds(), "cluster clock");
                clock
            }
            None => {
                tracing::debug!(
                    ?date,
                    "no usable Date from the API server; using local time"
                );
                Self::LOCAL
            }
        }
    }

    /// The clock given the server's `Date` (RFC 2822 / IMF-fixdate, one-second resolution)
    /// and the local times the request was `sent` and its answer `received`. An offset
    /// within the second's rounding and the round trip counts as none, so that an in-sync
    /// machine keeps its own, finer clock.
    pub fn from_date_header(
        date: &str,
        sent: DateTime<Utc>,
        received: DateTime<Utc>,
    ) -> Option<Self> {
        let server = DateTime::parse_from_rfc2822(date).ok()?.with_timezone(&Utc);
        // The server stamped its second somewhere in [sent, received].
        let middle = sent + (received - sent) / 2;
        let offset = server + TimeDelta::milliseconds(500) - middle;
        let slack = (received - sent) / 2 + TimeDelta::seconds(1);
        Some(if offset.abs() <= slack {
            Self::LOCAL
        } else {
            Self { offset }
        })
    }

    /// The cluster's time now.
    pub fn now(&self) -> DateTime<Utc> {
        Utc::now() + self.offset
    }

    /// Cluster time minus local time.
    pub fn offset(&self) -> TimeDelta {
        self.offset
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn a_clock_an_hour_behind_the_cluster_is_corrected() {
        let sent = at("2026-11-30T01:00:00.100Z");
        let received = at("2026-11-30T01:00:00.300Z");
        let clock = ClusterClock::from_date_header("Mon, 30 Nov 2026 02:00:00 GMT", sent, received)
            .unwrap();
        let hour = TimeDelta::hours(1);
        assert!(
            (clock.offset() - hour).abs() <= TimeDelta::seconds(1),
            "{clock:?}"
        );
        // And ahead.
        let clock = ClusterClock::from_date_header("Mon, 30 Nov 2026 00:00:00 GMT", sent, received)
            .unwrap();
        assert!(
            (clock.offset() + hour).abs() <= TimeDelta::seconds(1),
            "{clock:?}"
        );
    }

    #[test]
    fn an_in_sync_clock_and_a_bad_header_keep_local_time() {
        let sent = at("2026-11-30T01:00:00.900Z");
        let received = at("2026-11-30T01:00:01.200Z");
        for date in [
            "Mon, 30 Nov 2026 01:00:00 GMT",
            "Mon, 30 Nov 2026 01:00:01 GMT",
        ] {
            assert_eq!(
                ClusterClock::from_date_header(date, sent, received),
                Some(ClusterClock::LOCAL),
                "{date}"
            );
        }
        assert_eq!(
            ClusterClock::from_date_header("yesterday", sent, received),
            None
        );
    }
}
