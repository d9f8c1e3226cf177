//! The mesh router of a node (`../shared/design.md`, "mesh, agent mode"): one listener per
//! meshed Service port on the node's address, where this node's redirects send the port's
//! traffic. Each **request** is routed on its own headers — every request of an HTTP/1.1
//! keep-alive connection, every stream of an HTTP/2 connection (gRPC metadata are HTTP/2
//! headers) — to the session whose header matches (the holding agent's listener, which
//! forwards to the workstation), else to a ready endpoint of the Service. Upstream
//! connections are pooled and kept alive (hyper's client).
//!
//! - An HTTP/1.1 `Upgrade` (WebSocket and others) is routed on the upgrade request; after the
//!   upstream's `101` the two connections are spliced.
//! - An `Upgrade: h2c` is declined and the request answered over HTTP/1.1: RFC 9113 §3.1
//!   deprecates that upgrade and RFC 9110 §7.8 lets a server ignore `Upgrade`, and the
//!   client goes on with HTTP/1.1, each request still routed. HTTP/2 with prior knowledge
//!   is served as HTTP/2.
//! - Bytes that are not HTTP (or a client that sends nothing within [`SNIFF_WINDOW`], as
//!   server-first protocols do) are passed unchanged to a ready endpoint.
//!
//! The router's own connects to endpoints are not redirected: the agent's cgroup is skipped
//! by the eBPF programs, so there is no loop.

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument as _;

use super::{
    listening,
    mesh::{MeshTarget, Route, RouteKey},
    node_ports::Ruleset,
};

/// How long the router waits for a client's first bytes before it treats the connection as
/// not HTTP (a server-first protocol) and passes it to an endpoint.
pub const SNIFF_WINDOW: Duration = Duration::from_millis(500);
/// How long an idle upstream connection is kept for reuse.
const POOL_IDLE: Duration = Duration::from_secs(90);

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

type Body = BoxBody<Bytes, hyper::Error>;

/// What a connection speaks, from its first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    /// HTTP/2 with prior knowledge (RFC 9113 §3.3).
    Http2,
    /// Anything else: passed through unchanged.
    Opaque,
}

/// The longest method token taken as HTTP/1 (the registered methods are at most 17 letters):
/// a longer run of capitals is not HTTP, whether a space follows or not.
const MAX_METHOD: usize = 23;

/// The protocol the first bytes `seen` show, or `None` when more are needed: the HTTP/2
/// preface, or an HTTP/1 request line's method token (upper-case letters, RFC 9110 §9.1, at
/// most [`MAX_METHOD`]) followed by a space. Once decided, more bytes never change the
/// decision, however the client's bytes were split into reads.
pub fn classify(seen: &[u8]) -> Option<Protocol> {
    if seen.is_empty() {
        return None;
    }
    let compared = seen.len().min(H2_PREFACE.len());
    if seen[..compared] == H2_PREFACE[..compared] {
        return (seen.len() >= H2_PREFACE.len()).then_some(Protocol::Http2);
    }
    let token = seen.iter().take_while(|b| b.is_ascii_uppercase()).count();
    match seen.get(token) {
        // Too long a token is opaque even when a space follows in the same read: the
        // decision must not depend on where the first read ended (found by fuzzing).
        _ if token > MAX_METHOD => Some(Protocol::Opaque),
        Some(b' ') if token > 0 => Some(Protocol::Http1),
        // Still in the method token, and a token that long is still plausible.
        None => None,
        _ => Some(Protocol::Opaque),
    }
}

/// Where one listener's requests are routed: the route as last computed, shared with every
/// connection so that each request sees the current one.
type Table = Arc<RwLock<Arc<Route>>>;

struct Listening {
    address: SocketAddr,
    table: Table,
    stop: CancellationToken,
}

/// The node's router: its listeners, their routes, the upstream clients.
pub struct Router {
    node_ip: IpAddr,
    listeners: Mutex<HashMap<RouteKey, Listening>>,
    http1: Client<HttpConnector, Incoming>,
    http2: Client<HttpConnector, Incoming>,
    /// Spreads requests over a route's endpoints.
    next_endpoint: AtomicUsize,
    /// The node-port table the kernel may hold, where the listeners are its DNAT targets
    /// (the agent's router; not the router pod's).
    node_port_table: Option<watch::Receiver<Ruleset>>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

impl Router {
    /// A router with no routes, listening on `node_ip`; everything it runs stops with
    /// `shutdown`.
    pub fn new(node_ip: IpAddr, shutdown: CancellationToken) -> Arc<Self> {
        Self::build(node_ip, None, shutdown)
    }

