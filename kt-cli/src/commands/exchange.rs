//! `ktctl exchange <svc> --expose local[:remote][,...]`.
//!
//! `agent` mode (what `auto` picks when kt's agent is installed): a `KtSession` names the
//! Service, its ports and the session key; an agent holds it over SSH and every agent
//! redirects the Service to that agent's listeners in the kernel. Nothing in the workload
//! changes, and the redirect ends with the SSH connection.
//!
//! `selector` mode (without the agent), as ktctl v0.3.7
//! does it (`../shared/reference/ktctl-v0.3.7.md` §3.3) and with the same annotations, so
//! that the Go ktctl's `recover`/`clean` understand what kt did and the other way round:
//! lock the Service (`kt-lock`), start a shadow pod labelled `kt-role: shadow-exchange`
//! and a random `kt-target`, have it listen on the Service's target ports and send each
//! connection back through SSH reverse tunnels to the local ports, point the Service's
//! selector at the shadow (the old one saved in `kt-selector`), unlock. On exit the
//! selector comes back and the shadow goes.
//!
//! `scale` mode instead scales the Service's Deployment to zero while a shadow carrying its
//! pod labels takes the traffic (`kt-config: app=<deploy>,replicas=<n>`), and scales it back
//! on exit, waiting up to `--recoverWaitTime` for its pods.
//!
//! `--expose`'s remote part names a target port (v0.3.7); kt also accepts the Service's
//! `port` when no target port has that number — a target port match wins when both exist.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        core::v1::{Pod, Service},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use kt_proto::{
    k8s,
    session::{self as session_types, KtSession, PortMapping, SessionMode, SessionSpec},
};
use kube::{
    Api,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;

use crate::{
    CliError,
    args::{ExchangeMode, GlobalOptions},
    cluster,
    session::Session,
    shadow,
    tunnel::{Kept, SessionKey, Tunnel},
};

/// v0.3.7's lock: a `kt-lock` older than this is abandoned.
const LOCK_TIMEOUT_SECS: i64 = 180;
const LOCK_RETRIES: u32 = 10;
const LOCK_RETRY_DELAY: Duration = Duration::from_secs(3);

/// One exposed port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exposed {
    /// The workstation port connections go to.
    pub local: u16,
    /// The Service's `port`.
    pub service_port: u16,
    /// Where the shadow listens: the numeric target port, or the Service port when the
    /// target port is a name (the shadow declares that name on this port).
    pub listen_port: u16,
    /// The container port name the shadow declares.
    pub port_name: String,
}

/// A Service port as exchange sees it.
#[derive(Clone, Debug)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    pub target: Option<IntOrString>,
}

/// `--expose`: `port` or `local:remote`, comma separated.
pub fn parse_expose(text: &str) -> Result<Vec<(u16, Option<u16>)>, CliError> {
    let port = |p: &str| p.trim().parse::<u16>().ok().filter(|p| *p > 0);
    let pairs: Vec<&str> = text.split(',').filter(|p| !p.trim().is_empty()).collect();
    if pairs.is_empty() {
        return Err(CliError::Usage(format!(
            "invalid --expose '{text}': no port"
        )));
    }
    pairs
        .into_iter()
        .map(|pair| {
            let parsed = match pair.split_once(':') {
                Some((l, r)) => port(l).zip(port(r)).map(|(l, r)| (l, Some(r))),
                None => port(pair).map(|p| (p, None)),
            };
            parsed.ok_or_else(|| {
                CliError::Usage(format!(
                    "invalid --expose '{pair}', should be 'port' or 'local:remote'"
                ))
            })
        })
        .collect()
}

