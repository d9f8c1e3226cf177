//! The StatefulSet controller: pods with stable names `<set>-<ordinal>`, each with
//! `hostname` = its name and `subdomain` = `serviceName` (so the cluster DNS answers
//! `<pod>.<service>.<ns>.svc.cluster.local`), and a claim per `volumeClaimTemplates`
//! entry (`<template>-<pod>`, a directory of the testbed that outlives the pod).
//! `OrderedReady` (the default) makes them one at a time in ordinal order, each once the
//! ones before are Running and Ready, and removes them from the highest ordinal down, one at
//! a time; `Parallel` does all at once. A RollingUpdate replaces pods of an old template
//! from the highest ordinal down to `partition`, one at a time, each once every pod is
//! ready; `OnDelete` replaces only the pods someone deletes.

use serde_json::{Value, json};

use super::{
    Ctl, active, available, event, ns_name, owned_by, pod_from_template, pod_ready, replicas,
    template_hash, terminating,
};
use crate::controllers::{events::EventType, omit_zeros};

const COMPONENT: &str = "statefulset-controller";
const REVISION_HASH: &str = "controller-revision-hash";
const POD_NAME: &str = "statefulset.kubernetes.io/pod-name";
const POD_INDEX: &str = "apps.kubernetes.io/pod-index";

pub(in crate::controllers) fn statefulsets(ctl: &Ctl) {
    let pods = ctl.list("", "pods");
    for set in ctl.list("apps", "statefulsets") {
        if !terminating(&set) {
            sync(ctl, &set, &pods);
        }
    }
}

/// The ordinal of `pod` in the set named `set`, from its name.
fn ordinal(set: &str, pod: &Value) -> Option<i64> {
    pod["metadata"]["name"]
        .as_str()?
        .strip_prefix(set)?
        .strip_prefix('-')?
        .parse()
        .ok()
}

fn running_and_ready(pod: &Value) -> bool {
    pod["status"]["phase"] == "Running" && pod_ready(pod) && !terminating(pod)
}

/// Pod `ordinal` of `set` at `revision`.
fn new_pod(set: &Value, ordinal: i64, revision: &str) -> Value {
    let set_name = ns_name(set).1;
    let name = format!("{set_name}-{ordinal}");
    let index = ordinal.to_string();
    let mut pod = pod_from_template(
        set,
        &set["spec"]["template"],
        Some(&name),
        &[
            (REVISION_HASH, revision),
            (POD_NAME, &name),
            (POD_INDEX, &index),
        ],
    );
    pod["spec"]["hostname"] = json!(name);
    if let Some(service) = set["spec"]["serviceName"]
        .as_str()
        .filter(|s| !s.is_empty())
    {
        pod["spec"]["subdomain"] = json!(service);
    }
    for claim in set["spec"]["volumeClaimTemplates"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let Some(template) = claim["metadata"]["name"].as_str() else {
            continue;
        };
        let volume = json!({"name": template,
            "persistentVolumeClaim": {"claimName": format!("{template}-{name}")}});
        let volumes = &mut pod["spec"]["volumes"];
        match volumes.as_array_mut() {
            Some(list) => {
                list.retain(|v| v["name"] != template);
                list.push(volume);
            }
            None => *volumes = json!([volume]),
        }
    }
    pod
}

