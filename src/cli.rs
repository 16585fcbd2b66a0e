//! The command line: clap types, signals and dispatch; each command's body is in `cmd/`.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, CommandFactory, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::Config;

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
    /// Serve the web console without a worker: the dead letters and the updates queue.
    #[command(
        after_help = "A non-loopback --listen needs console.token or console.user and \
console.password_hash (docs/console.md).\n\n\
Examples:\n  imattr console --listen 127.0.0.1:9465\n  echo 'pass phrase' | imattr console --hash-password"
    )]
    Console(ConsoleArgs),
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
    /// Print the effective configuration, secrets redacted, and where it came from.
    #[command(
        after_help = "Examples:\n  IMATTR_BATCH__MAX_WAIT_MS=100 imattr --config prod.toml config\n  imattr --config prod.toml config --check"
    )]
    Config {
        /// Only check it, as `imattr run` would (the API credentials too): print
        /// one line and exit 0, or name the problem and exit 2.
        #[arg(long)]
        check: bool,
    },
    /// Declare the exchanges and queues exactly as `imattr run` would, then exit.
    #[command(
        after_help = "Run it once before publishers start, so that nothing they publish finds no queue, \
or to create a queue with new settings next to the old one (docs/several-workers.md, \
\"Migrating a queue\"). The other tools never create the updates queue.\n\n\
Example:\n  IMATTR_AMQP__QUEUE=imattr.updates.v2 IMATTR_AMQP__QUEUE_TYPE=quorum imattr declare"
    )]
    Declare,
    /// Run the built-in API simulator: an in-memory im_set_attr and its sibling APIs.
    #[command(
        after_help = "It checks UserSigs against the configured tencent.sdkappid and \
tencent.secret_key (when they are not set: sdkappid 1400000000 and the key of Tencent's test \
vector, which `imattr config` then does not show). Like the real API, it rejects every update \
that names an attribute not registered, with ErrorCode 90033: without --attr-names, every \
update is rejected. Its state lives in memory and is gone when it stops.\n\n\
Example:\n  imattr simulate --listen 127.0.0.1:18080 --attr-names sex,city --fail-rate 0.05 --latency-ms 5..20"
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
        /// Run only this scenario (1 to 10; 2 is sets alone into the API, 8 the
        /// dead-letter tools, 9 large bodies, 10 sets and removals).
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..=10))]
        only: Option<u8>,
        /// Dead letters for scenario 8 (default 1,000,000; 5,000 with --quick).
        #[arg(long)]
        dead_letters: Option<usize>,
        /// Rounds of scenario 1 (default 1): each round runs the bare consumer and
        /// `imattr run` with the default, 1 and 2 worker threads, in a rotating order.
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=100))]
        rounds: Option<u16>,
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
    /// Scenario 1's reference: a plain consumer that only acks.
    #[command(hide = true)]
    BenchConsumer {
        /// Messages to consume.
        #[arg(long)]
        count: usize,
    },
}

/// `imattr publish`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["account", "file"])))]
#[command(group(clap::ArgGroup::new("ops").multiple(true).args(["attr", "remove"])))]
pub struct PublishArgs {
    /// The account (To_Account) to update.
    #[arg(long, requires = "ops", conflicts_with = "file")]
    pub(crate) account: Option<String>,
    /// An attribute as name=value; repeat for several.
    #[arg(long, value_name = "NAME=VALUE", value_parser = parse_attr, requires = "account")]
    pub(crate) attr: Vec<(String, String)>,
    /// An attribute to remove (`"NAME":null` in the message); repeat for several.
    #[arg(long, value_name = "NAME", requires = "account")]
    pub(crate) remove: Vec<String>,
    /// NDJSON file, one message body per line; `-` reads stdin.
    #[arg(long, value_name = "PATH")]
    pub(crate) file: Option<PathBuf>,
    /// Publish the valid lines of a file and skip the invalid ones.
    #[arg(long, requires = "file")]
    pub(crate) skip_invalid: bool,
    /// Check every message as publishing would, print how many would be
    /// published, and publish nothing (no broker needed).
    #[arg(long)]
    pub(crate) dry_run: bool,
}

/// `NAME=VALUE` (the value may hold `=`).
fn parse_attr(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) => Ok((k.to_string(), v.to_string())),
        None => Err(format!("takes NAME=VALUE, e.g. sex=attr1 (got {s:?})")),
    }
}

