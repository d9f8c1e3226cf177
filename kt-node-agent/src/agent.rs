//! Role `agent` (DaemonSet, host network): attaches kt's eBPF programs to the pods' cgroup
//! of its node and keeps the service map equal to what the session objects say
//! ([`redirects::desired`]): every agent programs every live session, so a client on any
//! node is redirected to the holding agent's listener; entries go when a lease expires
//! (fail-open), and all of them go with the agent (links are not pinned). Serves
//! `/healthz`, `/readyz` and `/metrics` (Prometheus text).
//!
//! It also holds sessions ([`hold`]): ktctl's SSH connections arrive on the node's
//! [`kt_proto::session::AGENT_SSH_PORT`], and their tunnel listeners are what the redirects
//! point at.

pub mod hold;
pub mod redirects;

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures::StreamExt as _;
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kt_ebpf_common::{Mode, Redirect};
use kt_proto::session::{KtSession, api_resource};
use kube::{
    Api,
    runtime::{WatchStreamExt as _, reflector, watcher},
};
use tokio::sync::Notify;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{cgroup, ebpf};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("no cgroup2 hierarchy is mounted")]
    NoCgroup2,
    #[error("failed to read the agent's own cgroup")]
    OwnCgroup(#[source] std::io::Error),
    #[error("cannot tell the pods' cgroup from the agent's own ({}); pass --cgroup", own.display())]
    NoPodsCgroup { own: PathBuf },
    #[error("eBPF")]
    Ebpf(#[from] ebpf::EbpfError),
    #[error("no Kubernetes configuration (in-cluster or kubeconfig)")]
    Kube(#[source] kube::Error),
    #[error("failed to listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub node_name: String,
    /// This node's address (the tunnel listeners'); without it the agent holds no sessions.
    pub node_ip: Option<std::net::IpAddr>,
    /// The hold server's SSH address.
    pub ssh_listen: SocketAddr,
    /// The pods' cgroup; detected from the agent's own cgroup when `None`.
    pub cgroup: Option<PathBuf>,
    /// `/healthz`, `/readyz`, `/metrics`.
    pub http_listen: SocketAddr,
    /// The longest wait between recomputations when nothing changes; a lease running out
    /// wakes the agent at that moment.
    pub lease_check: Duration,
}

/// What the reconcile loop and the HTTP endpoints share.
struct Shared {
    ready: AtomicBool,
    tunnel_bytes: Arc<crate::ssh_server::TunnelBytes>,
    /// Locked briefly: map updates and counter reads are single syscalls each.
    programmed: Mutex<Programmed>,
}

/// The eBPF side and what was last written to it.
struct Programmed {
    redirector: ebpf::Redirector,
    desired: BTreeMap<SocketAddr, redirects::Target>,
    /// What the service map holds, as last written; `None` after a failed write, when only
    /// reading the map tells.
    written: Option<HashMap<SocketAddr, Redirect>>,
    ids: SvcIds,
}

/// Runs the agent until `shutdown`; the programs are detached on the way out.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    let mount = cgroup::cgroup2_mount().ok_or(AgentError::NoCgroup2)?;
    let own = cgroup::cgroup_of_pid(&mount, std::process::id()).map_err(AgentError::OwnCgroup)?;
    let pods = match config.cgroup.clone() {
        Some(dir) => dir,
        None => pods_cgroup(&mount, &own)?,
    };
    let mut redirector = ebpf::Redirector::load()?;
    redirector.attach(&pods)?;
    // The agent dials real endpoints; its own sockets are never redirected.
    redirector.skip_cgroup(&own)?;
    let tasks = TaskTracker::new();
    tasks.spawn(redirector.log_forwarder(shutdown.clone())?);

    let client = kube::Client::try_default()
        .await
        .map_err(AgentError::Kube)?;
    let changed = Arc::new(Notify::new());
    let sessions = watch(
        &tasks,
        &shutdown,
        &changed,
        Api::<KtSession>::all_with(client.clone(), &api_resource()),
        reflector::store::Writer::new(api_resource()),
    );
    let services = watch(
        &tasks,
        &shutdown,
        &changed,
        Api::<Service>::all(client.clone()),
        reflector::store::Writer::default(),
    );
    let slices = watch(
        &tasks,
        &shutdown,
        &changed,
        Api::<EndpointSlice>::all(client.clone()),
        reflector::store::Writer::default(),
    );

    let shared = Arc::new(Shared {
        ready: AtomicBool::new(false),
        tunnel_bytes: Arc::default(),
        programmed: Mutex::new(Programmed {
            redirector,
            desired: BTreeMap::new(),
            // Freshly loaded: the map is empty.
            written: Some(HashMap::new()),
            ids: SvcIds::default(),
        }),
    });
    let listener = tokio::net::TcpListener::bind(config.http_listen)
        .await
        .map_err(|source| AgentError::Listen {
            addr: config.http_listen,
            source,
        })?;
    tasks.spawn(serve_http(listener, shared.clone(), shutdown.clone()));
    match config.node_ip {
        Some(node_ip) => {
            let ssh = tokio::net::TcpListener::bind(config.ssh_listen)
                .await
                .map_err(|source| AgentError::Listen {
                    addr: config.ssh_listen,
                    source,
                })?;
            let context = hold::HoldContext {
                node_name: config.node_name.clone(),
                node_ip,
                sessions: sessions.clone(),
                client: client.clone(),
                tunnel_bytes: shared.tunnel_bytes.clone(),
            };
            tasks.spawn(hold::serve(ssh, context, shutdown.clone()));
        }
        None => tracing::warn!("no node address (KT_NODE_IP): holding no sessions"),
    }
    tracing::info!(node = %config.node_name, pods_cgroup = %pods.display(), http = %config.http_listen, "agent running");

    let synced = async {
        let _ = tokio::join!(
            sessions.wait_until_ready(),
            services.wait_until_ready(),
            slices.wait_until_ready()
        );
    };
    tokio::select! {
        () = shutdown.cancelled() => {}
        () = synced => {
            loop {
                let (all_sessions, all_services, all_slices) =
                    (sessions.state(), services.state(), slices.state());
                let state = redirects::ClusterState {
                    sessions: &all_sessions.iter().map(AsRef::as_ref).collect::<Vec<_>>(),
                    services: &all_services.iter().map(AsRef::as_ref).collect::<Vec<_>>(),
                    slices: &all_slices.iter().map(AsRef::as_ref).collect::<Vec<_>>(),
                };
                let now = chrono::Utc::now();
                let desired = redirects::desired(&state, now);
                // Wake when the next lease runs out, or after the check interval.
                let wake = redirects::next_expiry(state.sessions, now)
                    .and_then(|end| (end - now).to_std().ok())
                    .map_or(config.lease_check, |left| {
                        (left + Duration::from_millis(1)).min(config.lease_check)
                    });
                let applied = shared.programmed().apply(desired);
                if let Err(error) = &applied {
                    tracing::error!(error = %kt_proto::error_chain(error), "failed to program redirects");
                }
                shared.ready.store(applied.is_ok(), Ordering::Relaxed);
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = changed.notified() => {}
                    () = tokio::time::sleep(wake) => {}
                }
            }
        }
    }
    shared.ready.store(false, Ordering::Relaxed);
    tasks.close();
    tasks.wait().await;
    // The last holder of `shared` (the HTTP server has stopped): the programs detach here.
    drop(shared);
    Ok(())
}

