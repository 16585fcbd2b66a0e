//! `imattr run`: RabbitMQ → validated, coalesced batches → `im_set_attr`,
//! with each delivery acknowledged only after its outcome (CONTRACT §3–§8).
//!
//! One task per broker session owns all mutable state (coalescer, ack
//! tracker, message table) and only moves data; the decisions live in
//! [`crate::update`], [`crate::coalesce`], [`crate::amqp::consume`] and
//! [`crate::tencent::errors`]. Each batch runs in its own task, which retries,
//! splits and bisects it and reports one outcome per (delivery, account).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::Context;
use backoff::backoff::Backoff;
use backoff::ExponentialBackoff;
use futures_util::{FutureExt, StreamExt};
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::amqp::consume::AckTracker;
use crate::amqp::deadletter::{self, Failure, Reason};
use crate::amqp::topology;
use crate::coalesce::{Coalescer, Entry, Tag};
use crate::config::{Config, RetryConfig};
use crate::tencent::client::{api, set_attr_body};
use crate::tencent::{Class, Client, Reply};
use crate::update::{self, Rules};

/// What the admin endpoint reports.
#[derive(Debug, Default)]
pub struct Health {
    connected: AtomicBool,
    consuming: AtomicBool,
    paused: AtomicBool,
    paused_code: AtomicI64,
    unsettled: std::sync::atomic::AtomicUsize,
    sessions: std::sync::atomic::AtomicU64,
}

impl Health {
    /// Ok when connected, consuming and not paused; else why not.
    pub fn readiness(&self) -> Result<(), String> {
        if !self.connected.load(Ordering::Relaxed) {
            return Err("not connected to RabbitMQ".into());
        }
        if self.paused.load(Ordering::Relaxed) {
            return Err(format!(
                "paused: the API answers ErrorCode {} (misconfigured)",
                self.paused_code.load(Ordering::Relaxed)
            ));
        }
        if !self.consuming.load(Ordering::Relaxed) {
            return Err("not consuming".into());
        }
        Ok(())
    }

    /// Whether consuming is paused by a misconfigured answer.
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed)
    }

    /// Deliveries received and not yet acknowledged by the current session.
    pub fn unsettled(&self) -> usize {
        self.unsettled.load(Ordering::Relaxed)
    }

    /// Broker sessions started so far (1 after the first connect; each
    /// reconnect adds one).
    pub fn sessions(&self) -> u64 {
        self.sessions.load(Ordering::Relaxed)
    }

    /// Whether the worker is consuming.
    pub fn is_consuming(&self) -> bool {
        self.consuming.load(Ordering::Relaxed)
    }

    fn set_connected(&self, v: bool) {
        self.connected.store(v, Ordering::Relaxed);
        if !v {
            self.consuming.store(false, Ordering::Relaxed);
        }
    }
}

/// The app's attribute names, when known (CONTRACT §6).
#[derive(Debug, Clone, Default)]
pub struct AttrNames(Arc<RwLock<Option<Arc<HashSet<String>>>>>);

impl AttrNames {
    /// Fixed names.
    pub fn fixed(names: &[String]) -> Self {
        let n = AttrNames::default();
        n.set(Some(names.iter().cloned().collect()));
        n
    }

    /// The current set.
    pub fn get(&self) -> Option<Arc<HashSet<String>>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, names: Option<HashSet<String>>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = names.map(Arc::new);
    }

    /// Asks the API; on failure warns and keeps what it had (nothing, at start).
    pub async fn refresh(&self, client: &Client) {
        match client.get_attr_names().await {
            Ok(m) if m.is_empty() => {
                warn!("The app has no attribute names registered; not checking names locally");
                self.set(None);
            }
            Ok(m) => {
                let names: HashSet<String> = m.into_values().collect();
                debug!(count = names.len(), "Attribute names loaded");
                self.set(Some(names));
            }
            Err(e) => {
                warn!(error = %e, "Cannot read the app's attribute names; not checking names locally until it works");
            }
        }
    }
}

/// Deliveries taken from the consumer's buffer per turn of the event loop.
const DELIVERY_BURST: usize = 256;

/// How often the attribute names are read again.
const NAMES_REFRESH: Duration = Duration::from_secs(300);

