//! What `dlq replay` republishes for a dead letter (no I/O here).

use std::borrow::Cow;
use std::collections::HashSet;

use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::view::Meta;
use crate::amqp::deadletter::{self, header_i64};

/// `x-imattr-replayed-at`: when `dlq replay` last sent the message back,
/// Unix ms; with `x-imattr-replays` it is the trace `dlq list` shows when the
/// message fails again.
pub(crate) const H_REPLAYED_AT: &str = "x-imattr-replayed-at";

/// A message to republish.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Outgoing {
    /// Its routing key.
    pub(crate) routing_key: String,
    /// Its body.
    pub(crate) body: Vec<u8>,
    /// Its properties.
    pub(crate) properties: BasicProperties,
}

/// The original properties without the `x-imattr-*` headers, plus
/// `x-imattr-replays` incremented; persistent, and without `user_id` (the
/// broker refuses a `user_id` other than the connection's own).
pub(crate) fn replay_properties(p: &BasicProperties) -> BasicProperties {
    let old = p.headers().clone().unwrap_or_default();
    let replays = header_i64(&old, deadletter::H_REPLAYS).unwrap_or(0);
    let mut headers = FieldTable::default();
    for (k, v) in old.inner() {
        if !k.as_str().starts_with("x-imattr-") {
            headers.insert(k.clone(), v.clone());
        }
    }
    headers.insert(
        deadletter::H_REPLAYS.into(),
        AMQPValue::LongLongInt(replays + 1),
    );
    without_user_id(p)
        .with_headers(headers)
        .with_delivery_mode(2)
}

/// The same properties without `user_id`: the broker refuses a message whose
/// `user_id` is not the publishing connection's user.
pub(crate) fn without_user_id(p: &BasicProperties) -> BasicProperties {
    if p.user_id().is_none() {
        return p.clone();
    }
    let mut q = BasicProperties::default();
    macro_rules! copy {
        ($($get:ident => $with:ident),*) => {
            $(if let Some(v) = p.$get().clone() {
                q = q.$with(v);
            })*
        };
    }
    copy!(
        content_type => with_content_type,
        content_encoding => with_content_encoding,
        headers => with_headers,
        delivery_mode => with_delivery_mode,
        priority => with_priority,
        correlation_id => with_correlation_id,
        reply_to => with_reply_to,
        expiration => with_expiration,
        message_id => with_message_id,
        timestamp => with_timestamp,
        kind => with_type,
        app_id => with_app_id,
        cluster_id => with_cluster_id
    );
    q
}

#[derive(Deserialize)]
struct Many<'a> {
    #[serde(rename = "UserAttrs", borrow)]
    user_attrs: Vec<&'a RawValue>,
}

#[derive(Deserialize)]
struct Entry<'a> {
    #[serde(rename = "To_Account", borrow)]
    account: Cow<'a, str>,
}

/// The body holding only the entries of `failed` accounts, byte for byte and
/// in their order, and its routing key when they are all one account's: a
/// single-update body for one entry, else `{"UserAttrs":[…]}`. `None` when the
/// whole body should go (not that shape, no entry matches, or all do), so
/// nothing is ever dropped by mistake.
pub(crate) fn narrow(body: &[u8], failed: &[String]) -> Option<(Vec<u8>, Option<String>)> {
    if failed.is_empty() {
        return None;
    }
    let many: Many<'_> = serde_json::from_slice(body).ok()?;
    let wanted: HashSet<&str> = failed.iter().map(String::as_str).collect();
    let mut kept = Vec::new();
    let mut accounts = HashSet::new();
    for raw in &many.user_attrs {
        // An entry without a readable account cannot be told apart: keep all.
        let e: Entry<'_> = serde_json::from_str(raw.get()).ok()?;
        if wanted.contains(e.account.as_ref()) {
            accounts.insert(e.account.into_owned());
            kept.push(*raw);
        }
    }
    if kept.is_empty() || kept.len() == many.user_attrs.len() {
        return None;
    }
    let routing_key = (accounts.len() == 1)
        .then(|| accounts.into_iter().next())
        .flatten();
    let body = if kept.len() == 1 {
        kept[0].get().as_bytes().to_vec()
    } else {
        let mut b = b"{\"UserAttrs\":[".to_vec();
        for (i, raw) in kept.iter().enumerate() {
            if i > 0 {
                b.push(b',');
            }
            b.extend_from_slice(raw.get().as_bytes());
        }
        b.extend_from_slice(b"]}");
        b
    };
    Some((body, routing_key))
}

