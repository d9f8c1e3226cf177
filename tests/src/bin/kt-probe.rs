//! `kt-probe [--netns FILE] [--cgroup DIR] [--udp|--udp-connected] ADDR`: joins the
//! namespace and cgroup, connects to ADDR (an IPv6 ADDR, v4-mapped included, uses an
//! AF_INET6 socket), reads the server's `<tag> <client>` line and prints
//! `peer=<getpeername> server=<tag> client=<client>`. With `--udp` it sends one datagram
//! from an unconnected socket (`sendto`) and `peer` is the reply's source (`recvfrom`); with
//! `--udp-connected`, from a connected UDP socket, `peer` its `getpeername`.

use std::{
    fs::File,
    io::{BufRead as _, BufReader},
    net::{SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    process::ExitCode,
    time::Duration,
};

fn main() -> ExitCode {
    match run() {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("kt-probe: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<String, String> {
    let mut args = std::env::args().skip(1);
    let mut addr = None;
    let mut udp = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--netns" => {
                let path = args.next().ok_or("--netns needs a file")?;
                let file = File::open(&path).map_err(|e| format!("open {path}: {e}"))?;
                // SAFETY: plain syscall; this process is single-threaded here.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(format!("setns {path}: {}", std::io::Error::last_os_error()));
                }
            }
            "--cgroup" => {
                let dir = args.next().ok_or("--cgroup needs a directory")?;
                std::fs::write(
                    format!("{dir}/cgroup.procs"),
                    std::process::id().to_string(),
                )
                .map_err(|e| format!("join cgroup {dir}: {e}"))?;
            }
            "--udp" => udp = Some(false),
            "--udp-connected" => udp = Some(true),
            other => {
                addr = Some(
                    other
                        .parse::<SocketAddr>()
                        .map_err(|e| format!("{other}: {e}"))?,
                )
            }
        }
    }
    let addr =
        addr.ok_or("usage: kt-probe [--netns FILE] [--cgroup DIR] [--udp|--udp-connected] ADDR")?;
    if let Some(connected) = udp {
        return udp_probe(addr, connected);
    }
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let peer = stream
        .peer_addr()
        .map_err(|e| format!("getpeername: {e}"))?;
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .map_err(|e| format!("read: {e}"))?;
    let (tag, client) = line
        .trim()
        .split_once(' ')
        .ok_or(format!("bad reply {line:?}"))?;
    Ok(format!("peer={peer} server={tag} client={client}"))
}

fn udp_probe(addr: SocketAddr, connected: bool) -> Result<String, String> {
    let any: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().expect("an address")
    } else {
        "[::]:0".parse().expect("an address")
    };
    let socket = UdpSocket::bind(any).map_err(|e| format!("bind: {e}"))?;
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 2048];
    let (len, peer) = if connected {
        socket
            .connect(addr)
            .map_err(|e| format!("connect {addr}: {e}"))?;
        socket.send(b"probe").map_err(|e| format!("send: {e}"))?;
        let len = socket.recv(&mut buf).map_err(|e| format!("recv: {e}"))?;
        let peer = socket
            .peer_addr()
            .map_err(|e| format!("getpeername: {e}"))?;
        (len, peer)
    } else {
        socket
            .send_to(b"probe", addr)
            .map_err(|e| format!("sendto {addr}: {e}"))?;
        socket
            .recv_from(&mut buf)
            .map_err(|e| format!("recvfrom: {e}"))?
    };
    let line = String::from_utf8_lossy(&buf[..len]).into_owned();
    let (tag, client) = line
        .trim()
        .split_once(' ')
        .ok_or(format!("bad reply {line:?}"))?;
    Ok(format!("peer={peer} server={tag} client={client}"))
}
