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
//! - [`scale`] mode scales the Service's Deployments to zero while a shadow carrying the
//!   Service's labels takes the traffic, and scales each back on exit.
//! - [`ephemeral`] mode (v0.3.7's experimental one, also for `pod/<name>`): an ephemeral
//!   container in each of the Service's pods redirects the exposed ports, inside the pod, to
//!   SSH reverse tunnels; the redirect ends with the tunnels and nothing else changes.
//!
//! [`plan`] is the pure part: `--expose`, the port plan, the selector patches, conflicts.
//! Everything that needs only the cluster is checked before the local ports, and nothing is
//! created before every check has passed.

pub(crate) mod agent;
pub mod ephemeral;
pub mod plan;
mod scale;
mod selector;

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use k8s_openapi::api::{
    apps::v1::{DaemonSet, Deployment, StatefulSet},
    core::v1::{Pod, PodSpec, PodTemplateSpec, Service},
    discovery::v1::EndpointSlice,
};
use kt_proto::{compat, session::KtSession};
use kube::{Api, api::ListParams};

use self::plan::{Conflict, NamedPorts, PlanError, PortPlan, ServicePort};
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
    #[error(
        "in {mode} mode a shadow takes the place of the pods of service '{service}' and serves only the exposed ports, so {ports} would stop answering; {advice}"
    )]
    Unserved {
        mode: &'static str,
        service: String,
        ports: String,
        advice: String,
    },
    #[error(
        "scale mode scales Deployments, but service '{service}' also selects {pods}, which would keep answering; use --mode selector or --mode agent"
    )]
    NotFromDeployments { service: String, pods: String },
    #[error("stopped before the exchange was established; nothing was exchanged")]
    Interrupted,
    #[error(
        "the holding agent did not report its listeners for session {session} within {within} s"
    )]
    NoListeners { session: String, within: u64 },
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
    #[error(transparent)]
    Ephemeral(ephemeral::EphemeralError),
}

/// What every mode works with.
pub(crate) struct Context<'a> {
    pub settings: &'a Settings,
    pub cluster: &'a Cluster,
    pub lifecycle: &'a Arc<Lifecycle>,
    /// Set once the banner has told the user that the exchange is on.
    announced: AtomicBool,
}

impl<'a> Context<'a> {
    pub(crate) fn new(
        settings: &'a Settings,
        cluster: &'a Cluster,
        lifecycle: &'a Arc<Lifecycle>,
    ) -> Self {
        Self {
            settings,
            cluster,
            lifecycle,
            announced: AtomicBool::new(false),
        }
    }

    /// v0.3.7's banner: the exchange is on.
    fn announce(&self, what: &str) {
        self.announce_banner(&exchange_banner(what));
    }

    /// The banner with `message`; the redirect is on.
    pub(crate) fn announce_banner(&self, message: &str) {
        self.announce_banner_of_width(message, 63);
    }

    /// [`Context::announce_banner`] with lines of `width` dashes.
    pub(crate) fn announce_banner_of_width(&self, message: &str, width: usize) {
        super::banner_of_width(message, width);
        self.announced.store(true, Ordering::Relaxed);
    }

    /// Whether the banner was printed.
    pub(crate) fn announced(&self) -> bool {
        self.announced.load(Ordering::Relaxed)
    }
}

/// v0.3.7's exchange banner for `what` (`service 'web'`).
fn exchange_banner(what: &str) -> String {
    format!(" Now all request to {what} will be redirected to local")
}

/// How the exchange is done, once `--mode` is resolved.
pub(crate) enum Method {
    /// The agent holds the session; the agent pod ktctl connects to.
    Agent(String),
    Selector,
    Scale(Vec<Deployment>),
    /// An ephemeral container in each of the Service's pods.
    Ephemeral,
}

impl Method {
    fn name(&self) -> &'static str {
        match self {
            Self::Agent(_) => "agent",
            Self::Selector => "selector",
            Self::Scale(_) => "scale",
            Self::Ephemeral => "ephemeral",
        }
    }
}

/// The Service as read, with the pods it selects now.
pub(crate) struct Subject {
    pub name: String,
    pub service: Service,
    pub selector: BTreeMap<String, String>,
    pub pods: Vec<Pod>,
}

