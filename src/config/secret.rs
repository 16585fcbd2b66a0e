//! Secrets that must never be shown: `Debug`, `Display` and `Serialize` redact them.
//! Only [`exposed`] (for handing the configuration to a child process) lifts that.

use std::cell::Cell;
use std::fmt;

use serde::{Deserialize, Serialize, Serializer};

thread_local! {
    /// Whether `Serialize` writes secrets in clear on this thread: only inside [`exposed`].
    static EXPOSED: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with `Secret` and `AmqpUrl` serializing their real values, on this
/// thread only; redaction is back when it returns or unwinds.
pub(super) fn exposed<T>(f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            EXPOSED.with(|e| e.set(self.0));
        }
    }
    let _restore = Restore(EXPOSED.with(|e| e.replace(true)));
    f()
}

fn is_exposed() -> bool {
    EXPOSED.with(Cell::get)
}

/// A secret string: never shown by `Debug`, `Display` or `Serialize` (but in `exposed`).
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
    pub(crate) fn is_empty(&self) -> bool {
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
        if self.0.is_empty() || is_exposed() {
            s.serialize_str(&self.0)
        } else {
            s.serialize_str("<redacted>")
        }
    }
}

/// The AMQP URL: its password is never shown by `Debug`, `Display` or `Serialize`
/// (but in `exposed`).
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct AmqpUrl(String);

impl AmqpUrl {
    /// Wraps a URL.
    pub fn new(s: impl Into<String>) -> Self {
        AmqpUrl(s.into())
    }
    /// The URL with its password, for connecting only.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
    /// The URL with any password replaced by `***`.
    pub(crate) fn redacted(&self) -> String {
        redact_url(&self.0)
    }
    /// The URLs of a comma-separated list (nodes of one cluster), in order,
    /// blanks around commas ignored.
    pub(crate) fn split(&self) -> Vec<AmqpUrl> {
        split_urls(&self.0)
            .into_iter()
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(AmqpUrl::new)
            .collect()
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
        if is_exposed() {
            s.serialize_str(&self.0)
        } else {
            s.serialize_str(&self.redacted())
        }
    }
}
/// Replaces the password in `scheme://user:password@host…` with `***`, in
/// every URL of a comma-separated list.
pub(crate) fn redact_url(url: &str) -> String {
    split_urls(url)
        .into_iter()
        .map(redact_one_url)
        .collect::<Vec<_>>()
        .join(",")
}

/// Splits a list at the commas that start another `amqp://` or `amqps://`
/// URL, so a comma inside a password stays part of it.
fn split_urls(list: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    for (i, _) in list.match_indices(',') {
        let next = list[i + 1..].trim_start();
        if next.starts_with("amqp://") || next.starts_with("amqps://") {
            parts.push(&list[start..i]);
            start = i + 1;
        }
    }
    parts.push(&list[start..]);
    parts
}

fn redact_one_url(url: &str) -> String {
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

#[cfg(test)]
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use crate::config::{Config, ConfigError};
    use figment::Jail;

    fn load_in_jail() -> Result<Config, ConfigError> {
        Config::load(None)
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
        assert_eq!(
            redact_url("amqp://a:b@h1:5672/%2f,amqp://a:c@h2,amqps://h3"),
            "amqp://a:***@h1:5672/%2f,amqp://a:***@h2,amqps://h3"
        );
        // A comma in a password does not start another URL.
        assert_eq!(
            redact_url("amqp://a:p,w@h1/%2f, amqps://b:x,y@h2"),
            "amqp://a:***@h1/%2f, amqps://b:***@h2"
        );
        assert_eq!(
            AmqpUrl::new("amqp://a:p,w@h1/%2f, amqps://b:x,y@h2")
                .split()
                .len(),
            2
        );
    }
}
