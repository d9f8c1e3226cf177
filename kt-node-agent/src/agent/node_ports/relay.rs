//! Relays for outside connections whose holder is another node's agent.
//!
//! A frontend's connection arriving at this node for a session held on another node could
//! be DNATed straight to the holder's listener, but the packets would then cross this
//! node's `forward` hook, and nodes often drop forwarded traffic there (Docker sets the
//! FORWARD policy to DROP; kube-proxy admits only what it marked itself, and a connection
//! kt's table took first is never marked). An accept in kt's own table cannot overrule a
//! drop in another table's chain. So such a connection is DNATed to a listener of this
//! agent instead (local delivery: `input`, never `forward`), which dials the holder's
//! listener from the node (`output`) and copies bytes both ways. What the holder sees as
//! the client is this node's address, as it was with the masquerade this replaces.
//!
//! A relay accepts the client's connection before it dials the holder, so a holder that
//! refuses is seen by the client as a connection that ends at once (a FIN, or a reset if
//! it had sent data), not as a refused one. A relay is closed once the node-port table the
//! kernel may hold no longer sends to it (not before [`listening::CLOSE_GRACE`], and after
//! [`listening::CLOSE_WAIT_MAX`] at most), and its open connections end with the agent: a restarted
//! agent's relays are new listeners, and the client reconnects through them. Both relayed
//! sockets carry TCP keepalive ([`KEEPALIVE_IDLE`]), so a client or holder gone
//! without a FIN does not hold a relayed connection open for ever, and at most
//! [`MAX_CONNECTIONS`] are relayed at once per agent.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr, SocketAddrV4},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Semaphore, watch},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument as _;

use super::Ruleset;
use crate::agent::listening;

/// How long a relayed connection waits for the holder to accept.
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);

/// Relayed connections open at once, per agent; a connection beyond them is closed as soon
/// as it is accepted (the client sees it end), so a flood of connections to a node port
/// cannot take every file descriptor of the agent. Each takes two descriptors.
pub const MAX_CONNECTIONS: usize = 4096;

/// TCP keepalive on both relayed sockets: the first probe after 30 s of silence, then
/// every 10 s, the connection dropped after 3 unanswered (about a minute in all, as the
/// agent's SSH server notices a silent client).
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_RETRIES: u32 = 3;

/// The relays of one node, one per remote holder listener.
pub struct Relays {
    node_ip: IpAddr,
    listeners: Mutex<BTreeMap<SocketAddrV4, Listening>>,
    /// The node-port table as the kernel holds it ([`super::run`] publishes it).
    applied: watch::Receiver<Ruleset>,
    connections: Arc<Semaphore>,
    connection_limit: usize,
    /// Whether the last connection found the limit reached (said once per episode).
    saturated: AtomicBool,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

struct Listening {
    address: SocketAddrV4,
    stop: CancellationToken,
}

impl Relays {
    /// No relays yet; they listen on `node_ip` (the address the node-port table DNATs to;
    /// the table is IPv4, so on a node with an IPv6 address none opens), a relay no longer
    /// wanted closes once `applied` (the table in force) stops sending to it, and
    /// everything they run stops with `shutdown`.
    pub fn new(
        node_ip: IpAddr,
        applied: watch::Receiver<Ruleset>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Self::with_connection_limit(node_ip, applied, MAX_CONNECTIONS, shutdown)
    }

    fn with_connection_limit(
        node_ip: IpAddr,
        applied: watch::Receiver<Ruleset>,
        limit: usize,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Self {
            node_ip,
            listeners: Mutex::default(),
            applied,
            connections: Arc::new(Semaphore::new(limit)),
            connection_limit: limit,
            saturated: AtomicBool::new(false),
            tasks: TaskTracker::new(),
            shutdown,
        })
    }

    /// Makes `holders` (remote holders' listeners) the relayed ones: a listener on a port of
    /// the node chosen by the kernel for each new one, closed listeners for those no longer
    /// wanted (once the applied table stops sending to them, and not before
    /// [`listening::CLOSE_GRACE`]; open connections go on). Returns each
    /// holder's relay address; a relay that cannot be opened is logged and left out, so its
    /// frontends stay with kube-proxy.
    pub fn update(
        self: &Arc<Self>,
        holders: &BTreeSet<SocketAddrV4>,
    ) -> BTreeMap<SocketAddrV4, SocketAddrV4> {
        let mut listeners = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        listeners.retain(|holder, listening| {
            let keep = holders.contains(holder);
            if !keep {
                tracing::info!(%holder, relay = %listening.address, "node-port relay closing");
                listening::stop_when_unused(
                    &self.tasks,
                    listening.stop.clone(),
                    self.shutdown.clone(),
                    SocketAddr::V4(listening.address),
                    Some(self.applied.clone()),
                );
            }
            keep
        });
        let mut out = BTreeMap::new();
        for holder in holders {
            if let Some(listening) = listeners.get(holder) {
                out.insert(*holder, listening.address);
                continue;
            }
            match self.listen(*holder) {
                Ok(listening) => {
                    tracing::info!(%holder, relay = %listening.address, "node-port relay opened");
                    out.insert(*holder, listening.address);
                    listeners.insert(*holder, listening);
                }
                Err(error) => {
                    tracing::error!(%holder, %error, "cannot open a node-port relay: outside connections for this holder stay with kube-proxy");
                }
            }
        }
        out
    }