pub async fn run(settings: &Settings, args: &ExchangeArgs) -> Result<(), ExchangeError> {
    let name = cluster::service_name(&args.service);
    let expose = plan::parse_expose(&args.expose)?;
    let pod = ephemeral::pod_argument(&args.service);
    if let Some(pod) = pod
        && args.mode != ExchangeMode::Ephemeral
    {
        return Err(ephemeral::EphemeralError::PodNeedsEphemeral(pod.to_owned()).into());
    }
    // Signals count from here: Ctrl-C while the cluster is being read exits 130 too.
    let lifecycle = Lifecycle::start("exchange")?;
    if let Some(pod) = pod {
        let result = exchange_pod(settings, args, pod, &expose, &lifecycle).await;
        lifecycle.finish().await;
        return result;
    }
    let prepared = tokio::select! {
        () = lifecycle.stop.cancelled() => Err(ExchangeError::Interrupted),
        prepared = prepare(settings, args, name, &expose) => prepared,
    };
    let result = match prepared {
        Ok(prepared) => exchange(settings, args, name, prepared, &lifecycle).await,
        Err(error) => Err(error),
    };
    lifecycle.finish().await;
    result
}

/// `exchange pod/<name> --mode ephemeral`: the pod's own ports, `local:remote` with
/// `remote` one of its container ports (any port is redirected; an undeclared one is named).
async fn exchange_pod(
    settings: &Settings,
    args: &ExchangeArgs,
    name: &str,
    expose: &[plan::ExposeItem],
    lifecycle: &Arc<Lifecycle>,
) -> Result<(), ExchangeError> {
    plan::tcp_only(expose, "--mode ephemeral")?;
    let prepared = async {
        let cluster = cluster::connect(&settings.cluster).await?;
        let pod = ephemeral::read_pod(&cluster, name).await?;
        let pairs: Vec<(u16, u16)> = expose
            .iter()
            .map(|item| (item.local, item.wanted()))
            .collect();
        let declared: Vec<i32> = pod
            .spec
            .iter()
            .flat_map(|s| &s.containers)
            .flat_map(|c| c.ports.iter().flatten())
            .map(|p| p.container_port)
            .collect();
        for (_, target) in &pairs {
            if !declared.contains(&i32::from(*target)) {
                tracing::warn!(
                    "Pod {name} declares no container port {target}; redirecting it anyway"
                );
            }
        }
        if !args.skip_port_checking {
            for (local, _) in &pairs {
                check_local_port(*local).await?;
            }
        }
        tracing::info!("Using ephemeral mode");
        Ok::<_, ExchangeError>((cluster, pod, pairs))
    };
    let (cluster, pod, pairs) = tokio::select! {
        () = lifecycle.stop.cancelled() => return Err(ExchangeError::Interrupted),
        prepared = prepared => prepared?,
    };
    let ctx = Context::new(settings, &cluster, lifecycle);
    let result = ephemeral::exchange(&ctx, &format!("pod '{name}'"), None, vec![pod], &pairs).await;
    match result {
        Ok(()) if !ctx.announced() && lifecycle.stopped_by().is_some() => {
            Err(ExchangeError::Interrupted)
        }
        other => other,
    }
}

/// What every check found, before anything is changed.
struct Prepared {
    cluster: Cluster,
    subject: Subject,
    plan: PortPlan,
    method: Method,
}

