//! Role `agent` (DaemonSet, host network): attaches kt's eBPF programs to the pods' cgroup
//! of its node and keeps the service map equal to what the session objects say
//! ([`redirects::desired`], kept up to date from pass to pass by [`ledger`], which writes
//! only what changed): every agent programs every live session, so a client on any node is
//! redirected to the holding agent's listener; entries go when a lease expires (fail-open),
//! and all of them go with the agent (links are not pinned).
//!
//! It also holds sessions ([`hold`]): ktctl's SSH connections arrive on the node's
//! [`kt_proto::agent::SSH_PORT`], and their tunnel listeners are what the redirects point
//! at. Mesh sessions' traffic goes to this node's [`router`] instead, which routes each
//! request by its header. Connections from outside the cluster to an exchanged Service's
//! nodePort are DNATed to the holder by an nftables table this agent owns ([`node_ports`]). [`admin`] serves `/healthz`, `/readyz` and `/metrics` ([`metrics`]).
//!
//! Its work runs as named tasks ([`crate::tasks`]): log forwarding, five watches, the
//! reconcile loop, the acknowledgements, the HTTP and SSH servers, the mesh router, and the
//! collection of sessions nobody holds any more ([`collect`]). The first that fails stops the
//! agent with an error, so Kubernetes restarts it instead of keeping a half-dead agent Ready.
//!
//! Design notes: the holder writes `status`, then reads it back through its own watch before
//! it programs its own map — that round trip is the floor of agent mode's ready time. ktctl
//! picks the agent that holds its session (see `kt-cli`'s agent mode).

pub mod admin;
pub mod collect;
pub mod egress;
pub mod events;
pub mod freshness;
pub mod hold;
pub mod index;
pub mod kept;
pub mod ledger;
pub mod listening;
mod map;
pub mod mesh;
mod metrics;
pub mod network;
pub mod node_ports;
pub mod published;
pub mod redirects;
pub mod router;
mod takeover;
pub mod trust;
mod udp_exchange;

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures::StreamExt as _;
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kt_proto::session::{KtSession, Programmed};
use kube::{
    Api,
    runtime::{reflector, watcher},
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use self::{map::RedirectMap, metrics::Metrics};
use crate::{cgroup, ebpf, tasks::Tasks};

/// How long the agent's tasks get to end after a signal or a failure (the DaemonSet gives
/// the pod 10 s before SIGKILL).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

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
    #[error("failed to create a Kubernetes client (in-cluster configuration or kubeconfig)")]
    Kube(#[source] kube::Error),
    #[error("failed to listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Task(#[from] crate::tasks::TaskFailure),
}

/// The agent's validated configuration (see `kt-node-agent agent --help`).
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub node_name: String,
    /// This node's address: where the tunnel listeners of the sessions it holds are reached.
    pub node_ip: IpAddr,
    /// The hold server's SSH address.
    pub ssh_listen: SocketAddr,
    /// The pods' cgroup; detected from the agent's own cgroup when `None`.
    pub cgroup: Option<PathBuf>,
    /// `/healthz`, `/readyz`, `/metrics`.
    pub http_listen: SocketAddr,
    /// The longest wait between recomputations when nothing changes; a lease running out
    /// wakes the agent at that moment.
    pub lease_check: Duration,
    /// Ranges `connect` sessions may reach besides the cluster's pods and Services.
    pub egress_allow: Vec<kt_proto::net::Cidr>,
    /// How long a session nobody holds stays before the agents delete it (see
    /// [`collect`]).
    pub session_grace: Duration,
    /// How long a UDP flow of an exchange lives without a datagram ([`udp_exchange`]).
    pub udp_flow_idle: Duration,
}

