//! The configuration's sections, their defaults and what is derived from them.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{AmqpUrl, Secret};

/// `amqp.queue_type`: the kind of the updates queue (`x-queue-type`).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// A classic queue.
    #[default]
    Classic,
    /// A replicated quorum queue.
    Quorum,
}

impl QueueType {
    /// The value of the `x-queue-type` argument.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        }
    }
}

impl std::fmt::Display for QueueType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `amqp.auth_mechanism`: how imattr logs in to the broker (SASL).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AuthMechanism {
    /// The user and password in `amqp.url`.
    #[default]
    Plain,
    /// The broker takes the user from the client certificate (`amqp.tls_cert_file`).
    External,
}

/// `tencent.rate_limit_scope`: what `tencent.rate_limit_per_sec` counts.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RateLimitScope {
    /// One budget for every API imattr calls (`im_set_attr`,
    /// `im_remove_attr` and the reads): the strictest reading of Tencent's
    /// limit, which does not say whether the APIs share it.
    #[default]
    Shared,
    /// `im_remove_attr` has a budget of its own; the other APIs share one.
    PerApi,
}

impl RateLimitScope {
    /// The name used in the configuration and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            RateLimitScope::Shared => "shared",
            RateLimitScope::PerApi => "per_api",
        }
    }
}

impl std::str::FromStr for RateLimitScope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "shared" => Ok(RateLimitScope::Shared),
            "per_api" => Ok(RateLimitScope::PerApi),
            _ => Err(format!("expected shared or per_api, got {s:?}")),
        }
    }
}

impl std::fmt::Display for RateLimitScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `tencent.region`: which of the API's regional domains to use.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Region {
    /// console.tim.qq.com
    #[default]
    China,
    /// adminapisgp.im.qcloud.com
    Singapore,
    /// adminapikr.im.qcloud.com
    Seoul,
    /// adminapiger.im.qcloud.com
    Frankfurt,
    /// adminapiusa.im.qcloud.com
    SiliconValley,
    /// adminapiidn.im.qcloud.com
    Jakarta,
    /// adminapijpn.im.qcloud.com
    Tokyo,
    /// adminapiind.im.qcloud.com
    Mumbai,
}

impl Region {
    /// Every region.
    pub const ALL: [Region; 8] = [
        Region::China,
        Region::Singapore,
        Region::Seoul,
        Region::Frankfurt,
        Region::SiliconValley,
        Region::Jakarta,
        Region::Tokyo,
        Region::Mumbai,
    ];

    /// The region's API domain (Tencent's documentation).
    pub fn domain(self) -> &'static str {
        match self {
            Region::China => "console.tim.qq.com",
            Region::Singapore => "adminapisgp.im.qcloud.com",
            Region::Seoul => "adminapikr.im.qcloud.com",
            Region::Frankfurt => "adminapiger.im.qcloud.com",
            Region::SiliconValley => "adminapiusa.im.qcloud.com",
            Region::Jakarta => "adminapiidn.im.qcloud.com",
            Region::Tokyo => "adminapijpn.im.qcloud.com",
            Region::Mumbai => "adminapiind.im.qcloud.com",
        }
    }
}

/// `log.format`.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
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
    /// The web console.
    pub console: ConsoleConfig,
    /// Logging.
    pub log: LogConfig,
    /// Graceful shutdown.
    pub shutdown: ShutdownConfig,
}

