//! Faults broken on purpose: the lake's directory turned read-only, the lake's S3 store
//! frozen, the service killed -9 twenty times mid-stream. Each time the service stops
//! acknowledging while it cannot commit, says so on `/health` and `/ready`, recovers by
//! itself, and the lake ends with exactly the acknowledged datapoints.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::*;

/// A directory in which nothing new can be created until this is dropped: `chattr +i`
/// (which binds root too) when running as root, mode 0555 otherwise.
struct ReadOnly {
    dir: PathBuf,
    immutable: bool,
}

impl ReadOnly {
    fn new(dir: &Path) -> Self {
        let uid = Command::new("id").arg("-u").output().unwrap();
        let immutable = String::from_utf8_lossy(&uid.stdout).trim() == "0";
        if immutable {
            let status = Command::new("chattr").arg("+i").arg(dir).status().unwrap();
            assert!(status.success(), "chattr +i {}", dir.display());
        } else {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o555)).unwrap();
        }
        Self {
            dir: dir.to_path_buf(),
            immutable,
        }
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        if self.immutable {
            let _ = Command::new("chattr").arg("-i").arg(&self.dir).status();
        } else {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o755));
        }
    }
}

/// Request `index` of a stream of unique datapoints: 20 accounts at minute `index`.
fn request(index: u64) -> FirehoseRequest {
    let lines: Vec<String> = (0..20)
        .map(|a| {
            datapoint(
                &account_id(a),
                "f",
                "Invocations",
                index as i64,
                (index + a as u64) as f64,
            )
        })
        .collect();
    let mut request = FirehoseRequest::new(&format!("req-{index}"), vec![lines.join("\n")]);
    request.gzip = index.is_multiple_of(2);
    request
}

/// Sum of `sum` over the datapoints of request `index`.
fn sum_of_request(index: u64) -> f64 {
    (0..20).map(|a| (index + a) as f64).sum()
}

/// Sum of `sum` over requests `0..n`.
fn request_sum(n: u64) -> f64 {
    (0..n).map(sum_of_request).sum()
}

fn lake_totals(server: &Server) -> (u64, f64) {
    let rows = server.sql("SELECT count(*) AS n, sum(sum) AS s FROM metrics");
    (
        rows[0]["n"].as_u64().unwrap(),
        rows[0]["s"].as_f64().unwrap_or(0.0),
    )
}

/// The lake alone (`fleetlake query`, no server) holds `rows` datapoints summing to
/// `sum`, none twice (no account and time twice).
fn assert_lake_holds_once(data_dir: &Path, rows: u64, sum: f64) {
    let out = lake_query(
        data_dir,
        "csv",
        "SELECT count(*) AS n, count(DISTINCT k) AS d, sum(s) AS s FROM \
         (SELECT account_id || '/' || CAST(time AS VARCHAR) AS k, sum AS s FROM metrics)",
    );
    assert_eq!(
        out.lines().nth(1).unwrap(),
        format!("{rows},{rows},{sum:.1}")
    );
}

fn fault_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("FLEETLAKE_BUFFER__FLUSH_INTERVAL", "200ms"),
        ("FLEETLAKE_LAKE__COMPACT_INTERVAL", "0s"),
        ("FLEETLAKE_LAKE__ROLLUP_INTERVAL", "0s"),
        ("FLEETLAKE_RETENTION__METRICS", "0s"),
    ]
}

