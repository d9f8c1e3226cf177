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
        let (ready_tx, ready_rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (stop, tag, ns_path) = (stop.clone(), tag.to_owned(), netns.path());
            thread::Builder::new()
                .name(format!("server-{tag}"))
                .spawn(move || {
                    let listener = enter_and_bind(&ns_path, addr);
                    let listener = match listener {
                        Ok(l) => {
                            let _ = ready_tx.send(l.local_addr());
                            l
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    serve(&listener, &tag, &stop);
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

/// The UDP twin of [`TagServer`]: answers every datagram with `<tag> <client addr>`.
pub struct UdpTagServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpTagServer {
    /// Binds `addr` (port 0 picks one) inside `netns`.
    pub fn start(netns: &NetNs, addr: SocketAddr, tag: &str) -> io::Result<Self> {
        let (ready_tx, ready_rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (stop, tag, ns_path) = (stop.clone(), tag.to_owned(), netns.path());
            thread::Builder::new()
                .name(format!("udp-server-{tag}"))
                .spawn(move || {
                    let bound = enter_netns(&ns_path).and_then(|()| {
                        let socket = UdpSocket::bind(addr)?;
                        socket.set_read_timeout(Some(Duration::from_millis(20)))?;
                        Ok(socket)
                    });
                    let socket = match bound {
                        Ok(socket) => {
                            let _ = ready_tx.send(socket.local_addr());
                            socket
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let mut buf = [0u8; 2048];
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok((_, peer)) = socket.recv_from(&mut buf) {
                            let _ = socket.send_to(format!("{tag} {peer}").as_bytes(), peer);
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

impl Drop for UdpTagServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
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

fn enter_and_bind(ns_path: &std::path::Path, addr: SocketAddr) -> io::Result<TcpListener> {
    enter_netns(ns_path)?;
    let listener = TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
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
