//! Faults (issue 16, item 1), each injected for real on the testbed while kt carries
//! traffic, with the behaviour kt promises after it. How long recovery took is printed
//! (`recovered … after`), not yet written to a benchmark; no time is a pass/fail condition
//! here, only a generous bound on waiting.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kt_testbed::cluster::Testbed;
use kt_tests::harness::{
    apps::{
        agent_pid, apply, deploy_client_2, deploy_web, in_client, install_agent, start_testbed,
        until_all_answered_by, web_pods,
    },
    eventually::patience,
    kubectl::kubectl_ok,
    workstation::{self, Background},
};

/// The client pods, one per node.
const CLIENTS: [&str; 2] = ["client", "client-2"];

/// Milliseconds since the Unix epoch by the wall clock, which the host, the workstation and
/// the pods share (one kernel): a fault's start here and a success stamped inside a
/// namespace can be subtracted.
fn epoch_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_millis()
}

/// A shell loop that retries `request` (a command whose stdout must contain `expect`)
/// every 50 ms until it does, then prints the wall-clock millisecond of that success; gives
/// up (exit 1) after `patience` seconds.
fn until_answered(request: &str, expect: &str) -> String {
    let tries = patience().as_millis() / 50;
    format!(
        "i=0; until {request} 2>/dev/null | grep -q '{expect}'; do i=$((i+1)); \
         [ $i -ge {tries} ] && exit 1; sleep 0.05; done; date +%s%3N"
    )
}

/// How long after `fault_ms` the success stamped by [`until_answered`] in `out` came.
fn after(fault_ms: u128, what: &str, (ok, out): (bool, String)) -> Duration {
    assert!(ok, "{what} did not come back: {out}");
    let at: u128 = out
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{what}: {out:?}"));
    Duration::from_millis(u64::try_from(at.saturating_sub(fault_ms)).expect("a sane time"))
}

/// What [`agent_exchange_with_probers`] set up.
struct AgentExchange {
    tb: Testbed,
    /// The names of `web`'s pods.
    web: std::collections::HashSet<String>,
    /// The workstation's server the exchange sends to (alive while held).
    app: Background,
    /// `ktctl exchange web --mode agent`, redirecting.
    exchange: Background,
    /// The exchanged Service's URL, as the clients ask it.
    urls: [String; 1],
}

/// A testbed with `web`, a client and a prober pod on each node and the agent, and alice's
/// agent-mode exchange of `web` to the workstation's server, answered by the workstation
/// from both clients.
async fn agent_exchange_with_probers() -> AgentExchange {
    let tb = start_testbed(true).await;
    deploy_web(&tb);
    deploy_client_2(&tb);
    install_agent(&tb);
    let web = web_pods(&tb);
    for node in [1, 2] {
        apply(&tb.kubeconfig, &prober(node));
    }
    kubectl_ok(
        &tb.kubeconfig,
        &[
            "wait",
            "--for=condition=Ready",
            "pod/prober-1",
            "pod/prober-2",
            "--timeout=60s",
        ],
    );
    let app = workstation::http_echo(&tb, 18090).await;
    let mut exchange = Background::ktctl_with_env(
        &tb,
        &["USER=alice"],
        &["exchange", "web", "--expose", "18090:80", "--mode", "agent"],
    );
    exchange
        .wait_for(" Now all request to service 'web' will be redirected to local")
        .await;
    let urls = ["http://web/".to_owned()];
    until_all_answered_by(&tb, &CLIENTS, &urls, |who| who == "workstation", patience())
        .await
        .unwrap_or_else(|wrong| panic!("{wrong}\n{}", exchange.log()));
    AgentExchange {
        tb,
        web,
        app,
        exchange,
        urls,
    }
}

/// A Service of the `web` pods besides `web`.
const WEB_DIRECT: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web-direct}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
"#;

