//! `imattr sig`: print a UserSig made from the configured secret key.

use std::io::Write;

use crate::config::{Config, ConfigError};

pub(crate) fn run(config: &Config, identifier: Option<String>) -> anyhow::Result<()> {
    let t = &config.tencent;
    if t.sdkappid == 0 {
        return Err(ConfigError::Invalid {
            field: "tencent.sdkappid",
            message: "must be set to the app's SDKAppID (non-zero)".into(),
        }
        .into());
    }
    if t.secret_key.is_empty() {
        return Err(ConfigError::Invalid {
            field: "tencent.secret_key",
            message: "is needed to generate a UserSig".into(),
        }
        .into());
    }
    let signer = crate::tencent::Signer::from_config(t);
    let sig = match identifier {
        Some(id) => signer.usersig_for(&id).unwrap_or_default(),
        None => signer.usersig(),
    };
    writeln!(crate::cli::stdout(), "{sig}")?;
    Ok(())
}
