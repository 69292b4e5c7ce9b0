//! Names of the metrics the ingest stage emits (Prometheus text at `/metrics`).

/// Firehose requests handled, by `source` and HTTP `status`.
pub const REQUESTS: &str = "fleetlake_ingest_requests_total";
/// Bytes of request bodies received (as sent, before decompression), by `source`.
pub const REQUEST_BYTES: &str = "fleetlake_ingest_request_bytes_total";
/// Records received, by `source`.
pub const RECORDS: &str = "fleetlake_ingest_records_total";
/// Datapoints decoded and handed to the aggregate stage, by `source`.
pub const DATAPOINTS: &str = "fleetlake_ingest_datapoints_total";
/// Log events decoded and handed to the aggregate stage, by `source`.
pub const LOG_EVENTS: &str = "fleetlake_ingest_log_events_total";
/// CloudWatch Logs control messages dropped, by `source`.
pub const CONTROL_MESSAGES: &str = "fleetlake_ingest_control_messages_total";
/// Records or parts of records that could not be decoded and were kept as dead
/// letters, by `source` and `format`.
pub const DEAD_LETTERS: &str = "fleetlake_ingest_dead_letters_total";
/// Seconds spent handling one Firehose request, by `source`.
pub const REQUEST_SECONDS: &str = "fleetlake_ingest_request_duration_seconds";

/// Registers descriptions for the ingest metrics.
pub fn describe() {
    metrics::describe_counter!(REQUESTS, "Firehose requests handled, by source and status");
    metrics::describe_counter!(
        REQUEST_BYTES,
        "Request body bytes received, before decompression"
    );
    metrics::describe_counter!(RECORDS, "Records received");
    metrics::describe_counter!(DATAPOINTS, "Datapoints decoded and accepted");
    metrics::describe_counter!(LOG_EVENTS, "Log events decoded and accepted");
    metrics::describe_counter!(CONTROL_MESSAGES, "CloudWatch Logs control messages dropped");
    metrics::describe_counter!(
        DEAD_LETTERS,
        "Records (or parts) that could not be decoded, kept in the dead_letters table"
    );
    metrics::describe_histogram!(REQUEST_SECONDS, "Seconds to handle one Firehose request");
}

/// Counts what a decoder read from `source`.
pub fn record_decoded(source: &str, format: &str, stats: crate::DecodeStats) {
    let source = source.to_string();
    metrics::counter!(RECORDS, "source" => source.clone()).increment(stats.records as u64);
    metrics::counter!(DATAPOINTS, "source" => source.clone()).increment(stats.datapoints as u64);
    metrics::counter!(LOG_EVENTS, "source" => source.clone()).increment(stats.log_events as u64);
    if stats.control_messages > 0 {
        metrics::counter!(CONTROL_MESSAGES, "source" => source.clone())
            .increment(stats.control_messages as u64);
    }
    if stats.dead_letters > 0 {
        metrics::counter!(DEAD_LETTERS, "source" => source, "format" => format.to_string())
            .increment(stats.dead_letters as u64);
    }
}
