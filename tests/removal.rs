//! Removing attributes (`null` in `Attrs`) end to end: generated sequences
//! of sets and removals over a few accounts and attributes, through the real
//! broker and the simulator, with faults; the API's final state must equal
//! applying the messages in publish order.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use imattr::simulator::RateLimitScope;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};

const ATTRS: [&str; 4] = ["k0", "k1", "k2", "k3"];
/// The account the API refuses (90033) in every request.
const REFUSED: &str = "refused";

/// One generated message: its body, and its (account, attribute, op) in
/// publish order (`None` removes).
struct Generated {
    body: Vec<u8>,
    ops: Vec<(String, String, Option<String>)>,
}

/// `n` messages over `accounts` accounts (plus, now and then, [`REFUSED`]),
/// in both shapes; values grow with the message number.
fn generate(seed: u64, n: usize, accounts: usize) -> Vec<Generated> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let entries = if rng.gen_bool(0.3) {
                rng.gen_range(2..=4)
            } else {
                1
            };
            let mut list = Vec::new();
            let mut ops = Vec::new();
            for _ in 0..entries {
                let account = if rng.gen_bool(0.05) {
                    REFUSED.to_string()
                } else {
                    format!("a{}", rng.gen_range(0..accounts))
                };
                let mut attrs = Map::new();
                for _ in 0..rng.gen_range(1..=3) {
                    let name = ATTRS[rng.gen_range(0..ATTRS.len())];
                    let op = rng.gen_bool(0.6).then(|| i.to_string());
                    attrs.insert(
                        name.to_string(),
                        op.clone().map_or(Value::Null, Value::from),
                    );
                }
                // A name drawn twice keeps its last op, as the JSON object does.
                for (name, v) in &attrs {
                    ops.push((
                        account.clone(),
                        name.clone(),
                        v.as_str().map(str::to_string),
                    ));
                }
                list.push(json!({"To_Account": account, "Attrs": attrs}));
            }
            let body = if list.len() == 1 && rng.gen_bool(0.5) {
                serde_json::to_vec(&list[0])
            } else {
                serde_json::to_vec(&json!({ "UserAttrs": list }))
            }
            .unwrap();
            Generated { body, ops }
        })
        .collect()
}

/// The state of applying every operation in order, but the refused
/// account's (its entries are dead-lettered, the others of their message
/// applied); accounts left without attributes do not appear.
fn expected(messages: &[Generated]) -> Expected {
    let mut e = Expected::new();
    for m in messages {
        for (account, name, op) in &m.ops {
            if account == REFUSED {
                continue;
            }
            let attrs = e.entry(account.clone()).or_default();
            match op {
                Some(v) => attrs.insert(name.clone(), v.clone()),
                None => attrs.remove(name),
            };
        }
    }
    e.retain(|_, attrs| !attrs.is_empty());
    e
}

fn faults() -> Faults {
    Faults {
        fail_rate: 0.1,
        latency_ms: (1, 6),
        reject_accounts: vec![REFUSED.into()],
        rate_limit_scope: RateLimitScope::Shared,
        ..Faults::default()
    }
}

/// The dead letters are exactly the messages naming the refused account,
/// each rejected with 90033, naming it among the failed accounts when the
/// message held others.
async fn assert_dead_letters(sb: &Sandbox, messages: &[Generated]) {
    let refused: Vec<&Generated> = messages
        .iter()
        .filter(|m| m.ops.iter().any(|(a, _, _)| a == REFUSED))
        .collect();
    assert!(!refused.is_empty(), "the seed names the refused account");
    let dead = sb.dead_letters().await.unwrap();
    // At least once: a dead letter confirmed just before its original's ack
    // was lost (a lost connection) is made again on redelivery.
    let mut bodies: Vec<&[u8]> = dead.iter().map(|d| d.body.as_bytes()).collect();
    bodies.sort();
    bodies.dedup();
    let mut want: Vec<&[u8]> = refused.iter().map(|m| m.body.as_slice()).collect();
    want.sort();
    want.dedup();
    assert_eq!(bodies, want, "the refused messages' bodies, byte for byte");
    for d in &dead {
        assert_eq!(d.reason.as_deref(), Some("rejected"), "{d:?}");
        assert_eq!(d.code, Some(90033), "{d:?}");
        assert_eq!(d.account.as_deref(), Some(REFUSED), "{d:?}");
        let several = refused
            .iter()
            .find(|m| m.body == d.body.as_bytes())
            .is_some_and(|m| m.ops.iter().any(|(a, _, _)| a != REFUSED));
        if several {
            assert_eq!(d.failed_accounts, [REFUSED], "{d:?}");
        }
    }
}

fn sorted(state: Expected) -> BTreeMap<String, BTreeMap<String, String>> {
    state.into_iter().collect()
}

