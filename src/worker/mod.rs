//! `imattr run`: RabbitMQ → validated, coalesced batches → `im_set_attr`,
//! with each delivery acknowledged only after its outcome (docs/design.md).
//!
//! - this module: the run loop — connect, run one `session`, learn how it
//!   ended, reconnect with backoff;
//! - `session`: one broker session's event loop, which owns all mutable
//!   state (deliveries, coalescer, ack tracker) and only moves data;
//! - `batch`: one batch run to its end (send, retry, split, bisect), in its
//!   own task, reporting one outcome per (delivery, account).
//!
//! The decisions live in pure code: [`crate::update`], [`crate::coalesce`],
//! `crate::amqp::consume`, `crate::tencent::errors` and `batch::next_step`.

mod batch;
mod session;

use std::sync::Arc;
use std::time::Duration;

use backoff::backoff::Backoff;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::amqp::connect::connect_gated;
use crate::amqp::deadletter::DeadLetterPublisher;
use crate::amqp::nodes::Nodes;
use crate::amqp::readgate::ReadGate;
use crate::amqp::topology::{QueueBusy, QueueMismatch};
use crate::attrnames::AttrNames;
use crate::coalesce::BatchCap;
use crate::config::Config;
use crate::tencent::Client;
use crate::wait::{backoff_forever, sleep_unless_cancelled};

pub use crate::health::Health;
use session::Session;

/// Runs the daemon until `cancel`, reconnecting to the broker as needed.
pub async fn run(
    config: Config,
    cancel: CancellationToken,
    health: Arc<Health>,
) -> anyhow::Result<()> {
    config.validate_api()?;
    // One connection for dead letters per process, whatever the sessions.
    let dead_letters = Arc::new(DeadLetterPublisher::new(
        &config.amqp,
        format!(
            "imattr dead letters {} pid {}",
            config.amqp.queue,
            std::process::id()
        ),
    ));
    // What the broker dead-letters lands in the inbox; this moves it into the store.
    let sweep_stop = cancel.child_token();
    let sweeper = tokio::spawn(crate::amqp::inbox::sweep_every(
        config.amqp.clone(),
        crate::amqp::inbox::SWEEP_EVERY,
        sweep_stop.clone(),
    ));
    let result = run_sessions(&config, &cancel, &health, &dead_letters).await;
    sweep_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(2), sweeper).await;
    dead_letters.close(Duration::from_secs(1)).await;
    result
}

