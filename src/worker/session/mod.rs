//! One broker session: the event loop and the state it owns alone.
//!
//! Deliveries come in, are parsed and pushed into the coalescer; batches go
//! out when due and a send slot is free; their outcomes, dead-letter confirms
//! and pause reports come back as [`Event`]s on one channel. Nothing here
//! waits on the API: batch tasks do, so the loop keeps consuming, merging
//! and acknowledging while requests are in flight.
//!
//! This module holds the state ([`Session`], whose doc states its
//! invariants), the events, and the loop; the `impl Session` blocks of the
//! submodules are its steps:
//! - `intake`: starting to consume (standby or active) and taking
//!   deliveries in: parse, register for acking, push into the coalescer;
//! - `dispatch`: forming due batches and spawning their tasks;
//! - `settle`: applying what tasks report (outcomes, dead-letter confirms,
//!   pause and resume), acking or dead-lettering a finished delivery, and
//!   sending the acks the tracker allows.

mod dispatch;
mod intake;
mod settle;
mod watch;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::BasicCancelOptions;
use lapin::{BasicProperties, Channel};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::batch::{BatchCtx, PartOutcome};
use super::End;
use crate::amqp::consume::AckTracker;
use crate::amqp::deadletter::{DeadLetterPublisher, Failure, Reason};
use crate::amqp::readgate::{HeldBody, ReadGate};
use crate::attrnames::AttrNames;
use crate::coalesce::{Coalescer, Tag};
use crate::config::Config;
use crate::health::Health;

/// How often the loop looks whether lapin's delivery buffer is empty when
/// nothing else woke it (see `Session::take_buffered`).
const CLAIM_EVERY: Duration = Duration::from_millis(500);

/// A delivery being worked on: kept whole until it is acked or its
/// dead-letter copy is confirmed, because the copy is the original body.
struct Msg {
    /// The one copy of the body, shared with its dead-letter publish and
    /// counted against `amqp.max_held_bytes` until both are done with it.
    body: Arc<HeldBody>,
    props: BasicProperties,
    routing_key: lapin::types::ShortString,
    /// Accounts the delivery holds.
    accounts: usize,
    /// Accounts of this delivery without an outcome yet; at 0 it is finished.
    remaining: usize,
    /// The first failure among its accounts: once all are settled, the whole
    /// delivery is dead-lettered (with this failure) instead of acked.
    failure: Option<Failure>,
    /// Every account that failed (the others were applied), for
    /// `x-imattr-failed-accounts`.
    failed_accounts: Vec<String>,
}

/// What the session's tasks report back over `ctx.events`; only the event
/// loop changes the session's state, in [`Session::on_event`].
///
/// The channel is unbounded so that a task never waits on the loop; one
/// task's events arrive in the order it sent them. A task that was aborted
/// (shutdown timeout) may never send its `BatchDone` or `Resumed`: that
/// happens only when the session ends anyway.
pub(super) enum Event {
    /// A batch ran to its end: unlock `accounts` in the coalescer and settle
    /// one (delivery, account) per outcome. Parts without an outcome (the
    /// session stopped) stay unacked.
    BatchDone {
        /// Every account of the batch, with an outcome or not: all were
        /// marked in flight by `take_batch`.
        accounts: Vec<String>,
        /// One per (delivery, account) part that got a verdict; a delivery
        /// is finished when its `Msg::remaining` reaches zero.
        outcomes: Vec<PartOutcome>,
    },
    /// The broker confirmed the dead-letter copy of `tag`: the original may
    /// be acked. `reason` labels the dead-letter counter.
    DeadLettered { tag: Tag, reason: Reason },
    /// A batch got a misconfigured answer (`code`, `info` as the API said
    /// them, for the log line and /health) and is now probing. Each batch
    /// sends at most one before its matching [`Event::Resumed`].
    Paused { code: i64, info: String },
    /// The queue counted another consumer after ours registered (another
    /// worker started at the same moment): a standby, unless a delivery
    /// came; without single-active-consumer, the session ends.
    NotAlone,
    /// A batch that reported [`Event::Paused`] got an answer that ends the
    /// pause (see `Attempt::answered`), or finished (applied or stopped):
    /// one per `Paused`.
    Resumed,
}

