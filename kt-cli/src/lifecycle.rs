//! One ktctl run's local lifecycle: the pid file `~/.kt/pid/<component>-<pid>.pid`
//! (removing it stops ktctl: the v0.3.7 kill switch), the signals that stop it (SIGINT,
//! SIGTERM, SIGHUP, SIGQUIT), its background tasks, and the teardown steps registered while
//! setting up, run in reverse order on the way out — after a signal, an error or a normal
//! end alike.
//!
//! Each teardown step is bounded by [`STEP_TIMEOUT`]; a step that fails or times out is
//! logged with what it leaves behind. A second signal during teardown ends ktctl at once
//! (kube-rs' `shutdown_on_signal` model), printing every step not done.
//!
//! Files under `~/.kt` written by a ktctl run under `sudo` belong to the user who ran sudo
//! (`SUDO_UID`/`SUDO_GID`), as in v0.3.7, so that user's later non-root commands can manage them.

use std::{
    future::Future,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// How long one teardown step (a delete, a patch) may take.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// Exit code when a second signal cuts teardown short.
const EXIT_INTERRUPTED_TEARDOWN: i32 = 130;

type Step = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error("failed to write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Why the run is ending.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// A signal (its name as v0.3.7 logs it).
    Signal(&'static str),
    /// The pid file went away.
    PidFile,
}

/// A teardown step: what undoing it leaves behind if it does not run, and the step.
struct Undo {
    leftover: String,
    timeout: Duration,
    step: Step,
}

pub struct Lifecycle {
    pub home: PathBuf,
    pid_file: PathBuf,
    /// Cancelled by a signal or by the pid file going away.
    pub stop: CancellationToken,
    /// What stopped the run, once something did.
    stopped_by: Arc<Mutex<Option<Stop>>>,
    /// Teardown steps not run yet, in registration order.
    undo: Arc<Mutex<Vec<Undo>>>,
    /// Background work of this run (heartbeats, the watcher); ended in [`Lifecycle::finish`].
    pub tasks: TaskTracker,
    /// Cancelled by [`Lifecycle::finish`] after teardown: stops background tasks.
    pub done: CancellationToken,
}

/// `$HOME/.kt`.
pub fn kt_home() -> PathBuf {
    PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".kt")
}

/// The user who ran `sudo ktctl`, when ktctl runs as root under sudo.
#[cfg(unix)]
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
/// sudo user. (`mode` and owners are Unix's; elsewhere the file is written as the system
/// makes it.)
pub fn write_file(path: &Path, content: &[u8], mode: u32) -> Result<(), LifecycleError> {
    let fail = |source| LifecycleError::Write {
        path: path.to_owned(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(fail)?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    let mut file = options.open(path).map_err(fail)?;
    #[cfg(unix)]
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))
        .map_err(fail)?;
    #[cfg(not(unix))]
    let _ = mode;
    std::io::Write::write_all(&mut file, content).map_err(fail)?;
    #[cfg(unix)]
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

impl Lifecycle {
    /// Writes the pid file and starts watching signals and the pid file.
    pub fn start(component: &str) -> Result<Arc<Self>, LifecycleError> {
        let home = kt_home();
        let pid = std::process::id();
        let pid_file = home.join("pid").join(format!("{component}-{pid}.pid"));
        write_file(&pid_file, pid.to_string().as_bytes(), 0o644)?;
        let lifecycle = Arc::new(Self {
            home,
            pid_file,
            stop: CancellationToken::new(),
            stopped_by: Arc::default(),
            undo: Arc::default(),
            tasks: TaskTracker::new(),
            done: CancellationToken::new(),
        });
        lifecycle.tasks.spawn(watch(
            lifecycle.pid_file.clone(),
            lifecycle.stop.clone(),
            lifecycle.stopped_by.clone(),
            lifecycle.undo.clone(),
            lifecycle.done.clone(),
        ));
        Ok(lifecycle)
    }

    /// What stopped the run, if something did.
    pub fn stopped_by(&self) -> Option<Stop> {
        *self.stopped_by.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers an undo step; steps run last-registered first. `leftover` names what stays
    /// behind if the step fails or never runs ("shadow pod x", "the selector of service y").
    pub fn defer<E: std::error::Error>(
        &self,
        leftover: impl Into<String>,
        step: impl Future<Output = Result<(), E>> + Send + 'static,
    ) {
        self.defer_within(leftover, STEP_TIMEOUT, step);
    }

    /// [`Lifecycle::defer`] for a step that may take up to `timeout` (one that waits for
    /// pods to come back).
    pub fn defer_within<E: std::error::Error>(
        &self,
        leftover: impl Into<String>,
        timeout: Duration,
        step: impl Future<Output = Result<(), E>> + Send + 'static,
    ) {
        self.undo
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Undo {
                leftover: leftover.into(),
                timeout,
                step: Box::pin(async move { step.await.map_err(|e| kt_proto::error_chain(&e)) }),
            });
    }

    /// Runs the teardown steps (each within its timeout), removes the pid file and
    /// ends the background tasks.
    pub async fn finish(&self) {
        loop {
            // Take one step at a time: a second signal reports those still queued.
            let next = self.undo.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let Some(Undo {
                leftover,
                timeout,
                step,
            }) = next
            else {
                break;
            };
            match tokio::time::timeout(timeout, step).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    tracing::warn!("Failed to clean up, left behind: {leftover}: {error}")
                }
                Err(_) => tracing::warn!(
                    "Cleaning up took more than {} s, left behind: {leftover}",
                    timeout.as_secs()
                ),
            }
        }
        if std::fs::remove_file(&self.pid_file).is_ok() {
            tracing::info!("Removed pid file {}", self.pid_file.display());
        }
        self.done.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// Stops the run on the first signal or when the pid file goes; on a second signal (during
/// teardown) exits at once, naming what is left behind.
async fn watch(
    pid_file: PathBuf,
    stop: CancellationToken,
    stopped_by: Arc<Mutex<Option<Stop>>>,
    undo: Arc<Mutex<Vec<Undo>>>,
    done: CancellationToken,
) {
    let mut signals = signal_streams();
    let mut tick = tokio::time::interval(Duration::from_millis(300));
    let record = |why: Stop| {
        stopped_by
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(why);
        stop.cancel();
    };
    loop {
        tokio::select! {
            () = done.cancelled() => return,
            name = next_signal(&mut signals) => {
                if stop.is_cancelled() {
                    let left: Vec<String> = undo
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .iter()
                        .rev()
                        .map(|u| u.leftover.clone())
                        .collect();
                    tracing::error!(
                        "Second signal ({name}), exiting without cleaning up; left behind: {}",
                        if left.is_empty() { "nothing registered".into() } else { left.join(", ") }
                    );
                    std::process::exit(EXIT_INTERRUPTED_TEARDOWN);
                }
                tracing::info!("Terminal Signal is {name}");
                record(Stop::Signal(name));
            }
            _ = tick.tick(), if !stop.is_cancelled() => {
                if !pid_file.exists() {
                    tracing::info!("Pid file was removed");
                    record(Stop::PidFile);
                }
            }
        }
    }
}

/// A stream of one kind of signal.
#[cfg(unix)]
type SignalStream = tokio::signal::unix::Signal;
#[cfg(windows)]
type SignalStream = tokio::signal::windows::CtrlC;

/// The signals that stop a command, with the names its log gives them: interrupt,
/// terminate, hangup and quit on Unix; Ctrl-C on Windows.
#[cfg(unix)]
fn signal_streams() -> Vec<(SignalStream, &'static str)> {
    use tokio::signal::unix::{SignalKind, signal};
    [
        (SignalKind::interrupt(), "interrupt"),
        (SignalKind::terminate(), "terminated"),
        (SignalKind::hangup(), "hangup"),
        (SignalKind::quit(), "quit"),
    ]
    .into_iter()
    .filter_map(|(kind, name)| signal(kind).ok().map(|s| (s, name)))
    .collect()
}

#[cfg(windows)]
fn signal_streams() -> Vec<(SignalStream, &'static str)> {
    tokio::signal::windows::ctrl_c()
        .ok()
        .map(|s| (s, "interrupt"))
        .into_iter()
        .collect()
}

/// The first of several signal streams to fire, by name.
async fn next_signal(signals: &mut [(SignalStream, &'static str)]) -> &'static str {
    if signals.is_empty() {
        return std::future::pending().await;
    }
    let waits = signals.iter_mut().map(|(signal, name)| {
        Box::pin(async move {
            signal.recv().await;
            *name
        })
    });
    futures::future::select_all(waits).await.0
}
