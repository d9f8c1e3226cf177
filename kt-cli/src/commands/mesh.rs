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
//! v0.3.7's modes without the agent — `auto` with a router pod, stuntman and shadow
//! Services, and `manual` with a version label — are not implemented yet: they are refused
//! before anything is changed.

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
        "mesh --mode {0} (ktctl v0.3.7's way, without kt's node agent) is not supported yet: install the agent (deploy/) and use --mode agent"
    )]
    Unsupported(&'static str),
    #[error(
        "no kt agent is ready in namespace '{namespace}': mesh needs it (install it from deploy/); v0.3.7's router-pod mesh is not supported yet"
    )]
    NoAgent { namespace: &'static str },
    #[error("stopped before the mesh was established; nothing was meshed")]
    Interrupted,
    #[error(transparent)]
    Exchange(#[from] ExchangeError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Lifecycle(#[from] LifecycleError),
}

pub async fn run(settings: &Settings, args: &MeshArgs) -> Result<(), MeshError> {
    let name = cluster::service_name(&args.service);
    let expose = exchange::plan::parse_expose(&args.expose)?;
    let header = plan::parse_version_mark(&args.version_mark, || {
        kt_proto::compat::random_lower(5, rand::random)
    })?;
    match args.mode {
        MeshMode::Manual => return Err(MeshError::Unsupported("manual")),
        MeshMode::Auto | MeshMode::Agent => {}
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
    plan: PortPlan,
    agent: String,
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
    let agent = match cluster::agents::first_ready(&cluster).await? {
        Some(agent) => agent,
        None if args.mode == MeshMode::Agent => {
            return Err(MeshError::NoAgent {
                namespace: kt_proto::agent::NAMESPACE,
            });
        }
        None => return Err(MeshError::Unsupported("auto")),
    };
    exchange::check_ports_served(&Method::Agent(agent.clone()), name, &port_plan, false)?;
    if !args.skip_port_checking {
        for port in port_plan.exposed.iter().map(|e| e.local) {
            exchange::check_local_port(port).await?;
        }
    }
    tracing::info!("Using agent mode");
    if args.router_image != DEFAULT_ROUTER_IMAGE {
        tracing::warn!("Agent mode starts no router pod: --routerImage has no effect");
    }
    if !settings.shadow.customised.is_empty() {
        tracing::warn!(
            "Agent mode starts no shadow pod: {} have no effect",
            settings.shadow.customised.join(", ")
        );
    }
    Ok(Prepared {
        cluster,
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
        plan: port_plan,
        agent,
    } = prepared;
    let ctx = Context::new(settings, &cluster, lifecycle);
    let redirect = AgentRedirect {
        mode: SessionMode::Mesh,
        header: Some(header.clone()),
        banner: plan::banner(header),
        preview: None,
    };
    let result = hold(&ctx, name, &port_plan, agent, &redirect).await;
    match result {
        Ok(()) if !ctx.announced() && lifecycle.stopped_by().is_some() => {
            Err(MeshError::Interrupted)
        }
        other => Ok(other?),
    }
}
