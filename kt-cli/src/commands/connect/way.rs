//! Where the workstation's connections leave in the cluster, and what ktctl learns there
//! about the cluster's network:
//!
//! - through kt's **agent**: a `KtSession` of mode `connect` names the session key; the agent
//!   that holds it dials each connection from its node (no pod per user, nothing privileged
//!   per user) and tells the cluster's pod and Service ranges and its DNS in the session's
//!   status;
//! - through a **shadow** pod, as ktctl v0.3.7 does (`kt-connect-shadow-<rand>`, role
//!   `shadow-connect`, its DNS relay on port 53), or the shared `kt-connect-shadow-daemon`
//!   (`--shareShadow`), counted by `kt-ref-count` and deleted by the last one out. ktctl finds
//!   the ranges itself then, from what it may list.

use std::{collections::BTreeSet, net::IpAddr, sync::Arc, time::Duration};

use k8s_openapi::api::core::v1::{Node, Pod, Service};
use kt_proto::{
    agent::Login,
    compat,
    net::{Cidr, covering_ranges},
    session::{ClusterNetwork, DEFAULT_LEASE_SECONDS, KtSession, SessionMode, SessionSpec},
};
use kube::{Api, api::ListParams, runtime::wait::await_condition};

use super::{ConnectError, Context, dns::ClusterDns};
use crate::{
    cluster::{ClusterError, agents},
    commands::{self, ShadowTunnel, ShadowTunnelError},
    shadow::{self, ShadowError, ShadowSpec, Teardown},
    ssh_client::{Route, SessionKey, SshPool, Target},
};

/// How long the agent may take to tell the cluster's network after the login.
const NETWORK_WITHIN: Duration = Duration::from_secs(10);
/// The shadow's DNS relay, seen from the shadow (v0.3.7 contract: port 53 of the pod).
const SHADOW_DNS: (&str, u16) = ("127.0.0.1", 53);
/// v0.3.7 lists at most this many Services and pods to guess ranges from.
const LIST_LIMIT: u32 = 1000;

/// The cluster's ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Ranges {
    pub pods: Vec<Cidr>,
    pub services: Vec<Cidr>,
}

impl Ranges {
    fn from_network(network: &ClusterNetwork) -> Self {
        let parse = |list: &[String]| list.iter().filter_map(|c| c.parse().ok()).collect();
        Self {
            pods: parse(&network.pod_cidrs),
            services: parse(&network.service_cidrs),
        }
    }
}

/// The cluster side, ready.
pub(super) struct Way {
    pub pool: Arc<SshPool>,
    /// Where the SSH connections go (a direct peer must stay outside the tunnel).
    pub route: Route,
    pub dns: ClusterDns,
    pub ranges: Ranges,
    /// The session object (agent mode), watched for range changes.
    pub session: Option<String>,
    /// The shadow pod's address and key file (shadow mode: what sshuttle needs).
    pub shadow: Option<ShadowPod>,
}

pub(super) struct ShadowPod {
    pub name: String,
    pub ip: Option<IpAddr>,
    pub key_file: std::path::PathBuf,
}

impl Way {
    /// Addresses the tunnel travels to, never to be routed into it.
    pub(super) fn peers(&self) -> Vec<IpAddr> {
        match self.route {
            Route::Direct(addr) => vec![addr.ip()],
            Route::PortForward => Vec::new(),
        }
    }
}

