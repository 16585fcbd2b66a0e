//! The one way out for every request to the API, whatever its kind (a
//! batch's first send, a retry, a probe, a split or bisected part, reading
//! the attribute names): an in-flight permit, then a rate slot, then the
//! session's fence, then the send at once.
//!
//! The order matters. The rate slot is taken last, right before the request
//! leaves, so that no request is sent later than the slot it was counted in
//! (a slot taken before waiting for a permit could be used a whole request
//! latency later, and a window could then hold one request more than the
//! limit). The fence is checked after both waits, because a session may be
//! lost while a request waits for them.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;

use super::ratelimit::RateLimiter;
use super::tap::RateTap;
use crate::fence::{Fence, Shut};

/// The in-flight bound and the rate limiter, shared by every clone of a client.
#[derive(Debug)]
pub(crate) struct Door {
    in_flight: Semaphore,
    limiter: RateLimiter,
    /// APIs with a rate budget of their own (`tencent.rate_limit_scope =
    /// "per_api"`); every other API counts on `limiter`.
    own_limiters: Vec<(&'static str, RateLimiter)>,
    /// Tickets handed out whose request has not left yet.
    queued: AtomicUsize,
    /// Notified each time a ticket is used or given up.
    departed: Notify,
}

/// How a request takes its rate slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Slot {
    /// The slot free now, else the next one, reserved and waited for
    /// (first come, first served among those who reserve).
    Reserve,
    /// Only a slot free when it is tried, never one reserved ahead: a
    /// request that must not make batches wait (the credentials probe).
    WhenFree,
}

/// A place in the queue for the door, taken before the request is formed
/// (so that whoever forms requests can see how many are waiting) and given
/// up when the request leaves or is abandoned.
#[derive(Debug)]
pub(crate) struct Ticket {
    door: Arc<Door>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.door.queued.fetch_sub(1, Ordering::Relaxed);
        self.door.departed.notify_one();
    }
}

impl Door {
    /// A door for `rate_limit_per_sec` requests a second and `max_in_flight`
    /// at once; `tap` records the slots (tests that measure the rate).
    pub(crate) fn new(
        rate_limit_per_sec: u32,
        max_in_flight: usize,
        tap: Option<Arc<RateTap>>,
    ) -> Door {
        Door {
            in_flight: Semaphore::new(max_in_flight.max(1)),
            limiter: RateLimiter::new(rate_limit_per_sec, tap),
            own_limiters: Vec::new(),
            queued: AtomicUsize::new(0),
            departed: Notify::new(),
        }
    }

