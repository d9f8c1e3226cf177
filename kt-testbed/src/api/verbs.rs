//! The verbs on a collection or an object: list, watch, create, delete a collection, get,
//! update, patch, delete; and the access reviews, which are created only.

use std::{convert::Infallible, sync::Arc, time::Duration};

use axum::{
    body::{Body, Bytes},
    extract::Request,
    http::{HeaderValue, header},
    response::Response,
};
use futures::StreamExt as _;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{
    ApiServer, Query, Target,
    auth::{self, Attributes, UserInfo},
    content_type,
    errors::ApiError,
    json_response,
    patch::{self, PatchError},
    read_body, read_json,
    resources::ResourceType,
    selector::{FieldSelector, LabelSelector},
    store::{DeleteOptions, ListQuery, ListResult, Part, Store, WatchFilter, WatchStart},
    streams,
};

/// `GET` a collection: a list, or a server-side table for kubectl.
pub(super) fn list(api: &ApiServer, t: &Target) -> Result<Response, ApiError> {
    let list = selected(api, t)?;
    let mut meta = json!({"resourceVersion": list.rev.to_string()});
    if let Some(token) = list.continue_token {
        meta["continue"] = json!(token);
        meta["remainingItemCount"] = json!(list.remaining.unwrap_or(0));
    }
    if t.table {
        return Ok(json_response(
            200,
            &streams::table(&t.rt, &list.items, meta),
        ));
    }
    Ok(json_response(
        200,
        &json!({"kind": t.rt.list_kind(), "apiVersion": t.rt.api_version(), "metadata": meta, "items": list.items}),
    ))
}

/// The objects of a collection the request's selectors and paging select.
fn selected(api: &ApiServer, t: &Target) -> Result<ListResult, ApiError> {
    let query = list_query(&t.rt, &t.q)?;
    api.store.list(&t.rt, t.ns.as_deref(), &query)
}

/// `POST` to a collection.
pub(super) async fn create(
    api: &ApiServer,
    t: &Target,
    req: Request,
) -> Result<Response, ApiError> {
    let mut body = read_json(api, req).await?;
    drop_status_on_create(&t.rt, &mut body);
    super::resources::prune(&t.rt, &mut body);
    let created = api
        .store
        .create(&t.rt, t.namespace(), body, t.q.dry_run())?;
    Ok(json_response(201, &created))
}

/// A create through the API cannot set `status` on a resource with the status subresource:
/// the API server's `PrepareForCreate` strategies drop it (custom resources: "PUT/POST/PATCH
/// requests to the custom resource ignore changes to the status stanza", Kubernetes docs,
/// Custom Resources → Status subresource; Pods, Services, Deployments … reset it to their
/// initial status, which [`super::admission::default_on_create`] then fills in). Nodes are
/// the exception ("Nodes allow *all* fields, including status, to be set on create",
/// `pkg/registry/core/node/strategy.go`): the kubelet registers its Node with its status.
/// The testbed's own controllers write through the store and are not subject to this.
pub(super) fn drop_status_on_create(rt: &ResourceType, body: &mut Value) {
    let node = rt.group.is_empty() && rt.plural == "nodes";
    if rt.status
        && !node
        && let Some(object) = body.as_object_mut()
    {
        object.remove("status");
    }
}