/// Through the agent pod `agent`: the session, its SSH connections, the network it tells.
/// `None` when stopped meanwhile.
pub(super) async fn via_agent(ctx: &Context<'_>, agent: &str) -> Result<Option<Way>, ConnectError> {
    let key = SessionKey::generate();
    let name = format!("kt-connect-{}", compat::random_lower(5, rand::random));
    let namespace = ctx.cluster.namespace.clone();
    let object = KtSession::create(
        &name,
        &namespace,
        SessionSpec {
            owner: ctx.settings.identity.owner(),
            mode: SessionMode::Connect,
            service: String::new(),
            ports: Vec::new(),
            udp_ports: Vec::new(),
            public_key: key.public_line.clone(),
            header: None,
            lease_seconds: DEFAULT_LEASE_SECONDS,
        },
    );
    let sessions =
        agents::create_session(&ctx.cluster.client, ctx.lifecycle, &namespace, &object).await?;
    let login = Login {
        namespace,
        session: name.clone(),
    };
    let pool = Arc::new(SshPool::new(
        ctx.cluster.client.clone(),
        Target::agent(agent, &login),
        key.private.clone(),
        ctx.settings.ssh.transport,
        ctx.settings.ssh.connections,
    ));
    let route = tokio::select! {
        () = ctx.lifecycle.stop.cancelled() => return Ok(None),
        started = pool.start(ctx.settings.ssh.connect_timeout) => started?,
    };
    // The agent writes the network when it accepts the login; wait for it to show.
    let told = await_condition(sessions.clone(), &name, |s: Option<&KtSession>| {
        s.and_then(|s| s.status.as_ref())
            .is_some_and(|s| s.network.is_some())
    });
    let session = match tokio::time::timeout(NETWORK_WITHIN, told).await {
        Ok(Ok(Some(session))) => session,
        Ok(Ok(None)) => return Err(ConnectError::SessionGone(name)),
        Ok(Err(source)) => {
            return Err(ClusterError::Watch {
                what: format!("session {name}"),
                source: Box::new(source),
            }
            .into());
        }
        Err(_) => {
            return Err(ConnectError::NoNetwork {
                agent: agent.to_owned(),
            });
        }
    };
    let network = session
        .status
        .and_then(|s| s.network)
        .expect("the condition saw it");
    if network.cluster_domain != ctx.args.cluster_domain && !network.cluster_domain.is_empty() {
        tracing::warn!(
            "The cluster's DNS domain looks like '{}' (agent {agent}), --clusterDomain is '{}'",
            network.cluster_domain,
            ctx.args.cluster_domain
        );
    }
    let dns = network.dns.ok_or_else(|| ConnectError::NoClusterDns {
        agent: agent.to_owned(),
    })?;
    Ok(Some(Way {
        dns: ClusterDns {
            pool: pool.clone(),
            host: dns.to_string(),
            port: 53,
        },
        ranges: Ranges::from_network(&network),
        pool,
        route,
        session: Some(name),
        shadow: None,
    }))
}

