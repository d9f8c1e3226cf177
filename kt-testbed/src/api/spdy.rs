//! `kubectl port-forward` as kubectl 1.30+ does it: SPDY/3.1 tunnelled through a WebSocket
//! whose subprotocol is `SPDY/3.1+portforward.k8s.io` (KEP-4006), with the kubelet's
//! port-forward streams inside.
//!
//! Per forwarded connection the client opens two SPDY streams with the headers
//! `streamtype: error|data`, `port: N` and `requestid: R`; the server answers each with a
//! SYN_REPLY, and once both of a request are open, dials the port inside the pod. Bytes go
//! both ways on the data stream; a client FIN half-closes the pod connection; when the pod
//! side ends, both streams get a FIN. A failed dial writes the kubelet's message on the
//! error stream. Header blocks are zlib streams over the whole connection, with SPDY/3's
//! dictionary (`flate2` on zlib-rs, which takes preset dictionaries). client-go's SPDY
//! (spdystream) has no flow control, so WINDOW_UPDATE and SETTINGS are read and ignored.

use std::{
    collections::HashMap,
    sync::{Arc, LazyLock},
};

use axum::{
    body::Bytes,
    extract::ws::{Message, WebSocket, WebSocketUpgrade},
    response::Response,
};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use futures::{SinkExt as _, StreamExt as _};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::tcp::OwnedWriteHalf,
    sync::mpsc,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::api::{ApiServer, PodRuntime};

/// The WebSocket subprotocol of kubectl's tunnelled port-forward.
pub const TUNNEL_PROTOCOL: &str = "SPDY/3.1+portforward.k8s.io";

const VERSION: u16 = 3;
const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
const FLAG_FIN: u8 = 0x01;
/// Bytes read from a pod connection per DATA frame.
const CHUNK: usize = 32 * 1024;

/// SPDY/3's header compression dictionary (draft-mbelshe-httpbis-spdy-00 §2.6.10.1):
/// length-prefixed words, then a run of common values.
static DICTIONARY: LazyLock<Vec<u8>> = LazyLock::new(|| {
    const WORDS: &[&str] = &[
        "options",
        "head",
        "post",
        "put",
        "delete",
        "trace",
        "accept",
        "accept-charset",
        "accept-encoding",
        "accept-language",
        "accept-ranges",
        "age",
        "allow",
        "authorization",
        "cache-control",
        "connection",
        "content-base",
        "content-encoding",
        "content-language",
        "content-length",
        "content-location",
        "content-md5",
        "content-range",
        "content-type",
        "date",
        "etag",
        "expect",
        "expires",
        "from",
        "host",
        "if-match",
        "if-modified-since",
        "if-none-match",
        "if-range",
        "if-unmodified-since",
        "last-modified",
        "location",
        "max-forwards",
        "pragma",
        "proxy-authenticate",
        "proxy-authorization",
        "range",
        "referer",
        "retry-after",
        "server",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "user-agent",
        "vary",
        "via",
        "warning",
        "www-authenticate",
        "method",
        "get",
        "status",
        "200 OK",
        "version",
        "HTTP/1.1",
        "url",
        "public",
        "set-cookie",
        "keep-alive",
        "origin",
    ];
    const TAIL: &str = concat!(
        "100101201202205206300302303304305306307402405406407408409410411412413414415416417",
        "502504505203 Non-Authoritative Information204 No Content301 Moved Permanently",
        "400 Bad Request401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error",
        "501 Not Implemented503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct ",
        "Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,",
        "image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,",
        "text/javascript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8",
        "charset=iso-8859-1,utf-,*,enq=0.",
    );
    let mut out = Vec::new();
    for word in WORDS {
        out.extend((word.len() as u32).to_be_bytes());
        out.extend(word.as_bytes());
    }
    out.extend(TAIL.as_bytes());
    out
});

