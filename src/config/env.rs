//! The configuration as `IMATTR_<SECTION>__<KEY>` environment variables, derived
//! from its serialization so that no key can be forgotten, for starting another
//! `imattr` process configured exactly like this one.

use figment::value::{Num, Value};

use super::{secret, Config};

impl Config {
    /// Every key as an `IMATTR_<SECTION>__<KEY>` variable, written so that the
    /// environment layer of [`Config::load`] reads back exactly this
    /// configuration. The values carry the secrets in clear: give them to a
    /// child process, never to a log.
    pub(crate) fn to_env(&self) -> Vec<(String, String)> {
        // Plain data with string keys always serializes.
        let value = secret::exposed(|| Value::serialize(self).ok())
            .expect("a Config serializes to a figment value");
        let mut vars = Vec::new();
        flatten("IMATTR", &value, &mut vars);
        // These are read byte for byte (see `load::RAW_ENV_KEYS`).
        for (section, key) in super::load::RAW_ENV_KEYS {
            let name = super::load::env_var_name(section, key);
            let raw = value
                .find_ref(&format!("{section}.{key}"))
                .and_then(Value::as_str);
            if let (Some(var), Some(raw)) = (vars.iter_mut().find(|(k, _)| *k == name), raw) {
                var.1 = raw.to_string();
            }
        }
        vars
    }
}

/// Nested tables become `__`-separated names, as `Env::split("__")` in
/// `load.rs` reads them; a `None` (`Empty`) is left out so its default applies.
fn flatten(name: &str, value: &Value, vars: &mut Vec<(String, String)>) {
    match value {
        Value::Dict(_, dict) => {
            let sep = if name == "IMATTR" { "_" } else { "__" };
            for (key, v) in dict {
                flatten(&format!("{name}{sep}{}", key.to_uppercase()), v, vars);
            }
        }
        Value::Empty(..) => {}
        leaf => vars.push((name.to_string(), env_value(leaf, false))),
    }
}

/// A value in the syntax figment's `Env` provider parses (see
/// `figment::providers::Env`): bare numbers and booleans, `[a,b]` arrays,
/// `{k=v}` dictionaries and `"…"` strings with TOML-like escapes.
fn env_value(value: &Value, in_collection: bool) -> String {
    match value {
        Value::String(_, s) if !in_collection && reads_back_as_itself(s) => s.clone(),
        Value::String(_, s) => quoted(s),
        Value::Char(_, c) => env_value(&Value::from(c.to_string()), in_collection),
        Value::Bool(_, b) => b.to_string(),
        Value::Num(_, n) => number(*n),
        Value::Array(_, items) => {
            let items: Vec<String> = items.iter().map(|v| env_value(v, true)).collect();
            format!("[{}]", items.join(","))
        }
        Value::Dict(_, dict) => {
            let entries: Vec<String> = dict
                .iter()
                .map(|(k, v)| format!("{}={}", quoted(k), env_value(v, true)))
                .collect();
            format!("{{{}}}", entries.join(","))
        }
        Value::Empty(..) => String::new(),
    }
}

/// Whether figment parses `s`, written bare, back to the string `s` (not a
/// number, a boolean, an array, a trimmed or unescaped string).
fn reads_back_as_itself(s: &str) -> bool {
    !s.contains('\0') && s.parse::<Value>().ok() == Some(Value::from(s.to_string()))
}

