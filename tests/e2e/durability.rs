//! Nothing acknowledged is lost, nothing redelivered is doubled: kill -9 and retries.

use crate::support::*;

fn totals(server: &Server) -> (i64, f64) {
    let rows = server.sql("SELECT count(*) AS n, sum(sum) AS s FROM metrics");
    (
        rows[0]["n"].as_i64().unwrap(),
        rows[0]["s"].as_f64().unwrap_or(0.0),
    )
}

/// Posts `records` as requests of 5 records from 4 concurrent senders (so WAL group
/// commits are shared); every request must be acknowledged.
fn post_concurrently(server: &Server, prefix: &str, records: &[String]) {
    let requests: Vec<_> = records.chunks(5).collect();
    std::thread::scope(|scope| {
        for sender in 0..4 {
            let requests = &requests;
            scope.spawn(move || {
                for (i, chunk) in requests.iter().enumerate().skip(sender).step_by(4) {
                    let mut request =
                        FirehoseRequest::new(&format!("{prefix}-{i}"), chunk.to_vec());
                    request.gzip = i % 3 == 0;
                    let (status, body) = server.post(&request);
                    assert_eq!(status, 200, "{body}");
                }
            });
        }
    });
}

#[test]
fn kill_9_right_after_200_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    // Only the WAL holds the data: no flush would happen for an hour.
    let env = [("FLEETLAKE_BUFFER__FLUSH_INTERVAL", "1h")];
    let server = Server::start(dir.path(), &env);
    let records = fleet_records(30, 0..5, 40);
    post_concurrently(&server, "a", &records);
    server.kill9();
    assert_eq!(
        lake_versions(dir.path()),
        1,
        "only the table creation is committed"
    );

    let server = Server::start(dir.path(), &env);
    assert_eq!(totals(&server), (30 * 4 * 5, fleet_sum(30, 0..5)));
    // The replayed data was committed at start, so the lake alone has it too.
    server.stop();
    let out = lake_query(
        dir.path(),
        "csv",
        "SELECT count(*) AS n, sum(sum) AS s, count(DISTINCT account_id) AS a FROM metrics",
    );
    assert_eq!(
        out.lines().nth(1).unwrap(),
        format!("600,{:.1},30", fleet_sum(30, 0..5))
    );
}

#[test]
fn kill_9_while_flushes_commit_neither_loses_nor_doubles() {
    let dir = tempfile::tempdir().unwrap();
    // Flushes start every 150 datapoints, so the kill lands between, during or after
    // lake commits and WAL truncations.
    let env = [
        ("FLEETLAKE_BUFFER__FLUSH_ROWS", "150"),
        ("FLEETLAKE_BUFFER__FLUSH_INTERVAL", "1h"),
    ];
    let server = Server::start(dir.path(), &env);
    let records = fleet_records(40, 0..6, 20);
    post_concurrently(&server, "b", &records);
    // On a loaded machine the first flush may still be sorting when the last request
    // is answered: the kill is meant to land among flushes, so wait for one commit.
    wait_until("a flush committed before the kill", || {
        lake_versions(dir.path()) > 1
    });
    server.kill9();

    let server = Server::start(dir.path(), &env);
    assert_eq!(totals(&server), (40 * 4 * 6, fleet_sum(40, 0..6)));
    // Every datapoint once in the lake itself: the sort key is unique per row.
    let dups = server.sql(
        "SELECT count(*) AS n FROM (SELECT account_id, metric_name, dimensions['FunctionName'], time \
         FROM metrics GROUP BY 1, 2, 3, 4 HAVING count(*) > 1)",
    );
    assert_eq!(dups[0]["n"], 0);
}

#[test]
fn redelivered_requests_and_datapoints_are_kept_once() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("FLEETLAKE_BUFFER__FLUSH_INTERVAL", "300ms")];
    let server = Server::start(dir.path(), &env);
    let first = FirehoseRequest::new("retry-1", fleet_records(5, 0..2, 10));
    let expected = (5 * 4 * 2, fleet_sum(5, 0..2));

    // A retry of the same request while it is still in the hot buffer.
    assert_eq!(server.post(&first).0, 200);
    assert_eq!(server.post(&first).0, 200);
    assert_eq!(totals(&server), expected);

    // A retry after the data was committed to the lake (and the flush finished: while
    // it runs, a retry is a duplicate of the rows being flushed, caught in the buffer).
    server.wait_for_log("committed flush to lake");
    let before = lake_versions(dir.path());
    assert_eq!(server.post(&first).0, 200);
    wait_for_commit_after(dir.path(), before);
    assert_eq!(totals(&server), expected);

    // After a crash, with the same datapoints in a new request alongside new ones.
    server.kill9();
    let server = Server::start(dir.path(), &env);
    let mut records = fleet_records(5, 0..2, 10);
    records.extend(fleet_records(5, 2..3, 10));
    let versions = lake_versions(dir.path());
    assert_eq!(
        server.post(&FirehoseRequest::new("other-id", records)).0,
        200
    );
    wait_for_commit_after(dir.path(), versions);
    assert_eq!(totals(&server), (5 * 4 * 3, fleet_sum(5, 0..3)));
    server.stop();
    let out = lake_query(dir.path(), "json", "SELECT count(*) AS n FROM metrics");
    assert_eq!(out.trim(), r#"[{"n":60}]"#);
}
