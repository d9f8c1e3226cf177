//! Auto mode without the agent, as ktctl v0.3.7 does it (`../shared/reference/
//! ktctl-v0.3.7.md` §3.4), with the same names, labels, annotations and ref-counting, so the
//! Go ktctl and kt understand each other's router, stuntman and shadows:
//!
//! 1. lock the Service; 2. its ports (`port:targetPort`); 3. the shadow `<svc>-kt-mesh-<ver>`
//!    must not exist; 4. the stuntman Service `<svc>-kt-stuntman` with the original selector
//!    (created once, while the Service is still its own); 5. the shadow Service
//!    `<svc>-kt-mesh-<ver>` selecting the shadow; 6. the router pod `<svc>-kt-router`,
//!    created with `router setup` or joined (`kt-ref-count` + 1) with `router add`; 7. the
//!    Service's selector pointed at the router (the original kept in `kt-selector`); 8. the
//!    shadow pod with reverse tunnels; 9. unlock, and the banner once the Service's
//!    endpoints are the router and the shadow Service's the shadow.
//!
//! On exit: the shadow pod and Service go; the router is released — the last user deletes
//! it and the stuntman and gives the Service its selector back, others count themselves
//! out and `router remove` their version.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use k8s_openapi::{
    api::{
        core::v1::{Container, ContainerPort, Pod, PodSpec, Service, ServicePort, ServiceSpec},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use kt_proto::{compat, session::HeaderMatch};
use kube::{
    Api,
    api::{AttachParams, DeleteParams, Patch, PatchParams, PostParams},
    core::ObjectMeta,
};
use tokio::io::AsyncReadExt as _;

use super::{MeshError, plan};
use crate::{
    cluster::{ClusterError, clock::ClusterClock, heartbeat, lock},
    commands::exchange::{Context, Subject, plan::PortPlan, plan::selector_patches_to},
    lifecycle::Lifecycle,
    shadow::{ShadowSpec, ref_count, set_ref_count, wait_running},
    ssh_client::RemoteForward,
};

/// A v0.3.7 router command that failed in the router pod.
#[derive(Debug, thiserror::Error)]
#[error("'{command}' failed in router pod {pod}: {message}")]
pub struct RouterCommandError {
    pod: String,
    command: String,
    message: String,
}

fn stuntman_name(service: &str) -> String {
    format!("{service}-kt-stuntman")
}

fn router_name(service: &str) -> String {
    format!("{service}-kt-router")
}

/// The Service's TCP ports with the number each targets (`port:targetPort`, what `router
/// setup` takes): the exposed ones as the port plan resolved them, the others by their
/// number (a named one that is not exposed is left out: the router cannot listen for it).
fn port_pairs(subject: &Subject, port_plan: &PortPlan) -> Vec<(u16, u16)> {
    let mut pairs: BTreeMap<u16, u16> = port_plan
        .exposed
        .iter()
        .flat_map(|e| e.service_ports.iter().map(|p| (p.port, e.target)))
        .collect();
    for port in crate::commands::exchange::plan::ServicePort::of(&subject.service) {
        if !port.is_tcp() || pairs.contains_key(&port.port) {
            continue;
        }
        match port.target {
            None => {
                pairs.insert(port.port, port.port);
            }
            Some(IntOrString::Int(n)) => {
                if let Ok(n) = u16::try_from(n) {
                    pairs.insert(port.port, n);
                }
            }
            Some(IntOrString::String(name)) => tracing::warn!(
                "Port {} of service {} targets the name '{name}' and is not exposed: the router does not serve it",
                port.port,
                subject.name
            ),
        }
    }
    pairs.into_iter().collect()
}

/// The ports of the stuntman and shadow Services: each Service port, named `kt-<port>`, to
/// its target port.
fn service_ports(pairs: &[(u16, u16)]) -> Vec<ServicePort> {
    pairs
        .iter()
        .map(|(port, target)| ServicePort {
            name: Some(format!("kt-{port}")),
            port: i32::from(*port),
            target_port: Some(IntOrString::Int(i32::from(*target))),
            protocol: Some("TCP".into()),
            ..ServicePort::default()
        })
        .collect()
}

fn kt_service(
    name: &str,
    namespace: &str,
    user: &str,
    clock: &ClusterClock,
    ports: Vec<ServicePort>,
    selector: BTreeMap<String, String>,
) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([(
                compat::CONTROL_BY.to_owned(),
                compat::CONTROL_BY_KT.to_owned(),
            )])),
            annotations: Some(BTreeMap::from([
                (compat::USER.to_owned(), user.to_owned()),
                heartbeat::annotation(clock),
            ])),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            selector: Some(selector),
            ports: Some(ports),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// Runs `command` in the router pod's container; its stderr on failure.
