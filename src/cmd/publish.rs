//! `imattr publish`: one update from flags, or NDJSON from a file, with
//! publisher confirms; `--dry-run` checks without publishing.

use std::collections::HashSet;
use std::io::{BufRead, Write};

use anyhow::Context;

use crate::cli::{PublishArgs, UsageError};
use crate::config::Config;
use crate::update::{self, Rules};

pub(crate) async fn run(a: PublishArgs, config: &Config) -> anyhow::Result<()> {
    // The worker checks names against the app's (docs/messages.md); here only
    // `attributes.allowed` is known, without asking the API.
    let allowed: Option<HashSet<String>> = (!config.attributes.allowed.is_empty())
        .then(|| config.attributes.allowed.iter().cloned().collect());
    let rules = Rules {
        max_value_bytes: config.attributes.max_value_bytes,
        allowed: allowed.as_ref(),
    };
    // (routing key, body)
    let mut messages: Vec<(String, Vec<u8>)> = Vec::new();
    if let Some(account) = a.account {
        // In the documented field order: the values in the order given,
        // then the removals (`null`) in the order given.
        let mut body = format!(
            "{{\"To_Account\":{},\"Attrs\":{{",
            serde_json::to_string(&account)?
        );
        let ops = a
            .attr
            .iter()
            .map(|(k, v)| (k, Some(v)))
            .chain(a.remove.iter().map(|k| (k, None)));
        for (i, (k, v)) in ops.enumerate() {
            if i > 0 {
                body.push(',');
            }
            body.push_str(&serde_json::to_string(k)?);
            body.push(':');
            match v {
                Some(v) => body.push_str(&serde_json::to_string(v)?),
                None => body.push_str("null"),
            }
        }
        body.push_str("}}");
        let body = body.into_bytes();
        // The arguments break a rule: bad usage, status 2.
        let updates =
            update::parse(&body, &rules).map_err(|e| UsageError(format!("invalid update: {e}")))?;
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
                    "{} invalid line(s); nothing {} (use --skip-invalid to publish the valid ones)",
                    invalid.len(),
                    if a.dry_run {
                        "would be published"
                    } else {
                        "published"
                    }
                );
            }
            eprintln!("skipping {} invalid line(s)", invalid.len());
        }
    } else {
        // clap requires one of them.
        return Err(UsageError(
            "give --account A with --attr k=v or --remove NAME, or --file PATH".into(),
        )
        .into());
    }
    let mut out = crate::cli::stdout();
    if a.dry_run {
        writeln!(out, "would publish {}", messages.len())?;
        return Ok(());
    }
    let conn = crate::amqp::nodes::connect_first(&config.amqp, "imattr publish").await?;
    let published = async {
        let ch = conn.create_channel().await.context("opening a channel")?;
        // The exchange only: which queues it feeds is for `imattr run` (or
        // `imattr declare`) to set up; a message nothing receives is refused
        // (mandatory) rather than lost.
        crate::amqp::topology::declare_exchange(&ch, &config.amqp.exchange).await?;
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
        let n = p.finish().await;
        bar.finish_and_clear();
        n
    }
    .await;
    let _ = conn.close(200, "done".into()).await;
    writeln!(out, "published {}", published?)?;
    Ok(())
}
