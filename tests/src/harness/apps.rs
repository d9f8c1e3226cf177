//! Workloads the suites deploy on a testbed, and running commands in their pods.

use std::{
    path::Path,
    sync::atomic::{AtomicU32, Ordering},
};

use super::{
    eventually::poll_within,
    kubectl::{kubectl, kubectl_ok},
};
use kt_testbed::cluster::Testbed;

/// `web`: two HTTP echo replicas (spread over the nodes) behind a Service with a named
/// targetPort, and a `client` pod on node-1 to call things from.
pub const WEB: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: app
        image: kt-testbed/http-echo:1
        ports: [{name: http, containerPort: 8080}]
        readinessProbe: {httpGet: {path: /, port: 8080}, periodSeconds: 1}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Pod
metadata: {name: client}
spec:
  nodeSelector: {kubernetes.io/hostname: node-1}
  containers: [{name: c, image: kt-testbed/sleep}]
"#;

/// A two-node testbed for a suite, with the workspace's kt-testbed and, when wanted, its
/// kt-node-agent (for the agent and kt's shadow images).
pub async fn start_testbed(with_agent: bool) -> Testbed {
    super::require_root();
    let options = kt_testbed::cluster::Options {
        nodes: 2,
        testbed_bin: super::bins::kt_testbed(),
        agent_bin: with_agent.then(super::bins::kt_node_agent),
        dir: None,
    };
    Testbed::start(options).await.expect("testbed starts")
}

/// `kubectl apply` of a manifest given as text.
pub fn apply(kubeconfig: &Path, manifest: &str) {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let file = kubeconfig.with_file_name(format!(
        "manifest-{}.yaml",
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&file, manifest).expect("write manifest");
    kubectl_ok(
        kubeconfig,
        &["apply", "-f", file.to_str().expect("UTF-8 path")],
    );
}

/// Deploys [`WEB`] and waits until it serves.
pub fn deploy_web(tb: &Testbed) {
    apply(&tb.kubeconfig, WEB);
    kubectl_ok(
        &tb.kubeconfig,
        &["rollout", "status", "deploy/web", "--timeout=60s"],
    );
    kubectl_ok(
        &tb.kubeconfig,
        &[
            "wait",
            "--for=condition=Ready",
            "pod/client",
            "--timeout=60s",
        ],
    );
}

/// Runs a command in the `client` pod; returns (exit ok, stdout).
pub fn in_client(tb: &Testbed, cmd: &[&str]) -> (bool, String) {
    in_pod(tb, "client", cmd)
}

/// Runs a command in `pod` (namespace `default`); returns (exit ok, stdout).
pub fn in_pod(tb: &Testbed, pod: &str, cmd: &[&str]) -> (bool, String) {
    let mut args = vec!["exec", pod, "--"];
    args.extend_from_slice(cmd);
    let out = kubectl(&tb.kubeconfig, &args);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Service `name` as a user sees its routing: selector and annotations.
pub fn service_state(tb: &Testbed, name: &str) -> String {
    kubectl_ok(
        &tb.kubeconfig,
        &[
            "get",
            "svc",
            name,
            "-o",
            "jsonpath={.spec.selector} {.metadata.annotations}",
        ],
    )
}

/// Names of the `web` pods now.
pub fn web_pods(tb: &Testbed) -> std::collections::HashSet<String> {
    web_pods_field(tb, "metadata.name")
}

/// One field of every `web` pod now (`status.podIP`, `spec.nodeName`, …), as a set. A kt
/// shadow standing in for them (scale mode carries their labels) is not one of them.
pub fn web_pods_field(tb: &Testbed, field: &str) -> std::collections::HashSet<String> {
    kubectl_ok(
        &tb.kubeconfig,
        &[
            "get",
            "pods",
            "-l",
            "app=web,!kt-role",
            "-o",
            &format!("jsonpath={{.items[*].{field}}}"),
        ],
    )
    .split_whitespace()
    .map(String::from)
    .collect()
}

/// Which pod answered an HTTP GET from the client pod (the echo's `pod=` line).
pub fn who_answers(tb: &Testbed, url: &str) -> Option<String> {
    answered_by(tb, "client", url)
}

/// Which pod answered an HTTP GET from `pod` (the echo's `pod=` line), if anyone.
pub fn answered_by(tb: &Testbed, pod: &str, url: &str) -> Option<String> {
    let (ok, out) = in_pod(tb, pod, &["curl", "-s", "--max-time", "3", url]);
    ok.then(|| {
        out.lines()
            .next()
            .unwrap_or_default()
            .trim_start_matches("pod=")
            .to_owned()
    })
}

/// Every Event in the cluster as kubectl reads them: `(involved object, type, reason,
/// message, count)`.
pub fn events(tb: &Testbed) -> Vec<(String, String, String, String, i64)> {
    let list: serde_json::Value = serde_json::from_str(&kubectl_ok(
        &tb.kubeconfig,
        &["get", "events", "--all-namespaces", "-o", "json"],
    ))
    .expect("an event list");
    list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
            (
                text(&e["involvedObject"]["name"]),
                text(&e["type"]),
                text(&e["reason"]),
                text(&e["message"]),
                e["count"].as_i64().unwrap_or(1),
            )
        })
        .collect()
}

