//! Label and field selectors as the API server parses and applies them.

use serde_json::Value;

/// One requirement of a label selector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Requirement {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed label selector: all requirements must hold (comma = AND).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector(pub Vec<Requirement>);

impl LabelSelector {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut out = Vec::new();
        for part in split_top_level(text) {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            out.push(parse_requirement(part)?);
        }
        Ok(Self(out))
    }

    /// From a `metav1.LabelSelector` object (`matchLabels` + `matchExpressions`).
    pub fn from_object(selector: &Value) -> Result<Self, String> {
        let mut out = Vec::new();
        if let Some(labels) = selector["matchLabels"].as_object() {
            for (k, v) in labels {
                out.push(Requirement::Eq(
                    k.clone(),
                    v.as_str().unwrap_or_default().into(),
                ));
            }
        }
        for expr in selector["matchExpressions"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let key = expr["key"]
                .as_str()
                .ok_or("matchExpressions[].key: Required value")?
                .to_owned();
            let values: Vec<String> = expr["values"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            out.push(match expr["operator"].as_str() {
                Some("In") => Requirement::In(key, values),
                Some("NotIn") => Requirement::NotIn(key, values),
                Some("Exists") => Requirement::Exists(key),
                Some("DoesNotExist") => Requirement::NotExists(key),
                other => return Err(format!("unsupported operator {other:?}")),
            });
        }
        Ok(Self(out))
    }

    /// A map selector (`Service.spec.selector`): every pair must match.
    pub fn from_map(map: &serde_json::Map<String, Value>) -> Self {
        Self(
            map.iter()
                .map(|(k, v)| Requirement::Eq(k.clone(), v.as_str().unwrap_or_default().into()))
                .collect(),
        )
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether an object's `metadata.labels` satisfy the selector.
    pub fn matches(&self, object: &Value) -> bool {
        let labels = &object["metadata"]["labels"];
        let get = |k: &str| labels.get(k).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            Requirement::Eq(k, v) => get(k) == Some(v),
            Requirement::NotEq(k, v) => get(k) != Some(v),
            Requirement::In(k, vs) => get(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            Requirement::NotIn(k, vs) => get(k).is_none_or(|l| !vs.iter().any(|v| v == l)),
            Requirement::Exists(k) => get(k).is_some(),
            Requirement::NotExists(k) => get(k).is_none(),
        })
    }
}

/// Splits at commas outside parentheses (`a in (x,y),b`).
fn split_top_level(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

fn parse_requirement(part: &str) -> Result<Requirement, String> {
    let invalid = || format!("unable to parse requirement: {part:?}");
    if let Some(key) = part.strip_prefix('!') {
        return Ok(Requirement::NotExists(valid_key(key.trim(), part)?));
    }
    for (op, make) in [
        (
            "!=",
            Requirement::NotEq as fn(String, String) -> Requirement,
        ),
        ("==", Requirement::Eq),
        ("=", Requirement::Eq),
    ] {
        if let Some((k, v)) = part.split_once(op) {
            return Ok(make(valid_key(k.trim(), part)?, v.trim().to_owned()));
        }
    }
    let words: Vec<&str> = part.splitn(2, char::is_whitespace).collect();
    if words.len() == 1 {
        return Ok(Requirement::Exists(valid_key(words[0], part)?));
    }
    let key = valid_key(words[0], part)?;
    let rest = words[1].trim();
    let (op, values) = rest
        .split_once(char::is_whitespace)
        .or_else(|| rest.split_once('(').map(|(o, _)| (o, &rest[o.len()..])))
        .ok_or_else(invalid)?;
    let values = values.trim();
    let inner = values
        .strip_prefix('(')
        .and_then(|v| v.strip_suffix(')'))
        .ok_or_else(invalid)?;
    let values: Vec<String> = inner
        .split(',')
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .collect();
    match op.trim() {
        "in" => Ok(Requirement::In(key, values)),
        "notin" => Ok(Requirement::NotIn(key, values)),
        _ => Err(invalid()),
    }
}

fn valid_key(key: &str, part: &str) -> Result<String, String> {
    let ok = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
    if ok {
        Ok(key.to_owned())
    } else {
        Err(format!(
            "unable to parse requirement: {part:?}: invalid label key {key:?}"
        ))
    }
}

/// A parsed field selector: `key=value`, `key==value`, `key!=value`, comma = AND.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldSelector(pub Vec<(String, bool, String)>);

impl FieldSelector {
    /// Parses and checks every field against those `kind` supports; an unknown one is the
    /// API server's 400 message.
    pub fn parse(text: &str, kind: &str) -> Result<Self, String> {
        let mut out = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, equal, value) = if let Some((k, v)) = part.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = part.split_once("==") {
                (k, true, v)
            } else if let Some((k, v)) = part.split_once('=') {
                (k, true, v)
            } else {
                return Err(format!(
                    "invalid selector: '{text}'; can't understand '{part}'"
                ));
            };
            let key = key.trim();
            if !supported_fields(kind).contains(&key) {
                return Err(format!(
                    "\"{key}\" is not a known field selector: only \"{}\"",
                    supported_fields(kind).join("\", \"")
                ));
            }
            out.push((key.to_owned(), equal, value.trim().to_owned()));
        }
        Ok(Self(out))
    }

    pub fn matches(&self, object: &Value) -> bool {
        self.0
            .iter()
            .all(|(key, equal, value)| (field_value(object, key) == *value) == *equal)
    }
}

