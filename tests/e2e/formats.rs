//! Every format through the real binary: OpenTelemetry 1.0 and 0.7, CloudWatch Logs,
//! dead letters, and `fleetlake replay`, with producer-made fixtures.

use base64::Engine;

use crate::support::*;

fn count(server: &Server, sql: &str) -> i64 {
    server.sql(sql)[0]["n"].as_i64().unwrap()
}

#[test]
fn otel_0_7_and_1_0_endpoints_store_the_same_datapoints() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let (status, body) = post_records(
        &server,
        "/firehose/otel07",
        "o7-1",
        &[fixture("otel07.bin")],
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["requestId"], "o7-1");
    let rows = server.sql(
        "SELECT account_id, region, namespace, metric_name, unit, count, sum, min, max, \
         cardinality(dimensions) AS dims, cardinality(stats) AS nstats \
         FROM metrics ORDER BY account_id, metric_name",
    );
    assert_eq!(rows.len(), 4, "{rows:?}");
    let duration = &rows[0];
    assert_eq!(duration["account_id"], "111111111111");
    assert_eq!(duration["region"], "us-east-1");
    assert_eq!(duration["namespace"], "AWS/Lambda");
    assert_eq!(duration["metric_name"], "Duration");
    assert_eq!(duration["unit"], "Milliseconds");
    assert_eq!(duration["count"], 3.0);
    assert_eq!(duration["sum"], 30.5);
    assert_eq!(duration["min"], 2.5);
    assert_eq!(duration["max"], 21.0);
    assert_eq!(duration["dims"], 1);
    assert_eq!(duration["nstats"], 1);
    assert_eq!(rows[2]["metric_name"], "NetworkIn");
    assert_eq!(rows[2]["dims"], 2);
    assert_eq!(rows[3]["unit"], "Bytes/Second");
    assert_eq!(rows[3]["nstats"], 2);
    let dims = server.sql(
        "SELECT count(*) AS n FROM metrics WHERE dimensions['FunctionName'] = 'checkout' \
         AND stats['p99'] = 20.0",
    );
    assert_eq!(dims[0]["n"], 1);

    // The same datapoints in OpenTelemetry 1.0 are redeliveries, not new rows.
    let (status, body) = post_records(&server, "/firehose/otel", "o1-1", &[fixture("otel10.bin")]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(count(&server, "SELECT count(*) AS n FROM metrics"), 4);
    let (status, _) = post_records(&server, "/firehose/otel", "o1-2", &[fixture("otel10.bin")]);
    assert_eq!(status, 200);
    assert_eq!(count(&server, "SELECT count(*) AS n FROM metrics"), 4);
    assert_eq!(count(&server, "SELECT count(*) AS n FROM dead_letters"), 0);
}

const LOG_FIXTURES: [&str; 4] = [
    "cwlogs_data.json.gz",
    "cwlogs_control.json.gz",
    "cwlogs_two_members.gz",
    "cwlogs_account_policy.json.gz",
];

fn log_records() -> Vec<Vec<u8>> {
    LOG_FIXTURES.iter().map(|f| fixture(f)).collect()
}

