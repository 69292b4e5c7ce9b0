//! The lake's Delta tables (`metrics`, `logs`, `dead_letters`): creation, flush
//! commits, and de-duplication checks.
//!
//! Each flush of a table is one Delta commit that also records, as application
//! transactions, the last write-ahead-log sequence number it covers ([`wal_app_id`])
//! and the latest row time in the table ([`max_time_app_id`]), both named after the
//! writer (the WAL directory's id), so that several instances, each with its own WAL,
//! commit to one lake without their transactions conflicting. On restart the WAL is
//! replayed, per table, after that table's committed sequence, so a crash between
//! commits or before WAL truncation neither loses nor doubles a row.
//!
//! Commits also carry, in their commit info ([`STREAM_POSITIONS_KEY`]), the positions
//! of replayable streams (Kinesis shards) that the table holds every row up to. A
//! Kinesis sequence number has up to 56 digits and does not fit a transaction's
//! version, so the commit info is where it goes; it is the same atomic commit.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::{SortColumn, concat_batches, lexsort_to_indices, take_record_batch};
use arrow::datatypes::TimestampMicrosecondType;
use datafusion::prelude::{SessionContext, col, lit};
use datafusion::scalar::ScalarValue;
use deltalake::kernel::StructType;
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
use deltalake::parquet::basic::{Compression, ZstdLevel};
use deltalake::parquet::file::properties::WriterProperties;
use deltalake::protocol::SaveMode;
use fleetlake_model::schema::{DAY_COLUMN, Table, col as c, conform, dead_col, logs_col};

use crate::location::LakeLocation;
use crate::rollup::Rollup;
use crate::store::{CommitMeta, DeltaLake, Lake, WriteSettings, operation};
use fleetlake_model::keys::{row_keys, scan_column};

/// Application id of the transaction action carrying the last WAL sequence `writer`
/// committed.
pub fn wal_app_id(writer: &str) -> String {
    format!("fleetlake.wal.{writer}")
}
/// Application id of the transaction action carrying the latest time (µs) `writer`
/// committed to a table.
pub fn max_time_app_id(table: Table, writer: &str) -> String {
    format!("fleetlake.{}.max_time_us.{writer}", table.name())
}

/// Commit-info key of the stream positions a commit covers: a JSON object of shard key
/// to sequence number (or `SHARD_END`), complete as of that commit.
pub const STREAM_POSITIONS_KEY: &str = "fleetlake.streamPositions";

/// What one compaction of a table did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompactStats {
    /// Groups of files merged, each one commit (one per day partition unless its
    /// small files add up to more than the target size, or number over 128).
    pub partitions: usize,
    /// Data files of those partitions before.
    pub files_before: usize,
    /// Data files of those partitions after.
    pub files_after: usize,
    /// Rows rewritten.
    pub rows: usize,
    /// Files deleted by the vacuum that followed.
    pub vacuumed: usize,
    /// Partitions left for the next run because another writer changed them meanwhile.
    pub conflicts: usize,
}

/// Another writer's commit as the tail reads it (see [`TableLake::others_commits`]).
#[derive(Debug)]
pub struct OtherCommit {
    /// Its version.
    pub version: i64,
    /// Who made it (its WAL id), if it says.
    pub writer: Option<String>,
    /// What of that writer's published rows it covers (see [`crate::peers`]).
    pub cover: Option<crate::peers::Cover>,
    /// The rows it added (none for a commit of positions only).
    pub rows: Vec<RecordBatch>,
    /// The de-duplication keys of each batch of `rows` (computed where the commit is
    /// read, off the writer's thread).
    pub points: Vec<Vec<u128>>,
    /// Why its rows could not be read, when they could not: the commit is gone from
    /// the log (cleaned up) or some of its files are (vacuumed after a compaction
    /// rewrote them). Its rows are in the lake, but not to be had one commit at a
    /// time: a reader keeping state from the commits must read the lake again.
    pub lost: Option<String>,
}

/// Commit-info key of the writer (WAL id) that made a flush commit.
pub const WRITER_KEY: &str = "fleetlake.writer";
/// Commit-info key of the latest row time (epoch µs) in the table after a flush commit.
pub const MAX_TIME_KEY: &str = "fleetlake.maxTime";

/// Memory a compaction merge may use before its sorts spill to disk. A merge of sorted
/// files holds a batch of each file at once: [`MERGE_MAX_FILES`] keeps that in bounds.
const MERGE_MEMORY_BYTES: usize = 1024 * 1024 * 1024;
/// Most files merged in one commit.
const MERGE_MAX_FILES: usize = 128;

/// How many commits back a writer looks, when it opens, for other writers' latest times.
const OTHERS_LOOKBACK: i64 = 256;

/// Commit-info key naming what a fleetlake commit did when it is not a flush
/// (`compact`, `retention`): such commits add or remove no datapoints.
pub const OPERATION_KEY: &str = "fleetlake.operation";

/// Whether `error` is a commit that lost to a concurrent one it conflicts with.
pub fn is_conflict(error: &deltalake::DeltaTableError) -> bool {
    use deltalake::kernel::transaction::TransactionError;
    matches!(
        error,
        deltalake::DeltaTableError::Transaction {
            source: TransactionError::CommitConflict(_) | TransactionError::MaxCommitAttempts(_)
        }
    )
}

/// Errors of the lake.
#[derive(Debug, thiserror::Error)]
pub enum LakeError {
    /// The Delta table could not be opened, read or written.
    #[error("lake table {table}: {source}")]
    Delta {
        /// The table's location.
        table: String,
        /// The error.
        #[source]
        source: Box<deltalake::DeltaTableError>,
    },
    /// A query against the table failed.
    #[error("lake table {table}: {source}")]
    Query {
        /// The table's location.
        table: String,
        /// The error.
        #[source]
        source: Box<datafusion::error::DataFusionError>,
    },
    /// Rows could not be arranged for writing.
    #[error("lake table {table}: {source}")]
    Arrow {
        /// The table's location.
        table: String,
        /// The error.
        #[source]
        source: arrow::error::ArrowError,
    },
    /// The writer (which owns the hot buffers and the WAL) has stopped.
    #[error("the write-ahead log writer has stopped")]
    WriterStopped,
}

