//! Loading the layers (defaults, TOML file, environment) with figment, and
//! rendering figment's errors without echoing values.

use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};

use super::{Config, ConfigError};

/// Where the default config file lives, relative to the working directory.
pub(crate) const DEFAULT_CONFIG_PATH: &str = "config/imattr.toml";

/// The keys whose environment variables are taken byte for byte, never
/// parsed as TOML-like values: a secret of digits must stay a string (and
/// `"…"` quotes would become part of it), and a URL's password may hold
/// anything.
pub(crate) const RAW_ENV_KEYS: [(&str, &str); 5] = [
    ("tencent", "secret_key"),
    ("tencent", "usersig"),
    ("amqp", "url"),
    ("console", "token"),
    ("console", "password_hash"),
];

/// The environment variable of `section.key`.
pub(crate) fn env_var_name(section: &str, key: &str) -> String {
    format!(
        "IMATTR_{}__{}",
        section.to_ascii_uppercase(),
        key.to_ascii_uppercase()
    )
}

/// The configuration file the layers would read for `path` (`--config`):
/// that one, else `IMATTR_CONFIG`, else `./config/imattr.toml` when it
/// exists; None: no file (defaults and environment only).
pub fn config_file(path: Option<&Path>) -> Option<PathBuf> {
    match path {
        Some(p) => Some(p.to_path_buf()),
        None => match std::env::var_os("IMATTR_CONFIG") {
            Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
            _ => {
                let p = PathBuf::from(DEFAULT_CONFIG_PATH);
                p.exists().then_some(p)
            }
        },
    }
}

/// The `IMATTR_*` variables that set configuration keys, by name, sorted
/// (never their values).
pub fn config_env_vars() -> Vec<String> {
    let mut names: Vec<String> = std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .filter(|k| {
            k.len() > "IMATTR_".len()
                && k[.."IMATTR_".len()].eq_ignore_ascii_case("IMATTR_")
                && !k.eq_ignore_ascii_case("IMATTR_CONFIG")
        })
        .collect();
    names.sort();
    names
}

impl Config {
    /// Loads the layers: defaults, then `path` (or `IMATTR_CONFIG`, or
    /// `./config/imattr.toml` when it exists), then the environment. Validates
    /// everything but the API credentials (see `Config::validate_api`).
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let file = config_file(path);
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
        let raw: Vec<String> = RAW_ENV_KEYS
            .iter()
            .map(|(section, key)| format!("{section}.{key}"))
            .collect();
        let mut ignored: Vec<&str> = raw.iter().map(String::as_str).collect();
        ignored.push("config");
        figment = figment
            // `ignore` after `split`: it compares the dotted keys.
            .merge(Env::prefixed("IMATTR_").split("__").ignore(&ignored))
            .merge(RawEnv);
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

/// The variables of [`RAW_ENV_KEYS`], each value a string as it is.
struct RawEnv;

impl Provider for RawEnv {
    fn metadata(&self) -> Metadata {
        Metadata::named("environment variable(s)").interpolater(|_: &Profile, keys: &[&str]| {
            match keys {
                [section, key, ..] => env_var_name(section, key),
                _ => keys.join("."),
            }
        })
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut dict = Dict::new();
        for (section, key) in RAW_ENV_KEYS {
            let name = env_var_name(section, key);
            // Any case, as the other variables (figment's `Env` ignores case).
            let value = std::env::vars_os().find_map(|(k, v)| {
                k.to_str()
                    .is_some_and(|k| k.eq_ignore_ascii_case(&name))
                    .then(|| v.to_string_lossy().into_owned())
            });
            if let Some(value) = value {
                let table = dict
                    .entry(section.to_string())
                    .or_insert_with(|| Value::from(Dict::new()));
                if let Value::Dict(_, table) = table {
                    table.insert(key.to_string(), Value::from(value));
                }
            }
        }
        Ok(Profile::Default.collect(dict))
    }
}

/// A parser's message without the lines that quote the input (the TOML
/// parser shows the offending line, which may hold a secret, as `N | …`).
fn without_source_lines(message: &str) -> String {
    message
        .lines()
        .filter(|l| {
            let t = l
                .trim_start()
                .trim_start_matches(|c: char| c.is_ascii_digit());
            !t.trim_start().starts_with('|')
        })
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(": ")
}

/// What kind of value figment found, without the value.
fn kind_of(actual: &figment::error::Actual) -> &'static str {
    use figment::error::Actual;
    match actual {
        Actual::Bool(_) => "a boolean",
        Actual::Unsigned(_) | Actual::Signed(_) => "an integer",
        Actual::Float(_) => "a number with a fraction",
        Actual::Char(_) | Actual::Str(_) => "a string",
        Actual::Bytes(_) => "bytes",
        Actual::Unit | Actual::Option => "nothing",
        Actual::Seq => "a list",
        Actual::Map => "a table",
        _ => "another kind of value",
    }
}

/// serde's name of an expected type, in words.
fn expected_words(expected: &str) -> String {
    match expected {
        "u8" | "u16" | "u32" | "u64" | "u128" | "usize" => "a whole number".into(),
        "i8" | "i16" | "i32" | "i64" | "i128" | "isize" => "an integer".into(),
        "f32" | "f64" => "a number".into(),
        "a boolean" | "bool" => "true or false".into(),
        other => other.to_string(),
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
        // Never echo the value: it might be a secret. A key with a documented
        // range says that range, in the words of its validation.
        Kind::InvalidType(actual, expected) | Kind::InvalidValue(actual, expected) => {
            match key.as_deref().and_then(super::validate::accepted) {
                Some(range) => format!("{range} (found {})", kind_of(actual)),
                None => format!(
                    "has the wrong type: found {}, expected {}",
                    kind_of(actual),
                    expected_words(expected)
                ),
            }
        }
        Kind::InvalidLength(_, expected) => format!("has the wrong length, expected {expected}"),
        Kind::MissingField(f) => format!("is missing field `{f}`"),
        // Only the keys with a fixed set of values (never secrets) get here.
        Kind::UnknownVariant(actual, expected) => {
            format!("must be one of {} (got {actual:?})", expected.join(", "))
        }
        Kind::DuplicateField(f) => format!("sets `{f}` twice"),
        // Our own types' messages (they name no value), or kinds that carry
        // one: fail closed.
        Kind::Message(m) => without_source_lines(m),
        _ => "has a value of a kind the configuration does not take".to_string(),
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
