//! `imattr simulate`: the built-in API simulator as a process of its own.

use anyhow::Context;

use std::io::Write;

use crate::cli::{shutdown_signal, SimulateArgs};
use crate::config::Config;
use crate::simulator::{Faults, SimOptions, Simulator};

pub(crate) async fn run(a: SimulateArgs, config: &Config) -> anyhow::Result<()> {
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
            latency_ms: a.latency_ms,
            rate_limit: a.rate_limit,
            rate_limit_mode: a.rate_limit_mode,
            rate_limit_scope: a.rate_limit_scope,
            max_accounts: a.max_accounts,
            reject_attrs: a.reject_attr,
            misconfigured: a.misconfigured,
            fail_accounts: a.fail_account,
            reject_accounts: a.reject_account,
        },
        ..SimOptions::default()
    };
    let (sdkappid, identifier) = (opts.sdkappid, opts.identifier.clone());
    let sim = Simulator::start(opts)
        .await
        .with_context(|| format!("listening on {}", a.listen))?;
    // First line on stdout, so a parent process can read the bound port.
    let mut out = crate::cli::stdout();
    writeln!(out, "listening on {}", sim.url())
        .and_then(|()| out.flush())
        .context("writing to stdout")?;
    drop(out);
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
