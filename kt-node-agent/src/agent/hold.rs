//! Holding sessions: the agent's SSH server on its node. ktctl logs in as
//! `<namespace>/<session>` with the session's key (the one its `KtSession` names); each
//! `tcpip-forward` names one of the session's Service ports. The agent listens on a free
//! port of its node for it, sends the connections it accepts back as `forwarded-tcpip` for
//! that Service port, and writes the session's `status` (this node, its address, the
//! listeners, the renewal time): renewed while the SSH connection lives, cleared when it
//! ends. So every agent redirects the Service only while ktctl is connected, and at most a
//! lease longer if this agent dies.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use kt_proto::session::{KtSession, Listener, SessionSpec, api_resource, renew_time};
use kube::{
    Api,
    api::{Patch, PatchParams},
    runtime::reflector::{ObjectRef, Store},
};
use russh::{
    keys::PublicKey,
    server::{Auth, Handler, Session},
};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::ssh_server::{TunnelBytes, forward_back};

/// What every connection of the hold server needs.
#[derive(Clone)]
pub struct HoldContext {
    pub node_name: String,
    pub node_ip: IpAddr,
    pub sessions: Store<KtSession>,
    pub client: kube::Client,
    pub tunnel_bytes: Arc<TunnelBytes>,
}

#[derive(Debug, thiserror::Error)]
pub enum HoldError {
    #[error("SSH protocol error")]
    Ssh(#[from] russh::Error),
}

/// Serves the hold server on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, context: HoldContext, shutdown: CancellationToken) {
    let context = Arc::new(context);
    crate::ssh_server::serve(listener, shutdown, |peer, tasks, cancel| Holder {
        peer,
        context: context.clone(),
        held: None,
        tasks,
        cancel,
    })
    .await;
}

/// One ktctl connection, holding at most one session.
struct Holder {
    peer: SocketAddr,
    context: Arc<HoldContext>,
    held: Option<Held>,
    tasks: TaskTracker,
    /// Cancelled when the connection ends: stops listeners and the renewal, clears status.
    cancel: CancellationToken,
}

struct Held {
    namespace: String,
    name: String,
    spec: SessionSpec,
    listeners: Arc<Mutex<Vec<Listener>>>,
    renewing: bool,
}

/// `<namespace>/<session>`, the login name ktctl uses.
fn session_of(user: &str) -> Option<(&str, &str)> {
    user.split_once('/')
        .filter(|(ns, name)| !ns.is_empty() && !name.is_empty())
}

impl Handler for Holder {
    type Error = HoldError;

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: russh::server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        let found = session_of(user).and_then(|(ns, name)| {
            let object = self
                .context
                .sessions
                .get(&ObjectRef::new_with(name, api_resource()).within(ns))?;
            let authorized = PublicKey::from_openssh(object.spec.public_key.trim()).ok()?;
            (authorized.key_data() == key.public_key.key_data())
                .then(|| (ns.to_owned(), name.to_owned(), object.spec.clone()))
        });
        match found {
            Some((namespace, name, spec)) => {
                tracing::info!(peer = %self.peer, %namespace, session = %name, "session connected");
                self.held = Some(Held {
                    namespace,
                    name,
                    spec,
                    listeners: Arc::default(),
                    renewing: false,
                });
                Ok(Auth::Accept)
            }
            None => {
                tracing::warn!(peer = %self.peer, user, "no session for this login and key");
                Ok(Auth::reject())
            }
        }
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let Some(held) = &mut self.held else {
            return Ok(false);
        };
        let Some(service_port) = held
            .spec
            .ports
            .iter()
            .map(|p| p.port)
            .find(|p| u32::from(*p) == *port)
        else {
            tracing::warn!(session = %held.name, port = *port, "not a port of the session");
            return Ok(false);
        };
        let listener = match TcpListener::bind((IpAddr::from([0, 0, 0, 0]), 0)).await {
            Ok(l) => l,
            Err(error) => {
                tracing::warn!(%error, "no tunnel listener");
                return Ok(false);
            }
        };
        let Ok(listener_port) = listener.local_addr().map(|a| a.port()) else {
            return Ok(false);
        };
        held.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Listener {
                port: service_port,
                listener_port,
            });
        tracing::info!(session = %held.name, service_port, listener_port, "tunnel listener");
        self.tasks.spawn(forward_back(
            listener,
            session.handle(),
            (address.to_owned(), *port),
            self.cancel.child_token(),
            self.tasks.clone(),
            Some(self.context.tunnel_bytes.clone()),
        ));
        let status = Status {
            context: self.context.clone(),
            namespace: held.namespace.clone(),
            name: held.name.clone(),
            listeners: held.listeners.clone(),
        };
        if let Err(error) = status.write().await {
            tracing::warn!(session = %held.name, %error, "failed to write session status");
            return Ok(false);
        }
        if !held.renewing {
            held.renewing = true;
            let every = Duration::from_secs(u64::from(held.spec.lease_seconds.max(3)) / 3);
            self.tasks.spawn(status.renew(every, self.cancel.clone()));
        }
        Ok(true)
    }
}

/// A held session's status, as this agent writes it.
struct Status {
    context: Arc<HoldContext>,
    namespace: String,
    name: String,
    listeners: Arc<Mutex<Vec<Listener>>>,
}

impl Status {
    fn api(&self) -> Api<KtSession> {
        Api::namespaced_with(
            self.context.client.clone(),
            &self.namespace,
            &api_resource(),
        )
    }

    fn listeners(&self) -> Vec<Listener> {
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    async fn write(&self) -> Result<(), kube::Error> {
        let status = json!({"status": {
            "node": self.context.node_name,
            "address": self.context.node_ip.to_string(),
            "listeners": self.listeners(),
            "renewTime": renew_time(chrono::Utc::now()),
        }});
        self.api()
            .patch_status(&self.name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .map(drop)
    }

    /// Renews every `every` until `stop`, then clears the status if it is still ours (a
    /// reconnected ktctl may already hold the session through another connection).
    async fn renew(self, every: Duration, stop: CancellationToken) {
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(every) => {
                    if let Err(error) = self.write().await {
                        tracing::warn!(session = %self.name, %error, "failed to renew session");
                    }
                }
            }
        }
        let ours = self
            .api()
            .get_opt(&self.name)
            .await
            .ok()
            .flatten()
            .is_some_and(|s| {
                s.status.is_some_and(|st| {
                    st.node == self.context.node_name && st.listeners == self.listeners()
                })
            });
        if ours {
            let cleared = json!({"status": null});
            match self
                .api()
                .patch_status(&self.name, &PatchParams::default(), &Patch::Merge(&cleared))
                .await
            {
                Ok(_) => tracing::info!(session = %self.name, "session released"),
                Err(error) => {
                    tracing::warn!(session = %self.name, %error, "failed to release session")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::session_of;

    #[test]
    fn login_names_a_namespace_and_a_session() {
        assert_eq!(session_of("dev/web-alice"), Some(("dev", "web-alice")));
        assert_eq!(session_of("root"), None);
        assert_eq!(session_of("/x"), None);
        assert_eq!(session_of("dev/"), None);
    }
}
