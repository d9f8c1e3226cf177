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
//! Without the agent, `auto` is v0.3.7's ([`auto`]): a router pod `<svc>-kt-router` (kt's
//! router role, which also runs the Go ktctl's `router` commands) takes the Service's
//! selector, a stuntman Service keeps the original pods, a shadow Service per version the
//! developer's shadow.

mod auto;
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
    #[error(transparent)]
    Router(#[from] auto::RouterCommandError),
    #[error("service '{0}' exists and was not created by kt")]
    Foreign(String),
    #[error(
        "service '{0}' is exchanged or was left changed by kt (its selector or kt-selector say so), please try use 'ktctl recover {0}'"
    )]
    NotSane(String),
    #[error(transparent)]
    Lock(#[from] cluster::lock::LockError),
    #[error(
        "no kt agent is ready in namespace '{namespace}' (install it from deploy/, or use --mode auto for v0.3.7's router-pod mesh without it)"
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
    exchange::plan::tcp_only(&expose, "mesh")?;
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
        Ok(prepared) => {
            mesh(
                settings,
                name,
                prepared,
                &header,
                &args.router_image,
                &lifecycle,
            )
            .await
        }
        Err(error) => Err(error),
    };
    lifecycle.finish().await;
    result
}

struct Prepared {
    cluster: Cluster,
    subject: Subject,
    plan: PortPlan,
    how: How,
}

/// How the mesh is done, once `--mode` is resolved.
enum How {
    /// The agent pod to hold the session.
    Agent(String),
    /// v0.3.7's auto mode: a router pod.
    Router,
    Manual,
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
    let agent = match args.mode {
        MeshMode::Manual => None,
        MeshMode::Auto | MeshMode::Agent => {
            cluster::agents::pick(
                &cluster,
                &cluster::agents::endpoints_by_node(&subject.service, &subject.pods),
            )
            .await?
        }
    };
    let how = match (args.mode, agent) {
        (MeshMode::Manual, _) => How::Manual,
        (_, Some(agent)) => How::Agent(agent),
        (MeshMode::Agent, None) => {
            return Err(MeshError::NoAgent {
                namespace: kt_proto::agent::NAMESPACE,
            });
        }
        (MeshMode::Auto, None) => How::Router,
    };
    check_conflict(&cluster, &subject, header, matches!(how, How::Router)).await?;
    let ports = ServicePort::of(&subject.service);
    // A second developer finds the Service pointing at the router: its ports resolve
    // through the original pods.
    let original = subject.as_originally(&cluster).await?;
    let named = exchange::named_ports(&cluster, &original, &ports).await?;
    let port_plan = exchange::plan::plan(name, &ports, &named, expose)?;
    for warning in &port_plan.warnings {
        tracing::warn!("{warning}");
    }
    match &how {
        How::Agent(agent) => {
            exchange::check_ports_served(&Method::Agent(agent.clone()), name, &port_plan, false)?;
        }
        How::Router | How::Manual => manual::check_free(&cluster, name, header).await?,
    }
    if !args.skip_port_checking {
        for port in port_plan.exposed.iter().map(|e| e.local) {
            exchange::check_local_port(port).await?;
        }
    }
    let mode = match how {
        How::Agent(_) => "agent",
        How::Router => "auto (router pod)",
        How::Manual => "manual",
    };
    tracing::info!("Using {mode} mode");
    if args.router_image != DEFAULT_ROUTER_IMAGE && !matches!(how, How::Router) {
        tracing::warn!("{mode} mode starts no router pod: --routerImage has no effect");
    }
    if matches!(how, How::Agent(_)) && !settings.shadow.customised.is_empty() {
        tracing::warn!(
            "Agent mode starts no shadow pod: {} have no effect",
            settings.shadow.customised.join(", ")
        );
    }
    Ok(Prepared {
        cluster,
        subject,
        plan: port_plan,
        how,
    })
}

/// Refuses a Service that an exchange, a session with the same header, or a mesh of the
/// other kind (agent sessions vs a v0.3.7 router; `router` says which this one is) holds
/// ([`plan::mesh_conflict`]).
async fn check_conflict(
    cluster: &Cluster,
    subject: &Subject,
    header: &HeaderMatch,
    router: bool,
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
    match plan::mesh_conflict(&subject.name, exchange, &sessions, header, now, router) {
        Some(conflict) => Err(conflict.into()),
        None => Ok(()),
    }
}

async fn mesh(
    settings: &Settings,
    name: &str,
    prepared: Prepared,
    header: &HeaderMatch,
    router_image: &str,
    lifecycle: &Arc<Lifecycle>,
) -> Result<(), MeshError> {
    let Prepared {
        cluster,
        subject,
        plan: port_plan,
        how,
    } = prepared;
    let ctx = Context::new(settings, &cluster, lifecycle);
    let result = match how {
        How::Agent(agent) => {
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
        How::Manual => manual::mesh(&ctx, &subject, &port_plan, header).await,
        How::Router => auto::mesh(&ctx, &subject, &port_plan, header, router_image).await,
    };
    match result {
        Ok(()) if !ctx.announced() && lifecycle.stopped_by().is_some() => {
            Err(MeshError::Interrupted)
        }
        other => other,
    }
}
