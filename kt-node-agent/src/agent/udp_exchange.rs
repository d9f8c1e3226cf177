//! UDP exchange: the holding agent's listener for one exchanged UDP Service port.
//!
//! Every agent's eBPF programs send the pods' datagrams to the Service (its ClusterIP and its
//! endpoints, `spec.udpPorts`) to this listener, bound to the node's address (not the
//! wildcard: a reply must leave from the address the pod's socket sent to, or a connected
//! socket drops it and recvmsg cannot show it as the Service's). A flow is one pod address
//! and port; each gets its own `forwarded-streamlocal@openssh.com` channel to ktctl
//! ([`kt_proto::agent::udp_forward_path`]), carrying framed datagrams
//! ([`kt_tunnel::datagram`]), so ktctl gives each flow its own local socket and the local
//! program's replies find their flow without a second table. Replies leave from the
//! listener's own socket, so the pod sees them come from the address it sent to.
//!
//! Bounded: a flow ends after an idle time without a datagram either way
//! ([`crate::agent::AgentConfig::udp_flow_idle`]); at most [`MAX_FLOWS`] flows per listener
//! (the least recently active one makes way); at most [`QUEUE`] datagrams wait per flow and
//! [`MAX_QUEUED_BYTES`] in all the listener's queues (more are dropped, as a full socket
//! buffer drops them); a flow whose channel ktctl does not open within [`OPEN_TIMEOUT`]
//! ends. Every datagram dropped is counted, by why.

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use russh::server::Handle;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::UdpSocket,
    sync::mpsc,
    time::Instant,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument as _;

use super::metrics::UdpExchange;

