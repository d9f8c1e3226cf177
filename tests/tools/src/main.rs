//! `kt-tools`: the test clients kt's suites and benchmarks run inside the testbed (in pods
//! through `kubectl exec`, or on the workstation through `kt-testbed exec`). Not part of the
//! simulated cluster: they stand in for `dig`, `kubectl port-forward` and load generators.

use std::{
    process::ExitCode,
    time::{Duration, Instant},
};

mod hostile;
mod http;

use clap::{Parser, Subcommand};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Test clients for kt's testbed suites and benchmarks.
#[derive(Parser)]
#[command(name = "kt-tools", version)]
struct Cli {
    #[command(subcommand)]
    tool: Tool,
}

#[derive(Subcommand)]
enum Tool {
    /// Asks the nameserver of /etc/resolv.conf (or --server) over UDP (or TCP); prints the
    /// rcode, then `NAME DATA` per answer.
    Dig {
        /// The name to look up.
        name: String,
        /// The record type.
        #[arg(default_value = "A")]
        kind: String,
        /// `ip:port` of the nameserver to ask instead.
        #[arg(long)]
        server: Option<String>,
        /// Ask over TCP.
        #[arg(long)]
        tcp: bool,
        /// Ask this many times in a row and print the p50 and p99 answer time in
        /// microseconds instead of the answer.
        #[arg(long, default_value_t = 1)]
        count: usize,
    },
    /// Port-forwards to POD:PORT with kube-rs (kubeconfig from $KUBECONFIG), sends a line
    /// and prints what comes back: a check that port-forward works from where it runs.
    PortForward {
        namespace: String,
        pod: String,
        port: u16,
    },
    /// CONNECTIONS parallel connections to a TCP echo, each sending BYTES of a
    /// connection-specific pattern and checking that exactly those come back; prints
    /// `ok CONNECTIONS`.
    Load {
        addr: String,
        connections: usize,
        bytes: usize,
    },
    /// Listens on 127.0.0.1:LOCAL_PORT and carries each connection over its own API-server
    /// port-forward to the pod, as `kubectl port-forward` does.
    Forward {
        namespace: String,
        pod: String,
        local_port: u16,
        remote_port: u16,
    },
    /// STREAMS parallel connections to a TCP echo, each sending BYTES while reading the echo
    /// back; prints the seconds until every echo is complete.
    Bulk {
        addr: String,
        streams: usize,
        bytes: usize,
    },
    /// COUNT sequential round trips of SIZE bytes on one connection to a TCP echo; prints the
    /// p50 and p99 round-trip time in microseconds.
    Rr {
        addr: String,
        count: usize,
        size: usize,
    },
    /// Sends MESSAGE as one UDP datagram to ADDR (`ip:port` or `name:port`) and prints the
    /// datagram that comes back; up to five attempts, one second each. A connected socket
    /// (`connect`, `send`, `recv`), or with `--unconnected` `sendto` and `recvfrom`, failing
    /// when the reply's source is not ADDR.
    Udp {
        addr: String,
        message: String,
        #[arg(long)]
        unconnected: bool,
    },
    /// A DNS server on 127.0.0.1:PORT (UDP) answering every A query with ADDRESS, TTL 0:
    /// a stand-in for a developer's DNS service.
    DnsAnswer {
        port: u16,
        address: std::net::Ipv4Addr,
    },
    /// Sends COUNT datagrams `seq=<n>` to ADDR from one unconnected socket, one every
    /// millisecond, and reads nothing (a one-way stream).
    UdpStream { addr: String, count: u32 },
    /// Receives on 127.0.0.1:PORT until SECONDS pass without a datagram (after the first);
    /// prints `received=<datagrams> distinct=<seq numbers> in_order=<bool>` of the `seq=<n>`
    /// datagrams of udp-stream.
    UdpSink { port: u16, seconds: u64 },
    /// One HTTP/2 connection (prior knowledge) to ADDR with one request per HEADER
    /// (`name:value`, or `-` for none), all streams in flight at once; prints each answer's
    /// `pod=` line in order. `--grpc` makes each a gRPC unary call.
    H2 {
        addr: String,
        #[arg(required = true)]
        headers: Vec<String>,
        #[arg(long, default_value = "/")]
        path: String,
        #[arg(long)]
        grpc: bool,
    },
    /// A WebSocket upgrade to ADDR with HEADER (`name:value` or `-`); prints the `pod=` line
    /// the http-echo sends on the upgraded connection after checking the handshake and an
    /// echo.
    Ws { addr: String, header: String },
    /// CONNECTIONS HTTP/1.1 keep-alive connections to ADDR sending `GET /` with HEADER
    /// (`name:value` or `-`) back to back for SECONDS; prints requests/s and the p50 and p99
    /// request time in microseconds.
    HttpLoad {
        addr: String,
        connections: usize,
        seconds: f64,
        #[arg(default_value = "-")]
        header: String,
    },
    /// An HTTP CONNECT proxy on LISTEN (`ip:port`), as a corporate proxy stands between a
    /// developer and the API server: prints `listening`, then `CONNECT host:port` for each
    /// tunnel and `closed host:port up=BYTES down=BYTES` when it ends. Any other method
    /// gets 405.
    ConnectProxy { listen: String },
    /// Holds hostile connections against each ADDR for SECONDS — GARBAGE sending random
    /// bytes, SLOWLORIS sending a line one byte at a time, IDLE sending nothing — and
    /// prints `ready …` once all are tried, then, per kind and address, how many the server
    /// closed and when (`hostile.rs`). Raises its own RLIMIT_NOFILE to the hard limit.
    Hostile {
        #[arg(required = true)]
        addrs: Vec<String>,
        #[arg(long, default_value_t = 0)]
        garbage: usize,
        #[arg(long, default_value_t = 0)]
        slowloris: usize,
        #[arg(long, default_value_t = 0)]
        idle: usize,
        #[arg(long)]
        seconds: f64,
    },
}

