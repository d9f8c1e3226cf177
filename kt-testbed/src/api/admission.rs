//! Defaulting and validation the API server applies on writes: names, Service IP and
//! node-port allocation, pod and workload defaults, immutable fields. Pure functions over
//! JSON; the store supplies what is already allocated.

use std::{
    collections::{HashMap, HashSet},
    net::Ipv4Addr,
};

use serde_json::{Value, json};

use crate::api::resources::ResourceType;

/// The Service range: 10.96.0.0/16 (kubernetes = .0.1, kube-dns = .0.10).
pub const SERVICE_NET: [u8; 2] = [10, 96];
pub const NODE_PORT_RANGE: std::ops::RangeInclusive<u16> = 30000..=32767;

/// Field errors: `(field path, message)`.
pub type Causes = Vec<(String, String)>;

/// The ClusterIPs and node ports the stored Services hold, kept up to date by the store on
/// every Service write ([`Allocated::add`], [`Allocated::remove`]) so that a create costs
/// the same with 10 Services as with 10 000 (the API server's allocators are bitmaps, not
/// scans of the Services). Counts, not sets: two Services may name the same node port
/// explicitly, and deleting one must not free it for the other.
#[derive(Debug, Default)]
pub struct Allocated {
    cluster_ips: HashMap<Ipv4Addr, usize>,
    node_ports: HashMap<u16, usize>,
    /// Where the next free-address search starts: just after the newest allocation, so a
    /// run of creates is O(1) each instead of a scan from the range's start.
    next_ip: u32,
}

impl Allocated {
    /// Counts what Service `svc` (stored JSON) holds: its `spec.clusterIP` and every
    /// `spec.ports[].nodePort`.
    pub fn add(&mut self, svc: &Value) {
        if let Some(ip) = service_ip(svc) {
            *self.cluster_ips.entry(ip).or_default() += 1;
            self.next_ip = ip_index(ip) + 1;
        }
        for port in node_ports(svc) {
            *self.node_ports.entry(port).or_default() += 1;
        }
    }

    /// Releases what [`Allocated::add`] counted for the same object.
    pub fn remove(&mut self, svc: &Value) {
        fn release<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, key: K) {
            if let Some(count) = map.get_mut(&key) {
                *count -= 1;
                if *count == 0 {
                    map.remove(&key);
                }
            }
        }
        if let Some(ip) = service_ip(svc) {
            release(&mut self.cluster_ips, ip);
        }
        for port in node_ports(svc) {
            release(&mut self.node_ports, port);
        }
    }

    /// Whether a Service holds `ip`.
    pub fn has_ip(&self, ip: Ipv4Addr) -> bool {
        self.cluster_ips.contains_key(&ip)
    }

    /// Whether a Service holds node port `port`.
    pub fn has_node_port(&self, port: u16) -> bool {
        self.node_ports.contains_key(&port)
    }
}

fn service_ip(svc: &Value) -> Option<Ipv4Addr> {
    svc["spec"]["clusterIP"].as_str()?.parse().ok()
}

fn node_ports(svc: &Value) -> impl Iterator<Item = u16> + '_ {
    svc["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| u16::try_from(p["nodePort"].as_u64()?).ok())
}

/// The offset of `ip` in [`SERVICE_NET`] (its low 16 bits).
fn ip_index(ip: Ipv4Addr) -> u32 {
    u32::from(ip) & 0xffff
}

