//! Scenario 8: the `imattr dlq` commands on a large dead-letter stream, each
//! in its own process, several rounds: time, rate and peak memory, with the
//! spread over rounds.

use std::time::{Duration, Instant};

use anyhow::Context;

use crate::config::Config;
use crate::sandbox::{env_vars, Sandbox};
use crate::simulator::Faults;

use super::harness::{bench_tweak, body};
use super::process::peak_rss_mib;
use super::report::{fig, target, Figure};

/// Dead letters of every kind, `n` of them, into the sandbox's dead-letter
/// exchange on `channels` pipelined confirm channels: 60% rejected (90033),
/// 20% retries exhausted, 10% invalid, 10% expired by RabbitMQ itself.
pub(crate) async fn fill_dead_letters(
    config: &Config,
    n: usize,
    channels: usize,
) -> anyhow::Result<()> {
    use crate::amqp::deadletter::{dead_letter_properties, Failure, Reason};
    use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString};
    let conn = crate::amqp::nodes::connect_first(&config.amqp, "imattr bench dead letters").await?;
    let channels = channels.max(1);
    let mut tasks = Vec::new();
    for c in 0..channels {
        let mut p =
            // Into the stream by name, as the worker publishes its dead letters.
            crate::publish::Publisher::new(&conn, "").await?;
        let queue = config.amqp.queue.clone();
        let dlq = config.amqp.dead_letter_queue.clone();
        tasks.push(tokio::spawn(async move {
            let base = crate::publish::update_properties();
            let ls = |s: &str| AMQPValue::LongString(LongString::from(s));
            let now_ms = crate::amqp::deadletter::now_ms();
            for i in (c..n).step_by(channels) {
                let (account, body) = body(i, 50_000);
                let kind = i % 10;
                let props = if kind == 9 {
                    let mut death = FieldTable::default();
                    death.insert("count".into(), AMQPValue::LongLongInt(1));
                    death.insert("reason".into(), ls("expired"));
                    death.insert("queue".into(), ls(&queue));
                    death.insert("time".into(), AMQPValue::Timestamp((now_ms / 1000) as u64));
                    death.insert("exchange".into(), ls(&queue));
                    death.insert(
                        "routing-keys".into(),
                        AMQPValue::FieldArray(FieldArray::from(vec![ls(&account)])),
                    );
                    let mut h = FieldTable::default();
                    h.insert(
                        "x-death".into(),
                        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
                    );
                    h.insert("x-first-death-reason".into(), ls("expired"));
                    h.insert("x-first-death-queue".into(), ls(&queue));
                    h.insert("x-first-death-exchange".into(), ls(&queue));
                    // As `dlq migrate` stores them: a stream drops arrays.
                    base.clone()
                        .with_headers(crate::amqp::headerblob::for_stream(&h))
                } else {
                    let (reason, code, error) = match kind {
                        0..=5 => (Reason::Rejected, 90033, "Invalid attribute value"),
                        6 | 7 => (Reason::RetriesExhausted, 91000, "Internal server error"),
                        _ => (
                            Reason::InvalidMessage,
                            0,
                            "Attrs.age is not an attribute of the app",
                        ),
                    };
                    let f = Failure {
                        reason,
                        code,
                        error: error.into(),
                        account: Some(account.clone()),
                        attempts: 3,
                    };
                    dead_letter_properties(
                        &base,
                        &f,
                        &[],
                        &queue,
                        &account,
                        now_ms - (n - i) as i64,
                    )
                };
                p.publish(&dlq, &body, props).await?;
            }
            p.finish().await
        }));
    }
    for t in tasks {
        t.await.context("a filling task failed")??;
    }
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}
/// What running one `imattr dlq …` command measured.
struct ToolRun {
    secs: f64,
    peak_rss_mib: f64,
    stdout: String,
}

