//! `ktctl mesh` in agent mode (root, on the testbed): two developers mesh `web` with
//! different headers; from pods on both nodes each request goes by its own header — HTTP/1.1
//! keep-alive with the header changing on one connection, HTTP/2 streams interleaved on one
//! connection, gRPC unary calls, WebSocket upgrades — and one without a header stays with
//! the pods. Conflicts are refused naming the holder, Ctrl-C of one developer leaves the
//! other working, and `kill -9` ends a mesh within the lease.

use std::{collections::HashSet, path::Path, time::Duration};

use kt_testbed::cluster::Testbed;
use kt_tests::harness::{
    apps::{
        deploy_client_2, deploy_web, in_pod, install_agent, start_testbed, web_pods, web_pods_field,
    },
    bins,
    eventually::poll_within,
    kubectl::kubectl_ok,
    workstation::{self, Background, ktctl_once},
};

const CLIENTS: [&str; 2] = ["client", "client-2"];
const ALICE: &str = "version: alice1";
const BOB: &str = "version: bob22";

/// `ktctl mesh ARGS` as local user `user`, once its banner is out.
async fn mesh(tb: &Testbed, user: &str, args: &[&str]) -> Background {
    let ktctl = bins::ktctl();
    let sudo_user = format!("SUDO_USER={user}");
    let mut all = vec![sudo_user.as_str(), bins::utf8(&ktctl), "mesh"];
    all.extend_from_slice(args);
    let mut running = Background::spawn(tb, Path::new("env"), &all);
    running
        .wait_for("Now you can access your service by header")
        .await;
    running
}

/// The `pod=` names in `text`, in order.
fn pods_in(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("pod="))
        .map(str::to_owned)
        .collect()
}

/// What each protocol's requests from `pod` reached, as `protocol: who, who, …` lines, with
/// the headers in the order [alice, none, bob, none, alice] (for the WebSocket: alice,
/// none, bob). `endpoint` is one web pod's IP, dialled directly over HTTP/1.1 too.
/// Without `endpoint` (a router-pod mesh leaves the pods' own addresses alone), only the
/// Service is asked.
fn routed(tb: &Testbed, pod: &str, endpoint: Option<&str>) -> Vec<(String, Vec<String>)> {
    let tools = bins::kt_tools();
    let tools = bins::utf8(&tools);
    let mut out = Vec::new();
    // HTTP/1.1: one curl, one keep-alive connection (num_connects 1, then 0s).
    let mut urls = vec![("http1", "http://web/".to_owned())];
    if let Some(endpoint) = endpoint {
        urls.push(("http1-endpoint", format!("http://{endpoint}:8080/")));
    }
    for (protocol, url) in urls {
        let mut args: Vec<String> = vec!["curl".into()];
        for (i, header) in [Some(ALICE), None, Some(BOB), None, Some(ALICE)]
            .iter()
            .enumerate()
        {
            if i > 0 {
                args.push("--next".into());
            }
            args.extend(["-s".into(), "--max-time".into(), "3".into()]);
            args.extend(["-w".into(), "connects=%{num_connects}\n".into()]);
            if let Some(header) = header {
                args.extend(["-H".into(), (*header).into()]);
            }
            args.push(url.clone());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (_, text) = in_pod(tb, pod, &args);
        let connects: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("connects="))
            .collect();
        let mut who = pods_in(&text);
        if connects
            != [
                "connects=1",
                "connects=0",
                "connects=0",
                "connects=0",
                "connects=0",
            ]
        {
            who.push(format!("(not one keep-alive connection: {connects:?})"));
        }
        out.push((protocol.to_owned(), who));
    }
    let headers = [
        "version:alice1",
        "-",
        "version:bob22",
        "-",
        "version:alice1",
    ];
    for (protocol, grpc) in [("http2", false), ("grpc", true)] {
        let mut args = vec![tools, "h2", "web:80"];
        args.extend(headers);
        if grpc {
            args.push("--grpc");
        }
        let (_, text) = in_pod(tb, pod, &args);
        out.push((protocol.to_owned(), pods_in(&text)));
    }
    let mut websocket = Vec::new();
    for header in ["version:alice1", "-", "version:bob22"] {
        let (_, text) = in_pod(tb, pod, &[tools, "ws", "web:80", header]);
        websocket.extend(pods_in(&text));
    }
    out.push(("websocket".to_owned(), websocket));
    out
}

