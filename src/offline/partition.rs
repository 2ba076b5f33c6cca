//! Which store an offline tool opens on a data directory: a single node's own, or, on a
//! cluster node's, one partition's (`--partition N` → `<data_dir>/cluster/p<N>`, `--partition
//! control` → `<data_dir>/cluster/control`), where each tool then works as on a single node.

use std::path::{Path, PathBuf};

pub use herald_cluster::offline::{PartitionId, CLUSTER_DIR};

use super::OfflineError;

/// The store to open in `data_dir`: `partition`'s directory, which must exist, or without a
/// partition `data_dir` itself, unless that is a cluster node's (a `cluster/` directory and no
/// store of its own), which holds no log of its own to work on.
pub fn partition_dir(data_dir: &Path, partition: Option<PartitionId>) -> Result<PathBuf, OfflineError> {
    match partition {
        Some(partition) => {
            let dir = partition.dir(data_dir);
            if dir.is_dir() {
                Ok(dir)
            } else {
                Err(OfflineError::NoPartition { partition, dir })
            }
        }
        None if is_cluster_node(data_dir) => {
            Err(OfflineError::ClusterNode { dir: data_dir.to_owned(), partitions: partitions_in(data_dir) })
        }
        None => Ok(data_dir.to_owned()),
    }
}

/// Whether `data_dir` is a cluster node's: its partitions under `cluster/`, no store of its own.
fn is_cluster_node(data_dir: &Path) -> bool {
    let own_store = data_dir.join("db").exists() || data_dir.join("conf").exists();
    data_dir.join(CLUSTER_DIR).is_dir() && !own_store
}

/// The partitions whose stores a cluster node's data directory holds, as `--partition` names
/// them: data partitions by number, then `control`.
fn partitions_in(data_dir: &Path) -> Vec<PartitionId> {
    let mut found: Vec<PartitionId> = std::fs::read_dir(data_dir.join(CLUSTER_DIR))
        .into_iter()
        .flatten()
        .filter_map(|entry| {
            let name = entry.ok()?.file_name().into_string().ok()?;
            match name.strip_prefix('p') {
                Some(n) => n.parse().ok().map(PartitionId::Data),
                None => (name == "control").then_some(PartitionId::Control),
            }
        })
        .collect();
    found.sort_by_key(|p| match p {
        PartitionId::Data(n) => u64::from(*n),
        PartitionId::Control => u64::MAX,
    });
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_is_its_directory_and_a_cluster_node_needs_one() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        // A single node's directory (or one not made yet) is used as it is.
        assert_eq!(partition_dir(root, None).unwrap(), root);
        std::fs::create_dir_all(root.join("cluster/p2")).unwrap();
        std::fs::create_dir_all(root.join("cluster/p10")).unwrap();
        std::fs::create_dir_all(root.join("cluster/control")).unwrap();
        assert_eq!(partition_dir(root, Some(PartitionId::Data(2))).unwrap(), root.join("cluster/p2"));
        assert_eq!(partition_dir(root, Some(PartitionId::Control)).unwrap(), root.join("cluster/control"));
        match partition_dir(root, Some(PartitionId::Data(3))) {
            Err(e @ OfflineError::NoPartition { .. }) => {
                assert!(e.to_string().contains(&root.join("cluster/p3").display().to_string()), "{e}");
                assert!(e.is_usage());
            }
            other => panic!("{other:?}"),
        }
        match partition_dir(root, None) {
            Err(e @ OfflineError::ClusterNode { .. }) => {
                let text = e.to_string();
                assert!(text.contains("--partition") && text.contains("2, 10, control"), "{text}");
                assert!(e.is_usage());
            }
            other => panic!("{other:?}"),
        }
        // A single node's store beside a `cluster/` directory is its own.
        std::fs::create_dir_all(root.join("db")).unwrap();
        assert_eq!(partition_dir(root, None).unwrap(), root);
    }
}