/// Connects and runs one session after another until `cancel`.
async fn run_sessions(
    config: &Config,
    cancel: &CancellationToken,
    health: &Arc<Health>,
    dead_letters: &Arc<DeadLetterPublisher>,
) -> anyhow::Result<()> {
    let client = Client::from_config(config)?;
    let names = if config.attributes.allowed.is_empty() {
        match AttrNames::from_api(&client, health, cancel).await {
            Some(names) => names,
            None => return Ok(()),
        }
    } else {
        AttrNames::fixed(&config.attributes.allowed, &client, health, cancel)
    };
    let cap = Arc::new(BatchCap::new(config.batch.max_accounts));
    // The pid tells several workers' connections apart (`rabbitmqctl
    // list_connections client_properties`).
    let conn_name = format!(
        "imattr run {} pid {}",
        config.amqp.queue,
        std::process::id()
    );
    // Cluster nodes, one per attempt: after losing a node, try the next.
    let mut nodes = Nodes::new(&config.amqp);
    let mut reconnect = backoff_forever(Duration::from_millis(500), Duration::from_secs(30));
    let mut failing_since: Option<Instant> = None;
    // Whether "cannot consume yet" (an exclusive consumer refused) was said.
    let mut busy_said = false;
    let close_timeout = Duration::from_secs(config.shutdown.timeout_secs);
    loop {
        if cancel.is_cancelled() {
            return Ok(());
        }
        let (node, node_cfg) = nodes.next_node();
        // A new gate per connection: nothing of the last session is held.
        let gate = ReadGate::new(config.amqp.max_held_bytes);
        let conn = tokio::select! {
            c = connect_gated(node_cfg, &conn_name, Some(gate.clone())) => c,
            _ = cancel.cancelled() => return Ok(()),
        };
        let node_url = node_cfg.url.clone();
        let outcome = match conn {
            Err(e) => {
                if failing_since.is_none() {
                    warn!(error = %e, "Cannot reach RabbitMQ; retrying with backoff");
                    failing_since = Some(Instant::now());
                } else {
                    debug!(error = %e, "Still cannot reach RabbitMQ");
                }
                None
            }
            Ok(conn) => {
                // Shared with the dead-letter publisher, which reopens its channel on it.
                let conn = Arc::new(conn);
                if let Some(since) = failing_since.take() {
                    info!(
                        down_secs = since.elapsed().as_secs(),
                        node,
                        url = %node_url,
                        "Connected to RabbitMQ again"
                    );
                } else {
                    info!(node, url = %node_url, queue = %config.amqp.queue, "Connected to RabbitMQ");
                }
                reconnect.reset();
                health.set_node(&node_cfg.url);
                health.set_connected(true);
                dead_letters
                    .use_node(node_cfg, Duration::from_secs(1))
                    .await;
                let session = Session::start(
                    config,
                    &conn,
                    gate.clone(),
                    dead_letters.clone(),
                    client.clone(),
                    names.clone(),
                    cap.clone(),
                    health.clone(),
                )
                .await;
                let end = match session {
                    Ok(s) => s.run(cancel.clone()).await,
                    Err(e) if e.downcast_ref::<QueueMismatch>().is_some() => {
                        // Retrying cannot help: the operator must migrate the
                        // queue or change the configuration.
                        health.set_connected(false);
                        let _ = conn.close(200, "imattr stopping".into()).await;
                        return Err(e);
                    }
                    Err(e) => Err(e),
                };
                health.set_connected(false);
                // The session is over and holds nothing: read on, or the
                // broker's close-ok could wait behind deliveries not taken
                // (with single-active-consumer the broker keeps delivering
                // while the session drains) and the close would time out.
                gate.open_for_good();
                if conn.status().connected() {
                    // Bounded: a broker that does not answer must not hold up
                    // the exit; at shutdown by what is left of its deadline.
                    let close_by = match &end {
                        Ok(End::Shutdown(deadline)) => *deadline,
                        // A broker that stopped answering will not answer this.
                        Ok(End::Lost(_)) => Instant::now() + Duration::from_secs(1),
                        Err(_) => Instant::now() + close_timeout,
                    };
                    let close = conn.close(200, "imattr stopping".into());
                    if tokio::time::timeout_at(close_by, close).await.is_err() {
                        warn!("The broker did not confirm closing the connection in time");
                    }
                }
                Some(end)
            }
        };
        if matches!(outcome, Some(Ok(_))) {
            busy_said = false;
        }
        match outcome {
            Some(Ok(End::Shutdown(_))) => {
                info!("Stopped");
                return Ok(());
            }
            Some(Ok(End::Lost(why))) => {
                metrics::counter!("imattr_broker_reconnects_total").increment(1);
                warn!(reason = %why, "Lost the broker session; unacked messages will be redelivered; reconnecting");
            }
            Some(Err(e)) if e.downcast_ref::<QueueBusy>().is_some() => {
                // Expected for a while after losing a connection the broker
                // has not closed yet: say it once per episode.
                if !busy_said {
                    warn!(error = %e, "Cannot consume yet; retrying");
                    busy_said = true;
                } else {
                    debug!(error = %e, "Still cannot consume");
                }
                if !sleep_unless_cancelled(Duration::from_secs(1), cancel).await {
                    return Ok(());
                }
                continue;
            }
            Some(Err(e)) => {
                metrics::counter!("imattr_broker_reconnects_total").increment(1);
                error!(
                    error = format!("{e:#}"),
                    "Broker session failed; reconnecting"
                );
            }
            None => {}
        }
        let wait = reconnect.next_backoff().unwrap_or(Duration::from_secs(30));
        if !sleep_unless_cancelled(wait, cancel).await {
            return Ok(());
        }
    }
}

/// How a session ended (an `Err` from the session: it could not start, or
/// the broker refused something on the way; both reconnect).
enum End {
    /// Shutdown requested and done (or timed out), with its deadline (the
    /// connection's close is bounded by it too).
    Shutdown(Instant),
    /// The channel, connection or consumer went away.
    Lost(String),
}