/// Every check, in the order that makes the first error the true one: the Service, whether
/// someone holds it, the port plan, the mode, the ports a mode would leave unserved, then
/// the local ports.
async fn prepare(
    settings: &Settings,
    args: &ExchangeArgs,
    name: &str,
    expose: &[plan::ExposeItem],
) -> Result<Prepared, ExchangeError> {
    let cluster = cluster::connect(&settings.cluster).await?;
    let subject = read_subject(&cluster, name).await?;
    check_conflict(&cluster, &subject).await?;
    let ports = ServicePort::of(&subject.service);
    let named = named_ports(&cluster, &subject, &ports).await?;
    let port_plan = plan::plan(name, &ports, &named, expose)?;
    for warning in &port_plan.warnings {
        tracing::warn!("{warning}");
    }
    let endpoints = cluster::agents::endpoints_by_node(&subject.service, &subject.pods);
    let method = match args.mode {
        ExchangeMode::Agent => {
            Method::Agent(cluster::agents::pick(&cluster, &endpoints).await?.ok_or(
                ExchangeError::NoAgent {
                    namespace: kt_proto::agent::NAMESPACE,
                },
            )?)
        }
        ExchangeMode::Auto => match cluster::agents::pick(&cluster, &endpoints).await? {
            Some(pod) => Method::Agent(pod),
            None => Method::Selector,
        },
        ExchangeMode::Selector => Method::Selector,
        ExchangeMode::Scale => Method::Scale(scale::deployments_of(&cluster, &subject).await?),
        ExchangeMode::Ephemeral => Method::Ephemeral,
    };
    if !matches!(method, Method::Agent(_)) {
        let mode = match args.mode {
            // What the user asked for: auto fell back to selector for want of an agent.
            ExchangeMode::Auto => "--mode auto without a ready kt agent (selector mode)".into(),
            _ => format!("--mode {}", method.name()),
        };
        plan::tcp_only(expose, &mode)?;
    }
    check_ports_served(&method, name, &port_plan, args.allow_unserved_ports)?;
    if !args.skip_port_checking {
        for exposed in &port_plan.exposed {
            match exposed.transport {
                plan::Transport::Tcp => check_local_port(exposed.local).await?,
                plan::Transport::Udp => warn_unbound_udp_port(exposed.local),
            }
        }
    }
    tracing::info!("Using {} mode", method.name());
    warn_inert_flags(settings, &method);
    Ok(Prepared {
        cluster,
        subject,
        plan: port_plan,
        method,
    })
}

/// The exchange itself, in the chosen mode.
async fn exchange(
    settings: &Settings,
    args: &ExchangeArgs,
    name: &str,
    prepared: Prepared,
    lifecycle: &Arc<Lifecycle>,
) -> Result<(), ExchangeError> {
    let Prepared {
        cluster,
        subject,
        plan: port_plan,
        method,
    } = prepared;
    let ctx = Context::new(settings, &cluster, lifecycle);
    let result = match method {
        Method::Agent(pod) => {
            let redirect = agent::AgentRedirect {
                mode: kt_proto::session::SessionMode::Exchange,
                header: None,
                banner: exchange_banner(&format!("service '{name}'")),
                preview: None,
            };
            agent::hold(&ctx, name, &port_plan, pod, &redirect).await
        }
        Method::Selector => selector::exchange(&ctx, name, &port_plan).await,
        Method::Ephemeral => {
            let pairs: Vec<(u16, u16)> = port_plan
                .exposed
                .iter()
                .map(|e| (e.local, e.target))
                .collect();
            let is_kt = |p: &Pod| {
                p.metadata
                    .labels
                    .as_ref()
                    .is_some_and(|l| l.contains_key(compat::ROLE))
            };
            let pods = subject.pods.into_iter().filter(|p| !is_kt(p)).collect();
            ephemeral::exchange(&ctx, &format!("service '{name}'"), Some(name), pods, &pairs).await
        }
        Method::Scale(deployments) => {
            let recover_wait = Duration::from_secs(u64::from(args.recover_wait_time));
            scale::exchange(
                &ctx,
                name,
                &subject.selector,
                deployments,
                &port_plan,
                recover_wait,
            )
            .await
        }
    };
    match result {
        Ok(()) if !ctx.announced() && lifecycle.stopped_by().is_some() => {
            Err(ExchangeError::Interrupted)
        }
        other => other,
    }
}

pub(crate) async fn read_subject(cluster: &Cluster, name: &str) -> Result<Subject, ExchangeError> {
    let service = cluster.service(name).await?;
    let selector = service
        .spec
        .as_ref()
        .and_then(|s| s.selector.clone())
        .unwrap_or_default();
    if selector.is_empty() {
        return Err(ExchangeError::NoSelector(name.to_owned()));
    }
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    let pods = pods
        .list(&ListParams::default().labels(&label_selector(&selector)))
        .await
        .map_err(ClusterError::api(format!("list pods of service '{name}'")))?
        .items;
    Ok(Subject {
        name: name.to_owned(),
        service,
        selector,
        pods,
    })
}

