//! ktctl v0.3.7's Service lock (`general/lock.go`): the annotation `kt-lock` holds the Unix
//! time it was taken; while it is younger than 180 s no other ktctl changes the Service.
//! Taking it is retried every 3 s, ten times. kt writes it with the resourceVersion it read,
//! so two ktctls cannot both take a free lock (v0.3.7 does not).

use std::time::Duration;

use backon::{ConstantBuilder, Retryable as _};
use k8s_openapi::api::core::v1::Service;
use kt_proto::compat;
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use serde_json::json;

/// v0.3.7: a lock older than this is abandoned and may be taken over.
pub const LOCK_TIMEOUT_SECS: i64 = 180;
const RETRIES: usize = 10;
const RETRY_DELAY: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("service '{0}' is locked by another ktctl, try again later")]
    Held(String),
    #[error("failed to {what}")]
    Api {
        what: String,
        #[source]
        source: Box<kube::Error>,
    },
}

/// Whether a `kt-lock` value still holds at `now` (Unix seconds); a value that is not a
/// number holds nothing.
pub fn lock_held(annotation: Option<&str>, now: i64) -> bool {
    annotation
        .and_then(|t| t.parse::<i64>().ok())
        .is_some_and(|taken| now - taken < LOCK_TIMEOUT_SECS)
}

/// One attempt: [`LockError::Held`] also when another ktctl took it between our read and
/// our write (409).
async fn try_lock(services: &Api<Service>, name: &str) -> Result<(), LockError> {
    let api = |what: &str| {
        let what = format!("{what} service '{name}'");
        move |source| LockError::Api {
            what,
            source: Box::new(source),
        }
    };
    let svc = services.get(name).await.map_err(api("get"))?;
    let now = chrono::Utc::now().timestamp();
    let current = svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(compat::LOCK));
    if lock_held(current.map(String::as_str), now) {
        return Err(LockError::Held(name.to_owned()));
    }
    let patch = json!({"metadata": {
        "resourceVersion": svc.metadata.resource_version,
        "annotations": {compat::LOCK: now.to_string()},
    }});
    match services
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 409 => {
            Err(LockError::Held(name.to_owned()))
        }
        Err(e) => Err(api("lock")(e)),
    }
}

/// Takes `kt-lock` on the Service, retrying while another ktctl holds it.
pub async fn lock(services: &Api<Service>, name: &str) -> Result<(), LockError> {
    (|| try_lock(services, name))
        .retry(
            ConstantBuilder::default()
                .with_delay(RETRY_DELAY)
                .with_max_times(RETRIES),
        )
        .when(|e| matches!(e, LockError::Held(_)))
        .notify(|_, _| tracing::info!("Service {name} is locked by another ktctl, retrying"))
        .await?;
    tracing::info!("Service {name} locked");
    Ok(())
}

/// Removes `kt-lock`.
pub async fn unlock(services: &Api<Service>, name: &str) -> Result<(), LockError> {
    let patch = json!({"metadata": {"annotations": {compat::LOCK: null}}});
    services
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|source| LockError::Api {
            what: format!("unlock service '{name}'"),
            source: Box::new(source),
        })?;
    tracing::info!("Service {name} unlocked");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_holds_for_180_seconds_and_garbage_holds_nothing() {
        let now = 1_000_000;
        assert!(lock_held(Some("1000000"), now));
        assert!(lock_held(Some(&(now - 179).to_string()), now));
        assert!(!lock_held(Some(&(now - 180).to_string()), now));
        assert!(!lock_held(Some("soon"), now));
        assert!(!lock_held(None, now));
    }
}
