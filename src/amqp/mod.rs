//! RabbitMQ: connecting, topology, acknowledgement tracking and dead-lettering.

pub(crate) mod connect;
pub(crate) mod consume;
pub mod deadletter;
pub mod headerblob;
pub mod inbox;
pub(crate) mod nodes;
pub(crate) mod readgate;
pub mod stream;
pub(crate) mod tls;
pub mod topology;
