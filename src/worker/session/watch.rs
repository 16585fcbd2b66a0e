//! Watching a broker session in every state (consuming, paused, draining,
//! retrying): the broker's close notifications, the connection's and the
//! consume channel's status, and the lease's round trips (`crate::fence`).
//! When the session is lost the fence closes at once, so that no request of
//! it leaves any more, and readiness says so; the event loop then ends the
//! session and the worker reconnects.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use tokio::time::Instant;
use tracing::debug;

use crate::amqp::readgate::ReadGate;
use crate::fence::Fence;
use crate::health::Health;

/// How often the lease is renewed (at most; a quarter of the lease when shorter).
const ROUND_TRIP_EVERY: Duration = Duration::from_secs(1);
/// How often the connection's and channel's status and the read gate are looked at.
const LOOK_EVERY: Duration = Duration::from_millis(250);

/// What the watcher needs of its session.
pub(super) struct Watch {
    pub(super) conn: Arc<Connection>,
    pub(super) channel: Channel,
    pub(super) queue: String,
    pub(super) lease: Duration,
    pub(super) fence: Fence,
    pub(super) gate: Arc<ReadGate>,
    pub(super) health: Arc<Health>,
}

/// What ends a session, from what the watcher sees; None: it goes on.
///
/// - `broker_closed`: the connection or the consume channel is no longer
///   open (the broker closed it, or lapin gave up on it);
/// - `unanswered`: how long the pending round trip has waited while the
///   socket could be read and nothing came: time while reads were held back
///   by the byte budget does not count (no answer could arrive then; see
///   [`lease_yield`] for why that cannot last), nor time while data was
///   arriving (the broker is there, and the answer waits behind what it
///   sent before). A half-open connection is silent.
pub(super) fn lost(
    broker_closed: Option<&str>,
    unanswered: Duration,
    lease: Duration,
) -> Option<String> {
    if let Some(why) = broker_closed {
        return Some(why.to_string());
    }
    (unanswered >= lease).then(|| {
        format!(
            "the broker has not answered on the consume channel for {} ms (amqp.lease_ms)",
            unanswered.as_millis()
        )
    })
}

/// Whether the read gate should read on past the byte budget so that the
/// pending round trip's answer can arrive (`ReadGate::set_lease_yield`).
///
/// - `waited`: how long the pending round trip has waited;
/// - `unread_for`: how long since the socket was last read;
/// - `dead_letters`: dead-letter copies being published;
/// - `bound`: the lease, or the negotiated heartbeat interval when shorter;
/// - `heartbeat`: the negotiated heartbeat interval (None: no heartbeats).
///
/// Once the round trip has waited half of `bound`: at once when no
/// dead-letter copy is pending (only requests, which need the lease, can
/// free the budget). Otherwise the dead letters will free it, and reading on
/// would only take in more than the budget, so the gate waits for them, but
/// not past one heartbeat interval of unread socket (their connection may
/// be blocked by a resource alarm, or their queue refuse them): lapin closes
/// a connection it has read nothing from for two.
pub(super) fn lease_yield(
    waited: Duration,
    unread_for: Duration,
    dead_letters: usize,
    bound: Duration,
    heartbeat: Option<Duration>,
) -> bool {
    waited >= bound / 2 && (dead_letters == 0 || heartbeat.is_some_and(|h| unread_for >= h))
}

