//! The batch-size ceiling: `batch.max_accounts`, lowered for a while after
//! the API refuses a request as too large (90018), so the coalescer forms
//! batches the API takes instead of ones that must be split every time.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// How long a lowered ceiling holds before it doubles back.
const RECOVERY: Duration = Duration::from_secs(30);

/// The ceiling, shared by the session (which forms batches) and the batch
/// tasks (which lower it).
#[derive(Debug)]
pub(crate) struct BatchCap {
    max: usize,
    /// The current ceiling and when it last changed.
    state: Mutex<(usize, Instant)>,
}

impl BatchCap {
    /// A ceiling of `max`.
    pub(crate) fn new(max: usize) -> Self {
        BatchCap {
            max,
            state: Mutex::new((max, Instant::now())),
        }
    }

    /// The current ceiling (recovering by doubling every 30 s).
    pub(crate) fn get(&self) -> usize {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.0 < self.max && s.1.elapsed() >= RECOVERY {
            s.0 = (s.0 * 2).min(self.max);
            s.1 = Instant::now();
        }
        s.0
    }

    /// Requests of `refused` accounts were too many: use at most half.
    pub(crate) fn lower(&self, refused: usize) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.0 = (refused / 2).clamp(1, s.0);
        s.1 = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn lowers_then_recovers() {
        let c = BatchCap::new(100);
        assert_eq!(c.get(), 100);
        c.lower(100);
        assert_eq!(c.get(), 50);
        c.lower(50);
        assert_eq!(c.get(), 25);
        c.lower(1);
        assert_eq!(c.get(), 1);
        tokio::time::advance(RECOVERY).await;
        assert_eq!(c.get(), 2);
        for _ in 0..10 {
            tokio::time::advance(RECOVERY).await;
            c.get();
        }
        assert_eq!(c.get(), 100);
    }
}
