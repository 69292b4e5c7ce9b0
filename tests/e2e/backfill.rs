//! `fleetlake backfill cloudwatch` against moto's CloudWatch (through the CBOR shim):
//! data put with PutMetricData comes back into SQL with the right sums and counts;
//! running again changes nothing; throttling and NextToken pages are handled; an
//! interrupted job resumes where it stopped.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::support::{
    CloudWatchShim, FirehoseRequest, Moto, Server, aws_env, lake_query, wait_until,
};

/// 2026-01-05T23:45:00Z: the data crosses a UTC midnight, so a job has two windows.
const T0: i64 = 1_767_656_700;
const MINUTES: i64 = 30;
const ROLE: &str = "fleetlake-read";

/// Puts three series per account (raw values with counts, statistic sets, single
/// values), one datapoint per minute from T0, signed with a role assumed in each
/// account; returns what each account must read back.
fn put_fleet(moto: &Moto, accounts: &[&str; 2]) -> BTreeMap<String, Value> {
    let out = moto.python(
        r#"
import sys, json, datetime
T0, MINUTES, ROLE = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
expected = {}
for account in sys.argv[4:]:
    creds = client('sts').assume_role(RoleArn=f'arn:aws:iam::{account}:role/{ROLE}',
                                      RoleSessionName='put')['Credentials']
    import boto3
    cw = boto3.client('cloudwatch', endpoint_url=ENDPOINT, region_name='us-east-1',
                      aws_access_key_id=creds['AccessKeyId'],
                      aws_secret_access_key=creds['SecretAccessKey'],
                      aws_session_token=creds['SessionToken'])
    rows, total, count, lo, hi = 0, 0.0, 0.0, None, None
    def seen(s, c, mn, mx):
        global rows, total, count, lo, hi
        rows += 1; total += s; count += c
        lo = mn if lo is None else min(lo, mn); hi = mx if hi is None else max(hi, mx)
    salt = int(account[0])
    for m in range(MINUTES):
        ts = datetime.datetime.fromtimestamp(T0 + 60 * m, datetime.timezone.utc)
        values, counts = [1.0 + m, 2.0 * salt, 0.5], [1.0, 1.0, 2.0]
        cw.put_metric_data(Namespace='Fleet/App', MetricData=[{
            'MetricName': 'Requests', 'Timestamp': ts, 'Unit': 'Count',
            'Dimensions': [{'Name': 'Service', 'Value': 'api'}],
            'Values': values, 'Counts': counts}])
        seen(sum(v * c for v, c in zip(values, counts)), sum(counts), min(values), max(values))
        stat = {'SampleCount': 4.0, 'Sum': 10.0 + m, 'Minimum': 1.0, 'Maximum': 5.0 + m * salt}
        cw.put_metric_data(Namespace='Fleet/App', MetricData=[{
            'MetricName': 'Latency', 'Timestamp': ts, 'Unit': 'Milliseconds',
            'Dimensions': [{'Name': 'Service', 'Value': 'api'}, {'Name': 'Stage', 'Value': 'prod'}],
            'StatisticValues': stat}])
        seen(stat['Sum'], stat['SampleCount'], stat['Minimum'], stat['Maximum'])
        value = float((m * salt) % 7)
        cw.put_metric_data(Namespace='Fleet/Jobs', MetricData=[{
            'MetricName': 'Failures', 'Timestamp': ts,
            'Dimensions': [{'Name': 'Queue', 'Value': 'q-' + account[-3:]}], 'Value': value}])
        seen(value, 1.0, value, value)
    expected[account] = {'rows': rows, 'sum': total, 'count': count, 'min': lo, 'max': hi}
print(json.dumps(expected))
"#,
        &[
            &T0.to_string(),
            &MINUTES.to_string(),
            ROLE,
            accounts[0],
            accounts[1],
        ],
    );
    out.as_object().unwrap().clone().into_iter().collect()
}

/// `fleetlake backfill cloudwatch` with `args`, against the shim, over the test range.
fn backfill_command(shim: &CloudWatchShim, data_dir: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_fleetlake"));
    command
        .args([
            "backfill",
            "cloudwatch",
            "--data-dir",
            data_dir.to_str().unwrap(),
        ])
        .args(["--endpoint-url", &shim.endpoint, "--region", "us-east-1"])
        .args([
            "--start",
            "2026-01-05T23:45:00Z",
            "--end",
            "2026-01-06T00:15:00Z",
        ])
        .args(["--initial-backoff", "10ms"])
        .args(args)
        .envs(aws_env())
        .env("FLEETLAKE_LOG", "warn");
    command
}

