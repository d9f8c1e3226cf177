//! One ktctl run's local state and lifecycle: the pid file `~/.kt/pid/<component>-<pid>.pid`
//! (removing it stops ktctl: the v0.3.7 kill switch), the signals that stop it (SIGINT,
//! SIGTERM, SIGHUP, SIGQUIT), and the teardown steps registered while setting up, run in
//! reverse order on the way out — after a signal, an error or a normal end alike.

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

impl Session {
    /// Writes the pid file and starts watching signals and the pid file.
    pub fn start(component: &str) -> Result<std::sync::Arc<Self>, SessionError> {
        let home = kt_home();
        let pid = std::process::id();
        let pid_file = home.join("pid").join(format!("{component}-{pid}.pid"));
        let write = |path: &Path, content: &str| {
            std::fs::create_dir_all(path.parent().unwrap_or(Path::new(".")))
                .and_then(|()| std::fs::write(path, content))
                .map_err(|source| SessionError::Write {
                    path: path.to_owned(),
                    source,
                })
        };
        write(&pid_file, &pid.to_string())?;
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
