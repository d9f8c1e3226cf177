//! The node agent (root, on the testbed): `deploy/` applied with kubectl, unmodified; then
//! each node's agent redirects a live session's Service — its name, FQDN, ClusterIP and
//! endpoint addresses — from pods on both nodes, and stops when the lease runs out.
//!
//! The session's holder is played by the test: it writes `status` as a holding agent would,
//! pointing at a host-network HTTP server on node-1 (the tunnel listener's stand-in), and
//! the record with which node-1's agent vouches for the sessions it holds (the ConfigMap
//! `kt-node-agent-node-1` in `kt-system`, which only the agents' ServiceAccount and admins
//! may write). A status nobody vouches for — forged by a developer or an admin — redirects
//! nothing.

use std::{collections::HashSet, path::Path, time::Duration};

use k8s_openapi::api::core::v1::Event;
use kt_node_agent::agent::trust::HeldSession;
use kt_proto::session::{KtSession, Listener};
use kt_testbed::{cluster::Testbed, topology::node_ip};
use kt_tests::harness::{
    apps::{
        agent_pid, answered_by, apply, deploy_client_2, deploy_web, in_pod, install_agent,
        start_testbed, until_all_answered_by, wait_for_agents, web_pods, web_pods_field,
        who_answers, write_agent_record,
    },
    bins,
    eventually::{eventually, poll_within, seen},
    kubectl::{kubectl, kubectl_ok},
    workstation::{self, Background},
};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

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

/// Writes what node-1's agent would write when it holds the session: its record listing
/// the session and listener (rewritten each time: a replaced agent starts with an empty
/// record), then the status, renewed now.
async fn renew(sessions: &Api<KtSession>) {
    let uid = sessions
        .get("web-alice")
        .await
        .expect("session read")
        .metadata
        .uid
        .expect("a uid");
    let held = HeldSession {
        udp_listeners: Vec::new(),
        namespace: "default".into(),
        name: "web-alice".into(),
        uid,
        listeners: vec![Listener {
            port: 80,
            listener_port: LISTENER_PORT,
        }],
    };
    write_agent_record(sessions.clone().into_client(), "node-1", &[held]).await;
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

/// Renews every 2 s (well within the 10 s lease) until aborted: a holder's period, on
/// purpose, not a wait for something.
fn keep_renewing(sessions: Api<KtSession>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            renew(&sessions).await;
        }
    })
}

/// A testbed with `web`, a client pod on each node, the listener stand-in and kt's agent
/// from `deploy/`.
async fn with_agent() -> Testbed {
    let tb = start_testbed(true).await;
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
    tb
}

/// A live session of `web`, renewed by the test, and what it redirected.
struct LiveSession {
    tb: Testbed,
    sessions: Api<KtSession>,
    renewer: tokio::task::JoinHandle<()>,
    /// Every way to `web` (see [`web_urls`]).
    urls: Vec<String>,
    /// The `web` pods.
    web: HashSet<String>,
    /// `web`'s Service and Deployment before the session.
    before: String,
}

impl LiveSession {
    /// [`with_agent`], checks that `web` answers, then creates the session and waits until
    /// every way to `web` leads to the listener, from both nodes.
    async fn start() -> Self {
        let tb = with_agent().await;
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
        Self {
            tb,
            sessions,
            renewer,
            urls,
            web,
            before,
        }
    }

    /// Waits until every way to `web`, from both nodes, leads to the listener (10 s).
    async fn redirected(&self, what: &str) {
        self.answered_by(|who| who == "tunnel-listener", Duration::from_secs(10))
            .await
            .expect(what);
    }

    /// Waits until every way to `web`, from both nodes, is answered as `expected` says.
    async fn answered_by(
        &self,
        expected: impl Fn(&str) -> bool,
        within: Duration,
    ) -> Result<Duration, String> {
        until_all_answered_by(&self.tb, &CLIENTS, &self.urls, expected, within).await
    }

    /// The holder stops renewing (a killed ktctl, a dead agent): the lease runs out and the
    /// pods answer again, with nothing run.
    async fn stop_renewing_and_fail_open(&self) -> Duration {
        self.renewer.abort();
        self.answered_by(|who| self.web.contains(who), Duration::from_secs(15))
            .await
            .expect("after the lease, web answers again")
    }