/// Matches each exposed pair to a Service port: the remote part (or the local port alone)
/// is a numeric target port, or else the Service's port.
pub fn plan(
    service: &str,
    ports: &[ServicePort],
    expose: &[(u16, Option<u16>)],
) -> Result<Vec<Exposed>, CliError> {
    expose
        .iter()
        .map(|(local, remote)| {
            let wanted = remote.unwrap_or(*local);
            let by_target = ports.iter().find(|p| {
                p.target.as_ref().map_or(p.port == wanted, |t| {
                    *t == IntOrString::Int(i32::from(wanted))
                })
            });
            let found = by_target
                .or_else(|| ports.iter().find(|p| p.port == wanted))
                .ok_or_else(|| {
                    CliError::Usage(format!(
                        "target port {wanted} not exists in service '{service}'"
                    ))
                })?;
            let (listen_port, port_name) = match &found.target {
                Some(IntOrString::String(name)) => (found.port, name.clone()),
                Some(IntOrString::Int(port)) => {
                    let port = u16::try_from(*port).unwrap_or(found.port);
                    (port, format!("kt-{port}"))
                }
                None => (found.port, format!("kt-{}", found.port)),
            };
            Ok(Exposed {
                local: *local,
                service_port: found.port,
                listen_port,
                port_name,
            })
        })
        .collect()
}

pub async fn run(
    global: &GlobalOptions,
    service: &str,
    expose: &str,
    mode: ExchangeMode,
    skip_port_checking: bool,
    recover_wait_secs: u32,
) -> Result<(), CliError> {
    let name = service
        .strip_prefix("svc/")
        .or_else(|| service.strip_prefix("service/"))
        .unwrap_or(service);
    let expose = parse_expose(expose)?;
    let cluster = cluster::connect(global).await?;
    let services: Api<Service> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    let svc = get_service(&services, name, &cluster.namespace).await?;
    let ports: Vec<ServicePort> = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|p| ServicePort {
            name: p.name,
            port: u16::try_from(p.port).unwrap_or_default(),
            target: p.target_port,
        })
        .collect();
    let exposed = plan(name, &ports, &expose)?;
    if !skip_port_checking {
        for port in exposed.iter().map(|e| e.local) {
            check_local_port(port).await?;
        }
    }
    if svc
        .spec
        .as_ref()
        .and_then(|s| s.selector.as_ref())
        .is_none_or(BTreeMap::is_empty)
    {
        return Err(CliError::Usage(format!(
            "service '{name}' has no selector, it cannot be exchanged"
        )));
    }
    refuse_if_taken(&cluster, &svc, name).await?;
    let selector = svc.spec.and_then(|s| s.selector).unwrap_or_default();
    let deployments: Api<Deployment> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    let method = match mode {
        ExchangeMode::Agent => Method::Agent(agent_pod(&cluster).await?.ok_or_else(|| {
            CliError::Usage(format!(
                "no kt agent is ready in namespace '{}' (install it from deploy/)",
                session_types::AGENT_NAMESPACE
            ))
        })?),
        ExchangeMode::Auto => match agent_pod(&cluster).await? {
            Some(pod) => Method::Agent(pod),
            None => Method::Selector,
        },
        ExchangeMode::Selector => Method::Selector,
        ExchangeMode::Scale => Method::Scale(Box::new(
            deployment_of(&deployments, name, &selector).await?,
        )),
    };
    tracing::info!("Using {} mode", method.name());

    let session = Session::start("exchange")?;
    let result = match method {
        Method::Selector => {
            exchange_by_selector(global, &cluster, &session, &services, name, &exposed).await
        }
        Method::Scale(deployment) => {
            let recover_wait = Duration::from_secs(u64::from(recover_wait_secs));
            exchange_by_scale(
                global,
                &cluster,
                &session,
                &deployments,
                *deployment,
                &exposed,
                recover_wait,
            )
            .await
        }
        Method::Agent(pod) => {
            exchange_by_agent(global, &cluster, &session, name, &exposed, &pod).await
        }
    };
    session.finish().await;
    result
}

/// Scale mode's Deployment: the first one whose pod template the Service selects.
async fn deployment_of(
    deployments: &Api<Deployment>,
    service: &str,
    selector: &BTreeMap<String, String>,
) -> Result<Deployment, CliError> {
    let list = deployments
        .list(&ListParams::default())
        .await
        .map_err(|e| CliError::Kube("failed to list deployments".into(), Box::new(e)))?;
    let found = list.items.into_iter().find(|d| {
        let labels = d
            .spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.labels.as_ref());
        labels.is_some_and(|l| selector.iter().all(|(k, v)| l.get(k) == Some(v)))
    });
    let deployment = found.ok_or_else(|| {
        CliError::Usage(format!(
            "no deployment's pods are selected by service '{service}'"
        ))
    })?;
    tracing::info!(
        "Using first matched deployment '{}'",
        deployment.metadata.name.as_deref().unwrap_or_default()
    );
    Ok(deployment)
}

