//! `imattr dlq`: list, show, stats, export, replay, delete and purge the
//! dead-letter store.

use std::io::{IsTerminal, Write};

use anyhow::Context;

use crate::cli::{cancel_on_signal, DlqCommand, UsageError};
use crate::config::Config;
use crate::dlq::{Dlq, Filter, Progress, ReplayOptions, Table};

/// Who a ledger entry says resolved it.
fn by() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "?".into());
    format!("imattr dlq ({user})")
}

pub(crate) async fn run(c: DlqCommand, config: &Config) -> anyhow::Result<()> {
    if let DlqCommand::Migrate = c {
        // Before `Dlq::open`: the old queue is what it migrates.
        return crate::dlq::migrate::run_command(config).await;
    }
    let queue = config.amqp.dead_letter_queue.clone();
    match &c {
        DlqCommand::Purge { yes: false, .. } => {
            // clap requires --yes; this stays as a second lock.
            return Err(UsageError(format!(
                "refusing to delete every dead letter of {queue} without --yes"
            ))
            .into());
        }
        DlqCommand::Delete { ids, filter }
            if ids.is_empty() && Filter::from(filter.clone()).is_empty() =>
        {
            return Err(UsageError(
                "dlq delete needs ids or at least one filter (`dlq purge --yes` deletes every dead letter)"
                    .into(),
            )
            .into());
        }
        _ => {}
    }
    let cancel = cancel_on_signal();
    let q = Dlq::open(config).await?;
    let result = command(&q, c, &queue, cancel).await;
    q.close().await;
    result
}

async fn interruptible<T>(
    cancel: &tokio_util::sync::CancellationToken,
    f: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::select! {
        r = f => r,
        () = cancel.cancelled() => anyhow::bail!("interrupted; nothing was changed, nothing was lost"),
    }
}

async fn command(
    q: &Dlq,
    c: DlqCommand,
    queue: &str,
    cancel: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    match c {
        DlqCommand::List {
            limit,
            after,
            json,
            wide,
            resolved,
            filter,
        } => {
            let mut out = std::io::BufWriter::new(crate::cli::stdout_send());
            let mut table = if wide {
                Table::wide()
            } else {
                Table::default()
            };
            let next = interruptible(
                &cancel,
                q.list(&filter.into(), after, limit, resolved, &mut |v| {
                    if json {
                        serde_json::to_writer(&mut out, &v)?;
                        out.write_all(b"\n")?;
                    } else {
                        table.push(&mut out, &v)?;
                    }
                    Ok(())
                }),
            )
            .await?;
            if !json && !table.finish(&mut out)? {
                writeln!(out, "no dead letters in {queue} match")?;
            }
            out.flush()?;
            if let Some(n) = next {
                // On stderr, so that `--json` output stays NDJSON.
                eprintln!("more: next page with --after {n}");
            }
        }
        DlqCommand::Show { id } => {
            let v = interruptible(&cancel, q.show(id)).await?;
            let mut out = crate::cli::stdout();
            match v {
                Some(v) => writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?,
                None => return Err(UsageError(format!("{queue} holds no dead letter {id}")).into()),
            }
        }
        DlqCommand::Stats {
            json,
            by,
            top,
            filter,
        } => {
            let report = interruptible(&cancel, q.stats_top(&filter.into(), top)).await?;
            let mut out = crate::cli::stdout();
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
            } else {
                report.print(&mut out, queue, by)?;
            }
        }
        DlqCommand::Export { out, filter } => {
            let mut w: Box<dyn Write + Send> = match &out {
                Some(p) => Box::new(std::io::BufWriter::with_capacity(
                    1 << 16,
                    std::fs::File::create(p)
                        .with_context(|| format!("creating {}", p.display()))?,
                )),
                None => Box::new(std::io::BufWriter::new(crate::cli::stdout_send())),
            };
            let n = interruptible(&cancel, q.export(&filter.into(), &mut *w)).await?;
            if out.is_some() {
                eprintln!("exported {n}");
            }
        }
        DlqCommand::Replay {
            limit,
            rate,
            ids,
            filter,
            dry_run,
            whole,
        } => {
            let mut filter: Filter = filter.into();
            if !ids.is_empty() {
                filter.ids = Some(ids);
            }
            let o = ReplayOptions {
                filter,
                limit,
                dry_run,
                whole,
                rate_per_sec: rate,
                cancel: cancel.clone(),
                by: by(),
            };
            let bar = if std::io::stderr().is_terminal() && !dry_run {
                let b = indicatif::ProgressBar::new(0);
                if let Ok(style) = indicatif::ProgressStyle::with_template(
                    "{bar:40} {pos}/{len} {per_sec} eta {eta} {msg}",
                ) {
                    b.set_style(style);
                }
                b
            } else {
                indicatif::ProgressBar::hidden()
            };
            let show = |p: &Progress| {
                bar.set_length(p.total);
                bar.set_position(p.moved + p.failed);
                if p.failed > 0 {
                    bar.set_message(format!("{} failed", p.failed));
                }
            };
            let r = q.replay(&o, &show).await;
            bar.finish_and_clear();
            let r = r?;
            let mut out = crate::cli::stdout();
            if dry_run {
                let would = limit.map_or(r.left, |l| r.left.min(l as u64));
                writeln!(out, "would replay {would}")?;
                return Ok(());
            }
            writeln!(
                out,
                "moved {}, left {}, failed {}",
                r.moved, r.left, r.failed
            )?;
            out.flush()?;
            if r.cancelled {
                anyhow::bail!(
                    "interrupted after {} replayed ({} left, {} failed); nothing was lost: run \
                     the same command again to go on",
                    r.moved,
                    r.left,
                    r.failed
                );
            }
            if r.failed > 0 {
                anyhow::bail!(
                    "{} dead letter(s) were not replayed and stay in the store: refused by \
                     amqp.exchange (unroutable or nacked), or not decodable; the log names each",
                    r.failed
                );
            }
        }
        DlqCommand::Delete { ids, filter } => {
            let mut filter: Filter = filter.into();
            if !ids.is_empty() {
                filter.ids = Some(ids);
            }
            let n = q.delete(&filter, &by()).await?;
            writeln!(crate::cli::stdout(), "deleted {n}")?;
        }
        DlqCommand::Purge { filter, .. } => {
            let n = q.delete(&filter.into(), &by()).await?;
            writeln!(crate::cli::stdout(), "purged {n}")?;
        }
        // `run` migrates before opening the store.
        DlqCommand::Migrate => anyhow::bail!("dlq migrate runs before the store is opened"),
    }
    Ok(())
}
