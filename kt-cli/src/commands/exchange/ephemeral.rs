//! Ephemeral mode (`--mode ephemeral`, v0.3.7's experimental third mode,
//! `../shared/reference/ktctl-v0.3.7.md` §1.1, §2.2, §3.3): an ephemeral container
//! `kt-exchange` (image `…/kt-connect-navigator:v<version>`) in each running pod of the
//! Service — or in the one pod of `pod/<name>` — takes the pod's inbound traffic for the
//! exposed target ports and sends it through SSH reverse tunnels to the local ports. The
//! Service, its selector and the workloads are not touched, and the pods keep serving every
//! port that is not exposed.
//!
//! How, in the pod (kt-node-agent's role `navigator`): ktctl reaches the navigator's SSH
//! server on a spare port of the pod (the API server's port-forward, or directly), and each
//! reverse tunnel it asks for (`tcpip-forward` of the target port) is an nftables
//! `prerouting` redirect of that port, in the pod's network namespace, to the navigator. The
//! redirect lives as long as the tunnel: on Ctrl-C ktctl cancels each tunnel (the navigator
//! answers once the rule is gone from the kernel), disconnects, and waits until the
//! container has ended (ephemeral containers cannot be removed: Kubernetes refuses it, so a
//! pod keeps a terminated `kt-exchange` in its spec). If ktctl is killed, its TCP connection
//! closes and the navigator removes the redirect at once, then ends after 30 s in which a
//! reconnecting ktctl could take the ports again; a vanished workstation is noticed by the
//! SSH keepalive (about a minute).
//!
//! v0.3.7 differs, knowingly: its navigator image has no SSH server and its cleanup deletes
//! the target pods; kt does what was meant and restores the pods in place. The session's
//! public key goes into the container's environment (an ephemeral container cannot add a
//! volume), not its private key as v0.3.7 puts it. A pod that already has a `kt-exchange`
//! from an earlier run (ended) gets `kt-exchange-<5 letters>`; one whose navigator still
//! runs is refused, naming the user who runs it.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use futures::FutureExt as _;
use k8s_openapi::api::core::v1::Pod;
use kt_proto::compat;
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use serde_json::{Value, json};

use super::{Context, ExchangeError};
use crate::{
    cluster::{ClusterError, lock},
    ssh_client::{ForwardsEnded, RemoteForward, SessionKey, SshPool, Target},
};

/// The ephemeral container's name (v0.3.7).
pub const CONTAINER: &str = "kt-exchange";
/// The navigator image of v0.3.7 (`--image`'s registry and tag are followed, see
/// [`navigator_image`]).
pub const DEFAULT_NAVIGATOR_IMAGE: &str =
    "registry.cn-hangzhou.aliyuncs.com/rdc-incubator/kt-connect-navigator:v0.3.7";
/// The ephemeral container's environment variable naming who runs it (ephemeral containers
/// have no labels or annotations of their own).
pub const USER_ENV: &str = "KT_USER";
/// How long the navigator may take to end once told goodbye.
const END_WITHIN: Duration = Duration::from_secs(10);
/// Reconnection attempts before a lost navigator is given up (about 26 s of back-off,
/// inside the 30 s it waits for a reconnecting ktctl).
const RECONNECT_ATTEMPTS: usize = 10;

#[derive(Debug, thiserror::Error)]
pub enum EphemeralError {
    #[error("the cluster refused to add an ephemeral container to pod {pod}: {reason}")]
    Refused {
        pod: String,
        reason: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error(
        "pod {pod} is already exchanged by another user ({user}): its ephemeral container {container} is running"
    )]
    Busy {
        pod: String,
        container: String,
        user: String,
    },
    #[error("no running pod of {0} to exchange")]
    NoPods(String),
    #[error("ephemeral container {container} of pod {pod} did not start: {reason}")]
    NotStarted {
        pod: String,
        container: String,
        reason: String,
    },
    #[error("lost the navigator in pod {0}; its redirect was removed when the connection ended")]
    Lost(String),
    #[error("'{0}' names a pod: pods are exchanged with --mode ephemeral only")]
    PodNeedsEphemeral(String),
}

