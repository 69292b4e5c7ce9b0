//! `fleetlake compact`: many small files of a day partition become one sorted file,
//! with the same rows for fleetlake's SQL and for the Python `deltalake` reader.

use std::path::Path;

use crate::support::*;

/// Parquet data files on disk under `table`'s day partitions.
fn parquet_files(data_dir: &Path, table: &str) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for day in std::fs::read_dir(data_dir.join("lake").join(table)).unwrap() {
        let day = day.unwrap().path();
        if !day
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("day=")
        {
            continue;
        }
        for file in std::fs::read_dir(&day).unwrap() {
            let file = file.unwrap().path();
            if file.extension().is_some_and(|e| e == "parquet") {
                files.push(file);
            }
        }
    }
    files
}

#[test]
fn compact_rewrites_a_day_into_one_sorted_file_with_the_same_rows() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[("FLEETLAKE_BUFFER__FLUSH_INTERVAL", "100ms")]);
    // Six flushes into one day: six small files, each sorted on its own.
    for minute in 0..6 {
        let versions = lake_versions(dir.path());
        let request = FirehoseRequest::new(
            &format!("compact-{minute}"),
            fleet_records(20, minute..minute + 1, 10),
        );
        assert_eq!(server.post(&request).0, 200);
        wait_for_commit_after(dir.path(), versions);
    }
    server.stop();
    assert!(parquet_files(dir.path(), "metrics").len() >= 6);
    let totals =
        "SELECT count(*) AS n, sum(sum) AS s, count(DISTINCT account_id) AS a FROM metrics";
    let before = lake_query(dir.path(), "csv", totals);
    assert_eq!(
        before.lines().nth(1),
        Some(format!("480,{:.1},20", fleet_sum(20, 0..6)).as_str())
    );

    let d = dir.path().to_str().unwrap();
    let (ok, out, err) = cli(&["compact", "--data-dir", d, "--vacuum-grace", "0s"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("metrics: 1 partition(s) rewritten") && out.contains("480 rows"),
        "{out}"
    );
    // One file for the day; the replaced ones are vacuumed (no grace asked for).
    let files = parquet_files(dir.path(), "metrics");
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(lake_query(dir.path(), "csv", totals), before);

    // An independent reader sees the same rows, sorted by account in the one file.
    let py = python_json(
        r#"
import json, sys
import pyarrow.parquet as pq
from deltalake import DeltaTable
t = DeltaTable(sys.argv[1]).to_pyarrow_table()
accounts = pq.read_table(sys.argv[2]).column("account_id").to_pylist()
print(json.dumps({"n": t.num_rows, "sorted": accounts == sorted(accounts)}))
"#,
        &[&dir.path().join("lake/metrics"), &files[0]],
    );
    assert_eq!(py["n"], 480);
    assert_eq!(py["sorted"], true);

    // Nothing left to do.
    let (ok, out, _) = cli(&["compact", "--data-dir", d, "--vacuum-grace", "0s"]);
    assert!(ok);
    assert!(out.contains("metrics: 0 partition(s) rewritten"), "{out}");
    let (ok, _, err) = cli(&[
        "compact",
        "--data-dir",
        dir.path().join("none").to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(err.contains("no lake here"), "{err}");
}

#[test]
fn the_service_compacts_while_requests_keep_coming() {
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("FLEETLAKE_BUFFER__FLUSH_INTERVAL", "100ms"),
        ("FLEETLAKE_LAKE__COMPACT_INTERVAL", "700ms"),
        ("FLEETLAKE_LAKE__COMPACT_MIN_FILES", "3"),
        // Replaced files are deleted soon, but not under a running query (a grace
        // shorter than the longest query fails that query).
        ("FLEETLAKE_LAKE__VACUUM_GRACE", "3s"),
        // The test data is from 2023: kept forever, not the default 15 days.
        ("FLEETLAKE_RETENTION__METRICS", "0s"),
    ];
    let server = Server::start(dir.path(), &env);
    // Requests keep coming before, during and after compaction runs; every answer
    // must count each datapoint once.
    for minute in 0..12 {
        let versions = lake_versions(dir.path());
        let request = FirehoseRequest::new(
            &format!("svc-{minute}"),
            fleet_records(10, minute..minute + 1, 10),
        );
        assert_eq!(server.post(&request).0, 200);
        let rows = server.sql("SELECT count(*) AS n, sum(sum) AS s FROM metrics");
        assert_eq!(rows[0]["n"], 40 * (minute + 1), "after minute {minute}");
        wait_for_commit_after(dir.path(), versions);
    }
    server.wait_for_log("compacted lake table");
    let metrics = server.metrics_text();
    assert!(
        metrics.contains("fleetlake_lake_compacted_partitions_total{table=\"metrics\"}"),
        "{metrics}"
    );
    server.stop();
    let out = lake_query(
        dir.path(),
        "csv",
        "SELECT count(*) AS n, \
         count(DISTINCT (account_id, time, metric_name, dimensions['FunctionName'])) AS k, \
         sum(sum) AS s FROM metrics",
    );
    assert_eq!(
        out.lines().nth(1),
        Some(format!("480,480,{:.1}", fleet_sum(10, 0..12)).as_str()),
        "{out}"
    );
    // Fewer files in the table than the twelve flushes made.
    let files = python_json(
        "import json, sys\nfrom deltalake import DeltaTable\nprint(json.dumps(len(DeltaTable(sys.argv[1]).file_uris())))",
        &[&dir.path().join("lake/metrics")],
    );
    assert!(files.as_u64().unwrap() < 12, "{files} files");
}
