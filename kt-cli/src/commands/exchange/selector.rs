//! Selector mode (ktctl v0.3.7's default): lock the Service (`kt-lock`), start a shadow pod
//! labelled `kt-role: shadow-exchange` and a random `kt-target`, have it listen on the
//! exposed target ports and send each connection back through SSH reverse tunnels to the
//! local ports, point the Service's selector at the shadow (the old one saved in
//! `kt-selector`), unlock. While the exchange lasts the Service is watched: whoever changes
//! its selector back (a GitOps tool re-applying the manifest every few minutes) has it put
//! back on the shadow, as v0.3.7 does. On exit the selector comes back and the shadow goes.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Pod, Service};
use kt_proto::compat;
use kube::{
    Api,
    api::{ListParams, Patch, PatchParams},
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
    let (to_shadow, _) = plan::selector_patches(&old, &target);
    services
        .patch(name, &PatchParams::default(), &Patch::Merge(&to_shadow))
        .await
        .map_err(ClusterError::api(format!(
            "change the selector of service '{name}'"
        )))?;
    // What the Service goes back to on exit: its selector before, or the one someone applied
    // while it was exchanged.
    let original = Arc::new(Mutex::new(old));
    {
        let (services, name, original, target) = (
            services.clone(),
            name.to_owned(),
            original.clone(),
            target.clone(),
        );
        ctx.lifecycle.defer(
            format!(
                "the selector of service {name}, still pointing at the shadow (the original is in its kt-selector annotation)"
            ),
            async move {
                let selector = original.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let (_, back) = plan::selector_patches(&selector, &target);
                match services
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&back))
                    .await
                {
                    Ok(_) => tracing::info!("Service {name} recovered"),
                    Err(kube::Error::Api(status)) if status.code == 404 => {
                        tracing::info!("Service {name} is gone, nothing to recover");
                    }
                    Err(error) => return Err(error),
                }
                Ok::<(), kube::Error>(())
            },
        );
    }
    if let Err(error) = lock::unlock(&services, name).await {
        tracing::warn!("{}", kt_proto::error_chain(&error));
    }
    ctx.lifecycle.tasks.spawn(keep_selector(
        services,
        Api::namespaced(ctx.cluster.client.clone(), &ctx.cluster.namespace),
        name.to_owned(),
        target,
        original,
        ctx.lifecycle.stop.clone(),
    ));
    super::keep_reverse_tunnels(ctx, name, &pool, &forwards, &format!("service '{name}'")).await;
    Ok(())
}

/// Watches the Service until `stop` and points its selector at the shadow `target` again
/// whenever someone changes it. What they applied (without kt's keys) becomes the selector
/// the Service gets back on exit (`original`), and its `kt-selector`.
async fn keep_selector(
    services: Api<Service>,
    pods: Api<Pod>,
    name: String,
    target: String,
    original: Arc<Mutex<BTreeMap<String, String>>>,
    stop: CancellationToken,
) {
    let wanted = plan::shadow_selector(&target);
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
        let recorded = service
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(compat::SELECTOR));
        let selector = service.spec.and_then(|s| s.selector).unwrap_or_default();
        if selector == wanted {
            continue;
        }
        // Put back by someone else: `ktctl recover` or `clean` restore the selector, drop
        // `kt-selector` and delete the shadow (a re-applied manifest keeps the annotation
        // kt added). Pointing the Service at a shadow that is going would leave it with no
        // pod at all.
        let shadow = ListParams::default().labels(&format!("{}={target}", compat::TARGET));
        if !recorded
            || pods
                .list(&shadow)
                .await
                .is_ok_and(|list| list.items.is_empty())
        {
            tracing::error!(
                "Service {name} was put back and its shadow deleted by someone else (ktctl recover or clean?): the exchange ends"
            );
            stop.cancel();
            return;
        }
        let applied: BTreeMap<String, String> = selector
            .iter()
            .filter(|(k, _)| !wanted.contains_key(*k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if !applied.is_empty() {
            *original.lock().unwrap_or_else(|e| e.into_inner()) = applied.clone();
        }
        let restore = original.lock().unwrap_or_else(|e| e.into_inner()).clone();
        tracing::warn!(
            "Service {name}'s selector was changed to {selector:?} while it is exchanged; pointing it at the shadow again (it gets {restore:?} back on exit)"
        );
        // Null whatever keys are there now, keep kt's; `kt-selector` records what to restore.
        let (to_shadow, _) = plan::selector_patches(&selector, &target);
        let mut to_shadow = to_shadow;
        to_shadow["metadata"]["annotations"][compat::SELECTOR] =
            serde_json::json!(serde_json::to_string(&restore).unwrap_or_default());
        if let Err(error) = services
            .patch(&name, &PatchParams::default(), &Patch::Merge(&to_shadow))
            .await
        {
            tracing::warn!("Failed to point service {name} at the shadow again: {error}");
        }
    }
}
