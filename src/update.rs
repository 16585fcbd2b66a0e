//! Update messages (docs/messages.md): parsing and validation, with no I/O.
//!
//! A body is either one update `{"To_Account":"a","Attrs":{…}}` or the API's
//! own request shape `{"UserAttrs":[{…}, …]}`. Anything else is invalid, and
//! the error names the exact rule and field that failed. `Attrs` is a JSON
//! Merge Patch (RFC 7396): a string sets the attribute, `null` removes it.

use std::collections::HashSet;
use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

/// Largest body accepted, in bytes (1 MiB).
pub(crate) const MAX_BODY_BYTES: usize = 1 << 20;
/// Longest account, in bytes.
pub const MAX_ACCOUNT_BYTES: usize = 32;
/// Longest attribute name, in bytes.
pub const MAX_NAME_BYTES: usize = 50;
/// Most attributes per account.
pub const MAX_ATTRS: usize = 10;
/// Most `UserAttrs` entries per message.
pub(crate) const MAX_ENTRIES: usize = 1000;

/// What an update does to one attribute: `Some(value)` sets it, `None`
/// (a JSON `null`) removes it.
pub type Op = Option<String>;

/// One account's update: attribute (name, operation) pairs in arrival order,
/// each name once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountUpdate {
    /// `To_Account`.
    pub account: String,
    /// `(name, operation)` pairs: a value to set, or `None` to remove.
    pub attrs: Vec<(String, Op)>,
}

/// The rule an invalid message broke, naming the field (goes into `x-imattr-error`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidMessage(pub String);

fn invalid(s: impl Into<String>) -> InvalidMessage {
    InvalidMessage(s.into())
}

/// What validation checks beyond the fixed limits.
#[derive(Debug, Clone, Copy)]
pub struct Rules<'a> {
    /// Longest attribute value in bytes (`attributes.max_value_bytes`).
    pub max_value_bytes: usize,
    /// The app's attribute names, when known.
    pub allowed: Option<&'a HashSet<String>>,
}

impl Default for Rules<'_> {
    fn default() -> Self {
        Rules {
            max_value_bytes: 50,
            allowed: None,
        }
    }
}

/// Parses and validates a body into one update per distinct account (several
/// entries for one account inside a message merge in order, later wins).
pub fn parse(body: &[u8], rules: &Rules<'_>) -> Result<Vec<AccountUpdate>, InvalidMessage> {
    if body.len() > MAX_BODY_BYTES {
        return Err(invalid(format!(
            "body is {} bytes, over the {MAX_BODY_BYTES}-byte limit",
            body.len()
        )));
    }
    let text = std::str::from_utf8(body).map_err(|e| {
        invalid(format!(
            "body is not UTF-8 (invalid byte at offset {})",
            e.valid_up_to()
        ))
    })?;
    if !text.trim_start().starts_with('{') {
        return Err(match serde_json::from_str::<IgnoredAny>(text) {
            Err(e) => invalid(format!("body is not valid JSON: {e}")),
            Ok(_) => invalid(
                "body is neither {\"To_Account\":…,\"Attrs\":{…}} nor {\"UserAttrs\":[…]}: it is not a JSON object",
            ),
        });
    }
    let raw: RawMessage = serde_json::from_str(text).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => invalid(format!(
            "body is neither {{\"To_Account\":…,\"Attrs\":{{…}}}} nor {{\"UserAttrs\":[…]}}: {e}"
        )),
        _ => invalid(format!("body is not valid JSON: {e}")),
    })?;

    match (raw.to_account, raw.attrs, raw.user_attrs) {
        (None, None, None) => Err(invalid(
            "body is neither {\"To_Account\":…,\"Attrs\":{…}} nor {\"UserAttrs\":[…]}: it has none of these fields",
        )),
        (to, attrs, None) => {
            let account = check_account("To_Account", to)?;
            let attrs = check_attrs("Attrs", attrs, rules)?;
            Ok(vec![AccountUpdate { account, attrs }])
        }
        (None, None, Some(list)) => {
            let entries = match list {
                RawList::NotArray(kind) => {
                    return Err(invalid(format!("UserAttrs is {kind}, not an array")))
                }
                RawList::TooMany(n) => {
                    return Err(invalid(format!(
                        "UserAttrs holds {n} entries or more, over the {MAX_ENTRIES}-entry limit"
                    )))
                }
                RawList::Entries(e) => e,
            };
            if entries.is_empty() {
                return Err(invalid("UserAttrs is empty"));
            }
            let mut out: Vec<AccountUpdate> = Vec::with_capacity(entries.len());
            for (i, entry) in entries.into_iter().enumerate() {
                let (to, attrs) = match entry {
                    RawEntry::NotObject(kind) => {
                        return Err(invalid(format!("UserAttrs[{i}] is {kind}, not an object")))
                    }
                    RawEntry::Duplicate(field) => {
                        return Err(invalid(format!("UserAttrs[{i}].{field} appears twice")))
                    }
                    RawEntry::Fields { to, attrs } => (to, attrs),
                };
                let account = check_account(&format!("UserAttrs[{i}].To_Account"), to)?;
                let attrs = check_attrs(&format!("UserAttrs[{i}].Attrs"), attrs, rules)?;
                match out.iter_mut().find(|u| u.account == account) {
                    Some(existing) => {
                        merge_attrs(&mut existing.attrs, attrs);
                        if existing.attrs.len() > MAX_ATTRS {
                            return Err(invalid(format!(
                                "UserAttrs: account {account:?} gets {} attributes in all, over the {MAX_ATTRS} limit",
                                existing.attrs.len()
                            )));
                        }
                    }
                    None => out.push(AccountUpdate { account, attrs }),
                }
            }
            Ok(out)
        }
        (_, _, Some(_)) => Err(invalid(
            "body mixes UserAttrs with To_Account/Attrs; use one shape",
        )),
    }
}

