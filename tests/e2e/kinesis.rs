//! The Kinesis consumer against moto: records put by boto3 (plain Metric Streams JSON,
//! KPL aggregates made by `aws-kinesis-agg`, gzip'd CloudWatch Logs, an undecodable
//! record) land exactly once, through a kill -9 in the middle and a restart.

use std::path::Path;

use crate::support::*;

/// Puts `accounts` × `minutes` datapoints (from `first_minute`) on `stream` (4 shards,
/// made if `create`): even minutes as plain records, odd minutes in KPL aggregates of
/// up to 7 user records. With `extras`, also one undecodable record, and a stream
/// `fleet-logs` (2 shards) of 30 CloudWatch Logs records of 10 events plus 2 control
/// messages.
const PRODUCER: &str = r#"
import gzip, json, sys
from aws_kinesis_agg.aggregator import RecordAggregator
stream, accounts, minutes, first, create, extras = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "create", sys.argv[6] == "extras"
k = client("kinesis")
if create:
    k.create_stream(StreamName=stream, ShardCount=4)
def line(a, m):
    return json.dumps({"metric_stream_name": "fleet", "account_id": "%012d" % a, "region": "us-east-1",
        "namespace": "AWS/Lambda", "metric_name": "Errors", "dimensions": {"FunctionName": "f%d" % (a % 3)},
        "timestamp": 1700000040000 + m * 60000, "value": {"count": 1.0, "sum": float(a), "min": float(a), "max": float(a)},
        "unit": "Count"}).encode()
records = []
for a in range(accounts):
    pk = "%012d" % a
    agg = RecordAggregator()
    for m in range(first, first + minutes):
        if m % 2 == 0:
            records.append({"Data": line(a, m), "PartitionKey": pk})
        else:
            agg.add_user_record(pk, line(a, m))
            if agg.get_num_user_records() == 7:
                records.append({"Data": agg.clear_and_get().get_contents()[2], "PartitionKey": pk})
    if agg.get_num_user_records():
        records.append({"Data": agg.clear_and_get().get_contents()[2], "PartitionKey": pk})
if extras:
    records.append({"Data": b"\x00\x01 not a metric", "PartitionKey": "garbage"})
for i in range(0, len(records), 500):
    k.put_records(StreamName=stream, Records=records[i:i + 500])
events = 0
if extras:
    k.create_stream(StreamName="fleet-logs", ShardCount=2)
    logs = []
    for r in range(30):
        msg = {"messageType": "DATA_MESSAGE", "owner": "%012d" % (r % 5), "logGroup": "/aws/lambda/f%d" % (r % 3),
               "logStream": "s%d" % r, "subscriptionFilters": ["fleet"],
               "logEvents": [{"id": "%d-%d" % (r, e), "timestamp": 1700000000000 + r * 1000 + e, "message": "event %d" % e}
                             for e in range(10)]}
        logs.append({"Data": gzip.compress(json.dumps(msg).encode(), 6), "PartitionKey": "lg%d" % r})
        events += 10
    control = {"messageType": "CONTROL_MESSAGE", "owner": "CloudwatchLogs", "logGroup": "", "logStream": "",
               "subscriptionFilters": [], "logEvents": [{"id": "", "timestamp": 1741312971934, "message": "CWL CONTROL MESSAGE"}]}
    logs += [{"Data": gzip.compress(json.dumps(control).encode()), "PartitionKey": "c%d" % i} for i in range(2)]
    k.put_records(StreamName="fleet-logs", Records=logs)
print(json.dumps({"records": len(records), "datapoints": accounts * minutes, "log_events": events}))
"#;

fn produce(moto: &Moto, accounts: usize, minutes: usize, first: usize, first_time: bool) -> i64 {
    let out = moto.python(
        PRODUCER,
        &[
            "fleet-metrics",
            &accounts.to_string(),
            &minutes.to_string(),
            &first.to_string(),
            if first_time { "create" } else { "append" },
            if first_time { "extras" } else { "none" },
        ],
    );
    out["datapoints"].as_i64().unwrap()
}

