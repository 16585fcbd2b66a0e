//! Tencent Cloud Chat: the REST client, UserSig and the meaning of answers.

pub mod client;
pub mod errors;
pub mod ratelimit;
pub mod usersig;

pub use client::Client;
pub use errors::{classify, Class, Reply};
pub use usersig::Signer;