/// The account an invalid body names, when it names one plainly (a
/// top-level `To_Account` string of 1 to 32 bytes), for `x-imattr-account`.
pub(crate) fn guess_account(body: &[u8]) -> Option<String> {
    if body.len() > MAX_BODY_BYTES {
        return None;
    }
    #[derive(Deserialize)]
    struct Probe {
        #[serde(rename = "To_Account")]
        to_account: Option<serde_json::Value>,
    }
    let probe: Probe = serde_json::from_slice(body).ok()?;
    match probe.to_account? {
        serde_json::Value::String(s) if !s.is_empty() && s.len() <= MAX_ACCOUNT_BYTES => Some(s),
        _ => None,
    }
}

/// Merges `newer` into `into`: a later operation for the same name wins (a
/// removal replaces a value and the other way round), new names are
/// appended in order.
pub(crate) fn merge_attrs<V>(into: &mut Vec<(String, V)>, newer: Vec<(String, V)>) {
    for (k, v) in newer {
        match into.iter_mut().find(|(name, _)| *name == k) {
            Some(slot) => slot.1 = v,
            None => into.push((k, v)),
        }
    }
}

fn check_account(field: &str, to: Option<Scalar>) -> Result<String, InvalidMessage> {
    match to {
        None => Err(invalid(format!("{field} is missing"))),
        Some(Scalar::Other(kind)) => Err(invalid(format!("{field} is {kind}, not a string"))),
        Some(Scalar::Str(s)) if s.is_empty() => Err(invalid(format!("{field} is empty"))),
        Some(Scalar::Str(s)) if s.len() > MAX_ACCOUNT_BYTES => Err(invalid(format!(
            "{field} is {} bytes, over the {MAX_ACCOUNT_BYTES}-byte limit",
            s.len()
        ))),
        Some(Scalar::Str(s)) => Ok(s),
    }
}

