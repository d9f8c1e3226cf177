//! The russh settings both ends of a kt tunnel use (ktctl's client, the shadow and agent
//! servers), so that each end's window and packet size match what the other expects.
//! Both grant window on consumption: every channel must go through [`crate::bridge`] (or
//! report consumption itself), or its peer stops after one window.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use russh::{
    MethodKind, MethodSet,
    keys::{PrivateKey, ssh_key::public::KeyData},
};

/// The SSH channel window: large enough that one stream is not window-limited on a LAN.
pub const WINDOW: u32 = 8 * 1024 * 1024;

/// The largest SSH packet payload kt sends or accepts.
pub const MAX_PACKET: u32 = 32_768;

/// Messages russh queues per channel before its session loop waits. The bridge drains the
/// queue as data arrives (the window bounds the bytes), so it only absorbs a burst.
pub const CHANNEL_QUEUE: usize = 256;

/// The servers' keepalive: a client gone without a FIN is noticed within about a minute
/// (its session's lease, not this, ends a redirect sooner).
const KEEPALIVE: Duration = Duration::from_secs(15);
const KEEPALIVE_MAX: usize = 4;

/// ktctl's keepalive: a request every half second the server has been silent (about 200
/// bytes a second on an idle connection). It keeps data in flight, so that a path that
/// drops packets without a RST shows within the direct socket's `TCP_USER_TIMEOUT` (ktctl
/// sets it) instead of when someone next sends; the SSH-level limit (about 10 s
/// unanswered) catches a server that still ACKs but no longer answers, loosely enough for
/// a loaded API server's port-forward.
const CLIENT_KEEPALIVE: Duration = Duration::from_millis(500);
const CLIENT_KEEPALIVE_MAX: usize = 20;

/// AES-GCM first: with AES instructions it is the fastest cipher both russh and OpenSSH
/// offer (russh's own default puts ChaCha20-Poly1305 first).
const CIPHERS: &[russh::cipher::Name] = &[
    russh::cipher::AES_128_GCM,
    russh::cipher::AES_256_GCM,
    russh::cipher::CHACHA20_POLY1305,
];

/// The client handler of ktctl's tunnels. A shadow's host key is fresh per start and not
/// known in advance (v0.3.7 does not check it at all). Over the API server's port-forward —
/// authenticated TLS to the right pod — any key is accepted and remembered; a handler from
/// [`HostKeyPin::required`], used for a direct connection to the pod's address, accepts only
/// the key remembered last, so another host answering at that address cannot stand in.
#[derive(Clone, Default)]
pub struct HostKeyPin {
    learned: Arc<Mutex<Option<KeyData>>>,
    required: bool,
}

impl HostKeyPin {
    /// A handler that accepts only the key this pin learned (none yet: no key).
    pub fn required(&self) -> Self {
        Self {
            learned: self.learned.clone(),
            required: true,
        }
    }
}

impl russh::client::Handler for HostKeyPin {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let presented = match key {
            russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } => key.key_data(),
            russh::keys::PublicKeyOrCertificate::Certificate(cert) => cert.public_key(),
        };
        let mut learned = self.learned.lock().unwrap_or_else(|e| e.into_inner());
        if self.required {
            return Ok(learned.as_ref() == Some(presented));
        }
        *learned = Some(presented.clone());
        Ok(true)
    }
}

/// ktctl's side of a tunnel: the servers' window and packet size, AES-GCM first, and a
/// keepalive every half second of silence (`CLIENT_KEEPALIVE`).
pub fn client() -> Arc<russh::client::Config> {
    Arc::new(russh::client::Config {
        preferred: russh::Preferred {
            cipher: std::borrow::Cow::Borrowed(CIPHERS),
            ..russh::Preferred::DEFAULT
        },
        keepalive_interval: Some(CLIENT_KEEPALIVE),
        keepalive_max: CLIENT_KEEPALIVE_MAX,
        window_size: WINDOW,
        maximum_packet_size: MAX_PACKET,
        channel_buffer_size: CHANNEL_QUEUE,
        nodelay: true,
        window_on_consumption: true,
        ..Default::default()
    })
}

/// What the servers accept: [`CIPHERS`] (russh's server default has AES-GCM only with
/// 256-bit keys, four more AES rounds per block than ktctl's first choice), then the CTR
/// modes russh's default also offers, for clients that have nothing else. The client's
/// order decides (RFC 4253 §7.1).
const SERVER_CIPHERS: &[russh::cipher::Name] = &[
    russh::cipher::AES_128_GCM,
    russh::cipher::AES_256_GCM,
    russh::cipher::CHACHA20_POLY1305,
    russh::cipher::AES_256_CTR,
    russh::cipher::AES_192_CTR,
    russh::cipher::AES_128_CTR,
];

/// Public-key authentication only; a refused key is answered at once the first time.
pub fn server(host_key: PrivateKey) -> Arc<russh::server::Config> {
    Arc::new(russh::server::Config {
        preferred: russh::Preferred {
            cipher: std::borrow::Cow::Borrowed(SERVER_CIPHERS),
            ..russh::Preferred::DEFAULT
        },
        keys: vec![host_key],
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        auth_rejection_time: Duration::from_millis(200),
        auth_rejection_time_initial: Some(Duration::ZERO),
        keepalive_interval: Some(KEEPALIVE),
        keepalive_max: KEEPALIVE_MAX,
        window_size: WINDOW,
        maximum_packet_size: MAX_PACKET,
        channel_buffer_size: CHANNEL_QUEUE,
        nodelay: true,
        window_on_consumption: true,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use russh::{
        client::Handler as _,
        keys::{PrivateKey, PublicKeyOrCertificate, ssh_key::private::Ed25519Keypair},
    };

    use super::HostKeyPin;

    fn host_key(seed: u8) -> PublicKeyOrCertificate {
        let key = PrivateKey::from(Ed25519Keypair::from_seed(&[seed; 32]));
        PublicKeyOrCertificate::PublicKey {
            key: key.public_key().clone(),
            hash_alg: None,
        }
    }

    #[tokio::test]
    async fn a_direct_connection_must_show_the_key_the_port_forward_saw() {
        let mut learn = HostKeyPin::default();
        let mut direct = learn.required();
        assert!(
            !direct.check_server_key(&host_key(1)).await.unwrap(),
            "nothing learned yet"
        );
        assert!(learn.check_server_key(&host_key(1)).await.unwrap());
        assert!(direct.check_server_key(&host_key(1)).await.unwrap());
        assert!(
            !direct.check_server_key(&host_key(2)).await.unwrap(),
            "an impostor"
        );
        // The pod restarted with a new key: the port-forward learns it, direct follows.
        assert!(learn.check_server_key(&host_key(2)).await.unwrap());
        assert!(direct.check_server_key(&host_key(2)).await.unwrap());
        assert!(!direct.check_server_key(&host_key(1)).await.unwrap());
    }
}
