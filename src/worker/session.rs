//! One broker session: the event loop and the state it owns alone.
//!
//! Deliveries come in, are parsed and pushed into the coalescer; batches go
//! out when due and a send slot is free; their outcomes, dead-letter confirms
//! and pause reports come back as [`Event`]s on one channel. Nothing here
//! waits on the API: batch tasks do, so the loop keeps consuming, merging
//! and acknowledging while requests are in flight.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures_util::{FutureExt, StreamExt};
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::batch::{execute_batch, BatchCtx, PartOutcome};
use super::End;
use crate::amqp::consume::AckTracker;
use crate::amqp::deadletter::{self, DeadLetterPublisher, Failure, Reason};
use crate::amqp::topology;
use crate::attrnames::AttrNames;
use crate::coalesce::{BatchCap, Coalescer, Tag};
use crate::config::{Config, QueueType};
use crate::health::Health;
use crate::tencent::Client;
use crate::update::{self, Rules};

/// Deliveries taken from the consumer's buffer per turn of the event loop.
const DELIVERY_BURST: usize = 256;

/// How long acks that can only go one by one may wait for a `multiple` ack
/// to cover them (see `Session::flush_acks`).
const SINGLES_DELAY: Duration = Duration::from_millis(250);

/// A delivery being worked on: kept whole until it is acked or its
/// dead-letter copy is confirmed, because the copy is the original body.
struct Msg {
    body: Vec<u8>,
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

/// Reports this worker as the queue's active consumer (one INFO line).
fn become_active(health: &Health, a: &crate::config::AmqpConfig, how: &'static str) {
    health.set_active(true);
    info!(queue = %a.queue, detected_by = how, "Active: this worker now consumes the queue");
}

/// Whether our consumer is the queue's only one (a passive declare counts
/// them); any doubt answers false, and the first delivery settles it.
async fn only_consumer(ch: &Channel, queue: &str) -> bool {
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    match ch
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
    {
        Ok(q) => q.consumer_count() == 1,
        Err(e) => {
            debug!(error = %e, "Cannot count the queue's consumers");
            false
        }
    }
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
pub(super) struct Session<'a> {
    config: &'a Config,
    health: Arc<Health>,
    names: AttrNames,
    consume_ch: Channel,
    /// Dead-letter copies, on a confirm channel reopened when the broker closes it.
    dead_letters: Arc<DeadLetterPublisher>,
    consumer: lapin::Consumer,
    /// For `basic.cancel` at shutdown (not sent with single-active-consumer).
    consumer_tag: String,
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
    /// When the acks left for later (behind an unsettled delivery at the
    /// bottom of the window) go out one by one at the latest; see `flush_acks`.
    singles_at: Instant,
    /// Ends when the newest dead-letter task ends; the next one waits for it.
    dead_letter_turn: Option<tokio::sync::oneshot::Receiver<()>>,
    /// The receiving end of `ctx.events`.
    events_rx: mpsc::UnboundedReceiver<Event>,
    /// Shared with every batch task: the client, the retry settings, the
    /// batch-size cap, the event sender and `stop`, which [`Session::run`]
    /// fires when the session ends.
    ctx: Arc<BatchCtx>,
    /// Batches currently probing after a misconfigured answer: +1 on
    /// [`Event::Paused`], -1 on [`Event::Resumed`], and each batch sends them
    /// in pairs. While it is above zero no batch is formed, nothing is taken
    /// from the consumer (the broker stops at the prefetch count) and a shutdown does not
    /// wait for a flush that cannot happen; events and acks still go on. A
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
    /// Declares the topology, opens the channels and starts consuming.
    pub(super) async fn start(
        config: &'a Config,
        conn: &Arc<Connection>,
        client: Client,
        names: AttrNames,
        cap: Arc<BatchCap>,
        health: Arc<Health>,
    ) -> anyhow::Result<Session<'a>> {
        let a = &config.amqp;
        let consume_ch = conn.create_channel().await.context("opening a channel")?;
        topology::declare(conn, &consume_ch, a).await?;
        consume_ch
            .basic_qos(a.prefetch, BasicQosOptions::default())
            .await
            .context("setting the prefetch count")?;
        let dead_letters = Arc::new(DeadLetterPublisher::new(
            conn.clone(),
            &a.dead_letter_exchange,
        ));
        let consumer_tag = format!("imattr-{}", std::process::id());
        let consumer = consume_ch
            .basic_consume(
                a.queue.as_str().into(),
                consumer_tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("consuming from queue {}", a.queue))?;
        health.session_started();
        if !a.single_active_consumer {
            // Every consumer of such a queue gets deliveries.
            become_active(&health, a, "no single-active-consumer");
        } else if a.queue_type == QueueType::Classic && only_consumer(&consume_ch, &a.queue).await {
            // A classic queue counts waiting consumers too; a quorum queue
            // counts only the active one, so the count proves nothing there.
            become_active(&health, a, "only consumer");
        } else {
            health.set_active(false);
            info!(queue = %a.queue, "Standing by: consuming, active from the first delivery (another worker may be the active one)");
        }
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let ctx = Arc::new(BatchCtx {
            client,
            retry: config.retry.clone(),
            cap,
            stop: CancellationToken::new(),
            events: events_tx,
        });
        Ok(Session {
            config,
            health,
            names,
            consume_ch,
            dead_letters,
            consumer,
            consumer_tag,
            coalescer: Coalescer::new(),
            acks: AckTracker::new(),
            messages: HashMap::new(),
            tasks: JoinSet::new(),
            batches_in_flight: 0,
            next_slot: None,
            singles_at: Instant::now(),
            dead_letter_turn: None,
            events_rx,
            ctx,
            paused_by: 0,
            redelivery_hold: None,
            hold_until: None,
            received: 0,
        })
    }

