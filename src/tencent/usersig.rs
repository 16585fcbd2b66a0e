//! UserSig, TLSSigAPIv2 (docs/operations.md, UserSig problems): generation, verification and a
//! caching signer that renews before expiry.

use std::io::{Read, Write};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::config::Secret;

type HmacSha256 = Hmac<Sha256>;

/// Why a UserSig was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserSigError {
    /// Not base64url, not zlib, or not the expected JSON document.
    #[error("usersig cannot be decoded: {0}")]
    Undecodable(String),
    /// The HMAC does not match the content under this key.
    #[error("usersig signature does not match")]
    BadSignature,
    /// Signed for another identifier.
    #[error("usersig identifier {found:?} differs from {expected:?}")]
    IdentifierMismatch {
        /// In the document.
        found: String,
        /// Expected.
        expected: String,
    },
    /// Signed for another SDKAppID.
    #[error("usersig sdkappid {found} differs from {expected}")]
    SdkAppIdMismatch {
        /// In the document.
        found: u64,
        /// Expected.
        expected: u64,
    },
    /// `time + expire` is in the past.
    #[error("usersig expired at {expired_at}")]
    Expired {
        /// Unix seconds.
        expired_at: u64,
    },
}

/// The decoded JSON document inside a UserSig (its `Debug` hides the signature).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigDoc {
    /// Always "2.0".
    #[serde(rename = "TLS.ver")]
    pub(crate) ver: String,
    /// The identifier signed for.
    #[serde(rename = "TLS.identifier")]
    pub(crate) identifier: String,
    /// The SDKAppID.
    #[serde(rename = "TLS.sdkappid")]
    pub(crate) sdkappid: u64,
    /// Lifetime in seconds.
    #[serde(rename = "TLS.expire")]
    pub expire: u64,
    /// Unix seconds of signing.
    #[serde(rename = "TLS.time")]
    pub(crate) time: u64,
    /// base64 HMAC-SHA256.
    #[serde(rename = "TLS.sig")]
    pub(crate) sig: String,
}

/// Unix time now, in seconds.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The `TLS.sig` field: base64 HMAC-SHA256 of the content string.
pub(crate) fn hmac_sig(
    key: &str,
    identifier: &str,
    sdkappid: u64,
    time: u64,
    expire: u64,
) -> String {
    let content = format!(
        "TLS.identifier:{identifier}\nTLS.sdkappid:{sdkappid}\nTLS.time:{time}\nTLS.expire:{expire}\n"
    );
    let mut mac = HmacSha256::new_from_slice(key.as_bytes()).expect("HMAC takes keys of any size");
    mac.update(content.as_bytes());
    STANDARD.encode(mac.finalize().into_bytes())
}

/// Generates a UserSig signed at `time` (Unix seconds) valid for `expire` seconds.
pub fn gen_usersig_at(
    key: &str,
    sdkappid: u64,
    identifier: &str,
    time: u64,
    expire: u64,
) -> String {
    let doc = SigDoc {
        ver: "2.0".into(),
        identifier: identifier.into(),
        sdkappid,
        expire,
        time,
        sig: hmac_sig(key, identifier, sdkappid, time, expire),
    };
    let json = serde_json::to_vec(&doc).expect("a SigDoc always serialises");
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(&json).expect("writing to a Vec cannot fail");
    let compressed = z.finish().expect("writing to a Vec cannot fail");
    STANDARD
        .encode(compressed)
        .chars()
        .map(|c| match c {
            '+' => '*',
            '/' => '-',
            '=' => '_',
            c => c,
        })
        .collect()
}

/// Decodes a UserSig into its document without checking anything.
pub(crate) fn decode_usersig(usersig: &str) -> Result<SigDoc, UserSigError> {
    let b64: String = usersig
        .chars()
        .map(|c| match c {
            '*' => '+',
            '-' => '/',
            '_' => '=',
            c => c,
        })
        .collect();
    let compressed = STANDARD
        .decode(b64.as_bytes())
        .map_err(|e| UserSigError::Undecodable(format!("base64: {e}")))?;
    let mut json = Vec::new();
    flate2::read::ZlibDecoder::new(&compressed[..])
        .take(64 * 1024)
        .read_to_end(&mut json)
        .map_err(|e| UserSigError::Undecodable(format!("zlib: {e}")))?;
    serde_json::from_slice(&json).map_err(|e| UserSigError::Undecodable(format!("json: {e}")))
}