/// The navigator image beside the shadow image `--image` names: the same registry and tag
/// (`my.registry/kt-connect-shadow:v0.3.7` → `my.registry/kt-connect-navigator:v0.3.7`, kt's
/// `kt-shadow` → `kt-navigator`), else v0.3.7's.
pub fn navigator_image(shadow_image: &str) -> String {
    for (shadow, navigator) in [
        ("kt-connect-shadow", "kt-connect-navigator"),
        (kt_proto::images::SHADOW, "kt-navigator"),
    ] {
        if let Some(at) = shadow_image.rfind(shadow) {
            return format!(
                "{}{navigator}{}",
                &shadow_image[..at],
                &shadow_image[at + shadow.len()..]
            );
        }
    }
    DEFAULT_NAVIGATOR_IMAGE.to_owned()
}

/// `pod/<name>` (or `pods/<name>`, `po/<name>`): the pod's name.
pub fn pod_argument(argument: &str) -> Option<&str> {
    ["pod/", "pods/", "po/"]
        .iter()
        .find_map(|prefix| argument.strip_prefix(prefix))
}

/// A kt navigator already in a pod: its name, whether it runs, and who started it.
#[derive(Debug, PartialEq, Eq)]
pub struct Existing {
    pub name: String,
    pub running: bool,
    pub user: String,
}

/// The kt navigators of `pod` (ephemeral containers named `kt-exchange` or
/// `kt-exchange-*`), with their state.
pub fn existing_navigators(pod: &Value) -> Vec<Existing> {
    pod["spec"]["ephemeralContainers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| {
            let name = c["name"].as_str()?;
            if name != CONTAINER && !name.starts_with(&format!("{CONTAINER}-")) {
                return None;
            }
            let running = pod["status"]["ephemeralContainerStatuses"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|s| s["name"] == name)
                .is_none_or(|s| s["state"].get("terminated").is_none());
            let user = c["env"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|e| e["name"] == USER_ENV)
                .and_then(|e| e["value"].as_str())
                .unwrap_or("unknown user")
                .to_owned();
            Some(Existing {
                name: name.to_owned(),
                running,
                user,
            })
        })
        .collect()
}

/// The ephemeral container's name in a pod that has `existing` ones: v0.3.7's `kt-exchange`,
/// or, when an earlier run left one (they cannot be removed), `kt-exchange-<random>`.
pub fn container_name(existing: &[Existing], random: &str) -> String {
    if existing.iter().any(|e| e.name == CONTAINER) {
        format!("{CONTAINER}-{random}")
    } else {
        CONTAINER.to_owned()
    }
}

/// The port the navigator's SSH server listens on in `pod`: 22 (the shadow's), or the first
/// of 2222, 22022, 32022 that no container of the pod declares and no exposed target uses.
pub fn navigator_port(pod: &Value, targets: &[u16]) -> u16 {
    let declared: BTreeSet<u64> = ["containers", "initContainers"]
        .iter()
        .flat_map(|list| pod["spec"][list].as_array().into_iter().flatten())
        .flat_map(|c| c["ports"].as_array().into_iter().flatten())
        .filter_map(|p| p["containerPort"].as_u64())
        .collect();
    [compat::SSH_PORT, 2222, 22022, 32022]
        .into_iter()
        .find(|p| !declared.contains(&u64::from(*p)) && !targets.contains(p))
        .unwrap_or(32022)
}

/// The ephemeral container: the navigator image, its SSH port and the session's public key
/// in its environment, `NET_ADMIN` (its nftables rules, as v0.3.7 asks), and the pod's
/// first container as its target (sharing its process namespace, as `kubectl debug
/// --target` does). No ports, probes or resources: ephemeral containers may have none.
pub fn container(
    name: &str,
    image: &str,
    always_pull: bool,
    port: u16,
    public_key: &str,
    user: &str,
    target: Option<&str>,
) -> Value {
    let mut container = json!({
        "name": name,
        "image": image,
        "imagePullPolicy": if always_pull { "Always" } else { "IfNotPresent" },
        "env": [
            {"name": kt_proto::env::NAVIGATOR_LISTEN, "value": format!("0.0.0.0:{port}")},
            {"name": kt_proto::env::AUTHORIZED_KEYS, "value": public_key},
            {"name": USER_ENV, "value": user},
        ],
        "securityContext": {"capabilities": {"add": ["NET_ADMIN"]}},
    });
    if let Some(target) = target {
        container["targetContainerName"] = json!(target);
    }
    container
}

