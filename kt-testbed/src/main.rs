//! `kt-testbed`: the simulated Kubernetes cluster as a command.
//!
//! ```text
//! kt-testbed up [--nodes N] [--dir D]     start in the background; prints how to use it
//! kt-testbed down [--dir D]               stop and remove everything
//! kt-testbed exec [--dir D] -- CMD...     run CMD in the workstation namespace
//! kt-testbed serve [--nodes N] [--dir D]  run in the foreground (what `up` starts)
//! ```
//! Internal: `run-in-pod SPEC` (the kubelet's pod runner), `image NAME` (test images),
//! `dig NAME [TYPE] [--server ADDR] [--tcp]` and `port-forward NS POD PORT` (tools the
//! suites run inside the cluster); `load`, `bulk`, `rr` (TCP echo clients) and
//! `forward NS POD LOCAL REMOTE` (a port-forward through the API server per connection, as
//! `kubectl port-forward` does), which the suites and benchmarks run on the workstation.

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    time::{Duration, Instant},
};

use kt_tests::testbed::{
    cluster::{self, Options, Testbed},
    runner::{BindMount, RunSpec},
};

const DEFAULT_DIR: &str = "/tmp/kt-testbed";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("image") if args.get(1).map(String::as_str) == Some("openssh-shadow") => {
            return fail(kt_tests::testbed::servers::openssh_shadow().unwrap_err());
        }
        Some("run-in-pod") => return fail(cluster::run_in_pod(Path::new(args.get(1).map(String::as_str).unwrap_or_default()))),
        Some("image") => runtime(image(args.get(1).map(String::as_str).unwrap_or_default())),
        Some("dig") => runtime(dig(&args[1..])),
        Some("port-forward") => runtime(port_forward(&args[1..])),
        Some("load") => runtime(load(&args[1..])),
        Some("forward") => runtime(forward(&args[1..])),
        Some("bulk") => runtime(bulk(&args[1..])),
        Some("rr") => runtime(request_response(&args[1..])),
        Some("serve") => runtime(serve(flag(&args, "--dir"), nodes(&args))),
        Some("up") => up(flag(&args, "--dir"), nodes(&args)),
        Some("down") => down(&flag(&args, "--dir")),
        Some("exec") => return exec(&flag(&args, "--dir"), args.iter().skip_while(|a| *a != "--").skip(1).cloned().collect()),
        _ => Err("usage: kt-testbed up|down|exec|serve [--nodes N] [--dir D] (see --help in the source header)".into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kt-testbed: {e}");
            ExitCode::FAILURE
        }
    }
}

type Result<T = (), E = Box<dyn std::error::Error>> = std::result::Result<T, E>;

fn fail(e: std::io::Error) -> ExitCode {
    eprintln!("kt-testbed run-in-pod: {e}");
    ExitCode::from(127)
}

fn flag(args: &[String], name: &str) -> PathBuf {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| DEFAULT_DIR.into())
}

fn nodes(args: &[String]) -> u8 {
    args.iter()
        .position(|a| a == "--nodes")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(2)
}

fn runtime(f: impl Future<Output = Result>) -> Result {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(f)
}

async fn image(name: &str) -> Result {
    use kt_tests::testbed::{dns, servers};
    match name {
        "http-echo" => servers::http_echo().await?,
        "tcp-echo" => servers::tcp_echo().await?,
        "udp-echo" => servers::udp_echo().await?,
        "sleep" => servers::sleep().await?,
        "dns" => dns::serve().await?,
        other => return Err(format!("unknown image {other}").into()),
    }
    Ok(())
}

