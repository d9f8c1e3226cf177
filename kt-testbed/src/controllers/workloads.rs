//! The workload controllers: Deployment → ReplicaSet (pod-template-hash) → Pods with
//! RollingUpdate or Recreate and revisions, DaemonSet (one pod per node), StatefulSet
//! (ordered pods with stable names) and Job (pods run to completion). Ownership is by
//! controller ownerReference; a ReplicaSet adopts only orphans matching its whole selector
//! (pod-template-hash included), so kt's shadow pods, which carry an app's labels but no
//! hash, are never adopted or killed. Each writes the events its real counterpart writes.

mod daemonsets;
mod deployments;
mod jobs;
mod replicasets;
mod rollout;
mod statefulsets;

use serde_json::{Value, json};

pub(super) use self::{
    daemonsets::daemonsets, deployments::deployments, jobs::jobs, replicasets::replicasets,
    statefulsets::statefulsets,
};
use super::{
    Ctl, controller_ref, controller_uid,
    events::{self, EventType, Involved, Source},
    ns_name, pod_ready, terminating, uid,
};

/// The label tying a ReplicaSet and its pods to one template of their Deployment.
const HASH_LABEL: &str = "pod-template-hash";

/// A stable, label-safe hash of a pod template. Templates equal as the API's types see
/// them hash alike: a `null` or empty field counts as absent (a template kubectl sends back
/// in `rollout undo` carries `creationTimestamp: null`).
fn template_hash(template: &Value) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut h: u32 = 0x811c_9dc5;
    for b in without_empty(template).to_string().bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    let mut out = String::new();
    while h > 0 || out.is_empty() {
        out.push(ALPHABET[(h % ALPHABET.len() as u32) as usize] as char);
        h /= ALPHABET.len() as u32;
    }
    out
}

/// `value` without null, `{}` and `[]` members, recursively.
fn without_empty(value: &Value) -> Value {
    let empty = |v: &Value| match v {
        Value::Null => true,
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    };
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), without_empty(v)))
                .filter(|(_, v)| !empty(v))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(without_empty).collect()),
        other => other.clone(),
    }
}

/// `spec.replicas`, 1 when unset.
fn replicas(obj: &Value) -> i64 {
    obj["spec"]["replicas"].as_i64().unwrap_or(1)
}

/// The objects among `items` that `owner` controls.
fn owned_by<'a>(items: &'a [Value], owner: &Value) -> Vec<&'a Value> {
    let (ns, _) = ns_name(owner);
    items
        .iter()
        .filter(|i| ns_name(i).0 == ns && controller_uid(i) == Some(uid(owner)))
        .collect()
}

/// A pod that counts for its controller: neither being deleted nor finished.
fn active(pod: &Value) -> bool {
    !terminating(pod)
        && !matches!(
            pod["status"]["phase"].as_str(),
            Some("Succeeded" | "Failed")
        )
}

/// Whether a pod is available: Ready for at least `min_ready_seconds`.
fn available(pod: &Value, min_ready_seconds: i64) -> bool {
    if !pod_ready(pod) {
        return false;
    }
    if min_ready_seconds <= 0 {
        return true;
    }
    let since = pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "Ready")
        .and_then(|c| c["lastTransitionTime"].as_str())
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
    since.is_some_and(|since| {
        (chrono::Utc::now() - since.to_utc()).num_seconds() >= min_ready_seconds
    })
}

/// A pod of `owner` from its `template`: the template's labels (plus `labels`),
/// annotations and spec, named `name` or generated from the owner's name.
fn pod_from_template(
    owner: &Value,
    template: &Value,
    name: Option<&str>,
    labels: &[(&str, &str)],
) -> Value {
    let mut template = template.clone();
    let mut pod_labels = template["metadata"]["labels"].take();
    for (key, value) in labels {
        pod_labels[*key] = json!(value);
    }
    let (ns, owner_name) = ns_name(owner);
    let mut metadata = json!({"namespace": ns, "labels": pod_labels,
        "annotations": template["metadata"]["annotations"].take(),
        "ownerReferences": [controller_ref(owner)]});
    match name {
        Some(name) => metadata["name"] = json!(name),
        None => metadata["generateName"] = json!(format!("{owner_name}-")),
    }
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template["spec"].take()})
}

