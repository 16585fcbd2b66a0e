//! The retry budget of one request: only time spent in transient failure
//! counts toward `retry.max_elapsed_secs`.
//!
//! Waiting out a rate limit or a misconfiguration is not the request failing,
//! so it must not push a message into the dead-letter queue. The budget adds
//! up the time from each transient answer to the next answer, whatever it is;
//! time after any other answer is not counted.

use std::time::Duration;

use tokio::time::Instant;

/// Time spent in transient failure, against a limit.
#[derive(Debug, Clone)]
pub(crate) struct TransientBudget {
    max: Option<Duration>,
    spent: Duration,
    /// When the last answer was transient: when it came.
    since: Option<Instant>,
}

impl TransientBudget {
    /// A budget of `max` (None: unlimited).
    pub(crate) fn new(max: Option<Duration>) -> Self {
        TransientBudget {
            max,
            spent: Duration::ZERO,
            since: None,
        }
    }

    /// A budget of `max_elapsed_secs` seconds, 0 meaning unlimited.
    pub(crate) fn from_secs(max_elapsed_secs: u64) -> Self {
        Self::new((max_elapsed_secs > 0).then(|| Duration::from_secs(max_elapsed_secs)))
    }

    /// Records an answer that came at `now`; `transient` when it was a
    /// transient failure (the time until the next answer then counts).
    pub(crate) fn answer(&mut self, now: Instant, transient: bool) {
        if let Some(since) = self.since.take() {
            self.spent += now.saturating_duration_since(since);
        }
        if transient {
            self.since = Some(now);
        }
    }

    /// Time counted so far.
    #[cfg(test)]
    pub(crate) fn spent(&self) -> Duration {
        self.spent
    }

    /// Whether waiting `wait` more would go past the limit: then give up now.
    pub(crate) fn exhausted_after(&self, wait: Duration) -> bool {
        self.max.is_some_and(|max| self.spent + wait > max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[tokio::test(start_paused = true)]
    async fn only_time_after_transient_answers_counts() {
        let mut b = TransientBudget::from_secs(10);
        // transient, 2 s, rate limited, 30 s, transient, 3 s, transient
        b.answer(Instant::now(), true);
        tokio::time::advance(2 * S).await;
        b.answer(Instant::now(), false);
        tokio::time::advance(30 * S).await;
        b.answer(Instant::now(), true);
        tokio::time::advance(3 * S).await;
        b.answer(Instant::now(), true);
        assert_eq!(b.spent(), 5 * S);
        assert!(!b.exhausted_after(5 * S));
        assert!(b.exhausted_after(5 * S + Duration::from_millis(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limited_hours_never_exhaust_it() {
        let mut b = TransientBudget::from_secs(600);
        b.answer(Instant::now(), true);
        tokio::time::advance(S).await;
        for _ in 0..3600 {
            b.answer(Instant::now(), false);
            tokio::time::advance(10 * S).await;
        }
        b.answer(Instant::now(), true);
        assert_eq!(b.spent(), S);
        assert!(!b.exhausted_after(30 * S));
    }

    #[tokio::test(start_paused = true)]
    async fn continuous_transient_failure_exhausts_it() {
        let mut b = TransientBudget::from_secs(60);
        let mut waits = 0;
        loop {
            b.answer(Instant::now(), true);
            if b.exhausted_after(7 * S) {
                break;
            }
            tokio::time::advance(7 * S).await;
            waits += 1;
        }
        assert_eq!(waits, 8);
        assert_eq!(b.spent(), 56 * S);
    }

    #[test]
    fn zero_means_unlimited() {
        let b = TransientBudget::from_secs(0);
        assert!(!b.exhausted_after(Duration::from_secs(u32::MAX as u64)));
    }
}
