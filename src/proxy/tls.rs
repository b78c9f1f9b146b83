//! TLS termination: a rustls server config (ring provider) from the PEM files of
//! `[balancer.tls]`, offering HTTP/2 and HTTP/1.1 through ALPN.
//!
//! Errors name the file and say what is wrong with it, since a typo in a path or a key in the
//! wrong format is the usual cause.

use std::sync::Arc;

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use super::TlsFiles;

/// The acceptor for the traffic listener.
pub(crate) fn acceptor(files: &TlsFiles) -> anyhow::Result<TlsAcceptor> {
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .with_context(|| {
            format!(
                "cannot read certificates from {} (balancer.tls.cert): expected PEM \"CERTIFICATE\" blocks",
                files.cert.display()
            )
        })?;
    if certs.is_empty() {
        anyhow::bail!(
            "{} (balancer.tls.cert) holds no certificate",
            files.cert.display()
        );
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).with_context(|| {
        format!(
            "cannot read a private key from {} (balancer.tls.key): expected a PEM PKCS#8, PKCS#1 or SEC1 key",
            files.key.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS setup")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .with_context(|| {
            format!(
                "{} and {} (balancer.tls) do not make a usable certificate and key pair",
                files.cert.display(),
                files.key.display()
            )
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
