//! Scenario 1: how fast `imattr run` drains a queue when neither the API nor
//! its rate limit is in the way, against the bare consumer below.

use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;

use crate::config::Config;
use crate::sandbox::Sandbox;
use crate::simulator::Faults;

use super::harness::{bench_tweak, expected_state, prefill, sandbox_for, states_match};
use super::process::{imattr_command, SimProcess, WorkerProcess};
use super::report::{fig, state_figure, target, Figure};
use super::Sizes;

/// `imattr bench-consumer`: the strongest plain consumer we can write, for
/// scenario 1 to compare against. Consumes `count` messages from the
/// configured queue and acks them (`multiple` every prefetch/4); prints the
/// seconds from consuming to the last ack.
pub(crate) async fn bare_consumer(config: &Config, count: usize) -> anyhow::Result<()> {
    let prefetch = config.amqp.prefetch;
    let conn =
        crate::amqp::nodes::connect_first(&config.amqp, "imattr bench bare consumer").await?;
    let ch = conn.create_channel().await?;
    ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let started = Instant::now();
    let mut consumer = ch
        .basic_consume(
            config.amqp.queue.as_str().into(),
            "bench".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let every = u64::from(prefetch / 4).max(1);
    let mut n = 0usize;
    while n < count {
        let d = consumer.next().await.context("consumer ended")??;
        n += 1;
        if d.delivery_tag % every == 0 || n == count {
            ch.basic_ack(d.delivery_tag, BasicAckOptions { multiple: true })
                .await?;
        }
    }
    println!("{}", started.elapsed().as_secs_f64());
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}

/// What scenario 1 runs in each round: the bare consumer, then `imattr run`
/// with the runtime's default thread count and with 1 and 2 worker threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    Bare,
    /// `TOKIO_WORKER_THREADS` for `imattr run`; `None` leaves it unset.
    Imattr(Option<usize>),
}

const RUNS: [Run; 4] = [
    Run::Bare,
    Run::Imattr(None),
    Run::Imattr(Some(1)),
    Run::Imattr(Some(2)),
];

impl Run {
    fn label(self) -> &'static str {
        match self {
            Run::Bare => "bare lapin consumer, own process (acks only)",
            Run::Imattr(None) => "imattr run, own process, into the simulator",
            Run::Imattr(Some(1)) => "imattr run, TOKIO_WORKER_THREADS=1",
            Run::Imattr(Some(2)) => "imattr run, TOKIO_WORKER_THREADS=2",
            Run::Imattr(Some(_)) => "imattr run, TOKIO_WORKER_THREADS=N",
        }
    }
}

/// Round `round` (from 0) runs `RUNS` rotated by `round`, so that no
/// configuration always runs first or right after a prefill of the same
/// size: on a shared machine the load drifts within a round too.
fn order(round: usize) -> Vec<Run> {
    let mut runs = RUNS.to_vec();
    runs.rotate_left(round % RUNS.len());
    runs
}

/// The median, smallest and largest of `values` (NaN for none).
fn spread(values: &[f64]) -> (f64, f64, f64) {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (median, v[0], v[n - 1])
}

/// The 1-minute load average, as `uptime` shows it.
fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// One measured drain.
struct Measured {
    rate: f64,
    requests: f64,
    correct: bool,
}

/// (a) the bare consumer in its own process with the default (one thread
/// per core) runtime.
async fn bare(base: &Config, s: &Sizes) -> anyhow::Result<Measured> {
    let sb = Sandbox::start(base, "imattr.bench", &["n"], Faults::default(), bench_tweak).await?;
    prefill(&sb, s.drain_updates, s.drain_accounts).await?;
    let started = Instant::now();
    let out = imattr_command(&sb.config)?
        .env_remove("TOKIO_WORKER_THREADS")
        .args(["bench-consumer", "--count", &s.drain_updates.to_string()])
        .stdout(std::process::Stdio::piped())
        .output()
        .await
        .context("running imattr bench-consumer")?;
    let secs = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        out.status.success(),
        "bench-consumer failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    sb.cleanup().await?;
    Ok(Measured {
        rate: s.drain_updates as f64 / secs,
        requests: 0.0,
        correct: true,
    })
}