impl Subject {
    /// The Service as its own pods see it: while a router pod or shadow stands in (its
    /// selector saved in `kt-selector`, as v0.3.7 saves it), the original selector and the
    /// pods it selects — what named target ports resolve through.
    pub(crate) async fn as_originally(&self, cluster: &Cluster) -> Result<Self, ExchangeError> {
        let saved = self
            .service
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(compat::SELECTOR))
            .and_then(|s| serde_json::from_str::<BTreeMap<String, String>>(s).ok())
            .filter(|s| !s.is_empty());
        let Some(selector) = saved else {
            return Ok(Self {
                name: self.name.clone(),
                service: self.service.clone(),
                selector: self.selector.clone(),
                pods: self.pods.clone(),
            });
        };
        let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
        let pods = pods
            .list(&ListParams::default().labels(&label_selector(&selector)))
            .await
            .map_err(ClusterError::api(format!(
                "list pods of service '{}'",
                self.name
            )))?
            .items;
        Ok(Self {
            name: self.name.clone(),
            service: self.service.clone(),
            selector,
            pods,
        })
    }
}

/// `k1=v1,k2=v2`.
fn label_selector(selector: &BTreeMap<String, String>) -> String {
    selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// How the Service's named target ports resolve: from the pods it selects (kt's own shadows
/// left out), or — with none running — from the pod templates of the workloads it selects.
pub(crate) async fn named_ports(
    cluster: &Cluster,
    subject: &Subject,
    ports: &[ServicePort],
) -> Result<NamedPorts, ExchangeError> {
    let is_kt = |p: &&Pod| {
        p.metadata
            .labels
            .as_ref()
            .is_some_and(|l| l.contains_key(compat::ROLE))
    };
    let pods: Vec<Pod> = subject.pods.iter().filter(|p| !is_kt(p)).cloned().collect();
    let named = NamedPorts::from_pods(&pods);
    let any_named = ports.iter().any(|p| {
        matches!(
            p.target,
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(_))
        )
    });
    if !named.is_empty() || !any_named {
        return Ok(named);
    }
    let mut specs = templates::<Deployment>(cluster, subject, "deployment", |d| {
        d.spec.as_ref().map(|s| &s.template)
    })
    .await?;
    specs.extend(
        templates::<StatefulSet>(cluster, subject, "statefulset", |s| {
            s.spec.as_ref().map(|s| &s.template)
        })
        .await?,
    );
    specs.extend(
        templates::<DaemonSet>(cluster, subject, "daemonset", |d| {
            d.spec.as_ref().map(|s| &s.template)
        })
        .await?,
    );
    Ok(NamedPorts::from_specs(
        specs.iter().map(|(who, spec)| (who.clone(), spec)),
    ))
}

/// The pod specs of the `kind`s (Deployments, …) whose pod template the Service selects, each
/// named `<kind> <name>`. None when the cluster does not serve the kind or the user may not
/// list it: the named ports are then resolved from what can be read.
async fn templates<K>(
    cluster: &Cluster,
    subject: &Subject,
    kind: &str,
    template: impl Fn(&K) -> Option<&PodTemplateSpec>,
) -> Result<Vec<(String, PodSpec)>, ExchangeError>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + k8s_openapi::serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    let items = match api.list(&ListParams::default()).await {
        Ok(list) => list.items,
        Err(kube::Error::Api(status)) if matches!(status.code, 403 | 404) => return Ok(Vec::new()),
        Err(e) => return Err(ClusterError::api(format!("list {kind}s"))(e).into()),
    };
    Ok(items
        .iter()
        .filter_map(|item| {
            let template = template(item)?;
            let labels = template.metadata.as_ref()?.labels.as_ref()?;
            let selected = subject
                .selector
                .iter()
                .all(|(k, v)| labels.get(k) == Some(v));
            selected.then(|| {
                (
                    format!("{kind} {}", item.meta().name.as_deref().unwrap_or_default()),
                    template.spec.clone().unwrap_or_default(),
                )
            })
        })
        .collect())
}

