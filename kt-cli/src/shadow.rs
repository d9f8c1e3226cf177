//! The shadow pod a session talks to, as ktctl v0.3.7 makes it: a ConfigMap named after
//! the pod with the session's public key (`authorized`) and private key (`privateKey`), and
//! the pod `standalone` mounting the key at `/root/authorized`, labelled `control-by: kt`,
//! `kt-role`, annotated with the heartbeat and the local user. Deleted when the session
//! ends; while it lives, its heartbeat is renewed every two minutes.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kt_proto::k8s;
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};

use crate::{args::GlobalOptions, session::Session};

#[derive(Debug, thiserror::Error)]
pub enum ShadowError {
    #[error("failed to create {kind} {name} in namespace {namespace}")]
    Create {
        kind: &'static str,
        name: String,
        namespace: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error("shadow pod {name} is not running after {seconds} s ({reason})")]
    NotReady {
        name: String,
        seconds: u32,
        reason: String,
    },
    #[error("failed to read shadow pod {name}")]
    Read {
        name: String,
        #[source]
        source: Box<kube::Error>,
    },
}

/// What goes into a shadow pod.
#[derive(Clone, Debug)]
pub struct ShadowSpec {
    pub name: String,
    pub namespace: String,
    pub role: &'static str,
    pub image: String,
    pub force_update: bool,
    pub service_account: String,
    pub node_selector: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub env: Vec<(String, String)>,
    pub image_pull_secret: String,
    /// Container ports besides SSH (name, port): an exchange shadow declares the Service's
    /// target ports, so that a named targetPort resolves to it.
    pub ports: Vec<(String, u16)>,
}

/// `k1=v1,k2=v2` (ktctl's map flags); malformed pairs are named in the error.
pub fn parse_pairs(flag: &str, text: &str) -> Result<BTreeMap<String, String>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
            _ => Err(format!("invalid {flag} '{pair}', should be key=value")),
        })
        .collect()
}

impl ShadowSpec {
    pub fn new(
        global: &GlobalOptions,
        name: String,
        namespace: String,
        role: &'static str,
    ) -> Result<Self, String> {
        let mut labels = parse_pairs("--withLabel", &global.with_label)?;
        labels.insert(k8s::CONTROL_BY.into(), k8s::CONTROL_BY_KT.into());
        labels.insert(k8s::ROLE.into(), role.into());
        let mut annotations = parse_pairs("--withAnnotation", &global.with_annotation)?;
        annotations.insert(k8s::LAST_HEARTBEAT.into(), now_seconds().to_string());
        annotations.insert(k8s::USER.into(), local_user());
        Ok(Self {
            name,
            namespace,
            role,
            image: global.image.clone(),
            force_update: global.force_update,
            service_account: global.service_account.clone(),
            node_selector: parse_pairs("--nodeSelector", &global.node_selector)?,
            labels,
            annotations,
            env: Vec::new(),
            image_pull_secret: global.image_pull_secret.clone(),
            ports: Vec::new(),
        })
    }

    pub fn config_map(&self, public_key: &str, private_key: &str) -> Value {
        json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": self.name, "namespace": self.namespace, "labels": self.labels, "annotations": self.annotations},
            "data": {k8s::AUTHORIZED_KEY: public_key, k8s::PRIVATE_KEY: private_key},
        })
    }

    pub fn pod(&self) -> Value {
        let ports: Vec<Value> = std::iter::once(("ssh", k8s::SSH_PORT))
            .chain(self.ports.iter().map(|(name, port)| (name.as_str(), *port)))
            .map(|(name, port)| json!({"name": name, "containerPort": port, "protocol": "TCP"}))
            .collect();
        let mut spec = json!({
            "containers": [{
                "name": k8s::CONTAINER,
                "image": self.image,
                "imagePullPolicy": if self.force_update { "Always" } else { "IfNotPresent" },
                "env": self.env.iter().map(|(k, v)| json!({"name": k, "value": v})).collect::<Vec<_>>(),
                "ports": ports,
                "securityContext": {"capabilities": {"add": ["AUDIT_WRITE"]}},
                "volumeMounts": [{"name": k8s::SSH_VOLUME, "mountPath": k8s::SSH_MOUNT}],
            }],
            "volumes": [{"name": k8s::SSH_VOLUME, "configMap": {"name": self.name,
                         "items": [{"key": k8s::AUTHORIZED_KEY, "path": k8s::SSH_AUTHORIZED_FILE}]}}],
            "serviceAccountName": self.service_account,
        });
        if !self.node_selector.is_empty() {
            spec["nodeSelector"] = json!(self.node_selector);
        }
        if !self.image_pull_secret.is_empty() {
            spec["imagePullSecrets"] = json!([{"name": self.image_pull_secret}]);
        }
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": self.name, "namespace": self.namespace, "labels": self.labels, "annotations": self.annotations},
            "spec": spec,
        })
    }
}

fn now_seconds() -> i64 {
    chrono::Utc::now().timestamp()
}

/// `kt-user`: the user who ran ktctl (`SUDO_USER` when run with sudo).
pub fn local_user() -> String {
    std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| "unknown".into())
}

