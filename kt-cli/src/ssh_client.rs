//! ktctl's SSH client: a pool of SSH connections to one [`Target`] — a shadow pod (v0.3.7's
//! `root@pod:22`) or a node agent (a session login on the node's port 9922). Forwarded
//! connections are `direct-tcpip` channels handed out over the pool in turn, so that parallel
//! connections spread over several SSH session loops (`--sshConnections`); reverse tunnels
//! (`tcpip-forward`) live on the first connection.
//!
//! Every connection goes straight to the pod's address when that is reachable from the
//! workstation (`--transport auto`, the default), else over the API server's pod
//! port-forward, which is always available. A dropped connection is re-established with
//! back-off when next used. The session key authenticates the client; the server's host key
//! is learned over the port-forward (the API server's authenticated TLS), and a direct
//! connection must show that key (v0.3.7 checks no host key at all).

mod key;
mod reverse;

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use backon::{ExponentialBuilder, Retryable as _};
use k8s_openapi::api::core::v1::Pod;
use kt_tunnel::config::HostKeyPin;
use kube::Api;
use russh::{
    client::{self, Handle},
    keys::{PrivateKey, PrivateKeyWithHashAlg},
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    sync::Mutex,
};
use tokio_util::task::TaskTracker;

use self::reverse::{Client, ReverseForwards};
pub use self::{
    key::SessionKey,
    reverse::{ForwardsEnded, RemoteForward},
};

/// How long a direct connection attempt may take before the pod counts as unreachable.
const DIRECT_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// How long data sent on a direct connection may stay unacknowledged before the kernel
/// ends it (`TCP_USER_TIMEOUT`, RFC 5482; Linux). A path that silently drops packets (a
/// black-holed route, a firewall that changed its mind) then ends the connection within
/// this plus one keepalive interval, and the pool reconnects over the port-forward (issue
/// 16: within 5 s in all). Without it a sender blocked on a full socket buffer waits for
/// the kernel's retransmissions to give up, about 15 minutes. 2 s is several
/// retransmissions (the minimum RTO is 200 ms): a path that loses that much is better
/// left; the cost of a false alarm is the connections then open through this one.
const DIRECT_USER_TIMEOUT: Duration = Duration::from_secs(2);

/// How to reach the SSH server (`--transport`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// Direct when the pod answers at its address with the key learned over the
    /// port-forward, else the port-forward.
    Auto,
    Direct,
    PortForward,
}

/// What the SSH server is: messages name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// A shadow pod (v0.3.7 contract, or kt's shadow).
    Shadow,
    /// kt's node agent, holding a session.
    Agent,
    /// The navigator in an ephemeral container (`exchange --mode ephemeral`): its reverse
    /// tunnels take the pod's own inbound ports.
    Navigator,
}

/// The SSH server of a session: which pod, its SSH port, and the login.
#[derive(Clone, Debug)]
pub struct Target {
    pub role: Role,
    pub namespace: String,
    pub pod: String,
    pub port: u16,
    pub user: String,
}

impl Target {
    /// A shadow pod: `root` on port 22 (v0.3.7).
    pub fn shadow(namespace: &str, pod: &str) -> Self {
        Self {
            role: Role::Shadow,
            namespace: namespace.to_owned(),
            pod: pod.to_owned(),
            port: kt_proto::compat::SSH_PORT,
            user: kt_proto::compat::SSH_USER.to_owned(),
        }
    }

    /// The navigator of an ephemeral container in `pod`, listening on `port`: `root`.
    pub fn navigator(namespace: &str, pod: &str, port: u16) -> Self {
        Self {
            role: Role::Navigator,
            namespace: namespace.to_owned(),
            pod: pod.to_owned(),
            port,
            user: kt_proto::compat::SSH_USER.to_owned(),
        }
    }

