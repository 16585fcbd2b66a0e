//! `imattr demo`: the simulator, the worker and sample traffic on the local
//! broker, then a summary that says whether the final state is right.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use crate::config::Config;
use crate::sandbox::Sandbox;
use crate::simulator::Faults;

const ACCOUNTS: usize = 2_000;
const UPDATES: usize = 20_000;

/// Runs the demo; fails (exit 1) if the final state is not the expected one.
pub(crate) async fn run(base: Config) -> anyhow::Result<()> {
    let started = Instant::now();
    println!(
        "imattr demo: simulator + worker + {UPDATES} updates (values and removals) over {ACCOUNTS} accounts"
    );
    println!("  RabbitMQ: {}", base.amqp.url);
    let faults = Faults {
        fail_rate: 0.02,
        latency_ms: (2, 10),
        reject_attrs: vec!["nickname".into()],
        ..Faults::default()
    };
    let mut sb = Sandbox::start(
        &base,
        "imattr.demo",
        &["level", "city", "tier", "nickname"],
        faults,
        |c| {
            c.retry.max_elapsed_secs = 120;
            c.log.level = "warn".into();
        },
    )
    .await?;
    println!(
        "  simulator: {} (2% ErrorCode 91000, 2–10 ms latency, rejects \"nickname\")",
        sb.sim.url()
    );
    println!(
        "  queues: {} and {}",
        sb.config.amqp.queue, sb.config.amqp.dead_letter_queue
    );
    let result = drive(&mut sb, started).await;
    let cleanup = sb.cleanup().await;
    let ok = result?;
    cleanup?;
    if ok {
        Ok(())
    } else {
        anyhow::bail!(
            "the simulator's final state differs from the expected state (the last operation per attribute wins)"
        )
    }
}

