//! What a dead letter says about itself, read from its headers with no I/O:
//! imattr's own `x-imattr-*` headers, or RabbitMQ's `x-death` ones for dead
//! letters the broker made itself (expiry, max length, delivery limit).

use std::io::Write;

use base64::Engine;
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use serde::Serialize;

use crate::amqp::deadletter::{self, header_i64, header_str, table_to_json};

/// The prefix of the reason of dead letters RabbitMQ made itself, followed by
/// `x-first-death-reason`: `broker:expired`, `broker:maxlen`,
/// `broker:delivery_limit` or `broker:rejected`.
pub(crate) const BROKER_REASON_PREFIX: &str = "broker:";

/// Every reason `--reason` accepts.
pub(crate) const REASONS: [&str; 7] = [
    "invalid-message",
    "rejected",
    "retries-exhausted",
    "broker:expired",
    "broker:maxlen",
    "broker:delivery_limit",
    "broker:rejected",
];

/// The facts about one dead letter that the tools show, count and filter on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Meta {
    /// `x-imattr-reason`, or `broker:` + `x-first-death-reason`.
    pub(crate) reason: Option<String>,
    /// `x-imattr-error-code` (none for broker-made dead letters).
    pub(crate) code: Option<i64>,
    /// `x-imattr-error`, or a sentence saying what RabbitMQ did.
    pub(crate) error: Option<String>,
    /// `x-imattr-account`; without it (broker-made dead letters, a message
    /// whose account could not be read) the original routing key, which
    /// publishers set to the account.
    pub(crate) account: Option<String>,
    /// `x-imattr-failed-accounts`: the accounts of a several-account message
    /// that failed (the others were applied).
    pub(crate) failed_accounts: Vec<String>,
    /// `x-imattr-attempts`.
    pub(crate) attempts: Option<i64>,
    /// `x-imattr-failed-at`, or the time of the latest `x-death`, Unix ms.
    pub(crate) failed_at_ms: Option<i64>,
    /// `x-imattr-source-queue`, or `x-first-death-queue`.
    pub(crate) source_queue: Option<String>,
    /// The routing key the message was first published with.
    pub(crate) routing_key: Option<String>,
    /// Made by RabbitMQ (`x-death`), not by imattr.
    pub(crate) broker_made: bool,
    /// `x-imattr-replays`.
    pub(crate) replays: i64,
    /// `x-imattr-replayed-at`: when `dlq replay` last sent it back, Unix ms.
    pub(crate) replayed_at_ms: Option<i64>,
}

fn text(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

fn table_get<'a>(t: &'a FieldTable, key: &str) -> Option<&'a AMQPValue> {
    t.inner().get(key)
}

/// The latest `x-death` entry (RabbitMQ keeps the most recent first).
fn latest_death(headers: &FieldTable) -> Option<&FieldTable> {
    match table_get(headers, "x-death")? {
        AMQPValue::FieldArray(a) => a.as_slice().iter().find_map(|v| match v {
            AMQPValue::FieldTable(t) => Some(t),
            _ => None,
        }),
        _ => None,
    }
}

/// A header holding an array of strings (or one string).
pub(crate) fn header_strings(headers: &FieldTable, name: &str) -> Vec<String> {
    match table_get(headers, name) {
        Some(AMQPValue::FieldArray(a)) => a.as_slice().iter().filter_map(text).collect(),
        Some(v) => text(v).into_iter().collect(),
        None => Vec::new(),
    }
}

