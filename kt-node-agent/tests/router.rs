//! The mesh router on loopback (no root, no cluster): a "workstation" and an "endpoint" HTTP
//! server, a route between them, and the cases the end-to-end suite does not reach — bytes
//! that are not HTTP, a server-first protocol, an `Upgrade: h2c` offer, a route that ends
//! while a keep-alive connection stays open, a session that does not answer.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use kt_node_agent::agent::{
    listening::CLOSE_GRACE,
    mesh::{MeshTarget, Route, RouteKey},
    router::{Router, SNIFF_WINDOW},
};
use kt_proto::session::HeaderMatch;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};
use tokio_util::sync::CancellationToken;

/// An HTTP/1.1 server answering every request with `name` and the request's first line,
/// or — for bytes that are not HTTP — echoing them.
async fn server(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                loop {
                    let Ok(n) = stream.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    let seen = String::from_utf8_lossy(&buf[..n]).into_owned();
                    if seen.contains("HTTP/1.1\r\n") {
                        let first = seen.lines().next().unwrap_or_default();
                        let upgrade = seen.to_ascii_lowercase().contains("upgrade:");
                        let body = format!("{name} {first} upgrade={upgrade}");
                        let reply = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if stream.write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                    } else if stream.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    address
}

fn key() -> RouteKey {
    RouteKey {
        namespace: "dev".into(),
        service: "web".into(),
        port: 80,
    }
}

fn route(session: SocketAddr, endpoint: SocketAddr) -> Route {
    Route {
        sessions: vec![MeshTarget {
            session: "dev/alice".into(),
            owner: "alice@laptop".into(),
            header: HeaderMatch {
                name: "version".into(),
                value: "alice1".into(),
            },
            to: session,
        }],
        endpoints: vec![endpoint],
        addresses: Vec::new(),
    }
}

/// Sends one HTTP/1.1 request on `stream` and reads its answer's body (content-length
/// framed, as [`server`] and hyper write it).
async fn ask(stream: &mut TcpStream, extra_headers: &str) -> String {
    let request = format!("GET /x HTTP/1.1\r\nHost: web\r\n{extra_headers}\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&seen).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .expect("content-length");
            if body.len() >= length {
                let status = head.lines().next().unwrap_or_default().to_owned();
                return format!("{status} | {body}");
            }
        }
    }
}

#[tokio::test]
async fn the_router_routes_passes_through_and_declines_h2c() {
    let (workstation, endpoint) = (server("workstation").await, server("endpoint").await);
    let shutdown = CancellationToken::new();
    let router = Router::new(Ipv4Addr::LOCALHOST.into(), shutdown.clone());
    let routes = BTreeMap::from([(key(), route(workstation, endpoint))]);
    let at = router.update(&routes)[&key()];

    // Keep-alive: each request by its own header.
    let mut stream = TcpStream::connect(at).await.unwrap();
    assert!(
        ask(&mut stream, "Version: alice1\r\n")
            .await
            .contains("| workstation GET /x")
    );
    assert!(ask(&mut stream, "").await.contains("| endpoint GET /x"));
    // An h2c offer is declined: answered over HTTP/1.1 without the Upgrade.
    let h2c = ask(
        &mut stream,
        "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nversion: alice1\r\n",
    )
    .await;
    assert!(
        h2c.starts_with("HTTP/1.1 200")
            && h2c.contains("workstation GET /x HTTP/1.1 upgrade=false"),
        "{h2c}"
    );

    // Bytes that are not HTTP reach an endpoint unchanged (the endpoint echoes them).
    let mut raw = TcpStream::connect(at).await.unwrap();
    raw.write_all(b"\x16\x03\x01 not http\n").await.unwrap();
    let mut echoed = [0u8; 13];
    raw.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"\x16\x03\x01 not http\n");

    // A client that waits for the server to speak first is passed on after the sniff window.
    let mut quiet = TcpStream::connect(at).await.unwrap();
    tokio::time::sleep(SNIFF_WINDOW + Duration::from_millis(100)).await;
    quiet.write_all(b"HELO\n").await.unwrap();
    let mut helo = [0u8; 5];
    quiet.read_exact(&mut helo).await.unwrap();
    assert_eq!(&helo, b"HELO\n");

    // A session that does not answer: 502 naming it, and the connection goes on.
    let gone = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let gone_at = gone.local_addr().unwrap();
    drop(gone);
    router.update(&BTreeMap::from([(key(), route(gone_at, endpoint))]));
    let failed = ask(&mut stream, "version: alice1\r\n").await;
    assert!(
        failed.starts_with("HTTP/1.1 502") && failed.contains("alice@laptop"),
        "{failed}"
    );
    assert!(ask(&mut stream, "").await.contains("| endpoint"));

    // The route ends: an open connection sends every request to the endpoints, and so does
    // a new one for CLOSE_GRACE (the node-port table may still send outside clients here);
    // then the listener is closed.
    assert!(router.update(&BTreeMap::new()).is_empty());
    assert!(
        ask(&mut stream, "version: alice1\r\n")
            .await
            .contains("| endpoint")
    );
    let mut late = TcpStream::connect(at)
        .await
        .expect("accepted within the grace");
    assert!(
        ask(&mut late, "version: alice1\r\n")
            .await
            .contains("| endpoint")
    );
    tokio::time::sleep(CLOSE_GRACE + Duration::from_millis(300)).await;
    assert!(
        TcpStream::connect(at).await.is_err(),
        "the listener is closed"
    );
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), router.closed())
        .await
        .expect("the router's tasks end with shutdown");
}
