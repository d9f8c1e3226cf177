//! `kt-testbed`: the simulated Kubernetes cluster as a command.
//!
//! ```text
//! kt-testbed up [--nodes N] [--dir D]     start in the background; prints how to use it
//! kt-testbed down [--dir D]               stop and remove everything (processes of `exec` too)
//! kt-testbed exec [--dir D] -- CMD...     run CMD in the workstation namespace
//! kt-testbed serve [--nodes N] [--dir D]  run in the foreground (what `up` starts)
//! ```
//! Internal, what pods run: `run-in-pod SPEC` (the kubelet's pod runner) and `image NAME`
//! (the programs behind the test images). The clients the suites run (`dig`, `load`,
//! `forward`, …) are `kt-tools`, in `tests/tools`.

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};
use kt_testbed::{
    cluster::{self, Options, Testbed},
    node::{
        dns, image_programs,
        runner::{BindMount, RunSpec, Symlink},
    },
};

const DEFAULT_DIR: &str = "/tmp/kt-testbed";

/// A simulated Kubernetes cluster in network namespaces (root): an API server kube-rs and
/// kubectl accept, controllers, a kubelet and kube-proxy per node, cluster DNS, and a
/// workstation namespace to run clients in.
#[derive(Parser)]
#[command(name = "kt-testbed", version)]
struct Cli {
    #[command(subcommand)]
    command: Verb,
}

