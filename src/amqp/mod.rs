//! RabbitMQ: connecting, topology, acknowledgement tracking and dead-lettering.

pub mod connect;
pub mod consume;
pub mod deadletter;
pub mod nodes;
pub mod topology;
