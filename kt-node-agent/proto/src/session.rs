//! The session object of agent mode (`../shared/design.md`, "Cluster state in agent mode"):
//! one namespaced custom resource per redirected Service, written by ktctl, renewed by the
//! agent that holds the session's tunnel, and read by every agent to program its redirects.
//! RBAC on it is the permission model: who may create one in namespace N may redirect
//! Services in N, nothing else.
//!
//! The type is derived ([`kube::CustomResource`]); `deploy/base/crd.yaml` is what
//! [`KtSession::crd()`] generates (a test in `tests/deploy.rs` keeps the two equal).
//!
//! Reading is lenient where a bad value must not stop an agent: every agent watches every
//! session, and one object it cannot parse would stall its watch for all of them. So an
//! unknown `mode` reads as [`SessionMode::Unknown`] and a `status` field that does not parse
//! reads as absent — such a session is simply not held (fail-open).

use std::{collections::BTreeMap, net::IpAddr};

use chrono::{DateTime, Utc};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, de::DeserializeOwned};

/// How long a session's redirect outlives its last renewal unless the spec says otherwise.
pub const DEFAULT_LEASE_SECONDS: u32 = 10;

/// A session: what it redirects (a Service and which of its ports go to which workstation
/// ports; nothing for `connect`), who holds it and the key its SSH connection must show. The
/// spec of a `KtSession` (`kt.dev/v1alpha1`).
#[derive(CustomResource, Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "kt.dev",
    version = "v1alpha1",
    kind = "KtSession",
    plural = "ktsessions",
    shortname = "kts",
    namespaced,
    status = "SessionStatus",
    doc = "A developer's session in agent mode — a Service redirected to the workstation, or the workstation connected to the cluster: written by ktctl, held and renewed by a node agent, programmed by every agent while its lease lives.",
    printcolumn = r#"{"name": "Service", "type": "string", "jsonPath": ".spec.service"}"#,
    printcolumn = r#"{"name": "Mode", "type": "string", "jsonPath": ".spec.mode"}"#,
    printcolumn = r#"{"name": "Owner", "type": "string", "jsonPath": ".spec.owner"}"#,
    printcolumn = r#"{"name": "Node", "type": "string", "jsonPath": ".status.node"}"#,
    printcolumn = r#"{"name": "Renewed", "type": "string", "jsonPath": ".status.renewTime"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct SessionSpec {
    /// Who holds the session (`user@host`), named in conflict errors.
    #[schemars(length(max = crate::validate::MAX_OWNER))]
    pub owner: String,
    pub mode: SessionMode,
    /// The Service, in the object's namespace (empty for `connect`): a DNS-1035 label.
    #[serde(default)]
    #[schemars(length(max = crate::validate::MAX_SERVICE_NAME), pattern(r"^([a-z]([-a-z0-9]*[a-z0-9])?)?$"))]
    pub service: String,
    /// Which Service ports go to which workstation ports (none for `connect`).
    #[serde(default)]
    // A list keyed by `port`: an API server refuses a Service port named twice.
    #[schemars(
        length(max = crate::validate::MAX_PORTS),
        extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["port"])
    )]
    pub ports: Vec<PortMapping>,
    /// Which UDP Service ports go to which workstation UDP ports (`exchange` only; ktctl's
    /// `--expose local:remote/udp`). A list of its own, not a protocol field of a port mapping:
    /// an agent that predates it ignores it, where it would take a protocol-less port for
    /// TCP and redirect the wrong traffic.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = crate::validate::MAX_PORTS),
        extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["port"])
    )]
    pub udp_ports: Vec<PortMapping>,
    /// The session's SSH public key (an authorized_keys line): the holding agent lets in only
    /// this key for this session.
    #[schemars(length(max = crate::validate::MAX_PUBLIC_KEY))]
    pub public_key: String,
    /// For `mesh`: the request header that sends a request to this session (every other
    /// request goes to the Service's pods).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<HeaderMatch>,
    /// Seconds the redirect outlives the last renewal.
    #[serde(default = "default_lease_seconds")]
    #[schemars(range(min = 1, max = 3600))]
    pub lease_seconds: u32,
}

