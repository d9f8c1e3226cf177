//! `sudo ktctl connect` on the testbed's workstation: cluster pods, ClusterIPs and names
//! (short, `svc.ns`, full, another namespace's, a headless Service's) answer from the
//! workstation, non-cluster names still come from its own resolver, UDP reaches a UDP
//! Service, many parallel connections arrive intact — through kt's agent, kt's shadow and
//! the v0.3.7 shadow (OpenSSH) — and leaving (Ctrl-C, or `kill -9` and the next connect)
//! puts `/etc/resolv.conf`, `/etc/hosts` and the routes back byte for byte.

use kt_testbed::cluster::Testbed;
use kt_tests::harness::{
    apps::{apply, deploy_web, install_agent, start_testbed},
    eventually::{eventually, seen},
    kubectl::kubectl_ok,
    resolved::{self, Resolved},
    workstation::{self, Background, exec, ktctl_once, run},
};

/// Services beyond `web`: a headless one, one in namespace `other`, and a UDP echo.
const MORE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web-pods}
spec:
  clusterIP: None
  selector: {app: web}
  ports: [{name: http, port: 8080}]
---
apiVersion: v1
kind: Namespace
metadata: {name: other}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: db, namespace: other}
spec:
  replicas: 1
  selector: {matchLabels: {app: db}}
  template:
    metadata: {labels: {app: db}}
    spec:
      containers:
      - name: db
        image: kt-testbed/http-echo:1
        ports: [{containerPort: 8080}]
        readinessProbe: {httpGet: {path: /, port: 8080}, periodSeconds: 1}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: other}
spec:
  selector: {app: db}
  ports: [{port: 5432, targetPort: 8080}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: udp-echo}
spec:
  replicas: 1
  selector: {matchLabels: {app: udp-echo}}
  template:
    metadata: {labels: {app: udp-echo}}
    spec:
      containers:
      - name: echo
        image: kt-testbed/udp-echo:1
        ports: [{containerPort: 9000, protocol: UDP}]
---
apiVersion: v1
kind: Service
metadata: {name: udp-echo}
spec:
  selector: {app: udp-echo}
  ports: [{port: 9000, protocol: UDP}]
"#;

/// What connect may change on the workstation, as text: resolv.conf, hosts, routes, links.
fn workstation_state(tb: &Testbed) -> String {
    let (_, resolv) = run(tb, &["cat", "/etc/resolv.conf"]);
    let (_, hosts) = run(tb, &["cat", "/etc/hosts"]);
    let (_, routes) = run(tb, &["ip", "route", "show", "table", "all"]);
    let (_, links) = run(tb, &["ip", "-o", "link", "show"]);
    // Rules only: iptables-nft leaves a table's empty built-in chains behind once a tool
    // (sshuttle) used it, as iptables-legacy always has them.
    let (_, ruleset) = run(tb, &["nft", "list", "ruleset"]);
    let firewall: String = ruleset
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty()
                && !l.starts_with("table ")
                && !l.starts_with("chain ")
                && !l.starts_with("type ")
                && *l != "}"
        })
        .map(|l| format!("{l}\n"))
        .collect();
    format!(
        "--- resolv.conf\n{resolv}--- hosts\n{hosts}--- routes\n{routes}--- links\n{links}--- nft\n{firewall}"
    )
}

/// A testbed with `web` (2 pods), `web-pods` (headless), `other/db` and `udp-echo`, and
/// the agent when asked.
async fn cluster(with_agent_installed: bool) -> Testbed {
    let tb = start_testbed(true).await;
    deploy_web(&tb);
    apply(&tb.kubeconfig, MORE);
    apply(&tb.kubeconfig, workstation::ECHO);
    for (ns, deploy) in [
        ("other", "db"),
        ("default", "udp-echo"),
        ("default", "echo"),
    ] {
        kubectl_ok(
            &tb.kubeconfig,
            &[
                "rollout",
                "status",
                &format!("deploy/{deploy}"),
                "-n",
                ns,
                "--timeout=60s",
            ],
        );
    }
    if with_agent_installed {
        install_agent(&tb);
    }
    tb
}

