//! `recover <svc>`'s decision (pure): how the Service was left — by the Go ktctl v0.3.7 or by
//! kt — and the actions that put it back, after ktctl v0.3.7 `recover/common.go`
//! (`../shared/reference/ktctl-v0.3.7.md` §3.7), plus kt's agent-mode sessions.

use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::Service;
use kt_proto::{
    compat,
    session::{KtSession, SessionMode},
};
use kube::api::ObjectMeta;

use crate::cluster::stale::{
    Action, Inventory, Kind,
    plan::{
        STALE_AFTER, Workload, heartbeat, heartbeat_stale, kt_config, saved_selector, scaled,
        selector_of, selects,
    },
};

/// What kt had done to the Service (decides v0.3.7's message).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Nothing of kt's: `Service S is clean and tidy, nothing would be done`.
    Tidy,
    /// `Service S is exchanged, recovering`.
    Exchanged,
    /// `Service S is meshed, recovering`.
    Meshed,
    /// Only a lock, or a `kt-selector` that cannot be used: `Service S neither exchanged nor
    /// meshed by kt, nothing would be done` (a lock is still removed, as v0.3.7 does).
    Neither,
}

/// Someone whose session seems alive: recovering ends it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alive {
    /// `pod web-kt-exchange-abcde`, `session web-kt-abcde`.
    pub what: String,
    /// `kt-user` or the session's `user@host`.
    pub owner: String,
    /// Seconds since its heartbeat or renewal.
    pub seconds_ago: i64,
}

/// The decision for one Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recovery {
    pub state: State,
    /// In [`Action::rank`] order.
    pub actions: Vec<Action>,
    /// The live holders the actions remove (to warn about).
    pub alive: Vec<Alive>,
    /// Why part of it cannot be recovered.
    pub problems: Vec<String>,
}

impl State {
    /// v0.3.7's line for `service`.
    pub fn message(self, service: &str) -> String {
        match self {
            Self::Tidy => format!("Service {service} is clean and tidy, nothing would be done"),
            Self::Exchanged => format!("Service {service} is exchanged, recovering"),
            Self::Meshed => format!("Service {service} is meshed, recovering"),
            Self::Neither => {
                format!(
                    "Service {service} neither exchanged nor meshed by kt, nothing would be done"
                )
            }
        }
    }
}

struct Builder<'a> {
    now: DateTime<Utc>,
    actions: Vec<Action>,
    alive: Vec<Alive>,
    config_maps: &'a Inventory,
}

impl Builder<'_> {
    /// Deletes a kt pod or Deployment with its same-named ConfigMap (its key).
    fn delete_workload(&mut self, w: &Workload<'_>) {
        let owner = w.user().map(str::to_owned);
        self.note_alive(w.kind, w.meta, owner.clone());
        self.delete(w.kind, w.name(), owner.clone());
        if self
            .config_maps
            .config_maps
            .iter()
            .any(|c| c.metadata.name.as_deref() == Some(w.name()))
        {
            self.delete(Kind::ConfigMap, w.name(), owner);
        }
    }

    fn delete(&mut self, kind: Kind, name: &str, owner: Option<String>) {
        let action = Action::Delete {
            kind,
            name: name.to_owned(),
            owner,
        };
        if !self.actions.contains(&action) {
            self.actions.push(action);
        }
    }

    fn note_alive(&mut self, kind: Kind, meta: &ObjectMeta, owner: Option<String>) {
        if let Some(beat) = heartbeat(meta)
            && !heartbeat_stale(meta, self.now, STALE_AFTER)
        {
            self.alive.push(Alive {
                what: format!(
                    "{} {}",
                    kind.as_str(),
                    meta.name.as_deref().unwrap_or_default()
                ),
                owner: owner.unwrap_or_else(|| "unknown user".into()),
                seconds_ago: self.now.timestamp() - beat,
            });
        }
    }
}

