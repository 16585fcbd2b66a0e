//! Tencent Cloud Chat: the REST client, UserSig and the meaning of answers.

pub mod client;
pub(crate) mod door;
pub(crate) mod errors;
pub(crate) mod ratelimit;
pub mod tap;
pub mod usersig;

pub use client::Client;
pub use errors::{Class, Reply};
pub use usersig::Signer;
