//! Range checks: each section checks its own keys, [`Config::validate`] runs them all.

use std::net::SocketAddr;

use super::{
    AdminConfig, AmqpConfig, AttributesConfig, AuthMechanism, BatchConfig, Config, ConfigError,
    ConsoleConfig, LogConfig, RetryConfig, ShutdownConfig, TencentConfig,
};

// Upper bounds keep every `Instant + duration` the daemon computes far from
// overflowing, and are well beyond any sensible setting.
/// The API's backend timeout, in milliseconds: `tencent.timeout_ms` must exceed it.
pub const API_BACKEND_TIMEOUT_MS: u64 = 3000;
const MAX_TIMEOUT_MS: u64 = 300_000;
const MAX_BATCH_WAIT_MS: u64 = 60_000;
const MAX_RETRY_INTERVAL_MS: u64 = 3_600_000;
const MAX_RETRY_ELAPSED_SECS: u64 = 604_800;
const MAX_SHUTDOWN_SECS: u64 = 3600;
const MIN_LEASE_MS: u64 = 1000;
const MAX_LEASE_MS: u64 = 60_000;
const MAX_TAKEOVER_HOLD_MS: u64 = 600_000;
const MIN_HELD_BYTES: u64 = 4 << 20;
const MAX_HELD_BYTES: u64 = 1 << 40;

/// `Ok` when `ok`, else an error naming `field`.
fn ensure(ok: bool, field: &'static str, message: impl Into<String>) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError::invalid(field, message))
    }
}

/// What is wrong with one broker URL, in words that quote none of it (the
/// caller adds its redacted form). The same parser as lapin's reads it last,
/// so that connecting cannot fail on the URL itself.
pub(crate) fn check_amqp_url(url: &str) -> Result<(), String> {
    let parsed = url::Url::parse(url).map_err(|e| match e {
        url::ParseError::InvalidPort => "its port must be a number from 1 to 65535".to_string(),
        e => format!("is not a valid URL ({e})"),
    })?;
    if !matches!(parsed.scheme(), "amqp" | "amqps") {
        return Err("must start with amqp:// or amqps://".into());
    }
    if !parsed.has_host() || !url[parsed.scheme().len()..].starts_with("://") {
        return Err("must name a host: amqp://user:password@host:port/vhost".into());
    }
    if parsed.host_str().is_some_and(str::is_empty) {
        return Err("must name a host: amqp://user:password@host:port/vhost".into());
    }
    // lapin's parser reads only named hosts and puts `localhost` in place of
    // an IPv6 literal: refused rather than connecting elsewhere.
    if matches!(parsed.host(), Some(url::Host::Ipv6(_))) {
        return Err(
            "names an IPv6 address, which the AMQP client cannot use: give a host name".into(),
        );
    }
    if parsed.port() == Some(0) {
        return Err("its port must be a number from 1 to 65535".into());
    }
    if !super::secret::userinfo_reads_as_written(url) {
        return Err(
            "is read differently from how it is written: percent-encode `/`, `?`, `#`, `@` and `:` \
             in the user and password (%2F, %3F, %23, %40, %3A), and `@` in the vhost"
                .into(),
        );
    }
    if parsed.fragment().is_some() {
        return Err("holds a `#`: percent-encode it (%23) in the user, password or vhost".into());
    }
    url.parse::<lapin::uri::AMQPUri>().map(drop).map_err(|_| {
        "is not a valid AMQP URL: the user, password and vhost must be valid UTF-8 once \
         percent-decoded, and frame_max, channel_max, heartbeat and connection_timeout integers"
            .to_string()
    })
}