/// A `--limit`: 0 would ask for nothing, which is never meant (it is bad
/// usage, exit 2, rather than an empty answer that looks like "no match").
fn parse_limit(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1 (leave --limit out for no limit)".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// Bad usage found after parsing (an update given on the command line that
/// breaks a rule, say): `imattr` exits with status 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// `imattr dlq …`.
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Show dead letters (oldest first) without changing anything.
    #[command(
        after_help = "Examples:\n  imattr dlq list --limit 20\n  imattr dlq list --limit 20 --after 1234\n  imattr dlq list --reason broker:expired --account xiaojun012\n  imattr dlq list --grep quota --since 2026-11-25T00:00:00Z\n  imattr dlq list --resolved --wide\n  imattr dlq list --json | jq .error"
    )]
    List {
        /// At most this many (1 or more; leave it out for no limit); the
        /// next page's `--after` is printed when there are more.
        #[arg(long, value_parser = parse_limit)]
        limit: Option<usize>,
        /// Only dead letters with a larger id (the cursor of the previous page).
        #[arg(long, value_name = "ID")]
        after: Option<u64>,
        /// NDJSON with all headers, properties and the body.
        #[arg(long)]
        json: bool,
        /// Print the table's accounts, errors and bodies whole, not cut.
        #[arg(long, conflicts_with = "json")]
        wide: bool,
        /// Also show replayed and deleted dead letters, with when and how.
        #[arg(long)]
        resolved: bool,
        /// Which dead letters.
        #[command(flatten)]
        filter: DlqFilter,
    },
    /// Show one dead letter, whole, as JSON.
    #[command(after_help = "Example:\n  imattr dlq show 1234")]
    Show {
        /// Its id (the ID column of `dlq list`).
        id: u64,
    },
    /// Count dead letters by reason, error code, error text, source queue and account.
    #[command(
        after_help = "Examples:\n  imattr dlq stats\n  imattr dlq stats --by error\n  imattr dlq stats --json"
    )]
    Stats {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Only this grouping.
        #[arg(long, value_enum)]
        by: Option<crate::dlq::By>,
        /// How many accounts to show.
        #[arg(long, default_value_t = 10)]
        top: usize,
        /// Which dead letters.
        #[command(flatten)]
        filter: DlqFilter,
    },
    /// Send matching dead letters back to the updates exchange.
    #[command(
        after_help = "Examples:\n  imattr dlq replay --code 90033 --dry-run\n  imattr dlq replay --reason retries-exhausted --rate 50\n  imattr dlq replay --id 17 --id 42\n  imattr dlq replay --reason broker:expired --whole"
    )]
    Replay {
        /// At most this many (1 or more; leave it out for no limit).
        #[arg(long, value_parser = parse_limit)]
        limit: Option<usize>,
        /// At most this many messages a second.
        #[arg(long, value_parser = parse_rate)]
        rate: Option<f64>,
        /// Only these ids (repeat the flag, or give several).
        #[arg(long = "id", value_name = "ID", num_args = 1..)]
        ids: Vec<u64>,
        /// Which dead letters.
        #[command(flatten)]
        filter: DlqFilter,
        /// Count what would go; send nothing.
        #[arg(long)]
        dry_run: bool,
        /// Republish whole messages, not only the entries of their x-imattr-failed-accounts.
        #[arg(long)]
        whole: bool,
    },
    /// Delete dead letters by id, or those matching filters.
    #[command(
        after_help = "Examples:\n  imattr dlq delete 17 42\n  imattr dlq delete --reason invalid-message --account xiaojun014"
    )]
    Delete {
        /// The ids (the ID column of `dlq list`).
        ids: Vec<u64>,
        /// Which dead letters (at least one filter without ids; `purge --yes` deletes all).
        #[command(flatten)]
        filter: DlqFilter,
    },
    /// Write the dead letters (every one, or those matching) as NDJSON, changing nothing.
    #[command(
        after_help = "Examples:\n  imattr dlq export --out dead.ndjson\n  imattr dlq export --reason rejected --code 90033 --out rejected.ndjson"
    )]
    Export {
        /// Output file (default stdout).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Which dead letters.
        #[command(flatten)]
        filter: DlqFilter,
    },
    /// Turn a classic or quorum dead-letter queue from an earlier release into
    /// the stream, losing nothing (run it again after any interruption).
    #[command(after_help = "Example:\n  imattr dlq migrate")]
    Migrate,
    /// Delete every dead letter, or the matching ones.
    #[command(
        after_help = "Examples:\n  imattr dlq purge --yes\n  imattr dlq purge --yes --reason invalid-message --account xiaojun014"
    )]
    Purge {
        /// Confirm the deletion (required: there is no undo).
        #[arg(long, required = true)]
        yes: bool,
        /// Which dead letters (default: all).
        #[command(flatten)]
        filter: DlqFilter,
    },
}

