//! The console's counts on a large dead-letter store: fills one, starts
//! `imattr console` on it (which summarises the store in the background), and
//! times the grouped view, the matching count and a delete confirmation:
//! the first (waiting for the summary), warm, after more dead letters came,
//! and with a text filter (which reads the whole store). Checks the numbers
//! against a full read (`Dlq::stats`), prints the console's RSS, and deletes
//! what it declared.
//!
//! ```text
//! cargo build --release && cargo build --release --example console_bench
//! target/release/examples/console_bench 1000000 target/release/imattr
//! ```
//! The broker is `IMATTR_TEST_AMQP_URL` or guest@127.0.0.1:5672.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use imattr::amqp::deadletter::{dead_letter_properties, Failure, Reason};
use imattr::config::{AmqpUrl, Config};
use imattr::dlq::{Dlq, Filter};
use imattr::publish::{update_properties, Publisher};
use imattr::sandbox::{env_vars, Sandbox};
use imattr::simulator::Faults;
use lapin::options::QueueDeleteOptions;

/// `n` dead letters from `from` on, on 4 pipelined confirm channels: 60%
/// rejected, 20% retries exhausted, 20% invalid, three error texts each.
async fn fill(c: &Config, from: usize, n: usize) -> anyhow::Result<()> {
    let conn = imattr::amqp::topology::connect(&c.amqp, "console bench fill").await?;
    let mut tasks = Vec::new();
    for ch in 0..4 {
        let mut p = Publisher::new(&conn, "").await?;
        let queue = c.amqp.queue.clone();
        let dlq = c.amqp.dead_letter_queue.clone();
        tasks.push(tokio::spawn(async move {
            let base = update_properties();
            for i in (from + ch..from + n).step_by(4) {
                let account = format!("acc{}", i % 50_000);
                let (reason, code) = match i % 10 {
                    0..=5 => (Reason::Rejected, 90033),
                    6 | 7 => (Reason::RetriesExhausted, 91000),
                    _ => (Reason::InvalidMessage, 0),
                };
                let error = [
                    "Invalid attribute value",
                    "Internal server error",
                    "Attrs.age is not an attribute of the app",
                ][i % 3];
                let f = Failure {
                    reason,
                    code,
                    error: error.into(),
                    account: Some(account.clone()),
                    attempts: 3,
                };
                let props = dead_letter_properties(&base, &f, &[], &queue, &account, i as i64);
                let body = format!(r#"{{"To_Account":"{account}","Attrs":{{"n":"{i}"}}}}"#);
                p.publish(&dlq, body.as_bytes(), props).await?;
            }
            p.finish().await
        }));
    }
    for t in tasks {
        t.await.context("a filling task")??;
    }
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}

/// The text of the element with `id` in `html` (its first text node).
fn element(html: &str, id: &str) -> Option<String> {
    let at = html.find(&format!("id=\"{id}\""))?;
    let rest = &html[at..];
    let start = rest.find('>')? + 1;
    let end = rest[start..].find('<')?;
    Some(rest[start..start + end].to_string())
}

fn rss(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .filter(|l| l.starts_with("VmRSS:") || l.starts_with("VmHWM:"))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join(", ")
}

async fn timed_get(http: &reqwest::Client, url: &str) -> anyhow::Result<(f64, String)> {
    let t = Instant::now();
    let r = http.get(url).send().await?;
    if !r.status().is_success() {
        bail!("{url}: {}", r.status());
    }
    let text = r.text().await?;
    Ok((t.elapsed().as_secs_f64(), text))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let exe = args
        .next()
        .unwrap_or_else(|| "target/release/imattr".into());
    let mut base = Config::default();
    if let Ok(url) = std::env::var("IMATTR_TEST_AMQP_URL") {
        base.amqp.url = AmqpUrl::new(url);
    }
    let sb = Sandbox::start(&base, "imattr.bench", &["n"], Faults::default(), |_| {}).await?;
    let c = sb.config.clone();
    println!("store {}", c.amqp.dead_letter_queue);
    let result = run(&c, n, &exe).await;
    // Cleanup whatever happened.
    let conn = imattr::amqp::topology::connect(&c.amqp, "console bench cleanup").await?;
    let ch = conn.create_channel().await?;
    for suffix in ["ledger", "inbox"] {
        let q = format!("{}.{suffix}", c.amqp.dead_letter_queue);
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = conn.close(200, "done".into()).await;
    sb.cleanup().await?;
    result
}

async fn run(c: &Config, n: usize, exe: &str) -> anyhow::Result<()> {
    let t = Instant::now();
    fill(c, 0, n).await?;
    let secs = t.elapsed().as_secs_f64();
    println!("fill {n}: {secs:.1} s ({:.0} msgs/s)", n as f64 / secs);

    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let base = format!("http://127.0.0.1:{port}");
    let log = std::env::temp_dir().join(format!("console-bench-{port}.log"));
    let started = Instant::now();
    let mut child = tokio::process::Command::new(exe)
        .args(["console", "--listen", &format!("127.0.0.1:{port}")])
        .envs(env_vars(c))
        .env("IMATTR_LOG__LEVEL", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .kill_on_drop(true)
        .spawn()
        .context("starting imattr console")?;
    let pid = child.id().unwrap_or(0);
    let http = reqwest::Client::new();
    let css = format!("{base}/console/assets/console.css");
    while http.get(&css).send().await.is_err() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "console listening after {:.2} s",
        started.elapsed().as_secs_f64()
    );
    let groups = format!("{base}/console/dead-letters/groups");
    let (s, html) = timed_get(&http, &groups).await?;
    println!(
        "grouped view, first (waits for the summary begun at start): {s:.2} s ({:.2} s after start), total {:?}",
        started.elapsed().as_secs_f64(),
        element(&html, "group-total")
    );
    let logs = std::fs::read_to_string(&log).unwrap_or_default();
    for l in logs.lines().filter(|l| l.contains("summarise")) {
        println!("  log: {l}");
    }
    for i in 0..3 {
        let (s, html) = timed_get(&http, &groups).await?;
        println!(
            "grouped view, warm #{}: {s:.3} s, total {:?}",
            i + 1,
            element(&html, "group-total")
        );
    }
    let (s, body) = timed_get(
        &http,
        &format!("{base}/console/api/dead-letters/stats?reason=rejected"),
    )
    .await?;
    println!("matching count (reason=rejected), warm: {s:.3} s: {body}");

    // A delete confirmation of everything matching, as a browser posts it.
    let (_, home) = timed_get(&http, &format!("{base}/console/")).await?;
    let token = home
        .split("name=\"csrf-token\" content=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .context("the CSRF token")?
        .to_string();
    let confirm = |reason: &'static str| {
        let http = http.clone();
        let base = base.clone();
        let token = token.clone();
        async move {
            let t = Instant::now();
            let r = http
                .post(format!("{base}/console/dead-letters/delete"))
                .header("origin", &base)
                .header("sec-fetch-site", "same-origin")
                .header("content-type", "application/x-www-form-urlencoded")
                .body(format!("csrf={token}&scope=matching&reason={reason}"))
                .send()
                .await?;
            let text = r.text().await?;
            anyhow::Ok((t.elapsed().as_secs_f64(), element(&text, "confirm-count")))
        }
    };
    let (s, count) = confirm("rejected").await?;
    println!("delete confirmation (reason=rejected), warm: {s:.3} s, names {count:?}");

    let more = 10_000.min(n);
    fill(c, n, more).await?;
    let (s, html) = timed_get(&http, &groups).await?;
    println!(
        "grouped view after {more} more came: {s:.3} s, total {:?}",
        element(&html, "group-total")
    );
    let (s, html) = timed_get(&http, &groups).await?;
    println!(
        "grouped view, warm again: {s:.3} s, total {:?}",
        element(&html, "group-total")
    );
    let (s, count) = confirm("invalid-message").await?;
    println!("delete confirmation (reason=invalid-message): {s:.3} s, names {count:?}");
    let (s, html) = timed_get(&http, &format!("{groups}?q=Internal")).await?;
    println!(
        "grouped view with a text filter (a full read): {s:.2} s, total {:?}",
        element(&html, "group-total")
    );
    println!("console RSS: {}", rss(pid));

    // The same numbers as a full read.
    let q = Dlq::open(c).await?;
    let t = Instant::now();
    let all = q.stats(&Filter::default()).await?;
    println!(
        "full read in process (Dlq::stats): {:.2} s, total {}",
        t.elapsed().as_secs_f64(),
        all.total
    );
    let rejected = q
        .stats(&Filter {
            reason: Some("rejected".into()),
            ..Filter::default()
        })
        .await?;
    q.close().await;
    let (_, html) = timed_get(&http, &groups).await?;
    let shown = element(&html, "group-total");
    println!(
        "same total as a full read: {} ({shown:?} / {}); rejected {}",
        shown.as_deref() == Some(all.total.to_string().as_str()),
        all.total,
        rejected.total
    );
    let _ = child.kill().await;
    let _ = std::fs::remove_file(&log);
    Ok(())
}
