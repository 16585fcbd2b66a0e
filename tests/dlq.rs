//! The dead-letter tools at scale and under load: order kept by a full
//! rotation pass, the unacknowledged window, replay while dead letters keep
//! arriving, partial replay, broker-made dead letters, killing a pass, and all
//! of it while the worker runs.

mod common;

use std::collections::{HashMap, HashSet};
use std::os::unix::process::ExitStatusExt;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use imattr::amqp::deadletter::{self, dead_letter_properties, Failure, Reason};
use imattr::amqp::topology;
use imattr::config::Config;
use imattr::dlq::{DeadLetterView, Dlq, Filter, PassConfig, ReplayOptions};
use imattr::publish::{update_properties, Publisher};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::BasicProperties;

/// Publishes dead letters straight into the sandbox's dead-letter exchange,
/// as the worker would.
struct DeadLetters {
    conn: lapin::Connection,
    publisher: Publisher,
    source_queue: String,
}

impl DeadLetters {
    async fn new(c: &Config) -> DeadLetters {
        let conn = topology::connect(&c.amqp, "test dead letters")
            .await
            .unwrap();
        let publisher = Publisher::new(&conn, &c.amqp.dead_letter_exchange)
            .await
            .unwrap();
        DeadLetters {
            conn,
            publisher,
            source_queue: c.amqp.queue.clone(),
        }
    }

    fn props(&self, reason: Reason, account: &str, failed: &[&str]) -> BasicProperties {
        let f = Failure {
            reason,
            code: if reason == Reason::Rejected { 90033 } else { 0 },
            error: "test".into(),
            account: Some(account.into()),
            attempts: 1,
        };
        let failed: Vec<String> = failed.iter().map(|a| a.to_string()).collect();
        dead_letter_properties(
            &update_properties(),
            &f,
            &failed,
            &self.source_queue,
            account,
            1,
        )
    }

    /// A dead letter of `{"To_Account":account,"Attrs":{"n":n}}`.
    async fn one(&mut self, reason: Reason, account: &str, n: &str) {
        let props = self.props(reason, account, &[]);
        self.publisher
            .publish(account, &update(account, &[("n", n)]), props)
            .await
            .unwrap();
    }

    async fn raw(&mut self, props: BasicProperties, rk: &str, body: &[u8]) {
        self.publisher.publish(rk, body, props).await.unwrap();
    }

    async fn confirm(mut self) {
        self.publisher.finish().await.unwrap();
        let _ = self.conn.close(200, "done".into()).await;
    }
}

/// The `n` attribute of each dead letter, in queue order.
fn ns(views: &[DeadLetterView]) -> Vec<String> {
    views
        .iter()
        .map(|v| {
            let body: serde_json::Value = serde_json::from_str(&v.body).unwrap();
            body["Attrs"]["n"].as_str().unwrap().to_string()
        })
        .collect()
}

/// The `n` attribute of each line of `dlq list --json` or `dlq export`.
fn json_ns(ndjson: &str) -> Vec<String> {
    ndjson
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let body: serde_json::Value =
                serde_json::from_str(v["body"].as_str().unwrap()).unwrap();
            body["Attrs"]["n"].as_str().unwrap().to_string()
        })
        .collect()
}

