//! kt's node agents as a session finds them: the ready pods of the DaemonSet in `deploy/`,
//! and which of them holds a new session ([`choose`]).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Pod, Service};
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
        .filter(is_ready)
        .filter_map(|p| Some((p.metadata.name?, p.spec?.node_name?)))
        .collect();
    ready.sort();
    Ok(ready)
}

/// Whether `pod`'s `Ready` condition is `True`.
fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// A ready agent pod (the first by name), if the agent is installed and visible to this
/// user; for "is the agent installed" and for a moved session's next holder.
pub async fn first_ready(cluster: &Cluster) -> Result<Option<String>, ClusterError> {
    Ok(ready(cluster).await?.into_iter().next().map(|(pod, _)| pod))
}

/// The ready agent that should hold a new session, by [`choose`]'s rule, if the agent is
/// installed and visible to this user. `endpoints` are the Service's ready endpoints by
/// node ([`endpoints_by_node`]; empty for `connect` and `preview`). What it cannot read
/// (other namespaces' sessions) counts as nothing: the rule then falls back to fewer
/// sessions, then to the name.
pub async fn pick(
    cluster: &Cluster,
    endpoints: &BTreeMap<String, usize>,
) -> Result<Option<String>, ClusterError> {
    let agents = ready(cluster).await?;
    if agents.len() < 2 {
        return Ok(agents.into_iter().next().map(|(pod, _)| pod));
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
    let chosen = choose(&agents, endpoints, &held).map(str::to_owned);
    if let Some(pod) = &chosen {
        tracing::debug!(agent = %pod, ?endpoints, ?held, "agent chosen to hold the session");
    }
    Ok(chosen)
}

/// Where `service`'s ready endpoints are, counted per node from `pods`, the pods its
/// selector matches (`ktctl exchange` and `mesh` have listed them already): those not
/// terminating that are ready, or all of them when the Service publishes not-ready
/// addresses — what the EndpointSlice controller marks ready. Counted from the pods rather
/// than from the Service's EndpointSlices, whose list by label the API server answers by
/// scanning every slice of the namespace (10 ms at 10 000 Services on the testbed, the one
/// call of an exchange's start that grew with the cluster).
pub fn endpoints_by_node(service: &Service, pods: &[Pod]) -> BTreeMap<String, usize> {
    let publish_not_ready = service
        .spec
        .as_ref()
        .and_then(|s| s.publish_not_ready_addresses)
        .unwrap_or(false);
    let mut by_node = BTreeMap::new();
    for pod in pods {
        let node = pod.spec.as_ref().and_then(|s| s.node_name.as_ref());
        let counted =
            (publish_not_ready || is_ready(pod)) && pod.metadata.deletion_timestamp.is_none();
        if let (true, Some(node)) = (counted, node) {
            *by_node.entry(node.clone()).or_insert(0) += 1;
        }
    }
    by_node
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
    let created = sessions
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
    // Without this its UDP ports would silently stay with the pods.
    if !session.spec.udp_ports.is_empty() && created.spec.udp_ports.is_empty() {
        return Err(ClusterError::OldCrd {
            kind: "KtSession",
            feature: "UDP exchange",
            field: "spec.udpPorts",
        });
    }
    Ok(sessions)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_pods_count_by_node_and_not_ready_terminating_or_unscheduled_ones_do_not() {
        let pod = |node: Option<&str>, ready: &str, terminating: bool| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "p", "deletionTimestamp":
                    terminating.then_some("2026-01-01T00:00:00Z")},
                "spec": {"containers": [], "nodeName": node},
                "status": {"conditions": [{"type": "Ready", "status": ready}]}
            }))
            .unwrap()
        };
        let pods = [
            pod(Some("node-1"), "True", false),
            pod(Some("node-1"), "True", false),
            pod(Some("node-2"), "True", false),
            pod(Some("node-2"), "False", false),
            pod(Some("node-2"), "True", true),
            pod(None, "True", false),
        ];
        let service = |publish: bool| -> Service {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "web"},
                "spec": {"publishNotReadyAddresses": publish}
            }))
            .unwrap()
        };
        assert_eq!(
            endpoints_by_node(&service(false), &pods),
            BTreeMap::from([("node-1".to_owned(), 2), ("node-2".to_owned(), 1)])
        );
        assert_eq!(
            endpoints_by_node(&service(true), &pods),
            BTreeMap::from([("node-1".to_owned(), 2), ("node-2".to_owned(), 2)]),
            "publishNotReadyAddresses counts the not-ready pod, never the terminating one"
        );
        assert!(endpoints_by_node(&service(false), &[]).is_empty());
    }

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
