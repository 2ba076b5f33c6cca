//! herald: a webhook delivery engine in one binary.
//!
//! This crate is the embedding facade. Today it re-exports the durable log ([`log`]) and the
//! domain ([`projector`]); the engine's `Engine::open(config)` comes with the engine crate.

pub use herald_log as log;
pub use herald_projector as projector;