/// `--rate`: a positive number of messages a second.
fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        Ok(_) => Err("must be a positive number of messages a second".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// `--since`/`--until`: RFC 3339 (`2026-11-25T18:03:24Z`) or Unix milliseconds.
pub(crate) fn parse_time_ms(s: &str) -> Result<i64, String> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.timestamp_millis())
        .map_err(|e| format!("not RFC 3339 (2026-11-25T18:03:24Z) nor Unix milliseconds: {e}"))
}

/// Which dead letters a `dlq` command takes.
#[derive(Debug, Clone, Args)]
pub struct DlqFilter {
    /// Only messages with this x-imattr-error-code.
    #[arg(long)]
    pub(crate) code: Option<i64>,
    /// Only messages with this reason (broker:… for those RabbitMQ dead-lettered itself).
    #[arg(long, value_parser = crate::dlq::REASONS)]
    pub(crate) reason: Option<String>,
    /// Only messages about this account.
    #[arg(long)]
    pub(crate) account: Option<String>,
    /// Only messages whose error text or body contains TEXT.
    #[arg(long, value_name = "TEXT")]
    pub(crate) grep: Option<String>,
    /// Only messages that failed at or after this time (RFC 3339 or Unix ms).
    #[arg(long, value_parser = parse_time_ms, value_name = "TIME")]
    pub(crate) since: Option<i64>,
    /// Only messages that failed at or before this time (RFC 3339 or Unix ms).
    #[arg(long, value_parser = parse_time_ms, value_name = "TIME")]
    pub(crate) until: Option<i64>,
}

impl From<DlqFilter> for crate::dlq::Filter {
    fn from(f: DlqFilter) -> Self {
        crate::dlq::Filter {
            code: f.code,
            reason: f.reason,
            account: f.account,
            grep: f.grep,
            since_ms: f.since,
            until_ms: f.until,
            ids: None,
            before_id: None,
        }
    }
}

/// `imattr console`.
#[derive(Debug, Args)]
pub struct ConsoleArgs {
    /// Address to listen on (default console.listen, else admin.listen).
    #[arg(long)]
    pub(crate) listen: Option<SocketAddr>,
    /// Read a password on stdin, print its argon2 hash for
    /// console.password_hash, and exit.
    #[arg(long, conflicts_with = "listen")]
    pub(crate) hash_password: bool,
}

/// `imattr simulate`.
#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:18080")]
    pub(crate) listen: SocketAddr,
    /// Probability of answering 91000.
    #[arg(long, default_value_t = 0.0)]
    pub(crate) fail_rate: f64,
    /// Latency per request, `MS` or `MIN..MAX`.
    #[arg(long, default_value = "0", value_parser = parse_latency)]
    pub(crate) latency_ms: (u64, u64),
    /// Requests per second per API before 60007 (0 turns it off).
    #[arg(long, default_value_t = 100)]
    pub(crate) rate_limit: u32,
    /// `strict`: at most --rate-limit admitted requests in any sliding
    /// 1-second window; `lenient`: a token bucket (bursts, then the rate).
    #[arg(long, default_value = "strict")]
    pub(crate) rate_limit_mode: crate::simulator::RateLimitMode,
    /// `per_api`: --rate-limit for each API on its own; `shared`: one
    /// budget for all of them (im_set_attr and im_remove_attr together).
    #[arg(long, default_value = "per_api")]
    pub(crate) rate_limit_scope: crate::config::RateLimitScope,
    /// Probability of answering HTTP 500.
    #[arg(long, default_value_t = 0.0)]
    pub(crate) http_error_rate: f64,
    /// Answer 91000 to every im_set_attr or im_remove_attr holding this
    /// account (repeatable).
    #[arg(long)]
    pub(crate) fail_account: Vec<String>,
    /// Answer 90033 to every im_set_attr or im_remove_attr holding this
    /// account (repeatable).
    #[arg(long)]
    pub(crate) reject_account: Vec<String>,
    /// Accounts per im_set_attr or im_remove_attr before 90018.
    #[arg(long, default_value_t = 100)]
    pub(crate) max_accounts: usize,
    /// Answer 90033 whenever this attribute appears (repeatable).
    #[arg(long)]
    pub(crate) reject_attr: Vec<String>,
    /// Answer every request with 90009.
    #[arg(long)]
    pub(crate) misconfigured: bool,
    /// Attribute names registered at start, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub(crate) attr_names: Vec<String>,
    /// Seed of the fault injection.
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
}

