//! Reads request bodies in the Kubernetes protobuf encoding
//! (`application/vnd.kubernetes.protobuf`, what client-go's typed clients send: `kubectl
//! create deployment|service|job|…`, `kubectl run`, controllers) into the JSON the store
//! keeps, for every kind of the Kubernetes 1.33 schema.
//!
//! Generic: the message of a kind is looked up in the schema's descriptor set (compiled at
//! build time from the `.proto` files of the release, see `build.rs`) and decoded with
//! prost-reflect; no table per kind. Wire format: the magic `k8s\0`, then a
//! `runtime.Unknown` {typeMeta {apiVersion, kind}, raw (the object), contentEncoding,
//! contentType}. The JSON is what Go's `encoding/json` gives for the same object:
//!
//! - `IntOrString` → a number or a string, `Quantity` → its string, `Time` → RFC 3339 in
//!   seconds (`null` when zero, so absent), `MicroTime` → RFC 3339 in microseconds,
//!   `Duration` → Go's duration string, `RawExtension`, `FieldsV1` and CRDs' `JSON` → the
//!   embedded JSON;
//! - maps → objects, bytes → base64, int64 → numbers;
//! - empty vs absent: Go writes every non-pointer field, so a zero scalar on the wire is
//!   mostly a Go zero that JSON's `omitempty` drops. It is dropped, except for fields that
//!   are pointers or required in the API, where zero means something (`replicas: 0`,
//!   `ready: false`); the wire format does not say which those are, so [`ZERO_KEPT`] lists
//!   them. A message present on the wire is kept even when empty (`emptyDir: {}`).

use std::{collections::HashMap, sync::LazyLock};

use base64::Engine as _;
use prost_reflect::{
    DescriptorPool, DynamicMessage, MapKey, MessageDescriptor, ReflectMessage as _, Value as Pb,
};
use serde_json::{Map, Value, json};

/// The compiled schema (`build.rs`).
static DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kubernetes.fds"));

/// The magic before every protobuf-encoded Kubernetes object.
pub const MAGIC: &[u8] = b"k8s\0";

/// Why a body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ProtobufError {
    #[error("the body does not start with the Kubernetes protobuf magic \"k8s\\x00\"")]
    NoMagic,
    #[error("decoding the runtime.Unknown envelope: {0}")]
    Envelope(String),
    #[error("the envelope carries content encoding {0:?}; only an empty one is supported")]
    ContentEncoding(String),
    /// The schema has no message for this kind: the API answers 415, naming it.
    #[error(
        "protobuf encoding of kind {kind:?} ({api_version}) is not supported: the Kubernetes 1.33 schema has no such kind; send JSON"
    )]
    UnknownKind { api_version: String, kind: String },
    #[error("decoding {kind} ({api_version}) from protobuf: {message}")]
    Decode {
        api_version: String,
        kind: String,
        message: String,
    },
    #[error("the Kubernetes protobuf schema could not be loaded: {0}")]
    Schema(String),
}

impl ProtobufError {
    /// A kind outside the schema: 415 Unsupported Media Type (anything else is a bad body).
    pub fn unsupported_kind(&self) -> bool {
        matches!(self, Self::UnknownKind { .. })
    }
}

/// The schema: every message, and the messages of each `(group segment, version, kind)`.
pub struct Schema {
    pub pool: DescriptorPool,
    kinds: HashMap<(String, String, String), MessageDescriptor>,
}

static SCHEMA: LazyLock<Result<Schema, String>> = LazyLock::new(|| {
    let pool = DescriptorPool::decode(DESCRIPTOR_SET).map_err(|e| e.to_string())?;
    let mut kinds = HashMap::new();
    for message in pool.all_messages() {
        // Packages are `api.apps.v1`, `apimachinery.pkg.apis.meta.v1`,
        // `apiextensions_apiserver.pkg.apis.apiextensions.v1`: the last two segments are the
        // group's first label (`core` for the core group) and the version.
        let mut segments = message.package_name().rsplit('.');
        let (Some(version), Some(group)) = (segments.next(), segments.next()) else {
            continue;
        };
        kinds.insert(
            (
                group.to_owned(),
                version.to_owned(),
                message.name().to_owned(),
            ),
            message,
        );
    }
    Ok(Schema { pool, kinds })
});

