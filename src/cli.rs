//! The command line (CONTRACT §10) and what each command does.

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, CommandFactory, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError};
use crate::simulator::{Faults, SimOptions, Simulator};
use crate::update::{self, Rules};

/// imattr keeps Tencent Cloud Chat (IM) user attributes in sync: it consumes
/// attribute-update events from RabbitMQ, coalesces them per account and
/// applies them with `im_set_attr`, retrying transient failures and
/// dead-lettering permanent ones.
#[derive(Debug, Parser)]
#[command(name = "imattr", version, propagate_version = true)]
pub struct Cli {
    /// Configuration file (else $IMATTR_CONFIG, else ./config/imattr.toml if present).
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon until SIGTERM or SIGINT.
    #[command(
        after_help = "Example:\n  IMATTR_TENCENT__SDKAPPID=1400000000 IMATTR_TENCENT__SECRET_KEY=… imattr run"
    )]
    Run,
    /// Publish updates to the updates exchange, with publisher confirms.
    #[command(
        after_help = "Examples:\n  imattr publish --account xiaojun012 --attr sex=attr1 --attr city=attr2\n  imattr publish --file updates.ndjson\n  cat updates.ndjson | imattr publish --file -"
    )]
    Publish(PublishArgs),
    /// Inspect, replay, export or purge the dead-letter queue.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Show accounts' attributes (im_get_attr).
    #[command(after_help = "Example:\n  imattr get xiaojun012 xiaojun013")]
    Get {
        /// Accounts to show.
        #[arg(required = true)]
        accounts: Vec<String>,
    },
    /// Print a UserSig generated from the configured secret key.
    #[command(after_help = "Example:\n  imattr sig --identifier administrator")]
    Sig {
        /// Sign for this identifier instead of tencent.identifier.
        #[arg(long)]
        identifier: Option<String>,
    },
    /// Print the effective configuration, secrets redacted.
    #[command(
        after_help = "Example:\n  IMATTR_BATCH__MAX_WAIT_MS=100 imattr --config prod.toml config"
    )]
    Config,
    /// Run the built-in API simulator.
    #[command(
        after_help = "Example:\n  imattr simulate --listen 127.0.0.1:18080 --attr-names sex,city --fail-rate 0.05 --latency-ms 5..20"
    )]
    Simulate(SimulateArgs),
    /// Simulator, worker and sample traffic against local RabbitMQ, then a summary.
    #[command(after_help = "Example:\n  cargo run --release -- demo")]
    Demo,
    /// Measure throughput, latency and memory against local RabbitMQ and the simulator.
    #[command(after_help = "Example:\n  imattr bench --quick")]
    Bench {
        /// Tiny sizes (seconds, not minutes).
        #[arg(long)]
        quick: bool,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Run only this scenario (1 to 5).
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..=5))]
        only: Option<u8>,
    },
    /// Print a shell completion script.
    #[command(
        after_help = "Examples:\n  imattr completions bash > /etc/bash_completion.d/imattr\n  imattr completions zsh > \"${fpath[1]}/_imattr\"\n  imattr completions fish > ~/.config/fish/completions/imattr.fish"
    )]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff).
    #[command(after_help = "Example:\n  imattr man > /usr/local/share/man/man1/imattr.1")]
    Man,
}

/// `imattr publish`.
#[derive(Debug, Args)]
pub struct PublishArgs {
    /// The account (To_Account) to update.
    #[arg(long, requires = "attr", conflicts_with = "file")]
    pub account: Option<String>,
    /// An attribute as name=value; repeat for several.
    #[arg(long, value_name = "NAME=VALUE")]
    pub attr: Vec<String>,
    /// NDJSON file, one message body per line; `-` reads stdin.
    #[arg(long, value_name = "PATH")]
    pub file: Option<PathBuf>,
    /// Publish the valid lines of a file and skip the invalid ones.
    #[arg(long)]
    pub skip_invalid: bool,
}

