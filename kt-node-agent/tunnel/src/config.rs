//! The russh settings both ends of a kt tunnel use (ktctl's client, the shadow and agent
//! servers), so that each end's window and packet size match what the other expects.
//! Both grant window on consumption: every channel must go through [`crate::bridge`] (or
//! report consumption itself), or its peer stops after one window.

use std::{sync::Arc, time::Duration};

use russh::{MethodKind, MethodSet, keys::PrivateKey};

/// The SSH channel window: large enough that one stream is not window-limited on a LAN.
pub const WINDOW: u32 = 8 * 1024 * 1024;

/// The largest SSH packet payload kt sends or accepts.
pub const MAX_PACKET: u32 = 32_768;

/// Messages russh queues per channel before its session loop waits. The bridge drains the
/// queue as data arrives (the window bounds the bytes), so it only absorbs a burst.
pub const CHANNEL_QUEUE: usize = 256;

const KEEPALIVE: Duration = Duration::from_secs(15);
const KEEPALIVE_MAX: usize = 4;

/// AES-GCM first: with AES instructions it is the fastest cipher both russh and OpenSSH
/// offer (russh's own default puts ChaCha20-Poly1305 first).
const CIPHERS: &[russh::cipher::Name] = &[
    russh::cipher::AES_128_GCM,
    russh::cipher::AES_256_GCM,
    russh::cipher::CHACHA20_POLY1305,
];

/// The client handler of kt's tunnels: the shadow's host key is fresh per start and not
/// pinned (v0.3.7 does not either); the transport is the API server's authenticated TLS
/// and the session key authenticates the client.
pub struct AcceptAnyHostKey;

impl russh::client::Handler for AcceptAnyHostKey {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        _key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

pub fn client() -> Arc<russh::client::Config> {
    Arc::new(russh::client::Config {
        preferred: russh::Preferred {
            cipher: std::borrow::Cow::Borrowed(CIPHERS),
            ..russh::Preferred::DEFAULT
        },
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

/// Public-key authentication only; a refused key is answered at once the first time.
pub fn server(host_key: PrivateKey) -> Arc<russh::server::Config> {
    Arc::new(russh::server::Config {
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
