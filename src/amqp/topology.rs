//! Declaring the topology (docs/operations.md, docs/several-workers.md).

use anyhow::Context;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection, ExchangeKind};

use crate::amqp::inbox;
use crate::config::AmqpConfig;

// Connecting lives in `connect`; these stay reachable here for callers.
pub use super::connect::{connect, ConnectError};

/// Opens a channel in publisher-confirm mode.
pub async fn confirm_channel(conn: &Connection) -> anyhow::Result<Channel> {
    let ch = conn.create_channel().await.context("opening a channel")?;
    ch.confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .context("enabling publisher confirms")?;
    Ok(ch)
}

/// Declares both exchanges and queues and their bindings, idempotently
/// (`imattr run` and `imattr declare`). The dead-letter queue is declared on
/// a channel of its own from `conn` (see [`declare_dead_letter_queue`]); the
/// rest on `channel`.
pub(crate) async fn declare(
    conn: &Connection,
    channel: &Channel,
    cfg: &AmqpConfig,
) -> anyhow::Result<()> {
    declare_for_tools(conn, channel, cfg).await?;
    let durable_queue = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(
            cfg.queue.as_str().into(),
            durable_queue,
            queue_arguments(cfg),
        )
        .await
        .map_err(|e| match QueueMismatch::from_error(&cfg.queue, &e) {
            Some(m) => anyhow::Error::new(m),
            None => anyhow::Error::new(e).context(format!("declaring queue {}", cfg.queue)),
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

/// What the `dlq` tools need: both exchanges and the dead-letter queue, but
/// never the updates queue, which only `run` and `declare` create (a tool run
/// with a mistyped `amqp.queue` must not leave a queue collecting a copy of
/// every update).
pub(crate) async fn declare_for_tools(
    conn: &Connection,
    channel: &Channel,
    cfg: &AmqpConfig,
) -> anyhow::Result<()> {
    let durable_exchange = ExchangeDeclareOptions {
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
    declare_dead_letter_queue(conn, cfg).await?;
    declare_exchange(channel, &cfg.exchange).await
}

/// Declares the updates exchange `name` (durable, fanout), all a publisher
/// needs: whatever queues are bound to it are the operator's business.
pub(crate) async fn declare_exchange(channel: &Channel, name: &str) -> anyhow::Result<()> {
    channel
        .exchange_declare(
            name.into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("declaring exchange {name}"))
}

/// Declares the dead-letter queue and binds it, on a channel of its own: a
/// refusal closes the channel, and two refusals must not stop a worker
/// (docs/several-workers.md, "A RabbitMQ cluster"): a classic dead-letter
/// queue declared before it became quorum with the updates queue, and a
/// classic one whose node is down. Both leave the queue and its binding as
/// they are, with a warning.
async fn declare_dead_letter_queue(conn: &Connection, cfg: &AmqpConfig) -> anyhow::Result<()> {
    let ch = conn.create_channel().await.context("opening a channel")?;
    let durable_queue = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let declared = ch
        .queue_declare(
            cfg.dead_letter_queue.as_str().into(),
            durable_queue,
            dead_letter_queue_arguments(cfg),
        )
        .await;
    // A stream: the exchange feeds the inbox. A queue from an earlier
    // release: the exchange feeds it, as it always did.
    let (ch, bound) = match declared {
        Ok(_) => {
            let inbox = inbox::inbox_name(&cfg.dead_letter_queue);
            let declared = ch
                .queue_declare(inbox.as_str().into(), durable_queue, inbox_arguments(cfg))
                .await;
            match declared {
                Ok(_) => (ch, inbox),
                // Declared with the other queue type before `amqp.queue_type`
                // changed: it works as it is (the refusal closed the channel).
                Err(e) if is_type_mismatch(&e) => {
                    tracing::warn!(queue = %inbox, reason = %e, "The dead-letter inbox exists with another queue type; keeping it");
                    (
                        conn.create_channel().await.context("opening a channel")?,
                        inbox,
                    )
                }
                Err(e) => {
                    return Err(anyhow::Error::new(e).context(format!("declaring queue {inbox}")))
                }
            }
        }
        Err(e) => {
            let refusal = match e.kind() {
                lapin::ErrorKind::ProtocolError(p) => {
                    tolerated_refusal(p.get_id(), p.get_message().as_str())
                }
                _ => None,
            };
            return match refusal {
                Some(why) => {
                    tracing::warn!(queue = %cfg.dead_letter_queue, reason = %e, "{why}");
                    Ok(())
                }
                None => Err(anyhow::Error::new(e)
                    .context(format!("declaring queue {}", cfg.dead_letter_queue))),
            };
        }
    };
    ch.queue_bind(
        bound.as_str().into(),
        cfg.dead_letter_exchange.as_str().into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .with_context(|| format!("binding queue {bound}"))?;
    let _ = ch.close(200, "declared".into()).await;
    Ok(())
}

/// (messages ready, consumers) of `queue` from a passive declare; None when
/// it does not exist (404). Any other refusal is an error.
pub(crate) async fn queue_counts(
    conn: &Connection,
    queue: &str,
) -> anyhow::Result<Option<(u32, u32)>> {
    let probe = conn.create_channel().await.context("opening a channel")?;
    let declared = probe
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    match declared {
        Ok(q) => {
            let _ = probe.close(200, "checked".into()).await;
            Ok(Some((q.message_count(), q.consumer_count())))
        }
        Err(e) => match e.kind() {
            // The refusal closed the channel.
            lapin::ErrorKind::ProtocolError(p) if p.get_id() == 404 => Ok(None),
            _ => Err(anyhow::Error::new(e).context(format!("looking at queue {queue}"))),
        },
    }
}

/// Whether a declaration was refused for another `x-queue-type`.
fn is_type_mismatch(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(p)
        if p.get_id() == 406 && p.get_message().as_str().contains("inequivalent arg 'x-queue-type'"))
}

/// The inbox's arguments: quorum like the updates queue (replicated in a
/// cluster), classic otherwise; never a delivery limit of imattr's own.
pub fn inbox_arguments(cfg: &AmqpConfig) -> FieldTable {
    let mut args = FieldTable::default();
    if cfg.queue_type != crate::config::QueueType::Classic {
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from(cfg.queue_type.as_str())),
        );
    }
    args
}

/// The dead-letter queue's arguments: a stream, whatever the updates queue
/// is. A stream is replicated like a quorum queue, is read by offset without
/// taking anything off it, and has no delivery limit, so reading dead letters
/// can never make the broker drop them (docs/dead-letters.md, "The store").
pub fn dead_letter_queue_arguments(_cfg: &AmqpConfig) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("stream")),
    );
    args
}