/// Verifies a UserSig: decodes it, checks the HMAC, identifier, sdkappid and expiry.
pub fn verify_usersig(
    usersig: &str,
    key: &str,
    sdkappid: u64,
    identifier: &str,
    now: u64,
) -> Result<SigDoc, UserSigError> {
    let doc = decode_usersig(usersig)?;
    let mut mac = HmacSha256::new_from_slice(key.as_bytes()).expect("HMAC takes keys of any size");
    mac.update(
        format!(
            "TLS.identifier:{}\nTLS.sdkappid:{}\nTLS.time:{}\nTLS.expire:{}\n",
            doc.identifier, doc.sdkappid, doc.time, doc.expire
        )
        .as_bytes(),
    );
    let given = STANDARD
        .decode(doc.sig.as_bytes())
        .map_err(|_| UserSigError::BadSignature)?;
    if mac.verify_slice(&given).is_err() {
        return Err(UserSigError::BadSignature);
    }
    if doc.sdkappid != sdkappid {
        return Err(UserSigError::SdkAppIdMismatch {
            found: doc.sdkappid,
            expected: sdkappid,
        });
    }
    if doc.identifier != identifier {
        return Err(UserSigError::IdentifierMismatch {
            found: doc.identifier,
            expected: identifier.into(),
        });
    }
    let expired_at = doc.time.saturating_add(doc.expire);
    if expired_at <= now {
        return Err(UserSigError::Expired { expired_at });
    }
    Ok(doc)
}

impl std::fmt::Debug for SigDoc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigDoc")
            .field("ver", &self.ver)
            .field("identifier", &self.identifier)
            .field("sdkappid", &self.sdkappid)
            .field("expire", &self.expire)
            .field("time", &self.time)
            .field("sig", &"<redacted>")
            .finish()
    }
}

/// Supplies the usersig for each request: a fixed one, or one generated from
/// the secret key, cached and renewed when less than half its TTL remains.
/// Its `Debug` shows neither the key nor a usersig.
pub struct Signer {
    sdkappid: u64,
    identifier: String,
    ttl_secs: u64,
    source: SigSource,
    cache: Mutex<Option<(String, u64)>>,
    renewals: std::sync::atomic::AtomicU64,
}

/// Where usersigs come from; the `Secret`s redact themselves in `Debug`.
#[derive(Debug)]
enum SigSource {
    Key(Secret),
    Fixed(Secret),
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("sdkappid", &self.sdkappid)
            .field("identifier", &self.identifier)
            .field("ttl_secs", &self.ttl_secs)
            .field("source", &self.source)
            .field("renewals", &self.renewals())
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// A signer that generates usersigs from `key`.
    pub fn from_key(key: Secret, sdkappid: u64, identifier: &str, ttl_secs: u64) -> Self {
        Self::new(SigSource::Key(key), sdkappid, identifier, ttl_secs)
    }

    /// A signer that always hands out `usersig`.
    pub(crate) fn fixed(usersig: Secret, sdkappid: u64, identifier: &str) -> Self {
        Self::new(SigSource::Fixed(usersig), sdkappid, identifier, 0)
    }

    fn new(source: SigSource, sdkappid: u64, identifier: &str, ttl_secs: u64) -> Self {
        Signer {
            sdkappid,
            identifier: identifier.into(),
            ttl_secs,
            source,
            cache: Mutex::new(None),
            renewals: Default::default(),
        }
    }

    /// The signer the configuration asks for.
    pub(crate) fn from_config(t: &crate::config::TencentConfig) -> Self {
        if t.secret_key.is_empty() {
            Self::fixed(t.usersig.clone(), t.sdkappid, &t.identifier)
        } else {
            Self::from_key(
                t.secret_key.clone(),
                t.sdkappid,
                &t.identifier,
                t.usersig_ttl_secs,
            )
        }
    }

    pub(crate) fn sdkappid(&self) -> u64 {
        self.sdkappid
    }

    /// The administrator identifier.
    pub(crate) fn identifier(&self) -> &str {
        &self.identifier
    }