/// Runs the built binary with `args` against the sandbox's queues, sampling
/// its peak RSS (VmHWM) while it runs.
async fn run_tool(config: &Config, args: &[&str]) -> anyhow::Result<ToolRun> {
    let exe = std::env::current_exe().context("finding the imattr executable")?;
    let mut cmd = tokio::process::Command::new(exe);
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("IMATTR_")) {
        cmd.env_remove(k);
    }
    cmd.envs(env_vars(config))
        .env("IMATTR_LOG__LEVEL", "warn")
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let started = Instant::now();
    let child = cmd.spawn().context("starting imattr dlq")?;
    let pid = child.id().context("no pid")?;
    let rss = tokio::spawn(async move {
        let mut peak = f64::NAN;
        while let Some(p) = peak_rss_mib(pid) {
            peak = if peak.is_nan() { p } else { peak.max(p) };
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        peak
    });
    let out = child
        .wait_with_output()
        .await
        .context("running imattr dlq")?;
    let secs = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        out.status.success(),
        "imattr {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(ToolRun {
        secs,
        peak_rss_mib: rss.await.unwrap_or(f64::NAN),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
    })
}

/// Rounds of each command: the spread says how far one figure can be trusted.
const ROUNDS: usize = 3;

/// How many dead letters `replay` moves per round.
const REPLAY_N: usize = 10_000;

/// One command of the scenario.
struct Run {
    label: &'static str,
    args: Vec<String>,
    /// Messages it reads, for a rate (export).
    rate_of: Option<usize>,
    /// Its target: (text, seconds at most) or (text, msgs/s at least).
    secs_at_most: Option<f64>,
    rate_at_least: Option<f64>,
    /// Whether its output is right.
    check: fn(&ToolRun, usize, &std::path::Path) -> bool,
}

