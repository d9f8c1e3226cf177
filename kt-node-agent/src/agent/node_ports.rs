//! Traffic that never calls `connect()` in a pod (issue 16, item 6): a client outside the
//! cluster dialling `node_ip:nodePort` of an exchanged Service, or its LoadBalancer ingress
//! IP where the node owns it, is sent to the holding agent's listener too.
//!
//! Why nftables and not eBPF: the cgroup `connect4` programs see only sockets of the pods'
//! cgroup, and an outside connection has no socket on the node — it is a packet that
//! kube-proxy DNATs in `prerouting`. The cheapest place to take it first is the same hook at
//! a higher priority: every agent keeps an nftables table of its own, `ip kt_nodeport`:
//!
//! - `prerouting` (priority `dstnat - 10`, before kube-proxy's `dstnat`): `fib daddr type
//!   local tcp dport <nodePort> dnat to <holder>:<listenerPort>` per exchanged Service port,
//!   and `ip daddr <ingress IP> tcp dport <port> dnat …` per LoadBalancer ingress IP. The
//!   first NAT binding of a connection wins, so kube-proxy's rules never see it.
//! - `output` (priority -110): the same rules, for host-network processes of the node.
//! - `postrouting` (priority `srcnat - 10`): `masquerade` of those connections when the
//!   holder is another node, so replies come back through this node's conntrack.
//!
//! The table is derived from the same believed sessions, Services and lease clock as the
//! service map ([`desired`], pure), and each change is one `nft` transaction holding the
//! whole table ([`ruleset`]), so no reader sees half of it.
//!
//! Fail-open: an nftables table would survive a `kill -9` of the agent, unlike its eBPF
//! links. The table is created with `flags owner` (Linux ≥ 5.12): the kernel deletes it
//! when the netlink socket that created it closes. That socket is a long-lived `nft -i`
//! child whose stdin only the agent holds: when the agent dies, however it dies, the pipe
//! closes, `nft` reads end-of-file and exits, and the table is gone (measured in
//! `tests/suites/agent.rs`: about 0.6 s after `kill -9`, mostly the agent's own exit).
//! Clearing the table at start instead would leave it in force until the DaemonSet's
//! replacement runs. No session: no table and no `nft` process ([`converge`]).
//!
//! Not covered: mesh sessions (their NodePort traffic still goes to the pods through
//! kube-proxy, untouched: only pods' connects reach the node's router), IPv6
//! node ports (the table is `ip`; an IPv6 holder address is skipped), and LoadBalancer
//! ingress IPs a cloud load balancer owns (such an LB forwards to the nodePorts, which are
//! covered). `nft` must be on the agent's `PATH`; without it NodePort traffic is left to
//! kube-proxy and the agent says so once.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use chrono::{DateTime, Utc};
use kt_proto::session::SessionMode;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;

use super::redirects::ClusterState;

/// The agent's nftables table (family `ip`).
pub const TABLE: &str = "kt_nodeport";

/// What an outside connection is matched on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Frontend {
    /// Any local address of the node, this TCP port (`spec.ports[].nodePort`).
    NodePort(u16),
    /// A LoadBalancer ingress IP (`status.loadBalancer.ingress[].ip`) and the Service port.
    Ingress(SocketAddrV4),
}

/// Where connections to one [`Frontend`] go, and for which session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The holder's listener (`status.address`:`listenerPort`).
    pub to: SocketAddrV4,
    /// `namespace/name` of the session.
    pub session: String,
}

