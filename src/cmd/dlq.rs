//! `imattr dlq`: list, stats, export, replay and purge the dead-letter queue.

use std::io::Write;

use anyhow::Context;

use crate::cli::{cancel_on_signal, DlqCommand};
use crate::config::Config;

pub(crate) async fn run(c: DlqCommand, config: &Config) -> anyhow::Result<()> {
    use crate::dlq::{Dlq, ReplayOptions, Table};
    if let DlqCommand::Migrate = c {
        // Before `Dlq::open`: the old queue is what it migrates.
        return crate::dlq::migrate::run_command(config).await;
    }
    if let DlqCommand::Purge { yes: false, .. } = c {
        // clap requires --yes; this stays as a second lock.
        return Err(crate::cli::UsageError(format!(
            "refusing to delete every message of {} without --yes",
            config.amqp.dead_letter_queue
        ))
        .into());
    }
    let q = Dlq::open(config)
        .await?
        .with_cancel(cancel_on_signal())
        .with_progress(true);
    let queue = &config.amqp.dead_letter_queue;
    let result = async {
        match c {
            DlqCommand::List {
                limit,
                json,
                wide,
                filter,
            } => {
                let mut out = std::io::BufWriter::new(crate::cli::stdout());
                let mut table = if wide {
                    Table::wide()
                } else {
                    Table::default()
                };
                q.list(&filter.into(), limit, &mut |v| {
                    if json {
                        serde_json::to_writer(&mut out, &v)?;
                        out.write_all(b"\n")?;
                    } else {
                        table.push(&mut out, &v)?;
                    }
                    Ok(())
                })
                .await?;
                if !json && !table.finish(&mut out)? {
                    writeln!(out, "no dead letters in {queue} match")?;
                }
                out.flush()?;
            }
            DlqCommand::Stats { json, top } => {
                let report = q.stats().await?.report(top);
                let mut out = crate::cli::stdout();
                if json {
                    writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
                } else {
                    report.print(&mut out, queue)?;
                }
            }
            DlqCommand::Export { out, filter } => {
                let mut w: Box<dyn Write> = match &out {
                    Some(p) => Box::new(std::io::BufWriter::with_capacity(
                        1 << 16,
                        std::fs::File::create(p)
                            .with_context(|| format!("creating {}", p.display()))?,
                    )),
                    None => Box::new(std::io::BufWriter::new(crate::cli::stdout())),
                };
                let n = q.export(&filter.into(), &mut w).await?;
                if out.is_some() {
                    eprintln!("exported {n}");
                }
            }
            DlqCommand::Replay {
                limit,
                filter,
                dry_run,
                whole,
            } => {
                let o = ReplayOptions {
                    filter: filter.into(),
                    limit,
                    dry_run,
                    whole,
                };
                let n = q.replay(&o).await?;
                let mut out = crate::cli::stdout();
                if dry_run {
                    writeln!(out, "would replay {n}")?;
                } else {
                    writeln!(out, "replayed {n}")?;
                }
            }
            DlqCommand::Purge { filter, .. } => {
                let filter: crate::dlq::Filter = filter.into();
                let n = if filter.is_empty() {
                    u64::from(q.purge().await?)
                } else {
                    q.purge_matching(&filter).await?
                };
                writeln!(crate::cli::stdout(), "purged {n}")?;
            }
            DlqCommand::Migrate => unreachable!("handled before opening"),
        }
        anyhow::Ok(())
    }
    .await;
    q.close().await;
    result
}
