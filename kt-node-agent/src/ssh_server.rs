//! The SSH server loop both roles run (the shadow for one session, the agent for the
//! sessions it holds): kt's russh settings, the transport read ahead of the session loop,
//! every connection and forwarded stream a tracked task; and the remote-forward plumbing
//! they share (a listener whose connections go back to the client as `forwarded-tcpip`).

use std::{io, net::SocketAddr, time::Duration};

use kt_tunnel::bridge::Transferred;
use russh::{
    Channel,
    keys::{PrivateKey, ssh_key::private::Ed25519Keypair},
    server::{Handle, Handler, Msg},
};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument as _;

use crate::admission::{Gate, Limits, Permit};

/// A listening socket that stopped working: the server cannot go on.
#[derive(Debug, thiserror::Error)]
#[error("accepting connections on {addr} failed")]
pub struct AcceptError {
    pub addr: String,
    #[source]
    pub source: io::Error,
}

/// How long to wait before accepting again when the process is out of file descriptors or
/// memory: a loop without a pause would spin on the error.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// Accepts the next connection on `listener`. Errors that concern one connection (it was
/// aborted) or pass (no file descriptors or memory for now) are retried, the latter after a
/// pause; any other error means the listening socket itself is gone and is returned.
pub(crate) async fn accept(listener: &TcpListener) -> Result<(TcpStream, SocketAddr), AcceptError> {
    loop {
        match listener.accept().await {
            Ok(accepted) => return Ok(accepted),
            Err(error) => match error.raw_os_error() {
                Some(libc::ECONNABORTED | libc::EINTR | libc::EPROTO | libc::EPERM) => {}
                Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
                    tracing::warn!(%error, "accept failed, pausing");
                    tokio::time::sleep(ACCEPT_PAUSE).await;
                }
                _ => {
                    return Err(AcceptError {
                        addr: listener
                            .local_addr()
                            .map_or_else(|_| "?".into(), |a| a.to_string()),
                        source: error,
                    });
                }
            },
        }
    }
}

/// How long a client has from its TCP connection to a successful login before it is
/// disconnected. OpenSSH's `LoginGraceTime` is 120 s, sized for a person typing a password;
/// kt's clients are programs logging in with a key in a few round trips (ktctl over the API
/// server's port-forward: well under a second on the testbed), so 20 s still leaves a slow
/// link ample room while a slowloris or half-open socket holds its slot a sixth as long.
pub(crate) const LOGIN_GRACE: Duration = Duration::from_secs(20);

/// How many connections may wait for their login at once. OpenSSH's `MaxStartups 10:30:100`
/// starts refusing unauthenticated connections at random at 10 and refuses them all at
/// 100; its `PerSourceMaxStartups` (unset by default) caps them per address. kt refuses
/// deterministically past 32 from one source — ten developers starting at once behind one
/// NAT address, with two connections each, or the API server's address carrying every
/// port-forwarded login, stay below it — and past 256 in all, so that a flood from one
/// address (10 000 half-open sockets) takes 32 slots and leaves the rest to everyone else.
/// A logged-in connection no longer counts.
pub(crate) const STARTUPS: Limits = Limits {
    per_source: 32,
    total: 256,
};

/// Told by a connection's handler when its client has logged in (from russh's
/// `Handler::auth_succeeded`): the connection then leaves the [`STARTUPS`] count and
/// [`LOGIN_GRACE`] no longer applies.
#[derive(Clone, Default)]
pub(crate) struct LoggedIn(CancellationToken);

impl LoggedIn {
    pub(crate) fn done(&self) {
        self.0.cancel();
    }
}

/// Holds an unauthenticated connection's `permit` until it logs in (then frees it and waits
/// forever) or [`LOGIN_GRACE`] runs out (then returns: the connection is dropped).
async fn login_deadline(logged_in: LoggedIn, permit: Permit) {
    tokio::select! {
        () = logged_in.0.cancelled() => {
            drop(permit);
            std::future::pending::<()>().await;
        }
        () = tokio::time::sleep(LOGIN_GRACE) => {
            tracing::debug!(grace = ?LOGIN_GRACE, "no login within the grace time: disconnected");
        }
    }
}

