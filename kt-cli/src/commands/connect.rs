//! `sudo ktctl connect`: the workstation joins the cluster's network. Programs on it reach
//! pod IPs, ClusterIPs and `svc`, `svc.ns` and full names as if they ran in a pod of the
//! current namespace.
//!
//! - Where connections leave in the cluster ([`way`]): kt's agent dials them from its node
//!   (a `KtSession` of mode `connect`), or a shadow pod does, as ktctl v0.3.7's does.
//! - How they get there: the TUN device `kt0`, behind which the workstation's own kernel
//!   terminates each TCP connection and UDP flow ([`tun`]), each TCP connection an SSH
//!   channel and each UDP flow a datagram channel; or a SOCKS5 proxy
//!   (`--disableTunDevice`, [`socks`]); or the system's sshuttle (`--mode sshuttle`).
//! - Names ([`dns`], [`names`]): a local resolver that asks the cluster DNS through the
//!   tunnel for cluster names and the machine's own resolver for the rest, given to
//!   systemd-resolved for `kt0` only where resolved runs the machine's DNS ([`resolved`]),
//!   else installed in `/etc/resolv.conf`; or the hosts file (`--dnsMode hosts`).
//! - Leaving ([`system`]): Ctrl-C and SIGTERM undo every change; after `kill -9` the kernel
//!   removes the TUN device and its routes, the agent's lease ends the session, and the next
//!   connect restores the files from the backup the killed one left.
//!
//! [`plan`] is the pure part: the flags (v0.3.7's rules and texts), routes, cluster names,
//! the file edits.

pub mod dns;
mod names;
pub mod plan;
mod resolved;
pub mod socks;
pub mod sshuttle;
pub mod system;
pub mod tun;
mod way;

use std::{
    collections::{BTreeSet, HashSet},
    net::{IpAddr, SocketAddr},
    sync::{Arc, RwLock},
    time::Duration,
};

use kt_proto::net::Cidr;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use self::{
    plan::{ConnectPlan, DnsMode, Mode, PlanError},
    system::{Edit, Kind, SystemError},
    way::{Ranges, Way},
};
use crate::{
    args::{ConnectArgs, ConnectVia},
    cluster::{self, Cluster, ClusterError},
    lifecycle::{Lifecycle, LifecycleError},
    settings::Settings,
};

