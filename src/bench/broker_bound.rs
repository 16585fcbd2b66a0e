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

pub(super) async fn run(base: &Config, s: &Sizes) -> anyhow::Result<Vec<Figure>> {
    let name = "1 broker-bound drain";
    // (a) a bare consumer in its own process with the default (one thread
    // per core) runtime.
    let sb = Sandbox::start(base, "imattr.bench", &["n"], Faults::default(), bench_tweak).await?;
    prefill(&sb, s.drain_updates, s.drain_accounts).await?;
    let started = Instant::now();
    let out = imattr_command(&sb.config)?
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
    let bare_rate = s.drain_updates as f64 / secs;
    sb.cleanup().await?;

    // (b) `imattr run` in its own process into a simulator process with no
    // latency and no rate limit.
    let sim = SimProcess::start(&["--rate-limit", "0"]).await?;
    let sb = sandbox_for(base, &sim, |c| c.tencent.rate_limit_per_sec = 1_000_000).await?;
    prefill(&sb, s.drain_updates, s.drain_accounts).await?;
    let started = Instant::now();
    let worker = WorkerProcess::start(&sb.config).await?;
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
    let rate = s.drain_updates as f64 / secs;
    let ratio = rate / bare_rate;
    Ok(vec![
        fig(
            name,
            "bare lapin consumer, own process (acks only)",
            bare_rate,
            "msgs/s",
        ),
        fig(
            name,
            "imattr run, own process, into the simulator",
            rate,
            "msgs/s",
        ),
        fig(
            name,
            "imattr requests",
            stats.set_attr_ok as f64,
            "requests",
        ),
        target(
            fig(name, "ratio imattr / bare consumer", ratio, "ratio"),
            ">= 0.8",
            ratio >= 0.8,
        ),
        state_figure(name, correct),
    ])
}
