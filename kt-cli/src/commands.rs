//! One module per ktctl subcommand, and the session set-up they share.

pub mod exchange;
pub mod forward;

use std::sync::Arc;

use crate::{
    CliError,
    args::GlobalOptions,
    cluster::Cluster,
    session::Session,
    shadow::{self, ShadowSpec},
    tunnel::{SessionKey, Tunnel},
};

/// A fresh session key (its private half at `~/.kt/key/<shadow>.key`, mode 0400, as in
/// v0.3.7), the shadow pod `spec` with its ConfigMap, and an SSH tunnel to it with
/// `connections` connections. `None` when the session was stopped while the pod started.
/// Everything created is removed when the session finishes.
pub async fn shadow_tunnel(
    global: &GlobalOptions,
    cluster: &Cluster,
    session: &Arc<Session>,
    spec: &ShadowSpec,
    connections: usize,
) -> Result<Option<Arc<Tunnel>>, CliError> {
    let key = SessionKey::generate();
    let key_file = session.home.join("key").join(format!("{}.key", spec.name));
    crate::session::write_file(&key_file, key.private_pem.as_bytes(), 0o400)?;
    session.defer("remove key file", async move {
        if std::fs::remove_file(&key_file).is_ok() {
            tracing::info!("Removed key file {}", key_file.display());
        }
    });
    tokio::select! {
        () = session.stop.cancelled() => return Ok(None),
        deployed = shadow::deploy(&cluster.client, session, spec, &key.public_line, &key.private_pem, global.pod_creation_timeout) => deployed?,
    }
    let tunnel = Arc::new(Tunnel::new(
        cluster.client.clone(),
        &cluster.namespace,
        &spec.name,
        key.private.clone(),
        global.transport,
        connections,
    ));
    let timeout = std::time::Duration::from_secs(u64::from(global.port_forward_timeout));
    tokio::select! {
        () = session.stop.cancelled() => return Ok(None),
        started = tunnel.start(timeout) => { started?; }
    }
    Ok(Some(tunnel))
}

/// ktctl's banner: the message between two lines of 63 dashes.
pub fn banner(message: &str) {
    let line = "-".repeat(63);
    tracing::info!("{line}");
    tracing::info!("{message}");
    tracing::info!("{line}");
}
