//! The agent's Prometheus metrics (`/metrics`, OpenMetrics text via `prometheus-client`):
//!
//! - `kt_agent_sessions` (gauge): sessions whose redirect is in force on this node;
//! - `kt_agent_redirect_entries` (gauge): entries in the eBPF service map;
//! - `kt_agent_ebpf_events_total{event}` (counter): events of the eBPF programs;
//! - `kt_agent_connects_redirected_total{namespace,session}` (counter): connects the
//!   programs redirected on this node, per session;
//! - `kt_agent_tunnel_bytes_total{direction}` (counter): bytes through this agent's tunnel
//!   listeners (`to_workstation`, `from_workstation`), counted as each connection ends;
//! - `kt_agent_connect_refused_total` (counter): `connect` sessions' connections and UDP
//!   relays to destinations the egress rule refuses;
//! - `kt_agent_sessions_collected_total` (counter): dead sessions this agent deleted;
//! - `kt_agent_reconcile_seconds` (histogram): how long each reconcile pass took, from
//!   reading the watch caches to the map written ([`RECONCILE_BUCKETS`]);
//! - `kt_agent_reconcile_cpu_seconds` (histogram): the CPU time of each pass (its thread's);
//!   far below `kt_agent_reconcile_seconds` when the pass waited for a core or a lock (the
//!   index while a watch writes, the map while `/metrics` is scraped);
//! - `kt_agent_watch_events_total{watch}` (counter): events each of the agent's watches
//!   received (every object of a list, every change, and a list's start and end);
//! - `kt_agent_udp_flows` (gauge): UDP flows (a pod's address and port) of exchanged UDP
//!   ports this agent carries to workstations now;
//! - `kt_agent_udp_datagrams_total{direction}` (counter): their datagrams
//!   (`to_workstation`, `from_workstation`);
//! - `kt_agent_udp_dropped_total{reason}` (counter): datagrams from pods dropped
//!   (`queue_full`: the workstation was slower; `flow_limit`: queued in a flow evicted for a
//!   new one; `no_channel`: ktctl refused the flow's channel or did not open it in time;
//!   `flow_closed`: queued when the flow or the session ended; `empty`: zero bytes, which
//!   the channel framing cannot carry).
//!
//! The first four are read from the redirect map and the eBPF per-CPU maps at scrape time.

use std::{
    collections::BTreeSet,
    fmt,
    sync::{Arc, Mutex},
};

use kt_tunnel::bridge::Transferred;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::Histogram,
    },
    registry::Registry,
};

use super::map::RedirectMap;

/// The registry `/metrics` encodes.
pub(crate) struct Metrics {
    registry: Registry,
}

/// The bounds of `kt_agent_reconcile_seconds`'s buckets, in seconds: 100 µs to 5 s in
/// steps of 1, 2 and 5 (a pass over a small cluster takes well under a millisecond; issue 17
/// asks for a p99 under 5 ms at 10 000 Services and 1 000 sessions, so 5 ms is a bound).
const RECONCILE_BUCKETS: [f64; 15] = [
    0.000_1, 0.000_2, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
];

/// `kt_agent_reconcile_seconds` and `kt_agent_reconcile_cpu_seconds` ([`RECONCILE_BUCKETS`]).
#[derive(Clone)]
pub(crate) struct Reconcile {
    seconds: Histogram,
    cpu_seconds: Histogram,
}

impl Default for Reconcile {
    fn default() -> Self {
        Self {
            seconds: Histogram::new(RECONCILE_BUCKETS),
            cpu_seconds: Histogram::new(RECONCILE_BUCKETS),
        }
    }
}

impl Reconcile {
    /// Counts one pass that took `wall` and used `cpu` of its thread.
    pub(crate) fn observe(&self, wall: std::time::Duration, cpu: std::time::Duration) {
        self.seconds.observe(wall.as_secs_f64());
        self.cpu_seconds.observe(cpu.as_secs_f64());
    }
}

/// The CPU time the calling thread has used (`CLOCK_THREAD_CPUTIME_ID`); zero if the clock
/// cannot be read. A reconcile pass runs on one thread without yielding, so the difference
/// of two readings around it is its CPU time.
pub(crate) fn thread_cpu() -> std::time::Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec to write; the clock id is a constant.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) } != 0 {
        return std::time::Duration::ZERO;
    }
    std::time::Duration::new(
        u64::try_from(now.tv_sec).unwrap_or(0),
        u32::try_from(now.tv_nsec).unwrap_or(0),
    )
}