    /// Runs until shutdown or until the broker session is lost; then stops
    /// every task of this session before returning.
    pub(super) async fn run(mut self, cancel: CancellationToken) -> anyhow::Result<End> {
        let end = self.event_loop(cancel).await;
        // Acks held back by `flush_acks` go out while the channel may still
        // take them (a cancelled consumer, a panicked task); on a lost
        // connection this fails at once and they are redelivered, in order.
        let _ = tokio::time::timeout(Duration::from_secs(1), self.flush_acks(true)).await;
        // Nothing from this session may still be in flight when the next one
        // starts: stop retries and wait for requests under way to finish;
        // past the shutdown deadline, abort them (nothing acked, all redelivered).
        self.ctx.stop.cancel();
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
        self.health.session_ended();
        end
    }

    async fn event_loop(&mut self, cancel: CancellationToken) -> anyhow::Result<End> {
        let max_wait = self.config.batch.max_wait();
        let shutdown_timeout = self.config.shutdown.timeout();
        // The shutdown deadline, once shutdown started: one for consumer
        // cancel, drain, joining the tasks and closing the connection.
        let mut draining: Option<Instant> = None;
        loop {
            self.dispatch(draining.is_some());
            if let Err(e) = self.flush_acks(draining.is_some()).await {
                return Ok(End::Lost(format!("acknowledging failed: {e}")));
            }
            metrics::gauge!("imattr_pending_accounts")
                .set(self.coalescer.pending_accounts() as f64);
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
            // A due batch waiting for a rate slot wakes at the slot, not at
            // its (past) deadline.
            let batch_deadline = if self.paused_by == 0
                && self.batches_in_flight < self.config.tencent.max_in_flight
            {
                let hold = self.hold_until;
                self.next_slot.or_else(|| {
                    self.coalescer
                        .deadline(max_wait)
                        .map(|d| hold.map_or(d, |h| d.max(h)))
                })
            } else {
                None
            };
            tokio::select! {
                biased;
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
                        // Bounded: a broker that does not answer must not hold up the flush.
                        let cancel_consumer = self
                            .consume_ch
                            .basic_cancel(self.consumer_tag.as_str().into(), BasicCancelOptions::default());
                        if tokio::time::timeout_at(deadline, cancel_consumer).await.is_err() {
                            warn!("The broker did not confirm the consumer's cancellation in time");
                        }
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
                    self.ctx.stop.cancel();
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
                d = self.consumer.next(), if draining.is_none() && self.paused_by == 0 => {
                    // Take what is already buffered in one go: the loop's
                    // bookkeeping then runs once per burst, not per message.
                    let mut next = Some(d);
                    let mut taken = 0;
                    while let Some(d) = next.take() {
                        match d {
                            Some(Ok(delivery)) => self.on_delivery(delivery),
                            Some(Err(e)) => return Ok(End::Lost(format!("consumer error: {e}"))),
                            None => return Ok(End::Lost("the broker cancelled the consumer".into())),
                        }
                        taken += 1;
                        if taken < DELIVERY_BURST {
                            next = self.consumer.next().now_or_never();
                        }
                    }
                }
                _ = tokio::time::sleep_until(batch_deadline.unwrap_or_else(Instant::now)), if batch_deadline.is_some() => {}
            }
        }
    }
    /// Parses a delivery: an invalid one is dead-lettered at once, a valid
    /// one's updates join the coalescer.
    fn on_delivery(&mut self, d: lapin::message::Delivery) {
        metrics::counter!("imattr_messages_received_total").increment(1);
        if !self.health.is_active() {
            // With single-active-consumer the broker delivers only to the
            // active consumer: the first delivery is how a standby learns it
            // took over (the protocol has no notification).
            become_active(&self.health, &self.config.amqp, "first delivery");
        }
        if d.redelivered {
            // Another session (maybe another worker's) had it and did not ack it.
            metrics::counter!("imattr_messages_redelivered_total").increment(1);
            if self.received == 0 {
                // Taking over from a worker that died: its last requests may
                // still be under way at the API and land after ours, older
                // values over newer. Wait out its client timeout first.
                let hold = self.config.tencent.timeout();
                info!(hold_ms = hold.as_millis() as u64, "Taking over redelivered messages; holding requests until the previous worker's are over");
                self.hold_until = Some(Instant::now() + hold);
            }
        }
        self.received += 1;
        let tag = d.delivery_tag;
        let redelivered = d.redelivered;
        let names = self.names.get();
        let rules = Rules {
            max_value_bytes: self.config.attributes.max_value_bytes,
            allowed: names.as_deref(),
        };
        let parsed = update::parse(&d.data, &rules);
        let mut msg = Msg {
            body: d.data,
            props: d.properties,
            routing_key: d.routing_key,
            accounts: 0,
            remaining: 0,
            failure: None,
            failed_accounts: Vec::new(),
        };
        match parsed {
            Err(invalid) => {
                debug!(tag, rule = %invalid, "Invalid message; dead-lettering it");
                msg.failure = Some(Failure {
                    reason: Reason::InvalidMessage,
                    code: 0,
                    error: invalid.0,
                    account: update::guess_account(&msg.body),
                    attempts: 0,
                });
                self.acks.register(tag, []);
                self.messages.insert(tag, msg);
                self.finish(tag);
            }
            Ok(updates) => {
                let now = Instant::now();
                msg.accounts = updates.len();
                msg.remaining = updates.len();
                self.acks
                    .register(tag, updates.iter().map(|u| u.account.as_str()));
                self.messages.insert(tag, msg);
                // Counted at once, not only at the loop's top: a burst of
                // deliveries must not read as "nothing unsettled" meanwhile.
                self.health
                    .set_unsettled(self.messages.len() + self.acks.waiting());
                if redelivered {
                    let max_wait = self.config.batch.max_wait();
                    self.redelivery_hold = Some(now + max_wait);
                }
                for u in updates {
                    self.coalescer.push(&u.account, u.attrs, tag, now);
                }
            }
        }
    }

