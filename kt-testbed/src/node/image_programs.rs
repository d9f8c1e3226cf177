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
/// headers, one per line. Port `$PORT` (8080). It speaks HTTP/1.1 and HTTP/2 with prior
/// knowledge (the mesh router's upstreams), and besides:
/// - a gRPC request (`content-type: application/grpc…`) gets that text as one
///   length-prefixed gRPC message and the trailer `grpc-status: 0`;
/// - an `Upgrade` request (WebSocket) gets `101` (with `Sec-WebSocket-Accept`, RFC 6455
///   §4.2.2), then the text on the upgraded connection, then every byte echoed.
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
                    let pod = pod.clone();
                    async move { Ok::<_, Infallible>(echo(&pod, req)) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection_with_upgrades(TokioIo::new(conn), service)
                .await;
            });
        }
    };
    tokio::select! { () = serve => Ok(()), () = until_sigterm() => Ok(()) }
}

type EchoBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// The http-echo answer to `req` (see [`http_echo`]).
fn echo(pod: &str, mut req: Request<Incoming>) -> Response<EchoBody> {
    use http_body_util::BodyExt as _;
    let mut text = format!("pod={pod}\n{} {}\n", req.method(), req.uri());
    for (k, v) in req.headers() {
        text.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or_default()));
    }
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    if let Some(protocol) = header("upgrade") {
        let accept = header("sec-websocket-key").map(|key| {
            use base64::Engine as _;
            use sha1::Digest as _;
            let digest = sha1::Sha1::digest(format!("{key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11"));
            base64::engine::general_purpose::STANDARD.encode(digest)
        });
        let upgraded = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let Ok(upgraded) = upgraded.await else {
                return;
            };
            let mut io = TokioIo::new(upgraded);
            if io.write_all(text.as_bytes()).await.is_err() {
                return;
            }
            let mut buf = vec![0u8; 16 * 1024];
            while let Ok(n) = io.read(&mut buf).await {
                if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
        let mut response = Response::builder()
            .status(hyper::StatusCode::SWITCHING_PROTOCOLS)
            .header("upgrade", protocol)
            .header("connection", "Upgrade");
        if let Some(accept) = accept {
            response = response.header("sec-websocket-accept", accept);
        }
        return response
            .body(http_body_util::Empty::new().boxed())
            .unwrap_or_default();
    }
    let grpc = header("content-type").is_some_and(|t| t.starts_with("application/grpc"));
    if grpc {
        let mut message = vec![0u8];
        message.extend_from_slice(&u32::try_from(text.len()).unwrap_or(0).to_be_bytes());
        message.extend_from_slice(text.as_bytes());
        let mut trailers = hyper::HeaderMap::new();
        trailers.insert("grpc-status", hyper::header::HeaderValue::from_static("0"));
        let frames = futures::stream::iter([
            Ok::<_, Infallible>(hyper::body::Frame::data(Bytes::from(message))),
            Ok(hyper::body::Frame::trailers(trailers)),
        ]);
        return Response::builder()
            .header("content-type", "application/grpc")
            .body(http_body_util::StreamBody::new(frames).boxed())
            .unwrap_or_default();
    }
    Response::new(http_body_util::Full::new(Bytes::from(text)).boxed())
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

/// `kt-testbed image udp-echo`: sends every datagram back, after `$REPLY_PREFIX` when it is
/// set (to tell two echoes apart). Port `$PORT` (9000).
pub async fn udp_echo() -> std::io::Result<()> {
    let socket = tokio::net::UdpSocket::bind(("0.0.0.0", port(9000))).await?;
    let prefix = std::env::var("REPLY_PREFIX").unwrap_or_default();
    let serve = async {
        let mut buf = vec![0u8; 65_536];
        let mut reply = Vec::with_capacity(buf.len());
        loop {
            if let Ok((n, peer)) = socket.recv_from(&mut buf).await {
                reply.clear();
                reply.extend_from_slice(prefix.as_bytes());
                reply.extend_from_slice(&buf[..n]);
                let _ = socket.send_to(&reply, peer).await;
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

/// `kt-testbed image openssh-shadow`: the ktctl v0.3.7 shadow image contract on OpenSSH.
/// The authorized key comes from `/root/authorized/authorized_keys` (the ConfigMap volume
/// ktctl mounts), `$privateKey` (base64) becomes root's identity, and sshd runs in the
/// foreground on :22 with root login, public keys only and `GatewayPorts yes`. `/root` and
/// `/run` are the image's own empty directories (the catalog's), so the host's stay
/// untouched.
/// With `KT_DNS_PROTOCOL` set, `dns_relay dns-relay` answers on :53 beside sshd, as v0.3.7's
/// image starts its DNS server.
pub fn openssh_shadow(dns_relay: Option<&std::path::Path>) -> std::io::Result<Infallible> {
    use std::{os::unix::process::CommandExt as _, process::Command};
    let authorized = std::fs::read("/root/authorized/authorized_keys").unwrap_or_default();
    std::fs::create_dir_all("/root/.ssh")?;
    std::fs::write("/root/.ssh/authorized_keys", authorized)?;
    if let Ok(key) = std::env::var("privateKey") {
        use base64::Engine as _;
        let pem = base64::engine::general_purpose::STANDARD
            .decode(key.trim())
            .map_err(std::io::Error::other)?;
        std::fs::write("/root/.ssh/id_rsa", pem)?;
        std::fs::set_permissions(
            "/root/.ssh/id_rsa",
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )?;
    }
    if let (Some(relay), true) = (dns_relay, std::env::var_os("KT_DNS_PROTOCOL").is_some()) {
        // Inherits the environment (KT_DNS_PROTOCOL, KT_LOCAL_DOMAIN) and outlives the exec
        // below as sshd's child; the pod's cgroup ends both.
        Command::new(relay).arg("dns-relay").spawn()?;
    }
    std::fs::create_dir_all("/run/sshd")?;
    std::fs::create_dir_all("/run/kt-ssh")?;
    let keygen = Command::new("ssh-keygen")
        .args([
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-f",
            "/run/kt-ssh/host_ed25519",
        ])
        .status()?;
    if !keygen.success() {
        return Err(std::io::Error::other("ssh-keygen failed"));
    }
    std::fs::write(
        "/run/kt-ssh/sshd_config",
        "Port 22\nListenAddress 0.0.0.0\nHostKey /run/kt-ssh/host_ed25519\nPermitRootLogin yes\n\
         PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
         AuthorizedKeysFile /root/.ssh/authorized_keys\nStrictModes no\nGatewayPorts yes\n\
         AllowTcpForwarding yes\nUsePAM no\nPidFile /run/sshd.pid\nSubsystem sftp internal-sftp\n",
    )?;
    Err(Command::new("/usr/sbin/sshd")
        .args(["-D", "-e", "-f", "/run/kt-ssh/sshd_config"])
        .exec())
}
