//! Workloads behave as in a cluster (root, on the testbed): the images of tutorials run
//! (nginx with its default page and a page per pod, busybox, alpine, curl); Deployments
//! roll out within `maxSurge` and `maxUnavailable` and wait for readiness, with revisions
//! for `rollout history` and `undo`, or Recreate; StatefulSets start in order with stable
//! names and DNS records; Jobs run to completion; controllers and kubelets write Events; a
//! failed pod sandbox is retried and reported; scaling up and down a hundred times leaves no
//! pod Pending; and an exchange in agent mode follows a rolling update.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    time::Duration,
};

use futures::{StreamExt as _, stream};
use k8s_openapi::api::{apps::v1::ReplicaSet, core::v1::Pod};
use kube::{
    Api,
    api::{Patch, PatchParams},
    runtime::watcher,
};
use serde_json::json;
use tokio::{sync::oneshot, task::JoinHandle};

use kt_testbed::cluster::Testbed;
use kt_tests::harness::{
    apps::{
        answered_by, apply, deploy_client_2, deploy_web, events, in_client, in_pod, install_agent,
        start_testbed, until_all_answered_by, web_pods_field,
    },
    eventually::{eventually, seen},
    kubectl::{kubectl, kubectl_ok},
    netns::NetNs,
    workstation::{self, Background},
};

/// The host's nginx default page, which every nginx pod starts with.
const NGINX_DEFAULT_PAGE: &str = "/usr/share/nginx/html/index.html";

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn is_terminating(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_some()
}

fn name_of(pod: &Pod) -> String {
    pod.metadata.name.clone().unwrap_or_default()
}

fn label<'a>(pod: &'a Pod, key: &str) -> &'a str {
    pod.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(key))
        .map_or("", String::as_str)
}

/// Pods and ReplicaSets matching a selector, as a watch sees them change after change.
#[derive(Default)]
struct Seen {
    pods: BTreeMap<String, Pod>,
    sets: BTreeMap<String, ReplicaSet>,
    /// What the check found wrong, in order.
    violations: Vec<String>,
    /// States checked.
    states: usize,
}

/// A watch of pods and ReplicaSets `selector` that runs `check` on every state it sees
/// once the first lists are in; [`StateWatch::stop`] returns what it saw.
struct StateWatch {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Seen>,
}

enum Change {
    Pod(watcher::Event<Pod>),
    Set(watcher::Event<ReplicaSet>),
}

impl StateWatch {
    async fn start(
        tb: &Testbed,
        selector: &str,
        check: impl Fn(&Seen) -> Result<(), String> + Send + 'static,
    ) -> Self {
        let client = tb.client().await;
        let config = watcher::Config::default().labels(selector);
        let pods = watcher(
            Api::<Pod>::default_namespaced(client.clone()),
            config.clone(),
        )
        .map(|e| e.map(Change::Pod))
        .boxed();
        let sets = watcher(Api::<ReplicaSet>::default_namespaced(client), config)
            .map(|e| e.map(Change::Set))
            .boxed();
        let (stop, mut stopped) = oneshot::channel::<()>();
        let (ready, is_ready) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let mut changes = stream::select(pods, sets);
            let mut seen = Seen::default();
            let (mut pods_listed, mut sets_listed) = (false, false);
            let mut ready = Some(ready);
            loop {
                let change = tokio::select! {
                    _ = &mut stopped => return seen,
                    change = changes.next() => change,
                };
                let Some(Ok(change)) = change else {
                    continue;
                };
                match change {
                    Change::Pod(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => {
                        seen.pods.insert(name_of(&p), p);
                    }
                    Change::Pod(watcher::Event::Delete(p)) => {
                        seen.pods.remove(&name_of(&p));
                    }
                    Change::Pod(watcher::Event::Init) => seen.pods.clear(),
                    Change::Pod(watcher::Event::InitDone) => pods_listed = true,
                    Change::Set(watcher::Event::Apply(s) | watcher::Event::InitApply(s)) => {
                        seen.sets
                            .insert(s.metadata.name.clone().unwrap_or_default(), s);
                    }
                    Change::Set(watcher::Event::Delete(s)) => {
                        seen.sets
                            .remove(s.metadata.name.as_deref().unwrap_or_default());
                    }
                    Change::Set(watcher::Event::Init) => seen.sets.clear(),
                    Change::Set(watcher::Event::InitDone) => sets_listed = true,
                }
                if pods_listed && sets_listed {
                    if let Some(ready) = ready.take() {
                        let _ = ready.send(());
                    }
                    seen.states += 1;
                    if let Err(wrong) = check(&seen) {
                        seen.violations.push(wrong);
                    }
                }
            }
        });
        is_ready
            .await
            .expect("the watch lists pods and ReplicaSets");
        Self { stop, task }
    }

    async fn stop(self) -> Seen {
        let _ = self.stop.send(());
        self.task.await.expect("the watch task")
    }
}

/// Ready pods not being deleted.
fn ready_pods(seen: &Seen) -> usize {
    seen.pods
        .values()
        .filter(|p| is_ready(p) && !is_terminating(p))
        .count()
}

/// `spec.replicas` of every ReplicaSet.
fn wanted_pods(seen: &Seen) -> i32 {
    seen.sets
        .values()
        .filter_map(|s| s.spec.as_ref()?.replicas)
        .sum()
}

fn jsonpath(tb: &Testbed, what: &[&str], path: &str) -> String {
    let mut args = vec!["get"];
    args.extend_from_slice(what);
    let path = format!("jsonpath={path}");
    args.extend(["-o", &path]);
    kubectl_ok(&tb.kubeconfig, &args)
}

