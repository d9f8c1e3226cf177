//! `ktctl forward <svc|address> [local[:remote]]`: a workstation port to a Service's port or
//! to any address the cluster can reach (`10.1.2.3:80`, `name.ns:80` — a form v0.3.7 never
//! implemented). Every local connection is one `direct-tcpip` channel through the shadow,
//! which dials the target from inside the cluster: a Service name keeps working while its
//! pods are replaced, and a dropped tunnel is re-established for the next connection.

use std::sync::Arc;

use kt_proto::compat;
use tokio::net::TcpListener;

use crate::{
    args::ForwardArgs,
    cluster::{self, ClusterError},
    lifecycle::{Lifecycle, LifecycleError},
    settings::Settings,
    shadow::ShadowSpec,
    ssh_client::SshPool,
};

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("invalid {what} '{text}'")]
    Port { what: &'static str, text: String },
    #[error("address '{0}' needs a port, e.g. '{0}:80'")]
    AddressNeedsPort(String),
    #[error("address '{0}' already names its port; give only a local port")]
    AddressHasPort(String),
    #[error("port {port} not exists in service '{service}' (its ports: {ports})")]
    PortNotInService {
        port: u16,
        service: String,
        ports: String,
    },
    #[error("service '{0}' has no port")]
    NoPort(String),
    #[error("service '{0}' has multiple ports, must specify one")]
    MultiplePorts(String),
    #[error("local port {port} is not available{hint}")]
    LocalPortBusy {
        port: u16,
        /// How to get round it, when there is a way.
        hint: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Lifecycle(#[from] LifecycleError),
    #[error(transparent)]
    Shadow(#[from] super::ShadowTunnelError),
}

/// Where forwarded connections go.
#[derive(Debug, PartialEq, Eq)]
pub struct Plan {
    pub host: String,
    pub remote_port: u16,
    pub local_port: u16,
    /// `port N of service 'S'` or `address 'A'`, for the banner.
    pub describe: String,
}

fn parse_port(text: &str, what: &'static str) -> Result<u16, ForwardError> {
    text.parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| ForwardError::Port {
            what,
            text: text.to_owned(),
        })
}

/// `local[:remote]` → (local, remote).
fn parse_ports(spec: Option<&str>) -> Result<(Option<u16>, Option<u16>), ForwardError> {
    match spec {
        None => Ok((None, None)),
        Some(s) => match s.split_once(':') {
            Some((l, r)) => Ok((
                Some(parse_port(l, "local port")?),
                Some(parse_port(r, "remote port")?),
            )),
            None => Ok((Some(parse_port(s, "local port")?), None)),
        },
    }
}

/// The plan for the address form: `host:port` (a first argument with a dot).
pub fn plan_address(target: &str, ports: Option<&str>) -> Result<Plan, ForwardError> {
    let (host, port) = target
        .rsplit_once(':')
        .ok_or_else(|| ForwardError::AddressNeedsPort(target.to_owned()))?;
    let remote_port = parse_port(port, "port")?;
    let (local, remote) = parse_ports(ports)?;
    if remote.is_some() {
        return Err(ForwardError::AddressHasPort(target.to_owned()));
    }
    Ok(Plan {
        host: host.into(),
        remote_port,
        local_port: local.unwrap_or(remote_port),
        describe: format!("address '{target}'"),
    })
}

/// The plan for the service form, from the Service's ports.
pub fn plan_service(
    name: &str,
    namespace: &str,
    service_ports: &[u16],
    ports: Option<&str>,
) -> Result<Plan, ForwardError> {
    let (local, remote) = parse_ports(ports)?;
    let port = match (remote, service_ports) {
        (Some(r), _) if service_ports.contains(&r) => r,
        (Some(port), _) => {
            let ports: Vec<String> = service_ports.iter().map(u16::to_string).collect();
            return Err(ForwardError::PortNotInService {
                port,
                service: name.to_owned(),
                ports: ports.join(", "),
            });
        }
        (None, [only]) => *only,
        (None, []) => return Err(ForwardError::NoPort(name.to_owned())),
        (None, _) => return Err(ForwardError::MultiplePorts(name.to_owned())),
    };
    let describe = if remote.is_some() {
        format!("port {port} of service '{name}'")
    } else {
        format!("service '{name}'")
    };
    Ok(Plan {
        host: format!("{name}.{namespace}"),
        remote_port: port,
        local_port: local.unwrap_or(port),
        describe,
    })
}

pub async fn run(settings: &Settings, args: &ForwardArgs) -> Result<(), ForwardError> {
    let ports = args.ports.as_deref();
    // The address form needs no cluster to be checked.
    let address = if args.target.contains('.') {
        Some(plan_address(&args.target, ports)?)
    } else {
        parse_ports(ports)?;
        None
    };
    let cluster = cluster::connect(&settings.cluster).await?;
    let plan = match address {
        Some(plan) => plan,
        None => {
            let name = cluster::service_name(&args.target);
            let service = cluster.service(name).await?;
            let service_ports: Vec<u16> = service
                .spec
                .and_then(|s| s.ports)
                .unwrap_or_default()
                .into_iter()
                .filter_map(|p| u16::try_from(p.port).ok())
                .collect();
            plan_service(name, &cluster.namespace, &service_ports, ports)?
        }
    };
    // The local port first: a busy port fails before anything is created in the cluster.
    let listener = TcpListener::bind(("127.0.0.1", plan.local_port))
        .await
        .map_err(|source| ForwardError::LocalPortBusy {
            port: plan.local_port,
            hint: busy_port_hint(&args.target, &plan, &source),
            source,
        })?;

    let lifecycle = Lifecycle::start("forward")?;
    let result = forward(settings, &cluster, &lifecycle, &plan, listener).await;
    lifecycle.finish().await;
    result
}

/// A privileged port that was taken by default (no local port given) needs root: suggest
/// giving one.
fn busy_port_hint(target: &str, plan: &Plan, error: &std::io::Error) -> String {
    if error.kind() == std::io::ErrorKind::PermissionDenied && plan.local_port < 1024 {
        let example = if target.contains('.') {
            format!("ktctl forward {target} 8{:03}", plan.local_port)
        } else {
            format!(
                "ktctl forward {target} 8{:03}:{}",
                plan.local_port, plan.remote_port
            )
        };
        format!(" (ports below 1024 need root; choose a local port, e.g. '{example}')")
    } else {
        String::new()
    }
}

async fn forward(
    settings: &Settings,
    cluster: &cluster::Cluster,
    lifecycle: &Arc<Lifecycle>,
    plan: &Plan,
    listener: TcpListener,
) -> Result<(), ForwardError> {
    let name = compat::connect_shadow_name(&compat::random_lower(5, rand::random));
    let spec = ShadowSpec::new(
        &settings.shadow,
        name,
        cluster.namespace.clone(),
        compat::ROLE_SHADOW_CONNECT,
        &settings.identity.user,
    );
    let Some(pool) = super::shadow_tunnel(
        settings,
        cluster,
        lifecycle,
        &spec,
        settings.ssh.connections,
    )
    .await?
    else {
        return Ok(());
    };
    super::banner(&format!(
        " Now you can access {} via 'localhost:{}'",
        plan.describe, plan.local_port
    ));
    serve(&pool, plan, listener, lifecycle).await;
    pool.close().await;
    Ok(())
}

/// Carries every local connection as a channel until the run stops.
async fn serve(pool: &Arc<SshPool>, plan: &Plan, listener: TcpListener, lifecycle: &Lifecycle) {
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let (local, peer) = tokio::select! {
            () = lifecycle.stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(error) => {
                    // Out of descriptors or an aborted connection: pause rather than spin.
                    tracing::debug!(%error, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = local.set_nodelay(true);
        let (pool, host, port, stop) = (
            pool.clone(),
            plan.host.clone(),
            plan.remote_port,
            lifecycle.stop.clone(),
        );
        connections.spawn(async move {
            match pool.open(&host, port).await {
                Ok(channel) => {
                    tokio::select! {
                        result = kt_tunnel::bridge(channel, local) => if let Err(error) = result {
                            tracing::debug!(%peer, %error, "forwarded connection ended with an error");
                        },
                        () = stop.cancelled() => {}
                    }
                }
                Err(e) => tracing::warn!("Failed to forward connection from {peer}: {}", kt_proto::error_chain(&e)),
            }
        });
    }
    connections.close();
    connections.wait().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_privileged_default_port_suggests_a_local_one() {
        let plan = plan_service("web", "dev", &[80], None).unwrap();
        let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        assert_eq!(
            busy_port_hint("web", &plan, &denied),
            " (ports below 1024 need root; choose a local port, e.g. 'ktctl forward web 8080:80')"
        );
        let in_use = std::io::Error::from(std::io::ErrorKind::AddrInUse);
        assert_eq!(busy_port_hint("web", &plan, &in_use), "");
    }

    #[test]
    fn the_address_form_names_host_and_port() {
        let p = plan_address("10.1.2.3:80", Some("8080")).unwrap();
        assert_eq!(
            (p.host.as_str(), p.remote_port, p.local_port),
            ("10.1.2.3", 80, 8080)
        );
        assert_eq!(plan_address("db.prod:5432", None).unwrap().local_port, 5432);
        assert!(
            plan_address("db.prod", None)
                .unwrap_err()
                .to_string()
                .contains("needs a port")
        );
        assert!(plan_address("db.prod:x", None).is_err());
        assert!(matches!(
            plan_address("db.prod:5432", Some("1:2")),
            Err(ForwardError::AddressHasPort(_))
        ));
    }

    #[test]
    fn service_form_infers_or_checks_the_port() {
        let p = plan_service("web", "dev", &[80], None).unwrap();
        assert_eq!(
            (p.host.as_str(), p.remote_port, p.local_port),
            ("web.dev", 80, 80)
        );
        assert_eq!(p.describe, "service 'web'");
        let p = plan_service("web", "dev", &[80], Some("6060:80")).unwrap();
        assert_eq!(p.describe, "port 80 of service 'web'");
        assert_eq!(p.local_port, 6060);
        assert!(
            plan_service("web", "dev", &[80, 443], None)
                .unwrap_err()
                .to_string()
                .contains("multiple ports")
        );
        assert_eq!(
            plan_service("web", "dev", &[80, 443], Some("1:81"))
                .unwrap_err()
                .to_string(),
            "port 81 not exists in service 'web' (its ports: 80, 443)"
        );
        assert!(plan_service("web", "dev", &[80], Some("0")).is_err());
    }
}
