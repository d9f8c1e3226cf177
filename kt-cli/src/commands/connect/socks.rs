//! `--disableTunDevice`: a SOCKS5 proxy (RFC 1928, no authentication, CONNECT only) on
//! `--proxyAddr:--proxyPort` instead of the TUN device. Names are resolved on the cluster
//! side (`socks5h://`, `curl --socks5-hostname`): a cluster name is looked up in the cluster
//! DNS as the developer means it (a short name in their namespace), any other name is left
//! to the cluster side to resolve.

use std::{net::SocketAddr, sync::Arc};

use fast_socks5::{
    ReplyError, Socks5Command, server::Socks5ServerProtocol, util::target_addr::TargetAddr,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument as _;

use super::dns::Resolver;
use crate::ssh_client::SshPool;

#[derive(Debug, thiserror::Error)]
pub enum SocksError {
    #[error("failed to listen on {addr} for the socks5 proxy")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Listens on `addr` and serves until `stop`.
pub(super) async fn start(
    addr: SocketAddr,
    pool: Arc<SshPool>,
    names: Arc<Resolver>,
    tasks: &TaskTracker,
    stop: CancellationToken,
) -> Result<(), SocksError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| SocksError::Listen { addr, source })?;
    tracing::info!("Socks proxy established");
    let inner = tasks.clone();
    tasks.spawn(
        async move {
            loop {
                let socket = tokio::select! {
                    () = stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((socket, _)) => socket,
                        Err(error) => {
                            tracing::debug!(%error, "socks5 accept failed");
                            continue;
                        }
                    },
                };
                let (pool, names, stop) = (pool.clone(), names.clone(), stop.clone());
                inner.spawn(async move {
                    tokio::select! {
                        () = stop.cancelled() => {}
                        result = serve(socket, pool, &names) => {
                            if let Err(error) = result {
                                tracing::debug!(%error, "socks5 connection ended with an error");
                            }
                        }
                    }
                });
            }
        }
        .instrument(tracing::info_span!("socks5", %addr)),
    );
    Ok(())
}

/// One SOCKS5 client: its CONNECT carried as a `direct-tcpip` channel.
async fn serve(
    socket: TcpStream,
    pool: Arc<SshPool>,
    names: &Resolver,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let _ = socket.set_nodelay(true);
    let (proto, command, target) = Socks5ServerProtocol::accept_no_auth(socket)
        .await?
        .read_command()
        .await?;
    if command != Socks5Command::TCPConnect {
        proto.reply_error(&ReplyError::CommandNotSupported).await?;
        return Ok(());
    }
    let (host, port) = match target {
        TargetAddr::Ip(addr) => (addr.ip().to_string(), addr.port()),
        TargetAddr::Domain(name, port) => match names.cluster_address(&name).await {
            Some(ip) => (ip.to_string(), port),
            None => (name, port),
        },
    };
    let channel = match pool.open(&host, port).await {
        Ok(channel) => channel,
        Err(error) => {
            tracing::debug!(%host, port, error = %kt_proto::error_chain(&error), "socks5 destination not reached");
            proto.reply_error(&ReplyError::HostUnreachable).await?;
            return Ok(());
        }
    };
    let socket = proto
        .reply_success(SocketAddr::from(([0, 0, 0, 0], 0)))
        .await?;
    kt_tunnel::bridge(channel, socket).await?;
    Ok(())
}