fn rollout_status(tb: &Testbed, what: &str) -> String {
    waited(tb, &["rollout", "status", what, "--timeout=120s"])
}

/// stdout of a kubectl command that waits for something; when it fails, the panic shows
/// the cluster's state as well (workloads, pods' statuses and events).
fn waited(tb: &Testbed, args: &[&str]) -> String {
    let out = kubectl(&tb.kubeconfig, args);
    if out.status.success() {
        return String::from_utf8_lossy(&out.stdout).into_owned();
    }
    let state = |args: &[&str]| {
        let out = kubectl(&tb.kubeconfig, args);
        String::from_utf8_lossy(if out.status.success() {
            &out.stdout
        } else {
            &out.stderr
        })
        .into_owned()
    };
    panic!(
        "kubectl {args:?} failed: {}{}\n{}\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        state(&["get", "deploy,rs,sts,jobs,pods", "-o", "wide"]),
        state(&[
            "get",
            "pods,sts,jobs",
            "-o",
            "jsonpath={range .items[*]}{.kind} {.metadata.name} {.status}{\"\\n\"}{end}"
        ]),
        state(&["get", "events"]),
    );
}

/// ReplicaSets of `app` as `name revision replicas`, one a line, sorted by name.
fn replica_sets(tb: &Testbed, app: &str) -> Vec<(String, String, String)> {
    let out = jsonpath(
        tb,
        &["rs", "-l", &format!("app={app}")],
        r#"{range .items[*]}{.metadata.name} {.metadata.annotations.deployment\.kubernetes\.io/revision} {.spec.replicas}{"\n"}{end}"#,
    );
    let mut sets: Vec<(String, String, String)> = out
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace().map(String::from);
            Some((f.next()?, f.next()?, f.next()?))
        })
        .collect();
    sets.sort();
    sets
}

/// A Deployment `name` of `replicas` HTTP echo pods (readiness by HTTP GET) with
/// `strategy`, and waits until it has rolled out.
fn deploy_echo(tb: &Testbed, name: &str, replicas: u32, strategy: &str) {
    apply(
        &tb.kubeconfig,
        &format!(
            r#"
apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}}}
spec:
  replicas: {replicas}
  strategy: {strategy}
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}}}}}
    spec:
      containers:
      - name: app
        image: kt-testbed/http-echo:1
        ports: [{{name: http, containerPort: 8080}}]
        readinessProbe: {{httpGet: {{path: /, port: http}}}}