/// Runs [`backfill_command`]: (success, stdout, stderr).
fn backfill(shim: &CloudWatchShim, data_dir: &Path, args: &[&str]) -> (bool, String, String) {
    let out = backfill_command(shim, data_dir, args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Per account: rows, sum(sum), sum(count), min(min), max(max) in the lake.
fn lake_totals(data_dir: &Path) -> BTreeMap<String, Value> {
    let out = lake_query(
        data_dir,
        "json",
        "SELECT account_id, count(*) AS n, sum(sum) AS s, sum(count) AS c, \
         min(min) AS lo, max(max) AS hi, count(DISTINCT metric_name) AS metrics, \
         count(unit) AS units, count(DISTINCT region) AS regions \
         FROM metrics GROUP BY account_id ORDER BY account_id",
    );
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .flat_map(|l| match serde_json::from_str::<Value>(l).unwrap() {
            Value::Array(rows) => rows,
            row => vec![row],
        })
        .map(|row| (row["account_id"].as_str().unwrap().to_owned(), row))
        .collect()
}

fn assert_matches(lake: &BTreeMap<String, Value>, expected: &BTreeMap<String, Value>) {
    assert_eq!(
        lake.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>(),
        "{lake:?}"
    );
    for (account, want) in expected {
        let got = &lake[account];
        for (key, column) in [
            ("rows", "n"),
            ("sum", "s"),
            ("count", "c"),
            ("min", "lo"),
            ("max", "hi"),
        ] {
            assert_eq!(
                got[column].as_f64().unwrap(),
                want[key].as_f64().unwrap(),
                "{account} {key}: lake {got}, put {want}"
            );
        }
        assert_eq!(got["metrics"], 3, "{got}");
        // GetMetricData returns no unit.
        assert_eq!(got["units"], 0, "{got}");
        assert_eq!(got["regions"], 1, "{got}");
    }
}

#[test]
fn put_metric_data_comes_back_through_backfill_once_however_often_it_runs() {
    let moto = Moto::start();
    let shim = CloudWatchShim::start(&moto);
    let accounts = ["111111111111", "222222222222"];
    let expected = put_fleet(&moto, &accounts);
    let dir = tempfile::tempdir().unwrap();
    // The account list comes from the registry: its active accounts only.
    let registry = dir.path().join("accounts.json");
    std::fs::write(
        &registry,
        serde_json::json!([
            {"account_id": accounts[0], "lifecycle_state": "active"},
            {"account_id": accounts[1]},
            {"account_id": "333333333333", "lifecycle_state": "suspended"},
        ])
        .to_string(),
    )
    .unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("fleetlake.toml");
    std::fs::write(
        &config,
        format!("[accounts]\nfile = {:?}\n", registry.to_str().unwrap()),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let run = |extra: &[&str]| {
        let args = [
            &[
                "--config",
                config,
                "--role-name",
                ROLE,
                "--percentile",
                "p99",
            ],
            extra,
        ];
        backfill(&shim, &data, &args.concat())
    };

    // Without a role only the current account (moto's) can be read.
    let (ok, _, err) = backfill(&shim, &data, &["--config", config]);
    assert!(!ok);
    assert!(
        err.contains("account 111111111111: without --role-name only the current account (123456789012) can be read"),
        "{err}"
    );

    let (ok, out, err) = run(&[]);
    assert!(ok, "{out}\n{err}");
    assert!(
        out.contains("backfilled 2 of 2 account-region(s) (0 failed)"),
        "{out}"
    );
    // 30 minutes over two UTC days: two windows, one call each per account; one
    // ListMetrics page per account.
    assert!(
        out.contains("4 GetMetricData + 2 ListMetrics calls"),
        "{out}"
    );
    assert!(out.contains("180 rows written"), "{out}");
    assert_matches(&lake_totals(&data), &expected);
    // Percentiles were asked for (moto computes none: the stats map stays empty).
    let pcts = lake_query(
        &data,
        "csv",
        "SELECT count(*) FROM metrics WHERE cardinality(stats) > 0",
    );
    assert_eq!(pcts.lines().last().unwrap().trim(), "0", "{pcts}");
    // Rows are the streamed shape: sorted dimensions, minute starts.
    let row = lake_query(
        &data,
        "csv",
        "SELECT dimensions['Service'] AS service, dimensions['Stage'] AS stage, \
         cardinality(dimensions) AS dims, CAST(time AS VARCHAR) AS t FROM metrics \
         WHERE account_id = '222222222222' AND metric_name = 'Latency' ORDER BY time LIMIT 1",
    );
    assert!(row.contains("api,prod,2,2026-01-05T23:45:00"), "{row}");

    // The same command again: everything is done already.
    let calls = shim.calls();
    let (ok, out, err) = run(&[]);
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("(4 already done by an earlier run)"), "{out}");
    assert!(
        out.contains("0 GetMetricData + 0 ListMetrics calls"),
        "{out}"
    );
    assert_eq!(shim.calls(), calls);
    assert_matches(&lake_totals(&data), &expected);

    // Fetched again from scratch (--fresh), with throttling and pages of 7
    // datapoints: the rows are the same datapoints, so the lake does not change.
    shim.control("throttle", 3);
    shim.control("page", 7);
    let (ok, out, err) = run(&["--fresh"]);
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("(3 retried, 3 throttled)"), "{out}");
    // Per account: window 1 has 15 minutes (3 pages of ≤7), window 2 as well.
    assert!(
        out.contains("12 GetMetricData + 2 ListMetrics calls"),
        "{out}"
    );
    assert_matches(&lake_totals(&data), &expected);
}

#[test]
fn an_interrupted_backfill_resumes_where_it_stopped() {
    let moto = Moto::start();
    let shim = CloudWatchShim::start(&moto);
    let accounts = ["411111111111", "522222222222"];
    let expected = put_fleet(&moto, &accounts);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let args = [
        "--account",
        "411111111111,522222222222",
        "--role-name",
        ROLE,
        "--concurrency",
        "1",
        "--max-attempts",
        "2",
    ];
    // Calls of the first account: ListMetrics, window 1, window 2. After two
    // answered calls CloudWatch throttles everything: window 2 fails for good.
    shim.control("fail_after", 2);
    let (ok, out, err) = backfill(&shim, &data, &args);
    assert!(!ok, "{out}\n{err}");
    assert!(
        err.contains("GetMetricData failed after 2 attempt(s)"),
        "{err}"
    );
    assert!(
        err.contains("run the same command again to resume"),
        "{err}"
    );
    assert!(
        out.contains("backfilled 0 of 2 account-region(s) (2 failed)"),
        "{out}"
    );
    // What was written before the failure is in the lake.
    let partial = lake_totals(&data);
    assert_eq!(partial.len(), 1, "{partial:?}");
    assert!(partial.values().next().unwrap()["n"].as_u64().unwrap() > 0);

    shim.control("fail_after", -1);
    let before = shim.calls();
    let (ok, out, err) = backfill(&shim, &data, &args);
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("(1 already done by an earlier run)"), "{out}");
    let after = shim.calls();
    // The first account's list is in the checkpoint: one ListMetrics (the second
    // account's) and three GetMetricData calls (one window, then two).
    assert_eq!(after["ListMetrics"] - before["ListMetrics"], 1, "{after:?}");
    assert_eq!(
        after["GetMetricData"] - before["GetMetricData"],
        3,
        "{after:?}"
    );
    assert_matches(&lake_totals(&data), &expected);
}

