//! Role `router`: the mesh router pod of ktctl v0.3.7's `auto` mesh mode (no agent), built
//! on the agent's HTTP router ([`crate::agent::router`]), so requests are routed by header
//! over HTTP/1.1, HTTP/2, gRPC and WebSocket — v0.3.7's nginx router did HTTP/1.1 only.
//!
//! It keeps v0.3.7's contract (`../shared/reference/ktctl-v0.3.7.md` §4, "Router"), so the
//! Go ktctl and kt drive it alike:
//! - `router setup <svc> <svcPort:targetPort,...> <header:version>`, `router add
//!   <header:version>` (refused when the header differs) and `router remove
//!   <header:version>` edit the state file ([`STATE_FILE`], JSON as v0.3.7's `/etc/kt.conf`)
//!   under an exclusive lock; invoked as `/usr/sbin/router …` (the image links it there) or
//!   `kt-node-agent router …`;
//! - the server (`kt-node-agent router` without a command, the pod's process) follows the
//!   state file: for each port pair it listens on the target port and sends a request whose
//!   header (`-` and `_` alike, case-insensitive) carries a listed version to the Service
//!   `<svc>-kt-mesh-<version>:<svcPort>`, every other request to `<svc>-kt-stuntman:<svcPort>`
//!   (names resolved by the pod's resolver, i.e. the cluster DNS).

use std::{
    collections::BTreeMap,
    io::{Read as _, Seek as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use kt_proto::session::HeaderMatch;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::agent::{
    mesh::{MeshTarget, Route, RouteKey},
    router::Router,
};

/// Where the state lives in kt's router image (a writable directory of the pod).
pub const STATE_FILE: &str = "/var/kt-router/kt.conf";
/// How often the server looks at the state file (and resolves names it has not resolved).
const POLL: Duration = Duration::from_millis(200);
/// How often every name is resolved again.
const REFRESH: Duration = Duration::from_secs(5);

/// The state, as v0.3.7's router writes `/etc/kt.conf`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct State {
    pub service: String,
    /// `[svcPort, targetPort]` pairs, as strings.
    pub ports: Vec<[String; 2]>,
    /// The header name.
    pub header: String,
    pub versions: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error(
        "usage: router setup <service> <port:targetPort,...> <header:version> | router add <header:version> | router remove <header:version>"
    )]
    Usage,
    #[error("invalid port pair '{0}', should be <port>:<targetPort>")]
    Ports(String),
    #[error("invalid version mark '{0}', should be <header>:<version>")]
    Mark(String),
    #[error("the router routes on header '{current}', not '{asked}'")]
    OtherHeader { current: String, asked: String },
    #[error("the router is not set up (no {0})")]
    NotSetUp(String),
    #[error("state file {path}")]
    State {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("state file {0} does not parse")]
    Parse(String, #[source] serde_json::Error),
}

/// Header names compare as nginx's `$http_<name>` does: case-insensitive, `-` as `_`.
fn same_header(a: &str, b: &str) -> bool {
    a.replace('_', "-")
        .eq_ignore_ascii_case(&b.replace('_', "-"))
}

fn mark(text: &str) -> Result<(String, String), RouterError> {
    match text.split_once(':') {
        Some((h, v)) if !h.is_empty() && !v.is_empty() => Ok((h.to_owned(), v.to_owned())),
        _ => Err(RouterError::Mark(text.to_owned())),
    }
}

/// The state after the command `args` (`setup …`, `add …`, `remove …`) on `state` (pure).
pub fn apply(state: Option<State>, args: &[String]) -> Result<State, RouterError> {
    match args {
        [cmd, service, ports, version_mark] if cmd == "setup" => {
            let (header, version) = mark(version_mark)?;
            let ports = ports
                .split(',')
                .filter(|p| !p.trim().is_empty())
                .map(|pair| match pair.split_once(':') {
                    Some((p, t)) if p.parse::<u16>().is_ok() && t.parse::<u16>().is_ok() => {
                        Ok([p.to_owned(), t.to_owned()])
                    }
                    _ => Err(RouterError::Ports(pair.to_owned())),
                })
                .collect::<Result<Vec<_>, _>>()?;
            if ports.is_empty() {
                return Err(RouterError::Ports(String::new()));
            }
            Ok(State {
                service: service.clone(),
                ports,
                header,
                versions: vec![version],
            })
        }
        [cmd, version_mark] if cmd == "add" || cmd == "remove" => {
            let mut state = state.ok_or_else(|| RouterError::NotSetUp(STATE_FILE.into()))?;
            let (header, version) = mark(version_mark)?;
            if !same_header(&state.header, &header) {
                return Err(RouterError::OtherHeader {
                    current: state.header,
                    asked: header,
                });
            }
            state.versions.retain(|v| *v != version);
            if cmd == "add" {
                state.versions.push(version);
            }
            Ok(state)
        }
        _ => Err(RouterError::Usage),
    }
}

/// Runs a command on the state file at `path` under an exclusive lock (`flock`, as v0.3.7
/// serialises them), printing nothing on success.
pub fn command(path: &Path, args: &[String]) -> Result<(), RouterError> {
    let io = |source| RouterError::State {
        path: path.display().to_string(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io)?;
    // SAFETY: flock on a descriptor we own; released when the file closes.
    if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&file), libc::LOCK_EX) } != 0 {
        return Err(io(std::io::Error::last_os_error()));
    }
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(io)?;
    let current = if text.trim().is_empty() {
        None
    } else {
        Some(
            serde_json::from_str(&text)
                .map_err(|e| RouterError::Parse(path.display().to_string(), e))?,
        )
    };
    let next = apply(current, args)?;
    let json = serde_json::to_vec(&next).expect("the state serialises");
    file.set_len(0).map_err(io)?;
    file.rewind().map_err(io)?;
    file.write_all(&json).map_err(io)?;
    file.sync_all().map_err(io)?;
    tracing::info!(service = %next.service, versions = ?next.versions, "router state written");
    Ok(())
}

