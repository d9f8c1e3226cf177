//! Holding sessions: the agent's SSH server on its node, under the protocol of
//! [`kt_proto::agent`]. A `connect` session is held from its login: the agent writes its
//! status (with the cluster's network) and dials, for each `direct-tcpip` channel and UDP
//! relay, the destination its egress rule allows. An exchange session is held as follows. ktctl logs in as a [`Login`] with the session's key (the one its
//! `KtSession` names); each `tcpip-forward` names one of the session's Service ports. The
//! agent listens on a free port of its node for it, sends the connections it accepts back as
//! `forwarded-tcpip` for that Service port, and writes the session's `status` (this node,
//! its address, the listeners, the renewal time); each `streamlocal-forward` with a
//! [`kt_proto::agent::udp_forward_path`] names one of its UDP ports, for which the agent
//! opens a UDP listener ([`super::udp_exchange`]): renewed while the SSH connection lives,
//! cleared when it ends. So every agent redirects the Service only while ktctl is connected,
//! and at most a lease longer if this agent dies.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use kt_proto::{
    agent::{Login, service_port_of},
    session::{ClusterNetwork, KtSession, Listener, SessionMode, SessionSpec, SessionStatus},
};
use kube::{
    Api,
    api::{Patch, PatchParams},
    runtime::reflector::{ObjectRef, Store},
};
use prometheus_client::metrics::counter::Counter;
use russh::{
    Channel, ChannelOpenFailure,
    keys::PublicKey,
    server::{Auth, ChannelOpenHandle, Handler, Msg, Session},
};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument as _;

use super::{
    map::RedirectMap,
    metrics::TunnelBytes,
    network::Network,
    takeover::{Connection, Taken},
    trust::HeldSession,
};
use crate::{
    ebpf::{ServiceKey, Transport},
    ssh_server::{AcceptError, dial_and_pump, forward_back, spawn_udp_relay},
};

/// How long one status write (renewal or release) may take: a renewal that hangs must not
/// hold up the next one, and a release must not hold up shutdown.
const STATUS_WRITE_TIMEOUT: Duration = Duration::from_secs(3);

/// What every connection of the hold server needs.
#[derive(Clone)]
pub struct HoldContext {
    pub node_name: String,
    pub node_ip: IpAddr,
    pub sessions: Store<KtSession>,
    /// The Services and EndpointSlices, by Service, as the agent's watches keep them: a
    /// preview session may dial its own Service's ClusterIP.
    pub cluster: Arc<RwLock<super::index::Index>>,
    pub client: kube::Client,
    pub(crate) tunnel_bytes: TunnelBytes,
    /// The cluster's network for `connect` sessions, kept current by the reconciler.
    pub(crate) network: Arc<RwLock<Network>>,
    /// `kt_agent_connect_refused_total`.
    pub(crate) connect_refused: Counter,
    /// The redirects in force on this node, for [`HoldContext::as_a_pod_would`].
    pub(crate) redirects: Arc<Mutex<RedirectMap>>,
    /// This agent's record of what it holds: written before a session's status, which other
    /// agents believe only when the record vouches for it ([`super::trust`]).
    pub(crate) publisher: Arc<super::published::Publisher>,
    /// The `Held` and `Released` Events ([`super::events`]).
    pub(crate) events: tokio::sync::mpsc::UnboundedSender<super::events::SessionEvent>,
    /// The connection holding each session's listeners: a newer one ends an older one.
    pub(crate) holders: Arc<super::takeover::Holders>,
    /// How long a UDP flow lives without a datagram either way.
    pub(crate) udp_flow_idle: Duration,
    /// The UDP listeners' metrics.
    pub(crate) udp: super::metrics::UdpExchange,
}

