//! Settling: what batch and dead-letter tasks report (outcomes, dead-letter
//! confirms, pause and resume), a finished delivery acked or dead-lettered
//! first, and the acks sent as the tracker allows.

use std::time::Duration;

use lapin::options::BasicAckOptions;
use tokio::time::Instant;
use tracing::{error, info};

use super::{Event, Session};
use crate::amqp::deadletter;
use crate::coalesce::Tag;

/// How long acks that can only go one by one may wait for a `multiple` ack
/// to cover them (see `Session::flush_acks`).
const SINGLES_DELAY: Duration = Duration::from_millis(250);

impl Session<'_> {
    /// Applies what a task reported.
    pub(super) fn on_event(&mut self, ev: Event) {
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
                    self.health.paused(code, &info);
                    metrics::gauge!("imattr_paused").set(1.0);
                }
            }
            Event::NotAlone if !self.config.amqp.single_active_consumer => {
                // Two consumers of a queue without single-active-consumer
                // would hold the same accounts' updates: give way (what
                // this session holds is redelivered, in order).
                self.ctx.fence.close(
                    "another consumer registered at the same moment (no single-active-consumer)",
                );
            }
            Event::NotAlone => {
                if self.received == 0 {
                    super::intake::stand_by(&self.health, &self.config.amqp);
                }
            }
            Event::Resumed => {
                self.paused_by = self.paused_by.saturating_sub(1);
                // A probe stopped by the fence says nothing about the API.
                if self.paused_by == 0 && !self.ctx.fence.is_closed() {
                    info!("The API accepts requests again; resuming");
                    self.health.resumed();
                    metrics::gauge!("imattr_paused").set(0.0);
                }
            }
        }
    }

    /// A message whose accounts are all settled: ack it, or dead-letter it first.
    pub(super) fn finish(&mut self, tag: Tag) {
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
        // The body is shared, not copied: its one copy lives until both the
        // delivery and its publish are done with it.
        let body = m.body.clone();
        let routing_key = m.routing_key.as_str().to_string();
        let publisher = self.dead_letters.clone();
        let health = self.health.clone();
        let events = self.ctx.events.clone();
        let stop = self.ctx.fence.token().clone();
        let pending = self.gate.dead_letter_pending();
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
            let _pending = pending;
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

    /// Sends the acks [`AckTracker::take_acks_with`] allows now. Acks
    /// behind an unsettled delivery can only go one by one, and a broker
    /// pays for each (a hot account keeps the bottom of the window busy, and
    /// single acks then cost the broker more than the deliveries). So they
    /// wait up to [`SINGLES_DELAY`], or until a quarter of the prefetch
    /// window waits, or `force` (shutdown): by then one `multiple` ack
    /// usually covers them. Waiting is safe: redelivered, they are applied
    /// again in order.
    ///
    /// [`AckTracker::take_acks_with`]: crate::amqp::consume::AckTracker::take_acks_with
    pub(super) async fn flush_acks(&mut self, force: bool) -> Result<(), lapin::Error> {
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
