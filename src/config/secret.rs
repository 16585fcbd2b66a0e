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
/// The URL list with every password hidden. Fails closed: a URL whose
/// userinfo the URL parser reads differently from the plain text (or that
/// does not parse) shows none of it, and a list whose URLs do not all carry
/// the same userinfo (a password holding `,amqp://` splits differently than
/// meant) is hidden as one URL.
pub(crate) fn redact_url(url: &str) -> String {
    let parts = split_urls(url);
    let userinfo = |p: &str| userinfo_span(p).map(|(s, e)| p[s..e].to_string());
    let first = parts.first().map(|p| userinfo(p));
    if parts.iter().any(|p| Some(userinfo(p)) != first) {
        return redact_one_url(url);
    }
    parts
        .into_iter()
        .map(redact_one_url)
        .collect::<Vec<_>>()
        .join(",")
}

/// Whether every URL of a comma-separated list carries the same userinfo
/// (RabbitMQ's users are the cluster's, so the nodes of one list share it).
pub(crate) fn same_userinfo_everywhere(list: &str) -> bool {
    let parts = split_urls(list);
    let span = |p: &str| userinfo_span(p).map(|(s, e)| p[s..e].to_string());
    parts
        .windows(2)
        .all(|w| span(w[0].trim()) == span(w[1].trim()))
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

/// Where a URL's userinfo would be, as byte offsets: from after the
/// scheme's `:` and the slashes that follow it (from the start without
/// one) to the last `@`, whatever lies between. None without an `@`.
fn userinfo_span(url: &str) -> Option<(usize, usize)> {
    let at = url.rfind('@')?;
    let start = match url[..at].find(':') {
        Some(colon) => {
            let after = &url[colon + 1..at];
            colon + 1 + (after.len() - after.trim_start_matches('/').len())
        }
        None => 0,
    };
    Some((start, at))
}

/// The user of `url` when the URL parser agrees, byte for byte, that
/// `userinfo` is its userinfo and that a host follows; else None.
fn parsed_user<'a>(url: &str, userinfo: &'a str) -> Option<(&'a str, bool)> {
    let parsed = url::Url::parse(url).ok()?;
    if !parsed.has_host() {
        return None;
    }
    let read = match parsed.password() {
        Some(p) => format!("{}:{p}", parsed.username()),
        None => parsed.username().to_string(),
    };
    if read != userinfo {
        return None;
    }
    match userinfo.split_once(':') {
        Some((user, _)) => Some((user, true)),
        None => Some((userinfo, false)),
    }
}

/// Whether the URL parser reads `url`'s userinfo exactly as written (or
/// there is none): what validation demands, so that a valid URL is shown as
/// `user:***@host`.
pub(crate) fn userinfo_reads_as_written(url: &str) -> bool {
    match userinfo_span(url) {
        Some((start, at)) => parsed_user(url, &url[start..at]).is_some(),
        None => true,
    }
}

fn redact_one_url(url: &str) -> String {
    let Some((start, at)) = userinfo_span(url) else {
        return url.to_string();
    };
    match parsed_user(url, &url[start..at]) {
        // A user without a password hides nothing.
        Some((_, false)) => url.to_string(),
        Some((user, true)) => format!("{}{user}:***{}", &url[..start], &url[at..]),
        None => format!("{}***{}", &url[..start], &url[at..]),
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
        // A wrong-typed secret is reported without its value.
        Jail::expect_with(|jail| {
            jail.create_dir("config")?;
            jail.create_file("config/imattr.toml", "[tencent]\nusersig = [1234567,2]\n")?;
            let err = load_in_jail().unwrap_err().to_string();
            assert!(err.contains("tencent.usersig"), "{err}");
            assert!(!err.contains("1234567"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn redact_url_forms() {
        let cases = [
            ("amqp://a:b@h/%2f", "amqp://a:***@h/%2f"),
            ("amqp://h:5672", "amqp://h:5672"),
            ("amqps://u@h", "amqps://u@h"),
            // The URL parser reads another userinfo (it would encode `:`):
            // none of it is shown.
            ("amqp://u:p:q@h", "amqp://***@h"),
            // Unparseable or misread: nothing between `//` (or `:`) and the last `@`.
            (
                "amqp:/guest:s3cr3tpw@127.0.0.1:5672/%2f",
                "amqp:/***@127.0.0.1:5672/%2f",
            ),
            (
                "amqp://guest:pa/ss#word@127.0.0.1:5672/%2f",
                "amqp://***@127.0.0.1:5672/%2f",
            ),
            ("amqp:guest:pw@h", "amqp:***@h"),
            ("guest:pw@h", "guest:***@h"),
            ("amqp://u:p@ss@h/", "amqp://***@h/"),
            ("amqp://u:1/ss@h", "amqp://***@h"),
            ("amqp://u:p%40ss@h/", "amqp://u:***@h/"),
            (
                "amqp://a:b@h1:5672/%2f,amqp://a:b@h2,amqps://a:b@h3",
                "amqp://a:***@h1:5672/%2f,amqp://a:***@h2,amqps://a:***@h3",
            ),
            // A comma in a password does not start another URL.
            (
                "amqp://a:p,w@h1/%2f, amqps://a:p,w@h2",
                "amqp://a:***@h1/%2f, amqps://a:***@h2",
            ),
            // URLs of a list that disagree on their userinfo may have been
            // split inside a password: hidden as one.
            ("amqp://u:x,amqp://y@h", "amqp://***@h"),
            ("amqp://u:1,amqp://y@h", "amqp://***@h"),
            ("amqp://h1,amqp://u:p@h2", "amqp://***@h2"),
        ];
        for (url, shown) in cases {
            assert_eq!(redact_url(url), shown, "{url}");
        }
        assert_eq!(
            AmqpUrl::new("amqp://a:p,w@h1/%2f, amqps://a:p,w@h2")
                .split()
                .len(),
            2
        );
        assert!(same_userinfo_everywhere("amqp://a:b@h1,amqp://a:b@h2"));
        assert!(same_userinfo_everywhere("amqp://h1,amqp://h2"));
        assert!(!same_userinfo_everywhere("amqp://a:b@h1,amqp://a:c@h2"));
        assert!(!same_userinfo_everywhere("amqp://u:x,amqp://y@h"));
    }
}