/// The node-port redirects in force at `now` on the node whose address is `node_ip`: for
/// each live exchange session (oldest first; the older keeps a frontend two sessions
/// claim, as in [`super::redirects::desired`]) and each of its listeners, the TCP Service
/// port's nodePort and its LoadBalancer ingress IPs → the holder's listener. A Service
/// port without a nodePort (ClusterIP Services) adds nothing; nor does an IPv6 holder.
pub fn desired(state: &ClusterState<'_>, now: DateTime<Utc>) -> BTreeMap<Frontend, Entry> {
    let mut out = BTreeMap::new();
    for session in state.live(SessionMode::Exchange, now) {
        let (Some(ns), Some(status)) = (session.metadata.namespace.as_deref(), &session.status)
        else {
            continue;
        };
        let Some(IpAddr::V4(holder)) = status.address else {
            continue;
        };
        let Some(service) = state.service(ns, &session.spec.service) else {
            continue;
        };
        let ingress: Vec<Ipv4Addr> = service
            .ingress_ips
            .iter()
            .filter_map(|ip| match ip {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            })
            .collect();
        for listener in &status.listeners {
            // A TCP Service port of the session (UDP ones are not exchanged).
            if !service
                .ports
                .iter()
                .any(|p| p.port == listener.port && p.tcp)
            {
                continue;
            }
            let entry = Entry {
                to: SocketAddrV4::new(holder, listener.listener_port),
                session: session.key(),
            };
            let node_port = service
                .node_ports
                .iter()
                .find(|(port, _)| *port == listener.port)
                .map(|(_, node_port)| *node_port);
            let frontends = node_port.map(Frontend::NodePort).into_iter().chain(
                ingress
                    .iter()
                    .map(|ip| Frontend::Ingress(SocketAddrV4::new(*ip, listener.port))),
            );
            for frontend in frontends {
                out.entry(frontend).or_insert_with(|| entry.clone());
            }
        }
    }
    out
}

/// The nft script, one line (one transaction in `nft -i`), that makes [`TABLE`] hold
/// exactly `entries`: with none, the table is deleted (created first so that deleting it
/// cannot fail); otherwise it is created with `flags owner` if missing, its chains too, then
/// flushed and filled. Masquerade is added for holders other than `node_ip`.
pub fn ruleset(entries: &BTreeMap<Frontend, Entry>, node_ip: IpAddr) -> String {
    let t = format!("ip {TABLE}");
    let mut s = format!("add table {t} {{ flags owner; }}; ");
    if entries.is_empty() {
        let _ = write!(s, "delete table {t}");
        return s;
    }
    let _ = write!(
        s,
        "add chain {t} prerouting {{ type nat hook prerouting priority dstnat - 10; policy accept; }}; \
         add chain {t} output {{ type nat hook output priority -110; policy accept; }}; \
         add chain {t} postrouting {{ type nat hook postrouting priority srcnat - 10; policy accept; }}; \
         flush table {t}"
    );
    let mut remote = std::collections::BTreeSet::new();
    for (frontend, entry) in entries {
        let matched = match frontend {
            Frontend::NodePort(port) => format!("fib daddr type local tcp dport {port}"),
            Frontend::Ingress(at) => format!("ip daddr {} tcp dport {}", at.ip(), at.port()),
        };
        for chain in ["prerouting", "output"] {
            let _ = write!(s, "; add rule {t} {chain} {matched} dnat to {}", entry.to);
        }
        if IpAddr::V4(*entry.to.ip()) != node_ip {
            remote.insert(entry.to);
        }
    }
    for to in remote {
        let _ = write!(
            s,
            "; add rule {t} postrouting ct status dnat ip daddr {} tcp dport {} masquerade",
            to.ip(),
            to.port()
        );
    }
    s
}