/// The state of one broker session, owned by its event loop alone.
///
/// Invariants: every delivery received and not yet acked is in `acks`;
/// it is in `messages` until its accounts are all settled and it is acked or
/// dead-lettered; each of its accounts is in the coalescer (pending or in
/// flight) until that account's outcome comes back.
///
/// A delivery's path: [`Session::on_delivery`] registers it in `acks`, keeps
/// it in `messages` and pushes its accounts into `coalescer`;
/// [`Session::dispatch`] takes due accounts into a batch task; the task's
/// [`Event::BatchDone`] counts down `Msg::remaining`; at zero
/// [`Session::finish`] either settles it in `acks` (all applied) or spawns
/// its dead-letter publish, whose [`Event::DeadLettered`] settles it then.
/// `flush_acks` sends what `acks` allows. `messages.len() + acks.waiting()`
/// is the unsettled count /health reports, and shutdown drains until
/// `messages` and `tasks` are empty.
///
/// The fields are private to this module and its submodules (`intake`,
/// `dispatch`, `settle`), whose `impl Session` blocks are the steps above.
pub(super) struct Session<'a> {
    config: &'a Config,
    health: Arc<Health>,
    names: AttrNames,
    consume_ch: Channel,
    /// Dead-letter copies, on the process's own connection for them and a
    /// confirm channel reopened when the broker closes it.
    dead_letters: Arc<DeadLetterPublisher>,
    consumer: lapin::Consumer,
    /// For `basic.cancel` at shutdown (not sent with single-active-consumer).
    consumer_tag: String,
    /// The consume connection's byte budget: what the session holds counts.
    gate: Arc<ReadGate>,
    /// Watches the broker session (`watch`); ends when the fence closes.
    watcher: Option<tokio::task::JoinHandle<()>>,
    /// Pending updates by account; an account is in flight, and is not put
    /// in another batch, from `take_batch` until its batch's `BatchDone`.
    coalescer: Coalescer,
    /// Decides which acks may go out without passing an older unacked
    /// delivery that touches the same accounts.
    acks: AckTracker,
    /// Deliveries not yet acked nor dead-lettered, by delivery tag. An entry
    /// leaves when it is settled in `acks`: at once when all its accounts
    /// were applied, or on [`Event::DeadLettered`].
    messages: HashMap<Tag, Msg>,
    /// Batch tasks and dead-letter publishes; all end before the session does.
    tasks: JoinSet<()>,
    /// Batch tasks spawned whose `BatchDone` has not come back (dead-letter
    /// publishes are in `tasks` but not counted); at most `tencent.max_in_flight`.
    batches_in_flight: usize,
    /// When a batch is due but no rate slot is free: when the next one is.
    next_slot: Option<Instant>,
    /// A batch is due but another request waits at the client's door
    /// (`tencent::door`) for its slot: form it when that one has left.
    at_the_door: bool,
    /// When the acks left for later (behind an unsettled delivery at the
    /// bottom of the window) go out one by one at the latest; see `flush_acks`.
    singles_at: Instant,
    /// Ends when the newest dead-letter task ends; the next one waits for it.
    dead_letter_turn: Option<tokio::sync::oneshot::Receiver<()>>,
    /// The receiving end of `ctx.events`.
    events_rx: mpsc::UnboundedReceiver<Event>,
    /// Shared with every batch task: the client, the retry settings, the
    /// batch-size cap, the event sender and the session's fence, which the
    /// watcher closes when the session is lost and [`Session::run`] when it
    /// ends.
    ctx: Arc<BatchCtx>,
    /// Batches currently probing after a misconfigured answer: +1 on
    /// [`Event::Paused`], -1 on [`Event::Resumed`], and each batch sends them
    /// in pairs. While it is above zero no batch is formed and a shutdown does not
    /// wait for a flush that cannot happen; deliveries are still taken in
    /// (the prefetch count and the byte budget bound them), events, acks and
    /// the watch on the broker session go on. A
    /// counter, not a flag: several batches may probe at once, and the first
    /// one to get through must not resume while another still fails. The
    /// /health pause and the `imattr_paused` gauge change only on 0 <-> 1.
    paused_by: usize,
    /// Until when batches go out by age only, not by size: redelivered
    /// messages arrive back to back, and an account's older and newer
    /// redelivered updates must merge instead of going out one after the
    /// other (which would show the API an older value again for a moment).
    redelivery_hold: Option<Instant>,
    /// No request goes out before this instant: set when this worker takes
    /// over redelivered messages, whose previous holder (a worker that died)
    /// may have had requests in flight (see [`Session::on_delivery`]).
    hold_until: Option<Instant>,
    /// Deliveries received by this session; a redelivery while it is still
    /// 0 is a takeover and sets `hold_until`.
    received: u64,
}

