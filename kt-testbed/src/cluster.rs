//! A whole simulated cluster: the topology's namespaces, the API stand-in (HTTPS on host
//! loopback for tests and kubectl, and on 172.30.0.1:6443 inside the cluster network),
//! controllers, a kubelet and a kube-proxy per node, the `kubernetes` Service and the
//! cluster DNS. [`Testbed::stop`] (or drop) removes everything it made.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::sys::tempdir::TempDir;
use crate::{
    api::auth::{Tokens, UserInfo},
    api::store::Store,
    api::tls,
    api::{ApiServer, PodRuntime, bootstrap},
    controllers, kubeconfig,
    node::images::Catalog,
    node::kubelet::{CLUSTER_DNS, KUBERNETES_SERVICE, Kubelets, NodeInfo},
    node::netio,
    node::proxy,
    runtime::OwnRuntime,
    topology::{API_IP, API_PORT, Topology},
};

#[derive(Clone, Debug)]
pub struct Options {
    pub nodes: u8,
    /// The `kt-testbed` binary (pod runner, test servers, DNS).
    pub testbed_bin: PathBuf,
    /// The `kt-node-agent` binary, for the agent image.
    pub agent_bin: Option<PathBuf>,
    /// Where state goes (kubeconfigs, pod files); a temporary directory if `None`.
    pub dir: Option<PathBuf>,
}

pub struct Testbed {
    pub api: Arc<ApiServer>,
    pub kubelets: Arc<Kubelets>,
    /// https://127.0.0.1:<port>, for the host (tests, kubectl).
    pub host_url: String,
    pub admin_token: String,
    pub ca_pem: String,
    /// The CA's signer, for client certificates.
    ca: Arc<tls::Issuer>,
    /// The admin kubeconfig for the host.
    pub kubeconfig: PathBuf,
    /// The admin kubeconfig for the workstation namespace (https://172.30.0.1:6443).
    pub workstation_kubeconfig: PathBuf,
    pub dir: PathBuf,
    shutdown: CancellationToken,
    /// The API server's two listeners and their connections: cancelled by
    /// [`Testbed::stop_api`], replaced by [`Testbed::start_api`].
    serving: std::sync::Mutex<CancellationToken>,
    /// The host listener's address, bound again by [`Testbed::start_api`].
    host_addr: SocketAddr,
    server_tls: Arc<tokio_rustls::rustls::ServerConfig>,
    topology: Option<Topology>,
    /// Where everything above runs; `None` only while starting.
    runtime: Option<OwnRuntime>,
    _tempdir: Option<TempDir>,
}

/// The keys of the testbed's `env` file (in its directory) that `kt-testbed exec` reads.
pub const ENV_WORKSTATION_NETNS: &str = "KT_TESTBED_WORKSTATION_NETNS";
pub const ENV_WORKSTATION_KUBECONFIG: &str = "KT_TESTBED_WORKSTATION_KUBECONFIG";
/// The cgroup `kt-testbed exec` puts its command in: inside the testbed's tree, which
/// stopping the testbed kills.
pub const ENV_WORKSTATION_CGROUP: &str = "KT_TESTBED_WORKSTATION_CGROUP";
/// The D-Bus system bus of the workstation's programs (`DBUS_SYSTEM_BUS_ADDRESS`, set by
/// `kt-testbed exec`): an abstract socket, which exists in the workstation's network
/// namespace only. Nothing listens there unless a test starts a bus (systemd-resolved's).
pub const WORKSTATION_SYSTEM_BUS: &str = "unix:abstract=kt-testbed-system-bus";

impl Testbed {
    /// Builds and starts the cluster on a runtime of its own (see [`OwnRuntime`]); returns
    /// once the DNS pod is ready.
    pub async fn start(options: Options) -> io::Result<Self> {
        let (runtime, mut testbed) =
            OwnRuntime::start("kt-testbed", Self::start_here(options)).await?;
        testbed.runtime = Some(runtime);
        Ok(testbed)
    }