impl Meta {
    /// Reads a dead letter's headers. `delivery_routing_key` is the key it was
    /// delivered with, used only when no header keeps the original one and it
    /// is not `dlq` (a rotated copy is delivered with the queue's own name).
    pub(crate) fn read(headers: &FieldTable, delivery_routing_key: &str, dlq: &str) -> Meta {
        let death = latest_death(headers);
        let death_str = |k: &str| death.and_then(|d| table_get(d, k)).and_then(text);
        let imattr_reason = header_str(headers, deadletter::H_REASON);
        let broker_reason = if imattr_reason.is_none() {
            table_get(headers, "x-first-death-reason")
                .and_then(text)
                .or_else(|| death_str("reason"))
        } else {
            None
        };
        let broker_made = broker_reason.is_some();
        let routing_key = header_str(headers, deadletter::H_ROUTING_KEY)
            .or_else(|| {
                death
                    .and_then(|d| table_get(d, "routing-keys"))
                    .and_then(|v| match v {
                        AMQPValue::FieldArray(a) => a.as_slice().first().and_then(text),
                        other => text(other),
                    })
            })
            .or_else(|| {
                (!delivery_routing_key.is_empty() && delivery_routing_key != dlq)
                    .then(|| delivery_routing_key.to_string())
            });
        let source_queue = header_str(headers, deadletter::H_SOURCE_QUEUE).or_else(|| {
            table_get(headers, "x-first-death-queue")
                .and_then(text)
                .or_else(|| death_str("queue"))
        });
        let death_ms = death
            .and_then(|d| table_get(d, "time"))
            .and_then(|v| match v {
                AMQPValue::Timestamp(t) => i64::try_from(*t).ok().map(|s| s * 1000),
                _ => None,
            });
        let error = header_str(headers, deadletter::H_ERROR).or_else(|| {
            broker_reason.as_ref().map(|r| {
                format!(
                    "dead-lettered by RabbitMQ ({r}) from queue {}",
                    source_queue.as_deref().unwrap_or("?")
                )
            })
        });
        Meta {
            reason: imattr_reason
                .or_else(|| broker_reason.map(|r| format!("{BROKER_REASON_PREFIX}{r}"))),
            code: header_i64(headers, deadletter::H_ERROR_CODE),
            error,
            account: header_str(headers, deadletter::H_ACCOUNT).or_else(|| routing_key.clone()),
            failed_accounts: header_strings(headers, deadletter::H_FAILED_ACCOUNTS),
            attempts: header_i64(headers, deadletter::H_ATTEMPTS),
            failed_at_ms: header_i64(headers, deadletter::H_FAILED_AT).or(if broker_made {
                death_ms
            } else {
                None
            }),
            source_queue,
            routing_key,
            broker_made,
            replays: header_i64(headers, deadletter::H_REPLAYS).unwrap_or(0),
            replayed_at_ms: header_i64(headers, super::replay::H_REPLAYED_AT),
        }
    }

    /// The accounts this dead letter is about: the failed ones of a
    /// several-account message, else its account.
    pub(crate) fn accounts(&self) -> impl Iterator<Item = &str> {
        let failed = !self.failed_accounts.is_empty();
        self.failed_accounts
            .iter()
            .map(String::as_str)
            .chain(self.account.as_deref().filter(|_| !failed))
    }
}

/// Which dead letters a command takes (`--reason`, `--code`, `--account`,
/// `--grep`, `--since`, `--until`, ids). Every field given must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only this reason (`broker:…` for broker-made dead letters).
    pub reason: Option<String>,
    /// Only this ErrorCode.
    pub code: Option<i64>,
    /// Only dead letters about this account (`x-imattr-account`, one of
    /// `x-imattr-failed-accounts`, or the routing key of a letter without
    /// `x-imattr-account`).
    pub account: Option<String>,
    /// Only dead letters whose error text or body contains this text
    /// (case-sensitive, bytes for a body that is not UTF-8).
    pub grep: Option<String>,
    /// Only dead letters that failed at or after this time, Unix ms.
    pub since_ms: Option<i64>,
    /// Only dead letters that failed at or before this time, Unix ms.
    pub until_ms: Option<i64>,
    /// Only these ids (stream offsets).
    pub ids: Option<Vec<u64>>,
    /// Only ids below this one: what was in the store when a console
    /// confirmation counted, so that the action takes no more.
    pub before_id: Option<u64>,
}

impl Filter {
    /// Whether it takes everything.
    pub(crate) fn is_empty(&self) -> bool {
        *self == Filter::default()
    }

    /// The range of ids it can match, when it names ids.
    pub(crate) fn id_range(&self) -> Option<(u64, u64)> {
        let ids = self.ids.as_ref()?;
        Some((
            ids.iter().copied().min().unwrap_or(u64::MAX),
            ids.iter().copied().max().unwrap_or(0),
        ))
    }