    /// [`Router::new`] for a node agent, whose listeners are also DNAT targets of the
    /// node-port table: a listener no longer wanted closes only once no table the kernel
    /// may hold (`node_port_table`, [`super::node_ports::run`]) sends to it.
    pub fn for_node(
        node_ip: IpAddr,
        node_port_table: watch::Receiver<Ruleset>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Self::build(node_ip, Some(node_port_table), shutdown)
    }

    fn build(
        node_ip: IpAddr,
        node_port_table: Option<watch::Receiver<Ruleset>>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let http1 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            .build(connector.clone());
        let http2 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            .http2_only(true)
            .build(connector);
        Arc::new(Self {
            node_ip,
            listeners: Mutex::default(),
            http1,
            http2,
            next_endpoint: AtomicUsize::new(0),
            node_port_table,
            tasks: TaskTracker::new(),
            shutdown,
        })
    }

    /// Makes `routes` the ones in force: a listener for each new route (a port of the node
    /// chosen by the kernel), the new route for each kept one, closed listeners for routes
    /// that are gone (their open connections keep going, with requests to the endpoints).
    /// Returns where each route's listener is; a route whose listener cannot be opened is
    /// logged and left out, so its traffic stays with the pods.
    pub fn update(
        self: &Arc<Self>,
        routes: &BTreeMap<RouteKey, Route>,
    ) -> BTreeMap<RouteKey, SocketAddr> {
        let node_ip = self.node_ip;
        self.update_with(routes, |_| SocketAddr::new(node_ip, 0))
    }

    /// [`Router::update`] listening on each route's own port (`RouteKey::port`): the router
    /// pod of v0.3.7's auto mesh, which stands in for the Service's pods on their target
    /// ports.
    pub fn update_on_ports(
        self: &Arc<Self>,
        routes: &BTreeMap<RouteKey, Route>,
    ) -> BTreeMap<RouteKey, SocketAddr> {
        let node_ip = self.node_ip;
        self.update_with(routes, |key| SocketAddr::new(node_ip, key.port))
    }

    fn update_with(
        self: &Arc<Self>,
        routes: &BTreeMap<RouteKey, Route>,
        bind: impl Fn(&RouteKey) -> SocketAddr,
    ) -> BTreeMap<RouteKey, SocketAddr> {
        let mut listeners = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        listeners.retain(|key, listening| {
            let keep = routes.contains_key(key);
            if !keep {
                tracing::info!(namespace = %key.namespace, service = %key.service, port = key.port, "mesh route closed");
                // Connections still open route every request to the endpoints.
                let mut table = listening.table.write().unwrap_or_else(|e| e.into_inner());
                *table = Arc::new(Route {
                    sessions: Vec::new(),
                    ..Route::clone(&table)
                });
                // The listener keeps accepting (for the endpoints) while it may be sent
                // connections.
                listening::stop_when_unused(
                    &self.tasks,
                    listening.stop.clone(),
                    self.shutdown.clone(),
                    listening.address,
                    self.node_port_table.clone(),
                );
            }
            keep
        });
        let mut out = BTreeMap::new();
        for (key, route) in routes {
            if let Some(listening) = listeners.get(key) {
                let mut table = listening.table.write().unwrap_or_else(|e| e.into_inner());
                if **table != *route {
                    *table = Arc::new(route.clone());
                }
                out.insert(key.clone(), listening.address);
                continue;
            }
            match self.listen(key, route, bind(key)) {
                Ok(listening) => {
                    tracing::info!(namespace = %key.namespace, service = %key.service, port = key.port, router = %listening.address, "mesh route opened");
                    out.insert(key.clone(), listening.address);
                    listeners.insert(key.clone(), listening);
                }
                Err(error) => {
                    tracing::error!(namespace = %key.namespace, service = %key.service, port = key.port, %error, "cannot open a mesh router listener: the port stays with its pods");
                }
            }
        }
        out
    }