/// The recovery of `service` given the namespace's `inventory`, at cluster time `now`:
///
/// - `kt-lock` is removed when present;
/// - with `kt-selector` and the selector on a `router` (auto mesh): the selector back, the
///   router pod `S-kt-router`, the stuntman Service `S-kt-stuntman` and every mesh shadow
///   `S-kt-mesh-*` (pod or Deployment, its Service and ConfigMap) deleted;
/// - with `kt-selector` and the selector on anything else (selector exchange): the selector
///   back, and the kt pods and Deployments it selects (or that carry its `kt-target`)
///   deleted (v0.3.7 deletes whatever it selects; kt only what kt created, `control-by=kt`);
/// - without `kt-selector`: kt's `shadow-mesh` pods named `S-kt-mesh-*` that the selector
///   selects (manual mesh) deleted; kt's `shadow-exchange` pods it selects (scale exchange)
///   deleted and the Deployments of their `kt-config` scaled back;
/// - kt's agent-mode exchange and mesh sessions of the Service deleted.
///
/// Live holders (a fresh heartbeat, a live lease) are recovered too but listed in
/// [`Recovery::alive`]: `recover` is the way out of a Service stuck "exchanging by another
/// user", and v0.3.7 does not check either.
pub fn recover(service: &Service, inventory: &Inventory, now: DateTime<Utc>) -> Recovery {
    let name = service.metadata.name.clone().unwrap_or_default();
    let current = selector_of(service);
    let workloads = inventory.workloads();
    let mut b = Builder {
        now,
        actions: Vec::new(),
        alive: Vec::new(),
        config_maps: inventory,
    };
    let mut problems = Vec::new();
    let (mut exchanged, mut meshed) = (false, false);
    let locked = service
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(compat::LOCK));
    if locked {
        b.actions.push(Action::Unlock {
            service: name.clone(),
        });
    }
    let mesh_prefix = format!("{name}-kt-mesh-");
    match saved_selector(&service.metadata) {
        Some(Ok(original)) => {
            b.actions.push(Action::RestoreSelector {
                service: name.clone(),
                original,
                current: current.clone(),
            });
            if current.get(compat::ROLE).map(String::as_str) == Some(compat::ROLE_ROUTER) {
                meshed = true;
                let router = format!("{name}-kt-router");
                for w in &workloads {
                    let is_router = w.role() == Some(compat::ROLE_ROUTER)
                        && (w.name() == router || selects(&current, w.pod_labels));
                    let is_shadow = w.role() == Some(compat::ROLE_SHADOW_MESH)
                        && w.name().starts_with(&mesh_prefix);
                    if is_router || is_shadow {
                        b.delete_workload(w);
                    }
                }
                let stuntman = format!("{name}-kt-stuntman");
                for s in &inventory.services {
                    let other = s.metadata.name.as_deref().unwrap_or_default();
                    if other == stuntman || other.starts_with(&mesh_prefix) {
                        b.delete(Kind::Service, other, None);
                    }
                }
            } else {
                exchanged = true;
                // Its shadow: what the selector selects, or — when someone added keys to the
                // selector since — the kt pod of its `kt-target`.
                let target = current.get(compat::TARGET);
                for w in &workloads {
                    let of_target = target.is_some()
                        && w.meta.labels.as_ref().and_then(|l| l.get(compat::TARGET)) == target;
                    if selects(&current, w.pod_labels) || of_target {
                        b.delete_workload(w);
                    }
                }
            }
        }
        Some(Err(text)) => problems.push(format!(
            "its kt-selector annotation '{text}' is not a selector; the original selector cannot be restored"
        )),
        None => {
            if current.contains_key(compat::ROLE) {
                problems.push(format!(
                    "its selector {current:?} points at kt's pods but its original selector (kt-selector) is gone"
                ));
            }
            for w in &workloads {
                if !selects(&current, w.pod_labels) {
                    continue;
                }
                match w.role() {
                    Some(compat::ROLE_SHADOW_MESH) if w.name().starts_with(&mesh_prefix) => {
                        meshed = true;
                        b.delete_workload(w);
                    }
                    Some(compat::ROLE_SHADOW_EXCHANGE) => {
                        exchanged = true;
                        b.delete_workload(w);
                        for (deployment, replicas) in scaled(&kt_config(w.meta)) {
                            let action = Action::ScaleBack {
                                deployment,
                                replicas,
                            };
                            if !b.actions.contains(&action) {
                                b.actions.push(action);
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    for session in sessions_of(&inventory.sessions, &name) {
        match session.spec.mode {
            SessionMode::Mesh => meshed = true,
            _ => exchanged = true,
        }
        let session_name = session.metadata.name.clone().unwrap_or_default();
        if session.lease_live(now) {
            b.alive.push(Alive {
                what: format!("session {session_name}"),
                owner: session.spec.owner.clone(),
                seconds_ago: session
                    .status
                    .as_ref()
                    .and_then(|s| s.renew_time)
                    .map_or(0, |r| (now - r).num_seconds()),
            });
        }
        b.delete(
            Kind::Session,
            &session_name,
            Some(session.spec.owner.clone()),
        );
    }
    let state = if meshed {
        State::Meshed
    } else if exchanged {
        State::Exchanged
    } else if b.actions.is_empty() && problems.is_empty() {
        State::Tidy
    } else {
        State::Neither
    };
    let mut actions = b.actions;
    actions.sort_by_key(Action::rank);
    Recovery {
        state,
        actions,
        alive: b.alive,
        problems,
    }
}

/// The agent-mode exchange and mesh sessions of `service` (preview and connect sessions are
/// not traffic of an existing Service: `clean` and the agents collect those).
fn sessions_of<'a>(
    sessions: &'a [KtSession],
    service: &'a str,
) -> impl Iterator<Item = &'a KtSession> {
    sessions.iter().filter(move |s| {
        s.spec.service == service
            && matches!(s.spec.mode, SessionMode::Exchange | SessionMode::Mesh)
            && s.metadata.deletion_timestamp.is_none()
    })
}

/// How long ago, for warnings.
pub fn ago(seconds: i64) -> String {
    let d = Duration::from_secs(seconds.max(0).unsigned_abs());
    if d.as_secs() < 120 {
        format!("{} s ago", d.as_secs())
    } else {
        format!("{} min ago", d.as_secs() / 60)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use chrono::TimeZone as _;
    use serde_json::json;

    use super::*;

    const NOW: i64 = 1_800_000_000;

    fn now() -> DateTime<Utc> {
        Utc.timestamp_opt(NOW, 0).unwrap()
    }

    fn beat(ago: i64) -> String {
        (NOW - ago).to_string()
    }

    fn inventory(value: serde_json::Value) -> Inventory {
        let list = |key: &str| value.get(key).cloned().unwrap_or(json!([]));
        Inventory {
            services: serde_json::from_value(list("services")).unwrap(),
            deployments: serde_json::from_value(list("deployments")).unwrap(),
            pods: serde_json::from_value(list("pods")).unwrap(),
            config_maps: serde_json::from_value(list("config_maps")).unwrap(),
            sessions: serde_json::from_value(list("sessions")).unwrap(),
        }
    }

    fn service(selector: serde_json::Value, annotations: serde_json::Value) -> Service {
        serde_json::from_value(
            json!({"metadata": {"name": "web", "annotations": annotations},
                                      "spec": {"selector": selector}}),
        )
        .unwrap()
    }

    fn deleted(r: &Recovery) -> Vec<String> {
        r.actions
            .iter()
            .filter_map(|a| match a {
                Action::Delete { kind, name, .. } => Some(format!("{} {name}", kind.as_str())),
                _ => None,
            })
            .collect()
    }

    fn kt_pod(
        name: &str,
        labels: serde_json::Value,
        annotations: serde_json::Value,
    ) -> serde_json::Value {
        let mut labels = labels;
        labels["control-by"] = json!("kt");
        json!({"metadata": {"name": name, "labels": labels, "annotations": annotations}})
    }

    #[test]
    fn a_clean_service_is_tidy_and_a_lock_alone_is_neither() {
        let inv = inventory(
            json!({"pods": [kt_pod("other-kt-exchange-aaaaa", json!({"kt-role": "shadow-exchange", "app": "other"}), json!({}))]}),
        );
        let r = recover(&service(json!({"app": "web"}), json!({})), &inv, now());
        assert_eq!((r.state, r.actions.len()), (State::Tidy, 0));
        let r = recover(
            &service(json!({"app": "web"}), json!({"kt-lock": beat(10)})),
            &inv,
            now(),
        );
        assert_eq!(r.state, State::Neither);
        assert_eq!(
            r.actions,
            [Action::Unlock {
                service: "web".into()
            }]
        );
        assert_eq!(
            State::Neither.message("web"),
            "Service web neither exchanged nor meshed by kt, nothing would be done"
        );
    }

    #[test]
    fn a_selector_exchange_gets_its_selector_back_and_its_shadow_deleted() {
        let inv = inventory(json!({
            "pods": [
                kt_pod("web-kt-exchange-abcde", json!({"kt-role": "shadow-exchange", "kt-target": "T"}),
                       json!({"kt-last-heart-beat": beat(900), "kt-user": "alice"})),
                kt_pod("api-kt-exchange-fghij", json!({"kt-role": "shadow-exchange", "kt-target": "U"}), json!({})),
            ],
            "config_maps": [{"metadata": {"name": "web-kt-exchange-abcde"}}],
        }));
        let svc = service(
            json!({"kt-role": "shadow-exchange", "kt-target": "T"}),
            json!({"kt-selector": "{\"app\":\"web\"}", "kt-lock": beat(5)}),
        );
        let r = recover(&svc, &inv, now());
        assert_eq!(r.state, State::Exchanged);
        assert!(
            matches!(&r.actions[0], Action::RestoreSelector { original, .. }
            if *original == BTreeMap::from([("app".to_owned(), "web".to_owned())]))
        );
        assert_eq!(
            deleted(&r),
            [
                "pod web-kt-exchange-abcde",
                "configmap web-kt-exchange-abcde"
            ]
        );
        assert!(matches!(r.actions.last(), Some(Action::Unlock { .. })));
        assert!(r.alive.is_empty(), "its heartbeat is 15 minutes old");
        // Someone added a key to the selector meanwhile: the shadow is found by its target.
        let svc = service(
            json!({"app": "web", "kt-role": "shadow-exchange", "kt-target": "T"}),
            json!({"kt-selector": "{\"app\":\"web\"}"}),
        );
        let r = recover(&svc, &inv, now());
        assert_eq!(
            deleted(&r),
            [
                "pod web-kt-exchange-abcde",
                "configmap web-kt-exchange-abcde"
            ]
        );
    }

    #[test]
    fn an_auto_mesh_loses_router_stuntman_and_every_mesh_shadow() {
        let inv = inventory(json!({
            "services": [
                {"metadata": {"name": "web-kt-stuntman"}, "spec": {"selector": {"app": "web"}}},
                {"metadata": {"name": "web-kt-mesh-abcde"}, "spec": {}},
                {"metadata": {"name": "webby"}, "spec": {}},
            ],
            "pods": [
                kt_pod("web-kt-router", json!({"kt-role": "router", "kt-target": "R"}), json!({"kt-last-heart-beat": beat(20), "kt-user": "bob"})),
                kt_pod("web-kt-mesh-abcde", json!({"kt-role": "shadow-mesh", "kt-target": "M"}), json!({})),
                kt_pod("webby-kt-mesh-xxxxx", json!({"kt-role": "shadow-mesh"}), json!({})),
            ],
        }));
        let svc = service(
            json!({"kt-role": "router", "kt-target": "R"}),
            json!({"kt-selector": "{\"app\":\"web\"}"}),
        );
        let r = recover(&svc, &inv, now());
        assert_eq!(r.state, State::Meshed);
        assert_eq!(
            deleted(&r),
            [
                "pod web-kt-router",
                "pod web-kt-mesh-abcde",
                "service web-kt-stuntman",
                "service web-kt-mesh-abcde"
            ]
        );
        assert_eq!(r.alive.len(), 1, "the router's heartbeat is fresh");
        assert_eq!(
            (r.alive[0].owner.as_str(), r.alive[0].seconds_ago),
            ("bob", 20)
        );
    }

    #[test]
    fn a_scale_exchange_is_scaled_back_as_each_writer_records_it() {
        for (config, expected) in [
            ("app=web,replicas=2", vec![("web", 2)]),
            (
                "app=web,replicas=2,deployments=web:2;canary:1",
                vec![("web", 2), ("canary", 1)],
            ),
        ] {
            let inv = inventory(json!({"pods": [
                kt_pod("web-kt-exchange-abcde", json!({"kt-role": "shadow-exchange", "app": "web"}), json!({"kt-config": config})),
            ]}));
            let r = recover(&service(json!({"app": "web"}), json!({})), &inv, now());
            assert_eq!(r.state, State::Exchanged);
            let scaled: Vec<(&str, i32)> = r
                .actions
                .iter()
                .filter_map(|a| match a {
                    Action::ScaleBack {
                        deployment,
                        replicas,
                    } => Some((deployment.as_str(), *replicas)),
                    _ => None,
                })
                .collect();
            assert_eq!(scaled, expected);
            assert_eq!(deleted(&r), ["pod web-kt-exchange-abcde"]);
        }
    }

    #[test]
    fn a_manual_mesh_shadow_goes_and_a_stranger_with_the_labels_stays() {
        let inv = inventory(json!({"pods": [
            kt_pod("web-kt-mesh-abcde", json!({"kt-role": "shadow-mesh", "app": "web", "version": "abcde"}), json!({})),
            kt_pod("kt-connect-shadow-xyzab", json!({"kt-role": "shadow-connect", "app": "web"}), json!({})),
        ]}));
        let r = recover(&service(json!({"app": "web"}), json!({})), &inv, now());
        assert_eq!(r.state, State::Meshed);
        assert_eq!(deleted(&r), ["pod web-kt-mesh-abcde"]);
    }

    #[test]
    fn agent_sessions_of_the_service_end_and_live_ones_are_named() {
        let at = |ago: i64| Utc.timestamp_opt(NOW - ago, 0).unwrap().to_rfc3339();
        let session = |name: &str, mode: &str, service: &str, renewed: i64| {
            json!({"apiVersion": "kt.dev/v1alpha1", "kind": "KtSession",
                   "metadata": {"name": name},
                   "spec": {"owner": "carol@desk", "mode": mode, "service": service, "publicKey": "k"},
                   "status": {"renewTime": at(renewed)}})
        };
        let inv = inventory(json!({"sessions": [
            session("web-kt-aaaaa", "exchange", "web", 3),
            session("web-kt-preview-bbbbb", "preview", "web", 3),
            session("api-kt-ccccc", "exchange", "api", 3),
        ]}));
        let r = recover(&service(json!({"app": "web"}), json!({})), &inv, now());
        assert_eq!(r.state, State::Exchanged);
        assert_eq!(deleted(&r), ["ktsession web-kt-aaaaa"]);
        assert_eq!(
            r.alive,
            [Alive {
                what: "session web-kt-aaaaa".into(),
                owner: "carol@desk".into(),
                seconds_ago: 3
            }]
        );
        let inv =
            inventory(json!({"sessions": [session("web-kt-mesh-ddddd", "mesh", "web", 600)]}));
        let r = recover(&service(json!({"app": "web"}), json!({})), &inv, now());
        assert_eq!((r.state, r.alive.len()), (State::Meshed, 0));
    }

    #[test]
    fn a_broken_or_missing_kt_selector_is_a_problem_not_a_guess() {
        let inv = Inventory::default();
        let r = recover(
            &service(json!({"app": "web"}), json!({"kt-selector": "nonsense"})),
            &inv,
            now(),
        );
        assert_eq!(r.state, State::Neither);
        assert_eq!(r.problems.len(), 1);
        let r = recover(
            &service(
                json!({"kt-role": "shadow-exchange", "kt-target": "T"}),
                json!({}),
            ),
            &inv,
            now(),
        );
        assert_eq!((r.state, r.problems.len()), (State::Neither, 1));
    }
}
