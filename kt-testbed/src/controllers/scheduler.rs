//! Binds pending pods to a node that satisfies their nodeSelector, with a `Scheduled` event:
//! the one with the fewest pods of the same controller (a ReplicaSet's replicas spread over
//! the nodes, as kube-scheduler's default topology spread over `kubernetes.io/hostname`
//! scores it), then the fewest pods.

use serde_json::json;

use super::{
    Ctl,
    events::{self, EventType, Involved, Source},
    ns_name, terminating,
};
use crate::api::store::now_rfc3339;

/// The uid of `pod`'s controller (its ReplicaSet, StatefulSet, …), if it has one.
fn controller(pod: &serde_json::Value) -> Option<String> {
    pod["metadata"]["ownerReferences"]
        .as_array()?
        .iter()
        .find(|r| r["controller"] == true)?["uid"]
        .as_str()
        .map(str::to_owned)
}

pub(super) fn schedule(ctl: &Ctl) {
    let pods = ctl.list("", "pods");
    let nodes = ctl.list("", "nodes");
    let mut load: Vec<(String, usize, &serde_json::Value)> = nodes
        .iter()
        .filter(|n| n["spec"]["unschedulable"] != true)
        .map(|n| {
            let name = n["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let count = pods
                .iter()
                .filter(|p| p["spec"]["nodeName"] == name.as_str())
                .count();
            (name, count, n)
        })
        .collect();
    // (controller uid, node) → pods of that controller bound there, kept as pods are bound.
    let mut siblings: std::collections::HashMap<(String, String), usize> =
        std::collections::HashMap::new();
    for pod in &pods {
        if let (Some(owner), Some(node)) = (controller(pod), pod["spec"]["nodeName"].as_str()) {
            *siblings.entry((owner, node.to_owned())).or_default() += 1;
        }
    }
    for pod in pods
        .iter()
        .filter(|p| !p["spec"]["nodeName"].is_string() && !terminating(p))
    {
        let selector = pod["spec"]["nodeSelector"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        let owner = controller(pod);
        let siblings_on = |node: &str| {
            owner.as_ref().map_or(0, |o| {
                siblings
                    .get(&(o.clone(), node.to_owned()))
                    .copied()
                    .unwrap_or(0)
            })
        };
        let Some(target) = load
            .iter_mut()
            .filter(|(_, _, n)| {
                selector
                    .iter()
                    .all(|(k, v)| n["metadata"]["labels"][k] == *v)
            })
            .min_by_key(|(name, count, _)| (siblings_on(name), *count, name.clone()))
        else {
            continue;
        };
        target.1 += 1;
        let node = target.0.clone();
        if let Some(owner) = owner {
            *siblings.entry((owner, node.clone())).or_default() += 1;
        }
        let bound = ctl.modify("", "pods", pod, |p| {
            p["spec"]["nodeName"] = json!(node);
            p["status"]["conditions"] = json!([{"type": "PodScheduled", "status": "True", "lastTransitionTime": now_rfc3339()}]);
        });
        if let Ok(bound) = bound {
            let (ns, name) = ns_name(&bound);
            events::record(
                &ctl.store,
                Source::controller("default-scheduler"),
                &Involved::object(&bound),
                EventType::Normal,
                "Scheduled",
                &format!("Successfully assigned {ns}/{name} to {node}"),
            );
        }
    }
}