/// (b) `imattr run` in its own process with `threads` into a simulator
/// process with no latency and no rate limit.
async fn imattr(base: &Config, s: &Sizes, threads: Option<usize>) -> anyhow::Result<Measured> {
    let sim = SimProcess::start(&["--rate-limit", "0"]).await?;
    let sb = sandbox_for(base, &sim, |c| c.tencent.rate_limit_per_sec = 1_000_000).await?;
    prefill(&sb, s.drain_updates, s.drain_accounts).await?;
    let started = Instant::now();
    let worker = WorkerProcess::start_with(&sb.config, |cmd| match threads {
        Some(n) => cmd.env("TOKIO_WORKER_THREADS", n.to_string()),
        None => cmd.env_remove("TOKIO_WORKER_THREADS"),
    })
    .await?;
    loop {
        if worker.acked().await.unwrap_or(0) >= s.drain_updates as u64 {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(900),
            "imattr did not drain"
        );
        // Not faster: each look renders the metrics page inside the measured process.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    worker.stop().await;
    let stats = sim.stats().await?;
    let correct = states_match(
        &sim.state().await?,
        &expected_state(s.drain_updates, s.drain_accounts),
    );
    sb.cleanup().await?;
    sim.stop().await;
    Ok(Measured {
        rate: s.drain_updates as f64 / secs,
        requests: stats.set_attr_ok as f64,
        correct,
    })
}

pub(super) async fn run(base: &Config, s: &Sizes) -> anyhow::Result<Vec<Figure>> {
    let name = "1 broker-bound drain";
    let mut out = Vec::new();
    let mut rates: Vec<(Run, Vec<f64>)> = RUNS.iter().map(|r| (*r, Vec::new())).collect();
    let mut ratios: Vec<(Run, Vec<f64>)> = RUNS[1..].iter().map(|r| (*r, Vec::new())).collect();
    let mut loads = Vec::new();
    let mut requests = 0.0;
    let mut correct = true;
    for round in 0..s.drain_rounds.max(1) {
        let mut this_round = Vec::new();
        for run in order(round) {
            let load = load_average();
            loads.push(load);
            let m = match run {
                Run::Bare => bare(base, s).await?,
                Run::Imattr(threads) => imattr(base, s, threads).await?,
            };
            if run == Run::Imattr(None) {
                requests = m.requests;
            }
            correct &= m.correct;
            out.push(fig(
                name,
                &format!("round {}: {} (load {load:.2})", round + 1, run.label()),
                m.rate,
                "msgs/s",
            ));
            this_round.push((run, m.rate));
        }
        let rate_of = |want: Run| this_round.iter().find(|(r, _)| *r == want).map(|x| x.1);
        let bare_rate = rate_of(Run::Bare).unwrap_or(f64::NAN);
        for (run, v) in &mut rates {
            v.push(rate_of(*run).unwrap_or(f64::NAN));
        }
        // Each ratio against the bare consumer of the same round.
        for (run, v) in &mut ratios {
            v.push(rate_of(*run).unwrap_or(f64::NAN) / bare_rate);
        }
    }
    let rounds = s.drain_rounds.max(1);
    for (run, v) in &rates {
        let (median, lo, hi) = spread(v);
        out.push(fig(name, run.label(), median, "msgs/s"));
        if rounds > 1 {
            out.push(fig(name, &format!("{}: min", run.label()), lo, "msgs/s"));
            out.push(fig(name, &format!("{}: max", run.label()), hi, "msgs/s"));
        }
    }
    out.push(fig(name, "imattr requests", requests, "requests"));
    for (run, v) in &ratios {
        let (median, lo, hi) = spread(v);
        let metric = match run {
            Run::Imattr(None) => "ratio imattr / bare consumer".to_string(),
            Run::Imattr(Some(n)) => format!("ratio imattr / bare consumer, {n} worker thread(s)"),
            Run::Bare => continue,
        };
        let f = fig(name, &metric, median, "ratio");
        // The target is the default's: what an operator gets.
        out.push(if *run == Run::Imattr(None) {
            target(f, ">= 0.8", median >= 0.8)
        } else {
            f
        });
        if rounds > 1 {
            out.push(fig(name, &format!("{metric}: min"), lo, "ratio"));
            out.push(fig(name, &format!("{metric}: max"), hi, "ratio"));
        }
    }
    let (_, lo, hi) = spread(&loads);
    out.push(fig(name, "load average (1 min) at starts: min", lo, "load"));
    out.push(fig(name, "load average (1 min) at starts: max", hi, "load"));
    out.push(state_figure(name, correct));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_round_runs_each_configuration_once_and_rotates() {
        for round in 0..8 {
            let o = order(round);
            assert_eq!(o.len(), RUNS.len());
            for r in RUNS {
                assert_eq!(o.iter().filter(|x| **x == r).count(), 1);
            }
            assert_eq!(o[0], RUNS[round % RUNS.len()]);
        }
    }

    #[test]
    fn spread_gives_median_min_max() {
        assert_eq!(spread(&[3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
        assert_eq!(spread(&[4.0, 1.0, 2.0, 3.0]), (2.5, 1.0, 4.0));
        assert_eq!(spread(&[f64::NAN, 5.0]), (5.0, 5.0, 5.0));
        assert!(spread(&[]).0.is_nan());
    }
}
