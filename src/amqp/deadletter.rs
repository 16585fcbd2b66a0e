//! Dead-letter copies: headers, properties and confirmed publishing.

use std::time::{SystemTime, UNIX_EPOCH};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection};

/// `x-imattr-reason`.
pub const H_REASON: &str = "x-imattr-reason";
/// `x-imattr-error-code`.
pub(crate) const H_ERROR_CODE: &str = "x-imattr-error-code";
/// `x-imattr-error`.
pub(crate) const H_ERROR: &str = "x-imattr-error";
/// `x-imattr-account`.
pub(crate) const H_ACCOUNT: &str = "x-imattr-account";
/// `x-imattr-attempts`.
pub(crate) const H_ATTEMPTS: &str = "x-imattr-attempts";
/// `x-imattr-failed-at`.
pub(crate) const H_FAILED_AT: &str = "x-imattr-failed-at";
/// `x-imattr-source-queue`.
pub(crate) const H_SOURCE_QUEUE: &str = "x-imattr-source-queue";
/// `x-imattr-original-routing-key`.
pub(crate) const H_ROUTING_KEY: &str = "x-imattr-original-routing-key";
/// `x-imattr-failed-accounts`: on the dead letter of a message holding several
/// accounts, an array of those that failed (the others were applied).
pub(crate) const H_FAILED_ACCOUNTS: &str = "x-imattr-failed-accounts";
/// `x-imattr-replays`: how many times `dlq replay` sent it back.
pub const H_REPLAYS: &str = "x-imattr-replays";

/// Why a confirmed publish did not go through.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PublishError {
    /// The channel or connection failed (the channel may be closed now).
    #[error("publishing failed: {0}")]
    Channel(#[from] lapin::Error),
    /// The publisher's own connection could not be opened.
    #[error("{0}")]
    Connect(String),
    /// The broker refused to take the message.
    #[error("the broker refused (nacked) the message")]
    Nacked,
    /// No queue is bound to the exchange: the broker returned the message.
    #[error(
        "{} routes the message to no queue ({code} {text})",
        exchange_name(exchange)
    )]
    Unroutable {
        /// The exchange published to.
        exchange: String,
        /// The broker's reply code (312 NO_ROUTE).
        code: u16,
        /// The broker's reply text.
        text: String,
    },
}

/// How an error names an exchange: the default one has no name.
fn exchange_name(exchange: &str) -> String {
    if exchange.is_empty() {
        "the default exchange".into()
    } else {
        format!("exchange {exchange}")
    }
}

/// Why a message was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// It broke a rule of docs/messages.md.
    InvalidMessage,
    /// The API rejected it.
    Rejected,
    /// Transient failures lasted past `retry.max_elapsed_secs`.
    RetriesExhausted,
}

impl Reason {
    /// The header value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Reason::InvalidMessage => "invalid-message",
            Reason::Rejected => "rejected",
            Reason::RetriesExhausted => "retries-exhausted",
        }
    }
}

/// What the dead-letter copy says about the failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Why.
    pub reason: Reason,
    /// The API's ErrorCode; 0 when imattr refused the message itself.
    pub code: i64,
    /// ErrorInfo, or the validation rule.
    pub error: String,
    /// The account that failed, when known.
    pub account: Option<String>,
    /// Requests made for it.
    pub attempts: u32,
}

