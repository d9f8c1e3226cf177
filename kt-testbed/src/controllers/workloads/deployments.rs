//! The deployment controller: one ReplicaSet per pod template (`<deployment>-<hash>`), the
//! current one numbered with the next revision (`deployment.kubernetes.io/revision`; a
//! template rolled back to takes its old ReplicaSet, renumbered), rolled out by the
//! strategy: RollingUpdate (the default) within `maxSurge` and `maxUnavailable` counting
//! only available pods, or Recreate (old pods gone first). Old ReplicaSets beyond
//! `revisionHistoryLimit` are removed; status and conditions as `kubectl rollout status`
//! reads them; `ScalingReplicaSet` events.

use serde_json::{Value, json};

use super::{
    Ctl, HASH_LABEL, active, available, condition, event, owned_by, replicas,
    rollout::{self, Counts},
    template_hash,
};
use crate::controllers::{
    controller_ref, controller_uid, events::EventType, ns_name, omit_zeros, pod_ready, terminating,
    uid,
};

const REVISION: &str = "deployment.kubernetes.io/revision";
const REVISION_HISTORY: &str = "deployment.kubernetes.io/revision-history";
const DESIRED_REPLICAS: &str = "deployment.kubernetes.io/desired-replicas";
const MAX_REPLICAS: &str = "deployment.kubernetes.io/max-replicas";
const COMPONENT: &str = "deployment-controller";
/// The second time field of a Deployment's conditions.
const UPDATE_TIME: &str = "lastUpdateTime";

/// Deployment annotations a ReplicaSet does not inherit.
const NOT_COPIED: &[&str] = &[
    "kubectl.kubernetes.io/last-applied-configuration",
    REVISION,
    REVISION_HISTORY,
    DESIRED_REPLICAS,
    MAX_REPLICAS,
    "deprecated.deployment.rollback.to",
];

pub(in crate::controllers) fn deployments(ctl: &Ctl) {
    let all_rs = ctl.list("apps", "replicasets");
    let pods = ctl.list("", "pods");
    for d in ctl.list("apps", "deployments") {
        if !terminating(&d) {
            Rollout::new(ctl, &d, &all_rs, &pods).sync();
        }
    }
}

fn revision(rs: &Value) -> i64 {
    rs["metadata"]["annotations"][REVISION]
        .as_str()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

/// One Deployment's reconciliation, over a snapshot of its ReplicaSets and their pods.
struct Rollout<'a> {
    ctl: &'a Ctl,
    d: &'a Value,
    pods: &'a [Value],
    desired: i64,
    min_ready_seconds: i64,
    hash: String,
    /// The ReplicaSet of the current template, if there is one yet.
    new: Option<Value>,
    /// The others, oldest first.
    olds: Vec<Value>,
}

