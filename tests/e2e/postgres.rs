//! The Postgres wire protocol with real clients: psql (simple protocol, `\d`),
//! psycopg (extended protocol, parameters, binary results, transactions), refused
//! statements, credentials limited to accounts (Postgres and HTTP), runaway queries
//! stopped by their limits, and every Grafana dashboard query.

use std::path::Path;
use std::process::Command;

use crate::support::*;

/// Lambda metrics of `accounts` accounts × 3 functions × 5 metrics over the last
/// `minutes` minutes (ending at the current minute), as Firehose records of 200 lines.
/// Errors = account index + 1 per minute and function, Invocations = 100.
fn lambda_fleet(accounts: usize, minutes: i64) -> Vec<String> {
    let now_minute = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        / 60_000;
    let mut lines = Vec::new();
    for m in 0..minutes {
        let ts = (now_minute - m) * 60_000;
        for a in 0..accounts {
            let account = account_id(a);
            let region = if a % 2 == 0 { "us-east-1" } else { "eu-west-1" };
            for function in ["checkout", "billing", "search"] {
                for (metric, sum, p99) in [
                    ("Invocations", 100.0, None),
                    ("Errors", (a + 1) as f64, None),
                    ("Throttles", (a % 3) as f64, None),
                    ("Duration", 1000.0 + a as f64, Some(80.0 + a as f64)),
                    ("ConcurrentExecutions", 5.0, None),
                ] {
                    let stats = p99.map(|p| format!(r#","p99":{p:.1}"#)).unwrap_or_default();
                    lines.push(format!(
                        r#"{{"metric_stream_name":"fleet","account_id":"{account}","region":"{region}","namespace":"AWS/Lambda","metric_name":"{metric}","dimensions":{{"FunctionName":"{function}"}},"timestamp":{ts},"value":{{"count":1.0,"sum":{sum:.1},"max":{sum:.1},"min":{sum:.1}{stats}}},"unit":"Count"}}"#
                    ));
                }
            }
        }
    }
    lines.chunks(200).map(|c| c.join("\n")).collect()
}

/// CloudWatch Logs subscription payloads (gzip, as Firehose delivers them): for each
/// account, `events` events in `/aws/lambda/checkout` over the last minutes.
fn lambda_logs(accounts: usize, events: usize) -> Vec<Vec<u8>> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    (0..accounts)
        .map(|a| {
            let account = account_id(a);
            let log_events: Vec<serde_json::Value> = (0..events)
                .map(|i| {
                    serde_json::json!({
                        "id": format!("{a:04}{i:06}"),
                        "timestamp": now - (i as i64) * 7_000,
                        "message": format!("ERROR request {i} failed in account {account}"),
                    })
                })
                .collect();
            let payload = serde_json::json!({
                "messageType": "DATA_MESSAGE",
                "owner": account,
                "logGroup": "/aws/lambda/checkout",
                "logStream": "2026/11/28/[$LATEST]abc",
                "subscriptionFilters": ["errors"],
                "logEvents": log_events,
            });
            gzip(payload.to_string().as_bytes())
        })
        .collect()
}

fn post_fleet(server: &Server, accounts: usize, minutes: i64) {
    let records = lambda_fleet(accounts, minutes);
    for (i, chunk) in records.chunks(50).enumerate() {
        let (status, body) =
            server.post(&FirehoseRequest::new(&format!("fleet-{i}"), chunk.to_vec()));
        assert_eq!(status, 200, "{body}");
    }
    let (status, body) = post_records(
        server,
        "/firehose/logs",
        "logs-1",
        &lambda_logs(accounts, 20),
    );
    assert_eq!(status, 200, "{body}");
}

fn psql(
    server: &Server,
    user: &str,
    password: Option<&str>,
    args: &[&str],
) -> (bool, String, String) {
    let mut command = Command::new("psql");
    command
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            server.pg_port(),
            "-U",
            user,
            "-d",
            "fleetlake",
        ])
        .args(["-X", "-v", "ON_ERROR_STOP=1"])
        .args(args)
        .env("PGCONNECT_TIMEOUT", "20")
        .env_remove("PGPASSWORD");
    if let Some(password) = password {
        command.env("PGPASSWORD", password);
    }
    let out = command
        .output()
        .expect("psql (postgresql-client) is installed by scripts/test.sh");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn psql_and_psycopg_query_the_lake_and_writes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[("FLEETLAKE_BUFFER__FLUSH_INTERVAL", "1s")]);
    post_fleet(&server, 4, 10);

    // psql, simple protocol: several statements in one message, BEGIN/COMMIT accepted.
    let (ok, out, err) = psql(
        &server,
        "analyst",
        None,
        &[
            "-A",
            "-t",
            "-c",
            "BEGIN; SELECT count(*) FROM metrics; SELECT count(DISTINCT account_id) FROM logs; COMMIT",
        ],
    );
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines, ["BEGIN", "600", "4", "COMMIT"], "{out}");

    // psql's catalog queries: \dt lists the tables, \d describes one from its schema.
    let (ok, out, err) = psql(&server, "analyst", None, &["-c", "\\dt"]);
    assert!(ok, "{err}");
    for table in ["metrics", "logs", "dead_letters", "metrics_5m_partials"] {
        assert!(out.contains(table), "\\dt lacks {table}:\n{out}");
    }
    let (ok, out, err) = psql(&server, "analyst", None, &["-c", "\\d metrics"]);
    assert!(ok, "{err}");
    assert!(out.contains("Table \"public.metrics\""), "{out}");
    for (column, ty) in [
        ("time", "timestamp with time zone"),
        ("account_id", "text"),
        ("sum", "double precision"),
        ("day", "date"),
    ] {
        assert!(
            out.lines().any(|l| l.contains(column) && l.contains(ty)),
            "\\d metrics lacks {column} {ty}:\n{out}"
        );
    }
    // A refused statement: psql reports the SQLSTATE with VERBOSITY verbose.
    let (ok, _, err) = psql(
        &server,
        "analyst",
        None,
        &["-v", "VERBOSITY=verbose", "-c", "DELETE FROM metrics"],
    );
    assert!(!ok && err.contains("25006"), "{err}");

    // psycopg: extended protocol, parameters, binary results, autocommit off,
    // prepared statements, refusals with their SQLSTATE, the connection going on.
    let result = server.python(
        r#"
import json, os, psycopg
conn = psycopg.connect(host="127.0.0.1", port=int(os.environ["FLEETLAKE_PG_PORT"]), user="analyst", dbname="fleetlake")
out = {"autocommit": conn.autocommit}
cur = conn.cursor(binary=True)
cur.execute(
    "SELECT time, account_id, sum, dimensions, stats, count(*) OVER () AS n FROM metrics "
    "WHERE account_id = %s AND metric_name = %s AND dimensions['FunctionName'] = %s ORDER BY time DESC LIMIT %s",
    ("100000000001", "Duration", "billing", 3))
rows = cur.fetchall()
out["types"] = {d.name: d.type_code for d in cur.description}
out["first"] = {"tz": str(rows[0][0].tzinfo is not None), "account": rows[0][1], "sum": rows[0][2],
                "dimensions": rows[0][3], "stats": rows[0][4], "n": rows[0][5]}
out["rows"] = len(rows)
out["in_transaction"] = conn.info.transaction_status.name
conn.commit()
cur = conn.cursor()
sums = []
for i in range(7):  # psycopg prepares the statement server-side from the 5th run
    cur.execute("SELECT sum(sum) FROM metrics WHERE metric_name = %s AND account_id <> %s", ("Errors", "x"))
    sums.append(cur.fetchone()[0])
out["sums"] = sums
cur.execute("SELECT %s::double precision * 2 AS doubled, %s AS label", (21.0, "it's"))
out["params"] = cur.fetchone()
refused = {}
for sql in [
    "INSERT INTO metrics (account_id) VALUES ('x')",
    "DELETE FROM metrics",
    "UPDATE metrics SET sum = 0",
    "CREATE TABLE t (a int)",
    "DROP TABLE metrics",
    "COPY metrics TO '/tmp/fleetlake-copy.csv'",
    "COPY (SELECT 1) TO STDOUT",
    "CREATE EXTERNAL TABLE x STORED AS PARQUET LOCATION '/tmp/x'",
    "CREATE VIEW v AS SELECT 1",
    "SET datafusion.runtime.memory_limit = '100G'",
    "SELECT * FROM no_such_table",
    "SELECT no_such_column FROM metrics",
    "SELEC 1",
]:
    try:
        cur.execute(sql)
        refused[sql] = "ran"
    except psycopg.Error as e:
        refused[sql] = e.sqlstate
        conn.rollback()
out["refused"] = refused
cur.execute("SELECT count(*) FROM metrics")
out["after"] = cur.fetchone()[0]
cur.execute("SELECT table_name, table_type FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1")
out["tables"] = cur.fetchall()
print(json.dumps(out, default=str))
"#,
        &[],
    );
    assert_eq!(result["autocommit"], false);
    assert_eq!(result["rows"], 3);
    let types = &result["types"];
    // timestamptz, text, float8, json, json, int8
    assert_eq!(types["time"], 1184);
    assert_eq!(types["account_id"], 25);
    assert_eq!(types["sum"], 701);
    assert_eq!(types["dimensions"], 114);
    assert_eq!(types["stats"], 114);
    assert_eq!(types["n"], 20);
    let first = &result["first"];
    assert_eq!(first["tz"], "True");
    assert_eq!(first["account"], "100000000001");
    assert_eq!(first["sum"], 1001.0);
    assert_eq!(
        first["dimensions"],
        serde_json::json!({"FunctionName": "billing"})
    );
    assert_eq!(first["stats"], serde_json::json!({"p99": 81.0}));
    // The window counts before the LIMIT: all 10 minutes.
    assert_eq!(first["n"], 10);
    assert_eq!(result["in_transaction"], "INTRANS");
    // Errors: (1 + 2 + 3 + 4) × 3 functions × 10 minutes, the same on every run.
    assert_eq!(result["sums"], serde_json::json!(vec![300.0; 7]));
    assert_eq!(result["params"], serde_json::json!([42.0, "it's"]));
    let refused = result["refused"].as_object().unwrap();
    for (sql, code) in refused {
        let want = match sql.as_str() {
            s if s.starts_with("SET") => "42501",
            s if s.contains("no_such_table") => "42P01",
            s if s.contains("no_such_column") => "42703",
            "SELEC 1" => "42601",
            _ => "25006",
        };
        assert_eq!(code, want, "{sql}");
    }
    assert!(!Path::new("/tmp/fleetlake-copy.csv").exists());
    assert_eq!(result["after"], 600);
    let tables: Vec<String> = result["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| format!("{} {}", t[0].as_str().unwrap(), t[1].as_str().unwrap()))
        .collect();
    assert_eq!(
        tables,
        [
            "accounts BASE TABLE",
            "alerts BASE TABLE",
            "dead_letters BASE TABLE",
            "logs BASE TABLE",
            "metrics BASE TABLE",
            "metrics_1h VIEW",
            "metrics_1h_partials BASE TABLE",
            "metrics_5m VIEW",
            "metrics_5m_partials BASE TABLE"
        ]
    );
}