/// The current ranges of the agent-mode session `name` (the agent renews them as Services
/// and nodes come and go).
pub(super) async fn session_ranges(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> Option<Ranges> {
    let sessions: Api<KtSession> = Api::namespaced(client.clone(), namespace);
    let session = sessions.get_opt(name).await.ok()??;
    Some(Ranges::from_network(session.status?.network.as_ref()?))
}

/// Through a shadow pod: a new one, or with `--shareShadow` the shared one. `None` when
/// stopped meanwhile.
pub(super) async fn via_shadow(ctx: &Context<'_>) -> Result<Option<Way>, ConnectError> {
    let shared = ctx.args.share_shadow;
    let name = if shared {
        compat::SHARED_SHADOW.to_owned()
    } else {
        format!(
            "kt-connect-shadow-{}",
            compat::random_lower(5, rand::random)
        )
    };
    let mut spec = ShadowSpec::new(
        &ctx.settings.shadow,
        name.clone(),
        ctx.cluster.namespace.clone(),
        compat::ROLE_SHADOW_CONNECT,
        &ctx.settings.identity.user,
    );
    spec.env = vec![
        (
            kt_proto::env::DNS_PROTOCOL.to_owned(),
            if matches!(ctx.plan.dns, super::plan::DnsMode::Local { .. }) {
                "tcp"
            } else {
                "udp"
            }
            .to_owned(),
        ),
        (
            kt_proto::env::LOG_LEVEL.to_owned(),
            if ctx.settings.debug { "debug" } else { "info" }.to_owned(),
        ),
        (
            kt_proto::env::LOCAL_DOMAIN.to_owned(),
            ctx.local_domains.join(","),
        ),
    ];
    let tunnel = if shared {
        shared_shadow(ctx, &mut spec).await?
    } else {
        commands::open_shadow(
            ctx.settings,
            ctx.cluster,
            ctx.lifecycle,
            &spec,
            ctx.settings.ssh.connections,
            Teardown::Delete,
        )
        .await?
    };
    let Some(ShadowTunnel { pool, key_file }) = tunnel else {
        return Ok(None);
    };
    // The pod's own name: with --useShadowDeployment, its ReplicaSet's choice.
    let name = pool.target().pod.clone();
    let pods: Api<Pod> = Api::namespaced(ctx.cluster.client.clone(), &ctx.cluster.namespace);
    let ip = pods
        .get(&name)
        .await
        .ok()
        .and_then(|p| p.status?.pod_ip?.parse().ok());
    let route = pool.route();
    let ranges = discover_ranges(ctx).await?;
    Ok(Some(Way {
        dns: ClusterDns {
            pool: pool.clone(),
            host: SHADOW_DNS.0.to_owned(),
            port: SHADOW_DNS.1,
        },
        pool,
        route,
        ranges,
        session: None,
        shadow: Some(ShadowPod { name, ip, key_file }),
    }))
}

/// Joins the shared shadow, creating it when there is none (a race with another connect
/// creating it at the same moment ends in joining theirs).
async fn shared_shadow(
    ctx: &Context<'_>,
    spec: &mut ShadowSpec,
) -> Result<Option<ShadowTunnel>, ConnectError> {
    let (settings, cluster, lifecycle) = (ctx.settings, ctx.cluster, ctx.lifecycle);
    let connections = settings.ssh.connections;
    spec.annotations
        .insert(compat::REF_COUNT.into(), "1".into());
    for _ in 0..5 {
        let joined = shadow::join_shared(
            cluster,
            lifecycle,
            &cluster.namespace,
            &spec.name,
            settings.shadow.creation_timeout,
        )
        .await
        .map_err(ShadowTunnelError::from)?;
        if let Some(private_pem) = joined {
            return Ok(commands::join_shadow(
                settings,
                cluster,
                lifecycle,
                &spec.name,
                &private_pem,
                connections,
            )
            .await?);
        }
        match commands::open_shadow(
            settings,
            cluster,
            lifecycle,
            spec,
            connections,
            Teardown::RefCounted,
        )
        .await
        {
            Err(ShadowTunnelError::Shadow(ShadowError::Create { source, .. })) if matches!(*source, kube::Error::Api(ref s) if s.code == 409) =>
            {
                continue;
            }
            other => return Ok(other?),
        }
    }
    Err(ConnectError::SharedShadowBusy(spec.name.clone()))
}

/// The cluster's ranges as this user can see them (v0.3.7 §3.2 step 6, improved): the
/// nodes' `podCIDRs` when nodes may be listed, else ranges around the pods' addresses
/// (host-network pods left out: theirs are node addresses, and routing them would pull the
/// workstation's own network into the tunnel); ranges around the ClusterIPs. All namespaces
/// when allowed, else this one.
async fn discover_ranges(ctx: &Context<'_>) -> Result<Ranges, ConnectError> {
    let client = &ctx.cluster.client;
    let params = ListParams::default().limit(LIST_LIMIT);
    let nodes: Api<Node> = Api::all(client.clone());
    let mut pods: Vec<Cidr> = match nodes.list(&ListParams::default()).await {
        Ok(list) => list
            .items
            .iter()
            .filter_map(|n| n.spec.as_ref())
            .flat_map(|s| {
                s.pod_cidrs
                    .clone()
                    .unwrap_or_else(|| s.pod_cidr.clone().into_iter().collect())
            })
            .filter_map(|c| c.parse().ok())
            .collect::<BTreeSet<Cidr>>()
            .into_iter()
            .collect(),
        Err(error) => {
            tracing::debug!(%error, "nodes not listed, pod ranges from the pods' addresses");
            Vec::new()
        }
    };
    if pods.is_empty() {
        let list = list_all::<Pod>(client, &ctx.cluster.namespace, &params).await?;
        pods = covering_ranges(
            list.iter()
                .filter(|p| {
                    !p.spec
                        .as_ref()
                        .and_then(|s| s.host_network)
                        .unwrap_or(false)
                })
                .filter_map(|p| p.status.as_ref()?.pod_ip.as_ref()?.parse().ok()),
        );
    }
    let services = list_all::<Service>(client, &ctx.cluster.namespace, &params).await?;
    let services = covering_ranges(
        services
            .iter()
            .filter_map(|s| s.spec.as_ref())
            .flat_map(|s| {
                s.cluster_ips
                    .clone()
                    .unwrap_or_else(|| s.cluster_ip.clone().into_iter().collect())
                    .into_iter()
                    .filter_map(|ip| ip.parse::<IpAddr>().ok())
            }),
    );
    Ok(Ranges { pods, services })
}

/// Objects of every namespace, or of `namespace` when this user may not list them all
/// (v0.3.7's fallback).
async fn list_all<K>(
    client: &kube::Client,
    namespace: &str,
    params: &ListParams,
) -> Result<Vec<K>, ConnectError>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + k8s_openapi::serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let all: Api<K> = Api::all(client.clone());
    match all.list(params).await {
        Ok(list) => Ok(list.items),
        Err(kube::Error::Api(status)) if status.code == 403 => {
            let mine: Api<K> = Api::namespaced(client.clone(), namespace);
            let list = mine.list(params).await.map_err(ClusterError::api(format!(
                "list {} in namespace {namespace}",
                K::plural(&Default::default())
            )))?;
            Ok(list.items)
        }
        Err(e) => {
            Err(ClusterError::api(format!("list {}", K::plural(&Default::default())))(e).into())
        }
    }
}
