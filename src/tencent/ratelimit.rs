//! A shared, adaptive request-rate limiter (GCRA, i.e. a token bucket that
//! reserves slots so waiters never stampede). A rate-limited answer halves the
//! rate; it then recovers by 10% a second up to the configured ceiling.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// How long the rate stays lowered after a rate-limited answer.
const COOLDOWN: Duration = Duration::from_secs(5);
/// How often the rate climbs back by [`RECOVERY_FACTOR`].
const RECOVERY_STEP: Duration = Duration::from_secs(1);
const RECOVERY_FACTOR: f64 = 1.1;
const MIN_RATE: f64 = 1.0;

/// The limiter; share it behind an `Arc`.
#[derive(Debug)]
pub struct RateLimiter {
    max_rate: f64,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    rate: f64,
    /// Theoretical arrival time of the next request.
    tat: Instant,
    /// No recovery before this instant.
    hold_until: Instant,
}

impl RateLimiter {
    /// A limiter allowing `per_sec` requests a second, with bursts of a tenth
    /// of that (at least one).
    pub fn new(per_sec: u32) -> Self {
        let now = Instant::now();
        RateLimiter {
            max_rate: f64::from(per_sec.max(1)),
            state: Mutex::new(State {
                rate: f64::from(per_sec.max(1)),
                tat: now,
                hold_until: now,
            }),
        }
    }

    /// Waits until a request may go out.
    pub async fn acquire(&self) {
        let start = self.reserve(Instant::now());
        if start > Instant::now() {
            tokio::time::sleep_until(start).await;
        }
    }

    /// Reserves the next slot at or after `now`; returns when it starts.
    fn reserve(&self, now: Instant) -> Instant {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.rate < self.max_rate && now >= s.hold_until {
            s.rate = (s.rate * RECOVERY_FACTOR).min(self.max_rate);
            s.hold_until = now + RECOVERY_STEP;
        }
        let interval = Duration::from_secs_f64(1.0 / s.rate);
        let burst = (s.rate / 10.0).floor().max(1.0);
        let tolerance = interval.mul_f64(burst - 1.0);
        let tat = s.tat.max(now);
        let start = tat.checked_sub(tolerance).unwrap_or(now).max(now);
        s.tat = tat + interval;
        start
    }

    /// The API answered "rate limited": halve the rate for a while.
    pub fn on_rate_limited(&self) {
        let now = Instant::now();
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.rate = (s.rate / 2.0).max(MIN_RATE);
        s.hold_until = now + COOLDOWN;
    }

    /// The current rate, requests per second.
    pub fn current_rate(&self) -> f64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn holds_the_rate_with_small_bursts() {
        let l = RateLimiter::new(100);
        let t0 = Instant::now();
        for _ in 0..10 {
            l.acquire().await;
        }
        // The burst (10) goes at once.
        assert!(Instant::now() - t0 < Duration::from_millis(1));
        for _ in 0..100 {
            l.acquire().await;
        }
        let elapsed = Instant::now() - t0;
        assert!(
            elapsed >= Duration::from_millis(990) && elapsed <= Duration::from_millis(1010),
            "{elapsed:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_waiters_share_the_rate() {
        let l = std::sync::Arc::new(RateLimiter::new(50));
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let l = l.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..25 {
                    l.acquire().await;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        // 200 requests at 50/s with a burst of 5: about 3.9 s.
        let elapsed = Instant::now() - t0;
        assert!(elapsed >= Duration::from_millis(3880), "{elapsed:?}");
        assert!(elapsed <= Duration::from_millis(4000), "{elapsed:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limited_halves_then_recovers_gradually() {
        let l = RateLimiter::new(100);
        l.on_rate_limited();
        assert_eq!(l.current_rate(), 50.0);
        l.on_rate_limited();
        assert_eq!(l.current_rate(), 25.0);
        // No recovery during the cooldown.
        tokio::time::advance(Duration::from_secs(4)).await;
        l.acquire().await;
        assert_eq!(l.current_rate(), 25.0);
        tokio::time::advance(Duration::from_secs(2)).await;
        l.acquire().await;
        let r = l.current_rate();
        assert!((r - 27.5).abs() < 1e-9, "{r}");
        // Each further second climbs 10%, up to the ceiling and never past it.
        for _ in 0..60 {
            tokio::time::advance(RECOVERY_STEP).await;
            l.acquire().await;
        }
        assert_eq!(l.current_rate(), 100.0);
        for _ in 0..20 {
            l.on_rate_limited();
        }
        assert_eq!(l.current_rate(), MIN_RATE);
    }
}
