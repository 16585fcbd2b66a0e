//! Scenario 9: the worker's peak memory when a backlog of large bodies
//! (8 MiB each, over the 1 MiB rule, so dead-lettered) and normal updates
//! waits in the queue at start, on a classic and on a quorum queue, in its
//! own process (`amqp.max_held_bytes`, docs/operations.md "Memory").

use std::time::{Duration, Instant};

use crate::config::{Config, QueueType};
use crate::sandbox::Sandbox;
use crate::simulator::Faults;

use super::harness::{bench_tweak, body, expected_state};
use super::process::{peak_rss_mib, WorkerProcess};
use super::report::{fig, state_figure, target, Figure};
use super::Sizes;

/// Each large body's size.
const LARGE_BYTES: usize = 8 << 20;
/// The peak memory the default budget must keep the worker under.
const TARGET_MIB: f64 = 256.0;

fn large_body(i: usize) -> Vec<u8> {
    let mut b = format!("{{\"To_Account\":\"big{i}\",\"pad\":\"").into_bytes();
    b.resize(LARGE_BYTES - 2, b'x');
    b.extend_from_slice(b"\"}");
    b
}

pub(super) async fn run(base: &Config, s: &Sizes) -> anyhow::Result<Vec<Figure>> {
    let name = "9 large bodies";
    let (large, normal) = (s.large_bodies, s.large_bodies_normal);
    let mut out = Vec::new();
    for queue_type in [QueueType::Classic, QueueType::Quorum] {
        let sb = Sandbox::start(base, "imattr.bench", &["n"], Faults::default(), |c| {
            bench_tweak(c);
            c.amqp.queue_type = queue_type;
        })
        .await?;
        for i in 0..large.max(normal) {
            if i < large {
                sb.publish(large_body(i)).await?;
            }
            if i < normal {
                sb.publish(body(i, normal).1).await?;
            }
        }
        sb.confirm().await?;
        let started = Instant::now();
        let worker = WorkerProcess::start(&sb.config).await?;
        let expected = expected_state(normal, normal);
        let dlq = sb.config.amqp.dead_letter_queue.clone();
        while !(sb.state() == expected && sb.depth(&dlq).await? as usize == large) {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(600),
                "large-bodies scenario did not drain"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let secs = started.elapsed().as_secs_f64();
        let peak = peak_rss_mib(worker.pid).unwrap_or(f64::NAN);
        worker.stop().await;
        let correct = sb.state() == expected;
        sb.cleanup().await?;
        out.push(target(
            fig(
                name,
                &format!("peak RSS, {large} x 8 MiB + {normal} updates, {queue_type}"),
                peak,
                "MiB",
            ),
            &format!("< {TARGET_MIB} MiB"),
            peak < TARGET_MIB,
        ));
        out.push(fig(
            name,
            &format!("time to apply and dead-letter all, {queue_type}"),
            secs,
            "s",
        ));
        out.push(state_figure(name, correct));
    }
    Ok(out)
}
