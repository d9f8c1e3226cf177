//! The shadow pod a session talks to when no agent does the work, as ktctl v0.3.7 makes it
//! (`../shared/reference/ktctl-v0.3.7.md` §2.3): a ConfigMap named after the pod with the
//! session's public key (`authorized`) and private key (`privateKey`), and the pod with one
//! container `standalone` mounting the key at `/root/authorized`, labelled `control-by: kt`
//! and `kt-role`, annotated with the heartbeat and the local user. Deleted when the run ends
//! — a shared one (`connect --shareShadow`) when its last user leaves, counted by
//! `kt-ref-count` — and while it lives, its heartbeat is renewed every two minutes.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, KeyToPath,
    LocalObjectReference, Pod, PodSpec, ResourceRequirements, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::{
    api::{
        apps::v1::{Deployment, DeploymentSpec},
        core::v1::PodTemplateSpec,
    },
    apimachinery::pkg::{api::resource::Quantity, apis::meta::v1::LabelSelector},
};
use kt_proto::compat;
use kube::{
    Api,
    api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams, Preconditions},
    runtime::wait::await_condition,
};

use crate::{
    cluster::{Cluster, heartbeat},
    lifecycle::Lifecycle,
    progress::Progress,
    settings::ShadowSettings,
};

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
    #[error("pod {name} is not running after {seconds} s ({reason})")]
    NotReady {
        name: String,
        seconds: u64,
        reason: String,
    },
    #[error("failed to {what}")]
    Api {
        what: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error("configmap {0} of the shared shadow holds no private key")]
    NoKey(String),
    #[error("failed to watch shadow pod {name}")]
    Watch {
        name: String,
        #[source]
        source: Box<kube::runtime::wait::Error>,
    },
}

impl ShadowSettings {
    /// What every pod kt starts (shadow and router) takes from the global flags, as in
    /// ktctl v0.3.7 (`cluster/helper.go`): the pull policy (`-f`: `Always`, else
    /// `IfNotPresent`) and the `--podQuota` requests and limits of each container, the
    /// `--serviceAccount`, the `--imagePullSecret` and the `--nodeSelector`.
    pub fn apply_to(&self, spec: &mut PodSpec) {
        let policy = if self.always_pull {
            "Always"
        } else {
            "IfNotPresent"
        };
        let quota: BTreeMap<String, Quantity> =
            [("cpu", &self.quota.cpu), ("memory", &self.quota.memory)]
                .into_iter()
                .filter_map(|(name, value)| Some((name.to_owned(), Quantity(value.clone()?))))
                .collect();
        for container in &mut spec.containers {
            container.image_pull_policy = Some(policy.into());
            if !quota.is_empty() {
                container.resources = Some(ResourceRequirements {
                    requests: Some(quota.clone()),
                    limits: Some(quota.clone()),
                    ..ResourceRequirements::default()
                });
            }
        }
        spec.service_account_name = Some(self.service_account.clone());
        spec.node_selector = (!self.node_selector.is_empty()).then(|| self.node_selector.clone());
        spec.image_pull_secrets = self
            .image_pull_secret
            .as_ref()
            .map(|name| vec![LocalObjectReference { name: name.clone() }]);
    }
}

/// How a shadow goes when the run ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Teardown {
    /// Deleted with its ConfigMap.
    Delete,
    /// Shared (`kt-ref-count`): this run's count taken off, deleted by the last one out.
    RefCounted,
}

/// What goes into one shadow pod.
#[derive(Clone, Debug)]
pub struct ShadowSpec {
    pub name: String,
    pub namespace: String,
    pub role: &'static str,
    pub settings: ShadowSettings,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub env: Vec<(String, String)>,
    /// Container ports besides SSH (name, port): an exchange shadow declares the Service's
    /// target ports, so that a named targetPort resolves to it.
    pub ports: Vec<(String, u16)>,
}

