//! The SSH tunnel (root, on the testbed): kt's shadow role under the ktctl v0.3.7 contract,
//! driven by OpenSSH's client (`ssh -W`, `ssh -L`, `ssh -R`).

use std::path::{Path, PathBuf};

use kt_testbed::cluster::Testbed;
use kt_tests::harness::{
    apps::{apply, deploy_shadow, deploy_web, in_client, start_testbed, web_pods},
    bins::{self, utf8},
    eventually::{eventually, seen, shell_until},
    kubectl::kubectl_ok,
    workstation::{self, Background, ECHO},
};

/// A testbed with `web`, a client pod, and our shadow pod `kt-connect-shadow-abcde`
/// whose authorized key is a fresh one; returns the testbed, the private key and the
/// shadow's pod IP.
async fn with_shadow() -> (Testbed, PathBuf, String) {
    let tb = plain_testbed().await;
    let (key, ip) = deploy_shadow(&tb, "kt-node-agent:dev", &["shadow"], &[], "rsa");
    (tb, key, ip)
}

/// `ssh` options for a throwaway session with `key`.
fn ssh(key: &Path) -> String {
    format!(
        "ssh -i {} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR -o ExitOnForwardFailure=yes",
        key.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn openssh_direct_tcpip_reaches_services_by_cluster_name() {
    let (tb, key, ip) = with_shadow().await;
    let ssh = ssh(&key);
    // ssh -W: one connection through the shadow to a Service by its cluster DNS name
    // (stdin stays open until the answer: the echo server does not serve half-closed
    // connections).
    let (ok, out) = in_client(
        &tb,
        &[
            "sh",
            "-c",
            &format!(
                "(printf 'GET / HTTP/1.0\\r\\n\\r\\n'; sleep 2) | {ssh} -W web.default.svc.cluster.local:80 root@{ip}"
            ),
        ],
    );
    assert!(ok && out.contains("pod=web-"), "{out}");
    // ssh -L: a local port forwarded through the shadow; two requests on it.
    let listening = shell_until("curl -s -o /dev/null http://127.0.0.1:18080/");
    let script = format!(
        "{ssh} -N -L 127.0.0.1:18080:web:80 root@{ip} & pid=$!; {listening}; curl -s http://127.0.0.1:18080/; curl -s http://127.0.0.1:18080/; kill $pid"
    );
    let (_, out) = in_client(&tb, &["sh", "-c", &script]);
    assert_eq!(out.matches("pod=web-").count(), 2, "{out}");
    tb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn openssh_remote_forward_listens_on_the_shadow_and_stops_with_the_session() {
    let (tb, key, ip) = with_shadow().await;
    let ssh = ssh(&key);
    // The client pod serves HTTP on 8081 and asks the shadow to listen on all its
    // addresses (GatewayPorts) at 9999; a request to shadow:9999 lands in the client pod.
    let testbed = bins::kt_testbed();
    let testbed = utf8(&testbed);
    let forwarded = shell_until(&format!("curl -s -o /dev/null http://{ip}:9999/"));
    let closed = shell_until(&format!(
        "! curl -s -o /dev/null --max-time 2 http://{ip}:9999/"
    ));
    let script = format!(
        "PORT=8081 HOSTNAME=$(cat /etc/hostname) {testbed} image http-echo & echo_pid=$!; {ssh} -N -R 0.0.0.0:9999:127.0.0.1:8081 root@{ip} & ssh_pid=$!; {forwarded}; \
         curl -s --max-time 3 http://{ip}:9999/; kill $ssh_pid; wait $ssh_pid; {closed} && echo refused-after-session; kill $echo_pid"
    );
    let (_, out) = in_client(&tb, &["sh", "-c", &script]);
    assert!(
        out.starts_with("pod=client"),
        "the remote forward delivered to the client pod: {out}"
    );
    assert!(
        out.trim_end().ends_with("refused-after-session"),
        "the listener went with the session: {out}"
    );
    tb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn the_shadow_refuses_other_keys_and_users() {
    let (tb, key, ip) = with_shadow().await;
    let other = tb.dir.join("other-key");
    assert!(
        std::process::Command::new("ssh-keygen")
            .args([
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-f",
                other.to_str().unwrap()
            ])
            .status()
            .unwrap()
            .success()
    );
    let (ok, _) = in_client(
        &tb,
        &[
            "sh",
            "-c",
            &format!("{} root@{ip} -W web:80 </dev/null", ssh(&other)),
        ],
    );
    assert!(!ok, "a key that is not authorized got in");
    let (ok, _) = in_client(
        &tb,
        &[
            "sh",
            "-c",
            &format!("{} nobody@{ip} -W web:80 </dev/null", ssh(&key)),
        ],
    );
    assert!(!ok, "a user other than root got in");
    tb.stop().await;
}

/// Our shadow with the DNS relay ktctl v0.3.7's `connect` asks for (`KT_DNS_PROTOCOL`), and
/// the ClusterIP of `web`.
async fn with_dns_relay(protocol: &str) -> (Testbed, String, String) {
    let tb = plain_testbed().await;
    let env = [
        ("KT_DNS_PROTOCOL", protocol),
        ("KT_LOCAL_DOMAIN", "corp.example,lab.example"),
    ];
    let (_, ip) = deploy_shadow(&tb, "kt-node-agent:dev", &["shadow"], &env, "rsa");
    let cluster_ip = kubectl_ok(
        &tb.kubeconfig,
        &["get", "svc", "web", "-o", "jsonpath={.spec.clusterIP}"],
    );
    (tb, ip, cluster_ip)
}

/// localDNS mode: the workstation asks over TCP through a port-forward to the shadow's port
/// 53, with names as the workstation has them; answers come back under those names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn our_shadow_relays_cluster_dns_over_tcp_through_a_port_forward() {
    let (tb, _, cluster_ip) = with_dns_relay("tcp").await;
    let forward = workstation::forward_to_pod(&tb, "kt-connect-shadow-abcde", 17053, 53).await;
    let tools = bins::kt_tools();
    let dig = |name: &str| {
        on_workstation(
            &tb,
            &[
                utf8(&tools),
                "dig",
                name,
                "A",
                "--server",
                "127.0.0.1:17053",
                "--tcp",
            ],
        )
    };
    for name in [
        "web.",
        "WEB.corp.example.",
        "web.default.lab.example.",
        "web.default.svc.cluster.local.",
    ] {
        let (ok, out) = dig(name);
        assert!(ok, "{name}: {out}");
        assert_eq!(out, format!("rcode=No Error\n{name} {cluster_ip}\n"));
    }
    let (ok, out) = dig("nope.default.corp.example.");
    assert!(ok && out.starts_with("rcode=Non-Existent Domain"), "{out}");
    drop(forward);
    tb.stop().await;
}

/// podDNS mode: a resolver sends UDP straight to the shadow pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn our_shadow_relays_cluster_dns_over_udp_to_the_pod() {
    let (tb, ip, cluster_ip) = with_dns_relay("udp").await;
    let server = format!("{ip}:53");
    let tools = bins::kt_tools();
    let (ok, out) = in_client(
        &tb,
        &[utf8(&tools), "dig", "web.", "A", "--server", &server],
    );
    assert!(ok, "{out}");
    assert_eq!(out, format!("rcode=No Error\nweb. {cluster_ip}\n"));
    let (_, out) = in_client(
        &tb,
        &[
            utf8(&tools),
            "dig",
            "web.",
            "A",
            "--server",
            &server,
            "--tcp",
        ],
    );
    assert!(
        !out.starts_with("rcode="),
        "only the protocol ktctl asked for is served: {out}"
    );
    tb.stop().await;
}

/// ktctl in the workstation namespace.
fn ktctl(tb: &Testbed, args: &[&str]) -> Background {
    Background::ktctl(tb, args)
}

/// A command in the workstation namespace; (exit ok, stdout).
fn on_workstation(tb: &Testbed, cmd: &[&str]) -> (bool, String) {
    workstation::run(tb, cmd)
}

fn first_line(body: &str) -> &str {
    body.lines().next().unwrap_or_default()
}

/// Names of everything kt could have created in `default`.
fn kt_objects(tb: &Testbed) -> String {
    kubectl_ok(
        &tb.kubeconfig,
        &["get", "pods,configmaps,services", "-o", "name"],
    )
}

async fn plain_testbed() -> Testbed {
    let tb = start_testbed(true).await;
    deploy_web(&tb);
    tb
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn ktctl_forward_through_the_openssh_shadow_survives_pod_replacement() {
    let tb = plain_testbed().await;
    // The default image is the v0.3.7 shadow (OpenSSH in the testbed): interop.
    let mut by_service = ktctl(&tb, &["forward", "web", "18080:80"]);
    let mut by_address = ktctl(&tb, &["forward", "web.default:80", "18081"]);
    by_service.ready().await;
    by_address.ready().await;
    assert!(
        by_service
            .log()
            .contains(" Now you can access port 80 of service 'web' via 'localhost:18080'")
    );
    for port in [18080, 18081] {
        let (ok, body) = on_workstation(
            &tb,
            &[
                "curl",
                "-s",
                "--max-time",
                "5",
                &format!("http://127.0.0.1:{port}/"),
            ],
        );
        assert!(
            ok && first_line(&body).starts_with("pod=web-"),
            "{port}: {body}"
        );
    }
    let before = web_pods(&tb);
    kubectl_ok(
        &tb.kubeconfig,
        &["delete", "pods", "-l", "app=web", "--wait=false"],
    );
    eventually("pods replaced", async || {
        seen(web_pods(&tb), |now| {
            now.is_disjoint(&before) && now.len() == 2
        })
    })
    .await;
    kubectl_ok(
        &tb.kubeconfig,
        &["rollout", "status", "deploy/web", "--timeout=60s"],
    );
    let new_pods = web_pods(&tb);
    for port in [18080, 18081] {
        let url = format!("http://127.0.0.1:{port}/");
        eventually(format!("port {port} reaches the new pods"), async || {
            let (ok, body) = on_workstation(&tb, &["curl", "-s", "--max-time", "5", &url]);
            let pod = first_line(&body).trim_start_matches("pod=").to_owned();
            seen(pod, |pod| ok && new_pods.contains(pod) && !pod.is_empty())
        })
        .await;
    }
    let (status, _) = by_service.interrupt();
    assert!(status.success());
    by_address.interrupt();
    tb.stop().await;
}

/// With the pod network routed to the workstation (a flat network, a VPN), ktctl goes straight
/// to the shadow pod once the port-forward has shown it the pod's host key; `--transport
/// portForward` keeps it on the API server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn ktctl_goes_straight_to_a_reachable_shadow_pod() {
    let tb = plain_testbed().await;
    workstation::route_pods_via_nodes(&tb);
    let mut direct = ktctl(
        &tb,
        &["forward", "web", "18080:80", "--sshConnections", "3", "-d"],
    );
    let mut forwarded = ktctl(
        &tb,
        &[
            "forward",
            "web",
            "18081:80",
            "--transport",
            "portForward",
            "--image",
            "kt-shadow:dev",
        ],
    );
    direct.ready().await;
    forwarded.ready().await;
    assert!(direct.log().contains(":22 directly"), "{}", direct.log());
    assert!(
        forwarded.log().contains("Port forward to pod") && !forwarded.log().contains("directly"),
        "{}",
        forwarded.log()
    );
    for port in [18080, 18081] {
        // Several requests: they go over different SSH connections in turn.
        for _ in 0..4 {
            let (ok, body) = on_workstation(
                &tb,
                &[
                    "curl",
                    "-s",
                    "--max-time",
                    "5",
                    &format!("http://127.0.0.1:{port}/"),
                ],
            );
            assert!(
                ok && first_line(&body).starts_with("pod=web-"),
                "{port}: {body}"
            );
        }
    }
    direct.interrupt();
    forwarded.interrupt();
    tb.stop().await;
}

/// 100 parallel connections of 1 MiB each way (echoed and compared by `kt-tools load`),
/// then a killed port-forward, then new connections again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn ktctl_forward_through_our_shadow_carries_100_parallel_mebibytes_and_reconnects() {
    let tb = plain_testbed().await;
    apply(&tb.kubeconfig, ECHO);
    kubectl_ok(
        &tb.kubeconfig,
        &["rollout", "status", "deploy/echo", "--timeout=60s"],
    );
    // kt's shadow by the name it is published under (kt_proto::images), as a user passes it.
    let shadow = kt_proto::images::reference(kt_proto::images::SHADOW);
    let mut ktctl = ktctl(&tb, &["forward", "echo", "19000", "--image", &shadow]);
    ktctl.ready().await;
    let tools = bins::kt_tools();
    let (ok, out) = on_workstation(
        &tb,
        &[utf8(&tools), "load", "127.0.0.1:19000", "100", "1048576"],
    );
    assert!(ok && out.trim() == "ok 100", "{out} {}", ktctl.log());
    // The API server drops every port-forward stream: the tunnel comes back by itself (the
    // next connection's tunnel open retries).
    tb.api.drop_streams();
    let (ok, out) = on_workstation(
        &tb,
        &[utf8(&tools), "load", "127.0.0.1:19000", "1", "65536"],
    );
    assert!(
        ok && out.trim() == "ok 1",
        "after the port-forward dropped: {out} {}",
        ktctl.log()
    );
    let (status, _) = ktctl.interrupt();
    assert!(status.success());
    tb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn ctrl_c_and_the_pid_file_kill_switch_leave_nothing_behind() {
    let tb = plain_testbed().await;
    let before = kt_objects(&tb);
    let home = tb.dir.join("workstation/home/.kt");
    // As `sudo ktctl` by user 4321: its ~/.kt files belong to that user (v0.3.7 chowns them).
    let ktctl_bin = bins::ktctl();
    let mut first = Background::spawn(
        &tb,
        Path::new("env"),
        &[
            "SUDO_UID=4321",
            "SUDO_GID=4322",
            ktctl_bin.to_str().unwrap(),
            "forward",
            "web",
            "18080:80",
            "--image",
            "kt-shadow:dev",
        ],
    );
    first.ready().await;
    let owners: Vec<(PathBuf, u32, u32)> = ["", "pid", "key"]
        .iter()
        .flat_map(|dir| {
            let dir = home.join(dir);
            let files: Vec<PathBuf> = std::fs::read_dir(&dir)
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect();
            std::iter::once(dir).chain(files)
        })
        .map(|path| {
            use std::os::unix::fs::MetadataExt as _;
            let meta = std::fs::metadata(&path).unwrap();
            (path, meta.uid(), meta.gid())
        })
        .collect();
    assert_eq!(
        owners.len(),
        5,
        "~/.kt, pid/, key/, a pid file, a key file: {owners:?}"
    );
    assert!(
        owners
            .iter()
            .all(|(_, uid, gid)| (*uid, *gid) == (4321, 4322)),
        "{owners:?}"
    );
    assert_ne!(
        kt_objects(&tb),
        before,
        "a shadow pod and ConfigMap exist while forwarding"
    );
    let (status, log) = first.interrupt();
    assert!(status.success(), "{log}");
    assert!(
        log.contains("Removed pid file") && log.contains("Removed key file"),
        "{log}"
    );

    let mut second = ktctl(&tb, &["forward", "web", "18080:80"]);
    second.ready().await;
    for pid_file in std::fs::read_dir(home.join("pid")).unwrap() {
        std::fs::remove_file(pid_file.unwrap().path()).unwrap();
    }
    let status = second.wait();
    assert!(status.success(), "{}", second.log());
    assert!(second.log().contains("Pid file was removed"));
    // Shadow pods terminate gracefully; wait for them to go.
    eventually("no shadow pod or ConfigMap left", async || {
        seen(kt_objects(&tb), |now| *now == before)
    })
    .await;
    for dir in ["pid", "key"] {
        let left: Vec<_> = std::fs::read_dir(home.join(dir))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "{dir} files left: {left:?}");
    }
    tb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "e2e"),
    ignore = "needs root and a simulated cluster: tests/run test"
)]
async fn bad_input_exits_1_naming_the_problem_and_creates_nothing() {
    let tb = plain_testbed().await;
    apply(
        &tb.kubeconfig,
        "apiVersion: v1\nkind: Service\nmetadata: {name: two}\nspec:\n  selector: {app: web}\n  ports: [{name: a, port: 80}, {name: b, port: 81}]\n",
    );
    let mut holder = ktctl(&tb, &["forward", "web", "18080:80"]);
    holder.ready().await;
    let before = kt_objects(&tb);
    for (args, needle) in [
        (&["forward", "nosuch"][..], "service 'nosuch' not found"),
        (
            &["forward", "web", "18082:81"][..],
            "port 81 not exists in service 'web'",
        ),
        (
            &["forward", "two"][..],
            "service 'two' has multiple ports, must specify one",
        ),
        (
            &["forward", "web", "18080:80"][..],
            "local port 18080 is not available",
        ),
        (
            &["forward", "10.96.0.1"][..],
            "address '10.96.0.1' needs a port",
        ),
        (&["forward", "web", "x:80"][..], "invalid local port 'x'"),
    ] {
        let out = workstation::exec(&tb)
            .arg(bins::ktctl())
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains("ERR Exit: ") && err.contains(needle),
            "{args:?}: {err}"
        );
        assert_eq!(kt_objects(&tb), before, "{args:?} created something");
    }
    holder.interrupt();
    tb.stop().await;
}