"#
        ),
    );
    rollout_status(tb, &format!("deploy/{name}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn nginx_serves_its_default_page_on_80_and_exec_changes_one_pods_page_only() {
    let tb = start_testbed(false).await;
    apply(
        &tb.kubeconfig,
        r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: nginx}
spec:
  replicas: 2
  selector: {matchLabels: {app: nginx}}
  template:
    metadata: {labels: {app: nginx}}
    spec:
      containers: [{name: nginx, image: "nginx:alpine", ports: [{containerPort: 80}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: client}
spec:
  containers: [{name: c, image: curlimages/curl, command: [sleep, "3600"]}]
"#,
    );
    rollout_status(&tb, "deploy/nginx");
    kubectl_ok(
        &tb.kubeconfig,
        &[
            "wait",
            "--for=condition=Ready",
            "pod/client",
            "--timeout=60s",
        ],
    );
    let host_page = std::fs::read_to_string(NGINX_DEFAULT_PAGE).expect("nginx-light's page");
    assert!(host_page.contains("Welcome to nginx!"));
    let ips: Vec<String> = jsonpath(
        &tb,
        &["pods", "-l", "app=nginx"],
        "{.items[*].status.podIP}",
    )
    .split_whitespace()
    .map(String::from)
    .collect();
    assert_eq!(ips.len(), 2);
    let page = |ip: &str| {
        let (ok, body) = in_client(
            &tb,
            &["curl", "-s", "--max-time", "3", &format!("http://{ip}:80/")],
        );
        assert!(ok, "curl {ip}:80");
        body
    };
    for ip in &ips {
        assert_eq!(page(ip), host_page, "{ip} serves nginx's default page");
    }

    kubectl_ok(
        &tb.kubeconfig,
        &[
            "exec",
            "deploy/nginx",
            "--",
            "/bin/sh",
            "-c",
            "echo 'this pod only' > /usr/share/nginx/html/index.html",
        ],
    );
    let pages: Vec<String> = ips.iter().map(|ip| page(ip)).collect();
    assert_eq!(
        pages.iter().filter(|p| *p == "this pod only\n").count(),
        1,
        "exactly one pod's page changed: {pages:?}"
    );
    assert!(
        pages.contains(&host_page),
        "the other pod's page is the default: {pages:?}"
    );
    assert_eq!(
        std::fs::read_to_string(NGINX_DEFAULT_PAGE).unwrap(),
        host_page,
        "the machine's own page is untouched"
    );

    // Requests are in the pod log (nginx's access log goes to stdout), as is its start.
    let pods = jsonpath(
        &tb,
        &["pods", "-l", "app=nginx"],
        "{.items[*].metadata.name}",
    );
    let logs: String = pods
        .split_whitespace()
        .map(|pod| kubectl_ok(&tb.kubeconfig, &["logs", pod]))
        .collect();
    assert!(logs.contains("start worker processes"), "{logs}");
    assert!(logs.contains("\"GET / HTTP/1.1\" 200"), "{logs}");

    // Deleting a pod stops nginx gracefully and its replacement has the default page again.
    let changed = ips
        .iter()
        .zip(pods.split_whitespace())
        .find(|(ip, _)| page(ip) == "this pod only\n")
        .map(|(_, pod)| pod.to_owned())
        .expect("the changed pod");
    kubectl_ok(&tb.kubeconfig, &["delete", "pod", &changed]);
    rollout_status(&tb, "deploy/nginx");
    let now = jsonpath(
        &tb,
        &["pods", "-l", "app=nginx"],
        "{.items[*].status.podIP}",
    );
    for ip in now.split_whitespace() {
        assert_eq!(page(ip), host_page, "{ip} after the replacement");
    }
    tb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn busybox_alpine_and_curl_images_run_as_in_a_cluster() {
    let tb = start_testbed(false).await;
    deploy_web(&tb);
    let run = |name: &str, args: &[&str]| {
        let mut all = vec!["run", name, "--restart=Never"];
        all.extend_from_slice(args);
        kubectl_ok(&tb.kubeconfig, &all);
    };
    // busybox's tools: wget and nslookup (busybox applets where this machine has none).
    run(
        "bb",
        &[
            "--image=busybox",
            "--command",
            "--",
            "sh",
            "-c",
            "wget -qO- http://web/ && nslookup web.default.svc.cluster.local",
        ],
    );
    // No command: the image's own (`sh`), which ends at once without a terminal.
    run("al", &["--image=alpine"]);
    // curlimages/curl puts `curl` in front of arguments that are no command.
    run("c", &["--image=curlimages/curl", "--", "-s", "http://web/"]);
    for pod in ["bb", "al", "c"] {
        kubectl_ok(
            &tb.kubeconfig,
            &[
                "wait",
                "--for=jsonpath={.status.phase}=Succeeded",
                &format!("pod/{pod}"),
                "--timeout=60s",
            ],
        );
    }
    let cluster_ip = jsonpath(&tb, &["svc", "web"], "{.spec.clusterIP}");
    let bb = kubectl_ok(&tb.kubeconfig, &["logs", "bb"]);
    assert!(bb.starts_with("pod=web-"), "{bb}");
    assert!(bb.contains(&format!("Address: {cluster_ip}")), "{bb}");
    let c = kubectl_ok(&tb.kubeconfig, &["logs", "c"]);
    assert!(c.starts_with("pod=web-"), "{c}");
    assert_eq!(
        jsonpath(
            &tb,
            &["pod", "al"],
            "{.status.containerStatuses[0].state.terminated.exitCode}"
        ),
        "0"
    );
    tb.stop().await;
}

/// Rolls two Deployments at once, one with numbers and one with percentages, and checks
/// every state a watch sees: never fewer ready pods than `replicas - maxUnavailable`, never
/// more wanted than `replicas + maxSurge`. Then revisions, history and undo.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn set_image_rolls_out_within_max_surge_and_max_unavailable_with_revisions_and_undo() {
    let tb = start_testbed(false).await;
    // 4 replicas, 1 more and 1 less at most; 5 replicas, 30 % → 2 more (rounded up) and
    // 1 less (rounded down).
    let cases = [
        (
            "numbers",
            4,
            "{rollingUpdate: {maxSurge: 1, maxUnavailable: 1}}",
            3,
            5,
        ),
        (
            "percent",
            5,
            "{rollingUpdate: {maxSurge: 30%, maxUnavailable: 30%}}",
            4,
            7,
        ),
    ];
    let mut watches = Vec::new();
    for (name, replicas, strategy, min_ready, max_wanted) in cases {
        deploy_echo(&tb, name, replicas, strategy);
        let watch = StateWatch::start(&tb, &format!("app={name}"), move |seen| {
            let (ready, wanted) = (ready_pods(seen), wanted_pods(seen));
            if ready < min_ready || wanted > max_wanted {
                Err(format!(
                    "{name}: {ready} ready, {wanted} wanted: {:?}",
                    seen.pods.keys()
                ))
            } else {
                Ok(())
            }
        })
        .await;
        watches.push(watch);
    }
    let before: Vec<_> = cases.iter().map(|c| replica_sets(&tb, c.0)).collect();
    for (name, ..) in cases {
        kubectl_ok(
            &tb.kubeconfig,
            &[
                "set",
                "image",
                &format!("deploy/{name}"),
                "app=kt-testbed/http-echo:2",
            ],
        );
    }
    for (name, ..) in cases {
        let done = rollout_status(&tb, &format!("deploy/{name}"));
        assert!(done.contains("successfully rolled out"), "{done}");
    }
    for ((name, replicas, ..), watch) in cases.iter().zip(watches) {
        let observed = watch.stop().await;
        assert!(observed.violations.is_empty(), "{:#?}", observed.violations);
        assert!(
            observed.states > 5,
            "{name}: the watch saw the rollout ({} states)",
            observed.states
        );
        let images = jsonpath(
            &tb,
            &["pods", "-l", &format!("app={name}")],
            "{.items[*].spec.containers[0].image}",
        );
        assert_eq!(
            images
                .split_whitespace()
                .filter(|i| *i == "kt-testbed/http-echo:2")
                .count(),
            *replicas as usize,
            "{name}: {images}"
        );
    }

    // Revisions: the new ReplicaSet is 2, the old one 1 and scaled to 0.
    let (old_name, ..) = before[0][0].clone();
    let sets = replica_sets(&tb, "numbers");
    assert_eq!(sets.len(), 2, "{sets:?}");
    assert!(
        sets.contains(&(old_name.clone(), "1".into(), "0".into())),
        "{sets:?}"
    );
    assert!(
        sets.iter()
            .any(|(n, r, c)| *n != old_name && r == "2" && c == "4"),
        "{sets:?}"
    );
    assert_eq!(
        jsonpath(
            &tb,
            &["deploy", "numbers"],
            r"{.metadata.annotations.deployment\.kubernetes\.io/revision}"
        ),
        "2"
    );
    let history = kubectl_ok(&tb.kubeconfig, &["rollout", "history", "deploy/numbers"]);
    let revisions: Vec<&str> = history
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|r| r.parse::<u32>().is_ok())
        .collect();
    assert_eq!(revisions, ["1", "2"], "{history}");

    // Undo: the first template again, on its own ReplicaSet, now revision 3.
    kubectl_ok(&tb.kubeconfig, &["rollout", "undo", "deploy/numbers"]);
    rollout_status(&tb, "deploy/numbers");
    let sets = replica_sets(&tb, "numbers");
    assert!(
        sets.contains(&(old_name, "3".into(), "4".into())),
        "{sets:?}"
    );
    assert_eq!(
        jsonpath(
            &tb,
            &["pods", "-l", "app=numbers"],
            "{.items[*].spec.containers[0].image}"
        )
        .split_whitespace()
        .collect::<HashSet<_>>(),
        HashSet::from(["kt-testbed/http-echo:1"])
    );
    tb.stop().await;
}

/// A new template whose pods never get ready stops the rollout where `maxUnavailable`
/// says, with the old pods serving; `rollout undo` finishes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn a_rollout_waits_for_readiness_and_undo_brings_the_old_pods_back() {
    let tb = start_testbed(false).await;
    deploy_echo(
        &tb,
        "stuck",
        4,
        "{rollingUpdate: {maxSurge: 1, maxUnavailable: 1}}",
    );
    let first = replica_sets(&tb, "stuck")[0].0.clone();
    // tcp-echo does not answer the HTTP readiness probe.
    kubectl_ok(
        &tb.kubeconfig,
        &["set", "image", "deploy/stuck", "app=kt-testbed/tcp-echo:1"],
    );
    let unready = eventually("both surge pods failed their readiness probe", async || {
        let failing: BTreeSet<String> = events(&tb)
            .into_iter()
            .filter(|(_, _, reason, message, _)| {
                reason == "Unhealthy" && message.starts_with("Readiness probe failed: ")
            })
            .map(|(pod, ..)| pod)
            .filter(|pod| pod.starts_with("stuck-") && !pod.starts_with(&format!("{first}-")))
            .collect();
        seen(failing, |f| f.len() == 2)
    })
    .await;
    let sets = replica_sets(&tb, "stuck");
    assert!(
        sets.contains(&(first.clone(), "1".into(), "3".into())),
        "old: 4 - 1 = 3: {sets:?}"
    );
    assert!(
        sets.iter()
            .any(|(n, r, c)| *n != first && r == "2" && c == "2"),
        "new: 4 + 1 - 3 = 2, waiting: {sets:?}"
    );
    assert_eq!(
        jsonpath(&tb, &["deploy", "stuck"], "{.status.availableReplicas}"),
        "3"
    );
    let out = kubectl(
        &tb.kubeconfig,
        &["rollout", "status", "deploy/stuck", "--timeout=1s"],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("Waiting for deployment \"stuck\" rollout to finish: 2 out of 4 new replicas have been updated"),
        "{out:?}"
    );
    let readiness = jsonpath(
        &tb,
        &["pods", "-l", "app=stuck"],
        r#"{range .items[*]}{.metadata.name} {.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}"#,
    );
    let serving: Vec<&str> = readiness
        .lines()
        .filter_map(|l| l.strip_suffix(" True"))
        .collect();
    assert_eq!(serving.len(), 3, "{readiness}");
    assert!(
        serving.iter().all(|p| p.starts_with(&format!("{first}-"))),
        "only old pods are ready: {readiness}, unready {unready:?}"
    );

    kubectl_ok(&tb.kubeconfig, &["rollout", "undo", "deploy/stuck"]);
    rollout_status(&tb, "deploy/stuck");
    let sets = replica_sets(&tb, "stuck");
    assert!(sets.contains(&(first, "3".into(), "4".into())), "{sets:?}");
    tb.stop().await;
}

