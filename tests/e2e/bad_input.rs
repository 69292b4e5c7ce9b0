//! A corpus of bad input tried against every endpoint: each case gets the documented
//! answer (Firehose's JSON error body with the status it retries or not, SQL errors with
//! their SQLSTATE), the good data around bad data is kept, and the service goes on
//! serving.

use std::io::Write;
use std::process::Command;

use crate::support::*;

/// One Firehose delivery with full control over headers and body.
struct Raw<'a> {
    path: &'a str,
    request_id: &'a str,
    content_type: Option<&'a str>,
    gzip: bool,
    /// Sent chunked, without a Content-Length.
    chunked: bool,
    body: Vec<u8>,
}

impl Raw<'_> {
    fn send(&self, server: &Server) -> (u16, serde_json::Value) {
        let mut req = client()
            .post(server.url(self.path))
            .header("X-Amz-Firehose-Protocol-Version", "1.0")
            .header("X-Amz-Firehose-Request-Id", self.request_id);
        req = if self.chunked {
            req.body(reqwest::blocking::Body::new(std::io::Cursor::new(
                self.body.clone(),
            )))
        } else {
            req.body(self.body.clone())
        };
        if let Some(kind) = self.content_type {
            req = req.header("Content-Type", kind);
        }
        if self.gzip {
            req = req.header("Content-Encoding", "gzip");
        }
        let response = req.send().unwrap();
        let status = response.status().as_u16();
        assert_eq!(response.headers()["content-type"], "application/json");
        let body: serde_json::Value = serde_json::from_str(&response.text().unwrap()).unwrap();
        (status, body)
    }
}

fn raw<'a>(path: &'a str, request_id: &'a str, body: Vec<u8>) -> Raw<'a> {
    Raw {
        path,
        request_id,
        content_type: Some("application/json"),
        gzip: false,
        chunked: false,
        body,
    }
}

/// A Firehose body whose records are `records`, base64-encoded.
fn records(request_id: &str, records: &[&[u8]]) -> Vec<u8> {
    let owned: Vec<Vec<u8>> = records.iter().map(|r| r.to_vec()).collect();
    firehose_body(request_id, &owned)
}

fn good(minute: i64) -> String {
    datapoint(&account_id(1), "f", "Errors", minute, 1.0)
}

/// The rejection: status, the same request id, an error message containing `says`.
fn assert_rejected(answer: (u16, serde_json::Value), status: u16, request_id: &str, says: &str) {
    let (got, body) = answer;
    assert_eq!(got, status, "{body}");
    assert_eq!(body["requestId"], request_id, "{body}");
    let message = body["errorMessage"].as_str().unwrap_or_default();
    assert!(message.contains(says), "{says:?} not in {body}");
}

