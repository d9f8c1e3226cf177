//! `birdseye`'s report (pure): each Service's state and who holds it, and who is connected,
//! in ktctl v0.3.7's format (`birdseye/common.go`, `../shared/reference/ktctl-v0.3.7.md`
//! §3.9), understanding the Go ktctl's objects and kt's agent sessions alike.

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::Service;
use kt_proto::{
    compat,
    session::{KtSession, SessionMode},
};
use kube::api::ObjectMeta;

use crate::cluster::stale::{
    Inventory,
    plan::{Workload, heartbeat, is_kt, selector_of, selects},
};

/// One Service's line: `> <name> - <status>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceLine {
    pub name: String,
    pub status: String,
}

/// v0.3.7's status of a Service nobody redirects.
pub const NORMAL: &str = "normal";

/// `--sortBy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SortBy {
    Status,
    Name,
}

/// `[alice], [bob]`, with `unknown user` for a holder without `kt-user`; each once.
fn users(users: &[Option<String>]) -> String {
    let mut seen: Vec<String> = Vec::new();
    for user in users {
        let text = match user.as_deref() {
            Some(u) if !u.is_empty() => format!("[{u}]"),
            _ => "unknown user".to_owned(),
        };
        if !seen.contains(&text) {
            seen.push(text);
        }
    }
    seen.join(", ")
}

fn user_of(meta: &ObjectMeta) -> Option<String> {
    meta.annotations.as_ref()?.get(compat::USER).cloned()
}

fn role_of(meta: &ObjectMeta) -> Option<&str> {
    meta.labels.as_ref()?.get(compat::ROLE).map(String::as_str)
}

/// Whether a Service is one kt made for its own plumbing (a stuntman, a mesh shadow's):
/// not listed. A preview's Service is the user's view of the preview and is listed.
fn is_plumbing(service: &Service) -> bool {
    let preview = role_of(&service.metadata) == Some(compat::ROLE_SHADOW_PREVIEW)
        || selector_of(service).get(compat::ROLE).map(String::as_str)
            == Some(compat::ROLE_SHADOW_PREVIEW);
    is_kt(&service.metadata) && !preview
}

/// The status of `service`: `exchanged by [u]`, `meshed (auto) by [u1], [u2]`, `meshed
/// (manual) by [u]`, `meshed (agent) by [u]` (kt's agent mesh), `previewing by [u]` or
/// `normal` (the first that applies, in that order).
pub fn status(service: &Service, workloads: &[Workload<'_>], sessions: &[KtSession]) -> String {
    let name = service.metadata.name.as_deref().unwrap_or_default();
    let selector = selector_of(service);
    let selected = |role: &str| -> Vec<Option<String>> {
        workloads
            .iter()
            .filter(|w| w.role() == Some(role) && selects(&selector, w.pod_labels))
            .map(|w| w.user().map(str::to_owned))
            .collect()
    };
    let of_sessions = |mode: SessionMode| -> Vec<Option<String>> {
        sessions
            .iter()
            .filter(|s| s.spec.service == name && s.spec.mode == mode)
            .map(|s| Some(s.spec.owner.clone()))
            .collect()
    };
    let mesh_prefix = format!("{name}-kt-mesh-");
    let mut exchanged = selected(compat::ROLE_SHADOW_EXCHANGE);
    exchanged.extend(of_sessions(SessionMode::Exchange));
    let auto: Vec<Option<String>> =
        if selector.get(compat::ROLE).map(String::as_str) == Some(compat::ROLE_ROUTER) {
            workloads
                .iter()
                .filter(|w| {
                    w.role() == Some(compat::ROLE_SHADOW_MESH) && w.name().starts_with(&mesh_prefix)
                })
                .map(|w| w.user().map(str::to_owned))
                .collect()
        } else {
            Vec::new()
        };
    let manual: Vec<Option<String>> = workloads
        .iter()
        .filter(|w| {
            w.role() == Some(compat::ROLE_SHADOW_MESH)
                && w.name().starts_with(&mesh_prefix)
                && selects(&selector, w.pod_labels)
        })
        .map(|w| w.user().map(str::to_owned))
        .collect();
    let agent = of_sessions(SessionMode::Mesh);
    let mut previewing = selected(compat::ROLE_SHADOW_PREVIEW);
    previewing.extend(of_sessions(SessionMode::Preview));
    if previewing.is_empty() && role_of(&service.metadata) == Some(compat::ROLE_SHADOW_PREVIEW) {
        previewing.push(user_of(&service.metadata));
    }
    for (what, holders) in [
        ("exchanged", exchanged),
        ("meshed (auto)", auto),
        ("meshed (manual)", manual),
        ("meshed (agent)", agent),
        ("previewing", previewing),
    ] {
        if !holders.is_empty() {
            return format!("{what} by {}", users(&holders));
        }
    }
    NORMAL.to_owned()
}

/// Every listed Service of `inventory` with its status, sorted by `sort_by` (by status:
/// the status text, then the name — exchanged < meshed < normal < previewing), without the
/// `normal` ones when `hide_natural`.
pub fn services(inventory: &Inventory, sort_by: SortBy, hide_natural: bool) -> Vec<ServiceLine> {
    let workloads = inventory.workloads();
    let mut lines: Vec<ServiceLine> = inventory
        .services
        .iter()
        .filter(|s| !is_plumbing(s))
        .map(|s| ServiceLine {
            name: s.metadata.name.clone().unwrap_or_default(),
            status: status(s, &workloads, &inventory.sessions),
        })
        .filter(|l| !(hide_natural && l.status == NORMAL))
        .collect();
    lines.sort_by(|a, b| a.name.cmp(&b.name));
    if sort_by == SortBy::Status {
        lines.sort_by(|a, b| a.status.cmp(&b.status));
    }
    lines
}

/// The services section.
pub fn render_services(namespace: &str, lines: &[ServiceLine]) -> String {
    let mut out = format!("---- Service in namespace {namespace} ----\n");
    for line in lines {
        out.push_str(&format!("> {} - {}\n", line.name, line.status));
    }
    out
}

/// Someone connected: a `shadow-connect` pod or Deployment (v0.3.7's connect, kt's shadow
/// connect) or a `connect` session (kt's agent connect).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connector {
    pub user: Option<String>,
    /// Minutes since its heartbeat (or renewal; creation when it has none).
    pub minutes_ago: i64,
}