    /// Whether a dead letter matches: its id, its facts (with the failure
    /// time already falling back to the chunk's) and its body.
    pub(crate) fn matches(&self, id: u64, m: &Meta, body: &[u8]) -> bool {
        self.ids.as_ref().is_none_or(|ids| ids.contains(&id))
            && self.before_id.is_none_or(|b| id < b)
            && self.code.is_none_or(|c| m.code == Some(c))
            && self
                .reason
                .as_ref()
                .is_none_or(|r| m.reason.as_deref() == Some(r.as_str()))
            && self
                .account
                .as_ref()
                .is_none_or(|a| m.accounts().any(|x| x == a))
            && self
                .since_ms
                .is_none_or(|s| m.failed_at_ms.is_some_and(|t| t >= s))
            && self
                .until_ms
                .is_none_or(|u| m.failed_at_ms.is_some_and(|t| t <= u))
            && self.grep.as_ref().is_none_or(|g| {
                m.error.as_deref().is_some_and(|e| e.contains(g.as_str()))
                    || contains(body, g.as_bytes())
            })
    }
}

/// Whether `hay` holds `needle`.
fn contains(hay: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || hay.windows(needle.len()).any(|w| w == needle)
}

/// One dead-lettered message, as `dlq list --json` and `dlq export` print it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DeadLetterView {
    /// Its id: its offset in the store (`dlq show ID`, `--after ID`).
    pub id: u64,
    /// How many times `dlq replay` sent it back before it failed again
    /// (`x-imattr-replays`).
    pub replays: i64,
    /// When it was last sent back (`x-imattr-replayed-at`), Unix ms.
    pub last_replayed_at_ms: Option<i64>,
    /// RabbitMQ's `x-death` for a dead letter the broker made (else null).
    pub x_death: serde_json::Value,
    /// Set only when resolved entries are listed (`--resolved`): "replayed
    /// at …" or "deleted at …".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolved: Option<String>,
    /// `x-imattr-account` (without it: its routing key).
    pub account: Option<String>,
    /// `x-imattr-reason`, or `broker:` + `x-first-death-reason`.
    pub reason: Option<String>,
    /// `x-imattr-error-code`.
    pub code: Option<i64>,
    /// `x-imattr-error`.
    pub error: Option<String>,
    /// `x-imattr-attempts`.
    pub attempts: Option<i64>,
    /// `x-imattr-failed-at` (or the latest `x-death` time), Unix milliseconds.
    pub failed_at_ms: Option<i64>,
    /// The original routing key.
    pub routing_key: Option<String>,
    /// `x-imattr-source-queue` or `x-first-death-queue`.
    pub source_queue: Option<String>,
    /// `x-imattr-failed-accounts`, when the message held several accounts.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub failed_accounts: Vec<String>,
    /// All headers.
    pub headers: serde_json::Value,
    /// The other properties.
    pub properties: serde_json::Value,
    /// The body, as text or base64.
    pub body: String,
    /// `utf8` or `base64`.
    pub body_encoding: &'static str,
}

impl DeadLetterView {
    /// The view of a message's properties and body.
    pub(crate) fn new(meta: &Meta, props: &BasicProperties, body: &[u8]) -> Self {
        let headers = props.headers().clone().unwrap_or_default();
        let (body, body_encoding) = match std::str::from_utf8(body) {
            Ok(s) => (s.to_string(), "utf8"),
            Err(_) => (
                base64::engine::general_purpose::STANDARD.encode(body),
                "base64",
            ),
        };
        DeadLetterView {
            id: 0,
            replays: meta.replays,
            last_replayed_at_ms: meta.replayed_at_ms,
            x_death: headers
                .inner()
                .get("x-death")
                .map(deadletter::amqp_to_json)
                .unwrap_or(serde_json::Value::Null),
            resolved: None,
            account: meta.account.clone(),
            reason: meta.reason.clone(),
            code: meta.code,
            error: meta.error.clone(),
            attempts: meta.attempts,
            failed_at_ms: meta.failed_at_ms,
            routing_key: meta.routing_key.clone(),
            source_queue: meta.source_queue.clone(),
            failed_accounts: meta.failed_accounts.clone(),
            headers: table_to_json(&headers),
            properties: properties_json(props),
            body,
            body_encoding,
        }
    }
}

