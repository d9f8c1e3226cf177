//! Long-lived responses of the API stand-in: watch event streams, server-side tables, and
//! the WebSocket channel protocols of `pods/portforward` (v4) and `pods/exec` (v5/v4).

use std::{sync::Arc, time::Duration};

use axum::{
    body::Bytes,
    extract::ws::{Message, WebSocket, WebSocketUpgrade},
    response::Response,
};
use futures::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    sync::{broadcast, mpsc},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use crate::{
    api::resources::ResourceType,
    api::store::{Event, EventKind, WatchFilter},
    api::{ApiServer, PodRuntime},
};

pub struct WatchOptions {
    pub bookmarks: bool,
    pub initial_events_end: bool,
    pub timeout: Duration,
    pub bookmark_interval: Duration,
    pub table: bool,
}

/// One watch event as a line of the stream.
pub fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn bookmark(rt: &ResourceType, rev: u64, initial_end: bool) -> Bytes {
    let mut meta = json!({"resourceVersion": rev.to_string()});
    if initial_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    event_line(
        "BOOKMARK",
        &json!({"kind": rt.kind, "apiVersion": rt.api_version(), "metadata": meta}),
    )
}

/// Streams a watch until its timeout, the client going away, lag or shutdown. Events at or
/// below `rev` were part of the initial state and are skipped.
#[expect(
    clippy::too_many_arguments,
    reason = "the state of one watch, handed over once"
)]
pub async fn run_watch(
    rt: &ResourceType,
    filter: &WatchFilter,
    initial: Vec<(EventKind, Value)>,
    mut rx: broadcast::Receiver<Arc<Event>>,
    rev: u64,
    options: WatchOptions,
    tx: &mpsc::Sender<Bytes>,
    shutdown: CancellationToken,
) {
    let render = |kind: EventKind, obj: Value| {
        let mut obj = obj;
        obj["apiVersion"] = json!(rt.api_version());
        obj["kind"] = json!(rt.kind);
        if options.table {
            let rv = obj["metadata"]["resourceVersion"].clone();
            obj = table(rt, &[obj], json!({"resourceVersion": rv}));
        }
        event_line(kind.as_str(), &obj)
    };
    for (kind, obj) in initial {
        if tx.send(render(kind, obj)).await.is_err() {
            return;
        }
    }
    if options.initial_events_end
        && options.bookmarks
        && tx.send(bookmark(rt, rev, true)).await.is_err()
    {
        return;
    }
    let deadline = Instant::now() + options.timeout;
    let mut last_seen = rev;
    let mut next_bookmark = Instant::now() + options.bookmark_interval;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tx.closed() => return,
            () = tokio::time::sleep_until(deadline) => {
                if options.bookmarks {
                    let _ = tx.send(bookmark(rt, last_seen, false)).await;
                }
                return;
            }
            () = tokio::time::sleep_until(next_bookmark) => {
                next_bookmark = Instant::now() + options.bookmark_interval;
                if options.bookmarks && tx.send(bookmark(rt, last_seen, false)).await.is_err() {
                    return;
                }
            }
            ev = rx.recv() => match ev {
                Ok(ev) => {
                    if ev.rev <= rev {
                        continue;
                    }
                    last_seen = last_seen.max(ev.rev);
                    if let Some((kind, obj)) = filter.apply(&ev) && tx.send(render(kind, obj)).await.is_err() {
                        return;
                    }
                }
                // A lagging watcher is closed; the client resumes from its last revision.
                Err(_) => return,
            },
        }
    }
}

/// An object's age as kubectl shows it (`45s`, `3m20s`, `5h`, `2d3h`), from its RFC 3339
/// creation time.
fn human_age(created: &str) -> String {
    let Ok(created) = chrono::DateTime::parse_from_rfc3339(created) else {
        return "<unknown>".into();
    };
    let secs = (chrono::Utc::now() - created.with_timezone(&chrono::Utc))
        .num_seconds()
        .max(0);
    human_duration(secs)
}

