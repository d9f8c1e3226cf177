//! Network namespaces the tests create and always remove (also on panic, by `Drop`).
//!
//! Names start with [`crate::sys::PREFIX`] so leftovers are findable with `ip netns`.

use std::{
    fs::File,
    io,
    os::fd::AsRawFd as _,
    path::PathBuf,
    process::{Command, Output},
};

/// A named network namespace (`ip netns add`), deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates the namespace and brings its loopback up.
    pub fn new(name: String) -> io::Result<Self> {
        run_checked(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind-mounted namespace file (`/run/netns/<name>`), for `setns`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip -n <ns> <args>`, failing with its stderr.
    pub fn ip(&self, args: &[&str]) -> io::Result<Output> {
        run_checked(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// Adds addresses to the namespace's loopback (for example a fake ClusterIP/32), so that
    /// a server can listen on them and unredirected connects have somewhere to go. Loopback
    /// rather than a dummy device: not every kernel has the dummy driver.
    pub fn add_local_addrs(&self, addrs: &[&str]) -> io::Result<()> {
        for addr in addrs {
            self.ip(&["addr", "add", addr, "dev", "lo"])?;
        }
        Ok(())
    }

    /// Moves the calling thread into the namespace; sockets it creates afterwards live
    /// there. Only for threads the test owns (a network namespace is per thread).
    pub fn enter_current_thread(&self) -> io::Result<()> {
        let file = File::open(self.path())?;
        // SAFETY: plain syscall on a valid namespace fd.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // A testbed dropped without `stop` sweeps its pods' namespaces before the abandoned
        // pod tasks (which own these) are dropped with the runtime: already gone is done.
        if !exists(&self.name) {
            return;
        }
        if let Err(error) = run_checked(Command::new("ip").args(["netns", "del", &self.name])) {
            eprintln!("warning: failed to delete netns {}: {error}", self.name);
        }
    }
}

/// Whether a namespace of this name exists.
pub fn exists(name: &str) -> bool {
    PathBuf::from("/run/netns").join(name).exists()
}

/// Runs a command to completion; a non-zero exit is an error carrying its stderr.
pub fn run_checked(cmd: &mut Command) -> io::Result<Output> {
    let out = cmd.output()?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(io::Error::other(format!(
            "{:?} failed ({}): {}",
            cmd,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}
