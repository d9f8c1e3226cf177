//! Endpoints and EndpointSlices from Service selectors, as the endpoints and EndpointSlice
//! controllers write them: named targetPorts resolved against each pod's container ports,
//! one slice per distinct port mapping, `name: ""` for an unnamed port, the `hostname` of
//! pods whose `subdomain` is the Service, not-ready pods as ready when the Service says
//! `publishNotReadyAddresses`. Services without a
//! selector keep the Endpoints whoever made them wrote, and get EndpointSlices mirroring
//! them (the EndpointSlice mirroring controller); slices someone else manages (kt's
//! preview) are left alone.

use std::collections::{BTreeMap, HashMap};

use serde_json::{Value, json};

use super::{Ctl, controller_ref, ns_name, pod_ready, terminating};
use crate::api::selector::LabelSelector;

const SERVICE_NAME: &str = "kubernetes.io/service-name";
const MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
const CONTROLLER: &str = "endpointslice-controller.k8s.io";
const MIRRORING: &str = "endpointslicemirroring-controller.k8s.io";

/// Addresses sharing one resolved port set.
#[derive(Default)]
struct Subset {
    ports: Vec<Value>,
    ready: Vec<Value>,
    not_ready: Vec<Value>,
}

/// The port a Service port (`targetPort`, `protocol`) reaches on `pod`: a number, or the
/// container port of that name and protocol.
fn resolve(port: &Value, pod: &Value) -> Option<u64> {
    let protocol = port["protocol"].as_str().unwrap_or("TCP");
    match &port["targetPort"] {
        Value::Number(n) => n.as_u64(),
        Value::String(name) => pod["spec"]["containers"].as_array()?.iter().find_map(|c| {
            c["ports"].as_array()?.iter().find(|p| {
                p["name"] == name.as_str() && p["protocol"].as_str().unwrap_or("TCP") == protocol
            })?["containerPort"]
                .as_u64()
        }),
        _ => None,
    }
}

/// Objects by (namespace, name): one lookup per Service instead of a scan of all of them
/// (a pass over 10 000 Services was 10⁸ comparisons).
fn by_name(objects: &[Value]) -> HashMap<(&str, &str), &Value> {
    objects.iter().map(|o| (ns_name(o), o)).collect()
}

/// The slices `managed_by` writes, by (namespace, their `kubernetes.io/service-name`).
fn slices_by_service<'a>(
    slices: &'a [Value],
    managed_by: &str,
) -> HashMap<(&'a str, &'a str), Vec<&'a Value>> {
    let mut index: HashMap<_, Vec<&Value>> = HashMap::new();
    for slice in slices {
        let labels = &slice["metadata"]["labels"];
        if labels[MANAGED_BY] != managed_by {
            continue;
        }
        if let Some(service) = labels[SERVICE_NAME].as_str() {
            index
                .entry((ns_name(slice).0, service))
                .or_default()
                .push(slice);
        }
    }
    index
}