async fn router_command(pods: &Api<Pod>, pod: &str, command: Vec<String>) -> Result<(), MeshError> {
    let text = command.join(" ");
    let failed = |message: String| {
        MeshError::Router(RouterCommandError {
            pod: pod.to_owned(),
            command: text.clone(),
            message,
        })
    };
    let params = AttachParams::default()
        .container(compat::CONTAINER)
        .stdout(false)
        .stderr(true);
    let mut attached = pods
        .exec(pod, command.clone(), &params)
        .await
        .map_err(|e| failed(e.to_string()))?;
    let mut stderr = String::new();
    if let Some(mut reader) = attached.stderr() {
        let _ = reader.read_to_string(&mut stderr).await;
    }
    let status = match attached.take_status() {
        Some(status) => status.await,
        None => None,
    };
    if status.as_ref().and_then(|s| s.status.as_deref()) == Some("Success") {
        tracing::info!("Router pod configuration done ({text})");
        Ok(())
    } else {
        let message = status.and_then(|s| s.message).unwrap_or_default();
        Err(failed(
            format!("{} {message}", stderr.trim()).trim().to_owned(),
        ))
    }
}

/// The router's container ports: each target port under the name the Service's `targetPort`
/// gives it, so that a named target resolves to the router (v0.3.7 names them all
/// `router-<port>`, which leaves a Service with named targets without endpoints), else
/// `router-<port>`.
fn router_ports(service: &Service, pairs: &[(u16, u16)]) -> Vec<ContainerPort> {
    let names: BTreeMap<u16, String> = service
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|p| match &p.target_port {
            Some(IntOrString::String(name)) => {
                let port = u16::try_from(p.port).ok()?;
                let target = pairs.iter().find(|(s, _)| *s == port)?.1;
                Some((target, name.clone()))
            }
            _ => None,
        })
        .collect();
    let mut targets: Vec<u16> = pairs.iter().map(|(_, t)| *t).collect();
    targets.sort_unstable();
    targets.dedup();
    targets
        .into_iter()
        .map(|target| ContainerPort {
            name: Some(
                names
                    .get(&target)
                    .cloned()
                    .unwrap_or_else(|| format!("router-{target}")),
            ),
            container_port: i32::from(target),
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        })
        .collect()
}

/// The router pod `name` of image `image`: `kt-role=router`, `kt-target`, ref-count 1,
/// `kt-config: service=<svc>`, the `ports`.
fn router_pod(
    ctx: &Context<'_>,
    name: &str,
    service: &str,
    target: &str,
    image: &str,
    ports: Vec<ContainerPort>,
) -> Pod {
    let mut labels = ctx.settings.shadow.labels.clone();
    labels.extend([
        (
            compat::CONTROL_BY.to_owned(),
            compat::CONTROL_BY_KT.to_owned(),
        ),
        (compat::ROLE.to_owned(), compat::ROLE_ROUTER.to_owned()),
        (compat::TARGET.to_owned(), target.to_owned()),
    ]);
    let mut annotations = ctx.settings.shadow.annotations.clone();
    annotations.extend([
        (compat::REF_COUNT.to_owned(), "1".to_owned()),
        (compat::CONFIG.to_owned(), format!("service={service}")),
        (compat::USER.to_owned(), ctx.settings.identity.user.clone()),
        heartbeat::annotation(&ctx.cluster.clock),
    ]);
    let mut spec = PodSpec {
        containers: vec![Container {
            name: compat::CONTAINER.into(),
            image: Some(image.to_owned()),
            ports: Some(ports),
            ..Container::default()
        }],
        ..PodSpec::default()
    };
    // The pull policy, quota, service account, pull secret and node selector, as for shadows.
    ctx.settings.shadow.apply_to(&mut spec);
    Pod {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(ctx.cluster.namespace.clone()),
            labels: Some(labels),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        },
        spec: Some(spec),
        status: None,
    }
}

