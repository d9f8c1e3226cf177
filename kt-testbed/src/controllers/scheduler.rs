//! Binds pending pods to the node with the fewest pods that satisfies their nodeSelector,
//! with a `Scheduled` event.

use serde_json::json;

use super::{
    Ctl,
    events::{self, EventType, Involved, Source},
    ns_name, terminating,
};
use crate::api::store::now_rfc3339;

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
    for pod in pods
        .iter()
        .filter(|p| !p["spec"]["nodeName"].is_string() && !terminating(p))
    {
        let selector = pod["spec"]["nodeSelector"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        let Some(target) = load
            .iter_mut()
            .filter(|(_, _, n)| {
                selector
                    .iter()
                    .all(|(k, v)| n["metadata"]["labels"][k] == *v)
            })
            .min_by_key(|(name, count, _)| (*count, name.clone()))
        else {
            continue;
        };
        target.1 += 1;
        let node = target.0.clone();
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
