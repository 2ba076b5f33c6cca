//! `compact`: the history of deliveries delivered longer ago than the retention dropped from a
//! stopped server's log; and `vacuum`, the store rewritten so the space of what was dropped
//! comes back.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use herald_log::{Log, LogConfig};
use herald_projector::compact::{plan, Compactor};
use herald_projector::CompactReport;

use super::{last_seq, now_ms, open_existing, ts, OfflineError, Progress, CACHE_BYTES};

/// What [`compact`] drops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactOptions {
    /// The data directory of a stopped server.
    pub data_dir: PathBuf,
    /// How long a delivered delivery's history is kept.
    pub retain: Duration,
    /// Now, in unix milliseconds: what is older than `now_ms - retain` goes.
    pub now_ms: u64,
}

impl CompactOptions {
    /// Options for a compaction as of the system clock's now.
    pub fn now(data_dir: PathBuf, retain: Duration) -> CompactOptions {
        CompactOptions { data_dir, retain, now_ms: now_ms() }
    }
}

/// What [`compact`] dropped, all passes together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompactSummary {
    /// What was older than this (unix milliseconds) could go.
    pub cutoff_ms: u64,
    pub dropped: CompactReport,
}

impl fmt::Display for CompactSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let total = &self.dropped;
        match total.records_dropped {
            0 => write!(f, "nothing to compact: no record is older than {}", ts(self.cutoff_ms)),
            n => write!(
                f,
                "dropped {n} records (through seq {}), {} delivered deliveries and {} events older than {}",
                total.through_seq,
                total.deliveries_dropped,
                total.events_dropped,
                ts(self.cutoff_ms)
            ),
        }
    }
}

/// Drops the history of deliveries delivered more than `options.retain` ago, in passes of at
/// most [`herald_engine::COMPACT_PASS_RECORDS`] records.
pub fn compact(
    options: &CompactOptions,
    progress: &mut dyn Progress,
) -> Result<CompactSummary, OfflineError> {
    let store = open_existing(&options.data_dir)?;
    let now_ms = options.now_ms;
    let cutoff_ms = now_ms.saturating_sub(u64::try_from(options.retain.as_millis()).unwrap_or(u64::MAX));
    // It writes: a store an earlier version left is converted first, as `herald serve` would.
    herald_projector::compact::drop_legacy(store.clone()).map_err(OfflineError::Compact)?;
    herald_log::upgrade_format(store.as_ref()).map_err(OfflineError::Log)?;
    let log = Log::open(store.clone(), Compactor, LogConfig::default()).map_err(OfflineError::Log)?;
    progress.begin("compacting", last_seq(store.as_ref())?);
    let mut total = CompactReport::default();
    loop {
        let plan = plan(store.as_ref(), cutoff_ms, herald_engine::COMPACT_PASS_RECORDS)
            .map_err(OfflineError::Compact)?;
        let Some(plan) = plan else { break };
        let report = log
            .submit((now_ms, Box::new(plan)))
            .map_err(OfflineError::Log)?
            .map_err(OfflineError::Compact)?;
        total.records_dropped += report.records_dropped;
        total.deliveries_dropped += report.deliveries_dropped;
        total.events_dropped += report.events_dropped;
        total.through_seq = report.through_seq;
        progress.advance(report.through_seq);
    }
    progress.end();
    log.close();
    Ok(CompactSummary { cutoff_ms, dropped: total })
}

/// What [`vacuum`] rewrites.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VacuumOptions {
    /// The data directory of a stopped server.
    pub data_dir: PathBuf,
}

/// What [`vacuum`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VacuumSummary {
    /// The pairs copied into the fresh store.
    pub pairs: u64,
    pub bytes_before: u64,
    pub bytes_after: u64,
}

impl fmt::Display for VacuumSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        write!(
            f,
            "vacuumed: {} pairs rewritten; {:.1} MiB on disk before, {:.1} MiB after",
            self.pairs,
            mib(self.bytes_before),
            mib(self.bytes_after)
        )
    }
}

/// Rewrites the store so the space of dropped data comes back.
pub fn vacuum(options: &VacuumOptions, progress: &mut dyn Progress) -> Result<VacuumSummary, OfflineError> {
    let dir = &options.data_dir;
    drop(open_existing(dir)?);
    progress.begin("vacuuming (pairs)", 0);
    let report = herald_log::vacuum(dir, CACHE_BYTES, &mut |pairs| progress.advance(pairs))
        .map_err(OfflineError::Vacuum)?;
    progress.end();
    Ok(VacuumSummary {
        pairs: report.pairs,
        bytes_before: report.bytes_before,
        bytes_after: report.bytes_after,
    })
}
