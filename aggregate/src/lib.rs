//! fleetlake's second stage: durability, de-duplication, the hot buffer and the lake.
//!
//! ```text
//!  RowSink::write ──> WAL writer thread ─────> HotBuffer ──(flush: time/size)──> lake
//!  (from ingest/)      append, one fsync        per table,        per table: sorted zstd
//!                      per group of writers,    de-duplicated,    Parquet, one Delta commit
//!                      then acknowledge         queryable         with the WAL sequence
//!                                               (query/)
//! ```
//!
//! A write returns only after its rows (for any of the tables `metrics`, `logs`,
//! `dead_letters`) are fsync'd together in the write-ahead log and applied to the hot
//! buffers, so they are both durable and visible to SQL. Flushes move each table's
//! buffer into its Delta table, then delete the WAL segments no table still needs. On
//! start the WAL is replayed, per table, after the sequence recorded in that table.
//!
//! Rows of replayable streams (Kinesis) take the other door, [`StreamSink`]: no WAL,
//! since the stream keeps them, but the shard positions they reach are recorded with
//! them, and a flush takes every table's rows and the positions at one instant, so
//! each table's commit carries exactly the positions its rows cover.
pub mod buffer;
pub mod lake;
pub mod location;
pub mod metrics;
#[cfg(test)]
mod model_tests;
pub mod rollup;
pub mod wal;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use futures::future::BoxFuture;
use tokio::sync::{Notify, mpsc, oneshot};
use tracing::{error, info, warn};

use std::sync::atomic::{AtomicU64, Ordering};

use fleetlake_model::sink::{StreamSink, sequence_le};
use fleetlake_model::{RowSink, SinkError, Table};

use crate::buffer::{FlushJob, HotBuffer};
use crate::lake::{
    LakeError, LakeOptions, TableLake, sort_for_lake, split_at_time, without_points,
};
use crate::metrics as m;
use crate::rollup::{Roller, Rollup};
use crate::wal::{Wal, WalError, encode_rows};

/// Settings of the aggregate stage.
#[derive(Debug, Clone)]
pub struct AggregateConfig {
    /// Directory of the write-ahead log.
    pub wal_dir: PathBuf,
    /// Where the lake's Delta tables live.
    pub lake_location: location::LakeLocation,
    /// Longest time between flushes of the hot buffer to the lake.
    pub flush_interval: Duration,
    /// A flush starts early once this many rows are buffered.
    pub flush_rows: usize,
    /// Writes are refused (Firehose retries later) while this many rows are buffered.
    pub max_buffered_rows: usize,
    /// Writes are refused (as for `max_buffered_rows`) while the hot buffers hold this
    /// many bytes: with the bounded request bodies in flight, what bounds memory.
    pub max_buffered_bytes: usize,
    /// A WAL segment is sealed once it reaches this size.
    pub wal_segment_bytes: u64,
    /// Parquet writing options.
    pub lake: LakeOptions,
    /// Compaction (and retention) in the background; `None` for none.
    pub compaction: Option<CompactionConfig>,
    /// How often `metrics_5m` and `metrics_1h` catch up with `metrics`; `None` for
    /// never (no roll-up tables are made).
    pub rollup_interval: Option<Duration>,
}

/// How the service compacts the lake by itself (see [`lake::TableLake::compact`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactionConfig {
    /// Time between compaction runs.
    pub interval: Duration,
    /// A day partition is rewritten once it has this many data files.
    pub min_files: usize,
    /// Replaced files are deleted once unreferenced for this long.
    pub vacuum_grace: Duration,
    /// How long each table keeps its data, by table name (`metrics`, `metrics_5m`,
    /// `metrics_1h`, `logs`, `dead_letters`); a table not named keeps it forever.
    pub retention: BTreeMap<String, Duration>,
}

impl CompactionConfig {
    /// CloudWatch's own schedule: 1-minute data 15 days, 5-minute 63 days, 1-hour 455
    /// days; logs and dead letters 30 days.
    pub fn cloudwatch_retention() -> BTreeMap<String, Duration> {
        let days = |n: u64| Duration::from_secs(n * 86_400);
        BTreeMap::from([
            ("metrics".to_string(), days(15)),
            ("metrics_5m".to_string(), days(63)),
            ("metrics_1h".to_string(), days(455)),
            ("logs".to_string(), days(30)),
            ("dead_letters".to_string(), days(30)),
        ])
    }
}