#[derive(Debug, thiserror::Error)]
pub enum NodePortError {
    #[error("failed to start `nft -i`")]
    Spawn(#[source] std::io::Error),
    #[error("failed to talk to `nft -i`")]
    Io(#[source] std::io::Error),
    #[error("`nft -i` ended")]
    Ended,
    #[error("`nft -i` did not answer within {0:?}")]
    Timeout(Duration),
    #[error("nft refused the ruleset: {0}")]
    Refused(String),
}

/// How long one transaction may take before the `nft` child is replaced.
const APPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// A command whose answer is one known line: sent after each transaction, its answer says
/// that everything before it was processed (stdout and stderr share one pipe, in order).
const SYNC: &str = "describe meta mark";
const SYNC_ANSWER: &str = "meta expression";

/// A long-lived `nft -i`: the owner of [`TABLE`] (see the module's doc).
struct Nft {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    output: tokio::io::Lines<tokio::io::BufReader<tokio::net::unix::pipe::Receiver>>,
    started: std::time::Instant,
}

impl Nft {
    fn start() -> Result<Self, NodePortError> {
        let (writer, reader) = tokio::net::unix::pipe::pipe().map_err(NodePortError::Spawn)?;
        let out = writer.into_blocking_fd().map_err(NodePortError::Spawn)?;
        let err = out.try_clone().map_err(NodePortError::Spawn)?;
        // The command (and with it this process's copies of the pipe's write end) is
        // dropped at the end of the statement: end-of-file comes when `nft` exits.
        let mut child = tokio::process::Command::new("nft")
            .arg("-i")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::from(out))
            .stderr(std::process::Stdio::from(err))
            .kill_on_drop(true)
            .spawn()
            .map_err(NodePortError::Spawn)?;
        let stdin = child.stdin.take().ok_or(NodePortError::Ended)?;
        Ok(Self {
            child,
            stdin,
            output: tokio::io::BufReader::new(reader).lines(),
            started: std::time::Instant::now(),
        })
    }

    /// Runs `script` (one line, one transaction) and waits for `nft`'s verdict.
    async fn apply(&mut self, script: &str) -> Result<(), NodePortError> {
        let exchange = async {
            self.stdin
                .write_all(format!("{script}\n{SYNC}\n").as_bytes())
                .await
                .map_err(NodePortError::Io)?;
            self.stdin.flush().await.map_err(NodePortError::Io)?;
            let mut errors = Vec::new();
            loop {
                let line = self
                    .output
                    .next_line()
                    .await
                    .map_err(NodePortError::Io)?
                    .ok_or(NodePortError::Ended)?;
                // `contains`, not `starts_with`: an interactive `nft` may put its prompt
                // before what it prints.
                if line.contains(SYNC_ANSWER) {
                    break;
                }
                // An error is printed as three lines: the message, the command, a marker.
                if line.contains("Error:") {
                    errors.push(line);
                }
            }
            if errors.is_empty() {
                Ok(())
            } else {
                Err(NodePortError::Refused(errors.join("; ")))
            }
        };
        tokio::time::timeout(APPLY_TIMEOUT, exchange)
            .await
            .map_err(|_| NodePortError::Timeout(APPLY_TIMEOUT))?
    }

    /// Closes `nft`'s stdin and waits for it: the kernel deletes the owned table.
    async fn close(mut self) {
        drop(self.stdin);
        if tokio::time::timeout(Duration::from_secs(2), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// How long to wait before starting `nft` again after it failed or exited; doubled after
/// each failure in a row, up to [`RETRY_MAX`].
const RETRY: Duration = Duration::from_secs(2);
const RETRY_MAX: Duration = Duration::from_secs(300);

/// How long an `nft` must have run for its exit to start the back-off afresh.
const STABLE: Duration = Duration::from_secs(60);

/// How many node-port redirects `script` ([`ruleset`]) holds: one `dnat to` in each of
/// two chains per frontend (the masquerade rules' `ct status dnat` is not one).
fn redirects_in(script: &str) -> usize {
    script.matches(" dnat to ").count() / 2
}

/// What [`converge`] did.
enum Converged {
    /// `nft` holds the table with this many redirects.
    Applied(usize),
    /// No redirect is wanted: `nft` was stopped, and its table went with it.
    Removed,
    /// No redirect is wanted and none was there.
    Nothing,
}

/// Makes [`TABLE`] hold `script`'s redirects: `nft` is started when redirects are wanted
/// and it is not running, and stopped when none are (the kernel deletes the table it
/// owns), so with no session there is neither a table nor an `nft` process.
async fn converge(nft: &mut Option<Nft>, script: &str) -> Result<Converged, NodePortError> {
    let redirects = redirects_in(script);
    if redirects == 0 {
        return Ok(match nft.take() {
            Some(running) => {
                running.close().await;
                Converged::Removed
            }
            None => Converged::Nothing,
        });
    }
    if nft.is_none() {
        *nft = Some(Nft::start()?);
    }
    nft.as_mut().expect("started above").apply(script).await?;
    Ok(Converged::Applied(redirects))
}

/// Keeps [`TABLE`] equal to the latest script in `wanted` ([`ruleset`], [`converge`])
/// until `shutdown`, then removes it. A failure is logged and retried with a fresh `nft`
/// (whose table starts empty) after [`RETRY`], twice as long after each failure in a row
/// up to [`RETRY_MAX`]; a new script ends the wait (and, if it differs from the one that
/// failed, the back-off starts afresh). An `nft` that exits on its own took the table with
/// it and is started again, after the same back-off unless it ran for [`STABLE`]. `nft`
/// missing is said once, as NodePort traffic then simply stays with kube-proxy. Never
/// fails the agent.
pub async fn run(
    mut wanted: tokio::sync::watch::Receiver<String>,
    shutdown: CancellationToken,
) -> Result<(), std::convert::Infallible> {
    let mut nft: Option<Nft> = None;
    let mut applied: Option<String> = None;
    let mut said_missing = false;
    let mut retry = RETRY;
    // Its own back-off: a successful apply after a restart does not end it.
    let mut restart = RETRY;
    loop {
        let script = wanted.borrow_and_update().clone();
        if applied.as_ref() != Some(&script) {
            match converge(&mut nft, &script).await {
                Ok(converged) => {
                    match converged {
                        Converged::Applied(rules) => {
                            tracing::info!(table = TABLE, rules, "node-port redirects applied");
                        }
                        Converged::Removed => {
                            tracing::info!(table = TABLE, "node-port redirects removed");
                        }
                        Converged::Nothing => {}
                    }
                    applied = Some(script);
                    retry = RETRY;
                }
                Err(error) => {
                    match &error {
                        NodePortError::Spawn(e) if e.kind() == std::io::ErrorKind::NotFound => {
                            if !said_missing {
                                tracing::warn!(
                                    "nft is not installed: NodePort and LoadBalancer traffic is not redirected"
                                );
                                said_missing = true;
                            }
                        }
                        _ => {
                            tracing::warn!(error = %kt_proto::error_chain(&error), ?retry, "failed to apply node-port redirects; retrying");
                        }
                    }
                    if let Some(old) = nft.take() {
                        old.close().await;
                    }
                    applied = None;
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(retry) => retry = (retry * 2).min(RETRY_MAX),
                        changed = wanted.changed() => {
                            if changed.is_err() {
                                break;
                            }
                            if *wanted.borrow() != script {
                                retry = RETRY;
                            }
                        }
                    }
                    continue;
                }
            }
        }
        let exited = async {
            match nft.as_mut() {
                Some(running) => (running.child.wait().await, running.started.elapsed()),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => break,
            changed = wanted.changed() => if changed.is_err() {
                break;
            },
            (status, ran) = exited => {
                if ran >= STABLE {
                    restart = RETRY;
                }
                tracing::warn!(?status, ?ran, after = ?restart, "`nft -i` exited and took the node-port redirects with it; starting it again");
                nft = None;
                applied = None;
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(restart) => restart = (restart * 2).min(RETRY_MAX),
                }
            }
        }
    }
    if let Some(nft) = nft {
        nft.close().await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use k8s_openapi::api::core::v1::Service;
    use kt_proto::session::KtSession;

    fn service(name: &str, ports: serde_json::Value, ingress: &[&str]) -> Service {
        let ingress: Vec<_> = ingress.iter().map(|ip| json!({"ip": ip})).collect();
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "dev"},
            "spec": {"type": "NodePort", "clusterIP": "10.96.0.20", "ports": ports},
            "status": {"loadBalancer": {"ingress": ingress}}
        }))
        .unwrap()
    }

