//! Correctness under failure: sequences of faults around acknowledgements
//! and dead-lettering, each checked on what the API and the queues end up with.

mod common;

use std::time::Duration;

use common::*;
use lapin::options::BasicPublishOptions;
use lapin::BasicProperties;

/// Publishes one body to the updates exchange with `props`, confirmed, on a
/// connection of its own (authenticated as `user` when given).
async fn publish_with(
    sb: &Sandbox,
    user: Option<(&str, &str)>,
    body: &[u8],
    props: BasicProperties,
) {
    let mut amqp = sb.config.amqp.clone();
    if let Some((name, password)) = user {
        amqp.url =
            imattr::config::AmqpUrl::new(format!("amqp://{name}:{password}@127.0.0.1:5672/%2f"));
    }
    let conn = imattr::amqp::topology::connect(&amqp, "imattr test publisher")
        .await
        .unwrap();
    let ch = imattr::amqp::topology::confirm_channel(&conn)
        .await
        .unwrap();
    let confirm = ch
        .basic_publish(
            amqp.exchange.as_str().into(),
            "".into(),
            BasicPublishOptions::default(),
            body,
            props,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack());
    let _ = conn.close(200, "done".into()).await;
}

/// A channel on a connection of the test's own.
async fn channel(sb: &Sandbox) -> (lapin::Connection, lapin::Channel) {
    let conn = imattr::amqp::topology::connect(&sb.config.amqp, "imattr test")
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    (conn, ch)
}

fn json_props() -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
}

/// A message published by another broker user carries that user's
/// `user_id`. Its dead-letter copy must not: the broker would refuse it and
/// close the dead-letter channel, and every later dead letter would fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_of_another_users_message_keeps_dead_lettering_working() {
    let (user, password) = ("imattr-someone-else", "Someone-3b9d");
    if rabbitmqctl(&["list_users", "-q"])
        .lines()
        .all(|l| !l.starts_with(user))
    {
        rabbitmqctl(&["add_user", user, password]);
    } else {
        rabbitmqctl(&["change_password", user, password]);
    }
    rabbitmqctl(&["set_permissions", "-p", "/", user, ".*", ".*", ".*"]);
    let mut sb = sandbox(&["n"], Faults::default(), |_| {}).await;
    sb.start_worker();
    publish_with(
        &sb,
        Some((user, password)),
        b"{\"To_Account\":\"u1\"}",
        json_props().with_user_id(user.into()),
    )
    .await;
    let mut expected = Expected::new();
    publish_stream(&sb, 50, 10, 0, &mut expected).await;
    sb.publish(b"not json").await.unwrap();
    publish_stream(&sb, 50, 10, 50, &mut expected).await;
    sb.wait_drained(DRAIN).await.unwrap();
    assert_eq!(sb.state(), expected);
    let dead = sb.dead_letters().await.unwrap();
    assert_eq!(dead.len(), 2, "{dead:?}");
    assert_eq!(dead[0].body, "{\"To_Account\":\"u1\"}");
    assert_eq!(dead[0].reason.as_deref(), Some("invalid-message"));
    assert!(dead[0].properties.get("user_id").is_none(), "{dead:?}");
    assert_eq!(dead[1].body, "not json");
    assert!(sb.health.readiness().is_ok());
    sb.cleanup().await.unwrap();
}

/// The dead-letter copy keeps the properties that describe the content and
/// drops those that would make it expire or be refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_does_not_inherit_expiration() {
    let mut sb = sandbox(&["n"], Faults::default(), |_| {}).await;
    sb.start_worker();
    let props = json_props()
        .with_expiration("600000".into())
        .with_priority(7)
        .with_reply_to("replies".into())
        .with_message_id("m-1".into())
        .with_correlation_id("c-1".into())
        .with_app_id("publisher".into())
        .with_type("attr-update".into())
        .with_timestamp(1_700_000_000);
    publish_with(&sb, None, b"[1,2]", props).await;
    sb.wait_drained(DRAIN).await.unwrap();
    let dead = sb.dead_letters().await.unwrap();
    assert_eq!(dead.len(), 1);
    let p = &dead[0].properties;
    for gone in ["expiration", "priority", "reply_to", "user_id"] {
        assert!(p.get(gone).is_none(), "{gone} copied: {p}");
    }
    assert_eq!(p["message_id"], "m-1");
    assert_eq!(p["correlation_id"], "c-1");
    assert_eq!(p["app_id"], "publisher");
    assert_eq!(p["type"], "attr-update");
    assert_eq!(p["timestamp"], 1_700_000_000);
    assert_eq!(p["content_type"], "application/json");
    assert_eq!(p["delivery_mode"], 2);
    sb.cleanup().await.unwrap();
}