impl ShadowSpec {
    /// A shadow of `role` with v0.3.7's labels and annotations, `-l`/`--withAnnotation`
    /// added; `user` goes into `kt-user`.
    pub fn new(
        settings: &ShadowSettings,
        name: String,
        namespace: String,
        role: &'static str,
        user: &str,
    ) -> Self {
        let mut labels = settings.labels.clone();
        labels.insert(compat::CONTROL_BY.into(), compat::CONTROL_BY_KT.into());
        labels.insert(compat::ROLE.into(), role.into());
        let mut annotations = settings.annotations.clone();
        annotations.insert(compat::USER.into(), user.to_owned());
        Self {
            name,
            namespace,
            role,
            settings: settings.clone(),
            labels,
            annotations,
            env: Vec::new(),
            ports: Vec::new(),
        }
    }

    fn metadata(&self) -> ObjectMeta {
        ObjectMeta {
            name: Some(self.name.clone()),
            namespace: Some(self.namespace.clone()),
            labels: Some(self.labels.clone()),
            annotations: Some(self.annotations.clone()),
            ..ObjectMeta::default()
        }
    }

    /// The ConfigMap with the session's key pair.
    pub fn config_map(&self, public_key: &str, private_key: &str) -> ConfigMap {
        ConfigMap {
            metadata: self.metadata(),
            data: Some(BTreeMap::from([
                (compat::AUTHORIZED_KEY.to_owned(), public_key.to_owned()),
                (compat::PRIVATE_KEY.to_owned(), private_key.to_owned()),
            ])),
            ..ConfigMap::default()
        }
    }

    /// `--useShadowDeployment`: a Deployment named after the shadow with one replica of
    /// [`ShadowSpec::pod`]; its selector is the pod's labels minus `control-by` (v0.3.7's),
    /// which hold the shadow's `kt-target` — one is added when the role has none — so that
    /// no two shadows' Deployments select each other's pods.
    pub fn deployment(&self) -> Deployment {
        let mut template = self.pod();
        let labels = template.metadata.labels.get_or_insert_default();
        labels
            .entry(compat::TARGET.to_owned())
            .or_insert_with(|| compat::random_target(rand::random));
        let mut selector = labels.clone();
        selector.remove(compat::CONTROL_BY);
        template.metadata.name = None;
        template.metadata.namespace = None;
        Deployment {
            metadata: self.metadata(),
            spec: Some(DeploymentSpec {
                replicas: Some(1),
                selector: LabelSelector {
                    match_labels: Some(selector),
                    ..LabelSelector::default()
                },
                template: PodTemplateSpec {
                    metadata: Some(template.metadata),
                    spec: template.spec,
                },
                ..DeploymentSpec::default()
            }),
            status: None,
        }
    }

    /// The pod.
    pub fn pod(&self) -> Pod {
        let ports = std::iter::once(("ssh", compat::SSH_PORT))
            .chain(self.ports.iter().map(|(name, port)| (name.as_str(), *port)))
            .map(|(name, port)| ContainerPort {
                name: Some(name.to_owned()),
                container_port: i32::from(port),
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            })
            .collect();
        let settings = &self.settings;
        let container = Container {
            name: compat::CONTAINER.into(),
            image: Some(settings.image.clone()),
            env: Some(
                self.env
                    .iter()
                    .map(|(name, value)| EnvVar {
                        name: name.clone(),
                        value: Some(value.clone()),
                        ..EnvVar::default()
                    })
                    .collect(),
            ),
            ports: Some(ports),
            security_context: Some(SecurityContext {
                capabilities: Some(Capabilities {
                    add: Some(vec!["AUDIT_WRITE".into()]),
                    ..Capabilities::default()
                }),
                ..SecurityContext::default()
            }),
            volume_mounts: Some(vec![VolumeMount {
                name: compat::SSH_VOLUME.into(),
                mount_path: compat::SSH_MOUNT.into(),
                ..VolumeMount::default()
            }]),
            ..Container::default()
        };
        let mut spec = PodSpec {
            containers: vec![container],
            volumes: Some(vec![Volume {
                name: compat::SSH_VOLUME.into(),
                config_map: Some(ConfigMapVolumeSource {
                    name: self.name.clone(),
                    items: Some(vec![KeyToPath {
                        key: compat::AUTHORIZED_KEY.into(),
                        path: compat::SSH_AUTHORIZED_FILE.into(),
                        ..KeyToPath::default()
                    }]),
                    ..ConfigMapVolumeSource::default()
                }),
                ..Volume::default()
            }]),
            ..PodSpec::default()
        };
        settings.apply_to(&mut spec);
        Pod {
            metadata: self.metadata(),
            spec: Some(spec),
            ..Pod::default()
        }
    }
}