/// `DELETE` a collection: every object the selectors match.
pub(super) fn delete_collection(api: &ApiServer, t: &Target) -> Result<Response, ApiError> {
    let list = selected(api, t)?;
    let opts = delete_options(&t.q, None);
    let mut deleted = Vec::new();
    for item in list.items {
        let (ins, iname) = (
            item["metadata"]["namespace"].as_str().unwrap_or_default(),
            item["metadata"]["name"].as_str().unwrap_or_default(),
        );
        match api.store.delete(&t.rt, ins, iname, &opts) {
            Ok(o) => deleted.push(o),
            Err(e) if e.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(json_response(
        200,
        &json!({"kind": t.rt.list_kind(), "apiVersion": t.rt.api_version(), "metadata": {"resourceVersion": api.store.rev().to_string()}, "items": deleted}),
    ))
}

/// `GET` an object, or its server-side table row.
pub(super) fn get(api: &ApiServer, t: &Target) -> Result<Response, ApiError> {
    let obj = api.store.get(&t.rt, t.namespace(), t.name())?;
    if t.table {
        return Ok(json_response(
            200,
            &streams::table(
                &t.rt,
                &[obj],
                json!({"resourceVersion": api.store.rev().to_string()}),
            ),
        ));
    }
    Ok(json_response(200, &obj))
}

/// `PUT` an object or its `status`.
pub(super) async fn update(
    api: &ApiServer,
    t: &Target,
    part: Part,
    req: Request,
) -> Result<Response, ApiError> {
    if part == Part::Status && !t.rt.status {
        return Err(ApiError::no_route());
    }
    let mut body = read_json(api, req).await?;
    super::resources::prune(&t.rt, &mut body);
    Ok(json_response(
        200,
        &api.store
            .update(&t.rt, t.namespace(), t.name(), body, part, t.q.dry_run())?,
    ))
}

/// `PATCH` an object or its `status`: merge, JSON patch, strategic merge, or server-side
/// apply (create-or-merge).
pub(super) async fn patch(
    api: &ApiServer,
    t: &Target,
    part: Part,
    req: Request,
) -> Result<Response, ApiError> {
    let content_type = content_type(req.headers());
    let body = read_json(api, req).await?;
    let (store, rt, ns, name, q) = (&api.store, &t.rt, t.namespace(), t.name(), &t.q);
    let apply = content_type.starts_with("application/apply-patch");
    if apply && q.get("fieldManager").is_none_or(str::is_empty) {
        return Err(ApiError::bad_request(
            "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
        ));
    }
    match store.modify(rt, ns, name, part, q.dry_run(), |mut current| {
        apply_patch(rt, &content_type, &mut current, &body)?;
        super::resources::prune(rt, &mut current);
        Ok(current)
    }) {
        Ok(obj) => Ok(json_response(200, &obj)),
        // Server-side apply creates what does not exist yet (not through `/status`, whose
        // strategy does not allow create-on-update: that is a 404).
        Err(e) if e.code == 404 && apply && part == Part::Main => {
            let mut obj = body.clone();
            obj["metadata"]["name"] = json!(name);
            drop_status_on_create(rt, &mut obj);
            super::resources::prune(rt, &mut obj);
            Ok(json_response(201, &store.create(rt, ns, obj, q.dry_run())?))
        }
        Err(e) => Err(e),
    }
}

/// `DELETE` an object: graceful for pods, finalizers honoured, 202 while a propagation
/// policy's dependents go.
pub(super) async fn delete(
    api: &ApiServer,
    t: &Target,
    req: Request,
) -> Result<Response, ApiError> {
    let body = read_body(req).await?;
    let body: Option<Value> = if body.is_empty() {
        None
    } else {
        serde_json::from_slice(&body).ok()
    };
    let opts = delete_options(&t.q, body.as_ref());
    let obj = api.store.delete(&t.rt, t.namespace(), t.name(), &opts)?;
    let code = if obj["metadata"].get("deletionTimestamp").is_some()
        && t.q.get("propagationPolicy").is_some()
    {
        202
    } else {
        200
    };
    Ok(json_response(code, &obj))
}

/// `POST` an access review: answered, never stored.
pub(super) async fn create_review(
    api: &ApiServer,
    user: &UserInfo,
    rt: &ResourceType,
    req: Request,
) -> Result<Response, ApiError> {
    let body = read_json(api, req).await?;
    Ok(json_response(201, &review(&api.store, user, rt, body)))
}

fn list_query(rt: &ResourceType, q: &Query) -> Result<ListQuery, ApiError> {
    Ok(ListQuery {
        label: LabelSelector::parse(q.get("labelSelector").unwrap_or_default())
            .map_err(ApiError::bad_request)?,
        field: FieldSelector::parse(q.get("fieldSelector").unwrap_or_default(), &rt.kind)
            .map_err(ApiError::bad_request)?,
        limit: q.get("limit").and_then(|l| l.parse().ok()),
        continue_token: q
            .get("continue")
            .filter(|c| !c.is_empty())
            .map(String::from),
    })
}

fn delete_options(q: &Query, body: Option<&Value>) -> DeleteOptions {
    let body = body.cloned().unwrap_or(Value::Null);
    let orphan = body["orphanDependents"].as_bool() == Some(true);
    DeleteOptions {
        grace_period_seconds: q
            .get("gracePeriodSeconds")
            .and_then(|g| g.parse().ok())
            .or_else(|| body["gracePeriodSeconds"].as_i64()),
        propagation: q
            .get("propagationPolicy")
            .map(String::from)
            .or_else(|| body["propagationPolicy"].as_str().map(String::from))
            .or_else(|| orphan.then(|| "Orphan".to_owned())),
        precondition_uid: body["preconditions"]["uid"].as_str().map(String::from),
        precondition_rv: body["preconditions"]["resourceVersion"]
            .as_str()
            .map(String::from),
        dry_run: q.dry_run()
            || body["dryRun"]
                .as_array()
                .is_some_and(|d| d.iter().any(|x| x == "All")),
    }
}

pub(super) fn apply_patch(
    rt: &ResourceType,
    content_type: &str,
    target: &mut Value,
    body: &Value,
) -> Result<(), ApiError> {
    let result = match content_type {
        "application/merge-patch+json" => {
            patch::merge(target, body);
            Ok(())
        }
        "application/json-patch+json" => patch::json_patch(target, body),
        "application/strategic-merge-patch+json" if rt.builtin => patch::strategic(target, body),
        "application/apply-patch+yaml" | "application/apply-patch+cbor" => {
            patch::merge(target, body);
            Ok(())
        }
        other => return Err(ApiError::unsupported_media_type(other)),
    };
    result.map_err(|e| match e {
        PatchError::Malformed(m) => ApiError::bad_request(m),
        PatchError::Failed(m) => ApiError::unprocessable(m),
    })
}

fn review(store: &Store, user: &UserInfo, rt: &ResourceType, mut body: Value) -> Value {
    if rt.plural == "selfsubjectaccessreviews" {
        let ra = &body["spec"]["resourceAttributes"];
        let resource = match ra["subresource"].as_str().filter(|s| !s.is_empty()) {
            Some(sub) => format!("{}/{sub}", ra["resource"].as_str().unwrap_or_default()),
            None => ra["resource"].as_str().unwrap_or_default().to_owned(),
        };
        let attrs = Attributes {
            verb: ra["verb"].as_str().unwrap_or_default(),
            group: ra["group"].as_str().unwrap_or_default(),
            resource: &resource,
            namespace: ra["namespace"].as_str().filter(|n| !n.is_empty()),
            name: ra["name"].as_str().filter(|n| !n.is_empty()),
        };
        let allowed = ra.is_object() && auth::authorize(store, user, &attrs);
        body["status"] = json!({"allowed": allowed});
    } else {
        let ns = body["spec"]["namespace"].as_str().map(String::from);
        let rules = if user.groups.iter().any(|g| g == auth::MASTERS) {
            vec![json!({"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"]})]
        } else {
            auth::rules_for(store, user, ns.as_deref())
        };
        body["status"] = json!({"resourceRules": rules, "nonResourceRules": [{"verbs": ["get"], "nonResourceURLs": ["/api", "/api/*", "/apis", "/apis/*", "/version", "/healthz"]}], "incomplete": false});
    }
    body["apiVersion"] = json!(rt.api_version());
    body["kind"] = json!(rt.kind);
    body["metadata"]["creationTimestamp"] = Value::Null;
    body
}

/// `GET ?watch`: a stream of events from a resourceVersion (or the current state), with
/// bookmarks, timeouts and 410 for a compacted revision.
pub(super) fn watch(api: &Arc<ApiServer>, t: &Target) -> Result<Response, ApiError> {
    let (rt, ns, q, table) = (&t.rt, t.ns.clone(), &t.q, t.table);
    let query = list_query(rt, q)?;
    let filter = WatchFilter {
        group: rt.group.clone(),
        plural: rt.plural.clone(),
        namespace: ns,
        label: query.label,
        field: query.field,
    };
    let from = match q.get("resourceVersion") {
        None | Some("") => None,
        Some(v) => Some(
            v.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version: {v}")))?,
        ),
    };
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    let options = streams::WatchOptions {
        bookmarks: q.flag("allowWatchBookmarks"),
        initial_events_end: q.flag("sendInitialEvents"),
        timeout,
        bookmark_interval: api.bookmark_interval,
        table,
    };
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let start = api.store.watch(rt, &filter, from);
    let rt = rt.clone();
    let shutdown = api.watch_token();
    if matches!(start, WatchStart::Expired { .. }) {
        api.expired_watches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    api.tasks.spawn(async move {
        match start {
            WatchStart::Expired { requested, oldest } => {
                let status =
                    ApiError::expired(format!("too old resource version: {requested} ({oldest})"))
                        .to_status();
                let _ = tx.send(streams::event_line("ERROR", &status)).await;
            }
            WatchStart::Ready { initial, rx, rev } => {
                streams::run_watch(&rt, &filter, initial, rx, rev, options, &tx, shutdown).await;
            }
        }
    });
    let stream = ReceiverStream::new(rx).map(Ok::<_, Infallible>);
    let mut resp = Response::new(Body::from_stream(stream));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut()
        .insert("Transfer-Encoding", HeaderValue::from_static("chunked"));
    Ok(resp)
}