/// A second client pod, on node-2 (`client` is on node-1).
const CLIENT_2: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: client-2}
spec:
  nodeSelector: {kubernetes.io/hostname: node-2}
  containers: [{name: c, image: kt-testbed/sleep}]
"#;

/// Deploys the client pod `client-2` on node-2 and waits until it is ready.
pub fn deploy_client_2(tb: &Testbed) {
    apply(&tb.kubeconfig, CLIENT_2);
    kubectl_ok(
        &tb.kubeconfig,
        &[
            "wait",
            "--for=condition=Ready",
            "pod/client-2",
            "--timeout=60s",
        ],
    );
}

/// The project's `deploy/` folder.
pub const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");

/// Installs kt's agent as an admin would (`kubectl apply -k deploy/`, unmodified) and waits
/// until it runs on every node.
pub fn install_agent(tb: &Testbed) {
    kubectl_ok(&tb.kubeconfig, &["apply", "-k", DEPLOY]);
    wait_for_agents(tb);
}

/// The process id of the agent on `node`: the `kt-node-agent` process in that node's
/// network namespace (the agents run on the host network; a shadow pod runs the same binary
/// in a pod's namespace).
pub fn agent_pid(tb: &Testbed, node: &str) -> Option<u32> {
    use std::os::unix::fs::MetadataExt as _;
    let netns = std::fs::metadata(tb.node_netns(node)?).ok()?.ino();
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            let in_node =
                std::fs::metadata(format!("/proc/{pid}/ns/net")).is_ok_and(|m| m.ino() == netns);
            in_node
                && std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                    c.split(|b| *b == 0)
                        .next()
                        .is_some_and(|argv0| argv0.ends_with(b"kt-node-agent"))
                })
        })
}

/// Waits until the agent DaemonSet's pods are up on every node.
pub fn wait_for_agents(tb: &Testbed) {
    kubectl_ok(
        &tb.kubeconfig,
        &[
            "rollout",
            "status",
            "daemonset/kt-node-agent",
            "-n",
            "kt-system",
            "--timeout=60s",
        ],
    );
}

/// Polls until every URL, asked from each of `pods`, is answered by a pod `expected`
/// accepts; how long that took, or what was answered wrongly when `within` ran out.
pub async fn until_all_answered_by(
    tb: &Testbed,
    pods: &[&str],
    urls: &[String],
    expected: impl Fn(&str) -> bool,
    within: std::time::Duration,
) -> Result<std::time::Duration, String> {
    let started = std::time::Instant::now();
    poll_within(within, async || {
        let mut wrong = Vec::new();
        for pod in pods {
            for url in urls {
                let who = answered_by(tb, pod, url).unwrap_or_default();
                if !expected(&who) {
                    wrong.push(format!("{pod} → {url}: {who:?}"));
                }
            }
        }
        if wrong.is_empty() {
            Ok(started.elapsed())
        } else {
            Err(wrong.join("; "))
        }
    })
    .await
}

