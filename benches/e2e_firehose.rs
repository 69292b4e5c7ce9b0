//! End-to-end load run: Firehose requests into the real `fleetlake serve` (release
//! build, WAL on, fsync per group commit) until every datapoint is committed to the
//! lake, then bytes per datapoint on disk.
//!
//! `cargo bench --bench e2e_firehose` — a fleet of 6,000 accounts × 4 Lambda functions ×
//! 5 metrics × `FLEETLAKE_BENCH_MINUTES` minutes (default 10: 1.2 M datapoints), sent
//! as gzip'd requests of 10,000 datapoints (500 records × 20 lines) by 8 concurrent
//! senders on this machine. Timed: first request to the server's exit after SIGTERM,
//! which commits the last buffered rows. Request bodies are built before timing.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;

const ACCOUNTS: u64 = 6_000;
const FUNCTIONS: u64 = 4;
const METRICS: [&str; 5] = [
    "Invocations",
    "Errors",
    "Duration",
    "Throttles",
    "ConcurrentExecutions",
];
const PER_REQUEST: usize = 10_000;
const SENDERS: usize = 8;

fn bodies(minutes: i64) -> Vec<Vec<u8>> {
    let mut lines = Vec::with_capacity(PER_REQUEST);
    let mut out = Vec::new();
    let flush = |lines: &mut Vec<String>, out: &mut Vec<Vec<u8>>| {
        let records: Vec<_> = lines
            .chunks(20)
            .map(|c| {
                serde_json::json!({"data": base64::engine::general_purpose::STANDARD.encode(c.join("\n"))})
            })
            .collect();
        let body = serde_json::json!({
            "requestId": format!("bench-{}", out.len()), "timestamp": 1, "records": records
        });
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        gz.write_all(body.to_string().as_bytes()).unwrap();
        out.push(gz.finish().unwrap());
        lines.clear();
    };
    for minute in 0..minutes {
        let ts = 1_700_000_040_000 + minute * 60_000;
        for account in 0..ACCOUNTS {
            for function in 0..FUNCTIONS {
                for (m, metric) in METRICS.iter().enumerate() {
                    let v = (account * 7 + function * 3 + m as u64 + minute as u64) % 100;
                    lines.push(format!(
                        r#"{{"metric_stream_name":"fleet","account_id":"{:012}","region":"us-east-1","namespace":"AWS/Lambda","metric_name":"{metric}","dimensions":{{"FunctionName":"fn-{function}"}},"timestamp":{ts},"value":{{"count":{v}.0,"sum":{}.5,"max":{v}.0,"min":0.0,"p99":{v}.0}},"unit":"Count"}}"#,
                        100_000_000_000 + account,
                        v * 3
                    ));
                    if lines.len() == PER_REQUEST {
                        flush(&mut lines, &mut out);
                    }
                }
            }
        }
    }
    if !lines.is_empty() {
        flush(&mut lines, &mut out);
    }
    out
}

fn dir_bytes(dir: &std::path::Path, ext: &str) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            total += dir_bytes(&path, ext);
        } else if path.to_string_lossy().ends_with(ext) {
            total += entry.metadata().unwrap().len();
        }
    }
    total
}

fn main() {
    let minutes: i64 = std::env::var("FLEETLAKE_BENCH_MINUTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let datapoints = minutes as u64 * ACCOUNTS * FUNCTIONS * METRICS.len() as u64;
    eprintln!("building {datapoints} datapoints of requests...");
    let bodies = bodies(minutes);
    let wire: usize = bodies.iter().map(Vec::len).sum();

    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_fleetlake"))
        .args(["serve", "--data-dir"])
        .arg(dir.path())
        .args(["--http-addr", "127.0.0.1:0"])
        .env("FLEETLAKE_LOG", "info")
        .env("FLEETLAKE_BUFFER__FLUSH_ROWS", "1000000")
        .env("FLEETLAKE_BUFFER__MAX_ROWS", "4000000")
        .env("FLEETLAKE_BUFFER__FLUSH_INTERVAL", "10s")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut log = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = log.next().expect("server exited").unwrap();
        if let Some(rest) = line
            .split("addr=")
            .nth(1)
            .filter(|_| line.contains("http listening"))
        {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    std::thread::spawn(move || for _ in log {});
    let url = format!("http://{addr}/firehose/metrics");

    let started = Instant::now();
    let mut latencies: Vec<Duration> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..SENDERS)
            .map(|sender| {
                let (bodies, url) = (&bodies, &url);
                scope.spawn(move || {
                    let client = reqwest::blocking::Client::new();
                    let mut latencies = Vec::new();
                    for (i, body) in bodies.iter().enumerate().skip(sender).step_by(SENDERS) {
                        let t = Instant::now();
                        loop {
                            let status = client
                                .post(url)
                                .header("Content-Encoding", "gzip")
                                .header("Content-Type", "application/json")
                                .header("X-Amz-Firehose-Request-Id", format!("bench-{i}"))
                                .body(body.clone())
                                .send()
                                .unwrap()
                                .status();
                            if status == 200 {
                                break;
                            }
                            // 503: over the buffer limit; Firehose would back off and retry.
                            assert_eq!(status, 503, "request {i}");
                            std::thread::sleep(Duration::from_millis(100));
                        }
                        latencies.push(t.elapsed());
                    }
                    latencies
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let acked = started.elapsed();
    Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success());
    let committed = started.elapsed();

    let out = Command::new(env!("CARGO_BIN_EXE_fleetlake"))
        .args(["query", "--format", "csv", "--data-dir"])
        .arg(dir.path())
        .arg("SELECT count(*) FROM metrics")
        .output()
        .unwrap();
    let count: u64 = String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(count, datapoints, "every datapoint committed once");
    let parquet = dir_bytes(&dir.path().join("lake/metrics"), ".parquet");
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize];
    println!("datapoints             {datapoints}");
    println!(
        "requests               {} ({:.1} MiB gzip on the wire)",
        bodies.len(),
        wire as f64 / 1048576.0
    );
    println!(
        "acknowledged in        {acked:.2?}  ({:.0} datapoints/s)",
        datapoints as f64 / acked.as_secs_f64()
    );
    println!(
        "committed to lake in   {committed:.2?}  ({:.0} datapoints/s)",
        datapoints as f64 / committed.as_secs_f64()
    );
    println!(
        "request latency        p50 {:.1?}  p99 {:.1?}",
        pct(0.5),
        pct(0.99)
    );
    println!(
        "parquet on disk        {parquet} bytes ({:.2} bytes/datapoint)",
        parquet as f64 / datapoints as f64
    );
}
