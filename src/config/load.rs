//! Loading the layers (defaults, TOML file, environment) with figment, and
//! rendering figment's errors without echoing values.

use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Toml};
use figment::Figment;

use super::{Config, ConfigError};

/// Where the default config file lives, relative to the working directory.
pub(crate) const DEFAULT_CONFIG_PATH: &str = "config/imattr.toml";

impl Config {
    /// Loads the layers: defaults, then `path` (or `IMATTR_CONFIG`, or
    /// `./config/imattr.toml` when it exists), then the environment. Validates
    /// everything but the API credentials (see `Config::validate_api`).
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let file: Option<PathBuf> = match path {
            Some(p) => Some(p.to_path_buf()),
            None => match std::env::var_os("IMATTR_CONFIG") {
                Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
                _ => {
                    let p = PathBuf::from(DEFAULT_CONFIG_PATH);
                    p.exists().then_some(p)
                }
            },
        };
        // Defaults come from `#[serde(default)]`, not from a serialised
        // provider: serialising would redact the secrets they carry.
        let mut figment = Figment::new();
        if let Some(file) = &file {
            if !file.exists() {
                return Err(ConfigError::Load(format!(
                    "config file {} does not exist",
                    file.display()
                )));
            }
            figment = figment.merge(Toml::file(file));
        }
        figment = figment.merge(Env::prefixed("IMATTR_").ignore(&["config"]).split("__"));
        Self::from_figment(figment)
    }

    /// Extracts and validates a configuration from any figment (used by tests).
    pub(crate) fn from_figment(figment: Figment) -> Result<Config, ConfigError> {
        let config: Config = figment.extract().map_err(|e| {
            // figment's errors name the key and the source; never echo values.
            let msgs: Vec<String> = e.into_iter().map(|e| describe_figment_error(&e)).collect();
            ConfigError::Load(format!("invalid configuration: {}", msgs.join("; ")))
        })?;
        config.validate()?;
        Ok(config)
    }

    /// The effective configuration as TOML, secrets redacted.
    pub(crate) fn to_redacted_toml(&self) -> String {
        toml_string(self)
    }
}

fn toml_string(c: &Config) -> String {
    toml::to_string_pretty(c).unwrap_or_else(|e| format!("# cannot print the configuration: {e}\n"))
}

fn describe_figment_error(e: &figment::Error) -> String {
    use figment::error::Kind;
    let key = if e.path.is_empty() {
        None
    } else {
        Some(e.path.join("."))
    };
    let source = e
        .metadata
        .as_ref()
        .map(|m| match &m.source {
            Some(s) => format!(" (from {} {s})", m.name),
            None => format!(" (from {})", m.name),
        })
        .unwrap_or_default();
    let what = match &e.kind {
        Kind::UnknownField(field, expected) => {
            // figment's path already ends with the unknown field.
            let full = match &key {
                Some(k) if k == field || k.ends_with(&format!(".{field}")) => k.clone(),
                Some(k) => format!("{k}.{field}"),
                None => field.clone(),
            };
            return format!(
                "unknown key `{full}`{source}; expected one of: {}",
                expected.join(", ")
            );
        }
        // Do not echo the value: it might be a secret.
        Kind::InvalidType(actual, expected) => {
            format!("has the wrong type: found {actual}, expected {expected}")
        }
        Kind::InvalidValue(_, expected) => format!("has an invalid value, expected {expected}"),
        Kind::MissingField(f) => format!("is missing field `{f}`"),
        // Only the keys with a fixed set of values (never secrets) get here.
        Kind::UnknownVariant(actual, expected) => {
            format!("must be one of {} (got {actual:?})", expected.join(", "))
        }
        other => other.to_string(),
    };
    match key {
        Some(k) => format!("key `{k}` {what}{source}"),
        None => format!("{what}{source}"),
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    fn load_in_jail() -> Result<Config, ConfigError> {
        Config::load(None)
    }

    #[test]
    fn file_then_env_later_wins() {
        Jail::expect_with(|jail| {
            jail.create_dir("config")?;
            jail.create_file(
                "config/imattr.toml",
                "[batch]\nmax_accounts = 50\nmax_wait_ms = 10\n[tencent]\nregion = \"tokyo\"\n",
            )?;
            let c = load_in_jail().unwrap();
            assert_eq!(c.batch.max_accounts, 50);
            assert_eq!(c.batch.max_wait_ms, 10);
            assert_eq!(c.api_base_url(), "https://adminapijpn.im.qcloud.com");
            jail.set_env("IMATTR_BATCH__MAX_ACCOUNTS", "20");
            jail.set_env("IMATTR_TENCENT__SECRET_KEY", "abc");
            let c = load_in_jail().unwrap();
            assert_eq!(c.batch.max_accounts, 20);
            assert_eq!(c.batch.max_wait_ms, 10);
            assert_eq!(c.tencent.secret_key.expose(), "abc");
            Ok(())
        });
    }

    #[test]
    fn explicit_path_and_imattr_config_env() {
        Jail::expect_with(|jail| {
            jail.create_file("other.toml", "[batch]\nmax_wait_ms = 7\n")?;
            jail.set_env("IMATTR_CONFIG", "other.toml");
            assert_eq!(load_in_jail().unwrap().batch.max_wait_ms, 7);
            jail.create_file("third.toml", "[batch]\nmax_wait_ms = 9\n")?;
            let c = Config::load(Some(Path::new("third.toml"))).unwrap();
            assert_eq!(c.batch.max_wait_ms, 9);
            let err = Config::load(Some(Path::new("missing.toml"))).unwrap_err();
            assert!(err.to_string().contains("missing.toml"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn unknown_key_is_named() {
        Jail::expect_with(|jail| {
            jail.create_dir("config")?;
            jail.create_file("config/imattr.toml", "[batch]\nmax_acounts = 50\n")?;
            let err = load_in_jail().unwrap_err().to_string();
            assert!(err.contains("unknown key `batch.max_acounts`"), "{err}");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env("IMATTR_TENCENT__SECRETKEY", "x");
            let err = load_in_jail().unwrap_err().to_string();
            assert!(err.contains("unknown key `tencent.secretkey`"), "{err}");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.create_dir("config")?;
            jail.create_file("config/imattr.toml", "[bogus]\nx = 1\n")?;
            let err = load_in_jail().unwrap_err().to_string();
            assert!(err.contains("bogus"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn default_url_keeps_its_password() {
        Jail::expect_with(|_| {
            let c = load_in_jail().unwrap();
            assert_eq!(c.amqp.url.expose(), "amqp://guest:guest@127.0.0.1:5672/%2f");
            Ok(())
        });
    }

    #[test]
    fn the_sample_file_holds_every_key_at_its_default() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/imattr.toml");
        let c = Config::from_figment(Figment::from(Toml::file(path))).unwrap();
        assert_eq!(c, Config::default());
        let sample: toml::Table = std::fs::read_to_string(path).unwrap().parse().unwrap();
        let printed: toml::Table = Config::default().to_redacted_toml().parse().unwrap();
        let keys = |t: &toml::Table| -> Vec<String> {
            t.iter()
                .flat_map(|(s, v)| {
                    let keys: Vec<String> = v
                        .as_table()
                        .map_or(vec![], |t| t.keys().map(|k| format!("{s}.{k}")).collect());
                    keys
                })
                .collect()
        };
        assert_eq!(keys(&sample), keys(&printed));
    }
}
