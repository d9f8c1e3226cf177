//! Agent mode: a `KtSession` names the Service, its ports and the session key; an agent
//! holds it (its listeners become the redirect target on every node) while this SSH
//! connection lives. The Service and its workload are never touched. When the holding agent
//! goes away (deleted, its node down), the session moves to another ready agent.
//!
//! Which agent: the first ready one by name (every session lands on one node; see the scale
//! issue for spreading them).

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kt_proto::{
    agent::{LABEL_SELECTOR, Login, NAMESPACE},
    compat,
    session::{DEFAULT_LEASE_SECONDS, KtSession, PortMapping, SessionMode, SessionSpec},
};
use kube::{
    Api,
    api::{DeleteParams, ListParams, PostParams},
};

use super::{Context, ExchangeError, local, plan::Exposed};
use crate::{
    cluster::{Cluster, ClusterError},
    ssh_client::{ForwardsEnded, RemoteForward, SessionKey, SshPool, Target},
};

/// How many reconnects to a holding agent fail before the session moves to another.
const RECONNECTS_BEFORE_MOVING: usize = 3;
/// How long to wait for a different agent before taking whichever is ready.
const WAIT_FOR_ANOTHER_AGENT: Duration = Duration::from_secs(10);

/// A ready agent pod from `deploy/`, if the agent is installed and visible to this user
/// (the first by name).
pub(super) async fn ready_agent(cluster: &Cluster) -> Result<Option<String>, ExchangeError> {
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), NAMESPACE);
    let list = match pods
        .list(&ListParams::default().labels(LABEL_SELECTOR))
        .await
    {
        Ok(list) => list,
        // Not installed, or not visible to this user: no agent mode.
        Err(kube::Error::Api(status)) if matches!(status.code, 403 | 404) => return Ok(None),
        Err(e) => return Err(ClusterError::api("look for the kt agent")(e).into()),
    };
    let mut ready: Vec<String> = list
        .items
        .into_iter()
        .filter(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .filter_map(|p| p.metadata.name)
        .collect();
    ready.sort();
    Ok(ready.into_iter().next())
}

pub(super) async fn exchange(
    ctx: &Context<'_>,
    service: &str,
    exposed: &[Exposed],
    mut agent: String,
) -> Result<(), ExchangeError> {
    let key = SessionKey::generate();
    let name = format!("{service}-kt-{}", compat::random_lower(5, rand::random));
    let namespace = ctx.cluster.namespace.clone();
    let object = KtSession::create(
        &name,
        &namespace,
        SessionSpec {
            owner: ctx.settings.identity.owner(),
            mode: SessionMode::Exchange,
            service: service.to_owned(),
            ports: exposed
                .iter()
                .map(|e| PortMapping {
                    port: e.service_port,
                    local_port: e.local,
                })
                .collect(),
            public_key: key.public_line.clone(),
            lease_seconds: DEFAULT_LEASE_SECONDS,
        },
    );
    let sessions: Api<KtSession> = Api::namespaced(ctx.cluster.client.clone(), &namespace);
    sessions
        .create(&PostParams::default(), &object)
        .await
        .map_err(ClusterError::api(format!("create session {name}")))?;
    tracing::info!("Created session {name}");
    {
        let name = name.clone();
        ctx.lifecycle.defer(format!("session {name}"), async move {
            sessions.delete(&name, &DeleteParams::default()).await?;
            tracing::info!("Cleaning session {name}");
            Ok::<(), kube::Error>(())
        });
    }
    let forwards: Vec<RemoteForward> = exposed
        .iter()
        .map(|e| RemoteForward::for_service_port(e.service_port, local(e.local)))
        .collect();
    let login = Login {
        namespace,
        session: name.clone(),
    };
    let mut announced = false;
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
        if announced {
            tracing::info!("Session {name} is held by agent {agent} now");
        } else {
            super::super::banner(&format!(
                " Now all request to service '{service}' will be redirected to local"
            ));
            announced = true;
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
        match ready_agent(ctx.cluster).await? {
            Some(next) if next != gone || started.elapsed() >= WAIT_FOR_ANOTHER_AGENT => {
                return Ok(Some(next));
            }
            _ => {}
        }
    }
}
