//! A TCP server inside a test namespace that tells each client who answered: one line
//! `<tag> <client addr as the server sees it>` per connection, then close.

use std::{
    io::{self, Write as _},
    net::{SocketAddr, TcpListener},
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

fn enter_and_bind(ns_path: &std::path::Path, addr: SocketAddr) -> io::Result<TcpListener> {
    let file = std::fs::File::open(ns_path)?;
    // SAFETY: plain syscall on a valid namespace fd; affects only this thread.
    if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
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