/// Errors starting the aggregate stage.
#[derive(Debug, thiserror::Error)]
pub enum AggregateError {
    /// The write-ahead log could not be opened or replayed.
    #[error(transparent)]
    Wal(#[from] WalError),
    /// The lake could not be opened or written.
    #[error(transparent)]
    Lake(#[from] LakeError),
    /// Another process (a running `fleetlake serve`, a replay) writes this data
    /// directory.
    #[error("{0} is in use by another fleetlake process (serve or replay); stop it first")]
    Locked(String),
}

/// Takes the data directory's writer lock (`<wal_dir>/LOCK`), held for as long as the
/// returned file is open; the operating system releases it when the process dies.
fn lock_wal_dir(wal_dir: &std::path::Path) -> Result<std::fs::File, AggregateError> {
    let io = |source| WalError::Io {
        path: wal_dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(wal_dir).map_err(io)?;
    let path = wal_dir.join("LOCK");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {
            Err(AggregateError::Locked(wal_dir.display().to_string()))
        }
        Err(std::fs::TryLockError::Error(e)) => Err(io(e).into()),
    }
}

/// The id of the writer whose WAL this is (`<wal_dir>/WRITER_ID`, made once): lake
/// commits name their WAL sequence after it, so writers sharing a lake never conflict.
fn writer_id(wal_dir: &std::path::Path) -> Result<String, AggregateError> {
    let path = wal_dir.join("WRITER_ID");
    let io = |source| WalError::Io {
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e).into()),
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let seed = format!("{now}/{}/{}", std::process::id(), wal_dir.display());
    let id = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(seed.as_bytes()));
    let tmp = wal_dir.join("WRITER_ID.tmp");
    std::fs::write(&tmp, &id).map_err(io)?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)?;
    Ok(id)
}

enum WalJob {
    Append {
        payload: Vec<u8>,
        rows: Vec<(Table, RecordBatch)>,
        done: oneshot::Sender<Result<(), String>>,
    },
    RemoveThrough(u64),
}

/// Bound of the queue in front of the WAL writer: writers wait (back-pressure), never
/// an unbounded buffer.
const WAL_QUEUE: usize = 1024;

/// One lake table and its hot buffer.
struct TableState {
    table: Table,
    buffer: Mutex<HotBuffer>,
    lake: tokio::sync::Mutex<TableLake>,
    /// Stream positions the table's lake holds every row up to.
    committed_positions: Mutex<BTreeMap<String, String>>,
    /// The same, as found when the aggregator opened.
    opened_positions: BTreeMap<String, String>,
}

struct Shared {
    tables: Vec<TableState>,
    /// The last WAL sequence applied to the buffers (all tables).
    applied_seq: AtomicU64,
    wal_tx: mpsc::Sender<WalJob>,
    flush_now: Notify,
    /// Stream positions reached by the rows in the buffers (and before). Its lock is
    /// also the gate that keeps a flush from splitting a positioned write.
    positions: Mutex<BTreeMap<String, String>>,
    /// One flush at a time.
    flushing: tokio::sync::Mutex<()>,
    /// What is failing now (the WAL's disk, the lake's store).
    faults: Faults,
    config: AggregateConfig,
    _lock: std::fs::File,
}

impl Shared {
    fn state(&self, table: Table) -> &TableState {
        &self.tables[table.index()]
    }

    /// Rows and bytes held by all hot buffers, each buffer locked once.
    fn buffered(&self) -> (usize, usize) {
        self.tables.iter().fold((0, 0), |(rows, bytes), t| {
            let buffer = t.buffer.lock().expect("buffer lock");
            (rows + buffer.rows(), bytes + buffer.bytes())
        })
    }

    /// The WAL sequence through which every table has committed what it holds.
    fn truncatable_through(&self) -> u64 {
        // Read the applied sequence first: a record applied after this read is either
        // seen pending in a buffer below, or beyond the sequence returned.
        let applied = self.applied_seq.load(Ordering::Acquire);
        self.tables
            .iter()
            .filter_map(|t| t.buffer.lock().expect("buffer lock").pending_since())
            .map(|first| first.saturating_sub(1))
            .fold(applied, u64::min)
    }
}

/// The aggregate stage: a [`RowSink`] in front, the lake behind.
#[derive(Clone)]
pub struct Aggregator {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Aggregator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Aggregator")
            .field("config", &self.shared.config)
            .finish()
    }
}