/// The loaded schema (decoded on first use: the API server starts without it).
pub fn schema() -> Result<&'static Schema, ProtobufError> {
    SCHEMA
        .as_ref()
        .map_err(|e| ProtobufError::Schema(e.clone()))
}

impl Schema {
    /// The message of `kind` in `apiVersion` (`apps/v1`, `v1`, `networking.k8s.io/v1`).
    pub fn message(&self, api_version: &str, kind: &str) -> Option<MessageDescriptor> {
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        let segment = match group {
            "" => "core",
            group => group.split('.').next().unwrap_or(group),
        };
        let key = |g: &str| (g.to_owned(), version.to_owned(), kind.to_owned());
        self.kinds
            .get(&key(segment))
            // Options and other meta.k8s.io kinds travel with any group's version.
            .or_else(|| self.kinds.get(&key("meta")))
            .cloned()
    }

    /// The envelope message, `runtime.Unknown`.
    fn unknown(&self) -> Result<MessageDescriptor, ProtobufError> {
        self.pool
            .get_message_by_name("apimachinery.pkg.runtime.Unknown")
            .ok_or_else(|| ProtobufError::Schema("no runtime.Unknown message".into()))
    }
}

/// The object in a protobuf request body, as JSON with `apiVersion` and `kind`.
pub fn decode(body: &[u8]) -> Result<Value, ProtobufError> {
    let raw = body.strip_prefix(MAGIC).ok_or(ProtobufError::NoMagic)?;
    let schema = schema()?;
    let envelope = DynamicMessage::decode(schema.unknown()?, raw)
        .map_err(|e| ProtobufError::Envelope(e.to_string()))?;
    let text = |m: &DynamicMessage, name: &str| {
        m.get_field_by_name(name)
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    };
    let encoding = text(&envelope, "contentEncoding");
    if !encoding.is_empty() {
        return Err(ProtobufError::ContentEncoding(encoding));
    }
    let type_meta = envelope
        .get_field_by_name("typeMeta")
        .and_then(|v| v.as_message().cloned())
        .ok_or_else(|| ProtobufError::Envelope("no typeMeta".into()))?;
    let (api_version, kind) = (text(&type_meta, "apiVersion"), text(&type_meta, "kind"));
    let object_bytes = envelope
        .get_field_by_name("raw")
        .and_then(|v| v.as_bytes().cloned())
        .unwrap_or_default();
    let descriptor =
        schema
            .message(&api_version, &kind)
            .ok_or_else(|| ProtobufError::UnknownKind {
                api_version: api_version.clone(),
                kind: kind.clone(),
            })?;
    let message =
        DynamicMessage::decode(descriptor, object_bytes).map_err(|e| ProtobufError::Decode {
            api_version: api_version.clone(),
            kind: kind.clone(),
            message: e.to_string(),
        })?;
    let mut object = Map::new();
    object.insert("apiVersion".into(), json!(api_version));
    object.insert("kind".into(), json!(kind));
    if let Value::Object(fields) = message_to_json(&message) {
        object.extend(fields);
    }
    Ok(Value::Object(object))
}

/// Embedded Go structs (`json:",inline"`): the wire has them as a field named after the
/// type, JSON has their fields in the parent. `(message, field)`.
const INLINE: &[(&str, &str)] = &[
    ("Volume", "volumeSource"),
    ("PersistentVolumeSpec", "persistentVolumeSource"),
    ("EphemeralContainer", "ephemeralContainerCommon"),
    ("Probe", "handler"),
    ("ConfigMapEnvSource", "localObjectReference"),
    ("ConfigMapKeySelector", "localObjectReference"),
    ("ConfigMapProjection", "localObjectReference"),
    ("ConfigMapVolumeSource", "localObjectReference"),
    ("SecretEnvSource", "localObjectReference"),
    ("SecretKeySelector", "localObjectReference"),
    ("SecretProjection", "localObjectReference"),
    ("IngressRule", "ingressRuleValue"),
    ("RuleWithOperations", "rule"),
    ("NamedRuleWithOperations", "ruleWithOperations"),
];