    /// Stops accepting and waits for the open connections to end (they end with
    /// `shutdown`).
    pub async fn closed(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }

    fn listen(
        self: &Arc<Self>,
        key: &RouteKey,
        route: &Route,
        address: SocketAddr,
    ) -> std::io::Result<Listening> {
        let socket = std::net::TcpListener::bind(address)?;
        socket.set_nonblocking(true)?;
        let listener = TcpListener::from_std(socket)?;
        let address = listener.local_addr()?;
        let table: Table = Arc::new(RwLock::new(Arc::new(route.clone())));
        let stop = self.shutdown.child_token();
        let span = tracing::info_span!("mesh", namespace = %key.namespace, service = %key.service, port = key.port);
        self.tasks.spawn(
            self.clone()
                .accept(listener, table.clone(), stop.clone())
                .instrument(span),
        );
        Ok(Listening {
            address,
            table,
            stop,
        })
    }

    async fn accept(self: Arc<Self>, listener: TcpListener, table: Table, stop: CancellationToken) {
        while let Some((stream, peer)) = listening::next_connection(&listener, &stop).await {
            let _ = stream.set_nodelay(true);
            let router = self.clone();
            let table = table.clone();
            self.tasks.spawn(
                async move {
                    tokio::select! {
                        () = router.shutdown.cancelled() => {}
                        () = router.clone().connection(stream, table) => {}
                    }
                }
                .instrument(tracing::debug_span!("connection", %peer)),
            );
        }
    }

    async fn connection(self: Arc<Self>, stream: TcpStream, table: Table) {
        let protocol = sniff(&stream).await;
        tracing::debug!(?protocol, "connection");
        let service = |http2: bool| {
            let (router, table) = (self.clone(), table.clone());
            hyper::service::service_fn(move |request| {
                let route = table.read().unwrap_or_else(|e| e.into_inner()).clone();
                router.clone().route(route, request, http2)
            })
        };
        let io = TokioIo::new(stream);
        let served = match protocol {
            Protocol::Http1 => {
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service(false))
                    .with_upgrades()
                    .await
            }
            Protocol::Http2 => {
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(io, service(true))
                    .await
            }
            Protocol::Opaque => {
                let route = table.read().unwrap_or_else(|e| e.into_inner()).clone();
                self.pass_through(io.into_inner(), &route).await;
                return;
            }
        };
        if let Err(error) = served {
            tracing::debug!(%error, "connection ended");
        }
    }

