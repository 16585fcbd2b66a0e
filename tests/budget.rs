//! The byte budget (`amqp.max_held_bytes`, docs/operations.md "Memory"): a
//! backlog of large bodies does not take the worker's memory with it, and
//! nothing is lost or reordered on the way.

mod common;

use std::time::Duration;

use common::*;
use imattr::config::QueueType;

const LARGE: usize = 40;
const LARGE_BYTES: usize = 8 << 20;
const NORMAL: usize = 100;

/// Makes the broker refuse dead-letter copies or take them again. A stream
/// takes no max-length policy, so refusing puts a classic queue of the same
/// name in its place with a policy of max length 0 and `reject-publish`: the
/// worker (which keeps a queue it finds there, and publishes to it by name)
/// gets a nack for every copy. Taking them again clears the policy and puts
/// the stream back (the classic queue is empty: it took nothing).
async fn refuse_dead_letters(sb: &Sandbox, refuse: bool) {
    use lapin::options::QueueDeclareOptions;
    let a = &sb.config.amqp;
    let conn = imattr::amqp::topology::connect(a, "test refusal")
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let q = a.dead_letter_queue.as_str();
    let policy = format!("{q}.refuse");
    ch.queue_delete(q.into(), Default::default()).await.unwrap();
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    if refuse {
        ch.queue_declare(q.into(), durable, Default::default())
            .await
            .unwrap();
        let pattern = format!("^{}$", q.replace('.', "\\."));
        rabbitmqctl(&[
            "set_policy",
            &policy,
            &pattern,
            r#"{"max-length":0,"overflow":"reject-publish"}"#,
            "--apply-to",
            "queues",
        ]);
    } else {
        rabbitmqctl(&["clear_policy", &policy]);
        ch.queue_declare(
            q.into(),
            durable,
            imattr::amqp::topology::dead_letter_queue_arguments(a),
        )
        .await
        .unwrap();
    }
    let _ = conn.close(200, "done".into()).await;
}

/// An 8 MiB body (over the 1 MiB rule) that says which one it is.
fn large_body(i: usize) -> Vec<u8> {
    let mut body = format!("{{\"To_Account\":\"big{i}\",\"pad\":\"").into_bytes();
    body.resize(LARGE_BYTES - 2, b'x');
    body.extend_from_slice(b"\"}");
    body
}

