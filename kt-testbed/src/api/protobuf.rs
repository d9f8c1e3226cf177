//! Reads the Kubernetes protobuf encoding (`application/vnd.kubernetes.protobuf`) of the few
//! types that kubectl's typed clients send (`kubectl create configmap|secret|namespace|
//! serviceaccount|role|rolebinding|clusterrole|clusterrolebinding`, `kubectl auth can-i`), into the JSON the store keeps. Other kinds are
//! answered 415, as an API without protobuf support would.
//!
//! Wire format: the magic `k8s\0`, then a `runtime.Unknown` message {1: TypeMeta{1:
//! apiVersion, 2: kind}, 2: raw object bytes, 3: contentEncoding, 4: contentType}.

use base64::Engine as _;
use serde_json::{Map, Value, json};

#[derive(Clone, Copy)]
enum Kind {
    Str,
    Bytes,
    Int,
    Bool,
    Time,
    Msg(&'static [Field]),
    MapStr,
    MapBytes,
    RepStr,
    RepMsg(&'static [Field]),
}

#[derive(Clone, Copy)]
struct Field(u32, &'static str, Kind);

const OWNER_REFERENCE: &[Field] = &[
    Field(1, "kind", Kind::Str),
    Field(3, "name", Kind::Str),
    Field(4, "uid", Kind::Str),
    Field(5, "apiVersion", Kind::Str),
    Field(6, "controller", Kind::Bool),
    Field(7, "blockOwnerDeletion", Kind::Bool),
];

const OBJECT_META: &[Field] = &[
    Field(1, "name", Kind::Str),
    Field(2, "generateName", Kind::Str),
    Field(3, "namespace", Kind::Str),
    Field(5, "uid", Kind::Str),
    Field(6, "resourceVersion", Kind::Str),
    Field(7, "generation", Kind::Int),
    Field(8, "creationTimestamp", Kind::Time),
    Field(9, "deletionTimestamp", Kind::Time),
    Field(10, "deletionGracePeriodSeconds", Kind::Int),
    Field(11, "labels", Kind::MapStr),
    Field(12, "annotations", Kind::MapStr),
    Field(13, "ownerReferences", Kind::RepMsg(OWNER_REFERENCE)),
    Field(14, "finalizers", Kind::RepStr),
];

const LOCAL_OBJECT_REFERENCE: &[Field] = &[Field(1, "name", Kind::Str)];
const OBJECT_REFERENCE: &[Field] = &[
    Field(1, "kind", Kind::Str),
    Field(2, "namespace", Kind::Str),
    Field(3, "name", Kind::Str),
    Field(4, "uid", Kind::Str),
    Field(5, "apiVersion", Kind::Str),
];

const CONFIG_MAP: &[Field] = &[
    Field(1, "metadata", Kind::Msg(OBJECT_META)),
    Field(2, "data", Kind::MapStr),
    Field(3, "binaryData", Kind::MapBytes),
    Field(4, "immutable", Kind::Bool),
];
const SECRET: &[Field] = &[
    Field(1, "metadata", Kind::Msg(OBJECT_META)),
    Field(2, "data", Kind::MapBytes),
    Field(3, "type", Kind::Str),
    Field(4, "stringData", Kind::MapStr),
    Field(5, "immutable", Kind::Bool),
];
const NAMESPACE_SPEC: &[Field] = &[Field(1, "finalizers", Kind::RepStr)];
const NAMESPACE: &[Field] = &[
    Field(1, "metadata", Kind::Msg(OBJECT_META)),
    Field(2, "spec", Kind::Msg(NAMESPACE_SPEC)),
];
const SERVICE_ACCOUNT: &[Field] = &[
    Field(1, "metadata", Kind::Msg(OBJECT_META)),
    Field(2, "secrets", Kind::RepMsg(OBJECT_REFERENCE)),
    Field(3, "imagePullSecrets", Kind::RepMsg(LOCAL_OBJECT_REFERENCE)),
    Field(4, "automountServiceAccountToken", Kind::Bool),
];
const RESOURCE_ATTRIBUTES: &[Field] = &[
    Field(1, "namespace", Kind::Str),
    Field(2, "verb", Kind::Str),
    Field(3, "group", Kind::Str),
    Field(4, "version", Kind::Str),
    Field(5, "resource", Kind::Str),
    Field(6, "subresource", Kind::Str),
    Field(7, "name", Kind::Str),
];
const NON_RESOURCE_ATTRIBUTES: &[Field] =
    &[Field(1, "path", Kind::Str), Field(2, "verb", Kind::Str)];
const SSAR_SPEC: &[Field] = &[
    Field(1, "resourceAttributes", Kind::Msg(RESOURCE_ATTRIBUTES)),
    Field(
        2,
        "nonResourceAttributes",
        Kind::Msg(NON_RESOURCE_ATTRIBUTES),
    ),
];
const SSAR: &[Field] = &[
    Field(1, "metadata", Kind::Msg(OBJECT_META)),
    Field(2, "spec", Kind::Msg(SSAR_SPEC)),
];
const SSRR_SPEC: &[Field] = &[Field(1, "namespace", Kind::Str)];
const SSRR: &[Field] = &[
    Field(1, "metadata", Kind::Msg(OBJECT_META)),
    Field(2, "spec", Kind::Msg(SSRR_SPEC)),
];

const POLICY_RULE: &[Field] = &[
    Field(1, "verbs", Kind::RepStr),
    Field(2, "apiGroups", Kind::RepStr),
    Field(3, "resources", Kind::RepStr),
    Field(4, "resourceNames", Kind::RepStr),
    Field(5, "nonResourceURLs", Kind::RepStr),
];
const ROLE: &[Field] = &[
    Field(1, "metadata", Kind::Msg(OBJECT_META)),
    Field(2, "rules", Kind::RepMsg(POLICY_RULE)),
];
const SUBJECT: &[Field] = &[
    Field(1, "kind", Kind::Str),
    Field(2, "apiGroup", Kind::Str),
    Field(3, "name", Kind::Str),
    Field(4, "namespace", Kind::Str),
];
const ROLE_REF: &[Field] = &[
    Field(1, "apiGroup", Kind::Str),
    Field(2, "kind", Kind::Str),
    Field(3, "name", Kind::Str),
];
const ROLE_BINDING: &[Field] = &[
    Field(1, "metadata", Kind::Msg(OBJECT_META)),
    Field(2, "subjects", Kind::RepMsg(SUBJECT)),
    Field(3, "roleRef", Kind::Msg(ROLE_REF)),
];

fn schema(kind: &str) -> Option<&'static [Field]> {
    Some(match kind {
        "ConfigMap" => CONFIG_MAP,
        "Secret" => SECRET,
        "Namespace" => NAMESPACE,
        "ServiceAccount" => SERVICE_ACCOUNT,
        "SelfSubjectAccessReview" => SSAR,
        "SelfSubjectRulesReview" => SSRR,
        "Role" | "ClusterRole" => ROLE,
        "RoleBinding" | "ClusterRoleBinding" => ROLE_BINDING,
        _ => return None,
    })
}

/// One field as it appears on the wire.
enum Wire<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = self.0.split_first().ok_or("truncated varint")?;
            self.0 = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("varint too long".into())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("truncated field".into());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn next(&mut self) -> Option<Result<(u32, Wire<'a>), String>> {
        if self.0.is_empty() {
            return None;
        }
        Some((|| {
            let tag = self.varint()?;
            let number = (tag >> 3) as u32;
            let wire = match tag & 7 {
                0 => Wire::Varint(self.varint()?),
                1 => Wire::Bytes(self.take(8)?),
                2 => {
                    let len = self.varint()? as usize;
                    Wire::Bytes(self.take(len)?)
                }
                5 => Wire::Bytes(self.take(4)?),
                other => return Err(format!("unsupported wire type {other}")),
            };
            Ok((number, wire))
        })())
    }
}

fn text(bytes: &[u8]) -> Result<String, String> {
    String::from_utf8(bytes.to_vec()).map_err(|e| e.to_string())
}

fn decode_message(bytes: &[u8], fields: &[Field]) -> Result<Value, String> {
    let mut out = Map::new();
    let mut reader = Reader(bytes);
    while let Some(item) = reader.next() {
        let (number, wire) = item?;
        let Some(Field(_, name, kind)) = fields.iter().find(|f| f.0 == number).copied() else {
            continue;
        };
        let value = match (kind, wire) {
            // Go writes zero values that JSON (omitempty) leaves out.
            (Kind::Str, Wire::Bytes([])) | (Kind::Int, Wire::Varint(0)) => continue,
            (Kind::Str, Wire::Bytes(b)) => json!(text(b)?),
            (Kind::Bytes, Wire::Bytes(b)) => {
                json!(base64::engine::general_purpose::STANDARD.encode(b))
            }
            (Kind::Int, Wire::Varint(v)) => json!(v as i64),
            (Kind::Bool, Wire::Varint(v)) => json!(v != 0),
            (Kind::Time, Wire::Bytes(b)) => {
                let t = decode_message(b, &[Field(1, "s", Kind::Int)])?;
                let secs = t["s"].as_i64().unwrap_or(0);
                json!(
                    chrono::DateTime::from_timestamp(secs, 0)
                        .unwrap_or_default()
                        .format("%Y-%m-%dT%H:%M:%SZ")
                        .to_string()
                )
            }
            (Kind::Msg(schema), Wire::Bytes(b)) => decode_message(b, schema)?,
            (Kind::MapStr | Kind::MapBytes, Wire::Bytes(b)) => {
                let value_kind = if matches!(kind, Kind::MapStr) {
                    Kind::Str
                } else {
                    Kind::Bytes
                };
                let entry =
                    decode_message(b, &[Field(1, "k", Kind::Str), Field(2, "v", value_kind)])?;
                let slot = out.entry(name).or_insert_with(|| json!({}));
                slot[entry["k"].as_str().unwrap_or_default()] =
                    entry.get("v").cloned().unwrap_or(json!(""));
                continue;
            }
            (Kind::RepStr, Wire::Bytes(b)) => {
                push(&mut out, name, json!(text(b)?));
                continue;
            }
            (Kind::RepMsg(schema), Wire::Bytes(b)) => {
                push(&mut out, name, decode_message(b, schema)?);
                continue;
            }
            _ => return Err(format!("field {name} has an unexpected wire type")),
        };
        out.insert(name.into(), value);
    }
    Ok(Value::Object(out))
}

fn push(out: &mut Map<String, Value>, name: &str, value: Value) {
    if let Value::Array(list) = out.entry(name).or_insert_with(|| json!([])) {
        list.push(value);
    }
}

/// Decodes a protobuf request body; `Err` carries the message of a 415 answer.
pub fn decode(body: &[u8]) -> Result<Value, String> {
    let envelope = body
        .strip_prefix(b"k8s\0")
        .ok_or("missing the k8s protobuf magic")?;
    let unknown = decode_message(
        envelope,
        &[
            Field(
                1,
                "typeMeta",
                Kind::Msg(&[
                    Field(1, "apiVersion", Kind::Str),
                    Field(2, "kind", Kind::Str),
                ]),
            ),
            Field(2, "raw", Kind::Bytes),
        ],
    )?;
    let kind = unknown["typeMeta"]["kind"].as_str().unwrap_or_default();
    let schema = schema(kind)
        .ok_or_else(|| format!("protobuf encoding of {kind} is not supported; send JSON"))?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(unknown["raw"].as_str().unwrap_or_default())
        .map_err(|e| e.to_string())?;
    let mut object = decode_message(&raw, schema)?;
    object["apiVersion"] = unknown["typeMeta"]["apiVersion"].clone();
    object["kind"] = json!(kind);
    Ok(object)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(number: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![((number << 3) | 2) as u8, payload.len() as u8];
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn decodes_a_config_map() {
        let meta = [
            field(1, b"cm"),
            field(11, &[field(1, b"app"), field(2, b"web")].concat()),
        ]
        .concat();
        let raw = [
            field(1, &meta),
            field(2, &[field(1, b"k"), field(2, b"v")].concat()),
        ]
        .concat();
        let type_meta = [field(1, b"v1"), field(2, b"ConfigMap")].concat();
        let body = [b"k8s\0".to_vec(), field(1, &type_meta), field(2, &raw)].concat();
        let obj = decode(&body).unwrap();
        assert_eq!(
            obj,
            json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "cm", "labels": {"app": "web"}}, "data": {"k": "v"}})
        );
    }

    #[test]
    fn unknown_kinds_are_refused() {
        let type_meta = [field(1, b"apps/v1"), field(2, b"Deployment")].concat();
        let body = [b"k8s\0".to_vec(), field(1, &type_meta)].concat();
        assert!(decode(&body).unwrap_err().contains("Deployment"));
        assert!(decode(b"{}").is_err());
    }
}
