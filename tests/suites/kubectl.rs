//! The verbs of a developer's day, run with the installed kubectl (v1.32) against the
//! testbed, each checking the objects a cluster would have: protobuf bodies of every
//! built-in kind (what kubectl's typed clients send), `get all`, `explain`, `get events`,
//! `create job` (unprivileged: the API server alone), and on a simulated cluster
//! `create deployment --port`, `expose`, `run`, `exec deploy/x`, `logs -f`, `scale`,
//! `rollout status|undo`, `delete -l`, `port-forward svc/x` and `pod/x`.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    sync::atomic::Ordering,
    time::Duration,
};

use kt_testbed::api::{
    api_only::{ApiOptions, UnprivilegedApi},
    protobuf,
};
use kt_tests::harness::{
    apps::{apply, start_testbed, who_answers},
    eventually::{eventually, eventually_blocking, patience, poll_within, seen},
    kubectl::{kubectl, kubectl_ok},
};
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt as _;

/// One manifest holding every kind the issue names, as JSON documents a user would write.
fn every_kind() -> Vec<Value> {
    let labels = json!({"app": "all"});
    let template = json!({
        "metadata": {"labels": labels},
        "spec": {"containers": [{
            "name": "app", "image": "kt-testbed/http-echo",
            "ports": [{"name": "http", "containerPort": 8080}],
            "resources": {"limits": {"cpu": "500m", "memory": "64Mi"}},
            "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
            "env": [{"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        }],
        "volumes": [{"name": "scratch", "emptyDir": {}},
                    {"name": "settings", "configMap": {"name": "settings", "optional": true}}]},
    });
    let selector = json!({"matchLabels": labels});
    vec![
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
               "spec": {"replicas": 0, "selector": selector, "template": template,
                        "strategy": {"rollingUpdate": {"maxSurge": 1, "maxUnavailable": "50%"}}}}),
        json!({"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {"name": "rs"},
               "spec": {"replicas": 0, "selector": selector, "template": template}}),
        json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "sts"},
               "spec": {"replicas": 0, "serviceName": "peers", "selector": selector,
                        "template": template}}),
        json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "ds"},
               "spec": {"selector": selector, "template": template}}),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "svc"},
               "spec": {"selector": labels, "ports": [{"name": "http", "port": 80,
                                                       "targetPort": "http"}]}}),
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "pod", "labels": {"x": "y"}},
               "spec": template["spec"]}),
        json!({"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "ext"},
               "subsets": [{"addresses": [{"ip": "192.0.2.1"}],
                            "ports": [{"name": "db", "port": 5432, "protocol": "TCP"}]}]}),
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": "ext-1", "labels": {"kubernetes.io/service-name": "ext"}},
               "addressType": "IPv4",
               "endpoints": [{"addresses": ["192.0.2.1"], "conditions": {"ready": false}}],
               "ports": [{"name": "db", "port": 5432, "protocol": "TCP"}]}),
        json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "job"},
               "spec": {"backoffLimit": 0, "suspend": true,
                        "template": {"spec": {"restartPolicy": "Never",
                                              "containers": [{"name": "c", "image": "busybox",
                                                              "command": ["true"]}]}}}}),
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": "ing"},
               "spec": {"rules": [{"host": "example.test", "http": {"paths": [{
                   "path": "/", "pathType": "Prefix",
                   "backend": {"service": {"name": "svc", "port": {"number": 80}}}}]}}]}}),
        json!({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": "pdb"},
               "spec": {"minAvailable": 0, "selector": selector}}),
        json!({"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
               "metadata": {"name": "hpa"},
               "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "d"},
                        "minReplicas": 1, "maxReplicas": 3,
                        "metrics": [{"type": "Resource", "resource": {"name": "cpu",
                            "target": {"type": "Utilization", "averageUtilization": 50}}}]}}),
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "lease"},
               "spec": {"holderIdentity": "me", "leaseDurationSeconds": 15,
                        "renewTime": "2026-01-02T03:04:05.123456Z"}}),
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"},
               "data": {"a": "1", "empty": ""}}),
    ]
}

/// The plural of a kind in the manifest (for raw paths).
fn path_of(object: &Value, name: &str) -> String {
    let api_version = object["apiVersion"].as_str().unwrap();
    let plural = match object["kind"].as_str().unwrap() {
        "Endpoints" => "endpoints".to_owned(),
        "Ingress" => "ingresses".to_owned(),
        "PodDisruptionBudget" => "poddisruptionbudgets".to_owned(),
        kind => format!("{}s", kind.to_lowercase()),
    };
    let prefix = if api_version.contains('/') {
        format!("/apis/{api_version}")
    } else {
        format!("/api/{api_version}")
    };
    format!("{prefix}/namespaces/default/{plural}/{name}")
}

