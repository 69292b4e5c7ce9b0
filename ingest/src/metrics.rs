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
/// Kinesis records read, by `stream` and `shard`.
pub const KINESIS_RECORDS: &str = "fleetlake_kinesis_records_total";
/// Bytes of Kinesis record data read, by `stream` and `shard`.
pub const KINESIS_BYTES: &str = "fleetlake_kinesis_bytes_total";
/// How far behind the tip of its shard the last GetRecords answer was, by `stream` and
/// `shard` (MillisBehindLatest).
pub const KINESIS_MILLIS_BEHIND: &str = "fleetlake_kinesis_millis_behind_latest";
/// GetRecords calls throttled (ProvisionedThroughputExceeded), by `stream` and `shard`.
pub const KINESIS_THROTTLED: &str = "fleetlake_kinesis_throttled_total";
/// Expired shard iterators renewed, by `stream` and `shard`.
pub const KINESIS_ITERATOR_RENEWALS: &str = "fleetlake_kinesis_iterator_renewals_total";
/// Failed Kinesis calls other than throttling, by `stream` and `call`.
pub const KINESIS_ERRORS: &str = "fleetlake_kinesis_errors_total";
/// Shards known (listed) per `stream`.
pub const KINESIS_SHARDS: &str = "fleetlake_kinesis_shards";
/// Records decoded from what arrived, accepted or not, by `source`.
pub const RECEIVED_RECORDS: &str = "fleetlake_ingest_received_records_total";
/// Datapoints decoded from what arrived, accepted or not, by `source`.
pub const RECEIVED_DATAPOINTS: &str = "fleetlake_ingest_received_datapoints_total";
/// Records decoded but refused by the stage behind (the sender retries), by `source`
/// and `reason` (`overloaded`, `unavailable`).
pub const REJECTED_RECORDS: &str = "fleetlake_ingest_rejected_records_total";
/// Datapoints decoded but refused by the stage behind, by `source` and `reason`.
pub const REJECTED_DATAPOINTS: &str = "fleetlake_ingest_rejected_datapoints_total";
/// Firehose requests refused before reading because too many were being read.
pub const REJECTED_IN_FLIGHT: &str = "fleetlake_ingest_rejected_in_flight_total";
/// CloudWatch API calls answered during backfill and gap fill, by `call`
/// (`GetMetricData`, `ListMetrics`).
pub const BACKFILL_CALLS: &str = "fleetlake_backfill_calls_total";
/// CloudWatch API calls throttled during backfill and gap fill, by `call`.
pub const BACKFILL_THROTTLED: &str = "fleetlake_backfill_throttled_total";
/// CloudWatch API calls that failed for good during backfill and gap fill, by `call`.
pub const BACKFILL_ERRORS: &str = "fleetlake_backfill_errors_total";
/// Datapoints (one per statistic and period) fetched by backfill and gap fill.
pub const BACKFILL_DATAPOINTS: &str = "fleetlake_backfill_datapoints_total";
/// Rows (one per series and period) written by backfill and gap fill.
pub const BACKFILL_ROWS: &str = "fleetlake_backfill_rows_total";

/// Registers descriptions for the ingest metrics.
pub fn describe() {
    metrics::describe_counter!(
        BACKFILL_CALLS,
        "CloudWatch API calls answered during backfill and gap fill, by call"
    );
    metrics::describe_counter!(
        BACKFILL_THROTTLED,
        "CloudWatch API calls throttled during backfill and gap fill, by call"
    );
    metrics::describe_counter!(
        BACKFILL_ERRORS,
        "CloudWatch API calls failed for good during backfill and gap fill, by call"
    );
    metrics::describe_counter!(
        BACKFILL_DATAPOINTS,
        "Datapoints fetched from CloudWatch by backfill and gap fill"
    );
    metrics::describe_counter!(
        BACKFILL_ROWS,
        "Metrics rows written by backfill and gap fill"
    );
    metrics::describe_counter!(REQUESTS, "Firehose requests handled, by source and status");
    metrics::describe_counter!(
        REQUEST_BYTES,
        "Request body bytes received, before decompression"
    );
    metrics::describe_counter!(RECORDS, "Records accepted (durable), by source");
    metrics::describe_counter!(
        RECEIVED_RECORDS,
        "Records decoded from what arrived, accepted or not, by source"
    );
    metrics::describe_counter!(
        RECEIVED_DATAPOINTS,
        "Datapoints decoded from what arrived, accepted or not, by source"
    );
    metrics::describe_counter!(
        REJECTED_RECORDS,
        "Records refused by the stage behind (retried by the sender), by source and reason"
    );
    metrics::describe_counter!(
        REJECTED_DATAPOINTS,
        "Datapoints refused by the stage behind (retried by the sender), by source and reason"
    );
    metrics::describe_counter!(
        REJECTED_IN_FLIGHT,
        "Firehose requests refused because too many were being read at once"
    );
    metrics::describe_counter!(DATAPOINTS, "Datapoints decoded and accepted");
    metrics::describe_counter!(LOG_EVENTS, "Log events decoded and accepted");
    metrics::describe_counter!(CONTROL_MESSAGES, "CloudWatch Logs control messages dropped");
    metrics::describe_counter!(
        DEAD_LETTERS,
        "Records (or parts) that could not be decoded, kept in the dead_letters table"
    );
    metrics::describe_histogram!(REQUEST_SECONDS, "Seconds to handle one Firehose request");
    metrics::describe_counter!(KINESIS_RECORDS, "Kinesis records read, by stream and shard");
    metrics::describe_counter!(
        KINESIS_BYTES,
        "Kinesis record bytes read, by stream and shard"
    );
    metrics::describe_gauge!(
        KINESIS_MILLIS_BEHIND,
        "MillisBehindLatest of the last GetRecords answer, by stream and shard"
    );
    metrics::describe_counter!(KINESIS_THROTTLED, "GetRecords calls throttled");
    metrics::describe_counter!(KINESIS_ITERATOR_RENEWALS, "Expired shard iterators renewed");
    metrics::describe_counter!(KINESIS_ERRORS, "Failed Kinesis calls, by stream and call");
    metrics::describe_gauge!(KINESIS_SHARDS, "Shards listed per stream");
}

/// Counts what was decoded from what arrived at `source`, before it is offered to the
/// stage behind.
pub fn record_received(source: &str, stats: crate::DecodeStats) {
    metrics::counter!(RECEIVED_RECORDS, "source" => source.to_string())
        .increment(stats.records as u64);
    metrics::counter!(RECEIVED_DATAPOINTS, "source" => source.to_string())
        .increment(stats.datapoints as u64);
}

/// Counts what the stage behind refused (`reason`: `overloaded`, `unavailable`).
pub fn record_rejected(source: &str, reason: &'static str, stats: crate::DecodeStats) {
    metrics::counter!(REJECTED_RECORDS, "source" => source.to_string(), "reason" => reason)
        .increment(stats.records as u64);
    metrics::counter!(REJECTED_DATAPOINTS, "source" => source.to_string(), "reason" => reason)
        .increment(stats.datapoints as u64);
}

/// Counts what a decoder read from `source` and the stage behind accepted.
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
