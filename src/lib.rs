//! herald: a webhook delivery engine in one binary.
//!
//! This crate is the embedding facade. Today it re-exports the durable log ([`log`]);
//! the engine's `Engine::open(config)` comes with the engine crate.

pub use herald_log as log;