/// How the exchange is done, once `--mode` is resolved.
enum Method {
    /// The agent holds the session; `String` is the agent pod ktctl connects to.
    Agent(String),
    Selector,
    Scale(Box<Deployment>),
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

/// A ready agent pod from `deploy/`, if the agent is installed (the first by name).
async fn agent_pod(cluster: &cluster::Cluster) -> Result<Option<String>, CliError> {
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), session_types::AGENT_NAMESPACE);
    let list = match pods
        .list(&ListParams::default().labels(session_types::AGENT_LABEL))
        .await
    {
        Ok(list) => list,
        // Not installed, or not visible to this user: no agent mode.
        Err(kube::Error::Api(status)) if matches!(status.code, 403 | 404) => return Ok(None),
        Err(e) => {
            return Err(CliError::Kube(
                "failed to look for the kt agent".into(),
                Box::new(e),
            ));
        }
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

/// Agent mode: a `KtSession` names the Service and the session key; an agent holds it
/// (its listeners become the redirect target on every node) while this SSH connection
/// lives. The Service and its workload are never touched.
async fn exchange_by_agent(
    global: &GlobalOptions,
    cluster: &cluster::Cluster,
    session: &Arc<Session>,
    service: &str,
    exposed: &[Exposed],
    agent: &str,
) -> Result<(), CliError> {
    let key = SessionKey::generate();
    let name = format!("{service}-kt-{}", k8s::random_lower(5, rand::random));
    let object: KtSession = serde_json::from_value(json!({
        "apiVersion": format!("{}/{}", session_types::GROUP, session_types::API_VERSION),
        "kind": session_types::KIND,
        "metadata": {"name": name, "namespace": cluster.namespace,
                     "labels": {k8s::CONTROL_BY: k8s::CONTROL_BY_KT}},
        "spec": SessionSpec {
            owner: owner(),
            mode: SessionMode::Exchange,
            service: service.to_owned(),
            ports: exposed
                .iter()
                .map(|e| PortMapping { port: e.service_port, local_port: e.local })
                .collect(),
            public_key: key.public_line.clone(),
            lease_seconds: session_types::DEFAULT_LEASE_SECONDS,
        },
    }))
    .expect("a session object");
    let sessions: Api<KtSession> = Api::namespaced_with(
        cluster.client.clone(),
        &cluster.namespace,
        &session_types::api_resource(),
    );
    sessions
        .create(&PostParams::default(), &object)
        .await
        .map_err(|e| CliError::Kube(format!("failed to create session {name}"), Box::new(e)))?;
    tracing::info!("Created session {name}");
    {
        let (sessions, name) = (sessions.clone(), name.clone());
        session.defer(format!("delete session {name}"), async move {
            if sessions
                .delete(&name, &DeleteParams::default())
                .await
                .is_ok()
            {
                tracing::info!("Cleaning session {name}");
            }
        });
    }
    // The agent names each forward by the Service port it stands for.
    let forwards: Vec<(u16, SocketAddr)> = exposed
        .iter()
        .map(|e| {
            (
                e.service_port,
                SocketAddr::from((Ipv4Addr::LOCALHOST, e.local)),
            )
        })
        .collect();
    let login = format!("{}/{name}", cluster.namespace);
    let mut agent = agent.to_owned();
    let mut announced = false;
    loop {
        let tunnel = Tunnel::new(
            cluster.client.clone(),
            session_types::AGENT_NAMESPACE,
            &agent,
            key.private.clone(),
            global.transport,
            1,
        )
        .login(session_types::AGENT_SSH_PORT, login.clone());
        let timeout = Duration::from_secs(u64::from(global.port_forward_timeout));
        tokio::select! {
            () = session.stop.cancelled() => return Ok(()),
            started = tunnel.start(timeout) => { started?; }
        }
        tunnel.open_remote_forwards(&forwards).await?;
        if !announced {
            super::banner(&format!(
                " Now all request to service '{service}' will be redirected to local"
            ));
            announced = true;
        } else {
            tracing::info!("Session {name} is held by agent {agent} now");
        }
        let kept = tunnel
            .keep_remote_forwards(&forwards, &session.stop, Some(3))
            .await;
        tunnel.close().await;
        if kept == Kept::Stopped {
            return Ok(());
        }
        // The agent is gone (deleted, its node down): the DaemonSet's next one, or another
        // node's, holds the session from here.
        tracing::warn!("Agent {agent} is gone, moving session {name} to another agent");
        let mut waited = 0;
        agent = loop {
            // Another agent if one comes within 10 s; after that whichever is ready (the
            // same one may have been only out of reach).
            match agent_pod(cluster).await? {
                Some(next) if next != agent || waited >= 10 => break next,
                _ => tokio::select! {
                    () = session.stop.cancelled() => return Ok(()),
                    () = tokio::time::sleep(Duration::from_secs(1)) => waited += 1,
                },
            }
        };
    }
}

/// `user@host`: who holds a session, named in conflict errors.
fn owner() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}@{}", shadow::local_user(), host.trim())
}