/// The values a numeric key accepts, in the words its validation uses, so
/// that a value of the wrong type or out of the type's range (which figment
/// reports before validation runs) is told the same thing.
pub(crate) fn accepted(key: &str) -> Option<String> {
    Some(match key {
        "amqp.prefetch" => "must be 1 to 65535".into(),
        "amqp.stream_port" => "must be 0 (the broker's default) or 1 to 65535".into(),
        "amqp.lease_ms" => format!(
            "must be {MIN_LEASE_MS} to {MAX_LEASE_MS}, under the broker's heartbeat timeout"
        ),
        "amqp.takeover_hold_ms" => format!(
            "must be 0 (derived) or at least amqp.lease_ms + tencent.timeout_ms + 3000, the least safe hold, and at most {MAX_TAKEOVER_HOLD_MS}"
        ),
        "amqp.max_held_bytes" => format!(
            "must be {MIN_HELD_BYTES} (4 MiB: room for the largest valid message) to {MAX_HELD_BYTES}"
        ),
        "tencent.sdkappid" => "must be the app's SDKAppID, a whole number".into(),
        "tencent.usersig_ttl_secs" => "must be at least 60".into(),
        "tencent.timeout_ms" => format!(
            "must be more than {API_BACKEND_TIMEOUT_MS} (the API's backend timeout is 3 s) and at most {MAX_TIMEOUT_MS}"
        ),
        "tencent.rate_limit_per_sec" => "must be 1 to 4294967295".into(),
        "tencent.max_in_flight" => "must be 1 to 1024".into(),
        "batch.max_accounts" => "must be 1 to 100".into(),
        "batch.max_wait_ms" => format!("must be 1 to {MAX_BATCH_WAIT_MS}"),
        "retry.initial_interval_ms" => {
            format!("must be 1 to retry.max_interval_ms (at most {MAX_RETRY_INTERVAL_MS})")
        }
        "retry.max_interval_ms" => format!(
            "must be at least retry.initial_interval_ms and at most {MAX_RETRY_INTERVAL_MS}"
        ),
        "retry.max_elapsed_secs" => format!("must be 0 (forever) to {MAX_RETRY_ELAPSED_SECS}"),
        "retry.multiplier" => "must be a number ≥ 1".into(),
        "retry.randomization_factor" => "must be a number from 0 to 1".into(),
        "attributes.max_value_bytes" => "must be a positive whole number".into(),
        "shutdown.timeout_secs" => format!("must be 1 to {MAX_SHUTDOWN_SECS}"),
        _ => return None,
    })
}

/// [`accepted`] for `key`, then what was found.
fn out_of_range(key: &'static str, got: impl std::fmt::Display) -> ConfigError {
    let range = accepted(key).unwrap_or_default();
    ConfigError::invalid(key, format!("{range} (got {got})"))
}

/// `Ok` when `ok`, else [`out_of_range`].
fn in_range(ok: bool, key: &'static str, got: impl std::fmt::Display) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(out_of_range(key, got))
    }
}

impl Config {
    /// Checks the range of every key (not the API credentials: see [`Config::validate_api`]).
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        self.amqp.validate()?;
        self.tencent.validate()?;
        let least = self.least_takeover_hold().as_millis() as u64;
        let hold = self.amqp.takeover_hold_ms;
        ensure(
            hold == 0 || (least..=MAX_TAKEOVER_HOLD_MS).contains(&hold),
            "amqp.takeover_hold_ms",
            format!(
                "must be 0 (derived) or {least} (amqp.lease_ms + tencent.timeout_ms + 3000, the least safe hold) to {MAX_TAKEOVER_HOLD_MS} (got {hold})"
            ),
        )?;
        self.batch.validate()?;
        self.retry.validate()?;
        self.attributes.validate()?;
        self.admin.validate()?;
        self.console.validate()?;
        self.log.validate()?;
        self.shutdown.validate()
    }

    /// Checks what commands that call the API need: a sdkappid and exactly one
    /// of `secret_key` / `usersig`.
    pub(crate) fn validate_api(&self) -> Result<(), ConfigError> {
        self.tencent.validate_api()
    }
}

