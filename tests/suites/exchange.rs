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

/// The ways a pod reaches the `web` Service: its name, its FQDN and its ClusterIP.
fn web_service_urls(tb: &Testbed) -> Vec<String> {
    let cluster_ip = kubectl_ok(
        &tb.kubeconfig,
        &["get", "svc", "web", "-o", "jsonpath={.spec.clusterIP}"],
    );
    vec![
        "http://web/".to_owned(),
        "http://web.default.svc.cluster.local/".to_owned(),
        format!("http://{cluster_ip}/"),
    ]
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
    let urls = web_service_urls(&tb);
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

/// What `kubectl get KIND -l SELECTOR -o json` lists, parsed.
fn items(tb: &Testbed, kind: &str, selector: &str) -> Vec<serde_json::Value> {
    let json = kubectl_ok(&tb.kubeconfig, &["get", kind, "-l", selector, "-o", "json"]);
    let list: serde_json::Value = serde_json::from_str(&json).expect("kubectl prints JSON");
    list["items"].as_array().cloned().unwrap_or_default()
}

/// The pod settings every shadow flag asks for (ktctl v0.3.7 §1.2, §2.3), checked on a
/// pod's JSON as the API server returns it.
fn assert_shadow_flags(pod: &serde_json::Value, what: &str) {
    let spec = &pod["spec"];
    let container = &spec["containers"][0];
    let quota = serde_json::json!({"cpu": "500m", "memory": "256Mi"});
    for (field, value, expected) in [
        (
            "--podQuota requests",
            &container["resources"]["requests"],
            &quota,
        ),
        (
            "--podQuota limits",
            &container["resources"]["limits"],
            &quota,
        ),
        ("-f", &container["imagePullPolicy"], &"Always".into()),
        (
            "--imagePullSecret",
            &spec["imagePullSecrets"],
            &serde_json::json!([{"name": "regcred"}]),
        ),
        (
            "--serviceAccount",
            &spec["serviceAccountName"],
            &"kt-sa".into(),
        ),
        (
            "--nodeSelector",
            &spec["nodeSelector"],
            &serde_json::json!({"kubernetes.io/hostname": "node-2"}),
        ),
        (
            "--nodeSelector (scheduled)",
            &spec["nodeName"],
            &"node-2".into(),
        ),
        ("-l", &pod["metadata"]["labels"]["team"], &"a".into()),
        (
            "--withAnnotation",
            &pod["metadata"]["annotations"]["note"],
            &"x".into(),
        ),
    ] {
        assert_eq!(value, expected, "{what}: {field}");
    }
}

/// Every shadow flag shows on the object it configures: with `--useShadowDeployment` a
/// selector exchange's shadow is a Deployment of one pod (v0.3.7's names and labels, its
/// heartbeat on the Deployment) whose pod carries `--podQuota`, `-f`, `--imagePullSecret`,
/// `--serviceAccount`, `--nodeSelector`, `-l` and `--withAnnotation`; the router pod of an
/// auto mesh carries the same pod settings; Ctrl-C removes all of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn shadow_flags_show_on_the_shadow_deployment_and_the_router_pod() {
    let tb = start_testbed(true).await;
    deploy_web(&tb);
    apply(
        &tb.kubeconfig,
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: kt-sa}\n",
    );
    let before = kubectl_ok(&tb.kubeconfig, &["get", "deploy,pods,cm,svc", "-o", "name"]);
    let _app = workstation::http_echo(&tb, 18090).await;
    let flags = [
        "--useShadowDeployment",
        "--podQuota",
        "0.5c,256m",
        "-f",
        "--imagePullSecret",
        "regcred",
        "--serviceAccount",
        "kt-sa",
        "--nodeSelector",
        "kubernetes.io/hostname=node-2",
        "-l",
        "team=a",
        "--withAnnotation",
        "note=x",
    ];
    let run = |command: &[&str]| {
        let mut args = command.to_vec();
        args.extend_from_slice(&flags);
        Background::ktctl_with_env(&tb, &["USER=alice"], &args)
    };

    let mut exchange = run(&[
        "exchange", "web", "--expose", "18090:80", "--mode", "selector",
    ]);
    exchange
        .wait_for(" Now all request to service 'web' will be redirected to local")
        .await;
    assert_eq!(
        kt_tests::harness::apps::who_answers(&tb, "http://web/").as_deref(),
        Some("workstation"),
        "{}",
        exchange.log()
    );
    let deployments = items(&tb, "deployments", "kt-role=shadow-exchange");
    assert_eq!(deployments.len(), 1, "one shadow Deployment");
    let deployment = &deployments[0];
    let name = deployment["metadata"]["name"].as_str().unwrap_or_default();
    assert!(name.starts_with("web-kt-exchange-"), "{name}");
    assert_eq!(deployment["spec"]["replicas"], 1);
    assert_eq!(deployment["metadata"]["labels"]["control-by"], "kt");
    assert!(
        deployment["metadata"]["annotations"]["kt-last-heart-beat"].is_string(),
        "{deployment}"
    );
    assert!(
        deployment["spec"]["selector"]["matchLabels"]
            .get("control-by")
            .is_none(),
        "v0.3.7's selector: the labels minus control-by"
    );
    let pods = items(&tb, "pods", "kt-role=shadow-exchange");
    assert_eq!(pods.len(), 1, "one shadow pod");
    assert_shadow_flags(&pods[0], "exchange shadow");
    let (status, log) = exchange.interrupt();
    assert!(status.success(), "{log}");
    assert!(
        log.contains(&format!("Cleaning shadow deployment {name}")),
        "{log}"
    );

    let mut mesh = run(&["mesh", "web", "--expose", "18090:80", "--mode", "auto"]);
    mesh.wait_for("Now you can access your service by header")
        .await;
    let routers = items(&tb, "pods", "kt-role=router");
    assert_eq!(routers.len(), 1, "one router pod");
    assert_shadow_flags(&routers[0], "router");
    assert_eq!(
        items(&tb, "deployments", "kt-role=shadow-mesh").len(),
        1,
        "the mesh shadow is a Deployment too"
    );
    let (status, log) = mesh.interrupt();
    assert!(status.success(), "{log}");

    eventually("nothing of kt's left", async || {
        seen(
            kubectl_ok(&tb.kubeconfig, &["get", "deploy,pods,cm,svc", "-o", "name"]),
            |now| *now == before,
        )
    })
    .await;
    tb.stop().await;
}