/// Serves SSH on `listener` until `shutdown`, with a handler from `connection(peer, tasks,
/// cancel, logged_in)` per client; `cancel` is cancelled when that client's connection
/// ends, which ends its listeners and channels; the handler calls `logged_in.done()` from
/// `auth_succeeded`. Connections beyond [`STARTUPS`] are closed at once, and one that has
/// not logged in within [`LOGIN_GRACE`] is dropped. Each connection runs in `span(peer)`.
/// Returns an error when the listening socket fails (its connections are ended first).
pub(crate) async fn serve<H>(
    listener: TcpListener,
    shutdown: CancellationToken,
    mut connection: impl FnMut(SocketAddr, TaskTracker, CancellationToken, LoggedIn) -> H,
    span: impl Fn(SocketAddr) -> tracing::Span,
) -> Result<(), AcceptError>
where
    H: Handler + Send + 'static,
    H::Error: std::fmt::Display,
{
    let ssh = kt_tunnel::config::server(host_key());
    let startups = Gate::new(STARTUPS);
    let tasks = TaskTracker::new();
    let stop = shutdown.child_token();
    let result = loop {
        let (stream, peer) = tokio::select! {
            () = stop.cancelled() => break Ok(()),
            accepted = accept(&listener) => match accepted {
                Ok(a) => a,
                Err(error) => break Err(error),
            },
        };
        let permit = match startups.admit(peer.ip()) {
            Ok(permit) => permit,
            Err(refused) => {
                // Dropped unread: the socket closes now. Debug only: a flood would flood
                // the log too.
                tracing::debug!(%peer, %refused, "connection refused before login");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let cancel = stop.child_token();
        let logged_in = LoggedIn::default();
        let handler = connection(peer, tasks.clone(), cancel.clone(), logged_in.clone());
        let ssh = ssh.clone();
        let (stream, reader) = kt_tunnel::transport::read_ahead(stream);
        let reader_stop = cancel.clone();
        tasks.spawn(async move {
            tokio::select! {
                () = reader => {}
                () = reader_stop.cancelled() => {}
            }
        });
        tasks.spawn(
            async move {
                let run = async {
                    // The handshake is raced too: a client that never finishes it must not
                    // hold its socket past the grace time or the connection's end.
                    let started = tokio::select! {
                        started = russh::server::run_stream(ssh, stream, handler) => started,
                        () = cancel.cancelled() => return,
                    };
                    let session = match started {
                        Ok(session) => session,
                        Err(error) => {
                            tracing::debug!(%error, "SSH handshake failed");
                            return;
                        }
                    };
                    let handle = session.handle();
                    tokio::select! {
                        ended = session => if let Err(error) = ended {
                            tracing::debug!(%error, "SSH session ended with an error");
                        },
                        () = cancel.cancelled() => close(&handle).await,
                    }
                };
                // Past the grace time without a login, the connection ends like any other.
                let deadline = async {
                    login_deadline(logged_in, permit).await;
                    cancel.cancel();
                    std::future::pending::<()>().await
                };
                tokio::select! {
                    () = run => {}
                    () = deadline => {}
                }
                tracing::debug!("SSH connection closed");
                // However the connection ended: its listeners, channels and renewals end too.
                cancel.cancel();
            }
            .instrument(span(peer)),
        );
    };
    stop.cancel();
    tasks.close();
    tasks.wait().await;
    result
}

/// How long a connection the agent ends may take to say goodbye.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Ends a running session: russh runs it in a task of its own, which dropping its future
/// does not stop, so it is told to disconnect (and then closes its socket). A session
/// that cannot even queue that within [`CLOSE_TIMEOUT`] is left to TCP.
async fn close(handle: &Handle) {
    let goodbye = handle.disconnect(
        russh::Disconnect::ByApplication,
        "ended by kt's agent".to_owned(),
        String::new(),
    );
    if tokio::time::timeout(CLOSE_TIMEOUT, goodbye).await.is_err() {
        tracing::debug!("the SSH session did not take its disconnect in time");
    }
}

/// A fresh host key per start. ktctl learns it over the API server's port-forward (an
/// authenticated path) before it trusts a direct connection; v0.3.7 checks none.
fn host_key() -> PrivateKey {
    let seed: [u8; 32] = rand::random();
    PrivateKey::from(Ed25519Keypair::from_seed(&seed))
}

/// Accepts on a remote-forward listener and hands each connection to the client as
/// `forwarded-tcpip` for (`address`, `port`); `done` learns what each one carried.
pub(crate) async fn forward_back(
    listener: TcpListener,
    handle: Handle,
    (address, port): (String, u32),
    stop: CancellationToken,
    tasks: TaskTracker,
    done: impl Fn(Transferred) + Clone + Send + 'static,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            () = stop.cancelled() => return,
            accepted = accept(&listener) => match accepted {
                Ok(a) => a,
                Err(error) => {
                    tracing::warn!(error = %kt_proto::error_chain(&error), "tunnel listener failed");
                    return;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let (handle, address, stop, done) =
            (handle.clone(), address.clone(), stop.clone(), done.clone());
        tasks.spawn(
            async move {
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
                        if let Some(moved) = pump(channel, tcp, stop).await {
                            done(moved);
                        }
                    }
                    Err(error) => tracing::debug!(%error, "client refused forwarded-tcpip"),
                }
            }
            .in_current_span(),
        );
    }
}

/// Copies both ways until both sides are done or `cancel`; what moved, when it finished.
/// A `direct-tcpip` channel's connection: dials `target`, then accepts the channel and
/// carries it until either side ends (or `cancel`), or refuses it as `ConnectFailed`.
pub(crate) async fn dial_and_pump(
    channel: Channel<Msg>,
    reply: russh::server::ChannelOpenHandle,
    target: impl tokio::net::ToSocketAddrs + std::fmt::Display,
    cancel: CancellationToken,
) {
    match TcpStream::connect(&target).await {
        Ok(tcp) => {
            let _ = tcp.set_nodelay(true);
            reply.accept().await;
            pump(channel, tcp, cancel).await;
        }
        Err(error) => {
            tracing::debug!(%target, %error, "direct-tcpip target unreachable");
            reply.reject(russh::ChannelOpenFailure::ConnectFailed).await;
        }
    }
}

pub(crate) async fn pump(
    channel: Channel<Msg>,
    tcp: TcpStream,
    cancel: CancellationToken,
) -> Option<Transferred> {
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

/// Runs [`relay_udp`] for an accepted channel as a task of `tasks`, in the current span;
/// its end is logged at debug.
pub(crate) fn spawn_udp_relay(
    tasks: &TaskTracker,
    channel: Channel<Msg>,
    destination: SocketAddr,
    cancel: CancellationToken,
) {
    tasks.spawn(
        async move {
            if let Err(error) = relay_udp(channel, destination, cancel).await {
                tracing::debug!(%destination, %error, "UDP relay ended with an error");
            }
        }
        .in_current_span(),
    );
}

/// Relays UDP between a channel of framed datagrams ([`kt_tunnel::datagram`]) and
/// `destination`, until the channel ends or `cancel`: kt's answer to SSH having no UDP
/// channel, one relay per flow, opened as `direct-streamlocal` with
/// `kt_proto::agent::udp_relay_path`.
async fn relay_udp(
    channel: Channel<Msg>,
    destination: SocketAddr,
    cancel: CancellationToken,
) -> io::Result<()> {
    let local = if destination.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    };
    let socket = tokio::net::UdpSocket::bind(local).await?;
    socket.connect(destination).await?;
    tokio::select! {
        result = kt_tunnel::datagram::relay(channel, kt_tunnel::datagram::ConnectedUdp(socket)) => result,
        () = cancel.cancelled() => Ok(()),
    }
}