/// 40 bodies of 8 MiB and 100 normal updates wait in the queue when the
/// worker starts, and the dead-letter queue refuses copies for a while (a
/// policy: max length 0, reject-publish), so that nothing the worker holds
/// can be freed: the worker stops reading at the budget instead of taking
/// the whole backlog in. Once the dead-letter queue takes copies again,
/// every large body is dead-lettered whole and in order, every update is
/// applied. The worker's peak memory is printed (the backlog is 320 MiB;
/// `imattr bench --only 9` measures the scenario without the refusals,
/// BENCHMARKS.md).
async fn a_backlog_of_large_bodies_stays_within_the_budget(queue_type: QueueType) {
    let sb = sandbox(&["n"], Faults::default(), |c| {
        c.amqp.queue_type = queue_type;
    })
    .await;
    let mut expected = Expected::new();
    for i in 0..LARGE.max(NORMAL) {
        if i < LARGE {
            sb.publish(large_body(i)).await.unwrap();
        }
        if i < NORMAL {
            let (a, v) = (format!("acc{i}"), i.to_string());
            expected
                .entry(a.clone())
                .or_default()
                .insert("n".into(), v.clone());
            sb.publish(update(&a, &[("n", &v)])).await.unwrap();
        }
    }
    sb.confirm().await.unwrap();
    let dlq = sb.config.amqp.dead_letter_queue.clone();
    refuse_dead_letters(&sb, true).await;
    let dir = std::env::temp_dir().join(&sb.config.amqp.queue);
    std::fs::create_dir_all(&dir).unwrap();
    let mut w = Worker::spawn(&sb.config, &dir, 0);
    // Refused copies: what the worker holds cannot be freed. Give it the
    // time to take in all it would.
    until(DRAIN, "dead-letter copies refused", || async {
        w.get("/readyz").await.1.contains("dead-letter")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let held = w.metric("imattr_held_bytes").await / (1 << 20) as f64;
    let peak = w.peak_rss_mib();
    eprintln!(
        "{queue_type}: peak RSS {peak:.0} MiB, {held:.0} MiB held, with {LARGE} bodies of 8 MiB and {NORMAL} updates in the queue and dead letters refused"
    );
    refuse_dead_letters(&sb, false).await;
    let queue = sb.config.amqp.queue.clone();
    let sim = &sb.sim;
    until(
        DRAIN * 2,
        "every update applied and every large body dead-lettered",
        || async {
            sim.state() == expected
                && sb.depth(&queue).await.unwrap_or(1) == 0
                && sb.depth(&dlq).await.unwrap_or(0) as usize == LARGE
        },
    )
    .await;
    let _ = w.child.start_kill();
    let _ = w.child.wait().await;
    let dead = sb.dead_letters().await.unwrap();
    assert_eq!(dead.len(), LARGE);
    for (i, d) in dead.iter().enumerate() {
        assert_eq!(d.body_encoding, "utf8");
        assert!(
            d.body.as_bytes() == large_body(i).as_slice(),
            "dead letter {i}: the body whole, in order"
        );
        assert_eq!(d.reason.as_deref(), Some("invalid-message"));
    }
    assert_eq!(sb.state(), expected);
    // Generous: the budget is 64 MiB, the backlog 320 MiB, which the worker
    // took in whole (and more, in copies) before the budget.
    assert!(peak < 256.0, "{queue_type}: peak RSS {peak:.0} MiB");
    sb.cleanup().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_large_bodies_stays_within_the_budget_classic() {
    a_backlog_of_large_bodies_stays_within_the_budget(QueueType::Classic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_large_bodies_stays_within_the_budget_quorum() {
    a_backlog_of_large_bodies_stays_within_the_budget(QueueType::Quorum).await;
}

/// Dead letters that cannot be published (the dead-letter queue refuses
/// them for a while, as under a resource alarm) fill the budget, for many
/// leases and longer than lapin's heartbeat timeout (heartbeat 3 s: lapin
/// closes a connection it has read nothing from for 6 s). The session must
/// hold on: reads held back by the budget do not count against the lease,
/// and the gate reads on for the lease's answers when dead letters do not
/// free it. Nothing is lost or taken twice: no reconnect, no redelivery,
/// every dead letter once, every update applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_dead_letters_filling_the_budget_do_not_lose_the_session() {
    const BIG: usize = 8;
    const REJECTED: usize = 10;
    let faults = Faults {
        reject_attrs: vec!["bad".into()],
        ..Faults::default()
    };
    let sb = sandbox(&["n", "bad"], faults, |c| {
        c.amqp.url = imattr::config::AmqpUrl::new(format!(
            "amqp://guest:guest@{}/%2f?heartbeat=3",
            broker_addr()
        ));
        c.amqp.lease_ms = 2000;
        c.amqp.max_held_bytes = 4 << 20;
    })
    .await;
    let mut expected = Expected::new();
    for i in 0..BIG {
        let mut body = large_body(i);
        body.truncate(2 << 20);
        sb.publish(body).await.unwrap();
        let a = format!("r{i}");
        sb.publish(update(&a, &[("bad", "x")])).await.unwrap();
    }
    for i in BIG..REJECTED {
        sb.publish(update(&format!("r{i}"), &[("bad", "x")]))
            .await
            .unwrap();
    }
    for i in 0..20 {
        let (a, v) = (format!("acc{i}"), i.to_string());
        expected
            .entry(a.clone())
            .or_default()
            .insert("n".into(), v.clone());
        sb.publish(update(&a, &[("n", &v)])).await.unwrap();
    }
    sb.confirm().await.unwrap();
    let dlq = sb.config.amqp.dead_letter_queue.clone();
    refuse_dead_letters(&sb, true).await;
    let dir = std::env::temp_dir().join(&sb.config.amqp.queue);
    std::fs::create_dir_all(&dir).unwrap();
    let mut w = Worker::spawn(&sb.config, &dir, 0);
    until(DRAIN, "dead-letter copies refused", || async {
        w.get("/readyz").await.1.contains("dead-letter")
    })
    .await;
    // Five leases, twice lapin's heartbeat timeout.
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert!(
        !w.logs().contains("Lost the broker session"),
        "the session was lost while dead letters were refused\n{}",
        w.logs()
    );
    refuse_dead_letters(&sb, false).await;
    let queue = sb.config.amqp.queue.clone();
    let sim = &sb.sim;
    until(DRAIN, "everything applied or dead-lettered", || async {
        sim.state() == expected
            && sb.depth(&queue).await.unwrap_or(1) == 0
            && sb.depth(&dlq).await.unwrap_or(0) as usize >= BIG + REJECTED
    })
    .await;
    let logs = w.logs();
    assert_eq!(
        w.metric("imattr_broker_reconnects_total").await,
        0.0,
        "{logs}"
    );
    assert_eq!(
        w.metric("imattr_messages_redelivered_total").await,
        0.0,
        "{logs}"
    );
    let _ = w.child.start_kill();
    let _ = w.child.wait().await;
    let dead = sb.dead_letters().await.unwrap();
    assert_eq!(dead.len(), BIG + REJECTED, "every dead letter once");
    assert_eq!(sb.state(), expected);
    sb.cleanup().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A shutdown while the budget is full: deliveries keep arriving while the
/// session drains (with single-active-consumer the consumer stays
/// registered; without it, until the cancellation is processed), the read
/// gate stops reading, and the broker's answers (cancel-ok, close-ok) wait
/// behind them. The shutdown must hear them instead of waiting its timeout
/// out: no "did not confirm … in time", no "Shutdown timeout reached".
async fn a_shutdown_with_the_budget_full_hears_the_broker(single_active_consumer: bool) {
    let faults = Faults {
        latency_ms: (100, 200),
        ..Faults::default()
    };
    let sb = sandbox(&["n"], faults, |c| {
        c.amqp.single_active_consumer = single_active_consumer;
        c.amqp.max_held_bytes = 4 << 20;
        c.batch.max_accounts = 5;
        c.tencent.max_in_flight = 2;
    })
    .await;
    // 300 updates of 100 KiB (whitespace after the JSON): 30 MiB.
    for i in 0..300 {
        let mut body = update(&format!("acc{}", i % 50), &[("n", &i.to_string())]);
        body.resize(100 << 10, b' ');
        sb.publish(body).await.unwrap();
    }
    sb.confirm().await.unwrap();
    let dir = std::env::temp_dir().join(&sb.config.amqp.queue);
    std::fs::create_dir_all(&dir).unwrap();
    let mut w = Worker::spawn(&sb.config, &dir, 0);
    let sim = &sb.sim;
    eventually(DRAIN, "some applied", || sim.stats().accounts_written >= 20).await;
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &w.pid()])
        .status();
    let status = w.child.wait().await.unwrap();
    let logs = w.logs();
    assert!(status.success(), "{logs}");
    assert!(logs.contains("Stopped"), "{logs}");
    for late in ["in time", "Shutdown timeout reached"] {
        assert!(
            !logs.contains(late),
            "sac {single_active_consumer}: {late:?} at shutdown\n{logs}"
        );
    }
    sb.cleanup().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_with_the_budget_full_hears_the_broker_sac() {
    a_shutdown_with_the_budget_full_hears_the_broker(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_with_the_budget_full_hears_the_broker_no_sac() {
    a_shutdown_with_the_budget_full_hears_the_broker(false).await;
}