/// An event about `obj` from the controller `component`.
fn event(ctl: &Ctl, component: &str, obj: &Value, kind: EventType, reason: &str, message: &str) {
    events::record(
        &ctl.store,
        Source::controller(component),
        &Involved::object(obj),
        kind,
        reason,
        message,
    );
}

/// What a controller did to a pod it owns.
#[derive(Clone, Copy)]
enum PodEvent {
    Created,
    Deleted,
}

/// The `SuccessfulCreate` or `SuccessfulDelete` event a controller writes about its `owner`
/// when it made or deleted `pod`.
fn pod_event(ctl: &Ctl, component: &str, owner: &Value, what: PodEvent, pod: &Value) {
    let (reason, verb) = match what {
        PodEvent::Created => ("SuccessfulCreate", "Created"),
        PodEvent::Deleted => ("SuccessfulDelete", "Deleted"),
    };
    let name = pod["metadata"]["name"].as_str().unwrap_or_default();
    let message = format!("{verb} pod: {name}");
    event(ctl, component, owner, EventType::Normal, reason, &message);
}

/// A condition as the workload controllers write them, keeping `lastTransitionTime` while
/// the status stays what `previous` (the object's conditions) says; `also` names another
/// time field set alike (`lastUpdateTime` of a Deployment, `lastProbeTime` of a Job).
fn condition(
    previous: &Value,
    kind: &str,
    ok: bool,
    reason: &str,
    message: &str,
    also: &str,
) -> Value {
    let status = if ok { "True" } else { "False" };
    let since = previous
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == kind && c["status"] == status)
        .and_then(|c| c["lastTransitionTime"].as_str().map(String::from))
        .unwrap_or_else(crate::api::store::now_rfc3339);
    json!({"type": kind, "status": status, "reason": reason, "message": message,
           also: since, "lastTransitionTime": since})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_equal_but_for_empty_fields_hash_alike() {
        let template = json!({"metadata": {"labels": {"app": "web"}},
                              "spec": {"containers": [{"name": "a", "image": "x", "resources": {}}]}});
        let from_kubectl = json!({"metadata": {"labels": {"app": "web"}, "creationTimestamp": null},
                                  "spec": {"containers": [{"name": "a", "image": "x"}], "volumes": []}});
        assert_eq!(template_hash(&template), template_hash(&from_kubectl));
        let other = json!({"metadata": {"labels": {"app": "web"}},
                           "spec": {"containers": [{"name": "a", "image": "y"}]}});
        assert_ne!(template_hash(&template), template_hash(&other));
    }

    #[test]
    fn availability_waits_min_ready_seconds_after_ready() {
        let ready_since = |t: &str| json!({"status": {"conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": t}]}});
        let long_ago = ready_since("2020-01-01T00:00:00Z");
        let now = ready_since(&crate::api::store::now_rfc3339());
        assert!(available(&long_ago, 30));
        assert!(available(&now, 0));
        assert!(!available(&now, 30));
        assert!(!available(&json!({"status": {}}), 0));
    }

    #[test]
    fn pods_from_templates_carry_the_owner_and_extra_labels() {
        let owner = json!({"apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": "web", "namespace": "default", "uid": "u1"}});
        let template = json!({"metadata": {"labels": {"app": "web"}}, "spec": {"containers": []}});
        let pod = pod_from_template(&owner, &template, Some("web-0"), &[("x", "y")]);
        assert_eq!(pod["metadata"]["name"], "web-0");
        assert_eq!(pod["metadata"]["labels"], json!({"app": "web", "x": "y"}));
        assert_eq!(pod["metadata"]["ownerReferences"][0]["uid"], "u1");
        let generated = pod_from_template(&owner, &template, None, &[]);
        assert_eq!(generated["metadata"]["generateName"], "web-");
    }
}
