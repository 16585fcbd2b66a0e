//! `imattr config`: the effective configuration, secrets redacted, and where
//! it came from; `--check` only checks it.

use std::io::Write;
use std::path::PathBuf;

use crate::config::Config;

pub(crate) fn run(config: &Config, file: Option<PathBuf>, check: bool) -> anyhow::Result<()> {
    let from = match &file {
        Some(f) => format!("file {}", f.display()),
        None => format!(
            "no file (neither --config nor IMATTR_CONFIG, and no ./{})",
            crate::config::DEFAULT_CONFIG_PATH
        ),
    };
    let vars = crate::config::config_env_vars();
    let env = if vars.is_empty() {
        "no IMATTR_* variable".to_string()
    } else {
        vars.join(", ")
    };
    let mut out = crate::cli::stdout();
    if check {
        // Everything `imattr run` checks before it connects.
        config.validate_api()?;
        writeln!(out, "configuration OK: {from}; environment: {env}")?;
        return Ok(());
    }
    writeln!(out, "# loaded from {from}")?;
    writeln!(out, "# environment: {env}")?;
    write!(out, "{}", config.to_redacted_toml())?;
    out.flush()?;
    Ok(())
}
