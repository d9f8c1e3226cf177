//! `--dnsMode localDNS`: a resolver on the workstation (hickory-server on UDP and TCP) that
//! answers the cluster's names from the cluster DNS, asked through the tunnel, and every
//! other name from the resolver the machine had (ktctl v0.3.7 §3.2 step 7c: sources asked
//! in the `localDNS:<order>` order, the first non-empty answer wins, answers cached for
//! `--dnsCacheTtl` seconds and empty ones for half of it; `--ingressIp` answers the
//! namespace's Ingress hosts).
//!
//! Which names are the cluster's is [`super::plan::cluster_name`]: a short name is a Service
//! of the current namespace, `svc.ns` one of another, and the workstation's own search
//! domain (which the system resolver appends first) is taken off. The cluster is asked for
//! the full name, and the answer is given back under the name that was asked (as v0.3.7's
//! shadow DNS does): stub resolvers drop records named otherwise.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Header, HeaderCounts, Message, MessageType, OpCode, Query, ResponseCode},
    rr::{Name, RData, Record, RecordType, rdata::A},
};
use hickory_server::{
    net::runtime::Time,
    server::{Request, RequestHandler, ResponseHandler, ResponseInfo},
    zone_handler::MessageResponseBuilder,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream, UdpSocket},
};
use tokio_util::sync::CancellationToken;

use super::plan::{DnsSource, cluster_name};
use crate::ssh_client::SshPool;

/// Where the local resolver listens: a loopback address of its own, so that it never
/// collides with systemd-resolved (127.0.0.53/54) or a local dnsmasq (127.0.0.1).
pub(super) const LISTEN: SocketAddr =
    SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 153)), 53);
