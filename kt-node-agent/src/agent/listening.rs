//! What the agent's own TCP listeners share: the mesh router's per-route listeners and the
//! node-port relays. Both are pointed at by the node-port table, which is rewritten after
//! the reconcile pass on another thread, so a listener no longer wanted keeps accepting a
//! little longer; and neither may spin on a failing `accept`.

use std::{net::SocketAddr, time::Duration};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// How long a listener no longer wanted still accepts: longer than the node-port table
/// takes to stop sending connections to it.
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// How long a failed `accept` (out of file descriptors and the like) waits before the next.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// Cancels `stop` after [`CLOSE_GRACE`], or at once when `shutdown` is cancelled; the wait
/// runs on `tasks`.
pub fn stop_after_grace(tasks: &TaskTracker, stop: CancellationToken, shutdown: CancellationToken) {
    tasks.spawn(async move {
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = tokio::time::sleep(CLOSE_GRACE) => {}
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
