//! One pass over the dead-letter queue: a consumer with a bounded window and,
//! when a message must stay, rotation (a copy to the tail, confirmed, then
//! the original acknowledged). Why this way, and what it guarantees, is in the
//! module documentation of `dlq` and in docs/dead-letters.md.

use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt;
use indicatif::ProgressBar;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, PublisherConfirm};
use tokio_util::sync::CancellationToken;

use super::replay::Outgoing;
use super::view::Meta;
use crate::amqp::deadletter;

/// The most messages a pass may hold unacknowledged at once.
pub(crate) const MAX_WINDOW: u16 = 10_000;

/// How a pass reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassConfig {
    /// Prefetch: the most messages unacknowledged at once (≤ [`MAX_WINDOW`]).
    pub(crate) window: u16,
    /// Messages per batch of copies and acknowledgements (≤ `window`); half
    /// the window keeps the broker delivering while a batch is confirmed.
    pub(crate) batch: u16,
}

impl Default for PassConfig {
    fn default() -> Self {
        PassConfig::with_window(2000)
    }
}

impl PassConfig {
    /// A window of `window` messages (clamped to 1..=`MAX_WINDOW`),
    /// committed every half window.
    pub fn with_window(window: u16) -> PassConfig {
        let window = window.clamp(1, MAX_WINDOW);
        PassConfig {
            window,
            batch: (window / 2).max(1),
        }
    }
}

/// What to do with a message.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Step {
    /// Leave it in the queue, in its place.
    Keep,
    /// Publish this to the updates exchange (confirmed), then remove it.
    Move(Box<Outgoing>),
    /// Remove it (`purge` with filters): acknowledged with its batch.
    Remove,
}

/// A visitor's answer: the step, and whether it needs no further message.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Visit {
    /// What to do with this message.
    pub(crate) step: Step,
    /// Nothing more is wanted after this one.
    pub(crate) enough: bool,
}

impl Visit {
    /// Keep it; go on.
    pub(crate) fn keep() -> Visit {
        Visit {
            step: Step::Keep,
            enough: false,
        }
    }

    /// Move it; go on.
    pub(crate) fn moved(o: Outgoing) -> Visit {
        Visit {
            step: Step::Move(Box::new(o)),
            enough: false,
        }
    }

    /// Remove it; go on.
    pub(crate) fn removed() -> Visit {
        Visit {
            step: Step::Remove,
            enough: false,
        }
    }

    /// The same, and nothing more is wanted.
    pub(crate) fn enough(mut self, enough: bool) -> Visit {
        self.enough = enough;
        self
    }
}

/// What a pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct PassReport {
    /// Messages ready in the queue when the pass started.
    pub(crate) present: u64,
    /// Messages read.
    pub(crate) seen: u64,
    /// Messages moved to the updates exchange.
    pub(crate) moved: u64,
    /// Messages removed.
    pub(crate) removed: u64,
    /// Whether messages were rotated (copied to the tail); if not, every kept
    /// message went back to its place untouched.
    pub(crate) rotated: bool,
    /// The queue ran dry before `present` messages were read (someone else
    /// removed messages during the pass).
    pub(crate) short: bool,
}

/// The pass was stopped (SIGINT/SIGTERM) at a batch boundary.
#[derive(Debug, thiserror::Error)]
#[error("interrupted after {seen} of {present} messages ({moved} replayed); nothing was lost")]
pub(crate) struct Interrupted {
    /// Messages read.
    pub(crate) seen: u64,
    /// Messages present at the start.
    pub(crate) present: u64,
    /// Messages moved.
    pub(crate) moved: u64,
}

/// After this long without a delivery the pass checks whether the queue ran dry.
const IDLE: Duration = Duration::from_secs(5);

/// What a pass asks about each message: its facts, properties and body.
pub(crate) type Visitor<'a> =
    dyn FnMut(&Meta, &BasicProperties, &[u8]) -> anyhow::Result<Visit> + 'a;

/// Where a pass reads and writes.
pub(crate) struct Target<'a> {
    /// The connection (the pass opens its own channels on it).
    pub(crate) conn: &'a Connection,
    /// The dead-letter queue.
    pub(crate) queue: &'a str,
    /// Where moved messages go (`amqp.exchange`).
    pub(crate) exchange: &'a str,
}

/// Reads the messages present in `queue` at the start, once each, in order,
/// and does with each what `visit` says; see the `dlq` module documentation.
pub(crate) async fn run(
    target: &Target<'_>,
    config: PassConfig,
    visit: &mut Visitor<'_>,
    progress: &ProgressBar,
    cancel: &CancellationToken,
) -> anyhow::Result<PassReport> {
    let ch = target
        .conn
        .create_channel()
        .await
        .context("opening a channel")?;
    // A batch larger than the window would wait for deliveries that cannot come.
    let config = PassConfig {
        window: config.window.clamp(1, MAX_WINDOW),
        batch: config.batch.clamp(1, config.window.clamp(1, MAX_WINDOW)),
    };
    let mut pass = Pass {
        target,
        config,
        ch: ch.clone(),
        out: None,
        batch: Batch::default(),
        committed_keeps: 0,
    };
    let result = pass.run(visit, progress, cancel).await;
    // Closing the channel returns every delivery not acknowledged to the head
    // of the queue, in its original order.
    let _ = ch.close(200, "done".into()).await;
    if let Some(out) = pass.out {
        let _ = out.close(200, "done".into()).await;
    }
    result
}