type Result<T = (), E = Box<dyn std::error::Error>> = std::result::Result<T, E>;

fn main() -> ExitCode {
    let work = async {
        match Cli::parse().tool {
            Tool::Dig {
                name,
                kind,
                server,
                tcp,
                count,
            } => {
                if count > 1 {
                    dig_timed(&name, &kind, server, tcp, count).await
                } else {
                    dig(&name, &kind, server, tcp).await
                }
            }
            Tool::PortForward {
                namespace,
                pod,
                port,
            } => port_forward(&namespace, &pod, port).await,
            Tool::Load {
                addr,
                connections,
                bytes,
            } => load(&addr, connections, bytes).await,
            Tool::Forward {
                namespace,
                pod,
                local_port,
                remote_port,
            } => forward(&namespace, &pod, local_port, remote_port).await,
            Tool::Bulk {
                addr,
                streams,
                bytes,
            } => bulk(&addr, streams, bytes).await,
            Tool::Rr { addr, count, size } => request_response(&addr, count, size).await,
            Tool::Udp {
                addr,
                message,
                unconnected,
            } => udp(&addr, &message, unconnected).await,
            Tool::UdpStream { addr, count } => udp_stream(&addr, count).await,
            Tool::DnsAnswer { port, address } => dns_answer(port, address).await,
            Tool::UdpSink { port, seconds } => udp_sink(port, seconds).await,
            Tool::H2 {
                addr,
                headers,
                path,
                grpc,
            } => http::h2(&addr, &path, &headers, grpc).await,
            Tool::Ws { addr, header } => http::ws(&addr, &header).await,
            Tool::HttpLoad {
                addr,
                connections,
                seconds,
                header,
            } => http::load(&addr, connections, seconds, &header).await,
            Tool::ConnectProxy { listen } => connect_proxy(&listen).await,
            Tool::Hostile {
                addrs,
                garbage,
                slowloris,
                idle,
                seconds,
            } => {
                hostile::run(
                    &addrs,
                    garbage,
                    slowloris,
                    idle,
                    Duration::from_secs_f64(seconds),
                )
                .await
            }
        }
    };
    let result = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(Into::into)
        .and_then(|runtime| runtime.block_on(work));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kt-tools: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn udp(addr: &str, message: &str, unconnected: bool) -> Result {
    let peer = tokio::net::lookup_host(addr)
        .await?
        .next()
        .ok_or_else(|| format!("{addr} has no address"))?;
    let socket = tokio::net::UdpSocket::bind("0.0.0.0:0").await?;
    if !unconnected {
        socket.connect(peer).await?;
    }
    let mut buf = vec![0u8; 65_536];
    for _ in 0..5 {
        let wait = Duration::from_secs(1);
        let len = if unconnected {
            socket.send_to(message.as_bytes(), peer).await?;
            match tokio::time::timeout(wait, socket.recv_from(&mut buf)).await {
                Ok(received) => {
                    let (len, from) = received?;
                    if from != peer {
                        return Err(format!("the reply came from {from}, not {peer}").into());
                    }
                    len
                }
                Err(_) => continue,
            }
        } else {
            socket.send(message.as_bytes()).await?;
            match tokio::time::timeout(wait, socket.recv(&mut buf)).await {
                Ok(received) => received?,
                Err(_) => continue,
            }
        };
        println!("{}", String::from_utf8_lossy(&buf[..len]));
        return Ok(());
    }
    Err(format!("no answer from {peer}").into())
}

async fn dns_answer(port: u16, address: std::net::Ipv4Addr) -> Result {
    use hickory_proto::{
        op::{Message, MessageType, OpCode},
        rr::{RData, Record, RecordType, rdata::A},
    };
    let socket = tokio::net::UdpSocket::bind(("127.0.0.1", port)).await?;
    let mut buf = vec![0u8; 4096];
    loop {
        let (len, peer) = socket.recv_from(&mut buf).await?;
        let Ok(query) = Message::from_vec(&buf[..len]) else {
            continue;
        };
        let mut reply = Message::response(query.metadata.id, OpCode::Query);
        reply.metadata.message_type = MessageType::Response;
        reply.metadata.recursion_desired = query.metadata.recursion_desired;
        for question in &query.queries {
            reply.add_query(question.clone());
            if question.query_type == RecordType::A {
                reply.add_answer(Record::from_rdata(
                    question.name.clone(),
                    0,
                    RData::A(A(address)),
                ));
            }
        }
        socket.send_to(&reply.to_vec()?, peer).await?;
    }
}

async fn udp_stream(addr: &str, count: u32) -> Result {
    let peer = tokio::net::lookup_host(addr)
        .await?
        .next()
        .ok_or_else(|| format!("{addr} has no address"))?;
    let socket = tokio::net::UdpSocket::bind("0.0.0.0:0").await?;
    let mut every = tokio::time::interval(Duration::from_millis(1));
    for seq in 0..count {
        every.tick().await;
        socket
            .send_to(format!("seq={seq}").as_bytes(), peer)
            .await?;
    }
    println!("sent={count}");
    Ok(())
}

async fn udp_sink(port: u16, seconds: u64) -> Result {
    let socket = tokio::net::UdpSocket::bind(("127.0.0.1", port)).await?;
    let mut buf = vec![0u8; 65_536];
    let (mut received, mut seen, mut in_order, mut last) =
        (0u64, std::collections::BTreeSet::new(), true, None::<u64>);
    // The first datagram may take long (the sender starts later); then a quiet spell ends it.
    let (len, _) = socket.recv_from(&mut buf).await?;
    let mut datagram = buf[..len].to_vec();
    loop {
        received += 1;
        if let Some(seq) = std::str::from_utf8(&datagram)
            .ok()
            .and_then(|d| d.strip_prefix("seq="))
            .and_then(|n| n.parse::<u64>().ok())
        {
            in_order &= last.is_none_or(|l| seq > l);
            last = Some(seq);
            seen.insert(seq);
        }
        let quiet = Duration::from_secs(seconds);
        match tokio::time::timeout(quiet, socket.recv_from(&mut buf)).await {
            Ok(next) => datagram = buf[..next?.0].to_vec(),
            Err(_) => break,
        }
    }
    println!(
        "received={received} distinct={} in_order={in_order}",
        seen.len()
    );
    Ok(())
}

/// `count` lookups in a row; prints the p50 and p99 in microseconds. Each must succeed.
async fn dig_timed(
    name: &str,
    kind: &str,
    server: Option<String>,
    tcp: bool,
    count: usize,
) -> Result {
    let mut micros = Vec::with_capacity(count);
    for _ in 0..count {
        let started = Instant::now();
        ask(name, kind, server.clone(), tcp).await?;
        micros.push(started.elapsed().as_secs_f64() * 1e6);
    }
    micros.sort_by(f64::total_cmp);
    let at = |q: f64| micros[((micros.len() - 1) as f64 * q).round() as usize];
    println!("{:.0} {:.0}", at(0.5), at(0.99));
    Ok(())
}

async fn dig(name: &str, kind: &str, server: Option<String>, tcp: bool) -> Result {
    let reply = ask(name, kind, server, tcp).await?;
    println!("rcode={}", reply.metadata.response_code);
    for answer in &reply.answers {
        println!("{} {}", answer.name, answer.data);
    }
    Ok(())
}

/// One lookup of `name`'s `kind` records: the reply.
async fn ask(
    name: &str,
    kind: &str,
    server: Option<String>,
    tcp: bool,
) -> Result<hickory_proto::op::Message> {
    use hickory_proto::{
        op::{Message, Query},
        rr::{Name, RecordType},
    };
    let server = match server {
        Some(server) => server,
        None => {
            let resolv = std::fs::read_to_string("/etc/resolv.conf")?;
            let ip = resolv
                .lines()
                .find_map(|l| l.strip_prefix("nameserver "))
                .and_then(|rest| rest.split_whitespace().next())
                .ok_or("no nameserver")?;
            format!("{}:53", ip.trim())
        }
    };
    let mut query = Message::query();
    query.metadata.id = rand::random();
    query.metadata.recursion_desired = true;
    query.add_query(Query::query(
        Name::from_ascii(name)?,
        kind.parse::<RecordType>()?,
    ));
    let bytes = query.to_vec()?;
    let reply = if tcp {
        let mut stream = tokio::net::TcpStream::connect(&server).await?;
        stream.write_u16(u16::try_from(bytes.len())?).await?;
        stream.write_all(&bytes).await?;
        let read = async {
            let mut reply = vec![0u8; usize::from(stream.read_u16().await?)];
            stream.read_exact(&mut reply).await?;
            Ok::<_, std::io::Error>(reply)
        };
        tokio::time::timeout(Duration::from_secs(5), read).await??
    } else {
        let socket = tokio::net::UdpSocket::bind("0.0.0.0:0").await?;
        socket.send_to(&bytes, &server).await?;
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), socket.recv(&mut buf)).await??;
        buf.truncate(n);
        buf
    };
    let reply = Message::from_vec(&reply)?;
    if reply.metadata.id != query.metadata.id {
        return Err("reply to another query".into());
    }
    Ok(reply)
}

