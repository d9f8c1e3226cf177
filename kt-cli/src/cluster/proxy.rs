//! The HTTP proxy between kt and the API server, chosen as client-go chooses it, and the
//! connector that reaches the API server through it (HTTP `CONNECT`), for every request and
//! every port-forward stream alike.
//!
//! client-go (`rest.Config.Proxy`, set by `clientcmd` from the cluster's `proxy-url`) sends
//! everything through the kubeconfig's `proxy-url` when there is one, whatever the
//! environment says. Otherwise it uses Go's `http.ProxyFromEnvironment`
//! (`golang.org/x/net/http/httpproxy`): `HTTPS_PROXY` (then `https_proxy`) for an `https://`
//! server, `HTTP_PROXY` (then `http_proxy`) for an `http://` one, unless `NO_PROXY` (then
//! `no_proxy`) covers the server or the server is `localhost` or a loopback address. kube-rs
//! 5 differs (it applies `NO_PROXY` to the proxy's own address, and to `proxy-url` too), so
//! kt chooses by itself ([`choose`]) and dials by itself ([`ConnectVia`]).

use std::{
    future::Future,
    io,
    net::IpAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use http::Uri;
use hyper_util::{client::legacy::connect::HttpConnector, rt::TokioIo};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("invalid proxy URL '{value}' (from {origin})")]
    Url {
        value: String,
        origin: &'static str,
        #[source]
        source: http::uri::InvalidUri,
    },
    #[error("proxy URL '{url}' (from {origin}) has scheme '{scheme}': kt supports http:// proxies")]
    Scheme {
        url: String,
        origin: &'static str,
        scheme: String,
    },
    #[error("proxy {proxy} is unreachable")]
    Dial {
        proxy: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("proxy {proxy} did not open a tunnel to {target}: {reason}")]
    Refused {
        proxy: String,
        target: String,
        reason: String,
    },
    #[error("proxy {proxy} did not answer CONNECT {target} within {timeout:?}")]
    Timeout {
        proxy: String,
        target: String,
        timeout: Duration,
    },
}

/// The proxy settings of the environment (Go's `httpproxy.FromEnvironment`: the upper-case
/// name first, then the lower-case one; an empty value counts as unset).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProxyEnv {
    pub https_proxy: Option<String>,
    pub http_proxy: Option<String>,
    pub no_proxy: Option<String>,
}

impl ProxyEnv {
    pub fn from_env() -> Self {
        let any = |names: [&str; 2]| {
            names
                .iter()
                .find_map(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
        };
        Self {
            https_proxy: any(["HTTPS_PROXY", "https_proxy"]),
            http_proxy: any(["HTTP_PROXY", "http_proxy"]),
            no_proxy: any(["NO_PROXY", "no_proxy"]),
        }
    }
}

/// The proxy kt goes through, and where that choice came from (for messages).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proxy {
    pub url: Uri,
    pub origin: &'static str,
}

impl Proxy {
    /// The URL without its password (Go's `url.URL.Redacted`), for logs and errors.
    pub fn shown(&self) -> String {
        redacted(&self.url)
    }
}

/// The proxy for API server `cluster`: the kubeconfig's `proxy-url` if any, else the
/// environment's as Go's `http.ProxyFromEnvironment` picks it (see the module docs).
pub fn choose(
    cluster: &Uri,
    kubeconfig_proxy: Option<&str>,
    env: &ProxyEnv,
) -> Result<Option<Proxy>, ProxyError> {
    if let Some(value) = kubeconfig_proxy.filter(|v| !v.is_empty()) {
        return parse(value, "the kubeconfig's proxy-url").map(Some);
    }
    let (value, origin) = match cluster.scheme_str() {
        Some("http") => (env.http_proxy.as_deref(), "HTTP_PROXY"),
        _ => (env.https_proxy.as_deref(), "HTTPS_PROXY"),
    };
    let Some(value) = value else {
        return Ok(None);
    };
    let host = cluster
        .host()
        .unwrap_or_default()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = cluster
        .port_u16()
        .unwrap_or(if cluster.scheme_str() == Some("http") {
            80
        } else {
            443
        });
    if !use_proxy(host, port, env.no_proxy.as_deref().unwrap_or_default()) {
        tracing::debug!(host, port, "NO_PROXY covers the API server");
        return Ok(None);
    }
    parse(value, origin).map(Some)
}

