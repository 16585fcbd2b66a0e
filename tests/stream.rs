//! The native stream protocol reader against the local RabbitMQ: messages
//! published over AMQP 0-9-1 into a stream read back with their headers,
//! properties and bodies; ranges, early stops, the last offset, many chunks,
//! and the errors a user can act on.

mod common;

use std::ops::ControlFlow;
use std::time::Duration;

use common::*;
use imattr::amqp::stream::{StreamMessage, StreamReader};
use imattr::config::AmqpConfig;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

/// A stream with a random name on the local broker, deleted by `delete`.
struct TestStream {
    conn: Connection,
    channel: Channel,
    name: String,
    cfg: AmqpConfig,
}

impl TestStream {
    async fn declare() -> TestStream {
        let cfg = base_config().amqp;
        let url = std::env::var("IMATTR_TEST_AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
        let conn = Connection::connect(&url, ConnectionProperties::default())
            .await
            .expect("connect to RabbitMQ");
        let channel = conn.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        let name = format!("imattr.test.stream.{:016x}", rand::random::<u64>());
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("stream".into()),
        );
        channel
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await
            .expect("declare the stream");
        TestStream {
            conn,
            channel,
            name,
            cfg,
        }
    }

    /// Publishes messages `from..to` (see `sent`), confirmed in windows.
    async fn publish(&self, from: u32, to: u32) {
        let mut window = Vec::new();
        for i in from..to {
            let (props, body) = sent(i);
            let confirm = self
                .channel
                .basic_publish(
                    "".into(),
                    self.name.as_str().into(),
                    BasicPublishOptions::default(),
                    &body,
                    props,
                )
                .await
                .expect("publish");
            window.push(confirm);
            if window.len() == 2000 || i + 1 == to {
                for c in window.drain(..) {
                    let c = c.await.expect("confirm");
                    assert!(c.is_ack(), "the broker nacked a message");
                }
            }
        }
    }

    async fn reader(&self) -> StreamReader {
        StreamReader::connect(&self.cfg, "imattr-test-stream")
            .await
            .expect("connect to the stream port")
    }

    async fn delete(self) {
        self.channel
            .queue_delete(self.name.as_str().into(), QueueDeleteOptions::default())
            .await
            .expect("delete the stream");
        let _ = self.conn.close(200, "done".into()).await;
    }
}

/// Message `i` as published: string, integer and boolean headers, a
/// non-UTF-8 string header, every property RabbitMQ 3.10 carries into the
/// stream, and a body with non-UTF-8 bytes. Message 0 also carries an array
/// and a table header, which RabbitMQ 3.10 drops when it converts the message
/// to AMQP 1.0 (its `unsupported_header_value_type`): `expected` leaves them out.
fn sent(i: u32) -> (BasicProperties, Vec<u8>) {
    let mut h = FieldTable::default();
    h.insert(
        "s".into(),
        AMQPValue::LongString(format!("value {i}").into()),
    );
    h.insert(
        "raw".into(),
        AMQPValue::LongString(LongString::from(vec![b'x', 0xff, 0xfe, i as u8])),
    );
    h.insert("n".into(), AMQPValue::LongLongInt(-7 * i64::from(i)));
    h.insert("i".into(), AMQPValue::LongInt(i as i32));
    h.insert("b".into(), AMQPValue::Boolean(i.is_multiple_of(2)));
    if i == 0 {
        h.insert(
            "arr".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::LongInt(1)])),
        );
        let mut t = FieldTable::default();
        t.insert("k".into(), AMQPValue::LongString("v".into()));
        h.insert("tbl".into(), AMQPValue::FieldTable(t));
    }
    let props = BasicProperties::default()
        .with_headers(h)
        .with_content_type("application/json".into())
        .with_content_encoding("identity".into())
        .with_message_id(ShortString::from(format!("m{i}")))
        .with_correlation_id(ShortString::from(format!("c{i}")))
        .with_timestamp(1_700_000_000 + u64::from(i))
        .with_app_id("imattr-test".into())
        .with_type("dead-letter".into())
        .with_delivery_mode(2);
    let mut body = format!("body {i} ").into_bytes();
    body.extend([0xff, 0x00, 0xfe, i as u8]);
    (props, body)
}

