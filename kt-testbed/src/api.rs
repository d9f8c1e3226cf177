//! The HTTP face of the API stand-in: routing of `/api` and `/apis` paths, the verbs,
//! discovery, watch streams, server-side tables for kubectl, subresources (`status`,
//! `scale`, `log`, `exec`, `portforward`), authentication and RBAC.

pub mod admission;
pub mod api_only;
pub mod auth;
pub mod errors;
pub mod patch;
pub mod protobuf;
pub mod resources;
pub mod selector;
pub mod store;
pub mod streams;
pub mod tls;

use std::{
    convert::Infallible,
    sync::{Arc, RwLock},
    time::Duration,
};

use axum::{
    body::{Body, Bytes},
    extract::{FromRequestParts as _, Request, State, ws::WebSocketUpgrade},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    response::{IntoResponse, Response},
};
use futures::{StreamExt as _, future::BoxFuture, stream::BoxStream};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use self::{
    auth::{Attributes, Tokens, UserInfo},
    errors::ApiError,
    patch::PatchError,
    resources::ResourceType,
    selector::{FieldSelector, LabelSelector},
    store::{DeleteOptions, ListQuery, Part, Store, WatchFilter, WatchStart},
};

/// What the API needs from the kubelets: pod logs, a connection into a pod, a process in a
/// pod. Set once the kubelets run; until then these subresources answer 400.
pub trait PodRuntime: Send + Sync {
    fn logs(
        &self,
        ns: &str,
        pod: &str,
        follow: bool,
    ) -> BoxFuture<'static, Result<BoxStream<'static, Bytes>, ApiError>>;
    fn dial(
        &self,
        ns: &str,
        pod: &str,
        port: u16,
    ) -> BoxFuture<'static, std::io::Result<tokio::net::TcpStream>>;
    fn exec(
        &self,
        ns: &str,
        pod: &str,
        command: Vec<String>,
    ) -> BoxFuture<'static, Result<tokio::process::Child, ApiError>>;
}

pub struct ApiServer {
    pub store: Arc<Store>,
    pub tokens: Arc<Tokens>,
    pub runtime: RwLock<Option<Arc<dyn PodRuntime>>>,
    pub tasks: TaskTracker,
    pub shutdown: CancellationToken,
    /// How often idle watches get a BOOKMARK (about a minute in a cluster).
    bookmark_interval: Duration,
    /// Cancelled by [`ApiServer::restart_watches`]: ends every open watch, as an API
    /// server restart does, so that clients resume from their last resourceVersion.
    watches: RwLock<CancellationToken>,
    /// Cancelled by [`ApiServer::drop_streams`]: ends every port-forward and exec stream.
    streams: RwLock<CancellationToken>,
    /// Watches answered with 410 Expired (clients then relist).
    pub expired_watches: std::sync::atomic::AtomicU64,
}