/// DNS-1123 subdomain (most names) or label (namespaces, services: also ≤ 63).
pub fn validate_name(rt: &ResourceType, name: &str) -> Option<String> {
    // RBAC names are path segments (`system:kube-dns`).
    if rt.group == "rbac.authorization.k8s.io" {
        let bad = name.is_empty()
            || name == "."
            || name == ".."
            || name.contains('/')
            || name.contains('%');
        return bad.then(|| {
            format!(
                "Invalid value: \"{name}\": may not contain '/' or '%' and may not be '.' or '..'"
            )
        });
    }
    let label = matches!(rt.plural.as_str(), "namespaces" | "services");
    let max = if label { 63 } else { 253 };
    let chars_ok = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || (!label && c == '.'));
    let ends_ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .last()
            .is_some_and(|c| c.is_ascii_alphanumeric());
    let service_ok =
        rt.plural != "services" || name.chars().next().is_some_and(|c| c.is_ascii_lowercase());
    if name.is_empty() || name.len() > max || !chars_ok || !ends_ok || !service_ok {
        let what = if label {
            "a lowercase RFC 1123 label"
        } else {
            "a lowercase RFC 1123 subdomain"
        };
        return Some(format!(
            "Invalid value: \"{name}\": {what} must consist of lower case alphanumeric characters, '-'{} and must start and end with an alphanumeric character",
            if label { "" } else { " or '.'" }
        ));
    }
    None
}

/// Label keys and values: ≤ 63 characters of `[A-Za-z0-9._-]`, alphanumeric at both ends,
/// keys with an optional DNS prefix.
pub fn validate_labels(object: &Value) -> Causes {
    let mut causes = Vec::new();
    for (k, v) in object["metadata"]["labels"]
        .as_object()
        .into_iter()
        .flatten()
    {
        let name = k.rsplit('/').next().unwrap_or(k);
        let value = v.as_str().unwrap_or_default();
        let ok = |s: &str, empty_ok: bool| {
            (empty_ok && s.is_empty())
                || (s.len() <= 63
                    && s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                    && s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
                    && s.chars().last().is_some_and(|c| c.is_ascii_alphanumeric()))
        };
        if !ok(name, false) {
            causes.push((format!("metadata.labels: Invalid value: \"{k}\""), "name part must be 63 characters or less and consist of alphanumeric characters, '-', '_' or '.'".into()));
        }
        if !v.is_string() || !ok(value, true) {
            causes.push((format!("metadata.labels: Invalid value: \"{value}\""), "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character".into()));
        }
    }
    causes
}

/// Defaults of a new object; errors for what a create may not carry.
pub fn default_on_create(rt: &ResourceType, obj: &mut Value, taken: &Allocated) -> Causes {
    match (rt.group.as_str(), rt.plural.as_str()) {
        ("", "services") => default_service(obj, taken),
        ("", "pods") => {
            default_pod_spec(&mut obj["spec"]);
            if obj["status"].get("phase").is_none() {
                obj["status"] = json!({"phase": "Pending", "qosClass": "BestEffort"});
            }
            // Ephemeral containers come only through the `ephemeralcontainers` subresource.
            if obj["spec"]["ephemeralContainers"]
                .as_array()
                .is_some_and(|l| !l.is_empty())
            {
                return vec![(
                    "spec.ephemeralContainers".into(),
                    "Forbidden: cannot be set on create".into(),
                )];
            }
            Vec::new()
        }
        ("", "namespaces") => {
            obj["spec"] = json!({"finalizers": ["kubernetes"]});
            obj["status"] = json!({"phase": "Active"});
            Vec::new()
        }
        ("apps", "deployments") => {
            default_workload(obj);
            let strategy = &mut obj["spec"]["strategy"];
            if strategy.get("type").is_none() {
                *strategy = json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}});
            }
            set_default(&mut obj["spec"], "revisionHistoryLimit", json!(10));
            set_default(&mut obj["spec"], "progressDeadlineSeconds", json!(600));
            check_selector_matches_template(obj)
        }
        ("apps", "replicasets") => {
            default_workload(obj);
            check_selector_matches_template(obj)
        }
        ("apps", "daemonsets") => {
            default_pod_spec(&mut obj["spec"]["template"]["spec"]);
            if obj["spec"]["updateStrategy"].get("type").is_none() {
                obj["spec"]["updateStrategy"] = json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}});
            }
            set_default(&mut obj["spec"], "revisionHistoryLimit", json!(10));
            check_selector_matches_template(obj)
        }
        ("apps", "statefulsets") => {
            default_workload(obj);
            let spec = &mut obj["spec"];
            set_default(spec, "podManagementPolicy", json!("OrderedReady"));
            set_default(&mut spec["updateStrategy"], "type", json!("RollingUpdate"));
            if spec["updateStrategy"]["type"] == "RollingUpdate" {
                set_default(
                    &mut spec["updateStrategy"]["rollingUpdate"],
                    "partition",
                    json!(0),
                );
            }
            set_default(spec, "revisionHistoryLimit", json!(10));
            set_default(
                spec,
                "persistentVolumeClaimRetentionPolicy",
                json!({"whenDeleted": "Retain", "whenScaled": "Retain"}),
            );
            check_selector_matches_template(obj)
        }
        ("batch", "jobs") => default_job(obj),
        ("batch", "cronjobs") => {
            let spec = &mut obj["spec"];
            set_default(spec, "concurrencyPolicy", json!("Allow"));
            set_default(spec, "suspend", json!(false));
            set_default(spec, "successfulJobsHistoryLimit", json!(3));
            set_default(spec, "failedJobsHistoryLimit", json!(1));
            default_pod_spec(&mut spec["jobTemplate"]["spec"]["template"]["spec"]);
            Vec::new()
        }
        _ => Vec::new(),
    }
}

