//! Role `navigator`: what runs in the ephemeral container `kt-exchange` that
//! `ktctl exchange --mode ephemeral` adds to each of a Service's pods
//! (`../shared/reference/ktctl-v0.3.7.md` §2.2, §3.3).
//!
//! v0.3.7 meant its navigator image to take the pod's inbound traffic with iptables
//! (`PREROUTING … REDIRECT`, `/setup_iptables.sh`) and to carry it to the workstation over
//! SSH reverse tunnels; its image has no SSH server and its program is empty, and its
//! cleanup deletes the pods. This role does what was meant, and undoes it without touching
//! the pod:
//!
//! - It is an SSH server (the shadow's login: `root` with the session's public key, from
//!   `KT_AUTHORIZED_KEYS` — an ephemeral container cannot mount a new volume) on a port of
//!   the pod ktctl chose, reached through the API server's port-forward or directly.
//! - A `tcpip-forward` for port `P` — an exposed target port, where the pod's own
//!   application already listens — listens on a spare port `Q` and adds
//!   `tcp dport P redirect to :Q` to an nftables table of its own in the pod's network
//!   namespace, hooked at `prerouting`: connections coming into the pod for `P` go back to
//!   ktctl as `forwarded-tcpip` for `P`. Connections made inside the pod (its containers,
//!   `kubectl port-forward`, which dials loopback) still reach the application.
//! - The redirect lives exactly as long as the forward: `cancel-tcpip-forward` removes it
//!   before it is answered (ktctl's Ctrl-C), and so does the end of the SSH connection —
//!   a killed ktctl closes its TCP connection at once; a workstation that vanished is
//!   noticed by the SSH keepalive (15 s × 4, about a minute). A pod is never left
//!   black-holed by a dead workstation.
//! - Ephemeral containers cannot be removed or restarted (Kubernetes "Ephemeral
//!   Containers"): the role ends its process instead. When the last session ends after
//!   cancelling every forward it held (ktctl's goodbye), at once; when it ended otherwise,
//!   after [`NavigatorConfig::reconnect_grace`], during which ktctl may reconnect and ask
//!   again; and when no session ever came, after [`NavigatorConfig::first_session_within`].
//!   Its table is deleted on every way out (SIGTERM included).
//!
//! The ruleset is the pure [`ruleset`]; `nft -f -` loads it in one transaction.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use russh::{
    Channel, ChannelOpenFailure,
    keys::PublicKey,
    server::{Auth, ChannelOpenHandle, Handler, Msg, Session},
};
use tokio::{io::AsyncWriteExt as _, net::TcpListener, sync::watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument as _;

use crate::ssh_server::{dial_and_pump, forward_back};

/// The nftables table the navigator owns in the pod's network namespace.
pub const TABLE: &str = "kt_navigator";

#[derive(Debug, thiserror::Error)]
pub enum NavigatorError {
    #[error("failed to listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("no usable public key in KT_AUTHORIZED_KEYS")]
    NoKey,
    #[error("failed to run nft")]
    Nft(#[source] std::io::Error),
    #[error("nft refused the ruleset: {0}")]
    NftRefused(String),
    #[error(transparent)]
    Accept(#[from] crate::ssh_server::AcceptError),
}

#[derive(Clone, Debug)]
pub struct NavigatorConfig {
    /// The SSH server's address.
    pub listen: SocketAddr,
    /// The session's public keys, OpenSSH lines.
    pub authorized_keys: String,
    /// How long to wait for the first session before ending.
    pub first_session_within: Duration,
    /// How long a session that ended without its goodbye may take to come back.
    pub reconnect_grace: Duration,
}

/// The ruleset that makes the table hold exactly `redirects` (exposed port → local
/// listener port): the table is created (so that deleting it cannot fail), deleted, and
/// made again only when there is something to redirect — one transaction, so a reader never
/// sees it half done.
pub fn ruleset(redirects: &BTreeMap<u16, u16>) -> String {
    let mut script = format!("table ip {TABLE} {{}}\ndelete table ip {TABLE}\n");
    if !redirects.is_empty() {
        script.push_str(&format!(
            "table ip {TABLE} {{\n\tchain prerouting {{\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n"
        ));
        for (port, to) in redirects {
            script.push_str(&format!("\t\ttcp dport {port} redirect to :{to}\n"));
        }
        script.push_str("\t}\n}\n");
    }
    script
}

/// Loads `script` with `nft -f -`.
async fn nft(script: &str) -> Result<(), NavigatorError> {
    let mut child = tokio::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(NavigatorError::Nft)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .await
            .map_err(NavigatorError::Nft)?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(NavigatorError::Nft)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NavigatorError::NftRefused(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ))
    }
}

/// One redirect: which connection holds it and the port it goes to.
#[derive(Clone, Copy, Debug)]
struct Held {
    connection: u64,
    to: u16,
}

/// What every connection shares: the redirects and the sessions.
struct Shared {
    keys: Vec<PublicKey>,
    redirects: Mutex<BTreeMap<u16, Held>>,
    /// Serialises loading the ruleset, so that the last one loaded is the current state.
    apply: tokio::sync::Mutex<()>,
    sessions: watch::Sender<Sessions>,
}

/// The authenticated sessions, for deciding when to end.
#[derive(Clone, Copy, Debug, Default)]
struct Sessions {
    active: usize,
    ever: bool,
    /// The last session to end cancelled every forward it held first.
    goodbye: bool,
}

impl Shared {
    /// Loads the current redirects into the kernel.
    async fn apply(&self) -> Result<(), NavigatorError> {
        let _one = self.apply.lock().await;
        let wanted: BTreeMap<u16, u16> = self
            .redirects
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(port, held)| (*port, held.to))
            .collect();
        nft(&ruleset(&wanted)).await?;
        tracing::info!(redirects = ?wanted, "redirects in place");
        Ok(())
    }

    /// Removes the redirects of `connection` (all of them, or only `port`), then loads the
    /// rest; whether there was anything to remove.
    async fn release(&self, connection: u64, port: Option<u16>) -> bool {
        let removed = {
            let mut redirects = self.redirects.lock().unwrap_or_else(|e| e.into_inner());
            let before = redirects.len();
            redirects.retain(|p, held| {
                held.connection != connection || port.is_some_and(|only| only != *p)
            });
            before != redirects.len()
        };
        if removed && let Err(error) = self.apply().await {
            tracing::error!(error = %kt_proto::error_chain(&error), "failed to remove a redirect");
        }
        removed
    }
}