impl AmqpConfig {
    /// Checks `[amqp]`.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        // Before any URL is printed: a list whose URLs disagree on their
        // userinfo may have been split inside a password.
        ensure(
            super::secret::same_userinfo_everywhere(self.url.expose()),
            "amqp.url",
            "every URL of the list must carry the same user and password, or none \
             (the nodes of one cluster share its users; percent-encode a password holding \
             \",amqp://\" as %2C)",
        )?;
        let urls = self.url.split();
        ensure(
            !urls.is_empty(),
            "amqp.url",
            "must hold at least one amqp:// or amqps:// URL",
        )?;
        for url in &urls {
            check_amqp_url(url.expose())
                .map_err(|why| ConfigError::invalid("amqp.url", format!("{why} (got {url})")))?;
        }
        for (field, v) in [
            ("amqp.exchange", &self.exchange),
            ("amqp.queue", &self.queue),
            ("amqp.dead_letter_exchange", &self.dead_letter_exchange),
            ("amqp.dead_letter_queue", &self.dead_letter_queue),
        ] {
            ensure(
                !v.is_empty() && v.len() <= 255,
                field,
                "must be a name of 1 to 255 bytes",
            )?;
        }
        for (field, v) in [
            ("amqp.exchange", &self.exchange),
            ("amqp.queue", &self.queue),
            ("amqp.dead_letter_exchange", &self.dead_letter_exchange),
            ("amqp.dead_letter_queue", &self.dead_letter_queue),
        ] {
            ensure(
                !v.starts_with("amq."),
                field,
                "must not start with \"amq.\" (RabbitMQ reserves those names)",
            )?;
        }
        ensure(
            self.queue != self.dead_letter_queue,
            "amqp.dead_letter_queue",
            "must differ from amqp.queue",
        )?;
        ensure(
            self.exchange != self.dead_letter_exchange,
            "amqp.dead_letter_exchange",
            "must differ from amqp.exchange (dead letters would come back as updates)",
        )?;
        in_range(self.prefetch > 0, "amqp.prefetch", self.prefetch)?;
        in_range(
            (MIN_LEASE_MS..=MAX_LEASE_MS).contains(&self.lease_ms),
            "amqp.lease_ms",
            self.lease_ms,
        )?;
        in_range(
            (MIN_HELD_BYTES..=MAX_HELD_BYTES).contains(&self.max_held_bytes),
            "amqp.max_held_bytes",
            self.max_held_bytes,
        )?;
        self.validate_tls()
    }

    /// Checks the TLS and SASL keys, then that their files hold what they should.
    fn validate_tls(&self) -> Result<(), ConfigError> {
        ensure(
            !self.url.expose().contains("auth_mechanism="),
            "amqp.url",
            "set the SASL mechanism with amqp.auth_mechanism, not in the URL",
        )?;
        ensure(
            self.tls_key_file.is_empty() || !self.tls_cert_file.is_empty(),
            "amqp.tls_cert_file",
            "must be set when amqp.tls_key_file is (the client certificate for that key)",
        )?;
        ensure(
            self.tls_cert_file.is_empty() || !self.tls_key_file.is_empty(),
            "amqp.tls_key_file",
            "must be set when amqp.tls_cert_file is (the client certificate's private key)",
        )?;
        ensure(
            self.auth_mechanism != AuthMechanism::External || !self.tls_cert_file.is_empty(),
            "amqp.auth_mechanism",
            "\"external\" takes the user from a client certificate: set amqp.tls_cert_file and amqp.tls_key_file",
        )?;
        for (key, v) in [
            ("amqp.tls_ca_file", &self.tls_ca_file),
            ("amqp.tls_cert_file", &self.tls_cert_file),
        ] {
            ensure(
                v.is_empty() || self.url.expose().starts_with("amqps://"),
                "amqp.url",
                format!("{key} is set, so the URL must start with amqps:// (TLS)"),
            )?;
        }
        // Read the files now so a wrong path is a configuration error at start.
        crate::amqp::connect::tls_config(self).map(drop)
    }
}

