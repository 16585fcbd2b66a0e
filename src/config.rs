//! Configuration (CONTRACT §9): built-in defaults, then a TOML file, then
//! `IMATTR_<SECTION>__<KEY>` environment variables. Unknown keys are errors.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize, Serializer};

/// Where the default config file lives, relative to the working directory.
pub const DEFAULT_CONFIG_PATH: &str = "config/imattr.toml";

/// Regions of CONTRACT §1 and their API domains.
pub const REGIONS: &[(&str, &str)] = &[
    ("china", "console.tim.qq.com"),
    ("singapore", "adminapisgp.im.qcloud.com"),
    ("seoul", "adminapikr.im.qcloud.com"),
    ("frankfurt", "adminapiger.im.qcloud.com"),
    ("silicon-valley", "adminapiusa.im.qcloud.com"),
    ("jakarta", "adminapiidn.im.qcloud.com"),
    ("tokyo", "adminapijpn.im.qcloud.com"),
    ("mumbai", "adminapiind.im.qcloud.com"),
];

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
    fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            field,
            message: message.into(),
        }
    }
}

/// A secret string: never shown by `Debug`, `Display` or `Serialize`.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret itself; only for the code that must use it.
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// Whether no secret is set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("\"\"")
        } else {
            f.write_str("\"<redacted>\"")
        }
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0.is_empty() {
            s.serialize_str("")
        } else {
            s.serialize_str("<redacted>")
        }
    }
}

/// The AMQP URL: its password is never shown by `Debug`, `Display` or `Serialize`.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct AmqpUrl(String);

impl AmqpUrl {
    /// Wraps a URL.
    pub fn new(s: impl Into<String>) -> Self {
        AmqpUrl(s.into())
    }
    /// The URL with its password, for connecting only.
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// The URL with any password replaced by `***`.
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }
}

impl fmt::Debug for AmqpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl fmt::Display for AmqpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Serialize for AmqpUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.redacted())
    }
}

/// Replaces the password in `scheme://user:password@host…` with `***`.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme_end + 3],
                    &userinfo[..colon],
                    &rest[at..]
                ),
                None => url.to_string(),
            }
        }
        None => url.to_string(),
    }
}

/// The whole configuration.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// RabbitMQ connection and topology.
    pub amqp: AmqpConfig,
    /// The Tencent Cloud Chat REST API.
    pub tencent: TencentConfig,
    /// Batch forming.
    pub batch: BatchConfig,
    /// Retries of transient failures.
    pub retry: RetryConfig,
    /// Attribute names and value limits.
    pub attributes: AttributesConfig,
    /// The admin HTTP endpoint.
    pub admin: AdminConfig,
    /// Logging.
    pub log: LogConfig,
    /// Graceful shutdown.
    pub shutdown: ShutdownConfig,
}

/// `[amqp]`
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpConfig {
    /// Broker URL, `amqp://` or `amqps://`; the password is redacted everywhere.
    pub url: AmqpUrl,
    /// Exchange publishers send updates to (fanout, durable).
    pub exchange: String,
    /// Queue the worker consumes.
    pub queue: String,
    /// Exchange dead-lettered messages go to (fanout, durable).
    pub dead_letter_exchange: String,
    /// Queue holding dead-lettered messages.
    pub dead_letter_queue: String,
    /// `classic` or `quorum`.
    pub queue_type: String,
    /// Unacknowledged deliveries the worker may hold (basic.qos prefetch count).
    pub prefetch: u16,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        AmqpConfig {
            url: AmqpUrl::new("amqp://guest:guest@127.0.0.1:5672/%2f"),
            exchange: "imattr.updates".into(),
            queue: "imattr.updates".into(),
            dead_letter_exchange: "imattr.dead".into(),
            dead_letter_queue: "imattr.dead".into(),
            queue_type: "classic".into(),
            prefetch: 1000,
        }
    }
}