impl<'a> Rollout<'a> {
    fn new(ctl: &'a Ctl, d: &'a Value, all_rs: &[Value], pods: &'a [Value]) -> Self {
        let hash = template_hash(&d["spec"]["template"]);
        let owned = owned_by(all_rs, d);
        let new = owned
            .iter()
            .find(|rs| rs["metadata"]["labels"][HASH_LABEL] == hash.as_str())
            .map(|rs| (*rs).clone());
        let mut olds: Vec<Value> = owned
            .into_iter()
            .filter(|rs| rs["metadata"]["labels"][HASH_LABEL] != hash.as_str())
            .cloned()
            .collect();
        olds.sort_by_key(|rs| {
            (
                rs["metadata"]["creationTimestamp"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                rs["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        });
        Self {
            ctl,
            d,
            pods,
            desired: replicas(d),
            min_ready_seconds: d["spec"]["minReadySeconds"].as_i64().unwrap_or(0),
            hash,
            new,
            olds,
        }
    }

    /// The `ScalingReplicaSet` event about the Deployment.
    fn scaling_event(&self, message: &str) {
        event(
            self.ctl,
            COMPONENT,
            self.d,
            EventType::Normal,
            "ScalingReplicaSet",
            message,
        );
    }

    /// The active pods of `rs`.
    fn pods_of(&self, rs: &Value) -> impl Iterator<Item = &'a Value> {
        let (ns, rs_uid) = (ns_name(rs).0.to_owned(), uid(rs).to_owned());
        self.pods
            .iter()
            .filter(move |p| ns_name(p).0 == ns && controller_uid(p) == Some(&rs_uid) && active(p))
    }

    /// What the rollout counts of `rs`: its replicas and its available pods (at most those).
    fn counts(&self, rs: &Value) -> Counts {
        let wanted = replicas(rs);
        let up = self
            .pods_of(rs)
            .filter(|p| available(p, self.min_ready_seconds))
            .count() as i64;
        Counts {
            replicas: wanted,
            available: up.min(wanted),
        }
    }

    fn sync(mut self) {
        if self.d["spec"]["paused"] != true {
            match self.d["spec"]["strategy"]["type"].as_str() {
                Some("Recreate") => self.recreate(),
                _ => self.rolling_update(),
            }
        }
        self.clean_up_history();
        self.write_status();
    }

    fn rolling_update(&mut self) {
        let (max_surge, max_unavailable) =
            rollout::fenceposts(&self.d["spec"]["strategy"]["rollingUpdate"], self.desired);
        let olds_total: i64 = self.olds.iter().map(replicas).sum();
        let new = match self.new.clone() {
            Some(new) => {
                let all = olds_total + replicas(&new);
                let wanted = rollout::new_replicas(self.desired, max_surge, replicas(&new), all);
                self.scale(&new, wanted, max_surge)
            }
            None => {
                let wanted = rollout::new_replicas(self.desired, max_surge, 0, olds_total);
                match self.create_new(wanted, max_surge) {
                    Some(new) => new,
                    None => return,
                }
            }
        };
        let new_counts = self.counts(&new);
        self.new = Some(new);
        let olds: Vec<Counts> = self.olds.iter().map(|rs| self.counts(rs)).collect();
        let wanted = rollout::old_replicas(self.desired, max_unavailable, new_counts, &olds);
        for (i, replicas) in wanted.into_iter().enumerate() {
            let old = self.olds[i].clone();
            self.olds[i] = self.scale(&old, replicas, max_surge);
        }
    }

    /// Recreate: every old pod goes first; the new ReplicaSet is made and scaled up once
    /// none is left (terminating ones included).
    fn recreate(&mut self) {
        for i in 0..self.olds.len() {
            let old = self.olds[i].clone();
            self.olds[i] = self.scale(&old, 0, 0);
        }
        let olds_running = self.olds.iter().any(|rs| {
            let (ns, rs_uid) = (ns_name(rs).0, uid(rs));
            self.pods.iter().any(|p| {
                ns_name(p).0 == ns
                    && controller_uid(p) == Some(rs_uid)
                    && !matches!(p["status"]["phase"].as_str(), Some("Succeeded" | "Failed"))
            })
        });
        if olds_running {
            return;
        }
        self.new = match self.new.clone() {
            Some(new) => Some(self.scale(&new, self.desired, 0)),
            None => self.create_new(self.desired, 0),
        };
    }

    /// Creates the ReplicaSet of the current template with `replicas`, as the next revision.
    fn create_new(&self, wanted: i64, max_surge: i64) -> Option<Value> {
        let (ns, name) = ns_name(self.d);
        let mut template = self.d["spec"]["template"].clone();
        template["metadata"]["labels"][HASH_LABEL] = json!(self.hash);
        let mut selector = self.d["spec"]["selector"].clone();
        selector["matchLabels"][HASH_LABEL] = json!(self.hash);
        let mut annotations = self.inherited_annotations();
        annotations[REVISION] = json!(self.next_revision().to_string());
        annotations[DESIRED_REPLICAS] = json!(self.desired.to_string());
        annotations[MAX_REPLICAS] = json!((self.desired + max_surge).to_string());
        let rs_name = format!("{name}-{}", self.hash);
        let rs = json!({
            "apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": {"name": rs_name, "namespace": ns,
                         "labels": template["metadata"]["labels"],
                         "annotations": annotations,
                         "ownerReferences": [controller_ref(self.d)]},
            "spec": {"replicas": wanted, "minReadySeconds": self.min_ready_seconds,
                     "selector": selector, "template": template},
        });
        let created = self.ctl.create("apps", "replicasets", ns, rs).ok()?;
        if wanted > 0 {
            let message = format!("Scaled up replica set {rs_name} from 0 to {wanted}");
            self.scaling_event(&message);
        }
        Some(created)
    }

    fn next_revision(&self) -> i64 {
        self.olds.iter().map(revision).max().unwrap_or(0) + 1
    }

    /// The Deployment's annotations a ReplicaSet carries (`kubernetes.io/change-cause` …).
    fn inherited_annotations(&self) -> Value {
        let mut out = json!({});
        for (k, v) in self.d["metadata"]["annotations"]
            .as_object()
            .into_iter()
            .flatten()
        {
            if !NOT_COPIED.contains(&k.as_str()) {
                out[k] = v.clone();
            }
        }
        out
    }

    /// Sets `rs`'s replicas (and the annotations that go with them; for the current
    /// ReplicaSet, the Deployment's and the next revision), writing a `ScalingReplicaSet`
    /// event when the count changes. Returns the ReplicaSet as it now is.
    fn scale(&self, rs: &Value, to: i64, max_surge: i64) -> Value {
        let from = replicas(rs);
        let is_new = self.new.as_ref().is_some_and(|n| uid(n) == uid(rs));
        let mut annotations = rs["metadata"]["annotations"].clone();
        if !annotations.is_object() {
            annotations = json!({});
        }
        if is_new {
            let (current, next) = (revision(rs), self.next_revision());
            if current < next {
                let history = annotations[REVISION_HISTORY]
                    .as_str()
                    .filter(|h| !h.is_empty())
                    .map(|h| format!("{h},{current}"))
                    .unwrap_or_else(|| current.to_string());
                annotations[REVISION_HISTORY] = json!(history);
                annotations[REVISION] = json!(next.to_string());
            }
            for (k, v) in self
                .inherited_annotations()
                .as_object()
                .into_iter()
                .flatten()
            {
                annotations[k] = v.clone();
            }
        }
        if to > 0 || is_new {
            annotations[DESIRED_REPLICAS] = json!(self.desired.to_string());
            annotations[MAX_REPLICAS] = json!((self.desired + max_surge).to_string());
        }
        if from == to && annotations == rs["metadata"]["annotations"] {
            return rs.clone();
        }
        let updated = self.ctl.modify("apps", "replicasets", rs, |o| {
            o["spec"]["replicas"] = json!(to);
            o["metadata"]["annotations"] = annotations;
        });
        let Ok(updated) = updated else {
            return rs.clone();
        };
        if from != to {
            let direction = if to > from { "up" } else { "down" };
            let message = format!(
                "Scaled {direction} replica set {} from {from} to {to}",
                rs["metadata"]["name"].as_str().unwrap_or_default()
            );
            self.scaling_event(&message);
        }
        updated
    }

    /// Removes the oldest scaled-down ReplicaSets beyond `revisionHistoryLimit`.
    fn clean_up_history(&self) {
        let limit = self.d["spec"]["revisionHistoryLimit"]
            .as_i64()
            .unwrap_or(10);
        let mut idle: Vec<&Value> = self
            .olds
            .iter()
            .filter(|rs| replicas(rs) == 0 && self.pods_of(rs).next().is_none())
            .collect();
        if idle.len() as i64 <= limit {
            return;
        }
        idle.sort_by_key(|rs| revision(rs));
        for rs in idle.iter().take(idle.len() - limit.max(0) as usize) {
            self.ctl.delete("apps", "replicasets", rs, None);
        }
    }

    /// Status as the controller computes it: counts of active and available pods per
    /// ReplicaSet, and the Available and Progressing conditions.
    fn write_status(&self) {
        let all: Vec<&Value> = self.new.iter().chain(&self.olds).collect();
        let sum = |f: &dyn Fn(&Value) -> i64| all.iter().map(|rs| f(rs)).sum::<i64>();
        let total = sum(&|rs| self.pods_of(rs).count() as i64);
        let ready = sum(&|rs| self.pods_of(rs).filter(|p| pod_ready(p)).count() as i64);
        let available_pods = sum(&|rs| {
            self.pods_of(rs)
                .filter(|p| available(p, self.min_ready_seconds))
                .count() as i64
        });
        let wanted_total = sum(&replicas);
        let updated = self
            .new
            .as_ref()
            .map(|rs| self.pods_of(rs).count() as i64)
            .unwrap_or(0);
        let (_, max_unavailable) =
            rollout::fenceposts(&self.d["spec"]["strategy"]["rollingUpdate"], self.desired);
        let max_unavailable = match self.d["spec"]["strategy"]["type"].as_str() {
            Some("Recreate") => 0,
            _ => max_unavailable,
        };
        let minimum = available_pods >= self.desired - max_unavailable;
        let complete =
            updated == self.desired && total == self.desired && available_pods == self.desired;
        let previous = &self.d["status"]["conditions"];
        let new_name = self
            .new
            .as_ref()
            .and_then(|rs| rs["metadata"]["name"].as_str())
            .unwrap_or_default();
        let (reason, message) = if self.d["spec"]["paused"] == true {
            ("DeploymentPaused", "Deployment is paused".to_owned())
        } else if complete {
            (
                "NewReplicaSetAvailable",
                format!("ReplicaSet \"{new_name}\" has successfully progressed."),
            )
        } else {
            (
                "ReplicaSetUpdated",
                format!("ReplicaSet \"{new_name}\" is progressing."),
            )
        };
        let mut status = omit_zeros(json!({
            "observedGeneration": self.d["metadata"]["generation"],
            "replicas": total,
            "updatedReplicas": updated,
            "readyReplicas": ready,
            "availableReplicas": available_pods,
            "unavailableReplicas": (wanted_total - available_pods).max(0),
        }));
        status["conditions"] = json!([
            if minimum {
                condition(
                    previous,
                    "Available",
                    true,
                    "MinimumReplicasAvailable",
                    "Deployment has minimum availability.",
                    UPDATE_TIME,
                )
            } else {
                condition(
                    previous,
                    "Available",
                    false,
                    "MinimumReplicasUnavailable",
                    "Deployment does not have minimum availability.",
                    UPDATE_TIME,
                )
            },
            condition(previous, "Progressing", true, reason, &message, UPDATE_TIME),
        ]);
        if let Some(new) = &self.new
            && self.d["metadata"]["annotations"][REVISION]
                != new["metadata"]["annotations"][REVISION]
        {
            let revision = new["metadata"]["annotations"][REVISION].clone();
            let _ = self.ctl.modify("apps", "deployments", self.d, |o| {
                o["metadata"]["annotations"][REVISION] = revision;
            });
        }
        self.ctl.set_status("apps", "deployments", self.d, status);
    }
}