/// An object as read back, less what differs between two creations of it (identity,
/// allocated addresses, status, what the server derives from the name or uid); `null`
/// fields are absent ones (Go reads them alike).
fn comparable(mut object: Value) -> Value {
    drop_nulls(&mut object);
    let meta = object["metadata"].as_object_mut().unwrap();
    for field in [
        "name",
        "uid",
        "resourceVersion",
        "creationTimestamp",
        "managedFields",
    ] {
        meta.remove(field);
    }
    if let Some(o) = object.as_object_mut() {
        o.remove("status");
    }
    let spec = &mut object["spec"];
    if let Some(spec) = spec.as_object_mut() {
        spec.remove("clusterIP");
        spec.remove("clusterIPs");
    }
    if object["kind"] == "Job" {
        object["spec"].as_object_mut().unwrap().remove("selector");
        object["spec"]["template"]["metadata"]
            .as_object_mut()
            .unwrap()
            .remove("labels");
    }
    object
}

fn drop_nulls(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.retain(|_, v| !v.is_null());
            map.values_mut().for_each(drop_nulls);
        }
        Value::Array(items) => items.iter_mut().for_each(drop_nulls),
        _ => {}
    }
}

/// `k8s\0` + runtime.Unknown for a kind no schema has (a CRD's).
fn envelope_of_unknown_kind(api_version: &str, kind: &str) -> Vec<u8> {
    fn field(number: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![number << 3 | 2, u8::try_from(payload.len()).unwrap()];
        out.extend(payload);
        out
    }
    let mut type_meta = field(1, api_version.as_bytes());
    type_meta.extend(field(2, kind.as_bytes()));
    let mut body = protobuf::MAGIC.to_vec();
    body.extend(field(1, &type_meta));
    body.extend(field(2, b"\x0a\x03\x0a\x01w"));
    body
}

/// POST `body` (protobuf) to `path`; the API's error (code, message) if it fails.
async fn post_protobuf(
    client: &kube::Client,
    path: &str,
    body: Vec<u8>,
) -> Result<Value, (u16, String)> {
    let request = http::Request::post(path)
        .header("Content-Type", "application/vnd.kubernetes.protobuf")
        .header("Accept", "application/json")
        .body(body)
        .unwrap();
    match client.request_text(request).await {
        Ok(text) => Ok(serde_json::from_str(&text).unwrap()),
        Err(kube::Error::Api(status)) => Err((status.code, status.message)),
        Err(other) => panic!("POST {path}: {other}"),
    }
}