/// How long one source may take to answer one question.
const SOURCE_TIMEOUT: Duration = Duration::from_secs(3);
/// TTL of `--ingressIp` answers (v0.3.7's).
const INGRESS_TTL: u32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("failed to listen for DNS on {protocol} {addr}")]
    Listen {
        protocol: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// How questions reach the cluster DNS: a DNS server that speaks TCP, reached over the
/// tunnel (the agent dials the cluster DNS; a shadow's own relay listens on its port 53).
#[derive(Clone)]
pub(super) struct ClusterDns {
    pub pool: Arc<SshPool>,
    pub host: String,
    pub port: u16,
}

/// The resolver's configuration.
#[derive(Clone)]
pub(super) struct ResolverConfig {
    pub namespace: String,
    pub cluster_domain: String,
    /// The workstation's own search domains (its resolv.conf `search`/`domain`).
    pub local_domains: Vec<String>,
    pub order: Vec<DnsSource>,
    pub cluster: ClusterDns,
    /// The nameserver the machine used before connect (`upstream`).
    pub upstream: Option<SocketAddr>,
    /// `--dnsCacheTtl`.
    pub cache_ttl: Duration,
    /// `--ingressIp`, with the Ingress hosts it answers for (kept current by a watch).
    pub ingress: Option<(IpAddr, Arc<RwLock<HashSet<String>>>)>,
}

/// What a source said about one question.
#[derive(Clone, Debug)]
struct Outcome {
    code: ResponseCode,
    answers: Vec<Record>,
    authorities: Vec<Record>,
}

impl Outcome {
    fn failed() -> Self {
        Self {
            code: ResponseCode::ServFail,
            answers: Vec::new(),
            authorities: Vec::new(),
        }
    }

    /// Records, then an existing name without records of the type, then NXDOMAIN, then
    /// failures: the best of several outcomes is the highest.
    fn rank(&self) -> u8 {
        match self.code {
            ResponseCode::NoError if !self.answers.is_empty() => 3,
            ResponseCode::NoError => 2,
            ResponseCode::NXDomain => 1,
            _ => 0,
        }
    }
}

/// The local resolver.
pub(super) struct Resolver {
    config: ResolverConfig,
    /// (lower-case name, type) → (until, outcome).
    cache: Mutex<HashMap<(String, RecordType), (Instant, Outcome)>>,
}

impl Resolver {
    pub(super) fn new(config: ResolverConfig) -> Self {
        Self {
            config,
            cache: Mutex::default(),
        }
    }

    /// The machine's resolver it asks (`upstream`), as `address:port`; empty when none.
    pub(super) fn upstream(&self) -> String {
        self.config
            .upstream
            .map(|at| at.to_string())
            .unwrap_or_default()
    }

    /// The response to one query message.
    pub(super) async fn respond(&self, request: &Message) -> Message {
        let mut response = Message::response(request.metadata.id, OpCode::Query);
        response.metadata.message_type = MessageType::Response;
        response.metadata.recursion_desired = request.metadata.recursion_desired;
        response.metadata.recursion_available = true;
        let Some(question) = request.queries.first().cloned() else {
            response.metadata.response_code = ResponseCode::FormErr;
            return response;
        };
        response.add_query(question.clone());
        let mut outcome = self.resolve(&question).await;
        // A cached answer carries the spelling of whoever asked first.
        rename(&mut outcome.answers, &question.name, &question.name);
        response.metadata.response_code = outcome.code;
        response.answers = outcome.answers;
        response.authorities = outcome.authorities;
        response
    }

    async fn resolve(&self, question: &Query) -> Outcome {
        let asked = question
            .name
            .to_ascii()
            .trim_end_matches('.')
            .to_ascii_lowercase();
        if let Some(outcome) = self.ingress(&asked, question) {
            return outcome;
        }
        let key = (asked.clone(), question.query_type);
        let now = Instant::now();
        if let Some((until, outcome)) = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            && *until > now
        {
            return outcome.clone();
        }
        let config = &self.config;
        let in_cluster = cluster_name(
            &asked,
            &config.namespace,
            &config.cluster_domain,
            &config.local_domains,
        );
        let mut best = Outcome::failed();
        for source in &config.order {
            let reply = match source {
                DnsSource::Cluster => {
                    let Some(full) = &in_cluster else { continue };
                    self.ask_cluster(full, question).await
                }
                DnsSource::Upstream => match config.upstream {
                    Some(server) => ask_server(server, false, question).await,
                    None => continue,
                },
                DnsSource::Server { address, tcp } => ask_server(*address, *tcp, question).await,
            };
            match reply {
                Ok(reply) => {
                    let answered = reply.rank() == 3;
                    if reply.rank() > best.rank() {
                        best = reply;
                    }
                    if answered {
                        break;
                    }
                }
                Err(error) => {
                    tracing::debug!(name = %asked, source = ?source, %error, "DNS source did not answer")
                }
            }
        }
        if best.rank() > 0 {
            let ttl = if best.rank() == 3 {
                config.cache_ttl
            } else {
                config.cache_ttl / 2
            };
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            // Expired entries go when the cache is written: it holds one TTL of names.
            cache.retain(|_, (until, _)| *until > now);
            cache.insert(key, (now + ttl, best.clone()));
        }
        best
    }

    /// The first address the cluster DNS gives for `name`, when it is a cluster name.
    pub(super) async fn cluster_address(&self, name: &str) -> Option<IpAddr> {
        let config = &self.config;
        let full = cluster_name(
            name,
            &config.namespace,
            &config.cluster_domain,
            &config.local_domains,
        )?;
        let asked = Name::from_ascii(format!("{}.", name.trim_end_matches('.'))).ok()?;
        let outcome = self
            .ask_cluster(&full, &Query::query(asked, RecordType::A))
            .await
            .ok()?;
        outcome.answers.iter().find_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            _ => None,
        })
    }

    /// `--ingressIp`'s answer for an Ingress host (A only; other types get no records).
    fn ingress(&self, asked: &str, question: &Query) -> Option<Outcome> {
        let (ip, hosts) = self.config.ingress.as_ref()?;
        let known = hosts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|host| {
                host == asked
                    || host
                        .strip_prefix("*.")
                        .is_some_and(|suffix| asked.ends_with(&format!(".{suffix}")))
            });
        if !known {
            return None;
        }
        let answers = match (question.query_type, ip) {
            (RecordType::A, IpAddr::V4(v4)) => vec![Record::from_rdata(
                question.name.clone(),
                INGRESS_TTL,
                RData::A(A(*v4)),
            )],
            _ => Vec::new(),
        };
        Some(Outcome {
            code: ResponseCode::NoError,
            answers,
            authorities: Vec::new(),
        })
    }

    /// `full` asked of the cluster DNS over TCP through the tunnel.
    async fn ask_cluster(&self, full: &str, question: &Query) -> std::io::Result<Outcome> {
        let name = Name::from_ascii(format!("{full}.")).map_err(std::io::Error::other)?;
        let query = query_message(&name, question.query_type)?;
        let cluster = &self.config.cluster;
        let exchange = async {
            let channel = cluster
                .pool
                .open(&cluster.host, cluster.port)
                .await
                .map_err(std::io::Error::other)?;
            let mut stream = channel.into_stream();
            tcp_exchange(&mut stream, &query).await
        };
        let mut reply = tokio::time::timeout(SOURCE_TIMEOUT, exchange)
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        rename(&mut reply.answers, &name, &question.name);
        Ok(outcome(reply))
    }
}

/// A recursive query for `name` of `kind`, as wire bytes.
fn query_message(name: &Name, kind: RecordType) -> std::io::Result<Vec<u8>> {
    let mut query = Message::query();
    query.metadata.id = rand::random();
    query.metadata.recursion_desired = true;
    query.add_query(Query::query(name.clone(), kind));
    query.to_vec().map_err(std::io::Error::other)
}