/// Why a SPDY session ended early.
#[derive(Debug, thiserror::Error)]
pub enum SpdyError {
    #[error("unsupported SPDY version {0}")]
    Version(u16),
    #[error("malformed {0} frame")]
    Malformed(&'static str),
    #[error("header block: {0}")]
    Headers(String),
}

/// One SPDY frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    Control { kind: u16, flags: u8, data: Bytes },
    Data { stream: u32, flags: u8, data: Bytes },
}

/// Splits the tunnelled byte stream into frames (a frame may span WebSocket messages).
#[derive(Default)]
pub struct FrameReader {
    buf: Vec<u8>,
}

impl FrameReader {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame, if one is buffered.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, SpdyError> {
        if self.buf.len() < 8 {
            return Ok(None);
        }
        let word = u32::from_be_bytes(self.buf[0..4].try_into().expect("4 bytes"));
        let flags = self.buf[4];
        let len = u32::from_be_bytes([0, self.buf[5], self.buf[6], self.buf[7]]) as usize;
        if self.buf.len() < 8 + len {
            return Ok(None);
        }
        let data = Bytes::copy_from_slice(&self.buf[8..8 + len]);
        self.buf.drain(..8 + len);
        if word & 0x8000_0000 != 0 {
            let version = ((word >> 16) & 0x7fff) as u16;
            if version != VERSION {
                return Err(SpdyError::Version(version));
            }
            Ok(Some(Frame::Control {
                kind: (word & 0xffff) as u16,
                flags,
                data,
            }))
        } else {
            Ok(Some(Frame::Data {
                stream: word & 0x7fff_ffff,
                flags,
                data,
            }))
        }
    }
}

fn control(kind: u16, flags: u8, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + data.len());
    out.extend((0x8000_0000u32 | u32::from(VERSION) << 16 | u32::from(kind)).to_be_bytes());
    out.extend(frame_length(flags, data.len()));
    out.extend(data);
    out
}

/// A DATA frame on `stream`.
pub fn data_frame(stream: u32, flags: u8, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + data.len());
    out.extend((stream & 0x7fff_ffff).to_be_bytes());
    out.extend(frame_length(flags, data.len()));
    out.extend(data);
    out
}

fn frame_length(flags: u8, len: usize) -> [u8; 4] {
    let [_, a, b, c] = (len as u32).to_be_bytes();
    [flags, a, b, c]
}

/// The header blocks of one connection: one zlib stream per direction, SPDY's dictionary.
pub struct HeaderCodec {
    inflate: Decompress,
    /// The zlib header (2 bytes, 4 more with a dictionary id) not yet read off the stream.
    inflate_header: Option<Vec<u8>>,
    deflate: Compress,
}

impl Default for HeaderCodec {
    fn default() -> Self {
        let mut deflate = Compress::new(Compression::fast(), true);
        deflate
            .set_dictionary(&DICTIONARY)
            .expect("a fresh compressor takes a dictionary");
        let mut inflate = Decompress::new(false);
        inflate
            .set_dictionary(&DICTIONARY)
            .expect("a raw inflater takes a dictionary before any data");
        Self {
            inflate,
            inflate_header: Some(Vec::new()),
            deflate,
        }
    }
}

impl HeaderCodec {
    /// The name/value pairs of a compressed header block.
    pub fn decode(&mut self, block: &[u8]) -> Result<Vec<(String, String)>, SpdyError> {
        let mut input = block;
        if let Some(header) = self.inflate_header.as_mut() {
            // Raw deflate after the zlib header: the dictionary is set already.
            let wanted = |h: &[u8]| {
                if h.len() >= 2 && h[1] & 0x20 != 0 {
                    6
                } else {
                    2
                }
            };
            while header.len() < wanted(header) && !input.is_empty() {
                header.push(input[0]);
                input = &input[1..];
            }
            if header.len() < wanted(header) {
                return Err(SpdyError::Headers("truncated zlib header".into()));
            }
            self.inflate_header = None;
        }
        let mut out = Vec::with_capacity(input.len() * 4 + 64);
        loop {
            let before = self.inflate.total_in();
            out.reserve(1024);
            self.inflate
                .decompress_vec(input, &mut out, FlushDecompress::Sync)
                .map_err(|e| SpdyError::Headers(e.to_string()))?;
            let used = (self.inflate.total_in() - before) as usize;
            input = &input[used..];
            if input.is_empty() && out.len() < out.capacity() {
                break;
            }
            if used == 0 && out.len() < out.capacity() {
                return Err(SpdyError::Headers("inflate made no progress".into()));
            }
        }
        parse_header_block(&out)
    }