#[test]
fn logs_endpoint_stores_events_once_and_drops_control_messages() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("FLEETLAKE_BUFFER__FLUSH_INTERVAL", "1h")];
    let server = Server::start(dir.path(), &env);
    let (status, body) = post_records(&server, "/firehose/logs", "logs-1", &log_records());
    assert_eq!(status, 200, "{body}");
    let by_account =
        server.sql("SELECT account_id, region, count(*) AS n FROM logs GROUP BY 1, 2 ORDER BY 1");
    let summary: Vec<_> = by_account
        .iter()
        .map(|r| {
            format!(
                "{} {} {}",
                r["account_id"].as_str().unwrap(),
                r["region"].as_str().unwrap(),
                r["n"]
            )
        })
        .collect();
    // Regions: from extractedFields, else the delivery stream's ARN (us-east-1).
    assert_eq!(
        summary,
        [
            "111111111111 us-east-1 3",
            "444444444444 us-east-1 2",
            "555555555555 us-east-1 1",
            "777777777777 ap-southeast-2 2"
        ]
    );
    let event = server.sql(
        "SELECT log_group, log_stream, event_id, message, subscription_filters[1] AS f, \
         CAST(time AS VARCHAR) AS t FROM logs WHERE log_group = '/aws/lambda/checkout' \
         ORDER BY time LIMIT 1",
    );
    assert_eq!(event[0]["log_stream"], "2025/11/24/[$LATEST]abc");
    assert_eq!(
        event[0]["event_id"],
        "39242515703851224573214586218375309742810634529128038400"
    );
    assert!(
        event[0]["message"]
            .as_str()
            .unwrap()
            .starts_with("START RequestId:")
    );
    assert_eq!(event[0]["f"], "fleet");
    assert!(
        event[0]["t"]
            .as_str()
            .unwrap()
            .starts_with("2025-11-24T16:00:01")
    );

    // A Firehose retry, in the buffer: nothing doubles.
    let (status, _) = post_records(&server, "/firehose/logs", "logs-1", &log_records());
    assert_eq!(status, 200);
    assert_eq!(count(&server, "SELECT count(*) AS n FROM logs"), 8);
    let metrics = server.metrics_text();
    assert!(
        metrics.contains("fleetlake_ingest_control_messages_total{source=\"firehose/logs\"} 2"),
        "{metrics}"
    );
    server.stop();

    // After the commit, a redelivery is checked against the lake.
    let server = Server::start(dir.path(), &env);
    let (status, _) = post_records(&server, "/firehose/logs", "logs-1", &log_records());
    assert_eq!(status, 200);
    server.stop();
    let out = lake_query(
        dir.path(),
        "csv",
        "SELECT count(*) AS n, count(DISTINCT event_id) AS ids FROM logs",
    );
    assert_eq!(out.lines().nth(1), Some("8,8"), "{out}");

    let py = python_json(
        r#"
import json, sys
from deltalake import DeltaTable
t = DeltaTable(sys.argv[1]).to_pyarrow_table()
print(json.dumps({"n": t.num_rows, "columns": t.schema.names,
                  "filters": sorted({f for fs in t["subscription_filters"].to_pylist() for f in fs})}))
"#,
        &[&dir.path().join("lake/logs")],
    );
    assert_eq!(py["n"], 8);
    assert_eq!(
        py["columns"],
        serde_json::json!([
            "time",
            "account_id",
            "region",
            "log_group",
            "log_stream",
            "event_id",
            "message",
            "subscription_filters",
            "day"
        ])
    );
    assert_eq!(
        py["filters"],
        serde_json::json!(["Destination", "FleetAccountPolicy", "fleet"])
    );
}

#[test]
fn undecodable_records_are_dead_lettered_acknowledged_and_kept_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let garbage = vec![vec![0xffu8, 0x00, 0x13, 0x37], b"\x0a\x05abc".to_vec()];
    // Every record undecodable: still 200 once they are durable as dead letters.
    let (status, body) = post_records(&server, "/firehose/otel", "dl-1", &garbage);
    assert_eq!(status, 200, "{body}");
    server.wait_for_log("kept undecodable input as a dead letter");
    // Good and bad records together: the good ones are stored.
    let mut mixed = garbage.clone();
    mixed.push(fixture("otel10.bin"));
    let (status, _) = post_records(&server, "/firehose/otel", "dl-2", &mixed);
    assert_eq!(status, 200);
    // A retry of the first request does not double its dead letters.
    let (status, _) = post_records(&server, "/firehose/otel", "dl-1", &garbage);
    assert_eq!(status, 200);
    assert_eq!(count(&server, "SELECT count(*) AS n FROM metrics"), 4);
    let rows = server.sql(
        "SELECT source, format, position, reason, data_base64 FROM dead_letters \
         ORDER BY position",
    );
    assert_eq!(rows.len(), 4, "{rows:?}");
    assert_eq!(rows[0]["source"], "firehose/otel");
    assert_eq!(rows[0]["format"], "otel1");
    assert_eq!(rows[0]["position"], "request dl-1 record 0 bytes 0..4");
    assert!(
        rows[0]["reason"].as_str().unwrap().contains("declares"),
        "{}",
        rows[0]["reason"]
    );
    let raw = base64::engine::general_purpose::STANDARD
        .decode(rows[0]["data_base64"].as_str().unwrap())
        .unwrap();
    assert_eq!(raw, garbage[0]);
    assert_eq!(rows[2]["position"], "request dl-2 record 0 bytes 0..4");

    // An undecodable base64 field is a dead letter too, and so is a bad JSON line.
    let body = br#"{"requestId":"dl-3","timestamp":1700000000000,"records":[{"data":"%%%"},{"data":"bm90IGpzb24="}]}"#;
    let (status, _) = post_raw(
        &server.url("/firehose/metrics"),
        "dl-3",
        body.to_vec(),
        false,
        None,
    );
    assert_eq!(status, 200);
    let rows = server.sql(
        "SELECT position, reason FROM dead_letters WHERE source = 'firehose/metrics' \
         ORDER BY position",
    );
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["position"], "request dl-3 record 0");
    assert!(rows[0]["reason"].as_str().unwrap().contains("base64"));
    assert_eq!(rows[1]["position"], "request dl-3 record 1 line 1");
    let metrics = server.metrics_text();
    let counted: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("fleetlake_ingest_dead_letters_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    // 2 + 2 + 2 (the retry is counted as received, then de-duplicated) + 2.
    assert_eq!(counted, 8.0, "{metrics}");
    server.stop();

    let py = python_json(
        r#"
import json, sys
from deltalake import DeltaTable
t = DeltaTable(sys.argv[1]).to_pyarrow_table()
print(json.dumps({"n": t.num_rows, "sources": sorted(set(t["source"].to_pylist()))}))
"#,
        &[&dir.path().join("lake/dead_letters")],
    );
    assert_eq!(py["n"], 6);
    assert_eq!(
        py["sources"],
        serde_json::json!(["firehose/metrics", "firehose/otel"])
    );
}