fn properties_json(props: &BasicProperties) -> serde_json::Value {
    let mut p = serde_json::Map::new();
    let mut put = |k: &str, v: Option<serde_json::Value>| {
        if let Some(v) = v {
            p.insert(k.into(), v);
        }
    };
    let s = |v: &Option<lapin::types::ShortString>| v.as_ref().map(|v| v.as_str().into());
    put("content_type", s(props.content_type()));
    put("content_encoding", s(props.content_encoding()));
    put("delivery_mode", props.delivery_mode().map(Into::into));
    put("priority", props.priority().map(Into::into));
    put("correlation_id", s(props.correlation_id()));
    put("reply_to", s(props.reply_to()));
    put("expiration", s(props.expiration()));
    put("message_id", s(props.message_id()));
    put("timestamp", props.timestamp().map(Into::into));
    put("type", s(props.kind()));
    put("user_id", s(props.user_id()));
    put("app_id", s(props.app_id()));
    serde_json::Value::Object(p)
}

const HEADS: [&str; COLS] = [
    "ID",
    "ACCOUNT",
    "REASON",
    "CODE",
    "ERROR",
    "ATTEMPTS",
    "FAILED AT",
    "TRACE",
    "BODY",
];

const COLS: usize = 9;

/// What a dead letter's history says: how often it was replayed before it
/// came back, and how it was resolved (listed with `--resolved`).
pub(crate) fn trace(v: &DeadLetterView) -> String {
    let mut parts = Vec::new();
    if v.replays > 0 {
        let last = v
            .last_replayed_at_ms
            .map(|t| format!(", last {}", utc_time(t)))
            .unwrap_or_default();
        parts.push(format!("replayed {}x{last}", v.replays));
    }
    if let Some(r) = &v.resolved {
        parts.push(r.clone());
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join("; ")
    }
}

/// Rows kept to size the columns before the first line is printed; later
/// rows reuse those widths, so a table of any length streams.
const SIZING_ROWS: usize = 1000;

/// Prints dead letters as an aligned table, streaming.
#[derive(Debug, Default)]
pub(crate) struct Table {
    pending: Vec<[String; COLS]>,
    widths: Option<[usize; COLS]>,
    /// Accounts, errors and bodies whole (`list --wide`).
    wide: bool,
}

impl Table {
    /// A table that cuts nothing.
    pub(crate) fn wide() -> Table {
        Table {
            wide: true,
            ..Table::default()
        }
    }

    fn cut(&self, s: &str, max: usize) -> String {
        if self.wide {
            s.to_string()
        } else {
            cut(s, max)
        }
    }

    /// Adds a row; prints once the columns are sized.
    pub(crate) fn push(&mut self, out: &mut impl Write, v: &DeadLetterView) -> std::io::Result<()> {
        let accounts = if v.failed_accounts.is_empty() {
            v.account.clone().unwrap_or_else(|| "-".into())
        } else {
            v.failed_accounts.join(",")
        };
        let row = [
            v.id.to_string(),
            self.cut(&accounts, 40),
            v.reason.clone().unwrap_or_else(|| "-".into()),
            v.code.map(|c| c.to_string()).unwrap_or_else(|| "-".into()),
            self.cut(v.error.as_deref().unwrap_or("-"), 60),
            v.attempts
                .map(|c| c.to_string())
                .unwrap_or_else(|| "-".into()),
            v.failed_at_ms.map(utc_time).unwrap_or_else(|| "-".into()),
            trace(v),
            self.cut(&v.body.replace('\n', " "), 60),
        ];
        match self.widths {
            Some(w) => writeln!(out, "{}", line(&w, &row)),
            None => {
                self.pending.push(row);
                if self.pending.len() >= SIZING_ROWS {
                    self.flush(out)?;
                }
                Ok(())
            }
        }
    }

    fn flush(&mut self, out: &mut impl Write) -> std::io::Result<()> {
        let mut w = HEADS.map(|h| h.chars().count());
        for r in &self.pending {
            for (i, c) in r.iter().enumerate() {
                w[i] = w[i].max(c.chars().count());
            }
        }
        writeln!(out, "{}", line(&w, &HEADS.map(String::from)))?;
        for r in self.pending.drain(..) {
            writeln!(out, "{}", line(&w, &r))?;
        }
        self.widths = Some(w);
        Ok(())
    }

