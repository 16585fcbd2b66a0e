//! `imattr run`: the daemon, with its admin endpoint, until SIGTERM or SIGINT.

use std::sync::Arc;

use crate::cli::cancel_on_signal;
use crate::config::Config;

pub(crate) async fn run(config: Config) -> anyhow::Result<()> {
    config.validate_api()?;
    let cancel = cancel_on_signal();
    let health = Arc::new(crate::worker::Health::default());
    crate::admin::serve(&config.admin.listen, health.clone(), cancel.clone()).await?;
    crate::worker::run(config, cancel, health).await
}
