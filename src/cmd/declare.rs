//! `imattr declare`: the topology `imattr run` declares, and nothing else.

use std::io::Write;

use anyhow::Context;

use crate::config::Config;

pub(crate) async fn run(config: &Config) -> anyhow::Result<()> {
    let a = &config.amqp;
    let conn = crate::amqp::nodes::connect_first(a, "imattr declare").await?;
    let declared = async {
        let ch = conn.create_channel().await.context("opening a channel")?;
        crate::amqp::topology::declare(&conn, &ch, a).await
    }
    .await;
    let _ = conn.close(200, "done".into()).await;
    declared?;
    let mut out = crate::cli::stdout();
    writeln!(
        out,
        "declared exchange {} bound to queue {} ({}{}), exchange {} bound to queue {}",
        a.exchange,
        a.queue,
        a.queue_type,
        if a.single_active_consumer {
            ", single active consumer"
        } else {
            ""
        },
        a.dead_letter_exchange,
        a.dead_letter_queue
    )?;
    Ok(())
}