/// In selector and scale modes a shadow takes the pods' place: refuse (unless allowed) when
/// ports that are not exposed would stop answering, naming them. Every mode says when UDP
/// ports are not carried.
pub(crate) fn check_ports_served(
    method: &Method,
    service: &str,
    plan: &PortPlan,
    allowed: bool,
) -> Result<(), ExchangeError> {
    let list = |ports: &[ServicePort]| {
        ports
            .iter()
            .map(|p| format!("port {p}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match method {
        // The pods keep serving what is not exposed.
        Method::Agent(_) | Method::Ephemeral => {
            if !plan.not_carried.is_empty() {
                let advice = if plan.not_carried.iter().all(|p| p.protocol == "UDP")
                    && matches!(method, Method::Agent(_))
                {
                    " (expose it with '/udp' too to carry it)"
                } else {
                    ""
                };
                tracing::warn!(
                    "{} not carried: {} of service '{service}' stays with its pods{advice}",
                    not_tcp(&plan.not_carried),
                    list(&plan.not_carried)
                );
            }
            Ok(())
        }
        Method::Selector | Method::Scale(_) if plan.unexposed.is_empty() => Ok(()),
        Method::Selector | Method::Scale(_) if allowed => {
            tracing::warn!(
                "While the exchange lasts {} of service '{service}' will not answer (--allowUnservedPorts)",
                list(&plan.unexposed)
            );
            Ok(())
        }
        Method::Selector | Method::Scale(_) => Err(ExchangeError::Unserved {
            mode: method.name(),
            service: service.to_owned(),
            ports: list(&plan.unexposed),
            advice: if plan.unexposed.iter().all(ServicePort::is_tcp) {
                "expose them too, use --mode agent, or pass --allowUnservedPorts".into()
            } else {
                format!(
                    "{} not carried: use --mode agent, which leaves them with the pods, or pass --allowUnservedPorts",
                    not_tcp(&plan.unexposed)
                )
            },
        }),
    }
}

/// `UDP is`, `SCTP is` or `UDP and SCTP are`: the protocols among `ports` exchange does not
/// carry.
fn not_tcp(ports: &[ServicePort]) -> String {
    let mut protocols: Vec<&str> = ports
        .iter()
        .filter(|p| !p.is_tcp())
        .map(|p| p.protocol.as_str())
        .collect();
    protocols.sort_unstable();
    protocols.dedup();
    match protocols.as_slice() {
        [one] => format!("{one} is"),
        many => format!("{} are", many.join(" and ")),
    }
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
/// sessions of agent mode.
async fn check_conflict(cluster: &Cluster, subject: &Subject) -> Result<(), ExchangeError> {
    let name = &subject.name;
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
    match plan::conflict(
        name,
        &subject.service,
        &sessions,
        &subject.pods,
        chrono::Utc::now(),
    ) {
        Some(conflict) => Err(conflict.into()),
        // An ephemeral exchange changes neither the Service nor a session: its running
        // navigators in the Service's pods are what tells.
        None => match subject.pods.iter().find_map(|pod| {
            let value = serde_json::to_value(pod).ok()?;
            let busy = ephemeral::existing_navigators(&value)
                .into_iter()
                .find(|n| n.running)?;
            Some((pod.metadata.name.clone().unwrap_or_default(), busy))
        }) {
            Some((pod, busy)) => Err(ephemeral::EphemeralError::Busy {
                pod,
                container: busy.name,
                user: busy.user,
            }
            .into()),
            None => Ok(()),
        },
    }
}

pub(crate) async fn check_local_port(port: u16) -> Result<(), ExchangeError> {
    match tokio::time::timeout(
        Duration::from_secs(1),
        tokio::net::TcpStream::connect(local(port)),
    )
    .await
    {
        Ok(Ok(_)) => Ok(()),
        _ => Err(ExchangeError::NoLocalApp(port)),
    }
}

/// No UDP "is it listening" probe answers reliably (a datagram to a closed port may or may
/// not bring back an ICMP error), so a UDP port is only checked to be bound: binding it on
/// the loopback address works only when nothing has it. Warns, as the program may start
/// after the exchange.
fn warn_unbound_udp_port(port: u16) {
    if std::net::UdpSocket::bind(local(port)).is_ok() {
        tracing::warn!(
            "Nothing is bound to UDP port {port} on this machine yet: datagrams to it are dropped until a program binds it"
        );
    }
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// The exchange shadow `<owner>-kt-exchange-xxxxx` of selector and scale modes: `labels`
/// besides kt's, `kt-config: <config>`, the exposed target ports declared; then its SSH
/// connection with the reverse tunnels to the local ports up. `None` when the run was
/// stopped meanwhile.
async fn exchange_shadow(
    ctx: &Context<'_>,
    owner: &str,
    labels: BTreeMap<String, String>,
    config: String,
    plan: &PortPlan,
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
    spec.ports = plan.exposed.iter().flat_map(|e| e.shadow_ports()).collect();
    let Some(pool) =
        super::shadow_tunnel(ctx.settings, ctx.cluster, ctx.lifecycle, &spec, 1).await?
    else {
        return Ok(None);
    };
    let forwards = reverse_forwards(plan);
    pool.open_remote_forwards(&forwards).await?;
    Ok(Some((pool, forwards)))
}

/// A shadow's reverse tunnels: each exposed target port of the shadow pod to its local
/// port.
pub(crate) fn reverse_forwards(plan: &PortPlan) -> Vec<RemoteForward> {
    plan.exposed
        .iter()
        .map(|e| RemoteForward::on_pod_port(e.target, local(e.local)))
        .collect()
}

/// The ready endpoint addresses of `service` (every EndpointSlice of it; an endpoint without
/// conditions counts as ready), sorted, each once.
pub(crate) async fn ready_endpoints(
    slices: &Api<EndpointSlice>,
    service: &str,
) -> Result<Vec<String>, kube::Error> {
    let params = ListParams::default().labels(&format!("kubernetes.io/service-name={service}"));
    let list = slices.list(&params).await?;
    let mut ready: Vec<String> = list
        .items
        .iter()
        .flat_map(|s| &s.endpoints)
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
        .flat_map(|e| e.addresses.clone())
        .collect();
    ready.sort();
    ready.dedup();
    Ok(ready)
}

/// How long the Service's endpoints may take to become the shadow alone before ktctl says
/// what else is still there.
const ENDPOINTS_WITHIN: Duration = Duration::from_secs(30);

/// Waits until `service`'s ready endpoints are the shadow's addresses and nothing else — the
/// moment its traffic really goes to the workstation (selector and scale modes). After
/// [`ENDPOINTS_WITHIN`] it says what else is there and goes on waiting: the banner is not
/// printed until it is true. `false` when the run was stopped first.
pub(crate) async fn wait_for_shadow_endpoints(
    ctx: &Context<'_>,
    service: &str,
    shadow: &str,
) -> bool {
    let pods: Api<Pod> = Api::namespaced(ctx.cluster.client.clone(), &ctx.cluster.namespace);
    let slices: Api<EndpointSlice> =
        Api::namespaced(ctx.cluster.client.clone(), &ctx.cluster.namespace);
    let deadline = tokio::time::Instant::now() + ENDPOINTS_WITHIN;
    let mut said = false;
    loop {
        let shadow_ips = pods.get_opt(shadow).await.map(|pod| {
            let mut ips: Vec<String> = pod
                .and_then(|p| p.status?.pod_ips)
                .unwrap_or_default()
                .into_iter()
                .map(|ip| ip.ip)
                .collect();
            ips.sort();
            ips
        });
        let ready = ready_endpoints(&slices, service).await;
        match (shadow_ips, ready) {
            (Ok(shadow_ips), Ok(ready)) if !shadow_ips.is_empty() && ready == shadow_ips => {
                return true;
            }
            (Ok(shadow_ips), Ok(ready)) if !said && tokio::time::Instant::now() >= deadline => {
                said = true;
                tracing::warn!(
                    "Service {service}'s endpoints are {ready:?}, not only the shadow's {shadow_ips:?}, after {} s; waiting for them to be (its traffic does not all go to the workstation yet)",
                    ENDPOINTS_WITHIN.as_secs()
                );
            }
            (Err(error), _) | (_, Err(error)) if !said => {
                said = true;
                tracing::warn!("Cannot read where service {service}'s traffic goes yet: {error}");
            }
            _ => {}
        }
        tokio::select! {
            () = ctx.lifecycle.stop.cancelled() => return false,
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

/// The v0.3.7 banner for `what` once `service`'s endpoints are the shadow, then the reverse
/// tunnels kept up until the run stops.
async fn keep_reverse_tunnels(
    ctx: &Context<'_>,
    service: &str,
    pool: &SshPool,
    forwards: &[RemoteForward],
    what: &str,
) {
    if wait_for_shadow_endpoints(ctx, service, &pool.target().pod).await {
        ctx.announce(what);
        pool.keep_remote_forwards(forwards, &ctx.lifecycle.stop, None)
            .await;
    }
    pool.close().await;
}
