//! Role `shadow`: the per-session SSH endpoint ktctl talks to when no agent is installed,
//! under the ktctl v0.3.7 shadow contract (`../shared/reference/ktctl-v0.3.7.md` §2–§4):
//! root logs in with a key from the authorized-keys file ktctl mounts from its ConfigMap
//! (`/root/authorized/authorized_keys`); `direct-tcpip` dials the target from the pod (by
//! IP or cluster DNS name); `tcpip-forward` listens on all addresses of the pod, as OpenSSH
//! does with `GatewayPorts yes`, and sends each connection back as `forwarded-tcpip`;
//! `direct-streamlocal` to a `kt-udp:` path relays UDP (kt's extension for `connect`).
//! Plain OpenSSH clients work against it (`ssh -L`, `ssh -R`, `ssh -W`).

use std::{collections::HashMap, net::SocketAddr, path::PathBuf, sync::Arc};

use russh::{
    Channel, ChannelOpenFailure,
    keys::PublicKey,
    server::{Auth, ChannelOpenHandle, Handler, Msg, Session},
};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use tracing::Instrument as _;

use crate::{
    ssh_server::{dial_and_pump, forward_back, spawn_udp_relay},
    tasks::Tasks,
};

/// How long the shadow's tasks get to end after a signal.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum ShadowError {
    #[error("failed to listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("SSH protocol error")]
    Ssh(#[from] russh::Error),
    #[error(transparent)]
    Task(#[from] crate::tasks::TaskFailure),
}

#[derive(Clone, Debug)]
pub struct ShadowConfig {
    pub listen: SocketAddr,
    /// Files of authorized public keys, read at every login attempt (a ConfigMap volume
    /// changes under a running pod).
    pub authorized_keys: Vec<PathBuf>,
    /// The DNS relay, when ktctl asked for one (`KT_DNS_PROTOCOL`).
    pub dns: Option<crate::dns_relay::DnsConfig>,
}

/// Listens on `config.listen` and serves SSH (and the DNS relay, if configured) until
/// `shutdown`; whichever fails first stops the other (ktctl relies on both).
pub async fn run(config: ShadowConfig, shutdown: CancellationToken) -> Result<(), ShadowError> {
    let listener =
        TcpListener::bind(config.listen)
            .await
            .map_err(|source| ShadowError::Listen {
                addr: config.listen,
                source,
            })?;
    tracing::info!(addr = %config.listen, "shadow SSH server listening");
    let tasks = Tasks::new(shutdown);
    tasks.spawn(
        "ssh-server",
        serve(
            listener,
            config.authorized_keys.clone(),
            tasks.shutdown().clone(),
        ),
    );
    if let Some(dns) = config.dns.clone() {
        tasks.spawn(
            "dns-relay",
            crate::dns_relay::run(dns, tasks.shutdown().clone()),
        );
    }
    tasks.run_until_shutdown(SHUTDOWN_GRACE).await?;
    Ok(())
}

/// Serves SSH on `listener` until `shutdown`; every session and forward is a tracked task.
/// Fails when the listening socket does.
pub async fn serve(
    listener: TcpListener,
    authorized_keys: Vec<PathBuf>,
    shutdown: CancellationToken,
) -> Result<(), crate::ssh_server::AcceptError> {
    let authorized = Arc::new(authorized_keys);
    crate::ssh_server::serve(
        listener,
        shutdown,
        |peer, tasks, cancel, logged_in| Connection {
            peer,
            authorized: authorized.clone(),
            forwards: HashMap::new(),
            tasks,
            cancel,
            logged_in,
        },
        |peer| tracing::info_span!("ssh", %peer),
    )
    .await
}

/// One client connection.
struct Connection {
    peer: SocketAddr,
    authorized: Arc<Vec<PathBuf>>,
    /// Active `tcpip-forward`s: (address, port) → their listener's stop switch.
    forwards: HashMap<(String, u32), CancellationToken>,
    tasks: TaskTracker,
    /// Cancelled when the connection ends: stops its listeners and channels.
    cancel: CancellationToken,
    /// Told on login (`auth_succeeded`): frees the connection's pre-login slot.
    logged_in: crate::ssh_server::LoggedIn,
}

impl Connection {
    fn is_authorized(&self, key: &PublicKey) -> bool {
        self.authorized.iter().any(|path| {
            std::fs::read_to_string(path)
                .map(|text| {
                    text.lines()
                        .filter_map(|line| PublicKey::from_openssh(line.trim()).ok())
                        .any(|k| k.key_data() == key.key_data())
                })
                .unwrap_or(false)
        })
    }
}

/// The address `tcpip-forward` binds: OpenSSH with `GatewayPorts yes` binds all addresses
/// for an empty or wildcard address, loopback for `localhost`.
fn bind_address(address: &str, port: u32) -> String {
    match address {
        "" | "*" | "0.0.0.0" => format!("0.0.0.0:{port}"),
        "localhost" => format!("127.0.0.1:{port}"),
        other if other.contains(':') => format!("[{other}]:{port}"),
        other => format!("{other}:{port}"),
    }
}

impl Handler for Connection {
    type Error = ShadowError;

    async fn auth_succeeded(&mut self, _: &mut Session) -> Result<(), Self::Error> {
        self.logged_in.done();
        Ok(())
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: russh::server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        if user == "root" && self.is_authorized(key.public_key) {
            tracing::info!(peer = %self.peer, "client authenticated");
            Ok(Auth::Accept)
        } else {
            tracing::warn!(peer = %self.peer, user, "public key refused");
            Ok(Auth::reject())
        }
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let target = format!("{host_to_connect}:{port_to_connect}");
        let cancel = self.cancel.clone();
        self.tasks
            .spawn(dial_and_pump(channel, reply, target, cancel).in_current_span());
        Ok(())
    }

    /// UDP for `ktctl connect` (kt's own extension; v0.3.7's OpenSSH shadow refuses it, and
    /// ktctl says so): datagrams framed on the channel, relayed to the path's destination.
    async fn channel_open_direct_streamlocal(
        &mut self,
        channel: Channel<Msg>,
        socket_path: &str,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(destination) = kt_proto::agent::udp_relay_destination(socket_path) else {
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
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
        let bind = bind_address(address, *port);
        let listener = match TcpListener::bind(&bind).await {
            Ok(l) => l,
            Err(error) => {
                tracing::warn!(%bind, %error, "tcpip-forward refused");
                return Ok(false);
            }
        };
        if *port == 0 {
            *port = listener
                .local_addr()
                .map(|a| u32::from(a.port()))
                .unwrap_or(0);
        }
        let stop = self.cancel.child_token();
        self.forwards
            .insert((address.to_owned(), *port), stop.clone());
        tracing::info!(%bind, port = *port, "remote forward listening");
        let (handle, address, port, tasks) = (
            session.handle(),
            address.to_owned(),
            *port,
            self.tasks.clone(),
        );
        self.tasks.spawn(
            forward_back(listener, handle, (address, port), stop, tasks, |_| {}).in_current_span(),
        );
        Ok(true)
    }

    async fn cancel_tcpip_forward(
        &mut self,
        address: &str,
        port: u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        match self.forwards.remove(&(address.to_owned(), port)) {
            Some(stop) => {
                stop.cancel();
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::bind_address;

    #[test]
    fn gateway_ports_bind_addresses() {
        assert_eq!(bind_address("", 80), "0.0.0.0:80");
        assert_eq!(bind_address("*", 80), "0.0.0.0:80");
        assert_eq!(bind_address("localhost", 80), "127.0.0.1:80");
        assert_eq!(bind_address("10.0.0.1", 80), "10.0.0.1:80");
        assert_eq!(bind_address("::1", 80), "[::1]:80");
    }
}
