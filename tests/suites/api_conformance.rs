//! The API stand-in driven by kube-rs: CRUD and exact Status reasons, watch semantics
//! (410 → relist, bookmarks, selector transitions), paging, every patch type, graceful
//! deletion and finalizers. Unprivileged: no kubelets, no network namespaces.

use std::{sync::atomic::Ordering, time::Duration};

use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{ConfigMap, Pod, Secret},
};
use kt_testbed::api::api_only::{ApiOptions, UnprivilegedApi};
use kt_tests::harness::eventually::eventually;
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams},
    runtime::{WatchStreamExt as _, reflector, watcher},
};
use serde_json::json;

fn cm(name: &str, labels: serde_json::Value) -> ConfigMap {
    serde_json::from_value(
        json!({"metadata": {"name": name, "labels": labels}, "data": {"k": "v"}}),
    )
    .unwrap()
}

fn reason(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => s.reason.clone(),
        other => panic!("not an API error: {other:?}"),
    }
}

async fn start(options: ApiOptions) -> (UnprivilegedApi, Client) {
    let tier = UnprivilegedApi::start(options).await.unwrap();
    let client = tier.client().await;
    (tier, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crud_answers_with_the_api_servers_status_reasons() {
    let (_tier, client) = start(ApiOptions::default()).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let created = cms
        .create(&PostParams::default(), &cm("a", json!({})))
        .await
        .unwrap();
    let meta = &created.metadata;
    assert!(
        meta.uid.is_some() && meta.creation_timestamp.is_some() && meta.resource_version.is_some()
    );

    let err = cms
        .create(&PostParams::default(), &cm("a", json!({})))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "AlreadyExists");
    assert!(cms.get_opt("missing").await.unwrap().is_none());
    assert_eq!(reason(&cms.get("missing").await.unwrap_err()), "NotFound");

    let mut stale = created.clone();
    let mut fresh = created.clone();
    fresh.data = Some([("k".to_string(), "2".to_string())].into());
    cms.replace("a", &PostParams::default(), &fresh)
        .await
        .unwrap();
    stale.data = Some([("k".to_string(), "3".to_string())].into());
    assert_eq!(
        reason(
            &cms.replace("a", &PostParams::default(), &stale)
                .await
                .unwrap_err()
        ),
        "Conflict"
    );

    assert_eq!(
        reason(
            &cms.create(&PostParams::default(), &cm("Bad_Name", json!({})))
                .await
                .unwrap_err()
        ),
        "Invalid"
    );
    let elsewhere: Api<ConfigMap> = Api::namespaced(client.clone(), "nope");
    let err = elsewhere
        .create(&PostParams::default(), &cm("a", json!({})))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "NotFound");

    let mut generated = cm("", json!({}));
    generated.metadata.generate_name = Some("gen-".into());
    let name = cms
        .create(&PostParams::default(), &generated)
        .await
        .unwrap()
        .metadata
        .name
        .unwrap();
    assert!(name.starts_with("gen-") && name.len() == 9, "{name}");

    let err = Api::<Pod>::namespaced(client, "default")
        .list(&ListParams::default().fields("spec.bogus=1"))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "BadRequest");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_relists_after_410_and_stays_consistent() {
    let (tier, client) = start(ApiOptions {
        history: 5,
        ..Default::default()
    })
    .await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "default");
    cms.create(&PostParams::default(), &cm("first", json!({})))
        .await
        .unwrap();

    let (reader, writer) = reflector::store();
    let stream = reflector(
        writer,
        watcher(cms.clone(), watcher::Config::default().disable_bookmarks()),
    )
    .applied_objects()
    .boxed();
    let driver = tokio::spawn(stream.for_each(|_| async {}));
    reader.wait_until_ready().await.unwrap();
    assert_eq!(reader.state().len(), 1);

    // The watcher's last revision falls out of the 5-event history.
    for i in 0..20 {
        let s: Secret =
            serde_json::from_value(json!({"metadata": {"name": format!("s{i}")}})).unwrap();
        secrets.create(&PostParams::default(), &s).await.unwrap();
    }
    tier.api.restart_watches();
    eventually("a 410 answer", async || {
        tier.api.expired_watches.load(Ordering::Relaxed) > 0
    })
    .await;

    // After the relist, the reflector follows changes again.
    cms.create(&PostParams::default(), &cm("second", json!({})))
        .await
        .unwrap();
    cms.delete("first", &DeleteParams::default()).await.unwrap();
    eventually("reflector to see the changes", async || {
        let names: Vec<String> = reader
            .state()
            .iter()
            .filter_map(|c| c.metadata.name.clone())
            .collect();
        names == ["second"]
    })
    .await;
    driver.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_sends_bookmarks_and_selector_transitions() {
    let (_tier, client) = start(ApiOptions {
        bookmark_interval: Duration::from_millis(200),
        ..Default::default()
    })
    .await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let rv = cms
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut events = cms
        .watch(&WatchParams::default().labels("app=a").timeout(10), &rv)
        .await
        .unwrap()
        .boxed();

    cms.create(&PostParams::default(), &cm("x", json!({"app": "a"})))
        .await
        .unwrap();
    let relabel = |app: &str| Patch::Merge(json!({"metadata": {"labels": {"app": app}}}));
    cms.patch("x", &PatchParams::default(), &relabel("b"))
        .await
        .unwrap();
    cms.patch("x", &PatchParams::default(), &relabel("a"))
        .await
        .unwrap();
    cms.create(&PostParams::default(), &cm("other", json!({"app": "c"})))
        .await
        .unwrap();
    cms.delete("x", &DeleteParams::default()).await.unwrap();

    let mut seen = Vec::new();
    let mut bookmark = None;
    while seen.len() < 4 || bookmark.is_none() {
        let ev = tokio::time::timeout(Duration::from_secs(5), events.try_next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        match ev {
            WatchEvent::Added(c) => seen.push(format!("ADDED {}", c.metadata.name.unwrap())),
            WatchEvent::Modified(c) => seen.push(format!("MODIFIED {}", c.metadata.name.unwrap())),
            WatchEvent::Deleted(c) => seen.push(format!("DELETED {}", c.metadata.name.unwrap())),
            WatchEvent::Bookmark(b) => bookmark = Some(b.metadata.resource_version),
            WatchEvent::Error(e) => panic!("{e:?}"),
        }
    }
    // Relabelling out of the selector is a DELETED, back in an ADDED; "other" never shows.
    assert_eq!(seen, ["ADDED x", "DELETED x", "ADDED x", "DELETED x"]);
    assert!(!bookmark.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_from_a_compacted_revision_is_an_error_event_with_410() {
    let (_tier, client) = start(ApiOptions {
        history: 3,
        ..Default::default()
    })
    .await;
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    for i in 0..10 {
        cms.create(&PostParams::default(), &cm(&format!("c{i}"), json!({})))
            .await
            .unwrap();
    }
    let mut events = cms
        .watch(&WatchParams::default(), "2")
        .await
        .unwrap()
        .boxed();
    match events.try_next().await.unwrap().unwrap() {
        WatchEvent::Error(e) => assert_eq!((e.code, e.reason.as_str()), (410, "Expired")),
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_pages_with_limit_and_continue() {
    let (_tier, client) = start(ApiOptions::default()).await;
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    for i in 0..25 {
        cms.create(
            &PostParams::default(),
            &cm(&format!("p{i:02}"), json!({"page": "yes"})),
        )
        .await
        .unwrap();
    }
    let mut names = Vec::new();
    let mut token: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut params = ListParams::default().labels("page=yes").limit(10);
        if let Some(t) = &token {
            params = params.continue_token(t);
        }
        let page = cms.list(&params).await.unwrap();
        pages += 1;
        names.extend(page.items.into_iter().map(|c| c.metadata.name.unwrap()));
        token = page.metadata.continue_.filter(|t| !t.is_empty());
        if token.is_none() {
            break;
        }
    }
    assert_eq!(pages, 3);
    let expected: Vec<String> = (0..25).map(|i| format!("p{i:02}")).collect();
    assert_eq!(names, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_patch_type_applies() {
    let (_tier, client) = start(ApiOptions::default()).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    cms.create(&PostParams::default(), &cm("p", json!({"a": "1"})))
        .await
        .unwrap();
    let pp = PatchParams::default();

    let merged = cms
        .patch(
            "p",
            &pp,
            &Patch::Merge(json!({"data": {"k": null, "n": "1"}})),
        )
        .await
        .unwrap();
    assert_eq!(
        merged.data.unwrap(),
        [("n".to_string(), "1".to_string())].into()
    );

    let ops: json_patch::Patch = serde_json::from_value(json!([{"op": "add", "path": "/metadata/annotations", "value": {"kt-last-heart-beat": "1"}}])).unwrap();
    let patched = cms.patch("p", &pp, &Patch::<()>::Json(ops)).await.unwrap();
    assert_eq!(
        patched.metadata.annotations.unwrap()["kt-last-heart-beat"],
        "1"
    );
    let bad: json_patch::Patch =
        serde_json::from_value(json!([{"op": "replace", "path": "/nope/x", "value": 1}])).unwrap();
    assert!(cms.patch("p", &pp, &Patch::<()>::Json(bad)).await.is_err());

    let applied = cms
        .patch("applied", &PatchParams::apply("kt-test"), &Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "applied"}, "data": {"x": "1"}})))
        .await
        .unwrap();
    assert_eq!(applied.data.unwrap()["x"], "1");

    let deploys: Api<Deployment> = Api::namespaced(client, "default");
    let d: Deployment = serde_json::from_value(json!({"metadata": {"name": "web"}, "spec": {
        "selector": {"matchLabels": {"app": "web"}},
        "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [
            {"name": "app", "image": "echo:1"}, {"name": "side", "image": "side:1"}]}}}}))
    .unwrap();
    let created = deploys.create(&PostParams::default(), &d).await.unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    let smp = json!({"spec": {"template": {"spec": {"containers": [{"name": "app", "image": "echo:2"}]}}}});
    let updated = deploys
        .patch("web", &pp, &Patch::Strategic(smp))
        .await
        .unwrap();
    let containers = updated.spec.unwrap().template.spec.unwrap().containers;
    assert_eq!(
        containers.len(),
        2,
        "strategic merge keeps the other container"
    );
    assert_eq!(containers[0].image.as_deref(), Some("echo:2"));
    assert_eq!(updated.metadata.generation, Some(2));

    let scaled = deploys
        .patch_scale("web", &pp, &Patch::Merge(json!({"spec": {"replicas": 3}})))
        .await
        .unwrap();
    assert_eq!(scaled.spec.unwrap().replicas, Some(3));
    assert_eq!(
        deploys.get("web").await.unwrap().spec.unwrap().replicas,
        Some(3)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_deletion_and_finalizers() {
    let (_tier, client) = start(ApiOptions::default()).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "x"}]}})).unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    pods.delete("p", &DeleteParams::default()).await.unwrap();
    let terminating = pods.get("p").await.unwrap();
    assert!(terminating.metadata.deletion_timestamp.is_some());
    assert_eq!(terminating.metadata.deletion_grace_period_seconds, Some(30));
    // A same-name create during termination is refused, as in a cluster.
    assert_eq!(
        reason(&pods.create(&PostParams::default(), &pod).await.unwrap_err()),
        "AlreadyExists"
    );
    pods.delete(
        "p",
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(pods.get_opt("p").await.unwrap().is_none());

    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    let mut held = cm("held", json!({}));
    held.metadata.finalizers = Some(vec!["kt.dev/test".into()]);
    cms.create(&PostParams::default(), &held).await.unwrap();
    cms.delete("held", &DeleteParams::default()).await.unwrap();
    let pending = cms.get("held").await.unwrap();
    assert!(pending.metadata.deletion_timestamp.is_some());
    let add = Patch::Merge(json!({"metadata": {"finalizers": ["kt.dev/test", "kt.dev/new"]}}));
    assert_eq!(
        reason(
            &cms.patch("held", &PatchParams::default(), &add)
                .await
                .unwrap_err()
        ),
        "Invalid"
    );
    cms.patch(
        "held",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    assert!(cms.get_opt("held").await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_created_crd_serves_its_resources() {
    use kube::{
        api::{ApiResource, DynamicObject},
        discovery::Discovery,
    };
    let (_tier, client) = start(ApiOptions::default()).await;
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> = Api::all(client.clone());
    let crd = serde_json::from_value(json!({"metadata": {"name": "sessions.kt.example"},
        "spec": {"group": "kt.example", "scope": "Namespaced",
                 "names": {"plural": "sessions", "singular": "session", "kind": "Session", "shortNames": ["kts"]},
                 "versions": [{"name": "v1alpha1", "served": true, "storage": true,
                               "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}},
                               "subresources": {"status": {}}}]}})).unwrap();
    let created = crds.create(&PostParams::default(), &crd).await.unwrap();
    let established = created.status.unwrap().conditions.unwrap();
    assert!(
        established
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True")
    );

    let discovery = Discovery::new(client.clone()).run().await.unwrap();
    let (resource, caps) = discovery
        .groups()
        .flat_map(|g| g.recommended_resources())
        .find(|(r, _)| r.kind == "Session")
        .expect("discovered");
    assert_eq!(resource.plural, "sessions");
    assert!(caps.subresources.iter().any(|(r, _)| r.plural == "status"));

    let api: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        "default",
        &ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(
            "kt.example",
            "v1alpha1",
            "Session",
        )),
    );
    let obj: DynamicObject = serde_json::from_value(
        json!({"apiVersion": "kt.example/v1alpha1", "kind": "Session",
        "metadata": {"name": "s1"}, "spec": {"service": "web"}}),
    )
    .unwrap();
    api.create(&PostParams::default(), &obj).await.unwrap();
    let status = api
        .patch_status(
            "s1",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"node": "node-1"}})),
        )
        .await
        .unwrap();
    assert_eq!(status.data["status"]["node"], "node-1");
    assert_eq!(
        status.data["spec"]["service"], "web",
        "status writes keep the spec"
    );
    // Strategic merge is for built-in types only, as on a real API server.
    let smp = api
        .patch(
            "s1",
            &PatchParams::default(),
            &Patch::Strategic(json!({"spec": {"x": 1}})),
        )
        .await
        .unwrap_err();
    assert_eq!(reason(&smp), "UnsupportedMediaType");
    crds.delete("sessions.kt.example", &DeleteParams::default())
        .await
        .unwrap();
    assert!(
        api.get("s1").await.is_err(),
        "resources stop being served with their CRD"
    );
}