/// `ktctl forward` (workstation → cluster) and a shadow-mode `ktctl exchange` (cluster →
/// workstation, `--mode selector`) both run over the API server's port-forward. The API
/// server then drops every port-forward stream at once, as its restart or a proxy timeout
/// does, three times: each time the next request through the forward and the next request
/// from a pod to the exchanged Service go through again, with nothing done by the user —
/// ktctl reconnects its SSH connections and asks for its reverse tunnels again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn every_port_forward_stream_dropped_forward_and_exchange_come_back() {
    let tb = start_testbed(true).await;
    deploy_web(&tb);
    // A second Service of the web pods, for the forward: `web` itself is exchanged.
    apply(&tb.kubeconfig, WEB_DIRECT);
    let _app = workstation::http_echo(&tb, 18090).await;
    let mut forward = Background::ktctl(&tb, &["forward", "web-direct", "18080:80"]);
    let mut exchange = Background::ktctl_with_env(
        &tb,
        &["USER=alice"],
        &[
            "exchange", "web", "--expose", "18090:80", "--mode", "selector",
        ],
    );
    forward.ready().await;
    exchange
        .wait_for(" Now all request to service 'web' will be redirected to local")
        .await;
    let forwarded = until_answered("curl -s --max-time 1 http://127.0.0.1:18080/", "pod=web-");
    let exchanged = until_answered("curl -s --max-time 1 http://web/", "pod=workstation");
    let both = |tb: &Testbed| {
        std::thread::scope(|s| {
            let f = s.spawn(|| workstation::run(tb, &["sh", "-c", &forwarded]));
            let e = s.spawn(|| in_client(tb, &["sh", "-c", &exchanged]));
            (
                f.join().expect("forward probe"),
                e.join().expect("exchange probe"),
            )
        })
    };
    let (f, e) = both(&tb);
    assert!(f.0 && e.0, "before the fault: {f:?} {e:?}");

    for round in 1..=3 {
        let lost_before = exchange.log().matches(" lost").count();
        let fault = epoch_ms();
        tb.api.drop_streams();
        let (f, e) = tokio::task::block_in_place(|| both(&tb));
        let forward_took = after(fault, "the forward", f);
        let exchange_took = after(fault, "the exchange", e);
        eprintln!(
            "round {round}: every port-forward stream dropped; recovered: forward after \
             {forward_took:?}, exchange after {exchange_took:?}"
        );
        // The fault was real: the exchange's reverse tunnel saw its SSH connection go (the
        // forward's connection is only noticed by the next request, which it retries).
        assert!(
            exchange.log().matches(" lost").count() > lost_before,
            "round {round}: the exchange never lost its connection: {}",
            exchange.log()
        );
    }
    let (status, log) = forward.interrupt();
    assert!(status.success(), "{log}");
    let (status, log) = exchange.interrupt();
    assert!(status.success(), "{log}");
    tb.stop().await;
}

/// How long the API server is stopped (issue 16: "stopped for 30 s").
const OUTAGE: Duration = Duration::from_secs(30);

/// A pod on `node` that asks `http://web/` every 200 ms and logs `<epoch ms> <first line
/// of the answer>` (an empty answer when nothing answered): a record of what pods saw that
/// needs no API server while it is taken (`kubectl exec` does), read with `kubectl logs`.
fn prober(node: u8) -> String {
    format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: prober-{node}}}
spec:
  nodeSelector: {{kubernetes.io/hostname: node-{node}}}
  containers:
  - name: p
    image: kt-testbed/sleep
    command: [sh, -c, 'while true; do echo "$(date +%s%3N) $(curl -s --max-time 1 http://web/ | head -n 1)"; sleep 0.2; done']
"#
    )
}

/// The probes of `prober-<node>` stamped within `from..=to` (epoch ms): (stamp, answer).
fn probes(tb: &Testbed, node: u8, from: u128, to: u128) -> Vec<(u128, String)> {
    kubectl_ok(&tb.kubeconfig, &["logs", &format!("prober-{node}")])
        .lines()
        .filter_map(|line| {
            let (at, answer) = line.split_once(' ').unwrap_or((line, ""));
            Some((at.parse().ok()?, answer.trim().to_owned()))
        })
        .filter(|(at, _)| (from..=to).contains(at))
        .collect()
}