async fn port_forward(ns: &str, pod: &str, port: u16) -> Result {
    let client = kube::Client::try_default().await?;
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(client, ns);
    let mut pf = pods.portforward(pod, &[port]).await?;
    let mut stream = pf.take_stream(port).ok_or("no stream")?;
    stream.write_all(b"ping through port-forward\n").await?;
    let mut buf = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await??;
    print!("{}", String::from_utf8_lossy(&buf[..n]));
    Ok(())
}

async fn load(addr: &str, conns: usize, bytes: usize) -> Result {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..conns {
        let addr = addr.to_owned();
        tasks.spawn(async move {
            let payload: Vec<u8> = (0..bytes).map(|j| (j.wrapping_mul(31) ^ i) as u8).collect();
            let stream = tokio::net::TcpStream::connect(&addr).await?;
            let (mut read, mut write) = stream.into_split();
            let sent = payload.clone();
            let writer = tokio::spawn(async move { write.write_all(&sent).await.map(|()| write) });
            let mut back = vec![0u8; bytes];
            tokio::time::timeout(Duration::from_secs(60), read.read_exact(&mut back)).await??;
            drop(writer.await??);
            if back != payload {
                return Err(std::io::Error::other(format!(
                    "connection {i}: data differs"
                )));
            }
            Ok::<_, std::io::Error>(())
        });
    }
    let mut ok = 0;
    while let Some(result) = tasks.join_next().await {
        result??;
        ok += 1;
    }
    println!("ok {ok}");
    Ok(())
}