/// `curl` from the workstation: the body, or what went wrong.
fn curl(tb: &Testbed, url: &str) -> Result<String, String> {
    let (ok, body) = run(tb, &["curl", "-sS", "--max-time", "5", url]);
    if ok {
        Ok(body)
    } else {
        Err(format!("curl {url} failed"))
    }
}

/// While `web` is exchanged in agent mode, the connected workstation reaches it where a pod
/// would — the workstation's app, by name and ClusterIP — and the pods again once the
/// exchange ends (the agent dials a connect session's connections where the redirect
/// points: its own sockets are exempt from the eBPF programs).
async fn exchanged_service_answers_from_the_workstation(tb: &Testbed) {
    let cluster_ip = kubectl_ok(
        &tb.kubeconfig,
        &["get", "svc", "web", "-o", "jsonpath={.spec.clusterIP}"],
    );
    let urls = ["http://web/".to_owned(), format!("http://{cluster_ip}/")];
    let app = workstation::http_echo(tb, 18090).await;
    let mut exchange = Background::ktctl(tb, &["exchange", "web", "--expose", "18090:80"]);
    exchange
        .wait_for(" Now all request to service 'web' will be redirected to local")
        .await;
    for url in &urls {
        let body = curl(tb, url).unwrap_or_else(|e| panic!("{e}\n{}", exchange.log()));
        assert!(body.starts_with("pod=workstation"), "{url}: {body}");
    }
    let (status, log) = exchange.interrupt();
    assert!(status.success(), "{log}");
    for url in &urls {
        eventually(format!("{url} answered by a pod again"), async || {
            seen(curl(tb, url).unwrap_or_default(), |b| {
                b.starts_with("pod=web-")
            })
        })
        .await;
    }
    drop(app);
}

/// The checks every way of connecting must pass, from the workstation.
async fn reaches_the_cluster(tb: &Testbed) {
    let pod_ip = kubectl_ok(
        &tb.kubeconfig,
        &[
            "get",
            "pods",
            "-l",
            "app=web",
            "-o",
            "jsonpath={.items[0].status.podIP}",
        ],
    );
    let cluster_ip = kubectl_ok(
        &tb.kubeconfig,
        &["get", "svc", "web", "-o", "jsonpath={.spec.clusterIP}"],
    );
    let pod_ips = kubectl_ok(
        &tb.kubeconfig,
        &[
            "get",
            "pods",
            "-l",
            "app=web",
            "-o",
            "jsonpath={.items[*].status.podIP}",
        ],
    );
    for url in [
        format!("http://{pod_ip}:8080/"),
        format!("http://{cluster_ip}/"),
        "http://web/".to_owned(),
        "http://web.default/".to_owned(),
        "http://web.default.svc.cluster.local/".to_owned(),
        "http://db.other:5432/".to_owned(),
        "http://web-pods:8080/".to_owned(),
    ] {
        let body = eventually(format!("{url} answers"), async || {
            seen(curl(tb, &url), |r| r.is_ok())
        })
        .await;
        assert!(body.unwrap().contains("pod="), "{url}");
    }
    // A headless Service's name is its pods' addresses.
    let (_, headless) = run(tb, &["dig", "+short", "web-pods.default.svc.cluster.local"]);
    let mut got: Vec<&str> = headless.split_whitespace().collect();
    let mut want: Vec<&str> = pod_ips.split_whitespace().collect();
    got.sort_unstable();
    want.sort_unstable();
    assert_eq!(got, want, "headless answers");
    // Other names still come from the workstation's own resolver.
    let (_, upstream) = run(tb, &["dig", "+short", "www.example.test"]);
    assert_eq!(upstream.trim(), "192.0.2.10");
}

/// `ktctl connect ARGS` on the workstation, once its banner is out.
async fn connected(tb: &Testbed, args: &[&str]) -> Background {
    let mut all = vec!["connect"];
    all.extend_from_slice(args);
    let mut connect = Background::ktctl(tb, &all);
    connect.wait_for("All looks good").await;
    connect
}

