//! Agent mode (of `exchange`, and of `mesh` with the session's header): a `KtSession` names
//! the Service, its exposed TCP ports (and an exchange's UDP ports) and the session key;
//! an agent holds it (its listeners become the redirect target on every node) while this SSH
//! connection lives. The Service and its workload are never touched. The banner comes once
//! every ready agent reports the session's ports programmed in its node's map; when the
//! holding agent goes away (deleted, its node down), the session moves to another one.
//!
//! Which agent holds it: the first ready one by name (so every session lands on one node;
//! spreading them is the scale issue's).

use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use kt_proto::{
    agent::{Login, NAMESPACE},
    compat,
    session::{
        DEFAULT_LEASE_SECONDS, HeaderMatch, KtSession, PortMapping, SessionMode, SessionSpec,
    },
};
use kube::Api;

use super::{
    Context, ExchangeError, local,
    plan::{PortPlan, Transport},
};
use crate::{
    cluster::{self, ClusterError},
    progress::Progress,
    ssh_client::{ForwardsEnded, RemoteForward, SessionKey, SshPool, Target},
};

/// How many reconnects to a holding agent fail before the session moves to another.
const RECONNECTS_BEFORE_MOVING: usize = 3;
/// How long to wait for a different agent before taking whichever is ready.
const WAIT_FOR_ANOTHER_AGENT: Duration = Duration::from_secs(10);
/// How long the agents get to program the session before ktctl says what is missing.
const PROGRAMMED_WITHIN: Duration = Duration::from_secs(10);

/// What an agent-mode session redirects, and the banner that says so once every agent has
/// it in force.
pub(crate) struct AgentRedirect {
    /// [`SessionMode::Exchange`] or [`SessionMode::Mesh`].
    pub mode: SessionMode,
    /// The mesh header.
    pub header: Option<HeaderMatch>,
    /// The banner's message line.
    pub banner: String,
    /// For `preview`: the Service to publish once the agent listens.
    pub preview: Option<crate::commands::preview::Publication>,
}

/// Holds the session of `redirect` for `service` at `agent` (moving it when that agent
/// goes) until the run stops.
pub(crate) async fn hold(
    ctx: &Context<'_>,
    service: &str,
    plan: &PortPlan,
    mut agent: String,
    redirect: &AgentRedirect,
) -> Result<(), ExchangeError> {
    let key = SessionKey::generate();
    let infix = match redirect.mode {
        SessionMode::Mesh => "kt-mesh",
        SessionMode::Preview => "kt-preview",
        _ => "kt",
    };
    let name = format!(
        "{service}-{infix}-{}",
        compat::random_lower(5, rand::random)
    );
    let namespace = ctx.cluster.namespace.clone();
    let object = KtSession::create(
        &name,
        &namespace,
        SessionSpec {
            owner: ctx.settings.identity.owner(),
            mode: redirect.mode,
            service: service.to_owned(),
            ports: port_mappings(plan, Transport::Tcp),
            udp_ports: port_mappings(plan, Transport::Udp),
            public_key: key.public_line.clone(),
            header: redirect.header.clone(),
            lease_seconds: DEFAULT_LEASE_SECONDS,
        },
    );
    let sessions =
        cluster::agents::create_session(&ctx.cluster.client, ctx.lifecycle, &namespace, &object)
            .await?;
    let forwards: Vec<RemoteForward> = plan
        .service_ports_of(Transport::Tcp)
        .map(|(p, l)| RemoteForward::for_service_port(p.port, local(l)))
        .chain(
            plan.service_ports_of(Transport::Udp)
                .map(|(p, l)| RemoteForward::for_udp_service_port(p.port, local(l))),
        )
        .collect();
    let ports = SessionPorts {
        tcp: plan
            .service_ports_of(Transport::Tcp)
            .map(|(p, _)| p.port)
            .collect(),
        udp: plan
            .service_ports_of(Transport::Udp)
            .map(|(p, _)| p.port)
            .collect(),
    };
    let login = Login {
        namespace,
        session: name.clone(),
    };
    let mut published = false;
    loop {
        let pool = SshPool::new(
            ctx.cluster.client.clone(),
            Target::agent(&agent, &login),
            key.private.clone(),
            ctx.settings.ssh.transport,
            1,
        );
        tokio::select! {
            () = ctx.lifecycle.stop.cancelled() => return Ok(()),
            started = pool.start(ctx.settings.ssh.connect_timeout) => { started?; }
        }
        pool.open_remote_forwards(&forwards).await?;
        log_listeners(&sessions, &name, &agent, plan).await;
        if let Some(preview) = &redirect.preview {
            crate::commands::preview::publish(
                ctx,
                &pool,
                &sessions,
                &name,
                preview,
                &mut published,
            )
            .await?;
        }
        if ctx.announced() {
            tracing::info!("Session {name} is held by agent {agent} now");
        } else if redirect.preview.is_some() {
            ctx.announce_banner(&redirect.banner);
        } else {
            match wait_programmed(ctx, &pool, &sessions, &name, &ports).await? {
                Wait::Programmed => ctx.announce_banner(&redirect.banner),
                Wait::Stopped => {
                    pool.close().await;
                    return Ok(());
                }
                // The holder went away before every node had the redirect: hold it again,
                // at the agent the DaemonSet has now, and wait again.
                Wait::HolderLost => {
                    pool.close().await;
                    tracing::warn!("Agent {agent} went away before the redirect was in force");
                    match next_agent(ctx, &agent).await? {
                        Some(next) => agent = next,
                        None => return Ok(()),
                    }
                    continue;
                }
            }
        }
        let ended = pool
            .keep_remote_forwards(
                &forwards,
                &ctx.lifecycle.stop,
                Some(RECONNECTS_BEFORE_MOVING),
            )
            .await;
        pool.close().await;
        if ended == ForwardsEnded::Stopped {
            return Ok(());
        }
        tracing::warn!("Agent {agent} is gone, moving session {name} to another agent");
        match next_agent(ctx, &agent).await? {
            Some(next) => agent = next,
            None => return Ok(()),
        }
    }
}

