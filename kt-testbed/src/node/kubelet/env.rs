//! A container's environment: the image's `PATH`, the kubelet's own variables (`HOSTNAME`,
//! `KUBERNETES_SERVICE_*`), then `envFrom` ConfigMaps and Secrets, then `env` with values,
//! the downward API and ConfigMap or Secret keys; later entries win.

use std::net::Ipv4Addr;

use base64::Engine as _;
use serde_json::Value;

use super::{KUBERNETES_SERVICE, Kubelets};
use crate::topology;

/// `(name, value)` pairs in the order a process gets them.
type Env = Vec<(String, String)>;

impl Kubelets {
    /// The environment of `container` in `pod`, whose image sets `PATH` to `path`.
    pub(super) fn env(
        &self,
        pod: &Value,
        container: &Value,
        pod_ip: Ipv4Addr,
        hostname: &str,
        path: &str,
    ) -> Env {
        let (ns, _) = crate::controllers::ns_name(pod);
        let mut env = base_env(hostname, path);
        for from in container["envFrom"].as_array().into_iter().flatten() {
            env.extend(self.env_from(ns, from));
        }
        for e in container["env"].as_array().into_iter().flatten() {
            let name = e["name"].as_str().unwrap_or_default().to_owned();
            let value = self.env_value(pod, ns, e, pod_ip);
            env.retain(|(k, _)| *k != name);
            env.push((name, value.unwrap_or_default()));
        }
        env
    }

    /// Every key of the ConfigMap or Secret an `envFrom` entry names, with its prefix.
    fn env_from(&self, ns: &str, from: &Value) -> Env {
        let (plural, name, decode) = match (
            from["configMapRef"]["name"].as_str(),
            from["secretRef"]["name"].as_str(),
        ) {
            (Some(n), _) => ("configmaps", n, false),
            (_, Some(n)) => ("secrets", n, true),
            _ => return Vec::new(),
        };
        let rt = self
            .store
            .registry
            .find("", "v1", plural)
            .expect("built-in");
        let keys = self
            .store
            .get(&rt, ns, name)
            .ok()
            .and_then(|o| {
                o["data"]
                    .as_object()
                    .map(|m| m.keys().cloned().collect::<Vec<_>>())
            })
            .unwrap_or_default();
        let prefix = from["prefix"].as_str().unwrap_or_default();
        keys.into_iter()
            .filter_map(|key| {
                let value = self.data_key(ns, plural, name, &key, decode)?;
                Some((format!("{prefix}{key}"), value))
            })
            .collect()
    }

    /// The value of one `env` entry: literal, downward API, or a ConfigMap or Secret key.
    fn env_value(&self, pod: &Value, ns: &str, e: &Value, pod_ip: Ipv4Addr) -> Option<String> {
        let key_ref = |r: &serde_json::Map<String, Value>, plural: &str, decode: bool| {
            self.data_key(
                ns,
                plural,
                r["name"].as_str().unwrap_or_default(),
                r["key"].as_str().unwrap_or_default(),
                decode,
            )
        };
        if let Some(v) = e["value"].as_str() {
            Some(v.to_owned())
        } else if let Some(path) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            Some(field_ref(pod, path, pod_ip))
        } else if let Some(r) = e["valueFrom"]["configMapKeyRef"].as_object() {
            key_ref(r, "configmaps", false)
        } else if let Some(r) = e["valueFrom"]["secretKeyRef"].as_object() {
            key_ref(r, "secrets", true)
        } else {
            Some(String::new())
        }
    }

    /// `data[key]` of a ConfigMap or Secret (base64-decoded for a Secret), if present.
    fn data_key(
        &self,
        ns: &str,
        plural: &str,
        name: &str,
        key: &str,
        decode: bool,
    ) -> Option<String> {
        let rt = self.store.registry.find("", "v1", plural)?;
        let raw = self.store.get(&rt, ns, name).ok()?["data"][key]
            .as_str()?
            .to_owned();
        if decode {
            String::from_utf8(base64::engine::general_purpose::STANDARD.decode(raw).ok()?).ok()
        } else {
            Some(raw)
        }
    }
}

/// What every container gets before its own variables: the image's `PATH`, then the
/// kubelet's.
fn base_env(hostname: &str, path: &str) -> Env {
    vec![
        ("PATH".to_owned(), path.to_owned()),
        ("HOSTNAME".to_owned(), hostname.to_owned()),
        ("HOME".to_owned(), "/root".to_owned()),
        (
            "KUBERNETES_SERVICE_HOST".to_owned(),
            KUBERNETES_SERVICE.to_string(),
        ),
        ("KUBERNETES_SERVICE_PORT".to_owned(), "443".to_owned()),
        ("KUBERNETES_SERVICE_PORT_HTTPS".to_owned(), "443".to_owned()),
        (
            "KUBERNETES_PORT".to_owned(),
            format!("tcp://{KUBERNETES_SERVICE}:443"),
        ),
    ]
}

/// The downward API: a `fieldRef` path's value for this pod.
pub(super) fn field_ref(pod: &Value, path: &str, pod_ip: Ipv4Addr) -> String {
    match path {
        "status.podIP" => pod_ip.to_string(),
        "metadata.name" => pod["metadata"]["name"].as_str().unwrap_or_default().into(),
        "metadata.namespace" => pod["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .into(),
        "metadata.uid" => pod["metadata"]["uid"].as_str().unwrap_or_default().into(),
        "spec.nodeName" => pod["spec"]["nodeName"].as_str().unwrap_or_default().into(),
        "spec.serviceAccountName" => pod["spec"]["serviceAccountName"]
            .as_str()
            .unwrap_or_default()
            .into(),
        "status.hostIP" => {
            let index = pod["spec"]["nodeName"]
                .as_str()
                .and_then(|n| n.strip_prefix("node-"))
                .and_then(|i| i.parse().ok())
                .unwrap_or(1);
            topology::node_ip(index).to_string()
        }
        other => {
            // metadata.labels['x'] / metadata.annotations['x']
            let (field, key) = other
                .split_once("['")
                .map(|(f, k)| (f, k.trim_end_matches("']")))
                .unwrap_or((other, ""));
            match field {
                "metadata.labels" => pod["metadata"]["labels"][key]
                    .as_str()
                    .unwrap_or_default()
                    .into(),
                "metadata.annotations" => pod["metadata"]["annotations"][key]
                    .as_str()
                    .unwrap_or_default()
                    .into(),
                _ => String::new(),
            }
        }
    }
}
