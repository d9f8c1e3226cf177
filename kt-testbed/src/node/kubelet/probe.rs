//! Readiness probes: `tcpSocket` (a connect) and `httpGet` (a 2xx or 3xx answer), made from
//! inside the pod's network namespace, to a port number or a container port's name. Other
//! probe kinds count as passing. A failure says why, as the kubelet's event does.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    time::Duration,
};

use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::node::netio;

/// The port a probe names: a number, or the name of one of `container`'s ports.
fn probe_port(port: &Value, container: &Value) -> Option<u16> {
    match port {
        Value::Number(n) => n.as_u64().and_then(|p| u16::try_from(p).ok()),
        Value::String(name) => container["ports"]
            .as_array()?
            .iter()
            .find(|p| p["name"] == name.as_str())?["containerPort"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok()),
        _ => None,
    }
}

/// Whether `container`'s pod (in `netns`, at `pod_ip`) passes `probe` now; why not if not.
pub(super) async fn check(
    probe: &Value,
    container: &Value,
    netns: &Path,
    pod_ip: Ipv4Addr,
) -> Result<(), String> {
    let (tcp, http) = (&probe["tcpSocket"], &probe["httpGet"]);
    let (action, port) = if tcp.is_object() {
        ("tcp", &tcp["port"])
    } else if http.is_object() {
        ("http", &http["port"])
    } else {
        return Ok(());
    };
    let port = probe_port(port, container)
        .ok_or_else(|| format!("unknown port {port} in the {action} probe"))?;
    let dial_error = |e: std::io::Error| {
        let why = if e.kind() == std::io::ErrorKind::ConnectionRefused {
            "connection refused".to_owned()
        } else {
            e.to_string()
        };
        format!("dial tcp {pod_ip}:{port}: connect: {why}")
    };
    let conn = netio::dial(netns, SocketAddr::from(([127, 0, 0, 1], port))).await;
    if action == "tcp" {
        return conn.map(drop).map_err(dial_error);
    }
    let path = http["path"].as_str().unwrap_or("/");
    let url = format!("http://{pod_ip}:{port}{path}");
    let mut conn = conn.map_err(|e| format!("Get \"{url}\": {}", dial_error(e)))?;
    let request = format!(
        "GET {path} HTTP/1.0\r\nHost: {pod_ip}:{port}\r\nUser-Agent: kube-probe/1.33\r\n\r\n"
    );
    conn.write_all(request.as_bytes())
        .await
        .map_err(|e| format!("Get \"{url}\": {e}"))?;
    let mut head = [0u8; 12];
    match tokio::time::timeout(Duration::from_secs(1), conn.read_exact(&mut head)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(format!("Get \"{url}\": {e}")),
        Err(_) => {
            return Err(format!(
                "Get \"{url}\": context deadline exceeded (Client.Timeout exceeded while awaiting headers)"
            ));
        }
    }
    let code = String::from_utf8_lossy(&head[9..12]).into_owned();
    if head.starts_with(b"HTTP/1.") && (code.starts_with('2') || code.starts_with('3')) {
        Ok(())
    } else {
        Err(format!("HTTP probe failed with statuscode: {code}"))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn probe_ports_are_numbers_or_container_port_names() {
        let container = json!({"ports": [{"name": "http", "containerPort": 8080}]});
        assert_eq!(probe_port(&json!(80), &container), Some(80));
        assert_eq!(probe_port(&json!("http"), &container), Some(8080));
        assert_eq!(probe_port(&json!("metrics"), &container), None);
    }
}
