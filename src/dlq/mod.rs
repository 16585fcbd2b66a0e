//! Operator tools for the dead-letter queue: list, stats, export, replay, purge.
//!
//! # How the tools read the queue
//!
//! A queue can only be read by taking messages off it, and a message taken
//! stays "unacknowledged" on the broker until it is acknowledged (gone) or
//! returned. So every command reads with one consumer whose prefetch window
//! (`PassConfig::window`, 2,000 by default, never more than
//! `pass::MAX_WINDOW`) bounds how many messages are out at once, whatever
//! the queue holds, and reads exactly the messages ready when it started (the
//! count of a passive queue declare): dead letters that arrive meanwhile are
//! left alone, so `replay` ends even while the worker dead-letters again what
//! it replays.
//!
//! A message the command keeps (all of them for `list`, `stats`, `export`
//! and `replay --dry-run`; the unmatched ones for `replay`) is *rotated*: a
//! copy is published to the tail of the queue (default exchange, publisher
//! confirms) and the original acknowledged once the copy is confirmed, a
//! half window at a time. After a full pass the queue holds the same messages
//! in the same order. Messages the command moves (`replay`) are published to
//! `amqp.exchange` with confirms and acknowledged the same way.
//!
//! The trade-offs, for operators:
//! - Order: a full pass keeps the order of the messages it read. Dead letters
//!   that arrive during a pass land between the copies, so they are no longer
//!   all behind the older ones (each keeps its `x-imattr-failed-at`).
//! - Cost: a rotated message is written to the queue again (persistent), so
//!   a pass costs the broker about what publishing and consuming the queue
//!   once does. A pass that ends within its first half window (a small queue,
//!   `list --limit N`, `replay --limit N` stopping early) rotates nothing: the
//!   copies are held back until a batch is settled, so they are dropped
//!   unpublished and the messages return to their places when the channel
//!   closes (RabbitMQ requeues a classic queue's messages in place).
//! - Killed mid-pass (SIGKILL, crash, lost connection): nothing is lost,
//!   since an original is acknowledged only after its copy or replay is
//!   confirmed; the unacknowledged window returns to the head. At worst the
//!   batch being settled is duplicated (its copies confirmed, its originals
//!   not yet acknowledged): at most half a window, and for `replay` at most
//!   that many messages sent to the updates exchange twice. The queue's order
//!   is then [unread…, rotated…]. SIGINT/SIGTERM stop cleanly at a batch
//!   boundary (no duplicate).
//! - Only one command reads at a time (exclusive consumer); `purge` refuses
//!   while one does. A max-length policy on the dead-letter queue would drop
//!   messages from its head while copies are added: do not set one.
//!
//! A stream queue would allow non-destructive reads by offset, but not the
//! removal a replay needs, and would change the topology existing queues have.

pub mod migrate;
pub mod pass;
pub(crate) mod replay;
pub(crate) mod stats;
pub(crate) mod view;

use std::io::{IsTerminal, Write};

use anyhow::Context;
use lapin::options::QueuePurgeOptions;
use lapin::{Channel, Connection};
use tokio_util::sync::CancellationToken;

pub use pass::PassConfig;
pub(crate) use pass::{PassReport, Visit};
pub(crate) use stats::Stats;
pub use view::{DeadLetterView, Filter};
pub(crate) use view::{Table, REASONS};

use crate::amqp::topology;
use crate::config::Config;

/// What `replay` does.
#[derive(Debug, Clone, Default)]
pub struct ReplayOptions {
    /// Which dead letters.
    pub filter: Filter,
    /// At most this many.
    pub limit: Option<usize>,
    /// Count only.
    pub dry_run: bool,
    /// Republish whole messages, not only their failed accounts' entries.
    pub whole: bool,
}

/// A connection to the broker with the topology declared.
pub struct Dlq {
    conn: Connection,
    channel: Channel,
    config: Config,
    pass_config: PassConfig,
    cancel: CancellationToken,
    progress: bool,
}

impl std::fmt::Debug for Dlq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dlq")
            .field("queue", &self.config.amqp.dead_letter_queue)
            .field("pass", &self.pass_config)
            .finish()
    }
}

impl Dlq {
    /// Connects and declares what the tools need (never the updates queue).
    pub async fn open(config: &Config) -> anyhow::Result<Dlq> {
        let conn = crate::amqp::nodes::connect_first(&config.amqp, "imattr dlq").await?;
        let channel = conn.create_channel().await.context("opening a channel")?;
        topology::declare_for_tools(&conn, &channel, &config.amqp).await?;
        Ok(Dlq {
            conn,
            channel,
            config: config.clone(),
            pass_config: PassConfig::default(),
            cancel: CancellationToken::new(),
            progress: false,
        })
    }

    /// Reads with this window instead of the default.
    pub fn with_pass_config(mut self, pass: PassConfig) -> Dlq {
        self.pass_config = pass;
        self
    }

    /// Stops a pass at its next batch boundary when `cancel` fires.
    pub(crate) fn with_cancel(mut self, cancel: CancellationToken) -> Dlq {
        self.cancel = cancel;
        self
    }

    /// Shows a progress bar on stderr when it is a terminal.
    pub(crate) fn with_progress(mut self, on: bool) -> Dlq {
        self.progress = on && std::io::stderr().is_terminal();
        self
    }

    /// Closes the connection cleanly.
    pub async fn close(self) {
        let _ = self.channel.close(200, "done".into()).await;
        let _ = self.conn.close(200, "done".into()).await;
    }