/// Rows per row group unless configured (`lake.row_group_rows`).
pub const DEFAULT_ROW_GROUP_ROWS: usize = 1024 * 1024;

/// Settings for writing the lake.
#[derive(Debug, Clone)]
pub struct LakeOptions {
    /// Files are cut near this size.
    pub target_file_bytes: u64,
    /// zstd level of the Parquet files.
    pub zstd_level: i32,
    /// Rows per Parquet row group (the unit of pruning and of parallel scans).
    pub row_group_rows: usize,
}

impl Default for LakeOptions {
    fn default() -> Self {
        Self {
            target_file_bytes: 256 * 1024 * 1024,
            zstd_level: 3,
            row_group_rows: DEFAULT_ROW_GROUP_ROWS,
        }
    }
}

/// One lake table, open for writing.
#[derive(Debug)]
pub struct TableLake {
    kind: Table,
    /// The store behind the seam: delta-rs, or a fault injector in front of it.
    lake: Box<dyn Lake>,
    location: String,
    options: LakeOptions,
    writer: String,
    /// Set for a roll-up table (rows of the metrics schema, partial per bucket).
    rollup: Option<Rollup>,
    /// Commits up to this version were looked at for other writers' latest times.
    seen_version: i64,
    /// While other writers' commits are followed: the last version whose rows were
    /// handed on (see [`TableLake::others_commits`]).
    tailed: Option<i64>,
    /// Shared with the process's other handles of this table (see [`CommitGate`]):
    /// this handle's maintenance commits (compaction, retention, vacuum) go through it.
    gate: Option<Arc<CommitGate>>,
}

/// A point where a test can hold compaction: after it rewrote its files, before it
/// commits them.
#[cfg(test)]
pub(crate) mod pause {
    use std::sync::OnceLock;

    use tokio::sync::Notify;

    /// Once set: compaction says when it reached the point, then waits to be let go.
    pub(crate) static MERGE: OnceLock<(Notify, Notify)> = OnceLock::new();

    pub(super) async fn before_merge_commit() {
        if let Some((reached, go)) = MERGE.get() {
            reached.notify_one();
            go.notified().await;
        }
    }
}

/// Orders the commits one process makes to one table through several handles: the
/// flush's (which holds the gate from the moment its rows may be committed until the
/// hot buffer knows the version) and maintenance's (which holds it only for each
/// commit, never while it reads and rewrites files). It also keeps the latest version
/// committed through any of them, so the flush knows which version its commit builds on
/// without reloading the log.
#[derive(Debug, Default)]
pub struct CommitGate {
    latest: tokio::sync::Mutex<Option<i64>>,
}

impl CommitGate {
    /// Waits for the gate; the guard holds the latest version committed through it.
    pub async fn enter(&self) -> tokio::sync::MutexGuard<'_, Option<i64>> {
        self.latest.lock().await
    }
}

impl TableLake {
    /// Opens table `kind` of `lake` for `writer` (the id of the WAL whose
    /// sequence its commits record), creating it if it does not exist.
    pub async fn open_or_create(
        lake: &LakeLocation,
        kind: Table,
        options: LakeOptions,
        writer: &str,
    ) -> Result<Self, LakeError> {
        let comment = match kind {
            Table::Metrics => "fleetlake: one row per CloudWatch datapoint",
            Table::Logs => "fleetlake: one row per CloudWatch Logs event",
            Table::DeadLetters => "fleetlake: input that could not be decoded, raw",
        };
        Self::open_named(lake, kind.name(), kind, comment, options, writer, None).await
    }

    /// Opens the roll-up table `rollup` of `lake`, creating it if it does not exist.
    pub async fn open_rollup(
        lake: &LakeLocation,
        rollup: Rollup,
        options: LakeOptions,
    ) -> Result<Self, LakeError> {
        let (name, comment) = (rollup.name(), rollup.comment());
        Self::open_named(
            lake,
            name,
            Table::Metrics,
            comment,
            options,
            "rollup",
            Some(rollup),
        )
        .await
    }

    async fn open_named(
        lake: &LakeLocation,
        name: &str,
        kind: Table,
        comment: &str,
        options: LakeOptions,
        writer: &str,
        rollup: Option<Rollup>,
    ) -> Result<Self, LakeError> {
        let location = lake.table_url(name).to_string();
        let delta = |source| LakeError::Delta {
            table: location.clone(),
            source: Box::new(source),
        };
        let mut table = lake.open_or_new(name).await.map_err(delta)?;
        if table.version().is_none() {
            let schema: StructType = kind
                .schema()
                .as_ref()
                .try_into_kernel()
                .map_err(|e| delta(deltalake::DeltaTableError::Generic(e.to_string())))?;
            let created = table
                .create()
                .with_table_name(name)
                .with_comment(comment)
                .with_columns(schema.fields().cloned())
                .with_partition_columns([DAY_COLUMN])
                .with_save_mode(SaveMode::Ignore)
                .await;
            table = match created {
                Ok(table) => {
                    tracing::info!(table = %location, "created lake table");
                    table
                }
                // Another instance created it first: use theirs.
                Err(e) => match lake.open(name).await {
                    Ok(Some(table)) => table,
                    _ => return Err(delta(e)),
                },
            };
        }
        let properties =
            writer_properties(options.zstd_level, options.row_group_rows).map_err(|source| {
                LakeError::Arrow {
                    table: location.clone(),
                    source,
                }
            })?;
        let settings = WriteSettings {
            partition_by: vec![DAY_COLUMN.to_string()],
            properties: Some(properties),
            target_file_bytes: Some(options.target_file_bytes),
        };
        Ok(Self {
            kind,
            lake: Box::new(DeltaLake::new(table, location.clone(), settings)),
            location,
            options,
            writer: writer.to_string(),
            rollup,
            seen_version: -1,
            tailed: None,
            gate: None,
        })
    }

    /// Puts `wrap` in front of the handle's store (a fault injector, in tests).
    pub fn wrap_lake(mut self, wrap: impl FnOnce(Box<dyn Lake>) -> Box<dyn Lake>) -> Self {
        self.lake = wrap(self.lake);
        self
    }