    /// Builds and starts the cluster on the caller's runtime.
    async fn start_here(options: Options) -> io::Result<Self> {
        let id: u16 = rand::random();
        let prefix = format!("{}{id:04x}-", crate::sys::PREFIX);
        let (tempdir, dir) = match &options.dir {
            Some(d) => {
                std::fs::create_dir_all(d)?;
                (None, d.clone())
            }
            None => {
                let t = TempDir::new("testbed")?;
                let d = t.path().to_owned();
                (Some(t), d)
            }
        };
        let topology = tokio::task::spawn_blocking({
            let prefix = prefix.clone();
            move || Topology::create(&prefix, options.nodes)
        })
        .await
        .map_err(io::Error::other)??;

        let shutdown = CancellationToken::new();
        let store = Store::new(10_000);
        bootstrap(&store);
        let tokens = Arc::new(Tokens::default());
        let admin_token = tokens.issue(UserInfo::admin());
        let api = ApiServer::new(
            store.clone(),
            tokens.clone(),
            shutdown.clone(),
            Duration::from_secs(60),
        );
        let names = [
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
            "localhost",
        ];
        let ips: [IpAddr; 3] = [
            Ipv4Addr::LOCALHOST.into(),
            API_IP.into(),
            KUBERNETES_SERVICE.into(),
        ];
        let pki = tls::generate(&ips, &names).map_err(io::Error::other)?;

        let host_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let host_addr = host_listener.local_addr()?;
        let cluster_listener = netio::listen(
            topology.control_plane.path().as_path(),
            SocketAddr::from((API_IP, API_PORT)),
        )?;
        crate::upstream_dns::spawn(
            topology.control_plane.path().as_path(),
            &api.tasks,
            shutdown.clone(),
        )?;
        let serving = shutdown.child_token();
        for listener in [host_listener, cluster_listener] {
            api.tasks.spawn(tls::serve(
                listener,
                api.router(),
                pki.server.clone(),
                serving.clone(),
                api.tasks.clone(),
            ));
        }
        Self::kubernetes_service(&store);
        controllers::spawn_all(&store, &api.tasks, &shutdown);

        let catalog = Catalog::new(
            options.testbed_bin.clone(),
            options.agent_bin.clone(),
            dir.clone(),
        );
        let nodes = topology
            .nodes
            .iter()
            .map(|n| {
                NodeInfo::new(
                    n.name.clone(),
                    n.index,
                    n.netns.name().to_owned(),
                    n.pods_cgroup.path().to_owned(),
                )
            })
            .collect();
        let kubelets = Kubelets::new(
            store.clone(),
            tokens,
            catalog,
            pki.ca_pem.clone(),
            prefix.clone(),
            dir.clone(),
            nodes,
            api.tasks.clone(),
            shutdown.clone(),
        );
        kubelets.start();
        *api.runtime.write().unwrap_or_else(|e| e.into_inner()) =
            Some(kubelets.clone() as Arc<dyn PodRuntime>);
        for node in &topology.nodes {
            api.tasks.spawn(proxy::run(
                store.clone(),
                node.netns.name().to_owned(),
                node.ip(),
                shutdown.clone(),
            ));
        }

        let host_url = format!("https://{host_addr}");
        let kubeconfig = dir.join("kubeconfig");
        kubeconfig::write(
            &kubeconfig,
            &host_url,
            "admin",
            &admin_token,
            "default",
            Some(&pki.ca_pem),
        )?;
        let workstation_kubeconfig = dir.join("kubeconfig-workstation");
        kubeconfig::write(
            &workstation_kubeconfig,
            &format!("https://{API_IP}:{API_PORT}"),
            "admin",
            &admin_token,
            "default",
            Some(&pki.ca_pem),
        )?;
        let testbed = Self {
            api,
            kubelets,
            host_url,
            admin_token,
            ca_pem: pki.ca_pem,
            ca: pki.ca,
            kubeconfig,
            workstation_kubeconfig,
            dir,
            shutdown,
            serving: std::sync::Mutex::new(serving),
            host_addr,
            server_tls: pki.server.clone(),
            topology: Some(topology),
            runtime: None,
            _tempdir: tempdir,
        };
        let env = format!(
            "KUBECONFIG={}\n{ENV_WORKSTATION_NETNS}={}\n{ENV_WORKSTATION_KUBECONFIG}={}\n{ENV_WORKSTATION_CGROUP}={}\nKT_TESTBED_PID={}\n",
            testbed.kubeconfig.display(),
            testbed.workstation_netns().display(),
            testbed.workstation_kubeconfig.display(),
            testbed.topology().workstation_cgroup.path().display(),
            std::process::id()
        );
        std::fs::write(testbed.dir.join("env"), env)?;
        let ready = match testbed.deploy_dns() {
            Ok(()) => {
                testbed
                    .wait_ready("kube-system", "k8s-app=kube-dns", Duration::from_secs(30))
                    .await
            }
            Err(e) => Err(e),
        };
        match ready {
            Ok(()) => Ok(testbed),
            Err(e) => {
                testbed.stop().await;
                Err(e)
            }
        }
    }

