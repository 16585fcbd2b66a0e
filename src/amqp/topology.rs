//! Declaring the topology (CONTRACT §7).

use anyhow::Context;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection, ExchangeKind};

use crate::config::AmqpConfig;

// Connecting lives in `connect`; these stay reachable here for callers.
pub use super::connect::{connect, ConnectError, START_HINT};

/// Opens a channel in publisher-confirm mode.
pub async fn confirm_channel(conn: &Connection) -> anyhow::Result<Channel> {
    let ch = conn.create_channel().await.context("opening a channel")?;
    ch.confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .context("enabling publisher confirms")?;
    Ok(ch)
}

/// Declares both exchanges and queues and their bindings, idempotently.
pub async fn declare(channel: &Channel, cfg: &AmqpConfig) -> anyhow::Result<()> {
    let durable_exchange = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let durable_queue = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .exchange_declare(
            cfg.dead_letter_exchange.as_str().into(),
            ExchangeKind::Fanout,
            durable_exchange,
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("declaring exchange {}", cfg.dead_letter_exchange))?;
    channel
        .queue_declare(
            cfg.dead_letter_queue.as_str().into(),
            durable_queue,
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("declaring queue {}", cfg.dead_letter_queue))?;
    channel
        .queue_bind(
            cfg.dead_letter_queue.as_str().into(),
            cfg.dead_letter_exchange.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("binding queue {}", cfg.dead_letter_queue))?;

    channel
        .exchange_declare(
            cfg.exchange.as_str().into(),
            ExchangeKind::Fanout,
            durable_exchange,
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("declaring exchange {}", cfg.exchange))?;
    let mut args = FieldTable::default();
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from(cfg.dead_letter_exchange.as_str())),
    );
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from(cfg.queue_type.as_str())),
    );
    channel
        .queue_declare(cfg.queue.as_str().into(), durable_queue, args)
        .await
        .with_context(|| {
            format!(
                "declaring queue {} (if it exists with other arguments, e.g. another x-queue-type, delete it or change amqp.queue)",
                cfg.queue
            )
        })?;
    channel
        .queue_bind(
            cfg.queue.as_str().into(),
            cfg.exchange.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("binding queue {}", cfg.queue))?;
    Ok(())
}
