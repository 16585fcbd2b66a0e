//! Scenario 10: draining sets and removals together into a strict API whose
//! budget of 100 requests/s the two APIs share (the default
//! `tencent.rate_limit_scope`). Each account first gets both attributes set,
//! then one of: a new value, a removal, or both in one message; a batch then
//! sends an `im_set_attr` and an `im_remove_attr` request.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use crate::config::Config;

use super::harness::{drained_at, sandbox_for, states_match, CEILING};
use super::process::SimProcess;
use super::report::{fig, state_figure, target, Figure};
use super::Sizes;

/// Message `i` of `2 x accounts`: the first pass sets `n` and `m`; the
/// second sets `n`, removes `m`, or both, by turns.
fn body(i: usize, accounts: usize) -> Vec<u8> {
    let account = format!("acc{:06}", i % accounts);
    let attrs = if i < accounts {
        format!(r#"{{"n":"{i}","m":"{i}"}}"#)
    } else {
        match i % 3 {
            0 => format!(r#"{{"n":"{i}"}}"#),
            1 => r#"{"m":null}"#.to_string(),
            _ => format!(r#"{{"n":"{i}","m":null}}"#),
        }
    };
    format!(r#"{{"To_Account":"{account}","Attrs":{attrs}}}"#).into_bytes()
}

fn expected(accounts: usize) -> HashMap<String, BTreeMap<String, String>> {
    (accounts..2 * accounts)
        .map(|i| {
            let first = i - accounts;
            let attrs = match i % 3 {
                0 => [("n", i), ("m", first)].as_slice().to_vec(),
                1 => vec![("n", first)],
                _ => vec![("n", i)],
            };
            (
                format!("acc{:06}", i % accounts),
                attrs
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
        })
        .collect()
}

pub(super) async fn run(base: &Config, s: &Sizes) -> anyhow::Result<Vec<Figure>> {
    let name = "10 sets and removals";
    let latency_ms = 50;
    let sim = SimProcess::start(&[
        "--rate-limit",
        "100",
        "--rate-limit-mode",
        "strict",
        "--rate-limit-scope",
        "shared",
        "--latency-ms",
        &latency_ms.to_string(),
        "--attr-names",
        "m",
    ])
    .await?;
    let mut sb = sandbox_for(base, &sim, |c| {
        c.attributes.allowed.push("m".into());
    })
    .await?;
    let accounts = s.api_updates / 2;
    for i in 0..2 * accounts {
        sb.publish(body(i, accounts)).await?;
    }
    sb.confirm().await?;
    let started = Instant::now();
    sb.start_worker();
    let done = drained_at(&sb, std::time::Duration::from_secs(900)).await?;
    let secs = (done - started).as_secs_f64();
    let stats = sim.stats().await?;
    let state = sim.state().await?;
    let expected = expected(accounts);
    let correct = states_match(&state, &expected) && state.len() == expected.len();
    sb.cleanup().await?;
    sim.stop().await;

    let sets = stats.total("im_set_attr") as f64;
    let removes = stats.total("im_remove_attr") as f64;
    let refused = (stats.count("im_set_attr", 60007) + stats.count("im_remove_attr", 60007)) as f64;
    let requests = (sets + removes).max(1.0);
    let entries = (stats.accounts_written + stats.accounts_removed) as f64;
    let at = format!("{latency_ms} ms");
    Ok(vec![
        fig(
            name,
            &format!("{at}: messages per second"),
            (2 * accounts) as f64 / secs,
            "msgs/s",
        ),
        fig(
            name,
            &format!("{at}: account entries (set + removed) per second, of the ceiling"),
            entries / secs / CEILING,
            "ratio",
        ),
        fig(
            name,
            &format!("{at}: im_set_attr requests"),
            sets,
            "requests",
        ),
        fig(
            name,
            &format!("{at}: im_remove_attr requests"),
            removes,
            "requests",
        ),
        fig(
            name,
            &format!("{at}: mean accounts per request"),
            entries / requests,
            "accounts",
        ),
        target(
            fig(
                name,
                &format!("{at}: requests refused for rate (60007), both APIs"),
                refused / requests * 100.0,
                "%",
            ),
            "<= 0.1%",
            refused / requests <= 0.001,
        ),
        target(
            fig(
                name,
                &format!("{at}: an account in two requests at once"),
                stats.overlapping_account_requests as f64,
                "times",
            ),
            "0",
            stats.overlapping_account_requests == 0,
        ),
        state_figure(name, correct),
    ])
}