impl Shared {
    fn programmed(&self) -> std::sync::MutexGuard<'_, Programmed> {
        self.programmed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The Prometheus text of `/metrics`.
    fn metrics(&self) -> String {
        let mut text = self.programmed().metrics();
        let bytes = &self.tunnel_bytes;
        let _ = writeln!(
            text,
            "# HELP kt_agent_tunnel_bytes_total Bytes through this agent's tunnel listeners (counted when a connection ends).\n# TYPE kt_agent_tunnel_bytes_total counter\nkt_agent_tunnel_bytes_total{{direction=\"to_workstation\"}} {}\nkt_agent_tunnel_bytes_total{{direction=\"from_workstation\"}} {}",
            bytes.to_workstation.load(Ordering::Relaxed),
            bytes.from_workstation.load(Ordering::Relaxed)
        );
        text
    }
}

fn pods_cgroup(mount: &Path, own: &Path) -> Result<PathBuf, AgentError> {
    let relative = own.strip_prefix(mount).unwrap_or(own);
    cgroup::pods_root(&relative.to_string_lossy())
        .map(|dir| mount.join(dir))
        .ok_or_else(|| AgentError::NoPodsCgroup {
            own: own.to_owned(),
        })
}

/// A reflector for `api` kept current by a tracked task; every event wakes `changed`.
fn watch<K>(
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
    changed: &Arc<Notify>,
    api: Api<K>,
    writer: reflector::store::Writer<K>,
) -> reflector::Store<K>
where
    K: kube::Resource
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    K::DynamicType: std::hash::Hash + Eq + Clone + Send + Sync,
{
    let store = writer.as_reader();
    let events = watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer);
    let (changed, stop) = (changed.clone(), shutdown.clone());
    tasks.spawn(async move {
        let mut events = std::pin::pin!(events);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                event = events.next() => match event {
                    Some(Ok(_)) => changed.notify_one(),
                    Some(Err(error)) => tracing::warn!(%error, "watch failed, retrying"),
                    None => return,
                },
            }
        }
    });
    store
}