fn default_lease_seconds() -> u32 {
    DEFAULT_LEASE_SECONDS
}

/// What the session redirects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum SessionMode {
    /// All traffic of the Service goes to the workstation.
    Exchange,
    /// Only requests whose header matches go to the workstation.
    Mesh,
    /// The workstation reaches the cluster: the holding agent dials pods and Services for it.
    Connect,
    /// A workstation port published as a Service: ktctl writes a selector-less Service and
    /// an EndpointSlice (both owned by the session) pointing at the holding agent's
    /// listeners. Agents redirect nothing for it, and end (delete) one that stays unheld for
    /// its lease, so a killed ktctl leaves nothing behind.
    Preview,
    /// A mode this build does not know (written by a newer ktctl): never programmed.
    #[serde(other)]
    #[schemars(skip)]
    Unknown,
}

/// A mesh session's routing rule: requests whose header `name` (compared without regard to
/// case, as HTTP field names are: RFC 9110 §5.1) has exactly `value` go to the session.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HeaderMatch {
    /// The field name, lower case (`version`): an RFC 9110 token.
    #[schemars(length(min = 1, max = crate::validate::MAX_HEADER_LINE), pattern(r"^[-!#$%&'*+.^_`|~0-9A-Za-z]+$"))]
    pub name: String,
    /// The field value, compared byte for byte (name and value at most 8 KiB together).
    #[schemars(length(max = crate::validate::MAX_HEADER_LINE))]
    pub value: String,
}

/// One exposed Service port.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PortMapping {
    /// The Service's `port`.
    #[schemars(range(min = 1))]
    pub port: u16,
    /// The workstation port ktctl forwards it to.
    #[schemars(range(min = 1))]
    pub local_port: u16,
}

/// Written by the agent that holds the session's tunnel (the `status` subresource).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionStatus {
    /// The holding agent's node.
    #[serde(default, deserialize_with = "lenient")]
    pub node: String,
    /// The address its tunnel listeners are bound to (the node IP).
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub address: Option<IpAddr>,
    /// One listener per Service port.
    #[serde(default, deserialize_with = "lenient")]
    pub listeners: Vec<Listener>,
    /// One UDP listener per UDP Service port of `spec.udpPorts`. Always written, `[]` too:
    /// the holder writes its status as a merge patch, which would keep an earlier
    /// connection's listeners under a field left out.
    #[serde(default, deserialize_with = "lenient")]
    pub udp_listeners: Vec<Listener>,
    /// The last renewal.
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub renew_time: Option<DateTime<Utc>>,
    /// For a `connect` session, the cluster's network as the holding agent sees it.
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub network: Option<ClusterNetwork>,
    /// What each node's agent has programmed for the session (node name → what): written by
    /// every agent once its map holds the session's entries for a complete holder, so that
    /// ktctl announces the redirect only when it is in force everywhere. An entry that does
    /// not parse reads as absent.
    #[serde(
        default,
        deserialize_with = "lenient_entries",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub programmed: BTreeMap<String, Programmed>,
}

impl SessionStatus {
    /// Who holds the session, in a few bytes: its address and listener ports
    /// (`172.30.0.11 80/40001 8080/40002`, then UDP ones as `53/40003/udp`). A node's
    /// acknowledgement names it, so that one for an earlier holder does not count for a new
    /// one.
    pub fn holder(&self) -> String {
        use std::fmt::Write as _;
        // Written straight into one string: every agent computes this for every session
        // on every pass.
        let mut out = String::with_capacity(48);
        if let Some(address) = self.address {
            let _ = write!(out, "{address}");
        }
        out.push(' ');
        if let ([only], []) = (self.listeners.as_slice(), self.udp_listeners.as_slice()) {
            let _ = write!(out, "{}/{}", only.port, only.listener_port);
            return out;
        }
        let mut listeners: Vec<String> = self
            .listeners
            .iter()
            .map(|l| format!("{}/{}", l.port, l.listener_port))
            .collect();
        // Sorted as text (what agents already wrote compares with this).
        listeners.sort();
        let mut udp: Vec<String> = self
            .udp_listeners
            .iter()
            .map(|l| format!("{}/{}/udp", l.port, l.listener_port))
            .collect();
        udp.sort();
        listeners.extend(udp);
        out.push_str(&listeners.join(" "));
        out
    }
}

