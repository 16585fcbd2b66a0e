//! `imattr console`: the web console without a worker, or `--hash-password`.

use std::io::BufRead;

use anyhow::Context;

use crate::cli::{cancel_on_signal, ConsoleArgs, UsageError};
use crate::config::Config;

pub(crate) async fn run(args: ConsoleArgs, config: &Config) -> anyhow::Result<()> {
    if args.hash_password {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("reading the password from stdin")?;
        let password = line.trim_end_matches(['\r', '\n']);
        if password.is_empty() {
            return Err(UsageError("give the password on stdin (one line)".into()).into());
        }
        println!("{}", crate::console::auth::hash_password(password)?);
        return Ok(());
    }
    let listen = match args.listen {
        Some(a) => a,
        None => {
            let configured = if config.console.listen.is_empty() {
                &config.admin.listen
            } else {
                &config.console.listen
            };
            configured.parse().map_err(|_| {
                UsageError(
                    "no address to listen on: give --listen ADDR, or set console.listen".into(),
                )
            })?
        }
    };
    crate::console::serve_alone(config, listen, cancel_on_signal()).await
}
