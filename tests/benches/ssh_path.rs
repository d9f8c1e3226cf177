//! kt's SSH data path alone, without a cluster: what the tunnel costs over plain TCP on this
//! machine, and how close it gets to the best any two-process userspace tunnel can do here.
//!
//! All in a private network namespace of the benchmark (loopback only), to an echo server
//! (`kt-testbed image tcp-echo`):
//! - `plain`: straight to the echo server (the baseline);
//! - `kt`: kt's SSH client (russh with kt's settings, the read-ahead transport, one
//!   `direct-tcpip` channel per connection over one SSH connection, kt's bridge: ktctl with
//!   `--sshConnections 1`), in this process, to kt's SSH server (`kt-node-agent shadow`) in
//!   its own process, which dials the echo server: the two SSH ends of agent-direct
//!   exchange and of `ktctl forward`;
//! - `ssh -L`: OpenSSH's client forwarding through the same kt server, with the cipher kt
//!   negotiates (AES-128-GCM; OpenSSH's own first choice is ChaCha20-Poly1305);
//! - `2 relays`: two chained userspace relays (tokio's `copy_bidirectional`, 64 KiB
//!   buffers), no SSH, no encryption: the same two extra hops of socket copies. A reference
//!   for what two userspace ends of a tunnel cost on this machine's cores, not a hard bound
//!   (`splice` or larger buffers could beat it).
//!
//! Measured with the echo clients the tunnel benchmark uses (1 × 64 MiB, 8 × 8 MiB, 2 000
//! round trips of 64 B); rounds interleave the paths, medians over `KT_BENCH_ROUNDS` (default
//! 5). Results: a table, ratios and `target/kt-bench/ssh_path.json`.
//! `KT_BENCH_PERF=1` also records a profile of every process while the `kt` path carries
//! its 8 streams (`perf record -a`, cpu-clock, into `target/kt-bench/ssh_path.perf.data`).
//! Run as root: `cargo bench -p kt-tests --bench ssh_path` (README: `tests/run bench`).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::Duration,
};

use kt_tests::harness::{
    SSH_THROWAWAY, bench_rounds,
    bins::{self, utf8},
    echo_bench,
    results::Results,
    run_bench,
};
use kt_tunnel::config::HostKeyPin;
use russh::{client, keys::PrivateKeyWithHashAlg};
use tokio::{
    io::copy_bidirectional_with_sizes,
    net::{TcpListener, TcpStream},
    task::JoinSet,
};

const ECHO: &str = "127.0.0.1:9000";
const KT_SERVER: &str = "127.0.0.1:2222";
/// Local ports of the paths: (name, port).
const PATHS: [(&str, u16); 4] = [
    ("plain", 9000),
    ("kt", 9001),
    ("ssh -L", 9002),
    ("2 relays", 9003),
];
/// The relays' buffers, each direction (what a tuned relay uses; tokio's default is 8 KiB).
const RELAY_BUFFER: usize = 64 * 1024;

fn main() {
    // The namespace is the calling thread's, and threads inherit it: enter it before the
    // runtime starts its workers. Processes started from here inherit it too; it goes away
    // with the last of them.
    // SAFETY: getuid and unshare have no memory-safety preconditions.
    if unsafe { libc::getuid() } == 0 && unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        panic!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
    }
    run_bench("ssh_path", run());
}

/// A process of the benchmark, killed (by its pid) and reaped on drop; one that had
/// already exited by itself is named then, as the likely cause of a failure.
struct Process {
    child: Child,
    name: &'static str,
    reaped: bool,
}