/// How long ktctl tries to resolve and reach the cluster's `kubernetes` Service through the
/// new path before it gives up saying so.
const VERIFY_WITHIN: Duration = Duration::from_secs(15);
/// How often the agent-mode session is read for new ranges (Services in new ranges, nodes).
const RANGES_EVERY: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// kt's connect drives Linux's TUN device, `ip` routes and resolver files; the other
    /// systems v0.3.7 ran on (macOS utun, Windows wintun) are not done yet.
    #[error("ktctl connect is available on Linux only for now (this is {0})")]
    Unsupported(&'static str),
    /// The shared shadow is counted on its pod (`kt-ref-count`), which a Deployment
    /// replaces at will.
    #[error("--shareShadow cannot be used with --useShadowDeployment: the shared shadow is a pod")]
    SharedDeployment,
    #[error(transparent)]
    System(#[from] SystemError),
    #[error(transparent)]
    Lifecycle(#[from] LifecycleError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Shadow(#[from] super::ShadowTunnelError),
    #[error(transparent)]
    Ssh(#[from] crate::ssh_client::SshError),
    #[error(transparent)]
    Tun(#[from] tun::TunError),
    #[error(transparent)]
    Socks(#[from] socks::SocksError),
    #[error(transparent)]
    Dns(#[from] dns::DnsError),
    #[error(transparent)]
    Sshuttle(#[from] sshuttle::SshuttleError),
    #[error(
        "no kt agent is ready in namespace '{namespace}' (install it from deploy/, or use --via shadow)"
    )]
    NoAgent { namespace: &'static str },
    #[error("session {0} was deleted while connecting")]
    SessionGone(String),
    #[error(
        "agent {agent} did not tell the cluster's network within 10 s (is it older than this ktctl?)"
    )]
    NoNetwork { agent: String },
    #[error("agent {agent} knows no cluster DNS (its resolv.conf names no nameserver)")]
    NoClusterDns { agent: String },
    #[error("the shared shadow pod {0} kept changing while joining it; try again")]
    SharedShadowBusy(String),
    #[error("the tunnel does not reach the cluster: {0}")]
    Unverified(String),
    #[error("stopped before the connection was established; nothing was changed")]
    Interrupted,
}

/// What every step of a connect needs.
pub(super) struct Context<'a> {
    pub settings: &'a Settings,
    pub args: &'a ConnectArgs,
    pub plan: &'a ConnectPlan,
    pub cluster: &'a Cluster,
    pub lifecycle: &'a Arc<Lifecycle>,
    /// The workstation's own search domains (resolv.conf `search`/`domain`).
    pub local_domains: Vec<String>,
}

pub async fn run(settings: &Settings, args: &ConnectArgs) -> Result<(), ConnectError> {
    if !cfg!(target_os = "linux") {
        return Err(ConnectError::Unsupported(std::env::consts::OS));
    }
    let plan = ConnectPlan::from_args(args)?;
    if args.share_shadow && settings.shadow.as_deployment {
        return Err(ConnectError::SharedDeployment);
    }
    system::check_root()?;
    system::check_single_connect(&crate::lifecycle::kt_home())?;
    if plan.mode == Mode::Sshuttle {
        if args.via == ConnectVia::Agent {
            return Err(sshuttle::SshuttleError::NeedsShadow.into());
        }
        sshuttle::check_installed().await?;
    }
    let lifecycle = Lifecycle::start("connect")?;
    // What a killed connect left is repaired only when no other connect runs: a live
    // one's changes (another user's, with another $HOME) are not leftovers.
    let repair = match system::other_connect_running() {
        Some(pid) => {
            tracing::debug!(pid, "another connect runs; nothing is repaired");
            Ok(Vec::new())
        }
        None => system::repair(&lifecycle.home),
    };
    let result = match repair {
        Ok(repaired) => {
            for path in repaired {
                tracing::info!(
                    "Restored {} (a connect that did not finish had changed it)",
                    path.display()
                );
            }
            connect(settings, args, &plan, &lifecycle).await
        }
        Err(error) => Err(error.into()),
    };
    lifecycle.finish().await;
    result
}

async fn connect(
    settings: &Settings,
    args: &ConnectArgs,
    plan: &ConnectPlan,
    lifecycle: &Arc<Lifecycle>,
) -> Result<(), ConnectError> {
    tokio::select! {
        () = lifecycle.stop.cancelled() => return Err(ConnectError::Interrupted),
        set_up = set_up(settings, args, plan, lifecycle) => set_up?,
    }
    super::banner(" All looks good, now you can access to resources in the kubernetes cluster");
    lifecycle.stop.cancelled().await;
    Ok(())
}

/// The machine's resolver before connect: its first nameserver (the real one when it is
/// systemd-resolved's stub, as v0.3.7 looks it up) and its search domains.
struct LocalResolver {
    nameserver: Option<SocketAddr>,
    search: Vec<String>,
    /// `/etc/resolv.conf` is systemd-resolved's own stub file
    /// ([`resolved::is_resolveds_stub_file`]).
    resolved_stub: bool,
}

impl LocalResolver {
    fn read() -> Self {
        let parse = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
        let conf = parse(system::RESOLV_CONF);
        let (mut nameserver, mut search) = (None, Vec::new());
        for line in conf.lines() {
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") if nameserver.is_none() => {
                    nameserver = words.next().and_then(|ip| ip.parse::<IpAddr>().ok());
                }
                Some("search" | "domain") => {
                    search = words.map(|d| d.trim_end_matches('.').to_owned()).collect()
                }
                _ => {}
            }
        }
        if nameserver == Some(IpAddr::from([127, 0, 0, 53])) {
            let real = parse("/run/systemd/resolve/resolv.conf");
            nameserver = real
                .lines()
                .filter_map(|l| l.strip_prefix("nameserver"))
                .find_map(|ip| ip.trim().parse().ok())
                .or(nameserver);
        }
        Self {
            nameserver: nameserver.map(|ip| SocketAddr::new(ip, 53)),
            search,
            resolved_stub: resolved::is_resolveds_stub_file(std::path::Path::new(
                system::RESOLV_CONF,
            )),
        }
    }
}

/// Everything up to the banner: the cluster side, the data path, names, and a check that a
/// cluster name resolves and its Service answers through the new path.
async fn set_up(
    settings: &Settings,
    args: &ConnectArgs,
    plan: &ConnectPlan,
    lifecycle: &Arc<Lifecycle>,
) -> Result<(), ConnectError> {
    let local = LocalResolver::read();
    let cluster = cluster::connect(&settings.cluster).await?;
    let ctx = Context {
        settings,
        args,
        plan,
        cluster: &cluster,
        lifecycle,
        local_domains: local.search.clone(),
    };
    tracing::info!(
        "Using {} mode",
        match plan.mode {
            Mode::Tun2socks => "tun2socks",
            Mode::Sshuttle => "sshuttle",
        }
    );
    // No Service: the agent holding fewest sessions.
    let no_endpoints = std::collections::BTreeMap::new();
    let agent = match args.via {
        ConnectVia::Shadow => None,
        _ if plan.mode == Mode::Sshuttle => None,
        ConnectVia::Agent => Some(
            cluster::agents::pick(&cluster, &no_endpoints)
                .await?
                .ok_or(ConnectError::NoAgent {
                    namespace: kt_proto::agent::NAMESPACE,
                })?,
        ),
        ConnectVia::Auto => cluster::agents::pick(&cluster, &no_endpoints).await?,
    };
    let way = match &agent {
        Some(agent) => {
            tracing::info!("Connecting through kt agent {agent}");
            way::via_agent(&ctx, agent).await?
        }
        None => way::via_shadow(&ctx).await?,
    };
    let Some(way) = way else {
        return Err(ConnectError::Interrupted);
    };
    let keep_out: Vec<IpAddr> = cluster
        .api_addresses
        .iter()
        .copied()
        .chain(way.peers())
        .collect();
    let routes = routes_of(&ctx, &way.ranges, &keep_out);
    let ingress_hosts = plan.ingress_ip.map(|_| {
        names::ingress_hosts(
            &cluster.client,
            &cluster.namespace,
            &lifecycle.tasks,
            lifecycle.done.clone(),
        )
    });
    let with_device = plan.mode == Mode::Tun2socks && !args.disable_tun_device;
    let on_resolved = matches!(plan.dns, DnsMode::Local { .. })
        && with_device
        && local.resolved_stub
        && resolved_answers().await;
    let dns_config = dns::ResolverConfig {
        namespace: cluster.namespace.clone(),
        cluster_domain: args.cluster_domain.clone(),
        local_domains: local.search.clone(),
        order: match &plan.dns {
            DnsMode::Local { order } => order.clone(),
            _ => vec![plan::DnsSource::Cluster],
        },
        cluster: way.dns.clone(),
        upstream: local.nameserver,
        cache_ttl: Duration::from_secs(u64::from(args.dns_cache_ttl)),
        ingress: plan.ingress_ip.zip(ingress_hosts.clone()),
    };
    let resolver = Arc::new(dns::Resolver::new(dns_config.clone()));
    let (tasks, done) = (&lifecycle.tasks, lifecycle.done.clone());
    match plan.mode {
        Mode::Tun2socks if args.disable_tun_device => {
            socks::start(
                plan.proxy,
                way.pool.clone(),
                resolver.clone(),
                tasks,
                done.clone(),
            )
            .await?;
            tracing::info!(
                ">> Please setup proxy config by: export http_proxy=socks5://{}:{} <<",
                plan.proxy.ip(),
                plan.proxy.port()
            );
        }
        Mode::Tun2socks => {
            let routed: &[Cidr] = if args.disable_tun_route { &[] } else { &routes };
            tun::start(way.pool.clone(), routed, tasks, done.clone()).await?;
            if let Some(session) = &way.session
                && !args.disable_tun_route
            {
                keep_routes_current(&ctx, session.clone(), routes.clone(), keep_out.clone());
            }
        }
        Mode::Sshuttle => {
            let shadow = way
                .shadow
                .as_ref()
                .ok_or(sshuttle::SshuttleError::NeedsShadow)?;
            sshuttle::start(
                kube::Api::namespaced(cluster.client.clone(), &cluster.namespace),
                shadow.name.clone(),
                sshuttle::Sshuttle {
                    routes: &routes,
                    exclude: &plan.exclude,
                    key_file: &shadow.key_file,
                    pod_dns: (plan.dns == DnsMode::Pod).then_some(shadow.ip).flatten(),
                    debug: settings.debug,
                },
                tasks,
                done.clone(),
            )
            .await?;
        }
    }
    // Where programs' questions go in localDNS mode.
    let names_at = match &plan.dns {
        DnsMode::Local { .. } => {
            tracing::info!("Setting up dns in local mode");
            let resolvers = (resolver.clone(), dns_config);
            Some(local_dns(&ctx, resolvers, ingress_hosts, on_resolved).await?)
        }
        DnsMode::Hosts { namespaces } => {
            tracing::info!("Setting up dns in hosts mode");
            let namespaces = if namespaces.is_empty() {
                vec![cluster.namespace.clone()]
            } else {
                namespaces.clone()
            };
            let edit = Arc::new(Edit::apply(
                &lifecycle.home,
                Kind::Hosts,
                ToOwned::to_owned,
            )?);
            {
                let edit = edit.clone();
                lifecycle.defer(
                    format!("the kt block in {}", system::hosts_path().display()),
                    async move {
                        edit.restore()?;
                        tracing::info!("Drop hosts successful");
                        Ok::<(), SystemError>(())
                    },
                );
            }
            names::keep_hosts(
                &cluster.client,
                &namespaces,
                &cluster.namespace,
                &args.cluster_domain,
                edit,
                tasks,
                done.clone(),
            )
            .await;
            None
        }
        DnsMode::Pod => {
            tracing::info!("Setting up dns in pod mode");
            None
        }
    };
    // Where the workstation's own sockets reach the cluster (kt0's routes, sshuttle's):
    // the check goes that way, not only through ktctl's channels.
    let kernel_routes: &[Cidr] = match plan.mode {
        Mode::Tun2socks if args.disable_tun_device || args.disable_tun_route => &[],
        Mode::Tun2socks | Mode::Sshuttle => &routes,
    };
    verify(&ctx, &way, &resolver, names_at, kernel_routes).await?;
    // Once the path is proven: the cleanup lists every Service and Deployment of the
    // namespace (v0.3.7's stale locks and selectors), which with 10 000 Services took
    // longer than the rest of a start.
    if !args.skip_cleanup {
        lifecycle.tasks.spawn(cluster::stale::delete_expired(
            cluster.client.clone(),
            cluster.namespace.clone(),
            cluster.clock,
        ));
    }
    Ok(())
}

/// Whether systemd-resolved answers `resolvectl`; says why not when it does not.
async fn resolved_answers() -> bool {
    match resolved::reachable().await {
        Ok(()) => true,
        Err(error) => {
            tracing::warn!(
                "{} is systemd-resolved's stub file, but resolved does not answer ({}); rewriting it instead",
                system::RESOLV_CONF,
                kt_proto::error_chain(&error)
            );
            false
        }
    }
}

/// `localDNS`: ktctl's resolver, given to systemd-resolved for `kt0` when `on_resolved`
/// (`/etc/resolv.conf` is resolved's stub file, resolved answers, and the TUN device
/// exists), else written into `/etc/resolv.conf` as v0.3.7 does. `resolvers` is the
/// resolver and its configuration. Returns where programs' questions go now, which
/// [`verify`] asks.
async fn local_dns(
    ctx: &Context<'_>,
    (resolver, config): (Arc<dns::Resolver>, dns::ResolverConfig),
    ingress_hosts: Option<IngressHosts>,
    on_resolved: bool,
) -> Result<SocketAddr, ConnectError> {
    if on_resolved {
        match on_resolved_link(ctx, config, ingress_hosts).await {
            Ok(()) => return Ok(resolved::STUB),
            Err(error) => {
                let _ = resolved::revert(tun::DEVICE).await;
                tracing::warn!(
                    "systemd-resolved did not take kt's DNS for {}: {}; rewriting {} instead",
                    tun::DEVICE,
                    kt_proto::error_chain(&error),
                    system::RESOLV_CONF
                );
            }
        }
    }
    let upstream = resolver.upstream();
    let server = dns::serve(resolver, dns::LISTEN, ctx.lifecycle.done.clone()).await?;
    ctx.lifecycle.tasks.spawn(server);
    tracing::info!("Setup local DNS with upstream [{upstream}]");
    let edit = Edit::apply(&ctx.lifecycle.home, Kind::ResolvConf, |original| {
        plan::resolv_conf_with(original, dns::LISTEN.ip())
    })?;
    ctx.lifecycle.defer(
        format!("the changes to {}", system::RESOLV_CONF),
        async move {
            edit.restore()?;
            tracing::info!("Restored {}", system::RESOLV_CONF);
            Ok::<(), SystemError>(())
        },
    );
    Ok(dns::LISTEN)
}

/// The resolver for systemd-resolved, on `kt0`'s address, port 53, with `config` less the
/// sources that are resolved's stub (it would send the names it routes to kt back to kt),
/// made `kt0`'s DNS server for the cluster's names; kept so until the run ends
/// ([`keep_link_current`]). On an error, the server stays idle until the end.
async fn on_resolved_link(
    ctx: &Context<'_>,
    mut config: dns::ResolverConfig,
    ingress_hosts: Option<IngressHosts>,
) -> Result<(), ConnectError> {
    config.upstream = config.upstream.filter(|at| *at != resolved::STUB);
    config.order.retain(|source| {
        let looping = matches!(source, plan::DnsSource::Server { address, .. } if *address == resolved::STUB);
        if looping {
            tracing::warn!(
                "DNS source {} left out: it is systemd-resolved's stub, which sends cluster names back to kt",
                resolved::STUB
            );
        }
        !looping
    });
    let upstream = config.upstream;
    let server = IpAddr::V4(tun::DEVICE_ADDRESS);
    let resolver = Arc::new(dns::Resolver::new(config));
    let serve = dns::serve(
        resolver,
        SocketAddr::new(server, 53),
        ctx.lifecycle.done.clone(),
    )
    .await?;
    ctx.lifecycle.tasks.spawn(serve);
    resolved::unmanage(tun::DEVICE).await;
    let namespaces = namespaces(&ctx.cluster.client).await;
    let link = Link {
        server,
        namespace: ctx.cluster.namespace.clone(),
        cluster_domain: ctx.args.cluster_domain.clone(),
        ingress_hosts,
    };
    let known = namespaces.clone().unwrap_or_default();
    let domains = link.domains(&known);
    resolved::install(tun::DEVICE, server, &domains).await?;
    ctx.lifecycle.defer(
        format!("the DNS settings of {} in systemd-resolved", tun::DEVICE),
        async {
            // Already gone when the device is.
            if let Err(error) = resolved::revert(tun::DEVICE).await {
                tracing::debug!(%error, "resolved kept nothing of the device");
            }
            Ok::<(), SystemError>(())
        },
    );
    tracing::info!(
        "Setup local DNS with upstream [{}]",
        upstream.map(|s| s.to_string()).unwrap_or_default()
    );
    tracing::info!(
        "systemd-resolved sends these names to kt through {} ({} untouched): {}",
        tun::DEVICE,
        system::RESOLV_CONF,
        domains.join(" ")
    );
    keep_link_current(ctx, link, domains, namespaces.map(|_| known));
    Ok(())
}

/// The hosts of the namespace's Ingresses (`--ingressIp`), kept current by a watch.
type IngressHosts = Arc<RwLock<HashSet<String>>>;

/// What `kt0`'s DNS in systemd-resolved is made of.
struct Link {
    /// ktctl's resolver for resolved (port 53).
    server: IpAddr,
    namespace: String,
    cluster_domain: String,
    ingress_hosts: Option<IngressHosts>,
}

impl Link {
    /// The link's domains with `namespaces` routed ([`resolved::link_domains`]); says once
    /// when some namespaces do not fit.
    fn domains(&self, namespaces: &BTreeSet<String>) -> Vec<String> {
        let hosts: BTreeSet<String> =
            self.ingress_hosts
                .as_ref()
                .map_or_else(BTreeSet::new, |hosts| {
                    hosts
                        .read()
                        .unwrap_or_else(|e| e.into_inner())
                        .iter()
                        .cloned()
                        .collect()
                });
        let (domains, left_out) =
            resolved::link_domains(&self.namespace, &self.cluster_domain, namespaces, &hosts);
        if left_out > 0 {
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                tracing::warn!(
                    "systemd-resolved takes {} domains per link: {left_out} namespaces left out, whose 'svc.ns' names will not resolve (full names do)",
                    resolved::MAX_DOMAINS
                );
            });
        }
        domains
    }
}

