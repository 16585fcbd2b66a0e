//! `imattr bench`: throughput, latency and memory against the local RabbitMQ
//! and the in-process simulator, each scenario on fresh uniquely named queues.
//! The figures and how they were reached are in BENCHMARKS.md.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use serde::Serialize;

use crate::config::Config;
use crate::sandbox::{env_vars, Sandbox};
use crate::simulator::Faults;

/// One figure of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    /// Scenario number and name.
    pub scenario: String,
    /// What was measured.
    pub metric: String,
    /// The measurement.
    pub value: f64,
    /// Its unit.
    pub unit: String,
    /// The target, if any.
    pub target: Option<String>,
    /// Whether the target was met.
    pub pass: Option<bool>,
}

struct Sizes {
    drain_updates: usize,
    drain_accounts: usize,
    api_updates: usize,
    api_accounts: usize,
    hot_updates: usize,
    hot_accounts: usize,
    memory_small: usize,
    memory_large: usize,
    latency_secs: u64,
    latency_rate: u64,
}

const FULL: Sizes = Sizes {
    drain_updates: 300_000,
    drain_accounts: 20_000,
    api_updates: 200_000,
    api_accounts: 100_000,
    hot_updates: 200_000,
    hot_accounts: 1_000,
    memory_small: 100_000,
    memory_large: 1_000_000,
    latency_secs: 20,
    latency_rate: 1_000,
};

const QUICK: Sizes = Sizes {
    drain_updates: 3_000,
    drain_accounts: 500,
    api_updates: 2_000,
    api_accounts: 1_000,
    hot_updates: 3_000,
    hot_accounts: 50,
    memory_small: 1_000,
    memory_large: 5_000,
    latency_secs: 2,
    latency_rate: 200,
};

/// Prefetch used by the hot-accounts scenario (see BENCHMARKS.md).
pub const HOT_PREFETCH: u16 = 20_000;