/// Stable per-session ids for the per-service counters, reused after a session goes.
#[derive(Default)]
struct SvcIds {
    ids: HashMap<String, u32>,
    free: Vec<u32>,
    next: u32,
}

impl SvcIds {
    fn id(&mut self, session: &str) -> u32 {
        if let Some(id) = self.ids.get(session) {
            return *id;
        }
        let id = self.free.pop().unwrap_or_else(|| {
            self.next += 1;
            self.next
        });
        self.ids.insert(session.to_owned(), id);
        id
    }

    fn retain(&mut self, live: impl Fn(&str) -> bool) {
        let free = &mut self.free;
        self.ids.retain(|session, id| {
            let keep = live(session);
            if !keep {
                free.push(*id);
            }
            keep
        });
    }
}

impl Programmed {
    /// Makes the service map equal to `desired`: writes what differs from what it holds,
    /// removes what is not wanted. Connections already redirected stay where they are.
    fn apply(
        &mut self,
        desired: BTreeMap<SocketAddr, redirects::Target>,
    ) -> Result<(), ebpf::EbpfError> {
        let current = match self.written.take() {
            Some(written) => written,
            None => self.redirector.entries()?.into_iter().collect(),
        };
        let mut written = HashMap::with_capacity(desired.len());
        for (service, target) in &desired {
            let redirect = Redirect::to(target.to, self.ids.id(&target.session), Mode::Exchange);
            if current.get(service) != Some(&redirect) {
                tracing::info!(%service, to = %target.to, session = %target.session, "redirect");
                self.redirector.insert(*service, redirect)?;
            }
            written.insert(*service, redirect);
        }
        for service in current.keys().filter(|s| !desired.contains_key(s)) {
            tracing::info!(%service, "redirect removed");
            self.redirector.remove(*service)?;
        }
        let live: std::collections::HashSet<&str> =
            desired.values().map(|t| t.session.as_str()).collect();
        self.ids.retain(|session| live.contains(session));
        self.written = Some(written);
        self.desired = desired;
        Ok(())
    }

    /// The map's part of `/metrics`, with the eBPF counters as they are now.
    fn metrics(&self) -> String {
        let (redirector, desired, ids) = (&self.redirector, &self.desired, &self.ids);
        let mut out = String::new();
        let sessions: std::collections::BTreeSet<&str> =
            desired.values().map(|t| t.session.as_str()).collect();
        let _ = writeln!(
            out,
            "# HELP kt_agent_sessions Sessions whose redirect is in force.\n# TYPE kt_agent_sessions gauge\nkt_agent_sessions {}",
            sessions.len()
        );
        let _ = writeln!(
            out,
            "# HELP kt_agent_redirect_entries Entries in the eBPF service map.\n# TYPE kt_agent_redirect_entries gauge\nkt_agent_redirect_entries {}",
            desired.len()
        );
        if let Ok(counters) = redirector.counters() {
            let _ = writeln!(
                out,
                "# HELP kt_agent_ebpf_events_total Events of the eBPF programs on this node.\n# TYPE kt_agent_ebpf_events_total counter"
            );
            for (name, value) in counters.iter() {
                let _ = writeln!(
                    out,
                    "kt_agent_ebpf_events_total{{event=\"{name}\"}} {value}"
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP kt_agent_connects_redirected_total Connects redirected on this node, per session.\n# TYPE kt_agent_connects_redirected_total counter"
        );
        for session in sessions {
            let Some(id) = ids.ids.get(session) else {
                continue;
            };
            if let Ok(stats) = redirector.service_stats(*id) {
                let (namespace, name) = session.split_once('/').unwrap_or(("", session));
                let _ = writeln!(
                    out,
                    "kt_agent_connects_redirected_total{{namespace=\"{namespace}\",session=\"{name}\"}} {}",
                    stats.connects_redirected
                );
            }
        }
        out
    }
}

async fn serve_http(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    use axum::{Router, http::StatusCode, routing::get};
    let ready = shared.clone();
    let metrics = shared;
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || async move {
                if ready.ready.load(Ordering::Relaxed) {
                    (StatusCode::OK, "ready")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready")
                }
            }),
        )
        .route("/metrics", get(move || async move { metrics.metrics() }));
    if let Err(error) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::warn!(%error, "HTTP server stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::SvcIds;

    #[test]
    fn service_ids_are_stable_and_reused() {
        let mut ids = SvcIds::default();
        let a = ids.id("dev/a");
        let b = ids.id("dev/b");
        assert_ne!(a, b);
        assert_eq!(ids.id("dev/a"), a);
        ids.retain(|s| s == "dev/b");
        assert_eq!(ids.id("dev/c"), a, "a's id is free again");
        assert_eq!(ids.id("dev/b"), b);
    }
}