async fn get_service(services: &Api<Service>, name: &str, ns: &str) -> Result<Service, CliError> {
    services
        .get_opt(name)
        .await
        .map_err(|e| CliError::Kube(format!("failed to get service '{name}'"), Box::new(e)))?
        .ok_or_else(|| CliError::Usage(format!("service '{name}' not found in namespace '{ns}'")))
}

async fn check_local_port(port: u16) -> Result<(), CliError> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    match tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Ok(()),
        _ => Err(CliError::Usage(format!(
            "no application is running on port {port}"
        ))),
    }
}

/// v0.3.7's conflict messages: a Service already pointed at a kt pod (by kt or the Go
/// ktctl) is refused, naming the holder when its shadow says who it is.
async fn refuse_if_taken(
    cluster: &cluster::Cluster,
    svc: &Service,
    name: &str,
) -> Result<(), CliError> {
    let selector = svc
        .spec
        .as_ref()
        .and_then(|s| s.selector.clone())
        .unwrap_or_default();
    if selector.get(k8s::ROLE).map(String::as_str) == Some(k8s::ROLE_ROUTER) {
        return Err(CliError::Usage(format!(
            "another user is meshing service '{name}', cannot apply exchange"
        )));
    }
    // Agent mode leaves a live session object (also refused when the CRD is missing).
    let sessions: Api<KtSession> = Api::namespaced_with(
        cluster.client.clone(),
        &cluster.namespace,
        &session_types::api_resource(),
    );
    if let Ok(list) = sessions.list(&ListParams::default()).await {
        let now = chrono::Utc::now();
        let holder = list.items.into_iter().find(|s| {
            s.spec.service == name && session_types::lease_live(&s.spec, s.status.as_ref(), now)
        });
        if let Some(holder) = holder {
            return Err(CliError::Usage(format!(
                "service '{name}' is already exchanging by another user ({}), cannot apply exchange",
                holder.spec.owner
            )));
        }
    }
    // Selector mode leaves `kt-selector` on the Service; scale mode leaves an exchange
    // shadow among the pods the Service selects.
    let mut labels: Vec<String> = selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let by_selector = svc
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(k8s::SELECTOR));
    if !by_selector {
        labels.push(format!("{}={}", k8s::ROLE, k8s::ROLE_SHADOW_EXCHANGE));
    }
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    let shadows = pods
        .list(&ListParams::default().labels(&labels.join(",")))
        .await
        .map_err(|e| {
            CliError::Kube(
                format!("failed to list pods of service '{name}'"),
                Box::new(e),
            )
        })?
        .items;
    if !by_selector && shadows.is_empty() {
        return Ok(());
    }
    let holder = shadows
        .into_iter()
        .find_map(|p| p.metadata.annotations?.get(k8s::USER).cloned())
        .unwrap_or_else(|| "unknown user".into());
    Err(CliError::Usage(format!(
        "service '{name}' is already exchanging by another user ({holder}), cannot apply exchange"
    )))
}