/// What reading message `i` back must give.
fn expected(i: u32) -> (FieldTable, BasicProperties, Vec<u8>) {
    let (props, body) = sent(i);
    let mut headers = props.headers().clone().unwrap_or_default();
    let mut kept = FieldTable::default();
    for (k, v) in headers.inner() {
        if !matches!(v, AMQPValue::FieldArray(_) | AMQPValue::FieldTable(_)) {
            kept.insert(k.clone(), v.clone());
        }
    }
    headers = kept;
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("identity".into())
        .with_message_id(ShortString::from(format!("m{i}")))
        .with_correlation_id(ShortString::from(format!("c{i}")))
        .with_timestamp(1_700_000_000 + u64::from(i))
        .with_app_id("imattr-test".into())
        .with_type("dead-letter".into())
        .with_delivery_mode(2);
    (headers, props, body)
}

fn assert_message(m: &StreamMessage, i: u32) {
    let (headers, props, body) = expected(i);
    assert_eq!(m.offset, u64::from(i), "offset");
    assert_eq!(m.headers, headers, "headers of message {i}");
    assert_eq!(m.properties, props, "properties of message {i}");
    assert_eq!(m.body, body, "body of message {i}");
    let now_ms = chrono::Utc::now().timestamp_millis();
    assert!(
        (now_ms - 600_000..=now_ms).contains(&m.chunk_timestamp_ms),
        "chunk timestamp {} is not a recent Unix time in ms",
        m.chunk_timestamp_ms
    );
}

async fn read_all(
    r: &mut StreamReader,
    s: &TestStream,
    from: u64,
    until: u64,
) -> Vec<StreamMessage> {
    let mut got = Vec::new();
    let seen = r
        .read(&s.name, from, until, |m| {
            got.push(m);
            ControlFlow::Continue(())
        })
        .await
        .expect("read");
    assert_eq!(seen, got.len() as u64);
    got
}

#[tokio::test]
async fn messages_read_back_as_published_in_order() {
    let s = TestStream::declare().await;
    s.publish(0, 50).await;
    let mut r = s.reader().await;
    assert_eq!(r.last_offset(&s.name).await.expect("last"), Some(49));

    let got = read_all(&mut r, &s, 0, 49).await;
    assert_eq!(got.len(), 50);
    for (i, m) in got.iter().enumerate() {
        assert_message(m, i as u32);
    }

    // A middle range, on the same connection after a finished read.
    let got = read_all(&mut r, &s, 10, 20).await;
    let offsets: Vec<u64> = got.iter().map(|m| m.offset).collect();
    assert_eq!(offsets, (10..=20).collect::<Vec<_>>());
    for m in &got {
        assert_message(m, m.offset as u32);
    }

    // An empty range reads nothing.
    assert_eq!(read_all(&mut r, &s, 5, 4).await.len(), 0);
    r.close().await;
    s.delete().await;
}