impl TencentConfig {
    /// Checks `[tencent]` but the credentials (see [`TencentConfig::validate_api`]).
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if !self.base_url.is_empty() {
            self.validate_base_url()?;
        }
        ensure(
            !self.identifier.is_empty(),
            "tencent.identifier",
            "must not be empty",
        )?;
        in_range(
            self.usersig_ttl_secs >= 60,
            "tencent.usersig_ttl_secs",
            self.usersig_ttl_secs,
        )?;
        in_range(
            self.timeout_ms > API_BACKEND_TIMEOUT_MS && self.timeout_ms <= MAX_TIMEOUT_MS,
            "tencent.timeout_ms",
            self.timeout_ms,
        )?;
        in_range(
            self.rate_limit_per_sec > 0,
            "tencent.rate_limit_per_sec",
            self.rate_limit_per_sec,
        )?;
        in_range(
            (1..=1024).contains(&self.max_in_flight),
            "tencent.max_in_flight",
            self.max_in_flight,
        )
    }

    fn validate_base_url(&self) -> Result<(), ConfigError> {
        let parsed = url::Url::parse(&self.base_url).map_err(|e| {
            ConfigError::invalid(
                "tencent.base_url",
                format!("is not a valid URL ({e}); expected e.g. http://127.0.0.1:18080"),
            )
        })?;
        ensure(
            parsed.username().is_empty() && parsed.password().is_none(),
            "tencent.base_url",
            "must not carry a user or password (the API authenticates with the UserSig)",
        )?;
        match parsed.scheme() {
            "https" => Ok(()),
            "http" => {
                let loopback = match parsed.host() {
                    Some(url::Host::Domain(d)) => d == "localhost",
                    Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
                    Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
                    None => false,
                };
                ensure(
                    loopback || self.allow_insecure_http,
                    "tencent.base_url",
                    "must be https unless its host is loopback (set tencent.allow_insecure_http = true to override)",
                )
            }
            other => Err(ConfigError::invalid(
                "tencent.base_url",
                format!("must be an http or https URL (got scheme {other:?})"),
            )),
        }
    }

    /// Checks what commands that call the API need: a sdkappid and exactly one
    /// of `secret_key` / `usersig`.
    pub(crate) fn validate_api(&self) -> Result<(), ConfigError> {
        ensure(
            self.sdkappid != 0,
            "tencent.sdkappid",
            "must be set to the app's SDKAppID (non-zero)",
        )?;
        match (self.secret_key.is_empty(), self.usersig.is_empty()) {
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
}

impl BatchConfig {
    /// Checks `[batch]`.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        in_range(
            (1..=100).contains(&self.max_accounts),
            "batch.max_accounts",
            self.max_accounts,
        )?;
        in_range(
            (1..=MAX_BATCH_WAIT_MS).contains(&self.max_wait_ms),
            "batch.max_wait_ms",
            self.max_wait_ms,
        )
    }
}

impl RetryConfig {
    /// Checks `[retry]`.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        in_range(
            self.initial_interval_ms > 0,
            "retry.initial_interval_ms",
            self.initial_interval_ms,
        )?;
        in_range(
            self.max_interval_ms >= self.initial_interval_ms
                && self.max_interval_ms <= MAX_RETRY_INTERVAL_MS,
            "retry.max_interval_ms",
            self.max_interval_ms,
        )?;
        in_range(
            self.max_elapsed_secs <= MAX_RETRY_ELAPSED_SECS,
            "retry.max_elapsed_secs",
            self.max_elapsed_secs,
        )?;
        in_range(
            self.multiplier >= 1.0 && self.multiplier.is_finite(),
            "retry.multiplier",
            self.multiplier,
        )?;
        in_range(
            (0.0..=1.0).contains(&self.randomization_factor),
            "retry.randomization_factor",
            self.randomization_factor,
        )
    }
}

