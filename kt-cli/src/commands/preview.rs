//! `ktctl preview <name> --expose port[:remote][,...]`: a workstation port published in the
//! cluster as the Service `<name>`, so that pods — and other developers' `ktctl forward` —
//! reach it.
//!
//! - Agent mode (what `auto` picks when kt's agent is installed): a `KtSession` of mode
//!   `preview` is held by an agent, which listens for each port on its node; ktctl then
//!   writes a selector-less Service and an EndpointSlice pointing at those listeners, both
//!   owned by the session, so they go with it (Ctrl-C deletes them; after `kill -9` the
//!   agents end the unheld session within its lease and the cluster's garbage collector
//!   removes them).
//! - Shadow mode (without the agent), as ktctl v0.3.7 does it (`../shared/reference/
//!   ktctl-v0.3.7.md` §3.5): a shadow pod `<name>-kt-xxxxx` with reverse tunnels and a
//!   Service selecting it.
//!
//! A name that is already a Service is refused: kt never takes over a Service it did not
//! create.

pub mod objects;

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kt_proto::{
    compat,
    session::{KtSession, SessionMode},
};
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};

use self::objects::Owner;
pub use self::objects::Published;
use crate::{
    args::{PreviewArgs, PreviewMode},
    cluster::{self, Cluster, ClusterError, heartbeat},
    commands::exchange::{
        self, Context, ExchangeError,
        agent::{AgentRedirect, hold},
        plan::{Exposed, PlanError, PortPlan, ServicePort, Transport},
    },
    lifecycle::{Lifecycle, LifecycleError},
    settings::Settings,
    shadow::ShadowSpec,
    ssh_client::{RemoteForward, SshPool},
};

