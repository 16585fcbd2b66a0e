//! Reading a stream: the native stream protocol reader against an AMQP 0-9-1
//! consumer with `x-stream-offset`. Each step is its own process, so that its
//! peak RSS (VmHWM) is its own:
//!
//! ```text
//! cargo build --release --example stream_bench
//! B=target/release/examples/stream_bench
//! $B publish bench.stream 1000000      # ~300-byte bodies, 8 headers, confirms in windows
//! $B native bench.stream               # the stream reader, all entries
//! $B lapin bench.stream 1000000 1000   # basic.consume, prefetch 1000, until that many
//! $B lapin bench.stream 1000000 10000
//! $B delete bench.stream
//! ```
//! The broker is `IMATTR_TEST_AMQP_URL` or guest@127.0.0.1:5672, its stream port 5552.

use std::ops::ControlFlow;
use std::time::Instant;

use anyhow::{bail, Context};
use futures_util::StreamExt;
use imattr::amqp::stream::StreamReader;
use imattr::config::{AmqpConfig, AmqpUrl};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};

fn url() -> String {
    std::env::var("IMATTR_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        })
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

async fn connect() -> anyhow::Result<Connection> {
    Connection::connect(&url(), ConnectionProperties::default())
        .await
        .context("connect")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).cloned().unwrap_or_default();
    let name = arg(1);
    match arg(0).as_str() {
        "publish" => publish(&name, arg(2).parse()?).await,
        "native" => native(&name).await,
        "lapin" => consume(&name, arg(2).parse()?, arg(3).parse()?).await,
        "delete" => {
            let conn = connect().await?;
            let ch = conn.create_channel().await?;
            ch.queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                .await?;
            Ok(())
        }
        _ => bail!("usage: stream_bench publish|native|lapin|delete NAME [N] [PREFETCH]"),
    }
}

async fn publish(name: &str, n: u64) -> anyhow::Result<()> {
    let conn = connect().await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("stream".into()),
    );
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await?;
    let start = Instant::now();
    let mut window = Vec::new();
    for i in 0..n {
        let mut h = FieldTable::default();
        for (k, v) in [
            ("x-imattr-reason", "api-error"),
            ("x-imattr-account", "user-000123456"),
            ("x-imattr-error", "70107 account does not exist"),
            ("x-imattr-queue", "imattr.updates"),
            ("x-imattr-worker", "worker-1"),
        ] {
            h.insert(k.into(), AMQPValue::LongString(v.into()));
        }
        h.insert("x-imattr-attempts".into(), AMQPValue::LongInt(3));
        h.insert(
            "x-imattr-first-ms".into(),
            AMQPValue::LongLongInt(1_700_000_000_000 + i as i64),
        );
        h.insert("x-imattr-retriable".into(), AMQPValue::Boolean(false));
        let body = format!(
            "{{\"account\":\"user-{i:09}\",\"attrs\":{{\"level\":\"{i}\",\"nickname\":\"{}\"}},\"seq\":{i}}}",
            "n".repeat(200)
        );
        let props = BasicProperties::default()
            .with_headers(h)
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_timestamp(1_700_000_000);
        window.push(
            ch.basic_publish(
                "".into(),
                name.into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                props,
            )
            .await?,
        );
        if window.len() == 5000 || i + 1 == n {
            for c in window.drain(..) {
                c.await?;
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!("published {n} in {secs:.1} s ({:.0}/s)", n as f64 / secs);
    Ok(())
}

async fn native(name: &str) -> anyhow::Result<()> {
    let cfg = AmqpConfig {
        url: AmqpUrl::new(url()),
        ..AmqpConfig::default()
    };
    let mut reader = StreamReader::connect(&cfg, "stream_bench").await?;
    let last = reader.last_offset(name).await?.context("empty stream")?;
    let start = Instant::now();
    let mut bytes = 0u64;
    // Chunks, approximately: a change of chunk timestamp starts a new one.
    let (mut chunks, mut chunk_ts) = (0u64, i64::MIN);
    let seen = reader
        .read(name, 0, last, |m| {
            bytes += m.body.len() as u64;
            if m.chunk_timestamp_ms != chunk_ts {
                chunks += 1;
                chunk_ts = m.chunk_timestamp_ms;
            }
            ControlFlow::Continue(())
        })
        .await?;
    let secs = start.elapsed().as_secs_f64();
    reader.close().await;
    println!(
        "native: {seen} entries ({} MiB of bodies, about {chunks} chunks) in {secs:.2} s: {:.0} msgs/s, peak RSS {:.1} MiB",
        bytes >> 20,
        seen as f64 / secs,
        peak_rss_mib()
    );
    Ok(())
}

async fn consume(name: &str, n: u64, prefetch: u16) -> anyhow::Result<()> {
    let conn = connect().await?;
    let ch = conn.create_channel().await?;
    ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-stream-offset".into(),
        AMQPValue::LongString("first".into()),
    );
    let mut consumer = ch
        .basic_consume(
            name.into(),
            "stream_bench".into(),
            BasicConsumeOptions::default(),
            args,
        )
        .await?;
    let start = Instant::now();
    let ack_every = u64::from((prefetch / 4).max(1));
    let mut seen = 0u64;
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery?;
        seen += 1;
        if seen.is_multiple_of(ack_every) || seen == n {
            delivery
                .acker
                .ack(BasicAckOptions { multiple: true })
                .await?;
        }
        if seen == n {
            break;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "lapin prefetch {prefetch}: {seen} in {secs:.2} s: {:.0} msgs/s, peak RSS {:.1} MiB",
        seen as f64 / secs,
        peak_rss_mib()
    );
    Ok(())
}