/// UDP through connect: a datagram to the UDP echo Service comes back.
fn udp_echo_answers(tb: &Testbed) -> Result<String, String> {
    let tools = kt_tests::harness::bins::kt_tools();
    let (ok, out) = run(
        tb,
        &[bins_utf8(&tools), "udp", "udp-echo:9000", "kt-datagram"],
    );
    if ok { Ok(out) } else { Err(out) }
}

fn bins_utf8(path: &std::path::Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

/// 100 parallel connections, 1 MiB each, to the TCP echo Service: every byte comes back.
fn hundred_mebibytes_arrive_intact(tb: &Testbed) {
    let tools = kt_tests::harness::bins::kt_tools();
    let out = exec(tb)
        .args([bins_utf8(&tools), "load", "echo:9000", "100", "1048576"])
        .output()
        .expect("kt-testbed exec runs");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success() && stdout.contains("ok 100"),
        "{stdout}{stderr}"
    );
}

/// Stops `connect` with Ctrl-C and checks that the workstation is as `before`.
fn interrupt_and_compare(tb: &Testbed, connect: Background, before: &str) -> String {
    let (status, log) = connect.interrupt();
    assert!(status.success(), "{log}");
    assert_eq!(workstation_state(tb), before, "{log}");
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn through_the_agent_the_workstation_reaches_pods_services_and_names_and_leaves_no_trace() {
    let tb = cluster(true).await;
    let before = workstation_state(&tb);
    let connect = connected(&tb, &[]).await;
    assert!(
        connect.log().contains("Connecting through kt agent"),
        "{}",
        connect.log()
    );
    assert_eq!(
        kubectl_ok(
            &tb.kubeconfig,
            &["get", "pods", "-o", "name", "-l", "kt-role"]
        ),
        "",
        "no pod per user"
    );
    reaches_the_cluster(&tb).await;
    let echoed = eventually("UDP echo answers", async || {
        seen(udp_echo_answers(&tb), |r| r.is_ok())
    })
    .await;
    assert_eq!(echoed.unwrap().trim(), "kt-datagram");
    hundred_mebibytes_arrive_intact(&tb);
    exchanged_service_answers_from_the_workstation(&tb).await;
    let during = workstation_state(&tb);
    assert!(
        during.contains(" kt0:") && during.contains("dev kt0"),
        "{during}"
    );
    assert!(
        during.contains("nameserver 127.0.0.153 # Added by KtConnect"),
        "{during}"
    );
    let log = interrupt_and_compare(&tb, connect, &before);
    assert!(log.contains("Cleaning session"), "{log}");
    let sessions = kubectl_ok(&tb.kubeconfig, &["get", "ktsessions", "-o", "name"]);
    assert_eq!(sessions.trim(), "", "the session is gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn without_the_agent_kts_shadow_carries_tcp_udp_and_dns_and_goes_away() {
    let tb = cluster(false).await;
    let before = workstation_state(&tb);
    let connect = connected(&tb, &["-i", "kt-shadow:dev"]).await;
    let log = connect.log();
    assert!(
        log.contains("Deploying shadow pod kt-connect-shadow-"),
        "{log}"
    );
    reaches_the_cluster(&tb).await;
    let echoed = eventually("UDP echo answers", async || {
        seen(udp_echo_answers(&tb), |r| r.is_ok())
    })
    .await;
    assert_eq!(echoed.unwrap().trim(), "kt-datagram");
    hundred_mebibytes_arrive_intact(&tb);
    let log = interrupt_and_compare(&tb, connect, &before);
    assert!(log.contains("Cleaning shadow pod"), "{log}");
    let left = kubectl_ok(
        &tb.kubeconfig,
        &[
            "get",
            "pods,configmaps",
            "-l",
            "control-by=kt",
            "-o",
            "name",
        ],
    );
    assert_eq!(left.trim(), "", "the shadow and its ConfigMap are gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn the_v0_3_7_shadow_carries_tcp_and_dns_and_ktctl_says_once_that_it_has_no_udp() {
    let tb = cluster(false).await;
    let before = workstation_state(&tb);
    let connect = connected(&tb, &[]).await;
    reaches_the_cluster(&tb).await;
    for _ in 0..3 {
        assert!(udp_echo_answers(&tb).is_err(), "OpenSSH relays no UDP");
    }
    let log = interrupt_and_compare(&tb, connect, &before);
    assert_eq!(
        log.matches("UDP to the cluster is not available").count(),
        1,
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn after_kill_9_the_next_connect_restores_first_and_stacks_nothing() {
    let tb = cluster(true).await;
    let before = workstation_state(&tb);
    let killed = connected(&tb, &[]).await;
    assert!(!killed.kill().success());
    let (_, resolv) = run(&tb, &["cat", "/etc/resolv.conf"]);
    assert!(
        resolv.contains("# Added by KtConnect"),
        "the killed run could not clean up: {resolv}"
    );
    let (_, links) = run(&tb, &["ip", "-o", "link", "show"]);
    assert!(
        !links.contains("kt0"),
        "the kernel removed the device: {links}"
    );
    let connect = connected(&tb, &[]).await;
    assert!(
        connect
            .log()
            .contains("Restored /etc/resolv.conf (a connect that did not finish had changed it)"),
        "{}",
        connect.log()
    );
    let (_, resolv) = run(&tb, &["cat", "/etc/resolv.conf"]);
    assert_eq!(
        resolv.matches("# Added by KtConnect").count(),
        1,
        "{resolv}"
    );
    reaches_the_cluster(&tb).await;
    interrupt_and_compare(&tb, connect, &before);
}

/// What `resolvectl ARGS…` says on the workstation, on one line (it wraps long lists),
/// single spaces between words.
fn resolvectl(resolved: &Resolved, tb: &Testbed, args: &[&str]) -> String {
    let (_, out) = resolved.ctl(tb, args);
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The workstation is as `before` once resolved has rewritten its stub file.
async fn eventually_as_before(tb: &Testbed, before: &str) {
    eventually("the workstation as before connect", async || {
        seen(workstation_state(tb), |now| now == before)
    })
    .await;
}

/// Where systemd-resolved runs the workstation's DNS (resolv.conf a link to its stub file),
/// connect gives it kt's resolver for `kt0` only: every kind of cluster name resolves
/// (`web` completed with the search domains resolved adds to its stub file, `svc.ns`
/// routed by namespace), other names still go to the machine's upstream, ktctl never writes
/// resolv.conf, and nothing is left after Ctrl-C or `kill -9` — after which the machine's
/// DNS works at once. A copy of the stub file, or resolved not answering, gets v0.3.7's
/// rewrite of resolv.conf instead (the latter said).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn with_systemd_resolved_cluster_names_go_to_kt_through_kt0_and_resolv_conf_is_never_written()
{
    let tb = cluster(true).await;
    // A resolv.conf naming the stub, but not resolved's file (a container given a copy).
    std::fs::create_dir_all(tb.dir.join("workstation")).expect("workstation directory");
    std::fs::write(
        tb.dir.join("workstation/resolv.conf"),
        "nameserver 127.0.0.53\noptions edns0 trust-ad\nsearch corp.example\n",
    )
    .expect("resolv.conf");
    let before = workstation_state(&tb);
    let connect = connected(&tb, &[]).await;
    assert!(
        !connect.log().contains("systemd-resolved"),
        "{}",
        connect.log()
    );
    let (_, resolv) = run(&tb, &["cat", "/etc/resolv.conf"]);
    assert!(
        resolv.contains("nameserver 127.0.0.153 # Added by KtConnect"),
        "{resolv}"
    );
    curl(&tb, "http://web.default.svc.cluster.local/").expect("a cluster name answers");
    interrupt_and_compare(&tb, connect, &before);

    let resolved = Resolved::start(&tb).await;
    let before = workstation_state(&tb);
    let connect = connected(&tb, &[]).await;
    let log = connect.log();
    assert!(
        log.contains("systemd-resolved sends these names to kt through kt0"),
        "{log}"
    );
    let (_, link) = run(&tb, &["readlink", "/etc/resolv.conf"]);
    assert_eq!(link.trim(), resolved::STUB_FILE, "still resolved's");
    let (_, resolv) = run(&tb, &["cat", "/etc/resolv.conf"]);
    assert!(
        !resolv.contains("KtConnect")
            && resolv.contains(" default.svc.cluster.local svc.cluster.local cluster.local\n"),
        "only resolved writes its stub file, with kt0's search domains: {resolv}"
    );
    // kt0's server is kt's, for these domains only: it is no default route.
    assert_eq!(
        resolvectl(&resolved, &tb, &["dns", "kt0"]),
        format!("Link {} (kt0): 198.18.0.1", kt0_index(&tb))
    );
    assert_eq!(
        resolvectl(&resolved, &tb, &["default-route", "kt0"]),
        format!("Link {} (kt0): no", kt0_index(&tb))
    );
    let domains = resolvectl(&resolved, &tb, &["domain", "kt0"]);
    for want in [
        " default.svc.cluster.local svc.cluster.local cluster.local ~svc ~default",
        " ~other",
        " ~kube-system",
    ] {
        assert!(
            domains.contains(want),
            "kt0's domains have{want}: {domains}"
        );
    }
    reaches_the_cluster(&tb).await;
    let (ok, answer) = resolved.ctl(&tb, &["query", "web"]);
    assert!(
        ok && answer.contains("(web.default.svc.cluster.local)"),
        "resolved completes 'web' with kt0's search domain: {answer}"
    );
    // A namespace created during the session is routed too, and kt0's DNS is set again
    // when another program (a network manager) changes it.
    kubectl_ok(&tb.kubeconfig, &["create", "namespace", "late"]);
    resolved.ctl(&tb, &["dns", "kt0", "192.0.2.53"]);
    eventually("the new namespace routed to kt", async || {
        seen(resolvectl(&resolved, &tb, &["domain", "kt0"]), |d| {
            d.contains(" ~late")
        })
    })
    .await;
    eventually("kt's DNS server on kt0 again", async || {
        seen(resolvectl(&resolved, &tb, &["dns", "kt0"]), |d| {
            d.ends_with("(kt0): 198.18.0.1")
        })
    })
    .await;
    assert!(
        connect
            .log()
            .contains("another program set the DNS of kt0; kt's is set again"),
        "{}",
        connect.log()
    );
    curl(&tb, "http://web/").expect("a short name answers again");
    let (status, log) = connect.interrupt();
    assert!(status.success(), "{log}");
    eventually_as_before(&tb, &before).await;
    let links = resolvectl(&resolved, &tb, &["status", "--no-pager"]);
    assert!(
        !links.contains("kt0"),
        "resolved has no kt0 any more: {links}"
    );

    // kill -9: the kernel takes kt0, and resolved forgets its DNS with it.
    let killed = connected(&tb, &[]).await;
    assert!(!killed.kill().success());
    eventually_as_before(&tb, &before).await;
    let links = resolvectl(&resolved, &tb, &["status", "--no-pager"]);
    assert!(
        !links.contains("kt0"),
        "resolved has no kt0 any more: {links}"
    );
    let (_, upstream) = run(&tb, &["dig", "+short", "www.example.test"]);
    assert_eq!(
        upstream.trim(),
        "192.0.2.10",
        "the machine's DNS works at once"
    );
    let connect = connected(&tb, &[]).await;
    assert!(!connect.log().contains("Restored"), "{}", connect.log());
    reaches_the_cluster(&tb).await;
    let (status, log) = connect.interrupt();
    assert!(status.success(), "{log}");
    eventually_as_before(&tb, &before).await;

    // resolved stopped, its stub file left: said, and the file rewritten and put back.
    drop(resolved);
    let before = workstation_state(&tb);
    let connect = connected(&tb, &[]).await;
    let log = connect.log();
    assert!(
        log.contains("is systemd-resolved's stub file, but resolved does not answer"),
        "{log}"
    );
    curl(&tb, "http://web.default.svc.cluster.local/").expect("a cluster name answers");
    interrupt_and_compare(&tb, connect, &before);
}

/// `kt0`'s interface index on the workstation.
fn kt0_index(tb: &Testbed) -> String {
    let (_, link) = run(tb, &["ip", "-o", "link", "show", "kt0"]);
    link.split(':').next().unwrap_or_default().trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn hosts_mode_writes_the_services_and_keeps_them_current() {
    let tb = cluster(true).await;
    let before = workstation_state(&tb);
    let connect = connected(&tb, &["--dnsMode", "hosts:default,other"]).await;
    let cluster_ip = kubectl_ok(
        &tb.kubeconfig,
        &["get", "svc", "web", "-o", "jsonpath={.spec.clusterIP}"],
    );
    let (_, hosts) = run(&tb, &["cat", "/etc/hosts"]);
    for line in [
        format!("{cluster_ip} web\n"),
        format!("{cluster_ip} web.default\n"),
        format!("{cluster_ip} web.default.svc.cluster.local\n"),
    ] {
        assert!(hosts.contains(&line), "{line:?} in {hosts}");
    }
    assert!(
        hosts.contains(" db.other\n") && !hosts.contains(" db\n"),
        "{hosts}"
    );
    let (_, resolv) = run(&tb, &["cat", "/etc/resolv.conf"]);
    assert!(
        !resolv.contains("KtConnect"),
        "hosts mode leaves resolv.conf alone: {resolv}"
    );
    assert!(curl(&tb, "http://web/").is_ok());
    apply(
        &tb.kubeconfig,
        "apiVersion: v1\nkind: Service\nmetadata: {name: late}\nspec:\n  selector: {app: web}\n  ports: [{port: 80, targetPort: 8080}]\n",
    );
    let late_ip = kubectl_ok(
        &tb.kubeconfig,
        &["get", "svc", "late", "-o", "jsonpath={.spec.clusterIP}"],
    );
    eventually("a new Service shows in the hosts file", async || {
        seen(run(&tb, &["cat", "/etc/hosts"]).1, |h| {
            h.contains(&format!("{late_ip} late\n"))
        })
    })
    .await;
    let log = interrupt_and_compare(&tb, connect, &before);
    assert!(log.contains("Drop hosts successful"), "{log}");
}

/// The agent's `kt_agent_connect_refused_total`, summed over both nodes.
fn refused_total(tb: &Testbed) -> u64 {
    (1..=2)
        .map(|node| {
            let url = format!(
                "http://{}:9966/metrics",
                kt_testbed::topology::node_ip(node)
            );
            let (_, metrics) = kt_tests::harness::apps::in_client(tb, &["curl", "-s", &url]);
            metrics
                .lines()
                .find_map(|l| l.strip_prefix("kt_agent_connect_refused_total "))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn without_a_tun_device_a_socks5_proxy_resolves_in_the_cluster_and_the_agent_refuses_the_node_and_metadata()
 {
    let tb = cluster(true).await;
    let before = workstation_state(&tb);
    let connect = connected(&tb, &["--disableTunDevice", "--dnsMode", "hosts"]).await;
    assert!(
        connect
            .log()
            .contains("export http_proxy=socks5://127.0.0.1:2223"),
        "{}",
        connect.log()
    );
    let (_, links) = run(&tb, &["ip", "-o", "link", "show"]);
    assert!(!links.contains("kt0"), "{links}");
    let socks = |url: &str| {
        run(
            &tb,
            &[
                "curl",
                "-sS",
                "--max-time",
                "5",
                "--socks5-hostname",
                "127.0.0.1:2223",
                url,
            ],
        )
    };
    for url in [
        "http://web/",
        "http://web.default/",
        "http://db.other:5432/",
    ] {
        let (ok, body) = socks(url);
        assert!(ok && body.contains("pod="), "{url}: {body}");
    }
    let refused_before = refused_total(&tb);
    let node = kt_testbed::topology::node_ip(1);
    for url in [
        format!("http://{node}:9966/metrics"),
        "http://127.0.0.1:9966/metrics".into(),
        "http://169.254.169.254/".into(),
    ] {
        let (ok, body) = socks(&url);
        assert!(!ok, "{url} must be refused, got {body}");
    }
    assert_eq!(
        refused_total(&tb) - refused_before,
        3,
        "each refusal is counted"
    );
    interrupt_and_compare(&tb, connect, &before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn include_exclude_and_disable_pod_ip_change_the_routes() {
    let tb = cluster(true).await;
    let before = workstation_state(&tb);
    // The device's own /30 (proto kernel) is no route into the cluster.
    let routes = || {
        run(&tb, &["ip", "route", "show", "dev", "kt0"])
            .1
            .lines()
            .filter(|l| !l.contains("proto kernel"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let connect = connected(
        &tb,
        &[
            "--disablePodIp",
            "--includeIps",
            "192.168.77.0/24",
            "--excludeIps",
            "10.96.128.0/17",
        ],
    )
    .await;
    let shown = routes();
    assert!(shown.contains("192.168.77.0/24"), "{shown}");
    assert!(!shown.contains("10.244."), "no pod range: {shown}");
    assert!(
        shown.contains("10.96.0.0/17") && !shown.contains("10.96.0.0/16"),
        "the excluded half is left out: {shown}"
    );
    let cluster_ip = kubectl_ok(
        &tb.kubeconfig,
        &["get", "svc", "web", "-o", "jsonpath={.spec.clusterIP}"],
    );
    assert!(curl(&tb, &format!("http://{cluster_ip}/")).is_ok());
    interrupt_and_compare(&tb, connect, &before);
    let connect = connected(&tb, &["--disableTunRoute"]).await;
    assert_eq!(routes().trim(), "", "no route into kt0");
    interrupt_and_compare(&tb, connect, &before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn sshuttle_mode_runs_the_systems_sshuttle_over_the_shadow_and_takes_its_rules_away() {
    let tb = cluster(false).await;
    // sshuttle redirects in netfilter, after routing: like a real workstation, this one
    // needs a default route for cluster addresses to get that far.
    let (ok, _) = run(&tb, &["ip", "route", "add", "default", "via", "172.30.0.1"]);
    assert!(ok);
    let before = workstation_state(&tb);
    let connect = connected(&tb, &["--mode", "sshuttle"]).await;
    let log = connect.log();
    assert!(
        log.contains("Using sshuttle mode") && log.contains("Starting sshuttle"),
        "{log}"
    );
    let during = workstation_state(&tb);
    assert!(
        !during.contains(" kt0:"),
        "sshuttle, not a TUN device: {during}"
    );
    assert!(
        during.contains("sshuttle"),
        "sshuttle's firewall rules: {during}"
    );
    let cluster_ip = kubectl_ok(
        &tb.kubeconfig,
        &["get", "svc", "web", "-o", "jsonpath={.spec.clusterIP}"],
    );
    for url in [
        "http://web/".to_owned(),
        "http://web.default.svc.cluster.local/".to_owned(),
        format!("http://{cluster_ip}/"),
    ] {
        let body = curl(&tb, &url);
        assert!(
            body.as_ref().is_ok_and(|b| b.contains("pod=")),
            "{url}: {body:?}\n{}",
            connect.log()
        );
    }
    let log = interrupt_and_compare(&tb, connect, &before);
    assert!(log.contains("Cleaning shadow pod"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn two_connects_share_one_shadow_and_the_last_one_out_deletes_it() {
    let tb = cluster(false).await;
    let first = connected(&tb, &["--shareShadow", "-i", "kt-shadow:dev"]).await;
    let refs = || {
        kubectl_ok(
            &tb.kubeconfig,
            &[
                "get",
                "pod",
                "kt-connect-shadow-daemon",
                "-o",
                "jsonpath={.metadata.annotations.kt-ref-count}",
            ],
        )
    };
    assert_eq!(refs(), "1");
    // A second developer (another home, a SOCKS proxy instead of a second kt0).
    let second_home = tb.dir.join("second-home");
    std::fs::create_dir_all(&second_home).unwrap();
    let home = format!("HOME={}", second_home.display());
    let mut second = Background::spawn(
        &tb,
        std::path::Path::new("env"),
        &[
            &home,
            bins_utf8(&kt_tests::harness::bins::ktctl()),
            "connect",
            "--shareShadow",
            "-i",
            "kt-shadow:dev",
            "--disableTunDevice",
            "--proxyPort",
            "2224",
            "--dnsMode",
            "hosts",
        ],
    );
    second.wait_for("All looks good").await;
    assert!(
        second.log().contains("has 1 refs, increase to 2"),
        "{}",
        second.log()
    );
    assert_eq!(refs(), "2");
    let through_second = || {
        let out = exec(&tb)
            .args([
                "curl",
                "-sS",
                "--max-time",
                "5",
                "--socks5-hostname",
                "127.0.0.1:2224",
                "http://web/",
            ])
            .output()
            .expect("runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success() && text.contains("pod="), text)
    };
    let (ok, body) = through_second();
    assert!(ok, "{body}");
    let (_, resolv) = run(&tb, &["cat", "/etc/resolv.conf"]);
    assert!(
        resolv.contains("# Added by KtConnect"),
        "the second did not take the first's DNS for a leftover: {resolv}"
    );
    // The second leaves first: on this one workstation it reaches the shadow through the
    // first's kt0 (two developers' machines would not share it).
    let (status, log) = second.interrupt();
    assert!(
        status.success() && log.contains("has 2 refs, decrease to 1"),
        "{log}"
    );
    assert_eq!(refs(), "1", "the shadow stays for the first");
    assert!(
        curl(&tb, "http://web/").is_ok_and(|body| body.contains("pod=")),
        "the first still connects"
    );
    let (status, log) = first.interrupt();
    assert!(
        status.success() && log.contains("Cleaning shadow pod kt-connect-shadow-daemon"),
        "{log}"
    );
    // Deleted: gone once the kubelet has stopped it (a deleted pod terminates first, as
    // on any cluster).
    eventually(
        "the last one out deleted the shadow and its ConfigMap",
        async || {
            let left = kubectl_ok(
                &tb.kubeconfig,
                &[
                    "get",
                    "pods,configmaps",
                    "-l",
                    "control-by=kt",
                    "-o",
                    "name",
                ],
            );
            seen(left.trim().to_owned(), String::is_empty)
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn bad_input_exits_1_with_a_clear_message_and_changes_nothing() {
    let tb = cluster(true).await;
    let before = workstation_state(&tb);
    let objects = || {
        kubectl_ok(
            &tb.kubeconfig,
            &["get", "pods,configmaps,ktsessions", "-A", "-o", "name"],
        )
    };
    let objects_before = objects();
    for (args, message) in [
        (
            &["connect", "--dnsMode", "magic"][..],
            "invalid --dnsMode 'magic'",
        ),
        (
            &["connect", "--excludeIps", "10.0.0.0/33"][..],
            "invalid --excludeIps '10.0.0.0/33'",
        ),
        (
            &["connect", "--includeIps", "10.9.8.7"][..],
            "Includes single IP '10.9.8.7' is not allow in tun2socks mode",
        ),
        (
            &["connect", "--dnsMode", "podDNS"][..],
            "dns mode 'podDNS' is not available for connect mode 'tun2socks'",
        ),
        (&["connect", "--mode", "vpn"][..], "invalid --mode 'vpn'"),
    ] {
        let (code, stderr) = ktctl_once(&tb, &[], args);
        assert_eq!(code, Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains(&format!("ERR Exit: {message}")),
            "{args:?}: {stderr}"
        );
    }
    let ktctl = kt_tests::harness::bins::ktctl();
    let as_nobody = exec(&tb)
        .args([
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            bins_utf8(&ktctl),
            "connect",
        ])
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&as_nobody.stderr);
    assert_eq!(as_nobody.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("permission declined, please re-run connect command with 'sudo'"),
        "{stderr}"
    );
    let running = connected(&tb, &[]).await;
    let (code, stderr) = ktctl_once(&tb, &[], &["connect"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("another connect process already running at"),
        "{stderr}"
    );
    let during = workstation_state(&tb);
    assert_eq!(
        during.matches("# Added by KtConnect").count(),
        1,
        "the refused one stacked nothing: {during}"
    );
    interrupt_and_compare(&tb, running, &before);
    assert_eq!(objects(), objects_before);
}