/// The testbed's API server speaks only the WebSocket port-forward protocol, which kubectl
/// 1.33 does not use here: this stands in for `kubectl port-forward`.
async fn forward(ns: &str, pod: &str, local: u16, remote: u16) -> Result {
    // kubectl is a Go program: its connection to the API server is NODELAY.
    let client = kt_cli::cluster::kube_client(kube::Config::infer().await?)?;
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(client, ns);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", local)).await?;
    println!("forwarding 127.0.0.1:{local} -> {pod}:{remote}");
    loop {
        let (mut socket, _) = listener.accept().await?;
        let _ = socket.set_nodelay(true);
        let (pods, pod) = (pods.clone(), pod.to_owned());
        tokio::spawn(async move {
            let Ok(mut pf) = pods.portforward(&pod, &[remote]).await else {
                return;
            };
            if let Some(mut stream) = pf.take_stream(remote) {
                let _ = tokio::io::copy_bidirectional(&mut socket, &mut stream).await;
            }
        });
    }
}

async fn bulk(addr: &str, streams: usize, bytes: usize) -> Result {
    let mut connections = Vec::new();
    for _ in 0..streams {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        connections.push(stream);
    }
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for stream in connections {
        tasks.spawn(async move {
            let (mut read, mut write) = stream.into_split();
            let writer = tokio::spawn(async move {
                let chunk = vec![0x5au8; 128 * 1024];
                let mut left = bytes;
                while left > 0 {
                    let n = left.min(chunk.len());
                    write.write_all(&chunk[..n]).await?;
                    left -= n;
                }
                Ok::<_, std::io::Error>(write)
            });
            let mut buf = vec![0u8; 256 * 1024];
            let mut got = 0;
            while got < bytes {
                match read.read(&mut buf).await? {
                    0 => return Err(std::io::Error::other("echo closed early")),
                    n => got += n,
                }
            }
            drop(writer.await??);
            Ok::<_, std::io::Error>(())
        });
    }
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    println!("{:.6}", started.elapsed().as_secs_f64());
    Ok(())
}