/// Fields whose zero value is kept: pointers and required fields of the API, where `0`,
/// `false` or `""` is meaningful (Go's JSON writes them too).
const ZERO_KEPT: &[&str] = &[
    // Workloads and their pods.
    "replicas",
    "revisionHistoryLimit",
    "progressDeadlineSeconds",
    "partition",
    "terminationGracePeriodSeconds",
    "activeDeadlineSeconds",
    "automountServiceAccountToken",
    "enableServiceLinks",
    "shareProcessNamespace",
    "setHostnameAsFQDN",
    "hostUsers",
    "priority",
    "runAsUser",
    "runAsGroup",
    "runAsNonRoot",
    "privileged",
    "allowPrivilegeEscalation",
    "readOnlyRootFilesystem",
    "defaultMode",
    "mode",
    "optional",
    "containerPort",
    "exitCode",
    "restartCount",
    "ready",
    "started",
    "weight",
    "storageClassName",
    // Jobs and CronJobs.
    "parallelism",
    "completions",
    "backoffLimit",
    "backoffLimitPerIndex",
    "maxFailedIndexes",
    "suspend",
    "ttlSecondsAfterFinished",
    "startingDeadlineSeconds",
    "successfulJobsHistoryLimit",
    "failedJobsHistoryLimit",
    // Services, endpoints, ingresses.
    "port",
    "serving",
    "terminating",
    "allocateLoadBalancerNodePorts",
    // Autoscaling and disruption budgets.
    "minReplicas",
    "maxReplicas",
    "targetCPUUtilizationPercentage",
    "averageUtilization",
    "stabilizationWindowSeconds",
    // Owners, leases, tokens.
    "controller",
    "blockOwnerDeletion",
    "deletionGracePeriodSeconds",
    "leaseDurationSeconds",
    "leaseTransitions",
    "expirationSeconds",
    "immutable",
];

/// A message as Go's JSON has it (well-known Kubernetes types by their own rules).
pub fn message_to_json(message: &DynamicMessage) -> Value {
    let field = |name: &str| message.get_field_by_name(name);
    let int = |name: &str| field(name).and_then(|v| as_i64(&v)).unwrap_or(0);
    let raw_json = |name: &str| {
        field(name)
            .and_then(|v| v.as_bytes().cloned())
            .map(|b| {
                serde_json::from_slice(&b)
                    .unwrap_or_else(|_| json!(base64::engine::general_purpose::STANDARD.encode(b)))
            })
            .unwrap_or(Value::Null)
    };
    match message.descriptor().full_name() {
        "apimachinery.pkg.apis.meta.v1.Time" => {
            time(int("seconds"), int("nanos"), chrono::SecondsFormat::Secs)
        }
        "apimachinery.pkg.apis.meta.v1.MicroTime" => {
            time(int("seconds"), int("nanos"), chrono::SecondsFormat::Micros)
        }
        "apimachinery.pkg.apis.meta.v1.Duration" => json!(go_duration(int("duration"))),
        "apimachinery.pkg.util.intstr.IntOrString" => {
            if int("type") == 1 {
                json!(
                    field("strVal")
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default()
                )
            } else {
                json!(int("intVal"))
            }
        }
        "apimachinery.pkg.api.resource.Quantity" => json!(
            field("string")
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default()
        ),
        "apimachinery.pkg.runtime.RawExtension"
        | "apiextensions_apiserver.pkg.apis.apiextensions.v1.JSON" => raw_json("raw"),
        "apimachinery.pkg.apis.meta.v1.FieldsV1" => raw_json("Raw"),
        _ => {
            let mut out = Map::new();
            let type_name = message.descriptor().name().to_owned();
            for (desc, value) in message.fields() {
                let name = desc.name();
                if INLINE.contains(&(type_name.as_str(), name)) {
                    if let Value::Object(fields) = scalar_or_message(value) {
                        out.extend(fields);
                    }
                    continue;
                }
                let json = if desc.is_map() {
                    map_to_json(value)
                } else if let Pb::List(items) = value {
                    Value::Array(items.iter().map(scalar_or_message).collect())
                } else {
                    let json = scalar_or_message(value);
                    let scalar = desc.kind().as_message().is_none();
                    if scalar && is_go_zero(&json) && !ZERO_KEPT.contains(&name) {
                        continue;
                    }
                    json
                };
                if !json.is_null() {
                    out.insert(name.to_owned(), json);
                }
            }
            Value::Object(out)
        }
    }
}