/// kubectl's `HumanDuration`.
fn human_duration(secs: i64) -> String {
    let (m, h, d) = (secs / 60, secs / 3600, secs / 86_400);
    match secs {
        s if s < 120 => format!("{s}s"),
        _ if m < 10 && secs % 60 != 0 => format!("{m}m{}s", secs % 60),
        _ if m < 180 => format!("{m}m"),
        _ if h < 8 && m % 60 != 0 => format!("{h}h{}m", m % 60),
        _ if h < 48 => format!("{h}h"),
        _ if h < 192 && h % 24 != 0 => format!("{d}d{}h", h % 24),
        _ if d < 730 => format!("{d}d"),
        _ => format!("{}y", d / 365),
    }
}

/// A workload's `READY` cell: ready replicas of the desired ones.
fn ready_of(o: &Value) -> Value {
    json!(format!(
        "{}/{}",
        o["status"]["readyReplicas"].as_i64().unwrap_or(0),
        o["spec"]["replicas"].as_i64().unwrap_or(0)
    ))
}

/// Renders the cells of one table row.
type CellsFn = Box<dyn Fn(&Value) -> Vec<Value>>;

/// A `meta.k8s.io/v1` Table for kubectl's server-side printing.
pub fn table(rt: &ResourceType, items: &[Value], metadata: Value) -> Value {
    let col = |name: &str, kind: &str, priority: u8| json!({"name": name, "type": kind, "format": if name == "Name" {"name"} else {""}, "description": name, "priority": priority});
    let age = |o: &Value| {
        json!(human_age(
            o["metadata"]["creationTimestamp"]
                .as_str()
                .unwrap_or_default()
        ))
    };
    let (columns, cells): (Vec<Value>, CellsFn) = match (rt.group.as_str(), rt.plural.as_str()) {
        ("", "pods") => (
            vec![
                col("Name", "string", 0),
                col("Ready", "string", 0),
                col("Status", "string", 0),
                col("Restarts", "string", 0),
                col("Age", "date", 0),
                col("IP", "string", 1),
                col("Node", "string", 1),
            ],
            Box::new(move |o| {
                let total = o["spec"]["containers"].as_array().map_or(0, Vec::len);
                let ready = o["status"]["containerStatuses"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|c| c["ready"] == true)
                    .count();
                let restarts: i64 = o["status"]["containerStatuses"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|c| c["restartCount"].as_i64())
                    .sum();
                let waiting = o["status"]["containerStatuses"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find_map(|c| c["state"]["waiting"]["reason"].as_str().map(String::from));
                let status = if o["metadata"].get("deletionTimestamp").is_some() {
                    "Terminating".to_owned()
                } else {
                    waiting.unwrap_or_else(|| {
                        o["status"]["phase"]
                            .as_str()
                            .unwrap_or("Pending")
                            .to_owned()
                    })
                };
                vec![
                    o["metadata"]["name"].clone(),
                    json!(format!("{ready}/{total}")),
                    json!(status),
                    json!(restarts.to_string()),
                    age(o),
                    json!(o["status"]["podIP"].as_str().unwrap_or("<none>")),
                    json!(o["spec"]["nodeName"].as_str().unwrap_or("<none>")),
                ]
            }),
        ),
        ("apps", "deployments") => (
            vec![
                col("Name", "string", 0),
                col("Ready", "string", 0),
                col("Up-to-date", "integer", 0),
                col("Available", "integer", 0),
                col("Age", "date", 0),
            ],
            Box::new(move |o| {
                let s = &o["status"];
                vec![
                    o["metadata"]["name"].clone(),
                    ready_of(o),
                    json!(s["updatedReplicas"].as_i64().unwrap_or(0)),
                    json!(s["availableReplicas"].as_i64().unwrap_or(0)),
                    age(o),
                ]
            }),
        ),
        ("", "services") => (
            vec![
                col("Name", "string", 0),
                col("Type", "string", 0),
                col("Cluster-IP", "string", 0),
                col("External-IP", "string", 0),
                col("Port(s)", "string", 0),
                col("Age", "date", 0),
            ],
            Box::new(move |o| {
                let ports: Vec<String> = o["spec"]["ports"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|p| match p["nodePort"].as_u64() {
                        Some(np) => format!(
                            "{}:{np}/{}",
                            p["port"],
                            p["protocol"].as_str().unwrap_or("TCP")
                        ),
                        None => {
                            format!("{}/{}", p["port"], p["protocol"].as_str().unwrap_or("TCP"))
                        }
                    })
                    .collect();
                vec![
                    o["metadata"]["name"].clone(),
                    o["spec"]["type"].clone(),
                    o["spec"]["clusterIP"].clone(),
                    json!("<none>"),
                    json!(ports.join(",")),
                    age(o),
                ]
            }),
        ),
        ("", "events") => (
            vec![
                col("Last Seen", "string", 0),
                col("Type", "string", 0),
                col("Reason", "string", 0),
                col("Object", "string", 0),
                col("Message", "string", 0),
            ],
            Box::new(move |o| {
                let last = ["lastTimestamp", "eventTime"]
                    .iter()
                    .find_map(|f| o[*f].as_str())
                    .or(o["metadata"]["creationTimestamp"].as_str())
                    .unwrap_or_default();
                let object = &o["involvedObject"];
                vec![
                    json!(human_age(last)),
                    o["type"].clone(),
                    o["reason"].clone(),
                    json!(format!(
                        "{}/{}",
                        object["kind"].as_str().unwrap_or_default().to_lowercase(),
                        object["name"].as_str().unwrap_or_default()
                    )),
                    o["message"].clone(),
                ]
            }),
        ),
        ("apps", "replicasets") => (
            vec![
                col("Name", "string", 0),
                col("Desired", "integer", 0),
                col("Current", "integer", 0),
                col("Ready", "integer", 0),
                col("Age", "date", 0),
            ],
            Box::new(move |o| {
                let count = |v: &Value| json!(v.as_i64().unwrap_or(0));
                vec![
                    o["metadata"]["name"].clone(),
                    count(&o["spec"]["replicas"]),
                    count(&o["status"]["replicas"]),
                    count(&o["status"]["readyReplicas"]),
                    age(o),
                ]
            }),
        ),
        ("apps", "statefulsets") => (
            vec![
                col("Name", "string", 0),
                col("Ready", "string", 0),
                col("Age", "date", 0),
            ],
            Box::new(move |o| vec![o["metadata"]["name"].clone(), ready_of(o), age(o)]),
        ),
        ("batch", "jobs") => (
            vec![
                col("Name", "string", 0),
                col("Status", "string", 0),
                col("Completions", "string", 0),
                col("Age", "date", 0),
            ],
            Box::new(move |o| {
                let done = |t: &str| {
                    o["status"]["conditions"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|c| c["type"] == t && c["status"] == "True")
                };
                let status = if done("Complete") {
                    "Complete"
                } else if done("Failed") {
                    "Failed"
                } else {
                    "Running"
                };
                vec![
                    o["metadata"]["name"].clone(),
                    json!(status),
                    json!(format!(
                        "{}/{}",
                        o["status"]["succeeded"].as_i64().unwrap_or(0),
                        o["spec"]["completions"].as_i64().unwrap_or(1)
                    )),
                    age(o),
                ]
            }),
        ),
        _ => (
            vec![col("Name", "string", 0), col("Age", "date", 0)],
            Box::new(move |o| vec![o["metadata"]["name"].clone(), age(o)]),
        ),
    };
    let rows: Vec<Value> = items
        .iter()
        .map(|o| json!({"cells": cells(o), "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"]}}))
        .collect();
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": metadata, "columnDefinitions": columns, "rows": rows})
}

