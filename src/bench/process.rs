//! Child processes the scenarios measure or stand on: `imattr simulate` and
//! `imattr run`, each with the sandbox's configuration in its environment.

use std::time::Duration;

use anyhow::Context;

use crate::config::Config;
use crate::sandbox::env_vars;
use crate::simulator::{Stats, Store};

/// A strict simulator process at 100 requests/s with `latency_ms`.
pub(super) async fn strict_sim(per_sec: u32, latency_ms: u64) -> anyhow::Result<SimProcess> {
    SimProcess::start(&[
        "--rate-limit",
        &per_sec.to_string(),
        "--rate-limit-mode",
        "strict",
        "--latency-ms",
        &latency_ms.to_string(),
    ])
    .await
}
/// `imattr` with `config` in its environment and nothing else of ours.
pub(super) fn imattr_command(config: &Config) -> anyhow::Result<tokio::process::Command> {
    let exe = std::env::current_exe().context("finding the imattr executable")?;
    let mut cmd = tokio::process::Command::new(exe);
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("IMATTR_")) {
        cmd.env_remove(k);
    }
    cmd.envs(env_vars(config))
        .env("IMATTR_LOG__LEVEL", "warn")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    Ok(cmd)
}

/// The simulator in its own process, reached over TCP.
pub(super) struct SimProcess {
    child: tokio::process::Child,
    pub(super) url: String,
    http: reqwest::Client,
}

impl SimProcess {
    /// Starts `imattr simulate` on a free port with `args`; waits until it
    /// says where it listens.
    pub(super) async fn start(args: &[&str]) -> anyhow::Result<SimProcess> {
        use tokio::io::AsyncBufReadExt;
        let mut cmd = imattr_command(&Config::default())?;
        for (k, _) in env_vars(&Config::default()) {
            cmd.env_remove(k);
        }
        let mut child = cmd
            .args(["simulate", "--listen", "127.0.0.1:0", "--attr-names", "n"])
            .args(args)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("starting imattr simulate")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let url = tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(line) = lines.next_line().await? {
                if let Some(url) = line.strip_prefix("listening on ") {
                    return Ok(url.trim().to_string());
                }
            }
            anyhow::bail!("imattr simulate exited without saying where it listens")
        })
        .await
        .context("imattr simulate did not start within 20 s")??;
        Ok(SimProcess {
            child,
            url,
            http: reqwest::Client::new(),
        })
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let r = self
            .http
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .with_context(|| format!("GET {path}"))?
            .error_for_status()?;
        Ok(r.json().await?)
    }

    pub(super) async fn stats(&self) -> anyhow::Result<Stats> {
        self.get("/__simulator/stats").await
    }

    pub(super) async fn state(&self) -> anyhow::Result<Store> {
        self.get("/__simulator/state").await
    }

    /// Makes the simulator refuse every API request with 60007 for `ms`.
    pub(super) async fn refuse_for(&self, ms: u64) -> anyhow::Result<()> {
        self.http
            .post(format!("{}/__simulator/refuse?ms={ms}", self.url))
            .send()
            .await
            .context("POST /__simulator/refuse")?
            .error_for_status()?;
        Ok(())
    }

    pub(super) async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// `imattr run` in its own process, watched through its admin endpoint.
pub(super) struct WorkerProcess {
    child: tokio::process::Child,
    pub(super) pid: u32,
    metrics_url: String,
    http: reqwest::Client,
}

impl WorkerProcess {
    pub(super) async fn start(config: &Config) -> anyhow::Result<WorkerProcess> {
        Self::start_with(config, |c| c).await
    }

    /// `start`, with `adjust` applied to the command (e.g. its environment).
    pub(super) async fn start_with(
        config: &Config,
        adjust: impl FnOnce(&mut tokio::process::Command) -> &mut tokio::process::Command,
    ) -> anyhow::Result<WorkerProcess> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let admin = format!("127.0.0.1:{port}");
        let mut cmd = imattr_command(config)?;
        let child = adjust(&mut cmd)
            .env("IMATTR_ADMIN__LISTEN", &admin)
            .arg("run")
            .stdout(std::process::Stdio::null())
            .spawn()
            .context("starting imattr run")?;
        let pid = child.id().context("no pid")?;
        Ok(WorkerProcess {
            child,
            pid,
            metrics_url: format!("http://{admin}/metrics"),
            http: reqwest::Client::new(),
        })
    }

    /// Messages acknowledged so far (0 until the admin endpoint answers).
    pub(super) async fn acked(&self) -> anyhow::Result<u64> {
        let text = self
            .http
            .get(&self.metrics_url)
            .send()
            .await?
            .text()
            .await?;
        Ok(text
            .lines()
            .find_map(|l| l.strip_prefix("imattr_messages_acked_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0) as u64)
    }

    /// SIGTERM, then waits up to 30 s.
    pub(super) async fn stop(mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        let _ = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await;
    }
}
/// Peak RSS (VmHWM) of a process, in MiB.
pub(super) fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
