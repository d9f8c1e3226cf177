//! kt's node agents as a session finds them: the ready pods of the DaemonSet in `deploy/`,
//! and which of them holds a new session ([`choose`]).

use std::collections::BTreeMap;

use k8s_openapi::api::{core::v1::Pod, discovery::v1::EndpointSlice};
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

/// A ready agent pod (the first by name), if the agent is installed and visible to this
/// user; for "is the agent installed" and for a moved session's next holder.
pub async fn first_ready(cluster: &Cluster) -> Result<Option<String>, ClusterError> {
    Ok(ready(cluster).await?.into_iter().next().map(|(pod, _)| pod))
}

/// The ready agent that should hold a new session for `service` (none for `connect`), by
/// [`choose`]'s rule, if the agent is installed and visible to this user. What it cannot
/// read (the Service's EndpointSlices, other namespaces' sessions) counts as nothing: the
/// rule then falls back to fewer sessions, then to the name.
pub async fn pick(
    cluster: &Cluster,
    service: Option<&str>,
) -> Result<Option<String>, ClusterError> {
    let agents = ready(cluster).await?;
    if agents.len() < 2 {
        return Ok(agents.into_iter().next().map(|(pod, _)| pod));
    }
    let mut endpoints = BTreeMap::new();
    if let Some(service) = service {
        let slices: Api<EndpointSlice> =
            Api::namespaced(cluster.client.clone(), &cluster.namespace);
        let params = ListParams::default().labels(&format!("kubernetes.io/service-name={service}"));
        if let Ok(list) = slices.list(&params).await {
            for endpoint in list.items.iter().flat_map(|s| &s.endpoints) {
                let ready = endpoint
                    .conditions
                    .as_ref()
                    .and_then(|c| c.ready)
                    .unwrap_or(true);
                if let (true, Some(node)) = (ready, &endpoint.node_name) {
                    *endpoints.entry(node.clone()).or_insert(0) += 1;
                }
            }
        }
    }
    // Every session visible: cluster-wide when this user may list them, else this namespace.
    let everywhere: Api<KtSession> = Api::all(cluster.client.clone());
    let here: Api<KtSession> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    let sessions = match everywhere.list(&ListParams::default()).await {
        Ok(list) => list.items,
        Err(_) => here
            .list(&ListParams::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default(),
    };
    let now = cluster.clock.now();
    let mut held = BTreeMap::new();
    for session in sessions.iter().filter(|s| s.lease_live(now)) {
        if let Some(status) = session.status.as_ref().filter(|s| !s.node.is_empty()) {
            *held.entry(status.node.clone()).or_insert(0) += 1;
        }
    }
    let chosen = choose(&agents, &endpoints, &held).map(str::to_owned);
    if let Some(pod) = &chosen {
        tracing::debug!(agent = %pod, ?endpoints, ?held, "agent chosen to hold the session");
    }
    Ok(chosen)
}

/// Which of the ready `agents` (pod, node) holds a new session: the one on the node with
/// the most of the Service's ready `endpoints` (so that the pods' traffic to the workstation
/// leaves from where most of it starts, and one node does not carry every developer's
/// bytes), then the one whose node `held` fewest sessions, then the first by pod name.
pub fn choose<'a>(
    agents: &'a [(String, String)],
    endpoints: &BTreeMap<String, usize>,
    held: &BTreeMap<String, usize>,
) -> Option<&'a str> {
    agents
        .iter()
        .min_by_key(|(pod, node)| {
            (
                std::cmp::Reverse(endpoints.get(node).copied().unwrap_or(0)),
                held.get(node).copied().unwrap_or(0),
                pod.clone(),
            )
        })
        .map(|(pod, _)| pod.as_str())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn agents() -> Vec<(String, String)> {
        ["node-1", "node-2", "node-3"]
            .iter()
            .map(|node| (format!("kt-node-agent-{}", &node[5..]), (*node).to_owned()))
            .collect()
    }

    fn counts(pairs: &[(&str, usize)]) -> BTreeMap<String, usize> {
        pairs.iter().map(|(n, c)| ((*n).to_owned(), *c)).collect()
    }

    #[test]
    fn the_node_with_most_endpoints_then_fewest_sessions_then_the_name_wins() {
        let agents = agents();
        let none = BTreeMap::new();
        assert_eq!(
            choose(&agents, &counts(&[("node-2", 1), ("node-3", 2)]), &none),
            Some("kt-node-agent-3")
        );
        // No endpoints (connect, preview, a Service without pods): fewest sessions.
        assert_eq!(
            choose(&agents, &none, &counts(&[("node-1", 4), ("node-3", 1)])),
            Some("kt-node-agent-2")
        );
        // Endpoints win over load; equal endpoints go to the less loaded node.
        let endpoints = counts(&[("node-1", 2), ("node-2", 2)]);
        assert_eq!(
            choose(&agents, &endpoints, &counts(&[("node-1", 9)])),
            Some("kt-node-agent-2")
        );
        assert_eq!(choose(&agents, &none, &none), Some("kt-node-agent-1"));
        assert_eq!(choose(&[], &none, &none), None);
    }

    #[test]
    fn a_hundred_sessions_without_endpoints_spread_evenly() {
        let agents = agents();
        let mut held = BTreeMap::new();
        for _ in 0..100 {
            let pod = choose(&agents, &BTreeMap::new(), &held).unwrap();
            let node = &agents.iter().find(|(p, _)| p == pod).unwrap().1;
            *held.entry(node.clone()).or_insert(0) += 1;
        }
        assert_eq!(held.values().copied().collect::<Vec<_>>(), [34, 33, 33]);
    }
}
