//! Forming batches: due accounts taken from the coalescer into a batch task
//! when its request can go out at once.

use std::time::Duration;

use tokio::time::Instant;

use super::{Event, Session};
use crate::worker::batch::execute_batch;

impl Session<'_> {
    /// Starts every batch that is due while the API is not refusing us and
    /// its request can go out at once: an in-flight slot and a rate slot are
    /// free and no other request waits at the client's door (`draining`:
    /// everything ready is due). The slot itself is taken by the request
    /// when it leaves (`tencent::door`); the batch takes its place in the
    /// door's queue here, so that the next one is formed only once it left.
    pub(super) fn dispatch(&mut self, draining: bool) {
        // A slot found by an earlier call is stale now; an early return must
        // not leave it behind, or the event loop would wake at it again and again.
        self.next_slot = None;
        self.at_the_door = false;
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
            let door = self.ctx.client.door();
            if door.queued() > 0 {
                self.at_the_door = true;
                break;
            }
            let next = door.next_slot(now);
            if next > now {
                self.next_slot = Some(next);
                break;
            }
            let entries = self.coalescer.take_batch(cap);
            if entries.is_empty() {
                break;
            }
            let ticket = door.ticket();
            self.batches_in_flight += 1;
            metrics::gauge!("imattr_in_flight_requests").set(self.batches_in_flight as f64);
            let ctx = self.ctx.clone();
            self.tasks.spawn(async move {
                let accounts: Vec<String> = entries.iter().map(|e| e.account.clone()).collect();
                let outcomes = execute_batch(entries, &ctx, Some(ticket)).await;
                let _ = ctx.events.send(Event::BatchDone { accounts, outcomes });
            });
        }
    }

    /// When the event loop must wake for the next batch: a due batch waiting
    /// for a rate slot wakes at the slot, not at its (past) deadline; none
    /// while paused or at the in-flight limit (an event wakes the loop then).
    pub(super) fn batch_deadline(&self, max_wait: Duration) -> Option<Instant> {
        if self.paused_by == 0 && self.batches_in_flight < self.config.tencent.max_in_flight {
            let hold = self.hold_until;
            self.next_slot.or_else(|| {
                self.coalescer
                    .deadline(max_wait)
                    .map(|d| hold.map_or(d, |h| d.max(h)))
            })
        } else {
            None
        }
    }
}
