//! cgroup2 directories the tests create under the host's cgroup2 mount and always remove.
//!
//! eBPF is only ever attached to one of these, never to a cgroup root of the host.

use std::{
    fs, io,
    path::{Path, PathBuf},
    thread,
    time::Duration,
};

/// Where the cgroup2 hierarchy is mounted: `/sys/fs/cgroup` on pure v2 hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones. Asked of the file system (`statfs`) rather than
/// of kt's agent, so that the testbed does not depend on the product it tests.
pub fn cgroup2_mount() -> Option<PathBuf> {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .into_iter()
        .map(PathBuf::from)
        .find(|dir| is_cgroup2(dir))
}

fn is_cgroup2(dir: &Path) -> bool {
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we pass; the path is a valid C string.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    let found = unsafe { libc::statfs(path.as_ptr(), &mut stat) } == 0;
    found && stat.f_type == libc::CGROUP2_SUPER_MAGIC
}

/// A child cgroup, removed on drop (after moving out any process still in it).
#[derive(Debug)]
pub struct TestCgroup {
    path: PathBuf,
    /// Where processes are moved back to before removal.
    parent: PathBuf,
}

impl TestCgroup {
    /// Creates `<cgroup2 mount>/<name>`.
    pub fn new(name: &str) -> io::Result<Self> {
        let mount = cgroup2_mount()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no cgroup2 mount"))?;
        Self::create(mount.join(name), mount)
    }

    /// Creates a cgroup nested in this one.
    pub fn child(&self, name: &str) -> io::Result<Self> {
        Self::create(self.path.join(name), self.parent.clone())
    }

    /// Creates the cgroup at `path`; processes left in it at drop move to `parent`.
    pub fn create(path: PathBuf, parent: PathBuf) -> io::Result<Self> {
        fs::create_dir(&path)?;
        Ok(Self { path, parent })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves a process (all its threads) into this cgroup.
    pub fn add_pid(&self, pid: u32) -> io::Result<()> {
        fs::write(self.path.join("cgroup.procs"), pid.to_string())
    }

    /// The pids in this cgroup.
    pub fn pids(&self) -> Vec<u32> {
        fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Only processes the test put here can be in it; move them out rather than kill.
        for pid in self.pids() {
            let _ = fs::write(self.parent.join("cgroup.procs"), pid.to_string());
        }
        // A cgroup whose last process just exited can stay busy for a moment.
        for attempt in 0..50 {
            match fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return,
                Err(e) if attempt == 49 => {
                    eprintln!(
                        "warning: failed to remove cgroup {}: {e}",
                        self.path.display()
                    );
                }
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}
