//! Scenario 5: publish-to-applied latency at a steady publishing rate.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::sandbox::Sandbox;
use crate::simulator::Faults;

use super::harness::{bench_tweak, body, drained_at};
use super::report::{fig, target, Figure};
use super::Sizes;

/// The in-process simulator of scenario 5 (which records when each update
/// was applied): 100 requests/s, 50 ms.
fn api_faults() -> Faults {
    Faults {
        rate_limit: 100,
        max_accounts: 100,
        latency_ms: (50, 50),
        ..Faults::default()
    }
}

pub(super) async fn run(base: &Config, s: &Sizes) -> anyhow::Result<Vec<Figure>> {
    let name = "5 latency";
    let mut sb = Sandbox::start(base, "imattr.bench", &["n"], api_faults(), bench_tweak).await?;
    let max_wait = sb.config.batch.max_wait();
    sb.start_worker();
    let health = sb.health.clone();
    let t = Instant::now();
    while !health.is_consuming() && t.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    sb.sim.record_applies(true);
    let total = (s.latency_secs * s.latency_rate) as usize;
    let accounts = 5_000;
    let mut sent_at: HashMap<String, Instant> = HashMap::with_capacity(total);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let per_tick = (s.latency_rate / 100).max(1) as usize;
    let mut i = 0;
    while i < total {
        tick.tick().await;
        for _ in 0..per_tick.min(total - i) {
            let (_, b) = body(i, accounts);
            sb.publish(&b).await?;
            sent_at.insert(i.to_string(), Instant::now());
            i += 1;
        }
        sb.confirm().await?;
    }
    drained_at(&sb, Duration::from_secs(120)).await?;
    let applies = sb.sim.take_applies();
    sb.cleanup().await?;
    let mut lat: Vec<f64> = applies
        .iter()
        .filter_map(|(_, attrs, at)| {
            let sent = sent_at.get(attrs.get("n")?)?;
            Some(at.saturating_duration_since(*sent).as_secs_f64() * 1000.0)
        })
        .collect();
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    };
    let p99 = pct(0.99);
    let limit = max_wait.as_millis() as f64 + 50.0;
    Ok(vec![
        fig(
            name,
            &format!("{} msgs/s for {} s: p50", s.latency_rate, s.latency_secs),
            pct(0.50),
            "ms",
        ),
        target(
            fig(name, "p99 publish-to-applied", p99, "ms"),
            &format!("<= {limit} ms"),
            p99 <= limit,
        ),
        fig(name, "updates measured", lat.len() as f64, "updates"),
    ])
}
