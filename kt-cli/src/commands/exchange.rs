//! `ktctl exchange <svc> --expose local[:remote][,...]`: all of a Service's traffic to the
//! workstation.
//!
//! - [`agent`] mode (what `auto` picks when kt's agent is installed): a `KtSession` names the
//!   Service, its ports and the session key; an agent holds it over SSH and every agent
//!   redirects the Service to that agent's listeners in the kernel. Nothing in the workload
//!   changes, and the redirect ends with the SSH connection.
//! - [`selector`] mode (without the agent), as ktctl v0.3.7 does it
//!   (`../shared/reference/ktctl-v0.3.7.md` §3.3) and with the same annotations, so that the
//!   Go ktctl's `recover`/`clean` understand what kt did and the other way round.
//! - [`scale`] mode scales the Service's Deployment to zero while a shadow carrying its pod
//!   labels takes the traffic, and scales it back on exit.
//!
//! [`plan`] is the pure part: `--expose`, the port plan, the selector patches, conflicts.

mod agent;
pub mod plan;
mod scale;
mod selector;

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::api::core::v1::{Pod, Service};
use kt_proto::{compat, session::KtSession};
use kube::{Api, api::ListParams};

use self::plan::{Conflict, Exposed, PlanError, ServicePort};
use crate::{
    args::{ExchangeArgs, ExchangeMode},
    cluster::{self, Cluster, ClusterError, lock::LockError},
    lifecycle::{Lifecycle, LifecycleError},
    settings::Settings,
    shadow::ShadowSpec,
    ssh_client::{RemoteForward, SshError, SshPool},
};

