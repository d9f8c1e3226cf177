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

use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use backon::{ExponentialBuilder, Retryable as _};
use k8s_openapi::api::core::v1::Pod;
use kt_tunnel::config::HostKeyPin;
use kube::Api;
use russh::{
    ChannelOpenFailure,
    client::{self, ChannelOpenHandle, Handle},
    keys::{PrivateKey, PrivateKeyWithHashAlg, ssh_key::private::Ed25519Keypair},
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    sync::Mutex,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// How long a direct connection attempt may take before the pod counts as unreachable.
const DIRECT_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

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
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("port-forward to {target} failed")]
    PortForward {
        target: String,
        #[source]
        source: kube::Error,
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
        source: russh::Error,
    },
    #[error("{target} refused the session key")]
    AuthRefused { target: String },
    #[error("{target} refused to listen on port {port}")]
    RemoteForward {
        target: String,
        port: u32,
        #[source]
        source: russh::Error,
    },
    #[error("failed to open a channel to {destination} through {target}")]
    Channel {
        target: String,
        destination: String,
        #[source]
        source: russh::Error,
    },
}

/// One reverse tunnel: the port the server is asked to forward (`tcpip-forward`'s bind
/// port, as that server understands it) and the local address its connections go to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteForward {
    pub bind_port: u32,
    pub local: SocketAddr,
}

impl RemoteForward {
    /// A shadow listening on its pod port `port` (v0.3.7's reverse tunnels).
    pub fn on_pod_port(port: u16, local: SocketAddr) -> Self {
        Self {
            bind_port: u32::from(port),
            local,
        }
    }

    /// An agent holding the Service port `service_port` ([`kt_proto::agent::forward_port`]).
    pub fn for_service_port(service_port: u16, local: SocketAddr) -> Self {
        Self {
            bind_port: kt_proto::agent::forward_port(service_port),
            local,
        }
    }
}

/// How [`SshPool::keep_remote_forwards`] ended.
#[derive(Debug, PartialEq, Eq)]
pub enum ForwardsEnded {
    /// The session was stopped.
    Stopped,
    /// The server could not be reached again.
    GaveUp,
}

/// The way to the SSH port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Direct(SocketAddr),
    PortForward,
}

/// A session key pair.
pub struct SessionKey {
    pub private: Arc<PrivateKey>,
    /// `ssh-ed25519 AAAA… kt` for authorized_keys.
    pub public_line: String,
    /// OpenSSH PEM of the private key (the ConfigMap's `privateKey`, the key file).
    pub private_pem: String,
}

impl SessionKey {
    pub fn generate() -> Self {
        let seed: [u8; 32] = rand::random();
        let private = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
        let public_line = private.public_key().to_openssh().expect("ed25519 encodes");
        let private_pem = private
            .to_openssh(russh::keys::ssh_key::LineEnding::LF)
            .expect("ed25519 encodes")
            .to_string();
        Self {
            private: Arc::new(private),
            public_line: format!("{public_line} kt"),
            private_pem,
        }
    }
}

/// Where the connections that the server accepts for this session's `tcpip-forward`s go.
#[derive(Default)]
struct ReverseForwards {
    /// Forwarded (remote) port → local address.
    targets: std::sync::Mutex<HashMap<u32, SocketAddr>>,
    /// One bridge per forwarded connection.
    tasks: TaskTracker,
    stop: CancellationToken,
}

/// ktctl's SSH client handler: the host-key pin, and `forwarded-tcpip` channels (from
/// remote forwards) bridged to their local address.
pub struct Client {
    host_key: HostKeyPin,
    reverse: Arc<ReverseForwards>,
}

