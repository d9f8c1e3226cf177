//! `ktctl recover`, `clean` and `birdseye` (root, on the testbed): what a ktctl killed with
//! `kill -9` left (selector and scale exchange, router-pod mesh) and what the Go ktctl
//! v0.3.7 leaves (its objects written here as it lays them out) are put back by both
//! `recover` and `clean`; `clean --dryRun` lists and changes nothing; `birdseye` names every
//! holder in v0.3.7's words; a `clean` whose clock is an hour ahead deletes nothing alive.

use std::time::Duration;

use kt_proto::session::KtSession;
use kt_testbed::cluster::Testbed;
use kt_tests::harness::{
    apps::{apply, deploy_web, install_agent, service_state, start_testbed},
    bins,
    eventually::{eventually, seen},
    kubectl::kubectl_ok,
    workstation::{self, Background, ktctl_once},
};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::json;

/// A heartbeat from 2020: stale by any threshold.
const OLD: &str = "1600000000";

/// What the Go ktctl v0.3.7 leaves when killed (`../shared/reference/ktctl-v0.3.7.md` §2,
/// §3.3–3.4): a scale exchange (`goscale` at 0 replicas, its shadow's `kt-config`), a
/// selector exchange with a lock (`gosel`), an auto mesh (`gomesh`: router, stuntman, a
/// shadow pod and Service per version) and a manual mesh shadow (`gomanual`), user `gopher`.
fn go_leftovers() -> String {
    format!(
        r#"
apiVersion: apps/v1
kind: Deployment
metadata: {{name: goscale}}
spec:
  replicas: 0
  selector: {{matchLabels: {{app: goscale}}}}
  template:
    metadata: {{labels: {{app: goscale}}}}
    spec: {{containers: [{{name: app, image: kt-testbed/http-echo:1}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: goscale}}
spec: {{selector: {{app: goscale}}, ports: [{{port: 80, targetPort: 8080}}]}}
---
apiVersion: v1
kind: Pod
metadata:
  name: goscale-kt-exchange-bcdef
  labels: {{control-by: kt, kt-role: shadow-exchange, app: goscale}}
  annotations: {{kt-config: "app=goscale,replicas=2", kt-user: gopher, kt-last-heart-beat: "{OLD}"}}
spec: {{containers: [{{name: standalone, image: kt-testbed/sleep}}]}}
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: goscale-kt-exchange-bcdef
  labels: {{control-by: kt, kt-role: shadow-exchange}}
  annotations: {{kt-last-heart-beat: "{OLD}"}}
data: {{authorized: "ssh-rsa AAAA gopher", privateKey: "-"}}
---
apiVersion: v1
kind: Service
metadata:
  name: gosel
  annotations: {{kt-selector: '{{"app":"web"}}', kt-lock: "{OLD}"}}
spec: {{selector: {{kt-role: shadow-exchange, kt-target: GoSelTargetAbcdefghi}}, ports: [{{port: 80, targetPort: 8080}}]}}
---
apiVersion: v1
kind: Pod
metadata:
  name: gosel-kt-exchange-cdefg
  labels: {{control-by: kt, kt-role: shadow-exchange, kt-target: GoSelTargetAbcdefghi}}
  annotations: {{kt-config: service=gosel, kt-user: gopher, kt-last-heart-beat: "{OLD}"}}
spec: {{containers: [{{name: standalone, image: kt-testbed/sleep}}]}}
---
apiVersion: v1
kind: Service
metadata:
  name: gomesh
  annotations: {{kt-selector: '{{"app":"web"}}'}}
spec: {{selector: {{kt-role: router, kt-target: GoRouterAbcdefghijkl}}, ports: [{{port: 80, targetPort: 8080}}]}}
---
apiVersion: v1
kind: Pod
metadata:
  name: gomesh-kt-router
  labels: {{control-by: kt, kt-role: router, kt-target: GoRouterAbcdefghijkl}}
  annotations: {{kt-config: service=gomesh, kt-ref-count: "1", kt-user: gopher, kt-last-heart-beat: "{OLD}"}}
spec: {{containers: [{{name: standalone, image: kt-testbed/sleep}}]}}
---
apiVersion: v1
kind: Service
metadata:
  name: gomesh-kt-stuntman
  labels: {{control-by: kt}}
  annotations: {{kt-last-heart-beat: "{OLD}"}}
spec: {{selector: {{app: web}}, ports: [{{name: kt-80, port: 80, targetPort: 8080}}]}}
---
apiVersion: v1
kind: Service
metadata:
  name: gomesh-kt-mesh-vgo
  labels: {{control-by: kt}}
  annotations: {{kt-last-heart-beat: "{OLD}"}}
spec: {{selector: {{kt-role: shadow-mesh, kt-target: GoMeshTargetAbcdefgh}}, ports: [{{name: kt-80, port: 80, targetPort: 8080}}]}}
---
apiVersion: v1
kind: Pod
metadata:
  name: gomesh-kt-mesh-vgo
  labels: {{control-by: kt, kt-role: shadow-mesh, kt-target: GoMeshTargetAbcdefgh}}
  annotations: {{kt-config: service=gomesh-kt-mesh-vgo, kt-user: gopher, kt-last-heart-beat: "{OLD}"}}
spec: {{containers: [{{name: standalone, image: kt-testbed/sleep}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: gomanual}}
spec: {{selector: {{app: gomanual}}, ports: [{{port: 80}}]}}
---
apiVersion: v1
kind: Pod
metadata:
  name: gomanual-kt-mesh-vman
  labels: {{control-by: kt, kt-role: shadow-mesh, app: gomanual, version: vman}}
  annotations: {{kt-user: gopher, kt-last-heart-beat: "{OLD}"}}
spec: {{containers: [{{name: standalone, image: kt-testbed/sleep}}]}}
"#
    )
}

/// `ktctl ARGS` with `env` on the workstation: (exit code, stdout, stderr).
fn ktctl_out(tb: &Testbed, env: &[&str], args: &[&str]) -> (Option<i32>, String, String) {
    let out = workstation::exec(tb)
        .arg("env")
        .args(env)
        .arg(bins::ktctl())
        .args(args)
        .output()
        .expect("ktctl runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every Service, Deployment, pod and ConfigMap of `default` with its annotations, selector
/// and replicas: what `clean --dryRun` must not change.
fn cluster_state(tb: &Testbed) -> String {
    kubectl_ok(
        &tb.kubeconfig,
        &[
            "get",
            "svc,deploy,pods,cm",
            "-o",
            r#"jsonpath={range .items[*]}{.kind}/{.metadata.name} {.metadata.annotations} {.spec.selector} {.spec.replicas}{"\n"}{end}"#,
        ],
    )
}

/// kt's objects in `default`.
fn kt_objects(tb: &Testbed) -> String {
    kubectl_ok(
        &tb.kubeconfig,
        &[
            "get",
            "pods,cm,svc,deploy",
            "-l",
            "control-by=kt",
            "-o",
            "name",
        ],
    )
}

fn field(tb: &Testbed, object: &str, jsonpath: &str) -> String {
    kubectl_ok(
        &tb.kubeconfig,
        &["get", object, "-o", &format!("jsonpath={jsonpath}")],
    )
}

/// The Go ktctl's leftovers are gone and every Service and Deployment is back.
async fn go_leftovers_restored(tb: &Testbed) {
    eventually("the Go ktctl's objects are gone", async || {
        seen(kt_objects(tb), String::is_empty)
    })
    .await;
    for service in ["gosel", "gomesh"] {
        assert_eq!(
            field(tb, &format!("svc/{service}"), "{.spec.selector}"),
            r#"{"app":"web"}"#,
            "{service}"
        );
        let kt_annotations = field(
            tb,
            &format!("svc/{service}"),
            "{.metadata.annotations.kt-selector}{.metadata.annotations.kt-lock}",
        );
        assert_eq!(
            kt_annotations, "",
            "{service}: kt-selector and kt-lock removed"
        );
    }
    assert_eq!(field(tb, "deploy/goscale", "{.spec.replicas}"), "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn recover_and_clean_put_back_what_killed_ktctls_and_the_go_ktctl_left() {
    let tb = start_testbed(true).await;
    deploy_web(&tb);
    let web_before = service_state(&tb, "web");
    let _app = workstation::http_echo(&tb, 18090).await;

    let (code, err) = ktctl_once(&tb, &[], &["recover", "nosuch"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("ERR Exit: ") && err.contains("service 'nosuch' not found"),
        "{err}"
    );
    let (code, err) = ktctl_once(&tb, &[], &["recover", "web"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("Service web is clean and tidy, nothing would be done"),
        "{err}"
    );

    // The Go ktctl's layouts: birdseye, clean --dryRun, clean.
    apply(&tb.kubeconfig, &go_leftovers());
    let (code, out, err) = ktctl_out(&tb, &[], &["birdseye", "--hideNaturalService"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        out,
        "---- Service in namespace default ----\n\
         > goscale - exchanged by [gopher]\n\
         > gosel - exchanged by [gopher]\n\
         > gomesh - meshed (auto) by [gopher]\n\
         > gomanual - meshed (manual) by [gopher]\n"
    );
    // A mistyped namespace is an error, not an empty report.
    let (code, out, err) = ktctl_out(&tb, &[], &["birdseye", "-n", "nosuchns"]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.contains("namespace 'nosuchns' not found"), "{err}");
    let (_, out, _) = ktctl_out(&tb, &[], &["birdseye", "--sortBy", "name"]);
    let listed: Vec<&str> = out.lines().skip(1).collect();
    assert_eq!(
        listed,
        [
            "> gomanual - meshed (manual) by [gopher]",
            "> gomesh - meshed (auto) by [gopher]",
            "> goscale - exchanged by [gopher]",
            "> gosel - exchanged by [gopher]",
            "> kubernetes - normal",
            "> web - normal",
        ],
        "{out}"
    );

    let before = cluster_state(&tb);
    let (code, err) = ktctl_once(&tb, &[], &["clean", "--dryRun"]);
    assert_eq!(code, Some(0), "{err}");
    for line in [
        "Find 5 unavailing pods to delete:",
        " * gomesh-kt-router",
        " * gomanual-kt-mesh-vman",
        "Find 1 unavailing config maps to delete:",
        "Find 2 unavailing services to delete:",
        " * gomesh-kt-stuntman",
        "Find 1 deployments to scale back:",
        " * goscale (to 2 replicas)",
        "Find 2 services to recover:",
        "Find 1 services to unlock:",
    ] {
        assert!(err.contains(line), "{line:?} missing: {err}");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(cluster_state(&tb), before, "--dryRun changed the cluster");

    let (code, err) = ktctl_once(&tb, &[], &["clean"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("Deleting 5 unavailing kt pods") && err.contains("Done"),
        "{err}"
    );
    go_leftovers_restored(&tb).await;
    let (_, err) = ktctl_once(&tb, &[], &["clean"]);
    assert!(
        err.contains("No unavailing kt resource found (^.^)YYa!!"),
        "{err}"
    );

    // The same layouts again, put back one Service at a time by recover.
    apply(&tb.kubeconfig, &go_leftovers());
    for (service, state) in [
        ("gosel", "exchanged"),
        ("goscale", "exchanged"),
        ("gomesh", "meshed"),
        ("gomanual", "meshed"),
    ] {
        let (code, err) = ktctl_once(&tb, &[], &["recover", service]);
        assert_eq!(code, Some(0), "{err}");
        assert!(
            err.contains(&format!("Service {service} is {state}, recovering")),
            "{err}"
        );
    }
    go_leftovers_restored(&tb).await;

    // kt's own, left by kill -9: put back by recover, then by clean.
    let runs: [(&[&str], &str, &str); 3] = [
        (
            &[
                "exchange", "web", "--expose", "18090:80", "--mode", "selector",
            ],
            "will be redirected to local",
            "exchanged",
        ),
        (
            &[
                "exchange",
                "web",
                "--expose",
                "18090:80",
                "--mode",
                "scale",
                "--recoverWaitTime",
                "30",
            ],
            "will be redirected to local",
            "exchanged",
        ),
        (
            &[
                "mesh",
                "web",
                "--expose",
                "18090:8080",
                "--mode",
                "auto",
                "--versionMark",
                "v1",
            ],
            "Now you can access your service by header",
            "meshed",
        ),
    ];
    for fixer in ["recover", "clean"] {
        for (args, banner, state) in runs {
            let mut run = Background::ktctl_with_env(&tb, &["USER=alice"], args);
            run.wait_for(banner).await;
            run.kill();
            let left = (
                service_state(&tb, "web"),
                field(&tb, "deploy/web", "{.spec.replicas}"),
            );
            assert!(
                left.0 != web_before || left.1 == "0",
                "{args:?}: the killed run left web as it was: {left:?}"
            );
            let (code, err) = if fixer == "recover" {
                ktctl_once(&tb, &[], &["recover", "web"])
            } else {
                // Heartbeats are at least a second old now: stale with a zero threshold.
                tokio::time::sleep(Duration::from_millis(1100)).await;
                ktctl_once(&tb, &[], &["clean", "--thresholdInMinus=0"])
            };
            assert_eq!(code, Some(0), "{fixer} after {args:?}: {err}");
            if fixer == "recover" {
                assert!(
                    err.contains(&format!("Service web is {state}, recovering")),
                    "{err}"
                );
                assert!(
                    err.contains("of alice is still alive"),
                    "a fresh heartbeat is named: {err}"
                );
            } else {
                assert!(
                    err.contains("Removed pid file") && err.contains("Removed key file"),
                    "the killed run's local files go: {err}"
                );
            }
            eventually(
                format!("{fixer} puts web back after {args:?}"),
                async || {
                    seen(
                        (
                            service_state(&tb, "web"),
                            field(&tb, "deploy/web", "{.spec.replicas}"),
                            kt_objects(&tb),
                        ),
                        |(svc, replicas, kt)| {
                            *svc == web_before && replicas == "2" && kt.is_empty()
                        },
                    )
                },
            )
            .await;
        }
    }
    kubectl_ok(
        &tb.kubeconfig,
        &["rollout", "status", "deploy/web", "--timeout=60s"],
    );
    tb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn birdseye_names_live_holders_and_clean_an_hour_ahead_deletes_only_leftovers() {
    let tb = start_testbed(true).await;
    deploy_web(&tb);
    install_agent(&tb);
    apply(
        &tb.kubeconfig,
        "apiVersion: v1\nkind: Service\nmetadata: {name: web2}\nspec:\n  selector: {app: web}\n  ports: [{name: http, port: 80, targetPort: http}]\n",
    );
    let _apps = [
        workstation::http_echo(&tb, 18090).await,
        workstation::http_echo(&tb, 18091).await,
        workstation::http_echo(&tb, 18092).await,
    ];
    let ktctl = bins::ktctl();
    let start = |user: &str, args: &[&str]| {
        Background::ktctl_with_env(&tb, &[&format!("USER={user}")], args)
    };
    let mut alice = start(
        "alice",
        &[
            "exchange", "web", "--expose", "18090:80", "--mode", "selector",
        ],
    );
    alice.wait_for("will be redirected to local").await;
    let mut bob = start(
        "bob",
        &[
            "mesh",
            "web2",
            "--expose",
            "18091:8080",
            "--versionMark",
            "bob1",
        ],
    );
    bob.wait_for("Now you can access your service by header")
        .await;
    let mut carol = start("carol", &["preview", "pv", "--expose", "18092"]);
    carol
        .wait_for("Now you can access your local service in cluster by name 'pv'")
        .await;

    // Leftovers: the Go ktctl's dead shadow, a connect shadow of frank's two minutes old, and
    // a session whose lease ended an hour ago.
    let two_minutes_ago = (chrono::Utc::now().timestamp() - 125).to_string();
    apply(
        &tb.kubeconfig,
        &format!(
            r#"
apiVersion: v1
kind: Pod
metadata:
  name: old-kt-exchange-zzzzz
  labels: {{control-by: kt, kt-role: shadow-exchange}}
  annotations: {{kt-user: gopher, kt-last-heart-beat: "{OLD}"}}
spec: {{containers: [{{name: standalone, image: kt-testbed/sleep}}]}}
---
apiVersion: v1
kind: Pod
metadata:
  name: kt-connect-shadow-frank
  labels: {{control-by: kt, kt-role: shadow-connect}}
  annotations: {{kt-user: frank, kt-last-heart-beat: "{two_minutes_ago}"}}
spec: {{containers: [{{name: standalone, image: kt-testbed/sleep}}]}}
"#
        ),
    );
    let sessions: Api<KtSession> = Api::namespaced(tb.client().await, "default");
    let dead: KtSession = serde_json::from_value(json!({
        "apiVersion": "kt.dev/v1alpha1", "kind": "KtSession",
        "metadata": {"name": "gone-kt-deadd", "namespace": "default"},
        "spec": {"owner": "dan@old", "mode": "exchange", "service": "gone",
                 "ports": [{"port": 80, "localPort": 80}], "publicKey": "ssh-ed25519 AAAA dan"},
    }))
    .expect("session parses");
    sessions
        .create(&PostParams::default(), &dead)
        .await
        .expect("session created");
    let hour_ago = chrono::Utc::now() - chrono::TimeDelta::hours(1);
    sessions
        .patch_status(
            "gone-kt-deadd",
            &PatchParams::default(),
            &Patch::Merge(&json!({"status": {"renewTime": hour_ago, "node": "node-1"}})),
        )
        .await
        .expect("status written");

    let (code, out, err) = ktctl_out(&tb, &[], &["birdseye", "--showConnector"]);
    assert_eq!(code, Some(0), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "---- Service in namespace default ----", "{out}");
    let expected = [
        "> web - exchanged by [alice]",
        "> web2 - meshed (agent) by [bob@",
        "> kubernetes - normal",
        "> pv - previewing by [carol@",
    ];
    for (line, wanted) in lines[1..5].iter().zip(expected) {
        assert!(line.starts_with(wanted), "{wanted:?} in order: {out}");
    }
    assert_eq!(
        &lines[5..],
        [
            "---- User connecting to cluster ----",
            "> frank (last active 2 min ago)",
            "1 users in total",
        ],
        "{out}"
    );
    let (_, out, _) = ktctl_out(&tb, &[], &["birdseye", "--hideNaturalService"]);
    assert!(
        !out.contains("kubernetes") && out.lines().count() == 4,
        "{out}"
    );

    let shadow = kubectl_ok(
        &tb.kubeconfig,
        &["get", "pods", "-l", "kt-role=shadow-exchange", "-o", "name"],
    );
    let alice_shadow = shadow
        .lines()
        .find(|p| p.starts_with("pod/web-kt-exchange-"))
        .expect("alice's shadow")
        .trim_start_matches("pod/")
        .to_owned();
    let live_sessions = || kubectl_ok(&tb.kubeconfig, &["get", "ktsessions", "-o", "name"]);
    assert_eq!(
        live_sessions().lines().count(),
        3,
        "bob's, carol's and the dead one"
    );
    let web_during = service_state(&tb, "web");

    // An hour ahead: with its own clock, clean would take every live object for dead …
    let ahead = |args: &[&str]| {
        let mut all = vec![
            "FAKETIME_DONT_FAKE_MONOTONIC=1",
            "faketime",
            "-m",
            "-f",
            "+1h",
            bins::utf8(&ktctl),
        ];
        all.extend_from_slice(args);
        let out = workstation::exec(&tb)
            .arg("env")
            .args(&all)
            .output()
            .expect("faketime ktctl runs");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = ahead(&["clean", "--dryRun", "--useLocalTime"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains(&format!(" * {alice_shadow}")),
        "the fake clock is in effect (local time sees alice's shadow as dead): {err}"
    );
    // … by the cluster's clock, only the leftovers go.
    let (code, err) = ahead(&["clean"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("Deleting 1 unavailing kt pods")
            && err.contains("Deleting 1 unavailing kt sessions"),
        "{err}"
    );
    eventually("the leftovers are gone", async || {
        seen((kt_objects(&tb), live_sessions()), |(objects, sessions)| {
            !objects.contains("old-kt-exchange-zzzzz") && !sessions.contains("gone-kt-deadd")
        })
    })
    .await;
    let objects = kt_objects(&tb);
    assert!(
        objects.contains(&alice_shadow) && objects.contains("kt-connect-shadow-frank"),
        "live shadows stay: {objects}"
    );
    assert_eq!(live_sessions().lines().count(), 2, "bob's and carol's stay");
    assert_eq!(
        service_state(&tb, "web"),
        web_during,
        "alice's exchange stays"
    );

    for run in [alice, bob, carol] {
        let (status, log) = run.interrupt();
        assert!(status.success(), "{log}");
    }
    tb.stop().await;
}
