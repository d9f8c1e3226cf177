//! The resource types the stand-in serves: built-ins, plus those defined by
//! CustomResourceDefinitions at run time.

use std::sync::RwLock;

use serde_json::{Value, json};

/// One served resource (one group/version/plural).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceType {
    pub group: String,
    pub version: String,
    pub plural: String,
    pub singular: String,
    pub kind: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    /// Has a `status` subresource: the main resource ignores status writes.
    pub status: bool,
    /// Has a `scale` subresource (`spec.replicas`).
    pub scale: bool,
    /// Other subresources (`portforward`, `exec`, `log`).
    pub extra_subresources: Vec<&'static str>,
    /// Built into Kubernetes: strategic merge patch is available.
    pub builtin: bool,
    /// Create-only review types whose answer is computed, never stored.
    pub review: bool,
    /// Discovery categories (`all`: what `kubectl get all` lists).
    pub categories: Vec<String>,
    /// A custom resource's structural schema (its version's `openAPIV3Schema`): fields it
    /// does not name are pruned from every write ([`prune`]).
    pub schema: Option<std::sync::Arc<Value>>,
}

impl ResourceType {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `pods`, `deployments.apps`: how errors and RBAC name it.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }

    pub fn verbs(&self) -> Vec<&'static str> {
        if self.review {
            vec!["create"]
        } else {
            vec![
                "create",
                "delete",
                "deletecollection",
                "get",
                "list",
                "patch",
                "update",
                "watch",
            ]
        }
    }

    /// Entries for this resource in an `APIResourceList`.
    pub fn discovery(&self) -> Vec<Value> {
        let mut out = vec![json!({
            "name": self.plural,
            "singularName": self.singular,
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": self.verbs(),
            "shortNames": self.short_names,
            "categories": self.categories,
            "storageVersionHash": "",
        })];
        let mut sub = |name: &str, kind: &str, group: Option<&str>, verbs: &[&str]| {
            let mut entry = json!({
                "name": format!("{}/{}", self.plural, name),
                "singularName": "",
                "namespaced": self.namespaced,
                "kind": kind,
                "verbs": verbs,
            });
            if let Some(group) = group {
                entry["group"] = json!(group);
                entry["version"] = json!("v1");
            }
            out.push(entry);
        };
        if self.status {
            sub("status", &self.kind, None, &["get", "patch", "update"]);
        }
        if self.scale {
            sub(
                "scale",
                "Scale",
                Some("autoscaling"),
                &["get", "patch", "update"],
            );
        }
        for extra in &self.extra_subresources {
            match *extra {
                "log" => sub("log", "Pod", None, &["get"]),
                "ephemeralcontainers" => {
                    sub(
                        "ephemeralcontainers",
                        "Pod",
                        None,
                        &["get", "patch", "update"],
                    );
                }
                other => sub(other, "PodPortForwardOptions", None, &["create", "get"]),
            }
        }
        out
    }
}

#[derive(Clone, Copy)]
struct Builtin {
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
    short: &'static [&'static str],
    status: bool,
    scale: bool,
    extra: &'static [&'static str],
    review: bool,
    categories: &'static [&'static str],
}

const fn b(
    group: &'static str,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
) -> Builtin {
    Builtin {
        group,
        version: "v1",
        plural,
        kind,
        namespaced,
        short: &[],
        status: false,
        scale: false,
        extra: &[],
        review: false,
        categories: &[],
    }
}

/// What `kubectl get all` lists, as a cluster's discovery says.
const ALL: &[&str] = &["all"];

