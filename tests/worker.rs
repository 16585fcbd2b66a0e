//! The worker against the real RabbitMQ and the simulator.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn attrs(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Decided by order, not speed: a request goes out when two accounts are
/// ready (never on its age here), and the queue delivers the second account
/// only after all 301 updates of the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_updates_for_one_account_coalesce_into_one_entry() {
    let mut sb = sandbox(&["sex", "city"], Faults::default(), |c| {
        c.batch.max_accounts = 2;
        c.batch.max_wait_ms = 60_000;
    })
    .await;
    for i in 0..300 {
        sb.publish(update("hot", &[("city", &format!("c{i}"))]))
            .await
            .unwrap();
    }
    sb.publish(update("hot", &[("sex", "f")])).await.unwrap();
    sb.publish(update("cold", &[("city", "x")])).await.unwrap();
    sb.confirm().await.unwrap();
    sb.start_worker();
    sb.wait_drained(DRAIN).await.unwrap();
    let stats = sb.sim.stats();
    assert_eq!(stats.total("im_set_attr"), 1, "{stats:?}");
    assert_eq!(stats.accounts_written, 2, "one entry each: {stats:?}");
    assert_eq!(stats.requests_with_duplicate_accounts, 0);
    assert_eq!(sb.state()["hot"], attrs(&[("city", "c299"), ("sex", "f")]));
    assert_eq!(sb.state()["cold"], attrs(&[("city", "x")]));
    assert!(sb.dead_letters().await.unwrap().is_empty());
    finish(sb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_hold_at_most_max_accounts_each_once() {
    let mut sb = sandbox(&["n"], Faults::default(), |c| c.batch.max_accounts = 20).await;
    sb.start_worker();
    let mut expected = HashMap::new();
    for i in 0..2000 {
        let a = format!("u{}", i % 137);
        let v = i.to_string();
        sb.publish(update(&a, &[("n", &v)])).await.unwrap();
        expected.insert(a, attrs(&[("n", &v)]));
    }
    sb.wait_drained(DRAIN).await.unwrap();
    let stats = sb.sim.stats();
    assert!(stats.max_accounts_in_request <= 20, "{stats:?}");
    assert!(stats.max_accounts_in_request > 1, "{stats:?}");
    assert_eq!(stats.requests_with_duplicate_accounts, 0);
    assert_eq!(stats.overlapping_account_requests, 0);
    let state = sb.state();
    assert_eq!(state.len(), expected.len());
    for (a, v) in &expected {
        assert_eq!(&state[a], v, "account {a}");
    }
    sb.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried_until_applied() {
    let faults = Faults {
        fail_rate: 1.0,
        ..Faults::default()
    };
    let mut sb = sandbox(&["k"], faults, |_| {}).await;
    sb.start_worker();
    for i in 0..30 {
        sb.publish(update(&format!("a{i}"), &[("k", "v")]))
            .await
            .unwrap();
    }
    sb.confirm().await.unwrap();
    let sim = &sb.sim;
    eventually(DRAIN, "three 91000 answers", || {
        sim.stats().count("im_set_attr", 91000) >= 3
    })
    .await;
    assert!(sb.state().is_empty());
    sb.sim.update_faults(|f| f.fail_rate = 0.0);
    sb.wait_drained(DRAIN).await.unwrap();
    assert_eq!(sb.state().len(), 30);
    assert!(sb.dead_letters().await.unwrap().is_empty());
    finish(sb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_rejected_account_among_fifty_is_isolated() {
    let faults = Faults {
        reject_attrs: vec!["bad".into()],
        ..Faults::default()
    };
    let mut sb = sandbox(&["city", "bad"], faults, |c| c.batch.max_wait_ms = 300).await;
    let mut bodies = Vec::new();
    for i in 0..49 {
        bodies.push(update(&format!("good{i}"), &[("city", &format!("c{i}"))]));
    }
    let bad_alone = update("badone", &[("city", "x"), ("bad", "1")]);
    bodies.insert(20, bad_alone.clone());
    // One account, one good and one bad message, merged into one entry.
    let mixed_good = update("mixed", &[("city", "good")]);
    let mixed_bad = update("mixed", &[("bad", "2")]);
    bodies.push(mixed_good);
    bodies.push(mixed_bad.clone());
    for b in &bodies {
        sb.publish(b).await.unwrap();
    }
    sb.confirm().await.unwrap();
    let before_ms = imattr::amqp::deadletter::now_ms();
    sb.start_worker();
    sb.wait_drained(DRAIN).await.unwrap();

    let state = sb.state();
    for i in 0..49 {
        assert_eq!(
            state[&format!("good{i}")],
            attrs(&[("city", &format!("c{i}"))])
        );
    }
    assert!(!state.contains_key("badone"));
    assert_eq!(state["mixed"], attrs(&[("city", "good")]));

    let dead = sb.dead_letters().await.unwrap();
    assert_eq!(dead.len(), 2, "{dead:#?}");
    let by_account: HashMap<_, _> = dead
        .iter()
        .map(|d| (d.account.clone().unwrap(), d))
        .collect();
    for (account, body) in [("badone", &bad_alone), ("mixed", &mixed_bad)] {
        let d = by_account[account];
        assert_eq!(d.body.as_bytes(), &body[..], "body byte for byte");
        assert_eq!(d.reason.as_deref(), Some("rejected"));
        assert_eq!(d.code, Some(90033));
        assert!(d.error.as_deref().unwrap().contains("bad"), "{d:?}");
        assert!(d.attempts.unwrap() >= 2, "{d:?}");
        let at = d.failed_at_ms.unwrap();
        assert!(at >= before_ms && at <= imattr::amqp::deadletter::now_ms());
        assert_eq!(d.routing_key.as_deref(), Some(account));
        assert_eq!(
            d.headers["x-imattr-source-queue"],
            sb.config.amqp.queue.as_str()
        );
        assert_eq!(d.properties["content_type"], "application/json");
        assert_eq!(d.properties["delivery_mode"], 2);
    }
    finish(sb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_invalid_kind_is_dead_lettered_with_its_rule() {
    let mut sb = sandbox(&["sex", "city"], Faults::default(), |c| {
        c.attributes.allowed = vec!["sex".into(), "city".into()];
    })
    .await;
    sb.start_worker();
    let long_value = "v".repeat(51);
    let long_account = "a".repeat(33);
    let long_name = "n".repeat(51);
    let eleven: String = (0..11)
        .map(|i| format!("\"k{i}\":\"v\""))
        .collect::<Vec<_>>()
        .join(",");
    let many: String = (0..1001)
        .map(|i| format!("{{\"To_Account\":\"u{i}\",\"Attrs\":{{\"sex\":\"v\"}}}}"))
        .collect::<Vec<_>>()
        .join(",");
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![0xc3, 0x28, b'{'], "not UTF-8"),
        (b"{\"To_Account\": \"x\", ".to_vec(), "not valid JSON"),
        (vec![b' '; 1024 * 1024 + 1], "over the 1048576-byte limit"),
        (b"[1,2,3]".to_vec(), "neither"),
        (
            br#"{"Attrs":{"sex":"m"}}"#.to_vec(),
            "To_Account is missing",
        ),
        (
            br#"{"To_Account":"","Attrs":{"sex":"m"}}"#.to_vec(),
            "To_Account is empty",
        ),
        (
            br#"{"To_Account":7,"Attrs":{"sex":"m"}}"#.to_vec(),
            "To_Account is a number, not a string",
        ),
        (
            format!(r#"{{"To_Account":"{long_account}","Attrs":{{"sex":"m"}}}}"#).into_bytes(),
            "To_Account is 33 bytes",
        ),
        (br#"{"To_Account":"a"}"#.to_vec(), "Attrs is missing"),
        (
            br#"{"To_Account":"a","Attrs":["sex"]}"#.to_vec(),
            "Attrs is an array, not an object",
        ),
        (
            br#"{"To_Account":"a","Attrs":{}}"#.to_vec(),
            "Attrs is empty",
        ),
        (
            br#"{"To_Account":"a","Attrs":{"sex":1}}"#.to_vec(),
            "Attrs.sex is a number, not a string",
        ),
        (
            format!(r#"{{"To_Account":"a","Attrs":{{"sex":"{long_value}"}}}}"#).into_bytes(),
            "Attrs.sex is 51 bytes",
        ),
        (
            br#"{"To_Account":"a","Attrs":{"":"v"}}"#.to_vec(),
            "empty attribute name",
        ),
        (
            format!(r#"{{"To_Account":"a","Attrs":{{"{long_name}":"v"}}}}"#).into_bytes(),
            "is 51 bytes, over the 50-byte limit",
        ),
        (
            br#"{"To_Account":"a","Attrs":{"age":"9"}}"#.to_vec(),
            "Attrs.age is not one of the app's attribute names",
        ),
        (
            format!(r#"{{"To_Account":"a","Attrs":{{{eleven}}}}}"#).into_bytes(),
            "more than 10 attributes",
        ),
        (
            format!(r#"{{"UserAttrs":[{many}]}}"#).into_bytes(),
            "UserAttrs holds 1001 entries",
        ),
    ];
    for (i, (body, _)) in cases.iter().enumerate() {
        sb.publish(update(&format!("ok{i}"), &[("sex", "before")]))
            .await
            .unwrap();
        sb.publish(body).await.unwrap();
        sb.publish(update(&format!("ok{i}"), &[("city", "after")]))
            .await
            .unwrap();
    }
    sb.wait_drained(DRAIN).await.unwrap();
    let state = sb.state();
    for i in 0..cases.len() {
        assert_eq!(
            state[&format!("ok{i}")],
            attrs(&[("sex", "before"), ("city", "after")])
        );
    }
    let dead = sb.dead_letters().await.unwrap();
    assert_eq!(dead.len(), cases.len());
    // Dead-letter copies are published concurrently: match them by body.
    let decoded: Vec<Vec<u8>> = dead
        .iter()
        .map(|d| {
            if d.body_encoding == "base64" {
                base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &d.body).unwrap()
            } else {
                d.body.clone().into_bytes()
            }
        })
        .collect();
    for (body, rule) in &cases {
        let i = decoded
            .iter()
            .position(|b| b == body)
            .unwrap_or_else(|| panic!("no dead letter with the body for {rule:?}"));
        let d = &dead[i];
        assert_eq!(d.reason.as_deref(), Some("invalid-message"));
        assert_eq!(d.code, Some(0));
        assert_eq!(d.attempts, Some(0));
        let err = d.error.as_deref().unwrap();
        assert!(err.contains(rule), "expected {rule:?} in {err:?}");
    }
    assert_eq!(
        sb.sim.stats().count("im_set_attr", 90033),
        0,
        "nothing invalid reached the API"
    );
    finish(sb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_accounts_splits_until_everything_is_applied() {
    let faults = Faults {
        max_accounts: 20,
        ..Faults::default()
    };
    let mut sb = sandbox(&["k"], faults, |c| c.batch.max_wait_ms = 200).await;
    for i in 0..300 {
        sb.publish(update(&format!("a{i}"), &[("k", &i.to_string())]))
            .await
            .unwrap();
    }
    sb.confirm().await.unwrap();
    sb.start_worker();
    sb.wait_drained(DRAIN).await.unwrap();
    let stats = sb.sim.stats();
    assert!(stats.count("im_set_attr", 90018) >= 1, "{stats:?}");
    assert_eq!(sb.state().len(), 300);
    assert_eq!(stats.accounts_written, 300);
    assert!(sb.dead_letters().await.unwrap().is_empty());
    sb.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misconfigured_pauses_without_dead_lettering_then_resumes() {
    let faults = Faults {
        misconfigured: true,
        ..Faults::default()
    };
    let mut sb = sandbox(&["k"], faults, |c| c.attributes.allowed = vec!["k".into()]).await;
    sb.start_worker();
    for i in 0..50 {
        sb.publish(update(&format!("a{i}"), &[("k", "v")]))
            .await
            .unwrap();
    }
    sb.confirm().await.unwrap();
    let sim = &sb.sim;
    eventually(DRAIN, "two 90009 answers", || {
        sim.stats().count("im_set_attr", 90009) >= 2
    })
    .await;
    let health = sb.health.clone();
    eventually(DRAIN, "not ready", || health.readiness().is_err()).await;
    assert!(sb.health.readiness().unwrap_err().contains("90009"));
    assert!(sb.dead_letters().await.unwrap().is_empty());
    assert!(sb.state().is_empty());
    sb.sim.update_faults(|f| f.misconfigured = false);
    sb.wait_drained(DRAIN).await.unwrap();
    assert_eq!(sb.state().len(), 50);
    assert!(sb.dead_letters().await.unwrap().is_empty());
    assert!(sb.health.readiness().is_ok());
    sb.cleanup().await.unwrap();
}

/// One account the API keeps failing (91000) holds back only what shares its
/// requests; once it recovers everything lands, in order, none dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_failing_for_a_while_is_retried_until_applied() {
    let faults = Faults {
        fail_accounts: vec!["acc3".into()],
        ..Faults::default()
    };
    let mut sb = sandbox(&["n"], faults, |c| {
        c.batch.max_accounts = 5;
        c.retry.max_elapsed_secs = 0;
    })
    .await;
    sb.start_worker();
    let mut expected = Expected::new();
    publish_stream(&sb, 400, 40, 0, &mut expected).await;
    sb.confirm().await.unwrap();
    let sim = &sb.sim;
    eventually(DRAIN, "acc3 refused three times", || {
        sim.stats().count("im_set_attr", 91000) >= 3
    })
    .await;
    assert!(!sb.state().contains_key("acc3"));
    sb.sim.update_faults(|f| f.fail_accounts.clear());
    sb.wait_drained(DRAIN).await.unwrap();
    assert_final_monotonic(&sb, &expected).await;
    assert_eq!(sb.sim.stats().overlapping_account_requests, 0);
    finish(sb).await;
}

/// An API stricter than the configured rate (60007) slows the worker down
/// but loses nothing and dead-letters nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_answers_lose_nothing() {
    let faults = Faults {
        rate_limit: 10,
        latency_ms: (0, 5),
        ..Faults::default()
    };
    let mut sb = sandbox(&["n"], faults, |c| {
        c.batch.max_accounts = 5;
        c.batch.max_wait_ms = 5;
        c.tencent.rate_limit_per_sec = 100;
    })
    .await;
    sb.start_worker();
    let mut expected = Expected::new();
    publish_stream(&sb, 600, 60, 0, &mut expected).await;
    sb.wait_drained(DRAIN).await.unwrap();
    let stats = sb.sim.stats();
    assert!(stats.count("im_set_attr", 60007) > 0, "{stats:?}");
    assert_final_monotonic(&sb, &expected).await;
    finish(sb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_exhausted_are_dead_lettered() {
    let faults = Faults {
        fail_rate: 1.0,
        ..Faults::default()
    };
    let mut sb = sandbox(&["k"], faults, |c| {
        c.retry.max_elapsed_secs = 1;
        c.retry.initial_interval_ms = 50;
    })
    .await;
    sb.start_worker();
    let body = update("gone", &[("k", "v")]);
    sb.publish(&body).await.unwrap();
    sb.wait_drained(DRAIN).await.unwrap();
    let dead = sb.dead_letters().await.unwrap();
    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    assert_eq!(d.reason.as_deref(), Some("retries-exhausted"));
    assert_eq!(d.code, Some(91000));
    assert_eq!(d.account.as_deref(), Some("gone"));
    assert!(d.attempts.unwrap() >= 2, "{d:?}");
    assert_eq!(d.body.as_bytes(), &body[..]);
    assert!(sb.state().is_empty());
    sb.cleanup().await.unwrap();
}

/// Random transient failures and latencies with 8 requests in flight: the
/// final state is the last published value of every (account, attribute) and
/// no account is ever in two requests at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordering_holds_under_random_failures_and_latency() {
    let faults = Faults {
        fail_rate: 0.2,
        http_error_rate: 0.05,
        latency_ms: (0, 15),
        rate_limit: 0,
        ..Faults::default()
    };
    let mut sb = sandbox(&["a", "b", "c"], faults, |c| {
        c.tencent.max_in_flight = 8;
        c.batch.max_accounts = 10;
        c.batch.max_wait_ms = 5;
        c.retry.initial_interval_ms = 5;
        c.retry.max_interval_ms = 50;
        c.retry.max_elapsed_secs = 0;
    })
    .await;
    // Concurrency by order, not by this machine's speed: the first requests
    // are held 3 s (under the client's 5 s timeout), so while one is
    // unanswered the next batches form and must leave too.
    sb.sim.update_faults(|f| f.latency_ms = (3000, 3000));
    sb.start_worker();
    let mut expected: HashMap<String, BTreeMap<String, String>> = HashMap::new();
    let mut rng = StdRng::seed_from_u64(0x2545F4914F6CDD1D);
    for i in 0..5000u32 {
        if i == 500 {
            let sim = &sb.sim;
            eventually(DRAIN, "two requests in flight at once", || {
                sim.stats().max_concurrent_requests > 1
            })
            .await;
            sb.sim.update_faults(|f| f.latency_ms = (0, 15));
        }
        let account = format!("acc{}", rng.gen_range(0..60));
        let attr = ["a", "b", "c"][rng.gen_range(0..3)];
        let value = i.to_string();
        expected
            .entry(account.clone())
            .or_default()
            .insert(attr.to_string(), value.clone());
        sb.publish(update(&account, &[(attr, &value)]))
            .await
            .unwrap();
        if i % 500 == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    sb.wait_drained(Duration::from_secs(120)).await.unwrap();
    let stats = sb.sim.stats();
    assert_eq!(
        stats.overlapping_account_requests, 0,
        "an account was in two requests at once"
    );
    assert_eq!(stats.requests_with_duplicate_accounts, 0);
    assert_eq!(stats.regressions, 0, "a value went backwards: {stats:?}");
    assert!(
        stats.count("im_set_attr", 91000) > 0,
        "failures were injected: {stats:?}"
    );
    assert_eq!(sb.state(), expected);
    assert!(sb.dead_letters().await.unwrap().is_empty());
    sb.cleanup().await.unwrap();
}

/// A test that fails before `cleanup` still leaves no queues behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_sandbox_deletes_its_queues() {
    let mut sb = sandbox(&["k"], Faults::default(), |_| {}).await;
    sb.start_worker();
    sb.publish(update("a", &[("k", "v")])).await.unwrap();
    let config = sb.config.clone();
    drop(sb);
    let conn = imattr::amqp::topology::connect(&config.amqp, "test")
        .await
        .unwrap();
    for q in [&config.amqp.queue, &config.amqp.dead_letter_queue] {
        let ch = conn.create_channel().await.unwrap();
        let passive = lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let r = ch
            .queue_declare(q.as_str().into(), passive, Default::default())
            .await;
        assert!(r.is_err(), "queue {q} still exists");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_queues_work_too() {
    let faults = Faults {
        reject_attrs: vec!["bad".into()],
        ..Faults::default()
    };
    let mut sb = sandbox(&["k", "bad"], faults, |c| {
        c.amqp.queue_type = imattr::config::QueueType::Quorum
    })
    .await;
    sb.start_worker();
    for i in 0..200 {
        sb.publish(update(&format!("q{}", i % 20), &[("k", &i.to_string())]))
            .await
            .unwrap();
    }
    sb.publish(update("q0", &[("bad", "x")])).await.unwrap();
    sb.wait_drained(DRAIN).await.unwrap();
    let state = sb.state();
    assert_eq!(state.len(), 20);
    assert_eq!(state["q19"]["k"], "199");
    let dead = sb.dead_letters().await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason.as_deref(), Some("rejected"));
    // The dead-letter queue is a stream, whatever the updates queue is
    // (replicated like a quorum queue, and no delivery limit).
    assert_eq!(
        queue_type(&sb.config.amqp.dead_letter_queue),
        "stream",
        "the dead-letter queue is a stream"
    );
    sb.cleanup().await.unwrap();
}

/// A queue's type as `rabbitmqctl list_queues` shows it.
fn queue_type(q: &str) -> String {
    let types = rabbitmqctl(&["-q", "list_queues", "--no-table-headers", "name", "type"]);
    types
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            (f.next()? == q).then(|| f.next().map(str::to_string))?
        })
        .unwrap_or_else(|| panic!("{q} not in {types}"))
}

/// A classic dead-letter queue from an earlier release is kept: the worker
/// declares the rest, runs and dead-letters into it; `dlq migrate` then
/// turns it into the stream with the old dead letters first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_classic_dead_letter_queue_is_kept_until_migrated() {
    let faults = Faults {
        reject_attrs: vec!["bad".into()],
        ..Faults::default()
    };
    let mut sb = sandbox(&["k", "bad"], faults, |_| {}).await;
    let dlq = sb.config.amqp.dead_letter_queue.clone();
    let conn = imattr::amqp::topology::connect(&sb.config.amqp, "imattr test")
        .await
        .unwrap();
    // The dead-letter queue as an earlier release declared it: classic, and
    // no inbox.
    let ch = conn.create_channel().await.unwrap();
    for q in [dlq.clone(), imattr::amqp::inbox::inbox_name(&dlq)] {
        ch.queue_delete(
            q.as_str().into(),
            lapin::options::QueueDeleteOptions::default(),
        )
        .await
        .unwrap();
    }
    ch.queue_declare(
        dlq.as_str().into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        Default::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        dlq.as_str().into(),
        sb.config.amqp.dead_letter_exchange.as_str().into(),
        "".into(),
        Default::default(),
        Default::default(),
    )
    .await
    .unwrap();
    // A dead letter from before, in the classic dead-letter queue.
    let mut p = imattr::publish::Publisher::new(&conn, &sb.config.amqp.dead_letter_exchange)
        .await
        .unwrap();
    let before = imattr::amqp::deadletter::Failure {
        reason: imattr::amqp::deadletter::Reason::Rejected,
        code: 90033,
        error: "from before".into(),
        account: Some("old".into()),
        attempts: 1,
    };
    let props = imattr::amqp::deadletter::dead_letter_properties(
        &imattr::publish::update_properties(),
        &before,
        &[],
        &sb.config.amqp.queue,
        "old",
        1,
    );
    p.publish("old", &update("old", &[("bad", "y")]), props)
        .await
        .unwrap();
    p.finish().await.unwrap();
    let _ = conn.close(200, "done".into()).await;
    sb.start_worker();
    for i in 0..50 {
        sb.publish(update(&format!("c{}", i % 5), &[("k", &i.to_string())]))
            .await
            .unwrap();
    }
    sb.publish(update("c0", &[("bad", "x")])).await.unwrap();
    sb.wait_drained(DRAIN).await.unwrap();
    assert_eq!(sb.state()["c4"]["k"], "49");
    assert_eq!(queue_type(&dlq), "classic", "kept as it was");
    sb.stop_worker().await.unwrap();

    let (code, out, err) = imattr_output(&sb.config, &["dlq", "migrate"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("moved 2"), "{out}");
    assert_eq!(queue_type(&dlq), "stream");
    let dead = sb.dead_letters().await.unwrap();
    assert_eq!(dead.len(), 2, "the old dead letter kept, the new one added");
    assert_eq!(dead[0].account.as_deref(), Some("old"));
    assert_eq!(dead[0].error.as_deref(), Some("from before"));
    assert_eq!(dead[1].account.as_deref(), Some("c0"));
    sb.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_secret_key_pauses_instead_of_dead_lettering() {
    let mut sb = sandbox(&["k"], Faults::default(), |c| {
        c.tencent.secret_key = imattr::config::Secret::new("not-the-app-key");
        c.attributes.allowed = vec!["k".into()];
    })
    .await;
    sb.start_worker();
    sb.publish(update("a", &[("k", "v")])).await.unwrap();
    sb.confirm().await.unwrap();
    let health = sb.health.clone();
    eventually(DRAIN, "paused", || health.is_paused()).await;
    assert!(health.readiness().unwrap_err().contains("70005"));
    let stats = sb.sim.stats();
    // The first refusal renews the usersig and retries at once; the second pauses.
    assert!(stats.count("im_set_attr", 70005) >= 2, "{stats:?}");
    assert!(sb.dead_letters().await.unwrap().is_empty());
    assert!(sb.state().is_empty());
    sb.cleanup().await.unwrap();
}

/// The default path (`attributes.allowed` empty): the names come from the
/// API's `im_get_attr_name` at start, and an update naming another attribute
/// is dead-lettered as invalid without reaching the API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attribute_names_are_read_from_the_api_by_default() {
    let mut sb = sandbox(&["sex", "city"], Faults::default(), |c| {
        assert!(c.attributes.allowed.is_empty(), "the default");
    })
    .await;
    sb.start_worker();
    let unknown = update("b", &[("age", "9")]);
    sb.publish(update("a", &[("sex", "m")])).await.unwrap();
    sb.publish(&unknown).await.unwrap();
    sb.publish(update("b", &[("city", "x")])).await.unwrap();
    sb.wait_drained(DRAIN).await.unwrap();
    let stats = sb.sim.stats();
    assert_eq!(stats.total("im_get_attr_name"), 1, "read once at start");
    assert_eq!(stats.count("im_set_attr", 90033), 0, "{stats:?}");
    assert_eq!(sb.state()["a"], attrs(&[("sex", "m")]));
    assert_eq!(sb.state()["b"], attrs(&[("city", "x")]));
    let dead = sb.dead_letters().await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:#?}");
    assert_eq!(dead[0].body.as_bytes(), &unknown[..]);
    assert_eq!(dead[0].reason.as_deref(), Some("invalid-message"));
    assert_eq!(dead[0].code, Some(0));
    let err = dead[0].error.as_deref().unwrap_or_default();
    assert!(
        err.contains("Attrs.age is not one of the app's attribute names"),
        "{err}"
    );
    finish(sb).await;
}

/// When `im_get_attr_name` fails at start, the worker checks no names
/// itself: the update naming an unknown attribute goes to the API, whose
/// refusal (90033) is dead-lettered alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attribute_names_are_not_checked_when_the_api_cannot_tell_them() {
    let mut sb = sandbox(&["sex"], Faults::default(), |_| {}).await;
    sb.sim.pause().await;
    sb.start_worker();
    // The names are read before the worker connects to the broker.
    let health = sb.health.clone();
    eventually(DRAIN, "consuming", || health.is_consuming()).await;
    sb.sim.resume().await.unwrap();
    let unknown = update("b", &[("age", "9")]);
    sb.publish(update("a", &[("sex", "m")])).await.unwrap();
    sb.publish(&unknown).await.unwrap();
    sb.wait_drained(DRAIN).await.unwrap();
    assert_eq!(sb.state()["a"], attrs(&[("sex", "m")]));
    let dead = sb.dead_letters().await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:#?}");
    assert_eq!(dead[0].body.as_bytes(), &unknown[..]);
    assert_eq!(dead[0].reason.as_deref(), Some("rejected"));
    assert_eq!(dead[0].code, Some(90033));
    finish(sb).await;
}