/// An agent-mode `ktctl exchange` runs while the API server is stopped for 30 s: pods on
/// both nodes are sent to the workstation throughout (the agents judge leases as of when
/// their watch went down, not by a clock that runs on while renewals cannot be seen), and
/// after the API server is back. Then a second outage, during which ktctl is killed with
/// `kill -9`: once the API server is back the agents see the lease no longer renewed, and
/// the pods answer again within the lease, with nothing run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn the_api_server_stopped_for_30_s_keeps_an_agent_exchange_and_a_killed_ktctl_reverts() {
    const LEASE: Duration = Duration::from_secs(10);
    let AgentExchange {
        tb,
        web,
        app: _app,
        exchange,
        urls,
    } = agent_exchange_with_probers().await;

    // First outage: the exchange goes on.
    let down = epoch_ms();
    tb.stop_api();
    tokio::time::sleep(OUTAGE).await; // the outage itself, on purpose
    tb.start_api().await.expect("the API server listens again");
    let up = epoch_ms();
    let back = until_all_answered_by(&tb, &CLIENTS, &urls, |who| who == "workstation", patience())
        .await
        .unwrap_or_else(|wrong| panic!("after the outage: {wrong}\n{}", exchange.log()));
    eprintln!("API server back: every pod answered locally {back:?} later");
    for node in [1, 2] {
        let seen = probes(&tb, node, down, up);
        // 30 s at one probe per ~0.2–1.2 s: far more than 20 unless the prober stalled.
        assert!(seen.len() > 20, "node-{node}: too few probes: {seen:?}");
        let wrong: Vec<_> = seen
            .iter()
            .filter(|(_, who)| who != "pod=workstation")
            .collect();
        assert!(
            wrong.is_empty(),
            "node-{node}: during the outage {} of {} probes were not redirected: {wrong:?}\n{}",
            wrong.len(),
            seen.len(),
            exchange.log()
        );
    }

    // Second outage: ktctl is killed while the API server is away.
    tb.stop_api();
    tokio::time::sleep(Duration::from_secs(2)).await; // into the outage, on purpose
    exchange.kill();
    tokio::time::sleep(OUTAGE - Duration::from_secs(2)).await; // the rest of the outage
    tb.start_api().await.expect("the API server listens again");
    let back = std::time::Instant::now();
    // The lease (10 s) plus the agents' relist back-off (at most 8 s) plus probing slack.
    let reverted = until_all_answered_by(
        &tb,
        &CLIENTS,
        &urls,
        |who| web.contains(who),
        LEASE + Duration::from_secs(20),
    )
    .await
    .unwrap_or_else(|wrong| panic!("after kill -9 during the outage: {wrong}"));
    eprintln!(
        "kill -9 of ktctl during the outage: the pods answered again {reverted:?} after the API \
         server was back ({:?} by the wall clock)",
        back.elapsed()
    );
    tb.stop().await;
}

/// Probes grouped into runs of one answer: (first stamp, answer, how many) — to read what
/// pods saw around a fault.
fn runs(probes: &[(u128, String)]) -> Vec<(u128, String, usize)> {
    let mut runs: Vec<(u128, String, usize)> = Vec::new();
    for (at, who) in probes {
        match runs.last_mut() {
            Some((_, last, n)) if last == who => *n += 1,
            _ => runs.push((*at, who.clone(), 1)),
        }
    }
    runs
}

/// The longest stretch (ms) from `from` during which `probes` went unanswered (an answer
/// `answered` rejects), up to the first answer after it; `probes` in time order.
fn longest_unanswered(
    probes: &[(u128, String)],
    from: u128,
    answered: impl Fn(&str) -> bool,
) -> u128 {
    let (mut longest, mut since) = (0, None);
    for (at, who) in probes {
        match (since, answered(who)) {
            (None, false) => since = Some(*at),
            (Some(start), true) => {
                longest = longest.max(at - start.max(from));
                since = None;
            }
            _ => {}
        }
    }
    if let (Some(start), Some((last, _))) = (since, probes.last()) {
        longest = longest.max(last - start);
    }
    longest
}