#[derive(Default)]
struct Batch {
    len: u16,
    kept: u64,
    /// Copies to publish when the batch is settled; held back so that a
    /// pass ending inside its first batch rotates nothing.
    copies: Vec<(BasicProperties, Vec<u8>)>,
    last_tag: Option<u64>,
    /// Messages to move, with their delivery tags, not yet published.
    to_move: Vec<(u64, Box<Outgoing>)>,
    /// Delivery tags of messages to remove.
    to_remove: Vec<u64>,
    moves: Vec<(u64, PublisherConfirm)>,
}

struct Pass<'a> {
    target: &'a Target<'a>,
    config: PassConfig,
    ch: Channel,
    out: Option<Channel>,
    batch: Batch,
    committed_keeps: u64,
}

/// Ready messages and consumers of a queue.
pub async fn count(ch: &Channel, queue: &str) -> anyhow::Result<(u32, u32)> {
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("inspecting queue {queue}"))?;
    Ok((q.message_count(), q.consumer_count()))
}

/// Runs publishes together: each one's future resolves only when lapin's
/// I/O thread has written it, so awaiting them one by one costs a thread
/// hand-off per message. The futures are first polled in order, which is when
/// each takes its confirm number and queues its frames, so they go out in order.
async fn publish_all<F>(publishes: impl Iterator<Item = F>) -> lapin::Result<Vec<PublisherConfirm>>
where
    F: std::future::Future<Output = lapin::Result<PublisherConfirm>>,
{
    futures_util::future::try_join_all(publishes).await
}

fn check(confirmation: Confirmation, exchange: &str) -> anyhow::Result<()> {
    match confirmation {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        Confirmation::Ack(Some(r)) => anyhow::bail!(
            "exchange {exchange} routed a replayed message to no queue ({} {}); is its queue bound?",
            r.reply_code,
            r.reply_text
        ),
        Confirmation::Nack(_) => anyhow::bail!("the broker refused (nacked) a replayed message"),
    }
}