/// Creates the ConfigMap and the pod, registers their deletion, waits for Running.
pub async fn deploy(
    client: &kube::Client,
    session: &Arc<Session>,
    spec: &ShadowSpec,
    public_key: &str,
    private_key: &str,
    timeout_secs: u32,
) -> Result<(), ShadowError> {
    let (ns, name) = (spec.namespace.clone(), spec.name.clone());
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let cm: ConfigMap =
        serde_json::from_value(spec.config_map(public_key, private_key)).expect("valid ConfigMap");
    cms.create(&PostParams::default(), &cm)
        .await
        .map_err(|source| ShadowError::Create {
            kind: "configmap",
            name: name.clone(),
            namespace: ns.clone(),
            source: Box::new(source),
        })?;
    tracing::info!("Successful create config map {name}");
    {
        let (cms, name) = (cms.clone(), name.clone());
        session.defer(format!("delete configmap {name}"), async move {
            if cms.delete(&name, &DeleteParams::default()).await.is_ok() {
                tracing::info!("Cleaning configmap {name}");
            }
        });
    }
    tracing::info!("Deploying shadow pod {name} in namespace {ns}");
    let pod: Pod = serde_json::from_value(spec.pod()).expect("valid Pod");
    pods.create(&PostParams::default(), &pod)
        .await
        .map_err(|source| ShadowError::Create {
            kind: "pod",
            name: name.clone(),
            namespace: ns.clone(),
            source: Box::new(source),
        })?;
    {
        let (pods, name) = (pods.clone(), name.clone());
        session.defer(format!("delete shadow pod {name}"), async move {
            if pods.delete(&name, &DeleteParams::default()).await.is_ok() {
                tracing::info!("Cleaning shadow pod {name}");
            }
        });
    }
    wait_running(&pods, &name, timeout_secs).await?;
    tokio::spawn(heartbeat(pods, cms, name, session.stop.clone()));
    Ok(())
}

async fn wait_running(pods: &Api<Pod>, name: &str, timeout_secs: u32) -> Result<(), ShadowError> {
    let started = tokio::time::Instant::now();
    let mut next_progress = started;
    loop {
        let pod = pods.get(name).await.map_err(|source| ShadowError::Read {
            name: name.into(),
            source: Box::new(source),
        })?;
        let status = pod.status.unwrap_or_default();
        if status.phase.as_deref() == Some("Running") && status.pod_ip.is_some() {
            tracing::info!("Pod {name} is ready");
            return Ok(());
        }
        let waiting = status
            .container_statuses
            .unwrap_or_default()
            .into_iter()
            .find_map(|c| c.state?.waiting?.reason)
            .unwrap_or_else(|| status.phase.unwrap_or_else(|| "Pending".into()));
        if started.elapsed() >= Duration::from_secs(u64::from(timeout_secs)) {
            return Err(ShadowError::NotReady {
                name: name.into(),
                seconds: timeout_secs,
                reason: waiting,
            });
        }
        if tokio::time::Instant::now() >= next_progress {
            tracing::info!("Waiting for pod {name} ... ({waiting})");
            next_progress += Duration::from_secs(6);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Renews `kt-last-heart-beat` on the pod and ConfigMap every two minutes (v0.3.7's
/// JSON patch), so that `ktctl clean` of any version sees the session alive.
async fn heartbeat(
    pods: Api<Pod>,
    cms: Api<ConfigMap>,
    name: String,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut failed_once = false;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(120) - Duration::from_millis(rand::random_range(0..10_000))) => {}
        }
        let ops: json_patch::Patch = serde_json::from_value(json!([{"op": "replace", "path": format!("/metadata/annotations/{}", k8s::LAST_HEARTBEAT), "value": now_seconds().to_string()}])).expect("valid patch");
        let pod = pods
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::<()>::Json(ops.clone()),
            )
            .await;
        let cm = cms
            .patch(&name, &PatchParams::default(), &Patch::<()>::Json(ops))
            .await;
        if (pod.is_err() || cm.is_err()) && !failed_once {
            failed_once = true;
            tracing::warn!("Failed to update heart beat of pod {name}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ShadowSpec {
        let global = <crate::args::Cli as clap::Parser>::try_parse_from([
            "ktctl",
            "-l",
            "team=a",
            "--nodeSelector",
            "zone=b",
        ])
        .unwrap()
        .global;
        ShadowSpec::new(
            &global,
            "kt-connect-shadow-abcde".into(),
            "dev".into(),
            k8s::ROLE_SHADOW_CONNECT,
        )
        .unwrap()
    }

    #[test]
    fn shadow_pod_follows_the_v0_3_7_contract() {
        let pod = spec().pod();
        assert_eq!(
            pod["metadata"]["labels"],
            json!({"control-by": "kt", "kt-role": "shadow-connect", "team": "a"})
        );
        assert!(
            pod["metadata"]["annotations"]["kt-last-heart-beat"]
                .as_str()
                .unwrap()
                .parse::<i64>()
                .is_ok()
        );
        let c = &pod["spec"]["containers"][0];
        assert_eq!(c["name"], "standalone");
        assert_eq!(
            c["volumeMounts"][0],
            json!({"name": "ssh-public-key", "mountPath": "/root/authorized"})
        );
        assert_eq!(
            pod["spec"]["volumes"][0]["configMap"]["items"][0],
            json!({"key": "authorized", "path": "authorized_keys"})
        );
        assert_eq!(pod["spec"]["nodeSelector"], json!({"zone": "b"}));
        assert_eq!(c["imagePullPolicy"], "IfNotPresent");
        let cm = spec().config_map("ssh-ed25519 AAAA", "PEM");
        assert_eq!(
            cm["data"],
            json!({"authorized": "ssh-ed25519 AAAA", "privateKey": "PEM"})
        );
    }

    #[test]
    fn pair_flags() {
        assert_eq!(parse_pairs("-l", "a=1, b=2").unwrap().len(), 2);
        assert!(parse_pairs("-l", "a").unwrap_err().contains("'a'"));
    }
}
