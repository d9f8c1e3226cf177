//! The node agent (root, on the testbed): `deploy/` applied with kubectl, unmodified; then
//! each node's agent redirects a live session's Service — its name, FQDN, ClusterIP and
//! endpoint addresses — from pods on both nodes, and stops when the lease runs out.
//!
//! The session's holder is played by the test: it writes `status` as a holding agent would,
//! pointing at a host-network HTTP server on node-1 (the tunnel listener's stand-in).

use std::{path::Path, time::Duration};

use kt_proto::session::KtSession;
use kt_tests::{
    harness::{
        apps::{
            apply, deploy_client_2, deploy_web, in_pod, install_agent, start_testbed,
            until_all_answered_by, wait_for_agents, web_pods, web_pods_field,
        },
        kubectl::{kubectl, kubectl_ok},
        workstation::{self, Background},
    },
    testbed::{cluster::Testbed, topology::node_ip},
};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

const TESTBED: &str = env!("CARGO_BIN_EXE_kt-testbed");
const LISTENER_PORT: u16 = 40001;

/// The listener stand-in: host network on node-1.
const LISTENER: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: tunnel-listener}
spec:
  hostNetwork: true
  nodeSelector: {kubernetes.io/hostname: node-1}
  containers:
  - name: l
    image: kt-testbed/http-echo
    env: [{name: PORT, value: "40001"}]
    readinessProbe: {httpGet: {path: /, port: 40001}}
"#;

const CLIENTS: [&str; 2] = ["client", "client-2"];

/// Every way a pod reaches `web`: short name, FQDN, ClusterIP, one endpoint pod IP.
fn web_urls(tb: &Testbed) -> Vec<String> {
    let cluster_ip = kubectl_ok(
        &tb.kubeconfig,
        &["get", "svc", "web", "-o", "jsonpath={.spec.clusterIP}"],
    );
    let endpoint = web_pods_field(tb, "status.podIP")
        .into_iter()
        .next()
        .expect("a web pod");
    vec![
        "http://web/".into(),
        "http://web.default.svc.cluster.local/".into(),
        format!("http://{cluster_ip}/"),
        format!("http://{endpoint}:8080/"),
    ]
}

fn session() -> KtSession {
    serde_json::from_value(json!({
        "apiVersion": "kt.dev/v1alpha1",
        "kind": "KtSession",
        "metadata": {"name": "web-alice", "namespace": "default"},
        "spec": {
            "owner": "alice@laptop",
            "mode": "exchange",
            "service": "web",
            "ports": [{"port": 80, "localPort": 8080}],
            "publicKey": "ssh-ed25519 AAAA alice"
        }
    }))
    .expect("session parses")
}

