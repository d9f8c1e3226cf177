//! What a session's spec may say (no I/O): the rules every agent applies before it holds or
//! programs a `KtSession`, because anyone allowed to create one in a namespace writes its
//! spec, byte for byte. A spec that breaks a rule redirects nothing and is reported as an
//! Event; it never reaches a listener, the redirect map or the mesh router.
//!
//! Each limit is one the session already meets on its way through Kubernetes, SSH or HTTP,
//! so no honest session is refused (the source is on each constant). The CRD's schema
//! (`deploy/crd.yaml`) carries the same limits where OpenAPI can say them, so an API server
//! that validates custom resources refuses the worst at admission; the agent checks anyway,
//! as not every API server in front of it does.

use std::collections::BTreeSet;

use crate::session::{SessionMode, SessionSpec};

/// The most Service ports one session may name: an EndpointSlice carries at most 100 ports
/// (Kubernetes API reference, `EndpointSlice.ports`: "Each slice may include a maximum of
/// 100 ports"), and a preview session's ports become one EndpointSlice.
pub const MAX_PORTS: usize = 100;
/// The longest Service name: a Service's name is an RFC 1035 label (Kubernetes "Object Names
/// and IDs", DNS-1035 label names: at most 63 characters).
pub const MAX_SERVICE_NAME: usize = 63;
/// The longest `owner` (`user@host`): a Linux user name of at most 32 bytes (`useradd(8)`),
/// `@`, and a host name of at most 253 (RFC 1035 §2.3.4, a full domain name).
pub const MAX_OWNER: usize = 32 + 1 + 253;
/// The longest `publicKey`: OpenSSH refuses a public key blob over 16 KiB
/// (`SSH_MAX_PUBKEY_BYTES`, `sshkey.h`); the authorized_keys line is a little longer than
/// its base64, so 16 KiB of text holds every key OpenSSH accepts with room for a comment.
pub const MAX_PUBLIC_KEY: usize = 16 * 1024;
/// The longest mesh header field line, `name: value`: nginx's default
/// `large_client_header_buffers 4 8k` refuses a longer request header line (400), so a
/// request through a usual ingress cannot carry a longer one; RFC 9110 §5.4 lets a server
/// refuse a field it finds too large.
pub const MAX_HEADER_LINE: usize = 8 * 1024;
/// The lease's bounds in seconds, as the CRD schema declares them
/// ([`SessionSpec::lease_seconds`]).
pub const LEASE_SECONDS: std::ops::RangeInclusive<u32> = 1..=3600;

/// A spec rule a session breaks (the first one found).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("spec.service {0:?} is not a Service name of this namespace (an RFC 1035 label)")]
    ServiceName(String),
    #[error("spec.service is empty: an exchange or mesh session names a Service")]
    NoService,
    #[error("spec.ports and spec.udpPorts name {0} ports, more than {MAX_PORTS}")]
    TooManyPorts(usize),
    #[error("spec.{field} has port 0 (port {port}, localPort {local_port})")]
    PortZero {
        /// `ports` or `udpPorts`.
        field: &'static str,
        port: u16,
        local_port: u16,
    },
    #[error("spec.{field} names Service port {port} twice")]
    DuplicatePort { field: &'static str, port: u16 },
    #[error("spec.udpPorts is for exchange sessions: a {0:?} session carries no UDP")]
    UdpNotExchange(SessionMode),
    #[error("spec.owner is {0} bytes, more than {MAX_OWNER}")]
    OwnerTooLong(usize),
    #[error("spec.publicKey is {0} bytes, more than {MAX_PUBLIC_KEY}")]
    PublicKeyTooLong(usize),
    #[error("spec.leaseSeconds {0} is outside 1..=3600")]
    LeaseSeconds(u32),
    #[error("spec.header.name {0:?} is not an HTTP field name (RFC 9110 §5.1: a token)")]
    HeaderName(String),
    /// The value is not quoted back: it may be huge or hold control characters.
    #[error(
        "spec.header.value is not an HTTP field value (RFC 9110 §5.5: visible characters, with spaces or tabs only between them)"
    )]
    HeaderValue,
    #[error("spec.header is a field line of {0} bytes, more than {MAX_HEADER_LINE}")]
    HeaderTooLong(usize),
}