/// `kt_agent_watch_events_total{watch}`, as each watch counts its events.
#[derive(Clone, Default)]
pub(crate) struct WatchEvents(Family<[(&'static str, &'static str); 1], Counter>);

impl WatchEvents {
    /// The counter of the watch named `watch` (its task's name, e.g. `watch-sessions`).
    pub(crate) fn of(&self, watch: &'static str) -> Counter {
        self.0.get_or_create(&[("watch", watch)]).clone()
    }
}

/// `kt_agent_tunnel_bytes_total`, as the hold server adds to it.
#[derive(Clone, Default)]
pub(crate) struct TunnelBytes(Family<[(&'static str, &'static str); 1], Counter>);

impl TunnelBytes {
    /// Counts one tunnelled connection that ended: into the channel is towards the SSH
    /// client, the workstation.
    pub(crate) fn add(&self, moved: &Transferred) {
        self.0
            .get_or_create(&[("direction", "to_workstation")])
            .inc_by(moved.to_channel);
        self.0
            .get_or_create(&[("direction", "from_workstation")])
            .inc_by(moved.to_socket);
    }
}

/// The UDP exchange's metrics, as its listeners count ([`super::udp_exchange`]).
#[derive(Clone, Debug, Default)]
pub(crate) struct UdpExchange {
    flows: Gauge,
    datagrams: Family<[(&'static str, &'static str); 1], Counter>,
    dropped: Family<[(&'static str, &'static str); 1], Counter>,
}

impl UdpExchange {
    /// A flow began (`+1`) or ended (`-1`).
    pub(crate) fn flows(&self, change: i64) {
        self.flows.inc_by(change);
    }

    /// One datagram carried: `to_workstation` (from a pod) or `from_workstation`.
    pub(crate) fn datagram(&self, direction: &'static str) {
        self.datagrams
            .get_or_create(&[("direction", direction)])
            .inc();
    }

    /// One datagram from a pod dropped, for `reason`.
    pub(crate) fn dropped(&self, reason: &'static str) {
        self.dropped.get_or_create(&[("reason", reason)]).inc();
    }
}

/// Every metric the registry holds besides the map-derived ones.
pub(crate) struct Sources<'a> {
    pub(crate) tunnel_bytes: &'a TunnelBytes,
    pub(crate) connect_refused: &'a Counter,
    pub(crate) sessions_collected: &'a Counter,
    pub(crate) reconcile: &'a Reconcile,
    pub(crate) watch_events: &'a WatchEvents,
    pub(crate) udp: &'a UdpExchange,
}

impl Metrics {
    /// The agent's metrics over `map` (read at scrape time) and `sources`.
    pub(crate) fn new(map: Arc<Mutex<RedirectMap>>, sources: &Sources<'_>) -> Self {
        Self::with_map_collector(Box::new(MapCollector(map)), sources)
    }

    /// The registry with `map` as the source of the map-derived metrics (a fixed reading in
    /// tests: the eBPF maps need root).
    fn with_map_collector(map: Box<dyn Collector>, sources: &Sources<'_>) -> Self {
        let Sources {
            tunnel_bytes,
            connect_refused,
            sessions_collected,
            reconcile,
            watch_events,
            udp,
        } = *sources;
        let mut registry = Registry::default();
        registry.register_collector(map);
        registry.register(
            "kt_agent_tunnel_bytes",
            "Bytes through this agent's tunnel listeners (counted when a connection ends)",
            tunnel_bytes.0.clone(),
        );
        registry.register(
            "kt_agent_connect_refused",
            "Connections and datagrams of connect sessions to destinations the egress rule refuses",
            connect_refused.clone(),
        );
        registry.register(
            "kt_agent_sessions_collected",
            "Sessions nobody held for their grace period, deleted by this agent",
            sessions_collected.clone(),
        );
        registry.register(
            "kt_agent_reconcile_seconds",
            "How long each reconcile pass took",
            reconcile.seconds.clone(),
        );
        registry.register(
            "kt_agent_reconcile_cpu_seconds",
            "The CPU time of each reconcile pass",
            reconcile.cpu_seconds.clone(),
        );
        registry.register(
            "kt_agent_watch_events",
            "Events each watch of the agent received (objects listed, changes, list markers)",
            watch_events.0.clone(),
        );
        registry.register(
            "kt_agent_udp_flows",
            "UDP flows of exchanged UDP ports this agent carries to workstations",
            udp.flows.clone(),
        );
        registry.register(
            "kt_agent_udp_datagrams",
            "Datagrams of exchanged UDP ports this agent carried",
            udp.datagrams.clone(),
        );
        registry.register(
            "kt_agent_udp_dropped",
            "Datagrams from pods to an exchanged UDP port this agent dropped",
            udp.dropped.clone(),
        );
        Self { registry }
    }

