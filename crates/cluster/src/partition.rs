//! Which partition an organisation lives in, and the names its stream and subject take.

use herald_projector::OrgId;

/// The partition of `org` among `partitions` (at least 1):
/// `u64::from_be_bytes(blake3(org_id)[..8]) % partitions`, hashed over the organisation id's
/// 16 UUID bytes, not its text: the text has more than one spelling (upper or lower case, with
/// or without hyphens), the bytes one, so every node and tool finds the same partition.
pub fn partition_of(org: &OrgId, partitions: u32) -> u32 {
    let hash = blake3::hash(org.0.as_bytes());
    let first: [u8; 8] = hash.as_bytes()[..8].try_into().expect("a blake3 hash has 32 bytes");
    (u64::from_be_bytes(first) % u64::from(partitions.max(1))) as u32
}

/// The control partition's stream (every API key; every node follows it).
pub const CONTROL_STREAM: &str = "HERALD_CONTROL";

/// The subject the control partition's batches are published on.
pub const CONTROL_SUBJECT: &str = "herald.control";

/// The control partition's key in the lease bucket.
pub const CONTROL_LEASE_KEY: &str = "p.control";

/// The JetStream stream that is partition `n`'s write-ahead.
pub fn stream_name(n: u32) -> String {
    format!("HERALD_P{n}")
}

/// The subject partition `n`'s batches are published on.
pub fn subject(n: u32) -> String {
    format!("herald.p.{n}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn org(text: &str) -> OrgId {
        OrgId(uuid::Uuid::parse_str(text).unwrap())
    }

    #[test]
    fn the_partition_is_the_first_eight_bytes_of_the_blake3_of_the_uuid_bytes_modulo_partitions() {
        let id = org("0192f3a4-5b6c-7d8e-9f00-112233445566");
        let hash = blake3::hash(&id.0.into_bytes());
        let expected = u64::from_be_bytes(hash.as_bytes()[..8].try_into().unwrap());
        for partitions in [1u32, 2, 3, 16, 1000] {
            assert_eq!(u64::from(partition_of(&id, partitions)), expected % u64::from(partitions));
        }
        // The same id spelt otherwise is the same organisation, in the same partition.
        assert_eq!(partition_of(&org("0192F3A4-5B6C-7D8E-9F00-112233445566"), 16), partition_of(&id, 16));
        assert_eq!(partition_of(&org("0192f3a45b6c7d8e9f00112233445566"), 16), partition_of(&id, 16));
    }

    #[test]
    fn organisations_spread_over_every_partition() {
        let mut counts = [0u32; 16];
        for i in 0..1600u128 {
            counts[partition_of(&OrgId(uuid::Uuid::from_u128(i * 7919 + 1)), 16) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| (60..=140).contains(&c)), "{counts:?}");
        assert_eq!(partition_of(&OrgId(uuid::Uuid::nil()), 0), 0, "0 partitions is read as 1");
    }

    #[test]
    fn names() {
        assert_eq!(stream_name(7), "HERALD_P7");
        assert_eq!(subject(7), "herald.p.7");
    }
}