/// A long wait (here a shadow whose image cannot be pulled) shows what it waits for, the
/// pod's latest state and the elapsed time: on a terminal as one status line redrawn in
/// place (wiped before the error), in a log as plain lines; either way the command fails
/// naming the pod and the reason once `--podCreationTimeout` has passed, leaving nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn long_waits_show_progress_in_place_on_a_terminal_and_as_lines_in_a_log() {
    let tb = start_testbed(true).await;
    deploy_web(&tb);
    let before = kt_objects(&tb);
    let _app = workstation::http_echo(&tb, 18090).await;
    let ktctl = bins::ktctl();
    let command = [
        "env",
        "USER=alice",
        bins::utf8(&ktctl),
        "exchange",
        "web",
        "--expose",
        "18090:80",
        "--mode",
        "selector",
        "--image",
        "registry.example/no-such-shadow:v1",
        "--podCreationTimeout",
        "7",
    ];
    // A terminal: `script` runs the command on a pseudo-terminal and copies what it printed.
    let on_terminal = workstation::exec(&tb)
        .args(["script", "-qefc", &command.join(" "), "/dev/null"])
        .output()
        .expect("script runs");
    let shown = String::from_utf8_lossy(&on_terminal.stdout);
    assert_eq!(on_terminal.status.code(), Some(1), "{shown}");
    let redraws = shown
        .matches("\r\x1b[2KWaiting for pod web-kt-exchange-")
        .count();
    assert!(
        redraws >= 5,
        "about one redraw a second: {redraws}\n{shown}"
    );
    assert!(
        shown.contains("ImagePullBackOff, ") || shown.contains("ErrImagePull, "),
        "{shown}"
    );
    assert!(shown.contains(" to run ... ("), "{shown}");
    let error = shown
        .lines()
        .find(|l| l.contains("ERR Exit:"))
        .unwrap_or_default();
    assert!(
        error.starts_with("\r\x1b[2K") || !error.contains("Waiting for"),
        "the status line is wiped before the error: {error:?}"
    );
    assert!(error.contains("is not running after 7 s"), "{shown}");

    let (code, log) = ktctl_once(&tb, &command[1..2], &command[3..]);
    assert_eq!(code, Some(1), "{log}");
    assert!(
        !log.contains('\r') && !log.contains('\x1b'),
        "a log gets plain lines: {log}"
    );
    let waiting: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" INF Waiting for pod web-kt-exchange-"))
        .collect();
    assert_eq!(waiting.len(), 1, "one line every 6 s within 7 s: {log}");
    assert!(waiting[0].ends_with(", 6s)"), "{}", waiting[0]);
    eventually("nothing left", async || {
        seen(kt_objects(&tb), |now| *now == before)
    })
    .await;
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
    let urls = web_service_urls(&tb);
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
    // In any mode: an ephemeral exchange leaves the Service alone, its navigators tell.
    let snapshot = (service_state(&tb, "web"), kt_objects(&tb));
    let (code, err) = ktctl_once(
        &tb,
        &["USER=bob"],
        &[
            "exchange", "web", "--expose", "18093:80", "--mode", "selector",
        ],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("is already exchanged by another user (alice)"),
        "{err}"
    );
    assert_eq!((service_state(&tb, "web"), kt_objects(&tb)), snapshot);
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

/// `ktctl recover` of a Service that a live selector exchange holds puts it back and deletes
/// the shadow (naming the live holder in a warning); the running exchange then ends by
/// itself rather than point the Service at a shadow that is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn recover_of_a_live_selector_exchange_ends_it_and_the_service_stays_restored() {
    let tb = start_testbed(true).await;
    deploy_web(&tb);
    let before = service_state(&tb, "web");
    let app = workstation::http_echo(&tb, 18090).await;
    let mut exchange = Background::ktctl_with_env(
        &tb,
        &["USER=alice"],
        &[
            "exchange", "web", "--expose", "18090:80", "--mode", "selector",
        ],
    );
    exchange
        .wait_for(" Now all request to service 'web' will be redirected to local")
        .await;
    let (code, err) = ktctl_once(&tb, &["USER=bob"], &["recover", "web"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("of alice is still alive"), "{err}");
    let ended = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::task::spawn_blocking(move || {
            exchange.wait();
            exchange.log()
        }),
    )
    .await
    .expect("the exchange ends by itself")
    .expect("joined");
    assert!(ended.contains("the exchange ends"), "{ended}");
    assert_eq!(service_state(&tb, "web"), before, "{ended}");
    eventually("web's pods answer", async || {
        seen(
            kt_tests::harness::apps::who_answers(&tb, "http://web/").unwrap_or_default(),
            |who| who.starts_with("web-"),
        )
    })
    .await;
    drop(app);
    tb.stop().await;
}