/// `imattr dlq …`.
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Show dead-lettered messages without removing them.
    #[command(
        after_help = "Example:\n  imattr dlq list --limit 20\n  imattr dlq list --json | jq .error"
    )]
    List {
        /// At most this many.
        #[arg(long)]
        limit: Option<usize>,
        /// NDJSON with all headers, properties and the body.
        #[arg(long)]
        json: bool,
    },
    /// Move matching messages back to the updates exchange.
    #[command(
        after_help = "Example:\n  imattr dlq replay --code 90033 --dry-run\n  imattr dlq replay --reason retries-exhausted"
    )]
    Replay {
        /// At most this many.
        #[arg(long)]
        limit: Option<usize>,
        /// Only messages with this x-imattr-error-code.
        #[arg(long)]
        code: Option<i64>,
        /// Only messages with this x-imattr-reason.
        #[arg(long, value_parser = ["invalid-message", "rejected", "retries-exhausted"])]
        reason: Option<String>,
        /// Count what would move; move nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Write every dead letter as NDJSON, removing nothing.
    #[command(after_help = "Example:\n  imattr dlq export --out dead.ndjson")]
    Export {
        /// Output file (default stdout).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Delete every dead-lettered message.
    #[command(after_help = "Example:\n  imattr dlq purge --yes")]
    Purge {
        /// Confirm the deletion.
        #[arg(long)]
        yes: bool,
    },
}

/// `imattr simulate`.
#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:18080")]
    pub listen: SocketAddr,
    /// Probability of answering 91000.
    #[arg(long, default_value_t = 0.0)]
    pub fail_rate: f64,
    /// Latency per request, `MS` or `MIN..MAX`.
    #[arg(long, default_value = "0")]
    pub latency_ms: String,
    /// Requests per second per API before 60007 (0 turns it off).
    #[arg(long, default_value_t = 100)]
    pub rate_limit: u32,
    /// `strict`: at most --rate-limit admitted requests in any sliding
    /// 1-second window; `lenient`: a token bucket (bursts, then the rate).
    #[arg(long, default_value = "strict")]
    pub rate_limit_mode: crate::simulator::RateLimitMode,
    /// Probability of answering HTTP 500.
    #[arg(long, default_value_t = 0.0)]
    pub http_error_rate: f64,
    /// Answer 91000 to every im_set_attr holding this account (repeatable).
    #[arg(long)]
    pub fail_account: Vec<String>,
    /// Accounts per im_set_attr before 90018.
    #[arg(long, default_value_t = 100)]
    pub max_accounts: usize,
    /// Answer 90033 whenever this attribute appears (repeatable).
    #[arg(long)]
    pub reject_attr: Vec<String>,
    /// Answer every request with 90009.
    #[arg(long)]
    pub misconfigured: bool,
    /// Attribute names registered at start, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub attr_names: Vec<String>,
    /// Seed of the fault injection.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// Parses `MS` or `MIN..MAX`.
pub fn parse_latency(s: &str) -> anyhow::Result<(u64, u64)> {
    let bad = || anyhow::anyhow!("--latency-ms takes MS or MIN..MAX, e.g. 5..20 (got {s:?})");
    match s.split_once("..") {
        Some((a, b)) => {
            let (a, b) = (
                a.trim().parse().map_err(|_| bad())?,
                b.trim().parse().map_err(|_| bad())?,
            );
            if a > b {
                return Err(bad());
            }
            Ok((a, b))
        }
        None => {
            let v = s.trim().parse().map_err(|_| bad())?;
            Ok((v, v))
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// A token cancelled on SIGTERM/SIGINT.
pub fn cancel_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("Signal received; shutting down");
        t.cancel();
    });
    token
}

/// Writes what `completions` and `man` print; `None` for the other commands.
/// These need no configuration, so a broken one does not stop them.
pub fn write_generated(command: &Command, out: &mut impl Write) -> Option<std::io::Result<()>> {
    let mut cli = Cli::command();
    match command {
        Command::Completions { shell } => {
            clap_complete::generate(*shell, &mut cli, "imattr", out);
            Some(Ok(()))
        }
        Command::Man => Some(clap_mangen::Man::new(cli).render(out)),
        _ => None,
    }
}

/// Runs a command.
pub async fn dispatch(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Run => {
            config.validate_api()?;
            let cancel = cancel_on_signal();
            let health = Arc::new(crate::worker::Health::default());
            crate::admin::serve(&config.admin.listen, health.clone(), cancel.clone()).await?;
            crate::worker::run(config, cancel, health).await
        }
        Command::Config => {
            print!("{}", config.to_redacted_toml());
            Ok(())
        }
        Command::Sig { identifier } => {
            let t = &config.tencent;
            if t.sdkappid == 0 {
                return Err(ConfigError::Invalid {
                    field: "tencent.sdkappid",
                    message: "must be set to the app's SDKAppID (non-zero)".into(),
                }
                .into());
            }
            if t.secret_key.is_empty() {
                return Err(ConfigError::Invalid {
                    field: "tencent.secret_key",
                    message: "is needed to generate a UserSig".into(),
                }
                .into());
            }
            let signer = crate::tencent::Signer::from_config(t);
            let sig = match identifier {
                Some(id) => signer.usersig_for(&id).unwrap_or_default(),
                None => signer.usersig(),
            };
            println!("{sig}");
            Ok(())
        }
        Command::Get { accounts } => {
            config.validate_api()?;
            let client = crate::tencent::Client::from_config(&config)?;
            let users = client.get_attr(&accounts).await?;
            let mut out = std::io::stdout().lock();
            for u in users {
                writeln!(out, "{}", serde_json::to_string(&u)?)?;
            }
            Ok(())
        }
        Command::Simulate(a) => simulate(a, &config).await,
        Command::Publish(a) => publish(a, &config).await,
        Command::Dlq(c) => dlq(c, &config).await,
        Command::Demo => crate::demo::run(config).await,
        Command::Bench { quick, json, only } => crate::bench::run(config, quick, json, only).await,
        Command::Completions { .. } | Command::Man => {
            write_generated(&command, &mut std::io::stdout().lock())
                .unwrap_or(Ok(()))
                .context("writing to stdout")
        }
    }
}

