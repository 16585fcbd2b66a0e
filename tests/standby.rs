//! Several workers on one queue (docs/several-workers.md): one active
//! consumer and hot standbys that take over, in order, when it dies or stops.

mod common;

use std::time::{Duration, Instant};

use common::*;
use imattr::config::QueueType;

/// The index of the worker whose /healthz says `active`, waiting for one.
async fn active_worker(workers: &[Worker]) -> usize {
    let deadline = Instant::now() + DRAIN;
    loop {
        for (i, w) in workers.iter().enumerate() {
            if w.role().await.contains("active") {
                return i;
            }
        }
        if Instant::now() > deadline {
            for w in workers {
                let logs = w.logs();
                let tail: Vec<&str> = logs.lines().rev().take(15).collect();
                eprintln!(
                    "--- {} ({}):\n{}",
                    w.admin,
                    w.role().await.trim(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            for args in [
                &[
                    "list_queues",
                    "name",
                    "messages_ready",
                    "messages_unacknowledged",
                    "consumers",
                ][..],
                &[
                    "list_consumers",
                    "queue_name",
                    "channel_pid",
                    "active",
                    "activity_status",
                ][..],
            ] {
                let out = std::process::Command::new("rabbitmqctl")
                    .args(args)
                    .output()
                    .unwrap();
                eprintln!("{}", String::from_utf8_lossy(&out.stdout));
            }
            panic!("no worker became active");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn signal(pid: &str, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, pid])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}

async fn three_workers_take_over_in_turn(queue_type: QueueType) {
    // A slow API, so that each stop comes with updates in flight, pending
    // and still queued.
    let faults = Faults {
        latency_ms: (20, 40),
        ..Faults::default()
    };
    let sb = sandbox(&["n"], faults, |c| {
        c.amqp.queue_type = queue_type;
        c.batch.max_accounts = 10;
        c.tencent.max_in_flight = 2;
    })
    .await;
    assert!(sb.config.amqp.single_active_consumer, "the default");
    // Kept when the test fails, for the workers' logs.
    let dir = std::env::temp_dir().join(&sb.config.amqp.queue);
    std::fs::create_dir_all(&dir).unwrap();
    let mut spawned = 0;
    let mut workers = Vec::new();
    for _ in 0..3 {
        workers.push(Worker::spawn(&sb.config, &dir, spawned));
        spawned += 1;
        // One at a time: the first consumer is the active one.
        let w = workers.last().unwrap();
        until(DRAIN, "the worker is ready", || async {
            w.get("/readyz").await.0 == 200
        })
        .await;
    }
    // On a classic queue the first worker counts itself the only consumer:
    // active on an empty queue. A quorum queue does not count waiting
    // consumers, so there it reports standby until its first delivery.
    let first_active = queue_type == QueueType::Classic;
    assert_eq!(workers[0].role().await.contains("active"), first_active);
    assert_eq!(
        workers[0].metric("imattr_active").await,
        if first_active { 1.0 } else { 0.0 }
    );
    for w in &workers[1..] {
        assert_eq!(w.get("/readyz").await, (200, "ready\n".to_string()));
        assert_eq!(w.role().await, "ok: standby\n");
        assert_eq!(w.metric("imattr_active").await, 0.0);
    }

    let mut expected = Expected::new();
    let mut published = 0;
    let mut figures = Vec::new();
    // SIGKILL twice, then SIGTERM, each time right after a stream (still
    // mid-stream when the worker is behind the publisher); a fresh standby
    // replaces each stopped worker, at the back of the line.
    for (round, sig) in ["-KILL", "-KILL", "-TERM"].into_iter().enumerate() {
        // Counted from before the stream: each stream sets a newer value on
        // all 300 accounts, so 300 more accounts get written whatever the
        // pace. Counted from its confirm instead, it waited forever whenever
        // the worker kept up with the publisher (fewer than 300 were left).
        let sim = &sb.sim;
        let before = sim.stats().accounts_written;
        publish_stream(&sb, 2000, 300, published, &mut expected).await;
        published += 2000;
        sb.confirm().await.unwrap();
        let deadline = Instant::now() + DRAIN;
        while sim.stats().accounts_written < before + 300 {
            if Instant::now() > deadline {
                for w in &workers {
                    let m = w.get("/metrics").await.1;
                    let m: Vec<&str> = m
                        .lines()
                        .filter(|l| l.starts_with("imattr_") && !l.contains("bucket"))
                        .collect();
                    eprintln!(
                        "--- {}: {}\n{}",
                        w.admin,
                        w.role().await.trim(),
                        m.join("\n")
                    );
                }
                panic!("no progress: {:?}", sim.stats());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let active = active_worker(&workers).await;
        eprintln!(
            "round {round}: stopping worker {} with {sig}",
            workers[active].admin
        );
        let redelivered_so_far = workers[active]
            .metric("imattr_messages_redelivered_total")
            .await;
        let stopped_at = Instant::now();
        signal(&workers[active].pid(), sig);
        let mut gone = workers.remove(active);
        let status = gone.child.wait().await.unwrap();
        if sig == "-TERM" {
            assert_eq!(status.code(), Some(0), "{}", gone.logs());
        } else {
            assert_eq!(status.code(), None, "killed by a signal");
        }
        // More updates right away: a standby learns it took over from its
        // first delivery, and the queue may have drained meanwhile. They
        // are 300 accounts with newer values, so counted from before them
        // 100 more written accounts always come.
        let at = sim.stats().accounts_written;
        publish_stream(&sb, 300, 300, published, &mut expected).await;
        published += 300;
        let next = active_worker(&workers).await;
        let takeover = stopped_at.elapsed();
        // Give the new active worker the redeliveries, then count them.
        eventually(DRAIN, "progress after the takeover", || {
            sim.stats().accounts_written > at + 100
        })
        .await;
        let redelivered = workers[next]
            .metric("imattr_messages_redelivered_total")
            .await;
        figures.push(format!(
            "{queue_type} round {round} ({sig}): takeover {takeover:?}, {redelivered} redelivered to the new active worker (the stopped one had seen {redelivered_so_far})"
        ));
        assert!(
            workers[next]
                .logs()
                .contains("Active: this worker now consumes the queue"),
            "one INFO line on taking over"
        );
        workers.push(Worker::spawn(&sb.config, &dir, spawned));
        spawned += 1;
    }
    publish_stream(&sb, 500, 300, published, &mut expected).await;
    sb.confirm().await.unwrap();
    let sim = &sb.sim;
    let want = expected.clone();
    eventually(Duration::from_secs(120), "last value wins", || {
        sim.state() == want
    })
    .await;
    let queue = sb.config.amqp.queue.clone();
    until(DRAIN, "the queue is empty", || async {
        sb.depth(&queue).await.unwrap() == 0
    })
    .await;
    for f in &figures {
        eprintln!("{f}");
    }
    let stats = sb.sim.stats();
    assert_eq!(
        stats.overlapping_account_requests, 0,
        "an account was in two requests at once: {stats:?}"
    );
    assert_eq!(stats.regressions, 0, "a value went backwards: {stats:?}");
    assert_final(&sb, &expected).await;
    for mut w in workers {
        signal(&w.pid(), "-TERM");
        assert_eq!(w.child.wait().await.unwrap().code(), Some(0));
    }
    assert_eq!(sb.depth(&queue).await.unwrap(), 0, "nothing left unacked");
    sb.cleanup().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_classic_queue_killed_twice_and_stopped() {
    three_workers_take_over_in_turn(QueueType::Classic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_quorum_queue_killed_twice_and_stopped() {
    three_workers_take_over_in_turn(QueueType::Quorum).await;
}

/// A queue declared earlier without single-active-consumer: `run` refuses it
/// with status 2, naming the queue, the argument and the way out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_declared_without_single_active_consumer_exits_2() {
    let sb = sandbox(&["n"], Faults::default(), |c| {
        c.amqp.single_active_consumer = false;
    })
    .await;
    sb.publish(update("acc1", &[("n", "1")])).await.unwrap();
    sb.confirm().await.unwrap();
    let mut cfg = sb.config.clone();
    cfg.amqp.single_active_consumer = true;
    let (code, _, stderr) = tokio::time::timeout(DRAIN, imattr_output(&cfg, &["run"]))
        .await
        .expect("run exits instead of retrying");
    assert_eq!(code, 2, "{stderr}");
    for part in [
        cfg.amqp.queue.as_str(),
        "x-single-active-consumer",
        "amqp.single_active_consumer",
        "Migrating a queue",
    ] {
        assert!(stderr.contains(part), "{part:?} missing from: {stderr}");
    }
    // Another queue type is refused the same way.
    let mut cfg = sb.config.clone();
    cfg.amqp.queue_type = QueueType::Quorum;
    let (code, _, stderr) = tokio::time::timeout(DRAIN, imattr_output(&cfg, &["run"]))
        .await
        .expect("run exits instead of retrying");
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("x-queue-type"), "{stderr}");
    // Nothing was consumed or lost.
    assert_eq!(sb.depth(&sb.config.amqp.queue.clone()).await.unwrap(), 1);
    sb.cleanup().await.unwrap();
}
