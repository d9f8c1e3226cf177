//! The connection to the cluster: kubeconfig (`-c`), context (`--context`) and namespace
//! (`-n`, else the context's, else `default`).

use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::args::GlobalOptions;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("failed to read kubeconfig {path}")]
    Read {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("context '{0}' not exist, check your kubeconfig file please")]
    NoContext(String),
    #[error("invalid kubeconfig")]
    Config(#[source] kube::config::KubeconfigError),
    #[error("failed to create a client for the cluster")]
    Client(#[source] Box<kube::Error>),
}

pub struct Cluster {
    pub client: kube::Client,
    pub namespace: String,
}

pub async fn connect(global: &GlobalOptions) -> Result<Cluster, ClusterError> {
    let kubeconfig = if global.kubeconfig.is_empty() {
        Kubeconfig::read().map_err(|source| ClusterError::Read {
            path: "~/.kube/config or $KUBECONFIG".into(),
            source,
        })?
    } else {
        Kubeconfig::read_from(&global.kubeconfig).map_err(|source| ClusterError::Read {
            path: global.kubeconfig.clone(),
            source,
        })?
    };
    let context = (!global.context.is_empty()).then(|| global.context.clone());
    if let Some(ctx) = &context
        && !kubeconfig.contexts.iter().any(|c| c.name == *ctx)
    {
        return Err(ClusterError::NoContext(ctx.clone()));
    }
    let current = context
        .clone()
        .or_else(|| kubeconfig.current_context.clone())
        .unwrap_or_default();
    let options = KubeConfigOptions {
        context,
        ..Default::default()
    };
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .map_err(ClusterError::Config)?;
    let namespace = global
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    tracing::info!("Using cluster context {current} ({})", config.cluster_url);
    // NODELAY on the API connections: the tunnel's port-forward carries small SSH packets.
    let client =
        kt_tunnel::transport::kube_client(config).map_err(|e| ClusterError::Client(Box::new(e)))?;
    Ok(Cluster { client, namespace })
}
