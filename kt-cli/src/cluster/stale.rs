//! What dead ktctl runs left in a namespace — kt's and the Go ktctl v0.3.7's — and how it is
//! put right: [`inventory`] reads the namespace, [`plan`] decides (pure, by v0.3.7's
//! staleness rule: a heartbeat `kt-last-heart-beat` older than `--thresholdInMinus`, judged
//! by the cluster's clock), [`action`] carries it out. `ktctl clean` runs all of it;
//! `connect` runs the same at start in the background (unless `--skipCleanup`), as v0.3.7's
//! does, with the default threshold. Objects without a heartbeat are never touched.

pub mod action;
pub mod inventory;
pub mod plan;

pub use self::{
    action::{Action, ActionError, Kind},
    inventory::Inventory,
    plan::{CleanPlan, STALE_AFTER, heartbeat_stale},
};

/// `connect`'s startup cleanup: [`plan::plan`] with the default threshold, carried out.
/// Failures are logged at debug level (it is housekeeping, never a reason to fail a
/// command). Staleness is judged by `clock`, the cluster's time: a workstation whose clock
/// runs ahead must not take live objects for dead ones.
pub async fn delete_expired(
    client: kube::Client,
    namespace: String,
    clock: super::clock::ClusterClock,
) {
    let inventory = match Inventory::read(&client, &namespace).await {
        Ok(inventory) => inventory,
        Err(error) => {
            tracing::debug!("no cleanup: {}", kt_proto::error_chain(&error));
            return;
        }
    };
    let plan = plan::plan(&inventory, clock.now(), STALE_AFTER);
    for error in action::execute(&client, &namespace, &plan.actions()).await {
        tracing::debug!("cleanup: {}", kt_proto::error_chain(&error));
    }
}