const BUILTINS: &[Builtin] = &[
    Builtin {
        short: &["ns"],
        status: true,
        ..b("", "namespaces", "Namespace", false)
    },
    Builtin {
        short: &["no"],
        status: true,
        ..b("", "nodes", "Node", false)
    },
    Builtin {
        short: &["po"],
        status: true,
        extra: &["portforward", "exec", "log", "ephemeralcontainers"],
        categories: ALL,
        ..b("", "pods", "Pod", true)
    },
    Builtin {
        short: &["svc"],
        status: true,
        categories: ALL,
        ..b("", "services", "Service", true)
    },
    Builtin {
        short: &["ep"],
        ..b("", "endpoints", "Endpoints", true)
    },
    Builtin {
        short: &["cm"],
        ..b("", "configmaps", "ConfigMap", true)
    },
    b("", "secrets", "Secret", true),
    Builtin {
        short: &["sa"],
        ..b("", "serviceaccounts", "ServiceAccount", true)
    },
    Builtin {
        short: &["ev"],
        ..b("", "events", "Event", true)
    },
    Builtin {
        short: &["deploy"],
        status: true,
        scale: true,
        categories: ALL,
        ..b("apps", "deployments", "Deployment", true)
    },
    Builtin {
        short: &["rs"],
        status: true,
        scale: true,
        categories: ALL,
        ..b("apps", "replicasets", "ReplicaSet", true)
    },
    Builtin {
        short: &["ds"],
        status: true,
        categories: ALL,
        ..b("apps", "daemonsets", "DaemonSet", true)
    },
    Builtin {
        short: &["sts"],
        status: true,
        scale: true,
        categories: ALL,
        ..b("apps", "statefulsets", "StatefulSet", true)
    },
    b("apps", "controllerrevisions", "ControllerRevision", true),
    Builtin {
        status: true,
        categories: ALL,
        ..b("batch", "jobs", "Job", true)
    },
    Builtin {
        short: &["cj"],
        status: true,
        categories: ALL,
        ..b("batch", "cronjobs", "CronJob", true)
    },
    Builtin {
        short: &["hpa"],
        status: true,
        categories: ALL,
        version: "v2",
        ..b(
            "autoscaling",
            "horizontalpodautoscalers",
            "HorizontalPodAutoscaler",
            true,
        )
    },
    Builtin {
        short: &["pdb"],
        status: true,
        ..b(
            "policy",
            "poddisruptionbudgets",
            "PodDisruptionBudget",
            true,
        )
    },
    Builtin {
        short: &["ing"],
        status: true,
        ..b("networking.k8s.io", "ingresses", "Ingress", true)
    },
    b("networking.k8s.io", "ingressclasses", "IngressClass", false),
    b("discovery.k8s.io", "endpointslices", "EndpointSlice", true),
    b("coordination.k8s.io", "leases", "Lease", true),
    Builtin {
        short: &["crd", "crds"],
        status: true,
        ..b(
            "apiextensions.k8s.io",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            false,
        )
    },
    b("rbac.authorization.k8s.io", "roles", "Role", true),
    b(
        "rbac.authorization.k8s.io",
        "rolebindings",
        "RoleBinding",
        true,
    ),
    b(
        "rbac.authorization.k8s.io",
        "clusterroles",
        "ClusterRole",
        false,
    ),
    b(
        "rbac.authorization.k8s.io",
        "clusterrolebindings",
        "ClusterRoleBinding",
        false,
    ),
    Builtin {
        review: true,
        ..b(
            "authorization.k8s.io",
            "selfsubjectaccessreviews",
            "SelfSubjectAccessReview",
            false,
        )
    },
    Builtin {
        review: true,
        ..b(
            "authorization.k8s.io",
            "selfsubjectrulesreviews",
            "SelfSubjectRulesReview",
            false,
        )
    },
];

/// All served types; CRDs add and remove theirs.
#[derive(Debug)]
pub struct Registry {
    types: RwLock<Vec<ResourceType>>,
}

impl Default for Registry {
    fn default() -> Self {
        let types = BUILTINS
            .iter()
            .map(|b| ResourceType {
                group: b.group.into(),
                version: b.version.into(),
                plural: b.plural.into(),
                singular: b.kind.to_lowercase(),
                kind: b.kind.into(),
                namespaced: b.namespaced,
                short_names: b.short.iter().map(|s| s.to_string()).collect(),
                status: b.status,
                scale: b.scale,
                extra_subresources: b.extra.to_vec(),
                schema: None,
                builtin: true,
                review: b.review,
                categories: b.categories.iter().map(|c| c.to_string()).collect(),
            })
            .collect();
        Self {
            types: RwLock::new(types),
        }
    }
}

impl Registry {
    /// The type served at `group/version/plural`.
    pub fn find(&self, group: &str, version: &str, plural: &str) -> Option<ResourceType> {
        self.read()
            .iter()
            .find(|t| t.group == group && t.version == version && t.plural == plural)
            .cloned()
    }

    /// The type stored as `group/plural`, whatever version serves it (built-ins have one).
    pub fn find_plural(&self, group: &str, plural: &str) -> Option<ResourceType> {
        self.read()
            .iter()
            .find(|t| t.group == group && t.plural == plural)
            .cloned()
    }

    /// The type of a `kind` in an `apiVersion` (for ownerReferences, RBAC subjects).
    pub fn find_kind(&self, api_version: &str, kind: &str) -> Option<ResourceType> {
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        self.read()
            .iter()
            .find(|t| t.group == group && t.version == version && t.kind == kind)
            .cloned()
    }

    /// Every type, in registration order.
    pub fn all(&self) -> Vec<ResourceType> {
        self.read().clone()
    }