fn now_seconds() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Takes `kt-lock` on the Service (v0.3.7: retried every 3 s, ten times; a lock older
/// than 180 s is abandoned and taken over). The write carries the read's resourceVersion,
/// so two ktctls cannot both take it.
async fn lock(services: &Api<Service>, name: &str) -> Result<(), CliError> {
    for attempt in 0..=LOCK_RETRIES {
        let svc = services
            .get(name)
            .await
            .map_err(|e| CliError::Kube(format!("failed to get service '{name}'"), Box::new(e)))?;
        let held = svc
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(k8s::LOCK))
            .and_then(|t| t.parse::<i64>().ok())
            .is_some_and(|t| now_seconds() - t < LOCK_TIMEOUT_SECS);
        if !held {
            let patch = json!({"metadata": {
                "resourceVersion": svc.metadata.resource_version,
                "annotations": {k8s::LOCK: now_seconds().to_string()},
            }});
            match services
                .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    tracing::info!("Service {name} locked");
                    return Ok(());
                }
                Err(kube::Error::Api(status)) if status.code == 409 => {}
                Err(e) => {
                    return Err(CliError::Kube(
                        format!("failed to lock service '{name}'"),
                        Box::new(e),
                    ));
                }
            }
        }
        if attempt < LOCK_RETRIES {
            tracing::info!("Service {name} is locked by another ktctl, retrying");
            tokio::time::sleep(LOCK_RETRY_DELAY).await;
        }
    }
    Err(CliError::Usage(format!(
        "service '{name}' is locked by another ktctl, try again later"
    )))
}

async fn unlock(services: &Api<Service>, name: &str) {
    let patch = json!({"metadata": {"annotations": {k8s::LOCK: null}}});
    if services
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .is_ok()
    {
        tracing::info!("Service {name} unlocked");
    }
}

/// The merge patch that points `selector`'s Service at the shadow `target`, keeping the
/// old selector in `kt-selector`; and the one that undoes it.
pub fn selector_patches(
    old: &BTreeMap<String, String>,
    target: &str,
) -> (serde_json::Value, serde_json::Value) {
    let mut to_shadow: serde_json::Map<String, serde_json::Value> = old
        .keys()
        .map(|k| (k.clone(), serde_json::Value::Null))
        .collect();
    to_shadow.insert(k8s::ROLE.into(), json!(k8s::ROLE_SHADOW_EXCHANGE));
    to_shadow.insert(k8s::TARGET.into(), json!(target));
    let mut back: serde_json::Map<String, serde_json::Value> = [k8s::ROLE, k8s::TARGET]
        .into_iter()
        .map(|k| (k.to_owned(), serde_json::Value::Null))
        .collect();
    back.extend(old.iter().map(|(k, v)| (k.clone(), json!(v))));
    let saved = serde_json::to_string(old).expect("a map serialises");
    (
        json!({"metadata": {"annotations": {k8s::SELECTOR: saved}}, "spec": {"selector": to_shadow}}),
        json!({"metadata": {"annotations": {k8s::SELECTOR: null}}, "spec": {"selector": back}}),
    )
}

async fn exchange_by_selector(
    global: &GlobalOptions,
    cluster: &cluster::Cluster,
    session: &Arc<Session>,
    services: &Api<Service>,
    name: &str,
    exposed: &[Exposed],
) -> Result<(), CliError> {
    lock(services, name).await?;
    {
        let (services, name) = (services.clone(), name.to_owned());
        session.defer(
            "unlock service",
            async move { unlock(&services, &name).await },
        );
    }
    let target = k8s::random_target(rand::random);
    let labels = BTreeMap::from([(k8s::TARGET.to_owned(), target.clone())]);
    let Some((tunnel, forwards)) = exchange_shadow(
        (global, cluster, session),
        name,
        labels,
        format!("service={name}"),
        exposed,
    )
    .await?
    else {
        return Ok(());
    };

    let svc = get_service(services, name, &cluster.namespace).await?;
    let old = svc.spec.and_then(|s| s.selector).unwrap_or_default();
    let (to_shadow, back) = selector_patches(&old, &target);
    services
        .patch(name, &PatchParams::default(), &Patch::Merge(&to_shadow))
        .await
        .map_err(|e| {
            CliError::Kube(
                format!("failed to change the selector of service '{name}'"),
                Box::new(e),
            )
        })?;
    {
        let (services, name) = (services.clone(), name.to_owned());
        session.defer("restore service selector", async move {
            match services
                .patch(&name, &PatchParams::default(), &Patch::Merge(&back))
                .await
            {
                Ok(_) => tracing::info!("Service {name} recovered"),
                Err(e) => tracing::error!(
                    "Failed to recover service {name}: {}",
                    kt_proto::error_chain(&e)
                ),
            }
        });
    }
    unlock(services, name).await;
    hold(&tunnel, &forwards, session, &format!("service '{name}'")).await;
    Ok(())
}

