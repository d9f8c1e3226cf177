//! Manual mode (ktctl v0.3.7 §3.4): no lock, the Service untouched; a shadow
//! `<svc>-kt-mesh-<ver>` labelled with the Service's selector, `kt-role=shadow-mesh` and
//! `<key>=<ver>` joins the Service's pods and sends what reaches it back through SSH
//! reverse tunnels. Traffic load-balances over the pods and the shadow until a service
//! mesh's rule (Istio) routes by the label.

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::api::{apps::v1::Deployment, core::v1::Pod, discovery::v1::EndpointSlice};
use kt_proto::{compat, session::HeaderMatch};
use kube::Api;

use super::{MeshError, plan};
use crate::{
    cluster::{Cluster, ClusterError},
    commands::exchange::{Context, Subject, plan::PortPlan},
    shadow::ShadowSpec,
};

/// The shadow's name: `<svc>-kt-mesh-<ver>` (v0.3.7).
fn shadow_name(service: &str, header: &HeaderMatch) -> String {
    format!("{service}-kt-mesh-{}", header.value)
}

/// Refuses a version whose shadow already exists (v0.3.7's check, with its holder).
pub(super) async fn check_free(
    cluster: &Cluster,
    service: &str,
    header: &HeaderMatch,
) -> Result<(), MeshError> {
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    let deployments: Api<Deployment> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    let name = shadow_name(service, header);
    // A shadow pod of that name, or a shadow Deployment (`--useShadowDeployment`).
    let existing = match pods
        .get_opt(&name)
        .await
        .map_err(ClusterError::api(format!("get pod {name}")))?
    {
        Some(pod) => Some(pod.metadata),
        None => deployments
            .get_opt(&name)
            .await
            .map_err(ClusterError::api(format!("get deployment {name}")))?
            .map(|d| d.metadata),
    };
    match existing {
        None => Ok(()),
        Some(metadata) => Err(plan::MeshConflict::SameVersion {
            service: service.to_owned(),
            holder: metadata
                .annotations
                .and_then(|a| a.get(compat::USER).cloned())
                .unwrap_or_else(|| "unknown user".into()),
            value: header.value.clone(),
        }
        .into()),
    }
}

/// The shadow with the Service's selector and the version label, its reverse tunnels, the
/// banner once it is a ready endpoint of the Service; until the run stops.
pub(super) async fn mesh(
    ctx: &Context<'_>,
    subject: &Subject,
    port_plan: &PortPlan,
    header: &HeaderMatch,
) -> Result<(), MeshError> {
    let name = shadow_name(&subject.name, header);
    let mut spec = ShadowSpec::new(
        &ctx.settings.shadow,
        name.clone(),
        ctx.cluster.namespace.clone(),
        compat::ROLE_SHADOW_MESH,
        &ctx.settings.identity.user,
    );
    let mut labels: BTreeMap<String, String> = subject.selector.clone();
    labels.insert(header.name.clone(), header.value.clone());
    spec.labels.extend(labels);
    spec.annotations
        .insert(compat::CONFIG.into(), format!("service={}", subject.name));
    spec.ports = port_plan
        .exposed
        .iter()
        .flat_map(|e| e.shadow_ports())
        .collect();
    let Some(pool) =
        crate::commands::shadow_tunnel(ctx.settings, ctx.cluster, ctx.lifecycle, &spec, 1).await?
    else {
        return Ok(());
    };
    let forwards = crate::commands::exchange::reverse_forwards(port_plan);
    pool.open_remote_forwards(&forwards).await?;
    if until_endpoint(ctx, &subject.name, &pool.target().pod).await {
        ctx.announce_banner_of_width(&plan::manual_banner(header), 57);
        pool.keep_remote_forwards(&forwards, &ctx.lifecycle.stop, None)
            .await;
    }
    pool.close().await;
    Ok(())
}

/// After how long a shadow that is not an endpoint yet is reported (waiting goes on).
const ENDPOINT_WITHIN: Duration = Duration::from_secs(30);

/// Waits until the shadow `shadow` is a ready endpoint of `service` (it serves a share of
/// the Service's traffic then); `false` when the run stops first.
async fn until_endpoint(ctx: &Context<'_>, service: &str, shadow: &str) -> bool {
    let pods: Api<Pod> = Api::namespaced(ctx.cluster.client.clone(), &ctx.cluster.namespace);
    let slices: Api<EndpointSlice> =
        Api::namespaced(ctx.cluster.client.clone(), &ctx.cluster.namespace);
    let started = tokio::time::Instant::now();
    let mut said = false;
    loop {
        let ip = pods
            .get_opt(shadow)
            .await
            .ok()
            .flatten()
            .and_then(|p| p.status?.pod_ip);
        let ready = crate::commands::exchange::ready_endpoints(&slices, service)
            .await
            .unwrap_or_default();
        if ip.as_ref().is_some_and(|ip| ready.contains(ip)) {
            return true;
        }
        if !said && started.elapsed() >= ENDPOINT_WITHIN {
            said = true;
            tracing::warn!(
                "Shadow {shadow} is not a ready endpoint of service {service} after {} s; waiting",
                ENDPOINT_WITHIN.as_secs()
            );
        }
        tokio::select! {
            () = ctx.lifecycle.stop.cancelled() => return false,
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}
