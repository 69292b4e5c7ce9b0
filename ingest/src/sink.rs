//! The seam between ingest and the stage after it.

use arrow::array::RecordBatch;
use futures::future::BoxFuture;

/// Where decoded datapoints go. The aggregate stage implements it: `write` resolves
/// only once the batch is durable (write-ahead log fsync'd or committed to the lake),
/// so a source may acknowledge its sender as soon as it returns `Ok`.
pub trait DatapointSink: Send + Sync + 'static {
    /// Makes a batch of the `metrics` schema durable, then visible to queries.
    fn write(&self, batch: RecordBatch) -> BoxFuture<'_, Result<(), SinkError>>;
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