    /// Applies what a task reported.
    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::BatchDone { accounts, outcomes } => {
                self.batches_in_flight -= 1;
                metrics::gauge!("imattr_in_flight_requests").set(self.batches_in_flight as f64);
                self.coalescer.complete(accounts.iter().map(String::as_str));
                if outcomes.iter().any(|o| o.result.is_ok()) {
                    self.health.api_answered();
                }
                for o in outcomes {
                    let Some(m) = self.messages.get_mut(&o.tag) else {
                        continue;
                    };
                    m.remaining = m.remaining.saturating_sub(1);
                    if let Err(f) = o.result {
                        if let Some(a) = &f.account {
                            if !m.failed_accounts.contains(a) {
                                m.failed_accounts.push(a.clone());
                            }
                        }
                        m.failure.get_or_insert(f);
                    }
                    if m.remaining == 0 {
                        self.finish(o.tag);
                    }
                }
            }
            Event::DeadLettered { tag, reason } => {
                metrics::counter!("imattr_messages_dead_lettered_total", "reason" => reason.as_str()).increment(1);
                self.messages.remove(&tag);
                self.acks.settle(tag);
            }
            Event::Paused { code, info } => {
                self.paused_by += 1;
                if self.paused_by == 1 {
                    error!(
                        code,
                        info = %info,
                        "The API says imattr is misconfigured; consuming paused, nothing dead-lettered; probing until it is fixed"
                    );
                    self.health.paused(code);
                    metrics::gauge!("imattr_paused").set(1.0);
                }
            }
            Event::Resumed => {
                self.paused_by = self.paused_by.saturating_sub(1);
                if self.paused_by == 0 {
                    info!("The API accepts requests again; resuming");
                    self.health.resumed();
                    metrics::gauge!("imattr_paused").set(0.0);
                }
            }
        }
    }

    /// A message whose accounts are all settled: ack it, or dead-letter it first.
    fn finish(&mut self, tag: Tag) {
        let Some(m) = self.messages.get(&tag) else {
            return;
        };
        let Some(failure) = m.failure.clone() else {
            self.messages.remove(&tag);
            self.acks.settle(tag);
            metrics::counter!("imattr_messages_acked_total").increment(1);
            return;
        };
        // The list is for messages holding several accounts (the others were applied).
        let failed_accounts: &[String] = if m.accounts > 1 {
            &m.failed_accounts
        } else {
            &[]
        };
        let props = deadletter::dead_letter_properties(
            &m.props,
            &failure,
            failed_accounts,
            &self.config.amqp.queue,
            m.routing_key.as_str(),
            deadletter::now_ms(),
        );
        let body = m.body.clone();
        let routing_key = m.routing_key.as_str().to_string();
        let publisher = self.dead_letters.clone();
        let health = self.health.clone();
        let events = self.ctx.events.clone();
        let stop = self.ctx.stop.clone();
        info!(
            tag,
            reason = failure.reason.as_str(),
            code = failure.code,
            account = failure.account.as_deref().unwrap_or(""),
            error = %failure.error,
            "Dead-lettering a message"
        );
        // One dead letter at a time, in the order they were settled: two
        // tasks racing for the channel could swap them, and a replay would
        // then apply an account's older message after its newer one.
        let (done, turn) = tokio::sync::oneshot::channel::<()>();
        let previous = self.dead_letter_turn.replace(turn);
        self.tasks.spawn(async move {
            if let Some(previous) = previous {
                // Resolves when the previous task ends, whatever its outcome.
                let _ = previous.await;
            }
            let _done = done;
            let confirmed = deadletter::publish_until_confirmed(
                &publisher,
                &routing_key,
                &body,
                props,
                |failing| health.dead_letters_failing(failing),
                &stop,
            )
            .await;
            if confirmed {
                let _ = events.send(Event::DeadLettered {
                    tag,
                    reason: failure.reason,
                });
            }
        });
    }

    /// Starts every batch that is due while the API is not refusing us and
    /// its request can go out at once: an in-flight slot and a rate slot are
    /// free (`draining`: everything ready is due).
    fn dispatch(&mut self, draining: bool) {
        // A slot found by an earlier call is stale now; an early return must
        // not leave it behind, or the event loop would wake at it again and again.
        self.next_slot = None;
        if let Some(until) = self.hold_until {
            if Instant::now() < until {
                return;
            }
        }
        let max_wait = self.config.batch.max_wait();
        let now = Instant::now();
        let holding = self.redelivery_hold.is_some_and(|until| now < until);
        while self.paused_by == 0 && self.batches_in_flight < self.config.tencent.max_in_flight {
            let cap = self.ctx.cap.get();
            let due = if holding {
                self.coalescer.deadline(max_wait).is_some_and(|d| d <= now)
            } else {
                self.coalescer.is_due(now, cap, max_wait)
            } || (draining && self.coalescer.ready_accounts() > 0);
            if !due {
                break;
            }
            // Form the batch only when its request can go out now: until
            // then its accounts keep merging updates (a backlog goes out in
            // fewer, fuller requests).
            if let Err(next) = self.ctx.client.limiter().try_acquire() {
                self.next_slot = Some(next);
                break;
            }
            let entries = self.coalescer.take_batch(cap);
            if entries.is_empty() {
                break;
            }
            self.batches_in_flight += 1;
            metrics::gauge!("imattr_in_flight_requests").set(self.batches_in_flight as f64);
            let ctx = self.ctx.clone();
            self.tasks.spawn(async move {
                let accounts: Vec<String> = entries.iter().map(|e| e.account.clone()).collect();
                let outcomes = execute_batch(entries, &ctx, true).await;
                let _ = ctx.events.send(Event::BatchDone { accounts, outcomes });
            });
        }
    }

    /// Sends the acks [`AckTracker::take_acks_with`] allows now. Acks
    /// behind an unsettled delivery can only go one by one, and a broker
    /// pays for each (a hot account keeps the bottom of the window busy, and
    /// single acks then cost the broker more than the deliveries). So they
    /// wait up to [`SINGLES_DELAY`], or until a quarter of the prefetch
    /// window waits, or `force` (shutdown): by then one `multiple` ack
    /// usually covers them. Waiting is safe: redelivered, they are applied
    /// again in order.
    async fn flush_acks(&mut self, force: bool) -> Result<(), lapin::Error> {
        let now = Instant::now();
        let pressure = (usize::from(self.config.amqp.prefetch) / 4).max(1);
        let singles = force || now >= self.singles_at || self.acks.waiting() >= pressure;
        if singles {
            self.singles_at = now + SINGLES_DELAY;
        }
        let before = self.acks.unacked();
        let ops = self.acks.take_acks_with(singles);
        let acked = before.saturating_sub(self.acks.unacked()) as u64;
        // All at once: each ack's future resolves when lapin's I/O thread has
        // written it, so awaiting them one by one costs a thread hand-off per
        // ack. Polled in order, they go out in order.
        let ch = &self.consume_ch;
        futures_util::future::try_join_all(ops.into_iter().map(|op| {
            ch.basic_ack(
                op.tag,
                BasicAckOptions {
                    multiple: op.multiple,
                },
            )
        }))
        .await?;
        self.health.add_acked(acked);
        Ok(())
    }
}