const USERS: &str = r#"
[[query.users]]
name = "ops"
password = "ops-password"
token = "ops-token"

[[query.users]]
name = "tenant"
password = "tenant-password"
token = "tenant-token"
accounts = ["100000000000", "100000000002"]
"#;

#[test]
fn a_limited_credential_sees_only_its_accounts_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("fleetlake.toml");
    std::fs::write(&config, USERS).unwrap();
    let data = dir.path().join("data");
    let server = Server::start_with_args(
        &data,
        &[
            ("FLEETLAKE_BUFFER__FLUSH_INTERVAL", "500ms"),
            ("FLEETLAKE_LAKE__ROLLUP_INTERVAL", "500ms"),
        ],
        &["--config", config.to_str().unwrap()],
    );
    post_fleet(&server, 4, 10);
    // A dead letter: visible to ops, a table the tenant does not have.
    let (status, _) = post_records(
        &server,
        "/firehose/metrics",
        "bad-1",
        &[b"not json".to_vec()],
    );
    assert_eq!(status, 200);

    let result = server.python(
        r#"
import json, os, time, psycopg
port = int(os.environ["FLEETLAKE_PG_PORT"])
def connect(user, password):
    return psycopg.connect(host="127.0.0.1", port=port, user=user, password=password, dbname="fleetlake", autocommit=True)
def q(conn, sql):
    with conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchall()
ops, tenant = connect("ops", "ops-password"), connect("tenant", "tenant-password")
# Roll-ups land once the flushed metrics are rolled up.
for _ in range(240):
    if q(ops, "SELECT count(DISTINCT account_id) FROM metrics_5m")[0][0] == 4:
        break
    time.sleep(0.25)
out = {}
queries = {
    "metrics": "SELECT DISTINCT account_id FROM metrics ORDER BY 1",
    "logs": "SELECT DISTINCT account_id FROM logs ORDER BY 1",
    "rollup": "SELECT DISTINCT account_id FROM metrics_5m ORDER BY 1",
    "partials": "SELECT DISTINCT account_id FROM metrics_1h_partials ORDER BY 1",
    "join": "SELECT DISTINCT m.account_id FROM metrics m JOIN logs l ON l.account_id <> m.account_id ORDER BY 1",
    "subquery": "SELECT count(*) FROM metrics WHERE account_id IN ('100000000001', '100000000003')",
    "scalar": "SELECT (SELECT count(DISTINCT account_id) FROM logs) + (SELECT count(DISTINCT account_id) FROM metrics_1h)",
    "union": "SELECT account_id FROM metrics UNION SELECT account_id FROM logs ORDER BY 1",
    "cte": "WITH x AS (SELECT account_id, sum(sum) AS s FROM metrics WHERE metric_name = 'Errors' GROUP BY 1) SELECT sum(s) FROM x",
}
for who, conn in [("ops", ops), ("tenant", tenant)]:
    out[who] = {k: q(conn, sql) for k, sql in queries.items()}
try:
    q(tenant, "SELECT count(*) FROM dead_letters")
    out["tenant_dead_letters"] = "visible"
except psycopg.Error as e:
    out["tenant_dead_letters"] = e.sqlstate
out["ops_dead_letters"] = q(ops, "SELECT count(*) FROM dead_letters")[0][0]
out["tenant_tables"] = [r[0] for r in q(tenant, "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1")]
bad = {}
for user, password in [("tenant", "wrong"), ("nobody", "x"), ("ops", "tenant-password")]:
    try:
        connect(user, password).close()
        bad[user] = "connected"
    except psycopg.OperationalError as e:
        bad[user] = str(e)
out["bad_logins"] = bad
print(json.dumps(out))
"#,
        &[],
    );
    let accounts = |who: &str, key: &str| -> Vec<String> {
        result[who][key]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r[0].as_str().unwrap().to_string())
            .collect()
    };
    let all: Vec<String> = (0..4).map(account_id).collect();
    let mine = vec![account_id(0), account_id(2)];
    for key in ["metrics", "logs", "rollup", "partials", "join", "union"] {
        assert_eq!(accounts("ops", key), all, "ops {key}");
        assert_eq!(accounts("tenant", key), mine, "tenant {key}");
    }
    assert_eq!(result["ops"]["subquery"][0][0], 300);
    assert_eq!(result["tenant"]["subquery"][0][0], 0);
    assert_eq!(result["ops"]["scalar"][0][0], 8);
    assert_eq!(result["tenant"]["scalar"][0][0], 4);
    // Errors per minute and function: account index + 1; 3 functions, 10 minutes.
    assert_eq!(result["ops"]["cte"][0][0], 300.0);
    assert_eq!(result["tenant"]["cte"][0][0], (1.0 + 3.0) * 30.0);
    assert_eq!(result["tenant_dead_letters"], "42P01");
    assert_eq!(result["ops_dead_letters"], 1);
    assert!(
        !result["tenant_tables"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t == "dead_letters")
    );
    for (user, message) in result["bad_logins"].as_object().unwrap() {
        assert!(
            message
                .as_str()
                .unwrap()
                .to_lowercase()
                .contains("password authentication failed"),
            "{user}: {message}"
        );
    }

    // psql through libpq's SCRAM-SHA-256.
    let (ok, out, err) = psql(
        &server,
        "tenant",
        Some("tenant-password"),
        &[
            "-A",
            "-t",
            "-c",
            "SELECT count(DISTINCT account_id) FROM metrics",
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "2");

    // HTTP: a token or basic auth is required, and scopes the same way; Arrow out.
    let sql = "SELECT DISTINCT account_id FROM metrics ORDER BY 1";
    let http = |auth: Option<(&str, &str)>| {
        let mut request = client()
            .post(server.url("/api/v1/sql?format=json"))
            .body(sql);
        match auth {
            Some(("bearer", token)) => request = request.bearer_auth(token),
            Some((user, password)) => request = request.basic_auth(user, Some(password)),
            None => {}
        }
        let response = request.send().unwrap();
        let status = response.status().as_u16();
        let www = response.headers().get("www-authenticate").is_some();
        (status, www, response.text().unwrap())
    };
    let (status, www, _) = http(None);
    assert_eq!((status, www), (401, true));
    assert_eq!(http(Some(("bearer", "wrong"))).0, 401);
    assert_eq!(http(Some(("tenant", "wrong"))).0, 401);
    let rows = |body: String| -> Vec<String> {
        serde_json::from_str::<Vec<serde_json::Value>>(&body)
            .unwrap()
            .iter()
            .map(|r| r["account_id"].as_str().unwrap().to_string())
            .collect()
    };
    let (status, _, body) = http(Some(("bearer", "tenant-token")));
    assert_eq!(status, 200, "{body}");
    assert_eq!(rows(body), mine);
    let (status, _, body) = http(Some(("ops", "ops-password")));
    assert_eq!(status, 200, "{body}");
    assert_eq!(rows(body), all);
    let arrow = server.python(
        r#"
import json, os, urllib.request, pyarrow.ipc as ipc
request = urllib.request.Request(os.environ["FLEETLAKE_HTTP"] + "/api/v1/sql?format=arrow",
    data=b"SELECT account_id, sum(sum) AS errors, max(time) AS latest FROM metrics WHERE metric_name = 'Errors' GROUP BY 1 ORDER BY 1",
    headers={"Authorization": "Bearer tenant-token"})
with urllib.request.urlopen(request) as response:
    content_type = response.headers["Content-Type"]
    table = ipc.open_stream(response.read()).read_all()
print(json.dumps({"content_type": content_type, "schema": [f"{f.name}:{f.type}" for f in table.schema],
                  "rows": table.to_pylist()}, default=str))
"#,
        &[],
    );
    assert_eq!(arrow["content_type"], "application/vnd.apache.arrow.stream");
    // DataFusion reads Parquet strings as Arrow string views.
    assert_eq!(
        arrow["schema"],
        serde_json::json!([
            "account_id:string_view",
            "errors:double",
            "latest:timestamp[us, tz=UTC]"
        ])
    );
    let rows = arrow["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["account_id"], account_id(0));
    assert_eq!(rows[0]["errors"], 30.0);
    assert_eq!(rows[1]["errors"], 90.0);
}

#[test]
fn runaway_queries_are_stopped_by_their_limits_and_the_service_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &[
            ("FLEETLAKE_QUERY__MEMORY_LIMIT", "67108864"),
            ("FLEETLAKE_QUERY__TIMEOUT", "30s"),
        ],
    );
    post_fleet(&server, 4, 10);
    let result = server.python(
        r#"
import json, os, threading, time, psycopg
port = int(os.environ["FLEETLAKE_PG_PORT"])
def connect():
    return psycopg.connect(host="127.0.0.1", port=port, user="analyst", dbname="fleetlake", autocommit=True)
def run(conn, sql):
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return {"rows": cur.fetchall()}
    except psycopg.Error as e:
        return {"sqlstate": e.sqlstate, "message": str(e)}
out = {}
conn = connect()
# Memory: a hash join's build side of a 600 x 600 x 600 cross product outgrows 64 MiB.
out["memory"] = run(conn, "SELECT count(*) FROM (SELECT a.account_id k, b.time t, c.sum s FROM metrics a CROSS JOIN metrics b CROSS JOIN metrics c) x JOIN (SELECT a.account_id k, b.time t, c.sum s FROM metrics a CROSS JOIN metrics b CROSS JOIN metrics c) y ON x.k = y.k AND x.t = y.t AND x.s = y.s")
out["after_memory"] = run(conn, "SELECT count(*) FROM metrics")
# Time: the session's statement_timeout, below the server's.
run(conn, "SET statement_timeout = '1s'")
out["timeout"] = run(conn, "SELECT count(*) FROM metrics a CROSS JOIN metrics b CROSS JOIN metrics c CROSS JOIN metrics d WHERE a.sum + b.sum + c.sum + d.sum > -1")
run(conn, "SET statement_timeout = 0")
out["after_timeout"] = run(conn, "SELECT count(*) FROM metrics")
# A cancel request (what psql sends on Ctrl-C) while the statement runs.
victim = connect()
def cancel_soon():
    time.sleep(1.0)
    victim.cancel()
threading.Thread(target=cancel_soon).start()
out["canceled"] = run(victim, "SELECT count(*) FROM metrics a CROSS JOIN metrics b CROSS JOIN metrics c CROSS JOIN metrics d WHERE a.sum + b.sum + c.sum + d.sum > -1")
out["after_cancel"] = run(victim, "SELECT count(*) FROM metrics")
out["other_connection"] = run(connect(), "SELECT count(DISTINCT account_id) FROM metrics")
print(json.dumps(out))
"#,
        &[],
    );
    assert_eq!(
        result["memory"]["sqlstate"], "53200",
        "{}",
        result["memory"]
    );
    assert_eq!(
        result["timeout"]["sqlstate"], "57014",
        "{}",
        result["timeout"]
    );
    assert!(
        result["timeout"]["message"]
            .as_str()
            .unwrap()
            .contains("statement timeout")
    );
    assert_eq!(
        result["canceled"]["sqlstate"], "57014",
        "{}",
        result["canceled"]
    );
    assert!(
        result["canceled"]["message"]
            .as_str()
            .unwrap()
            .contains("user request")
    );
    for key in ["after_memory", "after_timeout", "after_cancel"] {
        assert_eq!(result[key]["rows"][0][0], 600, "{key}: {}", result[key]);
    }
    assert_eq!(result["other_connection"]["rows"][0][0], 4);

    // HTTP: the same limits, with Prometheus' status codes.
    let post = |sql: &str| {
        let response = client()
            .post(server.url("/api/v1/sql"))
            .body(sql.to_string())
            .send()
            .unwrap();
        (response.status().as_u16(), response.text().unwrap())
    };
    let (status, body) = post(
        "SELECT count(*) FROM (SELECT a.account_id k, b.time t, c.sum s FROM metrics a CROSS JOIN metrics b CROSS JOIN metrics c) x JOIN (SELECT a.account_id k, b.time t, c.sum s FROM metrics a CROSS JOIN metrics b CROSS JOIN metrics c) y ON x.k = y.k AND x.t = y.t AND x.s = y.s",
    );
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("Resources exhausted"), "{body}");
    let (status, body) = post("SELECT count(*) FROM metrics");
    assert_eq!(status, 200, "{body}");
    let metrics = server.metrics_text();
    for needle in [
        r#"fleetlake_query_total{status="memory_limit",protocol="postgres"} 1"#,
        r#"fleetlake_query_total{status="timeout",protocol="postgres"} 1"#,
        r#"fleetlake_query_total{status="canceled",protocol="postgres"} 1"#,
        r#"fleetlake_query_total{status="memory_limit",protocol="http"} 1"#,
    ] {
        assert!(metrics.contains(needle), "missing {needle} in\n{metrics}");
    }
}