impl HoldContext {
    /// Where a `connect` session's `host:port` goes, if every address it names may be
    /// dialled: an address, or a cluster name this node's resolver (the cluster DNS) knows.
    async fn allowed(&self, host: &str, port: u16) -> Result<SocketAddr, Refusal> {
        let addresses: Vec<SocketAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => tokio::net::lookup_host((host, port))
                .await
                .map_err(|_| Refusal::Unresolved(host.to_owned()))?
                .collect(),
        };
        let network = self
            .network
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for address in &addresses {
            network.egress.check(address.ip())?;
        }
        addresses
            .first()
            .copied()
            .ok_or_else(|| Refusal::Unresolved(host.to_owned()))
    }

    /// Where a pod's connection to `destination` goes: the listener of the exchange or
    /// mesh that redirects it, else `destination` itself. The agent's own sockets are exempt
    /// from the eBPF programs, so without this a developer connected through the agent
    /// would reach the pods of a Service that is exchanged — their own exchange included —
    /// where a pod reaches the workstation (with v0.3.7's shadow pod, connect's traffic is a
    /// pod's and is redirected).
    fn as_a_pod_would(&self, destination: SocketAddr, transport: Transport) -> SocketAddr {
        self.redirects
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .desired
            .get(&ServiceKey::new(destination, transport))
            .map_or(destination, |target| target.to)
    }
}

/// Why a `connect` destination is not dialled.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("no address for {0}")]
    Unresolved(String),
    #[error(transparent)]
    Egress(#[from] super::egress::Refused),
}

#[derive(Debug, thiserror::Error)]
pub enum HoldError {
    #[error("SSH protocol error")]
    Ssh(#[from] russh::Error),
}

/// Serves the hold server on `listener` until `shutdown`; fails when the listening socket
/// does (the agent then stops: a node that cannot hold sessions must not look ready).
pub async fn serve(
    listener: TcpListener,
    context: HoldContext,
    shutdown: CancellationToken,
) -> Result<(), AcceptError> {
    let context = Arc::new(context);
    crate::ssh_server::serve(
        listener,
        shutdown,
        |peer, tasks, cancel, logged_in| Holder {
            peer,
            context: context.clone(),
            held: None,
            tasks,
            connection: Connection::new(cancel.clone()),
            cancel,
            logged_in,
        },
        |peer| {
            tracing::info_span!(
                "session",
                %peer,
                namespace = tracing::field::Empty,
                session = tracing::field::Empty
            )
        },
    )
    .await
}

/// One ktctl connection, holding at most one session.
struct Holder {
    peer: SocketAddr,
    context: Arc<HoldContext>,
    held: Option<Held>,
    tasks: TaskTracker,
    /// Cancelled when the connection ends: stops listeners and the renewal, clears status.
    cancel: CancellationToken,
    /// This connection, for [`super::takeover::Holders`].
    connection: Connection,
    /// Told on login (`auth_succeeded`): frees the connection's pre-login slot.
    logged_in: crate::ssh_server::LoggedIn,
}

struct Held {
    login: Login,
    /// The session object's uid, for this agent's record.
    uid: String,
    spec: SessionSpec,
    listeners: Arc<Mutex<Vec<Listener>>>,
    udp_listeners: Arc<Mutex<Vec<Listener>>>,
    renewing: bool,
    /// This connection is the session's holder in [`super::takeover::Holders`] (and forgets
    /// it when it ends).
    taken: bool,
}

impl Holder {
    /// For a held `preview` session, `host:port` when it is a ClusterIP of the session's
    /// Service and one of its published ports: ktctl dials it to see the published Service
    /// answer (through the cluster's proxy to this listener) before it says so.
    fn preview_probe(&self, host: &str, port: u16) -> Option<SocketAddr> {
        let held = self.held.as_ref()?;
        if held.spec.mode != SessionMode::Preview || !held.spec.ports.iter().any(|p| p.port == port)
        {
            return None;
        }
        let ip: IpAddr = host.parse().ok()?;
        let cluster = self
            .context
            .cluster
            .read()
            .unwrap_or_else(|e| e.into_inner());
        let service = cluster.service(&held.login.namespace, &held.spec.service)?;
        service
            .cluster_ips
            .contains(&ip)
            .then_some(SocketAddr::new(ip, port))
    }

    /// Whether this connection holds a `connect` session.
    fn connects(&self) -> bool {
        self.held
            .as_ref()
            .is_some_and(|h| h.spec.mode == SessionMode::Connect)
    }

