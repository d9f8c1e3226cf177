//! The pure part of `preview`: `--expose`, and the Service and EndpointSlice that publish a
//! workstation port (no I/O).

use std::{collections::BTreeMap, net::IpAddr};

use k8s_openapi::{
    api::{
        core::v1::{Service, ServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::{
        apis::meta::v1::{ObjectMeta, OwnerReference},
        util::intstr::IntOrString,
    },
};
use kt_proto::{compat, session::Listener};

use crate::commands::exchange::plan::{ExposeItem, PlanError};

/// One published port: the Service port and the workstation port behind it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Published {
    pub port: u16,
    pub local: u16,
}

/// `--expose` of preview (ktctl v0.3.7 §3.5): `port` publishes local `port` as Service port
/// `port`; `local:remote` publishes local `local` as Service port `remote`. A Service port
/// given twice is refused.
pub fn published(items: &[ExposeItem]) -> Result<Vec<Published>, PlanError> {
    let mut out: Vec<Published> = Vec::new();
    for item in items {
        let (local, port) = (item.local, item.wanted());
        if out.iter().any(|p| p.port == port) {
            return Err(PlanError::Malformed(format!(
                "{local}:{port} (port {port} given twice)"
            )));
        }
        out.push(Published { port, local });
    }
    Ok(out)
}

/// A preview's name becomes a Service's: a DNS-1035 label (lower-case letters, digits and
/// `-`, starting with a letter, ending with a letter or digit, at most 63 characters; the
/// Kubernetes docs, "Object Names and IDs").
pub fn valid_name(name: &str) -> bool {
    name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// The name of a published port, as v0.3.7 names the ports of the Services it creates.
fn port_name(port: u16) -> String {
    format!("kt-{port}")
}

/// The EndpointSlice controller's label naming a slice's Service, and the manager label a
/// slice written by something else carries (Kubernetes docs, "EndpointSlices").
const SERVICE_NAME: &str = "kubernetes.io/service-name";
const MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
/// kt's value of [`MANAGED_BY`].
pub const MANAGER: &str = "kt.dev";

/// What the preview's objects belong to: the session, so that they go with it.
#[derive(Clone, Debug)]
pub struct Owner {
    pub session: String,
    pub uid: String,
    /// The local user, for `kt-user`.
    pub user: String,
}

impl Owner {
    fn metadata(
        &self,
        name: String,
        namespace: &str,
        labels: BTreeMap<String, String>,
    ) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(namespace.to_owned()),
            labels: Some(labels),
            annotations: Some(BTreeMap::from([(
                compat::USER.to_owned(),
                self.user.clone(),
            )])),
            owner_references: Some(vec![OwnerReference {
                api_version: "kt.dev/v1alpha1".into(),
                kind: "KtSession".into(),
                name: self.session.clone(),
                uid: self.uid.clone(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..ObjectMeta::default()
        }
    }
}

fn kt_labels() -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            compat::CONTROL_BY.to_owned(),
            compat::CONTROL_BY_KT.to_owned(),
        ),
        (
            compat::ROLE.to_owned(),
            compat::ROLE_SHADOW_PREVIEW.to_owned(),
        ),
    ])
}

/// The Service `name`: without a selector (its EndpointSlice is kt's), the ports of
/// [`service_spec`].
pub fn service(
    name: &str,
    namespace: &str,
    owner: &Owner,
    ports: &[Published],
    external: bool,
) -> Service {
    Service {
        metadata: owner.metadata(name.to_owned(), namespace, kt_labels()),
        spec: Some(service_spec(ports, external)),
        status: None,
    }
}

/// A preview Service's spec without a selector: one TCP port per published port named
/// `kt-<port>` (v0.3.7's names), `LoadBalancer` when `external`, else `ClusterIP`.
pub fn service_spec(ports: &[Published], external: bool) -> ServiceSpec {
    ServiceSpec {
        type_: Some(
            if external {
                "LoadBalancer"
            } else {
                "ClusterIP"
            }
            .into(),
        ),
        ports: Some(
            ports
                .iter()
                .map(|p| ServicePort {
                    name: Some(port_name(p.port)),
                    port: i32::from(p.port),
                    target_port: Some(IntOrString::Int(i32::from(p.port))),
                    protocol: Some("TCP".into()),
                    ..ServicePort::default()
                })
                .collect(),
        ),
        ..ServiceSpec::default()
    }
}

