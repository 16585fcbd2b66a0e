//! Measuring the request rate at the client: every rate slot a client takes
//! (the instant the pacer gave it) and every request it sends, for the
//! clients built for one base URL after [`tap`] was called on it.
//!
//! At the server a request arrives a little after its slot, and not always
//! equally late (the skew margin of `tencent::ratelimit`), so counting there
//! cannot prove the rate rule exactly. Here it is checked where it is kept:
//! no window of one second holds more slots than the rate, and no request
//! went out without one. Nothing is recorded for a base URL nobody taps.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::time::Instant;

/// What the clients of one base URL did since the tap was made.
#[derive(Debug, Default)]
pub struct RateTap {
    slots: Mutex<Vec<Instant>>,
    waited: AtomicU64,
    sends: AtomicU64,
}

impl RateTap {
    /// The instants of the rate slots taken, in the order they were taken.
    pub fn slots(&self) -> Vec<Instant> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Slots reserved by a caller that waits for its turn (retries, and
    /// calls outside the worker's batches); the others were taken because
    /// they were free right then (a batch formed only once its slot is).
    pub fn waited(&self) -> u64 {
        self.waited.load(Ordering::Relaxed)
    }

    /// Requests sent.
    pub fn sends(&self) -> u64 {
        self.sends.load(Ordering::Relaxed)
    }

    /// The most slots in any half-open window `[t, t + len)`.
    pub fn max_slots_in(&self, len: Duration) -> usize {
        let mut slots = self.slots();
        slots.sort_unstable();
        let mut worst = 0;
        let mut lo = 0;
        for hi in 0..slots.len() {
            while slots[hi] - slots[lo] >= len {
                lo += 1;
            }
            worst = worst.max(hi - lo + 1);
        }
        worst
    }

    /// A slot taken for `at`; `waited`: reserved by a caller that waits for it.
    pub(crate) fn slot(&self, at: Instant, waited: bool) {
        if waited {
            self.waited.fetch_add(1, Ordering::Relaxed);
        }
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(at);
    }

    pub(crate) fn sent(&self) {
        self.sends.fetch_add(1, Ordering::Relaxed);
    }
}

/// Taps live while their holder keeps them: base URL → tap.
static TAPS: Mutex<Vec<(String, Weak<RateTap>)>> = Mutex::new(Vec::new());

fn key(base_url: &str) -> &str {
    base_url.trim_end_matches('/')
}

/// Records what every client built for `base_url` from now on does, until
/// the returned tap is dropped.
pub fn tap(base_url: &str) -> Arc<RateTap> {
    let t = Arc::new(RateTap::default());
    let mut taps = TAPS.lock().unwrap_or_else(|p| p.into_inner());
    taps.retain(|(_, w)| w.strong_count() > 0);
    taps.push((key(base_url).to_string(), Arc::downgrade(&t)));
    t
}

/// The tap on `base_url`, if someone holds one.
pub(crate) fn find(base_url: &str) -> Option<Arc<RateTap>> {
    TAPS.lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .rev()
        .find(|(u, _)| u == key(base_url))
        .and_then(|(_, w)| w.upgrade())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tap_finds_its_own_url_only_while_held() {
        let t = tap("http://127.0.0.1:1/");
        assert!(find("http://127.0.0.1:1").is_some_and(|f| Arc::ptr_eq(&f, &t)));
        assert!(find("http://127.0.0.1:2").is_none());
        drop(t);
        assert!(find("http://127.0.0.1:1").is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn max_slots_in_counts_half_open_windows() {
        let t = RateTap::default();
        let t0 = Instant::now();
        for ms in [0, 10, 999, 1000, 1500] {
            t.slot(t0 + Duration::from_millis(ms), false);
        }
        // [0, 1000) holds 0, 10 and 999; 1000 starts the next window.
        assert_eq!(t.max_slots_in(Duration::from_secs(1)), 3);
        assert_eq!(t.max_slots_in(Duration::from_millis(1001)), 4);
    }
}