#[tokio::test]
async fn a_break_stops_the_read_and_the_connection_reads_on() {
    let s = TestStream::declare().await;
    s.publish(0, 300).await;
    let mut r = s.reader().await;
    let mut got = Vec::new();
    let seen = r
        .read(&s.name, 0, 299, |m| {
            got.push(m.offset);
            if got.len() == 5 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .await
        .expect("read");
    assert_eq!(seen, 5);
    assert_eq!(got, vec![0, 1, 2, 3, 4]);

    // The stopped subscription's chunks in flight do not leak into the next read.
    let got = read_all(&mut r, &s, 250, 299).await;
    let offsets: Vec<u64> = got.iter().map(|m| m.offset).collect();
    assert_eq!(offsets, (250..=299).collect::<Vec<_>>());
    r.close().await;
    s.delete().await;
}

#[tokio::test]
async fn last_offset_of_an_empty_then_filled_stream() {
    let s = TestStream::declare().await;
    let mut r = s.reader().await;
    assert_eq!(r.last_offset(&s.name).await.expect("last"), None);
    s.publish(0, 1).await;
    assert_eq!(r.last_offset(&s.name).await.expect("last"), Some(0));
    s.publish(1, 1234).await;
    assert_eq!(r.last_offset(&s.name).await.expect("last"), Some(1233));
    r.close().await;
    s.delete().await;
}

#[tokio::test]
async fn twenty_thousand_messages_over_many_chunks() {
    let s = TestStream::declare().await;
    s.publish(0, 20_000).await;
    let mut r = s.reader().await;
    let last = r
        .last_offset(&s.name)
        .await
        .expect("last")
        .expect("not empty");
    assert_eq!(last, 19_999);
    let mut next = 0u64;
    // A reader that gave no credit back would stop after the first chunks and wait
    // for ever: the guard turns that into a failure.
    let seen = tokio::time::timeout(
        Duration::from_secs(120),
        r.read(&s.name, 0, last, |m| {
            assert_eq!(m.offset, next, "offsets are consecutive");
            if m.offset.is_multiple_of(997) {
                assert_message(&m, m.offset as u32);
            }
            next += 1;
            ControlFlow::Continue(())
        }),
    )
    .await
    .expect("the read finishes")
    .expect("read");
    assert_eq!(seen, 20_000);
    assert_eq!(next, 20_000);
    r.close().await;
    s.delete().await;
}

#[tokio::test]
async fn a_closed_port_says_how_to_enable_the_plugin() {
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let mut cfg = base_config().amqp;
    cfg.stream_port = free;
    let err = match StreamReader::connect(&cfg, "imattr-test-stream").await {
        Ok(_) => panic!("connected to a closed port"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains(&format!(
            "RabbitMQ's stream protocol is not answering on 127.0.0.1:{free}; enable it with \
             `rabbitmq-plugins enable rabbitmq_stream` (or set amqp.stream_port)"
        )),
        "{err}"
    );
}

#[tokio::test]
async fn a_missing_stream_or_a_plain_queue_is_named() {
    let s = TestStream::declare().await;
    let classic = format!("{}.classic", s.name);
    s.channel
        .queue_declare(
            classic.as_str().into(),
            QueueDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare a classic queue");
    let mut r = s.reader().await;
    for name in [format!("{}.missing", s.name), classic.clone()] {
        let err = r
            .read(&name, 0, 10, |_| ControlFlow::Continue(()))
            .await
            .expect_err("not a stream");
        let err = format!("{err:#}");
        assert!(
            err.contains(&format!("stream {name:?} does not exist")),
            "{err}"
        );
        let err = format!(
            "{:#}",
            r.last_offset(&name).await.expect_err("not a stream")
        );
        assert!(
            err.contains(&format!("stream {name:?} does not exist")),
            "{err}"
        );
    }
    // The connection is still usable.
    assert_eq!(r.last_offset(&s.name).await.expect("last"), None);
    r.close().await;
    s.channel
        .queue_delete(classic.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("delete the classic queue");
    s.delete().await;
}

/// With amqps:// the reader speaks TLS to the stream port: a missing TLS
/// listener and a plain port are each named (tls-test reads a stream over TLS).
#[tokio::test]
async fn an_amqps_url_speaks_tls_to_the_stream_port() {
    let mut cfg = base_config().amqp;
    cfg.url = imattr::config::AmqpUrl::new("amqps://guest:guest@127.0.0.1:5671/%2f");
    let err = |cfg: imattr::config::AmqpConfig| async move {
        match StreamReader::connect(&cfg, "imattr-test-stream").await {
            Ok(_) => panic!("connected over TLS to a broker that has no TLS listener"),
            Err(e) => format!("{e:#}"),
        }
    };
    // 0: RabbitMQ's default TLS stream port, which this broker does not open.
    let e = err(cfg.clone()).await;
    assert!(
        e.contains("127.0.0.1:5551") && e.contains("stream.listeners.ssl"),
        "{e}"
    );
    // The plain stream port does not speak TLS.
    cfg.stream_port = 5552;
    let e = err(cfg).await;
    assert!(e.contains("dropped the TLS handshake"), "{e}");
}
