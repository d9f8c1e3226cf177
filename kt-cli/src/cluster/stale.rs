//! What dead ktctl runs left in a namespace: kt's pods and ConfigMaps whose heartbeat
//! (`kt-last-heart-beat`, renewed every two minutes while their run lives) is older than
//! five minutes — v0.3.7's staleness rule (`thresholdInMinus`) — and agent-mode sessions
//! whose lease ran out as long ago. `connect` deletes them in the background at start, as
//! v0.3.7's does (unless `--skipCleanup`); objects without a heartbeat are never touched.

use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kt_proto::{compat, session::KtSession};
use kube::{
    Api, Resource,
    api::{DeleteParams, ListParams},
};

/// How old a heartbeat (or a lease's end) may be before its object counts as left behind.
pub const STALE_AFTER: Duration = Duration::from_secs(5 * 60);

/// Whether an object with `annotations` has a heartbeat older than [`STALE_AFTER`] at `now`
/// (Unix seconds).
pub fn heartbeat_stale(
    annotations: Option<&std::collections::BTreeMap<String, String>>,
    now: i64,
) -> bool {
    annotations
        .and_then(|a| a.get(compat::LAST_HEARTBEAT))
        .and_then(|beat| beat.parse::<i64>().ok())
        .is_some_and(|beat| now - beat > STALE_AFTER.as_secs() as i64)
}

/// Deletes the stale objects of `namespace`; failures are logged at debug level (it is
/// housekeeping, never a reason to fail a command).
/// Staleness is judged by `clock`, the cluster's time: a workstation whose clock runs ahead
/// must not take live objects for dead ones.
pub async fn delete_expired(
    client: kube::Client,
    namespace: String,
    clock: super::clock::ClusterClock,
) {
    let now = clock.now();
    let kt =
        ListParams::default().labels(&format!("{}={}", compat::CONTROL_BY, compat::CONTROL_BY_KT));
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    let sessions: Api<KtSession> = Api::namespaced(client, &namespace);
    let mut stale: Vec<(String, String)> = Vec::new();
    if let Ok(list) = pods.list(&kt).await {
        stale.extend(stale_names(&list.items, now.timestamp()).map(|n| ("pod".into(), n)));
    }
    if let Ok(list) = cms.list(&kt).await {
        stale.extend(stale_names(&list.items, now.timestamp()).map(|n| ("configmap".into(), n)));
    }
    if let Ok(list) = sessions.list(&ListParams::default()).await {
        let dead = chrono::Duration::from_std(STALE_AFTER).unwrap_or_default();
        for session in list.items {
            let lease_end = session
                .status
                .as_ref()
                .and_then(|s| s.renew_time)
                .map(|renewed| {
                    renewed + chrono::Duration::seconds(i64::from(session.spec.lease_seconds))
                });
            if lease_end.is_some_and(|end| now - end > dead)
                && let Some(name) = session.metadata.name
            {
                stale.push(("session".into(), name));
            }
        }
    }
    for (kind, name) in stale {
        let deleted = match kind.as_str() {
            "pod" => pods.delete(&name, &DeleteParams::default()).await.map(drop),
            "configmap" => cms.delete(&name, &DeleteParams::default()).await.map(drop),
            _ => sessions
                .delete(&name, &DeleteParams::default())
                .await
                .map(drop),
        };
        match deleted {
            Ok(()) => tracing::info!("Deleted expired {kind} {name}"),
            Err(error) => tracing::debug!(%error, "failed to delete expired {kind} {name}"),
        }
    }
}

fn stale_names<K: Resource>(objects: &[K], now: i64) -> impl Iterator<Item = String> + '_ {
    objects
        .iter()
        .filter(move |o| heartbeat_stale(o.meta().annotations.as_ref(), now))
        .filter_map(|o| o.meta().name.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heartbeat_is_stale_after_five_minutes() {
        let beat = |at: i64| {
            Some(std::collections::BTreeMap::from([(
                compat::LAST_HEARTBEAT.to_owned(),
                at.to_string(),
            )]))
        };
        assert!(!heartbeat_stale(beat(1000).as_ref(), 1000 + 300));
        assert!(heartbeat_stale(beat(1000).as_ref(), 1000 + 301));
        assert!(
            !heartbeat_stale(None, 1_000_000),
            "no heartbeat: never touched"
        );
    }
}
