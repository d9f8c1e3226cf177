//! The shadow's DNS relay: what the v0.3.7 shadow runs on port 53 when ktctl sets
//! `KT_DNS_PROTOCOL` (`../shared/reference/ktctl-v0.3.7.md` §4). The workstation's resolver
//! sends it names as the workstation sees them (`web`, `web.ns`, or with the workstation's own
//! search domain appended); the relay strips that local domain (`KT_LOCAL_DOMAIN`), expands the
//! name with the pod's search list the way a pod's resolver would, asks the pod's nameserver,
//! and answers under the name that was asked. Answers are cached for 60 s.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Message, MessageType, OpCode, Query, ResponseCode},
    rr::{Name, Record, RecordType},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream, UdpSocket},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// How long an answer is reused (v0.3.7 caches for the same time).
mod names;

pub use names::{ResolvConf, candidates};

pub const CACHE_TTL: Duration = Duration::from_secs(60);
/// How long one upstream attempt may take; two attempts per name.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum DnsRelayError {
    #[error("failed to read {path}")]
    ReadResolvConf {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} names no nameserver")]
    NoNameserver { path: PathBuf },
    #[error("failed to listen on {protocol} {addr}")]
    Listen {
        protocol: Protocol,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The transport the relay listens on (`KT_DNS_PROTOCOL`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        })
    }
}

#[derive(Clone, Debug)]
pub struct DnsConfig {
    pub protocol: Protocol,
    pub listen: SocketAddr,
    /// The pod's resolver configuration: nameserver, search list, ndots.
    pub resolv_conf: PathBuf,
    /// The workstation's own domains, stripped from names before expansion.
    pub local_domains: Vec<String>,
}

/// What upstream said about one name.
#[derive(Clone, Debug)]
struct Outcome {
    code: ResponseCode,
    answers: Vec<Record>,
    authorities: Vec<Record>,
}

impl Outcome {
    /// Which of several candidates' outcomes the client gets: records, then an existing
    /// name without records of the type (NODATA), then NXDOMAIN, then failures.
    fn rank(&self) -> u8 {
        match self.code {
            ResponseCode::NoError if !self.answers.is_empty() => 3,
            ResponseCode::NoError => 2,
            ResponseCode::NXDomain => 1,
            _ => 0,
        }
    }
}

/// Answers by (asked name, type), each kept for [`CACHE_TTL`].
#[derive(Default)]
struct Cache {
    entries: HashMap<(String, RecordType), (Instant, Outcome)>,
}

impl Cache {
    fn get(&mut self, key: &(String, RecordType), now: Instant) -> Option<Outcome> {
        match self.entries.get(key) {
            Some((until, outcome)) if *until > now => Some(outcome.clone()),
            Some(_) => {
                self.entries.remove(key);
                None
            }
            None => None,
        }
    }

    fn put(&mut self, key: (String, RecordType), outcome: Outcome, now: Instant) {
        // Expired entries go when the cache is written, so it holds at most a minute of names.
        self.entries.retain(|_, (until, _)| *until > now);
        self.entries.insert(key, (now + CACHE_TTL, outcome));
    }
}

/// Records named `from` are renamed `to`: the client asked for `to`.
fn rename(records: &mut [Record], from: &Name, to: &Name) {
    for record in records {
        // Name equality ignores case, as DNS does.
        if record.name == *from {
            record.name = to.clone();
        }
    }
}

/// The relay: shared by every listener task.
pub struct Relay {
    conf: ResolvConf,
    local_domains: Vec<String>,
    cache: Mutex<Cache>,
}

impl Relay {
    pub fn new(conf: ResolvConf, local_domains: Vec<String>) -> Self {
        Self {
            conf,
            local_domains,
            cache: Mutex::default(),
        }
    }

    /// The response to one wire-format query; `None` when it cannot be parsed at all.
    pub async fn respond(&self, query: &[u8]) -> Option<Vec<u8>> {
        let request = Message::from_vec(query).ok()?;
        let mut response = Message::response(request.metadata.id, OpCode::Query);
        response.metadata.message_type = MessageType::Response;
        response.metadata.recursion_desired = request.metadata.recursion_desired;
        response.metadata.recursion_available = true;
        let Some(question) = request.queries.first().cloned() else {
            response.metadata.response_code = ResponseCode::FormErr;
            return response.to_vec().ok();
        };
        response.add_query(question.clone());
        let mut outcome = self.resolve(&question).await;
        // A cached answer carries the spelling of whoever asked first.
        rename(&mut outcome.answers, &question.name, &question.name);
        response.metadata.response_code = outcome.code;
        response.answers = outcome.answers;
        response.authorities = outcome.authorities;
        response.to_vec().ok()
    }