/// The exchange shadow `<owner>-kt-exchange-xxxxx`: `labels` besides kt's, `kt-config:
/// <config>`, the Service's target ports declared; then its SSH tunnel (one connection,
/// which carries the reverse tunnels) with the reverse tunnels to the local ports up.
/// `None` when the session was stopped meanwhile.
async fn exchange_shadow(
    (global, cluster, session): (&GlobalOptions, &cluster::Cluster, &Arc<Session>),
    owner: &str,
    labels: BTreeMap<String, String>,
    config: String,
    exposed: &[Exposed],
) -> Result<Option<(Arc<Tunnel>, Vec<(u16, SocketAddr)>)>, CliError> {
    let name = format!("{owner}-kt-exchange-{}", k8s::random_lower(5, rand::random));
    let mut spec = shadow::ShadowSpec::new(
        global,
        name,
        cluster.namespace.clone(),
        k8s::ROLE_SHADOW_EXCHANGE,
    )
    .map_err(CliError::Usage)?;
    spec.labels.extend(labels);
    spec.annotations.insert(k8s::CONFIG.into(), config);
    spec.ports = exposed
        .iter()
        .map(|e| (e.port_name.clone(), e.listen_port))
        .collect();
    let Some(tunnel) = super::shadow_tunnel(global, cluster, session, &spec, 1).await? else {
        return Ok(None);
    };
    let forwards = local_forwards(exposed);
    tunnel.open_remote_forwards(&forwards).await?;
    Ok(Some((tunnel, forwards)))
}

/// The v0.3.7 banner for `what`, then the reverse tunnels kept up until the session stops.
async fn hold(tunnel: &Tunnel, forwards: &[(u16, SocketAddr)], session: &Session, what: &str) {
    super::banner(&format!(
        " Now all request to {what} will be redirected to local"
    ));
    tunnel
        .keep_remote_forwards(forwards, &session.stop, None)
        .await;
    tunnel.close().await;
}

/// Scale mode (v0.3.7): a shadow carrying the Deployment's pod labels takes the
/// Service's traffic while the Deployment is scaled to zero; on exit the Deployment is
/// scaled back and waited for (up to `--recoverWaitTime`) before the shadow goes.
async fn exchange_by_scale(
    global: &GlobalOptions,
    cluster: &cluster::Cluster,
    session: &Arc<Session>,
    deployments: &Api<Deployment>,
    deployment: Deployment,
    exposed: &[Exposed],
    recover_wait: Duration,
) -> Result<(), CliError> {
    let deploy = deployment.metadata.name.clone().unwrap_or_default();
    let spec = deployment.spec.unwrap_or_default();
    let replicas = spec.replicas.unwrap_or(1);
    let Some((tunnel, forwards)) = exchange_shadow(
        (global, cluster, session),
        &deploy,
        spec.selector.match_labels.unwrap_or_default(),
        format!("app={deploy},replicas={replicas}"),
        exposed,
    )
    .await?
    else {
        return Ok(());
    };

    tracing::info!("Scaling deployment {deploy} from {replicas} to 0");
    scale(deployments, &deploy, 0).await?;
    {
        let (deployments, deploy) = (deployments.clone(), deploy.clone());
        session.defer("scale the deployment back", async move {
            tracing::info!("Scaling deployment {deploy} back to {replicas}");
            if let Err(e) = scale(&deployments, &deploy, replicas).await {
                tracing::error!("{}", kt_proto::error_chain(&e));
                return;
            }
            wait_recovered(&deployments, &deploy, replicas, recover_wait).await;
        });
    }
    hold(
        &tunnel,
        &forwards,
        session,
        &format!("deployment '{deploy}'"),
    )
    .await;
    Ok(())
}

