//! Selector mode (ktctl v0.3.7's default): lock the Service (`kt-lock`), start a shadow pod
//! labelled `kt-role: shadow-exchange` and a random `kt-target`, have it listen on the
//! Service's target ports and send each connection back through SSH reverse tunnels to the
//! local ports, point the Service's selector at the shadow (the old one saved in
//! `kt-selector`), unlock. On exit the selector comes back and the shadow goes.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Service;
use kt_proto::compat;
use kube::{
    Api,
    api::{Patch, PatchParams},
};

use super::{Context, ExchangeError, plan};
use crate::cluster::{ClusterError, lock};

pub(super) async fn exchange(
    ctx: &Context<'_>,
    name: &str,
    exposed: &[plan::Exposed],
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
        super::exchange_shadow(ctx, name, labels, format!("service={name}"), exposed).await?
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
            format!("the selector of service {name}, still pointing at the shadow (the original is in its kt-selector annotation)"),
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
    super::keep_reverse_tunnels(
        &pool,
        &forwards,
        ctx.lifecycle,
        &format!("service '{name}'"),
    )
    .await;
    Ok(())
}
