//! `imattr dlq migrate`: a classic or quorum dead-letter queue from an
//! earlier release becomes the stream with every dead letter, headers
//! included; killed mid-way and run again, it loses nothing; the worker
//! dead-letters during a migration and nothing is lost.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use imattr::amqp::deadletter::{dead_letter_properties, Failure, Reason};
use imattr::amqp::headerblob;
use imattr::amqp::topology::{self, StoreKind};
use imattr::config::Config;
use imattr::dlq::migrate::{holding_queue_name, migrate};
use imattr::publish::{update_properties, Publisher};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueBindOptions};
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::BasicProperties;
use tokio_util::sync::CancellationToken;

/// Replaces the sandbox's stream by a dead-letter queue as an earlier
/// release declared it (`queue_type`: "classic" or "quorum"), with `extra`
/// arguments, bound to the dead-letter exchange.
async fn make_legacy(c: &Config, queue_type: &str, extra: &[(&str, AMQPValue)]) {
    let conn = topology::connect(&c.amqp, "test legacy").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let q = c.amqp.dead_letter_queue.as_str();
    // An earlier release had neither the stream nor its inbox.
    let inbox = imattr::amqp::inbox::inbox_name(q);
    for old in [q, inbox.as_str()] {
        ch.queue_delete(old.into(), QueueDeleteOptions::default())
            .await
            .unwrap();
    }
    let mut args = FieldTable::default();
    if queue_type != "classic" {
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from(queue_type)),
        );
    }
    for (k, v) in extra {
        args.insert((*k).into(), v.clone());
    }
    ch.queue_declare(
        q.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .unwrap();
    ch.queue_bind(
        q.into(),
        c.amqp.dead_letter_exchange.as_str().into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let _ = conn.close(200, "done".into()).await;
}

/// The headers an earlier release gave dead letter `i`: arrays as arrays.
fn legacy_props(c: &Config, i: usize) -> BasicProperties {
    let f = Failure {
        reason: Reason::Rejected,
        code: 90033,
        error: format!("test {i}"),
        account: Some(format!("a{i}")),
        attempts: 1,
    };
    let failed = vec![format!("a{i}"), format!("b{i}")];
    let p = dead_letter_properties(
        &update_properties(),
        &f,
        &failed,
        &c.amqp.queue,
        "rk",
        1_700_000_000_000 + i as i64,
    );
    let restored = headerblob::restore(p.headers().as_ref().unwrap());
    assert!(matches!(
        restored.inner().get("x-imattr-failed-accounts"),
        Some(AMQPValue::FieldArray(_))
    ));
    p.with_headers(restored)
}

fn body(i: usize) -> Vec<u8> {
    update(&format!("a{i}"), &[("n", &i.to_string())])
}

/// Publishes `n` legacy dead letters into the dead-letter exchange.
async fn fill(c: &Config, n: usize) {
    let conn = topology::connect(&c.amqp, "test fill").await.unwrap();
    let mut p = Publisher::new(&conn, &c.amqp.dead_letter_exchange)
        .await
        .unwrap();
    for i in 0..n {
        p.publish("rk", &body(i), legacy_props(c, i)).await.unwrap();
    }
    p.finish().await.unwrap();
    let _ = conn.close(200, "done".into()).await;
}

/// Every entry of the stream from its first offset: (restored headers
/// without the broker's `x-stream-offset`, body), read until nothing comes
/// for two seconds.
async fn read_stream(c: &Config) -> Vec<(FieldTable, Vec<u8>)> {
    let conn = topology::connect(&c.amqp, "test stream read")
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(1000, BasicQosOptions::default())
        .await
        .unwrap();
    let mut args = FieldTable::default();
    args.insert(
        "x-stream-offset".into(),
        AMQPValue::LongString(LongString::from("first")),
    );
    let mut consumer = ch
        .basic_consume(
            c.amqp.dead_letter_queue.as_str().into(),
            "test".into(),
            BasicConsumeOptions::default(),
            args,
        )
        .await
        .unwrap();
    let mut out = Vec::new();
    while let Ok(Some(d)) = tokio::time::timeout(Duration::from_secs(2), consumer.next()).await {
        let d = d.unwrap();
        ch.basic_ack(d.delivery_tag, BasicAckOptions::default())
            .await
            .unwrap();
        let mut h = FieldTable::default();
        let stored = d.properties.headers().clone().unwrap_or_default();
        for (k, v) in headerblob::restore(&stored).inner() {
            if k.as_str() != "x-stream-offset" {
                h.insert(k.clone(), v.clone());
            }
        }
        out.push((h, d.data));
    }
    let _ = conn.close(200, "done".into()).await;
    out
}

async fn store_kind(c: &Config) -> StoreKind {
    let conn = topology::connect(&c.amqp, "test kind").await.unwrap();
    let k = topology::dead_letter_store_kind(&conn, &c.amqp)
        .await
        .unwrap();
    let _ = conn.close(200, "done".into()).await;
    k
}

/// How many times each body occurs.
fn counts(entries: &[(FieldTable, Vec<u8>)]) -> HashMap<Vec<u8>, usize> {
    let mut m = HashMap::new();
    for (_, b) in entries {
        *m.entry(b.clone()).or_insert(0) += 1;
    }
    m
}

#[tokio::test]
async fn a_classic_dead_letter_queue_becomes_the_stream_with_every_header() {
    let sb = sandbox(&["n"], Faults::default(), |_| {}).await;
    let c = sb.config.clone();
    make_legacy(&c, "classic", &[]).await;
    assert!(matches!(store_kind(&c).await, StoreKind::Legacy { .. }));
    let n = 300;
    fill(&c, n).await;

    let m = migrate(&c.amqp, &CancellationToken::new(), false)
        .await
        .unwrap();
    assert_eq!((m.from_old, m.into_stream), (n as u64, n as u64));
    assert_eq!(store_kind(&c).await, StoreKind::Stream);
    assert!(!sb
        .queue_exists(&holding_queue_name(&c.amqp.dead_letter_queue))
        .await
        .unwrap());

    let entries = read_stream(&c).await;
    assert_eq!(entries.len(), n, "every dead letter, once");
    for (i, (headers, b)) in entries.iter().enumerate() {
        assert_eq!(b, &body(i), "in the old queue's order");
        assert_eq!(headers, legacy_props(&c, i).headers().as_ref().unwrap());
    }

    // What reaches the dead-letter exchange now lands in the inbox, which a
    // sweep moves into the stream; a second run has nothing to do.
    fill(&c, 1).await;
    let conn = topology::connect(&c.amqp, "test sweep").await.unwrap();
    let swept = imattr::amqp::inbox::sweep(&conn, &c.amqp, &Default::default())
        .await
        .unwrap();
    assert_eq!(swept, 1);
    let _ = conn.close(200, "done".into()).await;
    let again = migrate(&c.amqp, &CancellationToken::new(), false)
        .await
        .unwrap();
    assert!(again.nothing_to_do);
    let (code, out, err) = imattr_output(&c, &["dlq", "migrate"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("nothing to do"), "{out}");
    assert_eq!(read_stream(&c).await.len(), n + 1);
    sb.cleanup().await.unwrap();
}

#[tokio::test]
async fn a_quorum_queue_under_a_delivery_limit_of_1_loses_nothing_to_a_killed_migration() {
    let sb = sandbox(&["n"], Faults::default(), |_| {}).await;
    let c = sb.config.clone();
    make_legacy(&c, "quorum", &[("x-delivery-limit", AMQPValue::LongInt(1))]).await;
    let n = 6_000;
    fill(&c, n).await;
    let holding = holding_queue_name(&c.amqp.dead_letter_queue);

    // Killed while moving the old queue, twice.
    for _ in 0..2 {
        let mut child = imattr(&c).args(["dlq", "migrate"]).spawn().unwrap();
        let start = if sb.queue_exists(&holding).await.unwrap() {
            sb.depth(&holding).await.unwrap()
        } else {
            0
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            assert!(tokio::time::Instant::now() < deadline, "migration too slow");
            tokio::time::sleep(Duration::from_millis(20)).await;
            if sb.queue_exists(&holding).await.unwrap()
                && sb.depth(&holding).await.unwrap() >= start + 500
            {
                break;
            }
        }
        child.start_kill().unwrap(); // SIGKILL
        let status = child.wait().await.unwrap();
        assert!(!status.success(), "killed before the end");
    }
    assert!(
        matches!(store_kind(&c).await, StoreKind::Legacy { .. }),
        "killed before the old queue was emptied"
    );

    let (code, out, err) = imattr_output(&c, &["dlq", "migrate"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("migrated"), "{out}");
    assert_eq!(store_kind(&c).await, StoreKind::Stream);
    assert!(!sb.queue_exists(&holding).await.unwrap());

    let entries = read_stream(&c).await;
    let seen = counts(&entries);
    let missing: Vec<usize> = (0..n).filter(|i| !seen.contains_key(&body(*i))).collect();
    assert!(missing.is_empty(), "lost: {missing:?}");
    // One message at a time from a quorum queue: a kill duplicates at most the one being moved.
    assert!(
        entries.len() <= n + 2,
        "{} entries for {n} dead letters",
        entries.len()
    );
    sb.cleanup().await.unwrap();
}

#[tokio::test]
async fn the_worker_is_stopped_for_a_migration_and_nothing_is_lost() {
    let mut sb = sandbox(&["n"], Faults::default(), |_| {}).await;
    let c = sb.config.clone();
    make_legacy(&c, "classic", &[]).await;
    let n = 3_000;
    fill(&c, n).await;
    sb.start_worker();
    // Invalid messages, each dead-lettered by the worker: before the
    // migration (into the old queue) and after it (into the stream).
    let mut m = 0;
    for _ in 0..20 {
        sb.publish(format!("{{\"invalid\":{m}}}")).await.unwrap();
        m += 1;
    }
    sb.wait_drained(DRAIN).await.unwrap();
    // A queue being deleted confirms what is published to it meanwhile and
    // drops it: with a worker consuming, migrate refuses (exit 2).
    let (code, _, err) = imattr_output(&c, &["dlq", "migrate"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("stop the workers"), "{err}");
    assert!(matches!(store_kind(&c).await, StoreKind::Legacy { .. }));
    sb.stop_worker().await.unwrap();
    let moved = migrate(&c.amqp, &CancellationToken::new(), false)
        .await
        .unwrap();
    assert!(moved.from_old >= n as u64);
    sb.start_worker();
    for _ in 0..20 {
        sb.publish(format!("{{\"invalid\":{m}}}")).await.unwrap();
        m += 1;
    }
    sb.wait_drained(DRAIN).await.unwrap();

    let holding = holding_queue_name(&c.amqp.dead_letter_queue);
    assert!(!sb.queue_exists(&holding).await.unwrap());
    let entries = read_stream(&c).await;
    let seen = counts(&entries);
    for i in 0..n {
        assert!(seen.contains_key(&body(i)), "old dead letter {i} lost");
    }
    for i in 0..m {
        let b = format!("{{\"invalid\":{i}}}").into_bytes();
        assert!(seen.contains_key(&b), "new dead letter {i} lost");
    }
    sb.cleanup().await.unwrap();
}

/// RabbitMQ 3.10.8 drops a message its own dead-lettering routes to a
/// stream, so the dead-letter exchange feeds the inbox and the sweeper moves
/// what lands there into the stream, `x-death` kept in the header blob
/// (docs/dead-letters.md, "Dead letters made by RabbitMQ").
#[tokio::test]
async fn broker_made_dead_letters_reach_the_stream_through_the_inbox() {
    let sb = sandbox(&["n"], Faults::default(), |_| {}).await;
    let c = sb.config.clone();
    // No worker: one message expires in the updates queue, one is rejected.
    let conn = topology::connect(&c.amqp, "test expiry").await.unwrap();
    let mut p = Publisher::new(&conn, &c.amqp.exchange).await.unwrap();
    p.publish(
        "a",
        &body(1),
        update_properties().with_expiration("1".into()),
    )
    .await
    .unwrap();
    p.finish().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    p.publish("a", &body(2), update_properties()).await.unwrap();
    p.finish().await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let got = ch
        .basic_get(c.amqp.queue.as_str().into(), Default::default())
        .await
        .unwrap()
        .expect("the second message");
    ch.basic_reject(
        got.delivery.delivery_tag,
        lapin::options::BasicRejectOptions { requeue: false },
    )
    .await
    .unwrap();
    let mut moved = 0;
    for _ in 0..50 {
        moved += imattr::amqp::inbox::sweep(&conn, &c.amqp, &Default::default())
            .await
            .unwrap();
        if moved >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        moved, 2,
        "both broker-made dead letters swept from the inbox"
    );
    let _ = conn.close(200, "done".into()).await;

    let mut entries = Vec::new();
    for _ in 0..5 {
        entries = read_stream(&c).await;
        if entries.len() >= 2 {
            break;
        }
    }
    let reasons: Vec<_> = entries
        .iter()
        .map(|(h, b)| (b.clone(), h.inner().get("x-first-death-reason").cloned()))
        .collect();
    let ls = |s: &str| Some(AMQPValue::LongString(s.into()));
    assert_eq!(
        reasons,
        [(body(1), ls("expired")), (body(2), ls("rejected"))]
    );
    for (h, _) in &entries {
        assert!(
            matches!(h.inner().get("x-death"), Some(AMQPValue::FieldArray(_))),
            "x-death comes back from the header blob"
        );
    }
    sb.cleanup().await.unwrap();
}
