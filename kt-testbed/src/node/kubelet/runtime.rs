//! A running pod's processes: each container started through `kt-testbed run-in-pod`,
//! supervised (restarts with back-off per `restartPolicy`, readiness probes, status reports)
//! and ended (SIGTERM, then SIGKILL after the grace period); and what the API server asks of
//! running pods (logs, a connection, a process: [`PodRuntime`]).

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use axum::body::Bytes;
use futures::{future::BoxFuture, stream::BoxStream};
use serde_json::{Value, json};
use tokio::process::{Child, Command};

use super::{Kubelets, Running, probe, volumes::Volumes};
use crate::{
    api::{PodRuntime, errors::ApiError, store::now_rfc3339},
    node::{netio, runner::RunSpec},
};

/// Everything one pod's containers run with, and their state.
pub(super) struct PodRun<'a> {
    pub(super) kubelet: &'a Kubelets,
    pub(super) pod: &'a Value,
    pub(super) running: &'a Running,
    pub(super) containers: Vec<Value>,
    /// Each container's program and arguments.
    pub(super) argvs: Vec<Vec<String>>,
    /// The pod's state directory.
    pub(super) dir: PathBuf,
    pub(super) volumes: Volumes,
    pub(super) pod_ip: Ipv4Addr,
    pub(super) host_ip: Ipv4Addr,
    pub(super) hostname: String,
    /// When the pod started (RFC 3339).
    pub(super) start: String,
    /// Each container's process while it runs.
    pub(super) children: Vec<Option<Child>>,
    pub(super) ready: Vec<bool>,
    pub(super) restarts: Vec<u32>,
    /// Each container's previous end, as `lastState` reports it (`{"terminated": …}`).
    pub(super) last_state: Vec<Value>,
}

/// A container's end as Kubernetes reports it: `exitCode` (128 + the signal when killed by
/// one), `reason` `Completed` or `Error`, `finishedAt`.
fn terminated(status: std::process::ExitStatus) -> Value {
    use std::os::unix::process::ExitStatusExt as _;
    let code = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1);
    json!({"terminated": {
        "exitCode": code,
        "reason": if code == 0 { "Completed" } else { "Error" },
        "finishedAt": now_rfc3339(),
    }})
}

