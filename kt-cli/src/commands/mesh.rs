//! `ktctl mesh <svc> --expose local[:remote][,...] [--versionMark key:val]`: only requests
//! that carry the developer's header go to the workstation; every other request stays with
//! the Service's pods, so a team shares one environment.
//!
//! Agent mode (what `auto` picks when kt's agent is installed): a `KtSession` of mode `mesh`
//! carries the header; every node's agent sends the Service's ClusterIP:port and endpoint
//! IP:port to its own router, which routes each HTTP/1.1 request, HTTP/2 stream (gRPC
//! included) and WebSocket upgrade by the header. Several developers mesh one Service with
//! different values. The Service and its workload are never modified.
//!
//! [`manual`] mode, as ktctl v0.3.7: the Service is untouched; a shadow `<svc>-kt-mesh-<ver>`
//! carrying the Service's selector and the label `<key>=<ver>` joins its pods, so that a
//! service mesh's rules (Istio) can route by that label.
//!
//! v0.3.7's `auto` mode without the agent (a router pod, stuntman and shadow Services) is
//! not implemented yet: it is refused before anything is changed.

mod manual;
pub mod plan;

use std::sync::Arc;

use kt_proto::session::{HeaderMatch, KtSession, SessionMode};
use kube::{Api, api::ListParams};

use self::plan::{MeshConflict, VersionMarkError};
use crate::{
    args::{DEFAULT_ROUTER_IMAGE, MeshArgs, MeshMode},
    cluster::{self, Cluster, ClusterError},
    commands::exchange::{
        self, Context, ExchangeError, Method, Subject,
        agent::{AgentRedirect, hold},
        plan::{PlanError, PortPlan, ServicePort},
    },
    lifecycle::{Lifecycle, LifecycleError},
    settings::Settings,
};

