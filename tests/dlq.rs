//! The dead-letter store: reads change nothing, replay/delete/purge act only
//! on what was present when they started and are recorded in the ledger,
//! SIGKILL and SIGINT lose nothing, filters, pages, traces, and a legacy
//! (classic or quorum) dead-letter queue refused.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use imattr::amqp::deadletter::{dead_letter_properties, Failure, Reason};
use imattr::amqp::topology;
use imattr::config::Config;
use imattr::dlq::{By, DeadLetterView, Dlq, Filter, Groups, ReplayOptions, Summary, REPLAY_BATCH};
use imattr::publish::{update_properties, Publisher};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::BasicProperties;

const DRAIN: Duration = Duration::from_secs(30);

/// Publishes dead letters straight into the sandbox's dead-letter stream
/// (by name, through the default exchange), as the worker does.
struct DeadLetters {
    conn: lapin::Connection,
    publisher: Publisher,
    source_queue: String,
    dlq: String,
}

impl DeadLetters {
    async fn new(c: &Config) -> DeadLetters {
        let conn = topology::connect(&c.amqp, "test dead letters")
            .await
            .unwrap();
        let publisher = Publisher::new(&conn, "").await.unwrap();
        DeadLetters {
            conn,
            publisher,
            source_queue: c.amqp.queue.clone(),
            dlq: c.amqp.dead_letter_queue.clone(),
        }
    }

    fn props(&self, reason: Reason, account: &str, failed: &[&str]) -> BasicProperties {
        self.props_at(reason, account, failed, "test", 1)
    }

    fn props_at(
        &self,
        reason: Reason,
        account: &str,
        failed: &[&str],
        error: &str,
        failed_at_ms: i64,
    ) -> BasicProperties {
        let f = Failure {
            reason,
            code: if reason == Reason::Rejected { 90033 } else { 0 },
            error: error.into(),
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
            failed_at_ms,
        )
    }

    /// A dead letter of `{"To_Account":account,"Attrs":{"n":n}}`.
    async fn one(&mut self, reason: Reason, account: &str, n: &str) {
        let props = self.props(reason, account, &[]);
        self.publisher
            .publish(&self.dlq, &update(account, &[("n", n)]), props)
            .await
            .unwrap();
    }