impl Aggregator {
    /// Opens the lake's tables and the WAL, replays what the tables have not committed,
    /// and starts the WAL writer and the flush task.
    pub async fn open(config: AggregateConfig) -> Result<Self, AggregateError> {
        m::describe();
        let lock = lock_wal_dir(&config.wal_dir)?;
        let writer = writer_id(&config.wal_dir)?;
        let mut tables = Vec::new();
        let mut committed = Vec::new();
        for table in Table::ALL {
            let lake = TableLake::open_or_create(
                &config.lake_location,
                table,
                config.lake.clone(),
                &writer,
            )
            .await?;
            committed.push(lake.committed_seq().await?);
            let mut lake = lake;
            // The latest time in the table: this writer's, or another's if later.
            let latest = match (lake.max_time().await?, lake.others_max_time().await?) {
                (Some(own), Some(others)) => Some(own.max(others)),
                (own, others) => own.or(others),
            };
            let buffer = HotBuffer::new(table, latest);
            let positions = lake.stream_positions().await?;
            tables.push(TableState {
                table,
                buffer: Mutex::new(buffer),
                lake: tokio::sync::Mutex::new(lake),
                committed_positions: Mutex::new(positions.clone()),
                opened_positions: positions,
            });
        }
        // Streams resume from the least position any table committed; a table that
        // holds more keeps its own (see `merge_positions`).
        let opened: Vec<_> = tables
            .iter()
            .map(|t| (t.table, t.opened_positions.clone()))
            .collect();
        let positions = least_positions(tables.len(), &opened);
        let least = committed.iter().copied().min().unwrap_or(0);
        let greatest = committed.iter().copied().max().unwrap_or(0);
        let dir = config.wal_dir.clone();
        let segment_bytes = config.wal_segment_bytes;
        let (wal, replayed) = tokio::task::spawn_blocking(move || {
            Wal::open_continuing(&dir, segment_bytes, least, greatest)
        })
        .await
        .expect("wal open does not panic")?;
        let mut replayed_rows = 0;
        let mut applied = greatest;
        for record in &replayed {
            applied = applied.max(record.seq);
            for (table, batch) in &record.rows {
                if record.seq > committed[table.index()] {
                    replayed_rows += batch.num_rows();
                    tables[table.index()]
                        .buffer
                        .lock()
                        .expect("buffer lock")
                        .insert(record.seq, batch);
                }
            }
        }
        if !replayed.is_empty() {
            info!(
                records = replayed.len(),
                rows = replayed_rows,
                committed = ?committed,
                "replayed write-ahead log"
            );
        }
        let (wal_tx, wal_rx) = mpsc::channel(WAL_QUEUE);
        let shared = Arc::new(Shared {
            tables,
            applied_seq: AtomicU64::new(applied),
            wal_tx,
            flush_now: Notify::new(),
            positions: Mutex::new(positions),
            flushing: tokio::sync::Mutex::new(()),
            faults: Faults::default(),
            config,
            _lock: lock,
        });
        for stage in [Stage::Wal, Stage::Lake] {
            ::metrics::gauge!(m::STAGE_UP, "stage" => stage.name()).set(1.0);
        }
        let writer = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("fleetlake-wal".into())
            .spawn(move || wal_writer(wal, wal_rx, writer))
            .expect("spawn wal writer thread");
        let flusher = Arc::clone(&shared);
        tokio::spawn(flush_loop(flusher));
        tokio::spawn(sample_memory(Arc::downgrade(&shared)));
        if let Some(compaction) = shared.config.compaction.clone() {
            tokio::spawn(compaction_loop(Arc::downgrade(&shared), compaction));
        }
        if let Some(interval) = shared.config.rollup_interval {
            // The roll-up tables exist from the start, so SQL always has them.
            let roller = Roller::open(
                shared.config.lake_location.clone(),
                shared.config.lake.clone(),
            )
            .await?;
            tokio::spawn(rollup_loop(Arc::downgrade(&shared), interval, roller));
        }
        let aggregator = Self { shared };
        if !replayed.is_empty() {
            // Commit what the WAL held before taking new data, so it is not replayed again.
            if let Err(error) = aggregator.flush().await {
                warn!(%error, "could not commit replayed data yet; will retry");
            }
        }
        Ok(aggregator)
    }

    /// Rows of `table` in the hot buffer visible to a query reading lake version
    /// `lake_version` of that table.
    pub fn snapshot(&self, table: Table, lake_version: Option<i64>) -> Vec<RecordBatch> {
        self.shared
            .state(table)
            .buffer
            .lock()
            .expect("buffer lock")
            .snapshot(lake_version)
    }

    /// Flushes every table's hot buffer to the lake now.
    pub async fn flush(&self) -> Result<(), LakeError> {
        flush_once(&self.shared).await
    }

    /// Checks that the WAL's directory takes a durable write and that the lake's store
    /// answers (loads the `metrics` table's latest version), each within `timeout`. A
    /// table busy with a flush or compaction counts as answering: the fault state
    /// reports how that ends.
    pub async fn probe(&self, timeout: Duration) -> Result<(), String> {
        let dir = self.shared.config.wal_dir.clone();
        let wal = tokio::task::spawn_blocking(move || {
            static PROBES: AtomicU64 = AtomicU64::new(0);
            let path = dir.join(format!(".probe-{}", PROBES.fetch_add(1, Ordering::Relaxed)));
            let result = std::fs::File::create(&path)
                .and_then(|mut f| {
                    std::io::Write::write_all(&mut f, b"probe")?;
                    f.sync_data()
                })
                .map_err(|e| format!("write-ahead log directory {}: {e}", dir.display()));
            let _ = std::fs::remove_file(&path);
            result
        });
        match tokio::time::timeout(timeout, wal).await {
            Ok(Ok(result)) => result?,
            Ok(Err(e)) => return Err(format!("write-ahead log probe failed: {e}")),
            Err(_) => {
                return Err(format!(
                    "write-ahead log directory: no answer in {timeout:?}"
                ));
            }
        }
        let state = self.shared.state(Table::Metrics);
        let Ok(mut lake) = state.lake.try_lock() else {
            return Ok(());
        };
        match tokio::time::timeout(timeout, lake.refresh()).await {
            Ok(result) => result.map_err(|e| format!("lake: {e}")),
            Err(_) => Err(format!("lake: no answer in {timeout:?}")),
        }
    }

