//! A throwaway deployment on the local broker: the simulator, uniquely named
//! exchanges and queues, and the worker in-process. The demo, the benchmarks
//! and the integration tests all stand on it.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Channel, Connection};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::amqp::topology;
use crate::config::{Config, QueueType, Secret};
use crate::dlq::{DeadLetterView, Dlq};
use crate::health::Health;
use crate::publish::{update_properties, Publisher};
use crate::simulator::{Faults, SimHandle, SimOptions, Simulator, Store};

/// A sandbox.
pub struct Sandbox {
    /// The simulator.
    pub sim: SimHandle,
    /// The worker's configuration.
    pub config: Config,
    /// The worker's health (readiness, unsettled deliveries).
    pub health: Arc<Health>,
    cancel: CancellationToken,
    worker: Option<JoinHandle<anyhow::Result<()>>>,
    conn: Connection,
    channel: Channel,
    publisher: Mutex<Publisher>,
    /// Deliveries acked by in-process workers before the current one.
    acked_before: u64,
    cleaned: bool,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("queue", &self.config.amqp.queue)
            .finish()
    }
}

/// The `IMATTR_*` environment variables that configure an `imattr` process
/// exactly like `config`, secrets included (see `Config::to_env`).
pub fn env_vars(config: &Config) -> Vec<(String, String)> {
    config.to_env()
}

/// A random suffix for names.
pub(crate) fn suffix() -> String {
    format!("{:08x}", rand::random::<u32>())
}

impl Sandbox {
    /// Starts the simulator and declares `{prefix}.{random}.updates|dead`;
    /// `tweak` adjusts the worker's configuration. The worker is not started.
    pub async fn start(
        base: &Config,
        prefix: &str,
        attr_names: &[&str],
        faults: Faults,
        tweak: impl FnOnce(&mut Config),
    ) -> anyhow::Result<Sandbox> {
        let sim = Simulator::start(SimOptions {
            attr_names: attr_names.iter().map(|s| s.to_string()).collect(),
            faults,
            seed: rand::random(),
            ..SimOptions::default()
        })
        .await
        .context("starting the simulator")?;
        let mut config = base.clone();
        let id = suffix();
        config.amqp.exchange = format!("{prefix}.{id}.updates");
        config.amqp.queue = format!("{prefix}.{id}.updates");
        config.amqp.dead_letter_exchange = format!("{prefix}.{id}.dead");
        config.amqp.dead_letter_queue = format!("{prefix}.{id}.dead");
        config.tencent.base_url = sim.url();
        config.tencent.sdkappid = sim.sdkappid();
        config.tencent.secret_key = Secret::new(sim.secret_key());
        config.tencent.usersig = Secret::default();
        config.admin.listen = String::new();
        tweak(&mut config);
        config.validate()?;
        let conn = crate::amqp::nodes::connect_first(&config.amqp, "imattr sandbox").await?;
        let channel = conn.create_channel().await.context("opening a channel")?;
        topology::declare(&conn, &channel, &config.amqp).await?;
        let publisher = Publisher::new(&conn, &config.amqp.exchange).await?;
        Ok(Sandbox {
            sim,
            config,
            health: Arc::new(Health::default()),
            cancel: CancellationToken::new(),
            worker: None,
            conn,
            channel,
            publisher: Mutex::new(publisher),
            acked_before: 0,
            cleaned: false,
        })
    }

    /// Starts the worker in-process.
    pub fn start_worker(&mut self) {
        self.cancel = CancellationToken::new();
        self.acked_before += self.health.acked();
        self.health = Arc::new(Health::default());
        self.worker = Some(tokio::spawn(crate::worker::run(
            self.config.clone(),
            self.cancel.clone(),
            self.health.clone(),
        )));
    }

    /// Stops the worker gracefully (as SIGTERM would) and returns its result.
    pub async fn stop_worker(&mut self) -> anyhow::Result<()> {
        self.cancel.cancel();
        match self.worker.take() {
            Some(h) => h.await.context("the worker task failed")?,
            None => Ok(()),
        }
    }