impl ApiServer {
    pub fn new(
        store: Arc<Store>,
        tokens: Arc<Tokens>,
        shutdown: CancellationToken,
        bookmark_interval: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            tokens,
            runtime: RwLock::new(None),
            tasks: TaskTracker::new(),
            shutdown: shutdown.clone(),
            bookmark_interval,
            watches: RwLock::new(shutdown.child_token()),
            streams: RwLock::new(shutdown.child_token()),
            expired_watches: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Ends every open watch stream now.
    pub fn restart_watches(&self) {
        let mut token = self.watches.write().unwrap_or_else(|e| e.into_inner());
        token.cancel();
        *token = self.shutdown.child_token();
    }

    /// Ends every port-forward and exec stream now, as an API server restart or a proxy
    /// timeout does; clients must reconnect.
    pub fn drop_streams(&self) {
        let mut token = self.streams.write().unwrap_or_else(|e| e.into_inner());
        token.cancel();
        *token = self.shutdown.child_token();
    }

    pub(super) fn stream_token(&self) -> CancellationToken {
        self.streams
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn watch_token(&self) -> CancellationToken {
        self.watches
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn router(self: &Arc<Self>) -> axum::Router {
        axum::Router::new()
            .fallback(handle)
            .with_state(self.clone())
    }

    fn runtime(&self) -> Option<Arc<dyn PodRuntime>> {
        self.runtime
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The parsed query string; repeated keys are kept (`ports=`, `command=`).
#[derive(Debug, Default)]
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(raw: Option<&str>) -> Self {
        Self(
            form_urlencoded::parse(raw.unwrap_or_default().as_bytes())
                .filter(|(k, _)| !k.is_empty())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn all(&self, key: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("true" | "1"))
    }

    fn dry_run(&self) -> bool {
        self.get("dryRun") == Some("All")
    }
}

enum Route {
    Version,
    OpenApiIndex,
    OpenApi(String, String),
    CoreVersions,
    Groups,
    Group(String),
    Resources(String, String),
    Health,
    Object {
        rt: ResourceType,
        ns: Option<String>,
        name: Option<String>,
        sub: Option<String>,
    },
}

fn json_response(code: u16, body: &Value) -> Response {
    let mut resp = Response::new(Body::from(body.to_string()));
    *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn error_response(e: &ApiError) -> Response {
    json_response(e.code, &e.to_status())
}

async fn handle(State(api): State<Arc<ApiServer>>, req: Request) -> Response {
    let result = serve(api, req).await;
    result.unwrap_or_else(|e| error_response(&e))
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

fn route(api: &ApiServer, path: &str) -> Result<Route, ApiError> {
    let parts: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|p| !p.is_empty())
        .collect();
    let (group, version, rest) = match parts.as_slice() {
        ["version"] => return Ok(Route::Version),
        ["openapi", "v3"] => return Ok(Route::OpenApiIndex),
        ["openapi", "v3", "api", v] => return Ok(Route::OpenApi(String::new(), (*v).into())),
        ["openapi", "v3", "apis", g, v] => return Ok(Route::OpenApi((*g).into(), (*v).into())),
        ["healthz" | "livez" | "readyz", ..] => return Ok(Route::Health),
        ["api"] => return Ok(Route::CoreVersions),
        ["apis"] => return Ok(Route::Groups),
        ["apis", g] => return Ok(Route::Group((*g).into())),
        ["api", v] => return Ok(Route::Resources(String::new(), (*v).into())),
        ["apis", g, v] => return Ok(Route::Resources((*g).into(), (*v).into())),
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Err(ApiError::no_route()),
    };
    let find = |plural: &str| {
        api.store
            .registry
            .find(group, version, plural)
            .ok_or_else(ApiError::no_route)
    };
    let own = |s: &&str| (*s).to_owned();
    match rest {
        ["namespaces", ns, plural, tail @ ..] if !matches!(*plural, "status" | "finalize") => {
            let rt = find(plural)?;
            if !rt.namespaced {
                return Err(ApiError::no_route());
            }
            Ok(Route::Object {
                rt,
                ns: Some((*ns).into()),
                name: tail.first().map(own),
                sub: tail.get(1).map(own),
            })
        }
        [plural, tail @ ..] if tail.len() <= 2 => {
            let rt = find(plural)?;
            Ok(Route::Object {
                rt,
                ns: None,
                name: tail.first().map(own),
                sub: tail.get(1).map(own),
            })
        }
        _ => Err(ApiError::no_route()),
    }
}

/// The RBAC verb of a request.
fn verb_of(method: &Method, has_name: bool, q: &Query) -> &'static str {
    match (method.as_str(), has_name) {
        ("GET" | "HEAD", false) if q.flag("watch") => "watch",
        ("GET" | "HEAD", false) => "list",
        ("GET" | "HEAD", true) => "get",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", false) => "deletecollection",
        ("DELETE", true) => "delete",
        _ => "unknown",
    }
}

async fn serve(api: Arc<ApiServer>, req: Request) -> Result<Response, ApiError> {
    let user = match bearer(req.headers()) {
        Some(token) => api
            .tokens
            .authenticate(token)
            .ok_or_else(ApiError::unauthorized)?,
        None => return Err(ApiError::unauthorized()),
    };
    let route = route(&api, req.uri().path())?;
    let q = Query::parse(req.uri().query());
    let (rt, ns, name, sub) = match route {
        Route::Version => return Ok(json_response(200, &version())),
        Route::OpenApiIndex => return Ok(json_response(200, &openapi_index(&api.store))),
        Route::OpenApi(g, v) => {
            return openapi_document(&api.store, &g, &v).map(|d| json_response(200, &d));
        }
        Route::Health => return Ok((StatusCode::OK, "ok").into_response()),
        Route::CoreVersions => {
            return Ok(json_response(
                200,
                &json!({
            "kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}]}),
            ));
        }
        Route::Groups => return Ok(json_response(200, &group_list(&api.store))),
        Route::Group(g) => {
            let groups = group_list(&api.store);
            let group = groups["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|x| x["name"] == g.as_str())
                .cloned();
            return match group {
                Some(mut group) => {
                    group["kind"] = json!("APIGroup");
                    group["apiVersion"] = json!("v1");
                    Ok(json_response(200, &group))
                }
                None => Err(ApiError::no_route()),
            };
        }
        Route::Resources(g, v) => {
            return resource_list(&api.store, &g, &v).map(|b| json_response(200, &b));
        }
        Route::Object { rt, ns, name, sub } => (rt, ns, name, sub),
    };
    let method = req.method().clone();
    let verb = verb_of(&method, name.is_some(), &q);
    let resource = match &sub {
        Some(s) => format!("{}/{s}", rt.plural),
        None => rt.plural.clone(),
    };
    let attrs = Attributes {
        verb,
        group: &rt.group,
        resource: &resource,
        namespace: ns.as_deref(),
        name: name.as_deref(),
    };
    // exec and portforward are `create` in RBAC, whatever the HTTP method.
    let attrs = if matches!(sub.as_deref(), Some("exec" | "portforward" | "attach")) {
        Attributes {
            verb: "create",
            ..attrs
        }
    } else {
        attrs
    };
    if !auth::authorize(&api.store, &user, &attrs) {
        return Err(ApiError::forbidden(
            &user.name,
            attrs.verb,
            &resource,
            &rt.group,
            ns.as_deref(),
            name.as_deref(),
        ));
    }
    if rt.review {
        let body = read_json(req).await?;
        return Ok(json_response(201, &review(&api.store, &user, &rt, body)));
    }
    let ns_str = ns.clone().unwrap_or_default();
    if rt.namespaced && ns.is_none() && (name.is_some() || method != Method::GET) {
        return Err(ApiError::no_route());
    }
    let table = wants_table(req.headers());
    match (method.as_str(), name, sub.as_deref()) {
        ("GET", None, None) if q.flag("watch") => watch(&api, &rt, ns, &q, table),
        ("GET", None, None) => {
            let query = list_query(&rt, &q)?;
            let list = api.store.list(&rt, ns.as_deref(), &query)?;
            let mut meta = json!({"resourceVersion": list.rev.to_string()});
            if let Some(token) = list.continue_token {
                meta["continue"] = json!(token);
                meta["remainingItemCount"] = json!(list.remaining.unwrap_or(0));
            }
            if table {
                return Ok(json_response(200, &streams::table(&rt, &list.items, meta)));
            }
            Ok(json_response(
                200,
                &json!({"kind": rt.list_kind(), "apiVersion": rt.api_version(), "metadata": meta, "items": list.items}),
            ))
        }
        ("POST", None, None) => {
            let body = read_json(req).await?;
            let created = api.store.create(&rt, &ns_str, body, q.dry_run())?;
            Ok(json_response(201, &created))
        }
        ("DELETE", None, None) => {
            let query = list_query(&rt, &q)?;
            let list = api.store.list(&rt, ns.as_deref(), &query)?;
            let opts = delete_options(&q, None);
            let mut deleted = Vec::new();
            for item in list.items {
                let (ins, iname) = (
                    item["metadata"]["namespace"].as_str().unwrap_or_default(),
                    item["metadata"]["name"].as_str().unwrap_or_default(),
                );
                match api.store.delete(&rt, ins, iname, &opts) {
                    Ok(o) => deleted.push(o),
                    Err(e) if e.code == 404 => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(json_response(
                200,
                &json!({"kind": rt.list_kind(), "apiVersion": rt.api_version(), "metadata": {"resourceVersion": api.store.rev().to_string()}, "items": deleted}),
            ))
        }
        ("GET", Some(name), None) => {
            let obj = api.store.get(&rt, &ns_str, &name)?;
            if table {
                return Ok(json_response(
                    200,
                    &streams::table(
                        &rt,
                        &[obj],
                        json!({"resourceVersion": api.store.rev().to_string()}),
                    ),
                ));
            }
            Ok(json_response(200, &obj))
        }
        ("GET", Some(name), Some("status")) if rt.status => {
            Ok(json_response(200, &api.store.get(&rt, &ns_str, &name)?))
        }
        ("PUT", Some(name), part @ (None | Some("status"))) => {
            let part = if part.is_some() {
                Part::Status
            } else {
                Part::Main
            };
            if part == Part::Status && !rt.status {
                return Err(ApiError::no_route());
            }
            let body = read_json(req).await?;
            Ok(json_response(
                200,
                &api.store
                    .update(&rt, &ns_str, &name, body, part, q.dry_run())?,
            ))
        }
        ("PATCH", Some(name), part @ (None | Some("status"))) => {
            let part = if part.is_some() {
                Part::Status
            } else {
                Part::Main
            };
            let content_type = content_type(req.headers());
            let body = read_json(req).await?;
            patch_object(
                &api.store,
                &rt,
                &ns_str,
                &name,
                part,
                &content_type,
                &body,
                &q,
            )
        }
        ("DELETE", Some(name), None) => {
            let body = read_body(req).await?;
            let body: Option<Value> = if body.is_empty() {
                None
            } else {
                serde_json::from_slice(&body).ok()
            };
            let opts = delete_options(&q, body.as_ref());
            let obj = api.store.delete(&rt, &ns_str, &name, &opts)?;
            let code = if obj["metadata"].get("deletionTimestamp").is_some()
                && q.get("propagationPolicy").is_some()
            {
                202
            } else {
                200
            };
            Ok(json_response(code, &obj))
        }
        (method, Some(name), Some("scale")) if rt.scale => {
            let content_type = content_type(req.headers());
            let body = if method == "GET" {
                Value::Null
            } else {
                read_json(req).await?
            };
            scale(
                &api.store,
                &rt,
                &ns_str,
                &name,
                method,
                &content_type,
                body,
                &q,
            )
        }
        ("GET", Some(name), Some("log")) if rt.plural == "pods" => {
            let runtime = api
                .runtime()
                .ok_or_else(|| ApiError::bad_request("no kubelet is running"))?;
            api.store.get(&rt, &ns_str, &name)?;
            let stream = runtime.logs(&ns_str, &name, q.flag("follow")).await?;
            let mut resp = Response::new(Body::from_stream(stream.map(Ok::<_, Infallible>)));
            resp.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            Ok(resp)
        }
        ("GET" | "POST", Some(name), Some(sub @ ("portforward" | "exec")))
            if rt.plural == "pods" =>
        {
            let pod = api.store.get(&rt, &ns_str, &name)?;
            if !pod["spec"]["nodeName"].is_string() {
                return Err(ApiError::bad_request(format!(
                    "pod {name} does not have a host assigned"
                )));
            }
            if pod["status"]["phase"] != "Running" {
                let container = pod["spec"]["containers"][0]["name"]
                    .as_str()
                    .unwrap_or_default();
                return Err(ApiError::bad_request(format!(
                    "container \"{container}\" in pod \"{name}\" is waiting to start: ContainerCreating"
                )));
            }
            let runtime = api
                .runtime()
                .ok_or_else(|| ApiError::bad_request("no kubelet is running"))?;
            let (mut parts, _body) = req.into_parts();
            let ws = WebSocketUpgrade::from_request_parts(&mut parts, &())
                .await
                .map_err(|e| {
                    ApiError::bad_request(format!(
                        "{sub} needs a WebSocket upgrade (SPDY is not supported): {e}"
                    ))
                })?;
            if sub == "portforward" {
                let ports: Vec<u16> = q
                    .all("ports")
                    .iter()
                    .flat_map(|p| p.split(','))
                    .filter_map(|p| p.trim().parse().ok())
                    .collect();
                if ports.is_empty() {
                    return Err(ApiError::bad_request("at least 1 port must be specified"));
                }
                Ok(streams::port_forward(
                    &api, ws, runtime, ns_str, name, ports,
                ))
            } else {
                let command: Vec<String> = q.all("command").iter().map(|s| s.to_string()).collect();
                if command.is_empty() {
                    return Err(ApiError::bad_request("you must specify at least 1 command"));
                }
                Ok(streams::exec(
                    &api,
                    ws,
                    runtime,
                    ns_str,
                    name,
                    command,
                    q.flag("stdin"),
                ))
            }
        }
        _ => Err(ApiError::method_not_allowed(format!(
            "the server does not allow this method on the requested resource ({method} {})",
            rt.qualified()
        ))),
    }
}

fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned()
}

fn wants_table(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("as=Table"))
}

async fn read_body(req: Request) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(req.into_body(), 64 << 20)
        .await
        .map_err(|e| ApiError::bad_request(format!("reading body: {e}")))
}

async fn read_json(req: Request) -> Result<Value, ApiError> {
    let content_type = content_type(req.headers());
    let body = read_body(req).await?;
    if content_type == "application/vnd.kubernetes.protobuf" {
        return protobuf::decode(&body).map_err(|m| {
            let mut e = ApiError::unsupported_media_type(&content_type);
            e.message = m;
            e
        });
    }
    serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "the body of the request could not be decoded as JSON: {e}"
        ))
    })
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

fn apply_patch(
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

#[expect(clippy::too_many_arguments, reason = "the parts of one PATCH request")]
fn patch_object(
    store: &Store,
    rt: &ResourceType,
    ns: &str,
    name: &str,
    part: Part,
    content_type: &str,
    body: &Value,
    q: &Query,
) -> Result<Response, ApiError> {
    let apply = content_type.starts_with("application/apply-patch");
    if apply && q.get("fieldManager").is_none_or(str::is_empty) {
        return Err(ApiError::bad_request(
            "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
        ));
    }
    match store.modify(rt, ns, name, part, q.dry_run(), |mut current| {
        apply_patch(rt, content_type, &mut current, body)?;
        Ok(current)
    }) {
        Ok(obj) => Ok(json_response(200, &obj)),
        // Server-side apply creates what does not exist yet.
        Err(e) if e.code == 404 && apply => {
            let mut obj = body.clone();
            obj["metadata"]["name"] = json!(name);
            Ok(json_response(201, &store.create(rt, ns, obj, q.dry_run())?))
        }
        Err(e) => Err(e),
    }
}

fn scale_of(obj: &Value) -> Value {
    let m = &obj["metadata"];
    let selector = LabelSelector::from_object(&obj["spec"]["selector"]).unwrap_or_default();
    let selector: Vec<String> = selector
        .0
        .iter()
        .map(|r| match r {
            selector::Requirement::Eq(k, v) => format!("{k}={v}"),
            other => format!("{other:?}"),
        })
        .collect();
    json!({
        "kind": "Scale", "apiVersion": "autoscaling/v1",
        "metadata": {"name": m["name"], "namespace": m["namespace"], "uid": m["uid"],
                     "resourceVersion": m["resourceVersion"], "creationTimestamp": m["creationTimestamp"]},
        "spec": {"replicas": obj["spec"]["replicas"].as_i64().unwrap_or(0)},
        "status": {"replicas": obj["status"]["replicas"].as_i64().unwrap_or(0), "selector": selector.join(",")},
    })
}

#[expect(clippy::too_many_arguments, reason = "the parts of one scale request")]
fn scale(
    store: &Store,
    rt: &ResourceType,
    ns: &str,
    name: &str,
    method: &str,
    content_type: &str,
    body: Value,
    q: &Query,
) -> Result<Response, ApiError> {
    if method == "GET" {
        return Ok(json_response(200, &scale_of(&store.get(rt, ns, name)?)));
    }
    let updated = store.modify(rt, ns, name, Part::Main, q.dry_run(), |mut parent| {
        let mut scale = scale_of(&parent);
        match method {
            "PUT" => scale = body.clone(),
            "PATCH" => apply_patch(
                &ResourceType {
                    builtin: true,
                    ..rt.clone()
                },
                content_type,
                &mut scale,
                &body,
            )?,
            _ => return Err(ApiError::method_not_allowed(format!("{method} on scale"))),
        }
        let replicas = scale["spec"]["replicas"].as_i64().ok_or_else(|| {
            ApiError::invalid(
                rt,
                name,
                &[("spec.replicas".into(), "Required value".into())],
            )
        })?;
        parent["spec"]["replicas"] = json!(replicas);
        parent["metadata"]["resourceVersion"] = scale["metadata"]["resourceVersion"].clone();
        Ok(parent)
    })?;
    Ok(json_response(200, &scale_of(&updated)))
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

fn watch(
    api: &Arc<ApiServer>,
    rt: &ResourceType,
    ns: Option<String>,
    q: &Query,
    table: bool,
) -> Result<Response, ApiError> {
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
            let doc = openapi_document(store, &group, &version).unwrap_or_default();
            let hash = format!("{:016X}", fnv1a(doc.to_string().as_bytes()));
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
/// honours. Enough for kubectl to see that the server validates fields itself
/// (`fieldValidation`); no schemas, so kubectl builds strategic patches from its own types.
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
        json!({"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.33.0"}, "paths": paths, "components": {"schemas": {}}}),
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

/// Bootstrap objects every cluster has: namespaces, default ClusterRoles.
pub fn bootstrap(store: &Store) {
    let ns_rt = store
        .registry
        .find("", "v1", "namespaces")
        .expect("built-in");
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        let _ = store.create(&ns_rt, "", json!({"metadata": {"name": ns}}), false);
    }
    let cr = store
        .registry
        .find("rbac.authorization.k8s.io", "v1", "clusterroles")
        .expect("built-in");
    for role in auth::default_cluster_roles() {
        let _ = store.create(&cr, "", role, false);
    }
}
