//! TLS for the connection imattr makes itself, the stream reader's, with the
//! trust lapin gives the AMQP connection: the platform's roots plus
//! `amqp.tls_ca_file`, and the client certificate of `amqp.tls_cert_file`.

use std::io;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use lapin::tcp::OwnedIdentity;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ClientConfig;

use super::connect::{classify, describe, tls_config, Attempt, Problem};
use crate::config::AmqpConfig;

/// The rustls client settings for `cfg`'s TLS files (checked as for the
/// AMQP connection: an error names the key and the file).
pub(crate) fn client_config(cfg: &AmqpConfig) -> anyhow::Result<Arc<ClientConfig>> {
    let files = tls_config(cfg)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let extra_roots = match &files.cert_chain {
        Some(pem) => CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow!("amqp.tls_ca_file ({}): {e}", cfg.tls_ca_file))?,
        None => Vec::new(),
    };
    let verifier =
        rustls_platform_verifier::Verifier::new_with_extra_roots(extra_roots, provider.clone())
            .context("setting up TLS certificate verification")?;
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("setting up TLS")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let config = match files.identity {
        Some(OwnedIdentity::PKCS8 { pem, key }) => {
            let chain = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| anyhow!("amqp.tls_cert_file ({}): {e}", cfg.tls_cert_file))?;
            let key = PrivateKeyDer::from_pem_slice(&key)
                .map_err(|e| anyhow!("amqp.tls_key_file ({}): {e}", cfg.tls_key_file))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| anyhow!("{} ({e})", describe(Problem::KeyMismatch, cfg)))?
        }
        // `tls_config` makes no other kind.
        Some(_) => anyhow::bail!("unsupported client identity"),
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// One line for a failed TLS handshake: the certificate problems in the AMQP
/// connection's words, anything else as it is.
pub(crate) fn explain(e: io::Error, cfg: &AmqpConfig) -> anyhow::Error {
    let text = format!("{e}{}", crate::telemetry::sources(&e));
    let attempt = Attempt {
        tls: true,
        io_kind: Some(e.kind()),
        text: text.clone(),
    };
    match classify(&attempt) {
        p @ (Problem::UntrustedCertificate
        | Problem::NameMismatch
        | Problem::Expired
        | Problem::NotValidYet
        | Problem::BadCertificate
        | Problem::ClientCertificateRefused) => anyhow!("{} ({text})", describe(p, cfg)),
        // The AMQP connection with the same settings got through, so a port
        // that drops the handshake is most likely no TLS listener.
        Problem::TlsToPlainPort | Problem::DroppedAfterHandshake => anyhow!(
            "the port dropped the TLS handshake: is amqp.stream_port the broker's stream TLS \
             listener (stream.listeners.ssl, 5551 by default) and not its plain one? If it is, \
             the broker may have refused the client certificate ({text})"
        ),
        _ => anyhow!("{text}"),
    }
}
