//! Connecting to RabbitMQ: TLS material, the SASL mechanism, and errors that
//! say what went wrong (docs/operations-tls.md).
//!
//! `run`, `publish` and `dlq` all connect through [`connect`], so the same
//! `amqp.*` settings serve them all.

use std::io;

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::uri::{AMQPUri, SASLMechanism};
use lapin::{Connection, ConnectionProperties};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{AmqpConfig, AuthMechanism, ConfigError};

/// How to start a broker, for error messages.
pub(crate) const START_HINT: &str =
    "is RabbitMQ running? Start one with `rabbitmq-server -detached` or `docker compose up -d rabbitmq`";

/// The broker could not be reached or refused us.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// A TLS file named in `amqp.*` cannot be read or holds the wrong thing.
    #[error("{0}")]
    Config(ConfigError),
    /// Connecting failed; `message` says why in words, then what lapin said.
    #[error("cannot connect to RabbitMQ at {url}: {message}")]
    Broker {
        /// The URL, password redacted.
        url: String,
        /// The one-line explanation shown to the operator.
        message: String,
        /// What lapin said (inside `message`; not named `source`, which
        /// thiserror would chain and anyhow print a second time).
        cause: lapin::Error,
    },
}

/// Opens a connection named `name` (shown in the management UI and by
/// `rabbitmqctl list_connections client_properties`). The TLS files are read
/// on every call, so renewed certificates are picked up on reconnect.
pub async fn connect(cfg: &AmqpConfig, name: &str) -> Result<Connection, ConnectError> {
    connect_gated(cfg, name, None).await
}

/// [`connect`], with the socket read only while `gate` allows (the
/// worker's consume connection: `amqp.max_held_bytes`).
pub(crate) async fn connect_gated(
    cfg: &AmqpConfig,
    name: &str,
    gate: Option<std::sync::Arc<super::readgate::ReadGate>>,
) -> Result<Connection, ConnectError> {
    let tls = tls_config(cfg).map_err(ConnectError::Config)?;
    let broker_error = |cause: lapin::Error| {
        let problem = classify(&Attempt::of(cfg, &cause));
        ConnectError::Broker {
            url: cfg.url.redacted(),
            message: format!("{} ({cause})", describe(problem, cfg)),
            cause,
        }
    };
    // Validation refuses what this parser does; its own messages may quote
    // the URL, so they are never shown.
    let mut uri: AMQPUri = cfg.url.expose().parse().map_err(|_: String| {
        let why = crate::config::check_amqp_url(cfg.url.expose())
            .err()
            .unwrap_or_else(|| "is not a valid AMQP URL".into());
        ConnectError::Config(ConfigError::Invalid {
            field: "amqp.url",
            message: format!("{why} (got {})", cfg.url),
        })
    })?;
    if cfg.auth_mechanism == AuthMechanism::External {
        uri.query.auth_mechanism = Some(SASLMechanism::External);
    }
    let props = connection_properties(name);
    match gate {
        None => {
            let runtime = lapin::runtime::default_runtime().map_err(broker_error)?;
            Connection::connect_uri_with_config(uri, props, tls, runtime).await
        }
        Some(gate) => {
            let kit = async_rs::util::RuntimeParts::new(
                async_rs::Tokio::current(),
                super::readgate::GatedReactor::new(gate),
            );
            Connection::connect_uri_with_config(uri, props, tls, async_rs::Runtime::new(kit)).await
        }
    }
    .map_err(broker_error)
}

/// The connection's properties: its name, and lapin's automatic recovery
/// off (lapin's default, kept on purpose): a connection recovered behind our
/// back would be a new broker session whose deliveries the old session's
/// state knows nothing of (docs/design.md, "Fencing").
fn connection_properties(name: &str) -> ConnectionProperties {
    ConnectionProperties::default().with_connection_name(name.into())
}