/// Creates the ConfigMap and the pod (a Deployment with `--useShadowDeployment`), registers
/// their teardown, waits until the pod runs (up to `--podCreationTimeout`), and keeps their
/// heartbeat (by the cluster's clock) until the run ends. Returns the running pod's name.
pub async fn deploy(
    cluster: &Cluster,
    lifecycle: &Arc<Lifecycle>,
    spec: &ShadowSpec,
    public_key: &str,
    private_key: &str,
    teardown: Teardown,
) -> Result<String, ShadowError> {
    let client = &cluster.client;
    let mut spec = spec.clone();
    let (key, beat) = heartbeat::annotation(&cluster.clock);
    spec.annotations.insert(key, beat);
    let (ns, name) = (spec.namespace.clone(), spec.name.clone());
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let created = |kind| {
        let (name, namespace) = (name.clone(), ns.clone());
        move |source| ShadowError::Create {
            kind,
            name,
            namespace,
            source: Box::new(source),
        }
    };
    cms.create(
        &PostParams::default(),
        &spec.config_map(public_key, private_key),
    )
    .await
    .map_err(created("configmap"))?;
    tracing::info!("Successful create config map {name}");
    match teardown {
        Teardown::Delete => {
            let (cms, name) = (cms.clone(), name.clone());
            lifecycle.defer(format!("configmap {name}"), async move {
                gone_is_fine(cms.delete(&name, &DeleteParams::default()).await)?;
                tracing::info!("Cleaning configmap {name}");
                Ok::<(), kube::Error>(())
            });
        }
        // The pod's release takes the ConfigMap with it; until the pod exists, this is it.
        Teardown::RefCounted => {
            let (cms, pods, name) = (cms.clone(), pods.clone(), name.clone());
            lifecycle.defer(format!("configmap {name}"), async move {
                if pods.get_opt(&name).await?.is_none() {
                    cms.delete(&name, &DeleteParams::default()).await?;
                    tracing::info!("Cleaning configmap {name}");
                }
                Ok::<(), kube::Error>(())
            });
        }
    }
    if spec.settings.as_deployment {
        return as_deployment(cluster, lifecycle, spec).await;
    }
    tracing::info!("Deploying shadow pod {name} in namespace {ns}");
    pods.create(&PostParams::default(), &spec.pod())
        .await
        .map_err(created("pod"))?;
    match teardown {
        Teardown::Delete => {
            let (pods, name) = (pods.clone(), name.clone());
            lifecycle.defer(format!("shadow pod {name}"), async move {
                gone_is_fine(pods.delete(&name, &DeleteParams::default()).await)?;
                tracing::info!("Cleaning shadow pod {name}");
                Ok::<(), kube::Error>(())
            });
        }
        Teardown::RefCounted => defer_release(lifecycle, &pods, &cms, &name),
    }
    wait_running(&pods, &name, spec.settings.creation_timeout).await?;
    keep_heartbeat(cluster, lifecycle, &ns, heartbeat::Kind::Pod, &name);
    Ok(name)
}