/// The store is refusing: `/health` and `/ready` say so, a delivery gets 503 with the
/// Firehose error body, the stage gauge is 0, and SQL still answers.
fn assert_refusing(server: &Server, expected: Option<(u64, f64)>) {
    wait_until("/health to report the lake failing", || {
        server.get_json("/health").0 == 503
    });
    let (_, health) = server.get_json("/health");
    assert_eq!(health["status"], "unhealthy", "{health}");
    assert_eq!(health["checks"]["lake"]["ok"], false, "{health}");
    assert_eq!(health["checks"]["wal"]["ok"], true, "{health}");
    assert!(health["checks"]["lake"]["failures"].as_u64().unwrap() >= 1);
    let (status, ready) = server.get_json("/ready");
    assert_eq!(status, 503, "{ready}");
    let (status, body) = server.post(&request(1_000_000));
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["requestId"], "req-1000000");
    assert!(
        body["errorMessage"]
            .as_str()
            .unwrap()
            .contains("the lake has refused commits"),
        "{body}"
    );
    assert!(
        server
            .metrics_text()
            .contains("fleetlake_stage_up{stage=\"lake\"} 0"),
        "stage gauge"
    );
    if let Some(expected) = expected {
        // Queries go on over what is committed and what the buffer holds.
        assert_eq!(lake_totals(server), expected);
    }
}

fn assert_recovered(server: &Server) {
    wait_until("/health to report the lake back", || {
        server.get_json("/health").0 == 200
    });
    let (status, ready) = server.get_json("/ready");
    assert_eq!(status, 200, "{ready}");
    assert!(
        server
            .metrics_text()
            .contains("fleetlake_stage_up{stage=\"lake\"} 1")
    );
}

#[test]
fn a_read_only_lake_directory_refuses_deliveries_then_recovers_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &fault_env());
    let (status, health) = server.get_json("/health");
    assert_eq!((status, &health["status"]), (200, &"ok".into()), "{health}");
    let (status, ready) = server.get_json("/ready");
    assert_eq!(status, 200, "{ready}");

    let versions = lake_versions(dir.path());
    assert_eq!(server.post(&request(0)).0, 200);
    wait_for_commit_after(dir.path(), versions);

    let log = dir.path().join("lake/metrics/_delta_log");
    let read_only = ReadOnly::new(&log);
    // Acknowledged before the fault is seen: durable in the WAL, committed later.
    assert_eq!(server.post(&request(1)).0, 200);
    assert_refusing(&server, Some((40, request_sum(2))));
    drop(read_only);

    assert_recovered(&server);
    assert_eq!(server.post(&request(2)).0, 200);
    wait_until("the third commit", || {
        lake_versions(dir.path()) > versions + 2
    });
    let metrics = server.metrics_text();
    for expected in [
        "fleetlake_lake_flush_failures_total",
        "fleetlake_aggregate_rejected_unhealthy_total",
        "fleetlake_lake_commit_duration_seconds_count{table=\"metrics\"}",
        "fleetlake_wal_fsync_duration_seconds_count",
        "fleetlake_wal_group_commit_duration_seconds_count",
        "fleetlake_hot_buffer_flushed_series{table=\"metrics\"} 20",
        "fleetlake_hot_buffer_tracked_series{table=\"metrics\"} 20",
        "fleetlake_ingest_received_datapoints_total{source=\"firehose/metrics\"} 60",
        "fleetlake_ingest_requests_total{source=\"firehose/metrics\",status=\"503\"} 1",
    ] {
        assert!(metrics.contains(expected), "{expected} not in /metrics");
    }
    server.stop();
    // The lake alone (no hot buffer) holds the three acknowledged requests, once.
    assert_lake_holds_once(dir.path(), 60, request_sum(3));
}

