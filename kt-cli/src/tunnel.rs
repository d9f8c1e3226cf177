//! SSH to the shadow: a few SSH connections per session (`--sshConnections`), each carrying
//! `direct-tcpip` channels, one per forwarded connection, handed out in turn so that
//! parallel connections spread over several SSH session loops. Every SSH connection goes
//! straight to the pod's address when that is reachable from the workstation (`--transport
//! auto`, the default), else over the API server's pod port-forward, which is always
//! available. A dropped connection is re-established with back-off when next used. The
//! session key authenticates the client. The shadow's host key is learned over the
//! port-forward (the API server's authenticated TLS); a direct connection must show that
//! key (v0.3.7 checks no host key at all).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use k8s_openapi::api::core::v1::Pod;
use kt_proto::k8s;
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

use crate::args::Transport;

/// How long a direct connection attempt may take before the pod counts as unreachable.
const DIRECT_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("port-forward to pod {pod} failed")]
    PortForward {
        pod: String,
        #[source]
        source: kube::Error,
    },
    #[error("failed to connect to shadow pod at {addr}")]
    Direct {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("shadow pod {pod} has no address to connect to directly (--transport direct)")]
    NoPodAddress { pod: String },
    #[error("SSH to shadow pod {pod} failed")]
    Ssh {
        pod: String,
        #[source]
        source: russh::Error,
    },
    #[error("shadow pod {pod} refused the session key")]
    AuthRefused { pod: String },
    #[error("shadow pod {pod} refused to listen on port {port}")]
    RemoteForward {
        pod: String,
        port: u16,
        #[source]
        source: russh::Error,
    },
    #[error("failed to open a channel to {target}")]
    Channel {
        target: String,
        #[source]
        source: russh::Error,
    },
}

/// How [`Tunnel::keep_remote_forwards`] ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Kept {
    /// The session was stopped.
    Stopped,
    /// The pod could not be reached again.
    GaveUp,
}

/// The way to the shadow's SSH port.
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

/// Where connections the shadow accepts for this session's `tcpip-forward`s go.
#[derive(Default)]
struct Reverse {
    /// Remote (pod) port → local address.
    targets: std::sync::Mutex<HashMap<u32, SocketAddr>>,
    /// One bridge per forwarded connection.
    tasks: TaskTracker,
    stop: CancellationToken,
}