async fn simulate(a: SimulateArgs, config: &Config) -> anyhow::Result<()> {
    let t = &config.tencent;
    let opts = SimOptions {
        listen: a.listen,
        sdkappid: if t.sdkappid != 0 {
            t.sdkappid
        } else {
            crate::simulator::DEFAULT_SDKAPPID
        },
        identifier: t.identifier.clone(),
        secret_key: if t.secret_key.is_empty() {
            crate::simulator::DEFAULT_SECRET_KEY.to_string()
        } else {
            t.secret_key.expose().to_string()
        },
        attr_names: a.attr_names,
        seed: a.seed,
        faults: Faults {
            fail_rate: a.fail_rate,
            http_error_rate: a.http_error_rate,
            latency_ms: parse_latency(&a.latency_ms)?,
            rate_limit: a.rate_limit,
            rate_limit_mode: a.rate_limit_mode,
            max_accounts: a.max_accounts,
            reject_attrs: a.reject_attr,
            misconfigured: a.misconfigured,
            fail_accounts: a.fail_account,
        },
        ..SimOptions::default()
    };
    let (sdkappid, identifier) = (opts.sdkappid, opts.identifier.clone());
    let sim = Simulator::start(opts)
        .await
        .with_context(|| format!("listening on {}", a.listen))?;
    // First line on stdout, so a parent process can read the bound port.
    println!("listening on {}", sim.url());
    std::io::Write::flush(&mut std::io::stdout()).context("writing to stdout")?;
    tracing::info!(
        url = %sim.url(),
        sdkappid,
        identifier = %identifier,
        "Simulator listening; point tencent.base_url at it"
    );
    shutdown_signal().await;
    sim.shutdown().await;
    Ok(())
}