/// A Job as the API server completes it: the selector it generates from the object's uid
/// (unless `manualSelector`), the matching template labels, and the spec defaults.
fn default_job(obj: &mut Value) -> Causes {
    let uid = obj["metadata"]["uid"].clone();
    let name = obj["metadata"]["name"].clone();
    let spec = &mut obj["spec"];
    if spec["manualSelector"] != json!(true) {
        let labels = &mut spec["template"]["metadata"]["labels"];
        for (key, value) in [
            ("batch.kubernetes.io/controller-uid", &uid),
            ("batch.kubernetes.io/job-name", &name),
            ("controller-uid", &uid),
            ("job-name", &name),
        ] {
            labels[key] = value.clone();
        }
        spec["selector"] = json!({"matchLabels": {"batch.kubernetes.io/controller-uid": uid}});
    }
    // Neither set: one pod, once; only `parallelism` set: a work queue, no `completions`.
    if spec.get("completions").is_none_or(Value::is_null)
        && spec.get("parallelism").is_none_or(Value::is_null)
    {
        spec["completions"] = json!(1);
    }
    set_default(spec, "parallelism", json!(1));
    set_default(spec, "backoffLimit", json!(6));
    set_default(spec, "completionMode", json!("NonIndexed"));
    set_default(spec, "suspend", json!(false));
    set_default(spec, "podReplacementPolicy", json!("TerminatingOrFailed"));
    default_pod_spec(&mut spec["template"]["spec"]);
    let mut causes = check_selector_matches_template(obj);
    match obj["spec"]["template"]["spec"]["restartPolicy"].as_str() {
        Some("Never" | "OnFailure") => {}
        other => causes.push((
            "spec.template.spec.restartPolicy".into(),
            format!(
                "Unsupported value: \"{}\": supported values: \"OnFailure\", \"Never\"",
                other.unwrap_or_default()
            ),
        )),
    }
    causes
}

fn set_default(parent: &mut Value, key: &str, value: Value) {
    if parent.get(key).is_none_or(Value::is_null) {
        parent[key] = value;
    }
}

fn default_workload(obj: &mut Value) {
    set_default(&mut obj["spec"], "replicas", json!(1));
    default_pod_spec(&mut obj["spec"]["template"]["spec"]);
}

fn check_selector_matches_template(obj: &Value) -> Causes {
    let selector = &obj["spec"]["selector"];
    if !selector.is_object() {
        return vec![("spec.selector".into(), "Required value".into())];
    }
    let Ok(parsed) = crate::api::selector::LabelSelector::from_object(selector) else {
        return vec![(
            "spec.selector".into(),
            "Invalid value: invalid label selector".into(),
        )];
    };
    if parsed.is_empty() {
        return vec![(
            "spec.selector".into(),
            "Invalid value: empty selector is invalid for deployment".into(),
        )];
    }
    if !parsed.matches(&obj["spec"]["template"]) {
        return vec![(
            "spec.template.metadata.labels".into(),
            "Invalid value: `selector` does not match template `labels`".into(),
        )];
    }
    Vec::new()
}