    /// Prints what is left; returns whether any row was printed.
    pub(crate) fn finish(mut self, out: &mut impl Write) -> std::io::Result<bool> {
        if self.widths.is_none() && !self.pending.is_empty() {
            self.flush(out)?;
        }
        Ok(self.widths.is_some())
    }
}

fn line(widths: &[usize; COLS], cells: &[String; COLS]) -> String {
    let mut s = String::new();
    for (i, c) in cells.iter().enumerate() {
        s.push_str(c);
        if i + 1 < cells.len() {
            let n = widths[i].saturating_sub(c.chars().count()) + 2;
            s.push_str(&" ".repeat(n));
        }
    }
    s
}

fn cut(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max - 1).collect();
        t.push('…');
        t
    }
}

/// Unix milliseconds as UTC (RFC 3339, to the second, with `Z`), the zone
/// of the logs, whatever the machine's.
pub(crate) fn utc_time(ms: i64) -> String {
    match chrono::DateTime::from_timestamp_millis(ms) {
        Some(t) => t.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
        None => ms.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{FieldArray, LongString};

    fn ls(s: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(s))
    }

    fn imattr_headers() -> FieldTable {
        let mut h = FieldTable::default();
        h.insert(deadletter::H_REASON.into(), ls("rejected"));
        h.insert(
            deadletter::H_ERROR_CODE.into(),
            AMQPValue::LongLongInt(90033),
        );
        h.insert(deadletter::H_ERROR.into(), ls("bad attr"));
        h.insert(deadletter::H_ACCOUNT.into(), ls("u1"));
        h.insert(deadletter::H_ATTEMPTS.into(), AMQPValue::LongLongInt(2));
        h.insert(deadletter::H_FAILED_AT.into(), AMQPValue::LongLongInt(5000));
        h.insert(deadletter::H_SOURCE_QUEUE.into(), ls("q"));
        h.insert(deadletter::H_ROUTING_KEY.into(), ls("u1"));
        h
    }

    /// What RabbitMQ adds when the updates queue dead-letters an expired message.
    pub(crate) fn broker_headers(reason: &str, queue: &str, rk: &str, secs: u64) -> FieldTable {
        let mut death = FieldTable::default();
        death.insert("count".into(), AMQPValue::LongLongInt(1));
        death.insert("reason".into(), ls(reason));
        death.insert("queue".into(), ls(queue));
        death.insert("time".into(), AMQPValue::Timestamp(secs));
        death.insert("exchange".into(), ls("x"));
        death.insert(
            "routing-keys".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![ls(rk)])),
        );
        let mut h = FieldTable::default();
        h.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
        );
        h.insert("x-first-death-reason".into(), ls(reason));
        h.insert("x-first-death-queue".into(), ls(queue));
        h.insert("x-first-death-exchange".into(), ls("x"));
        h
    }

    #[test]
    fn reads_imattr_headers() {
        let m = Meta::read(&imattr_headers(), "dead.q", "dead.q");
        assert_eq!(
            m,
            Meta {
                reason: Some("rejected".into()),
                code: Some(90033),
                error: Some("bad attr".into()),
                account: Some("u1".into()),
                failed_accounts: vec![],
                attempts: Some(2),
                failed_at_ms: Some(5000),
                source_queue: Some("q".into()),
                routing_key: Some("u1".into()),
                broker_made: false,
                replays: 0,
                replayed_at_ms: None,
            }
        );
    }

    #[test]
    fn reads_broker_made_dead_letters() {
        for (reason, shown) in [
            ("expired", "broker:expired"),
            ("maxlen", "broker:maxlen"),
            ("delivery_limit", "broker:delivery_limit"),
            ("rejected", "broker:rejected"),
        ] {
            let m = Meta::read(&broker_headers(reason, "upd", "acc7", 1700), "", "dead");
            assert_eq!(m.reason.as_deref(), Some(shown));
            assert!(REASONS.contains(&shown));
            assert!(m.broker_made);
            assert_eq!(m.code, None);
            assert_eq!(m.account.as_deref(), Some("acc7"));
            assert_eq!(m.routing_key.as_deref(), Some("acc7"));
            assert_eq!(m.source_queue.as_deref(), Some("upd"));
            assert_eq!(m.failed_at_ms, Some(1_700_000));
            assert!(m.error.unwrap().contains(reason));
        }
    }

    #[test]
    fn imattr_reason_wins_over_an_old_x_death() {
        let mut h = broker_headers("expired", "upd", "acc7", 1700);
        for (k, v) in imattr_headers().inner() {
            h.insert(k.clone(), v.clone());
        }
        let m = Meta::read(&h, "", "dead");
        assert_eq!(m.reason.as_deref(), Some("rejected"));
        assert!(!m.broker_made);
        assert_eq!(m.failed_at_ms, Some(5000));
        assert_eq!(m.account.as_deref(), Some("u1"));
    }

    #[test]
    fn a_letter_without_an_account_header_is_about_its_routing_key() {
        // An invalid message whose body could not be read (not UTF-8, say):
        // the worker knows no account, only the routing key.
        let mut h: FieldTable = imattr_headers()
            .inner()
            .iter()
            .filter(|(k, _)| k.as_str() != deadletter::H_ACCOUNT)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<std::collections::BTreeMap<_, _>>()
            .into();
        h.insert(deadletter::H_REASON.into(), ls("invalid-message"));
        h.insert(deadletter::H_ROUTING_KEY.into(), ls("acc9"));
        let m = Meta::read(&h, "dead", "dead");
        assert_eq!(m.account.as_deref(), Some("acc9"));
        let f = Filter {
            account: Some("acc9".into()),
            ..Filter::default()
        };
        assert!(f.matches(0, &m, b""));
        // The header wins when there is one.
        h.insert(deadletter::H_ACCOUNT.into(), ls("u1"));
        assert!(!f.matches(0, &Meta::read(&h, "dead", "dead"), b""));
    }

    #[test]
    fn times_are_utc_with_a_z() {
        assert_eq!(utc_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_time(1_795_629_804_079), "2026-11-25T18:03:24Z");
        assert_eq!(utc_time(i64::MAX), i64::MAX.to_string());
    }

    #[test]
    fn routing_key_fallbacks() {
        let h = FieldTable::default();
        assert_eq!(
            Meta::read(&h, "acc", "dead").routing_key.as_deref(),
            Some("acc")
        );
        assert_eq!(Meta::read(&h, "dead", "dead").routing_key, None);
        assert_eq!(Meta::read(&h, "", "dead").routing_key, None);
        assert_eq!(Meta::read(&h, "", "dead").reason, None);
    }

    #[test]
    fn filters() {
        let mut h = imattr_headers();
        let m = Meta::read(&h, "", "d");
        let f = |code: Option<i64>, reason: Option<&str>, account: Option<&str>| Filter {
            code,
            reason: reason.map(String::from),
            account: account.map(String::from),
            ..Filter::default()
        };
        let table = [
            (f(None, None, None), true),
            (f(Some(90033), None, None), true),
            (f(Some(1), None, None), false),
            (f(None, Some("rejected"), None), true),
            (f(None, Some("invalid-message"), None), false),
            (f(None, None, Some("u1")), true),
            (f(None, None, Some("u2")), false),
            (f(Some(90033), Some("rejected"), Some("u1")), true),
            (f(Some(90033), Some("rejected"), Some("u2")), false),
        ];
        for (filter, want) in &table {
            assert_eq!(filter.matches(0, &m, b""), *want, "{filter:?}");
        }
        assert!(f(None, None, None).is_empty());
        assert!(!f(None, None, Some("a")).is_empty());

        // Several accounts: the failed ones match, not the applied one.
        h.insert(
            deadletter::H_FAILED_ACCOUNTS.into(),
            AMQPValue::FieldArray(FieldArray::from(vec![ls("a"), ls("b")])),
        );
        let m = Meta::read(&h, "", "d");
        assert!(f(None, None, Some("b")).matches(0, &m, b""));
        assert!(!f(None, None, Some("u1")).matches(0, &m, b""));
        assert_eq!(m.accounts().collect::<Vec<_>>(), ["a", "b"]);

        let b = Meta::read(&broker_headers("expired", "q", "acc", 1), "", "d");
        assert!(f(None, Some("broker:expired"), Some("acc")).matches(0, &b, b""));
        assert!(!f(Some(0), None, None).matches(0, &b, b""));
        assert!(!f(None, Some("rejected"), None).matches(0, &b, b""));
    }

    #[test]
    fn grep_times_and_ids() {
        let m = Meta {
            error: Some("quota exceeded".into()),
            failed_at_ms: Some(2000),
            ..Meta::default()
        };
        let g = |s: &str| Filter {
            grep: Some(s.into()),
            ..Filter::default()
        };
        assert!(g("quota").matches(0, &m, b"{}"));
        assert!(g("needle").matches(0, &m, b"{\"a\":\"needle\"}"));
        assert!(g("\u{fffd}").matches(0, &m, "\u{fffd}".as_bytes()));
        assert!(!g("Quota").matches(0, &m, b""), "case-sensitive");
        assert!(!g("needle").matches(0, &Meta::default(), b"\xff\x00"));
        let t = |since: Option<i64>, until: Option<i64>| Filter {
            since_ms: since,
            until_ms: until,
            ..Filter::default()
        };
        assert!(t(Some(2000), Some(2000)).matches(0, &m, b""), "inclusive");
        assert!(!t(Some(2001), None).matches(0, &m, b""));
        assert!(!t(None, Some(1999)).matches(0, &m, b""));
        assert!(
            !t(Some(0), None).matches(0, &Meta::default(), b""),
            "no time: no match"
        );
        let ids = Filter {
            ids: Some(vec![7, 3]),
            ..Filter::default()
        };
        assert!(ids.matches(3, &m, b"") && !ids.matches(4, &m, b""));
        let before = Filter {
            before_id: Some(5),
            ..Filter::default()
        };
        assert!(before.matches(4, &m, b"") && !before.matches(5, &m, b""));
        assert_eq!(ids.id_range(), Some((3, 7)));
        assert!(!ids.is_empty());
        assert_eq!(Filter::default().id_range(), None);
    }

    #[test]
    fn view_and_streaming_table() {
        let h = imattr_headers();
        let m = Meta::read(&h, "", "d");
        let v = DeadLetterView::new(&m, &BasicProperties::default().with_headers(h), &[0xff, 0]);
        assert_eq!(v.body_encoding, "base64");
        assert_eq!(v.code, Some(90033));
        let j = serde_json::to_value(&v).unwrap();
        assert!(j.get("failed_accounts").is_none());
        let mut out = Vec::new();
        let mut t = Table::default();
        for _ in 0..SIZING_ROWS + 5 {
            t.push(&mut out, &v).unwrap();
        }
        assert!(t.finish(&mut out).unwrap());
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("ID  ACCOUNT"), "{text}");
        assert_eq!(text.lines().count(), SIZING_ROWS + 6);
        assert!(text.lines().nth(1).unwrap().contains("90033"));
        let widths: Vec<usize> = text
            .lines()
            .skip(1)
            .map(|l| l.find("rejected").unwrap())
            .collect();
        assert!(
            widths.iter().all(|w| *w == widths[0]),
            "columns stay aligned"
        );
        let mut empty = Vec::new();
        assert!(!Table::default().finish(&mut empty).unwrap());
        assert!(empty.is_empty());

        // Cut to 60 characters, or whole with --wide.
        let mut long = v.clone();
        long.error = Some(format!("{}END", "e".repeat(100)));
        long.body = format!("{}TAIL", "b".repeat(100));
        for (mut t, whole) in [(Table::default(), false), (Table::wide(), true)] {
            let mut out = Vec::new();
            t.push(&mut out, &long).unwrap();
            t.finish(&mut out).unwrap();
            let text = String::from_utf8(out).unwrap();
            assert_eq!(text.contains("eEND"), whole, "{text}");
            assert_eq!(text.contains("bTAIL"), whole, "{text}");
            assert_eq!(text.contains('…'), !whole, "{text}");
        }
    }
}
