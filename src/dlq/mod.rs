//! The dead-letter store and its tools: list, show, stats, export, replay,
//! delete and purge.
//!
//! # How the store works
//!
//! The dead-letter queue is a RabbitMQ stream: the worker appends, nothing is
//! ever taken off it, and a dead letter's id is its offset. What `replay`,
//! `delete` and `purge` resolve is appended to a second stream, the ledger
//! (`<dlq>.ledger`, see [`ledger`]), as ranges of offsets. Every command
//! first reads the ledger into merged ranges, then the store from the start
//! (or from a cursor) up to the last offset present when it started,
//! skipping resolved entries. So:
//! - reading never changes anything (no delivery limit, no requeue: the
//!   broker cannot drop a dead letter because it was read);
//! - `replay`, `delete` and `purge` act only on what was present when they
//!   started, even while the worker keeps appending;
//! - `replay` publishes a batch with confirms, then appends the batch's
//!   ledger entry with confirms: killed between the two, that one batch is
//!   sent again by the next replay (at most [`REPLAY_BATCH`] duplicates),
//!   and nothing is lost;
//! - space is reclaimed only by the stream's retention (`x-max-age`,
//!   `x-max-length-bytes` policies), which drops whole old segments whether
//!   or not their dead letters were resolved.
//!
//! Commands that write the ledger (`replay`, `delete`, `purge`) hold the
//! store's lock (`<dlq>.lock`, an exclusive queue) on a connection of their
//! own, so two of them never resolve the same entries twice.

pub(crate) mod ledger;

/// How long a command waits for the ledger's last entry before refusing.
const LEDGER_WAIT: std::time::Duration = std::time::Duration::from_secs(15);
pub mod migrate;
pub(crate) mod pace;
pub mod pass;
pub mod reader;
pub(crate) mod replay;
pub(crate) mod stats;
pub(crate) mod summary;
pub(crate) mod view;

use std::io::Write;
use std::ops::ControlFlow;

use anyhow::Context;
use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::{BasicProperties, Confirmation, Connection};
use tokio_util::sync::CancellationToken;

pub use stats::{By, Stats};
pub use summary::{Groups, Summary};
pub use view::{DeadLetterView, Filter};
pub(crate) use view::{Table, REASONS};

use crate::amqp::deadletter::now_ms;
use crate::amqp::{headerblob, topology};
use crate::config::Config;
use ledger::{Action, Resolved};
use view::Meta;

/// The stream reader the store uses: the native stream protocol, which reads
/// whole chunks. [`reader::AmqpReader`] (AMQP 0-9-1) has the same methods.
type Reader = crate::amqp::stream::StreamReader;
use crate::amqp::stream::StreamMessage;

/// Dead letters replayed per batch: published with confirms, then recorded
/// in the ledger; also the most a crash between the two can duplicate.
pub const REPLAY_BATCH: usize = 500;

/// Offsets [`Dlq::refresh_summary`] reads while holding the reader.
pub const SUMMARY_BATCH: u64 = 50_000;

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
    /// At most this many messages a second.
    pub rate_per_sec: Option<f64>,
    /// Stops the replay at its next batch boundary.
    pub cancel: CancellationToken,
    /// Who replays, recorded in the ledger.
    pub by: String,
}

/// How far a replay got, after each batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Replayed (confirmed and recorded) so far.
    pub moved: u64,
    /// Refused by the broker (unroutable or nacked) so far: still in the store.
    pub failed: u64,
    /// Matching dead letters this replay will try (after `limit`).
    pub total: u64,
}

/// What a replay did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Replayed (confirmed and recorded).
    pub moved: u64,
    /// Matching dead letters present at the start that are still unresolved
    /// and were not tried (`limit`, an interruption; with `dry_run`: every
    /// matching one).
    pub left: u64,
    /// Refused by the broker; still in the store.
    pub failed: u64,
    /// Stopped by its cancellation token.
    pub cancelled: bool,
}

/// One page of dead letters.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Page {
    /// Oldest first.
    pub items: Vec<DeadLetterView>,
    /// Pass it as `after` for the next page; `None` when this one is the last.
    pub next_after: Option<u64>,
}

