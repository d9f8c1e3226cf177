//! Endpoints and EndpointSlices from Service selectors. Named targetPorts are resolved
//! against each pod's container ports. Services without a selector are left alone (their
//! endpoints are managed by whoever made them, e.g. kt's preview).

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::{Ctl, controller_ref, ns_name, pod_ready, terminating};
use crate::api::selector::LabelSelector;

const SERVICE_NAME: &str = "kubernetes.io/service-name";
const MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
const CONTROLLER: &str = "endpointslice-controller.k8s.io";

/// Addresses sharing one resolved port set.
#[derive(Default)]
struct Subset {
    ports: Vec<Value>,
    ready: Vec<Value>,
    not_ready: Vec<Value>,
}

/// The port a Service port reaches on `pod`: a number, or a named container port.
fn resolve(target: &Value, pod: &Value) -> Option<u64> {
    match target {
        Value::Number(n) => n.as_u64(),
        Value::String(name) => pod["spec"]["containers"].as_array()?.iter().find_map(|c| {
            c["ports"]
                .as_array()?
                .iter()
                .find(|p| p["name"] == name.as_str())?["containerPort"]
                .as_u64()
        }),
        _ => None,
    }
}

pub(super) fn reconcile(ctl: &Ctl) {
    let pods = ctl.list("", "pods");
    let endpoints = ctl.list("", "endpoints");
    let slices = ctl.list("discovery.k8s.io", "endpointslices");
    let services = ctl.list("", "services");
    // Endpoints outlive nothing: a deleted Service's go with it (slices go by ownerReference).
    for ep in &endpoints {
        if !services.iter().any(|s| ns_name(s) == ns_name(ep)) {
            ctl.delete("", "endpoints", ep, None);
        }
    }
    for svc in services {
        let Some(selector) = svc["spec"]["selector"].as_object() else {
            continue;
        };
        if selector.is_empty() || terminating(&svc) {
            continue;
        }
        let (ns, name) = ns_name(&svc);
        let selector = LabelSelector::from_map(selector);
        let members: Vec<&Value> = pods
            .iter()
            .filter(|p| {
                ns_name(p).0 == ns && selector.matches(p) && p["status"]["podIP"].is_string()
            })
            .collect();
        let ports = svc["spec"]["ports"].as_array().cloned().unwrap_or_default();

        // Endpoints: one subset per distinct resolved port set.
        let mut subsets: BTreeMap<String, Subset> = BTreeMap::new();
        for pod in &members {
            if terminating(pod) {
                continue;
            }
            let resolved: Vec<Value> = ports
                .iter()
                .filter_map(|p| {
                    let port = resolve(&p["targetPort"], pod)?;
                    let mut out = json!({"port": port, "protocol": p["protocol"]});
                    if let Some(n) = p["name"].as_str().filter(|n| !n.is_empty()) {
                        out["name"] = json!(n);
                    }
                    Some(out)
                })
                .collect();
            let key = serde_json::to_string(&resolved).unwrap_or_default();
            let address = address(pod);
            let entry = subsets.entry(key).or_insert_with(|| Subset {
                ports: resolved.clone(),
                ..Default::default()
            });
            if pod_ready(pod) {
                entry.ready.push(address)
            } else {
                entry.not_ready.push(address)
            }
        }
        let subsets: Vec<Value> = subsets
            .into_values()
            .map(
                |Subset {
                     ports,
                     ready,
                     not_ready,
                 }| {
                    let mut s = json!({"ports": ports});
                    if !ready.is_empty() {
                        s["addresses"] = json!(ready);
                    }
                    if !not_ready.is_empty() {
                        s["notReadyAddresses"] = json!(not_ready);
                    }
                    s
                },
            )
            .collect();
        let mut ep = json!({
            "apiVersion": "v1", "kind": "Endpoints",
            "metadata": {"name": name, "namespace": ns, "labels": svc["metadata"]["labels"]},
        });
        if !subsets.is_empty() {
            ep["subsets"] = json!(subsets);
        }
        match endpoints.iter().find(|e| ns_name(e) == (ns, name)) {
            None => {
                let _ = ctl.create("", "endpoints", ns, ep);
            }
            Some(current) if current.get("subsets") != ep.get("subsets") => {
                let subsets = ep.get("subsets").cloned();
                let _ = ctl.modify("", "endpoints", current, |o| match subsets {
                    Some(s) => o["subsets"] = s,
                    None => {
                        o.as_object_mut().map(|m| m.remove("subsets"));
                    }
                });
            }
            Some(_) => {}
        }

        // One EndpointSlice with every pod, terminating ones included with their conditions.
        let slice_ports: Vec<Value> = ports
            .iter()
            .map(|p| {
                let port = members.iter().find_map(|pod| resolve(&p["targetPort"], pod)).or_else(|| p["targetPort"].as_u64());
                json!({"name": p["name"].as_str().unwrap_or_default(), "port": port, "protocol": p["protocol"]})
            })
            .collect();
        let slice_endpoints: Vec<Value> = members
            .iter()
            .map(|pod| {
                let ready = pod_ready(pod) && !terminating(pod);
                json!({
                    "addresses": [pod["status"]["podIP"]],
                    "conditions": {"ready": ready, "serving": pod_ready(pod), "terminating": terminating(pod)},
                    "nodeName": pod["spec"]["nodeName"],
                    "targetRef": {"kind": "Pod", "name": pod["metadata"]["name"], "namespace": ns, "uid": pod["metadata"]["uid"]},
                })
            })
            .collect();
        let owned = slices.iter().find(|s| {
            ns_name(s).0 == ns
                && s["metadata"]["labels"][SERVICE_NAME] == name
                && s["metadata"]["labels"][MANAGED_BY] == CONTROLLER
        });
        match owned {
            None => {
                let slice = json!({
                    "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {"generateName": format!("{name}-"), "namespace": ns,
                                 "labels": {SERVICE_NAME: name, MANAGED_BY: CONTROLLER},
                                 "ownerReferences": [controller_ref(&svc)]},
                    "addressType": "IPv4", "endpoints": slice_endpoints, "ports": slice_ports,
                });
                let _ = ctl.create("discovery.k8s.io", "endpointslices", ns, slice);
            }
            Some(current)
                if current["endpoints"] != json!(slice_endpoints)
                    || current["ports"] != json!(slice_ports) =>
            {
                let _ = ctl.modify("discovery.k8s.io", "endpointslices", current, |o| {
                    o["endpoints"] = json!(slice_endpoints);
                    o["ports"] = json!(slice_ports);
                });
            }
            Some(_) => {}
        }
    }
}

fn address(pod: &Value) -> Value {
    json!({
        "ip": pod["status"]["podIP"], "nodeName": pod["spec"]["nodeName"],
        "targetRef": {"kind": "Pod", "name": pod["metadata"]["name"], "namespace": pod["metadata"]["namespace"], "uid": pod["metadata"]["uid"]},
    })
}