    /// Publishes one body (routing key: its account when it has one), confirmed later.
    pub async fn publish(&self, body: impl AsRef<[u8]>) -> anyhow::Result<()> {
        let body = body.as_ref();
        let rk = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| {
                v.get("To_Account")
                    .and_then(|a| a.as_str())
                    .map(str::to_string)
            })
            .unwrap_or_default();
        self.publisher
            .lock()
            .await
            .publish(&rk, body, update_properties())
            .await
    }

    /// Deliveries acked so far by this sandbox's in-process workers.
    pub fn acked(&self) -> u64 {
        self.acked_before + self.health.acked()
    }

    /// Waits for every publish so far to be confirmed.
    pub async fn confirm(&self) -> anyhow::Result<u64> {
        self.publisher.lock().await.finish().await
    }

    /// Ready (not delivered) messages in a queue; for the dead-letter
    /// stream, the dead letters it holds. A stream's count in a passive
    /// declare lags by seconds, so the stream is read instead.
    pub async fn depth(&self, queue: &str) -> anyhow::Result<u32> {
        if queue == self.config.amqp.dead_letter_queue {
            return Ok(u32::try_from(self.dead_letters().await?.len()).unwrap_or(u32::MAX));
        }
        let q = self
            .channel
            .queue_declare(
                queue.into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await
            .with_context(|| format!("inspecting queue {queue}"))?;
        Ok(q.message_count())
    }

    /// Waits until the updates queue is empty and the worker holds nothing
    /// unsettled (three looks in a row), and the broker itself says the
    /// queue holds nothing, ready or unacknowledged, or `timeout` passes.
    ///
    /// An empty queue and nothing unsettled is not enough: the broker may
    /// have handed messages to the worker's connection that its session has
    /// not taken yet. The count of what was published here is not enough
    /// either: messages a child process published (`imattr publish`, `dlq
    /// replay`) are not in it. Only where `rabbitmqctl` cannot answer (a
    /// demo run by a user without access to it) does the count of
    /// deliveries acked in-process stand in for the broker's word.
    pub async fn wait_drained(&self, timeout: Duration) -> anyhow::Result<()> {
        // Everything published here, confirmed (the publisher counts them).
        let published = self.confirm().await?;
        let deadline = tokio::time::Instant::now() + timeout;
        let queue = self.config.amqp.queue.clone();
        // rabbitmqctl lists a quorum queue's counts as its leader published
        // them at its last tick (every 5 s): only a look after a whole tick
        // of quiet speaks for the quiet.
        let settle = match self.config.amqp.queue_type {
            QueueType::Quorum => QUORUM_TICK + Duration::from_secs(1),
            QueueType::Classic => Duration::ZERO,
        };
        let mut quiet = 0;
        let mut quiet_since = tokio::time::Instant::now();
        loop {
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!(
                    "not drained after {timeout:?}: {} ready, {} unsettled, {} of {} acked in-process",
                    self.depth(&queue).await.unwrap_or(u32::MAX),
                    self.health.unsettled(),
                    self.acked(),
                    published,
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            let looks_drained = self.depth(&queue).await? == 0
                && self.health.unsettled() == 0
                && self.health.is_consuming();
            quiet = if looks_drained { quiet + 1 } else { 0 };
            if quiet == 1 {
                quiet_since = tokio::time::Instant::now();
            }
            if quiet < 3 || quiet_since.elapsed() < settle {
                continue;
            }
            let drained = match rabbitmqctl_counts(&queue).await {
                Some((ready, unacked)) => ready == 0 && unacked == 0,
                None => self.acked() >= published,
            };
            if drained {
                return Ok(());
            }
            quiet = 0;
        }
    }

    /// Whether a queue exists (a passive declare, on a channel of its own:
    /// the broker closes the channel that asks for a missing queue).
    pub async fn queue_exists(&self, queue: &str) -> anyhow::Result<bool> {
        let ch = self
            .conn
            .create_channel()
            .await
            .context("opening a channel")?;
        let passive = lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let found = ch
            .queue_declare(queue.into(), passive, lapin::types::FieldTable::default())
            .await;
        match found {
            Ok(_) => {
                let _ = ch.close(200, "done".into()).await;
                Ok(true)
            }
            Err(e) if matches!(e.kind(), lapin::ErrorKind::ProtocolError(p) if p.get_id() == 404) => {
                Ok(false)
            }
            Err(e) => Err(anyhow::Error::new(e).context(format!("looking for queue {queue}"))),
        }
    }

    /// Deletes a queue, for tests that need the topology without it (what
    /// `cleanup` deletes may be gone already: deleting is idempotent).
    pub async fn delete_queue(&self, queue: &str) -> anyhow::Result<()> {
        self.channel
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await
            .with_context(|| format!("deleting queue {queue}"))?;
        Ok(())
    }

    /// The dead letters, oldest first, left in place.
    pub async fn dead_letters(&self) -> anyhow::Result<Vec<DeadLetterView>> {
        let q = Dlq::open(&self.config).await?;
        let v = q.peek(None).await;
        q.close().await;
        v
    }

    /// The simulator's attribute store.
    pub fn state(&self) -> Store {
        self.sim.state()
    }

    /// Stops the worker and deletes the queues and exchanges.
    pub async fn cleanup(mut self) -> anyhow::Result<()> {
        let _ = self.stop_worker().await;
        delete_topology(&self.channel, &self.config.amqp).await?;
        self.cleaned = true;
        let _ = self.conn.close(200, "done".into()).await;
        self.sim.pause().await;
        Ok(())
    }
}

/// How often a quorum queue's leader publishes the counts `rabbitmqctl
/// list_queues` shows (RabbitMQ's `quorum_tick_interval`, by default).
const QUORUM_TICK: Duration = Duration::from_secs(5);

/// The broker's own count of unacknowledged messages in `queue`, from
/// `rabbitmqctl` (about a second per call; a quorum queue's lags by up to
/// [`QUORUM_TICK`]); `None` if it cannot run.
pub async fn rabbitmqctl_unacked(queue: &str) -> Option<u64> {
    rabbitmqctl_counts(queue).await.map(|(_, unacked)| unacked)
}

/// (ready, unacknowledged) messages in `queue` as the broker counts them, in
/// one look; None when `rabbitmqctl` cannot answer or does not list it.
async fn rabbitmqctl_counts(queue: &str) -> Option<(u64, u64)> {
    let out = tokio::process::Command::new("rabbitmqctl")
        .args([
            "-q",
            "list_queues",
            "--no-table-headers",
            "name",
            "messages_ready",
            "messages_unacknowledged",
        ])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .await
        .ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let mut f = l.split_whitespace();
        if f.next()? != queue {
            return None;
        }
        Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
    })
}

