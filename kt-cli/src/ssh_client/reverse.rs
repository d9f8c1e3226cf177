//! Reverse tunnels (`tcpip-forward`): the server listens and sends each connection back as a
//! `forwarded-tcpip` channel, which the client handler bridges to a local address. They live
//! on the pool's first SSH connection and are asked for again after it reconnects. A UDP port
//! of an agent's exchange is asked for as a `streamlocal-forward` with a
//! [`kt_proto::agent::udp_forward_path`]; the agent sends each pod flow back as a
//! `forwarded-streamlocal` channel of framed datagrams, which gets a local UDP socket of its
//! own, connected to the local address.

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use backon::{ExponentialBuilder, Retryable as _};
use kt_tunnel::config::HostKeyPin;
use russh::{
    ChannelOpenFailure,
    client::{self, ChannelOpenHandle, Handle},
};
use tokio::net::{TcpStream, UdpSocket};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{Role, SshError, SshPool};

/// One reverse tunnel: the port the server is asked to forward (`tcpip-forward`'s bind
/// port, as that server understands it; for UDP, the Service port) and the local address its
/// connections (or datagrams) go to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteForward {
    pub bind_port: u32,
    pub local: SocketAddr,
    /// A UDP port of an agent's exchange.
    pub udp: bool,
}

impl RemoteForward {
    /// A shadow listening on its pod port `port` (v0.3.7's reverse tunnels).
    pub fn on_pod_port(port: u16, local: SocketAddr) -> Self {
        Self {
            bind_port: u32::from(port),
            local,
            udp: false,
        }
    }

    /// An agent holding the Service port `service_port` ([`kt_proto::agent::forward_port`]).
    pub fn for_service_port(service_port: u16, local: SocketAddr) -> Self {
        Self {
            bind_port: kt_proto::agent::forward_port(service_port),
            local,
            udp: false,
        }
    }

    /// An agent holding the UDP Service port `service_port`
    /// ([`kt_proto::agent::udp_forward_path`]); its datagrams go to the UDP port `local`.
    pub fn for_udp_service_port(service_port: u16, local: SocketAddr) -> Self {
        Self {
            bind_port: u32::from(service_port),
            local,
            udp: true,
        }
    }
}

/// The `streamlocal-forward` path of a UDP forward.
fn udp_path(forward: &RemoteForward) -> Option<String> {
    let port = u16::try_from(forward.bind_port).ok()?;
    forward.udp.then(|| kt_proto::agent::udp_forward_path(port))
}

/// How [`SshPool::keep_remote_forwards`] ended.
#[derive(Debug, PartialEq, Eq)]
pub enum ForwardsEnded {
    /// The session was stopped.
    Stopped,
    /// The server could not be reached again.
    GaveUp,
}

/// Where the connections that the server accepts for this session's `tcpip-forward`s go.
#[derive(Default)]
pub(super) struct ReverseForwards {
    /// Forwarded (remote) port → local address.
    targets: std::sync::Mutex<HashMap<u32, SocketAddr>>,
    /// UDP forward path → local UDP address.
    udp_targets: std::sync::Mutex<HashMap<String, SocketAddr>>,
    /// One bridge per forwarded connection.
    pub(super) tasks: TaskTracker,
    pub(super) stop: CancellationToken,
}

/// ktctl's SSH client handler: the host-key pin, and `forwarded-tcpip` channels (from
/// remote forwards) bridged to their local address.
pub(super) struct Client {
    pub(super) host_key: HostKeyPin,
    pub(super) reverse: Arc<ReverseForwards>,
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