    /// Ready messages and consumers of the dead-letter queue.
    pub(crate) async fn count(&self) -> anyhow::Result<(u32, u32)> {
        pass::count(&self.channel, &self.config.amqp.dead_letter_queue).await
    }

    async fn pass(
        &self,
        config: PassConfig,
        visit: &mut pass::Visitor<'_>,
    ) -> anyhow::Result<PassReport> {
        let bar = if self.progress {
            let b = indicatif::ProgressBar::new(0);
            if let Ok(style) =
                indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {per_sec} eta {eta}")
            {
                b.set_style(style);
            }
            b
        } else {
            indicatif::ProgressBar::hidden()
        };
        let target = pass::Target {
            conn: &self.conn,
            queue: &self.config.amqp.dead_letter_queue,
            exchange: &self.config.amqp.exchange,
        };
        let r = pass::run(&target, config, visit, &bar, &self.cancel).await;
        bar.finish_and_clear();
        r
    }

    /// Hands `sink` the dead letters matching `filter`, oldest first, at most
    /// `limit`, leaving the queue as it was.
    pub(crate) async fn list(
        &self,
        filter: &Filter,
        limit: Option<usize>,
        sink: &mut dyn FnMut(DeadLetterView) -> anyhow::Result<()>,
    ) -> anyhow::Result<PassReport> {
        if limit == Some(0) {
            return Ok(PassReport::default());
        }
        // Without a filter the first N are the answer: a window of exactly N
        // (when it fits) reads them and nothing more, and they go back in place.
        let config = match limit {
            Some(n) if filter.is_empty() && n <= usize::from(pass::MAX_WINDOW) => {
                let n = n as u16;
                PassConfig {
                    window: n,
                    batch: n,
                }
            }
            _ => self.pass_config,
        };
        let mut found = 0usize;
        self.pass(config, &mut |meta, props, body| {
            if filter.matches(meta) {
                found += 1;
                sink(DeadLetterView::new(meta, props, body))?;
            }
            Ok(Visit::keep().enough(limit.is_some_and(|l| found >= l)))
        })
        .await
    }

    /// Up to `limit` dead letters, oldest first, leaving the queue as it was.
    pub async fn peek(&self, limit: Option<usize>) -> anyhow::Result<Vec<DeadLetterView>> {
        let mut out = Vec::new();
        self.list(&Filter::default(), limit, &mut |v| {
            out.push(v);
            Ok(())
        })
        .await?;
        Ok(out)
    }

    /// Writes the dead letters matching `filter` to `w` as NDJSON, removing
    /// nothing; returns how many.
    pub async fn export(&self, filter: &Filter, w: &mut dyn Write) -> anyhow::Result<u64> {
        let mut n = 0u64;
        self.pass(self.pass_config, &mut |meta, props, body| {
            if filter.matches(meta) {
                serde_json::to_writer(&mut *w, &DeadLetterView::new(meta, props, body))?;
                w.write_all(b"\n").context("writing the export")?;
                n += 1;
            }
            Ok(Visit::keep())
        })
        .await?;
        w.flush().context("writing the export")?;
        Ok(n)
    }

    /// Counts the dead letters (memory bounded whatever their number).
    pub(crate) async fn stats(&self) -> anyhow::Result<Stats> {
        let mut s = Stats::default();
        self.pass(self.pass_config, &mut |meta, _, body| {
            s.add(meta, body.len());
            Ok(Visit::keep())
        })
        .await?;
        Ok(s)
    }

    /// Moves matching dead letters (at most `limit`, among those present at
    /// the start) back to `amqp.exchange` without the `x-imattr-*` headers,
    /// counting `x-imattr-replays`; for a message with
    /// `x-imattr-failed-accounts` only those accounts' entries unless `whole`.
    /// Each is confirmed by the broker before it leaves the DLQ; the others
    /// stay in order. With `dry_run`, nothing moves. Returns how many matched.
    pub async fn replay(&self, o: &ReplayOptions) -> anyhow::Result<usize> {
        let mut matched = 0usize;
        self.pass(self.pass_config, &mut |meta, props, body| {
            if o.limit.is_some_and(|l| matched >= l) || !o.filter.matches(meta) {
                return Ok(Visit::keep());
            }
            matched += 1;
            let enough = o.limit.is_some_and(|l| matched >= l);
            Ok(if o.dry_run {
                Visit::keep()
            } else {
                Visit::moved(replay::outgoing(meta, props, body, o.whole))
            }
            .enough(enough))
        })
        .await?;
        Ok(matched)
    }

    /// Deletes the dead letters matching `filter` among those present at the
    /// start, leaving the others in order; returns how many. Each is removed
    /// by acknowledging it: nothing is requeued, expired or dead-lettered.
    pub(crate) async fn purge_matching(&self, filter: &Filter) -> anyhow::Result<u64> {
        let report = self
            .pass(self.pass_config, &mut |meta, _, _| {
                Ok(if filter.matches(meta) {
                    Visit::removed()
                } else {
                    Visit::keep()
                })
            })
            .await?;
        Ok(report.removed)
    }

    /// Deletes every dead letter; returns how many.
    pub(crate) async fn purge(&self) -> anyhow::Result<u32> {
        let queue = &self.config.amqp.dead_letter_queue;
        let (_, consumers) = self.count().await?;
        // A running pass would put its window back after the purge.
        anyhow::ensure!(
            consumers == 0,
            "{queue} is being read by {consumers} consumer(s) (an `imattr dlq` command?); \
             wait for it to finish and retry"
        );
        self.channel
            .queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
            .await
            .context("purging the dead-letter queue")
    }
}
