//! Which partition an organisation lives in, how a partition is named ([`PartitionId`]: `3` or
//! `control`, its directory in a node's data directory), and the names its stream and subject take.

use std::fmt;
use std::path::{Path, PathBuf};

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

/// The directory, inside a node's `[store] data_dir`, that holds its partitions' stores.
pub const CLUSTER_DIR: &str = "cluster";

/// A partition as the offline tools name it: data partition `n`, or the control partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PartitionId {
    Data(u32),
    Control,
}

impl PartitionId {
    /// Partition `partition` in the numbering the node uses: `0..partitions` are data
    /// partitions, `partitions` is the control partition.
    pub fn of(partition: u32, partitions: u32) -> PartitionId {
        match partition == partitions {
            true => PartitionId::Control,
            false => PartitionId::Data(partition),
        }
    }

    /// `control`, or a data partition's number.
    pub fn parse(text: &str) -> Result<PartitionId, String> {
        match text.trim() {
            "control" => Ok(PartitionId::Control),
            n => n.parse().map(PartitionId::Data).map_err(|_| {
                format!("{text:?} is not a partition: give its number (0, 1, ...) or `control`")
            }),
        }
    }

    /// As `--partition` takes it: its number, or `control`.
    pub fn arg(&self) -> String {
        match self {
            PartitionId::Data(n) => n.to_string(),
            PartitionId::Control => "control".into(),
        }
    }

    /// Its directory's name in `<data_dir>/cluster/`: `p<n>` or `control`.
    pub fn dir_name(&self) -> String {
        match self {
            PartitionId::Data(n) => format!("p{n}"),
            PartitionId::Control => "control".into(),
        }
    }

    /// Its store in the node whose data directory is `data_dir`: `<data_dir>/cluster/p<n>` or
    /// `<data_dir>/cluster/control`.
    pub fn dir(&self, data_dir: &Path) -> PathBuf {
        data_dir.join(CLUSTER_DIR).join(self.dir_name())
    }

    /// Its JetStream stream: `HERALD_P<n>` or `HERALD_CONTROL`.
    pub fn stream_name(&self) -> String {
        match self {
            PartitionId::Data(n) => stream_name(*n),
            PartitionId::Control => CONTROL_STREAM.into(),
        }
    }
}

impl fmt::Display for PartitionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PartitionId::Data(n) => write!(f, "partition {n}"),
            PartitionId::Control => f.write_str("the control partition"),
        }
    }
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

    #[test]
    fn partitions_are_named_by_number_or_control() {
        assert_eq!(PartitionId::parse("3"), Ok(PartitionId::Data(3)));
        assert_eq!(PartitionId::parse("control"), Ok(PartitionId::Control));
        assert!(PartitionId::parse("-1").unwrap_err().contains("control"));
        assert!(PartitionId::parse("p3").is_err());
        let dir = Path::new("/data");
        assert_eq!(PartitionId::Data(3).dir(dir), Path::new("/data/cluster/p3"));
        assert_eq!(PartitionId::Control.dir(dir), Path::new("/data/cluster/control"));
        assert_eq!(PartitionId::Data(3).stream_name(), "HERALD_P3");
        assert_eq!(PartitionId::Control.stream_name(), "HERALD_CONTROL");
        assert_eq!(PartitionId::of(4, 4), PartitionId::Control);
        assert_eq!(PartitionId::of(3, 4), PartitionId::Data(3));
        assert_eq!(PartitionId::of(4, 4).arg(), "control");
    }
}