    /// What `/health` and `/ready` report of this stage.
    pub fn health(&self) -> Health {
        let shared = &self.shared;
        Health {
            wal: shared.faults.get(Stage::Wal),
            lake: shared.faults.get(Stage::Lake),
            buffered_rows: shared.buffered().0,
            max_buffered_rows: shared.config.max_buffered_rows,
        }
    }
}

/// A stage that fails now: its last error, since when, how many attempts in a row.
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    /// The last error.
    pub error: String,
    /// When the first failure of this run of failures happened.
    pub since: std::time::SystemTime,
    /// Failed attempts since then.
    pub failures: u64,
}

/// The aggregate stage's health: what fails (nothing when `None`) and how full the hot
/// buffer is.
#[derive(Debug, Clone)]
pub struct Health {
    /// The write-ahead log's last group commit failed (a full or read-only disk): writes
    /// are refused until one succeeds.
    pub wal: Option<Fault>,
    /// The lake refused the last flush (store errors, a read-only directory): writes are
    /// refused, and the flush retried with backoff, until one succeeds.
    pub lake: Option<Fault>,
    /// Rows in the hot buffers.
    pub buffered_rows: usize,
    /// Above this many, writes are refused until a flush makes room.
    pub max_buffered_rows: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Wal,
    Lake,
}

impl Stage {
    fn name(self) -> &'static str {
        match self {
            Stage::Wal => "wal",
            Stage::Lake => "lake",
        }
    }
}

#[derive(Debug, Default)]
struct Faults {
    wal: Mutex<Option<Fault>>,
    lake: Mutex<Option<Fault>>,
}

impl Faults {
    fn slot(&self, stage: Stage) -> &Mutex<Option<Fault>> {
        match stage {
            Stage::Wal => &self.wal,
            Stage::Lake => &self.lake,
        }
    }

    fn get(&self, stage: Stage) -> Option<Fault> {
        self.slot(stage).lock().expect("faults lock").clone()
    }

    fn fail(&self, stage: Stage, error: &str) {
        let mut slot = self.slot(stage).lock().expect("faults lock");
        let fault = slot.get_or_insert_with(|| Fault {
            error: String::new(),
            since: std::time::SystemTime::now(),
            failures: 0,
        });
        fault.error = error.to_string();
        fault.failures += 1;
        ::metrics::gauge!(m::STAGE_UP, "stage" => stage.name()).set(0.0);
    }

    fn recover(&self, stage: Stage) {
        let mut slot = self.slot(stage).lock().expect("faults lock");
        if slot.take().is_some() {
            ::metrics::gauge!(m::STAGE_UP, "stage" => stage.name()).set(1.0);
        }
    }
}

impl RowSink for Aggregator {
    fn admit(&self) -> Result<(), SinkError> {
        self.shared.check_room()
    }

    fn write(&self, rows: Vec<(Table, RecordBatch)>) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move {
            let rows: Vec<_> = rows.into_iter().filter(|(_, b)| b.num_rows() > 0).collect();
            if rows.is_empty() {
                return Ok(());
            }
            self.shared.check_room()?;
            let payload = encode_rows(&rows)
                .map_err(|e| SinkError::Unavailable(format!("encoding rows: {e}")))?;
            let (done, acked) = oneshot::channel();
            self.shared
                .wal_tx
                .send(WalJob::Append {
                    payload,
                    rows,
                    done,
                })
                .await
                .map_err(|_| SinkError::Unavailable("write-ahead log is closed".into()))?;
            acked
                .await
                .map_err(|_| SinkError::Unavailable("write-ahead log writer stopped".into()))?
                .map_err(SinkError::Unavailable)
        })
    }
}

