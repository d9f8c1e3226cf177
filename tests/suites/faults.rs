//! Faults (issue 16, item 1), each injected for real on the testbed while kt carries
//! traffic (exchange, mesh and connect), with the behaviour kt promises after it: the
//! scenarios of `kt_tests::harness::faults`, run once each. How long recovery took is
//! printed; the `faults` benchmark reports medians. No time is a pass/fail condition here,
//! only a generous bound on waiting.

use kt_tests::harness::faults::{
    Probed, api_server_stopped_under_a_mesh_and_connect, api_server_stopped_under_an_exchange,
    direct_path_black_holed, every_port_forward_stream_dropped, holding_agent_killed,
    node_removed_for_good,
};

/// `ktctl forward` and a shadow-mode `ktctl exchange`, both over the API server's
/// port-forward, come back each of three times every port-forward stream is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn every_port_forward_stream_dropped_forward_and_exchange_come_back() {
    every_port_forward_stream_dropped(3).await;
}

/// An agent-mode exchange goes on through a 30 s API server outage, and a `kill -9` of
/// ktctl during a second one reverts within the lease once the API server is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn the_api_server_stopped_for_30_s_keeps_an_agent_exchange_and_a_killed_ktctl_reverts() {
    let probed = Probed::start().await;
    api_server_stopped_under_an_exchange(&probed).await;
    probed.tb.stop().await;
}

/// An agent-mode mesh and connect go on through a 30 s API server outage, and a `kill -9`
/// of the mesh's ktctl during a second one reverts the header route within the lease once
/// the API server is back, connect untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn the_api_server_stopped_for_30_s_keeps_an_agent_mesh_and_connect_and_a_killed_mesh_reverts()
{
    let probed = Probed::start().await;
    api_server_stopped_under_a_mesh_and_connect(&probed).await;
    probed.tb.stop().await;
}

/// The holding agent killed mid-transfer fails open on its node, and its replacement
/// redirects again with nothing done by the user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn the_holding_agent_killed_mid_transfer_fails_open_and_its_replacement_redirects_again() {
    let probed = Probed::start().await;
    let exchange = probed.exchange().await;
    holding_agent_killed(&probed, &exchange).await;
    let (status, log) = exchange.interrupt();
    assert!(status.success(), "{log}");
    probed.tb.stop().await;
}

/// The direct path black-holed: ktctl moves the exchange to the port-forward by itself and
/// the agent keeps only the newer connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn the_direct_path_black_holed_moves_the_exchange_to_the_port_forward() {
    let probed = Probed::start().await;
    direct_path_black_holed(&probed).await;
    probed.tb.stop().await;
}

/// The holding agent's node removed for good: the session moves to the other agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn a_node_removed_for_good_moves_its_sessions_to_the_other_agent() {
    node_removed_for_good().await;
}

/// The takeover rule from the other side (`kt-node-agent/src/agent/takeover.rs`): of two
/// SSH connections of one session, the one this agent accepted later holds it, whichever
/// asks for its listeners first. Played with OpenSSH as the session's client: connection A
/// logs in first and asks for nothing; connection B logs in and holds the Service port
/// (`-R`); then A asks for the same port (through its control socket), as a ktctl
/// connection whose requests were slow would. The agent ends A, not B: B's listener stays
/// the session's, renewal after renewal, and pods still reach the workstation through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn an_older_connection_asking_for_its_listeners_late_is_the_one_closed() {
    use std::path::Path;

    use kt_tests::harness::{
        SSH_THROWAWAY,
        apps::apply,
        eventually::{patience, poll_within},
        kubectl::kubectl_ok,
        workstation::{self, Background},
    };

    let probed = Probed::start().await;
    let tb = &probed.tb;
    let key = tb.dir.join("takeover-key");
    let generated = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "takeover", "-f"])
        .arg(&key)
        .status()
        .expect("ssh-keygen runs");
    assert!(generated.success());
    let public = std::fs::read_to_string(key.with_extension("pub")).expect("public key");
    apply(
        &tb.kubeconfig,
        &format!(
            r#"
apiVersion: kt.dev/v1alpha1
kind: KtSession
metadata: {{name: takeover, namespace: default}}
spec:
  owner: alice@laptop
  mode: exchange
  service: web
  ports: [{{port: 80, localPort: 18090}}]
  publicKey: "{}"
"#,
            public.trim()
        ),
    );
    let node_ip = kubectl_ok(
        &tb.kubeconfig,
        &[
            "get",
            "node",
            "node-1",
            "-o",
            r#"jsonpath={.status.addresses[?(@.type=="InternalIP")].address}"#,
        ],
    );
    let key = key.to_str().expect("UTF-8 path");
    let control = tb.dir.join("takeover-control");
    let control = control.to_str().expect("UTF-8 path");
    let ssh = |extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = ["-N", "-p", "9922", "-l", "default/takeover", "-i", key]
            .into_iter()
            .chain(SSH_THROWAWAY)
            .chain(extra.iter().copied())
            .map(str::to_owned)
            .collect();
        args.push(node_ip.clone());
        args
    };
    let run_ssh = |args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Background::spawn(tb, Path::new("ssh"), &args)
    };
    // A: first, asks for nothing yet.
    let mut older = run_ssh(ssh(&["-M", "-S", control]));
    poll_within(patience(), async || {
        let (ok, out) = workstation::run(tb, &["ssh", "-S", control, "-O", "check", "x"]);
        if ok { Ok(()) } else { Err(out) }
    })
    .await
    .unwrap_or_else(|out| panic!("A never logged in: {out}\n{}", older.log()));
    // B: second, holds port 80.
    let mut newer = run_ssh(ssh(&["-R", "80:127.0.0.1:18090"]));
    let listeners = || {
        kubectl_ok(
            &tb.kubeconfig,
            &[
                "get",
                "kts",
                "takeover",
                "-o",
                "jsonpath={.status.listeners[*].listenerPort}",
            ],
        )
    };
    let held_by_b = poll_within(patience(), async || {
        let l = listeners();
        if l.is_empty() { Err(l) } else { Ok(l) }
    })
    .await
    .unwrap_or_else(|_| panic!("B never held the session: {}", newer.log()));
    probed.until_answered_by_the_workstation(&newer).await;

    // A asks for the same port late.
    let _ = workstation::run(
        tb,
        &[
            "ssh",
            "-S",
            control,
            "-O",
            "forward",
            "-R",
            "80:127.0.0.1:18090",
            "x",
        ],
    );
    let status = tokio::time::timeout(patience(), async {
        loop {
            if let Some(status) = older.try_wait() {
                return status;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the agent did not close A: {}", older.log()));
    eprintln!("A ended ({status}): {}", older.log());
    // Past two renewals (every lease / 3, 3.3 s): B's listener is still the session's.
    tokio::time::sleep(std::time::Duration::from_secs(8)).await; // watching, on purpose
    assert_eq!(listeners(), held_by_b, "the session's listener changed");
    assert!(newer.is_running(), "B was closed: {}", newer.log());
    probed.until_answered_by_the_workstation(&newer).await;
    let agents = probed.agent_logs();
    assert!(
        agents.contains("a newer connection of ktctl holds the session; this one is closed"),
        "{agents}"
    );
    drop(newer);
    probed.tb.stop().await;
}
