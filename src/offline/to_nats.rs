//! `import --to-nats`: an export (one partition's file of `export --partitions`) loaded into
//! that partition's empty JetStream stream, through the log writing ahead to it as a cluster
//! node's does: each batch is one stream message, applied to the node's local replica
//! (`<data_dir>/cluster/p<N>`) only once JetStream acknowledged it; then the replica is verified.

use std::io::BufRead;
use std::path::PathBuf;
use std::sync::Arc;

use herald_cluster::offline::{connect, open_empty_stream};
use herald_cluster::StreamWriteAhead;

use super::from_nats::client_runtime;
use super::import::{import_into, open_empty, Import};
use super::{verify, ImportReport, OfflineError, PartitionId, Progress, VerifyOptions};

/// Where [`import_to_nats`] loads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsImportOptions {
    /// The NATS servers (comma-separated `nats://host:port`, as `[cluster] nats_url`).
    pub nats_url: String,
    /// The partition whose stream (which must hold no message) takes the log.
    pub partition: PartitionId,
    /// The cluster's data partitions (`[cluster] partitions`, what `export --partitions` split
    /// by): stored in `herald-meta` if the cluster has no count yet, else it must be that.
    pub partitions: u32,
    /// Copies JetStream keeps of the stream if this creates it (`[cluster] replicas`).
    pub replicas: usize,
    /// A cluster node's data directory: the partition's replica goes in
    /// `<data_dir>/cluster/p<N>` (or `cluster/control`), which must hold no log yet.
    pub data_dir: PathBuf,
}

/// Loads the export read from `input` into the partition's stream and the node's replica of
/// it, checking that every record gets the seq and hash the export says (as [`import`](super::import)).
pub fn import_to_nats(
    options: &NatsImportOptions,
    input: &mut dyn BufRead,
    progress: &mut dyn Progress,
) -> Result<ImportReport, OfflineError> {
    let stream_error = |error| OfflineError::Stream { stream: options.partition.stream_name(), error };
    let dir = options.partition.dir(&options.data_dir);
    let store = open_empty(&dir)?;
    // The log's writer thread blocks on the publishes, which this runtime's worker drives.
    let runtime = client_runtime(options.partition)?;
    let stream = runtime.block_on(async {
        let js = connect(&options.nats_url).await?;
        open_empty_stream(&js, options.partition, options.partitions, options.replicas).await
    });
    let stream = stream.map_err(stream_error)?;
    let write_ahead = Arc::new(StreamWriteAhead::new(stream, runtime.handle().clone(), 0));
    let import = Import::new(store, Some(write_ahead)).of_partition(options.partition, options.partitions);
    let records = import_into(import, input, progress)?;
    let verified = verify(&VerifyOptions::new(dir), progress)?;
    Ok(ImportReport { records, verified })
}