/// Go's proxy URL parsing (`httpproxy.parseProxy`): a value without a scheme (`proxy:3128`)
/// means `http://proxy:3128`. Only `http://` proxies are dialled by kt.
fn parse(value: &str, origin: &'static str) -> Result<Proxy, ProxyError> {
    let with_scheme = if value.contains("://") {
        value.to_owned()
    } else {
        format!("http://{value}")
    };
    let url: Uri = with_scheme.parse().map_err(|source| ProxyError::Url {
        value: value.to_owned(),
        origin,
        source,
    })?;
    match url.scheme_str() {
        Some("http") if url.host().is_some() => Ok(Proxy { url, origin }),
        Some("http") => Err(ProxyError::Scheme {
            url: value.to_owned(),
            origin,
            scheme: "http without a host".into(),
        }),
        other => Err(ProxyError::Scheme {
            url: redacted(&url),
            origin,
            scheme: other.unwrap_or_default().to_owned(),
        }),
    }
}

/// Whether a request to `host:port` goes through the proxy under `no_proxy`, by Go's rules
/// (`httpproxy.Config.useProxy`): never for `localhost` or a loopback address; `*` covers
/// everything; an entry is an IP address or a CIDR (matching an address host only, no name
/// lookup), `name` (that name and its subdomains), `.name` or `*.name` (subdomains only),
/// each optionally with `:port` (then only that port); case-insensitive.
pub fn use_proxy(host: &str, port: u16, no_proxy: &str) -> bool {
    let host = host.to_ascii_lowercase();
    if host.is_empty() {
        return true;
    }
    if host == "localhost" {
        return false;
    }
    let ip: Option<IpAddr> = host.parse().ok();
    if ip.is_some_and(|ip| ip.is_loopback()) {
        return false;
    }
    for entry in no_proxy.split(',') {
        let entry = entry.trim().to_ascii_lowercase();
        if entry.is_empty() {
            continue;
        }
        if entry == "*" {
            return false;
        }
        if let Some(net) = cidr(&entry) {
            if ip.is_some_and(|ip| net.contains(ip)) {
                return false;
            }
            continue;
        }
        if let Ok(entry_ip) = entry.parse::<IpAddr>() {
            if ip == Some(entry_ip) {
                return false;
            }
            continue;
        }
        let (name, entry_port) = match entry.rsplit_once(':') {
            Some((name, p)) if !name.contains(':') => match p.parse::<u16>() {
                Ok(p) => (name.to_owned(), Some(p)),
                Err(_) => (entry.clone(), None),
            },
            _ => (entry.clone(), None),
        };
        if entry_port.is_some_and(|p| p != port) {
            continue;
        }
        // An entry with a port may name an address ("10.0.0.1:6443").
        if let (Ok(entry_ip), Some(ip)) = (name.parse::<IpAddr>(), ip) {
            if entry_ip == ip {
                return false;
            }
            continue;
        }
        let name = name.strip_prefix('*').unwrap_or(&name);
        let covered = match name.strip_prefix('.') {
            Some(_) => host.ends_with(name),
            None => host == name || host.ends_with(&format!(".{name}")),
        };
        if covered {
            return false;
        }
    }
    true
}

/// An address block `a.b.c.d/n` or `x::/n`.
struct Cidr {
    net: IpAddr,
    bits: u8,
}

fn cidr(entry: &str) -> Option<Cidr> {
    let (net, bits) = entry.split_once('/')?;
    let net: IpAddr = net.parse().ok()?;
    let bits: u8 = bits.parse().ok()?;
    let max = if net.is_ipv4() { 32 } else { 128 };
    (bits <= max).then_some(Cidr { net, bits })
}

impl Cidr {
    fn contains(&self, ip: IpAddr) -> bool {
        let prefix = |a: u128, width: u32| {
            let bits = u32::from(self.bits);
            if bits == 0 { 0 } else { a >> (width - bits) }
        };
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(i)) => {
                prefix(u32::from(n).into(), 32) == prefix(u32::from(i).into(), 32)
            }
            (IpAddr::V6(n), IpAddr::V6(i)) => {
                prefix(u128::from(n), 128) == prefix(u128::from(i), 128)
            }
            _ => false,
        }
    }
}

/// `url` with the password of its user information replaced by `xxxxx`, and without the
/// `/` path `http::Uri` adds.
fn redacted(url: &Uri) -> String {
    let authority = url.authority().map(|a| a.as_str()).unwrap_or_default();
    let shown = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:xxxxx@{host}"),
            None => format!("{userinfo}@{host}"),
        },
        None => authority.to_owned(),
    };
    let path = url
        .path_and_query()
        .map(|p| p.as_str())
        .filter(|p| *p != "/")
        .unwrap_or_default();
    match url.scheme_str() {
        Some(scheme) => format!("{scheme}://{shown}{path}"),
        None => format!("{shown}{path}"),
    }
}