    async fn stop(self) {
        self.renewer.abort();
        self.tb.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn deploys_developer_role_bound_in_one_namespace_allows_sessions_there_only() {
    let tb = with_agent().await;
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
    tb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn each_nodes_agent_serves_health_on_its_node_address() {
    let tb = with_agent().await;
    for node in [1, 2] {
        let base = format!("http://{}:9966", node_ip(node));
        let (ok, health) = in_pod(&tb, "client", &["curl", "-s", &format!("{base}/healthz")]);
        assert!(ok && health == "ok", "node-{node}: {health}");
        let (ok, ready) = in_pod(&tb, "client", &["curl", "-s", &format!("{base}/readyz")]);
        assert!(ok && ready == "ready", "node-{node}: {ready}");
    }
    tb.stop().await;
}

/// The agent's SSH server dies — its listening socket destroyed from outside (`ss -K`, as a
/// kernel or network fault would) — so the agent cannot hold sessions any more: it stops with
/// an error naming the task and exits non-zero, and its container is restarted, instead of
/// staying Ready without an SSH server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn an_agent_whose_ssh_server_fails_exits_non_zero_and_is_restarted() {
    let tb = start_testbed(true).await;
    install_agent(&tb);
    let pod = kubectl_ok(
        &tb.kubeconfig,
        &[
            "get",
            "pods",
            "-n",
            "kt-system",
            "-l",
            "app.kubernetes.io/name=kt-node-agent",
            "--field-selector",
            "spec.nodeName=node-1",
            "-o",
            "jsonpath={.items[0].metadata.name}",
        ],
    );
    let netns = tb.node_netns("node-1").expect("node-1's namespace");
    let killed = std::process::Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["ss", "-K", "-t", "-l", "sport = :9922"])
        .output()
        .expect("ss runs");
    assert!(killed.status.success(), "{killed:?}");
    let field = |path: &str| {
        kubectl_ok(
            &tb.kubeconfig,
            &[
                "get",
                "pod",
                "-n",
                "kt-system",
                &pod,
                "-o",
                &format!("jsonpath={{{path}}}"),
            ],
        )
    };
    let last_exit = eventually("the agent's container ends and is restarted", async || {
        let restarts: u32 = field(".status.containerStatuses[0].restartCount")
            .parse()
            .unwrap_or(0);
        (restarts >= 1).then(|| field(".status.containerStatuses[0].lastState.terminated.exitCode"))
    })
    .await;
    assert_eq!(last_exit, "1", "the agent exits non-zero");
    let log = kubectl_ok(
        &tb.kubeconfig,
        &["logs", "--previous", "-n", "kt-system", &pod],
    );
    assert!(
        log.contains("task 'ssh-server' failed")
            && log.contains("accepting connections on 0.0.0.0:9922 failed"),
        "{log}"
    );
    // Restarted, it serves again.
    wait_for_agents(&tb);
    tb.stop().await;
}

/// `CAP_BPF` (39) and `CAP_NET_ADMIN` (12): the DaemonSet's whole capability set.
const AGENT_CAPS: u64 = (1 << 39) | (1 << 12);

/// The process whose program is `program` among those in pod `uid`'s cgroup (the testbed
/// names it `pod<uid>`, under its nodes' cgroups in the cgroup2 hierarchy).
fn pod_process(uid: &str, program: &str) -> Option<u32> {
    fn find(dir: &Path, name: &str, depth: u8) -> Option<std::path::PathBuf> {
        for entry in std::fs::read_dir(dir).ok()?.flatten() {
            let path = entry.path();
            if !entry.file_type().ok()?.is_dir() {
                continue;
            }
            if entry.file_name() == name {
                return Some(path);
            }
            if depth > 0
                && let Some(found) = find(&path, name, depth - 1)
            {
                return Some(found);
            }
        }
        None
    }
    let mount = Path::new("/sys/fs/cgroup/unified");
    let mount = if mount.is_dir() {
        mount
    } else {
        Path::new("/sys/fs/cgroup")
    };
    let dir = find(mount, &format!("pod{uid}"), 6)?;
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).ok()?;
    procs
        .lines()
        .filter_map(|l| l.parse().ok())
        .find(|pid: &u32| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                c.split(|b| *b == 0)
                    .next()
                    .is_some_and(|argv0| argv0.ends_with(program.as_bytes()))
            })
        })
}

/// `(CapInh, CapPrm, CapEff, CapBnd, CapAmb, NoNewPrivs)` of a process.
fn capabilities(pid: u32) -> [u64; 6] {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let field = |name: &str, radix: u32| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| u64::from_str_radix(v.trim(), radix).ok())
            .unwrap_or_else(|| panic!("{name} in {status}"))
    };
    [
        field("CapInh:", 16),
        field("CapPrm:", 16),
        field("CapEff:", 16),
        field("CapBnd:", 16),
        field("CapAmb:", 16),
        field("NoNewPrivs:", 10),
    ]
}

/// The testbed gives each container the capabilities of its `securityContext` and nothing
/// more, as a node's runtime does: the DaemonSet's agents run (Ready on both nodes) with
/// exactly `CAP_BPF` and `CAP_NET_ADMIN` and `no_new_privs`; the same pod without
/// `CAP_BPF` cannot create its eBPF maps, says so, exits and is never Ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn the_agent_runs_with_only_its_capabilities_and_fails_without_cap_bpf() {
    let tb = start_testbed(true).await;
    install_agent(&tb);
    let uids = kubectl_ok(
        &tb.kubeconfig,
        &[
            "get",
            "pods",
            "-n",
            "kt-system",
            "-l",
            "app.kubernetes.io/name=kt-node-agent",
            "-o",
            "jsonpath={.items[*].metadata.uid}",
        ],
    );
    let uids: Vec<&str> = uids.split_whitespace().collect();
    assert_eq!(uids.len(), 2, "one agent per node");
    for uid in &uids {
        let pid = pod_process(uid, "kt-node-agent").expect("the agent's process");
        assert_eq!(
            capabilities(pid),
            [0, AGENT_CAPS, AGENT_CAPS, AGENT_CAPS, 0, 1],
            "the agent of pod {uid}: CapInh, CapPrm, CapEff, CapBnd, CapAmb, NoNewPrivs"
        );
    }

    // The DaemonSet's pod as it is, on node-1 beside the real agent (its own ports), less
    // CAP_BPF.
    let ds: serde_json::Value = serde_json::from_str(&kubectl_ok(
        &tb.kubeconfig,
        &[
            "get",
            "daemonset",
            "-n",
            "kt-system",
            "kt-node-agent",
            "-o",
            "json",
        ],
    ))
    .expect("DaemonSet JSON");
    let mut spec = ds["spec"]["template"]["spec"].clone();
    spec["nodeName"] = json!("node-1");
    let container = &mut spec["containers"][0];
    container["securityContext"]["capabilities"]["add"] = json!(["NET_ADMIN"]);
    container["env"].as_array_mut().expect("env").extend([
        json!({"name": "KT_AGENT_SSH", "value": "0.0.0.0:19922"}),
        json!({"name": "KT_AGENT_HTTP", "value": "0.0.0.0:19966"}),
    ]);
    for probe in ["readinessProbe", "livenessProbe"] {
        container[probe]["httpGet"]["port"] = json!(19966);
    }
    let pod = json!({"apiVersion": "v1", "kind": "Pod",
                     "metadata": {"name": "agent-without-bpf", "namespace": "kt-system"},
                     "spec": spec});
    apply(&tb.kubeconfig, &pod.to_string());
    let field = |path: &str| {
        kubectl_ok(
            &tb.kubeconfig,
            &[
                "get",
                "pod",
                "-n",
                "kt-system",
                "agent-without-bpf",
                "-o",
                &format!("jsonpath={{{path}}}"),
            ],
        )
    };
    let exit = eventually(
        "the agent without CAP_BPF exits and is restarted",
        async || {
            let restarts: u32 = field(".status.containerStatuses[0].restartCount")
                .parse()
                .unwrap_or(0);
            (restarts >= 1)
                .then(|| field(".status.containerStatuses[0].lastState.terminated.exitCode"))
        },
    )
    .await;
    assert_ne!(exit, "0", "it fails");
    assert_eq!(field(".status.containerStatuses[0].ready"), "false");
    let log = kubectl_ok(
        &tb.kubeconfig,
        &["logs", "--previous", "-n", "kt-system", "agent-without-bpf"],
    );
    assert!(
        log.contains("failed to load the eBPF object") && log.contains("Operation not permitted"),
        "{log}"
    );
    tb.stop().await;
}

