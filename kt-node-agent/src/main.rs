//! `kt-node-agent`: the cluster side of kt.
//!
//! Roles: `agent` (the DaemonSet: eBPF redirects from session objects), `shadow` (the
//! per-session SSH endpoint ktctl uses when no agent is installed), `router` (the mesh
//! router pod of v0.3.7's auto mode; invoked as `router …` it is v0.3.7's `/usr/sbin/router`
//! command), `navigator` (the ephemeral container of `exchange --mode ephemeral`). `check` tells an admin whether a node can run kt's eBPF redirect.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use kt_node_agent::{agent, cgroup, dns_relay, ebpf, navigator, router_role, shadow};
use kt_proto::{agent as contract, env};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
// `--version` after a role too (`kt-node-agent shadow --version`): an image's entrypoint
// with its role built in still says what it is (tests/scripts/images.sh asks).
#[command(name = "kt-node-agent", version = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("KT_GIT_COMMIT"), ", ", env!("KT_TARGET"), ")"), propagate_version = true, about = "kt node agent")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check that this node can run kt's eBPF redirect: kernel version, cgroup2, and that the
    /// kernel verifier accepts every program. With --cgroup, also attach to that cgroup2
    /// directory and detach again.
    Check {
        /// A cgroup2 directory to test-attach to (for example the kubepods cgroup).
        #[arg(long)]
        cgroup: Option<PathBuf>,
    },
    /// Run the agent role (DaemonSet, host network): attach the eBPF redirect to the pods'
    /// cgroup and program it from the session objects.
    Agent {
        /// This node's name (downward API `spec.nodeName`). Required.
        #[arg(long, env = env::NODE_NAME)]
        node_name: Option<String>,
        /// This node's address (downward API `status.hostIP`): where the tunnel listeners
        /// of the sessions this agent holds are reached. Required.
        #[arg(long, env = env::NODE_IP)]
        node_ip: Option<std::net::IpAddr>,
        /// Address of the SSH server that holds sessions.
        #[arg(long, env = env::AGENT_SSH, default_value_t = SocketAddr::from(([0, 0, 0, 0], contract::SSH_PORT)))]
        ssh_listen: SocketAddr,
        /// The pods' cgroup2 directory; detected from the agent's own cgroup when not given
        /// (the topmost `kubepods*` directory).
        #[arg(long, env = env::AGENT_CGROUP)]
        cgroup: Option<PathBuf>,
        /// Address of `/healthz`, `/readyz` and `/metrics`.
        #[arg(long, env = env::AGENT_HTTP, default_value_t = SocketAddr::from(([0, 0, 0, 0], contract::HTTP_PORT)))]
        http_listen: SocketAddr,
        /// Address ranges `connect` sessions may reach besides the cluster's pods and
        /// Services (comma separated, `192.168.50.0/24`).
        #[arg(long, env = env::EGRESS_ALLOW, value_delimiter = ',')]
        egress_allow: Vec<kt_proto::net::Cidr>,
        /// Seconds between lease checks when nothing changes (a lease running out wakes the
        /// agent at that moment anyway).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
        lease_check_seconds: u64,
        /// Seconds a session nobody holds (its ktctl was killed) stays before the agents
        /// delete it; a never-held session gets its lease on top, and a preview session goes
        /// after its lease
        #[arg(long, env = env::SESSION_GRACE, default_value_t = 300)]
        session_grace_seconds: u64,
        /// Seconds a UDP flow of an exchanged UDP port (one pod address and port) lives
        /// without a datagram either way (conntrack keeps an unreplied one 30 s, a stream
        /// 120 s).
        #[arg(long, env = env::UDP_FLOW_IDLE, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
        udp_flow_idle_seconds: u64,
    },
    /// Run the shadow role: an SSH server for one ktctl session (ktctl v0.3.7 contract).
    Shadow {
        /// Address to listen on.
        #[arg(long, env = env::SHADOW_LISTEN, default_value = "0.0.0.0:22")]
        listen: SocketAddr,
        /// Authorized public keys (the ConfigMap key `authorized` that ktctl mounts).
        #[arg(
            long,
            env = env::SHADOW_AUTHORIZED_KEYS,
            default_value = "/root/authorized/authorized_keys"
        )]
        authorized_keys: Vec<PathBuf>,
        #[command(flatten)]
        dns: DnsRelayArgs,
    },
    /// Run the router role (v0.3.7's mesh router pod) with no arguments; with `setup <svc>
    /// <port:targetPort,...> <header:version>`, `add <header:version>` or `remove
    /// <header:version>`, change its routes (what ktctl runs as `/usr/sbin/router …`).
    Router {
        /// The state file the server follows and the commands edit.
        #[arg(long, env = "KT_ROUTER_STATE", default_value = router_role::STATE_FILE)]
        state: PathBuf,
        /// `setup …`, `add …` or `remove …`.
        command: Vec<String>,
    },
    /// Run the navigator role: the ephemeral container of `exchange --mode ephemeral`, which
    /// redirects the pod's inbound exposed ports to ktctl's SSH reverse tunnels (nftables,
    /// in the pod's network namespace) and undoes it when the session ends.
    Navigator {
        /// Address of the SSH server.
        #[arg(long, env = env::NAVIGATOR_LISTEN, default_value = "0.0.0.0:22")]
        listen: SocketAddr,
        /// The session's public key(s), OpenSSH lines.
        #[arg(long, env = env::AUTHORIZED_KEYS)]
        authorized_keys: String,
        /// Seconds to wait for the first session before ending.
        #[arg(long, default_value_t = 120)]
        first_session_seconds: u64,
        /// Seconds a session that ended without its goodbye (ktctl killed, network lost)
        /// has to come back before the navigator ends; the redirect is removed at once.
        #[arg(long, default_value_t = 30)]
        reconnect_grace_seconds: u64,
    },
    /// Run only the shadow's DNS relay: what ktctl v0.3.7's shadow image runs beside sshd
    /// (`/usr/sbin/shadow`) when `KT_DNS_PROTOCOL` is set, for images built on OpenSSH.
    DnsRelay {
        #[command(flatten)]
        dns: DnsRelayArgs,
    },
}