    /// One pod flow of an exchanged UDP port: a local socket of its own, connected to the
    /// local address, so the program's replies go back to this flow. russh accepts every
    /// such channel by default; only this session's UDP paths are.
    async fn server_channel_open_forwarded_streamlocal(
        &mut self,
        channel: russh::Channel<client::Msg>,
        socket_path: &str,
        reply: ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        let target = self
            .reverse
            .udp_targets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(socket_path)
            .copied();
        let Some(local) = target else {
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        let stop = self.reverse.stop.clone();
        self.reverse.tasks.spawn(async move {
            let socket = match local_udp(local).await {
                Ok(socket) => socket,
                Err(error) => {
                    tracing::warn!("Failed to open a UDP socket to local port {}: {error}", local.port());
                    reply.reject(ChannelOpenFailure::ConnectFailed).await;
                    return;
                }
            };
            reply.accept().await;
            tokio::select! {
                result = kt_tunnel::datagram::relay(channel, kt_tunnel::datagram::ConnectedUdp(socket)) => {
                    if let Err(error) = result {
                        tracing::debug!(%local, %error, "UDP flow ended with an error");
                    }
                }
                () = stop.cancelled() => {}
            }
        });
        Ok(())
    }
}

/// A UDP socket on the loopback address of `local`'s family, connected to `local`.
async fn local_udp(local: SocketAddr) -> std::io::Result<UdpSocket> {
    let any = if local.is_ipv4() {
        SocketAddr::from(([127, 0, 0, 1], 0))
    } else {
        SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 0))
    };
    let socket = UdpSocket::bind(any).await?;
    socket.connect(local).await?;
    Ok(socket)
}

impl SshPool {
    /// Asks the server to listen for each of `forwards` on all its addresses and to send the
    /// connections back here, over the first SSH connection.
    pub async fn open_remote_forwards(&self, forwards: &[RemoteForward]) -> Result<(), SshError> {
        self.reverse
            .targets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(
                forwards
                    .iter()
                    .filter(|f| !f.udp)
                    .map(|f| (f.bind_port, f.local)),
            );
        self.reverse
            .udp_targets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(
                forwards
                    .iter()
                    .filter_map(|f| Some((udp_path(f)?, f.local))),
            );
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
        for forward in forwards {
            let (port, local) = (&forward.bind_port, &forward.local);
            if let Some(path) = udp_path(forward) {
                let service_port = u16::try_from(*port).unwrap_or_default();
                handle.streamlocal_forward(path).await.map_err(|source| {
                    if matches!(source, russh::Error::RequestDenied) {
                        SshError::UdpForwardRefused {
                            target: self.name(),
                            port: service_port,
                        }
                    } else {
                        SshError::Ssh {
                            target: self.name(),
                            source: Box::new(source),
                        }
                    }
                })?;
                tracing::info!(
                    "Service port {service_port}/UDP -> {local} held by {}",
                    self.target
                );
                continue;
            }
            handle
                .tcpip_forward("0.0.0.0", *port)
                .await
                .map_err(|source| SshError::RemoteForward {
                    target: self.name(),
                    port: *port,
                    source: Box::new(source),
                })?;
            match self.target.role {
                Role::Shadow => {
                    tracing::info!("Reverse tunnel 0.0.0.0:{port} -> {local} established")
                }
                Role::Navigator => tracing::info!(
                    "Pod {}'s inbound port {port} -> {local} redirected",
                    self.target.pod
                ),
                Role::Agent => {
                    tracing::info!("Service port {port} -> {local} held by {}", self.target)
                }
            }
        }
        Ok(())
    }

    /// Asks the server to stop each of `forwards` (`cancel-tcpip-forward`), on the
    /// connection that asked for them; the ports whose cancel the server confirmed. Nothing
    /// is asked when that connection is gone (the server stopped them when it went).
    pub async fn cancel_remote_forwards(&self, forwards: &[RemoteForward]) -> Vec<u32> {
        let guard = self.connections[0].lock().await;
        let Some(handle) = guard.as_ref().filter(|h| !h.is_closed()) else {
            return Vec::new();
        };
        let mut confirmed = Vec::new();
        for forward in forwards {
            if let Some(path) = udp_path(forward) {
                // The listener goes with the connection; the agent confirms nothing here.
                let _ = handle.cancel_streamlocal_forward(path).await;
                continue;
            }
            match handle
                .cancel_tcpip_forward("0.0.0.0", forward.bind_port)
                .await
            {
                Ok(()) => confirmed.push(forward.bind_port),
                Err(error) => {
                    tracing::debug!(%error, port = forward.bind_port, "cancel-tcpip-forward refused");
                }
            }
        }
        confirmed
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
}
