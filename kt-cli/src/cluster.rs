//! The connection to the cluster: kubeconfig (`-c`), context (`--context`) and namespace
//! (`-n`, else the context's, else `default`), and a kube client whose connections set
//! TCP_NODELAY, go through the proxy client-go would use ([`proxy`]) and authenticate with
//! exec credential plugins as client-go does ([`exec_plugin`]) ([`kube_client`]).

pub mod agents;
pub mod clock;
pub mod exec_plugin;
pub mod heartbeat;
pub mod lock;
pub mod proxy;
pub mod stale;

use k8s_openapi::api::core::v1::Service;
use kube::{
    Api,
    config::{KubeConfigOptions, Kubeconfig},
};

use crate::settings::ClusterSettings;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("failed to read kubeconfig {path}")]
    Read {
        path: String,
        /// Why: the I/O error itself when the file could not be read (kube's own error
        /// repeats the path and the I/O error, which made the message say both twice).
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("context '{0}' not exist, check your kubeconfig file please")]
    NoContext(String),
    #[error("invalid kubeconfig")]
    Config(#[source] kube::config::KubeconfigError),
    #[error("failed to create a client for the cluster")]
    Client(#[source] Box<kube::Error>),
    #[error(transparent)]
    Proxy(#[from] proxy::ProxyError),
    #[error(transparent)]
    Credentials(#[from] exec_plugin::ExecPluginError),
    #[error("service '{name}' not found in namespace '{namespace}'")]
    ServiceNotFound { name: String, namespace: String },
    #[error("failed to watch {what}")]
    Watch {
        what: String,
        #[source]
        source: Box<kube::runtime::wait::Error>,
    },
    /// The API server dropped a field of kt's own custom resource: its CRD is older than
    /// this ktctl (a structural schema prunes what it does not name).
    #[error(
        "the cluster's {kind} CRD predates {feature} (it dropped {field}): apply deploy/ from this kt's release"
    )]
    OldCrd {
        kind: &'static str,
        feature: &'static str,
        field: &'static str,
    },
    /// A request that failed: `what` says which ("get service 'web'").
    #[error("failed to {what}")]
    Api {
        what: String,
        #[source]
        source: Box<kube::Error>,
    },
}

impl ClusterError {
    /// A failed request, described by `what` ("list pods").
    pub fn api(what: impl Into<String>) -> impl FnOnce(kube::Error) -> Self {
        let what = what.into();
        move |source| Self::Api {
            what,
            source: Box::new(source),
        }
    }
}

pub struct Cluster {
    pub client: kube::Client,
    pub namespace: String,
    /// The API server's addresses (its URL's host, resolved): traffic to them must never be
    /// routed into a tunnel that runs over them.
    pub api_addresses: Vec<std::net::IpAddr>,
    /// The cluster's time (local time with `--useLocalTime`): for heartbeats and staleness.
    pub clock: clock::ClusterClock,
}

/// The cause worth printing of a kubeconfig that could not be read: the I/O error of an
/// unreadable file (its path is already in [`ClusterError::Read`]), else kube's error.
fn unwrap_read_error(
    error: kube::config::KubeconfigError,
) -> Box<dyn std::error::Error + Send + Sync> {
    match error {
        kube::config::KubeconfigError::ReadConfig(io, _) => Box::new(io),
        other => Box::new(other),
    }
}

pub async fn connect(settings: &ClusterSettings) -> Result<Cluster, ClusterError> {
    let kubeconfig = match &settings.kubeconfig {
        None => Kubeconfig::read().map_err(|source| ClusterError::Read {
            path: "~/.kube/config or $KUBECONFIG".into(),
            source: unwrap_read_error(source),
        })?,
        Some(path) => Kubeconfig::read_from(path).map_err(|source| ClusterError::Read {
            path: path.display().to_string(),
            source: unwrap_read_error(source),
        })?,
    };
    if let Some(ctx) = &settings.context
        && !kubeconfig.contexts.iter().any(|c| c.name == *ctx)
    {
        return Err(ClusterError::NoContext(ctx.clone()));
    }
    let current = settings
        .context
        .clone()
        .or_else(|| kubeconfig.current_context.clone())
        .unwrap_or_default();
    let kubeconfig_proxy = cluster_proxy_url(&kubeconfig, &current);
    let options = KubeConfigOptions {
        context: settings.context.clone(),
        ..Default::default()
    };
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .map_err(ClusterError::Config)?;
    let proxy = proxy::choose(
        &config.cluster_url,
        kubeconfig_proxy.as_deref(),
        &proxy::ProxyEnv::from_env(),
    )?;
    if let Some(proxy) = &proxy {
        tracing::info!(proxy = %proxy.shown(), origin = proxy.origin, "Using a proxy for the API server");
    }
    config.proxy_url = proxy.map(|p| p.url);
    // A failing plugin stops here with its own message, before any request.
    let plugin = config
        .auth_info
        .exec
        .take()
        .map(exec_plugin::ExecPlugin::new)
        .transpose()?;
    if let Some(plugin) = &plugin {
        plugin.token().await?;
    }
    let namespace = settings
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    tracing::info!("Using cluster context {current} ({})", config.cluster_url);
    // NODELAY on the API connections: the tunnel's port-forward carries small SSH packets.
    let api_addresses = api_addresses(&config).await;
    let client = client_with(config, plugin)?;
    let clock = if settings.use_local_time {
        clock::ClusterClock::LOCAL
    } else {
        clock::ClusterClock::measure(&client).await
    };
    Ok(Cluster {
        client,
        namespace,
        api_addresses,
        clock,
    })
}

/// The `proxy-url` of the cluster that context `context` names (client-go's
/// `clientcmd` reads it from there), if any.
fn cluster_proxy_url(kubeconfig: &Kubeconfig, context: &str) -> Option<String> {
    let cluster = kubeconfig
        .contexts
        .iter()
        .find(|c| c.name == context)?
        .context
        .as_ref()?
        .cluster
        .clone();
    kubeconfig
        .clusters
        .iter()
        .find(|c| c.name == cluster)?
        .cluster
        .as_ref()?
        .proxy_url
        .clone()
}

/// The addresses kt's connections to the API server go to: the API server's, and the
/// proxy's when there is one (none when a name does not resolve: the first request will
/// say so).
async fn api_addresses(config: &kube::Config) -> Vec<std::net::IpAddr> {
    let mut addresses = Vec::new();
    for url in std::iter::once(&config.cluster_url).chain(config.proxy_url.as_ref()) {
        let Some(host) = url.host() else {
            continue;
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = host.parse() {
            addresses.push(ip);
            continue;
        }
        let port = url.port_u16().unwrap_or(443);
        if let Ok(found) = tokio::net::lookup_host((host, port)).await {
            addresses.extend(found.map(|a| a.ip()));
        }
    }
    addresses
}

impl Cluster {
    /// The Service `name` of this namespace; a clear error when there is none.
    pub async fn service(&self, name: &str) -> Result<Service, ClusterError> {
        let services: Api<Service> = Api::namespaced(self.client.clone(), &self.namespace);
        services
            .get_opt(name)
            .await
            .map_err(ClusterError::api(format!("get service '{name}'")))?
            .ok_or_else(|| ClusterError::ServiceNotFound {
                name: name.to_owned(),
                namespace: self.namespace.clone(),
            })
    }
}

/// `name`, `svc/name` or `service/name` (v0.3.7's resource argument) → `name`.
pub fn service_name(argument: &str) -> &str {
    argument
        .strip_prefix("svc/")
        .or_else(|| argument.strip_prefix("service/"))
        .unwrap_or(argument)
}

/// A kube client like `kube::Client::try_from(config)` (base URI, authentication, extra
/// headers, rustls) whose API server connections set TCP_NODELAY, go through
/// `config.proxy_url` (an `http://` proxy, [`proxy::ConnectVia`]) and, for a user with an
/// exec plugin, carry the plugin's token ([`exec_plugin`]).
///
/// NODELAY: kube-rs keeps hyper's default, Nagle's algorithm on; SSH packets carried by a
/// port-forward then wait for the server's delayed ACK now and then (≈40 ms at the 99th
/// percentile of small round trips). Go clients (kubectl, ktctl v0.3.7) set NODELAY on every
/// connection. kube-rs has no option for it, hence this assembly of its own layers.
pub fn kube_client(mut config: kube::Config) -> Result<kube::Client, ClusterError> {
    let plugin = config
        .auth_info
        .exec
        .take()
        .map(exec_plugin::ExecPlugin::new)
        .transpose()?;
    client_with(config, plugin)
}

/// [`kube_client`] with the exec plugin already taken out of `config`.
fn client_with(
    config: kube::Config,
    plugin: Option<exec_plugin::ExecPlugin>,
) -> Result<kube::Client, ClusterError> {
    use hyper_util::client::legacy::connect::HttpConnector;
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(config.connect_timeout);
    let client = match &config.proxy_url {
        None => assemble(&config, http, plugin),
        Some(url) => {
            let proxy = proxy::Proxy {
                url: url.clone(),
                origin: "the client configuration",
            };
            if url.scheme_str() != Some("http") {
                return Err(proxy::ProxyError::Scheme {
                    url: proxy.shown(),
                    origin: proxy.origin,
                    scheme: url.scheme_str().unwrap_or_default().to_owned(),
                }
                .into());
            }
            let via = proxy::ConnectVia::new(&proxy, http, config.connect_timeout);
            assemble(&config, via, plugin)
        }
    };
    client.map_err(|e| ClusterError::Client(Box::new(e)))
}

/// The client's layers around `connector` (TLS on top of it).
fn assemble<C>(
    config: &kube::Config,
    connector: C,
    plugin: Option<exec_plugin::ExecPlugin>,
) -> Result<kube::Client, kube::Error>
where
    C: tower::Service<http::Uri> + Clone + Send + Sync + 'static,
    C::Response: hyper_util::client::legacy::connect::Connection
        + hyper::rt::Read
        + hyper::rt::Write
        + Send
        + Unpin
        + 'static,
    C::Future: Send + 'static,
    C::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use hyper_util::{client::legacy::Client, rt::TokioExecutor};
    use kube::client::ConfigExt as _;
    let https = config.rustls_https_connector_with_connector(connector)?;
    let hyper = Client::builder(TokioExecutor::new()).build::<_, kube::client::Body>(https);
    let service = tower::ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .option_layer(plugin.map(exec_plugin::ExecAuthLayer))
        .map_err(tower::BoxError::from)
        .service(hyper);
    Ok(kube::Client::new(service, config.default_namespace.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_argument_may_name_its_kind() {
        for argument in ["web", "svc/web", "service/web"] {
            assert_eq!(service_name(argument), "web");
        }
    }
}