/// `dig NAME [TYPE] [--server ADDR] [--tcp]`: asks the nameserver of /etc/resolv.conf (or
/// ADDR, `ip:port`) over UDP (or TCP); prints the rcode, then `NAME DATA` per answer.
async fn dig(args: &[String]) -> Result {
    use hickory_proto::{
        op::{Message, Query},
        rr::{Name, RecordType},
    };
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut positional = args.iter().filter(|a| !a.starts_with("--"));
    let name = positional
        .next()
        .ok_or("usage: dig NAME [TYPE] [--server ADDR] [--tcp]")?;
    let kind = positional.next().map_or("A", String::as_str);
    let server = match args.iter().position(|a| a == "--server") {
        Some(i) => args.get(i + 1).ok_or("--server needs ip:port")?.clone(),
        None => {
            let resolv = std::fs::read_to_string("/etc/resolv.conf")?;
            let ip = resolv
                .lines()
                .find_map(|l| l.strip_prefix("nameserver "))
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
    let reply = if args.iter().any(|a| a == "--tcp") {
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
    println!("rcode={}", reply.metadata.response_code);
    for answer in &reply.answers {
        println!("{} {}", answer.name, answer.data);
    }
    Ok(())
}

/// Port-forwards to POD:PORT with kube-rs (kubeconfig from $KUBECONFIG), sends a line and
/// prints what comes back: a check that port-forward works from where it runs.
async fn port_forward(args: &[String]) -> Result {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let [ns, pod, port] = args else {
        return Err("usage: port-forward NS POD PORT".into());
    };
    let port: u16 = port.parse()?;
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

/// `load ADDR CONNECTIONS BYTES`: CONNECTIONS parallel connections to a TCP echo, each
/// sending BYTES of a connection-specific pattern and checking that exactly those come
/// back; prints `ok CONNECTIONS`.
async fn load(args: &[String]) -> Result {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let [addr, conns, bytes] = args else {
        return Err("usage: load ADDR CONNECTIONS BYTES".into());
    };
    let (conns, bytes): (usize, usize) = (conns.parse()?, bytes.parse()?);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..conns {
        let addr = addr.clone();
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

/// `forward NS POD LOCAL_PORT REMOTE_PORT`: listens on 127.0.0.1:LOCAL_PORT and carries each
/// connection over its own API-server port-forward to the pod (what `kubectl port-forward`
/// does; the stand-in speaks only the WebSocket protocol kubectl 1.33 does not use here).
async fn forward(args: &[String]) -> Result {
    let [ns, pod, local, remote] = args else {
        return Err("usage: forward NS POD LOCAL_PORT REMOTE_PORT".into());
    };
    let (local, remote): (u16, u16) = (local.parse()?, remote.parse()?);
    // kubectl is a Go program: its connection to the API server is NODELAY.
    let client = kt_tunnel::transport::kube_client(kube::Config::infer().await?)?;
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(client, ns);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", local)).await?;
    println!("forwarding 127.0.0.1:{local} -> {pod}:{remote}");
    loop {
        let (mut socket, _) = listener.accept().await?;
        let _ = socket.set_nodelay(true);
        let (pods, pod) = (pods.clone(), pod.clone());
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

/// `bulk ADDR STREAMS BYTES`: STREAMS parallel connections to a TCP echo, each sending BYTES
/// while reading the echo back; prints the seconds until every echo is complete.
async fn bulk(args: &[String]) -> Result {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let [addr, streams, bytes] = args else {
        return Err("usage: bulk ADDR STREAMS BYTES".into());
    };
    let (streams, bytes): (usize, usize) = (streams.parse()?, bytes.parse()?);
    let mut connections = Vec::new();
    for _ in 0..streams {
        let stream = tokio::net::TcpStream::connect(addr.as_str()).await?;
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

/// `rr ADDR COUNT SIZE`: COUNT sequential round trips of SIZE bytes on one connection to a
/// TCP echo; prints the p50 and p99 round-trip time in microseconds.
async fn request_response(args: &[String]) -> Result {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let [addr, count, size] = args else {
        return Err("usage: rr ADDR COUNT SIZE".into());
    };
    let (count, size): (usize, usize) = (count.parse()?, size.parse()?);
    let mut stream = tokio::net::TcpStream::connect(addr.as_str()).await?;
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

async fn serve(dir: PathBuf, nodes: u8) -> Result {
    let exe = std::env::current_exe()?;
    let agent = exe.with_file_name("kt-node-agent");
    let started = Instant::now();
    let testbed = Testbed::start(Options {
        nodes,
        testbed_bin: exe,
        agent_bin: agent.exists().then_some(agent),
        dir: Some(dir.clone()),
    })
    .await?;
    std::fs::write(
        dir.join("ready"),
        format!("{}\n", started.elapsed().as_millis()),
    )?;
    eprintln!("kt-testbed: ready in {:?}", started.elapsed());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    testbed.stop().await;
    let _ = std::fs::remove_file(dir.join("ready"));
    let _ = std::fs::remove_file(dir.join("env"));
    Ok(())
}

fn up(dir: PathBuf, nodes: u8) -> Result {
    if dir.join("pid").exists() {
        return Err(format!(
            "a testbed already runs from {} (kt-testbed down --dir {0})",
            dir.display()
        )
        .into());
    }
    std::fs::create_dir_all(&dir)?;
    let log = std::fs::File::create(dir.join("testbed.log"))?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["serve", "--dir"])
        .arg(&dir)
        .args(["--nodes", &nodes.to_string()])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // Its own session, so that it outlives this command and its terminal.
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::setsid();
            Ok(())
        })
    };
    let mut child = cmd.spawn()?;
    std::fs::write(dir.join("pid"), child.id().to_string())?;
    let started = Instant::now();
    while !dir.join("ready").exists() {
        if started.elapsed() > Duration::from_secs(60) || child.try_wait()?.is_some() {
            let _ = std::fs::remove_file(dir.join("pid"));
            return Err(format!(
                "testbed did not start; see {}",
                dir.join("testbed.log").display()
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("{}", std::fs::read_to_string(dir.join("env"))?.trim_end());
    println!(
        "# ready in {} ms; run a command in the workstation: kt-testbed exec --dir {} -- CMD",
        started.elapsed().as_millis(),
        dir.display()
    );
    Ok(())
}

fn down(dir: &Path) -> Result {
    let Ok(pid) = std::fs::read_to_string(dir.join("pid")) else {
        return Err(format!("no testbed runs from {}", dir.display()).into());
    };
    let pid: i32 = pid.trim().parse()?;
    // SAFETY: signalling the testbed process this tool started (its pid file).
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let started = Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists() && started.elapsed() < Duration::from_secs(30)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    if Path::new(&format!("/proc/{pid}")).exists() {
        return Err(format!("testbed {pid} did not stop").into());
    }
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

/// Runs a command in the workstation namespace with a private mount namespace: its own
/// /etc/resolv.conf and /etc/hosts (copies ktctl may edit), $HOME and $KUBECONFIG.
fn exec(dir: &Path, argv: Vec<String>) -> ExitCode {
    let env = std::fs::read_to_string(dir.join("env")).unwrap_or_default();
    let get = |key: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(String::from)
    };
    let (Some(netns), Some(kubeconfig)) = (
        get("KT_TESTBED_WORKSTATION_NETNS"),
        get("KT_TESTBED_WORKSTATION_KUBECONFIG"),
    ) else {
        eprintln!("kt-testbed: no testbed runs from {}", dir.display());
        return ExitCode::FAILURE;
    };
    if argv.is_empty() {
        eprintln!("usage: kt-testbed exec [--dir D] -- CMD...");
        return ExitCode::FAILURE;
    }
    let ws = dir.join("workstation");
    let home = ws.join("home");
    for (name, content) in [
        ("resolv.conf", "nameserver 127.0.0.53\n"),
        ("hosts", "127.0.0.1\tlocalhost\n"),
    ] {
        if !ws.join(name).exists() {
            let _ = std::fs::create_dir_all(&home);
            let _ = std::fs::write(ws.join(name), content);
        }
    }
    let mut env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| k != "KUBECONFIG" && k != "HOME")
        .collect();
    env.push(("KUBECONFIG".into(), kubeconfig));
    env.push(("HOME".into(), home.display().to_string()));
    let spec = RunSpec {
        cgroup: None,
        netns: Some(netns.into()),
        join_pid: None,
        hostname: "workstation".into(),
        mounts: vec![
            BindMount {
                source: ws.join("resolv.conf"),
                target: "/etc/resolv.conf".into(),
                read_only: false,
            },
            BindMount {
                source: ws.join("hosts"),
                target: "/etc/hosts".into(),
                read_only: false,
            },
        ],
        scratch: ws.join("scratch"),
        env,
        argv,
        cwd: std::env::current_dir().ok(),
    };
    fail(kt_tests::testbed::runner::exec(&spec))
}