/// The fields a kind can be selected by (`metadata.name` and `metadata.namespace` always).
fn supported_fields(kind: &str) -> Vec<&'static str> {
    let mut fields = vec!["metadata.name", "metadata.namespace"];
    fields.extend(match kind {
        "Pod" => &[
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ][..],
        "Event" => &[
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
        ][..],
        "Secret" => &["type"][..],
        "Namespace" => &["status.phase"][..],
        "Node" => &["spec.unschedulable"][..],
        "ReplicaSet" => &["status.replicas"][..],
        _ => &[][..],
    });
    fields
}

/// A field's value as a selector compares it: strings as they are, booleans and numbers
/// printed, absent as empty (`false` for booleans the API defaults).
fn field_value(object: &Value, path: &str) -> String {
    let mut v = object;
    for part in path.split('.') {
        v = &v[part];
    }
    match v {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::Null if path == "spec.hostNetwork" || path == "spec.unschedulable" => "false".into(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn obj(labels: Value) -> Value {
        json!({"metadata": {"name": "x", "namespace": "ns", "labels": labels}})
    }

    #[test]
    fn parses_every_operator() {
        let s = LabelSelector::parse("a=1,b==2,c!=3,d in (x, y),e notin (z),f,!g").unwrap();
        assert_eq!(s.0.len(), 7);
        assert_eq!(
            s.0[3],
            Requirement::In("d".into(), vec!["x".into(), "y".into()])
        );
        assert_eq!(s.0[6], Requirement::NotExists("g".into()));
        let hit = obj(json!({"a": "1", "b": "2", "c": "0", "d": "y", "f": ""}));
        assert!(s.matches(&hit));
        let miss = obj(json!({"a": "1", "b": "2", "c": "0", "d": "y", "f": "", "g": "1"}));
        assert!(!s.matches(&miss));
    }

    #[test]
    fn negations_match_objects_without_the_key() {
        assert!(
            LabelSelector::parse("a!=1")
                .unwrap()
                .matches(&obj(json!({})))
        );
        assert!(
            LabelSelector::parse("a notin (1)")
                .unwrap()
                .matches(&obj(json!({})))
        );
        assert!(
            !LabelSelector::parse("a in (1)")
                .unwrap()
                .matches(&obj(json!({})))
        );
    }

    #[test]
    fn empty_selector_matches_everything_and_bad_ones_fail() {
        assert!(LabelSelector::parse("").unwrap().matches(&obj(json!({}))));
        assert!(LabelSelector::parse("a in 1").is_err());
        assert!(LabelSelector::parse("a b c").is_err());
    }

    #[test]
    fn object_selector_with_expressions() {
        let s = LabelSelector::from_object(&json!({"matchLabels": {"app": "web"},
            "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]}]}))
        .unwrap();
        assert!(s.matches(&obj(json!({"app": "web", "tier": "b"}))));
        assert!(!s.matches(&obj(json!({"app": "web"}))));
    }

    #[test]
    fn field_selectors_check_supported_fields() {
        let pod = json!({"metadata": {"name": "p", "namespace": "d"}, "spec": {"nodeName": "n1"},
                         "status": {"phase": "Running"}});
        let s = FieldSelector::parse("spec.nodeName=n1,status.phase!=Pending", "Pod").unwrap();
        assert!(s.matches(&pod));
        assert!(
            FieldSelector::parse("spec.hostNetwork=false", "Pod")
                .unwrap()
                .matches(&pod)
        );
        let err = FieldSelector::parse("foo.bar=1", "ConfigMap").unwrap_err();
        assert_eq!(
            err,
            r#""foo.bar" is not a known field selector: only "metadata.name", "metadata.namespace""#
        );
    }
}