/// A dead letter as read: headers restored, facts read.
struct Letter {
    id: u64,
    /// When the broker wrote its chunk, Unix ms.
    chunk_ms: i64,
    meta: Meta,
    properties: BasicProperties,
    body: Vec<u8>,
    /// The reader could not decode it: shown, never replayed.
    undecodable: bool,
}

impl Letter {
    fn decode(m: StreamMessage, dlq: &str) -> Letter {
        let headers = headerblob::restore(&m.headers);
        let mut meta = Meta::read(&headers, "", dlq);
        // Without its own failure time, the time the broker stored it.
        if meta.failed_at_ms.is_none() && m.chunk_timestamp_ms > 0 {
            meta.failed_at_ms = Some(m.chunk_timestamp_ms);
        }
        Letter {
            id: m.offset,
            chunk_ms: m.chunk_timestamp_ms,
            meta,
            properties: m.properties.with_headers(headers),
            body: m.body,
            undecodable: m.undecodable.is_some(),
        }
    }

    fn view(&self, resolved: Option<&ledger::Span>) -> DeadLetterView {
        let mut v = DeadLetterView::new(&self.meta, &self.properties, &self.body);
        v.id = self.id;
        v.resolved =
            resolved.map(|s| format!("{} at {}", s.action.as_str(), view::utc_time(s.at_ms)));
        v
    }
}

/// What a command sees when it starts.
struct Snapshot {
    resolved: Resolved,
    /// The last offset present, `None` for an empty store.
    last: Option<u64>,
}

impl Snapshot {
    /// The offsets to read for `filter` from `from`, if any.
    fn bounds(&self, filter: &Filter, from: u64) -> Option<(u64, u64)> {
        let mut until = self.last?;
        let mut from = from;
        if let Some((lo, hi)) = filter.id_range() {
            from = from.max(lo);
            until = until.min(hi);
        }
        if let Some(b) = filter.before_id {
            until = until.min(b.checked_sub(1)?);
        }
        (from <= until).then_some((from, until))
    }
}

/// The dead-letter store `amqp.dead_letter_queue` refused: it is a classic
/// or quorum queue from an earlier release.
fn legacy_refusal(queue: &str, detail: &str) -> anyhow::Error {
    let kind = if detail.contains("'quorum'") {
        "quorum queue"
    } else {
        "classic queue"
    };
    crate::cli::UsageError(format!(
        "the dead-letter queue {queue} is a {kind} from an earlier release; the dlq commands \
         read a stream, and reading a queue can make the broker drop dead letters: run \
         `imattr dlq migrate` first (docs/dead-letters.md) [{detail}]"
    ))
    .into()
}

/// The store: a connection for declarations and the lock, and a reader.
pub struct Dlq {
    conn: Connection,
    config: Config,
    reader: tokio::sync::Mutex<Reader>,
}

impl std::fmt::Debug for Dlq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dlq")
            .field("queue", &self.config.amqp.dead_letter_queue)
            .finish_non_exhaustive()
    }
}