    /// A door where each of `own` has a budget of `rate_limit_per_sec` of
    /// its own, and the other APIs share one.
    pub(crate) fn per_api(
        rate_limit_per_sec: u32,
        max_in_flight: usize,
        tap: Option<Arc<RateTap>>,
        own: &[&'static str],
    ) -> Door {
        let mut door = Door::new(rate_limit_per_sec, max_in_flight, tap.clone());
        door.own_limiters = own
            .iter()
            .map(|api| (*api, RateLimiter::new(rate_limit_per_sec, tap.clone())))
            .collect();
        door
    }

    /// The rate limiter that counts requests to `api`.
    pub(crate) fn limiter_for(&self, api: &str) -> &RateLimiter {
        self.own_limiters
            .iter()
            .find(|(a, _)| *a == api)
            .map_or(&self.limiter, |(_, l)| l)
    }

    /// Queues up for the door.
    pub(crate) fn ticket(self: &Arc<Self>) -> Ticket {
        self.queued.fetch_add(1, Ordering::Relaxed);
        Ticket { door: self.clone() }
    }

    /// Tickets whose request has not left yet.
    pub(crate) fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Resolves after a ticket was used or given up (at once if one was
    /// since the last call).
    pub(crate) async fn departed(&self) {
        self.departed.notified().await;
    }

    /// When the next rate slot is free, at or after `now` (`now`: free
    /// now); takes nothing.
    pub(crate) fn next_slot(&self, now: Instant) -> Instant {
        self.limiter.next_slot(now)
    }

    /// The rate limiter of the shared budget (its rate goes down on
    /// rate-limited answers).
    #[cfg(test)]
    pub(crate) fn limiter(&self) -> &RateLimiter {
        &self.limiter
    }

    /// Lets one request to `api` through: waits for an in-flight permit
    /// (held until `send` completes), then for a live lease and a rate slot
    /// of `api`'s budget (`slot`), checks the fence and runs `send` at once.
    /// None, and nothing sent, when the fence closes first.
    pub(crate) async fn pass<F, Fut, T>(
        &self,
        api: &str,
        ticket: Ticket,
        fence: &Fence,
        slot: Slot,
        send: F,
    ) -> Option<T>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = T>,
    {
        let limiter = self.limiter_for(api);
        let _permit = tokio::select! {
            p = self.in_flight.acquire() => p.ok()?,
            _ = fence.closed() => return None,
        };
        loop {
            // A slot taken and then not used is wasted, never a breach: wait
            // for a live lease first so that slots are rarely wasted.
            if !fence.until_open().await {
                return None;
            }
            // A slot free now is taken as it is; else reserved and waited
            // for, or (`WhenFree`) waited for and tried again.
            if let Err(next) = limiter.try_acquire() {
                match slot {
                    Slot::Reserve => tokio::select! {
                        _ = limiter.acquire() => {}
                        _ = fence.closed() => return None,
                    },
                    Slot::WhenFree => {
                        tokio::select! {
                            _ = tokio::time::sleep_until(next) => {}
                            _ = fence.closed() => return None,
                        }
                        continue;
                    }
                }
            }
            match fence.may_send(Instant::now()) {
                Ok(()) => break,
                Err(Shut::Closed) => return None,
                Err(Shut::Lapsed) => continue,
            }
        }
        drop(ticket);
        Some(send().await)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    /// The most instants in any half-open window `[t, t + len)`.
    fn max_in_window(sent: &[Instant], len: Duration) -> usize {
        let mut worst = 0;
        let mut lo = 0;
        for hi in 0..sent.len() {
            while sent[hi] - sent[lo] >= len {
                lo += 1;
            }
            worst = worst.max(hi - lo + 1);
        }
        worst
    }

    /// Property: whatever the latencies and however few the permits (a
    /// slow request holding one, like a names refresh), requests leave at
    /// most `rate` in any second: each leaves in the slot it was counted in.
    #[tokio::test(start_paused = true)]
    async fn requests_leave_in_their_slot_whatever_holds_the_permits() {
        for seed in 0..40u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let rate = rng.gen_range(2..=40u32);
            let in_flight = rng.gen_range(1..=6usize);
            let door = Arc::new(Door::new(rate, in_flight, None));
            let fence = Fence::open();
            let sent = Arc::new(std::sync::Mutex::new(Vec::new()));
            let mut tasks = Vec::new();
            for _ in 0..rng.gen_range(20..120) {
                let start = Duration::from_millis(rng.gen_range(0..3000));
                let latency = Duration::from_millis(rng.gen_range(0..1500));
                let (door, fence, sent) = (door.clone(), fence.clone(), sent.clone());
                tasks.push(tokio::spawn(async move {
                    tokio::time::sleep(start).await;
                    let ticket = door.ticket();
                    door.pass("x", ticket, &fence, Slot::Reserve, || async {
                        sent.lock().unwrap().push(Instant::now());
                        tokio::time::sleep(latency).await;
                    })
                    .await
                }));
            }
            for t in tasks {
                assert!(t.await.unwrap().is_some());
            }
            let mut sent = sent.lock().unwrap().clone();
            sent.sort();
            let worst = max_in_window(&sent, Duration::from_secs(1));
            assert!(
                worst <= rate as usize,
                "seed {seed}: {worst} requests left within one second at {rate}/s with {in_flight} in flight"
            );
            assert_eq!(door.queued(), 0);
        }
    }

    /// A request waiting for a permit, a lease or a slot is not sent once
    /// the fence closes, and waits while the lease has lapsed.
    #[tokio::test(start_paused = true)]
    async fn nothing_leaves_through_a_closed_or_lapsed_fence() {
        let door = Arc::new(Door::new(1000, 1, None));
        let fence = Fence::leased(Duration::from_secs(1), Instant::now());
        let sent = Arc::new(AtomicUsize::new(0));
        let send = |sent: Arc<AtomicUsize>| {
            move || async move {
                sent.fetch_add(1, Ordering::Relaxed);
            }
        };
        assert!(door
            .pass(
                "x",
                door.ticket(),
                &fence,
                Slot::Reserve,
                send(sent.clone())
            )
            .await
            .is_some());
        tokio::time::advance(Duration::from_secs(2)).await;
        // Lapsed: it waits for a renewal.
        let waiting = tokio::spawn({
            let (door, fence, sent) = (door.clone(), fence.clone(), sent.clone());
            async move {
                door.pass("x", door.ticket(), &fence, Slot::Reserve, send(sent))
                    .await
            }
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!waiting.is_finished());
        assert_eq!(sent.load(Ordering::Relaxed), 1);
        fence.renew(Instant::now());
        assert!(waiting.await.unwrap().is_some());
        assert_eq!(sent.load(Ordering::Relaxed), 2);
        // Waiting for the only permit when the fence closes: not sent.
        let permit = door.in_flight.acquire().await.unwrap();
        let waiting = tokio::spawn({
            let (door, fence, sent) = (door.clone(), fence.clone(), sent.clone());
            async move {
                door.pass("x", door.ticket(), &fence, Slot::Reserve, send(sent))
                    .await
            }
        });
        tokio::task::yield_now().await;
        fence.close("lost");
        drop(permit);
        assert!(waiting.await.unwrap().is_none());
        assert_eq!(sent.load(Ordering::Relaxed), 2);
        assert_eq!(door.queued(), 0);
    }

    /// Shared (the default): requests to both write APIs count on one
    /// budget. Per API: each has the whole rate to itself.
    #[tokio::test(start_paused = true)]
    async fn the_scope_decides_which_requests_share_a_budget() {
        const APIS: [&str; 2] = ["im_set_attr", "im_remove_attr"];
        for per_api in [false, true] {
            let door = Arc::new(if per_api {
                Door::per_api(5, 64, None, &["im_remove_attr"])
            } else {
                Door::new(5, 64, None)
            });
            let fence = Fence::open();
            let sent: Arc<std::sync::Mutex<Vec<(usize, Instant)>>> = Arc::default();
            let mut tasks = Vec::new();
            for i in 0..40 {
                let (door, fence, sent) = (door.clone(), fence.clone(), sent.clone());
                tasks.push(tokio::spawn(async move {
                    let which = i % 2;
                    door.pass(
                        APIS[which],
                        door.ticket(),
                        &fence,
                        Slot::Reserve,
                        || async {
                            sent.lock().unwrap().push((which, Instant::now()));
                        },
                    )
                    .await
                }));
            }
            for t in tasks {
                assert!(t.await.unwrap().is_some());
            }
            let sent = sent.lock().unwrap().clone();
            let of = |w: Option<usize>| {
                let mut v: Vec<Instant> = sent
                    .iter()
                    .filter(|(x, _)| w.is_none_or(|w| *x == w))
                    .map(|(_, t)| *t)
                    .collect();
                v.sort();
                max_in_window(&v, Duration::from_secs(1))
            };
            assert!(of(Some(0)) <= 5 && of(Some(1)) <= 5, "per_api {per_api}");
            if per_api {
                assert!(of(None) > 5, "each API has its own budget");
            } else {
                assert!(of(None) <= 5, "one budget for both");
            }
        }
    }
}