/// Runs the agent until `shutdown` or until one of its tasks fails; the programs are
/// detached on the way out.
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
    let tasks = Tasks::new(shutdown);
    let logs = redirector.log_forwarder(tasks.shutdown().clone())?;
    let stop = tasks.shutdown().clone();
    tasks.spawn("ebpf-log", async move {
        logs.await;
        // Losing the programs' logs is no reason to stop redirecting.
        if !stop.is_cancelled() {
            tracing::warn!("eBPF log forwarding stopped");
            stop.cancelled().await;
        }
        Ok::<(), std::convert::Infallible>(())
    });

    let client = kube::Client::try_default()
        .await
        .map_err(AgentError::Kube)?;
    let changed = Arc::new(Notify::new());
    let all = watcher::Config::default;
    let freshness = Arc::new(Mutex::new(freshness::Freshness::default()));
    let watches = Watches {
        tasks: &tasks,
        changed: changed.clone(),
        events: metrics::WatchEvents::default(),
    };
    let sessions = watches.cache(
        "watch-sessions",
        Api::all(client.clone()),
        all(),
        Some(freshness.clone()),
    );
    // Services and EndpointSlices go into one index of what the redirects need, an event at
    // a time, instead of two caches of whole objects rebuilt into an index at every pass.
    let cluster = Arc::new(RwLock::new(index::Index::default()));
    let services_listed = watches.index(
        "watch-services",
        Api::<Service>::all(client.clone()),
        &cluster,
        |service| index::ServiceView::from(service),
        index::Index::apply_service,
    );
    let slices_listed = watches.index(
        "watch-endpointslices",
        Api::<EndpointSlice>::all(client.clone()),
        &cluster,
        |slice| index::SliceView::from(slice),
        index::Index::apply_slice,
    );
    let nodes = watches.cache("watch-nodes", Api::all(client.clone()), all(), None);
    let records = watches.cache(
        "watch-agent-records",
        Api::namespaced(client.clone(), kt_proto::agent::NAMESPACE),
        watcher::Config::default().labels(trust::RECORD_LABEL),
        None,
    );
    let publisher = Arc::new(published::Publisher::new(
        client.clone(),
        config.node_name.clone(),
    ));
    // This agent holds nothing yet, whatever an earlier agent on this node listed; a
    // failure here is retried with the first session it holds.
    if let Err(error) = publisher.publish().await {
        tracing::warn!(error = %kt_proto::error_chain(&error), "failed to write the agent record");
    }
    let (session_events, to_report) = tokio::sync::mpsc::unbounded_channel();
    tasks.spawn(
        "report-events",
        published::report(
            client.clone(),
            config.node_name.clone(),
            to_report,
            tasks.shutdown().clone(),
        ),
    );
    let resolver = crate::dns_relay::ResolvConf::read(Path::new("/etc/resolv.conf"))
        .map_err(|error| tracing::warn!(%error, "no resolver configuration: connect sessions get no cluster DNS"))
        .ok();

    let map = Arc::new(Mutex::new(RedirectMap::new(redirector)));
    let tunnel_bytes = metrics::TunnelBytes::default();
    let connect_refused = prometheus_client::metrics::counter::Counter::default();
    let sessions_collected = prometheus_client::metrics::counter::Counter::default();
    let reconcile_metrics = metrics::Reconcile::default();
    let udp_metrics = metrics::UdpExchange::default();
    let metrics = Arc::new(Metrics::new(
        map.clone(),
        &metrics::Sources {
            tunnel_bytes: &tunnel_bytes,
            connect_refused: &connect_refused,
            sessions_collected: &sessions_collected,
            reconcile: &reconcile_metrics,
            watch_events: &watches.events,
            udp: &udp_metrics,
        },
    ));
    let network = Arc::new(RwLock::new(network::Network::default()));
    let ready = Arc::new(AtomicBool::new(false));
    let http = bind(config.http_listen).await?;
    tasks.spawn(
        "http-server",
        admin::serve(http, ready.clone(), metrics, tasks.shutdown().clone()),
    );
    let ssh = bind(config.ssh_listen).await?;
    let context = hold::HoldContext {
        node_name: config.node_name.clone(),
        node_ip: config.node_ip,
        sessions: sessions.clone(),
        cluster: cluster.clone(),
        client: client.clone(),
        tunnel_bytes,
        network: network.clone(),
        connect_refused,
        redirects: map.clone(),
        publisher,
        events: session_events.clone(),
        holders: Arc::default(),
        udp_flow_idle: config.udp_flow_idle,
        udp: udp_metrics,
    };
    let context_client = client;
    tasks.spawn(
        "ssh-server",
        hold::serve(ssh, context, tasks.shutdown().clone()),
    );
    tracing::info!(node = %config.node_name, pods_cgroup = %pods.display(), http = %config.http_listen, ssh = %config.ssh_listen, "agent running");

    // The node-port table as the kernel may hold it: the mesh router's listeners and the
    // relays close only once it no longer sends to them. Starts as "no table".
    let (applied_node_ports, node_ports_in_force) =
        tokio::sync::watch::channel(node_ports::Ruleset::default());
    let router = router::Router::for_node(
        config.node_ip,
        node_ports_in_force.clone(),
        tasks.shutdown().child_token(),
    );
    {
        let (router, stop) = (router.clone(), tasks.shutdown().clone());
        tasks.spawn("mesh-router", async move {
            stop.cancelled().await;
            router.closed().await;
            Ok::<(), std::convert::Infallible>(())
        });
    }
    let node_port_relays = node_ports::relay::Relays::new(
        config.node_ip,
        node_ports_in_force,
        tasks.shutdown().child_token(),
    );
    {
        let (relays, stop) = (node_port_relays.clone(), tasks.shutdown().clone());
        tasks.spawn("node-port-relays", async move {
            stop.cancelled().await;
            relays.closed().await;
            Ok::<(), std::convert::Infallible>(())
        });
    }
    let (acks, pending_acks) = tokio::sync::watch::channel(Acks::new());
    let (collect, to_collect) = tokio::sync::watch::channel(Vec::new());
    tasks.spawn(
        "collect-sessions",
        collect_dead_sessions(
            context_client.clone(),
            to_collect,
            sessions_collected,
            CollectEvents {
                node: config.node_name.clone(),
                grace: config.session_grace,
                events: session_events.clone(),
            },
            tasks.shutdown().clone(),
        ),
    );
    // Starts as "no table": the first pass fills it.
    let (node_ports, wanted_node_ports) =
        tokio::sync::watch::channel(node_ports::Ruleset::default());
    tasks.spawn(
        "node-ports",
        node_ports::run(
            wanted_node_ports,
            applied_node_ports,
            tasks.shutdown().clone(),
        ),
    );
    let reconciler = Reconciler {
        router,
        node_ip: config.node_ip,
        node_ports,
        node_port_relays,
        unheld: Mutex::default(),
        collect,
        session_grace: chrono::TimeDelta::from_std(config.session_grace)
            .unwrap_or(chrono::TimeDelta::MAX),
        node: config.node_name.clone(),
        sessions,
        freshness,
        cluster,
        listed: (services_listed, slices_listed),
        network_of: Mutex::default(),
        nodes,
        records,
        judge: Mutex::default(),
        rejected: Mutex::default(),
        transitions: Mutex::default(),
        events: session_events,
        resolver,
        egress_allow: config.egress_allow.clone(),
        network,
        changed,
        map: map.clone(),
        ready: ready.clone(),
        acks,
        lease_check: config.lease_check,
        reconcile_metrics,
        last_pass: Mutex::default(),
        ledger: Mutex::default(),
        kept_acks: Mutex::default(),
        hashes: Mutex::default(),
    };
    tasks.spawn("reconcile", reconciler.run(tasks.shutdown().clone()));
    tasks.spawn(
        "acknowledge",
        acknowledge(
            context_client,
            config.node_name.clone(),
            pending_acks,
            tasks.shutdown().clone(),
        ),
    );
    let result = tasks.run_until_shutdown(SHUTDOWN_GRACE).await;
    ready.store(false, Ordering::Relaxed);
    // The redirector is dropped with the last holder of `map`: the programs detach.
    drop(map);
    result.map_err(AgentError::from)
}