/// A shadow pod `kt-connect-shadow-abcde` of `image` (with container `args` and `env`) in
/// `default`, under the v0.3.7 contract: a fresh key pair, its public half in the ConfigMap
/// key `authorized` mounted at `/root/authorized`. Returns the private key file and the pod IP.
pub fn deploy_shadow(
    tb: &Testbed,
    image: &str,
    args: &[&str],
    env: &[(&str, &str)],
    key_type: &str,
) -> (std::path::PathBuf, String) {
    let key = tb
        .dir
        .join(format!("shadow-key-{}", super::unique_name("k")));
    let status = std::process::Command::new("ssh-keygen")
        .args([
            "-q",
            "-t",
            key_type,
            "-N",
            "",
            "-f",
            key.to_str().expect("UTF-8 path"),
        ])
        .status()
        .expect("ssh-keygen runs");
    assert!(status.success());
    let public = std::fs::read_to_string(key.with_extension("pub")).expect("public key");
    let authorized = tb.dir.join("authorized");
    std::fs::write(&authorized, public.trim()).expect("write key");
    kubectl_ok(
        &tb.kubeconfig,
        &[
            "create",
            "configmap",
            "kt-connect-shadow-abcde",
            &format!("--from-file=authorized={}", authorized.display()),
        ],
    );
    let args = serde_json::to_string(args).expect("strings serialise");
    let env: Vec<serde_json::Value> = env
        .iter()
        .map(|(name, value)| serde_json::json!({"name": name, "value": value}))
        .collect();
    let env = serde_json::Value::from(env);
    apply(
        &tb.kubeconfig,
        &format!(
            r#"
apiVersion: v1
kind: Pod
metadata: {{name: kt-connect-shadow-abcde, labels: {{control-by: kt, kt-role: shadow-connect}}}}
spec:
  nodeSelector: {{kubernetes.io/hostname: node-2}}
  containers:
  - name: standalone
    image: {image}
    args: {args}
    env: {env}
    volumeMounts: [{{name: ssh-public-key, mountPath: /root/authorized}}]
    readinessProbe: {{tcpSocket: {{port: 22}}, periodSeconds: 1}}
  volumes:
  - name: ssh-public-key
    configMap: {{name: kt-connect-shadow-abcde, items: [{{key: authorized, path: authorized_keys}}]}}
"#
        ),
    );
    kubectl_ok(
        &tb.kubeconfig,
        &[
            "wait",
            "--for=condition=Ready",
            "pod/kt-connect-shadow-abcde",
            "--timeout=60s",
        ],
    );
    let ip = kubectl_ok(
        &tb.kubeconfig,
        &[
            "get",
            "pod",
            "kt-connect-shadow-abcde",
            "-o",
            "jsonpath={.status.podIP}",
        ],
    );
    (key, ip)
}

/// Creates `count` Services `s0`, `s1`, … in `services`' namespace (port 80, selecting pods
/// nobody runs), 16 at a time: the many-Services load of the benchmarks.
pub async fn create_services(
    services: &kube::Api<k8s_openapi::api::core::v1::Service>,
    count: usize,
) {
    use futures::StreamExt as _;
    futures::stream::iter(0..count)
        .for_each_concurrent(16, |i| async move {
            let svc = serde_json::from_value(serde_json::json!({
                "metadata": {"name": format!("s{i}")},
                "spec": {"selector": {"app": format!("s{i}")}, "ports": [{"port": 80}]}
            }))
            .expect("service");
            services
                .create(&kube::api::PostParams::default(), &svc)
                .await
                .expect("created");
        })
        .await;
}

/// VmRSS in KiB of every node agent process (`kt-node-agent agent`) of this testbed, found
/// in /proc by command line and cgroup; ascending, one per running agent.
pub fn agent_rss(tb: &Testbed) -> Vec<u64> {
    let prefix = &tb.topology().prefix;
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let path = entry.path();
        let cmdline = std::fs::read(path.join("cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_agent = args.first().is_some_and(|a| a.ends_with(b"kt-node-agent"))
            && args.get(1) == Some(&&b"agent"[..]);
        let ours = std::fs::read_to_string(path.join("cgroup"))
            .is_ok_and(|c| c.contains(&format!("/{}", prefix.trim_end_matches('-'))));
        if is_agent && ours {
            let status = std::fs::read_to_string(path.join("status")).unwrap_or_default();
            if let Some(kib) = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
            {
                out.push(kib);
            }
        }
    }
    out.sort_unstable();
    out
}

/// Writes `node`'s agent record in `kt-system` as that node's agent does (server-side
/// apply as the agent's field manager), listing `held`: what makes the agents believe a
/// session status naming `node` (`kt_node_agent::agent::trust`). Panics if the write fails.
pub async fn write_agent_record(
    client: kube::Client,
    node: &str,
    held: &[kt_node_agent::agent::trust::HeldSession],
) {
    use kt_node_agent::agent::trust::{
        RECORD_LABEL, RECORD_NODE_KEY, RECORD_SESSIONS_KEY, record_name,
    };
    let name = record_name(node);
    let record = serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": kt_proto::agent::NAMESPACE,
                     "labels": {RECORD_LABEL: node}},
        "data": {RECORD_NODE_KEY: node,
                 RECORD_SESSIONS_KEY: serde_json::to_string(held).expect("serialisable")}});
    let records: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
        kube::Api::namespaced(client, kt_proto::agent::NAMESPACE);
    records
        .patch(
            &name,
            &kube::api::PatchParams::apply("kt-node-agent").force(),
            &kube::api::Patch::Apply(&record),
        )
        .await
        .expect("agent record written");
}
