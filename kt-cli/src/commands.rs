//! One module per ktctl subcommand, and what they share: the shadow pod with its SSH
//! connections, and the banner.

pub mod exchange;
pub mod forward;

use std::sync::Arc;

use crate::{
    cluster::Cluster,
    lifecycle::{Lifecycle, LifecycleError},
    settings::Settings,
    shadow::{self, ShadowError, ShadowSpec},
    ssh_client::{SessionKey, SshError, SshPool, Target},
};

/// Why a shadow and its SSH connections could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ShadowTunnelError {
    #[error(transparent)]
    Lifecycle(#[from] LifecycleError),
    #[error(transparent)]
    Shadow(#[from] ShadowError),
    #[error(transparent)]
    Ssh(#[from] SshError),
}

/// A fresh session key (its private half at `~/.kt/key/<shadow>.key`, mode 0400, as in
/// v0.3.7), the shadow pod `spec` with its ConfigMap, and `connections` SSH connections to
/// it. `None` when the run was stopped while the pod started. Everything created is removed
/// when the run finishes.
pub async fn shadow_tunnel(
    settings: &Settings,
    cluster: &Cluster,
    lifecycle: &Arc<Lifecycle>,
    spec: &ShadowSpec,
    connections: usize,
) -> Result<Option<Arc<SshPool>>, ShadowTunnelError> {
    let key = SessionKey::generate();
    let key_file = lifecycle
        .home
        .join("key")
        .join(format!("{}.key", spec.name));
    crate::lifecycle::write_file(&key_file, key.private_pem.as_bytes(), 0o400)?;
    lifecycle.defer(format!("key file {}", key_file.display()), async move {
        std::fs::remove_file(&key_file)?;
        tracing::info!("Removed key file {}", key_file.display());
        Ok::<(), std::io::Error>(())
    });
    tokio::select! {
        () = lifecycle.stop.cancelled() => return Ok(None),
        deployed = shadow::deploy(&cluster.client, lifecycle, spec, &key.public_line, &key.private_pem) => deployed?,
    }
    let pool = Arc::new(SshPool::new(
        cluster.client.clone(),
        Target::shadow(&cluster.namespace, &spec.name),
        key.private.clone(),
        settings.ssh.transport,
        connections,
    ));
    tokio::select! {
        () = lifecycle.stop.cancelled() => return Ok(None),
        started = pool.start(settings.ssh.connect_timeout) => { started?; }
    }
    Ok(Some(pool))
}

/// ktctl's banner: the message between two lines of 63 dashes.
pub fn banner(message: &str) {
    let line = "-".repeat(63);
    tracing::info!("{line}");
    tracing::info!("{message}");
    tracing::info!("{line}");
}