#[test]
fn an_s3_lake_that_stops_answering_refuses_deliveries_then_recovers_by_itself() {
    let moto = Moto::start();
    moto.python(
        "import sys\nclient('s3').create_bucket(Bucket=sys.argv[1])\nprint('true')",
        &["fleet-lake"],
    );
    let dir = tempfile::tempdir().unwrap();
    let mut env = aws_env();
    env.extend(fault_env());
    env.extend([
        ("FLEETLAKE_LAKE__LOCATION", "s3://fleet-lake/lake"),
        ("FLEETLAKE_LAKE__ENDPOINT_URL", moto.endpoint.as_str()),
        ("FLEETLAKE_LAKE__REGION", "us-east-1"),
        // A frozen store is noticed within seconds, not object_store's minutes.
        ("FLEETLAKE_LAKE__STORAGE_OPTIONS__TIMEOUT", "2s"),
        ("FLEETLAKE_LAKE__STORAGE_OPTIONS__CONNECT_TIMEOUT", "2s"),
        ("FLEETLAKE_LAKE__STORAGE_OPTIONS__MAX_RETRIES", "1"),
        ("FLEETLAKE_LAKE__STORAGE_OPTIONS__RETRY_TIMEOUT", "4s"),
    ]);
    let server = Server::start(dir.path(), &env);
    assert_eq!(server.post(&request(0)).0, 200);
    wait_until("the first commit", || lake_totals(&server).0 == 20);
    server.wait_for_log("committed flush to lake");

    // SIGSTOP: connections are accepted by the kernel but never answered, as with a
    // store behind a broken network. (A killed moto would forget the bucket, which no
    // real S3 outage does.)
    moto.signal("STOP");
    assert_eq!(server.post(&request(1)).0, 200);
    // Queries need the store for the committed files: not asked meanwhile.
    assert_refusing(&server, None);
    moto.signal("CONT");

    assert_recovered(&server);
    assert_eq!(server.post(&request(2)).0, 200);
    server.stop();
    // An independent reader of the lake on S3 finds the three requests, once.
    let totals = moto.python(
        "import json, os\n\
         from deltalake import DeltaTable\n\
         t = DeltaTable('s3://fleet-lake/lake/metrics', storage_options={'AWS_ENDPOINT_URL': ENDPOINT, 'AWS_REGION': 'us-east-1', 'AWS_ALLOW_HTTP': 'true', 'AWS_ACCESS_KEY_ID': 'testing', 'AWS_SECRET_ACCESS_KEY': 'testing'})\n\
         d = t.to_pyarrow_table().to_pydict()\n\
         print(json.dumps([len(d['sum']), len(set(zip(d['account_id'], d['time']))), sum(d['sum'])]))",
        &[],
    );
    assert_eq!(totals, serde_json::json!([60, 60, request_sum(3)]));
}

