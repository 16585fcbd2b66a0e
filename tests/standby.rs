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

/// Each worker's role as its /healthz says it; exactly one is active, and it
/// is the first of `workers` (kept in the order they registered); returns
/// the roles for the messages.
async fn assert_first_alone_active(workers: &[Worker], when: &str) -> Vec<String> {
    let mut roles = Vec::new();
    for w in workers {
        roles.push(w.role().await.trim().to_string());
    }
    let active: Vec<usize> = (0..roles.len())
        .filter(|&i| roles[i].contains("active"))
        .collect();
    assert_eq!(
        active,
        [0],
        "{when}: exactly one active worker, the earliest registered: {roles:?}"
    );
    roles
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
        c.retry.max_elapsed_secs = 0;
        // A SIGTERM with an account still failing flushes what it can,
        // then gives up on that one (left unacked) after this long.
        c.shutdown.timeout_secs = 3;
    })
    .await;
    assert!(sb.config.amqp.single_active_consumer, "the default");
    let queue = sb.config.amqp.queue.clone();
    // Kept when the test fails, for the workers' logs.
    let dir = std::env::temp_dir().join(&sb.config.amqp.queue);
    std::fs::create_dir_all(&dir).unwrap();
    let mut spawned = 0;
    // In the order their consumers registered: each is spawned once the one
    // before it is ready (consuming).
    let mut workers = Vec::new();
    for _ in 0..3 {
        workers.push(Worker::spawn(&sb.config, &dir, spawned));
        spawned += 1;
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
    // SIGKILL twice, then SIGTERM, each mid-stream: one account of the
    // stream keeps failing (91000) until the stop, so the active worker
    // holds at least its message unacked then, whatever this machine's
    // speed; the next worker gets it redelivered. A fresh standby replaces
    // each stopped worker, at the back of the line.
    for (round, sig) in ["-KILL", "-KILL", "-TERM"].into_iter().enumerate() {
        let stuck = format!("stuck{round}");
        sb.sim
            .update_faults(|f| f.fail_accounts = vec![stuck.clone()]);
        let sim = &sb.sim;
        let before = sim.stats().accounts_written;
        let refused_before = sim.stats().count("im_set_attr", 91000);
        publish_stream(&sb, 1000, 300, published, &mut expected).await;
        published += 1000;
        sb.publish(update(&stuck, &[("n", "1")])).await.unwrap();
        expected.insert(stuck.clone(), [("n".to_string(), "1".to_string())].into());
        publish_stream(&sb, 1000, 300, published, &mut expected).await;
        published += 1000;
        sb.confirm().await.unwrap();
        // Counted from before the stream: each stream sets a newer value on
        // all 300 accounts, so 300 more accounts get written whatever the pace.
        let deadline = Instant::now() + DRAIN;
        while sim.stats().accounts_written < before + 300
            || sim.stats().count("im_set_attr", 91000) == refused_before
        {
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
        assert_first_alone_active(&workers, &format!("round {round}, before the stop")).await;
        // Mid-stream, enforced: the active worker holds messages it has
        // not settled, so not acked (the failing account's at least). Its
        // own counters: the broker's for a quorum queue lag by seconds.
        let w = &workers[active];
        let held = w.metric("imattr_messages_received_total").await
            - w.metric("imattr_messages_acked_total").await;
        assert!(held >= 1.0, "round {round}: not mid-stream ({held} held)");
        eprintln!(
            "round {round}: stopping worker {} with {sig} ({held} messages held)",
            w.admin
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
        // first delivery. They are 300 accounts with newer values, so
        // counted from before them 100 more written accounts always come.
        let at = sim.stats().accounts_written;
        publish_stream(&sb, 300, 300, published, &mut expected).await;
        published += 300;
        let next = active_worker(&workers).await;
        let takeover = stopped_at.elapsed();
        assert_first_alone_active(&workers, &format!("round {round}, after the stop")).await;
        assert_eq!(next, 0, "the next in registration order took over");
        // What the stopped worker held unacked comes to the new one,
        // marked redelivered: the failing account's message at least.
        let new_active = &workers[next];
        until(DRAIN, "redeliveries to the new active worker", || async {
            new_active.metric("imattr_messages_redelivered_total").await >= 1.0
        })
        .await;
        sb.sim.update_faults(|f| f.fail_accounts.clear());
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
        // At the back of the line: registered once it is ready.
        workers.push(Worker::spawn(&sb.config, &dir, spawned));
        spawned += 1;
        let w = workers.last().unwrap();
        until(DRAIN, "the new standby is ready", || async {
            w.get("/readyz").await.0 == 200
        })
        .await;
    }
    publish_stream(&sb, 500, 300, published, &mut expected).await;
    sb.confirm().await.unwrap();
    let sim = &sb.sim;
    let want = expected.clone();
    eventually(Duration::from_secs(120), "last value wins", || {
        sim.state() == want
    })
    .await;
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