/// Unix time now in milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// The properties of the dead-letter copy: persistent, with the original
/// headers plus the `x-imattr-*` ones, and only those original properties
/// that describe the content. Never `expiration` (the copy would vanish from
/// the dead-letter queue), `user_id` (the broker refuses it from another
/// user and closes the channel), `priority` or `reply_to`.
/// `failed_accounts` lists the accounts that failed when the message held
/// several (empty otherwise: no header).
pub fn dead_letter_properties(
    original: &BasicProperties,
    failure: &Failure,
    failed_accounts: &[String],
    source_queue: &str,
    routing_key: &str,
    failed_at_ms: i64,
) -> BasicProperties {
    let mut headers = original.headers().clone().unwrap_or_default();
    headers.insert(H_REASON.into(), long_string(failure.reason.as_str()));
    headers.insert(H_ERROR_CODE.into(), AMQPValue::LongLongInt(failure.code));
    headers.insert(H_ERROR.into(), long_string(&failure.error));
    if let Some(a) = &failure.account {
        headers.insert(H_ACCOUNT.into(), long_string(a));
    }
    headers.insert(
        H_ATTEMPTS.into(),
        AMQPValue::LongLongInt(i64::from(failure.attempts)),
    );
    headers.insert(H_FAILED_AT.into(), AMQPValue::LongLongInt(failed_at_ms));
    headers.insert(H_SOURCE_QUEUE.into(), long_string(source_queue));
    headers.insert(H_ROUTING_KEY.into(), long_string(routing_key));
    if !failed_accounts.is_empty() {
        let list: Vec<AMQPValue> = failed_accounts.iter().map(|a| long_string(a)).collect();
        headers.insert(
            H_FAILED_ACCOUNTS.into(),
            AMQPValue::FieldArray(FieldArray::from(list)),
        );
    }
    let mut p = BasicProperties::default()
        .with_headers(crate::amqp::headerblob::for_stream(&headers))
        .with_delivery_mode(2);
    if let Some(v) = original.content_type() {
        p = p.with_content_type(v.clone());
    }
    if let Some(v) = original.content_encoding() {
        p = p.with_content_encoding(v.clone());
    }
    if let Some(v) = original.message_id() {
        p = p.with_message_id(v.clone());
    }
    if let Some(v) = original.correlation_id() {
        p = p.with_correlation_id(v.clone());
    }
    if let Some(v) = original.timestamp() {
        p = p.with_timestamp(*v);
    }
    if let Some(v) = original.app_id() {
        p = p.with_app_id(v.clone());
    }
    if let Some(v) = original.kind() {
        p = p.with_type(v.clone());
    }
    p
}

/// Publishes to `exchange` as mandatory and waits for the broker's confirm
/// (the channel must be in confirm mode). Only a copy that reached a queue
/// counts: a nack, a returned (unroutable) message or a failed channel is an
/// error.
pub(crate) async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    props: BasicProperties,
) -> Result<(), PublishError> {
    let confirm = channel
        .basic_publish(
            ShortString::from(exchange),
            ShortString::try_new(routing_key).unwrap_or_default(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            body,
            props,
        )
        .await?
        .await?;
    match confirm {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
            Err(PublishError::Unroutable {
                exchange: exchange.to_string(),
                code: returned.reply_code,
                text: returned.reply_text.as_str().to_string(),
            })
        }
        Confirmation::Nack(None) => Err(PublishError::Nacked),
    }
}

/// Publishes dead-letter copies on a connection and a confirm channel of
/// their own, opened on first use and opened again when the broker has
/// closed them (it closes the channel when it refuses a message), so that
/// one refused copy does not stop every later one.
///
/// Its own connection, as RabbitMQ advises for publishers and consumers: a
/// memory or disk alarm blocks every connection that publishes, and on a
/// connection shared with the consumer the acknowledgements would wait
/// behind the blocked publish too (docs/operations.md, "Resource alarms").
///
/// One per process (`imattr run`), not per broker session: a session that
/// ends under an alarm cannot close a blocked connection, and a new one per
/// session would pile up blocked connections whose copies go out late, out
/// of order with the next session's, once the alarm clears.
pub(crate) struct DeadLetterPublisher {
    /// One node's settings (the node the consume connection is on).
    node: std::sync::Mutex<crate::config::AmqpConfig>,
    /// The connection's name, shown by `rabbitmqctl list_connections`.
    name: String,
    /// The dead-letter queue, published to by name through the default
    /// exchange: a stream keeps what a publisher sends it, but RabbitMQ 3.10
    /// drops what a dead-letter exchange routes to a stream, so the exchange
    /// feeds the inbox instead ([`crate::amqp::inbox`]).
    queue: String,
    link: tokio::sync::Mutex<Option<(Connection, Channel)>>,
}

