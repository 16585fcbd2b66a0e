//! `imattr bench`: throughput, latency and memory against the local RabbitMQ
//! and the simulator, each scenario on fresh uniquely named queues. Where the
//! API's rate limit matters the simulator runs as its own process
//! (`imattr simulate`, strict: it refuses the request over the limit in any
//! sliding second), as the real API would be reached: over TCP, on its own
//! clock. The figures and how they were reached are in BENCHMARKS.md.

mod api_bound;
mod broker_bound;
mod dead_letters;
mod harness;
mod hot_accounts;
mod large_bodies;
mod latency;
mod memory;
mod mixed;
mod process;
mod refusal_burst;
mod regressions;
mod report;

use anyhow::Context;

use crate::config::Config;

pub(crate) use broker_bound::bare_consumer;
use report::print_table;

struct Sizes {
    /// Rounds of scenario 1, each running every configuration once.
    drain_rounds: usize,
    drain_updates: usize,
    drain_accounts: usize,
    api_updates: usize,
    hot_updates: usize,
    hot_accounts: usize,
    memory_small: usize,
    memory_large: usize,
    latency_secs: u64,
    latency_rate: u64,
    dead_letters: usize,
    burst_before_secs: u64,
    burst_after_secs: u64,
    many_accounts: usize,
    large_bodies: usize,
    large_bodies_normal: usize,
}

const FULL: Sizes = Sizes {
    drain_rounds: 1,
    drain_updates: 300_000,
    drain_accounts: 20_000,
    api_updates: 200_000,
    hot_updates: 200_000,
    hot_accounts: 1_000,
    memory_small: 100_000,
    memory_large: 1_000_000,
    latency_secs: 20,
    latency_rate: 1_000,
    dead_letters: 1_000_000,
    burst_before_secs: 4,
    burst_after_secs: 8,
    many_accounts: 40_000,
    large_bodies: 100,
    large_bodies_normal: 100,
};

const QUICK: Sizes = Sizes {
    drain_rounds: 1,
    drain_updates: 3_000,
    drain_accounts: 500,
    api_updates: 2_000,
    hot_updates: 3_000,
    hot_accounts: 50,
    memory_small: 1_000,
    memory_large: 5_000,
    latency_secs: 2,
    latency_rate: 200,
    dead_letters: 5_000,
    burst_before_secs: 1,
    burst_after_secs: 2,
    many_accounts: 2_000,
    large_bodies: 20,
    large_bodies_normal: 100,
};

/// The scenarios, numbered from 1.
pub(crate) const SCENARIOS: [&str; 10] = [
    "broker-bound drain",
    "API-bound",
    "hot accounts",
    "memory",
    "latency",
    "refusal burst",
    "rate-limit regressions",
    "dead letters",
    "large bodies",
    "sets and removals",
];

/// Runs every scenario (or only scenario `only`) and prints the table (or JSON).
pub(crate) async fn run(
    base: Config,
    quick: bool,
    json: bool,
    only: Option<u8>,
    dead_letters_n: Option<usize>,
    rounds: Option<usize>,
) -> anyhow::Result<()> {
    let mut sizes = if quick { QUICK } else { FULL };
    if let Some(n) = rounds {
        sizes.drain_rounds = n;
    }
    if let Some(n) = dead_letters_n {
        sizes.dead_letters = n;
    }
    let mut figures = Vec::new();
    let say = |s: &str| {
        if !json {
            eprintln!("{s}");
        }
    };
    for n in 1..=SCENARIOS.len() as u8 {
        if only.is_some_and(|o| o != n) {
            continue;
        }
        say(&format!("{n}. {}", SCENARIOS[usize::from(n - 1)]));
        let scenario = match n {
            1 => broker_bound::run(&base, &sizes).await,
            2 => api_bound::run(&base, &sizes).await,
            3 => hot_accounts::run(&base, &sizes).await,
            4 => memory::run(&base, &sizes).await,
            5 => latency::run(&base, &sizes).await,
            6 => refusal_burst::run(&base, &sizes).await,
            7 => regressions::run(&base, &sizes).await,
            8 => dead_letters::run(&base, sizes.dead_letters).await,
            9 => large_bodies::run(&base, &sizes).await,
            _ => mixed::run(&base, &sizes).await,
        };
        figures.extend(scenario.with_context(|| format!("scenario {n}"))?);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&figures)?);
    } else {
        print_table(&figures);
    }
    Ok(())
}
