//! The shared integration-test helper: a sandbox (simulator + uniquely named
//! queues on the local RabbitMQ + the worker) with test-friendly settings.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use imattr::config::Config;
pub use imattr::sandbox::Sandbox;
pub use imattr::simulator::Faults;

/// How long a test waits for the worker to drain before failing.
pub const DRAIN: Duration = Duration::from_secs(60);

/// Test settings: fast retries and batches, no admin port.
pub fn base_config() -> Config {
    let mut c = Config::default();
    if let Ok(url) = std::env::var("IMATTR_TEST_AMQP_URL") {
        c.amqp.url = imattr::config::AmqpUrl::new(url);
    }
    c.retry.initial_interval_ms = 20;
    c.retry.max_interval_ms = 500;
    c.retry.max_elapsed_secs = 60;
    c.batch.max_wait_ms = 50;
    c.shutdown.timeout_secs = 10;
    c.tencent.timeout_ms = 3500;
    c
}

/// An AMQP URL on which nothing listens.
pub fn unreachable_amqp_url() -> imattr::config::AmqpUrl {
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    imattr::config::AmqpUrl::new(format!("amqp://guest:guest@{free}/%2f"))
}

/// Logs to the test output when RUST_LOG is set.
pub fn init_logs() {
    if std::env::var("RUST_LOG").is_ok() {
        let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    }
}

/// A sandbox with the test settings, `tweak` applied, the worker not started.
pub async fn sandbox(
    attr_names: &[&str],
    faults: Faults,
    tweak: impl FnOnce(&mut Config),
) -> Sandbox {
    init_logs();
    Sandbox::start(&base_config(), "imattr.test", attr_names, faults, tweak)
        .await
        .expect("RabbitMQ must run on 127.0.0.1:5672 (rabbitmq-server -detached)")
}

