//! Named long-running tasks of a role. The first one that fails — or ends while the role is
//! not shutting down — cancels the others, and the role returns that failure, so the process
//! exits non-zero and Kubernetes restarts it. An agent must never stay Ready with a dead SSH
//! server or a frozen watch (mirrord's rule for its agent's background tasks).

use std::{
    error::Error,
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument as _;

/// Why a role stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum TaskFailure {
    #[error("task '{task}' failed")]
    Failed {
        task: &'static str,
        #[source]
        error: Box<dyn Error + Send + Sync>,
    },
    #[error("task '{task}' ended unexpectedly")]
    Ended { task: &'static str },
}

/// The role's tasks and the first failure among them.
#[derive(Clone)]
pub struct Tasks {
    tracker: TaskTracker,
    shutdown: CancellationToken,
    failure: Arc<Mutex<Option<TaskFailure>>>,
}

impl Tasks {
    /// Tasks that stop when `shutdown` is cancelled, and cancel it when one fails.
    pub fn new(shutdown: CancellationToken) -> Self {
        Self {
            tracker: TaskTracker::new(),
            shutdown,
            failure: Arc::default(),
        }
    }

    /// The token every task stops on.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// Runs `task` as `name` in a span of that name. It is expected to run until shutdown:
    /// an error, or an end before shutdown, stops every task.
    pub fn spawn<E>(
        &self,
        name: &'static str,
        task: impl Future<Output = Result<(), E>> + Send + 'static,
    ) where
        E: Error + Send + Sync + 'static,
    {
        let (shutdown, failure) = (self.shutdown.clone(), self.failure.clone());
        self.tracker.spawn(
            async move {
                let failed = match task.await {
                    Err(error) => Some(TaskFailure::Failed {
                        task: name,
                        error: Box::new(error),
                    }),
                    Ok(()) if !shutdown.is_cancelled() => Some(TaskFailure::Ended { task: name }),
                    Ok(()) => None,
                };
                if let Some(failed) = failed {
                    tracing::error!(error = %kt_proto::error_chain(&failed), "stopping");
                    failure
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_or_insert(failed);
                    shutdown.cancel();
                }
            }
            .instrument(tracing::info_span!("task", name)),
        );
    }

    /// Waits for shutdown (a signal or a failure), then for the tasks to end, at most
    /// `grace`; returns the first failure, if any.
    pub async fn run_until_shutdown(self, grace: Duration) -> Result<(), TaskFailure> {
        self.shutdown.cancelled().await;
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                grace_ms = grace.as_millis(),
                tasks = self.tracker.len(),
                "tasks still running after the shutdown grace period, leaving them"
            );
        }
        match self
            .failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            Some(failure) => Err(failure),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("listener gone")]
    struct Gone;

    #[tokio::test]
    async fn the_first_failure_stops_every_task_and_is_returned() {
        let tasks = Tasks::new(CancellationToken::new());
        let stop = tasks.shutdown().clone();
        tasks.spawn("watch", async move {
            stop.cancelled().await;
            Ok::<(), Gone>(())
        });
        tasks.spawn("ssh-server", async { Err::<(), _>(Gone) });
        let failure = tasks
            .run_until_shutdown(Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(
            failure,
            TaskFailure::Failed {
                task: "ssh-server",
                ..
            }
        ));
        assert_eq!(
            kt_proto::error_chain(&failure),
            "task 'ssh-server' failed: listener gone"
        );
    }

    #[tokio::test]
    async fn a_task_that_ends_before_shutdown_is_a_failure() {
        let tasks = Tasks::new(CancellationToken::new());
        tasks.spawn("watch", async { Ok::<(), Gone>(()) });
        let failure = tasks
            .run_until_shutdown(Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(failure, TaskFailure::Ended { task: "watch" }));
    }

    #[tokio::test]
    async fn shutdown_ends_cleanly_and_does_not_wait_past_the_grace_period() {
        let tasks = Tasks::new(CancellationToken::new());
        let stop = tasks.shutdown().clone();
        tasks.spawn("stubborn", async {
            std::future::pending::<()>().await;
            Ok::<(), Gone>(())
        });
        stop.cancel();
        let started = tokio::time::Instant::now();
        assert!(
            tasks
                .run_until_shutdown(Duration::from_millis(50))
                .await
                .is_ok()
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
