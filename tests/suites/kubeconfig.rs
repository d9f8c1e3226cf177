//! Kubeconfigs as users have them (root, on the testbed): an exec credential plugin issuing
//! short-lived tokens that the API server refuses once expired, an HTTP CONNECT proxy
//! (`proxy-url`, `HTTPS_PROXY`, `NO_PROXY`) carrying the API requests and the port-forward
//! streams, a client certificate, and the context's namespace when `-n` is absent.

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use kt_testbed::cluster::Testbed;
use kt_tests::harness::{
    apps::{apply, deploy_web, service_state, start_testbed, until_all_answered_by},
    bins::{self, utf8},
    eventually::{eventually, seen},
    kubectl::kubectl_ok,
    workstation::{self, Background, ECHO, ktctl_once},
};

/// The API server as the workstation reaches it.
const SERVER: &str = "https://172.30.0.1:6443";
/// Where the test proxy listens, on the workstation.
const PROXY: &str = "127.0.0.1:3128";

/// A kubeconfig for the workstation with `user` (YAML of the user entry, indented by four
/// spaces), the cluster entry's `extra` lines, and the context's `namespace`.
fn kubeconfig(tb: &Testbed, name: &str, user: &str, extra: &str, namespace: &str) -> PathBuf {
    use base64::Engine as _;
    let ca = base64::engine::general_purpose::STANDARD.encode(&tb.ca_pem);
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: testbed\n  cluster:\n    server: {SERVER}\n    \
         certificate-authority-data: {ca}\n{extra}contexts:\n- name: work\n  context:\n    cluster: testbed\n    \
         user: u\n    namespace: {namespace}\ncurrent-context: work\nusers:\n- name: u\n  user:\n{user}"
    );
    let path = tb.dir.join(format!("kubeconfig-{name}"));
    std::fs::write(&path, text).expect("kubeconfig");
    path
}

/// Makes user `name` a cluster admin (by a ClusterRoleBinding, as RBAC is evaluated).
fn cluster_admin(tb: &Testbed, name: &str) {
    apply(
        &tb.kubeconfig,
        &format!(
            "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata: {{name: {name}-admin}}\n\
             roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: cluster-admin}}\n\
             subjects: [{{kind: User, name: {name}, apiGroup: rbac.authorization.k8s.io}}]\n"
        ),
    );
}

fn curl(tb: &Testbed, url: &str) -> (bool, String) {
    workstation::run(tb, &["curl", "-s", "--max-time", "5", url])
}

/// A token lifetime of the plugin below: several expire during a test.
const TOKEN_SECONDS: u64 = 4;

/// Writes an exec plugin (a shell script) handing out tokens the testbed issued for `user`,
/// each refused by the API server from its expiry on; the plugin gives the first one with
/// at least two seconds left and its true `expirationTimestamp`, and appends a line to
/// `invocations` per run. Returns (plugin, invocations file, a token already expired).
fn token_plugin(tb: &Testbed, user: &str) -> (PathBuf, PathBuf, String) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    let tokens: Vec<String> = (1..=60)
        .map(|i| {
            let expires = now + i * TOKEN_SECONDS;
            let token = tb.issue_token(user, UNIX_EPOCH + Duration::from_secs(expires));
            format!("{expires} {token}")
        })
        .collect();
    let expired = tb.issue_token(user, UNIX_EPOCH + Duration::from_secs(now - 1));
    let dir = tb.dir.join("exec-plugin");
    std::fs::create_dir_all(&dir).expect("plugin dir");
    let (list, invocations, plugin) = (
        dir.join("tokens"),
        dir.join("invocations"),
        dir.join("plugin"),
    );
    std::fs::write(&list, tokens.join("\n") + "\n").expect("tokens");
    let script = format!(
        r#"#!/bin/sh
date +%s >> {invocations}
now=$(date +%s)
while read exp token; do
  if [ "$exp" -gt $((now + 2)) ]; then
    printf '{{"apiVersion":"client.authentication.k8s.io/v1","kind":"ExecCredential","status":{{"token":"%s","expirationTimestamp":"%s"}}}}\n' "$token" "$(date -u -d @$exp +%Y-%m-%dT%H:%M:%SZ)"
    exit 0
  fi
done < {list}
echo "no token left" >&2
exit 1
"#,
        invocations = invocations.display(),
        list = list.display(),
    );
    write_script(&plugin, &script);
    (plugin, invocations, expired)
}

fn write_script(path: &Path, script: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, script).expect("script");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

