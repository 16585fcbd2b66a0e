//! Range checks of every key.

use std::net::SocketAddr;

use super::{Config, ConfigError, REGIONS};

impl Config {
    /// Checks the range of every key.
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
}

#[cfg(test)]
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use crate::config::Secret;
    use figment::Jail;

    fn load_in_jail() -> Result<Config, ConfigError> {
        Config::load(None)
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
}
