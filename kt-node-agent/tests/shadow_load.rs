//! The shadow SSH server under parallel load, on loopback (no privileges): ktctl's side of
//! the tunnel (russh client with kt's settings, one `direct-tcpip` channel per local
//! connection, the shared bridge) against `shadow::serve`, each connection an echo round
//! trip. Many concurrent streams used to wedge a whole SSH connection (see kt-tunnel's
//! bridge); these tests pin that down.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use kt_node_agent::shadow;
use kt_tunnel::config::HostKeyPin;
use russh::{
    client,
    keys::{PrivateKey, PrivateKeyWithHashAlg, ssh_key::private::Ed25519Keypair},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// An echo server, a shadow, and a local listener forwarding each connection to the echo
/// server through one SSH connection: what `ktctl forward` sets up.
struct Rig {
    local: SocketAddr,
    stop: CancellationToken,
    tasks: TaskTracker,
    _dir: TempDir,
}

impl Rig {
    async fn start() -> Self {
        let dir = TempDir::new();
        let key = PrivateKey::from(Ed25519Keypair::from_seed(&rand::random()));
        let authorized = dir.0.join("authorized_keys");
        std::fs::write(&authorized, key.public_key().to_openssh().unwrap()).unwrap();

        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tasks.spawn(echo_server(echo, stop.clone()));

        let ssh_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ssh_addr = ssh_listener.local_addr().unwrap();
        let server = shadow::serve(ssh_listener, vec![authorized], stop.clone());
        tasks.spawn(async move { server.await.expect("the SSH server serves until stopped") });

        let transport = TcpStream::connect(ssh_addr).await.unwrap();
        transport.set_nodelay(true).unwrap();
        let (transport, reader) = kt_tunnel::transport::read_ahead(transport);
        let reader_stop = stop.clone();
        tasks.spawn(async move {
            tokio::select! {
                () = reader => {}
                () = reader_stop.cancelled() => {}
            }
        });
        let mut ssh = client::connect_stream(
            kt_tunnel::config::client(),
            transport,
            HostKeyPin::default(),
        )
        .await
        .unwrap();
        let auth = ssh
            .authenticate_publickey("root", PrivateKeyWithHashAlg::new(Arc::new(key), None))
            .await
            .unwrap();
        assert!(auth.success(), "the shadow refused the authorized key");
        let ssh = Arc::new(ssh);

        let local = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let local_addr = local.local_addr().unwrap();
        let (forward_stop, forward_tasks) = (stop.clone(), tasks.clone());
        tasks.spawn(async move {
            loop {
                let socket = tokio::select! {
                    () = forward_stop.cancelled() => return,
                    accepted = local.accept() => accepted.unwrap().0,
                };
                let (ssh, stop) = (ssh.clone(), forward_stop.clone());
                forward_tasks.spawn(async move {
                    let channel = ssh
                        .channel_open_direct_tcpip(
                            echo_addr.ip().to_string(),
                            u32::from(echo_addr.port()),
                            "127.0.0.1",
                            0,
                        )
                        .await
                        .unwrap();
                    tokio::select! {
                        result = kt_tunnel::bridge(channel, socket) => { result.unwrap(); }
                        () = stop.cancelled() => {}
                    }
                });
            }
        });
        Self {
            local: local_addr,
            stop,
            tasks,
            _dir: dir,
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

async fn echo_server(listener: TcpListener, stop: CancellationToken) {
    let tasks = TaskTracker::new();
    loop {
        let mut socket = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => accepted.unwrap().0,
        };
        tasks.spawn(async move {
            let (mut rx, mut tx) = socket.split();
            // Plain copy: it stops reading while its writes cannot drain, the behaviour
            // that used to close the wedge cycle.
            let _ = tokio::io::copy(&mut rx, &mut tx).await;
            let _ = tx.shutdown().await;
        });
    }
    tasks.close();
    tasks.wait().await;
}

/// Sends `len` bytes through the tunnel and checks the echo.
async fn round_trip(local: SocketAddr, len: usize, seed: u8) {
    let payload: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    let socket = TcpStream::connect(local).await.unwrap();
    let (mut rx, mut tx) = socket.into_split();
    let sent = payload.clone();
    let writer = tokio::spawn(async move {
        tx.write_all(&sent).await.unwrap();
        tx.shutdown().await.unwrap();
    });
    let mut echoed = Vec::with_capacity(len);
    rx.read_to_end(&mut echoed).await.unwrap();
    writer.await.unwrap();
    assert_eq!(echoed.len(), len, "stream {seed}: echo length");
    assert!(echoed == payload, "stream {seed}: echoed bytes differ");
}

async fn parallel_round_trips(streams: usize, len: usize) {
    let rig = Rig::start().await;
    let local = rig.local;
    let rounds: Vec<_> = (0..streams)
        .map(|i| tokio::spawn(round_trip(local, len, i as u8)))
        .collect();
    let all = async {
        for round in rounds {
            round.await.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(60), all)
        .await
        .unwrap_or_else(|_| panic!("{streams} × {len} bytes did not finish in 60 s: wedged"));
    // The same connection still carries new streams afterwards.
    tokio::time::timeout(Duration::from_secs(10), round_trip(local, 1024, 7))
        .await
        .expect("the tunnel stays usable after the load");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_streams_of_one_mebibyte_echo_intact() {
    parallel_round_trips(100, 1 << 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_stream_larger_than_the_inbound_buffer_echoes_intact() {
    parallel_round_trips(1, 64 << 20).await;
}

/// Flow control: a client that sends without ever reading its echo stalls once the windows
/// and socket buffers on its path are full (memory stays bounded), and meanwhile other
/// streams on the same SSH connection go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_never_reads_holds_back_only_itself() {
    let rig = Rig::start().await;
    let stalled = TcpStream::connect(rig.local).await.unwrap();
    let (_unread, mut tx) = stalled.into_split();
    let sent = Arc::new(AtomicU64::new(0));
    let counter = sent.clone();
    let writer = tokio::spawn(async move {
        let chunk = vec![7u8; 256 * 1024];
        loop {
            if tx.write_all(&chunk).await.is_err() {
                return;
            }
            counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
    });
    // Wait until the writer makes no progress for a second.
    let mut last = 0;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = sent.load(Ordering::Relaxed);
        if now == last {
            break;
        }
        assert!(
            now < STALL_BOUND,
            "{now} bytes accepted from a stream nobody reads: no flow control"
        );
        last = now;
    }
    tokio::time::timeout(Duration::from_secs(30), round_trip(rig.local, 16 << 20, 3))
        .await
        .expect("another stream on the same connection is held back by the stalled one");
    writer.abort();
    rig.stop().await;
}

/// What a stalled stream may take in before it stops: two SSH windows (8 MiB each, one per
/// direction) and a few socket buffers, well below this.
const STALL_BOUND: u64 = 128 << 20;

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let path = std::env::temp_dir().join(format!("ktt-shadow-{}", rand::random::<u32>()));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