#[derive(Subcommand)]
enum Verb {
    /// Starts a testbed in the background and prints the KUBECONFIG to use (~0.7 s).
    Up {
        #[command(flatten)]
        shape: Shape,
    },
    /// Stops the testbed and removes every namespace, cgroup, process and file it made,
    /// including the processes started with `exec`.
    Down {
        #[command(flatten)]
        state: StateDir,
    },
    /// Runs a command in the workstation namespace (where ktctl runs), with its own
    /// /etc/resolv.conf, /etc/hosts and $HOME; it is ended by `down` if still running.
    Exec {
        #[command(flatten)]
        state: StateDir,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Runs a testbed in the foreground until SIGTERM or Ctrl-C (what `up` starts).
    Serve {
        #[command(flatten)]
        shape: Shape,
    },
    /// The kubelet's pod runner: joins a pod's namespaces and cgroup, then execs its program.
    #[command(hide = true)]
    RunInPod {
        /// The JSON run spec the kubelet wrote.
        spec: PathBuf,
    },
    /// Runs the program behind a test image (http-echo, tcp-echo, udp-echo, sleep, dns,
    /// openssh-shadow).
    #[command(hide = true)]
    Image {
        /// The image's program.
        name: String,
        /// (openssh-shadow) The program that relays DNS when `KT_DNS_PROTOCOL` is set, as
        /// v0.3.7's image runs its own beside sshd: kt-node-agent's `dns-relay`.
        #[arg(long)]
        dns_relay: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct StateDir {
    /// Where the testbed keeps its state (pid, kubeconfigs, logs).
    #[arg(long, default_value = DEFAULT_DIR)]
    dir: PathBuf,
}

#[derive(clap::Args)]
struct Shape {
    /// How many nodes.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=9))]
    nodes: u8,
    #[command(flatten)]
    state: StateDir,
}

type Result<T = (), E = Box<dyn std::error::Error>> = std::result::Result<T, E>;

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Verb::RunInPod { spec } => return exec_failed(cluster::run_in_pod(&spec)),
        Verb::Image { name, dns_relay } if name == "openssh-shadow" => {
            return exec_failed(image_programs::openssh_shadow(dns_relay.as_deref()).unwrap_err());
        }
        Verb::Image { name, .. } => runtime(image(&name)),
        Verb::Serve { shape } => current_thread(serve(shape.state.dir, shape.nodes)),
        Verb::Up { shape } => up(&shape.state.dir, shape.nodes),
        Verb::Down { state } => down(&state.dir),
        Verb::Exec { state, command } => return exec(&state.dir, command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kt-testbed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// What a command that should have exec'd reports: 127, as a shell does.
fn exec_failed(e: std::io::Error) -> ExitCode {
    eprintln!("kt-testbed run-in-pod: {e}");
    ExitCode::from(127)
}

fn runtime(f: impl Future<Output = Result>) -> Result {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(f)
}

fn current_thread(f: impl Future<Output = Result>) -> Result {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

async fn image(name: &str) -> Result {
    match name {
        "http-echo" => image_programs::http_echo().await?,
        "tcp-echo" => image_programs::tcp_echo().await?,
        "udp-echo" => image_programs::udp_echo().await?,
        "sleep" => image_programs::sleep().await?,
        "dns" => dns::serve().await?,
        other => return Err(format!("unknown image {other}").into()),
    }
    Ok(())
}

/// Runs the testbed until SIGTERM or Ctrl-C. The testbed serves from a runtime of its own;
/// this one only waits for the signal.
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

fn up(dir: &Path, nodes: u8) -> Result {
    if dir.join("pid").exists() {
        return Err(format!(
            "a testbed already runs from {} (kt-testbed down --dir {0})",
            dir.display()
        )
        .into());
    }
    std::fs::create_dir_all(dir)?;
    let log = std::fs::File::create(dir.join("testbed.log"))?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["serve", "--dir"])
        .arg(dir)
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
/// /etc/resolv.conf and /etc/hosts (copies ktctl may edit), $HOME and $KUBECONFIG, a system
/// bus of the workstation's own ([`cluster::WORKSTATION_SYSTEM_BUS`]; the host's is
/// hidden), and what `workstation/mounts` lists (`bind SOURCE TARGET` or
/// `symlink PATH POINTS_TO` per line: what a test gives the workstation, systemd-resolved's
/// directories and an `/etc/resolv.conf` linked to its stub file, say). The command joins
/// the workstation's cgroup in the testbed's tree, so that stopping the testbed ends it too.
fn exec(dir: &Path, argv: Vec<String>) -> ExitCode {
    let env = std::fs::read_to_string(dir.join("env")).unwrap_or_default();
    let get = |key: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(String::from)
    };
    let (Some(netns), Some(kubeconfig), Some(cgroup)) = (
        get(cluster::ENV_WORKSTATION_NETNS),
        get(cluster::ENV_WORKSTATION_KUBECONFIG),
        get(cluster::ENV_WORKSTATION_CGROUP),
    ) else {
        eprintln!("kt-testbed: no testbed runs from {}", dir.display());
        return ExitCode::FAILURE;
    };
    let ws = dir.join("workstation");
    let home = ws.join("home");
    for (name, content) in [
        // The workstation's resolver (kt_testbed::upstream_dns) and its company's search
        // domain, as a laptop on an office network has them.
        (
            "resolv.conf",
            "search corp.example\nnameserver 172.30.0.1\noptions edns0\n",
        ),
        ("hosts", "127.0.0.1\tlocalhost\n"),
    ] {
        if !ws.join(name).exists() {
            let _ = std::fs::create_dir_all(&home);
            let _ = std::fs::write(ws.join(name), content);
        }
    }
    let mut env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| !["KUBECONFIG", "HOME", "DBUS_SYSTEM_BUS_ADDRESS"].contains(&k.as_str()))
        .collect();
    env.push(("KUBECONFIG".into(), kubeconfig));
    env.push(("HOME".into(), home.display().to_string()));
    // The workstation's own system bus, never the host's (whose systemd-resolved a test's
    // `resolvectl` must not reach): an abstract socket lives in the network namespace.
    env.push((
        "DBUS_SYSTEM_BUS_ADDRESS".into(),
        cluster::WORKSTATION_SYSTEM_BUS.into(),
    ));
    let (mut binds, mut symlinks) = (Vec::new(), Vec::new());
    let listed = std::fs::read_to_string(ws.join("mounts")).unwrap_or_default();
    for line in listed.lines().filter(|l| !l.trim().is_empty()) {
        match line.split_whitespace().collect::<Vec<_>>()[..] {
            ["bind", source, target] => binds.push(BindMount {
                source: source.into(),
                target: target.into(),
                read_only: false,
            }),
            ["symlink", path, points_to] => symlinks.push(Symlink {
                path: path.into(),
                points_to: points_to.into(),
            }),
            _ => {
                eprintln!(
                    "kt-testbed: {}: neither `bind SOURCE TARGET` nor `symlink PATH POINTS_TO`: {line}",
                    ws.join("mounts").display()
                );
                return ExitCode::FAILURE;
            }
        }
    }
    let mut mounts = Vec::new();
    for (file, target) in [("resolv.conf", "/etc/resolv.conf"), ("hosts", "/etc/hosts")] {
        if !symlinks.iter().any(|l| l.path == Path::new(target)) {
            mounts.push(BindMount {
                source: ws.join(file),
                target: target.into(),
                read_only: false,
            });
        }
    }
    // The host's system bus socket hidden, too.
    if Path::new("/run/dbus").is_dir() {
        let empty = ws.join("no-dbus");
        let _ = std::fs::create_dir_all(&empty);
        mounts.push(BindMount {
            source: empty,
            target: "/run/dbus".into(),
            read_only: true,
        });
    }
    mounts.extend(binds);
    let spec = RunSpec {
        cgroup: Some(cgroup.into()),
        netns: Some(netns.into()),
        join_pid: None,
        hostname: "workstation".into(),
        symlinks,
        mounts,
        // One per command: a mount target that does not exist is made in an overlay whose
        // upper and work directories no other mount may share.
        scratch: ws.join("scratch").join(std::process::id().to_string()),
        env,
        argv,
        cwd: std::env::current_dir().ok(),
        // The developer's workstation, not a container: root keeps its capabilities.
        security: Default::default(),
    };
    exec_failed(kt_testbed::node::runner::exec(&spec))
}