/// Posts request `index` to whichever server is up until it is acknowledged (as
/// Firehose retries), or until `stop` is set while no server answers.
fn deliver(addr: &Mutex<String>, index: u64) {
    let request = request(index);
    let body = request.body();
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    loop {
        let url = format!("http://{}/firehose/metrics", addr.lock().unwrap());
        let mut req = http
            .post(url)
            .header("Content-Type", "application/json")
            .header("X-Amz-Firehose-Request-Id", &request.request_id)
            .body(body.clone());
        if request.gzip {
            req = req.header("Content-Encoding", "gzip");
        }
        if let Ok(response) = req.send()
            && response.status() == 200
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn twenty_kill_9s_mid_stream_keep_exactly_the_acknowledged_datapoints() {
    const KILLS: usize = 20;
    const SENDERS: u64 = 2;
    let dir = tempfile::tempdir().unwrap();
    let env = fault_env();
    let mut server = Server::start(dir.path(), &env);
    let addr = Arc::new(Mutex::new(server.addr.clone()));
    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged = Arc::new(AtomicU64::new(0));
    let senders: Vec<_> = (0..SENDERS)
        .map(|sender| {
            let (addr, stop, acknowledged) = (
                Arc::clone(&addr),
                Arc::clone(&stop),
                Arc::clone(&acknowledged),
            );
            std::thread::spawn(move || {
                // Sender s sends requests s, s + SENDERS, ...: each one until it is
                // acknowledged, so the acknowledged requests are exactly those sent.
                let mut index = sender;
                while !stop.load(Ordering::SeqCst) {
                    deliver(&addr, index);
                    acknowledged.fetch_add(1, Ordering::SeqCst);
                    index += SENDERS;
                }
                index
            })
        })
        .collect();
    // Kill at pseudo-random moments between 50 ms and 1.5 s after each start: during
    // WAL appends, flush commits and the replay of the previous kill's WAL.
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut acked_at_kills = Vec::new();
    for _ in 0..KILLS {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(50 + seed % 1450));
        acked_at_kills.push(acknowledged.load(Ordering::SeqCst));
        server.kill9();
        server = Server::start(dir.path(), &env);
        *addr.lock().unwrap() = server.addr.clone();
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    // Sender s acknowledged requests s, s + SENDERS, ... up to before the index it
    // returns: exactly those were acknowledged.
    let acked: Vec<u64> = senders
        .into_iter()
        .zip(0..SENDERS)
        .flat_map(|(sender, first)| (first..sender.join().unwrap()).step_by(SENDERS as usize))
        .collect();
    let sent = acked.len() as u64;
    assert_eq!(sent, acknowledged.load(Ordering::SeqCst));
    // The stream was flowing at every kill.
    for pair in acked_at_kills.windows(2) {
        assert!(
            pair[1] > pair[0],
            "no delivery between two kills: {acked_at_kills:?}"
        );
    }
    eprintln!(
        "{KILLS} kills, {sent} requests ({} datapoints) acknowledged",
        sent * 20
    );

    let sum: f64 = acked.iter().copied().map(sum_of_request).sum();
    let expected = (sent * 20, sum);
    wait_until("every acknowledged datapoint", || {
        lake_totals(&server) == expected
    });
    server.stop();
    // The lake alone: every acknowledged datapoint once, nothing else.
    assert_lake_holds_once(dir.path(), sent * 20, sum);
}

/// Peak and current resident memory of process `pid`, in bytes.
fn memory_of(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kib| kib.parse::<u64>().ok())
            .unwrap()
            * 1024
    };
    (field("VmHWM:"), field("VmRSS:"))
}

