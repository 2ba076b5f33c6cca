//! `export --from-nats`: a partition's log read straight from its JetStream stream, each
//! message's records checked and chained to the message before, written as the same NDJSON as
//! `export` of a data directory (the stream holds the whole log, from record 1).

use std::io::Write;

use herald_cluster::offline::{connect, StreamReader};
use herald_cluster::ClusterError;

use super::export::{write_record, write_redacted_note};
use super::{ExportReport, OfflineError, PartitionId, Progress};

/// What [`export_from_nats`] reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsExportOptions {
    /// The NATS servers (comma-separated `nats://host:port`, as `[cluster] nats_url`).
    pub nats_url: String,
    /// The partition whose stream to read.
    pub partition: PartitionId,
    /// As [`ExportOptions::redact_secrets`](super::ExportOptions::redact_secrets).
    pub redact_secrets: bool,
}

/// Writes `partition`'s log, read from its stream, as NDJSON on `out`: every record of every
/// message up to the stream's last when it was opened. A message whose records are damaged or
/// do not continue the ones before (seq, hash chain) stops it with an error naming the stream
/// message and the record.
pub fn export_from_nats(
    options: &NatsExportOptions,
    out: &mut dyn Write,
    progress: &mut dyn Progress,
) -> Result<ExportReport, OfflineError> {
    let stream_error = |error| OfflineError::Stream { stream: options.partition.stream_name(), error };
    let runtime = client_runtime(options.partition)?;
    runtime.block_on(async {
        let js = connect(&options.nats_url).await.map_err(stream_error)?;
        let mut reader = StreamReader::open(&js, options.partition).await.map_err(stream_error)?;
        progress.begin("exporting", reader.last_message());
        if options.redact_secrets {
            write_redacted_note(out)?;
        }
        let mut records = 0u64;
        while let Some((message, batch)) = reader.next().await.map_err(stream_error)? {
            for record in &batch {
                write_record(out, record, options.redact_secrets)?;
            }
            records += batch.len() as u64;
            progress.advance(message);
        }
        out.flush().map_err(OfflineError::Write)?;
        progress.end();
        Ok(ExportReport { records })
    })
}

/// The runtime the NATS client of a tool on `partition`'s stream runs on: one worker, which
/// drives the client also while another thread (a log's writer) blocks on it.
pub(super) fn client_runtime(partition: PartitionId) -> Result<tokio::runtime::Runtime, OfflineError> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().map_err(|e| {
        OfflineError::Stream {
            stream: partition.stream_name(),
            error: ClusterError::Nats(format!("starting the NATS client's runtime: {e}")),
        }
    })
}
