//! The SSH tunnel (root, on the testbed): kt's shadow role under the ktctl v0.3.7 contract,
//! driven by OpenSSH's client (`ssh -W`, `ssh -L`, `ssh -R`).

use std::{path::PathBuf, process::Command};

use kt_tests::{
    harness::{
        self,
        apps::{apply, deploy_web, in_client},
        kubectl::kubectl_ok,
    },
    testbed::cluster::{Options, Testbed},
};

const TESTBED: &str = env!("CARGO_BIN_EXE_kt-testbed");

/// kt-node-agent, built next to kt-testbed (`tests/run test` builds every binary first).
fn agent_bin() -> PathBuf {
    let path = PathBuf::from(TESTBED).with_file_name("kt-node-agent");
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace --bins`",
        path.display()
    );
    path
}

/// A testbed with `web`, a client pod, and our shadow pod `kt-connect-shadow-abcde`
/// whose authorized key is a fresh one; returns the testbed, the private key and the
/// shadow's pod IP.
async fn with_shadow() -> (Testbed, PathBuf, String) {
    harness::require_root();
    let tb = Testbed::start(Options {
        nodes: 2,
        testbed_bin: TESTBED.into(),
        agent_bin: Some(agent_bin()),
        dir: None,
    })
    .await
    .expect("testbed starts");
    deploy_web(&tb);
    let key = tb.dir.join("session-key");
    let status = Command::new("ssh-keygen")
        .args([
            "-q",
            "-t",
            "rsa",
            "-b",
            "2048",
            "-N",
            "",
            "-f",
            key.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let authorized = tb.dir.join("authorized");
    std::fs::write(&authorized, public.trim()).unwrap();
    kubectl_ok(
        &tb.kubeconfig,
        &[
            "create",
            "configmap",
            "kt-connect-shadow-abcde",
            &format!("--from-file=authorized={}", authorized.display()),
        ],
    );
    apply(
        &tb.kubeconfig,
        r#"
apiVersion: v1
kind: Pod
metadata: {name: kt-connect-shadow-abcde, labels: {control-by: kt, kt-role: shadow-connect}}
spec:
  nodeSelector: {kubernetes.io/hostname: node-2}
  containers:
  - name: standalone
    image: kt-node-agent:dev
    args: [shadow]
    volumeMounts: [{name: ssh-public-key, mountPath: /root/authorized}]
    readinessProbe: {tcpSocket: {port: 22}, periodSeconds: 1}
  volumes:
  - name: ssh-public-key
    configMap: {name: kt-connect-shadow-abcde, items: [{key: authorized, path: authorized_keys}]}
"#,
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
    (tb, key, ip)
}

/// `ssh` options for a throwaway session with `key`.
fn ssh(key: &std::path::Path) -> String {
    format!(
        "ssh -i {} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR -o ExitOnForwardFailure=yes",
        key.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssh_direct_tcpip_reaches_services_by_cluster_name() {
    let (tb, key, ip) = with_shadow().await;
    let ssh = ssh(&key);
    // ssh -W: one connection through the shadow to a Service by its cluster DNS name.
    let (ok, out) = in_client(
        &tb,
        &[
            "sh",
            "-c",
            &format!(
                "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | {ssh} -W web.default.svc.cluster.local:80 root@{ip}"
            ),
        ],
    );
    assert!(ok && out.contains("pod=web-"), "{out}");
    // ssh -L: a local port forwarded through the shadow; two requests on it.
    let script = format!(
        "{ssh} -N -L 127.0.0.1:18080:web:80 root@{ip} & pid=$!; sleep 1; curl -s http://127.0.0.1:18080/; curl -s http://127.0.0.1:18080/; kill $pid"
    );
    let (_, out) = in_client(&tb, &["sh", "-c", &script]);
    assert_eq!(out.matches("pod=web-").count(), 2, "{out}");
    tb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssh_remote_forward_listens_on_the_shadow_and_stops_with_the_session() {
    let (tb, key, ip) = with_shadow().await;
    let ssh = ssh(&key);
    // The client pod serves HTTP on 8081 and asks the shadow to listen on all its
    // addresses (GatewayPorts) at 9999; a request to shadow:9999 lands in the client pod.
    let script = format!(
        "PORT=8081 HOSTNAME=$(cat /etc/hostname) {TESTBED} image http-echo & echo_pid=$!; {ssh} -N -R 0.0.0.0:9999:127.0.0.1:8081 root@{ip} & ssh_pid=$!; sleep 1.5; \
         curl -s --max-time 3 http://{ip}:9999/; kill $ssh_pid; sleep 1; curl -s --max-time 2 http://{ip}:9999/ || echo refused-after-session; kill $echo_pid"
    );
    let (_, out) = in_client(&tb, &["sh", "-c", &script]);
    assert!(
        out.starts_with("pod=client"),
        "the remote forward delivered to the client pod: {out}"
    );
    assert!(
        out.trim_end().ends_with("refused-after-session"),
        "the listener went with the session: {out}"
    );
    tb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shadow_refuses_other_keys_and_users() {
    let (tb, key, ip) = with_shadow().await;
    let other = tb.dir.join("other-key");
    assert!(
        Command::new("ssh-keygen")
            .args([
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-f",
                other.to_str().unwrap()
            ])
            .status()
            .unwrap()
            .success()
    );
    let (ok, _) = in_client(
        &tb,
        &[
            "sh",
            "-c",
            &format!("{} root@{ip} -W web:80 </dev/null", ssh(&other)),
        ],
    );
    assert!(!ok, "a key that is not authorized got in");
    let (ok, _) = in_client(
        &tb,
        &[
            "sh",
            "-c",
            &format!("{} nobody@{ip} -W web:80 </dev/null", ssh(&key)),
        ],
    );
    assert!(!ok, "a user other than root got in");
    tb.stop().await;
}