fn config(dir: &Path, moto: &Moto) -> std::path::PathBuf {
    let path = dir.join("fleetlake.toml");
    let stream = |name: &str, format: &str| {
        format!(
            "[[kinesis]]\nstream = \"{name}\"\nformat = \"{format}\"\nregion = \"us-east-1\"\n\
             endpoint_url = \"{}\"\nidle_wait = \"100ms\"\ndiscovery_interval = \"1s\"\n\
             max_records = 5\n\n",
            moto.endpoint
        )
    };
    std::fs::write(
        &path,
        format!(
            "[buffer]\nflush_interval = \"250ms\"\n\n{}{}",
            stream("fleet-metrics", "json"),
            stream(
                "arn:aws:kinesis:us-east-1:123456789012:stream/fleet-logs",
                "cwlogs"
            )
        ),
    )
    .unwrap();
    path
}

fn count(server: &Server, table: &str) -> i64 {
    server.sql(&format!("SELECT count(*) AS n FROM {table}"))[0]["n"]
        .as_i64()
        .unwrap()
}

/// Rows dropped as duplicates: none, when positions are committed exactly.
fn duplicates(server: &Server) -> f64 {
    server
        .metrics_text()
        .lines()
        .filter(|l| l.starts_with("fleetlake_aggregate_duplicate_rows_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn kinesis_records_land_exactly_once_through_kill_9_and_restarts() {
    let moto = Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = config(dir.path(), &moto);
    let args = ["--config", config.to_str().unwrap()];
    let points = produce(&moto, 40, 30, 0, true);
    assert_eq!(points, 1200);

    // Killed after its first commits, long before the shards are read (5 records a
    // call, 5 calls a second per shard).
    let server = Server::start_with_args(&data, &aws_env(), &args);
    wait_for_commit_after(&data, 1);
    let before = count(&server, "metrics");
    assert!(before < points, "read everything before the kill: {before}");
    server.kill9();

    let server = Server::start_with_args(&data, &aws_env(), &args);
    wait_until("every record", || {
        count(&server, "metrics") >= points && count(&server, "logs") >= 300
    });
    assert_eq!(count(&server, "metrics"), points);
    assert_eq!(count(&server, "logs"), 300);
    assert_eq!(count(&server, "dead_letters"), 1);
    assert_eq!(
        duplicates(&server),
        0.0,
        "records read twice after the restart"
    );
    let metrics = server.metrics_text();
    // (The logs stream may have been read whole before the kill: only the metrics
    // stream is sure to be read by this process.)
    for needle in [
        "fleetlake_kinesis_records_total{stream=\"fleet-metrics\",shard=\"shardId-",
        "fleetlake_kinesis_millis_behind_latest{stream=\"fleet-metrics\"",
        "fleetlake_kinesis_shards{stream=\"fleet-logs\"} 2",
    ] {
        assert!(metrics.contains(needle), "{needle} not in {metrics}");
    }
    let dead = server.sql("SELECT source, position, reason FROM dead_letters");
    assert_eq!(dead[0]["source"], "kinesis/fleet-metrics");
    assert!(
        dead[0]["position"]
            .as_str()
            .unwrap()
            .starts_with("shardId-"),
        "{dead:?}"
    );
    server.stop();

    // More records while it is stopped: a restart reads just those.
    let more = produce(&moto, 40, 4, 30, false);
    let server = Server::start_with_args(&data, &aws_env(), &args);
    wait_until("the new records", || {
        count(&server, "metrics") >= points + more
    });
    assert_eq!(
        count(&server, "metrics"),
        points + more,
        "{:?}",
        server.sql(
            "SELECT account_id, CAST(time AS VARCHAR) AS t, count(*) AS n FROM metrics \
             GROUP BY 1, 2 HAVING count(*) > 1"
        )
    );
    assert_eq!(duplicates(&server), 0.0);
    server.stop();

    let out = lake_query(
        &data,
        "csv",
        "SELECT count(*) AS n, count(DISTINCT (account_id, time)) AS points, \
         sum(sum) AS total FROM metrics",
    );
    // Datapoints of account a carry value a: 34 minutes of 0 + 1 + ... + 39.
    assert_eq!(
        out.lines().nth(1),
        Some(format!("{0},{0},{1}.0", points + more, 34 * 780).as_str()),
        "{out}"
    );
    let out = lake_query(
        &data,
        "csv",
        "SELECT count(*) AS n, count(DISTINCT event_id) AS ids FROM logs",
    );
    assert_eq!(out.lines().nth(1), Some("300,300"), "{out}");
}

#[test]
fn kinesis_config_errors_name_the_entry() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("fleetlake.toml");
    std::fs::write(
        &config,
        "[[kinesis]]\nstream = \"ok\"\n\n[[kinesis]]\nstream = \"b\"\nstart_position = \"AT_TIMESTAMP\"\n",
    )
    .unwrap();
    let (ok, _, err) = cli(&["serve", "--config", config.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains("kinesis[1].start_timestamp is required"),
        "{err}"
    );
}

/// Puts datapoints on `reshard` while splitting shard 0 and then merging its two
/// children. Each partition key (an account) gets a probe datapoint before each
/// reshard and the same datapoint with another value after it, on a child shard: the
/// first delivery is kept, so the lake keeps value 1 only if every parent was read
/// before its children.
const RESHARDER: &str = r#"
import json, sys, time
P, M = int(sys.argv[1]), int(sys.argv[2])
k = client("kinesis")
def wait_active():
    for _ in range(600):
        if k.describe_stream_summary(StreamName="reshard")["StreamDescriptionSummary"]["StreamStatus"] == "ACTIVE":
            return
        time.sleep(0.1)
    raise SystemExit("stream not active")
def dp(a, m, v):
    return json.dumps({"account_id": "%012d" % a, "region": "us-east-1", "namespace": "AWS/Lambda",
        "metric_name": "Invocations", "dimensions": {}, "timestamp": 1700000040000 + m * 60000,
        "value": {"count": 1.0, "sum": v, "min": v, "max": v}, "unit": "Count"}).encode()
def put(minutes, probe):
    recs = []
    for a in range(P):
        recs += [{"Data": dp(a, m, 1.0), "PartitionKey": "%012d" % a} for m in minutes]
        recs.append({"Data": dp(a, probe[0], probe[1]), "PartitionKey": "%012d" % a})
    for i in range(0, len(recs), 100):
        k.put_records(StreamName="reshard", Records=recs[i:i + 100])
if sys.argv[3] == "create":
    k.create_stream(StreamName="reshard", ShardCount=2)
    wait_active()
    print(json.dumps({}))
    raise SystemExit
put(range(0, M), (1000, 1.0))
hash_range = k.list_shards(StreamName="reshard")["Shards"][0]["HashKeyRange"]
middle = (int(hash_range["StartingHashKey"]) + int(hash_range["EndingHashKey"])) // 2
k.split_shard(StreamName="reshard", ShardToSplit="shardId-000000000000", NewStartingHashKey=str(middle))
wait_active()
put(range(M, 2 * M), (1000, 2.0))
put([], (1001, 1.0))
k.merge_shards(StreamName="reshard", ShardToMerge="shardId-000000000002", AdjacentShardToMerge="shardId-000000000003")
wait_active()
put(range(2 * M, 3 * M), (1001, 2.0))
shards = k.list_shards(StreamName="reshard")["Shards"]
print(json.dumps({"datapoints": P * (3 * M + 2), "shards": [s["ShardId"] for s in shards]}))
"#;

#[test]
fn resharding_while_producing_keeps_order_per_key_and_loses_nothing() {
    let kinesis = KinesisLocal::start();
    boto3(&kinesis.endpoint, RESHARDER, &["0", "0", "create"]);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("fleetlake.toml");
    std::fs::write(
        &config,
        format!(
            "[buffer]\nflush_interval = \"300ms\"\n\n[[kinesis]]\nstream = \"reshard\"\n\
             region = \"us-east-1\"\nendpoint_url = \"{}\"\nidle_wait = \"100ms\"\n\
             discovery_interval = \"500ms\"\nmax_records = 25\n",
            kinesis.endpoint
        ),
    )
    .unwrap();
    let args = ["--config", config.to_str().unwrap()];
    let server = Server::start_with_args(&data, &aws_env(), &args);
    let endpoint = kinesis.endpoint.clone();
    let producer =
        std::thread::spawn(move || boto3(&endpoint, RESHARDER, &["20", "10", "produce"]));
    // Killed once something is committed, while records and reshards keep coming.
    wait_for_commit_after(&data, 1);
    server.kill9();
    let server = Server::start_with_args(&data, &aws_env(), &args);
    let produced = producer.join().unwrap();
    let points = produced["datapoints"].as_i64().unwrap();
    assert_eq!(points, 640);
    assert_eq!(
        produced["shards"].as_array().unwrap().len(),
        5,
        "{produced}"
    );
    wait_until("every record", || count(&server, "metrics") >= points);
    assert_eq!(count(&server, "metrics"), points);
    let late_probes = server
        .sql("SELECT account_id, CAST(time AS VARCHAR) AS t, sum FROM metrics WHERE sum <> 1.0");
    assert!(
        late_probes.is_empty(),
        "a child shard was read before its parent: {late_probes:?}"
    );
    server.stop();
    let out = lake_query(
        &data,
        "csv",
        "SELECT count(*) AS n, count(DISTINCT (account_id, time)) AS k, \
         count(DISTINCT account_id) AS a FROM metrics",
    );
    assert_eq!(out.lines().nth(1), Some("640,640,20"), "{out}");
}

#[test]
fn instances_share_a_stream_through_dynamodb_leases_hand_over_and_survive_a_kill() {
    let moto = Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let points = moto.python(
        PRODUCER.replace("fleet-metrics", "shared").as_str(),
        &["shared", "40", "30", "0", "create", "none"],
    )["datapoints"]
        .as_i64()
        .unwrap();
    assert_eq!(points, 1200);
    let config = dir.path().join("fleetlake.toml");
    std::fs::write(
        &config,
        format!(
            "[buffer]\nflush_interval = \"250ms\"\n\n[lake]\ndir = \"{}\"\n\n[[kinesis]]\n\
             stream = \"shared\"\nregion = \"us-east-1\"\nendpoint_url = \"{1}\"\n\
             idle_wait = \"100ms\"\ndiscovery_interval = \"1s\"\nmax_records = 5\n\
             lease_table = \"fleetlake-leases\"\nlease_endpoint_url = \"{1}\"\n\
             lease_duration = \"3s\"\n",
            lake.display(),
            moto.endpoint
        ),
    )
    .unwrap();
    let args = ["--config", config.to_str().unwrap()];
    // The first instance reads alone, then a second joins: the first hands half of
    // the shards over (commits, then releases their leases).
    let first = Server::start_with_args(&dir.path().join("a"), &aws_env(), &args);
    first.wait_for_log("joined the lease table");
    wait_until("a commit by the first instance", || {
        count(&first, "metrics") > 0
    });
    let second = Server::start_with_args(&dir.path().join("b"), &aws_env(), &args);
    second.wait_for_log("joined the lease table");
    first.wait_for_log("released lease");
    second.wait_for_log("took lease");
    // The first instance dies while reading; the second takes its shards over once
    // their leases expire, and reads them on from what the first committed.
    first.kill9();
    second.wait_for_log("previous=Some(");
    wait_until("every record", || count(&second, "metrics") >= points);
    assert_eq!(count(&second, "metrics"), points);
    assert_eq!(duplicates(&second), 0.0, "records read twice");
    second.stop();
    // The shared lake is `<dir>/lake`, the lake of data directory `<dir>`.
    let out = lake_query(
        dir.path(),
        "csv",
        "SELECT count(*) AS n, count(DISTINCT (account_id, time)) AS k FROM metrics",
    );
    assert_eq!(out.lines().nth(1), Some("1200,1200"), "{out}");
}
