//! `imattr`: parse the command line, load the configuration, set up logging, dispatch.

use std::process::ExitCode;

use clap::Parser;
use imattr::amqp::topology::QueueMismatch;
use imattr::cli::{dispatch, is_stdout_closed, write_generated, Cli, UsageError};
use imattr::config::{Config, ConfigError};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version are "errors" that print to stdout and
            // exit 0; a closed stdout then changes nothing.
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    if let Some(written) = write_generated(&cli.command, &mut imattr::cli::stdout()) {
        return match written {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) if is_stdout_closed(&e) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("imattr: writing to stdout: {e}");
                ExitCode::from(1)
            }
        };
    }
    let file = imattr::config::config_file(cli.config.as_deref())
        .map(|f| std::fs::canonicalize(&f).unwrap_or(f));
    let mut config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("imattr: {e}");
            return ExitCode::from(2);
        }
    };
    let mut log = config.log.clone();
    if matches!(
        cli.command,
        imattr::cli::Command::Demo | imattr::cli::Command::Bench { .. }
    ) {
        // The demo and the benchmarks print their own report.
        log.level = "warn".into();
    }
    imattr::telemetry::init(&log);
    config.log = log;
    // Two worker threads (one on a single core) unless TOKIO_WORKER_THREADS
    // says otherwise: against the bare consumer, two drained faster than one
    // in interleaved runs; more were not measured (BENCHMARKS.md, scenario 1).
    // The benchmark's reference consumer gets tokio's default, one per core.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let default_threads = match cli.command {
        imattr::cli::Command::BenchConsumer { .. } => cores,
        _ => cores.min(2),
    };
    let threads = std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or(default_threads);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("imattr: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(dispatch(cli.command, config, file));
    // Do not wait for stray background tasks (e.g. an open HTTP pool).
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // `imattr … | head`: the reader has what it wanted.
        Err(e) if is_stdout_closed(e.as_ref()) => ExitCode::SUCCESS,
        Err(e)
            if e.downcast_ref::<ConfigError>().is_some()
                || e.downcast_ref::<QueueMismatch>().is_some()
                || e.downcast_ref::<UsageError>().is_some() =>
        {
            eprintln!("imattr: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("imattr: {e:#}");
            ExitCode::from(1)
        }
    }
}
