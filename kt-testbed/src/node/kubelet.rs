//! The kubelets: every pod bound to a node becomes real processes in its own network
//! namespace (a routed /32 veth from the node), mount namespace (resolv.conf, hosts,
//! volumes, the service-account token) and cgroup. Status goes Pending → Running (Ready
//! after the readiness probe), containers restart per `restartPolicy`, deletion sends
//! SIGTERM then SIGKILL after the grace period, and logs are kept for `pods/log`.
//!
//! A pod's steps: `network` (namespace, veth, name files), `volumes`, `env`, then
//! `runtime` (start, supervise with `probe`, terminate; and what the API asks of pods).

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
        store::{Part, Store, now_rfc3339},
    },
    node::images::Catalog,
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
    used_ips: Mutex<HashSet<u8>>,
}

impl NodeInfo {
    pub fn new(name: String, index: u8, netns_name: String, pods_cgroup: PathBuf) -> Self {
        Self {
            name,
            index,
            ip: topology::node_ip(index),
            netns_name,
            pods_cgroup,
            used_ips: Mutex::new(HashSet::new()),
        }
    }

    fn allocate_ip(&self) -> Option<Ipv4Addr> {
        let mut used = self.used_ips.lock().unwrap_or_else(|e| e.into_inner());
        let host = (2..=254u8).find(|h| !used.contains(h))?;
        used.insert(host);
        Some(Ipv4Addr::new(10, 244, self.index, host))
    }

    fn release_ip(&self, ip: Ipv4Addr) {
        self.used_ips
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&ip.octets()[3]);
    }
}

/// One container of a running pod.
struct ContainerProcess {
    /// The process running it, while it runs.
    pid: Option<u32>,
    log: PathBuf,
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
            next_pod: AtomicU32::new(1),
            tasks,
            shutdown,
        })
    }

    /// Registers the Nodes and starts one kubelet loop per node.
    pub fn start(self: &Arc<Self>) {
        let nodes = self
            .store
            .registry
            .find("", "v1", "nodes")
            .expect("built-in");
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

    async fn sync_loop(self: Arc<Self>, node: Arc<NodeInfo>) {
        let mut rx = self.store.subscribe();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
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
                    let _ = self.store.purge(
                        &self
                            .store
                            .registry
                            .find("", "v1", "pods")
                            .expect("built-in"),
                        ns,
                        name,
                    );
                }
                None => {
                    if pod["status"]["phase"] == "Succeeded" || pod["status"]["phase"] == "Failed" {
                        continue;
                    }
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
                            let _ = this.store.purge(
                                &this
                                    .store
                                    .registry
                                    .find("", "v1", "pods")
                                    .expect("built-in"),
                                &ns,
                                &name,
                            );
                        }
                    });
                }
            }
        }
    }

    fn set_status(&self, ns: &str, name: &str, f: impl FnOnce(&mut Value)) {
        let rt = self
            .store
            .registry
            .find("", "v1", "pods")
            .expect("built-in");
        let _ = self
            .store
            .modify(&rt, ns, name, Part::Status, false, |mut o| {
                f(&mut o["status"]);
                Ok(o)
            });
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
        let Some(argvs) = self.pull_images(&containers, running).await else {
            return Ok(());
        };
        let dir = self
            .state_dir
            .join("pods")
            .join(pod["metadata"]["uid"].as_str().unwrap_or("unknown"));
        std::fs::create_dir_all(&dir)?;
        let _dir_guard = RemoveDir(dir.clone());
        let network = network::attach(node, &self.prefix, seq, pod["spec"]["hostNetwork"] == true)?;
        let cgroup = TestCgroup::create(running.cgroup.clone(), node.pods_cgroup.clone())?;
        let hostname = running.name.chars().take(63).collect::<String>();
        network::write_name_files(&dir, &running.ns, &hostname, network.ip)?;
        let volumes = self.volumes(&pod, &dir, network.ip)?;

        let mut run = PodRun {
            kubelet: self,
            pod: &pod,
            running,
            containers,
            argvs,
            dir,
            volumes,
            pod_ip: network.ip,
            host_ip: node.ip,
            hostname,
            start: String::new(),
            children: Vec::new(),
            ready: Vec::new(),
            restarts: Vec::new(),
            last_state: Vec::new(),
        };
        run.start_containers().await?;
        run.supervise().await?;
        run.terminate(self.grace(&running.ns, &running.name)).await;
        drop(cgroup);
        Ok(())
    }

    /// Each container's program, if the testbed knows every image; otherwise reports
    /// ImagePullBackOff for the unknown ones and waits for the pod's deletion.
    async fn pull_images(
        &self,
        containers: &[Value],
        running: &Running,
    ) -> Option<Vec<Vec<String>>> {
        let argvs: Vec<Option<Vec<String>>> =
            containers.iter().map(|c| self.catalog.argv(c)).collect();
        if argvs.iter().all(Option::is_some) {
            return Some(argvs.into_iter().flatten().collect());
        }
        self.set_status(&running.ns, &running.name, |s| {
            s["phase"] = json!("Pending");
            s["containerStatuses"] = json!(containers.iter().zip(&argvs).map(|(c, a)| json!({
                "name": c["name"], "image": c["image"], "imageID": "", "ready": false, "restartCount": 0, "started": false,
                "state": if a.is_some() { json!({"waiting": {"reason": "ContainerCreating"}}) } else {
                    json!({"waiting": {"reason": "ImagePullBackOff", "message": format!("Back-off pulling image \"{}\"", c["image"].as_str().unwrap_or_default())}}) },
            })).collect::<Vec<_>>());
        });
        running.terminate.cancelled().await;
        None
    }

    fn grace(&self, ns: &str, name: &str) -> Duration {
        let rt = self
            .store
            .registry
            .find("", "v1", "pods")
            .expect("built-in");
        let pod = self.store.get(&rt, ns, name).unwrap_or_default();
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

struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