#[test]
fn kill_9_keeps_acknowledged_logs_and_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("FLEETLAKE_BUFFER__FLUSH_INTERVAL", "1h")];
    let server = Server::start(dir.path(), &env);
    let mut records = log_records();
    records.push(b"not gzip, not json".to_vec());
    let (status, _) = post_records(&server, "/firehose/logs", "crash-1", &records);
    assert_eq!(status, 200);
    let (status, _) = post_records(
        &server,
        "/firehose/otel",
        "crash-2",
        &[fixture("otel10.bin")],
    );
    assert_eq!(status, 200);
    server.kill9();

    let server = Server::start(dir.path(), &env);
    // The same requests again, as Firehose retries them after the crash.
    let (status, _) = post_records(&server, "/firehose/logs", "crash-1", &records);
    assert_eq!(status, 200);
    assert_eq!(count(&server, "SELECT count(*) AS n FROM logs"), 8);
    assert_eq!(count(&server, "SELECT count(*) AS n FROM metrics"), 4);
    assert_eq!(count(&server, "SELECT count(*) AS n FROM dead_letters"), 1);
    server.kill9();
    // The replayed rows were committed at the second start; the retry is in the WAL.
    let server = Server::start(dir.path(), &env);
    server.stop();
    let out = lake_query(
        dir.path(),
        "csv",
        "SELECT (SELECT count(*) FROM logs) AS l, (SELECT count(*) FROM metrics) AS m, \
         (SELECT count(*) FROM dead_letters) AS d",
    );
    assert_eq!(out.lines().nth(1), Some("8,4,1"), "{out}");
}