/// Reads the TLS files named in `cfg` into lapin's TLS settings (rustls),
/// checking that each holds what it should. Errors name the key and the file.
pub(crate) fn tls_config(cfg: &AmqpConfig) -> Result<OwnedTLSConfig, ConfigError> {
    let mut tls = OwnedTLSConfig::default();
    if !cfg.tls_ca_file.is_empty() {
        let pem = read("amqp.tls_ca_file", &cfg.tls_ca_file)?;
        certificates("amqp.tls_ca_file", &cfg.tls_ca_file, &pem)?;
        let text = String::from_utf8(pem).map_err(|_| {
            file_error(
                "amqp.tls_ca_file",
                &cfg.tls_ca_file,
                "is not a PEM text file",
            )
        })?;
        tls.cert_chain = Some(text);
    }
    if !cfg.tls_cert_file.is_empty() && !cfg.tls_key_file.is_empty() {
        let pem = read("amqp.tls_cert_file", &cfg.tls_cert_file)?;
        certificates("amqp.tls_cert_file", &cfg.tls_cert_file, &pem)?;
        let key = read("amqp.tls_key_file", &cfg.tls_key_file)?;
        PrivateKeyDer::from_pem_slice(&key).map_err(|e| {
            file_error(
                "amqp.tls_key_file",
                &cfg.tls_key_file,
                &format!(
                    "holds no usable PEM private key ({e}); PKCS#8, PKCS#1 or SEC1, unencrypted"
                ),
            )
        })?;
        // lapin's PEM identity ("PKCS8" by name) takes any PEM key rustls reads.
        tls.identity = Some(OwnedIdentity::PKCS8 { pem, key });
    }
    Ok(tls)
}

fn read(field: &'static str, path: &str) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| file_error(field, path, &format!("cannot be read: {e}")))
}

fn certificates(field: &'static str, path: &str, pem: &[u8]) -> Result<(), ConfigError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(field, path, &format!("holds a malformed certificate ({e})")))?;
    if certs.is_empty() {
        return Err(file_error(
            field,
            path,
            "holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
        ));
    }
    Ok(())
}

fn file_error(field: &'static str, path: &str, what: &str) -> ConfigError {
    ConfigError::Invalid {
        field,
        message: format!("file {path} {what}"),
    }
}

/// What went wrong when connecting, as far as the error tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Problem {
    /// Nothing listens at the address.
    Refused,
    /// The host name does not resolve (DNS), so nothing was even tried.
    UnknownHost,
    /// The broker's certificate chains to no trusted CA.
    UntrustedCertificate,
    /// The broker's certificate does not name the host we connected to.
    NameMismatch,
    /// The broker's certificate has expired.
    Expired,
    /// The broker's certificate is not valid yet.
    NotValidYet,
    /// The broker's certificate was refused for another reason.
    BadCertificate,
    /// `amqp.tls_key_file` is not the key of `amqp.tls_cert_file`.
    KeyMismatch,
    /// The broker refused our client certificate, or wanted one.
    ClientCertificateRefused,
    /// The broker dropped a TLS connection at once: under TLS 1.3 that is how
    /// a refused client certificate often shows (the reset overtakes its alert).
    DroppedAfterHandshake,
    /// `amqps://` to a port that speaks plain AMQP.
    TlsToPlainPort,
    /// `amqp://` to a port that speaks TLS.
    PlainToTlsPort,
    /// The broker refused the login (user, password, EXTERNAL user, vhost).
    LoginRefused,
    /// Anything else.
    Other,
}

/// The facts about a failed connection attempt that [`classify`] looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Attempt {
    /// Whether the URL is `amqps://`.
    pub(crate) tls: bool,
    /// The kind of the I/O error, when it was one.
    pub(crate) io_kind: Option<io::ErrorKind>,
    /// The error's text, with its sources.
    pub(crate) text: String,
}

impl Attempt {
    /// The facts of `err`, an error connecting with `cfg`.
    pub(crate) fn of(cfg: &AmqpConfig, err: &lapin::Error) -> Attempt {
        let mut text = err.to_string();
        let io_kind = match err.kind() {
            lapin::ErrorKind::IOError(e) => {
                text.push_str(&crate::telemetry::sources(&**e));
                Some(e.kind())
            }
            _ => None,
        };
        Attempt {
            tls: cfg.url.expose().starts_with("amqps://"),
            io_kind,
            text,
        }
    }
}