    /// How many usersigs were generated so far.
    pub fn renewals(&self) -> u64 {
        self.renewals.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The current usersig, renewed first if less than half its TTL remains.
    pub fn usersig(&self) -> String {
        self.usersig_at(unix_now())
    }

    fn usersig_at(&self, now: u64) -> String {
        match &self.source {
            SigSource::Fixed(s) => s.expose().to_string(),
            SigSource::Key(key) => {
                let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
                if let Some((sig, made_at)) = cache.as_ref() {
                    if now < made_at + self.ttl_secs / 2 {
                        return sig.clone();
                    }
                }
                let sig = gen_usersig_at(
                    key.expose(),
                    self.sdkappid,
                    &self.identifier,
                    now,
                    self.ttl_secs,
                );
                *cache = Some((sig.clone(), now));
                self.renewals
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                sig
            }
        }
    }

    /// Whether [`Signer::invalidate`] can get a fresh usersig (false for a fixed one).
    pub(crate) fn is_renewable(&self) -> bool {
        matches!(self.source, SigSource::Key(_))
    }

    /// Drops the cached usersig so that the next request gets a fresh one
    /// (after a signature-class answer). Returns false for a fixed usersig,
    /// which cannot be renewed.
    pub(crate) fn invalidate(&self) -> bool {
        match &self.source {
            SigSource::Fixed(_) => false,
            SigSource::Key(_) => {
                *self.cache.lock().unwrap_or_else(|p| p.into_inner()) = None;
                true
            }
        }
    }

    /// A usersig for another identifier (for `imattr sig --identifier`).
    pub(crate) fn usersig_for(&self, identifier: &str) -> Option<String> {
        match &self.source {
            SigSource::Fixed(_) => None,
            SigSource::Key(key) => Some(gen_usersig_at(
                key.expose(),
                self.sdkappid,
                identifier,
                unix_now(),
                self.ttl_secs,
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "5bd2850fff3ecb11d7c805251c51ee463a25727bddc2385f3fa8bfee1bb93b5e";

    #[test]
    fn contract_test_vectors() {
        assert_eq!(
            hmac_sig(KEY, "xiaojun", 1400000000, 1700000000, 15552000),
            "LvA7d/Iw7gSsnskvVzBDPOCCDbuNCw4GHwTC0bip+B4="
        );
        assert_eq!(
            hmac_sig(KEY, "administrator", 1400000000, 1700000000, 86400),
            "yLAe+w7WUeUuqbV9h/TX78u21oTGi+i9Zp1u3PpnY60="
        );
    }

    #[test]
    fn generated_decodes_field_by_field() {
        let s = gen_usersig_at(KEY, 1400000000, "xiaojun", 1700000000, 15552000);
        assert!(!s.contains(['+', '/', '=']));
        let d = decode_usersig(&s).unwrap();
        assert_eq!(d.ver, "2.0");
        assert_eq!(d.identifier, "xiaojun");
        assert_eq!(d.sdkappid, 1400000000);
        assert_eq!(d.time, 1700000000);
        assert_eq!(d.expire, 15552000);
        assert_eq!(d.sig, "LvA7d/Iw7gSsnskvVzBDPOCCDbuNCw4GHwTC0bip+B4=");
    }

    #[test]
    fn round_trip_and_refusals() {
        let now = 1700000100;
        let s = gen_usersig_at(KEY, 1400000000, "administrator", 1700000000, 86400);
        let d = verify_usersig(&s, KEY, 1400000000, "administrator", now).unwrap();
        assert_eq!(d.sig, "yLAe+w7WUeUuqbV9h/TX78u21oTGi+i9Zp1u3PpnY60=");

        assert_eq!(
            verify_usersig(&s, "another-key", 1400000000, "administrator", now),
            Err(UserSigError::BadSignature)
        );
        assert!(matches!(
            verify_usersig(&s, KEY, 1400000000, "someone", now),
            Err(UserSigError::IdentifierMismatch { .. })
        ));
        assert!(matches!(
            verify_usersig(&s, KEY, 1400000001, "administrator", now),
            Err(UserSigError::SdkAppIdMismatch { .. })
        ));
        assert_eq!(
            verify_usersig(&s, KEY, 1400000000, "administrator", 1700086400),
            Err(UserSigError::Expired {
                expired_at: 1700086400
            })
        );
        assert!(matches!(
            verify_usersig("!!not-base64!!", KEY, 1400000000, "administrator", now),
            Err(UserSigError::Undecodable(_))
        ));

        // Tamper: change the signed time without re-signing.
        let mut doc = decode_usersig(&s).unwrap();
        doc.time += 1;
        let json = serde_json::to_vec(&doc).unwrap();
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        z.write_all(&json).unwrap();
        let tampered: String = STANDARD
            .encode(z.finish().unwrap())
            .replace('+', "*")
            .replace('/', "-")
            .replace('=', "_");
        assert_eq!(
            verify_usersig(&tampered, KEY, 1400000000, "administrator", now),
            Err(UserSigError::BadSignature)
        );
    }

    #[test]
    fn signer_caches_and_renews_at_half_ttl() {
        let s = Signer::from_key(Secret::new(KEY), 1400000000, "administrator", 1000);
        let a = s.usersig_at(10_000);
        assert_eq!(s.usersig_at(10_499), a);
        assert_eq!(s.renewals(), 1);
        let b = s.usersig_at(10_500);
        assert_ne!(a, b);
        assert_eq!(s.renewals(), 2);
        assert!(s.invalidate());
        let c = s.usersig_at(10_501);
        assert_ne!(b, c);
        assert_eq!(s.renewals(), 3);
        verify_usersig(&c, KEY, 1400000000, "administrator", 10_600).unwrap();

        let f = Signer::fixed(Secret::new("FIXED"), 1, "admin");
        assert_eq!(f.usersig(), "FIXED");
        assert!(!f.invalidate());
        assert!(f.usersig_for("x").is_none());
    }
}