#[test]
fn replay_ingests_files_once_with_dead_letters_and_a_summary() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let files = dir.path().join("in");
    std::fs::create_dir_all(&files).unwrap();
    // Metric Streams JSON lines, gzip, with one bad line (line 3).
    let mut lines = fleet_records(5, 0..2, 5)
        .join("\n")
        .lines()
        .map(str::to_string)
        .collect::<Vec<_>>();
    lines.insert(2, "{\"broken\":".into());
    let ndjson = files.join("metrics.ndjson.gz");
    std::fs::write(&ndjson, gzip(lines.join("\n").as_bytes())).unwrap();
    // A saved Firehose request body of JSON records.
    let body = files.join("request.json");
    std::fs::write(
        &body,
        FirehoseRequest::new(
            "saved-1",
            vec![datapoint("999999999999", "saved", "Errors", 7, 3.0)],
        )
        .body(),
    )
    .unwrap();
    let otel = files.join("otel10.bin");
    std::fs::write(&otel, fixture("otel10.bin")).unwrap();
    let logs = files.join("logs.gz");
    std::fs::write(&logs, fixture("cwlogs_two_members.gz")).unwrap();

    let d = data.to_str().unwrap();
    let replay = |args: &[&str]| {
        let mut all = vec!["replay", "--data-dir", d];
        all.extend_from_slice(args);
        let (ok, out, err) = cli(&all);
        assert!(ok, "{err}");
        out
    };
    let out = replay(&[ndjson.to_str().unwrap(), body.to_str().unwrap()]);
    let expected_points = lines.len() - 1 + 1;
    assert!(
        out.contains(&format!("{expected_points} datapoints")) && out.contains("1 dead letters"),
        "{out}"
    );
    let out = replay(&["--format", "otel1", otel.to_str().unwrap()]);
    assert!(out.contains("4 datapoints"), "{out}");
    let out = replay(&["--format", "cwlogs", logs.to_str().unwrap()]);
    assert!(out.contains("3 log events"), "{out}");
    // Replaying again stores nothing twice.
    replay(&[ndjson.to_str().unwrap()]);

    let out = lake_query(
        &data,
        "csv",
        "SELECT (SELECT count(*) FROM metrics) AS m, (SELECT count(*) FROM logs) AS l, \
         (SELECT count(*) FROM dead_letters) AS d",
    );
    assert_eq!(
        out.lines().nth(1),
        Some(format!("{},3,1", expected_points + 4).as_str()),
        "{out}"
    );
    let out = lake_query(&data, "csv", "SELECT source, position FROM dead_letters");
    let row = out.lines().nth(1).unwrap();
    assert!(row.ends_with("metrics.ndjson.gz line 3"), "{row}");
    assert!(row.starts_with("replay:"), "{row}");

    // A running service owns the data directory: replay refuses to write beside it.
    let server = Server::start(&data, &[]);
    let (ok, _, err) = cli(&["replay", "--data-dir", d, ndjson.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("in use by another fleetlake process"), "{err}");
    server.stop();
    let (ok, _, err) = cli(&[
        "replay",
        "--data-dir",
        d,
        "--format",
        "yaml",
        ndjson.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(err.contains("unknown format"), "{err}");
}

#[test]
fn named_sources_choose_path_format_key_and_region() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("fleetlake.toml");
    std::fs::write(
        &config,
        "[sources.prod-logs]\npath = \"/in/prod-logs\"\nformat = \"cwlogs\"\n\
         access_key = \"prod-key\"\nregion = \"eu-north-1\"\n\n[sources.otel]\nenabled = false\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    let server = Server::start_with_args(&data, &[], &["--config", config.to_str().unwrap()]);
    let url = server.url("/in/prod-logs");
    let records = [fixture("cwlogs_data.json.gz"), b"\x1f\x8bnot gzip".to_vec()];
    let body = firehose_body("named-1", &records);
    for key in [None, Some("other-key")] {
        let (status, reply) = post_raw(&url, "named-1", body.clone(), false, key);
        assert_eq!(status, 401, "{reply}");
        assert_eq!(reply["requestId"], "named-1");
    }
    let (status, reply) = post_raw(&url, "named-1", body, false, Some("prod-key"));
    assert_eq!(status, 200, "{reply}");
    // The source's region wins over the delivery stream's (us-east-1 in the ARN).
    let rows = server.sql("SELECT region, count(*) AS n FROM logs GROUP BY region");
    assert_eq!(rows, [serde_json::json!({"region": "eu-north-1", "n": 3})]);
    let rows = server.sql("SELECT source, format, position FROM dead_letters");
    assert_eq!(
        rows,
        [
            serde_json::json!({"source": "firehose/prod-logs", "format": "cwlogs",
                            "position": "request named-1 record 1"})
        ]
    );
    // Built-in endpoints stay unless disabled.
    let (status, _) = post_records(&server, "/firehose/logs", "b-1", &records[..1]);
    assert_eq!(status, 200);
    let disabled = client()
        .post(server.url("/firehose/otel"))
        .body(firehose_body("o-1", &[fixture("otel10.bin")]))
        .send()
        .unwrap();
    assert_eq!(disabled.status().as_u16(), 404);
    server.stop();
}