/// `--useShadowDeployment` (ktctl v0.3.7 `cluster/shadow_pod.go`): the shadow as a Deployment
/// of one replica named after it, deleted (with its pods) when the run ends; waits until its
/// pod runs and returns the pod's name. Its heartbeat goes on the Deployment.
async fn as_deployment(
    cluster: &Cluster,
    lifecycle: &Arc<Lifecycle>,
    spec: ShadowSpec,
) -> Result<String, ShadowError> {
    let (ns, name) = (spec.namespace.clone(), spec.name.clone());
    let deployments: Api<Deployment> = Api::namespaced(cluster.client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), &ns);
    let deployment = spec.deployment();
    tracing::info!("Deploying shadow deployment {name} in namespace {ns}");
    deployments
        .create(&PostParams::default(), &deployment)
        .await
        .map_err(|source| ShadowError::Create {
            kind: "deployment",
            name: name.clone(),
            namespace: ns.clone(),
            source: Box::new(source),
        })?;
    {
        let (deployments, name) = (deployments.clone(), name.clone());
        lifecycle.defer(format!("shadow deployment {name}"), async move {
            gone_is_fine(deployments.delete(&name, &DeleteParams::background()).await)?;
            tracing::info!("Cleaning shadow deployment {name}");
            Ok::<(), kube::Error>(())
        });
    }
    let selector = deployment
        .spec
        .as_ref()
        .and_then(|s| s.selector.match_labels.as_ref())
        .map(|labels| {
            labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    let timeout = spec.settings.creation_timeout;
    let started = tokio::time::Instant::now();
    // The pod's name is the ReplicaSet's choice: found by the Deployment's selector.
    let pod = loop {
        let listed = pods
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(|source| ShadowError::Api {
                what: format!("list the pods of shadow deployment {name}"),
                source: Box::new(source),
            })?;
        if let Some(pod) = listed
            .items
            .into_iter()
            .find(|p| p.metadata.deletion_timestamp.is_none())
            .and_then(|p| p.metadata.name)
        {
            break pod;
        }
        if started.elapsed() >= timeout {
            return Err(ShadowError::NotReady {
                name,
                seconds: timeout.as_secs(),
                reason: "the deployment has no pod".into(),
            });
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    wait_running(&pods, &pod, timeout.saturating_sub(started.elapsed())).await?;
    keep_heartbeat(cluster, lifecycle, &ns, heartbeat::Kind::Deployment, &name);
    Ok(pod)
}

/// A deletion that found the object gone already (`ktctl recover` or `clean` took it) did
/// what teardown wanted.
fn gone_is_fine<T>(deleted: Result<T, kube::Error>) -> Result<(), kube::Error> {
    match deleted {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(error) => Err(error),
    }
}

/// How many runs use a shared shadow (`kt-ref-count`; a shadow without one counts as one).
pub(crate) fn ref_count(pod: &Pod) -> u32 {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(compat::REF_COUNT))
        .and_then(|c| c.parse().ok())
        .unwrap_or(1)
}

/// Sets `kt-ref-count` of `pod` to `count`, if the pod is still the version read (a merge
/// patch carrying its resourceVersion: the API server refuses it with 409 otherwise).
pub(crate) async fn set_ref_count(
    pods: &Api<Pod>,
    pod: &Pod,
    count: u32,
) -> Result<(), kube::Error> {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let patch = serde_json::json!({"metadata": {
        "resourceVersion": pod.metadata.resource_version,
        "annotations": {compat::REF_COUNT: count.to_string()},
    }});
    pods.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(drop)
}

/// Joins the shared shadow `name`: counts this run in, registers its release, waits until
/// the pod runs, keeps its heartbeat, and returns the session's private key from its
/// ConfigMap. `None` when the pod went away meanwhile (the caller creates it).
pub async fn join_shared(
    cluster: &Cluster,
    lifecycle: &Arc<Lifecycle>,
    namespace: &str,
    name: &str,
    timeout: Duration,
) -> Result<Option<String>, ShadowError> {
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), namespace);
    let cms: Api<ConfigMap> = Api::namespaced(cluster.client.clone(), namespace);
    let api = |what: &str| {
        let what = format!("{what} {name}");
        move |source| ShadowError::Api {
            what,
            source: Box::new(source),
        }
    };
    loop {
        let Some(pod) = pods.get_opt(name).await.map_err(api("get pod"))? else {
            return Ok(None);
        };
        if pod.metadata.deletion_timestamp.is_some() {
            // The last user is leaving: wait for it to go, then create a new one.
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        let count = ref_count(&pod);
        match set_ref_count(&pods, &pod, count + 1).await {
            Ok(()) => {
                tracing::info!("Pod {name} has {count} refs, increase to {}", count + 1);
                break;
            }
            Err(kube::Error::Api(status)) if matches!(status.code, 404 | 409) => continue,
            Err(source) => return Err(api("count a user of shadow pod")(source)),
        }
    }
    defer_release(lifecycle, &pods, &cms, name);
    wait_running(&pods, name, timeout).await?;
    let key = cms
        .get(name)
        .await
        .map_err(api("get configmap"))?
        .data
        .and_then(|mut d| d.remove(compat::PRIVATE_KEY))
        .ok_or_else(|| ShadowError::NoKey(name.to_owned()))?;
    keep_heartbeat(cluster, lifecycle, namespace, heartbeat::Kind::Pod, name);
    Ok(Some(key))
}

/// Registers the release of a shared shadow: this run's count taken off, or the pod and its
/// ConfigMap deleted when this run is the last one.
fn defer_release(lifecycle: &Lifecycle, pods: &Api<Pod>, cms: &Api<ConfigMap>, name: &str) {
    let (pods, cms, name) = (pods.clone(), cms.clone(), name.to_owned());
    lifecycle.defer(format!("shadow pod {name} (shared)"), async move {
        loop {
            let Some(pod) = pods.get_opt(&name).await? else {
                return Ok(());
            };
            let count = ref_count(&pod);
            if count <= 1 {
                // Only the version read: a run that joined meanwhile keeps it alive.
                let unchanged = DeleteParams {
                    preconditions: Some(Preconditions {
                        resource_version: pod.metadata.resource_version.clone(),
                        uid: None,
                    }),
                    ..DeleteParams::default()
                };
                match pods.delete(&name, &unchanged).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(status)) if status.code == 409 => continue,
                    Err(e) => return Err(e),
                }
                tracing::info!("Cleaning shadow pod {name}");
                match cms.delete(&name, &DeleteParams::default()).await {
                    Ok(_) => tracing::info!("Cleaning configmap {name}"),
                    Err(kube::Error::Api(status)) if status.code == 404 => {}
                    Err(e) => return Err(e),
                }
                return Ok(());
            }
            match set_ref_count(&pods, &pod, count - 1).await {
                Ok(()) => {
                    tracing::info!("Pod {name} has {count} refs, decrease to {}", count - 1);
                    return Ok::<(), kube::Error>(());
                }
                Err(kube::Error::Api(status)) if status.code == 409 => continue,
                Err(e) => return Err(e),
            }
        }
    });
}