    fn session(
        name: &str,
        service: &str,
        created: &str,
        holder: &str,
        listeners: &[(u16, u16)],
        now: DateTime<Utc>,
    ) -> KtSession {
        let ports: Vec<_> = listeners
            .iter()
            .map(|(p, _)| json!({"port": p, "localPort": 18080}))
            .collect();
        let listeners: Vec<_> = listeners
            .iter()
            .map(|(p, l)| json!({"port": p, "listenerPort": l}))
            .collect();
        serde_json::from_value(json!({
            "apiVersion": "kt.dev/v1alpha1", "kind": "KtSession",
            "metadata": {"name": name, "namespace": "dev", "creationTimestamp": created},
            "spec": {"owner": "a@b", "mode": "exchange", "service": service,
                     "ports": ports, "publicKey": "k"},
            "status": {"node": "node-1", "address": holder,
                       "listeners": listeners, "renewTime": now}
        }))
        .unwrap()
    }

    fn to(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    #[test]
    fn only_the_exchanged_ports_node_port_and_ingress_go_to_the_holder() {
        let now = Utc::now();
        let svc = service(
            "web",
            json!([{"name": "http", "port": 80, "nodePort": 30080},
                   {"name": "admin", "port": 81, "nodePort": 30081},
                   {"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053}]),
            &["192.0.2.7"],
        );
        let s = session(
            "s",
            "web",
            "2026-01-01T00:00:00Z",
            "172.30.0.12",
            &[(80, 40001)],
            now,
        );
        let got = desired(&ClusterState::new(&[&s], &[&svc], &[]), now);
        let entry = Entry {
            to: to("172.30.0.12:40001"),
            session: "dev/s".into(),
        };
        assert_eq!(
            got,
            BTreeMap::from([
                (Frontend::NodePort(30080), entry.clone()),
                (Frontend::Ingress(to("192.0.2.7:80")), entry),
            ]),
            "81 is not exchanged"
        );
    }

    #[test]
    fn the_older_session_keeps_a_node_port_and_expired_or_clusterip_ones_add_nothing() {
        let now = Utc::now();
        let svc = service("web", json!([{"port": 80, "nodePort": 30080}]), &[]);
        let plain: Service = serde_json::from_value(json!({
            "metadata": {"name": "plain", "namespace": "dev"},
            "spec": {"clusterIP": "10.96.0.21", "ports": [{"port": 80}]}
        }))
        .unwrap();
        let old = session(
            "alice",
            "web",
            "2026-01-01T00:00:00Z",
            "172.30.0.11",
            &[(80, 40001)],
            now,
        );
        let new = session(
            "bob",
            "web",
            "2026-01-02T00:00:00Z",
            "172.30.0.12",
            &[(80, 40002)],
            now,
        );
        let on_plain = session(
            "carol",
            "plain",
            "2026-01-01T00:00:00Z",
            "172.30.0.11",
            &[(80, 40003)],
            now,
        );
        let got = desired(
            &ClusterState::new(&[&new, &old, &on_plain], &[&svc, &plain], &[]),
            now,
        );
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[&Frontend::NodePort(30080)].session, "dev/alice");

        let expired = session(
            "alice",
            "web",
            "2026-01-01T00:00:00Z",
            "172.30.0.11",
            &[(80, 40001)],
            now - chrono::TimeDelta::seconds(60),
        );
        assert!(desired(&ClusterState::new(&[&expired], &[&svc], &[]), now).is_empty());
    }

    #[test]
    fn the_ruleset_masquerades_only_for_a_holder_on_another_node_and_deletes_when_empty() {
        let node: IpAddr = "172.30.0.11".parse().unwrap();
        let entries = BTreeMap::from([
            (
                Frontend::NodePort(30080),
                Entry {
                    to: to("172.30.0.11:40001"),
                    session: "dev/a".into(),
                },
            ),
            (
                Frontend::NodePort(30090),
                Entry {
                    to: to("172.30.0.12:40002"),
                    session: "dev/b".into(),
                },
            ),
        ]);
        let s = ruleset(&entries, node);
        assert!(!s.contains('\n'), "one line, one transaction: {s}");
        assert!(
            s.starts_with("add table ip kt_nodeport { flags owner; }; "),
            "{s}"
        );
        assert!(s.contains("priority dstnat - 10"), "before kube-proxy: {s}");
        assert!(s.contains("; flush table ip kt_nodeport; "), "{s}");
        for chain in ["prerouting", "output"] {
            assert!(s.contains(&format!(
                "add rule ip kt_nodeport {chain} fib daddr type local tcp dport 30080 dnat to 172.30.0.11:40001"
            )), "{s}");
        }
        assert!(s.ends_with(
            "; add rule ip kt_nodeport postrouting ct status dnat ip daddr 172.30.0.12 tcp dport 40002 masquerade"
        ), "{s}");
        assert_eq!(s.matches("masquerade").count(), 1, "{s}");
        assert_eq!(
            redirects_in(&s),
            2,
            "the masquerade's `ct status dnat` is no redirect"
        );
        assert_eq!(
            ruleset(&BTreeMap::new(), node),
            "add table ip kt_nodeport { flags owner; }; delete table ip kt_nodeport"
        );
        assert_eq!(redirects_in(&ruleset(&BTreeMap::new(), node)), 0);
    }
}