/// An agent-mode exchange whose holding agent is killed with `kill -9` while a client pod
/// streams through the redirect: new connections from pods on both nodes are answered again
/// well within the lease — on the holder's node by the real pods at once (the eBPF programs
/// are never pinned, so they go with the process), elsewhere once the session is held again
/// — and the redirect to the workstation is back with nothing done by the user (ktctl
/// reconnects, the DaemonSet's replacement starts). How long each node went unanswered is
/// printed (issue 16's goal: 1 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn the_holding_agent_killed_mid_transfer_fails_open_and_its_replacement_redirects_again() {
    let AgentExchange {
        tb,
        web,
        app: _app,
        exchange,
        urls,
    } = agent_exchange_with_probers().await;
    let holder = kubectl_ok(
        &tb.kubeconfig,
        &["get", "kts", "-o", "jsonpath={.items[0].status.node}"],
    );
    let pid = agent_pid(&tb, &holder).unwrap_or_else(|| panic!("no agent process on {holder:?}"));
    // A transfer in flight through the redirect: a slow upload the local app reads.
    let (tb_ref, transfer) = (
        &tb,
        "head -c 4000000 /dev/zero | curl -s --max-time 20 --limit-rate 200k -X POST --data-binary @- http://web/ >/dev/null; echo transfer-ended",
    );
    let killed = std::thread::scope(|s| {
        let streaming = s.spawn(|| in_client(tb_ref, &["sh", "-c", transfer]));
        std::thread::sleep(Duration::from_secs(2)); // into the transfer, on purpose
        let killed = epoch_ms();
        // SAFETY: signalling the agent process of this test's own testbed.
        assert_eq!(
            unsafe { libc::kill(pid as i32, libc::SIGKILL) },
            0,
            "kill -9 {pid}"
        );
        let _ = streaming.join();
        killed
    });
    // The replacement (the kubelet restarts the container) takes the session again and the
    // pods are sent to the workstation again, with nothing done by the user.
    let back = until_all_answered_by(&tb, &CLIENTS, &urls, |who| who == "workstation", patience())
        .await
        .unwrap_or_else(|wrong| {
            panic!(
                "the redirect did not come back: {wrong}\n{}",
                exchange.log()
            )
        });
    let new_pid = agent_pid(&tb, &holder);
    assert!(
        new_pid.is_some_and(|p| p != pid),
        "no replacement agent on {holder}: {new_pid:?}"
    );
    let now = epoch_ms();
    for node in [1, 2] {
        let seen = probes(&tb, node, killed, now);
        eprintln!(
            "node-{node} after kill -9 of {holder}'s agent at {killed} ms: {:?}",
            runs(&seen)
        );
        let gap = longest_unanswered(&seen, killed, |who| {
            who == "pod=workstation" || web.iter().any(|w| who == format!("pod={w}"))
        });
        eprintln!(
            "node-{node}: new connections unanswered for at most {gap} ms after the kill; \
             redirected to the workstation everywhere {back:?} after it"
        );
        // Well within the 10 s lease: a redirect left to the lease would leave pods
        // unanswered for 10 s or more. (The 1 s goal is measured, not asserted.)
        assert!(
            gap < 5_000,
            "node-{node}: unanswered for {gap} ms: {:?}",
            runs(&seen)
        );
    }
    let (status, log) = exchange.interrupt();
    assert!(status.success(), "{log}");
    tb.stop().await;
}

/// An agent-mode exchange whose direct SSH path to the holding agent black-holes: from
/// then on the workstation's packets to the agent's SSH port, and the agent's answers, are
/// dropped without a RST (a firewall or route that changed its mind). ktctl notices on its
/// own (its keepalive keeps data in flight, the direct socket's `TCP_USER_TIMEOUT` ends it),
/// reconnects over the API server's port-forward and holds the session again; the agent
/// ends the old connection, which it cannot see is dead, so that only the new listeners are
/// renewed. Pods on both nodes are answered by the workstation again (issue 16's goal: within
/// 5 s, printed) and stay so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn the_direct_path_black_holed_moves_the_exchange_to_the_port_forward() {
    let AgentExchange {
        tb,
        web,
        app: _app,
        exchange,
        urls,
    } = agent_exchange_with_probers().await;
    // "Connected to pod <agent> at <address> directly"
    let log = exchange.log();
    let agent = log
        .lines()
        .find(|line| line.contains(" directly"))
        .and_then(|line| line.rsplit(" at ").next())
        .and_then(|rest| rest.split(" directly").next())
        .and_then(|address| address.parse::<std::net::SocketAddr>().ok())
        .unwrap_or_else(|| panic!("the exchange did not go directly to the agent: {log}"));

    let (ip, port) = (agent.ip(), agent.port());
    let black_hole = format!(
        "nft -f - <<'EOF'\n\
         table inet ktt-black-hole {{\n\
           chain out {{ type filter hook output priority 0; ip daddr {ip} tcp dport {port} drop; }}\n\
           chain in {{ type filter hook input priority 0; ip saddr {ip} tcp sport {port} drop; }}\n\
         }}\n\
         EOF"
    );
    let fault = epoch_ms();
    let (ok, out) = workstation::run(&tb, &["sh", "-c", &black_hole]);
    assert!(
        ok,
        "black-holing {agent} in the workstation namespace: {out}"
    );
    let back = until_all_answered_by(&tb, &CLIENTS, &urls, |who| who == "workstation", patience())
        .await
        .unwrap_or_else(|wrong| {
            panic!(
                "the exchange did not come back: {wrong}\n{}",
                exchange.log()
            )
        });
    // Past two renewals of the old connection's status (every lease / 3, 3.3 s), had it
    // gone on renewing.
    tokio::time::sleep(Duration::from_secs(8)).await; // watching the probes, on purpose
    let now = epoch_ms();
    let log = exchange.log();
    assert!(
        log.contains("not reachable directly any more"),
        "ktctl never left the direct path: {log}"
    );
    for node in [1, 2] {
        let seen = probes(&tb, node, fault, now);
        let gap = longest_unanswered(&seen, fault, |who| who == "pod=workstation");
        eprintln!(
            "node-{node}: direct path black-holed at {fault} ms; pods unanswered by the \
             workstation for at most {gap} ms (every pod answered by it {back:?} after): {:?}",
            runs(&seen)
        );
        // Once back, it stays back: the last 5 s of probes all reached the workstation.
        let settled: Vec<_> = seen.iter().filter(|(at, _)| *at + 5_000 >= now).collect();
        assert!(
            !settled.is_empty() && settled.iter().all(|(_, who)| who == "pod=workstation"),
            "node-{node}: not steadily redirected after recovering: {:?}\n{log}",
            runs(&seen)
        );
    }
    let (status, log) = exchange.interrupt();
    assert!(status.success(), "{log}");
    // The revert went over the port-forward too.
    until_all_answered_by(&tb, &CLIENTS, &urls, |who| web.contains(who), patience())
        .await
        .unwrap_or_else(|wrong| panic!("after Ctrl-C: {wrong}\n{log}"));
    tb.stop().await;
}

