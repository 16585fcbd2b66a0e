//! Configuration: built-in defaults, then a TOML file, then
//! `IMATTR_<SECTION>__<KEY>` environment variables. Unknown keys are errors.
//! `Config::to_env` writes a configuration back as those variables.

mod env;
mod load;
mod model;
#[cfg(test)]
mod redaction_tests;
mod secret;
mod validate;

pub use load::config_file;
pub(crate) use load::{config_env_vars, DEFAULT_CONFIG_PATH};
pub use model::*;
pub use secret::{AmqpUrl, Secret};
pub(crate) use validate::check_amqp_url;
pub use validate::API_BACKEND_TIMEOUT_MS;

/// A configuration error; `imattr` exits with status 2 on any of them.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The layers could not be read or merged (unknown key, wrong type, bad TOML).
    #[error("{0}")]
    Load(String),
    /// A value is out of its allowed range.
    #[error("invalid configuration: {field}: {message}")]
    Invalid {
        /// The dotted key, e.g. `batch.max_accounts`.
        field: &'static str,
        /// What is wrong and what is allowed.
        message: String,
    },
}

impl ConfigError {
    pub(crate) fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            field,
            message: message.into(),
        }
    }
}
