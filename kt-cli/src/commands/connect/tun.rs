//! The TUN device `kt0` and what carries the packets routed into it. Every TCP connection
//! and UDP flow a workstation program opens to a cluster address is translated
//! ([`nat`]) to ktctl's own listener on `kt0`'s address, so the workstation's kernel
//! terminates it; ktctl then carries it as an SSH `direct-tcpip` channel to the same address
//! and port, dialled from the cluster side (UDP: a kt datagram channel,
//! [`kt_tunnel::datagram`]).
//!
//! Why the kernel's TCP and not a userspace stack (ipstack, smoltcp): ipstack 1.0 has no
//! window scaling and retransmits only when a packet of the same connection arrives, so ten
//! parallel 1 MiB echoes through it stalled for good once the device dropped a burst; the
//! kernel's TCP has neither limit and costs nothing to keep. No crate offers this
//! translation on its own (sing-tun's "system" stack, in Go, is the model).
//!
//! The device is not persistent: when ktctl ends — even by `kill -9` — the kernel removes it
//! and every route through it. IPv6 ranges are not routed yet (said at start).

mod nat;

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use kt_proto::net::Cidr;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::mpsc,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument as _;

use self::nat::{Nat, Protocol};
use super::system::{self, SystemError};
use crate::ssh_client::SshPool;

