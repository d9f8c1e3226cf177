//! `ktctl forward <svc|address> [local[:remote]]`: a workstation port to a Service's port or
//! to any address the cluster can reach (`10.1.2.3:80`, `name.ns:80` — a form v0.3.7 never
//! implemented). Every local connection is one `direct-tcpip` channel through the shadow,
//! which dials the target from inside the cluster: a Service name keeps working while its
//! pods are replaced, and a dropped tunnel is re-established for the next connection.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use kt_proto::k8s;
use kube::Api;
use tokio::net::TcpListener;

use crate::{CliError, args::GlobalOptions, cluster, session::Session, shadow};

/// Where forwarded connections go.
#[derive(Debug, PartialEq, Eq)]
pub struct Plan {
    pub host: String,
    pub remote_port: u16,
    pub local_port: u16,
    /// `port N of service 'S'` or `address 'A'`, for the banner.
    pub describe: String,
}

fn parse_port(text: &str, what: &str) -> Result<u16, CliError> {
    text.parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| CliError::Usage(format!("invalid {what} '{text}'")))
}

/// `local[:remote]` → (local, remote).
fn parse_ports(spec: Option<&str>) -> Result<(Option<u16>, Option<u16>), CliError> {
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
pub fn plan_address(target: &str, ports: Option<&str>) -> Result<Plan, CliError> {
    let (host, port) = target.rsplit_once(':').ok_or_else(|| {
        CliError::Usage(format!(
            "address '{target}' needs a port, e.g. '{target}:80'"
        ))
    })?;
    let remote_port = parse_port(port, "port")?;
    let (local, remote) = parse_ports(ports)?;
    if remote.is_some() {
        return Err(CliError::Usage(format!(
            "address '{target}' already names its port; give only a local port"
        )));
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
    service_ports: &[(Option<String>, u16)],
    ports: Option<&str>,
) -> Result<Plan, CliError> {
    let (local, remote) = parse_ports(ports)?;
    let port = match remote {
        Some(r) if service_ports.iter().any(|(_, p)| *p == r) => r,
        Some(r) => {
            return Err(CliError::Usage(format!(
                "port {r} not exists in service '{name}'"
            )));
        }
        None => match service_ports {
            [(_, only)] => *only,
            [] => return Err(CliError::Usage(format!("service '{name}' has no port"))),
            _ => {
                return Err(CliError::Usage(format!(
                    "service '{name}' has multiple ports, must specify one"
                )));
            }
        },
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

pub async fn run(
    global: &GlobalOptions,
    target: &str,
    ports: Option<&str>,
) -> Result<(), CliError> {
    let cluster = cluster::connect(global).await?;
    let plan = if target.contains('.') {
        plan_address(target, ports)?
    } else {
        let name = target
            .strip_prefix("svc/")
            .or_else(|| target.strip_prefix("service/"))
            .unwrap_or(target);
        let services: Api<Service> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
        let service = services
            .get_opt(name)
            .await
            .map_err(|e| CliError::Kube(format!("failed to get service '{name}'"), Box::new(e)))?
            .ok_or_else(|| {
                CliError::Usage(format!(
                    "service '{name}' not found in namespace '{}'",
                    cluster.namespace
                ))
            })?;
        let service_ports: Vec<(Option<String>, u16)> = service
            .spec
            .and_then(|s| s.ports)
            .unwrap_or_default()
            .into_iter()
            .map(|p| (p.name, p.port as u16))
            .collect();
        plan_service(name, &cluster.namespace, &service_ports, ports)?
    };
    // The local port first: a busy port fails before anything is created in the cluster.
    let listener = TcpListener::bind(("127.0.0.1", plan.local_port))
        .await
        .map_err(|e| {
            CliError::Usage(format!(
                "local port {} is not available: {e}",
                plan.local_port
            ))
        })?;

    let session = Session::start("forward")?;
    let result = forward(global, &cluster, &session, &plan, listener).await;
    session.finish().await;
    result
}

async fn forward(
    global: &GlobalOptions,
    cluster: &cluster::Cluster,
    session: &Arc<Session>,
    plan: &Plan,
    listener: TcpListener,
) -> Result<(), CliError> {
    let name = k8s::connect_shadow_name(&k8s::random_lower(5, rand::random));
    let spec = shadow::ShadowSpec::new(
        global,
        name,
        cluster.namespace.clone(),
        k8s::ROLE_SHADOW_CONNECT,
    )
    .map_err(CliError::Usage)?;
    let connections = usize::from(global.ssh_connections);
    let Some(tunnel) = super::shadow_tunnel(global, cluster, session, &spec, connections).await?
    else {
        return Ok(());
    };
    super::banner(&format!(
        " Now you can access {} via 'localhost:{}'",
        plan.describe, plan.local_port
    ));
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let (local, peer) = tokio::select! {
            () = session.stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(_) => continue,
            },
        };
        let _ = local.set_nodelay(true);
        let (tunnel, host, port, stop) = (
            tunnel.clone(),
            plan.host.clone(),
            plan.remote_port,
            session.stop.clone(),
        );
        connections.spawn(async move {
            match tunnel.open(&host, port).await {
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
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_form() {
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
    }

    #[test]
    fn service_form_infers_or_checks_the_port() {
        let one = [(Some("http".to_owned()), 80)];
        let p = plan_service("web", "dev", &one, None).unwrap();
        assert_eq!(
            (p.host.as_str(), p.remote_port, p.local_port),
            ("web.dev", 80, 80)
        );
        assert_eq!(p.describe, "service 'web'");
        let p = plan_service("web", "dev", &one, Some("6060:80")).unwrap();
        assert_eq!(p.describe, "port 80 of service 'web'");
        assert_eq!(p.local_port, 6060);
        let two = [(None, 80), (None, 443)];
        assert!(
            plan_service("web", "dev", &two, None)
                .unwrap_err()
                .to_string()
                .contains("multiple ports")
        );
        assert!(
            plan_service("web", "dev", &two, Some("1:81"))
                .unwrap_err()
                .to_string()
                .contains("81")
        );
        assert!(plan_service("web", "dev", &one, Some("0")).is_err());
    }
}
