//! Scale mode (ktctl v0.3.7): a shadow carrying the Service's labels takes its traffic while
//! every Deployment the Service selects is scaled to zero; on exit each is scaled back to its
//! own count and waited for (up to `--recoverWaitTime`) before the shadow goes.

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::api::apps::v1::Deployment;
use kube::{
    Api,
    api::{ListParams, Patch, PatchParams},
    runtime::wait::await_condition,
};
use serde_json::json;

use super::{Context, ExchangeError, plan::PortPlan};
use crate::cluster::{Cluster, ClusterError};

/// v0.3.7's progress interval while the Deployment comes back.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Every Deployment whose pod template the Service's `selector` selects (a canary next to
/// the main one, say): all of them are scaled to zero, or the Service would keep sending
/// part of its traffic to them.
pub(super) async fn deployments_of(
    cluster: &Cluster,
    service: &str,
    selector: &BTreeMap<String, String>,
) -> Result<Vec<Deployment>, ExchangeError> {
    let deployments: Api<Deployment> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    let list = deployments
        .list(&ListParams::default())
        .await
        .map_err(ClusterError::api("list deployments"))?;
    let selected: Vec<Deployment> = list
        .items
        .into_iter()
        .filter(|d| {
            let labels = d
                .spec
                .as_ref()
                .and_then(|s| s.template.metadata.as_ref())
                .and_then(|m| m.labels.as_ref());
            labels.is_some_and(|l| selector.iter().all(|(k, v)| l.get(k) == Some(v)))
        })
        .collect();
    if selected.is_empty() {
        return Err(ExchangeError::NoDeployment(service.to_owned()));
    }
    let names: Vec<&str> = selected
        .iter()
        .filter_map(|d| d.metadata.name.as_deref())
        .collect();
    tracing::info!("Using deployment {}", names.join(", "));
    Ok(selected)
}

/// The shadow carries the Service's selector, so that the Service sends it every
/// connection; `kt-config` names the first Deployment as v0.3.7 does (`app=<name>,
/// replicas=<n>`, what the Go ktctl's `recover` reads).
pub(super) async fn exchange(
    ctx: &Context<'_>,
    service: &str,
    selector: &BTreeMap<String, String>,
    deployments: Vec<Deployment>,
    plan: &PortPlan,
    recover_wait: Duration,
) -> Result<(), ExchangeError> {
    let api: Api<Deployment> = Api::namespaced(ctx.cluster.client.clone(), &ctx.cluster.namespace);
    let scaled: Vec<(String, i32)> = deployments
        .iter()
        .map(|d| {
            (
                d.metadata.name.clone().unwrap_or_default(),
                d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1),
            )
        })
        .collect();
    let (first, first_replicas) = scaled[0].clone();
    let Some((pool, forwards)) = super::exchange_shadow(
        ctx,
        &first,
        selector.clone(),
        format!("app={first},replicas={first_replicas}"),
        plan,
    )
    .await?
    else {
        return Ok(());
    };

    for (deploy, replicas) in &scaled {
        tracing::info!("Scaling deployment {deploy} from {replicas} to 0");
        scale(&api, deploy, 0).await?;
        let (api, deploy, replicas) = (api.clone(), deploy.clone(), *replicas);
        ctx.lifecycle.defer_within(
            format!("deployment {deploy} scaled to 0 (it had {replicas} replicas)"),
            recover_wait + crate::lifecycle::STEP_TIMEOUT,
            async move {
                tracing::info!("Scaling deployment {deploy} back to {replicas}");
                scale(&api, &deploy, replicas).await?;
                wait_recovered(&api, &deploy, replicas, recover_wait).await;
                Ok::<(), ClusterError>(())
            },
        );
    }
    let what: Vec<String> = scaled
        .iter()
        .map(|(d, _)| format!("deployment '{d}'"))
        .collect();
    super::keep_reverse_tunnels(ctx, service, &pool, &forwards, &what.join(", ")).await;
    Ok(())
}

async fn scale(
    deployments: &Api<Deployment>,
    name: &str,
    replicas: i32,
) -> Result<(), ClusterError> {
    let patch = json!({"spec": {"replicas": replicas}});
    deployments
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(drop)
        .map_err(ClusterError::api(format!("scale deployment '{name}'")))
}

/// Waits until `replicas` pods of the Deployment are ready or `wait` passes, saying what it
/// waits for every 5 s (v0.3.7's poll); returns as soon as they are.
async fn wait_recovered(deployments: &Api<Deployment>, name: &str, replicas: i32, wait: Duration) {
    let ready = |d: Option<&Deployment>| {
        d.and_then(|d| d.status.as_ref()?.ready_replicas)
            .unwrap_or(0)
            >= replicas
    };
    let recovered = await_condition(deployments.clone(), name, ready);
    let mut recovered = std::pin::pin!(tokio::time::timeout(wait, recovered));
    let mut progress = tokio::time::interval(PROGRESS_EVERY);
    progress.tick().await;
    loop {
        tokio::select! {
            done = &mut recovered => {
                match done {
                    Ok(Ok(_)) => tracing::info!("Deployment {name} recovered"),
                    Ok(Err(error)) => tracing::warn!("Failed to watch deployment {name}: {error}"),
                    Err(_) => tracing::warn!(
                        "Deployment {name} has fewer than {replicas} pods ready after {} s, not waiting longer",
                        wait.as_secs()
                    ),
                }
                return;
            }
            _ = progress.tick() => tracing::info!("Wait for deployment {name} recover ..."),
        }
    }
}