/// `[tencent]`
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TencentConfig {
    /// Region whose API domain is used (see CONTRACT §1).
    pub region: String,
    /// Overrides `region`, e.g. `http://127.0.0.1:18080`; empty: use the region.
    pub base_url: String,
    /// Plain http is refused for non-loopback hosts unless this is true.
    pub allow_insecure_http: bool,
    /// The app's SDKAppID.
    pub sdkappid: u64,
    /// The app administrator account that signs requests.
    pub identifier: String,
    /// Secret key used to generate UserSigs (TLSSigAPIv2).
    pub secret_key: Secret,
    /// A fixed UserSig, the alternative to `secret_key`.
    pub usersig: Secret,
    /// Lifetime of generated UserSigs, in seconds.
    pub usersig_ttl_secs: u64,
    /// HTTP timeout per request, in milliseconds (the backend's own is 3 s).
    pub timeout_ms: u64,
    /// Request rate ceiling, requests per second.
    pub rate_limit_per_sec: u32,
    /// Requests in flight at once.
    pub max_in_flight: usize,
}

impl Default for TencentConfig {
    fn default() -> Self {
        TencentConfig {
            region: "china".into(),
            base_url: String::new(),
            allow_insecure_http: false,
            sdkappid: 0,
            identifier: "administrator".into(),
            secret_key: Secret::default(),
            usersig: Secret::default(),
            usersig_ttl_secs: 86400,
            timeout_ms: 5000,
            rate_limit_per_sec: 100,
            max_in_flight: 8,
        }
    }
}

/// `[batch]`
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// Distinct accounts per request, 1 to 100.
    pub max_accounts: usize,
    /// Longest time the oldest pending update waits before its batch goes out, in milliseconds.
    pub max_wait_ms: u64,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_accounts: 100,
            max_wait_ms: 200,
        }
    }
}

/// `[retry]`
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// First backoff interval, in milliseconds.
    pub initial_interval_ms: u64,
    /// Factor applied to the interval after each attempt (≥ 1).
    pub multiplier: f64,
    /// Longest backoff interval, in milliseconds.
    pub max_interval_ms: u64,
    /// Jitter: each interval is randomised by ± this fraction (0 to 1).
    pub randomization_factor: f64,
    /// Give up on a transient failure after this long, in seconds; 0 retries forever.
    pub max_elapsed_secs: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            initial_interval_ms: 200,
            multiplier: 2.0,
            max_interval_ms: 30000,
            randomization_factor: 0.5,
            max_elapsed_secs: 600,
        }
    }
}

impl RetryConfig {
    /// The `backoff` crate's policy for these settings.
    pub fn backoff(&self) -> backoff::ExponentialBackoff {
        backoff::ExponentialBackoff {
            current_interval: Duration::from_millis(self.initial_interval_ms),
            initial_interval: Duration::from_millis(self.initial_interval_ms),
            randomization_factor: self.randomization_factor,
            multiplier: self.multiplier,
            max_interval: Duration::from_millis(self.max_interval_ms),
            max_elapsed_time: (self.max_elapsed_secs > 0)
                .then(|| Duration::from_secs(self.max_elapsed_secs)),
            ..backoff::ExponentialBackoff::default()
        }
    }
}

/// `[attributes]`
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AttributesConfig {
    /// The app's attribute names; empty: ask the API (`im_get_attr_name`).
    pub allowed: Vec<String>,
    /// Longest attribute value, in bytes.
    pub max_value_bytes: usize,
}

impl Default for AttributesConfig {
    fn default() -> Self {
        AttributesConfig {
            allowed: Vec::new(),
            max_value_bytes: 50,
        }
    }
}

/// `[admin]`
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address of the admin endpoint (`/healthz`, `/readyz`, `/metrics`); empty turns it off.
    pub listen: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: "127.0.0.1:9464".into(),
        }
    }
}

/// `[log]`
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: String,
    /// A tracing filter such as `info` or `imattr=debug`; `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: "text".into(),
            level: "info".into(),
        }
    }
}

/// `[shutdown]`
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// Longest time to flush and settle pending messages on SIGTERM, in seconds.
    pub timeout_secs: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig { timeout_secs: 30 }
    }
}

