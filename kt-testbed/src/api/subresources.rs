//! Subresources: `status` (read here; written by the verbs), `scale`, and for pods `log`,
//! `exec` and `portforward` (WebSocket streams through the kubelets) and
//! `ephemeralcontainers` (the only way to add an ephemeral container).

use std::convert::Infallible;

use axum::{
    body::Body,
    extract::{FromRequestParts as _, Request, ws::WebSocketUpgrade},
    http::{HeaderValue, header},
    response::Response,
};
use futures::StreamExt as _;
use serde_json::{Value, json};

use super::{
    ApiServer, Query, Target, admission, content_type,
    errors::ApiError,
    json_response, read_json,
    resources::ResourceType,
    selector::{self, LabelSelector},
    spdy,
    store::{Part, Store},
    streams,
    verbs::apply_patch,
};

/// `GET …/status`.
pub(super) fn get_status(api: &ApiServer, t: &Target) -> Result<Response, ApiError> {
    Ok(json_response(
        200,
        &api.store.get(&t.rt, t.namespace(), t.name())?,
    ))
}

/// `GET`, `PUT` or `PATCH …/scale` of a Deployment, ReplicaSet or StatefulSet.
pub(super) async fn scale(api: &ApiServer, t: &Target, req: Request) -> Result<Response, ApiError> {
    let method = req.method().as_str().to_owned();
    let content_type = content_type(req.headers());
    let body = if method == "GET" {
        Value::Null
    } else {
        read_json(api, req).await?
    };
    scale_object(
        &api.store,
        &t.rt,
        t.namespace(),
        t.name(),
        &method,
        &content_type,
        body,
        &t.q,
    )
}

/// `GET`, `PUT` or `PATCH …/ephemeralcontainers` of a pod, as Kubernetes' pod
/// `ephemeralcontainers` strategy has it: the object read and written is the whole Pod, but
/// a write keeps only its `spec.ephemeralContainers` (`dropNonEphemeralContainerUpdates`),
/// defaulted, and is refused (422) when it removes or changes an existing one or adds an
/// invalid one ([`admission::ephemeral_container_changes`]). The kubelet then starts what
/// was added.
pub(super) async fn ephemeral_containers(
    api: &ApiServer,
    t: &Target,
    req: Request,
) -> Result<Response, ApiError> {
    let (ns, name) = (t.namespace(), t.name());
    let method = req.method().as_str().to_owned();
    if method == "GET" {
        return Ok(json_response(200, &api.store.get(&t.rt, ns, name)?));
    }
    let content_type = content_type(req.headers());
    let body = read_json(api, req).await?;
    let updated = api
        .store
        .modify(&t.rt, ns, name, Part::System, t.q.dry_run(), |old| {
            let mut written = old.clone();
            match method.as_str() {
                "PUT" => written = body.clone(),
                _ => apply_patch(&t.rt, &content_type, &mut written, &body)?,
            }
            let mut new = old.clone();
            match written["spec"].get("ephemeralContainers") {
                Some(list) if !list.is_null() => new["spec"]["ephemeralContainers"] = list.clone(),
                _ => {
                    new["spec"]
                        .as_object_mut()
                        .map(|m| m.remove("ephemeralContainers"));
                }
            }
            new["metadata"]["resourceVersion"] = written["metadata"]["resourceVersion"].clone();
            admission::default_ephemeral_containers(&mut new["spec"]);
            let causes = admission::ephemeral_container_changes(&old, &new);
            if !causes.is_empty() {
                return Err(ApiError::invalid(&t.rt, name, &causes));
            }
            Ok(new)
        })?;
    Ok(json_response(200, &updated))
}

/// `GET …/log` of a pod, followed with `?follow=true`.
pub(super) async fn log(api: &ApiServer, t: &Target) -> Result<Response, ApiError> {
    let runtime = api
        .runtime()
        .ok_or_else(|| ApiError::bad_request("no kubelet is running"))?;
    api.store.get(&t.rt, t.namespace(), t.name())?;
    let stream = runtime
        .logs(
            t.namespace(),
            t.name(),
            t.q.get("container").filter(|c| !c.is_empty()),
            t.q.flag("follow"),
        )
        .await?;
    let mut resp = Response::new(Body::from_stream(stream.map(Ok::<_, Infallible>)));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    Ok(resp)
}