/// The cluster's namespaces; `None` when they cannot be listed (the `kt-developer` role
/// does not grant it), so that only the current one is routed.
async fn namespaces(client: &kube::Client) -> Option<BTreeSet<String>> {
    let api = kube::Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone());
    match api.list_metadata(&Default::default()).await {
        Ok(list) => Some(
            list.items
                .into_iter()
                .filter_map(|n| n.metadata.name)
                .collect(),
        ),
        Err(error) => {
            tracing::debug!(%error, "namespaces cannot be listed: only the current one is routed");
            None
        }
    }
}

/// How often `kt0`'s domains follow the Ingress hosts (`--ingressIp`), and how many of
/// those ticks pass between listing namespaces and checking that resolved still has
/// ktctl's server for `kt0`.
const LINK_TICK: Duration = Duration::from_secs(1);
const LINK_CHECK_TICKS: u32 = 15;

/// Keeps `kt0`'s DNS in resolved as set until the run ends: its domains follow the Ingress
/// hosts and (when `namespaces` could be listed: `Some`) the namespaces, and when another
/// program (NetworkManager) set the link's DNS since, ktctl's is set again, said.
fn keep_link_current(
    ctx: &Context<'_>,
    link: Link,
    mut domains: Vec<String>,
    mut namespaces: Option<BTreeSet<String>>,
) {
    let client = ctx.cluster.client.clone();
    // Ends at the stop signal: teardown reverts the link, which must not be set again.
    let stop = ctx.lifecycle.stop.clone();
    ctx.lifecycle.tasks.spawn(async move {
        let mut every = tokio::time::interval(LINK_TICK);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every.tick().await;
        let mut ticks = 0u32;
        let mut failing = false;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = every.tick() => {}
            }
            ticks = ticks.wrapping_add(1);
            let check = ticks.is_multiple_of(LINK_CHECK_TICKS);
            if check
                && namespaces.is_some()
                && let Some(now) = self::namespaces(&client).await
            {
                namespaces = Some(now);
            }
            let wanted = link.domains(namespaces.as_ref().unwrap_or(&BTreeSet::new()));
            let taken = check
                && matches!(
                    resolved::still_set(tun::DEVICE, link.server).await,
                    Ok(false)
                );
            let result = if taken {
                tracing::warn!(
                    "another program set the DNS of {}; kt's is set again",
                    tun::DEVICE
                );
                resolved::install(tun::DEVICE, link.server, &wanted).await
            } else if wanted != domains {
                resolved::set_domains(tun::DEVICE, &wanted).await
            } else {
                continue;
            };
            match result {
                Ok(()) => {
                    domains = wanted;
                    failing = false;
                }
                Err(error) if !failing => {
                    failing = true;
                    tracing::warn!(
                        "the DNS of {} in systemd-resolved could not be updated: {}",
                        tun::DEVICE,
                        kt_proto::error_chain(&error)
                    );
                }
                Err(error) => tracing::debug!(%error, "the link's DNS still not updated"),
            }
        }
    });
}

