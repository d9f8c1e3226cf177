//! A running pod's processes: each container started through `kt-testbed run-in-pod`,
//! supervised (restarts with back-off per `restartPolicy`, readiness probes, status reports,
//! the events a kubelet writes) and ended (the image's stop signal, then SIGKILL after the
//! grace period); and what the API server asks of running pods (logs, a connection, a
//! process: [`PodRuntime`]).

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
    controllers::events::{EventType, Involved},
    node::{images::Image, netio, runner::RunSpec, security},
};

/// Everything one pod's containers run with, and their state.
pub(super) struct PodRun<'a> {
    pub(super) kubelet: &'a Kubelets,
    /// The node's name (the kubelet's, in events).
    pub(super) node: &'a str,
    pub(super) pod: &'a Value,
    pub(super) running: &'a Running,
    pub(super) containers: Vec<Value>,
    /// Each container's image.
    pub(super) images: Vec<Image>,
    /// The pod's state directory.
    pub(super) dir: PathBuf,
    pub(super) volumes: Volumes,
    pub(super) pod_ip: Ipv4Addr,
    pub(super) host_ip: Ipv4Addr,
    pub(super) hostname: String,
    /// When the pod started (RFC 3339).
    pub(super) start: String,
    /// When the pod's Ready condition last changed, and what it was last reported as.
    pub(super) ready_since: String,
    pub(super) reported_ready: bool,
    /// Each container's process while it runs.
    pub(super) children: Vec<Option<Child>>,
    /// When each container last started.
    pub(super) started_at: Vec<String>,
    pub(super) ready: Vec<bool>,
    /// Whether each container's last readiness probe failed (reported once per failure
    /// streak, as an `Unhealthy` event).
    pub(super) probe_failed: Vec<bool>,
    pub(super) restarts: Vec<u32>,
    /// Each container's previous end, as `lastState` reports it (`{"terminated": …}`).
    pub(super) last_state: Vec<Value>,
    /// The ephemeral containers added through `pods/<name>/ephemeralcontainers`, in the
    /// order they were seen.
    pub(super) ephemeral: Vec<EphemeralRun>,
}

/// One ephemeral container: started once when it appears in the spec, never restarted,
/// reported in `ephemeralContainerStatuses` and not in the pod's phase or readiness (the
/// Kubernetes "Ephemeral Containers" concept). The testbed has no PID namespaces, so the
/// process namespace a `targetContainerName` asks to share is already shared.
pub(super) struct EphemeralRun {
    spec: Value,
    child: Option<Child>,
    /// `{"running": …}`, `{"waiting": …}` or `{"terminated": …}`.
    state: Value,
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

/// How long a crashed container waits before its restart: 1 s, 2 s, 4 s … capped at 10 s
/// (CrashLoopBackOff, shortened from the kubelet's 10 s … 5 min).
fn restart_backoff(restarts: u32) -> Duration {
    Duration::from_secs(1u64 << restarts.min(4)).min(Duration::from_secs(10))
}

impl PodRun<'_> {
    fn container_name(&self, index: usize) -> &str {
        self.containers[index]["name"].as_str().unwrap_or("c")
    }

