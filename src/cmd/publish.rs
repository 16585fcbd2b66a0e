//! `imattr publish`: one update from flags, or NDJSON from a file, with publisher confirms.

use std::io::BufRead;

use anyhow::Context;

use crate::cli::PublishArgs;
use crate::config::Config;
use crate::update::{self, Rules};

pub(crate) async fn run(a: PublishArgs, config: &Config) -> anyhow::Result<()> {
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
    crate::amqp::topology::declare(&conn, &ch, &config.amqp).await?;
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