impl Pass<'_> {
    async fn run(
        &mut self,
        visit: &mut Visitor<'_>,
        progress: &ProgressBar,
        cancel: &CancellationToken,
    ) -> anyhow::Result<PassReport> {
        let queue = self.target.queue;
        let mut report = PassReport::default();
        self.ch
            .basic_qos(self.config.window, BasicQosOptions::default())
            .await
            .context("setting the prefetch window")?;
        let (ready, _) = count(&self.ch, queue).await?;
        report.present = u64::from(ready);
        progress.set_length(report.present);
        if report.present == 0 {
            return Ok(report);
        }
        let mut consumer = self
            .ch
            .basic_consume(
                queue.into(),
                "".into(),
                // Exclusive: a second reader would take messages from under
                // this pass and count copies as originals.
                BasicConsumeOptions {
                    exclusive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| {
                if e.to_string().contains("exclusive") {
                    anyhow::anyhow!(
                        "another consumer (another `imattr dlq` command?) is reading {queue}; \
                         only one may read it at a time: wait for it to finish and retry"
                    )
                } else {
                    anyhow::Error::new(e).context(format!("reading queue {queue}"))
                }
            })?;
        let mut finishing = false;
        while report.seen < report.present {
            let next = tokio::select! {
                biased;
                _ = cancel.cancelled() => {
                    self.end(&mut report).await?;
                    return Err(Interrupted {
                        seen: report.seen,
                        present: report.present,
                        moved: report.moved,
                    }
                    .into());
                }
                n = tokio::time::timeout(IDLE, consumer.next()) => n,
            };
            let d = match next {
                Err(_) => {
                    if count(&self.ch, queue).await?.0 == 0 {
                        tracing::warn!(
                            queue,
                            seen = report.seen,
                            present = report.present,
                            "The queue ran dry during the pass; someone else removed messages"
                        );
                        report.short = true;
                        break;
                    }
                    continue;
                }
                Ok(None) => anyhow::bail!("the broker stopped the reading of {queue} (deleted?)"),
                Ok(Some(d)) => d.with_context(|| format!("reading queue {queue}"))?,
            };
            report.seen += 1;
            let headers = d.properties.headers().clone().unwrap_or_default();
            let meta = Meta::read(&headers, d.routing_key.as_str(), queue);
            let v = if finishing {
                Visit::keep()
            } else {
                visit(&meta, &d.properties, &d.data)?
            };
            match v.step {
                Step::Keep => {
                    self.keep(&d.properties, headers, &meta, d.data);
                    self.batch.kept += 1;
                }
                Step::Move(o) => {
                    // Published with the batch's copies, in order (`publish_moves`).
                    self.batch.to_move.push((d.delivery_tag, o));
                    report.moved += 1;
                }
                Step::Remove => {
                    self.batch.to_remove.push(d.delivery_tag);
                    report.removed += 1;
                }
            }
            self.batch.last_tag = Some(d.delivery_tag);
            self.batch.len += 1;
            progress.inc(1);
            if v.enough && !finishing {
                if self.committed_keeps == 0 {
                    self.end(&mut report).await?;
                    return Ok(report);
                }
                // Part of the queue is already rotated: rotate the rest too,
                // unread, so the queue ends in its original order.
                finishing = true;
            }
            if self.batch.len >= self.config.batch && report.seen < report.present {
                self.commit().await?;
            }
        }
        self.end(&mut report).await?;
        Ok(report)
    }

    /// Queues a copy of a message for the tail of the queue.
    fn keep(
        &mut self,
        props: &BasicProperties,
        mut headers: FieldTable,
        meta: &Meta,
        body: Vec<u8>,
    ) {
        let mut props = props.clone();
        // The copy is published to the default exchange with the queue's
        // name as routing key, so keep the original key in a header.
        if !meta.broker_made && !headers.contains_key(deadletter::H_ROUTING_KEY) {
            if let Some(rk) = &meta.routing_key {
                headers.insert(
                    deadletter::H_ROUTING_KEY.into(),
                    AMQPValue::LongString(LongString::from(rk.as_str())),
                );
                props = props.with_headers(headers);
            }
        }
        // The broker refuses a user_id other than the connection's own.
        let props = super::replay::without_user_id(&props);
        self.batch.copies.push((props, body));
    }

    async fn out(&mut self) -> anyhow::Result<Channel> {
        if self.out.is_none() {
            self.out = Some(crate::amqp::topology::confirm_channel(self.target.conn).await?);
        }
        self.out.clone().context("no publishing channel")
    }

    /// Publishes the batch's moved messages to the updates exchange, all at
    /// once and in order (see [`publish_all`]).
    async fn publish_moves(&mut self) -> anyhow::Result<()> {
        let to_move = std::mem::take(&mut self.batch.to_move);
        if to_move.is_empty() {
            return Ok(());
        }
        let out = self.out().await?;
        let exchange = ShortString::from(self.target.exchange);
        let confirms = publish_all(to_move.iter().map(|(_, o)| {
            out.basic_publish(
                exchange.clone(),
                ShortString::try_new(o.routing_key.clone()).unwrap_or_default(),
                // Mandatory: an exchange bound to no queue would drop it.
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &o.body,
                o.properties.clone(),
            )
        }))
        .await
        .context("republishing a dead letter")?;
        self.batch
            .moves
            .extend(to_move.iter().map(|(tag, _)| *tag).zip(confirms));
        Ok(())
    }

    /// Publishes the batch's copies, waits for every confirm (copies and
    /// moved messages), then acknowledges the batch: nothing leaves the queue
    /// before the broker holds its copy or its replay.
    async fn commit(&mut self) -> anyhow::Result<()> {
        let Some(last) = self.batch.last_tag else {
            return Ok(());
        };
        self.publish_moves().await?;
        let copies = std::mem::take(&mut self.batch.copies);
        if !copies.is_empty() {
            let out = self.out().await?;
            let queue = ShortString::from(self.target.queue);
            let confirms = publish_all(copies.iter().map(|(props, body)| {
                out.basic_publish(
                    "".into(),
                    queue.clone(),
                    BasicPublishOptions::default(),
                    body,
                    props.clone(),
                )
            }))
            .await
            .context("copying a dead letter to the tail of the queue")?;
            self.batch
                .moves
                .extend(confirms.into_iter().map(|c| (0, c)));
        }
        for (_, c) in self.batch.moves.drain(..) {
            check(
                c.await.context("waiting for a publisher confirm")?,
                self.target.exchange,
            )?;
        }
        self.ch
            .basic_ack(last, BasicAckOptions { multiple: true })
            .await
            .context("acknowledging")?;
        self.committed_keeps += self.batch.kept;
        self.batch = Batch::default();
        Ok(())
    }

    /// Ends the pass. If nothing was rotated yet, the open batch's copies are
    /// dropped unpublished and its kept messages go back to their places
    /// untouched when the channel closes; only the moved and the removed
    /// ones are acknowledged.
    async fn end(&mut self, report: &mut PassReport) -> anyhow::Result<()> {
        if self.committed_keeps > 0 {
            self.commit().await?;
            report.rotated = true;
            return Ok(());
        }
        self.publish_moves().await?;
        for (tag, c) in std::mem::take(&mut self.batch.moves) {
            check(
                c.await.context("waiting for a publisher confirm")?,
                self.target.exchange,
            )?;
            self.ch
                .basic_ack(tag, BasicAckOptions { multiple: false })
                .await
                .context("acknowledging")?;
        }
        for tag in std::mem::take(&mut self.batch.to_remove) {
            self.ch
                .basic_ack(tag, BasicAckOptions { multiple: false })
                .await
                .context("acknowledging")?;
        }
        self.batch = Batch::default();
        Ok(())
    }
}
