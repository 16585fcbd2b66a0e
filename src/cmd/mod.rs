//! One module per command; `cli::dispatch` calls them.

pub(crate) mod config;
pub(crate) mod console;
pub(crate) mod declare;
pub(crate) mod dlq;
pub(crate) mod get;
pub(crate) mod publish;
pub(crate) mod run;
pub(crate) mod sig;
pub(crate) mod simulate;