/// The cluster's network for a connecting workstation: what to route into the tunnel and
/// where the cluster DNS is.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterNetwork {
    /// The pods' address ranges (the nodes' `podCIDRs`), as `10.244.1.0/24`.
    #[serde(default)]
    pub pod_cidrs: Vec<String>,
    /// The Services' address ranges (`ServiceCIDR`s, or the smallest ranges that hold every
    /// ClusterIP), as `10.96.0.0/12`.
    #[serde(default)]
    pub service_cidrs: Vec<String>,
    /// The cluster DNS server the agent uses (its resolver's first nameserver).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<IpAddr>,
    /// The cluster's DNS domain (`cluster.local`).
    #[serde(default)]
    pub cluster_domain: String,
}

/// One node's redirect of a session.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Programmed {
    /// The holder the entries point at ([`SessionStatus::holder`] when programmed).
    pub holder: String,
    /// The Service ports whose every address (ClusterIP and ready endpoints) in the map
    /// goes to this session.
    #[serde(default)]
    pub ports: Vec<u16>,
    /// The same for the UDP Service ports of `spec.udpPorts`: always written by an agent
    /// that carries UDP (`[]` too, so that a merge patch replaces an earlier list); absent
    /// from the acknowledgement of an agent that predates UDP exchange.
    #[serde(default)]
    pub udp_ports: Option<Vec<u16>>,
}

/// A tunnel listener of the holding agent.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Listener {
    /// The Service's `port` this listener stands for.
    pub port: u16,
    /// The port the holding agent listens on.
    pub listener_port: u16,
}

/// Map entries that do not parse are left out (see the module doc).
fn lenient_entries<'de, D, T>(deserializer: D) -> Result<BTreeMap<String, T>, D::Error>
where
    D: Deserializer<'de>,
    T: DeserializeOwned,
{
    let value = serde_json::Value::deserialize(deserializer)?;
    let serde_json::Value::Object(entries) = value else {
        return Ok(BTreeMap::new());
    };
    Ok(entries
        .into_iter()
        .filter_map(|(k, v)| Some((k, serde_json::from_value(v).ok()?)))
        .collect())
}

/// A value that does not parse reads as the type's default (see the module doc).
fn lenient<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: DeserializeOwned + Default,
{
    let value = serde_json::Value::deserialize(deserializer)?;
    Ok(serde_json::from_value(value).unwrap_or_default())
}

impl KtSession {
    /// A session object named `name` in `namespace`, labelled as everything kt creates.
    pub fn create(name: &str, namespace: &str, spec: SessionSpec) -> Self {
        let mut session = Self::new(name, spec);
        session.metadata.namespace = Some(namespace.to_owned());
        session.metadata.labels = Some(
            [(
                crate::compat::CONTROL_BY.to_owned(),
                crate::compat::CONTROL_BY_KT.to_owned(),
            )]
            .into(),
        );
        session
    }

    /// `namespace/name`: how agents and metrics name a session.
    pub fn key(&self) -> String {
        format!(
            "{}/{}",
            self.metadata.namespace.as_deref().unwrap_or_default(),
            self.metadata.name.as_deref().unwrap_or_default()
        )
    }