/// The session's port mappings of `transport`.
fn port_mappings(plan: &PortPlan, transport: Transport) -> Vec<PortMapping> {
    plan.service_ports_of(transport)
        .map(|(p, local)| PortMapping {
            port: p.port,
            local_port: local,
        })
        .collect()
}

/// Whether `node`'s agent acknowledged the session without `udpPorts`, as an agent that
/// predates UDP exchange does.
fn predates_udp(session: Option<&KtSession>, node: &str) -> bool {
    session
        .and_then(|s| s.status.as_ref())
        .and_then(|s| s.programmed.get(node))
        .is_some_and(|ack| ack.udp_ports.is_none())
}

/// The Service ports of a session, by transport.
struct SessionPorts {
    tcp: Vec<u16>,
    udp: Vec<u16>,
}

impl SessionPorts {
    /// Every port as [`KtSession::unprogrammed`] names it: `80`, `53/udp`.
    fn all(&self) -> Vec<String> {
        let tcp = self.tcp.iter().map(u16::to_string);
        tcp.chain(self.udp.iter().map(|p| format!("{p}/udp")))
            .collect()
    }
}

/// Where each exposed Service port arrives: the holding agent's node and listener.
async fn log_listeners(sessions: &Api<KtSession>, name: &str, agent: &str, plan: &PortPlan) {
    let Ok(Some(session)) = sessions.get_opt(name).await else {
        return;
    };
    let Some(status) = session.status else {
        return;
    };
    let address = status.address.map(|a| a.to_string()).unwrap_or_default();
    for (port, local) in plan.service_ports() {
        let listeners = match port.protocol.as_str() {
            "UDP" => &status.udp_listeners,
            _ => &status.listeners,
        };
        if let Some(listener) = listeners.iter().find(|l| l.port == port.port) {
            tracing::info!(
                "Port {port} -> 127.0.0.1:{local}, held by agent {agent} on {} (listener {address}:{})",
                status.node,
                listener.listener_port
            );
        }
    }
}

/// How waiting for the agents ended.
enum Wait {
    /// Every ready agent has the session's ports programmed for the current holder.
    Programmed,
    /// The holding agent's connection closed first.
    HolderLost,
    /// The run was stopped.
    Stopped,
}

