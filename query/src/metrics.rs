//! Names of the metrics the query stage emits.

/// SQL statements run, by `protocol` (`http`, `postgres`) and `status` (`ok`,
/// `error`, `refused`, `timeout`, `memory_limit`, `canceled`, `unauthenticated`,
/// `busy`, `too_complex`).
pub const QUERIES: &str = "fleetlake_query_total";
/// Seconds per SQL statement, by `protocol`.
pub const QUERY_SECONDS: &str = "fleetlake_query_duration_seconds";
/// Clients' statements running now (admitted, last row not yet sent).
pub const RUNNING: &str = "fleetlake_query_running";
/// Postgres connections accepted, and authentication failures, by `result`.
pub const PG_CONNECTIONS: &str = "fleetlake_pg_connections_total";
/// HTTPS connections whose TLS handshake failed or timed out.
pub const TLS_HANDSHAKE_FAILURES: &str = "fleetlake_tls_handshake_failures_total";

/// Registers descriptions for the query metrics.
pub fn describe() {
    metrics::describe_counter!(QUERIES, "SQL statements run, by protocol and status");
    metrics::describe_histogram!(QUERY_SECONDS, "Seconds per SQL statement, by protocol");
    metrics::describe_gauge!(
        RUNNING,
        "Clients' statements running now, under query.max_concurrent"
    );
    metrics::describe_counter!(
        PG_CONNECTIONS,
        "Postgres connections, by result (accepted, auth_failed, tls_required)"
    );
    metrics::describe_counter!(
        TLS_HANDSHAKE_FAILURES,
        "HTTPS connections whose TLS handshake failed or timed out"
    );
}