/// Runs every scenario (or only scenario `only`) and prints the table (or JSON).
pub async fn run(base: Config, quick: bool, json: bool, only: Option<u8>) -> anyhow::Result<()> {
    let sizes = if quick { QUICK } else { FULL };
    let mut figures = Vec::new();
    let say = |s: &str| {
        if !json {
            eprintln!("{s}");
        }
    };
    const NAMES: [&str; 5] = [
        "broker-bound drain",
        "API-bound",
        "hot accounts",
        "memory",
        "latency",
    ];
    for n in 1..=5u8 {
        if only.is_some_and(|o| o != n) {
            continue;
        }
        say(&format!("{n}. {}", NAMES[usize::from(n - 1)]));
        let scenario = match n {
            1 => broker_bound(&base, &sizes).await,
            2 => api_bound(&base, &sizes).await,
            3 => hot_accounts(&base, &sizes).await,
            4 => memory(&base, &sizes).await,
            _ => latency(&base, &sizes).await,
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

fn print_table(figures: &[Figure]) {
    println!(
        "{:<24} {:<44} {:>14}  {:<12} {:<18} met",
        "scenario", "metric", "value", "unit", "target"
    );
    for f in figures {
        println!(
            "{:<24} {:<44} {:>14.2}  {:<12} {:<18} {}",
            f.scenario,
            f.metric,
            f.value,
            f.unit,
            f.target.clone().unwrap_or_default(),
            match f.pass {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "",
            }
        );
    }
}

fn fig(scenario: &str, metric: &str, value: f64, unit: &str) -> Figure {
    Figure {
        scenario: scenario.into(),
        metric: metric.into(),
        value,
        unit: unit.into(),
        target: None,
        pass: None,
    }
}

fn target(mut f: Figure, text: &str, pass: bool) -> Figure {
    f.target = Some(text.into());
    f.pass = Some(pass);
    f
}

/// Whether the final state was last-value-wins, as a figure with its target.
fn state_figure(scenario: &str, correct: bool) -> Figure {
    target(
        fig(
            scenario,
            "final state correct",
            f64::from(u8::from(correct)),
            "bool",
        ),
        "1",
        correct,
    )
}

/// Sequential updates: update `i` sets `n` of account `i % accounts` to `i`.
fn body(i: usize, accounts: usize) -> (String, Vec<u8>) {
    let account = format!("acc{:06}", i % accounts);
    let b = format!(r#"{{"To_Account":"{account}","Attrs":{{"n":"{i}"}}}}"#).into_bytes();
    (account, b)
}

fn expected_state(updates: usize, accounts: usize) -> HashMap<String, BTreeMap<String, String>> {
    let mut m = HashMap::new();
    for i in updates.saturating_sub(accounts)..updates {
        let (a, _) = body(i, accounts);
        m.insert(a, BTreeMap::from([("n".to_string(), i.to_string())]));
    }
    m
}

async fn prefill(sb: &Sandbox, updates: usize, accounts: usize) -> anyhow::Result<()> {
    for i in 0..updates {
        let (_, b) = body(i, accounts);
        sb.publish(&b).await?;
    }
    sb.confirm().await?;
    Ok(())
}

/// What a timed drain measured.
struct Drain {
    secs: f64,
    stats: crate::simulator::Stats,
    correct: bool,
}

/// Prefills `updates` over `accounts`, then starts the worker and times the
/// drain; checks the final state and deletes the sandbox.
async fn timed_drain(mut sb: Sandbox, updates: usize, accounts: usize) -> anyhow::Result<Drain> {
    prefill(&sb, updates, accounts).await?;
    let started = Instant::now();
    sb.start_worker();
    let done = drained_at(&sb, Duration::from_secs(900)).await?;
    let stats = sb.sim.stats();
    let correct = sb.state() == expected_state(updates, accounts);
    sb.cleanup().await?;
    Ok(Drain {
        secs: (done - started).as_secs_f64(),
        stats,
        correct,
    })
}

/// Polls every 5 ms until the queue is empty and nothing is unsettled.
async fn drained_at(sb: &Sandbox, timeout: Duration) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + timeout;
    let queue = sb.config.amqp.queue.clone();
    loop {
        if sb.depth(&queue).await? == 0 && sb.health.unsettled() == 0 && sb.health.is_consuming() {
            return Ok(Instant::now());
        }
        anyhow::ensure!(Instant::now() < deadline, "not drained within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Settings every scenario shares: the names are known up front.
fn bench_tweak(c: &mut Config) {
    c.attributes.allowed = vec!["n".into()];
}

async fn broker_bound(base: &Config, s: &Sizes) -> anyhow::Result<Vec<Figure>> {
    let name = "1 broker-bound drain";
    let no_limit = Faults {
        rate_limit: 0,
        ..Faults::default()
    };
    // (a) a bare consumer that only acks, `multiple` every prefetch/4.
    let sb = Sandbox::start(base, "imattr.bench", &["n"], no_limit.clone(), bench_tweak).await?;
    prefill(&sb, s.drain_updates, s.drain_accounts).await?;
    let prefetch = sb.config.amqp.prefetch;
    let conn =
        crate::amqp::nodes::connect_first(&sb.config.amqp, "imattr bench bare consumer").await?;
    let ch = conn.create_channel().await?;
    ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let started = Instant::now();
    let mut consumer = ch
        .basic_consume(
            sb.config.amqp.queue.as_str().into(),
            "bench".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let every = u64::from(prefetch / 4).max(1);
    let mut n = 0usize;
    while n < s.drain_updates {
        let d = consumer.next().await.context("consumer ended")??;
        n += 1;
        if d.delivery_tag % every == 0 || n == s.drain_updates {
            ch.basic_ack(d.delivery_tag, BasicAckOptions { multiple: true })
                .await?;
        }
    }
    let bare_rate = n as f64 / started.elapsed().as_secs_f64();
    let _ = conn.close(200, "done".into()).await;
    sb.cleanup().await?;

    // (b) imattr into the simulator with no latency and no rate limit.
    let sb = Sandbox::start(base, "imattr.bench", &["n"], no_limit, |c| {
        bench_tweak(c);
        c.tencent.rate_limit_per_sec = 1_000_000;
    })
    .await?;
    let Drain {
        secs,
        stats,
        correct,
    } = timed_drain(sb, s.drain_updates, s.drain_accounts).await?;
    let rate = s.drain_updates as f64 / secs;
    let ratio = rate / bare_rate;
    Ok(vec![
        fig(name, "bare lapin consumer (acks only)", bare_rate, "msgs/s"),
        fig(name, "imattr into the simulator", rate, "msgs/s"),
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

fn api_faults() -> Faults {
    Faults {
        rate_limit: 100,
        max_accounts: 100,
        latency_ms: (50, 50),
        ..Faults::default()
    }
}

async fn api_bound(base: &Config, s: &Sizes) -> anyhow::Result<Vec<Figure>> {
    let name = "2 API-bound";
    let sb = Sandbox::start(base, "imattr.bench", &["n"], api_faults(), bench_tweak).await?;
    let Drain {
        secs,
        stats,
        correct,
    } = timed_drain(sb, s.api_updates, s.api_accounts).await?;
    let total = stats.total("im_set_attr") as f64;
    let ok = stats.set_attr_ok as f64;
    let accounts_per_sec = stats.accounts_written as f64 / secs;
    let of_ceiling = accounts_per_sec / 10_000.0;
    let mean = stats.accounts_written as f64 / ok.max(1.0);
    let refused = stats.count("im_set_attr", 60007) as f64 / total.max(1.0);
    Ok(vec![
        fig(
            name,
            "messages drained",
            s.api_updates as f64 / secs,
            "msgs/s",
        ),
        fig(name, "accounts written", accounts_per_sec, "accounts/s"),
        target(
            fig(
                name,
                "fraction of the 10,000 accounts/s ceiling",
                of_ceiling,
                "ratio",
            ),
            ">= 0.97",
            of_ceiling >= 0.97,
        ),
        target(
            fig(name, "mean accounts per request", mean, "accounts"),
            ">= 99",
            mean >= 99.0,
        ),
        target(
            fig(
                name,
                "requests refused for rate (60007)",
                refused * 100.0,
                "%",
            ),
            "<= 1%",
            refused <= 0.01,
        ),
        state_figure(name, correct),
    ])
}

async fn hot_accounts(base: &Config, s: &Sizes) -> anyhow::Result<Vec<Figure>> {
    let name = "3 hot accounts";
    let sb = Sandbox::start(base, "imattr.bench", &["n"], api_faults(), |c| {
        bench_tweak(c);
        c.amqp.prefetch = HOT_PREFETCH;
    })
    .await?;
    let Drain {
        secs,
        stats,
        correct,
    } = timed_drain(sb, s.hot_updates, s.hot_accounts).await?;
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

/// Peak RSS (VmHWM) of a process, in MiB.
fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

async fn memory(base: &Config, s: &Sizes) -> anyhow::Result<Vec<Figure>> {
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
        let exe = std::env::current_exe().context("finding the imattr executable")?;
        let mut cmd = tokio::process::Command::new(exe);
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("IMATTR_")) {
            cmd.env_remove(k);
        }
        cmd.envs(env_vars(&sb.config))
            .env("IMATTR_LOG__LEVEL", "warn")
            .arg("run")
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true);
        let mut child = cmd.spawn().context("starting imattr run")?;
        let pid = child.id().context("no pid")?;
        let queue = sb.config.amqp.queue.clone();
        let started = Instant::now();
        loop {
            let written = sb.sim.stats().accounts_written;
            if sb.depth(&queue).await? == 0 && written > 0 {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if sb.depth(&queue).await? == 0 {
                    break;
                }
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(900),
                "memory scenario did not drain"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let peak = peak_rss_mib(pid).unwrap_or(f64::NAN);
        let secs = started.elapsed().as_secs_f64();
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
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
    let growth = peaks[1] / peaks[0];
    out.push(target(
        fig(name, "peak RSS large / small", growth, "ratio"),
        "<= 1.25 (bounded)",
        growth <= 1.25,
    ));
    Ok(out)
}

async fn latency(base: &Config, s: &Sizes) -> anyhow::Result<Vec<Figure>> {
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