fn map_to_json(value: &Pb) -> Value {
    let Pb::Map(entries) = value else {
        return Value::Null;
    };
    let mut out = Map::new();
    for (key, value) in entries {
        let key = match key {
            MapKey::String(s) => s.clone(),
            MapKey::Bool(b) => b.to_string(),
            MapKey::I32(n) => n.to_string(),
            MapKey::I64(n) => n.to_string(),
            MapKey::U32(n) => n.to_string(),
            MapKey::U64(n) => n.to_string(),
        };
        out.insert(key, scalar_or_message(value));
    }
    Value::Object(out)
}

fn scalar_or_message(value: &Pb) -> Value {
    match value {
        Pb::Bool(b) => json!(b),
        Pb::I32(n) => json!(n),
        Pb::I64(n) => json!(n),
        Pb::U32(n) => json!(n),
        Pb::U64(n) => json!(n),
        Pb::F32(n) => json!(n),
        Pb::F64(n) => json!(n),
        Pb::String(s) => json!(s),
        Pb::Bytes(b) => json!(base64::engine::general_purpose::STANDARD.encode(b)),
        Pb::EnumNumber(n) => json!(n),
        Pb::Message(m) => message_to_json(m),
        Pb::List(items) => Value::Array(items.iter().map(scalar_or_message).collect()),
        Pb::Map(_) => map_to_json(value),
    }
}

fn as_i64(value: &Pb) -> Option<i64> {
    match value {
        Pb::I32(n) => Some(i64::from(*n)),
        Pb::I64(n) => Some(*n),
        Pb::U32(n) => Some(i64::from(*n)),
        Pb::U64(n) => i64::try_from(*n).ok(),
        _ => None,
    }
}

/// What `omitempty` drops for a scalar.
fn is_go_zero(value: &Value) -> bool {
    match value {
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        _ => false,
    }
}

/// A `metav1.Time` or `MicroTime`: the zero time is `null` in Go's JSON (so absent here).
fn time(seconds: i64, nanos: i64, format: chrono::SecondsFormat) -> Value {
    if seconds == 0 && nanos == 0 {
        return Value::Null;
    }
    let nanos = u32::try_from(nanos).unwrap_or(0);
    chrono::DateTime::from_timestamp(seconds, nanos)
        .map(|t| json!(t.to_rfc3339_opts(format, true)))
        .unwrap_or(Value::Null)
}