/// Writes the status a holding agent on node-1 would write, renewed now.
async fn renew(sessions: &Api<KtSession>) {
    let status = json!({"status": {
        "node": "node-1",
        "address": node_ip(1).to_string(),
        "listeners": [{"port": 80, "listenerPort": LISTENER_PORT}],
        "renewTime": chrono::Utc::now(),
    }});
    sessions
        .patch_status("web-alice", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("status written");
}

/// Deletes every agent pod and waits for the DaemonSet's replacements.
fn replace_agents(tb: &Testbed) {
    kubectl_ok(
        &tb.kubeconfig,
        &[
            "delete",
            "pods",
            "-n",
            "kt-system",
            "-l",
            "app.kubernetes.io/name=kt-node-agent",
        ],
    );
    wait_for_agents(tb);
}

/// `/metrics` of the agent on node `node`, read from the client pod.
fn agent_metrics(tb: &Testbed, node: u8) -> String {
    let url = format!("http://{}:9966/metrics", node_ip(node));
    in_pod(tb, "client", &["curl", "-s", &url]).1
}

/// Renews every 2 s (well within the 10 s lease) until aborted.
fn keep_renewing(sessions: Api<KtSession>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            renew(&sessions).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_from_deploy_redirects_a_live_session_on_every_node_and_fails_open() {
    let tb = start_testbed(TESTBED, true).await;
    deploy_web(&tb);
    deploy_client_2(&tb);
    apply(&tb.kubeconfig, LISTENER);
    install_agent(&tb);
    kubectl_ok(
        &tb.kubeconfig,
        &[
            "wait",
            "--for=condition=Ready",
            "pod/tunnel-listener",
            "--timeout=60s",
        ],
    );
    // deploy/'s developer role, bound in one namespace, allows sessions there only.
    kubectl_ok(
        &tb.kubeconfig,
        &[
            "create",
            "rolebinding",
            "kt-developer",
            "--clusterrole=kt-developer",
            "--user=alice",
            "-n",
            "default",
        ],
    );
    let alice = tb.user_kubeconfig("alice", "default").unwrap();
    for (ns, allowed) in [("default", "yes"), ("kube-system", "no")] {
        let out = kubectl(
            &alice,
            &["auth", "can-i", "create", "ktsessions.kt.dev", "-n", ns],
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), allowed, "{ns}");
    }
    // Each node's agent serves health on its node address.
    for node in [1, 2] {
        let base = format!("http://{}:9966", node_ip(node));
        let (ok, health) = in_pod(&tb, "client", &["curl", "-s", &format!("{base}/healthz")]);
        assert!(ok && health == "ok", "node-{node}: {health}");
        let (ok, ready) = in_pod(&tb, "client", &["curl", "-s", &format!("{base}/readyz")]);
        assert!(ok && ready == "ready", "node-{node}: {ready}");
    }
    let urls = web_urls(&tb);
    let web = web_pods(&tb);
    until_all_answered_by(
        &tb,
        &CLIENTS,
        &urls,
        |who| web.contains(who),
        Duration::from_secs(5),
    )
    .await
    .expect("before the session, web answers");
    let before = kubectl_ok(&tb.kubeconfig, &["get", "svc,deploy", "web", "-o", "yaml"]);

    // The session: from now on every way to web leads to the listener, from both nodes.
    let sessions: Api<KtSession> = Api::namespaced(tb.client().await, "default");
    sessions
        .create(&PostParams::default(), &session())
        .await
        .expect("session created");
    renew(&sessions).await;
    let renewer = keep_renewing(sessions.clone());
    let took = until_all_answered_by(
        &tb,
        &CLIENTS,
        &urls,
        |who| who == "tunnel-listener",
        Duration::from_secs(10),
    )
    .await
    .expect("the session redirects every way to web");
    eprintln!("redirected everywhere within {took:?}");
    for node in [1, 2] {
        let metrics = agent_metrics(&tb, node);
        assert!(
            metrics.contains("kt_agent_sessions 1"),
            "node-{node}: {metrics}"
        );
        let redirected: u64 = metrics
            .lines()
            .find(|l| l.starts_with("kt_agent_connects_redirected_total{namespace=\"default\",session=\"web-alice\"}"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        assert!(
            redirected >= 4,
            "node-{node} counted {redirected}: {metrics}"
        );
    }
    assert_eq!(
        kubectl_ok(&tb.kubeconfig, &["get", "svc,deploy", "web", "-o", "yaml"]),
        before,
        "the Service and the Deployment are untouched"
    );

    // The holder stops renewing (a killed ktctl, a dead agent): the lease runs out and the
    // pods answer again, with nothing run.
    renewer.abort();
    let took = until_all_answered_by(
        &tb,
        &CLIENTS,
        &urls,
        |who| web.contains(who),
        Duration::from_secs(15),
    )
    .await
    .expect("after the lease, web answers again");
    eprintln!("failed open {took:?} after the last renewal stopped");

    // Renewed again: redirected again. Then the agents are deleted and the DaemonSet's new
    // ones program the live session again; once the session is gone, nothing stays behind.
    renew(&sessions).await;
    let renewer = keep_renewing(sessions.clone());
    until_all_answered_by(
        &tb,
        &CLIENTS,
        &urls,
        |who| who == "tunnel-listener",
        Duration::from_secs(10),
    )
    .await
    .expect("redirected again");
    replace_agents(&tb);
    until_all_answered_by(
        &tb,
        &CLIENTS,
        &urls,
        |who| who == "tunnel-listener",
        Duration::from_secs(10),
    )
    .await
    .expect("the new agents program the live session");
    renewer.abort();
    sessions
        .delete("web-alice", &Default::default())
        .await
        .expect("session deleted");
    until_all_answered_by(
        &tb,
        &CLIENTS,
        &urls,
        |who| web.contains(who),
        Duration::from_secs(5),
    )
    .await
    .expect("a deleted session leaves no redirect");
    tb.stop().await;
}

/// `ktctl exchange` with the agent installed (`--mode auto` picks agent mode): pods on both
/// nodes reach the workstation by name, FQDN, ClusterIP and endpoint IP, the Service and the
/// Deployment are never touched, a second developer is refused naming the first, and the
/// redirect ends with ktctl — after Ctrl-C, and after `kill -9` with no command run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ktctl_exchange_in_agent_mode_touches_nothing_and_ends_with_ktctl() {
    let tb = start_testbed(TESTBED, true).await;
    deploy_web(&tb);
    deploy_client_2(&tb);
    install_agent(&tb);
    let testbed = Path::new(TESTBED);
    let _app = workstation::http_echo(testbed, &tb, 18090).await;
    let urls = web_urls(&tb);
    let web = web_pods(&tb);
    let workload = || kubectl_ok(&tb.kubeconfig, &["get", "svc,deploy", "web", "-o", "yaml"]);
    let before = workload();
    let ktctl = workstation::ktctl_bin(testbed);
    let exchange = || {
        Background::spawn(
            testbed,
            &tb,
            Path::new("env"),
            &[
                "USER=alice",
                ktctl.to_str().unwrap(),
                "exchange",
                "web",
                "--expose",
                "18090:80",
            ],
        )
    };

    for ending in ["ctrl-c", "kill -9"] {
        let mut running = exchange();
        running
            .wait_for(" Now all request to service 'web' will be redirected to local")
            .await;
        assert!(
            running.log().contains("Using agent mode"),
            "{}",
            running.log()
        );
        let took = until_all_answered_by(
            &tb,
            &CLIENTS,
            &urls,
            |who| who == "workstation",
            Duration::from_secs(10),
        )
        .await
        .unwrap_or_else(|wrong| panic!("{wrong}\n{}", running.log()));
        eprintln!("{ending}: every way to web answered locally {took:?} after the banner");
        assert_eq!(
            workload(),
            before,
            "agent mode changes nothing in the workload"
        );

        let refused = workstation::exec(testbed, &tb)
            .args(["env", "USER=bob"])
            .arg(&ktctl)
            .args(["exchange", "web", "--expose", "18090:80"])
            .output()
            .expect("ktctl runs");
        let err = String::from_utf8_lossy(&refused.stderr);
        assert_eq!(refused.status.code(), Some(1), "{err}");
        assert!(
            err.contains("service 'web' is already exchanging by another user (alice@"),
            "{err}"
        );

        if ending == "ctrl-c" {
            // The agents are replaced under the running exchange: ktctl moves the session to
            // a new one, and the Service comes back to the workstation by itself.
            replace_agents(&tb);
            let took = until_all_answered_by(
                &tb,
                &CLIENTS,
                &urls,
                |who| who == "workstation",
                Duration::from_secs(30),
            )
            .await
            .unwrap_or_else(|wrong| {
                panic!("after the agents were replaced: {wrong}\n{}", running.log())
            });
            // The old agents are gone once the new ones run (they bind the same node port),
            // so the redirect now comes from a new agent holding the session: ktctl moved it
            // there (or reached the same pod name again).
            eprintln!("agents replaced: answered locally again {took:?} after their rollout");
            let (status, log) = running.interrupt();
            assert!(
                status.success() && log.contains("Cleaning session"),
                "{log}"
            );
            // The holding agents counted what their listeners carried.
            let carried: u64 = [1, 2]
                .into_iter()
                .map(|node| {
                    agent_metrics(&tb, node)
                        .lines()
                        .filter(|l| l.starts_with("kt_agent_tunnel_bytes_total"))
                        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                        .sum::<u64>()
                })
                .sum();
            assert!(carried > 0, "no tunnel bytes counted");
        } else {
            running.kill();
        }
        let took = until_all_answered_by(
            &tb,
            &CLIENTS,
            &urls,
            |who| web.contains(who),
            Duration::from_secs(12),
        )
        .await
        .unwrap_or_else(|wrong| panic!("after {ending}: {wrong}"));
        eprintln!("{ending}: the pods answer again {took:?} later");
    }
    tb.stop().await;
}

/// A developer bound to deploy/'s `kt-developer` in one namespace exchanges there in agent
/// mode, and gets a clear error, with nothing created, in a namespace where they are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_developer_exchanges_in_their_namespace_and_is_refused_elsewhere() {
    let tb = start_testbed(TESTBED, true).await;
    deploy_web(&tb);
    install_agent(&tb);
    kubectl_ok(
        &tb.kubeconfig,
        &[
            "create",
            "rolebinding",
            "kt-developer",
            "--clusterrole=kt-developer",
            "--user=alice",
            "-n",
            "default",
        ],
    );
    kubectl_ok(&tb.kubeconfig, &["create", "namespace", "other"]);
    apply(
        &tb.kubeconfig,
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: other}\nspec:\n  ports: [{port: 80}]\n",
    );
    let alice = tb.workstation_user_kubeconfig("alice", "default").unwrap();
    let alice = alice.to_str().unwrap();
    let testbed = Path::new(TESTBED);
    let _app = workstation::http_echo(testbed, &tb, 18090).await;

    let mut exchange = Background::ktctl(
        testbed,
        &tb,
        &["-c", alice, "exchange", "web", "--expose", "18090:80"],
    );
    exchange
        .wait_for(" Now all request to service 'web' will be redirected to local")
        .await;
    assert!(
        exchange.log().contains("Using agent mode"),
        "{}",
        exchange.log()
    );
    until_all_answered_by(
        &tb,
        &["client"],
        &["http://web/".to_owned()],
        |who| who == "workstation",
        Duration::from_secs(10),
    )
    .await
    .unwrap_or_else(|wrong| panic!("{wrong}\n{}", exchange.log()));
    let (status, log) = exchange.interrupt();
    assert!(status.success(), "{log}");

    let objects = || {
        kubectl_ok(
            &tb.kubeconfig,
            &[
                "get",
                "pods,configmaps,services,ktsessions",
                "-n",
                "other",
                "-o",
                "name",
            ],
        )
    };
    let before = objects();
    let refused = workstation::exec(testbed, &tb)
        .arg(workstation::ktctl_bin(testbed))
        .args([
            "-c", alice, "-n", "other", "exchange", "web", "--expose", "18090:80",
        ])
        .output()
        .expect("ktctl runs");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{err}");
    assert!(
        err.contains("ERR Exit: ") && err.contains("forbidden") && err.contains("\"other\""),
        "{err}"
    );
    assert_eq!(objects(), before, "nothing created in the other namespace");
    tb.stop().await;
}
