//! Operator tools for the dead-letter queue: list, replay, export, purge.
//!
//! Peeking uses `basic.get` without acknowledging and then requeues
//! everything at once, so RabbitMQ puts each message back in its place.

use std::io::Write;

use anyhow::Context;
use base64::Engine;
use lapin::message::BasicGetMessage;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions, QueuePurgeOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};
use serde::Serialize;

use crate::amqp::deadletter::{self, header_i64, header_str, publish_confirmed, table_to_json};
use crate::amqp::topology;
use crate::config::Config;

/// One dead-lettered message, as `dlq list --json` and `dlq export` print it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DeadLetterView {
    /// `x-imattr-account`.
    pub account: Option<String>,
    /// `x-imattr-reason`.
    pub reason: Option<String>,
    /// `x-imattr-error-code`.
    pub code: Option<i64>,
    /// `x-imattr-error`.
    pub error: Option<String>,
    /// `x-imattr-attempts`.
    pub attempts: Option<i64>,
    /// `x-imattr-failed-at`, Unix milliseconds.
    pub failed_at_ms: Option<i64>,
    /// `x-imattr-original-routing-key`.
    pub routing_key: Option<String>,
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
    pub fn new(props: &BasicProperties, body: &[u8]) -> Self {
        let headers = props.headers().clone().unwrap_or_default();
        let (body, body_encoding) = match std::str::from_utf8(body) {
            Ok(s) => (s.to_string(), "utf8"),
            Err(_) => (
                base64::engine::general_purpose::STANDARD.encode(body),
                "base64",
            ),
        };
        let mut p = serde_json::Map::new();
        let mut put = |k: &str, v: Option<serde_json::Value>| {
            if let Some(v) = v {
                p.insert(k.into(), v);
            }
        };
        put(
            "content_type",
            props.content_type().as_ref().map(|v| v.as_str().into()),
        );
        put(
            "content_encoding",
            props.content_encoding().as_ref().map(|v| v.as_str().into()),
        );
        put("delivery_mode", props.delivery_mode().map(Into::into));
        put("priority", props.priority().map(Into::into));
        put(
            "correlation_id",
            props.correlation_id().as_ref().map(|v| v.as_str().into()),
        );
        put(
            "reply_to",
            props.reply_to().as_ref().map(|v| v.as_str().into()),
        );
        put(
            "expiration",
            props.expiration().as_ref().map(|v| v.as_str().into()),
        );
        put(
            "message_id",
            props.message_id().as_ref().map(|v| v.as_str().into()),
        );
        put("timestamp", props.timestamp().map(Into::into));
        put("type", props.kind().as_ref().map(|v| v.as_str().into()));
        put(
            "user_id",
            props.user_id().as_ref().map(|v| v.as_str().into()),
        );
        put("app_id", props.app_id().as_ref().map(|v| v.as_str().into()));
        DeadLetterView {
            account: header_str(&headers, deadletter::H_ACCOUNT),
            reason: header_str(&headers, deadletter::H_REASON),
            code: header_i64(&headers, deadletter::H_ERROR_CODE),
            error: header_str(&headers, deadletter::H_ERROR),
            attempts: header_i64(&headers, deadletter::H_ATTEMPTS),
            failed_at_ms: header_i64(&headers, deadletter::H_FAILED_AT),
            routing_key: header_str(&headers, deadletter::H_ROUTING_KEY),
            headers: table_to_json(&headers),
            properties: serde_json::Value::Object(p),
            body,
            body_encoding,
        }
    }
}

/// Which dead letters `replay` takes.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only this ErrorCode.
    pub code: Option<i64>,
    /// Only this reason.
    pub reason: Option<String>,
}

impl Filter {
    /// Whether a message matches.
    pub fn matches(&self, headers: &FieldTable) -> bool {
        self.code
            .is_none_or(|c| header_i64(headers, deadletter::H_ERROR_CODE) == Some(c))
            && self
                .reason
                .as_ref()
                .is_none_or(|r| header_str(headers, deadletter::H_REASON).as_deref() == Some(r))
    }
}