fn outcome(reply: Message) -> Outcome {
    Outcome {
        code: reply.metadata.response_code,
        answers: reply.answers,
        authorities: reply.authorities,
    }
}

/// One DNS exchange over a stream (RFC 1035 §4.2.2: each message after its 2-byte length).
async fn tcp_exchange<S>(stream: &mut S, query: &[u8]) -> std::io::Result<Message>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let len = u16::try_from(query.len()).map_err(std::io::Error::other)?;
    let mut framed = len.to_be_bytes().to_vec();
    framed.extend_from_slice(query);
    stream.write_all(&framed).await?;
    stream.flush().await?;
    let len = stream.read_u16().await?;
    let mut reply = vec![0u8; usize::from(len)];
    stream.read_exact(&mut reply).await?;
    Message::from_vec(&reply).map_err(std::io::Error::other)
}

/// `question` asked of `server` (UDP, or TCP when asked or when the UDP answer is cut).
async fn ask_server(server: SocketAddr, tcp: bool, question: &Query) -> std::io::Result<Outcome> {
    let query = query_message(&question.name, question.query_type)?;
    let exchange = async {
        if !tcp {
            let socket = UdpSocket::bind(unspecified(server)).await?;
            socket.connect(server).await?;
            socket.send(&query).await?;
            let mut buf = vec![0u8; 4096];
            let id = u16::from_be_bytes([query[0], query[1]]);
            loop {
                let n = socket.recv(&mut buf).await?;
                match Message::from_vec(&buf[..n]) {
                    Ok(reply) if reply.metadata.id == id && !reply.metadata.truncation => {
                        return Ok(reply);
                    }
                    Ok(reply) if reply.metadata.id == id => break,
                    _ => continue,
                }
            }
        }
        let mut stream = TcpStream::connect(server).await?;
        tcp_exchange(&mut stream, &query).await
    };
    tokio::time::timeout(SOURCE_TIMEOUT, exchange)
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
        .map(outcome)
}

fn unspecified(peer: SocketAddr) -> SocketAddr {
    match peer {
        SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
    }
}

/// Records named `from` are renamed `to` (CNAME targets stay: they name other records).
fn rename(records: &mut [Record], from: &Name, to: &Name) {
    for record in records {
        // Name equality ignores case, as DNS does.
        if record.name == *from {
            record.name = to.clone();
        }
    }
}

/// hickory-server's handler: every request through [`Resolver::respond`].
struct Handler(Arc<Resolver>);

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let failed = || {
            let mut metadata = request.metadata;
            metadata.message_type = MessageType::Response;
            metadata.response_code = ResponseCode::ServFail;
            ResponseInfo::from(Header {
                metadata,
                counts: HeaderCounts::default(),
            })
        };
        let Ok(message) = Message::from_vec(request.as_slice()) else {
            return failed();
        };
        let response = self.0.respond(&message).await;
        let builder = MessageResponseBuilder::from_message_request(request);
        let reply = builder.build(
            response.metadata,
            response.answers.iter(),
            response.authorities.iter(),
            std::iter::empty(),
            response.additionals.iter(),
        );
        match response_handle.send_response(reply).await {
            Ok(info) => info,
            Err(error) => {
                tracing::debug!(%error, "failed to send a DNS response");
                failed()
            }
        }
    }
}

/// Serves `resolver` on UDP and TCP at `addr` until `stop`: binds both now (so an address
/// in use is an error here, naming it) and returns the server to run.
pub(super) async fn serve(
    resolver: Arc<Resolver>,
    addr: SocketAddr,
    stop: CancellationToken,
) -> Result<impl Future<Output = ()>, DnsError> {
    let listen = |protocol: &'static str| {
        move |source: std::io::Error| DnsError::Listen {
            protocol,
            addr,
            source,
        }
    };
    let udp = UdpSocket::bind(addr).await.map_err(listen("udp"))?;
    let tcp = TcpListener::bind(addr).await.map_err(listen("tcp"))?;
    let mut server = hickory_server::Server::new(Handler(resolver));
    server.register_socket(udp);
    server.register_listener(tcp, Duration::from_secs(10), 64 * 1024);
    Ok(async move {
        stop.cancelled().await;
        if let Err(error) = server.shutdown_gracefully().await {
            tracing::debug!(%error, "local DNS server ended with an error");
        }
    })
}

/// One A question for `name` to the DNS server at `server` over UDP: the addresses it
/// answers (ktctl's own check that the resolver answers before it says it is ready).
pub(super) async fn lookup_a(server: SocketAddr, name: &str) -> std::io::Result<Vec<IpAddr>> {
    let name = Name::from_ascii(format!("{}.", name.trim_end_matches('.')))
        .map_err(std::io::Error::other)?;
    let question = Query::query(name, RecordType::A);
    let outcome = ask_server(server, false, &question).await?;
    Ok(outcome
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            _ => None,
        })
        .collect())
}
