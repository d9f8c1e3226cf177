//! Discovery: `/version`, `/api`, `/apis`, each group's resource list and the OpenAPI v3
//! documents kubectl reads before it validates or patches.

use axum::{
    http::StatusCode,
    response::{IntoResponse as _, Response},
};
use serde_json::{Value, json};

use super::{Route, errors::ApiError, json_response, resources::ResourceType, store::Store};

/// Answers a discovery route (every route but an object's).
pub(super) fn serve(store: &Store, route: Route) -> Result<Response, ApiError> {
    match route {
        Route::Version => Ok(json_response(200, &version())),
        Route::OpenApiIndex => Ok(json_response(200, &openapi_index(store))),
        Route::OpenApi(g, v) => openapi_document(store, &g, &v).map(|d| json_response(200, &d)),
        Route::Health => Ok((StatusCode::OK, "ok").into_response()),
        Route::CoreVersions => Ok(json_response(
            200,
            &json!({
            "kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}]}),
        )),
        Route::Groups => Ok(json_response(200, &group_list(store))),
        Route::Group(g) => {
            let groups = group_list(store);
            let group = groups["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|x| x["name"] == g.as_str())
                .cloned();
            match group {
                Some(mut group) => {
                    group["kind"] = json!("APIGroup");
                    group["apiVersion"] = json!("v1");
                    Ok(json_response(200, &group))
                }
                None => Err(ApiError::no_route()),
            }
        }
        Route::Resources(g, v) => resource_list(store, &g, &v).map(|b| json_response(200, &b)),
        Route::Object { .. } => Err(ApiError::no_route()),
    }
}

fn version() -> Value {
    json!({
        "major": "1", "minor": "33", "gitVersion": "v1.33.0-kt-testbed",
        "gitCommit": "0000000000000000000000000000000000000000", "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.24.0", "compiler": "gc",
        "platform": "linux/amd64",
    })
}

/// `/openapi/v3`: one document per group/version, with a hash that changes when the set of
/// types does (kubectl caches documents by it).
fn openapi_index(store: &Store) -> Value {
    let mut paths = serde_json::Map::new();
    for (group, versions) in store.registry.groups() {
        for version in versions {
            let path = if group.is_empty() {
                format!("api/{version}")
            } else {
                format!("apis/{group}/{version}")
            };
            // The schemas of a group/version never change: the paths stand for the document.
            let doc = openapi_document(store, &group, &version).unwrap_or_default();
            let hash = format!("{:016X}", fnv1a(doc["paths"].to_string().as_bytes()));
            paths.insert(
                path.clone(),
                json!({"serverRelativeURL": format!("/openapi/v3/{path}?hash={hash}")}),
            );
        }
    }
    json!({"paths": paths})
}

/// An OpenAPI v3 document for one group/version: each resource's item path with a PATCH
/// operation tagged with its group/version/kind and the query parameters the server
/// honours (kubectl sees that the server validates fields itself: `fieldValidation`), and
/// the release's schemas for `kubectl explain` (`openapi.rs`). The operations name no
/// request media types, so kubectl keeps building strategic patches from its own types.
fn openapi_document(store: &Store, group: &str, version: &str) -> Result<Value, ApiError> {
    let types: Vec<ResourceType> = store
        .registry
        .all()
        .into_iter()
        .filter(|t| t.group == group && t.version == version && !t.review)
        .collect();
    if types.is_empty() {
        return Err(ApiError::no_route());
    }
    let prefix = if group.is_empty() {
        format!("/api/{version}")
    } else {
        format!("/apis/{group}/{version}")
    };
    let query = |name: &str| json!({"name": name, "in": "query", "schema": {"type": "string", "uniqueItems": true}});
    let mut paths = serde_json::Map::new();
    for t in types {
        let item = if t.namespaced {
            format!("{prefix}/namespaces/{{namespace}}/{}/{{name}}", t.plural)
        } else {
            format!("{prefix}/{}/{{name}}", t.plural)
        };
        let gvk = json!({"group": t.group, "version": t.version, "kind": t.kind});
        let op = |action: &str| {
            json!({
                "operationId": format!("{action}{}", t.kind),
                "x-kubernetes-action": action,
                "x-kubernetes-group-version-kind": gvk,
                "parameters": [query("dryRun"), query("fieldManager"), query("fieldValidation")],
                "responses": {"200": {"description": "OK"}},
            })
        };
        paths.insert(item, json!({"patch": op("patch"), "put": op("put")}));
    }
    Ok(
        json!({"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.33.0"}, "paths": paths, "components": {"schemas": super::openapi::components(group, version)}}),
    )
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn group_list(store: &Store) -> Value {
    let groups: Vec<Value> = store
        .registry
        .groups()
        .into_iter()
        .filter(|(g, _)| !g.is_empty())
        .map(|(name, versions)| {
            let versions: Vec<Value> = versions
                .iter()
                .map(|v| json!({"groupVersion": format!("{name}/{v}"), "version": v}))
                .collect();
            json!({"name": name, "versions": versions, "preferredVersion": versions[0]})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn resource_list(store: &Store, group: &str, version: &str) -> Result<Value, ApiError> {
    let resources: Vec<Value> = store
        .registry
        .all()
        .iter()
        .filter(|t| t.group == group && t.version == version)
        .flat_map(ResourceType::discovery)
        .collect();
    if resources.is_empty() {
        return Err(ApiError::no_route());
    }
    let gv = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    Ok(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
    )
}
