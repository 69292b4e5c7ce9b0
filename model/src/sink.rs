//! The seams between ingest and the write path: every source hands rows to one of
//! these traits, which the aggregate stage implements.

use arrow::array::RecordBatch;
use futures::future::BoxFuture;

use crate::schema::Table;

/// Where decoded rows go. The aggregate stage implements it: `write` resolves only
/// once the rows are durable (write-ahead log fsync'd or committed to the lake), so a
/// source may acknowledge its sender as soon as it returns `Ok`.
pub trait RowSink: Send + Sync + 'static {
    /// Makes rows durable, then visible to queries: each batch has the schema of its
    /// table. All of them are made durable together, or none.
    fn write(&self, rows: Vec<(Table, RecordBatch)>) -> BoxFuture<'_, Result<(), SinkError>>;

    /// Whether a write would be taken now; a source asks before it reads and decodes a
    /// request, so that an overloaded or failing sink costs a refused sender nothing.
    fn admit(&self) -> Result<(), SinkError>;
}

/// Why a sink could not take a batch. Nothing of the batch was acknowledged.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SinkError {
    /// The sink is over a limit; the sender should retry later.
    #[error("overloaded: {0}")]
    Overloaded(String),
    /// The sink could not make the batch durable (disk or store error, shutting down).
    #[error("unavailable: {0}")]
    Unavailable(String),
}

/// Position of a stream shard that has been read to its end (closed by resharding):
/// its children may be read.
pub const SHARD_END: &str = "SHARD_END";

/// Where rows read from a replayable stream (Kinesis) go. The stream itself is the
/// durable log, so nothing is written ahead: the rows go to the hot buffer together
/// with the shard positions they reach, and every lake commit carries the positions
/// its rows cover. After a crash a consumer resumes after the committed positions.
pub trait StreamSink: Send + Sync + 'static {
    /// Buffers `rows` and records `positions` (`(shard key, sequence number or
    /// [`SHARD_END`])`) as reached, atomically with respect to flushes.
    fn write_positioned(
        &self,
        rows: Vec<(Table, RecordBatch)>,
        positions: Vec<(String, String)>,
    ) -> BoxFuture<'_, Result<(), SinkError>>;

    /// Each table's committed positions, as the lake held them when the sink opened,
    /// keyed by shard key.
    fn committed_positions(&self) -> Vec<(Table, std::collections::BTreeMap<String, String>)>;

    /// Each table's committed position of each of `keys`, read from the lake now (the
    /// newest commit that names it: another instance may have committed it).
    fn read_positions(&self, keys: Vec<String>) -> BoxFuture<'_, PositionsResult>;

    /// Carries `positions` (as [`StreamSink::read_positions`] found them) in the
    /// commits from now on: this instance reads those shards now. Never in the middle
    /// of a commit.
    fn hold_positions(
        &self,
        positions: Vec<(Table, std::collections::BTreeMap<String, String>)>,
    ) -> BoxFuture<'_, ()>;

    /// Commits what is buffered now, positions included, then stops carrying the
    /// positions of `keys`, with no other commit in between: their shards go to another
    /// instance, which resumes from what this commit holds.
    fn commit_without(&self, keys: Vec<String>) -> BoxFuture<'_, Result<(), SinkError>>;
}

/// Positions per table, keyed by shard key.
pub type PositionsResult =
    Result<Vec<(Table, std::collections::BTreeMap<String, String>)>, SinkError>;

/// Whether Kinesis sequence number `a` comes before or is `b`. Sequence numbers are
/// decimal strings of up to 128 bits' worth of digits without leading zeros, so they
/// order by length, then text; [`SHARD_END`] comes after every number.
pub fn sequence_le(a: &str, b: &str) -> bool {
    match (a == SHARD_END, b == SHARD_END) {
        (_, true) => true,
        (true, false) => false,
        _ => (a.len(), a) <= (b.len(), b),
    }
}