/// An agent-mode exchange whose holding agent's node is removed for good (a scaled-down
/// node pool: the machine drops off the network without a word, everything on it dies, its
/// Node object is deleted). ktctl notices its connection is dead, finds the agent gone and
/// holds the session at the remaining node's agent, with nothing done by the user; pods on
/// the remaining node are answered by the workstation again and the session says so. How
/// long they went unanswered is printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn a_node_removed_for_good_moves_its_sessions_to_the_other_agent() {
    let AgentExchange {
        tb,
        web: _,
        app: _app,
        exchange,
        urls,
    } = agent_exchange_with_probers().await;
    let holder = kubectl_ok(
        &tb.kubeconfig,
        &["get", "kts", "-o", "jsonpath={.items[0].status.node}"],
    );
    let (other, client) = match holder.as_str() {
        "node-1" => ("node-2", CLIENTS[1]),
        "node-2" => ("node-1", CLIENTS[0]),
        unknown => panic!("held on {unknown:?}"),
    };
    let removed = epoch_ms();
    tb.remove_node(&holder)
        .unwrap_or_else(|e| panic!("removing {holder}: {e}"));
    let back = until_all_answered_by(
        &tb,
        &[client],
        &urls,
        |who| who == "workstation",
        patience(),
    )
    .await
    .unwrap_or_else(|wrong| {
        panic!(
            "the exchange did not come back on {other}: {wrong}\n{}",
            exchange.log()
        )
    });
    tokio::time::sleep(Duration::from_secs(3)).await; // watching the probes, on purpose
    let now = epoch_ms();
    let prober = if other == "node-1" { 1 } else { 2 };
    let seen = probes(&tb, prober, removed, now);
    let gap = longest_unanswered(&seen, removed, |who| who == "pod=workstation");
    eprintln!(
        "{holder} removed at {removed} ms: pods on {other} unanswered by the workstation for \
         at most {gap} ms (answered by it {back:?} after): {:?}",
        runs(&seen)
    );
    let log = exchange.log();
    assert!(
        log.contains("moving session"),
        "ktctl did not move the session: {log}"
    );
    let held_on = kubectl_ok(
        &tb.kubeconfig,
        &["get", "kts", "-o", "jsonpath={.items[0].status.node}"],
    );
    assert_eq!(held_on, other, "{log}");
    let nodes = kubectl_ok(&tb.kubeconfig, &["get", "nodes", "-o", "name"]);
    assert_eq!(nodes.trim(), format!("node/{other}"), "Node objects left");
    let (status, log) = exchange.interrupt();
    assert!(status.success(), "{log}");
    // The Deployment's pods, now all on the remaining node, answer again.
    until_all_answered_by(
        &tb,
        &[client],
        &urls,
        |who| who.starts_with("web-"),
        patience(),
    )
    .await
    .unwrap_or_else(|wrong| panic!("after Ctrl-C: {wrong}\n{log}"));
    tb.stop().await;
}