#[derive(Debug, thiserror::Error)]
pub enum PreviewError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(
        "invalid service name '{0}': use lower-case letters, digits and '-', starting with a letter (at most 63)"
    )]
    Name(String),
    #[error("service '{0}' already exists and was not created by kt; choose another name")]
    Foreign(String),
    #[error("service '{name}' is already previewed by {user}")]
    Previewed { name: String, user: String },
    #[error(
        "no kt agent is ready in namespace '{namespace}' (install it from deploy/, or use --mode shadow)"
    )]
    NoAgent { namespace: &'static str },
    #[error("stopped before the preview was published; nothing was created")]
    Interrupted,
    /// Boxed: agent mode's errors are large and rare.
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

impl From<ExchangeError> for PreviewError {
    fn from(error: ExchangeError) -> Self {
        Self::Exchange(Box::new(error))
    }
}

/// What agent mode publishes once the holding agent listens.
#[derive(Clone, Debug)]
pub struct Publication {
    /// The Service's name.
    pub name: String,
    pub ports: Vec<Published>,
    /// `--external`: type LoadBalancer.
    pub external: bool,
}

/// v0.3.7's banner.
fn banner(name: &str) -> String {
    format!(" Now you can access your local service in cluster by name '{name}'")
}

pub async fn run(settings: &Settings, args: &PreviewArgs) -> Result<(), PreviewError> {
    let expose = exchange::plan::parse_expose(&args.expose)?;
    exchange::plan::tcp_only(&expose, "preview")?;
    let ports = objects::published(&expose)?;
    let name = args.name.as_str();
    if !objects::valid_name(name) {
        return Err(PreviewError::Name(name.to_owned()));
    }
    let lifecycle = Lifecycle::start("preview")?;
    let prepared = tokio::select! {
        () = lifecycle.stop.cancelled() => Err(PreviewError::Interrupted),
        prepared = prepare(settings, args, &ports) => prepared,
    };
    let result = match prepared {
        Ok((cluster, agent)) => {
            let ctx = Context::new(settings, &cluster, &lifecycle);
            let publication = Publication {
                name: name.to_owned(),
                ports,
                external: args.external,
            };
            let result = match agent {
                Some(agent) => by_agent(&ctx, agent, publication).await,
                None => by_shadow(&ctx, &publication).await,
            };
            match result {
                Ok(()) if !ctx.announced() && lifecycle.stopped_by().is_some() => {
                    Err(PreviewError::Interrupted)
                }
                other => other,
            }
        }
        Err(error) => Err(error),
    };
    lifecycle.finish().await;
    result
}

/// Every check before anything is created: the name is free, the local ports answer, the
/// mode. The agent pod to hold the session, or `None` for shadow mode.
async fn prepare(
    settings: &Settings,
    args: &PreviewArgs,
    ports: &[Published],
) -> Result<(Cluster, Option<String>), PreviewError> {
    let cluster = cluster::connect(&settings.cluster).await?;
    let services: Api<Service> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    let existing = services
        .get_opt(&args.name)
        .await
        .map_err(ClusterError::api(format!("get service {}", args.name)))?;
    if let Some(existing) = existing {
        let meta = &existing.metadata;
        let ours = meta
            .labels
            .as_ref()
            .and_then(|l| l.get(compat::CONTROL_BY))
            .is_some_and(|v| v == compat::CONTROL_BY_KT);
        if !ours {
            return Err(PreviewError::Foreign(args.name.clone()));
        }
        let user = meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(compat::USER))
            .cloned()
            .unwrap_or_else(|| "unknown user".into());
        return Err(PreviewError::Previewed {
            name: args.name.clone(),
            user,
        });
    }
    if !args.skip_port_checking {
        for port in ports {
            exchange::check_local_port(port.local).await?;
        }
    }
    let agent = match args.mode {
        PreviewMode::Shadow => None,
        PreviewMode::Agent => Some(
            cluster::agents::pick(&cluster, &BTreeMap::new())
                .await?
                .ok_or(PreviewError::NoAgent {
                    namespace: kt_proto::agent::NAMESPACE,
                })?,
        ),
        PreviewMode::Auto => cluster::agents::pick(&cluster, &BTreeMap::new()).await?,
    };
    tracing::info!(
        "Using {} mode",
        if agent.is_some() { "agent" } else { "shadow" }
    );
    if agent.is_some() && !settings.shadow.customised.is_empty() {
        tracing::warn!(
            "Agent mode starts no shadow pod: {} have no effect",
            settings.shadow.customised.join(", ")
        );
    }
    Ok((cluster, agent))
}

async fn by_agent(
    ctx: &Context<'_>,
    agent: String,
    publication: Publication,
) -> Result<(), PreviewError> {
    // The agent's listeners stand for the Service ports; each forwards to its local port.
    let plan = PortPlan {
        exposed: publication
            .ports
            .iter()
            .map(|p| Exposed {
                local: p.local,
                target: p.port,
                transport: Transport::Tcp,
                service_ports: vec![ServicePort {
                    name: None,
                    port: p.port,
                    protocol: "TCP".into(),
                    target: None,
                }],
            })
            .collect(),
        ..PortPlan::default()
    };
    let name = publication.name.clone();
    let redirect = AgentRedirect {
        mode: SessionMode::Preview,
        header: None,
        banner: banner(&name),
        preview: Some(publication),
    };
    Ok(hold(ctx, &name, &plan, agent, &redirect).await?)
}

/// How long the holding agent may take to report its listeners in the session's status.
const LISTENERS_WITHIN: Duration = Duration::from_secs(10);

