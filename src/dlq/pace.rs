//! `dlq replay --rate N`: a token bucket that lets N messages a second go,
//! one at a time (a burst of one), so a replay never floods the worker.

use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A token bucket of `rate` tokens a second holding at most one.
#[derive(Debug, Clone)]
pub(crate) struct Pace {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl Pace {
    /// `rate_per_sec` messages a second (must be > 0; the CLI checks it).
    pub(crate) fn new(rate_per_sec: f64) -> Pace {
        Pace {
            rate: rate_per_sec.max(f64::MIN_POSITIVE),
            tokens: 1.0,
            last: Instant::now(),
        }
    }

    /// How long to wait at `now` before one more message may go; takes its
    /// token (the bucket may go below zero: the wait pays it back).
    pub(crate) fn reserve(&mut self, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(1.0) - 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }

    /// Waits until one more message may go; false when `cancel` fired first.
    pub(crate) async fn take(&mut self, cancel: &CancellationToken) -> bool {
        let wait = self.reserve(Instant::now());
        if wait.is_zero() {
            return !cancel.is_cancelled();
        }
        tokio::select! {
            () = tokio::time::sleep(wait) => true,
            () = cancel.cancelled() => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn paces_at_the_rate() {
        let cancel = CancellationToken::new();
        for (rate, n, want_ms) in [(10.0, 51, 5000), (1000.0, 2001, 2000), (0.5, 3, 4000)] {
            let mut p = Pace::new(rate);
            let start = Instant::now();
            for _ in 0..n {
                assert!(p.take(&cancel).await);
            }
            let ms = start.elapsed().as_millis();
            // The first goes at once, then one every 1/rate seconds.
            assert!(ms.abs_diff(want_ms) <= 2, "rate {rate}: {ms} ms for {n}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn idle_time_does_not_build_a_burst() {
        let cancel = CancellationToken::new();
        let mut p = Pace::new(10.0);
        assert!(p.take(&cancel).await);
        tokio::time::sleep(Duration::from_secs(60)).await;
        let start = Instant::now();
        for _ in 0..11 {
            assert!(p.take(&cancel).await);
        }
        // One token saved at most, so 11 take about a second, not no time.
        assert!(start.elapsed().as_millis().abs_diff(1000) <= 2);
    }

    #[tokio::test(start_paused = true)]
    async fn cancel_stops_the_wait() {
        let cancel = CancellationToken::new();
        let mut p = Pace::new(0.001);
        assert!(p.take(&cancel).await);
        let c = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            c.cancel();
        });
        let start = Instant::now();
        assert!(!p.take(&cancel).await);
        assert!(start.elapsed() < Duration::from_secs(2));
    }
}
