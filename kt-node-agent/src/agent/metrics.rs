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
//! - `kt_agent_sessions_collected_total` (counter): dead sessions this agent deleted.
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
        gauge::ConstGauge,
    },
    registry::Registry,
};

use super::map::RedirectMap;

/// The registry `/metrics` encodes.
pub(crate) struct Metrics {
    registry: Registry,
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

impl Metrics {
    /// The agent's metrics over `map` (read at scrape time), `tunnel_bytes`,
    /// `connect_refused` and `sessions_collected`.
    pub(crate) fn new(
        map: Arc<Mutex<RedirectMap>>,
        tunnel_bytes: &TunnelBytes,
        connect_refused: &Counter,
        sessions_collected: &Counter,
    ) -> Self {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(MapCollector(map)));
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
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let sessions: BTreeSet<&str> = map.desired.values().map(|t| t.session.as_str()).collect();
        let gauge = |value: usize| ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
        let live = gauge(sessions.len());
        live.encode(encoder.encode_descriptor(
            "kt_agent_sessions",
            "Sessions whose redirect is in force",
            None,
            live.metric_type(),
        )?)?;
        let entries = gauge(map.desired.len());
        entries.encode(encoder.encode_descriptor(
            "kt_agent_redirect_entries",
            "Entries in the eBPF service map",
            None,
            entries.metric_type(),
        )?)?;
        match map.redirector.counters() {
            Ok(counters) => {
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
            Err(error) => tracing::warn!(%error, "eBPF counters unreadable"),
        }
        let mut family = encoder.encode_descriptor(
            "kt_agent_connects_redirected",
            "Connects redirected on this node, per session",
            None,
            MetricType::Counter,
        )?;
        for session in sessions {
            let Some(id) = map.ids.get(session) else {
                continue;
            };
            let Ok(stats) = map.redirector.service_stats(id) else {
                continue;
            };
            let (namespace, name) = session.split_once('/').unwrap_or(("", session));
            ConstCounter::new(stats.connects_redirected)
                .encode(family.encode_family(&[("namespace", namespace), ("session", name)])?)?;
        }
        Ok(())
    }
}