/// `[amqp]`
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpConfig {
    /// Broker URL, `amqp://` or `amqps://`; several comma-separated URLs are
    /// nodes of one cluster, tried in turn. Passwords are redacted everywhere.
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
    pub queue_type: QueueType,
    /// Unacknowledged deliveries the worker may hold (basic.qos prefetch
    /// count). It should cover every batch in flight and the next ones:
    /// about `tencent.max_in_flight` x `batch.max_accounts` x 2.
    pub prefetch: u16,
    /// PEM file of CA certificates trusted to sign the broker's certificate, besides the
    /// system's roots (amqps:// only); empty: the system's roots only.
    pub tls_ca_file: String,
    /// PEM file of the client certificate (then any intermediates) for mutual TLS
    /// (amqps:// only); needs `tls_key_file`.
    pub tls_cert_file: String,
    /// PEM file of the client certificate's private key (PKCS#8, PKCS#1 or SEC1,
    /// unencrypted); needs `tls_cert_file`.
    pub tls_key_file: String,
    /// SASL mechanism: `plain` (user and password from `url`) or `external` (the broker
    /// takes the user from the client certificate; needs `tls_cert_file`).
    pub auth_mechanism: AuthMechanism,
    /// Declare the updates queue with `x-single-active-consumer`: one worker
    /// consumes, the others are hot standbys (docs/several-workers.md).
    /// When false, the worker's consumer is exclusive: one worker only.
    pub single_active_consumer: bool,
    /// How long requests may still leave after the broker last answered on the
    /// consume channel, in milliseconds (1000 to 60000). Checked with a round trip
    /// every second; past it the session is lost and the worker reconnects.
    pub lease_ms: u64,
    /// How long a worker that takes over redelivered messages holds its first
    /// requests, in milliseconds; 0: `lease_ms` + `tencent.timeout_ms` + 3000 (the
    /// API's backend timeout), the least allowed.
    pub takeover_hold_ms: u64,
    /// Bytes of message bodies the worker holds at once, in bytes (at least 4194304);
    /// past it the worker stops reading deliveries from the broker until under again.
    pub max_held_bytes: u64,
    /// TCP port of RabbitMQ's stream protocol (plugin `rabbitmq_stream`) on the
    /// hosts of `url`, used to read the dead-letter stream; TLS when `url` is
    /// `amqps://`. 0: the broker's default, 5552, or 5551 (its TLS port) for `amqps://`.
    pub stream_port: u16,
}

impl AmqpConfig {
    /// `amqp.lease_ms`.
    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms)
    }

    /// One configuration per URL of `url` (cluster nodes), in order; each
    /// connects to that node alone.
    pub fn nodes(&self) -> Vec<AmqpConfig> {
        self.url
            .split()
            .into_iter()
            .map(|url| AmqpConfig {
                url,
                ..self.clone()
            })
            .collect()
    }
}

