//! `ktctl preview` (root, on the testbed): a workstation port published as a Service —
//! several ports, reached from pods on both nodes and through a second user's
//! `ktctl forward` — in agent mode (a selector-less Service and an EndpointSlice owned by
//! the session) and in v0.3.7's shadow mode; Ctrl-C and `kill -9` leave nothing behind; a
//! name that is someone else's Service is refused.

use std::time::Duration;

use kt_testbed::cluster::Testbed;
use kt_tests::harness::{
    apps::{deploy_client_2, deploy_web, in_pod, install_agent, start_testbed},
    eventually::poll_within,
    kubectl::{kubectl, kubectl_ok},
    workstation::{self, Background, ktctl_once},
};

const CLIENTS: [&str; 2] = ["client", "client-2"];

/// `ktctl preview ARGS`, once its banner is out.
async fn preview(tb: &Testbed, args: &[&str]) -> Background {
    let mut all = vec!["preview"];
    all.extend_from_slice(args);
    let mut running = Background::ktctl(tb, &all);
    running
        .wait_for("Now you can access your local service in cluster by name")
        .await;
    running
}

/// The `pod=` name an HTTP GET of `url` from `pod` answers.
fn who(tb: &Testbed, pod: &str, url: &str) -> String {
    let (_, out) = in_pod(tb, pod, &["curl", "-s", "--max-time", "3", url]);
    out.lines()
        .next()
        .unwrap_or_default()
        .trim_start_matches("pod=")
        .to_owned()
}

