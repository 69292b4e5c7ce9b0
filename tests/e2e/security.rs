//! Tenant isolation and the query path's limits, tried as an attacker would: through
//! the real binary, over HTTP, Postgres' simple protocol (psql) and its extended
//! protocol (psycopg), with a credential limited by `accounts` and one limited by
//! `owner_teams`, against rows in the lake and rows still in the hot buffer.
//!
//! Each attack × channel × credential is recorded by one Python script; every answer
//! (rows or error) is then checked here for anything of the other accounts.

use serde_json::Value;

use crate::support::{FirehoseRequest, Server, account_id, datapoint, gzip, post_records};

/// The accounts-limited tenant's account, the team's, and two others.
const MINE: usize = 0;
const TEAMS: usize = 2;
const FOREIGN: [usize; 2] = [1, 3];

fn users(registry: &std::path::Path) -> String {
    format!(
        r#"
[accounts]
file = {registry:?}

[query]
memory_limit = 134217728
memory_pool = 402653184
max_concurrent = 3
max_concurrent_per_user = 2
max_expression_depth = 1000

[[query.users]]
name = "ops"
password = "ops-password"
token = "ops-token"

[[query.users]]
name = "tenant"
password = "tenant-password"
token = "tenant-token"
accounts = ["{mine}"]

[[query.users]]
name = "team"
password = "team-password"
token = "team-token"
owner_teams = ["blue"]
"#,
        mine = account_id(MINE)
    )
}

