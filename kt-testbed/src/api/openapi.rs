//! The schemas of the OpenAPI v3 documents (`/openapi/v3/apis/{group}/{version}`), what
//! `kubectl explain` reads: those of the Kubernetes release k8s-openapi is built for
//! (1.33), from k8s-openapi's own `JsonSchema` implementations (feature `schemars`), which
//! it generates from that release's published OpenAPI specification, descriptions
//! included. Shaped as the published documents are: definitions under
//! `components/schemas` named `io.k8s.…`, references wrapped in `allOf`, and
//! `x-kubernetes-group-version-kind` on every kind the group/version serves.

use std::{collections::HashMap, sync::LazyLock};

use k8s_openapi::{
    Resource,
    api::{
        apps::v1 as apps, authorization::v1 as authorization, autoscaling::v2 as autoscaling,
        batch::v1 as batch, coordination::v1 as coordination, core::v1 as core,
        discovery::v1 as discovery, networking::v1 as networking, policy::v1 as policy,
        rbac::v1 as rbac,
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1 as apiextensions,
    schemars::{
        JsonSchema, Schema,
        generate::{SchemaGenerator, SchemaSettings},
    },
};
use serde_json::{Map, Value, json};

/// A served kind and how to generate its schema.
struct Kind {
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    schema: fn(&mut SchemaGenerator) -> Schema,
}

fn kind<T: Resource + JsonSchema>() -> Kind {
    Kind {
        group: T::GROUP,
        version: T::VERSION,
        kind: T::KIND,
        schema: |generator| generator.subschema_for::<T>(),
    }
}

/// The built-in kinds the API server serves (`resources.rs`).
fn kinds() -> Vec<Kind> {
    vec![
        kind::<core::Namespace>(),
        kind::<core::Node>(),
        kind::<core::Pod>(),
        kind::<core::Service>(),
        kind::<core::Endpoints>(),
        kind::<core::ConfigMap>(),
        kind::<core::Secret>(),
        kind::<core::ServiceAccount>(),
        kind::<core::Event>(),
        kind::<apps::Deployment>(),
        kind::<apps::ReplicaSet>(),
        kind::<apps::DaemonSet>(),
        kind::<apps::StatefulSet>(),
        kind::<apps::ControllerRevision>(),
        kind::<batch::Job>(),
        kind::<batch::CronJob>(),
        kind::<autoscaling::HorizontalPodAutoscaler>(),
        kind::<policy::PodDisruptionBudget>(),
        kind::<networking::Ingress>(),
        kind::<networking::IngressClass>(),
        kind::<discovery::EndpointSlice>(),
        kind::<coordination::Lease>(),
        kind::<apiextensions::CustomResourceDefinition>(),
        kind::<rbac::Role>(),
        kind::<rbac::RoleBinding>(),
        kind::<rbac::ClusterRole>(),
        kind::<rbac::ClusterRoleBinding>(),
        kind::<authorization::SelfSubjectAccessReview>(),
        kind::<authorization::SelfSubjectRulesReview>(),
    ]
}

/// `components.schemas` of each built-in group/version, made once.
static SCHEMAS: LazyLock<HashMap<(String, String), Value>> = LazyLock::new(|| {
    let mut by_group_version: HashMap<(String, String), Vec<Kind>> = HashMap::new();
    for kind in kinds() {
        by_group_version
            .entry((kind.group.to_owned(), kind.version.to_owned()))
            .or_default()
            .push(kind);
    }
    by_group_version
        .into_iter()
        .map(|(gv, kinds)| (gv, schemas(&kinds)))
        .collect()
});

/// The schemas of a built-in group/version (an empty object for others, such as CRDs').
pub(super) fn components(group: &str, version: &str) -> Value {
    SCHEMAS
        .get(&(group.to_owned(), version.to_owned()))
        .cloned()
        .unwrap_or_else(|| json!({}))
}

fn schemas(kinds: &[Kind]) -> Value {
    let mut generator = SchemaGenerator::new(SchemaSettings::openapi3());
    let mut names = Vec::new();
    for kind in kinds {
        let reference = (kind.schema)(&mut generator);
        let name = reference
            .get("$ref")
            .and_then(Value::as_str)
            .and_then(|r| r.rsplit('/').next())
            .map(str::to_owned);
        names.push((name, kind));
    }
    let mut definitions: Map<String, Value> = generator.take_definitions(true);
    for (name, kind) in names {
        if let Some(Value::Object(schema)) = name.and_then(|n| definitions.get_mut(&n)) {
            schema.insert(
                "x-kubernetes-group-version-kind".into(),
                json!([{"group": kind.group, "version": kind.version, "kind": kind.kind}]),
            );
        }
    }
    definitions.values_mut().for_each(wrap_references);
    Value::Object(definitions)
}

/// `{"$ref": r}` → `{"allOf": [{"$ref": r}]}` in every schema, as the published documents
/// have every reference (kubectl explain reads them so).
fn wrap_references(schema: &mut Value) {
    let Value::Object(map) = schema else {
        return;
    };
    if let Some(reference) = map.remove("$ref") {
        map.insert("allOf".into(), json!([{"$ref": reference}]));
    }
    for (keyword, child) in map.iter_mut() {
        match keyword.as_str() {
            // Maps of names to schemas (a property may be called `$ref`).
            "properties" | "patternProperties" | "definitions" | "$defs" => {
                if let Value::Object(named) = child {
                    named.values_mut().for_each(wrap_references);
                }
            }
            "items" | "additionalProperties" | "additionalItems" | "not" => {
                wrap_references(child);
            }
            "anyOf" | "oneOf" => {
                if let Value::Array(schemas) = child {
                    schemas.iter_mut().for_each(wrap_references);
                }
            }
            // `allOf` holds the references themselves; the rest are values, not schemas.
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deployments_have_their_published_schema() {
        let schemas = components("apps", "v1");
        let deployment = &schemas["io.k8s.api.apps.v1.Deployment"];
        assert_eq!(
            deployment["x-kubernetes-group-version-kind"],
            json!([{"group": "apps", "version": "v1", "kind": "Deployment"}])
        );
        assert!(
            deployment["description"]
                .as_str()
                .unwrap()
                .contains("declarative updates")
        );
        assert_eq!(
            deployment["properties"]["spec"]["allOf"][0]["$ref"],
            "#/components/schemas/io.k8s.api.apps.v1.DeploymentSpec"
        );
        let spec = &schemas["io.k8s.api.apps.v1.DeploymentSpec"];
        assert_eq!(spec["properties"]["replicas"]["type"], "integer");
        // Referenced types come along; kinds of other groups are not tagged here.
        let pod_spec = &schemas["io.k8s.api.core.v1.PodSpec"];
        assert!(pod_spec["properties"]["containers"].is_object());
        assert!(schemas["io.k8s.api.core.v1.Pod"].is_null());
        assert_eq!(components("example.com", "v1"), json!({}));
        // A property named `$ref` is a property, not a reference.
        let props = &components("apiextensions.k8s.io", "v1")["io.k8s.apiextensions-apiserver.pkg.apis.apiextensions.v1.JSONSchemaProps"]
            ["properties"];
        assert_eq!(props["$ref"], json!({"type": "string"}));
    }
}