/// With no queue bound to the dead-letter exchange a copy is returned, not
/// stored: the message must stay unacked and the worker report not ready
/// until the queue is bound again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_dead_letter_is_not_ready_and_loses_nothing() {
    let mut sb = sandbox(&["n"], Faults::default(), |_| {}).await;
    sb.start_worker();
    let health = sb.health.clone();
    eventually(DRAIN, "ready", || health.readiness().is_ok()).await;
    let (conn, ch) = channel(&sb).await;
    // The worker publishes dead letters to the store by name: without the
    // store they come back unroutable.
    let dlq = sb.config.amqp.dead_letter_queue.clone();
    ch.queue_delete(dlq.as_str().into(), Default::default())
        .await
        .unwrap();
    sb.publish(b"not json").await.unwrap();
    let mut expected = Expected::new();
    publish_stream(&sb, 20, 5, 0, &mut expected).await;
    sb.confirm().await.unwrap();
    eventually(DRAIN, "not ready while dead letters fail", || {
        health
            .readiness()
            .is_err_and(|why| why.contains("dead-letter"))
    })
    .await;
    // Valid updates are still applied; the refused one stays unacked.
    let sim = &sb.sim;
    eventually(DRAIN, "valid updates applied", || sim.state() == expected).await;
    assert!(health.unsettled() >= 1);
    assert!(!sb.queue_exists(&dlq).await.unwrap(), "nothing stored");
    ch.queue_declare(
        dlq.as_str().into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        imattr::amqp::topology::dead_letter_queue_arguments(&sb.config.amqp),
    )
    .await
    .unwrap();
    sb.wait_drained(DRAIN).await.unwrap();
    eventually(DRAIN, "ready again", || health.readiness().is_ok()).await;
    let dead = sb.dead_letters().await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].body, "not json");
    let _ = conn.close(200, "done".into()).await;
    sb.cleanup().await.unwrap();
}

/// A message holding several accounts, some refused: the others are applied
/// and the dead letter names the refused ones in `x-imattr-failed-accounts`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_names_the_failed_accounts() {
    let faults = Faults {
        reject_attrs: vec!["bad".into()],
        ..Faults::default()
    };
    let mut sb = sandbox(&["n", "bad"], faults, |_| {}).await;
    sb.start_worker();
    let body = serde_json::json!({"UserAttrs": [
        {"To_Account": "a", "Attrs": {"n": "1"}},
        {"To_Account": "b", "Attrs": {"bad": "x"}},
        {"To_Account": "c", "Attrs": {"n": "1"}},
        {"To_Account": "d", "Attrs": {"n": "1", "bad": "y"}},
    ]});
    sb.publish(serde_json::to_vec(&body).unwrap())
        .await
        .unwrap();
    // A single-account message gets no list.
    sb.publish(update("e", &[("bad", "z")])).await.unwrap();
    sb.wait_drained(DRAIN).await.unwrap();
    let state = sb.state();
    assert_eq!(state["a"]["n"], "1");
    assert_eq!(state["c"]["n"], "1");
    assert!(!state.contains_key("b") && !state.contains_key("d"));
    let dead = sb.dead_letters().await.unwrap();
    assert_eq!(dead.len(), 2, "{dead:?}");
    let multi = dead
        .iter()
        .find(|d| d.body.contains("UserAttrs"))
        .expect("the multi-account message is dead-lettered");
    assert_eq!(multi.reason.as_deref(), Some("rejected"));
    let mut failed: Vec<String> =
        serde_json::from_value(multi.headers["x-imattr-failed-accounts"].clone())
            .expect("x-imattr-failed-accounts is an array of accounts");
    failed.sort();
    assert_eq!(failed, ["b", "d"]);
    let single = dead.iter().find(|d| !d.body.contains("UserAttrs")).unwrap();
    assert!(single.headers.get("x-imattr-failed-accounts").is_none());
    sb.cleanup().await.unwrap();
}

/// Deliveries of `queue` the broker holds as unacknowledged.
fn broker_unacked(queue: &str) -> u64 {
    rabbitmqctl(&[
        "list_queues",
        "-q",
        "--no-table-headers",
        "name",
        "messages_unacknowledged",
    ])
    .lines()
    .find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next()? == queue).then(|| it.next()?.parse().ok())?
    })
    .unwrap_or(0)
}

fn value(sb: &Sandbox, account: &str) -> Option<String> {
    sb.state().get(account)?.get("n").cloned()
}

fn m1_a1_b1() -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"UserAttrs": [
        {"To_Account": "a", "Attrs": {"n": "1"}},
        {"To_Account": "b", "Attrs": {"n": "1"}},
    ]}))
    .unwrap()
}

/// Account b always answers 91000; batches of one account, retried forever.
async fn b_failing_sandbox(tweak: impl FnOnce(&mut imattr::config::Config)) -> Sandbox {
    let faults = Faults {
        fail_accounts: vec!["b".into()],
        ..Faults::default()
    };
    sandbox(&["n"], faults, |c| {
        c.batch.max_accounts = 1;
        c.retry.max_elapsed_secs = 0;
        c.shutdown.timeout_secs = 1;
        tweak(c);
    })
    .await
}

