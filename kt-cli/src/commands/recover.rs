//! `ktctl recover <svc>`: puts back a Service that a ktctl which did not finish left
//! exchanged or meshed — the Go ktctl v0.3.7's objects and kt's (ktctl v0.3.7
//! `command/recover.go`, `recover/common.go`). The decision is [`plan`]'s (pure); this reads
//! the namespace once and carries it out.
//!
//! Unlike v0.3.7, which does not look, a holder that still seems alive (a shadow or router
//! whose heartbeat is fresh, an agent session whose lease lives) is named in a warning
//! before it is removed: `recover` stays the way out of "already exchanging by another
//! user" (v0.3.7's users run it for exactly that, issue #363), so it does not refuse, but
//! nobody's live session ends silently.

pub mod plan;

use crate::{
    cluster::{
        self, ClusterError,
        stale::{ActionError, Inventory, action},
    },
    settings::Settings,
};

/// Why `recover` failed.
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    /// Not a Service's name (a DNS-1035 label), or another kind's (`deploy/x`, `pod/x`).
    #[error(
        "invalid service '{0}': recover takes a service, as 'name', 'svc/name' or 'service/name'"
    )]
    BadName(String),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// Some actions failed (each is logged); the first is the source.
    #[error("service '{service}' is not fully recovered ({count} of its changes failed)")]
    Incomplete {
        service: String,
        count: usize,
        #[source]
        first: ActionError,
    },
}

/// Runs `recover` for `service` (`name`, `svc/name` or `service/name`).
pub async fn run(settings: &Settings, service: &str) -> Result<(), RecoverError> {
    let name = cluster::service_name(service);
    // Before any cluster call: `deploy/x` or `../pods` is no Service's name.
    if !crate::commands::preview::objects::valid_name(name) {
        return Err(RecoverError::BadName(service.to_owned()));
    }
    let cluster = cluster::connect(&settings.cluster).await?;
    let svc = cluster.service(name).await?;
    let inventory = Inventory::read(&cluster.client, &cluster.namespace).await?;
    let recovery = plan::recover(&svc, &inventory, cluster.clock.now());
    tracing::info!("{}", recovery.state.message(name));
    for problem in &recovery.problems {
        tracing::warn!("Service {name}: {problem}");
    }
    for alive in &recovery.alive {
        tracing::warn!(
            "{} of {} is still alive (last heart beat {}): recovering ends it",
            alive.what,
            alive.owner,
            plan::ago(alive.seconds_ago)
        );
    }
    let mut failed = action::execute(&cluster.client, &cluster.namespace, &recovery.actions).await;
    for error in failed.iter().skip(1) {
        tracing::error!("{}", kt_proto::error_chain(error));
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(RecoverError::Incomplete {
            service: name.to_owned(),
            count: failed.len(),
            first: failed.remove(0),
        })
    }
}