    /// A compressed header block of `headers`.
    pub fn encode(&mut self, headers: &[(&str, &str)]) -> Vec<u8> {
        let mut plain = (headers.len() as u32).to_be_bytes().to_vec();
        for (name, value) in headers {
            for part in [name, value] {
                plain.extend((part.len() as u32).to_be_bytes());
                plain.extend(part.as_bytes());
            }
        }
        let mut out = Vec::with_capacity(plain.len() + 64);
        let mut input = plain.as_slice();
        loop {
            out.reserve(256);
            let before = self.deflate.total_in();
            self.deflate
                .compress_vec(input, &mut out, FlushCompress::Sync)
                .expect("compressing into a growing buffer");
            input = &input[(self.deflate.total_in() - before) as usize..];
            if input.is_empty() && out.len() < out.capacity() {
                return out;
            }
        }
    }
}

fn parse_header_block(block: &[u8]) -> Result<Vec<(String, String)>, SpdyError> {
    let mut rest = block;
    let mut take = |n: usize| -> Result<&[u8], SpdyError> {
        if rest.len() < n {
            return Err(SpdyError::Headers("truncated block".into()));
        }
        let (head, tail) = rest.split_at(n);
        rest = tail;
        Ok(head)
    };
    let count = u32::from_be_bytes(take(4)?.try_into().expect("4 bytes"));
    let mut out = Vec::new();
    for _ in 0..count {
        let mut text = || -> Result<String, SpdyError> {
            let len = u32::from_be_bytes(take(4)?.try_into().expect("4 bytes")) as usize;
            Ok(String::from_utf8_lossy(take(len)?).into_owned())
        };
        let name = text()?;
        let value = text()?;
        out.push((name, value));
    }
    Ok(out)
}

/// Upgrades to the tunnel and serves the pod's ports until the client goes.
pub fn port_forward(
    api: &Arc<ApiServer>,
    ws: WebSocketUpgrade,
    runtime: Arc<dyn PodRuntime>,
    ns: String,
    pod: String,
    uid: String,
) -> Response {
    let tasks = api.tasks.clone();
    let shutdown = api.stream_token();
    ws.protocols([TUNNEL_PROTOCOL]).on_upgrade(move |socket| {
        let session = Session {
            runtime,
            ns,
            pod,
            uid,
            tasks: tasks.clone(),
        };
        tasks.spawn(session.run(socket, shutdown));
        async {}
    })
}

/// One forwarded connection's streams, as they open.
#[derive(Default)]
struct Request {
    data: Option<u32>,
    error: Option<u32>,
    port: u16,
}

struct Session {
    runtime: Arc<dyn PodRuntime>,
    ns: String,
    pod: String,
    uid: String,
    tasks: TaskTracker,
}