/// Steps 1–9 (see the module doc), then the reverse tunnels until the run stops.
pub(super) async fn mesh(
    ctx: &Context<'_>,
    subject: &Subject,
    port_plan: &PortPlan,
    header: &HeaderMatch,
    router_image: &str,
) -> Result<(), MeshError> {
    let services: Api<Service> =
        Api::namespaced(ctx.cluster.client.clone(), &ctx.cluster.namespace);
    let name = subject.name.as_str();

    // 1. The lock, until the router and the Service are set up (taken off then, also when
    // a step failed; never at exit, when another developer may hold it).
    lock::lock(&services, name).await?;
    let set_up = set_up(ctx, subject, port_plan, header, router_image).await;
    lock::unlock(&services, name).await?;
    let Some((pool, forwards, router, shadow)) = set_up? else {
        return Ok(());
    };
    // The router and the Services carry heartbeats as v0.3.7 writes them, so that a `clean`
    // (kt's or the Go ktctl's) does not take them for leftovers while they are in use.
    ctx.lifecycle.tasks.spawn(heartbeat::keep(
        ctx.cluster.client.clone(),
        ctx.cluster.namespace.clone(),
        ctx.cluster.clock,
        vec![
            (heartbeat::Kind::Pod, router_name(name)),
            (heartbeat::Kind::Service, stuntman_name(name)),
            (heartbeat::Kind::Service, shadow.clone()),
        ],
        ctx.lifecycle.done.clone(),
    ));
    // 9.
    if until_routed(ctx, name, &router, &shadow, &pool.target().pod).await {
        ctx.announce_banner(&plan::banner(header));
        pool.keep_remote_forwards(&forwards, &ctx.lifecycle.stop, None)
            .await;
    }
    pool.close().await;
    Ok(())
}

/// What [`set_up`] leaves running: the shadow's SSH connection and its reverse tunnels, the
/// router pod's and the shadow's names.
type SetUp = (
    Arc<crate::ssh_client::SshPool>,
    Vec<RemoteForward>,
    String,
    String,
);

