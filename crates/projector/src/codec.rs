//! The one value encoding of the projection and of events: bincode 2 through serde, with the
//! standard configuration. It is deterministic, so rebuilding gives byte-identical tables.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The most bytes one event or one stored value may hold. Decoding claims every length prefix
/// against it before allocating, so damaged bytes cannot ask for a huge allocation.
pub const DECODE_BYTES_MAX: usize = 16 * 1024 * 1024;

type DecodeConfig = bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<DECODE_BYTES_MAX>,
>;

fn encode_config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// The same encoding, with the limit (a limit changes no byte of the format).
pub(crate) fn decode_config() -> DecodeConfig {
    bincode::config::standard().with_limit::<DECODE_BYTES_MAX>()
}

pub(crate) fn to_bytes<T: Serialize>(value: &T) -> Vec<u8> {
    // Our types have no map with non-string keys, no unsized sequence and no custom serializer
    // that can fail, so encoding into a Vec cannot fail.
    match bincode::serde::encode_to_vec(value, encode_config()) {
        Ok(bytes) => bytes,
        Err(e) => unreachable!("bincode cannot fail to encode a projector value: {e}"),
    }
}

/// Appends `value`'s bytes to `out` (no buffer of its own: an event's payload is copied once).
pub(crate) fn write_bytes<T: Serialize>(value: &T, out: &mut Vec<u8>) {
    // As above; and writing into a Vec cannot fail either.
    if let Err(e) = bincode::serde::encode_into_std_write(value, out, encode_config()) {
        unreachable!("bincode cannot fail to encode a projector value: {e}")
    }
}

/// The value at the front of `bytes` and how many bytes it took (more may follow).
pub(crate) fn prefix<T: DeserializeOwned>(bytes: &[u8]) -> Option<(T, usize)> {
    bincode::serde::decode_from_slice::<T, _>(bytes, decode_config()).ok()
}

/// The value in `bytes`, or `None` when they are not one (or hold more).
pub(crate) fn from_bytes<T: DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    match bincode::serde::decode_from_slice::<T, _>(bytes, decode_config()) {
        Ok((value, read)) if read == bytes.len() => Some(value),
        _ => None,
    }
}