/// `pods/portforward` over WebSocket (`v4.channel.k8s.io`): per port i, data on channel
/// 2i and errors on 2i+1, each channel opened with the port number; one connection per
/// port for the life of the socket.
pub fn port_forward(
    api: &Arc<ApiServer>,
    ws: WebSocketUpgrade,
    runtime: Arc<dyn PodRuntime>,
    ns: String,
    pod: String,
    ports: Vec<u16>,
) -> Response {
    let tasks = api.tasks.clone();
    let shutdown = api.stream_token();
    ws.protocols(["v4.channel.k8s.io"])
        .on_upgrade(move |socket| {
            let fut = forward_ports(socket, runtime, ns, pod, ports, shutdown);
            tasks.spawn(fut);
            async {}
        })
}

async fn forward_ports(
    socket: WebSocket,
    runtime: Arc<dyn PodRuntime>,
    ns: String,
    pod: String,
    ports: Vec<u16>,
    shutdown: CancellationToken,
) {
    let (mut ws_tx, mut ws_rx) = socket.split();
    for (i, port) in ports.iter().enumerate() {
        for ch in [2 * i as u8, 2 * i as u8 + 1] {
            let [lo, hi] = port.to_le_bytes();
            if ws_tx
                .send(Message::Binary(Bytes::from(vec![ch, lo, hi])))
                .await
                .is_err()
            {
                return;
            }
        }
    }
    // Frames from the pod connections to the WebSocket.
    let (out_tx, mut out_rx) = mpsc::channel::<Message>(64);
    let mut writers = Vec::new();
    let mut readers = tokio::task::JoinSet::new();
    for (i, port) in ports.iter().enumerate() {
        match runtime.dial(&ns, &pod, *port).await {
            Ok(conn) => {
                let (mut read, write) = conn.into_split();
                writers.push(Some(write));
                let out_tx = out_tx.clone();
                let ch = 2 * i as u8;
                readers.spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        match read.read(&mut buf[1..]).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                buf[0] = ch;
                                if out_tx
                                    .send(Message::Binary(Bytes::copy_from_slice(&buf[..=n])))
                                    .await
                                    .is_err()
                                {
                                    break;
                                }
                            }
                        }
                    }
                });
            }
            Err(e) => {
                writers.push(None);
                let text = format!(
                    "error forwarding port {port} to pod {pod}, uid : failed to connect to localhost:{port} inside namespace: {e}"
                );
                let mut frame = vec![2 * i as u8 + 1];
                frame.extend_from_slice(text.as_bytes());
                let _ = out_tx.send(Message::Binary(Bytes::from(frame))).await;
            }
        }
    }
    drop(out_tx);
    // Each direction runs on its own, as the kubelet's copies do: a pod that is slow to
    // read must never stop what it writes from reaching the client.
    let outbound = async {
        while let Some(m) = out_rx.recv().await {
            if ws_tx.send(m).await.is_err() {
                break;
            }
        }
        // Every pod connection has ended: the kubelet closes the socket.
        let _ = ws_tx.send(normal_close()).await;
    };
    let inbound = async {
        while let Some(frame) = ws_rx.next().await {
            match frame {
                Ok(Message::Binary(data)) if data.len() > 1 && data[0] % 2 == 0 => {
                    let i = usize::from(data[0] / 2);
                    if let Some(Some(w)) = writers.get_mut(i)
                        && w.write_all(&data[1..]).await.is_err()
                    {
                        writers[i] = None;
                    }
                }
                Ok(Message::Close(_)) | Err(_) => break,
                _ => {}
            }
        }
    };
    tokio::select! {
        () = shutdown.cancelled() => {}
        () = outbound => {}
        () = inbound => {}
    }
    readers.abort_all();
}