/// Waits until every ready agent reports the session's `ports` programmed for the current
/// holder (agents are re-read as they come and go; no ready agent is not "everywhere"). After
/// [`PROGRAMMED_WITHIN`] says which node lacks which port, and goes on waiting. Polls: a
/// session object and the agents' pods are small.
async fn wait_programmed(
    ctx: &Context<'_>,
    pool: &SshPool,
    sessions: &Api<KtSession>,
    name: &str,
    ports: &SessionPorts,
) -> Result<Wait, ExchangeError> {
    let started = tokio::time::Instant::now();
    let mut said = false;
    let mut progress = Progress::start("every node's agent to redirect the Service");
    loop {
        if !pool.is_connected().await {
            return Ok(Wait::HolderLost);
        }
        let nodes: Vec<String> = cluster::agents::ready(ctx.cluster)
            .await?
            .into_iter()
            .map(|(_, node)| node)
            .collect();
        let session = sessions
            .get_opt(name)
            .await
            .map_err(ClusterError::api(format!("get session {name}")))?;
        let missing = match &session {
            Some(session) if !nodes.is_empty() => {
                session.unprogrammed(&nodes, &ports.tcp, &ports.udp)
            }
            _ => vec![("any node (no agent is ready)".to_owned(), ports.all())],
        };
        if missing.is_empty() {
            drop(progress);
            warn_uncovered_nodes(ctx, nodes.len()).await;
            return Ok(Wait::Programmed);
        }
        let waiting_for: Vec<&str> = missing.iter().map(|(node, _)| node.as_str()).collect();
        progress.show_if_due(&waiting_for.join(", "));
        if !said && started.elapsed() >= PROGRAMMED_WITHIN {
            said = true;
            for (node, unprogrammed) in missing {
                if !ports.udp.is_empty() && predates_udp(session.as_ref(), &node) {
                    tracing::warn!(
                        "Not redirected on node {node}: its kt agent predates UDP exchange (update the DaemonSet from this kt's deploy/; until then clients on {node} reach the pods)"
                    );
                    continue;
                }
                tracing::warn!(
                    "Not redirected on node {node} yet: port {} (its agent has not programmed them within {} s; the Service may have no ClusterIP and no ready endpoint for them, or another session holds its pods)",
                    unprogrammed.join(", "),
                    PROGRAMMED_WITHIN.as_secs()
                );
            }
        }
        // Quick at first (the agents answer within a second), then every half second.
        let pause = if started.elapsed() < Duration::from_secs(3) {
            Duration::from_millis(100)
        } else {
            Duration::from_millis(500)
        };
        tokio::select! {
            () = ctx.lifecycle.stop.cancelled() => return Ok(Wait::Stopped),
            () = tokio::time::sleep(pause) => {}
        }
    }
}

/// Says so when the agent's DaemonSet wants more pods than `ready` are ready: clients on
/// those nodes are not redirected. Silent when the DaemonSet cannot be read.
async fn warn_uncovered_nodes(ctx: &Context<'_>, ready: usize) {
    let daemon_sets: Api<DaemonSet> = Api::namespaced(ctx.cluster.client.clone(), NAMESPACE);
    let Ok(Some(daemon_set)) = daemon_sets.get_opt(kt_proto::agent::NAME).await else {
        return;
    };
    let wanted = daemon_set.status.map_or(0, |s| {
        usize::try_from(s.desired_number_scheduled).unwrap_or(0)
    });
    if wanted > ready {
        tracing::warn!(
            "Only {ready} of {wanted} nodes run a ready kt agent: clients on the other nodes still reach the pods"
        );
    }
}

/// Another ready agent if one comes within [`WAIT_FOR_ANOTHER_AGENT`]; after that
/// whichever is ready (the same one may have been only out of reach). `None` when the run
/// is stopped meanwhile.
async fn next_agent(ctx: &Context<'_>, gone: &str) -> Result<Option<String>, ExchangeError> {
    let started = tokio::time::Instant::now();
    let mut poll = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = ctx.lifecycle.stop.cancelled() => return Ok(None),
            _ = poll.tick() => {}
        }
        match cluster::agents::first_ready(ctx.cluster).await? {
            Some(next) if next != gone || started.elapsed() >= WAIT_FOR_ANOTHER_AGENT => {
                return Ok(Some(next));
            }
            _ => {}
        }
    }
}
