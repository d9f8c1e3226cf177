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

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddrV4},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::net::{TcpListener, TcpStream};

use crate::agent::listening;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument as _;

/// How long a relayed connection waits for the holder to accept.
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);

/// The relays of one node, one per remote holder listener.
pub struct Relays {
    node_ip: IpAddr,
    listeners: Mutex<BTreeMap<SocketAddrV4, Listening>>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

struct Listening {
    address: SocketAddrV4,
    stop: CancellationToken,
}

impl Relays {
    /// No relays yet; they listen on `node_ip` (the address the node-port table DNATs to;
    /// the table is IPv4, so on a node with an IPv6 address none opens) and everything they
    /// run stops with `shutdown`.
    pub fn new(node_ip: IpAddr, shutdown: CancellationToken) -> Arc<Self> {
        Arc::new(Self {
            node_ip,
            listeners: Mutex::default(),
            tasks: TaskTracker::new(),
            shutdown,
        })
    }

    /// Makes `holders` (remote holders' listeners) the relayed ones: a listener on a port of
    /// the node chosen by the kernel for each new one, closed listeners (after
    /// [`listening::CLOSE_GRACE`]; open connections go on) for those no longer wanted. Returns each
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
                // It keeps accepting a little longer: the node-port table that sends
                // connections here changes after this pass, and a closed port would reset
                // the ones that arrive meanwhile.
                listening::stop_after_grace(
                    &self.tasks,
                    listening.stop.clone(),
                    self.shutdown.clone(),
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
        let std::net::SocketAddr::V4(address) = listener.local_addr()? else {
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
            let shutdown = self.shutdown.clone();
            self.tasks.spawn(
                async move {
                    tokio::select! {
                        () = shutdown.cancelled() => {}
                        () = relay(inbound, holder) => {}
                    }
                }
                .instrument(tracing::debug_span!("connection", %peer)),
            );
        }
    }
}

/// Copies `inbound` to and from a new connection to `holder` until both ends are done; a
/// holder that cannot be reached closes `inbound` (the client sees the connection end).
async fn relay(mut inbound: TcpStream, holder: SocketAddrV4) {
    let _ = inbound.set_nodelay(true);
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
    let _ = outbound.set_nodelay(true);
    match tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await {
        Ok((to_holder, from_holder)) => {
            tracing::debug!(to_holder, from_holder, "relayed connection ended");
        }
        Err(error) => tracing::debug!(%error, "relayed connection ended with an error"),
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn echo_server() -> SocketAddrV4 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let std::net::SocketAddr::V4(address) = listener.local_addr().unwrap() else {
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

    /// A wanted holder gets a relay that carries bytes both ways; the same holder keeps its
    /// relay; a holder no longer wanted loses it after the grace, and a new holder gets one.
    #[tokio::test]
    async fn relays_follow_the_wanted_holders() {
        let (first, second) = (echo_server().await, echo_server().await);
        let shutdown = CancellationToken::new();
        let relays = Relays::new(IpAddr::V4(Ipv4Addr::LOCALHOST), shutdown.clone());

        let opened = relays.update(&BTreeSet::from([first]));
        let relay = opened[&first];
        assert_eq!(relay.ip(), &Ipv4Addr::LOCALHOST);
        assert_ne!(relay.port(), first.port());
        assert!(echoes(relay).await, "the relay reaches the holder");
        assert_eq!(relays.update(&BTreeSet::from([first])), opened, "kept");

        let moved = relays.update(&BTreeSet::from([second]));
        assert_eq!(moved.keys().copied().collect::<Vec<_>>(), vec![second]);
        assert!(
            echoes(moved[&second]).await,
            "the new relay reaches its holder"
        );
        assert!(
            echoes(relay).await,
            "the old relay still accepts within the grace"
        );
        tokio::time::sleep(listening::CLOSE_GRACE + Duration::from_millis(500)).await;
        assert!(
            !echoes(relay).await,
            "the old relay is closed after the grace"
        );

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), relays.closed())
            .await
            .expect("everything stops with shutdown");
    }

    /// A holder that refuses: the client's connection is closed, not left hanging.
    #[tokio::test]
    async fn an_unreachable_holder_closes_the_client() {
        let refused = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let std::net::SocketAddr::V4(address) = listener.local_addr().unwrap() else {
                unreachable!()
            };
            address
        };
        let relays = Relays::new(IpAddr::V4(Ipv4Addr::LOCALHOST), CancellationToken::new());
        let relay = relays.update(&BTreeSet::from([refused]))[&refused];
        let mut stream = TcpStream::connect(relay).await.unwrap();
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("closed, not hanging");
        assert!(matches!(read, Ok(0) | Err(_)));
    }
}
