//! fleetlake's second stage: durability, de-duplication, the hot buffer and the lake.
//!
//! ```text
//!  DatapointSink::write ──> WAL writer thread ─────> HotBuffer ──(flush: time/size)──> lake
//!  (from ingest/)           append, one fsync        de-duplicated,   sorted zstd Parquet,
//!                           per group of writers,    queryable        one Delta commit with
//!                           then acknowledge         (query/)         the WAL sequence
//! ```
//!
//! A write returns only after its batch is fsync'd in the write-ahead log and applied
//! to the hot buffer, so it is both durable and visible to SQL. Flushes move the buffer
//! into the `metrics` Delta table and then delete the WAL segments they cover. On start
//! the WAL is replayed after the sequence recorded in the lake.

pub mod buffer;
pub mod keys;
pub mod lake;
pub mod metrics;
pub mod wal;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use futures::future::BoxFuture;
use tokio::sync::{Notify, mpsc, oneshot};
use tracing::{error, info, warn};

use fleetlake_ingest::{DatapointSink, SinkError};

use crate::buffer::HotBuffer;
use crate::lake::{LakeError, LakeOptions, MetricsLake, sort_for_lake, without_points};
use crate::metrics as m;
use crate::wal::{Wal, WalError, encode_batch};

/// Settings of the aggregate stage.
#[derive(Debug, Clone)]
pub struct AggregateConfig {
    /// Directory of the write-ahead log.
    pub wal_dir: PathBuf,
    /// Directory holding the lake's Delta tables.
    pub lake_dir: PathBuf,
    /// Longest time between flushes of the hot buffer to the lake.
    pub flush_interval: Duration,
    /// A flush starts early once this many rows are buffered.
    pub flush_rows: usize,
    /// Writes are refused (Firehose retries later) while this many rows are buffered.
    pub max_buffered_rows: usize,
    /// A WAL segment is sealed once it reaches this size.
    pub wal_segment_bytes: u64,
    /// Parquet writing options.
    pub lake: LakeOptions,
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
}

enum WalJob {
    Append {
        payload: Vec<u8>,
        batch: RecordBatch,
        done: oneshot::Sender<Result<(), String>>,
    },
    RemoveThrough(u64),
}

/// Bound of the queue in front of the WAL writer: writers wait (back-pressure), never
/// an unbounded buffer.
const WAL_QUEUE: usize = 1024;

struct Shared {
    buffer: Mutex<HotBuffer>,
    lake: tokio::sync::Mutex<MetricsLake>,
    wal_tx: mpsc::Sender<WalJob>,
    flush_now: Notify,
    config: AggregateConfig,
}

/// The aggregate stage: a [`DatapointSink`] in front, the lake behind.
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
    /// Opens the lake and the WAL, replays what the lake has not committed, and starts
    /// the WAL writer and the flush task.
    pub async fn open(config: AggregateConfig) -> Result<Self, AggregateError> {
        m::describe();
        let lake = MetricsLake::open_or_create(&config.lake_dir, config.lake.clone()).await?;
        let committed = lake.committed_seq().await?;
        let mut buffer = HotBuffer::new(lake.max_time().await?);
        let dir = config.wal_dir.clone();
        let segment_bytes = config.wal_segment_bytes;
        let (wal, replayed) =
            tokio::task::spawn_blocking(move || Wal::open(&dir, segment_bytes, committed))
                .await
                .expect("wal open does not panic")?;
        let replayed_rows: usize = replayed.iter().map(|r| r.batch.num_rows()).sum();
        for record in &replayed {
            buffer.insert(record.seq, &record.batch);
        }
        if !replayed.is_empty() {
            info!(
                records = replayed.len(),
                rows = replayed_rows,
                committed,
                "replayed write-ahead log"
            );
        }
        let (wal_tx, wal_rx) = mpsc::channel(WAL_QUEUE);
        let shared = Arc::new(Shared {
            buffer: Mutex::new(buffer),
            lake: tokio::sync::Mutex::new(lake),
            wal_tx,
            flush_now: Notify::new(),
            config,
        });
        let writer = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("fleetlake-wal".into())
            .spawn(move || wal_writer(wal, wal_rx, writer))
            .expect("spawn wal writer thread");
        let flusher = Arc::clone(&shared);
        tokio::spawn(flush_loop(flusher));
        let aggregator = Self { shared };
        if replayed_rows > 0 {
            // Commit what the WAL held before taking new data, so it is not replayed again.
            if let Err(error) = aggregator.flush().await {
                warn!(%error, "could not commit replayed data yet; will retry");
            }
        }
        Ok(aggregator)
    }

    /// Rows of the hot buffer visible to a query reading lake `lake_version`.
    pub fn snapshot(&self, lake_version: Option<i64>) -> Vec<RecordBatch> {
        self.shared
            .buffer
            .lock()
            .expect("buffer lock")
            .snapshot(lake_version)
    }

    /// Flushes the hot buffer to the lake now.
    pub async fn flush(&self) -> Result<(), LakeError> {
        flush_once(&self.shared).await
    }
}

