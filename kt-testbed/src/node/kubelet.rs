//! The kubelets: every pod bound to a node becomes real processes in its own network
//! namespace (a routed /32 veth from the node), mount namespace (resolv.conf, hosts,
//! volumes, the service-account token, the image's writable directories) and cgroup.
//! Status goes Pending → Running (Ready after the readiness probe), containers restart per
//! `restartPolicy`, deletion sends the image's stop signal (SIGTERM) then SIGKILL after the
//! grace period, and logs are kept for `pods/log`. What happens is written as Events, as
//! the kubelet writes them (Pulled, Created, Started, Killing, BackOff, Unhealthy,
//! FailedCreatePodSandBox …).
//!
//! A pod's steps: its images; its sandbox (`network`: namespace, veth, name files;
//! cgroup; `volumes`), retried with back-off when set-up fails; `env`; then `runtime`
//! (start, supervise with `probe`, terminate; and what the API asks of pods).

mod env;
mod network;
mod probe;
mod runtime;
mod volumes;

use std::{
    collections::{HashMap, HashSet},
    net::Ipv4Addr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use serde_json::{Value, json};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use self::runtime::PodRun;
use crate::{
    api::{
        auth::Tokens,
        resources::ResourceType,
        store::{Part, Store, now_rfc3339},
    },
    controllers::events::{self, EventType, Involved, Source},
    node::images::{Catalog, Image},
    sys::cgroup::TestCgroup,
    topology,
};

pub const CLUSTER_DNS: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const KUBERNETES_SERVICE: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// What a kubelet knows of its node.
pub struct NodeInfo {
    pub name: String,
    pub index: u8,
    pub ip: Ipv4Addr,
    pub netns_name: String,
    pub pods_cgroup: PathBuf,
    ips: Mutex<IpRange>,
}

/// The host parts of a node's pod range in use, and the one handed out last. Like CNI's
/// host-local IPAM, allocation goes on after the last one rather than back to the lowest
/// free: a just released IP is handed out again only after every other one.
#[derive(Default)]
struct IpRange {
    used: HashSet<u8>,
    last: u8,
}

impl IpRange {
    const HOSTS: std::ops::RangeInclusive<u8> = 2..=254;

    fn allocate(&mut self) -> Option<u8> {
        let (first, last) = (*Self::HOSTS.start(), *Self::HOSTS.end());
        let after = self.last.clamp(first - 1, last);
        let host = (after + 1..=last)
            .chain(first..=after)
            .find(|h| !self.used.contains(h))?;
        self.used.insert(host);
        self.last = host;
        Some(host)
    }

    fn release(&mut self, host: u8) {
        self.used.remove(&host);
    }
}

impl NodeInfo {
    pub fn new(name: String, index: u8, netns_name: String, pods_cgroup: PathBuf) -> Self {
        Self {
            name,
            index,
            ip: topology::node_ip(index),
            netns_name,
            pods_cgroup,
            ips: Mutex::default(),
        }
    }

    fn allocate_ip(&self) -> Option<Ipv4Addr> {
        let host = self
            .ips
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .allocate()?;
        Some(Ipv4Addr::new(10, 244, self.index, host))
    }

    fn release_ip(&self, ip: Ipv4Addr) {
        self.ips
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .release(ip.octets()[3]);
    }
}

/// One container of a running pod.
struct ContainerProcess {
    /// The process running it, while it runs.
    pid: Option<u32>,
    log: PathBuf,
    /// Its environment, which `exec` gets too.
    env: Vec<(String, String)>,
}

/// A pod this machine runs.
#[derive(Clone)]
struct Running {
    ns: String,
    name: String,
    netns: PathBuf,
    cgroup: PathBuf,
    containers: Arc<Mutex<Vec<ContainerProcess>>>,
    terminate: CancellationToken,
    done: CancellationToken,
}

pub struct Kubelets {
    store: Arc<Store>,
    tokens: Arc<Tokens>,
    catalog: Catalog,
    ca_pem: String,
    prefix: String,
    state_dir: PathBuf,
    nodes: Vec<Arc<NodeInfo>>,
    pods: Mutex<HashMap<String, Running>>,
    /// Nodes switched off for good ([`Kubelets::switch_off`]): their kubelets have stopped.
    switched_off: Mutex<HashSet<String>>,
    next_pod: AtomicU32,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

impl Kubelets {
    #[expect(
        clippy::too_many_arguments,
        reason = "everything the kubelets share, handed over once"
    )]
    pub fn new(
        store: Arc<Store>,
        tokens: Arc<Tokens>,
        catalog: Catalog,
        ca_pem: String,
        prefix: String,
        state_dir: PathBuf,
        nodes: Vec<NodeInfo>,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            tokens,
            catalog,
            ca_pem,
            prefix,
            state_dir,
            nodes: nodes.into_iter().map(Arc::new).collect(),
            pods: Mutex::new(HashMap::new()),
            switched_off: Mutex::default(),
            next_pod: AtomicU32::new(1),
            tasks,
            shutdown,
        })
    }

    /// Deletes the network namespaces of pods (`<prefix>p<seq>`) whose teardown never ran:
    /// a testbed dropped without `stop` abandons its pod tasks.
    pub fn remove_leftover_sandboxes(&self) {
        let pods = format!("{}p", self.prefix);
        let Ok(entries) = std::fs::read_dir("/run/netns") else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let is_pod = name
                .strip_prefix(&pods)
                .is_some_and(|seq| !seq.is_empty() && seq.bytes().all(|b| b.is_ascii_digit()));
            if is_pod {
                let _ = crate::sys::netns::run_checked(
                    std::process::Command::new("ip").args(["netns", "del", &name]),
                );
            }
        }
    }

    /// Registers the Nodes and starts one kubelet loop per node.
    pub fn start(self: &Arc<Self>) {
        let nodes = self.core_type("nodes");
        for node in &self.nodes {
            let obj = json!({
                "metadata": {"name": node.name, "labels": {"kubernetes.io/hostname": node.name, "kubernetes.io/os": "linux"}},
                "spec": {"podCIDR": topology::pod_cidr(node.index), "podCIDRs": [topology::pod_cidr(node.index)]},
            });
            if let Ok(created) = self.store.create(&nodes, "", obj, false) {
                let _ = self.store.modify(&nodes, "", &node.name, Part::Status, false, |mut o| {
                    o["status"] = json!({
                        "addresses": [{"type": "InternalIP", "address": node.ip.to_string()}, {"type": "Hostname", "address": node.name}],
                        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "kubelet is posting ready status", "lastHeartbeatTime": now_rfc3339(), "lastTransitionTime": created["metadata"]["creationTimestamp"]}],
                        "capacity": {"cpu": "2", "memory": "8Gi", "pods": "110"},
                        "allocatable": {"cpu": "2", "memory": "8Gi", "pods": "110"},
                        "nodeInfo": {"kubeletVersion": "v1.33.0-kt-testbed", "containerRuntimeVersion": "kt-testbed://1", "operatingSystem": "linux", "architecture": "amd64"},
                    });
                    Ok(o)
                });
            }
            let this = self.clone();
            let node = node.clone();
            self.tasks.spawn(async move { this.sync_loop(node).await });
        }
    }

    /// The built-in core/v1 type `plural`.
    fn core_type(&self, plural: &str) -> ResourceType {
        self.store
            .registry
            .find("", "v1", plural)
            .expect("built-in")
    }

    /// Stops `node`'s kubelet as a machine switched off stops: every process of its pods
    /// is killed at once (SIGKILL through each pod's `cgroup.kill`, no stop signal, no
    /// grace), nothing is reported for them, and the kubelet admits nothing more. The pods'
    /// sandboxes are then torn down and the pods purged, as the pod garbage collector
    /// deletes the pods of a Node that no longer exists. Unknown `node`: nothing happens.
    pub fn switch_off(&self, node: &str) {
        let Some(info) = self.nodes.iter().find(|n| n.name == node) else {
            return;
        };
        self.switched_off
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(node.to_owned());
        let on_node: Vec<Running> = self
            .pods
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|r| r.cgroup.starts_with(&info.pods_cgroup))
            .cloned()
            .collect();
        for running in on_node {
            // Killed first, so that the termination that follows finds nothing to signal.
            let _ = std::fs::write(running.cgroup.join("cgroup.kill"), "1");
            running.terminate.cancel();
        }
    }

    fn is_switched_off(&self, node: &str) -> bool {
        self.switched_off
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(node)
    }

    async fn sync_loop(self: Arc<Self>, node: Arc<NodeInfo>) {
        let mut rx = self.store.subscribe();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            if self.is_switched_off(&node.name) {
                return;
            }
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
                ev = rx.recv() => {
                    match ev {
                        Ok(ev) if ev.plural != "pods" => continue,
                        _ => {}
                    }
                    while rx.try_recv().is_ok() {}
                }
            }
            self.sync(&node);
        }
    }

    fn sync(self: &Arc<Self>, node: &Arc<NodeInfo>) {
        for pod in self
            .store
            .all("", "pods")
            .into_iter()
            .filter(|p| p["spec"]["nodeName"] == node.name.as_str())
        {
            let uid = pod["metadata"]["uid"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let terminating = pod["metadata"].get("deletionTimestamp").is_some();
            let running = self
                .pods
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&uid)
                .cloned();
            match running {
                Some(r) if terminating => r.terminate.cancel(),
                Some(_) => {}
                None if terminating => {
                    let (ns, name) = crate::controllers::ns_name(&pod);
                    let _ = self.store.purge(&self.core_type("pods"), ns, name);
                }
                None => {
                    if pod["status"]["phase"] == "Succeeded" || pod["status"]["phase"] == "Failed" {
                        continue;
                    }
                    self.admit(node, pod, uid);
                }
            }
        }
    }

    /// Starts running a pod newly bound to `node`, as a tracked task that removes the pod
    /// once it has ended.
    fn admit(self: &Arc<Self>, node: &Arc<NodeInfo>, pod: Value, uid: String) {
        let seq = self.next_pod.fetch_add(1, Ordering::Relaxed);
        let host_network = pod["spec"]["hostNetwork"] == true;
        let netns = if host_network {
            topology::netns_path(&node.netns_name)
        } else {
            topology::netns_path(&format!("{}p{seq}", self.prefix))
        };
        let running = Running {
            ns: pod["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .into(),
            name: pod["metadata"]["name"].as_str().unwrap_or_default().into(),
            netns,
            cgroup: node.pods_cgroup.join(format!("pod{uid}")),
            containers: Arc::default(),
            terminate: self.shutdown.child_token(),
            done: CancellationToken::new(),
        };
        self.pods
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(uid.clone(), running.clone());
        let (this, node) = (self.clone(), node.clone());
        self.tasks.spawn(async move {
            let (ns, name) = (running.ns.clone(), running.name.clone());
            if let Err(e) = this.run_pod(&node, pod, seq, &running).await {
                this.set_status(&ns, &name, |s| {
                    s["phase"] = json!("Pending");
                    s["message"] = json!(e.to_string());
                });
                running.terminate.cancelled().await;
            }
            this.pods
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&uid);
            running.done.cancel();
            if !this.shutdown.is_cancelled() {
                let _ = this.store.purge(&this.core_type("pods"), &ns, &name);
            }
        });
    }

    fn set_status(&self, ns: &str, name: &str, f: impl FnOnce(&mut Value)) {
        let _ = self.store.modify(
            &self.core_type("pods"),
            ns,
            name,
            Part::Status,
            false,
            |mut o| {
                f(&mut o["status"]);
                Ok(o)
            },
        );
    }

    /// Records an event about `involved`, from `node`'s kubelet.
    fn event(
        &self,
        node: &str,
        involved: &Involved<'_>,
        kind: EventType,
        reason: &str,
        message: &str,
    ) {
        events::record(
            &self.store,
            Source::kubelet(node),
            involved,
            kind,
            reason,
            message,
        );
    }

    /// Runs a pod until it is deleted (or the testbed stops); tears everything down.
    async fn run_pod(
        &self,
        node: &NodeInfo,
        pod: Value,
        seq: u32,
        running: &Running,
    ) -> std::io::Result<()> {
        let containers: Vec<Value> = pod["spec"]["containers"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let Some(images) = self.pull_images(node, &pod, &containers, running).await else {
            return Ok(());
        };
        let Some(sandbox) = self.create_sandbox(node, &pod, seq, running).await else {
            return Ok(());
        };
        let mut run = PodRun {
            kubelet: self,
            node: &node.name,
            pod: &pod,
            running,
            containers,
            images,
            dir: sandbox.dir.clone(),
            volumes: sandbox.volumes.clone(),
            pod_ip: sandbox.ip(),
            host_ip: node.ip,
            hostname: sandbox.hostname.clone(),
            start: String::new(),
            ready_since: String::new(),
            reported_ready: false,
            children: Vec::new(),
            started_at: Vec::new(),
            ready: Vec::new(),
            probe_failed: Vec::new(),
            restarts: Vec::new(),
            last_state: Vec::new(),
            ephemeral: Vec::new(),
        };
        run.start_containers().await?;
        run.supervise().await?;
        run.terminate(self.grace(&running.ns, &running.name)).await;
        drop(sandbox);
        Ok(())
    }

    /// Each container's image, if the testbed has every one; otherwise reports
    /// ImagePullBackOff (with the events a kubelet writes) for those it cannot run and
    /// waits for the pod's deletion.
    async fn pull_images(
        &self,
        node: &NodeInfo,
        pod: &Value,
        containers: &[Value],
        running: &Running,
    ) -> Option<Vec<Image>> {
        let mut images = Vec::new();
        let mut failed = Vec::new();
        for c in containers {
            let name = c["image"].as_str().unwrap_or_default();
            let involved = Involved::container(pod, c["name"].as_str().unwrap_or_default());
            let always = c["imagePullPolicy"] == "Always";
            let found = self.catalog.image(name);
            // A kubelet pulls on `Always`, and on `IfNotPresent` an image it does not have.
            let pulls =
                always || (c["imagePullPolicy"] != "Never" && !matches!(found, Ok(Some(_))));
            if pulls {
                let message = format!("Pulling image \"{name}\"");
                self.event(
                    &node.name,
                    &involved,
                    EventType::Normal,
                    "Pulling",
                    &message,
                );
            }
            match found {
                Ok(Some(image)) => {
                    let message = if always {
                        format!(
                            "Successfully pulled image \"{name}\" in 0s (0s including waiting). Image size: 0 bytes."
                        )
                    } else {
                        format!("Container image \"{name}\" already present on machine")
                    };
                    self.event(&node.name, &involved, EventType::Normal, "Pulled", &message);
                    images.push(image);
                }
                unknown => {
                    let reason = unknown.err().unwrap_or_else(|| {
                        "pull access denied, repository does not exist or may require authorization (kt-testbed knows no such image)".into()
                    });
                    for (kind, reason, message) in [
                        (
                            EventType::Warning,
                            "Failed",
                            format!("Failed to pull image \"{name}\": {reason}"),
                        ),
                        (
                            EventType::Warning,
                            "Failed",
                            "Error: ErrImagePull".to_owned(),
                        ),
                        (
                            EventType::Normal,
                            "BackOff",
                            format!("Back-off pulling image \"{name}\""),
                        ),
                        (
                            EventType::Warning,
                            "Failed",
                            "Error: ImagePullBackOff".to_owned(),
                        ),
                    ] {
                        self.event(&node.name, &involved, kind, reason, &message);
                    }
                    failed.push(c["name"].clone());
                }
            }
        }
        if failed.is_empty() {
            return Some(images);
        }
        self.set_status(&running.ns, &running.name, |s| {
            s["phase"] = json!("Pending");
            s["containerStatuses"] = json!(containers.iter().map(|c| json!({
                "name": c["name"], "image": c["image"], "imageID": "", "ready": false, "restartCount": 0, "started": false,
                "state": if failed.contains(&c["name"]) {
                    json!({"waiting": {"reason": "ImagePullBackOff", "message": format!("Back-off pulling image \"{}\"", c["image"].as_str().unwrap_or_default())}})
                } else { json!({"waiting": {"reason": "ContainerCreating"}}) },
            })).collect::<Vec<_>>());
        });
        running.terminate.cancelled().await;
        None
    }

    /// The pod's sandbox; a failed set-up is reported (event `FailedCreatePodSandBox`) and
    /// tried again with back-off, as the kubelet does, until it works or the pod is deleted.
    async fn create_sandbox<'a>(
        &self,
        node: &'a NodeInfo,
        pod: &Value,
        seq: u32,
        running: &Running,
    ) -> Option<Sandbox<'a>> {
        let mut backoff = Duration::from_millis(500);
        loop {
            match self.sandbox(node, pod, seq, running) {
                Ok(sandbox) => return Some(sandbox),
                Err(e) => {
                    self.event(
                        &node.name,
                        &Involved::object(pod),
                        EventType::Warning,
                        "FailedCreatePodSandBox",
                        &format!("Failed to create pod sandbox: {e}"),
                    );
                    self.set_status(&running.ns, &running.name, |s| {
                        s["phase"] = json!("Pending");
                    });
                }
            }
            tokio::select! {
                () = running.terminate.cancelled() => return None,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(SANDBOX_BACKOFF_MAX);
        }
    }

    /// One attempt at the pod's sandbox: state directory, network, cgroup, name files and
    /// volumes. What an attempt made is undone when it fails.
    fn sandbox<'a>(
        &self,
        node: &'a NodeInfo,
        pod: &Value,
        seq: u32,
        running: &Running,
    ) -> std::io::Result<Sandbox<'a>> {
        let dir = self
            .state_dir
            .join("pods")
            .join(pod["metadata"]["uid"].as_str().unwrap_or("unknown"));
        std::fs::create_dir_all(&dir)?;
        let dir_guard = RemoveDir(dir.clone());
        let network = network::attach(node, &self.prefix, seq, pod["spec"]["hostNetwork"] == true)?;
        let cgroup = PodCgroup(TestCgroup::create(
            running.cgroup.clone(),
            node.pods_cgroup.clone(),
        )?);
        // The kubelet's rules: `spec.hostname`, else the pod's name, at most 63 characters.
        let hostname = pod["spec"]["hostname"]
            .as_str()
            .filter(|h| !h.is_empty())
            .unwrap_or(&running.name)
            .chars()
            .take(63)
            .collect::<String>();
        let subdomain = pod["spec"]["subdomain"].as_str().filter(|s| !s.is_empty());
        network::write_name_files(&dir, &running.ns, &hostname, subdomain, network.ip)?;
        let volumes = self.volumes(pod, &dir, network.ip)?;
        Ok(Sandbox {
            _cgroup: cgroup,
            network,
            volumes,
            hostname,
            dir,
            _dir: dir_guard,
        })
    }

    fn grace(&self, ns: &str, name: &str) -> Duration {
        let pod = self
            .store
            .get(&self.core_type("pods"), ns, name)
            .unwrap_or_default();
        let secs = pod["metadata"]["deletionGracePeriodSeconds"]
            .as_i64()
            .or_else(|| pod["spec"]["terminationGracePeriodSeconds"].as_i64())
            .unwrap_or(30);
        if self.shutdown.is_cancelled() {
            Duration::ZERO
        } else {
            Duration::from_secs(secs.max(0) as u64)
        }
    }

    fn find(&self, ns: &str, pod: &str) -> Option<Running> {
        self.pods
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .find(|r| r.ns == ns && r.name == pod)
            .cloned()
    }
}