impl DeadLetterPublisher {
    /// A publisher to `node`'s `dead_letter_queue`, on a connection named
    /// `name` opened on first use.
    pub(crate) fn new(node: &crate::config::AmqpConfig, name: String) -> Self {
        DeadLetterPublisher {
            queue: node.dead_letter_queue.clone(),
            node: std::sync::Mutex::new(node.clone()),
            name,
            link: tokio::sync::Mutex::new(None),
        }
    }

    /// Publishes to `node` from now on (the node the consume connection is
    /// on); a connection to another node is closed, within `within`.
    pub(crate) async fn use_node(
        &self,
        node: &crate::config::AmqpConfig,
        within: std::time::Duration,
    ) {
        let moved = {
            let mut current = self.node.lock().unwrap_or_else(|e| e.into_inner());
            let moved = current.url != node.url;
            *current = node.clone();
            moved
        };
        if moved {
            self.close(within).await;
        }
    }

    /// Publishes one copy and waits until the dead-letter queue holds it
    /// (`_routing_key`, the original's, travels in its headers).
    pub(crate) async fn publish(
        &self,
        _routing_key: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<(), PublishError> {
        let ch = {
            let mut link = self.link.lock().await;
            match link
                .as_ref()
                .filter(|(conn, ch)| conn.status().connected() && ch.status().connected())
            {
                Some((_, ch)) => ch.clone(),
                None => {
                    let conn = match link.take() {
                        Some((conn, _)) if conn.status().connected() => conn,
                        _ => {
                            let node = self.node.lock().unwrap_or_else(|e| e.into_inner()).clone();
                            crate::amqp::topology::connect(&node, &self.name)
                                .await
                                .map_err(|e| PublishError::Connect(e.to_string()))?
                        }
                    };
                    let ch = conn.create_channel().await?;
                    ch.confirm_select(ConfirmSelectOptions::default()).await?;
                    *link = Some((conn, ch.clone()));
                    ch
                }
            }
        };
        let published = publish_confirmed(&ch, "", &self.queue, body, props).await;
        if matches!(published, Err(PublishError::Nacked)) {
            // A quorum queue that refused a publisher (overflow
            // reject-publish) may go on refusing that channel once it has
            // room again: the next copy goes out on a new channel.
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(1),
                ch.close(200, "dead-letter copy refused".into()),
            )
            .await;
        }
        published
    }

    /// Closes its connection, waiting at most `within` for the broker.
    pub(crate) async fn close(&self, within: std::time::Duration) {
        let link = self.link.lock().await.take();
        if let Some((conn, _)) = link {
            if conn.status().connected() {
                let _ =
                    tokio::time::timeout(within, conn.close(200, "imattr stopping".into())).await;
            }
        }
    }
}

/// Publishes a dead-letter copy until a queue holds it, backing off (0.5 s
/// up to 60 s) between failures: the original stays unacked meanwhile, so
/// nothing is lost however long the broker refuses. `failing` hears why each
/// attempt failed, and None once one succeeds (readiness reports it). True
/// once confirmed; false if `stop` fired first (the original is then
/// redelivered).
pub(crate) async fn publish_until_confirmed(
    publisher: &DeadLetterPublisher,
    routing_key: &str,
    body: &[u8],
    props: BasicProperties,
    failing: impl Fn(Option<String>),
    stop: &tokio_util::sync::CancellationToken,
) -> bool {
    use backoff::backoff::Backoff;
    let mut backoff = crate::wait::backoff_forever(
        std::time::Duration::from_millis(500),
        std::time::Duration::from_secs(60),
    );
    loop {
        // The confirm may never come (a memory alarm blocks publishers): a
        // stop must not wait for it.
        let published = tokio::select! {
            biased;
            _ = stop.cancelled() => return false,
            r = publisher.publish(routing_key, body, props.clone()) => r,
        };
        match published {
            Ok(()) => {
                failing(None);
                return true;
            }
            Err(e) => {
                failing(Some(e.to_string()));
                tracing::warn!(routing_key, error = %e, "Dead-letter publish failed; the message stays unacked; retrying");
                let wait = backoff
                    .next_backoff()
                    .unwrap_or(std::time::Duration::from_secs(10));
                if !crate::wait::sleep_unless_cancelled(wait, stop).await {
                    return false;
                }
            }
        }
    }
}

