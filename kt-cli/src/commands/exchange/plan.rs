//! The pure part of `exchange`: `--expose` parsing, which Service port each exposed port
//! stands for, the selector patches of selector mode, and whether someone else already
//! holds the Service. No I/O: everything here is decided from objects already read.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use k8s_openapi::{
    api::core::v1::{Pod, Service},
    apimachinery::pkg::util::intstr::IntOrString,
};
use kt_proto::{compat, session::KtSession};
use serde_json::json;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("invalid --expose '{0}': no port")]
    NoPort(String),
    #[error("invalid --expose '{0}', should be 'port' or 'local:remote'")]
    Malformed(String),
    /// v0.3.7's text.
    #[error("target port {port} not exists in service '{service}'")]
    NoSuchPort { port: u16, service: String },
}

/// One `--expose` item: the local port, and the remote port if given.
pub type ExposeItem = (u16, Option<u16>);

/// One exposed port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exposed {
    /// The workstation port connections go to.
    pub local: u16,
    /// The Service's `port`.
    pub service_port: u16,
    /// Where a shadow listens: the numeric target port, or the Service port when the
    /// target port is a name (the shadow declares that name on this port).
    pub listen_port: u16,
    /// The container port name a shadow declares.
    pub port_name: String,
}

/// A Service port as exchange sees it.
#[derive(Clone, Debug)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    pub target: Option<IntOrString>,
}

impl ServicePort {
    /// The ports of `service`.
    pub fn of(service: &Service) -> Vec<Self> {
        service
            .spec
            .as_ref()
            .and_then(|s| s.ports.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|p| Self {
                name: p.name,
                port: u16::try_from(p.port).unwrap_or_default(),
                target: p.target_port,
            })
            .collect()
    }
}

/// `--expose`: `port` or `local:remote`, comma separated.
pub fn parse_expose(text: &str) -> Result<Vec<ExposeItem>, PlanError> {
    let port = |p: &str| p.trim().parse::<u16>().ok().filter(|p| *p > 0);
    let pairs: Vec<&str> = text.split(',').filter(|p| !p.trim().is_empty()).collect();
    if pairs.is_empty() {
        return Err(PlanError::NoPort(text.to_owned()));
    }
    pairs
        .into_iter()
        .map(|pair| {
            let parsed = match pair.split_once(':') {
                Some((l, r)) => port(l).zip(port(r)).map(|(l, r)| (l, Some(r))),
                None => port(pair).map(|p| (p, None)),
            };
            parsed.ok_or_else(|| PlanError::Malformed(pair.to_owned()))
        })
        .collect()
}

/// Matches each exposed pair to a Service port: the remote part (or the local port alone)
/// is a numeric target port (v0.3.7), or else the Service's port; a target port match wins
/// when both exist.
pub fn plan(
    service: &str,
    ports: &[ServicePort],
    expose: &[ExposeItem],
) -> Result<Vec<Exposed>, PlanError> {
    expose
        .iter()
        .map(|(local, remote)| {
            let wanted = remote.unwrap_or(*local);
            let by_target = ports.iter().find(|p| {
                p.target.as_ref().map_or(p.port == wanted, |t| {
                    *t == IntOrString::Int(i32::from(wanted))
                })
            });
            let found = by_target
                .or_else(|| ports.iter().find(|p| p.port == wanted))
                .ok_or_else(|| PlanError::NoSuchPort {
                    port: wanted,
                    service: service.to_owned(),
                })?;
            let (listen_port, port_name) = match &found.target {
                Some(IntOrString::String(name)) => (found.port, name.clone()),
                Some(IntOrString::Int(port)) => {
                    let port = u16::try_from(*port).unwrap_or(found.port);
                    (port, format!("kt-{port}"))
                }
                None => (found.port, format!("kt-{}", found.port)),
            };
            Ok(Exposed {
                local: *local,
                service_port: found.port,
                listen_port,
                port_name,
            })
        })
        .collect()
}

