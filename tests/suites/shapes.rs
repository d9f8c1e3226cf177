//! `ktctl exchange` against the Service shapes users have (root, on the testbed): an unnamed
//! port, two Service ports on one target port, TCP and UDP on one number, a named target port
//! exposed by its container port, two Deployments behind one Service, a Service re-applied
//! while exchanged, and one the agents cannot redirect. Each in every mode it applies to.

use std::{collections::HashSet, time::Duration};

use kt_testbed::{cluster::Testbed, topology::node_ip};
use kt_tests::harness::{
    apps::{
        apply, deploy_client_2, deploy_web, in_pod, install_agent, service_state, start_testbed,
        until_all_answered_by, web_pods,
    },
    bins,
    eventually::{eventually, seen},
    kubectl::kubectl_ok,
    workstation::{self, Background, ktctl_once},
};

const CLIENTS: [&str; 2] = ["client", "client-2"];

/// The `client` pod on node-1 (`client-2` on node-2 comes from the harness).
const CLIENT: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: client}
spec:
  nodeSelector: {kubernetes.io/hostname: node-1}
  containers: [{name: c, image: kt-testbed/sleep}]
"#;

/// A testbed with the agent, `manifest` applied and ready, and a client pod on each node.
async fn testbed_with(manifest: &str, deployments: &[&str]) -> Testbed {
    let tb = start_testbed(true).await;
    install_agent(&tb);
    apply(&tb.kubeconfig, CLIENT);
    apply(&tb.kubeconfig, manifest);
    deploy_client_2(&tb);
    for deployment in deployments {
        kubectl_ok(
            &tb.kubeconfig,
            &[
                "rollout",
                "status",
                &format!("deploy/{deployment}"),
                "--timeout=60s",
            ],
        );
    }
    kubectl_ok(
        &tb.kubeconfig,
        &[
            "wait",
            "--for=condition=Ready",
            "pod/client",
            "--timeout=60s",
        ],
    );
    tb
}

fn cluster_ip(tb: &Testbed, service: &str) -> String {
    kubectl_ok(
        &tb.kubeconfig,
        &["get", "svc", service, "-o", "jsonpath={.spec.clusterIP}"],
    )
}

/// Pod names and IPs of the pods labelled `app=<app>` (kt's shadows left out).
fn pods_of(tb: &Testbed, app: &str) -> (HashSet<String>, Vec<String>) {
    let field = |f: &str| {
        kubectl_ok(
            &tb.kubeconfig,
            &[
                "get",
                "pods",
                "-l",
                &format!("app={app},!kt-role"),
                "-o",
                &format!("jsonpath={{.items[*].{f}}}"),
            ],
        )
    };
    (
        field("metadata.name")
            .split_whitespace()
            .map(String::from)
            .collect(),
        field("status.podIP")
            .split_whitespace()
            .map(String::from)
            .collect(),
    )
}

/// `ktctl exchange ARGS` on the workstation, once its banner is out.
async fn exchange(tb: &Testbed, args: &[&str]) -> Background {
    let mut all = vec!["exchange"];
    all.extend_from_slice(args);
    let mut running = Background::ktctl(tb, &all);
    running.wait_for("will be redirected to local").await;
    running
}

/// Waits until every URL, from both clients, is answered by a pod `expected` accepts;
/// panics with what was answered instead and the log of `running`, if any.
async fn answered_by_all(
    tb: &Testbed,
    urls: &[String],
    expected: impl Fn(&str) -> bool,
    running: Option<&Background>,
) {
    until_all_answered_by(tb, &CLIENTS, urls, expected, Duration::from_secs(15))
        .await
        .unwrap_or_else(|wrong| {
            panic!(
                "{wrong}\n{}",
                running.map(Background::log).unwrap_or_default()
            )
        });
}

/// An unnamed port (the most common single-port Service): the EndpointSlice names it `""`,
/// and agent mode must still redirect a client that dials a pod's address.
const UNNAMED: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: plain}
spec:
  replicas: 2
  selector: {matchLabels: {app: plain}}
  template:
    metadata: {labels: {app: plain}}
    spec:
      containers:
      - {name: app, image: kt-testbed/http-echo, ports: [{containerPort: 8080}], readinessProbe: {httpGet: {path: /, port: 8080}}}