    async fn resolve(&self, question: &Query) -> Outcome {
        let asked = question.name.to_ascii().to_ascii_lowercase();
        let key = (asked.clone(), question.query_type);
        if let Some(hit) = self
            .cache
            .lock()
            .expect("cache lock")
            .get(&key, Instant::now())
        {
            return hit;
        }
        let mut outcome = Outcome {
            code: ResponseCode::ServFail,
            answers: Vec::new(),
            authorities: Vec::new(),
        };
        for candidate in candidates(&asked, &self.conf, &self.local_domains) {
            let Ok(name) = Name::from_ascii(format!("{candidate}.")) else {
                continue;
            };
            match self.ask_upstream(&name, question.query_type).await {
                Ok(mut reply) => {
                    rename(&mut reply.answers, &name, &question.name);
                    let reply = Outcome {
                        code: reply.metadata.response_code,
                        answers: reply.answers,
                        authorities: reply.authorities,
                    };
                    let answered = reply.rank() == 3;
                    if reply.rank() > outcome.rank() {
                        outcome = reply;
                    }
                    if answered {
                        break;
                    }
                }
                Err(error) => {
                    tracing::debug!(%candidate, %error, "upstream DNS did not answer");
                }
            }
        }
        if outcome.rank() > 0 {
            self.cache
                .lock()
                .expect("cache lock")
                .put(key, outcome.clone(), Instant::now());
        }
        outcome
    }

    /// One question to the pod's nameserver over UDP, two attempts.
    async fn ask_upstream(&self, name: &Name, kind: RecordType) -> std::io::Result<Message> {
        let mut query = Message::query();
        query.metadata.id = rand::random();
        query.metadata.recursion_desired = true;
        query.add_query(Query::query(name.clone(), kind));
        let bytes = query.to_vec().map_err(std::io::Error::other)?;
        let socket = UdpSocket::bind(unspecified(self.conf.nameserver)).await?;
        socket.connect(self.conf.nameserver).await?;
        let mut buf = vec![0u8; 4096];
        for _ in 0..2 {
            socket.send(&bytes).await?;
            let deadline = tokio::time::Instant::now() + UPSTREAM_TIMEOUT;
            while let Ok(received) = tokio::time::timeout_at(deadline, socket.recv(&mut buf)).await
            {
                let n = received?;
                match Message::from_vec(&buf[..n]) {
                    Ok(reply) if reply.metadata.id == query.metadata.id => return Ok(reply),
                    _ => continue,
                }
            }
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer from {}", self.conf.nameserver),
        ))
    }
}

fn unspecified(peer: SocketAddr) -> SocketAddr {
    match peer {
        SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
    }
}

/// Serves the relay until `shutdown`.
pub async fn run(config: DnsConfig, shutdown: CancellationToken) -> Result<(), DnsRelayError> {
    let conf = ResolvConf::read(&config.resolv_conf)?;
    tracing::info!(
        protocol = %config.protocol,
        addr = %config.listen,
        nameserver = %conf.nameserver,
        search = ?conf.search,
        local_domains = ?config.local_domains,
        "DNS relay listening"
    );
    let relay = Arc::new(Relay::new(conf, config.local_domains));
    let listen_error = |source| DnsRelayError::Listen {
        protocol: config.protocol,
        addr: config.listen,
        source,
    };
    let tasks = TaskTracker::new();
    match config.protocol {
        Protocol::Udp => {
            let socket = Arc::new(UdpSocket::bind(config.listen).await.map_err(listen_error)?);
            serve_udp(socket, relay, &tasks, &shutdown).await;
        }
        Protocol::Tcp => {
            let listener = TcpListener::bind(config.listen)
                .await
                .map_err(listen_error)?;
            serve_tcp(listener, relay, &tasks, &shutdown).await;
        }
    }
    tasks.close();
    tasks.wait().await;
    Ok(())
}

