//! imattr: keeps Tencent Cloud Chat user attributes in sync from RabbitMQ events.
#![warn(missing_docs)]

pub mod config;
pub mod tencent;
pub mod coalesce;
pub mod update;
pub mod simulator;
pub mod amqp;
pub mod worker;
pub mod publish;
pub mod telemetry;
pub mod dlq;
pub mod admin;
pub mod bench;
pub mod cli;
pub mod demo;
pub mod sandbox;