---
apiVersion: v1
kind: Service
metadata: {name: plain}
spec:
  selector: {app: plain}
  ports: [{port: 80, targetPort: 8080}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn an_unnamed_port_is_redirected_at_its_cluster_ip_and_its_pod_addresses() {
    let tb = testbed_with(UNNAMED, &["plain"]).await;
    let slice_port_name = kubectl_ok(
        &tb.kubeconfig,
        &[
            "get",
            "endpointslices",
            "-l",
            "kubernetes.io/service-name=plain",
            "-o",
            "jsonpath={.items[0].ports[0].name}|{.items[0].ports[0].port}",
        ],
    );
    assert_eq!(
        slice_port_name, "|8080",
        "the slice port of an unnamed Service port is named \"\""
    );
    let (pods, ips) = pods_of(&tb, "plain");
    let mut urls = vec![
        "http://plain/".to_owned(),
        format!("http://{}/", cluster_ip(&tb, "plain")),
    ];
    urls.extend(ips.iter().map(|ip| format!("http://{ip}:8080/")));
    let _app = workstation::http_echo(&tb, 18080).await;

    let running = exchange(&tb, &["plain", "--expose", "18080:8080", "--mode", "agent"]).await;
    answered_by_all(&tb, &urls, |who| who == "workstation", Some(&running)).await;
    let log = running.log();
    assert!(
        log.contains("Port 80/TCP -> 127.0.0.1:18080, held by agent ")
            && log.contains("(listener 172.30.0."),
        "the log names the holding agent's node and listener: {log}"
    );
    assert!(
        !log.contains("Reverse tunnel"),
        "agent mode has no reverse tunnel on 0.0.0.0: {log}"
    );
    // The banner came after both nodes' agents had programmed the session.
    let programmed = kubectl_ok(
        &tb.kubeconfig,
        &["get", "kts", "-o", "jsonpath={.items[0].status.programmed}"],
    );
    assert!(
        programmed.contains("node-1") && programmed.contains("node-2"),
        "{programmed}"
    );

    let (status, log) = running.interrupt();
    assert!(status.success(), "{log}");
    answered_by_all(&tb, &urls, |who| pods.contains(who), None).await;
    tb.stop().await;
}

/// Two Service ports on one target port, and a third with a defaulted target.
const SHARED_TARGET: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: api}
spec:
  replicas: 2
  selector: {matchLabels: {app: api}}
  template:
    metadata: {labels: {app: api}}
    spec:
      containers:
      - {name: http, image: kt-testbed/http-echo, env: [{name: PORT, value: "8080"}], readinessProbe: {httpGet: {path: /, port: 8080}}}
      - {name: admin, image: kt-testbed/http-echo, env: [{name: PORT, value: "9090"}]}
---
apiVersion: v1
kind: Service
metadata: {name: api}
spec:
  selector: {app: api}
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: http-alt, port: 8080, targetPort: 8080}
  - {name: admin, port: 9090}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn every_service_port_of_an_exposed_target_port_goes_local_in_agent_and_selector_modes() {
    let tb = testbed_with(SHARED_TARGET, &["api"]).await;
    let (pods, _) = pods_of(&tb, "api");
    let _http = workstation::named_http_echo(&tb, 18080, "local-http").await;
    let _admin = workstation::named_http_echo(&tb, 19090, "local-admin").await;
    let http = ["http://api:80/".to_owned(), "http://api:8080/".to_owned()];
    let admin = ["http://api:9090/".to_owned()];
    for mode in ["agent", "selector"] {
        let running = exchange(
            &tb,
            &["api", "--expose", "18080:8080,19090:9090", "--mode", mode],
        )
        .await;
        answered_by_all(&tb, &http, |who| who == "local-http", Some(&running)).await;
        answered_by_all(&tb, &admin, |who| who == "local-admin", Some(&running)).await;
        let (status, log) = running.interrupt();
        assert!(status.success(), "{mode}: {log}");
        answered_by_all(&tb, &http, |who| pods.contains(who), None).await;
    }
    tb.stop().await;
}