async fn publish(a: PublishArgs, config: &Config) -> anyhow::Result<()> {
    let rules = Rules {
        max_value_bytes: config.attributes.max_value_bytes,
        allowed: None,
    };
    // (routing key, body)
    let mut messages: Vec<(String, Vec<u8>)> = Vec::new();
    if let Some(account) = a.account {
        let mut attrs: Vec<(&str, &str)> = Vec::new();
        for kv in &a.attr {
            let (k, v) = kv
                .split_once('=')
                .with_context(|| format!("--attr takes NAME=VALUE (got {kv:?})"))?;
            attrs.push((k, v));
        }
        // In the documented field order, attributes in the order given.
        let mut body = format!(
            "{{\"To_Account\":{},\"Attrs\":",
            serde_json::to_string(&account)?
        )
        .into_bytes();
        serde_json::to_writer(&mut body, &crate::tencent::client::AttrPairs(&attrs))?;
        body.push(b'}');
        let updates =
            update::parse(&body, &rules).map_err(|e| anyhow::anyhow!("invalid update: {e}"))?;
        messages.push((updates[0].account.clone(), body));
    } else if let Some(path) = a.file {
        let reader: Box<dyn BufRead> = if path.as_os_str() == "-" {
            Box::new(std::io::BufReader::new(std::io::stdin()))
        } else {
            Box::new(std::io::BufReader::new(
                std::fs::File::open(&path)
                    .with_context(|| format!("opening {}", path.display()))?,
            ))
        };
        let mut invalid = Vec::new();
        for (i, line) in reader.split(b'\n').enumerate() {
            let mut line = line.context("reading the input")?;
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match update::parse(&line, &rules) {
                Ok(u) => messages.push((u[0].account.clone(), line)),
                Err(e) => invalid.push(format!("line {}: {e}", i + 1)),
            }
        }
        if !invalid.is_empty() {
            for l in invalid.iter().take(20) {
                eprintln!("{l}");
            }
            if invalid.len() > 20 {
                eprintln!("… and {} more invalid lines", invalid.len() - 20);
            }
            if !a.skip_invalid {
                anyhow::bail!(
                    "{} invalid line(s); nothing published (use --skip-invalid to publish the valid ones)",
                    invalid.len()
                );
            }
            eprintln!("skipping {} invalid line(s)", invalid.len());
        }
    } else {
        anyhow::bail!("give --account A --attr k=v, or --file PATH");
    }
    let conn = crate::amqp::nodes::connect_first(&config.amqp, "imattr publish").await?;
    let ch = conn.create_channel().await.context("opening a channel")?;
    crate::amqp::topology::declare(&ch, &config.amqp).await?;
    let mut p = crate::publish::Publisher::new(&conn, &config.amqp.exchange).await?;
    let bar = if messages.len() > 1000 {
        indicatif::ProgressBar::new(messages.len() as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let props = crate::publish::update_properties();
    for (rk, body) in &messages {
        p.publish(rk, body, props.clone()).await?;
        bar.inc(1);
    }
    let n = p.finish().await?;
    bar.finish_and_clear();
    let _ = conn.close(200, "done".into()).await;
    println!("published {n}");
    Ok(())
}

async fn dlq(c: DlqCommand, config: &Config) -> anyhow::Result<()> {
    use crate::dlq::{print_table, Dlq, Filter};
    if let DlqCommand::Purge { yes: false } = c {
        anyhow::bail!(
            "refusing to delete every message of {} without --yes",
            config.amqp.dead_letter_queue
        );
    }
    let q = Dlq::open(config).await?;
    let result = async {
        match c {
            DlqCommand::List { limit, json } => {
                let views = q.peek(limit).await?;
                let mut out = std::io::stdout().lock();
                if json {
                    for v in &views {
                        writeln!(out, "{}", serde_json::to_string(v)?)?;
                    }
                } else if views.is_empty() {
                    writeln!(
                        out,
                        "the dead-letter queue {} is empty",
                        config.amqp.dead_letter_queue
                    )?;
                } else {
                    print_table(&mut out, &views)?;
                }
            }
            DlqCommand::Export { out } => {
                let views = q.peek(None).await?;
                let mut w: Box<dyn Write> = match &out {
                    Some(p) => Box::new(std::io::BufWriter::new(
                        std::fs::File::create(p)
                            .with_context(|| format!("creating {}", p.display()))?,
                    )),
                    None => Box::new(std::io::stdout().lock()),
                };
                for v in &views {
                    writeln!(w, "{}", serde_json::to_string(v)?)?;
                }
                w.flush()?;
                if out.is_some() {
                    eprintln!("exported {}", views.len());
                }
            }
            DlqCommand::Replay {
                limit,
                code,
                reason,
                dry_run,
            } => {
                let n = q.replay(&Filter { code, reason }, limit, dry_run).await?;
                if dry_run {
                    println!("would replay {n}");
                } else {
                    println!("replayed {n}");
                }
            }
            DlqCommand::Purge { .. } => {
                let n = q.purge().await?;
                println!("purged {n}");
            }
        }
        anyhow::Ok(())
    }
    .await;
    q.close().await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_forms() {
        assert_eq!(parse_latency("5").unwrap(), (5, 5));
        assert_eq!(parse_latency("5..20").unwrap(), (5, 20));
        assert!(parse_latency("20..5").is_err());
        assert!(parse_latency("x").is_err());
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