/// The batch size ceiling, lowered for a while after 90018.
#[derive(Debug)]
pub struct BatchCap {
    max: usize,
    state: Mutex<(usize, Instant)>,
}

/// How long a lowered batch size holds before it doubles back.
const CAP_RECOVERY: Duration = Duration::from_secs(30);

impl BatchCap {
    /// A ceiling of `max`.
    pub fn new(max: usize) -> Self {
        BatchCap {
            max,
            state: Mutex::new((max, Instant::now())),
        }
    }

    /// The current ceiling (recovering by doubling every 30 s).
    pub fn get(&self) -> usize {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.0 < self.max && s.1.elapsed() >= CAP_RECOVERY {
            s.0 = (s.0 * 2).min(self.max);
            s.1 = Instant::now();
        }
        s.0
    }

    /// Requests of `refused` accounts were too many: use at most half.
    pub fn lower(&self, refused: usize) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.0 = (refused / 2).clamp(1, s.0);
        s.1 = Instant::now();
    }
}

/// An exponential backoff (with the crate's default jitter and factor) from
/// `initial` up to `max` between attempts, that never gives up.
fn backoff_forever(initial: Duration, max: Duration) -> ExponentialBackoff {
    ExponentialBackoff {
        initial_interval: initial,
        current_interval: initial,
        max_interval: max,
        max_elapsed_time: None,
        ..Default::default()
    }
}

/// Runs the daemon until `cancel`, reconnecting to the broker as needed.
pub async fn run(
    config: Config,
    cancel: CancellationToken,
    health: Arc<Health>,
) -> anyhow::Result<()> {
    config.validate_api()?;
    let client = Client::from_config(&config)?;
    let names = if config.attributes.allowed.is_empty() {
        let names = AttrNames::default();
        tokio::select! {
            _ = names.refresh(&client) => {}
            _ = cancel.cancelled() => return Ok(()),
        }
        let (n, c, stop) = (names.clone(), client.clone(), cancel.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(NAMES_REFRESH) => n.refresh(&c).await,
                    _ = stop.cancelled() => return,
                }
            }
        });
        names
    } else {
        AttrNames::fixed(&config.attributes.allowed)
    };
    let cap = Arc::new(BatchCap::new(config.batch.max_accounts));
    let conn_name = format!("imattr run {}", config.amqp.queue);
    let mut reconnect = backoff_forever(Duration::from_millis(500), Duration::from_secs(30));
    let mut failing_since: Option<Instant> = None;
    loop {
        if cancel.is_cancelled() {
            return Ok(());
        }
        let conn = tokio::select! {
            c = topology::connect(&config.amqp, &conn_name) => c,
            _ = cancel.cancelled() => return Ok(()),
        };
        let outcome = match conn {
            Err(e) => {
                if failing_since.is_none() {
                    warn!(error = %e, "Cannot reach RabbitMQ; retrying with backoff");
                    failing_since = Some(Instant::now());
                } else {
                    debug!(error = %e, "Still cannot reach RabbitMQ");
                }
                None
            }
            Ok(conn) => {
                if let Some(since) = failing_since.take() {
                    info!(
                        down_secs = since.elapsed().as_secs(),
                        "Connected to RabbitMQ again"
                    );
                } else {
                    info!(url = %config.amqp.url, queue = %config.amqp.queue, "Connected to RabbitMQ");
                }
                reconnect.reset();
                health.set_connected(true);
                let session = Session::start(
                    &config,
                    &conn,
                    client.clone(),
                    names.clone(),
                    cap.clone(),
                    health.clone(),
                )
                .await;
                let end = match session {
                    Ok(s) => s.run(cancel.clone()).await,
                    Err(e) => Err(e),
                };
                health.set_connected(false);
                if conn.status().connected() {
                    let _ = conn.close(200, "imattr stopping".into()).await;
                }
                Some(end)
            }
        };
        match outcome {
            Some(Ok(End::Shutdown)) => {
                info!("Stopped");
                return Ok(());
            }
            Some(Ok(End::Lost(why))) => {
                metrics::counter!("imattr_broker_reconnects_total").increment(1);
                warn!(reason = %why, "Lost the broker session; unacked messages will be redelivered; reconnecting");
            }
            Some(Err(e)) => {
                metrics::counter!("imattr_broker_reconnects_total").increment(1);
                error!(
                    error = format!("{e:#}"),
                    "Broker session failed; reconnecting"
                );
            }
            None => {}
        }
        let wait = reconnect.next_backoff().unwrap_or(Duration::from_secs(30));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = cancel.cancelled() => return Ok(()),
        }
    }
}