/// The redirect itself is checked by [`LiveSession::start`]: from both nodes, by name, FQDN,
/// ClusterIP and endpoint IP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn a_live_session_redirects_every_way_to_the_service_from_both_nodes() {
    let live = LiveSession::start().await;
    live.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn each_agent_counts_the_live_session_and_its_redirected_connects() {
    let live = LiveSession::start().await;
    for node in [1, 2] {
        let metrics = agent_metrics(&live.tb, node);
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
    live.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn a_live_session_leaves_the_service_and_the_deployment_untouched() {
    let live = LiveSession::start().await;
    assert_eq!(
        kubectl_ok(
            &live.tb.kubeconfig,
            &["get", "svc,deploy", "web", "-o", "yaml"]
        ),
        live.before,
        "the Service and the Deployment are untouched"
    );
    live.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn a_session_whose_lease_runs_out_fails_open() {
    let live = LiveSession::start().await;
    let took = live.stop_renewing_and_fail_open().await;
    eprintln!("failed open {took:?} after the last renewal stopped");
    live.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn a_session_renewed_after_failing_open_redirects_again() {
    let mut live = LiveSession::start().await;
    live.stop_renewing_and_fail_open().await;
    renew(&live.sessions).await;
    live.renewer = keep_renewing(live.sessions.clone());
    live.redirected("redirected again").await;
    live.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn agents_replaced_by_their_daemonset_program_the_live_session_again() {
    let live = LiveSession::start().await;
    replace_agents(&live.tb);
    live.redirected("the new agents program the live session")
        .await;
    live.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn a_deleted_session_leaves_no_redirect() {
    let live = LiveSession::start().await;
    live.renewer.abort();
    live.sessions
        .delete("web-alice", &Default::default())
        .await
        .expect("session deleted");
    live.answered_by(|who| live.web.contains(who), Duration::from_secs(5))
        .await
        .expect("a deleted session leaves no redirect");
    live.stop().await;
}

/// `ktctl exchange` with the agent installed (`--mode auto` picks agent mode): pods on both
/// nodes reach the workstation by name, FQDN, ClusterIP and endpoint IP, the Service and the
/// Deployment are never touched, a second developer is refused naming the first, and the
/// redirect ends with ktctl — after Ctrl-C, and after `kill -9` with no command run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn ktctl_exchange_in_agent_mode_touches_nothing_and_ends_with_ktctl() {
    let tb = start_testbed(true).await;
    deploy_web(&tb);
    deploy_client_2(&tb);
    install_agent(&tb);
    let _app = workstation::http_echo(&tb, 18090).await;
    let urls = web_urls(&tb);
    let web = web_pods(&tb);
    let workload = || kubectl_ok(&tb.kubeconfig, &["get", "svc,deploy", "web", "-o", "yaml"]);
    let before = workload();
    let ktctl = bins::ktctl();
    let exchange = || {
        Background::ktctl_with_env(
            &tb,
            &["USER=alice"],
            &["exchange", "web", "--expose", "18090:80"],
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

        let refused = workstation::exec(&tb)
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
    // A real holder is never reported: its record is written before its status, and a
    // status left by a replaced agent is an earlier holder's, not a forgery.
    let events: Api<Event> = Api::namespaced(tb.client().await, "default");
    let forged: Vec<String> = events
        .list(&ListParams::default())
        .await
        .expect("events listed")
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("ForgedStatus"))
        .filter_map(|e| e.message)
        .collect();
    assert!(forged.is_empty(), "{forged:?}");
    tb.stop().await;
}

/// A `KtSession` left by `kill -9` of ktctl is deleted by the agents once nobody has held it
/// for its lease and the grace period (5 s here: `KT_AGENT_SESSION_GRACE` on the DaemonSet),
/// and a ktctl whose clock runs an hour ahead loses nothing: its live session stays past
/// lease + grace (no workstation clock is read), and the heartbeats it writes carry the
/// cluster's time — its own with `--useLocalTime`, as that flag says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn a_killed_ktctls_session_is_collected_and_a_clock_an_hour_off_changes_nothing() {
    const LEASE: Duration = Duration::from_secs(10);
    const GRACE: Duration = Duration::from_secs(5);
    let tb = start_testbed(true).await;
    deploy_web(&tb);
    install_agent(&tb);
    kubectl_ok(
        &tb.kubeconfig,
        &[
            "set",
            "env",
            "daemonset/kt-node-agent",
            "-n",
            "kt-system",
            &format!("KT_AGENT_SESSION_GRACE={}", GRACE.as_secs()),
        ],
    );
    replace_agents(&tb);
    let _app = workstation::http_echo(&tb, 18090).await;
    let hour_ahead = workstation::clock_off("+1h");
    let skewed_ktctl = |args: &[&str]| {
        let mut env: Vec<&str> = hour_ahead.iter().map(String::as_str).collect();
        env.push("USER=alice");
        Background::ktctl_with_env(&tb, &env, args)
    };
    let sessions: Api<KtSession> = Api::namespaced(tb.client().await, "default");
    let session_names = async || {
        sessions
            .list(&Default::default())
            .await
            .expect("sessions listed")
            .items
            .into_iter()
            .filter_map(|s| s.metadata.name)
            .collect::<Vec<_>>()
    };

    let mut running = skewed_ktctl(&["exchange", "web", "--expose", "18090:80", "--mode", "agent"]);
    running
        .wait_for(" Now all request to service 'web' will be redirected to local")
        .await;
    let live = session_names().await;
    assert_eq!(live.len(), 1, "{live:?}");
    // A holder's lifetime, not a wait for something: past lease + grace, the live session of
    // a ktctl whose clock is an hour ahead is still there, and still answers locally.
    tokio::time::sleep(LEASE + GRACE + Duration::from_secs(5)).await;
    assert_eq!(session_names().await, live, "{}", running.log());
    let answer = who_answers(&tb, "http://web/");
    assert_eq!(answer.as_deref(), Some("workstation"), "{}", running.log());

    running.kill();
    let killed = std::time::Instant::now();
    poll_within(LEASE + GRACE + Duration::from_secs(10), async || {
        seen(session_names().await, Vec::is_empty)
    })
    .await
    .unwrap_or_else(|left| panic!("not collected: {left:?}"));
    eprintln!(
        "killed ktctl's session collected {:?} after kill -9 (lease {LEASE:?} + grace {GRACE:?})",
        killed.elapsed()
    );
    assert!(
        agent_metrics(&tb, 1)
            .lines()
            .chain(agent_metrics(&tb, 2).lines())
            .any(|l| l.starts_with("kt_agent_sessions_collected_total 1")),
        "one agent counted the collection"
    );

    // Heartbeats by the cluster's clock, and by the local one with --useLocalTime.
    for (flag, ahead) in [("--useLocalTime=false", 0), ("--useLocalTime", 3600)] {
        let mut running = skewed_ktctl(&[
            "exchange", "web", "--expose", "18090:80", "--mode", "selector", flag,
        ]);
        running
            .wait_for(" Now all request to service 'web' will be redirected to local")
            .await;
        let beat = kubectl_ok(
            &tb.kubeconfig,
            &[
                "get",
                "pods",
                "-l",
                "kt-role=shadow-exchange",
                "-o",
                r#"jsonpath={.items[0].metadata.annotations.kt-last-heart-beat}"#,
            ],
        );
        let beat: i64 = beat.trim().parse().unwrap_or_else(|_| panic!("{beat:?}"));
        let off = beat - chrono::Utc::now().timestamp() - ahead;
        assert!(off.abs() <= 30, "{flag}: heartbeat {beat} is {off} s off");
        let (status, log) = running.interrupt();
        assert!(status.success(), "{log}");
    }
    tb.stop().await;
}

/// The Events of a session's life, as `kubectl describe kts` shows them: an exchange in
/// agent mode is seen and held (by the node that holds it); then the holder dies — its agent
/// is killed with `kill -9` while ktctl is stopped, so nothing releases the session — and
/// the lease runs out and an agent collects it (grace 5 s). One Event per transition in the
/// cluster, each on the `KtSession`, naming the agent's node that recorded it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn a_sessions_life_is_told_by_events_held_lease_expired_and_collected() {
    const GRACE: Duration = Duration::from_secs(5);
    const LEASE: Duration = Duration::from_secs(10);
    let tb = start_testbed(true).await;
    deploy_web(&tb);
    install_agent(&tb);
    kubectl_ok(
        &tb.kubeconfig,
        &[
            "set",
            "env",
            "daemonset/kt-node-agent",
            "-n",
            "kt-system",
            &format!("KT_AGENT_SESSION_GRACE={}", GRACE.as_secs()),
        ],
    );
    replace_agents(&tb);
    let _app = workstation::http_echo(&tb, 18090).await;
    let mut running = Background::ktctl(
        &tb,
        &["exchange", "web", "--expose", "18090:80", "--mode", "agent"],
    );
    running
        .wait_for(" Now all request to service 'web' will be redirected to local")
        .await;
    let sessions: Api<KtSession> = Api::namespaced(tb.client().await, "default");
    let live = sessions
        .list(&Default::default())
        .await
        .expect("sessions")
        .items;
    assert_eq!(live.len(), 1);
    let name = live[0].metadata.name.clone().expect("a name");
    let holder = live[0].status.as_ref().expect("held").node.clone();
    assert!(holder.starts_with("node-"), "{holder:?}");

    // ktctl stopped first, so that it cannot reconnect through another agent; then the
    // holding agent killed (no release), then ktctl.
    // SAFETY: signalling the process this test started.
    unsafe { libc::kill(running.pid() as i32, libc::SIGSTOP) };
    let netns = tb.node_netns(&holder).expect("the holder's namespace");
    let listening = std::process::Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["ss", "-H", "-t", "-l", "-p", "sport = :9922"])
        .output()
        .expect("ss runs");
    let listening = String::from_utf8_lossy(&listening.stdout).into_owned();
    let agent_pid: i32 = listening
        .split("pid=")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no agent listens on 9922 on {holder}: {listening:?}"));
    // SAFETY: the agent process the testbed started for this test's cluster.
    unsafe { libc::kill(agent_pid, libc::SIGKILL) };
    let killed = std::time::Instant::now();
    running.kill();

    let events: Api<Event> = Api::namespaced(tb.client().await, "default");
    let on_session = async || {
        events
            .list(&ListParams::default())
            .await
            .expect("events listed")
            .items
            .into_iter()
            .filter(|e| {
                e.involved_object.kind.as_deref() == Some("KtSession")
                    && e.involved_object.api_version.as_deref() == Some("kt.dev/v1alpha1")
                    && e.involved_object.name.as_deref() == Some(name.as_str())
            })
            .map(|e| {
                (
                    e.reason.unwrap_or_default(),
                    e.message.unwrap_or_default(),
                    e.reporting_instance.unwrap_or_default(),
                )
            })
            .collect::<Vec<_>>()
    };
    let recorded = poll_within(LEASE + GRACE + Duration::from_secs(30), async || {
        let all = on_session().await;
        seen(all, |all| {
            all.iter().any(|(reason, _, _)| reason == "Collected")
        })
    })
    .await
    .unwrap_or_else(|left| panic!("no Collected event: {left:?}"));
    eprintln!(
        "collected {:?} after the holder was killed",
        killed.elapsed()
    );
    // Late duplicates would come within an agent's reconcile period (1 s).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let recorded = {
        let again = on_session().await;
        assert!(again.len() >= recorded.len(), "{again:?}");
        again
    };
    let of = |reason: &str| -> Vec<&(String, String, String)> {
        recorded.iter().filter(|(r, _, _)| r == reason).collect()
    };
    for reason in ["Seen", "Held", "LeaseExpired", "Collected"] {
        assert_eq!(of(reason).len(), 1, "one {reason} event: {recorded:#?}");
    }
    let (_, held, held_by) = of("Held")[0];
    assert_eq!(held_by, &holder, "{held}");
    assert!(
        held.starts_with(&format!("held by the agent on {holder} (")) && held.contains("80→"),
        "{held}"
    );
    let (_, expired, _) = of("LeaseExpired")[0];
    assert!(
        expired.starts_with(&format!("the lease of the holder on {holder} ran out")),
        "{expired}"
    );
    let (_, collected, collected_by) = of("Collected")[0];
    assert_eq!(
        collected,
        &format!(
            "deleted by the agent on {collected_by}: nobody held it for the grace period (5 s)"
        )
    );
    assert!(
        of("Released").is_empty(),
        "a killed holder released nothing: {recorded:#?}"
    );
    tb.stop().await;
}

/// A developer bound to deploy/'s `kt-developer` in one namespace exchanges there in agent
/// mode, and gets a clear error, with nothing created, in a namespace where they are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn a_developer_exchanges_in_their_namespace_and_is_refused_elsewhere() {
    let tb = start_testbed(true).await;
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
    let _app = workstation::http_echo(&tb, 18090).await;

    let mut exchange = Background::ktctl(
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
    let refused = workstation::exec(&tb)
        .arg(bins::ktctl())
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

/// For `period`, every way to `web` (`urls`) from pods on both nodes is answered by a `web`
/// pod, every time it is asked.
fn only_pods_answer(tb: &Testbed, urls: &[String], web: &HashSet<String>, period: Duration) {
    let until = std::time::Instant::now() + period;
    let mut rounds = 0;
    while rounds == 0 || std::time::Instant::now() < until {
        for pod in CLIENTS {
            for url in urls {
                let who = answered_by(tb, pod, url).unwrap_or_default();
                assert!(web.contains(&who), "{pod} → {url}: answered by {who:?}");
            }
        }
        rounds += 1;
    }
}

/// The messages of the `Warning` Events `reason` on session `name` (of its version
/// `resource_version` when given), one per reporting agent.
async fn warnings_on_session(
    events: &Api<Event>,
    reason: &str,
    name: &str,
    resource_version: Option<&str>,
) -> Vec<String> {
    events
        .list(&ListParams::default())
        .await
        .expect("events listed")
        .items
        .into_iter()
        .filter(|e| {
            e.reason.as_deref() == Some(reason)
                && e.type_.as_deref() == Some("Warning")
                && e.involved_object.kind.as_deref() == Some("KtSession")
                && e.involved_object.name.as_deref() == Some(name)
                && resource_version.is_none_or(|version| {
                    e.involved_object.resource_version.as_deref() == Some(version)
                })
        })
        .filter_map(|e| e.message)
        .collect()
}

/// The `ForgedStatus` Events on session `web-alice` for its version `resource_version`.
async fn forged_status_events(events: &Api<Event>, resource_version: &str) -> Vec<String> {
    warnings_on_session(events, "ForgedStatus", "web-alice", Some(resource_version)).await
}

/// The issue's forged status, tried as a new user would: `kt-developer` creates a session
/// with a status in its body (an address of no node, a listener, renewed an hour ahead) —
/// the API server drops it — and cannot write `status`; where a cluster grants
/// `ktsessions/status` anyway, the forged status redirects nothing and is reported; and an
/// admin's plausible status (node-1, its address, the listener stand-in, renewed now), which
/// no agent vouches for, redirects nothing either. Each time, pods on both nodes keep
/// reaching the real pods for longer than the agents' reconcile period (1 s) and their
/// report delay (5 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn a_forged_session_status_redirects_nothing_as_a_developer_or_as_admin() {
    let tb = with_agent().await;
    let (urls, web) = (web_urls(&tb), web_pods(&tb));
    until_all_answered_by(
        &tb,
        &CLIENTS,
        &urls,
        |who| web.contains(who),
        Duration::from_secs(5),
    )
    .await
    .expect("before the session, web answers");
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
    let alice_client = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(&alice).unwrap(),
            &Default::default(),
        )
        .await
        .unwrap(),
    )
    .unwrap();
    let as_alice: Api<KtSession> = Api::namespaced(alice_client, "default");
    let forged = json!({"status": {
        "node": "node-1",
        "address": "172.30.0.100",
        "listeners": [{"port": 80, "listenerPort": LISTENER_PORT}],
        "renewTime": chrono::Utc::now() + chrono::TimeDelta::hours(1),
    }});
    let mut with_status = serde_json::to_value(session()).unwrap();
    with_status["status"] = forged["status"].clone();
    let created = as_alice
        .create(
            &PostParams::default(),
            &serde_json::from_value(with_status).unwrap(),
        )
        .await
        .expect("alice may create sessions");
    assert!(
        created.status.is_none(),
        "the API server drops status on create"
    );
    let refused = as_alice
        .patch_status("web-alice", &PatchParams::default(), &Patch::Merge(&forged))
        .await
        .expect_err("kt-developer may not write status");
    assert!(
        matches!(&refused, kube::Error::Api(s) if s.code == 403),
        "{refused:?}"
    );
    only_pods_answer(&tb, &urls, &web, Duration::from_secs(8));

    // A cluster that grants status writes to developers anyway.
    apply(
        &tb.kubeconfig,
        r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: session-status, namespace: default}
rules:
- {apiGroups: [kt.dev], resources: [ktsessions/status], verbs: [get, patch, update]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: session-status, namespace: default}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: session-status}
subjects: [{kind: User, name: alice, apiGroup: rbac.authorization.k8s.io}]
"#,
    );
    let events: Api<Event> = Api::namespaced(tb.client().await, "default");
    let written = eventually("alice's status write is allowed", async || {
        as_alice
            .patch_status("web-alice", &PatchParams::default(), &Patch::Merge(&forged))
            .await
            .ok()
    })
    .await;
    assert!(written.status.is_some_and(|s| s.address.is_some()));
    let version = written.metadata.resource_version.unwrap();
    only_pods_answer(&tb, &urls, &web, Duration::from_secs(8));
    let reported = eventually("the forged status is reported", async || {
        seen(forged_status_events(&events, &version).await, |e| {
            !e.is_empty()
        })
    })
    .await;
    eprintln!("reported: {reported:?}");
    assert!(
        reported.iter().any(|m| m.contains("in the future")),
        "{reported:?}"
    );

    // An admin's status, plausible but held by no agent.
    let admin: Api<KtSession> = Api::namespaced(tb.client().await, "default");
    let plausible = json!({"status": {
        "node": "node-1",
        "address": node_ip(1).to_string(),
        "listeners": [{"port": 80, "listenerPort": LISTENER_PORT}],
        "renewTime": chrono::Utc::now(),
    }});
    let written = admin
        .patch_status(
            "web-alice",
            &PatchParams::default(),
            &Patch::Merge(&plausible),
        )
        .await
        .expect("an admin may write status");
    let version = written.metadata.resource_version.unwrap();
    // Within the session's 10 s lease, as long as the status claims.
    only_pods_answer(&tb, &urls, &web, Duration::from_secs(8));
    let reported = eventually("the admin's status is reported", async || {
        seen(forged_status_events(&events, &version).await, |e| {
            !e.is_empty()
        })
    })
    .await;
    assert!(
        reported.iter().any(|m| m.contains("does not hold")),
        "{reported:?}"
    );
    tb.stop().await;
}