impl Watch {
    fn broker_closed(&self) -> Option<&'static str> {
        if !self.conn.status().connected() {
            Some("the connection is closed")
        } else if !self.channel.status().connected() {
            Some("the consume channel is closed")
        } else {
            None
        }
    }

    fn lose(&self, why: String) {
        if self.fence.is_closed() {
            return;
        }
        debug!(reason = %why, "The broker session is lost; no request of it leaves any more");
        self.fence.close(why);
        self.health.set_connected(false);
    }

    /// A round trip on the consume channel: a passive declaration of the
    /// queue (cheap, and it fails if the queue or the channel is gone).
    fn round_trip(&self) -> BoxFuture<'static, Result<(), lapin::Error>> {
        let ch = self.channel.clone();
        let queue = self.queue.clone();
        async move {
            ch.queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map(drop)
        }
        .boxed()
    }

    /// Runs until the fence closes (the session is lost or ended).
    pub(super) async fn run(self) {
        let mut events = self.conn.events_listener();
        let every = ROUND_TRIP_EVERY.min(self.lease / 4);
        let mut look = tokio::time::interval(LOOK_EVERY);
        look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next_trip = Instant::now();
        // The round trip in flight: when it was sent, and its answer.
        let mut pending: Option<(Instant, BoxFuture<'static, Result<(), lapin::Error>>)> = None;
        // Time the pending round trip has waited while reads were allowed.
        let mut unanswered = Duration::ZERO;
        let mut last_look = Instant::now();
        let mut read_at_last_look = self.gate.read_total();
        let heartbeat = Duration::from_secs(u64::from(self.conn.configuration().heartbeat()));
        let heartbeat = (!heartbeat.is_zero()).then_some(heartbeat);
        let bound = heartbeat.map_or(self.lease, |h| self.lease.min(h));
        loop {
            if let Some(why) = lost(self.broker_closed(), unanswered, self.lease) {
                self.lose(why);
            }
            if self.fence.is_closed() {
                self.gate.set_lease_yield(false);
                return;
            }
            if pending.is_none() && Instant::now() >= next_trip {
                pending = Some((Instant::now(), self.round_trip()));
                unanswered = Duration::ZERO;
            }
            let waiting = pending.is_none();
            let trip = async {
                match pending.as_mut() {
                    Some((_, answer)) => answer.await,
                    None => std::future::pending().await,
                }
            };
            let seen = tokio::select! {
                _ = self.fence.closed() => Seen::Nothing,
                answer = trip => Seen::Answer(answer),
                event = events.next() => Seen::Event(event),
                _ = tokio::time::sleep_until(next_trip), if waiting => Seen::Nothing,
                _ = look.tick() => Seen::Tick,
            };
            match seen {
                Seen::Nothing => {}
                Seen::Answer(answer) => {
                    let Some((sent_at, _)) = pending.take() else {
                        continue;
                    };
                    match answer {
                        Ok(()) => {
                            self.fence.renew(sent_at);
                            self.gate.set_lease_yield(false);
                            next_trip = sent_at + every;
                        }
                        Err(e) => {
                            // Never again at once: a failed round trip ends
                            // the session, and the loop must not spin meanwhile.
                            next_trip = Instant::now() + every;
                            self.lose(format!("the consume channel failed a round trip: {e}"));
                        }
                    }
                }
                // Any channel's error comes here; only the consume channel's
                // or the connection's ends the session.
                Seen::Event(Some(lapin::Event::Error(e))) => match self.broker_closed() {
                    Some(why) => self.lose(format!("{why}: {e}")),
                    None => debug!(error = %e, "A broker error on another channel"),
                },
                Seen::Event(Some(_)) => {}
                Seen::Event(None) => self.lose("the connection's events ended".into()),
                Seen::Tick => {
                    let now = Instant::now();
                    let since = now - last_look;
                    last_look = now;
                    let read = self.gate.read_total();
                    let silent = read == read_at_last_look;
                    read_at_last_look = read;
                    if let Some((sent_at, _)) = &pending {
                        let waited = now - *sent_at;
                        // Sampled on every look, not learnt from a read
                        // attempt: a socket held back is not polled again
                        // until the gate opens, so an edge would be seen once.
                        if self.gate.allowed() && silent {
                            unanswered += since.min(waited);
                        }
                        // Answers wait behind unread deliveries while the
                        // budget holds reads back: read on for the lease.
                        self.gate.set_lease_yield(lease_yield(
                            waited,
                            self.gate.unread_for(),
                            self.gate.dead_letters(),
                            bound,
                            heartbeat,
                        ));
                    }
                }
            }
        }
    }
}

/// What woke the watcher.
enum Seen {
    Nothing,
    Answer(Result<(), lapin::Error>),
    Event(Option<lapin::Event>),
    Tick,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_ends_a_session() {
        let lease = Duration::from_secs(10);
        let s = Duration::from_secs;
        assert_eq!(lost(None, s(0), lease), None);
        assert_eq!(lost(None, s(9), lease), None);
        assert!(lost(None, s(10), lease).unwrap().contains("10000 ms"));
        assert_eq!(
            lost(Some("the consume channel is closed"), s(0), lease).as_deref(),
            Some("the consume channel is closed")
        );
    }

    #[test]
    fn when_the_gate_reads_on_for_the_lease() {
        let lease = Duration::from_secs(10);
        let hb = Some(Duration::from_secs(60));
        let s = Duration::from_secs;
        #[rustfmt::skip]
        let table: &[(u64, u64, usize, Option<Duration>, bool)] = &[
            // waited, unread_for, dead letters pending, heartbeat, read on
            (0, 0, 0, hb, false),
            (4, 100, 0, hb, false),
            (5, 0, 0, hb, true),
            (5, 0, 3, hb, false),
            (9, 59, 3, hb, false),
            // Dead letters pending but not freeing the budget (an alarm
            // blocks their connection, their queue refuses them): read on
            // before lapin gives up on the socket (two heartbeats).
            (5, 60, 1, hb, true),
            (100, 100, 100, hb, true),
            // No heartbeats: lapin never gives up; wait for the dead letters.
            (100, 100, 1, None, false),
            (5, 0, 0, None, true),
        ];
        for &(waited, unread, dl, heartbeat, want) in table {
            assert_eq!(
                lease_yield(s(waited), s(unread), dl, lease, heartbeat),
                want,
                "{waited} {unread} {dl} {heartbeat:?}"
            );
        }
    }
}