/// M1 sets a and b to 1, b keeps failing; M2 sets a to 2 and is applied.
/// Stopping with SIGTERM must not ack M2 while M1 is unacked: a redelivered
/// M1 alone would set a back to 1 for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_value_survives_sigterm_while_an_older_message_retries() {
    let mut sb = b_failing_sandbox(|_| {}).await;
    let mut child = imattr(&sb.config)
        .arg("run")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    sb.publish(m1_a1_b1()).await.unwrap();
    let sim = &sb.sim;
    eventually(DRAIN, "a applied, b retried", || {
        value(&sb, "a").as_deref() == Some("1") && sim.stats().count("im_set_attr", 91000) > 0
    })
    .await;
    sb.publish(update("a", &[("n", "2")])).await.unwrap();
    eventually(DRAIN, "a applied again", || {
        value(&sb, "a").as_deref() == Some("2")
    })
    .await;
    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert_eq!(child.wait().await.unwrap().code(), Some(0));
    // Both M1 and M2 are back in the queue.
    let queue = sb.config.amqp.queue.clone();
    let mut ready = 0;
    for _ in 0..100 {
        ready = sb.depth(&queue).await.unwrap();
        if ready == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ready, 2, "M2 was acked while M1 was not");
    sb.sim.update_faults(|f| f.fail_accounts.clear());
    sb.start_worker();
    sb.wait_drained(DRAIN).await.unwrap();
    assert_eq!(value(&sb, "a").as_deref(), Some("2"));
    assert_eq!(value(&sb, "b").as_deref(), Some("1"));
    assert_eq!(sb.sim.stats().regressions, 0, "{:?}", sb.sim.stats());
    assert!(sb.dead_letters().await.unwrap().is_empty());
    sb.cleanup().await.unwrap();
}

/// The same sequence with the connection lost instead, and enough settled
/// messages behind the retried one that a backlog threshold would ack them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_value_survives_a_lost_connection_while_an_older_message_retries() {
    let mut sb = b_failing_sandbox(|c| c.amqp.prefetch = 10).await;
    sb.start_worker();
    sb.publish(m1_a1_b1()).await.unwrap();
    let sim = &sb.sim;
    eventually(DRAIN, "a applied, b retried", || {
        value(&sb, "a").as_deref() == Some("1") && sim.stats().count("im_set_attr", 91000) > 0
    })
    .await;
    sb.publish(update("a", &[("n", "2")])).await.unwrap();
    eventually(DRAIN, "a applied again", || {
        value(&sb, "a").as_deref() == Some("2")
    })
    .await;
    for i in 0..6 {
        sb.publish(update(&format!("c{i}"), &[("n", "1")]))
            .await
            .unwrap();
    }
    sb.confirm().await.unwrap();
    eventually(DRAIN, "everything but b applied", || {
        sb.state().len() == 7 && value(&sb, "a").as_deref() == Some("2")
    })
    .await;
    let queue = sb.config.amqp.queue.clone();
    let mut unacked = u64::MAX;
    for _ in 0..100 {
        unacked = broker_unacked(&queue);
        if unacked <= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // M1 (b retrying) and M2 (held back by M1) only.
    assert_eq!(unacked, 2);
    let name = format!("imattr run {queue}");
    assert_eq!(close_connections(&name), 1);
    let health = sb.health.clone();
    eventually(DRAIN, "reconnected", || {
        health.sessions() == 2 && health.is_consuming()
    })
    .await;
    sb.sim.update_faults(|f| f.fail_accounts.clear());
    sb.wait_drained(DRAIN).await.unwrap();
    assert_eq!(value(&sb, "a").as_deref(), Some("2"));
    assert_eq!(value(&sb, "b").as_deref(), Some("1"));
    assert_eq!(sb.sim.stats().regressions, 0, "{:?}", sb.sim.stats());
    assert!(sb.dead_letters().await.unwrap().is_empty());
    sb.cleanup().await.unwrap();
}

/// With a small prefetch window and one account failing, messages for other
/// accounts keep flowing: settled deliveries never sit in the window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retrying_account_does_not_stall_the_others() {
    let faults = Faults {
        fail_accounts: vec!["stuck".into()],
        ..Faults::default()
    };
    // One account per request: the failing one holds up only its own.
    let mut sb = sandbox(&["n"], faults, |c| {
        c.amqp.prefetch = 4;
        c.batch.max_accounts = 1;
        c.retry.max_elapsed_secs = 0;
    })
    .await;
    sb.start_worker();
    sb.publish(update("stuck", &[("n", "1")])).await.unwrap();
    sb.publish(update("stuck", &[("n", "2")])).await.unwrap();
    let mut expected = Expected::new();
    publish_stream(&sb, 40, 40, 0, &mut expected).await;
    sb.confirm().await.unwrap();
    let sim = &sb.sim;
    eventually(DRAIN, "the other accounts applied", || {
        let state = sim.state();
        expected.iter().all(|(a, v)| state.get(a) == Some(v))
    })
    .await;
    assert!(value(&sb, "stuck").is_none());
    sb.sim.update_faults(|f| f.fail_accounts.clear());
    sb.wait_drained(DRAIN).await.unwrap();
    assert_eq!(value(&sb, "stuck").as_deref(), Some("2"));
    sb.cleanup().await.unwrap();
}