#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error(transparent)]
    VersionMark(#[from] VersionMarkError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Conflict(#[from] MeshConflict),
    #[error(
        "mesh --mode {0} without kt's node agent (ktctl v0.3.7's router pod) is not supported yet: install the agent (deploy/), or use --mode manual"
    )]
    Unsupported(&'static str),
    #[error(
        "no kt agent is ready in namespace '{namespace}': mesh needs it (install it from deploy/); v0.3.7's router-pod mesh is not supported yet"
    )]
    NoAgent { namespace: &'static str },
    #[error("stopped before the mesh was established; nothing was meshed")]
    Interrupted,
    #[error(transparent)]
    Exchange(Box<ExchangeError>),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Lifecycle(#[from] LifecycleError),
    #[error(transparent)]
    Shadow(#[from] super::ShadowTunnelError),
    #[error(transparent)]
    Ssh(#[from] crate::ssh_client::SshError),
}

impl From<ExchangeError> for MeshError {
    fn from(error: ExchangeError) -> Self {
        Self::Exchange(Box::new(error))
    }
}

pub async fn run(settings: &Settings, args: &MeshArgs) -> Result<(), MeshError> {
    let name = cluster::service_name(&args.service);
    let expose = exchange::plan::parse_expose(&args.expose)?;
    let header = plan::parse_version_mark(&args.version_mark, || {
        kt_proto::compat::random_lower(5, rand::random)
    })?;
    if args.mode == MeshMode::Manual {
        plan::check_manual_version(&header)?;
    }
    let lifecycle = Lifecycle::start("mesh")?;
    let prepared = tokio::select! {
        () = lifecycle.stop.cancelled() => Err(MeshError::Interrupted),
        prepared = prepare(settings, args, name, &expose, &header) => prepared,
    };
    let result = match prepared {
        Ok(prepared) => mesh(settings, name, prepared, &header, &lifecycle).await,
        Err(error) => Err(error),
    };
    lifecycle.finish().await;
    result
}

struct Prepared {
    cluster: Cluster,
    subject: Subject,
    plan: PortPlan,
    /// The agent pod to hold the session; `None` in manual mode.
    agent: Option<String>,
}

/// Every check before anything is changed: the Service, who holds it, the port plan, the
/// agent, the local ports.
async fn prepare(
    settings: &Settings,
    args: &MeshArgs,
    name: &str,
    expose: &[exchange::plan::ExposeItem],
    header: &HeaderMatch,
) -> Result<Prepared, MeshError> {
    let cluster = cluster::connect(&settings.cluster).await?;
    let subject = exchange::read_subject(&cluster, name).await?;
    check_conflict(&cluster, &subject, header).await?;
    let ports = ServicePort::of(&subject.service);
    let named = exchange::named_ports(&cluster, &subject, &ports).await?;
    let port_plan = exchange::plan::plan(name, &ports, &named, expose)?;
    for warning in &port_plan.warnings {
        tracing::warn!("{warning}");
    }
    let agent = match (args.mode, cluster::agents::first_ready(&cluster).await?) {
        (MeshMode::Manual, _) => None,
        (_, Some(agent)) => Some(agent),
        (MeshMode::Agent, None) => {
            return Err(MeshError::NoAgent {
                namespace: kt_proto::agent::NAMESPACE,
            });
        }
        (MeshMode::Auto, None) => return Err(MeshError::Unsupported("auto")),
    };
    match &agent {
        Some(agent) => {
            exchange::check_ports_served(&Method::Agent(agent.clone()), name, &port_plan, false)?;
        }
        None => manual::check_free(&cluster, name, header).await?,
    }
    if !args.skip_port_checking {
        for port in port_plan.exposed.iter().map(|e| e.local) {
            exchange::check_local_port(port).await?;
        }
    }
    let mode = if agent.is_some() { "agent" } else { "manual" };
    tracing::info!("Using {mode} mode");
    if args.router_image != DEFAULT_ROUTER_IMAGE {
        tracing::warn!("{mode} mode starts no router pod: --routerImage has no effect");
    }
    if agent.is_some() && !settings.shadow.customised.is_empty() {
        tracing::warn!(
            "Agent mode starts no shadow pod: {} have no effect",
            settings.shadow.customised.join(", ")
        );
    }
    Ok(Prepared {
        cluster,
        subject,
        plan: port_plan,
        agent,
    })
}

/// Refuses a Service that an exchange, a v0.3.7 router or a session with the same header
/// holds ([`plan::mesh_conflict`]).
async fn check_conflict(
    cluster: &Cluster,
    subject: &Subject,
    header: &HeaderMatch,
) -> Result<(), MeshError> {
    let api: Api<KtSession> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    let sessions = match api.list(&ListParams::default()).await {
        Ok(list) => list.items,
        // Without kt's CRD there is no agent, and mesh needs one (checked next).
        Err(kube::Error::Api(status)) if status.code == 404 => Vec::new(),
        Err(e) => return Err(ClusterError::api("list sessions")(e).into()),
    };
    let now = chrono::Utc::now();
    let exchange = exchange::plan::conflict(
        &subject.name,
        &subject.service,
        &sessions,
        &subject.pods,
        now,
    );
    match plan::mesh_conflict(&subject.name, exchange, &sessions, header, now) {
        Some(conflict) => Err(conflict.into()),
        None => Ok(()),
    }
}

async fn mesh(
    settings: &Settings,
    name: &str,
    prepared: Prepared,
    header: &HeaderMatch,
    lifecycle: &Arc<Lifecycle>,
) -> Result<(), MeshError> {
    let Prepared {
        cluster,
        subject,
        plan: port_plan,
        agent,
    } = prepared;
    let ctx = Context::new(settings, &cluster, lifecycle);
    let result = match agent {
        Some(agent) => {
            let redirect = AgentRedirect {
                mode: SessionMode::Mesh,
                header: Some(header.clone()),
                banner: plan::banner(header),
                preview: None,
            };
            hold(&ctx, name, &port_plan, agent, &redirect)
                .await
                .map_err(MeshError::from)
        }
        None => manual::mesh(&ctx, &subject, &port_plan, header).await,
    };
    match result {
        Ok(()) if !ctx.announced() && lifecycle.stopped_by().is_some() => {
            Err(MeshError::Interrupted)
        }
        other => other,
    }
}
