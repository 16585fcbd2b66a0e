//! What the scenarios share: the workload (sequential updates over a set of
//! accounts), its expected final state, and timing a drain.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::sandbox::Sandbox;
use crate::simulator::{Faults, Stats, Store};

use super::process::SimProcess;

/// Sequential updates: update `i` sets `n` of account `i % accounts` to `i`.
pub(super) fn body(i: usize, accounts: usize) -> (String, Vec<u8>) {
    let account = format!("acc{:06}", i % accounts);
    let b = format!(r#"{{"To_Account":"{account}","Attrs":{{"n":"{i}"}}}}"#).into_bytes();
    (account, b)
}

pub(super) fn expected_state(
    updates: usize,
    accounts: usize,
) -> HashMap<String, BTreeMap<String, String>> {
    let mut m = HashMap::new();
    for i in updates.saturating_sub(accounts)..updates {
        let (a, _) = body(i, accounts);
        m.insert(a, BTreeMap::from([("n".to_string(), i.to_string())]));
    }
    m
}

pub(super) async fn prefill(sb: &Sandbox, updates: usize, accounts: usize) -> anyhow::Result<()> {
    for i in 0..updates {
        let (_, b) = body(i, accounts);
        sb.publish(&b).await?;
    }
    sb.confirm().await?;
    Ok(())
}

/// What a timed drain measured.
pub(super) struct Drain {
    pub(super) secs: f64,
    pub(super) stats: Stats,
    pub(super) correct: bool,
}

/// A sandbox whose worker calls the simulator process `sim` (the sandbox's
/// own in-process simulator stays idle; both use the same app and key).
pub(super) async fn sandbox_for(
    base: &Config,
    sim: &SimProcess,
    tweak: impl FnOnce(&mut Config),
) -> anyhow::Result<Sandbox> {
    let mut sb = Sandbox::start(base, "imattr.bench", &["n"], Faults::default(), |c| {
        bench_tweak(c);
        tweak(c);
    })
    .await?;
    sb.config.tencent.base_url = sim.url.clone();
    Ok(sb)
}

/// Prefills `updates` over `accounts`, then starts the worker (in-process)
/// and times the drain; checks the final state and deletes the sandbox.
pub(super) async fn timed_drain(
    mut sb: Sandbox,
    sim: &SimProcess,
    updates: usize,
    accounts: usize,
) -> anyhow::Result<Drain> {
    prefill(&sb, updates, accounts).await?;
    let started = Instant::now();
    sb.start_worker();
    let done = drained_at(&sb, Duration::from_secs(900)).await?;
    let stats = sim.stats().await?;
    let correct = states_match(&sim.state().await?, &expected_state(updates, accounts));
    sb.cleanup().await?;
    Ok(Drain {
        secs: (done - started).as_secs_f64(),
        stats,
        correct,
    })
}

/// Whether every expected account holds its expected attributes.
pub(super) fn states_match(
    state: &Store,
    expected: &HashMap<String, BTreeMap<String, String>>,
) -> bool {
    expected
        .iter()
        .all(|(a, attrs)| state.get(a) == Some(attrs))
}

/// Polls every 20 ms until the in-process worker has acked every message
/// published through the sandbox, the queue is empty and nothing is
/// unsettled (the count matters: an empty queue and an idle session can
/// also mean the broker's deliveries are still on their way to the session).
pub(super) async fn drained_at(sb: &Sandbox, timeout: Duration) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + timeout;
    let queue = sb.config.amqp.queue.clone();
    // Everything published through the sandbox, confirmed (the publisher counts them).
    let published = sb.confirm().await?;
    loop {
        if sb.acked() >= published && sb.health.unsettled() == 0 && sb.depth(&queue).await? == 0 {
            return Ok(Instant::now());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "not drained within {timeout:?}: {} of {published} acked",
            sb.acked()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Settings every scenario shares: the names are known up front.
pub(super) fn bench_tweak(c: &mut Config) {
    c.attributes.allowed = vec!["n".into()];
}
/// The ceiling: 100 requests/s of 100 accounts.
pub(super) const CEILING: f64 = 10_000.0;