    /// Stops accepting and waits for the open connections to end (they end with
    /// `shutdown`).
    pub async fn closed(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }

    fn listen(self: &Arc<Self>, holder: SocketAddrV4) -> std::io::Result<Listening> {
        let IpAddr::V4(node_ip) = self.node_ip else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                format!(
                    "the node's address {} is IPv6; node-port redirects are IPv4",
                    self.node_ip
                ),
            ));
        };
        let socket = std::net::TcpListener::bind(SocketAddrV4::new(node_ip, 0))?;
        socket.set_nonblocking(true)?;
        let listener = TcpListener::from_std(socket)?;
        let SocketAddr::V4(address) = listener.local_addr()? else {
            unreachable!("bound to an IPv4 address");
        };
        let stop = self.shutdown.child_token();
        self.tasks.spawn(
            self.clone()
                .accept(listener, holder, stop.clone())
                .instrument(tracing::info_span!("node_port_relay", %holder)),
        );
        Ok(Listening { address, stop })
    }

    async fn accept(
        self: Arc<Self>,
        listener: TcpListener,
        holder: SocketAddrV4,
        stop: CancellationToken,
    ) {
        while let Some((inbound, peer)) = listening::next_connection(&listener, &stop).await {
            let Ok(permit) = self.connections.clone().try_acquire_owned() else {
                if !self.saturated.swap(true, Ordering::Relaxed) {
                    tracing::warn!(%peer, limit = self.connection_limit, "too many relayed connections: new ones are closed until some end");
                }
                continue;
            };
            self.saturated.store(false, Ordering::Relaxed);
            let shutdown = self.shutdown.clone();
            self.tasks.spawn(
                async move {
                    tokio::select! {
                        () = shutdown.cancelled() => {}
                        () = relay(inbound, holder) => {}
                    }
                    drop(permit);
                }
                .instrument(tracing::debug_span!("connection", %peer)),
            );
        }
    }
}

/// Copies `inbound` to and from a new connection to `holder` until both ends are done; a
/// holder that cannot be reached closes `inbound` (the client sees the connection end).
async fn relay(mut inbound: TcpStream, holder: SocketAddrV4) {
    tune(&inbound);
    let mut outbound = match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(holder)).await {
        Ok(Ok(outbound)) => outbound,
        Ok(Err(error)) => {
            tracing::warn!(%error, "cannot reach the holder's listener");
            return;
        }
        Err(_) => {
            tracing::warn!(timeout = ?DIAL_TIMEOUT, "the holder's listener did not accept in time");
            return;
        }
    };
    tune(&outbound);
    match tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await {
        Ok((to_holder, from_holder)) => {
            tracing::debug!(to_holder, from_holder, "relayed connection ended");
        }
        Err(error) => tracing::debug!(%error, "relayed connection ended with an error"),
    }
}

