//! The session's SSH key pair: generated per run, its public half given to the cluster
//! (a shadow's ConfigMap, or the session object), its private half only to this client.

use std::sync::Arc;

use russh::keys::{PrivateKey, ssh_key::private::Ed25519Keypair};

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
