//! The seam between ingest and the stage after it.

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