fn check_attrs(
    field: &str,
    attrs: Option<RawAttrs>,
    rules: &Rules<'_>,
) -> Result<Vec<(String, Op)>, InvalidMessage> {
    let pairs = match attrs {
        None => return Err(invalid(format!("{field} is missing"))),
        Some(RawAttrs::NotObject(kind)) => {
            return Err(invalid(format!("{field} is {kind}, not an object")))
        }
        Some(RawAttrs::TooMany) => {
            return Err(invalid(format!(
                "{field} holds more than {MAX_ATTRS} attributes"
            )))
        }
        Some(RawAttrs::Pairs(p)) => p,
    };
    if pairs.is_empty() {
        return Err(invalid(format!("{field} is empty")));
    }
    let mut out: Vec<(String, Op)> = Vec::with_capacity(pairs.len());
    for (name, value) in pairs {
        if name.is_empty() {
            return Err(invalid(format!("{field} has an empty attribute name")));
        }
        if name.len() > MAX_NAME_BYTES {
            return Err(invalid(format!(
                "{field}: attribute name {:?} is {} bytes, over the {MAX_NAME_BYTES}-byte limit",
                truncate(&name, 60),
                name.len()
            )));
        }
        if out.iter().any(|(n, _)| *n == name) {
            return Err(invalid(format!("{field}.{name} appears twice")));
        }
        let value = match value {
            Scalar::Str(v) => Some(v),
            // JSON Merge Patch: null removes the attribute.
            Scalar::Other("null") => None,
            Scalar::Other(kind) => {
                return Err(invalid(format!(
                    "{field}.{name} is {kind}, not a string or null"
                )))
            }
        };
        if let Some(v) = &value {
            if v.len() > rules.max_value_bytes {
                return Err(invalid(format!(
                    "{field}.{name} is {} bytes, over the {}-byte limit",
                    v.len(),
                    rules.max_value_bytes
                )));
            }
        }
        if let Some(allowed) = rules.allowed {
            if !allowed.contains(&name) {
                let mut names: Vec<&str> = allowed.iter().map(String::as_str).collect();
                names.sort_unstable();
                return Err(invalid(format!(
                    "{field}.{name} is not one of the app's attribute names ({})",
                    names.join(", ")
                )));
            }
        }
        out.push((name, value));
    }
    Ok(out)
}

