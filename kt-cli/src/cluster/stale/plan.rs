//! `clean`'s decision (pure): what in an [`Inventory`] is left over by a dead ktctl — kt's or
//! the Go ktctl v0.3.7's — and what to do about it, by ktctl v0.3.7's rules
//! (`clean/common.go`, `../shared/reference/ktctl-v0.3.7.md` §3.8), judged at a given cluster
//! time.

use std::{collections::BTreeMap, time::Duration};

use chrono::{DateTime, TimeDelta, Utc};
use kt_proto::{compat, session::KtSession};
use kube::api::ObjectMeta;

use super::{
    action::{Action, Kind},
    inventory::Inventory,
};
use crate::cluster::lock::LOCK_TIMEOUT_SECS;

/// v0.3.7's default `--thresholdInMinus`: five minutes (two missed heartbeats and one more).
pub const STALE_AFTER: Duration = Duration::from_secs(5 * 60);

/// Whether `meta`'s heartbeat (`kt-last-heart-beat`) is older than `threshold` at `now`.
/// An object without one (or with one that is not a number) is never stale: v0.3.7 skips it.
pub fn heartbeat_stale(meta: &ObjectMeta, now: DateTime<Utc>, threshold: Duration) -> bool {
    heartbeat(meta).is_some_and(|beat| now.timestamp() - beat > threshold.as_secs() as i64)
}

/// `kt-last-heart-beat` in Unix seconds.
pub fn heartbeat(meta: &ObjectMeta) -> Option<i64> {
    meta.annotations
        .as_ref()?
        .get(compat::LAST_HEARTBEAT)?
        .parse()
        .ok()
}

/// `kt-config`'s `k=v,k=v` pairs.
pub fn kt_config(meta: &ObjectMeta) -> BTreeMap<String, String> {
    meta.annotations
        .as_ref()
        .and_then(|a| a.get(compat::CONFIG))
        .map(|c| {
            c.split(',')
                .filter_map(|pair| pair.split_once('='))
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

/// The Deployments (name, replicas) a scale exchange's `kt-config` says to scale back: kt's
/// `deployments=a:1;b:2` when present, else v0.3.7's `app=a,replicas=1`.
pub fn scaled(config: &BTreeMap<String, String>) -> Vec<(String, i32)> {
    if let Some(all) = config.get("deployments") {
        let parsed: Vec<(String, i32)> = all
            .split(';')
            .filter_map(|d| {
                let (name, n) = d.split_once(':')?;
                Some((name.to_owned(), n.parse().ok()?))
            })
            .collect();
        if !parsed.is_empty() {
            return parsed;
        }
    }
    match (
        config.get("app"),
        config.get("replicas").and_then(|r| r.parse().ok()),
    ) {
        (Some(app), Some(replicas)) => vec![(app.clone(), replicas)],
        _ => Vec::new(),
    }
}

/// Whether a non-empty `selector` selects `labels`.
pub fn selects(
    selector: &BTreeMap<String, String>,
    labels: Option<&BTreeMap<String, String>>,
) -> bool {
    !selector.is_empty()
        && labels.is_some_and(|l| selector.iter().all(|(k, v)| l.get(k) == Some(v)))
}

/// A pod or Deployment kt created (v0.3.7's `--useShadowDeployment` makes shadows
/// Deployments), seen the same way.
#[derive(Clone, Debug)]
pub struct Workload<'a> {
    pub kind: Kind,
    pub meta: &'a ObjectMeta,
    /// The labels a Service selects: the pod's, or the Deployment's pod template's.
    pub pod_labels: Option<&'a BTreeMap<String, String>>,
}

impl Workload<'_> {
    pub fn name(&self) -> &str {
        self.meta.name.as_deref().unwrap_or_default()
    }

    /// `kt-role`.
    pub fn role(&self) -> Option<&str> {
        self.meta
            .labels
            .as_ref()?
            .get(compat::ROLE)
            .map(String::as_str)
    }

    /// `kt-user`.
    pub fn user(&self) -> Option<&str> {
        self.meta
            .annotations
            .as_ref()?
            .get(compat::USER)
            .map(String::as_str)
    }
}

impl Inventory {
    /// kt's pods and Deployments (`control-by=kt`), except those being deleted.
    pub fn workloads(&self) -> Vec<Workload<'_>> {
        let pods = self.pods.iter().map(|p| Workload {
            kind: Kind::Pod,
            meta: &p.metadata,
            pod_labels: p.metadata.labels.as_ref(),
        });
        let deployments = self
            .deployments
            .iter()
            .filter(|d| is_kt(&d.metadata))
            .map(|d| Workload {
                kind: Kind::Deployment,
                meta: &d.metadata,
                pod_labels: d
                    .spec
                    .as_ref()
                    .and_then(|s| s.template.metadata.as_ref())
                    .and_then(|m| m.labels.as_ref()),
            });
        pods.chain(deployments)
            .filter(|w| w.meta.deletion_timestamp.is_none())
            .collect()
    }
}