/// The `InvalidSpec` Events on session `name`, one message per reporting agent.
async fn invalid_spec_events(events: &Api<Event>, name: &str) -> Vec<String> {
    warnings_on_session(events, "InvalidSpec", name, None).await
}

/// Hostile sessions, created with `kubectl create` as any developer allowed to create
/// sessions could (the testbed, like an API server without the CRD's schema, lets them in):
/// one naming another namespace's Service, one with 500 ports, one with a Service port
/// twice, a mesh with a 1 MiB header value. Each agent reports each with an `InvalidSpec`
/// Event naming the rule, no agent restarts, and the live session alongside keeps
/// redirecting every way to `web` from both nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn hostile_session_specs_are_refused_with_an_event_and_a_valid_one_keeps_working() {
    let live = LiveSession::start().await;
    let hostile = |name: &str, spec: serde_json::Value| {
        json!({"apiVersion": "kt.dev/v1alpha1", "kind": "KtSession",
               "metadata": {"name": name, "namespace": "default"}, "spec": spec})
    };
    let base = |mode: &str, service: &str, ports: serde_json::Value| {
        json!({"owner": "mallory@laptop", "mode": mode, "service": service,
               "ports": ports, "publicKey": "ssh-ed25519 AAAA mallory"})
    };
    let one_port = json!([{"port": 80, "localPort": 8080}]);
    let many: Vec<_> = (1..=500)
        .map(|p| json!({"port": p, "localPort": p}))
        .collect();
    let mut mesh = base("mesh", "web", one_port.clone());
    mesh["header"] = json!({"name": "version", "value": "v".repeat(1 << 20)});
    let cases = [
        (
            "other-namespace",
            base("exchange", "web.kube-system", one_port.clone()),
            "not a Service name of this namespace",
        ),
        (
            "many-ports",
            base("exchange", "web", json!(many)),
            "name 500 ports, more than 100",
        ),
        (
            "twice",
            base(
                "exchange",
                "web",
                json!([{"port": 80, "localPort": 1}, {"port": 80, "localPort": 2}]),
            ),
            "port 80 twice",
        ),
        ("huge-header", mesh, "more than 8192"),
    ];
    for (name, spec, _) in &cases {
        // `create`, not `apply`: apply would copy 1 MiB into an annotation.
        let file = live.tb.kubeconfig.with_file_name(format!("{name}.json"));
        std::fs::write(&file, hostile(name, spec.clone()).to_string()).unwrap();
        kubectl_ok(
            &live.tb.kubeconfig,
            &["create", "-f", file.to_str().unwrap()],
        );
    }
    let events: Api<Event> = Api::namespaced(live.tb.client().await, "default");
    for (name, _, rule) in &cases {
        let reported = eventually("both agents report the session", async || {
            seen(invalid_spec_events(&events, name).await, |e| e.len() >= 2)
        })
        .await;
        assert!(
            reported
                .iter()
                .all(|m| m.contains(rule) && m.contains("session refused")),
            "{name}: {reported:?}"
        );
    }
    live.redirected("the valid session still redirects").await;
    let restarts = kubectl_ok(
        &live.tb.kubeconfig,
        &[
            "get",
            "pods",
            "-n",
            "kt-system",
            "-l",
            "app.kubernetes.io/name=kt-node-agent",
            "-o",
            "jsonpath={.items[*].status.containerStatuses[0].restartCount}",
        ],
    );
    assert_eq!(restarts, "0 0", "no agent restarted");
    live.stop().await;
}