async fn drive(sb: &mut Sandbox, started: Instant) -> anyhow::Result<bool> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut expected: HashMap<String, BTreeMap<String, String>> = HashMap::new();
    let mut bodies: Vec<Vec<u8>> = Vec::with_capacity(UPDATES + 16);
    for i in 0..UPDATES {
        let account = format!("user-{:04}", rng.gen_range(0..ACCOUNTS));
        // None: `null`, which removes the attribute.
        let mut attrs: BTreeMap<String, Option<String>> = BTreeMap::new();
        attrs.insert("level".to_string(), Some(i.to_string()));
        if rng.gen_bool(0.5) {
            attrs.insert(
                "city".to_string(),
                Some(format!("city-{}", rng.gen_range(0..50))),
            );
        } else if rng.gen_bool(0.2) {
            attrs.insert("city".to_string(), None);
        }
        if rng.gen_bool(0.1) {
            attrs.insert(
                "tier".to_string(),
                Some(["gold", "silver", "bronze"][i % 3].to_string()),
            );
        } else if rng.gen_bool(0.05) {
            attrs.insert("tier".to_string(), None);
        }
        let e = expected.entry(account.clone()).or_default();
        for (k, v) in &attrs {
            match v {
                Some(v) => e.insert(k.clone(), v.clone()),
                None => e.remove(k),
            };
        }
        bodies.push(serde_json::to_vec(
            &serde_json::json!({"To_Account": account, "Attrs": attrs}),
        )?);
    }
    // A few messages the worker must refuse itself …
    let invalid: Vec<Vec<u8>> = vec![
        b"this is not json".to_vec(),
        br#"{"To_Account":"user-0001"}"#.to_vec(),
        br#"{"To_Account":"user-0002","Attrs":{"level":"ThisValueIsMuchLongerThanFiftyBytesAndSoItIsRefused!"}}"#.to_vec(),
        br#"{"To_Account":"user-0003","Attrs":{"favourite_colour":"blue"}}"#.to_vec(),
        vec![0xff, 0xfe, 0x00, 0x01],
    ];
    // … and a few the API rejects (an attribute the simulator refuses, set
    // or removed).
    let rejected: Vec<Vec<u8>> = (0..5)
        .map(|i| {
            let op = if i < 3 {
                format!("\"nick{i}\"")
            } else {
                "null".to_string()
            };
            format!(
                r#"{{"To_Account":"user-{:04}","Attrs":{{"nickname":{op}}}}}"#,
                i * 7
            )
            .into_bytes()
        })
        .collect();
    let odd = invalid.len() + rejected.len();
    for (i, b) in invalid.iter().chain(rejected.iter()).enumerate() {
        let at = (i + 1) * UPDATES / (odd + 1);
        bodies.insert(at, b.clone());
    }
    let published = bodies.len();

    sb.start_worker();
    let publish_started = Instant::now();
    let bar = indicatif::ProgressBar::new(published as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("  {msg:10} [{bar:40}] {pos}/{len} messages")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message("publishing");
    for b in &bodies {
        sb.publish(b).await?;
        bar.inc(1);
    }
    sb.confirm().await?;
    bar.set_position(0);
    bar.set_message("draining");
    let queue = sb.config.amqp.queue.clone();
    let drain = async {
        loop {
            let ready = sb.depth(&queue).await? as u64;
            let unsettled = sb.health.unsettled() as u64;
            bar.set_position((published as u64).saturating_sub(ready + unsettled));
            if ready == 0 && unsettled == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(300), drain)
        .await
        .map_err(|_| anyhow::anyhow!("the demo did not drain within 300 s"))??;
    sb.wait_drained(Duration::from_secs(60)).await?;
    bar.finish_and_clear();
    let elapsed = publish_started.elapsed();
    sb.stop_worker().await?;

    let left = sb.depth(&sb.config.amqp.queue).await?;
    let dead = sb.dead_letters().await?;
    let mut by_reason: BTreeMap<String, usize> = BTreeMap::new();
    for d in &dead {
        *by_reason
            .entry(d.reason.clone().unwrap_or_default())
            .or_default() += 1;
    }
    let state = sb.state();
    let mut mismatched = 0;
    for (account, attrs) in &expected {
        if state.get(account) != Some(attrs) {
            mismatched += 1;
        }
    }
    let extra = state.keys().filter(|k| !expected.contains_key(*k)).count();
    let stats = sb.sim.stats();
    let requests = stats.total("im_set_attr");
    let retries = stats.count("im_set_attr", 91000);
    let removals = stats.total("im_remove_attr");
    let ok = mismatched == 0
        && extra == 0
        && left == 0
        && by_reason.get("invalid-message") == Some(&invalid.len())
        && by_reason.get("rejected") == Some(&rejected.len());

    println!();
    println!("Summary");
    println!("  published            {published} messages ({UPDATES} updates, {} invalid, {} rejected by the API)", invalid.len(), rejected.len());
    println!(
        "  API requests         {requests} im_set_attr ({} OK, {retries} answered 91000 and retried, {} answered 90033 while isolating the rejected messages)",
        stats.set_attr_ok,
        stats.count("im_set_attr", 90033)
    );
    println!(
        "                       {removals} im_remove_attr ({} OK, {} answered 91000 and retried, {} answered 90033)",
        stats.remove_attr_ok,
        stats.count("im_remove_attr", 91000),
        stats.count("im_remove_attr", 90033)
    );
    println!(
        "  accounts written     {} (in {} distinct accounts); {} account entries removed attributes",
        stats.accounts_written,
        state.len(),
        stats.accounts_removed
    );
    println!(
        "  mean accounts/request {:.1}",
        if stats.set_attr_ok > 0 {
            stats.accounts_written as f64 / stats.set_attr_ok as f64
        } else {
            0.0
        }
    );
    let reasons: Vec<String> = by_reason.iter().map(|(r, n)| format!("{r}: {n}")).collect();
    println!(
        "  dead-lettered        {} ({})",
        dead.len(),
        if reasons.is_empty() {
            "none".into()
        } else {
            reasons.join(", ")
        }
    );
    println!("  left in the queue    {left}");
    println!(
        "  elapsed              {:.2} s ({:.0} messages/s), {:.2} s in all",
        elapsed.as_secs_f64(),
        published as f64 / elapsed.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    println!(
        "  final state          {}",
        if ok {
            "matches the expected state (last operation per attribute wins) for every account ✔"
                .to_string()
        } else {
            format!("WRONG: {mismatched} accounts differ, {extra} unexpected accounts, {left} messages left")
        }
    );
    Ok(ok)
}
