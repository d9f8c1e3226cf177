//! `kt-probe [--netns FILE] [--cgroup DIR] ADDR`: joins the namespace and cgroup, connects
//! to ADDR (an IPv6 ADDR, v4-mapped included, uses an AF_INET6 socket), reads the server's
//! `<tag> <client>` line and prints `peer=<getpeername> server=<tag> client=<client>`.

use std::{
    fs::File,
    io::{BufRead as _, BufReader},
    net::{SocketAddr, TcpStream},
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
            other => {
                addr = Some(
                    other
                        .parse::<SocketAddr>()
                        .map_err(|e| format!("{other}: {e}"))?,
                )
            }
        }
    }
    let addr = addr.ok_or("usage: kt-probe [--netns FILE] [--cgroup DIR] ADDR")?;
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
