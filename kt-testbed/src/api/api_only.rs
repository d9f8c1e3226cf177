//! The API server stand-in alone, unprivileged: no kubelets, no namespaces, no cgroups (the
//! controllers optional). What the unprivileged conformance tests run against. Listens on
//! 127.0.0.1 over HTTPS with its own CA, and serves from a runtime of its own.

use std::{io, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use crate::{
    api::auth::{Tokens, UserInfo},
    api::store::Store,
    api::tls,
    api::{ApiServer, bootstrap},
    controllers, kubeconfig,
};
use crate::{runtime::OwnRuntime, sys::tempdir::TempDir};

#[derive(Clone, Debug)]
pub struct ApiOptions {
    /// Events kept for watch resumption; small values force the 410 → relist path.
    pub history: usize,
    pub bookmark_interval: Duration,
    /// Run the controllers (workloads, scheduler, endpoints, GC, namespaces).
    pub controllers: bool,
}

impl Default for ApiOptions {
    fn default() -> Self {
        Self {
            history: 10_000,
            bookmark_interval: Duration::from_secs(60),
            controllers: false,
        }
    }
}

/// The API server alone, running as any user; stops on drop.
pub struct UnprivilegedApi {
    pub api: Arc<ApiServer>,
    pub addr: SocketAddr,
    pub admin_token: String,
    pub kubeconfig: PathBuf,
    pub ca_pem: String,
    dir: TempDir,
    shutdown: CancellationToken,
    /// Where the server runs (`None` only while starting); dropped, so shut down, after
    /// `shutdown` is cancelled.
    runtime: Option<OwnRuntime>,
}

impl UnprivilegedApi {
    /// Starts serving on 127.0.0.1:<free port>, on a runtime of its own.
    pub async fn start(options: ApiOptions) -> io::Result<Self> {
        let (runtime, mut api) =
            OwnRuntime::start("kt-testbed-api", Self::start_here(options)).await?;
        api.runtime = Some(runtime);
        Ok(api)
    }

    async fn start_here(options: ApiOptions) -> io::Result<Self> {
        let shutdown = CancellationToken::new();
        let store = Store::new(options.history);
        bootstrap(&store);
        let tokens = Arc::new(Tokens::default());
        let admin_token = tokens.issue(UserInfo::admin());
        let api = ApiServer::new(
            store.clone(),
            tokens,
            shutdown.clone(),
            options.bookmark_interval,
        );
        if options.controllers {
            controllers::spawn_all(&store, &api.tasks, &shutdown);
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let pki = tls::generate(&[addr.ip()], &["localhost"]).map_err(io::Error::other)?;
        let serve = tls::serve(
            listener,
            api.router(),
            pki.server.clone(),
            shutdown.clone(),
            api.tasks.clone(),
        );
        api.tasks.spawn(serve);
        let dir = TempDir::new("api")?;
        let kubeconfig = dir.path().join("kubeconfig");
        let server = format!("https://{addr}");
        kubeconfig::write(
            &kubeconfig,
            &server,
            "admin",
            &admin_token,
            "default",
            Some(&pki.ca_pem),
        )?;
        Ok(Self {
            api,
            addr,
            admin_token,
            kubeconfig,
            ca_pem: pki.ca_pem,
            dir,
            shutdown,
            runtime: None,
        })
    }

    /// A kubeconfig for a new user `name` (authorised only by what RBAC grants it).
    pub fn user_kubeconfig(&self, name: &str, namespace: &str) -> io::Result<PathBuf> {
        let token = self.api.tokens.issue(UserInfo::user(name));
        let path = self.dir.path().join(format!("kubeconfig-{name}"));
        kubeconfig::write(
            &path,
            &format!("https://{}", self.addr),
            name,
            &token,
            namespace,
            Some(&self.ca_pem),
        )?;
        Ok(path)
    }

    /// A kube-rs client for the admin.
    pub async fn client(&self) -> kube::Client {
        client_for(&self.kubeconfig).await
    }
}

/// A kube-rs client from a kubeconfig file.
pub async fn client_for(path: &std::path::Path) -> kube::Client {
    let kubeconfig = kube::config::Kubeconfig::read_from(path).expect("kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("config");
    kube::Client::try_from(config).expect("client")
}

impl Drop for UnprivilegedApi {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