/// Serves until no session is left (see the module documentation) or `shutdown`; the
/// table is gone when it returns.
pub async fn run(
    config: NavigatorConfig,
    shutdown: CancellationToken,
) -> Result<(), NavigatorError> {
    let keys: Vec<PublicKey> = config
        .authorized_keys
        .lines()
        .filter_map(|line| PublicKey::from_openssh(line.trim()).ok())
        .collect();
    if keys.is_empty() {
        return Err(NavigatorError::NoKey);
    }
    let listener =
        TcpListener::bind(config.listen)
            .await
            .map_err(|source| NavigatorError::Listen {
                addr: config.listen,
                source,
            })?;
    // Whatever an earlier navigator of this pod left (it was killed): start clean.
    nft(&ruleset(&BTreeMap::new())).await?;
    tracing::info!(addr = %config.listen, "navigator SSH server listening");
    let (sessions, mut watch) = watch::channel(Sessions::default());
    let shared = Arc::new(Shared {
        keys,
        redirects: Mutex::default(),
        apply: tokio::sync::Mutex::new(()),
        sessions,
    });
    let stop = shutdown.child_token();
    let next_id = AtomicU64::new(1);
    let server = {
        let (shared, stop) = (shared.clone(), stop.clone());
        crate::ssh_server::serve(
            listener,
            stop,
            move |peer, tasks, cancel, logged_in| Connection {
                id: next_id.fetch_add(1, Ordering::Relaxed),
                peer,
                shared: shared.clone(),
                authenticated: false,
                had_forwards: false,
                goodbye: Arc::default(),
                tasks,
                cancel,
                logged_in,
            },
            |peer| tracing::info_span!("ssh", %peer),
        )
    };
    let mut server = std::pin::pin!(server);
    let result = loop {
        let now = *watch.borrow_and_update();
        let idle = match now {
            Sessions { active: 1.., .. } => None,
            Sessions { ever: false, .. } => Some(config.first_session_within),
            Sessions { goodbye: true, .. } => Some(Duration::ZERO),
            Sessions { .. } => Some(config.reconnect_grace),
        };
        let wait = async {
            match idle {
                Some(after) => tokio::time::sleep(after).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => break Ok(()),
            served = &mut server => break served.map_err(NavigatorError::from),
            _ = watch.changed() => {}
            () = wait => {
                tracing::info!(?now, "no session left, ending");
                break Ok(());
            }
        }
    };
    stop.cancel();
    shared
        .redirects
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clear();
    nft(&ruleset(&BTreeMap::new())).await?;
    tracing::info!("redirects removed");
    result
}

/// One client connection.
struct Connection {
    id: u64,
    peer: SocketAddr,
    shared: Arc<Shared>,
    authenticated: bool,
    had_forwards: bool,
    /// It had forwards and cancelled every one: ktctl's goodbye.
    goodbye: Arc<AtomicBool>,
    tasks: TaskTracker,
    /// Cancelled when the connection ends.
    cancel: CancellationToken,
    /// Told on login (`auth_succeeded`): frees the connection's pre-login slot.
    logged_in: crate::ssh_server::LoggedIn,
}

impl Connection {
    /// Counts the session in, and out again when the connection ends — its redirects
    /// removed first.
    fn session_started(&mut self) {
        self.authenticated = true;
        self.shared.sessions.send_modify(|s| {
            s.active += 1;
            s.ever = true;
        });
        let (shared, cancel, id, goodbye) = (
            self.shared.clone(),
            self.cancel.clone(),
            self.id,
            self.goodbye.clone(),
        );
        self.tasks.spawn(
            async move {
                cancel.cancelled().await;
                let held = shared.release(id, None).await;
                if held {
                    tracing::warn!("session ended while redirecting; redirects removed");
                }
                shared.sessions.send_modify(|s| {
                    s.active -= 1;
                    s.goodbye = !held && goodbye.load(Ordering::Relaxed);
                });
            }
            .in_current_span(),
        );
    }
}

impl Handler for Connection {
    type Error = russh::Error;

    async fn auth_succeeded(&mut self, _: &mut Session) -> Result<(), Self::Error> {
        self.logged_in.done();
        Ok(())
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: russh::server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        let known = self
            .shared
            .keys
            .iter()
            .any(|k| k.key_data() == key.public_key.key_data());
        if user == kt_proto::compat::SSH_USER && known {
            tracing::info!(peer = %self.peer, "client authenticated");
            if !self.authenticated {
                self.session_started();
            }
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
        self.tasks
            .spawn(dial_and_pump(channel, reply, target, self.cancel.clone()).in_current_span());
        Ok(())
    }

    async fn channel_open_direct_streamlocal(
        &mut self,
        _channel: Channel<Msg>,
        _socket_path: &str,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        reply
            .reject(ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        Ok(())
    }

    /// Redirects the pod's inbound `port` to a new listener whose connections go back to
    /// the client for `port`. Refused for port 0, a port already redirected, or when the
    /// redirect cannot be installed.
    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let Ok(exposed) = u16::try_from(*port) else {
            return Ok(false);
        };
        if exposed == 0 {
            tracing::warn!("tcpip-forward for port 0 refused: the navigator redirects named ports");
            return Ok(false);
        }
        let listener = match TcpListener::bind("0.0.0.0:0").await {
            Ok(l) => l,
            Err(error) => {
                tracing::warn!(%error, "no listener for a redirect");
                return Ok(false);
            }
        };
        let to = listener.local_addr().map(|a| a.port()).unwrap_or(0);
        {
            let mut redirects = self
                .shared
                .redirects
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if redirects.contains_key(&exposed) {
                tracing::warn!(
                    port = exposed,
                    "port is already redirected by another session"
                );
                return Ok(false);
            }
            redirects.insert(
                exposed,
                Held {
                    connection: self.id,
                    to,
                },
            );
        }
        if let Err(error) = self.shared.apply().await {
            tracing::error!(error = %kt_proto::error_chain(&error), port = exposed, "redirect refused");
            self.shared.release(self.id, Some(exposed)).await;
            return Ok(false);
        }
        self.had_forwards = true;
        self.goodbye.store(false, Ordering::Relaxed);
        tracing::info!(
            port = exposed,
            to,
            "inbound port redirected to the workstation"
        );
        let stop = self.cancel.child_token();
        let (handle, address, tasks) = (session.handle(), address.to_owned(), self.tasks.clone());
        self.tasks.spawn(
            forward_back(listener, handle, (address, *port), stop, tasks, |_| {}).in_current_span(),
        );
        Ok(true)
    }

    /// Removes the redirect of `port` (and answers only once it is gone from the kernel).
    async fn cancel_tcpip_forward(
        &mut self,
        _address: &str,
        port: u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let Ok(port) = u16::try_from(port) else {
            return Ok(false);
        };
        let removed = self.shared.release(self.id, Some(port)).await;
        if removed {
            tracing::info!(port, "redirect removed: the pod serves the port again");
        }
        let still_held = self
            .shared
            .redirects
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .any(|h| h.connection == self.id);
        self.goodbye
            .store(self.had_forwards && !still_held, Ordering::Relaxed);
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ruleset_holds_exactly_the_redirects() {
        assert_eq!(
            ruleset(&BTreeMap::new()),
            "table ip kt_navigator {}\ndelete table ip kt_navigator\n"
        );
        let script = ruleset(&BTreeMap::from([(80, 40001), (8080, 40002)]));
        assert!(script.starts_with("table ip kt_navigator {}\ndelete table ip kt_navigator\n"));
        assert!(script.contains("type nat hook prerouting priority dstnat; policy accept;"));
        assert!(script.contains("\t\ttcp dport 80 redirect to :40001\n"));
        assert!(script.contains("\t\ttcp dport 8080 redirect to :40002\n"));
    }
}