/// The defaults `kubectl get -o yaml` shows on a pod spec.
pub fn default_pod_spec(spec: &mut Value) {
    if !spec.is_object() {
        return;
    }
    set_default(spec, "restartPolicy", json!("Always"));
    set_default(spec, "dnsPolicy", json!("ClusterFirst"));
    set_default(spec, "terminationGracePeriodSeconds", json!(30));
    set_default(spec, "schedulerName", json!("default-scheduler"));
    set_default(spec, "securityContext", json!({}));
    let sa = spec
        .get("serviceAccountName")
        .or_else(|| spec.get("serviceAccount"))
        .cloned();
    let sa = sa
        .filter(|s| s.as_str().is_some_and(|s| !s.is_empty()))
        .unwrap_or(json!("default"));
    spec["serviceAccountName"] = sa.clone();
    spec["serviceAccount"] = sa;
    for list in ["containers", "initContainers"] {
        // `get_mut`: indexing would add `initContainers: null` to every pod.
        for c in spec
            .get_mut(list)
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            let image = c["image"].as_str().unwrap_or_default();
            let latest = !image.rsplit('/').next().unwrap_or(image).contains(':')
                || image.ends_with(":latest");
            set_default(
                c,
                "imagePullPolicy",
                json!(if latest { "Always" } else { "IfNotPresent" }),
            );
            set_default(c, "terminationMessagePath", json!("/dev/termination-log"));
            set_default(c, "terminationMessagePolicy", json!("File"));
            set_default(c, "resources", json!({}));
            for p in c["ports"].as_array_mut().into_iter().flatten() {
                set_default(p, "protocol", json!("TCP"));
            }
        }
    }
}

fn default_service(svc: &mut Value, taken: &Allocated) -> Causes {
    let mut causes = Vec::new();
    let spec = &mut svc["spec"];
    set_default(spec, "type", json!("ClusterIP"));
    set_default(spec, "sessionAffinity", json!("None"));
    set_default(spec, "internalTrafficPolicy", json!("Cluster"));
    let kind = spec["type"].as_str().unwrap_or("ClusterIP").to_owned();
    if kind == "ExternalName" {
        return causes;
    }
    match spec.get("clusterIP").and_then(Value::as_str) {
        Some("None") => {}
        Some(ip) if !ip.is_empty() => match ip.parse::<Ipv4Addr>() {
            Ok(addr) if addr.octets()[..2] == SERVICE_NET && !taken.has_ip(addr) => {}
            Ok(addr) if taken.has_ip(addr) => causes.push((
                "spec.clusterIPs".into(),
                format!("Invalid value: []string{{\"{ip}\"}}: failed to allocate IP {ip}: provided IP is already allocated"),
            )),
            _ => causes.push((
                "spec.clusterIPs".into(),
                format!("Invalid value: []string{{\"{ip}\"}}: failed to allocate IP {ip}: the provided IP ({ip}) is not in the valid range. The range of valid IPs is 10.96.0.0/16"),
            )),
        },
        _ => match free_cluster_ip(taken) {
            Some(ip) => spec["clusterIP"] = json!(ip.to_string()),
            None => causes.push(("spec.clusterIPs".into(), "Internal error: range is full".into())),
        },
    }
    let ip = spec["clusterIP"].clone();
    spec["clusterIPs"] = json!([ip]);
    if ip != json!("None") {
        spec["ipFamilies"] = json!(["IPv4"]);
        spec["ipFamilyPolicy"] = json!("SingleStack");
    }
    // Node ports this create allocates (the store's count does not have them yet).
    let mut used_ports = HashSet::new();
    let mut seen = HashSet::new();
    for (i, port) in spec["ports"]
        .as_array_mut()
        .into_iter()
        .flatten()
        .enumerate()
    {
        set_default(port, "protocol", json!("TCP"));
        let Some(number) = port["port"].as_u64().filter(|p| (1..=65535).contains(p)) else {
            causes.push((
                format!("spec.ports[{i}].port"),
                "Invalid value: must be between 1 and 65535, inclusive".into(),
            ));
            continue;
        };
        if !seen.insert((number, port["protocol"].clone())) {
            causes.push((format!("spec.ports[{i}]"), "Duplicate value".into()));
        }
        set_default(port, "targetPort", json!(number));
        if (kind == "NodePort" || kind == "LoadBalancer")
            && port.get("nodePort").is_none_or(Value::is_null)
        {
            match NODE_PORT_RANGE
                .clone()
                .find(|p| !taken.has_node_port(*p) && !used_ports.contains(p))
            {
                Some(p) => {
                    used_ports.insert(p);
                    port["nodePort"] = json!(p);
                }
                None => causes.push((
                    format!("spec.ports[{i}].nodePort"),
                    "Internal error: range is full".into(),
                )),
            }
        }
    }
    if kind == "LoadBalancer" {
        set_default(spec, "allocateLoadBalancerNodePorts", json!(true));
        set_default(spec, "externalTrafficPolicy", json!("Cluster"));
        if svc["status"].get("loadBalancer").is_none() {
            svc["status"] = json!({"loadBalancer": {}});
        }
    }
    causes
}