async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, AgentError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| AgentError::Listen { addr, source })
}

fn pods_cgroup(mount: &Path, own: &Path) -> Result<PathBuf, AgentError> {
    let relative = own.strip_prefix(mount).unwrap_or(own);
    cgroup::pods_root(&relative.to_string_lossy())
        .map(|dir| mount.join(dir))
        .ok_or_else(|| AgentError::NoPodsCgroup {
            own: own.to_owned(),
        })
}

/// The longest pause between two attempts to list again after a watch failed.
const RELIST_MAX_DELAY: Duration = Duration::from_secs(8);

/// What the agent's watches watch: a Kubernetes object type with a static kind, as the
/// reflectors and `kube::runtime::watcher` need it.
trait Watched:
    kube::Resource<DynamicType = ()>
    + Clone
    + std::fmt::Debug
    + serde::de::DeserializeOwned
    + Send
    + Sync
    + 'static
{
}

impl<K> Watched for K where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static
{
}

/// What every watch of the agent shares: the task set it runs in, the notification each
/// event wakes the reconciler with, and `kt_agent_watch_events_total`.
struct Watches<'a> {
    tasks: &'a Tasks,
    changed: Arc<Notify>,
    events: metrics::WatchEvents,
}

impl Watches<'_> {
    /// A reflector for `api`, kept current by task `name`; every event wakes `changed`.
    /// After a watch error (logged) the watch starts over with a full list, after a
    /// back-off of 1 s doubling up to [`RELIST_MAX_DELAY`]: a resumed watch would say
    /// nothing until something changes, so only a completed list shows the cache follows
    /// the cluster again. `freshness`, if given, is told of each failure and each completed
    /// list ([`freshness`]).
    fn cache<K>(
        &self,
        name: &'static str,
        api: Api<K>,
        config: watcher::Config,
        freshness: Option<Arc<Mutex<freshness::Freshness>>>,
    ) -> reflector::Store<K>
    where
        K: Watched,
    {
        let mut writer = reflector::store::Writer::default();
        let store = writer.as_reader();
        self.run(name, api, config, freshness, move |event| {
            writer.apply_watcher_event(&event);
        });
        store
    }

    /// A watch of every `K` (all namespaces, no selector) kept in `cluster`'s index: each
    /// event reduced to `view`s and given to `apply`. The receiver turns `true` once the
    /// first list is complete.
    fn index<K, V>(
        &self,
        name: &'static str,
        api: Api<K>,
        cluster: &Arc<RwLock<index::Index>>,
        view: fn(&K) -> V,
        apply: fn(&mut index::Index, index::Change<V>),
    ) -> tokio::sync::watch::Receiver<bool>
    where
        K: Watched,
        V: 'static,
    {
        let (listed, ready) = tokio::sync::watch::channel(false);
        let cluster = cluster.clone();
        self.run(name, api, watcher::Config::default(), None, move |event| {
            let done = matches!(event, watcher::Event::InitDone);
            if let Some(change) = index::Change::of(event, view) {
                apply(&mut write(&cluster), change);
            }
            if done {
                listed.send_replace(true);
            }
        });
        ready
    }

    /// The watch of [`Watches::cache`], handing each event to `apply` (before `changed`
    /// is woken) and counting it.
    fn run<K>(
        &self,
        name: &'static str,
        api: Api<K>,
        config: watcher::Config,
        freshness: Option<Arc<Mutex<freshness::Freshness>>>,
        mut apply: impl FnMut(watcher::Event<K>) + Send + 'static,
    ) where
        K: Watched,
    {
        let (changed, stop) = (self.changed.clone(), self.tasks.shutdown().clone());
        let counted = self.events.of(name);
        let tell = move |update: &dyn Fn(&mut freshness::Freshness) -> bool| {
            freshness
                .as_ref()
                .is_some_and(|f| update(&mut f.lock().unwrap_or_else(|e| e.into_inner())))
        };
        self.tasks.spawn(name, async move {
            let mut delay = Duration::from_secs(1);
            loop {
                let events = watcher(api.clone(), config.clone());
                let mut events = std::pin::pin!(events);
                let error = loop {
                    tokio::select! {
                        () = stop.cancelled() => return Ok(()),
                        event = events.next() => match event {
                            Some(Ok(event)) => {
                                let listed = matches!(event, watcher::Event::InitDone);
                                apply(event);
                                counted.inc();
                                if listed {
                                    delay = Duration::from_secs(1);
                                    if tell(&|f| f.listed()) {
                                        tracing::info!(watch = name, "watch listed again: leases are judged by the clock again");
                                    }
                                }
                                changed.notify_one();
                            }
                            Some(Err(error)) => break error,
                            // A watcher never ends by itself; if it does, the cache is frozen.
                            None => return Err(WatchEnded),
                        },
                    }
                };
                if tell(&|f| f.failed(chrono::Utc::now())) {
                    tracing::warn!(watch = name, "watch down: leases are judged as of now until it lists again");
                    changed.notify_one();
                }
                tracing::warn!(watch = name, %error, retry_in = ?delay, "watch failed, listing again");
                tokio::select! {
                    () = stop.cancelled() => return Ok(()),
                    () = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(RELIST_MAX_DELAY);
            }
        });
    }
}