/// Two pods serving 8080 and 9090 (two containers each), behind a NodePort Service with a
/// port for each: exchanging one target port leaves the other with the pods.
const TWO_PORTS: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: two}
spec:
  replicas: 2
  selector: {matchLabels: {app: two}}
  template:
    metadata: {labels: {app: two}}
    spec:
      containers:
      - name: http
        image: kt-testbed/http-echo:1
        readinessProbe: {httpGet: {path: /, port: 8080}, periodSeconds: 1}
      - name: alt
        image: kt-testbed/http-echo:1
        env: [{name: PORT, value: "9090"}]
        readinessProbe: {httpGet: {path: /, port: 9090}, periodSeconds: 1}
---
apiVersion: v1
kind: Service
metadata: {name: two-np}
spec:
  type: NodePort
  selector: {app: two}
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: alt, port: 81, targetPort: 9090}
"#;

/// The NodePort Service `two-np` of [`TWO_PORTS`], seen from outside the cluster.
struct TwoPorts {
    /// `http://<node>:<nodePort of port 80>/` on each node.
    http: Vec<String>,
    /// The same for port 81.
    alt: Vec<String>,
    /// The names of its two pods.
    pods: HashSet<String>,
}

/// A testbed with the agent and [`TWO_PORTS`] rolled out.
async fn two_ports_with_agent() -> (Testbed, TwoPorts) {
    let tb = start_testbed(true).await;
    install_agent(&tb);
    apply(&tb.kubeconfig, TWO_PORTS);
    kubectl_ok(
        &tb.kubeconfig,
        &["rollout", "status", "deploy/two", "--timeout=60s"],
    );
    let urls_of = |name: &str| -> Vec<String> {
        let port = kubectl_ok(
            &tb.kubeconfig,
            &[
                "get",
                "svc",
                "two-np",
                "-o",
                &format!("jsonpath={{.spec.ports[?(@.name==\"{name}\")].nodePort}}"),
            ],
        );
        [1, 2]
            .map(|node| format!("http://{}:{port}/", node_ip(node)))
            .into()
    };
    let (http, alt) = (urls_of("http"), urls_of("alt"));
    let web: HashSet<String> = kubectl_ok(
        &tb.kubeconfig,
        &[
            "get",
            "pods",
            "-l",
            "app=two",
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ],
    )
    .split_whitespace()
    .map(str::to_owned)
    .collect();
    assert_eq!(web.len(), 2, "{web:?}");
    let two = TwoPorts {
        http,
        alt,
        pods: web,
    };
    (tb, two)
}