/// `Proxy-Authorization: Basic …` for the proxy URL's user information, percent-decoded
/// (Go's transport sends `url.User` this way).
fn basic_auth(url: &Uri) -> Option<String> {
    use base64::Engine as _;
    let (userinfo, _) = url.authority()?.as_str().rsplit_once('@')?;
    let decoded = percent_decode(userinfo);
    Some(format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(decoded)
    ))
}

fn percent_decode(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

/// The `CONNECT` request for `target` (`host:port`), as Go's transport writes it.
fn connect_request(target: &str, auth: Option<&str>) -> String {
    let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(auth) = auth {
        request.push_str(&format!("Proxy-Authorization: {auth}\r\n"));
    }
    request.push_str("\r\n");
    request
}

/// The status of a proxy's answer head: `Ok` for 200 (Go's transport accepts nothing else),
/// else the reason to report (`403 Forbidden`).
fn connect_status(head: &str) -> Result<(), String> {
    let status_line = head.lines().next().unwrap_or_default();
    let mut parts = status_line.splitn(2, ' ');
    let version = parts.next().unwrap_or_default();
    let status = parts.next().unwrap_or_default().trim();
    if !version.starts_with("HTTP/") {
        return Err(format!("not an HTTP answer: '{status_line}'"));
    }
    if status.split(' ').next() == Some("200") {
        Ok(())
    } else {
        Err(status.to_owned())
    }
}

/// `host:port` of a connector destination (443 for `https` without a port).
fn target_of(dst: &Uri) -> Option<String> {
    let host = dst.host()?;
    let port = dst.port_u16().unwrap_or(match dst.scheme_str() {
        Some("http") => 80,
        _ => 443,
    });
    Some(format!("{host}:{port}"))
}

/// A connector (a `tower::Service<Uri>` for hyper) that opens each connection as an HTTP
/// `CONNECT` tunnel through `proxy`; TLS to the API server then runs inside the tunnel.
/// kube-rs's port-forward is an upgraded request on such a connection, so the tunnel carries
/// the port-forward stream too.
#[derive(Clone)]
pub struct ConnectVia {
    dial: HttpConnector,
    proxy: Uri,
    shown: Arc<str>,
    auth: Option<Arc<str>>,
    timeout: Duration,
}

impl ConnectVia {
    /// `dial` connects to the proxy (its TCP options apply to the tunnel's connection);
    /// `timeout` bounds the dial and the proxy's answer together.
    pub fn new(proxy: &Proxy, dial: HttpConnector, timeout: Option<Duration>) -> Self {
        Self {
            dial,
            shown: proxy.shown().into(),
            auth: basic_auth(&proxy.url).map(Into::into),
            proxy: proxy.url.clone(),
            timeout: timeout.unwrap_or(Duration::from_secs(30)),
        }
    }
}

impl tower::Service<Uri> for ConnectVia {
    type Response = TokioIo<TcpStream>;
    type Error = ProxyError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, ProxyError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let mut dial = self.dial.clone();
        let (proxy, shown, auth, timeout) = (
            self.proxy.clone(),
            self.shown.clone(),
            self.auth.clone(),
            self.timeout,
        );
        Box::pin(async move {
            let target = target_of(&dst).ok_or_else(|| ProxyError::Refused {
                proxy: shown.to_string(),
                target: dst.to_string(),
                reason: "the destination has no host".into(),
            })?;
            let tunnel = async {
                let mut conn =
                    tower::Service::call(&mut dial, proxy)
                        .await
                        .map_err(|e| ProxyError::Dial {
                            proxy: shown.to_string(),
                            source: Box::new(e),
                        })?;
                let io_error = |e: io::Error| ProxyError::Dial {
                    proxy: shown.to_string(),
                    source: Box::new(e),
                };
                let stream = conn.inner_mut();
                stream
                    .write_all(connect_request(&target, auth.as_deref()).as_bytes())
                    .await
                    .map_err(io_error)?;
                // Byte by byte up to the blank line: nothing of the tunnel is read ahead.
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    if head.len() > 16 * 1024 {
                        return Err(ProxyError::Refused {
                            proxy: shown.to_string(),
                            target: target.clone(),
                            reason: "answer head longer than 16 KiB".into(),
                        });
                    }
                    let byte = stream.read_u8().await.map_err(io_error)?;
                    head.push(byte);
                }
                connect_status(&String::from_utf8_lossy(&head)).map_err(|reason| {
                    ProxyError::Refused {
                        proxy: shown.to_string(),
                        target: target.clone(),
                        reason,
                    }
                })?;
                tracing::debug!(proxy = %shown, %target, "tunnel open");
                Ok(conn)
            };
            tokio::time::timeout(timeout, tunnel)
                .await
                .unwrap_or_else(|_| {
                    Err(ProxyError::Timeout {
                        proxy: shown.to_string(),
                        target: target.clone(),
                        timeout,
                    })
                })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(https: Option<&str>, no_proxy: Option<&str>) -> ProxyEnv {
        ProxyEnv {
            https_proxy: https.map(Into::into),
            http_proxy: None,
            no_proxy: no_proxy.map(Into::into),
        }
    }

    fn server() -> Uri {
        Uri::from_static("https://172.30.0.1:6443")
    }

    #[test]
    fn the_kubeconfig_proxy_wins_and_ignores_no_proxy() {
        let e = env(Some("http://env:3128"), Some("*"));
        let chosen = choose(&server(), Some("http://kc:8080"), &e)
            .unwrap()
            .unwrap();
        assert_eq!(chosen.url, Uri::from_static("http://kc:8080"));
        assert_eq!(chosen.origin, "the kubeconfig's proxy-url");
    }

    #[test]
    fn https_proxy_applies_unless_no_proxy_covers_the_server() {
        let chosen = choose(&server(), None, &env(Some("proxy:3128"), None))
            .unwrap()
            .unwrap();
        assert_eq!(chosen.url, Uri::from_static("http://proxy:3128"));
        for covering in [
            "172.30.0.1",
            "172.30.0.0/24",
            "*",
            "x.example, 172.30.0.1:6443",
        ] {
            assert_eq!(
                choose(&server(), None, &env(Some("proxy:3128"), Some(covering))).unwrap(),
                None,
                "{covering}"
            );
        }
        for not_covering in ["172.30.1.0/24", "172.30.0.1:443", "172.30.0.2"] {
            assert!(
                choose(
                    &server(),
                    None,
                    &env(Some("proxy:3128"), Some(not_covering))
                )
                .unwrap()
                .is_some(),
                "{not_covering}"
            );
        }
        assert_eq!(choose(&server(), None, &env(None, None)).unwrap(), None);
    }

    #[test]
    fn no_proxy_names_follow_go() {
        let no = |host: &str, port: u16, list: &str| !use_proxy(host, port, list);
        assert!(no("api.example.com", 443, "example.com"));
        assert!(no("example.com", 443, "example.com"));
        assert!(no("API.Example.com", 443, "example.COM"));
        assert!(!no("badexample.com", 443, "example.com"));
        assert!(no("api.example.com", 443, ".example.com"));
        assert!(!no("example.com", 443, ".example.com"));
        assert!(no("api.example.com", 443, "*.example.com"));
        assert!(no("api.example.com", 6443, "example.com:6443"));
        assert!(!no("api.example.com", 443, "example.com:6443"));
        assert!(no("localhost", 6443, ""));
        assert!(no("127.0.0.1", 6443, ""));
        assert!(no("::1", 6443, ""));
        assert!(no("fd00::5", 443, "fd00::/64"));
        // Addresses match address entries only: no name lookups.
        assert!(!no("kubernetes", 443, "10.0.0.0/8"));
    }

    #[test]
    fn proxy_urls_parse_as_go_parses_them() {
        let bad = choose(&server(), Some("socks5://p:1080"), &ProxyEnv::default()).unwrap_err();
        assert_eq!(
            bad.to_string(),
            "proxy URL 'socks5://p:1080' (from the kubeconfig's proxy-url) has scheme 'socks5': kt supports http:// proxies"
        );
        let with_user = parse("http://me:s%40cret@p:3128", "HTTPS_PROXY").unwrap();
        assert_eq!(with_user.shown(), "http://me:xxxxx@p:3128");
        assert_eq!(
            basic_auth(&with_user.url).as_deref(),
            Some("Basic bWU6c0BjcmV0")
        );
    }

    #[test]
    fn connect_requests_and_answers() {
        assert_eq!(
            connect_request("172.30.0.1:6443", None),
            "CONNECT 172.30.0.1:6443 HTTP/1.1\r\nHost: 172.30.0.1:6443\r\n\r\n"
        );
        assert_eq!(
            target_of(&Uri::from_static("https://api.example")).as_deref(),
            Some("api.example:443")
        );
        assert_eq!(
            connect_status("HTTP/1.1 200 Connection established\r\n\r\n"),
            Ok(())
        );
        assert_eq!(
            connect_status("HTTP/1.0 403 Forbidden\r\nX: y\r\n\r\n"),
            Err("403 Forbidden".into())
        );
        assert!(connect_status("SSH-2.0-x\r\n\r\n").is_err());
    }
}