fn free_cluster_ip(taken: &Allocated) -> Option<Ipv4Addr> {
    // Low addresses stay for fixed ones (kubernetes .0.1, kube-dns .0.10); the search
    // starts after the newest allocation and wraps around.
    const RANGE: std::ops::Range<u32> = 256..65_535;
    let start = taken.next_ip.clamp(RANGE.start, RANGE.end);
    (start..RANGE.end)
        .chain(RANGE.start..start)
        .map(|n| Ipv4Addr::new(10, 96, (n >> 8) as u8, n as u8))
        .find(|ip| !taken.has_ip(*ip))
}

/// What an update may not change; `old` and `new` are whole objects.
pub fn immutable_changes(rt: &ResourceType, old: &Value, new: &Value) -> Causes {
    let mut causes = Vec::new();
    let mut same = |path: &str, a: &Value, b: &Value, msg: &str| {
        if a != b {
            causes.push((path.to_owned(), msg.to_owned()));
        }
    };
    match (rt.group.as_str(), rt.plural.as_str()) {
        ("", "services") => {
            let (a, b) = (&old["spec"]["clusterIP"], &new["spec"]["clusterIP"]);
            // An update without clusterIP (a freshly built object) is refused like any change.
            same(
                "spec.clusterIPs[0]",
                a,
                b,
                "Invalid value: field is immutable",
            );
        }
        ("apps", _) => {
            same(
                "spec.selector",
                &old["spec"]["selector"],
                &new["spec"]["selector"],
                "Invalid value: field is immutable",
            );
        }
        ("", "pods") => {
            let strip = |v: &Value| {
                let mut s = v["spec"].clone();
                for c in s["containers"].as_array_mut().into_iter().flatten() {
                    c.as_object_mut().map(|m| m.remove("image"));
                }
                for k in [
                    "activeDeadlineSeconds",
                    "tolerations",
                    "terminationGracePeriodSeconds",
                ] {
                    s.as_object_mut().map(|m| m.remove(k));
                }
                s
            };
            same(
                "spec",
                &strip(old),
                &strip(new),
                "Forbidden: pod updates may not change fields other than `spec.containers[*].image`, `spec.initContainers[*].image`, `spec.activeDeadlineSeconds`, `spec.tolerations` (only additions to existing tolerations), `spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)",
            );
        }
        _ => {}
    }
    causes
}

/// Fields an ephemeral container may not set (Kubernetes `validateEphemeralContainers`:
/// everything about scheduling, serving and restarting — ephemeral containers have no
/// ports, probes, lifecycle hooks or resources, and are never restarted).
const EPHEMERAL_FORBIDDEN: &[&str] = &[
    "ports",
    "livenessProbe",
    "readinessProbe",
    "startupProbe",
    "lifecycle",
    "resources",
    "resizePolicy",
    "restartPolicy",
];