    /// `(group, [versions])` in registration order, core group first.
    pub fn groups(&self) -> Vec<(String, Vec<String>)> {
        let mut out: Vec<(String, Vec<String>)> = Vec::new();
        for t in self.read().iter() {
            match out.iter_mut().find(|(g, _)| *g == t.group) {
                Some((_, versions)) if !versions.contains(&t.version) => {
                    versions.push(t.version.clone())
                }
                Some(_) => {}
                None => out.push((t.group.clone(), vec![t.version.clone()])),
            }
        }
        out
    }

    /// Starts serving the versions of a CRD (idempotent; replaces an older definition).
    pub fn add_crd(&self, crd: &Value) -> Result<(), String> {
        let types = crd_types(crd)?;
        let mut all = self.write();
        let group = types.first().map(|t| (t.group.clone(), t.plural.clone()));
        if let Some((group, plural)) = group {
            all.retain(|t| !(t.group == group && t.plural == plural));
        }
        all.extend(types);
        Ok(())
    }

    /// Stops serving a CRD's resources.
    pub fn remove_crd(&self, crd: &Value) {
        let group = crd["spec"]["group"].as_str().unwrap_or_default();
        let plural = crd["spec"]["names"]["plural"].as_str().unwrap_or_default();
        self.write()
            .retain(|t| t.builtin || !(t.group == group && t.plural == plural));
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<ResourceType>> {
        self.types.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<ResourceType>> {
        self.types.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// Drops from `object`, a custom resource being written, every field its structural schema
/// does not name, as the API server prunes (Kubernetes docs, Custom Resources → "Field
/// pruning"): below an object schema only its `properties` stay (each pruned by its own
/// schema), under `additionalProperties` every value is pruned by that schema, array items
/// by `items`; `x-kubernetes-preserve-unknown-fields: true` keeps what is unknown there.
/// `apiVersion`, `kind` and `metadata` at the root always stay. Built-in types have no
/// schema here and are left as they are.
pub fn prune(rt: &ResourceType, object: &mut Value) {
    if let Some(schema) = &rt.schema {
        prune_value(object, schema, true);
    }
}

fn prune_value(value: &mut Value, schema: &Value, root: bool) {
    let preserve = schema["x-kubernetes-preserve-unknown-fields"] == true;
    match value {
        Value::Object(map) => {
            let properties = schema["properties"].as_object();
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            if let Some(additional) = additional {
                for v in map.values_mut() {
                    prune_value(v, additional, false);
                }
                return;
            }
            if !preserve {
                map.retain(|key, _| {
                    properties.is_some_and(|p| p.contains_key(key))
                        || (root && matches!(key.as_str(), "apiVersion" | "kind" | "metadata"))
                });
            }
            for (key, v) in map.iter_mut() {
                if let Some(property) = properties.and_then(|p| p.get(key)) {
                    prune_value(v, property, false);
                }
            }
        }
        Value::Array(items) => {
            if let Some(item) = schema.get("items").filter(|i| i.is_object()) {
                for v in items {
                    prune_value(v, item, false);
                }
            }
        }
        _ => {}
    }
}

/// The served versions of a CustomResourceDefinition.
pub fn crd_types(crd: &Value) -> Result<Vec<ResourceType>, String> {
    let spec = &crd["spec"];
    let group = spec["group"].as_str().ok_or("spec.group: Required value")?;
    let names = &spec["names"];
    let plural = names["plural"]
        .as_str()
        .ok_or("spec.names.plural: Required value")?;
    let kind = names["kind"]
        .as_str()
        .ok_or("spec.names.kind: Required value")?;
    let expected_name = format!("{plural}.{group}");
    if crd["metadata"]["name"].as_str() != Some(&expected_name) {
        return Err(format!(
            "metadata.name: Invalid value: must be spec.names.plural+\".\"+spec.group ({expected_name})"
        ));
    }
    let namespaced = match spec["scope"].as_str() {
        Some("Namespaced") => true,
        Some("Cluster") => false,
        _ => return Err("spec.scope: Unsupported value: must be Namespaced or Cluster".into()),
    };
    let versions = spec["versions"]
        .as_array()
        .ok_or("spec.versions: Required value")?;
    let mut out = Vec::new();
    for version in versions {
        if version["served"].as_bool() == Some(false) {
            continue;
        }
        let name = version["name"]
            .as_str()
            .ok_or("spec.versions[].name: Required value")?;
        out.push(ResourceType {
            group: group.into(),
            version: name.into(),
            plural: plural.into(),
            singular: names["singular"]
                .as_str()
                .map(String::from)
                .unwrap_or_else(|| kind.to_lowercase()),
            kind: kind.into(),
            namespaced,
            short_names: names["shortNames"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default(),
            status: version["subresources"]["status"].is_object(),
            scale: version["subresources"]["scale"].is_object(),
            schema: version["schema"]["openAPIV3Schema"]
                .is_object()
                .then(|| std::sync::Arc::new(version["schema"]["openAPIV3Schema"].clone())),
            extra_subresources: vec![],
            builtin: false,
            review: false,
            categories: names["categories"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default(),
        });
    }
    if out.is_empty() {
        return Err("spec.versions: Invalid value: must have at least one served version".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_custom_resource_is_pruned_to_its_schema() {
        let crd = json!({
            "metadata": {"name": "ktsessions.kt.dev"},
            "spec": {"group": "kt.dev", "scope": "Namespaced",
                     "names": {"plural": "ktsessions", "kind": "KtSession"},
                     "versions": [{"name": "v1alpha1", "served": true, "subresources": {"status": {}},
                       "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                         "spec": {"type": "object", "properties": {
                            "ports": {"type": "array", "items": {"type": "object",
                                      "properties": {"port": {"type": "integer"}}}}}},
                         "status": {"type": "object", "properties": {
                            "programmed": {"type": "object", "additionalProperties": {
                                "type": "object", "properties": {"holder": {"type": "string"}}}},
                            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}}}}}]}
        });
        let rt = crd_types(&crd).unwrap().remove(0);
        let mut object = json!({
            "apiVersion": "kt.dev/v1alpha1", "kind": "KtSession",
            "metadata": {"name": "s", "labels": {"a": "b"}},
            "spec": {"ports": [{"port": 80, "protocol": "UDP"}], "udpPorts": [{"port": 53}]},
            "status": {"programmed": {"node-1": {"holder": "h", "udpPorts": [53]}},
                       "free": {"anything": 1}},
            "extra": true
        });
        prune(&rt, &mut object);
        assert_eq!(
            object,
            json!({
                "apiVersion": "kt.dev/v1alpha1", "kind": "KtSession",
                "metadata": {"name": "s", "labels": {"a": "b"}},
                "spec": {"ports": [{"port": 80}]},
                "status": {"programmed": {"node-1": {"holder": "h"}}, "free": {"anything": 1}}
            })
        );
        let pods = Registry::default().find("", "v1", "pods").unwrap();
        let mut pod = json!({"spec": {"whatever": 1}});
        prune(&pods, &mut pod);
        assert_eq!(
            pod,
            json!({"spec": {"whatever": 1}}),
            "built-ins are not pruned here"
        );
    }

    #[test]
    fn builtins_are_found_by_group_version_plural() {
        let r = Registry::default();
        let pods = r.find("", "v1", "pods").unwrap();
        assert!(pods.namespaced && pods.status && pods.builtin);
        assert_eq!(pods.api_version(), "v1");
        let deploy = r.find("apps", "v1", "deployments").unwrap();
        assert!(deploy.scale);
        assert_eq!(deploy.qualified(), "deployments.apps");
        assert!(r.find("apps", "v1", "pods").is_none());
        assert_eq!(
            r.find_kind("apps/v1", "ReplicaSet").unwrap().plural,
            "replicasets"
        );
    }

    #[test]
    fn crds_add_and_remove_types() {
        let r = Registry::default();
        let crd = json!({
            "metadata": {"name": "sessions.kt.dev"},
            "spec": {"group": "kt.dev", "scope": "Namespaced",
                     "names": {"plural": "sessions", "kind": "Session", "shortNames": ["kts"]},
                     "versions": [{"name": "v1alpha1", "served": true, "storage": true,
                                   "subresources": {"status": {}}},
                                  {"name": "v0", "served": false, "storage": false}]}
        });
        r.add_crd(&crd).unwrap();
        let t = r.find("kt.dev", "v1alpha1", "sessions").unwrap();
        assert!(t.status && !t.builtin && t.namespaced);
        assert!(r.find("kt.dev", "v0", "sessions").is_none());
        assert!(
            r.groups()
                .iter()
                .any(|(g, v)| g == "kt.dev" && v == &["v1alpha1"])
        );
        r.remove_crd(&crd);
        assert!(r.find("kt.dev", "v1alpha1", "sessions").is_none());
    }

    #[test]
    fn crd_name_must_match_plural_and_group() {
        let crd = json!({"metadata": {"name": "x"}, "spec": {"group": "g.io", "scope": "Cluster",
            "names": {"plural": "ps", "kind": "P"}, "versions": [{"name": "v1", "served": true}]}});
        assert!(crd_types(&crd).unwrap_err().contains("ps.g.io"));
    }
}
