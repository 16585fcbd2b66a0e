//! Scenario 3: many updates over few accounts, where coalescing pays.

use crate::config::Config;

use super::harness::{sandbox_for, timed_drain, Drain};
use super::process::strict_sim;
use super::report::{fig, state_figure, target, Figure};
use super::Sizes;

/// Prefetch used by the hot-accounts scenario (see BENCHMARKS.md).
const HOT_PREFETCH: u16 = 20_000;

pub(super) async fn run(base: &Config, s: &Sizes) -> anyhow::Result<Vec<Figure>> {
    let name = "3 hot accounts";
    let sim = strict_sim(100, 50).await?;
    let sb = sandbox_for(base, &sim, |c| c.amqp.prefetch = HOT_PREFETCH).await?;
    let Drain {
        secs,
        stats,
        correct,
    } = timed_drain(sb, &sim, s.hot_updates, s.hot_accounts).await?;
    sim.stop().await;
    let rate = s.hot_updates as f64 / secs;
    Ok(vec![
        target(
            fig(
                name,
                &format!("drain rate (prefetch {HOT_PREFETCH})"),
                rate,
                "msgs/s",
            ),
            ">= 50,000",
            rate >= 50_000.0,
        ),
        fig(name, "API requests", stats.set_attr_ok as f64, "requests"),
        state_figure(name, correct),
    ])
}
