//! Kubeconfig files for the testbed's users.

use std::{io, path::Path};

/// Writes a kubeconfig for `server` authenticating with `token`. `ca_pem` is the CA of an
/// https server (inlined as certificate-authority-data).
pub fn write(
    path: &Path,
    server: &str,
    user: &str,
    token: &str,
    namespace: &str,
    ca_pem: Option<&str>,
) -> io::Result<()> {
    use base64::Engine as _;
    let ca = match ca_pem {
        Some(pem) => format!(
            "\n    certificate-authority-data: {}",
            base64::engine::general_purpose::STANDARD.encode(pem)
        ),
        None => String::new(),
    };
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: kt-testbed\n  cluster:\n    server: {server}{ca}\n\
         contexts:\n- name: kt-testbed\n  context:\n    cluster: kt-testbed\n    user: {user}\n    namespace: {namespace}\n\
         current-context: kt-testbed\nusers:\n- name: {user}\n  user:\n    token: {token}\n"
    );
    std::fs::write(path, text)
}
