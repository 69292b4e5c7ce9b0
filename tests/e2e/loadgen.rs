//! `fleetlake-loadgen` against the real service: Firehose (JSON with logs, OTel 1.0
//! with the visibility probe), files through `replay`, and a Kinesis stream on
//! kinesis-local consumed by the service. Every datapoint the report calls
//! acknowledged is counted back in SQL, the same seed gives the same data whatever
//! the target, and a rejected request shows in the report and the exit status.

use std::path::Path;
use std::process::Command;

use crate::support::{KinesisLocal, Server, aws_env, boto3, cli, wait_until};

/// 50 accounts × 4 functions × 5 metrics × 3 minutes.
const DATAPOINTS: u64 = 3_000;
/// Fixed, so every target makes the same datapoints.
const START: &str = "2026-11-20T10:00:00Z";

/// Runs `fleetlake-loadgen` with `args` (and `--report json`); exit status, report,
/// stderr.
fn loadgen(args: &[&str], env: &[(&str, &str)]) -> (bool, serde_json::Value, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_fleetlake-loadgen"));
    command
        .args(["--report", "json", "--generators", "2"])
        .args(args);
    for (k, v) in env {
        command.env(k, v);
    }
    let out = command.output().expect("run fleetlake-loadgen");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let report = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("report is not JSON ({e}): {stdout}\n{stderr}"));
    (out.status.success(), report, stderr)
}

fn fleet_args<'a>(seed: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--seed",
        seed,
        "--accounts",
        "50",
        "--minutes",
        "3",
        "--start",
        START,
        "--inject-errors",
        "2",
        "--error-rate",
        "0.5",
    ];
    args.extend_from_slice(extra);
    args
}

fn number(rows: &[serde_json::Value], key: &str) -> f64 {
    rows[0][key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} in {rows:?}"))
}

/// Datapoints, the sum of all sums (rounded: the order of a float sum varies), and
/// accounts of the data in a table.
fn fingerprint(rows: Vec<serde_json::Value>) -> (f64, f64, f64) {
    (
        number(&rows, "n"),
        (number(&rows, "total") * 100.0).round() / 100.0,
        number(&rows, "accounts"),
    )
}

const FINGERPRINT: &str = "SELECT count(*) AS n, sum(sum) AS total, \
     count(DISTINCT account_id) AS accounts FROM metrics WHERE namespace = 'AWS/Lambda'";

/// The load generator is a binary of its own; the service binary no longer has it.
#[test]
fn loadgen_is_its_own_binary() {
    let help = Command::new(env!("CARGO_BIN_EXE_fleetlake-loadgen"))
        .arg("--help")
        .output()
        .expect("run fleetlake-loadgen --help");
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(help.status.success(), "{text}");
    assert!(
        text.starts_with("Send a synthetic fleet's metric streams"),
        "{text}"
    );
    for flag in ["--accounts", "--to", "--probe-visibility", "--report"] {
        assert!(text.contains(flag), "{flag} missing from:\n{text}");
    }
    let old = Command::new(env!("CARGO_BIN_EXE_fleetlake"))
        .args(["loadgen", "--help"])
        .output()
        .expect("run fleetlake loadgen --help");
    assert!(!old.status.success(), "`fleetlake loadgen` still exists");
}

