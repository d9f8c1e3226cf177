//! Scale mode (ktctl v0.3.7): a shadow carrying the Deployment's pod labels
//! (`kt-config: app=<deploy>,replicas=<n>`) takes the Service's traffic while the Deployment
//! is scaled to zero; on exit the Deployment is scaled back and waited for (up to
//! `--recoverWaitTime`) before the shadow goes.

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::api::apps::v1::Deployment;
use kube::{
    Api,
    api::{ListParams, Patch, PatchParams},
    runtime::wait::await_condition,
};
use serde_json::json;

use super::{Context, ExchangeError, plan::Exposed};
use crate::cluster::{Cluster, ClusterError};

/// v0.3.7's progress interval while the Deployment comes back.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// The first Deployment whose pod template the Service's `selector` selects.
pub(super) async fn deployment_of(
    cluster: &Cluster,
    service: &str,
    selector: &BTreeMap<String, String>,
) -> Result<Deployment, ExchangeError> {
    let deployments: Api<Deployment> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    let list = deployments
        .list(&ListParams::default())
        .await
        .map_err(ClusterError::api("list deployments"))?;
    let deployment = list
        .items
        .into_iter()
        .find(|d| {
            let labels = d
                .spec
                .as_ref()
                .and_then(|s| s.template.metadata.as_ref())
                .and_then(|m| m.labels.as_ref());
            labels.is_some_and(|l| selector.iter().all(|(k, v)| l.get(k) == Some(v)))
        })
        .ok_or_else(|| ExchangeError::NoDeployment(service.to_owned()))?;
    tracing::info!(
        "Using first matched deployment '{}'",
        deployment.metadata.name.as_deref().unwrap_or_default()
    );
    Ok(deployment)
}

pub(super) async fn exchange(
    ctx: &Context<'_>,
    deployment: Deployment,
    exposed: &[Exposed],
    recover_wait: Duration,
) -> Result<(), ExchangeError> {
    let deployments: Api<Deployment> =
        Api::namespaced(ctx.cluster.client.clone(), &ctx.cluster.namespace);
    let deploy = deployment.metadata.name.clone().unwrap_or_default();
    let spec = deployment.spec.unwrap_or_default();
    let replicas = spec.replicas.unwrap_or(1);
    let Some((pool, forwards)) = super::exchange_shadow(
        ctx,
        &deploy,
        spec.selector.match_labels.unwrap_or_default(),
        format!("app={deploy},replicas={replicas}"),
        exposed,
    )
    .await?
    else {
        return Ok(());
    };

    tracing::info!("Scaling deployment {deploy} from {replicas} to 0");
    scale(&deployments, &deploy, 0).await?;
    {
        let (deployments, deploy) = (deployments.clone(), deploy.clone());
        ctx.lifecycle.defer_within(
            format!("deployment {deploy} scaled to 0 (it had {replicas} replicas)"),
            recover_wait + crate::lifecycle::STEP_TIMEOUT,
            async move {
                tracing::info!("Scaling deployment {deploy} back to {replicas}");
                scale(&deployments, &deploy, replicas).await?;
                wait_recovered(&deployments, &deploy, replicas, recover_wait).await;
                Ok::<(), ClusterError>(())
            },
        );
    }
    super::keep_reverse_tunnels(
        &pool,
        &forwards,
        ctx.lifecycle,
        &format!("deployment '{deploy}'"),
    )
    .await;
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