/// The connectors among kt's `workloads` and `sessions` (of every namespace) at `now`.
pub fn connectors(
    workloads: &[Workload<'_>],
    sessions: &[KtSession],
    now: DateTime<Utc>,
) -> Vec<Connector> {
    let minutes = |at: Option<i64>| at.map_or(0, |t| ((now.timestamp() - t) / 60).max(0));
    let created = |meta: &ObjectMeta| meta.creation_timestamp.as_ref().map(|t| t.0.as_second());
    let mut found: Vec<Connector> = workloads
        .iter()
        .filter(|w| w.role() == Some(compat::ROLE_SHADOW_CONNECT))
        .map(|w| Connector {
            user: w.user().filter(|u| !u.is_empty()).map(str::to_owned),
            minutes_ago: minutes(heartbeat(w.meta).or_else(|| created(w.meta))),
        })
        .collect();
    found.extend(
        sessions
            .iter()
            .filter(|s| s.spec.mode == SessionMode::Connect)
            .map(|s| Connector {
                user: Some(s.spec.owner.clone()).filter(|u| !u.is_empty()),
                minutes_ago: minutes(
                    s.status
                        .as_ref()
                        .and_then(|st| st.renew_time)
                        .map(|r| r.timestamp())
                        .or_else(|| created(&s.metadata)),
                ),
            }),
    );
    found
}

/// The connectors section: one line per known user (their latest activity), then the
/// count, unknown users (no `kt-user`) counted each.
pub fn render_connectors(connectors: &[Connector]) -> String {
    let mut known: Vec<(String, i64)> = Vec::new();
    let mut unknown = 0;
    for c in connectors {
        match &c.user {
            None => unknown += 1,
            Some(user) => match known.iter_mut().find(|(u, _)| u == user) {
                Some((_, ago)) => *ago = (*ago).min(c.minutes_ago),
                None => known.push((user.clone(), c.minutes_ago)),
            },
        }
    }
    known.sort();
    let mut out = "---- User connecting to cluster ----\n".to_owned();
    for (user, ago) in &known {
        out.push_str(&format!("> {user} (last active {ago} min ago)\n"));
    }
    out.push_str(&format!("{} users in total", known.len() + unknown));
    if unknown > 0 {
        out.push_str(&format!(" (including {unknown} unknown users)"));
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone as _;
    use serde_json::json;

    use super::*;

    const NOW: i64 = 1_800_000_000;

    fn kt_pod(name: &str, labels: serde_json::Value, user: Option<&str>) -> serde_json::Value {
        let mut labels = labels;
        labels["control-by"] = json!("kt");
        json!({"metadata": {"name": name, "labels": labels,
               "annotations": user.map(|u| json!({"kt-user": u, "kt-last-heart-beat": (NOW - 150).to_string()}))}})
    }

    fn svc(name: &str, selector: serde_json::Value) -> serde_json::Value {
        json!({"metadata": {"name": name}, "spec": {"selector": selector}})
    }

    fn session(name: &str, mode: &str, service: &str, owner: &str) -> serde_json::Value {
        json!({"apiVersion": "kt.dev/v1alpha1", "kind": "KtSession", "metadata": {"name": name},
               "spec": {"owner": owner, "mode": mode, "service": service, "publicKey": "k"},
               "status": {"renewTime": Utc.timestamp_opt(NOW - 61, 0).unwrap().to_rfc3339()}})
    }

    /// One namespace with a Service in every state.
    fn every_state() -> Inventory {
        let value = json!({
            "services": [
                svc("plain", json!({"app": "plain"})),
                svc("sel", json!({"kt-role": "shadow-exchange", "kt-target": "T"})),
                svc("scaled", json!({"app": "scaled"})),
                svc("auto", json!({"kt-role": "router", "kt-target": "R"})),
                {"metadata": {"name": "auto-kt-stuntman", "labels": {"control-by": "kt"}}, "spec": {"selector": {"app": "auto"}}},
                {"metadata": {"name": "auto-kt-mesh-v1", "labels": {"control-by": "kt"}}, "spec": {"selector": {"kt-role": "shadow-mesh"}}},
                svc("manual", json!({"app": "manual"})),
                {"metadata": {"name": "pre", "labels": {"control-by": "kt"}}, "spec": {"selector": {"kt-role": "shadow-preview", "kt-target": "P"}}},
                svc("agentx", json!({"app": "agentx"})),
                svc("agentm", json!({"app": "agentm"})),
                {"metadata": {"name": "agentp", "labels": {"control-by": "kt", "kt-role": "shadow-preview"}}, "spec": {}},
            ],
            "pods": [
                kt_pod("sel-kt-exchange-aaaaa", json!({"kt-role": "shadow-exchange", "kt-target": "T"}), Some("alice")),
                kt_pod("scaled-kt-exchange-bbbbb", json!({"kt-role": "shadow-exchange", "app": "scaled"}), None),
                kt_pod("auto-kt-router", json!({"kt-role": "router", "kt-target": "R"}), Some("bob")),
                kt_pod("auto-kt-mesh-v1", json!({"kt-role": "shadow-mesh", "kt-target": "M1"}), Some("bob")),
                kt_pod("auto-kt-mesh-v2", json!({"kt-role": "shadow-mesh", "kt-target": "M2"}), Some("carol")),
                kt_pod("manual-kt-mesh-v3", json!({"kt-role": "shadow-mesh", "app": "manual", "version": "v3"}), Some("dave")),
                kt_pod("pre-kt-ccccc", json!({"kt-role": "shadow-preview", "kt-target": "P"}), Some("erin")),
                kt_pod("kt-connect-shadow-ddddd", json!({"kt-role": "shadow-connect"}), Some("frank")),
                kt_pod("kt-connect-shadow-eeeee", json!({"kt-role": "shadow-connect"}), None),
            ],
            "sessions": [
                session("agentx-kt-aaaaa", "exchange", "agentx", "gina@box"),
                session("agentm-kt-mesh-bbbbb", "mesh", "agentm", "hal@box"),
                session("agentp-kt-preview-ccccc", "preview", "agentp", "ivy@box"),
                session("connect-jo", "connect", "", "jo@box"),
            ],
        });
        let list = |key: &str| value.get(key).cloned().unwrap_or(json!([]));
        Inventory {
            services: serde_json::from_value(list("services")).unwrap(),
            deployments: Vec::new(),
            pods: serde_json::from_value(list("pods")).unwrap(),
            config_maps: Vec::new(),
            sessions: serde_json::from_value(list("sessions")).unwrap(),
        }
    }

    #[test]
    fn every_state_reads_as_v0_3_7_words_sorted_by_status() {
        let lines = services(&every_state(), SortBy::Status, false);
        assert_eq!(
            render_services("default", &lines),
            "---- Service in namespace default ----\n\
             > sel - exchanged by [alice]\n\
             > agentx - exchanged by [gina@box]\n\
             > scaled - exchanged by unknown user\n\
             > agentm - meshed (agent) by [hal@box]\n\
             > auto - meshed (auto) by [bob], [carol]\n\
             > manual - meshed (manual) by [dave]\n\
             > plain - normal\n\
             > pre - previewing by [erin]\n\
             > agentp - previewing by [ivy@box]\n"
        );
    }

    #[test]
    fn by_name_and_without_natural_services() {
        let names = |lines: Vec<ServiceLine>| lines.into_iter().map(|l| l.name).collect::<Vec<_>>();
        let by_name = names(services(&every_state(), SortBy::Name, false));
        let mut sorted = by_name.clone();
        sorted.sort();
        assert_eq!(by_name, sorted);
        assert!(by_name.contains(&"plain".to_owned()));
        assert!(!names(services(&every_state(), SortBy::Name, true)).contains(&"plain".to_owned()));
    }

    #[test]
    fn connectors_are_counted_with_unknown_users() {
        let inv = every_state();
        let now = Utc.timestamp_opt(NOW, 0).unwrap();
        let found = connectors(&inv.workloads(), &inv.sessions, now);
        assert_eq!(
            render_connectors(&found),
            "---- User connecting to cluster ----\n\
             > frank (last active 2 min ago)\n\
             > jo@box (last active 1 min ago)\n\
             3 users in total (including 1 unknown users)\n"
        );
        assert_eq!(
            render_connectors(&[]),
            "---- User connecting to cluster ----\n0 users in total\n"
        );
    }
}