/// Checks `spec` against every rule of the module (see each constant for its source):
/// the Service is a DNS-1035 label of the session's own namespace (a name with `.` or `/`
/// cannot name another namespace's Service), required for exchange and mesh; at most
/// [`MAX_PORTS`] ports, none 0, no Service port twice; `owner`, `publicKey` and the
/// header within their limits; the header a valid HTTP field; the lease within the schema's
/// bounds. A session of a mode this build does not know passes (it is never programmed).
///
/// # Errors
/// The first rule broken, as a [`SpecError`].
pub fn spec(spec: &SessionSpec) -> Result<(), SpecError> {
    if spec.mode == SessionMode::Unknown {
        return Ok(());
    }
    if spec.service.is_empty() {
        if matches!(spec.mode, SessionMode::Exchange | SessionMode::Mesh) {
            return Err(SpecError::NoService);
        }
    } else if !is_dns1035_label(&spec.service) {
        return Err(SpecError::ServiceName(spec.service.clone()));
    }
    let ports = spec.ports.len() + spec.udp_ports.len();
    if ports > MAX_PORTS {
        return Err(SpecError::TooManyPorts(ports));
    }
    if !spec.udp_ports.is_empty() && spec.mode != SessionMode::Exchange {
        return Err(SpecError::UdpNotExchange(spec.mode));
    }
    // One number may be in both lists (DNS on 53/TCP and 53/UDP), not twice in one.
    for (field, list) in [("ports", &spec.ports), ("udpPorts", &spec.udp_ports)] {
        let mut seen = BTreeSet::new();
        for p in list {
            if p.port == 0 || p.local_port == 0 {
                return Err(SpecError::PortZero {
                    field,
                    port: p.port,
                    local_port: p.local_port,
                });
            }
            if !seen.insert(p.port) {
                return Err(SpecError::DuplicatePort {
                    field,
                    port: p.port,
                });
            }
        }
    }
    if spec.owner.len() > MAX_OWNER {
        return Err(SpecError::OwnerTooLong(spec.owner.len()));
    }
    if spec.public_key.len() > MAX_PUBLIC_KEY {
        return Err(SpecError::PublicKeyTooLong(spec.public_key.len()));
    }
    if !LEASE_SECONDS.contains(&spec.lease_seconds) {
        return Err(SpecError::LeaseSeconds(spec.lease_seconds));
    }
    if let Some(header) = &spec.header {
        let line = header.name.len() + 2 + header.value.len();
        if line > MAX_HEADER_LINE {
            return Err(SpecError::HeaderTooLong(line));
        }
        if !is_token(&header.name) {
            return Err(SpecError::HeaderName(header.name.clone()));
        }
        if !is_field_value(&header.value) {
            return Err(SpecError::HeaderValue);
        }
    }
    Ok(())
}

