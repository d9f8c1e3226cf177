//! The ReplicaSet controller: adopts orphans matching its whole selector, creates and
//! deletes pods to match `spec.replicas` (not-ready pods go first, then the newest), and
//! reports how many are ready and available (Ready for `minReadySeconds`).

use serde_json::{Value, json};

use super::{
    Ctl, PodEvent, active, available, controller_ref, controller_uid, ns_name, owned_by, pod_event,
    pod_from_template, pod_ready, replicas, terminating,
};
use crate::{api::selector::LabelSelector, controllers::omit_zeros};

const COMPONENT: &str = "replicaset-controller";

pub(in crate::controllers) fn replicasets(ctl: &Ctl) {
    let pods = ctl.list("", "pods");
    for rs in ctl.list("apps", "replicasets") {
        if terminating(&rs) {
            continue;
        }
        let ns = ns_name(&rs).0;
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
        let active: Vec<&&Value> = owned.iter().filter(|p| active(p)).collect();
        let want = replicas(&rs);
        let have = active.len() as i64;
        for _ in have..want {
            let pod = pod_from_template(&rs, &rs["spec"]["template"], None, &[]);
            if let Ok(created) = ctl.create("", "pods", ns, pod) {
                pod_event(ctl, COMPONENT, &rs, PodEvent::Created, &created);
            }
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
                pod_event(ctl, COMPONENT, &rs, PodEvent::Deleted, pod);
            }
        }
        let min_ready_seconds = rs["spec"]["minReadySeconds"].as_i64().unwrap_or(0);
        let ready = active.iter().filter(|p| pod_ready(p)).count() as i64;
        let up = active
            .iter()
            .filter(|p| available(p, min_ready_seconds))
            .count() as i64;
        let status = omit_zeros(json!({
            "replicas": have,
            "fullyLabeledReplicas": have,
            "readyReplicas": ready,
            "availableReplicas": up,
            "observedGeneration": rs["metadata"]["generation"],
        }));
        ctl.set_status("apps", "replicasets", &rs, status);
    }
}