/// Agent mode: writes the Service and EndpointSlice of `publication` pointing at the holding
/// agent's listeners (the first time, with their deletion on exit), or points the
/// EndpointSlice at a new holder; then waits until every published port answers at the
/// Service's ClusterIP, dialled by the holding agent through the cluster's proxy
/// ([`until_reachable`]).
pub(crate) async fn publish(
    ctx: &Context<'_>,
    pool: &SshPool,
    sessions: &Api<KtSession>,
    session: &str,
    publication: &Publication,
    published: &mut bool,
) -> Result<(), ExchangeError> {
    let namespace = &ctx.cluster.namespace;
    let deadline = tokio::time::Instant::now() + LISTENERS_WITHIN;
    let (owner, slice) = loop {
        let object = sessions
            .get(session)
            .await
            .map_err(ClusterError::api(format!("get session {session}")))?;
        let owner = Owner {
            session: session.to_owned(),
            uid: object.metadata.uid.clone().unwrap_or_default(),
            user: ctx.settings.identity.user.clone(),
        };
        let slice = object.status.as_ref().and_then(|status| {
            objects::endpoint_slice(
                &publication.name,
                namespace,
                &owner,
                &publication.ports,
                status.address?,
                &status.listeners,
            )
        });
        if let Some(slice) = slice {
            break (owner, slice);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ExchangeError::NoListeners {
                session: session.to_owned(),
                within: LISTENERS_WITHIN.as_secs(),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let services: Api<Service> = Api::namespaced(ctx.cluster.client.clone(), namespace);
    let slices: Api<EndpointSlice> = Api::namespaced(ctx.cluster.client.clone(), namespace);
    let slice_name = slice.metadata.name.clone().unwrap_or_default();
    if *published {
        let patch = serde_json::json!({"endpoints": slice.endpoints, "ports": slice.ports});
        slices
            .patch(&slice_name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(ClusterError::api(format!(
                "update endpointslice {slice_name}"
            )))?;
        tracing::info!("EndpointSlice {slice_name} points at the new holder");
        return until_reachable(ctx, pool, &services, publication).await;
    }
    let service = objects::service(
        &publication.name,
        namespace,
        &owner,
        &publication.ports,
        publication.external,
    );
    services
        .create(&PostParams::default(), &service)
        .await
        .map_err(ClusterError::api(format!(
            "create service {}",
            publication.name
        )))?;
    defer_delete(
        ctx.lifecycle,
        services.clone(),
        "service",
        publication.name.clone(),
    );
    slices
        .create(&PostParams::default(), &slice)
        .await
        .map_err(ClusterError::api(format!(
            "create endpointslice {slice_name}"
        )))?;
    defer_delete(ctx.lifecycle, slices, "endpointslice", slice_name);
    *published = true;
    until_reachable(ctx, pool, &services, publication).await
}

/// After how long a Service that does not answer yet is reported (waiting goes on).
const REACHABLE_WITHIN: Duration = Duration::from_secs(10);

/// Waits until a connection to each published port of the Service's ClusterIP, opened by
/// the holding agent, succeeds: the cluster's proxy sends it to the listener, so pods reach
/// the workstation. Says what is missing after [`REACHABLE_WITHIN`]; returns early when the
/// run stops.
async fn until_reachable(
    ctx: &Context<'_>,
    pool: &SshPool,
    services: &Api<Service>,
    publication: &Publication,
) -> Result<(), ExchangeError> {
    let name = &publication.name;
    let service = services
        .get(name)
        .await
        .map_err(ClusterError::api(format!("get service {name}")))?;
    let Some(cluster_ip) = service
        .spec
        .and_then(|s| s.cluster_ip)
        .filter(|ip| ip != "None")
    else {
        return Ok(());
    };
    let started = tokio::time::Instant::now();
    let mut said = false;
    for port in &publication.ports {
        loop {
            if let Ok(Ok(channel)) =
                tokio::time::timeout(Duration::from_secs(2), pool.open(&cluster_ip, port.port))
                    .await
            {
                let _ = channel.close().await;
                break;
            }
            if !said && started.elapsed() >= REACHABLE_WITHIN {
                said = true;
                tracing::warn!(
                    "Service {name} ({cluster_ip}:{}) does not answer yet after {} s; waiting",
                    port.port,
                    REACHABLE_WITHIN.as_secs()
                );
            }
            tokio::select! {
                () = ctx.lifecycle.stop.cancelled() => return Ok(()),
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    }
    Ok(())
}

/// Deletes `kind` `name` when the run finishes (`Cleaning <kind> <name>`, as v0.3.7 logs).
fn defer_delete<K>(lifecycle: &Lifecycle, api: Api<K>, kind: &'static str, name: String)
where
    K: kube::Resource
        + Clone
        + k8s_openapi::serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    lifecycle.defer(format!("{kind} {name}"), async move {
        match api.delete(&name, &DeleteParams::default()).await {
            Err(kube::Error::Api(status)) if status.code == 404 => {
                tracing::info!("Cleaning {kind} {name}");
                Ok(())
            }
            Ok(_) => {
                tracing::info!("Cleaning {kind} {name}");
                Ok(())
            }
            Err(error) => Err(error),
        }
    });
}

/// Shadow mode, as v0.3.7: the shadow with a reverse tunnel per port, and the Service
/// selecting it.
async fn by_shadow(ctx: &Context<'_>, publication: &Publication) -> Result<(), PreviewError> {
    let name = &publication.name;
    let namespace = ctx.cluster.namespace.clone();
    let target = compat::random_target(rand::random);
    let shadow = format!("{name}-kt-{}", compat::random_lower(5, rand::random));
    let mut spec = ShadowSpec::new(
        &ctx.settings.shadow,
        shadow.clone(),
        namespace.clone(),
        compat::ROLE_SHADOW_PREVIEW,
        &ctx.settings.identity.user,
    );
    spec.labels.insert(compat::TARGET.into(), target.clone());
    spec.annotations
        .insert(compat::CONFIG.into(), format!("service={name}"));
    spec.ports = publication
        .ports
        .iter()
        .map(|p| (format!("kt-{}", p.port), p.port))
        .collect();
    let Some(pool) =
        super::shadow_tunnel(ctx.settings, ctx.cluster, ctx.lifecycle, &spec, 1).await?
    else {
        return Ok(());
    };
    let selector = BTreeMap::from([
        (
            compat::ROLE.to_owned(),
            compat::ROLE_SHADOW_PREVIEW.to_owned(),
        ),
        (compat::TARGET.to_owned(), target),
    ]);
    let service = Service {
        metadata: kube::core::ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(namespace.clone()),
            labels: Some(BTreeMap::from([(
                compat::CONTROL_BY.to_owned(),
                compat::CONTROL_BY_KT.to_owned(),
            )])),
            annotations: Some(BTreeMap::from([
                (compat::USER.to_owned(), ctx.settings.identity.user.clone()),
                heartbeat::annotation(&ctx.cluster.clock),
            ])),
            ..Default::default()
        },
        spec: Some(k8s_openapi::api::core::v1::ServiceSpec {
            selector: Some(selector),
            ..objects::service_spec(&publication.ports, publication.external)
        }),
        status: None,
    };
    let services: Api<Service> = Api::namespaced(ctx.cluster.client.clone(), &namespace);
    services
        .create(&PostParams::default(), &service)
        .await
        .map_err(ClusterError::api(format!("create service {name}")))?;
    defer_delete(ctx.lifecycle, services, "service", name.clone());
    ctx.lifecycle.tasks.spawn(heartbeat::keep(
        ctx.cluster.client.clone(),
        namespace.clone(),
        ctx.cluster.clock,
        vec![(heartbeat::Kind::Service, name.clone())],
        ctx.lifecycle.done.clone(),
    ));
    let forwards: Vec<RemoteForward> = publication
        .ports
        .iter()
        .map(|p| RemoteForward::on_pod_port(p.port, local(p.local)))
        .collect();
    pool.open_remote_forwards(&forwards).await?;
    for p in &publication.ports {
        tracing::info!(
            "Forward remote {shadow}:{} -> 127.0.0.1:{}",
            p.port,
            p.local
        );
    }
    if exchange::wait_for_shadow_endpoints(ctx, name, &pool.target().pod).await {
        ctx.announce_banner(&banner(name));
        pool.keep_remote_forwards(&forwards, &ctx.lifecycle.stop, None)
            .await;
    }
    pool.close().await;
    Ok(())
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}
