//! The README demo (root): a developer's day with ktctl on the simulated cluster, after
//! KT-Connect's own walkthrough.
//!
//! Brings up a two-node testbed, installs kt's agent from `deploy/` with kubectl, runs `web`
//! (two replicas, one per node) and a client pod on each node; then `ktctl connect` (the
//! workstation reaches `web` by name), `ktctl exchange web` (both clients answered by the
//! workstation, then by the pods again), `ktctl mesh web` by two developers with different
//! headers (each header reaches its developer, no header the pods), and `ktctl preview`
//! with a second user's `ktctl forward` to it; and tears everything down (namespaces and
//! cgroups named `ktt-*`). Exits 1 when a step does not do what it says.

use std::{process::ExitCode, time::Duration};

use kt_testbed::cluster::Testbed;
use kt_tests::harness::{
    self,
    apps::{
        answered_by, deploy_client_2, deploy_web, in_pod, install_agent, start_testbed,
        until_all_answered_by,
    },
    bins,
    eventually::poll_within,
    kubectl::kubectl_ok,
    workstation::{self, Background},
};

const LOCAL_PORT: u16 = 18090;
const CLIENTS: [&str; 2] = ["client", "client-2"];

fn main() -> ExitCode {
    if let Some(reason) = harness::ebpf_unsupported_reason() {
        eprintln!("this machine cannot run kt's eBPF redirect: {reason}");
        return ExitCode::FAILURE;
    }
    // SAFETY: getuid has no failure mode.
    if unsafe { libc::getuid() } != 0 {
        eprintln!("the demo needs root (network namespaces, cgroups, eBPF)");
        return ExitCode::FAILURE;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let failures = runtime.block_on(demo());
    if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        for failure in &failures {
            eprintln!("demo failed: {failure}");
        }
        ExitCode::FAILURE
    }
}

/// Who answers `http://web/` from each client pod, one line.
fn show(tb: &Testbed, when: &str) {
    let answers: Vec<String> = CLIENTS
        .iter()
        .map(|pod| {
            let who = answered_by(tb, pod, "http://web/").unwrap_or_else(|| "(no answer)".into());
            format!("{pod} → web: {who}")
        })
        .collect();
    println!("   {when}: {}", answers.join(", "));
}

/// Runs the demo; what went wrong, if anything.
async fn demo() -> Vec<String> {
    let mut failures = Vec::new();
    println!("== a two-node cluster (kt-testbed)");
    let tb = start_testbed(true).await;

    println!("== kt's node agent from deploy/: kubectl apply -k deploy/");
    install_agent(&tb);
    println!("== web: two replicas, one per node; a client pod on each node");
    deploy_web(&tb);
    deploy_client_2(&tb);
    print!(
        "{}",
        kubectl_ok(&tb.kubeconfig, &["get", "pods", "-o", "wide"])
    );
    show(&tb, "before");

    println!("== on the workstation: a local web server on port {LOCAL_PORT}");
    let _local = workstation::http_echo(&tb, LOCAL_PORT).await;
    println!("== ktctl exchange web --expose {LOCAL_PORT}:80");
    let expose = format!("{LOCAL_PORT}:80");
    let mut exchange = Background::ktctl(&tb, &["exchange", "web", "--expose", &expose]);
    exchange.wait_for("will be redirected to local").await;
    for line in exchange.log().lines() {
        println!("   | {line}");
    }
    let urls = ["http://web/".to_owned()];
    if let Err(wrong) = until_all_answered_by(
        &tb,
        &CLIENTS,
        &urls,
        |who| who == "workstation",
        Duration::from_secs(10),
    )
    .await
    {
        println!("   not redirected: {wrong}");
        failures.push(format!("not redirected: {wrong}"));
    }
    show(&tb, "exchanged");
    println!(
        "   the Service's selector is untouched: {}",
        kubectl_ok(
            &tb.kubeconfig,
            &["get", "svc", "web", "-o", "jsonpath={.spec.selector}"]
        )
    );

    println!("== Ctrl-C ends the exchange");
    let (_, log) = exchange.interrupt();
    for line in log
        .lines()
        .rev()
        .take(3)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
    {
        println!("   | {line}");
    }
    if let Err(wrong) = until_all_answered_by(
        &tb,
        &CLIENTS,
        &urls,
        |who| who.starts_with("web-"),
        Duration::from_secs(10),
    )
    .await
    {
        println!("   not restored: {wrong}");
        failures.push(format!("not restored: {wrong}"));
    }
    show(&tb, "after");

    connect(&tb, &mut failures).await;
    mesh(&tb, &mut failures).await;
    preview(&tb, &mut failures).await;

    println!("== tearing the cluster down");
    tb.stop().await;
    println!("== done");
    failures
}