#[test]
fn loadgen_feeds_firehose_files_and_kinesis_with_the_same_fleet() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    let url = server.url("");

    // JSON with log events and injected errors.
    let args = fleet_args(
        "7",
        &[
            "--url",
            &url,
            "--log-events",
            "2",
            "--records-per-request",
            "10",
        ],
    );
    let (ok, report, stderr) = loadgen(&args, &[]);
    assert!(ok, "{report}\n{stderr}");
    assert_eq!(report["datapoints_sent"], DATAPOINTS, "{report}");
    assert_eq!(report["datapoints_acknowledged"], DATAPOINTS, "{report}");
    assert_eq!(report["datapoints_rejected"], 0);
    assert_eq!(
        report["log_events_acknowledged"],
        50 * 4 * 3 * 2,
        "{report}"
    );
    // 15 requests of 200 datapoints, each with a logs request.
    assert_eq!(report["requests"], 30, "{report}");
    assert!(report["latency_ms"]["p99"].as_f64().unwrap() > 0.0);
    assert_eq!(report["first_time"], START);
    assert_eq!(report["last_time"], "2026-11-20T10:02:00Z");
    let injected: Vec<String> = report["error_accounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    assert_eq!(injected.len(), 2);

    let firehose = fingerprint(server.sql(FINGERPRINT));
    assert_eq!((firehose.0, firehose.2), (DATAPOINTS as f64, 50.0));
    let logs = server.sql("SELECT count(*) AS n, count(DISTINCT account_id) AS a FROM logs");
    assert_eq!((number(&logs, "n"), number(&logs, "a")), (1200.0, 50.0));
    // The injected accounts, and only they, fail half their invocations.
    let rates = server.sql(
        "SELECT account_id, sum(sum) / sum(count) AS rate FROM metrics \
         WHERE metric_name = 'Errors' GROUP BY account_id ORDER BY rate DESC",
    );
    for (i, row) in rates.iter().enumerate() {
        let rate = row["rate"].as_f64().unwrap();
        if i < 2 {
            assert!(injected.contains(&row["account_id"].as_str().unwrap().to_string()));
            assert!(rate > 0.45, "{row}");
        } else {
            assert!(rate < 0.05, "{row}");
        }
    }

    // The same run again: the same request ids and rows, stored once.
    let (ok, again, _) = loadgen(&args, &[]);
    assert!(ok);
    assert_eq!(again["datapoints_acknowledged"], DATAPOINTS);
    assert_eq!(fingerprint(server.sql(FINGERPRINT)), firehose);

    // OpenTelemetry 1.0, another seed, paced, with the visibility probe.
    let otel = fleet_args(
        "8",
        &[
            "--url",
            &url,
            "--format",
            "otel1",
            "--records-per-request",
            "5",
            "--rate",
            "1500",
            "--probe-visibility",
        ],
    );
    let (ok, report, stderr) = loadgen(&otel, &[]);
    assert!(ok, "{report}\n{stderr}");
    assert_eq!(report["datapoints_acknowledged"], DATAPOINTS, "{report}");
    // 3,000 datapoints at 1,500/s: paced over two seconds, so probes went out.
    assert!(report["elapsed_s"].as_f64().unwrap() >= 1.8, "{report}");
    let probes = report["visibility_ms"]["samples"].as_u64().unwrap();
    assert!(probes >= 1, "{report}");
    let seen = server.sql(
        "SELECT count(*) AS n FROM metrics WHERE account_id = '000000000000' \
         AND metric_name = 'VisibilityProbe'",
    );
    assert!(number(&seen, "n") >= probes as f64);
    let both = fingerprint(server.sql(FINGERPRINT));
    assert_eq!((both.0, both.2), (2.0 * DATAPOINTS as f64, 100.0));

    // Files of the first seed, replayed into another lake: the same data.
    let files = dir.path().join("files");
    let out = files.to_str().unwrap();
    let (ok, report, _) = loadgen(
        &fleet_args("7", &["--to", "files", "--out", out, "--log-events", "2"]),
        &[],
    );
    assert!(ok);
    assert_eq!(report["files"].as_array().unwrap().len(), 2, "{report}");
    let replayed = dir.path().join("replayed");
    replay(&replayed, "json", &files.join("part-00000.json.gz"));
    replay(&replayed, "cwlogs", &files.join("logs-00000.json.gz"));
    let lake = Server::start(&replayed, &[]);
    assert_eq!(fingerprint(lake.sql(FINGERPRINT)), firehose);
    let logs = lake.sql("SELECT count(*) AS n FROM logs");
    assert_eq!(number(&logs, "n"), 1200.0);
    lake.stop();

    // A request the service refuses (a wrong access key) is reported, not retried,
    // and the exit status says so.
    let guarded = dir.path().join("guarded");
    let server = Server::start(&guarded, &[("FLEETLAKE_FIREHOSE__ACCESS_KEY", "right")]);
    let url = server.url("");
    let (ok, report, stderr) = loadgen(
        &fleet_args("7", &["--url", &url, "--access-key", "wrong"]),
        &[],
    );
    assert!(!ok);
    assert_eq!(report["datapoints_rejected"], DATAPOINTS, "{report}");
    assert_eq!(report["retries"], 0);
    let why = report["first_rejection"].as_str().unwrap();
    assert!(why.contains("401"), "{why}");
    assert!(stderr.contains("datapoints rejected"), "{stderr}");
    let (ok, report, _) = loadgen(
        &fleet_args("7", &["--url", &url]),
        &[("FLEETLAKE_FIREHOSE_ACCESS_KEY", "right")],
    );
    assert!(ok, "{report}");
    assert_eq!(fingerprint(server.sql(FINGERPRINT)), firehose);
}

fn replay(data: &Path, format: &str, file: &Path) {
    let (data, file) = (data.to_str().unwrap(), file.to_str().unwrap());
    let (ok, _, stderr) = cli(&["replay", "--format", format, "--data-dir", data, file]);
    assert!(ok, "{stderr}");
}

#[test]
fn loadgen_puts_records_on_kinesis_for_the_consumer() {
    let kinesis = KinesisLocal::start();
    boto3(
        &kinesis.endpoint,
        "k = client('kinesis')\nk.create_stream(StreamName='fleet', ShardCount=2)\n\
         k.get_waiter('stream_exists').wait(StreamName='fleet')\nprint('{}')",
        &[],
    );
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("fleetlake.toml");
    std::fs::write(
        &config,
        format!(
            "[buffer]\nflush_interval = \"300ms\"\n\n[[kinesis]]\nstream = \"fleet\"\n\
             region = \"us-east-1\"\nendpoint_url = \"{}\"\nidle_wait = \"100ms\"\n",
            kinesis.endpoint
        ),
    )
    .unwrap();
    let server = Server::start_with_args(
        &dir.path().join("data"),
        &aws_env(),
        &["--config", config.to_str().unwrap()],
    );
    let mut env = aws_env();
    env.push(("AWS_REGION", "us-east-1"));
    let args = fleet_args(
        "7",
        &[
            "--to",
            "kinesis",
            "--stream",
            "fleet",
            "--endpoint-url",
            &kinesis.endpoint,
            "--records-per-request",
            "50",
        ],
    );
    let (ok, report, stderr) = loadgen(&args, &env);
    assert!(ok, "{report}\n{stderr}");
    assert_eq!(report["datapoints_acknowledged"], DATAPOINTS, "{report}");
    // 150 records of 20 datapoints, in 3 PutRecords calls (plus any retries).
    let calls = report["requests"].as_u64().unwrap() - report["retries"].as_u64().unwrap();
    assert_eq!(calls, 3, "{report}");
    wait_until("every datapoint consumed", || {
        number(&server.sql(FINGERPRINT), "n") >= DATAPOINTS as f64
    });
    let got = fingerprint(server.sql(FINGERPRINT));
    assert_eq!((got.0, got.2), (DATAPOINTS as f64, 50.0));
    server.stop();
}