/// What the dead-letter queue is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreKind {
    /// A stream: what the `dlq` commands read.
    Stream,
    /// A classic or quorum queue from an earlier release: the worker still
    /// dead-letters into it, and `imattr dlq migrate` turns it into a stream.
    Legacy {
        /// The broker's refusal, which names the queue's current type.
        detail: String,
    },
}

/// Declares the dead-letter queue as a stream on a channel of its own and
/// says what it is: an existing classic or quorum queue is [`StoreKind::Legacy`].
pub async fn dead_letter_store_kind(
    conn: &Connection,
    cfg: &AmqpConfig,
) -> anyhow::Result<StoreKind> {
    let ch = conn.create_channel().await.context("opening a channel")?;
    let declared = ch
        .queue_declare(
            cfg.dead_letter_queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            dead_letter_queue_arguments(cfg),
        )
        .await;
    match declared {
        Ok(_) => {
            let _ = ch.close(200, "declared".into()).await;
            Ok(StoreKind::Stream)
        }
        Err(e) => {
            match e.kind() {
                lapin::ErrorKind::ProtocolError(p)
                    if p.get_id() == 406
                        && p.get_message()
                            .as_str()
                            .contains("inequivalent arg 'x-queue-type'") =>
                {
                    Ok(StoreKind::Legacy {
                        detail: p.get_message().as_str().to_string(),
                    })
                }
                _ => Err(anyhow::Error::new(e)
                    .context(format!("declaring queue {}", cfg.dead_letter_queue))),
            }
        }
    }
}