/// The routes of `state`, with the Services' addresses `resolve` knows (a version whose
/// Service does not resolve yet takes no requests; without the stuntman, requests that
/// match nothing get 503).
fn routes(state: &State, resolve: &BTreeMap<String, IpAddr>) -> BTreeMap<RouteKey, Route> {
    let stuntman = format!("{}-kt-stuntman", state.service);
    state
        .ports
        .iter()
        .filter_map(|[port, target]| Some((port.parse::<u16>().ok()?, target.parse::<u16>().ok()?)))
        .map(|(port, target)| {
            let key = RouteKey {
                namespace: String::new(),
                service: state.service.clone(),
                port: target,
            };
            let sessions = state
                .versions
                .iter()
                .filter_map(|version| {
                    let name = format!("{}-kt-mesh-{version}", state.service);
                    let ip = resolve.get(&name)?;
                    Some(MeshTarget {
                        session: name,
                        owner: format!("version {version}"),
                        header: HeaderMatch {
                            name: state.header.replace('_', "-").to_ascii_lowercase(),
                            value: version.clone(),
                        },
                        to: SocketAddr::new(*ip, port),
                    })
                })
                .collect();
            let endpoints = resolve
                .get(&stuntman)
                .map(|ip| vec![SocketAddr::new(*ip, port)])
                .unwrap_or_default();
            (
                key,
                Route {
                    sessions,
                    endpoints,
                    addresses: Vec::new(),
                },
            )
        })
        .collect()
}

/// The Service names `state` routes to.
fn names(state: &State) -> Vec<String> {
    std::iter::once(format!("{}-kt-stuntman", state.service))
        .chain(
            state
                .versions
                .iter()
                .map(|v| format!("{}-kt-mesh-{v}", state.service)),
        )
        .collect()
}