/// `{"To_Account":a,"Attrs":{k:v,…}}`
pub fn update(account: &str, attrs: &[(&str, &str)]) -> Vec<u8> {
    let m: serde_json::Map<String, serde_json::Value> = attrs
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
        .collect();
    serde_json::to_vec(&serde_json::json!({"To_Account": account, "Attrs": m})).unwrap()
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub async fn eventually(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `imattr` binary configured (through `IMATTR_*` variables) like `config`.
pub fn imattr(config: &Config) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_imattr"));
    for (k, _) in std::env::vars() {
        if k.starts_with("IMATTR_") {
            cmd.env_remove(k);
        }
    }
    let vars = imattr::sandbox::env_vars(config);
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd.env_remove("RUST_LOG");
    cmd.kill_on_drop(true);
    cmd
}

/// Runs `imattr ARGS…` to the end: (exit code, stdout, stderr).
pub async fn imattr_output(config: &Config, args: &[&str]) -> (i32, String, String) {
    let out = imattr(config)
        .args(args)
        .output()
        .await
        .expect("running imattr");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The expected final state: account → attribute → value.
pub type Expected = HashMap<String, BTreeMap<String, String>>;

/// Publishes `n` updates over `accounts` accounts with increasing values.
pub async fn publish_stream(
    sb: &Sandbox,
    n: usize,
    accounts: usize,
    from: usize,
    expected: &mut Expected,
) {
    for i in from..from + n {
        let a = format!("acc{}", (i * 7919) % accounts);
        let v = i.to_string();
        expected
            .entry(a.clone())
            .or_default()
            .insert("n".into(), v.clone());
        sb.publish(update(&a, &[("n", &v)])).await.unwrap();
    }
}

/// The final state is last-value-wins and nothing was dead-lettered.
pub async fn assert_final(sb: &Sandbox, expected: &Expected) {
    assert_eq!(&sb.state(), expected, "final state is last-value-wins");
    assert!(sb.dead_letters().await.unwrap().is_empty());
}

/// `assert_final`, and no value ever went backwards (the values of
/// `publish_stream` grow per account). Not after a crash: updates applied
/// but not yet acked are redelivered and applied again, in order.
pub async fn assert_final_monotonic(sb: &Sandbox, expected: &Expected) {
    assert_final(sb, expected).await;
    assert_eq!(sb.sim.stats().regressions, 0, "a value went backwards");
}

/// Stops the worker gracefully, checks it left nothing ready in the updates
/// queue, and deletes the sandbox.
pub async fn finish(mut sb: Sandbox) {
    sb.stop_worker().await.unwrap();
    let queue = sb.config.amqp.queue.clone();
    assert_eq!(sb.depth(&queue).await.unwrap(), 0, "left in {queue}");
    sb.cleanup().await.unwrap();
}

/// A sandbox holding `n` updates over `accounts` accounts, with `imattr run`
/// draining it slowly as a child process; returned once some are applied.
/// Mid-stream by order, not by this machine's speed: an update of account
/// `STUCK` comes first and fails (91000) until the caller clears
/// `fail_accounts`, so the worker holds at least that message unacked
/// whenever it is stopped (it is in the queue again afterwards).
pub async fn child_worker_mid_stream(
    n: usize,
    accounts: usize,
) -> (Sandbox, tokio::process::Child, Expected) {
    let faults = Faults {
        latency_ms: (5, 15),
        fail_accounts: vec![STUCK.to_string()],
        ..Faults::default()
    };
    let sb = sandbox(&["n"], faults, |c| {
        c.batch.max_accounts = 10;
        c.tencent.max_in_flight = 2;
        // Hold only part of the stream, so some of it is still queued when
        // the worker stops.
        c.amqp.prefetch = 500;
        // A graceful stop gives up on the failing account after this long.
        c.shutdown.timeout_secs = 3;
    })
    .await;
    let mut expected = Expected::new();
    sb.publish(update(STUCK, &[("n", "1")])).await.unwrap();
    expected.insert(STUCK.into(), [("n".to_string(), "1".to_string())].into());
    publish_stream(&sb, n, accounts, 0, &mut expected).await;
    sb.confirm().await.unwrap();
    let child = imattr(&sb.config)
        .arg("run")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let sim = &sb.sim;
    eventually(
        Duration::from_secs(30),
        "some progress, the stuck account refused",
        || sim.stats().accounts_written >= 200 && sim.stats().count("im_set_attr", 91000) > 0,
    )
    .await;
    (sb, child, expected)
}

/// The account of `child_worker_mid_stream` that fails until cleared.
pub const STUCK: &str = "stuck";

/// Runs `rabbitmqctl ARGS…` (it must be on PATH) and returns its output.
pub fn rabbitmqctl(args: &[&str]) -> String {
    let out = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl must be on PATH for this test");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The broker's pids of the connections whose name contains `name`.
pub fn connection_pids(name: &str) -> Vec<String> {
    let list = rabbitmqctl(&[
        "list_connections",
        "-q",
        "--no-table-headers",
        "pid",
        "client_properties",
    ]);
    list.lines()
        .filter(|l| l.contains(name))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// Closes the broker connections whose name contains `name`; returns how many.
pub fn close_connections(name: &str) -> usize {
    let pids = connection_pids(name);
    for pid in &pids {
        rabbitmqctl(&["close_connection", pid, "closed by a test"]);
    }
    pids.len()
}

/// One `imattr run` child process with its own admin endpoint and log file.
pub struct Worker {
    pub child: tokio::process::Child,
    pub admin: String,
    pub log: PathBuf,
}

impl Worker {
    pub fn spawn(config: &Config, dir: &std::path::Path, n: usize) -> Worker {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut cfg = config.clone();
        cfg.admin.listen = format!("127.0.0.1:{port}");
        let log = dir.join(format!("worker{n}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = imattr(&cfg)
            .arg("run")
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        Worker {
            child,
            admin: cfg.admin.listen,
            log,
        }
    }

    /// (status, body) of `GET path` on its admin endpoint; (0, "") while it is not listening.
    pub async fn get(&self, path: &str) -> (u16, String) {
        match reqwest::get(format!("http://{}{path}", self.admin)).await {
            Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
            Err(_) => (0, String::new()),
        }
    }

    pub async fn role(&self) -> String {
        self.get("/healthz").await.1
    }

    /// A counter or gauge's value in its /metrics (0 when absent).
    pub async fn metric(&self, name: &str) -> f64 {
        let text = self.get("/metrics").await.1;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    pub fn pid(&self) -> String {
        self.child.id().unwrap().to_string()
    }

    pub fn logs(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }
}

/// Polls until `f` holds (async), or fails the test after `timeout`.
pub async fn until<F, Fut>(timeout: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Worker {
    /// The name of its consume connection (`rabbitmqctl list_connections client_properties`).
    pub fn connection_name(&self, config: &Config) -> String {
        format!("imattr run {} pid {}", config.amqp.queue, self.pid())
    }

    /// Its peak resident memory so far (VmHWM), in MiB.
    pub fn peak_rss_mib(&self) -> f64 {
        peak_rss_mib(self.child.id().unwrap())
    }
}

/// A process's peak resident memory so far (VmHWM in /proc), in MiB; NaN if unknown.
pub fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// The broker the tests use, as `host:port` (from `IMATTR_TEST_AMQP_URL`
/// when set, else 127.0.0.1:5672).
pub fn broker_addr() -> String {
    let url = std::env::var("IMATTR_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let after_at = url.rsplit_once('@').map_or(url.as_str(), |(_, h)| h);
    let host = after_at.split('/').next().unwrap_or("127.0.0.1:5672");
    if host.contains(':') {
        host.to_string()
    } else {
        format!("{host}:5672")
    }
}

/// A TCP proxy to the broker that can go silent: from then on it forwards
/// nothing either way and closes nothing, on the connections it has and on
/// new ones, as a network partition leaves a connection (half-open: neither
/// end hears that the other is gone).
pub struct SilentProxy {
    pub addr: std::net::SocketAddr,
    silent: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl SilentProxy {
    pub async fn start() -> SilentProxy {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let silent = Arc::new(AtomicBool::new(false));
        let upstream = broker_addr();
        let quiet = silent.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let quiet = quiet.clone();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    if quiet.load(Ordering::Acquire) {
                        // Accepted and never answered.
                        let _keep = client;
                        return std::future::pending::<()>().await;
                    }
                    let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let up = tokio::spawn(forward(cr, sw, quiet.clone()));
                    let down = tokio::spawn(forward(sr, cw, quiet.clone()));
                    let _ = tokio::join!(up, down);
                });
            }
        });

        /// Copies until `quiet`; then keeps both ends open and silent.
        async fn forward(
            mut from: tokio::net::tcp::OwnedReadHalf,
            mut to: tokio::net::tcp::OwnedWriteHalf,
            quiet: Arc<AtomicBool>,
        ) {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match from.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if quiet.load(Ordering::Acquire) {
                    break;
                }
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            if quiet.load(Ordering::Acquire) {
                // Nothing read from now on is forwarded, and nothing is
                // closed: hold both halves for as long as the test runs.
                let _keep = (from, to);
                std::future::pending::<()>().await;
            }
        }

        SilentProxy { addr, silent }
    }

    /// An AMQP URL (guest) through this proxy.
    pub fn amqp_url(&self) -> imattr::config::AmqpUrl {
        imattr::config::AmqpUrl::new(format!("amqp://guest:guest@{}/%2f", self.addr))
    }

    /// Stops forwarding, both ways, for good.
    pub fn silence(&self) {
        self.silent
            .store(true, std::sync::atomic::Ordering::Release);
    }
}
