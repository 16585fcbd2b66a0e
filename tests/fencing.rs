//! A worker that has lost its broker session sends nothing more
//! (docs/design.md, "Fencing"): it notices the loss in every state, paused
//! included, and says so on /readyz; a worker taking over holds its requests
//! until whatever the lost session sent is over.

mod common;

use std::time::{Duration, Instant};

use common::*;
use imattr::config::QueueType;
use rand::{Rng, SeedableRng};

/// Paused by a misconfigured answer, a worker whose connection the broker
/// closes notices at once: readiness says "not connected", it reconnects,
/// and once the API works again the update is applied.
async fn a_paused_worker_notices_a_closed_connection(queue_type: QueueType) {
    let mut sb = sandbox(
        &["f1"],
        Faults {
            misconfigured: true,
            ..Faults::default()
        },
        |c| c.amqp.queue_type = queue_type,
    )
    .await;
    sb.start_worker();
    sb.publish(update("a1", &[("f1", "1")])).await.unwrap();
    let health = sb.health.clone();
    eventually(DRAIN, "paused by 90009", || health.is_paused()).await;
    let name = format!("imattr run {}", sb.config.amqp.queue);
    // Watched from before the close: rabbitmqctl itself takes about a second.
    let watcher = tokio::spawn({
        let health = health.clone();
        async move {
            let started = Instant::now();
            loop {
                let ready = health.readiness();
                if ready
                    .as_ref()
                    .err()
                    .is_some_and(|why| why.contains("not connected"))
                {
                    return Some(started.elapsed());
                }
                if started.elapsed() > Duration::from_secs(30) {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
    let started = Instant::now();
    assert_eq!(close_connections(&name), 1, "one consume connection");
    let closing = started.elapsed();
    let noticed = watcher.await.unwrap();
    let readiness = health.readiness();
    assert!(
        noticed.is_some(),
        "still {readiness:?} 30 s after the broker closed the connection"
    );
    eprintln!(
        "{queue_type}: /readyz said not connected {:?} after rabbitmqctl close_connection started (which took {closing:?})",
        noticed.unwrap_or_default()
    );
    eventually(DRAIN, "reconnected", || health.sessions() == 2).await;
    sb.sim.update_faults(|f| f.misconfigured = false);
    sb.wait_drained(DRAIN).await.unwrap();
    assert_eq!(sb.state()["a1"]["f1"], "1");
    finish(sb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_worker_notices_a_closed_connection_classic() {
    a_paused_worker_notices_a_closed_connection(QueueType::Classic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_worker_notices_a_closed_connection_quorum() {
    a_paused_worker_notices_a_closed_connection(QueueType::Quorum).await;
}

/// One run of the two-worker sequence: A active, B standby; the API answers
/// 90009, so A pauses holding f1=1; the broker closes A's connection; B
/// takes f1=1 over; f1=2 is published; the API is fixed. The account must
/// end at 2, and no request may set 1 after 2 was applied (the simulator
/// counts an integer value written over a larger one as a regression).
async fn takeover_after_a_closed_connection(seed: u64, queue_type: QueueType) -> String {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // When the broker closes A's connection (A's probes so far: after
    // 1 s, then about 1.5 s more, …), and when the API is fixed after B paused.
    let pause_before_close = Duration::from_millis(rng.gen_range(0..3000));
    let fix_after_b_paused = Duration::from_millis(rng.gen_range(0..2500));
    // The API works at first: a worker is ready once it has answered.
    let sb = sandbox(&["f1"], Faults::default(), |c| {
        c.amqp.queue_type = queue_type;
        c.amqp.lease_ms = 2000;
    })
    .await;
    let dir = std::env::temp_dir().join(&sb.config.amqp.queue);
    std::fs::create_dir_all(&dir).unwrap();
    let a = Worker::spawn(&sb.config, &dir, 0);
    until(DRAIN, "A is ready", || async {
        a.get("/readyz").await.0 == 200
    })
    .await;
    let b = Worker::spawn(&sb.config, &dir, 1);
    until(DRAIN, "B is ready", || async {
        b.get("/readyz").await.0 == 200
    })
    .await;
    sb.sim.update_faults(|f| f.misconfigured = true);
    sb.publish(update("a1", &[("f1", "1")])).await.unwrap();
    sb.confirm().await.unwrap();
    until(DRAIN, "A paused", || async {
        a.get("/readyz").await.1.contains("paused")
    })
    .await;
    tokio::time::sleep(pause_before_close).await;
    assert_eq!(close_connections(&a.connection_name(&sb.config)), 1);
    until(DRAIN, "B took over", || async {
        b.role().await.contains("active")
    })
    .await;
    sb.publish(update("a1", &[("f1", "2")])).await.unwrap();
    sb.confirm().await.unwrap();
    until(DRAIN, "B paused", || async {
        b.get("/readyz").await.1.contains("paused")
    })
    .await;
    tokio::time::sleep(fix_after_b_paused).await;
    sb.sim.update_faults(|f| f.misconfigured = false);
    let sim = &sb.sim;
    eventually(DRAIN, "f1 = 2 applied", || {
        sim.state()
            .get("a1")
            .and_then(|a| a.get("f1"))
            .is_some_and(|v| v == "2")
    })
    .await;
    // A's probes are 1 s apart at first, then 1.5 times further each (up to
    // 60 s): give a probe that is not fenced the time to come and set 1
    // again. A session that noticed its loss logs it only once all its tasks
    // have ended: nothing of it can come later.
    let watch_until = Instant::now() + Duration::from_secs(45);
    while Instant::now() < watch_until
        && !a.logs().contains("The API accepts requests again")
        && !a.logs().contains("Lost the broker session")
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stats = sb.sim.stats();
    let logs = format!("--- A:\n{}\n--- B:\n{}", a.logs(), b.logs());
    assert_eq!(
        stats.regressions, 0,
        "seed {seed} {queue_type}: a request set f1 back after 2 was applied\n{logs}"
    );
    assert_eq!(
        sb.state()["a1"]["f1"],
        "2",
        "seed {seed} {queue_type}\n{logs}"
    );
    assert!(
        a.logs().contains("Lost the broker session"),
        "seed {seed}: A did not notice\n{logs}"
    );
    for mut w in [a, b] {
        let _ = w.child.start_kill();
        let _ = w.child.wait().await;
    }
    sb.cleanup().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    format!(
        "seed {seed} {queue_type}: close after {pause_before_close:?} paused, fix {fix_after_b_paused:?} after B paused"
    )
}

/// Ten runs of the sequence with varied timings, classic and quorum,
/// side by side (each waits on timers most of the time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_connection_was_closed_never_sets_an_older_value() {
    init_logs();
    let base: u64 = rand::random::<u16>().into();
    let runs = (0..10).map(|i| {
        let queue_type = if i % 2 == 0 {
            QueueType::Classic
        } else {
            QueueType::Quorum
        };
        tokio::spawn(takeover_after_a_closed_connection(base + i, queue_type))
    });
    for run in futures_util::future::join_all(runs).await {
        eprintln!("{}", run.expect("a run panicked"));
    }
}

/// Without single-active-consumer the consumer is exclusive: a second
/// worker (or a reconnect while the broker still holds the previous
/// connection's consumer) is refused and waits, and takes over once the
/// first one is gone, older messages first. Classic and quorum queues.
async fn without_single_active_consumer_one_worker_consumes(queue_type: QueueType) {
    let sb = sandbox(&["n"], Faults::default(), |c| {
        c.amqp.queue_type = queue_type;
        c.amqp.single_active_consumer = false;
        c.amqp.lease_ms = 2000;
    })
    .await;
    let dir = std::env::temp_dir().join(&sb.config.amqp.queue);
    std::fs::create_dir_all(&dir).unwrap();
    let mut a = Worker::spawn(&sb.config, &dir, 0);
    until(DRAIN, "A is ready", || async {
        a.get("/readyz").await.0 == 200
    })
    .await;
    let b = Worker::spawn(&sb.config, &dir, 1);
    until(DRAIN, "B is refused", || async {
        b.logs().contains("Cannot consume yet")
    })
    .await;
    assert_ne!(b.get("/readyz").await.0, 200, "B does not consume");
    let mut expected = Expected::new();
    publish_stream(&sb, 200, 20, 0, &mut expected).await;
    let sim = &sb.sim;
    let want = expected.clone();
    eventually(DRAIN, "A applied everything", || sim.state() == want).await;
    assert_eq!(b.metric("imattr_messages_received_total").await, 0.0);
    let _ = a.child.start_kill();
    let _ = a.child.wait().await;
    publish_stream(&sb, 200, 20, 200, &mut expected).await;
    let want = expected.clone();
    eventually(DRAIN, "B took over", || sim.state() == want).await;
    assert_eq!(sb.sim.stats().regressions, 0);
    for mut w in [b] {
        signal_term(&mut w).await;
    }
    sb.cleanup().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

async fn signal_term(w: &mut Worker) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &w.pid()])
        .status();
    let _ = w.child.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_single_active_consumer_one_worker_consumes_classic() {
    without_single_active_consumer_one_worker_consumes(QueueType::Classic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_single_active_consumer_one_worker_consumes_quorum() {
    without_single_active_consumer_one_worker_consumes(QueueType::Quorum).await;
}

/// The takeover hold (`amqp.takeover_hold_ms`): worker A has sent f1=1 to a
/// slow API when its network goes silent (A hears nothing: no close, no
/// error) and the broker closes its connection. B takes f1=1 over and gets
/// f1=2; the API is fast again. A's request is still under way: without the
/// hold, B's f1=2 lands first and A's f1=1 after it. The account must end
/// at 2, with no older value written over a newer one.
async fn a_takeover_holds_its_requests_until_a_silent_workers_are_over(queue_type: QueueType) {
    // A's request takes 8 s; the hold is 2000 + 10000 + 3000 ms.
    let sb = sandbox(&["f1"], Faults::default(), |c| {
        c.amqp.queue_type = queue_type;
        c.amqp.lease_ms = 2000;
        c.tencent.timeout_ms = 10_000;
    })
    .await;
    let proxy = SilentProxy::start().await;
    let dir = std::env::temp_dir().join(&sb.config.amqp.queue);
    std::fs::create_dir_all(&dir).unwrap();
    let mut via_proxy = sb.config.clone();
    via_proxy.amqp.url = proxy.amqp_url();
    let a = Worker::spawn(&via_proxy, &dir, 0);
    until(DRAIN, "A is ready", || async {
        a.get("/readyz").await.0 == 200
    })
    .await;
    let b = Worker::spawn(&sb.config, &dir, 1);
    until(DRAIN, "B is ready", || async {
        b.get("/readyz").await.0 == 200
    })
    .await;
    sb.sim.update_faults(|f| f.latency_ms = (8000, 8000));
    sb.publish(update("a1", &[("f1", "1")])).await.unwrap();
    sb.confirm().await.unwrap();
    let sim = &sb.sim;
    eventually(DRAIN, "A sent f1 = 1", || sim.in_progress() == 1).await;
    proxy.silence();
    assert_eq!(close_connections(&a.connection_name(&sb.config)), 1);
    sb.sim.update_faults(|f| f.latency_ms = (0, 0));
    until(DRAIN, "B took over", || async {
        b.role().await.contains("active")
    })
    .await;
    sb.publish(update("a1", &[("f1", "2")])).await.unwrap();
    sb.confirm().await.unwrap();
    // Both requests have landed: A's (f1 = 1, after 8 s) and B's (f1 = 2).
    eventually(DRAIN, "both requests applied", || {
        sim.in_progress() == 0 && sim.stats().accounts_written >= 2
    })
    .await;
    let logs = format!("--- A:\n{}\n--- B:\n{}", a.logs(), b.logs());
    assert!(
        b.logs().contains("holding requests"),
        "{queue_type}: B did not hold\n{logs}"
    );
    let stats = sb.sim.stats();
    assert_eq!(
        stats.regressions, 0,
        "{queue_type}: a request set f1 back after 2 was applied\n{logs}"
    );
    assert_eq!(sb.state()["a1"]["f1"], "2", "{queue_type}\n{logs}");
    for mut w in [a, b] {
        let _ = w.child.start_kill();
        let _ = w.child.wait().await;
    }
    sb.cleanup().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_holds_its_requests_until_a_silent_workers_are_over_classic() {
    a_takeover_holds_its_requests_until_a_silent_workers_are_over(QueueType::Classic).await;
}

/// On a quorum queue too: what the broker requeues there is marked
/// redelivered as well, which is what starts the hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_holds_its_requests_until_a_silent_workers_are_over_quorum() {
    a_takeover_holds_its_requests_until_a_silent_workers_are_over(QueueType::Quorum).await;
}

/// Without single-active-consumer, on a quorum queue (which does not
/// enforce exclusive consumers), two workers started at the same moment:
/// the consume lock (`<queue>.lock`) lets one session start and keeps the
/// other waiting; never both consume. Ten rounds, each with a backlog that
/// must end last-value-wins with no value going back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_single_active_consumer_two_workers_started_together_never_both_consume() {
    use std::sync::Arc;
    let sb = sandbox(
        &["n"],
        Faults {
            latency_ms: (1, 10),
            ..Faults::default()
        },
        |c| {
            c.amqp.queue_type = QueueType::Quorum;
            c.amqp.single_active_consumer = false;
        },
    )
    .await;
    let mut expected = Expected::new();
    let sim = &sb.sim;
    for round in 0..10 {
        publish_stream(&sb, 100, 10, round * 100, &mut expected).await;
        sb.confirm().await.unwrap();
        let cancel = tokio_util::sync::CancellationToken::new();
        let health = [
            Arc::new(imattr::worker::Health::default()),
            Arc::new(imattr::worker::Health::default()),
        ];
        let workers: Vec<_> = health
            .iter()
            .map(|h| {
                tokio::spawn(imattr::worker::run(
                    sb.config.clone(),
                    cancel.clone(),
                    h.clone(),
                ))
            })
            .collect();
        let mut both = false;
        let deadline = Instant::now() + DRAIN;
        while sim.state() != expected {
            assert!(Instant::now() < deadline, "round {round}: not drained");
            both |= health.iter().all(|h| h.is_consuming());
            tokio::task::yield_now().await;
        }
        // Before stopping them: once the one consuming stops, the other
        // may take the lock before it hears of the stop.
        let sessions: Vec<u64> = health.iter().map(|h| h.sessions()).collect();
        cancel.cancel();
        for w in workers {
            w.await.unwrap().unwrap();
        }
        assert!(!both, "round {round}: both workers consumed at once");
        assert_eq!(
            sessions.iter().sum::<u64>(),
            1,
            "round {round}: sessions started {sessions:?}: one worker consumes, the other waits"
        );
    }
    assert_eq!(sb.sim.stats().regressions, 0, "a value went backwards");
    assert_eq!(sb.state(), expected);
    sb.cleanup().await.unwrap();
}
