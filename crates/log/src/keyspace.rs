//! The first byte of every key names its keyspace: the log's own, and the ones it leaves to the
//! projection, which lives in the same store so that one atomic batch commits both.

/// Record heads and continuation chunks, by seq.
pub const RECORD: u8 = 0x00;
/// The log's metadata: format version, anchor.
pub const META: u8 = 0x01;
/// The first keyspace byte the log leaves to its users (the projection); bytes below are the log's.
pub const USER_FIRST: u8 = 0x10;

/// Meta key of the store's on-disk format version.
pub const META_FORMAT: &[u8] = &[META, b'f'];
/// Meta key of the anchor: the seq and hash the kept log starts after (all zero when never compacted).
pub const META_ANCHOR: &[u8] = &[META, b'a'];
/// Meta key a recovering writer puts and deletes in one batch, to learn whether the store takes
/// writes again; it is never left in the store.
pub const META_PROBE: &[u8] = &[META, b'p'];
/// Meta key of the write-ahead's position after the last batch applied (see `WriteAhead`),
/// absent for a log that never had one.
pub const META_WRITE_AHEAD: &[u8] = &[META, b'w'];
