//! RabbitMQ: topology, acknowledgement tracking and dead-lettering.

pub mod consume;
pub mod deadletter;
pub mod topology;