async fn request_response(addr: &str, count: usize, size: usize) -> Result {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let request = vec![0x42u8; size];
    let mut reply = vec![0u8; size];
    let mut times = Vec::with_capacity(count);
    for _ in 0..count {
        let started = Instant::now();
        stream.write_all(&request).await?;
        stream.read_exact(&mut reply).await?;
        times.push(started.elapsed().as_secs_f64() * 1e6);
    }
    times.sort_by(f64::total_cmp);
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    println!("{:.1} {:.1}", at(0.50), at(0.99));
    Ok(())
}

/// Copies `from` to `to` until end of stream or the first error, then shuts `to` down (a
/// half-close, so the other direction can finish). Returns the bytes written.
async fn copy_counted(
    mut from: impl tokio::io::AsyncRead + Unpin,
    mut to: impl tokio::io::AsyncWrite + Unpin,
) -> u64 {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut buffer = vec![0; 64 * 1024];
    let mut copied = 0;
    while let Ok(n @ 1..) = from.read(&mut buffer).await {
        if to.write_all(&buffer[..n]).await.is_err() {
            break;
        }
        copied += n as u64;
    }
    let _ = to.shutdown().await;
    copied
}

/// `kt-tools connect-proxy`: see [`Tool::ConnectProxy`]. Lines go to stdout as they happen.
async fn connect_proxy(listen: &str) -> Result {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("listening {}", listener.local_addr()?);
    loop {
        let (mut client, _) = listener.accept().await?;
        tokio::spawn(async move {
            let _ = client.set_nodelay(true);
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") && head.len() < 16 * 1024 {
                match client.read_u8().await {
                    Ok(b) => head.push(b),
                    Err(_) => return,
                }
            }
            let head = String::from_utf8_lossy(&head).into_owned();
            let mut words = head.split_whitespace();
            let (method, target) = (
                words.next().unwrap_or_default(),
                words.next().unwrap_or_default(),
            );
            if method != "CONNECT" {
                let _ = client
                    .write_all(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
                    .await;
                return;
            }
            let target = target.to_owned();
            println!("CONNECT {target}");
            let mut upstream = match tokio::net::TcpStream::connect(&target).await {
                Ok(upstream) => upstream,
                Err(error) => {
                    println!("failed {target}: {error}");
                    let _ = client
                        .write_all(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
                        .await;
                    return;
                }
            };
            let _ = upstream.set_nodelay(true);
            if client
                .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await
                .is_err()
            {
                return;
            }
            // Counted per direction up to the end or the first error: a tunnel that ends
            // with a reset (ktctl interrupted) still carried its bytes, which
            // `copy_bidirectional` would report as none.
            let (client_read, client_write) = client.split();
            let (upstream_read, upstream_write) = upstream.split();
            let (up, down) = tokio::join!(
                copy_counted(client_read, upstream_write),
                copy_counted(upstream_read, client_write)
            );
            println!("closed {target} up={up} down={down}");
        });
    }
}