/// Decides what went wrong from an attempt's facts. The texts are rustls's
/// and lapin's own (rustls `Error` and `CertificateError` display forms).
pub(crate) fn classify(a: &Attempt) -> Problem {
    let t = a.text.as_str();
    if a.io_kind == Some(io::ErrorKind::ConnectionRefused) {
        return Problem::Refused;
    }
    // getaddrinfo's words (glibc, musl), as the standard library reports them.
    if [
        "failed to lookup address information",
        "Name or service not known",
        "nodename nor servname provided",
        "Temporary failure in name resolution",
        "No address associated with hostname",
    ]
    .iter()
    .any(|w| t.contains(w))
    {
        return Problem::UnknownHost;
    }
    if a.tls {
        // rustls checks the pair before it dials.
        if t.contains("keys may not be consistent") || t.contains("InconsistentKeys") {
            return Problem::KeyMismatch;
        }
        if t.contains("invalid peer certificate") {
            return if t.contains("UnknownIssuer") {
                Problem::UntrustedCertificate
            } else if t.contains("not valid for name") || t.contains("NotValidForName") {
                Problem::NameMismatch
            } else if t.contains("expired") || t.contains("Expired") {
                Problem::Expired
            } else if t.contains("not valid yet") || t.contains("NotValidYet") {
                Problem::NotValidYet
            } else {
                Problem::BadCertificate
            };
        }
        // The broker's alert when it wants a client certificate, or does not
        // trust ours (TLS 1.3 sends it after our side finished the handshake).
        if [
            "CertificateRequired",
            "BadCertificate",
            "UnknownCA",
            "HandshakeFailure",
            "CertificateUnknown",
            "UnsupportedCertificate",
            "CertificateExpired",
            "AccessDenied",
        ]
        .iter()
        .any(|alert| t.contains(&format!("received fatal alert: {alert}")))
        {
            return Problem::ClientCertificateRefused;
        }
        if matches!(
            a.io_kind,
            Some(io::ErrorKind::ConnectionReset | io::ErrorKind::UnexpectedEof)
        ) {
            return Problem::DroppedAfterHandshake;
        }
        // A plain AMQP listener answers a ClientHello with its protocol
        // header ("AMQP…"), which is no TLS record.
        if t.contains("received corrupt message") || t.contains("InvalidContentType") {
            return Problem::TlsToPlainPort;
        }
    } else if t.contains("failed to parse")
        || t.contains("the server only supports AMQP")
        || matches!(
            a.io_kind,
            Some(io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset)
        )
    {
        // A TLS listener drops the "AMQP…" greeting, which is no TLS record:
        // it resets the socket (RabbitMQ does), closes it, or sends an alert.
        return Problem::PlainToTlsPort;
    }
    if t.contains("ACCESS_REFUSED")
        || t.contains("access refused")
        || t.contains("login refused")
        || t.contains("NOT_ALLOWED")
    {
        return Problem::LoginRefused;
    }
    Problem::Other
}

