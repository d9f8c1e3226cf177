//! The whole simulated cluster (root): data plane (Services across nodes, cluster DNS,
//! scaling, port-forward from the workstation, in-cluster clients and RBAC), kubectl
//! conformance, and `kt-testbed up`/`down` leaving nothing behind.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    process::Command,
};

use tokio::io::AsyncBufReadExt as _;

use kt_testbed::cluster::Testbed;
use kt_tests::harness::{
    self, SSH_THROWAWAY,
    apps::{
        WEB, apply, deploy_shadow, deploy_web, in_client, start_testbed, web_pods, web_pods_field,
        who_answers,
    },
    bins::{self, utf8},
    eventually::{eventually, eventually_blocking, patience, seen},
    kubectl::{kubectl, kubectl_ok},
    workstation::{self, OPENSSH_SHADOW},
};

async fn testbed() -> Testbed {
    start_testbed(false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn pods_reach_a_service_by_short_name_and_fqdn_served_from_both_nodes() {
    let tb = testbed().await;
    deploy_web(&tb);
    let nodes = web_pods_field(&tb, "spec.nodeName");
    assert_eq!(nodes.len(), 2, "replicas spread over both nodes: {nodes:?}");
    let expected = web_pods(&tb);
    let mut seen = HashSet::new();
    for i in 0..40 {
        let url = if i % 2 == 0 {
            "http://web/"
        } else {
            "http://web.default.svc.cluster.local/"
        };
        let pod = who_answers(&tb, url).unwrap_or_else(|| panic!("{url} did not answer"));
        assert!(expected.contains(&pod), "{pod} is not a web pod");
        seen.insert(pod);
        if seen.len() == expected.len() {
            break;
        }
    }
    assert_eq!(
        seen, expected,
        "both pods (one per node) answered through the Service"
    );
    tb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn cluster_dns_answers_like_a_cluster() {
    let tb = testbed().await;
    deploy_web(&tb);
    apply(
        &tb.kubeconfig,
        "apiVersion: v1\nkind: Service\nmetadata: {name: headless}\nspec:\n  clusterIP: None\n  selector: {app: web}\n  ports: [{name: http, port: 80}]\n",
    );
    let tools = bins::kt_tools();
    let dig = |name: &str, kind: &str| in_client(&tb, &[utf8(&tools), "dig", name, kind]).1;
    let cluster_ip = kubectl_ok(
        &tb.kubeconfig,
        &["get", "svc", "web", "-o", "jsonpath={.spec.clusterIP}"],
    );
    let a = dig("web.default.svc.cluster.local.", "A");
    assert!(
        a.starts_with("rcode=No Error") && a.contains(&cluster_ip),
        "{a}"
    );
    let pod_ips = web_pods_field(&tb, "status.podIP");
    let headless: HashSet<String> = dig("headless.default.svc.cluster.local.", "A")
        .lines()
        .skip(1)
        .filter_map(|answer| answer.split_whitespace().last().map(String::from))
        .collect();
    assert_eq!(
        headless, pod_ips,
        "a headless Service resolves to its ready pods"
    );
    let srv = dig("_http._tcp.web.default.svc.cluster.local.", "SRV");
    assert!(srv.contains("80 web.default.svc.cluster.local."), "{srv}");
    assert!(dig("nope.default.svc.cluster.local.", "A").starts_with("rcode=Non-Existent Domain"));
    assert!(dig("web.other.svc.cluster.local.", "A").starts_with("rcode=Non-Existent Domain"));
    let pod = dig("10-244-9-9.default.pod.cluster.local.", "A");
    assert!(pod.contains("10.244.9.9"), "{pod}");
    // The search path of a pod: `web` alone resolves (what curl did above) through getaddrinfo.
    let (ok, hosts) = in_client(&tb, &["getent", "hosts", "web"]);
    assert!(ok && hosts.contains(&cluster_ip), "{hosts}");
    tb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn scaling_to_zero_and_back_changes_endpoints_and_traffic() {
    let tb = testbed().await;
    deploy_web(&tb);
    assert!(who_answers(&tb, "http://web/").is_some());
    kubectl_ok(&tb.kubeconfig, &["scale", "deploy/web", "--replicas=0"]);
    eventually("endpoints emptied", async || {
        let addrs = kubectl_ok(
            &tb.kubeconfig,
            &[
                "get",
                "endpoints",
                "web",
                "-o",
                "jsonpath={.subsets[*].addresses[*].ip}",
            ],
        );
        seen(addrs, |addrs| addrs.trim().is_empty())
    })
    .await;
    // The kube-proxy applies the change within its sync period.
    eventually("no endpoints: the Service refuses", async || {
        seen(who_answers(&tb, "http://web/"), Option::is_none)
    })
    .await;
    kubectl_ok(&tb.kubeconfig, &["scale", "deploy/web", "--replicas=2"]);
    kubectl_ok(
        &tb.kubeconfig,
        &["rollout", "status", "deploy/web", "--timeout=60s"],
    );
    let back = eventually("traffic back", async || {
        who_answers(&tb, "http://web/").ok_or("no answer")
    })
    .await;
    assert!(
        web_pods(&tb).contains(&back),
        "traffic back on the new pods"
    );
    tb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn kube_rs_port_forward_from_the_workstation_reaches_a_pod() {
    let tb = testbed().await;
    kubectl_ok(
        &tb.kubeconfig,
        &["run", "echo", "--image=kt-testbed/tcp-echo"],
    );
    kubectl_ok(
        &tb.kubeconfig,
        &["wait", "--for=condition=Ready", "pod/echo", "--timeout=60s"],
    );
    // The client runs in the workstation namespace and talks to https://172.30.0.1:6443.
    let out = workstation::exec(&tb)
        .args([
            utf8(&bins::kt_tools()),
            "port-forward",
            "default",
            "echo",
            "9000",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "ping through port-forward\n"
    );
    // The workstation reaches nodes but not pod IPs directly.
    let pod_ip = kubectl_ok(
        &tb.kubeconfig,
        &["get", "pod", "echo", "-o", "jsonpath={.status.podIP}"],
    );
    let (direct, _) = workstation::run(
        &tb,
        &[
            "curl",
            "-s",
            "--max-time",
            "2",
            &format!("http://{pod_ip}:9000/"),
        ],
    );
    assert!(!direct);
    tb.stop().await;
}

/// Lists pods in `default` with the pod's own service-account token, verifying the API by
/// the mounted CA and reaching it by its in-cluster name.
const LIST_PODS_AS_THE_POD: &str = "curl -s --cacert /var/run/secrets/kubernetes.io/serviceaccount/ca.crt \
     -H \"Authorization: Bearer $(cat /var/run/secrets/kubernetes.io/serviceaccount/token)\" \
     https://kubernetes.default.svc/api/v1/namespaces/default/pods";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn in_cluster_clients_use_service_account_tokens_and_rbac() {
    let tb = testbed().await;
    deploy_web(&tb);
    // The client pod's default ServiceAccount has no rights: the API (reached by its
    // in-cluster name, verified against the mounted CA) answers 403.
    let (ok, body) = in_client(&tb, &["sh", "-c", LIST_PODS_AS_THE_POD]);
    assert!(ok, "{body}");
    assert!(
        body.contains("\"reason\":\"Forbidden\"")
            && body.contains("system:serviceaccount:default:default"),
        "{body}"
    );
    apply(
        &tb.kubeconfig,
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {name: view}\nroleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: view}\nsubjects: [{kind: ServiceAccount, name: default, namespace: default}]\n",
    );
    let (_, body) = in_client(&tb, &["sh", "-c", LIST_PODS_AS_THE_POD]);
    assert!(body.contains("\"kind\":\"PodList\""), "{body}");
    tb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn kubectl_verbs_work_against_the_testbed() {
    let tb = testbed().await;
    let kc = tb.kubeconfig.clone();
    // kubectl lists before it watches, from the list's resourceVersion: once the listing of
    // this ConfigMap is printed, no later event can be missed.
    kubectl_ok(&kc, &["create", "configmap", "watch-start"]);
    let mut watch = tokio::process::Command::new("kubectl")
        .args([
            "get",
            "configmaps",
            "-w",
            "--output-watch-events",
            "--request-timeout=20s",
        ])
        .env("KUBECONFIG", &kc)
        .env("HOME", &tb.dir)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut watched = tokio::io::BufReader::new(watch.stdout.take().unwrap()).lines();
    let listed = tokio::time::timeout(patience(), async {
        while let Some(line) = watched.next_line().await.unwrap() {
            if line.contains("watch-start") {
                return true;
            }
        }
        false
    })
    .await;
    assert!(
        matches!(listed, Ok(true)),
        "kubectl get -w did not list the ConfigMaps"
    );

    let file = tb.dir.join("web.yaml");
    std::fs::write(&file, WEB).unwrap();
    let created = kubectl_ok(&kc, &["create", "-f", file.to_str().unwrap()]);
    assert!(
        created.contains("deployment.apps/web created") && created.contains("service/web created"),
        "{created}"
    );
    kubectl_ok(&kc, &["delete", "-f", file.to_str().unwrap()]);
    let applied = kubectl_ok(&kc, &["apply", "-f", file.to_str().unwrap()]);
    assert!(applied.contains("deployment.apps/web created"), "{applied}");
    std::fs::write(&file, WEB.replace("replicas: 2", "replicas: 3")).unwrap();
    let applied = kubectl_ok(&kc, &["apply", "-f", file.to_str().unwrap()]);
    assert!(
        applied.contains("deployment.apps/web configured")
            && applied.contains("service/web unchanged"),
        "{applied}"
    );
    kubectl_ok(&kc, &["rollout", "status", "deploy/web", "--timeout=60s"]);
    assert_eq!(
        kubectl_ok(
            &kc,
            &[
                "get",
                "deploy",
                "web",
                "-o",
                "jsonpath={.status.readyReplicas}"
            ]
        ),
        "3"
    );
    kubectl_ok(&kc, &["scale", "deploy/web", "--replicas=1"]);
    kubectl_ok(
        &kc,
        &[
            "wait",
            "--for=jsonpath={.status.replicas}=1",
            "deploy/web",
            "--timeout=60s",
        ],
    );
    kubectl_ok(
        &kc,
        &[
            "wait",
            "--for=condition=Available",
            "deploy/web",
            "--timeout=60s",
        ],
    );

    kubectl_ok(
        &kc,
        &["create", "configmap", "settings", "--from-literal=a=1"],
    );
    kubectl_ok(&kc, &["label", "configmap", "settings", "tier=db"]);
    kubectl_ok(&kc, &["annotate", "configmap", "settings", "note=hello"]);
    assert_eq!(
        kubectl_ok(
            &kc,
            &[
                "get",
                "cm",
                "settings",
                "-o",
                "jsonpath={.metadata.labels.tier} {.metadata.annotations.note}"
            ]
        ),
        "db hello"
    );
    kubectl_ok(&kc, &["delete", "configmap", "settings"]);

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
            "echo hello from the pod; sleep 1000",
        ],
    );
    kubectl_ok(
        &kc,
        &[
            "wait",
            "--for=condition=Ready",
            "pod/talker",
            "--timeout=60s",
        ],
    );
    let logs = eventually("talker logged", async || {
        seen(kubectl_ok(&kc, &["logs", "talker"]), |logs| {
            !logs.is_empty()
        })
    })
    .await;
    assert_eq!(logs, "hello from the pod\n");
    assert_eq!(
        kubectl_ok(&kc, &["auth", "can-i", "delete", "nodes"]).trim(),
        "yes"
    );

    let mut events = String::new();
    while let Some(line) = watched.next_line().await.unwrap() {
        events.push_str(&line);
        events.push('\n');
    }
    watch.wait().await.unwrap();
    assert!(
        events.contains("ADDED") && events.contains("settings") && events.contains("DELETED"),
        "{events}"
    );
    tb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn a_user_bound_to_a_role_is_forbidden_elsewhere_and_can_i_agrees() {
    let tb = testbed().await;
    let admin = tb.kubeconfig.clone();
    kubectl_ok(&admin, &["create", "namespace", "dev"]);
    kubectl_ok(
        &admin,
        &[
            "create",
            "role",
            "pod-reader",
            "-n",
            "dev",
            "--verb=get,list,watch",
            "--resource=pods",
        ],
    );
    kubectl_ok(
        &admin,
        &[
            "create",
            "rolebinding",
            "alice-reads",
            "-n",
            "dev",
            "--role=pod-reader",
            "--user=alice",
        ],
    );
    let alice = tb.user_kubeconfig("alice", "dev").unwrap();
    assert_eq!(
        kubectl_ok(&alice, &["auth", "can-i", "list", "pods", "-n", "dev"]).trim(),
        "yes"
    );
    assert_eq!(
        String::from_utf8_lossy(
            &kubectl(&alice, &["auth", "can-i", "delete", "pods", "-n", "dev"]).stdout
        )
        .trim(),
        "no"
    );
    assert_eq!(
        String::from_utf8_lossy(
            &kubectl(&alice, &["auth", "can-i", "list", "pods", "-n", "default"]).stdout
        )
        .trim(),
        "no"
    );
    kubectl_ok(&alice, &["get", "pods", "-n", "dev"]);
    let denied = kubectl(&alice, &["get", "pods", "-n", "default"]);
    assert!(!denied.status.success());
    let err = String::from_utf8_lossy(&denied.stderr);
    assert!(
        err.contains("Forbidden") && err.contains("User \"alice\" cannot list resource \"pods\""),
        "{err}"
    );
    tb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn unknown_images_back_off_and_node_ports_reach_pods_from_the_workstation() {
    let tb = testbed().await;
    kubectl_ok(
        &tb.kubeconfig,
        &["run", "ghost", "--image=registry.example/nothing:1"],
    );
    let reason = eventually("ghost waits", async || {
        let reason = kubectl_ok(
            &tb.kubeconfig,
            &[
                "get",
                "pod",
                "ghost",
                "-o",
                "jsonpath={.status.containerStatuses[0].state.waiting.reason}",
            ],
        );
        seen(reason, |reason| !reason.is_empty())
    })
    .await;
    assert_eq!(reason, "ImagePullBackOff");
    kubectl_ok(
        &tb.kubeconfig,
        &["delete", "pod", "ghost", "--wait=true", "--timeout=30s"],
    );

    deploy_web(&tb);
    apply(
        &tb.kubeconfig,
        "apiVersion: v1\nkind: Service\nmetadata: {name: web-np}\nspec:\n  type: NodePort\n  selector: {app: web}\n  ports: [{port: 80, targetPort: http, nodePort: 30080}]\n",
    );
    // The kube-proxies program the NodePort within their sync period.
    for node_ip in ["172.30.0.11", "172.30.0.12"] {
        let url = format!("http://{node_ip}:30080/");
        eventually(format!("NodePort on {node_ip}"), async || {
            let (_, body) = workstation::run(&tb, &["curl", "-s", "--max-time", "3", &url]);
            seen(body, |body| body.starts_with("pod=web-"))
        })
        .await;
    }
    tb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn the_v0_3_7_shadow_image_is_openssh_under_the_shadow_contract() {
    let tb = testbed().await;
    deploy_web(&tb);
    let (key, ip) = deploy_shadow(&tb, OPENSSH_SHADOW, &[], &[], "ed25519");
    let ssh = |extra: &[&str]| {
        let mut cmd = vec!["ssh", "-i", key.to_str().unwrap()];
        cmd.extend(SSH_THROWAWAY);
        cmd.extend(["-o", "LogLevel=ERROR"]);
        cmd.extend_from_slice(extra);
        in_client(&tb, &cmd)
    };
    let target = format!("root@{ip}");
    // Root logs in with the key from the ConfigMap; the session runs in the shadow pod.
    let (ok, out) = ssh(&[&target, "hostname"]);
    assert!(ok && out.trim() == "kt-connect-shadow-abcde", "{out}");
    // Without the key: refused.
    let mut keyless = vec!["ssh"];
    keyless.extend(SSH_THROWAWAY);
    keyless.extend([
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "IdentityFile=/dev/null",
        &target,
        "true",
    ]);
    let (ok, _) = in_client(&tb, &keyless);
    assert!(!ok, "a client without the key logged in");
    tb.stop().await;
    assert!(
        !Path::new("/run/sshd.pid").exists() && !Path::new("/run/kt-ssh").exists(),
        "the shadow wrote to the host's /run"
    );
}

#[test]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
fn up_and_down_leave_nothing_behind() {
    harness::require_root();
    let dir: PathBuf = std::env::temp_dir().join(harness::unique_name("updown"));
    kt_testbed_ok(&["up", "--dir", utf8(&dir), "--nodes", "2"]);
    let env = std::fs::read_to_string(dir.join("env")).unwrap();
    let netns = env
        .lines()
        .find_map(|l| l.strip_prefix("KT_TESTBED_WORKSTATION_NETNS=/run/netns/"))
        .unwrap()
        .to_owned();
    let prefix = netns.trim_end_matches("ws").to_owned();
    let pid: u32 = env
        .lines()
        .find_map(|l| l.strip_prefix("KT_TESTBED_PID="))
        .unwrap()
        .parse()
        .unwrap();
    let ours = |list: &str| list.lines().filter(|l| l.starts_with(&prefix)).count();
    let netns_list = || {
        String::from_utf8_lossy(
            &Command::new("ip")
                .args(["netns", "list"])
                .output()
                .unwrap()
                .stdout,
        )
        .into_owned()
    };
    assert!(
        ours(&netns_list()) >= 5,
        "control plane, 2 nodes, workstation and the DNS pod: {}",
        netns_list()
    );
    let cgroup = kt_testbed::sys::cgroup::cgroup2_mount()
        .unwrap()
        .join(prefix.trim_end_matches('-'));
    assert!(cgroup.exists());

    kt_testbed_ok(&["down", "--dir", utf8(&dir)]);
    assert_eq!(ours(&netns_list()), 0, "namespaces left: {}", netns_list());
    assert!(!cgroup.exists(), "cgroup left: {}", cgroup.display());
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "testbed process left"
    );
    assert!(!dir.exists(), "state directory left");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&prefix), "mounts left");
    let rules = String::from_utf8_lossy(
        &Command::new("nft")
            .args(["list", "tables"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    assert!(
        !rules.contains("kt_proxy"),
        "nftables table leaked into the host: {rules}"
    );
}

#[test]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
fn a_process_started_with_exec_ends_with_down() {
    harness::require_root();
    let dir: PathBuf = std::env::temp_dir().join(harness::unique_name("exec"));
    let dir_arg = utf8(&dir);
    kt_testbed_ok(&["up", "--dir", dir_arg, "--nodes", "1"]);
    // The runner execs the command: the child's pid becomes sleep's.
    let mut server = KilledOnDrop(
        Command::new(bins::kt_testbed())
            .args(["exec", "--dir", dir_arg, "--", "sleep", "1000"])
            .spawn()
            .unwrap(),
    );
    let comm = format!("/proc/{}/comm", server.0.id());
    eventually_blocking("the command runs", || {
        seen(std::fs::read_to_string(&comm).unwrap_or_default(), |c| {
            c.trim() == "sleep"
        })
    });

    kt_testbed_ok(&["down", "--dir", dir_arg]);
    let ended = eventually_blocking("the exec'd command ends with the testbed", || {
        server.0.try_wait().unwrap().ok_or("still running")
    });
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&ended),
        Some(libc::SIGKILL),
        "{ended}"
    );
}

/// `kt-testbed ARGS`, which must succeed.
fn kt_testbed_ok(args: &[&str]) {
    let out = Command::new(bins::kt_testbed())
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kt-testbed {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A child process killed and reaped when dropped (a failing test leaves none behind).
struct KilledOnDrop(std::process::Child);

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