impl Process {
    fn spawn(name: &'static str, command: &mut Command) -> Self {
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| panic!("{name} starts: {error}"));
        Self {
            child,
            name,
            reaped: false,
        }
    }

    /// SIGINT, then waits for the process to exit.
    fn interrupt(mut self) {
        // SAFETY: kill on the pid of a child this benchmark started and has not reaped.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
        let _ = self.child.wait();
        self.reaped = true;
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.reaped {
            return;
        }
        if let Ok(Some(status)) = self.child.try_wait() {
            eprintln!("{} had exited: {status}", self.name);
            return;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The benchmark's files (the SSH key pair, authorized_keys), removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn run() {
    let rounds = bench_rounds(5);
    let up = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .expect("ip runs");
    assert!(up.success(), "loopback up in the benchmark's namespace");

    let scratch =
        Scratch(std::env::temp_dir().join(format!("kt-bench-ssh-path-{}", std::process::id())));
    std::fs::create_dir_all(&scratch.0).expect("scratch directory");
    let key = scratch.0.join("id_ed25519");
    let keygen = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f", utf8(&key)])
        .status()
        .expect("ssh-keygen runs");
    assert!(keygen.success(), "ssh-keygen");
    let authorized = scratch.0.join("authorized_keys");
    std::fs::copy(key.with_extension("pub"), &authorized).expect("authorized_keys");

    let echo = Process::spawn(
        "tcp-echo",
        Command::new(bins::kt_testbed())
            .args(["image", "tcp-echo"])
            .env("PORT", "9000"),
    );
    let server = Process::spawn(
        "kt-node-agent shadow",
        Command::new(bins::kt_node_agent()).args([
            "shadow",
            "--listen",
            KT_SERVER,
            "--authorized-keys",
            utf8(&authorized),
        ]),
    );
    wait_for_listener(ECHO).await;
    wait_for_listener(KT_SERVER).await;

    let mut tasks = JoinSet::new();
    tasks.spawn(kt_forward(port_addr(9001), &key).await);
    // No user or system configuration, agent or multiplexing: only these options count.
    let mut ssh_args = vec!["-F", "/dev/null", "-N", "-p", "2222", "-i", utf8(&key)];
    ssh_args.extend(SSH_THROWAWAY);
    ssh_args.extend([
        "-o",
        "ExitOnForwardFailure=yes",
        "-o",
        "IdentitiesOnly=yes",
        "-c",
        "aes128-gcm@openssh.com",
        "-L",
        "127.0.0.1:9002:127.0.0.1:9000",
        "root@127.0.0.1",
    ]);
    let openssh = Process::spawn("ssh -L", Command::new("ssh").args(&ssh_args));
    let second_relay = TcpListener::bind("127.0.0.1:9004").await.expect("bind");
    tasks.spawn(relay(second_relay, ECHO.parse().expect("address")));
    let first_relay = TcpListener::bind(port_addr(9003)).await.expect("bind");
    tasks.spawn(relay(first_relay, port_addr(9004)));

    let tools = bins::kt_tools();
    let client = echo_bench::command_client(move || Command::new(&tools));
    let paths: Vec<(&str, String)> = PATHS
        .iter()
        .map(|&(name, port)| (name, port_addr(port).to_string()))
        .collect();
    for (_, addr) in &paths {
        echo_bench::wait_until_echoes(&client, addr, &[]).await;
    }

    let samples = echo_bench::measure(&paths, rounds, &client);
    let mut results = Results::new("ssh_path");
    let rows = echo_bench::record(&mut results, &paths, &samples);
    echo_bench::print_table(
        &format!("SSH path benchmark (loopback, no cluster), medians of {rounds} rounds"),
        &paths,
        &rows,
    );
    let row = |name: &str| &rows[PATHS.iter().position(|(n, _)| *n == name).expect("path")];
    for (a, b) in [
        ("kt", "plain"),
        ("ssh -L", "plain"),
        ("2 relays", "plain"),
        ("kt", "ssh -L"),
        ("kt", "2 relays"),
    ] {
        echo_bench::print_ratio(a, row(a), b, row(b));
        echo_bench::record_ratio(&mut results, a, b);
    }
    results.write();
    if std::env::var_os("KT_BENCH_PERF").is_some() {
        profile_kt_path(&client);
    }

    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    drop((openssh, server, echo, scratch));
}

fn port_addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

async fn wait_for_listener(addr: &str) {
    for _ in 0..100 {
        if TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("nothing listens on {addr} after 5 s");
}

/// ktctl's forwarding, in process: one SSH connection to kt's server with kt's settings and
/// transport, and for every connection accepted on `local` a `direct-tcpip` channel to the
/// echo server bridged with kt's bridge. Returns the accept loop, to spawn.
async fn kt_forward(local: SocketAddr, key: &Path) -> impl Future<Output = ()> + Send + 'static {
    let key = russh::keys::load_secret_key(key, None).expect("the benchmark's key");
    let transport = TcpStream::connect(KT_SERVER).await.expect("kt's server");
    transport.set_nodelay(true).expect("TCP_NODELAY");
    let (transport, reader) = kt_tunnel::transport::read_ahead(transport);
    let reader = tokio::spawn(reader);
    let mut ssh = client::connect_stream(
        kt_tunnel::config::client(),
        transport,
        HostKeyPin::default(),
    )
    .await
    .expect("SSH handshake with kt's server");
    let auth = ssh
        .authenticate_publickey("root", PrivateKeyWithHashAlg::new(Arc::new(key), None))
        .await
        .expect("authentication");
    assert!(auth.success(), "kt's server refused the benchmark's key");
    let ssh = Arc::new(ssh);
    let listener = TcpListener::bind(local).await.expect("bind");
    async move {
        let mut bridges = JoinSet::new();
        while let Ok((socket, _)) = listener.accept().await {
            // As ktctl's listeners do.
            let _ = socket.set_nodelay(true);
            let ssh = ssh.clone();
            bridges.spawn(async move {
                let channel = ssh
                    .channel_open_direct_tcpip("127.0.0.1", 9000, "127.0.0.1", 0)
                    .await
                    .expect("direct-tcpip channel");
                let _ = kt_tunnel::bridge(channel, socket).await;
            });
            while bridges.try_join_next().is_some() {}
        }
        // (Aborted with the benchmark's tasks; the reader ends with the SSH session.)
        drop(reader);
    }
}

/// Relays every connection accepted on `listener` to `to`. Runs until aborted.
async fn relay(listener: TcpListener, to: SocketAddr) {
    let mut relays = JoinSet::new();
    while let Ok((mut inbound, _)) = listener.accept().await {
        relays.spawn(async move {
            let mut outbound = TcpStream::connect(to).await.expect("relay target");
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            let _ = copy_bidirectional_with_sizes(
                &mut inbound,
                &mut outbound,
                RELAY_BUFFER,
                RELAY_BUFFER,
            )
            .await;
        });
        while relays.try_join_next().is_some() {}
    }
}

/// `perf record -a` (cpu-clock, call graphs) while the `kt` path carries 8 streams × 8 MiB,
/// into `target/kt-bench/ssh_path.perf.data`: every process of the path is in it. After the
/// measurements, so that a missing `perf` costs only the profile.
fn profile_kt_path(client: &impl echo_bench::EchoClient) {
    let out = Results::path_of("ssh_path").with_extension("perf.data");
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).expect("target/kt-bench");
    }
    let perf = Process::spawn(
        "perf record",
        Command::new("perf").args([
            "record",
            "-e",
            "cpu-clock",
            "-F",
            "1000",
            "--call-graph",
            "dwarf,16384",
            "-a",
            "-o",
            utf8(&out),
        ]),
    );
    std::thread::sleep(Duration::from_millis(500));
    let kt = port_addr(9001).to_string();
    client(&["bulk", &kt, "8", &(8 << 20).to_string()]).expect("bulk through kt");
    // On SIGINT perf writes its file and exits.
    perf.interrupt();
    eprintln!("profile of the kt path: {}", out.display());
}