/// Go's `time.Duration.String()`: `1h2m3.5s`, `150ms`, `0s`.
fn go_duration(nanos: i64) -> String {
    if nanos == 0 {
        return "0s".into();
    }
    let sign = if nanos < 0 { "-" } else { "" };
    let n = nanos.unsigned_abs();
    if n < 1_000_000_000 {
        let (value, unit) = match n {
            0..1_000 => return format!("{sign}{n}ns"),
            1_000..1_000_000 => (n as f64 / 1e3, "µs"),
            _ => (n as f64 / 1e6, "ms"),
        };
        return format!("{sign}{value}{unit}");
    }
    let (hours, rest) = (n / 3_600_000_000_000, n % 3_600_000_000_000);
    let (minutes, rest) = (rest / 60_000_000_000, rest % 60_000_000_000);
    let seconds = rest as f64 / 1e9;
    let mut out = sign.to_owned();
    if hours > 0 {
        out.push_str(&format!("{hours}h{minutes}m"));
    } else if minutes > 0 {
        out.push_str(&format!("{minutes}m"));
    }
    out.push_str(&format!("{seconds}s"));
    out
}

/// Encodes JSON into the protobuf envelope of its kind: the inverse of [`decode`], for
/// tests that send what a typed client would.
pub fn encode(object: &Value) -> Result<Vec<u8>, ProtobufError> {
    let schema = schema()?;
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    let kind = object["kind"].as_str().unwrap_or_default();
    let descriptor =
        schema
            .message(api_version, kind)
            .ok_or_else(|| ProtobufError::UnknownKind {
                api_version: api_version.into(),
                kind: kind.into(),
            })?;
    let fail = |message: String| ProtobufError::Decode {
        api_version: api_version.into(),
        kind: kind.into(),
        message,
    };
    let message = json_to_message(&descriptor, object).map_err(fail)?;
    let unknown = schema.unknown()?;
    let mut envelope = DynamicMessage::new(unknown.clone());
    let mut type_meta = DynamicMessage::new(
        unknown
            .get_field_by_name("typeMeta")
            .and_then(|f| f.kind().as_message().cloned())
            .ok_or_else(|| ProtobufError::Schema("no TypeMeta".into()))?,
    );
    type_meta.set_field_by_name("apiVersion", Pb::String(api_version.into()));
    type_meta.set_field_by_name("kind", Pb::String(kind.into()));
    envelope.set_field_by_name("typeMeta", Pb::Message(type_meta));
    envelope.set_field_by_name(
        "raw",
        Pb::Bytes(prost::Message::encode_to_vec(&message).into()),
    );
    envelope.set_field_by_name("contentType", Pb::String(String::new()));
    let mut out = MAGIC.to_vec();
    out.extend(prost::Message::encode_to_vec(&envelope));
    Ok(out)
}