async fn serve_udp(
    socket: Arc<UdpSocket>,
    relay: Arc<Relay>,
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
) {
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, peer) = tokio::select! {
            () = shutdown.cancelled() => return,
            received = socket.recv_from(&mut buf) => match received {
                Ok(r) => r,
                Err(error) => {
                    tracing::debug!(%error, "DNS receive failed");
                    continue;
                }
            },
        };
        let (query, socket, relay) = (buf[..n].to_vec(), socket.clone(), relay.clone());
        tasks.spawn(async move {
            if let Some(reply) = relay.respond(&query).await {
                let _ = socket.send_to(&reply, peer).await;
            }
        });
    }
}

async fn serve_tcp(
    listener: TcpListener,
    relay: Arc<Relay>,
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::debug!(%error, "DNS accept failed");
                    continue;
                }
            },
        };
        let (relay, stop) = (relay.clone(), shutdown.clone());
        tasks.spawn(async move {
            tokio::select! {
                () = serve_tcp_connection(stream, &relay) => {}
                () = stop.cancelled() => {}
            }
        });
    }
}

/// Length-prefixed queries (RFC 1035 §4.2.2), answered in order until the client closes.
async fn serve_tcp_connection(mut stream: TcpStream, relay: &Relay) {
    loop {
        let Ok(length) = stream.read_u16().await else {
            return;
        };
        let mut query = vec![0u8; usize::from(length)];
        if stream.read_exact(&mut query).await.is_err() {
            return;
        }
        let Some(reply) = relay.respond(&query).await else {
            return;
        };
        let Ok(length) = u16::try_from(reply.len()) else {
            return;
        };
        let mut framed = Vec::with_capacity(reply.len() + 2);
        framed.extend_from_slice(&length.to_be_bytes());
        framed.extend_from_slice(&reply);
        if stream.write_all(&framed).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A nameserver on loopback that knows one name.
    async fn upstream() -> SocketAddr {
        use hickory_proto::rr::{RData, rdata::A};
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
                let request = Message::from_vec(&buf[..n]).unwrap();
                let question = request.queries[0].clone();
                let mut reply = Message::response(request.metadata.id, OpCode::Query);
                if question.name == Name::from_ascii("web.default.svc.cluster.local.").unwrap() {
                    reply.add_answer(Record::from_rdata(
                        question.name.clone(),
                        5,
                        RData::A(A::new(10, 96, 0, 5)),
                    ));
                } else {
                    reply.metadata.response_code = ResponseCode::NXDomain;
                }
                reply.add_query(question);
                socket
                    .send_to(&reply.to_vec().unwrap(), peer)
                    .await
                    .unwrap();
            }
        });
        addr
    }

    async fn ask(relay: &Relay, name: &str) -> Message {
        let mut query = Message::query();
        query.metadata.id = 7;
        query.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        let reply = relay.respond(&query.to_vec().unwrap()).await.unwrap();
        Message::from_vec(&reply).unwrap()
    }

    #[tokio::test]
    async fn answers_come_back_under_the_asked_name() {
        let conf = ResolvConf {
            nameserver: upstream().await,
            ..names::tests::kube_pod()
        };
        let relay = Relay::new(conf, vec!["corp.example".into()]);
        // `Web.` is answered from the cache `web.` filled.
        for asked in ["web.", "WEB.corp.example.", "web.default.", "Web."] {
            let reply = ask(&relay, asked).await;
            assert_eq!(reply.metadata.id, 7);
            assert_eq!(
                reply.metadata.response_code,
                ResponseCode::NoError,
                "{asked}"
            );
            assert_eq!(reply.answers.len(), 1, "{asked}");
            // As spelled: Name's own equality ignores case.
            assert_eq!(reply.answers[0].name.to_string(), asked);
            assert_eq!(reply.answers[0].data.to_string(), "10.96.0.5");
        }
        let missing = ask(&relay, "nope.").await;
        assert_eq!(missing.metadata.response_code, ResponseCode::NXDomain);
        assert!(missing.answers.is_empty());
    }

    #[test]
    fn cache_entries_expire() {
        let mut cache = Cache::default();
        let now = Instant::now();
        let key = ("web".to_owned(), RecordType::A);
        let outcome = Outcome {
            code: ResponseCode::NoError,
            answers: Vec::new(),
            authorities: Vec::new(),
        };
        cache.put(key.clone(), outcome, now);
        assert!(cache.get(&key, now + CACHE_TTL / 2).is_some());
        assert!(cache.get(&key, now + CACHE_TTL).is_none());
        assert!(cache.entries.is_empty());
    }
}
