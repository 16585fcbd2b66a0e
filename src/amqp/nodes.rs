//! Several broker URLs (nodes of one cluster): which one to try next. A thin
//! layer over [`topology::connect`], which connects to one URL.

use lapin::Connection;
use tracing::debug;

use crate::amqp::topology::{self, ConnectError};
use crate::config::AmqpConfig;

/// Connects to the first node of `cfg.url` that answers, in the listed
/// order (the tools: `publish`, `dlq`, …). The error is the last node's.
pub(crate) async fn connect_first(
    cfg: &AmqpConfig,
    name: &str,
) -> Result<Connection, ConnectError> {
    let mut nodes = Nodes::new(cfg);
    let mut last = None;
    for _ in 0..nodes.len() {
        let (index, node) = nodes.next_node();
        match topology::connect(node, name).await {
            Ok(conn) => return Ok(conn),
            Err(e) => {
                debug!(node = index, error = %e, "Cannot connect to this broker node; trying the next");
                last = Some(e);
            }
        }
    }
    match last {
        Some(e) => Err(e),
        // No node listed (validation refuses that): try the URL as it is.
        None => topology::connect(cfg, name).await,
    }
}

/// The nodes in turn: each connection attempt takes the next one, wrapping
/// around, so a worker whose node went away tries another one first.
#[derive(Debug, Clone)]
pub(crate) struct Nodes {
    nodes: Vec<AmqpConfig>,
    next: usize,
}

impl Nodes {
    /// The nodes of `cfg.url`, starting with the first.
    pub(crate) fn new(cfg: &AmqpConfig) -> Nodes {
        let mut nodes = cfg.nodes();
        if nodes.is_empty() {
            nodes.push(cfg.clone());
        }
        Nodes { nodes, next: 0 }
    }

    pub(crate) fn len(&self) -> usize {
        self.nodes.len()
    }

    /// The node to try now (its index and its one-URL configuration); the
    /// following call returns the one after it.
    pub(crate) fn next_node(&mut self) -> (usize, &AmqpConfig) {
        let i = self.next % self.nodes.len();
        self.next = (i + 1) % self.nodes.len();
        (i, &self.nodes[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AmqpUrl;

    #[test]
    fn attempts_rotate_through_the_nodes() {
        let cfg = AmqpConfig {
            url: AmqpUrl::new("amqp://u:p@a/%2f,amqp://u:p@b/%2f,amqp://u:p@c/%2f"),
            ..AmqpConfig::default()
        };
        let mut n = Nodes::new(&cfg);
        assert_eq!(n.len(), 3);
        let seen: Vec<(usize, String)> = (0..7)
            .map(|_| {
                let (i, c) = n.next_node();
                (i, c.url.expose().to_string())
            })
            .collect();
        let idx: Vec<usize> = seen.iter().map(|(i, _)| *i).collect();
        assert_eq!(idx, vec![0, 1, 2, 0, 1, 2, 0]);
        assert_eq!(seen[1].1, "amqp://u:p@b/%2f");

        let mut one = Nodes::new(&AmqpConfig::default());
        assert_eq!(one.len(), 1);
        assert_eq!(one.next_node().0, 0);
        assert_eq!(one.next_node().0, 0);
    }
}