/// The index behind `lock`, for writing; a panic elsewhere while it was held leaves it as
/// consistent as each single update made it.
fn write(lock: &RwLock<index::Index>) -> std::sync::RwLockWriteGuard<'_, index::Index> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

/// A watch stream that ended: its cache no longer follows the cluster.
#[derive(Debug, thiserror::Error)]
#[error("the watch stream ended")]
struct WatchEnded;

/// A session version: uid and resourceVersion.
type Version = (String, String);

/// How long a session version must stay rejected before it is reported (see
/// [`Reconciler::believed`]).
const REPORT_AFTER: Duration = Duration::from_secs(5);

/// What this node acknowledges per held session (namespace, name), and whether the object
/// already shows it.
type Acks = BTreeMap<(String, String), (Programmed, bool)>;

/// How long one acknowledgement write may take, and how often failed ones are retried.
const ACK_TIMEOUT: Duration = Duration::from_secs(3);
const ACK_RETRY: Duration = Duration::from_secs(2);

/// Recomputes the redirects whenever a watched object changes or a lease runs out, writes
/// the difference to the eBPF map, and tells [`acknowledge`] what this node now redirects.
struct Reconciler {
    node: String,
    /// This node's address: node-port redirects to holders at another address go through
    /// `node_port_relays`.
    node_ip: IpAddr,
    /// This node's node-port redirects, to [`node_ports::run`].
    node_ports: tokio::sync::watch::Sender<node_ports::Ruleset>,
    /// Where this node sends outside connections for holders on other nodes.
    node_port_relays: Arc<node_ports::relay::Relays>,
    /// This node's mesh router: the routes are made current before the map points at them.
    router: Arc<router::Router>,
    /// Sessions nobody holds, and the ones to delete now.
    unheld: Mutex<collect::Unheld>,
    collect: tokio::sync::watch::Sender<Vec<collect::Due>>,
    session_grace: chrono::TimeDelta,
    sessions: reflector::Store<KtSession>,
    /// Whether `sessions` follows the cluster: the clock leases are judged by.
    freshness: Arc<Mutex<freshness::Freshness>>,
    /// The Services and EndpointSlices, by Service, kept by their watches.
    cluster: Arc<RwLock<index::Index>>,
    /// Whether the Services and the EndpointSlices have been listed once.
    listed: (
        tokio::sync::watch::Receiver<bool>,
        tokio::sync::watch::Receiver<bool>,
    ),
    /// What [`Reconciler::network`] was last computed from.
    network_of: Mutex<Option<NetworkInputs>>,
    nodes: reflector::Store<k8s_openapi::api::core::v1::Node>,
    /// The agents' records of what they hold ([`trust`]).
    records: reflector::Store<k8s_openapi::api::core::v1::ConfigMap>,
    /// The sessions' statuses judged against `records` and `nodes`, kept from pass to pass.
    judge: Mutex<trust::Judge>,
    /// Session versions whose status is not believed: when first seen, and whether reported.
    rejected: Mutex<BTreeMap<Version, (tokio::time::Instant, bool)>>,
    /// The session transitions this agent reported ([`events::Transitions`]).
    transitions: Mutex<events::Transitions>,
    /// To [`published::report`].
    events: tokio::sync::mpsc::UnboundedSender<events::SessionEvent>,
    /// The agent's resolver (the cluster DNS, for connect sessions).
    resolver: Option<crate::dns_relay::ResolvConf>,
    egress_allow: Vec<kt_proto::net::Cidr>,
    /// What connect sessions may reach and are told; recomputed with the redirects.
    network: Arc<RwLock<network::Network>>,
    changed: Arc<Notify>,
    map: Arc<Mutex<RedirectMap>>,
    ready: Arc<AtomicBool>,
    acks: tokio::sync::watch::Sender<Acks>,
    lease_check: Duration,
    /// `kt_agent_reconcile_seconds` and `_cpu_seconds`: each pass's duration and CPU time.
    reconcile_metrics: metrics::Reconcile,
    /// What the last pass programmed, if it succeeded.
    last_pass: Mutex<Option<LastPass>>,
    /// The map the passes keep, and the ports programmed per session ([`ledger`]).
    ledger: Mutex<ledger::Ledger>,
    /// This node's acknowledgements, kept from pass to pass.
    kept_acks: Mutex<KeptAcks>,
    /// What each session's part of the map is made of, kept from pass to pass.
    hashes: Mutex<redirects::KeptHashes>,
}

/// What a pass found: the last pass's result still stands, or the changes to write (and
/// whether a pass with the same fingerprint may keep the result).
enum Pass {
    Kept(LastPass),
    Computed(Vec<ledger::Change>, bool),
}

/// What a pass programmed, kept for the next: a pass with the same
/// [`redirects::fingerprint`] programs the same, so it computes and writes nothing (with
/// 1 000 sessions most passes are such: issue 17).
struct LastPass {
    fingerprint: u64,
    /// Whether a pass with this fingerprint may keep it: not when a mesh route had no
    /// listener (the next pass's router update tries again).
    reusable: bool,
}