/// The EndpointSlice of the Service `name`: the holding agent's address, each published
/// port at its listener. `None` while the holder does not listen for every port.
pub fn endpoint_slice(
    name: &str,
    namespace: &str,
    owner: &Owner,
    ports: &[Published],
    holder: IpAddr,
    listeners: &[Listener],
) -> Option<EndpointSlice> {
    let endpoint_ports = ports
        .iter()
        .map(|p| {
            let listener = listeners.iter().find(|l| l.port == p.port)?;
            Some(EndpointPort {
                name: Some(port_name(p.port)),
                port: Some(i32::from(listener.listener_port)),
                protocol: Some("TCP".into()),
                app_protocol: None,
            })
        })
        .collect::<Option<Vec<_>>>()?;
    let mut labels = kt_labels();
    labels.insert(SERVICE_NAME.to_owned(), name.to_owned());
    labels.insert(MANAGED_BY.to_owned(), MANAGER.to_owned());
    Some(EndpointSlice {
        metadata: owner.metadata(format!("{name}-kt"), namespace, labels),
        address_type: if holder.is_ipv4() { "IPv4" } else { "IPv6" }.into(),
        endpoints: vec![Endpoint {
            addresses: vec![holder.to_string()],
            conditions: Some(EndpointConditions {
                ready: Some(true),
                serving: Some(true),
                terminating: Some(false),
            }),
            ..Endpoint::default()
        }],
        ports: Some(endpoint_ports),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner() -> Owner {
        Owner {
            session: "nginx-v2-kt-preview-abcde".into(),
            uid: "u-1".into(),
            user: "alice".into(),
        }
    }

    #[test]
    fn a_preview_name_is_a_dns_1035_label() {
        assert!(valid_name("nginx-v2"));
        for bad in ["Nginx", "nginx_v2", "2nginx", "nginx-", "", &"n".repeat(64)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn expose_publishes_local_ports_as_service_ports() {
        let items = |text| crate::commands::exchange::plan::parse_expose(text).unwrap();
        assert_eq!(
            published(&items("80,8080:90")).unwrap(),
            [
                Published {
                    port: 80,
                    local: 80
                },
                Published {
                    port: 90,
                    local: 8080
                }
            ]
        );
        assert!(published(&items("80,8080:80")).is_err());
    }

    #[test]
    fn the_service_has_no_selector_and_both_objects_belong_to_the_session() {
        let ports = [
            Published {
                port: 80,
                local: 8080,
            },
            Published {
                port: 90,
                local: 9090,
            },
        ];
        let svc = service("nginx-v2", "dev", &owner(), &ports, true);
        let spec = svc.spec.as_ref().unwrap();
        assert_eq!(spec.selector, None);
        assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
        assert_eq!(
            spec.ports.as_ref().unwrap()[1].name.as_deref(),
            Some("kt-90")
        );
        let listeners = [
            Listener {
                port: 80,
                listener_port: 40001,
            },
            Listener {
                port: 90,
                listener_port: 40002,
            },
        ];
        let holder: IpAddr = "172.30.0.11".parse().unwrap();
        let slice =
            endpoint_slice("nginx-v2", "dev", &owner(), &ports, holder, &listeners).unwrap();
        assert_eq!(slice.endpoints[0].addresses, ["172.30.0.11"]);
        let slice_ports: Vec<(Option<String>, Option<i32>)> = slice
            .ports
            .unwrap()
            .into_iter()
            .map(|p| (p.name, p.port))
            .collect();
        assert_eq!(
            slice_ports,
            [
                (Some("kt-80".into()), Some(40001)),
                (Some("kt-90".into()), Some(40002))
            ]
        );
        let labels = slice.metadata.labels.unwrap();
        assert_eq!(labels[SERVICE_NAME], "nginx-v2");
        assert_eq!(labels[MANAGED_BY], MANAGER);
        for refs in [
            svc.metadata.owner_references,
            slice.metadata.owner_references,
        ] {
            let owner = &refs.unwrap()[0];
            assert_eq!(
                (owner.kind.as_str(), owner.uid.as_str()),
                ("KtSession", "u-1")
            );
        }
        assert!(
            endpoint_slice("nginx-v2", "dev", &owner(), &ports, holder, &listeners[..1]).is_none(),
            "not before the holder listens for every port"
        );
    }
}