    /// When the lease runs out: the last renewal plus the lease. `None` when it was never
    /// held.
    pub fn lease_end(&self) -> Option<DateTime<Utc>> {
        let renewed = self.status.as_ref()?.renew_time?;
        Some(renewed + chrono::TimeDelta::seconds(i64::from(self.spec.lease_seconds)))
    }

    /// Which of `ports` (TCP) and `udp_ports` each of `nodes` has not programmed for the
    /// current holder (an acknowledgement for an earlier holder does not count), as `80`
    /// and `53/udp`; empty when the redirect is in force on every node. No node at all is
    /// not "everywhere": `nodes` must not be empty.
    pub fn unprogrammed(
        &self,
        nodes: &[String],
        ports: &[u16],
        udp_ports: &[u16],
    ) -> Vec<(String, Vec<String>)> {
        let holder = self.status.as_ref().map(SessionStatus::holder);
        nodes
            .iter()
            .filter_map(|node| {
                let acknowledged = self.status.as_ref().and_then(|s| s.programmed.get(node));
                let (done, udp_done): (&[u16], &[u16]) = match (acknowledged, &holder) {
                    (Some(p), Some(holder)) if p.holder == *holder => {
                        (&p.ports, p.udp_ports.as_deref().unwrap_or_default())
                    }
                    _ => (&[], &[]),
                };
                let tcp = ports
                    .iter()
                    .filter(|p| !done.contains(p))
                    .map(u16::to_string);
                let udp = udp_ports
                    .iter()
                    .filter(|p| !udp_done.contains(p))
                    .map(|p| format!("{p}/udp"));
                let missing: Vec<String> = tcp.chain(udp).collect();
                (!missing.is_empty()).then(|| (node.clone(), missing))
            })
            .collect()
    }

