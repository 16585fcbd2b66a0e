//! imattr: keeps Tencent Cloud Chat user attributes in sync from RabbitMQ events.
#![warn(missing_docs)]

pub mod config;
pub mod tencent;
pub mod coalesce;
pub mod update;