/// TCP and UDP on port 53, and HTTP on 80.
const MIXED: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: mixed}
spec:
  replicas: 1
  selector: {matchLabels: {app: mixed}}
  template:
    metadata: {labels: {app: mixed}}
    spec:
      containers:
      - {name: http, image: kt-testbed/http-echo, env: [{name: PORT, value: "8080"}], readinessProbe: {httpGet: {path: /, port: 8080}}}
      - {name: dns-tcp, image: kt-testbed/http-echo, env: [{name: PORT, value: "5353"}]}
      - {name: dns-udp, image: kt-testbed/udp-echo, env: [{name: PORT, value: "5353"}]}
---
apiVersion: v1
kind: Service
metadata: {name: mixed}
spec:
  selector: {app: mixed}
  ports:
  - {name: dns-udp, port: 53, targetPort: 5353, protocol: UDP}
  - {name: dns-tcp, port: 53, targetPort: 5353, protocol: TCP}
  - {name: http, port: 80, targetPort: 8080}
"#;

/// Whether a datagram to `ip:port` from the client pod comes back (the pods' UDP echo).
fn udp_echoes(tb: &Testbed, ip: &str) -> bool {
    let script = format!(
        "exec 3<>/dev/udp/{ip}/53; printf ping >&3; timeout 2 dd bs=4 count=1 <&3 2>/dev/null"
    );
    in_pod(tb, "client", &["bash", "-c", &script]).1 == "ping"
}