/// An RFC 1035 label as Kubernetes checks it (`IsDNS1035Label`): 1 to 63 of `a-z`, `0-9`,
/// `-`, starting with a letter and ending with a letter or digit.
pub fn is_dns1035_label(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_SERVICE_NAME
        && b[0].is_ascii_lowercase()
        && b[b.len() - 1] != b'-'
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// An RFC 9110 §5.6.2 token: one or more `tchar`s (letters, digits and
/// `` !#$%&'*+-.^_`|~ ``).
pub fn is_token(text: &str) -> bool {
    !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// An RFC 9110 §5.5 field value: `field-vchar` (visible ASCII, or obs-text bytes 0x80–0xFF)
/// with spaces and tabs only between them. Empty is a valid field value.
pub fn is_field_value(text: &str) -> bool {
    let b = text.as_bytes();
    let vchar = |c: &u8| (0x21..=0x7e).contains(c) || *c >= 0x80;
    let inner = |c: &u8| vchar(c) || *c == b' ' || *c == b'\t';
    match (b.first(), b.last()) {
        (None, _) | (_, None) => true,
        (Some(first), Some(last)) => vchar(first) && vchar(last) && b.iter().all(inner),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::{HeaderMatch, PortMapping};

    fn valid() -> SessionSpec {
        SessionSpec {
            owner: "dev@laptop".into(),
            mode: SessionMode::Mesh,
            service: "web".into(),
            ports: vec![
                PortMapping {
                    port: 80,
                    local_port: 8080,
                },
                PortMapping {
                    port: 443,
                    local_port: 8080,
                },
            ],
            udp_ports: Vec::new(),
            public_key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA dev@laptop".into(),
            header: Some(HeaderMatch {
                name: "version".into(),
                value: "feo3x".into(),
            }),
            lease_seconds: 10,
        }
    }

    fn with(change: impl FnOnce(&mut SessionSpec)) -> Result<(), SpecError> {
        let mut s = valid();
        change(&mut s);
        spec(&s)
    }

    #[test]
    fn what_ktctl_writes_passes_with_two_service_ports_to_one_local_port() {
        assert_eq!(spec(&valid()), Ok(()));
        let connect = with(|s| {
            s.mode = SessionMode::Connect;
            s.service.clear();
            s.ports.clear();
            s.header = None;
        });
        assert_eq!(connect, Ok(()));
    }

    #[test]
    fn a_service_of_another_namespace_or_no_dns_label_is_refused() {
        for name in [
            "web.other",
            "other/web",
            "Web",
            "-web",
            "web-",
            "1web",
            "web_1",
        ] {
            assert_eq!(
                with(|s| s.service = name.into()),
                Err(SpecError::ServiceName(name.into())),
                "{name}"
            );
        }
        let long = "a".repeat(64);
        assert_eq!(
            with(|s| s.service = long.clone()),
            Err(SpecError::ServiceName(long))
        );
        assert_eq!(with(|s| s.service = "a".repeat(63)), Ok(()));
        assert_eq!(with(|s| s.service.clear()), Err(SpecError::NoService));
    }

    #[test]
    fn ports_are_bounded_nonzero_and_each_service_port_once() {
        let many = |n: u16| {
            (1..=n)
                .map(|port| PortMapping {
                    port,
                    local_port: port,
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(with(|s| s.ports = many(100)), Ok(()));
        assert_eq!(
            with(|s| s.ports = many(500)),
            Err(SpecError::TooManyPorts(500))
        );
        assert_eq!(
            with(|s| s.ports[1].port = 80),
            Err(SpecError::DuplicatePort {
                field: "ports",
                port: 80
            })
        );
        assert_eq!(
            with(|s| s.ports[0].port = 0),
            Err(SpecError::PortZero {
                field: "ports",
                port: 0,
                local_port: 8080
            })
        );
        assert_eq!(
            with(|s| s.ports[0].local_port = 0),
            Err(SpecError::PortZero {
                field: "ports",
                port: 80,
                local_port: 0
            })
        );
        assert_eq!(
            with(|s| {
                s.ports = many(60);
                s.udp_ports = many(60);
            }),
            Err(SpecError::TooManyPorts(120)),
            "both lists count"
        );
    }

    #[test]
    fn udp_ports_are_an_exchange_s_and_may_share_a_number_with_a_tcp_port() {
        let dns = |port| PortMapping {
            port,
            local_port: 15353,
        };
        let exchange = |s: &mut SessionSpec| {
            s.mode = SessionMode::Exchange;
            s.header = None;
        };
        assert_eq!(
            with(|s| {
                exchange(s);
                s.udp_ports = vec![dns(80)];
            }),
            Ok(()),
            "80/TCP and 80/UDP are two Service ports"
        );
        assert_eq!(
            with(|s| {
                exchange(s);
                s.udp_ports = vec![dns(53), dns(53)];
            }),
            Err(SpecError::DuplicatePort {
                field: "udpPorts",
                port: 53
            })
        );
        assert_eq!(
            with(|s| {
                exchange(s);
                s.udp_ports = vec![dns(0)];
            }),
            Err(SpecError::PortZero {
                field: "udpPorts",
                port: 0,
                local_port: 15353
            })
        );
        assert_eq!(
            with(|s| s.udp_ports = vec![dns(53)]),
            Err(SpecError::UdpNotExchange(SessionMode::Mesh))
        );
    }

    #[test]
    fn a_header_must_be_an_http_field_of_at_most_8_kib() {
        let value = |v: &str| with(|s| s.header.as_mut().unwrap().value = v.into());
        let name = |n: &str| with(|s| s.header.as_mut().unwrap().name = n.into());
        assert_eq!(value("a b\tc"), Ok(()), "spaces between visible characters");
        assert_eq!(value("caf\u{e9}"), Ok(()), "obs-text");
        for bad in [" a", "a ", "a\r\nx-admin: 1", "a\0", "\u{7f}"] {
            assert_eq!(value(bad), Err(SpecError::HeaderValue), "{bad:?}");
        }
        for bad in ["", "x version", "x:y", "x\n"] {
            assert_eq!(name(bad), Err(SpecError::HeaderName(bad.into())), "{bad:?}");
        }
        let max = "v".repeat(MAX_HEADER_LINE - "version: ".len());
        assert_eq!(value(&max), Ok(()));
        let mib = "v".repeat(1 << 20);
        assert_eq!(
            value(&mib),
            Err(SpecError::HeaderTooLong("version: ".len() + (1 << 20)))
        );
    }

    #[test]
    fn owner_key_and_lease_are_bounded() {
        assert_eq!(
            with(|s| s.owner = "o".repeat(MAX_OWNER + 1)),
            Err(SpecError::OwnerTooLong(MAX_OWNER + 1))
        );
        assert_eq!(
            with(|s| s.public_key = "k".repeat(MAX_PUBLIC_KEY + 1)),
            Err(SpecError::PublicKeyTooLong(MAX_PUBLIC_KEY + 1))
        );
        assert_eq!(
            with(|s| s.lease_seconds = 0),
            Err(SpecError::LeaseSeconds(0))
        );
        assert_eq!(
            with(|s| s.lease_seconds = 3601),
            Err(SpecError::LeaseSeconds(3601))
        );
        assert_eq!(with(|s| s.lease_seconds = 3600), Ok(()));
    }

    #[test]
    fn a_mode_this_build_does_not_know_is_not_judged() {
        assert_eq!(
            with(|s| {
                s.mode = SessionMode::Unknown;
                s.service = "x/y".into();
            }),
            Ok(())
        );
    }
}
