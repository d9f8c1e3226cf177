//! SSH to the shadow over the API server's pod port-forward (always available): one SSH
//! connection, re-established with back-off when it drops, carrying one `direct-tcpip`
//! channel per forwarded connection. The session key authenticates; the host key is not
//! checked, as in v0.3.7 — the transport is the API server's authenticated TLS.

use std::{sync::Arc, time::Duration};

use k8s_openapi::api::core::v1::Pod;
use kt_proto::k8s;
use kt_tunnel::config::AcceptAnyHostKey;
use kube::Api;
use russh::{
    client::{self, Handle},
    keys::{PrivateKey, PrivateKeyWithHashAlg, ssh_key::private::Ed25519Keypair},
};
use tokio::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("port-forward to pod {pod} failed")]
    PortForward {
        pod: String,
        #[source]
        source: kube::Error,
    },
    #[error("SSH to shadow pod {pod} failed")]
    Ssh {
        pod: String,
        #[source]
        source: russh::Error,
    },
    #[error("shadow pod {pod} refused the session key")]
    AuthRefused { pod: String },
    #[error("failed to open a channel to {target}")]
    Channel {
        target: String,
        #[source]
        source: russh::Error,
    },
}

/// A session key pair.
pub struct SessionKey {
    pub private: Arc<PrivateKey>,
    /// `ssh-ed25519 AAAA… kt` for authorized_keys.
    pub public_line: String,
    /// OpenSSH PEM of the private key (the ConfigMap's `privateKey`, the key file).
    pub private_pem: String,
}

impl SessionKey {
    pub fn generate() -> Self {
        let seed: [u8; 32] = rand::random();
        let private = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
        let public_line = private.public_key().to_openssh().expect("ed25519 encodes");
        let private_pem = private
            .to_openssh(russh::keys::ssh_key::LineEnding::LF)
            .expect("ed25519 encodes")
            .to_string();
        Self {
            private: Arc::new(private),
            public_line: format!("{public_line} kt"),
            private_pem,
        }
    }
}

pub struct Tunnel {
    pods: Api<Pod>,
    pod: String,
    key: Arc<PrivateKey>,
    ssh: Mutex<Option<Handle<AcceptAnyHostKey>>>,
}

impl Tunnel {
    pub fn new(client: kube::Client, namespace: &str, pod: &str, key: Arc<PrivateKey>) -> Self {
        Self {
            pods: Api::namespaced(client, namespace),
            pod: pod.into(),
            key,
            ssh: Mutex::new(None),
        }
    }

    async fn connect(&self) -> Result<Handle<AcceptAnyHostKey>, TunnelError> {
        let mut forwarder = self
            .pods
            .portforward(&self.pod, &[k8s::SSH_PORT])
            .await
            .map_err(|source| TunnelError::PortForward {
                pod: self.pod.clone(),
                source,
            })?;
        let stream = forwarder
            .take_stream(k8s::SSH_PORT)
            .expect("the port was requested");
        // The forwarder's task and the read-ahead both end with the stream.
        tokio::spawn(async move {
            let _ = forwarder.join().await;
        });
        let (stream, reader) = kt_tunnel::transport::read_ahead(stream);
        tokio::spawn(reader);
        let config = kt_tunnel::config::client();
        let ssh_err = |source| TunnelError::Ssh {
            pod: self.pod.clone(),
            source,
        };
        let mut handle = client::connect_stream(config, stream, AcceptAnyHostKey)
            .await
            .map_err(ssh_err)?;
        let auth = handle
            .authenticate_publickey(
                k8s::SSH_USER,
                PrivateKeyWithHashAlg::new(self.key.clone(), None),
            )
            .await
            .map_err(ssh_err)?;
        if !auth.success() {
            return Err(TunnelError::AuthRefused {
                pod: self.pod.clone(),
            });
        }
        Ok(handle)
    }

    /// Establishes the first connection. A pod is Running before its SSH server listens,
    /// so this retries with back-off for up to `timeout` (`--portForwardTimeout`).
    pub async fn start(&self, timeout: Duration) -> Result<(), TunnelError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut delay = Duration::from_millis(100);
        let handle = loop {
            match self.connect().await {
                Ok(h) => break h,
                Err(e) if tokio::time::Instant::now() + delay < deadline => {
                    tracing::debug!(error = %kt_proto::error_chain(&e), "shadow not reachable yet");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
                Err(e) => return Err(e),
            }
        };
        tracing::info!(
            "Port forward to pod {}:{} established",
            self.pod,
            k8s::SSH_PORT
        );
        *self.ssh.lock().await = Some(handle);
        Ok(())
    }

    /// A `direct-tcpip` channel to `host:port`, reconnecting (with back-off) if the SSH
    /// connection has gone.
    pub async fn open(
        &self,
        host: &str,
        port: u16,
    ) -> Result<russh::Channel<client::Msg>, TunnelError> {
        let target = format!("{host}:{port}");
        let mut delay = Duration::from_millis(200);
        for attempt in 0..6 {
            let mut guard = self.ssh.lock().await;
            if guard.as_ref().is_none_or(Handle::is_closed) {
                if attempt == 0 && guard.is_some() {
                    tracing::warn!("Connection to shadow pod {} lost, reconnecting", self.pod);
                }
                match self.connect().await {
                    Ok(h) => *guard = Some(h),
                    Err(e) if attempt == 5 => return Err(e),
                    Err(e) => {
                        tracing::debug!(error = %kt_proto::error_chain(&e), "reconnect failed");
                        drop(guard);
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(5));
                        continue;
                    }
                }
            }
            let handle = guard.as_ref().expect("set above");
            match handle
                .channel_open_direct_tcpip(host, u32::from(port), "127.0.0.1", 0)
                .await
            {
                Ok(channel) => return Ok(channel),
                // A dead connection shows here first: drop it and go round again.
                Err(russh::Error::ChannelOpenFailure(reason)) => {
                    return Err(TunnelError::Channel {
                        target,
                        source: russh::Error::ChannelOpenFailure(reason),
                    });
                }
                Err(source) if attempt == 5 => return Err(TunnelError::Channel { target, source }),
                Err(_) => *guard = None,
            }
        }
        unreachable!("the last attempt returns")
    }
}