/// Why a pod is not running yet, as its status says (`ContainerCreating`, `ImagePullBackOff`,
/// or its phase).
fn waiting_reason(pod: &Pod) -> String {
    let status = pod.status.clone().unwrap_or_default();
    status
        .container_statuses
        .unwrap_or_default()
        .into_iter()
        .find_map(|c| c.state?.waiting?.reason)
        .unwrap_or_else(|| status.phase.unwrap_or_else(|| "Pending".into()))
}

/// Waits until the pod is Running with an address (v0.3.7 takes that as ready), showing
/// what it waits for and the pod's latest state ([`Progress`]).
pub(crate) async fn wait_running(
    pods: &Api<Pod>,
    name: &str,
    timeout: Duration,
) -> Result<(), ShadowError> {
    let last_seen = Arc::new(Mutex::new("Pending".to_owned()));
    let seen = last_seen.clone();
    let running = await_condition(pods.clone(), name, move |pod: Option<&Pod>| {
        let Some(pod) = pod else {
            return false;
        };
        *seen.lock().unwrap_or_else(|e| e.into_inner()) = waiting_reason(pod);
        pod.status
            .as_ref()
            .is_some_and(|s| s.phase.as_deref() == Some("Running") && s.pod_ip.is_some())
    });
    let mut running = std::pin::pin!(tokio::time::timeout(timeout, running));
    let mut progress = Progress::start(format!("pod {name} to run"));
    loop {
        tokio::select! {
            done = &mut running => {
                drop(progress);
                return match done {
                    Ok(Ok(_)) => {
                        tracing::info!("Pod {name} is ready");
                        Ok(())
                    }
                    Ok(Err(source)) => Err(ShadowError::Watch { name: name.into(), source: Box::new(source) }),
                    Err(_) => Err(ShadowError::NotReady {
                        name: name.into(),
                        seconds: timeout.as_secs(),
                        reason: last_seen.lock().unwrap_or_else(|e| e.into_inner()).clone(),
                    }),
                };
            }
            () = progress.tick() => {
                let reason = last_seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
                progress.show(&reason);
            }
        }
    }
}

