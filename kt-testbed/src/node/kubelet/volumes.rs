//! A pod's volumes, materialised under its state directory (configMap, secret, downwardAPI,
//! emptyDir; hostPath is the machine's own directory; a persistentVolumeClaim a directory of
//! the testbed's that outlives pods), the service-account token, and the bind mounts each
//! container gets.

use std::{
    collections::HashMap,
    io,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use base64::Engine as _;
use serde_json::Value;

use super::{Kubelets, SA_DIR, env::field_ref};
use crate::{api::auth::UserInfo, node::runner::BindMount};

/// The key under which the service-account directory is kept among the volumes.
const SERVICE_ACCOUNT: &str = "__serviceaccount";

/// Volume name → the directory (or file tree) that backs it.
pub(super) type Volumes = HashMap<String, PathBuf>;

impl Kubelets {
    /// Materialises the pod's volumes under `dir`, and its service-account token unless
    /// `automountServiceAccountToken` is false.
    pub(super) fn volumes(&self, pod: &Value, dir: &Path, pod_ip: Ipv4Addr) -> io::Result<Volumes> {
        let (ns, _) = crate::controllers::ns_name(pod);
        let mut out = HashMap::new();
        for v in pod["spec"]["volumes"].as_array().into_iter().flatten() {
            let name = v["name"].as_str().unwrap_or_default();
            let path = self.volume(pod, ns, v, &dir.join("volumes").join(name), pod_ip)?;
            out.insert(name.to_owned(), path);
        }
        if pod["spec"]["automountServiceAccountToken"] != false {
            out.insert(
                SERVICE_ACCOUNT.into(),
                self.service_account(pod, ns, &dir.join("serviceaccount"))?,
            );
        }
        Ok(out)
    }

    /// One volume, written at `target` unless it is a hostPath; the path that backs it.
    fn volume(
        &self,
        pod: &Value,
        ns: &str,
        v: &Value,
        target: &Path,
        pod_ip: Ipv4Addr,
    ) -> io::Result<PathBuf> {
        // configMap and secret volumes: keys (or the listed items) as files.
        let source = match (
            v["configMap"]["name"].as_str(),
            v["secret"]["secretName"].as_str(),
        ) {
            (Some(cm), _) => Some(("configmaps", cm, &v["configMap"]["items"], false)),
            (_, Some(secret)) => Some(("secrets", secret, &v["secret"]["items"], true)),
            _ => None,
        };
        if let Some((plural, name, items, decode)) = source {
            let obj = self
                .store
                .registry
                .find("", "v1", plural)
                .and_then(|rt| self.store.get(&rt, ns, name).ok())
                .unwrap_or(Value::Null);
            write_items(
                target,
                obj["data"].as_object().unwrap_or(&Default::default()),
                items,
                decode,
            )?;
        } else if let Some(items) = v["downwardAPI"]["items"].as_array() {
            std::fs::create_dir_all(target)?;
            for item in items {
                let value = field_ref(
                    pod,
                    item["fieldRef"]["fieldPath"].as_str().unwrap_or_default(),
                    pod_ip,
                );
                std::fs::write(target.join(item["path"].as_str().unwrap_or("value")), value)?;
            }
        } else if let Some(path) = v["hostPath"]["path"].as_str() {
            // The node's own directory: pods share this machine's file system.
            return Ok(PathBuf::from(path));
        } else if let Some(claim) = v["persistentVolumeClaim"]["claimName"].as_str() {
            // A claim is a directory of the testbed that outlives the pod (a StatefulSet's
            // pod finds its data again).
            let dir = self.state_dir.join("claims").join(ns).join(claim);
            std::fs::create_dir_all(&dir)?;
            return Ok(dir);
        } else {
            // emptyDir and anything else: an empty directory.
            std::fs::create_dir_all(target)?;
        }
        Ok(target.to_owned())
    }

    /// `token`, `ca.crt` and `namespace` of the pod's service account, in `target`.
    fn service_account(&self, pod: &Value, ns: &str, target: &Path) -> io::Result<PathBuf> {
        let sa = pod["spec"]["serviceAccountName"]
            .as_str()
            .unwrap_or("default");
        std::fs::create_dir_all(target)?;
        std::fs::write(
            target.join("token"),
            self.tokens.issue(UserInfo::service_account(ns, sa)),
        )?;
        std::fs::write(target.join("ca.crt"), &self.ca_pem)?;
        std::fs::write(target.join("namespace"), ns)?;
        Ok(target.to_owned())
    }
}

/// Writes the `data` keys of a ConfigMap or Secret (only the listed `items`, at their
/// paths, when given) as files under `target`; Secret values are base64-decoded.
fn write_items(
    target: &Path,
    data: &serde_json::Map<String, Value>,
    items: &Value,
    decode: bool,
) -> io::Result<()> {
    std::fs::create_dir_all(target)?;
    let pairs: Vec<(String, String)> = match items.as_array() {
        Some(items) => items
            .iter()
            .filter_map(|i| {
                Some((
                    i["key"].as_str()?.to_owned(),
                    i["path"].as_str()?.to_owned(),
                ))
            })
            .collect(),
        None => data.keys().map(|k| (k.clone(), k.clone())).collect(),
    };
    for (key, path) in pairs {
        let Some(value) = data.get(&key).and_then(Value::as_str) else {
            continue;
        };
        let bytes = if decode {
            base64::engine::general_purpose::STANDARD
                .decode(value)
                .unwrap_or_default()
        } else {
            value.as_bytes().to_vec()
        };
        let file = target.join(&path);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(file, bytes)?;
    }
    Ok(())
}

/// What a container sees mounted: the pod's name-resolution files, the service-account
/// directory (read-only) and its `volumeMounts` (with `subPath`).
pub(super) fn container_mounts(dir: &Path, volumes: &Volumes, container: &Value) -> Vec<BindMount> {
    let mut mounts: Vec<BindMount> = ["resolv.conf", "hosts", "hostname"]
        .into_iter()
        .map(|file| BindMount {
            source: dir.join(file),
            target: Path::new("/etc").join(file),
            read_only: false,
        })
        .collect();
    if let Some(sa) = volumes.get(SERVICE_ACCOUNT) {
        mounts.push(BindMount {
            source: sa.clone(),
            target: SA_DIR.into(),
            read_only: true,
        });
    }
    for m in container["volumeMounts"].as_array().into_iter().flatten() {
        let Some(source) = m["name"].as_str().and_then(|n| volumes.get(n)) else {
            continue;
        };
        let source = match m["subPath"].as_str() {
            Some(sub) if !sub.is_empty() => source.join(sub),
            _ => source.clone(),
        };
        mounts.push(BindMount {
            source,
            target: m["mountPath"].as_str().unwrap_or("/mnt").into(),
            read_only: m["readOnly"] == true,
        });
    }
    mounts
}