impl Default for AmqpConfig {
    fn default() -> Self {
        AmqpConfig {
            url: AmqpUrl::new("amqp://guest:guest@127.0.0.1:5672/%2f"),
            exchange: "imattr.updates".into(),
            queue: "imattr.updates".into(),
            dead_letter_exchange: "imattr.dead".into(),
            dead_letter_queue: "imattr.dead".into(),
            queue_type: QueueType::Classic,
            prefetch: 10_000,
            tls_ca_file: String::new(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
            auth_mechanism: AuthMechanism::Plain,
            single_active_consumer: true,
            lease_ms: 10_000,
            takeover_hold_ms: 0,
            max_held_bytes: 64 << 20,
            stream_port: 0,
        }
    }
}

/// `[tencent]`
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TencentConfig {
    /// Region whose API domain is used: `china`, `singapore`, `seoul`, `frankfurt`,
    /// `silicon-valley`, `jakarta`, `tokyo` or `mumbai`.
    pub region: Region,
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
    /// HTTP timeout per request, in milliseconds: more than 3000, the backend's own
    /// timeout, so that its answer to a slow request arrives.
    pub timeout_ms: u64,
    /// Request rate ceiling, requests per second.
    pub rate_limit_per_sec: u32,
    /// What `rate_limit_per_sec` counts: `shared` (one budget for
    /// `im_set_attr` and `im_remove_attr` together, the default) or
    /// `per_api` (one budget for each); see docs/configuration.md.
    pub rate_limit_scope: RateLimitScope,
    /// Requests in flight at once. Sending at the full rate needs about
    /// rate x API latency (100/s x 300 ms = 30); the default leaves headroom.
    pub max_in_flight: usize,
}

impl Default for TencentConfig {
    fn default() -> Self {
        TencentConfig {
            region: Region::China,
            base_url: String::new(),
            allow_insecure_http: false,
            sdkappid: 0,
            identifier: "administrator".into(),
            secret_key: Secret::default(),
            usersig: Secret::default(),
            usersig_ttl_secs: 86400,
            timeout_ms: 5000,
            rate_limit_per_sec: 100,
            rate_limit_scope: RateLimitScope::Shared,
            max_in_flight: 48,
        }
    }
}

impl TencentConfig {
    /// `tencent.timeout_ms`.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

/// `[batch]`
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// Distinct accounts per request, 1 to 100.
    pub max_accounts: usize,
    /// Longest time the oldest pending update waits before its batch goes out, in
    /// milliseconds (at most 60000).
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

impl BatchConfig {
    /// `batch.max_wait_ms`.
    pub fn max_wait(&self) -> Duration {
        Duration::from_millis(self.max_wait_ms)
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
    /// Longest backoff interval, in milliseconds (at most 3600000, an hour).
    pub max_interval_ms: u64,
    /// Jitter: each interval is randomised by ± this fraction (0 to 1).
    pub randomization_factor: f64,
    /// Give up on a transient failure after this long, in seconds (at most 604800,
    /// a week); 0 retries forever.
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
    /// `retry.initial_interval_ms`.
    pub fn initial_interval(&self) -> Duration {
        Duration::from_millis(self.initial_interval_ms)
    }

    /// `retry.max_interval_ms`.
    pub fn max_interval(&self) -> Duration {
        Duration::from_millis(self.max_interval_ms)
    }

    /// `retry.max_elapsed_secs`; `None`: retry forever.
    pub fn max_elapsed(&self) -> Option<Duration> {
        (self.max_elapsed_secs > 0).then(|| Duration::from_secs(self.max_elapsed_secs))
    }

    /// The `backoff` crate's policy for these settings.
    pub fn backoff(&self) -> backoff::ExponentialBackoff {
        backoff::ExponentialBackoff {
            current_interval: self.initial_interval(),
            initial_interval: self.initial_interval(),
            randomization_factor: self.randomization_factor,
            multiplier: self.multiplier,
            max_interval: self.max_interval(),
            max_elapsed_time: self.max_elapsed(),
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

/// `[console]`: the web console (docs/console.md).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleConfig {
    /// Serve the web console under `/console/` on `admin.listen` in `imattr run`.
    pub enabled: bool,
    /// Address `imattr console` listens on, `host:port`; empty: `admin.listen`.
    /// `imattr console --listen` overrides it.
    pub listen: String,
    /// Show only: every action (replay, delete) is hidden and refused.
    pub read_only: bool,
    /// Token that grants access, sent as `Authorization: Bearer TOKEN` (or,
    /// from a browser, as the password of HTTP basic with any user name).
    pub token: Secret,
    /// File whose first line is the token; instead of `token`.
    pub token_file: String,
    /// User name for HTTP basic authentication (with `password_hash`).
    pub user: String,
    /// Argon2 hash (PHC string, `$argon2id$…`) of `user`'s password, as
    /// `imattr console --hash-password` prints it.
    pub password_hash: Secret,
    /// File whose first line is the password hash; instead of `password_hash`.
    pub password_hash_file: String,
}

impl ConsoleConfig {
    /// Whether any authentication is configured.
    pub fn has_auth(&self) -> bool {
        !self.token.is_empty() || !self.token_file.is_empty() || !self.user.is_empty()
    }
}

/// `[log]`
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A tracing filter such as `info` or `imattr=debug`; `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// `[shutdown]`
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// Longest time to flush and settle pending messages on SIGTERM, in seconds
    /// (at most 3600).
    pub timeout_secs: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig { timeout_secs: 30 }
    }
}

impl ShutdownConfig {
    /// `shutdown.timeout_secs`.
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }
}

impl Config {
    /// The least takeover hold that is safe: the longest a request of a
    /// session lost elsewhere can still land after the broker gave its
    /// messages away (docs/several-workers.md, "Taking over"): it may leave
    /// until the lease ends, then take `tencent.timeout_ms` on our side and
    /// the API's backend timeout on its side.
    pub fn least_takeover_hold(&self) -> Duration {
        self.amqp.lease()
            + self.tencent.timeout()
            + Duration::from_millis(super::API_BACKEND_TIMEOUT_MS)
    }

    /// `amqp.takeover_hold_ms`, or the least safe hold when it is 0.
    pub fn takeover_hold(&self) -> Duration {
        if self.amqp.takeover_hold_ms == 0 {
            self.least_takeover_hold()
        } else {
            Duration::from_millis(self.amqp.takeover_hold_ms)
        }
    }

    /// The API's base URL, `https://{domain}` or `tencent.base_url`.
    pub fn api_base_url(&self) -> String {
        if !self.tencent.base_url.is_empty() {
            return self.tencent.base_url.trim_end_matches('/').to_string();
        }
        format!("https://{}", self.tencent.region.domain())
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_contract() {
        let c = Config::default();
        c.validate().unwrap();
        assert_eq!(c.amqp.exchange, "imattr.updates");
        assert_eq!(c.amqp.dead_letter_queue, "imattr.dead");
        assert_eq!(c.amqp.prefetch, 10_000);
        assert!(c.amqp.single_active_consumer);
        assert_eq!(c.tencent.timeout_ms, 5000);
        assert_eq!(c.batch.max_accounts, 100);
        assert_eq!(c.retry.max_elapsed_secs, 600);
        assert_eq!(c.admin.listen, "127.0.0.1:9464");
        assert_eq!(c.api_base_url(), "https://console.tim.qq.com");
        assert_eq!(c.amqp.lease_ms, 10_000);
        assert_eq!(c.amqp.max_held_bytes, 64 << 20);
        // Derived: the lease, our timeout, the API's backend timeout.
        assert_eq!(c.takeover_hold(), Duration::from_millis(18_000));
        let mut c = c;
        c.amqp.takeover_hold_ms = 30_000;
        assert_eq!(c.takeover_hold(), Duration::from_millis(30_000));
    }

    #[test]
    fn string_values_are_the_documented_ones() {
        use figment::providers::{Format, Toml};
        let regions = [
            ("china", "console.tim.qq.com"),
            ("singapore", "adminapisgp.im.qcloud.com"),
            ("seoul", "adminapikr.im.qcloud.com"),
            ("frankfurt", "adminapiger.im.qcloud.com"),
            ("silicon-valley", "adminapiusa.im.qcloud.com"),
            ("jakarta", "adminapiidn.im.qcloud.com"),
            ("tokyo", "adminapijpn.im.qcloud.com"),
            ("mumbai", "adminapiind.im.qcloud.com"),
        ];
        assert_eq!(regions.len(), Region::ALL.len());
        for (name, domain) in regions {
            let toml = format!("[tencent]\nregion = {name:?}\n");
            let c = Config::from_figment(figment::Figment::from(Toml::string(&toml))).unwrap();
            assert_eq!(c.api_base_url(), format!("https://{domain}"), "{name}");
            assert!(c.to_redacted_toml().contains(&format!("region = {name:?}")));
        }
        for (name, queue_type) in [
            ("classic", QueueType::Classic),
            ("quorum", QueueType::Quorum),
        ] {
            let toml = format!("[amqp]\nqueue_type = {name:?}\n");
            let c = Config::from_figment(figment::Figment::from(Toml::string(&toml))).unwrap();
            assert_eq!(c.amqp.queue_type, queue_type);
            assert_eq!(queue_type.as_str(), name);
        }
        for (name, format) in [("text", LogFormat::Text), ("json", LogFormat::Json)] {
            let toml = format!("[log]\nformat = {name:?}\n");
            let c = Config::from_figment(figment::Figment::from(Toml::string(&toml))).unwrap();
            assert_eq!(c.log.format, format);
        }
    }
}
