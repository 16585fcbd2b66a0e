//! Logging setup: `log.format` text or JSON, `log.level` unless `RUST_LOG` is set.

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber (once; later calls do nothing). Logs go to stderr.
pub fn init(log: &LogConfig) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        // lapin and the broker TLS verifier log connection errors themselves at
        // ERROR; imattr reports them once, with advice (amqp::connect), so they
        // are quiet unless RUST_LOG asks for them.
        .unwrap_or_else(|| {
            EnvFilter::new(format!(
                "{},lapin=off,rustls_platform_verifier=off",
                log.level
            ))
        });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = if log.format == LogFormat::Json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}