fn registry_records() -> String {
    (0..4)
        .map(|i| {
            serde_json::json!({
                "account_id": account_id(i),
                "account_name": format!("tenant-{i}"),
                "environment": "prod",
                "workload_type": "saas",
                "owner_team": if i == TEAMS { "blue" } else { "red" },
                "cost_center": "cc-1",
                "compliance_scope": "none",
                "automation_level": "full",
                "created_by": "vending",
                "lifecycle_state": "active",
            })
            .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Metrics at `minutes` and one log event per account whose message carries
/// `marker-<account>`.
fn post_fleet(server: &Server, minutes: std::ops::Range<i64>, marker: &str) {
    let lines: Vec<String> = minutes
        .flat_map(|minute| {
            (0..4).map(move |a| datapoint(&account_id(a), "api", "Errors", minute, 1.0))
        })
        .collect();
    let (status, body) = server.post(&FirehoseRequest::new(
        &format!("m-{marker}"),
        vec![lines.join("\n")],
    ));
    assert_eq!(status, 200, "{body}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let records: Vec<Vec<u8>> = (0..4)
        .map(|a| {
            let account = account_id(a);
            gzip(
                serde_json::json!({
                    "messageType": "DATA_MESSAGE",
                    "owner": account,
                    "logGroup": "/aws/lambda/checkout",
                    "logStream": "s",
                    "subscriptionFilters": ["all"],
                    "logEvents": [{"id": format!("{marker}{a}"), "timestamp": now,
                                   "message": format!("{marker}-{account}")}],
                })
                .to_string()
                .as_bytes(),
            )
        })
        .collect();
    let (status, body) = post_records(server, "/firehose/logs", &format!("l-{marker}"), &records);
    assert_eq!(status, 200, "{body}");
}

const ATTACKS: &str = r#"
import json, os, subprocess, threading, time, urllib.request, urllib.error, base64
import psycopg

PG = int(os.environ["FLEETLAKE_PG_PORT"])
HTTP = os.environ["FLEETLAKE_HTTP"]
CREDS = {"tenant": ("tenant-password", "tenant-token", os.environ["MINE"]),
         "team": ("team-password", "team-token", os.environ["TEAMS"])}
TABLES = ["metrics", "logs", "metrics_5m", "metrics_5m_partials", "metrics_1h",
          "metrics_1h_partials", "alerts", "accounts"]

def http(token, sql):
    req = urllib.request.Request(HTTP + "/api/v1/sql", data=sql.encode(),
                                 headers={"Authorization": "Bearer " + token})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return {"status": r.status, "text": r.read().decode()}
    except urllib.error.HTTPError as e:
        return {"status": e.code, "text": e.read().decode()}

def psql(user, password, sql):
    env = dict(os.environ, PGPASSWORD=password, PGCONNECT_TIMEOUT="20")
    # The SQL on standard input: an argument is limited to 128 KiB.
    out = subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(PG), "-U", user, "-d", "fleetlake",
                          "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-v", "VERBOSITY=verbose"],
                         input=sql + ";\n", capture_output=True, text=True, env=env, timeout=120)
    text = out.stdout + out.stderr
    code = None
    if "ERROR:" in out.stderr:
        code = out.stderr.split("ERROR:")[1].split()[0].rstrip(":")
    return {"ok": out.returncode == 0, "code": code, "text": text}

def connect(user, password):
    return psycopg.connect(host="127.0.0.1", port=PG, user=user, password=password,
                           dbname="fleetlake", autocommit=True)

def extended(conn, sql):
    try:
        # prepare=True: a named server-side statement (Parse/Bind/Execute).
        rows = conn.execute(sql, prepare=True).fetchall()
        return {"ok": True, "code": None, "text": json.dumps(rows, default=str)}
    except psycopg.Error as e:
        return {"ok": False, "code": e.sqlstate, "text": str(e)}

def attacks(mine):
    a = {
        "issue_cast_logs": f"SELECT count(*) FROM logs WHERE CASE WHEN account_id <> '{mine}' THEN CAST(message AS BIGINT) ELSE 0 END = 1",
        "div_zero_oracle": "SELECT count(*) FROM metrics WHERE 1 / CASE WHEN account_id IN (%s) THEN 0 ELSE 1 END = 1" % os.environ["FOREIGN_LIST"],
        "join": f"SELECT count(*) FROM metrics m JOIN logs l ON m.account_id = l.account_id WHERE CASE WHEN l.account_id <> '{mine}' THEN CAST(l.message AS BIGINT) ELSE 0 END = 1",
        "cross_join": f"SELECT count(*) FROM logs a, logs b WHERE CASE WHEN b.account_id <> '{mine}' THEN CAST(b.message AS BIGINT) ELSE 0 END = 1",
        "aggregate": f"SELECT max(CASE WHEN account_id <> '{mine}' THEN CAST(message AS BIGINT) END) FROM logs",
        "topk": f"SELECT account_id FROM logs ORDER BY CASE WHEN account_id <> '{mine}' THEN CAST(message AS BIGINT) ELSE 0 END LIMIT 1",
        "subquery": f"SELECT (SELECT count(*) FROM logs WHERE CASE WHEN account_id <> '{mine}' THEN CAST(message AS BIGINT) ELSE 0 END = 1)",
        "exists": f"SELECT count(*) FROM accounts a WHERE EXISTS (SELECT 1 FROM metrics m WHERE m.account_id = a.account_id AND CAST(concat('leak-', m.account_id) AS BIGINT) = 1)",
        "explain": "EXPLAIN SELECT * FROM logs WHERE message LIKE '%x%'",
        "explain_verbose": "EXPLAIN VERBOSE SELECT * FROM metrics",
        "explain_analyze": "EXPLAIN ANALYZE SELECT count(*) FROM logs",
        "information_schema": "SELECT table_name, column_name FROM information_schema.columns ORDER BY 1, 2",
        "count_metrics": "SELECT count(*) FROM metrics",
        "count_logs": "SELECT count(*) FROM logs",
    }
    for table in TABLES:
        a["cast_" + table] = f"SELECT count(*) FROM {table} WHERE CASE WHEN account_id <> '{mine}' THEN CAST(concat('leak-', account_id) AS BIGINT) ELSE 0 END = 1"
    return a

out = {"cases": []}
for who, (password, token, mine) in CREDS.items():
    conn = connect(who, password)
    for name, sql in attacks(mine).items():
        out["cases"].append({"who": who, "attack": name, "channel": "http", **http(token, sql)})
        out["cases"].append({"who": who, "attack": name, "channel": "psql", **psql(who, password, sql)})
        out["cases"].append({"who": who, "attack": name, "channel": "psycopg", **extended(conn, sql)})
    # Catalogs only the Postgres endpoint has.
    for name, sql in {"pg_class": "SELECT relname, reltuples FROM pg_catalog.pg_class",
                      "pg_tables": "SELECT * FROM pg_catalog.pg_tables"}.items():
        out["cases"].append({"who": who, "attack": name, "channel": "psql", **psql(who, password, sql)})
        out["cases"].append({"who": who, "attack": name, "channel": "psycopg", **extended(conn, sql)})
    conn.close()

# Engine settings: refused however spelled, on both protocols; nothing changes.
sets = ['SET "datafusion".runtime.memory_limit = \'64G\'',
        "SET datafusion.execution.batch_size = 1",
        "SET DataFusion.Execution.Batch_Size = 1",
        "SET LOCAL datafusion.runtime.temp_directory = '/tmp/fleetlake-attack-dir'",
        "SET SESSION datafusion.runtime.max_temp_directory_size = '1T'",
        "SET \"datafusion.execution.batch_size\" = 100000000",
        "RESET datafusion.execution.batch_size",
        "SET work_mem = '64GB'"]
conn = connect("tenant", "tenant-password")
out["sets"] = []
for sql in sets:
    out["sets"].append({"sql": sql, "channel": "psql", **psql("tenant", "tenant-password", sql)})
    out["sets"].append({"sql": sql, "channel": "psycopg", **extended(conn, sql)})
    out["sets"].append({"sql": sql, "channel": "http", **http("tenant-token", sql)})
out["settings"] = dict(conn.execute(
    "SELECT name, value FROM information_schema.df_settings WHERE name IN "
    "('datafusion.execution.batch_size', 'datafusion.runtime.memory_limit', "
    "'datafusion.runtime.temp_directory')").fetchall())
out["temp_dir_made"] = os.path.exists("/tmp/fleetlake-attack-dir")
conn.execute("SET statement_timeout = 5000")
conn.execute("RESET statement_timeout")
out["session_settings"] = "ok"

# Statements that would take the process down: refused before planning.
deep = "SELECT " + "+".join(["1"] * 200000)
at_limit = "SELECT " + "+".join(["1"] * 1000)
out["deep"] = {"http": http("ops-token", deep), "psql": psql("ops", "ops-password", deep),
               "psycopg": extended(conn, deep), "at_limit": extended(conn, at_limit)}
big = "SELECT length(repeat('x', 300000000))"
out["repeat"] = {"http": http("tenant-token", big), "psycopg": extended(conn, big)}
result = "SELECT repeat('x', 1000) AS r FROM generate_series(1, 200000)"
out["result_http"] = http("tenant-token", result)
conn.close()

# Caps on statements at once: a statement holds its place while its rows are sent.
# Each holder sends a query with a large result and reads nothing: the server waits
# on the socket with the statement running.
def running():
    with urllib.request.urlopen(HTTP + "/metrics", timeout=60) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("fleetlake_query_running"):
                return float(line.split()[-1])
    return 0.0

def wait_running(n):
    for _ in range(2400):
        if running() == n:
            return
        time.sleep(0.05)
    raise SystemExit(f"never {n} statements running: {running()}")

holders = []
for user, password in [("tenant", "tenant-password"), ("tenant", "tenant-password"),
                       ("team", "team-password")]:
    c = connect(user, password)
    c.pgconn.send_query(b"SELECT repeat('y', 100) FROM generate_series(1, 50000000)")
    holders.append(c)
wait_running(3)
second = connect("tenant", "tenant-password")
out["caps"] = {"user": extended(second, "SELECT 1"),
               "server_http": http("ops-token", "SELECT 1")}
# Ingest keeps its own budget: a Firehose delivery goes in while queries are capped.
body = json.dumps({"requestId": "during-caps", "timestamp": 1,
                   "records": [{"data": base64.b64encode(os.environ["LINE"].encode()).decode()}]})
req = urllib.request.Request(HTTP + "/firehose/metrics", data=body.encode(), headers={
    "Content-Type": "application/json", "X-Amz-Firehose-Request-Id": "during-caps"})
with urllib.request.urlopen(req, timeout=60) as r:
    out["caps"]["firehose"] = r.status
for c in holders:
    c.cancel()
    c.close()
wait_running(0)
out["caps"]["after"] = extended(second, "SELECT 1")
second.close()
print(json.dumps(out))
"#;

/// The answers' texts must hold nothing of `foreign` accounts: not their ids (unless
/// the attack's own SQL names them), not their log lines.
fn assert_nothing_foreign(case: &Value, foreign: &[String]) {
    let text = case["text"].as_str().unwrap_or_default();
    for account in foreign {
        for secret in [
            format!("lake-{account}"),
            format!("hot-{account}"),
            format!("leak-{account}"),
            account.clone(),
        ] {
            assert!(
                !text.contains(&secret),
                "{} over {} as {}: {secret:?} in {text}",
                case["attack"],
                case["channel"],
                case["who"]
            );
        }
    }
}

fn refused(case: &Value, code: &str, http: u64) {
    if case["channel"] == "http" {
        assert_eq!(case["status"], http, "{case}");
    } else {
        assert_eq!(case["code"], code, "{case}");
    }
}

fn answered(case: &Value) -> bool {
    case["ok"] == true || case["status"] == 200
}

#[test]
fn isolation_and_limits_hold_against_an_attacker_on_every_channel() {
    let dir = tempfile::tempdir().unwrap();
    let registry = dir.path().join("accounts.jsonl");
    std::fs::write(&registry, registry_records()).unwrap();
    let config = dir.path().join("fleetlake.toml");
    std::fs::write(&config, users(&registry)).unwrap();
    let data = dir.path().join("data");
    let args = ["--config", config.to_str().unwrap()];

    // Rows in the lake: flushed, rolled up, then the service stops.
    let server = Server::start_with_args(
        &data,
        &[
            ("FLEETLAKE_BUFFER__FLUSH_INTERVAL", "300ms"),
            ("FLEETLAKE_LAKE__ROLLUP_INTERVAL", "300ms"),
        ],
        &args,
    );
    post_fleet(&server, 0..5, "lake");
    crate::support::wait_until("the roll-ups have every account", || {
        let output = server_sql(
            &server,
            "SELECT count(DISTINCT account_id) AS n FROM metrics_1h",
        );
        output == "4"
    });
    server.stop();
    // Rows in the hot buffer: the next flush is an hour away.
    let server =
        Server::start_with_args(&data, &[("FLEETLAKE_BUFFER__FLUSH_INTERVAL", "1h")], &args);
    post_fleet(&server, 5..8, "hot");

    let foreign: Vec<String> = FOREIGN.iter().map(|i| account_id(*i)).collect();
    let line = datapoint(&account_id(0), "api", "Errors", 9, 1.0);
    let (mine, teams) = (account_id(MINE), account_id(TEAMS));
    let foreign_list = foreign
        .iter()
        .map(|a| format!("'{a}'"))
        .collect::<Vec<_>>()
        .join(", ");
    let out = server.python(
        ATTACKS,
        &[
            ("MINE", mine.as_str()),
            ("TEAMS", teams.as_str()),
            ("FOREIGN_LIST", foreign_list.as_str()),
            ("LINE", line.as_str()),
        ],
    );

    // 1, 2: nothing of other accounts in any answer, error or plan.
    let cases = out["cases"].as_array().unwrap();
    assert!(cases.len() > 100, "{}", cases.len());
    for case in cases {
        let attack = case["attack"].as_str().unwrap();
        match attack {
            "explain_verbose" | "explain_analyze" => refused(case, "42501", 403),
            // The attack names the foreign accounts itself; it must answer with the
            // caller's own rows, no error from the others' rows.
            "div_zero_oracle" => {
                assert!(answered(case), "{case}");
                let text = case["text"].as_str().unwrap();
                assert!(
                    text.contains('8'),
                    "8 own datapoints (5 in the lake, 3 hot): {case}"
                );
            }
            _ => assert_nothing_foreign(case, &foreign),
        }
        if attack == "count_metrics" {
            assert!(answered(case), "{case}");
            assert!(case["text"].as_str().unwrap().contains('8'), "{case}");
        }
        if attack == "count_logs" || attack.starts_with("cast_") {
            assert!(answered(case), "{case}");
        }
        if attack == "explain" {
            assert!(answered(case), "{case}");
            let text = case["text"].as_str().unwrap();
            assert!(text.contains("AccountScopedExec"), "{case}");
            assert!(!text.contains("DataSourceExec"), "{case}");
        }
        if matches!(
            attack,
            "issue_cast_logs" | "join" | "cross_join" | "aggregate" | "topk" | "subquery"
        ) {
            // The caller has one account: `account_id <> '<mine>'` holds for no row it
            // can see, so nothing fails.
            assert!(answered(case), "{case}");
        }
    }

    // 3: engine settings refused on every protocol, and nothing changed.
    for case in out["sets"].as_array().unwrap() {
        assert!(!answered(case), "{case}");
        let code = case["code"].as_str().unwrap_or_default();
        if case["channel"] != "http" {
            assert!(["42501", "42704"].contains(&code), "{case}");
        }
    }
    let settings = &out["settings"];
    assert_eq!(
        settings["datafusion.execution.batch_size"], "8192",
        "{settings}"
    );
    assert!(
        !settings.to_string().contains("64G") && !settings.to_string().contains("attack"),
        "{settings}"
    );
    assert_eq!(out["temp_dir_made"], false);
    assert_eq!(out["session_settings"], "ok");

    // 4: 200,000 terms refused before planning on every protocol; at the limit fine.
    let deep = &out["deep"];
    assert_eq!(deep["http"]["status"], 400, "{deep}");
    assert!(
        deep["http"]["text"]
            .as_str()
            .unwrap()
            .contains("too complex")
    );
    assert_eq!(deep["psql"]["code"], "54001", "{deep}");
    assert_eq!(deep["psycopg"]["code"], "54001", "{deep}");
    assert_eq!(deep["at_limit"]["text"], "[[1000]]", "{deep}");

    // 5: memory limits cover function values and results.
    let repeat = &out["repeat"];
    assert_eq!(repeat["http"]["status"], 422, "{repeat}");
    assert_eq!(repeat["psycopg"]["code"], "53200", "{repeat}");
    assert_eq!(out["result_http"]["status"], 422, "{}", out["result_http"]);
    let caps = &out["caps"];
    assert_eq!(caps["user"]["code"], "53300", "{caps}");
    assert_eq!(caps["server_http"]["status"], 429, "{caps}");
    assert_eq!(caps["firehose"], 200, "{caps}");
    assert_eq!(caps["after"]["text"], "[[1]]", "{caps}");

    // The process is still up and answers.
    assert_eq!(server_sql(&server, "SELECT 1 AS n"), "1");
    server.stop();
}

/// `SELECT` one value as the unrestricted user, over HTTP.
fn server_sql(server: &Server, sql: &str) -> String {
    let response = crate::support::client()
        .post(server.url("/api/v1/sql?format=csv"))
        .bearer_auth("ops-token")
        .body(sql.to_string())
        .send()
        .unwrap();
    let text = response.text().unwrap();
    text.lines().nth(1).unwrap_or_default().to_string()
}
