//! Request pacing for one API: never more than the configured number of
//! requests in any sliding window of one second, from a cold start on, and an
//! allowed rate that backs off on rate-limited answers without collapsing.
//!
//! Two rules decide when the next request may start:
//! - a sliding-window log: the send instants of the last `n` requests; the
//!   next one may start [`WINDOW`] after the `n`-th most recent. This is the
//!   hard guarantee, the same rule a strict server applies.
//! - smooth pacing (GCRA, a token bucket that reserves slots), so requests go
//!   out evenly rather than as a burst of `n` every second. Its small burst
//!   tolerance absorbs timer wake-ups that come a little late, so they do not
//!   cost throughput.
//!
//! [`WINDOW`] is one second plus [`SKEW_MARGIN`]: a request reaches the server
//! a little after it takes its slot, and not always equally late (scheduling,
//! the network). The margin keeps two requests `n` apart more than a second
//! apart at the server too, at the price of 2% of the ceiling.
//!
//! A rate-limited answer (someone else shares the quota, the server counts
//! differently, or a request reached it later than its slot) lowers the
//! allowed rate, at most once per [`DECREASE_SPACING`] however many replies
//! carry it: by a tenth when the rate was at the configured one (a lone
//! refusal, most often the skew the margin did not absorb, costs little),
//! then by a quarter each further second the refusals go on. After a second
//! without a decrease it climbs back linearly, an eighth of the configured
//! rate per second: from one decrease it is back at the configured rate
//! 1.8 s later, and from the floor (a tenth of it) within 8.2 s.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::tap::RateTap;

/// The sliding window the configured rate applies to, with the margin.
pub(crate) const WINDOW: Duration = Duration::from_millis(1000 + SKEW_MARGIN.as_millis() as u64);
/// Extra width of the window that absorbs differences in how long requests
/// take from taking their slot to reaching the server.
pub(crate) const SKEW_MARGIN: Duration = Duration::from_millis(20);
/// Rate-limited answers lower the rate at most this often.
pub(crate) const DECREASE_SPACING: Duration = Duration::from_secs(1);
/// What the first rate-limited answer of an episode (the rate was at the
/// configured one) multiplies the allowed rate by.
const FIRST_DECREASE_FACTOR: f64 = 0.9;
/// What a rate-limited answer multiplies the allowed rate by while it is
/// already lowered: refusals that go on mean the quota really is smaller.
const DECREASE_FACTOR: f64 = 0.75;
/// The lowest allowed rate, as a fraction of the configured one.
const FLOOR_FRACTION: f64 = 0.1;
/// How fast the allowed rate climbs back, as a fraction of the configured
/// rate per second, once [`DECREASE_SPACING`] has passed since the last
/// decrease (from the floor: 1 s + 7.2 s).
const RECOVERY_PER_SEC: f64 = 0.125;
/// Requests the pacing lets out back to back (after idling, or to catch up
/// with a late timer); the window log still bounds every second.
const PACING_BURST: f64 = 3.0;

/// What a rate-limited answer did to the allowed rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Lowering {
    /// The rate was at the configured one: a new episode of refusals began,
    /// now at this rate.
    NewEpisode(f64),
    /// The rate, already lowered, was lowered again to this.
    Lowered(f64),
    /// The rate was lowered less than [`DECREASE_SPACING`] ago: unchanged.
    Unchanged,
}

/// The pure pacing state: every decision takes the current instant.
#[derive(Debug, Clone)]
pub(crate) struct Pacer {
    max_rate: f64,
    /// Send instants (including reserved future ones), oldest first; only
    /// the last `max_rate` and only those within a window of the newest.
    log: VecDeque<Instant>,
    /// GCRA's theoretical arrival time of the next request.
    tat: Instant,
    /// The rate set by the last decrease, and when.
    lowered: Option<(f64, Instant)>,
}

impl Pacer {
    /// A pacer for `per_sec` requests a second (at least 1), idle at `now`.
    pub(crate) fn new(per_sec: u32, now: Instant) -> Self {
        let max_rate = f64::from(per_sec.max(1));
        Pacer {
            max_rate,
            log: VecDeque::new(),
            tat: now,
            lowered: None,
        }
    }

    /// The configured rate.
    pub(crate) fn max_rate(&self) -> f64 {
        self.max_rate
    }

    /// The allowed rate at `now`, requests per second.
    pub(crate) fn rate(&self, now: Instant) -> f64 {
        match self.lowered {
            None => self.max_rate,
            Some((r, at)) => {
                let climbed = now
                    .saturating_duration_since(at + DECREASE_SPACING)
                    .as_secs_f64()
                    * RECOVERY_PER_SEC
                    * self.max_rate;
                (r + climbed).min(self.max_rate)
            }
        }
    }