/// Which refusals of the dead-letter queue's declaration leave it as it is
/// (with the warning returned) instead of failing: another queue type (a
/// classic queue from before `amqp.queue_type = quorum`), or a classic
/// queue's node down (`NOT_FOUND - home node … is down or inaccessible`).
/// Anything else, e.g. another dead-letter argument, still fails.
pub fn tolerated_refusal(code: u16, text: &str) -> Option<&'static str> {
    match code {
        406 if text.contains("inequivalent arg 'x-queue-type'") => Some(
            "The dead-letter queue exists as a classic or quorum queue from an earlier release; keeping it. The dlq commands need a stream: run `imattr dlq migrate` (docs/dead-letters.md)",
        ),
        404 if text.contains("is down or inaccessible") => Some(
            "The dead-letter queue's node is down; going on without declaring it (dead-lettering may fail until the node is back)",
        ),
        _ => None,
    }
}

/// The updates queue's arguments: dead-letter exchange, queue type and, with
/// `single_active_consumer`, `x-single-active-consumer`.
pub(crate) fn queue_arguments(cfg: &AmqpConfig) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from(cfg.dead_letter_exchange.as_str())),
    );
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from(cfg.queue_type.as_str())),
    );
    if cfg.single_active_consumer {
        args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    }
    args
}

/// The updates queue already exists with other arguments than ours; the
/// broker refused the declaration (`imattr run` exits with status 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueMismatch {
    /// The queue's name.
    pub(crate) queue: String,
    /// The argument that differs, e.g. `x-single-active-consumer`.
    pub(crate) argument: String,
    /// Its value on the broker, as the broker words it (`not set`: absent).
    pub(crate) current: String,
    /// The value we asked for, as the broker words it (`not set`: absent).
    pub(crate) wanted: String,
    /// Which setting to change to match the existing queue.
    pub(crate) hint: String,
}

impl std::fmt::Display for QueueMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let on_broker = match self.current.as_str() {
            NOT_SET => "is not set on the broker".to_string(),
            v => format!("is {v} on the broker"),
        };
        let asked = match self.wanted.as_str() {
            NOT_SET => "the configuration does not set it".to_string(),
            v => format!("the configuration sets it to {v}"),
        };
        write!(
            f,
            "queue {} already exists with other arguments: {} {on_broker}, but {asked}. \
             Either configure imattr like the queue ({}) or migrate the queue as \
             docs/several-workers.md (\"Migrating a queue\") describes: declare a new queue \
             with the wanted arguments next to it (imattr declare), drain the old one, delete it",
            self.queue, self.argument, self.hint
        )
    }
}

impl std::error::Error for QueueMismatch {}

/// How [`QueueMismatch`] words an absent argument.
const NOT_SET: &str = "not set";

/// With `amqp.single_active_consumer = false` the worker consumes
/// exclusively, and the broker refused: another consumer holds the queue
/// (another worker, or this worker's previous connection that the broker
/// has not closed yet). The worker waits and tries again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "queue {queue} is consumed by another consumer, and without single-active-consumer this worker consumes exclusively (one worker only; docs/several-workers.md): waiting for the other consumer to go away ({text})"
)]
pub struct QueueBusy {
    /// The queue's name.
    pub(crate) queue: String,
    /// The broker's reply text.
    pub(crate) text: String,
}

impl QueueBusy {
    /// The refusal of the consume lock or of an exclusive `basic.consume`
    /// of `queue`, if that is what `err` is (see [`is_busy_refusal`]).
    pub(crate) fn from_error(queue: &str, err: &lapin::Error) -> Option<QueueBusy> {
        match err.kind() {
            lapin::ErrorKind::ProtocolError(e)
                if is_busy_refusal(e.get_id(), e.get_message().as_str()) =>
            {
                Some(QueueBusy {
                    queue: queue.to_string(),
                    text: e.get_message().as_str().to_string(),
                })
            }
            _ => None,
        }
    }
}

/// Whether the broker's refusal (`code`, reply `text`) means that another
/// connection consumes the queue: 405 RESOURCE_LOCKED on the consume lock
/// (an exclusive queue another connection declared), or 403 ACCESS_REFUSED
/// "… in exclusive use" on `basic.consume`. Any other 403 (the user may not
/// read the queue, say) is a real error, retried with backoff and logged.
pub(crate) fn is_busy_refusal(code: u16, text: &str) -> bool {
    match code {
        405 => true,
        403 => text.contains("in exclusive use"),
        _ => false,
    }
}