/// A header as an integer, whatever integer type carried it.
pub fn header_i64(headers: &FieldTable, name: &str) -> Option<i64> {
    match headers.inner().get(name)? {
        AMQPValue::ShortShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        AMQPValue::LongUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongLongInt(v) => Some(*v),
        AMQPValue::Timestamp(v) => i64::try_from(*v).ok(),
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).parse().ok(),
        _ => None,
    }
}

/// A header as text.
pub(crate) fn header_str(headers: &FieldTable, name: &str) -> Option<String> {
    match headers.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        other => header_i64(headers, name)
            .map(|v| v.to_string())
            .or_else(|| Some(format!("{other:?}"))),
    }
}

/// Converts an AMQP value to JSON (for `dlq list --json` and `dlq export`).
pub(crate) fn amqp_to_json(v: &AMQPValue) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        AMQPValue::Boolean(b) => J::Bool(*b),
        AMQPValue::ShortShortInt(x) => J::from(*x),
        AMQPValue::ShortShortUInt(x) => J::from(*x),
        AMQPValue::ShortInt(x) => J::from(*x),
        AMQPValue::ShortUInt(x) => J::from(*x),
        AMQPValue::LongInt(x) => J::from(*x),
        AMQPValue::LongUInt(x) => J::from(*x),
        AMQPValue::LongLongInt(x) => J::from(*x),
        AMQPValue::Float(x) => J::from(*x),
        AMQPValue::Double(x) => J::from(*x),
        AMQPValue::Timestamp(x) => J::from(*x),
        AMQPValue::ShortString(s) => J::from(s.as_str()),
        AMQPValue::LongString(s) => J::from(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::FieldArray(a) => J::Array(a.as_slice().iter().map(amqp_to_json).collect()),
        AMQPValue::FieldTable(t) => table_to_json(t),
        AMQPValue::ByteArray(b) => J::from(base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            b.as_slice(),
        )),
        AMQPValue::Void => J::Null,
        other => J::from(format!("{other:?}")),
    }
}

