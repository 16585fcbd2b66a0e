//! What the worker tells the admin endpoint (`/readyz`, `/healthz`) and the
//! tools that wait on it. The worker changes it only through the named
//! setters below, so every state it can be in is one of theirs.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// The worker's readiness, shared with the admin endpoint behind an `Arc`.
#[derive(Debug, Default)]
pub struct Health {
    connected: AtomicBool,
    consuming: AtomicBool,
    paused: AtomicBool,
    /// This worker's consumer is the one the broker delivers to (always, on
    /// a queue without single-active-consumer); else it is a standby.
    active: AtomicBool,
    paused_code: AtomicI64,
    unsettled: AtomicUsize,
    sessions: AtomicU64,
    /// Deliveries acknowledged to the broker, over every session.
    acked: AtomicU64,
    /// Why the last dead-letter publish failed, while none has succeeded since.
    dead_letters_failing: Mutex<Option<String>>,
}

impl Health {
    /// Ok when connected, consuming and not paused; else why not.
    pub fn readiness(&self) -> Result<(), String> {
        if !self.connected.load(Ordering::Relaxed) {
            return Err("not connected to RabbitMQ".into());
        }
        if self.paused.load(Ordering::Relaxed) {
            return Err(format!(
                "paused: the API answers ErrorCode {} (misconfigured)",
                self.paused_code.load(Ordering::Relaxed)
            ));
        }
        if !self.consuming.load(Ordering::Relaxed) {
            return Err("not consuming".into());
        }
        if let Some(why) = self.dead_letter_failure() {
            return Err(format!("cannot publish dead-letter copies: {why}"));
        }
        Ok(())
    }

    /// Whether this worker is the queue's active consumer (see
    /// docs/several-workers.md for how it knows); false: a standby, or not
    /// consuming at all.
    pub(crate) fn is_active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// `active` or `standby`, for `/healthz`.
    pub(crate) fn role(&self) -> &'static str {
        if self.is_active() {
            "active"
        } else {
            "standby"
        }
    }

    /// Whether consuming is paused by a misconfigured answer.
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed)
    }

    /// Deliveries received and not yet acknowledged by the current session.
    pub fn unsettled(&self) -> usize {
        self.unsettled.load(Ordering::Relaxed)
    }

    /// Deliveries acknowledged to the broker so far, over every session
    /// (dead-lettered ones included: they are acked once their copy is
    /// confirmed). A redelivered message acked again counts twice.
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    /// Broker sessions started so far (1 after the first connect; each
    /// reconnect adds one).
    pub fn sessions(&self) -> u64 {
        self.sessions.load(Ordering::Relaxed)
    }

    /// Whether the worker is consuming.
    pub fn is_consuming(&self) -> bool {
        self.consuming.load(Ordering::Relaxed)
    }

    /// Connected to the broker (true) or not; a lost connection also stops consuming.
    pub(crate) fn set_connected(&self, v: bool) {
        self.connected.store(v, Ordering::Relaxed);
        if !v {
            self.consuming.store(false, Ordering::Relaxed);
            self.dead_letters_failing(None);
            self.set_active(false);
        }
    }

    /// Why dead-letter copies cannot be published right now, if they cannot.
    pub(crate) fn dead_letter_failure(&self) -> Option<String> {
        self.dead_letters_failing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A dead-letter publish failed (`Some(why)`) or succeeded (`None`).
    pub(crate) fn dead_letters_failing(&self, why: Option<String>) {
        *self
            .dead_letters_failing
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = why;
    }

    /// A session's consumer is registered: count the session and report consuming.
    pub(crate) fn session_started(&self) {
        self.consuming.store(true, Ordering::Relaxed);
        self.sessions.fetch_add(1, Ordering::Relaxed);
    }

    /// Consuming stopped for shutdown (the connection may still be up).
    pub(crate) fn stopped_consuming(&self) {
        self.consuming.store(false, Ordering::Relaxed);
        self.set_active(false);
    }

    /// The broker delivers to this worker (true) or it waits as a standby;
    /// mirrored in the `imattr_active` gauge.
    pub(crate) fn set_active(&self, v: bool) {
        self.active.store(v, Ordering::Relaxed);
        metrics::gauge!("imattr_active").set(if v { 1.0 } else { 0.0 });
    }

    /// The API answered a misconfigured `code`: not ready until [`Health::resumed`].
    pub(crate) fn paused(&self, code: i64) {
        self.paused_code.store(code, Ordering::Relaxed);
        self.paused.store(true, Ordering::Relaxed);
    }

    /// The API accepts requests again.
    pub(crate) fn resumed(&self) {
        self.paused.store(false, Ordering::Relaxed);
    }

    /// Deliveries the current session holds unacknowledged.
    pub(crate) fn set_unsettled(&self, n: usize) {
        self.unsettled.store(n, Ordering::Relaxed);
    }

    /// `n` more deliveries were acknowledged to the broker.
    pub(crate) fn add_acked(&self, n: u64) {
        self.acked.fetch_add(n, Ordering::Relaxed);
    }

    /// A session ended: nothing of it is paused or unsettled any more.
    pub(crate) fn session_ended(&self) {
        self.paused.store(false, Ordering::Relaxed);
        self.set_active(false);
        self.unsettled.store(0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_reasons() {
        let h = Health::default();
        assert!(h.readiness().unwrap_err().contains("not connected"));
        h.set_connected(true);
        assert!(h.readiness().unwrap_err().contains("not consuming"));
        h.session_started();
        assert!(h.readiness().is_ok());
        // A standby is ready; it says so in its role.
        assert_eq!(h.role(), "standby");
        h.set_active(true);
        assert_eq!(h.role(), "active");
        assert_eq!(h.sessions(), 1);
        h.paused(90009);
        assert!(h.readiness().unwrap_err().contains("90009"));
        h.resumed();
        assert!(h.readiness().is_ok());
        h.dead_letters_failing(Some(
            "exchange imattr.dead routes the message to no queue".into(),
        ));
        let why = h.readiness().unwrap_err();
        assert!(
            why.contains("dead-letter") && why.contains("no queue"),
            "{why}"
        );
        h.dead_letters_failing(None);
        assert!(h.readiness().is_ok());
        h.stopped_consuming();
        assert!(h.readiness().unwrap_err().contains("not consuming"));
        assert!(
            !h.is_active(),
            "a worker that stopped consuming is no longer active"
        );
        h.set_unsettled(3);
        assert_eq!(h.unsettled(), 3);
        h.session_ended();
        assert_eq!(h.unsettled(), 0);
        h.set_connected(false);
        assert!(h.readiness().unwrap_err().contains("not connected"));
    }
}