impl Session {
    async fn run(self, socket: WebSocket, shutdown: CancellationToken) {
        let (mut ws_tx, mut ws_rx) = socket.split();
        let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(64);
        let session_end = shutdown.child_token();
        let writer = {
            let session_end = session_end.clone();
            self.tasks.spawn(async move {
                loop {
                    tokio::select! {
                        () = session_end.cancelled() => break,
                        frame = out_rx.recv() => match frame {
                            Some(frame) => {
                                if ws_tx.send(Message::Binary(frame.into())).await.is_err() {
                                    break;
                                }
                            }
                            None => break,
                        },
                    }
                }
                let _ = ws_tx.close().await;
            })
        };
        let mut reader = FrameReader::default();
        let mut codec = HeaderCodec::default();
        let mut requests: HashMap<String, Request> = HashMap::new();
        // Where the client's bytes for a data stream go: the pod connection's write half.
        let mut pod_writers: HashMap<u32, mpsc::Sender<Option<Bytes>>> = HashMap::new();
        'session: loop {
            let message = tokio::select! {
                () = session_end.cancelled() => break,
                m = ws_rx.next() => m,
            };
            match message {
                Some(Ok(Message::Binary(bytes))) => reader.push(&bytes),
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => continue,
            }
            loop {
                let frame = match reader.next_frame() {
                    Ok(Some(frame)) => frame,
                    Ok(None) => break,
                    // A client that speaks something else: the tunnel ends, as a kubelet's would.
                    Err(_) => break 'session,
                };
                match frame {
                    Frame::Control {
                        kind: SYN_STREAM,
                        data,
                        ..
                    } => {
                        if data.len() < 10 {
                            break 'session;
                        }
                        let stream = u32::from_be_bytes(data[0..4].try_into().expect("4 bytes"))
                            & 0x7fff_ffff;
                        let Ok(headers) = codec.decode(&data[10..]) else {
                            break 'session;
                        };
                        let mut reply = stream.to_be_bytes().to_vec();
                        reply.extend(codec.encode(&[]));
                        if out_tx.send(control(SYN_REPLY, 0, &reply)).await.is_err() {
                            break 'session;
                        }
                        let header = |name: &str| {
                            headers
                                .iter()
                                .find(|(n, _)| n == name)
                                .map(|(_, v)| v.clone())
                                .unwrap_or_default()
                        };
                        let request = requests.entry(header("requestid")).or_default();
                        request.port = header("port").parse().unwrap_or(0);
                        match header("streamtype").as_str() {
                            "data" => request.data = Some(stream),
                            "error" => request.error = Some(stream),
                            _ => {}
                        }
                        if let Request {
                            data: Some(data),
                            error: Some(error),
                            port,
                        } = *request
                        {
                            requests.remove(&header("requestid"));
                            let (tx, rx) = mpsc::channel(16);
                            pod_writers.insert(data, tx);
                            self.tasks.spawn(forward(
                                self.runtime.clone(),
                                Target {
                                    ns: self.ns.clone(),
                                    pod: self.pod.clone(),
                                    uid: self.uid.clone(),
                                    port,
                                },
                                (data, error),
                                rx,
                                out_tx.clone(),
                                session_end.clone(),
                            ));
                        }
                    }
                    Frame::Data {
                        stream,
                        flags,
                        data,
                    } => {
                        if let Some(tx) = pod_writers.get(&stream) {
                            if !data.is_empty() && tx.send(Some(data)).await.is_err() {
                                pod_writers.remove(&stream);
                            } else if flags & FLAG_FIN != 0 {
                                let _ = tx.send(None).await;
                                pod_writers.remove(&stream);
                            }
                        }
                    }
                    Frame::Control {
                        kind: RST_STREAM,
                        data,
                        ..
                    } if data.len() >= 4 => {
                        let stream = u32::from_be_bytes(data[0..4].try_into().expect("4 bytes"))
                            & 0x7fff_ffff;
                        pod_writers.remove(&stream);
                    }
                    // A ping of the client's: answered with the same id.
                    Frame::Control {
                        kind: PING, data, ..
                    } => {
                        if out_tx.send(control(PING, 0, &data)).await.is_err() {
                            break 'session;
                        }
                    }
                    Frame::Control { kind: GOAWAY, .. } => break 'session,
                    // SETTINGS, WINDOW_UPDATE, HEADERS, SYN_REPLY: nothing to do.
                    Frame::Control { .. } => {}
                }
            }
        }
        session_end.cancel();
        let _ = writer.await;
    }
}

/// Where a forwarded connection goes.
struct Target {
    ns: String,
    pod: String,
    uid: String,
    port: u16,
}

