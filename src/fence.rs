//! The fence: whether requests of one broker session may still leave
//! (docs/design.md, "Fencing").
//!
//! A session owns its deliveries only while the broker keeps its channel
//! open; once the broker closes it (or stops answering), the same messages
//! go to another consumer, and a request this session sends afterwards may
//! land after that consumer's newer one. So every request checks the fence
//! right before it leaves (`tencent::door`), after its in-flight permit and
//! its rate slot.
//!
//! The fence is shut for good when the session is closed (the broker said
//! so, the session ended, or the lease lapsed while the session could have
//! heard from the broker), and shut for the moment while its lease has
//! lapsed: the lease runs for `amqp.lease_ms` from the sending of the last
//! round trip the broker answered on the consume channel. An answer proves
//! that the channel, and so the consumer and its unacknowledged deliveries,
//! still existed when the broker wrote it, which is after the round trip was
//! sent; a channel never reopens, so it existed at every instant before.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Why a request may not leave now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shut {
    /// The session is over: nothing of it may be sent any more.
    Closed,
    /// No round trip was answered within the lease: wait for one.
    Lapsed,
}

/// Whether a lease renewed by a round trip sent at `answered` (and
/// answered) is still running at `now`.
pub(crate) fn lease_running(now: Instant, answered: Instant, len: Duration) -> bool {
    now < answered + len
}

/// One session's fence. Cheap to clone; clones share it.
#[derive(Debug, Clone)]
pub(crate) struct Fence {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    closed: CancellationToken,
    /// Why it was closed; the first reason wins.
    reason: Mutex<Option<String>>,
    /// None: no lease (a fence that only closes).
    lease: Option<Lease>,
}

#[derive(Debug)]
struct Lease {
    len: Duration,
    /// When the newest answered round trip was sent.
    answered: watch::Sender<Instant>,
}

impl Fence {
    /// A fence without a lease, closed only by [`Fence::close`]: for requests
    /// that belong to no broker session (reading the attribute names, the
    /// operator tools).
    pub(crate) fn open() -> Fence {
        Fence {
            inner: Arc::new(Inner {
                closed: CancellationToken::new(),
                reason: Mutex::new(None),
                lease: None,
            }),
        }
    }

    /// A fence whose lease of `len` runs from `answered` (when the round
    /// trip that proved the session alive was sent: for a new session, when
    /// it started consuming).
    pub(crate) fn leased(len: Duration, answered: Instant) -> Fence {
        Fence {
            inner: Arc::new(Inner {
                closed: CancellationToken::new(),
                reason: Mutex::new(None),
                lease: Some(Lease {
                    len,
                    answered: watch::Sender::new(answered),
                }),
            }),
        }
    }

    /// Whether a request may leave at `now`.
    pub(crate) fn may_send(&self, now: Instant) -> Result<(), Shut> {
        if self.inner.closed.is_cancelled() {
            return Err(Shut::Closed);
        }
        match &self.inner.lease {
            Some(l) if !lease_running(now, *l.answered.borrow(), l.len) => Err(Shut::Lapsed),
            _ => Ok(()),
        }
    }

    /// A round trip sent at `sent_at` was answered: the lease runs from
    /// there (never backwards).
    pub(crate) fn renew(&self, sent_at: Instant) {
        if let Some(l) = &self.inner.lease {
            l.answered.send_if_modified(|at| {
                let newer = sent_at > *at;
                if newer {
                    *at = sent_at;
                }
                newer
            });
        }
    }

    /// When the lease ends unless renewed (None: no lease).
    #[cfg(test)]
    pub(crate) fn lease_end(&self) -> Option<Instant> {
        let l = self.inner.lease.as_ref()?;
        let answered = *l.answered.borrow();
        Some(answered + l.len)
    }

