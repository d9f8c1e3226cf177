//! The TUN device `kt0` and the userspace TCP/IP stack behind it (ipstack): every TCP
//! connection the kernel routes into `kt0` is terminated here and carried as its own SSH
//! `direct-tcpip` channel to the same address and port, dialled from the cluster side; every
//! UDP flow rides a kt datagram channel ([`kt_tunnel::datagram`]).
//!
//! Why a userspace stack rather than the kernel's TCP behind a NAT: it needs no firewall
//! rules on the workstation and no packet rewriting of ktctl's own, and the benchmark
//! (`tests/benches/connect.rs`) shows the SSH path, not the stack, sets the pace.
//!
//! The device is not persistent: when ktctl ends — even by `kill -9` — the kernel removes it
//! and every route through it.

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use ipstack::{IpStackConfig, IpStackStream, TcpConfig};
use kt_proto::net::Cidr;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument as _;

use super::system::{self, SystemError};
use crate::ssh_client::SshPool;

/// The device's name on Linux (v0.3.7's).
pub(super) const DEVICE: &str = "kt0";
/// The device's own address: from 198.18.0.0/15 (RFC 2544's benchmarking range), which no
/// cluster or LAN uses.
pub(super) const DEVICE_ADDRESS: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// Large packets: fewer of them through the device and the stack per byte carried.
const MTU: u16 = 9000;
/// ipstack's send window; its default (16 KiB) caps a stream well below what SSH carries.
const MAX_UNACKED: u32 = 512 * 1024;
/// An idle TCP connection lives as long as one through a NAT would (ipstack's default is
/// one minute, which would cut idle database connections).
const TCP_IDLE: Duration = Duration::from_secs(2 * 60 * 60);
/// An idle UDP flow ends after this.
const UDP_IDLE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum TunError {
    #[error("failed to create tun device {DEVICE}")]
    Create(#[source] tun::Error),
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
/// what arrives until `stop`. Returns the running data path.
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
        .netmask(Ipv4Addr::new(255, 255, 255, 255))
        .mtu(MTU)
        .up();
    let device = tun::create_as_async(&config).map_err(TunError::Create)?;
    tracing::info!("Tun device {DEVICE} is ready");
    add_routes(routes).await?;
    let mut stack_config = IpStackConfig::default();
    let mut tcp = TcpConfig::default();
    tcp.max_unacked_bytes = MAX_UNACKED;
    tcp.read_buffer_size = 256 * 1024;
    tcp.timeout = TCP_IDLE;
    stack_config
        .mtu(MTU)
        .expect("9000 is a valid MTU")
        .udp_timeout(UDP_IDLE)
        .with_tcp_config(tcp);
    let stack = ipstack::IpStack::new(stack_config, device);
    tasks.spawn(serve(stack, pool, tasks.clone(), stop).instrument(tracing::info_span!("tun")));
    Ok(())
}

/// Adds a route into `kt0` for each range; fails only when every one failed (v0.3.7).
pub(super) async fn add_routes(routes: &[Cidr]) -> Result<(), TunError> {
    if routes.is_empty() {
        return Ok(());
    }
    let mut added = 0;
    for route in routes {
        tracing::info!("Adding route to {route}");
        let family = if route.network().is_ipv4() { "-4" } else { "-6" };
        match system::ip(&[family, "route", "add", &route.to_string(), "dev", DEVICE]).await {
            Ok(()) => added += 1,
            Err(error) => tracing::warn!("Failed to add route to {route}: {}", kt_proto::error_chain(&error)),
        }
    }
    if added == 0 {
        return Err(TunError::NoRoute);
    }
    tracing::info!("Route to tun device completed");
    Ok(())
}

async fn serve(mut stack: ipstack::IpStack, pool: Arc<SshPool>, tasks: TaskTracker, stop: CancellationToken) {
    let udp = Arc::new(UdpSupport::default());
    loop {
        let stream = tokio::select! {
            () = stop.cancelled() => return,
            accepted = stack.accept() => match accepted {
                Ok(stream) => stream,
                Err(error) => {
                    tracing::warn!(%error, "the tun device stopped");
                    return;
                }
            },
        };
        match stream {
            IpStackStream::Tcp(tcp) => {
                let destination = tcp.peer_addr();
                tasks.spawn(carry_tcp(pool.clone(), tcp, destination, stop.clone()));
            }
            IpStackStream::Udp(udp_flow) => {
                let destination = udp_flow.peer_addr();
                tasks.spawn(carry_udp(pool.clone(), udp_flow, destination, udp.clone(), stop.clone()));
            }
            // ICMP and other protocols have no channel to ride: dropped, as a firewall would.
            IpStackStream::UnknownTransport(_) | IpStackStream::UnknownNetwork(_) => {}
        }
    }
}

async fn carry_tcp(pool: Arc<SshPool>, tcp: ipstack::IpStackTcpStream, destination: SocketAddr, stop: CancellationToken) {
    let channel = match pool.open(&destination.ip().to_string(), destination.port()).await {
        Ok(channel) => channel,
        Err(error) => {
            tracing::debug!(%destination, error = %kt_proto::error_chain(&error), "connection not carried");
            return;
        }
    };
    tokio::select! {
        () = stop.cancelled() => {}
        result = kt_tunnel::bridge_io(channel, tcp) => {
            if let Err(error) = result {
                tracing::debug!(%destination, %error, "connection ended with an error");
            }
        }
    }
}

async fn carry_udp(
    pool: Arc<SshPool>,
    flow: ipstack::IpStackUdpStream,
    destination: SocketAddr,
    support: Arc<UdpSupport>,
    stop: CancellationToken,
) {
    let channel = match pool.open_udp(destination).await {
        Ok(channel) => channel,
        // OpenSSH knows no UDP relay: it tries a Unix socket of that name and fails to
        // connect. kt's servers refuse a destination as administratively prohibited.
        Err(error) if matches!(error.open_failure(), Some(russh::ChannelOpenFailure::ConnectFailed)) => {
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