impl<'a> Session<'a> {
    /// Runs until shutdown or until the broker session is lost; then stops
    /// every task of this session before returning.
    pub(super) async fn run(mut self, cancel: CancellationToken) -> anyhow::Result<End> {
        let end = self.event_loop(cancel).await;
        if !matches!(end, Ok(End::Shutdown(_))) {
            // Readiness says so at once, not after the cleanup below.
            self.health.set_connected(false);
        }
        // Acks held back by `flush_acks` go out while the channel may still
        // take them (a cancelled consumer, a panicked task); on a lost
        // connection this fails at once and they are redelivered, in order.
        let _ = tokio::time::timeout(Duration::from_secs(1), self.flush_acks(true)).await;
        // Nothing from this session may still be in flight when the next one
        // starts: close the fence (no request leaves any more) and wait for
        // requests under way to finish; past the shutdown deadline, abort
        // them (nothing acked, all redelivered).
        self.ctx.fence.close(match &end {
            Ok(End::Lost(why)) => why.clone(),
            Ok(End::Shutdown(_)) => "the session ended".to_string(),
            Err(e) => format!("{e:#}"),
        });
        if let Some(w) = self.watcher.take() {
            let _ = w.await;
        }
        let joined = async { while self.tasks.join_next().await.is_some() {} };
        match &end {
            Ok(End::Shutdown(deadline)) => {
                if tokio::time::timeout_at(*deadline, joined).await.is_err() {
                    warn!("Shutdown timeout reached while requests were still under way; aborting them");
                    self.tasks.abort_all();
                }
            }
            _ => joined.await,
        }
        metrics::gauge!("imattr_pending_accounts").set(0.0);
        metrics::gauge!("imattr_in_flight_requests").set(0.0);
        metrics::gauge!("imattr_paused").set(0.0);
        // What the session held goes with it (dropped on return).
        metrics::gauge!("imattr_held_bytes").set(0.0);
        self.health.session_ended();
        end
    }