/// The device's name on Linux (v0.3.7's).
pub(super) const DEVICE: &str = "kt0";
/// The device's own address (where ktctl's listeners are).
pub(super) const DEVICE_ADDRESS: Ipv4Addr = nat::LOCAL;
/// The largest a TUN device takes (Linux's `MAX_MTU`): every packet crosses the device
/// twice and ktctl's translation once, so the cost is per packet, and TCP's segments on
/// `kt0` are then as large as on loopback. Against 9 000 in one `connect` benchmark run:
/// 8 streams straight to the agent 114 → 184 MiB/s.
const MTU: u16 = 65_535;
/// An idle TCP flow keeps its translation this long (as a NAT would; idle database
/// connections must not be cut).
const TCP_IDLE: Duration = Duration::from_secs(2 * 60 * 60);
/// An idle UDP flow ends after this.
const UDP_IDLE: Duration = Duration::from_secs(60);
/// Datagrams that may wait for one UDP flow's channel before more are dropped.
const UDP_QUEUE: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum TunError {
    #[error("failed to create tun device {DEVICE}")]
    Create(#[source] tun::Error),
    #[error("failed to listen on {DEVICE}'s address {address}")]
    Listen {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("all routes failed to setup")]
    NoRoute,
    #[error(transparent)]
    System(#[from] SystemError),
}

/// Whether UDP relays work on this path, and whether that was said already.
#[derive(Default)]
struct UdpSupport {
    refused_said: AtomicBool,
}

/// Creates `kt0`, routes `routes` into it (unless empty: `--disableTunRoute`), and carries
/// what arrives until `stop`.
pub(super) async fn start(
    pool: Arc<SshPool>,
    routes: &[Cidr],
    tasks: &TaskTracker,
    stop: CancellationToken,
) -> Result<(), TunError> {
    let mut config = tun::Configuration::default();
    config
        .tun_name(DEVICE)
        .address(DEVICE_ADDRESS)
        // Room for the made-up peer (nat::PEER) the translated flows come from.
        .netmask(Ipv4Addr::new(255, 255, 255, 252))
        .mtu(MTU)
        .up();
    let device = tun::create_as_async(&config).map_err(TunError::Create)?;
    let listen = |port| SocketAddr::V4(SocketAddrV4::new(DEVICE_ADDRESS, port));
    let tcp = TcpListener::bind(listen(0))
        .await
        .map_err(|source| TunError::Listen {
            address: listen(0),
            source,
        })?;
    let udp = UdpSocket::bind(listen(0))
        .await
        .map_err(|source| TunError::Listen {
            address: listen(0),
            source,
        })?;
    let port = |address: std::io::Result<SocketAddr>| address.map(|a| a.port()).unwrap_or_default();
    let nat = Arc::new(Mutex::new(Nat::new(
        port(tcp.local_addr()),
        port(udp.local_addr()),
        TCP_IDLE,
        UDP_IDLE,
    )));
    tracing::info!("Tun device {DEVICE} is ready");
    add_routes(routes).await?;
    let span = tracing::info_span!("tun");
    tasks.spawn(translate(device, nat.clone(), stop.clone()).instrument(span.clone()));
    tasks.spawn(
        accept_tcp(tcp, nat.clone(), pool.clone(), tasks.clone(), stop.clone())
            .instrument(span.clone()),
    );
    tasks.spawn(serve_udp(udp, nat, pool, tasks.clone(), stop).instrument(span));
    Ok(())
}

/// Adds a route into `kt0` for each range; fails only when every one failed (v0.3.7).
pub(super) async fn add_routes(routes: &[Cidr]) -> Result<(), TunError> {
    if routes.is_empty() {
        return Ok(());
    }
    let mut added = 0;
    for route in routes {
        if !route.network().is_ipv4() {
            tracing::warn!("Skipping route to {route}: IPv6 is not carried through {DEVICE} yet");
            continue;
        }
        tracing::info!("Adding route to {route}");
        match system::ip(&["-4", "route", "add", &route.to_string(), "dev", DEVICE]).await {
            Ok(()) => added += 1,
            Err(error) => tracing::warn!(
                "Failed to add route to {route}: {}",
                kt_proto::error_chain(&error)
            ),
        }
    }
    if added == 0 {
        return Err(TunError::NoRoute);
    }
    tracing::info!("Route to tun device completed");
    Ok(())
}

/// Reads packets from `kt0`, translates them, and writes them back (one task: the table
/// is the only state, and a packet's work is a few header writes).
async fn translate(device: tun::AsyncDevice, nat: Arc<Mutex<Nat>>, stop: CancellationToken) {
    let mut packet = vec![0u8; 65_536];
    loop {
        let read = tokio::select! {
            () = stop.cancelled() => return,
            read = device.recv(&mut packet) => read,
        };
        let len = match read {
            Ok(len) => len,
            Err(error) => {
                tracing::warn!(%error, "the tun device stopped");
                return;
            }
        };
        let forward = nat
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .translate(&mut packet[..len], Instant::now());
        if forward && let Err(error) = device.send(&packet[..len]).await {
            // As a full queue drops it: TCP retransmits, UDP is UDP.
            tracing::debug!(%error, "packet not written back to {DEVICE}");
        }
    }
}

/// Accepts the translated TCP connections and carries each over SSH.
async fn accept_tcp(
    listener: TcpListener,
    nat: Arc<Mutex<Nat>>,
    pool: Arc<SshPool>,
    tasks: TaskTracker,
    stop: CancellationToken,
) {
    loop {
        let (stream, peer) = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::debug!(%error, "accept failed");
                    continue;
                }
            },
        };
        let flow = nat
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .flow(Protocol::Tcp, peer);
        if let Some(flow) = flow {
            tasks.spawn(carry_tcp(
                pool.clone(),
                stream,
                flow.destination,
                stop.clone(),
            ));
        }
    }
}

async fn carry_tcp(
    pool: Arc<SshPool>,
    tcp: TcpStream,
    destination: SocketAddrV4,
    stop: CancellationToken,
) {
    let _ = tcp.set_nodelay(true);
    let channel = match pool
        .open(&destination.ip().to_string(), destination.port())
        .await
    {
        Ok(channel) => channel,
        Err(error) => {
            tracing::debug!(%destination, error = %kt_proto::error_chain(&error), "connection not carried");
            // A reset, as the program would see from a closed port.
            let _ = tcp.set_zero_linger();
            return;
        }
    };
    tokio::select! {
        () = stop.cancelled() => {}
        result = kt_tunnel::bridge(channel, tcp) => {
            if let Err(error) = result {
                tracing::debug!(%destination, %error, "connection ended with an error");
            }
        }
    }
}

/// The open UDP flows, by their port on `nat::PEER`.
type UdpFlows = Arc<Mutex<HashMap<u16, mpsc::Sender<Vec<u8>>>>>;

