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
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::{Msg, Session};
use crate::amqp::consume::AckTracker;
use crate::amqp::deadletter::{DeadLetterPublisher, Failure, Reason};
use crate::amqp::topology;
use crate::attrnames::AttrNames;
use crate::coalesce::{BatchCap, Coalescer};
use crate::config::{Config, QueueType};
use crate::health::Health;
use crate::tencent::Client;
use crate::update::{self, Rules};
use crate::worker::batch::BatchCtx;
use crate::worker::End;

/// Deliveries taken from the consumer's buffer per turn of the event loop.
const DELIVERY_BURST: usize = 256;

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

impl<'a> Session<'a> {
    /// Declares the topology, opens the channels and starts consuming.
    pub(in crate::worker) async fn start(
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
            }
        }
        Ok(())
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
}