/// The name of the consume lock of `queue` (`<queue>.lock`).
pub(crate) fn consume_lock_name(queue: &str) -> String {
    format!("{queue}.lock")
}

/// Takes the consume lock of `queue` for the connection of `channel`: an
/// exclusive queue named `<queue>.lock`, which the broker gives to one
/// connection at a time and deletes when that connection is gone. Without
/// single-active-consumer this is what keeps a second consumer off the queue
/// on every queue type: a quorum queue does not enforce exclusive consumers,
/// and two workers counting consumers at the same moment both count none
/// (docs/several-workers.md). Held by another connection: [`QueueBusy`]
/// (the broker also closes `channel`).
pub(crate) async fn take_consume_lock(channel: &Channel, queue: &str) -> anyhow::Result<()> {
    let lock = consume_lock_name(queue);
    channel
        .queue_declare(
            lock.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map(drop)
        .map_err(|e| match QueueBusy::from_error(queue, &e) {
            Some(busy) => anyhow::Error::new(busy),
            None => anyhow::Error::new(e).context(format!("declaring the consume lock {lock}")),
        })
}

impl QueueMismatch {
    /// The mismatch in a refused declaration of `queue`, if that is what `err` is.
    pub(crate) fn from_error(queue: &str, err: &lapin::Error) -> Option<QueueMismatch> {
        match err.kind() {
            lapin::ErrorKind::ProtocolError(e) if e.get_id() == 406 => {
                Self::parse(queue, e.get_message().as_str())
            }
            _ => None,
        }
    }

    /// Reads the broker's reply text, e.g. `PRECONDITION_FAILED - inequivalent
    /// arg 'x-single-active-consumer' for queue 'q' in vhost '/': received none
    /// but current is the value 'true' of type 'bool'`.
    pub(crate) fn parse(queue: &str, text: &str) -> Option<QueueMismatch> {
        let rest = text.split_once("inequivalent arg '")?.1;
        let (argument, rest) = rest.split_once('\'')?;
        let rest = rest.split_once(": received ")?.1;
        let (received, current) = rest.split_once(" but current is ")?;
        let argument = argument.to_string();
        let hint = match argument.as_str() {
            "x-single-active-consumer" => "set amqp.single_active_consumer to match".into(),
            "x-queue-type" => "set amqp.queue_type to match".into(),
            "x-dead-letter-exchange" => "set amqp.dead_letter_exchange to match".into(),
            other => format!("imattr does not set {other}; remove it from the queue"),
        };
        Some(QueueMismatch {
            queue: queue.to_string(),
            argument,
            current: broker_value(current),
            wanted: broker_value(received),
            hint,
        })
    }
}

/// `the value 'true' of type 'bool'` → `true`; `none` → `not set`.
fn broker_value(text: &str) -> String {
    let t = text.trim();
    if t == "none" {
        return NOT_SET.into();
    }
    match t
        .strip_prefix("the value '")
        .and_then(|v| v.split_once("' of type"))
    {
        Some((v, _)) => v.to_string(),
        None => t.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::QueueType;

    #[test]
    fn only_exclusive_use_means_busy() {
        let cases = [
            (405, "RESOURCE_LOCKED - cannot obtain exclusive access to locked queue 'q.lock' in vhost '/'", true),
            (403, "ACCESS_REFUSED - queue 'q' in vhost '/' in exclusive use", true),
            (403, "ACCESS_REFUSED - access to queue 'q' in vhost '/' refused for user 'u'", false),
            (404, "NOT_FOUND - no queue 'q' in vhost '/'", false),
            (406, "PRECONDITION_FAILED - in exclusive use", false),
        ];
        for (code, text, busy) in cases {
            assert_eq!(is_busy_refusal(code, text), busy, "{code} {text}");
        }
        assert_eq!(consume_lock_name("imattr.updates"), "imattr.updates.lock");
    }

    #[test]
    fn refused_declarations_name_the_argument() {
        let cases = [
            (
                "PRECONDITION_FAILED - inequivalent arg 'x-single-active-consumer' for queue 'q' in vhost '/': received the value 'true' of type 'bool' but current is none",
                "x-single-active-consumer", "not set", "true", "amqp.single_active_consumer",
            ),
            (
                "PRECONDITION_FAILED - inequivalent arg 'x-single-active-consumer' for queue 'q' in vhost '/': received none but current is the value 'true' of type 'bool'",
                "x-single-active-consumer", "true", "not set", "amqp.single_active_consumer",
            ),
            (
                "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'q' in vhost '/': received the value 'quorum' of type 'longstr' but current is the value 'classic' of type 'longstr'",
                "x-queue-type", "classic", "quorum", "amqp.queue_type",
            ),
            (
                "PRECONDITION_FAILED - inequivalent arg 'x-dead-letter-exchange' for queue 'q' in vhost '/': received the value 'imattr.dead' of type 'longstr' but current is the value 'other' of type 'longstr'",
                "x-dead-letter-exchange", "other", "imattr.dead", "amqp.dead_letter_exchange",
            ),
            (
                "PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue 'q' in vhost '/': received none but current is the value '10' of type 'long'",
                "x-max-length", "10", "not set", "does not set x-max-length",
            ),
        ];
        for (text, arg, current, wanted, hint) in cases {
            let m = QueueMismatch::parse("q", text).unwrap();
            assert_eq!(
                (m.argument.as_str(), m.current.as_str(), m.wanted.as_str()),
                (arg, current, wanted),
                "{text}"
            );
            let msg = m.to_string();
            assert!(
                msg.contains("queue q ") && msg.contains(arg) && msg.contains(hint),
                "{msg}"
            );
            assert!(msg.contains("Migrating a queue"), "{msg}");
            // Absent values read as words, never as "asks for not set".
            assert!(
                !msg.contains("for not set") && !msg.contains("is not set,"),
                "{msg}"
            );
            if wanted == "not set" {
                assert!(msg.contains("the configuration does not set it"), "{msg}");
            } else {
                assert!(
                    msg.contains(&format!("the configuration sets it to {wanted}")),
                    "{msg}"
                );
            }
            if current == "not set" {
                assert!(
                    msg.contains(&format!("{arg} is not set on the broker")),
                    "{msg}"
                );
            }
        }
        for other in [
            "PRECONDITION_FAILED - unknown delivery tag 5",
            "ACCESS_REFUSED - access to queue 'q' in vhost '/' refused",
            "",
        ] {
            assert_eq!(QueueMismatch::parse("q", other), None, "{other}");
        }
    }

    #[test]
    fn the_dead_letter_queue_is_a_stream_whatever_the_updates_queue_is() {
        for t in [QueueType::Classic, QueueType::Quorum] {
            let cfg = AmqpConfig {
                queue_type: t,
                ..AmqpConfig::default()
            };
            assert_eq!(
                dead_letter_queue_arguments(&cfg)
                    .inner()
                    .get("x-queue-type"),
                Some(&AMQPValue::LongString(LongString::from("stream")))
            );
        }
    }

    #[test]
    fn some_refusals_of_the_dead_letter_queue_are_tolerated() {
        let cases = [
            (406, "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'd' in vhost '/': received the value 'quorum' of type 'longstr' but current is none", true),
            (404, "NOT_FOUND - home node 'rabbit@rmq1' of durable queue 'd' in vhost '/' is down or inaccessible", true),
            (406, "PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue 'd' in vhost '/': received none but current is the value '10' of type 'long'", false),
            (403, "ACCESS_REFUSED - access to queue 'd' in vhost '/' refused for user 'u'", false),
            (404, "NOT_FOUND - no queue 'd' in vhost '/'", false),
            (405, "RESOURCE_LOCKED - cannot obtain exclusive access to locked queue 'd' in vhost '/'", false),
        ];
        for (code, text, tolerated) in cases {
            assert_eq!(
                tolerated_refusal(code, text).is_some(),
                tolerated,
                "{code} {text}"
            );
        }
    }

    #[test]
    fn single_active_consumer_is_an_argument_when_on() {
        let mut cfg = AmqpConfig::default();
        assert_eq!(
            queue_arguments(&cfg)
                .inner()
                .get("x-single-active-consumer"),
            Some(&AMQPValue::Boolean(true))
        );
        cfg.single_active_consumer = false;
        assert!(!queue_arguments(&cfg)
            .inner()
            .contains_key("x-single-active-consumer"));
    }
}