/// Who answers an HTTP GET of `url` from the workstation (outside the cluster: it reaches
/// the nodes' addresses only); `""` when nobody does.
fn answered_from_outside(tb: &Testbed, url: &str) -> String {
    answered_from_outside_with(tb, url, None)
}

/// [`answered_from_outside`] with a request `header` (`name: value`).
fn answered_from_outside_with(tb: &Testbed, url: &str, header: Option<&str>) -> String {
    let mut args = vec!["curl", "-s", "--max-time", "3"];
    if let Some(header) = header {
        args.extend(["-H", header]);
    }
    args.push(url);
    let (ok, out) = workstation::run(tb, &args);
    if !ok {
        return String::new();
    }
    out.lines()
        .next()
        .unwrap_or_default()
        .trim_start_matches("pod=")
        .to_owned()
}

/// Polls until every one of `urls`, from the workstation, is answered as `expected` says.
async fn until_answered_from_outside(
    tb: &Testbed,
    urls: &[String],
    expected: impl Fn(&str) -> bool,
    within: Duration,
) -> Result<Duration, String> {
    until_answered_from_outside_with(tb, urls, None, expected, within).await
}

/// [`until_answered_from_outside`], each request with `header` (`name: value`).
async fn until_answered_from_outside_with(
    tb: &Testbed,
    urls: &[String],
    header: Option<&str>,
    expected: impl Fn(&str) -> bool,
    within: Duration,
) -> Result<Duration, String> {
    let started = std::time::Instant::now();
    poll_within(within, async || {
        let wrong: Vec<String> = urls
            .iter()
            .map(|url| (url, answered_from_outside_with(tb, url, header)))
            .filter(|(_, who)| !expected(who))
            .map(|(url, who)| format!("{url}: {who:?}"))
            .collect();
        if wrong.is_empty() {
            Ok(started.elapsed())
        } else {
            Err(wrong.join("; "))
        }
    })
    .await
}

