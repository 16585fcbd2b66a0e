//! Who may use the console: anyone on a loopback listener without
//! authentication configured, else the holder of the token (as a bearer token,
//! or as the password of HTTP basic so that a browser can log in) or the user
//! whose password matches the argon2 hash.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Mutex;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use axum::http::header::AUTHORIZATION;
use axum::http::HeaderMap;
use base64::Engine;
use sha2::{Digest, Sha256};

use crate::config::{ConfigError, ConsoleConfig, Secret};

/// Who made a request, for the action logs and the page header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Who {
    /// No authentication configured (a loopback listener).
    Anonymous,
    /// The holder of the token.
    Token,
    /// The HTTP basic user.
    User(String),
}

impl std::fmt::Display for Who {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Who::Anonymous => f.write_str("anonymous"),
            Who::Token => f.write_str("token"),
            Who::User(u) => write!(f, "user {u}"),
        }
    }
}

/// The configured authentication, files read. Each credential configured
/// lets in (a token in the configuration and one in a file both do).
pub struct Access {
    tokens: Vec<Secret>,
    /// The basic user and the hashes of its password.
    basic: Option<(String, Vec<String>)>,
    /// SHA-256 of `user:password` pairs argon2 accepted already: argon2 is
    /// slow on purpose, and a browser sends the credentials with every request.
    verified: Mutex<HashSet<[u8; 32]>>,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("tokens", &self.tokens.len())
            .field("user", &self.basic.as_ref().map(|(u, _)| u))
            .finish()
    }
}

/// At most this many accepted credentials are remembered (then forgotten at once).
const VERIFIED_CAP: usize = 64;

impl Access {
    /// Reads the configured credentials; refuses (a configuration error, exit
    /// 2) a listener on `listen` that is not a loopback address when none is
    /// configured.
    pub fn from_config(c: &ConsoleConfig, listen: SocketAddr) -> Result<Access, ConfigError> {
        let mut tokens = Vec::new();
        if !c.token.is_empty() {
            tokens.push(c.token.clone());
        }
        if !c.token_file.is_empty() {
            tokens.push(Secret::new(first_line(
                &c.token_file,
                "console.token_file",
            )?));
        }
        let basic = if c.user.is_empty() {
            None
        } else {
            let mut hashes = Vec::new();
            if !c.password_hash.is_empty() {
                let hash = c.password_hash.expose().to_string();
                check_hash(&hash).map_err(|e| ConfigError::invalid("console.password_hash", e))?;
                hashes.push(hash);
            }
            if !c.password_hash_file.is_empty() {
                let hash = first_line(&c.password_hash_file, "console.password_hash_file")?;
                check_hash(&hash)
                    .map_err(|e| ConfigError::invalid("console.password_hash_file", e))?;
                hashes.push(hash);
            }
            Some((c.user.clone(), hashes))
        };
        if tokens.is_empty() && basic.is_none() && !listen.ip().is_loopback() {
            return Err(ConfigError::invalid(
                "console",
                format!(
                    "the console would listen on {listen}, not a loopback address, without \
                     authentication: set console.token (or console.token_file), or console.user \
                     and console.password_hash, or listen on 127.0.0.1"
                ),
            ));
        }
        Ok(Access {
            tokens,
            basic,
            verified: Mutex::new(HashSet::new()),
        })
    }

    /// Whether any credentials are asked for.
    pub fn required(&self) -> bool {
        !self.tokens.is_empty() || self.basic.is_some()
    }

    /// Who sent a request with these headers; `None`: not allowed in.
    pub fn check(&self, headers: &HeaderMap) -> Option<Who> {
        if !self.required() {
            return Some(Who::Anonymous);
        }
        let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
        let (scheme, rest) = value.split_once(' ')?;
        let rest = rest.trim();
        let is_token = |s: &str| {
            self.tokens
                .iter()
                .any(|t| ct_eq(s.as_bytes(), t.expose().as_bytes()))
        };
        if scheme.eq_ignore_ascii_case("bearer") {
            return is_token(rest).then_some(Who::Token);
        }
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .ok()?;
        let decoded = String::from_utf8(decoded).ok()?;
        let (user, password) = decoded.split_once(':')?;
        if is_token(password) {
            return Some(Who::Token);
        }
        let (want_user, hashes) = self.basic.as_ref()?;
        if user != want_user {
            return None;
        }
        let key: [u8; 32] = Sha256::digest(decoded.as_bytes()).into();
        if lock(&self.verified).contains(&key) {
            return Some(Who::User(user.to_string()));
        }
        if !hashes.iter().any(|h| verify(password, h)) {
            return None;
        }
        let mut verified = lock(&self.verified);
        if verified.len() >= VERIFIED_CAP {
            verified.clear();
        }
        verified.insert(key);
        Some(Who::User(user.to_string()))
    }
}

/// The first line of a credentials file, trimmed; an error names the key.
fn first_line(path: &str, field: &'static str) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::invalid(field, format!("cannot read {path}: {e}")))?;
    let line = text.lines().next().unwrap_or("").trim().to_string();
    if line.is_empty() {
        return Err(ConfigError::invalid(field, format!("{path} is empty")));
    }
    Ok(line)
}