/// A connection and channel to the broker with the topology declared.
pub struct Dlq {
    conn: Connection,
    channel: Channel,
    config: Config,
}

impl std::fmt::Debug for Dlq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dlq")
            .field("queue", &self.config.amqp.dead_letter_queue)
            .finish()
    }
}

impl Dlq {
    /// Connects and declares the topology.
    pub async fn open(config: &Config) -> anyhow::Result<Dlq> {
        let conn = crate::amqp::nodes::connect_first(&config.amqp, "imattr dlq").await?;
        let channel = conn.create_channel().await.context("opening a channel")?;
        topology::declare(&channel, &config.amqp).await?;
        Ok(Dlq {
            conn,
            channel,
            config: config.clone(),
        })
    }

    /// Closes the connection cleanly.
    pub async fn close(self) {
        let _ = self.channel.close(200, "done".into()).await;
        let _ = self.conn.close(200, "done".into()).await;
    }

    async fn get(&self) -> anyhow::Result<Option<BasicGetMessage>> {
        self.channel
            .basic_get(
                self.config.amqp.dead_letter_queue.as_str().into(),
                BasicGetOptions { no_ack: false },
            )
            .await
            .with_context(|| format!("reading queue {}", self.config.amqp.dead_letter_queue))
    }

    async fn requeue_all(&self, last_tag: Option<u64>) -> anyhow::Result<()> {
        if let Some(tag) = last_tag {
            self.channel
                .basic_nack(
                    tag,
                    BasicNackOptions {
                        multiple: true,
                        requeue: true,
                    },
                )
                .await
                .context("returning messages to the dead-letter queue")?;
        }
        Ok(())
    }

    /// Up to `limit` dead letters, oldest first, leaving the queue as it was.
    pub async fn peek(&self, limit: Option<usize>) -> anyhow::Result<Vec<DeadLetterView>> {
        let mut out = Vec::new();
        let mut last = None;
        while limit.is_none_or(|l| out.len() < l) {
            let Some(m) = self.get().await? else { break };
            last = Some(m.delivery.delivery_tag);
            out.push(DeadLetterView::new(
                &m.delivery.properties,
                &m.delivery.data,
            ));
        }
        self.requeue_all(last).await?;
        Ok(out)
    }

    /// Moves matching dead letters (at most `limit`) back to `amqp.exchange`
    /// without the `x-imattr-*` headers, counting `x-imattr-replays`. Each is
    /// confirmed by the broker before it leaves the DLQ; the others stay in order.
    /// With `dry_run`, nothing moves. Returns how many matched.
    pub async fn replay(
        &self,
        filter: &Filter,
        limit: Option<usize>,
        dry_run: bool,
    ) -> anyhow::Result<usize> {
        let publish_ch = topology::confirm_channel(&self.conn).await?;
        let mut matched = 0usize;
        let mut kept_last: Option<u64> = None;
        while limit.is_none_or(|l| matched < l) {
            let Some(m) = self.get().await? else { break };
            let d = m.delivery;
            let headers = d.properties.headers().clone().unwrap_or_default();
            if !filter.matches(&headers) || dry_run {
                if filter.matches(&headers) {
                    matched += 1;
                }
                kept_last = Some(d.delivery_tag);
                continue;
            }
            let routing_key = header_str(&headers, deadletter::H_ROUTING_KEY)
                .unwrap_or_else(|| d.routing_key.as_str().to_string());
            let props = replay_properties(&d.properties);
            publish_confirmed(
                &publish_ch,
                &self.config.amqp.exchange,
                &routing_key,
                &d.data,
                props,
            )
            .await
            .context("republishing a dead letter")?;
            self.channel
                .basic_ack(d.delivery_tag, BasicAckOptions::default())
                .await
                .context("removing a replayed message from the DLQ")?;
            matched += 1;
        }
        // Return what was skipped; nack with multiple only covers unacked tags.
        self.requeue_all(kept_last).await?;
        let _ = publish_ch.close(200, "done".into()).await;
        Ok(matched)
    }

