//! Names of the metrics the ingest stage emits (Prometheus text at `/metrics`).

/// Firehose requests handled, by `source` and HTTP `status`.
pub const REQUESTS: &str = "fleetlake_ingest_requests_total";
/// Bytes of request bodies received (as sent, before decompression), by `source`.
pub const REQUEST_BYTES: &str = "fleetlake_ingest_request_bytes_total";
/// Records received, by `source`.
pub const RECORDS: &str = "fleetlake_ingest_records_total";
/// Datapoints decoded and handed to the aggregate stage, by `source`.
pub const DATAPOINTS: &str = "fleetlake_ingest_datapoints_total";
/// Lines or records that could not be decoded, by `source`.
pub const BAD_LINES: &str = "fleetlake_ingest_bad_lines_total";
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
    metrics::describe_counter!(BAD_LINES, "Lines or records that could not be decoded");
    metrics::describe_histogram!(REQUEST_SECONDS, "Seconds to handle one Firehose request");
}