/// A pod's navigator session once it exists, for its restoration: the SSH connection and
/// the reverse tunnels opened on it.
type Session = Arc<std::sync::Mutex<Option<(Arc<SshPool>, Vec<RemoteForward>)>>>;

/// One pod being exchanged: its navigator's SSH connection and reverse tunnels.
struct Exchanged {
    pod: String,
    pool: Arc<SshPool>,
    forwards: Vec<RemoteForward>,
}

/// Exchanges `pods` (`what` names them in the banner): `pairs` are (local port, target
/// port). With `service`, its `kt-lock` is held from the check of the pods' navigators until
/// every navigator is up, so that two ktctl cannot both find a pod free (two navigators in
/// one pod would share its network namespace). Returns when the run is stopped (teardown
/// restores each pod) or a navigator is lost.
pub(super) async fn exchange(
    ctx: &Context<'_>,
    what: &str,
    service: Option<&str>,
    pods: Vec<Pod>,
    pairs: &[(u16, u16)],
) -> Result<(), ExchangeError> {
    tracing::info!(
        "Experimental feature. It just works on kubernetes above v1.23, and it can NOT work with istio."
    );
    let api: Api<Pod> = Api::namespaced(ctx.cluster.client.clone(), &ctx.cluster.namespace);
    let services: Api<k8s_openapi::api::core::v1::Service> =
        Api::namespaced(ctx.cluster.client.clone(), &ctx.cluster.namespace);
    if let Some(name) = service {
        lock::lock(&services, name).await?;
        let (services, name) = (services.clone(), name.to_owned());
        ctx.lifecycle
            .defer(format!("kt-lock on service {name}"), async move {
                lock::unlock(&services, &name).await
            });
    }
    // The pods as they are now that the lock is held.
    let mut fresh = Vec::new();
    for pod in pods {
        let name = pod.metadata.name.clone().unwrap_or_default();
        if let Some(now) = api
            .get_opt(&name)
            .await
            .map_err(ClusterError::api(format!("get pod {name}")))?
        {
            fresh.push(now);
        }
    }
    let pods: Vec<Pod> = fresh
        .into_iter()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_none()
                && p.status
                    .as_ref()
                    .is_some_and(|s| s.phase.as_deref() == Some("Running") && s.pod_ip.is_some())
        })
        .collect();
    if pods.is_empty() {
        return Err(EphemeralError::NoPods(what.to_owned()).into());
    }
    // Every pod is checked before any is changed.
    for pod in &pods {
        let value = serde_json::to_value(pod).unwrap_or_default();
        if let Some(busy) = existing_navigators(&value).into_iter().find(|e| e.running) {
            return Err(EphemeralError::Busy {
                pod: pod.metadata.name.clone().unwrap_or_default(),
                container: busy.name,
                user: busy.user,
            }
            .into());
        }
    }
    let key = SessionKey::generate();
    let mut exchanged = Vec::new();
    for pod in &pods {
        let setup = setup_pod(ctx, pod, pairs, &key);
        let done = tokio::select! {
            () = ctx.lifecycle.stop.cancelled() => return Ok(()),
            done = setup => done?,
        };
        exchanged.push(done);
    }
    if let Some(name) = service
        && let Err(error) = lock::unlock(&services, name).await
    {
        tracing::warn!("{}", kt_proto::error_chain(&error));
    }
    ctx.announce(what);
    let stop = ctx.lifecycle.stop.clone();
    let keeps = exchanged.iter().map(|e| {
        let stop = stop.clone();
        async move {
            let ended = e
                .pool
                .keep_remote_forwards(&e.forwards, &stop, Some(RECONNECT_ATTEMPTS))
                .await;
            (e.pod.clone(), ended)
        }
        .boxed()
    });
    let ((pod, ended), _, _) = futures::future::select_all(keeps).await;
    match ended {
        ForwardsEnded::Stopped => Ok(()),
        ForwardsEnded::GaveUp => Err(EphemeralError::Lost(pod).into()),
    }
}