impl Dlq {
    /// Connects, refuses a legacy (classic or quorum) dead-letter queue, and
    /// declares what the tools need (never the updates queue) and the ledger.
    pub async fn open(config: &Config) -> anyhow::Result<Dlq> {
        let conn = crate::amqp::nodes::connect_first(&config.amqp, "imattr dlq").await?;
        let dlq = &config.amqp.dead_letter_queue;
        if let topology::StoreKind::Legacy { detail } =
            topology::dead_letter_store_kind(&conn, &config.amqp).await?
        {
            let _ = conn.close(200, "legacy".into()).await;
            return Err(legacy_refusal(dlq, &detail));
        }
        let channel = conn.create_channel().await.context("opening a channel")?;
        topology::declare_for_tools(&conn, &channel, &config.amqp).await?;
        // What the broker dead-lettered since the last sweep is in the inbox;
        // every command sees it, worker running or not.
        crate::amqp::inbox::sweep(&conn, &config.amqp, &CancellationToken::new()).await?;
        let ledger = ledger::ledger_name(dlq);
        // Reading an empty stream's end costs a bounded wait (nothing tells
        // "empty" from "not yet delivered"), so a new ledger gets a first,
        // empty entry and every later read of it ends at once.
        let probe = conn.create_channel().await.context("opening a channel")?;
        let existed = probe
            .queue_declare(
                ledger.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await
            .is_ok();
        let _ = probe.close(200, "probed".into()).await;
        channel
            .queue_declare(
                ledger.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                topology::dead_letter_queue_arguments(&config.amqp),
            )
            .await
            .with_context(|| format!("declaring the ledger stream {ledger}"))?;
        let _ = channel.close(200, "declared".into()).await;
        let reader = Reader::connect(&config.amqp, "imattr dlq reader").await?;
        let q = Dlq {
            conn,
            config: config.clone(),
            reader: tokio::sync::Mutex::new(reader),
        };
        // A ledger declared but left without its first entry (a command
        // stopped in between) would make every read wait for its end.
        let empty = existed && q.reader.lock().await.last_offset(&ledger).await?.is_none();
        if !existed || empty {
            let first = ledger::Entry {
                action: Action::Deleted,
                at_ms: now_ms(),
                by: "imattr (ledger created)".into(),
                ranges: Vec::new(),
            };
            q.append(&q.conn, &[first]).await?;
        }
        Ok(q)
    }

    /// Closes the connections cleanly.
    pub async fn close(self) {
        self.reader.into_inner().close().await;
        let _ = self.conn.close(200, "done".into()).await;
    }

    fn dlq(&self) -> &str {
        &self.config.amqp.dead_letter_queue
    }

    /// Reads the ledger, then the last offset of the store.
    async fn snapshot(&self, r: &mut Reader) -> anyhow::Result<Snapshot> {
        let ledger = ledger::ledger_name(self.dlq());
        let mut resolved = Resolved::default();
        // `open` gives every ledger a first entry, so "empty" only means the
        // broker was slow to answer: reading on would bring back everything
        // replayed or deleted. Wait longer, then refuse.
        let ledger_last = match r.last_offset(&ledger).await? {
            Some(last) => Some(last),
            None => r.last_offset_within(&ledger, LEDGER_WAIT).await?,
        };
        let Some(ledger_last) = ledger_last else {
            anyhow::bail!(
                "the ledger {ledger} answered nothing within {LEDGER_WAIT:?}; the broker may be busy: run the command again"
            );
        };
        {
            let last = ledger_last;
            // An entry this version cannot read (not decodable, or not a
            // ledger entry it knows: a newer imattr's) may record what was
            // resolved: skipping it would bring those dead letters back, so stop.
            let mut unreadable = None;
            r.read(&ledger, 0, last, |m| {
                let entry = match m.undecodable {
                    Some(e) => Err(e),
                    None => match serde_json::from_slice::<ledger::Entry>(&m.body) {
                        Ok(e) => Ok(e),
                        // Not a ledger entry at all (a stray publish to the
                        // ledger by name): it resolves nothing.
                        Err(e) if !ledger::looks_like_entry(&m.body) => {
                            tracing::warn!(ledger = %ledger, offset = m.offset, error = %e, "Ledger entry that is not imattr's skipped");
                            return ControlFlow::Continue(());
                        }
                        Err(e) => Err(e.to_string()),
                    },
                };
                match entry {
                    Ok(e) => {
                        resolved.add(&e);
                        ControlFlow::Continue(())
                    }
                    Err(e) => {
                        unreadable = Some((m.offset, e));
                        ControlFlow::Break(())
                    }
                }
            })
            .await?;
            if let Some((offset, e)) = unreadable {
                anyhow::bail!(
                    "the ledger {ledger} holds an entry this version cannot read (offset {offset}: {e}); \
                     reading on could show replayed or deleted dead letters as unresolved, so nothing \
                     is read: use the imattr version that wrote it"
                );
            }
        }
        let last = r.last_offset(self.dlq()).await?;
        tracing::debug!(spans = resolved.spans(), last = ?last, "Dead-letter store snapshot");
        Ok(Snapshot { resolved, last })
    }

    /// Calls `f` with each dead letter in `from..=until`, decoded.
    async fn scan(
        &self,
        r: &mut Reader,
        from: u64,
        until: u64,
        mut f: impl FnMut(Letter) -> ControlFlow<()>,
    ) -> anyhow::Result<u64> {
        let dlq = self.dlq().to_string();
        r.read(&dlq, from, until, |m| f(Letter::decode(m, &dlq)))
            .await
    }

    /// Hands `sink` the dead letters matching `filter` with id > `after`,
    /// oldest first, at most `limit`; resolved ones too when `resolved`.
    /// Returns the next cursor when it stopped at `limit` with more to read.
    pub(crate) async fn list(
        &self,
        filter: &Filter,
        after: Option<u64>,
        limit: Option<usize>,
        resolved: bool,
        sink: &mut (dyn FnMut(DeadLetterView) -> anyhow::Result<()> + Send),
    ) -> anyhow::Result<Option<u64>> {
        if limit == Some(0) {
            return Ok(None);
        }
        let mut r = self.reader.lock().await;
        let snap = self.snapshot(&mut r).await?;
        let from = after.map_or(0, |a| a.saturating_add(1));
        let Some((from, until)) = snap.bounds(filter, from) else {
            return Ok(None);
        };
        let mut found = 0usize;
        let mut failure = None;
        let mut next = None;
        self.scan(&mut r, from, until, |l| {
            let span = snap.resolved.get(l.id);
            if (span.is_some() && !resolved) || !filter.matches(l.id, &l.meta, &l.body) {
                return ControlFlow::Continue(());
            }
            if let Err(e) = sink(l.view(span)) {
                failure = Some(e);
                return ControlFlow::Break(());
            }
            found += 1;
            if limit.is_some_and(|n| found >= n) {
                next = (l.id < until).then_some(l.id);
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        })
        .await?;
        match failure {
            Some(e) => Err(e),
            None => Ok(next),
        }
    }

    /// Dead letters matching `filter` with id > `after`, oldest first, at
    /// most `limit`, and the cursor of the next page.
    pub async fn page(
        &self,
        filter: &Filter,
        after: Option<u64>,
        limit: usize,
    ) -> anyhow::Result<Page> {
        let mut items = Vec::new();
        let next_after = self
            .list(filter, after, Some(limit), false, &mut |v| {
                items.push(v);
                Ok(())
            })
            .await?;
        Ok(Page { items, next_after })
    }

    /// Every unresolved dead letter (at most `limit`), oldest first.
    pub async fn peek(&self, limit: Option<usize>) -> anyhow::Result<Vec<DeadLetterView>> {
        let mut out = Vec::new();
        self.list(&Filter::default(), None, limit, false, &mut |v| {
            out.push(v);
            Ok(())
        })
        .await?;
        Ok(out)
    }

    /// How many unresolved dead letters match `filter`, and the end of
    /// what was read (the ids below it; 0 for an empty store): a console
    /// confirmation bounds its action by it, so that the action takes
    /// nothing the count did not see.
    pub async fn count_to_end(&self, filter: &Filter) -> anyhow::Result<(u64, u64)> {
        // "Empty" after a second may be a slow broker: a count of 0 there
        // would name nothing for an action to take. Wait as for the ledger.
        let (stats, end) = self.tally(filter, 10, Some(LEDGER_WAIT)).await?;
        Ok((stats.total, end))
    }

    /// One dead letter by id, resolved or not (`resolved` says how).
    pub async fn show(&self, id: u64) -> anyhow::Result<Option<DeadLetterView>> {
        let mut r = self.reader.lock().await;
        let snap = self.snapshot(&mut r).await?;
        if snap.last.is_none_or(|l| id > l) {
            return Ok(None);
        }
        let mut found = None;
        self.scan(&mut r, id, id, |l| {
            if l.id == id {
                found = Some(l.view(snap.resolved.get(id)));
            }
            ControlFlow::Break(())
        })
        .await?;
        Ok(found)
    }

    /// Counts the unresolved dead letters matching `filter` (memory bounded
    /// whatever their number), with the 10 most frequent accounts.
    pub async fn stats(&self, filter: &Filter) -> anyhow::Result<Stats> {
        self.stats_top(filter, 10).await
    }

    /// [`Dlq::stats`] with the `top` most frequent accounts.
    pub async fn stats_top(&self, filter: &Filter, top: usize) -> anyhow::Result<Stats> {
        Ok(self.tally(filter, top, None).await?.0)
    }

    /// The counts of the unresolved dead letters matching `filter`, and the
    /// end of what was read (the ids below it; 0 for an empty store). A
    /// store that looks empty is asked again for up to `empty_wait`.
    async fn tally(
        &self,
        filter: &Filter,
        top: usize,
        empty_wait: Option<std::time::Duration>,
    ) -> anyhow::Result<(Stats, u64)> {
        let mut r = self.reader.lock().await;
        let mut snap = self.snapshot(&mut r).await?;
        if let (None, Some(wait)) = (snap.last, empty_wait) {
            snap.last = r.last_offset_within(self.dlq(), wait).await?;
        }
        let end = snap.last.map_or(0, |l| l.saturating_add(1));
        let mut tally = stats::Tally::default();
        if let Some((from, until)) = snap.bounds(filter, 0) {
            self.scan(&mut r, from, until, |l| {
                if snap.resolved.get(l.id).is_none() && filter.matches(l.id, &l.meta, &l.body) {
                    tally.add(&l.meta, l.body.len());
                }
                ControlFlow::Continue(())
            })
            .await?;
        }
        Ok((tally.report(top), end))
    }

    /// Brings `summary` up to date: reads the ledger, then only the dead
    /// letters past [`Summary::upto`], in batches of [`SUMMARY_BATCH`] so
    /// that other reads are not held up for long. Reads the store from its
    /// start again when it was deleted and declared again since. Returns
    /// how many dead letters it read.
    pub async fn refresh_summary(&self, summary: &mut Summary) -> anyhow::Result<u64> {
        let (snap, last, first) = {
            let mut r = self.reader.lock().await;
            let snap = self.snapshot(&mut r).await?;
            // "Empty" after a second may only be a slow broker: before
            // throwing away what was summarised, wait as for the ledger.
            let last = match snap.last {
                None if summary.upto() > 0 => r.last_offset_within(self.dlq(), LEDGER_WAIT).await?,
                last => last,
            };
            // The first chunk may sit in an old segment the broker reads
            // from disk: wait as for the ledger before giving up.
            let first = match last {
                Some(_) => match r.first_offset(self.dlq()).await? {
                    Some(first) => Some(first),
                    None => r.first_offset_within(self.dlq(), LEDGER_WAIT).await?,
                },
                None => None,
            };
            (snap, last, first)
        };
        let Some(last) = last else {
            summary.reset();
            return Ok(0);
        };
        // A store with a last entry has a first one: no answer is a slow
        // broker, and guessing 0 would keep rows retention dropped.
        let Some(first) = first else {
            anyhow::bail!(
                "the dead-letter store {} did not say where it starts; the broker may be busy: try again",
                self.dlq()
            );
        };
        // Fewer offsets than were read, or the last one read gone to
        // retention (the summary holds nothing of this store then).
        if summary.upto() > last.saturating_add(1) || summary.tail().is_some_and(|t| t.id < first) {
            summary.reset();
        }
        summary.drop_below(first);
        if let Some(t) = summary.tail() {
            let mut same = false;
            let mut r = self.reader.lock().await;
            self.scan(&mut r, t.id, t.id, |l| {
                same = l.id == t.id && l.chunk_ms == t.chunk_ms && l.body.len() == t.body_bytes;
                ControlFlow::Break(())
            })
            .await?;
            if !same {
                tracing::info!(queue = %self.dlq(), "Dead-letter store declared again; summarising it from its start");
                summary.reset();
            }
        }
        let mut from = summary.upto().max(first);
        let started = std::time::Instant::now();
        let mut read = 0u64;
        while from <= last {
            let until = last.min(from.saturating_add(SUMMARY_BATCH - 1));
            let mut r = self.reader.lock().await;
            read += self
                .scan(&mut r, from, until, |l| {
                    summary.add(l.id, &l.meta, l.body.len(), l.chunk_ms);
                    ControlFlow::Continue(())
                })
                .await?;
            drop(r);
            summary.read_to(until);
            match until.checked_add(1) {
                Some(next) => from = next,
                None => break,
            }
        }
        summary.resolve(&snap.resolved);
        tracing::debug!(
            read,
            rows = summary.len(),
            upto = summary.upto(),
            read_ms = started.elapsed().as_millis() as u64,
            "Dead-letter summary refreshed"
        );
        Ok(read)
    }

    /// Writes the unresolved dead letters matching `filter` to `w` as
    /// NDJSON, oldest first; returns how many.
    pub async fn export(&self, filter: &Filter, w: &mut (dyn Write + Send)) -> anyhow::Result<u64> {
        let mut n = 0u64;
        self.list(filter, None, None, false, &mut |v| {
            serde_json::to_writer(&mut *w, &v).context("writing the export")?;
            w.write_all(b"\n").context("writing the export")?;
            n += 1;
            Ok(())
        })
        .await?;
        w.flush().context("writing the export")?;
        Ok(n)
    }

    /// Opens a connection of its own and takes the store's lock on it: the
    /// lock lasts as long as that connection.
    async fn locked(&self, what: &str) -> anyhow::Result<Connection> {
        let conn =
            crate::amqp::nodes::connect_first(&self.config.amqp, &format!("imattr dlq {what}"))
                .await?;
        let ch = conn.create_channel().await.context("opening a channel")?;
        if let Err(e) = topology::take_consume_lock(&ch, self.dlq()).await {
            let _ = conn.close(200, "busy".into()).await;
            return Err(if e.downcast_ref::<topology::QueueBusy>().is_some() {
                anyhow::anyhow!(
                    "another `imattr dlq` command (replay, delete, purge or migrate) is \
                     changing {}; wait for it to finish and retry",
                    self.dlq()
                )
            } else {
                e
            });
        }
        Ok(conn)
    }

    /// Appends ledger entries for `offsets` (sorted), each confirmed.
    async fn record(
        &self,
        conn: &Connection,
        action: Action,
        by: &str,
        offsets: &[u64],
    ) -> anyhow::Result<()> {
        if offsets.is_empty() {
            return Ok(());
        }
        self.append(conn, &ledger::entries(action, now_ms(), by, offsets))
            .await
    }

    /// Appends ledger entries, each confirmed.
    async fn append(&self, conn: &Connection, entries: &[ledger::Entry]) -> anyhow::Result<()> {
        let ledger = ledger::ledger_name(self.dlq());
        let ch = topology::confirm_channel(conn).await?;
        for e in entries {
            let body = serde_json::to_vec(e).context("encoding a ledger entry")?;
            let confirm = ch
                .basic_publish(
                    "".into(),
                    ledger.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &body,
                    BasicProperties::default()
                        .with_delivery_mode(2)
                        .with_content_type("application/json".into()),
                )
                .await
                .context("appending to the ledger")?
                .await
                .context("appending to the ledger")?;
            anyhow::ensure!(
                matches!(confirm, Confirmation::Ack(None)),
                "the broker did not take a ledger entry of {ledger}"
            );
        }
        let _ = ch.close(200, "done".into()).await;
        Ok(())
    }

    /// Marks the unresolved dead letters matching `filter` as deleted (the
    /// stream's retention reclaims the space); returns how many.
    pub async fn delete(&self, filter: &Filter, by: &str) -> anyhow::Result<u64> {
        let conn = self.locked("delete").await?;
        let result = async {
            let mut r = self.reader.lock().await;
            let snap = self.snapshot(&mut r).await?;
            let Some((from, until)) = snap.bounds(filter, 0) else {
                return Ok(0);
            };
            let mut offsets = Vec::new();
            self.scan(&mut r, from, until, |l| {
                if snap.resolved.get(l.id).is_none() && filter.matches(l.id, &l.meta, &l.body) {
                    offsets.push(l.id);
                }
                ControlFlow::Continue(())
            })
            .await?;
            drop(r);
            self.record(&conn, Action::Deleted, by, &offsets).await?;
            Ok(offsets.len() as u64)
        }
        .await;
        let _ = conn.close(200, "done".into()).await;
        result
    }

    /// Sends matching dead letters present at the start back to
    /// `amqp.exchange` (see [`replay::outgoing`]), in batches: each batch is
    /// confirmed by the broker, then recorded in the ledger. `progress` is
    /// called after each batch.
    pub async fn replay(
        &self,
        o: &ReplayOptions,
        progress: &(dyn Fn(&Progress) + Send + Sync),
    ) -> anyhow::Result<ReplayReport> {
        if o.limit == Some(0) {
            return Ok(ReplayReport::default());
        }
        let conn = if o.dry_run {
            None
        } else {
            Some(self.locked("replay").await?)
        };
        let result = self.replay_locked(conn.as_ref(), o, progress).await;
        if let Some(c) = conn {
            let _ = c.close(200, "done".into()).await;
        }
        result
    }

    async fn replay_locked(
        &self,
        conn: Option<&Connection>,
        o: &ReplayOptions,
        progress: &(dyn Fn(&Progress) + Send + Sync),
    ) -> anyhow::Result<ReplayReport> {
        // The reader is held for each read, not for the whole replay: a paced
        // replay from the console must not hold up its pages and counts.
        let mut r = self.reader.lock().await;
        let snap = self.snapshot(&mut r).await?;
        let Some((from, until)) = snap.bounds(&o.filter, 0) else {
            return Ok(ReplayReport::default());
        };
        let unresolved_match = |l: &Letter| {
            snap.resolved.get(l.id).is_none() && o.filter.matches(l.id, &l.meta, &l.body)
        };
        // Counted first: the progress bar's length and what is left. What
        // the reader could not decode is not the message that failed: it is
        // never sent, takes no place under `--limit`, and is reported failed.
        let mut matching = 0u64;
        let mut unreadable = 0u64;
        self.scan(&mut r, from, until, |l| {
            if unresolved_match(&l) {
                if l.undecodable {
                    unreadable += 1;
                } else {
                    matching += 1;
                }
            }
            ControlFlow::Continue(())
        })
        .await?;
        drop(r);
        let total = o.limit.map_or(matching, |l| matching.min(l as u64));
        let Some(conn) = conn.filter(|_| !o.dry_run) else {
            return Ok(ReplayReport {
                left: matching,
                ..ReplayReport::default()
            });
        };
        let updates = topology::confirm_channel(conn).await?;
        let exchange = self.config.amqp.exchange.clone();
        let batch_size = match o.rate_per_sec {
            // About a second's worth, so that SIGINT stops within a second or so.
            Some(rate) => (rate.ceil() as usize).clamp(1, REPLAY_BATCH),
            None => REPLAY_BATCH,
        };
        let mut pace = o.rate_per_sec.map(pace::Pace::new);
        let mut p = Progress {
            moved: 0,
            failed: 0,
            total,
        };
        progress(&p);
        let mut cursor = from;
        let mut cancelled = false;
        // Refused by the broker (the progress's `failed`); the report adds
        // the unreadable ones.
        let mut refused = 0u64;
        let mut unreadable_passed = 0u64;
        while p.moved + refused < total && cursor <= until {
            if o.cancel.is_cancelled() {
                cancelled = true;
                break;
            }
            let want = batch_size.min((total - p.moved - refused) as usize);
            let mut batch: Vec<(u64, replay::Outgoing)> = Vec::with_capacity(want);
            let mut last_seen = None;
            let now = now_ms();
            let mut r = self.reader.lock().await;
            self.scan(&mut r, cursor, until, |l| {
                last_seen = Some(l.id);
                if unresolved_match(&l) {
                    if l.undecodable {
                        tracing::warn!(
                            id = l.id,
                            "Dead letter not decodable; not replayed, it stays"
                        );
                        unreadable_passed += 1;
                    } else {
                        let out = replay::outgoing(&l.meta, &l.properties, &l.body, o.whole, now);
                        batch.push((l.id, out));
                        if batch.len() >= want {
                            return ControlFlow::Break(());
                        }
                    }
                }
                ControlFlow::Continue(())
            })
            .await?;
            drop(r);
            let Some(seen) = last_seen else { break };
            cursor = seen.saturating_add(1);
            if seen == u64::MAX {
                cursor = until.saturating_add(1);
            }
            // Publish (paced), then wait for every confirm of the batch.
            let mut confirms = Vec::with_capacity(batch.len());
            for (id, out) in &batch {
                if let Some(pace) = pace.as_mut() {
                    if !pace.take(&o.cancel).await {
                        cancelled = true;
                        break;
                    }
                }
                let c = updates
                    .basic_publish(
                        exchange.as_str().into(),
                        lapin::types::ShortString::try_new(out.routing_key.as_str())
                            .unwrap_or_default(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..Default::default()
                        },
                        &out.body,
                        out.properties.clone(),
                    )
                    .await
                    .context("replaying a dead letter")?;
                confirms.push((*id, c));
            }
            let mut done = Vec::with_capacity(confirms.len());
            for (id, c) in confirms {
                match c.await.context("waiting for a publisher confirm")? {
                    Confirmation::Ack(None) => done.push(id),
                    _ => {
                        tracing::warn!(id, exchange = %exchange, "Replay refused by the broker (unroutable or nacked); the dead letter stays");
                        refused += 1;
                    }
                }
            }
            self.record(conn, Action::Replayed, &o.by, &done).await?;
            p.moved += done.len() as u64;
            p.failed = refused;
            progress(&p);
            if cancelled {
                break;
            }
        }
        let _ = updates.close(200, "done".into()).await;
        let cancelled = cancelled || (o.cancel.is_cancelled() && p.moved + refused < total);
        // A replay of every match passes every unreadable one, even those
        // after the last it sent; one cut short by --limit or SIGINT only
        // those it read.
        let unreadable = if total == matching && !cancelled {
            unreadable
        } else {
            unreadable_passed
        };
        Ok(ReplayReport {
            moved: p.moved,
            left: matching - p.moved - refused,
            failed: refused + unreadable,
            cancelled,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The web console holds one `Dlq` across requests and awaits its
    /// methods in handlers that must be `Send`.
    #[allow(dead_code)]
    fn the_api_can_be_shared_across_tasks(q: &Dlq, f: &Filter, o: &ReplayOptions) {
        fn send<T: Send>(_: &T) {}
        fn shared<T: Send + Sync>() {}
        shared::<Dlq>();
        send(&q.page(f, None, 10));
        send(&q.show(1));
        send(&q.stats(f));
        send(&q.count_to_end(f));
        send(&q.refresh_summary(&mut Summary::new()));
        send(&q.delete(f, "x"));
        send(&q.replay(o, &|_| {}));
        let mut w = Vec::new();
        send(&q.export(f, &mut w));
    }

    #[test]
    fn a_snapshot_bounds_the_read() {
        let s = Snapshot {
            resolved: Resolved::default(),
            last: Some(100),
        };
        let all = Filter::default();
        assert_eq!(s.bounds(&all, 0), Some((0, 100)));
        assert_eq!(s.bounds(&all, 101), None, "a cursor past the end");
        let ids = Filter {
            ids: Some(vec![7, 150, 3]),
            ..Filter::default()
        };
        assert_eq!(
            s.bounds(&ids, 0),
            Some((3, 100)),
            "never past the start's end"
        );
        assert_eq!(s.bounds(&ids, 8), Some((8, 100)));
        let before = |b: u64| Filter {
            before_id: Some(b),
            ..Filter::default()
        };
        assert_eq!(s.bounds(&before(50), 0), Some((0, 49)));
        assert_eq!(s.bounds(&before(500), 0), Some((0, 100)));
        assert_eq!(s.bounds(&before(0), 0), None, "nothing was counted");
        assert_eq!(s.bounds(&before(50), 50), None);
        let both = Filter {
            before_id: Some(5),
            ..ids
        };
        assert_eq!(s.bounds(&both, 0), Some((3, 4)));
        let empty = Snapshot {
            resolved: Resolved::default(),
            last: None,
        };
        assert_eq!(empty.bounds(&all, 0), None);
    }
}