/// `strategy: Recreate`: no pod of the new template exists while one of the old does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn recreate_removes_every_old_pod_before_making_new_ones() {
    let tb = start_testbed(false).await;
    deploy_echo(&tb, "again", 2, "{type: Recreate}");
    let old_hash = jsonpath(
        &tb,
        &["rs", "-l", "app=again"],
        "{.items[0].metadata.labels.pod-template-hash}",
    );
    let watch = StateWatch::start(&tb, "app=again", move |seen| {
        let hashes: BTreeSet<&str> = seen
            .pods
            .values()
            .map(|p| label(p, "pod-template-hash"))
            .collect();
        if hashes.contains(old_hash.as_str()) && hashes.len() > 1 {
            Err(format!("old and new pods at once: {:?}", seen.pods.keys()))
        } else {
            Ok(())
        }
    })
    .await;
    kubectl_ok(
        &tb.kubeconfig,
        &["set", "image", "deploy/again", "app=kt-testbed/http-echo:2"],
    );
    rollout_status(&tb, "deploy/again");
    let observed = watch.stop().await;
    assert!(observed.violations.is_empty(), "{:#?}", observed.violations);
    assert_eq!(
        jsonpath(
            &tb,
            &["pods", "-l", "app=again"],
            "{.items[*].spec.containers[0].image}"
        ),
        "kt-testbed/http-echo:2 kt-testbed/http-echo:2"
    );
    tb.stop().await;
}

