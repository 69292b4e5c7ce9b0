//! Names of the metrics the query stage emits.

/// SQL queries run over HTTP, by `status` (`ok`, `error`).
pub const QUERIES: &str = "fleetlake_query_total";
/// Seconds per SQL query.
pub const QUERY_SECONDS: &str = "fleetlake_query_duration_seconds";

/// Registers descriptions for the query metrics.
pub fn describe() {
    metrics::describe_counter!(QUERIES, "SQL queries run, by status");
    metrics::describe_histogram!(QUERY_SECONDS, "Seconds per SQL query");
}