/// How a session ended.
enum End {
    /// Shutdown requested and done (or timed out).
    Shutdown,
    /// The channel, connection or consumer went away.
    Lost(String),
}

/// A delivery being worked on.
struct Msg {
    body: Vec<u8>,
    props: BasicProperties,
    routing_key: lapin::types::ShortString,
    /// Accounts not yet settled.
    remaining: usize,
    /// The first failure, if any: the message is dead-lettered once settled.
    failure: Option<Failure>,
}

/// One (delivery, account) result from a batch.
#[derive(Debug)]
struct PartOutcome {
    tag: Tag,
    result: Result<(), Failure>,
}

enum Event {
    BatchDone {
        accounts: Vec<String>,
        outcomes: Vec<PartOutcome>,
    },
    DeadLettered {
        tag: Tag,
        reason: Reason,
    },
    Paused {
        code: i64,
        info: String,
    },
    Resumed,
}

struct BatchCtx {
    client: Client,
    retry: RetryConfig,
    cap: Arc<BatchCap>,
    stop: CancellationToken,
    events: mpsc::UnboundedSender<Event>,
}

struct Session<'a> {
    config: &'a Config,
    health: Arc<Health>,
    names: AttrNames,
    consume_ch: Channel,
    dl_ch: Channel,
    consumer: lapin::Consumer,
    consumer_tag: String,
    coalescer: Coalescer,
    acks: AckTracker,
    messages: HashMap<Tag, Msg>,
    tasks: JoinSet<()>,
    batches_in_flight: usize,
    events_rx: mpsc::UnboundedReceiver<Event>,
    ctx: Arc<BatchCtx>,
    paused_by: usize,
}