pub(super) fn reconcile(ctl: &Ctl) {
    let pods = ctl.list("", "pods");
    let endpoints = ctl.list("", "endpoints");
    let slices = ctl.list("discovery.k8s.io", "endpointslices");
    let services = ctl.list("", "services");
    let service_index = by_name(&services);
    let endpoints_index = by_name(&endpoints);
    let controller_slices = slices_by_service(&slices, CONTROLLER);
    // Pods with an address, by namespace: a Service's selector is matched against its own
    // namespace's only.
    let mut pods_by_ns: HashMap<&str, Vec<&Value>> = HashMap::new();
    for pod in &pods {
        if pod["status"]["podIP"].is_string() {
            pods_by_ns.entry(ns_name(pod).0).or_default().push(pod);
        }
    }
    // Endpoints outlive nothing: a deleted Service's go with it (slices go by ownerReference).
    for ep in &endpoints {
        if !service_index.contains_key(&ns_name(ep)) {
            ctl.delete("", "endpoints", ep, None);
        }
    }
    for svc in &services {
        let Some(selector) = svc["spec"]["selector"].as_object() else {
            continue;
        };
        if selector.is_empty() || terminating(svc) {
            continue;
        }
        let (ns, name) = ns_name(svc);
        let selector = LabelSelector::from_map(selector);
        let members: Vec<&Value> = pods_by_ns
            .get(ns)
            .into_iter()
            .flatten()
            .copied()
            .filter(|p| selector.matches(p))
            .collect();
        let ports = svc["spec"]["ports"].as_array().cloned().unwrap_or_default();
        let publish_not_ready = svc["spec"]["publishNotReadyAddresses"] == true;

        // Endpoints: one subset per distinct resolved port set.
        let mut subsets: BTreeMap<String, Subset> = BTreeMap::new();
        for pod in &members {
            if terminating(pod) {
                continue;
            }
            let resolved: Vec<Value> = ports
                .iter()
                .filter_map(|p| {
                    let port = resolve(p, pod)?;
                    let mut out = json!({"port": port, "protocol": p["protocol"]});
                    if let Some(n) = p["name"].as_str().filter(|n| !n.is_empty()) {
                        out["name"] = json!(n);
                    }
                    Some(out)
                })
                .collect();
            let key = serde_json::to_string(&resolved).unwrap_or_default();
            let address = address(pod, name);
            let entry = subsets.entry(key).or_insert_with(|| Subset {
                ports: resolved.clone(),
                ..Default::default()
            });
            if pod_ready(pod) || publish_not_ready {
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
        match endpoints_index.get(&(ns, name)) {
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

        // EndpointSlices: one per distinct port mapping (pods that resolve a named port
        // differently, or not at all, land in different slices), every pod in one,
        // terminating ones included with their conditions.
        let mut groups: BTreeMap<String, (Vec<Value>, Vec<Value>)> = BTreeMap::new();
        for pod in &members {
            let pod_ports = slice_ports(&ports, pod);
            let ready = (pod_ready(pod) || publish_not_ready) && !terminating(pod);
            let mut endpoint = json!({
                "addresses": [pod["status"]["podIP"]],
                "conditions": {"ready": ready, "serving": pod_ready(pod), "terminating": terminating(pod)},
                "nodeName": pod["spec"]["nodeName"],
                "targetRef": {"kind": "Pod", "name": pod["metadata"]["name"], "namespace": ns, "uid": pod["metadata"]["uid"]},
            });
            if let Some(hostname) = hostname_in(pod, name) {
                endpoint["hostname"] = json!(hostname);
            }
            groups
                .entry(serde_json::to_string(&pod_ports).unwrap_or_default())
                .or_insert_with(|| (pod_ports, Vec::new()))
                .1
                .push(endpoint);
        }
        if groups.is_empty() {
            // No pod: one placeholder slice, without endpoints or ports.
            groups.insert(String::new(), (Vec::new(), Vec::new()));
        }
        let wanted: Vec<(Vec<Value>, Vec<Value>)> = groups.into_values().collect();
        let owned = controller_slices
            .get(&(ns, name))
            .map(Vec::as_slice)
            .unwrap_or_default();
        sync_slices(
            ctl,
            ns,
            name,
            owned,
            &wanted,
            CONTROLLER,
            controller_ref(svc),
        );
    }
    mirror(ctl, &service_index, &endpoints, &slices);
}

/// The EndpointSlice ports of a Service's `ports` as `pod` resolves them (a named port the
/// pod does not declare is left out). An unnamed port is named `""`, as the EndpointSlice
/// controller writes it.
fn slice_ports(ports: &[Value], pod: &Value) -> Vec<Value> {
    ports
        .iter()
        .filter_map(|p| {
            let port = resolve(p, pod)?;
            Some(json!({"name": p["name"].as_str().unwrap_or_default(), "port": port, "protocol": p["protocol"]}))
        })
        .collect()
}

/// Makes the slices `managed_by` holds for Service `name` equal to `wanted` (ports and
/// endpoints per slice): a slice with the same ports is updated, missing ones are created
/// with `owner`, left-over ones deleted.
fn sync_slices(
    ctl: &Ctl,
    ns: &str,
    name: &str,
    owned: &[&Value],
    wanted: &[(Vec<Value>, Vec<Value>)],
    managed_by: &str,
    owner: Value,
) {
    let mut unused: Vec<&Value> = owned.to_vec();
    for (ports, endpoints) in wanted {
        let matching = unused.iter().position(|s| s["ports"] == json!(ports));
        match matching.map(|i| unused.remove(i)) {
            Some(current) if current["endpoints"] == json!(endpoints) => {}
            Some(current) => {
                let _ = ctl.modify("discovery.k8s.io", "endpointslices", current, |o| {
                    o["endpoints"] = json!(endpoints);
                });
            }
            None => {
                let slice = json!({
                    "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {"generateName": format!("{name}-"), "namespace": ns,
                                 "labels": {SERVICE_NAME: name, MANAGED_BY: managed_by},
                                 "ownerReferences": [owner.clone()]},
                    "addressType": "IPv4", "endpoints": endpoints, "ports": ports,
                });
                let _ = ctl.create("discovery.k8s.io", "endpointslices", ns, slice);
            }
        }
    }
    for stale in unused {
        ctl.delete("discovery.k8s.io", "endpointslices", stale, None);
    }
}

/// The EndpointSlice mirroring controller: a Service without a selector whose Endpoints
/// someone wrote by hand gets EndpointSlices mirroring them, one per subset, owned by the
/// Endpoints (so they go with them).
fn mirror(
    ctl: &Ctl,
    services: &HashMap<(&str, &str), &Value>,
    endpoints: &[Value],
    slices: &[Value],
) {
    let mirrored = slices_by_service(slices, MIRRORING);
    for ep in endpoints {
        let (ns, name) = ns_name(ep);
        let Some(svc) = services.get(&(ns, name)) else {
            continue;
        };
        let has_selector = svc["spec"]["selector"]
            .as_object()
            .is_some_and(|s| !s.is_empty());
        let owned = mirrored
            .get(&(ns, name))
            .map(Vec::as_slice)
            .unwrap_or_default();
        let skip = ep["metadata"]["labels"]["endpointslice.kubernetes.io/skip-mirror"] == "true";
        let wanted: Vec<(Vec<Value>, Vec<Value>)> = if has_selector || skip || terminating(svc) {
            Vec::new()
        } else {
            ep["subsets"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|subset| {
                    let ports: Vec<Value> = subset["ports"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|p| json!({"name": p["name"].as_str().unwrap_or_default(), "port": p["port"], "protocol": p["protocol"].as_str().unwrap_or("TCP")}))
                        .collect();
                    let endpoint = |a: &Value, ready: bool| {
                        json!({"addresses": [a["ip"]], "conditions": {"ready": ready}, "nodeName": a["nodeName"], "targetRef": a["targetRef"]})
                    };
                    let endpoints: Vec<Value> = subset["addresses"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|a| endpoint(a, true))
                        .chain(subset["notReadyAddresses"].as_array().into_iter().flatten().map(|a| endpoint(a, false)))
                        .collect();
                    (ports, endpoints)
                })
                .collect()
        };
        sync_slices(ctl, ns, name, owned, &wanted, MIRRORING, controller_ref(ep));
    }
}

/// An Endpoints address of `pod` for Service `service`.
fn address(pod: &Value, service: &str) -> Value {
    let mut address = json!({
        "ip": pod["status"]["podIP"], "nodeName": pod["spec"]["nodeName"],
        "targetRef": {"kind": "Pod", "name": pod["metadata"]["name"], "namespace": pod["metadata"]["namespace"], "uid": pod["metadata"]["uid"]},
    });
    if let Some(hostname) = hostname_in(pod, service) {
        address["hostname"] = json!(hostname);
    }
    address
}

/// The pod's `hostname` when its `subdomain` is `service`: what gives it a DNS name
/// `<hostname>.<service>.<ns>.svc.cluster.local`.
fn hostname_in<'a>(pod: &'a Value, service: &str) -> Option<&'a str> {
    let spec = &pod["spec"];
    (spec["subdomain"] == service)
        .then(|| spec["hostname"].as_str())
        .flatten()
        .filter(|h| !h.is_empty())
}