/// The routes: the cluster's ranges (pods left out with `--disablePodIp`) with
/// `--includeIps`, without `--excludeIps` and the tunnel's own peers.
fn routes_of(ctx: &Context<'_>, ranges: &Ranges, keep_out: &[IpAddr]) -> Vec<Cidr> {
    let mut cluster: Vec<Cidr> = ranges.services.clone();
    if !ctx.args.disable_pod_ip {
        cluster.extend(ranges.pods.iter().copied());
    }
    let routes = plan::routes(&cluster, &ctx.plan.include, &ctx.plan.exclude, keep_out);
    tracing::debug!(?routes, "routes into the tunnel");
    routes
}

/// Adds routes for ranges the agent reports later (a Service created in a new range, a node
/// joining), until the run ends.
fn keep_routes_current(
    ctx: &Context<'_>,
    session: String,
    mut routed: Vec<Cidr>,
    keep_out: Vec<IpAddr>,
) {
    let lifecycle = ctx.lifecycle.clone();
    let (client, namespace) = (ctx.cluster.client.clone(), ctx.cluster.namespace.clone());
    let (disable_pod_ip, include, exclude) = (
        ctx.args.disable_pod_ip,
        ctx.plan.include.clone(),
        ctx.plan.exclude.clone(),
    );
    let done = lifecycle.done.clone();
    lifecycle.tasks.spawn(async move {
        let mut every = tokio::time::interval(RANGES_EVERY);
        every.tick().await;
        loop {
            tokio::select! {
                () = done.cancelled() => return,
                _ = every.tick() => {}
            }
            let Some(ranges) = way::session_ranges(&client, &namespace, &session).await else {
                continue;
            };
            let mut cluster = ranges.services.clone();
            if !disable_pod_ip {
                cluster.extend(ranges.pods);
            }
            let wanted = plan::routes(&cluster, &include, &exclude, &keep_out);
            let new: Vec<Cidr> = wanted
                .into_iter()
                .filter(|r| {
                    !routed
                        .iter()
                        .any(|have| have.prefix() <= r.prefix() && have.contains(r.network()))
                })
                .collect();
            if !new.is_empty() && tun::add_routes(&new).await.is_ok() {
                routed.extend(new);
            }
        }
    });
}

