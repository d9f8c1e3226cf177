//! Processes on the testbed's workstation (`kt-testbed exec`): one-shot commands, and
//! ktctl runs with their logs in the testbed directory.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus},
    time::Duration,
};

use kt_testbed::cluster::Testbed;

use super::bins;

/// The TCP echo Deployment and Service (`echo:9000`).
pub const ECHO: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: echo}
spec:
  replicas: 1
  selector: {matchLabels: {app: echo}}
  template:
    metadata: {labels: {app: echo}}
    spec:
      containers: [{name: e, image: kt-testbed/tcp-echo, ports: [{containerPort: 9000}], readinessProbe: {tcpSocket: {port: 9000}}}]
---
apiVersion: v1
kind: Service
metadata: {name: echo}
spec:
  selector: {app: echo}
  ports: [{port: 9000}]
"#;

/// A command in the workstation namespace; (exit ok, stdout).
pub fn run(tb: &Testbed, cmd: &[&str]) -> (bool, String) {
    let out = exec(tb).args(cmd).output().expect("kt-testbed exec runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// `kt-testbed exec` for the workstation, to add the command to.
pub fn exec(tb: &Testbed) -> Command {
    let mut command = Command::new(bins::kt_testbed());
    command.args(["exec", "--dir", tb.dir.to_str().expect("UTF-8 path"), "--"]);
    command
}

/// `env` assignments that run a program with its wall clock `offset` off (libfaketime's
/// syntax: `+1h`, `-30m`), monotonic clocks untouched: a workstation whose clock is wrong.
/// Preloaded through the environment (not the `faketime` wrapper, which forks: a SIGKILL
/// must reach the program itself). Panics when Debian's `faketime` package is missing.
pub fn clock_off(offset: &str) -> [String; 3] {
    let library = format!(
        "/usr/lib/{}-linux-gnu/faketime/libfaketimeMT.so.1",
        std::env::consts::ARCH
    );
    assert!(
        Path::new(&library).exists(),
        "{library} is missing: install Debian's faketime (tests/scripts/setup.sh does)"
    );
    [
        format!("LD_PRELOAD={library}"),
        format!("FAKETIME={offset}"),
        "FAKETIME_DONT_FAKE_MONOTONIC=1".to_owned(),
    ]
}

/// A long-running process in the workstation namespace (ktctl, a port-forward, ssh), its
/// output in a log file; killed when dropped.
pub struct Background {
    child: Child,
    log: PathBuf,
}

impl Background {
    pub fn spawn(tb: &Testbed, program: &Path, args: &[&str]) -> Self {
        let log = tb.dir.join(format!("ws-{}.log", super::unique_name("run")));
        let file = std::fs::File::create(&log).expect("log file");
        let child = exec(tb)
            .arg(program)
            .args(args)
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .expect("kt-testbed exec runs");
        Self { child, log }
    }

    /// ktctl with `args`.
    pub fn ktctl(tb: &Testbed, args: &[&str]) -> Self {
        Self::spawn(tb, &bins::ktctl(), args)
    }

    /// ktctl with `args` under `env` (`NAME=value` items, through `env(1)`: `USER=alice`
    /// names the developer, as [`ktctl_once`] takes them).
    pub fn ktctl_with_env(tb: &Testbed, env: &[&str], args: &[&str]) -> Self {
        let ktctl = bins::ktctl();
        let mut all: Vec<&str> = env.to_vec();
        all.push(bins::utf8(&ktctl));
        all.extend(args);
        Self::spawn(tb, Path::new("env"), &all)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`; panics with the log if the process exits or
    /// 60 s pass.
    pub async fn wait_for(&mut self, needle: &str) {
        for _ in 0..600 {
            if self.log().contains(needle) {
                return;
            }
            if let Some(status) = self.child.try_wait().expect("wait") {
                panic!("exited with {status}: {}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("not ready: {}", self.log());
    }

    /// The process id (for its RSS in /proc).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for ktctl's banner.
    pub async fn ready(&mut self) {
        self.wait_for("Now you can access").await;
    }

    /// Its exit status if it has exited, else `None`.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("wait")
    }

    /// Whether it still runs.
    pub fn is_running(&mut self) -> bool {
        self.try_wait().is_none()
    }

    /// Waits for it to exit by itself.
    pub fn wait(&mut self) -> ExitStatus {
        self.child.wait().expect("wait")
    }

    /// Kills it with SIGKILL (no cleanup can run) and waits for it.
    pub fn kill(mut self) -> ExitStatus {
        // SAFETY: signalling the process this harness started.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
        self.child.wait().expect("wait")
    }

    /// Stops it like Ctrl-C and waits for it (the runner exec'd the program: same pid).
    pub fn interrupt(self) -> (ExitStatus, String) {
        self.signal(libc::SIGINT)
    }

    /// Sends `signal` (SIGINT, SIGTERM, …) and waits for it to exit.
    pub fn signal(self, signal: libc::c_int) -> (ExitStatus, String) {
        self.send(signal);
        self.exited()
    }

    fn send(&self, signal: libc::c_int) {
        // SAFETY: signalling the process this harness started.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    fn exited(mut self) -> (ExitStatus, String) {
        let status = self.child.wait().expect("wait");
        (status, self.log())
    }
}

/// Stops every run in `runs` like Ctrl-C at once (all signalled first, so their cleanups
/// overlap), then waits for each; their exit statuses and logs, in `runs`' order.
pub fn interrupt_all(runs: Vec<Background>) -> Vec<(ExitStatus, String)> {
    for run in &runs {
        run.send(libc::SIGINT);
    }
    runs.into_iter().map(Background::exited).collect()
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `env ENV… ktctl ARGS…` run to its end on the workstation: (exit code, stderr).
pub fn ktctl_once(tb: &Testbed, env: &[&str], args: &[&str]) -> (Option<i32>, String) {
    let out = exec(tb)
        .arg("env")
        .args(env)
        .arg(bins::ktctl())
        .args(args)
        .output()
        .expect("ktctl runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A test server on the workstation (`kt-testbed image IMAGE` on `port`, all addresses),
/// named `workstation` in its answers.
pub fn test_server(tb: &Testbed, image: &str, port: u16) -> Background {
    named_test_server(tb, image, port, "workstation")
}

/// [`test_server`] named `name` in its answers (to tell two local apps apart).
pub fn named_test_server(tb: &Testbed, image: &str, port: u16, name: &str) -> Background {
    let testbed = bins::kt_testbed();
    Background::spawn(
        tb,
        Path::new("env"),
        &[
            &format!("PORT={port}"),
            &format!("HOSTNAME={name}"),
            bins::utf8(&testbed),
            "image",
            image,
        ],
    )
}

/// An HTTP echo on the workstation at `port` answering `pod=workstation`; returns once it
/// answers.
pub async fn http_echo(tb: &Testbed, port: u16) -> Background {
    named_http_echo(tb, port, "workstation").await
}

/// An HTTP echo on the workstation at `port` answering `pod=<name>`; returns once it answers.
pub async fn named_http_echo(tb: &Testbed, port: u16, name: &str) -> Background {
    let app = named_test_server(tb, "http-echo", port, name);
    let url = format!("http://127.0.0.1:{port}/");
    for _ in 0..50 {
        if run(tb, &["curl", "-s", "--max-time", "1", &url]).0 {
            return app;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the local app did not start: {}", app.log());
}

/// A local nginx on the workstation (Debian's, as a developer runs one) serving `page` as
/// its index on `port`, its files in the testbed's directory; returns once it answers.
pub async fn nginx(tb: &Testbed, port: u16, page: &str) -> Background {
    let dir = tb.dir.join(super::unique_name("local-nginx"));
    let html = dir.join("html");
    std::fs::create_dir_all(&html).expect("nginx directory");
    std::fs::write(html.join("index.html"), format!("{page}\n")).expect("page");
    let d = dir.display();
    let conf = format!(
        "daemon off;\nuser root;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log stderr notice;\n\
         events {{}}\n\
         http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
           fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
           server {{ listen {port}; location / {{ root {d}/html; index index.html; }} }}\n}}\n"
    );
    let conf_file = dir.join("nginx.conf");
    std::fs::write(&conf_file, conf).expect("nginx.conf");
    let app = Background::spawn(
        tb,
        Path::new("nginx"),
        &["-c", bins::utf8(&conf_file), "-e", "stderr"],
    );
    let url = format!("http://127.0.0.1:{port}/");
    for _ in 0..50 {
        if run(tb, &["curl", "-sf", "--max-time", "1", &url]).1.trim() == page {
            return app;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the local nginx did not start: {}", app.log());
}

/// `kt-tools forward`: 127.0.0.1:`local` on the workstation to `pod`:`remote` (namespace
/// `default`) through the API server, a port-forward per connection; returns once it listens.
pub async fn forward_to_pod(tb: &Testbed, pod: &str, local: u16, remote: u16) -> Background {
    let (local, remote) = (local.to_string(), remote.to_string());
    let mut forward = Background::spawn(
        tb,
        &bins::kt_tools(),
        &["forward", "default", pod, &local, &remote],
    );
    forward.wait_for("forwarding").await;
    forward
}

/// Routes the pod ranges via their nodes inside the workstation namespace, as a flat network
/// or a VPN would make them reachable (nothing changes on the host).
pub fn route_pods_via_nodes(tb: &Testbed) {
    let topology = tb.topology();
    for node in &topology.nodes {
        let (cidr, via) = (
            kt_testbed::topology::pod_cidr(node.index),
            node.ip().to_string(),
        );
        let out = topology
            .workstation
            .ip(&["route", "add", &cidr, "via", &via])
            .expect("ip runs");
        assert!(out.status.success(), "{out:?}");
    }
}

/// The image ktctl v0.3.7 runs as its shadow (OpenSSH `sshd` in the testbed).
pub const OPENSSH_SHADOW: &str =
    "registry.cn-hangzhou.aliyuncs.com/rdc-incubator/kt-connect-shadow:v0.3.7";

/// OpenSSH's `ssh -N` on the workstation through the v0.3.7 shadow, itself reached over a
/// port-forward to its port 22 (local port 17022): how v0.3.7 carries traffic. `forward` is
/// `["-L", spec]` or `["-R", spec]`.
pub struct OpensshPath {
    pub ssh: Background,
    pub port_forward: Background,
    pub shadow_ip: String,
}

impl OpensshPath {
    pub async fn start(tb: &Testbed, forward: [&str; 2]) -> Self {
        let (key, shadow_ip) = super::apps::deploy_shadow(tb, OPENSSH_SHADOW, &[], &[], "ed25519");
        let port_forward = forward_to_pod(tb, "kt-connect-shadow-abcde", 17022, 22).await;
        let key = key.to_str().expect("UTF-8 path");
        let mut args = vec!["-N", "-p", "17022", "-i", key];
        args.extend(super::SSH_THROWAWAY);
        args.extend(["-o", "LogLevel=VERBOSE", "-o", "ExitOnForwardFailure=yes"]);
        args.extend(forward);
        args.push("root@127.0.0.1");
        let ssh = Background::spawn(tb, Path::new("ssh"), &args);
        Self {
            ssh,
            port_forward,
            shadow_ip,
        }
    }
}

/// Runs `kt-tools ARGS` on the workstation: stdout, or stderr if it failed (an
/// [`super::echo_bench::EchoClient`]).
pub fn tools_command(tb: &Testbed) -> impl super::echo_bench::EchoClient {
    let tools = bins::kt_tools();
    super::echo_bench::command_client(move || {
        let mut command = exec(tb);
        command.arg(&tools);
        command
    })
}
