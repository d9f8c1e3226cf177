//! `ktctl exchange` in selector mode (root, on the testbed): a Service's traffic from pods
//! on both nodes reaches a server on the workstation through the v0.3.7 shadow (OpenSSH,
//! reverse tunnels), a second exchange is refused naming the first, and Ctrl-C puts the
//! Service back exactly as it was.

use std::{path::Path, time::Duration};

use kt_testbed::cluster::Testbed;
use kt_tests::harness::{
    apps::{
        apply, deploy_client_2, deploy_web, service_state, start_testbed, until_all_answered_by,
        web_pods,
    },
    bins,
    eventually::{eventually, seen},
    kubectl::kubectl_ok,
    workstation::{self, Background, ktctl_once},
};
const CLIENTS: [&str; 2] = ["client", "client-2"];

/// Names of every pod, ConfigMap and Service in `default`, except the `web` pods, which
/// scale mode replaces.
fn kt_objects(tb: &Testbed) -> String {
    kubectl_ok(
        &tb.kubeconfig,
        &["get", "pods,configmaps,services", "-o", "name"],
    )
    .lines()
    .filter(|name| !name.starts_with("pod/web-"))
    .collect::<Vec<_>>()
    .join("\n")
}

/// Exchanges `web` with `extra` arguments as user alice, checks that pods on both nodes
/// reach the workstation by name, FQDN and ClusterIP, that `during` holds, that bob's
/// exchange is refused naming alice, and that `stop_with` (Ctrl-C's SIGINT, or SIGTERM)
/// restores the Service, its pods and the objects in the namespace.
async fn exchange_and_restore(
    extra: &[&str],
    banner: &str,
    during: impl Fn(&Testbed),
    stop_with: libc::c_int,
) {
    let tb = start_testbed(true).await;
    deploy_web(&tb);
    deploy_client_2(&tb);
    let before_service = service_state(&tb, "web");
    let before_objects = kt_objects(&tb);
    let cluster_ip = kubectl_ok(
        &tb.kubeconfig,
        &["get", "svc", "web", "-o", "jsonpath={.spec.clusterIP}"],
    );
    let urls = vec![
        "http://web/".to_owned(),
        "http://web.default.svc.cluster.local/".to_owned(),
        format!("http://{cluster_ip}/"),
    ];
    let app = workstation::http_echo(&tb, 18090).await;

    let ktctl = bins::ktctl();
    let mut args = vec![
        "USER=alice",
        ktctl.to_str().unwrap(),
        "exchange",
        "web",
        "--expose",
        "18090:80",
    ];
    args.extend_from_slice(extra);
    let mut exchange = Background::spawn(&tb, Path::new("env"), &args);
    exchange.wait_for(banner).await;
    until_all_answered_by(
        &tb,
        &CLIENTS,
        &urls,
        |who| who == "workstation",
        Duration::from_secs(10),
    )
    .await
    .unwrap_or_else(|wrong| panic!("{wrong}\n{}", exchange.log()));
    during(&tb);

    // A second developer is refused, named after the first, and nothing changes.
    let snapshot = (service_state(&tb, "web"), kt_objects(&tb));
    let (code, err) = ktctl_once(
        &tb,
        &["USER=bob"],
        &["exchange", "web", "--expose", "18090:80"],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("service 'web' is already exchanging by another user (alice)"),
        "{err}"
    );
    assert_eq!((service_state(&tb, "web"), kt_objects(&tb)), snapshot);

    let (status, log) = exchange.signal(stop_with);
    assert!(status.success(), "{log}");
    assert_eq!(
        service_state(&tb, "web"),
        before_service,
        "the Service is as it was"
    );
    kubectl_ok(
        &tb.kubeconfig,
        &["rollout", "status", "deploy/web", "--timeout=60s"],
    );
    let web = web_pods(&tb);
    assert_eq!(web.len(), 2, "both replicas are back");
    until_all_answered_by(
        &tb,
        &CLIENTS,
        &urls,
        |who| web.contains(who),
        Duration::from_secs(10),
    )
    .await
    .expect("the pods answer again");
    eventually("no shadow pod or ConfigMap left", async || {
        seen(kt_objects(&tb), |now| *now == before_objects)
    })
    .await;
    drop(app);
    tb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn selector_exchange_sends_the_service_to_the_workstation_and_ctrl_c_restores_it() {
    exchange_and_restore(
        &[],
        " Now all request to service 'web' will be redirected to local",
        |tb| {
            let during = service_state(tb, "web");
            assert!(
                during.contains(r#""kt-role":"shadow-exchange""#) && during.contains("kt-selector"),
                "v0.3.7's selector and annotation: {during}"
            );
        },
        libc::SIGINT,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn scale_exchange_stands_in_for_the_scaled_down_deployment_and_sigterm_scales_it_back() {
    exchange_and_restore(
        &["--mode", "scale", "--recoverWaitTime", "30"],
        " Now all request to deployment 'web' will be redirected to local",
        |tb| {
            let replicas = kubectl_ok(
                &tb.kubeconfig,
                &["get", "deploy", "web", "-o", "jsonpath={.spec.replicas}"],
            );
            assert_eq!(replicas, "0", "the deployment is scaled to zero");
            assert!(web_pods(tb).is_empty(), "only the shadow serves");
        },
        // `kill` (SIGTERM, what supervisors and shells send) restores too.
        libc::SIGTERM,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn exchange_bad_input_exits_1_naming_the_problem_and_changes_nothing() {
    let tb = start_testbed(true).await;
    deploy_web(&tb);
    let app = workstation::http_echo(&tb, 18091).await;
    apply(
        &tb.kubeconfig,
        r#"
apiVersion: v1
kind: Service
metadata:
  name: meshed
  annotations: {kt-selector: '{"app":"web"}'}
spec:
  selector: {kt-role: router, kt-target: aBcDeFgHiJkLmNoPqRsT}
  ports: [{port: 80}]
"#,
    );
    let (objects, service) = (kt_objects(&tb), service_state(&tb, "web"));
    for (args, needle) in [
        (
            &["exchange", "nosuch", "--expose", "18091"][..],
            "service 'nosuch' not found",
        ),
        (
            &["exchange", "web", "--expose", "18091:x"][..],
            "invalid --expose '18091:x'",
        ),
        (
            &["exchange", "web", "--expose", "18091:81"][..],
            "target port 81 not exists in service 'web'",
        ),
        (
            &["exchange", "web", "--expose", "18092:80"][..],
            "no application is running on port 18092",
        ),
        (
            &["exchange", "web"][..],
            r#"required flag(s) "expose" not set"#,
        ),
        // The Go ktctl's auto mesh points the Service at its router pod.
        (
            &["exchange", "meshed", "--expose", "18091:80"][..],
            "another user is meshing service 'meshed', cannot apply exchange",
        ),
    ] {
        let (code, err) = ktctl_once(&tb, &[], args);
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert!(
            err.contains("ERR Exit: ") && err.contains(needle),
            "{args:?}: {err}"
        );
        assert_eq!(kt_objects(&tb), objects, "{args:?} created something");
        assert_eq!(
            service_state(&tb, "web"),
            service,
            "{args:?} changed the Service"
        );
    }
    // --skipPortChecking: the exchange starts although nothing listens locally yet.
    let mut skipped = Background::ktctl(
        &tb,
        &[
            "exchange",
            "web",
            "--expose",
            "18092:80",
            "--skipPortChecking",
        ],
    );
    skipped.wait_for("will be redirected to local").await;
    let (status, log) = skipped.interrupt();
    assert!(status.success(), "{log}");
    drop(app);
    tb.stop().await;
}

/// The `web` pods' ephemeral containers as `name=state` (`running`, `terminated:0`, …),
/// sorted, from what `kubectl get pods -o json` shows.
fn navigators(tb: &Testbed) -> Vec<String> {
    let pods: serde_json::Value = serde_json::from_str(&kubectl_ok(
        &tb.kubeconfig,
        &["get", "pods", "-l", "app=web", "-o", "json"],
    ))
    .unwrap();
    let mut out: Vec<String> = pods["items"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| {
            let statuses = p["status"]["ephemeralContainerStatuses"].clone();
            p["spec"]["ephemeralContainers"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(move |c| {
                    let status = statuses
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|s| s["name"] == c["name"])
                        .cloned()
                        .unwrap_or_default();
                    let state = match &status["state"] {
                        s if s.get("running").is_some() => "running".to_owned(),
                        s if s.get("terminated").is_some() => {
                            format!("terminated:{}", s["terminated"]["exitCode"])
                        }
                        s => format!("{s}"),
                    };
                    let name = c["name"].as_str().unwrap_or_default();
                    // `kt-exchange-abcde` → `kt-exchange-*`: the suffix is random.
                    let name = match name.strip_prefix("kt-exchange-") {
                        Some(_) => "kt-exchange-*",
                        None => name,
                    };
                    format!("{name}={state}")
                })
        })
        .collect();
    out.sort();
    out
}

/// Ephemeral mode (v0.3.7's experimental one, done as it was meant): a navigator in each
/// `web` pod redirects the target port to the workstation, from pods on both nodes by name,
/// FQDN and ClusterIP, while the Service and the pods stay as they are; Ctrl-C removes the
/// redirects and the navigators end (they stay in the spec: Kubernetes cannot remove them);
/// a second run adds `kt-exchange-*`; `kill -9` of ktctl gives the pods their traffic back
/// within seconds, and its navigators end on their own after their reconnect grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn ephemeral_exchange_redirects_inside_the_pods_and_ctrl_c_or_kill_restores_them() {
    let tb = start_testbed(true).await;
    deploy_web(&tb);
    deploy_client_2(&tb);
    let before_service = service_state(&tb, "web");
    let web = web_pods(&tb);
    let cluster_ip = kubectl_ok(
        &tb.kubeconfig,
        &["get", "svc", "web", "-o", "jsonpath={.spec.clusterIP}"],
    );
    let urls = vec![
        "http://web/".to_owned(),
        "http://web.default.svc.cluster.local/".to_owned(),
        format!("http://{cluster_ip}/"),
    ];
    let app = workstation::http_echo(&tb, 18093).await;
    let ktctl = bins::ktctl();
    let args = [
        "USER=alice",
        ktctl.to_str().unwrap(),
        "exchange",
        "web",
        "--expose",
        "18093:80",
        "--mode",
        "ephemeral",
    ];

    // Run 1, ended with Ctrl-C.
    let started = std::time::Instant::now();
    let mut exchange = Background::spawn(&tb, Path::new("env"), &args);
    exchange
        .wait_for(" Now all request to service 'web' will be redirected to local")
        .await;
    eprintln!("ephemeral exchange up in {:?}", started.elapsed());
    until_all_answered_by(
        &tb,
        &CLIENTS,
        &urls,
        |who| who == "workstation",
        Duration::from_secs(10),
    )
    .await
    .unwrap_or_else(|wrong| panic!("{wrong}\n{}", exchange.log()));
    assert_eq!(
        service_state(&tb, "web"),
        before_service,
        "the Service is untouched"
    );
    assert_eq!(web_pods(&tb), web, "the same pods");
    assert_eq!(
        navigators(&tb),
        ["kt-exchange=running", "kt-exchange=running"]
    );
    // A second developer is refused, named after the first.
    let (code, err) = ktctl_once(
        &tb,
        &["USER=bob"],
        &[
            "exchange",
            "web",
            "--expose",
            "18093:80",
            "--mode",
            "ephemeral",
        ],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("is already exchanged by another user (alice): its ephemeral container kt-exchange is running"),
        "{err}"
    );
    let stopping = std::time::Instant::now();
    let (status, log) = exchange.interrupt();
    assert!(status.success(), "{log}");
    eprintln!("Ctrl-C to exit: {:?}", stopping.elapsed());
    assert_eq!(
        log.matches("restored: redirect of port 8080 removed")
            .count(),
        2,
        "{log}"
    );
    assert_eq!(
        navigators(&tb),
        ["kt-exchange=terminated:0", "kt-exchange=terminated:0"],
        "ended, and still in the spec"
    );
    until_all_answered_by(
        &tb,
        &CLIENTS,
        &urls,
        |who| web.contains(who),
        Duration::from_secs(5),
    )
    .await
    .expect("the pods answer again");
    for pod in &web {
        let (_, tables) = kt_tests::harness::apps::in_pod(&tb, pod, &["nft", "list", "tables"]);
        assert!(!tables.contains("kt_navigator"), "{pod}: {tables}");
    }

    // Run 2: a fresh container name; ended by kill -9.
    let mut exchange = Background::spawn(&tb, Path::new("env"), &args);
    exchange.wait_for("will be redirected to local").await;
    assert!(
        exchange
            .log()
            .contains("keeps ephemeral container kt-exchange from an earlier exchange"),
        "{}",
        exchange.log()
    );
    until_all_answered_by(
        &tb,
        &CLIENTS,
        &urls,
        |who| who == "workstation",
        Duration::from_secs(10),
    )
    .await
    .unwrap_or_else(|wrong| panic!("{wrong}\n{}", exchange.log()));
    let killed = std::time::Instant::now();
    exchange.kill();
    let back = until_all_answered_by(
        &tb,
        &CLIENTS,
        &urls,
        |who| web.contains(who),
        Duration::from_secs(10),
    )
    .await
    .expect("the pods answer again after kill -9");
    eprintln!("pods serving again {back:?} after kill -9");
    eventually(
        "the navigators end after their reconnect grace",
        async || {
            seen(navigators(&tb), |now| {
                now.iter()
                    .filter(|n| *n == "kt-exchange-*=terminated:0")
                    .count()
                    == 2
            })
        },
    )
    .await;
    eprintln!("navigators ended {:?} after kill -9", killed.elapsed());
    assert_eq!(service_state(&tb, "web"), before_service);
    assert_eq!(web_pods(&tb), web, "no pod was replaced");

    // One pod by name (`pod/<name>`, its container port): only that pod's traffic goes.
    let mut names: Vec<&String> = web.iter().collect();
    names.sort();
    let (one, other) = (names[0].as_str(), names[1].as_str());
    let ip = |pod: &str| {
        kubectl_ok(
            &tb.kubeconfig,
            &["get", "pod", pod, "-o", "jsonpath={.status.podIP}"],
        )
    };
    let (one_url, other_url) = (
        format!("http://{}:8080/", ip(one)),
        format!("http://{}:8080/", ip(other)),
    );
    let target = format!("pod/{one}");
    let mut exchange = Background::ktctl(
        &tb,
        &[
            "exchange",
            &target,
            "--expose",
            "18093:8080",
            "--mode",
            "ephemeral",
        ],
    );
    exchange
        .wait_for(&format!(
            " Now all request to pod '{one}' will be redirected to local"
        ))
        .await;
    until_all_answered_by(
        &tb,
        &CLIENTS,
        std::slice::from_ref(&one_url),
        |who| who == "workstation",
        Duration::from_secs(10),
    )
    .await
    .unwrap_or_else(|wrong| panic!("{wrong}\n{}", exchange.log()));
    until_all_answered_by(
        &tb,
        &CLIENTS,
        std::slice::from_ref(&other_url),
        |who| who == other,
        Duration::from_secs(5),
    )
    .await
    .expect("the other pod keeps its traffic");
    let (status, log) = exchange.interrupt();
    assert!(status.success(), "{log}");
    until_all_answered_by(
        &tb,
        &CLIENTS,
        std::slice::from_ref(&one_url),
        |who| who == one,
        Duration::from_secs(5),
    )
    .await
    .expect("the pod answers again");
    // `kubectl logs -c` reads an ephemeral container's log.
    let name = kubectl_ok(
        &tb.kubeconfig,
        &[
            "get",
            "pod",
            one,
            "-o",
            "jsonpath={.spec.ephemeralContainers[2].name}",
        ],
    );
    let navigator_log = kubectl_ok(&tb.kubeconfig, &["logs", one, "-c", &name]);
    assert!(
        navigator_log.contains("redirects removed"),
        "{navigator_log}"
    );
    drop(app);
    tb.stop().await;
}

/// A user who may read and patch pods and Services but not patch
/// `pods/ephemeralcontainers` is told so, by name, and nothing is changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn ephemeral_exchange_without_rbac_on_the_subresource_says_what_it_needs() {
    let tb = start_testbed(false).await;
    deploy_web(&tb);
    apply(
        &tb.kubeconfig,
        r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: reader, namespace: default}
rules:
# Everything ephemeral mode uses but the subresource (`patch` on services is kt-lock;
# `patch` on pods does not cover pods/ephemeralcontainers).
- apiGroups: [""]
  resources: [pods, services, pods/portforward]
  verbs: [get, list, watch, create, patch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: alice-reads, namespace: default}
subjects: [{kind: User, name: alice, apiGroup: rbac.authorization.k8s.io}]
roleRef: {kind: Role, name: reader, apiGroup: rbac.authorization.k8s.io}
"#,
    );
    let alice = tb.workstation_user_kubeconfig("alice", "default").unwrap();
    let app = workstation::http_echo(&tb, 18094).await;
    let before = (service_state(&tb, "web"), kt_objects(&tb));
    let (code, err) = ktctl_once(
        &tb,
        &[],
        &[
            "-c",
            alice.to_str().unwrap(),
            "exchange",
            "web",
            "--expose",
            "18094:80",
            "--mode",
            "ephemeral",
        ],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("ERR Exit: the cluster refused to add an ephemeral container to pod web-")
            && err.contains("ephemeral mode needs permission to patch pods/ephemeralcontainers"),
        "{err}"
    );
    assert!(
        navigators(&tb).is_empty(),
        "no ephemeral container was added"
    );
    assert_eq!((service_state(&tb, "web"), kt_objects(&tb)), before);
    drop(app);
    tb.stop().await;
}