/// The WAL writer thread: group commit, then apply to the buffer, then acknowledge.
impl Shared {
    /// Inserts the rows of `writes` (WAL sequence, rows of any tables) into the tables'
    /// hot buffers, counting duplicates and updating the buffer gauges; returns the rows
    /// the next flush takes.
    fn insert_into_buffers(&self, writes: &[(u64, &[(Table, RecordBatch)])]) -> usize {
        let mut open_rows = 0;
        for state in &self.tables {
            let mut buffer = state.buffer.lock().expect("buffer lock");
            let mut duplicates = 0;
            for (seq, rows) in writes {
                for (table, batch) in *rows {
                    if *table == state.table {
                        duplicates += buffer.insert(*seq, batch).duplicates;
                    }
                }
            }
            if duplicates > 0 {
                ::metrics::counter!(m::DUPLICATES, "table" => state.table.name(), "stage" => "buffer")
                    .increment(duplicates as u64);
            }
            open_rows += buffer.open_rows();
            ::metrics::gauge!(m::BUFFER_ROWS, "table" => state.table.name())
                .set(buffer.rows() as f64);
            ::metrics::gauge!(m::BUFFER_BYTES, "table" => state.table.name())
                .set(buffer.bytes() as f64);
        }
        open_rows
    }

    /// Refuses a write while the lake refuses commits or the hot buffer is full (then
    /// asking for a flush).
    fn check_room(&self) -> Result<(), SinkError> {
        if let Some(fault) = self.faults.get(Stage::Lake) {
            ::metrics::counter!(m::REJECTED_UNHEALTHY).increment(1);
            return Err(SinkError::Overloaded(format!(
                "the lake has refused commits for {} s ({} attempts; last error: {}); retry later",
                fault.since.elapsed().unwrap_or_default().as_secs(),
                fault.failures,
                fault.error
            )));
        }
        let (buffered, bytes) = self.buffered();
        if bytes >= self.config.max_buffered_bytes {
            ::metrics::counter!(m::REJECTED_MEMORY).increment(1);
            // A flush hands the buffered rows to the lake and frees them.
            self.flush_now.notify_one();
            return Err(SinkError::Overloaded(format!(
                "hot buffer holds {} MiB, the limit is {} MiB; retry later",
                bytes >> 20,
                self.config.max_buffered_bytes >> 20
            )));
        }
        if buffered >= self.config.max_buffered_rows {
            ::metrics::counter!(m::REJECTED_FULL).increment(1);
            self.flush_now.notify_one();
            return Err(SinkError::Overloaded(format!(
                "hot buffer holds {buffered} rows, the limit is {}; retry later",
                self.config.max_buffered_rows
            )));
        }
        Ok(())
    }

    /// Inserts rows of a replayable stream and records the positions they reach, with
    /// the gate held so a flush sees both or neither.
    fn apply_positioned(&self, rows: &[(Table, RecordBatch)], positions: Vec<(String, String)>) {
        let mut reached = self.positions.lock().expect("positions lock");
        // No WAL record: the rows ride with the last applied one, which keeps the
        // table's committed WAL sequence and truncation correct.
        let seq = self.applied_seq.load(Ordering::Acquire);
        let open_rows = self.insert_into_buffers(&[(seq, rows)]);
        for (key, seq) in positions {
            // Only forward: a shard read again from an older position (after a failed
            // hand-over) must not move the reached position back.
            match reached.get(&key) {
                Some(old) if sequence_le(&seq, old) => {}
                _ => {
                    reached.insert(key, seq);
                }
            }
        }
        drop(reached);
        if open_rows >= self.config.flush_rows {
            self.flush_now.notify_one();
        }
    }
}

impl StreamSink for Aggregator {
    fn write_positioned(
        &self,
        rows: Vec<(Table, RecordBatch)>,
        positions: Vec<(String, String)>,
    ) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move {
            let rows: Vec<_> = rows.into_iter().filter(|(_, b)| b.num_rows() > 0).collect();
            if !rows.is_empty() {
                self.shared.check_room()?;
            }
            let shared = Arc::clone(&self.shared);
            // Key hashing is CPU work: off the async workers.
            tokio::task::spawn_blocking(move || shared.apply_positioned(&rows, positions))
                .await
                .map_err(|e| SinkError::Unavailable(format!("buffer insert failed: {e}")))
        })
    }

    fn committed_positions(&self) -> Vec<(Table, BTreeMap<String, String>)> {
        self.shared
            .tables
            .iter()
            .map(|t| (t.table, t.opened_positions.clone()))
            .collect()
    }

    fn read_positions(
        &self,
        keys: Vec<String>,
    ) -> BoxFuture<'_, fleetlake_model::sink::PositionsResult> {
        Box::pin(async move {
            let mut out = Vec::new();
            for state in &self.shared.tables {
                let lake = state.lake.lock().await;
                let found = lake
                    .stream_positions_of(&keys)
                    .await
                    .map_err(|e| SinkError::Unavailable(e.to_string()))?;
                out.push((state.table, found));
            }
            Ok(out)
        })
    }

    fn hold_positions(
        &self,
        positions: Vec<(Table, BTreeMap<String, String>)>,
    ) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let _no_flush = self.shared.flushing.lock().await;
            self.shared.hold_positions(&positions);
        })
    }

    fn commit_without(&self, keys: Vec<String>) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move {
            let _no_other_flush = self.shared.flushing.lock().await;
            flush_locked(&self.shared)
                .await
                .map_err(|e| SinkError::Unavailable(e.to_string()))?;
            self.shared.drop_positions(&keys);
            Ok(())
        })
    }
}

