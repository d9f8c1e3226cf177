//! A TCP server inside a test namespace that tells each client who answered: one line
//! `<tag> <client addr as the server sees it>` per connection, then close; and its UDP
//! twin, which answers each datagram with that line.

use std::{
    io::{self, Write as _},
    net::{SocketAddr, TcpListener, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use super::netns::NetNs;

/// Stops and joins its thread on drop.
pub struct TagServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TagServer {
    /// Listens on `addr` (port 0 picks one) inside `netns`.
    pub fn start(netns: &NetNs, addr: SocketAddr, tag: &str) -> io::Result<Self> {
        Self::spawn(
            netns,
            format!("server-{tag}"),
            tag,
            move || {
                let listener = TcpListener::bind(addr)?;
                listener.set_nonblocking(true)?;
                Ok((listener.local_addr()?, listener))
            },
            |listener, tag, stop| serve(&listener, tag, stop),
        )
    }

    /// The UDP twin: on `addr` (port 0 picks one) inside `netns`, answers every datagram
    /// with `<tag> <client addr>`.
    pub fn start_udp(netns: &NetNs, addr: SocketAddr, tag: &str) -> io::Result<Self> {
        Self::spawn(
            netns,
            format!("udp-server-{tag}"),
            tag,
            move || {
                let socket = UdpSocket::bind(addr)?;
                socket.set_read_timeout(Some(Duration::from_millis(20)))?;
                Ok((socket.local_addr()?, socket))
            },
            |socket, tag, stop| {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((_, peer)) = socket.recv_from(&mut buf) {
                        let _ = socket.send_to(format!("{tag} {peer}").as_bytes(), peer);
                    }
                }
            },
        )
    }

    /// A thread named `name` that enters `netns`, `bind`s, and `serve`s until dropped.
    fn spawn<S: Send + 'static>(
        netns: &NetNs,
        name: String,
        tag: &str,
        bind: impl FnOnce() -> io::Result<(SocketAddr, S)> + Send + 'static,
        serve: impl FnOnce(S, &str, &AtomicBool) + Send + 'static,
    ) -> io::Result<Self> {
        let (ready_tx, ready_rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (stop, tag, ns_path) = (stop.clone(), tag.to_owned(), netns.path());
            thread::Builder::new().name(name).spawn(move || {
                match enter_netns(&ns_path).and_then(|()| bind()) {
                    Ok((addr, bound)) => {
                        let _ = ready_tx.send(Ok(addr));
                        serve(bound, &tag, &stop);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })?
        };
        let addr = ready_rx.recv().map_err(io::Error::other)??;
        Ok(Self {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Moves this thread into the network namespace at `ns_path`.
fn enter_netns(ns_path: &std::path::Path) -> io::Result<()> {
    let file = std::fs::File::open(ns_path)?;
    // SAFETY: plain syscall on a valid namespace fd; affects only this thread.
    if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn serve(listener: &TcpListener, tag: &str, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((mut stream, peer)) => {
                let _ = stream.set_nonblocking(false);
                let _ = writeln!(stream, "{tag} {peer}");
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(2));
            }
            Err(_) => thread::sleep(Duration::from_millis(2)),
        }
    }
}

impl Drop for TagServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
