//! Roll-ups and retention: `metrics_5m` and `metrics_1h` follow `metrics`, late data
//! and redeliveries included; compaction merges partial rows; a replayed hour changes
//! nothing; retention removes expired days.

use std::collections::BTreeMap;

use crate::support::*;

/// (bucket start s, account, function, metric) -> (count, sum, min, max, p99).
type Model = BTreeMap<(i64, String, String, String), (f64, f64, f64, f64, f64)>;

/// What `fleet_records(accounts, minutes)` rolls up to with buckets of `width` seconds.
fn model(accounts: usize, minutes: std::ops::Range<i64>, width: i64) -> Model {
    let mut model = Model::new();
    for minute in minutes {
        let t = (1_700_000_000_000i64 / 60_000 * 60_000 + minute * 60_000) / 1000;
        for a in 0..accounts {
            for f in ["api", "worker"] {
                for m in ["Errors", "Invocations"] {
                    let v = (a as i64 + minute) as f64;
                    let key = (t - t.rem_euclid(width), account_id(a), f.into(), m.into());
                    let e = model
                        .entry(key)
                        .or_insert((0.0, 0.0, f64::MAX, f64::MIN, f64::MIN));
                    e.0 += 1.0;
                    e.1 += v;
                    e.2 = e.2.min(v);
                    e.3 = e.3.max(v);
                    e.4 = e.4.max(v);
                }
            }
        }
    }
    model
}

fn rows_as_model(rows: &[serde_json::Value]) -> Model {
    rows.iter()
        .map(|r| {
            let f = |k: &str| r[k].as_f64().unwrap();
            (
                (
                    r["t"].as_i64().unwrap(),
                    r["account_id"].as_str().unwrap().to_string(),
                    r["f"].as_str().unwrap().to_string(),
                    r["metric_name"].as_str().unwrap().to_string(),
                ),
                (f("count"), f("sum"), f("min"), f("max"), f("p99")),
            )
        })
        .collect()
}

const ROLLUP_SQL: &str = "SELECT CAST(to_unixtime(time) AS BIGINT) AS t, account_id, \
     dimensions['FunctionName'] AS f, metric_name, count, sum, min, max, stats['p99'] AS p99 FROM ";