/// The server: follows the state file at `path` until `shutdown`.
pub async fn serve(
    path: PathBuf,
    shutdown: CancellationToken,
) -> Result<(), std::convert::Infallible> {
    let router = Router::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), shutdown.child_token());
    let mut resolved: BTreeMap<String, IpAddr> = BTreeMap::new();
    let mut applied: Option<(State, BTreeMap<String, IpAddr>)> = None;
    let mut last_refresh = tokio::time::Instant::now();
    tracing::info!(state = %path.display(), "router running");
    loop {
        let state: Option<State> = std::fs::read_to_string(&path)
            .ok()
            .filter(|t| !t.trim().is_empty())
            .and_then(|t| serde_json::from_str(&t).ok());
        let state = state.unwrap_or_default();
        // A name not resolved yet is asked every poll; the others every few seconds (a
        // Service's ClusterIP does not change, but a Service can be replaced).
        let refresh = last_refresh.elapsed() >= REFRESH;
        for name in names(&state) {
            if !refresh && resolved.contains_key(&name) {
                continue;
            }
            if let Ok(Some(address)) = tokio::net::lookup_host((name.as_str(), 0))
                .await
                .map(|mut a| a.next())
            {
                resolved.insert(name, address.ip());
            }
        }
        if refresh {
            last_refresh = tokio::time::Instant::now();
        }
        resolved.retain(|name, _| names(&state).contains(name));
        let now = (state.clone(), resolved.clone());
        if applied.as_ref() != Some(&now) {
            let listening = router.update_on_ports(&routes(&state, &resolved));
            tracing::info!(service = %state.service, versions = ?state.versions, ports = ?listening.keys().map(|k| k.port).collect::<Vec<_>>(), "routes applied");
            applied = Some(now);
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(POLL) => {}
        }
    }
    router.closed().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(text: &str) -> Vec<String> {
        text.split(' ').map(str::to_owned).collect()
    }

    #[test]
    fn setup_add_and_remove_edit_the_state_as_v0_3_7() {
        let state = apply(None, &args("setup web 80:8080,81:9090 version:abcde")).unwrap();
        assert_eq!(
            serde_json::to_value(&state).unwrap(),
            serde_json::json!({"Service": "web", "Ports": [["80", "8080"], ["81", "9090"]],
                               "Header": "version", "Versions": ["abcde"]})
        );
        let state = apply(Some(state), &args("add VERSION:fghij")).unwrap();
        assert_eq!(state.versions, ["abcde", "fghij"]);
        let state = apply(Some(state), &args("remove version:abcde")).unwrap();
        assert_eq!(state.versions, ["fghij"]);
        assert!(matches!(
            apply(Some(state), &args("add x-dev:abc")),
            Err(RouterError::OtherHeader { .. })
        ));
        assert!(matches!(
            apply(None, &args("add version:x")),
            Err(RouterError::NotSetUp(_))
        ));
        assert!(matches!(
            apply(None, &args("setup web 80 version:x")),
            Err(RouterError::Ports(_))
        ));
        assert!(matches!(
            apply(None, &args("reload")),
            Err(RouterError::Usage)
        ));
    }

    #[test]
    fn each_target_port_routes_versions_to_their_shadow_service_and_the_rest_to_the_stuntman() {
        let state = apply(None, &args("setup web 80:8080 x_dev:abcde")).unwrap();
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let resolved = BTreeMap::from([
            ("web-kt-stuntman".to_owned(), ip("10.96.0.30")),
            ("web-kt-mesh-abcde".to_owned(), ip("10.96.0.31")),
        ]);
        let routes = routes(&state, &resolved);
        let route = routes.values().next().unwrap();
        assert_eq!(
            routes.keys().next().unwrap().port,
            8080,
            "listens on the target port"
        );
        assert_eq!(
            route.endpoints,
            ["10.96.0.30:80".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(
            route.sessions[0].to,
            "10.96.0.31:80".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(
            route.sessions[0].header.name, "x-dev",
            "nginx reads x_dev and x-dev alike"
        );
    }
}
