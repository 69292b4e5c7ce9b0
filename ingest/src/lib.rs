//! fleetlake's first stage: sources and decoders. `ARCHITECTURE.md` at the
//! repository root shows where it sits.
//!
//! ```text
//!  Firehose HTTP POST ──> firehose::router ──> decode::Decoder ──────────────> RowSink
//!  (gzip or plain JSON     (protocol, auth,     metric_stream (JSON)          (aggregate/:
//!   envelope, base64        limits, request      otel (OpenTelemetry 1.0/0.7)  WAL, hot buffer,
//!   records)                id echoed)           cwlogs (CloudWatch Logs)      lake)
//!  Kinesis records ──> kpl (de-aggregation) ──┘  dead letters (the rest, raw)
//!  (kinesis: shards,                                  └───────────────────> StreamSink
//!   GetRecords loops)                                   (rows + shard positions,
//!                                                        committed together in the lake)
//!  CloudWatch GetMetricData ──> cloudwatch (backfill; gap fill of the holes gaps
//!  (ListMetrics, paced, retried)  finds in what the sinks took) ────────────> RowSink
//! ```
//!
//! Decoders emit Arrow record batches of the model's tables (`metrics`, `logs`,
//! `dead_letters`; see [`fleetlake_model::schema`]), each metric and log row tagged
//! with its account id. History and holes come from CloudWatch's own API
//! ([`cloudwatch`]), with the same rows and de-duplication key as streamed data;
//! [`gaps`] finds the holes as data arrives. Data goes next to a
//! [`fleetlake_model::RowSink`], which the aggregate stage implements; a source
//! acknowledges its sender only after the sink's `write` returned `Ok`, i.e. once the
//! data is durable. Kinesis rows go to a [`fleetlake_model::StreamSink`] with the shard
//! positions they reach: the stream keeps them, so they need no write-ahead log, and the positions are
//! committed with the rows. Several instances share a stream's shards through a
//! DynamoDB lease table ([`lease`]). Whatever a decoder cannot read goes to
//! `dead_letters` with its raw bytes, never dropped silently.

pub mod cloudwatch;
pub mod cwlogs;
pub mod decode;
pub mod firehose;
pub mod gaps;
pub mod kinesis;
pub mod kpl;
pub mod lease;
pub mod metric_stream;
pub mod metrics;
pub mod otel;

#[cfg(test)]
mod format_tests;

pub use decode::{DecodeStats, Decoder, Format};