/// The DNS relay's settings (ktctl v0.3.7's shadow environment).
#[derive(clap::Args)]
struct DnsRelayArgs {
    /// Relay cluster DNS on --dns-listen over this protocol (ktctl v0.3.7 sets
    /// `KT_DNS_PROTOCOL` for `connect`: `tcp` in localDNS mode, else `udp`). The shadow role
    /// runs no relay without it; `dns-relay` defaults to `udp`.
    #[arg(long, env = env::DNS_PROTOCOL, value_enum)]
    dns_protocol: Option<dns_relay::Protocol>,
    /// Address of the DNS relay.
    #[arg(long, env = env::DNS_LISTEN, default_value = "0.0.0.0:53")]
    dns_listen: SocketAddr,
    /// The workstation's own search domains (comma-separated), stripped from names before
    /// they are expanded with the pod's search list.
    #[arg(long, env = env::LOCAL_DOMAIN, value_delimiter = ',')]
    local_domain: Vec<String>,
    /// The pod's resolver configuration the relay follows.
    #[arg(long, default_value = "/etc/resolv.conf")]
    resolv_conf: PathBuf,
}

impl DnsRelayArgs {
    fn config(self, default_protocol: Option<dns_relay::Protocol>) -> Option<dns_relay::DnsConfig> {
        Some(dns_relay::DnsConfig {
            protocol: self.dns_protocol.or(default_protocol)?,
            listen: self.dns_listen,
            resolv_conf: self.resolv_conf,
            local_domains: self.local_domain,
        })
    }
}

/// `EX_USAGE` (sysexits.h): a configuration the role cannot run with.
const EX_USAGE: u8 = 64;