    /// Requests allowed in one window at `now`.
    fn per_window(&self, now: Instant) -> usize {
        (self.rate(now).floor() as usize).max(1)
    }

    /// The earliest instant at or after `now` a request may start.
    pub(crate) fn next_slot(&self, now: Instant) -> Instant {
        let rate = self.rate(now);
        let interval = Duration::from_secs_f64(1.0 / rate);
        let tolerance = interval.mul_f64(PACING_BURST - 1.0);
        let mut next = now.max(self.tat.checked_sub(tolerance).unwrap_or(now));
        let n = self.per_window(now);
        if self.log.len() >= n {
            next = next.max(self.log[self.log.len() - n] + WINDOW);
        }
        if let Some(&newest) = self.log.back() {
            // Keep the log in order when slots were reserved ahead.
            next = next.max(newest);
        }
        next
    }

    /// Takes a slot at `now` if one is free; else says when the next is.
    pub(crate) fn try_take(&mut self, now: Instant) -> Result<(), Instant> {
        let next = self.next_slot(now);
        if next > now {
            return Err(next);
        }
        self.record(now);
        Ok(())
    }

    /// Takes the next free slot, possibly in the future, and returns it.
    pub(crate) fn reserve(&mut self, now: Instant) -> Instant {
        let at = self.next_slot(now);
        self.record(at);
        at
    }

    fn record(&mut self, at: Instant) {
        let interval = Duration::from_secs_f64(1.0 / self.rate(at));
        self.tat = self.tat.max(at) + interval;
        self.log.push_back(at);
        let cap = self.max_rate as usize;
        while self.log.len() > cap || self.log.front().is_some_and(|&t| t + WINDOW <= at) {
            self.log.pop_front();
        }
    }

    /// The API answered "rate limited" at `now`.
    pub(crate) fn on_rate_limited(&mut self, now: Instant) -> Lowering {
        if let Some((_, at)) = self.lowered {
            if now.saturating_duration_since(at) < DECREASE_SPACING {
                return Lowering::Unchanged;
            }
        }
        let current = self.rate(now);
        let new_episode = current >= self.max_rate;
        let factor = if new_episode {
            FIRST_DECREASE_FACTOR
        } else {
            DECREASE_FACTOR
        };
        let lowered = (current * factor).max(self.max_rate * FLOOR_FRACTION);
        self.lowered = Some((lowered, now));
        if new_episode {
            Lowering::NewEpisode(lowered)
        } else {
            Lowering::Lowered(lowered)
        }
    }
}

/// The shared limiter of one API; share it behind an `Arc`.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    pacer: Mutex<Pacer>,
    /// Where the slots taken are recorded, when a test measures them.
    tap: Option<Arc<RateTap>>,
}

impl RateLimiter {
    /// A limiter allowing `per_sec` requests in any window (see [`WINDOW`]).
    pub(crate) fn new(per_sec: u32, tap: Option<Arc<RateTap>>) -> Self {
        RateLimiter {
            pacer: Mutex::new(Pacer::new(per_sec, Instant::now())),
            tap,
        }
    }

    fn pacer(&self) -> std::sync::MutexGuard<'_, Pacer> {
        self.pacer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// When the next slot is free, at or after `now`; takes nothing.
    pub(crate) fn next_slot(&self, now: Instant) -> Instant {
        self.pacer().next_slot(now)
    }

    /// Takes a slot now if one is free; else returns when the next one is.
    /// The caller that takes it must send at once (see `tencent::door`).
    pub(crate) fn try_acquire(&self) -> Result<(), Instant> {
        let now = Instant::now();
        self.pacer().try_take(now)?;
        if let Some(t) = &self.tap {
            t.slot(now, false);
        }
        Ok(())
    }

    /// Reserves the next slot and waits for it. Slots are reserved in order,
    /// so waiters are served first come, first served. The caller sends at
    /// once when it returns (see `tencent::door`).
    pub(crate) async fn acquire(&self) {
        let at = self.pacer().reserve(Instant::now());
        if let Some(t) = &self.tap {
            t.slot(at, true);
        }
        tokio::time::sleep_until(at).await;
    }

    /// The API answered "rate limited".
    pub(crate) fn on_rate_limited(&self) -> Lowering {
        self.pacer().on_rate_limited(Instant::now())
    }

    /// The allowed rate now, requests per second.
    pub(crate) fn current_rate(&self) -> f64 {
        self.pacer().rate(Instant::now())
    }