/// Ephemeral containers as the API server has them (Kubernetes "Ephemeral Containers",
/// `ValidatePodEphemeralContainersUpdate`): not on create, not through a pod update; added
/// through `pods/<name>/ephemeralcontainers` (strategic merge by name, as `kubectl debug`
/// sends it), defaulted, and never removed or changed; fields a container that serves
/// nothing cannot have are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ephemeral_containers_are_added_through_their_subresource_only() {
    let (_tier, client) = start(ApiOptions::default()).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod = |extra: serde_json::Value| -> Pod {
        let mut spec = json!({"containers": [{"name": "app", "image": "kt-testbed/http-echo:1"}]});
        if let Some(list) = extra.as_array() {
            spec["ephemeralContainers"] = json!(list);
        }
        serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": spec})).unwrap()
    };
    let message = |e: kube::Error| match e {
        kube::Error::Api(s) => (s.code, s.message),
        other => panic!("not an API error: {other:?}"),
    };
    let err = pods
        .create(
            &PostParams::default(),
            &pod(json!([{"name": "dbg", "image": "busybox"}])),
        )
        .await
        .unwrap_err();
    assert_eq!(
        message(err),
        (
            422,
            r#"Pod "p" is invalid: spec.ephemeralContainers: Forbidden: cannot be set on create"#
                .into()
        )
    );
    pods.create(&PostParams::default(), &pod(json!(null)))
        .await
        .unwrap();
    let err = pods
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Strategic(
                json!({"spec": {"ephemeralContainers": [{"name": "dbg", "image": "busybox"}]}}),
            ),
        )
        .await
        .unwrap_err();
    let (code, text) = message(err);
    assert_eq!(code, 422);
    assert!(
        text.contains("Forbidden: pod updates may not change fields"),
        "{text}"
    );

    let added = pods
        .patch_ephemeral_containers(
            "p",
            &PatchParams::default(),
            &Patch::Strategic(json!({"metadata": {"labels": {"ignored": "yes"}},
                "spec": {"ephemeralContainers": [{"name": "dbg", "image": "busybox", "targetContainerName": "app"}]}})),
        )
        .await
        .unwrap();
    assert!(
        added.metadata.labels.is_none(),
        "only ephemeral containers change"
    );
    let ec = &added
        .spec
        .as_ref()
        .unwrap()
        .ephemeral_containers
        .as_ref()
        .unwrap()[0];
    assert_eq!(
        (
            ec.name.as_str(),
            ec.termination_message_policy.as_deref(),
            ec.image_pull_policy.as_deref()
        ),
        ("dbg", Some("File"), Some("Always"))
    );
    let read = pods.get_ephemeral_containers("p").await.unwrap();
    assert_eq!(
        read.spec
            .as_ref()
            .unwrap()
            .ephemeral_containers
            .as_ref()
            .unwrap()
            .len(),
        1
    );

    let mut removed = read.clone();
    removed.spec.as_mut().unwrap().ephemeral_containers = Some(Vec::new());
    let err = pods
        .replace_ephemeral_containers("p", &PostParams::default(), &removed)
        .await
        .unwrap_err();
    assert_eq!(
        message(err),
        (
            422,
            "Pod \"p\" is invalid: spec.ephemeralContainers: Forbidden: existing ephemeral containers \"dbg\" may not be removed\n".into()
        )
    );
    let err = pods
        .patch_ephemeral_containers(
            "p",
            &PatchParams::default(),
            &Patch::Strategic(
                json!({"spec": {"ephemeralContainers": [{"name": "dbg", "image": "alpine"}]}}),
            ),
        )
        .await
        .unwrap_err();
    assert!(
        message(err)
            .1
            .contains(r#"existing ephemeral containers "dbg" may not be changed"#)
    );
    let err = pods
        .patch_ephemeral_containers(
            "p",
            &PatchParams::default(),
            &Patch::Strategic(json!({"spec": {"ephemeralContainers": [
                {"name": "app", "image": "busybox", "ports": [{"containerPort": 80}]}]}})),
        )
        .await
        .unwrap_err();
    let (code, text) = message(err);
    assert_eq!(code, 422);
    assert!(
        text.contains(r#"spec.ephemeralContainers[1].name: Duplicate value: "app""#)
            && text.contains("spec.ephemeralContainers[1].ports: Forbidden: cannot be set for an Ephemeral Container"),
        "{text}"
    );
    // A second one, added beside the first.
    let two = pods
        .patch_ephemeral_containers(
            "p",
            &PatchParams::default(),
            &Patch::Strategic(
                json!({"spec": {"ephemeralContainers": [{"name": "dbg-2", "image": "busybox"}]}}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(two.spec.unwrap().ephemeral_containers.unwrap().len(), 2);
}

/// The status subresource's rules, as the API server's strategies apply them (Kubernetes
/// docs, Custom Resources → Status subresource): a create drops `status`; PUT/PATCH of the
/// main resource ignore changes to it; PUT/PATCH of `/status` ignore everything else
/// (labels included, for a custom resource); server-side apply through `/status` does not
/// create. Built-in kinds with the subresource (a Service here) drop it on create too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_subresource_splits_writes_as_the_api_server_does() {
    use k8s_openapi::api::core::v1::Service;
    use kube::api::{ApiResource, DynamicObject};
    let (_tier, client) = start(ApiOptions::default()).await;
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> = Api::all(client.clone());
    let crd = serde_json::from_value(json!({"metadata": {"name": "forms.kt.example"},
        "spec": {"group": "kt.example", "scope": "Namespaced",
                 "names": {"plural": "forms", "singular": "form", "kind": "Form"},
                 "versions": [{"name": "v1", "served": true, "storage": true,
                               "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}},
                               "subresources": {"status": {}}}]}})).unwrap();
    crds.create(&PostParams::default(), &crd).await.unwrap();
    let resource = ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(
        "kt.example",
        "v1",
        "Form",
    ));
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &resource);
    let forged: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "kt.example/v1", "kind": "Form",
        "metadata": {"name": "f"}, "spec": {"a": 1}, "status": {"node": "forged"}}))
    .unwrap();
    let created = api.create(&PostParams::default(), &forged).await.unwrap();
    assert!(created.data.get("status").is_none(), "create drops status");
    assert!(api.get("f").await.unwrap().data.get("status").is_none());

    let written = api
        .patch_status(
            "f",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}, "spec": {"a": 2},
                                 "status": {"node": "real"}})),
        )
        .await
        .unwrap();
    assert_eq!(written.data["status"]["node"], "real");
    assert_eq!(written.data["spec"]["a"], 1, "/status ignores the spec");
    assert!(
        written.metadata.labels.is_none(),
        "/status ignores metadata for a custom resource"
    );

    let main = api
        .patch(
            "f",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"a": 3}, "status": {"node": "forged"}})),
        )
        .await
        .unwrap();
    assert_eq!(main.data["spec"]["a"], 3);
    assert_eq!(
        main.data["status"]["node"], "real",
        "the main resource ignores status"
    );
    let mut put = main.clone();
    put.data["status"] = json!({"node": "forged"});
    let replaced = api
        .replace("f", &PostParams::default(), &put)
        .await
        .unwrap();
    assert_eq!(replaced.data["status"]["node"], "real");

    // Server-side apply: the main resource creates without status; /status does not create.
    let apply = PatchParams::apply("conformance");
    let applied = api
        .patch(
            "g",
            &apply,
            &Patch::Apply(json!({"apiVersion": "kt.example/v1", "kind": "Form",
                                 "metadata": {"name": "g"}, "spec": {}, "status": {"node": "forged"}})),
        )
        .await
        .unwrap();
    assert!(applied.data.get("status").is_none());
    let missing = api
        .patch_status(
            "h",
            &apply,
            &Patch::Apply(json!({"apiVersion": "kt.example/v1", "kind": "Form",
                                 "metadata": {"name": "h"}, "status": {"node": "forged"}})),
        )
        .await
        .unwrap_err();
    assert_eq!(reason(&missing), "NotFound");

    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let svc: Service = serde_json::from_value(json!({"metadata": {"name": "lb"},
        "spec": {"ports": [{"port": 80}]},
        "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.9"}]}}}))
    .unwrap();
    let created = services.create(&PostParams::default(), &svc).await.unwrap();
    assert!(
        created
            .status
            .and_then(|s| s.load_balancer)
            .and_then(|lb| lb.ingress)
            .is_none(),
        "a Service's status is the API server's to set"
    );
}
