//! The lake on S3 (moto, which enforces conditional writes): ingest, compaction, query,
//! two instances committing at once, restart; then the Python `deltalake` package reads
//! the tables from moto and finds the same rows.

use crate::support::*;

const BUCKET: &str = "fleet-lake";

/// Environment of a fleetlake whose lake is `s3://fleet-lake/lake` on `moto`.
fn s3_env<'a>(moto: &'a Moto, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut env = aws_env();
    env.extend([
        ("FLEETLAKE_LAKE__LOCATION", "s3://fleet-lake/lake"),
        ("FLEETLAKE_LAKE__ENDPOINT_URL", moto.endpoint.as_str()),
        ("FLEETLAKE_LAKE__REGION", "us-east-1"),
        ("FLEETLAKE_BUFFER__FLUSH_INTERVAL", "100ms"),
        // The test data is from 2023: kept forever, not the default 15 days.
        ("FLEETLAKE_RETENTION__METRICS", "0s"),
    ]);
    env.extend_from_slice(extra);
    env
}

/// `(rows, sum, accounts)` of `metrics` as the server's SQL answers it.
fn totals(server: &Server) -> (u64, f64, u64) {
    let rows = server
        .sql("SELECT count(*) AS n, sum(sum) AS s, count(DISTINCT account_id) AS a FROM metrics");
    let row = &rows[0];
    (
        row["n"].as_u64().unwrap(),
        row["s"].as_f64().unwrap(),
        row["a"].as_u64().unwrap(),
    )
}

/// Commits of the `metrics` table on S3.
fn s3_versions(moto: &Moto) -> usize {
    moto.python(
        "import json, sys\n\
         s3 = client('s3')\n\
         keys = [o['Key'] for p in s3.get_paginator('list_objects_v2').paginate(Bucket=sys.argv[1], Prefix='lake/metrics/_delta_log/') for o in p.get('Contents', [])]\n\
         print(json.dumps(len([k for k in keys if k.endswith('.json')])))",
        &[BUCKET],
    )
    .as_u64()
    .unwrap() as usize
}

#[test]
fn two_instances_share_a_lake_on_s3_with_compaction_and_restart() {
    let moto = Moto::start();
    // The stand-in refuses a second create of one key, as S3 does: that is what makes
    // Delta commits safe between writers.
    let refused = moto.python(
        "import json, sys, botocore\n\
         s3 = client('s3')\n\
         s3.create_bucket(Bucket=sys.argv[1])\n\
         s3.put_object(Bucket=sys.argv[1], Key='probe', Body=b'1', IfNoneMatch='*')\n\
         try:\n    s3.put_object(Bucket=sys.argv[1], Key='probe', Body=b'2', IfNoneMatch='*')\n    print('false')\n\
         except botocore.exceptions.ClientError as e:\n    print(json.dumps(e.response['Error']['Code'] == 'PreconditionFailed'))",
        &[BUCKET],
    );
    assert_eq!(refused, serde_json::json!(true));

    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // Instance a compacts often, so rewrites race with b's appends.
    let a = Server::start(
        dir_a.path(),
        &s3_env(
            &moto,
            &[
                ("FLEETLAKE_LAKE__COMPACT_INTERVAL", "300ms"),
                ("FLEETLAKE_LAKE__COMPACT_MIN_FILES", "2"),
                // Files replaced are deleted soon, but not under a running query.
                ("FLEETLAKE_LAKE__VACUUM_GRACE", "5s"),
            ],
        ),
    );
    let b = Server::start(
        dir_b.path(),
        &s3_env(&moto, &[("FLEETLAKE_LAKE__COMPACT_INTERVAL", "0s")]),
    );
    // Disjoint minutes per instance, each sent in several requests (several commits).
    let requests = |server: &Server, name: &str, minutes: std::ops::Range<i64>| {
        for minute in minutes {
            let request = FirehoseRequest::new(
                &format!("{name}-{minute}"),
                fleet_records(30, minute..minute + 1, 20),
            );
            assert_eq!(server.post(&request).0, 200);
            std::thread::sleep(std::time::Duration::from_millis(150));
        }
    };
    std::thread::scope(|s| {
        s.spawn(|| requests(&a, "a", 0..8));
        s.spawn(|| requests(&b, "b", 8..16));
    });
    let expected = (30 * 4 * 16, fleet_sum(30, 0..16), 30);
    wait_until("both instances' rows committed", || {
        a.sql("SELECT count(*) AS n FROM metrics")[0]["n"].as_u64() == Some(expected.0)
            && s3_versions(&moto) > 4
    });
    // Commits are visible across instances: a's SQL sees b's rows through the lake.
    wait_until("a sees everything", || totals(&a) == expected);
    wait_until("a compacted the shared lake", || {
        a.metrics_text()
            .lines()
            .any(|l| l.starts_with("fleetlake_lake_compacted_partitions_total"))
    });
    // A Firehose retry that reaches the other instance: minute 20 committed by a, then
    // sent again to b, whose own rows of those series end at minute 15. b checks what
    // another writer committed since, and keeps none of it twice.
    let minute_20 = fleet_records(30, 20..21, 20);
    assert_eq!(
        a.post(&FirehoseRequest::new("a-20", minute_20.clone())).0,
        200
    );
    let expected = (
        expected.0 + 30 * 4,
        expected.1 + fleet_sum(30, 20..21),
        expected.2,
    );
    wait_until("b sees a's minute 20 in the lake", || {
        totals(&b) == expected
    });
    assert_eq!(b.post(&FirehoseRequest::new("b-20", minute_20)).0, 200);
    let flushes = |server: &Server| {
        server
            .metrics_text()
            .lines()
            .find(|l| {
                l.starts_with("fleetlake_lake_flush_duration_seconds_count{table=\"metrics\"}")
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let before = flushes(&b);
    wait_until("b flushed the retry", || flushes(&b) > before);
    wait_until("b holds each datapoint once", || totals(&b) == expected);
    a.stop();
    b.stop();

    // Restart on the same S3 lake: nothing lost, nothing doubled (the WALs were
    // committed, so nothing is replayed twice).
    let a = Server::start(dir_a.path(), &s3_env(&moto, &[]));
    assert_eq!(totals(&a), expected);
    a.stop();

    // An independent reader, straight from moto.
    let read = run_python(
        "import json, os, sys\n\
         from deltalake import DeltaTable\n\
         opts = {'AWS_ENDPOINT_URL': os.environ['AWS_STAND_IN'], 'AWS_REGION': 'us-east-1',\n\
                 'AWS_ACCESS_KEY_ID': 'testing', 'AWS_SECRET_ACCESS_KEY': 'testing', 'AWS_ALLOW_HTTP': 'true'}\n\
         t = DeltaTable('s3://fleet-lake/lake/metrics', storage_options=opts).to_pyarrow_table()\n\
         print(json.dumps([t.num_rows, sum(t.column('sum').to_pylist()), len(set(t.column('account_id').to_pylist()))]))",
        &[],
        &[("AWS_STAND_IN", moto.endpoint.as_str())],
    );
    assert_eq!(
        read,
        serde_json::json!([expected.0, expected.1, expected.2]),
        "python deltalake over moto"
    );
}