/// Adds the navigator to `pod`, registers the pod's restoration, waits until the navigator
/// runs, and opens the reverse tunnels.
async fn setup_pod(
    ctx: &Context<'_>,
    pod: &Pod,
    pairs: &[(u16, u16)],
    key: &SessionKey,
) -> Result<Exchanged, ExchangeError> {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let namespace = &ctx.cluster.namespace;
    let pods: Api<Pod> = Api::namespaced(ctx.cluster.client.clone(), namespace);
    let value = serde_json::to_value(pod).unwrap_or_default();
    let existing = existing_navigators(&value);
    let container_name = container_name(&existing, &compat::random_lower(5, rand::random));
    if container_name != CONTAINER {
        tracing::info!(
            "Pod {name} keeps ephemeral container {CONTAINER} from an earlier exchange (ephemeral containers cannot be removed); adding {container_name}"
        );
    }
    let targets: Vec<u16> = pairs.iter().map(|(_, t)| *t).collect();
    let port = navigator_port(&value, &targets);
    let target_container = pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .map(|c| c.name.clone());
    let spec = container(
        &container_name,
        &navigator_image(&ctx.settings.shadow.image),
        ctx.settings.shadow.always_pull,
        port,
        &key.public_line,
        &ctx.settings.identity.user,
        target_container.as_deref(),
    );
    let patch = json!({"spec": {"ephemeralContainers": [spec]}});
    pods.patch_ephemeral_containers(&name, &PatchParams::default(), &Patch::Strategic(&patch))
        .await
        .map_err(|source| refused(&name, source))?;
    tracing::info!("Ephemeral container {container_name} added to pod {name}");
    let session: Session = Arc::default();
    defer_restore(ctx, &pods, &name, &container_name, session.clone());
    wait_running(
        &pods,
        &name,
        &container_name,
        ctx.settings.shadow.creation_timeout,
    )
    .await?;
    let pool = Arc::new(SshPool::new(
        ctx.cluster.client.clone(),
        Target::navigator(namespace, &name, port),
        key.private.clone(),
        ctx.settings.ssh.transport,
        1,
    ));
    *session.lock().unwrap_or_else(|e| e.into_inner()) = Some((pool.clone(), Vec::new()));
    pool.start(ctx.settings.ssh.connect_timeout)
        .await
        .map_err(ExchangeError::Ssh)?;
    let forwards: Vec<RemoteForward> = pairs
        .iter()
        .map(|(local, target)| RemoteForward::on_pod_port(*target, super::local(*local)))
        .collect();
    *session.lock().unwrap_or_else(|e| e.into_inner()) = Some((pool.clone(), forwards.clone()));
    pool.open_remote_forwards(&forwards).await?;
    Ok(Exchanged {
        pod: name,
        pool,
        forwards,
    })
}

/// What the API server's refusal means for ephemeral mode.
fn refused(pod: &str, source: kube::Error) -> ExchangeError {
    let reason = match &source {
        kube::Error::Api(status) if status.code == 403 => format!(
            "forbidden ({}); ephemeral mode needs permission to patch pods/ephemeralcontainers",
            status.message
        ),
        kube::Error::Api(status) if status.code == 404 && status.reason == "NotFound" => {
            if status.message.contains("pods") && status.message.contains(pod) {
                status.message.clone()
            } else {
                "the cluster does not serve pods/ephemeralcontainers (Kubernetes 1.23 or later is needed)".into()
            }
        }
        kube::Error::Api(status) => status.message.trim().to_owned(),
        other => other.to_string(),
    };
    EphemeralError::Refused {
        pod: pod.to_owned(),
        reason,
        source: Box::new(source),
    }
    .into()
}

/// The state of ephemeral container `container` in `pod`, as its status reports it.
fn state_of(pod: &Pod, container: &str) -> Option<k8s_openapi::api::core::v1::ContainerState> {
    pod.status
        .as_ref()?
        .ephemeral_container_statuses
        .as_ref()?
        .iter()
        .find(|s| s.name == container)?
        .state
        .clone()
}