/// The value of the sample `line` (`name{labels}`) in a `/metrics` page, 0 when absent.
fn sample(text: &str, line: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(line)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// `kt-tools ARGS` in `pod`: stdout, or `Err` with it when the tool failed.
fn tools_in(tb: &Testbed, pod: &str, args: &[&str]) -> Result<String, String> {
    let tools = bins::kt_tools();
    let mut cmd = vec![bins::utf8(&tools)];
    cmd.extend_from_slice(args);
    let (ok, out) = in_pod(tb, pod, &cmd);
    let out = out.trim().to_owned();
    if ok { Ok(out) } else { Err(out) }
}

/// A UDP echo on the workstation at `port`, answering `workstation:<datagram>`; returns once
/// it answers.
async fn local_udp_echo(tb: &Testbed, port: u16) -> Background {
    let testbed = bins::kt_testbed();
    let echo = Background::spawn(
        tb,
        std::path::Path::new("env"),
        &[
            &format!("PORT={port}"),
            "REPLY_PREFIX=workstation:",
            bins::utf8(&testbed),
            "image",
            "udp-echo",
        ],
    );
    let tools = workstation::tools_command(tb);
    let addr = format!("127.0.0.1:{port}");
    let _answered = eventually("the local UDP echo answers", async || {
        seen(tools(&["udp", &addr, "up"]), |r| {
            r.as_deref().is_ok_and(|a| a.trim() == "workstation:up")
        })
    })
    .await;
    echo
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn a_udp_port_exchanged_in_agent_mode_reaches_the_workstation_from_every_kind_of_socket() {
    let tb = testbed_with(MIXED, &["mixed"]).await;
    let (pods, pod_ips) = pods_of(&tb, "mixed");
    let ip = cluster_ip(&tb, "mixed");
    let echo = local_udp_echo(&tb, 15353).await;
    let _local_tcp = workstation::named_http_echo(&tb, 15354, "local-tcp").await;

    // UDP only: 53/UDP goes local, 53/TCP stays with the pods.
    let running = exchange(
        &tb,
        &["mixed", "--expose", "15353:5353/udp", "--mode", "agent"],
    )
    .await;
    assert!(
        running
            .log()
            .contains("Service port 53/UDP -> 127.0.0.1:15353 held by"),
        "{}",
        running.log()
    );
    // From both nodes, to the ClusterIP and to every endpoint, from a connected socket
    // (connect4) and an unconnected one (sendmsg4; the reply's source checked: recvmsg4).
    let mut addresses = vec![format!("{ip}:53")];
    addresses.extend(pod_ips.iter().map(|p| format!("{p}:5353")));
    for client in CLIENTS {
        for address in &addresses {
            for kind in [None, Some("--unconnected")] {
                let mut args = vec!["udp", address.as_str(), "ping"];
                args.extend(kind);
                let reply = tools_in(&tb, client, &args);
                assert_eq!(
                    reply.as_deref(),
                    Ok("workstation:ping"),
                    "{client} -> {address} {kind:?}\n{}",
                    running.log()
                );
            }
        }
    }
    // Each node's programs redirected an unconnected socket's datagram and restored its
    // reply's source; the holder carried every datagram.
    let metrics: Vec<String> = [1, 2]
        .iter()
        .map(|node| {
            let url = format!("http://{}:9966/metrics", node_ip(*node));
            in_pod(&tb, "client", &["curl", "-s", &url]).1
        })
        .collect();
    for (node, text) in metrics.iter().enumerate() {
        for event in ["udp_send_redirected", "udp_reply_restored"] {
            let line = format!("kt_agent_ebpf_events_total{{event=\"{event}\"}}");
            assert!(
                sample(text, &line) >= 1.0,
                "node-{}: {line}\n{text}",
                node + 1
            );
        }
    }
    let carried: f64 = metrics
        .iter()
        .map(|t| {
            sample(
                t,
                "kt_agent_udp_datagrams_total{direction=\"to_workstation\"}",
            )
        })
        .sum();
    let asked = (CLIENTS.len() * addresses.len() * 2) as f64;
    assert!(
        carried >= asked,
        "{carried} datagrams carried, {asked} sent"
    );
    answered_by_all(
        &tb,
        &["http://mixed:53/".to_owned()],
        |who| pods.contains(who),
        Some(&running),
    )
    .await;
    // A DNS-like service: BIND's dig and kt-tools dig (connected and unconnected sockets)
    // get the workstation's answer.
    drop(echo);
    let dns = Background::spawn(
        &tb,
        &bins::kt_tools(),
        &["dns-answer", "15353", "192.0.2.53"],
    );
    let (at, port) = (format!("@{ip}"), "53");
    let _answers = eventually("dig gets the workstation's answer", async || {
        let bind = in_pod(
            &tb,
            "client",
            &[
                "dig", &at, "-p", port, "+short", "+tries=1", "+time=2", "probe.kt",
            ],
        )
        .1;
        let ours = tools_in(
            &tb,
            "client-2",
            &["dig", "probe.kt", "--server", &format!("{ip}:53")],
        );
        seen((bind, ours), |(bind, ours)| {
            bind.trim() == "192.0.2.53" && ours.as_deref().is_ok_and(|o| o.contains("192.0.2.53"))
        })
    })
    .await;
    let timed = tools_in(
        &tb,
        "client",
        &[
            "dig",
            "probe.kt",
            "--server",
            &format!("{ip}:53"),
            "--count",
            "100",
        ],
    );
    assert!(timed.is_ok(), "100 lookups in a row: {timed:?}");
    eprintln!("dig through the UDP exchange, p50 and p99 in µs: {timed:?}");
    drop(dns);
    let (status, log) = running.interrupt();
    assert!(status.success(), "{log}");
    eventually("the pods echo UDP again", async || {
        seen(udp_echoes(&tb, &ip), |back| *back)
    })
    .await;
    // A mode that carries TCP only refuses `/udp` and changes nothing.
    let before = service_state(&tb, "mixed");
    let (code, err) = ktctl_once(
        &tb,
        &[],
        &[
            "exchange",
            "mixed",
            "--expose",
            "15354:5353/udp",
            "--mode",
            "selector",
        ],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("--expose 15354:5353/udp: --mode selector carries TCP only"),
        "{err}"
    );
    assert_eq!(service_state(&tb, "mixed"), before);

    // TCP and UDP of one number each to its own local port: both go local; a one-way
    // stream of 1 000 datagrams arrives, in order.
    let sink = Background::spawn(&tb, &bins::kt_tools(), &["udp-sink", "15353", "3"]);
    let running = exchange(
        &tb,
        &[
            "mixed",
            "--expose",
            "15354:5353,15353:5353/udp",
            "--mode",
            "agent",
        ],
    )
    .await;
    assert!(!running.log().contains("not carried"), "{}", running.log());
    answered_by_all(
        &tb,
        &["http://mixed:53/".to_owned()],
        |who| who == "local-tcp",
        Some(&running),
    )
    .await;
    let sent = tools_in(
        &tb,
        "client-2",
        &["udp-stream", &format!("{ip}:53"), "1000"],
    );
    assert_eq!(sent.as_deref(), Ok("sent=1000"));
    let mut sink = sink;
    let waited = sink.wait();
    let report = sink.log();
    assert!(waited.success(), "{report}");
    let count = |key: &str| -> u64 {
        report
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(key))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    assert!(
        count("distinct=") >= 990 && report.contains("in_order=true"),
        "at least 99 % of the stream, in order: {report}"
    );
    let (status, log) = running.interrupt();
    assert!(status.success(), "{log}");

    // A KtSession CRD that predates `udpPorts`: the API server prunes the field, and ktctl
    // refuses instead of leaving UDP with the pods silently, deleting its session again.
    let crd = kubectl_ok(
        &tb.kubeconfig,
        &["get", "crd", "ktsessions.kt.dev", "-o", "json"],
    );
    let mut crd: serde_json::Value = serde_json::from_str(&crd).expect("the CRD as JSON");
    let spec = &mut crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
    assert!(
        spec.as_object_mut()
            .and_then(|s| s.remove("udpPorts"))
            .is_some()
    );
    let old = tb.dir.join("old-ktsession-crd.json");
    std::fs::write(&old, crd.to_string()).expect("written");
    kubectl_ok(&tb.kubeconfig, &["replace", "-f", bins::utf8(&old)]);
    let (code, err) = ktctl_once(
        &tb,
        &[],
        &[
            "exchange",
            "mixed",
            "--expose",
            "15353:5353/udp",
            "--mode",
            "agent",
        ],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(
            "the cluster's KtSession CRD predates UDP exchange (it dropped spec.udpPorts): apply deploy/"
        ),
        "{err}"
    );
    let left = kubectl_ok(&tb.kubeconfig, &["get", "ktsessions", "-o", "name"]);
    assert!(left.trim().is_empty(), "no session is left: {left}");
    tb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn tcp_and_udp_on_one_number_agent_mode_takes_tcp_and_shadow_modes_name_what_stops() {
    let tb = testbed_with(MIXED, &["mixed"]).await;
    let (pods, _) = pods_of(&tb, "mixed");
    let ip = cluster_ip(&tb, "mixed");
    let _dns = workstation::named_http_echo(&tb, 15353, "local-dns").await;
    assert!(
        udp_echoes(&tb, &ip),
        "the pods echo UDP before the exchange"
    );

    // Agent mode: 53/TCP goes local, 53/UDP and 80 stay with the pods, and the log says so.
    let running = exchange(&tb, &["mixed", "--expose", "15353:5353", "--mode", "agent"]).await;
    answered_by_all(
        &tb,
        &["http://mixed:53/".to_owned()],
        |who| who == "local-dns",
        Some(&running),
    )
    .await;
    answered_by_all(
        &tb,
        &["http://mixed:80/".to_owned()],
        |who| pods.contains(who),
        Some(&running),
    )
    .await;
    assert!(udp_echoes(&tb, &ip), "UDP is left to the pods");
    assert!(
        running.log().contains(
            "UDP is not carried: port dns-udp 53/UDP of service 'mixed' stays with its pods (expose it with '/udp' too to carry it)"
        ),
        "{}",
        running.log()
    );
    let (status, log) = running.interrupt();
    assert!(status.success(), "{log}");

    // Selector mode moves the whole Service: it refuses, naming what would stop answering,
    // and changes nothing.
    let _http = workstation::http_echo(&tb, 18080).await;
    let before = service_state(&tb, "mixed");
    for mode in ["selector", "scale"] {
        let (code, err) = ktctl_once(
            &tb,
            &[],
            &[
                "exchange",
                "mixed",
                "--expose",
                "18080:8080",
                "--mode",
                mode,
            ],
        );
        assert_eq!(code, Some(1), "{mode}: {err}");
        assert!(
            err.contains(&format!(
                "in {mode} mode a shadow takes the place of the pods of service 'mixed'"
            )) && err.contains("port dns-udp 53/UDP, port dns-tcp 53/TCP would stop answering")
                && err.contains("--allowUnservedPorts"),
            "{mode}: {err}"
        );
        assert_eq!(
            service_state(&tb, "mixed"),
            before,
            "{mode} changed the Service"
        );
    }
    // Confirmed: it goes ahead and says what will not answer.
    let running = exchange(
        &tb,
        &[
            "mixed",
            "--expose",
            "18080:8080",
            "--mode",
            "selector",
            "--allowUnservedPorts",
        ],
    )
    .await;
    assert!(
        running.log().contains("While the exchange lasts port dns-udp 53/UDP, port dns-tcp 53/TCP of service 'mixed' will not answer"),
        "{}",
        running.log()
    );
    answered_by_all(
        &tb,
        &["http://mixed:80/".to_owned()],
        |who| who == "workstation",
        Some(&running),
    )
    .await;
    let (status, log) = running.interrupt();
    assert!(status.success(), "{log}");
    assert_eq!(service_state(&tb, "mixed"), before);
    tb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn a_named_target_port_is_exposed_by_its_container_port_in_every_mode() {
    let tb = start_testbed(true).await;
    install_agent(&tb);
    deploy_web(&tb);
    deploy_client_2(&tb);
    let _app = workstation::http_echo(&tb, 9090).await;
    let urls = ["http://web/".to_owned()];
    for mode in ["agent", "selector", "scale"] {
        // `web`'s targetPort is the name `http`, container port 8080: scripts for v0.3.7 say 8080.
        let running = exchange(
            &tb,
            &[
                "web",
                "--expose",
                "9090:8080",
                "--mode",
                mode,
                "--recoverWaitTime",
                "60",
            ],
        )
        .await;
        answered_by_all(&tb, &urls, |who| who == "workstation", Some(&running)).await;
        let (status, log) = running.interrupt();
        assert!(status.success(), "{mode}: {log}");
        kubectl_ok(
            &tb.kubeconfig,
            &["rollout", "status", "deploy/web", "--timeout=60s"],
        );
        let web = web_pods(&tb);
        answered_by_all(&tb, &urls, |who| web.contains(who), None).await;
    }
    // With no pod running the name resolves through the Deployment's pod template.
    kubectl_ok(&tb.kubeconfig, &["scale", "deploy/web", "--replicas=0"]);
    eventually("no web pod", async || web_pods(&tb).is_empty()).await;
    let running = exchange(&tb, &["web", "--expose", "9090:8080", "--mode", "agent"]).await;
    answered_by_all(&tb, &urls, |who| who == "workstation", Some(&running)).await;
    let (status, log) = running.interrupt();
    assert!(status.success(), "{log}");
    tb.stop().await;
}

/// A second Deployment behind `web` whose port `http` is 9000, not 8080.
const WEB_B: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web-b}
spec:
  replicas: 1
  selector: {matchLabels: {app: web, variant: b}}
  template:
    metadata: {labels: {app: web, variant: b}}
    spec:
      containers:
      - {name: app, image: kt-testbed/http-echo, env: [{name: PORT, value: "9000"}], ports: [{name: http, containerPort: 9000}]}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn a_port_name_with_two_numbers_gets_a_slice_each_and_is_named_in_a_warning() {
    let tb = start_testbed(true).await;
    install_agent(&tb);
    deploy_web(&tb);
    apply(&tb.kubeconfig, WEB_B);
    kubectl_ok(
        &tb.kubeconfig,
        &["rollout", "status", "deploy/web-b", "--timeout=60s"],
    );
    // The EndpointSlice controller writes one slice per port mapping.
    let slice_ports = eventually("a slice per port number", async || {
        let ports = kubectl_ok(
            &tb.kubeconfig,
            &[
                "get",
                "endpointslices",
                "-l",
                "kubernetes.io/service-name=web",
                "-o",
                "jsonpath={.items[*].ports[0].port}",
            ],
        );
        let mut ports: Vec<String> = ports.split_whitespace().map(String::from).collect();
        ports.sort();
        seen(ports, |p| p.len() == 2)
    })
    .await;
    assert_eq!(slice_ports, ["8080", "9000"]);
    let _app = workstation::http_echo(&tb, 18080).await;
    let running = exchange(&tb, &["web", "--expose", "18080:80", "--mode", "agent"]).await;
    let log = running.log();
    assert!(
        log.contains(
            "port name 'http' of service 'web' stands for different ports: 8080 on pod web-"
        ) && log.contains(", 9000 on pod web-b-"),
        "{log}"
    );
    let (status, log) = running.interrupt();
    assert!(status.success(), "{log}");
    tb.stop().await;
}

/// A main and a canary Deployment behind one Service.
const CANARY: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web-main}
spec:
  replicas: 2
  selector: {matchLabels: {app: web, track: main}}
  template:
    metadata: {labels: {app: web, track: main}}
    spec:
      containers:
      - {name: app, image: kt-testbed/http-echo, readinessProbe: {httpGet: {path: /, port: 8080}}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web-canary}
spec:
  replicas: 1
  selector: {matchLabels: {app: web, track: canary}}
  template:
    metadata: {labels: {app: web, track: canary}}
    spec:
      containers:
      - {name: app, image: kt-testbed/http-echo, readinessProbe: {httpGet: {path: /, port: 8080}}}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn scale_mode_scales_every_deployment_the_service_selects_and_each_comes_back() {
    let tb = testbed_with(CANARY, &["web-main", "web-canary"]).await;
    let _app = workstation::http_echo(&tb, 18080).await;
    // A pod no Deployment owns would keep answering: scale mode refuses, naming it.
    apply(&tb.kubeconfig, BARE_WEB_POD);
    let (code, err) = ktctl_once(
        &tb,
        &[],
        &[
            "exchange",
            "web",
            "--expose",
            "18080:8080",
            "--mode",
            "scale",
        ],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("scale mode scales Deployments, but service 'web' also selects pod web-extra (no owner), which would keep answering"),
        "{err}"
    );
    kubectl_ok(
        &tb.kubeconfig,
        &["delete", "pod", "web-extra", "--wait=true"],
    );
    let urls: Vec<String> = (0..4).map(|i| format!("http://web/?{i}")).collect();
    let mut running = exchange(
        &tb,
        &[
            "web",
            "--expose",
            "18080:8080",
            "--mode",
            "scale",
            "--recoverWaitTime",
            "60",
        ],
    )
    .await;
    let replicas = |d: &str| {
        kubectl_ok(
            &tb.kubeconfig,
            &["get", "deploy", d, "-o", "jsonpath={.spec.replicas}"],
        )
    };
    assert_eq!(
        (replicas("web-main"), replicas("web-canary")),
        ("0".into(), "0".into())
    );
    answered_by_all(&tb, &urls, |who| who == "workstation", Some(&running)).await;
    // Scaled up by someone else (a re-applied manifest) while exchanged: back to zero.
    kubectl_ok(
        &tb.kubeconfig,
        &["scale", "deploy/web-main", "--replicas=2"],
    );
    running
        .wait_for(
            "Deployment web-main was scaled to 2 while it is exchanged; scaling it to 0 again",
        )
        .await;
    eventually("web-main back at 0", async || {
        seen(replicas("web-main"), |r| r == "0")
    })
    .await;
    answered_by_all(&tb, &urls, |who| who == "workstation", Some(&running)).await;
    let (status, log) = running.interrupt();
    assert!(status.success(), "{log}");
    assert_eq!(
        (replicas("web-main"), replicas("web-canary")),
        ("2".into(), "1".into()),
        "each gets its own count back"
    );
    let ready = |d: &str| {
        kubectl_ok(
            &tb.kubeconfig,
            &["get", "deploy", d, "-o", "jsonpath={.status.readyReplicas}"],
        )
    };
    assert_eq!(
        (ready("web-main"), ready("web-canary")),
        ("2".into(), "1".into()),
        "ktctl waited for them: {log}"
    );
    tb.stop().await;
}

/// A pod with `web`'s label that no Deployment owns.
const BARE_WEB_POD: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: web-extra, labels: {app: web}}
spec:
  containers: [{name: app, image: kt-testbed/http-echo}]
"#;

/// Just `web`'s Service, as its manifest says (what a GitOps tool re-applies).
const WEB_SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn selector_mode_points_a_reapplied_service_at_the_shadow_again() {
    let tb = start_testbed(true).await;
    deploy_web(&tb);
    deploy_client_2(&tb);
    let before = service_state(&tb, "web");
    let _app = workstation::http_echo(&tb, 18080).await;
    let urls = ["http://web/".to_owned()];
    let mut running = exchange(
        &tb,
        &["web", "--expose", "18080:8080", "--mode", "selector"],
    )
    .await;
    answered_by_all(&tb, &urls, |who| who == "workstation", Some(&running)).await;
    apply(&tb.kubeconfig, WEB_SERVICE);
    running
        .wait_for("while it is exchanged; pointing it at the shadow again")
        .await;
    answered_by_all(&tb, &urls, |who| who == "workstation", Some(&running)).await;
    let (status, log) = running.interrupt();
    assert!(status.success(), "{log}");
    assert_eq!(service_state(&tb, "web"), before, "{log}");

    // A manifest that changed the selector (a chart upgrade): the shadow keeps the traffic,
    // and on exit the Service gets the new selector.
    let mut running = exchange(
        &tb,
        &["web", "--expose", "18080:8080", "--mode", "selector"],
    )
    .await;
    let changed = WEB_SERVICE.replace("selector: {app: web}", "selector: {app: web, tier: fe}");
    apply(&tb.kubeconfig, &changed);
    running
        .wait_for(r#"it gets {"app": "web", "tier": "fe"} back on exit"#)
        .await;
    answered_by_all(&tb, &urls, |who| who == "workstation", Some(&running)).await;
    let (status, log) = running.interrupt();
    assert!(status.success(), "{log}");
    let selector = kubectl_ok(
        &tb.kubeconfig,
        &["get", "svc", "web", "-o", "jsonpath={.spec.selector}"],
    );
    assert_eq!(selector, r#"{"app":"web","tier":"fe"}"#, "{log}");
    tb.stop().await;
}

/// A headless Service whose pods never get ready: no agent can program it.
const UNREACHABLE: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: ghost}
spec:
  replicas: 1
  selector: {matchLabels: {app: ghost}}
  template:
    metadata: {labels: {app: ghost}}
    spec:
      containers:
      - {name: app, image: kt-testbed/http-echo, readinessProbe: {tcpSocket: {port: 9}}}
---
apiVersion: v1
kind: Service
metadata: {name: ghost}
spec:
  clusterIP: None
  selector: {app: ghost}
  ports: [{port: 80, targetPort: 8080}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn no_banner_until_the_agents_program_it_and_ctrl_c_before_it_exits_130() {
    let tb = testbed_with(UNREACHABLE, &[]).await;
    let _app = workstation::http_echo(&tb, 18080).await;
    let mut running = Background::ktctl(
        &tb,
        &[
            "exchange",
            "ghost",
            "--expose",
            "18080:8080",
            "--mode",
            "agent",
        ],
    );
    running.wait_for("Not redirected on node").await;
    let log = running.log();
    assert!(
        log.contains("Not redirected on node node-1 yet: port 80")
            && log.contains("Not redirected on node node-2 yet: port 80"),
        "{log}"
    );
    assert!(
        !log.contains("will be redirected to local"),
        "no banner: {log}"
    );
    let (status, log) = running.interrupt();
    assert_eq!(status.code(), Some(130), "{log}");
    assert!(
        log.contains(
            "ERR Exit: stopped before the exchange was established; nothing was exchanged"
        ),
        "{log}"
    );
    assert_eq!(
        kubectl_ok(&tb.kubeconfig, &["get", "kts", "-o", "name"]),
        "",
        "the session is gone"
    );
    tb.stop().await;
}