    /// Deletes every dead letter; returns how many.
    pub async fn purge(&self) -> anyhow::Result<u32> {
        self.channel
            .queue_purge(
                self.config.amqp.dead_letter_queue.as_str().into(),
                QueuePurgeOptions::default(),
            )
            .await
            .context("purging the dead-letter queue")
    }
}

/// The original properties without the `x-imattr-*` headers, plus
/// `x-imattr-replays` incremented.
pub fn replay_properties(p: &BasicProperties) -> BasicProperties {
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
    p.clone().with_headers(headers).with_delivery_mode(2)
}

/// Prints dead letters as an aligned table.
pub fn print_table(out: &mut impl Write, views: &[DeadLetterView]) -> std::io::Result<()> {
    let rows: Vec<[String; 7]> = views
        .iter()
        .map(|v| {
            [
                v.account.clone().unwrap_or_else(|| "-".into()),
                v.reason.clone().unwrap_or_else(|| "-".into()),
                v.code.map(|c| c.to_string()).unwrap_or_else(|| "-".into()),
                cut(v.error.as_deref().unwrap_or("-"), 60),
                v.attempts
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "-".into()),
                v.failed_at_ms.map(local_time).unwrap_or_else(|| "-".into()),
                cut(&v.body.replace('\n', " "), 60),
            ]
        })
        .collect();
    let heads = [
        "ACCOUNT",
        "REASON",
        "CODE",
        "ERROR",
        "ATTEMPTS",
        "FAILED AT",
        "BODY",
    ];
    let mut widths: Vec<usize> = heads.iter().map(|h| h.chars().count()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| -> String {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(c);
                s.push_str(&" ".repeat(widths[i] - c.chars().count() + 2));
            }
        }
        s
    };
    writeln!(out, "{}", line(heads.to_vec()))?;
    for r in &rows {
        writeln!(out, "{}", line(r.iter().map(String::as_str).collect()))?;
    }
    Ok(())
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

fn local_time(ms: i64) -> String {
    use chrono::TimeZone;
    match chrono::Local.timestamp_millis_opt(ms) {
        chrono::LocalResult::Single(t) => t.format("%Y-%m-%d %H:%M:%S").to_string(),
        _ => ms.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            .with_headers(h);
        let r = replay_properties(&p);
        let rh = r.headers().as_ref().unwrap();
        assert_eq!(header_i64(rh, deadletter::H_REPLAYS), Some(3));
        assert!(!rh.contains_key(deadletter::H_REASON));
        assert!(rh.contains_key("trace"));
        assert_eq!(r.message_id().as_ref().unwrap().as_str(), "m");
    }

    #[test]
    fn filter_and_view() {
        let mut h = FieldTable::default();
        h.insert(
            deadletter::H_REASON.into(),
            AMQPValue::LongString("rejected".into()),
        );
        h.insert(
            deadletter::H_ERROR_CODE.into(),
            AMQPValue::LongLongInt(90033),
        );
        assert!(Filter::default().matches(&h));
        assert!(Filter {
            code: Some(90033),
            reason: Some("rejected".into())
        }
        .matches(&h));
        assert!(!Filter {
            code: Some(1),
            reason: None
        }
        .matches(&h));
        assert!(!Filter {
            code: None,
            reason: Some("invalid-message".into())
        }
        .matches(&h));
        let v = DeadLetterView::new(&BasicProperties::default().with_headers(h), &[0xff, 0]);
        assert_eq!(v.body_encoding, "base64");
        assert_eq!(v.code, Some(90033));
        let mut out = Vec::new();
        print_table(&mut out, &[v]).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("ACCOUNT"), "{text}");
        assert!(text.contains("90033"));
    }
}
