//! Sockets inside network namespaces for an async process: a short-lived thread enters the
//! namespace, creates the socket (which stays in that namespace for life), and hands it
//! back. The async runtime's own threads never change namespace.

use std::{
    io,
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    time::Duration,
};

fn in_netns<T: Send + 'static>(
    netns: &Path,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    let netns: PathBuf = netns.to_owned();
    std::thread::spawn(move || {
        let file = std::fs::File::open(&netns)?;
        // SAFETY: plain syscall on a valid namespace fd; affects only this short-lived thread.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        f()
    })
    .join()
    .map_err(|_| io::Error::other("netns thread panicked"))?
}

/// A listener bound inside `netns`, for tokio.
pub fn listen(netns: &Path, addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
    let std_listener = in_netns(netns, move || {
        let l = TcpListener::bind(addr)?;
        l.set_nonblocking(true)?;
        Ok(l)
    })?;
    tokio::net::TcpListener::from_std(std_listener)
}

/// A UDP socket bound inside `netns`, for tokio.
pub fn udp(netns: &Path, addr: SocketAddr) -> io::Result<tokio::net::UdpSocket> {
    let socket = in_netns(netns, move || {
        let s = UdpSocket::bind(addr)?;
        s.set_nonblocking(true)?;
        Ok(s)
    })?;
    tokio::net::UdpSocket::from_std(socket)
}

/// A connection made from inside `netns` (blocking connect in a helper thread).
pub async fn dial(netns: &Path, addr: SocketAddr) -> io::Result<tokio::net::TcpStream> {
    let netns = netns.to_owned();
    let stream = tokio::task::spawn_blocking(move || {
        in_netns(&netns, move || {
            let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            // The kubelet and API server are Go programs: their connections are NODELAY.
            s.set_nodelay(true)?;
            s.set_nonblocking(true)?;
            Ok(s)
        })
    })
    .await
    .map_err(io::Error::other)??;
    tokio::net::TcpStream::from_std(stream)
}
