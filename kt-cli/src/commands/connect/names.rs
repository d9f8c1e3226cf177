//! Cluster names kept current from watches: `--dnsMode hosts[:ns,…]` writes the Services of
//! those namespaces into the hosts file between v0.3.7's markers (`svc` for the current
//! namespace, `svc.ns` and `svc.ns.svc.<domain>` for every one; a headless Service by its
//! first ready endpoint), rewritten as Services and endpoints change; `--ingressIp` needs
//! the namespace's Ingress hosts.

use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
    sync::{Arc, RwLock},
    time::Duration,
};

use futures::StreamExt as _;
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice, networking::v1::Ingress};
use kube::{
    Api,
    runtime::{WatchStreamExt as _, reflector, watcher},
};
use tokio::sync::Notify;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{plan, system::Edit};

/// How long to gather changes before rewriting the hosts file.
const SETTLE: Duration = Duration::from_millis(200);

/// The hosts entries for `services` (with their EndpointSlices), current namespace first.
pub(super) fn entries(
    services: &[Arc<Service>],
    slices: &[Arc<EndpointSlice>],
    current: &str,
    domain: &str,
) -> Vec<(String, IpAddr)> {
    let mut by_name: BTreeMap<(String, String), IpAddr> = BTreeMap::new();
    for service in services {
        let (Some(name), Some(ns)) = (&service.metadata.name, &service.metadata.namespace) else {
            continue;
        };
        let cluster_ip = service
            .spec
            .as_ref()
            .and_then(|s| s.cluster_ip.as_deref())
            .and_then(|ip| ip.parse::<IpAddr>().ok());
        let address = cluster_ip.or_else(|| first_ready_endpoint(slices, ns, name));
        if let Some(address) = address {
            by_name.insert((ns.clone(), name.clone()), address);
        }
    }
    let mut out = Vec::new();
    for ((ns, name), address) in &by_name {
        if ns == current {
            out.push((name.clone(), *address));
        }
        out.push((format!("{name}.{ns}"), *address));
        out.push((format!("{name}.{ns}.svc.{domain}"), *address));
    }
    out
}

/// A headless Service's first ready endpoint (v0.3.7 names its first pod).
fn first_ready_endpoint(slices: &[Arc<EndpointSlice>], ns: &str, service: &str) -> Option<IpAddr> {
    let mut mine: Vec<&Arc<EndpointSlice>> = slices
        .iter()
        .filter(|s| {
            s.metadata.namespace.as_deref() == Some(ns)
                && s.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get("kubernetes.io/service-name"))
                    .is_some_and(|n| n == service)
        })
        .collect();
    mine.sort_by_key(|s| s.metadata.name.clone());
    mine.iter()
        .flat_map(|s| s.endpoints.iter())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
        .flat_map(|e| e.addresses.iter())
        .find_map(|a| a.parse().ok())
}

/// A watched list of one kind in one namespace, and its readiness.
fn watch_into<K>(
    api: Api<K>,
    changed: Arc<Notify>,
    tasks: &TaskTracker,
    stop: CancellationToken,
) -> reflector::Store<K>
where
    K: kube::Resource
        + Clone
        + std::fmt::Debug
        + Send
        + Sync
        + k8s_openapi::serde::de::DeserializeOwned
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (store, writer) = reflector::store();
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .applied_objects();
    tasks.spawn(async move {
        let mut stream = std::pin::pin!(stream);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                next = stream.next() => match next {
                    Some(Ok(_)) => changed.notify_one(),
                    Some(Err(error)) => tracing::debug!(%error, "watch error, retrying"),
                    None => return,
                },
            }
        }
    });
    store
}

