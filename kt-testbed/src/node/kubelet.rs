//! The kubelets: every pod bound to a node becomes real processes in its own network
//! namespace (a routed /32 veth from the node), mount namespace (resolv.conf, hosts,
//! volumes, the service-account token) and cgroup. Status goes Pending → Running (Ready
//! after the readiness probe), containers restart per `restartPolicy`, deletion sends
//! SIGTERM then SIGKILL after the grace period, and logs are kept for `pods/log`.

use std::{
    collections::{HashMap, HashSet},
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use axum::body::Bytes;
use base64::Engine as _;
use futures::{future::BoxFuture, stream::BoxStream};
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::sys::{cgroup::TestCgroup, netns::NetNs};
use crate::{
    api::PodRuntime,
    api::auth::{Tokens, UserInfo},
    api::errors::ApiError,
    api::store::{Part, Store, now_rfc3339},
    node::images::Catalog,
    node::netio,
    node::runner::{BindMount, RunSpec},
    topology::{self, POD_GATEWAY},
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
        let (ns, name) = (running.ns.as_str(), running.name.as_str());
        let spec = pod["spec"].clone();
        let containers: Vec<Value> = spec["containers"].as_array().cloned().unwrap_or_default();
        let argvs: Vec<Option<Vec<String>>> =
            containers.iter().map(|c| self.catalog.argv(c)).collect();
        if argvs.iter().any(Option::is_none) {
            self.set_status(ns, name, |s| {
                s["phase"] = json!("Pending");
                s["containerStatuses"] = json!(containers.iter().zip(&argvs).map(|(c, a)| json!({
                    "name": c["name"], "image": c["image"], "imageID": "", "ready": false, "restartCount": 0, "started": false,
                    "state": if a.is_some() { json!({"waiting": {"reason": "ContainerCreating"}}) } else {
                        json!({"waiting": {"reason": "ImagePullBackOff", "message": format!("Back-off pulling image \"{}\"", c["image"].as_str().unwrap_or_default())}}) },
                })).collect::<Vec<_>>());
            });
            running.terminate.cancelled().await;
            return Ok(());
        }
        let dir = self
            .state_dir
            .join("pods")
            .join(pod["metadata"]["uid"].as_str().unwrap_or("unknown"));
        std::fs::create_dir_all(&dir)?;
        let _dir_guard = RemoveDir(dir.clone());
        let host_network = spec["hostNetwork"] == true;

        // Network: a namespace with a routed /32 veth, unless hostNetwork.
        let (pod_ip, _net) = if host_network {
            (node.ip, None)
        } else {
            let ip = node
                .allocate_ip()
                .ok_or_else(|| std::io::Error::other("node is out of pod IPs"))?;
            let guard = IpGuard(node, ip);
            let netns = NetNs::new(format!("{}p{seq}", self.prefix))?;
            let veth = format!("vp{seq}");
            topology::ip_batch(
                &node.netns_name,
                &[
                    format!(
                        "link add {veth} type veth peer name eth0 netns {}",
                        netns.name()
                    ),
                    format!("link set {veth} up"),
                    format!("route add {ip}/32 dev {veth}"),
                ],
            )?;
            topology::sysctl(
                &node.netns_name,
                &format!("net.ipv4.conf.{veth}.proxy_arp"),
                "1",
            )?;
            // Answer the pod's ARP for its gateway at once, as Calico configures its veths;
            // the kernel's default delays proxy replies by up to 0.8 s.
            topology::sysctl(
                &node.netns_name,
                &format!("net.ipv4.neigh.{veth}.proxy_delay"),
                "0",
            )?;
            topology::ip_batch(
                netns.name(),
                &[
                    format!("addr add {ip}/32 dev eth0"),
                    "link set eth0 up".into(),
                    format!("route add {POD_GATEWAY} dev eth0 scope link"),
                    format!("route add default via {POD_GATEWAY} dev eth0"),
                ],
            )?;
            (ip, Some((netns, guard)))
        };
        let cgroup = TestCgroup::create(running.cgroup.clone(), node.pods_cgroup.clone())?;

        // Files every container gets, and the volumes.
        let hostname = name.chars().take(63).collect::<String>();
        std::fs::write(
            dir.join("resolv.conf"),
            format!(
                "search {ns}.svc.cluster.local svc.cluster.local cluster.local\nnameserver {CLUSTER_DNS}\noptions ndots:5\n"
            ),
        )?;
        std::fs::write(
            dir.join("hosts"),
            format!(
                "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{pod_ip}\t{hostname}\n"
            ),
        )?;
        std::fs::write(dir.join("hostname"), format!("{hostname}\n"))?;
        let volumes = self.volumes(&pod, &dir, pod_ip)?;

        let mut children: Vec<Option<Child>> = Vec::new();
        let mut restarts = vec![0u32; containers.len()];
        for (i, c) in containers.iter().enumerate() {
            let log = dir.join(format!("{}.log", c["name"].as_str().unwrap_or("c")));
            running
                .containers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(ContainerProcess { pid: None, log });
            children.push(Some(
                self.spawn_container(
                    &pod,
                    c,
                    argvs[i].clone().unwrap_or_default(),
                    &dir,
                    &volumes,
                    running,
                    pod_ip,
                    &hostname,
                    i,
                )
                .await?,
            ));
        }
        let start = now_rfc3339();
        let mut ready: Vec<bool> = containers
            .iter()
            .map(|c| c.get("readinessProbe").is_none())
            .collect();
        self.report(
            ns,
            name,
            &containers,
            &ready,
            &restarts,
            pod_ip,
            node.ip,
            &start,
            None,
        );

        let period = Duration::from_millis(500);
        let mut probe_tick = tokio::time::interval(period);
        loop {
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
                () = running.terminate.cancelled() => break,
                (i, status) = exited => {
                    children[i] = None;
                    ready[i] = false;
                    let policy = spec["restartPolicy"].as_str().unwrap_or("Always");
                    let restart = policy == "Always" || (policy == "OnFailure" && !status.success());
                    if !restart {
                        if children.iter().all(Option::is_none) {
                            let phase = if status.success() { "Succeeded" } else { "Failed" };
                            self.report(ns, name, &containers, &ready, &restarts, pod_ip, node.ip, &start, Some(phase));
                            running.terminate.cancelled().await;
                            break;
                        }
                        continue;
                    }
                    restarts[i] += 1;
                    self.report(ns, name, &containers, &ready, &restarts, pod_ip, node.ip, &start, None);
                    // CrashLoopBackOff: 1 s, 2 s, 4 s … capped at 10 s.
                    let backoff = Duration::from_secs(1u64 << restarts[i].min(4)).min(Duration::from_secs(10));
                    tokio::select! {
                        () = running.terminate.cancelled() => break,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    children[i] = Some(self.spawn_container(&pod, &containers[i], argvs[i].clone().unwrap_or_default(), &dir, &volumes, running, pod_ip, &hostname, i).await?);
                    ready[i] = containers[i].get("readinessProbe").is_none();
                    self.report(ns, name, &containers, &ready, &restarts, pod_ip, node.ip, &start, None);
                }
                _ = probe_tick.tick() => {
                    let mut changed = false;
                    for (i, c) in containers.iter().enumerate() {
                        let Some(probe) = c.get("readinessProbe") else { continue };
                        let ok = children[i].is_some() && self.probe(probe, &running.netns).await;
                        changed |= ok != ready[i];
                        ready[i] = ok;
                    }
                    if changed {
                        self.report(ns, name, &containers, &ready, &restarts, pod_ip, node.ip, &start, None);
                    }
                }
            }
        }

        // Termination: SIGTERM, then SIGKILL after the grace period.
        let grace = self.grace(ns, name);
        for child in children.iter().flatten() {
            if let Some(pid) = child.id() {
                // SAFETY: signalling a process this kubelet started.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
        }
        let deadline = tokio::time::Instant::now() + grace;
        for child in children.iter_mut().flatten() {
            if tokio::time::timeout_at(deadline, child.wait())
                .await
                .is_err()
            {
                let _ = child.start_kill();
                let _ = child.wait().await;
            }
        }
        drop(cgroup);
        Ok(())
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

    #[expect(clippy::too_many_arguments, reason = "the pieces of one status report")]
    fn report(
        &self,
        ns: &str,
        name: &str,
        containers: &[Value],
        ready: &[bool],
        restarts: &[u32],
        pod_ip: Ipv4Addr,
        host_ip: Ipv4Addr,
        start: &str,
        final_phase: Option<&str>,
    ) {
        let all_ready = final_phase.is_none() && ready.iter().all(|r| *r);
        let cond = |t: &str, ok: bool| json!({"type": t, "status": if ok { "True" } else { "False" }, "lastTransitionTime": start});
        let statuses: Vec<Value> = containers.iter().enumerate().map(|(i, c)| {
            let state = match final_phase {
                Some(phase) => json!({"terminated": {"exitCode": if phase == "Succeeded" { 0 } else { 1 }, "reason": if phase == "Succeeded" { "Completed" } else { "Error" }}}),
                None => json!({"running": {"startedAt": start}}),
            };
            json!({"name": c["name"], "image": c["image"], "imageID": format!("kt-testbed://{}", c["image"].as_str().unwrap_or_default()),
                   "containerID": format!("kt-testbed://{ns}-{name}-{i}"), "ready": ready[i], "started": final_phase.is_none(),
                   "restartCount": restarts[i], "state": state})
        }).collect();
        self.set_status(ns, name, |s| {
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

    async fn probe(&self, probe: &Value, netns: &Path) -> bool {
        let port = |p: &Value| p["port"].as_u64().map(|p| p as u16);
        if let Some(p) = port(&probe["tcpSocket"]) {
            return netio::dial(netns, SocketAddr::from(([127, 0, 0, 1], p)))
                .await
                .is_ok();
        }
        if let Some(p) = port(&probe["httpGet"]) {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            let path = probe["httpGet"]["path"].as_str().unwrap_or("/");
            let Ok(mut conn) = netio::dial(netns, SocketAddr::from(([127, 0, 0, 1], p))).await
            else {
                return false;
            };
            if conn.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\nUser-Agent: kube-probe/1.33\r\n\r\n").as_bytes()).await.is_err() {
                return false;
            }
            let mut head = [0u8; 12];
            return matches!(
                tokio::time::timeout(Duration::from_secs(1), conn.read_exact(&mut head)).await,
                Ok(Ok(_))
            ) && (head.starts_with(b"HTTP/1.1 2")
                || head.starts_with(b"HTTP/1.0 2")
                || head.starts_with(b"HTTP/1.1 3")
                || head.starts_with(b"HTTP/1.0 3"));
        }
        true
    }

    /// Materialises the pod's volumes under its state directory: name → path.
    fn volumes(
        &self,
        pod: &Value,
        dir: &Path,
        pod_ip: Ipv4Addr,
    ) -> std::io::Result<HashMap<String, PathBuf>> {
        let (ns, _) = crate::controllers::ns_name(pod);
        let mut out = HashMap::new();
        let get = |plural: &str, obj_name: &str| -> Value {
            self.store
                .registry
                .find("", "v1", plural)
                .and_then(|rt| self.store.get(&rt, ns, obj_name).ok())
                .unwrap_or(Value::Null)
        };
        let write_items = |target: &Path,
                           data: &serde_json::Map<String, Value>,
                           items: &Value,
                           decode: bool|
         -> std::io::Result<()> {
            std::fs::create_dir_all(target)?;
            let pairs: Vec<(String, String)> = match items.as_array() {
                Some(items) => items
                    .iter()
                    .filter_map(|i| {
                        Some((
                            i["key"].as_str()?.to_owned(),
                            i["path"].as_str()?.to_owned(),
                        ))
                    })
                    .collect(),
                None => data.keys().map(|k| (k.clone(), k.clone())).collect(),
            };
            for (key, path) in pairs {
                let Some(value) = data.get(&key).and_then(Value::as_str) else {
                    continue;
                };
                let bytes = if decode {
                    base64::engine::general_purpose::STANDARD
                        .decode(value)
                        .unwrap_or_default()
                } else {
                    value.as_bytes().to_vec()
                };
                let file = target.join(&path);
                if let Some(parent) = file.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                std::fs::write(file, bytes)?;
            }
            Ok(())
        };
        for v in pod["spec"]["volumes"].as_array().into_iter().flatten() {
            let vname = v["name"].as_str().unwrap_or_default();
            let target = dir.join("volumes").join(vname);
            // configMap and secret volumes: keys (or the listed items) as files.
            let source = match (
                v["configMap"]["name"].as_str(),
                v["secret"]["secretName"].as_str(),
            ) {
                (Some(cm), _) => Some(("configmaps", cm, &v["configMap"]["items"], false)),
                (_, Some(secret)) => Some(("secrets", secret, &v["secret"]["items"], true)),
                _ => None,
            };
            if let Some((plural, name, items, decode)) = source {
                let obj = get(plural, name);
                write_items(
                    &target,
                    obj["data"].as_object().unwrap_or(&Default::default()),
                    items,
                    decode,
                )?;
            } else if let Some(items) = v["downwardAPI"]["items"].as_array() {
                std::fs::create_dir_all(&target)?;
                for item in items {
                    let value = field_ref(
                        pod,
                        item["fieldRef"]["fieldPath"].as_str().unwrap_or_default(),
                        pod_ip,
                    );
                    std::fs::write(target.join(item["path"].as_str().unwrap_or("value")), value)?;
                }
            } else if let Some(path) = v["hostPath"]["path"].as_str() {
                // The node's own directory: pods share this machine's file system.
                out.insert(vname.to_owned(), PathBuf::from(path));
                continue;
            } else {
                // emptyDir and anything else: an empty directory.
                std::fs::create_dir_all(&target)?;
            }
            out.insert(vname.to_owned(), target);
        }
        if pod["spec"]["automountServiceAccountToken"] != false {
            let sa = pod["spec"]["serviceAccountName"]
                .as_str()
                .unwrap_or("default");
            let target = dir.join("serviceaccount");
            std::fs::create_dir_all(&target)?;
            std::fs::write(
                target.join("token"),
                self.tokens.issue(UserInfo::service_account(ns, sa)),
            )?;
            std::fs::write(target.join("ca.crt"), &self.ca_pem)?;
            std::fs::write(target.join("namespace"), ns)?;
            out.insert("__serviceaccount".into(), target);
        }
        Ok(out)
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "the pieces of one container start"
    )]
    async fn spawn_container(
        &self,
        pod: &Value,
        container: &Value,
        argv: Vec<String>,
        dir: &Path,
        volumes: &HashMap<String, PathBuf>,
        running: &Running,
        pod_ip: Ipv4Addr,
        hostname: &str,
        index: usize,
    ) -> std::io::Result<Child> {
        let mut mounts = vec![
            BindMount {
                source: dir.join("resolv.conf"),
                target: "/etc/resolv.conf".into(),
                read_only: false,
            },
            BindMount {
                source: dir.join("hosts"),
                target: "/etc/hosts".into(),
                read_only: false,
            },
            BindMount {
                source: dir.join("hostname"),
                target: "/etc/hostname".into(),
                read_only: false,
            },
        ];
        if let Some(sa) = volumes.get("__serviceaccount") {
            mounts.push(BindMount {
                source: sa.clone(),
                target: SA_DIR.into(),
                read_only: true,
            });
        }
        for m in container["volumeMounts"].as_array().into_iter().flatten() {
            let Some(source) = m["name"].as_str().and_then(|n| volumes.get(n)) else {
                continue;
            };
            let source = match m["subPath"].as_str() {
                Some(sub) if !sub.is_empty() => source.join(sub),
                _ => source.clone(),
            };
            mounts.push(BindMount {
                source,
                target: m["mountPath"].as_str().unwrap_or("/mnt").into(),
                read_only: m["readOnly"] == true,
            });
        }
        let spec = RunSpec {
            cgroup: Some(running.cgroup.clone()),
            // hostNetwork pods join their node's namespace (never the host's).
            netns: Some(running.netns.clone()),
            join_pid: None,
            hostname: hostname.to_owned(),
            mounts,
            scratch: dir.join(format!("scratch-{index}")),
            env: self.env(pod, container, pod_ip, hostname),
            argv,
            cwd: container["workingDir"].as_str().map(PathBuf::from),
        };
        let spec_path = dir.join(format!("run-{index}.json"));
        std::fs::write(&spec_path, serde_json::to_vec(&spec)?)?;
        let log_path = dir.join(format!("{}.log", container["name"].as_str().unwrap_or("c")));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let child = Command::new(&self.catalog.testbed_bin)
            .arg("run-in-pod")
            .arg(&spec_path)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()?;
        if let Some(slot) = running
            .containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(index)
        {
            slot.pid = child.id();
        }
        Ok(child)
    }

    fn env(
        &self,
        pod: &Value,
        container: &Value,
        pod_ip: Ipv4Addr,
        hostname: &str,
    ) -> Vec<(String, String)> {
        let (ns, _) = crate::controllers::ns_name(pod);
        let mut env = vec![
            (
                "PATH".to_owned(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
            ),
            ("HOSTNAME".to_owned(), hostname.to_owned()),
            ("HOME".to_owned(), "/root".to_owned()),
            (
                "KUBERNETES_SERVICE_HOST".to_owned(),
                KUBERNETES_SERVICE.to_string(),
            ),
            ("KUBERNETES_SERVICE_PORT".to_owned(), "443".to_owned()),
            ("KUBERNETES_SERVICE_PORT_HTTPS".to_owned(), "443".to_owned()),
            (
                "KUBERNETES_PORT".to_owned(),
                format!("tcp://{KUBERNETES_SERVICE}:443"),
            ),
        ];
        let lookup = |plural: &str, name: &str, key: &str, decode: bool| -> Option<String> {
            let rt = self.store.registry.find("", "v1", plural)?;
            let raw = self.store.get(&rt, ns, name).ok()?["data"][key]
                .as_str()?
                .to_owned();
            if decode {
                String::from_utf8(base64::engine::general_purpose::STANDARD.decode(raw).ok()?).ok()
            } else {
                Some(raw)
            }
        };
        for from in container["envFrom"].as_array().into_iter().flatten() {
            let (plural, name, decode) = match (
                from["configMapRef"]["name"].as_str(),
                from["secretRef"]["name"].as_str(),
            ) {
                (Some(n), _) => ("configmaps", n, false),
                (_, Some(n)) => ("secrets", n, true),
                _ => continue,
            };
            let rt = self
                .store
                .registry
                .find("", "v1", plural)
                .expect("built-in");
            for key in self
                .store
                .get(&rt, ns, name)
                .ok()
                .and_then(|o| {
                    o["data"]
                        .as_object()
                        .map(|m| m.keys().cloned().collect::<Vec<_>>())
                })
                .unwrap_or_default()
            {
                if let Some(v) = lookup(plural, name, &key, decode) {
                    env.push((
                        format!("{}{key}", from["prefix"].as_str().unwrap_or_default()),
                        v,
                    ));
                }
            }
        }
        for e in container["env"].as_array().into_iter().flatten() {
            let name = e["name"].as_str().unwrap_or_default().to_owned();
            let value = if let Some(v) = e["value"].as_str() {
                Some(v.to_owned())
            } else if let Some(path) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                Some(field_ref(pod, path, pod_ip))
            } else if let Some(r) = e["valueFrom"]["configMapKeyRef"].as_object() {
                lookup(
                    "configmaps",
                    r["name"].as_str().unwrap_or_default(),
                    r["key"].as_str().unwrap_or_default(),
                    false,
                )
            } else if let Some(r) = e["valueFrom"]["secretKeyRef"].as_object() {
                lookup(
                    "secrets",
                    r["name"].as_str().unwrap_or_default(),
                    r["key"].as_str().unwrap_or_default(),
                    true,
                )
            } else {
                Some(String::new())
            };
            env.retain(|(k, _)| *k != name);
            env.push((name, value.unwrap_or_default()));
        }
        env
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

/// The downward API.
fn field_ref(pod: &Value, path: &str, pod_ip: Ipv4Addr) -> String {
    match path {
        "status.podIP" => pod_ip.to_string(),
        "metadata.name" => pod["metadata"]["name"].as_str().unwrap_or_default().into(),
        "metadata.namespace" => pod["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .into(),
        "metadata.uid" => pod["metadata"]["uid"].as_str().unwrap_or_default().into(),
        "spec.nodeName" => pod["spec"]["nodeName"].as_str().unwrap_or_default().into(),
        "spec.serviceAccountName" => pod["spec"]["serviceAccountName"]
            .as_str()
            .unwrap_or_default()
            .into(),
        "status.hostIP" => {
            let index = pod["spec"]["nodeName"]
                .as_str()
                .and_then(|n| n.strip_prefix("node-"))
                .and_then(|i| i.parse().ok())
                .unwrap_or(1);
            topology::node_ip(index).to_string()
        }
        other => {
            // metadata.labels['x'] / metadata.annotations['x']
            let (field, key) = other
                .split_once("['")
                .map(|(f, k)| (f, k.trim_end_matches("']")))
                .unwrap_or((other, ""));
            match field {
                "metadata.labels" => pod["metadata"]["labels"][key]
                    .as_str()
                    .unwrap_or_default()
                    .into(),
                "metadata.annotations" => pod["metadata"]["annotations"][key]
                    .as_str()
                    .unwrap_or_default()
                    .into(),
                _ => String::new(),
            }
        }
    }
}

struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct IpGuard<'a>(&'a NodeInfo, Ipv4Addr);

impl Drop for IpGuard<'_> {
    fn drop(&mut self) {
        self.0.release_ip(self.1);
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
