//! `imattr dlq migrate`: turns a classic or quorum dead-letter queue from an
//! earlier release into the stream, without losing a dead letter, and can be
//! run again after any interruption (docs/dead-letters.md, "Migrating").
//!
//! A queue cannot change its type, so the dead letters move twice, through a
//! classic holding queue `<dlq>.migrating`:
//!
//! 1. declare the holding queue and bind it to the dead-letter exchange, then
//!    unbind the old queue: new dead letters land in the holding queue;
//! 2. move every message of the old queue into the holding queue;
//! 3. delete the old queue (only if empty);
//! 4. declare the stream `<dlq>` (not yet bound);
//! 5. move the holding queue into the stream;
//! 6. bind the inbox (the exchange feeds the inbox, never the stream: see
//!    `crate::amqp::inbox`), unbind the holding queue, move what arrived
//!    meanwhile, delete the holding queue (only if empty).
//!
//! The worker publishes its own dead letters to `<dlq>` by name: into the old
//! queue until step 3 (moved with the rest), refused as unroutable between
//! steps 3 and 4 (it keeps the original and retries), into the stream after.
//!
//! Every move publishes a copy (default exchange, `mandatory`, publisher
//! confirms) and acknowledges the original only once the copy is confirmed;
//! nothing is ever rejected or requeued. Killed mid-move, the copies confirmed
//! but not yet acknowledged are moved again: duplicates, never a loss. A
//! re-run looks at what exists and resumes at the step it finds.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions,
    BasicQosOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{FieldTable, LongString};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use tokio_util::sync::CancellationToken;

use crate::amqp::topology::{self, StoreKind};
use crate::config::AmqpConfig;

/// The holding queue's name for the dead-letter queue `dlq`.
pub fn holding_queue_name(dlq: &str) -> String {
    format!("{dlq}.migrating")
}

/// Messages in flight when moving out of a classic queue: a classic queue
/// puts what a closed channel hands back in its place, so a window costs
/// nothing but memory.
const CLASSIC_WINDOW: u16 = 1_000;

/// How long a move waits for the next delivery before it counts the source
/// again (another client may have taken what it counted).
const IDLE: Duration = Duration::from_secs(2);

/// What the dead-letter queue is and whether a holding queue exists: all a
/// re-run needs to know where to resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct State {
    /// The old classic or quorum queue is still there.
    pub(crate) legacy: Option<LegacyType>,
    /// `<dlq>.migrating` exists.
    pub(crate) holding: bool,
}

/// The old queue's type: it decides how the old queue is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LegacyType {
    Classic,
    Quorum,
}

impl LegacyType {
    /// Reads the type from the broker's refusal of the stream declaration
    /// (`… received 'stream' but current is the value 'quorum' …`). An
    /// unknown type is treated as quorum: the careful reading.
    pub(crate) fn from_refusal(detail: &str) -> LegacyType {
        match topology::QueueMismatch::parse("", detail).map(|m| m.current) {
            Some(t) if t == "classic" || t == "not set" => LegacyType::Classic,
            _ => LegacyType::Quorum,
        }
    }
}

/// One step of the migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Declare `<dlq>.migrating`, bind it to the exchange, unbind the old queue.
    Hold,
    /// Move the old queue into the holding queue.
    DrainOld(LegacyType),
    /// Delete the old queue if empty.
    DeleteOld,
    /// Declare the stream (unbound).
    DeclareStream,
    /// Move the holding queue into the stream.
    DrainHolding,
    /// Bind the stream, unbind the holding queue.
    Switch,
    /// Delete the holding queue if empty.
    DeleteHolding,
}

/// The steps left from `state`; empty: nothing to do.
pub(crate) fn plan(state: State) -> Vec<Step> {
    let mut steps = Vec::new();
    if let Some(t) = state.legacy {
        steps.extend([Step::Hold, Step::DrainOld(t), Step::DeleteOld]);
    } else if !state.holding {
        return steps;
    }
    steps.extend([
        Step::DeclareStream,
        Step::DrainHolding,
        Step::Switch,
        // What arrived between the first drain and the switch.
        Step::DrainHolding,
        Step::DeleteHolding,
    ]);
    steps
}

/// What a migration did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Migrated {
    /// Messages moved from the old queue into the holding queue.
    pub from_old: u64,
    /// Messages moved from the holding queue into the stream.
    pub into_stream: u64,
    /// Nothing to do: the dead-letter queue was a stream already.
    pub nothing_to_do: bool,
}