    /// An event about container `index`.
    fn container_event(&self, index: usize, kind: EventType, reason: &str, message: &str) {
        self.kubelet.event(
            self.node,
            &Involved::container(self.pod, self.container_name(index)),
            kind,
            reason,
            message,
        );
    }

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
                .push(super::ContainerProcess {
                    pid: None,
                    log,
                    env: Vec::new(),
                });
        }
        self.start = now_rfc3339();
        self.ready_since = self.start.clone();
        for i in 0..self.containers.len() {
            let child = self.spawn(i).await?;
            self.children.push(Some(child));
            self.started_at.push(now_rfc3339());
            self.restarts.push(0);
            self.last_state.push(json!({}));
            self.probe_failed.push(false);
        }
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
                _ = probe_tick.tick() => {
                    self.probe_readiness().await;
                    self.sync_ephemeral().await?;
                }
            }
        }
    }

    /// Starts the ephemeral containers added to the pod's spec since the last look, and
    /// notes those that ended; reports the pod when anything changed.
    async fn sync_ephemeral(&mut self) -> std::io::Result<()> {
        let mut changed = false;
        for e in &mut self.ephemeral {
            if let Some(child) = &mut e.child
                && let Ok(Some(status)) = child.try_wait()
            {
                e.child = None;
                e.state = terminated(status);
                changed = true;
            }
        }
        let (ns, name) = (self.running.ns.as_str(), self.running.name.as_str());
        let pod = self
            .kubelet
            .store
            .get(&self.kubelet.core_type("pods"), ns, name)
            .unwrap_or_default();
        let added: Vec<Value> = pod["spec"]["ephemeralContainers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| !self.ephemeral.iter().any(|e| e.spec["name"] == c["name"]))
            .cloned()
            .collect();
        for spec in added {
            changed = true;
            let run = self.start_ephemeral(spec).await?;
            self.ephemeral.push(run);
        }
        if changed {
            self.report(None);
        }
        Ok(())
    }

    /// Pulls and starts one ephemeral container; an image the testbed does not have leaves
    /// it waiting in ImagePullBackOff, with the kubelet's events.
    async fn start_ephemeral(&self, spec: Value) -> std::io::Result<EphemeralRun> {
        let name = spec["name"].as_str().unwrap_or("e").to_owned();
        let image_name = spec["image"].as_str().unwrap_or_default().to_owned();
        let involved = Involved::container(self.pod, &name);
        let event = |kind, reason: &str, message: &str| {
            self.kubelet
                .event(self.node, &involved, kind, reason, message);
        };
        let image = match self.kubelet.catalog.image(&image_name) {
            Ok(Some(image)) => image,
            unknown => {
                let reason = unknown.err().unwrap_or_else(|| {
                    "pull access denied, repository does not exist or may require authorization (kt-testbed knows no such image)".into()
                });
                event(
                    EventType::Warning,
                    "Failed",
                    &format!("Failed to pull image \"{image_name}\": {reason}"),
                );
                event(EventType::Warning, "Failed", "Error: ImagePullBackOff");
                let state = json!({"waiting": {"reason": "ImagePullBackOff", "message": format!("Back-off pulling image \"{image_name}\"")}});
                return Ok(EphemeralRun {
                    spec,
                    child: None,
                    state,
                });
            }
        };
        event(
            EventType::Normal,
            "Pulled",
            &format!("Container image \"{image_name}\" already present on machine"),
        );
        let (child, _) = self
            .spawn_container(&spec, &image, &format!("ephemeral-{name}"))
            .await?;
        Ok(EphemeralRun {
            spec,
            child: Some(child),
            state: json!({"running": {"startedAt": now_rfc3339()}}),
        })
    }

    /// `ephemeralContainerStatuses` as the kubelet writes them.
    fn ephemeral_statuses(&self) -> Vec<Value> {
        let (ns, name) = (self.running.ns.as_str(), self.running.name.as_str());
        self.ephemeral
            .iter()
            .map(|e| {
                let c = &e.spec;
                json!({"name": c["name"], "image": c["image"],
                       "imageID": format!("kt-testbed://{}", c["image"].as_str().unwrap_or_default()),
                       "containerID": format!("kt-testbed://{ns}-{name}-{}", c["name"].as_str().unwrap_or_default()),
                       "ready": false, "restartCount": 0, "state": e.state, "lastState": {}})
            })
            .collect()
    }

    /// Whether container `i`, having ended as `last_state` says, is started again.
    fn restarts_after(&self, i: usize) -> bool {
        match self.pod["spec"]["restartPolicy"]
            .as_str()
            .unwrap_or("Always")
        {
            "Always" => true,
            "OnFailure" => self.last_state[i]["terminated"]["exitCode"] != 0,
            _ => false,
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
        if !self.restarts_after(i) {
            if self.children.iter().all(Option::is_none) {
                let failed = self
                    .last_state
                    .iter()
                    .any(|s| s["terminated"]["exitCode"] != 0);
                self.report(Some(if failed { "Failed" } else { "Succeeded" }));
                terminate.cancelled().await;
                return Ok(false);
            }
            self.report(None);
            return Ok(true);
        }
        self.restarts[i] += 1;
        self.report(None);
        let message = format!(
            "Back-off restarting failed container {} in pod {}_{}({})",
            self.container_name(i),
            self.running.name,
            self.running.ns,
            self.pod["metadata"]["uid"].as_str().unwrap_or_default()
        );
        self.container_event(i, EventType::Warning, "BackOff", &message);
        tokio::select! {
            () = terminate.cancelled() => return Ok(false),
            () = tokio::time::sleep(restart_backoff(self.restarts[i])) => {}
        }
        self.children[i] = Some(self.spawn(i).await?);
        self.started_at[i] = now_rfc3339();
        self.ready[i] = self.containers[i].get("readinessProbe").is_none();
        self.report(None);
        Ok(true)
    }

    /// Runs every readiness probe once; reports when readiness changed, and a failure
    /// (once per streak) as an `Unhealthy` event.
    async fn probe_readiness(&mut self) {
        let mut changed = false;
        for i in 0..self.containers.len() {
            let Some(check) = self.containers[i].get("readinessProbe") else {
                continue;
            };
            if self.children[i].is_none() {
                changed |= self.ready[i];
                self.ready[i] = false;
                continue;
            }
            let outcome =
                probe::check(check, &self.containers[i], &self.running.netns, self.pod_ip).await;
            if let Err(why) = &outcome
                && !self.probe_failed[i]
            {
                let message = format!("Readiness probe failed: {why}");
                self.container_event(i, EventType::Warning, "Unhealthy", &message);
            }
            self.probe_failed[i] = outcome.is_err();
            changed |= outcome.is_ok() != self.ready[i];
            self.ready[i] = outcome.is_ok();
        }
        if changed {
            self.report(None);
        }
    }

    /// The image's stop signal to every container, then SIGKILL to those still running
    /// after `grace`.
    pub(super) async fn terminate(&mut self, grace: Duration) {
        for (i, child) in self.children.iter().enumerate() {
            let Some(pid) = child.as_ref().and_then(Child::id) else {
                continue;
            };
            let message = format!("Stopping container {}", self.container_name(i));
            self.container_event(i, EventType::Normal, "Killing", &message);
            // SAFETY: signalling a process this kubelet started.
            unsafe { libc::kill(pid as i32, self.images[i].stop_signal) };
        }
        for e in &self.ephemeral {
            if let Some(pid) = e.child.as_ref().and_then(Child::id) {
                // SAFETY: signalling a process this kubelet started.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
        }
        let deadline = tokio::time::Instant::now() + grace;
        let ephemeral = self.ephemeral.iter_mut().filter_map(|e| e.child.as_mut());
        for child in self.children.iter_mut().flatten().chain(ephemeral) {
            if tokio::time::timeout_at(deadline, child.wait())
                .await
                .is_err()
            {
                let _ = child.start_kill();
                let _ = child.wait().await;
            }
        }
    }

    /// Starts container `index` through the pod runner, its output appended to its log,
    /// with a fresh copy of its image's writable directories.
    async fn spawn(&self, index: usize) -> std::io::Result<Child> {
        let (container, image) = (&self.containers[index], &self.images[index]);
        let (child, env) = self
            .spawn_container(container, image, &index.to_string())
            .await?;
        if let Some(slot) = self
            .running
            .containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(index)
        {
            slot.pid = child.id();
            slot.env = env;
        }
        Ok(child)
    }

    /// Starts `container` of `image` through the pod runner (`key` names its files in the
    /// pod's state directory); the process and the environment it got.
    async fn spawn_container(
        &self,
        container: &Value,
        image: &Image,
        key: &str,
    ) -> std::io::Result<(Child, Vec<(String, String)>)> {
        let layer = self.dir.join(format!("container-{key}"));
        let _ = std::fs::remove_dir_all(&layer);
        let mut mounts = image.materialise(&layer)?;
        mounts.extend(super::volumes::container_mounts(
            &self.dir,
            &self.volumes,
            container,
        ));
        let env = self.kubelet.env(
            self.pod,
            container,
            self.pod_ip,
            &self.hostname,
            &image.path,
        );
        let name = container["name"].as_str().unwrap_or("c");
        let involved = Involved::container(self.pod, name);
        // What the container's securityContext grants, applied by the runner before it
        // executes the program; a name the runtime does not know fails the creation.
        let security = match security::for_container(container) {
            Ok(s) => s,
            Err(e) => {
                self.kubelet.event(
                    self.node,
                    &involved,
                    EventType::Warning,
                    "Failed",
                    &format!("Error: {e}"),
                );
                return Err(std::io::Error::other(e));
            }
        };
        let spec = RunSpec {
            security,
            cgroup: Some(self.running.cgroup.clone()),
            // hostNetwork pods join their node's namespace (never the host's).
            netns: Some(self.running.netns.clone()),
            join_pid: None,
            hostname: self.hostname.clone(),
            symlinks: Vec::new(),
            mounts,
            scratch: self.dir.join(format!("scratch-{key}")),
            env: env.clone(),
            argv: image.argv(container),
            cwd: container["workingDir"].as_str().map(PathBuf::from),
        };
        let spec_path = self.dir.join(format!("run-{key}.json"));
        std::fs::write(&spec_path, serde_json::to_vec(&spec)?)?;
        let log_path = self
            .dir
            .join(format!("{}.log", container["name"].as_str().unwrap_or("c")));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        self.kubelet.event(
            self.node,
            &involved,
            EventType::Normal,
            "Created",
            &format!("Created container: {name}"),
        );
        let child = Command::new(&self.kubelet.catalog.testbed_bin)
            .arg("run-in-pod")
            .arg(&spec_path)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()?;
        self.kubelet.event(
            self.node,
            &involved,
            EventType::Normal,
            "Started",
            &format!("Started container {name}"),
        );
        Ok((child, env))
    }

    /// Writes the pod's status: Running (Ready when every container is), or `final_phase`.
    pub(super) fn report(&mut self, final_phase: Option<&str>) {
        let all_ready = final_phase.is_none() && self.ready.iter().all(|r| *r);
        let (ns, name) = (self.running.ns.as_str(), self.running.name.as_str());
        if self.reported_ready != all_ready {
            self.reported_ready = all_ready;
            self.ready_since = now_rfc3339();
        }
        let (start, ready_since) = (&self.start, &self.ready_since);
        let cond = |t: &str, ok: bool, since: &str| json!({"type": t, "status": if ok { "True" } else { "False" }, "lastTransitionTime": since});
        let statuses: Vec<Value> = self.containers.iter().enumerate().map(|(i, c)| {
            let ended = self.children[i].is_none();
            let waiting = final_phase.is_none() && ended && self.restarts_after(i);
            let (state, last_state) = match final_phase {
                Some(_) => (self.last_state[i].clone(), json!({})),
                None if ended && !waiting => (self.last_state[i].clone(), json!({})),
                None if waiting => {
                    let reason = if self.restarts[i] > 0 { "CrashLoopBackOff" } else { "ContainerCreating" };
                    (json!({"waiting": {"reason": reason, "message": format!("back-off restarting failed container={} pod={name}_{ns}", self.container_name(i))}}), self.last_state[i].clone())
                }
                None => (json!({"running": {"startedAt": self.started_at[i]}}), self.last_state[i].clone()),
            };
            json!({"name": c["name"], "image": c["image"], "imageID": format!("kt-testbed://{}", c["image"].as_str().unwrap_or_default()),
                   "containerID": format!("kt-testbed://{ns}-{name}-{i}"), "ready": self.ready[i], "started": final_phase.is_none() && !ended,
                   "restartCount": self.restarts[i], "state": state, "lastState": last_state})
        }).collect();
        let ephemeral = self.ephemeral_statuses();
        let (pod_ip, host_ip) = (self.pod_ip, self.host_ip);
        self.kubelet.set_status(ns, name, |s| {
            *s = json!({
                "phase": final_phase.unwrap_or("Running"),
                "podIP": pod_ip.to_string(), "podIPs": [{"ip": pod_ip.to_string()}],
                "hostIP": host_ip.to_string(), "hostIPs": [{"ip": host_ip.to_string()}],
                "startTime": start, "qosClass": "BestEffort",
                "conditions": [cond("PodReadyToStartContainers", true, start), cond("Initialized", true, start), cond("Ready", all_ready, ready_since), cond("ContainersReady", all_ready, ready_since), cond("PodScheduled", true, start)],
                "containerStatuses": statuses,
            });
            if !ephemeral.is_empty() {
                s["ephemeralContainerStatuses"] = json!(ephemeral);
            }
        });
    }
}

impl PodRuntime for Kubelets {
    fn logs(
        &self,
        ns: &str,
        pod: &str,
        container: Option<&str>,
        follow: bool,
    ) -> BoxFuture<'static, Result<BoxStream<'static, Bytes>, ApiError>> {
        let running = self.find(ns, pod);
        let (container, pod) = (container.map(str::to_owned), pod.to_owned());
        Box::pin(async move {
            let running =
                running.ok_or_else(|| ApiError::bad_request("container is not running"))?;
            let first = running
                .containers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .first()
                .map(|c| c.log.clone())
                .ok_or_else(|| ApiError::bad_request("pod has no containers"))?;
            // Every container's log, ephemeral ones too, is `<name>.log` in the pod's state
            // directory.
            let log = match container {
                None => first,
                Some(name) => {
                    let path = first.with_file_name(format!("{name}.log"));
                    if !path.exists() {
                        return Err(ApiError::bad_request(format!(
                            "container {name} is not valid for pod {pod}"
                        )));
                    }
                    path
                }
            };
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
            // The first container's process and environment, which the command gets too.
            let (pid, env) = running
                .containers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .first()
                .and_then(|c| Some((c.pid?, c.env.clone())))
                .ok_or_else(|| ApiError::bad_request("container is not running"))?;
            // A container counts as started once its process exists, but the pod runner
            // mounts the image's directories before it executes the program: join it only
            // then, as a runtime's exec sees the container's whole filesystem.
            for _ in 0..200 {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                if !cmdline.windows(10).any(|w| w == b"run-in-pod") {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let spec = RunSpec {
                cgroup: Some(running.cgroup.clone()),
                netns: Some(running.netns.clone()),
                join_pid: Some(pid),
                argv: command,
                env,
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