fn main() -> ExitCode {
    // Called as `router` (the image links it at /usr/sbin/router): v0.3.7's router command.
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .is_some_and(|n| n == "router")
    {
        argv.insert(1, "router".into());
    }
    let args = match Args::try_parse_from(argv) {
        Ok(args) => args,
        Err(error) if !error.use_stderr() => {
            let _ = error.print();
            return ExitCode::SUCCESS;
        }
        Err(error) => {
            let _ = error.print();
            return ExitCode::from(EX_USAGE);
        }
    };
    init_logging(&args.command);
    match args.command {
        Command::Check { cgroup } => match check(cgroup) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                tracing::error!(error = %kt_proto::error_chain(&error), "node check failed");
                ExitCode::FAILURE
            }
        },
        Command::Agent {
            node_name,
            node_ip,
            ssh_listen,
            cgroup,
            http_listen,
            egress_allow,
            lease_check_seconds,
            session_grace_seconds,
            udp_flow_idle_seconds,
        } => {
            // Without its node's name and address the agent cannot hold sessions: refuse to
            // start (and say what is missing) rather than run Ready and useless.
            let missing: Vec<&str> = [
                (
                    node_name.as_deref().is_none_or(str::is_empty),
                    env::NODE_NAME,
                ),
                (node_ip.is_none(), env::NODE_IP),
            ]
            .into_iter()
            .filter_map(|(missing, name)| missing.then_some(name))
            .collect();
            let (Some(node_name), Some(node_ip)) = (node_name.filter(|n| !n.is_empty()), node_ip)
            else {
                tracing::error!(
                    ?missing,
                    "the agent needs its node's name and address (downward API; see deploy/base/daemonset.yaml)"
                );
                return ExitCode::from(EX_USAGE);
            };
            serve("agent", |shutdown| {
                agent::run(
                    agent::AgentConfig {
                        node_name,
                        node_ip,
                        ssh_listen,
                        cgroup,
                        http_listen,
                        lease_check: std::time::Duration::from_secs(lease_check_seconds),
                        egress_allow,
                        session_grace: std::time::Duration::from_secs(session_grace_seconds),
                        udp_flow_idle: std::time::Duration::from_secs(udp_flow_idle_seconds),
                    },
                    shutdown,
                )
            })
        }
        Command::Shadow {
            listen,
            authorized_keys,
            dns,
        } => serve("shadow", |shutdown| {
            shadow::run(
                shadow::ShadowConfig {
                    listen,
                    authorized_keys,
                    dns: dns.config(None),
                },
                shutdown,
            )
        }),
        Command::Navigator {
            listen,
            authorized_keys,
            first_session_seconds,
            reconnect_grace_seconds,
        } => serve("navigator", |shutdown| {
            navigator::run(
                navigator::NavigatorConfig {
                    listen,
                    authorized_keys,
                    first_session_within: std::time::Duration::from_secs(first_session_seconds),
                    reconnect_grace: std::time::Duration::from_secs(reconnect_grace_seconds),
                },
                shutdown,
            )
        }),
        Command::Router { state, command } if command.is_empty() => {
            serve("router", |shutdown| router_role::serve(state, shutdown))
        }
        Command::Router { state, command } => match router_role::command(&state, &command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("router: {}", kt_proto::error_chain(&error));
                ExitCode::FAILURE
            }
        },
        Command::DnsRelay { dns } => {
            let config = dns
                .config(Some(dns_relay::Protocol::Udp))
                .expect("a default protocol");
            serve("dns-relay", |shutdown| dns_relay::run(config, shutdown))
        }
    }
}

/// Logs to stderr, as text or (`KT_LOG_FORMAT=json`) one JSON object per line. The filter is
/// `KT_AGENT_LOG`; the shadow also follows v0.3.7's `KT_LOG_LEVEL` (`debug`/`info`).
fn init_logging(command: &Command) {
    let fallback = match command {
        Command::Shadow { .. } | Command::DnsRelay { .. } => {
            std::env::var(env::LOG_LEVEL).unwrap_or_else(|_| "info".into())
        }
        _ => "info".into(),
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env(env::LOG)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(fallback));
    // Colours only on a terminal: a pod's log is read by `kubectl logs` and log shippers,
    // where escape codes split `key=value` fields and timestamps.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if std::env::var(env::LOG_FORMAT).is_ok_and(|f| f == "json") {
        builder.json().with_current_span(true).init();
    } else {
        builder.init();
    }
}

/// Runs a long-lived role on a multi-threaded runtime until SIGTERM or SIGINT.
fn serve<F, E>(role: &str, run: impl FnOnce(CancellationToken) -> F) -> ExitCode
where
    F: Future<Output = Result<(), E>>,
    E: std::error::Error,
{
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(error) => {
            tracing::error!(%error, "failed to start the runtime");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let _guard = shutdown.clone().drop_guard();
        let signals = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            signals.cancel();
        });
        run(shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = %kt_proto::error_chain(&error), "{role} failed");
            ExitCode::FAILURE
        }
    }
}

/// SIGTERM (how Kubernetes stops a pod) or SIGINT.
async fn wait_for_signal() {
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn check(target: Option<PathBuf>) -> Result<(), ebpf::EbpfError> {
    match cgroup::cgroup2_mount() {
        Some(mount) => tracing::info!(mount = %mount.display(), "cgroup2 hierarchy found"),
        None => tracing::warn!("no cgroup2 hierarchy is mounted"),
    }
    let mut redirector = ebpf::Redirector::load()?;
    tracing::info!("kernel verifier accepted every program");
    if let Some(dir) = target {
        redirector.attach(&dir)?;
    }
    Ok(())
}