impl<'a> Session<'a> {
    async fn start(
        config: &'a Config,
        conn: &Connection,
        client: Client,
        names: AttrNames,
        cap: Arc<BatchCap>,
        health: Arc<Health>,
    ) -> anyhow::Result<Session<'a>> {
        let a = &config.amqp;
        let consume_ch = conn.create_channel().await.context("opening a channel")?;
        topology::declare(&consume_ch, a).await?;
        consume_ch
            .basic_qos(a.prefetch, BasicQosOptions::default())
            .await
            .context("setting the prefetch count")?;
        let dl_ch = topology::confirm_channel(conn)
            .await
            .context("opening the dead-letter channel")?;
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
        health.consuming.store(true, Ordering::Relaxed);
        health.sessions.fetch_add(1, Ordering::Relaxed);
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
            dl_ch,
            consumer,
            consumer_tag,
            coalescer: Coalescer::new(),
            acks: AckTracker::new(),
            messages: HashMap::new(),
            tasks: JoinSet::new(),
            batches_in_flight: 0,
            events_rx,
            ctx,
            paused_by: 0,
        })
    }

    async fn run(mut self, cancel: CancellationToken) -> anyhow::Result<End> {
        let end = self.event_loop(cancel).await;
        // Nothing from this session may still be in flight when the next one
        // starts: stop retries and wait for requests under way to finish.
        self.ctx.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
        metrics::gauge!("imattr_pending_accounts").set(0.0);
        metrics::gauge!("imattr_in_flight_requests").set(0.0);
        metrics::gauge!("imattr_paused").set(0.0);
        self.health.paused.store(false, Ordering::Relaxed);
        self.health.unsettled.store(0, Ordering::Relaxed);
        end
    }

    async fn event_loop(&mut self, cancel: CancellationToken) -> anyhow::Result<End> {
        let max_wait = Duration::from_millis(self.config.batch.max_wait_ms);
        let shutdown_timeout = Duration::from_secs(self.config.shutdown.timeout_secs);
        let ack_backlog = usize::from(self.config.amqp.prefetch) / 2;
        let mut draining: Option<Instant> = None;
        loop {
            self.dispatch(draining.is_some());
            let flush_all = draining.is_some();
            if let Err(e) = self
                .flush_acks(if flush_all { 0 } else { ack_backlog })
                .await
            {
                return Ok(End::Lost(format!("acknowledging failed: {e}")));
            }
            metrics::gauge!("imattr_pending_accounts")
                .set(self.coalescer.pending_accounts() as f64);
            self.health
                .unsettled
                .store(self.messages.len() + self.acks.waiting(), Ordering::Relaxed);
            if draining.is_some() && self.messages.is_empty() && self.tasks.is_empty() {
                return Ok(End::Shutdown);
            }
            if draining.is_some() && self.paused_by > 0 {
                // Nothing can be flushed while the API refuses us: do not
                // wait out the timeout; the broker redelivers what is unacked.
                warn!(
                    unsettled_messages = self.messages.len(),
                    "Shutting down while paused (misconfigured); unsettled messages stay unacked for redelivery"
                );
                return Ok(End::Shutdown);
            }
            let batch_deadline = if self.paused_by == 0
                && self.batches_in_flight < self.config.tencent.max_in_flight
            {
                self.coalescer.deadline(max_wait)
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
                    draining = Some(Instant::now() + shutdown_timeout);
                    self.health.consuming.store(false, Ordering::Relaxed);
                    let _ = self
                        .consume_ch
                        .basic_cancel(self.consumer_tag.as_str().into(), BasicCancelOptions::default())
                        .await;
                }
                _ = tokio::time::sleep_until(draining.unwrap_or_else(Instant::now)), if draining.is_some() => {
                    warn!(
                        unsettled_messages = self.messages.len(),
                        "Shutdown timeout reached; unsettled messages stay unacked and will be redelivered"
                    );
                    self.ctx.stop.cancel();
                    self.tasks.abort_all();
                    let _ = self.flush_acks(0).await;
                    return Ok(End::Shutdown);
                }
                Some(ev) = self.events_rx.recv() => self.on_event(ev),
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

    fn on_delivery(&mut self, d: lapin::message::Delivery) {
        metrics::counter!("imattr_messages_received_total").increment(1);
        let tag = d.delivery_tag;
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
            remaining: 0,
            failure: None,
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
                self.messages.insert(tag, msg);
                self.finish(tag);
            }
            Ok(updates) => {
                let now = Instant::now();
                msg.remaining = updates.len();
                self.messages.insert(tag, msg);
                for u in updates {
                    self.coalescer.push(&u.account, u.attrs, tag, now);
                }
            }
        }
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::BatchDone { accounts, outcomes } => {
                self.batches_in_flight -= 1;
                metrics::gauge!("imattr_in_flight_requests").set(self.batches_in_flight as f64);
                self.coalescer.complete(accounts.iter().map(String::as_str));
                for o in outcomes {
                    let Some(m) = self.messages.get_mut(&o.tag) else {
                        continue;
                    };
                    m.remaining = m.remaining.saturating_sub(1);
                    if let Err(f) = o.result {
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
                    self.health.paused_code.store(code, Ordering::Relaxed);
                    self.health.paused.store(true, Ordering::Relaxed);
                    metrics::gauge!("imattr_paused").set(1.0);
                }
            }
            Event::Resumed => {
                self.paused_by = self.paused_by.saturating_sub(1);
                if self.paused_by == 0 {
                    info!("The API accepts requests again; resuming");
                    self.health.paused.store(false, Ordering::Relaxed);
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
        let props = deadletter::dead_letter_properties(
            &m.props,
            &failure,
            &self.config.amqp.queue,
            m.routing_key.as_str(),
            deadletter::now_ms(),
        );
        let body = m.body.clone();
        let routing_key = m.routing_key.as_str().to_string();
        let ch = self.dl_ch.clone();
        let exchange = self.config.amqp.dead_letter_exchange.clone();
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
        self.tasks.spawn(async move {
            let mut backoff = backoff_forever(Duration::from_millis(500), Duration::from_secs(60));
            loop {
                match deadletter::publish_confirmed(&ch, &exchange, &routing_key, &body, props.clone()).await {
                    Ok(()) => {
                        let _ = events.send(Event::DeadLettered {
                            tag,
                            reason: failure.reason,
                        });
                        return;
                    }
                    Err(e) => {
                        warn!(tag, error = %e, "Dead-letter publish failed; the message stays unacked; retrying");
                        let wait = backoff.next_backoff().unwrap_or(Duration::from_secs(10));
                        tokio::select! {
                            _ = tokio::time::sleep(wait) => {}
                            _ = stop.cancelled() => return,
                        }
                    }
                }
            }
        });
    }

    fn dispatch(&mut self, draining: bool) {
        let max_wait = Duration::from_millis(self.config.batch.max_wait_ms);
        let now = Instant::now();
        while self.paused_by == 0 && self.batches_in_flight < self.config.tencent.max_in_flight {
            let cap = self.ctx.cap.get();
            let due = self.coalescer.is_due(now, cap, max_wait)
                || (draining && self.coalescer.ready_accounts() > 0);
            if !due {
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
                let outcomes = execute_batch(entries, &ctx).await;
                let _ = ctx.events.send(Event::BatchDone { accounts, outcomes });
            });
        }
    }

    async fn flush_acks(&mut self, max_waiting: usize) -> Result<(), lapin::Error> {
        for op in self.acks.take_acks(max_waiting) {
            self.consume_ch
                .basic_ack(
                    op.tag,
                    BasicAckOptions {
                        multiple: op.multiple,
                    },
                )
                .await?;
        }
        Ok(())
    }
}

/// What sending one request (with its retries) came to.
enum Sent {
    Success,
    Exhausted { reply: Reply, attempts: u32 },
    Split { attempts: u32 },
    Rejected { reply: Reply, attempts: u32 },
    Stopped,
}

/// Runs one batch to the end: every part applied or failed, unless the
/// session stops first (then the parts without outcome stay unacked).
async fn execute_batch(entries: Vec<Entry>, ctx: &BatchCtx) -> Vec<PartOutcome> {
    let mut outcomes = Vec::new();
    let mut work: VecDeque<(Vec<Entry>, u32)> = VecDeque::from([(entries, 0)]);
    while let Some((entries, prior)) = work.pop_front() {
        match send(&entries, ctx).await {
            Sent::Success => {
                for e in entries {
                    outcomes.extend(e.parts.into_iter().map(|p| PartOutcome {
                        tag: p.tag,
                        result: Ok(()),
                    }));
                }
            }
            Sent::Exhausted { reply, attempts } => {
                warn!(
                    accounts = entries.len(),
                    attempts = prior + attempts,
                    error = %reply.info(),
                    "Retries exhausted; dead-lettering the batch's messages"
                );
                fail_all(
                    &mut outcomes,
                    entries,
                    Reason::RetriesExhausted,
                    &reply,
                    prior + attempts,
                );
            }
            Sent::Split { attempts } => {
                let (a, b) = split_half(entries);
                work.push_front((b, prior + attempts));
                work.push_front((a, prior + attempts));
            }
            Sent::Rejected { reply, attempts } => {
                let attempts = prior + attempts;
                if entries.len() > 1 {
                    let (a, b) = split_half(entries);
                    work.push_front((b, attempts));
                    work.push_front((a, attempts));
                } else if entries[0].parts.len() > 1 {
                    // One account merged from several messages: resend them
                    // one by one, in order, to find the bad ones.
                    let e = entries.into_iter().next().expect("one entry");
                    for p in e.parts.into_iter().rev() {
                        work.push_front((
                            vec![Entry::from_parts(e.account.clone(), vec![p])],
                            attempts,
                        ));
                    }
                } else {
                    fail_all(&mut outcomes, entries, Reason::Rejected, &reply, attempts);
                }
            }
            Sent::Stopped => break,
        }
    }
    outcomes
}

fn split_half(mut entries: Vec<Entry>) -> (Vec<Entry>, Vec<Entry>) {
    let b = entries.split_off(entries.len() / 2);
    (entries, b)
}

fn fail_all(
    out: &mut Vec<PartOutcome>,
    entries: Vec<Entry>,
    reason: Reason,
    reply: &Reply,
    attempts: u32,
) {
    for e in entries {
        for p in e.parts {
            out.push(PartOutcome {
                tag: p.tag,
                result: Err(Failure {
                    reason,
                    code: reply.code(),
                    error: reply.info(),
                    account: Some(e.account.clone()),
                    attempts,
                }),
            });
        }
    }
}

/// Sends one request until it succeeds or needs splitting, bisecting or
/// dead-lettering; handles transient, rate-limited, signature and
/// misconfigured answers itself.
async fn send(entries: &[Entry], ctx: &BatchCtx) -> Sent {
    let merged: Vec<(&str, Vec<(&str, &str)>)> = entries
        .iter()
        .map(|e| (e.account.as_str(), e.merged()))
        .collect();
    let body = set_attr_body(&merged);
    let messages: usize = entries.iter().map(|e| e.parts.len()).sum();
    let mut retry = ctx.retry.backoff();
    let mut rate_backoff = backoff_forever(Duration::from_millis(200), Duration::from_secs(10));
    let mut probe = backoff_forever(Duration::from_secs(1), Duration::from_secs(60));
    let mut renewed = false;
    let mut paused = false;
    let mut attempts = 0u32;
    let result = loop {
        if ctx.stop.is_cancelled() {
            break Sent::Stopped;
        }
        attempts += 1;
        let r = ctx.client.call(api::SET_ATTR, body.clone()).await;
        let code = r.reply.code();
        metrics::counter!("imattr_api_requests_total", "class" => r.class.as_str(), "code" => code.to_string()).increment(1);
        metrics::histogram!("imattr_api_request_duration_seconds").record(r.latency.as_secs_f64());
        metrics::histogram!("imattr_request_accounts").record(entries.len() as f64);
        debug!(
            accounts = entries.len(),
            messages,
            attempt = attempts,
            class = %r.class,
            code,
            latency_ms = r.latency.as_millis() as u64,
            "Batch request"
        );
        let wait = match r.class {
            Class::Success => break Sent::Success,
            Class::Transient | Class::Unknown if paused => probe.next_backoff(),
            Class::Transient | Class::Unknown => match retry.next_backoff() {
                Some(d) => {
                    metrics::counter!("imattr_retries_total").increment(1);
                    Some(d)
                }
                None => {
                    break Sent::Exhausted {
                        reply: r.reply,
                        attempts,
                    }
                }
            },
            Class::RateLimited => rate_backoff.next_backoff(),
            Class::Signature if !renewed && ctx.client.signer().invalidate() => {
                renewed = true;
                metrics::counter!("imattr_usersig_renewals_total").increment(1);
                info!(code, "UserSig refused; renewing it and retrying at once");
                continue;
            }
            Class::TooManyAccounts if entries.len() > 1 => {
                ctx.cap.lower(entries.len());
                warn!(accounts = entries.len(), "Too many accounts for the API (90018); splitting and lowering the batch size for a while");
                break Sent::Split { attempts };
            }
            Class::TooManyAccounts | Class::Rejected => {
                break Sent::Rejected {
                    reply: r.reply,
                    attempts,
                }
            }
            Class::Signature | Class::Misconfigured => {
                if !paused {
                    paused = true;
                    let _ = ctx.events.send(Event::Paused {
                        code,
                        info: r.reply.info(),
                    });
                }
                probe.next_backoff()
            }
        };
        let wait = wait.unwrap_or(Duration::from_secs(60));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = ctx.stop.cancelled() => break Sent::Stopped,
        }
    };
    if paused {
        let _ = ctx.events.send(Event::Resumed);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn batch_cap_lowers_then_recovers() {
        let c = BatchCap::new(100);
        assert_eq!(c.get(), 100);
        c.lower(100);
        assert_eq!(c.get(), 50);
        c.lower(50);
        assert_eq!(c.get(), 25);
        c.lower(1);
        assert_eq!(c.get(), 1);
        tokio::time::advance(CAP_RECOVERY).await;
        assert_eq!(c.get(), 2);
        for _ in 0..10 {
            tokio::time::advance(CAP_RECOVERY).await;
            c.get();
        }
        assert_eq!(c.get(), 100);
    }

    #[test]
    fn readiness_reasons() {
        let h = Health::default();
        assert!(h.readiness().unwrap_err().contains("not connected"));
        h.set_connected(true);
        assert!(h.readiness().unwrap_err().contains("not consuming"));
        h.consuming.store(true, Ordering::Relaxed);
        assert!(h.readiness().is_ok());
        h.paused.store(true, Ordering::Relaxed);
        h.paused_code.store(90009, Ordering::Relaxed);
        assert!(h.readiness().unwrap_err().contains("90009"));
    }
}