    /// Where a request goes: the first session whose header matches, else an endpoint.
    fn upstream<'r>(&self, route: &'r Route, headers: &HeaderMap) -> Option<Upstream<'r>> {
        if let Some(session) = route.sessions.iter().find(|s| s.matches(headers)) {
            return Some(Upstream::Session(session));
        }
        self.endpoint(route).map(Upstream::Endpoint)
    }

    fn endpoint(&self, route: &Route) -> Option<SocketAddr> {
        if route.endpoints.is_empty() {
            return None;
        }
        let n = self.next_endpoint.fetch_add(1, Ordering::Relaxed);
        Some(route.endpoints[n % route.endpoints.len()])
    }

    async fn route(
        self: Arc<Self>,
        route: Arc<Route>,
        mut request: Request<Incoming>,
        http2: bool,
    ) -> Result<Response<Body>, Infallible> {
        let Some(upstream) = self.upstream(&route, request.headers()) else {
            return Ok(error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "kt mesh: the service has no ready endpoint",
            ));
        };
        tracing::debug!(method = %request.method(), path = %request.uri().path(), to = %upstream, "request");
        if !http2 {
            decline_h2c(request.headers_mut());
            if is_upgrade(request.headers()) {
                return Ok(self.upgrade(request, upstream).await);
            }
        }
        let path = request
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        let Ok(uri) = format!("http://{}{path}", upstream.address()).parse() else {
            return Ok(error_response(
                StatusCode::BAD_REQUEST,
                "kt mesh: bad request target",
            ));
        };
        *request.uri_mut() = uri;
        strip_hop_by_hop(request.headers_mut());
        let client = if http2 { &self.http2 } else { &self.http1 };
        match client.request(request).await {
            Ok(response) => {
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Ok(Response::from_parts(parts, body.boxed()))
            }
            Err(error) => {
                tracing::debug!(%error, to = %upstream, "upstream failed");
                Ok(error_response(
                    StatusCode::BAD_GATEWAY,
                    &format!("kt mesh: {upstream} did not answer"),
                ))
            }
        }
    }

    /// An HTTP/1.1 upgrade: the request goes to `upstream` on a connection of its own; on
    /// `101` both sides are spliced once hyper hands them over.
    async fn upgrade(
        &self,
        mut request: Request<Incoming>,
        upstream: Upstream<'_>,
    ) -> Response<Body> {
        let downstream = hyper::upgrade::on(&mut request);
        let to = upstream.address();
        let sender = async {
            let stream = TcpStream::connect(to).await.ok()?;
            let _ = stream.set_nodelay(true);
            let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .ok()?;
            self.tasks.spawn(async move {
                let _ = connection.with_upgrades().await;
            });
            Some(sender)
        };
        let Some(mut sender) = sender.await else {
            return error_response(
                StatusCode::BAD_GATEWAY,
                &format!("kt mesh: {upstream} did not answer"),
            );
        };
        let mut response = match sender.send_request(request).await {
            Ok(response) => response,
            Err(error) => {
                tracing::debug!(%error, %to, "upgrade request failed");
                return error_response(
                    StatusCode::BAD_GATEWAY,
                    &format!("kt mesh: {upstream} did not answer"),
                );
            }
        };
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            let upstream_io = hyper::upgrade::on(&mut response);
            let shutdown = self.shutdown.clone();
            self.tasks.spawn(async move {
                let (Ok(client), Ok(server)) = tokio::join!(downstream, upstream_io) else {
                    return;
                };
                let (mut client, mut server) = (TokioIo::new(client), TokioIo::new(server));
                tokio::select! {
                    () = shutdown.cancelled() => {}
                    _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                }
            });
        }
        response.map(http_body_util::BodyExt::boxed)
    }

    /// Not HTTP: the bytes go to an endpoint unchanged.
    async fn pass_through(&self, mut client: TcpStream, route: &Route) {
        let Some(endpoint) = self.endpoint(route) else {
            return;
        };
        match TcpStream::connect(endpoint).await {
            Ok(mut server) => {
                let _ = server.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            }
            Err(error) => tracing::debug!(%error, %endpoint, "endpoint did not answer"),
        }
    }
}

/// A request's destination.
#[derive(Clone, Copy)]
enum Upstream<'r> {
    Session(&'r MeshTarget),
    Endpoint(SocketAddr),
}

impl Upstream<'_> {
    fn address(&self) -> SocketAddr {
        match self {
            Self::Session(session) => session.to,
            Self::Endpoint(address) => *address,
        }
    }
}

impl std::fmt::Display for Upstream<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Session(s) => write!(f, "the workstation of {} (session {})", s.owner, s.session),
            Self::Endpoint(address) => write!(f, "endpoint {address}"),
        }
    }
}

/// Waits for the first bytes (at most [`SNIFF_WINDOW`]) and tells the protocol from them.
async fn sniff(stream: &TcpStream) -> Protocol {
    let deadline = tokio::time::Instant::now() + SNIFF_WINDOW;
    let mut buffer = [0u8; 32];
    loop {
        let seen = match tokio::time::timeout_at(deadline, stream.peek(&mut buffer)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => return Protocol::Opaque,
        };
        if let Some(protocol) = classify(&buffer[..seen]) {
            return protocol;
        }
        // `peek` returns at once while the bytes seen so far are all there is: wait a
        // moment for the rest of the first segment.
        if tokio::time::Instant::now() >= deadline {
            return Protocol::Opaque;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Whether an HTTP/1.1 request asks to switch protocols (RFC 9110 §7.8): an `Upgrade`
/// header and `upgrade` among the `Connection` options.
fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE) && connection_has(headers, "upgrade")
}

fn connection_has(headers: &HeaderMap, option: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|o| o.trim().eq_ignore_ascii_case(option))
}

/// Removes an `Upgrade: h2c` offer (and its `HTTP2-Settings`), so the request is answered
/// over HTTP/1.1 (see the module doc).
fn decline_h2c(headers: &mut HeaderMap) {
    let h2c = headers
        .get_all(header::UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim().eq_ignore_ascii_case("h2c"));
    if h2c {
        headers.remove(header::UPGRADE);
        headers.remove("http2-settings");
        remove_connection_options(headers);
    }
}

