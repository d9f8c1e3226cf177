//! The DaemonSet controller: one pod per eligible node (`nodeSelector`), bound to it; a
//! changed template replaces each node's pod once the old one is gone (its ports and
//! addresses free again).

use serde_json::{Value, json};

use super::{
    Ctl, PodEvent, ns_name, owned_by, pod_event, pod_from_template, pod_ready, template_hash,
    terminating,
};
use crate::controllers::omit_zeros;

const COMPONENT: &str = "daemonset-controller";
/// The label naming the template revision a DaemonSet's pod was made from.
const REVISION_HASH: &str = "controller-revision-hash";

pub(in crate::controllers) fn daemonsets(ctl: &Ctl) {
    let pods = ctl.list("", "pods");
    let nodes = ctl.list("", "nodes");
    for ds in ctl.list("apps", "daemonsets") {
        if terminating(&ds) {
            continue;
        }
        let ns = ns_name(&ds).0;
        let hash = template_hash(&ds["spec"]["template"]);
        let node_selector = ds["spec"]["template"]["spec"]["nodeSelector"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        let eligible: Vec<&Value> = nodes
            .iter()
            .filter(|n| {
                node_selector
                    .iter()
                    .all(|(k, v)| n["metadata"]["labels"][k] == *v)
            })
            .collect();
        let owned = owned_by(&pods, &ds);
        let (mut ready, mut updated) = (0, 0);
        for node in &eligible {
            let node_name = node["metadata"]["name"].as_str().unwrap_or_default();
            let on_node: Vec<&&Value> = owned
                .iter()
                .filter(|p| p["spec"]["nodeName"] == node_name && !terminating(p))
                .collect();
            for stale in on_node
                .iter()
                .filter(|p| p["metadata"]["labels"][REVISION_HASH] != hash.as_str())
            {
                ctl.delete("", "pods", stale, None);
                pod_event(ctl, COMPONENT, &ds, PodEvent::Deleted, stale);
            }
            let current: Vec<&&&Value> = on_node
                .iter()
                .filter(|p| p["metadata"]["labels"][REVISION_HASH] == hash.as_str())
                .collect();
            // A replacement waits until the old pod on the node is gone (ports, addresses).
            let old_still_there = owned.iter().any(|p| {
                p["spec"]["nodeName"] == node_name
                    && p["metadata"]["labels"][REVISION_HASH] != hash.as_str()
            });
            if current.is_empty() && !old_still_there {
                let mut pod = pod_from_template(
                    &ds,
                    &ds["spec"]["template"],
                    None,
                    &[(REVISION_HASH, &hash)],
                );
                pod["spec"]["nodeName"] = json!(node_name);
                if let Ok(created) = ctl.create("", "pods", ns, pod) {
                    pod_event(ctl, COMPONENT, &ds, PodEvent::Created, &created);
                }
            }
            ready += current.iter().filter(|p| pod_ready(p)).count() as i64;
            updated += current.len() as i64;
        }
        let desired = eligible.len() as i64;
        let status = omit_zeros(json!({
            "desiredNumberScheduled": desired,
            "currentNumberScheduled": updated,
            "updatedNumberScheduled": updated,
            "numberReady": ready,
            "numberAvailable": ready,
            "numberUnavailable": desired - ready,
            "observedGeneration": ds["metadata"]["generation"],
        }));
        let mut status = status;
        status["numberMisscheduled"] = json!(0);
        status["desiredNumberScheduled"] = json!(desired);
        status["currentNumberScheduled"] = json!(updated);
        status["numberReady"] = json!(ready);
        ctl.set_status("apps", "daemonsets", &ds, status);
    }
}
