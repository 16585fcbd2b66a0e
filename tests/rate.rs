//! The request rate, measured where the rule is kept (at the client, with
//! `tencent::tap`: every rate slot taken and every request sent) and where it
//! is enforced (the simulator's strict frequency limit), and how a backlog's
//! batches wait for their slot.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use imattr::tencent::tap::{tap, RateTap};

/// At the client: no request went out without a rate slot, and no second
/// holds more than `per_sec` slots.
fn assert_client_kept_the_rate(tap: &RateTap, per_sec: usize) {
    assert_eq!(
        tap.sends() as usize,
        tap.slots().len(),
        "a request went out without a rate slot (or a slot went unused)"
    );
    let worst = tap.max_slots_in(Duration::from_secs(1));
    assert!(
        worst <= per_sec,
        "{worst} requests in one second at the client, over {per_sec}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_start_on_a_backlog_never_sends_more_than_the_rate_in_any_second() {
    let faults = Faults {
        latency_ms: (20, 20),
        ..Faults::default()
    };
    // One account per request, so the backlog asks for 400 requests at once:
    // four seconds' worth at the default rate limit.
    let mut sb = sandbox(&["n"], faults, |c| c.batch.max_accounts = 1).await;
    for i in 0..400 {
        sb.publish(update(&format!("a{i}"), &[("n", "v")]))
            .await
            .unwrap();
    }
    sb.confirm().await.unwrap();
    let tap = tap(&sb.sim.url());
    sb.start_worker();
    sb.wait_drained(DRAIN).await.unwrap();
    // The rule, exactly, from the first request on (a cold start that bursts
    // puts more than 100 in its first second: GCRA's burst alone sent 30
    // requests in the first 200 ms).
    assert_client_kept_the_rate(&tap, 100);
    assert!(tap.sends() > 400, "{} requests", tap.sends());
    let stats = sb.sim.stats();
    assert_eq!(stats.set_attr_ok, 400, "{stats:?}");
    assert_eq!(sb.state().len(), 400);
    // At the server a request arrives a little after its slot, and not
    // always equally late: the pacer's window is 20 ms wider than a second
    // to absorb that, but a loaded machine can delay one request by more.
    // So the server may refuse a few (1%), never a burst's worth.
    assert!(stats.count("im_set_attr", 60007) <= 4, "{stats:?}");
    sb.cleanup().await.unwrap();
}

/// The rate rule counts every attempt: retries of 91000s, the halves of a
/// request split after 90018, and the probes sent while paused by a
/// misconfigured answer (90009) each take a slot of their own, so the client
/// never goes over its rate, and a strict API never refuses it for rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_splits_and_probes_count_against_the_rate() {
    const RATE: u32 = 20;
    let faults = Faults {
        fail_rate: 0.3,
        max_accounts: 2,
        latency_ms: (5, 15),
        // Strict, a quarter above the client's rate: a request that arrives
        // later than its slot (a loaded machine) is not refused for that
        // unless by 200 ms, while attempts that took no slot would put the
        // client 40% over.
        rate_limit: RATE + 5,
        ..Faults::default()
    };
    let mut sb = sandbox(&["n"], faults, |c| {
        c.tencent.rate_limit_per_sec = RATE;
        // Two batches in flight still keep the rate busy (10 ms answers).
        c.tencent.max_in_flight = 2;
        c.batch.max_accounts = 4;
        c.retry.initial_interval_ms = 10;
        c.retry.max_interval_ms = 100;
        c.retry.max_elapsed_secs = 0;
    })
    .await;
    let accounts = 300;
    let mut expected = Expected::new();
    publish_stream(&sb, accounts, accounts, 0, &mut expected).await;
    sb.confirm().await.unwrap();
    let tap = tap(&sb.sim.url());
    sb.start_worker();
    let sim = &sb.sim;
    eventually(DRAIN, "some applied", || sim.stats().accounts_written >= 40).await;
    // A pause: the API answers 90009 until told otherwise; the worker stops
    // consuming and probes. At most two of the 90009s answer requests that
    // were in flight when it began (no batch starts while both wait), so
    // two more are probes.
    sb.sim.update_faults(|f| f.misconfigured = true);
    let health = sb.health.clone();
    eventually(DRAIN, "paused", || health.is_paused()).await;
    eventually(DRAIN, "two probes", || {
        sim.stats().count("im_set_attr", 90009) >= 4
    })
    .await;
    sb.sim.update_faults(|f| f.misconfigured = false);
    sb.wait_drained(DRAIN).await.unwrap();

    let stats = sb.sim.stats();
    assert!(stats.count("im_set_attr", 91000) > 0, "retries: {stats:?}");
    assert!(stats.count("im_set_attr", 90018) > 0, "splits: {stats:?}");
    assert_client_kept_the_rate(&tap, RATE as usize);
    assert_eq!(stats.count("im_set_attr", 60007), 0, "{stats:?}");
    assert_final_monotonic(&sb, &expected).await;
    sb.cleanup().await.unwrap();
}

/// A batch is formed only once its request can take a free rate slot: none
/// is formed ahead to wait for one, holding old values while newer ones
/// arrive for its accounts. So while the rate holds a backlog back, its
/// updates keep merging (how much depends on how fast the backlog arrives;
/// bench scenario 7 measures it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_forms_each_batch_only_when_its_slot_is_free() {
    let faults = Faults {
        latency_ms: (50, 50),
        ..Faults::default()
    };
    // The rate is the bottleneck: 2 requests a second.
    let mut sb = sandbox(&["n"], faults, |c| {
        c.tencent.rate_limit_per_sec = 2;
        // Names known: no other call shares the rate.
        c.attributes.allowed = vec!["n".into()];
    })
    .await;
    let (rounds, accounts) = (10, 300);
    for round in 0..rounds {
        for a in 0..accounts {
            let v = round.to_string();
            sb.publish(update(&format!("a{a}"), &[("n", &v)]))
                .await
                .unwrap();
        }
    }
    sb.confirm().await.unwrap();
    let tap = tap(&sb.sim.url());
    sb.start_worker();
    sb.wait_drained(DRAIN).await.unwrap();
    let stats = sb.sim.stats();
    // No retries here: every slot was free when its batch took it.
    assert_eq!(stats.total("im_set_attr"), stats.set_attr_ok, "{stats:?}");
    assert_eq!(
        tap.waited(),
        0,
        "a batch was formed before its slot was free"
    );
    assert_client_kept_the_rate(&tap, 2);
    let last = BTreeMap::from([("n".to_string(), (rounds - 1).to_string())]);
    let state = sb.state();
    assert_eq!(state.len(), accounts);
    assert!(state.values().all(|v| *v == last), "{state:?}");
    sb.cleanup().await.unwrap();
}