impl client::Handler for Client {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        self.host_key.check_server_key(key).await
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: russh::Channel<client::Msg>,
        _connected_address: &str,
        connected_port: u32,
        originator_address: &str,
        originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        let target = self
            .reverse
            .targets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&connected_port)
            .copied();
        let Some(local) = target else {
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        let (peer, stop) = (
            format!("{originator_address}:{originator_port}"),
            self.reverse.stop.clone(),
        );
        self.reverse.tasks.spawn(async move {
            match TcpStream::connect(local).await {
                Ok(tcp) => {
                    let _ = tcp.set_nodelay(true);
                    reply.accept().await;
                    tokio::select! {
                        result = kt_tunnel::bridge(channel, tcp) => if let Err(error) = result {
                            tracing::debug!(%peer, %error, "reverse connection ended with an error");
                        },
                        () = stop.cancelled() => {}
                    }
                }
                Err(error) => {
                    tracing::warn!("Failed to reach local port {} for {peer}: {error}", local.port());
                    reply.reject(ChannelOpenFailure::ConnectFailed).await;
                }
            }
        });
        Ok(())
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
                        source,
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
    async fn handshake<S>(&self, stream: S, host_key: HostKeyPin) -> Result<Handle<Client>, SshError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (stream, reader) = kt_tunnel::transport::read_ahead(stream);
        self.streams.spawn(reader);
        let ssh_err = |source| SshError::Ssh {
            target: self.name(),
            source,
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
    async fn connect_within(&self, route: Route, timeout: Duration) -> Result<Handle<Client>, SshError> {
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
                    .ok_or_else(|| SshError::NoPodAddress { target: self.name() })?;
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
                tracing::info!("Connected to {} at {addr} directly", self.target);
            }
            Route::PortForward => tracing::info!(
                "Port forward to {}:{} established",
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
        tracing::debug!(connections = self.connections.len(), ?route, "SSH connections ready");
        Ok(route)
    }

    fn route(&self) -> Route {
        self.route.get().copied().unwrap_or(Route::PortForward)
    }

    /// A new connection for a pool slot. Under `auto` a direct route that stops working (the
    /// pod restarted with a new host key, the network changed) falls back to the
    /// port-forward, which also learns the new key.
    async fn reconnect(&self) -> Result<Handle<Client>, SshError> {
        let route = self.route();
        match (self.transport, route) {
            (Transport::Auto, Route::Direct(_)) => match self.connect(route).await {
                Ok(handle) => Ok(handle),
                Err(e) => {
                    tracing::debug!(error = %kt_proto::error_chain(&e), "direct reconnect failed, using the port-forward");
                    self.connect(Route::PortForward).await
                }
            },
            _ => self.connect(route).await,
        }
    }

    /// A `direct-tcpip` channel to `host:port` on the next SSH connection in turn,
    /// reconnecting it (with back-off, five more attempts) if it has gone.
    pub async fn open(&self, host: &str, port: u16) -> Result<russh::Channel<client::Msg>, SshError> {
        let slot = &self.connections[self.next.fetch_add(1, Ordering::Relaxed) % self.connections.len()];
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
            match handle
                .channel_open_direct_tcpip(host, u32::from(port), "127.0.0.1", 0)
                .await
            {
                Ok(channel) => Ok(channel),
                // The server could not reach the destination: no point in retrying.
                Err(refused @ russh::Error::ChannelOpenFailure(_)) => Err(OpenAttempt::Refused(refused)),
                // A dead connection shows here first: drop it and go round again.
                Err(source) => {
                    *guard = None;
                    Err(OpenAttempt::Broken(SshError::Channel {
                        target: self.name(),
                        destination: format!("{host}:{port}"),
                        source,
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
                    destination: format!("{host}:{port}"),
                    source,
                },
            })
    }

    /// Asks the server to listen for each of `forwards` on all its addresses and to send the
    /// connections back here, over the first SSH connection.
    pub async fn open_remote_forwards(&self, forwards: &[RemoteForward]) -> Result<(), SshError> {
        self.reverse
            .targets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(forwards.iter().map(|f| (f.bind_port, f.local)));
        let mut guard = self.connections[0].lock().await;
        if guard.as_ref().is_none_or(Handle::is_closed) {
            *guard = Some(self.reconnect().await?);
        }
        let handle = guard.as_ref().expect("set above");
        self.request_remote_forwards(handle, forwards).await
    }

    async fn request_remote_forwards(
        &self,
        handle: &Handle<Client>,
        forwards: &[RemoteForward],
    ) -> Result<(), SshError> {
        for RemoteForward { bind_port: port, local } in forwards {
            handle
                .tcpip_forward("0.0.0.0", *port)
                .await
                .map_err(|source| SshError::RemoteForward {
                    target: self.name(),
                    port: *port,
                    source,
                })?;
            match self.target.role {
                Role::Shadow => tracing::info!("Reverse tunnel 0.0.0.0:{port} -> {local} established"),
                Role::Agent => tracing::info!(
                    "Service port {port} -> {local} held by {}",
                    self.target
                ),
            }
        }
        Ok(())
    }

    /// Keeps the remote forwards of [`SshPool::open_remote_forwards`] up until `stop`:
    /// when their SSH connection drops, reconnects with back-off and asks again — for ever
    /// (a shadow pod stays where it is), or until `give_up_after` attempts in a row failed
    /// (an agent pod may be gone for good; the caller moves to another).
    pub async fn keep_remote_forwards(
        &self,
        forwards: &[RemoteForward],
        stop: &CancellationToken,
        give_up_after: Option<usize>,
    ) -> ForwardsEnded {
        loop {
            let alive = self.connections[0]
                .lock()
                .await
                .as_ref()
                .is_some_and(|h| !h.is_closed());
            if alive {
                tokio::select! {
                    () = stop.cancelled() => return ForwardsEnded::Stopped,
                    () = tokio::time::sleep(Duration::from_millis(300)) => continue,
                }
            }
            tracing::warn!("Connection to {} lost, reconnecting", self.target);
            let restore = || async {
                let handle = self.reconnect().await?;
                let result = self.request_remote_forwards(&handle, forwards).await;
                *self.connections[0].lock().await = Some(handle);
                result
            };
            let backoff = ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(200))
                .with_max_delay(Duration::from_secs(5));
            let backoff = match give_up_after {
                Some(attempts) => backoff.with_max_times(attempts.saturating_sub(1)),
                None => backoff.without_max_times(),
            };
            let restored = restore.retry(backoff).notify(|e, _| {
                tracing::debug!(error = %kt_proto::error_chain(e), "reverse tunnels not restored yet");
            });
            tokio::select! {
                () = stop.cancelled() => return ForwardsEnded::Stopped,
                restored = restored => if restored.is_err() {
                    return ForwardsEnded::GaveUp;
                },
            }
        }
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