    /// Writes the held session's status and keeps renewing it while the connection lives;
    /// `false` when the first write fails or a newer connection holds the session.
    async fn hold(&self, held: &mut Held) -> bool {
        // A connect session is held by each of ktctl's connections at once, without
        // listeners; a session with listeners by one connection at a time, which takes it
        // before it writes anything, and writes in its turn ([`super::takeover`]).
        let exclusive = held.spec.mode != SessionMode::Connect;
        if exclusive && !self.take_over(held) {
            return false;
        }
        let network = match held.spec.mode {
            SessionMode::Connect => Some(
                self.context
                    .network
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .info
                    .clone(),
            ),
            _ => None,
        };
        let status = Status {
            context: self.context.clone(),
            connection: self.connection.clone(),
            exclusive,
            login: held.login.clone(),
            uid: held.uid.clone(),
            listeners: held.listeners.clone(),
            udp_listeners: held.udp_listeners.clone(),
            network,
        };
        let record = HeldSession {
            namespace: held.login.namespace.clone(),
            name: held.login.session.clone(),
            uid: held.uid.clone(),
            listeners: status.listeners(),
            udp_listeners: status.udp_listeners(),
        };
        // In a task of this connection's own: the handler's future is dropped when the
        // connection ends (a newer one took over), and a write it already sent must keep
        // the session's turn until it is answered.
        let first = self.tasks.spawn(
            async move {
                let turn = status.turn().await;
                if status.connection.is_superseded() {
                    tracing::info!(
                        "a newer connection of ktctl holds the session; this one is closed"
                    );
                    return (status, false);
                }
                let (namespace, name) = (record.namespace.clone(), record.name.clone());
                let recorded = status.context.publisher.set(&namespace, &name, Some(record));
                if let Err(error) = recorded.await {
                    tracing::warn!(error = %kt_proto::error_chain(&error), "failed to write the agent record");
                    return (status, false);
                }
                if let Err(error) = status.write().await {
                    tracing::warn!(error = %kt_proto::error_chain(&error), "failed to write session status");
                    return (status, false);
                }
                drop(turn);
                (status, true)
            }
            .in_current_span(),
        );
        let Ok((status, true)) = first.await else {
            return false;
        };
        if !held.renewing {
            held.renewing = true;
            // Once per connection: later writes (more listeners) are the same hold.
            let _ = self.context.events.send(super::events::SessionEvent::held(
                &held.login.namespace,
                &held.login.session,
                &held.uid,
                &self.context.node_name,
                self.context.node_ip,
                &status.listeners(),
                &status.udp_listeners(),
            ));
            let every = Duration::from_secs(u64::from(held.spec.lease_seconds.max(3)) / 3);
            self.tasks
                .spawn(status.renew(every, self.cancel.clone()).in_current_span());
        }
        true
    }

    /// [`Holder::hold`] of the session this connection holds, after a listener was added.
    async fn hold_again(&mut self) -> bool {
        let Some(mut held) = self.held.take() else {
            return false;
        };
        let written = self.hold(&mut held).await;
        self.held = Some(held);
        written
    }

    /// Makes this connection the holder of `held`'s session, ending the older connection
    /// that held it before ([`super::takeover`]), and forgets it when this connection ends;
    /// `false` when a newer connection holds it (this one is then ended).
    fn take_over(&self, held: &mut Held) -> bool {
        let session = (held.login.namespace.clone(), held.login.session.clone());
        match self.context.holders.take(session.clone(), &self.connection) {
            Taken::Held => {}
            Taken::TookOver => tracing::info!(
                "session taken over from an older connection of ktctl, which is closed"
            ),
            Taken::Superseded => {
                tracing::info!("a newer connection of ktctl holds the session; this one is closed");
                return false;
            }
        }
        if !held.taken {
            held.taken = true;
            let (holders, connection, ended) = (
                self.context.holders.clone(),
                self.connection.clone(),
                self.cancel.clone(),
            );
            self.tasks.spawn(async move {
                ended.cancelled().await;
                holders.leave(&session, &connection);
            });
        }
        true
    }

    /// The session `login` names, from the watch cache or — when the cache has not seen it
    /// yet (ktctl dials right after creating it) — from the API server.
    async fn session(&self, login: &Login) -> Option<Arc<KtSession>> {
        let reference = ObjectRef::<KtSession>::new(&login.session).within(&login.namespace);
        if let Some(cached) = self.context.sessions.get(&reference) {
            return Some(cached);
        }
        let api: Api<KtSession> = Api::namespaced(self.context.client.clone(), &login.namespace);
        match api.get_opt(&login.session).await {
            Ok(found) => found.map(Arc::new),
            Err(error) => {
                tracing::warn!(%error, "session lookup failed");
                None
            }
        }
    }
}

impl Handler for Holder {
    type Error = HoldError;

