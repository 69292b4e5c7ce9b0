//! Names of the metrics the aggregate stage emits.

/// Records appended to the write-ahead log.
pub const WAL_RECORDS: &str = "fleetlake_wal_records_total";
/// Bytes appended to the write-ahead log.
pub const WAL_BYTES: &str = "fleetlake_wal_bytes_total";
/// Seconds per WAL fsync (one per group commit).
pub const WAL_SYNC_SECONDS: &str = "fleetlake_wal_fsync_duration_seconds";
/// Seconds per WAL group commit: appends, segment rotation, fsync.
pub const WAL_GROUP_SECONDS: &str = "fleetlake_wal_group_commit_duration_seconds";
/// WAL group commits that failed (nothing of them acknowledged, cut off the log).
pub const WAL_FAILURES: &str = "fleetlake_wal_failures_total";
/// Seconds per lake commit of a flush (Parquet upload and Delta log entry), by `table`.
pub const COMMIT_SECONDS: &str = "fleetlake_lake_commit_duration_seconds";
/// Distinct series in the last flush, by `table`.
pub const FLUSHED_SERIES: &str = "fleetlake_hot_buffer_flushed_series";
/// Series whose latest committed time the buffer tracks (for redelivery checks), by
/// `table`.
pub const TRACKED_SERIES: &str = "fleetlake_hot_buffer_tracked_series";
/// Requests that shared one WAL group commit.
pub const WAL_GROUP_SIZE: &str = "fleetlake_wal_group_commit_size";
/// Rows dropped as already buffered or already in the lake, by `table` and `stage`.
pub const DUPLICATES: &str = "fleetlake_aggregate_duplicate_rows_total";
/// Rows in the hot buffer, by `table`.
pub const BUFFER_ROWS: &str = "fleetlake_hot_buffer_rows";
/// Bytes held by the hot buffer.
pub const BUFFER_BYTES: &str = "fleetlake_hot_buffer_bytes";
/// Rows committed to the lake, by `table`.
pub const FLUSHED_ROWS: &str = "fleetlake_lake_rows_committed_total";
/// Seconds per flush (check, sort, write, commit).
pub const FLUSH_SECONDS: &str = "fleetlake_lake_flush_duration_seconds";
/// Flushes that failed and will be retried.
pub const FLUSH_FAILURES: &str = "fleetlake_lake_flush_failures_total";
/// Day partitions rewritten by compaction, by `table`.
pub const COMPACTED_PARTITIONS: &str = "fleetlake_lake_compacted_partitions_total";
/// Compaction runs that failed (retried at the next interval), by `table`.
pub const COMPACTION_FAILURES: &str = "fleetlake_lake_compaction_failures_total";
/// Partial roll-up rows appended, by `table` (`metrics_5m`, `metrics_1h`).
pub const ROLLUP_ROWS: &str = "fleetlake_rollup_rows_total";
/// Roll-up runs that failed (retried at the next interval).
pub const ROLLUP_FAILURES: &str = "fleetlake_rollup_failures_total";
/// Data files removed by retention, by `table`.
pub const RETENTION_FILES: &str = "fleetlake_retention_removed_files_total";
/// Writes refused because the hot buffer is full.
pub const REJECTED_FULL: &str = "fleetlake_aggregate_rejected_full_total";
/// Writes refused because the lake refuses commits.
pub const REJECTED_UNHEALTHY: &str = "fleetlake_aggregate_rejected_unhealthy_total";
/// Writes refused because the hot buffer holds its byte limit.
pub const REJECTED_MEMORY: &str = "fleetlake_aggregate_rejected_memory_total";
/// The process's resident memory, sampled each second.
pub const RESIDENT_BYTES: &str = "fleetlake_resident_memory_bytes";
/// 1 while a stage works, 0 while it fails, by `stage` (`wal`, `lake`).
pub const STAGE_UP: &str = "fleetlake_stage_up";

/// Rows of other writers' commits handed to the feed, by `table`.
pub const TAILED_ROWS: &str = "fleetlake_lake_followed_rows_total";
/// Failed reads of other writers' commits (tried again a second later), by `table`.
pub const TAIL_FAILURES: &str = "fleetlake_lake_follow_failures_total";
/// Other writers' commits whose rows could not be read one at a time (gone from the
/// log, or their files vacuumed), by `table`: state kept from commits reads the lake
/// again.
pub const TAIL_LOST: &str = "fleetlake_lake_follow_lost_commits_total";

