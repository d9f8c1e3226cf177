//! The session object of agent mode (`../shared/design.md`, "Cluster state in agent mode"):
//! one namespaced custom resource per redirected Service, written by ktctl, renewed by the
//! agent that holds the session's tunnel, and read by every agent to program its redirects.
//! RBAC on it is the permission model: who may create one in namespace N may redirect
//! Services in N, nothing else. `deploy/crd.yaml` declares it; the agent suite creates
//! sessions through these names against that CRD.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "kt.dev";
pub const API_VERSION: &str = "v1alpha1";
pub const KIND: &str = "KtSession";
pub const PLURAL: &str = "ktsessions";
/// How long a session's redirect outlives its last renewal unless the spec says otherwise.
pub const DEFAULT_LEASE_SECONDS: u32 = 10;
/// The agent's SSH port on its node (host network), where ktctl brings its sessions.
pub const AGENT_SSH_PORT: u16 = 9922;
/// Namespace and pod label of the agent DaemonSet in `deploy/`.
pub const AGENT_NAMESPACE: &str = "kt-system";
pub const AGENT_LABEL: &str = "app.kubernetes.io/name=kt-node-agent";

/// A session object as kube-rs reads and writes it.
pub type KtSession = kube_core::object::Object<SessionSpec, SessionStatus>;

/// The API resource of [`KtSession`], for `kube::Api::namespaced_with`.
pub fn api_resource() -> kube_core::ApiResource {
    kube_core::ApiResource {
        group: GROUP.into(),
        version: API_VERSION.into(),
        api_version: format!("{GROUP}/{API_VERSION}"),
        kind: KIND.into(),
        plural: PLURAL.into(),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum SessionMode {
    /// All traffic of the Service goes to the workstation.
    Exchange,
    /// Only requests whose header matches go to the workstation.
    Mesh,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionSpec {
    /// Who holds the session (`user@host`), named in conflict errors.
    pub owner: String,
    pub mode: SessionMode,
    /// The Service, in the object's namespace.
    pub service: String,
    /// Which Service ports go to which workstation ports.
    pub ports: Vec<PortMapping>,
    /// The session's SSH public key (authorized_keys line): the holding agent lets in only
    /// this key for this session.
    pub public_key: String,
    /// Seconds the redirect outlives the last renewal.
    #[serde(default = "default_lease_seconds")]
    pub lease_seconds: u32,
}

fn default_lease_seconds() -> u32 {
    DEFAULT_LEASE_SECONDS
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortMapping {
    /// The Service's `port`.
    pub port: u16,
    /// The workstation port ktctl forwards it to.
    pub local_port: u16,
}

/// Written by the agent that holds the session's tunnel.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionStatus {
    /// The holding agent's node.
    pub node: String,
    /// The address its tunnel listeners are bound to (the node IP).
    pub address: String,
    /// One listener per Service port.
    pub listeners: Vec<Listener>,
    /// Last renewal, RFC 3339.
    pub renew_time: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Listener {
    /// The Service's `port` this listener stands for.
    pub port: u16,
    /// The port the holding agent listens on.
    pub listener_port: u16,
}

/// When a session's lease runs out: its last renewal plus its lease. `None` when it was
/// never held (no status, or a renewal that does not parse).
pub fn lease_end(spec: &SessionSpec, status: Option<&SessionStatus>) -> Option<DateTime<Utc>> {
    let renewed = DateTime::parse_from_rfc3339(&status?.renew_time).ok()?;
    Some(renewed.with_timezone(&Utc) + chrono::TimeDelta::seconds(i64::from(spec.lease_seconds)))
}

/// Whether a session's redirect is in force at `now`: held and renewed within its lease.
/// Anything else is expired — fail open.
pub fn lease_live(spec: &SessionSpec, status: Option<&SessionStatus>, now: DateTime<Utc>) -> bool {
    lease_end(spec, status).is_some_and(|end| now <= end)
}

/// A renewal time as [`SessionStatus::renew_time`] holds it.
pub fn renew_time(now: DateTime<Utc>) -> String {
    now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> SessionSpec {
        serde_json::from_value(serde_json::json!({
            "owner": "dev@laptop",
            "mode": "exchange",
            "service": "web",
            "ports": [{"port": 80, "localPort": 8080}],
            "publicKey": "ssh-ed25519 AAAA kt",
        }))
        .expect("spec parses")
    }

    #[test]
    fn the_lease_defaults_and_serialises_in_camel_case() {
        let spec = spec();
        assert_eq!(spec.lease_seconds, DEFAULT_LEASE_SECONDS);
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(json["ports"][0]["localPort"], 8080);
        assert_eq!(json["leaseSeconds"], 10);
    }

    #[test]
    fn a_lease_lives_until_its_seconds_pass_and_fails_open() {
        let spec = spec();
        let now = Utc::now();
        let status = |at: DateTime<Utc>| SessionStatus {
            renew_time: renew_time(at),
            ..SessionStatus::default()
        };
        assert!(lease_live(&spec, Some(&status(now)), now));
        let nine = now - chrono::TimeDelta::seconds(9);
        assert!(lease_live(&spec, Some(&status(nine)), now));
        let eleven = now - chrono::TimeDelta::seconds(11);
        assert!(!lease_live(&spec, Some(&status(eleven)), now));
        assert!(!lease_live(&spec, None, now), "never held");
        let garbage = SessionStatus {
            renew_time: "yesterday".into(),
            ..SessionStatus::default()
        };
        assert!(!lease_live(&spec, Some(&garbage), now));
    }

    #[test]
    fn api_resource_names_the_crd() {
        let ar = api_resource();
        assert_eq!(ar.api_version, "kt.dev/v1alpha1");
        assert_eq!(
            (ar.kind.as_str(), ar.plural.as_str()),
            ("KtSession", "ktsessions")
        );
    }
}