    /// A node agent pod, logged in as `login` on the agent's SSH port.
    pub fn agent(pod: &str, login: &kt_proto::agent::Login) -> Self {
        Self {
            role: Role::Agent,
            namespace: kt_proto::agent::NAMESPACE.to_owned(),
            pod: pod.to_owned(),
            port: kt_proto::agent::SSH_PORT,
            user: login.to_string(),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.role {
            Role::Shadow => write!(f, "shadow pod {}", self.pod),
            Role::Agent => write!(f, "agent {}", self.pod),
            Role::Navigator => write!(f, "the navigator in pod {}", self.pod),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("port-forward to {target} failed")]
    PortForward {
        target: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error("failed to connect to {target} at {addr}")]
    Direct {
        target: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{target} has no address to connect to directly (--transport direct)")]
    NoPodAddress { target: String },
    #[error("SSH to {target} failed")]
    Ssh {
        target: String,
        #[source]
        source: Box<russh::Error>,
    },
    #[error("{target} refused the session key")]
    AuthRefused { target: String },
    #[error("{target} refused to listen on port {port}")]
    RemoteForward {
        target: String,
        port: u32,
        #[source]
        source: Box<russh::Error>,
    },
    #[error(
        "{target} refused to carry UDP port {port} (an agent older than this kt refuses it: apply deploy/ from this kt's release; otherwise the agent's log says why)"
    )]
    UdpForwardRefused { target: String, port: u16 },
    #[error("failed to open a channel to {destination} through {target}")]
    Channel {
        target: String,
        destination: String,
        #[source]
        source: Box<russh::Error>,
    },
}

impl SshError {
    /// Why the server refused to open a channel, when it did (as opposed to the connection
    /// failing).
    pub fn open_failure(&self) -> Option<&russh::ChannelOpenFailure> {
        match self {
            Self::Channel { source, .. } => match &**source {
                russh::Error::ChannelOpenFailure(reason) => Some(reason),
                _ => None,
            },
            _ => None,
        }
    }
}

/// The way to the SSH port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Direct(SocketAddr),
    PortForward,
}

/// What a channel is opened to.
#[derive(Clone, Copy)]
enum Destination<'a> {
    Tcp {
        host: &'a str,
        port: u16,
    },
    /// A UDP relay path.
    Udp(&'a str),
}

impl fmt::Display for Destination<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp { host, port } => write!(f, "{host}:{port}"),
            Self::Udp(path) => write!(f, "UDP relay {path}"),
        }
    }
}

/// A failed attempt to open a channel: refused by the server (final), or a broken
/// connection (retried on a new one).
enum OpenAttempt {
    Refused(russh::Error),
    Broken(SshError),
}

/// SSH connections to one [`Target`].
pub struct SshPool {
    pods: Api<Pod>,
    target: Target,
    key: Arc<PrivateKey>,
    transport: Transport,
    host_key: HostKeyPin,
    reverse: Arc<ReverseForwards>,
    /// Chosen by [`SshPool::start`].
    route: OnceLock<Route>,
    connections: Vec<Mutex<Option<Handle<Client>>>>,
    next: AtomicUsize,
    /// Port-forward and read-ahead tasks; each ends with its stream.
    streams: TaskTracker,
    /// Whether the fall-back from the direct route to the port-forward was said (and not
    /// yet undone by a direct reconnect): every slot of the pool falls back on its own, the
    /// user is told once.
    said_fallback: AtomicBool,
}

