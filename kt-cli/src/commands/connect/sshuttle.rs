//! `--mode sshuttle`: the system's `sshuttle` carries the traffic, logged in to the shadow's
//! SSH server through a local port that ktctl forwards to the pod's port 22 (ktctl v0.3.7
//! §3.2 step 5: the same command line, restarted 10 s after it exits). sshuttle runs its
//! server half as a Python program over SSH, so the shadow must be the v0.3.7 image (OpenSSH
//! in a container with Python); kt's own SSH servers carry channels only.

use std::{net::IpAddr, path::Path, time::Duration};

use k8s_openapi::api::core::v1::Pod;
use kt_proto::net::Cidr;
use kube::Api;
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// How long to wait before starting sshuttle again after it exits (v0.3.7's).
const RESTART_AFTER: Duration = Duration::from_secs(10);
/// How long sshuttle may take to take its rules away and exit before it is killed.
const STOP_WITHIN: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum SshuttleError {
    #[error(
        "sshuttle is not installed (it is packaged by most distributions: apt install sshuttle)"
    )]
    Missing,
    #[error(
        "sshuttle mode needs a shadow pod (kt's agent carries channels, not sshuttle's server)"
    )]
    NeedsShadow,
    #[error("failed to listen for sshuttle's SSH connection")]
    Listen(#[source] std::io::Error),
}

/// `sshuttle --version` runs.
pub(super) async fn check_installed() -> Result<(), SshuttleError> {
    match tokio::process::Command::new("sshuttle")
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await
    {
        Ok(status) if status.success() => Ok(()),
        _ => Err(SshuttleError::Missing),
    }
}

/// What sshuttle carries and how it logs in.
pub(super) struct Sshuttle<'a> {
    pub routes: &'a [Cidr],
    pub exclude: &'a [Cidr],
    pub key_file: &'a Path,
    /// `--dnsMode podDNS`: the shadow's address, whose DNS relay answers on UDP.
    pub pod_dns: Option<IpAddr>,
    pub debug: bool,
}

/// Forwards a local port to `pod`:22 and keeps sshuttle running over it until `stop`.
pub(super) async fn start(
    pods: Api<Pod>,
    pod: String,
    config: Sshuttle<'_>,
    tasks: &TaskTracker,
    stop: CancellationToken,
) -> Result<(), SshuttleError> {
    let listener = TcpListener::bind(("127.0.0.1", 0))
        .await
        .map_err(SshuttleError::Listen)?;
    let port = listener.local_addr().map_err(SshuttleError::Listen)?.port();
    tracing::info!("Port forward local:{port} -> pod {pod}:22 established");
    tasks.spawn(forward_port(
        listener,
        pods,
        pod,
        tasks.clone(),
        stop.clone(),
    ));
    let args = arguments(&config, port);
    tasks.spawn(async move {
        loop {
            tracing::info!("Starting sshuttle");
            tracing::debug!(?args, "sshuttle command line");
            let mut command = tokio::process::Command::new("sshuttle");
            command.args(&args).kill_on_drop(true);
            // Its own process group: a terminal's Ctrl-C reaches ktctl only, which then
            // stops sshuttle in the order that takes its firewall rules away.
            #[cfg(unix)]
            command.process_group(0);
            let child = command.spawn();
            match child {
                Ok(mut child) => {
                    tokio::select! {
                        () = stop.cancelled() => {
                            // SIGINT: sshuttle then has its firewall helper take the rules
                            // away and waits for it (on SIGTERM it would just die, leaving
                            // them behind until the helper notices).
                            // Its firewall helper takes the rules away after sshuttle itself
                            // has exited: wait for the helper too.
                            let helpers = child.id().map(descendants).unwrap_or_default();
                            #[cfg(unix)]
                            if let Some(pid) = child.id() {
                                // SAFETY: signalling the child this run started.
                                unsafe { libc::kill(pid as i32, libc::SIGINT) };
                            }
                            #[cfg(not(unix))]
                            let _ = child.start_kill();
                            let stopped = async {
                                let _ = child.wait().await;
                                until_gone(&helpers).await;
                            };
                            if tokio::time::timeout(STOP_WITHIN, stopped).await.is_err() {
                                let _ = child.kill().await;
                            }
                            return;
                        }
                        status = child.wait() => {
                            tracing::warn!("sshuttle exited ({}), restarting in {} s", status.map(|s| s.to_string()).unwrap_or_default(), RESTART_AFTER.as_secs());
                        }
                    }
                }
                Err(error) => tracing::warn!(%error, "failed to start sshuttle"),
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(RESTART_AFTER) => {}
            }
        }
    });
    Ok(())
}

