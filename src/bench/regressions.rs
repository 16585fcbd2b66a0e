//! Scenario 7: the rate-limit cases that once went wrong: many one-update
//! accounts with many requests in flight, and a backlog that keeps merging.

use crate::config::Config;

use super::harness::{sandbox_for, timed_drain, CEILING};
use super::process::strict_sim;
use super::report::{fig, state_figure, target, Figure};
use super::Sizes;

pub(super) async fn run(base: &Config, s: &Sizes) -> anyhow::Result<Vec<Figure>> {
    let name = "7 rate-limit regressions";
    // (a) One update each for many accounts, 16 in flight, the API allowing
    // 110/s (more than imattr's 100): 400 requests, about 4 s.
    let sim = strict_sim(110, 50).await?;
    let sb = sandbox_for(base, &sim, |c| c.tencent.max_in_flight = 16).await?;
    let n = s.many_accounts;
    let d = timed_drain(sb, &sim, n, n).await?;
    sim.stop().await;
    // At the ceiling, plus a second for starting up and the last replies.
    let ideal = n as f64 / CEILING;
    let mut out = vec![
        target(
            fig(
                name,
                &format!("{n} one-update accounts, 16 in flight, API at 110/s: drain"),
                d.secs,
                "s",
            ),
            &format!("<= {:.1} s", ideal + 1.0),
            d.secs <= ideal + 1.0,
        ),
        fig(
            name,
            "  requests refused (60007)",
            d.stats.count("im_set_attr", 60007) as f64,
            "requests",
        ),
        state_figure(name, d.correct),
    ];
    // (b) A backlog of 10 rounds over 300 accounts: updates keep merging
    // while requests wait for a slot.
    let (rounds, accounts) = (10, 300);
    let sim = strict_sim(100, 50).await?;
    let sb = sandbox_for(base, &sim, |_| {}).await?;
    let d = timed_drain(sb, &sim, rounds * accounts, accounts).await?;
    sim.stop().await;
    let messages = (rounds * accounts) as f64;
    let entries = d.stats.accounts_written as f64;
    out.extend([
        target(
            fig(
                name,
                "backlog of 10 rounds x 300 accounts: entries sent / messages",
                entries / messages,
                "ratio",
            ),
            "<= 0.4",
            entries / messages <= 0.4,
        ),
        state_figure(name, d.correct),
    ]);
    Ok(out)
}