#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("service '{0}' has no selector, it cannot be exchanged")]
    NoSelector(String),
    #[error(transparent)]
    Conflict(#[from] Conflict),
    #[error("no application is running on port {0}")]
    NoLocalApp(u16),
    #[error("no kt agent is ready in namespace '{namespace}' (install it from deploy/)")]
    NoAgent { namespace: &'static str },
    #[error("no deployment's pods are selected by service '{0}'")]
    NoDeployment(String),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Lifecycle(#[from] LifecycleError),
    #[error(transparent)]
    Shadow(#[from] super::ShadowTunnelError),
    #[error(transparent)]
    Ssh(#[from] SshError),
}

/// What every mode works with.
pub(crate) struct Context<'a> {
    pub settings: &'a Settings,
    pub cluster: &'a Cluster,
    pub lifecycle: &'a Arc<Lifecycle>,
}

/// How the exchange is done, once `--mode` is resolved.
enum Method {
    /// The agent holds the session; the agent pod ktctl connects to.
    Agent(String),
    Selector,
    Scale(Box<k8s_openapi::api::apps::v1::Deployment>),
}

impl Method {
    fn name(&self) -> &'static str {
        match self {
            Self::Agent(_) => "agent",
            Self::Selector => "selector",
            Self::Scale(_) => "scale",
        }
    }
}

pub async fn run(settings: &Settings, args: &ExchangeArgs) -> Result<(), ExchangeError> {
    let name = cluster::service_name(&args.service);
    let expose = plan::parse_expose(&args.expose)?;
    let cluster = cluster::connect(&settings.cluster).await?;
    let service = cluster.service(name).await?;
    let exposed = plan::plan(name, &ServicePort::of(&service), &expose)?;
    let selector = service
        .spec
        .as_ref()
        .and_then(|s| s.selector.clone())
        .unwrap_or_default();
    if selector.is_empty() {
        return Err(ExchangeError::NoSelector(name.to_owned()));
    }
    check_conflict(&cluster, &service, name).await?;
    if !args.skip_port_checking {
        for port in exposed.iter().map(|e| e.local) {
            check_local_port(port).await?;
        }
    }
    let method = match args.mode {
        ExchangeMode::Agent => Method::Agent(agent::ready_agent(&cluster).await?.ok_or(
            ExchangeError::NoAgent {
                namespace: kt_proto::agent::NAMESPACE,
            },
        )?),
        ExchangeMode::Auto => match agent::ready_agent(&cluster).await? {
            Some(pod) => Method::Agent(pod),
            None => Method::Selector,
        },
        ExchangeMode::Selector => Method::Selector,
        ExchangeMode::Scale => Method::Scale(Box::new(
            scale::deployment_of(&cluster, name, &selector).await?,
        )),
    };
    tracing::info!("Using {} mode", method.name());
    warn_inert_flags(settings, &method);

    let lifecycle = Lifecycle::start("exchange")?;
    let ctx = Context {
        settings,
        cluster: &cluster,
        lifecycle: &lifecycle,
    };
    let result = match method {
        Method::Agent(pod) => agent::exchange(&ctx, name, &exposed, pod).await,
        Method::Selector => selector::exchange(&ctx, name, &exposed).await,
        Method::Scale(deployment) => {
            let recover_wait = Duration::from_secs(u64::from(args.recover_wait_time));
            scale::exchange(&ctx, *deployment, &exposed, recover_wait).await
        }
    };
    lifecycle.finish().await;
    result
}

/// Names the flags that do nothing in the chosen mode.
fn warn_inert_flags(settings: &Settings, method: &Method) {
    if let Method::Agent(_) = method
        && !settings.shadow.customised.is_empty()
    {
        tracing::warn!(
            "Agent mode starts no shadow pod: {} have no effect",
            settings.shadow.customised.join(", ")
        );
    }
    if settings.ssh.connections_given {
        tracing::warn!(
            "exchange carries its reverse tunnels on one SSH connection: --sshConnections has no effect"
        );
    }
}

/// Refuses a Service that someone else holds ([`plan::conflict`]), after reading the
/// sessions of agent mode and the pods the Service selects.
async fn check_conflict(
    cluster: &Cluster,
    service: &Service,
    name: &str,
) -> Result<(), ExchangeError> {
    let sessions: Api<KtSession> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    let sessions = match sessions.list(&ListParams::default()).await {
        Ok(list) => list.items,
        // kt's CRD is not installed: there are no agent-mode sessions.
        Err(kube::Error::Api(status)) if status.code == 404 => Vec::new(),
        Err(kube::Error::Api(status)) if status.code == 403 => {
            tracing::warn!(
                "Cannot read KtSessions in namespace {} (forbidden): an agent-mode exchange of service '{name}' would not be noticed",
                cluster.namespace
            );
            Vec::new()
        }
        Err(e) => return Err(ClusterError::api("list sessions")(e).into()),
    };
    let selector = service
        .spec
        .as_ref()
        .and_then(|s| s.selector.as_ref())
        .map(|s| {
            s.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    let selected = pods
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(ClusterError::api(format!("list pods of service '{name}'")))?
        .items;
    match plan::conflict(name, service, &sessions, &selected, chrono::Utc::now()) {
        Some(conflict) => Err(conflict.into()),
        None => Ok(()),
    }
}

async fn check_local_port(port: u16) -> Result<(), ExchangeError> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    match tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Ok(()),
        _ => Err(ExchangeError::NoLocalApp(port)),
    }
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// The exchange shadow `<owner>-kt-exchange-xxxxx` of selector and scale modes: `labels`
/// besides kt's, `kt-config: <config>`, the Service's target ports declared; then its SSH
/// connection with the reverse tunnels to the local ports up. `None` when the run was
/// stopped meanwhile.
async fn exchange_shadow(
    ctx: &Context<'_>,
    owner: &str,
    labels: BTreeMap<String, String>,
    config: String,
    exposed: &[Exposed],
) -> Result<Option<(Arc<SshPool>, Vec<RemoteForward>)>, ExchangeError> {
    let name = format!(
        "{owner}-kt-exchange-{}",
        compat::random_lower(5, rand::random)
    );
    let mut spec = ShadowSpec::new(
        &ctx.settings.shadow,
        name,
        ctx.cluster.namespace.clone(),
        compat::ROLE_SHADOW_EXCHANGE,
        &ctx.settings.identity.user,
    );
    spec.labels.extend(labels);
    spec.annotations.insert(compat::CONFIG.into(), config);
    spec.ports = exposed
        .iter()
        .map(|e| (e.port_name.clone(), e.listen_port))
        .collect();
    let Some(pool) =
        super::shadow_tunnel(ctx.settings, ctx.cluster, ctx.lifecycle, &spec, 1).await?
    else {
        return Ok(None);
    };
    let forwards: Vec<RemoteForward> = exposed
        .iter()
        .map(|e| RemoteForward::on_pod_port(e.listen_port, local(e.local)))
        .collect();
    pool.open_remote_forwards(&forwards).await?;
    Ok(Some((pool, forwards)))
}

/// The v0.3.7 banner for `what`, then the reverse tunnels kept up until the run stops.
async fn keep_reverse_tunnels(
    pool: &SshPool,
    forwards: &[RemoteForward],
    lifecycle: &Lifecycle,
    what: &str,
) {
    super::banner(&format!(
        " Now all request to {what} will be redirected to local"
    ));
    pool.keep_remote_forwards(forwards, &lifecycle.stop, None)
        .await;
    pool.close().await;
}
