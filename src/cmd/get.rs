//! `imattr get`: show accounts' attributes with `im_get_attr`.

use std::io::Write;

use crate::config::Config;

pub(crate) async fn run(config: &Config, accounts: &[String]) -> anyhow::Result<()> {
    config.validate_api()?;
    let client = crate::tencent::Client::from_config(config)?;
    let users = client.get_attr(accounts).await?;
    let mut out = crate::cli::stdout();
    for u in users {
        writeln!(out, "{}", serde_json::to_string(&u)?)?;
    }
    Ok(())
}