/// A child worker applies a generated stream of sets and removals with
/// 91000 on a tenth of the requests and 90033 on one account; its broker
/// connection is closed a third of the way in and it gets SIGTERM two
/// thirds of the way; a new worker finishes. The final state is that of
/// applying the messages in publish order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sets_and_removals_with_faults_a_lost_connection_and_sigterm() {
    let messages = generate(11, 2000, 6);
    let expected = expected(&messages);
    // Slow enough that the stream is still flowing at the SIGTERM: few
    // messages held, slow answers.
    let faults = Faults {
        latency_ms: (5, 15),
        ..faults()
    };
    let mut sb = sandbox(&ATTRS, faults, |c| {
        c.batch.max_accounts = 3;
        c.tencent.max_in_flight = 2;
        c.amqp.prefetch = 30;
    })
    .await;
    for m in &messages {
        sb.publish(&m.body).await.unwrap();
    }
    sb.confirm().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let worker = Worker::spawn(&sb.config, dir.path(), 1);
    let queue = sb.config.amqp.queue.clone();
    until(DRAIN, "a third applied", || async {
        sb.depth(&queue).await.unwrap() < 1300
    })
    .await;
    let name = worker.connection_name(&sb.config);
    assert_eq!(close_connections(&name), 1, "{name}");
    until(DRAIN, "two thirds applied", || async {
        sb.depth(&queue).await.unwrap() < 600
    })
    .await;
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &worker.pid()])
        .status()
        .unwrap();
    assert!(kill.success());
    let mut child = worker.child;
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0), "stopped gracefully");
    let left = sb.depth(&queue).await.unwrap();
    assert!(left > 0, "stopped mid-stream");
    sb.start_worker();
    sb.wait_drained(DRAIN).await.unwrap();

    assert_eq!(sorted(sb.state()), expected.into_iter().collect());
    let stats = sb.sim.stats();
    assert!(
        stats.remove_attr_ok > 0 && stats.set_attr_ok > 0,
        "{stats:?}"
    );
    assert!(stats.count("im_remove_attr", 91000) > 0, "removals retried");
    assert!(stats.count("im_remove_attr", 90033) > 0, "removals refused");
    assert_eq!(
        stats.overlapping_account_requests, 0,
        "an account in a set and a removal at once"
    );
    assert_dead_letters(&sb, &messages).await;
    finish(sb).await;
}

/// The same stream in an in-process worker, with larger batches and
/// removals split on 90018: the final state and dead letters as above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sets_and_removals_split_bisected_and_retried() {
    let messages = generate(23, 1500, 5);
    let expected = expected(&messages);
    let faults = Faults {
        max_accounts: 3,
        ..faults()
    };
    let mut sb = sandbox(&ATTRS, faults, |_| {}).await;
    // A backlog first: a worker that keeps up with the publisher sends
    // batches of one or two accounts, which never need a split.
    for m in &messages {
        sb.publish(&m.body).await.unwrap();
    }
    sb.start_worker();
    sb.wait_drained(DRAIN).await.unwrap();
    assert_eq!(sorted(sb.state()), expected.into_iter().collect());
    let stats = sb.sim.stats();
    assert!(stats.count("im_remove_attr", 90018) > 0, "{stats:?}");
    assert_eq!(stats.overlapping_account_requests, 0);
    assert_dead_letters(&sb, &messages).await;
    finish(sb).await;
}

/// A refused message holding removals: its dead letter is the original
/// body; replayed once the API accepts it, the copy narrowed to the failed
/// account keeps its `null`s, which remove the attributes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_lettered_removal_replays_with_its_nulls() {
    let mut sb = sandbox(&ATTRS, Faults::default(), |_| {}).await;
    sb.start_worker();
    sb.publish(update("x", &[("k0", "1"), ("k1", "1")]))
        .await
        .unwrap();
    sb.publish(update("y", &[("k0", "1"), ("k1", "1")]))
        .await
        .unwrap();
    sb.wait_drained(DRAIN).await.unwrap();
    sb.sim
        .update_faults(|f| f.reject_accounts = vec!["x".into()]);
    let body = br#"{"UserAttrs":[{"To_Account":"x","Attrs":{"k0":null,"k2":"2"}},{"To_Account":"y","Attrs":{"k0":null}}]}"#;
    sb.publish(body).await.unwrap();
    sb.wait_drained(DRAIN).await.unwrap();
    let dead = sb.dead_letters().await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].body.as_bytes(), body, "the original body");
    assert_eq!(dead[0].failed_accounts, ["x"]);
    let state = sb.state();
    assert_eq!(state["x"].len(), 2, "x untouched: {:?}", state["x"]);
    assert_eq!(
        state["y"].keys().collect::<Vec<_>>(),
        ["k1"],
        "y's removal applied"
    );

    sb.sim.update_faults(|f| f.reject_accounts.clear());
    let (code, out, err) = imattr_output(&sb.config, &["dlq", "replay"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains('1'), "{out}");
    sb.wait_drained(DRAIN).await.unwrap();
    let state = sb.state();
    assert_eq!(
        state["x"].clone().into_iter().collect::<Vec<_>>(),
        [
            ("k1".to_string(), "1".to_string()),
            ("k2".to_string(), "2".to_string())
        ],
        "x's k0 removed by the replayed copy"
    );
    assert!(sb.dead_letters().await.unwrap().is_empty());
    finish(sb).await;
}