/// Proves the path before the banner claims it: the cluster's `kubernetes` Service resolves
/// the way programs will ask — at `names_at` in localDNS mode (systemd-resolved's stub,
/// which must route it to kt, or ktctl's resolver in resolv.conf), else from the cluster
/// DNS — and its port answers: through the kernel when `kernel_routes` cover its address (a
/// TLS ClientHello is sent: any byte back is an answer, as is silence for 500 ms; a
/// connection the far side resets or ends is not), else through a channel.
/// A TLS ClientHello for `ip` (rustls's; the handshake is never completed, so no
/// certificate is checked): what makes the API server's Service answer at once, with its
/// ServerHello or an alert. `None` if rustls cannot make one.
fn client_hello(ip: IpAddr) -> Option<Vec<u8>> {
    use tokio_rustls::rustls;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .ok()?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::IpAddress(ip.into());
    let mut connection = rustls::ClientConnection::new(Arc::new(config), name).ok()?;
    let mut hello = Vec::new();
    connection.write_tls(&mut hello).ok()?;
    Some(hello)
}

async fn verify(
    ctx: &Context<'_>,
    way: &Way,
    resolver: &dns::Resolver,
    names_at: Option<SocketAddr>,
    kernel_routes: &[Cidr],
) -> Result<(), ConnectError> {
    let name = format!("kubernetes.default.svc.{}", ctx.args.cluster_domain);
    let once = || async {
        let ip = match names_at {
            Some(server) => dns::lookup_a(server, &name)
                .await
                .map_err(|e| format!("the resolver at {server} did not answer for {name}: {e}"))?
                .first()
                .copied()
                .ok_or_else(|| format!("{name} has no address"))?,
            None => resolver
                .cluster_address(&name)
                .await
                .ok_or_else(|| format!("the cluster DNS did not answer for {name}"))?,
        };
        if kernel_routes.iter().any(|route| route.contains(ip)) {
            let mut stream = tokio::time::timeout(
                Duration::from_secs(3),
                tokio::net::TcpStream::connect((ip, 443)),
            )
            .await
            .map_err(|_| format!("{ip}:443 did not answer within 3 s"))?
            .map_err(|e| format!("{ip}:443 did not answer: {e}"))?;
            // A TLS server answers a ClientHello at once; without one it waits in silence,
            // and only the timeout below could tell it from a path still opening.
            if let Some(hello) = client_hello(ip) {
                let _ = stream.write_all(&hello).await;
            }
            let mut byte = [0u8; 1];
            return match tokio::time::timeout(Duration::from_millis(500), stream.read(&mut byte))
                .await
            {
                Err(_) | Ok(Ok(1..)) => Ok(()),
                Ok(Ok(_)) => Err(format!("{ip}:443 closed the connection")),
                Ok(Err(e)) => Err(format!("{ip}:443 did not answer: {e}")),
            };
        }
        let channel = way
            .pool
            .open(&ip.to_string(), 443)
            .await
            .map_err(|e| format!("{ip}:443 did not answer: {}", kt_proto::error_chain(&e)))?;
        let _ = channel.close().await;
        Ok::<(), String>(())
    };
    let deadline = tokio::time::Instant::now() + VERIFY_WITHIN;
    loop {
        match once().await {
            Ok(()) => return Ok(()),
            Err(reason) if tokio::time::Instant::now() >= deadline => {
                return Err(ConnectError::Unverified(reason));
            }
            Err(reason) => {
                tracing::debug!(%reason, "the path does not answer yet");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    }
}