impl Config {
    /// Loads the layers: defaults, then `path` (or `IMATTR_CONFIG`, or
    /// `./config/imattr.toml` when it exists), then the environment. Validates
    /// everything but the API credentials (see [`Config::validate_api`]).
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
    pub fn from_figment(figment: Figment) -> Result<Config, ConfigError> {
        let config: Config = figment.extract().map_err(|e| {
            // figment's errors name the key and the source; never echo values.
            let msgs: Vec<String> = e.into_iter().map(|e| describe_figment_error(&e)).collect();
            ConfigError::Load(format!("invalid configuration: {}", msgs.join("; ")))
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every range CONTRACT §9 and the issues name.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let a = &self.amqp;
        let url = a.url.expose();
        if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
            return Err(ConfigError::invalid(
                "amqp.url",
                format!("must start with amqp:// or amqps:// (got {})", a.url),
            ));
        }
        for (field, v) in [
            ("amqp.exchange", &a.exchange),
            ("amqp.queue", &a.queue),
            ("amqp.dead_letter_exchange", &a.dead_letter_exchange),
            ("amqp.dead_letter_queue", &a.dead_letter_queue),
        ] {
            if v.is_empty() || v.len() > 255 {
                return Err(ConfigError::invalid(
                    field,
                    "must be a name of 1 to 255 bytes",
                ));
            }
        }
        if a.queue == a.dead_letter_queue {
            return Err(ConfigError::invalid(
                "amqp.dead_letter_queue",
                "must differ from amqp.queue",
            ));
        }
        if a.queue_type != "classic" && a.queue_type != "quorum" {
            return Err(ConfigError::invalid(
                "amqp.queue_type",
                format!("must be \"classic\" or \"quorum\" (got {:?})", a.queue_type),
            ));
        }
        if a.prefetch == 0 {
            return Err(ConfigError::invalid("amqp.prefetch", "must be 1 to 65535"));
        }
        let t = &self.tencent;
        if t.base_url.is_empty() {
            if !REGIONS.iter().any(|(r, _)| *r == t.region) {
                let names: Vec<&str> = REGIONS.iter().map(|(r, _)| *r).collect();
                return Err(ConfigError::invalid(
                    "tencent.region",
                    format!("must be one of {} (got {:?})", names.join(", "), t.region),
                ));
            }
        } else {
            let parsed = url::Url::parse(&t.base_url).map_err(|e| {
                ConfigError::invalid(
                    "tencent.base_url",
                    format!("is not a valid URL ({e}); expected e.g. http://127.0.0.1:18080"),
                )
            })?;
            match parsed.scheme() {
                "https" => {}
                "http" => {
                    let loopback = match parsed.host() {
                        Some(url::Host::Domain(d)) => d == "localhost",
                        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
                        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
                        None => false,
                    };
                    if !loopback && !t.allow_insecure_http {
                        return Err(ConfigError::invalid(
                            "tencent.base_url",
                            "must be https unless its host is loopback (set tencent.allow_insecure_http = true to override)",
                        ));
                    }
                }
                other => {
                    return Err(ConfigError::invalid(
                        "tencent.base_url",
                        format!("must be an http or https URL (got scheme {other:?})"),
                    ))
                }
            }
        }
        if t.identifier.is_empty() {
            return Err(ConfigError::invalid(
                "tencent.identifier",
                "must not be empty",
            ));
        }
        if t.usersig_ttl_secs < 60 {
            return Err(ConfigError::invalid(
                "tencent.usersig_ttl_secs",
                "must be at least 60",
            ));
        }
        if t.timeout_ms == 0 {
            return Err(ConfigError::invalid(
                "tencent.timeout_ms",
                "must be positive",
            ));
        }
        if t.rate_limit_per_sec == 0 {
            return Err(ConfigError::invalid(
                "tencent.rate_limit_per_sec",
                "must be positive",
            ));
        }
        if t.max_in_flight == 0 || t.max_in_flight > 1024 {
            return Err(ConfigError::invalid(
                "tencent.max_in_flight",
                "must be 1 to 1024",
            ));
        }
        let b = &self.batch;
        if !(1..=100).contains(&b.max_accounts) {
            return Err(ConfigError::invalid(
                "batch.max_accounts",
                format!("must be 1 to 100 (got {})", b.max_accounts),
            ));
        }
        if b.max_wait_ms == 0 {
            return Err(ConfigError::invalid(
                "batch.max_wait_ms",
                "must be positive",
            ));
        }
        let r = &self.retry;
        if r.initial_interval_ms == 0 {
            return Err(ConfigError::invalid(
                "retry.initial_interval_ms",
                "must be positive",
            ));
        }
        if r.max_interval_ms < r.initial_interval_ms {
            return Err(ConfigError::invalid(
                "retry.max_interval_ms",
                "must be at least retry.initial_interval_ms",
            ));
        }
        if !(r.multiplier >= 1.0 && r.multiplier.is_finite()) {
            return Err(ConfigError::invalid("retry.multiplier", "must be ≥ 1"));
        }
        if !(0.0..=1.0).contains(&r.randomization_factor) {
            return Err(ConfigError::invalid(
                "retry.randomization_factor",
                "must be 0 to 1",
            ));
        }
        let at = &self.attributes;
        if at.max_value_bytes == 0 {
            return Err(ConfigError::invalid(
                "attributes.max_value_bytes",
                "must be positive",
            ));
        }
        if at.allowed.len() > 10 {
            return Err(ConfigError::invalid(
                "attributes.allowed",
                "an app has at most 10 attribute names",
            ));
        }
        if let Some(bad) = at.allowed.iter().find(|n| n.is_empty() || n.len() > 50) {
            return Err(ConfigError::invalid(
                "attributes.allowed",
                format!("attribute name {bad:?} must be 1 to 50 bytes"),
            ));
        }
        if !self.admin.listen.is_empty() && self.admin.listen.parse::<SocketAddr>().is_err() {
            return Err(ConfigError::invalid(
                "admin.listen",
                format!(
                    "must be an address such as 127.0.0.1:9464, or \"\" (got {:?})",
                    self.admin.listen
                ),
            ));
        }
        if self.log.format != "text" && self.log.format != "json" {
            return Err(ConfigError::invalid(
                "log.format",
                format!("must be \"text\" or \"json\" (got {:?})", self.log.format),
            ));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(ConfigError::invalid(
                "log.level",
                format!("is not a valid filter (got {:?})", self.log.level),
            ));
        }
        if self.shutdown.timeout_secs == 0 {
            return Err(ConfigError::invalid(
                "shutdown.timeout_secs",
                "must be positive",
            ));
        }
        Ok(())
    }

    /// Checks what commands that call the API need: a sdkappid and exactly one
    /// of `secret_key` / `usersig`.
    pub fn validate_api(&self) -> Result<(), ConfigError> {
        let t = &self.tencent;
        if t.sdkappid == 0 {
            return Err(ConfigError::invalid(
                "tencent.sdkappid",
                "must be set to the app's SDKAppID (non-zero)",
            ));
        }
        match (t.secret_key.is_empty(), t.usersig.is_empty()) {
            (false, false) => Err(ConfigError::invalid(
                "tencent.secret_key",
                "set exactly one of tencent.secret_key and tencent.usersig, not both",
            )),
            (true, true) => Err(ConfigError::invalid(
                "tencent.secret_key",
                "set exactly one of tencent.secret_key and tencent.usersig",
            )),
            _ => Ok(()),
        }
    }

    /// The API's base URL, `https://{domain}` or `tencent.base_url`.
    pub fn api_base_url(&self) -> String {
        if !self.tencent.base_url.is_empty() {
            return self.tencent.base_url.trim_end_matches('/').to_string();
        }
        let domain = REGIONS
            .iter()
            .find(|(r, _)| *r == self.tencent.region)
            .map(|(_, d)| *d)
            .unwrap_or("console.tim.qq.com");
        format!("https://{domain}")
    }

    /// The effective configuration as TOML, secrets redacted.
    pub fn to_redacted_toml(&self) -> String {
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
    fn defaults_match_the_contract() {
        let c = Config::default();
        c.validate().unwrap();
        assert_eq!(c.amqp.exchange, "imattr.updates");
        assert_eq!(c.amqp.dead_letter_queue, "imattr.dead");
        assert_eq!(c.amqp.prefetch, 1000);
        assert_eq!(c.tencent.timeout_ms, 5000);
        assert_eq!(c.batch.max_accounts, 100);
        assert_eq!(c.retry.max_elapsed_secs, 600);
        assert_eq!(c.admin.listen, "127.0.0.1:9464");
        assert_eq!(c.api_base_url(), "https://console.tim.qq.com");
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
    fn each_validation_names_its_field() {
        let cases: &[(&str, &str, &str)] = &[
            ("IMATTR_BATCH__MAX_ACCOUNTS", "101", "max_accounts"),
            ("IMATTR_BATCH__MAX_ACCOUNTS", "0", "max_accounts"),
            ("IMATTR_TENCENT__REGION", "mars", "tencent.region"),
            ("IMATTR_TENCENT__BASE_URL", "not a url", "tencent.base_url"),
            ("IMATTR_TENCENT__BASE_URL", "ftp://x", "tencent.base_url"),
            (
                "IMATTR_TENCENT__BASE_URL",
                "http://example.com",
                "tencent.base_url",
            ),
            ("IMATTR_RETRY__MULTIPLIER", "0.5", "retry.multiplier"),
            (
                "IMATTR_RETRY__INITIAL_INTERVAL_MS",
                "0",
                "retry.initial_interval_ms",
            ),
            ("IMATTR_BATCH__MAX_WAIT_MS", "0", "batch.max_wait_ms"),
            ("IMATTR_TENCENT__TIMEOUT_MS", "0", "tencent.timeout_ms"),
            ("IMATTR_AMQP__QUEUE_TYPE", "stream", "amqp.queue_type"),
            ("IMATTR_AMQP__URL", "http://x", "amqp.url"),
            ("IMATTR_LOG__FORMAT", "xml", "log.format"),
            ("IMATTR_ADMIN__LISTEN", "nowhere", "admin.listen"),
            (
                "IMATTR_RETRY__RANDOMIZATION_FACTOR",
                "2",
                "retry.randomization_factor",
            ),
            ("IMATTR_BATCH__MAX_ACCOUNTS", "many", "batch.max_accounts"),
        ];
        for (key, value, field) in cases {
            Jail::expect_with(|jail| {
                jail.set_env(key, value);
                let err = load_in_jail().unwrap_err().to_string();
                assert!(err.contains(field), "{key}={value}: {err}");
                Ok(())
            });
        }
    }

    #[test]
    fn loopback_http_allowed_and_override() {
        Jail::expect_with(|jail| {
            jail.set_env("IMATTR_TENCENT__BASE_URL", "http://127.0.0.1:18080/");
            let c = load_in_jail().unwrap();
            assert_eq!(c.api_base_url(), "http://127.0.0.1:18080");
            jail.set_env("IMATTR_TENCENT__BASE_URL", "http://api.internal:80");
            jail.set_env("IMATTR_TENCENT__ALLOW_INSECURE_HTTP", "true");
            load_in_jail().unwrap();
            Ok(())
        });
    }

    #[test]
    fn api_credentials() {
        let mut c = Config::default();
        assert!(c
            .validate_api()
            .unwrap_err()
            .to_string()
            .contains("sdkappid"));
        c.tencent.sdkappid = 1400000000;
        assert!(c
            .validate_api()
            .unwrap_err()
            .to_string()
            .contains("secret_key"));
        c.tencent.secret_key = Secret::new("k");
        c.validate_api().unwrap();
        c.tencent.usersig = Secret::new("s");
        assert!(c
            .validate_api()
            .unwrap_err()
            .to_string()
            .contains("not both"));
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
    fn secrets_never_shown() {
        let mut c = Config::default();
        c.tencent.secret_key = Secret::new("TOPSECRETKEY");
        c.tencent.usersig = Secret::new("TOPSECRETSIG");
        c.amqp.url = AmqpUrl::new("amqp://user:TOPSECRETPW@host:5672/%2f");
        let debug = format!("{c:?}");
        let printed = c.to_redacted_toml();
        for s in [&debug, &printed] {
            assert!(!s.contains("TOPSECRET"), "{s}");
        }
        assert!(
            printed.contains("amqp://user:***@host:5672/%2f"),
            "{printed}"
        );
        assert!(printed.contains("secret_key = \"<redacted>\""), "{printed}");
        // A wrong-typed secret in the environment is reported without its value.
        Jail::expect_with(|jail| {
            jail.set_env("IMATTR_TENCENT__USERSIG", "[1,2]");
            let err = load_in_jail().unwrap_err().to_string();
            assert!(err.contains("tencent.usersig"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn redact_url_forms() {
        assert_eq!(redact_url("amqp://a:b@h/%2f"), "amqp://a:***@h/%2f");
        assert_eq!(redact_url("amqp://h:5672"), "amqp://h:5672");
        assert_eq!(redact_url("amqps://u@h"), "amqps://u@h");
        assert_eq!(redact_url("amqp://u:p:q@h"), "amqp://u:***@h");
    }
}