/// Whether `node`'s network namespace has the agent's nftables table
/// (`kt_node_agent::agent::node_ports::TABLE`).
fn has_node_port_table(tb: &Testbed, node: &str) -> bool {
    let netns = tb.node_netns(node).expect("the node exists");
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["nft", "list", "tables"])
        .output()
        .expect("nsenter runs");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.trim() == format!("table ip {}", kt_node_agent::agent::node_ports::TABLE))
}

/// Waits up to 5 s until neither node has the agent's nftables table; panics naming the
/// node that still has it.
async fn until_no_node_port_table(tb: &Testbed) {
    for node in ["node-1", "node-2"] {
        poll_within(Duration::from_secs(5), async || {
            !has_node_port_table(tb, node)
        })
        .await
        .unwrap_or_else(|_| panic!("{node} still has the node-port table"));
    }
}

/// Makes each node drop connections it DNATed to the other node's address instead of
/// forwarding them, as a node whose FORWARD policy is DROP (Docker sets it) does with
/// traffic kube-proxy did not admit. kube-proxy's own DNAT to pods and pods' traffic go on.
/// The table lives in the node's network namespace, which goes with the testbed.
fn drop_forwarding_to_other_nodes(tb: &Testbed) {
    for (node, other) in [(1, 2), (2, 1)] {
        let netns = tb
            .node_netns(&format!("node-{node}"))
            .expect("the node exists");
        let script = format!(
            "add table inet kt_test_forward\n\
             add chain inet kt_test_forward forward {{ type filter hook forward priority 0; policy accept; }}\n\
             add rule inet kt_test_forward forward ct status dnat ip daddr {} counter drop\n",
            node_ip(other)
        );
        let mut nft = std::process::Command::new("nsenter")
            .arg(format!("--net={}", netns.display()))
            .args(["nft", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("nsenter runs");
        std::io::Write::write_all(&mut nft.stdin.take().unwrap(), script.as_bytes())
            .expect("the script");
        assert!(nft.wait().unwrap().success(), "nft took {script}");
    }
}

/// The median time of `n` HTTP GETs of `url` from the workstation, each a new connection.
fn median_get(tb: &Testbed, url: &str, n: usize) -> Duration {
    let mut times: Vec<f64> = (0..n)
        .map(|_| {
            let (ok, out) = workstation::run(
                tb,
                &["curl", "-s", "-o", "/dev/null", "-w", "%{time_total}", url],
            );
            assert!(ok, "{url}: {out}");
            out.trim().parse().expect("curl's time_total")
        })
        .collect();
    times.sort_by(f64::total_cmp);
    Duration::from_secs_f64(times[n / 2])
}

/// Traffic that never calls `connect()` in a pod (issue 16, item 6): during an agent-mode
/// `ktctl exchange two-np --expose 18090:80`, a connection from outside the cluster (the
/// workstation) to the exchanged port's nodePort on either node — the holder's and the
/// other — reaches the workstation's app, while the Service's other port (81, not exposed)
/// still reaches the pods. The nodes drop what they would forward to each other's address
/// ([`drop_forwarding_to_other_nodes`]), so the node that does not hold the session must
/// relay, not forward. `kill -9` of an agent takes its nftables table with it at once
/// (fail-open; its replacement programs it again), and after Ctrl-C of ktctl both nodePorts
/// reach the pods again and no node has the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn a_node_port_from_outside_reaches_the_workstation_during_an_agent_exchange_only() {
    let (
        tb,
        TwoPorts {
            http: exchanged,
            alt: other,
            pods: web,
        },
    ) = two_ports_with_agent().await;
    drop_forwarding_to_other_nodes(&tb);
    let all: Vec<String> = exchanged.iter().chain(&other).cloned().collect();
    until_answered_from_outside(&tb, &all, |who| web.contains(who), Duration::from_secs(10))
        .await
        .expect("before the exchange, both nodePorts reach the pods");
    let to_pods = median_get(&tb, &exchanged[0], 11);

    let _app = workstation::http_echo(&tb, 18090).await;
    let mut running = Background::ktctl_with_env(
        &tb,
        &["USER=alice"],
        &[
            "exchange", "two-np", "--expose", "18090:80", "--mode", "agent",
        ],
    );
    running
        .wait_for(" Now all request to service 'two-np' will be redirected to local")
        .await;
    let took = until_answered_from_outside(
        &tb,
        &exchanged,
        |who| who == "workstation",
        Duration::from_secs(10),
    )
    .await
    .unwrap_or_else(|wrong| {
        let agents = kubectl(
            &tb.kubeconfig,
            &[
                "logs",
                "-n",
                "kt-system",
                "-l",
                "app.kubernetes.io/name=kt-node-agent",
                "--tail=30",
            ],
        );
        panic!(
            "{wrong}\n{}\n{}",
            running.log(),
            String::from_utf8_lossy(&agents.stdout)
        )
    });
    for url in &other {
        let who = answered_from_outside(&tb, url);
        assert!(
            web.contains(&who),
            "port 81 is not exchanged: {url} → {who:?}"
        );
    }
    let holder = kubectl_ok(
        &tb.kubeconfig,
        &["get", "kts", "-o", "jsonpath={.items[0].status.node}"],
    );
    let to_workstation = median_get(&tb, &exchanged[0], 11);
    eprintln!(
        "held on {holder}: both nodePorts reach the workstation {took:?} after the banner; \
         GET node-1:nodePort median {to_workstation:?} (to the pods before: {to_pods:?})"
    );

    // kill -9 of the agent that does not hold the session: its table goes with it.
    let other_node = if holder == "node-1" {
        "node-2"
    } else {
        "node-1"
    };
    assert!(has_node_port_table(&tb, other_node));
    let pid = agent_pid(&tb, other_node).expect("an agent process");
    let killed = std::time::Instant::now();
    // SAFETY: signalling the agent process of this test's own testbed.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    // Polled every 10 ms (not `poll_within`'s 100 ms): this is the figure reported.
    while has_node_port_table(&tb, other_node) {
        assert!(
            killed.elapsed() < Duration::from_secs(5),
            "the killed agent's table is still there"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let gone = killed.elapsed();
    let back = until_answered_from_outside(
        &tb,
        &exchanged,
        |who| who == "workstation",
        Duration::from_secs(30),
    )
    .await
    .unwrap_or_else(|wrong| panic!("after the agent's replacement: {wrong}"));
    assert!(agent_pid(&tb, other_node).is_some_and(|p| p != pid));
    eprintln!(
        "kill -9 of {other_node}'s agent: its table gone {gone:?} later; the replacement \
         redirects again {back:?} after that"
    );

    let stopped = std::time::Instant::now();
    let (status, log) = running.interrupt();
    assert!(
        status.success() && log.contains("Cleaning session"),
        "{log}"
    );
    let reverted = until_answered_from_outside(
        &tb,
        &exchanged,
        |who| web.contains(who),
        Duration::from_secs(10),
    )
    .await
    .unwrap_or_else(|wrong| panic!("after Ctrl-C: {wrong}"));
    until_no_node_port_table(&tb).await;
    eprintln!(
        "Ctrl-C: ktctl ended and both nodePorts reach the pods {:?} after the signal ({reverted:?} after ktctl exited)",
        stopped.elapsed()
    );
    until_answered_from_outside(&tb, &other, |who| web.contains(who), Duration::from_secs(5))
        .await
        .expect("port 81 still reaches the pods");
    tb.stop().await;
}

/// Mesh (issue 16, item 6): during an agent-mode `ktctl mesh two-np --expose 18090:80`, a
/// connection from outside the cluster to the meshed port's nodePort on either node goes to
/// that node's mesh router: a request with the session's header reaches the workstation,
/// one without reaches the pods, and the other port (81) stays with the pods. After Ctrl-C
/// every request reaches the pods and no node has the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn a_node_port_from_outside_is_routed_by_header_during_an_agent_mesh() {
    let (
        tb,
        TwoPorts {
            http: meshed,
            alt: other,
            pods: web,
        },
    ) = two_ports_with_agent().await;

    let _app = workstation::http_echo(&tb, 18090).await;
    let mut running = Background::ktctl_with_env(
        &tb,
        &["USER=alice"],
        &[
            "mesh",
            "two-np",
            "--expose",
            "18090:80",
            "--versionMark",
            "alice1",
        ],
    );
    running
        .wait_for(" Now you can access your service by header 'VERSION: alice1' ")
        .await;
    let header = Some("VERSION: alice1");
    let took = until_answered_from_outside_with(
        &tb,
        &meshed,
        header,
        |who| who == "workstation",
        Duration::from_secs(10),
    )
    .await
    .unwrap_or_else(|wrong| panic!("with the header: {wrong}\n{}", running.log()));
    until_answered_from_outside_with(
        &tb,
        &meshed,
        Some("VERSION: bob22"),
        |who| web.contains(who),
        Duration::from_secs(5),
    )
    .await
    .unwrap_or_else(|wrong| panic!("another value: {wrong}"));
    for url in &meshed {
        for _ in 0..3 {
            let who = answered_from_outside(&tb, url);
            assert!(web.contains(&who), "no header: {url} → {who:?}");
        }
    }
    for url in &other {
        let who = answered_from_outside_with(&tb, url, header);
        assert!(web.contains(&who), "port 81 is not meshed: {url} → {who:?}");
    }
    for node in ["node-1", "node-2"] {
        assert!(has_node_port_table(&tb, node), "{node}");
    }
    eprintln!("mesh: both nodePorts route by header {took:?} after the banner");

    let (status, log) = running.interrupt();
    assert!(status.success(), "{log}");
    until_answered_from_outside_with(
        &tb,
        &meshed,
        header,
        |who| web.contains(who),
        Duration::from_secs(10),
    )
    .await
    .unwrap_or_else(|wrong| panic!("after Ctrl-C: {wrong}"));
    until_no_node_port_table(&tb).await;
    tb.stop().await;
}