impl DatapointSink for Aggregator {
    fn write(&self, batch: RecordBatch) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move {
            let rows = self.shared.buffer.lock().expect("buffer lock").rows();
            if rows >= self.shared.config.max_buffered_rows {
                ::metrics::counter!(m::REJECTED_FULL).increment(1);
                self.shared.flush_now.notify_one();
                return Err(SinkError::Overloaded(format!(
                    "hot buffer holds {rows} rows, the limit is {}; retry later",
                    self.shared.config.max_buffered_rows
                )));
            }
            let payload = encode_batch(&batch)
                .map_err(|e| SinkError::Unavailable(format!("encoding batch: {e}")))?;
            let (done, acked) = oneshot::channel();
            self.shared
                .wal_tx
                .send(WalJob::Append {
                    payload,
                    batch,
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
                    batch,
                    done,
                } => {
                    if failure.is_none() {
                        match wal.append(&payload) {
                            Ok(seq) => {
                                ::metrics::counter!(m::WAL_BYTES).increment(payload.len() as u64);
                                appended.push((seq, batch, done));
                                continue;
                            }
                            Err(e) => failure = Some(e.to_string()),
                        }
                    }
                    let _ = done.send(Err(failure.clone().unwrap_or_default()));
                }
            }
        }
        if appended.is_empty() {
            continue;
        }
        if failure.is_none()
            && let Err(e) = wal.sync()
        {
            failure = Some(e.to_string());
        }
        if let Some(reason) = failure {
            // Nothing of this group is acknowledged. Records that did reach the disk are
            // replayed on restart and de-duplicate against the sender's retry.
            error!(error = %reason, "write-ahead log append failed");
            for (_, _, done) in appended {
                let _ = done.send(Err(format!("write-ahead log: {reason}")));
            }
            continue;
        }
        ::metrics::histogram!(m::WAL_SYNC_SECONDS).record(started.elapsed().as_secs_f64());
        ::metrics::histogram!(m::WAL_GROUP_SIZE).record(appended.len() as f64);
        ::metrics::counter!(m::WAL_RECORDS).increment(appended.len() as u64);
        let (open_rows, rows, bytes) = {
            let mut buffer = shared.buffer.lock().expect("buffer lock");
            for (seq, batch, _) in &appended {
                let outcome = buffer.insert(*seq, batch);
                if outcome.duplicates > 0 {
                    ::metrics::counter!(m::DUPLICATES, "stage" => "buffer")
                        .increment(outcome.duplicates as u64);
                }
            }
            (buffer.open_rows(), buffer.rows(), buffer.bytes())
        };
        ::metrics::gauge!(m::BUFFER_ROWS).set(rows as f64);
        ::metrics::gauge!(m::BUFFER_BYTES).set(bytes as f64);
        for (_, _, done) in appended {
            let _ = done.send(Ok(()));
        }
        if open_rows >= shared.config.flush_rows {
            shared.flush_now.notify_one();
        }
    }
}

async fn flush_loop(shared: Arc<Shared>) {
    let mut backoff = Duration::from_millis(500);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(shared.config.flush_interval) => {}
            _ = shared.flush_now.notified() => {}
        }
        match flush_once(&shared).await {
            Ok(()) => backoff = Duration::from_millis(500),
            Err(error) => {
                ::metrics::counter!(m::FLUSH_FAILURES).increment(1);
                error!(%error, retry_in = ?backoff, "lake flush failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

async fn flush_once(shared: &Shared) -> Result<(), LakeError> {
    // One flush at a time: the lake lock is held from taking the rows to the commit.
    let mut lake = shared.lake.lock().await;
    let Some(job) = shared.buffer.lock().expect("buffer lock").begin_flush() else {
        return Ok(());
    };
    let started = Instant::now();
    let mut batches = job.batches;
    if !job.suspects.is_empty() {
        let existing = lake.existing_points(&job.suspects).await?;
        let suspects: usize = job.suspects.iter().map(|b| b.num_rows()).sum();
        if !existing.is_empty() {
            ::metrics::counter!(m::DUPLICATES, "stage" => "lake").increment(existing.len() as u64);
        }
        info!(
            suspects,
            already_in_lake = existing.len(),
            "checked redelivered datapoints against the lake"
        );
        batches.extend(without_points(job.suspects, &existing));
    }
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    let sorted = if rows == 0 {
        // Everything was already in the lake: commit no rows, only the WAL position,
        // so the log can be truncated and the redelivery is not checked again.
        vec![RecordBatch::new_empty(
            fleetlake_ingest::schema::metrics_schema(),
        )]
    } else {
        vec![sort_for_lake(&batches).map_err(|source| LakeError::Arrow {
            table: "metrics".into(),
            source,
        })?]
    };
    let version = lake.append(sorted.clone(), job.seq, job.max_time).await?;
    shared
        .buffer
        .lock()
        .expect("buffer lock")
        .complete_flush(version, sorted);
    drop(lake);
    ::metrics::counter!(m::FLUSHED_ROWS).increment(rows as u64);
    ::metrics::histogram!(m::FLUSH_SECONDS).record(started.elapsed().as_secs_f64());
    info!(rows, version, wal_seq = job.seq, elapsed = ?started.elapsed(), "committed flush to lake");
    if shared
        .wal_tx
        .send(WalJob::RemoveThrough(job.seq))
        .await
        .is_err()
    {
        warn!("write-ahead log writer stopped before truncation");
    }
    Ok(())
}
