//! The dead-letter inbox: where the dead-letter exchange delivers.
//!
//! The dead-letter store is a stream, and RabbitMQ 3.10 silently drops a
//! message that its own dead-lettering (a publisher's TTL, a max-length, a
//! quorum queue's delivery limit) routes to a stream. So the dead-letter
//! exchange is bound to an ordinary queue, `<dlq>.inbox`, and a sweeper
//! moves what lands there into the stream: copy published with confirms,
//! then the original acknowledged, one at a time. Nothing is ever returned
//! to the inbox on purpose, so a delivery limit on it only counts the
//! sweeper's crashes; a crash between the confirm and the ack leaves one
//! copy twice in the store. imattr's own dead letters go straight to the
//! stream; the inbox holds only what the broker (or another publisher)
//! sends to the dead-letter exchange, so it is empty most of the time.

use std::time::Duration;

use anyhow::Context;
use lapin::options::{BasicAckOptions, BasicGetOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Connection};
use tokio_util::sync::CancellationToken;

use crate::amqp::deadletter::publish_confirmed;
use crate::amqp::{headerblob, topology};
use crate::config::AmqpConfig;

/// How often `imattr run` sweeps the inbox.
pub const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// The inbox of the dead-letter queue `dlq`.
pub fn inbox_name(dlq: &str) -> String {
    format!("{dlq}.inbox")
}

/// Moves the messages now in the inbox into the dead-letter stream, oldest
/// first; returns how many. No inbox (a dead-letter queue
/// from an earlier release, not yet migrated): 0.
pub async fn sweep(
    conn: &Connection,
    cfg: &AmqpConfig,
    cancel: &CancellationToken,
) -> anyhow::Result<u64> {
    let inbox = inbox_name(&cfg.dead_letter_queue);
    // No inbox: a dead-letter queue from an earlier release. No stream (not
    // declared yet, or being migrated): nothing to move into, and a copy that
    // fails would hand the message back, which a quorum inbox counts.
    let Some(waiting) = topology::queue_counts(conn, &inbox).await?.map(|(m, _)| m) else {
        return Ok(0);
    };
    if waiting == 0
        || topology::queue_counts(conn, &cfg.dead_letter_queue)
            .await?
            .is_none()
    {
        return Ok(0);
    }
    // A classic or quorum dead-letter queue from an earlier release takes its
    // dead letters from the exchange itself: nothing to move.
    if topology::dead_letter_store_kind(conn, cfg).await? != topology::StoreKind::Stream {
        return Ok(0);
    }
    let ch = conn.create_channel().await.context("opening a channel")?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .context("confirm mode")?;
    let mut moved = 0u64;
    // What was there at the start: a command's sweep ends even while the
    // broker keeps dead-lettering; the worker's next tick takes the rest.
    while !cancel.is_cancelled() && moved < u64::from(waiting) {
        let got = ch
            .basic_get(inbox.as_str().into(), BasicGetOptions { no_ack: false })
            .await
            .with_context(|| format!("reading {inbox}"))?;
        let Some(msg) = got else { break };
        let props = stored_properties(&msg.delivery.properties);
        publish_confirmed(&ch, "", &cfg.dead_letter_queue, &msg.delivery.data, props)
            .await
            .with_context(|| format!("moving a dead letter from {inbox} into the store"))?;
        msg.delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .with_context(|| format!("acknowledging a dead letter in {inbox}"))?;
        moved += 1;
    }
    let _ = ch.close(200, "swept".into()).await;
    if moved > 0 {
        tracing::info!(moved, inbox = %inbox, "Moved dead letters from the inbox into the store");
    }
    Ok(moved)
}

/// The properties of the stored copy: the content ones and the headers
/// (stream-safe), persistent; never `expiration` (the copy is the only one
/// left after the ack), `user_id` (refused from another user), `priority` or
/// `reply_to`, as for imattr's own dead letters.
pub(crate) fn stored_properties(p: &BasicProperties) -> BasicProperties {
    let headers = headerblob::for_stream(&p.headers().clone().unwrap_or_default());
    let mut out = BasicProperties::default()
        .with_headers(headers)
        .with_delivery_mode(2);
    if let Some(v) = p.content_type() {
        out = out.with_content_type(v.clone());
    }
    if let Some(v) = p.content_encoding() {
        out = out.with_content_encoding(v.clone());
    }
    if let Some(v) = p.message_id() {
        out = out.with_message_id(v.clone());
    }
    if let Some(v) = p.correlation_id() {
        out = out.with_correlation_id(v.clone());
    }
    if let Some(v) = p.timestamp() {
        out = out.with_timestamp(*v);
    }
    if let Some(v) = p.app_id() {
        out = out.with_app_id(v.clone());
    }
    if let Some(v) = p.kind() {
        out = out.with_type(v.clone());
    }
    out
}

/// `imattr run`'s sweeper: sweeps every [`SWEEP_EVERY`] on a connection of
/// its own until `cancel`; a failure is logged and retried at the next tick.
pub async fn sweep_every(cfg: AmqpConfig, every: Duration, cancel: CancellationToken) {
    let name = format!("imattr inbox sweeper pid {}", std::process::id());
    let mut conn: Option<Connection> = None;
    loop {
        let live = conn.as_ref().is_some_and(|c| c.status().connected());
        if !live {
            conn = tokio::select! {
                _ = cancel.cancelled() => break,
                c = crate::amqp::nodes::connect_first(&cfg, &name) => match c {
                    Ok(c) => Some(c),
                    Err(e) => {
                        tracing::debug!(error = %e, "Inbox sweeper cannot connect; trying again later");
                        None
                    }
                },
            };
        }
        if let Some(c) = &conn {
            tokio::select! {
                _ = cancel.cancelled() => break,
                r = sweep(c, &cfg, &cancel) => if let Err(e) = r {
                    tracing::warn!(error = format!("{e:#}"), "Sweeping the dead-letter inbox failed; trying again later");
                },
            }
        }
        if !crate::wait::sleep_unless_cancelled(every, &cancel).await {
            break;
        }
    }
    if let Some(c) = conn {
        let _ = tokio::time::timeout(Duration::from_secs(1), c.close(200, "stopping".into())).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{AMQPValue, FieldArray, FieldTable};

    #[test]
    fn the_stored_copy_never_expires_and_keeps_x_death() {
        let mut death = FieldTable::default();
        death.insert("reason".into(), AMQPValue::LongString("expired".into()));
        let mut h = FieldTable::default();
        h.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
        );
        let original = BasicProperties::default()
            .with_headers(h.clone())
            .with_expiration("1000".into())
            .with_user_id("someone".into())
            .with_message_id("m".into());
        let stored = stored_properties(&original);
        assert_eq!(*stored.expiration(), None);
        assert_eq!(*stored.user_id(), None);
        assert_eq!(*stored.delivery_mode(), Some(2));
        assert_eq!(stored.message_id().as_ref().map(|m| m.as_str()), Some("m"));
        let kept = stored.headers().clone().unwrap_or_default();
        assert!(
            kept.inner().get("x-death").is_none(),
            "a 3.10 stream would drop it"
        );
        assert_eq!(headerblob::restore(&kept), h);
    }
}