/// Receives the translated UDP datagrams and hands each to its flow's channel (opened on
/// the flow's first datagram).
async fn serve_udp(
    socket: UdpSocket,
    nat: Arc<Mutex<Nat>>,
    pool: Arc<SshPool>,
    tasks: TaskTracker,
    stop: CancellationToken,
) {
    let socket = Arc::new(socket);
    let support = Arc::new(UdpSupport::default());
    let flows: UdpFlows = Arc::default();
    let mut datagram = vec![0u8; 65_536];
    loop {
        let (len, peer) = tokio::select! {
            () = stop.cancelled() => return,
            received = socket.recv_from(&mut datagram) => match received {
                Ok(received) => received,
                Err(error) => {
                    tracing::debug!(%error, "UDP receive failed");
                    continue;
                }
            },
        };
        let payload = datagram[..len].to_vec();
        let queued = flows
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&peer.port())
            .map(|flow| flow.try_send(payload));
        // A flow whose channel has closed gives the datagram back for a new flow.
        let payload = match queued {
            Some(Ok(()) | Err(mpsc::error::TrySendError::Full(_))) => continue,
            Some(Err(mpsc::error::TrySendError::Closed(payload))) => payload,
            None => datagram[..len].to_vec(),
        };
        let Some(flow) = nat
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .flow(Protocol::Udp, peer)
        else {
            continue;
        };
        let (sender, receiver) = mpsc::channel(UDP_QUEUE);
        let _ = sender.try_send(payload);
        flows
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(peer.port(), sender);
        let datagrams = FlowDatagrams {
            received: receiver,
            socket: socket.clone(),
            peer,
            idle: Box::pin(tokio::time::sleep(UDP_IDLE)),
        };
        let (pool, support, stop, flows) =
            (pool.clone(), support.clone(), stop.clone(), flows.clone());
        tasks.spawn(async move {
            carry_udp(pool, datagrams, flow.destination, support, stop).await;
            flows
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&peer.port());
        });
    }
}

/// One UDP flow as a datagram stream for [`kt_tunnel::datagram::relay`]: reads are the
/// program's datagrams (end of stream after [`UDP_IDLE`] without one), writes answer it.
struct FlowDatagrams {
    received: mpsc::Receiver<Vec<u8>>,
    socket: Arc<UdpSocket>,
    peer: SocketAddr,
    idle: Pin<Box<tokio::time::Sleep>>,
}

impl AsyncRead for FlowDatagrams {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.received.poll_recv(cx) {
            Poll::Ready(Some(datagram)) => {
                let deadline = tokio::time::Instant::now() + UDP_IDLE;
                self.idle.as_mut().reset(deadline);
                let len = datagram.len().min(buf.remaining());
                buf.put_slice(&datagram[..len]);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(None) => Poll::Ready(Ok(())),
            Poll::Pending => match self.idle.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Ok(())),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for FlowDatagrams {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.socket.poll_send_to(cx, buf, self.peer)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

async fn carry_udp(
    pool: Arc<SshPool>,
    flow: FlowDatagrams,
    destination: SocketAddrV4,
    support: Arc<UdpSupport>,
    stop: CancellationToken,
) {
    let destination = SocketAddr::V4(destination);
    let channel = match pool.open_udp(destination).await {
        Ok(channel) => channel,
        // OpenSSH knows no UDP relay: it tries a Unix socket of that name and fails to
        // connect. kt's servers refuse a destination as administratively prohibited.
        Err(error)
            if matches!(
                error.open_failure(),
                Some(russh::ChannelOpenFailure::ConnectFailed)
            ) =>
        {
            if !support.refused_said.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "UDP to the cluster is not available through {} (its SSH server relays TCP only); UDP datagrams are dropped",
                    pool.target()
                );
            }
            return;
        }
        Err(error) => {
            tracing::debug!(%destination, error = %kt_proto::error_chain(&error), "UDP flow not carried");
            return;
        }
    };
    tokio::select! {
        () = stop.cancelled() => {}
        result = kt_tunnel::datagram::relay(channel, flow) => {
            if let Err(error) = result {
                tracing::debug!(%destination, %error, "UDP flow ended");
            }
        }
    }
}