impl Shared {
    /// See [`StreamSink::hold_positions`]; the caller holds the flush lock.
    fn hold_positions(&self, positions: &[(Table, BTreeMap<String, String>)]) {
        let mut reached = self.positions.lock().expect("positions lock");
        for (table, found) in positions {
            let state = self.state(*table);
            let mut committed = state.committed_positions.lock().expect("positions lock");
            for (key, seq) in found {
                committed.insert(key.clone(), seq.clone());
            }
        }
        reached.extend(least_positions(self.tables.len(), positions));
    }

    /// See [`StreamSink::commit_without`]; the caller holds the flush lock.
    fn drop_positions(&self, keys: &[String]) {
        let mut reached = self.positions.lock().expect("positions lock");
        for key in keys {
            reached.remove(key);
        }
        for state in &self.tables {
            let mut committed = state.committed_positions.lock().expect("positions lock");
            for key in keys {
                committed.remove(key);
            }
        }
    }
}

/// Per shard key, the least position of all `tables` tables, for the keys every table
/// committed. A key some table lacks (its first commit failed before a crash) is left
/// out: that table holds nothing of the shard, and the position reached is set only
/// by the records read again.
fn least_positions(
    tables: usize,
    positions: &[(Table, BTreeMap<String, String>)],
) -> BTreeMap<String, String> {
    let mut least: BTreeMap<String, (usize, String)> = BTreeMap::new();
    for (_, found) in positions {
        for (key, seq) in found {
            let entry = least.entry(key.clone()).or_insert((0, seq.clone()));
            entry.0 += 1;
            if sequence_le(seq, &entry.1) {
                entry.1.clone_from(seq);
            }
        }
    }
    least
        .into_iter()
        .filter(|(_, (n, _))| *n == tables)
        .map(|(key, (_, seq))| (key, seq))
        .collect()
}

/// The positions a table commits: what it committed before, advanced to what the
/// flush covers. A table never moves back, so after a restart (when streams resume
/// from the least position of all tables) a table that held more keeps its own.
fn merge_positions(
    committed: &BTreeMap<String, String>,
    reached: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut merged = committed.clone();
    for (key, seq) in reached {
        match merged.get(key) {
            Some(old) if sequence_le(seq, old) => {}
            _ => {
                merged.insert(key.clone(), seq.clone());
            }
        }
    }
    merged
}

fn wal_writer(mut wal: Wal, mut rx: mpsc::Receiver<WalJob>, shared: Arc<Shared>) {
    let mut jobs = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        jobs.push(first);
        while jobs.len() < WAL_QUEUE {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let started = Instant::now();
        let mark = wal.mark();
        let mut appended = Vec::new();
        let mut failure: Option<String> = None;
        for job in jobs.drain(..) {
            match job {
                WalJob::RemoveThrough(seq) => {
                    if let Err(error) = wal.remove_through(seq) {
                        warn!(%error, "could not remove committed write-ahead log segments");
                    }
                }
                WalJob::Append {
                    payload,
                    rows,
                    done,
                } => {
                    if failure.is_none() {
                        match wal.append(&payload) {
                            Ok(seq) => {
                                ::metrics::counter!(m::WAL_BYTES).increment(payload.len() as u64);
                                appended.push((seq, rows, done));
                                continue;
                            }
                            Err(e) => failure = Some(e.to_string()),
                        }
                    }
                    let _ = done.send(Err(failure.clone().unwrap_or_default()));
                }
            }
        }
        if failure.is_none() && !appended.is_empty() {
            let syncing = Instant::now();
            match wal.sync() {
                Ok(()) => ::metrics::histogram!(m::WAL_SYNC_SECONDS)
                    .record(syncing.elapsed().as_secs_f64()),
                Err(e) => failure = Some(e.to_string()),
            }
        }
        if let Some(reason) = failure {
            // Nothing of this group is acknowledged, and none of it stays in the log:
            // a partial record would stop replay in front of later ones.
            let cut = wal.rollback(mark).err();
            error!(error = %reason, cut_failed = ?cut.as_ref().map(ToString::to_string), "write-ahead log append failed");
            shared.faults.fail(Stage::Wal, &reason);
            ::metrics::counter!(m::WAL_FAILURES).increment(1);
            for (_, _, done) in appended {
                let _ = done.send(Err(format!("write-ahead log: {reason}")));
            }
            continue;
        }
        if appended.is_empty() {
            continue;
        }
        shared.faults.recover(Stage::Wal);
        ::metrics::histogram!(m::WAL_GROUP_SECONDS).record(started.elapsed().as_secs_f64());
        ::metrics::histogram!(m::WAL_GROUP_SIZE).record(appended.len() as f64);
        ::metrics::counter!(m::WAL_RECORDS).increment(appended.len() as u64);
        let writes: Vec<(u64, &[(Table, RecordBatch)])> = appended
            .iter()
            .map(|(seq, rows, _)| (*seq, rows.as_slice()))
            .collect();
        let open_rows = shared.insert_into_buffers(&writes);
        if let Some((last, _, _)) = appended.last() {
            shared.applied_seq.store(*last, Ordering::Release);
        }
        for (_, _, done) in appended {
            let _ = done.send(Ok(()));
        }
        if open_rows >= shared.config.flush_rows {
            shared.flush_now.notify_one();
        }
    }
}