#[test]
fn overload_is_refused_with_503_and_memory_stays_bounded() {
    const SENDERS: u64 = 6;
    const PER_SENDER: u64 = 25;
    const LIMIT: u64 = 16 << 20;
    let dir = tempfile::tempdir().unwrap();
    let limit = LIMIT.to_string();
    let mut env = fault_env();
    env.extend([
        ("FLEETLAKE_BUFFER__MAX_BYTES", limit.as_str()),
        // Only the byte limit makes flushes: without it, everything would pile up.
        ("FLEETLAKE_BUFFER__FLUSH_INTERVAL", "1h"),
        ("FLEETLAKE_FIREHOSE__MAX_IN_FLIGHT", "4"),
    ]);
    let server = Server::start(dir.path(), &env);
    let (_, start_rss) = memory_of(server.pid());
    let refusals = Mutex::new(std::collections::BTreeMap::<String, u64>::new());
    // 2,000 datapoints per request, from more senders than the service may read at once.
    let big = |index: u64| {
        let lines: Vec<String> = (0..2_000usize)
            .map(|a| {
                datapoint(
                    &account_id(a % 500),
                    &format!("f{}", a / 500),
                    "Duration",
                    index as i64,
                    (index + a as u64) as f64,
                )
            })
            .collect();
        FirehoseRequest::new(&format!("big-{index}"), vec![lines.join("\n")])
    };
    let done = AtomicBool::new(false);
    let buffer_peak = AtomicU64::new(0);
    std::thread::scope(|scope| {
        let (server_ref, done_ref, buffer_peak_ref) = (&server, &done, &buffer_peak);
        scope.spawn(move || {
            // The hot buffer's own account of its bytes, as /metrics shows it.
            while !done_ref.load(Ordering::SeqCst) {
                let text = server_ref.metrics_text();
                if let Some(bytes) = text
                    .lines()
                    .find(|l| l.starts_with("fleetlake_hot_buffer_bytes{table=\"metrics\"}"))
                    .and_then(|l| l.rsplit(' ').next())
                    .and_then(|v| v.parse::<f64>().ok())
                {
                    buffer_peak_ref.fetch_max(bytes as u64, Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let senders: Vec<_> = (0..SENDERS)
            .map(|sender| {
                let (server, refusals, big) = (&server, &refusals, &big);
                scope.spawn(move || {
                    for k in 0..PER_SENDER {
                        let request = big(sender + k * SENDERS);
                        let http = client();
                        let url = server.url("/firehose/metrics");
                        loop {
                            let sent = http
                                .post(&url)
                                .header("Content-Type", "application/json")
                                .header("X-Amz-Firehose-Request-Id", &request.request_id)
                                .body(request.body())
                                .send();
                            let Ok(response) = sent else {
                                // A connection closed under the sender: a failed
                                // delivery that Firehose retries too. Counted: refused
                                // bodies are read before the answer, so none is expected.
                                *refusals
                                    .lock()
                                    .unwrap()
                                    .entry("connection".into())
                                    .or_default() += 1;
                                std::thread::sleep(Duration::from_millis(50));
                                continue;
                            };
                            let status = response.status().as_u16();
                            let body: serde_json::Value = response.json().unwrap();
                            if status == 200 {
                                break;
                            }
                            assert_eq!(status, 503, "{body}");
                            assert_eq!(body["requestId"], request.request_id.as_str());
                            let message = body["errorMessage"].as_str().unwrap();
                            let reason = if message.contains("MiB, the limit is") {
                                "bytes"
                            } else if message.contains("being read at once") {
                                "in flight"
                            } else {
                                "buffer"
                            };
                            *refusals.lock().unwrap().entry(reason.into()).or_default() += 1;
                            std::thread::sleep(Duration::from_millis(50));
                        }
                    }
                })
            })
            .collect();
        // Stop the poller before a sender's panic is passed on, or the scope waits for
        // it forever.
        let joined: Vec<_> = senders.into_iter().map(|s| s.join()).collect();
        done.store(true, Ordering::SeqCst);
        for sender in joined {
            sender.unwrap();
        }
    });
    let (peak, _) = memory_of(server.pid());
    let buffer_peak = buffer_peak.into_inner();
    let refusals = refusals.into_inner().unwrap();
    eprintln!(
        "overload: {} requests acknowledged, refusals {refusals:?}, hot buffer peak {} MiB (limit {} MiB), resident at start {} MiB, peak {} MiB",
        SENDERS * PER_SENDER,
        buffer_peak >> 20,
        LIMIT >> 20,
        start_rss >> 20,
        peak >> 20,
    );
    // Admission is checked before a request is read, so the requests in flight then (at
    // most 4, of about 1 MiB of rows each) may go past the limit; nothing else.
    assert!(buffer_peak > 0);
    assert!(
        buffer_peak < LIMIT + (6 << 20),
        "hot buffer reached {} MiB",
        buffer_peak >> 20
    );
    assert!(
        refusals.get("bytes").is_some_and(|n| *n > 0),
        "{refusals:?}"
    );
    // Every refusal reached its sender as the documented 503 answer.
    assert!(!refusals.contains_key("connection"), "{refusals:?}");
    let metrics = server.metrics_text();
    assert!(metrics.contains("fleetlake_aggregate_rejected_memory_total"));
    // Recovered: ready again, and after the final flush the lake holds every
    // acknowledged datapoint once. (Rows that arrived out of order behind their series'
    // committed time wait in the buffer for the next flush to check them against the
    // lake, so SQL is not asked before that.)
    let total = SENDERS * PER_SENDER * 2_000;
    let (status, ready) = server.get_json("/ready");
    assert_eq!(status, 200, "{ready}");
    server.stop();
    let out = lake_query(dir.path(), "csv", "SELECT count(*) AS n FROM metrics");
    assert_eq!(out.lines().nth(1).unwrap(), total.to_string());
}