fn exec_user(plugin: &Path) -> String {
    format!(
        "    exec:\n      apiVersion: client.authentication.k8s.io/v1\n      command: {}\n      interactiveMode: Never\n",
        plugin.display()
    )
}

fn invocations(file: &Path) -> usize {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn an_exec_plugin_kubeconfig_keeps_forward_and_exchange_working_across_token_expiries() {
    let tb = start_testbed(true).await;
    deploy_web(&tb);
    cluster_admin(&tb, "dev");
    let (plugin, runs, expired) = token_plugin(&tb, "dev");
    let kc = kubeconfig(&tb, "exec", &exec_user(&plugin), "", "default");
    let kc = utf8(&kc);

    // The API server refuses an expired token as it refuses an unknown one.
    let (_, status) = workstation::run(
        &tb,
        &[
            "curl",
            "-sk",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            &format!("Authorization: Bearer {expired}"),
            &format!("{SERVER}/api/v1/namespaces/default/services"),
        ],
    );
    assert_eq!(status, "401", "an expired token is refused");

    // forward: every few seconds the token expires and the API server drops the
    // port-forward streams; each reconnection needs a token the API server accepts.
    let mut forward = Background::ktctl(&tb, &["-c", kc, "forward", "web", "18080:80"]);
    forward.ready().await;
    for round in 0..4 {
        tokio::time::sleep(Duration::from_secs(TOKEN_SECONDS + 1)).await;
        tb.api.drop_streams();
        eventually(format!("round {round}: the forward answers"), async || {
            let (ok, body) = curl(&tb, "http://127.0.0.1:18080/");
            seen(body, |b| ok && b.starts_with("pod=web-"))
        })
        .await;
    }
    let forward_runs = invocations(&runs);
    let (status, log) = forward.interrupt();
    assert!(status.success(), "{log}");
    assert!(!log.contains("Unauthorized"), "{log}");
    assert!(
        forward_runs >= 4,
        "the plugin ran again as tokens expired: {forward_runs} runs\n{log}"
    );
    eprintln!("exec plugin runs during forward: {forward_runs}");

    // exchange: the Service's traffic reaches the workstation across expiries, and Ctrl-C
    // restores it with a fresh token.
    let before = service_state(&tb, "web");
    let app = workstation::http_echo(&tb, 18090).await;
    let mut exchange = Background::ktctl_with_env(
        &tb,
        &["USER=alice"],
        &["-c", kc, "exchange", "web", "--expose", "18090:80"],
    );
    exchange
        .wait_for(" Now all request to service 'web' will be redirected to local")
        .await;
    for _ in 0..3 {
        until_all_answered_by(
            &tb,
            &["client"],
            &["http://web/".to_owned()],
            |who| who == "workstation",
            Duration::from_secs(10),
        )
        .await
        .unwrap_or_else(|wrong| panic!("{wrong}\n{}", exchange.log()));
        tokio::time::sleep(Duration::from_secs(TOKEN_SECONDS + 1)).await;
        tb.api.drop_streams();
    }
    let (status, log) = exchange.interrupt();
    assert!(status.success(), "{log}");
    assert_eq!(service_state(&tb, "web"), before, "restored:\n{log}");
    let total = invocations(&runs);
    assert!(
        total > forward_runs + 1,
        "the plugin ran during the exchange: {total} runs in all"
    );
    eprintln!("exec plugin runs in all: {total}");
    drop(app);

    // A failing plugin: its command and the first line of its stderr.
    let failing = tb.dir.join("exec-plugin/failing");
    write_script(
        &failing,
        "#!/bin/sh\necho 'error: login expired, run: sso login' >&2\necho detail >&2\nexit 3\n",
    );
    let kc = kubeconfig(&tb, "failing", &exec_user(&failing), "", "default");
    let (code, err) = ktctl_once(&tb, &[], &["-c", utf8(&kc), "forward", "web", "18081:80"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "ERR Exit: exec plugin '{}' failed with exit code 3: error: login expired, run: sso login",
            failing.display()
        )),
        "{err}"
    );
    let garbage = tb.dir.join("exec-plugin/garbage");
    write_script(&garbage, "#!/bin/sh\necho 'not json: ['\n");
    let kc = kubeconfig(&tb, "garbage", &exec_user(&garbage), "", "default");
    let (code, err) = ktctl_once(&tb, &[], &["-c", utf8(&kc), "forward", "web", "18081:80"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "ERR Exit: exec plugin '{}' printed no ExecCredential",
            garbage.display()
        )),
        "{err}"
    );
    tb.stop().await;
}