/// One line for the operator: what went wrong and what to do.
pub(crate) fn describe(problem: Problem, cfg: &AmqpConfig) -> String {
    match problem {
        Problem::Refused => format!("connection refused; {START_HINT}"),
        Problem::UnknownHost => {
            "the host name in amqp.url does not resolve (DNS); check its spelling, or the \
             resolver of this machine"
                .into()
        }
        Problem::UntrustedCertificate if cfg.tls_ca_file.is_empty() => {
            "the broker's certificate is not signed by a CA the system trusts; \
             set amqp.tls_ca_file to the PEM file of the CA that signed it"
                .into()
        }
        Problem::UntrustedCertificate => format!(
            "the broker's certificate is not signed by a CA in amqp.tls_ca_file ({})",
            cfg.tls_ca_file
        ),
        Problem::NameMismatch => "the broker's certificate does not name the host in amqp.url; \
             connect by a name the certificate lists, or reissue it for this one"
            .into(),
        Problem::Expired => "the broker's certificate has expired; renew it on the broker".into(),
        Problem::NotValidYet => {
            "the broker's certificate is not valid yet; check the clocks of both machines".into()
        }
        Problem::BadCertificate => "the broker's certificate was refused".into(),
        Problem::KeyMismatch => format!(
            "amqp.tls_key_file ({}) is not the private key of amqp.tls_cert_file ({})",
            cfg.tls_key_file, cfg.tls_cert_file
        ),
        Problem::ClientCertificateRefused if cfg.tls_cert_file.is_empty() => {
            "the broker requires a client certificate; set amqp.tls_cert_file and amqp.tls_key_file"
                .into()
        }
        Problem::ClientCertificateRefused => format!(
            "the broker refused the client certificate amqp.tls_cert_file ({}); \
             is it signed by a CA in the broker's ssl_options.cacertfile, and unexpired?",
            cfg.tls_cert_file
        ),
        Problem::DroppedAfterHandshake if cfg.tls_cert_file.is_empty() => {
            "the broker dropped the TLS connection at once; it probably requires a client \
             certificate: set amqp.tls_cert_file and amqp.tls_key_file"
                .into()
        }
        Problem::DroppedAfterHandshake => format!(
            "the broker dropped the TLS connection at once; it probably refused the client \
             certificate amqp.tls_cert_file ({}): is it signed by a CA in the broker's \
             ssl_options.cacertfile, and unexpired?",
            cfg.tls_cert_file
        ),
        Problem::TlsToPlainPort => "amqps:// (TLS) spoken to a port that speaks plain AMQP; \
             use the broker's TLS port (usually 5671) or amqp://"
            .into(),
        Problem::PlainToTlsPort => "amqp:// (plain) spoken to a port that speaks TLS, it seems \
             (the broker dropped the AMQP greeting); use amqps:// or the broker's plain port (usually 5672)"
            .into(),
        Problem::LoginRefused if cfg.auth_mechanism == AuthMechanism::External => {
            "the broker refused the EXTERNAL login; is rabbitmq_auth_mechanism_ssl enabled, and \
             does a user named after the certificate (ssl_cert_login_from) exist with access to the vhost?"
                .into()
        }
        Problem::LoginRefused => {
            "the broker refused the login; check the user, password and vhost in amqp.url".into()
        }
        Problem::Other if cfg.url.expose().starts_with("amqps://") => {
            "the connection failed".into()
        }
        Problem::Other => format!("the connection failed; {START_HINT}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AmqpUrl;

    fn attempt(tls: bool, io_kind: Option<io::ErrorKind>, text: &str) -> Attempt {
        Attempt {
            tls,
            io_kind,
            text: text.into(),
        }
    }

    /// lapin recovers nothing by itself: a lost session is ours to end.
    #[test]
    fn lapin_does_not_recover_connections_behind_our_back() {
        let props = format!("{:?}", connection_properties("imattr run q pid 1"));
        assert!(props.contains("auto_recover: false"), "{props}");
        // No reconnect of the TCP stream either.
        assert!(props.contains("max_times: Some(0)"), "{props}");
    }

    #[test]
    fn classify_table() {
        use io::ErrorKind as K;
        use Problem as P;
        let cases: &[(bool, Option<K>, &str, P)] = &[
            (false, Some(K::ConnectionRefused), "IO error: Connection refused (os error 111)", P::Refused),
            (true, Some(K::ConnectionRefused), "IO error: Connection refused (os error 111)", P::Refused),
            (true, Some(K::InvalidData), "IO error: invalid peer certificate: UnknownIssuer", P::UntrustedCertificate),
            (
                true,
                Some(K::InvalidData),
                "IO error: invalid peer certificate: certificate not valid for name \"127.0.0.2\"; certificate is only valid for DnsName(\"localhost\") or 127.0.0.1",
                P::NameMismatch,
            ),
            (true, Some(K::InvalidData), "IO error: invalid peer certificate: NotValidForName", P::NameMismatch),
            (
                true,
                Some(K::InvalidData),
                "IO error: invalid peer certificate: certificate expired: verification time 1800000000 (UNIX), but certificate is not valid after 1700000000 (100000000 seconds ago)",
                P::Expired,
            ),
            (true, Some(K::InvalidData), "IO error: invalid peer certificate: Expired", P::Expired),
            (
                true,
                Some(K::InvalidData),
                "IO error: invalid peer certificate: certificate not valid yet: verification time 1 (UNIX), but certificate is not valid before 2 (1 seconds in future)",
                P::NotValidYet,
            ),
            (true, Some(K::InvalidData), "IO error: invalid peer certificate: BadSignature", P::BadCertificate),
            (true, Some(K::InvalidData), "IO error: received fatal alert: CertificateRequired", P::ClientCertificateRefused),
            (true, Some(K::InvalidData), "IO error: received fatal alert: UnknownCA", P::ClientCertificateRefused),
            (true, Some(K::InvalidData), "IO error: received fatal alert: BadCertificate", P::ClientCertificateRefused),
            (true, Some(K::InvalidData), "IO error: received fatal alert: HandshakeFailure", P::ClientCertificateRefused),
            (true, Some(K::InvalidData), "IO error: received corrupt message of type InvalidContentType", P::TlsToPlainPort),
            (true, Some(K::InvalidData), "IO error: keys may not be consistent: KeyMismatch", P::KeyMismatch),
            (false, None, "failed to parse: parse error", P::PlainToTlsPort),
            (false, Some(K::UnexpectedEof), "IO error: failed to fill whole buffer", P::PlainToTlsPort),
            (true, Some(K::UnexpectedEof), "IO error: unexpected end of file", P::DroppedAfterHandshake),
            (false, None, "protocol error: ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN", P::LoginRefused),
            (true, None, "protocol error: ACCESS_REFUSED - EXTERNAL login refused: user 'x' - invalid credentials", P::LoginRefused),
            (false, None, "protocol error: NOT_ALLOWED - vhost nope not found", P::LoginRefused),
            (false, Some(K::TimedOut), "IO error: connection timed out", P::Other),
            (false, Some(K::Other), "IO error: failed to lookup address information: Name or service not known", P::UnknownHost),
            (true, Some(K::Other), "IO error: failed to lookup address information: Temporary failure in name resolution", P::UnknownHost),
            (false, Some(K::ConnectionReset), "IO error: Connection reset by peer (os error 104)", P::PlainToTlsPort),
            (true, Some(K::ConnectionReset), "IO error: Connection reset by peer (os error 104)", P::DroppedAfterHandshake),
            // A TLS alert's text on a plain connection is not a certificate problem.
            (false, Some(K::InvalidData), "IO error: received fatal alert: UnknownCA", P::Other),
        ];
        for (tls, kind, text, want) in cases {
            assert_eq!(classify(&attempt(*tls, *kind, text)), *want, "{text}");
        }
    }

    #[test]
    fn descriptions_name_the_cause_not_the_start_hint() {
        let mut cfg = AmqpConfig {
            url: AmqpUrl::new("amqps://u:p@h:5671/%2f"),
            tls_ca_file: "/etc/imattr/ca.pem".into(),
            ..AmqpConfig::default()
        };
        assert_eq!(
            describe(Problem::UntrustedCertificate, &cfg),
            "the broker's certificate is not signed by a CA in amqp.tls_ca_file (/etc/imattr/ca.pem)"
        );
        for p in [
            Problem::UnknownHost,
            Problem::UntrustedCertificate,
            Problem::NameMismatch,
            Problem::Expired,
            Problem::NotValidYet,
            Problem::BadCertificate,
            Problem::KeyMismatch,
            Problem::ClientCertificateRefused,
            Problem::DroppedAfterHandshake,
            Problem::TlsToPlainPort,
            Problem::PlainToTlsPort,
            Problem::LoginRefused,
            Problem::Other,
        ] {
            let d = describe(p, &cfg);
            assert!(!d.contains("RabbitMQ running"), "{p:?}: {d}");
            assert!(!d.contains('\n'), "{p:?}: {d}");
        }
        assert!(describe(Problem::Refused, &cfg).contains("rabbitmq-server -detached"));
        assert!(
            describe(Problem::ClientCertificateRefused, &cfg).contains("set amqp.tls_cert_file")
        );
        cfg.tls_cert_file = "/etc/imattr/client.pem".into();
        assert!(
            describe(Problem::ClientCertificateRefused, &cfg).contains("/etc/imattr/client.pem")
        );
        assert!(describe(Problem::DroppedAfterHandshake, &cfg).contains(
            "refused the client certificate amqp.tls_cert_file (/etc/imattr/client.pem)"
        ));
        cfg.tls_ca_file.clear();
        assert!(describe(Problem::UntrustedCertificate, &cfg)
            .contains("a CA the system trusts; set amqp.tls_ca_file"));
        cfg.auth_mechanism = AuthMechanism::External;
        assert!(describe(Problem::LoginRefused, &cfg).contains("EXTERNAL"));
    }

    #[test]
    fn tls_files_are_checked_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = |n: &str| dir.path().join(n).display().to_string();
        std::fs::write(path("empty.pem"), "").unwrap();
        std::fs::write(
            path("key.pem"),
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let mut cfg = AmqpConfig {
            tls_ca_file: path("missing.pem"),
            ..AmqpConfig::default()
        };
        let err = tls_config(&cfg).unwrap_err().to_string();
        assert!(
            err.contains("amqp.tls_ca_file")
                && err.contains("missing.pem")
                && err.contains("cannot be read"),
            "{err}"
        );
        cfg.tls_ca_file = path("empty.pem");
        let err = tls_config(&cfg).unwrap_err().to_string();
        assert!(
            err.contains("amqp.tls_ca_file") && err.contains("no PEM certificate"),
            "{err}"
        );
        cfg.tls_ca_file.clear();
        cfg.tls_cert_file = path("key.pem");
        cfg.tls_key_file = path("key.pem");
        let err = tls_config(&cfg).unwrap_err().to_string();
        assert!(
            err.contains("amqp.tls_cert_file") && err.contains("key.pem"),
            "{err}"
        );
        assert_eq!(
            tls_config(&AmqpConfig::default()).unwrap(),
            OwnedTLSConfig::default()
        );
    }
}
