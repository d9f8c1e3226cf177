//! The testbed's controllers through the API (unprivileged; the test plays the kubelet by
//! writing pod status): Deployment → ReplicaSet → Pods, scaling, no adoption of pods the
//! controllers do not own, Endpoints/EndpointSlices with named ports, garbage collection,
//! namespace deletion.

use k8s_openapi::api::{
    apps::v1::{Deployment, ReplicaSet},
    core::v1::{ConfigMap, Endpoints, Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kt_testbed::api::api_only::{ApiOptions, UnprivilegedApi};
use kt_tests::harness::eventually::eventually;
use kube::{
    Api, Client, ResourceExt as _,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;

async fn start() -> (UnprivilegedApi, Client) {
    let tier = UnprivilegedApi::start(ApiOptions {
        controllers: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let client = tier.client().await;
    for node in ["node-1", "node-2"] {
        let n: Node = serde_json::from_value(json!({"metadata": {"name": node}})).unwrap();
        Api::<Node>::all(client.clone())
            .create(&PostParams::default(), &n)
            .await
            .unwrap();
    }
    (tier, client)
}

fn deployment(replicas: i32) -> Deployment {
    serde_json::from_value(json!({"metadata": {"name": "web"}, "spec": {"replicas": replicas,
        "selector": {"matchLabels": {"app": "web"}},
        "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [
            {"name": "app", "image": "kt-testbed/http-echo", "ports": [{"name": "http", "containerPort": 8080}]}]}}}}))
    .unwrap()
}

/// Plays the kubelet: every scheduled pod gets an IP and becomes Ready.
async fn run_pods(pods: &Api<Pod>) {
    for (i, pod) in pods
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .enumerate()
    {
        if pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_ref())
            .is_none()
            || pod
                .status
                .as_ref()
                .and_then(|s| s.pod_ip.as_ref())
                .is_some()
        {
            continue;
        }
        let status = json!({"status": {"phase": "Running", "podIP": format!("10.244.1.{}", i + 10),
            "conditions": [{"type": "Ready", "status": "True"}]}});
        pods.patch_status(
            &pod.name_any(),
            &PatchParams::default(),
            &Patch::Merge(status),
        )
        .await
        .unwrap();
    }
}

/// Plays the kubelet: pods being deleted finish terminating.
async fn reap_pods(pods: &Api<Pod>) {
    for pod in pods.list(&ListParams::default()).await.unwrap().items {
        if pod.metadata.deletion_timestamp.is_some() {
            let _ = pods
                .delete(
                    &pod.name_any(),
                    &DeleteParams {
                        grace_period_seconds: Some(0),
                        ..Default::default()
                    },
                )
                .await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_makes_a_replicaset_and_scheduled_pods_and_scales() {
    let (_tier, client) = start().await;
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    deploys
        .create(&PostParams::default(), &deployment(3))
        .await
        .unwrap();

    let rs = eventually("a ReplicaSet", async || {
        Api::<ReplicaSet>::namespaced(client.clone(), "default")
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .pop()
    })
    .await;
    let hash = rs.labels()["pod-template-hash"].clone();
    assert_eq!(rs.name_any(), format!("web-{hash}"));
    assert_eq!(rs.owner_references()[0].kind, "Deployment");

    let listed = eventually("3 scheduled pods", async || {
        let items = pods.list(&ListParams::default()).await.unwrap().items;
        (items.len() == 3
            && items
                .iter()
                .all(|p| p.spec.as_ref().unwrap().node_name.is_some()))
        .then_some(items)
    })
    .await;
    let nodes: std::collections::HashSet<_> = listed
        .iter()
        .map(|p| p.spec.as_ref().unwrap().node_name.clone().unwrap())
        .collect();
    assert_eq!(nodes.len(), 2, "pods are spread over both nodes");
    assert!(
        listed
            .iter()
            .all(|p| p.labels()["pod-template-hash"] == hash
                && p.name_any().starts_with(&format!("web-{hash}-")))
    );

    run_pods(&pods).await;
    eventually("deployment available", async || {
        let s = deploys.get("web").await.unwrap().status?;
        (s.available_replicas == Some(3)
            && s.updated_replicas == Some(3)
            && s.observed_generation == Some(1))
        .then_some(())
    })
    .await;

    deploys
        .patch_scale(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 1}})),
        )
        .await
        .unwrap();
    eventually("scale down to one pod", async || {
        let items = pods.list(&ListParams::default()).await.unwrap().items;
        (items
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .count()
            == 1)
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controllers_leave_foreign_pods_with_the_apps_labels_alone() {
    let (_tier, client) = start().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    // kt's shadow pod carries the app's labels but no pod-template-hash and no owner.
    let shadow: Pod = serde_json::from_value(json!({"metadata": {"name": "web-kt-exchange-abcde", "labels": {"app": "web", "kt-role": "shadow-exchange"}},
        "spec": {"containers": [{"name": "standalone", "image": "kt-connect-shadow"}]}})).unwrap();
    pods.create(&PostParams::default(), &shadow).await.unwrap();
    Api::<Deployment>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &deployment(2))
        .await
        .unwrap();
    eventually("2 deployment pods", async || {
        let n = pods
            .list(&ListParams::default().labels("pod-template-hash"))
            .await
            .unwrap()
            .items
            .len();
        (n == 2).then_some(())
    })
    .await;
    // A ReplicaSet pass that counted both of its pods has run with the shadow pod present:
    // it would have adopted the shadow there, and the garbage collector runs as often.
    let replicasets: Api<ReplicaSet> = Api::namespaced(client.clone(), "default");
    eventually("a ReplicaSet pass that saw its 2 pods", async || {
        let listed = replicasets.list(&ListParams::default()).await.unwrap();
        let status = listed.items.first().and_then(|rs| rs.status.clone());
        status.filter(|s| s.replicas == 2)
    })
    .await;
    let shadow = pods.get("web-kt-exchange-abcde").await.unwrap();
    assert!(
        shadow.metadata.owner_references.is_none(),
        "shadow pod was adopted"
    );
    assert!(
        shadow.metadata.deletion_timestamp.is_none(),
        "shadow pod was deleted"
    );
    assert_eq!(
        pods.list(&ListParams::default()).await.unwrap().items.len(),
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_follow_ready_pods_with_named_ports() {
    let (_tier, client) = start().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    Api::<Deployment>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &deployment(2))
        .await
        .unwrap();
    let svc: Service = serde_json::from_value(
        json!({"metadata": {"name": "web"}, "spec": {"selector": {"app": "web"},
        "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}),
    )
    .unwrap();
    Api::<Service>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &svc)
        .await
        .unwrap();
    eventually("2 scheduled pods", async || {
        let items = pods.list(&ListParams::default()).await.unwrap().items;
        (items.len() == 2
            && items
                .iter()
                .all(|p| p.spec.as_ref().unwrap().node_name.is_some()))
        .then_some(())
    })
    .await;
    run_pods(&pods).await;

    let endpoints: Api<Endpoints> = Api::namespaced(client.clone(), "default");
    let subset = eventually("2 ready addresses", async || {
        let ep = endpoints.get_opt("web").await.unwrap()?;
        let subset = ep.subsets?.pop()?;
        (subset.addresses.as_ref()?.len() == 2).then_some(subset)
    })
    .await;
    assert_eq!(
        subset.ports.unwrap()[0].port,
        8080,
        "named targetPort resolved"
    );

    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    let slice = eventually("a slice", async || {
        slices
            .list(&ListParams::default().labels("kubernetes.io/service-name=web"))
            .await
            .unwrap()
            .items
            .pop()
    })
    .await;
    assert_eq!(slice.endpoints.len(), 2);
    assert!(
        slice
            .endpoints
            .iter()
            .all(|e| e.conditions.as_ref().unwrap().ready == Some(true))
    );

    Api::<Deployment>::namespaced(client.clone(), "default")
        .patch_scale(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 0}})),
        )
        .await
        .unwrap();
    eventually("no ready addresses", async || {
        let ep = endpoints.get("web").await.unwrap();
        ep.subsets
            .as_ref()
            .is_none_or(|s| {
                s.iter()
                    .all(|s| s.addresses.as_ref().is_none_or(Vec::is_empty))
            })
            .then_some(())
    })
    .await;
}

/// A Service without a selector whose Endpoints someone wrote by hand gets an EndpointSlice
/// mirroring them (Kubernetes' EndpointSlice mirroring controller), owned by the Endpoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_endpoints_of_a_selectorless_service_are_mirrored_into_a_slice() {
    let (_tier, client) = start().await;
    let svc: Service = serde_json::from_value(
        json!({"metadata": {"name": "db"}, "spec": {"ports": [{"port": 5432}]}}),
    )
    .unwrap();
    Api::<Service>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &svc)
        .await
        .unwrap();
    let ep: Endpoints = serde_json::from_value(json!({"metadata": {"name": "db"},
        "subsets": [{"addresses": [{"ip": "192.168.7.10"}], "ports": [{"port": 5432}]}]}))
    .unwrap();
    let endpoints: Api<Endpoints> = Api::namespaced(client.clone(), "default");
    endpoints.create(&PostParams::default(), &ep).await.unwrap();
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    let slice = eventually("a mirrored slice", async || {
        slices
            .list(&ListParams::default().labels("kubernetes.io/service-name=db"))
            .await
            .unwrap()
            .items
            .pop()
    })
    .await;
    assert_eq!(
        slice.labels()["endpointslice.kubernetes.io/managed-by"],
        "endpointslicemirroring-controller.k8s.io"
    );
    assert_eq!(slice.endpoints[0].addresses, ["192.168.7.10"]);
    let port = &slice.ports.as_ref().unwrap()[0];
    assert_eq!((port.name.as_deref(), port.port), (Some(""), Some(5432)));
    assert_eq!(
        slice.owner_references()[0].kind,
        "Endpoints",
        "the slice goes with the Endpoints"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_owners_collects_dependents_and_namespaces_empty_themselves() {
    let (_tier, client) = start().await;
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "scratch"}})).unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), "scratch");
    deploys
        .create(&PostParams::default(), &deployment(2))
        .await
        .unwrap();
    let rss: Api<ReplicaSet> = Api::namespaced(client.clone(), "scratch");
    eventually("a ReplicaSet", async || {
        rss.list(&ListParams::default()).await.unwrap().items.pop()
    })
    .await;
    deploys
        .delete("web", &DeleteParams::default())
        .await
        .unwrap();
    eventually("ReplicaSets and pods collected", async || {
        let pods = Api::<Pod>::namespaced(client.clone(), "scratch")
            .list(&ListParams::default())
            .await
            .unwrap()
            .items;
        let live_pods = pods
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .count();
        (rss.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
            && live_pods == 0)
            .then_some(())
    })
    .await;

    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "scratch");
    let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "c"}})).unwrap();
    cms.create(&PostParams::default(), &cm).await.unwrap();
    let accounts =
        Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(client.clone(), "scratch");
    eventually("the default ServiceAccount", async || {
        accounts.get_opt("default").await.unwrap()
    })
    .await;
    Api::<Namespace>::all(client.clone())
        .delete("scratch", &DeleteParams::default())
        .await
        .unwrap();
    let pods = Api::<Pod>::namespaced(client.clone(), "scratch");
    eventually("namespace gone", async || {
        reap_pods(&pods).await;
        Api::<Namespace>::all(client.clone())
            .get_opt("scratch")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    assert!(
        cms.list(&ListParams::default()).await.is_err()
            || cms
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemonset_runs_one_pod_per_node() {
    let (_tier, client) = start().await;
    let ds: k8s_openapi::api::apps::v1::DaemonSet = serde_json::from_value(json!({"metadata": {"name": "agent"}, "spec": {
        "selector": {"matchLabels": {"app": "agent"}},
        "template": {"metadata": {"labels": {"app": "agent"}}, "spec": {"hostNetwork": true, "containers": [{"name": "a", "image": "kt-node-agent"}]}}}})).unwrap();
    Api::<k8s_openapi::api::apps::v1::DaemonSet>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &ds)
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let nodes = eventually("one pod per node", async || {
        let items = pods
            .list(&ListParams::default().labels("app=agent"))
            .await
            .unwrap()
            .items;
        let nodes: std::collections::BTreeSet<String> = items
            .iter()
            .filter_map(|p| p.spec.as_ref()?.node_name.clone())
            .collect();
        (items.len() == 2 && nodes.len() == 2).then_some(nodes)
    })
    .await;
    assert_eq!(nodes.into_iter().collect::<Vec<_>>(), ["node-1", "node-2"]);
    // A pod deleted (and finished by its kubelet) is replaced on the same node.
    let victim = pods
        .list(&ListParams::default().labels("app=agent"))
        .await
        .unwrap()
        .items
        .remove(0);
    pods.delete(
        &victim.name_any(),
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    eventually("a replacement", async || {
        let items = pods
            .list(&ListParams::default().labels("app=agent"))
            .await
            .unwrap()
            .items;
        (items.len() == 2 && items.iter().all(|p| p.name_any() != victim.name_any())).then_some(())
    })
    .await;
}
