//! Scenario 8: the `imattr dlq` commands on a large dead-letter queue, each
//! in its own process: time, memory, and the broker's unacked count.

use std::time::{Duration, Instant};

use anyhow::Context;

use crate::config::Config;
use crate::sandbox::{env_vars, rabbitmqctl_unacked, Sandbox};
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
            crate::publish::Publisher::new(&conn, &config.amqp.dead_letter_exchange).await?;
        let queue = config.amqp.queue.clone();
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
                    base.clone().with_headers(h)
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
                p.publish(&account, &body, props).await?;
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
    max_unacked: Option<u64>,
    stdout: String,
}

/// Runs the built binary with `args` against the sandbox's queues, sampling
/// its peak RSS (VmHWM) and the broker's unacked count while it runs.
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
    let queue = config.amqp.dead_letter_queue.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut max: Option<u64> = None;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(u) = rabbitmqctl_unacked(&queue).await {
                    max = Some(max.unwrap_or(0).max(u));
                }
                // Each call costs the broker host most of a CPU second.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            max
        })
    };
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
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    anyhow::ensure!(
        out.status.success(),
        "imattr {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(ToolRun {
        secs,
        peak_rss_mib: rss.await.unwrap_or(f64::NAN),
        max_unacked: sampler.await.ok().flatten(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
    })
}

/// Scenario 8: `dlq stats`, `list --limit 20`, `export` and `replay --dry-run`
/// on a queue of `n` dead letters, each as its own process.
pub(super) async fn run(base: &Config, n: usize) -> anyhow::Result<Vec<Figure>> {
    let name = "8 dead letters";
    let sb = Sandbox::start(base, "imattr.bench", &["n"], Faults::default(), bench_tweak).await?;
    let c = sb.config.clone();
    let started = Instant::now();
    fill_dead_letters(&c, n, 4).await?;
    let fill_rate = n as f64 / started.elapsed().as_secs_f64();
    let dlq = c.amqp.dead_letter_queue.clone();
    anyhow::ensure!(sb.depth(&dlq).await? as usize == n, "the fill did not land");
    let export =
        std::env::temp_dir().join(format!("imattr-bench-{}.ndjson", crate::sandbox::suffix()));
    let export_arg = export.to_string_lossy().into_owned();
    let mut out = vec![fig(
        name,
        &format!("fill {n} dead letters (4 channels)"),
        fill_rate,
        "msgs/s",
    )];
    let runs: [(&str, Vec<&str>); 4] = [
        ("stats", vec!["dlq", "stats", "--json"]),
        ("list --limit 20", vec!["dlq", "list", "--limit", "20"]),
        ("export", vec!["dlq", "export", "--out", &export_arg]),
        ("replay --dry-run", vec!["dlq", "replay", "--dry-run"]),
    ];
    let mut result = Ok(());
    for (label, args) in runs {
        let r = match run_tool(&c, &args).await {
            Ok(r) => r,
            Err(e) => {
                result = Err(e);
                break;
            }
        };
        let ok = match label {
            "stats" => {
                serde_json::from_str::<serde_json::Value>(&r.stdout)
                    .ok()
                    .and_then(|v| v["total"].as_u64())
                    == Some(n as u64)
            }
            "list --limit 20" => r.stdout.lines().count() == 21,
            "export" => std::fs::File::open(&export)
                .map(|f| std::io::BufRead::lines(std::io::BufReader::new(f)).count() == n)
                .unwrap_or(false),
            _ => r.stdout.trim() == format!("would replay {n}"),
        };
        let left = sb.depth(&dlq).await? as usize;
        let rate = n as f64 / r.secs;
        out.push(match label {
            "list --limit 20" => target(
                fig(name, "list --limit 20: time", r.secs, "s"),
                "< 2 s",
                r.secs < 2.0,
            ),
            "stats" => target(
                fig(name, "stats: time", r.secs, "s"),
                "< 60 s",
                r.secs < 60.0,
            ),
            "export" => target(
                fig(name, "export: rate", rate, "msgs/s"),
                ">= 20,000",
                rate >= 20_000.0,
            ),
            _ => fig(name, &format!("{label}: rate"), rate, "msgs/s"),
        });
        if label != "list --limit 20" && label != "stats" {
            out.push(fig(name, &format!("{label}: time"), r.secs, "s"));
        }
        out.push(target(
            fig(name, &format!("{label}: peak RSS"), r.peak_rss_mib, "MiB"),
            "<= 64 MiB",
            r.peak_rss_mib <= 64.0,
        ));
        if let Some(u) = r.max_unacked {
            out.push(target(
                fig(
                    name,
                    &format!("{label}: max unacked (rabbitmqctl)"),
                    u as f64,
                    "messages",
                ),
                "<= 10,000",
                u <= 10_000,
            ));
        }
        let intact = ok && left == n;
        out.push(target(
            fig(
                name,
                &format!("{label}: output right, queue intact"),
                f64::from(u8::from(intact)),
                "bool",
            ),
            "1",
            intact,
        ));
    }
    let _ = std::fs::remove_file(&export);
    sb.cleanup().await?;
    result.map(|_| out)
}
