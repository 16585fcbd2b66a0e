//! Publishing updates with pipelined publisher confirms (`imattr publish`,
//! the demo and the benchmarks).

use std::collections::VecDeque;

use anyhow::Context;
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel, Confirmation, PublisherConfirm};

/// How many publishes may await their confirm at once.
pub(crate) const CONFIRM_WINDOW: usize = 4096;

/// The properties publishers should use (docs/messages.md): JSON, persistent.
pub fn update_properties() -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_timestamp(crate::tencent::usersig::unix_now())
}

/// A publisher on a channel in confirm mode that keeps up to
/// `CONFIRM_WINDOW` confirms outstanding. It publishes as `mandatory`: a
/// message the exchange routes to no queue comes back and is an error, not
/// a silent loss.
pub struct Publisher {
    channel: Channel,
    exchange: String,
    pending: VecDeque<PublisherConfirm>,
    confirmed: u64,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("exchange", &self.exchange)
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl Publisher {
    /// Publishes to `exchange` on a new confirm-mode channel of `conn`.
    pub async fn new(conn: &lapin::Connection, exchange: &str) -> anyhow::Result<Publisher> {
        Ok(Publisher {
            channel: crate::amqp::topology::confirm_channel(conn).await?,
            exchange: exchange.to_string(),
            pending: VecDeque::new(),
            confirmed: 0,
        })
    }

    /// Publishes one message; waits only when the confirm window is full.
    pub async fn publish(
        &mut self,
        routing_key: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> anyhow::Result<()> {
        if self.pending.len() >= CONFIRM_WINDOW {
            self.wait_one().await?;
        }
        let confirm = self
            .channel
            .basic_publish(
                self.exchange.as_str().into(),
                lapin::types::ShortString::try_new(routing_key).unwrap_or_default(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                props,
            )
            .await
            .context("publishing")?;
        self.pending.push_back(confirm);
        Ok(())
    }

    async fn wait_one(&mut self) -> anyhow::Result<()> {
        if let Some(c) = self.pending.pop_front() {
            match c.await.context("waiting for a publisher confirm")? {
                Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_)) => anyhow::bail!(
                    "exchange {} routes the message to no queue (312 NO_ROUTE); nothing \
                     receives it: start `imattr run`, or run `imattr declare`, to declare and \
                     bind the updates queue ({} message(s) were published before it)",
                    self.exchange,
                    self.confirmed
                ),
                Confirmation::Nack(None) => {
                    anyhow::bail!("the broker refused (nacked) a message")
                }
                _ => self.confirmed += 1,
            }
        }
        Ok(())
    }

    /// Waits for every outstanding confirm; returns how many were confirmed in all.
    pub async fn finish(&mut self) -> anyhow::Result<u64> {
        while !self.pending.is_empty() {
            self.wait_one().await?;
        }
        Ok(self.confirmed)
    }
}