/// The merge patch that points `old`'s Service at the shadow `target`, keeping the old
/// selector in `kt-selector`; and the one that undoes it.
pub fn selector_patches(
    old: &BTreeMap<String, String>,
    target: &str,
) -> (serde_json::Value, serde_json::Value) {
    let mut to_shadow: serde_json::Map<String, serde_json::Value> = old
        .keys()
        .map(|k| (k.clone(), serde_json::Value::Null))
        .collect();
    to_shadow.insert(compat::ROLE.into(), json!(compat::ROLE_SHADOW_EXCHANGE));
    to_shadow.insert(compat::TARGET.into(), json!(target));
    let mut back: serde_json::Map<String, serde_json::Value> = [compat::ROLE, compat::TARGET]
        .into_iter()
        .map(|k| (k.to_owned(), serde_json::Value::Null))
        .collect();
    back.extend(old.iter().map(|(k, v)| (k.clone(), json!(v))));
    let saved = serde_json::to_string(old).expect("a map serialises");
    (
        json!({"metadata": {"annotations": {compat::SELECTOR: saved}}, "spec": {"selector": to_shadow}}),
        json!({"metadata": {"annotations": {compat::SELECTOR: null}}, "spec": {"selector": back}}),
    )
}

/// Someone else holds the Service.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Conflict {
    /// v0.3.7's text: the Service points at a mesh router.
    #[error("another user is meshing service '{service}', cannot apply exchange")]
    Meshed { service: String },
    /// v0.3.7's text, with the holder kt knows (an agent-mode session's owner, or a
    /// shadow's `kt-user`).
    #[error(
        "service '{service}' is already exchanging by another user ({holder}), cannot apply exchange"
    )]
    Exchanged { service: String, holder: String },
}

/// Whether `service` (named `name`) is taken, by kt or the Go ktctl: meshed (its selector
/// points at a router), exchanged in agent mode (a live session names it), exchanged in
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
    if let Some(session) = sessions.iter().find(|s| {
        s.spec.service == name && s.metadata.deletion_timestamp.is_none() && s.lease_live(now)
    }) {
        return exchanged(session.spec.owner.clone());
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

    fn web() -> Vec<ServicePort> {
        vec![
            ServicePort {
                name: Some("http".into()),
                port: 80,
                target: Some(IntOrString::String("http".into())),
            },
            ServicePort {
                name: Some("admin".into()),
                port: 81,
                target: Some(IntOrString::Int(9001)),
            },
            ServicePort {
                name: Some("odd".into()),
                port: 9001,
                target: Some(IntOrString::Int(7000)),
            },
        ]
    }

    #[test]
    fn expose_forms_and_errors() {
        assert_eq!(
            parse_expose("8080,9000:81").unwrap(),
            [(8080, None), (9000, Some(81))]
        );
        for bad in ["", "x", "8080:", "0", "1:2:3", "70000"] {
            let err = parse_expose(bad).unwrap_err().to_string();
            assert!(err.contains("--expose"), "{bad}: {err}");
        }
    }

    #[test]
    fn remote_is_a_target_port_or_else_a_service_port() {
        // 9001 is both admin's target port and odd's service port: the target port wins.
        let planned = plan("web", &web(), &[(6000, Some(9001)), (6001, Some(80))]).unwrap();
        assert_eq!(
            planned,
            [
                Exposed {
                    local: 6000,
                    service_port: 81,
                    listen_port: 9001,
                    port_name: "kt-9001".into()
                },
                // A named target port: the shadow declares the name on the service port.
                Exposed {
                    local: 6001,
                    service_port: 80,
                    listen_port: 80,
                    port_name: "http".into()
                },
            ]
        );
        let err = plan("web", &web(), &[(6000, Some(5))])
            .unwrap_err()
            .to_string();
        assert_eq!(err, "target port 5 not exists in service 'web'");
    }

    #[test]
    fn the_selector_moves_to_the_shadow_and_back() {
        let old: BTreeMap<String, String> = [("app".to_owned(), "web".to_owned())].into();
        let (to, back) = selector_patches(&old, "AbC");
        assert_eq!(
            to["spec"]["selector"],
            json!({"app": null, "kt-role": "shadow-exchange", "kt-target": "AbC"})
        );
        assert_eq!(
            to["metadata"]["annotations"]["kt-selector"],
            r#"{"app":"web"}"#
        );
        assert_eq!(
            back["spec"]["selector"],
            json!({"app": "web", "kt-role": null, "kt-target": null})
        );
        assert_eq!(back["metadata"]["annotations"]["kt-selector"], json!(null));
    }

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