/// `ktctl` run as local user `user` (two developers on one workstation), its log printed
/// once `banner` is out.
async fn ktctl_as(tb: &Testbed, user: &str, args: &[&str], banner: &str) -> Background {
    let ktctl = bins::ktctl();
    let sudo_user = format!("SUDO_USER={user}");
    let mut all = vec![sudo_user.as_str(), bins::utf8(&ktctl)];
    all.extend_from_slice(args);
    println!("== {user}: ktctl {}", args.join(" "));
    let mut running = Background::spawn(tb, std::path::Path::new("env"), &all);
    running.wait_for(banner).await;
    for line in running.log().lines().filter(|l| l.contains("INF")) {
        println!("   | {line}");
    }
    running
}

/// Polls until `check` gives `want`; records a failure named `what` otherwise.
async fn expect(what: &str, want: &str, failures: &mut Vec<String>, check: impl Fn() -> String) {
    let got = poll_within(Duration::from_secs(10), async || {
        let got = check();
        if got == want { Ok(got) } else { Err(got) }
    })
    .await;
    match got {
        Ok(got) => println!("   {what}: {got}"),
        Err(got) => {
            println!("   {what}: {got} (expected {want})");
            failures.push(format!("{what}: {got}, expected {want}"));
        }
    }
}

/// The `pod=` name of an answer.
fn pod_of(text: &str) -> String {
    text.lines()
        .next()
        .unwrap_or("(no answer)")
        .trim_start_matches("pod=")
        .to_owned()
}

/// `sudo ktctl connect`: the workstation reaches `web` by name.
async fn connect(tb: &Testbed, failures: &mut Vec<String>) {
    let running = ktctl_as(tb, "alice", &["connect"], "All looks good").await;
    let (_, page) = workstation::run(tb, &["curl", "-s", "--max-time", "3", "http://web/"]);
    let who = pod_of(&page);
    println!("   workstation → http://web/: {who}");
    if !who.starts_with("web-") {
        failures.push(format!(
            "connect: the workstation got {who:?} for http://web/"
        ));
    }
    let _ = running.interrupt();
}

/// Two developers mesh `web` with their own headers.
async fn mesh(tb: &Testbed, failures: &mut Vec<String>) {
    let _alice_app = workstation::named_http_echo(tb, 18091, "alice's laptop").await;
    let _bob_app = workstation::named_http_echo(tb, 18092, "bob's laptop").await;
    let banner = "Now you can access your service by header";
    let alice = ktctl_as(
        tb,
        "alice",
        &[
            "mesh",
            "web",
            "--expose",
            "18091:8080",
            "--versionMark",
            "alice",
        ],
        banner,
    )
    .await;
    let bob = ktctl_as(
        tb,
        "bob",
        &[
            "mesh",
            "web",
            "--expose",
            "18092:8080",
            "--versionMark",
            "bob",
        ],
        banner,
    )
    .await;
    for (header, want) in [
        ("version: alice", "alice's laptop"),
        ("version: bob", "bob's laptop"),
    ] {
        for pod in CLIENTS {
            expect(
                &format!("{pod} → web with '{header}'"),
                want,
                failures,
                || {
                    pod_of(
                        &in_pod(
                            tb,
                            pod,
                            &["curl", "-s", "--max-time", "3", "-H", header, "http://web/"],
                        )
                        .1,
                    )
                },
            )
            .await;
        }
    }
    let plain = pod_of(
        &in_pod(
            tb,
            "client",
            &["curl", "-s", "--max-time", "3", "http://web/"],
        )
        .1,
    );
    println!("   client → web without a header: {plain}");
    if !plain.starts_with("web-") {
        failures.push(format!(
            "mesh: a request without a header reached {plain:?}"
        ));
    }
    for running in [alice, bob] {
        let _ = running.interrupt();
    }
}

/// Alice previews a local service as `web-v2`; bob forwards a local port to it.
async fn preview(tb: &Testbed, failures: &mut Vec<String>) {
    let _app = workstation::named_http_echo(tb, 18093, "alice's web-v2").await;
    let preview = ktctl_as(
        tb,
        "alice",
        &["preview", "web-v2", "--expose", "18093:80"],
        "Now you can access your local service in cluster by name 'web-v2'",
    )
    .await;
    expect(
        "client → http://web-v2/",
        "alice's web-v2",
        failures,
        || {
            pod_of(
                &in_pod(
                    tb,
                    "client",
                    &["curl", "-s", "--max-time", "3", "http://web-v2/"],
                )
                .1,
            )
        },
    )
    .await;
    let forward = ktctl_as(
        tb,
        "bob",
        &["forward", "web-v2", "6060:80"],
        "Now you can access port 80 of service 'web-v2' via 'localhost:6060'",
    )
    .await;
    expect(
        "bob's workstation → localhost:6060",
        "alice's web-v2",
        failures,
        || {
            pod_of(
                &workstation::run(
                    tb,
                    &["curl", "-s", "--max-time", "3", "http://localhost:6060/"],
                )
                .1,
            )
        },
    )
    .await;
    for running in [forward, preview] {
        let _ = running.interrupt();
    }
}