/// Steps 2–8, under the lock; `None` when the run was stopped meanwhile.
async fn set_up(
    ctx: &Context<'_>,
    subject: &Subject,
    port_plan: &PortPlan,
    header: &HeaderMatch,
    router_image: &str,
) -> Result<Option<SetUp>, MeshError> {
    let namespace = ctx.cluster.namespace.clone();
    let client = ctx.cluster.client.clone();
    let services: Api<Service> = Api::namespaced(client.clone(), &namespace);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let name = subject.name.as_str();
    let user = ctx.settings.identity.user.clone();
    let mark = format!("{}:{}", header.name, header.value);
    // 2.
    let pairs = port_pairs(subject, port_plan);
    // 3. Checked before anything was created (`manual::check_free`).
    // 4. The stuntman: the original pods under a Service of their own.
    let stuntman = stuntman_name(name);
    match services
        .get_opt(&stuntman)
        .await
        .map_err(ClusterError::api(format!("get service {stuntman}")))?
    {
        Some(existing) => {
            let ours = existing
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(compat::CONTROL_BY))
                .is_some_and(|v| v == compat::CONTROL_BY_KT);
            if !ours {
                return Err(MeshError::Foreign(stuntman));
            }
        }
        None => {
            let sane = !subject.selector.contains_key(compat::ROLE)
                && !subject
                    .service
                    .metadata
                    .annotations
                    .as_ref()
                    .is_some_and(|a| a.contains_key(compat::SELECTOR));
            if !sane {
                return Err(MeshError::NotSane(name.to_owned()));
            }
            services
                .create(
                    &PostParams::default(),
                    &kt_service(
                        &stuntman,
                        &namespace,
                        &user,
                        &ctx.cluster.clock,
                        service_ports(&pairs),
                        subject.selector.clone(),
                    ),
                )
                .await
                .map_err(ClusterError::api(format!("create service {stuntman}")))?;
            tracing::info!("Service {stuntman} created");
        }
    }
    // 5. The shadow Service.
    let shadow = format!("{name}-kt-mesh-{}", header.value);
    let shadow_target = compat::random_target(rand::random);
    let shadow_selector = BTreeMap::from([
        (compat::ROLE.to_owned(), compat::ROLE_SHADOW_MESH.to_owned()),
        (compat::TARGET.to_owned(), shadow_target.clone()),
    ]);
    services
        .create(
            &PostParams::default(),
            &kt_service(
                &shadow,
                &namespace,
                &user,
                &ctx.cluster.clock,
                service_ports(&pairs),
                shadow_selector.clone(),
            ),
        )
        .await
        .map_err(ClusterError::api(format!("create service {shadow}")))?;
    {
        let (services, shadow) = (services.clone(), shadow.clone());
        ctx.lifecycle
            .defer(format!("service {shadow}"), async move {
                services.delete(&shadow, &DeleteParams::default()).await?;
                tracing::info!("Cleaning service {shadow}");
                Ok::<(), kube::Error>(())
            });
    }
    // 6. The router: created and set up, or joined.
    let router = router_name(name);
    let router_target = match pods
        .get_opt(&router)
        .await
        .map_err(ClusterError::api(format!("get pod {router}")))?
    {
        None => {
            let target = compat::random_target(rand::random);
            pods.create(
                &PostParams::default(),
                &router_pod(
                    ctx,
                    &router,
                    name,
                    &target,
                    router_image,
                    router_ports(&subject.service, &pairs),
                ),
            )
            .await
            .map_err(ClusterError::api(format!("create pod {router}")))?;
            tracing::info!("Router pod {router} created");
            defer_release(
                ctx.lifecycle,
                services.clone(),
                pods.clone(),
                name.to_owned(),
                mark.clone(),
            );
            wait_running(&pods, &router, ctx.settings.shadow.creation_timeout)
                .await
                .map_err(|e| MeshError::Shadow(e.into()))?;
            let ports: Vec<String> = pairs.iter().map(|(p, t)| format!("{p}:{t}")).collect();
            router_command(
                &pods,
                &router,
                vec![
                    "/usr/sbin/router".into(),
                    "setup".into(),
                    name.to_owned(),
                    ports.join(","),
                    mark.clone(),
                ],
            )
            .await?;
            target
        }
        Some(existing) => {
            let target = existing
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(compat::TARGET))
                .cloned()
                .unwrap_or_default();
            let count = ref_count(&existing);
            set_ref_count(&pods, &existing, count + 1)
                .await
                .map_err(ClusterError::api(format!(
                    "count in on router pod {router}"
                )))?;
            tracing::info!("Router pod {router} has {} refs now", count + 1);
            defer_release(
                ctx.lifecycle,
                services.clone(),
                pods.clone(),
                name.to_owned(),
                mark.clone(),
            );
            router_command(
                &pods,
                &router,
                vec!["/usr/sbin/router".into(), "add".into(), mark.clone()],
            )
            .await?;
            target
        }
    };
    // 7. The Service selects the router (once: a second developer finds it so).
    let routed =
        subject.selector.get(compat::ROLE).map(String::as_str) == Some(compat::ROLE_ROUTER);
    if !routed {
        let (to_router, _) =
            selector_patches_to(&subject.selector, compat::ROLE_ROUTER, &router_target);
        services
            .patch(name, &PatchParams::default(), &Patch::Merge(&to_router))
            .await
            .map_err(ClusterError::api(format!(
                "change the selector of service '{name}'"
            )))?;
        tracing::info!("Service {name} now selects router pod {router}");
    }
    // 8. The shadow pod, with the reverse tunnels.
    let mut spec = ShadowSpec::new(
        &ctx.settings.shadow,
        shadow.clone(),
        namespace.clone(),
        compat::ROLE_SHADOW_MESH,
        &user,
    );
    spec.labels.extend(shadow_selector);
    spec.annotations
        .insert(compat::CONFIG.into(), format!("service={shadow}"));
    spec.ports = port_plan
        .exposed
        .iter()
        .flat_map(|e| e.shadow_ports())
        .collect();
    let Some(pool) =
        crate::commands::shadow_tunnel(ctx.settings, ctx.cluster, ctx.lifecycle, &spec, 1).await?
    else {
        return Ok(None);
    };
    let forwards = crate::commands::exchange::reverse_forwards(port_plan);
    pool.open_remote_forwards(&forwards).await?;
    Ok(Some((pool, forwards, router, shadow)))
}