    /// Whether the redirect is in force at `now`: held and renewed within its lease.
    /// Anything else is expired — fail open.
    pub fn lease_live(&self, now: DateTime<Utc>) -> bool {
        self.lease_end().is_some_and(|end| now <= end)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn session(status: serde_json::Value) -> KtSession {
        serde_json::from_value(json!({
            "apiVersion": "kt.dev/v1alpha1", "kind": "KtSession",
            "metadata": {"name": "web-a", "namespace": "dev"},
            "spec": {"owner": "dev@laptop", "mode": "exchange", "service": "web",
                     "ports": [{"port": 80, "localPort": 8080}], "publicKey": "ssh-ed25519 AAAA kt"},
            "status": status,
        }))
        .expect("session parses")
    }

    #[test]
    fn the_lease_defaults_and_serialises_in_camel_case() {
        let session = session(json!(null));
        assert_eq!(session.spec.lease_seconds, DEFAULT_LEASE_SECONDS);
        let json = serde_json::to_value(&session.spec).unwrap();
        assert_eq!(json["ports"][0]["localPort"], 8080);
        assert_eq!(json["leaseSeconds"], 10);
        assert_eq!(session.key(), "dev/web-a");
    }

    #[test]
    fn a_lease_lives_until_its_seconds_pass_and_fails_open() {
        let now = Utc::now();
        let renewed = |at: DateTime<Utc>| session(json!({"renewTime": at}));
        assert!(renewed(now).lease_live(now));
        assert!(renewed(now - chrono::TimeDelta::seconds(9)).lease_live(now));
        assert!(!renewed(now - chrono::TimeDelta::seconds(11)).lease_live(now));
        assert!(!session(json!(null)).lease_live(now), "never held");
        assert!(!session(json!({"renewTime": "yesterday"})).lease_live(now));
    }

    #[test]
    fn bad_status_values_read_as_absent_and_unknown_modes_as_unknown() {
        let s = session(json!({"node": 7, "address": "not an address",
                               "listeners": "none", "renewTime": 12}));
        assert_eq!(s.status, Some(SessionStatus::default()));
        let held = session(json!({"node": "node-1", "address": "172.30.0.11",
                                  "listeners": [{"port": 80, "listenerPort": 40001}]}));
        let status = held.status.unwrap();
        assert_eq!(status.address, Some(IpAddr::from([172, 30, 0, 11])));
        assert_eq!(status.listeners[0].listener_port, 40001);
        let mut future: serde_json::Value = serde_json::to_value(session(json!(null))).unwrap();
        future["spec"]["mode"] = json!("teleport");
        let future: KtSession = serde_json::from_value(future).unwrap();
        assert_eq!(future.spec.mode, SessionMode::Unknown);
    }

    #[test]
    fn the_holder_is_the_address_and_the_listeners_sorted_as_text() {
        let holder = |status: serde_json::Value| session(status).status.unwrap().holder();
        assert_eq!(
            holder(
                json!({"address": "172.30.0.11", "listeners": [{"port": 80, "listenerPort": 40001}]})
            ),
            "172.30.0.11 80/40001"
        );
        assert_eq!(
            holder(json!({"address": "fd00::11", "listeners": [
                {"port": 8080, "listenerPort": 40002}, {"port": 80, "listenerPort": 40001},
                {"port": 443, "listenerPort": 40003}]})),
            "fd00::11 443/40003 80/40001 8080/40002",
            "as text, so 443 before 80"
        );
        assert_eq!(holder(json!({"listeners": []})), " ");
        assert_eq!(
            holder(json!({"address": "172.30.0.11",
                          "listeners": [{"port": 53, "listenerPort": 40001}],
                          "udpListeners": [{"port": 53, "listenerPort": 40002}]})),
            "172.30.0.11 53/40001 53/40002/udp",
            "a UDP listener is told apart from a TCP one of the same port"
        );
    }

    #[test]
    fn a_port_counts_as_programmed_on_a_node_only_for_the_current_holder() {
        let mut status =
            json!({"address": "172.30.0.11", "listeners": [{"port": 80, "listenerPort": 40001}]});
        let holder = "172.30.0.11 80/40001";
        status["programmed"] = json!({
            "node-1": {"holder": holder, "ports": [80]},
            "node-2": {"holder": "172.30.0.12 80/40009", "ports": [80]},
            "node-4": "not an acknowledgement",
        });
        let s = session(status);
        assert_eq!(s.status.as_ref().unwrap().holder(), holder);
        assert_eq!(
            s.status.as_ref().unwrap().programmed.len(),
            2,
            "the bad entry alone is dropped"
        );
        let nodes = [
            "node-1".to_owned(),
            "node-2".to_owned(),
            "node-3".to_owned(),
        ];
        let text = |ports: &[&str]| ports.iter().map(|p| (*p).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            s.unprogrammed(&nodes, &[80], &[]),
            [
                ("node-2".to_owned(), text(&["80"])),
                ("node-3".to_owned(), text(&["80"]))
            ],
            "node-2 programmed an earlier holder, node-3 nothing yet"
        );
        assert!(s.unprogrammed(&nodes[..1], &[80], &[]).is_empty());
        assert_eq!(
            s.unprogrammed(&nodes[..1], &[80, 81], &[80]),
            [("node-1".to_owned(), text(&["81", "80/udp"]))],
            "TCP 80 is programmed, UDP 80 is not"
        );
        assert_eq!(
            session(json!(null))
                .unprogrammed(&nodes[..1], &[80], &[])
                .len(),
            1
        );
    }

    #[test]
    fn a_created_session_is_labelled_and_namespaced() {
        let s = KtSession::create("web-a", "dev", session(json!(null)).spec);
        assert_eq!(s.metadata.namespace.as_deref(), Some("dev"));
        assert_eq!(
            s.metadata
                .labels
                .unwrap()
                .get("control-by")
                .map(String::as_str),
            Some("kt")
        );
        let json = serde_json::to_value(KtSession::new("x", s.spec)).unwrap();
        assert_eq!(json["apiVersion"], "kt.dev/v1alpha1");
        assert_eq!(json["kind"], "KtSession");
    }
}