/// Whether kt created the object (`control-by=kt`).
pub fn is_kt(meta: &ObjectMeta) -> bool {
    meta.labels
        .as_ref()
        .and_then(|l| l.get(compat::CONTROL_BY))
        .is_some_and(|v| v == compat::CONTROL_BY_KT)
}

/// A Service's selector and annotations.
pub fn selector_of(service: &k8s_openapi::api::core::v1::Service) -> BTreeMap<String, String> {
    service
        .spec
        .as_ref()
        .and_then(|s| s.selector.clone())
        .unwrap_or_default()
}

/// The original selector a Service's `kt-selector` holds: `None` without one, `Some(Err)`
/// when it is not a JSON object of strings.
pub fn saved_selector(meta: &ObjectMeta) -> Option<Result<BTreeMap<String, String>, String>> {
    let text = meta.annotations.as_ref()?.get(compat::SELECTOR)?;
    Some(serde_json::from_str(text).map_err(|_| text.clone()))
}

/// Whether a session is dead at `now`: its lease ended more than `threshold` ago, or — never
/// held — it was created more than its lease and `threshold` ago. Sessions being deleted are
/// left alone. Judged by the cluster's time, as the agents judge it.
pub fn session_dead(session: &KtSession, now: DateTime<Utc>, threshold: Duration) -> bool {
    if session.metadata.deletion_timestamp.is_some() {
        return false;
    }
    let threshold = TimeDelta::from_std(threshold).unwrap_or(TimeDelta::MAX);
    match session.lease_end() {
        Some(end) => now - end > threshold,
        None => session
            .metadata
            .creation_timestamp
            .as_ref()
            .is_some_and(|created| {
                now.timestamp() - created.0.as_second()
                    > (threshold + TimeDelta::seconds(i64::from(session.spec.lease_seconds)))
                        .num_seconds()
            }),
    }
}

/// A Service's selector.
pub type Selector = BTreeMap<String, String>;

/// What `clean` does (see the module doc); each list sorted by name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CleanPlan {
    /// Objects to delete, per kind, with their owners.
    pub delete: BTreeMap<Kind, Vec<(String, Option<String>)>>,
    /// Deployments to scale back (their scale exchange's shadow is dead).
    pub scale_back: Vec<(String, i32)>,
    /// Services to point back at their pods: (name, original selector, current selector).
    pub recover: Vec<(String, Selector, Selector)>,
    /// Services whose `kt-lock` is older than 180 s.
    pub unlock: Vec<String>,
}

impl CleanPlan {
    pub fn is_empty(&self) -> bool {
        self.delete.values().all(Vec::is_empty)
            && self.scale_back.is_empty()
            && self.recover.is_empty()
            && self.unlock.is_empty()
    }

    /// The plan as actions, in [`Action::rank`] order.
    pub fn actions(&self) -> Vec<Action> {
        let mut actions: Vec<Action> = self
            .recover
            .iter()
            .map(|(service, original, current)| Action::RestoreSelector {
                service: service.clone(),
                original: original.clone(),
                current: current.clone(),
            })
            .collect();
        actions.extend(
            self.scale_back
                .iter()
                .map(|(deployment, replicas)| Action::ScaleBack {
                    deployment: deployment.clone(),
                    replicas: *replicas,
                }),
        );
        for (kind, objects) in &self.delete {
            actions.extend(objects.iter().map(|(name, owner)| Action::Delete {
                kind: *kind,
                name: name.clone(),
                owner: owner.clone(),
            }));
        }
        actions.extend(self.unlock.iter().map(|service| Action::Unlock {
            service: service.clone(),
        }));
        actions.sort_by_key(Action::rank);
        actions
    }

