//! One ktctl run's local state and lifecycle: the pid file `~/.kt/pid/<component>-<pid>.pid`
//! (removing it stops ktctl: the v0.3.7 kill switch), the signals that stop it (SIGINT,
//! SIGTERM, SIGHUP, SIGQUIT), and the teardown steps registered while setting up, run in
//! reverse order on the way out — after a signal, an error or a normal end alike.
//!
//! Files under `~/.kt` written by a ktctl run under `sudo` belong to the user who ran sudo
//! (`SUDO_UID`/`SUDO_GID`), as in v0.3.7, so that user's later non-root commands can manage them.

use std::{
    future::Future,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Mutex,
    time::Duration,
};

use tokio_util::sync::CancellationToken;

type Step = Pin<Box<dyn Future<Output = ()> + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("failed to write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub struct Session {
    pub home: PathBuf,
    pid_file: PathBuf,
    /// Cancelled by a signal or by the pid file going away.
    pub stop: CancellationToken,
    teardown: Mutex<Vec<(String, Step)>>,
}

/// `$HOME/.kt`.
pub fn kt_home() -> PathBuf {
    PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".kt")
}

/// The user who ran `sudo ktctl`, when ktctl runs as root under sudo.
fn sudo_owner() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no failure mode.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let id = |name: &str| std::env::var(name).ok()?.parse::<u32>().ok();
    Some((id("SUDO_UID")?, id("SUDO_GID")?))
}

/// Writes `content` to `path` under `~/.kt` with `mode` (set at creation and kept), creating
/// the directories on the way; under sudo, the file and those directories are chowned to the
/// sudo user.
pub fn write_file(path: &Path, content: &[u8], mode: u32) -> Result<(), SessionError> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let fail = |source| SessionError::Write {
        path: path.to_owned(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(fail)?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(fail)?;
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(fail)?;
    std::io::Write::write_all(&mut file, content).map_err(fail)?;
    if let Some((uid, gid)) = sudo_owner() {
        let home = kt_home();
        let owned =
            std::iter::once(path).chain(dir.ancestors().take_while(|d| d.starts_with(&home)));
        for entry in owned {
            std::os::unix::fs::chown(entry, Some(uid), Some(gid)).map_err(fail)?;
        }
    }
    Ok(())
}

impl Session {
    /// Writes the pid file and starts watching signals and the pid file.
    pub fn start(component: &str) -> Result<std::sync::Arc<Self>, SessionError> {
        let home = kt_home();
        let pid = std::process::id();
        let pid_file = home.join("pid").join(format!("{component}-{pid}.pid"));
        write_file(&pid_file, pid.to_string().as_bytes(), 0o644)?;
        let session = std::sync::Arc::new(Self {
            home,
            pid_file,
            stop: CancellationToken::new(),
            teardown: Mutex::new(Vec::new()),
        });
        tokio::spawn(watch(session.pid_file.clone(), session.stop.clone()));
        Ok(session)
    }

    /// Registers an undo step; steps run last-registered first.
    pub fn defer(&self, what: impl Into<String>, step: impl Future<Output = ()> + Send + 'static) {
        self.teardown
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((what.into(), Box::pin(step)));
    }

    /// Runs the teardown steps and removes the pid file.
    pub async fn finish(&self) {
        let steps: Vec<(String, Step)> =
            std::mem::take(&mut *self.teardown.lock().unwrap_or_else(|e| e.into_inner()));
        for (what, step) in steps.into_iter().rev() {
            tracing::debug!("{what}");
            step.await;
        }
        if std::fs::remove_file(&self.pid_file).is_ok() {
            tracing::info!("Removed pid file {}", self.pid_file.display());
        }
    }
}

async fn watch(pid_file: PathBuf, stop: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut signals: Vec<_> = [
        SignalKind::interrupt(),
        SignalKind::terminate(),
        SignalKind::hangup(),
        SignalKind::quit(),
    ]
    .into_iter()
    .filter_map(|k| signal(k).ok().map(|s| (k, s)))
    .collect();
    let mut tick = tokio::time::interval(Duration::from_millis(300));
    loop {
        let any_signal = futures_signal(&mut signals);
        tokio::select! {
            () = stop.cancelled() => return,
            name = any_signal => {
                tracing::info!("Terminal Signal is {name}");
                stop.cancel();
                return;
            }
            _ = tick.tick() => {
                if !pid_file.exists() {
                    tracing::info!("Pid file was removed");
                    stop.cancel();
                    return;
                }
            }
        }
    }
}

/// The first of several signal streams to fire, by name.
async fn futures_signal(
    signals: &mut [(tokio::signal::unix::SignalKind, tokio::signal::unix::Signal)],
) -> &'static str {
    if signals.is_empty() {
        std::future::pending::<()>().await;
    }
    let waits = signals.iter_mut().map(|(kind, s)| {
        let name = match kind.as_raw_value() {
            libc::SIGINT => "interrupt",
            libc::SIGTERM => "terminated",
            libc::SIGHUP => "hangup",
            _ => "quit",
        };
        Box::pin(async move {
            s.recv().await;
            name
        })
    });
    futures::future::select_all(waits).await.0
}
