//! imattr: keeps Tencent Cloud Chat user attributes in sync from RabbitMQ events.
#![warn(missing_docs)]

pub mod admin;
pub mod amqp;
pub(crate) mod attrnames;
pub mod bench;
pub mod cli;
mod cmd;
pub mod coalesce;
pub mod config;
pub mod console;
pub(crate) mod demo;
pub mod dlq;
pub(crate) mod fence;
pub(crate) mod health;
pub(crate) mod manpage;
pub mod publish;
pub(crate) mod retry;
pub mod sandbox;
pub mod simulator;
pub mod telemetry;
pub mod tencent;
pub mod update;
pub(crate) mod wait;
pub mod worker;
