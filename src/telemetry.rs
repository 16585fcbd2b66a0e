//! Logging setup: `log.format` text or JSON, `log.level` unless `RUST_LOG` is
//! set; colours only for a terminal, and never with `NO_COLOR`.

use std::ffi::OsString;
use std::io::IsTerminal;

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
        .with_ansi(colours(
            std::io::stderr().is_terminal(),
            std::env::var_os("NO_COLOR"),
        ))
        .with_target(false);
    let _ = if log.format == LogFormat::Json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}

/// Whether text logs carry ANSI colours: only on a terminal (not the journal,
/// a file or a pipe), and not when `NO_COLOR` is set to anything but the
/// empty string (no-color.org).
pub fn colours(stderr_is_terminal: bool, no_color: Option<OsString>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// The texts of `e`'s sources, each after ": " (what `{e}` leaves out): the
/// cause an operator needs is often only there.
pub(crate) fn sources(e: &dyn std::error::Error) -> String {
    let mut text = String::new();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_only_on_a_terminal_without_no_color() {
        let cases: &[(bool, Option<&str>, bool)] = &[
            (true, None, true),
            (true, Some(""), true),
            (true, Some("1"), false),
            (true, Some("0"), false),
            (false, None, false),
            (false, Some("1"), false),
            (false, Some(""), false),
        ];
        for (terminal, no_color, want) in cases {
            assert_eq!(
                colours(*terminal, no_color.map(OsString::from)),
                *want,
                "{terminal} {no_color:?}"
            );
        }
    }
}