    /// Makes this handle's maintenance commits go through `gate`.
    pub fn with_commit_gate(mut self, gate: Arc<CommitGate>) -> Self {
        self.gate = Some(gate);
        self
    }

    /// Enters `gate`, if there is one; [`TableLake::record`] then notes the version.
    async fn enter_gate(
        gate: &Option<Arc<CommitGate>>,
    ) -> Option<tokio::sync::MutexGuard<'_, Option<i64>>> {
        match gate {
            Some(gate) => Some(gate.enter().await),
            None => None,
        }
    }

    /// Records in the entered gate that this handle is now at its current version.
    fn record(&self, entered: &mut Option<tokio::sync::MutexGuard<'_, Option<i64>>>) {
        if let (Some(latest), Some(version)) = (entered.as_mut(), self.version()) {
            **latest = (**latest).max(Some(version));
        }
    }

    /// The table's URL.
    pub fn location(&self) -> &str {
        &self.location
    }

    fn delta_err(&self, source: deltalake::DeltaTableError) -> LakeError {
        LakeError::Delta {
            table: self.location.clone(),
            source: Box::new(source),
        }
    }

    pub(crate) async fn app_version(&self, app_id: &str) -> Result<Option<i64>, LakeError> {
        self.lake.app_transaction(app_id).await
    }

    /// The last WAL sequence number committed to the table (0 if none).
    pub async fn committed_seq(&self) -> Result<u64, LakeError> {
        Ok(self
            .app_version(&wal_app_id(&self.writer))
            .await?
            .unwrap_or(0)
            .max(0) as u64)
    }

    /// The latest row time in the table, epoch µs.
    pub async fn max_time(&self) -> Result<Option<i64>, LakeError> {
        self.app_version(&max_time_app_id(self.kind, &self.writer))
            .await
    }

    /// The stream positions of the latest commit that carries any (empty if none).
    pub async fn stream_positions(&self) -> Result<BTreeMap<String, String>, LakeError> {
        use futures::TryStreamExt;
        let mut history = self.lake.table().history(None);
        while let Some(info) = history.try_next().await.map_err(|e| self.delta_err(e))? {
            if let Some(serde_json::Value::Object(map)) = info.info.get(STREAM_POSITIONS_KEY) {
                return Ok(map
                    .iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                    .collect());
            }
        }
        Ok(BTreeMap::new())
    }

    /// The newest committed position of each of `keys` (read from the lake's history
    /// now, so commits of other instances count); keys never committed are left out.
    pub async fn stream_positions_of(
        &self,
        keys: &[String],
    ) -> Result<BTreeMap<String, String>, LakeError> {
        use futures::TryStreamExt;
        let mut found = BTreeMap::new();
        let mut history = self.lake.table().history(None);
        while found.len() < keys.len()
            && let Some(info) = history.try_next().await.map_err(|e| self.delta_err(e))?
        {
            if let Some(serde_json::Value::Object(map)) = info.info.get(STREAM_POSITIONS_KEY) {
                for key in keys {
                    if let (false, Some(seq)) = (
                        found.contains_key(key),
                        map.get(key).and_then(|v| v.as_str()),
                    ) {
                        found.insert(key.clone(), seq.to_string());
                    }
                }
            }
        }
        Ok(found)
    }

    /// Loads the table's latest version (commits of other writers included).
    pub async fn refresh(&mut self) -> Result<(), LakeError> {
        self.lake.refresh().await
    }

    /// The latest row time that other writers committed since this was last asked
    /// (the first time: within the last commits), from the commit info of their flush
    /// commits; `None` if they committed nothing. Rows of this writer at or before it
    /// may be in the lake already, committed by another instance.
    pub async fn others_max_time(&mut self) -> Result<Option<i64>, LakeError> {
        use deltalake::kernel::Action;
        self.refresh().await?;
        let Some(latest) = self.version() else {
            return Ok(None);
        };
        let from = if self.seen_version < 0 {
            (latest - OTHERS_LOOKBACK).max(0)
        } else {
            self.seen_version + 1
        };
        let mut max = None;
        let log = self.lake.table().log_store();
        for version in from..=latest {
            let Some(bytes) = log
                .read_commit_entry(version as u64)
                .await
                .map_err(|e| self.delta_err(e))?
            else {
                continue;
            };
            let actions = deltalake::logstore::get_actions(version as u64, &bytes)
                .map_err(|e| self.delta_err(e))?;
            for action in actions {
                if let Action::CommitInfo(info) = action
                    && let Some(writer) = info.info.get(WRITER_KEY).and_then(|w| w.as_str())
                    && writer != self.writer
                    && let Some(time) = info.info.get(MAX_TIME_KEY).and_then(|t| t.as_i64())
                {
                    max = Some(max.map_or(time, |m: i64| m.max(time)));
                }
            }
        }
        self.seen_version = latest;
        Ok(max)
    }

    /// Follows other writers' commits from the latest version on: each later one's
    /// rows come once from [`TableLake::others_commits`].
    pub async fn follow_others(&mut self) -> Result<(), LakeError> {
        if self.tailed.is_none() {
            self.refresh().await?;
            self.tailed = Some(self.version().unwrap_or(-1));
        }
        Ok(())
    }

    /// The rows other writers added to the table (data changes: not compaction's
    /// rewrites) in the versions after those asked for before, by version; with
    /// `refresh`, up to the latest version, else up to the one loaded. Nothing unless
    /// [`TableLake::follow_others`] was called.
    pub async fn others_commits(&mut self, refresh: bool) -> Result<Vec<OtherCommit>, LakeError> {
        use deltalake::kernel::Action;
        let Some(tailed) = self.tailed else {
            return Ok(Vec::new());
        };
        if refresh {
            self.refresh().await?;
        }
        let Some(latest) = self.version() else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        let log = self.lake.table().log_store();
        let root = self.lake.table().table_url().clone();
        for version in tailed + 1..=latest {
            let Some(bytes) = log
                .read_commit_entry(version as u64)
                .await
                .map_err(|e| self.delta_err(e))?
            else {
                out.push(self.lost(
                    version,
                    None,
                    None,
                    "the commit is gone from the log".into(),
                ));
                continue;
            };
            let actions = deltalake::logstore::get_actions(version as u64, &bytes)
                .map_err(|e| self.delta_err(e))?;
            let mut writer = None;
            let mut cover = None;
            let mut paths = Vec::new();
            // Rows the commit says its files hold, when every file says.
            let mut expected = Some(0_usize);
            for action in actions {
                match action {
                    Action::CommitInfo(info) => {
                        writer = info
                            .info
                            .get(WRITER_KEY)
                            .and_then(|w| w.as_str())
                            .map(str::to_owned);
                        cover = info
                            .info
                            .get(crate::peers::COVER_KEY)
                            .and_then(crate::peers::Cover::from_json);
                    }
                    Action::Add(add) if add.data_change => {
                        let records = add.get_stats().ok().flatten().map(|s| s.num_records);
                        expected = expected
                            .zip(records.and_then(|n| usize::try_from(n).ok()))
                            .map(|(a, b)| a + b);
                        paths.push(add.path);
                    }
                    _ => {}
                }
            }
            if writer.as_deref() == Some(self.writer.as_str())
                || (paths.is_empty() && cover.is_none())
            {
                continue;
            }
            let uris = paths
                .iter()
                .map(|path| {
                    root.join(path).map(String::from).map_err(|e| {
                        self.delta_err(deltalake::DeltaTableError::Generic(format!("{path}: {e}")))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let rows = if uris.is_empty() {
                Vec::new()
            } else {
                // A file that is gone reads as no rows (the reader takes a missing
                // file for an empty prefix): what the commit says its files hold
                // tells, or else whether each is still there.
                if expected.is_none()
                    && let Some(gone) = self.missing_file(&paths).await?
                {
                    out.push(self.lost(version, writer, cover, format!("its file {gone} is gone")));
                    continue;
                }
                let rows = self.read_files(uris).await?;
                let read: usize = rows.iter().map(RecordBatch::num_rows).sum();
                if let Some(expected) = expected
                    && read != expected
                {
                    out.push(self.lost(
                        version,
                        writer,
                        cover,
                        format!("its files held {read} of the {expected} rows it added (vacuumed)"),
                    ));
                    continue;
                }
                rows
            };
            ::metrics::counter!(crate::metrics::TAILED_ROWS, "table" => self.kind.name())
                .increment(rows.iter().map(RecordBatch::num_rows).sum::<usize>() as u64);
            let points = rows
                .iter()
                .map(|b| row_keys(self.kind, b).iter().map(|k| k.point).collect())
                .collect();
            out.push(OtherCommit {
                version,
                writer,
                cover,
                rows,
                points,
                lost: None,
            });
        }
        self.tailed = Some(latest);
        Ok(out)
    }

    /// Another writer's commit `version` whose rows could not be read (see
    /// [`OtherCommit::lost`]), counted and logged.
    fn lost(
        &self,
        version: i64,
        writer: Option<String>,
        cover: Option<crate::peers::Cover>,
        why: String,
    ) -> OtherCommit {
        ::metrics::counter!(crate::metrics::TAIL_LOST, "table" => self.kind.name()).increment(1);
        tracing::warn!(table = %self.location, version, %why, "the rows of another writer's commit cannot be read one commit at a time; state kept from commits is read from the lake again");
        OtherCommit {
            version,
            writer,
            cover,
            rows: Vec::new(),
            points: Vec::new(),
            lost: Some(why),
        }
    }

    /// The first of data files `paths` (relative to the table, as the log has them)
    /// that is gone from the store, if any.
    async fn missing_file(&self, paths: &[String]) -> Result<Option<String>, LakeError> {
        use deltalake::logstore::object_store::ObjectStoreExt as _;
        let store = self.lake.table().log_store().object_store(None);
        for path in paths {
            let location = deltalake::logstore::object_store::path::Path::from_url_path(path)
                .map_err(|e| {
                    self.delta_err(deltalake::DeltaTableError::Generic(format!("{path}: {e}")))
                })?;
            match store.head(&location).await {
                Ok(_) => {}
                Err(deltalake::logstore::object_store::Error::NotFound { .. }) => {
                    return Ok(Some(path.clone()));
                }
                Err(e) => return Err(self.delta_err(e.into())),
            }
        }
        Ok(None)
    }

    /// Every row of data files `uris` of this table, as the table's schema has them.
    async fn read_files(&self, uris: Vec<String>) -> Result<Vec<RecordBatch>, LakeError> {
        let query_err = |source| LakeError::Query {
            table: self.location.clone(),
            source: Box::new(source),
        };
        let ctx = SessionContext::new();
        self.lake
            .table()
            .update_datafusion_session(&ctx.state())
            .map_err(|e| self.delta_err(e))?;
        let batches = read_data_files(&ctx, self.kind, uris)
            .await
            .map_err(query_err)?
            .collect()
            .await
            .map_err(query_err)?;
        let schema = self.kind.schema();
        batches
            .iter()
            .filter(|b| b.num_rows() > 0)
            .map(|b| {
                conform(b, &schema).map_err(|source| LakeError::Arrow {
                    table: self.location.clone(),
                    source,
                })
            })
            .collect()
    }

    /// Which table this is.
    pub fn kind(&self) -> Table {
        self.kind
    }

    /// The version through which other writers' commits were handed on, once
    /// followed.
    pub fn tailed(&self) -> Option<i64> {
        self.tailed
    }

    /// The table version currently loaded.
    pub fn version(&self) -> Option<i64> {
        self.lake.version()
    }

    /// The de-duplication keys of those `candidates` rows that the table already holds.
    pub async fn existing_points(
        &mut self,
        candidates: &[RecordBatch],
    ) -> Result<HashSet<u128>, LakeError> {
        // Other writers' commits count: read the table as of now.
        self.refresh().await?;
        let query_err = |source| LakeError::Query {
            table: self.location.clone(),
            source: Box::new(source),
        };
        let scan_col = scan_column(self.kind);
        let mut wanted = HashSet::new();
        let mut accounts = HashSet::new();
        let (mut min_t, mut max_t) = (i64::MAX, i64::MIN);
        for batch in candidates {
            for key in row_keys(self.kind, batch) {
                wanted.insert(key.point);
                min_t = min_t.min(key.time);
                max_t = max_t.max(key.time);
            }
            if let Some(column) = batch.column_by_name(scan_col) {
                let values = column.as_string::<i32>();
                accounts.extend(values.iter().flatten().map(str::to_string));
            }
        }
        if wanted.is_empty() {
            return Ok(HashSet::new());
        }
        let ctx = SessionContext::new();
        self.lake
            .table()
            .update_datafusion_session(&ctx.state())
            .map_err(|e| self.delta_err(e))?;
        let provider = self
            .lake
            .table()
            .table_provider()
            .await
            .map_err(query_err)?;
        let ts = |v: i64| {
            lit(ScalarValue::TimestampMicrosecond(
                Some(v),
                Some("UTC".into()),
            ))
        };
        let day = |v: i64| {
            lit(ScalarValue::Date32(Some(
                v.div_euclid(86_400_000_000) as i32
            )))
        };
        let mut accounts: Vec<_> = accounts.into_iter().map(lit).collect();
        accounts.sort_by_key(|e| e.to_string());
        let frame = ctx
            .read_table(provider)
            .and_then(|df| {
                df.filter(
                    col(DAY_COLUMN)
                        .between(day(min_t), day(max_t))
                        .and(col("time").between(ts(min_t), ts(max_t)))
                        .and(col(scan_col).in_list(accounts, false)),
                )
            })
            .map_err(query_err)?;
        let found = frame.collect().await.map_err(query_err)?;
        let schema = self.kind.schema();
        let mut existing = HashSet::new();
        for batch in found {
            let batch = conform(&batch, &schema).map_err(|source| LakeError::Arrow {
                table: self.location.clone(),
                source,
            })?;
            existing.extend(
                row_keys(self.kind, &batch)
                    .into_iter()
                    .map(|k| k.point)
                    .filter(|p| wanted.contains(p)),
            );
        }
        Ok(existing)
    }

    fn writer_properties(&self) -> Result<WriterProperties, arrow::error::ArrowError> {
        writer_properties(self.options.zstd_level, self.options.row_group_rows)
    }

    /// The URIs of the table's current data files.
    pub fn file_uris(&self) -> Result<Vec<String>, LakeError> {
        Ok(self
            .lake
            .table()
            .get_file_uris()
            .map_err(|e| self.delta_err(e))?
            .collect())
    }

    /// Data files per day partition (`day=YYYY-MM-DD`), from the current snapshot.
    fn files_per_day(&self) -> Result<std::collections::BTreeMap<String, usize>, LakeError> {
        let mut days = std::collections::BTreeMap::new();
        for uri in self
            .lake
            .table()
            .get_file_uris()
            .map_err(|e| self.delta_err(e))?
        {
            if let Some(day) = uri
                .split('/')
                .find_map(|part| part.strip_prefix(&format!("{DAY_COLUMN}=")))
            {
                *days.entry(day.to_string()).or_insert(0) += 1;
            }
        }
        Ok(days)
    }

    /// Merges the small data files of each day partition (smaller than half the
    /// target size) into files near the target size, once a partition has at least
    /// `min_files` of them; rows sorted as the lake keeps them, so row-group statistics
    /// prune again, and a roll-up table's partial rows of one bucket merged into one.
    /// Large files are left as they are, so the open day is compacted incrementally:
    /// each run merges only what was flushed since. Each group of files merged is one
    /// Delta commit that removes exactly those files and adds their rewrite, both
    /// marked as no data change, so appends of any writer meanwhile never conflict and
    /// are never lost; a group another compaction got first is left alone. Then
    /// deletes files unreferenced for longer than `grace` (vacuum; readers of older
    /// versions within `grace` keep working).
    pub async fn compact(
        &mut self,
        min_files: usize,
        grace: std::time::Duration,
    ) -> Result<CompactStats, LakeError> {
        let mut stats = CompactStats::default();
        // Merge what the table holds now, not what this writer last saw.
        self.refresh().await?;
        let target = self.options.target_file_bytes.max(1);
        let mut small: BTreeMap<String, Vec<(String, i64)>> = BTreeMap::new();
        for file in self.lake.files()? {
            let Some(day) = file
                .path
                .split('/')
                .find_map(|part| part.strip_prefix(&format!("{DAY_COLUMN}=")))
            else {
                continue;
            };
            if (file.size as u64) < target / 2 {
                small
                    .entry(day.to_string())
                    .or_default()
                    .push((file.path.clone(), file.size));
            }
        }
        for (day, files) in small {
            if files.len() < min_files.max(2) {
                continue;
            }
            // Groups of files near the target size, oldest names first.
            let mut groups: Vec<Vec<(String, i64)>> = vec![Vec::new()];
            let mut bytes = 0u64;
            for file in files {
                let full = groups.last().is_some_and(|g| {
                    g.len() >= MERGE_MAX_FILES || (g.len() > 1 && bytes + file.1 as u64 > target)
                });
                if full {
                    groups.push(Vec::new());
                    bytes = 0;
                }
                bytes += file.1 as u64;
                groups.last_mut().expect("one group").push(file);
            }
            for group in groups.into_iter().filter(|g| g.len() > 1) {
                match self.merge_files(&group).await? {
                    Some(rows) => {
                        stats.partitions += 1;
                        stats.files_before += group.len();
                        stats.rows += rows.0;
                        stats.files_after += rows.1;
                        tracing::info!(table = %self.location, %day, files = group.len(), rows = rows.0, "compacted files");
                    }
                    None => {
                        tracing::info!(table = %self.location, %day, "files compacted by another writer meanwhile; left alone");
                        stats.conflicts += 1;
                    }
                }
            }
        }
        let gate = self.gate.clone();
        let mut entered = Self::enter_gate(&gate).await;
        stats.vacuumed = self.lake.vacuum(grace).await?;
        self.record(&mut entered);
        drop(entered);
        Ok(stats)
    }

    /// Rewrites `files` (paths relative to the table, one day partition) as sorted
    /// files near the target size, in one no-data-change commit; returns the rows and
    /// files written, or `None` if another commit removed some of `files` first.
    async fn merge_files(
        &mut self,
        files: &[(String, i64)],
    ) -> Result<Option<(usize, usize)>, LakeError> {
        use deltalake::writer::{DeltaWriter, RecordBatchWriter};
        let location = self.location.clone();
        let query_err = |source| LakeError::Query {
            table: location.clone(),
            source: Box::new(source),
        };
        let arrow_err = |source| LakeError::Arrow {
            table: location.clone(),
            source,
        };
        let root = self.lake.table().table_url().clone();
        let uris = files
            .iter()
            .map(|(path, _)| {
                root.join(path).map(String::from).map_err(|e| {
                    self.delta_err(deltalake::DeltaTableError::Generic(format!("{path}: {e}")))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        // Each input file is sorted already: a merge of sorted streams, one per file,
        // keeps memory flat; anything DataFusion must sort itself (a roll-up's merged
        // partials) spills to disk past the memory limit.
        let runtime = datafusion::execution::runtime_env::RuntimeEnvBuilder::new()
            .with_memory_limit(MERGE_MEMORY_BYTES, 1.0)
            .build_arc()
            .map_err(query_err)?;
        let config = datafusion::prelude::SessionConfig::new()
            .with_target_partitions(uris.len().max(1))
            .with_batch_size(8192);
        let ctx = SessionContext::new_with_config_rt(config, runtime);
        self.lake
            .table()
            .update_datafusion_session(&ctx.state())
            .map_err(|e| self.delta_err(e))?;
        let mut frame = read_data_files(&ctx, self.kind, uris)
            .await
            .map_err(query_err)?;
        if let Some(rollup) = self.rollup {
            // Partial rows of a bucket become one.
            frame = crate::rollup::aggregate(&ctx, frame, rollup)
                .await
                .map_err(query_err)?;
        }
        let mut stream = frame
            .sort(lake_order(self.kind))
            .map_err(query_err)?
            .execute_stream()
            .await
            .map_err(query_err)?;
        let schema = self.kind.schema();
        let mut writer = RecordBatchWriter::for_table(self.lake.table())
            .map_err(|e| self.delta_err(e))?
            .with_writer_properties(self.writer_properties().map_err(arrow_err)?)
            .with_target_file_size(self.options.target_file_bytes);
        let mut rows = 0;
        while let Some(batch) = futures::StreamExt::next(&mut stream).await {
            let batch = conform(&batch.map_err(query_err)?, &schema).map_err(arrow_err)?;
            rows += batch.num_rows();
            writer.write(batch).await.map_err(|e| self.delta_err(e))?;
        }
        let adds = writer.flush().await.map_err(|e| self.delta_err(e))?;
        let written = adds.len();
        let removes: Vec<String> = files.iter().map(|(path, _)| path.clone()).collect();
        #[cfg(test)]
        pause::before_merge_commit().await;
        let gate = self.gate.clone();
        let mut entered = Self::enter_gate(&gate).await;
        let committed = self
            .lake
            .rewrite(adds, &removes, operation("compact"))
            .await?;
        self.record(&mut entered);
        Ok(committed.map(|_| (rows, written)))
    }

    /// Removes the day partitions older than `keep` before `now` (whole days: a day is
    /// removed once all of it is older); returns the data files removed. They stay on
    /// storage, for readers of older versions, until a vacuum past the grace period.
    pub async fn apply_retention(
        &mut self,
        keep: std::time::Duration,
        now: std::time::SystemTime,
    ) -> Result<usize, LakeError> {
        let cutoff = now
            .checked_sub(keep)
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| (d.as_secs() / 86_400) as i32)
            .unwrap_or(0);
        self.refresh().await?;
        let expired = self
            .files_per_day()?
            .keys()
            .any(|day| chrono_day(day).is_some_and(|d| d < cutoff));
        if !expired {
            return Ok(0);
        }
        let gate = self.gate.clone();
        let mut entered = Self::enter_gate(&gate).await;
        let removed = self
            .lake
            .delete_days_before(DAY_COLUMN, cutoff, operation("retention"))
            .await?;
        self.record(&mut entered);
        drop(entered);
        tracing::info!(table = %self.location, files = removed, ?keep, "removed expired day partitions");
        Ok(removed)
    }

    /// Commits `batches` (sorted as the lake keeps them) with `transactions`, in one
    /// commit; returns the new version.
    pub async fn append_with(
        &mut self,
        batches: Vec<RecordBatch>,
        transactions: Vec<(String, i64)>,
    ) -> Result<i64, LakeError> {
        let meta = CommitMeta {
            transactions,
            metadata: Vec::new(),
        };
        self.lake.append(batches, meta).await
    }

    /// Commits `batches` (sorted as the lake keeps them) together with what they
    /// cover: the WAL sequence, the table's new latest time and the stream positions
    /// (each left as committed before when `None`); returns the new version.
    pub async fn append(
        &mut self,
        batches: Vec<RecordBatch>,
        wal_seq: Option<u64>,
        max_time: Option<i64>,
        positions: Option<&BTreeMap<String, String>>,
        cover: Option<&crate::peers::Cover>,
    ) -> Result<i64, LakeError> {
        let mut transactions = Vec::new();
        if let Some(seq) = wal_seq {
            transactions.push((wal_app_id(&self.writer), seq as i64));
        }
        if let Some(time) = max_time {
            transactions.push((max_time_app_id(self.kind, &self.writer), time));
        }
        // Who committed, and the latest row time: other writers de-duplicate against it.
        let mut metadata = vec![(WRITER_KEY.to_string(), self.writer.clone().into())];
        if let Some(time) = max_time {
            metadata.push((MAX_TIME_KEY.to_string(), time.into()));
        }
        if let Some(cover) = cover {
            metadata.push((crate::peers::COVER_KEY.to_string(), cover.to_json()));
        }
        if let Some(positions) = positions {
            let map: serde_json::Map<String, serde_json::Value> = positions
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                .collect();
            metadata.push((
                STREAM_POSITIONS_KEY.to_string(),
                serde_json::Value::Object(map),
            ));
        }
        self.lake
            .append(
                batches,
                CommitMeta {
                    transactions,
                    metadata,
                },
            )
            .await
    }
}

/// How the lake's Parquet files are written: zstd at `zstd_level`, dictionary
/// encoding (falling back to plain where a dictionary grows too large).
pub fn writer_properties(
    zstd_level: i32,
    row_group_rows: usize,
) -> Result<WriterProperties, arrow::error::ArrowError> {
    let level = ZstdLevel::try_new(zstd_level)
        .map_err(|e| arrow::error::ArrowError::ParquetError(e.to_string()))?;
    if row_group_rows == 0 {
        return Err(arrow::error::ArrowError::InvalidArgumentError(
            "row groups must hold at least one row".into(),
        ));
    }
    Ok(WriterProperties::builder()
        .set_compression(Compression::ZSTD(level))
        .set_dictionary_enabled(true)
        .set_max_row_group_row_count(Some(row_group_rows))
        .build())
}

/// Days since the epoch of `YYYY-MM-DD`.
fn chrono_day(day: &str) -> Option<i32> {
    let date = chrono::NaiveDate::parse_from_str(day, "%Y-%m-%d").ok()?;
    let epoch = chrono::NaiveDate::from_ymd_opt(1970, 1, 1)?;
    i32::try_from((date - epoch).num_days()).ok()
}

/// Concatenates rows and sorts them as the lake keeps them, so that row-group
/// statistics prune queries for one account or metric:
/// - `metrics` by account_id, namespace, metric_name, dimensions, region, time;
/// - `logs` by account_id, log_group, log_stream, time, event_id;
/// - `dead_letters` by source, time, position.
pub fn sort_for_lake(
    table: Table,
    batches: &[RecordBatch],
) -> Result<RecordBatch, arrow::error::ArrowError> {
    if batches.iter().all(|b| b.num_rows() == 0) {
        return Ok(RecordBatch::new_empty(table.schema()));
    }
    let by_columns = |columns: &[usize]| {
        let all = concat_batches(&table.schema(), batches)?;
        let sort: Vec<SortColumn> = columns
            .iter()
            .map(|&i| SortColumn {
                values: all.column(i).clone(),
                options: None,
            })
            .collect();
        let order = lexsort_to_indices(&sort, None)?;
        take_record_batch(&all, &order)
    };
    match table {
        Table::Metrics => sort_metrics(batches),
        Table::Logs => by_columns(&[
            logs_col::ACCOUNT_ID,
            logs_col::LOG_GROUP,
            logs_col::LOG_STREAM,
            logs_col::TIME,
            logs_col::EVENT_ID,
        ]),
        Table::DeadLetters => by_columns(&[dead_col::SOURCE, dead_col::TIME, dead_col::POSITION]),
    }
}

/// The rank of each row's key among the distinct keys of all batches, in key order,
/// and how many distinct keys there are. `key(b, i)` is the key of row `i` of batch
/// `b`; `lens` are the batches' row counts. Runs of one key (rows arrive grouped by
/// account) are looked up once.
fn ranks<K: Ord + std::hash::Hash + Clone>(
    lens: &[usize],
    key: impl Fn(usize, usize) -> K,
) -> (Vec<Vec<u32>>, usize) {
    let mut ids: std::collections::HashMap<K, u32> = std::collections::HashMap::new();
    let mut per_batch: Vec<Vec<u32>> = Vec::with_capacity(lens.len());
    for (b, &len) in lens.iter().enumerate() {
        let mut out = Vec::with_capacity(len);
        let mut last: Option<(K, u32)> = None;
        for i in 0..len {
            let value = key(b, i);
            let id = match &last {
                Some((previous, id)) if *previous == value => *id,
                _ => {
                    let next = ids.len() as u32;
                    let id = *ids.entry(value.clone()).or_insert(next);
                    last = Some((value, id));
                    id
                }
            };
            out.push(id);
        }
        per_batch.push(out);
    }
    let mut distinct: Vec<(K, u32)> = ids.into_iter().collect();
    distinct.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let mut rank = vec![0u32; distinct.len()];
    for (r, (_, id)) in distinct.iter().enumerate() {
        rank[*id as usize] = r as u32;
    }
    for ids in &mut per_batch {
        for id in ids.iter_mut() {
            *id = rank[*id as usize];
        }
    }
    (per_batch, distinct.len())
}

/// Sorts metrics rows by account_id, namespace, metric_name, dimensions, region, time.
/// Each of the six becomes an integer per row, its rank among the values in these
/// batches (a row's dimensions rank as one list of entries), so the sort compares
/// integers only: one packed 128-bit key when the ranks fit, as they do unless a
/// flush holds very many distinct values. The rows are then gathered from the input
/// batches in one copy.
fn sort_metrics(batches: &[RecordBatch]) -> Result<RecordBatch, arrow::error::ArrowError> {
    sort_metrics_packing(batches, 128)
}

/// [`sort_metrics`], packing the ranks into one key only if they take at most
/// `max_packed_bits` (tests force the other path with 0).
pub(crate) fn sort_metrics_packing(
    batches: &[RecordBatch],
    max_packed_bits: u32,
) -> Result<RecordBatch, arrow::error::ArrowError> {
    let lens: Vec<usize> = batches.iter().map(RecordBatch::num_rows).collect();
    let string_ranks = |i: usize| {
        let arrays: Vec<&arrow::array::StringArray> = batches
            .iter()
            .map(|b| b.column(i).as_string::<i32>())
            .collect();
        ranks(&lens, |b, r| arrays[b].value(r))
    };
    let dims: Vec<&arrow::array::MapArray> = batches
        .iter()
        .map(|b| b.column(c::DIMENSIONS).as_map())
        .collect();
    let dim_keys: Vec<&arrow::array::StringArray> =
        dims.iter().map(|d| d.keys().as_string::<i32>()).collect();
    let dim_values: Vec<&arrow::array::StringArray> =
        dims.iter().map(|d| d.values().as_string::<i32>()).collect();
    let dim_entries = |b: usize, row: usize| -> smallvec::SmallVec<[(&str, &str); 2]> {
        let d = dims[b];
        let range = if d.is_null(row) {
            0..0
        } else {
            let offsets = d.value_offsets();
            offsets[row] as usize..offsets[row + 1] as usize
        };
        range
            .map(|i| (dim_keys[b].value(i), dim_values[b].value(i)))
            .collect()
    };
    let times: Vec<&arrow::array::TimestampMicrosecondArray> = batches
        .iter()
        .map(|b| b.column(c::TIME).as_primitive::<TimestampMicrosecondType>())
        .collect();

    // In sort order: account, namespace, metric, dimensions, region, time.
    let columns = [
        string_ranks(c::ACCOUNT_ID),
        string_ranks(c::NAMESPACE),
        string_ranks(c::METRIC_NAME),
        ranks(&lens, dim_entries),
        string_ranks(c::REGION),
        ranks(&lens, |b, r| times[b].value(r)),
    ];
    let bits: Vec<u32> = columns
        .iter()
        .map(|(_, n)| usize::BITS - n.saturating_sub(1).leading_zeros())
        .collect();
    let rank = |i: usize, b: usize, r: usize| columns[i].0[b][r];
    let order = if bits.iter().sum::<u32>() <= max_packed_bits.min(128) {
        sorted_rows(&lens, |b, r| {
            (0..columns.len()).fold(0u128, |key, i| (key << bits[i]) | u128::from(rank(i, b, r)))
        })
    } else {
        sorted_rows(&lens, |b, r| -> [u32; 6] {
            std::array::from_fn(|i| rank(i, b, r))
        })
    };
    let refs: Vec<&RecordBatch> = batches.iter().collect();
    arrow::compute::interleave_record_batch(&refs, &order)
}

/// The (batch, row) positions of all rows of batches of `lens` rows, ordered by
/// `key(batch, row)`.
fn sorted_rows<K: Ord + Copy>(
    lens: &[usize],
    key: impl Fn(usize, usize) -> K,
) -> Vec<(usize, usize)> {
    let mut keyed: Vec<(K, u32, u32)> = Vec::with_capacity(lens.iter().sum());
    for (b, &len) in lens.iter().enumerate() {
        keyed.extend((0..len).map(|r| (key(b, r), b as u32, r as u32)));
    }
    keyed.sort_unstable_by_key(|&(key, _, _)| key);
    keyed
        .into_iter()
        .map(|(_, b, r)| (b as usize, r as usize))
        .collect()
}

/// Splits `batches` (of `table`) into the rows whose key is not in `existing` and
/// those whose key is.
pub fn split_points(
    table: Table,
    batches: Vec<RecordBatch>,
    existing: &HashSet<u128>,
) -> (Vec<RecordBatch>, Vec<RecordBatch>) {
    if existing.is_empty() {
        return (batches, Vec::new());
    }
    split_rows(table, batches, |k| !existing.contains(&k.point))
}

/// Keeps the rows of `batches` (of `table`) whose key is not in `existing`.
pub fn without_points(
    table: Table,
    batches: Vec<RecordBatch>,
    existing: &HashSet<u128>,
) -> Vec<RecordBatch> {
    if existing.is_empty() {
        return batches;
    }
    batches
        .into_iter()
        .filter_map(|batch| {
            let keep: arrow::array::BooleanArray = row_keys(table, &batch)
                .iter()
                .map(|k| Some(!existing.contains(&k.point)))
                .collect();
            let kept = arrow::compute::filter_record_batch(&batch, &keep).expect("mask fits");
            (kept.num_rows() > 0).then_some(kept)
        })
        .collect()
}

/// The rows of data files `uris` of a `kind` table, with the partition column `day`
/// (not in the files) computed from `time`.
pub(crate) async fn read_data_files(
    ctx: &SessionContext,
    kind: Table,
    uris: Vec<String>,
) -> datafusion::error::Result<datafusion::dataframe::DataFrame> {
    let schema = kind.schema();
    let file_schema = arrow::datatypes::Schema::new(
        schema
            .fields()
            .iter()
            .filter(|f| f.name() != DAY_COLUMN)
            .cloned()
            .collect::<Vec<_>>(),
    );
    // Files are written sorted (flushes and compaction both sort them).
    let frame = ctx
        .read_parquet(
            uris,
            datafusion::prelude::ParquetReadOptions::default()
                .schema(&file_schema)
                .file_sort_order(vec![lake_order(kind)]),
        )
        .await?;
    frame.with_column(
        DAY_COLUMN,
        datafusion::prelude::cast(col("time"), arrow::datatypes::DataType::Date32),
    )
}

/// Splits `batches` (of `table`) into the rows after `time` (epoch µs) and those at or
/// before it.
pub fn split_at_time(
    table: Table,
    batches: Vec<RecordBatch>,
    time: i64,
) -> (Vec<RecordBatch>, Vec<RecordBatch>) {
    split_rows(table, batches, |k| k.time > time)
}

/// Splits `batches` (of `table`) into the rows whose key `first` holds for and the
/// others.
pub(crate) fn split_rows(
    table: Table,
    batches: Vec<RecordBatch>,
    first: impl Fn(&fleetlake_model::keys::RowKey) -> bool,
) -> (Vec<RecordBatch>, Vec<RecordBatch>) {
    let (mut yes, mut no) = (Vec::new(), Vec::new());
    for batch in batches {
        let mask: arrow::array::BooleanArray = row_keys(table, &batch)
            .iter()
            .map(|k| Some(first(k)))
            .collect();
        let rest = arrow::compute::not(&mask).expect("mask negates");
        for (mask, out) in [(&mask, &mut yes), (&rest, &mut no)] {
            let part = arrow::compute::filter_record_batch(&batch, mask).expect("mask fits");
            if part.num_rows() > 0 {
                out.push(part);
            }
        }
    }
    (yes, no)
}

/// The order rows are kept in within each data file (see [`sort_for_lake`]), as sort
/// expressions.
pub(crate) fn lake_order(kind: Table) -> Vec<datafusion::logical_expr::SortExpr> {
    let columns: &[&str] = match kind {
        Table::Metrics => &[
            "account_id",
            "namespace",
            "metric_name",
            "dimensions",
            "region",
            "time",
        ],
        Table::Logs => &["account_id", "log_group", "log_stream", "time", "event_id"],
        Table::DeadLetters => &["source", "time", "position"],
    };
    columns.iter().map(|c| col(*c).sort(true, true)).collect()
}
