//! Counting a classic or quorum queue (a legacy dead-letter queue, a
//! migration's staging queue) without reading it.

use anyhow::Context;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::Channel;

/// Ready messages and consumers of `queue` (a passive declare). On a stream
/// the count lags by seconds: read its last offset instead.
pub async fn count(ch: &Channel, queue: &str) -> anyhow::Result<(u32, u32)> {
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("inspecting queue {queue}"))?;
    Ok((q.message_count(), q.consumer_count()))
}