    /// The OpenMetrics text of every metric.
    pub(crate) fn encode(&self) -> Result<String, fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

/// Reads the redirect map and the eBPF counters on every scrape.
struct MapCollector(Arc<Mutex<RedirectMap>>);

impl fmt::Debug for MapCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MapCollector")
    }
}

impl Collector for MapCollector {
    fn encode(&self, encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let sessions: BTreeSet<&str> = map.desired.values().map(|t| t.session.as_str()).collect();
        let counters = map
            .redirector
            .counters()
            .map_err(|error| tracing::warn!(%error, "eBPF counters unreadable"))
            .ok();
        let per_session = sessions
            .iter()
            .filter_map(|session| {
                let id = map.ids.get(session)?;
                let stats = map.redirector.service_stats(id).ok()?;
                let (namespace, name) = session.split_once('/').unwrap_or(("", session));
                Some((namespace, name, stats.connects_redirected))
            })
            .collect();
        MapReading {
            sessions: sessions.len(),
            entries: map.desired.len(),
            counters,
            per_session,
        }
        .encode(encoder)
    }
}

/// What the map-derived metrics show at one scrape.
struct MapReading<'a> {
    /// Sessions with entries in the map.
    sessions: usize,
    /// Entries in the map.
    entries: usize,
    /// The eBPF counters; `None` when unreadable (the family is left out).
    counters: Option<crate::ebpf::Counters>,
    /// `(namespace, session, connects redirected)`.
    per_session: Vec<(&'a str, &'a str, u64)>,
}