async fn delete_topology(channel: &Channel, a: &crate::config::AmqpConfig) -> anyhow::Result<()> {
    // The dead-letter stream, its ledger and inbox and a migration's holding
    // queue (deleting a queue that is not there succeeds).
    let dlq = &a.dead_letter_queue;
    let queues = [
        a.queue.clone(),
        dlq.clone(),
        format!("{dlq}.ledger"),
        crate::amqp::inbox::inbox_name(dlq),
        crate::dlq::migrate::holding_queue_name(dlq),
    ];
    for q in &queues {
        channel
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await
            .with_context(|| format!("deleting queue {q}"))?;
    }
    for e in [&a.exchange, &a.dead_letter_exchange] {
        channel
            .exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
            .await
            .with_context(|| format!("deleting exchange {e}"))?;
    }
    Ok(())
}

impl Drop for Sandbox {
    /// A sandbox dropped without `cleanup` (a failing test, say) still
    /// leaves nothing behind: its topology is deleted on a fresh connection.
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        self.cancel.cancel();
        let amqp = self.config.amqp.clone();
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                let Ok(conn) =
                    crate::amqp::nodes::connect_first(&amqp, "imattr sandbox cleanup").await
                else {
                    return;
                };
                if let Ok(ch) = conn.create_channel().await {
                    let _ = delete_topology(&ch, &amqp).await;
                }
                let _ = conn.close(200, "done".into()).await;
            });
        })
        .join();
    }
}