fn sync(ctl: &Ctl, set: &Value, all_pods: &[Value]) {
    let (ns, name) = ns_name(set);
    let desired = replicas(set);
    let revision = format!("{name}-{}", template_hash(&set["spec"]["template"]));
    let parallel = set["spec"]["podManagementPolicy"] == "Parallel";
    let mut pods: Vec<(i64, &Value)> = owned_by(all_pods, set)
        .into_iter()
        .filter_map(|p| Some((ordinal(name, p)?, p)))
        .collect();
    pods.sort_by_key(|(i, _)| *i);
    let at = |i: i64| pods.iter().find(|(o, _)| *o == i).map(|(_, p)| *p);
    let say = |reason: &str, verb: &str, pod: &str| {
        let message = format!("{verb} Pod {pod} in StatefulSet {name} successful");
        event(ctl, COMPONENT, set, EventType::Normal, reason, &message);
    };

    // Pods 0 … desired-1: made in order (all at once when Parallel); failed ones replaced.
    for i in 0..desired {
        match at(i) {
            None => {
                let pod = new_pod(set, i, &revision);
                if ctl.create("", "pods", ns, pod).is_ok() {
                    say("SuccessfulCreate", "create", &format!("{name}-{i}"));
                }
                if !parallel {
                    break;
                }
            }
            Some(pod) if pod["status"]["phase"] == "Failed" && !terminating(pod) => {
                ctl.delete("", "pods", pod, None);
                say("SuccessfulDelete", "delete", &format!("{name}-{i}"));
                if !parallel {
                    break;
                }
            }
            Some(pod) if !parallel && !running_and_ready(pod) => break,
            Some(_) => {}
        }
    }

    // Pods beyond: removed from the highest ordinal down, one at a time when ordered.
    let busy = pods.iter().any(|(_, p)| terminating(p));
    for (i, pod) in pods.iter().rev().filter(|(i, _)| *i >= desired) {
        if terminating(pod) {
            continue;
        }
        if !parallel && busy {
            break;
        }
        ctl.delete("", "pods", pod, None);
        say("SuccessfulDelete", "delete", &format!("{name}-{i}"));
        if !parallel {
            break;
        }
    }

    // RollingUpdate: the highest pod of an old template (down to the partition) goes once
    // every pod is there and ready; its replacement is made at the new revision above.
    let strategy = &set["spec"]["updateStrategy"];
    let partition = strategy["rollingUpdate"]["partition"].as_i64().unwrap_or(0);
    let settled = (0..desired).all(|i| at(i).is_some_and(running_and_ready)) && !busy;
    if strategy["type"] != "OnDelete" && settled {
        let outdated = pods.iter().rev().find(|(i, p)| {
            *i < desired
                && *i >= partition
                && p["metadata"]["labels"][REVISION_HASH] != revision.as_str()
        });
        if let Some((i, pod)) = outdated {
            ctl.delete("", "pods", pod, None);
            say("SuccessfulDelete", "delete", &format!("{name}-{i}"));
        }
    }

    let live: Vec<&Value> = pods.iter().map(|(_, p)| *p).filter(|p| active(p)).collect();
    let at_revision = |r: &str| {
        live.iter()
            .filter(|p| p["metadata"]["labels"][REVISION_HASH] == r)
            .count() as i64
    };
    let updated = at_revision(&revision);
    let current_revision = match set["status"]["currentRevision"].as_str() {
        Some(current) if updated < desired => current.to_owned(),
        _ => revision.clone(),
    };
    let min_ready_seconds = set["spec"]["minReadySeconds"].as_i64().unwrap_or(0);
    let mut status = omit_zeros(json!({
        "observedGeneration": set["metadata"]["generation"],
        "replicas": live.len(),
        "readyReplicas": live.iter().filter(|p| pod_ready(p)).count(),
        "availableReplicas": live.iter().filter(|p| available(p, min_ready_seconds)).count(),
        "currentReplicas": at_revision(&current_revision),
        "updatedReplicas": updated,
    }));
    status["replicas"] = json!(live.len());
    status["currentRevision"] = json!(current_revision);
    status["updateRevision"] = json!(revision);
    status["collisionCount"] = json!(0);
    ctl.set_status("apps", "statefulsets", set, status);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_have_stable_names_hostnames_subdomains_and_claims() {
        let set = json!({"apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": "web", "namespace": "default", "uid": "u1"},
            "spec": {"serviceName": "peers",
                     "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": []}},
                     "volumeClaimTemplates": [{"metadata": {"name": "data"}}]}});
        let pod = new_pod(&set, 1, "web-abc");
        assert_eq!(pod["metadata"]["name"], "web-1");
        assert_eq!(pod["spec"]["hostname"], "web-1");
        assert_eq!(pod["spec"]["subdomain"], "peers");
        assert_eq!(pod["metadata"]["labels"][POD_INDEX], "1");
        assert_eq!(pod["metadata"]["labels"][REVISION_HASH], "web-abc");
        assert_eq!(
            pod["spec"]["volumes"],
            json!([{"name": "data", "persistentVolumeClaim": {"claimName": "data-web-1"}}])
        );
        assert_eq!(ordinal("web", &pod), Some(1));
        assert_eq!(ordinal("we", &pod), None);
    }
}
