//! fleetlake's first stage: sources and decoders.
//!
//! ```text
//!  Firehose HTTP POST ──> firehose::router ──> metric_stream decoder ──> DatapointSink
//!  (gzip or plain JSON     (protocol, auth,     (one Arrow row per          (aggregate/:
//!   envelope, base64        limits, request      datapoint, bad lines        WAL, hot buffer,
//!   records)                id echoed)           counted and kept apart)     lake)
//! ```
//!
//! Every decoder emits Arrow record batches of [`schema::metrics_schema`], each row
//! tagged with its account id. Data goes next to a [`sink::DatapointSink`], which the
//! aggregate stage implements; a source acknowledges its sender only after the sink's
//! `write` returned `Ok`, i.e. once the data is durable.

pub mod firehose;
pub mod metric_stream;
pub mod metrics;
pub mod schema;
pub mod sink;

pub use sink::{DatapointSink, SinkError};
