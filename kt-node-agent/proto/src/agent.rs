//! How ktctl finds the node agent and holds a session there: where the agents run, their
//! ports, the SSH login, and which `tcpip-forward` stands for which Service port.
//!
//! The protocol, in order: ktctl creates the [`KtSession`](crate::session::KtSession), then
//! logs in to an agent's SSH server ([`SSH_PORT`] on the agent's node) as [`Login`] with the
//! session's key; for every exposed Service port it asks for one `tcpip-forward` whose bind
//! port is that Service port ([`forward_port`]). The agent opens a tunnel listener for each,
//! writes the session's `status`, and sends every connection a listener accepts back as a
//! `forwarded-tcpip` channel naming the same Service port, which ktctl maps to its local port.

use std::{fmt, net::SocketAddr, str::FromStr};

use crate::session::SessionSpec;

/// The namespace `deploy/` installs the agent in.
pub const NAMESPACE: &str = "kt-system";
/// The agent DaemonSet's name and its pods' `app.kubernetes.io/name` label.
pub const NAME: &str = "kt-node-agent";
/// The label selector of the agent's pods.
pub const LABEL_SELECTOR: &str = "app.kubernetes.io/name=kt-node-agent";
/// The agent's SSH port on its node (host network), where ktctl brings its sessions.
pub const SSH_PORT: u16 = 9922;
/// The agent's HTTP port on its node: `/healthz`, `/readyz`, `/metrics`.
pub const HTTP_PORT: u16 = 9966;

/// The SSH user name of a session: `<namespace>/<session>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Login {
    pub namespace: String,
    pub session: String,
}

/// A user name that is not `<namespace>/<session>`.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("login '{0}' is not <namespace>/<session>")]
pub struct LoginError(String);

impl fmt::Display for Login {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.session)
    }
}

impl FromStr for Login {
    type Err = LoginError;

    fn from_str(user: &str) -> Result<Self, Self::Err> {
        match user.split_once('/') {
            Some((namespace, session))
                if !namespace.is_empty() && !session.is_empty() && !session.contains('/') =>
            {
                Ok(Self {
                    namespace: namespace.to_owned(),
                    session: session.to_owned(),
                })
            }
            _ => Err(LoginError(user.to_owned())),
        }
    }
}

/// The `tcpip-forward` bind port ktctl asks for to expose `service_port`: the Service port
/// itself. The agent chooses the real listener port and reports it in the session's status.
pub fn forward_port(service_port: u16) -> u32 {
    u32::from(service_port)
}

/// The Service port a `tcpip-forward` (or a `forwarded-tcpip` channel) with `bind_port`
/// stands for, if it is one of the session's; the inverse of [`forward_port`].
pub fn service_port_of(spec: &SessionSpec, bind_port: u32) -> Option<u16> {
    spec.ports
        .iter()
        .map(|p| p.port)
        .find(|p| forward_port(*p) == bind_port)
}

/// The `direct-streamlocal@openssh.com` socket path that asks kt's shadow or agent to relay
/// UDP to `destination` (SSH has no UDP channel; OpenSSH, which knows no such path, refuses
/// it, so ktctl can tell the v0.3.7 shadow apart and say UDP is not available there). The
/// channel carries datagrams framed as `kt_tunnel::datagram` says.
pub fn udp_relay_path(destination: SocketAddr) -> String {
    format!("{UDP_RELAY_PREFIX}{destination}")
}

/// The destination of a UDP relay path, if `path` is one.
pub fn udp_relay_destination(path: &str) -> Option<SocketAddr> {
    path.strip_prefix(UDP_RELAY_PREFIX)?.parse().ok()
}

const UDP_RELAY_PREFIX: &str = "kt-udp:";

/// The `streamlocal-forward@openssh.com` socket path with which ktctl asks the holding agent
/// to carry the UDP Service port `service_port` of its exchange (SSH has no UDP forward).
/// The agent opens one `forwarded-streamlocal@openssh.com` channel with this path per pod
/// flow (a pod's source address and port), carrying datagrams framed as
/// `kt_tunnel::datagram` says. An agent that predates UDP exchange refuses the request, so
/// ktctl can say so instead of the port silently staying with the pods.
pub fn udp_forward_path(service_port: u16) -> String {
    format!("{UDP_FORWARD_PREFIX}{service_port}")
}

/// The Service port of a UDP forward path, if `path` is one; the inverse of
/// [`udp_forward_path`].
pub fn udp_forward_port(path: &str) -> Option<u16> {
    path.strip_prefix(UDP_FORWARD_PREFIX)?
        .parse()
        .ok()
        .filter(|p| *p != 0)
}

const UDP_FORWARD_PREFIX: &str = "kt-udp-forward:";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::{PortMapping, SessionMode};

    #[test]
    fn a_login_names_a_namespace_and_a_session() {
        let login: Login = "dev/web-alice".parse().unwrap();
        assert_eq!(
            login,
            Login {
                namespace: "dev".into(),
                session: "web-alice".into()
            }
        );
        assert_eq!(login.to_string(), "dev/web-alice");
        for bad in ["root", "/x", "dev/", "a/b/c", ""] {
            assert_eq!(bad.parse::<Login>(), Err(LoginError(bad.into())), "{bad}");
        }
    }

    #[test]
    fn a_udp_forward_path_names_its_service_port() {
        assert_eq!(udp_forward_path(53), "kt-udp-forward:53");
        assert_eq!(udp_forward_port(&udp_forward_path(53)), Some(53));
        for bad in [
            "kt-udp-forward:0",
            "kt-udp-forward:",
            "kt-udp-forward:70000",
            "kt-udp:53",
        ] {
            assert_eq!(udp_forward_port(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_udp_relay_path_names_its_destination() {
        let to: SocketAddr = "10.96.0.10:53".parse().unwrap();
        assert_eq!(udp_relay_path(to), "kt-udp:10.96.0.10:53");
        assert_eq!(udp_relay_destination(&udp_relay_path(to)), Some(to));
        assert_eq!(udp_relay_destination("/var/run/docker.sock"), None);
        assert_eq!(udp_relay_destination("kt-udp:nonsense"), None);
    }

    #[test]
    fn a_forward_stands_for_the_service_port_of_the_same_number() {
        let spec = SessionSpec {
            owner: "a@b".into(),
            mode: SessionMode::Exchange,
            service: "web".into(),
            ports: vec![
                PortMapping {
                    port: 80,
                    local_port: 8080,
                },
                PortMapping {
                    port: 9090,
                    local_port: 19090,
                },
            ],
            udp_ports: Vec::new(),
            public_key: "k".into(),
            header: None,
            lease_seconds: 10,
        };
        assert_eq!(service_port_of(&spec, forward_port(9090)), Some(9090));
        assert_eq!(
            service_port_of(&spec, 8080),
            None,
            "a local port is not one"
        );
    }
}
