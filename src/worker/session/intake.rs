//! Taking deliveries in: starting to consume (standby or active), then
//! each delivery parsed, registered for acking and pushed into the coalescer.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context;
use futures_util::{FutureExt, StreamExt};
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, info};

use super::watch::Watch;
use super::{Event, Msg, Session};
use crate::amqp::consume::AckTracker;
use crate::amqp::deadletter::{DeadLetterPublisher, Failure, Reason};
use crate::amqp::readgate::ReadGate;
use crate::amqp::topology::{self, QueueBusy};
use crate::attrnames::AttrNames;
use crate::coalesce::{BatchCap, Coalescer};
use crate::config::{AmqpConfig, Config, QueueType};
use crate::fence::Fence;
use crate::health::Health;
use crate::tencent::Client;
use crate::update::{self, Rules};
use crate::worker::batch::BatchCtx;
use crate::worker::End;

/// Deliveries taken from the consumer's buffer per turn of the event loop.
const DELIVERY_BURST: usize = 256;

/// Reports this worker as a standby (one INFO line).
pub(super) fn stand_by(health: &Health, a: &AmqpConfig) {
    health.set_active(false);
    info!(queue = %a.queue, "Standing by: consuming, active from the first delivery (another worker may be the active one)");
}

/// Reports this worker as the queue's active consumer (one INFO line).
fn become_active(health: &Health, a: &crate::config::AmqpConfig, how: &'static str) {
    health.set_active(true);
    info!(queue = %a.queue, detected_by = how, "Active: this worker now consumes the queue");
}

/// The queue's consumers, counted by a passive declare; None when unknown.
async fn consumers(ch: &Channel, queue: &str) -> Option<u32> {
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    match ch
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
    {
        Ok(q) => Some(q.consumer_count()),
        Err(e) => {
            debug!(error = %e, "Cannot count the queue's consumers");
            None
        }
    }
}