impl SshPool {
    pub fn new(
        client: kube::Client,
        target: Target,
        key: Arc<PrivateKey>,
        transport: Transport,
        connections: usize,
    ) -> Self {
        Self {
            pods: Api::namespaced(client, &target.namespace),
            target,
            key,
            transport,
            host_key: HostKeyPin::default(),
            reverse: Arc::default(),
            route: OnceLock::new(),
            said_fallback: AtomicBool::new(false),
            connections: (0..connections.max(1)).map(|_| Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
            streams: TaskTracker::new(),
        }
    }

    /// The server this pool talks to.
    pub fn target(&self) -> &Target {
        &self.target
    }

    fn name(&self) -> String {
        self.target.to_string()
    }

    async fn connect(&self, route: Route) -> Result<Handle<Client>, SshError> {
        match route {
            Route::Direct(addr) => {
                let tcp = tokio::time::timeout(DIRECT_CONNECT_TIMEOUT, TcpStream::connect(addr))
                    .await
                    .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
                    .map_err(|source| SshError::Direct {
                        target: self.name(),
                        addr,
                        source,
                    })?;
                let _ = tcp.set_nodelay(true);
                set_user_timeout(&tcp, DIRECT_USER_TIMEOUT);
                // Under `auto` the key was learned over the port-forward and must match;
                // `--transport direct` trusts the path the user chose.
                let host_key = match self.transport {
                    Transport::Auto => self.host_key.required(),
                    _ => self.host_key.clone(),
                };
                self.handshake(tcp, host_key).await
            }
            Route::PortForward => {
                let port = self.target.port;
                let mut forwarder = self
                    .pods
                    .portforward(&self.target.pod, &[port])
                    .await
                    .map_err(|source| SshError::PortForward {
                        target: self.name(),
                        source: Box::new(source),
                    })?;
                let stream = forwarder.take_stream(port).expect("the port was requested");
                self.streams.spawn(async move {
                    let _ = forwarder.join().await;
                });
                self.handshake(stream, self.host_key.clone()).await
            }
        }
    }

    /// SSH over `stream`, authenticated with the session key.
    async fn handshake<S>(
        &self,
        stream: S,
        host_key: HostKeyPin,
    ) -> Result<Handle<Client>, SshError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (stream, reader) = kt_tunnel::transport::read_ahead(stream);
        self.streams.spawn(reader);
        let ssh_err = |source| SshError::Ssh {
            target: self.name(),
            source: Box::new(source),
        };
        let handler = Client {
            host_key,
            reverse: self.reverse.clone(),
        };
        let mut handle = client::connect_stream(kt_tunnel::config::client(), stream, handler)
            .await
            .map_err(ssh_err)?;
        let auth = handle
            .authenticate_publickey(
                &self.target.user,
                PrivateKeyWithHashAlg::new(self.key.clone(), None),
            )
            .await
            .map_err(ssh_err)?;
        if !auth.success() {
            return Err(SshError::AuthRefused {
                target: self.name(),
            });
        }
        Ok(handle)
    }

    /// The pod's SSH address, unless `--transport portForward`.
    async fn pod_address(&self) -> Option<SocketAddr> {
        if self.transport == Transport::PortForward {
            return None;
        }
        let pod = self.pods.get(&self.target.pod).await.ok()?;
        let ip: IpAddr = pod.status?.pod_ip?.parse().ok()?;
        Some(SocketAddr::new(ip, self.target.port))
    }

