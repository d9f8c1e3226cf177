//! The testbed's PKI (a CA and an API server certificate with IP SANs, as in-cluster clients
//! need; client certificates for users) and an HTTPS accept loop for the API router.
//! HTTP/1.1 only: watches and WebSocket upgrades are what clients use, and kubectl sends no
//! token over plain HTTP.
//!
//! Client certificates are authenticated as kube-apiserver's X509 authenticator does
//! (Kubernetes docs, "Authenticating: X509 client certificates"; `--client-ca-file`): a
//! certificate is optional in the handshake, one that does not chain to the CA (or has
//! expired) fails the handshake, and a valid one makes the request's user its subject's
//! common name with its organizations as groups (plus `system:authenticated`).

use std::{net::IpAddr, sync::Arc};

use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
use tokio::net::TcpListener;

use crate::api::auth::UserInfo;
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        self,
        pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    },
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub struct Pki {
    /// PEM of the CA, for kubeconfigs and `ca.crt` in pods.
    pub ca_pem: String,
    pub server: Arc<rustls::ServerConfig>,
    /// Signs client certificates ([`client_certificate`]).
    pub ca: Arc<Issuer>,
}

/// The CA's signer.
pub type Issuer = rcgen::Issuer<'static, KeyPair>;

/// The user a verified client certificate names, put in the request's extensions.
#[derive(Clone, Debug)]
pub struct ClientIdentity(pub UserInfo);

/// A client certificate and its key (PEM) for `user` in `group` (CN and O), signed by `ca`,
/// valid for a day. rcgen writes one O per subject, so at most one group here (the
/// authenticator reads every O a certificate has).
pub fn client_certificate(
    ca: &Issuer,
    user: &str,
    group: Option<&str>,
) -> Result<(String, String), String> {
    let err = |e: rcgen::Error| e.to_string();
    let key = KeyPair::generate().map_err(err)?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    params.distinguished_name.push(DnType::CommonName, user);
    if let Some(group) = group {
        params
            .distinguished_name
            .push(DnType::OrganizationName, group);
    }
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let now = std::time::SystemTime::now();
    params.not_before = now.into();
    params.not_after = (now + std::time::Duration::from_secs(24 * 3600)).into();
    let cert = params.signed_by(&key, ca).map_err(err)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// The user of a verified client certificate (DER): CN is the name, each O a group.
pub fn certificate_user(der: &[u8]) -> Option<UserInfo> {
    use x509_parser::prelude::{FromDer as _, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let subject = cert.subject();
    let name = subject.iter_common_name().next()?.as_str().ok()?.to_owned();
    if name.is_empty() {
        return None;
    }
    let mut groups: Vec<String> = subject
        .iter_organization()
        .filter_map(|o| o.as_str().ok().map(str::to_owned))
        .collect();
    groups.push("system:authenticated".into());
    Some(UserInfo { name, groups })
}

/// A fresh CA and a server certificate for `ips` and `names`.
pub fn generate(ips: &[IpAddr], names: &[&str]) -> Result<Pki, String> {
    let err = |e: rcgen::Error| e.to_string();
    let ca_key = KeyPair::generate().map_err(err)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "kt-testbed-ca");
    let ca_cert = ca_params.self_signed(&ca_key).map_err(err)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let key = KeyPair::generate().map_err(err)?;
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .map_err(err)?;
    params
        .subject_alt_names
        .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    params
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    let cert = params.signed_by(&key, &issuer).map_err(err)?;

    let chain = vec![CertificateDer::from(cert.der().to_vec())];
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(ca_cert.der().to_vec()))
        .map_err(|e| e.to_string())?;
    // Go's tls.VerifyClientCertIfGiven, as kube-apiserver sets it with --client-ca-file.
    let clients = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|e| e.to_string())?;
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(clients)
        .with_single_cert(chain, key)
        .map_err(|e| e.to_string())?;
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Pki {
        ca_pem: ca_cert.pem(),
        server: Arc::new(server),
        ca: Arc::new(issuer),
    })
}

/// Serves `router` over TLS on `listener` until `shutdown`; connections are tracked.
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    tls: Arc<rustls::ServerConfig>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    let acceptor = TlsAcceptor::from(tls);
    loop {
        let (stream, _) = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(_) => continue,
            },
        };
        // Go's net package sets TCP_NODELAY on every connection; kube-apiserver's do too.
        let _ = stream.set_nodelay(true);
        let (acceptor, router, shutdown) = (acceptor.clone(), router.clone(), shutdown.clone());
        tasks.spawn(async move {
            let Ok(tls) = acceptor.accept(stream).await else {
                return;
            };
            let identity = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|leaf| certificate_user(leaf));
            let router = match identity {
                Some(user) => router.layer(axum::Extension(ClientIdentity(user))),
                None => router,
            };
            let service = hyper_util::service::TowerToHyperService::new(router);
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                () = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_certificate_names_its_user_by_cn_and_groups_by_o() {
        let pki = generate(&["127.0.0.1".parse().unwrap()], &[]).unwrap();
        let (pem, _key) = client_certificate(&pki.ca, "carol", Some("kt-devs")).unwrap();
        let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        assert_eq!(
            certificate_user(&parsed.contents),
            Some(UserInfo {
                name: "carol".into(),
                groups: vec!["kt-devs".into(), "system:authenticated".into()],
            })
        );
        let (pem, _key) = client_certificate(&pki.ca, "dave", None).unwrap();
        let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        assert_eq!(
            certificate_user(&parsed.contents).map(|u| u.groups),
            Some(vec!["system:authenticated".into()])
        );
    }
}
