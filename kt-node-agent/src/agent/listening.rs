//! What the agent's own TCP listeners share: the mesh router's per-route listeners and the
//! node-port relays. Both are pointed at by the node-port table, which is rewritten after
//! the reconcile pass on another thread, so a listener no longer wanted keeps accepting
//! until that table no longer sends to it; and neither may spin on a failing `accept`.

use std::{net::SocketAddr, time::Duration};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::node_ports::Ruleset;

/// How long a listener no longer wanted still accepts at least: longer than the reconcile
/// pass takes to stop sending connections to it from the service map, and than the
/// node-port table usually takes.
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// How long a listener no longer wanted waits at most for the node-port table to stop
/// sending to it; past this it closes anyway (the table is stuck, and is retried).
pub const CLOSE_WAIT_MAX: Duration = Duration::from_secs(60);

/// How long a failed `accept` (out of file descriptors and the like) waits before the next.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// Cancels `stop`, the stop of the listener at `address` no longer wanted, after
/// [`CLOSE_GRACE`] and, when it is a DNAT target of the node-port table, once no table the
/// kernel may hold (`node_port_table`, [`super::node_ports::run`]) sends to it, or after
/// [`CLOSE_WAIT_MAX`] at most; at once when `shutdown` is cancelled. The wait runs on
/// `tasks`: the table changes after the reconcile pass, on another thread, and may wait
/// there for the nftables lock, and a closed port would reset the connections that arrive
/// meanwhile.
pub fn stop_when_unused(
    tasks: &TaskTracker,
    stop: CancellationToken,
    shutdown: CancellationToken,
    address: SocketAddr,
    node_port_table: Option<watch::Receiver<Ruleset>>,
) {
    tasks.spawn(async move {
        let unused = async {
            tokio::time::sleep(CLOSE_GRACE).await;
            let Some(mut table) = node_port_table else {
                return;
            };
            let waited = tokio::time::timeout(
                CLOSE_WAIT_MAX,
                table.wait_for(|table| !table.sends_to(address)),
            )
            .await;
            if waited.is_err() {
                tracing::warn!(listener = %address, ?CLOSE_WAIT_MAX, "the node-port table still sends to a listener no longer wanted; closing it anyway");
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = unused => {}
        }
        stop.cancel();
    });
}

/// The next connection on `listener`, or `None` once `stop` is cancelled. A failed accept
/// is logged and retried after [`ACCEPT_RETRY`], not spun on.
pub async fn next_connection(
    listener: &TcpListener,
    stop: &CancellationToken,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            () = stop.cancelled() => return None,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => return Some(accepted),
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(ACCEPT_RETRY).await;
                }
            },
        }
    }
}
