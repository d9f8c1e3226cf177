//! HTTP clients for the mesh suites: several HTTP/2 streams interleaved on one connection
//! (plain requests or gRPC unary calls), and a WebSocket upgrade.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::Result;

/// `name:value`, or `-` for no header.
fn header_of(spec: &str) -> Result<Option<(String, String)>> {
    if spec == "-" {
        return Ok(None);
    }
    let (name, value) = spec
        .split_once(':')
        .ok_or_else(|| format!("header '{spec}' is not name:value or -"))?;
    Ok(Some((name.trim().to_owned(), value.trim().to_owned())))
}

/// The `pod=` line of an echo answer.
fn pod_line(text: &str) -> String {
    text.lines()
        .find(|l| l.starts_with("pod="))
        .unwrap_or("pod=?")
        .to_owned()
}

/// One HTTP/2 connection (prior knowledge) to `addr`; one request per header spec, all in
/// flight at once (interleaved streams); prints each answer's `pod=` line in spec order.
/// With `grpc`, each is a gRPC unary call (the header as metadata) whose trailer must say
/// `grpc-status: 0`.
pub(crate) async fn h2(addr: &str, path: &str, specs: &[String], grpc: bool) -> Result {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    let driver = tokio::spawn(connection);
    let calls = specs.iter().map(|spec| {
        let mut sender = sender.clone();
        async move {
            let mut request = hyper::Request::builder().uri(format!("http://{addr}{path}"));
            if let Some((name, value)) = header_of(spec)? {
                request = request.header(name, value);
            }
            let body = if grpc {
                request = request
                    .method("POST")
                    .header("content-type", "application/grpc")
                    .header("te", "trailers");
                // One empty length-prefixed message.
                Bytes::from_static(&[0, 0, 0, 0, 0])
            } else {
                Bytes::new()
            };
            let response = sender.send_request(request.body(Full::new(body))?).await?;
            let status = response.status();
            let collected =
                tokio::time::timeout(Duration::from_secs(10), response.into_body().collect())
                    .await??;
            let trailers = collected.trailers().cloned();
            let bytes = collected.to_bytes();
            if grpc {
                let grpc_status = trailers
                    .as_ref()
                    .and_then(|t| t.get("grpc-status"))
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("none")
                    .to_owned();
                if status != 200 || grpc_status != "0" || bytes.len() < 5 {
                    return Err(format!(
                        "gRPC call failed: HTTP {status}, grpc-status {grpc_status}"
                    )
                    .into());
                }
                return Ok::<String, Box<dyn std::error::Error>>(pod_line(
                    &String::from_utf8_lossy(&bytes[5..]),
                ));
            }
            if status != 200 {
                return Err(format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes)).into());
            }
            Ok(pod_line(&String::from_utf8_lossy(&bytes)))
        }
    });
    let answers = futures::future::join_all(calls).await;
    driver.abort();
    for answer in answers {
        println!("{}", answer?);
    }
    Ok(())
}

/// A WebSocket upgrade (RFC 6455 §4.1) to `addr` with the header of `spec`: requires `101`
/// with the right `Sec-WebSocket-Accept`, prints the `pod=` line the echo sends first, then
/// checks that a message comes back unchanged.
pub(crate) async fn ws(addr: &str, spec: &str) -> Result {
    use base64::Engine as _;
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let key = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 16]>());
    let mut request = format!(
        "GET /chat HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
    );
    if let Some((name, value)) = header_of(spec)? {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await??;
        if n == 0 {
            return Err(format!(
                "connection closed after {:?}",
                String::from_utf8_lossy(&seen)
            )
            .into());
        }
        seen.extend_from_slice(&buf[..n]);
        if let Some(at) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
    };
    let head = String::from_utf8_lossy(&seen[..head_end]).into_owned();
    if !head.starts_with("HTTP/1.1 101") {
        return Err(format!("no upgrade: {head}").into());
    }
    let expected = {
        use sha1::Digest as _;
        base64::engine::general_purpose::STANDARD.encode(sha1::Sha1::digest(format!(
            "{key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
        )))
    };
    if !head.to_ascii_lowercase().contains(&format!(
        "sec-websocket-accept: {}",
        expected.to_ascii_lowercase()
    )) {
        return Err(format!("wrong or missing Sec-WebSocket-Accept: {head}").into());
    }
    let mut rest = seen[head_end..].to_vec();
    while !String::from_utf8_lossy(&rest).contains("\n\n") && !rest.ends_with(b"\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await??;
        if n == 0 {
            break;
        }
        rest.extend_from_slice(&buf[..n]);
    }
    let greeting = String::from_utf8_lossy(&rest).into_owned();
    // Drain the rest of the echo's text before checking the echo of our own bytes.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut drain = [0u8; 65_536];
    let _ = tokio::time::timeout(Duration::from_millis(50), stream.read(&mut drain)).await;
    stream.write_all(b"over the upgrade\n").await?;
    let mut echoed = vec![0u8; 17];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut echoed)).await??;
    if echoed != b"over the upgrade\n" {
        return Err(format!("echo came back as {:?}", String::from_utf8_lossy(&echoed)).into());
    }
    println!("{}", pod_line(&greeting));
    Ok(())
}

/// `connections` HTTP/1.1 keep-alive connections to `addr`, each sending `GET /` (with the
/// header of `spec`) one after another for `seconds`; prints
/// `requests_per_s=… p50_us=… p99_us=… errors=…` over every request's time.
pub(crate) async fn load(addr: &str, connections: usize, seconds: f64, spec: &str) -> Result {
    let header = header_of(spec)?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(seconds);
    let started = std::time::Instant::now();
    let workers = (0..connections).map(|_| {
        let header = header.clone();
        async move {
            let stream = tokio::net::TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            let driver = tokio::spawn(connection);
            let mut times = Vec::new();
            let mut errors = 0usize;
            let mut first_error = None;
            while tokio::time::Instant::now() < deadline {
                let mut request = hyper::Request::builder().uri("/").header("host", addr);
                if let Some((name, value)) = &header {
                    request = request.header(name.as_str(), value.as_str());
                }
                let request = request.body(Full::new(Bytes::new()))?;
                // The connection takes the next request only once the last one is done.
                if sender.ready().await.is_err() {
                    errors += 1;
                    first_error.get_or_insert_with(|| "connection closed".to_owned());
                    break;
                }
                let sent = std::time::Instant::now();
                match sender.send_request(request).await {
                    Ok(response) if response.status() == 200 => {
                        response.into_body().collect().await?;
                        times.push(sent.elapsed());
                    }
                    Ok(response) => {
                        errors += 1;
                        first_error.get_or_insert(format!("HTTP {}", response.status()));
                    }
                    Err(error) => {
                        errors += 1;
                        first_error.get_or_insert(error.to_string());
                        break;
                    }
                }
            }
            driver.abort();
            if let Some(error) = first_error {
                eprintln!("kt-tools http-load: {errors} failed request(s), first: {error}");
            }
            Ok::<_, Box<dyn std::error::Error>>((times, errors))
        }
    });
    let mut times = Vec::new();
    let mut errors = 0;
    for result in futures::future::join_all(workers).await {
        let (t, e) = result?;
        times.extend(t);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    times.sort();
    let at = |q: f64| {
        times
            .get(((times.len() as f64 * q) as usize).min(times.len().saturating_sub(1)))
            .map_or(0, |d| d.as_micros())
    };
    println!(
        "requests_per_s={:.0} p50_us={} p99_us={} errors={errors}",
        times.len() as f64 / elapsed,
        at(0.50),
        at(0.99)
    );
    Ok(())
}