/// Parses `MS` or `MIN..MAX`.
pub(crate) fn parse_latency(s: &str) -> Result<(u64, u64), String> {
    let bad = || format!("takes MS or MIN..MAX, e.g. 5..20 (got {s:?})");
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
pub(crate) async fn shutdown_signal() {
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
pub(crate) fn cancel_on_signal() -> CancellationToken {
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
            let mut buf = Vec::new();
            clap_complete::generate(*shell, &mut cli, "imattr", &mut buf);
            Some(out.write_all(&buf).and_then(|()| out.flush()))
        }
        Command::Man => Some(crate::manpage::render(cli, out).and_then(|()| out.flush())),
        _ => None,
    }
}

/// Standard output that tells a reader gone away (`imattr … | head`) from
/// other write errors: its `BrokenPipe` errors carry [`StdoutClosed`], which
/// `main` turns into a quiet exit 0.
pub fn stdout() -> ClosedAware<std::io::StdoutLock<'static>> {
    ClosedAware(std::io::stdout().lock())
}

/// [`stdout`] unlocked, for writers that must be `Send` (it locks per write:
/// wrap it in a `BufWriter`).
pub fn stdout_send() -> ClosedAware<std::io::Stdout> {
    ClosedAware(std::io::stdout())
}

/// The reader of standard output has gone away.
#[derive(Debug, thiserror::Error)]
#[error("standard output was closed")]
pub struct StdoutClosed;

/// See [`stdout`].
#[derive(Debug)]
pub struct ClosedAware<W>(W);

impl<W: Write> ClosedAware<W> {
    fn mark(e: std::io::Error) -> std::io::Error {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::io::Error::new(std::io::ErrorKind::BrokenPipe, StdoutClosed)
        } else {
            e
        }
    }
}

impl<W: Write> Write for ClosedAware<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf).map_err(Self::mark)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush().map_err(Self::mark)
    }
}

/// Whether `e` (or what caused it) is standard output closed by its reader.
pub fn is_stdout_closed(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<StdoutClosed>() {
            return true;
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.get_ref().is_some_and(|inner| inner.is::<StdoutClosed>()) {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

/// Runs a command; `file` is the configuration file `config` was loaded
/// from, if any.
pub async fn dispatch(
    command: Command,
    config: Config,
    file: Option<PathBuf>,
) -> anyhow::Result<()> {
    match command {
        Command::Run => crate::cmd::run::run(config).await,
        Command::Config { check } => crate::cmd::config::run(&config, file, check),
        Command::Declare => crate::cmd::declare::run(&config).await,
        Command::Sig { identifier } => crate::cmd::sig::run(&config, identifier),
        Command::Get { accounts } => crate::cmd::get::run(&config, &accounts).await,
        Command::Simulate(a) => crate::cmd::simulate::run(a, &config).await,
        Command::Publish(a) => crate::cmd::publish::run(a, &config).await,
        Command::Dlq(c) => crate::cmd::dlq::run(c, &config).await,
        Command::Console(a) => crate::cmd::console::run(a, &config).await,
        Command::Demo => crate::demo::run(config).await,
        Command::Bench {
            quick,
            json,
            only,
            dead_letters,
            rounds,
        } => {
            crate::bench::run(
                config,
                quick,
                json,
                only,
                dead_letters,
                rounds.map(usize::from),
            )
            .await
        }
        Command::BenchConsumer { count } => crate::bench::bare_consumer(&config, count).await,
        Command::Completions { .. } | Command::Man => write_generated(&command, &mut stdout())
            .unwrap_or(Ok(()))
            .context("writing to stdout"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_stdout_is_told_apart() {
        struct Closed;
        impl Write for Closed {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let e = writeln!(ClosedAware(Closed), "x").unwrap_err();
        assert!(is_stdout_closed(&e));
        let wrapped = anyhow::Error::new(e).context("writing the table");
        assert!(is_stdout_closed(wrapped.as_ref()));
        // A broken pipe elsewhere (the broker's socket) is a failure.
        let socket = std::io::Error::from(std::io::ErrorKind::BrokenPipe);
        assert!(!is_stdout_closed(&socket));
    }

    #[test]
    fn attr_takes_name_equals_value() {
        assert_eq!(parse_attr("a=b=c").unwrap(), ("a".into(), "b=c".into()));
        assert_eq!(parse_attr("a=").unwrap(), ("a".into(), String::new()));
        assert!(parse_attr("sex").unwrap_err().contains("NAME=VALUE"));
    }

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