/// What is left of the preview `name`: its Service, EndpointSlices, sessions and shadows.
fn leftovers(tb: &Testbed, name: &str) -> Vec<String> {
    let mut left = Vec::new();
    if kubectl(&tb.kubeconfig, &["get", "svc", name])
        .status
        .success()
    {
        left.push(format!("service {name}"));
    }
    let listed = |args: &[&str]| {
        kubectl_ok(&tb.kubeconfig, args)
            .split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let selector = format!("kubernetes.io/service-name={name}");
    left.extend(listed(&[
        "get",
        "endpointslices",
        "-l",
        &selector,
        "-o",
        "name",
    ]));
    // Without the agent the CRD is not installed and there are no sessions.
    let sessions = kubectl(&tb.kubeconfig, &["get", "kts", "-o", "name"]);
    left.extend(
        String::from_utf8_lossy(&sessions.stdout)
            .split_whitespace()
            .map(str::to_owned),
    );
    left.extend(listed(&[
        "get",
        "pods",
        "-l",
        "kt-role=shadow-preview",
        "-o",
        "name",
    ]));
    left
}

/// Polls until nothing of the preview `name` is left within `within`; how long it took.
async fn until_gone(tb: &Testbed, name: &str, within: Duration) -> Duration {
    let started = std::time::Instant::now();
    poll_within(within, async || {
        let left = leftovers(tb, name);
        if left.is_empty() { Ok(()) } else { Err(left) }
    })
    .await
    .unwrap_or_else(|left| panic!("left after {within:?}: {left:?}"));
    started.elapsed()
}

/// Polls until both client pods get `expected` for every URL.
async fn until_reached(tb: &Testbed, urls: &[(&str, &str)], log: &Background) {
    poll_within(Duration::from_secs(15), async || {
        let mut wrong = Vec::new();
        for pod in CLIENTS {
            for (url, expected) in urls {
                let got = who(tb, pod, url);
                if got != *expected {
                    wrong.push(format!("{pod} → {url}: {got:?}"));
                }
            }
        }
        if wrong.is_empty() { Ok(()) } else { Err(wrong) }
    })
    .await
    .unwrap_or_else(|wrong| panic!("{wrong:?}\n{}", log.log()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn agent_preview_publishes_every_port_for_pods_and_forward_and_leaves_nothing() {
    let tb = start_testbed(true).await;
    deploy_web(&tb);
    deploy_client_2(&tb);
    install_agent(&tb);
    let _web = workstation::named_http_echo(&tb, 18080, "local-web").await;
    let _admin = workstation::named_http_echo(&tb, 19090, "local-admin").await;

    let running = preview(&tb, &["nginx-v2", "--expose", "18080:80,19090:90"]).await;
    assert!(
        running.log().contains("Using agent mode"),
        "{}",
        running.log()
    );
    until_reached(
        &tb,
        &[
            ("http://nginx-v2/", "local-web"),
            (
                "http://nginx-v2.default.svc.cluster.local:90/",
                "local-admin",
            ),
        ],
        &running,
    )
    .await;
    let selector = kubectl_ok(
        &tb.kubeconfig,
        &["get", "svc", "nginx-v2", "-o", "jsonpath={.spec.selector}"],
    );
    assert_eq!(selector, "", "the preview Service selects no pods");

    // A second developer forwards a local port to the preview.
    let mut forward = Background::ktctl(&tb, &["forward", "nginx-v2", "6060:80"]);
    forward
        .wait_for("Now you can access port 80 of service 'nginx-v2' via 'localhost:6060'")
        .await;
    let (ok, page) = workstation::run(
        &tb,
        &["curl", "-s", "--max-time", "3", "http://localhost:6060/"],
    );
    assert!(
        ok && page.starts_with("pod=local-web"),
        "{page}\n{}",
        forward.log()
    );
    let (status, log) = forward.interrupt();
    assert!(status.success(), "{log}");

    // Ctrl-C removes the Service, its EndpointSlice and the session.
    let (status, log) = running.interrupt();
    assert!(status.success(), "{log}");
    assert!(log.contains("Cleaning service nginx-v2"), "{log}");
    until_gone(&tb, "nginx-v2", Duration::from_secs(10)).await;

    // kill -9: the agents end the unheld session within its lease (10 s), and the
    // Service and EndpointSlice go with it.
    let running = preview(&tb, &["nginx-v2", "--expose", "18080:80"]).await;
    until_reached(&tb, &[("http://nginx-v2/", "local-web")], &running).await;
    running.kill();
    let took = until_gone(&tb, "nginx-v2", Duration::from_secs(30)).await;
    eprintln!("preview objects gone {took:?} after kill -9");
    tb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn shadow_preview_without_the_agent_and_bad_input() {
    let tb = start_testbed(true).await;
    deploy_web(&tb);
    deploy_client_2(&tb);
    let _web = workstation::named_http_echo(&tb, 18080, "local-web").await;

    // Bad input: nothing is created.
    let cases: [(&[&str], &str); 5] = [
        (
            &["preview", "Nginx_V2", "--expose", "18080:80"],
            "invalid service name 'Nginx_V2'",
        ),
        (
            &["preview", "web", "--expose", "18080:80"],
            "service 'web' already exists and was not created by kt",
        ),
        (
            &["preview", "x", "--expose", "18080:80,18081:80"],
            "port 80 given twice",
        ),
        (
            &["preview", "x", "--expose", "eighty"],
            "invalid --expose 'eighty'",
        ),
        (
            &["preview", "x", "--expose", "18099"],
            "no application is running on port 18099",
        ),
    ];
    for (args, needle) in cases {
        let (code, err) = ktctl_once(&tb, &[], args);
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    assert_eq!(leftovers(&tb, "x"), Vec::<String>::new());

    // No agent installed: v0.3.7's shadow and Service.
    let running = preview(&tb, &["nginx-v2", "--expose", "18080:80"]).await;
    let log = running.log();
    assert!(
        log.contains("Using shadow mode") && log.contains("Forward remote nginx-v2-kt-"),
        "{log}"
    );
    until_reached(&tb, &[("http://nginx-v2/", "local-web")], &running).await;
    let (code, err) = ktctl_once(&tb, &[], &["preview", "nginx-v2", "--expose", "18080:80"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("service 'nginx-v2' is already previewed by"),
        "{err}"
    );
    let (status, log) = running.interrupt();
    assert!(status.success(), "{log}");
    until_gone(&tb, "nginx-v2", Duration::from_secs(30)).await;
    tb.stop().await;
}
