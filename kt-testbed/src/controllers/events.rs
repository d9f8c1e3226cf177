//! Events, written as the controllers and the kubelet of a cluster write them: core/v1
//! objects in the involved object's namespace, with `source`, `reason`, `message`, `type`
//! and timestamps. Like client-go's recorder, a repeat of the same event (same object,
//! source, type, reason and message) bumps `count` and `lastTimestamp` of the one object
//! instead of adding another; its name is derived from those, so no index is needed.

use serde_json::{Value, json};

use crate::api::store::{Part, Store, now_rfc3339};

/// Who reports an event: a controller (`deployment-controller`, …) or a node's kubelet.
#[derive(Clone, Copy, Debug)]
pub struct Source<'a> {
    pub component: &'a str,
    /// The node, for the kubelet.
    pub host: Option<&'a str>,
}

impl<'a> Source<'a> {
    pub const fn controller(component: &'a str) -> Self {
        Self {
            component,
            host: None,
        }
    }

    pub const fn kubelet(node: &'a str) -> Self {
        Self {
            component: "kubelet",
            host: Some(node),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Normal,
    Warning,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        }
    }
}

/// What an event is about: an object, or one container of a pod (`fieldPath`).
pub struct Involved<'a> {
    pub object: &'a Value,
    pub field_path: Option<String>,
}

impl<'a> Involved<'a> {
    pub fn object(object: &'a Value) -> Self {
        Self {
            object,
            field_path: None,
        }
    }

    /// Container `name` of `pod`.
    pub fn container(pod: &'a Value, name: &str) -> Self {
        Self {
            object: pod,
            field_path: Some(format!("spec.containers{{{name}}}")),
        }
    }
}

/// Records an event, or counts a repeat of it. A failure is ignored, as a recorder's is:
/// events are best effort.
pub fn record(
    store: &Store,
    source: Source<'_>,
    involved: &Involved<'_>,
    kind: EventType,
    reason: &str,
    message: &str,
) {
    let Some(rt) = store.registry.find("", "v1", "events") else {
        return;
    };
    let object = involved.object;
    let meta = &object["metadata"];
    let ns = meta["namespace"]
        .as_str()
        .filter(|n| !n.is_empty())
        .unwrap_or("default");
    let object_name = meta["name"].as_str().unwrap_or_default();
    let name = event_name(
        object_name,
        &identity(source, involved, kind, reason, message),
    );
    let now = now_rfc3339();
    let counted = store.modify(&rt, ns, &name, Part::Main, false, |mut event| {
        let count = event["count"].as_i64().unwrap_or(1);
        event["count"] = json!(count + 1);
        event["lastTimestamp"] = json!(now);
        Ok(event)
    });
    if counted.is_ok() {
        return;
    }
    let mut involved_object = json!({
        "kind": object["kind"], "namespace": meta["namespace"], "name": object_name,
        "uid": meta["uid"], "apiVersion": object["apiVersion"],
        "resourceVersion": meta["resourceVersion"],
    });
    if let Some(path) = &involved.field_path {
        involved_object["fieldPath"] = json!(path);
    }
    let mut event_source = json!({"component": source.component});
    if let Some(host) = source.host {
        event_source["host"] = json!(host);
    }
    let event = json!({
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": name, "namespace": ns},
        "involvedObject": involved_object,
        "reason": reason, "message": message, "type": kind.as_str(),
        "source": event_source,
        "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        "eventTime": null,
        "reportingComponent": source.component,
        "reportingInstance": source.host.unwrap_or_default(),
    });
    let _ = store.create(&rt, ns, event, false);
}

/// What makes two events the same one.
fn identity(
    source: Source<'_>,
    involved: &Involved<'_>,
    kind: EventType,
    reason: &str,
    message: &str,
) -> String {
    [
        source.component,
        source.host.unwrap_or_default(),
        involved.object["metadata"]["uid"]
            .as_str()
            .unwrap_or_default(),
        involved.field_path.as_deref().unwrap_or_default(),
        kind.as_str(),
        reason,
        message,
    ]
    .join("\u{0}")
}

/// `<object>.<16 hex digits>`, the shape of client-go's event names.
fn event_name(object_name: &str, identity: &str) -> String {
    // FNV-1a, 64 bits.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in identity.bytes() {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{object_name}.{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> Value {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "web-1", "namespace": "default", "uid": "u1", "resourceVersion": "7"}})
    }

    #[test]
    fn a_repeat_counts_and_a_different_event_is_another_object() {
        let store = Store::new(100);
        crate::api::bootstrap(&store);
        let pod = pod();
        let kubelet = Source::kubelet("node-1");
        let started = Involved::container(&pod, "app");
        for _ in 0..2 {
            record(
                &store,
                kubelet,
                &started,
                EventType::Normal,
                "Started",
                "Started container app",
            );
        }
        record(
            &store,
            Source::controller("default-scheduler"),
            &Involved::object(&pod),
            EventType::Normal,
            "Scheduled",
            "Successfully assigned default/web-1 to node-1",
        );
        let events = store.all("", "events");
        assert_eq!(events.len(), 2, "{events:#?}");
        let started = events.iter().find(|e| e["reason"] == "Started").unwrap();
        assert_eq!(started["count"], 2);
        assert_eq!(started["metadata"]["namespace"], "default");
        assert_eq!(
            started["involvedObject"]["fieldPath"],
            "spec.containers{app}"
        );
        assert_eq!(
            started["source"],
            json!({"component": "kubelet", "host": "node-1"})
        );
        assert!(
            started["metadata"]["name"]
                .as_str()
                .unwrap()
                .starts_with("web-1.")
        );
        let scheduled = events.iter().find(|e| e["reason"] == "Scheduled").unwrap();
        assert_eq!(scheduled["count"], 1);
        assert_eq!(scheduled["type"], "Normal");
        assert_eq!(scheduled["involvedObject"]["uid"], "u1");
    }
}