/// The proxy's log lines `CONNECT target` and the bytes of its closed tunnels (up, down).
fn proxy_traffic(log: &str) -> (usize, u64, u64) {
    let connects = log.lines().filter(|l| l.starts_with("CONNECT ")).count();
    let (mut up, mut down) = (0, 0);
    for line in log.lines().filter(|l| l.starts_with("closed ")) {
        for word in line.split_whitespace() {
            if let Some(n) = word.strip_prefix("up=") {
                up += n.parse::<u64>().unwrap_or_default();
            }
            if let Some(n) = word.strip_prefix("down=") {
                down += n.parse::<u64>().unwrap_or_default();
            }
        }
    }
    (connects, up, down)
}

/// [`proxy_traffic`] once every tunnel the proxy opened has closed (it counts a tunnel's
/// bytes when it closes, a moment after ktctl exits).
async fn settled_proxy_traffic(proxy: &Background) -> (usize, u64, u64) {
    eventually("every proxy tunnel closed", async || {
        let log = proxy.log();
        let closed = log.lines().filter(|l| l.starts_with("closed ")).count();
        seen(proxy_traffic(&log), |(connects, _, _)| *connects == closed)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn an_http_proxy_carries_the_api_requests_and_the_port_forward_unless_no_proxy_covers_the_server()
 {
    let tb = start_testbed(true).await;
    deploy_web(&tb);
    apply(&tb.kubeconfig, ECHO);
    kubectl_ok(
        &tb.kubeconfig,
        &["rollout", "status", "deploy/echo", "--timeout=60s"],
    );
    let tools = bins::kt_tools();
    let mut proxy = Background::spawn(&tb, &tools, &["connect-proxy", PROXY]);
    proxy.wait_for("listening").await;
    let token = tb.admin_token.clone();
    let user = format!("    token: {token}\n");

    // proxy-url in the kubeconfig: forward, with a mebibyte each way through the tunnel.
    let kc = kubeconfig(
        &tb,
        "proxy-url",
        &user,
        &format!("    proxy-url: http://{PROXY}\n"),
        "default",
    );
    let mut forward = Background::ktctl(&tb, &["-c", utf8(&kc), "forward", "echo", "19000"]);
    forward.ready().await;
    let (ok, out) = workstation::run(
        &tb,
        &[utf8(&tools), "load", "127.0.0.1:19000", "4", "262144"],
    );
    assert!(ok && out.contains("ok 4"), "{out}\n{}", forward.log());
    let (status, log) = forward.interrupt();
    assert!(status.success(), "{log}");
    let (connects, up, down) = settled_proxy_traffic(&proxy).await;
    eprintln!("proxy-url forward: {connects} CONNECTs, {up} bytes up, {down} down");
    assert!(
        proxy
            .log()
            .lines()
            .all(|l| !l.starts_with("CONNECT ") || l == "CONNECT 172.30.0.1:6443"),
        "{}",
        proxy.log()
    );
    assert!(connects >= 1, "{}", proxy.log());
    assert!(
        up > 1 << 20 && down > 1 << 20,
        "the port-forward stream went through the proxy: {}",
        proxy.log()
    );

    // HTTPS_PROXY, no proxy-url: exchange through the proxy.
    let plain = kubeconfig(&tb, "plain", &user, "", "default");
    let plain = utf8(&plain);
    let before = service_state(&tb, "web");
    let app = workstation::http_echo(&tb, 18090).await;
    let ktctl = bins::ktctl();
    let https_proxy = format!("HTTPS_PROXY=http://{PROXY}");
    let mut exchange = Background::ktctl_with_env(
        &tb,
        &[&https_proxy, "USER=alice"],
        &["-c", plain, "exchange", "web", "--expose", "18090:80"],
    );
    exchange
        .wait_for(" Now all request to service 'web' will be redirected to local")
        .await;
    until_all_answered_by(
        &tb,
        &["client"],
        &["http://web/".to_owned()],
        |who| who == "workstation",
        Duration::from_secs(10),
    )
    .await
    .unwrap_or_else(|wrong| panic!("{wrong}\n{}", exchange.log()));
    let (status, log) = exchange.interrupt();
    assert!(status.success(), "{log}");
    assert_eq!(service_state(&tb, "web"), before, "restored:\n{log}");
    drop(app);
    let (after_exchange, up2, down2) = settled_proxy_traffic(&proxy).await;
    eprintln!(
        "HTTPS_PROXY exchange: {} CONNECTs, {} bytes up, {} down",
        after_exchange - connects,
        up2 - up,
        down2 - down
    );
    assert!(after_exchange > connects, "{}", proxy.log());

    // NO_PROXY covering the API server (by CIDR, by address and port): no CONNECT.
    for no_proxy in [
        "NO_PROXY=172.30.0.0/24",
        "no_proxy=example.com,172.30.0.1:6443",
    ] {
        let mut forward = Background::spawn(
            &tb,
            Path::new("env"),
            &[
                &https_proxy,
                no_proxy,
                utf8(&ktctl),
                "-c",
                plain,
                "forward",
                "web",
                "18080:80",
            ],
        );
        forward.ready().await;
        let (ok, body) = curl(&tb, "http://127.0.0.1:18080/");
        assert!(ok && body.starts_with("pod=web-"), "{body}");
        forward.interrupt();
        assert_eq!(
            proxy_traffic(&proxy.log()).0,
            after_exchange,
            "{no_proxy}: nothing through the proxy"
        );
    }

    // An unreachable proxy is named.
    let (code, err) = ktctl_once(
        &tb,
        &["HTTPS_PROXY=http://127.0.0.1:9"],
        &["-c", plain, "forward", "web", "18081:80"],
    );
    assert_eq!(code, Some(1), "{err}");
    eprintln!("unreachable proxy: {}", err.trim());
    assert!(
        err.contains("ERR Exit:") && err.contains("proxy http://127.0.0.1:9 is unreachable"),
        "{err}"
    );
    drop(proxy);
    tb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn a_client_certificate_user_forwards_in_the_contexts_namespace() {
    let tb = start_testbed(true).await;
    // `web` exists only in namespace `team`; RBAC grants the group `kt-devs` there.
    kubectl_ok(&tb.kubeconfig, &["create", "namespace", "team"]);
    let web = kt_tests::harness::apps::WEB.replace(
        "metadata: {name: web}",
        "metadata: {name: web, namespace: team}",
    );
    apply(
        &tb.kubeconfig,
        &web.replace(
            "metadata: {name: client}",
            "metadata: {name: client, namespace: team}",
        ),
    );
    kubectl_ok(
        &tb.kubeconfig,
        &[
            "-n",
            "team",
            "rollout",
            "status",
            "deploy/web",
            "--timeout=60s",
        ],
    );
    apply(
        &tb.kubeconfig,
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {name: devs, namespace: team}\n\
         roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: admin}\n\
         subjects: [{kind: Group, name: kt-devs, apiGroup: rbac.authorization.k8s.io}]\n",
    );
    let carol = tb
        .workstation_certificate_kubeconfig("carol", Some("kt-devs"), "team")
        .expect("certificate kubeconfig");
    let carol = utf8(&carol);

    // No -n: the context's namespace `team`, as carol of group kt-devs (the certificate's
    // CN and O).
    let mut forward = Background::ktctl(&tb, &["-c", carol, "forward", "web", "18080:80"]);
    forward.ready().await;
    let (ok, body) = curl(&tb, "http://127.0.0.1:18080/");
    assert!(
        ok && body.starts_with("pod=web-"),
        "{body}\n{}",
        forward.log()
    );
    let (status, log) = forward.interrupt();
    assert!(status.success(), "{log}");
    eventually("the shadow pod is gone", async || {
        let pods = kubectl_ok(&tb.kubeconfig, &["-n", "team", "get", "pods", "-o", "name"]);
        seen(pods, |p| !p.contains("kt-"))
    })
    .await;

    // The certificate's user has nothing in `default`: refused by RBAC, by name.
    let (code, err) = ktctl_once(
        &tb,
        &[],
        &["-c", carol, "-n", "default", "forward", "web", "18081:80"],
    );
    assert_eq!(code, Some(1), "{err}");
    eprintln!("carol in default: {}", err.trim());
    assert!(err.contains("ERR Exit:") && err.contains("carol"), "{err}");

    // A certificate its CA did not sign is refused in the handshake.
    let other = kt_testbed::api::tls::generate(&["127.0.0.1".parse().expect("ip")], &[])
        .expect("another CA");
    let (cert, key) =
        kt_testbed::api::tls::client_certificate(&other.ca, "mallory", Some("system:masters"))
            .expect("certificate");
    let path = tb.dir.join("kubeconfig-mallory");
    kt_testbed::kubeconfig::write_certificate(
        &path,
        SERVER,
        "mallory",
        (&cert, &key),
        "team",
        Some(&tb.ca_pem),
    )
    .expect("kubeconfig");
    let (code, err) = ktctl_once(&tb, &[], &["-c", utf8(&path), "forward", "web", "18081:80"]);
    eprintln!("another CA's certificate: {}", err.trim());
    assert_eq!(code, Some(1), "{err}");
    tb.stop().await;
}