impl Reconciler {
    async fn run(self, shutdown: CancellationToken) -> Result<(), std::convert::Infallible> {
        let (mut services, mut slices) = self.listed.clone();
        let synced = async {
            let _ = tokio::join!(
                self.sessions.wait_until_ready(),
                async { services.wait_for(|listed| *listed).await.is_ok() },
                async { slices.wait_for(|listed| *listed).await.is_ok() },
                self.nodes.wait_until_ready(),
                self.records.wait_until_ready()
            );
        };
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = synced => {}
        }
        loop {
            let (started, cpu) = (std::time::Instant::now(), metrics::thread_cpu());
            let wake = self.reconcile();
            self.reconcile_metrics
                .observe(started.elapsed(), metrics::thread_cpu().saturating_sub(cpu));
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = self.changed.notified() => {}
                () = tokio::time::sleep(wake) => {}
            }
        }
    }

    /// One pass; returns how long to sleep at most before the next.
    fn reconcile(&self) -> Duration {
        let all_sessions = self.sessions.state();
        let all_nodes = self.nodes.state();
        let nodes: Vec<&k8s_openapi::api::core::v1::Node> =
            all_nodes.iter().map(AsRef::as_ref).collect();
        // While the sessions watch is down, leases are judged as of when it went down:
        // renewals written meanwhile cannot be seen ([`freshness`]).
        let freshness = *self.freshness.lock().unwrap_or_else(|e| e.into_inner());
        let now = freshness.lease_clock(chrono::Utc::now());
        let sessions: Vec<&KtSession> = all_sessions.iter().map(AsRef::as_ref).collect();
        let (believed, report_in) = self.believed(&sessions, &nodes, now);
        // What is programmed and acknowledged: only statuses some agent vouches for.
        let cluster = self.cluster.read().unwrap_or_else(|e| e.into_inner());
        let mut hashes = self.hashes.lock().unwrap_or_else(|e| e.into_inner());
        let state = redirects::ClusterState::indexed_kept(&believed, &cluster, &mut hashes);
        drop(hashes);
        self.network(&nodes, &cluster);
        for event in self
            .transitions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .due(&sessions, &self.node, now)
        {
            let _ = self.events.send(event);
        }
        let due = self.unheld.lock().unwrap_or_else(|e| e.into_inner()).due(
            &sessions,
            now,
            self.session_grace,
        );
        self.collect.send_if_modified(|current| {
            let changed = *current != due;
            *current = due;
            changed
        });
        // What the redirects are made of did not change since the last pass (a renewal, an
        // acknowledgement, another Service's slice): what it programmed stands.
        let fingerprint = redirects::fingerprint(&state, now);
        let mut last = self.last_pass.lock().unwrap_or_else(|e| e.into_inner());
        let outcome = match last
            .take()
            .filter(|pass| pass.reusable && pass.fingerprint == fingerprint)
        {
            Some(kept) => Pass::Kept(kept),
            None => {
                let routes = mesh::routes(&state, now);
                let routers = self.router.update(&routes);
                let changes = self
                    .ledger
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .update(&state, now, &routes, &routers);
                let node_port_entries = node_ports::desired(&state, now, &routes, &routers);
                let remote_holders = node_ports::remote_holders(&node_port_entries, self.node_ip);
                let relays = self.node_port_relays.update(&remote_holders);
                let node_port_rules =
                    node_ports::ruleset(&node_port_entries, self.node_ip, &relays);
                self.node_ports.send_if_modified(|current| {
                    let changed = *current != node_port_rules;
                    *current = node_port_rules;
                    changed
                });
                // A route or holder without a listener is retried by the next pass's
                // `update`.
                let reusable = routes.keys().all(|key| routers.contains_key(key))
                    && remote_holders
                        .iter()
                        .all(|holder| relays.contains_key(holder));
                Pass::Computed(changes, reusable)
            }
        };
        // The watches may write again: nothing below reads the index.
        drop(state);
        drop(cluster);
        // Wake when the next lease runs out, or after the check interval; while blind no
        // lease runs out (the clock stands), and the watch wakes the pass when it lists.
        let wake = redirects::next_expiry(&believed, now)
            .filter(|_| !freshness.blind())
            .and_then(|end| (end - now).to_std().ok())
            .map_or(self.lease_check, |left| {
                (left + Duration::from_millis(1)).min(self.lease_check)
            })
            .min(report_in.unwrap_or(Duration::MAX));
        let (pass, applied) = match outcome {
            Pass::Kept(kept) => (kept, Ok(())),
            Pass::Computed(changes, reusable) => {
                let applied = self
                    .map
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .apply(&changes);
                let pass = LastPass {
                    fingerprint,
                    reusable,
                };
                (pass, applied)
            }
        };
        let mut kept_acks = self.kept_acks.lock().unwrap_or_else(|e| e.into_inner());
        kept_acks.update(
            &believed,
            self.ledger
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .programmed(),
            now,
            |session, done| self.ack_of(session, done, now),
        );
        match &applied {
            Ok(()) => {
                if !kept_acks.sent {
                    self.acks.send_if_modified(|current| {
                        let changed = *current != kept_acks.acks;
                        if changed {
                            current.clone_from(&kept_acks.acks);
                        }
                        changed
                    });
                    kept_acks.sent = true;
                }
                *last = Some(pass);
            }
            Err(error) => {
                tracing::error!(error = %kt_proto::error_chain(error), "failed to program redirects");
            }
        }
        self.ready.store(applied.is_ok(), Ordering::Relaxed);
        wake
    }

    /// Computes the network connect sessions get ([`network::network`]) when its inputs
    /// changed since the last pass: with 10 000 Services it is the costliest part of a pass
    /// and its inputs seldom change.
    fn network(&self, nodes: &[&k8s_openapi::api::core::v1::Node], cluster: &index::Index) {
        let inputs = NetworkInputs::of(nodes, cluster);
        let mut last = self.network_of.lock().unwrap_or_else(|e| e.into_inner());
        if last.as_ref() == Some(&inputs) {
            return;
        }
        *self.network.write().unwrap_or_else(|e| e.into_inner()) = network::network(
            nodes,
            cluster.cluster_ips(),
            self.resolver.as_ref(),
            &self.egress_allow,
        );
        *last = Some(inputs);
    }

    /// The sessions whose status is believed ([`trust::check`]); the others are logged and
    /// reported as an Event once per session version, once they have been rejected for
    /// [`REPORT_AFTER`] (a holder's record and its status arrive through two watches, in
    /// either order). Also when the next report is due.
    fn believed<'a>(
        &self,
        sessions: &[&'a KtSession],
        nodes: &[&k8s_openapi::api::core::v1::Node],
        now: chrono::DateTime<chrono::Utc>,
    ) -> (Vec<&'a KtSession>, Option<Duration>) {
        let all_records = self.records.state();
        let verdicts = self
            .judge
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .verdicts(
                sessions,
                nodes,
                &all_records.iter().map(AsRef::as_ref).collect::<Vec<_>>(),
                now,
            );
        let mut rejected = self.rejected.lock().unwrap_or_else(|e| e.into_inner());
        let mut seen = std::collections::BTreeSet::new();
        let mut believed = Vec::with_capacity(sessions.len());
        let mut next: Option<Duration> = None;
        let at = tokio::time::Instant::now();
        for (session, verdict) in sessions.iter().zip(verdicts) {
            let Err(reason) = verdict else {
                believed.push(*session);
                continue;
            };
            let version = (
                session.metadata.uid.clone().unwrap_or_default(),
                session
                    .metadata
                    .resource_version
                    .clone()
                    .unwrap_or_default(),
            );
            seen.insert(version.clone());
            let (since, reported) = rejected.entry(version).or_insert((at, false));
            if *reported {
                continue;
            }
            let waited = at.duration_since(*since);
            if waited < REPORT_AFTER {
                let left = REPORT_AFTER - waited;
                next = Some(next.map_or(left, |n| n.min(left)));
                continue;
            }
            *reported = true;
            let (namespace, name) = (
                session.metadata.namespace.clone().unwrap_or_default(),
                session.metadata.name.clone().unwrap_or_default(),
            );
            if !reason.reported() {
                tracing::info!(%namespace, session = %name, %reason, "session status ignored: nothing redirected for it");
                continue;
            }
            if reason.forged() {
                tracing::warn!(%namespace, session = %name, %reason, "session status not believed: nothing redirected for it");
            } else {
                tracing::warn!(%namespace, session = %name, %reason, "session refused: nothing redirected for it");
            }
            let _ = self
                .events
                .send(events::SessionEvent::rejected(session, &self.node, &reason));
        }
        rejected.retain(|version, _| seen.contains(version));
        (believed, next)
    }

    /// This node's acknowledgement of `session` if it is a live exchange or mesh session
    /// whose holder listens for all its ports (a holder still opening its listeners is not
    /// acknowledged: ktctl waits for the complete one, and every write wakes every agent):
    /// the holder and the Service ports programmed for it (`done`), and whether its status
    /// already shows that.
    fn ack_of(
        &self,
        s: &KtSession,
        done: Option<&redirects::PortsDone>,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Option<(AckId, (Programmed, bool))> {
        if !matches!(
            s.spec.mode,
            kt_proto::session::SessionMode::Exchange | kt_proto::session::SessionMode::Mesh
        ) || !s.lease_live(now)
        {
            return None;
        }
        let status = s.status.as_ref()?;
        status.address?;
        let complete = |wanted: &[kt_proto::session::PortMapping],
                        listeners: &[kt_proto::session::Listener]| {
            wanted
                .iter()
                .all(|p| listeners.iter().any(|l| l.port == p.port))
        };
        if !complete(&s.spec.ports, &status.listeners)
            || !complete(&s.spec.udp_ports, &status.udp_listeners)
        {
            return None;
        }
        let ack = Programmed {
            holder: status.holder(),
            ports: done
                .map(|p| p.tcp.iter().copied().collect())
                .unwrap_or_default(),
            udp_ports: Some(
                done.map(|p| p.udp.iter().copied().collect())
                    .unwrap_or_default(),
            ),
        };
        let shown = status.programmed.get(&self.node) == Some(&ack);
        let id = (s.metadata.namespace.clone()?, s.metadata.name.clone()?);
        Some((id, (ack, shown)))
    }
}

