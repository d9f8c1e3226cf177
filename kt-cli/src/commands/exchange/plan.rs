//! The pure part of `exchange`, decided from objects already read (no I/O): which Service
//! ports the `--expose` items stand for ([`ports`]), whether someone else holds the Service
//! ([`conflict`]), and the selector patches of selector mode.

mod conflict;
mod ports;

use std::collections::BTreeMap;

use kt_proto::compat;
use serde_json::json;

pub use self::{
    conflict::{Conflict, conflict},
    ports::{
        ExposeItem, Exposed, NamedPorts, PortPlan, ServicePort, Transport, parse_expose, plan,
        tcp_only,
    },
};

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("invalid --expose '{0}': no port")]
    NoPort(String),
    #[error(
        "invalid --expose '{0}', should be 'port' or 'local:remote', optionally ending in '/tcp' (the default) or '/udp'"
    )]
    Malformed(String),
    /// v0.3.7's text.
    #[error("target port {port} not exists in service '{service}'")]
    NoSuchPort { port: u16, service: String },
    #[error(
        "service port {port} of '{service}' targets the port named '{name}', which no pod or workload of the service declares"
    )]
    Unresolved {
        service: String,
        port: u16,
        name: String,
    },
    #[error("--expose items {first} and {second} both stand for target port {target}")]
    SameTarget {
        first: String,
        second: String,
        target: String,
    },
    #[error("port {port} of service '{service}' is UDP: expose it as '{port}/udp'")]
    NotTcp { port: u16, service: String },
    #[error("port {port} of service '{service}' is not UDP: expose it without '/udp'")]
    NotUdp { port: u16, service: String },
    #[error("port {port} of service '{service}' is SCTP, which exchange does not carry")]
    Sctp { port: u16, service: String },
    #[error(
        "--expose {item}: {command} carries TCP only (UDP is carried by `exchange --mode agent`)"
    )]
    UdpNotCarried { item: String, command: String },
}

/// The merge patch that points `old`'s Service at the shadow `target`, keeping the old
/// selector in `kt-selector`; and the one that undoes it.
pub fn selector_patches(
    old: &BTreeMap<String, String>,
    target: &str,
) -> (serde_json::Value, serde_json::Value) {
    selector_patches_to(old, compat::ROLE_SHADOW_EXCHANGE, target)
}

/// [`selector_patches`] to the pod of `role` (the mesh router's, `router`, in v0.3.7's auto
/// mesh).
pub fn selector_patches_to(
    old: &BTreeMap<String, String>,
    role: &str,
    target: &str,
) -> (serde_json::Value, serde_json::Value) {
    let mut to_shadow: serde_json::Map<String, serde_json::Value> = old
        .keys()
        .map(|k| (k.clone(), serde_json::Value::Null))
        .collect();
    to_shadow.insert(compat::ROLE.into(), json!(role));
    to_shadow.insert(compat::TARGET.into(), json!(target));
    let mut back: serde_json::Map<String, serde_json::Value> = [compat::ROLE, compat::TARGET]
        .into_iter()
        .map(|k| (k.to_owned(), serde_json::Value::Null))
        .collect();
    back.extend(old.iter().map(|(k, v)| (k.clone(), json!(v))));
    let saved = serde_json::to_string(old).expect("a map serialises");
    (
        json!({"metadata": {"annotations": {compat::SELECTOR: saved}}, "spec": {"selector": to_shadow}}),
        json!({"metadata": {"annotations": {compat::SELECTOR: null}}, "spec": {"selector": back}}),
    )
}

/// The selector a shadow's Service has while exchanged: `kt-role` and `kt-target` only.
pub fn shadow_selector(target: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            compat::ROLE.to_owned(),
            compat::ROLE_SHADOW_EXCHANGE.to_owned(),
        ),
        (compat::TARGET.to_owned(), target.to_owned()),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_selector_moves_to_the_shadow_and_back() {
        let old: BTreeMap<String, String> = [("app".to_owned(), "web".to_owned())].into();
        let (to, back) = selector_patches(&old, "AbC");
        assert_eq!(
            to["spec"]["selector"],
            json!({"app": null, "kt-role": "shadow-exchange", "kt-target": "AbC"})
        );
        assert_eq!(
            to["metadata"]["annotations"]["kt-selector"],
            r#"{"app":"web"}"#
        );
        assert_eq!(
            back["spec"]["selector"],
            json!({"app": "web", "kt-role": null, "kt-target": null})
        );
        assert_eq!(back["metadata"]["annotations"]["kt-selector"], json!(null));
        assert_eq!(
            serde_json::to_value(shadow_selector("AbC")).unwrap(),
            json!({"kt-role": "shadow-exchange", "kt-target": "AbC"})
        );
    }
}
