//! Readiness probes: `tcpSocket` (a connect) and `httpGet` (a 2xx or 3xx answer), made from
//! inside the pod's network namespace. Other probe kinds count as passing.

use std::{net::SocketAddr, path::Path, time::Duration};

use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::node::netio;

/// Whether the pod in `netns` passes `probe` now.
pub(super) async fn passes(probe: &Value, netns: &Path) -> bool {
    let port = |p: &Value| p["port"].as_u64().map(|p| p as u16);
    if let Some(p) = port(&probe["tcpSocket"]) {
        return netio::dial(netns, SocketAddr::from(([127, 0, 0, 1], p)))
            .await
            .is_ok();
    }
    if let Some(p) = port(&probe["httpGet"]) {
        let path = probe["httpGet"]["path"].as_str().unwrap_or("/");
        let Ok(mut conn) = netio::dial(netns, SocketAddr::from(([127, 0, 0, 1], p))).await else {
            return false;
        };
        if conn
            .write_all(
                format!(
                    "GET {path} HTTP/1.0\r\nHost: localhost\r\nUser-Agent: kube-probe/1.33\r\n\r\n"
                )
                .as_bytes(),
            )
            .await
            .is_err()
        {
            return false;
        }
        let mut head = [0u8; 12];
        return matches!(
            tokio::time::timeout(Duration::from_secs(1), conn.read_exact(&mut head)).await,
            Ok(Ok(_))
        ) && (head.starts_with(b"HTTP/1.1 2")
            || head.starts_with(b"HTTP/1.0 2")
            || head.starts_with(b"HTTP/1.1 3")
            || head.starts_with(b"HTTP/1.0 3"));
    }
    true
}