fn get_json(kubeconfig: &Path, path: &str) -> Value {
    serde_json::from_str(&kubectl_ok(kubeconfig, &["get", "--raw", path])).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_is_created_from_protobuf_as_from_json() {
    let api = UnprivilegedApi::start(ApiOptions::default()).await.unwrap();
    let client = api.client().await;
    let kc = &api.kubeconfig;

    // kubectl create -f of the manifest (JSON) creates every kind.
    let manifest = every_kind()
        .iter()
        .map(|o| serde_json::to_string(o).unwrap())
        .collect::<Vec<_>>()
        .join("\n---\n");
    let file = kc.with_file_name("every-kind.yaml");
    std::fs::write(&file, manifest).unwrap();
    let created = kubectl_ok(kc, &["create", "-f", file.to_str().unwrap()]);
    assert_eq!(created.lines().count(), every_kind().len(), "{created}");

    // The same objects in protobuf, as client-go's typed clients encode them, read back
    // as their JSON twins do.
    for object in every_kind() {
        let name = object["metadata"]["name"].as_str().unwrap();
        let mut twin = object.clone();
        twin["metadata"]["name"] = json!(format!("{name}-pb"));
        let body = protobuf::encode(&twin).unwrap();
        let collection = path_of(&object, "");
        let collection = collection.trim_end_matches('/');
        if let Err(e) = post_protobuf(&client, collection, body).await {
            panic!("{} in protobuf: {e:?}", object["kind"]);
        }
        let from_json = get_json(kc, &path_of(&object, name));
        let from_protobuf = get_json(kc, &path_of(&object, &format!("{name}-pb")));
        assert_eq!(
            comparable(from_protobuf),
            comparable(from_json),
            "{} from protobuf differs from JSON",
            object["kind"]
        );
    }
    assert_eq!(
        api.api.protobuf_bodies.load(Ordering::Relaxed),
        every_kind().len() as u64
    );

    // A kind outside the schema (a CRD's) is refused with 415, naming it.
    apply(
        kc,
        r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.example.com}
spec:
  group: example.com
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
  - name: v1
    served: true
    storage: true
    schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}
"#,
    );
    let refused = post_protobuf(
        &client,
        "/apis/example.com/v1/namespaces/default/widgets",
        envelope_of_unknown_kind("example.com/v1", "Widget"),
    )
    .await
    .unwrap_err();
    assert_eq!(refused.0, 415, "{refused:?}");
    assert!(refused.1.contains("\"Widget\""), "{refused:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectls_typed_commands_send_protobuf_that_reads_back_as_their_json() {
    let api = UnprivilegedApi::start(ApiOptions::default()).await.unwrap();
    let kc = &api.kubeconfig;
    // Each generator runs for real (kubectl sends protobuf), and as --dry-run=client -o
    // json (what it would send, as JSON) created under another name with create -f.
    let generators: &[(&str, bool, &[&str])] = &[
        (
            "deployment.apps/web",
            true,
            &[
                "create",
                "deployment",
                "web",
                "--image=kt-testbed/http-echo",
                "--port=8080",
                "--replicas=2",
            ],
        ),
        (
            "service/front",
            true,
            &["create", "service", "clusterip", "front", "--tcp=80:8080"],
        ),
        (
            "job.batch/once",
            true,
            &[
                "create",
                "job",
                "once",
                "--image=busybox",
                "--",
                "echo",
                "hi",
            ],
        ),
        (
            "cronjob.batch/nightly",
            true,
            &[
                "create",
                "cronjob",
                "nightly",
                "--image=busybox",
                "--schedule=*/5 * * * *",
                "--",
                "true",
            ],
        ),
        (
            "poddisruptionbudget.policy/budget",
            true,
            &[
                "create",
                "poddisruptionbudget",
                "budget",
                "--selector=app=web",
                "--min-available=1",
            ],
        ),
        (
            "ingress.networking.k8s.io/entry",
            true,
            &["create", "ingress", "entry", "--rule=foo.test/bar=front:80"],
        ),
        (
            "pod/solo",
            false,
            &[
                "run",
                "solo",
                "--image=busybox",
                "--port=80",
                "--labels=app=solo",
                "--",
                "sleep",
                "1000",
            ],
        ),
    ];
    for (resource, protobuf, args) in generators {
        let before = api.api.protobuf_bodies.load(Ordering::Relaxed);
        // The flags go before `--`: after it they would be the container's arguments.
        let mut dry_run = args.to_vec();
        let at = dry_run
            .iter()
            .position(|a| *a == "--")
            .unwrap_or(dry_run.len());
        dry_run.splice(at..at, ["--dry-run=client", "-o", "json"]);
        let mut as_json: Value = serde_json::from_str(&kubectl_ok(kc, &dry_run)).unwrap();
        kubectl_ok(kc, args);
        assert_eq!(
            api.api.protobuf_bodies.load(Ordering::Relaxed),
            before + u64::from(*protobuf),
            "kubectl {args:?} sent protobuf: {protobuf}"
        );
        let name = as_json["metadata"]["name"].as_str().unwrap().to_owned();
        as_json["metadata"]["name"] = json!(format!("{name}-json"));
        let file = kc.with_file_name(format!("{name}.json"));
        std::fs::write(&file, as_json.to_string()).unwrap();
        kubectl_ok(kc, &["create", "-f", file.to_str().unwrap()]);
        let read = |n: &str| -> Value {
            let (kind, _) = resource.split_once('/').unwrap();
            serde_json::from_str(&kubectl_ok(kc, &["get", kind, n, "-o", "json"])).unwrap()
        };
        assert_eq!(
            comparable(read(&name)),
            comparable(read(&format!("{name}-json"))),
            "kubectl {args:?}: protobuf and JSON differ"
        );
    }
    let deployment: Value =
        serde_json::from_str(&kubectl_ok(kc, &["get", "deploy", "web", "-o", "json"])).unwrap();
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        container["ports"],
        json!([{"containerPort": 8080, "protocol": "TCP"}])
    );
    assert_eq!(deployment["spec"]["replicas"], 2);
    assert_eq!(
        deployment["spec"]["selector"],
        json!({"matchLabels": {"app": "web"}})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_all_lists_what_a_cluster_lists() {
    let api = UnprivilegedApi::start(ApiOptions {
        controllers: true,
        ..ApiOptions::default()
    })
    .await
    .unwrap();
    let kc = &api.kubeconfig;
    kubectl_ok(
        kc,
        &[
            "create",
            "deployment",
            "web",
            "--image=kt-testbed/http-echo",
        ],
    );
    kubectl_ok(
        kc,
        &["create", "job", "once", "--image=busybox", "--", "true"],
    );
    kubectl_ok(
        kc,
        &["create", "service", "clusterip", "web", "--tcp=80:8080"],
    );
    kubectl_ok(kc, &["create", "configmap", "not-in-all"]);
    let listed = eventually("get all shows the Deployment's pod", async || {
        seen(kubectl_ok(kc, &["get", "all", "-o", "name"]), |out| {
            out.lines().any(|l| l.starts_with("pod/web-"))
        })
    })
    .await;
    for expected in ["service/web", "deployment.apps/web", "job.batch/once"] {
        assert!(
            listed.lines().any(|l| l == expected),
            "{expected} in {listed}"
        );
    }
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("replicaset.apps/web-")),
        "{listed}"
    );
    assert!(!listed.contains("configmap"), "{listed}");
    // The table kubectl prints, one section per kind.
    let table = kubectl_ok(kc, &["get", "all"]);
    assert!(
        table.contains("NAME") && table.contains("deployment.apps/web"),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_reads_the_releases_schemas() {
    let api = UnprivilegedApi::start(ApiOptions::default()).await.unwrap();
    let kc = &api.kubeconfig;
    let replicas = kubectl_ok(kc, &["explain", "deployment.spec.replicas"]);
    assert!(replicas.contains("GROUP:      apps"), "{replicas}");
    assert!(replicas.contains("FIELD: replicas <integer>"), "{replicas}");
    assert!(replicas.contains("Number of desired pods"), "{replicas}");
    let ports = kubectl_ok(kc, &["explain", "pods.spec.containers.ports"]);
    assert!(
        ports.contains("containerPort\t<integer> -required-"),
        "{ports}"
    );
    let recursive = kubectl_ok(kc, &["explain", "jobs.spec", "--recursive"]);
    assert!(
        recursive.contains("backoffLimit") && recursive.contains("containers"),
        "{recursive}"
    );
    let missing = kubectl(kc, &["explain", "deployment.spec.nope"]);
    assert!(!missing.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_job_is_served_by_batch_v1_with_the_api_servers_defaults() {
    let api = UnprivilegedApi::start(ApiOptions::default()).await.unwrap();
    let kc = &api.kubeconfig;
    assert!(
        kubectl_ok(kc, &["api-resources", "--api-group=batch", "-o", "name"])
            .contains("jobs.batch")
    );
    kubectl_ok(
        kc,
        &[
            "create",
            "job",
            "once",
            "--image=busybox",
            "--",
            "echo",
            "done",
        ],
    );
    let job: Value =
        serde_json::from_str(&kubectl_ok(kc, &["get", "job", "once", "-o", "json"])).unwrap();
    let uid = job["metadata"]["uid"].as_str().unwrap();
    assert_eq!(
        job["spec"]["selector"],
        json!({"matchLabels": {"batch.kubernetes.io/controller-uid": uid}})
    );
    let labels = &job["spec"]["template"]["metadata"]["labels"];
    assert_eq!(labels["batch.kubernetes.io/job-name"], "once");
    assert_eq!(labels["controller-uid"], uid);
    for (field, value) in [
        ("parallelism", json!(1)),
        ("completions", json!(1)),
        ("backoffLimit", json!(6)),
        ("completionMode", json!("NonIndexed")),
        ("suspend", json!(false)),
    ] {
        assert_eq!(job["spec"][field], value, "{field}");
    }
    let container = &job["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["command"], json!(["echo", "done"]));
    assert_eq!(job["spec"]["template"]["spec"]["restartPolicy"], "Never");
    let table = kubectl_ok(kc, &["get", "jobs"]);
    assert!(
        table.contains("COMPLETIONS") && table.contains("once"),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_events_prints_what_controllers_record() {
    let api = UnprivilegedApi::start(ApiOptions::default()).await.unwrap();
    let kc = &api.kubeconfig;
    let client = api.client().await;
    // As the kubelet records it: a core/v1 Event about a pod, in protobuf.
    let event = json!({
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": "web-1.17f", "namespace": "default"},
        "involvedObject": {"kind": "Pod", "namespace": "default", "name": "web-1",
                           "apiVersion": "v1"},
        "reason": "Pulled", "message": "Container image \"nginx\" already present",
        "type": "Normal", "count": 1, "source": {"component": "kubelet", "host": "node-1"},
        "firstTimestamp": "2026-01-01T00:00:00Z", "lastTimestamp": "2026-01-01T00:00:00Z",
    });
    post_protobuf(
        &client,
        "/api/v1/namespaces/default/events",
        protobuf::encode(&event).unwrap(),
    )
    .await
    .unwrap();
    let table = kubectl_ok(kc, &["get", "events"]);
    let header = table.lines().next().unwrap();
    for column in ["LAST SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"] {
        assert!(header.contains(column), "{table}");
    }
    let row = table.lines().nth(1).unwrap();
    for cell in [
        "Normal",
        "Pulled",
        "pod/web-1",
        "Container image \"nginx\" already present",
    ] {
        assert!(row.contains(cell), "{cell} in {table}");
    }
    let selected = kubectl_ok(
        kc,
        &[
            "get",
            "events",
            "--field-selector",
            "involvedObject.name=web-2",
            "-o",
            "name",
        ],
    );
    assert!(selected.is_empty(), "{selected}");
}

/// A free local port for kubectl to listen on.
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `kubectl port-forward ARGS`, ended when dropped.
struct PortForward(Child);

impl PortForward {
    fn start(kubeconfig: &Path, args: &[&str]) -> Self {
        let child = Command::new("kubectl")
            .arg("port-forward")
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .env("HOME", kubeconfig.parent().unwrap())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Self(child)
    }

    fn stderr(mut self) -> String {
        let _ = self.0.kill();
        let mut text = String::new();
        self.0
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        text
    }
}

impl Drop for PortForward {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `GET /` on a local port: the http-echo answer (its first line names the pod).
fn http_get(port: u16) -> Result<String, String> {
    let mut conn = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).map_err(|e| e.to_string())?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    conn.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer)
        .map_err(|e| e.to_string())?;
    if answer.starts_with("HTTP/1") {
        Ok(answer)
    } else {
        Err(format!("not HTTP: {answer:?}"))
    }
}

const ECHO: &[&str] = &[
    "create",
    "deployment",
    "web",
    "--image=kt-testbed/http-echo",
    "--port=8080",
    "--replicas=2",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn create_deployment_with_a_port_and_expose_it() {
    let tb = start_testbed(false).await;
    let kc = tb.kubeconfig.clone();
    kubectl_ok(&kc, ECHO);
    kubectl_ok(&kc, &["rollout", "status", "deploy/web", "--timeout=60s"]);
    let ports = kubectl_ok(
        &kc,
        &[
            "get",
            "deploy",
            "web",
            "-o",
            "jsonpath={.spec.template.spec.containers[0].ports}",
        ],
    );
    assert_eq!(ports, r#"[{"containerPort":8080,"protocol":"TCP"}]"#);

    let exposed = kubectl_ok(
        &kc,
        &[
            "expose",
            "deployment",
            "web",
            "--port=80",
            "--target-port=8080",
        ],
    );
    assert_eq!(exposed.trim(), "service/web exposed");
    let service: Value =
        serde_json::from_str(&kubectl_ok(&kc, &["get", "svc", "web", "-o", "json"])).unwrap();
    assert_eq!(service["spec"]["selector"], json!({"app": "web"}));
    assert_eq!(
        service["spec"]["ports"],
        json!([{"port": 80, "protocol": "TCP", "targetPort": 8080}])
    );
    assert!(
        service["spec"]["clusterIP"]
            .as_str()
            .unwrap()
            .starts_with("10.96.")
    );
    let pods: std::collections::HashSet<String> = kubectl_ok(
        &kc,
        &[
            "get",
            "pods",
            "-l",
            "app=web",
            "-o",
            "jsonpath={.items[*].status.podIP}",
        ],
    )
    .split_whitespace()
    .map(String::from)
    .collect();
    eventually("the Service's endpoints are the two pods", async || {
        let ips: std::collections::HashSet<String> = kubectl_ok(
            &kc,
            &[
                "get",
                "endpoints",
                "web",
                "-o",
                "jsonpath={.subsets[*].addresses[*].ip}",
            ],
        )
        .split_whitespace()
        .map(String::from)
        .collect();
        seen(ips, |ips| *ips == pods)
    })
    .await;
    // A pod reaches the Deployment through the Service's name.
    kubectl_ok(
        &kc,
        &["run", "client", "--image=busybox", "--", "sleep", "1000"],
    );
    kubectl_ok(
        &kc,
        &[
            "wait",
            "--for=condition=Ready",
            "pod/client",
            "--timeout=60s",
        ],
    );
    let answer = eventually_blocking("web answers through its Service", || {
        who_answers(&tb, "http://web/")
    });
    assert!(answer.starts_with("web-"), "{answer}");
    tb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn run_exec_deploy_and_logs_follow() {
    let tb = start_testbed(false).await;
    let kc = tb.kubeconfig.clone();
    kubectl_ok(
        &kc,
        &[
            "run",
            "talker",
            "--image=busybox",
            "--command",
            "--",
            "sh",
            "-c",
            "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.2; done",
        ],
    );
    let pod: Value =
        serde_json::from_str(&kubectl_ok(&kc, &["get", "pod", "talker", "-o", "json"])).unwrap();
    assert_eq!(pod["metadata"]["labels"], json!({"run": "talker"}));
    assert_eq!(pod["spec"]["restartPolicy"], "Always");
    assert_eq!(pod["spec"]["containers"][0]["name"], "talker");
    kubectl_ok(
        &kc,
        &[
            "wait",
            "--for=condition=Ready",
            "pod/talker",
            "--timeout=60s",
        ],
    );

    // logs -f streams lines as the container writes them, and keeps going.
    let mut follow = tokio::process::Command::new("kubectl")
        .args(["logs", "-f", "talker"])
        .env("KUBECONFIG", &kc)
        .env("HOME", &tb.dir)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(follow.stdout.take().unwrap()).lines();
    let mut seen_lines = Vec::new();
    let followed = tokio::time::timeout(patience(), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            seen_lines.push(line);
            if seen_lines.len() == 20 {
                break;
            }
        }
    })
    .await;
    assert!(followed.is_ok(), "logs -f stopped after {seen_lines:?}");
    let first: usize = seen_lines[0]
        .strip_prefix("tick ")
        .unwrap()
        .parse()
        .unwrap();
    let expected: Vec<String> = (first..first + 20).map(|i| format!("tick {i}")).collect();
    assert_eq!(seen_lines, expected);
    assert!(
        follow.try_wait().unwrap().is_none(),
        "logs -f still follows"
    );
    drop(follow);

    // exec deploy/x runs in one of the Deployment's pods.
    kubectl_ok(&kc, ECHO);
    kubectl_ok(&kc, &["rollout", "status", "deploy/web", "--timeout=60s"]);
    let pods = kubectl_ok(&kc, &["get", "pods", "-l", "app=web", "-o", "name"]);
    let hostname = kubectl_ok(&kc, &["exec", "deploy/web", "--", "hostname"]);
    assert!(
        pods.lines()
            .any(|p| p == format!("pod/{}", hostname.trim())),
        "{hostname} is one of {pods}"
    );
    let failed = kubectl(&kc, &["exec", "deploy/web", "--", "sh", "-c", "exit 3"]);
    assert_eq!(failed.status.code(), Some(3));
    tb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn scale_rollout_status_and_undo() {
    let tb = start_testbed(false).await;
    let kc = tb.kubeconfig.clone();
    kubectl_ok(&kc, ECHO);
    kubectl_ok(&kc, &["rollout", "status", "deploy/web", "--timeout=60s"]);

    let scaled = kubectl_ok(&kc, &["scale", "deploy/web", "--replicas=3"]);
    assert_eq!(scaled.trim(), "deployment.apps/web scaled");
    let status = kubectl_ok(&kc, &["rollout", "status", "deploy/web", "--timeout=60s"]);
    assert!(status.contains("successfully rolled out"), "{status}");
    assert_eq!(
        kubectl_ok(
            &kc,
            &[
                "get",
                "deploy",
                "web",
                "-o",
                "jsonpath={.spec.replicas} {.status.readyReplicas}"
            ]
        ),
        "3 3"
    );

    // A template change makes revision 2; undo goes back to revision 1's template.
    kubectl_ok(&kc, &["set", "env", "deploy/web", "GREETING=hello"]);
    kubectl_ok(&kc, &["rollout", "status", "deploy/web", "--timeout=60s"]);
    let env = "jsonpath={.spec.template.spec.containers[0].env}";
    assert!(kubectl_ok(&kc, &["get", "deploy", "web", "-o", env]).contains("GREETING"));
    let history = kubectl_ok(&kc, &["rollout", "history", "deploy/web"]);
    assert!(history.contains('1') && history.contains('2'), "{history}");
    let undone = kubectl_ok(&kc, &["rollout", "undo", "deploy/web"]);
    assert_eq!(undone.trim(), "deployment.apps/web rolled back");
    kubectl_ok(&kc, &["rollout", "status", "deploy/web", "--timeout=60s"]);
    assert_eq!(kubectl_ok(&kc, &["get", "deploy", "web", "-o", env]), "");
    assert_eq!(
        kubectl_ok(
            &kc,
            &[
                "get",
                "deploy",
                "web",
                "-o",
                "jsonpath={.metadata.annotations.deployment\\.kubernetes\\.io/revision}"
            ]
        ),
        "3"
    );
    eventually_blocking("the pods run the first template again", || {
        seen(
            kubectl_ok(
                &kc,
                &[
                    "get",
                    "pods",
                    "-l",
                    "app=web",
                    "-o",
                    "jsonpath={.items[*].spec.containers[0].env}",
                ],
            ),
            |envs| envs.is_empty(),
        )
    });
    tb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn delete_by_label_deletes_what_matches_and_its_pods() {
    let tb = start_testbed(false).await;
    let kc = tb.kubeconfig.clone();
    for (name, tier) in [("front", "web"), ("back", "db")] {
        kubectl_ok(
            &kc,
            &["create", "deployment", name, "--image=kt-testbed/sleep"],
        );
        kubectl_ok(&kc, &["label", "deploy", name, &format!("tier={tier}")]);
        kubectl_ok(&kc, &["create", "configmap", &format!("{name}-settings")]);
        kubectl_ok(
            &kc,
            &[
                "label",
                "configmap",
                &format!("{name}-settings"),
                &format!("tier={tier}"),
            ],
        );
    }
    kubectl_ok(&kc, &["rollout", "status", "deploy/front", "--timeout=60s"]);
    let deleted = kubectl_ok(&kc, &["delete", "deploy,configmap", "-l", "tier=web"]);
    assert!(
        deleted.contains("deployment.apps \"front\" deleted")
            && deleted.contains("configmap \"front-settings\" deleted"),
        "{deleted}"
    );
    assert_eq!(
        kubectl_ok(&kc, &["get", "deploy", "-o", "name"]).trim(),
        "deployment.apps/back"
    );
    assert_eq!(
        kubectl_ok(&kc, &["get", "configmap", "-l", "tier", "-o", "name"]).trim(),
        "configmap/back-settings"
    );
    eventually_blocking("front's pods are gone, back's stay", || {
        seen(kubectl_ok(&kc, &["get", "pods", "-o", "name"]), |pods| {
            !pods.contains("front-") && pods.contains("back-")
        })
    });
    tb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn port_forward_to_a_service_and_to_a_pod() {
    let tb = start_testbed(false).await;
    let kc = tb.kubeconfig.clone();
    kubectl_ok(&kc, ECHO);
    kubectl_ok(
        &kc,
        &[
            "expose",
            "deployment",
            "web",
            "--port=80",
            "--target-port=8080",
        ],
    );
    kubectl_ok(&kc, &["rollout", "status", "deploy/web", "--timeout=60s"]);
    let pods = kubectl_ok(&kc, &["get", "pods", "-l", "app=web", "-o", "name"]);

    // svc/web 80 → its target port on one of its pods, one SPDY stream pair per connection.
    let port = free_port();
    let forward = PortForward::start(&kc, &["svc/web", &format!("{port}:80")]);
    let first = eventually_blocking("port-forward svc/web answers", || http_get(port));
    let pod = first
        .lines()
        .find_map(|l| l.strip_prefix("pod="))
        .unwrap_or_else(|| panic!("{first}"))
        .to_owned();
    assert!(
        pods.lines().any(|p| p == format!("pod/{pod}")),
        "{pod} in {pods}"
    );
    for _ in 0..3 {
        let again = http_get(port).unwrap();
        assert!(again.contains(&format!("pod={pod}")), "{again}");
    }
    drop(forward);

    // pod/x to the container port itself.
    let other = pods
        .lines()
        .map(|p| p.trim_start_matches("pod/"))
        .find(|p| *p != pod)
        .unwrap()
        .to_owned();
    let port = free_port();
    let forward = PortForward::start(&kc, &[&format!("pod/{other}"), &format!("{port}:8080")]);
    let answer = eventually_blocking("port-forward pod/x answers", || http_get(port));
    assert!(answer.contains(&format!("pod={other}")), "{answer}");
    drop(forward);

    // A port nothing listens on: the kubelet's error reaches kubectl.
    let port = free_port();
    let forward = PortForward::start(&kc, &[&format!("pod/{other}"), &format!("{port}:9")]);
    eventually_blocking("kubectl listens", || {
        TcpStream::connect((Ipv4Addr::LOCALHOST, port)).map(|_| ())
    });
    let _ = http_get(port);
    std::thread::sleep(Duration::from_millis(500));
    let stderr = forward.stderr();
    assert!(
        stderr.contains(&format!("error forwarding port 9 to pod {other}")),
        "{stderr}"
    );
    tb.stop().await;
}

/// `(kind, namespace, name)` of every object `kubectl apply -k dir` would create, as kubectl
/// renders the kustomization (client dry run).
fn rendered(kubeconfig: &Path, dir: &str) -> Vec<(String, String, String)> {
    let text = kubectl_ok(
        kubeconfig,
        &["create", "-k", dir, "--dry-run=client", "-o", "json"],
    );
    // One JSON document per object (or a List).
    serde_json::Deserializer::from_str(&text)
        .into_iter::<Value>()
        .map(|doc| doc.expect("JSON objects"))
        .flat_map(|doc| match doc["items"].as_array() {
            Some(items) if doc["kind"] == "List" => items.clone(),
            _ => vec![doc],
        })
        .map(|o| {
            let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
            (
                text(&o["kind"]),
                text(&o["metadata"]["namespace"]),
                text(&o["metadata"]["name"]),
            )
        })
        .collect()
}

/// `kubectl get` of one object: `Ok` when it exists, `Err(stderr)` otherwise.
fn get_object(
    kubeconfig: &Path,
    (kind, namespace, name): &(String, String, String),
) -> Result<(), String> {
    let mut args = vec!["get", kind.as_str(), name.as_str(), "-o", "name"];
    if !namespace.is_empty() {
        args.extend(["-n", namespace.as_str()]);
    }
    let out = kubectl(kubeconfig, &args);
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Each overlay of `deploy/` — agent only, the developer role bound in `team-a`, images
/// from a private registry — applied with the installed kubectl runs the agent on every
/// node (from the overlay's image), creates exactly what it renders, and deleted with
/// kubectl leaves nothing: every object it rendered is gone (NotFound), and so is everything
/// the agents made at run time in `kt-system` (their pods and records), with the namespace
/// itself, once the testbed has finished deleting it; `team-a`, which the overlay does not
/// own, stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn each_deploy_overlay_applies_runs_the_agent_and_deletes_to_nothing() {
    use kt_tests::harness::apps::{DEPLOY, wait_for_agents};
    let tb = start_testbed(true).await;
    let kc = tb.kubeconfig.clone();
    kubectl_ok(&kc, &["create", "namespace", "team-a"]);
    let developer_role = (
        "RoleBinding".to_owned(),
        "team-a".to_owned(),
        "kt-developer".to_owned(),
    );
    let developer_access = [
        (
            "ClusterRole".to_owned(),
            String::new(),
            "kt-developer".to_owned(),
        ),
        (
            "Role".to_owned(),
            "kt-system".to_owned(),
            "kt-agent-access".to_owned(),
        ),
    ];
    for overlay in ["agent-only", "developer-role", "private-registry"] {
        let dir = format!("{DEPLOY}/overlays/{overlay}");
        let objects = rendered(&kc, &dir);
        let has = |o: &(String, String, String)| objects.contains(o);
        match overlay {
            "agent-only" => assert!(
                !has(&developer_role) && !developer_access.iter().any(has),
                "{objects:?}"
            ),
            "developer-role" => assert!(
                has(&developer_role) && developer_access.iter().all(has),
                "{objects:?}"
            ),
            _ => assert!(!has(&developer_role), "{objects:?}"),
        }
        kubectl_ok(&kc, &["apply", "-k", &dir]);
        wait_for_agents(&tb);
        for object in &objects {
            get_object(&kc, object).unwrap_or_else(|e| panic!("{overlay}: {object:?}: {e}"));
        }
        let image = kubectl_ok(
            &kc,
            &[
                "get",
                "daemonset/kt-node-agent",
                "-n",
                "kt-system",
                "-o",
                "jsonpath={.spec.template.spec.containers[0].image}",
            ],
        );
        // The base's `images:` (kt_proto::images), which the private-registry overlay renames.
        use kt_proto::images;
        let expected = if overlay == "private-registry" {
            format!(
                "registry.example.internal/platform/{}:{}",
                images::AGENT,
                images::TAG
            )
        } else {
            images::reference(images::AGENT)
        };
        assert_eq!(image, expected, "{overlay}");
        if overlay == "developer-role" {
            let binding: Value = serde_json::from_str(&kubectl_ok(
                &kc,
                &[
                    "get",
                    "rolebinding",
                    "kt-developer",
                    "-n",
                    "team-a",
                    "-o",
                    "json",
                ],
            ))
            .expect("a RoleBinding");
            assert_eq!(binding["roleRef"]["kind"], "ClusterRole");
            assert_eq!(binding["roleRef"]["name"], "kt-developer");
            assert_eq!(binding["subjects"][0]["kind"], "Group");
        }
        // The agents' own records: made at run time, not by the overlay.
        let records = kubectl_ok(
            &kc,
            &[
                "get",
                "configmaps",
                "-n",
                "kt-system",
                "-l",
                "kt.dev/agent-record",
                "-o",
                "name",
            ],
        );
        assert_eq!(
            records.lines().count(),
            2,
            "{overlay}: one record per node: {records}"
        );

        // As deploy/README.md says: the namespace goes first, and may take what is in it
        // before kubectl gets there (the testbed deletes a namespace's objects at once).
        kubectl_ok(
            &kc,
            &[
                "delete",
                "-k",
                &dir,
                "--ignore-not-found",
                "--wait=true",
                "--timeout=60s",
            ],
        );
        let left = poll_within(Duration::from_secs(60), async || {
            let mut left: Vec<String> = objects
                .iter()
                .filter_map(|o| match get_object(&kc, o) {
                    Ok(()) => Some(format!("{o:?}")),
                    Err(e) if e.contains("NotFound") || e.contains("not found") => None,
                    Err(e) => Some(format!("{o:?}: {e}")),
                })
                .collect();
            // Whatever is left in kt-system, the overlay's or not (a missing namespace lists
            // nothing).
            let namespaced = kubectl(
                &kc,
                &[
                    "get",
                    "all,configmaps,serviceaccounts,roles,rolebindings",
                    "-n",
                    "kt-system",
                    "-o",
                    "name",
                ],
            );
            let (out, err) = (
                String::from_utf8_lossy(&namespaced.stdout),
                String::from_utf8_lossy(&namespaced.stderr),
            );
            if !namespaced.status.success()
                && !err.contains("NotFound")
                && !err.contains("not found")
            {
                left.push(format!("listing kt-system failed: {err}"));
            }
            left.extend(out.lines().map(str::to_owned));
            seen(left, Vec::is_empty)
        })
        .await;
        if let Err(left) = left {
            panic!("{overlay}: left after delete -k: {left:?}");
        }
        get_object(&kc, &("Namespace".into(), String::new(), "team-a".into()))
            .expect("team-a is not the overlay's");
    }
    tb.stop().await;
}