    fn kubernetes_service(store: &Store) {
        let find = |g: &str, p: &str| store.registry.find_plural(g, p).expect("built-in");
        let _ = store.create(&find("", "services"), "default", json!({
            "metadata": {"name": "kubernetes", "labels": {"component": "apiserver", "provider": "kubernetes"}},
            "spec": {"clusterIP": KUBERNETES_SERVICE.to_string(), "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": API_PORT}]},
        }), false);
        let _ = store.create(&find("", "endpoints"), "default", json!({
            "metadata": {"name": "kubernetes"},
            "subsets": [{"addresses": [{"ip": API_IP.to_string()}], "ports": [{"name": "https", "port": API_PORT, "protocol": "TCP"}]}],
        }), false);
        let _ = store.create(&find("discovery.k8s.io", "endpointslices"), "default", json!({
            "metadata": {"name": "kubernetes", "labels": {"kubernetes.io/service-name": "kubernetes", "endpointslice.kubernetes.io/managed-by": "endpoint-reconciler.k8s.io"}},
            "addressType": "IPv4", "endpoints": [{"addresses": [API_IP.to_string()], "conditions": {"ready": true}}],
            "ports": [{"name": "https", "port": API_PORT, "protocol": "TCP"}],
        }), false);
    }

    /// The cluster DNS: RBAC to read Services and EndpointSlices, a Deployment of the
    /// `kt-testbed/dns` image and the `kube-dns` Service at 10.96.0.10.
    fn deploy_dns(&self) -> io::Result<()> {
        let store = &self.api.store;
        let find = |g: &str, p: &str| store.registry.find_plural(g, p).expect("built-in");
        let objects = [
            (
                find("", "serviceaccounts"),
                "kube-system",
                json!({"metadata": {"name": "kube-dns"}}),
            ),
            (
                find("rbac.authorization.k8s.io", "clusterroles"),
                "",
                json!({"metadata": {"name": "system:kube-dns"},
                "rules": [{"apiGroups": [""], "resources": ["services", "endpoints"], "verbs": ["list", "watch"]},
                          {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]}]}),
            ),
            (
                find("rbac.authorization.k8s.io", "clusterrolebindings"),
                "",
                json!({"metadata": {"name": "system:kube-dns"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:kube-dns"},
                "subjects": [{"kind": "ServiceAccount", "name": "kube-dns", "namespace": "kube-system"}]}),
            ),
            (
                find("", "services"),
                "kube-system",
                json!({"metadata": {"name": "kube-dns", "labels": {"k8s-app": "kube-dns"}},
                "spec": {"clusterIP": CLUSTER_DNS.to_string(), "selector": {"k8s-app": "kube-dns"},
                         "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}, {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]}}),
            ),
            (
                find("apps", "deployments"),
                "kube-system",
                json!({"metadata": {"name": "coredns", "labels": {"k8s-app": "kube-dns"}},
                "spec": {"replicas": 1, "selector": {"matchLabels": {"k8s-app": "kube-dns"}},
                         "template": {"metadata": {"labels": {"k8s-app": "kube-dns"}}, "spec": {"serviceAccountName": "kube-dns",
                             "containers": [{"name": "coredns", "image": "kt-testbed/dns:1",
                                             "ports": [{"name": "dns", "containerPort": 53, "protocol": "UDP"}, {"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"}],
                                             "readinessProbe": {"tcpSocket": {"port": 53}, "periodSeconds": 1}}]}}}}),
            ),
        ];
        for (rt, ns, obj) in objects {
            store
                .create(&rt, ns, obj, false)
                .map_err(|e| io::Error::other(e.message))?;
        }
        Ok(())
    }

    /// Waits until every pod matching `selector` in `ns` is Ready (and there is one).
    pub async fn wait_ready(&self, ns: &str, selector: &str, timeout: Duration) -> io::Result<()> {
        let rt = self
            .api
            .store
            .registry
            .find("", "v1", "pods")
            .expect("built-in");
        let query = crate::api::store::ListQuery {
            label: crate::api::selector::LabelSelector::parse(selector)
                .map_err(io::Error::other)?,
            ..Default::default()
        };
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let pods = self
                .api
                .store
                .list(&rt, Some(ns), &query)
                .map(|l| l.items)
                .unwrap_or_default();
            if !pods.is_empty() && pods.iter().all(controllers::pod_ready) {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                let states: Vec<String> = pods
                    .iter()
                    .map(|p| format!("{}: {}", p["metadata"]["name"], p["status"]))
                    .collect();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("pods {selector} in {ns} not ready: {states:?}"),
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn topology(&self) -> &Topology {
        self.topology.as_ref().expect("present until stop")
    }

    /// `/run/netns/<workstation>`, to run commands there.
    pub fn workstation_netns(&self) -> PathBuf {
        self.topology().workstation.path()
    }

    pub fn node_netns(&self, node: &str) -> Option<PathBuf> {
        self.topology().node(node).map(|n| n.netns.path())
    }

    /// A kube-rs client for the admin on the host.
    pub async fn client(&self) -> kube::Client {
        crate::api::api_only::client_for(&self.kubeconfig).await
    }

    /// A kubeconfig for user `name` on the host, authorised only by RBAC.
    pub fn user_kubeconfig(&self, name: &str, namespace: &str) -> io::Result<PathBuf> {
        self.user_kubeconfig_at(name, namespace, &self.host_url, "")
    }

    /// The same for the workstation namespace (the API at its cluster address).
    pub fn workstation_user_kubeconfig(&self, name: &str, namespace: &str) -> io::Result<PathBuf> {
        let url = format!("https://{API_IP}:{API_PORT}");
        self.user_kubeconfig_at(name, namespace, &url, "-workstation")
    }

    /// A kubeconfig for the workstation whose user authenticates with a client certificate
    /// for `name` in `group` (CN and O, signed by the cluster's CA), as `kubeadm kubeconfig
    /// user` writes one.
    pub fn workstation_certificate_kubeconfig(
        &self,
        name: &str,
        group: Option<&str>,
        namespace: &str,
    ) -> io::Result<PathBuf> {
        let (cert, key) =
            tls::client_certificate(&self.ca, name, group).map_err(io::Error::other)?;
        let path = self.dir.join(format!("kubeconfig-{name}-certificate"));
        let url = format!("https://{API_IP}:{API_PORT}");
        kubeconfig::write_certificate(
            &path,
            &url,
            name,
            (&cert, &key),
            namespace,
            Some(&self.ca_pem),
        )?;
        Ok(path)
    }

    /// A bearer token for user `name` that the API server refuses (401) from `expires` on,
    /// as an OIDC or webhook token authenticator refuses an expired token.
    pub fn issue_token(&self, name: &str, expires: std::time::SystemTime) -> String {
        self.api
            .tokens
            .issue_until(UserInfo::user(name), Some(expires))
    }

    fn user_kubeconfig_at(
        &self,
        name: &str,
        namespace: &str,
        url: &str,
        suffix: &str,
    ) -> io::Result<PathBuf> {
        let token = self.api.tokens.issue(UserInfo::user(name));
        let path = self.dir.join(format!("kubeconfig-{name}{suffix}"));
        kubeconfig::write(&path, url, name, &token, namespace, Some(&self.ca_pem))?;
        Ok(path)
    }

    /// Stops the API server as a crashed or restarting kube-apiserver is stopped: both
    /// listeners close (new connections are refused, on the host and at 172.30.0.1:6443),
    /// every open watch, port-forward and exec stream ends and every connection closes.
    /// Controllers, kubelets and kube-proxies keep running on what they have, as a cluster's
    /// do. [`Testbed::start_api`] brings it back with the same state, addresses and CA.
    pub fn stop_api(&self) {
        self.serving
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .cancel();
        self.api.restart_watches();
        self.api.drop_streams();
    }

    /// Listens again after [`Testbed::stop_api`] on the same two addresses (a no-op while
    /// serving). Errors: an address cannot be bound again.
    pub async fn start_api(&self) -> io::Result<()> {
        let serving = {
            let mut current = self.serving.lock().unwrap_or_else(|e| e.into_inner());
            if !current.is_cancelled() {
                return Ok(());
            }
            *current = self.shutdown.child_token();
            current.clone()
        };
        let host = self.host_addr;
        let control_plane = self.topology().control_plane.path();
        let (api, tls) = (self.api.clone(), self.server_tls.clone());
        let serve = async move {
            let host = tokio::net::TcpListener::bind(host).await?;
            let cluster = netio::listen(&control_plane, SocketAddr::from((API_IP, API_PORT)))?;
            for listener in [host, cluster] {
                api.tasks.spawn(tls::serve(
                    listener,
                    api.router(),
                    tls.clone(),
                    serving.clone(),
                    api.tasks.clone(),
                ));
            }
            io::Result::Ok(())
        };
        match &self.runtime {
            Some(runtime) => runtime.run(serve).await?,
            None => serve.await?,
        }
        Ok(())
    }

    /// Removes `node` from the cluster for good, as a scaled-down node pool loses a
    /// machine: its link to the cluster network goes down first (nothing it sends leaves,
    /// nothing sent to it arrives, no RST), its kubelet stops and everything its pods run is
    /// killed ([`Kubelets::switch_off`]), and its Node object is deleted, so that no
    /// DaemonSet schedules there again. Errors: no such node, or `ip` failed.
    pub fn remove_node(&self, node: &str) -> io::Result<()> {
        let topology = self.topology();
        let index = topology
            .node(node)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no node {node}")))?
            .index;
        crate::topology::ip_batch(
            topology.control_plane.name(),
            &[format!("link set n{index} down")],
        )?;
        self.kubelets.switch_off(node);
        let nodes = self
            .api
            .store
            .registry
            .find("", "v1", "nodes")
            .expect("built-in");
        self.api
            .store
            .purge(&nodes, "", node)
            .map_err(|e| io::Error::other(format!("deleting Node {node}: {}", e.message)))?;
        Ok(())
    }

    /// Stops everything and removes every namespace, cgroup and file the testbed made.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        let tasks = self.api.tasks.clone();
        let drain = async move {
            tasks.close();
            let _ = tokio::time::timeout(Duration::from_secs(15), tasks.wait()).await;
        };
        match &self.runtime {
            Some(runtime) => runtime.run(drain).await,
            None => drain.await,
        }
        self.teardown();
    }

    fn teardown(&mut self) {
        if let Some(topology) = self.topology.take() {
            kill_cgroup_tree(topology.cgroup_path());
            self.kubelets.remove_leftover_sandboxes();
            drop(topology);
        }
    }
}

/// SIGKILLs every process left in the testbed's cgroup tree (all started by it).
fn kill_cgroup_tree(root: &Path) {
    let _ = std::fs::write(root.join("cgroup.kill"), "1");
}

impl Drop for Testbed {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.teardown();
    }
}

/// The pod runner's entry point, for binaries: `run-in-pod SPEC`.
pub fn run_in_pod(spec_path: &Path) -> io::Error {
    match std::fs::read(spec_path)
        .and_then(|b| serde_json::from_slice(&b).map_err(io::Error::other))
    {
        Ok(spec) => crate::node::runner::exec(&spec),
        Err(e) => e,
    }
}
