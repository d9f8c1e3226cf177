//! The changes `recover`, `clean` and `connect`'s startup cleanup make, decided by pure
//! planning ([`super::plan`], `commands/recover/plan.rs`) and carried out here.

use std::collections::BTreeMap;

use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{ConfigMap, Pod, Service},
};
use kt_proto::{compat, session::KtSession};
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams},
};
use serde_json::json;

/// The kinds of object kt deletes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Pod,
    Deployment,
    ConfigMap,
    Service,
    Session,
}

impl Kind {
    /// The lower-case kind, as `kubectl` names it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pod => "pod",
            Self::Deployment => "deployment",
            Self::ConfigMap => "configmap",
            Self::Service => "service",
            Self::Session => "ktsession",
        }
    }

    /// How ktctl v0.3.7's `clean` names a list of them (`Find 2 unavailing pods to delete:`).
    pub fn plural(self) -> &'static str {
        match self {
            Self::Pod => "pods",
            Self::Deployment => "deployments",
            Self::ConfigMap => "config maps",
            Self::Service => "services",
            Self::Session => "sessions",
        }
    }
}

/// One change, in the order [`Action::rank`] gives: traffic goes back to the user's pods
/// first, kt's objects go next, the lock last (no other ktctl starts on a half-recovered
/// Service).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// The Service's selector back to `original` (kt's keys and any other current key not in
    /// it removed), and `kt-selector` removed.
    RestoreSelector {
        service: String,
        original: BTreeMap<String, String>,
        current: BTreeMap<String, String>,
    },
    /// The Deployment scaled back (what scale exchange scaled to zero).
    ScaleBack { deployment: String, replicas: i32 },
    /// An object deleted; `owner` (`kt-user`, or a session's `user@host`) for messages.
    Delete {
        kind: Kind,
        name: String,
        owner: Option<String>,
    },
    /// `kt-lock` removed from the Service.
    Unlock { service: String },
}

impl Action {
    /// Where the action goes in a run (see the type's doc).
    pub fn rank(&self) -> u8 {
        match self {
            Self::RestoreSelector { .. } => 0,
            Self::ScaleBack { .. } => 1,
            Self::Delete { kind, .. } => 2 + *kind as u8,
            Self::Unlock { .. } => 10,
        }
    }

    /// The merge patch of [`Action::RestoreSelector`].
    pub fn restore_patch(
        original: &BTreeMap<String, String>,
        current: &BTreeMap<String, String>,
    ) -> serde_json::Value {
        let mut selector: serde_json::Map<String, serde_json::Value> = current
            .keys()
            .chain([compat::ROLE.to_owned(), compat::TARGET.to_owned()].iter())
            .filter(|k| !original.contains_key(*k))
            .map(|k| (k.clone(), serde_json::Value::Null))
            .collect();
        selector.extend(original.iter().map(|(k, v)| (k.clone(), json!(v))));
        json!({"metadata": {"annotations": {compat::SELECTOR: null}}, "spec": {"selector": selector}})
    }
}

/// Why an action failed.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    /// The API server refused to end someone's session (RBAC): named, not swallowed.
    #[error("not allowed to delete session {name} of {owner}")]
    Forbidden {
        name: String,
        owner: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error("failed to {what}")]
    Api {
        what: String,
        #[source]
        source: Box<kube::Error>,
    },
}

/// Carries out `actions` in `namespace`, in order, each logged in v0.3.7's words; an object
/// already gone counts as done. Every action is tried; the failures are returned.
pub async fn execute(
    client: &kube::Client,
    namespace: &str,
    actions: &[Action],
) -> Vec<ActionError> {
    let mut failed = Vec::new();
    for action in actions {
        if let Err(error) = execute_one(client, namespace, action).await {
            failed.push(error);
        }
    }
    failed
}

fn gone(result: Result<(), kube::Error>) -> Result<(), kube::Error> {
    match result {
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        other => other,
    }
}

