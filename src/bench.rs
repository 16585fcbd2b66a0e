//! `imattr bench`: throughput, latency and memory figures (see BENCHMARKS.md).

use crate::config::Config;

/// Runs the benchmark scenarios.
pub async fn run(_config: Config, _quick: bool, _json: bool) -> anyhow::Result<()> {
    anyhow::bail!("imattr bench is not built yet (issue 7)")
}