#[test]
fn bad_input_gets_the_documented_answer_and_the_service_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &[
            ("FLEETLAKE_BUFFER__FLUSH_INTERVAL", "200ms"),
            // Small enough to try a gzip bomb and an oversized body quickly.
            ("FLEETLAKE_FIREHOSE__MAX_BODY_BYTES", "4000000"),
        ],
    );
    let metrics = "/firehose/metrics";

    // --- Requests Firehose would retry or give up on: nothing of them is kept. ---
    let mut gz = gzip(&records("trunc", &[good(0).as_bytes()]));
    gz.truncate(gz.len() / 2);
    let mut truncated = raw(metrics, "trunc", gz);
    truncated.gzip = true;
    assert_rejected(truncated.send(&server), 400, "trunc", "invalid gzip body");

    // 64 MB of zeros in 62 KB: refused once 4 MB are inflated, not buffered whole.
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(9));
    for _ in 0..64 {
        enc.write_all(&vec![0u8; 1 << 20]).unwrap();
    }
    let mut bomb = raw(metrics, "bomb", enc.finish().unwrap());
    bomb.gzip = true;
    assert_rejected(bomb.send(&server), 413, "bomb", "decompressed body is over");

    // Four times the limit, chunked (found while reading) and with its length declared
    // (refused at once): either way the server reads and drops the body before it
    // answers, so the sender, still writing, gets the 413 and not a broken pipe (16 MB
    // do not fit in loopback's socket buffers).
    for chunked in [true, false] {
        let mut oversized = raw(metrics, "big", vec![b' '; 16_000_000]);
        oversized.chunked = chunked;
        assert_rejected(
            oversized.send(&server),
            413,
            "big",
            "over the 4000000 byte limit",
        );
    }

    assert_rejected(
        raw(metrics, "notjson", b"{\"records\": [".to_vec()).send(&server),
        400,
        "notjson",
        "malformed request body",
    );
    assert_rejected(
        raw(metrics, "empty", Vec::new()).send(&server),
        400,
        "empty",
        "malformed request body",
    );
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    assert_rejected(
        raw(metrics, "deep", deep.into_bytes()).send(&server),
        400,
        "deep",
        "malformed request body",
    );

    let line = good(1);
    let many: Vec<&[u8]> = vec![line.as_bytes(); 10_001];
    assert_rejected(
        raw(metrics, "many", records("many", &many)).send(&server),
        400,
        "many",
        "10001 records in one request, at most 10000",
    );

    let mut text = raw(metrics, "text", records("text", &[good(2).as_bytes()]));
    text.content_type = Some("text/plain");
    assert_rejected(
        text.send(&server),
        415,
        "text",
        "Firehose deliveries are application/json",
    );

    assert_rejected(
        raw(
            metrics,
            "header-id",
            records("body-id", &[good(3).as_bytes()]),
        )
        .send(&server),
        400,
        "header-id",
        "is not the x-amz-firehose-request-id header's",
    );

    // --- Requests with bad records: 200, the bad records are dead letters, the good
    // lines around them are kept. ---
    let huge =
        datapoint(&account_id(1), "f", "Errors", 10, 1.0).replace("\"sum\":1.0", "\"sum\":1e400");
    let nan =
        datapoint(&account_id(1), "f", "Errors", 11, 1.0).replace("\"sum\":1.0", "\"sum\":NaN");
    let nan_text =
        datapoint(&account_id(1), "f", "Errors", 12, 1.0).replace("\"sum\":1.0", "\"sum\":\"NaN\"");
    let deep_line = format!("{{\"a\":{}1{}}}", "[".repeat(10_000), "]".repeat(10_000));
    let mixed = [
        format!("{}\n{huge}\n{}", good(20), good(21)),
        format!("{nan}\n{}", good(22)),
        format!("{nan_text}\n{deep_line}\n{}", good(23)),
    ];
    let mut invalid_utf8 = good(24).into_bytes();
    invalid_utf8[10] = 0xff;
    let oversized_record = format!("{}\n{}", good(25), " ".repeat(1_024_001));
    let mut body = records(
        "mixed",
        &[
            mixed[0].as_bytes(),
            mixed[1].as_bytes(),
            mixed[2].as_bytes(),
            &invalid_utf8,
            oversized_record.as_bytes(),
        ],
    );
    // One more record that is not base64 at all.
    let mut envelope: serde_json::Value = serde_json::from_slice(&body).unwrap();
    envelope["records"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"data": "%%% not base64 %%%"}));
    body = envelope.to_string().into_bytes();
    let (status, answer) = raw(metrics, "mixed", body).send(&server);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["requestId"], "mixed");
    assert!(answer.get("errorMessage").is_none());

    // Other formats' endpoints: garbage records are dead letters, not crashes.
    for path in ["/firehose/otel", "/firehose/logs"] {
        let junk: Vec<&[u8]> = vec![
            b"\x00\x01\x02 not protobuf",
            b"\x1f\x8b\x08 not gzip either",
            &invalid_utf8,
        ];
        let (status, answer) = raw(path, "junk", records("junk", &junk)).send(&server);
        assert_eq!(status, 200, "{path}: {answer}");
    }

    // --- SQL: errors name what is wrong; the HTTP API answers JSON. ---
    let sql_error = |sql: &str| {
        let response = client()
            .post(server.url("/api/v1/sql"))
            .body(sql.to_string())
            .send()
            .unwrap();
        let status = response.status().as_u16();
        (status, response.text().unwrap())
    };
    let (status, body) = sql_error("SELEC 1");
    assert_eq!(status, 400, "{body}");
    let (status, body) = sql_error("DROP TABLE metrics");
    assert!(status == 400 || status == 403, "{status} {body}");
    let (status, body) = sql_error(&format!(
        "SELECT {}1{}",
        "(".repeat(5_000),
        ")".repeat(5_000)
    ));
    assert!((400..500).contains(&status), "{status} {body}");
    let (status, body) = sql_error("");
    assert_eq!(status, 400, "{body}");

    // Postgres: syntax errors and unknown tables come back with their SQLSTATE.
    let psql = |sql: &str| {
        let out = Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                server.pg_port(),
                "-U",
                "analyst",
                "-d",
                "fleetlake",
            ])
            .args([
                "-X",
                "-v",
                "ON_ERROR_STOP=1",
                "-v",
                "VERBOSITY=verbose",
                "-c",
                sql,
            ])
            .env("PGCONNECT_TIMEOUT", "20")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, err) = psql("SELEC 1");
    assert!(!ok && err.contains("42601"), "{err}");
    let (ok, err) = psql("SELECT * FROM no_such_table");
    assert!(!ok && err.contains("42P01"), "{err}");

    // --- Still serving, and exactly the good data is there. ---
    let (status, answer) =
        raw(metrics, "after", records("after", &[good(30).as_bytes()])).send(&server);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(server.get_json("/health").0, 200);
    wait_until("the good lines", || {
        server.sql("SELECT count(*) AS n FROM metrics")[0]["n"] == 5
    });
    let minutes: Vec<i64> = server
        .sql("SELECT CAST(date_part('minute', time) AS BIGINT) AS m FROM metrics ORDER BY time")
        .iter()
        .map(|r| r["m"].as_i64().unwrap())
        .collect();
    let base = (1_700_000_000_000i64 / 60_000) % 60;
    // Not 24 (its record is not UTF-8) nor 25 (its record is over the size limit).
    let expected: Vec<i64> = [20, 21, 22, 23, 30]
        .iter()
        .map(|m| (base + m) % 60)
        .collect();
    assert_eq!(minutes, expected);
    // Every bad record of the mixed request is a dead letter: the huge number, both
    // NaNs, the deep line, the invalid UTF-8 record, the oversized record, the one that
    // is not base64; and the junk records of the other endpoints.
    let dead =
        server.sql("SELECT count(*) AS n FROM dead_letters WHERE position LIKE 'request mixed %'");
    assert_eq!(dead[0]["n"], 7, "{dead:?}");
    let metrics_text = server.metrics_text();
    // Failed statements are counted for both protocols, by kind: of the HTTP 400s
    // above, the syntax error and the empty body as errors, the write as refused (as
    // on Postgres); the two psql errors.
    let failed = |protocol: &str, status: &str| -> u64 {
        metrics_text
            .lines()
            .find(|l| {
                l.starts_with("fleetlake_query_total{")
                    && l.contains(&format!("status=\"{status}\""))
                    && l.contains(&format!("protocol=\"{protocol}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    assert!(failed("http", "error") >= 2, "{metrics_text}");
    assert!(failed("http", "refused") >= 1, "{metrics_text}");
    assert_eq!(failed("postgres", "error"), 2, "{metrics_text}");
    assert!(metrics_text.contains("fleetlake_ingest_dead_letters_total"));
    assert!(metrics_text.contains("status=\"413\""));
    assert!(metrics_text.contains("status=\"415\""));
}