/// Whether `hash` is an argon2 PHC string; the error says what is expected
/// (never the value).
pub(crate) fn check_hash(hash: &str) -> Result<(), String> {
    let bad = || {
        "is not an argon2 hash ($argon2id$v=19$m=…,t=…,p=…$SALT$HASH); make one with \
         `imattr console --hash-password`"
            .to_string()
    };
    let parsed = PasswordHash::new(hash).map_err(|_| bad())?;
    if !parsed.algorithm.as_str().starts_with("argon2") || parsed.hash.is_none() {
        return Err(bad());
    }
    Ok(())
}

/// Whether `password` matches the argon2 `hash` (its own parameters apply).
fn verify(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash).ok().is_some_and(|h| {
        Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

/// An argon2id hash of `password` with a random salt and argon2's default
/// parameters, as `console.password_hash` takes it.
pub fn hash_password(password: &str) -> anyhow::Result<String> {
    let salt_bytes: [u8; 16] = rand::random();
    let salt = SaltString::encode_b64(&salt_bytes)
        .map_err(|e| anyhow::anyhow!("encoding the salt: {e}"))?;
    let hash = Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| anyhow::anyhow!("hashing the password: {e}"))?;
    Ok(hash.to_string())
}

/// Compares without stopping at the first difference (a token's prefix
/// must not be learnable from response times).
pub(crate) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    let (ha, hb) = (Sha256::digest(a), Sha256::digest(b));
    ha.iter()
        .zip(hb.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_str(auth).unwrap());
        h
    }

    fn basic(user: &str, password: &str) -> String {
        let b = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        format!("Basic {b}")
    }

    /// A cheap hash for tests (argon2's defaults take long in a debug build).
    fn cheap_hash(password: &str) -> String {
        let params = argon2::Params::new(64, 1, 1, None).unwrap();
        let a = Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
        a.hash_password(password.as_bytes(), &salt)
            .unwrap()
            .to_string()
    }

    fn loopback() -> SocketAddr {
        "127.0.0.1:9464".parse().unwrap()
    }

    #[test]
    fn a_non_loopback_listener_needs_authentication() {
        let open = ConsoleConfig::default();
        let e = Access::from_config(&open, "0.0.0.0:9464".parse().unwrap()).unwrap_err();
        assert!(e.to_string().contains("not a loopback address"), "{e}");
        assert!(Access::from_config(&open, "[::1]:9464".parse().unwrap()).is_ok());
        let a = Access::from_config(&open, loopback()).unwrap();
        assert_eq!(a.check(&HeaderMap::new()), Some(Who::Anonymous));
        let with_token = ConsoleConfig {
            token: Secret::new("s3cret"),
            ..ConsoleConfig::default()
        };
        assert!(Access::from_config(&with_token, "0.0.0.0:9464".parse().unwrap()).is_ok());
    }

    #[test]
    fn the_token_as_bearer_or_basic_password() {
        let c = ConsoleConfig {
            token: Secret::new("s3cret"),
            ..ConsoleConfig::default()
        };
        let a = Access::from_config(&c, loopback()).unwrap();
        assert_eq!(a.check(&HeaderMap::new()), None);
        assert_eq!(a.check(&headers("Bearer s3cret")), Some(Who::Token));
        assert_eq!(a.check(&headers("bearer s3cret")), Some(Who::Token));
        assert_eq!(a.check(&headers("Bearer s3cre")), None);
        assert_eq!(
            a.check(&headers(&basic("anyone", "s3cret"))),
            Some(Who::Token)
        );
        assert_eq!(a.check(&headers(&basic("anyone", "nope"))), None);
        assert_eq!(a.check(&headers("Digest s3cret")), None);
        assert!(!format!("{a:?}").contains("s3cret"));
    }

    #[test]
    fn basic_with_a_hashed_password() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("hash");
        std::fs::write(&file, format!("{}\n", cheap_hash("pw"))).unwrap();
        let c = ConsoleConfig {
            user: "ops".into(),
            password_hash_file: file.display().to_string(),
            ..ConsoleConfig::default()
        };
        let a = Access::from_config(&c, "0.0.0.0:1".parse().unwrap()).unwrap();
        assert_eq!(
            a.check(&headers(&basic("ops", "pw"))),
            Some(Who::User("ops".into()))
        );
        // Remembered, and still right.
        assert_eq!(
            a.check(&headers(&basic("ops", "pw"))),
            Some(Who::User("ops".into()))
        );
        assert_eq!(a.check(&headers(&basic("ops", "wrong"))), None);
        assert_eq!(a.check(&headers(&basic("other", "pw"))), None);
        assert_eq!(a.check(&headers("Bearer pw")), None);
        // An empty or missing file is named.
        std::fs::write(&file, "\n").unwrap();
        let e = Access::from_config(&c, loopback()).unwrap_err();
        assert!(e.to_string().contains("console.password_hash_file"), "{e}");
    }

    #[test]
    fn hashes_are_checked_and_made() {
        assert!(check_hash("plain text").is_err());
        assert!(check_hash(&cheap_hash("x")).is_ok());
        let e = check_hash("$5$rounds=5000$salt$abc").unwrap_err();
        assert!(e.contains("--hash-password"), "{e}");
        // What --hash-password prints verifies.
        let made = hash_password("pw").unwrap();
        assert!(made.starts_with("$argon2id$"), "{made}");
        assert!(verify("pw", &made));
        assert!(!verify("pW", &made));
    }

    #[test]
    fn constant_time_equality() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"abcd"));
    }
}