#[test]
fn rollups_follow_metrics_with_late_data_and_compaction_merges_partials() {
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("FLEETLAKE_BUFFER__FLUSH_INTERVAL", "100ms"),
        ("FLEETLAKE_LAKE__ROLLUP_INTERVAL", "200ms"),
        ("FLEETLAKE_LAKE__COMPACT_INTERVAL", "0s"),
    ];
    let server = Server::start(dir.path(), &env);
    let minutes_of = |parity: i64| -> Vec<String> {
        (0..12)
            .filter(|m| m % 2 == parity)
            .flat_map(|m| fleet_records(6, m..m + 1, 24))
            .collect()
    };
    // Even minutes first: every bucket gets rolled up once...
    assert_eq!(
        server.post(&FirehoseRequest::new("even", minutes_of(0))).0,
        200
    );
    wait_until("even minutes rolled up", || {
        server.sql("SELECT count(*) AS n FROM metrics_1h_partials")[0]["n"].as_u64() > Some(0)
            && server.sql("SELECT sum(count) AS c FROM metrics_5m")[0]["c"].as_f64()
                == Some(6.0 * 4.0 * 6.0)
    });
    // ...then the odd minutes arrive late, for buckets already rolled up, and one even
    // minute is delivered again (a Firehose retry with a new request id).
    assert_eq!(
        server.post(&FirehoseRequest::new("odd", minutes_of(1))).0,
        200
    );
    assert_eq!(
        server
            .post(&FirehoseRequest::new("again", fleet_records(6, 4..5, 24)))
            .0,
        200
    );
    let want_5m = model(6, 0..12, 300);
    let want_1h = model(6, 0..12, 3600);
    // Each roll-up table commits on its own: wait for both.
    wait_until("late minutes rolled up", || {
        rows_as_model(&server.sql(&format!("{ROLLUP_SQL} metrics_5m"))) == want_5m
            && rows_as_model(&server.sql(&format!("{ROLLUP_SQL} metrics_1h"))) == want_1h
    });
    assert_eq!(
        rows_as_model(&server.sql(&format!("{ROLLUP_SQL} metrics_1h"))),
        want_1h
    );
    // The late rows are further partial rows of buckets that had some.
    let partials = server.sql("SELECT count(*) AS n FROM metrics_5m_partials")[0]["n"]
        .as_u64()
        .unwrap();
    assert!(partials > want_5m.len() as u64, "{partials} partial rows");
    server.stop();

    // Compaction merges partials: one row per series and bucket in the files, so any
    // Delta reader sees the roll-up without merging it itself.
    let d = dir.path().to_str().unwrap();
    let (ok, out, err) = cli(&["compact", "--data-dir", d, "--vacuum-grace", "0s"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("metrics_5m: 1 partition(s) rewritten"),
        "{out}"
    );
    let py = python_json(
        "import json, sys\nfrom deltalake import DeltaTable\n\
         t = DeltaTable(sys.argv[1]).to_pyarrow_table()\n\
         print(json.dumps([t.num_rows, sum(t.column('count').to_pylist()), sum(t.column('sum').to_pylist())]))",
        &[&dir.path().join("lake/metrics_5m")],
    );
    let total_sum: f64 = want_5m.values().map(|v| v.1).sum();
    assert_eq!(
        py,
        serde_json::json!([want_5m.len(), 6.0 * 4.0 * 12.0, total_sum])
    );
    let q = |sql: &str| lake_query(dir.path(), "json", sql);
    let after: Vec<serde_json::Value> =
        serde_json::from_str(&q(&format!("{ROLLUP_SQL} metrics_5m"))).unwrap();
    assert_eq!(rows_as_model(&after), want_5m);

    // Replaying the same hour from a file changes no table.
    let file = dir.path().join("again.ndjson");
    std::fs::write(&file, fleet_records(6, 0..12, 1000).join("\n")).unwrap();
    let tables = "SELECT (SELECT count(*) FROM metrics) AS m, (SELECT sum(sum) FROM metrics) AS s";
    let before = q(tables);
    let (ok, _, err) = cli(&[
        "replay",
        "--data-dir",
        d,
        "--format",
        "json",
        file.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let (ok, out, err) = cli(&["compact", "--data-dir", d]);
    assert!(ok, "{err}");
    assert!(
        out.contains("metrics_5m: ") && out.contains("into 0 row(s)"),
        "{out}"
    );
    assert_eq!(q(tables), before);
    let replayed: Vec<serde_json::Value> =
        serde_json::from_str(&q(&format!("{ROLLUP_SQL} metrics_5m"))).unwrap();
    assert_eq!(rows_as_model(&replayed), want_5m);
}

#[test]
fn retention_removes_expired_days_per_table() {
    let dir = tempfile::tempdir().unwrap();
    // The test data is from November 2023: with a year of retention for metrics it is
    // gone at the first compaction run, while logs (kept forever here) stay.
    let server = Server::start(
        dir.path(),
        &[
            ("FLEETLAKE_BUFFER__FLUSH_INTERVAL", "100ms"),
            ("FLEETLAKE_LAKE__COMPACT_INTERVAL", "0s"),
            ("FLEETLAKE_LAKE__ROLLUP_INTERVAL", "0s"),
        ],
    );
    assert_eq!(
        server
            .post(&FirehoseRequest::new("old", fleet_records(3, 0..2, 24)))
            .0,
        200
    );
    wait_until("committed", || {
        server.sql("SELECT count(*) AS n FROM metrics")[0]["n"].as_u64() == Some(24)
    });
    server.stop();
    assert!(lake_query(dir.path(), "csv", "SELECT count(*) FROM metrics").contains("24"));
    let server = Server::start(
        dir.path(),
        &[
            ("FLEETLAKE_LAKE__COMPACT_INTERVAL", "200ms"),
            ("FLEETLAKE_LAKE__ROLLUP_INTERVAL", "0s"),
            ("FLEETLAKE_RETENTION__METRICS", "365d"),
        ],
    );
    wait_until("expired metrics removed", || {
        server.sql("SELECT count(*) AS n FROM metrics")[0]["n"].as_u64() == Some(0)
    });
    // The counter follows the commit that removed the files: wait for it too.
    wait_until("the removal counted", || {
        server
            .metrics_text()
            .lines()
            .any(|l| l.starts_with("fleetlake_retention_removed_files_total{table=\"metrics\"}"))
    });
    server.stop();
}