/// Rows of other instances mirrored before their commit, by `table` (see `peers`).
pub const MIRRORED_ROWS: &str = "fleetlake_peer_mirrored_rows_total";
/// Rows mirrored now and not yet committed, by `table`.
pub const MIRROR_ROWS: &str = "fleetlake_peer_mirror_rows";
/// Rows this instance published for the others before committing them, by `table`.
pub const PUBLISHED_ROWS: &str = "fleetlake_peer_published_rows_total";
/// Failed writes of published rows (kept and tried again a second later), by `table`.
pub const PUBLISH_FAILURES: &str = "fleetlake_peer_publish_failures_total";
/// Rows other instances published that this one holds too (a retry sent to both),
/// left out of the mirror or taken out of it: they count once, as this instance's, by
/// `table`.
pub const LEFT_OUT_ROWS: &str = "fleetlake_peer_left_out_rows_total";
/// Flushes asked for early because another writer's commit holds rows this instance
/// holds too (its flush takes its copies back), by `table`.
pub const EARLY_FLUSHES: &str = "fleetlake_peer_early_flushes_total";
/// Mirrored rows taken back because their instance's run went silent, by `table`.
pub const FORGOTTEN_ROWS: &str = "fleetlake_peer_forgotten_rows_total";
/// Failed reads of other instances' published rows (tried again a second later).
pub const MIRROR_FAILURES: &str = "fleetlake_peer_mirror_failures_total";

/// Registers descriptions for the aggregate metrics.
pub fn describe() {
    metrics::describe_counter!(
        COMPACTED_PARTITIONS,
        "Day partitions rewritten by compaction"
    );
    metrics::describe_counter!(COMPACTION_FAILURES, "Compaction runs that failed");
    metrics::describe_counter!(
        TAILED_ROWS,
        "Rows of other writers' commits handed to incremental alert evaluation"
    );
    metrics::describe_counter!(
        TAIL_FAILURES,
        "Failed reads of other writers' commits (tried again a second later)"
    );
    metrics::describe_counter!(
        TAIL_LOST,
        "Other writers' commits whose rows could not be read one at a time (log cleaned up, files vacuumed); incremental state reads the lake again"
    );
    metrics::describe_counter!(
        MIRRORED_ROWS,
        "Rows other instances published before their commit, mirrored here"
    );
    metrics::describe_gauge!(
        MIRROR_ROWS,
        "Mirrored rows of other instances not yet committed"
    );
    metrics::describe_counter!(
        PUBLISHED_ROWS,
        "Rows published for other instances before this one commits them"
    );
    metrics::describe_counter!(
        PUBLISH_FAILURES,
        "Failed writes of published rows (kept and tried again)"
    );
    metrics::describe_counter!(
        FORGOTTEN_ROWS,
        "Mirrored rows taken back because their instance went silent"
    );
    metrics::describe_counter!(
        LEFT_OUT_ROWS,
        "Rows other instances published that this one holds too, left out of the mirror or taken out of it: counted once, as this one's"
    );
    metrics::describe_counter!(
        EARLY_FLUSHES,
        "Flushes asked for early because another writer's commit holds rows this instance holds too"
    );
    metrics::describe_counter!(
        MIRROR_FAILURES,
        "Failed reads of other instances' published rows (tried again)"
    );
    metrics::describe_counter!(ROLLUP_ROWS, "Partial roll-up rows appended");
    metrics::describe_counter!(ROLLUP_FAILURES, "Roll-up runs that failed");
    metrics::describe_counter!(RETENTION_FILES, "Data files removed by retention");
    metrics::describe_counter!(WAL_RECORDS, "Records appended to the write-ahead log");
    metrics::describe_counter!(WAL_BYTES, "Bytes appended to the write-ahead log");
    metrics::describe_histogram!(WAL_SYNC_SECONDS, "Seconds per WAL fsync");
    metrics::describe_histogram!(
        WAL_GROUP_SECONDS,
        "Seconds per WAL group commit (appends, rotation, fsync)"
    );
    metrics::describe_counter!(WAL_FAILURES, "WAL group commits that failed");
    metrics::describe_histogram!(
        COMMIT_SECONDS,
        "Seconds per lake commit of a flush (Parquet upload and Delta log entry)"
    );
    metrics::describe_gauge!(FLUSHED_SERIES, "Distinct series in the last flush");
    metrics::describe_gauge!(
        TRACKED_SERIES,
        "Series whose latest committed time the hot buffer tracks"
    );
    metrics::describe_histogram!(WAL_GROUP_SIZE, "Writes sharing one WAL fsync");
    metrics::describe_counter!(DUPLICATES, "Rows dropped as duplicates (redeliveries)");
    metrics::describe_gauge!(BUFFER_ROWS, "Rows in the hot buffer");
    metrics::describe_gauge!(BUFFER_BYTES, "Bytes held by the hot buffer");
    metrics::describe_counter!(FLUSHED_ROWS, "Rows committed to the lake");
    metrics::describe_histogram!(FLUSH_SECONDS, "Seconds per lake flush");
    metrics::describe_counter!(FLUSH_FAILURES, "Lake flushes that failed");
    metrics::describe_counter!(
        REJECTED_UNHEALTHY,
        "Writes refused because the lake refuses commits"
    );
    metrics::describe_counter!(
        REJECTED_MEMORY,
        "Writes refused because the hot buffer holds its byte limit"
    );
    metrics::describe_gauge!(RESIDENT_BYTES, "Resident memory of the process");
    metrics::describe_gauge!(
        STAGE_UP,
        "1 while the stage (wal, lake) works, 0 while it fails"
    );
    metrics::describe_counter!(
        REJECTED_FULL,
        "Writes refused because the hot buffer is full"
    );
}