#[test]
fn bad_backfill_arguments_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    for (args, message) in [
        (
            vec![
                "--start",
                "2026-01-01T00:00:00Z",
                "--period",
                "45s",
                "--account",
                "111111111111",
            ],
            "period 45s",
        ),
        (
            vec!["--start", "yesterday", "--account", "111111111111"],
            "--start: \"yesterday\"",
        ),
        (
            vec![
                "--start",
                "1h",
                "--percentile",
                "p200",
                "--account",
                "111111111111",
            ],
            "percentile \"p200\"",
        ),
        (
            vec!["--start", "1h", "--account", "12345", "--role-name", "r"],
            "account \"12345\": an AWS account id has 12 digits",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_fleetlake"))
            .args([
                "backfill",
                "cloudwatch",
                "--data-dir",
                data,
                "--region",
                "us-east-1",
            ])
            .args(&args)
            .envs(aws_env())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(err.contains(message), "{args:?}: {err}");
    }
}

/// One Metric Streams JSON line of the gap-fill test's two series.
fn stream_line(
    account: &str,
    metric: &str,
    time_ms: i64,
    (count, sum, min, max): (f64, f64, f64, f64),
) -> String {
    format!(
        r#"{{"metric_stream_name":"fleet","account_id":"{account}","region":"us-east-1","namespace":"Fleet/App","metric_name":"{metric}","dimensions":{{"Service":"api"}},"timestamp":{time_ms},"value":{{"count":{count:.1},"sum":{sum:.1},"max":{max:.1},"min":{min:.1}}},"unit":"Count"}}"#
    )
}