/// A session's `(namespace, name)` in [`Acks`].
type AckId = (String, String);

/// This node's acknowledgements ([`Reconciler::ack_of`] of every session) kept from pass to
/// pass: a session's is computed again only when the session changed ([`kept::PerSession`]),
/// its programmed ports did, or its lease ran out. Computing every session's on every pass
/// was most of a pass with 1 000 sessions (issue 17: 2–6 ms of a 5–9 ms pass in the
/// `agent_scale` benchmark).
#[derive(Default)]
struct KeptAcks {
    acks: Acks,
    /// Whether `acks` was sent since it last changed.
    sent: bool,
    /// Per session, its entry in `acks` (if it has one), computed from its programmed ports
    /// and whether its lease was live. Kept by `namespace/name`, as `acks` is: by uid, a
    /// session deleted and created again under its name within one pass would have the old
    /// uid's removal take the new session's entry.
    ids: kept::PerSession<(Option<redirects::PortsDone>, bool), Option<AckId>>,
}

impl KeptAcks {
    /// Brings `acks` up to `sessions` at `now` with the ports programmed per session
    /// (`programmed`, by `namespace/name`), computing with `ack_of` only the entries whose
    /// inputs changed.
    fn update(
        &mut self,
        sessions: &[&KtSession],
        programmed: &foldhash::HashMap<String, redirects::PortsDone>,
        now: chrono::DateTime<chrono::Utc>,
        ack_of: impl Fn(
            &KtSession,
            Option<&redirects::PortsDone>,
        ) -> Option<(AckId, (Programmed, bool))>,
    ) {
        self.ids.start_pass();
        let mut key = String::new();
        for session in sessions {
            kept::write_key(&mut key, session);
            let done = programmed.get(key.as_str());
            let live = session.lease_live(now);
            let same = |(kept_done, kept_live): &(Option<redirects::PortsDone>, bool)| {
                kept_done.as_ref() == done && *kept_live == live
            };
            if self.ids.kept_at(&key, session, same).is_some() {
                continue;
            }
            let id = ack_of(session, done).map(|(id, ack)| {
                self.acks.insert(id.clone(), ack);
                id
            });
            let old = self
                .ids
                .keep(session, (done.cloned(), live), id.clone(), true);
            if let Some(old) = old.flatten()
                && Some(&old) != id.as_ref()
            {
                self.acks.remove(&old);
            }
            self.sent = false;
        }
        for id in self.ids.forget_unseen().into_iter().flatten() {
            self.acks.remove(&id);
            self.sent = false;
        }
    }
}

