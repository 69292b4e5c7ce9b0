//! The Firehose HTTP endpoint delivery protocol as Firehose sees it.

use crate::support::*;

#[test]
fn plain_and_gzip_deliveries_are_queryable_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[("FLEETLAKE_BUFFER__FLUSH_INTERVAL", "1h")]);
    let records = fleet_records(25, 0..4, 50);
    for (i, chunk) in records.chunks(4).enumerate() {
        let mut request = FirehoseRequest::new(&format!("req-{i}"), chunk.to_vec());
        request.gzip = i % 2 == 0;
        let (status, body) = server.post(&request);
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["requestId"], format!("req-{i}"));
        assert!(body["timestamp"].as_i64().unwrap() > 1_700_000_000_000);
        assert!(body.get("errorMessage").is_none());
    }
    // Nothing is committed yet (flush interval 1h): every answer comes from the hot buffer.
    let rows = server.sql(
        "SELECT count(*) AS n, sum(sum) AS s, count(DISTINCT account_id) AS accounts, \
         max(stats['p99']) AS p99 FROM metrics",
    );
    assert_eq!(rows[0]["n"], 25 * 4 * 4);
    assert_eq!(rows[0]["s"].as_f64().unwrap(), fleet_sum(25, 0..4));
    assert_eq!(rows[0]["accounts"], 25);
    assert_eq!(rows[0]["p99"].as_f64().unwrap(), 27.0);
    let rows = server.sql(
        "SELECT dimensions['FunctionName'] AS f, count(*) AS n FROM metrics \
         WHERE metric_name = 'Errors' GROUP BY 1 ORDER BY 1",
    );
    assert_eq!(
        rows,
        vec![
            serde_json::json!({"f": "api", "n": 100}),
            serde_json::json!({"f": "worker", "n": 100}),
        ]
    );
}

#[test]
fn access_key_is_required_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &[("FLEETLAKE_FIREHOSE__ACCESS_KEY", "s3cret-key")],
    );
    let mut request = FirehoseRequest::new("auth-1", fleet_records(1, 0..1, 10));
    let (status, body) = server.post(&request);
    assert_eq!(status, 401);
    assert_eq!(body["requestId"], "auth-1");
    assert_eq!(body["errorMessage"], "missing access key");
    request.access_key = Some("s3cret-kez".into());
    let (status, body) = server.post(&request);
    assert_eq!(status, 401);
    assert_eq!(body["errorMessage"], "invalid access key");
    request.access_key = Some("s3cret-key".into());
    let (status, _) = server.post(&request);
    assert_eq!(status, 200);
    assert_eq!(server.sql("SELECT count(*) AS n FROM metrics")[0]["n"], 4);
}

#[test]
fn malformed_and_oversized_bodies_get_the_protocol_errors() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &[("FLEETLAKE_FIREHOSE__MAX_BODY_BYTES", "20000")],
    );
    let url = server.url("/firehose/metrics");

    let (status, body) = post_raw(&url, "bad-1", b"{not json".to_vec(), false, None);
    assert_eq!(status, 400);
    assert_eq!(body["requestId"], "bad-1");
    assert!(
        body["errorMessage"]
            .as_str()
            .unwrap()
            .contains("malformed request body")
    );

    let (status, body) = post_raw(&url, "bad-2", b"not gzip".to_vec(), true, None);
    assert_eq!(status, 400);
    assert!(
        body["errorMessage"].as_str().unwrap().contains("gzip"),
        "{body}"
    );

    let big = FirehoseRequest::new("big-1", fleet_records(20, 0..5, 100));
    assert!(big.body().len() > 20_000);
    let (status, body) = server.post(&big);
    assert_eq!(status, 413);
    assert_eq!(body["requestId"], "big-1");
    assert!(body["errorMessage"].as_str().unwrap().contains("limit"));

    // Small on the wire, over the limit once decompressed (a gzip bomb in miniature).
    let (status, _) = post_raw(&url, "big-2", gzip(&big.body()), true, None);
    assert_eq!(status, 413);

    // Firehose's GET health check.
    let response = client().get(&url).send().unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(server.sql("SELECT count(*) AS n FROM metrics")[0]["n"], 0);
}

#[test]
fn bad_lines_are_dead_lettered_and_the_good_lines_around_them_kept() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let good = datapoint("111122223333", "api", "Errors", 0, 5.0);
    let records = vec![
        format!("{good}\n{{\"broken\": \n{}", datapoint("111122223333", "api", "Errors", 1, 6.0)),
        r#"{"account_id":"","region":"us-east-1","namespace":"N","metric_name":"M","timestamp":1,"value":{}}"#.to_string(),
    ];
    let (status, body) = server.post(&FirehoseRequest::new("mixed-1", records));
    assert_eq!(status, 200, "{body}");
    server.wait_for_log("kept undecodable input as a dead letter");
    let rows = server.sql("SELECT count(*) AS n, sum(sum) AS s FROM metrics");
    assert_eq!(rows[0]["n"], 2);
    assert_eq!(rows[0]["s"].as_f64().unwrap(), 11.0);
    let metrics = server.metrics_text();
    let bad = metrics
        .lines()
        .find(|l| l.starts_with("fleetlake_ingest_dead_letters_total"))
        .unwrap_or_else(|| panic!("no dead letter counter in:\n{metrics}"));
    assert!(bad.ends_with(" 2"), "{bad}");
    assert!(bad.contains("source=\"firehose/metrics\""), "{bad}");
    assert!(metrics.contains("fleetlake_ingest_datapoints_total{source=\"firehose/metrics\"} 2"));
    let dead = server.sql("SELECT position FROM dead_letters ORDER BY position");
    assert_eq!(dead.len(), 2);
    assert_eq!(dead[0]["position"], "request mixed-1 record 0 line 2");
    assert_eq!(dead[1]["position"], "request mixed-1 record 1 line 1");
}