/// `imattr dlq migrate`: migrates, prints progress on a terminal and a
/// final line.
pub(crate) async fn run_command(config: &crate::config::Config) -> anyhow::Result<()> {
    let cancel = crate::cli::cancel_on_signal();
    let m = migrate(&config.amqp, &cancel, std::io::stderr().is_terminal()).await?;
    let dlq = &config.amqp.dead_letter_queue;
    let mut out = crate::cli::stdout();
    use std::io::Write;
    if m.nothing_to_do {
        writeln!(out, "nothing to do: {dlq} is a stream already")?;
    } else {
        writeln!(
            out,
            "migrated {dlq} into a stream: moved {} dead letters ({} from the old queue)",
            m.into_stream, m.from_old
        )?;
    }
    Ok(())
}

/// Migrates the dead-letter queue of `cfg` into a stream (see the module
/// documentation). Stops at a batch boundary when `cancel` fires, with an
/// error saying to run it again.
pub async fn migrate(
    cfg: &AmqpConfig,
    cancel: &CancellationToken,
    progress: bool,
) -> anyhow::Result<Migrated> {
    let conn = crate::amqp::nodes::connect_first(cfg, "imattr dlq migrate").await?;
    let r = migrate_on(&conn, cfg, cancel, progress).await;
    let _ = conn.close(200, "done".into()).await;
    r
}

