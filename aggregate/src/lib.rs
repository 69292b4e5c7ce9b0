//! fleetlake's second stage: durability, de-duplication, the hot buffer and the lake.
//! `ARCHITECTURE.md` at the repository root shows where it sits and who owns what.
//!
//! ```text
//!  RowSink::write ──> writer thread ([`writer`]) ──publishes──> Published snapshot
//!  StreamSink::       owns the WAL, the hot            (arc-swap; queries and
//!   write_positioned  buffers, the stream positions    admission read it, no locks)
//!  (from ingest/)     one fsync per group, then apply,       │
//!                     publish, acknowledge                   ▼
//!                          ▲  BeginFlush / Committed     query/
//!                          │
//!  flush loop ([`flush`]) ─┴─> lake: per table sorted zstd Parquet, one Delta commit
//!                              with the WAL sequence and stream positions
//!  maintenance ([`maintain`]): retention, compaction, roll-ups, on their own handles
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
pub mod faulty;
pub mod feed;
mod flush;
pub mod health;
pub mod lake;
pub mod location;
mod maintain;
pub mod metrics;
#[cfg(test)]
mod model_tests;
pub mod peers;
pub mod positions;
pub mod rollup;
pub mod store;
pub mod wal;
pub mod writer;
#[cfg(test)]
mod writer_tests;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use arrow::array::RecordBatch;
use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use fleetlake_model::sink::StreamSink;
use fleetlake_model::{RowSink, SharedClock, SinkError, Table};

use crate::buffer::HotBuffer;
use crate::health::Stage;
pub use crate::health::{Fault, Health};
use crate::lake::{CommitGate, LakeError, LakeOptions, TableLake};
use crate::metrics as m;
use crate::positions::{Positions, least_positions};
use crate::rollup::Roller;
use crate::store::Lake;
use crate::wal::{Wal, WalError, encode_rows};
use crate::writer::{Command, Outlet, Writer};

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
    /// While other writers are followed ([`Aggregator::follow_other_writers`]): how
    /// often their commits and published rows are read and this writer's rows are
    /// published ([`FOLLOW_INTERVAL`] in the service).
    pub follow_interval: Duration,
}

/// How often the service reads other instances' commits and published rows, and
/// publishes its own.
pub const FOLLOW_INTERVAL: Duration = Duration::from_secs(1);

impl AggregateConfig {
    /// A write path that flushes only when asked ([`Aggregator::flush`]), holds any
    /// number of rows, and runs no maintenance: for tests and benchmarks that decide
    /// when rows reach the lake.
    pub fn manual(wal_dir: PathBuf, lake_location: location::LakeLocation) -> Self {
        Self {
            wal_dir,
            lake_location,
            flush_interval: Duration::from_secs(24 * 3600),
            flush_rows: usize::MAX,
            max_buffered_rows: usize::MAX,
            max_buffered_bytes: usize::MAX,
            wal_segment_bytes: 64 << 20,
            lake: LakeOptions::default(),
            compaction: None,
            rollup_interval: None,
            // Followed when asked (`follow_now`, `publish_now`).
            follow_interval: Duration::from_secs(24 * 3600),
        }
    }
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
    // Random: two writers with one id would take each other's commits for their own.
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).map_err(|e| io(std::io::Error::other(e)))?;
    let id = format!("{:016x}", u64::from_le_bytes(bytes));
    write_durably(&path, &id).map_err(io)?;
    Ok(id)
}