impl AttributesConfig {
    /// Checks `[attributes]`.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        in_range(
            self.max_value_bytes > 0,
            "attributes.max_value_bytes",
            self.max_value_bytes,
        )?;
        ensure(
            self.allowed.len() <= 10,
            "attributes.allowed",
            "an app has at most 10 attribute names",
        )?;
        match self.allowed.iter().find(|n| n.is_empty() || n.len() > 50) {
            Some(bad) => Err(ConfigError::invalid(
                "attributes.allowed",
                format!("attribute name {bad:?} must be 1 to 50 bytes"),
            )),
            None => Ok(()),
        }
    }
}

impl AdminConfig {
    /// Checks `[admin]`.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        ensure(
            self.listen.is_empty() || self.listen.parse::<SocketAddr>().is_ok(),
            "admin.listen",
            format!(
                "must be an address such as 127.0.0.1:9464, or \"\" (got {:?})",
                self.listen
            ),
        )
    }
}

impl ConsoleConfig {
    /// Checks `[console]` (whether a listener may go without authentication
    /// is decided when it starts, knowing the address: `console::Access`).
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        ensure(
            self.listen.is_empty() || self.listen.parse::<SocketAddr>().is_ok(),
            "console.listen",
            format!(
                "must be an address such as 127.0.0.1:9465, or \"\" for admin.listen (got {:?})",
                self.listen
            ),
        )?;
        let has_hash = !self.password_hash.is_empty() || !self.password_hash_file.is_empty();
        ensure(
            self.user.is_empty() != has_hash,
            "console.user",
            "HTTP basic authentication needs both console.user and console.password_hash (or console.password_hash_file)",
        )?;
        if !self.password_hash.is_empty() {
            crate::console::auth::check_hash(self.password_hash.expose())
                .map_err(|e| ConfigError::invalid("console.password_hash", e))?;
        }
        Ok(())
    }
}

impl LogConfig {
    /// Checks `[log]`.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        ensure(
            tracing_subscriber::EnvFilter::try_new(&self.level).is_ok(),
            "log.level",
            format!("is not a valid filter (got {:?})", self.level),
        )
    }
}