/// (min, median, max) of `v`; NaN for none.
pub(crate) fn spread(v: &[f64]) -> (f64, f64, f64) {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

/// Scenario 8: `dlq stats`, `export`, the first and a later page of `list`
/// and a `replay` of [`REPLAY_N`] matching, on a stream of `n` dead letters,
/// each as its own process, [`ROUNDS`] times.
pub(super) async fn run(base: &Config, n: usize) -> anyhow::Result<Vec<Figure>> {
    let name = "8 dead letters";
    let sb = Sandbox::start(base, "imattr.bench", &["n"], Faults::default(), bench_tweak).await?;
    let c = sb.config.clone();
    let started = Instant::now();
    fill_dead_letters(&c, n, 4).await?;
    let fill_rate = n as f64 / started.elapsed().as_secs_f64();
    let export =
        std::env::temp_dir().join(format!("imattr-bench-{}.ndjson", crate::sandbox::suffix()));
    let mut out = vec![fig(
        name,
        &format!("fill {n} dead letters (4 confirm channels into the exchange)"),
        fill_rate,
        "msgs/s",
    )];
    // A stream's offsets start at 0: the dead letter in the middle.
    let middle = (n / 2).to_string();
    let replay_n = REPLAY_N.min(n / 10).max(1);
    let runs = [
        Run {
            label: "stats",
            args: vec!["dlq".into(), "stats".into(), "--json".into()],
            rate_of: None,
            secs_at_most: Some(10.0),
            rate_at_least: None,
            check: |r, n, _| {
                serde_json::from_str::<serde_json::Value>(&r.stdout)
                    .ok()
                    .and_then(|v| v["total"].as_u64())
                    .is_some_and(|t| t as usize <= n && t as usize + ROUNDS * REPLAY_N >= n)
            },
        },
        Run {
            label: "export",
            args: vec![
                "dlq".into(),
                "export".into(),
                "--out".into(),
                export.to_string_lossy().into_owned(),
            ],
            rate_of: Some(n),
            secs_at_most: None,
            rate_at_least: Some(50_000.0),
            check: |_, n, path| {
                std::fs::File::open(path)
                    .map(|f| {
                        let lines = std::io::BufRead::lines(std::io::BufReader::new(f)).count();
                        lines <= n && lines + ROUNDS * REPLAY_N >= n
                    })
                    .unwrap_or(false)
            },
        },
        Run {
            label: "list, first page",
            args: vec![
                "dlq".into(),
                "list".into(),
                "--limit".into(),
                "20".into(),
                "--json".into(),
            ],
            rate_of: None,
            secs_at_most: Some(1.0),
            rate_at_least: None,
            check: |r, _, _| r.stdout.lines().count() == 20,
        },
        Run {
            label: "list, a later page (--after)",
            args: vec![
                "dlq".into(),
                "list".into(),
                "--limit".into(),
                "20".into(),
                "--json".into(),
                "--after".into(),
                middle,
            ],
            rate_of: None,
            secs_at_most: Some(1.0),
            rate_at_least: None,
            check: |r, _, _| r.stdout.lines().count() == 20,
        },
        Run {
            // 60% are rejected: the first REPLAY_N of those not replayed yet.
            label: "replay 10,000 matching",
            args: vec![
                "dlq".into(),
                "replay".into(),
                "--reason".into(),
                "rejected".into(),
                "--limit".into(),
                replay_n.to_string(),
            ],
            rate_of: None,
            secs_at_most: Some(10.0),
            rate_at_least: None,
            // The final line: `moved M, left L, failed 0`, with M > 0.
            check: |r, _, _| {
                r.stdout.lines().any(|l| {
                    l.starts_with("moved ") && !l.starts_with("moved 0,") && l.ends_with("failed 0")
                })
            },
        },
    ];
    let mut result = Ok(());
    'runs: for run in &runs {
        let (mut secs, mut rss, mut right) = (Vec::new(), Vec::new(), true);
        for _ in 0..ROUNDS {
            let args: Vec<&str> = run.args.iter().map(String::as_str).collect();
            let r = match run_tool(&c, &args).await {
                Ok(r) => r,
                Err(e) => {
                    result = Err(e);
                    break 'runs;
                }
            };
            right &= (run.check)(&r, n, &export);
            secs.push(r.secs);
            rss.push(r.peak_rss_mib);
        }
        let (lo, mid, hi) = spread(&secs);
        let label = run.label;
        out.push(match (run.rate_of, run.secs_at_most, run.rate_at_least) {
            (Some(k), _, Some(at_least)) => {
                let rate = k as f64 / mid;
                target(
                    fig(
                        name,
                        &format!("{label}: rate (median of {ROUNDS})"),
                        rate,
                        "msgs/s",
                    ),
                    &format!(">= {at_least:.0}"),
                    rate >= at_least,
                )
            }
            (_, Some(at_most), _) => target(
                fig(
                    name,
                    &format!("{label}: time (median of {ROUNDS})"),
                    mid,
                    "s",
                ),
                &format!("<= {at_most} s"),
                mid <= at_most,
            ),
            _ => fig(
                name,
                &format!("{label}: time (median of {ROUNDS})"),
                mid,
                "s",
            ),
        });
        out.push(fig(name, &format!("{label}: time, fastest round"), lo, "s"));
        out.push(fig(name, &format!("{label}: time, slowest round"), hi, "s"));
        let (_, _, peak) = spread(&rss);
        out.push(target(
            fig(
                name,
                &format!("{label}: peak RSS (highest round)"),
                peak,
                "MiB",
            ),
            "<= 64 MiB",
            peak <= 64.0,
        ));
        out.push(target(
            fig(
                name,
                &format!("{label}: output right"),
                f64::from(u8::from(right)),
                "bool",
            ),
            "1",
            right,
        ));
    }
    let _ = std::fs::remove_file(&export);
    sb.cleanup().await?;
    result.map(|_| out)
}

#[cfg(test)]
mod tests {
    use super::spread;

    #[test]
    fn spread_is_min_median_max_without_nan() {
        assert_eq!(spread(&[3.0, f64::NAN, 1.0, 2.0]), (1.0, 2.0, 3.0));
        assert!(spread(&[]).1.is_nan());
    }
}