fn json_to_message(desc: &MessageDescriptor, value: &Value) -> Result<DynamicMessage, String> {
    let mut message = DynamicMessage::new(desc.clone());
    let set = |m: &mut DynamicMessage, name: &str, v: Pb| m.set_field_by_name(name, v);
    match desc.full_name() {
        "apimachinery.pkg.apis.meta.v1.Time" | "apimachinery.pkg.apis.meta.v1.MicroTime" => {
            let text = value.as_str().ok_or("a time is a string")?;
            let t = chrono::DateTime::parse_from_rfc3339(text).map_err(|e| e.to_string())?;
            set(&mut message, "seconds", Pb::I64(t.timestamp()));
            set(
                &mut message,
                "nanos",
                Pb::I32(i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0)),
            );
        }
        "apimachinery.pkg.util.intstr.IntOrString" => match value {
            Value::String(s) => {
                set(&mut message, "type", Pb::I64(1));
                set(&mut message, "strVal", Pb::String(s.clone()));
            }
            other => {
                let n = other.as_i64().ok_or("an int-or-string")?;
                set(&mut message, "type", Pb::I64(0));
                set(
                    &mut message,
                    "intVal",
                    Pb::I32(i32::try_from(n).map_err(|e| e.to_string())?),
                );
            }
        },
        "apimachinery.pkg.api.resource.Quantity" => {
            let text = match value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            set(&mut message, "string", Pb::String(text));
        }
        "apimachinery.pkg.runtime.RawExtension"
        | "apiextensions_apiserver.pkg.apis.apiextensions.v1.JSON" => {
            set(&mut message, "raw", Pb::Bytes(value.to_string().into()));
        }
        "apimachinery.pkg.apis.meta.v1.FieldsV1" => {
            set(&mut message, "Raw", Pb::Bytes(value.to_string().into()));
        }
        _ => {
            let object = value
                .as_object()
                .ok_or_else(|| format!("{} must be an object, not {value}", desc.full_name()))?;
            let mut inlined = Map::new();
            for (name, v) in object {
                let Some(field) = desc.get_field_by_name(name) else {
                    // An embedded struct's field, or apiVersion and kind (in the envelope).
                    inlined.insert(name.clone(), v.clone());
                    continue;
                };
                if v.is_null() {
                    continue;
                }
                let pb = if field.is_map() {
                    let entry = field.kind();
                    let entry = entry.as_message().ok_or("a map entry")?;
                    let value_field = entry.map_entry_value_field();
                    let mut map = HashMap::new();
                    for (k, item) in v.as_object().ok_or("a map is an object")? {
                        map.insert(
                            MapKey::String(k.clone()),
                            json_to_value(&value_field.kind(), item)?,
                        );
                    }
                    Pb::Map(map)
                } else if field.is_list() {
                    let items = v.as_array().ok_or_else(|| format!("{name} is a list"))?;
                    Pb::List(
                        items
                            .iter()
                            .map(|item| json_to_value(&field.kind(), item))
                            .collect::<Result<_, _>>()?,
                    )
                } else {
                    json_to_value(&field.kind(), v)?
                };
                message.set_field(&field, pb);
            }
            for (type_name, field_name) in INLINE {
                if *type_name != desc.name() || inlined.is_empty() {
                    continue;
                }
                if let Some(field) = desc.get_field_by_name(field_name)
                    && let Some(inner) = field.kind().as_message()
                {
                    let value = Value::Object(std::mem::take(&mut inlined));
                    message.set_field(&field, Pb::Message(json_to_message(inner, &value)?));
                }
            }
        }
    }
    Ok(message)
}