    async fn auth_succeeded(&mut self, _: &mut Session) -> Result<(), Self::Error> {
        self.logged_in.done();
        Ok(())
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: russh::server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        let Ok(login) = user.parse::<Login>() else {
            tracing::warn!(user, "not a session login");
            return Ok(Auth::reject());
        };
        let authorized = self.session(&login).await.and_then(|object| {
            let authorized = PublicKey::from_openssh(object.spec.public_key.trim()).ok()?;
            let uid = object.metadata.uid.clone().unwrap_or_default();
            (authorized.key_data() == key.public_key.key_data()).then(|| (uid, object.spec.clone()))
        });
        let Some((uid, spec)) = authorized else {
            tracing::warn!(%login, "no session for this login and key");
            return Ok(Auth::reject());
        };
        // Every agent reports an invalid spec as an Event (the reconciler); its holder only
        // refuses to hold it, so that none of its ports gets a listener.
        if let Err(error) = kt_proto::validate::spec(&spec) {
            tracing::warn!(%login, %error, "session refused: invalid spec");
            return Ok(Auth::reject());
        }
        let span = tracing::Span::current();
        span.record("namespace", login.namespace.as_str());
        span.record("session", login.session.as_str());
        tracing::info!("session connected");
        let connect = spec.mode == SessionMode::Connect;
        let mut held = Held {
            login,
            uid,
            spec,
            listeners: Arc::default(),
            udp_listeners: Arc::default(),
            renewing: false,
            taken: false,
        };
        // A connect session is held from the moment it logs in: its status tells the
        // workstation the cluster's network and keeps its lease.
        if connect && !self.hold(&mut held).await {
            return Ok(Auth::reject());
        }
        self.held = Some(held);
        Ok(Auth::Accept)
    }

    /// ktctl's connections into the cluster (`connect` sessions only): dialled from this
    /// node if [`Egress`](super::egress::Egress) allows the destination.
    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host: &str,
        port: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Ok(port) = u16::try_from(port) else {
            reply.reject(ChannelOpenFailure::ConnectFailed).await;
            return Ok(());
        };
        if let Some(probe) = self.preview_probe(host, port) {
            let cancel = self.cancel.clone();
            self.tasks
                .spawn(dial_and_pump(channel, reply, probe, cancel).in_current_span());
            return Ok(());
        }
        if !self.connects() {
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        }
        let (context, cancel, host) = (self.context.clone(), self.cancel.clone(), host.to_owned());
        self.tasks.spawn(
            async move {
                match context.allowed(&host, port).await {
                    Ok(destination) => {
                        let destination = context.as_a_pod_would(destination, Transport::Tcp);
                        dial_and_pump(channel, reply, destination, cancel).await;
                    }
                    Err(refusal) => {
                        tracing::warn!(%host, port, %refusal, "connect destination refused");
                        context.connect_refused.inc();
                        reply
                            .reject(ChannelOpenFailure::AdministrativelyProhibited)
                            .await;
                    }
                }
            }
            .in_current_span(),
        );
        Ok(())
    }