async fn scale(deployments: &Api<Deployment>, name: &str, replicas: i32) -> Result<(), CliError> {
    let patch = json!({"spec": {"replicas": replicas}});
    deployments
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(drop)
        .map_err(|e| CliError::Kube(format!("failed to scale deployment '{name}'"), Box::new(e)))
}

/// Polls every 5 s (v0.3.7) until `replicas` pods are ready or `wait` passes.
async fn wait_recovered(deployments: &Api<Deployment>, name: &str, replicas: i32, wait: Duration) {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let ready = deployments
            .get(name)
            .await
            .ok()
            .and_then(|d| d.status?.ready_replicas)
            .unwrap_or(0);
        if ready >= replicas {
            tracing::info!("Deployment {name} recovered");
            return;
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            tracing::warn!(
                "Deployment {name} has {ready} of {replicas} pods ready after {} s, not waiting longer",
                wait.as_secs()
            );
            return;
        }
        tracing::info!("Wait for deployment {name} recover ...");
        tokio::time::sleep(Duration::from_secs(5).min(deadline - now)).await;
    }
}

/// The reverse tunnels of `exposed`: shadow port → the local port.
fn local_forwards(exposed: &[Exposed]) -> Vec<(u16, SocketAddr)> {
    exposed
        .iter()
        .map(|e| {
            (
                e.listen_port,
                SocketAddr::from((Ipv4Addr::LOCALHOST, e.local)),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn web() -> Vec<ServicePort> {
        vec![
            ServicePort {
                name: Some("http".into()),
                port: 80,
                target: Some(IntOrString::String("http".into())),
            },
            ServicePort {
                name: Some("admin".into()),
                port: 81,
                target: Some(IntOrString::Int(9001)),
            },
            ServicePort {
                name: Some("odd".into()),
                port: 9001,
                target: Some(IntOrString::Int(7000)),
            },
        ]
    }

    #[test]
    fn expose_forms_and_errors() {
        assert_eq!(
            parse_expose("8080,9000:81").unwrap(),
            [(8080, None), (9000, Some(81))]
        );
        for bad in ["", "x", "8080:", "0", "1:2:3", "70000"] {
            let err = parse_expose(bad).unwrap_err().to_string();
            assert!(err.contains("--expose"), "{bad}: {err}");
        }
    }

    #[test]
    fn remote_is_a_target_port_or_else_a_service_port() {
        // 9001 is both admin's target port and odd's service port: the target port wins.
        let planned = plan("web", &web(), &[(6000, Some(9001)), (6001, Some(80))]).unwrap();
        assert_eq!(
            planned,
            [
                Exposed {
                    local: 6000,
                    service_port: 81,
                    listen_port: 9001,
                    port_name: "kt-9001".into()
                },
                // A named target port: the shadow declares the name on the service port.
                Exposed {
                    local: 6001,
                    service_port: 80,
                    listen_port: 80,
                    port_name: "http".into()
                },
            ]
        );
        let err = plan("web", &web(), &[(6000, Some(5))])
            .unwrap_err()
            .to_string();
        assert_eq!(err, "target port 5 not exists in service 'web'");
    }

    #[test]
    fn the_selector_moves_to_the_shadow_and_back() {
        let old: BTreeMap<String, String> = [("app".to_owned(), "web".to_owned())].into();
        let (to, back) = selector_patches(&old, "AbC");
        assert_eq!(
            to["spec"]["selector"],
            json!({"app": null, "kt-role": "shadow-exchange", "kt-target": "AbC"})
        );
        assert_eq!(
            to["metadata"]["annotations"]["kt-selector"],
            r#"{"app":"web"}"#
        );
        assert_eq!(
            back["spec"]["selector"],
            json!({"app": "web", "kt-role": null, "kt-target": null})
        );
        assert_eq!(back["metadata"]["annotations"]["kt-selector"], json!(null));
    }
}
