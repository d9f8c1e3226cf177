//! The agent's HTTP endpoints on its node: `/healthz` (the process serves), `/readyz` (the
//! redirect map is programmed from a synced cache) and `/metrics` ([`super::metrics`]).
//!
//! The port is on the node's address (host network), open to every pod and often beyond,
//! so the server bounds what a client that sends nothing useful can hold: connections per
//! source and in all ([`CONNECTIONS`]), the time to send a request's head
//! ([`HEADER_READ_TIMEOUT`]) and its size ([`MAX_HEAD_BYTES`]). Its own clients — the
//! kubelet's probes and a metrics scraper — send one small `GET` at a time.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{Router, http::StatusCode, routing::get};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument as _;

use super::metrics::Metrics;
use crate::admission::{Gate, Limits};

/// How long a client has to send a request's whole head, from the moment the server waits
/// for it (a new connection, or the next request on a kept-alive one). A kubelet probe gives
/// the whole request `timeoutSeconds` (1 s by default); hyper's own default, applied only
/// with a timer (`axum::serve` sets none, so it never fired), is 30 s. 10 s is ten probe
/// timeouts, while a slowloris or idle connection lets go of its slot within it.
pub(crate) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest request head read (hyper's read buffer; 8 KiB is its minimum). The agent's
/// requests are a `GET` with a few headers; nginx's `large_client_header_buffers` allow 32
/// KiB; hyper's default is about 400 KiB per connection, which [`CONNECTIONS`] of them
/// would turn into 50 MiB.
pub(crate) const MAX_HEAD_BYTES: usize = 16 * 1024;

/// Open connections per source and in all. The kubelet probes from the node's address (one
/// connection per probe, closed after it); a scraper keeps one. 16 per source is far above
/// either, and 128 in all keeps a flood's file descriptors and buffers small.
pub(crate) const CONNECTIONS: Limits = Limits {
    per_source: 16,
    total: 128,
};

/// The HTTP server stopped by itself: its listening socket failed.
#[derive(Debug, thiserror::Error)]
#[error("HTTP server failed")]
pub struct AdminError(#[source] crate::ssh_server::AcceptError);

/// Serves the endpoints on `listener` until `shutdown` over HTTP/1.1, with the bounds above
/// (a connection beyond [`CONNECTIONS`] is closed as it is accepted). Fails when the
/// listening socket does; open connections are then ended.
pub(crate) async fn serve(
    listener: TcpListener,
    ready: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<(), AdminError> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || async move {
                if ready.load(Ordering::Relaxed) {
                    (StatusCode::OK, "ready")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready")
                }
            }),
        )
        .route(
            "/metrics",
            get(move || async move {
                match metrics.encode() {
                    Ok(text) => (
                        StatusCode::OK,
                        [(
                            http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        text,
                    ),
                    Err(_) => (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        [(http::header::CONTENT_TYPE, "text/plain")],
                        "metrics could not be encoded".to_owned(),
                    ),
                }
            }),
        );
    let gate = Gate::new(CONNECTIONS);
    let connections = TaskTracker::new();
    let result = loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break Ok(()),
            accepted = crate::ssh_server::accept(&listener) => match accepted {
                Ok(a) => a,
                Err(error) => break Err(AdminError(error)),
            },
        };
        let permit = match gate.admit(peer.ip()) {
            Ok(permit) => permit,
            Err(refused) => {
                tracing::debug!(%peer, %refused, "HTTP connection refused");
                continue;
            }
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let stop = shutdown.clone();
        connections.spawn(
            async move {
                let mut http = hyper::server::conn::http1::Builder::new();
                http.timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .max_buf_size(MAX_HEAD_BYTES);
                let connection = http.serve_connection(TokioIo::new(stream), service);
                let mut connection = std::pin::pin!(connection);
                let result = tokio::select! {
                    result = connection.as_mut() => result,
                    () = stop.cancelled() => {
                        connection.as_mut().graceful_shutdown();
                        connection.await
                    }
                };
                if let Err(error) = result {
                    tracing::debug!(%error, "HTTP connection ended with an error");
                }
                drop(permit);
            }
            .instrument(tracing::debug_span!("http", %peer)),
        );
    };
    connections.close();
    // A connection in graceful shutdown still has its header timeout: this wait is bounded.
    connections.wait().await;
    result
}