    /// Connects over `route`, retrying with back-off for up to `timeout`: a pod is Running
    /// before its SSH server listens.
    async fn connect_within(
        &self,
        route: Route,
        timeout: Duration,
    ) -> Result<Handle<Client>, SshError> {
        (|| self.connect(route))
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(100))
                    .with_max_delay(Duration::from_secs(2))
                    .without_max_times()
                    .with_total_delay(Some(timeout)),
            )
            .notify(|error, _| {
                tracing::debug!(error = %kt_proto::error_chain(error), target = %self.target, "SSH server not reachable yet");
            })
            .await
    }

    /// Chooses the route and establishes the connections, retrying for up to `timeout`
    /// (`--portForwardTimeout`). Under `auto` the first connection goes over the
    /// port-forward (it learns the host key and proves the server is up); then the pod's
    /// address is tried once, and used if it answers with that key.
    pub async fn start(&self, timeout: Duration) -> Result<Route, SshError> {
        let (route, first) = match self.transport {
            Transport::Direct => {
                let addr = self
                    .pod_address()
                    .await
                    .ok_or_else(|| SshError::NoPodAddress {
                        target: self.name(),
                    })?;
                let route = Route::Direct(addr);
                (route, self.connect_within(route, timeout).await?)
            }
            Transport::PortForward => (
                Route::PortForward,
                self.connect_within(Route::PortForward, timeout).await?,
            ),
            Transport::Auto => {
                let forwarded = self.connect_within(Route::PortForward, timeout).await?;
                match self.pod_address().await {
                    Some(addr) => match self.connect(Route::Direct(addr)).await {
                        Ok(direct) => {
                            let _ = forwarded
                                .disconnect(russh::Disconnect::ByApplication, "", "")
                                .await;
                            (Route::Direct(addr), direct)
                        }
                        Err(e) => {
                            tracing::debug!(error = %kt_proto::error_chain(&e), "pod address not usable, staying on the port-forward");
                            (Route::PortForward, forwarded)
                        }
                    },
                    None => (Route::PortForward, forwarded),
                }
            }
        };
        match route {
            Route::Direct(addr) => {
                tracing::info!("Connected to pod {} at {addr} directly", self.target.pod);
            }
            Route::PortForward => tracing::info!(
                "Port forward to pod {}:{} established",
                self.target.pod,
                self.target.port
            ),
        }
        let route = *self.route.get_or_init(|| route);
        *self.connections[0].lock().await = Some(first);
        // The others in parallel; one that fails is retried when it is next used.
        futures::future::join_all(self.connections[1..].iter().map(|slot| async move {
            match self.connect(route).await {
                Ok(handle) => *slot.lock().await = Some(handle),
                Err(e) => tracing::debug!(error = %kt_proto::error_chain(&e), "extra SSH connection failed"),
            }
        }))
        .await;
        tracing::debug!(
            connections = self.connections.len(),
            ?route,
            "SSH connections ready"
        );
        Ok(route)
    }

    /// Whether the first SSH connection (the one that carries the reverse tunnels) is up.
    pub async fn is_connected(&self) -> bool {
        self.connections[0]
            .lock()
            .await
            .as_ref()
            .is_some_and(|h| !h.is_closed())
    }

    /// The route the connections take (port-forward until [`SshPool::start`] chose).
    pub fn route(&self) -> Route {
        self.route.get().copied().unwrap_or(Route::PortForward)
    }

    /// A new connection for a pool slot. Under `auto` a direct route that stops working (the
    /// pod restarted with a new host key, the network changed) falls back to the
    /// port-forward, which also learns the new key.
    async fn reconnect(&self) -> Result<Handle<Client>, SshError> {
        let route = self.route();
        match (self.transport, route) {
            (Transport::Auto, Route::Direct(_)) => match self.connect(route).await {
                Ok(handle) => {
                    if self.said_fallback.swap(false, Ordering::Relaxed) {
                        tracing::info!("{} reachable directly again", self.target);
                    }
                    Ok(handle)
                }
                Err(e) => {
                    tracing::debug!(error = %kt_proto::error_chain(&e), "direct reconnect failed");
                    let forwarded = self.connect(Route::PortForward).await?;
                    // Said once per fall-back of the pool (every slot falls back on its
                    // own), and only when the port-forward did connect: a claim, not an
                    // intention.
                    if !self.said_fallback.swap(true, Ordering::Relaxed) {
                        tracing::info!(
                            "{} not reachable directly any more, reconnected over the port-forward",
                            self.target
                        );
                    }
                    Ok(forwarded)
                }
            },
            _ => self.connect(route).await,
        }
    }

    /// A `direct-tcpip` channel to `host:port` on the next SSH connection in turn,
    /// reconnecting it (with back-off, five more attempts) if it has gone.
    pub async fn open(
        &self,
        host: &str,
        port: u16,
    ) -> Result<russh::Channel<client::Msg>, SshError> {
        self.open_channel(Destination::Tcp { host, port }).await
    }

    /// A UDP relay to `destination` (kt's `direct-streamlocal` extension, see
    /// `kt_proto::agent::udp_relay_path`), like [`SshPool::open`]. The v0.3.7 OpenSSH shadow
    /// refuses it: [`SshError::Channel`] with a channel-open failure.
    pub async fn open_udp(
        &self,
        destination: SocketAddr,
    ) -> Result<russh::Channel<client::Msg>, SshError> {
        let path = kt_proto::agent::udp_relay_path(destination);
        self.open_channel(Destination::Udp(&path)).await
    }

    async fn open_channel(
        &self,
        destination: Destination<'_>,
    ) -> Result<russh::Channel<client::Msg>, SshError> {
        let slot =
            &self.connections[self.next.fetch_add(1, Ordering::Relaxed) % self.connections.len()];
        let attempt = || async {
            let mut guard = slot.lock().await;
            if guard.as_ref().is_none_or(Handle::is_closed) {
                if guard.is_some() {
                    tracing::warn!("Connection to {} lost, reconnecting", self.target);
                }
                *guard = None;
                *guard = Some(self.reconnect().await.map_err(OpenAttempt::Broken)?);
            }
            let handle = guard.as_ref().expect("set above");
            let opened = match destination {
                Destination::Tcp { host, port } => {
                    handle
                        .channel_open_direct_tcpip(host, u32::from(port), "127.0.0.1", 0)
                        .await
                }
                Destination::Udp(path) => handle.channel_open_direct_streamlocal(path).await,
            };
            match opened {
                Ok(channel) => Ok(channel),
                // The server could not reach the destination: no point in retrying.
                Err(refused @ russh::Error::ChannelOpenFailure(_)) => {
                    Err(OpenAttempt::Refused(refused))
                }
                // A dead connection shows here first: drop it and go round again.
                Err(source) => {
                    *guard = None;
                    Err(OpenAttempt::Broken(SshError::Channel {
                        target: self.name(),
                        destination: destination.to_string(),
                        source: Box::new(source),
                    }))
                }
            }
        };
        attempt
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(200))
                    .with_max_delay(Duration::from_secs(5))
                    .with_max_times(5),
            )
            .when(|e| matches!(e, OpenAttempt::Broken(_)))
            .notify(|e, _| {
                if let OpenAttempt::Broken(e) = e {
                    tracing::debug!(error = %kt_proto::error_chain(e), "reconnect failed");
                }
            })
            .await
            .map_err(|e| match e {
                OpenAttempt::Broken(e) => e,
                OpenAttempt::Refused(source) => SshError::Channel {
                    target: self.name(),
                    destination: destination.to_string(),
                    source: Box::new(source),
                },
            })
    }

    /// Ends the bridges of forwarded connections and the SSH connections, and waits for
    /// their tasks.
    pub async fn close(&self) {
        self.reverse.stop.cancel();
        self.reverse.tasks.close();
        self.reverse.tasks.wait().await;
        for slot in &self.connections {
            if let Some(handle) = slot.lock().await.take() {
                let _ = handle
                    .disconnect(russh::Disconnect::ByApplication, "", "")
                    .await;
            }
        }
        self.streams.close();
        if tokio::time::timeout(Duration::from_secs(2), self.streams.wait())
            .await
            .is_err()
        {
            tracing::debug!("SSH transport tasks still running after close");
        }
    }
}

/// Sets `TCP_USER_TIMEOUT` on `tcp` where the kernel has it (Linux); elsewhere ktctl's SSH
/// keepalive alone notices a silent path, in about 10 s.
fn set_user_timeout(tcp: &TcpStream, timeout: Duration) {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Err(error) = socket2::SockRef::from(tcp).set_tcp_user_timeout(Some(timeout)) {
        tracing::debug!(%error, "TCP_USER_TIMEOUT not set");
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = (tcp, timeout);
}
