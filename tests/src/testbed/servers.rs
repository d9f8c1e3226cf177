//! Programs behind the test images: an HTTP echo that reports the pod that answered and the
//! request's headers, a TCP echo, a UDP echo, and a sleeper. Each ends on SIGTERM.

use std::convert::Infallible;

use axum::body::Bytes;
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fn port(default: u16) -> u16 {
    std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(default)
}

async fn until_sigterm() {
    if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    {
        term.recv().await;
    }
}

/// `kt-testbed image http-echo`: `GET /...` → `pod=<hostname>` and the request line and
/// headers, one per line. Port `$PORT` (8080).
pub async fn http_echo() -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", port(8080))).await?;
    let pod = std::env::var("HOSTNAME").unwrap_or_default();
    let serve = async {
        loop {
            let Ok((conn, _)) = listener.accept().await else {
                continue;
            };
            let pod = pod.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let mut body = format!("pod={pod}\n{} {}\n", req.method(), req.uri());
                    for (k, v) in req.headers() {
                        body.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or_default()));
                    }
                    async move {
                        Ok::<_, Infallible>(Response::new(http_body_util::Full::new(Bytes::from(
                            body,
                        ))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(conn), service)
                    .await;
            });
        }
    };
    tokio::select! { () = serve => Ok(()), () = until_sigterm() => Ok(()) }
}

/// `kt-testbed image tcp-echo`: echoes every byte back. Port `$PORT` (9000).
pub async fn tcp_echo() -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", port(9000))).await?;
    let serve = async {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = conn.read(&mut buf).await {
                    if n == 0 || conn.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    };
    tokio::select! { () = serve => Ok(()), () = until_sigterm() => Ok(()) }
}

/// `kt-testbed image udp-echo`: sends every datagram back. Port `$PORT` (9000).
pub async fn udp_echo() -> std::io::Result<()> {
    let socket = tokio::net::UdpSocket::bind(("0.0.0.0", port(9000))).await?;
    let serve = async {
        let mut buf = vec![0u8; 65_536];
        loop {
            if let Ok((n, peer)) = socket.recv_from(&mut buf).await {
                let _ = socket.send_to(&buf[..n], peer).await;
            }
        }
    };
    tokio::select! { () = serve => Ok(()), () = until_sigterm() => Ok(()) }
}

/// `kt-testbed image sleep`: does nothing until SIGTERM.
pub async fn sleep() -> std::io::Result<()> {
    until_sigterm().await;
    Ok(())
}