const STATEFUL: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: peers}
spec:
  clusterIP: None
  selector: {app: db}
  ports: [{name: http, port: 8080}]
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db}
spec:
  serviceName: peers
  replicas: 3
  selector: {matchLabels: {app: db}}
  template:
    metadata: {labels: {app: db}}
    spec:
      containers:
      - name: app
        image: kt-testbed/http-echo:1
        ports: [{name: http, containerPort: 8080}]
        readinessProbe: {httpGet: {path: /, port: http}}
        volumeMounts: [{name: data, mountPath: /data}]
  volumeClaimTemplates:
  - metadata: {name: data}
    spec: {accessModes: [ReadWriteOnce], resources: {requests: {storage: 1Mi}}}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn a_statefulset_starts_in_order_with_stable_names_hostnames_and_dns_records() {
    let tb = start_testbed(false).await;
    deploy_web(&tb);
    // Each pod appears only once every one before it runs and is ready.
    let watch = StateWatch::start(&tb, "app=db", |seen| {
        let ordinals: Vec<usize> = seen
            .pods
            .keys()
            .filter_map(|n| n.strip_prefix("db-")?.parse().ok())
            .collect();
        let Some(&last) = ordinals.iter().max() else {
            return Ok(());
        };
        let before_ready = (0..last).all(|i| {
            seen.pods
                .get(&format!("db-{i}"))
                .is_some_and(|p| is_ready(p) || is_terminating(p))
        });
        if before_ready || seen.pods.values().any(is_terminating) {
            Ok(())
        } else {
            Err(format!(
                "db-{last} before the ones before it were ready: {ordinals:?}"
            ))
        }
    })
    .await;
    apply(&tb.kubeconfig, STATEFUL);
    let status = rollout_status(&tb, "sts/db");
    assert!(status.contains("roll out complete"), "{status}");
    let observed = watch.stop().await;
    assert!(observed.violations.is_empty(), "{:#?}", observed.violations);
    assert_eq!(
        jsonpath(&tb, &["pods", "-l", "app=db"], "{.items[*].metadata.name}"),
        "db-0 db-1 db-2"
    );

    // Each pod's name is its hostname, with its name under the Service in /etc/hosts, and
    // the cluster DNS answers it.
    assert_eq!(in_pod(&tb, "db-1", &["hostname"]).1.trim(), "db-1");
    assert_eq!(
        in_pod(&tb, "db-1", &["hostname", "-f"]).1.trim(),
        "db-1.peers.default.svc.cluster.local"
    );
    let resolve = |name: &str| {
        in_client(&tb, &["getent", "hosts", name])
            .1
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned()
    };
    for i in 0..3 {
        let ip = jsonpath(&tb, &["pod", &format!("db-{i}")], "{.status.podIP}");
        assert_eq!(
            resolve(&format!("db-{i}.peers.default.svc.cluster.local")),
            ip
        );
        assert_eq!(resolve(&format!("db-{i}.peers")), ip, "by the search path");
    }

    // A deleted pod comes back under its name, with its data, and its record follows it.
    in_pod(&tb, "db-0", &["sh", "-c", "echo kept > /data/file"]);
    let (old_uid, old_ip) = (
        jsonpath(&tb, &["pod", "db-0"], "{.metadata.uid}"),
        jsonpath(&tb, &["pod", "db-0"], "{.status.podIP}"),
    );
    kubectl_ok(&tb.kubeconfig, &["delete", "pod", "db-0"]);
    let new_ip = eventually("db-0 is back, ready, under a new uid", async || {
        let uid = jsonpath(&tb, &["pod", "db-0"], "{.metadata.uid}");
        let ready = jsonpath(
            &tb,
            &["pod", "db-0"],
            r#"{.status.conditions[?(@.type=="Ready")].status}"#,
        );
        seen(
            (
                uid,
                ready,
                jsonpath(&tb, &["pod", "db-0"], "{.status.podIP}"),
            ),
            |(u, r, _)| *u != old_uid && r == "True",
        )
    })
    .await
    .2;
    assert_ne!(new_ip, old_ip, "a new pod, a new address");
    assert_eq!(in_pod(&tb, "db-0", &["cat", "/data/file"]).1, "kept\n");
    eventually("the DNS record follows db-0", async || {
        seen(resolve("db-0.peers.default.svc.cluster.local"), |ip| {
            *ip == new_ip
        })
    })
    .await;

    // Scaling down removes the highest ordinal first, one at a time.
    let watch = StateWatch::start(&tb, "app=db", |seen| {
        let going: Vec<&String> = seen
            .pods
            .iter()
            .filter(|(_, p)| is_terminating(p))
            .map(|(n, _)| n)
            .collect();
        match going.as_slice() {
            [] => Ok(()),
            [one] if *one == "db-2" || !seen.pods.contains_key("db-2") => Ok(()),
            _ => Err(format!("removing {going:?} of {:?}", seen.pods.keys())),
        }
    })
    .await;
    kubectl_ok(&tb.kubeconfig, &["scale", "sts/db", "--replicas=1"]);
    eventually("db-1 and db-2 are gone", async || {
        seen(
            jsonpath(&tb, &["pods", "-l", "app=db"], "{.items[*].metadata.name}"),
            |p| p == "db-0",
        )
    })
    .await;
    let observed = watch.stop().await;
    assert!(observed.violations.is_empty(), "{:#?}", observed.violations);
    tb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn jobs_run_to_completion_count_failures_and_restart_on_failure() {
    let tb = start_testbed(false).await;
    apply(
        &tb.kubeconfig,
        r#"
apiVersion: batch/v1
kind: Job
metadata: {name: three}
spec:
  completions: 3
  parallelism: 2
  template:
    spec:
      restartPolicy: Never
      containers: [{name: c, image: busybox, command: [sh, -c, 'echo done on $HOSTNAME']}]
---
apiVersion: batch/v1
kind: Job
metadata: {name: indexed}
spec:
  completions: 3
  parallelism: 3
  completionMode: Indexed
  template:
    spec:
      restartPolicy: Never
      containers: [{name: c, image: busybox, command: [sh, -c, 'echo index $JOB_COMPLETION_INDEX']}]
---
apiVersion: batch/v1
kind: Job
metadata: {name: failing}
spec:
  backoffLimit: 1
  template:
    spec:
      restartPolicy: Never
      containers: [{name: c, image: busybox, command: [sh, -c, 'exit 3']}]
---
apiVersion: batch/v1
kind: Job
metadata: {name: retried}
spec:
  template:
    spec:
      restartPolicy: OnFailure
      volumes: [{name: scratch, emptyDir: {}}]
      containers:
      - name: c
        image: busybox
        command: [sh, -c, 'if [ -e /scratch/once ]; then echo second run; else touch /scratch/once; exit 1; fi']
        volumeMounts: [{name: scratch, mountPath: /scratch}]
"#,
    );
    for job in ["three", "indexed", "retried"] {
        waited(
            &tb,
            &[
                "wait",
                "--for=condition=complete",
                &format!("job/{job}"),
                "--timeout=60s",
            ],
        );
    }
    kubectl_ok(
        &tb.kubeconfig,
        &[
            "wait",
            "--for=condition=failed",
            "job/failing",
            "--timeout=60s",
        ],
    );

    let status = |job: &str| {
        serde_json::from_str::<serde_json::Value>(&jsonpath(&tb, &["job", job], "{.status}"))
            .expect("status JSON")
    };
    let three = status("three");
    assert_eq!(three["succeeded"], 3, "{three}");
    assert!(
        three["completionTime"].is_string() && three["startTime"].is_string(),
        "{three}"
    );
    let pods = jsonpath(
        &tb,
        &["pods", "-l", "job-name=three"],
        "{.items[*].status.phase}",
    );
    assert_eq!(pods, "Succeeded Succeeded Succeeded");
    let logs = kubectl_ok(&tb.kubeconfig, &["logs", "-l", "job-name=three"]);
    assert_eq!(logs.matches("done on three-").count(), 3, "{logs}");

    assert_eq!(status("indexed")["completedIndexes"], "0-2");
    let logs = kubectl_ok(&tb.kubeconfig, &["logs", "-l", "job-name=indexed"]);
    let indexes: BTreeSet<&str> = logs.lines().collect();
    assert_eq!(indexes, BTreeSet::from(["index 0", "index 1", "index 2"]));

    let failing = status("failing");
    assert_eq!(failing["failed"], 2, "backoffLimit 1: two tries: {failing}");
    let reason = jsonpath(
        &tb,
        &["job", "failing"],
        r#"{.status.conditions[?(@.type=="Failed")].reason}"#,
    );
    assert_eq!(reason, "BackoffLimitExceeded");

    let retried = status("retried");
    assert_eq!(retried["succeeded"], 1, "{retried}");
    assert_eq!(
        jsonpath(
            &tb,
            &["pods", "-l", "job-name=retried"],
            "{.items[*].status.containerStatuses[0].restartCount}"
        ),
        "1",
        "OnFailure restarts the container in its pod"
    );
    assert_eq!(
        kubectl_ok(&tb.kubeconfig, &["logs", "job/retried"]),
        "second run\n"
    );

    let reasons: Vec<(String, String)> = events(&tb)
        .into_iter()
        .filter(|(object, ..)| ["three", "failing"].contains(&object.as_str()))
        .map(|(object, _, reason, ..)| (object, reason))
        .collect();
    for wanted in [
        ("three", "SuccessfulCreate"),
        ("three", "Completed"),
        ("failing", "BackoffLimitExceeded"),
    ] {
        assert!(
            reasons.contains(&(wanted.0.into(), wanted.1.into())),
            "{wanted:?} in {reasons:?}"
        );
    }
    tb.stop().await;
}

/// Whether the events hold one from `object` (a prefix of its name) with `reason` and a
/// message starting with `message`.
fn has_event(
    all: &[(String, String, String, String, i64)],
    object: &str,
    kind: &str,
    reason: &str,
    message: &str,
) -> bool {
    all.iter().any(|(o, k, r, m, _)| {
        o.starts_with(object) && k == kind && r == reason && m.starts_with(message)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn controllers_and_kubelets_write_the_events_of_a_cluster() {
    let tb = start_testbed(false).await;
    deploy_web(&tb);
    kubectl_ok(&tb.kubeconfig, &["scale", "deploy/web", "--replicas=1"]);
    kubectl_ok(
        &tb.kubeconfig,
        &["run", "nosuch", "--image=example.com/no/such:1"],
    );
    kubectl_ok(
        &tb.kubeconfig,
        &[
            "run",
            "crash",
            "--image=busybox",
            "--command",
            "--",
            "sh",
            "-c",
            "exit 2",
        ],
    );
    let all = eventually("the events of all that", async || {
        seen(events(&tb), |all| {
            has_event(
                all,
                "crash",
                "Warning",
                "BackOff",
                "Back-off restarting failed container crash in pod crash_default(",
            ) && has_event(
                all,
                "nosuch",
                "Normal",
                "BackOff",
                "Back-off pulling image \"example.com/no/such:1\"",
            ) && has_event(all, "web-", "Normal", "Killing", "Stopping container app")
        })
    })
    .await;
    for (object, kind, reason, message) in [
        (
            "web-",
            "Normal",
            "Scheduled",
            "Successfully assigned default/web-",
        ),
        (
            "web-",
            "Normal",
            "Pulled",
            "Container image \"kt-testbed/http-echo:1\" already present on machine",
        ),
        ("web-", "Normal", "Created", "Created container: app"),
        ("web-", "Normal", "Started", "Started container app"),
        ("web-", "Normal", "SuccessfulCreate", "Created pod: web-"),
        ("web-", "Normal", "SuccessfulDelete", "Deleted pod: web-"),
        (
            "web",
            "Normal",
            "ScalingReplicaSet",
            "Scaled up replica set web-",
        ),
        (
            "web",
            "Normal",
            "ScalingReplicaSet",
            "Scaled down replica set web-",
        ),
        (
            "nosuch",
            "Normal",
            "Pulling",
            "Pulling image \"example.com/no/such:1\"",
        ),
        (
            "nosuch",
            "Warning",
            "Failed",
            "Failed to pull image \"example.com/no/such:1\": ",
        ),
        ("nosuch", "Warning", "Failed", "Error: ImagePullBackOff"),
    ] {
        assert!(
            has_event(&all, object, kind, reason, message),
            "{object} {reason} {message:?} in {all:#?}"
        );
    }
    tb.stop().await;
}

/// A pod whose sandbox cannot be made stays Pending with `FailedCreatePodSandBox` events,
/// retried with back-off, and starts once the obstacle is gone. The obstacle: namespaces of
/// the names the kubelet gives the next pods' sandboxes (`<prefix>p<n>`, `n` counting pods;
/// the cluster DNS pod took 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn a_failed_pod_sandbox_is_reported_retried_and_recovers() {
    let tb = start_testbed(false).await;
    let prefix = tb.topology().prefix.clone();
    let obstacles: Vec<NetNs> = (2..6)
        .map(|n| NetNs::new(format!("{prefix}p{n}")).expect("a namespace in the way"))
        .collect();
    kubectl_ok(
        &tb.kubeconfig,
        &["run", "blocked", "--image=kt-testbed/sleep"],
    );
    let retries = eventually("retried sandbox failures are reported", async || {
        let count = events(&tb)
            .into_iter()
            .filter(|(o, k, r, m, _)| {
                o == "blocked"
                    && k == "Warning"
                    && r == "FailedCreatePodSandBox"
                    && m.starts_with("Failed to create pod sandbox: ")
            })
            .map(|(.., count)| count)
            .sum::<i64>();
        seen(count, |c| *c >= 2)
    })
    .await;
    assert_eq!(
        jsonpath(&tb, &["pod", "blocked"], "{.status.phase}"),
        "Pending",
        "after {retries} failures"
    );
    drop(obstacles);
    kubectl_ok(
        &tb.kubeconfig,
        &[
            "wait",
            "--for=condition=Ready",
            "pod/blocked",
            "--timeout=60s",
        ],
    );
    tb.stop().await;
}

/// `ip -n <node> route`'s /32 routes: the pod IPs the node routes to a veth.
fn node_pod_routes(tb: &Testbed) -> BTreeSet<String> {
    tb.topology()
        .nodes
        .iter()
        .flat_map(|n| {
            let out = n
                .netns
                .ip(&["-4", "route", "show", "scope", "link"])
                .expect("ip route");
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| l.split_whitespace().next().map(String::from))
                .filter(|dst| dst.starts_with("10.244."))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The IPs of every pod with an address of its own (not hostNetwork).
async fn pod_ips(pods: &Api<Pod>) -> BTreeSet<String> {
    pods.list(&Default::default())
        .await
        .expect("pods")
        .items
        .into_iter()
        .filter(|p| p.spec.as_ref().and_then(|s| s.host_network) != Some(true))
        .filter_map(|p| p.status?.pod_ip)
        .collect()
}

/// Scale a Deployment 0 → 2 → 0 → 2 … a hundred times, the next scale-up as soon as the
/// pods of the last are being deleted (their sandboxes torn down while the new ones are
/// made): every time both new pods run, none stays Pending, and no node keeps a route of a
/// pod that is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn scaling_up_and_down_a_hundred_times_leaves_no_pod_pending() {
    let tb = start_testbed(false).await;
    apply(
        &tb.kubeconfig,
        r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: churn}
spec:
  replicas: 0
  selector: {matchLabels: {app: churn}}
  template:
    metadata: {labels: {app: churn}}
    spec:
      terminationGracePeriodSeconds: 1
      containers: [{name: c, image: kt-testbed/sleep}]
"#,
    );
    let client = tb.client().await;
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> =
        Api::default_namespaced(client.clone());
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let all_pods: Api<Pod> = Api::all(client);
    let churn = kube::api::ListParams::default().labels("app=churn");
    let scale = async |replicas: i32| {
        deployments
            .patch_scale(
                "churn",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"replicas": replicas}})),
            )
            .await
            .expect("scale");
    };
    for round in 0..100 {
        scale(2).await;
        eventually(
            format!("round {round}: both pods run and are ready"),
            async || {
                let now = pods.list(&churn).await.expect("pods").items;
                let live: Vec<&Pod> = now.iter().filter(|p| !is_terminating(p)).collect();
                let states: Vec<(String, Option<String>, bool)> = live
                    .iter()
                    .map(|p| {
                        (
                            name_of(p),
                            p.status.as_ref().and_then(|s| s.phase.clone()),
                            is_ready(p),
                        )
                    })
                    .collect();
                seen(states, |s| {
                    s.len() == 2
                        && s.iter()
                            .all(|(_, phase, ready)| phase.as_deref() == Some("Running") && *ready)
                })
            },
        )
        .await;
        scale(0).await;
        eventually(
            format!("round {round}: both pods are being deleted"),
            async || {
                let now = pods.list(&churn).await.expect("pods").items;
                seen(now.iter().filter(|p| !is_terminating(p)).count(), |n| {
                    *n == 0
                })
            },
        )
        .await;
    }
    eventually("every churn pod is gone", async || {
        seen(pods.list(&churn).await.expect("pods").items.len(), |n| {
            *n == 0
        })
    })
    .await;
    eventually("the nodes route exactly the pods that exist", async || {
        let (routes, ips) = (node_pod_routes(&tb), pod_ips(&all_pods).await);
        seen((routes, ips), |(r, i)| r == i)
    })
    .await;
    let pending = events(&tb)
        .into_iter()
        .filter(|(_, _, reason, ..)| reason == "FailedCreatePodSandBox")
        .collect::<Vec<_>>();
    assert!(pending.is_empty(), "no sandbox failed: {pending:#?}");
    tb.stop().await;
}

