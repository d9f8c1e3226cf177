//! The SSH server loop both roles run (the shadow for one session, the agent for the
//! sessions it holds): kt's russh settings, the transport read ahead of the session loop,
//! every connection and forwarded stream a tracked task; and the remote-forward plumbing
//! they share (a listener whose connections go back to the client as `forwarded-tcpip`).

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use russh::{
    Channel,
    keys::{PrivateKey, ssh_key::private::Ed25519Keypair},
    server::{Handle, Handler, Msg},
};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// Serves SSH on `listener` until `shutdown`, with a handler from `connection(peer, tasks,
/// cancel)` per client; `cancel` is cancelled when that client's connection ends, which ends
/// its listeners and channels.
pub(crate) async fn serve<H>(
    listener: TcpListener,
    shutdown: CancellationToken,
    mut connection: impl FnMut(SocketAddr, TaskTracker, CancellationToken) -> H,
) where
    H: Handler + Send + 'static,
    H::Error: std::fmt::Display,
{
    let ssh = kt_tunnel::config::server(host_key());
    let tasks = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let cancel = shutdown.child_token();
        let handler = connection(peer, tasks.clone(), cancel.clone());
        let ssh = ssh.clone();
        let (stream, reader) = kt_tunnel::transport::read_ahead(stream);
        let reader_stop = cancel.clone();
        tasks.spawn(async move {
            tokio::select! {
                () = reader => {}
                () = reader_stop.cancelled() => {}
            }
        });
        tasks.spawn(async move {
            match russh::server::run_stream(ssh, stream, handler).await {
                Ok(session) => {
                    tokio::select! {
                        result = session => if let Err(error) = result {
                            tracing::debug!(%peer, %error, "SSH session ended with an error");
                        },
                        () = cancel.cancelled() => {}
                    }
                }
                Err(error) => tracing::debug!(%peer, %error, "SSH handshake failed"),
            }
            // However the connection ended: its listeners, channels and renewals end too.
            cancel.cancel();
        });
    }
    tasks.close();
    tasks.wait().await;
}

/// A fresh host key per start. ktctl learns it over the API server's port-forward (an
/// authenticated path) before it trusts a direct connection; v0.3.7 checks none.
fn host_key() -> PrivateKey {
    let seed: [u8; 32] = rand::random();
    PrivateKey::from(Ed25519Keypair::from_seed(&seed))
}

/// Bytes carried by tunnelled connections, counted as each one ends.
#[derive(Debug, Default)]
pub struct TunnelBytes {
    /// From cluster clients to the workstation.
    pub to_workstation: AtomicU64,
    /// From the workstation back to cluster clients.
    pub from_workstation: AtomicU64,
}

/// Accepts on a remote-forward listener and hands each connection to the client as
/// `forwarded-tcpip` for (`address`, `port`); adds what they carried to `bytes`.
pub(crate) async fn forward_back(
    listener: TcpListener,
    handle: Handle,
    (address, port): (String, u32),
    stop: CancellationToken,
    tasks: TaskTracker,
    bytes: Option<Arc<TunnelBytes>>,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(_) => continue,
            },
        };
        let _ = tcp.set_nodelay(true);
        let (handle, address, stop, bytes) =
            (handle.clone(), address.clone(), stop.clone(), bytes.clone());
        tasks.spawn(async move {
            let opened = handle
                .channel_open_forwarded_tcpip(
                    address,
                    port,
                    peer.ip().to_string(),
                    u32::from(peer.port()),
                )
                .await;
            match opened {
                Ok(channel) => {
                    let moved = pump(channel, tcp, stop).await;
                    if let (Some(bytes), Some(moved)) = (bytes, moved) {
                        // Into the channel is towards the SSH client, the workstation.
                        bytes
                            .to_workstation
                            .fetch_add(moved.to_channel, Ordering::Relaxed);
                        bytes
                            .from_workstation
                            .fetch_add(moved.to_socket, Ordering::Relaxed);
                    }
                }
                Err(error) => tracing::debug!(%error, "client refused forwarded-tcpip"),
            }
        });
    }
}

/// Copies both ways until both sides are done or `cancel`; what moved, when it finished.
pub(crate) async fn pump(
    channel: Channel<Msg>,
    tcp: TcpStream,
    cancel: CancellationToken,
) -> Option<kt_tunnel::bridge::Transferred> {
    tokio::select! {
        result = kt_tunnel::bridge(channel, tcp) => match result {
            Ok(moved) => {
                tracing::trace!(?moved, "tunnelled connection done");
                Some(moved)
            }
            Err(error) => {
                tracing::debug!(%error, "tunnelled connection ended with an error");
                None
            }
        },
        () = cancel.cancelled() => None,
    }
}