/// Drops the `Connection` header and the fields it names (RFC 9110 §7.6.1).
fn remove_connection_options(headers: &mut HeaderMap) {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|o| o.trim().to_ascii_lowercase())
        .filter(|o| !o.is_empty() && o != "close" && o != "keep-alive")
        .collect();
    for name in named {
        headers.remove(name.as_str());
    }
    headers.remove(header::CONNECTION);
}

/// Removes the hop-by-hop fields a proxy must not forward (RFC 9110 §7.6.1); `TE: trailers`
/// is kept, gRPC needs it.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    remove_connection_options(headers);
    for name in [
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
    ] {
        headers.remove(name);
    }
    headers.remove(header::TRANSFER_ENCODING);
    headers.remove(header::UPGRADE);
    let te_trailers = headers
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    headers.remove(header::TE);
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

fn error_response(status: StatusCode, text: &str) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from(format!("{text}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_bytes_tell_the_protocol() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"OPTIONS * HTTP/1.1"), Some(Protocol::Http1));
        assert_eq!(classify(H2_PREFACE), Some(Protocol::Http2));
        assert_eq!(
            classify(b"PRI * HTTP/2"),
            None,
            "an incomplete preface waits"
        );
        assert_eq!(classify(b"POS"), None, "an incomplete method waits");
        assert_eq!(classify(b""), None);
        assert_eq!(classify(b"\x16\x03\x01\x02"), Some(Protocol::Opaque), "TLS");
        assert_eq!(classify(b"get / HTTP/1.1"), Some(Protocol::Opaque));
        assert_eq!(classify(b"SSH-2.0-OpenSSH"), Some(Protocol::Opaque));
        assert_eq!(classify(&[b'A'; 30]), Some(Protocol::Opaque));
    }

    /// Regression (fuzz target `mesh_router`): 24 capitals were opaque, but 27 capitals and a
    /// space in one read were HTTP/1, so the decision depended on how the bytes arrived.
    #[test]
    fn a_decision_does_not_depend_on_where_the_first_read_ends() {
        let line = b"GETOOOOOOOOOOOOOOOOOOOOOOOO / HTTP/1.1\r\n";
        let first = (1..=line.len()).find_map(|n| classify(&line[..n]));
        assert_eq!(first, Some(Protocol::Opaque));
        for n in 24..=line.len() {
            assert_eq!(classify(&line[..n]), first, "after {n} bytes");
        }
        let longest = b"ABCDEFGHIJKLMNOPQRSTUVW / HTTP/1.1";
        assert_eq!(classify(longest), Some(Protocol::Http1), "23 letters");
    }

    #[test]
    fn hop_by_hop_fields_go_and_te_trailers_stays() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, "keep-alive, X-Private".parse().unwrap());
        headers.insert("x-private", "1".parse().unwrap());
        headers.insert("keep-alive", "timeout=5".parse().unwrap());
        headers.insert(header::TE, "trailers, deflate".parse().unwrap());
        headers.insert("version", "feo3x".parse().unwrap());
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 2, "{headers:?}");
        assert_eq!(headers[header::TE], "trailers");
        assert_eq!(headers["version"], "feo3x");
    }

    #[test]
    fn an_h2c_offer_is_declined_and_a_websocket_upgrade_kept() {
        let mut h2c = HeaderMap::new();
        h2c.insert(
            header::CONNECTION,
            "Upgrade, HTTP2-Settings".parse().unwrap(),
        );
        h2c.insert(header::UPGRADE, "h2c".parse().unwrap());
        h2c.insert(
            "http2-settings",
            "AAMAAABkAAQAoAAAAAIAAAAA".parse().unwrap(),
        );
        decline_h2c(&mut h2c);
        assert!(h2c.is_empty(), "{h2c:?}");
        assert!(!is_upgrade(&h2c));

        let mut ws = HeaderMap::new();
        ws.insert(header::CONNECTION, "keep-alive, Upgrade".parse().unwrap());
        ws.insert(header::UPGRADE, "websocket".parse().unwrap());
        decline_h2c(&mut ws);
        assert!(is_upgrade(&ws));
    }
}