/// Waits until the navigator runs (up to `--podCreationTimeout`); an image it cannot pull,
/// or an end, is reported with the kubelet's reason.
async fn wait_running(
    pods: &Api<Pod>,
    pod: &str,
    container: &str,
    timeout: Duration,
) -> Result<(), ExchangeError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let not_started = |reason: String| EphemeralError::NotStarted {
        pod: pod.to_owned(),
        container: container.to_owned(),
        reason,
    };
    let mut last = "not reported yet".to_owned();
    loop {
        let now = pods
            .get(pod)
            .await
            .map_err(ClusterError::api(format!("get pod {pod}")))?;
        match state_of(&now, container) {
            Some(state) if state.running.is_some() => {
                tracing::info!("Ephemeral container {container} of pod {pod} is running");
                return Ok(());
            }
            Some(state) if state.terminated.is_some() => {
                let t = state.terminated.unwrap_or_default();
                return Err(not_started(format!(
                    "it ended with exit code {} ({})",
                    t.exit_code,
                    t.message.or(t.reason).unwrap_or_default()
                ))
                .into());
            }
            Some(state) => {
                if let Some(waiting) = state.waiting {
                    last = waiting.reason.unwrap_or_default();
                    if matches!(last.as_str(), "ImagePullBackOff" | "ErrImagePull") {
                        return Err(not_started(format!(
                            "{last}: {}",
                            waiting.message.unwrap_or_default()
                        ))
                        .into());
                    }
                }
            }
            None => {}
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(not_started(format!(
                "not running after {} s ({last})",
                timeout.as_secs()
            ))
            .into());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Registers the restoration of `pod`: each reverse tunnel cancelled (the navigator removes
/// its redirect before it confirms), the connection closed, and the navigator's end awaited
/// — the proof that nothing of it is left in the pod.
fn defer_restore(ctx: &Context<'_>, pods: &Api<Pod>, pod: &str, container: &str, session: Session) {
    let (pods, pod, container) = (pods.clone(), pod.to_owned(), container.to_owned());
    ctx.lifecycle.defer_within(
        format!("the redirect in pod {pod} (its navigator {container} removes it when the connection ends)"),
        END_WITHIN + Duration::from_secs(5),
        async move {
            let session = session.lock().unwrap_or_else(|e| e.into_inner()).take();
            let confirmed = match &session {
                Some((pool, forwards)) => {
                    let confirmed = pool.cancel_remote_forwards(forwards).await;
                    pool.close().await;
                    confirmed
                }
                None => Vec::new(),
            };
            let deadline = tokio::time::Instant::now() + END_WITHIN;
            loop {
                let now = match pods.get_opt(&pod).await? {
                    Some(now) => now,
                    None => {
                        tracing::info!("Pod {pod} is gone, nothing to restore");
                        return Ok(());
                    }
                };
                if let Some(ended) = state_of(&now, &container).and_then(|s| s.terminated) {
                    let ports = confirmed
                        .iter()
                        .map(u32::to_string)
                        .collect::<Vec<_>>()
                        .join(", ");
                    if ended.exit_code == 0 {
                        tracing::info!(
                            "Pod {pod} restored: redirect of port {ports} removed, navigator {container} ended"
                        );
                    } else {
                        tracing::warn!(
                            "Pod {pod}: navigator {container} ended with exit code {} (redirect of port {ports} removed)",
                            ended.exit_code
                        );
                    }
                    return Ok::<(), kube::Error>(());
                }
                if tokio::time::Instant::now() >= deadline {
                    match session {
                        Some(_) if !confirmed.is_empty() => tracing::warn!(
                            "Pod {pod}: its redirect is removed, but navigator {container} has not ended after {} s",
                            END_WITHIN.as_secs()
                        ),
                        _ => tracing::warn!(
                            "Pod {pod}: navigator {container} still runs; with no session it removes any redirect and ends on its own within two minutes"
                        ),
                    }
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        },
    );
}

/// Reads pod `name` for `pod/<name>`.
pub(super) async fn read_pod(
    cluster: &crate::cluster::Cluster,
    name: &str,
) -> Result<Pod, ExchangeError> {
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    match pods.get_opt(name).await {
        Ok(Some(pod)) => Ok(pod),
        Ok(None) => Err(EphemeralError::NoPods(format!("pod '{name}' (not found)")).into()),
        Err(e) => Err(ClusterError::api(format!("get pod {name}"))(e).into()),
    }
}

impl From<EphemeralError> for ExchangeError {
    fn from(error: EphemeralError) -> Self {
        Self::Ephemeral(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_navigator_image_follows_the_shadow_image() {
        assert_eq!(
            navigator_image(crate::args::DEFAULT_SHADOW_IMAGE),
            DEFAULT_NAVIGATOR_IMAGE
        );
        assert_eq!(
            navigator_image("my.registry/kt-connect-shadow:v1"),
            "my.registry/kt-connect-navigator:v1"
        );
        assert_eq!(
            navigator_image("ghcr.io/x/kt-shadow:dev"),
            "ghcr.io/x/kt-navigator:dev"
        );
        assert_eq!(navigator_image("busybox"), DEFAULT_NAVIGATOR_IMAGE);
    }

    #[test]
    fn a_refusal_says_what_the_mode_needs() {
        let status = |code: u16, reason: &str, message: &str| {
            kube::Error::Api(Box::new(
                serde_json::from_value(json!({"status": "Failure", "code": code, "reason": reason, "message": message}))
                    .unwrap(),
            ))
        };
        let forbidden = refused(
            "web-1",
            status(
                403,
                "Forbidden",
                r#"pods "web-1" is forbidden: User "bob" cannot patch resource "pods/ephemeralcontainers""#,
            ),
        );
        assert_eq!(
            forbidden.to_string(),
            r#"the cluster refused to add an ephemeral container to pod web-1: forbidden (pods "web-1" is forbidden: User "bob" cannot patch resource "pods/ephemeralcontainers"); ephemeral mode needs permission to patch pods/ephemeralcontainers"#
        );
        let old = refused(
            "web-1",
            status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ),
        );
        assert!(
            old.to_string()
                .ends_with("(Kubernetes 1.23 or later is needed)"),
            "{old}"
        );
        let gone = refused(
            "web-1",
            status(404, "NotFound", r#"pods "web-1" not found"#),
        );
        assert!(
            gone.to_string().ends_with(r#"pods "web-1" not found"#),
            "{gone}"
        );
    }

    #[test]
    fn pod_arguments() {
        assert_eq!(pod_argument("pod/web-1"), Some("web-1"));
        assert_eq!(pod_argument("pods/web-1"), Some("web-1"));
        assert_eq!(pod_argument("svc/web"), None);
        assert_eq!(pod_argument("web"), None);
    }

    #[test]
    fn an_earlier_navigator_is_kept_and_a_running_one_is_named() {
        let pod = json!({
            "spec": {"ephemeralContainers": [
                {"name": "kt-exchange", "env": [{"name": "KT_USER", "value": "alice"}]},
                {"name": "debugger"},
                {"name": "kt-exchange-abcde", "env": [{"name": "KT_USER", "value": "bob"}]},
            ]},
            "status": {"ephemeralContainerStatuses": [
                {"name": "kt-exchange", "state": {"terminated": {"exitCode": 0}}},
                {"name": "kt-exchange-abcde", "state": {"running": {}}},
            ]},
        });
        let existing = existing_navigators(&pod);
        assert_eq!(
            existing,
            [
                Existing {
                    name: "kt-exchange".into(),
                    running: false,
                    user: "alice".into()
                },
                Existing {
                    name: "kt-exchange-abcde".into(),
                    running: true,
                    user: "bob".into()
                },
            ]
        );
        assert_eq!(container_name(&existing, "xyzab"), "kt-exchange-xyzab");
        assert_eq!(container_name(&[], "xyzab"), "kt-exchange");
    }

    #[test]
    fn the_ssh_port_avoids_the_pods_ports() {
        let pod = |ports: &[u16]| json!({"spec": {"containers": [{"name": "app", "ports": ports.iter().map(|p| json!({"containerPort": p})).collect::<Vec<_>>()}]}});
        assert_eq!(navigator_port(&pod(&[80]), &[80]), 22);
        assert_eq!(navigator_port(&pod(&[22]), &[80]), 2222);
        assert_eq!(navigator_port(&pod(&[80]), &[22, 2222]), 22022);
    }

    #[test]
    fn the_container_is_what_an_ephemeral_container_may_be() {
        let c = container(
            "kt-exchange",
            "img",
            false,
            22,
            "ssh-ed25519 AAAA kt",
            "alice",
            Some("app"),
        );
        assert_eq!(c["targetContainerName"], "app");
        assert_eq!(
            c["securityContext"]["capabilities"]["add"],
            json!(["NET_ADMIN"])
        );
        assert_eq!(
            c["env"][0],
            json!({"name": "KT_NAVIGATOR_LISTEN", "value": "0.0.0.0:22"})
        );
        for forbidden in ["ports", "resources", "readinessProbe", "livenessProbe"] {
            assert!(c.get(forbidden).is_none(), "{forbidden}");
        }
    }
}
