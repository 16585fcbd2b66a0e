//! Scenario 4: the worker's peak memory draining a short and a ten times
//! longer queue, in its own process.

use std::time::{Duration, Instant};

use crate::config::Config;
use crate::sandbox::Sandbox;
use crate::simulator::Faults;

use super::harness::{bench_tweak, prefill};
use super::process::{peak_rss_mib, WorkerProcess};
use super::report::{fig, target, Figure};
use super::Sizes;

pub(super) async fn run(base: &Config, s: &Sizes) -> anyhow::Result<Vec<Figure>> {
    let name = "4 memory";
    let mut out = Vec::new();
    let mut peaks = Vec::new();
    for n in [s.memory_small, s.memory_large] {
        let sb = Sandbox::start(
            base,
            "imattr.bench",
            &["n"],
            Faults {
                rate_limit: 0,
                ..Faults::default()
            },
            |c| {
                bench_tweak(c);
                c.tencent.rate_limit_per_sec = 1_000_000;
            },
        )
        .await?;
        prefill(&sb, n, 20_000.min(n)).await?;
        let started = Instant::now();
        let worker = WorkerProcess::start(&sb.config).await?;
        while worker.acked().await.unwrap_or(0) < n as u64 {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(900),
                "memory scenario did not drain"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let secs = started.elapsed().as_secs_f64();
        let peak = peak_rss_mib(worker.pid).unwrap_or(f64::NAN);
        worker.stop().await;
        sb.cleanup().await?;
        peaks.push(peak);
        out.push(target(
            fig(
                name,
                &format!("peak RSS draining {n} messages"),
                peak,
                "MiB",
            ),
            "<= 64 MiB",
            peak <= 64.0,
        ));
        out.push(fig(
            name,
            &format!("drain rate, {n} messages (separate process)"),
            n as f64 / secs,
            "msgs/s",
        ));
    }
    // Bounded means a queue ten times longer costs no more than allocator
    // noise: runs of the same size differ by up to ~10 MiB on this machine.
    let growth = peaks[1] - peaks[0];
    out.push(target(
        fig(name, "peak RSS large - small", growth, "MiB"),
        "<= 16 MiB (bounded)",
        growth <= 16.0,
    ));
    Ok(out)
}
