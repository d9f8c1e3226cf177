//! What `connect` changes on the workstation besides its TUN device — `/etc/resolv.conf`
//! (`localDNS`) and the hosts file (`hosts`) — and how each change is undone: at exit, byte
//! for byte when the file still holds what ktctl wrote; after a connect that was killed, by
//! the next one (or `ktctl clean`) from the backup it left under `~/.kt/backup`. The TUN
//! device and its routes need no repair: the kernel removes them with the process.
//!
//! Also the checks before anything changes: root, and one connect at a time (v0.3.7's texts).

use std::{
    path::{Path, PathBuf},
    sync::Mutex,
    time::Duration,
};

use super::plan;

/// The resolver configuration v0.3.7 rewrites on Linux.
pub(super) const RESOLV_CONF: &str = "/etc/resolv.conf";

#[derive(Debug, thiserror::Error)]
pub enum SystemError {
    #[error("permission declined, please re-run connect command with 'sudo'")]
    NotRoot,
    #[error("another connect process already running at {0}, exiting")]
    AlreadyRunning(u32),
    #[error("failed to read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to run {command}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("{command} did not finish within {within:?}")]
    Timeout { command: String, within: Duration },
}

/// The hosts file: `$HOSTS_PATH` (v0.3.7 honours it), else `/etc/hosts`.
pub(super) fn hosts_path() -> PathBuf {
    std::env::var_os("HOSTS_PATH").map_or_else(|| PathBuf::from("/etc/hosts"), PathBuf::from)
}

/// connect changes routes, a TUN device and system files: root only.
pub(super) fn check_root() -> Result<(), SystemError> {
    #[cfg(unix)]
    // SAFETY: geteuid has no failure mode.
    let root = unsafe { libc::geteuid() } == 0;
    #[cfg(not(unix))]
    let root = false;
    if root {
        Ok(())
    } else {
        Err(SystemError::NotRoot)
    }
}

/// Refuses to start while another connect runs (its pid file names a live process);
/// removes the pid files of connects that died.
pub(super) fn check_single_connect(home: &Path) -> Result<(), SystemError> {
    let Ok(entries) = std::fs::read_dir(home.join("pid")) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("connect-")
            .and_then(|n| n.strip_suffix(".pid"))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        if process_alive(pid) {
            return Err(SystemError::AlreadyRunning(pid));
        }
        let _ = std::fs::remove_file(entry.path());
    }
    Ok(())
}

/// Another running `ktctl connect` that changes this process's `/etc/resolv.conf` or hosts
/// file, whatever its `$HOME` (another user's connect on this machine): a process running
/// this same program with a `connect` argument that sees one of those same files (one that
/// sees other files — in a container, or a test's workstation — is no concern). Its pid,
/// if there is one.
pub(crate) fn other_connect_running() -> Option<u32> {
    let own = std::env::current_exe().ok()?;
    let me = std::process::id();
    // The files this process has (one it lacks has nothing to repair), with their ids.
    let files: Vec<(PathBuf, FileId)> = [Kind::ResolvConf.path(), Kind::Hosts.path()]
        .into_iter()
        .filter_map(|file| file_id(&file).map(|id| (file, id)))
        .collect();
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            if pid == me || std::fs::read_link(entry.path().join("exe")).ok()? != own {
                return None;
            }
            // `/proc/<pid>/root` resolves paths in that process's mounts. When it cannot be
            // read (not root), the files count as shared: repairing a live connect's
            // changes would break its DNS.
            let root = entry.path().join("root");
            let shares = files.iter().any(|(file, ours)| {
                let theirs = root.join(file.strip_prefix("/").unwrap_or(file));
                file_id(&theirs).is_none_or(|theirs| theirs == *ours)
            });
            if !shares {
                return None;
            }
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            cmdline
                .split(|b| *b == 0)
                .any(|arg| arg == b"connect")
                .then_some(pid)
        })
}

/// A file's identity: its device and inode.
type FileId = (u64, u64);

/// The identity of the file at `path`; `None` when it cannot be read (or off Unix).
fn file_id(path: &Path) -> Option<FileId> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata(path).map(|m| (m.dev(), m.ino())).ok()
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

/// Whether process `pid` exists on this machine.
pub(crate) fn process_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