/// Writes the hosts block for `namespaces` now and keeps it current until `stop`.
pub(super) async fn keep_hosts(
    client: &kube::Client,
    namespaces: &[String],
    current: &str,
    domain: &str,
    edit: Arc<Edit>,
    tasks: &TaskTracker,
    stop: CancellationToken,
) {
    let changed = Arc::new(Notify::new());
    let mut stores = Vec::new();
    for ns in namespaces {
        let services = watch_into(
            Api::<Service>::namespaced(client.clone(), ns),
            changed.clone(),
            tasks,
            stop.clone(),
        );
        let slices = watch_into(
            Api::<EndpointSlice>::namespaced(client.clone(), ns),
            changed.clone(),
            tasks,
            stop.clone(),
        );
        stores.push((services, slices));
    }
    for (services, slices) in &stores {
        let _ = services.wait_until_ready().await;
        let _ = slices.wait_until_ready().await;
    }
    let (current, domain) = (current.to_owned(), domain.to_owned());
    let write = move |stores: &[(reflector::Store<Service>, reflector::Store<EndpointSlice>)]| {
        let services: Vec<Arc<Service>> = stores.iter().flat_map(|(s, _)| s.state()).collect();
        let slices: Vec<Arc<EndpointSlice>> = stores.iter().flat_map(|(_, e)| e.state()).collect();
        let entries = entries(&services, &slices, &current, &domain);
        if let Err(error) = edit.update(|base| plan::with_hosts_block(base, &entries)) {
            tracing::warn!("Failed to update hosts: {}", kt_proto::error_chain(&error));
        }
    };
    write(&stores);
    tracing::info!("Dump hosts successful");
    tasks.spawn(async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = changed.notified() => {}
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(SETTLE) => write(&stores),
            }
        }
    });
}

/// The hosts of the Ingresses in `namespace`, kept current until `stop` (`--ingressIp`).
pub(super) fn ingress_hosts(
    client: &kube::Client,
    namespace: &str,
    tasks: &TaskTracker,
    stop: CancellationToken,
) -> Arc<RwLock<HashSet<String>>> {
    let hosts: Arc<RwLock<HashSet<String>>> = Arc::default();
    let changed = Arc::new(Notify::new());
    let store = watch_into(
        Api::<Ingress>::namespaced(client.clone(), namespace),
        changed.clone(),
        tasks,
        stop.clone(),
    );
    let shared = hosts.clone();
    tasks.spawn(async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = changed.notified() => {}
            }
            let found: HashSet<String> = store
                .state()
                .iter()
                .filter_map(|i| i.spec.as_ref()?.rules.as_ref())
                .flatten()
                .filter_map(|r| r.host.clone())
                .map(|h| h.to_ascii_lowercase())
                .collect();
            *shared.write().unwrap_or_else(|e| e.into_inner()) = found;
        }
    });
    hosts
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn hosts_entries_name_services_as_pods_do() {
        let svc = |ns: &str, name: &str, ip: &str| -> Arc<Service> {
            Arc::new(
                serde_json::from_value(
                    json!({"metadata": {"name": name, "namespace": ns}, "spec": {"clusterIP": ip}}),
                )
                .unwrap(),
            )
        };
        let slice: Arc<EndpointSlice> = Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": "peers-x", "namespace": "dev", "labels": {"kubernetes.io/service-name": "peers"}},
                "addressType": "IPv4",
                "endpoints": [
                    {"addresses": ["10.244.1.9"], "conditions": {"ready": false}},
                    {"addresses": ["10.244.1.7"], "conditions": {"ready": true}}
                ]
            }))
            .unwrap(),
        );
        let services = [
            svc("dev", "web", "10.96.0.5"),
            svc("dev", "peers", "None"),
            svc("other", "db", "10.96.0.9"),
        ];
        let shown: Vec<String> = entries(&services, &[slice], "dev", "cluster.local")
            .iter()
            .map(|(n, ip)| format!("{ip} {n}"))
            .collect();
        assert_eq!(
            shown,
            [
                "10.244.1.7 peers",
                "10.244.1.7 peers.dev",
                "10.244.1.7 peers.dev.svc.cluster.local",
                "10.96.0.5 web",
                "10.96.0.5 web.dev",
                "10.96.0.5 web.dev.svc.cluster.local",
                "10.96.0.9 db.other",
                "10.96.0.9 db.other.svc.cluster.local",
            ]
        );
    }
}