    /// UDP from the workstation (`connect` sessions only): relayed from this node to the
    /// destination the path names, under the same rule as TCP.
    async fn channel_open_direct_streamlocal(
        &mut self,
        channel: Channel<Msg>,
        socket_path: &str,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let destination = kt_proto::agent::udp_relay_destination(socket_path);
        let (true, Some(destination)) = (self.connects(), destination) else {
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        let network = self
            .context
            .network
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Err(refusal) = network.egress.check(destination.ip()) {
            tracing::warn!(%destination, %refusal, "connect destination refused");
            self.context.connect_refused.inc();
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        }
        let destination = self.context.as_a_pod_would(destination, Transport::Udp);
        reply.accept().await;
        spawn_udp_relay(&self.tasks, channel, destination, self.cancel.clone());
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let Some(held) = &mut self.held else {
            return Ok(false);
        };
        let Some(service_port) = service_port_of(&held.spec, *port) else {
            tracing::warn!(port = *port, "not a port of the session");
            return Ok(false);
        };
        let listener = match TcpListener::bind((IpAddr::from([0, 0, 0, 0]), 0)).await {
            Ok(l) => l,
            Err(error) => {
                tracing::warn!(%error, "no tunnel listener");
                return Ok(false);
            }
        };
        let Ok(listener_port) = listener.local_addr().map(|a| a.port()) else {
            return Ok(false);
        };
        add_listener(&held.listeners, service_port, listener_port);
        tracing::info!(service_port, listener_port, peer = %self.peer, "tunnel listener");
        let bytes = self.context.tunnel_bytes.clone();
        self.tasks.spawn(
            forward_back(
                listener,
                session.handle(),
                (address.to_owned(), *port),
                self.cancel.child_token(),
                self.tasks.clone(),
                move |moved| bytes.add(&moved),
            )
            .in_current_span(),
        );
        Ok(self.hold_again().await)
    }

    /// ktctl's request to carry one UDP port of its exchange (`spec.udpPorts`): a UDP
    /// listener on this node's address, whose flows come back as `forwarded-streamlocal`
    /// channels with the same path ([`super::udp_exchange`]).
    async fn streamlocal_forward(
        &mut self,
        socket_path: &str,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let Some(held) = &mut self.held else {
            return Ok(false);
        };
        let service_port = kt_proto::agent::udp_forward_port(socket_path)
            .filter(|port| held.spec.udp_ports.iter().any(|p| p.port == *port));
        let Some(service_port) = service_port else {
            tracing::warn!(socket_path, "not a UDP port of the session");
            return Ok(false);
        };
        // The node's address, not the wildcard: replies must leave from the address the
        // pods sent to (see the module doc of udp_exchange).
        let socket = match tokio::net::UdpSocket::bind((self.context.node_ip, 0)).await {
            Ok(socket) => socket,
            Err(error) => {
                tracing::warn!(%error, "no UDP tunnel listener");
                return Ok(false);
            }
        };
        let Ok(listener_port) = socket.local_addr().map(|a| a.port()) else {
            return Ok(false);
        };
        add_listener(&held.udp_listeners, service_port, listener_port);
        tracing::info!(service_port, listener_port, peer = %self.peer, "UDP tunnel listener");
        self.tasks.spawn(
            super::udp_exchange::serve(
                socket,
                session.handle(),
                socket_path.to_owned(),
                self.context.udp_flow_idle,
                self.context.udp.clone(),
                self.cancel.child_token(),
                self.tasks.clone(),
            )
            .in_current_span(),
        );
        Ok(self.hold_again().await)
    }
}

/// Records a listener of Service port `port` on `listener_port`.
fn add_listener(listeners: &Mutex<Vec<Listener>>, port: u16, listener_port: u16) {
    listeners
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Listener {
            port,
            listener_port,
        });
}

/// A status write that failed or took too long.
#[derive(Debug, thiserror::Error)]
enum StatusError {
    #[error("the API server did not answer within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Kube(#[from] kube::Error),
}

/// A held session's status, as this agent writes it.
struct Status {
    context: Arc<HoldContext>,
    /// The connection holding the session: once superseded, it leaves the status alone.
    connection: Connection,
    /// Held by one connection at a time (not `connect`): writes take the session's turn.
    exclusive: bool,
    login: Login,
    /// The session object's uid, for the Events.
    uid: String,
    listeners: Arc<Mutex<Vec<Listener>>>,
    udp_listeners: Arc<Mutex<Vec<Listener>>>,
    /// The cluster's network, for a `connect` session.
    network: Option<ClusterNetwork>,
}

impl Status {
    fn api(&self) -> Api<KtSession> {
        Api::namespaced(self.context.client.clone(), &self.login.namespace)
    }