/// ktctl's SSH client handler: the host-key pin, and `forwarded-tcpip` channels (from
/// remote forwards) bridged to their local address.
pub struct Client {
    host_key: HostKeyPin,
    reverse: Arc<Reverse>,
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

pub struct Tunnel {
    pods: Api<Pod>,
    pod: String,
    /// The SSH port in the pod and the login (the shadow's `root@…:22` unless
    /// [`Tunnel::login`] says otherwise).
    port: u16,
    user: String,
    key: Arc<PrivateKey>,
    transport: Transport,
    host_key: HostKeyPin,
    reverse: Arc<Reverse>,
    /// Chosen by [`Tunnel::start`].
    route: OnceLock<Route>,
    connections: Vec<Mutex<Option<Handle<Client>>>>,
    next: AtomicUsize,
}

impl Tunnel {
    pub fn new(
        client: kube::Client,
        namespace: &str,
        pod: &str,
        key: Arc<PrivateKey>,
        transport: Transport,
        connections: usize,
    ) -> Self {
        Self {
            pods: Api::namespaced(client, namespace),
            pod: pod.into(),
            port: k8s::SSH_PORT,
            user: k8s::SSH_USER.into(),
            key,
            transport,
            host_key: HostKeyPin::default(),
            reverse: Arc::default(),
            route: OnceLock::new(),
            connections: (0..connections.max(1)).map(|_| Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
        }
    }

    /// Logs in as `user` on `port` (the agent's hold server) instead of the shadow's.
    pub fn login(mut self, port: u16, user: String) -> Self {
        self.port = port;
        self.user = user;
        self
    }

    async fn connect(&self, route: Route) -> Result<Handle<Client>, TunnelError> {
        match route {
            Route::Direct(addr) => {
                let tcp = tokio::time::timeout(DIRECT_CONNECT_TIMEOUT, TcpStream::connect(addr))
                    .await
                    .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
                    .map_err(|source| TunnelError::Direct { addr, source })?;
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
                let mut forwarder = self
                    .pods
                    .portforward(&self.pod, &[self.port])
                    .await
                    .map_err(|source| TunnelError::PortForward {
                        pod: self.pod.clone(),
                        source,
                    })?;
                let stream = forwarder
                    .take_stream(self.port)
                    .expect("the port was requested");
                // The forwarder's task ends with the stream.
                tokio::spawn(async move {
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
    ) -> Result<Handle<Client>, TunnelError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        // The read-ahead ends with the stream.
        let (stream, reader) = kt_tunnel::transport::read_ahead(stream);
        tokio::spawn(reader);
        let ssh_err = |source| TunnelError::Ssh {
            pod: self.pod.clone(),
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
                &self.user,
                PrivateKeyWithHashAlg::new(self.key.clone(), None),
            )
            .await
            .map_err(ssh_err)?;
        if !auth.success() {
            return Err(TunnelError::AuthRefused {
                pod: self.pod.clone(),
            });
        }
        Ok(handle)
    }

    /// The pod's SSH address, unless `--transport portForward`.
    async fn pod_address(&self) -> Option<SocketAddr> {
        if self.transport == Transport::PortForward {
            return None;
        }
        let pod = self.pods.get(&self.pod).await.ok()?;
        let ip: IpAddr = pod.status?.pod_ip?.parse().ok()?;
        Some(SocketAddr::new(ip, self.port))
    }

    /// Connects over `route`, retrying with back-off until `deadline`: a pod is Running
    /// before its SSH server listens.
    async fn connect_until(
        &self,
        route: Route,
        deadline: tokio::time::Instant,
    ) -> Result<Handle<Client>, TunnelError> {
        let mut delay = Duration::from_millis(100);
        loop {
            match self.connect(route).await {
                Ok(handle) => return Ok(handle),
                Err(e) if tokio::time::Instant::now() + delay < deadline => {
                    tracing::debug!(error = %kt_proto::error_chain(&e), "shadow not reachable yet");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Chooses the route and establishes the connections, retrying for up to `timeout`
    /// (`--portForwardTimeout`). Under `auto` the first connection goes over the
    /// port-forward (it learns the host key and proves the shadow is up); then the pod's
    /// address is tried once, and used if it answers with that key.
    pub async fn start(&self, timeout: Duration) -> Result<Route, TunnelError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let (route, first) = match self.transport {
            Transport::Direct => {
                let addr = self
                    .pod_address()
                    .await
                    .ok_or_else(|| TunnelError::NoPodAddress {
                        pod: self.pod.clone(),
                    })?;
                let route = Route::Direct(addr);
                (route, self.connect_until(route, deadline).await?)
            }
            Transport::PortForward => (
                Route::PortForward,
                self.connect_until(Route::PortForward, deadline).await?,
            ),
            Transport::Auto => {
                let forwarded = self.connect_until(Route::PortForward, deadline).await?;
                match self.pod_address().await {
                    Some(addr) => match self.connect(Route::Direct(addr)).await {
                        Ok(direct) => (Route::Direct(addr), direct),
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
                tracing::info!("Connected to pod {} at {addr} directly", self.pod);
            }
            Route::PortForward => {
                tracing::info!("Port forward to pod {}:{} established", self.pod, self.port)
            }
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
        tracing::debug!(connections = self.connections.len(), ?route, "tunnel ready");
        Ok(route)
    }

    /// A new connection for a pool slot. Under `auto` a direct route that stops working (the
    /// pod restarted with a new host key, the network changed) falls back to the
    /// port-forward, which also learns the new key.
    async fn reconnect(&self, route: Route) -> Result<Handle<Client>, TunnelError> {
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
    /// reconnecting it (with back-off) if it has gone.
    pub async fn open(
        &self,
        host: &str,
        port: u16,
    ) -> Result<russh::Channel<client::Msg>, TunnelError> {
        let target = format!("{host}:{port}");
        let route = self.route.get().copied().unwrap_or(Route::PortForward);
        let slot =
            &self.connections[self.next.fetch_add(1, Ordering::Relaxed) % self.connections.len()];
        let mut delay = Duration::from_millis(200);
        for attempt in 0..6 {
            let mut guard = slot.lock().await;
            if guard.as_ref().is_none_or(Handle::is_closed) {
                if attempt == 0 && guard.is_some() {
                    tracing::warn!("Connection to shadow pod {} lost, reconnecting", self.pod);
                }
                match self.reconnect(route).await {
                    Ok(h) => *guard = Some(h),
                    Err(e) if attempt == 5 => return Err(e),
                    Err(e) => {
                        tracing::debug!(error = %kt_proto::error_chain(&e), "reconnect failed");
                        drop(guard);
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(5));
                        continue;
                    }
                }
            }
            let handle = guard.as_ref().expect("set above");
            match handle
                .channel_open_direct_tcpip(host, u32::from(port), "127.0.0.1", 0)
                .await
            {
                Ok(channel) => return Ok(channel),
                // A dead connection shows here first: drop it and go round again.
                Err(russh::Error::ChannelOpenFailure(reason)) => {
                    return Err(TunnelError::Channel {
                        target,
                        source: russh::Error::ChannelOpenFailure(reason),
                    });
                }
                Err(source) if attempt == 5 => return Err(TunnelError::Channel { target, source }),
                Err(_) => *guard = None,
            }
        }
        unreachable!("the last attempt returns")
    }

    /// Asks the shadow to listen on each `(pod port, local address)` pair's port on all its
    /// addresses (v0.3.7's reverse tunnels) and to send the connections back here, over the
    /// first SSH connection.
    pub async fn open_remote_forwards(
        &self,
        forwards: &[(u16, SocketAddr)],
    ) -> Result<(), TunnelError> {
        self.reverse
            .targets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(
                forwards
                    .iter()
                    .map(|(port, local)| (u32::from(*port), *local)),
            );
        let mut guard = self.connections[0].lock().await;
        if guard.as_ref().is_none_or(Handle::is_closed) {
            let route = self.route.get().copied().unwrap_or(Route::PortForward);
            *guard = Some(self.reconnect(route).await?);
        }
        let handle = guard.as_ref().expect("set above");
        self.request_remote_forwards(handle, forwards).await
    }

    async fn request_remote_forwards(
        &self,
        handle: &Handle<Client>,
        forwards: &[(u16, SocketAddr)],
    ) -> Result<(), TunnelError> {
        for (port, local) in forwards {
            handle
                .tcpip_forward("0.0.0.0", u32::from(*port))
                .await
                .map_err(|source| TunnelError::RemoteForward {
                    pod: self.pod.clone(),
                    port: *port,
                    source,
                })?;
            tracing::info!("Reverse tunnel 0.0.0.0:{port} -> {local} established");
        }
        Ok(())
    }

    /// Keeps the remote forwards of [`Tunnel::open_remote_forwards`] up until `stop`:
    /// when their SSH connection drops, reconnects with back-off and asks again — for ever
    /// (a shadow pod stays where it is), or until `give_up_after` attempts in a row failed
    /// (an agent pod may be gone for good; the caller moves to another).
    pub async fn keep_remote_forwards(
        &self,
        forwards: &[(u16, SocketAddr)],
        stop: &CancellationToken,
        give_up_after: Option<u32>,
    ) -> Kept {
        let route = self.route.get().copied().unwrap_or(Route::PortForward);
        let mut delay = Duration::from_millis(200);
        let mut failures = 0;
        loop {
            let alive = self.connections[0]
                .lock()
                .await
                .as_ref()
                .is_some_and(|h| !h.is_closed());
            if alive {
                tokio::select! {
                    () = stop.cancelled() => return Kept::Stopped,
                    () = tokio::time::sleep(Duration::from_millis(300)) => continue,
                }
            }
            if failures == 0 {
                tracing::warn!("Connection to pod {} lost, reconnecting", self.pod);
            }
            let restored = match self.reconnect(route).await {
                Ok(handle) => {
                    let result = self.request_remote_forwards(&handle, forwards).await;
                    *self.connections[0].lock().await = Some(handle);
                    result
                }
                Err(e) => Err(e),
            };
            match restored {
                Ok(()) => {
                    delay = Duration::from_millis(200);
                    failures = 0;
                }
                Err(e) => {
                    failures += 1;
                    tracing::debug!(error = %kt_proto::error_chain(&e), "reverse tunnels not restored yet");
                    if give_up_after.is_some_and(|limit| failures >= limit) {
                        return Kept::GaveUp;
                    }
                    tokio::select! {
                        () = stop.cancelled() => return Kept::Stopped,
                        () = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Ends the bridges of forwarded connections and waits for them.
    pub async fn close(&self) {
        self.reverse.stop.cancel();
        self.reverse.tasks.close();
        self.reverse.tasks.wait().await;
    }
}