fn truncate(s: &str, max: usize) -> &str {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

// ---- tolerant raw shapes: they accept any JSON so that the validation above
// ---- can say precisely what is wrong.

#[derive(Deserialize)]
struct RawMessage {
    #[serde(rename = "To_Account", default, deserialize_with = "present")]
    to_account: Option<Scalar>,
    #[serde(rename = "Attrs", default, deserialize_with = "present")]
    attrs: Option<RawAttrs>,
    #[serde(rename = "UserAttrs", default, deserialize_with = "present")]
    user_attrs: Option<RawList>,
}

/// A field that is present (even as `null`) is `Some`.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// A string, or the kind of the non-string value.
enum Scalar {
    Str(String),
    Other(&'static str),
}

enum RawAttrs {
    Pairs(Vec<(String, Scalar)>),
    TooMany,
    NotObject(&'static str),
}

enum RawList {
    Entries(Vec<RawEntry>),
    TooMany(usize),
    NotArray(&'static str),
}

enum RawEntry {
    Fields {
        to: Option<Scalar>,
        attrs: Option<RawAttrs>,
    },
    Duplicate(&'static str),
    NotObject(&'static str),
}

/// Implements the non-string/non-container visits of a "kind" visitor.
macro_rules! kind_visits {
    ($out:expr) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok($out("a boolean"))
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok($out("a number"))
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok($out("a number"))
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok($out("a number"))
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok($out("null"))
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok($out("null"))
        }
    };
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            kind_visits!(Scalar::Other);
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Scalar, E> {
                Ok(Scalar::Str(s.to_owned()))
            }
            fn visit_string<E: de::Error>(self, s: String) -> Result<Scalar, E> {
                Ok(Scalar::Str(s))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Scalar, A::Error> {
                while a.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Scalar::Other("an array"))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Scalar, A::Error> {
                while a.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Scalar::Other("an object"))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for RawAttrs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawAttrs;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            kind_visits!(RawAttrs::NotObject);
            fn visit_str<E: de::Error>(self, _: &str) -> Result<RawAttrs, E> {
                Ok(RawAttrs::NotObject("a string"))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<RawAttrs, A::Error> {
                while a.next_element::<IgnoredAny>()?.is_some() {}
                Ok(RawAttrs::NotObject("an array"))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<RawAttrs, A::Error> {
                let mut pairs = Vec::new();
                let mut too_many = false;
                while let Some(k) = a.next_key::<String>()? {
                    if pairs.len() >= MAX_ATTRS {
                        too_many = true;
                        a.next_value::<IgnoredAny>()?;
                        continue;
                    }
                    let v: Scalar = a.next_value()?;
                    pairs.push((k, v));
                }
                Ok(if too_many {
                    RawAttrs::TooMany
                } else {
                    RawAttrs::Pairs(pairs)
                })
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for RawList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawList;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            kind_visits!(RawList::NotArray);
            fn visit_str<E: de::Error>(self, _: &str) -> Result<RawList, E> {
                Ok(RawList::NotArray("a string"))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<RawList, A::Error> {
                while a.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(RawList::NotArray("an object"))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<RawList, A::Error> {
                let mut entries = Vec::new();
                let mut count = 0usize;
                while let Some(e) = a.next_element::<RawEntry>()? {
                    count += 1;
                    if entries.len() < MAX_ENTRIES {
                        entries.push(e);
                    }
                }
                Ok(if count > MAX_ENTRIES {
                    RawList::TooMany(count)
                } else {
                    RawList::Entries(entries)
                })
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for RawEntry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawEntry;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            kind_visits!(RawEntry::NotObject);
            fn visit_str<E: de::Error>(self, _: &str) -> Result<RawEntry, E> {
                Ok(RawEntry::NotObject("a string"))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<RawEntry, A::Error> {
                while a.next_element::<IgnoredAny>()?.is_some() {}
                Ok(RawEntry::NotObject("an array"))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<RawEntry, A::Error> {
                let mut to = None;
                let mut attrs = None;
                let mut dup = None;
                while let Some(k) = a.next_key::<String>()? {
                    match k.as_str() {
                        "To_Account" => {
                            let v: Scalar = a.next_value()?;
                            if to.replace(v).is_some() {
                                dup = Some("To_Account");
                            }
                        }
                        "Attrs" => {
                            let v: RawAttrs = a.next_value()?;
                            if attrs.replace(v).is_some() {
                                dup = Some("Attrs");
                            }
                        }
                        _ => {
                            a.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(match dup {
                    Some(f) => RawEntry::Duplicate(f),
                    None => RawEntry::Fields { to, attrs },
                })
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(body: &str) -> Vec<AccountUpdate> {
        parse(body.as_bytes(), &Rules::default()).unwrap()
    }

    fn err(body: &[u8]) -> String {
        parse(body, &Rules::default()).unwrap_err().0
    }

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, Op)> {
        p.iter()
            .map(|(a, b)| (a.to_string(), Some(b.to_string())))
            .collect()
    }

    /// `(name, Some(value))` sets, `(name, None)` removes.
    fn ops(p: &[(&str, Option<&str>)]) -> Vec<(String, Op)> {
        p.iter()
            .map(|(a, b)| (a.to_string(), b.map(str::to_string)))
            .collect()
    }

    #[test]
    fn single_shape() {
        let u = ok(r#"{"To_Account":"xiaojun012","Attrs":{"sex":"attr1","city":"attr2"}}"#);
        assert_eq!(
            u,
            vec![AccountUpdate {
                account: "xiaojun012".into(),
                attrs: pairs(&[("sex", "attr1"), ("city", "attr2")]),
            }]
        );
    }

    #[test]
    fn api_shape_merges_duplicate_accounts_in_order() {
        let u = ok(
            r#"{"UserAttrs":[{"To_Account":"a","Attrs":{"sex":"1","city":"c"}},{"To_Account":"b","Attrs":{"city":"x"}},{"To_Account":"a","Attrs":{"sex":"2"}}]}"#,
        );
        assert_eq!(u.len(), 2);
        assert_eq!(u[0].account, "a");
        assert_eq!(u[0].attrs, pairs(&[("sex", "2"), ("city", "c")]));
        assert_eq!(u[1].attrs, pairs(&[("city", "x")]));
    }

    #[test]
    fn extra_fields_are_tolerated_and_escapes_decoded() {
        let u = ok(r#"{"To_Account":"a\u00e9","Attrs":{"k":"v\n"},"trace_id":"x"}"#);
        assert_eq!(u[0].account, "aé");
        assert_eq!(u[0].attrs, pairs(&[("k", "v\n")]));
    }

    #[test]
    fn every_rule_is_named() {
        let v51 = "é".repeat(25) + "x"; // 51 bytes, 26 chars
        let a33 = "a".repeat(33);
        let n51 = "n".repeat(51);
        let eleven: String = (0..11)
            .map(|i| format!("\"k{i}\":\"v\""))
            .collect::<Vec<_>>()
            .join(",");
        let many: String = (0..1001)
            .map(|i| format!("{{\"To_Account\":\"u{i}\",\"Attrs\":{{\"k\":\"v\"}}}}"))
            .collect::<Vec<_>>()
            .join(",");
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![0xff, 0xfe, b'{'], "not UTF-8"),
            (b"{\"To_Account\":".to_vec(), "not valid JSON"),
            (
                b"{\"To_Account\":\"a\",\"Attrs\":{\"k\":\"v\"}} trailing".to_vec(),
                "not valid JSON",
            ),
            (
                vec![b' '; MAX_BODY_BYTES + 1],
                "over the 1048576-byte limit",
            ),
            (b"[1,2]".to_vec(), "neither"),
            (b"\"str\"".to_vec(), "neither"),
            (b"{}".to_vec(), "neither"),
            (b"{\"foo\":1}".to_vec(), "neither"),
            (br#"{"Attrs":{"k":"v"}}"#.to_vec(), "To_Account is missing"),
            (
                br#"{"To_Account":"","Attrs":{"k":"v"}}"#.to_vec(),
                "To_Account is empty",
            ),
            (
                br#"{"To_Account":5,"Attrs":{"k":"v"}}"#.to_vec(),
                "To_Account is a number, not a string",
            ),
            (
                br#"{"To_Account":null,"Attrs":{"k":"v"}}"#.to_vec(),
                "To_Account is null",
            ),
            (
                format!(r#"{{"To_Account":"{a33}","Attrs":{{"k":"v"}}}}"#).into_bytes(),
                "To_Account is 33 bytes",
            ),
            (br#"{"To_Account":"a"}"#.to_vec(), "Attrs is missing"),
            (
                br#"{"To_Account":"a","Attrs":[1]}"#.to_vec(),
                "Attrs is an array, not an object",
            ),
            (
                br#"{"To_Account":"a","Attrs":"x"}"#.to_vec(),
                "Attrs is a string, not an object",
            ),
            (
                br#"{"To_Account":"a","Attrs":{}}"#.to_vec(),
                "Attrs is empty",
            ),
            (
                br#"{"To_Account":"a","Attrs":{"k":1}}"#.to_vec(),
                "Attrs.k is a number, not a string",
            ),
            (
                br#"{"To_Account":"a","Attrs":{"k":{"x":1}}}"#.to_vec(),
                "Attrs.k is an object",
            ),
            (
                format!(r#"{{"To_Account":"a","Attrs":{{"k":"{v51}"}}}}"#).into_bytes(),
                "Attrs.k is 51 bytes, over the 50-byte limit",
            ),
            (
                br#"{"To_Account":"a","Attrs":{"":"v"}}"#.to_vec(),
                "empty attribute name",
            ),
            (
                format!(r#"{{"To_Account":"a","Attrs":{{"{n51}":"v"}}}}"#).into_bytes(),
                "is 51 bytes, over the 50-byte limit",
            ),
            (
                format!(r#"{{"To_Account":"a","Attrs":{{{eleven}}}}}"#).into_bytes(),
                "more than 10 attributes",
            ),
            (
                br#"{"To_Account":"a","Attrs":{"k":"v","k":"w"}}"#.to_vec(),
                "Attrs.k appears twice",
            ),
            (
                br#"{"To_Account":"a","To_Account":"b","Attrs":{"k":"v"}}"#.to_vec(),
                "duplicate field",
            ),
            (
                format!(r#"{{"UserAttrs":[{many}]}}"#).into_bytes(),
                "UserAttrs holds 1001 entries",
            ),
            (br#"{"UserAttrs":[]}"#.to_vec(), "UserAttrs is empty"),
            (
                br#"{"UserAttrs":{}}"#.to_vec(),
                "UserAttrs is an object, not an array",
            ),
            (
                br#"{"UserAttrs":[1]}"#.to_vec(),
                "UserAttrs[0] is a number, not an object",
            ),
            (
                br#"{"UserAttrs":[{"To_Account":"a","Attrs":{"k":"v"}},{"Attrs":{"k":"v"}}]}"#
                    .to_vec(),
                "UserAttrs[1].To_Account is missing",
            ),
            (
                br#"{"UserAttrs":[{"To_Account":"a","Attrs":{"k":2}}]}"#.to_vec(),
                "UserAttrs[0].Attrs.k is a number",
            ),
            (
                br#"{"UserAttrs":[{"To_Account":"a","To_Account":"b","Attrs":{"k":"v"}}]}"#
                    .to_vec(),
                "UserAttrs[0].To_Account appears twice",
            ),
            (
                br#"{"UserAttrs":[{"To_Account":"a","Attrs":{"k":"v"}}],"To_Account":"a"}"#
                    .to_vec(),
                "mixes",
            ),
        ];
        for (body, expected) in cases {
            let e = err(&body);
            assert!(
                e.contains(expected),
                "body {:?}: got {e:?}, expected it to contain {expected:?}",
                String::from_utf8_lossy(&body[..body.len().min(80)])
            );
        }
    }

    #[test]
    fn more_than_ten_after_merging_entries() {
        let a: String = (0..6)
            .map(|i| format!("\"a{i}\":\"v\""))
            .collect::<Vec<_>>()
            .join(",");
        let b: String = (0..6)
            .map(|i| format!("\"b{i}\":\"v\""))
            .collect::<Vec<_>>()
            .join(",");
        let body = format!(
            r#"{{"UserAttrs":[{{"To_Account":"x","Attrs":{{{a}}}}},{{"To_Account":"x","Attrs":{{{b}}}}}]}}"#
        );
        assert!(err(body.as_bytes()).contains("12 attributes in all"));
    }

    #[test]
    fn deep_nesting_is_refused_not_a_crash() {
        let body = format!(
            r#"{{"To_Account":"a","Attrs":{{"k":{}1{}}}}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        let e = err(body.as_bytes());
        assert!(e.contains("Attrs.k is an array, not a string"), "{e}");
    }

    #[test]
    fn allowed_names_and_value_limit_come_from_rules() {
        let allowed: HashSet<String> = ["sex".to_string(), "city".to_string()].into();
        let rules = Rules {
            max_value_bytes: 3,
            allowed: Some(&allowed),
        };
        let e = parse(br#"{"To_Account":"a","Attrs":{"age":"1"}}"#, &rules).unwrap_err();
        assert_eq!(
            e.0,
            "Attrs.age is not one of the app's attribute names (city, sex)"
        );
        let e = parse(br#"{"To_Account":"a","Attrs":{"sex":"1234"}}"#, &rules).unwrap_err();
        assert_eq!(e.0, "Attrs.sex is 4 bytes, over the 3-byte limit");
        parse(br#"{"To_Account":"a","Attrs":{"sex":"123"}}"#, &rules).unwrap();
    }

    #[test]
    fn exactly_at_the_limits_is_valid() {
        let v50 = "v".repeat(50);
        let a32 = "a".repeat(32);
        let n50 = "n".repeat(50);
        let ten: String = (0..10)
            .map(|i| format!("\"k{i}\":\"v\""))
            .collect::<Vec<_>>()
            .join(",");
        ok(&format!(
            r#"{{"To_Account":"{a32}","Attrs":{{"{n50}":"{v50}"}}}}"#
        ));
        ok(&format!(r#"{{"To_Account":"a","Attrs":{{{ten}}}}}"#));
        let thousand: String = (0..1000)
            .map(|i| format!("{{\"To_Account\":\"u{i}\",\"Attrs\":{{\"k\":\"v\"}}}}"))
            .collect::<Vec<_>>()
            .join(",");
        assert_eq!(ok(&format!(r#"{{"UserAttrs":[{thousand}]}}"#)).len(), 1000);
    }

    #[test]
    fn guesses_the_account_of_invalid_bodies() {
        assert_eq!(
            guess_account(br#"{"To_Account":"u1","Attrs":{"age":"1"}}"#).as_deref(),
            Some("u1")
        );
        assert_eq!(
            guess_account(br#"{"To_Account":"u1"}"#).as_deref(),
            Some("u1")
        );
        assert_eq!(guess_account(br#"{"To_Account":5}"#), None);
        assert_eq!(guess_account(b"not json"), None);
        assert_eq!(
            guess_account(format!(r#"{{"To_Account":"{}"}}"#, "a".repeat(33)).as_bytes()),
            None
        );
    }

    #[test]
    fn merge_attrs_later_wins() {
        let mut a = pairs(&[("x", "1"), ("y", "1")]);
        merge_attrs(&mut a, pairs(&[("y", "2"), ("z", "2")]));
        assert_eq!(a, pairs(&[("x", "1"), ("y", "2"), ("z", "2")]));
    }

    #[test]
    fn null_removes_in_both_shapes() {
        let u = ok(r#"{"To_Account":"a","Attrs":{"sex":"m","city":null}}"#);
        assert_eq!(u[0].attrs, ops(&[("sex", Some("m")), ("city", None)]));
        let u = ok(
            r#"{"UserAttrs":[{"To_Account":"a","Attrs":{"city":null}},{"To_Account":"b","Attrs":{"sex":null,"city":"x"}}]}"#,
        );
        assert_eq!(u[0].attrs, ops(&[("city", None)]));
        assert_eq!(u[1].attrs, ops(&[("sex", None), ("city", Some("x"))]));
    }

    #[test]
    fn entries_for_one_account_merge_with_the_last_operation_winning() {
        let u = ok(
            r#"{"UserAttrs":[{"To_Account":"a","Attrs":{"sex":"m","city":"x"}},{"To_Account":"a","Attrs":{"sex":null}},{"To_Account":"a","Attrs":{"city":null}},{"To_Account":"a","Attrs":{"city":"y"}}]}"#,
        );
        assert_eq!(u.len(), 1);
        assert_eq!(u[0].attrs, ops(&[("sex", None), ("city", Some("y"))]));
    }

    #[test]
    fn removals_follow_the_name_rules() {
        let allowed: HashSet<String> = ["sex".to_string()].into();
        let rules = Rules {
            max_value_bytes: 3,
            allowed: Some(&allowed),
        };
        let e = parse(br#"{"To_Account":"a","Attrs":{"age":null}}"#, &rules).unwrap_err();
        assert_eq!(
            e.0,
            "Attrs.age is not one of the app's attribute names (sex)"
        );
        let e = parse(br#"{"To_Account":"a","Attrs":{"":null}}"#, &rules).unwrap_err();
        assert!(e.0.contains("empty attribute name"), "{}", e.0);
        // The value limit does not apply to a removal.
        parse(br#"{"To_Account":"a","Attrs":{"sex":null}}"#, &rules).unwrap();
        // Other non-strings are still refused, naming both accepted kinds.
        let e = err(br#"{"To_Account":"a","Attrs":{"sex":true}}"#);
        assert_eq!(e, "Attrs.sex is a boolean, not a string or null");
        // A null account or Attrs is not a removal.
        assert!(err(br#"{"To_Account":"a","Attrs":null}"#).contains("Attrs is null"));
        assert!(err(br#"{"To_Account":null,"Attrs":{"sex":null}}"#).contains("To_Account is null"));
    }

    #[test]
    fn merge_attrs_a_removal_replaces_a_value_and_back() {
        let mut a = ops(&[("x", Some("1")), ("y", None)]);
        merge_attrs(&mut a, ops(&[("x", None), ("y", Some("2")), ("z", None)]));
        assert_eq!(a, ops(&[("x", None), ("y", Some("2")), ("z", None)]));
    }
}
