//! `imattr run`: the daemon, with its admin endpoint, until SIGTERM or SIGINT.

use std::sync::Arc;

use crate::cli::cancel_on_signal;
use crate::config::{Config, ConfigError};

pub(crate) async fn run(config: Config) -> anyhow::Result<()> {
    config.validate_api()?;
    let cancel = cancel_on_signal();
    let health = Arc::new(crate::worker::Health::default());
    let console = console_router(&config, &health, &cancel)?;
    crate::admin::serve_with(
        &config.admin.listen,
        health.clone(),
        console,
        cancel.clone(),
    )
    .await?;
    crate::worker::run(config, cancel, health).await
}

/// The console's routes when `console.enabled` (it needs the admin endpoint);
/// a configuration error (exit 2) when it may not start.
fn console_router(
    config: &Config,
    health: &Arc<crate::worker::Health>,
    cancel: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<Option<axum::Router>> {
    if !config.console.enabled {
        return Ok(None);
    }
    let Ok(listen) = config.admin.listen.parse() else {
        return Err(ConfigError::invalid(
            "console.enabled",
            "the console is served on admin.listen, which is off (\"\"): set admin.listen",
        )
        .into());
    };
    let console = crate::console::Console::new(config, listen, Some(health.clone()))?;
    console.start_sampling(cancel.clone());
    Ok(Some(console.router()))
}