impl PodRun<'_> {
    /// Starts every container and reports the pod Running.
    pub(super) async fn start_containers(&mut self) -> std::io::Result<()> {
        for c in &self.containers {
            let log = self
                .dir
                .join(format!("{}.log", c["name"].as_str().unwrap_or("c")));
            self.running
                .containers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(super::ContainerProcess { pid: None, log });
        }
        for i in 0..self.containers.len() {
            let child = self.spawn(i).await?;
            self.children.push(Some(child));
            self.restarts.push(0);
            self.last_state.push(json!({}));
        }
        self.start = now_rfc3339();
        self.ready = self
            .containers
            .iter()
            .map(|c| c.get("readinessProbe").is_none())
            .collect();
        self.report(None);
        Ok(())
    }

    /// Restarts containers that exit (per `restartPolicy`, with back-off) and probes
    /// readiness every 0.5 s, until the pod is terminated.
    pub(super) async fn supervise(&mut self) -> std::io::Result<()> {
        let period = Duration::from_millis(500);
        let mut probe_tick = tokio::time::interval(period);
        let terminate = self.running.terminate.clone();
        loop {
            let children = &mut self.children;
            let exited = async {
                loop {
                    for (i, child) in children.iter_mut().enumerate() {
                        if let Some(ch) = child
                            && let Ok(Some(status)) = ch.try_wait()
                        {
                            return (i, status);
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            };
            tokio::select! {
                () = terminate.cancelled() => return Ok(()),
                (i, status) = exited => {
                    if !self.exited(i, status, &terminate).await? {
                        return Ok(());
                    }
                }
                _ = probe_tick.tick() => self.probe_readiness().await,
            }
        }
    }

    /// Handles container `i`'s exit; whether to keep supervising.
    async fn exited(
        &mut self,
        i: usize,
        status: std::process::ExitStatus,
        terminate: &tokio_util::sync::CancellationToken,
    ) -> std::io::Result<bool> {
        self.children[i] = None;
        self.ready[i] = false;
        self.last_state[i] = terminated(status);
        let policy = self.pod["spec"]["restartPolicy"]
            .as_str()
            .unwrap_or("Always");
        let restart = policy == "Always" || (policy == "OnFailure" && !status.success());
        if !restart {
            if self.children.iter().all(Option::is_none) {
                let phase = if status.success() {
                    "Succeeded"
                } else {
                    "Failed"
                };
                self.report(Some(phase));
                terminate.cancelled().await;
                return Ok(false);
            }
            return Ok(true);
        }
        self.restarts[i] += 1;
        self.report(None);
        // CrashLoopBackOff: 1 s, 2 s, 4 s … capped at 10 s.
        let backoff =
            Duration::from_secs(1u64 << self.restarts[i].min(4)).min(Duration::from_secs(10));
        tokio::select! {
            () = terminate.cancelled() => return Ok(false),
            () = tokio::time::sleep(backoff) => {}
        }
        self.children[i] = Some(self.spawn(i).await?);
        self.ready[i] = self.containers[i].get("readinessProbe").is_none();
        self.report(None);
        Ok(true)
    }

    /// Runs every readiness probe once; reports when readiness changed.
    async fn probe_readiness(&mut self) {
        let mut changed = false;
        for (i, c) in self.containers.iter().enumerate() {
            let Some(check) = c.get("readinessProbe") else {
                continue;
            };
            let ok = self.children[i].is_some() && probe::passes(check, &self.running.netns).await;
            changed |= ok != self.ready[i];
            self.ready[i] = ok;
        }
        if changed {
            self.report(None);
        }
    }

    /// SIGTERM to every container, then SIGKILL to those still running after `grace`.
    pub(super) async fn terminate(&mut self, grace: Duration) {
        for child in self.children.iter().flatten() {
            if let Some(pid) = child.id() {
                // SAFETY: signalling a process this kubelet started.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
        }
        let deadline = tokio::time::Instant::now() + grace;
        for child in self.children.iter_mut().flatten() {
            if tokio::time::timeout_at(deadline, child.wait())
                .await
                .is_err()
            {
                let _ = child.start_kill();
                let _ = child.wait().await;
            }
        }
    }

    /// Starts container `index` through the pod runner, its output appended to its log.
    async fn spawn(&self, index: usize) -> std::io::Result<Child> {
        let container = &self.containers[index];
        let spec = RunSpec {
            cgroup: Some(self.running.cgroup.clone()),
            // hostNetwork pods join their node's namespace (never the host's).
            netns: Some(self.running.netns.clone()),
            join_pid: None,
            hostname: self.hostname.clone(),
            mounts: super::volumes::container_mounts(&self.dir, &self.volumes, container),
            scratch: self.dir.join(format!("scratch-{index}")),
            env: self
                .kubelet
                .env(self.pod, container, self.pod_ip, &self.hostname),
            argv: self.argvs[index].clone(),
            cwd: container["workingDir"].as_str().map(PathBuf::from),
        };
        let spec_path = self.dir.join(format!("run-{index}.json"));
        std::fs::write(&spec_path, serde_json::to_vec(&spec)?)?;
        let log_path = self
            .dir
            .join(format!("{}.log", container["name"].as_str().unwrap_or("c")));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let child = Command::new(&self.kubelet.catalog.testbed_bin)
            .arg("run-in-pod")
            .arg(&spec_path)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()?;
        if let Some(slot) = self
            .running
            .containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(index)
        {
            slot.pid = child.id();
        }
        Ok(child)
    }

    /// Writes the pod's status: Running (Ready when every container is), or `final_phase`.
    pub(super) fn report(&self, final_phase: Option<&str>) {
        let (ns, name) = (self.running.ns.as_str(), self.running.name.as_str());
        let (start, ready, restarts, last) =
            (&self.start, &self.ready, &self.restarts, &self.last_state);
        let (pod_ip, host_ip) = (self.pod_ip, self.host_ip);
        let all_ready = final_phase.is_none() && ready.iter().all(|r| *r);
        let cond = |t: &str, ok: bool| json!({"type": t, "status": if ok { "True" } else { "False" }, "lastTransitionTime": start});
        let statuses: Vec<Value> = self.containers.iter().enumerate().map(|(i, c)| {
            let (state, last_state) = match final_phase {
                Some(_) => (last[i].clone(), json!({})),
                None => (json!({"running": {"startedAt": start}}), last[i].clone()),
            };
            json!({"name": c["name"], "image": c["image"], "imageID": format!("kt-testbed://{}", c["image"].as_str().unwrap_or_default()),
                   "containerID": format!("kt-testbed://{ns}-{name}-{i}"), "ready": ready[i], "started": final_phase.is_none(),
                   "restartCount": restarts[i], "state": state, "lastState": last_state})
        }).collect();
        self.kubelet.set_status(ns, name, |s| {
            *s = json!({
                "phase": final_phase.unwrap_or("Running"),
                "podIP": pod_ip.to_string(), "podIPs": [{"ip": pod_ip.to_string()}],
                "hostIP": host_ip.to_string(), "hostIPs": [{"ip": host_ip.to_string()}],
                "startTime": start, "qosClass": "BestEffort",
                "conditions": [cond("PodReadyToStartContainers", true), cond("Initialized", true), cond("Ready", all_ready), cond("ContainersReady", all_ready), cond("PodScheduled", true)],
                "containerStatuses": statuses,
            });
        });
    }
}

impl PodRuntime for Kubelets {
    fn logs(
        &self,
        ns: &str,
        pod: &str,
        follow: bool,
    ) -> BoxFuture<'static, Result<BoxStream<'static, Bytes>, ApiError>> {
        let running = self.find(ns, pod);
        Box::pin(async move {
            let running =
                running.ok_or_else(|| ApiError::bad_request("container is not running"))?;
            let log = running
                .containers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .first()
                .map(|c| c.log.clone())
                .ok_or_else(|| ApiError::bad_request("pod has no containers"))?;
            let stream = futures::stream::unfold((0u64, false), move |(offset, finished)| {
                let (log, done) = (log.clone(), running.done.clone());
                async move {
                    if finished {
                        return None;
                    }
                    loop {
                        let data = tokio::fs::read(&log).await.unwrap_or_default();
                        if (data.len() as u64) > offset {
                            let chunk = Bytes::copy_from_slice(&data[offset as usize..]);
                            return Some((chunk, (data.len() as u64, !follow)));
                        }
                        if !follow || done.is_cancelled() {
                            return None;
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            });
            Ok(Box::pin(stream) as BoxStream<'static, Bytes>)
        })
    }

    fn dial(
        &self,
        ns: &str,
        pod: &str,
        port: u16,
    ) -> BoxFuture<'static, std::io::Result<tokio::net::TcpStream>> {
        let running = self.find(ns, pod);
        Box::pin(async move {
            let running = running.ok_or_else(|| std::io::Error::other("pod is not running"))?;
            netio::dial(&running.netns, SocketAddr::from(([127, 0, 0, 1], port))).await
        })
    }

    fn exec(
        &self,
        ns: &str,
        pod: &str,
        command: Vec<String>,
    ) -> BoxFuture<'static, Result<Child, ApiError>> {
        let running = self.find(ns, pod);
        let testbed_bin = self.catalog.testbed_bin.clone();
        let dir = self.state_dir.clone();
        Box::pin(async move {
            let running =
                running.ok_or_else(|| ApiError::bad_request("container is not running"))?;
            let pid = running
                .containers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .first()
                .and_then(|c| c.pid)
                .ok_or_else(|| ApiError::bad_request("container is not running"))?;
            let spec = RunSpec {
                cgroup: Some(running.cgroup.clone()),
                netns: Some(running.netns.clone()),
                join_pid: Some(pid),
                argv: command,
                env: vec![(
                    "PATH".into(),
                    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
                )],
                ..Default::default()
            };
            let path = dir.join(format!("exec-{}.json", rand::random::<u32>()));
            std::fs::write(
                &path,
                serde_json::to_vec(&spec).map_err(|e| ApiError::internal(e.to_string()))?,
            )
            .map_err(|e| ApiError::internal(e.to_string()))?;
            Command::new(testbed_bin)
                .arg("run-in-pod")
                .arg(&path)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| ApiError::internal(e.to_string()))
        })
    }
}