/// Replaces the file at `path` with `contents` (written beside it, fsynced, renamed).
fn write_durably(path: &std::path::Path, contents: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// This run of the writer (see [`peers`]): named after the last one
/// (`<wal_dir>/LAST_RUN`), which it replaces, so runs sort in order whatever the clock.
fn next_run(wal_dir: &std::path::Path) -> Result<String, AggregateError> {
    let path = wal_dir.join("LAST_RUN");
    let io = |source| WalError::Io {
        path: path.clone(),
        source,
    };
    let last = match std::fs::read_to_string(&path) {
        Ok(last) => Some(last.trim().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io(e).into()),
    };
    let run = peers::next_incarnation(last.as_deref());
    write_durably(&path, &run).map_err(io)?;
    Ok(run)
}

/// Wraps a table handle's store: `(table name, store) → store`.
pub type LakeWrap = Arc<dyn Fn(&str, Box<dyn Lake>) -> Box<dyn Lake> + Send + Sync>;

/// What the aggregator takes from outside besides its configuration: the seams tests
/// replace.
#[derive(Clone)]
pub struct Seams {
    /// Put in front of every table handle's store (tests inject faults with it).
    pub lake: Option<LakeWrap>,
    /// Where "now" comes from (retention's cut-off, fault times).
    pub clock: SharedClock,
}

impl Default for Seams {
    fn default() -> Self {
        Self {
            lake: None,
            clock: fleetlake_model::clock::system(),
        }
    }
}

/// One lake table as the flush sees it.
pub(crate) struct TableSlot {
    pub(crate) table: Table,
    /// The flush's handle of the table (also read by `read_positions` and the probe).
    pub(crate) lake: tokio::sync::Mutex<TableLake>,
    /// Orders this process's commits to the table (flush and maintenance).
    pub(crate) gate: Arc<CommitGate>,
    /// The stream positions the table held when the aggregator opened.
    pub(crate) opened_positions: Positions,
    /// What was read of other instances' published rows (taken after `lake`).
    pub(crate) follower: tokio::sync::Mutex<peers::Follower>,
}

pub(crate) struct Shared {
    pub(crate) tables: Vec<TableSlot>,
    /// The writer's queue.
    commands: mpsc::Sender<Command>,
    /// What the writer publishes: the queryable rows, the faults.
    pub(crate) outlet: Arc<Outlet>,
    /// One flush at a time (and no position hand-over in the middle of one).
    pub(crate) flushing: tokio::sync::Mutex<()>,
    pub(crate) writer_id: String,
    /// This run of the writer (see [`peers`]).
    pub(crate) incarnation: String,
    /// Other writers' commits are followed ([`Aggregator::follow_other_writers`]).
    pub(crate) following: AtomicBool,
    /// Publishes this process's rows for the others, once following.
    pub(crate) publisher: std::sync::OnceLock<Arc<peers::Publisher>>,
    /// Put in front of every table handle's store (tests inject faults with it).
    pub(crate) wrap: Option<LakeWrap>,
    pub(crate) clock: SharedClock,
    pub(crate) config: AggregateConfig,
    _lock: std::fs::File,
}

impl Shared {
    /// Queues `command` for the writer.
    pub(crate) async fn command(&self, command: Command) -> Result<(), LakeError> {
        self.commands
            .send(command)
            .await
            .map_err(|_| LakeError::WriterStopped)
    }

    /// Refuses a write while the lake refuses commits or the hot buffer is full (then
    /// asking for a flush). Reads only published state: no lock.
    fn check_room(&self) -> Result<(), SinkError> {
        if let Some(fault) = self.outlet.faults.get(Stage::Lake) {
            ::metrics::counter!(m::REJECTED_UNHEALTHY).increment(1);
            return Err(SinkError::Overloaded(format!(
                "the lake has refused commits for {} s ({} attempts; last error: {}); retry later",
                fault.since.elapsed().unwrap_or_default().as_secs(),
                fault.failures,
                fault.error
            )));
        }
        let (buffered, bytes) = self.outlet.published.load().buffered();
        if bytes >= self.config.max_buffered_bytes {
            ::metrics::counter!(m::REJECTED_MEMORY).increment(1);
            // A flush hands the buffered rows to the lake and frees them.
            self.outlet.flush_now.notify_one();
            return Err(SinkError::Overloaded(format!(
                "hot buffer holds {} MiB, the limit is {} MiB; retry later",
                bytes >> 20,
                self.config.max_buffered_bytes >> 20
            )));
        }
        if buffered >= self.config.max_buffered_rows {
            ::metrics::counter!(m::REJECTED_FULL).increment(1);
            self.outlet.flush_now.notify_one();
            return Err(SinkError::Overloaded(format!(
                "hot buffer holds {buffered} rows, the limit is {}; retry later",
                self.config.max_buffered_rows
            )));
        }
        Ok(())
    }

    /// Asks the writer for `make(done)` and waits for its answer.
    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, SinkError> {
        let (done, answer) = oneshot::channel();
        self.commands
            .send(make(done))
            .await
            .map_err(|_| SinkError::Unavailable("write-ahead log is closed".into()))?;
        answer
            .await
            .map_err(|_| SinkError::Unavailable("write-ahead log writer stopped".into()))
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
    /// and starts the writer, the flush loop and maintenance.
    pub async fn open(config: AggregateConfig) -> Result<Self, AggregateError> {
        Self::open_with(config, Seams::default()).await
    }

    /// As [`Aggregator::open`], with `seams`: a wrapper in front of every table
    /// handle's store (the flush's and maintenance's; how tests put a
    /// [`FaultyLake`](crate::faulty::FaultyLake) in the path) and the clock.
    pub async fn open_with(config: AggregateConfig, seams: Seams) -> Result<Self, AggregateError> {
        m::describe();
        let Seams { lake: wrap, clock } = seams;
        let lock = lock_wal_dir(&config.wal_dir)?;
        let writer = writer_id(&config.wal_dir)?;
        let incarnation = next_run(&config.wal_dir)?;
        let mut tables = Vec::new();
        let mut buffers = Vec::new();
        let mut committed = Vec::new();
        for table in Table::ALL {
            let mut lake = TableLake::open_or_create(
                &config.lake_location,
                table,
                config.lake.clone(),
                &writer,
            )
            .await?;
            if let Some(wrap) = &wrap {
                lake = lake.wrap_lake(|store| wrap(table.name(), store));
            }
            committed.push(lake.committed_seq().await?);
            // The latest time in the table: this writer's, or another's if later.
            let latest = match (lake.max_time().await?, lake.others_max_time().await?) {
                (Some(own), Some(others)) => Some(own.max(others)),
                (own, others) => own.or(others),
            };
            buffers.push(HotBuffer::new(table, latest));
            let positions = lake.stream_positions().await?;
            tables.push(TableSlot {
                table,
                lake: tokio::sync::Mutex::new(lake),
                gate: Arc::new(CommitGate::default()),
                opened_positions: positions,
                follower: Default::default(),
            });
        }
        // Streams resume from the least position any table committed; a table that
        // holds more keeps its own (see `merge_positions`).
        let opened: Vec<_> = tables
            .iter()
            .map(|t| (t.table, t.opened_positions.clone()))
            .collect();
        let reached = least_positions(tables.len(), &opened);
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
                    buffers[table.index()].insert(record.seq, batch);
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
        let outlet = Arc::new(Outlet::new(config.flush_rows, Arc::clone(&clock)));
        let (commands, queue) = mpsc::channel(writer::QUEUE);
        let committed_positions = opened.into_iter().map(|(_, p)| p).collect();
        let wal_writer = Writer::new(
            wal,
            buffers,
            reached,
            committed_positions,
            applied,
            Arc::clone(&outlet),
        );
        std::thread::Builder::new()
            .name("fleetlake-wal".into())
            .spawn(move || wal_writer.run(queue))
            .expect("spawn wal writer thread");
        let shared = Arc::new(Shared {
            tables,
            commands,
            outlet,
            flushing: tokio::sync::Mutex::new(()),
            writer_id: writer,
            incarnation,
            following: AtomicBool::new(false),
            publisher: std::sync::OnceLock::new(),
            wrap,
            clock,
            config,
            _lock: lock,
        });
        for stage in [Stage::Wal, Stage::Lake] {
            ::metrics::gauge!(m::STAGE_UP, "stage" => stage.name()).set(1.0);
        }
        tokio::spawn(flush::flush_loop(Arc::clone(&shared)));
        let weak = Arc::downgrade(&shared);
        tokio::spawn(health::sample_memory(move || weak.strong_count() > 0));
        if let Some(compaction) = shared.config.compaction.clone() {
            tokio::spawn(maintain::compaction_loop(
                Arc::downgrade(&shared),
                compaction,
            ));
        }
        if let Some(interval) = shared.config.rollup_interval {
            // The roll-up tables exist from the start, so SQL always has them.
            let roller = Roller::open(
                shared.config.lake_location.clone(),
                shared.config.lake.clone(),
            )
            .await?;
            tokio::spawn(maintain::rollup_loop(
                Arc::downgrade(&shared),
                interval,
                roller,
            ));
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
    /// `lake_version` of that table, from the writer's latest published snapshot.
    pub fn snapshot(&self, table: Table, lake_version: Option<i64>) -> Vec<RecordBatch> {
        self.shared
            .outlet
            .published
            .load()
            .views
            .get(table.index())
            .map(|view| view.visible(lake_version))
            .unwrap_or_default()
    }

    /// As [`Aggregator::snapshot`], but `None` for a moment while a flush commits and
    /// `lake_version` is after its base (see [`buffer::BufferView::visible_settled`]).
    pub fn snapshot_settled(
        &self,
        table: Table,
        lake_version: Option<i64>,
    ) -> Option<Vec<RecordBatch>> {
        match self.shared.outlet.published.load().views.get(table.index()) {
            Some(view) => view.visible_settled(lake_version),
            None => Some(Vec::new()),
        }
    }

    /// Every row from now on as it becomes visible to SQL, exactly once (see
    /// [`feed`]), and the sequence number of the last item emitted before. Subscribe
    /// before reading [`Aggregator::published`], read a snapshot whose `feed_seq` is
    /// at least that number and at least every item received (the writer emits just
    /// before it publishes), then skip the items that snapshot already holds
    /// ([`feed::FeedItem::already_in`]).
    pub fn subscribe(
        &self,
    ) -> (
        tokio::sync::mpsc::UnboundedReceiver<Arc<feed::FeedItem>>,
        u64,
    ) {
        self.shared.outlet.feed.subscribe()
    }

    /// Follows other writers' commits to the lake (several instances sharing it): from
    /// now on the rows each of their commits adds reach the feed once, a moment after
    /// it lands, and rows of this process that a flush finds committed by another are
    /// retracted from it (see [`feed`]). Call it before subscribing.
    pub async fn follow_other_writers(&self) -> Result<(), LakeError> {
        if self.shared.following.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let started = self.start_following().await;
        if started.is_err() {
            // Asked again, it starts again.
            self.shared.following.store(false, Ordering::Release);
        }
        started
    }

    async fn start_following(&self) -> Result<(), LakeError> {
        for slot in &self.shared.tables {
            slot.lake.lock().await.follow_others().await?;
        }
        let store = self
            .shared
            .config
            .lake_location
            .object_store(peers::PREFIX)
            .map_err(|source| LakeError::Delta {
                table: peers::PREFIX.into(),
                source: Box::new(source),
            })?;
        // Subscribed before following starts: every row made visible from here on is
        // published.
        let (items, _) = self.shared.outlet.feed.subscribe();
        let publisher = Arc::new(peers::Publisher::new(
            store,
            self.shared.writer_id.clone(),
            self.shared.incarnation.clone(),
            items,
        ));
        let _ = self.shared.publisher.set(Arc::clone(&publisher));
        tokio::spawn(flush::publish_loop(
            Arc::downgrade(&publisher),
            self.shared.config.follow_interval,
        ));
        tokio::spawn(flush::tail_loop(Arc::downgrade(&self.shared)));
        Ok(())
    }

    /// Hands the rows of other writers' commits landed since to the feed now (not at
    /// the next second) and returns once they are emitted; nothing unless
    /// [`Aggregator::follow_other_writers`] was called.
    pub async fn follow_now(&self) -> Result<(), LakeError> {
        if !self.follows_other_writers() {
            return Ok(());
        }
        for slot in &self.shared.tables {
            flush::tail_once(&self.shared, slot, true).await?;
        }
        Ok(())
    }

    /// Publishes the rows made visible here since the last time for the other
    /// instances now (not at the next second); nothing unless
    /// [`Aggregator::follow_other_writers`] was called.
    pub async fn publish_now(&self) {
        if let Some(publisher) = self.shared.publisher.get() {
            publisher.publish_new().await;
        }
    }

    /// Whether other writers' commits are followed.
    pub fn follows_other_writers(&self) -> bool {
        self.shared.following.load(Ordering::Acquire)
    }

    /// The writer's latest snapshot: every table's hot rows and the feed position.
    pub fn published(&self) -> Arc<writer::Published> {
        self.shared.outlet.published.load_full()
    }

    /// Flushes every table's hot buffer to the lake now.
    pub async fn flush(&self) -> Result<(), LakeError> {
        flush::flush_once(&self.shared).await
    }

    /// Checks that the WAL's directory takes a durable write and that the lake's store
    /// answers (loads the `metrics` table's latest version), each within `timeout`. A
    /// table busy with a flush counts as answering: the fault state reports how that
    /// ends.
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
        let slot = &self.shared.tables[Table::Metrics.index()];
        let Ok(mut lake) = slot.lake.try_lock() else {
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
            wal: shared.outlet.faults.get(Stage::Wal),
            lake: shared.outlet.faults.get(Stage::Lake),
            buffered_rows: shared.outlet.published.load().buffered().0,
            max_buffered_rows: shared.config.max_buffered_rows,
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
            self.shared
                .ask(|done| Command::Append {
                    payload,
                    rows,
                    done,
                })
                .await?
                .map_err(SinkError::Unavailable)
        })
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
            self.shared
                .ask(|done| Command::Positioned {
                    rows,
                    positions,
                    done,
                })
                .await
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
            for slot in &self.shared.tables {
                let lake = slot.lake.lock().await;
                let found = lake
                    .stream_positions_of(&keys)
                    .await
                    .map_err(|e| SinkError::Unavailable(e.to_string()))?;
                out.push((slot.table, found));
            }
            Ok(out)
        })
    }

    fn hold_positions(
        &self,
        positions: Vec<(Table, BTreeMap<String, String>)>,
    ) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            // Never in the middle of a flush: its commits carry what it took before.
            let _no_flush = self.shared.flushing.lock().await;
            let held = self
                .shared
                .ask(|done| Command::HoldPositions { positions, done })
                .await;
            if let Err(error) = held {
                warn!(%error, "could not hold stream positions");
            }
        })
    }

    fn commit_without(&self, keys: Vec<String>) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move {
            let _no_other_flush = self.shared.flushing.lock().await;
            flush::flush_locked(&self.shared)
                .await
                .map_err(|e| SinkError::Unavailable(e.to_string()))?;
            self.shared
                .ask(|done| Command::DropPositions { keys, done })
                .await
        })
    }
}