/// The longest wait between two attempts at a pod's sandbox.
const SANDBOX_BACKOFF_MAX: Duration = Duration::from_secs(8);

/// What a pod's containers run in. Fields drop in teardown order: every process left in
/// the pod's cgroup is killed, then the network goes, then the pod's files.
struct Sandbox<'a> {
    _cgroup: PodCgroup,
    network: network::PodNetwork<'a>,
    volumes: volumes::Volumes,
    hostname: String,
    dir: PathBuf,
    _dir: RemoveDir,
}

impl Sandbox<'_> {
    fn ip(&self) -> Ipv4Addr {
        self.network.ip
    }
}

/// A pod's cgroup: on drop, whatever still runs in it (a process a container left behind,
/// an `exec` session) is killed, as a container runtime does when it removes a pod, and
/// then the cgroup is removed. A process left alive would keep the pod's network
/// namespace, and its veth, alive.
struct PodCgroup(TestCgroup);

impl Drop for PodCgroup {
    fn drop(&mut self) {
        let path = self.0.path();
        if self.0.pids().is_empty() {
            return;
        }
        let _ = std::fs::write(path.join("cgroup.kill"), "1");
        // Killing is asynchronous: wait (briefly) until the cgroup is empty.
        for _ in 0..100 {
            if self.0.pids().is_empty() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ips_are_handed_out_after_the_last_one_not_back_to_the_lowest_free() {
        let mut range = IpRange::default();
        assert_eq!(range.allocate(), Some(2));
        assert_eq!(range.allocate(), Some(3));
        range.release(2);
        assert_eq!(
            range.allocate(),
            Some(4),
            "a just released IP waits its turn"
        );
        range.release(3);
        range.release(4);
        range.last = 253;
        assert_eq!(range.allocate(), Some(254));
        assert_eq!(range.allocate(), Some(2), "wraps around");
        let mut full = IpRange {
            used: IpRange::HOSTS.collect(),
            last: 7,
        };
        assert_eq!(full.allocate(), None);
        full.release(5);
        assert_eq!(full.allocate(), Some(5));
    }
}