/// One forwarded connection: dial the pod's port, then copy both ways until the pod side
/// ends (FIN on both streams) or the session does.
async fn forward(
    runtime: Arc<dyn PodRuntime>,
    target: Target,
    (data, error): (u32, u32),
    mut from_client: mpsc::Receiver<Option<Bytes>>,
    out: mpsc::Sender<Vec<u8>>,
    session_end: CancellationToken,
) {
    let conn = match runtime.dial(&target.ns, &target.pod, target.port).await {
        Ok(conn) => conn,
        Err(e) => {
            let text = format!(
                "error forwarding port {} to pod {}, uid {}: failed to connect to localhost:{} inside namespace: {e}",
                target.port, target.pod, target.uid, target.port
            );
            let _ = out.send(data_frame(error, FLAG_FIN, text.as_bytes())).await;
            let _ = out.send(data_frame(data, FLAG_FIN, &[])).await;
            return;
        }
    };
    let (mut read, write) = conn.into_split();
    let to_pod = async move {
        let mut write: OwnedWriteHalf = write;
        while let Some(chunk) = from_client.recv().await {
            match chunk {
                Some(bytes) => {
                    if write.write_all(&bytes).await.is_err() {
                        break;
                    }
                }
                // The client's FIN: half-close, the pod may still answer.
                None => {
                    let _ = write.shutdown().await;
                    break;
                }
            }
        }
        // Keep the write half open until the pod side ends.
        std::future::pending::<()>().await;
    };
    let from_pod = async {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if out.send(data_frame(data, 0, &buf[..n])).await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = out.send(data_frame(data, FLAG_FIN, &[])).await;
        let _ = out.send(data_frame(error, FLAG_FIN, &[])).await;
    };
    tokio::select! {
        () = session_end.cancelled() => {}
        () = from_pod => {}
        () = to_pod => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dictionary_is_spdy3s() {
        assert_eq!(DICTIONARY.len(), 1423);
        // zlib's dictionary id of SPDY/3's dictionary (what Go's writer puts in its header).
        let mut compress = Compress::new(Compression::fast(), true);
        assert_eq!(compress.set_dictionary(&DICTIONARY).unwrap(), 0xe3c6_a7c2);
    }

    #[test]
    fn header_blocks_round_trip_over_one_stream_each_way() {
        // Two codecs, as the two ends of a connection: each one's encoder feeds the
        // other's decoder, block after block on the same zlib stream.
        let mut client = HeaderCodec::default();
        let mut server = HeaderCodec::default();
        let first = [("streamtype", "error"), ("port", "80"), ("requestid", "0")];
        let second = [("streamtype", "data"), ("port", "80"), ("requestid", "0")];
        for headers in [&first, &second] {
            let block = client.encode(headers);
            let decoded = server.decode(&block).unwrap();
            let decoded: Vec<(&str, &str)> = decoded
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .collect();
            assert_eq!(decoded, headers.to_vec());
        }
        assert!(client.decode(&server.encode(&[])).unwrap().is_empty());
    }

    #[test]
    fn frames_split_across_messages_are_reassembled() {
        let mut frames = control(PING, 0, &7u32.to_be_bytes());
        frames.extend(data_frame(3, FLAG_FIN, b"hello"));
        let mut reader = FrameReader::default();
        let mut seen = Vec::new();
        for byte in frames {
            reader.push(&[byte]);
            while let Some(frame) = reader.next_frame().unwrap() {
                seen.push(frame);
            }
        }
        assert_eq!(
            seen,
            vec![
                Frame::Control {
                    kind: PING,
                    flags: 0,
                    data: Bytes::from_static(&[0, 0, 0, 7])
                },
                Frame::Data {
                    stream: 3,
                    flags: FLAG_FIN,
                    data: Bytes::from_static(b"hello")
                },
            ]
        );
        let mut reader = FrameReader::default();
        reader.push(&[0x80, 0x02, 0, 1, 0, 0, 0, 0]);
        assert!(matches!(reader.next_frame(), Err(SpdyError::Version(2))));
    }
}