async fn execute_one(
    client: &kube::Client,
    namespace: &str,
    action: &Action,
) -> Result<(), ActionError> {
    let api_error = |what: String| {
        move |source| ActionError::Api {
            what,
            source: Box::new(source),
        }
    };
    let params = PatchParams::default();
    match action {
        Action::RestoreSelector {
            service,
            original,
            current,
        } => {
            let patch = Action::restore_patch(original, current);
            gone(
                Api::<Service>::namespaced(client.clone(), namespace)
                    .patch(service, &params, &Patch::Merge(&patch))
                    .await
                    .map(drop),
            )
            .map_err(api_error(format!(
                "restore the selector of service '{service}'"
            )))?;
            tracing::info!("Service {service} recovered");
        }
        Action::ScaleBack {
            deployment,
            replicas,
        } => {
            let patch = json!({"spec": {"replicas": replicas}});
            gone(
                Api::<Deployment>::namespaced(client.clone(), namespace)
                    .patch(deployment, &params, &Patch::Merge(&patch))
                    .await
                    .map(drop),
            )
            .map_err(api_error(format!("scale deployment '{deployment}'")))?;
            tracing::info!("Scaling deployment {deployment} back to {replicas}");
        }
        Action::Unlock { service } => {
            let patch = json!({"metadata": {"annotations": {compat::LOCK: null}}});
            gone(
                Api::<Service>::namespaced(client.clone(), namespace)
                    .patch(service, &params, &Patch::Merge(&patch))
                    .await
                    .map(drop),
            )
            .map_err(api_error(format!("unlock service '{service}'")))?;
            tracing::info!("Service {service} unlocked");
        }
        Action::Delete { kind, name, owner } => {
            let dp = DeleteParams::default();
            let c = client.clone();
            let result = match kind {
                Kind::Pod => Api::<Pod>::namespaced(c, namespace)
                    .delete(name, &dp)
                    .await
                    .map(drop),
                Kind::Deployment => Api::<Deployment>::namespaced(c, namespace)
                    .delete(name, &dp)
                    .await
                    .map(drop),
                Kind::ConfigMap => Api::<ConfigMap>::namespaced(c, namespace)
                    .delete(name, &dp)
                    .await
                    .map(drop),
                Kind::Service => Api::<Service>::namespaced(c, namespace)
                    .delete(name, &dp)
                    .await
                    .map(drop),
                Kind::Session => Api::<KtSession>::namespaced(c, namespace)
                    .delete(name, &dp)
                    .await
                    .map(drop),
            };
            match gone(result) {
                Ok(()) => tracing::info!("Deleted {} {name}", kind.as_str()),
                Err(kube::Error::Api(status)) if status.code == 403 && *kind == Kind::Session => {
                    return Err(ActionError::Forbidden {
                        name: name.clone(),
                        owner: owner.clone().unwrap_or_else(|| "unknown user".into()),
                        source: Box::new(kube::Error::Api(status)),
                    });
                }
                Err(error) => {
                    return Err(api_error(format!("delete {} {name}", kind.as_str()))(error));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restoring_removes_kt_keys_and_keys_not_in_the_original() {
        let original = BTreeMap::from([("app".to_owned(), "web".to_owned())]);
        let current = BTreeMap::from([
            (compat::ROLE.to_owned(), "router".to_owned()),
            (compat::TARGET.to_owned(), "abc".to_owned()),
            ("extra".to_owned(), "x".to_owned()),
        ]);
        let patch = Action::restore_patch(&original, &current);
        assert_eq!(
            patch,
            json!({"metadata": {"annotations": {"kt-selector": null}},
                   "spec": {"selector": {"app": "web", "kt-role": null, "kt-target": null, "extra": null}}})
        );
    }

    #[test]
    fn traffic_is_restored_before_objects_go_and_the_lock_goes_last() {
        let delete = |kind| Action::Delete {
            kind,
            name: "x".into(),
            owner: None,
        };
        let mut actions = vec![
            Action::Unlock {
                service: "web".into(),
            },
            delete(Kind::Session),
            delete(Kind::Pod),
            Action::ScaleBack {
                deployment: "web".into(),
                replicas: 2,
            },
            Action::RestoreSelector {
                service: "web".into(),
                original: BTreeMap::new(),
                current: BTreeMap::new(),
            },
        ];
        actions.sort_by_key(Action::rank);
        let ranks: Vec<u8> = actions.iter().map(Action::rank).collect();
        assert!(ranks.windows(2).all(|w| w[0] < w[1]), "{actions:?}");
        assert!(matches!(actions[0], Action::RestoreSelector { .. }));
        assert!(matches!(actions[4], Action::Unlock { .. }));
    }
}