    /// Shuts the fence for good; the first reason is kept.
    pub(crate) fn close(&self, reason: impl Into<String>) {
        {
            let mut r = self.inner.reason.lock().unwrap_or_else(|p| p.into_inner());
            if r.is_none() {
                *r = Some(reason.into());
            }
        }
        self.inner.closed.cancel();
    }

    /// Whether it was closed.
    pub(crate) fn is_closed(&self) -> bool {
        self.inner.closed.is_cancelled()
    }

    /// Why it was closed ("" while open).
    pub(crate) fn reason(&self) -> String {
        self.inner
            .reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_default()
    }

    /// Cancelled when the fence closes (for waits that a closed session must cut short).
    pub(crate) fn token(&self) -> &CancellationToken {
        &self.inner.closed
    }

    /// Resolves when the fence closes.
    pub(crate) async fn closed(&self) {
        self.inner.closed.cancelled().await;
    }

    /// Waits until a request may leave: true at once while the lease runs,
    /// true once a round trip renews it, false when the fence closes.
    pub(crate) async fn until_open(&self) -> bool {
        let Some(lease) = &self.inner.lease else {
            return !self.is_closed();
        };
        let mut answered = lease.answered.subscribe();
        loop {
            match self.may_send(Instant::now()) {
                Ok(()) => return true,
                Err(Shut::Closed) => return false,
                Err(Shut::Lapsed) => {}
            }
            tokio::select! {
                changed = answered.changed() => {
                    if changed.is_err() {
                        return false;
                    }
                }
                _ = self.closed() => return false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_runs_from_the_sending_of_the_answered_round_trip() {
        let t0 = Instant::now();
        let len = Duration::from_secs(10);
        for (now_ms, running) in [(0, true), (9_999, true), (10_000, false), (20_000, false)] {
            let now = t0 + Duration::from_millis(now_ms);
            assert_eq!(lease_running(now, t0, len), running, "{now_ms} ms");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn may_send_until_the_lease_lapses_and_again_once_renewed() {
        let t0 = Instant::now();
        let f = Fence::leased(Duration::from_secs(2), t0);
        assert_eq!(f.may_send(t0), Ok(()));
        assert_eq!(f.lease_end(), Some(t0 + Duration::from_secs(2)));
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(f.may_send(Instant::now()), Err(Shut::Lapsed));
        // An answer to a round trip sent before the last one renews nothing.
        f.renew(t0 - Duration::from_secs(1));
        assert_eq!(f.may_send(Instant::now()), Err(Shut::Lapsed));
        let waiter = tokio::spawn({
            let f = f.clone();
            async move { f.until_open().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "open while the lease has lapsed");
        f.renew(Instant::now() - Duration::from_millis(500));
        assert!(waiter.await.unwrap());
        assert_eq!(f.may_send(Instant::now()), Ok(()));
        f.close("the broker closed the channel");
        f.close("a later reason");
        assert_eq!(f.may_send(Instant::now()), Err(Shut::Closed));
        assert_eq!(f.reason(), "the broker closed the channel");
        // Renewing a closed fence opens nothing.
        f.renew(Instant::now());
        assert_eq!(f.may_send(Instant::now()), Err(Shut::Closed));
        assert!(!f.until_open().await);
    }

    #[tokio::test(start_paused = true)]
    async fn closing_ends_a_wait_for_the_lease() {
        let f = Fence::leased(Duration::from_secs(1), Instant::now());
        tokio::time::advance(Duration::from_secs(2)).await;
        let waiter = tokio::spawn({
            let f = f.clone();
            async move { f.until_open().await }
        });
        tokio::task::yield_now().await;
        f.close("lost");
        assert!(!waiter.await.unwrap());
    }

    #[test]
    fn an_open_fence_has_no_lease() {
        let f = Fence::open();
        let later = Instant::now() + Duration::from_secs(86_400);
        assert_eq!(f.may_send(later), Ok(()));
        assert_eq!(f.lease_end(), None);
        f.close("done");
        assert_eq!(f.may_send(later), Err(Shut::Closed));
    }
}