/// What [`network::network`] reads: the Nodes' specs and addresses (by name: a cache lists
/// in no set order), and the index's [`index::Index::generation`] for the ClusterIPs.
#[derive(Debug, PartialEq)]
struct NetworkInputs {
    nodes: Vec<NodeInputs>,
    cluster_ips: u64,
}

/// A Node's name, spec and addresses.
type NodeInputs = (
    Option<String>,
    Option<k8s_openapi::api::core::v1::NodeSpec>,
    Option<Vec<k8s_openapi::api::core::v1::NodeAddress>>,
);

impl NetworkInputs {
    fn of(nodes: &[&k8s_openapi::api::core::v1::Node], cluster: &index::Index) -> Self {
        let mut nodes: Vec<_> = nodes
            .iter()
            .map(|n| {
                (
                    n.metadata.name.clone(),
                    n.spec.clone(),
                    n.status.as_ref().and_then(|s| s.addresses.clone()),
                )
            })
            .collect();
        nodes.sort_by(|a, b| a.0.cmp(&b.0));
        Self {
            nodes,
            cluster_ips: cluster.generation(),
        }
    }
}

/// What [`collect_dead_sessions`] needs for its `Collected` Events.
struct CollectEvents {
    node: String,
    /// The grace period (`--session-grace-seconds`), named in the message.
    grace: Duration,
    events: tokio::sync::mpsc::UnboundedSender<events::SessionEvent>,
}

impl CollectEvents {
    fn collected(&self, dead: &collect::Due) -> events::SessionEvent {
        let why = match dead.mode {
            kt_proto::session::SessionMode::Preview => {
                "a preview session nobody held for its lease".to_owned()
            }
            _ => format!(
                "nobody held it for the grace period ({} s)",
                self.grace.as_secs()
            ),
        };
        events::SessionEvent::collected(
            &dead.namespace,
            &dead.name,
            dead.uid.clone(),
            &self.node,
            &why,
        )
    }
}

/// Deletes the sessions the reconciler finds dead (see [`collect`]), each on the condition
/// that it is still the version judged; a session already gone or renewed meanwhile is
/// fine (every agent does this).
async fn collect_dead_sessions(
    client: kube::Client,
    mut due: tokio::sync::watch::Receiver<Vec<collect::Due>>,
    collected: prometheus_client::metrics::counter::Counter,
    events: CollectEvents,
    shutdown: CancellationToken,
) -> Result<(), std::convert::Infallible> {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            changed = due.changed() => if changed.is_err() {
                return Ok(());
            },
        }
        let sessions = due.borrow_and_update().clone();
        for dead in sessions {
            let (namespace, name) = (&dead.namespace, &dead.name);
            let api: Api<KtSession> = Api::namespaced(client.clone(), namespace);
            let params = kube::api::DeleteParams {
                preconditions: Some(kube::api::Preconditions {
                    resource_version: dead.resource_version.clone(),
                    uid: None,
                }),
                ..kube::api::DeleteParams::background()
            };
            let delete = api.delete(name, &params);
            match tokio::time::timeout(ACK_TIMEOUT, delete).await {
                Ok(Ok(_)) => {
                    collected.inc();
                    tracing::info!(%namespace, session = %name, mode = ?dead.mode, "collected a session nobody holds");
                    let _ = events.events.send(events.collected(&dead));
                }
                // Gone already, or changed (renewed) since it was judged.
                Ok(Err(kube::Error::Api(status))) if matches!(status.code, 404 | 409) => {}
                Ok(Err(error)) => {
                    tracing::warn!(%namespace, session = %name, %error, "failed to collect a session nobody holds")
                }
                Err(_) => {
                    tracing::warn!(%namespace, session = %name, "collecting a session nobody holds timed out")
                }
            }
        }
    }
}

/// At most this many acknowledgements are written at once.
const ACK_WRITES_AT_ONCE: usize = 16;