/// The defaults the API server gives an ephemeral container (those of any container but
/// `resources`, which stays empty: the Go struct is not a pointer, so it reads `{}`).
pub fn default_ephemeral_containers(spec: &mut Value) {
    // `get_mut`: indexing would add the key as null to a spec without it.
    for c in spec
        .get_mut("ephemeralContainers")
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
    {
        let image = c["image"].as_str().unwrap_or_default();
        let latest =
            !image.rsplit('/').next().unwrap_or(image).contains(':') || image.ends_with(":latest");
        set_default(
            c,
            "imagePullPolicy",
            json!(if latest { "Always" } else { "IfNotPresent" }),
        );
        set_default(c, "terminationMessagePath", json!("/dev/termination-log"));
        set_default(c, "terminationMessagePolicy", json!("File"));
        set_default(c, "resources", json!({}));
    }
}

/// What a write through `pods/<name>/ephemeralcontainers` may not do, after Kubernetes'
/// `ValidatePodEphemeralContainersUpdate`: existing ephemeral containers may be neither
/// removed nor changed (they run once and stay in the spec for the pod's life), and each new
/// one needs a name unique among all the pod's containers, an image, no field of
/// [`EPHEMERAL_FORBIDDEN`], a `targetContainerName` naming one of the pod's containers, and
/// volume mounts of the pod's volumes.
pub fn ephemeral_container_changes(old: &Value, new: &Value) -> Causes {
    let mut causes = Vec::new();
    let list = |pod: &Value, field: &str| -> Vec<Value> {
        pod["spec"][field].as_array().cloned().unwrap_or_default()
    };
    let (before, after) = (
        list(old, "ephemeralContainers"),
        list(new, "ephemeralContainers"),
    );
    let path = "spec.ephemeralContainers";
    for existing in &before {
        let name = existing["name"].as_str().unwrap_or_default();
        match after.iter().find(|c| c["name"] == existing["name"]) {
            None => causes.push((
                path.to_owned(),
                format!("Forbidden: existing ephemeral containers \"{name}\" may not be removed\n"),
            )),
            Some(now) if now != existing => causes.push((
                format!("{path}[{name}]"),
                format!("Forbidden: existing ephemeral containers \"{name}\" may not be changed\n"),
            )),
            Some(_) => {}
        }
    }
    let regular: Vec<Value> = [list(old, "containers"), list(old, "initContainers")].concat();
    let volumes: HashSet<String> = list(old, "volumes")
        .iter()
        .filter_map(|v| v["name"].as_str().map(str::to_owned))
        .collect();
    let mut names: HashSet<String> = regular
        .iter()
        .filter_map(|c| c["name"].as_str().map(str::to_owned))
        .collect();
    for (i, c) in after.iter().enumerate() {
        let at = format!("{path}[{i}]");
        let name = c["name"].as_str().unwrap_or_default();
        if name.is_empty() {
            causes.push((format!("{at}.name"), "Required value".into()));
        } else if !names.insert(name.to_owned()) {
            causes.push((format!("{at}.name"), format!("Duplicate value: \"{name}\"")));
        }
        if before.iter().any(|b| b["name"] == c["name"]) {
            continue;
        }
        if c["image"].as_str().is_none_or(str::is_empty) {
            causes.push((format!("{at}.image"), "Required value".into()));
        }
        for field in EPHEMERAL_FORBIDDEN {
            let set = match c.get(*field) {
                None | Some(Value::Null) => false,
                Some(Value::Object(m)) => !m.is_empty(),
                Some(Value::Array(a)) => !a.is_empty(),
                Some(_) => true,
            };
            if set {
                causes.push((
                    format!("{at}.{field}"),
                    "Forbidden: cannot be set for an Ephemeral Container".into(),
                ));
            }
        }
        if let Some(target) = c["targetContainerName"].as_str().filter(|t| !t.is_empty())
            && !regular.iter().any(|r| r["name"] == target)
        {
            causes.push((
                format!("{at}.targetContainerName"),
                format!("Not found: \"{target}\""),
            ));
        }
        for (j, m) in c["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let volume = m["name"].as_str().unwrap_or_default();
            if !volumes.contains(volume) {
                causes.push((
                    format!("{at}.volumeMounts[{j}].name"),
                    format!("Not found: \"{volume}\""),
                ));
            }
            if m["subPath"].as_str().is_some_and(|s| !s.is_empty()) {
                causes.push((
                    format!("{at}.volumeMounts[{j}].subPath"),
                    "Forbidden: cannot be set for an Ephemeral Container".into(),
                ));
            }
        }
    }
    causes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::resources::Registry;

    fn rt(group: &str, plural: &str) -> ResourceType {
        Registry::default().find(group, "v1", plural).unwrap()
    }

    #[test]
    fn names() {
        assert!(validate_name(&rt("", "pods"), "web-1.x").is_none());
        assert!(validate_name(&rt("", "pods"), "Web").is_some());
        assert!(validate_name(&rt("", "services"), "a.b").is_some());
        assert!(validate_name(&rt("", "services"), "1abc").is_some());
        assert!(validate_name(&rt("", "namespaces"), &"a".repeat(64)).is_some());
    }

    #[test]
    fn service_gets_ip_ports_and_refuses_taken_ip() {
        let mut taken = Allocated::default();
        let mut svc = json!({"spec": {"selector": {"app": "a"}, "ports": [{"port": 80}]}});
        assert!(default_on_create(&rt("", "services"), &mut svc, &taken).is_empty());
        let ip: Ipv4Addr = svc["spec"]["clusterIP"].as_str().unwrap().parse().unwrap();
        assert_eq!(ip.octets()[..2], SERVICE_NET);
        assert_eq!(
            svc["spec"]["ports"][0],
            json!({"port": 80, "protocol": "TCP", "targetPort": 80})
        );
        taken.add(&svc);
        let mut clash = json!({"spec": {"clusterIP": ip.to_string(), "ports": [{"port": 1}]}});
        let causes = default_on_create(&rt("", "services"), &mut clash, &taken);
        assert!(causes[0].1.contains("already allocated"), "{causes:?}");
        let mut lb = json!({"spec": {"type": "LoadBalancer", "ports": [{"port": 80}]}});
        default_on_create(&rt("", "services"), &mut lb, &taken);
        assert_eq!(lb["spec"]["ports"][0]["nodePort"], 30000);
    }

    #[test]
    fn allocations_follow_adds_and_removes() {
        let svc = |ip: &str, node_port: u16| json!({"spec": {"clusterIP": ip, "ports": [{"port": 80, "nodePort": node_port}]}});
        let mut taken = Allocated::default();
        let (a, b) = (svc("10.96.1.0", 30000), svc("10.96.1.1", 30000));
        taken.add(&a);
        taken.add(&b);
        // The next free address follows the newest one, not the range's first free one.
        let mut next = json!({"spec": {"ports": [{"port": 80}]}});
        default_on_create(&rt("", "services"), &mut next, &taken);
        assert_eq!(next["spec"]["clusterIP"], "10.96.1.2");
        // Two Services named node port 30000: it stays taken until both are gone.
        taken.remove(&a);
        assert!(!taken.has_ip("10.96.1.0".parse().unwrap()));
        assert!(taken.has_node_port(30000));
        taken.remove(&b);
        assert!(!taken.has_node_port(30000));
        // At the range's end the search wraps to its start.
        taken.add(&svc("10.96.255.254", 30001));
        let mut wrapped = json!({"spec": {"ports": [{"port": 80}]}});
        default_on_create(&rt("", "services"), &mut wrapped, &taken);
        assert_eq!(wrapped["spec"]["clusterIP"], "10.96.1.0");
    }

    #[test]
    fn deployment_defaults_and_selector_check() {
        let mut d = json!({"spec": {"selector": {"matchLabels": {"app": "a"}},
            "template": {"metadata": {"labels": {"app": "a"}}, "spec": {"containers": [{"name": "c", "image": "x:1"}]}}}});
        assert!(
            default_on_create(&rt("apps", "deployments"), &mut d, &Allocated::default()).is_empty()
        );
        assert_eq!(d["spec"]["replicas"], 1);
        assert_eq!(
            d["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"],
            "IfNotPresent"
        );
        d["spec"]["template"]["metadata"]["labels"]["app"] = json!("b");
        let causes = default_on_create(&rt("apps", "deployments"), &mut d, &Allocated::default());
        assert_eq!(causes[0].0, "spec.template.metadata.labels");
    }

    #[test]
    fn ephemeral_containers_are_added_only() {
        let pod = json!({"spec": {
            "containers": [{"name": "app", "image": "nginx"}],
            "volumes": [{"name": "data"}],
            "ephemeralContainers": [{"name": "dbg", "image": "busybox"}],
        }});
        let mut added = pod.clone();
        added["spec"]["ephemeralContainers"]
            .as_array_mut()
            .unwrap()
            .push(
                json!({"name": "kt-exchange", "image": "x", "targetContainerName": "app",
                         "volumeMounts": [{"name": "data", "mountPath": "/d"}]}),
            );
        assert!(ephemeral_container_changes(&pod, &added).is_empty());
        let mut removed = pod.clone();
        removed["spec"]["ephemeralContainers"] = json!([]);
        assert_eq!(
            ephemeral_container_changes(&pod, &removed),
            vec![(
                "spec.ephemeralContainers".to_owned(),
                "Forbidden: existing ephemeral containers \"dbg\" may not be removed\n".to_owned()
            )]
        );
        let mut changed = pod.clone();
        changed["spec"]["ephemeralContainers"][0]["image"] = json!("alpine");
        assert_eq!(
            ephemeral_container_changes(&pod, &changed)[0].0,
            "spec.ephemeralContainers[dbg]"
        );
        let mut bad = pod.clone();
        bad["spec"]["ephemeralContainers"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": "app", "ports": [{"containerPort": 80}], "resources": {},
                         "targetContainerName": "nosuch", "volumeMounts": [{"name": "v", "mountPath": "/v"}]}));
        let fields: Vec<String> = ephemeral_container_changes(&pod, &bad)
            .into_iter()
            .map(|(f, _)| f)
            .collect();
        assert_eq!(
            fields,
            [
                "spec.ephemeralContainers[1].name",
                "spec.ephemeralContainers[1].image",
                "spec.ephemeralContainers[1].ports",
                "spec.ephemeralContainers[1].targetContainerName",
                "spec.ephemeralContainers[1].volumeMounts[0].name",
            ]
        );
    }

    #[test]
    fn immutable_cluster_ip_and_pod_spec() {
        let old = json!({"spec": {"clusterIP": "10.96.1.1"}});
        let new = json!({"spec": {}});
        assert_eq!(immutable_changes(&rt("", "services"), &old, &new).len(), 1);
        let pod = json!({"spec": {"containers": [{"name": "c", "image": "a"}], "nodeName": "n"}});
        let mut img = pod.clone();
        img["spec"]["containers"][0]["image"] = json!("b");
        assert!(immutable_changes(&rt("", "pods"), &pod, &img).is_empty());
        let mut moved = pod.clone();
        moved["spec"]["nodeName"] = json!("m");
        assert_eq!(immutable_changes(&rt("", "pods"), &pod, &moved).len(), 1);
    }

    #[test]
    fn label_validation() {
        assert!(
            validate_labels(
                &json!({"metadata": {"labels": {"app.kubernetes.io/name": "a-b", "x": ""}}})
            )
            .is_empty()
        );
        assert_eq!(
            validate_labels(&json!({"metadata": {"labels": {"bad key": "v", "k": "-v"}}})).len(),
            2
        );
    }
}
