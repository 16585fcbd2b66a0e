//! Waiting between attempts: the never-ending backoffs (reconnect, rate
//! limit, probe, dead-letter publish) and a sleep that shutdown cuts short.

use std::time::Duration;

use backoff::ExponentialBackoff;
use tokio_util::sync::CancellationToken;

/// Sleeps for `wait`; false (at once) if `cancel` fires first.
pub(crate) async fn sleep_unless_cancelled(wait: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(wait) => true,
        _ = cancel.cancelled() => false,
    }
}

/// An exponential backoff (with the crate's default jitter and factor) from
/// `initial` up to `max` between attempts, that never gives up.
pub(crate) fn backoff_forever(initial: Duration, max: Duration) -> ExponentialBackoff {
    ExponentialBackoff {
        initial_interval: initial,
        current_interval: initial,
        max_interval: max,
        max_elapsed_time: None,
        ..Default::default()
    }
}