/// Samples the process's resident memory for `/metrics` each second, until the
/// aggregator is gone.
async fn sample_memory(shared: std::sync::Weak<Shared>) {
    while shared.strong_count() > 0 {
        if let Some(bytes) = resident_bytes() {
            ::metrics::gauge!(m::RESIDENT_BYTES).set(bytes as f64);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The process's resident set size (`VmRSS` of `/proc/self/status`).
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// First wait after a failed flush; doubled at each further failure up to
/// [`FLUSH_RETRY_MAX`].
const FLUSH_RETRY_FIRST: Duration = Duration::from_millis(500);
const FLUSH_RETRY_MAX: Duration = Duration::from_secs(30);

async fn flush_loop(shared: Arc<Shared>) {
    let mut backoff = FLUSH_RETRY_FIRST;
    let mut failing = false;
    loop {
        if failing {
            // The lake refused the last commit: writes are refused meanwhile, so retry
            // on the backoff schedule alone, not at the next interval.
            tokio::time::sleep(backoff).await;
        } else {
            tokio::select! {
                _ = tokio::time::sleep(shared.config.flush_interval) => {}
                _ = shared.flush_now.notified() => {}
            }
        }
        match flush_once(&shared).await {
            Ok(()) => {
                if failing {
                    info!("the lake takes commits again");
                }
                shared.faults.recover(Stage::Lake);
                failing = false;
                backoff = FLUSH_RETRY_FIRST;
            }
            Err(error) => {
                ::metrics::counter!(m::FLUSH_FAILURES).increment(1);
                shared.faults.fail(Stage::Lake, &error.to_string());
                if failing {
                    backoff = (backoff * 2).min(FLUSH_RETRY_MAX);
                }
                failing = true;
                error!(%error, retry_in = ?backoff, "lake flush failed; refusing writes until it succeeds");
            }
        }
    }
}

/// Applies retention to and compacts every table each interval (the lake's tables
/// holding their lake lock, so a flush of that table waits and never interleaves with
/// the rewrite; the roll-up tables through their own handles, a roll-up commit
/// meanwhile making that partition wait for the next run), until the aggregator is gone.
async fn compaction_loop(shared: std::sync::Weak<Shared>, config: CompactionConfig) {
    let mut rollups: Vec<TableLake> = Vec::new();
    loop {
        tokio::time::sleep(config.interval).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        for state in &shared.tables {
            let mut lake = state.lake.lock().await;
            maintain(&mut lake, state.table.name(), &config).await;
        }
        if shared.config.rollup_interval.is_some() && rollups.is_empty() {
            for rollup in Rollup::ALL {
                match TableLake::open_rollup(
                    &shared.config.lake_location,
                    rollup,
                    shared.config.lake.clone(),
                )
                .await
                {
                    Ok(lake) => rollups.push(lake),
                    Err(error) => {
                        warn!(%error, "cannot open roll-up table; retrying at the next interval");
                        rollups.clear();
                        break;
                    }
                }
            }
        }
        for (lake, rollup) in rollups.iter_mut().zip(Rollup::ALL) {
            maintain(lake, rollup.name(), &config).await;
        }
    }
}

/// Retention, then compaction (and vacuum) of one table.
async fn maintain(lake: &mut TableLake, name: &'static str, config: &CompactionConfig) {
    if let Some(keep) = config.retention.get(name) {
        match lake
            .apply_retention(*keep, std::time::SystemTime::now())
            .await
        {
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
async fn rollup_loop(shared: std::sync::Weak<Shared>, interval: Duration, mut roller: Roller) {
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

/// Flushes every table, then truncates the WAL as far as all tables allow.
async fn flush_once(shared: &Shared) -> Result<(), LakeError> {
    let _one_at_a_time = shared.flushing.lock().await;
    flush_locked(shared).await
}

/// One flush of every table; the caller holds the flush lock.
async fn flush_locked(shared: &Shared) -> Result<(), LakeError> {
    // Every table's rows and the stream positions, taken at one instant.
    let (jobs, reached) = {
        let reached = shared.positions.lock().expect("positions lock");
        let jobs: Vec<_> = shared
            .tables
            .iter()
            .map(|t| t.buffer.lock().expect("buffer lock").begin_flush())
            .collect();
        (jobs, reached.clone())
    };
    let mut first_error = None;
    for (state, job) in shared.tables.iter().zip(jobs) {
        if let Err(error) = flush_table(state, job, &reached).await {
            error!(table = %state.table, %error, "lake flush failed");
            first_error.get_or_insert(error);
        }
    }
    let through = shared.truncatable_through();
    if through > 0
        && shared
            .wal_tx
            .send(WalJob::RemoveThrough(through))
            .await
            .is_err()
    {
        warn!("write-ahead log writer stopped before truncation");
    }
    first_error.map_or(Ok(()), Err)
}

async fn flush_table(
    state: &TableState,
    job: Option<FlushJob>,
    reached: &BTreeMap<String, String>,
) -> Result<(), LakeError> {
    let table = state.table;
    let mut lake = state.lake.lock().await;
    let positions = {
        let committed = state.committed_positions.lock().expect("positions lock");
        let merged = merge_positions(&committed, reached);
        (merged != *committed).then_some(merged)
    };
    let Some(job) = job else {
        if let Some(positions) = positions {
            // No rows, but the streams moved on (records for other tables, control
            // messages): the table commits that it holds everything up to there.
            let empty = vec![RecordBatch::new_empty(table.schema())];
            lake.append(empty, None, None, Some(&positions)).await?;
            *state.committed_positions.lock().expect("positions lock") = positions;
        }
        return Ok(());
    };
    let started = Instant::now();
    let mut batches = job.batches;
    let mut job_suspects = job.suspects;
    // Rows of this writer at or before the latest time another writer committed since
    // may be in the lake through it (a retry sent to the other instance): check them too.
    if let Some(others) = lake.others_max_time().await? {
        let (after, maybe_there) = split_at_time(table, batches, others);
        batches = after;
        job_suspects.extend(maybe_there);
    }
    if !job_suspects.is_empty() {
        let existing = lake.existing_points(&job_suspects).await?;
        let suspects: usize = job_suspects.iter().map(|b| b.num_rows()).sum();
        if !existing.is_empty() {
            ::metrics::counter!(m::DUPLICATES, "table" => table.name(), "stage" => "lake")
                .increment(existing.len() as u64);
        }
        info!(
            %table,
            suspects,
            already_in_lake = existing.len(),
            "checked redelivered rows against the lake"
        );
        batches.extend(without_points(table, job_suspects, &existing));
    }
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    let sorted = if rows == 0 {
        // Everything was already in the lake: commit no rows, only the WAL position,
        // so the redelivery is not checked again after a restart.
        vec![RecordBatch::new_empty(table.schema())]
    } else {
        vec![
            sort_for_lake(table, &batches).map_err(|source| LakeError::Arrow {
                table: table.name().into(),
                source,
            })?,
        ]
    };
    state
        .buffer
        .lock()
        .expect("buffer lock")
        .committing_on(lake.version());
    let committing = Instant::now();
    let version = lake
        .append(
            sorted.clone(),
            Some(job.seq),
            Some(job.max_time),
            positions.as_ref(),
        )
        .await?;
    ::metrics::histogram!(m::COMMIT_SECONDS, "table" => table.name())
        .record(committing.elapsed().as_secs_f64());
    if let Some(positions) = positions {
        *state.committed_positions.lock().expect("positions lock") = positions;
    }
    let latest = buffer::latest_per_series(table, &sorted);
    ::metrics::gauge!(m::FLUSHED_SERIES, "table" => table.name()).set(latest.len() as f64);
    {
        let mut buffer = state.buffer.lock().expect("buffer lock");
        buffer.complete_flush_known(version, sorted, latest);
        ::metrics::gauge!(m::BUFFER_ROWS, "table" => table.name()).set(buffer.rows() as f64);
        ::metrics::gauge!(m::BUFFER_BYTES, "table" => table.name()).set(buffer.bytes() as f64);
        ::metrics::gauge!(m::TRACKED_SERIES, "table" => table.name())
            .set(buffer.tracked_series() as f64);
    }
    drop(lake);
    ::metrics::counter!(m::FLUSHED_ROWS, "table" => table.name()).increment(rows as u64);
    ::metrics::histogram!(m::FLUSH_SECONDS, "table" => table.name())
        .record(started.elapsed().as_secs_f64());
    info!(%table, rows, version, wal_seq = job.seq, elapsed = ?started.elapsed(), "committed flush to lake");
    Ok(())
}