#[test]
fn http_queries_time_out_with_503() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[("FLEETLAKE_QUERY__TIMEOUT", "1s")]);
    post_fleet(&server, 2, 10);
    let response = client()
        .post(server.url("/api/v1/sql"))
        .body("SELECT count(*) FROM metrics a CROSS JOIN metrics b CROSS JOIN metrics c CROSS JOIN metrics d WHERE a.sum + b.sum + c.sum + d.sum > -1")
        .send()
        .unwrap();
    assert_eq!(response.status().as_u16(), 503);
    assert!(response.text().unwrap().contains("statement timeout"));
    assert_eq!(server.sql("SELECT count(*) AS n FROM metrics")[0]["n"], 300);
}

#[test]
fn every_grafana_dashboard_query_answers_through_psycopg() {
    let dashboards = Path::new(env!("CARGO_MANIFEST_DIR")).join("grafana/dashboards");
    let mut files: Vec<_> = std::fs::read_dir(&dashboards)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "{files:?}");

    // The macro expansion itself, against expectations from Grafana's tests.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/grafana_sql.py");
    let check = Command::new(python()).arg(&script).output().unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );

    // A registry and a rule that fires for every account with errors, so that the
    // alert panels and annotations have transitions to show.
    let dir = tempfile::tempdir().unwrap();
    let registry = dir.path().join("accounts.jsonl");
    let records: Vec<String> = (0..6)
        .map(|a| {
            serde_json::json!({"account_id": account_id(a), "account_name": format!("tenant-{a}"),
                "owner_team": format!("team-{}", a % 2), "lifecycle_state": "active"})
            .to_string()
        })
        .collect();
    std::fs::write(&registry, records.join("\n")).unwrap();
    let rules = dir.path().join("errors.rules.yml");
    std::fs::write(
        &rules,
        "groups:\n  - name: dash\n    interval: 1s\n    rules:\n      - alert: AnyErrors\n        expr: SELECT account_id, sum(sum) AS value FROM metrics WHERE metric_name = 'Errors' GROUP BY account_id HAVING sum(sum) > 0\n",
    )
    .unwrap();
    let config = dir.path().join("fleetlake.toml");
    std::fs::write(
        &config,
        format!("[accounts]\nfile = {registry:?}\n\n[alerting]\nrule_files = [{rules:?}]\n"),
    )
    .unwrap();
    let data = dir.path().join("data");
    let server = Server::start(
        &data,
        &[
            ("FLEETLAKE_BUFFER__FLUSH_INTERVAL", "2s"),
            ("FLEETLAKE_CONFIG", config.to_str().unwrap()),
        ],
    );
    post_fleet(&server, 6, 30);
    wait_until("alert transitions", || {
        server
            .sql("SELECT count(*) AS n FROM alerts")
            .first()
            .is_some_and(|r| r["n"] == 6)
    });
    let runner = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/run_dashboards.py");
    let out = Command::new(python())
        .arg(&runner)
        .args(&files)
        .env("FLEETLAKE_PG_PORT", server.pg_port())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let failed: Vec<_> = results.iter().filter(|r| r["ok"] != true).collect();
    assert!(failed.is_empty(), "{failed:#?}");
    let panels: std::collections::BTreeSet<String> = results
        .iter()
        .map(|r| format!("{} / {}", r["dashboard"], r["panel"]))
        .collect();
    eprintln!(
        "{} queries of {} panels and variables answered",
        results.len(),
        panels.len()
    );
    for dashboard in [
        "fleet-overview.json",
        "account-drilldown.json",
        "lambda-duration.json",
        "logs-volume.json",
        "alerts.json",
    ] {
        assert!(
            results.iter().any(|r| r["dashboard"] == dashboard),
            "no query of {dashboard}"
        );
    }
}
