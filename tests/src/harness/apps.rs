//! Workloads the suites deploy on a testbed, and running commands in their pods.

use std::{
    path::Path,
    sync::atomic::{AtomicU32, Ordering},
};

use super::kubectl::{kubectl, kubectl_ok};
use crate::testbed::cluster::Testbed;

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
    let mut args = vec!["exec", "client", "--"];
    args.extend_from_slice(cmd);
    let out = kubectl(&tb.kubeconfig, &args);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Which pod answered an HTTP GET from the client pod (the echo's `pod=` line).
pub fn who_answers(tb: &Testbed, url: &str) -> Option<String> {
    let (ok, out) = in_client(tb, &["curl", "-s", "--max-time", "3", url]);
    ok.then(|| {
        out.lines()
            .next()
            .unwrap_or_default()
            .trim_start_matches("pod=")
            .to_owned()
    })
}
