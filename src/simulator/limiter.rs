//! The simulator's frequency limit, per API. Tencent documents "100
//! requests/second" without saying how it is measured; the strict reading
//! (the default) refuses a request when `per_sec` requests were already
//! admitted in the second before it, i.e. in any sliding 1-second window.

use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// How the simulator reads "N requests per second".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RateLimitMode {
    /// At most N admitted requests in any sliding 1-second window. Refused
    /// requests do not occupy the window: Tencent does not say that they do,
    /// and counting them would let a client that keeps retrying lock itself out.
    #[default]
    Strict,
    /// A token bucket of N tokens refilled at N per second: bursts of up to N
    /// at once, then N per second on average (2N can pass within one second).
    Lenient,
}

impl FromStr for RateLimitMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "strict" => Ok(RateLimitMode::Strict),
            "lenient" => Ok(RateLimitMode::Lenient),
            _ => Err(format!("expected strict or lenient, got {s:?}")),
        }
    }
}

impl fmt::Display for RateLimitMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RateLimitMode::Strict => "strict",
            RateLimitMode::Lenient => "lenient",
        })
    }
}

const WINDOW: Duration = Duration::from_secs(1);

/// The limiter of one API; both readings keep their state so the mode can
/// change while the simulator runs.
#[derive(Debug, Default)]
pub(crate) struct Limiter {
    /// Strict: when each request admitted in the last second arrived.
    admitted: VecDeque<Instant>,
    /// Lenient: tokens left and when they were last refilled.
    bucket: Option<(f64, Instant)>,
}

impl Limiter {
    /// Whether a request arriving at `now` is admitted; `per_sec` 0 admits all.
    pub(crate) fn admit(&mut self, mode: RateLimitMode, per_sec: u32, now: Instant) -> bool {
        if per_sec == 0 {
            return true;
        }
        // Requests exactly one second apart are in different windows.
        while self
            .admitted
            .front()
            .is_some_and(|t| now.duration_since(*t) >= WINDOW)
        {
            self.admitted.pop_front();
        }
        let cap = f64::from(per_sec);
        let (tokens, last) = self.bucket.get_or_insert((cap, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * cap).min(cap);
        *last = now;
        let ok = match mode {
            RateLimitMode::Strict => self.admitted.len() < per_sec as usize,
            RateLimitMode::Lenient => *tokens >= 1.0,
        };
        if ok {
            *tokens = (*tokens - 1.0).max(0.0);
            self.admitted.push_back(now);
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends one request every `gap`, `n` times; which were admitted.
    async fn run(
        l: &mut Limiter,
        mode: RateLimitMode,
        per_sec: u32,
        gap: Duration,
        n: usize,
    ) -> Vec<bool> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(l.admit(mode, per_sec, Instant::now()));
            tokio::time::advance(gap).await;
        }
        out
    }

    /// No sliding 1-second window holds more than `per_sec` admitted requests.
    fn max_in_any_window(times: &[Instant]) -> usize {
        times
            .iter()
            .map(|t| {
                times
                    .iter()
                    .filter(|u| **u >= *t && **u - *t < WINDOW)
                    .count()
            })
            .max()
            .unwrap_or(0)
    }

    #[tokio::test(start_paused = true)]
    async fn strict_refuses_the_n_plus_first_in_any_window() {
        let mut l = Limiter::default();
        // A burst of 10 at one instant: 5 pass.
        let burst: Vec<bool> = (0..10)
            .map(|_| l.admit(RateLimitMode::Strict, 5, Instant::now()))
            .collect();
        assert_eq!(burst.iter().filter(|b| **b).count(), 5);
        // 999 ms later the window still holds them; at 1000 ms it does not.
        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(!l.admit(RateLimitMode::Strict, 5, Instant::now()));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(l.admit(RateLimitMode::Strict, 5, Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn strict_refusals_do_not_occupy_the_window() {
        let mut l = Limiter::default();
        for _ in 0..5 {
            assert!(l.admit(RateLimitMode::Strict, 5, Instant::now()));
        }
        // Refused retries every 100 ms do not push the window out.
        for _ in 0..9 {
            tokio::time::advance(Duration::from_millis(100)).await;
            assert!(!l.admit(RateLimitMode::Strict, 5, Instant::now()));
        }
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(l.admit(RateLimitMode::Strict, 5, Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn strict_never_admits_more_than_n_in_any_window_at_any_pace() {
        for gap_ms in [1, 7, 9, 10, 11, 13, 50, 333] {
            let mut l = Limiter::default();
            let mut times = Vec::new();
            for _ in 0..600 {
                if l.admit(RateLimitMode::Strict, 100, Instant::now()) {
                    times.push(Instant::now());
                }
                tokio::time::advance(Duration::from_millis(gap_ms)).await;
            }
            assert!(max_in_any_window(&times) <= 100, "gap {gap_ms} ms");
            // A pace under the limit is never refused.
            if gap_ms >= 10 {
                assert_eq!(times.len(), 600, "gap {gap_ms} ms");
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn lenient_lets_a_burst_and_a_steady_rate_through_in_one_second() {
        let mut l = Limiter::default();
        let burst = run(&mut l, RateLimitMode::Lenient, 10, Duration::ZERO, 10).await;
        assert!(burst.iter().all(|b| *b));
        // Then 10 more within the same second, one every 100 ms: the strict
        // reading would refuse them all.
        let steady = run(
            &mut l,
            RateLimitMode::Lenient,
            10,
            Duration::from_millis(100),
            10,
        )
        .await;
        assert!(steady[1..].iter().all(|b| *b), "{steady:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn zero_turns_the_limit_off() {
        let mut l = Limiter::default();
        let all = run(&mut l, RateLimitMode::Strict, 0, Duration::ZERO, 1000).await;
        assert!(all.iter().all(|b| *b));
    }

    #[test]
    fn modes_parse_and_print() {
        for m in [RateLimitMode::Strict, RateLimitMode::Lenient] {
            assert_eq!(m.to_string().parse::<RateLimitMode>(), Ok(m));
        }
        assert!("fast".parse::<RateLimitMode>().is_err());
    }
}
