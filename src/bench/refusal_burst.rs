//! Scenario 6: the API refuses everything for a moment; how soon the worker
//! is back at the ceiling.

use std::time::{Duration, Instant};

use crate::config::Config;

use super::harness::{prefill, sandbox_for, CEILING};
use super::process::strict_sim;
use super::report::{fig, target, Figure};
use super::Sizes;

pub(super) async fn run(base: &Config, s: &Sizes) -> anyhow::Result<Vec<Figure>> {
    let name = "6 refusal burst";
    const BURST_MS: u64 = 300;
    let sim = strict_sim(100, 50).await?;
    let mut sb = sandbox_for(base, &sim, |_| {}).await?;
    // More distinct accounts than the run can write.
    let updates = (CEILING as usize) * (s.burst_before_secs + s.burst_after_secs + 2) as usize;
    prefill(&sb, updates, updates).await?;
    sb.start_worker();
    let started = Instant::now();
    let burst_at = started + Duration::from_secs(s.burst_before_secs);
    let end = burst_at + Duration::from_secs(s.burst_after_secs);
    let mut samples: Vec<(Instant, u64)> = Vec::new();
    let mut burst_sent = false;
    let mut refused_before = 0;
    while Instant::now() < end {
        let now = Instant::now();
        if !burst_sent && now >= burst_at {
            refused_before = sim.stats().await?.count("im_set_attr", 60007);
            sim.refuse_for(BURST_MS).await?;
            burst_sent = true;
        }
        samples.push((now, sim.stats().await?.accounts_written));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stats = sim.stats().await?;
    sb.cleanup().await?;
    sim.stop().await;
    // Accounts/s over the second after each sample.
    let rate_from = |i: usize| -> Option<f64> {
        let (t, w) = samples[i];
        let j = samples[i..]
            .iter()
            .position(|(u, _)| *u >= t + Duration::from_secs(1))?;
        let (u, v) = samples[i + j];
        Some((v - w) as f64 / (u - t).as_secs_f64())
    };
    let burst_end = burst_at + Duration::from_millis(BURST_MS);
    let before = (0..samples.len())
        .filter(|&i| {
            samples[i].0 >= started + Duration::from_secs(1)
                && samples[i].0 + Duration::from_secs(1) <= burst_at
        })
        .filter_map(rate_from)
        .fold(f64::NAN, f64::max);
    let back = (0..samples.len())
        .filter(|&i| samples[i].0 >= burst_end)
        .find(|&i| rate_from(i).is_some_and(|r| r >= 0.9 * CEILING))
        .map(|i| (samples[i].0 - burst_end).as_secs_f64());
    let back_secs = back.unwrap_or(f64::INFINITY);
    let refused = stats.count("im_set_attr", 60007) - refused_before;
    Ok(vec![
        fig(
            name,
            "best second before the burst, fraction of ceiling",
            before / CEILING,
            "ratio",
        ),
        fig(
            name,
            &format!("requests refused (all refused for {BURST_MS} ms)"),
            refused as f64,
            "requests",
        ),
        target(
            fig(
                name,
                "time from the burst's end to a second at >= 0.9 of the ceiling",
                back_secs,
                "s",
            ),
            "<= 5 s",
            back_secs <= 5.0,
        ),
    ])
}