impl ShutdownConfig {
    /// Checks `[shutdown]`.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        in_range(
            (1..=MAX_SHUTDOWN_SECS).contains(&self.timeout_secs),
            "shutdown.timeout_secs",
            self.timeout_secs,
        )
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use crate::config::{AmqpUrl, Secret};
    use figment::Jail;

    fn load_in_jail() -> Result<Config, ConfigError> {
        Config::load(None)
    }

    #[test]
    fn url_lists_split_into_nodes() {
        let mut c = Config::default();
        c.amqp.url = AmqpUrl::new("amqp://u:p1@h1/%2f, amqp://u:p1@h2/%2f");
        let nodes = c.amqp.nodes();
        assert_eq!(nodes.len(), 2);
        assert_eq!(nodes[1].url.expose(), "amqp://u:p1@h2/%2f");
        assert_eq!(nodes[1].queue, c.amqp.queue);
        assert!(c.validate().is_ok());
        c.amqp.url = AmqpUrl::new("http://u:secretpw@h2,http://u:secretpw@h1/%2f");
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("amqp.url: must start with amqp://") && e.contains("http://***@h1/%2f"),
            "{e}"
        );
        assert!(!e.contains("secretpw"), "{e}");
        // Nodes of one cluster share its users: a list that disagrees is
        // refused before any of it is printed.
        c.amqp.url = AmqpUrl::new("amqp://u:secretpw@h2,amqp://u:other@h1/%2f");
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("same user and password"), "{e}");
        assert!(!e.contains("secretpw") && !e.contains("other"), "{e}");
        c.amqp.url = AmqpUrl::new(" ");
        assert!(c.validate().is_err());
    }

    /// Every URL is read as connecting would read it, before any work; a
    /// problem names amqp.url and shows no password.
    #[test]
    fn urls_are_checked_up_front() {
        let cases = [
            (
                "amqp://guest:s3cr3tpw@127.0.0.1:99999/%2f",
                "port must be a number from 1 to 65535",
            ),
            (
                "amqp://guest:s3cr3tpw@127.0.0.1:0/%2f",
                "port must be a number from 1 to 65535",
            ),
            (
                "amqp:/guest:s3cr3tpw@127.0.0.1:5672/%2f",
                "must name a host",
            ),
            (
                "amqp://guest:pa/ss#s3cr3tpw@127.0.0.1:5672/%2f",
                "port must be",
            ),
            ("amqp://guest:s3cr3tpw@h/%2f#frag", "holds a `#`"),
            (
                "amqp://guest:s3cr3tpw@h/%2f?heartbeat=x",
                "not a valid AMQP URL",
            ),
            ("amqp://guest:s3cr3tpw@h/%FF", "not a valid AMQP URL"),
            ("amqp://guest:s3cr3tpw@:5672/", "not a valid URL"),
            ("amqps://guest:s3cr3tpw@", "not a valid URL"),
            ("amqp://guest:s3cr3tpw@[::1]:5672/%2f", "IPv6"),
            // `/` in a password ends the host: the rest would be the vhost.
            ("amqp://a:/s3cr3tpw@127.0.0.1:5672/%2f", "read differently"),
            ("amqp://u:p@s3cr3tpw@127.0.0.1/%2f", "read differently"),
            ("amqp://u:s3:cr3tpw@127.0.0.1/%2f", "read differently"),
        ];
        for (url, want) in cases {
            let mut c = Config::default();
            c.amqp.url = AmqpUrl::new(url);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("amqp.url") && e.contains(want), "{url}: {e}");
            assert!(!e.contains("s3cr3tpw"), "{url}: {e}");
        }
        for url in [
            "amqp://guest:guest@127.0.0.1:5672/%2f",
            "amqps://u:p@mq.example.com/prod?heartbeat=10",
            "amqp://localhost",
            "amqp://u:p%23w@localhost:5672/%2f",
        ] {
            let mut c = Config::default();
            c.amqp.url = AmqpUrl::new(url);
            assert!(c.validate().is_ok(), "{url}: {:?}", c.validate());
        }
    }

    /// The environment takes a secret as it is: all digits, quotes and all;
    /// a number where a string belongs is never echoed.
    #[test]
    fn secrets_from_the_environment_are_taken_as_they_are() {
        Jail::expect_with(|jail| {
            jail.set_env("IMATTR_TENCENT__SECRET_KEY", "5843210987");
            // figment's own parser would panic on this one.
            jail.set_env("IMATTR_TENCENT__USERSIG", "\"¡\\Z\"[x]");
            jail.set_env("IMATTR_AMQP__URL", "amqp://u:12,34@127.0.0.1:5672/%2f");
            let c = load_in_jail().unwrap();
            assert_eq!(c.tencent.secret_key.expose(), "5843210987");
            assert_eq!(c.tencent.usersig.expose(), "\"¡\\Z\"[x]");
            assert_eq!(c.amqp.url.expose(), "amqp://u:12,34@127.0.0.1:5672/%2f");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.create_file("c.toml", "[tencent]\nsecret_key = 5843210987\n")?;
            jail.set_env("IMATTR_CONFIG", "c.toml");
            let e = load_in_jail().unwrap_err().to_string();
            assert!(e.contains("tencent.secret_key"), "{e}");
            assert!(!e.contains("5843210987"), "{e}");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.create_file("c.toml", "[tencent]\nsecret_key = \"unterminated-s3cr3t\n")?;
            jail.set_env("IMATTR_CONFIG", "c.toml");
            let e = load_in_jail().unwrap_err().to_string();
            assert!(!e.contains("s3cr3t"), "{e}");
            assert!(e.contains("line 2"), "{e}");
            Ok(())
        });
    }

    /// A value of the wrong type or out of its type's range is told the
    /// range validation would tell, not the Rust type.
    #[test]
    fn out_of_type_values_are_told_the_documented_range() {
        for (var, value, want) in [
            (
                "IMATTR_AMQP__PREFETCH",
                "70000",
                "amqp.prefetch` must be 1 to 65535",
            ),
            (
                "IMATTR_AMQP__PREFETCH",
                "-1",
                "amqp.prefetch` must be 1 to 65535",
            ),
            (
                "IMATTR_AMQP__PREFETCH",
                "many",
                "amqp.prefetch` must be 1 to 65535 (found a string)",
            ),
            (
                "IMATTR_BATCH__MAX_ACCOUNTS",
                "-5",
                "batch.max_accounts` must be 1 to 100",
            ),
            (
                "IMATTR_RETRY__MULTIPLIER",
                "\"x\"",
                "retry.multiplier` must be a number ≥ 1",
            ),
            (
                "IMATTR_AMQP__SINGLE_ACTIVE_CONSUMER",
                "5",
                "found an integer, expected true or false",
            ),
        ] {
            Jail::expect_with(|jail| {
                jail.set_env(var, value);
                let e = load_in_jail().unwrap_err().to_string();
                assert!(e.contains(want), "{var}={value}: {e}");
                assert!(!e.contains("u16") && !e.contains("usize"), "{e}");
                Ok(())
            });
        }
        // The same words as validation for an in-type value out of range.
        let mut c = Config::default();
        c.amqp.prefetch = 0;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("amqp.prefetch: must be 1 to 65535"));
    }

    #[test]
    fn names_rabbitmq_reserves_or_loops_are_refused() {
        for (var, value, want) in [
            (
                "IMATTR_AMQP__QUEUE",
                "amq.q",
                "amqp.queue: must not start with \"amq.\"",
            ),
            (
                "IMATTR_AMQP__DEAD_LETTER_EXCHANGE",
                "imattr.updates",
                "amqp.dead_letter_exchange: must differ from amqp.exchange",
            ),
        ] {
            Jail::expect_with(|jail| {
                jail.set_env(var, value);
                let e = load_in_jail().unwrap_err().to_string();
                assert!(e.contains(want), "{var}={value}: {e}");
                Ok(())
            });
        }
    }

    #[test]
    fn each_validation_names_its_field() {
        const HUGE: &str = "18446744073709551615";
        let cases: &[(&str, &str, &str)] = &[
            ("IMATTR_BATCH__MAX_ACCOUNTS", "101", "max_accounts"),
            ("IMATTR_BATCH__MAX_ACCOUNTS", "0", "max_accounts"),
            ("IMATTR_TENCENT__REGION", "mars", "tencent.region"),
            ("IMATTR_TENCENT__BASE_URL", "not a url", "tencent.base_url"),
            ("IMATTR_TENCENT__BASE_URL", "ftp://x", "tencent.base_url"),
            (
                "IMATTR_TENCENT__BASE_URL",
                "https://u:pw@api.example.com",
                "tencent.base_url: must not carry a user or password",
            ),
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
            ("IMATTR_TENCENT__TIMEOUT_MS", "3000", "tencent.timeout_ms"),
            ("IMATTR_TENCENT__TIMEOUT_MS", HUGE, "tencent.timeout_ms"),
            ("IMATTR_BATCH__MAX_WAIT_MS", HUGE, "batch.max_wait_ms"),
            (
                "IMATTR_SHUTDOWN__TIMEOUT_SECS",
                HUGE,
                "shutdown.timeout_secs",
            ),
            (
                "IMATTR_SHUTDOWN__TIMEOUT_SECS",
                "0",
                "shutdown.timeout_secs",
            ),
            (
                "IMATTR_RETRY__MAX_INTERVAL_MS",
                HUGE,
                "retry.max_interval_ms",
            ),
            (
                "IMATTR_RETRY__INITIAL_INTERVAL_MS",
                HUGE,
                "retry.max_interval_ms",
            ),
            (
                "IMATTR_RETRY__MAX_ELAPSED_SECS",
                HUGE,
                "retry.max_elapsed_secs",
            ),
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
            ("IMATTR_AMQP__QUEUE_TYPE", "Quorum", "amqp.queue_type"),
            ("IMATTR_TENCENT__REGION", "silicon_valley", "tencent.region"),
            (
                "IMATTR_AMQP__LEASE_MS",
                "999",
                "amqp.lease_ms: must be 1000 to 60000",
            ),
            ("IMATTR_AMQP__LEASE_MS", "60001", "amqp.lease_ms"),
            (
                "IMATTR_AMQP__MAX_HELD_BYTES",
                "1048576",
                "amqp.max_held_bytes",
            ),
            ("IMATTR_AMQP__MAX_HELD_BYTES", HUGE, "amqp.max_held_bytes"),
            // The least safe hold with the defaults: 10000 + 5000 + 3000.
            (
                "IMATTR_AMQP__TAKEOVER_HOLD_MS",
                "17999",
                "amqp.takeover_hold_ms: must be 0 (derived) or 18000",
            ),
            (
                "IMATTR_AMQP__TAKEOVER_HOLD_MS",
                "600001",
                "amqp.takeover_hold_ms",
            ),
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
    fn tls_keys_name_what_is_missing() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[("IMATTR_AMQP__AUTH_MECHANISM", "kerberos")],
                "amqp.auth_mechanism",
            ),
            (
                &[("IMATTR_AMQP__AUTH_MECHANISM", "external")],
                "amqp.auth_mechanism: \"external\" takes the user from a client certificate",
            ),
            (
                &[("IMATTR_AMQP__URL", "amqps://h/%2f?auth_mechanism=external")],
                "amqp.url: set the SASL mechanism with amqp.auth_mechanism",
            ),
            (
                &[
                    ("IMATTR_AMQP__URL", "amqps://h"),
                    ("IMATTR_AMQP__TLS_CERT_FILE", "c.pem"),
                ],
                "amqp.tls_key_file: must be set",
            ),
            (
                &[
                    ("IMATTR_AMQP__URL", "amqps://h"),
                    ("IMATTR_AMQP__TLS_KEY_FILE", "k.pem"),
                ],
                "amqp.tls_cert_file: must be set",
            ),
            (
                &[("IMATTR_AMQP__TLS_CA_FILE", "ca.pem")],
                "amqp.url: amqp.tls_ca_file is set, so the URL must start with amqps://",
            ),
            (
                &[
                    ("IMATTR_AMQP__URL", "amqps://h"),
                    ("IMATTR_AMQP__TLS_CA_FILE", "nope.pem"),
                ],
                "amqp.tls_ca_file: file nope.pem cannot be read",
            ),
        ];
        for (vars, want) in cases {
            Jail::expect_with(|jail| {
                for (k, v) in *vars {
                    jail.set_env(k, v);
                }
                let err = load_in_jail().unwrap_err().to_string();
                assert!(err.contains(want), "{vars:?}: {err}");
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
    fn largest_valid_durations_keep_instants_in_range() {
        let mut c = Config::default();
        c.tencent.timeout_ms = MAX_TIMEOUT_MS;
        c.batch.max_wait_ms = MAX_BATCH_WAIT_MS;
        c.retry.max_interval_ms = MAX_RETRY_INTERVAL_MS;
        c.retry.max_elapsed_secs = MAX_RETRY_ELAPSED_SECS;
        c.shutdown.timeout_secs = MAX_SHUTDOWN_SECS;
        c.validate().unwrap();
        let now = tokio::time::Instant::now();
        for d in [
            c.tencent.timeout(),
            c.batch.max_wait(),
            c.retry.max_interval(),
            c.retry.max_elapsed().unwrap(),
            c.shutdown.timeout(),
        ] {
            assert!(now.checked_add(d).is_some(), "{d:?}");
        }
        c.tencent.timeout_ms = API_BACKEND_TIMEOUT_MS + 1;
        c.validate().unwrap();
    }
}
