//! Whether someone else already holds the Service — kt or the Go ktctl, in any mode — decided
//! from the objects read: the Service, the agent-mode sessions of its namespace, and the pods
//! its selector selects now.

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::{Pod, Service};
use kt_proto::{
    compat,
    session::{KtSession, SessionMode},
};

/// Someone else holds the Service.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Conflict {
    /// v0.3.7's text: the Service points at a mesh router.
    #[error("another user is meshing service '{service}', cannot apply exchange")]
    Meshed { service: String },
    /// Agent-mode mesh sessions hold the Service: v0.3.7's text with their owners.
    #[error("another user ({holders}) is meshing service '{service}', cannot apply exchange")]
    MeshedBy { service: String, holders: String },
    /// v0.3.7's text, with the holder kt knows (an agent-mode session's owner, or a
    /// shadow's `kt-user`).
    #[error(
        "service '{service}' is already exchanging by another user ({holder}), cannot apply exchange"
    )]
    Exchanged { service: String, holder: String },
}

/// Whether `service` (named `name`) is taken, by kt or the Go ktctl: meshed (its selector
/// points at a router, or live agent-mode mesh sessions name it), exchanged in agent mode
/// (a live exchange session names it), exchanged in
/// selector mode (it carries `kt-selector`), or in scale mode (an exchange shadow is among
/// `selected`, the pods its selector selects now).
pub fn conflict(
    name: &str,
    service: &Service,
    sessions: &[KtSession],
    selected: &[Pod],
    now: DateTime<Utc>,
) -> Option<Conflict> {
    let selector = service
        .spec
        .as_ref()
        .and_then(|s| s.selector.clone())
        .unwrap_or_default();
    if selector.get(compat::ROLE).map(String::as_str) == Some(compat::ROLE_ROUTER) {
        return Some(Conflict::Meshed {
            service: name.to_owned(),
        });
    }
    let exchanged = |holder: String| {
        Some(Conflict::Exchanged {
            service: name.to_owned(),
            holder,
        })
    };
    let live: Vec<&KtSession> = sessions
        .iter()
        .filter(|s| {
            s.spec.service == name && s.metadata.deletion_timestamp.is_none() && s.lease_live(now)
        })
        .collect();
    if let Some(session) = live.iter().find(|s| s.spec.mode == SessionMode::Exchange) {
        return exchanged(session.spec.owner.clone());
    }
    let mut meshers: Vec<&str> = live
        .iter()
        .filter(|s| s.spec.mode == SessionMode::Mesh)
        .map(|s| s.spec.owner.as_str())
        .collect();
    meshers.sort_unstable();
    meshers.dedup();
    if !meshers.is_empty() {
        return Some(Conflict::MeshedBy {
            service: name.to_owned(),
            holders: meshers.join(", "),
        });
    }
    let by_selector = service
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(compat::SELECTOR));
    let label = |pod: &Pod, key: &str| {
        pod.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(key))
            .cloned()
    };
    let mut shadows = selected.iter().filter(|p| {
        by_selector || label(p, compat::ROLE).as_deref() == Some(compat::ROLE_SHADOW_EXCHANGE)
    });
    let first = shadows.next();
    if !by_selector && first.is_none() {
        return None;
    }
    let holder = first
        .into_iter()
        .chain(shadows)
        .find_map(|p| p.metadata.annotations.as_ref()?.get(compat::USER).cloned())
        .unwrap_or_else(|| "unknown user".into());
    exchanged(holder)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn service(selector: serde_json::Value, annotations: serde_json::Value) -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "annotations": annotations},
            "spec": {"selector": selector, "ports": [{"port": 80}]}
        }))
        .unwrap()
    }

    fn pod(labels: serde_json::Value, user: Option<&str>) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "labels": labels,
                         "annotations": user.map(|u| json!({"kt-user": u}))},
        }))
        .unwrap()
    }

    fn session(service: &str, owner: &str, renewed: DateTime<Utc>) -> KtSession {
        serde_json::from_value(json!({
            "apiVersion": "kt.dev/v1alpha1", "kind": "KtSession",
            "metadata": {"name": "s", "namespace": "default"},
            "spec": {"owner": owner, "mode": "exchange", "service": service,
                     "ports": [{"port": 80, "localPort": 8080}], "publicKey": "k"},
            "status": {"renewTime": renewed}
        }))
        .unwrap()
    }

    #[test]
    fn a_free_service_has_no_conflict() {
        let now = Utc::now();
        let svc = service(json!({"app": "web"}), json!({}));
        let app = pod(json!({"app": "web"}), None);
        let expired = session("web", "alice@a", now - chrono::TimeDelta::seconds(60));
        let other = session("api", "bob@b", now);
        assert_eq!(conflict("web", &svc, &[expired, other], &[app], now), None);
    }

    #[test]
    fn a_router_selector_is_a_mesh() {
        let svc = service(json!({"kt-role": "router", "kt-target": "x"}), json!({}));
        assert_eq!(
            conflict("web", &svc, &[], &[], Utc::now())
                .unwrap()
                .to_string(),
            "another user is meshing service 'web', cannot apply exchange"
        );
    }

    #[test]
    fn a_live_agent_session_names_its_owner() {
        let now = Utc::now();
        let svc = service(json!({"app": "web"}), json!({}));
        let held = conflict(
            "web",
            &svc,
            &[session("web", "alice@laptop", now)],
            &[],
            now,
        );
        assert_eq!(
            held.unwrap().to_string(),
            "service 'web' is already exchanging by another user (alice@laptop), cannot apply exchange"
        );
    }

    #[test]
    fn live_mesh_sessions_name_every_mesher_and_an_exchange_comes_first() {
        let now = Utc::now();
        let svc = service(json!({"app": "web"}), json!({}));
        let mesh = |owner: &str| {
            let mut s = session("web", owner, now);
            s.spec.mode = SessionMode::Mesh;
            s
        };
        let meshed = conflict(
            "web",
            &svc,
            &[mesh("bob@b"), mesh("alice@a"), mesh("bob@b")],
            &[],
            now,
        );
        assert_eq!(
            meshed.unwrap().to_string(),
            "another user (alice@a, bob@b) is meshing service 'web', cannot apply exchange"
        );
        let both = conflict(
            "web",
            &svc,
            &[mesh("bob@b"), session("web", "carol@c", now)],
            &[],
            now,
        );
        assert_eq!(
            both,
            Some(Conflict::Exchanged {
                service: "web".into(),
                holder: "carol@c".into()
            })
        );
    }

    #[test]
    fn selector_mode_is_told_by_kt_selector_and_names_the_shadows_user() {
        let now = Utc::now();
        let svc = service(
            json!({"kt-role": "shadow-exchange", "kt-target": "x"}),
            json!({"kt-selector": "{\"app\":\"web\"}"}),
        );
        let shadow = pod(json!({"kt-role": "shadow-exchange"}), Some("carol"));
        assert_eq!(
            conflict("web", &svc, &[], std::slice::from_ref(&shadow), now),
            Some(Conflict::Exchanged {
                service: "web".into(),
                holder: "carol".into()
            })
        );
        // The Go ktctl's shadow may be gone already: still taken, holder unknown.
        assert_eq!(
            conflict("web", &svc, &[], &[], now),
            Some(Conflict::Exchanged {
                service: "web".into(),
                holder: "unknown user".into()
            })
        );
    }

    #[test]
    fn scale_mode_is_told_by_an_exchange_shadow_among_the_selected_pods() {
        let now = Utc::now();
        let svc = service(json!({"app": "web"}), json!({}));
        let shadow = pod(
            json!({"app": "web", "kt-role": "shadow-exchange"}),
            Some("dave"),
        );
        let app = pod(json!({"app": "web"}), Some("not a shadow"));
        assert_eq!(
            conflict("web", &svc, &[], &[app, shadow], now),
            Some(Conflict::Exchanged {
                service: "web".into(),
                holder: "dave".into()
            })
        );
    }
}