/// The most flows one listener carries at once (a pod flood cannot grow the agent without
/// bound; issue 16 item 2).
pub(crate) const MAX_FLOWS: usize = 4096;
/// The most datagrams that wait for one flow's channel (its opening, or a slow workstation).
const QUEUE: usize = 64;
/// The most bytes of datagrams waiting in one listener's queues: without it, full-sized
/// datagrams in every queue of every flow would be gigabytes.
const MAX_QUEUED_BYTES: usize = 8 << 20;
/// The largest datagram (the 16-bit length of the framing).
const MAX_DATAGRAM: usize = 65_535;
/// How long ktctl may take to open a flow's channel.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the datagrams a flow still had queued when it ended were dropped (the `reason` of
/// `kt_agent_udp_dropped_total`): set by whoever ends it.
#[derive(Clone)]
struct EndReason(Arc<Mutex<&'static str>>);

impl EndReason {
    fn new() -> Self {
        Self(Arc::new(Mutex::new("flow_closed")))
    }

    fn set(&self, reason: &'static str) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = reason;
    }

    fn get(&self) -> &'static str {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Serves one UDP listener until `stop`: its datagrams go to ktctl over `handle`, one
/// channel with `path` per flow.
pub(crate) async fn serve(
    socket: UdpSocket,
    handle: Handle,
    path: String,
    idle: Duration,
    metrics: UdpExchange,
    stop: CancellationToken,
    tasks: TaskTracker,
) {
    let socket = Arc::new(socket);
    let mut flows: HashMap<SocketAddr, Flow> = HashMap::new();
    // Flows tell the listener they ended (their id: a newer flow may have the peer since).
    let (ended_tx, mut ended) = mpsc::unbounded_channel::<(SocketAddr, u64)>();
    let mut next_id: u64 = 0;
    let queued = Arc::new(AtomicUsize::new(0));
    let mut buffer = vec![0u8; MAX_DATAGRAM];
    loop {
        let (len, peer) = tokio::select! {
            () = stop.cancelled() => break,
            Some((peer, id)) = ended.recv() => {
                if flows.get(&peer).is_some_and(|f| f.id == id) {
                    flows.remove(&peer);
                }
                continue;
            }
            received = socket.recv_from(&mut buffer) => match received {
                Ok(received) => received,
                // An ICMP error for an earlier reply (the pod's socket is gone): not this
                // listener's failure.
                Err(error) if is_transient(&error) => continue,
                Err(error) => {
                    tracing::warn!(%error, "UDP tunnel listener failed");
                    break;
                }
            },
        };
        let datagram = buffer[..len].to_vec();
        let now = Instant::now();
        // A flow that ended (idle, refused) but whose end the listener has not read yet
        // makes way for a new one.
        if flows.get(&peer).is_some_and(|f| f.to_flow.is_closed()) {
            flows.remove(&peer);
        }
        if !flows.contains_key(&peer) {
            if flows.len() >= MAX_FLOWS {
                evict_least_recent(&mut flows);
            }
            next_id += 1;
            let (to_flow, from_pod) = mpsc::channel(QUEUE);
            let (activity, reason, flow_stop) =
                (Activity::new(now), EndReason::new(), stop.child_token());
            let flow = FlowTask {
                handle: handle.clone(),
                path: path.clone(),
                side: FlowSide {
                    from_pod,
                    socket: socket.clone(),
                    pod: peer,
                    activity: activity.clone(),
                    metrics: metrics.clone(),
                    queued: queued.clone(),
                    reason: reason.clone(),
                },
                idle,
                stop: flow_stop.clone(),
            };
            let (ended_tx, id) = (ended_tx.clone(), next_id);
            tasks.spawn(
                async move {
                    flow.run().await;
                    let _ = ended_tx.send((peer, id));
                }
                .instrument(tracing::debug_span!("udp_flow", pod = %peer)),
            );
            flows.insert(
                peer,
                Flow {
                    id,
                    to_flow,
                    activity,
                    reason,
                    stop: flow_stop,
                },
            );
        }
        let Some(flow) = flows.get(&peer) else {
            continue;
        };
        flow.activity.touch(now);
        if queued.load(Ordering::Relaxed) + len > MAX_QUEUED_BYTES {
            metrics.dropped("queue_full");
            continue;
        }
        // Counted before it is queued: the flow subtracts it when it takes it.
        queued.fetch_add(len, Ordering::Relaxed);
        match flow.to_flow.try_send(datagram) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                queued.fetch_sub(len, Ordering::Relaxed);
                metrics.dropped("queue_full");
            }
            // The flow ended just now.
            Err(mpsc::error::TrySendError::Closed(_)) => {
                queued.fetch_sub(len, Ordering::Relaxed);
                metrics.dropped("flow_closed");
                flows.remove(&peer);
            }
        }
    }
}

/// Whether a receive error is about one earlier datagram, not the socket.
fn is_transient(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset
    ) || error.raw_os_error() == Some(libc::EHOSTUNREACH)
        || error.raw_os_error() == Some(libc::ENETUNREACH)
}

/// Ends the flow that was active least recently (O(flows), only when the table is full);
/// what it still had queued is dropped as `flow_limit`.
fn evict_least_recent(flows: &mut HashMap<SocketAddr, Flow>) {
    let oldest = flows
        .iter()
        .min_by_key(|(_, f)| f.activity.last())
        .map(|(peer, _)| *peer);
    if let Some(flow) = oldest.and_then(|peer| flows.remove(&peer)) {
        flow.reason.set("flow_limit");
        flow.stop.cancel();
        tracing::debug!(pod = ?oldest, "UDP flow evicted: the listener carries {MAX_FLOWS} flows");
    }
}

/// A flow as the listener keeps it.
struct Flow {
    id: u64,
    to_flow: mpsc::Sender<Vec<u8>>,
    activity: Activity,
    reason: EndReason,
    /// Ends the flow's task (eviction).
    stop: CancellationToken,
}

/// When a flow last carried a datagram either way.
#[derive(Clone)]
struct Activity(Arc<Mutex<Instant>>);

impl Activity {
    fn new(now: Instant) -> Self {
        Self(Arc::new(Mutex::new(now)))
    }