/// The processes below `pid` (children, their children, …), from `/proc`: sshuttle's
/// firewall helper and the `sudo` it may run under.
fn descendants(pid: u32) -> Vec<i32> {
    let parents: Vec<(i32, i32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let child: i32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            // `pid (comm) state ppid …`; comm may hold spaces and parentheses.
            let parent = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some((child, parent))
        })
        .collect();
    let mut found = vec![pid as i32];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            parents
                .iter()
                .filter(|(_, p)| *p == parent)
                .map(|(c, _)| *c),
        );
        i += 1;
    }
    found.split_off(1)
}

/// Waits until none of `pids` runs any more (gone, or a zombie nobody has reaped yet).
async fn until_gone(pids: &[i32]) {
    let running = |pid: &i32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| Some(stat.rsplit_once(')')?.1.trim_start().starts_with('Z')))
            .is_some_and(|zombie| !zombie)
    };
    while pids.iter().any(running) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// v0.3.7's sshuttle command line, for a local port `port` to the shadow's SSH server.
fn arguments(config: &Sshuttle<'_>, port: u16) -> Vec<String> {
    let mut args = Vec::new();
    if let Some(dns) = config.pod_dns {
        args.extend(["--dns".to_owned(), "--to-ns".to_owned(), dns.to_string()]);
    }
    if config.debug {
        args.push("--verbose".into());
    }
    args.extend([
        "--ssh-cmd".to_owned(),
        format!(
            "ssh -oStrictHostKeyChecking=no -oUserKnownHostsFile=/dev/null -i {}",
            config.key_file.display()
        ),
        "--remote".to_owned(),
        format!("root@127.0.0.1:{port}"),
        "--exclude".to_owned(),
        "127.0.0.1".to_owned(),
    ]);
    for cidr in config.exclude {
        args.extend(["--exclude".to_owned(), cidr.to_string()]);
    }
    args.extend(config.routes.iter().map(ToString::to_string));
    args
}

/// Each connection to `listener` becomes a port-forward to `pod`:22 through the API server.
async fn forward_port(
    listener: TcpListener,
    pods: Api<Pod>,
    pod: String,
    tasks: TaskTracker,
    stop: CancellationToken,
) {
    loop {
        let (mut socket, _) = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(_) => continue,
            },
        };
        // Without it, Nagle held ktctl's partial segments to sshuttle's ssh until that
        // (non-interactive, so no TCP_NODELAY of its own) acknowledged the last: the
        // `connect` benchmark's sshuttle path went from 0.9 to 7 MiB/s with this.
        let _ = socket.set_nodelay(true);
        let (pods, pod, stop) = (pods.clone(), pod.clone(), stop.clone());
        tasks.spawn(async move {
            let mut forwarder = match pods.portforward(&pod, &[22]).await {
                Ok(forwarder) => forwarder,
                Err(error) => {
                    tracing::debug!(%error, "port-forward to the shadow failed");
                    return;
                }
            };
            let Some(mut stream) = forwarder.take_stream(22) else {
                return;
            };
            tokio::select! {
                () = stop.cancelled() => {}
                _ = tokio::io::copy_bidirectional(&mut socket, &mut stream) => {}
            }
            drop(stream);
            let _ = forwarder.join().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_v0_3_7s() {
        let routes = ["10.96.0.0/12".parse().unwrap()];
        let exclude = ["10.96.1.0/24".parse().unwrap()];
        let config = Sshuttle {
            routes: &routes,
            exclude: &exclude,
            key_file: Path::new("/root/.kt/key/kt-connect-shadow-abcde.key"),
            pod_dns: Some("10.244.1.5".parse().unwrap()),
            debug: false,
        };
        assert_eq!(
            arguments(&config, 40022).join(" "),
            "--dns --to-ns 10.244.1.5 --ssh-cmd ssh -oStrictHostKeyChecking=no -oUserKnownHostsFile=/dev/null -i /root/.kt/key/kt-connect-shadow-abcde.key --remote root@127.0.0.1:40022 --exclude 127.0.0.1 --exclude 10.96.1.0/24 10.96.0.0/12"
        );
    }
}