/// `s` between double quotes, escaped the way figment unescapes it.
fn quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A number; a float always carries a `.`, which is how figment tells it from an integer.
fn number(n: Num) -> String {
    let float = match n {
        Num::F32(f) => f64::from(f),
        Num::F64(f) => f,
        Num::U8(v) => return v.to_string(),
        Num::U16(v) => return v.to_string(),
        Num::U32(v) => return v.to_string(),
        Num::U64(v) => return v.to_string(),
        Num::U128(v) => return v.to_string(),
        Num::USize(v) => return v.to_string(),
        Num::I8(v) => return v.to_string(),
        Num::I16(v) => return v.to_string(),
        Num::I32(v) => return v.to_string(),
        Num::I64(v) => return v.to_string(),
        Num::I128(v) => return v.to_string(),
        Num::ISize(v) => return v.to_string(),
    };
    // `{:?}` is the shortest form that parses back to the same f64 ("2.0", "1e20").
    let s = format!("{float:?}");
    if s.contains('.') || !float.is_finite() {
        return s;
    }
    match s.find('e') {
        Some(e) => format!("{}.0{}", &s[..e], &s[e..]),
        None => format!("{s}.0"),
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use crate::config::{
        AmqpUrl, AuthMechanism, LogFormat, QueueType, RateLimitScope, Region, Secret,
    };
    use figment::Jail;

    /// Every key away from its default, with strings figment would otherwise
    /// read as numbers, booleans, arrays or trimmed text.
    fn everything_set() -> Config {
        let mut c = Config::default();
        c.amqp.url = AmqpUrl::new("amqps://imattr:p,a!s$s&w'o(r)d*+%2F@mq.example.com:5671/prod");
        c.amqp.exchange = "123".into();
        c.amqp.queue = "true".into();
        c.amqp.dead_letter_exchange = " padded ".into();
        c.amqp.dead_letter_queue = "[dead]".into();
        c.amqp.queue_type = QueueType::Quorum;
        c.amqp.prefetch = 7;
        c.amqp.single_active_consumer = false;
        c.amqp.lease_ms = 2500;
        c.amqp.takeover_hold_ms = 600_000;
        c.amqp.max_held_bytes = 5 << 20;
        c.amqp.stream_port = 5551;
        // Relative to the test's `Jail`, where `tls_files` writes them.
        c.amqp.tls_ca_file = "ca.pem".into();
        c.amqp.tls_cert_file = "client.pem".into();
        c.amqp.tls_key_file = "client.key".into();
        c.amqp.auth_mechanism = AuthMechanism::External;
        c.tencent.region = Region::SiliconValley;
        c.tencent.base_url = "http://example.com:8080".into();
        c.tencent.allow_insecure_http = true;
        c.tencent.sdkappid = 1_400_000_001;
        c.tencent.identifier = "-5".into();
        c.tencent.secret_key = Secret::new("1.5");
        c.tencent.usersig = Secret::new("\"sig\"\twith\\escapes\n");
        c.tencent.usersig_ttl_secs = 3600;
        c.tencent.timeout_ms = 4000;
        c.tencent.rate_limit_per_sec = 50;
        c.tencent.rate_limit_scope = RateLimitScope::PerApi;
        c.tencent.max_in_flight = 3;
        c.batch.max_accounts = 10;
        c.batch.max_wait_ms = 20;
        c.retry.initial_interval_ms = 10;
        c.retry.multiplier = 3.0;
        c.retry.max_interval_ms = 1000;
        c.retry.randomization_factor = 0.25;
        c.retry.max_elapsed_secs = 0;
        c.attributes.allowed = vec!["city".into(), "1".into(), "a b".into(), "x,y".into()];
        c.attributes.max_value_bytes = 40;
        c.admin.listen = String::new();
        c.console.enabled = true;
        c.console.listen = "127.0.0.1:1".into();
        c.console.read_only = true;
        c.console.token = Secret::new("007");
        c.console.token_file = "token".into();
        c.console.user = "true".into();
        c.console.password_hash = Secret::new(
            "$argon2id$v=19$m=64,t=1,p=1$MDEyMzQ1Njc4OWFiY2RlZg$kL3Q2vDPxHYdqgYxYnU3VWn7kXTjfRrJRpd2hjvaG0E",
        );
        c.console.password_hash_file = "hash".into();
        c.log.format = LogFormat::Json;
        c.log.level = "imattr=debug,lapin=warn".into();
        c.shutdown.timeout_secs = 5;
        c
    }

    /// Files that pass validation (PEM blocks; nothing checks what is inside).
    fn tls_files(jail: &mut Jail) -> figment::error::Result<()> {
        let cert = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        jail.create_file("ca.pem", cert)?;
        jail.create_file("client.pem", cert)?;
        jail.create_file(
            "client.key",
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )?;
        Ok(())
    }

    /// The leaves (dotted key, value) of a configuration, secrets included.
    fn leaves(c: &Config) -> Vec<(String, Value)> {
        fn walk(prefix: &str, v: &Value, out: &mut Vec<(String, Value)>) {
            match v {
                Value::Dict(_, d) => {
                    for (k, v) in d {
                        let key = if prefix.is_empty() {
                            k.clone()
                        } else {
                            format!("{prefix}.{k}")
                        };
                        walk(&key, v, out);
                    }
                }
                leaf => out.push((prefix.to_string(), leaf.clone())),
            }
        }
        let v = secret::exposed(|| Value::serialize(c).ok()).unwrap();
        let mut out = Vec::new();
        walk("", &v, &mut out);
        out
    }

    #[test]
    fn every_key_round_trips_through_the_environment() {
        let c = everything_set();
        // A key added to Config but not to `everything_set` would go untested.
        let defaults = leaves(&Config::default());
        let set = leaves(&c);
        assert_eq!(set.len(), defaults.len());
        for ((key, v), (_, d)) in set.iter().zip(&defaults) {
            assert_ne!(v, d, "{key} is at its default in the test configuration");
        }

        let vars = c.to_env();
        assert_eq!(vars.len(), set.len(), "{vars:?}");
        Jail::expect_with(|jail| {
            tls_files(jail)?;
            c.validate().unwrap();
            for (k, v) in &vars {
                jail.set_env(k, v);
            }
            assert_eq!(Config::load(None).unwrap(), c);
            Ok(())
        });
        let var = |name: &str| vars.iter().find(|(k, _)| k == name).unwrap().1.as_str();
        assert_eq!(var("IMATTR_AMQP__EXCHANGE"), "\"123\"");
        assert_eq!(var("IMATTR_AMQP__PREFETCH"), "7");
        assert_eq!(var("IMATTR_RETRY__MULTIPLIER"), "3.0");
        assert_eq!(var("IMATTR_TENCENT__REGION"), "silicon-valley");
        // Secrets and the URL are taken as they are, never parsed.
        assert_eq!(var("IMATTR_TENCENT__SECRET_KEY"), "1.5");
        assert_eq!(
            var("IMATTR_ATTRIBUTES__ALLOWED"),
            r#"["city","1","a b","x,y"]"#
        );

        // Outside `to_env` the secrets are redacted again.
        let printed = c.to_redacted_toml();
        assert!(!printed.contains("1.5"), "{printed}");
        assert!(!printed.contains("w\\ord"), "{printed}");
    }

    #[test]
    fn defaults_round_trip_too() {
        let vars = Config::default().to_env();
        Jail::expect_with(|jail| {
            for (k, v) in &vars {
                jail.set_env(k, v);
            }
            assert_eq!(Config::load(None).unwrap(), Config::default());
            Ok(())
        });
    }

    #[test]
    fn values_figment_would_misread_are_quoted() {
        let s = |s: &str| env_value(&Value::from(s.to_string()), false);
        for (value, written) in [
            ("plain", "plain"),
            ("imattr=debug,lapin=warn", "imattr=debug,lapin=warn"),
            ("", ""),
            ("42", "\"42\""),
            ("-1", "\"-1\""),
            ("0.5", "\"0.5\""),
            ("false", "\"false\""),
            ("[a]", "\"[a]\""),
            ("{a=b}", "\"{a=b}\""),
            (" x", "\" x\""),
            ("\"q\"", "\"\\\"q\\\"\""),
            ("a\n", "\"a\\u000a\""),
        ] {
            assert_eq!(s(value), written, "{value:?}");
            assert_eq!(
                written.parse::<Value>().unwrap(),
                Value::from(value.to_string())
            );
        }
        for (f, written) in [
            (2.0, "2.0"),
            (0.25, "0.25"),
            (1e20, "1.0e20"),
            (-3.0, "-3.0"),
        ] {
            assert_eq!(number(Num::F64(f)), written);
            assert_eq!(written.parse::<Value>().unwrap(), Value::from(f));
        }
    }
}