    /// The configured rate, requests per second.
    pub(crate) fn max_rate(&self) -> f64 {
        self.pacer().max_rate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

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

    #[test]
    fn cold_start_is_paced_and_never_exceeds_the_window() {
        let t0 = Instant::now();
        let mut p = Pacer::new(100, t0);
        let sent: Vec<Instant> = (0..1000).map(|_| p.reserve(t0)).collect();
        // The pacing lets 3 out at once, then one every 10 ms.
        assert_eq!(sent[2], t0);
        assert!(sent[3] > t0);
        assert!(max_in_window(&sent, Duration::from_secs(1)) <= 100);
        assert!(max_in_window(&sent, WINDOW) <= 100);
        // And it keeps to the ceiling: 1,000 requests take about 10 windows.
        let took = sent[999] - t0;
        assert!(took >= WINDOW * 9, "{took:?}");
        assert!(took <= WINDOW * 10 + Duration::from_millis(20), "{took:?}");
    }

    #[test]
    fn try_take_says_when_the_next_slot_is() {
        let t0 = Instant::now();
        let mut p = Pacer::new(10, t0);
        for _ in 0..3 {
            assert_eq!(p.try_take(t0), Ok(()));
        }
        let next = p.try_take(t0).unwrap_err();
        assert_eq!(next, t0 + Duration::from_millis(100));
        assert_eq!(p.next_slot(t0), next);
        assert!(p.try_take(next - Duration::from_millis(1)).is_err());
        assert_eq!(p.try_take(next), Ok(()));
    }

    #[test]
    fn reserved_slots_come_before_try_take() {
        let t0 = Instant::now();
        let mut p = Pacer::new(10, t0);
        let reserved: Vec<Instant> = (0..5).map(|_| p.reserve(t0)).collect();
        // Nothing free until after the last reservation.
        let next = p.try_take(t0).unwrap_err();
        assert!(next >= reserved[4]);
        assert!(p.try_take(reserved[4]).is_err());
        assert_eq!(p.try_take(next), Ok(()));
    }

    /// Property: whatever the arrival pattern (bursts, idles, mixes of
    /// waiting and polling callers, refusals), no window of one second holds
    /// more than the configured number of requests, even when each request
    /// leaves up to [`SKEW_MARGIN`] after its slot (the door takes the slot
    /// right before the send; what is left is scheduling).
    #[test]
    fn random_arrivals_never_exceed_the_rate_in_any_window() {
        for seed in 0..200u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let per_sec = rng.gen_range(1..=150u32);
            let t0 = Instant::now();
            let mut now = t0;
            let mut p = Pacer::new(per_sec, now);
            let mut sent = Vec::new();
            for _ in 0..rng.gen_range(50..600) {
                match rng.gen_range(0..10) {
                    0 => now += Duration::from_millis(rng.gen_range(0..1500)),
                    1..=3 => now += Duration::from_micros(rng.gen_range(0..20_000)),
                    4 => {
                        let _ = p.on_rate_limited(now);
                    }
                    5..=6 => sent.push(p.reserve(now)),
                    _ => match p.try_take(now) {
                        Ok(()) => sent.push(now),
                        // A polling caller wakes at the slot, maybe late.
                        Err(next) => {
                            now = next + Duration::from_micros(rng.gen_range(0..1500));
                            if p.try_take(now).is_ok() {
                                sent.push(now);
                            }
                        }
                    },
                }
            }
            let mut sorted = sent.clone();
            sorted.sort();
            assert_eq!(sorted, sent, "seed {seed}: slots out of order");
            let worst = max_in_window(&sent, WINDOW);
            assert!(
                worst <= per_sec as usize,
                "seed {seed}: {worst} requests in one window at {per_sec}/s"
            );
            let mut left: Vec<Instant> = sent
                .iter()
                .map(|&slot| slot + SKEW_MARGIN.mul_f64(rng.gen_range(0.0..1.0)))
                .collect();
            left.sort();
            let worst = max_in_window(&left, Duration::from_secs(1));
            assert!(
                worst <= per_sec as usize,
                "seed {seed}: {worst} requests left within one second at {per_sec}/s"
            );
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-6
    }

    #[test]
    fn refusals_lower_the_rate_at_most_once_a_second() {
        let t0 = Instant::now();
        let mut p = Pacer::new(100, t0);
        assert_eq!(p.on_rate_limited(t0), Lowering::NewEpisode(90.0));
        // Thirty more refusals within the second change nothing.
        for i in 1..=30 {
            let at = t0 + Duration::from_millis(i * 30);
            assert_eq!(p.on_rate_limited(at), Lowering::Unchanged);
        }
        assert_eq!(p.rate(t0 + Duration::from_millis(999)), 90.0);
        // Refusals that go on cut by a quarter each second.
        let at = t0 + Duration::from_secs(1);
        assert_eq!(p.on_rate_limited(at), Lowering::Lowered(90.0 * 0.75));
    }

    #[test]
    fn rate_recovers_linearly_within_ten_seconds_from_the_floor() {
        let t0 = Instant::now();
        let mut p = Pacer::new(100, t0);
        let mut at = t0;
        // Refused every second for a minute: down to the floor, not below.
        for _ in 0..60 {
            let _ = p.on_rate_limited(at);
            at += DECREASE_SPACING;
        }
        let last = at - DECREASE_SPACING;
        assert!(close(p.rate(last), 10.0));
        assert!(close(p.rate(last + Duration::from_secs(1)), 10.0));
        assert!(close(p.rate(last + Duration::from_secs(5)), 60.0));
        assert!(p.rate(last + Duration::from_millis(8199)) < 100.0);
        assert!(close(p.rate(last + Duration::from_millis(8200)), 100.0));
        assert!(close(p.rate(last + Duration::from_secs(10)), 100.0));
        // Fully recovered: the next refusal starts a new episode.
        assert!(matches!(
            p.on_rate_limited(last + Duration::from_secs(10)),
            Lowering::NewEpisode(_)
        ));
    }

    #[test]
    fn one_decrease_costs_a_tenth_and_is_over_in_under_two_seconds() {
        let t0 = Instant::now();
        let mut p = Pacer::new(100, t0);
        let _ = p.on_rate_limited(t0);
        assert!(close(p.rate(t0), 90.0));
        assert!(p.rate(t0 + Duration::from_millis(1790)) < 100.0);
        assert!(close(p.rate(t0 + Duration::from_millis(1800)), 100.0));
    }

    #[test]
    fn two_seconds_of_refusals_cut_by_a_tenth_then_a_quarter() {
        let t0 = Instant::now();
        let mut p = Pacer::new(100, t0);
        assert_eq!(p.on_rate_limited(t0), Lowering::NewEpisode(90.0));
        let at = t0 + Duration::from_millis(1500);
        // Half a second of climbing (6.25) before the second cut.
        let Lowering::Lowered(r) = p.on_rate_limited(at) else {
            panic!("a second decrease in the same episode");
        };
        assert!(close(r, (90.0 + 6.25) * 0.75), "{r}");
    }

    #[test]
    fn a_lower_rate_takes_effect_at_once() {
        let t0 = Instant::now();
        let mut p = Pacer::new(100, t0);
        let mut sent: Vec<Instant> = (0..100).map(|_| p.reserve(t0)).collect();
        let refused_at = *sent.last().unwrap();
        let _ = p.on_rate_limited(refused_at);
        // Within the next window at most 90 go out.
        let mut now = refused_at;
        while now < refused_at + WINDOW {
            match p.try_take(now) {
                Ok(()) => sent.push(now),
                Err(next) => now = next,
            }
        }
        let after = sent.iter().filter(|&&t| t > refused_at).count();
        assert!(after <= 90, "{after}");
    }

    /// After a burst of refusals the allowed rate is back at 0.9 of the
    /// configured one within 5 s, and requests flow at that rate.
    #[tokio::test(start_paused = true)]
    async fn back_at_ninety_percent_within_five_seconds_of_a_burst() {
        let l = std::sync::Arc::new(RateLimiter::new(100, None));
        let t0 = Instant::now();
        // A burst of refusals: every reply for 300 ms says 60007.
        let mut lowered = 0;
        while Instant::now() - t0 < Duration::from_millis(300) {
            l.acquire().await;
            if l.on_rate_limited() != Lowering::Unchanged {
                lowered += 1;
            }
        }
        assert_eq!(lowered, 1);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(l.current_rate() >= 90.0, "{}", l.current_rate());
        // Count what 8 concurrent senders get through in the next second.
        let start = Instant::now();
        let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (l, count) = (l.clone(), count.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    l.acquire().await;
                    if Instant::now() - start >= Duration::from_secs(1) {
                        return;
                    }
                    count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let n = count.load(std::sync::atomic::Ordering::Relaxed);
        assert!(n >= 90, "{n} requests in the second after recovery");
        assert!(n <= 100, "{n}");
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_waiters_share_the_rate() {
        let l = std::sync::Arc::new(RateLimiter::new(50, None));
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let l = l.clone();
            tasks.push(tokio::spawn(async move {
                let mut at = Vec::new();
                for _ in 0..25 {
                    l.acquire().await;
                    at.push(Instant::now());
                }
                at
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all.sort();
        assert_eq!(all.len(), 200);
        assert!(max_in_window(&all, Duration::from_secs(1)) <= 50);
        // 200 requests at 50 per window: just under four windows.
        let elapsed = Instant::now() - t0;
        assert!(elapsed >= WINDOW * 3, "{elapsed:?}");
        assert!(elapsed <= WINDOW * 4, "{elapsed:?}");
    }
}