    async fn event_loop(&mut self, cancel: CancellationToken) -> anyhow::Result<End> {
        let max_wait = self.config.batch.max_wait();
        let shutdown_timeout = self.config.shutdown.timeout();
        // The shutdown deadline, once shutdown started: one for consumer
        // cancel, drain, joining the tasks and closing the connection.
        let mut draining: Option<Instant> = None;
        // Now and then, when no delivery woke the loop: lapin's buffer is
        // empty, which the read gate needs to know (an idle standby too).
        let mut claim_tick = tokio::time::interval(CLAIM_EVERY);
        claim_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.dispatch(draining.is_some());
            if let Err(e) = self.flush_acks(draining.is_some()).await {
                return Ok(End::Lost(format!("acknowledging failed: {e}")));
            }
            metrics::gauge!("imattr_pending_accounts")
                .set(self.coalescer.pending_accounts() as f64);
            metrics::gauge!("imattr_held_bytes").set(self.gate.outstanding() as f64);
            self.health
                .set_unsettled(self.messages.len() + self.acks.waiting());
            if let Some(deadline) = draining {
                if self.messages.is_empty() && self.tasks.is_empty() {
                    return Ok(End::Shutdown(deadline));
                }
            }
            if let Some(deadline) = draining.filter(|_| self.paused_by > 0) {
                // Nothing can be flushed while the API refuses us: do not
                // wait out the timeout; the broker redelivers what is unacked.
                warn!(
                    unsettled_messages = self.messages.len(),
                    "Shutting down while paused (misconfigured); unsettled messages stay unacked for redelivery"
                );
                return Ok(End::Shutdown(deadline));
            }
            let batch_deadline = self.batch_deadline(max_wait);
            tokio::select! {
                biased;
                // In every state: a lost session ends at once (its requests
                // are fenced already), whatever it was waiting for.
                _ = self.ctx.fence.closed() => {
                    return Ok(End::Lost(self.ctx.fence.reason()));
                }
                _ = cancel.cancelled(), if draining.is_none() => {
                    info!(
                        pending_messages = self.messages.len(),
                        timeout_secs = shutdown_timeout.as_secs(),
                        "Shutting down: stopped consuming, flushing pending updates"
                    );
                    let deadline = Instant::now() + shutdown_timeout;
                    draining = Some(deadline);
                    self.health.stopped_consuming();
                    if !self.config.amqp.single_active_consumer {
                        // Off the loop, and bounded: the cancel-ok may wait
                        // behind deliveries the read gate holds back, which
                        // only this loop's flush can free.
                        let (ch, tag) = (self.consume_ch.clone(), self.consumer_tag.clone());
                        tokio::spawn(async move {
                            let cancel_consumer =
                                ch.basic_cancel(tag.as_str().into(), BasicCancelOptions::default());
                            if tokio::time::timeout_at(deadline, cancel_consumer).await.is_err() {
                                warn!("The broker did not confirm the consumer's cancellation in time");
                            }
                        });
                    }
                    // With single-active-consumer the consumer stays registered
                    // until the connection closes: cancelling it would make a
                    // standby active while our last requests are under way.
                    // What the broker still sends is left untaken, unacked,
                    // and redelivered to the next worker in order.
                }
                _ = tokio::time::sleep_until(draining.unwrap_or_else(Instant::now)), if draining.is_some() => {
                    warn!(
                        unsettled_messages = self.messages.len(),
                        "Shutdown timeout reached; unsettled messages stay unacked and will be redelivered"
                    );
                    self.ctx.fence.close("the shutdown timeout was reached");
                    self.tasks.abort_all();
                    let _ = self.flush_acks(true).await;
                    return Ok(End::Shutdown(draining.unwrap_or_else(Instant::now)));
                }
                Some(ev) = self.events_rx.recv() => self.on_event(ev),
                _ = tokio::time::sleep_until(self.singles_at), if self.acks.waiting() > 0 => {}
                Some(res) = self.tasks.join_next(), if !self.tasks.is_empty() => {
                    if let Err(e) = res {
                        if e.is_panic() {
                            error!(error = %e, "A batch task panicked; its messages stay unacked until the session restarts");
                            return Ok(End::Lost("a batch task panicked".into()));
                        }
                    }
                }
                d = self.consumer.next(), if draining.is_none() => {
                    if let Err(end) = self.take_burst(d) {
                        return Ok(end);
                    }
                }
                _ = tokio::time::sleep_until(batch_deadline.unwrap_or_else(Instant::now)), if batch_deadline.is_some() => {}
                _ = self.ctx.client.door().departed(), if self.at_the_door => {}
                _ = claim_tick.tick(), if draining.is_none() => {
                    if let Err(end) = self.take_buffered() {
                        return Ok(end);
                    }
                }
            }
        }
    }
}
