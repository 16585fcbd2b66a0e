//! Scenario 2: draining into a strict API at 100 requests/s: how close to the
//! ceiling, how full the requests, how few refused for rate.

use crate::config::Config;

use super::harness::{sandbox_for, timed_drain, Drain, CEILING};
use super::process::strict_sim;
use super::report::{fig, state_figure, target, Figure};
use super::Sizes;

pub(super) async fn run(base: &Config, s: &Sizes) -> anyhow::Result<Vec<Figure>> {
    let name = "2 API-bound";
    let mut out = Vec::new();
    // Every update a distinct account: the drain is the API's ceiling.
    for latency_ms in [50, 250] {
        let sim = strict_sim(100, latency_ms).await?;
        let sb = sandbox_for(base, &sim, |_| {}).await?;
        let Drain {
            secs,
            stats,
            correct,
        } = timed_drain(sb, &sim, s.api_updates, s.api_updates).await?;
        sim.stop().await;
        let total = stats.total("im_set_attr") as f64;
        let ok = stats.set_attr_ok as f64;
        let of_ceiling = stats.accounts_written as f64 / secs / CEILING;
        let mean = stats.accounts_written as f64 / ok.max(1.0);
        let refused = stats.count("im_set_attr", 60007) as f64 / total.max(1.0);
        let at = format!("{latency_ms} ms");
        out.extend([
            target(
                fig(
                    name,
                    &format!("{at}: fraction of the ceiling (100 x 100/s)"),
                    of_ceiling,
                    "ratio",
                ),
                ">= 0.95",
                of_ceiling >= 0.95,
            ),
            target(
                fig(
                    name,
                    &format!("{at}: mean accounts per request"),
                    mean,
                    "accounts",
                ),
                ">= 99",
                mean >= 99.0,
            ),
            target(
                fig(
                    name,
                    &format!("{at}: requests refused for rate (60007)"),
                    refused * 100.0,
                    "%",
                ),
                // The pacer's own window is exact (proven on paused time); at
                // the server a request can arrive later than its slot.
                "<= 0.1%",
                refused <= 0.001,
            ),
            state_figure(name, correct),
        ]);
    }
    Ok(out)
}
