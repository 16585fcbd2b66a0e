//! Reading a stream over AMQP 0-9-1 (a lapin consumer with `x-stream-offset`),
//! with the same method shapes as the native stream-protocol reader
//! ([`crate::amqp::stream`]), so the store can use either. It is the second
//! design measured: simple, but each delivery costs a frame of its own, and
//! it reads about 15,000 dead letters a second where the native one reads
//! whole chunks.

use std::ops::ControlFlow;
use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::Connection;

use crate::amqp::deadletter::header_i64;
use crate::config::AmqpConfig;

pub use crate::amqp::stream::StreamMessage;

/// Deliveries the broker may have in flight to one read: streams need a
/// prefetch, and more than this gains nothing over a local broker.
const PREFETCH: u16 = 2000;

/// Acknowledge every this many deliveries (one `multiple` ack), well within
/// the prefetch so the broker never stalls.
const ACK_EVERY: u64 = 500;

/// How long `last_offset` waits for the first delivery before deciding the
/// stream is empty: a stream with entries delivers its last chunk at once.
const EMPTY_WAIT: Duration = Duration::from_millis(800);

/// After the first delivery of the last chunk, how long a pause ends it.
const BURST_GAP: Duration = Duration::from_millis(60);

/// With no delivery for this long before `until`, the entries up to it are
/// gone (retention removed them, or they never existed): the read ends.
const IDLE: Duration = Duration::from_secs(5);

/// The headers RabbitMQ adds to a stream delivery, not part of the message.
const DELIVERY_HEADERS: [&str; 2] = ["x-stream-offset", "x-stream-chunk-timestamp"];

/// A stream reader over AMQP 0-9-1: one connection, a channel per read.
pub struct AmqpReader {
    conn: Connection,
}

impl std::fmt::Debug for AmqpReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpReader").finish_non_exhaustive()
    }
}

impl AmqpReader {
    /// Connects to the first node that answers.
    pub async fn connect(cfg: &AmqpConfig, name: &str) -> anyhow::Result<AmqpReader> {
        let conn = crate::amqp::nodes::connect_first(cfg, name).await?;
        Ok(AmqpReader { conn })
    }

    async fn consume(
        &self,
        stream: &str,
        offset: AMQPValue,
    ) -> anyhow::Result<(lapin::Channel, lapin::Consumer)> {
        let ch = self
            .conn
            .create_channel()
            .await
            .context("opening a channel")?;
        ch.basic_qos(PREFETCH, BasicQosOptions::default())
            .await
            .context("setting the prefetch")?;
        let mut args = FieldTable::default();
        args.insert("x-stream-offset".into(), offset);
        let consumer = ch
            .basic_consume(
                stream.into(),
                "".into(),
                BasicConsumeOptions::default(),
                args,
            )
            .await
            .with_context(|| format!("reading stream {stream}"))?;
        Ok((ch, consumer))
    }

    /// Offset of the last entry now in `stream`, `None` when it has none.
    pub async fn last_offset(&mut self, stream: &str) -> anyhow::Result<Option<u64>> {
        let (ch, mut consumer) = self
            .consume(stream, AMQPValue::LongString(LongString::from("last")))
            .await?;
        let mut last = None;
        let mut wait = EMPTY_WAIT;
        while let Ok(Some(d)) = tokio::time::timeout(wait, consumer.next()).await {
            let d = d.context("reading a stream delivery")?;
            let headers = d.properties.headers().clone().unwrap_or_default();
            if let Some(o) = offset_of(&headers) {
                last = Some(last.map_or(o, |l: u64| l.max(o)));
            }
            wait = BURST_GAP;
        }
        let _ = ch.close(200, "done".into()).await;
        Ok(last)
    }

    /// Calls `f` with every entry whose offset is in `from..=until`, in
    /// offset order, until `f` breaks; returns how many `f` saw.
    pub async fn read<F>(
        &mut self,
        stream: &str,
        from: u64,
        until: u64,
        mut f: F,
    ) -> anyhow::Result<u64>
    where
        F: FnMut(StreamMessage) -> ControlFlow<()>,
    {
        if from > until {
            return Ok(0);
        }
        let start = i64::try_from(from).context("offset out of range")?;
        let (ch, mut consumer) = self.consume(stream, AMQPValue::LongLongInt(start)).await?;
        let mut seen = 0u64;
        let mut unacked = 0u64;
        let result = async {
            loop {
                let d = match tokio::time::timeout(IDLE, consumer.next()).await {
                    Ok(Some(d)) => d.context("reading a stream delivery")?,
                    Ok(None) => anyhow::bail!("the broker ended the read of stream {stream}"),
                    Err(_) => {
                        tracing::warn!(
                            stream,
                            from,
                            until,
                            seen,
                            "Stream read stopped early: no entry came"
                        );
                        return Ok(());
                    }
                };
                unacked += 1;
                if unacked >= ACK_EVERY {
                    d.acker
                        .ack(BasicAckOptions { multiple: true })
                        .await
                        .context("acknowledging stream deliveries")?;
                    unacked = 0;
                }
                let mut headers = d.properties.headers().clone().unwrap_or_default();
                let Some(offset) = offset_of(&headers) else {
                    continue;
                };
                if offset < from {
                    continue;
                }
                if offset > until {
                    return Ok(());
                }
                let chunk_timestamp_ms =
                    header_i64(&headers, "x-stream-chunk-timestamp").unwrap_or(0);
                let inner = headers.inner().clone();
                headers = inner
                    .into_iter()
                    .filter(|(k, _)| !DELIVERY_HEADERS.contains(&k.as_str()))
                    .collect::<std::collections::BTreeMap<_, _>>()
                    .into();
                seen += 1;
                let m = StreamMessage {
                    offset,
                    chunk_timestamp_ms,
                    properties: d.properties.clone().with_headers(headers.clone()),
                    headers,
                    body: d.data,
                    undecodable: None,
                };
                if f(m).is_break() || offset >= until {
                    return Ok(());
                }
            }
        }
        .await;
        // Closing the channel ends the consumer; a stream keeps everything.
        let _ = ch.close(200, "done".into()).await;
        result.map(|()| seen)
    }

    /// Closes the connection, best effort.
    pub async fn close(self) {
        let _ = self.conn.close(200, "done".into()).await;
    }
}

fn offset_of(headers: &FieldTable) -> Option<u64> {
    header_i64(headers, "x-stream-offset").and_then(|o| u64::try_from(o).ok())
}