/// Writes this node's acknowledgements into the sessions' status (`status.programmed.<node>`)
/// when the object does not show them yet, a few at a time, retrying failed writes; ktctl
/// waits for them before its banner.
async fn acknowledge(
    client: kube::Client,
    node: String,
    mut pending: tokio::sync::watch::Receiver<Acks>,
    shutdown: CancellationToken,
) -> Result<(), std::convert::Infallible> {
    // What was written lately: not written again until the watch had time to show it.
    let mut recent: BTreeMap<(String, String), (Programmed, tokio::time::Instant)> =
        BTreeMap::new();
    let mut retry = tokio::time::interval(ACK_RETRY);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            changed = pending.changed() => if changed.is_err() {
                return Ok(());
            },
            _ = retry.tick() => {}
        }
        // Only what is due is copied out: with 1 000 sessions nearly every ack is shown.
        let due: Vec<((String, String), Programmed)> = {
            let acks = pending.borrow_and_update();
            recent.retain(|id, (_, at)| acks.contains_key(id) && at.elapsed() < ACK_RETRY * 2);
            acks.iter()
                .filter(|(id, (ack, shown))| {
                    !shown && recent.get(*id).is_none_or(|(written, _)| written != ack)
                })
                .map(|(id, (ack, _))| (id.clone(), ack.clone()))
                .collect()
        };
        let writes = futures::stream::iter(due.into_iter().map(|(id, ack)| {
            let (client, node) = (client.clone(), node.as_str());
            async move {
                let written = write_ack(client, node, &id, &ack).await;
                (id, ack, written)
            }
        }))
        .buffer_unordered(ACK_WRITES_AT_ONCE)
        .collect::<Vec<_>>()
        .await;
        for (id, ack, written) in writes {
            if written {
                recent.insert(id, (ack, tokio::time::Instant::now()));
            }
        }
    }
}

/// One acknowledgement: a merge patch of `status.programmed.<node>`; whether it was written.
async fn write_ack(
    client: kube::Client,
    node: &str,
    (namespace, name): &(String, String),
    ack: &Programmed,
) -> bool {
    let api: Api<KtSession> = Api::namespaced(client, namespace);
    let patch = serde_json::json!({"status": {"programmed": {node: ack}}});
    let (params, patch) = (
        kube::api::PatchParams::default(),
        kube::api::Patch::Merge(&patch),
    );
    match tokio::time::timeout(ACK_TIMEOUT, api.patch_status(name, &params, &patch)).await {
        Ok(Ok(_)) => {
            tracing::debug!(%namespace, session = %name, ports = ?ack.ports, "programmed");
            true
        }
        // The session is gone: nothing to acknowledge.
        Ok(Err(kube::Error::Api(status))) if status.code == 404 => true,
        Ok(Err(error)) => {
            tracing::warn!(%namespace, session = %name, %error, "failed to acknowledge the session");
            false
        }
        Err(_) => {
            tracing::warn!(%namespace, session = %name, "acknowledging the session timed out");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn session(name: &str, version: &str, listener_port: u16) -> KtSession {
        serde_json::from_value(json!({
            "apiVersion": "kt.dev/v1alpha1", "kind": "KtSession",
            "metadata": {"name": name, "namespace": "dev", "uid": format!("u-{name}"),
                         "resourceVersion": version},
            "spec": {"owner": "a@b", "mode": "exchange", "service": "web",
                     "ports": [{"port": 80, "localPort": 8080}], "publicKey": "k",
                     "leaseSeconds": 60},
            "status": {"node": "node-1", "address": "172.30.0.11",
                       "listeners": [{"port": 80, "listenerPort": listener_port}],
                       "renewTime": chrono::Utc::now()}
        }))
        .unwrap()
    }

    /// A stand-in for [`Reconciler::ack_of`]: the holder and the ports, for live sessions.
    fn ack_of(
        s: &KtSession,
        done: Option<&redirects::PortsDone>,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Option<(AckId, (Programmed, bool))> {
        s.lease_live(now).then(|| {
            let ack = Programmed {
                holder: s.status.as_ref().unwrap().holder(),
                ports: done
                    .map(|p| p.tcp.iter().copied().collect())
                    .unwrap_or_default(),
                udp_ports: Some(Vec::new()),
            };
            let id = (
                s.metadata.namespace.clone().unwrap(),
                s.metadata.name.clone().unwrap(),
            );
            (id, (ack, false))
        })
    }

    /// What the kept acknowledgements must equal: every session's, computed afresh.
    fn afresh(
        sessions: &[&KtSession],
        programmed: &foldhash::HashMap<String, redirects::PortsDone>,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Acks {
        sessions
            .iter()
            .filter_map(|s| ack_of(s, programmed.get(&s.key()), now))
            .collect()
    }

    #[test]
    fn kept_acknowledgements_follow_sessions_ports_and_leases() {
        let now = chrono::Utc::now();
        let (a, b) = (session("a", "1", 40001), session("b", "1", 40002));
        let mut programmed = foldhash::HashMap::default();
        let mut kept = KeptAcks::default();
        let mut check =
            |sessions: &[&KtSession], programmed: &foldhash::HashMap<_, _>, at, what| {
                kept.update(sessions, programmed, at, |s, done| ack_of(s, done, at));
                assert_eq!(kept.acks, afresh(sessions, programmed, at), "{what}");
                // Only a change is sent again.
                assert_eq!(kept.sent, what == "nothing changed", "{what}: sent");
                kept.sent = true;
            };
        check(&[&a, &b], &programmed, now, "first");
        check(&[&a, &b], &programmed, now, "nothing changed");
        programmed.insert(
            "dev/a".to_owned(),
            redirects::PortsDone {
                tcp: [80].into(),
                udp: Default::default(),
            },
        );
        check(&[&a, &b], &programmed, now, "a's port programmed");
        let moved = session("b", "2", 40009);
        check(&[&a, &moved], &programmed, now, "b's listener changed");
        check(&[&a], &programmed, now, "b gone");
        // Deleted and created again under its name between two passes: another uid, and
        // the same resourceVersion the old one had (a real API server never repeats one,
        // so a new uid must be enough to compute again).
        let mut again = session("a", "1", 40001);
        again.metadata.uid = Some("u-a-again".to_owned());
        check(&[&again], &programmed, now, "a created again");
        let a = again;
        let later = now + chrono::TimeDelta::seconds(120);
        check(&[&a], &programmed, later, "a's lease ran out");
    }
}
