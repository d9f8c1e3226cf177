//! Runs `kt-probe` (a one-shot TCP client) inside a namespace and, optionally, a cgroup,
//! and parses what it saw. A separate process, because cgroup membership is per process
//! and the test harness runs tests as threads of one process.

use std::{io, net::SocketAddr, path::Path, process::Command};

use super::netns::NetNs;

/// What a probe connection saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// `getpeername()` of the client socket.
    pub peer: SocketAddr,
    /// The tag of the server that answered.
    pub server: String,
    /// The client address as the server saw it.
    pub client: SocketAddr,
}

/// Connects to `addr` from a new process in `netns` (and `cgroup`, if given).
pub fn connect(netns: &NetNs, cgroup: Option<&Path>, addr: SocketAddr) -> io::Result<Seen> {
    run(netns, cgroup, None, addr)
}

/// Sends one UDP datagram to `addr` and reads the reply, from a connected socket or (not
/// `connected`) with `sendto`/`recvfrom`; [`Seen::peer`] is the socket's peer name or the
/// reply's source.
pub fn udp(
    netns: &NetNs,
    cgroup: Option<&Path>,
    addr: SocketAddr,
    connected: bool,
) -> io::Result<Seen> {
    run(netns, cgroup, Some(connected), addr)
}

fn run(
    netns: &NetNs,
    cgroup: Option<&Path>,
    udp: Option<bool>,
    addr: SocketAddr,
) -> io::Result<Seen> {
    let mut cmd = Command::new(super::bins::kt_probe());
    cmd.arg("--netns").arg(netns.path());
    if let Some(cgroup) = cgroup {
        cmd.arg("--cgroup").arg(cgroup);
    }
    match udp {
        Some(true) => {
            cmd.arg("--udp-connected");
        }
        Some(false) => {
            cmd.arg("--udp");
        }
        None => {}
    }
    cmd.arg(addr.to_string());
    let out = cmd.output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "probe to {addr} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    parse(stdout.trim())
        .ok_or_else(|| io::Error::other(format!("unparsable probe output {stdout:?}")))
}

/// `peer=<addr> server=<tag> client=<addr>`.
fn parse(line: &str) -> Option<Seen> {
    let mut peer = None;
    let mut server = None;
    let mut client = None;
    for field in line.split_whitespace() {
        let (key, value) = field.split_once('=')?;
        match key {
            "peer" => peer = value.parse().ok(),
            "server" => server = Some(value.to_owned()),
            "client" => client = value.parse().ok(),
            _ => return None,
        }
    }
    Some(Seen {
        peer: peer?,
        server: server?,
        client: client?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_probe_line() {
        let seen =
            parse("peer=[::ffff:10.96.0.10]:80 server=target client=127.0.0.1:5000").unwrap();
        assert_eq!(seen.peer, "[::ffff:10.96.0.10]:80".parse().unwrap());
        assert_eq!(seen.server, "target");
        assert!(parse("peer=x server=y").is_none());
    }
}
