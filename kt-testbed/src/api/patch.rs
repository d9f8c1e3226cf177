//! PATCH bodies: JSON merge patch (RFC 7386), JSON patch (RFC 6902), and strategic merge
//! patch for built-in types, with the directives `kubectl apply` sends (`$patch`,
//! `$setElementOrder/…`, `$retainKeys`, `$deleteFromPrimitiveList/…`).

use serde_json::{Map, Value};

/// Why a patch could not be applied; the API answers 400 or 422 with the message.
#[derive(Debug, PartialEq, Eq)]
pub enum PatchError {
    /// The body is not a patch of this type (400).
    Malformed(String),
    /// The patch is well-formed but cannot apply (422).
    Failed(String),
}

/// RFC 7386: maps merge, `null` deletes, everything else replaces.
pub fn merge(target: &mut Value, patch: &Value) {
    json_patch::merge(target, patch);
}

/// RFC 6902.
pub fn json_patch(target: &mut Value, patch: &Value) -> Result<(), PatchError> {
    let patch: json_patch::Patch = serde_json::from_value(patch.clone())
        .map_err(|e| PatchError::Malformed(format!("invalid JSON patch: {e}")))?;
    json_patch::patch(target, &patch).map_err(|e| PatchError::Failed(e.to_string()))
}

/// Strategic merge patch over a built-in object.
pub fn strategic(target: &mut Value, patch: &Value) -> Result<(), PatchError> {
    let Value::Object(patch) = patch else {
        return Err(PatchError::Malformed(
            "strategic merge patch must be an object".into(),
        ));
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    merge_map(
        target.as_object_mut().expect("made an object above"),
        patch,
        "",
    )
}

/// The key that identifies items of a list field, if the list merges rather than replaces.
/// `path` is the dotted field path with list indices dropped.
fn merge_key(path: &str, items: &[Value]) -> Option<&'static str> {
    let field = path.rsplit('.').next().unwrap_or(path);
    Some(match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets" => "name",
        "volumeMounts" => "mountPath",
        "volumeDevices" => "devicePath",
        "ownerReferences" => "uid",
        "hostAliases" => "ip",
        "conditions" => "type",
        "topologySpreadConstraints" => "topologyKey",
        // Container ports merge by containerPort, Service ports by port.
        "ports" if path.ends_with("spec.ports") && !path.contains("containers") => "port",
        "ports" => {
            if items.iter().any(|i| i.get("containerPort").is_some()) || path.contains("ontainers")
            {
                "containerPort"
            } else {
                "port"
            }
        }
        _ => return None,
    })
}

/// Lists of scalars that merge as sets rather than replace.
fn is_set_list(path: &str) -> bool {
    path == "metadata.finalizers"
}

fn merge_map(
    target: &mut Map<String, Value>,
    patch: &Map<String, Value>,
    path: &str,
) -> Result<(), PatchError> {
    match patch.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            let mut replacement = patch.clone();
            replacement.remove("$patch");
            *target = replacement;
            return Ok(());
        }
        Some("delete") => {
            target.clear();
            return Ok(());
        }
        Some("merge") | None => {}
        Some(other) => {
            return Err(PatchError::Malformed(format!(
                "unknown patch type: {other}"
            )));
        }
    }
    if let Some(retain) = patch.get("$retainKeys") {
        let keep: Vec<&str> = retain
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        target.retain(|k, _| keep.contains(&k.as_str()));
    }
    for (key, value) in patch {
        if key == "$patch" || key == "$retainKeys" || key.starts_with("$setElementOrder/") {
            continue;
        }
        if let Some(field) = key.strip_prefix("$deleteFromPrimitiveList/") {
            let remove: Vec<&Value> = value.as_array().into_iter().flatten().collect();
            if let Some(Value::Array(list)) = target.get_mut(field) {
                list.retain(|v| !remove.contains(&v));
            }
            continue;
        }
        let child_path = if path.is_empty() {
            key.clone()
        } else {
            format!("{path}.{key}")
        };
        match value {
            Value::Null => {
                target.remove(key);
            }
            Value::Object(p) => {
                let slot = target
                    .entry(key.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                if !slot.is_object() {
                    *slot = Value::Object(Map::new());
                }
                merge_map(
                    slot.as_object_mut().expect("made an object above"),
                    p,
                    &child_path,
                )?;
                if p.get("$patch").and_then(Value::as_str) == Some("delete") {
                    target.remove(key);
                }
            }
            Value::Array(items) => {
                let current = target.remove(key);
                let merged = merge_list(current, items, &child_path)?;
                target.insert(key.clone(), merged);
            }
            scalar => {
                target.insert(key.clone(), scalar.clone());
            }
        }
    }
    Ok(())
}

