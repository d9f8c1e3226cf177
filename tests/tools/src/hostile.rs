//! `kt-tools hostile`: connections that never become a session, held against a server to
//! see what it keeps. Three kinds per address: `garbage` (random bytes: a 16 KiB burst,
//! then 1 KiB every 100 ms), `slowloris` (`SSH-2.0-` and then one `a` every 500 ms: a
//! version line, or an HTTP request line, that never ends) and `idle` (connected, nothing
//! sent: half-open as far as the server's protocol goes).
//!
//! Output: `ready opened=N failed=N` once every connection has been tried; after the hold,
//! one line per kind and address, `KIND ADDR opened=N failed=N closed=N closed_p50_ms=X
//! closed_max_ms=Y`, where `closed` counts the connections the server ended (end of file
//! or a reset) before the hold was over, timed from their connect.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use rand::RngCore as _;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    sync::{Semaphore, mpsc, watch},
};

/// Connects in flight at once: a burst of 10 000 SYNs at a listener would mostly overflow its
/// backlog and measure the kernel's retransmission timer, not the server.
const CONNECTS_IN_FLIGHT: usize = 256;

/// A connect that takes longer counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Garbage,
    Slowloris,
    Idle,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Garbage => "garbage",
            Kind::Slowloris => "slowloris",
            Kind::Idle => "idle",
        }
    }
}

/// What became of one connection.
struct Outcome {
    kind: Kind,
    addr: SocketAddr,
    opened: bool,
    /// When the server ended it, since its connect.
    closed_after: Option<Duration>,
}

/// Raises this process's soft `RLIMIT_NOFILE` to its hard limit (each connection is a
/// descriptor); returns the new soft limit.
fn raise_nofile() -> std::io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        limit.rlim_cur = limit.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(limit.rlim_cur)
}

/// Opens `garbage`, `slowloris` and `idle` connections to each of `addrs`, prints `ready`,
/// holds them for `hold`, then prints what the servers did (module docs).
pub(crate) async fn run(
    addrs: &[String],
    garbage: usize,
    slowloris: usize,
    idle: usize,
    hold: Duration,
) -> crate::Result {
    let nofile = raise_nofile()?;
    let wanted = addrs.len() * (garbage + slowloris + idle);
    if (nofile as usize) < wanted + 64 {
        return Err(format!("RLIMIT_NOFILE is {nofile}, {wanted} connections wanted").into());
    }
    let mut targets = Vec::new();
    for addr in addrs {
        let resolved = tokio::net::lookup_host(addr.as_str())
            .await?
            .next()
            .ok_or_else(|| format!("{addr} has no address"))?;
        targets.push(resolved);
    }
    let gate = Arc::new(Semaphore::new(CONNECTS_IN_FLIGHT));
    let (stop_tx, stop) = watch::channel(false);
    let (tried_tx, mut tried) = mpsc::unbounded_channel::<bool>();
    let mut connections = Vec::with_capacity(wanted);
    let (mut opened, mut failed) = (0, 0);
    // One kind after the other, garbage and slowloris first, so that they are among the
    // connections a server with a per-source limit admits (and its parsers and timers are
    // what ends them), not the half-open flood.
    for (kind, count) in [
        (Kind::Garbage, garbage),
        (Kind::Slowloris, slowloris),
        (Kind::Idle, idle),
    ] {
        for _ in 0..count {
            for &addr in &targets {
                let (gate, stop, tried_tx) = (gate.clone(), stop.clone(), tried_tx.clone());
                connections.push(tokio::spawn(async move {
                    let connected = {
                        let _turn = gate.acquire().await;
                        tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await
                    };
                    let Ok(Ok(stream)) = connected else {
                        let _ = tried_tx.send(false);
                        return Outcome {
                            kind,
                            addr,
                            opened: false,
                            closed_after: None,
                        };
                    };
                    let _ = tried_tx.send(true);
                    let closed_after = hold_one(kind, stream, stop).await;
                    Outcome {
                        kind,
                        addr,
                        opened: true,
                        closed_after,
                    }
                }));
            }
        }
        for _ in 0..count * targets.len() {
            match tried.recv().await {
                Some(true) => opened += 1,
                Some(false) => failed += 1,
                None => break,
            }
        }
    }
    println!("ready opened={opened} failed={failed}");
    tokio::time::sleep(hold).await;
    let _ = stop_tx.send(true);
    let mut report: BTreeMap<(Kind, SocketAddr), (usize, usize, Vec<f64>)> = BTreeMap::new();
    for connection in connections {
        let outcome = connection.await?;
        let entry = report.entry((outcome.kind, outcome.addr)).or_default();
        if outcome.opened {
            entry.0 += 1;
        } else {
            entry.1 += 1;
        }
        if let Some(after) = outcome.closed_after {
            entry.2.push(after.as_secs_f64() * 1e3);
        }
    }
    for ((kind, addr), (opened, failed, mut closed)) in report {
        closed.sort_by(f64::total_cmp);
        let p50 = closed.get(closed.len() / 2).copied().unwrap_or(0.0);
        let max = closed.last().copied().unwrap_or(0.0);
        println!(
            "{} {addr} opened={opened} failed={failed} closed={} closed_p50_ms={p50:.0} closed_max_ms={max:.0}",
            kind.name(),
            closed.len()
        );
    }
    Ok(())
}

/// Plays `kind` on `stream` until the server ends it (returns when, since the connect) or
/// `stop` turns true (returns `None`).
async fn hold_one(
    kind: Kind,
    stream: TcpStream,
    mut stop: watch::Receiver<bool>,
) -> Option<Duration> {
    let started = Instant::now();
    let (mut rx, mut tx) = stream.into_split();
    // The server's end: end of file or an error on reading. What it sends (an SSH version
    // line, an HTTP 400) is read and dropped.
    let ended = async move {
        let mut buf = [0u8; 4096];
        loop {
            match rx.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    let play = async move {
        match kind {
            Kind::Idle => std::future::pending::<()>().await,
            Kind::Garbage => {
                let mut bytes = vec![0u8; 16 * 1024];
                rand::rng().fill_bytes(&mut bytes);
                if tx.write_all(&bytes).await.is_err() {
                    return;
                }
                loop {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    rand::rng().fill_bytes(&mut bytes[..1024]);
                    if tx.write_all(&bytes[..1024]).await.is_err() {
                        return;
                    }
                }
            }
            Kind::Slowloris => {
                if tx.write_all(b"SSH-2.0-").await.is_err() {
                    return;
                }
                loop {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    if tx.write_all(b"a").await.is_err() {
                        return;
                    }
                }
            }
        }
        // A write failed: the server reset the connection. Its end is seen by the reader.
        std::future::pending::<()>().await
    };
    tokio::select! {
        () = ended => Some(started.elapsed()),
        () = play => None,
        _ = stop.wait_for(|stop| *stop) => None,
    }
}