    /// What the plan would do, in v0.3.7's dry-run format (`Find N unavailing pods to
    /// delete:` then ` * <name>` per object), one line per item.
    pub fn describe(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for (kind, objects) in &self.delete {
            if objects.is_empty() {
                continue;
            }
            lines.push(format!(
                "Find {} unavailing {} to delete:",
                objects.len(),
                kind.plural()
            ));
            lines.extend(objects.iter().map(|(name, _)| format!(" * {name}")));
        }
        if !self.scale_back.is_empty() {
            lines.push(format!(
                "Find {} deployments to scale back:",
                self.scale_back.len()
            ));
            lines.extend(
                self.scale_back
                    .iter()
                    .map(|(name, n)| format!(" * {name} (to {n} replicas)")),
            );
        }
        if !self.recover.is_empty() {
            lines.push(format!("Find {} services to recover:", self.recover.len()));
            lines.extend(self.recover.iter().map(|(name, _, _)| format!(" * {name}")));
        }
        if !self.unlock.is_empty() {
            lines.push(format!("Find {} services to unlock:", self.unlock.len()));
            lines.extend(self.unlock.iter().map(|name| format!(" * {name}")));
        }
        lines
    }
}

/// `clean`'s plan for `inventory` at the cluster time `now` with `--thresholdInMinus`
/// `threshold`:
///
/// - kt's pods, Deployments, ConfigMaps and Services whose heartbeat is older than
///   `threshold` are deleted (no heartbeat: skipped);
/// - a dead scale-exchange shadow (`kt-config` `app=..,replicas=..`) has its Deployments
///   scaled back — unless a live shadow claims them again or they already run;
/// - a dead selector-exchange shadow or router (`kt-config` `service=S`) has S pointed back
///   at its pods, when S still points at that shadow (its `kt-target`);
/// - every Service with a `kt-lock` older than 180 s is unlocked;
/// - every Service whose `kt-selector` is set while its selector points at kt pods that do
///   not exist (or are deleted now) is pointed back at its pods;
/// - sessions whose lease ended more than `threshold` ago are deleted.
pub fn plan(inventory: &Inventory, now: DateTime<Utc>, threshold: Duration) -> CleanPlan {
    let mut plan = CleanPlan::default();
    let workloads = inventory.workloads();
    let (dead, live): (Vec<&Workload>, Vec<&Workload>) = workloads
        .iter()
        .partition(|w| heartbeat_stale(w.meta, now, threshold));
    let owner = |meta: &ObjectMeta| {
        meta.annotations
            .as_ref()
            .and_then(|a| a.get(compat::USER))
            .cloned()
    };
    let mut delete = |kind: Kind, meta: &ObjectMeta| {
        if let Some(name) = &meta.name {
            plan.delete
                .entry(kind)
                .or_default()
                .push((name.clone(), owner(meta)));
        }
    };
    for w in &dead {
        delete(w.kind, w.meta);
    }
    for cm in &inventory.config_maps {
        if cm.metadata.deletion_timestamp.is_none() && heartbeat_stale(&cm.metadata, now, threshold)
        {
            delete(Kind::ConfigMap, &cm.metadata);
        }
    }
    for service in &inventory.services {
        if is_kt(&service.metadata)
            && service.metadata.deletion_timestamp.is_none()
            && heartbeat_stale(&service.metadata, now, threshold)
        {
            delete(Kind::Service, &service.metadata);
        }
    }
    for session in &inventory.sessions {
        if session_dead(session, now, threshold)
            && let Some(name) = &session.metadata.name
        {
            plan.delete
                .entry(Kind::Session)
                .or_default()
                .push((name.clone(), Some(session.spec.owner.clone())));
        }
    }

    // Scale exchanges whose shadow died.
    let claimed: Vec<String> = live
        .iter()
        .filter(|w| w.role() == Some(compat::ROLE_SHADOW_EXCHANGE))
        .flat_map(|w| scaled(&kt_config(w.meta)))
        .map(|(name, _)| name)
        .collect();
    for w in &dead {
        if w.role() != Some(compat::ROLE_SHADOW_EXCHANGE) {
            continue;
        }
        for (deployment, replicas) in scaled(&kt_config(w.meta)) {
            let at_zero = inventory.deployments.iter().any(|d| {
                d.metadata.name.as_deref() == Some(&deployment)
                    && d.spec.as_ref().and_then(|s| s.replicas) == Some(0)
            });
            if at_zero
                && !claimed.contains(&deployment)
                && !plan.scale_back.iter().any(|(d, _)| *d == deployment)
            {
                plan.scale_back.push((deployment, replicas));
            }
        }
    }

    // Services pointing at kt pods that are gone or dead now.
    let remaining: Vec<&Workload> = live.clone();
    for service in &inventory.services {
        let Some(name) = service.metadata.name.clone() else {
            continue;
        };
        let current = selector_of(service);
        if let Some(Ok(original)) = saved_selector(&service.metadata)
            && current.contains_key(compat::ROLE)
            && !remaining.iter().any(|w| selects(&current, w.pod_labels))
        {
            plan.recover.push((name.clone(), original, current));
        }
        let lock = service
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(compat::LOCK))
            .and_then(|t| t.parse::<i64>().ok());
        if lock.is_some_and(|taken| now.timestamp() - taken >= LOCK_TIMEOUT_SECS) {
            plan.unlock.push(name);
        }
    }
    for objects in plan.delete.values_mut() {
        objects.sort();
    }
    plan.scale_back.sort();
    plan.recover.sort();
    plan.unlock.sort();
    plan
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone as _;
    use serde_json::json;

    use super::*;

    const NOW: i64 = 1_800_000_000;

    fn now() -> DateTime<Utc> {
        Utc.timestamp_opt(NOW, 0).unwrap()
    }

    fn pod(
        name: &str,
        labels: serde_json::Value,
        annotations: serde_json::Value,
    ) -> serde_json::Value {
        json!({"metadata": {"name": name, "labels": labels, "annotations": annotations}})
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

    fn names(plan: &CleanPlan, kind: Kind) -> Vec<&str> {
        plan.delete
            .get(&kind)
            .map(|v| v.iter().map(|(n, _)| n.as_str()).collect())
            .unwrap_or_default()
    }

    /// The Go ktctl's selector exchange and scale exchange, both killed 10 minutes ago, and
    /// a live exchange of another Service.
    fn leftovers() -> Inventory {
        inventory(json!({
            "services": [
                {"metadata": {"name": "web", "annotations": {"kt-selector": "{\"app\":\"web\"}", "kt-lock": beat(600)}},
                 "spec": {"selector": {"kt-role": "shadow-exchange", "kt-target": "DEAD"}}},
                {"metadata": {"name": "api", "annotations": {"kt-selector": "{\"app\":\"api\"}"}},
                 "spec": {"selector": {"kt-role": "shadow-exchange", "kt-target": "LIVE"}}},
                {"metadata": {"name": "db", "annotations": {"kt-lock": beat(60)}}, "spec": {"selector": {"app": "db"}}},
            ],
            "deployments": [
                {"metadata": {"name": "back"}, "spec": {"replicas": 0, "selector": {}, "template": {}}},
            ],
            "pods": [
                pod("web-kt-exchange-abcde", json!({"control-by": "kt", "kt-role": "shadow-exchange", "kt-target": "DEAD"}),
                    json!({"kt-last-heart-beat": beat(600), "kt-config": "service=web", "kt-user": "alice"})),
                pod("back-kt-exchange-fghij", json!({"control-by": "kt", "kt-role": "shadow-exchange", "app": "back"}),
                    json!({"kt-last-heart-beat": beat(600), "kt-config": "app=back,replicas=2"})),
                pod("api-kt-exchange-klmno", json!({"control-by": "kt", "kt-role": "shadow-exchange", "kt-target": "LIVE"}),
                    json!({"kt-last-heart-beat": beat(30), "kt-config": "service=api"})),
                pod("no-heartbeat", json!({"control-by": "kt"}), json!({})),
            ],
            "config_maps": [
                {"metadata": {"name": "web-kt-exchange-abcde", "annotations": {"kt-last-heart-beat": beat(600)}}},
                {"metadata": {"name": "api-kt-exchange-klmno", "annotations": {"kt-last-heart-beat": beat(30)}}},
            ],
        }))
    }

    #[test]
    fn dead_shadows_go_their_services_and_deployments_come_back_live_ones_stay() {
        let plan = plan(&leftovers(), now(), STALE_AFTER);
        assert_eq!(
            names(&plan, Kind::Pod),
            ["back-kt-exchange-fghij", "web-kt-exchange-abcde"]
        );
        assert_eq!(names(&plan, Kind::ConfigMap), ["web-kt-exchange-abcde"]);
        assert_eq!(plan.scale_back, [("back".to_owned(), 2)]);
        let recovered: Vec<&str> = plan.recover.iter().map(|(n, _, _)| n.as_str()).collect();
        assert_eq!(recovered, ["web"]);
        assert_eq!(
            plan.recover[0].1,
            BTreeMap::from([("app".into(), "web".into())])
        );
        assert_eq!(plan.unlock, ["web"], "db's lock is 60 s old: held");
    }

    #[test]
    fn the_threshold_and_the_clock_decide() {
        // Ten minutes ago is not stale with a 15-minute threshold.
        assert!(
            plan(&leftovers(), now(), Duration::from_secs(15 * 60))
                .delete
                .values()
                .all(Vec::is_empty)
        );
        // A clock an hour behind the objects' sees nothing stale (and no lock to take).
        let behind = now() - TimeDelta::hours(1);
        let plan = plan(&leftovers(), behind, STALE_AFTER);
        assert!(
            plan.delete.values().all(Vec::is_empty) && plan.unlock.is_empty(),
            "{plan:?}"
        );
        assert!(plan.scale_back.is_empty());
    }

    #[test]
    fn a_deployment_claimed_by_a_live_shadow_or_running_is_not_scaled() {
        let mut inv = leftovers();
        inv.pods.push(
            serde_json::from_value(pod(
                "back-kt-exchange-zzzzz",
                json!({"control-by": "kt", "kt-role": "shadow-exchange"}),
                json!({"kt-last-heart-beat": beat(10), "kt-config": "app=back,replicas=2"}),
            ))
            .unwrap(),
        );
        assert!(plan(&inv, now(), STALE_AFTER).scale_back.is_empty());
        let mut inv = leftovers();
        inv.deployments[0].spec.as_mut().unwrap().replicas = Some(2);
        assert!(plan(&inv, now(), STALE_AFTER).scale_back.is_empty());
    }

    #[test]
    fn sessions_are_dead_by_their_lease_end_and_the_cluster_clock() {
        let at = |ago: i64| Utc.timestamp_opt(NOW - ago, 0).unwrap().to_rfc3339();
        let session = |name: &str, renewed: Option<i64>, created: i64| {
            json!({"apiVersion": "kt.dev/v1alpha1", "kind": "KtSession",
                   "metadata": {"name": name, "creationTimestamp": at(created)},
                   "spec": {"owner": "bob@box", "mode": "exchange", "service": "web", "publicKey": "k"},
                   "status": renewed.map(|r| json!({"renewTime": at(r)}))})
        };
        let inv = inventory(json!({"sessions": [
            session("dead", Some(400), 900),
            session("live", Some(2), 900),
            session("never-held-old", None, 400),
            session("never-held-new", None, 60),
        ]}));
        let plan = plan(&inv, now(), STALE_AFTER);
        assert_eq!(names(&plan, Kind::Session), ["dead", "never-held-old"]);
        assert_eq!(plan.delete[&Kind::Session][0].1.as_deref(), Some("bob@box"));
    }

    #[test]
    fn dry_run_lines_follow_v0_3_7() {
        let lines = plan(&leftovers(), now(), STALE_AFTER).describe();
        assert_eq!(lines[0], "Find 2 unavailing pods to delete:");
        assert_eq!(lines[1], " * back-kt-exchange-fghij");
        assert!(
            lines.contains(&"Find 1 unavailing config maps to delete:".to_owned()),
            "{lines:?}"
        );
        assert!(
            lines.contains(&" * back (to 2 replicas)".to_owned()),
            "{lines:?}"
        );
        assert!(CleanPlan::default().describe().is_empty());
    }

    #[test]
    fn kt_config_and_scaled_read_both_writers() {
        let meta: ObjectMeta =
            serde_json::from_value(json!({"annotations": {"kt-config": "app=web,replicas=2"}}))
                .unwrap();
        assert_eq!(scaled(&kt_config(&meta)), [("web".to_owned(), 2)]);
        let meta: ObjectMeta = serde_json::from_value(
            json!({"annotations": {"kt-config": "app=web,replicas=2,deployments=web:2;canary:1"}}),
        )
        .unwrap();
        assert_eq!(
            scaled(&kt_config(&meta)),
            [("web".to_owned(), 2), ("canary".to_owned(), 1)]
        );
        assert!(scaled(&kt_config(&ObjectMeta::default())).is_empty());
    }
}
