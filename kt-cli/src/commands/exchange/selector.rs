//! Selector mode (ktctl v0.3.7's default): lock the Service (`kt-lock`), start a shadow pod
//! labelled `kt-role: shadow-exchange` and a random `kt-target`, have it listen on the
//! exposed target ports and send each connection back through SSH reverse tunnels to the
//! local ports, point the Service's selector at the shadow (the old one saved in
//! `kt-selector`), unlock. While the exchange lasts the Service is watched: whoever changes
//! its selector back (a GitOps tool re-applying the manifest every few minutes) has it put
//! back on the shadow, as v0.3.7 does. On exit the selector comes back and the shadow goes.

use std::collections::BTreeMap;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Service;
use kt_proto::compat;
use kube::{
    Api,
    api::{Patch, PatchParams},
    runtime::{WatchStreamExt as _, watcher},
};
use tokio_util::sync::CancellationToken;

use super::{Context, ExchangeError, plan};
use crate::cluster::{ClusterError, lock};

pub(super) async fn exchange(
    ctx: &Context<'_>,
    name: &str,
    port_plan: &plan::PortPlan,
) -> Result<(), ExchangeError> {
    let services: Api<Service> =
        Api::namespaced(ctx.cluster.client.clone(), &ctx.cluster.namespace);
    lock::lock(&services, name).await?;
    {
        let (services, name) = (services.clone(), name.to_owned());
        ctx.lifecycle
            .defer(format!("kt-lock on service {name}"), async move {
                lock::unlock(&services, &name).await
            });
    }
    let target = compat::random_target(rand::random);
    let labels = BTreeMap::from([(compat::TARGET.to_owned(), target.clone())]);
    let Some((pool, forwards)) =
        super::exchange_shadow(ctx, name, labels, format!("service={name}"), port_plan).await?
    else {
        return Ok(());
    };

    let service = ctx.cluster.service(name).await?;
    let old = service.spec.and_then(|s| s.selector).unwrap_or_default();
    let (to_shadow, back) = plan::selector_patches(&old, &target);
    services
        .patch(name, &PatchParams::default(), &Patch::Merge(&to_shadow))
        .await
        .map_err(ClusterError::api(format!(
            "change the selector of service '{name}'"
        )))?;
    {
        let (services, name) = (services.clone(), name.to_owned());
        ctx.lifecycle.defer(
            format!(
                "the selector of service {name}, still pointing at the shadow (the original is in its kt-selector annotation)"
            ),
            async move {
                services
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&back))
                    .await?;
                tracing::info!("Service {name} recovered");
                Ok::<(), kube::Error>(())
            },
        );
    }
    if let Err(error) = lock::unlock(&services, name).await {
        tracing::warn!("{}", kt_proto::error_chain(&error));
    }
    ctx.lifecycle.tasks.spawn(keep_selector(
        services,
        name.to_owned(),
        plan::shadow_selector(&target),
        to_shadow,
        ctx.lifecycle.stop.clone(),
    ));
    super::keep_reverse_tunnels(ctx, name, &pool, &forwards, &format!("service '{name}'")).await;
    Ok(())
}

/// Watches the Service until `stop` and points its selector at the shadow again whenever
/// someone changes it (`to_shadow` is the patch that does it).
async fn keep_selector(
    services: Api<Service>,
    name: String,
    wanted: BTreeMap<String, String>,
    to_shadow: serde_json::Value,
    stop: CancellationToken,
) {
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut changes = std::pin::pin!(
        watcher(services.clone(), config)
            .applied_objects()
            .default_backoff()
    );
    loop {
        let service = tokio::select! {
            () = stop.cancelled() => return,
            next = changes.next() => match next {
                Some(Ok(service)) => service,
                Some(Err(error)) => {
                    tracing::debug!(%error, "watch of service {name} failed, retrying");
                    continue;
                }
                None => return,
            },
        };
        let selector = service.spec.and_then(|s| s.selector).unwrap_or_default();
        if selector == wanted {
            continue;
        }
        tracing::warn!(
            "Service {name}'s selector was changed to {selector:?} while it is exchanged; pointing it at the shadow again"
        );
        if let Err(error) = services
            .patch(&name, &PatchParams::default(), &Patch::Merge(&to_shadow))
            .await
        {
            tracing::warn!("Failed to point service {name} at the shadow again: {error}");
        }
    }
}
