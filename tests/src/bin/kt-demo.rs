//! The README demo (root): `ktctl exchange` in agent mode on the simulated cluster.
//!
//! Brings up a two-node testbed, installs kt's agent from `deploy/` with kubectl, runs `web`
//! (two replicas, one per node) and a client pod on each node, exchanges `web` to a server
//! on the workstation, shows both clients answered locally, ends the exchange, shows the pods
//! answering again, and tears everything down (namespaces and cgroups named `ktt-*`).
//! Exits 1 when the exchange does not redirect both clients or does not give them back.

use std::{process::ExitCode, time::Duration};

use kt_testbed::cluster::Testbed;
use kt_tests::harness::{
    self,
    apps::{
        answered_by, deploy_client_2, deploy_web, install_agent, start_testbed,
        until_all_answered_by,
    },
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

    println!("== tearing the cluster down");
    tb.stop().await;
    println!("== done");
    failures
}
