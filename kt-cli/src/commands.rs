//! One module per ktctl subcommand, and what they share: the shadow pod with its SSH
//! connections, and the banner.

pub mod birdseye;
pub mod clean;
pub mod config;
pub mod connect;
pub mod exchange;
pub mod forward;
pub mod mesh;
pub mod preview;
pub mod recover;

use std::{path::PathBuf, sync::Arc};

use crate::{
    cluster::Cluster,
    lifecycle::{Lifecycle, LifecycleError},
    settings::Settings,
    shadow::{self, ShadowError, ShadowSpec, Teardown},
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
    #[error("the private key in configmap {name} does not parse")]
    Key {
        name: String,
        #[source]
        source: russh::keys::Error,
    },
}

/// A shadow's SSH connections and the session key's file (what `ssh -i` or sshuttle use).
pub struct ShadowTunnel {
    pub pool: Arc<SshPool>,
    pub key_file: PathBuf,
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
    let tunnel = open_shadow(
        settings,
        cluster,
        lifecycle,
        spec,
        connections,
        Teardown::Delete,
    )
    .await?;
    Ok(tunnel.map(|t| t.pool))
}

/// [`shadow_tunnel`] with the shadow's `teardown` chosen, returning the key file too.
pub async fn open_shadow(
    settings: &Settings,
    cluster: &Cluster,
    lifecycle: &Arc<Lifecycle>,
    spec: &ShadowSpec,
    connections: usize,
    teardown: Teardown,
) -> Result<Option<ShadowTunnel>, ShadowTunnelError> {
    let key = SessionKey::generate();
    let key_file = write_key(lifecycle, &spec.name, &key.private_pem)?;
    let pod = tokio::select! {
        () = lifecycle.stop.cancelled() => return Ok(None),
        deployed = shadow::deploy(cluster, lifecycle, spec, &key.public_line, &key.private_pem, teardown) => deployed?,
    };
    start_pool(
        settings,
        cluster,
        lifecycle,
        &pod,
        key.private,
        connections,
        key_file,
    )
    .await
}

/// SSH connections to the running shadow `name` with the session key `private_pem` (a
/// shared shadow's, from its ConfigMap: OpenSSH or PKCS#1 PEM, as v0.3.7 writes it).
pub async fn join_shadow(
    settings: &Settings,
    cluster: &Cluster,
    lifecycle: &Arc<Lifecycle>,
    name: &str,
    private_pem: &str,
    connections: usize,
) -> Result<Option<ShadowTunnel>, ShadowTunnelError> {
    let private = russh::keys::decode_secret_key(private_pem, None).map_err(|source| {
        ShadowTunnelError::Key {
            name: name.to_owned(),
            source,
        }
    })?;
    let key_file = write_key(lifecycle, name, private_pem)?;
    start_pool(
        settings,
        cluster,
        lifecycle,
        name,
        Arc::new(private),
        connections,
        key_file,
    )
    .await
}

/// Writes `~/.kt/key/<name>.key` and registers its removal.
fn write_key(
    lifecycle: &Lifecycle,
    name: &str,
    private_pem: &str,
) -> Result<PathBuf, LifecycleError> {
    let key_file = lifecycle.home.join("key").join(format!("{name}.key"));
    crate::lifecycle::write_file(&key_file, private_pem.as_bytes(), 0o400)?;
    let removed = key_file.clone();
    lifecycle.defer(format!("key file {}", key_file.display()), async move {
        std::fs::remove_file(&removed)?;
        tracing::info!("Removed key file {}", removed.display());
        Ok::<(), std::io::Error>(())
    });
    Ok(key_file)
}

async fn start_pool(
    settings: &Settings,
    cluster: &Cluster,
    lifecycle: &Lifecycle,
    name: &str,
    key: Arc<russh::keys::PrivateKey>,
    connections: usize,
    key_file: PathBuf,
) -> Result<Option<ShadowTunnel>, ShadowTunnelError> {
    let pool = Arc::new(SshPool::new(
        cluster.client.clone(),
        Target::shadow(&cluster.namespace, name),
        key,
        settings.ssh.transport,
        connections,
    ));
    tokio::select! {
        () = lifecycle.stop.cancelled() => return Ok(None),
        started = pool.start(settings.ssh.connect_timeout) => { started?; }
    }
    Ok(Some(ShadowTunnel { pool, key_file }))
}

/// ktctl's banner: the message between two lines of 63 dashes.
pub fn banner(message: &str) {
    banner_of_width(message, 63);
}

/// The banner with lines of `width` dashes (v0.3.7's manual mesh uses 57).
pub fn banner_of_width(message: &str, width: usize) {
    let line = "-".repeat(width);
    tracing::info!("{line}");
    tracing::info!("{message}");
    tracing::info!("{line}");
}