/// What replaying a dead letter publishes at `now_ms`: only the failed
/// accounts' entries unless `whole`, to its original routing key, stamped
/// with [`H_REPLAYED_AT`].
pub(crate) fn outgoing(
    meta: &Meta,
    props: &BasicProperties,
    body: &[u8],
    whole: bool,
    now_ms: i64,
) -> Outgoing {
    let original_key = meta.routing_key.clone().unwrap_or_default();
    let narrowed = if whole {
        None
    } else {
        narrow(body, &meta.failed_accounts)
    };
    let (body, routing_key) = match narrowed {
        Some((b, rk)) => (b, rk.unwrap_or(original_key)),
        None => (body.to_vec(), original_key),
    };
    let properties = replay_properties(props);
    let mut headers = properties.headers().clone().unwrap_or_default();
    headers.insert(H_REPLAYED_AT.into(), AMQPValue::LongLongInt(now_ms));
    Outgoing {
        routing_key,
        body,
        properties: properties.with_headers(headers),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::amqp::deadletter::header_str;
    use crate::update::{self, Rules};

    #[test]
    fn replay_strips_imattr_headers_and_counts() {
        let mut h = FieldTable::default();
        h.insert("trace".into(), AMQPValue::LongString("t".into()));
        h.insert(
            deadletter::H_REASON.into(),
            AMQPValue::LongString("rejected".into()),
        );
        h.insert(deadletter::H_REPLAYS.into(), AMQPValue::LongLongInt(2));
        let p = BasicProperties::default()
            .with_message_id("m".into())
            .with_user_id("someone".into())
            .with_headers(h);
        let r = replay_properties(&p);
        let rh = r.headers().as_ref().unwrap();
        assert_eq!(header_i64(rh, deadletter::H_REPLAYS), Some(3));
        assert!(!rh.contains_key(deadletter::H_REASON));
        assert_eq!(header_str(rh, "trace").as_deref(), Some("t"));
        assert_eq!(r.message_id().as_ref().unwrap().as_str(), "m");
        assert_eq!(*r.delivery_mode(), Some(2));
        assert!(r.user_id().is_none());
        let full = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_content_encoding("gzip".into())
            .with_delivery_mode(2)
            .with_priority(3)
            .with_correlation_id("c".into())
            .with_reply_to("r".into())
            .with_expiration("60000".into())
            .with_message_id("m".into())
            .with_timestamp(7)
            .with_type("t".into())
            .with_app_id("a".into())
            .with_cluster_id("cl".into())
            .with_headers(FieldTable::default());
        assert_eq!(
            without_user_id(&full.clone().with_user_id("u".into())),
            full
        );
        let first = replay_properties(&BasicProperties::default());
        assert_eq!(
            header_i64(first.headers().as_ref().unwrap(), deadletter::H_REPLAYS),
            Some(1)
        );
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    const MANY: &str = r#"{"UserAttrs":[{"To_Account":"a","Attrs":{"z":"1","k":"2"}},{"To_Account":"b","Attrs":{"k":"3"}},{"To_Account":"c","Attrs":{"k":"4"}},{"To_Account":"b","Attrs":{"k":"5"}}]}"#;

    #[test]
    fn narrowing_table() {
        type Row<'a> = (&'a str, &'a [&'a str], Option<(&'a str, Option<&'a str>)>);
        let table: &[Row<'_>] = &[
            // One entry left: a single-update body, byte for byte, its own key.
            (
                MANY,
                &["a"],
                Some((r#"{"To_Account":"a","Attrs":{"z":"1","k":"2"}}"#, Some("a"))),
            ),
            // One account's two entries: in order, still that account's key.
            (
                MANY,
                &["b"],
                Some((
                    r#"{"UserAttrs":[{"To_Account":"b","Attrs":{"k":"3"}},{"To_Account":"b","Attrs":{"k":"5"}}]}"#,
                    Some("b"),
                )),
            ),
            // Two accounts: the original routing key.
            (
                MANY,
                &["c", "a", "nobody"],
                Some((
                    r#"{"UserAttrs":[{"To_Account":"a","Attrs":{"z":"1","k":"2"}},{"To_Account":"c","Attrs":{"k":"4"}}]}"#,
                    None,
                )),
            ),
            // Removals (null) stay as they were.
            (
                r#"{"UserAttrs":[{"To_Account":"a","Attrs":{"k":null}},{"To_Account":"b","Attrs":{"k":"1","z":null}}]}"#,
                &["b"],
                Some((
                    r#"{"To_Account":"b","Attrs":{"k":"1","z":null}}"#,
                    Some("b"),
                )),
            ),
            // Whole body: every account failed, none matches, no header, other shapes.
            (MANY, &["a", "b", "c"], None),
            (MANY, &["x"], None),
            (MANY, &[], None),
            (r#"{"To_Account":"a","Attrs":{"k":"1"}}"#, &["a"], None),
            ("not json", &["a"], None),
            (
                r#"{"UserAttrs":[{"Attrs":{}},{"To_Account":"a","Attrs":{}}]}"#,
                &["a"],
                None,
            ),
        ];
        for (body, failed, want) in table {
            let got = narrow(body.as_bytes(), &s(failed));
            let want = want.map(|(b, rk)| (b.as_bytes().to_vec(), rk.map(String::from)));
            assert_eq!(got, want, "{body} {failed:?}");
            if let Some((b, _)) = &got {
                assert!(update::parse(b, &Rules::default()).is_ok());
            }
        }
    }

    #[test]
    fn outgoing_uses_the_failed_accounts_unless_whole() {
        let meta = Meta {
            routing_key: Some("orig".into()),
            failed_accounts: s(&["c"]),
            ..Meta::default()
        };
        let p = BasicProperties::default();
        let o = outgoing(&meta, &p, MANY.as_bytes(), false, 77);
        let h = o.properties.headers().clone().unwrap();
        assert_eq!(header_i64(&h, H_REPLAYED_AT), Some(77));
        assert_eq!(o.routing_key, "c");
        assert_eq!(o.body, br#"{"To_Account":"c","Attrs":{"k":"4"}}"#);
        let w = outgoing(&meta, &p, MANY.as_bytes(), true, 77);
        assert_eq!(w.routing_key, "orig");
        assert_eq!(w.body, MANY.as_bytes());
        let none = outgoing(&Meta::default(), &p, b"x", false, 77);
        assert_eq!(none.routing_key, "");
    }
}