const CLIENTS: [&str; 2] = ["client", "client-2"];

/// A `kubectl exec` asking from a client pod, ended if the test fails.
struct Asker(std::process::Child);

impl Drop for Asker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `ktctl exchange` in agent mode while `kubectl set image` rolls the exchanged Deployment:
/// every request from the client pods, during the rollout and after it, reaches the
/// workstation, by the Service's name and by the new pods' own IPs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn an_agent_mode_exchange_follows_a_rolling_update_of_the_deployment() {
    let tb = start_testbed(true).await;
    deploy_web(&tb);
    deploy_client_2(&tb);
    install_agent(&tb);
    let _app = workstation::http_echo(&tb, 18090).await;
    let mut exchange = Background::ktctl(&tb, &["exchange", "web", "--expose", "18090:80"]);
    exchange
        .wait_for(" Now all request to service 'web' will be redirected to local")
        .await;
    until_all_answered_by(
        &tb,
        &CLIENTS,
        &["http://web/".to_owned()],
        |who| who == "workstation",
        Duration::from_secs(10),
    )
    .await
    .unwrap_or_else(|wrong| panic!("{wrong}\n{}", exchange.log()));

    // Each client asks again and again until told to stop; every answer is recorded.
    let stop = tb.dir.join("stop-asking");
    let script = format!(
        "until [ -e {} ]; do r=$(curl -s --max-time 3 http://web/ | head -n1); echo \"${{r:-no answer}}\"; done",
        stop.display()
    );
    let askers: Vec<Asker> = CLIENTS
        .iter()
        .map(|pod| {
            let log = std::fs::File::create(tb.dir.join(format!("answers-{pod}"))).expect("log");
            Asker(
                std::process::Command::new("kubectl")
                    .args(["exec", pod, "--", "sh", "-c", &script])
                    .env("KUBECONFIG", &tb.kubeconfig)
                    .stdout(log)
                    .spawn()
                    .expect("kubectl exec"),
            )
        })
        .collect();
    let old_ips = web_pods_field(&tb, "status.podIP");
    kubectl_ok(
        &tb.kubeconfig,
        &["set", "image", "deploy/web", "app=kt-testbed/http-echo:2"],
    );
    rollout_status(&tb, "deploy/web");
    let new_ips = web_pods_field(&tb, "status.podIP");
    assert!(
        new_ips.is_disjoint(&old_ips),
        "new pods, new IPs: {old_ips:?} {new_ips:?}"
    );
    // Some more answers after the rollout, then stop.
    let answers = |pod: &str| {
        std::fs::read_to_string(tb.dir.join(format!("answers-{pod}"))).unwrap_or_default()
    };
    let counted: Vec<usize> = CLIENTS.iter().map(|p| answers(p).lines().count()).collect();
    eventually("more answers after the rollout", async || {
        seen(
            CLIENTS
                .iter()
                .map(|p| answers(p).lines().count())
                .collect::<Vec<_>>(),
            |now| {
                now.iter()
                    .zip(&counted)
                    .all(|(n, before)| *n >= before + 10)
            },
        )
    })
    .await;
    std::fs::write(&stop, "").expect("stop file");
    for mut asker in askers {
        assert!(asker.0.wait().expect("asker ends").success());
    }
    for pod in CLIENTS {
        let all = answers(pod);
        let wrong: Vec<&str> = all.lines().filter(|l| *l != "pod=workstation").collect();
        assert!(all.lines().count() > 10, "{pod} asked: {all}");
        assert!(
            wrong.is_empty(),
            "{pod}: {} of {} answers not from the workstation: {wrong:?}\n{}",
            wrong.len(),
            all.lines().count(),
            exchange.log()
        );
    }
    // The new pods' own addresses lead to the workstation too.
    for ip in &new_ips {
        let who = answered_by(&tb, "client", &format!("http://{ip}:8080/"));
        assert_eq!(
            who.as_deref(),
            Some("workstation"),
            "{ip}\n{}",
            exchange.log()
        );
    }
    let (status, log) = exchange.interrupt();
    assert!(status.success(), "{log}");
    tb.stop().await;
}