fn merge_list(current: Option<Value>, patch: &[Value], path: &str) -> Result<Value, PatchError> {
    let current = match current {
        Some(Value::Array(items)) => items,
        _ => Vec::new(),
    };
    // A `{"$patch": "replace"}` item replaces the whole list with the other items.
    if patch
        .iter()
        .any(|i| i.get("$patch").and_then(Value::as_str) == Some("replace"))
    {
        return Ok(Value::Array(
            patch
                .iter()
                .filter(|i| i.get("$patch").is_none())
                .cloned()
                .collect(),
        ));
    }
    if is_set_list(path) {
        let mut out = current;
        for item in patch {
            if !out.contains(item) {
                out.push(item.clone());
            }
        }
        return Ok(Value::Array(out));
    }
    let Some(key) = merge_key(path, patch) else {
        return Ok(Value::Array(patch.to_vec()));
    };
    let mut out = current;
    for item in patch {
        let Some(id) = item.get(key) else {
            return Err(PatchError::Failed(format!(
                "{path}: item without merge key {key}"
            )));
        };
        let position = out.iter().position(|c| c.get(key) == Some(id));
        let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
        match (position, delete) {
            (Some(i), true) => {
                out.remove(i);
            }
            (None, true) => {}
            (Some(i), false) => {
                if let (Value::Object(slot), Value::Object(p)) = (&mut out[i], item) {
                    merge_map(slot, p, path)?;
                }
            }
            (None, false) => {
                let mut fresh = Map::new();
                if let Value::Object(p) = item {
                    merge_map(&mut fresh, p, path)?;
                }
                out.push(Value::Object(fresh));
            }
        }
    }
    Ok(Value::Array(out))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn merge_patch_merges_maps_and_deletes_nulls() {
        let mut svc = json!({"spec": {"selector": {"app": "a", "tier": "web"}}});
        merge(
            &mut svc,
            &json!({"spec": {"selector": {"app": "b", "tier": null}}}),
        );
        assert_eq!(svc, json!({"spec": {"selector": {"app": "b"}}}));
    }

    #[test]
    fn json_patch_replace_and_failure() {
        let mut pod = json!({"metadata": {"annotations": {"kt-last-heart-beat": "1"}}});
        let op = json!([{"op": "replace", "path": "/metadata/annotations/kt-last-heart-beat", "value": "2"}]);
        json_patch(&mut pod, &op).unwrap();
        assert_eq!(pod["metadata"]["annotations"]["kt-last-heart-beat"], "2");
        let bad = json!([{"op": "replace", "path": "/metadata/nope/x", "value": "2"}]);
        assert!(matches!(
            json_patch(&mut pod, &bad),
            Err(PatchError::Failed(_))
        ));
        assert!(matches!(
            json_patch(&mut pod, &json!({"op": 1})),
            Err(PatchError::Malformed(_))
        ));
    }

    #[test]
    fn strategic_merges_containers_by_name_and_ports_by_key() {
        let mut deploy = json!({"spec": {"template": {"spec": {"containers": [
            {"name": "app", "image": "v1", "ports": [{"containerPort": 80, "name": "http"}]},
            {"name": "side", "image": "s1"}]}}}});
        let patch = json!({"spec": {"template": {"spec": {
            "$setElementOrder/containers": [{"name": "app"}, {"name": "side"}],
            "containers": [{"name": "app", "image": "v2",
                            "ports": [{"containerPort": 81}]}]}}}});
        strategic(&mut deploy, &patch).unwrap();
        let containers = &deploy["spec"]["template"]["spec"]["containers"];
        assert_eq!(containers[0]["image"], "v2");
        assert_eq!(containers[0]["ports"].as_array().unwrap().len(), 2);
        assert_eq!(containers[1]["image"], "s1");
    }

    #[test]
    fn strategic_delete_directive_and_service_ports() {
        let mut svc = json!({"spec": {"ports": [{"port": 80, "targetPort": 8080}, {"port": 443}]}});
        strategic(
            &mut svc,
            &json!({"spec": {"ports": [{"port": 443, "$patch": "delete"},
                                                        {"port": 80, "targetPort": 9090}]}}),
        )
        .unwrap();
        assert_eq!(
            svc["spec"]["ports"],
            json!([{"port": 80, "targetPort": 9090}])
        );
    }

    #[test]
    fn strategic_primitive_lists_replace_and_finalizers_merge() {
        let mut obj = json!({"metadata": {"finalizers": ["a"]},
                             "spec": {"template": {"spec": {"containers": [{"name": "c", "args": ["x", "y"]}]}}}});
        strategic(
            &mut obj,
            &json!({"metadata": {"finalizers": ["b"]},
            "spec": {"template": {"spec": {"containers": [{"name": "c", "args": ["z"]}]}}}}),
        )
        .unwrap();
        assert_eq!(obj["metadata"]["finalizers"], json!(["a", "b"]));
        assert_eq!(
            obj["spec"]["template"]["spec"]["containers"][0]["args"],
            json!(["z"])
        );
        strategic(
            &mut obj,
            &json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["a"]}}),
        )
        .unwrap();
        assert_eq!(obj["metadata"]["finalizers"], json!(["b"]));
    }

    #[test]
    fn strategic_replace_and_retain_keys() {
        let mut obj = json!({"spec": {"selector": {"a": "1", "b": "2"},
                                      "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}}}});
        strategic(
            &mut obj,
            &json!({"spec": {"selector": {"$patch": "replace", "c": "3"},
            "strategy": {"$retainKeys": ["type"], "type": "Recreate"}}}),
        )
        .unwrap();
        assert_eq!(obj["spec"]["selector"], json!({"c": "3"}));
        assert_eq!(obj["spec"]["strategy"], json!({"type": "Recreate"}));
    }
}