impl<'a> Session<'a> {
    /// Declares the topology, opens the channels and starts consuming;
    /// starts watching the session (`watch`). `conn` is read through `gate`;
    /// dead letters go out through `dead_letters`, the process's own
    /// connection for them.
    #[allow(clippy::too_many_arguments)]
    pub(in crate::worker) async fn start(
        config: &'a Config,
        conn: &Arc<Connection>,
        gate: Arc<ReadGate>,
        dead_letters: Arc<DeadLetterPublisher>,
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
        // Counted before registering: once our consumer is registered, an
        // answer on this connection may wait behind deliveries the read
        // gate holds back until the session takes them, so nothing here may
        // wait for one. With single-active-consumer a classic queue counts
        // waiting consumers too; a quorum queue counts only the active one,
        // so there it proves nothing.
        if !a.single_active_consumer {
            // Taken before anything is counted or consumed, and held by this
            // connection until the broker closes it (docs/several-workers.md).
            topology::take_consume_lock(&consume_ch, &a.queue).await?;
        }
        let counted = if !a.single_active_consumer || a.queue_type == QueueType::Classic {
            consumers(&consume_ch, &a.queue).await
        } else {
            None
        };
        if !a.single_active_consumer {
            // Only one consumer at a time: another worker, or our previous
            // connection that the broker has not closed yet (half-open, it
            // holds older messages; consuming newer ones now would apply them
            // first). The lock decides, on every queue type; the count and
            // the exclusive flag below also keep off a consumer that is not
            // an imattr worker (a quorum queue does not enforce the flag).
            if let Some(n) = counted.filter(|&n| n > 0) {
                return Err(anyhow::Error::new(QueueBusy {
                    queue: a.queue.clone(),
                    text: format!("{n} consumer(s) registered"),
                }));
            }
        }
        let alone = a.single_active_consumer && counted == Some(0);
        let consumer_tag = format!("imattr-{}", std::process::id());
        let consumer = consume_ch
            .basic_consume(
                a.queue.as_str().into(),
                consumer_tag.as_str().into(),
                BasicConsumeOptions {
                    // Without single-active-consumer only an exclusive consumer
                    // keeps a reconnecting worker from consuming newer messages
                    // while its previous connection, half-open, still holds
                    // older ones (docs/several-workers.md).
                    exclusive: !a.single_active_consumer,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| match QueueBusy::from_error(&a.queue, &e) {
                Some(busy) => anyhow::Error::new(busy),
                None => anyhow::Error::new(e).context(format!("consuming from queue {}", a.queue)),
            })?;
        // The broker has just answered on the consume channel: the lease runs from here.
        let fence = Fence::leased(a.lease(), Instant::now());
        let watcher = tokio::spawn(
            Watch {
                conn: conn.clone(),
                channel: consume_ch.clone(),
                queue: a.queue.clone(),
                lease: a.lease(),
                fence: fence.clone(),
                gate: gate.clone(),
                health: health.clone(),
            }
            .run(),
        );
        health.session_started();
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        if !a.single_active_consumer || alone {
            become_active(
                &health,
                a,
                if alone {
                    "only consumer"
                } else {
                    "no single-active-consumer"
                },
            );
            // Another worker registering at the same moment counted none
            // either: counted again, off the loop; two mean "standby" until
            // the first delivery says otherwise, or, without
            // single-active-consumer, that this session must end.
            let (ch, queue, events) = (consume_ch.clone(), a.queue.clone(), events_tx.clone());
            tokio::spawn(async move {
                if consumers(&ch, &queue).await.is_some_and(|n| n > 1) {
                    let _ = events.send(Event::NotAlone);
                }
            });
        } else {
            stand_by(&health, a);
        }
        let ctx = Arc::new(BatchCtx {
            client,
            retry: config.retry.clone(),
            cap,
            fence,
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
            gate,
            watcher: Some(watcher),
            coalescer: Coalescer::new(),
            acks: AckTracker::new(),
            messages: HashMap::new(),
            tasks: JoinSet::new(),
            batches_in_flight: 0,
            next_slot: None,
            at_the_door: false,
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

    /// Takes `first` and what the consumer has already buffered (up to
    /// [`DELIVERY_BURST`]) in one go: the loop's bookkeeping then runs once
    /// per burst, not per message. `Err` when the consumer failed or the
    /// broker cancelled it: the session is lost.
    pub(super) fn take_burst(
        &mut self,
        first: Option<Result<lapin::message::Delivery, lapin::Error>>,
    ) -> Result<(), End> {
        let mut next = Some(first);
        let mut taken = 0;
        while let Some(d) = next.take() {
            match d {
                Some(Ok(delivery)) => self.on_delivery(delivery),
                Some(Err(e)) => return Err(End::Lost(format!("consumer error: {e}"))),
                None => return Err(End::Lost("the broker cancelled the consumer".into())),
            }
            taken += 1;
            if taken < DELIVERY_BURST {
                next = self.consumer.next().now_or_never();
                if next.is_none() {
                    // lapin holds no complete delivery: what it read so far
                    // is counted in what the session holds now.
                    self.gate.claim_all();
                }
            }
        }
        Ok(())
    }

    /// Takes what the consumer has buffered, if anything; when nothing,
    /// tells the read gate that lapin holds no delivery (so that what it
    /// read since, answers and heartbeats, stops counting).
    pub(super) fn take_buffered(&mut self) -> Result<(), End> {
        match self.consumer.next().now_or_never() {
            Some(first) => self.take_burst(first),
            None => {
                self.gate.claim_all();
                Ok(())
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
                // Taking over from a session that is gone (another worker's,
                // or our own previous one): it may still send until its lease
                // ends, and its last requests may land after ours, older
                // values over newer. Wait that out first (`amqp.takeover_hold_ms`).
                let hold = self.config.takeover_hold();
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
        let body = self.gate.hold(d.data);
        let parsed = update::parse(&body, &rules);
        let mut msg = Msg {
            body: Arc::new(body),
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
}