/// Renews `kt-last-heart-beat` on the shadow `name` (a pod, or a Deployment with
/// `--useShadowDeployment`) and its ConfigMap until the run ends, so that `ktctl clean` of
/// any version sees the session alive.
fn keep_heartbeat(
    cluster: &Cluster,
    lifecycle: &Lifecycle,
    namespace: &str,
    kind: heartbeat::Kind,
    name: &str,
) {
    lifecycle.tasks.spawn(heartbeat::keep(
        cluster.client.clone(),
        namespace.to_owned(),
        cluster.clock,
        vec![
            (kind, name.to_owned()),
            (heartbeat::Kind::ConfigMap, name.to_owned()),
        ],
        lifecycle.done.clone(),
    ));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::Settings;

    fn spec() -> ShadowSpec {
        let global = <crate::args::Cli as clap::Parser>::try_parse_from([
            "ktctl",
            "-l",
            "team=a",
            "--nodeSelector",
            "zone=b",
            "--imagePullSecret",
            "regcred",
        ])
        .unwrap()
        .global;
        let settings = Settings::from_args(&global).unwrap();
        ShadowSpec::new(
            &settings.shadow,
            "kt-connect-shadow-abcde".into(),
            "dev".into(),
            compat::ROLE_SHADOW_CONNECT,
            "alice",
        )
    }

    #[test]
    fn the_shadow_pod_follows_the_v0_3_7_contract() {
        // Checked on the JSON sent to the API server: a misspelt field would be dropped.
        let pod = serde_json::to_value(spec().pod()).unwrap();
        assert_eq!(
            pod["metadata"]["labels"],
            serde_json::json!({"control-by": "kt", "kt-role": "shadow-connect", "team": "a"})
        );
        // The heartbeat is stamped at creation, by the cluster's clock (`deploy`).
        assert_eq!(
            pod["metadata"]["annotations"],
            serde_json::json!({"kt-user": "alice"})
        );
        let c = &pod["spec"]["containers"][0];
        assert_eq!(c["name"], "standalone");
        assert_eq!(
            c["volumeMounts"][0],
            serde_json::json!({"name": "ssh-public-key", "mountPath": "/root/authorized"})
        );
        assert_eq!(
            c["securityContext"]["capabilities"]["add"],
            serde_json::json!(["AUDIT_WRITE"])
        );
        assert_eq!(c["ports"][0]["containerPort"], 22);
        assert_eq!(
            pod["spec"]["volumes"][0]["configMap"]["items"][0],
            serde_json::json!({"key": "authorized", "path": "authorized_keys"})
        );
        assert_eq!(
            pod["spec"]["nodeSelector"],
            serde_json::json!({"zone": "b"})
        );
        assert_eq!(
            pod["spec"]["imagePullSecrets"],
            serde_json::json!([{"name": "regcred"}])
        );
        assert_eq!(pod["spec"]["serviceAccountName"], "default");
        assert_eq!(c["imagePullPolicy"], "IfNotPresent");
        let cm = serde_json::to_value(spec().config_map("ssh-ed25519 AAAA", "PEM")).unwrap();
        assert_eq!(
            cm["data"],
            serde_json::json!({"authorized": "ssh-ed25519 AAAA", "privateKey": "PEM"})
        );
    }
}
