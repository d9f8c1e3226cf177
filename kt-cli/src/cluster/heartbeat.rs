//! `kt-last-heart-beat`, as ktctl v0.3.7 writes it (`cluster/heartbeat.go`): Unix seconds of
//! the cluster's time on every pod, ConfigMap, Service and Deployment a run creates, set at
//! creation and renewed every two minutes less up to ten seconds while the run lives. Both
//! kt's `clean` and the Go ktctl's judge an object stale when its heartbeat is older than
//! `--thresholdInMinus` (5 minutes), so the period and the clock must be the same.

use std::time::Duration;

use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{ConfigMap, Pod, Service},
};
use kt_proto::compat;
use kube::{
    Api,
    api::{Patch, PatchParams},
};

use super::clock::ClusterClock;

/// The kinds of object kt creates with a heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Pod,
    ConfigMap,
    Service,
    Deployment,
}

impl Kind {
    /// The lower-case kind, as `kubectl` names it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pod => "pod",
            Self::ConfigMap => "configmap",
            Self::Service => "service",
            Self::Deployment => "deployment",
        }
    }
}

/// The annotation's value at `clock`'s now: Unix seconds.
pub fn value(clock: &ClusterClock) -> String {
    clock.now().timestamp().to_string()
}

/// The annotation (key, value) for an object created now.
pub fn annotation(clock: &ClusterClock) -> (String, String) {
    (compat::LAST_HEARTBEAT.to_owned(), value(clock))
}

/// v0.3.7's renewal period: two minutes less a random part of up to ten seconds, so that
/// many runs started together do not renew together.
pub fn period() -> Duration {
    Duration::from_secs(120) - Duration::from_millis(rand::random_range(0..10_000))
}

/// Renews the heartbeat of `objects` (kind, name) in `namespace` every [`period`] until
/// `stop`. A failure is logged once at warning level (`Failed to update heart beat of <kind>
/// <name>`, v0.3.7's words), later ones at debug level: an object a heartbeat cannot reach
/// is taken for a leftover by `clean` after five minutes, which the user should know about,
/// but a flaky API server must not flood the console.
pub async fn keep(
    client: kube::Client,
    namespace: String,
    clock: ClusterClock,
    objects: Vec<(Kind, String)>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut warned = false;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(period()) => {}
        }
        for (kind, name) in &objects {
            if let Err(error) = beat(&client, &namespace, &clock, *kind, name).await {
                let kind = kind.as_str();
                if warned {
                    tracing::debug!(%error, "Failed to update heart beat of {kind} {name}");
                } else {
                    warned = true;
                    tracing::warn!("Failed to update heart beat of {kind} {name}");
                }
            }
        }
    }
}

/// One renewal: a merge patch of the annotation (v0.3.7 sends a JSON patch `replace`, which
/// fails on an object whose annotation was removed; the merge patch puts it back).
pub async fn beat(
    client: &kube::Client,
    namespace: &str,
    clock: &ClusterClock,
    kind: Kind,
    name: &str,
) -> Result<(), kube::Error> {
    let patch = serde_json::json!({"metadata": {"annotations": {
        compat::LAST_HEARTBEAT: value(clock),
    }}});
    let (params, patch) = (PatchParams::default(), Patch::Merge(&patch));
    let client = client.clone();
    match kind {
        Kind::Pod => Api::<Pod>::namespaced(client, namespace)
            .patch(name, &params, &patch)
            .await
            .map(drop),
        Kind::ConfigMap => Api::<ConfigMap>::namespaced(client, namespace)
            .patch(name, &params, &patch)
            .await
            .map(drop),
        Kind::Service => Api::<Service>::namespaced(client, namespace)
            .patch(name, &params, &patch)
            .await
            .map(drop),
        Kind::Deployment => Api::<Deployment>::namespaced(client, namespace)
            .patch(name, &params, &patch)
            .await
            .map(drop),
    }
}