fn json_to_value(kind: &prost_reflect::Kind, value: &Value) -> Result<Pb, String> {
    use prost_reflect::Kind as K;
    let int = || {
        value
            .as_i64()
            .ok_or_else(|| format!("{value} is not an integer"))
    };
    Ok(match kind {
        K::Message(desc) => Pb::Message(json_to_message(desc, value)?),
        K::String => Pb::String(value.as_str().ok_or("a string")?.to_owned()),
        K::Bytes => Pb::Bytes(
            base64::engine::general_purpose::STANDARD
                .decode(value.as_str().ok_or("base64 bytes")?)
                .map_err(|e| e.to_string())?
                .into(),
        ),
        K::Bool => Pb::Bool(value.as_bool().ok_or("a boolean")?),
        K::Int32 | K::Sint32 | K::Sfixed32 => {
            Pb::I32(i32::try_from(int()?).map_err(|e| e.to_string())?)
        }
        K::Int64 | K::Sint64 | K::Sfixed64 => Pb::I64(int()?),
        K::Uint32 | K::Fixed32 => Pb::U32(u32::try_from(int()?).map_err(|e| e.to_string())?),
        K::Uint64 | K::Fixed64 => Pb::U64(u64::try_from(int()?).map_err(|e| e.to_string())?),
        K::Double => Pb::F64(value.as_f64().ok_or("a number")?),
        K::Float => Pb::F32(value.as_f64().ok_or("a number")? as f32),
        K::Enum(_) => Pb::EnumNumber(i32::try_from(int()?).map_err(|e| e.to_string())?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A protobuf field: tag, then a varint or a length-delimited payload.
    fn field(number: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = varint(u64::from(number) << 3 | 2);
        out.extend(varint(payload.len() as u64));
        out.extend(payload);
        out
    }

    fn varint_field(number: u32, value: u64) -> Vec<u8> {
        let mut out = varint(u64::from(number) << 3);
        out.extend(varint(value));
        out
    }

    fn varint(mut v: u64) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(byte);
                return out;
            }
            out.push(byte | 0x80);
        }
    }

    /// `k8s\0` + Unknown{typeMeta, raw}, as client-go writes it.
    fn envelope(api_version: &str, kind: &str, raw: &[u8]) -> Vec<u8> {
        let mut type_meta = field(1, api_version.as_bytes());
        type_meta.extend(field(2, kind.as_bytes()));
        let mut unknown = field(1, &type_meta);
        unknown.extend(field(2, raw));
        unknown.extend(field(3, b""));
        unknown.extend(field(4, b""));
        let mut out = MAGIC.to_vec();
        out.extend(unknown);
        out
    }

    #[test]
    fn a_deployment_with_every_special_encoding_decodes_like_its_json() {
        // ObjectMeta{name, creationTimestamp (zero, as Go writes it), labels map, generation 0}
        let mut labels = field(1, b"app");
        labels.extend(field(2, b"web"));
        let mut meta = field(1, b"web");
        meta.extend(field(8, &[])); // a zero Time: null in JSON
        meta.extend(varint_field(7, 0));
        meta.extend(field(11, &labels));
        // Container{name, image, ports[{containerPort 80, hostPort 0}], resources.limits{cpu: 500m}}
        let mut port = varint_field(3, 80);
        port.extend(varint_field(2, 0));
        let mut quantity_entry = field(1, b"cpu");
        quantity_entry.extend(field(2, &field(1, b"500m")));
        let resources = field(1, &quantity_entry);
        let mut container = field(1, b"web");
        container.extend(field(2, b"nginx"));
        container.extend(field(6, &port));
        container.extend(field(8, &resources));
        container.extend(varint_field(16, 0)); // stdin=false: omitted
        // PodSpec{containers, volumes[{name, emptyDir{}}]}
        let mut volume_source = field(2, &[]); // emptyDir present but empty
        volume_source = field(2, &volume_source);
        let mut volume = field(1, b"scratch");
        volume.extend(volume_source);
        let mut pod_spec = field(2, &container);
        pod_spec.extend(field(1, &volume));
        let template = field(2, &pod_spec);
        // RollingUpdate{maxUnavailable: 0 (int), maxSurge: "25%"}
        let mut max_unavailable = varint_field(1, 0);
        max_unavailable.extend(varint_field(2, 0));
        let mut max_surge = varint_field(1, 1);
        max_surge.extend(field(3, b"25%"));
        let mut rolling = field(1, &max_unavailable);
        rolling.extend(field(2, &max_surge));
        let mut strategy = field(1, b"RollingUpdate");
        strategy.extend(field(2, &rolling));
        // DeploymentSpec{replicas 0 (a pointer: kept), template, strategy}
        let mut spec = varint_field(1, 0);
        spec.extend(field(3, &template));
        spec.extend(field(4, &strategy));
        let mut deployment = field(1, &meta);
        deployment.extend(field(2, &spec));
        deployment.extend(field(3, &[])); // status: {} as Go writes it

        let decoded = decode(&envelope("apps/v1", "Deployment", &deployment)).unwrap();
        assert_eq!(
            decoded,
            json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "web", "labels": {"app": "web"}},
                "spec": {
                    "replicas": 0,
                    "strategy": {"type": "RollingUpdate",
                                 "rollingUpdate": {"maxUnavailable": 0, "maxSurge": "25%"}},
                    "template": {"spec": {
                        "volumes": [{"name": "scratch", "emptyDir": {}}],
                        "containers": [{"name": "web", "image": "nginx",
                                        "ports": [{"containerPort": 80}],
                                        "resources": {"limits": {"cpu": "500m"}}}],
                    }},
                },
                "status": {},
            })
        );
    }

    #[test]
    fn times_durations_bytes_and_raw_json_read_like_go() {
        let time = |secs: u64, nanos: u64| {
            let mut t = varint_field(1, secs);
            t.extend(varint_field(2, nanos));
            t
        };
        // Event{metadata{name, creationTimestamp}, eventTime (MicroTime), count 0}
        let mut meta = field(1, b"e1");
        meta.extend(field(8, &time(1_700_000_000, 0)));
        let mut event = field(1, &meta);
        event.extend(field(10, &time(1_700_000_000, 123_456_000)));
        let decoded = decode(&envelope("v1", "Event", &event)).unwrap();
        assert_eq!(
            decoded["metadata"]["creationTimestamp"],
            "2023-11-14T22:13:20Z"
        );
        assert_eq!(decoded["eventTime"], "2023-11-14T22:13:20.123456Z");

        // Secret{data{"k": bytes}}
        let mut entry = field(1, b"k");
        entry.extend(field(2, b"\x00\xffhi"));
        let secret = field(2, &entry);
        let decoded = decode(&envelope("v1", "Secret", &secret)).unwrap();
        assert_eq!(decoded["data"]["k"], "AP9oaQ==");

        // ControllerRevision{data: RawExtension{raw: JSON}, revision 3}
        let mut revision = field(2, &field(1, br#"{"spec":{"a":1}}"#));
        revision.extend(varint_field(3, 3));
        let decoded = decode(&envelope("apps/v1", "ControllerRevision", &revision)).unwrap();
        assert_eq!(decoded["data"], json!({"spec": {"a": 1}}));
        assert_eq!(decoded["revision"], 3);

        assert_eq!(go_duration(0), "0s");
        assert_eq!(go_duration(150_000_000), "150ms");
        assert_eq!(go_duration(3_723_500_000_000), "1h2m3.5s");
        assert_eq!(go_duration(90_000_000_000), "1m30s");
    }

    #[test]
    fn kinds_outside_the_schema_are_named_and_bad_bodies_are_not() {
        let err = decode(&envelope("example.com/v1", "Widget", &[])).unwrap_err();
        assert!(err.unsupported_kind());
        assert!(err.to_string().contains("\"Widget\""), "{err}");
        assert!(matches!(decode(b"{}"), Err(ProtobufError::NoMagic)));
        let err = decode(&envelope("v1", "ConfigMap", &[0x0a, 0x05, 1])).unwrap_err();
        assert!(!err.unsupported_kind(), "{err}");
    }

    #[test]
    fn every_kind_kubectl_and_controllers_send_is_in_the_schema() {
        let schema = schema().unwrap();
        for (api_version, kind) in [
            ("apps/v1", "Deployment"),
            ("apps/v1", "ReplicaSet"),
            ("apps/v1", "StatefulSet"),
            ("apps/v1", "DaemonSet"),
            ("v1", "Service"),
            ("v1", "Pod"),
            ("v1", "Endpoints"),
            ("discovery.k8s.io/v1", "EndpointSlice"),
            ("batch/v1", "Job"),
            ("batch/v1", "CronJob"),
            ("networking.k8s.io/v1", "Ingress"),
            ("policy/v1", "PodDisruptionBudget"),
            ("autoscaling/v2", "HorizontalPodAutoscaler"),
            ("autoscaling/v1", "Scale"),
            ("coordination.k8s.io/v1", "Lease"),
            ("v1", "ConfigMap"),
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"),
            ("authorization.k8s.io/v1", "SelfSubjectAccessReview"),
            ("apiextensions.k8s.io/v1", "CustomResourceDefinition"),
            ("v1", "DeleteOptions"),
        ] {
            assert!(
                schema.message(api_version, kind).is_some(),
                "{api_version} {kind}"
            );
        }
    }

    #[test]
    fn encoding_then_decoding_gives_the_object_back() {
        let object = json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "l", "namespace": "default", "labels": {"a": ""}},
            "spec": {"holderIdentity": "me", "leaseDurationSeconds": 0,
                     "renewTime": "2024-01-02T03:04:05.000001Z"},
        });
        assert_eq!(decode(&encode(&object).unwrap()).unwrap(), object);
    }
}