/// Whether every protocol's answers are, in order, `first` / a web pod / `second` / a web
/// pod / `first` (`first` and `second` being "pods" meaning any web pod).
fn check(
    seen: &[(String, Vec<String>)],
    first: &str,
    second: &str,
    web: &HashSet<String>,
) -> Result<(), String> {
    let is = |who: &str, want: &str| {
        if want == "pods" {
            web.contains(who)
        } else {
            who == want
        }
    };
    let want = [first, "pods", second, "pods", first];
    let wrong: Vec<String> = seen
        .iter()
        .filter(|(protocol, who)| {
            let expected = if protocol == "websocket" {
                &want[..3]
            } else {
                &want[..]
            };
            who.len() != expected.len() || who.iter().zip(expected).any(|(w, e)| !is(w, e))
        })
        .map(|(protocol, who)| format!("{protocol}: {who:?}"))
        .collect();
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(wrong.join("; "))
    }
}

/// Polls until requests from both clients are routed as [`check`] says, within `within`.
async fn until_routed(
    tb: &Testbed,
    endpoint: Option<&str>,
    first: &str,
    second: &str,
    within: Duration,
    logs: &[&Background],
) {
    let web = web_pods(tb);
    poll_within(within, async || {
        let mut wrong = Vec::new();
        let mut seen = Vec::new();
        for pod in CLIENTS {
            let answers = routed(tb, pod, endpoint);
            if let Err(e) = check(&answers, first, second, &web) {
                wrong.push(format!("{pod}: {e}"));
            }
            seen.push(format!("{pod}: {answers:?}"));
        }
        if wrong.is_empty() {
            eprintln!("routed as expected: {}", seen.join(" | "));
            Ok(())
        } else {
            Err(wrong.join(" | "))
        }
    })
    .await
    .unwrap_or_else(|wrong| {
        let logs: Vec<String> = logs.iter().map(|b| b.log()).collect();
        panic!("{wrong}\n{}", logs.join("\n----\n"))
    });
}