/// A field table as a JSON object.
pub(crate) fn table_to_json(t: &FieldTable) -> serde_json::Value {
    serde_json::Value::Object(
        t.inner()
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), amqp_to_json(v)))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_original_properties_and_headers() {
        let mut h = FieldTable::default();
        h.insert("trace".into(), long_string("t-1"));
        let original = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id("m-1".into())
            .with_correlation_id("c-1".into())
            .with_timestamp(1700000000)
            .with_app_id("svc".into())
            .with_headers(h);
        let f = Failure {
            reason: Reason::Rejected,
            code: 90033,
            error: "Invalid attribute".into(),
            account: Some("u1".into()),
            attempts: 3,
        };
        let p = dead_letter_properties(&original, &f, &[], "q", "u1", 1234);
        assert_eq!(
            p.content_type().as_ref().unwrap().as_str(),
            "application/json"
        );
        assert_eq!(p.message_id().as_ref().unwrap().as_str(), "m-1");
        assert_eq!(p.correlation_id().as_ref().unwrap().as_str(), "c-1");
        assert_eq!(*p.timestamp(), Some(1700000000));
        assert_eq!(p.app_id().as_ref().unwrap().as_str(), "svc");
        assert_eq!(*p.delivery_mode(), Some(2));
        let h = p.headers().as_ref().unwrap();
        assert_eq!(header_str(h, "trace").unwrap(), "t-1");
        assert_eq!(header_str(h, H_REASON).unwrap(), "rejected");
        assert_eq!(header_i64(h, H_ERROR_CODE), Some(90033));
        assert_eq!(header_str(h, H_ERROR).unwrap(), "Invalid attribute");
        assert_eq!(header_str(h, H_ACCOUNT).unwrap(), "u1");
        assert_eq!(header_i64(h, H_ATTEMPTS), Some(3));
        assert_eq!(header_i64(h, H_FAILED_AT), Some(1234));
        assert_eq!(header_str(h, H_SOURCE_QUEUE).unwrap(), "q");
        assert_eq!(header_str(h, H_ROUTING_KEY).unwrap(), "u1");
        let j = table_to_json(h);
        assert_eq!(j[H_ERROR_CODE], 90033);
    }

    #[test]
    fn account_header_only_when_known() {
        let f = Failure {
            reason: Reason::InvalidMessage,
            code: 0,
            error: "body is not UTF-8".into(),
            account: None,
            attempts: 0,
        };
        let p = dead_letter_properties(&BasicProperties::default(), &f, &[], "q", "", 1);
        let h = p.headers().as_ref().unwrap();
        assert!(!h.contains_key(H_ACCOUNT));
        assert!(!h.contains_key(H_FAILED_ACCOUNTS));
        assert_eq!(header_i64(h, H_ERROR_CODE), Some(0));
    }

    /// Only the properties that describe the content are copied: an
    /// expiration would make the copy vanish, a foreign user_id makes the
    /// broker close the channel.
    #[test]
    fn copies_only_content_properties() {
        let original = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_content_encoding("identity".into())
            .with_type("attr-update".into())
            .with_expiration("60000".into())
            .with_user_id("someone-else".into())
            .with_priority(9)
            .with_reply_to("replies".into())
            .with_cluster_id("c".into())
            .with_delivery_mode(1);
        let f = Failure {
            reason: Reason::RetriesExhausted,
            code: 91000,
            error: "busy".into(),
            account: Some("u1".into()),
            attempts: 7,
        };
        let p = dead_letter_properties(&original, &f, &[], "q", "u1", 1);
        assert_eq!(
            p.content_type().as_ref().unwrap().as_str(),
            "application/json"
        );
        assert_eq!(p.content_encoding().as_ref().unwrap().as_str(), "identity");
        assert_eq!(p.kind().as_ref().unwrap().as_str(), "attr-update");
        assert_eq!(*p.delivery_mode(), Some(2));
        assert_eq!(*p.expiration(), None);
        assert_eq!(*p.user_id(), None);
        assert_eq!(*p.priority(), None);
        assert_eq!(*p.reply_to(), None);
        assert_eq!(*p.cluster_id(), None);
    }

    #[test]
    fn failed_accounts_are_an_array() {
        let f = Failure {
            reason: Reason::Rejected,
            code: 90033,
            error: "bad".into(),
            account: Some("b".into()),
            attempts: 2,
        };
        let failed = vec!["b".to_string(), "d".to_string()];
        let p = dead_letter_properties(&BasicProperties::default(), &f, &failed, "q", "", 1);
        // The array travels in the stream-safe blob and comes back as an array.
        let stored = p.headers().as_ref().unwrap();
        assert!(stored.inner().get(H_FAILED_ACCOUNTS).is_none());
        let h = &crate::amqp::headerblob::restore(stored);
        assert_eq!(
            table_to_json(h)[H_FAILED_ACCOUNTS],
            serde_json::json!(["b", "d"])
        );
        assert!(matches!(
            h.inner().get(H_FAILED_ACCOUNTS),
            Some(AMQPValue::FieldArray(_))
        ));
    }
}
