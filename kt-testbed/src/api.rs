//! The HTTP face of the API stand-in: routing of `/api` and `/apis` paths
//! (`route`), authentication and RBAC, then the handler table (`dispatch`): discovery
//! (`discovery`), the verbs with watch streams and server-side tables for kubectl (`verbs`),
//! and the subresources `status`, `scale`, `log`, `exec`, `portforward`, `ephemeralcontainers`
//! (`subresources`).

pub mod admission;
pub mod api_only;
pub mod auth;
mod discovery;
pub mod errors;
mod openapi;
pub mod patch;
pub mod protobuf;
pub mod resources;
pub mod selector;
pub mod spdy;
pub mod store;
pub mod streams;
mod subresources;
pub mod tls;
mod verbs;

use std::{
    sync::{Arc, RwLock},
    time::Duration,
};

use axum::{
    body::{Body, Bytes},
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    response::Response,
};
use futures::{future::BoxFuture, stream::BoxStream};
use serde_json::{Value, json};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use self::{
    auth::{Attributes, Tokens, UserInfo},
    errors::ApiError,
    resources::ResourceType,
    store::{Part, Store},
};

/// What the API needs from the kubelets: pod logs, a connection into a pod, a process in a
/// pod. Set once the kubelets run; until then these subresources answer 400.
pub trait PodRuntime: Send + Sync {
    /// The log of `container` (an ephemeral one too), or of the pod's first container.
    fn logs(
        &self,
        ns: &str,
        pod: &str,
        container: Option<&str>,
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
    /// Request bodies that came in the Kubernetes protobuf encoding.
    pub protobuf_bodies: std::sync::atomic::AtomicU64,
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
            protobuf_bodies: std::sync::atomic::AtomicU64::new(0),
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

/// Where a path leads: a discovery document, or objects of a resource type.
pub(super) enum Route {
    Version,
    OpenApiIndex,
    OpenApi(String, String),
    CoreVersions,
    Groups,
    Group(String),
    Resources(String, String),
    Health,
    Object {
        rt: Box<ResourceType>,
        ns: Option<String>,
        name: Option<String>,
        sub: Option<String>,
    },
}

pub(super) fn json_response(code: u16, body: &Value) -> Response {
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
                rt: Box::new(rt),
                ns: Some((*ns).into()),
                name: tail.first().map(own),
                sub: tail.get(1).map(own),
            })
        }
        [plural, tail @ ..] if tail.len() <= 2 => {
            let rt = find(plural)?;
            Ok(Route::Object {
                rt: Box::new(rt),
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

/// What a request is about once routed to an object or a collection.
struct Target {
    rt: ResourceType,
    ns: Option<String>,
    name: Option<String>,
    sub: Option<String>,
    q: Query,
    /// kubectl asked for a server-side table.
    table: bool,
}

impl Target {
    /// The namespace, empty for cluster-scoped objects.
    fn namespace(&self) -> &str {
        self.ns.as_deref().unwrap_or_default()
    }

    /// The object's name; empty on a collection.
    fn name(&self) -> &str {
        self.name.as_deref().unwrap_or_default()
    }
}

/// Authenticates, routes, authorises, then hands the request to its handler.
async fn serve(api: Arc<ApiServer>, req: Request) -> Result<Response, ApiError> {
    // kube-apiserver's authenticator union tries the client certificate before tokens.
    let certified = req
        .extensions()
        .get::<tls::ClientIdentity>()
        .map(|identity| identity.0.clone());
    let user = match (certified, bearer(req.headers())) {
        (Some(user), _) => user,
        (None, Some(token)) => api
            .tokens
            .authenticate(token)
            .ok_or_else(ApiError::unauthorized)?,
        (None, None) => return Err(ApiError::unauthorized()),
    };
    let (rt, ns, name, sub) = match route(&api, req.uri().path())? {
        Route::Object { rt, ns, name, sub } => (*rt, ns, name, sub),
        other => return discovery::serve(&api.store, other),
    };
    let target = Target {
        rt,
        ns,
        name,
        sub,
        q: Query::parse(req.uri().query()),
        table: wants_table(req.headers()),
    };
    authorize(&api.store, &user, req.method(), &target)?;
    if target.rt.review {
        return verbs::create_review(&api, &user, &target.rt, req).await;
    }
    if target.rt.namespaced
        && target.ns.is_none()
        && (target.name.is_some() || req.method() != Method::GET)
    {
        return Err(ApiError::no_route());
    }
    dispatch(&api, req, &target).await
}

/// RBAC for the request's verb on its resource (`pods/exec` and `pods/portforward` are
/// `create`, whatever the HTTP method).
fn authorize(store: &Store, user: &UserInfo, method: &Method, t: &Target) -> Result<(), ApiError> {
    let resource = match &t.sub {
        Some(s) => format!("{}/{s}", t.rt.plural),
        None => t.rt.plural.clone(),
    };
    let verb = if matches!(t.sub.as_deref(), Some("exec" | "portforward" | "attach")) {
        "create"
    } else {
        verb_of(method, t.name.is_some(), &t.q)
    };
    let attrs = Attributes {
        verb,
        group: &t.rt.group,
        resource: &resource,
        namespace: t.ns.as_deref(),
        name: t.name.as_deref(),
    };
    if auth::authorize(store, user, &attrs) {
        return Ok(());
    }
    Err(ApiError::forbidden(
        &user.name,
        attrs.verb,
        &resource,
        &t.rt.group,
        t.ns.as_deref(),
        t.name.as_deref(),
    ))
}

/// The table of handlers: a method on a collection, an object or a subresource.
async fn dispatch(api: &Arc<ApiServer>, req: Request, t: &Target) -> Result<Response, ApiError> {
    let method = req.method().clone();
    let part = |sub: Option<&str>| {
        if sub.is_some() {
            Part::Status
        } else {
            Part::Main
        }
    };
    let pods = t.rt.plural == "pods";
    match (method.as_str(), t.name.is_some(), t.sub.as_deref()) {
        ("GET", false, None) if t.q.flag("watch") => verbs::watch(api, t),
        ("GET", false, None) => verbs::list(api, t),
        ("POST", false, None) => verbs::create(api, t, req).await,
        ("DELETE", false, None) => verbs::delete_collection(api, t),
        ("GET", true, None) => verbs::get(api, t),
        ("GET", true, Some("status")) if t.rt.status => subresources::get_status(api, t),
        ("PUT", true, sub @ (None | Some("status"))) => verbs::update(api, t, part(sub), req).await,
        ("PATCH", true, sub @ (None | Some("status"))) => {
            verbs::patch(api, t, part(sub), req).await
        }
        ("DELETE", true, None) => verbs::delete(api, t, req).await,
        (_, true, Some("scale")) if t.rt.scale => subresources::scale(api, t, req).await,
        ("GET", true, Some("log")) if pods => subresources::log(api, t).await,
        ("GET" | "PUT" | "PATCH", true, Some("ephemeralcontainers")) if pods => {
            subresources::ephemeral_containers(api, t, req).await
        }
        ("GET" | "POST", true, Some(sub @ ("portforward" | "exec"))) if pods => {
            subresources::stream(api, t, sub, req).await
        }
        _ => Err(ApiError::method_not_allowed(format!(
            "the server does not allow this method on the requested resource ({method} {})",
            t.rt.qualified()
        ))),
    }
}

pub(super) fn content_type(headers: &HeaderMap) -> String {
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

pub(super) async fn read_body(req: Request) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(req.into_body(), 64 << 20)
        .await
        .map_err(|e| ApiError::bad_request(format!("reading body: {e}")))
}

/// A request's object: JSON, or protobuf (counted in [`ApiServer::protobuf_bodies`]).
pub(super) async fn read_json(api: &ApiServer, req: Request) -> Result<Value, ApiError> {
    let content_type = content_type(req.headers());
    let body = read_body(req).await?;
    if content_type == "application/vnd.kubernetes.protobuf" {
        api.protobuf_bodies
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return protobuf::decode(&body).map_err(|e| {
            let mut err = if e.unsupported_kind() {
                ApiError::unsupported_media_type(&content_type)
            } else {
                ApiError::bad_request(String::new())
            };
            err.message = e.to_string();
            err
        });
    }
    serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "the body of the request could not be decoded as JSON: {e}"
        ))
    })
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
