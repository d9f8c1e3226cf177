//! kt's node agents as a session finds them: the ready pods of the DaemonSet in `deploy/`.

use k8s_openapi::api::core::v1::Pod;
use kt_proto::{
    agent::{LABEL_SELECTOR, NAMESPACE},
    session::KtSession,
};
use kube::{
    Api,
    api::{DeleteParams, ListParams, PostParams},
};

use super::{Cluster, ClusterError};
use crate::lifecycle::Lifecycle;

/// The ready agent pods with their nodes, `(pod, node)` sorted by pod name; none when the
/// agent is not installed or not visible to this user.
pub async fn ready(cluster: &Cluster) -> Result<Vec<(String, String)>, ClusterError> {
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), NAMESPACE);
    let list = match pods
        .list(&ListParams::default().labels(LABEL_SELECTOR))
        .await
    {
        Ok(list) => list,
        Err(kube::Error::Api(status)) if matches!(status.code, 403 | 404) => return Ok(Vec::new()),
        Err(e) => return Err(ClusterError::api("look for the kt agent")(e)),
    };
    let mut ready: Vec<(String, String)> = list
        .items
        .into_iter()
        .filter(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .filter_map(|p| Some((p.metadata.name?, p.spec?.node_name?)))
        .collect();
    ready.sort();
    Ok(ready)
}

/// A ready agent pod (the first by name, so that every session lands on one node), if the
/// agent is installed and visible to this user.
pub async fn first_ready(cluster: &Cluster) -> Result<Option<String>, ClusterError> {
    Ok(ready(cluster).await?.into_iter().next().map(|(pod, _)| pod))
}

/// Creates `session` in `namespace` (logging `Created session <name>`) and has `lifecycle`
/// delete it on the way out (`Cleaning session <name>`). Returns the API the session lives in.
///
/// # Errors
/// [`ClusterError`] when the API server refuses the object (a developer without the
/// `kt-developer` role in that namespace, for one).
pub async fn create_session(
    client: &kube::Client,
    lifecycle: &Lifecycle,
    namespace: &str,
    session: &KtSession,
) -> Result<Api<KtSession>, ClusterError> {
    let name = session.metadata.name.clone().unwrap_or_default();
    let sessions: Api<KtSession> = Api::namespaced(client.clone(), namespace);
    sessions
        .create(&PostParams::default(), session)
        .await
        .map_err(ClusterError::api(format!("create session {name}")))?;
    tracing::info!("Created session {name}");
    let deleting = sessions.clone();
    lifecycle.defer(format!("session {name}"), async move {
        deleting.delete(&name, &DeleteParams::default()).await?;
        tracing::info!("Cleaning session {name}");
        Ok::<(), kube::Error>(())
    });
    Ok(sessions)
}