/// No Nagle delay (the relay only copies) and TCP keepalive ([`KEEPALIVE_IDLE`], then every
/// [`KEEPALIVE_INTERVAL`], [`KEEPALIVE_RETRIES`] probes). Best effort: a socket that
/// refuses an option is relayed without it.
fn tune(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    if let Err(error) = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive) {
        tracing::debug!(%error, "cannot set TCP keepalive on a relayed socket");
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::agent::node_ports::Frontend;

    async fn echo_server() -> SocketAddrV4 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let SocketAddr::V4(address) = listener.local_addr().unwrap() else {
            unreachable!()
        };
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut rx, mut tx) = stream.split();
                    let _ = tokio::io::copy(&mut rx, &mut tx).await;
                });
            }
        });
        address
    }

    async fn echoes(relay: SocketAddrV4) -> bool {
        let Ok(mut stream) = TcpStream::connect(relay).await else {
            return false;
        };
        if stream.write_all(b"ping").await.is_err() {
            return false;
        }
        let mut reply = [0u8; 4];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut reply)).await,
            Ok(Ok(_))
        ) && &reply == b"ping"
    }

    /// Polls `check` every 50 ms until it holds or 5 s pass.
    async fn eventually(mut check: impl AsyncFnMut() -> bool) -> bool {
        for _ in 0..100 {
            if check().await {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// Relays on loopback relaying at most `limit` connections; the sender is the applied
    /// table they follow, the token their shutdown.
    fn loopback_relays(limit: usize) -> (Arc<Relays>, watch::Sender<Ruleset>, CancellationToken) {
        let shutdown = CancellationToken::new();
        let (applied, applied_rx) = watch::channel(Ruleset::default());
        let relays = Relays::with_connection_limit(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            applied_rx,
            limit,
            shutdown.clone(),
        );
        (relays, applied, shutdown)
    }

    fn table_to(relay: SocketAddrV4) -> Ruleset {
        Ruleset {
            redirects: vec![(Frontend::NodePort(30080), relay)],
        }
    }

    /// A wanted holder gets a relay that carries bytes both ways; the same holder keeps its
    /// relay; a holder no longer wanted keeps its relay while the applied table sends to
    /// it, even past the grace, and loses it once the table stops; a new holder gets one.
    #[tokio::test]
    async fn relays_follow_the_wanted_holders_and_the_applied_table() {
        let (first, second) = (echo_server().await, echo_server().await);
        let (relays, applied, shutdown) = loopback_relays(MAX_CONNECTIONS);

        let opened = relays.update(&BTreeSet::from([first]));
        let relay = opened[&first];
        assert_eq!(relay.ip(), &Ipv4Addr::LOCALHOST);
        assert_ne!(relay.port(), first.port());
        assert!(echoes(relay).await, "the relay reaches the holder");
        assert_eq!(relays.update(&BTreeSet::from([first])), opened, "kept");
        applied.send_replace(table_to(relay));

        let moved = relays.update(&BTreeSet::from([second]));
        assert_eq!(moved.keys().copied().collect::<Vec<_>>(), vec![second]);
        assert!(
            echoes(moved[&second]).await,
            "the new relay reaches its holder"
        );
        tokio::time::sleep(listening::CLOSE_GRACE + Duration::from_millis(500)).await;
        assert!(
            echoes(relay).await,
            "past the grace, the old relay still accepts: the applied table sends to it"
        );
        applied.send_replace(table_to(moved[&second]));
        assert!(
            eventually(async || !echoes(relay).await).await,
            "the old relay closes once the applied table no longer sends to it"
        );
        assert!(echoes(moved[&second]).await, "the new relay stays");

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), relays.closed())
            .await
            .expect("everything stops with shutdown");
    }

    /// A relay never in the applied table closes after the grace.
    #[tokio::test]
    async fn a_relay_the_table_never_sent_to_closes_after_the_grace() {
        let holder = echo_server().await;
        let (relays, _applied, _shutdown) = loopback_relays(MAX_CONNECTIONS);
        let relay = relays.update(&BTreeSet::from([holder]))[&holder];
        assert!(relays.update(&BTreeSet::new()).is_empty());
        assert!(echoes(relay).await, "within the grace");
        tokio::time::sleep(listening::CLOSE_GRACE + Duration::from_millis(500)).await;
        assert!(!echoes(relay).await, "closed after the grace");
    }

    /// A holder that refuses: the client's connection is closed, not left hanging.
    #[tokio::test]
    async fn an_unreachable_holder_closes_the_client() {
        // Bound and not listening: the port is this test's, and refuses.
        let reserved = tokio::net::TcpSocket::new_v4().unwrap();
        reserved.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let SocketAddr::V4(refused) = reserved.local_addr().unwrap() else {
            unreachable!()
        };
        let (relays, _applied, shutdown) = loopback_relays(MAX_CONNECTIONS);
        let relay = relays.update(&BTreeSet::from([refused]))[&refused];
        let mut stream = TcpStream::connect(relay).await.unwrap();
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("closed, not hanging");
        assert!(matches!(read, Ok(0) | Err(_)));
        shutdown.cancel();
    }

    /// Beyond the limit a new connection is closed at once; once one ends, a new one is
    /// relayed again.
    #[tokio::test]
    async fn connections_beyond_the_limit_are_closed() {
        let holder = echo_server().await;
        let (relays, _applied, shutdown) = loopback_relays(1);
        let relay = relays.update(&BTreeSet::from([holder]))[&holder];

        let mut held = TcpStream::connect(relay).await.unwrap();
        held.write_all(b"ping").await.unwrap();
        let mut reply = [0u8; 4];
        held.read_exact(&mut reply).await.unwrap();
        assert!(!echoes(relay).await, "the second connection is closed");

        drop(held);
        assert!(
            eventually(async || echoes(relay).await).await,
            "relayed again once the first ended"
        );
        shutdown.cancel();
    }
}