/// Polls an async condition every 50 ms for up to 30 s.
async fn eventually_async<F, Fut>(mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..600 {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("condition not met within 30 s");
}

async fn open(c: &Config, window: u16) -> Dlq {
    Dlq::open(c)
        .await
        .unwrap()
        .with_pass_config(PassConfig::with_window(window))
}

async fn peek_all(c: &Config, window: u16) -> Vec<DeadLetterView> {
    let q = open(c, window).await;
    let v = q.peek(None).await.unwrap();
    q.close().await;
    v
}

/// Takes every message off `queue` (nothing else reads it): (routing key, headers, body).
async fn drain(c: &Config, queue: &str) -> Vec<(String, FieldTable, Vec<u8>)> {
    let conn = topology::connect(&c.amqp, "test drain").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(500, BasicQosOptions::default()).await.unwrap();
    let (ready, _) = imattr::dlq::pass::count(&ch, queue).await.unwrap();
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut out = Vec::new();
    while out.len() < ready as usize {
        let d = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("a delivery")
            .unwrap()
            .unwrap();
        ch.basic_ack(d.delivery_tag, BasicAckOptions::default())
            .await
            .unwrap();
        out.push((
            d.routing_key.as_str().to_string(),
            d.properties.headers().clone().unwrap_or_default(),
            d.data,
        ));
    }
    let _ = conn.close(200, "done".into()).await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_rotation_pass_keeps_the_order() {
    let sb = sandbox(&["n"], Faults::default(), |_| {}).await;
    let c = sb.config.clone();
    let mut dl = DeadLetters::new(&c).await;
    let n = 3000;
    for i in 0..n {
        dl.one(Reason::Rejected, &format!("a{}", i % 7), &i.to_string())
            .await;
    }
    dl.confirm().await;
    let want: Vec<String> = (0..n).map(|i| i.to_string()).collect();

    // A window of 200 commits every 100 messages: 3,000 means a rotation.
    let first = peek_all(&c, 200).await;
    assert_eq!(ns(&first), want, "first list, in publishing order");
    let again = peek_all(&c, 200).await;
    assert_eq!(ns(&again), want, "second list, same order");
    assert_eq!(first, again, "same headers and bodies");
    assert_eq!(sb.depth(&c.amqp.dead_letter_queue).await.unwrap(), n as u32);

    // export (the binary, default window) then list: same order again.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("dead.ndjson");
    let (code, _, err) =
        imattr_output(&c, &["dlq", "export", "--out", out.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{err}");
    assert!(err.contains(&format!("exported {n}")), "{err}");
    let exported = json_ns(&std::fs::read_to_string(&out).unwrap());
    assert_eq!(exported, want);
    assert_eq!(ns(&peek_all(&c, 200).await), want, "list after export");

    // --limit with a filter: the first matches, in order, queue untouched.
    let (code, out, err) = imattr_output(
        &c,
        &["dlq", "list", "--json", "--account", "a3", "--limit", "5"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let got = json_ns(&out);
    assert_eq!(got, ["3", "10", "17", "24", "31"]);
    assert_eq!(ns(&peek_all(&c, 200).await), want);
    sb.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_never_holds_more_than_its_window_unacked() {
    let sb = sandbox(&["n"], Faults::default(), |_| {}).await;
    let c = sb.config.clone();
    let mut dl = DeadLetters::new(&c).await;
    let n = 5000u32;
    for i in 0..n {
        dl.one(Reason::Rejected, "a", &i.to_string()).await;
    }
    dl.confirm().await;

    // From ready counts: copies are added before originals are acked, so
    // n - ready never overstates the unacked count (it detects a missing
    // window, which would take nearly all n at once).
    let max_unacked = Arc::new(AtomicU32::new(0));
    let samples = Arc::new(AtomicU32::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    // And rabbitmqctl's exact figure, when it can run here (a second a call).
    let exact = {
        let (stop, q) = (stop.clone(), c.amqp.dead_letter_queue.clone());
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if let Some(u) = imattr::sandbox::rabbitmqctl_unacked(&q).await {
                    seen.push(u);
                }
            }
            seen
        })
    };
    let sampler = {
        let (max_unacked, samples, stop) = (max_unacked.clone(), samples.clone(), stop.clone());
        let c = c.clone();
        tokio::spawn(async move {
            let conn = topology::connect(&c.amqp, "test sampler").await.unwrap();
            let ch = conn.create_channel().await.unwrap();
            while !stop.load(Ordering::Relaxed) {
                let (ready, _) = imattr::dlq::pass::count(&ch, &c.amqp.dead_letter_queue)
                    .await
                    .unwrap();
                max_unacked.fetch_max(n - ready.min(n), Ordering::Relaxed);
                samples.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    // A slow sink makes the pass last long enough to be sampled often.
    struct Slow(Vec<u8>);
    impl std::io::Write for Slow {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            if b == b"\n" {
                std::thread::sleep(Duration::from_millis(2));
            }
            self.0.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let q = open(&c, 500).await;
    let mut sink = Slow(Vec::new());
    assert_eq!(
        q.export(&Filter::default(), &mut sink).await.unwrap(),
        u64::from(n)
    );
    q.close().await;
    stop.store(true, Ordering::Relaxed);
    sampler.await.unwrap();
    let exact = exact.await.unwrap();
    assert!(exact.iter().all(|u| *u <= 500), "rabbitmqctl saw {exact:?}");
    let max = max_unacked.load(Ordering::Relaxed);
    assert!(
        samples.load(Ordering::Relaxed) > 20,
        "sampled during the pass"
    );
    assert!(max > 0, "the pass was seen holding messages");
    assert!(max <= 500, "at most the window unacked, saw {max}");
    let want: Vec<String> = (0..n).map(|i| i.to_string()).collect();
    assert_eq!(ns(&peek_all(&c, 500).await), want);
    sb.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_ends_while_new_dead_letters_arrive() {
    // No worker: replayed messages wait in the updates queue to be counted.
    let sb = sandbox(&["n"], Faults::default(), |_| {}).await;
    let c = sb.config.clone();
    let mut dl = DeadLetters::new(&c).await;
    let n = 2000;
    for i in 0..n {
        let reason = if i % 2 == 0 {
            Reason::Rejected
        } else {
            Reason::InvalidMessage
        };
        dl.one(reason, &format!("a{i}"), &format!("old{i}")).await;
    }
    // K new ones are there before the replay starts.
    const K: usize = 100;
    for i in 0..K {
        dl.one(Reason::Rejected, &format!("b{i}"), &format!("new{i}"))
            .await;
    }
    dl.confirm().await;

    // The others arrive once the pass is reading (it holds the consumer).
    let arrived_during = Arc::new(AtomicU32::new(0));
    let replay_done = Arc::new(AtomicBool::new(false));
    let arriving = {
        let (c, arrived_during, replay_done) =
            (c.clone(), arrived_during.clone(), replay_done.clone());
        tokio::spawn(async move {
            let conn = topology::connect(&c.amqp, "test watcher").await.unwrap();
            let ch = conn.create_channel().await.unwrap();
            eventually_async(|| async {
                imattr::dlq::pass::count(&ch, &c.amqp.dead_letter_queue)
                    .await
                    .unwrap()
                    .1
                    == 1
            })
            .await;
            let mut dl = DeadLetters::new(&c).await;
            for i in K..1000 {
                dl.one(Reason::Rejected, &format!("b{i}"), &format!("new{i}"))
                    .await;
                if !replay_done.load(Ordering::SeqCst) {
                    arrived_during.fetch_add(1, Ordering::SeqCst);
                }
                if i % 50 == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            dl.confirm().await;
            let _ = conn.close(200, "done".into()).await;
        })
    };
    let q = open(&c, 300).await;
    let replayed = q
        .replay(&ReplayOptions {
            filter: Filter {
                reason: Some("rejected".into()),
                ..Filter::default()
            },
            ..ReplayOptions::default()
        })
        .await
        .unwrap();
    replay_done.store(true, Ordering::SeqCst);
    q.close().await;
    arriving.await.unwrap();
    assert!(
        arrived_during.load(Ordering::SeqCst) > 0,
        "no dead letter arrived during the replay (raise n if this machine is fast)"
    );

    // Exactly the rejected ones present at the start moved, once each: the
    // old ones and the first K new ones.
    assert_eq!(replayed, n / 2 + K, "only those present at the start");
    let moved = drain(&c, &c.amqp.queue).await;
    let moved_ns: HashSet<String> = moved
        .iter()
        .map(|(rk, h, b)| {
            assert!(!h.contains_key(deadletter::H_REASON));
            assert_eq!(deadletter::header_i64(h, deadletter::H_REPLAYS), Some(1));
            let v: serde_json::Value = serde_json::from_slice(b).unwrap();
            assert_eq!(v["To_Account"].as_str().unwrap(), rk);
            v["Attrs"]["n"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(moved.len(), replayed, "each moved once");
    let want_moved: HashSet<String> = (0..n)
        .step_by(2)
        .map(|i| format!("old{i}"))
        .chain((0..K).map(|i| format!("new{i}")))
        .collect();
    assert_eq!(moved_ns, want_moved);

    // Left: the other old ones in their order, and the later new ones, once.
    let left = ns(&peek_all(&c, 300).await);
    let old_left: Vec<&String> = left.iter().filter(|s| s.starts_with("old")).collect();
    let want_old: Vec<String> = (1..n).step_by(2).map(|i| format!("old{i}")).collect();
    assert_eq!(old_left, want_old.iter().collect::<Vec<_>>());
    let new_left: Vec<&String> = left.iter().filter(|s| s.starts_with("new")).collect();
    let want_new: Vec<String> = (K..1000).map(|i| format!("new{i}")).collect();
    assert_eq!(new_left, want_new.iter().collect::<Vec<_>>());
    assert_eq!(
        left.len(),
        n / 2 + 1000 - K,
        "nothing lost, nothing duplicated"
    );
    sb.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_sends_only_the_failed_accounts_unless_whole() {
    let mut sb = sandbox(&["n"], Faults::default(), |_| {}).await;
    sb.start_worker();
    let c = sb.config.clone();
    let body = br#"{"UserAttrs":[{"To_Account":"p1","Attrs":{"n":"1"}},{"To_Account":"p2","Attrs":{"n":"2"}},{"To_Account":"p3","Attrs":{"n":"3"}}]}"#;
    let mut dl = DeadLetters::new(&c).await;
    let props = dl.props(Reason::Rejected, "p2", &["p2", "p3"]);
    dl.raw(props, "p1", body).await;
    dl.confirm().await;

    let dead = sb.dead_letters().await.unwrap();
    assert_eq!(dead[0].failed_accounts, ["p2", "p3"]);
    let (code, out, err) = imattr_output(&c, &["dlq", "list", "--json", "--account", "p3"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 1, "the failed account matches");
    let (code, out, err) = imattr_output(&c, &["dlq", "list", "--json", "--account", "p1"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 0, "the applied one does not");

    let (code, out, err) = imattr_output(&c, &["dlq", "replay"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "replayed 1");
    sb.wait_drained(DRAIN).await.unwrap();
    let state = sb.state();
    assert!(
        !state.contains_key("p1"),
        "the applied account is not sent again"
    );
    assert_eq!(state["p2"]["n"], "2");
    assert_eq!(state["p3"]["n"], "3");
    assert!(sb.dead_letters().await.unwrap().is_empty());

    // --whole sends every entry.
    let mut dl = DeadLetters::new(&c).await;
    let props = dl.props(Reason::Rejected, "p2", &["p2"]);
    dl.raw(props, "p1", body).await;
    dl.confirm().await;
    let (code, out, err) = imattr_output(&c, &["dlq", "replay", "--whole"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "replayed 1");
    sb.wait_drained(DRAIN).await.unwrap();
    assert_eq!(sb.state()["p1"]["n"], "1");
    sb.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_made_dead_letters_are_shown_counted_and_replayable() {
    let mut sb = sandbox(&["n"], Faults::default(), |_| {}).await;
    let c = sb.config.clone();
    // Worker not running: messages with a publisher TTL expire in the
    // updates queue and RabbitMQ dead-letters them itself.
    let conn = topology::connect(&c.amqp, "test ttl").await.unwrap();
    let mut p = Publisher::new(&conn, &c.amqp.exchange).await.unwrap();
    for i in 0..3 {
        let a = format!("t{i}");
        p.publish(
            &a,
            &update(&a, &[("n", &i.to_string())]),
            update_properties().with_expiration("1".into()),
        )
        .await
        .unwrap();
    }
    p.finish().await.unwrap();
    let _ = conn.close(200, "done".into()).await;
    let mut dead = Vec::new();
    for _ in 0..200 {
        dead = sb.dead_letters().await.unwrap();
        if dead.len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(dead.len(), 3, "expired messages dead-lettered by RabbitMQ");
    for (i, d) in dead.iter().enumerate() {
        assert_eq!(d.reason.as_deref(), Some("broker:expired"));
        assert_eq!(d.account.as_deref(), Some(format!("t{i}").as_str()));
        assert_eq!(d.source_queue.as_deref(), Some(c.amqp.queue.as_str()));
        assert!(d.failed_at_ms.is_some());
        assert!(d.headers.get("x-death").is_some());
    }

    let (code, table, err) = imattr_output(&c, &["dlq", "list"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        table.contains("broker:expired") && table.contains("t2"),
        "{table}"
    );
    let (code, out, err) = imattr_output(&c, &["dlq", "stats", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let stats: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(stats["total"], 3);
    assert_eq!(stats["by_reason"]["broker:expired"], 3);
    assert_eq!(stats["by_source_queue"][c.amqp.queue.as_str()], 3);
    let (code, out, err) =
        imattr_output(&c, &["dlq", "replay", "--reason", "rejected", "--dry-run"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "would replay 0");

    sb.start_worker();
    let (code, out, err) =
        imattr_output(&c, &["dlq", "replay", "--reason", "broker:expired"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "replayed 3");
    sb.wait_drained(DRAIN).await.unwrap();
    let state = sb.state();
    for i in 0..3 {
        assert_eq!(state[&format!("t{i}")]["n"], i.to_string());
    }
    assert!(sb.dead_letters().await.unwrap().is_empty());
    sb.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_pass_loses_nothing_and_duplicates_at_most_a_batch() {
    let sb = sandbox(&["n"], Faults::default(), |_| {}).await;
    let c = sb.config.clone();
    let mut dl = DeadLetters::new(&c).await;
    let n = 20_000u32;
    for i in 0..n {
        dl.one(Reason::Rejected, "a", &i.to_string()).await;
    }
    dl.confirm().await;
    let q = c.amqp.dead_letter_queue.clone();
    let conn = topology::connect(&c.amqp, "test watcher").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut total = n;
    for delay_ms in [0u64, 300] {
        let mut child = imattr(&c)
            .args(["dlq", "stats"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Kill it once it holds messages (and later, mid-rotation).
        let mut seen = false;
        for _ in 0..2000 {
            if sb.depth(&q).await.unwrap() < total {
                seen = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert!(seen, "the pass started");
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        child.start_kill().unwrap();
        let status = child.wait().await.unwrap();
        // Killed, not finished: the pass was still running.
        assert_eq!(
            status.signal(),
            Some(9),
            "killed after {delay_ms} ms while the pass ran: {status:?}"
        );
        // The broker returns the window once it sees the connection gone.
        eventually_async(|| async { imattr::dlq::pass::count(&ch, &q).await.unwrap().1 == 0 })
            .await;
        let left = peek_all(&c, 2000).await;
        let got: HashSet<String> = ns(&left).into_iter().collect();
        assert_eq!(
            got.len(),
            n as usize,
            "nothing lost (killed after {delay_ms} ms)"
        );
        let dups = left.len() - total as usize;
        assert!(dups <= 1000, "at most one batch duplicated, got {dups}");
        total = left.len() as u32;
    }
    let _ = conn.close(200, "done".into()).await;
    sb.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tools_are_safe_while_the_worker_runs() {
    // city is always rejected (90033): those updates are dead-lettered.
    let faults = Faults {
        reject_attrs: vec!["city".into()],
        latency_ms: (1, 3),
        ..Faults::default()
    };
    let mut sb = sandbox(&["n", "city"], faults, |c| {
        c.attributes.allowed = vec!["n".into(), "city".into()];
    })
    .await;
    sb.start_worker();
    let c = sb.config.clone();
    // Some dead letters before the tools start.
    for i in 0..300 {
        sb.publish(update(&format!("bad{i}"), &[("city", &format!("c{i}"))]))
            .await
            .unwrap();
    }
    sb.wait_drained(DRAIN).await.unwrap();
    assert_eq!(sb.depth(&c.amqp.dead_letter_queue).await.unwrap(), 300);

    // Traffic keeps coming while every tool runs: good updates and bad ones.
    let sb = Arc::new(sb);
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let (sb, stop) = (sb.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 300;
            while !stop.load(Ordering::Relaxed) {
                sb.publish(update(&format!("bad{i}"), &[("city", &format!("c{i}"))]))
                    .await
                    .unwrap();
                sb.publish(update(&format!("ok{i}"), &[("n", &i.to_string())]))
                    .await
                    .unwrap();
                sb.confirm().await.unwrap();
                i += 1;
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            i
        })
    };
    let run = |args: &'static [&'static str]| {
        let c = c.clone();
        async move {
            let (code, out, err) = imattr_output(&c, args).await;
            assert_eq!(code, 0, "{args:?}: {err}");
            out
        }
    };
    let stats: serde_json::Value =
        serde_json::from_str(&run(&["dlq", "stats", "--json"]).await).unwrap();
    assert!(stats["total"].as_u64().unwrap() >= 300);
    run(&["dlq", "list", "--limit", "20"]).await;
    run(&["dlq", "list", "--json", "--reason", "rejected"]).await;
    run(&["dlq", "export", "--out", "/dev/null"]).await;
    run(&["dlq", "replay", "--dry-run"]).await;
    // Replayed messages fail again and come back; the replay still ends.
    let out = run(&["dlq", "replay", "--reason", "rejected"]).await;
    let replayed: usize = out.trim().trim_start_matches("replayed ").parse().unwrap();
    assert!(replayed >= 300, "{out}");
    run(&["dlq", "stats"]).await;
    stop.store(true, Ordering::Relaxed);
    let published = traffic.await.unwrap();
    sb.wait_drained(DRAIN).await.unwrap();

    // Every bad update is in the DLQ exactly once; every good one applied.
    let dead = sb.dead_letters().await.unwrap();
    let mut count: HashMap<String, usize> = HashMap::new();
    for d in &dead {
        *count.entry(d.account.clone().unwrap()).or_default() += 1;
    }
    let dups: Vec<_> = count.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dups.is_empty(), "duplicated dead letters: {dups:?}");
    for i in 0..published {
        assert!(count.contains_key(&format!("bad{i}")), "bad{i} lost");
    }
    assert_eq!(dead.len(), published);
    assert!(
        dead.iter().any(|d| d.headers["x-imattr-replays"] == 1),
        "replayed ones came back"
    );
    let state = sb.state();
    for i in 300..published {
        assert_eq!(state[&format!("ok{i}")]["n"], i.to_string());
    }
    Arc::into_inner(sb).unwrap().cleanup().await.unwrap();
}

/// Publishes `n` dead letters `0..n` for account `a`: the even ones
/// rejected, the odd ones invalid.
async fn fill(c: &Config, n: usize) {
    let mut dl = DeadLetters::new(c).await;
    for i in 0..n {
        let reason = if i % 2 == 0 {
            Reason::Rejected
        } else {
            Reason::InvalidMessage
        };
        dl.one(reason, "a", &i.to_string()).await;
    }
    dl.confirm().await;
}

/// Sends `sig` (`-INT`, `-STOP`, …) to a child process.
fn signal(sig: &str, child: &tokio::process::Child) {
    let pid = child.id().expect("the child runs").to_string();
    let status = std::process::Command::new("kill")
        .args([sig, &pid])
        .status()
        .unwrap();
    assert!(status.success(), "kill {sig} {pid}");
}

/// Waits until nothing reads the dead-letter queue.
async fn no_reader(c: &Config) {
    let conn = topology::connect(&c.amqp, "test watcher").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let q = &c.amqp.dead_letter_queue;
    eventually_async(|| async { imattr::dlq::pass::count(&ch, q).await.unwrap().1 == 0 }).await;
    let _ = conn.close(200, "done".into()).await;
}

/// The `n` attribute of each message, in order.
fn body_ns(messages: &[(String, FieldTable, Vec<u8>)]) -> Vec<String> {
    messages
        .iter()
        .map(|(_, _, b)| {
            let v: serde_json::Value = serde_json::from_slice(b).unwrap();
            v["Attrs"]["n"].as_str().unwrap().to_string()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_replay_loses_nothing_and_duplicates_at_most_a_batch() {
    // No worker: what the replay moves waits in the updates queue.
    let sb = sandbox(&["n"], Faults::default(), |_| {}).await;
    let c = sb.config.clone();
    let n = 20_000usize;
    fill(&c, n).await;
    let mut child = imattr(&c)
        .args(["dlq", "replay"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Killed once two batches (the default window is 2,000, a batch 1,000)
    // were moved: a third may be between its confirms and its ack.
    eventually_async(|| async { sb.depth(&c.amqp.queue).await.unwrap() >= 2000 }).await;
    child.start_kill().unwrap();
    let status = child.wait().await.unwrap();
    assert_eq!(status.signal(), Some(9), "killed mid-replay: {status:?}");
    no_reader(&c).await;

    let moved = drain(&c, &c.amqp.queue).await;
    for (_, h, _) in &moved {
        assert_eq!(deadletter::header_i64(h, deadletter::H_REPLAYS), Some(1));
    }
    let moved = body_ns(&moved);
    let left = ns(&peek_all(&c, 2000).await);
    assert!(moved.len() < n, "stopped mid-replay");
    let all: HashSet<&String> = moved.iter().chain(&left).collect();
    assert_eq!(all.len(), n, "nothing lost");
    let dups = moved.len() + left.len() - n;
    assert!(dups <= 1000, "at most one batch duplicated, got {dups}");
    // What was not sent is still in order, at the head.
    let sent: HashSet<&String> = moved.iter().collect();
    let unsent: Vec<&String> = left.iter().filter(|s| !sent.contains(s)).collect();
    let first = unsent[0].parse::<usize>().unwrap();
    let want: Vec<String> = (first..n).map(|i| i.to_string()).collect();
    assert_eq!(unsent, want.iter().collect::<Vec<_>>());
    sb.cleanup().await.unwrap();
}

/// SIGINT and SIGTERM stop a pass at a batch boundary: what it read is
/// settled (moved, or rotated to the tail), what it did not read goes back
/// to the head, and nothing is lost or duplicated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_and_sigterm_stop_a_pass_at_a_batch_boundary() {
    let sb = sandbox(&["n"], Faults::default(), |_| {}).await;
    let c = sb.config.clone();
    let n = 20_000usize;
    fill(&c, n).await;
    let dlq = c.amqp.dead_letter_queue.clone();
    let mut order: Vec<String> = (0..n).map(|i| i.to_string()).collect();
    let rejected = |s: &String| s.parse::<usize>().unwrap() % 2 == 0;
    for (sig, args) in [
        ("-INT", &["dlq", "stats"][..]),
        ("-TERM", &["dlq", "stats"][..]),
        ("-INT", &["dlq", "replay", "--reason", "rejected"][..]),
        ("-TERM", &["dlq", "replay", "--reason", "rejected"][..]),
    ] {
        let replay = args[1] == "replay";
        let total = order.len() as u32;
        let child = imattr(&c)
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Once the pass holds messages; a replay, once it settled a batch
        // (moved some, rotated the others).
        eventually_async(|| async {
            if replay {
                sb.depth(&c.amqp.queue).await.unwrap() > 0
            } else {
                sb.depth(&dlq).await.unwrap() < total
            }
        })
        .await;
        signal(sig, &child);
        let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .expect("the pass stops")
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{sig} {args:?}: {err}");
        assert!(err.contains("nothing was lost"), "{err}");
        let seen: usize = err
            .split("interrupted after ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{err}"));
        assert!(seen < order.len(), "{sig} {args:?}: stopped mid-pass");
        no_reader(&c).await;

        let moved = if replay {
            body_ns(&drain(&c, &c.amqp.queue).await)
        } else {
            Vec::new()
        };
        let left = ns(&peek_all(&c, 2000).await);
        let (read, unread) = order.split_at(seen);
        let want_moved: Vec<String> = read
            .iter()
            .filter(|s| replay && rejected(s))
            .cloned()
            .collect();
        let kept: Vec<String> = read
            .iter()
            .filter(|s| !(replay && rejected(s)))
            .cloned()
            .collect();
        // Within its first batch nothing is rotated: the kept ones stay in
        // place. After, they were rotated behind the unread ones.
        let want_left: Vec<String> = if seen < 1000 {
            kept.iter().chain(unread).cloned().collect()
        } else {
            unread.iter().chain(&kept).cloned().collect()
        };
        assert_eq!(moved, want_moved, "{sig} {args:?}: moved, after {seen}");
        assert_eq!(
            left, want_left,
            "{sig} {args:?}: left in order, none lost or duplicated, after {seen}"
        );
        order = left;
    }
    sb.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_reader_at_a_time_and_purge_refuses_while_a_pass_runs() {
    let sb = sandbox(&["n"], Faults::default(), |_| {}).await;
    let c = sb.config.clone();
    let n = 10_000usize;
    fill(&c, n).await;
    let conn = topology::connect(&c.amqp, "test watcher").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let dlq = c.amqp.dead_letter_queue.clone();
    let mut child = imattr(&c)
        .args(["dlq", "stats"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    eventually_async(|| async { imattr::dlq::pass::count(&ch, &dlq).await.unwrap().1 == 1 }).await;
    // Frozen mid-pass, it keeps its consumer and its window.
    signal("-STOP", &child);
    assert_eq!(
        imattr::dlq::pass::count(&ch, &dlq).await.unwrap().1,
        1,
        "the pass was stopped while it read"
    );
    let (code, _, err) = imattr_output(&c, &["dlq", "list"]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("only one may read it at a time"), "{err}");
    let (code, out, err) = imattr_output(&c, &["dlq", "purge", "--yes"]).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("is being read by 1 consumer"), "{err}");
    signal("-CONT", &child);
    let status = child.wait().await.unwrap();
    assert!(status.success(), "{status:?}");
    let _ = conn.close(200, "done".into()).await;
    let want: Vec<String> = (0..n).map(|i| i.to_string()).collect();
    assert_eq!(ns(&peek_all(&c, 2000).await), want, "nothing purged");
    sb.cleanup().await.unwrap();
}
