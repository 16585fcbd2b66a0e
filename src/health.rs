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
    /// The API's message with the misconfigured code, while paused.
    paused_message: Mutex<String>,
    /// The broker node of the current session (its URL, password redacted).
    node: Mutex<Option<String>>,
    unsettled: AtomicUsize,
    sessions: AtomicU64,
    /// Deliveries acknowledged to the broker, over every session.
    acked: AtomicU64,
    /// Why the last dead-letter publish failed, while none has succeeded since.
    dead_letters_failing: Mutex<Option<String>>,
    /// SIGTERM or SIGINT: consuming stopped for good.
    stopping: AtomicBool,
    /// The API answered a request of ours (the attribute names, a probe or
    /// a batch): the credentials and the domain work.
    api_answered: AtomicBool,
    /// Why the API has not answered yet, when a request failed.
    api_failing: Mutex<Option<String>>,
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
        if !self.api_answered.load(Ordering::Relaxed) {
            let why = lock(&self.api_failing).clone();
            return Err(match why {
                Some(why) => format!("the API has not accepted a request yet: {why}"),
                None => "the API has not answered yet".into(),
            });
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

    /// What the worker is doing, for `/healthz` (docs/metrics.md):
    /// `connecting` (the broker not reached, or lost), `starting`
    /// (connected, declaring and registering its consumer), `standby`,
    /// `active`, `stopping` (after SIGTERM).
    pub(crate) fn role(&self) -> &'static str {
        if self.stopping.load(Ordering::Relaxed) {
            "stopping"
        } else if !self.connected.load(Ordering::Relaxed) {
            "connecting"
        } else if self.is_active() {
            "active"
        } else if self.consuming.load(Ordering::Relaxed) {
            "standby"
        } else {
            "starting"
        }
    }

    /// Whether the API has accepted a request of this worker.
    pub(crate) fn has_api_answered(&self) -> bool {
        self.api_answered.load(Ordering::Relaxed)
    }

    /// The API accepted a request: ready as far as the API goes.
    pub(crate) fn api_answered(&self) {
        self.api_answered.store(true, Ordering::Relaxed);
        *lock(&self.api_failing) = None;
    }

    /// A request meant to show that the API works failed, for `why`; not
    /// ready until one succeeds (an earlier success stands).
    pub(crate) fn api_failing(&self, why: String) {
        if !self.api_answered.load(Ordering::Relaxed) {
            *lock(&self.api_failing) = Some(why);
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
        lock(&self.dead_letters_failing).clone()
    }

    /// A dead-letter publish failed (`Some(why)`) or succeeded (`None`).
    pub(crate) fn dead_letters_failing(&self, why: Option<String>) {
        *lock(&self.dead_letters_failing) = why;
    }

    /// A session's consumer is registered: count the session and report consuming.
    pub(crate) fn session_started(&self) {
        self.consuming.store(true, Ordering::Relaxed);
        self.sessions.fetch_add(1, Ordering::Relaxed);
    }

    /// Consuming stopped for shutdown (the connection may still be up).
    pub(crate) fn stopped_consuming(&self) {
        self.stopping.store(true, Ordering::Relaxed);
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
    pub(crate) fn paused(&self, code: i64, message: &str) {
        self.paused_code.store(code, Ordering::Relaxed);
        *lock(&self.paused_message) = message.to_string();
        self.paused.store(true, Ordering::Relaxed);
    }

    /// The misconfigured code and the API's message, while paused.
    pub fn pause(&self) -> Option<(i64, String)> {
        self.is_paused().then(|| {
            (
                self.paused_code.load(Ordering::Relaxed),
                lock(&self.paused_message).clone(),
            )
        })
    }

    /// The broker node connected to (`host:port`), while connected.
    pub fn node(&self) -> Option<String> {
        if !self.connected.load(Ordering::Relaxed) {
            return None;
        }
        lock(&self.node).clone()
    }

    /// The node of a new session: its URL (the password is dropped here).
    pub(crate) fn set_node(&self, url: &crate::config::AmqpUrl) {
        let shown = url::Url::parse(&url.redacted()).ok().map(|u| {
            let host = u.host_str().unwrap_or("?");
            match u.port() {
                Some(p) => format!("{host}:{p}"),
                None => host.to_string(),
            }
        });
        *lock(&self.node) = shown;
    }

    /// The API accepts requests again.
    pub(crate) fn resumed(&self) {
        self.paused.store(false, Ordering::Relaxed);
        self.api_answered();
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

/// A poisoned lock still holds a complete value (each write is one store).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_reasons() {
        let h = Health::default();
        assert!(h.readiness().unwrap_err().contains("not connected"));
        assert_eq!(h.role(), "connecting");
        h.set_connected(true);
        assert!(h.readiness().unwrap_err().contains("not consuming"));
        assert_eq!(h.role(), "starting");
        h.session_started();
        // Consuming, but the API has not answered: not ready, with the reason.
        assert_eq!(h.readiness().unwrap_err(), "the API has not answered yet");
        h.api_failing("ErrorCode 70005: usersig signature mismatch".into());
        let why = h.readiness().unwrap_err();
        assert!(
            why.contains("not accepted a request yet") && why.contains("70005"),
            "{why}"
        );
        h.api_answered();
        assert!(h.readiness().is_ok());
        // A later failure does not undo a success (the worker has shown the API works).
        h.api_failing("timeout".into());
        assert!(h.readiness().is_ok());
        // A standby is ready; it says so in its role.
        assert_eq!(h.role(), "standby");
        h.set_active(true);
        assert_eq!(h.role(), "active");
        assert_eq!(h.sessions(), 1);
        h.paused(90009, "invalid sdkappid");
        assert!(h.readiness().unwrap_err().contains("90009"));
        assert_eq!(h.pause(), Some((90009, "invalid sdkappid".into())));
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
        // Lost: connecting again, not a standby.
        h.set_connected(false);
        assert_eq!(h.role(), "connecting");
        assert!(h.readiness().unwrap_err().contains("not connected"));
        h.set_connected(true);
        h.session_started();
        h.stopped_consuming();
        assert_eq!(h.role(), "stopping");
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

    /// A paused worker that probes successfully has shown that the API works.
    #[test]
    fn a_successful_probe_counts_as_an_answer() {
        let h = Health::default();
        h.set_connected(true);
        h.session_started();
        h.paused(90009, "invalid sdkappid");
        h.resumed();
        assert!(h.readiness().is_ok());
    }
}