fn read(path: &Path) -> Result<String, SystemError> {
    std::fs::read_to_string(path).map_err(|source| SystemError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Writes in place (truncate and write, never rename): `/etc/resolv.conf` and `/etc/hosts`
/// are often bind mounts (containers) or symlinks, which a rename would break.
fn write(path: &Path, content: &str) -> Result<(), SystemError> {
    std::fs::write(path, content).map_err(|source| SystemError::Write {
        path: path.to_owned(),
        source,
    })
}

/// Which file, how ktctl's changes are taken out of it, and where its backup lives.
#[derive(Clone, Copy, Debug)]
pub(super) enum Kind {
    ResolvConf,
    Hosts,
}

impl Kind {
    fn path(self) -> PathBuf {
        match self {
            Self::ResolvConf => PathBuf::from(RESOLV_CONF),
            Self::Hosts => hosts_path(),
        }
    }

    fn backup(self, home: &Path) -> PathBuf {
        home.join("backup").join(match self {
            Self::ResolvConf => "resolv.conf",
            Self::Hosts => "hosts",
        })
    }

    /// `text` without ktctl's changes.
    fn without_changes(self, text: &str) -> String {
        match self {
            Self::ResolvConf => plan::resolv_conf_restored(text),
            Self::Hosts => plan::with_hosts_block(text, &[]),
        }
    }
}

/// A file ktctl changed: what it held before and what ktctl last wrote.
pub(super) struct Edit {
    kind: Kind,
    path: PathBuf,
    backup: PathBuf,
    original: String,
    /// What ktctl last wrote; `None` once restored (a late update must not undo that).
    written: Mutex<Option<String>>,
}

impl Edit {
    /// Changes the file of `kind` to `change(original)`, after saving the original under
    /// `home` (a killed connect is repaired from it).
    pub(super) fn apply(
        home: &Path,
        kind: Kind,
        change: impl FnOnce(&str) -> String,
    ) -> Result<Self, SystemError> {
        let path = kind.path();
        let original = read(&path)?;
        let backup = kind.backup(home);
        crate::lifecycle::write_file(&backup, original.as_bytes(), 0o644).map_err(|e| {
            SystemError::Write {
                path: backup.clone(),
                source: std::io::Error::other(kt_proto::error_chain(&e)),
            }
        })?;
        let written = change(&original);
        write(&path, &written)?;
        Ok(Self {
            kind,
            path,
            backup,
            original,
            written: Mutex::new(Some(written)),
        })
    }

    /// Rewrites the file as `change(original)` (the hosts block as Services change), keeping
    /// lines others added meanwhile.
    pub(super) fn update(&self, change: impl FnOnce(&str) -> String) -> Result<(), SystemError> {
        let mut guard = self.written.lock().unwrap_or_else(|e| e.into_inner());
        let Some(written) = guard.as_ref() else {
            return Ok(());
        };
        let current = read(&self.path)?;
        let base = if current == *written {
            self.original.clone()
        } else {
            self.kind.without_changes(&current)
        };
        let next = change(&base);
        if next != current {
            write(&self.path, &next)?;
        }
        *guard = Some(next);
        Ok(())
    }

    /// Undoes ktctl's change: the original bytes when the file holds what ktctl wrote, else
    /// the file with only ktctl's lines taken out (someone else changed it meanwhile).
    pub(super) fn restore(&self) -> Result<(), SystemError> {
        let mut written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        let current = read(&self.path)?;
        let restored = if Some(&current) == written.as_ref() {
            self.original.clone()
        } else {
            self.kind.without_changes(&current)
        };
        write(&self.path, &restored)?;
        *written = None;
        let _ = std::fs::remove_file(&self.backup);
        Ok(())
    }
}

/// Takes out what a killed connect left in the files of every [`Kind`]: the backup's bytes
/// when the file is the backup plus ktctl's marked changes, else the file without those
/// changes. Returns the files repaired. Call only when no other connect runs.
pub(crate) fn repair(home: &Path) -> Result<Vec<PathBuf>, SystemError> {
    let mut repaired = Vec::new();
    for kind in [Kind::ResolvConf, Kind::Hosts] {
        let (path, backup) = (kind.path(), kind.backup(home));
        let Ok(current) = std::fs::read_to_string(&path) else {
            continue;
        };
        if plan::has_kt_changes(&current) {
            let cleaned = kind.without_changes(&current);
            let restored = match std::fs::read_to_string(&backup) {
                // The backup keeps what cleaning cannot: a missing final newline, say.
                Ok(original) if kind.without_changes(&original) == cleaned => original,
                _ => cleaned,
            };
            write(&path, &restored)?;
            repaired.push(path);
        }
        let _ = std::fs::remove_file(&backup);
    }
    Ok(repaired)
}

/// The files [`repair`] would restore now (for `clean --dryRun`).
pub(crate) fn needing_repair() -> Vec<PathBuf> {
    [Kind::ResolvConf, Kind::Hosts]
        .into_iter()
        .map(Kind::path)
        .filter(|path| {
            std::fs::read_to_string(path).is_ok_and(|current| plan::has_kt_changes(&current))
        })
        .collect()
}

/// Whether this process runs as root (what restoring system files needs).
pub(crate) fn is_root() -> bool {
    check_root().is_ok()
}

/// Runs `ip ARGS…` (iproute2, as v0.3.7 does on Linux).
pub(super) async fn ip(args: &[&str]) -> Result<(), SystemError> {
    output("ip", args, None).await.map(drop)
}

/// Runs `program ARGS…` for at most `within` (then kills it).
pub(super) async fn run_within(
    program: &str,
    args: &[&str],
    within: Duration,
) -> Result<(), SystemError> {
    output(program, args, Some(within)).await.map(drop)
}

/// Runs `program ARGS…` for at most `within` (then kills it); its standard output.
pub(super) async fn output_within(
    program: &str,
    args: &[&str],
    within: Duration,
) -> Result<String, SystemError> {
    output(program, args, Some(within)).await
}

/// Runs `program ARGS…`, for at most `within` when given; its standard output, or its
/// standard error as the error when it fails.
async fn output(
    program: &str,
    args: &[&str],
    within: Option<Duration>,
) -> Result<String, SystemError> {
    let command = format!("{program} {}", args.join(" "));
    let run = tokio::process::Command::new(program)
        .args(args)
        .kill_on_drop(true)
        .output();
    let out = match within {
        Some(within) => {
            tokio::time::timeout(within, run)
                .await
                .map_err(|_| SystemError::Timeout {
                    command: command.clone(),
                    within,
                })?
        }
        None => run.await,
    }
    .map_err(|source| SystemError::Spawn {
        command: command.clone(),
        source,
    })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(SystemError::Command {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}
