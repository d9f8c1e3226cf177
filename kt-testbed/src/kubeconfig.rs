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
    write_user(
        path,
        server,
        user,
        &format!("token: {token}"),
        namespace,
        ca_pem,
    )
}

/// Writes a kubeconfig for `server` authenticating with a client certificate and its key
/// (PEM, inlined as client-certificate-data and client-key-data).
pub fn write_certificate(
    path: &Path,
    server: &str,
    user: &str,
    (cert_pem, key_pem): (&str, &str),
    namespace: &str,
    ca_pem: Option<&str>,
) -> io::Result<()> {
    use base64::Engine as _;
    let b64 = |pem: &str| base64::engine::general_purpose::STANDARD.encode(pem);
    let fields = format!(
        "client-certificate-data: {}\n    client-key-data: {}",
        b64(cert_pem),
        b64(key_pem)
    );
    write_user(path, server, user, &fields, namespace, ca_pem)
}

/// A kubeconfig whose user entry has `user_fields` (YAML at the user's indentation).
fn write_user(
    path: &Path,
    server: &str,
    user: &str,
    user_fields: &str,
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
         current-context: kt-testbed\nusers:\n- name: {user}\n  user:\n    {user_fields}\n"
    );
    std::fs::write(path, text)
}