async fn migrate_on(
    conn: &Connection,
    cfg: &AmqpConfig,
    cancel: &CancellationToken,
    progress: bool,
) -> anyhow::Result<Migrated> {
    let dlq = cfg.dead_letter_queue.as_str();
    let holding = holding_queue_name(dlq);
    let exchange = cfg.dead_letter_exchange.as_str();
    // The lock every dlq command takes: no other reads or moves meanwhile.
    let lock = conn.create_channel().await.context("opening a channel")?;
    topology::take_consume_lock(&lock, dlq).await?;
    let ch = conn.create_channel().await.context("opening a channel")?;
    topology::declare_exchange(&ch, exchange).await?;
    let legacy = match topology::dead_letter_store_kind(conn, cfg).await? {
        StoreKind::Stream => None,
        StoreKind::Legacy { detail } => Some(LegacyType::from_refusal(&detail)),
    };
    let state = State {
        legacy,
        holding: queue_exists(conn, &holding).await?,
    };
    let steps = plan(state);
    if state_has_old_queue(&steps) {
        // A queue being deleted confirms what is published to it meanwhile
        // and drops it, and the worker publishes its dead letters to this
        // queue by name: the workers must be stopped while it is emptied.
        if let Some((_, consumers)) = topology::queue_counts(conn, &cfg.queue).await? {
            if consumers > 0 {
                anyhow::bail!(crate::cli::UsageError(format!(
                    "{} has {consumers} consumer(s): stop the workers (`imattr run`) while the dead-letter queue is migrated, then start them again",
                    cfg.queue
                )));
            }
        }
    }
    let mut m = Migrated {
        nothing_to_do: steps.is_empty(),
        ..Migrated::default()
    };
    if steps.is_empty() {
        // A stream declared just now (no queue at all before) needs its inbox.
        bind_inbox(&ch, cfg).await?;
    }
    for step in steps {
        tracing::info!(queue = dlq, step = ?step, "Migrating the dead-letter queue");
        match step {
            Step::Hold => {
                declare_holding(&ch, &holding).await?;
                // Bound before the old one is unbound: a dead letter never
                // finds the exchange without a queue (a broker-made one would
                // be dropped).
                bind(&ch, &holding, exchange).await?;
                unbind(&ch, dlq, exchange).await?;
            }
            Step::DrainOld(t) => {
                let mover = Move {
                    from: dlq,
                    to: &holding,
                };
                // One at a time whatever the type: nothing is handed out
                // that is not being moved, so nothing can be requeued behind
                // the emptiness check (a quorum queue would also count it).
                let _ = t;
                m.from_old += mover.get_one_by_one(conn, cancel, progress).await?;
            }
            Step::DeleteOld => {
                // The worker may add a dead letter between the last read and
                // the delete ("not empty"): move it and try again.
                let mut tries = 0;
                loop {
                    match delete_if_empty(conn, dlq, legacy).await {
                        Ok(()) => break,
                        Err(e) if tries < 20 && !cancel.is_cancelled() => {
                            tries += 1;
                            tracing::debug!(error = %e, "The old queue got a dead letter meanwhile; moving it");
                            let mover = Move {
                                from: dlq,
                                to: &holding,
                            };
                            m.from_old += mover.get_one_by_one(conn, cancel, false).await?;
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            Step::DeclareStream => {
                ch.queue_declare(
                    dlq.into(),
                    QueueDeclareOptions {
                        durable: true,
                        ..Default::default()
                    },
                    topology::dead_letter_queue_arguments(cfg),
                )
                .await
                .with_context(|| format!("declaring the stream {dlq}"))?;
            }
            Step::DrainHolding => {
                let mover = Move {
                    from: &holding,
                    to: dlq,
                };
                m.into_stream += mover.consume(conn, cancel, progress).await?;
            }
            Step::Switch => {
                bind_inbox(&ch, cfg).await?;
                unbind(&ch, &holding, exchange).await?;
            }
            Step::DeleteHolding => {
                delete_if_empty(conn, &holding, Some(LegacyType::Classic)).await?
            }
        }
    }
    let _ = ch.close(200, "done".into()).await;
    let _ = lock.close(200, "done".into()).await;
    Ok(m)
}

/// Declares the inbox and binds it to the dead-letter exchange.
async fn bind_inbox(ch: &Channel, cfg: &AmqpConfig) -> anyhow::Result<()> {
    let inbox = crate::amqp::inbox::inbox_name(&cfg.dead_letter_queue);
    ch.queue_declare(
        inbox.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        topology::inbox_arguments(cfg),
    )
    .await
    .with_context(|| format!("declaring the inbox {inbox}"))?;
    bind(ch, &inbox, &cfg.dead_letter_exchange).await
}

async fn declare_holding(ch: &Channel, holding: &str) -> anyhow::Result<()> {
    let mut args = FieldTable::default();
    // Classic whatever the vhost's default queue type: its reads cost nothing.
    args.insert(
        "x-queue-type".into(),
        lapin::types::AMQPValue::LongString(LongString::from("classic")),
    );
    ch.queue_declare(
        holding.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .with_context(|| format!("declaring the holding queue {holding}"))?;
    Ok(())
}

async fn bind(ch: &Channel, queue: &str, exchange: &str) -> anyhow::Result<()> {
    ch.queue_bind(
        queue.into(),
        exchange.into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .with_context(|| format!("binding {queue} to {exchange}"))
}

async fn unbind(ch: &Channel, queue: &str, exchange: &str) -> anyhow::Result<()> {
    ch.queue_unbind(
        queue.into(),
        exchange.into(),
        "".into(),
        FieldTable::default(),
    )
    .await
    .with_context(|| format!("unbinding {queue} from {exchange}"))
}

/// Whether `queue` exists.
async fn queue_exists(conn: &Connection, queue: &str) -> anyhow::Result<bool> {
    Ok(topology::queue_counts(conn, queue).await?.is_some())
}

/// Ready messages in `queue`.
async fn ready(ch: &Channel, queue: &str) -> anyhow::Result<u32> {
    Ok(super::pass::count(ch, queue).await?.0)
}

/// Deletes `queue` only if it is empty, on a channel of its own. A classic
/// queue: the broker checks (`if-empty`). A quorum queue refuses `if-empty`,
/// so it is checked here: nothing ready and no consumer (one could hold
/// unacknowledged messages); nothing routes to it any more by then.
async fn delete_if_empty(
    conn: &Connection,
    queue: &str,
    kind: Option<LegacyType>,
) -> anyhow::Result<()> {
    let not_empty = || {
        format!(
            "deleting {queue}: it is not empty (something was added or held while it was moved); run `imattr dlq migrate` again"
        )
    };
    let ch = conn.create_channel().await.context("opening a channel")?;
    let quorum = kind == Some(LegacyType::Quorum);
    // Both kinds: a classic queue's "if empty" counts only ready messages,
    // not those another consumer holds.
    let (messages, consumers) = super::pass::count(&ch, queue).await?;
    if messages != 0 || consumers != 0 {
        anyhow::bail!(not_empty());
    }
    ch.queue_delete(
        queue.into(),
        QueueDeleteOptions {
            if_empty: !quorum,
            ..Default::default()
        },
    )
    .await
    .with_context(not_empty)?;
    let _ = ch.close(200, "done".into()).await;
    Ok(())
}

/// Whether the plan still has the old queue to empty and delete.
fn state_has_old_queue(steps: &[Step]) -> bool {
    steps
        .iter()
        .any(|s| matches!(s, Step::DrainOld(_) | Step::DeleteOld))
}

/// A move of every message of one queue into another.
struct Move<'a> {
    from: &'a str,
    to: &'a str,
}

impl Move<'_> {
    /// Both hops: stream-safe headers, persistent, and never `expiration`
    /// (the copy would vanish) or another user's `user_id` (the broker would
    /// close the channel and hand the original back, counting a delivery).
    fn props(&self, p: &BasicProperties) -> BasicProperties {
        crate::amqp::inbox::stored_properties(p)
    }

    fn bar(&self, progress: bool, total: u64) -> indicatif::ProgressBar {
        if !progress {
            return indicatif::ProgressBar::hidden();
        }
        let b = indicatif::ProgressBar::new(total);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{msg} {bar:30} {pos}/{len} {per_sec} eta {eta}",
        ) {
            b.set_style(style);
        }
        b.set_message(format!("{} → {}", self.from, self.to));
        b
    }

    async fn confirm_channel(&self, conn: &Connection) -> anyhow::Result<Channel> {
        topology::confirm_channel(conn).await
    }

    /// Publishes the copies and waits for every confirm: an error if one was
    /// refused or returned (the originals then stay unacknowledged).
    async fn publish_confirmed(
        &self,
        ch: &Channel,
        batch: &[(Vec<u8>, BasicProperties)],
    ) -> anyhow::Result<()> {
        let publishes = batch.iter().map(|(body, props)| {
            ch.basic_publish(
                "".into(),
                self.to.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                self.props(props),
            )
        });
        let confirms = futures_util::future::try_join_all(publishes)
            .await
            .with_context(|| format!("publishing into {}", self.to))?;
        for c in confirms {
            match c
                .await
                .with_context(|| format!("publishing into {}", self.to))?
            {
                Confirmation::Ack(None) | Confirmation::NotRequested => {}
                Confirmation::Ack(Some(r)) | Confirmation::Nack(Some(r)) => anyhow::bail!(
                    "{} did not take a message ({} {})",
                    self.to,
                    r.reply_code,
                    r.reply_text
                ),
                Confirmation::Nack(None) => {
                    anyhow::bail!("the broker refused a message for {}", self.to)
                }
            }
        }
        Ok(())
    }

    /// Moves with a consumer and a window of [`CLASSIC_WINDOW`]: for a
    /// classic source, which puts back what a closed channel held in place.
    async fn consume(
        &self,
        conn: &Connection,
        cancel: &CancellationToken,
        progress: bool,
    ) -> anyhow::Result<u64> {
        let mut moved = 0u64;
        let mut idle_rounds = 0;
        loop {
            let ch = self.confirm_channel(conn).await?;
            let count = ready(&ch, self.from).await?;
            if count == 0 {
                let _ = ch.close(200, "done".into()).await;
                return Ok(moved);
            }
            let bar = self.bar(progress, u64::from(count));
            ch.basic_qos(CLASSIC_WINDOW, BasicQosOptions::default())
                .await
                .context("setting the window")?;
            let mut consumer = ch
                .basic_consume(
                    self.from.into(),
                    "imattr-migrate".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .with_context(|| format!("reading {}", self.from))?;
            let mut left = count;
            let before = moved;
            while left > 0 {
                let mut batch = Vec::new();
                let mut last_tag = 0;
                while batch.len() < usize::from(CLASSIC_WINDOW / 2).max(1) && left > 0 {
                    let wait = if batch.is_empty() {
                        IDLE
                    } else {
                        Duration::from_millis(20)
                    };
                    let next = tokio::select! {
                        _ = cancel.cancelled(), if batch.is_empty() => break,
                        n = tokio::time::timeout(wait, consumer.next()) => n,
                    };
                    let d = match next {
                        Err(_) => break,
                        Ok(None) => anyhow::bail!("the broker stopped the read of {}", self.from),
                        Ok(Some(d)) => d.with_context(|| format!("reading {}", self.from))?,
                    };
                    last_tag = d.delivery_tag;
                    batch.push((d.data, d.properties));
                    left -= 1;
                }
                if batch.is_empty() {
                    break;
                }
                self.publish_confirmed(&ch, &batch).await?;
                ch.basic_ack(last_tag, BasicAckOptions { multiple: true })
                    .await
                    .context("acknowledging moved messages")?;
                moved += batch.len() as u64;
                bar.inc(batch.len() as u64);
            }
            // What was delivered beyond `count` (the worker adds meanwhile)
            // must not be unacknowledged when the channel closes: its
            // requeue could land after the emptiness check and be deleted
            // with the queue. After cancel-ok nothing more is delivered, and
            // what came before it is already in the consumer's buffer.
            if !cancel.is_cancelled() {
                ch.basic_cancel("imattr-migrate".into(), BasicCancelOptions::default())
                    .await
                    .with_context(|| format!("stopping the read of {}", self.from))?;
                let mut extra = Vec::new();
                let mut last_tag = 0;
                while let Ok(Some(d)) =
                    tokio::time::timeout(Duration::from_millis(200), consumer.next()).await
                {
                    let d = d.with_context(|| format!("reading {}", self.from))?;
                    last_tag = d.delivery_tag;
                    extra.push((d.data, d.properties));
                }
                if !extra.is_empty() {
                    self.publish_confirmed(&ch, &extra).await?;
                    ch.basic_ack(last_tag, BasicAckOptions { multiple: true })
                        .await
                        .context("acknowledging moved messages")?;
                    moved += extra.len() as u64;
                }
            }
            bar.finish_and_clear();
            let _ = ch.close(200, "done".into()).await;
            if cancel.is_cancelled() {
                anyhow::bail!(interrupted(moved, self.from, self.to));
            }
            idle_rounds = if moved == before { idle_rounds + 1 } else { 0 };
            if idle_rounds >= 3 {
                anyhow::bail!(
                    "{} holds messages this command cannot read (another client holds them?); run `imattr dlq migrate` again once it is gone",
                    self.from
                );
            }
        }
    }

    /// Moves one message at a time with `basic.get`: for a quorum source,
    /// whose delivery limit drops a message handed back too often. Nothing
    /// is delivered that was not asked for, so at most the one message being
    /// moved goes back if the process dies.
    async fn get_one_by_one(
        &self,
        conn: &Connection,
        cancel: &CancellationToken,
        progress: bool,
    ) -> anyhow::Result<u64> {
        let ch = self.confirm_channel(conn).await?;
        let total = ready(&ch, self.from).await?;
        let bar = self.bar(progress, u64::from(total));
        let mut moved = 0u64;
        loop {
            if cancel.is_cancelled() {
                bar.finish_and_clear();
                anyhow::bail!(interrupted(moved, self.from, self.to));
            }
            let got = ch
                .basic_get(self.from.into(), BasicGetOptions::default())
                .await
                .with_context(|| format!("reading {}", self.from))?;
            let Some(m) = got else { break };
            let d = m.delivery;
            let tag = d.delivery_tag;
            self.publish_confirmed(&ch, &[(d.data, d.properties)])
                .await?;
            ch.basic_ack(tag, BasicAckOptions::default())
                .await
                .context("acknowledging a moved message")?;
            moved += 1;
            bar.inc(1);
        }
        bar.finish_and_clear();
        let _ = ch.close(200, "done".into()).await;
        Ok(moved)
    }
}

fn interrupted(moved: u64, from: &str, to: &str) -> String {
    format!(
        "interrupted after moving {moved} messages from {from} to {to}; nothing is lost: run `imattr dlq migrate` again to finish"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_and_no_holding_queue_is_nothing_to_do() {
        assert!(plan(State {
            legacy: None,
            holding: false
        })
        .is_empty());
    }

    #[test]
    fn a_legacy_queue_goes_through_every_step() {
        let steps = plan(State {
            legacy: Some(LegacyType::Quorum),
            holding: false,
        });
        assert_eq!(
            steps,
            [
                Step::Hold,
                Step::DrainOld(LegacyType::Quorum),
                Step::DeleteOld,
                Step::DeclareStream,
                Step::DrainHolding,
                Step::Switch,
                Step::DrainHolding,
                Step::DeleteHolding,
            ]
        );
        // A re-run after the holding queue was made does the same (each step is idempotent).
        assert_eq!(
            plan(State {
                legacy: Some(LegacyType::Quorum),
                holding: true
            }),
            steps
        );
    }

    #[test]
    fn an_interrupted_second_half_resumes_with_the_holding_queue() {
        let steps = plan(State {
            legacy: None,
            holding: true,
        });
        assert_eq!(steps[0], Step::DeclareStream);
        assert!(!steps.contains(&Step::Hold));
        assert_eq!(steps.last(), Some(&Step::DeleteHolding));
        // The stream is bound only after the first drain: the holding queue's
        // older dead letters come first.
        let switch = steps.iter().position(|s| *s == Step::Switch);
        let drain = steps.iter().position(|s| *s == Step::DrainHolding);
        assert!(drain < switch);
    }

    #[test]
    fn the_old_queue_type_is_read_from_the_refusal() {
        // The wordings of RabbitMQ 3.10.
        let quorum = "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'd' in vhost '/': received 'stream' but current is 'quorum'";
        assert_eq!(LegacyType::from_refusal(quorum), LegacyType::Quorum);
        let classic = "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'd' in vhost '/': received the value 'stream' of type 'longstr' but current is none";
        assert_eq!(LegacyType::from_refusal(classic), LegacyType::Classic);
        assert_eq!(LegacyType::from_refusal("garbled"), LegacyType::Quorum);
    }
}