/// The gap-fill test's datapoint of `metric` at minute `m`: count, sum, min, max.
fn gap_value(metric: &str, m: i64) -> (f64, f64, f64, f64) {
    if metric == "Requests" {
        (2.0, 10.0 + m as f64, 1.0, 9.0 + m as f64)
    } else {
        let v = (m % 4) as f64;
        (1.0, v, v, v)
    }
}

fn stream_minutes(
    server: &Server,
    id: &str,
    account: &str,
    base_ms: i64,
    minutes: std::ops::Range<i64>,
) {
    let lines: Vec<String> = minutes
        .flat_map(|m| {
            ["Requests", "Errors"].map(|metric| {
                stream_line(account, metric, base_ms + m * 60_000, gap_value(metric, m))
            })
        })
        .collect();
    let (status, body) = server.post(&FirehoseRequest::new(id, vec![lines.join("\n")]));
    assert_eq!(status, 200, "{body}");
}

#[test]
fn the_service_fills_a_hole_in_a_stream_from_cloudwatch_without_double_counting() {
    let moto = Moto::start();
    let shim = CloudWatchShim::start(&moto);
    let account = "611111111111";
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let base = (now_ms / 60_000 - 41) * 60_000;
    // CloudWatch has all 40 minutes of both series.
    moto.python(
        r#"
import sys, json, datetime, boto3
account, base = sys.argv[1], int(sys.argv[2])
creds = client('sts').assume_role(RoleArn=f'arn:aws:iam::{account}:role/fleetlake-read',
                                  RoleSessionName='put')['Credentials']
cw = boto3.client('cloudwatch', endpoint_url=ENDPOINT, region_name='us-east-1',
                  aws_access_key_id=creds['AccessKeyId'],
                  aws_secret_access_key=creds['SecretAccessKey'],
                  aws_session_token=creds['SessionToken'])
for m in range(40):
    ts = datetime.datetime.fromtimestamp(base / 1000 + 60 * m, datetime.timezone.utc)
    data = []
    for name, (c, s, lo, hi) in [('Requests', (2.0, 10.0 + m, 1.0, 9.0 + m)),
                                 ('Errors', (1.0, float(m % 4), float(m % 4), float(m % 4)))]:
        data.append({'MetricName': name, 'Timestamp': ts, 'Unit': 'Count',
                     'Dimensions': [{'Name': 'Service', 'Value': 'api'}],
                     'StatisticValues': {'SampleCount': c, 'Sum': s, 'Minimum': lo, 'Maximum': hi}})
    cw.put_metric_data(Namespace='Fleet/App', MetricData=data)
print(json.dumps(True))
"#,
        &[account, &base.to_string()],
    );
    let expected = |minutes: std::ops::Range<i64>| -> (usize, f64) {
        let sum = minutes
            .clone()
            .flat_map(|m| ["Requests", "Errors"].map(|metric| gap_value(metric, m).1))
            .sum();
        (2 * minutes.count(), sum)
    };
    let dir = tempfile::tempdir().unwrap();
    let mut env = aws_env();
    env.extend([
        ("FLEETLAKE_GAP_FILL__ENABLED", "true"),
        ("FLEETLAKE_GAP_FILL__ROLE_NAME", ROLE),
        ("FLEETLAKE_GAP_FILL__ENDPOINT_URL", shim.endpoint.as_str()),
        ("FLEETLAKE_GAP_FILL__MIN_GAP", "3m"),
        ("FLEETLAKE_GAP_FILL__SETTLE", "0s"),
        ("FLEETLAKE_GAP_FILL__CHECK_INTERVAL", "1s"),
        ("FLEETLAKE_BUFFER__FLUSH_INTERVAL", "1s"),
    ]);
    let totals = |server: &Server| -> (usize, f64, usize) {
        let rows =
            server.sql("SELECT count(*) AS n, sum(sum) AS s, count(unit) AS units FROM metrics");
        (
            rows[0]["n"].as_u64().unwrap() as usize,
            rows[0]["s"].as_f64().unwrap_or(0.0),
            rows[0]["units"].as_u64().unwrap() as usize,
        )
    };

    let server = Server::start(dir.path(), &env);
    // The stream delivers minutes 0-9 and 20-29: minutes 10-19 are a hole.
    stream_minutes(&server, "r1", account, base, 0..10);
    stream_minutes(&server, "r2", account, base, 20..30);
    let (rows, sum) = expected(0..30);
    wait_until("the hole filled", || totals(&server).0 == rows);
    let (_, got_sum, units) = totals(&server);
    assert_eq!(got_sum, sum);
    // Streamed rows keep their unit; the hole's rows come from GetMetricData (none).
    assert_eq!(units, 40);
    let hole = server.sql(
        "SELECT CAST(min(time) AS BIGINT) AS lo, CAST(max(time) AS BIGINT) AS hi, count(*) AS n \
         FROM metrics WHERE unit IS NULL",
    );
    assert_eq!(hole[0]["lo"].as_i64().unwrap(), (base + 10 * 60_000) * 1000);
    assert_eq!(hole[0]["hi"].as_i64().unwrap(), (base + 19 * 60_000) * 1000);
    assert!(
        server
            .metrics_text()
            .contains(r#"fleetlake_gap_fill_holes_total{outcome="filled"} 1"#),
        "{}",
        server.metrics_text()
    );
    // The hole's data arrives late after all (a Firehose retry): first writer wins.
    stream_minutes(&server, "r3", account, base, 10..20);
    server.stop();
    let lake = lake_query(
        dir.path(),
        "json",
        "SELECT count(*) AS n, sum(sum) AS s, count(unit) AS units FROM metrics",
    );
    let lake: Value =
        serde_json::from_str(lake.lines().find(|l| !l.trim().is_empty()).unwrap()).unwrap();
    let lake = if lake.is_array() {
        lake[0].clone()
    } else {
        lake
    };
    assert_eq!(lake["n"].as_u64().unwrap() as usize, rows, "{lake}");
    assert_eq!(lake["s"].as_f64().unwrap(), sum, "{lake}");
    assert_eq!(lake["units"], 40, "{lake}");

    // fleetlake was down while minutes 30-34 went by: after the restart the stream
    // resumes at 35, and the lake's last minute (29) marks the start of a hole.
    let server = Server::start(dir.path(), &env);
    stream_minutes(&server, "r4", account, base, 35..40);
    let (rows, sum) = expected(0..40);
    wait_until("the hole across the restart filled", || {
        totals(&server).0 == rows
    });
    assert_eq!(totals(&server).1, sum);
    server.stop();
}

#[test]
fn a_backfill_killed_mid_run_resumes_without_losing_or_doubling_rows() {
    let moto = Moto::start();
    let shim = CloudWatchShim::start(&moto);
    let accounts = ["711111111111", "822222222222"];
    let expected = put_fleet(&moto, &accounts);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let args = [
        "--account",
        "711111111111,822222222222",
        "--role-name",
        ROLE,
        "--concurrency",
        "1",
    ];
    // Slow answers, so that the kill lands after the first unit and before the last.
    shim.control("delay_ms", 400);
    let mut child = backfill_command(&shim, &data, &args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The first account's first unit is checkpointed: its rows are in the WAL.
    wait_until("the first unit checkpointed", || {
        std::fs::read_dir(data.join("backfill"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|job| job.path().join("711111111111-us-east-1.done").exists())
    });
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    shim.control("delay_ms", 0);

    let (ok, out, err) = backfill(&shim, &data, &args);
    assert!(ok, "{out}\n{err}");
    // Everything is there once: the write-ahead log kept what was written before the
    // kill, and whatever was fetched again is the same datapoints.
    assert_matches(&lake_totals(&data), &expected);
    let resumed: usize = out
        .split(" already done by an earlier run")
        .next()
        .and_then(|s| s.rsplit('(').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    assert!((1..4).contains(&resumed), "{out}");
}
