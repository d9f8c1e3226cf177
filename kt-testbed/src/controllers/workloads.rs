//! Deployment → ReplicaSet (pod-template-hash) → Pods, and DaemonSet (one pod per node).
//! Ownership is by controller ownerReference; a ReplicaSet adopts only orphans matching
//! its whole selector (pod-template-hash included), so kt's shadow pods, which carry an
//! app's labels but no hash, are never adopted or killed.

use serde_json::{Value, json};

use super::{
    Ctl, controller_ref, controller_uid, ns_name, omit_zeros, pod_ready, terminating, uid,
};
use crate::{api::selector::LabelSelector, api::store::now_rfc3339};

const HASH_LABEL: &str = "pod-template-hash";
const REVISION: &str = "deployment.kubernetes.io/revision";

/// A stable, label-safe hash of a pod template.
fn template_hash(template: &Value) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut h: u32 = 0x811c_9dc5;
    for b in template.to_string().bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    let mut out = String::new();
    while h > 0 || out.is_empty() {
        out.push(ALPHABET[(h % ALPHABET.len() as u32) as usize] as char);
        h /= ALPHABET.len() as u32;
    }
    out
}

fn replicas(obj: &Value) -> i64 {
    obj["spec"]["replicas"].as_i64().unwrap_or(1)
}

fn owned_by<'a>(items: &'a [Value], owner: &Value) -> Vec<&'a Value> {
    let (ns, _) = ns_name(owner);
    items
        .iter()
        .filter(|i| ns_name(i).0 == ns && controller_uid(i) == Some(uid(owner)))
        .collect()
}

pub(super) fn deployments(ctl: &Ctl) {
    let all_rs = ctl.list("apps", "replicasets");
    for d in ctl.list("apps", "deployments") {
        if terminating(&d) {
            continue;
        }
        let (ns, name) = ns_name(&d);
        let hash = template_hash(&d["spec"]["template"]);
        let owned = owned_by(&all_rs, &d);
        let current = owned
            .iter()
            .find(|rs| rs["metadata"]["labels"][HASH_LABEL] == hash.as_str());
        let want = replicas(&d);
        let current = match current {
            Some(rs) => (*rs).clone(),
            None => {
                let revision = owned
                    .iter()
                    .filter_map(|rs| {
                        rs["metadata"]["annotations"][REVISION]
                            .as_str()?
                            .parse::<i64>()
                            .ok()
                    })
                    .max()
                    .unwrap_or(0)
                    + 1;
                let mut template = d["spec"]["template"].clone();
                template["metadata"]["labels"][HASH_LABEL] = json!(hash);
                let mut selector = d["spec"]["selector"].clone();
                selector["matchLabels"][HASH_LABEL] = json!(hash);
                let rs = json!({
                    "apiVersion": "apps/v1", "kind": "ReplicaSet",
                    "metadata": {"name": format!("{name}-{hash}"), "namespace": ns,
                                 "labels": template["metadata"]["labels"],
                                 "annotations": {REVISION: revision.to_string()},
                                 "ownerReferences": [controller_ref(&d)]},
                    "spec": {"replicas": want, "selector": selector, "template": template},
                });
                match ctl.create("apps", "replicasets", ns, rs) {
                    Ok(rs) => rs,
                    Err(_) => continue,
                }
            }
        };
        if replicas(&current) != want {
            let _ = ctl.modify("apps", "replicasets", &current, |rs| {
                rs["spec"]["replicas"] = json!(want)
            });
        }
        // Recreate-style rollout: old ReplicaSets go to zero at once.
        for old in owned.iter().filter(|rs| uid(rs) != uid(&current)) {
            if replicas(old) != 0 {
                let _ = ctl.modify("apps", "replicasets", old, |rs| {
                    rs["spec"]["replicas"] = json!(0)
                });
            }
        }
        if d["metadata"]["annotations"][REVISION] != current["metadata"]["annotations"][REVISION] {
            let revision = current["metadata"]["annotations"][REVISION].clone();
            let _ = ctl.modify("apps", "deployments", &d, |o| {
                o["metadata"]["annotations"][REVISION] = revision
            });
        }
        let sum = |field: &str| {
            owned
                .iter()
                .map(|rs| rs["status"][field].as_i64().unwrap_or(0))
                .sum::<i64>()
        };
        let current_status = all_rs
            .iter()
            .find(|rs| uid(rs) == uid(&current))
            .map(|rs| rs["status"].clone())
            .unwrap_or_default();
        let updated = current_status["replicas"].as_i64().unwrap_or(0);
        let available = sum("availableReplicas");
        let total = sum("replicas");
        let complete = updated == want && total == want && available == want;
        let previous = d["status"]["conditions"].clone();
        let condition = |kind: &str, ok: bool, reason: &str, message: String| {
            let since = previous
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["type"] == kind && c["status"] == if ok { "True" } else { "False" })
                .and_then(|c| c["lastTransitionTime"].as_str().map(String::from))
                .unwrap_or_else(now_rfc3339);
            json!({"type": kind, "status": if ok { "True" } else { "False" }, "reason": reason, "message": message,
                   "lastUpdateTime": since, "lastTransitionTime": since})
        };
        let status = omit_zeros(json!({
            "observedGeneration": d["metadata"]["generation"],
            "replicas": total,
            "updatedReplicas": updated,
            "readyReplicas": sum("readyReplicas"),
            "availableReplicas": available,
            "unavailableReplicas": (want - available).max(0),
        }));
        let mut status = status;
        status["conditions"] = json!([
            condition(
                "Available",
                available >= want,
                if available >= want {
                    "MinimumReplicasAvailable"
                } else {
                    "MinimumReplicasUnavailable"
                },
                format!(
                    "Deployment has {} minimum availability.",
                    if available >= want { "" } else { "not" }
                )
            ),
            condition(
                "Progressing",
                true,
                if complete {
                    "NewReplicaSetAvailable"
                } else {
                    "ReplicaSetUpdated"
                },
                format!(
                    "ReplicaSet \"{}\" {}",
                    current["metadata"]["name"].as_str().unwrap_or_default(),
                    if complete {
                        "has successfully progressed."
                    } else {
                        "is progressing."
                    }
                )
            ),
        ]);
        ctl.set_status("apps", "deployments", &d, status);
    }
}

