//! The I/O of [`super::trust`]: this agent's own record of the sessions it holds (written
//! before their status, and whenever that set changes), and the Events recorded on sessions
//! ([`super::events`]: a status no agent vouches for, and each session's transitions).

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::{
    api::core::v1::{ConfigMap, Event, EventSource, ObjectReference},
    apimachinery::pkg::apis::meta::v1::Time,
};
use kt_proto::agent::NAMESPACE;
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::json;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::{
    events::SessionEvent,
    trust::{
        HeldSession, RECORD_LABEL, RECORD_NODE_KEY, RECORD_SESSIONS_KEY, RECORD_STARTED_KEY,
        record_name,
    },
};

/// How long one record or Event write may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(3);

/// The field manager of the record's server-side apply.
const FIELD_MANAGER: &str = "kt-node-agent";

/// A record write that failed or took too long.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("the API server did not answer within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Kube(#[from] kube::Error),
}

/// This agent's record: the sessions it holds, by (namespace, name).
pub struct Publisher {
    client: kube::Client,
    node: String,
    /// When this agent started: a status renewed before is an earlier agent's.
    started: chrono::DateTime<chrono::Utc>,
    held: Mutex<Held>,
}

#[derive(Default)]
struct Held {
    sessions: BTreeMap<(String, String), HeldSession>,
    /// The last write failed: the next change writes even when the set did not change.
    stale: bool,
}

impl Publisher {
    pub fn new(client: kube::Client, node: String) -> Self {
        Self {
            client,
            node,
            started: chrono::Utc::now(),
            held: Mutex::new(Held {
                stale: true,
                ..Held::default()
            }),
        }
    }

    /// Writes the record (at start: this agent holds nothing yet, whatever an earlier
    /// agent on this node listed).
    pub async fn publish(&self) -> Result<(), PublishError> {
        let mut held = self.held.lock().await;
        self.write(&mut held).await
    }

    /// Records that this agent holds `session` (or, for `None`, no longer holds the session
    /// `namespace/name`), and writes the record when that changed; `Ok` once the record
    /// shows it.
    pub async fn set(
        &self,
        namespace: &str,
        name: &str,
        session: Option<HeldSession>,
    ) -> Result<(), PublishError> {
        let mut held = self.held.lock().await;
        let key = (namespace.to_owned(), name.to_owned());
        let changed = match session {
            Some(s) => held.sessions.insert(key, s.clone()) != Some(s),
            None => held.sessions.remove(&key).is_some(),
        };
        if changed || held.stale {
            self.write(&mut held).await
        } else {
            Ok(())
        }
    }

    /// Records that this agent no longer holds `namespace/name` with `listeners` and
    /// `udp_listeners` (a newer connection of the same session, with other listeners,
    /// keeps its entry: both lists are compared, as a UDP-only session has no TCP
    /// listener to tell two connections apart), and writes the record when that changed.
    pub async fn release(
        &self,
        namespace: &str,
        name: &str,
        listeners: &[kt_proto::session::Listener],
        udp_listeners: &[kt_proto::session::Listener],
    ) -> Result<(), PublishError> {
        let mut held = self.held.lock().await;
        let key = (namespace.to_owned(), name.to_owned());
        let ours = held
            .sessions
            .get(&key)
            .is_some_and(|s| s.listeners == listeners && s.udp_listeners == udp_listeners);
        if ours {
            held.sessions.remove(&key);
        }
        if ours || held.stale {
            self.write(&mut held).await
        } else {
            Ok(())
        }
    }

    async fn write(&self, held: &mut Held) -> Result<(), PublishError> {
        let sessions: Vec<&HeldSession> = held.sessions.values().collect();
        let name = record_name(&self.node);
        let record = json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": NAMESPACE,
                         "labels": {RECORD_LABEL: self.node, "app.kubernetes.io/part-of": "kt"}},
            "data": {
                RECORD_NODE_KEY: self.node,
                RECORD_STARTED_KEY: self.started.to_rfc3339(),
                RECORD_SESSIONS_KEY: serde_json::to_string(&sessions).unwrap_or_default(),
            }
        });
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), NAMESPACE);
        let (params, patch) = (
            PatchParams::apply(FIELD_MANAGER).force(),
            Patch::Apply(&record),
        );
        let write = api.patch(&name, &params, &patch);
        let result = match tokio::time::timeout(WRITE_TIMEOUT, write).await {
            Ok(result) => result.map(drop).map_err(PublishError::from),
            Err(_) => Err(PublishError::Timeout(WRITE_TIMEOUT)),
        };
        held.stale = result.is_err();
        if result.is_ok() {
            tracing::debug!(held = held.sessions.len(), "agent record written");
        }
        result
    }
}

/// Records each [`SessionEvent`] on its session (the senders send each transition once). An
/// Event every agent records alike ([`SessionEvent::dedupe`]) that another agent created
/// first is not an error.
pub async fn report(
    client: kube::Client,
    node: String,
    mut events: tokio::sync::mpsc::UnboundedReceiver<SessionEvent>,
    shutdown: CancellationToken,
) -> Result<(), std::convert::Infallible> {
    loop {
        let wanted = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            e = events.recv() => match e {
                Some(e) => e,
                None => return Ok(()),
            },
        };
        let event = event(&node, &wanted);
        let api: Api<Event> = Api::namespaced(client.clone(), &wanted.namespace);
        let params = PostParams::default();
        let create = api.create(&params, &event);
        let (namespace, session, reason) = (&wanted.namespace, &wanted.name, wanted.reason);
        match tokio::time::timeout(WRITE_TIMEOUT, create).await {
            Ok(Ok(_)) => tracing::debug!(%namespace, %session, %reason, "event recorded"),
            Ok(Err(kube::Error::Api(status))) if status.code == 409 && wanted.dedupe.is_some() => {
                tracing::debug!(%namespace, %session, %reason, "event recorded by another agent")
            }
            Ok(Err(error)) => {
                tracing::warn!(%namespace, %session, %reason, %error, "failed to record an event")
            }
            Err(_) => tracing::warn!(%namespace, %session, %reason, "recording an event timed out"),
        }
    }
}

/// The Event object of `wanted`, reported by the agent on `node`.
fn event(node: &str, wanted: &SessionEvent) -> Event {
    let now = k8s_openapi::jiff::Timestamp::now();
    let name = wanted
        .dedupe
        .clone()
        .unwrap_or_else(|| format!("{}.{:x}", wanted.name, now.as_nanosecond()));
    Event {
        metadata: kube::api::ObjectMeta {
            name: Some(name),
            namespace: Some(wanted.namespace.clone()),
            ..Default::default()
        },
        involved_object: ObjectReference {
            api_version: Some("kt.dev/v1alpha1".into()),
            kind: Some("KtSession".into()),
            name: Some(wanted.name.clone()),
            namespace: Some(wanted.namespace.clone()),
            uid: wanted.uid.clone(),
            resource_version: wanted.resource_version.clone(),
            ..Default::default()
        },
        reason: Some(wanted.reason.into()),
        message: Some(wanted.message.clone()),
        type_: Some(wanted.type_.into()),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        count: Some(1),
        source: Some(EventSource {
            component: Some("kt-node-agent".into()),
            host: Some(node.to_owned()),
        }),
        reporting_component: Some("kt.dev/node-agent".into()),
        reporting_instance: Some(node.to_owned()),
        ..Default::default()
    }
}