    fn listeners(&self) -> Vec<Listener> {
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn udp_listeners(&self) -> Vec<Listener> {
        self.udp_listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    async fn patch(&self, status: serde_json::Value) -> Result<(), StatusError> {
        let (api, params, patch) = (self.api(), PatchParams::default(), Patch::Merge(&status));
        let write = api.patch_status(&self.login.session, &params, &patch);
        match tokio::time::timeout(STATUS_WRITE_TIMEOUT, write).await {
            Ok(result) => result.map(drop).map_err(StatusError::from),
            Err(_) => Err(StatusError::Timeout(STATUS_WRITE_TIMEOUT)),
        }
    }

    /// The session's turn to write ([`super::takeover::Holders::write_turn`]), for a
    /// session held by one connection at a time.
    async fn turn(&self) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        if !self.exclusive {
            return None;
        }
        let session = (self.login.namespace.clone(), self.login.session.clone());
        Some(self.context.holders.write_turn(&session).await)
    }

    /// Writes the status; the caller holds the session's [`Status::turn`].
    async fn write(&self) -> Result<(), StatusError> {
        let status = SessionStatus {
            node: self.context.node_name.clone(),
            address: Some(self.context.node_ip),
            listeners: self.listeners(),
            udp_listeners: self.udp_listeners(),
            renew_time: Some(chrono::Utc::now()),
            network: self.network.clone(),
            // Left to every node's agent: a merge patch keeps what they wrote.
            programmed: Default::default(),
        };
        self.patch(json!({ "status": status })).await
    }

    /// Renews every `every` until `stop`, then clears the status if it is still ours (a
    /// reconnected ktctl may already hold the session through another connection) and this
    /// connection was not superseded ([`super::takeover`]).
    async fn renew(self, every: Duration, stop: CancellationToken) {
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(every) => {
                    let _turn = self.turn().await;
                    if self.connection.is_superseded() {
                        break;
                    }
                    if let Err(error) = self.write().await {
                        tracing::warn!(error = %kt_proto::error_chain(&error), "failed to renew session");
                    }
                }
            }
        }
        // In the session's turn, and only if the status is still this connection's, as of
        // the version read: a status another agent wrote since is a conflict, not cleared.
        let turn = self.turn().await;
        if !self.connection.is_superseded() {
            self.release().await;
        }
        // After the status: a status this agent no longer vouches for would be reported.
        let (listeners, udp_listeners) = (self.listeners(), self.udp_listeners());
        let released = self.context.publisher.release(
            &self.login.namespace,
            &self.login.session,
            &listeners,
            &udp_listeners,
        );
        if let Err(error) = released.await {
            tracing::warn!(error = %kt_proto::error_chain(&error), "failed to update the agent record; the session's lease ends it");
        }
        drop(turn);
        let session = (self.login.namespace.clone(), self.login.session.clone());
        self.context.holders.prune(&session);
    }

    /// Clears the status if it still names this node and these listeners, at the version
    /// read. A 409 is a write in between: every node's agent acknowledges what it
    /// programmed into the same object, so the status is read again (three tries); a status
    /// that then names another holder is left to it.
    async fn release(&self) {
        for _ in 0..3 {
            let api = self.api();
            let current =
                tokio::time::timeout(STATUS_WRITE_TIMEOUT, api.get_opt(&self.login.session)).await;
            let version = match current {
                Ok(Ok(Some(s)))
                    if s.status.as_ref().is_some_and(|st| {
                        st.node == self.context.node_name
                            && st.listeners == self.listeners()
                            && st.udp_listeners == self.udp_listeners()
                    }) =>
                {
                    s.metadata.resource_version
                }
                _ => None,
            };
            let Some(version) = version else {
                return;
            };
            let clear = json!({"metadata": {"resourceVersion": version}, "status": null});
            match self.patch(clear).await {
                Ok(()) => {
                    tracing::info!("session released");
                    let _ = self
                        .context
                        .events
                        .send(super::events::SessionEvent::released(
                            &self.login.namespace,
                            &self.login.session,
                            &self.uid,
                            &self.context.node_name,
                        ));
                    return;
                }
                Err(StatusError::Kube(kube::Error::Api(status))) if status.code == 409 => {
                    tracing::debug!("the session changed since it was read; reading it again");
                }
                Err(error) => {
                    tracing::warn!(error = %kt_proto::error_chain(&error), "failed to release session; its lease ends it");
                    return;
                }
            }
        }
        tracing::warn!("the session kept changing; its lease ends it");
    }
}