impl MapReading<'_> {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let gauge = |value: usize| ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
        let live = gauge(self.sessions);
        live.encode(encoder.encode_descriptor(
            "kt_agent_sessions",
            "Sessions whose redirect is in force",
            None,
            live.metric_type(),
        )?)?;
        let entries = gauge(self.entries);
        entries.encode(encoder.encode_descriptor(
            "kt_agent_redirect_entries",
            "Entries in the eBPF service map",
            None,
            entries.metric_type(),
        )?)?;
        if let Some(counters) = &self.counters {
            let mut family = encoder.encode_descriptor(
                "kt_agent_ebpf_events",
                "Events of the eBPF programs on this node",
                None,
                MetricType::Counter,
            )?;
            for (event, value) in counters.iter() {
                ConstCounter::new(value).encode(family.encode_family(&[("event", event)])?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "kt_agent_connects_redirected",
            "Connects redirected on this node, per session",
            None,
            MetricType::Counter,
        )?;
        for (namespace, name, connects) in &self.per_session {
            ConstCounter::new(*connects)
                .encode(family.encode_family(&[("namespace", *namespace), ("session", *name)])?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! `deploy/grafana-dashboard.json` asks only for metrics this registry exports.

    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    /// A fixed reading, encoded as a scrape encodes the map's.
    #[derive(Debug)]
    struct Fixed;

    impl Collector for Fixed {
        fn encode(&self, encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
            MapReading {
                sessions: 1,
                entries: 2,
                counters: Some(crate::ebpf::Counters::default()),
                per_session: vec![("dev", "web-alice", 3)],
            }
            .encode(encoder)
        }
    }

    /// Every sample's metric name in the registry's output, with its label names.
    fn exported() -> BTreeMap<String, BTreeSet<String>> {
        let bytes = TunnelBytes::default();
        bytes.add(&Transferred {
            to_channel: 1,
            to_socket: 2,
        });
        let (refused, collected) = (Counter::default(), Counter::default());
        refused.inc();
        collected.inc();
        let reconcile = Reconcile::default();
        reconcile.observe(
            std::time::Duration::from_micros(300),
            std::time::Duration::from_micros(200),
        );
        let watches = WatchEvents::default();
        watches.of("watch-sessions").inc();
        let udp = UdpExchange::default();
        udp.flows(1);
        udp.datagram("to_workstation");
        udp.dropped("queue_full");
        let sources = Sources {
            tunnel_bytes: &bytes,
            connect_refused: &refused,
            sessions_collected: &collected,
            reconcile: &reconcile,
            watch_events: &watches,
            udp: &udp,
        };
        let text = Metrics::with_map_collector(Box::new(Fixed), &sources)
            .encode()
            .expect("metrics encode");
        let mut names: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            let labels = line[end..]
                .strip_prefix('{')
                .and_then(|rest| rest.split_once('}'))
                .map(|(labels, _)| labels)
                .unwrap_or_default();
            names.entry(line[..end].to_owned()).or_default().extend(
                labels
                    .split(',')
                    .filter_map(|pair| pair.split_once('=').map(|(name, _)| name.to_owned())),
            );
        }
        names
    }

    /// The PromQL expressions of every panel of the dashboard.
    fn dashboard_queries() -> Vec<String> {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/grafana-dashboard.json"
        );
        let text = std::fs::read_to_string(path).expect("the dashboard reads");
        let dashboard: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
        let panels = dashboard["panels"].as_array().expect("panels");
        assert!(!panels.is_empty());
        panels
            .iter()
            .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
            .map(|t| t["expr"].as_str().expect("a PromQL expr").to_owned())
            .collect()
    }

    /// `kt_agent_…` names in a PromQL expression, with the labels its selectors and
    /// `by (…)` clauses name.
    fn used(expr: &str) -> Vec<(String, BTreeSet<String>)> {
        let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
        let by: BTreeSet<String> = expr
            .match_indices("by (")
            .filter_map(|(i, m)| expr[i + m.len()..].split_once(')'))
            .flat_map(|(labels, _)| labels.split(',').map(|l| l.trim().to_owned()))
            .collect();
        let mut found = Vec::new();
        let mut rest = expr;
        while let Some(start) = rest.find("kt_agent_") {
            let tail = &rest[start..];
            let end = tail.find(|c: char| !word(c)).unwrap_or(tail.len());
            let mut labels = by.clone();
            if let Some(selector) = tail[end..].strip_prefix('{') {
                let selector = selector.split_once('}').map_or("", |(s, _)| s);
                labels.extend(selector.split(',').filter_map(|m| {
                    let name = m.trim().split(|c: char| !word(c)).next()?;
                    (!name.is_empty()).then(|| name.to_owned())
                }));
            }
            found.push((tail[..end].to_owned(), labels));
            rest = &tail[end..];
        }
        found
    }

    #[test]
    fn every_metric_the_dashboard_asks_for_is_exported_with_its_labels() {
        let exported = exported();
        // Every family the module doc lists shows up in the output.
        for name in [
            "kt_agent_sessions",
            "kt_agent_redirect_entries",
            "kt_agent_ebpf_events_total",
            "kt_agent_connects_redirected_total",
            "kt_agent_tunnel_bytes_total",
            "kt_agent_connect_refused_total",
            "kt_agent_sessions_collected_total",
            "kt_agent_reconcile_seconds_bucket",
            "kt_agent_reconcile_seconds_count",
            "kt_agent_reconcile_seconds_sum",
            "kt_agent_reconcile_cpu_seconds_bucket",
            "kt_agent_watch_events_total",
        ] {
            assert!(exported.contains_key(name), "{name} not in {exported:?}");
        }
        // Labels Prometheus adds to every scraped series.
        let target = ["instance", "job", "node", "pod"];
        let mut asked = BTreeSet::new();
        for expr in dashboard_queries() {
            let metrics = used(&expr);
            assert!(!metrics.is_empty(), "{expr} asks for no kt metric");
            for (name, labels) in metrics {
                let Some(has) = exported.get(&name) else {
                    panic!(
                        "the dashboard's {expr:?} asks for {name}, which the agent does not export"
                    );
                };
                for label in labels.iter().filter(|l| !target.contains(&l.as_str())) {
                    assert!(has.contains(label), "{expr:?}: {name} has no label {label}");
                }
                asked.insert(name);
            }
        }
        let missing: Vec<&String> = exported.keys().filter(|n| !asked.contains(*n)).collect();
        assert!(
            missing.is_empty(),
            "the dashboard shows nothing of {missing:?}"
        );
    }

    #[test]
    fn the_dashboard_check_catches_a_misspelt_metric_or_label() {
        assert_eq!(
            used(r#"sum by (direction) (rate(kt_agent_tunnel_byte_total{job="x"}[5m]))"#),
            [(
                "kt_agent_tunnel_byte_total".to_owned(),
                BTreeSet::from(["direction".to_owned(), "job".to_owned()])
            )]
        );
        let exported = exported();
        assert!(!exported.contains_key("kt_agent_tunnel_byte_total"));
        assert!(!exported["kt_agent_tunnel_bytes_total"].contains("dir"));
    }
}
