//! Maintenance in the background: retention, compaction (and vacuum) of every table, and
//! the roll-ups of `metrics` into `metrics_5m` and `metrics_1h`.
//!
//! Maintenance works on its own handles of the tables, never the flush's: merging files
//! takes as long as it takes while flushes go on. Its commits to `metrics`, `logs` and
//! `dead_letters` pass through each table's [`CommitGate`](crate::lake::CommitGate),
//! held only for the commit itself. (The roll-up tables have no flush whose visibility
//! depends on knowing their versions; their writers rely on Delta's conflict checks.)
//! Compaction commits are no-data-change rewrites of files it read, so appends committed
//! meanwhile never conflict with them.

use std::sync::Weak;
use std::time::Duration;

use tracing::{info, warn};

use crate::lake::TableLake;
use crate::metrics as m;
use crate::rollup::{Roller, Rollup};
use crate::{CompactionConfig, Shared};

/// Applies retention to and compacts every table each interval, until the aggregator
/// is gone.
pub(crate) async fn compaction_loop(shared: Weak<Shared>, config: CompactionConfig) {
    let mut tables: Vec<(TableLake, &'static str)> = Vec::new();
    let Some(clock) = shared.upgrade().map(|s| std::sync::Arc::clone(&s.clock)) else {
        return;
    };
    loop {
        tokio::time::sleep(config.interval).await;
        let Some(strong) = shared.upgrade() else {
            return;
        };
        if tables.is_empty() {
            match open_handles(&strong).await {
                Ok(opened) => tables = opened,
                Err(error) => {
                    warn!(%error, "cannot open the lake's tables for maintenance; retrying at the next interval");
                    continue;
                }
            }
        }
        // Not kept alive across a run: a stopping aggregator is not held up.
        drop(strong);
        for (lake, name) in &mut tables {
            maintain(lake, name, &config, clock.now()).await;
        }
    }
}

/// Maintenance's own handles: every lake table (through its commit gate) and, when
/// roll-ups run, the roll-up tables.
async fn open_handles(
    shared: &Shared,
) -> Result<Vec<(TableLake, &'static str)>, crate::lake::LakeError> {
    let mut out = Vec::new();
    for slot in &shared.tables {
        let lake = TableLake::open_or_create(
            &shared.config.lake_location,
            slot.table,
            shared.config.lake.clone(),
            &shared.writer_id,
        )
        .await?
        .with_commit_gate(std::sync::Arc::clone(&slot.gate));
        let lake = match &shared.wrap {
            Some(wrap) => lake.wrap_lake(|store| wrap(slot.table.name(), store)),
            None => lake,
        };
        out.push((lake, slot.table.name()));
    }
    if shared.config.rollup_interval.is_some() {
        for rollup in Rollup::ALL {
            let lake = TableLake::open_rollup(
                &shared.config.lake_location,
                rollup,
                shared.config.lake.clone(),
            )
            .await?;
            out.push((lake, rollup.name()));
        }
    }
    Ok(out)
}

/// Retention, then compaction (and vacuum) of one table.
async fn maintain(
    lake: &mut TableLake,
    name: &'static str,
    config: &CompactionConfig,
    now: std::time::SystemTime,
) {
    if let Some(keep) = config.retention.get(name) {
        match lake.apply_retention(*keep, now).await {
            Ok(files) => {
                ::metrics::counter!(m::RETENTION_FILES, "table" => name).increment(files as u64)
            }
            Err(error) => {
                ::metrics::counter!(m::COMPACTION_FAILURES, "table" => name).increment(1);
                warn!(table = name, %error, "retention failed; retrying at the next interval");
            }
        }
    }
    match lake.compact(config.min_files, config.vacuum_grace).await {
        Ok(stats) => {
            if stats.partitions > 0 {
                ::metrics::counter!(m::COMPACTED_PARTITIONS, "table" => name)
                    .increment(stats.partitions as u64);
                info!(
                    table = name,
                    partitions = stats.partitions,
                    files_before = stats.files_before,
                    files_after = stats.files_after,
                    vacuumed = stats.vacuumed,
                    "compacted lake table"
                );
            }
        }
        Err(error) => {
            ::metrics::counter!(m::COMPACTION_FAILURES, "table" => name).increment(1);
            warn!(table = name, %error, "compaction failed; retrying at the next interval");
        }
    }
}

/// Rolls new `metrics` commits up into `metrics_5m` and `metrics_1h` each interval,
/// until the aggregator is gone.
pub(crate) async fn rollup_loop(shared: Weak<Shared>, interval: Duration, mut roller: Roller) {
    loop {
        tokio::time::sleep(interval).await;
        if shared.strong_count() == 0 {
            return;
        }
        match roller.roll().await {
            Ok(stats) => {
                for (table, rows) in &stats.rows {
                    ::metrics::counter!(m::ROLLUP_ROWS, "table" => *table).increment(*rows as u64);
                }
                if !stats.versions.is_empty() {
                    info!(rows = ?stats.rows, versions = ?stats.versions, "rolled up metrics");
                }
            }
            Err(error) => {
                ::metrics::counter!(m::ROLLUP_FAILURES).increment(1);
                warn!(%error, "roll-up failed; retrying at the next interval");
            }
        }
    }
}
