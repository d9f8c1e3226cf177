//! Scale mode (ktctl v0.3.7): a shadow carrying the Service's labels takes its traffic while
//! every Deployment the Service selects is scaled to zero; on exit all are scaled back, each
//! to its own count, and waited for together (up to `--recoverWaitTime`) before the shadow
//! goes. While the exchange lasts, a Deployment scaled up again by someone else (a GitOps tool
//! re-applying its manifest) is scaled back to zero.

use std::{collections::BTreeMap, time::Duration};

use futures::StreamExt as _;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use kt_proto::compat;
use kube::{
    Api, ResourceExt as _,
    api::{ListParams, Patch, PatchParams},
    runtime::{WatchStreamExt as _, wait::await_condition, watcher},
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::{Context, ExchangeError, Subject, plan::PortPlan};
use crate::{
    cluster::{Cluster, ClusterError},
    progress::Progress,
};

/// Every Deployment whose pod template the Service selects (a canary next to the main one,
/// say): all of them are scaled to zero, or the Service would keep sending part of its
/// traffic to them. Refused when the Service also selects pods no such Deployment owns (a
/// StatefulSet's, bare pods): scaling cannot stop those.
pub(super) async fn deployments_of(
    cluster: &Cluster,
    subject: &Subject,
) -> Result<Vec<Deployment>, ExchangeError> {
    let service = &subject.name;
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
            labels.is_some_and(|l| subject.selector.iter().all(|(k, v)| l.get(k) == Some(v)))
        })
        .collect();
    if selected.is_empty() {
        return Err(ExchangeError::NoDeployment(service.clone()));
    }
    let names: Vec<String> = selected.iter().map(|d| d.name_any()).collect();
    let replica_sets: Api<ReplicaSet> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    let owner_of_set: BTreeMap<String, String> = replica_sets
        .list(&ListParams::default())
        .await
        .map_err(ClusterError::api("list replicasets"))?
        .items
        .into_iter()
        .filter_map(|rs| {
            let owner = rs
                .owner_references()
                .iter()
                .find(|o| o.kind == "Deployment")?
                .name
                .clone();
            Some((rs.name_any(), owner))
        })
        .collect();
    let foreign: Vec<String> = subject
        .pods
        .iter()
        .filter(|p| !p.labels().contains_key(compat::ROLE))
        .filter_map(|p| {
            let owner = p
                .owner_references()
                .iter()
                .find(|o| o.controller == Some(true));
            let from_selected = owner.is_some_and(|o| {
                o.kind == "ReplicaSet"
                    && owner_of_set.get(&o.name).is_some_and(|d| names.contains(d))
            });
            (!from_selected).then(|| match owner {
                Some(o) => format!("pod {} ({} {})", p.name_any(), o.kind, o.name),
                None => format!("pod {} (no owner)", p.name_any()),
            })
        })
        .collect();
    if !foreign.is_empty() {
        return Err(ExchangeError::NotFromDeployments {
            service: service.clone(),
            pods: foreign.join(", "),
        });
    }
    tracing::info!("Using deployment {}", names.join(", "));
    Ok(selected)
}

/// The shadow carries the Service's selector, so that the Service sends it every
/// connection; `kt-config` names the first Deployment as v0.3.7 does (`app=<name>,
/// replicas=<n>`, what the Go ktctl's `recover` reads) and all of them under
/// `deployments=<name>:<n>;…`, which v0.3.7 ignores.
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
                d.name_any(),
                d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1),
            )
        })
        .collect();
    let (first, first_replicas) = scaled[0].clone();
    let all: Vec<String> = scaled.iter().map(|(d, n)| format!("{d}:{n}")).collect();
    let Some((pool, forwards)) = super::exchange_shadow(
        ctx,
        &first,
        selector.clone(),
        format!(
            "app={first},replicas={first_replicas},deployments={}",
            all.join(";")
        ),
        plan,
    )
    .await?
    else {
        return Ok(());
    };

    {
        // One step for all: each is scaled back, then all are waited for together.
        let (api, scaled) = (api.clone(), scaled.clone());
        let names: Vec<String> = scaled
            .iter()
            .map(|(d, n)| format!("{d} (to {n})"))
            .collect();
        ctx.lifecycle.defer_within(
            format!("deployment {} scaled to 0", names.join(", ")),
            recover_wait + crate::lifecycle::STEP_TIMEOUT,
            async move {
                for (deploy, replicas) in &scaled {
                    tracing::info!("Scaling deployment {deploy} back to {replicas}");
                    scale(&api, deploy, *replicas).await?;
                }
                futures::future::join_all(scaled.iter().map(|(deploy, replicas)| {
                    wait_recovered(&api, deploy, *replicas, recover_wait)
                }))
                .await;
                Ok::<(), ClusterError>(())
            },
        );
    }
    for (deploy, replicas) in &scaled {
        tracing::info!("Scaling deployment {deploy} from {replicas} to 0");
        scale(&api, deploy, 0).await?;
    }
    ctx.lifecycle.tasks.spawn(keep_scaled_down(
        api,
        scaled.iter().map(|(d, _)| d.clone()).collect(),
        ctx.lifecycle.stop.clone(),
    ));
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

/// Watches the Deployments until `stop` and scales any of `names` that someone scaled up
/// again back to zero, saying so.
async fn keep_scaled_down(api: Api<Deployment>, names: Vec<String>, stop: CancellationToken) {
    let mut changes = std::pin::pin!(
        watcher(api.clone(), watcher::Config::default())
            .applied_objects()
            .default_backoff()
    );
    loop {
        let deployment = tokio::select! {
            () = stop.cancelled() => return,
            next = changes.next() => match next {
                Some(Ok(deployment)) => deployment,
                Some(Err(error)) => {
                    tracing::debug!(%error, "watch of deployments failed, retrying");
                    continue;
                }
                None => return,
            },
        };
        let name = deployment.name_any();
        let replicas = deployment.spec.and_then(|s| s.replicas).unwrap_or(1);
        if !names.contains(&name) || replicas == 0 {
            continue;
        }
        tracing::warn!(
            "Deployment {name} was scaled to {replicas} while it is exchanged; scaling it to 0 again"
        );
        if let Err(error) = scale(&api, &name, 0).await {
            tracing::warn!("{}", kt_proto::error_chain(&error));
        }
    }
}

/// Waits until `replicas` pods of the Deployment are ready or `wait` passes, saying what it
/// waits for as it goes ([`Progress`]); returns as soon as they are.
async fn wait_recovered(deployments: &Api<Deployment>, name: &str, replicas: i32, wait: Duration) {
    let ready = |d: Option<&Deployment>| {
        d.and_then(|d| d.status.as_ref()?.ready_replicas)
            .unwrap_or(0)
            >= replicas
    };
    let recovered = await_condition(deployments.clone(), name, ready);
    let mut recovered = std::pin::pin!(tokio::time::timeout(wait, recovered));
    let mut progress = Progress::start(format!("deployment {name} to recover"));
    loop {
        tokio::select! {
            done = &mut recovered => {
                drop(progress);
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
            () = progress.tick() => progress.show(&format!("{replicas} ready pods wanted")),
        }
    }
}