    /// `_rk`, the original routing key, travels in the headers.
    async fn raw(&mut self, props: BasicProperties, _rk: &str, body: &[u8]) {
        self.publisher
            .publish(&self.dlq, body, props)
            .await
            .unwrap();
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
    assert_eq!(out.trim(), "moved 1, left 0, failed 0");
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
    assert_eq!(out.trim(), "moved 1, left 0, failed 0");
    sb.wait_drained(DRAIN).await.unwrap();
    assert_eq!(sb.state()["p1"]["n"], "1");
    cleanup(sb).await;
}

/// Deletes the ledger stream, then the sandbox's topology.
async fn cleanup(sb: imattr::sandbox::Sandbox) {
    let conn = topology::connect(&sb.config.amqp, "test cleanup")
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    for suffix in ["ledger", "inbox"] {
        let q = format!("{}.{suffix}", sb.config.amqp.dead_letter_queue);
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = conn.close(200, "done".into()).await;
    sb.cleanup().await.unwrap();
}

async fn open(c: &Config) -> Dlq {
    Dlq::open(c).await.unwrap()
}

/// Every unresolved dead letter, oldest first.
async fn peek_all(c: &Config) -> Vec<DeadLetterView> {
    let q = open(c).await;
    let v = q.peek(None).await.unwrap();
    q.close().await;
    v
}

fn ids(views: &[DeadLetterView]) -> Vec<u64> {
    views.iter().map(|v| v.id).collect()
}

fn replay_all(cancel: tokio_util::sync::CancellationToken) -> ReplayOptions {
    ReplayOptions {
        cancel,
        by: "test".into(),
        ..ReplayOptions::default()
    }
}

/// A replay running in a task, and how many it has moved so far.
fn spawn_replay(
    q: &Arc<Dlq>,
    o: ReplayOptions,
) -> (
    tokio::task::JoinHandle<imattr::dlq::ReplayReport>,
    Arc<AtomicU64>,
) {
    let moved = Arc::new(AtomicU64::new(0));
    let m = moved.clone();
    let q = q.clone();
    let task = tokio::spawn(async move {
        q.replay(&o, &move |p| m.store(p.moved, Ordering::SeqCst))
            .await
            .unwrap()
    });
    (task, moved)
}

/// `moved M, left L, failed F` from a replay's stdout.
fn final_line(out: &str) -> (u64, u64, u64) {
    let line = out
        .lines()
        .find(|l| l.starts_with("moved "))
        .unwrap_or_else(|| panic!("no final line in {out:?}"));
    let n: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    (n[0], n[1], n[2])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_read_run_ten_times_leaves_every_dead_letter() {
    let sb = sandbox(&["n"], Faults::default(), |_| {}).await;
    let c = sb.config.clone();
    fill(&c, 30).await;
    let before = peek_all(&c).await;
    assert_eq!(
        ns(&before),
        (0..30).map(|i| i.to_string()).collect::<Vec<_>>()
    );
    let q = open(&c).await;
    for _ in 0..10 {
        let p = q.page(&Filter::default(), None, 2).await.unwrap();
        assert_eq!(p.items.len(), 2);
        q.page(&Filter::default(), Some(10), 5).await.unwrap();
        q.peek(None).await.unwrap();
        assert_eq!(q.stats(&Filter::default()).await.unwrap().total, 30);
        let mut sink = Vec::new();
        assert_eq!(q.export(&Filter::default(), &mut sink).await.unwrap(), 30);
        assert!(q.show(before[3].id).await.unwrap().is_some());
        let dry = ReplayOptions {
            dry_run: true,
            ..replay_all(Default::default())
        };
        assert_eq!(q.replay(&dry, &|_| {}).await.unwrap().left, 30);
    }
    q.close().await;
    for args in [
        &["dlq", "list", "--limit", "2"][..],
        &["dlq", "list"][..],
        &["dlq", "stats"][..],
        &["dlq", "export"][..],
        &["dlq", "replay", "--dry-run"][..],
    ] {
        for _ in 0..10 {
            let (code, _, err) = imattr_output(&c, args).await;
            assert_eq!(code, 0, "{args:?}: {err}");
        }
    }
    let after = peek_all(&c).await;
    assert_eq!(after, before, "every dead letter still there, unchanged");
    cleanup(sb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cursor_pages_through_everything_once() {
    let sb = sandbox(&["n"], Faults::default(), |_| {}).await;
    let c = sb.config.clone();
    fill(&c, 25).await;
    let q = open(&c).await;
    let all = q.peek(None).await.unwrap();
    let mut after = None;
    let mut paged = Vec::new();
    let mut pages = 0;
    loop {
        let p = q.page(&Filter::default(), after, 10).await.unwrap();
        pages += 1;
        paged.extend(p.items);
        match p.next_after {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(ids(&paged), ids(&all));
    // A filtered page: only the rejected ones (even n), still in order.
    let f = Filter {
        reason: Some("rejected".into()),
        ..Filter::default()
    };
    let p = q.page(&f, Some(all[4].id), 3).await.unwrap();
    assert_eq!(ns(&p.items), ["6", "8", "10"]);
    assert_eq!(p.next_after, Some(p.items[2].id));
    q.close().await;

    let (code, out, err) = imattr_output(&c, &["dlq", "list", "--json", "--limit", "10"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(json_ns(&out).len(), 10);
    let cursor = all[9].id.to_string();
    assert!(err.contains(&format!("--after {cursor}")), "{err}");
    let (code, out, err) = imattr_output(&c, &["dlq", "list", "--json", "--after", &cursor]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(json_ns(&out), ns(&all[10..]));
    assert!(!err.contains("--after"), "the last page: {err}");
    cleanup(sb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grep_since_until_and_stats_by_error() {
    let sb = sandbox(&["n"], Faults::default(), |_| {}).await;
    let c = sb.config.clone();
    let mut dl = DeadLetters::new(&c).await;
    let rows: [(&str, &str, i64); 5] = [
        ("a1", "quota exceeded", 1_000),
        ("a2", "bad attr colour", 2_000),
        ("a3", "quota exceeded", 3_000),
        ("needle-account", "bad attr size", 4_000),
        ("a5", "quota exceeded", 5_000),
    ];
    for (i, (acc, err, at)) in rows.iter().enumerate() {
        let props = dl.props_at(Reason::Rejected, acc, &[], err, *at);
        dl.raw(props, acc, &update(acc, &[("n", &i.to_string())]))
            .await;
    }
    dl.confirm().await;
    let q = open(&c).await;
    let grep = |g: &str| Filter {
        grep: Some(g.into()),
        ..Filter::default()
    };
    let got = |f: Filter| {
        let q = &q;
        async move { ns(&q.page(&f, None, 100).await.unwrap().items) }
    };
    assert_eq!(got(grep("quota")).await, ["0", "2", "4"], "error text");
    assert_eq!(got(grep("needle")).await, ["3"], "body");
    assert_eq!(got(grep("nowhere")).await, Vec::<String>::new());
    let window = Filter {
        since_ms: Some(2_000),
        until_ms: Some(4_000),
        ..Filter::default()
    };
    assert_eq!(got(window.clone()).await, ["1", "2", "3"]);
    let both = Filter {
        grep: Some("bad attr".into()),
        ..window
    };
    assert_eq!(got(both).await, ["1", "3"]);
    let s = q.stats(&Filter::default()).await.unwrap();
    assert_eq!(
        s.by(By::Error),
        [
            ("quota exceeded".to_string(), 3),
            ("bad attr colour".to_string(), 1),
            ("bad attr size".to_string(), 1)
        ]
    );
    q.close().await;

    // The same through the CLI, times in RFC 3339 and in ms.
    let (code, out, err) = imattr_output(
        &c,
        &[
            "dlq",
            "list",
            "--json",
            "--since",
            "1970-01-01T00:00:02Z",
            "--until",
            "3000",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(json_ns(&out), ["1", "2"]);
    let (code, out, err) = imattr_output(&c, &["dlq", "stats", "--by", "error"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("by error:") && out.contains("3  quota exceeded"),
        "{out}"
    );
    let (code, _, err) = imattr_output(&c, &["dlq", "list", "--since", "yesterday"]).await;
    assert_eq!(code, 2, "{err}");
    cleanup(sb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_acts_only_on_what_was_present_at_the_start() {
    let sb = sandbox(&["n"], Faults::default(), |_| {}).await;
    let c = sb.config.clone();
    let n = 1500usize;
    let mut dl = DeadLetters::new(&c).await;
    for i in 0..n {
        dl.one(Reason::Rejected, "a", &i.to_string()).await;
    }
    dl.confirm().await;
    let q = Arc::new(open(&c).await);
    let (task, moved) = spawn_replay(
        &q,
        ReplayOptions {
            rate_per_sec: Some(1000.0),
            ..replay_all(Default::default())
        },
    );
    // More dead letters arrive once the replay is under way.
    eventually_async(|| async { moved.load(Ordering::SeqCst) > 0 }).await;
    let mut dl = DeadLetters::new(&c).await;
    for i in n..n + 300 {
        dl.one(Reason::Rejected, "a", &i.to_string()).await;
    }
    dl.confirm().await;
    let report = task.await.unwrap();
    assert!(
        moved.load(Ordering::SeqCst) < n as u64 || report.moved == n as u64,
        "the new ones came during the replay"
    );
    assert_eq!((report.moved, report.left, report.failed), (n as u64, 0, 0));
    let sent = body_ns(&drain(&c, &c.amqp.queue).await);
    assert_eq!(sent, (0..n).map(|i| i.to_string()).collect::<Vec<_>>());
    let left = q.peek(None).await.unwrap();
    assert_eq!(
        ns(&left),
        (n..n + 300).map(|i| i.to_string()).collect::<Vec<_>>()
    );
    Arc::try_unwrap(q).unwrap().close().await;
    cleanup(sb).await;
}

/// Stores `entry` in `stream` as it is, not the AMQP 1.0 RabbitMQ writes.
async fn store_raw(c: &Config, stream: &str, entry: &[u8]) {
    let mut r = imattr::amqp::stream::StreamReader::connect(&c.amqp, "test raw entry")
        .await
        .unwrap();
    r.publish_raw(stream, &[entry]).await.unwrap();
    r.close().await;
}

/// An entry the reader cannot decode is listed with its error, never
/// replayed (counted as failed), and the rest of the store is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_dead_letter_is_shown_and_never_replayed() {
    let sb = sandbox(&["n"], Faults::default(), |_| {}).await;
    let c = sb.config.clone();
    open(&c).await.close().await;
    // First in the store: it must not take the place of one that can be sent.
    store_raw(
        &c,
        &c.amqp.dead_letter_queue,
        b"\x00\x53\x75\xee not AMQP 1.0",
    )
    .await;
    // Nothing else to send: still reported, not a silent success.
    let (code, out, err) = imattr_output(&c, &["dlq", "replay", "--limit", "5"]).await;
    assert_eq!(code, 1, "{out}{err}");
    assert_eq!(final_line(&out), (0, 0, 1), "{out}");
    fill(&c, 3).await;
    let (code, out, err) = imattr_output(&c, &["dlq", "list", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 4, "{out}");
    assert!(
        out.contains("the store could not decode this entry"),
        "{out}"
    );
    let (code, out, err) = imattr_output(&c, &["dlq", "replay", "--dry-run"]).await;
    assert_eq!((code, out.trim()), (0, "would replay 3"), "{err}");
    let (code, out, err) = imattr_output(&c, &["dlq", "replay", "--limit", "1"]).await;
    assert_eq!(code, 1, "one not replayed: {out}{err}");
    assert_eq!(final_line(&out), (1, 2, 1), "{out}");
    let (code, out, err) = imattr_output(&c, &["dlq", "replay"]).await;
    assert_eq!(code, 1, "one not replayed: {out}{err}");
    assert_eq!(final_line(&out), (2, 0, 1), "{out}");
    assert_eq!(body_ns(&drain(&c, &c.amqp.queue).await), ["0", "1", "2"]);
    let left = peek_all(&c).await;
    assert_eq!(left.len(), 1, "the undecodable one stays");
    cleanup(sb).await;
}

/// A ledger entry this version cannot read (not decodable, or an action it
/// does not know) stops the commands: skipping it would show what it
/// resolved as unresolved again. Something that is no ledger entry at all
/// is skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_ledger_entry_stops_the_commands() {
    /// How an entry reaches the ledger.
    enum Entry {
        /// Over the stream protocol, as it is: not decodable.
        Raw(&'static [u8]),
        /// Published to the ledger by name, as an AMQP 0-9-1 message.
        Published(&'static [u8]),
    }
    let newer = br#"{"action":"archived","at_ms":1,"by":"newer","ranges":[[1,2]]}"#;
    for (entry, stops) in [
        (Entry::Raw(b"\x00\x53\x75\xee not AMQP 1.0"), true),
        (Entry::Published(newer), true),
        // A stray publish to the ledger by name resolves nothing and stops nothing.
        (Entry::Published(b"hello from the management UI"), false),
    ] {
        let sb = sandbox(&["n"], Faults::default(), |_| {}).await;
        let c = sb.config.clone();
        fill(&c, 3).await;
        let all = peek_all(&c).await;
        let (code, _, err) = imattr_output(&c, &["dlq", "delete", &all[0].id.to_string()]).await;
        assert_eq!(code, 0, "{err}");
        let ledger = format!("{}.ledger", c.amqp.dead_letter_queue);
        match entry {
            Entry::Raw(bytes) => store_raw(&c, &ledger, bytes).await,
            Entry::Published(body) => {
                let mut dl = DeadLetters::new(&c).await;
                dl.publisher
                    .publish(&ledger, body, BasicProperties::default())
                    .await
                    .unwrap();
                dl.confirm().await;
            }
        }
        if stops {
            for cmd in [&["dlq", "list"][..], &["dlq", "stats"], &["dlq", "replay"]] {
                let (code, out, err) = imattr_output(&c, cmd).await;
                assert_ne!(code, 0, "{cmd:?}: {out}");
                assert!(
                    err.contains("cannot read") && err.contains(&ledger),
                    "{cmd:?}: {err}"
                );
            }
            assert_eq!(
                sb.depth(&c.amqp.queue).await.unwrap(),
                0,
                "nothing replayed"
            );
        } else {
            assert_eq!(ns(&peek_all(&c).await), ["1", "2"]);
        }
        cleanup(sb).await;
    }
}

/// A ledger declared but left without its first entry (a command stopped
/// in between) is given one: reads do not wait for its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_ledger_is_given_its_first_entry() {
    let sb = sandbox(&["n"], Faults::default(), |_| {}).await;
    let c = sb.config.clone();
    fill(&c, 2).await;
    let conn = topology::connect(&c.amqp, "test empty ledger")
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        format!("{}.ledger", c.amqp.dead_letter_queue)
            .as_str()
            .into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        topology::dead_letter_queue_arguments(&c.amqp),
    )
    .await
    .unwrap();
    let _ = conn.close(200, "done".into()).await;
    let (code, out, err) = imattr_output(&c, &["dlq", "list", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(json_ns(&out), ["0", "1"]);
    cleanup(sb).await;
}

/// Reads given up half-way, hundreds of times (a console request whose
/// client went away), leave the reader able to read: no subscription they
/// opened is left to collide with a later one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_given_up_half_way_leave_the_reader_whole() {
    let sb = sandbox(&["n"], Faults::default(), |_| {}).await;
    let c = sb.config.clone();
    fill(&c, 50).await;
    let dlq = c.amqp.dead_letter_queue.clone();
    let mut r = imattr::amqp::stream::StreamReader::connect(&c.amqp, "test given up")
        .await
        .unwrap();
    let last = r.last_offset(&dlq).await.unwrap().unwrap();
    let mut given_up = 0;
    for _ in 0..300 {
        let read = r.read(&dlq, 0, last, |_| std::ops::ControlFlow::Continue(()));
        if tokio::time::timeout(Duration::from_micros(1), read)
            .await
            .is_err()
        {
            given_up += 1;
        }
    }
    assert!(given_up > 256, "only {given_up} reads were given up");
    let mut seen = 0;
    let n = r
        .read(&dlq, 0, last, |_| {
            seen += 1;
            std::ops::ControlFlow::Continue(())
        })
        .await
        .unwrap();
    assert_eq!((n, seen), (50, 50));
    r.close().await;
    cleanup(sb).await;
}

/// With the first node of `amqp.url` down, the commands read the store
/// from the next one (over AMQP and over the stream protocol alike).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_down_first_in_the_list_is_passed_over() {
    let sb = sandbox(&["n"], Faults::default(), |_| {}).await;
    let mut c = sb.config.clone();
    fill(&c, 3).await;
    let live = std::env::var("IMATTR_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    // A host that does not resolve: the stream port is one setting for all
    // nodes, so a dead port on the same host would still reach the broker.
    c.amqp.url = imattr::config::AmqpUrl::new(format!(
        "amqp://guest:guest@node-down.invalid:5672/%2f,{live}"
    ));
    let (code, out, err) = imattr_output(&c, &["dlq", "list", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(json_ns(&out), ["0", "1", "2"]);
    cleanup(sb).await;
}

/// A paced replay holds the reader only while it reads: the console's pages
/// and counts, which share it, are served while the replay runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paced_replay_lets_pages_be_read_meanwhile() {
    let sb = sandbox(&["n"], Faults::default(), |_| {}).await;
    let c = sb.config.clone();
    fill(&c, 6).await;
    let q = Arc::new(open(&c).await);
    // Two a second: three seconds in all.
    let (task, moved) = spawn_replay(
        &q,
        ReplayOptions {
            rate_per_sec: Some(2.0),
            ..replay_all(Default::default())
        },
    );
    eventually_async(|| async { moved.load(Ordering::SeqCst) > 0 }).await;
    let page = q.page(&Filter::default(), None, 10).await.unwrap();
    assert!(
        moved.load(Ordering::SeqCst) < 6 && !task.is_finished(),
        "the page was read only once the replay had ended"
    );
    assert!(!page.items.is_empty());
    let report = task.await.unwrap();
    assert_eq!((report.moved, report.left, report.failed), (6, 0, 0));
    assert!(q.peek(None).await.unwrap().is_empty());
    Arc::try_unwrap(q).unwrap().close().await;
    cleanup(sb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_replay_loses_nothing_and_duplicates_at_most_a_batch() {
    let sb = sandbox(&["n"], Faults::default(), |_| {}).await;
    let c = sb.config.clone();
    let n = 4000usize;
    fill(&c, n).await;
    let mut child = imattr(&c)
        .args(["dlq", "replay", "--rate", "2000"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    eventually_async(|| async { sb.depth(&c.amqp.queue).await.unwrap() > 700 }).await;
    signal("-KILL", &child);
    child.wait().await.unwrap();
    let (code, out, err) = imattr_output(&c, &["dlq", "replay"]).await;
    assert_eq!(code, 0, "{err}");
    let (moved, left, failed) = final_line(&out);
    assert!(moved > 0 && moved < n as u64, "{out}");
    assert_eq!((left, failed), (0, 0));
    let sent = body_ns(&drain(&c, &c.amqp.queue).await);
    let mut times: HashMap<&str, usize> = HashMap::new();
    for s in &sent {
        *times.entry(s.as_str()).or_default() += 1;
    }
    for i in 0..n {
        assert!(times.contains_key(i.to_string().as_str()), "{i} lost");
    }
    let dups = sent.len() - n;
    assert!(dups <= REPLAY_BATCH, "{dups} duplicates");
    assert!(peek_all(&c).await.is_empty(), "every one resolved");
    // Nothing was taken off the store: all still listed as resolved.
    let (code, out, err) = imattr_output(&c, &["dlq", "list", "--json", "--resolved"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), n);
    assert!(out
        .lines()
        .all(|l| l.contains("\"resolved\":\"replayed at ")));
    cleanup(sb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_stops_a_replay_at_a_batch_boundary() {
    let sb = sandbox(&["n"], Faults::default(), |_| {}).await;
    let c = sb.config.clone();
    let n = 3000usize;
    fill(&c, n).await;
    let child = imattr(&c)
        .args(["dlq", "replay", "--rate", "1000"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    eventually_async(|| async { sb.depth(&c.amqp.queue).await.unwrap() > 0 }).await;
    signal("-INT", &child);
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("the replay stops")
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("interrupted after") && stderr.contains("nothing was lost"),
        "{stderr}"
    );
    let (moved, left, failed) = final_line(&stdout);
    assert!(moved > 0 && left > 0, "{stdout}");
    assert_eq!(moved + left + failed, n as u64);
    let sent = body_ns(&drain(&c, &c.amqp.queue).await);
    let want: Vec<String> = (0..moved as usize).map(|i| i.to_string()).collect();
    assert_eq!(sent, want, "exactly the recorded ones went, once");
    let rest = peek_all(&c).await;
    assert_eq!(
        ns(&rest),
        (moved as usize..n)
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
    );
    cleanup(sb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_and_purge_resolve_only_what_they_name() {
    let sb = sandbox(&["n"], Faults::default(), |_| {}).await;
    let c = sb.config.clone();
    fill(&c, 10).await;
    let all = peek_all(&c).await;
    let (a, b) = (all[1].id.to_string(), all[2].id.to_string());
    let (code, out, err) = imattr_output(&c, &["dlq", "delete", &a, &b]).await;
    assert_eq!((code, out.trim()), (0, "deleted 2"), "{err}");
    let (code, _, err) = imattr_output(&c, &["dlq", "delete"]).await;
    assert_eq!(code, 2, "no ids, no filter: {err}");
    let (code, out, err) = imattr_output(
        &c,
        &["dlq", "purge", "--yes", "--reason", "invalid-message"],
    )
    .await;
    // 1, 3, 5, 7, 9 are invalid-message; 1 was deleted already.
    assert_eq!((code, out.trim()), (0, "purged 4"), "{err}");
    assert_eq!(ns(&peek_all(&c).await), ["0", "4", "6", "8"]);
    let (code, out, err) = imattr_output(&c, &["dlq", "show", &b]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"resolved\": \"deleted at "), "{out}");
    let (code, out, err) = imattr_output(&c, &["dlq", "purge", "--yes"]).await;
    assert_eq!((code, out.trim()), (0, "purged 4"), "{err}");
    assert!(peek_all(&c).await.is_empty());
    let (code, _, err) = imattr_output(&c, &["dlq", "show", "999999"]).await;
    assert_eq!(code, 2, "{err}");
    cleanup(sb).await;
}

/// The store's end, taken when a console confirmation counts, bounds the
/// action: what is stored after it is left, whatever its failure time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_action_bounded_by_the_end_leaves_what_came_after() {
    let sb = sandbox(&["n"], Faults::default(), |_| {}).await;
    let c = sb.config.clone();
    let q = open(&c).await;
    let all = Filter::default();
    assert_eq!(
        q.count_to_end(&all).await.unwrap(),
        (0, 0),
        "an empty store"
    );
    fill(&c, 4).await;
    let (n, end) = q.count_to_end(&all).await.unwrap();
    assert_eq!((n, end), (4, ids(&peek_all(&c).await)[3] + 1));
    // Later, failed at the same (long past) time as the first four.
    fill(&c, 3).await;
    let bounded = |f: Filter| Filter {
        before_id: Some(end),
        ..f
    };
    let by_account = bounded(Filter {
        account: Some("a".into()),
        ..Filter::default()
    });
    assert_eq!(q.stats(&by_account).await.unwrap().total, 4);
    let now = Filter {
        account: Some("a".into()),
        ..Filter::default()
    };
    assert_eq!(q.count_to_end(&now).await.unwrap(), (7, end + 3));
    assert_eq!(
        q.delete(&bounded(Filter::default()), "test").await.unwrap(),
        4
    );
    assert_eq!(ns(&peek_all(&c).await), ["0", "1", "2"]);
    q.close().await;
    cleanup(sb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_that_comes_back_shows_its_replays() {
    let sb = sandbox(&["n"], Faults::default(), |_| {}).await;
    let c = sb.config.clone();
    fill(&c, 1).await;
    let (code, out, err) = imattr_output(&c, &["dlq", "replay"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "moved 1, left 0, failed 0");
    // The worker fails it again: what it dead-letters carries the replay's headers.
    let conn = topology::connect(&c.amqp, "test again").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(1, BasicQosOptions::default()).await.unwrap();
    let mut consumer = ch
        .basic_consume(
            c.amqp.queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let f = Failure {
        reason: Reason::Rejected,
        code: 90033,
        error: "again".into(),
        account: Some("a".into()),
        attempts: 1,
    };
    let props = dead_letter_properties(&d.properties, &f, &[], &c.amqp.queue, "a", 2);
    let mut p = Publisher::new(&conn, "").await.unwrap();
    p.publish(&c.amqp.dead_letter_queue, &d.data, props)
        .await
        .unwrap();
    p.finish().await.unwrap();
    d.acker.ack(BasicAckOptions::default()).await.unwrap();
    let _ = conn.close(200, "done".into()).await;

    let now = peek_all(&c).await;
    assert_eq!(now.len(), 1);
    assert_eq!(now[0].replays, 1);
    assert!(now[0].last_replayed_at_ms.is_some());
    assert_eq!(now[0].error.as_deref(), Some("again"));
    let (code, table, err) = imattr_output(&c, &["dlq", "list", "--resolved", "--wide"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(table.contains("replayed 1x, last "), "{table}");
    assert!(
        table.contains("replayed at "),
        "the first one, resolved: {table}"
    );
    cleanup(sb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legacy_dead_letter_queue_is_refused_with_exit_2() {
    let sb = sandbox(&["n"], Faults::default(), |_| {}).await;
    let conn = topology::connect(&sb.config.amqp, "test legacy")
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    for (kind, args) in [("classic", None), ("quorum", Some("quorum"))] {
        let mut c = sb.config.clone();
        c.amqp.dead_letter_queue = format!("{}.legacy.{kind}", sb.config.amqp.dead_letter_queue);
        let mut t = FieldTable::default();
        if let Some(k) = args {
            t.insert(
                "x-queue-type".into(),
                lapin::types::AMQPValue::LongString(k.into()),
            );
        }
        ch.queue_declare(
            c.amqp.dead_letter_queue.as_str().into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            t,
        )
        .await
        .unwrap();
        for args in [
            &["dlq", "list"][..],
            &["dlq", "stats"][..],
            &["dlq", "replay"][..],
            &["dlq", "purge", "--yes"][..],
        ] {
            let (code, _, err) = imattr_output(&c, args).await;
            assert_eq!(code, 2, "{kind} {args:?}: {err}");
            assert!(err.contains(&c.amqp.dead_letter_queue), "{err}");
            assert!(err.contains(&format!("{kind} queue")), "{err}");
            assert!(err.contains("imattr dlq migrate"), "{err}");
        }
        ch.queue_delete(
            c.amqp.dead_letter_queue.as_str().into(),
            QueueDeleteOptions::default(),
        )
        .await
        .unwrap();
    }
    let _ = conn.close(200, "done".into()).await;
    cleanup(sb).await;
}

/// Dead letters with a few reasons, codes, error texts and failure times.
async fn fill_varied(c: &Config, n: usize, from: usize) {
    let mut dl = DeadLetters::new(c).await;
    for i in from..from + n {
        let reason = [
            Reason::Rejected,
            Reason::InvalidMessage,
            Reason::RetriesExhausted,
        ][i % 3];
        let error = ["quota exceeded", "bad attr", "timeout"][i % 5 % 3];
        let acc = format!("a{}", i % 4);
        let props = dl.props_at(reason, &acc, &[], error, 1_000 * (i as i64 % 7));
        dl.raw(props, &acc, &update(&acc, &[("n", &i.to_string())]))
            .await;
    }
    dl.confirm().await;
}

/// The summary's answers equal a full read's for filters it answers, and it
/// answers none on account or text.
async fn same_as_a_full_read(q: &Dlq, s: &mut Summary) {
    q.refresh_summary(s).await.unwrap();
    let mut filters = vec![Filter::default()];
    for r in [
        "rejected",
        "invalid-message",
        "retries-exhausted",
        "broker:expired",
    ] {
        filters.push(Filter {
            reason: Some(r.into()),
            ..Filter::default()
        });
    }
    filters.push(Filter {
        code: Some(90033),
        since_ms: Some(2_000),
        until_ms: Some(5_000),
        ..Filter::default()
    });
    for f in &filters {
        let full: Groups = q.stats(f).await.unwrap().into();
        assert_eq!(s.groups(f).as_ref(), Some(&full), "{f:?}");
        assert_eq!(s.count(f), Some(full.total), "{f:?}");
    }
    let account = Filter {
        account: Some("a1".into()),
        ..Filter::default()
    };
    assert_eq!(s.count(&account), None);
}

/// The console's summary counts as a full read does, before and after a
/// delete and a replay (the ledger's entries), after more dead letters come
/// (reading only those), and after the store is deleted and declared again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_summary_counts_as_a_full_read() {
    let sb = sandbox(&["n"], Faults::default(), |_| {}).await;
    let c = sb.config.clone();
    fill_varied(&c, 60, 0).await;
    let q = open(&c).await;
    let mut s = Summary::new();
    same_as_a_full_read(&q, &mut s).await;
    assert_eq!(s.len(), 60);

    // Resolved: some deleted, some replayed.
    let all = q.peek(None).await.unwrap();
    let ids: Vec<u64> = all.iter().step_by(7).map(|v| v.id).collect();
    let deleted = q
        .delete(
            &Filter {
                ids: Some(ids.clone()),
                ..Filter::default()
            },
            "test",
        )
        .await
        .unwrap();
    assert_eq!(deleted, ids.len() as u64);
    let replay = ReplayOptions {
        filter: Filter {
            reason: Some("rejected".into()),
            ..Filter::default()
        },
        limit: Some(6),
        ..replay_all(Default::default())
    };
    assert_eq!(q.replay(&replay, &|_| {}).await.unwrap().moved, 6);
    same_as_a_full_read(&q, &mut s).await;
    assert_eq!(s.len(), 60 - ids.len() - 6);

    // More come: only they are read.
    fill_varied(&c, 25, 60).await;
    let read = q.refresh_summary(&mut s).await.unwrap();
    assert_eq!(read, 25);
    same_as_a_full_read(&q, &mut s).await;
    assert_eq!(s.len(), 85 - ids.len() - 6);
    q.close().await;

    // The store deleted and declared again, with more offsets than before:
    // read again from its start.
    let conn = topology::connect(&c.amqp, "test recreate").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    for q in [
        c.amqp.dead_letter_queue.clone(),
        format!("{}.ledger", c.amqp.dead_letter_queue),
    ] {
        ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await
            .unwrap();
    }
    let _ = conn.close(200, "done".into()).await;
    let q = open(&c).await;
    fill_varied(&c, 100, 0).await;
    let read = q.refresh_summary(&mut s).await.unwrap();
    assert_eq!(read, 100);
    assert_eq!(s.len(), 100);
    same_as_a_full_read(&q, &mut s).await;
    q.close().await;
    cleanup(sb).await;
}

/// Retention drops the store's oldest segments: the summary drops their
/// rows and still counts as a full read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_summary_follows_retention() {
    let sb = sandbox(&["n"], Faults::default(), |_| {}).await;
    let c = sb.config.clone();
    // The store declared again in small segments of which a few are kept
    // (a policy, so that it is declared as ever).
    let dlq = c.amqp.dead_letter_queue.clone();
    let policy = format!("{dlq}.retention");
    let conn = topology::connect(&c.amqp, "test segments").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.queue_delete(dlq.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    rabbitmqctl(&[
        "set_policy",
        &policy,
        &format!("^{}$", dlq.replace('.', "\\.")),
        r#"{"stream-max-segment-size-bytes":4000,"max-length-bytes":20000}"#,
        "--apply-to",
        "queues",
    ]);
    ch.queue_declare(
        dlq.as_str().into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        topology::dead_letter_queue_arguments(&c.amqp),
    )
    .await
    .unwrap();
    let _ = conn.close(200, "done".into()).await;
    fill_varied(&c, 100, 0).await;
    let q = open(&c).await;
    let mut s = Summary::new();
    let mut reader = imattr::amqp::stream::StreamReader::connect(&c.amqp, "test retention")
        .await
        .unwrap();
    let was = reader.first_offset(&dlq).await.unwrap().unwrap();
    q.refresh_summary(&mut s).await.unwrap();
    let mut from = 100;
    let mut first = was;
    // A few at a time, each read into the summary, until retention drops
    // rows it holds (not only ones it never read).
    for _ in 0..200 {
        fill_varied(&c, 10, from).await;
        from += 10;
        first = reader.first_offset(&dlq).await.unwrap().unwrap();
        if first > was {
            break;
        }
        q.refresh_summary(&mut s).await.unwrap();
    }
    reader.close().await;
    rabbitmqctl(&["clear_policy", &policy]);
    assert!(first > was, "retention dropped nothing");
    let read = q.refresh_summary(&mut s).await.unwrap();
    assert_eq!(read, 10, "only the new ones read");
    same_as_a_full_read(&q, &mut s).await;
    // Offsets hold more than dead letters (a segment starts with the
    // broker's own entry): the rows are the dead letters still there.
    let left = q.peek(None).await.unwrap();
    assert!(left[0].id >= first, "{} < {first}", left[0].id);
    assert_eq!(s.len(), left.len());
    q.close().await;
    cleanup(sb).await;
}

/// Informal figures (no assertion on time): `IMATTR_DLQ_MEASURE=N cargo test
/// --release --test dlq measure -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure() {
    let n: usize = std::env::var("IMATTR_DLQ_MEASURE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let sb = sandbox(&["n"], Faults::default(), |_| {}).await;
    let c = sb.config.clone();
    let t = std::time::Instant::now();
    fill(&c, n).await;
    println!("fill {n}: {:?}", t.elapsed());
    let q = open(&c).await;
    let t = std::time::Instant::now();
    let p = q.page(&Filter::default(), None, 50).await.unwrap();
    println!("list first page: {:?}", t.elapsed());
    let t = std::time::Instant::now();
    let later = Some(p.items[0].id + n as u64 * 9 / 10);
    q.page(&Filter::default(), later, 50).await.unwrap();
    println!("list later page (--after at 90%): {:?}", t.elapsed());
    let t = std::time::Instant::now();
    let s = q.stats(&Filter::default()).await.unwrap();
    println!("stats {}: {:?}", s.total, t.elapsed());
    let t = std::time::Instant::now();
    let mut sink = std::io::sink();
    let e = q.export(&Filter::default(), &mut sink).await.unwrap();
    let el = t.elapsed();
    println!(
        "export {e}: {el:?} ({:.0} msgs/s)",
        e as f64 / el.as_secs_f64()
    );
    let t = std::time::Instant::now();
    let o = ReplayOptions {
        limit: Some(10_000.min(n)),
        ..replay_all(Default::default())
    };
    let r = q.replay(&o, &|_| {}).await.unwrap();
    println!("replay {}: {:?}", r.moved, t.elapsed());
    q.close().await;
    cleanup(sb).await;
}