/// `…/exec` and `…/portforward` of a running pod, over a WebSocket: channels (v5/v4), or
/// kubectl's SPDY tunnel for port-forward (native SPDY upgrades are not served).
pub(super) async fn stream(
    api: &std::sync::Arc<ApiServer>,
    t: &Target,
    sub: &str,
    req: Request,
) -> Result<Response, ApiError> {
    let (ns_str, name, q) = (t.namespace().to_owned(), t.name().to_owned(), &t.q);
    let pod = api.store.get(&t.rt, &ns_str, &name)?;
    if !pod["spec"]["nodeName"].is_string() {
        return Err(ApiError::bad_request(format!(
            "pod {name} does not have a host assigned"
        )));
    }
    if pod["status"]["phase"] != "Running" {
        let container = pod["spec"]["containers"][0]["name"]
            .as_str()
            .unwrap_or_default();
        return Err(ApiError::bad_request(format!(
            "container \"{container}\" in pod \"{name}\" is waiting to start: ContainerCreating"
        )));
    }
    let runtime = api
        .runtime()
        .ok_or_else(|| ApiError::bad_request("no kubelet is running"))?;
    let (mut parts, _body) = req.into_parts();
    // kubectl (client-go 1.30+) tunnels SPDY through the WebSocket; kube-rs speaks v4.
    let spdy_tunnel = sub == "portforward"
        && parts
            .headers
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|p| p.trim() == spdy::TUNNEL_PROTOCOL);
    let ws = WebSocketUpgrade::from_request_parts(&mut parts, &())
        .await
        .map_err(|e| {
            ApiError::bad_request(format!(
                "{sub} needs a WebSocket upgrade (SPDY is not supported): {e}"
            ))
        })?;
    if spdy_tunnel {
        let uid = pod["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        return Ok(spdy::port_forward(api, ws, runtime, ns_str, name, uid));
    }
    if sub == "portforward" {
        let ports: Vec<u16> = q
            .all("ports")
            .iter()
            .flat_map(|p| p.split(','))
            .filter_map(|p| p.trim().parse().ok())
            .collect();
        if ports.is_empty() {
            return Err(ApiError::bad_request("at least 1 port must be specified"));
        }
        Ok(streams::port_forward(api, ws, runtime, ns_str, name, ports))
    } else {
        let command: Vec<String> = q.all("command").iter().map(|s| s.to_string()).collect();
        if command.is_empty() {
            return Err(ApiError::bad_request("you must specify at least 1 command"));
        }
        Ok(streams::exec(
            api,
            ws,
            runtime,
            ns_str,
            name,
            command,
            q.flag("stdin"),
        ))
    }
}

fn scale_of(obj: &Value) -> Value {
    let m = &obj["metadata"];
    let selector = LabelSelector::from_object(&obj["spec"]["selector"]).unwrap_or_default();
    let selector: Vec<String> = selector
        .0
        .iter()
        .map(|r| match r {
            selector::Requirement::Eq(k, v) => format!("{k}={v}"),
            other => format!("{other:?}"),
        })
        .collect();
    json!({
        "kind": "Scale", "apiVersion": "autoscaling/v1",
        "metadata": {"name": m["name"], "namespace": m["namespace"], "uid": m["uid"],
                     "resourceVersion": m["resourceVersion"], "creationTimestamp": m["creationTimestamp"]},
        "spec": {"replicas": obj["spec"]["replicas"].as_i64().unwrap_or(0)},
        "status": {"replicas": obj["status"]["replicas"].as_i64().unwrap_or(0), "selector": selector.join(",")},
    })
}

#[expect(clippy::too_many_arguments, reason = "the parts of one scale request")]
fn scale_object(
    store: &Store,
    rt: &ResourceType,
    ns: &str,
    name: &str,
    method: &str,
    content_type: &str,
    body: Value,
    q: &Query,
) -> Result<Response, ApiError> {
    if method == "GET" {
        return Ok(json_response(200, &scale_of(&store.get(rt, ns, name)?)));
    }
    let updated = store.modify(rt, ns, name, Part::Main, q.dry_run(), |mut parent| {
        let mut scale = scale_of(&parent);
        match method {
            "PUT" => scale = body.clone(),
            "PATCH" => apply_patch(
                &ResourceType {
                    builtin: true,
                    ..rt.clone()
                },
                content_type,
                &mut scale,
                &body,
            )?,
            _ => return Err(ApiError::method_not_allowed(format!("{method} on scale"))),
        }
        let replicas = scale["spec"]["replicas"].as_i64().ok_or_else(|| {
            ApiError::invalid(
                rt,
                name,
                &[("spec.replicas".into(), "Required value".into())],
            )
        })?;
        parent["spec"]["replicas"] = json!(replicas);
        parent["metadata"]["resourceVersion"] = scale["metadata"]["resourceVersion"].clone();
        Ok(parent)
    })?;
    Ok(json_response(200, &scale_of(&updated)))
}