/// A close frame with status 1000, as the kubelet sends; clients report a bare close as
/// an error.
fn normal_close() -> Message {
    Message::Close(Some(axum::extract::ws::CloseFrame {
        code: axum::extract::ws::close_code::NORMAL,
        reason: "".into(),
    }))
}

/// `pods/exec` over WebSocket: stdout on channel 1, stderr on 2, the final Status on 3.
pub fn exec(
    api: &Arc<ApiServer>,
    ws: WebSocketUpgrade,
    runtime: Arc<dyn PodRuntime>,
    ns: String,
    pod: String,
    command: Vec<String>,
    stdin: bool,
) -> Response {
    let tasks = api.tasks.clone();
    ws.protocols(["v5.channel.k8s.io", "v4.channel.k8s.io"])
        .on_upgrade(move |socket| {
            tasks.spawn(run_exec(socket, runtime, ns, pod, command, stdin));
            async {}
        })
}

async fn run_exec(
    socket: WebSocket,
    runtime: Arc<dyn PodRuntime>,
    ns: String,
    pod: String,
    command: Vec<String>,
    stdin: bool,
) {
    let (mut ws_tx, mut ws_rx) = socket.split();
    let status = match runtime.exec(&ns, &pod, command).await {
        Err(e) => {
            json!({"metadata": {}, "status": "Failure", "message": e.message, "reason": "InternalError"})
        }
        Ok(mut child) => {
            let _ = ws_tx.send(Message::Binary(Bytes::from_static(&[1]))).await;
            let mut child_stdin = child.stdin.take();
            if !stdin {
                child_stdin = None;
            }
            let (out_tx, mut out_rx) = mpsc::channel::<Message>(64);
            let mut pumps = tokio::task::JoinSet::new();
            for (ch, pipe) in [
                (
                    1u8,
                    child
                        .stdout
                        .take()
                        .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
                ),
                (2u8, child.stderr.take().map(|p| Box::new(p) as _)),
            ] {
                let Some(mut pipe) = pipe else { continue };
                let out_tx = out_tx.clone();
                pumps.spawn(async move {
                    let mut buf = vec![0u8; 32 * 1024];
                    while let Ok(n) = pipe.read(&mut buf[1..]).await {
                        if n == 0 {
                            break;
                        }
                        buf[0] = ch;
                        if out_tx
                            .send(Message::Binary(Bytes::copy_from_slice(&buf[..=n])))
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                });
            }
            drop(out_tx);
            let exit = loop {
                tokio::select! {
                    msg = out_rx.recv() => if let Some(m) = msg { let _ = ws_tx.send(m).await; },
                    frame = ws_rx.next() => match frame {
                        Some(Ok(Message::Binary(d))) if d.first() == Some(&0) => {
                            if let Some(w) = child_stdin.as_mut() { let _ = w.write_all(&d[1..]).await; }
                        }
                        // v5: [255, 0] closes stdin.
                        Some(Ok(Message::Binary(d))) if d.as_ref() == [255, 0] => child_stdin = None,
                        Some(Ok(Message::Close(_))) | None | Some(Err(_)) => { let _ = child.start_kill(); }
                        _ => {}
                    },
                    status = child.wait() => break status,
                }
            };
            while pumps.join_next().await.is_some() {}
            while let Ok(m) = out_rx.try_recv() {
                let _ = ws_tx.send(m).await;
            }
            match exit.ok().and_then(|s| s.code()) {
                Some(0) => json!({"metadata": {}, "status": "Success"}),
                code => {
                    let code = code.unwrap_or(137);
                    json!({"metadata": {}, "status": "Failure", "message": format!("command terminated with non-zero exit code: error executing command [...], exit code {code}"),
                           "reason": "NonZeroExitCode", "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]}})
                }
            }
        }
    };
    let mut frame = vec![3u8];
    frame.extend_from_slice(status.to_string().as_bytes());
    let _ = ws_tx.send(Message::Binary(Bytes::from(frame))).await;
    let _ = ws_tx.send(normal_close()).await;
}

#[cfg(test)]
mod tests {
    use super::human_duration;

    #[test]
    fn ages_read_like_kubectl() {
        let cases = [
            (5, "5s"),
            (119, "119s"),
            (200, "3m20s"),
            (600, "10m"),
            (3 * 3600 + 60, "3h1m"),
            (30 * 3600, "30h"),
            (50 * 3600, "2d2h"),
            (10 * 86_400, "10d"),
        ];
        for (secs, text) in cases {
            assert_eq!(human_duration(secs), text, "{secs}");
        }
    }
}
