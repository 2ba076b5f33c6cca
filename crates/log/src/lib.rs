//! herald-log: the durable, append-only, hash-chained log that every herald fact lives in.
//!
//! - [`Record`]: one entry — a gapless `seq`, `at_ms`, an opaque body (herald's versioned
//!   bincode events), a blake3 checksum and a blake3 chain hash over the record before.
//! - [`Log`]: the handle. One writer thread takes commands from a bounded crossbeam channel, runs
//!   each through a [`Machine`] (which appends records and stages projection writes in a [`Tx`]),
//!   writes the whole batch in one atomic store batch, flushes once, then answers every caller.
//!   A command is acknowledged only after that flush ([`Durability::Sync`] also fsyncs).
//! - [`Store`]: the seam to the disk. [`SledStore`] is the only code that names sled;
//!   [`MemStore`] serves unit tests and scratch rebuilds; with the `testing` feature,
//!   `FailingStore`, `VolatileStore` and `HeldStore` serve the failure tests.
//! - [`WriteAhead`]: the seam where a batch may be stored elsewhere first (herald's cluster
//!   mode), applied only once that succeeded; a fenced writer refuses everything after.
//! - Reading: [`Log::read`] a range from any seq, [`Log::tail`] to follow new records, [`verify`]
//!   over the whole chain with typed [`CorruptRecord`] errors that name the seq.
//!
//! ```
//! use std::sync::Arc;
//! use herald_log::{AppendOnly, Log, LogConfig, MemStore, verify};
//!
//! let store = Arc::new(MemStore::new());
//! let log = Log::open(store.clone(), AppendOnly, LogConfig::default()).unwrap();
//! let seqs = log.submit(vec![(1_700_000_000_000, b"hello".to_vec())]).unwrap().unwrap();
//! assert_eq!(seqs, vec![1]);
//! assert_eq!(log.read(1, 10).unwrap()[0].body, b"hello");
//! log.close();
//! assert_eq!(verify(store.as_ref(), &mut |_| {}).unwrap().last_seq, 1);
//! ```

// Namespaces of their own: the stored layout (`keyspace::USER_FIRST`, `record::head_key`), which
// the projection and the tests that damage a store on purpose name, and the benches' raw sled
// figures. The rest is private and re-exported below.
#[cfg(feature = "testing")]
pub mod baseline;
mod cache;
pub mod keyspace;
mod log;
pub mod record;
mod sled_store;
mod store;
#[cfg(any(test, feature = "testing"))]
mod testing;
mod tx;
mod write_ahead;
mod writer;

pub use crate::cache::{CacheStats, Cacheable, CachedStore, CACHE_ENTRY_OVERHEAD_BYTES};
pub use crate::log::{
    check_format, read_head, read_record, read_record_linked, read_records, restore_anchor, upgrade_format,
    verify, verify_paged, verify_paged_each, AfterFlush, AppendOnly, Head, Log, LogConfig, LogError, Machine,
    Outcome, Tail, VerifyReport, WriterStats, FLUSH_BUCKETS_US, RESUME_WAIT_FIRST, RESUME_WAIT_MAX,
    STORE_FORMAT, STORE_FORMAT_OLDEST,
};
pub use crate::record::{CorruptKind, CorruptRecord, Hash, Record};
pub use crate::sled_store::{vacuum, SledStore, VacuumReport, SEGMENT_BYTES};
pub use crate::store::{scan_vec, Durability, MemStore, Pair, Store, StoreError, Visit, WriteBatch};
#[cfg(feature = "testing")]
pub use crate::testing::{FailingStore, HeldStore, VolatileStore};
pub use crate::tx::{merge_staged, Tx};
pub use crate::write_ahead::{
    decode_records, encode_records, encoded_len, write_ahead_position, WriteAhead, WriteAheadError,
};
