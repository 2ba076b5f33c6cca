//! The partitions a node serves together with the NATS runtime their logs write ahead on,
//! owned by one value so that they close in the right order: every log first (its writer
//! blocks on that runtime for each publish), then the runtime.

use std::collections::BTreeMap;
use std::time::Duration;

use herald_log::Machine;

use crate::takeover::Owned;

/// The NATS runtime and the partitions served on it. Dropping it closes each partition's log
/// (its write-ahead stopped, its writer waited for up to `close_within`), then shuts the
/// runtime down (waiting up to `close_within` for its tasks): it never waits on a runtime that
/// is gone, so it ends within about twice `close_within` per partition at most.
pub struct Partitions<M: Machine> {
    owned: BTreeMap<u32, Owned<M>>,
    runtime: Option<tokio::runtime::Runtime>,
    close_within: Duration,
}

impl<M: Machine> Partitions<M> {
    /// Takes `runtime` (the one the NATS client and every partition's write-ahead run on).
    pub fn new(runtime: tokio::runtime::Runtime, close_within: Duration) -> Partitions<M> {
        Partitions { owned: BTreeMap::new(), runtime: Some(runtime), close_within }
    }

    /// The runtime's handle: for connecting, taking partitions over, renewing leases.
    pub fn handle(&self) -> tokio::runtime::Handle {
        self.runtime.as_ref().expect("the runtime lives until the drop").handle().clone()
    }

    /// Serves `partition` with `owned`; one it replaces is closed first.
    pub fn insert(&mut self, partition: u32, owned: Owned<M>) {
        if let Some(before) = self.owned.insert(partition, owned) {
            before.close(self.close_within);
        }
    }

    pub fn get(&self, partition: u32) -> Option<&Owned<M>> {
        self.owned.get(&partition)
    }

    /// The partitions served, in order.
    pub fn served(&self) -> Vec<u32> {
        self.owned.keys().copied().collect()
    }

    /// Stops serving `partition` (a hand-back or a step-down): closes its log while the
    /// runtime runs. Returns whether it was served and its writer stopped in time.
    pub fn close(&mut self, partition: u32) -> bool {
        self.owned.remove(&partition).is_some_and(|owned| owned.close(self.close_within))
    }
}

impl<M: Machine> Drop for Partitions<M> {
    fn drop(&mut self) {
        for owned in std::mem::take(&mut self.owned).into_values() {
            owned.close(self.close_within);
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(self.close_within);
        }
    }
}