    fn touch(&self, now: Instant) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = now;
    }

    fn last(&self) -> Instant {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Returns once nothing moved for `idle`.
    async fn idled_out(&self, idle: Duration) {
        loop {
            let deadline = self.last() + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// One flow's task: its channel to ktctl and its side of the relay.
struct FlowTask {
    handle: Handle,
    path: String,
    side: FlowSide,
    idle: Duration,
    stop: CancellationToken,
}

impl FlowTask {
    async fn run(self) {
        let Self {
            handle,
            path,
            side,
            idle,
            stop,
        } = self;
        let (metrics, activity, reason) = (
            side.metrics.clone(),
            side.activity.clone(),
            side.reason.clone(),
        );
        let opened = tokio::select! {
            () = stop.cancelled() => return,
            opened = tokio::time::timeout(OPEN_TIMEOUT, handle.channel_open_forwarded_streamlocal(path)) => opened,
        };
        let channel = match opened {
            Ok(Ok(channel)) => channel,
            Ok(Err(error)) => {
                reason.set("no_channel");
                tracing::debug!(%error, "ktctl refused the UDP flow's channel");
                return;
            }
            Err(_) => {
                reason.set("no_channel");
                tracing::debug!(
                    "ktctl did not open the UDP flow's channel within {OPEN_TIMEOUT:?}"
                );
                return;
            }
        };
        metrics.flows(1);
        tracing::debug!("UDP flow opened");
        tokio::select! {
            () = stop.cancelled() => {}
            () = activity.idled_out(idle) => tracing::debug!("UDP flow idle: closed"),
            relayed = kt_tunnel::datagram::relay(channel, side) => {
                if let Err(error) = relayed {
                    tracing::debug!(%error, "UDP flow ended with an error");
                }
            }
        }
        metrics.flows(-1);
    }
}

/// The pod's side of one flow, as [`kt_tunnel::datagram::relay`] wants a datagram side:
/// each read is one datagram the pod sent (from the listener's queue), each write one reply
/// sent to the pod from the listener's socket.
struct FlowSide {
    from_pod: mpsc::Receiver<Vec<u8>>,
    socket: Arc<UdpSocket>,
    pod: SocketAddr,
    activity: Activity,
    metrics: UdpExchange,
    /// Bytes waiting in the listener's queues ([`MAX_QUEUED_BYTES`]).
    queued: Arc<AtomicUsize>,
    /// Why what is still queued when the flow ends is dropped.
    reason: EndReason,
}

impl AsyncRead for FlowSide {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            match self.from_pod.poll_recv(cx) {
                Poll::Ready(Some(datagram)) => {
                    self.queued.fetch_sub(datagram.len(), Ordering::Relaxed);
                    // Zero bytes would read as the end of the stream: an empty datagram
                    // is not carried (counted).
                    if datagram.is_empty() {
                        self.metrics.dropped("empty");
                        continue;
                    }
                    // The relay reads into a buffer of the largest datagram.
                    let len = datagram.len().min(buf.remaining());
                    buf.put_slice(&datagram[..len]);
                    self.metrics.datagram("to_workstation");
                    return Poll::Ready(Ok(()));
                }
                // The listener let the flow go (the listener stopped): end of stream.
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// What a flow had queued when it ended is no longer waiting: dropped, and counted.
impl Drop for FlowSide {
    fn drop(&mut self) {
        self.from_pod.close();
        let reason = self.reason.get();
        while let Ok(datagram) = self.from_pod.try_recv() {
            self.queued.fetch_sub(datagram.len(), Ordering::Relaxed);
            self.metrics.dropped(reason);
        }
    }
}

impl AsyncWrite for FlowSide {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let sent = self.socket.poll_send_to(cx, buf, self.pod);
        if let Poll::Ready(Ok(_)) = &sent {
            self.activity.touch(Instant::now());
            self.metrics.datagram("from_workstation");
        }
        sent
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