/// The release of the router on exit: the last user deletes it and the stuntman and gives
/// the Service its selector back (the one the router's `kt-config` names); others count
/// themselves out and remove their version. Without the router, the Service gets its
/// selector back and the stuntman goes.
fn defer_release(
    lifecycle: &Arc<Lifecycle>,
    services: Api<Service>,
    pods: Api<Pod>,
    service: String,
    mark: String,
) {
    lifecycle.defer_within(
        format!("router pod {} (and the selector of service {service})", router_name(&service)),
        Duration::from_secs(20),
        async move {
            let router = router_name(&service);
            let stuntman = stuntman_name(&service);
            let restore = async {
                let current = services.get(&service).await?;
                let saved = current
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(compat::SELECTOR))
                    .and_then(|s| serde_json::from_str::<BTreeMap<String, String>>(s).ok());
                if let Some(original) = saved {
                    let selector = current.spec.and_then(|s| s.selector).unwrap_or_default();
                    let mut back: serde_json::Map<String, serde_json::Value> =
                        selector.keys().map(|k| (k.clone(), serde_json::Value::Null)).collect();
                    back.extend(original.iter().map(|(k, v)| (k.clone(), serde_json::json!(v))));
                    let patch = serde_json::json!({"metadata": {"annotations": {compat::SELECTOR: null}}, "spec": {"selector": back}});
                    services.patch(&service, &PatchParams::default(), &Patch::Merge(&patch)).await?;
                    tracing::info!("Service {service} recovered");
                }
                match services.delete(&stuntman, &DeleteParams::default()).await {
                    Ok(_) => tracing::info!("Cleaning service {stuntman}"),
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(e) => return Err(e),
                }
                Ok::<(), kube::Error>(())
            };
            let Some(pod) = pods.get_opt(&router).await? else {
                return restore.await;
            };
            let count = ref_count(&pod);
            if count <= 1 {
                restore.await?;
                pods.delete(&router, &DeleteParams::default()).await?;
                tracing::info!("Cleaning router pod {router}");
                return Ok(());
            }
            set_ref_count(&pods, &pod, count - 1).await?;
            tracing::info!("Router pod {router} has {count} refs, decrease to {}", count - 1);
            if let Err(error) = router_command(&pods, &router, vec!["/usr/sbin/router".into(), "remove".into(), mark]).await {
                tracing::warn!("{}", kt_proto::error_chain(&error));
            }
            Ok(())
        },
    );
}

/// Waits until the Service's ready endpoints are the router pod and the shadow Service's
/// the shadow pod `shadow_pod` (its name differs from the Service's with
/// `--useShadowDeployment`): requests then reach the router, and the router the shadow.
/// `false` when the run stops first; says what is missing after 30 s and goes on waiting.
async fn until_routed(
    ctx: &Context<'_>,
    service: &str,
    router: &str,
    shadow: &str,
    shadow_pod: &str,
) -> bool {
    let pods: Api<Pod> = Api::namespaced(ctx.cluster.client.clone(), &ctx.cluster.namespace);
    let slices: Api<EndpointSlice> =
        Api::namespaced(ctx.cluster.client.clone(), &ctx.cluster.namespace);
    let ready = async |of: &str| -> Vec<String> {
        crate::commands::exchange::ready_endpoints(&slices, of)
            .await
            .unwrap_or_default()
    };
    let ip = async |pod: &str| -> Option<String> {
        pods.get_opt(pod).await.ok().flatten()?.status?.pod_ip
    };
    let started = tokio::time::Instant::now();
    let mut said = false;
    loop {
        let (router_ip, shadow_ip) = (ip(router).await, ip(shadow_pod).await);
        let (service_ready, shadow_ready) = (ready(service).await, ready(shadow).await);
        let done = router_ip.is_some_and(|r| service_ready == [r])
            && shadow_ip.is_some_and(|s| shadow_ready == [s]);
        if done {
            return true;
        }
        if !said && started.elapsed() >= Duration::from_secs(30) {
            said = true;
            tracing::warn!(
                "Service {service}'s endpoints are {service_ready:?} and {shadow}'s {shadow_ready:?} after 30 s, not the router and the shadow; waiting"
            );
        }
        tokio::select! {
            () = ctx.lifecycle.stop.cancelled() => return false,
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}