pub(super) fn replicasets(ctl: &Ctl) {
    let pods = ctl.list("", "pods");
    for rs in ctl.list("apps", "replicasets") {
        if terminating(&rs) {
            continue;
        }
        let (ns, name) = ns_name(&rs);
        let Ok(selector) = LabelSelector::from_object(&rs["spec"]["selector"]) else {
            continue;
        };
        // Adopt orphans that match the whole selector.
        for orphan in pods.iter().filter(|p| {
            ns_name(p).0 == ns
                && controller_uid(p).is_none()
                && !terminating(p)
                && !selector.is_empty()
                && selector.matches(p)
        }) {
            let owner = controller_ref(&rs);
            let _ = ctl.modify("", "pods", orphan, |p| {
                let refs = p["metadata"]["ownerReferences"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                p["metadata"]["ownerReferences"] = json!([refs, vec![owner]].concat());
            });
        }
        let owned: Vec<&Value> = owned_by(&pods, &rs);
        let active: Vec<&&Value> = owned.iter().filter(|p| !terminating(p)).collect();
        let want = replicas(&rs);
        let have = active.len() as i64;
        for _ in have..want {
            let mut template = rs["spec"]["template"].clone();
            let pod = json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"generateName": format!("{name}-"), "namespace": ns,
                             "labels": template["metadata"]["labels"].take(),
                             "annotations": template["metadata"]["annotations"].take(),
                             "ownerReferences": [controller_ref(&rs)]},
                "spec": template["spec"].take(),
            });
            let _ = ctl.create("", "pods", ns, pod);
        }
        if have > want {
            // Not-ready pods go first, then the newest.
            let mut victims: Vec<&&Value> = active.clone();
            victims.sort_by_key(|p| {
                (
                    pod_ready(p),
                    std::cmp::Reverse(
                        p["metadata"]["creationTimestamp"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned(),
                    ),
                )
            });
            for pod in victims.into_iter().take((have - want) as usize) {
                ctl.delete("", "pods", pod, None);
            }
        }
        let ready = active.iter().filter(|p| pod_ready(p)).count() as i64;
        let status = omit_zeros(json!({
            "replicas": have,
            "fullyLabeledReplicas": have,
            "readyReplicas": ready,
            "availableReplicas": ready,
            "observedGeneration": rs["metadata"]["generation"],
        }));
        ctl.set_status("apps", "replicasets", &rs, status);
    }
}

pub(super) fn daemonsets(ctl: &Ctl) {
    let pods = ctl.list("", "pods");
    let nodes = ctl.list("", "nodes");
    for ds in ctl.list("apps", "daemonsets") {
        if terminating(&ds) {
            continue;
        }
        let (ns, name) = ns_name(&ds);
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
                .filter(|p| p["metadata"]["labels"]["controller-revision-hash"] != hash.as_str())
            {
                ctl.delete("", "pods", stale, None);
            }
            let current: Vec<&&&Value> = on_node
                .iter()
                .filter(|p| p["metadata"]["labels"]["controller-revision-hash"] == hash.as_str())
                .collect();
            // A replacement waits until the old pod on the node is gone (ports, addresses).
            let old_still_there = owned.iter().any(|p| {
                p["spec"]["nodeName"] == node_name
                    && p["metadata"]["labels"]["controller-revision-hash"] != hash.as_str()
            });
            if current.is_empty() && !old_still_there {
                let mut template = ds["spec"]["template"].clone();
                let mut labels = template["metadata"]["labels"].take();
                labels["controller-revision-hash"] = json!(hash);
                let mut spec = template["spec"].take();
                spec["nodeName"] = json!(node_name);
                let pod = json!({
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"generateName": format!("{name}-"), "namespace": ns, "labels": labels,
                                 "annotations": template["metadata"]["annotations"].take(),
                                 "ownerReferences": [controller_ref(&ds)]},
                    "spec": spec,
                });
                let _ = ctl.create("", "pods", ns, pod);
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