fn sessions(tb: &Testbed) -> usize {
    kubectl_ok(&tb.kubeconfig, &["get", "kts", "-o", "name"])
        .lines()
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn two_developers_mesh_one_service_by_header_over_http1_http2_grpc_and_websocket() {
    let tb = start_testbed(true).await;
    deploy_web(&tb);
    deploy_client_2(&tb);
    install_agent(&tb);
    let endpoint = web_pods_field(&tb, "status.podIP")
        .into_iter()
        .next()
        .expect("a web pod");
    let _alice_app = workstation::named_http_echo(&tb, 18080, "alice").await;
    let _bob_app = workstation::named_http_echo(&tb, 28080, "bob").await;

    let alice = mesh(
        &tb,
        "alice",
        &["web", "--expose", "18080:8080", "--versionMark", "alice1"],
    )
    .await;
    let bob = mesh(
        &tb,
        "bob",
        &["web", "--expose", "28080:8080", "--versionMark", "bob22"],
    )
    .await;
    assert!(
        alice
            .log()
            .contains(" Now you can access your service by header 'VERSION: alice1' "),
        "{}",
        alice.log()
    );
    until_routed(
        &tb,
        Some(&endpoint),
        "alice",
        "bob",
        Duration::from_secs(15),
        &[&alice, &bob],
    )
    .await;

    // A third developer asking for alice's value, and an exchange of the meshed Service.
    let (code, err) = ktctl_once(
        &tb,
        &["SUDO_USER=carol"],
        &[
            "mesh",
            "web",
            "--expose",
            "18080:8080",
            "--versionMark",
            "alice1",
        ],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("another user (alice@") && err.contains("via version 'alice1'"),
        "{err}"
    );
    let (code, err) = ktctl_once(
        &tb,
        &["SUDO_USER=carol"],
        &[
            "exchange",
            "web",
            "--expose",
            "18080:8080",
            "--mode",
            "agent",
        ],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("is meshing service 'web'") && err.contains("alice@") && err.contains("bob@"),
        "{err}"
    );
    assert_eq!(sessions(&tb), 2, "the refused commands created nothing");

    // Ctrl-C of alice: her header reaches the pods, bob's still reaches him.
    let (status, log) = alice.interrupt();
    assert!(status.success(), "{log}");
    until_routed(
        &tb,
        Some(&endpoint),
        "pods",
        "bob",
        Duration::from_secs(15),
        &[&bob],
    )
    .await;

    // kill -9 of bob: within the lease (10 s) his header reaches the pods too.
    let killed = std::time::Instant::now();
    bob.kill();
    until_routed(
        &tb,
        Some(&endpoint),
        "pods",
        "pods",
        Duration::from_secs(25),
        &[],
    )
    .await;
    eprintln!(
        "bob's header back at the pods {:?} after kill -9",
        killed.elapsed()
    );
    tb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn mesh_bad_input_exits_1_naming_the_problem_and_changes_nothing() {
    let tb = start_testbed(true).await;
    deploy_web(&tb);
    install_agent(&tb);
    let _app = workstation::http_echo(&tb, 18080).await;
    let cases: [(&[&str], &str); 5] = [
        (
            &[
                "mesh",
                "web",
                "--expose",
                "18080:8080",
                "--versionMark",
                "Bad:x",
            ],
            "invalid --versionMark key 'Bad'",
        ),
        (
            &[
                "mesh",
                "web",
                "--expose",
                "18080:8080",
                "--versionMark",
                "k:a\tb",
            ],
            "invalid --versionMark value",
        ),
        (&["mesh", "nosuch", "--expose", "18080:8080"], "nosuch"),
        (
            &["mesh", "web", "--expose", "18080:9999"],
            "target port 9999 not exists in service 'web'",
        ),
        (
            &[
                "mesh",
                "web",
                "--expose",
                "18080:8080",
                "--mode",
                "manual",
                "--versionMark",
                "Feo_1",
            ],
            "invalid --versionMark value 'Feo_1' for manual mode",
        ),
    ];
    for (args, needle) in cases {
        let (code, err) = ktctl_once(&tb, &[], args);
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    assert_eq!(sessions(&tb), 0, "nothing was created");
    tb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn manual_mesh_without_the_agent_adds_a_labelled_shadow_and_leaves_the_service_alone() {
    let tb = start_testbed(false).await;
    deploy_web(&tb);
    let _app = workstation::http_echo(&tb, 18080).await;
    let before = kubectl_ok(
        &tb.kubeconfig,
        &[
            "get",
            "svc",
            "web",
            "-o",
            "jsonpath={.spec.selector} {.metadata.annotations}",
        ],
    );

    let mut running = Background::ktctl(
        &tb,
        &[
            "mesh",
            "web",
            "--expose",
            "18080:8080",
            "--mode",
            "manual",
            "--versionMark",
            "feo3x",
        ],
    );
    running
        .wait_for(" Now you can update Istio rule by label 'version=feo3x' ")
        .await;
    assert!(
        running.log().contains(&"-".repeat(57)) && !running.log().contains(&"-".repeat(58)),
        "v0.3.7's 57-dash lines: {}",
        running.log()
    );
    let labelled = kubectl_ok(
        &tb.kubeconfig,
        &[
            "get",
            "pods",
            "-l",
            "app=web,version=feo3x,kt-role=shadow-mesh",
            "-o",
            "jsonpath={.items[*].metadata.name} {.items[*].status.podIP}",
        ],
    );
    let (shadow, ip) = labelled.split_once(' ').expect("one shadow");
    assert_eq!(shadow, "web-kt-mesh-feo3x");
    let reached = in_pod(
        &tb,
        "client",
        &[
            "curl",
            "-s",
            "--max-time",
            "3",
            &format!("http://{ip}:8080/"),
        ],
    )
    .1;
    assert!(reached.starts_with("pod=workstation"), "{reached}");
    let after = kubectl_ok(
        &tb.kubeconfig,
        &[
            "get",
            "svc",
            "web",
            "-o",
            "jsonpath={.spec.selector} {.metadata.annotations}",
        ],
    );
    assert_eq!(after, before, "manual mode leaves the Service alone");

    // The same version again is refused, naming its holder.
    let (code, err) = ktctl_once(
        &tb,
        &["SUDO_USER=carol"],
        &[
            "mesh",
            "web",
            "--expose",
            "18080:8080",
            "--mode",
            "manual",
            "--versionMark",
            "feo3x",
        ],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("is meshing service 'web' via version 'feo3x'"),
        "{err}"
    );

    let (status, log) = running.interrupt();
    assert!(status.success(), "{log}");
    poll_within(Duration::from_secs(30), async || {
        let left = kubectl_ok(
            &tb.kubeconfig,
            &[
                "get",
                "pods,configmaps",
                "-l",
                "kt-role=shadow-mesh",
                "-o",
                "name",
            ],
        );
        if left.trim().is_empty() {
            Ok(())
        } else {
            Err(left)
        }
    })
    .await
    .unwrap_or_else(|left| panic!("left after Ctrl-C: {left}"));
    tb.stop().await;
}

/// `kubectl get` of one object's fields as jsonpath.
fn fields(tb: &Testbed, kind_name: &str, jsonpath: &str) -> String {
    kubectl_ok(
        &tb.kubeconfig,
        &["get", kind_name, "-o", &format!("jsonpath={jsonpath}")],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn router_pod_mesh_without_the_agent_as_v0_3_7_lays_it_out_and_restores_the_service() {
    // The agent binary provides the router image; the agent itself is not installed.
    let tb = start_testbed(true).await;
    deploy_web(&tb);
    deploy_client_2(&tb);
    let before = fields(&tb, "svc/web", "{.spec.selector} {.metadata.annotations}");
    let _alice_app = workstation::named_http_echo(&tb, 18080, "alice").await;
    let _bob_app = workstation::named_http_echo(&tb, 28080, "bob").await;

    let alice = mesh(
        &tb,
        "alice",
        &["web", "--expose", "18080:8080", "--versionMark", "alice1"],
    )
    .await;
    assert!(
        alice.log().contains("Using auto (router pod) mode"),
        "{}",
        alice.log()
    );
    let bob = mesh(
        &tb,
        "bob",
        &["web", "--expose", "28080:8080", "--versionMark", "bob22"],
    )
    .await;
    // v0.3.7's layout: the router selected by the Service, the original selector kept in
    // kt-selector and on the stuntman, a shadow Service per version.
    assert_eq!(
        fields(
            &tb,
            "pod/web-kt-router",
            "{.metadata.annotations.kt-ref-count}"
        ),
        "2"
    );
    assert_eq!(
        fields(&tb, "pod/web-kt-router", "{.metadata.labels.kt-role}"),
        "router"
    );
    assert!(fields(&tb, "svc/web", "{.spec.selector.kt-role}") == "router");
    assert_eq!(
        fields(&tb, "svc/web", "{.metadata.annotations.kt-selector}"),
        r#"{"app":"web"}"#
    );
    assert_eq!(
        fields(&tb, "svc/web-kt-stuntman", "{.spec.selector}"),
        r#"{"app":"web"}"#
    );
    for shadow in ["web-kt-mesh-alice1", "web-kt-mesh-bob22"] {
        assert_eq!(
            fields(&tb, &format!("svc/{shadow}"), "{.spec.selector.kt-role}"),
            "shadow-mesh"
        );
        assert_eq!(
            fields(&tb, &format!("pod/{shadow}"), "{.metadata.labels.kt-role}"),
            "shadow-mesh"
        );
    }
    until_routed(
        &tb,
        None,
        "alice",
        "bob",
        Duration::from_secs(15),
        &[&alice, &bob],
    )
    .await;

    // An exchange of the meshed Service is refused, as v0.3.7 refuses it.
    let (code, err) = ktctl_once(&tb, &[], &["exchange", "web", "--expose", "18080:8080"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("another user is meshing service 'web', cannot apply exchange"),
        "{err}"
    );

    // The router takes v0.3.7's commands, as the Go ktctl sends them.
    let (ok, _) = in_pod(
        &tb,
        "web-kt-router",
        &["/usr/sbin/router", "add", "version:gofmt"],
    );
    assert!(ok, "router add");
    let state = in_pod(&tb, "web-kt-router", &["cat", "/var/kt-router/kt.conf"]).1;
    assert!(
        state.contains(r#""Versions":["alice1","bob22","gofmt"]"#)
            && state.contains(r#""Ports":[["80","8080"]]"#),
        "{state}"
    );
    let (ok, _) = in_pod(
        &tb,
        "web-kt-router",
        &["/usr/sbin/router", "remove", "version:gofmt"],
    );
    assert!(ok, "router remove");
    let (refused, _) = in_pod(
        &tb,
        "web-kt-router",
        &["/usr/sbin/router", "add", "x-dev:abc"],
    );
    assert!(
        !refused,
        "a version under another header is refused, as v0.3.7's router does"
    );

    // Ctrl-C of alice: she counts herself out; bob keeps his header.
    let (status, log) = alice.interrupt();
    assert!(status.success(), "{log}");
    assert_eq!(
        fields(
            &tb,
            "pod/web-kt-router",
            "{.metadata.annotations.kt-ref-count}"
        ),
        "1"
    );
    until_routed(&tb, None, "pods", "bob", Duration::from_secs(15), &[&bob]).await;

    // Ctrl-C of the last one: router, stuntman and shadows go, the Service is as before.
    let (status, log) = bob.interrupt();
    assert!(status.success(), "{log}");
    assert_eq!(
        fields(&tb, "svc/web", "{.spec.selector} {.metadata.annotations}"),
        before,
        "{log}"
    );
    poll_within(Duration::from_secs(30), async || {
        let left = kubectl_ok(&tb.kubeconfig, &["get", "pods,svc", "-o", "name"]);
        let left: Vec<&str> = left.lines().filter(|l| l.contains("-kt-")).collect();
        if left.is_empty() {
            Ok(())
        } else {
            Err(left.join(" "))
        }
    })
    .await
    .unwrap_or_else(|left| panic!("left after the last Ctrl-C: {left}"));
    tb.stop().await;
}
