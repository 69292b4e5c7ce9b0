//! The lake as other engines see it: the Python `deltalake` package reads it.

use crate::support::*;

#[test]
fn python_deltalake_reads_the_same_rows() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[("FLEETLAKE_BUFFER__FLUSH_INTERVAL", "1h")]);
    // Two days, so the table has two partitions.
    let mut records = fleet_records(10, 0..3, 25);
    records.extend(fleet_records(10, 1440..1442, 25));
    for (i, chunk) in records.chunks(3).enumerate() {
        assert_eq!(
            server
                .post(&FirehoseRequest::new(&format!("py-{i}"), chunk.to_vec()))
                .0,
            200
        );
    }
    let sql = server.sql(
        "SELECT count(*) AS n, sum(sum) AS s, count(DISTINCT account_id) AS a, \
         count(DISTINCT day) AS d FROM metrics",
    );
    server.stop();

    let script = r#"
import json, sys
from deltalake import DeltaTable
import pyarrow.compute as pc
dt = DeltaTable(sys.argv[1])
t = dt.to_pyarrow_table()
files = dt.file_uris()
print(json.dumps({
    "n": t.num_rows,
    "s": pc.sum(t["sum"]).as_py(),
    "a": len(pc.unique(t["account_id"])),
    "d": len(pc.unique(t["day"])),
    "partitions": sorted(dt.metadata().partition_columns),
    "files": len(files),
    "p99": pc.max(pc.map_lookup(t["stats"], "p99", "first")).as_py(),
    "function": t["dimensions"][0].as_py(),
    "time_type": str(t.schema.field("time").type),
}))
"#;
    let py = python_json(script, &[&dir.path().join("lake/metrics")]);
    assert_eq!(py["n"], sql[0]["n"]);
    assert_eq!(py["n"], 10 * 4 * 5);
    assert_eq!(py["s"].as_f64(), sql[0]["s"].as_f64());
    assert_eq!(py["a"], 10);
    assert_eq!(py["d"], 2);
    assert_eq!(sql[0]["d"], 2);
    assert_eq!(py["partitions"], serde_json::json!(["day"]));
    assert_eq!(
        py["files"], 2,
        "one file per day partition, not per request"
    );
    assert_eq!(py["p99"].as_f64(), Some((9 + 1441) as f64));
    assert_eq!(py["function"], serde_json::json!([["FunctionName", "api"]]));
    assert_eq!(py["time_type"], "timestamp[us, tz=UTC]");
}
