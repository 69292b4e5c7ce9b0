//! Test support: the real `fleetlake` binary on port 0, Firehose requests as AWS sends
//! them, and SQL through the HTTP API.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine;

/// Longest a test waits for the server to come up or for a flush to land.
const WAIT: Duration = Duration::from_secs(60);

/// A running `fleetlake serve`.
pub struct Server {
    child: Child,
    pub addr: String,
    /// The Postgres wire protocol listener.
    pub pg_addr: String,
    log: std::sync::Mutex<mpsc::Receiver<String>>,
    /// Lines logged before the listeners' addresses (a source may log while the
    /// listeners start), not yet looked at by [`Server::wait_for_log`].
    early: std::sync::Mutex<std::collections::VecDeque<String>>,
}

impl Server {
    /// Starts the server on `data_dir` with extra `FLEETLAKE_*` environment variables.
    pub fn start(data_dir: &Path, env: &[(&str, &str)]) -> Self {
        Self::start_with_args(data_dir, env, &[])
    }

    pub fn start_with_args(data_dir: &Path, env: &[(&str, &str)], args: &[&str]) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_fleetlake"));
        command
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--http-addr")
            .arg("127.0.0.1:0")
            .arg("--pg-addr")
            .arg("127.0.0.1:0")
            .args(args)
            .env("FLEETLAKE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("start fleetlake");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[fleetlake] {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + WAIT;
        let address = |line: &str| {
            let rest = line.split("addr=").nth(1)?;
            Some(rest.split_whitespace().next()?.to_string())
        };
        let mut pg_addr = String::new();
        let mut early = std::collections::VecDeque::new();
        let addr = loop {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("fleetlake exited or did not log its address");
            early.push_back(line.clone());
            if line.contains("postgres listening")
                && let Some(a) = address(&line)
            {
                pg_addr = a;
            }
            if line.contains("http listening")
                && let Some(a) = address(&line)
            {
                break a;
            }
        };
        Self {
            child,
            addr,
            pg_addr,
            log: std::sync::Mutex::new(rx),
            early: std::sync::Mutex::new(early),
        }
    }

    /// The Postgres endpoint's port.
    pub fn pg_port(&self) -> &str {
        self.pg_addr.rsplit(':').next().unwrap()
    }

    /// Runs a Python `script` with the venv's Python (psycopg, pyarrow installed) and
    /// `FLEETLAKE_PG_PORT` / `FLEETLAKE_HTTP` set; its stdout as JSON.
    pub fn python(&self, script: &str, env: &[(&str, &str)]) -> serde_json::Value {
        let http = self.url("");
        let mut all = vec![
            ("FLEETLAKE_PG_PORT", self.pg_port()),
            ("FLEETLAKE_HTTP", http.as_str()),
        ];
        all.extend_from_slice(env);
        run_python(script, &[], &all)
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// GET `path`: status and body parsed as JSON.
    pub fn get_json(&self, path: &str) -> (u16, serde_json::Value) {
        let response = client().get(self.url(path)).send().unwrap();
        let status = response.status().as_u16();
        (
            status,
            serde_json::from_str(&response.text().unwrap()).unwrap(),
        )
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// kill -9.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, and wait for the exit (the server flushes first).
    pub fn stop(mut self) {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
        let status = self.child.wait().unwrap();
        assert!(status.success(), "fleetlake exited with {status}");
    }

    /// Waits until a log line contains `needle` (bounded).
    pub fn wait_for_log(&self, needle: &str) {
        let mut early = self.early.lock().unwrap();
        while let Some(line) = early.pop_front() {
            if line.contains(needle) {
                return;
            }
        }
        drop(early);
        let deadline = Instant::now() + WAIT;
        loop {
            let line = self
                .log
                .lock()
                .unwrap()
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|_| panic!("no log line with {needle:?}"));
            if line.contains(needle) {
                return;
            }
        }
    }

    /// Runs SQL over HTTP, returning the JSON rows.
    pub fn sql(&self, sql: &str) -> Vec<serde_json::Value> {
        let response = client()
            .post(self.url("/api/v1/sql?format=json"))
            .body(sql.to_string())
            .send()
            .unwrap();
        let status = response.status();
        let body = response.text().unwrap();
        assert_eq!(status, 200, "{sql}: {body}");
        serde_json::from_str::<Vec<serde_json::Value>>(&body).unwrap()
    }

    /// Posts a Firehose request; returns status and parsed JSON body.
    /// The Prometheus text of `/metrics`.
    pub fn metrics_text(&self) -> String {
        client()
            .get(self.url("/metrics"))
            .send()
            .unwrap()
            .text()
            .unwrap()
    }

    pub fn post(&self, request: &FirehoseRequest) -> (u16, serde_json::Value) {
        post_firehose(&self.url("/firehose/metrics"), request)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

/// One Firehose HTTP delivery.
pub struct FirehoseRequest {
    pub request_id: String,
    /// Each record's decoded data (newline-separated metric-stream JSON).
    pub records: Vec<String>,
    pub gzip: bool,
    pub access_key: Option<String>,
}

impl FirehoseRequest {
    pub fn new(request_id: &str, records: Vec<String>) -> Self {
        Self {
            request_id: request_id.into(),
            records,
            gzip: false,
            access_key: None,
        }
    }

    pub fn body(&self) -> Vec<u8> {
        let records: Vec<_> = self
            .records
            .iter()
            .map(|r| serde_json::json!({"data": base64::engine::general_purpose::STANDARD.encode(r)}))
            .collect();
        let body = serde_json::json!({
            "requestId": self.request_id,
            "timestamp": 1_700_000_000_000i64,
            "records": records,
        })
        .to_string()
        .into_bytes();
        if self.gzip { gzip(&body) } else { body }
    }
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

pub fn post_raw(
    url: &str,
    request_id: &str,
    body: Vec<u8>,
    gzip: bool,
    access_key: Option<&str>,
) -> (u16, serde_json::Value) {
    let mut req = client()
        .post(url)
        .header("Content-Type", "application/json")
        .header("X-Amz-Firehose-Protocol-Version", "1.0")
        .header("X-Amz-Firehose-Request-Id", request_id)
        .header(
            "X-Amz-Firehose-Source-Arn",
            "arn:aws:firehose:us-east-1:123456789012:deliverystream/metrics",
        )
        .body(body);
    if gzip {
        req = req.header("Content-Encoding", "gzip");
    }
    if let Some(key) = access_key {
        req = req.header("X-Amz-Firehose-Access-Key", key);
    }
    let response = req.send().unwrap_or_else(|e| panic!("{url}: {e}"));
    let status = response.status().as_u16();
    assert_eq!(
        response.headers()["content-type"],
        "application/json",
        "Firehose responses are JSON"
    );
    let body: serde_json::Value = serde_json::from_str(&response.text().unwrap()).unwrap();
    (status, body)
}

pub fn post_firehose(url: &str, request: &FirehoseRequest) -> (u16, serde_json::Value) {
    post_raw(
        url,
        &request.request_id,
        request.body(),
        request.gzip,
        request.access_key.as_deref(),
    )
}

/// One metric-stream JSON line. `value` becomes sum; count is 1, min/max equal value.
pub fn datapoint(account: &str, function: &str, metric: &str, minute: i64, value: f64) -> String {
    format!(
        r#"{{"metric_stream_name":"fleet","account_id":"{account}","region":"us-east-1","namespace":"AWS/Lambda","metric_name":"{metric}","dimensions":{{"FunctionName":"{function}"}},"timestamp":{},"value":{{"count":1.0,"sum":{value:.1},"max":{value:.1},"min":{value:.1},"p99":{value:.1}}},"unit":"Count"}}"#,
        1_700_000_000_000i64 / 60_000 * 60_000 + minute * 60_000
    )
}

/// A deterministic fleet slice: `accounts` × 2 functions × 2 metrics × `minutes`, as
/// records of `per_record` lines; datapoint value = account index + minute.
pub fn fleet_records(
    accounts: usize,
    minutes: std::ops::Range<i64>,
    per_record: usize,
) -> Vec<String> {
    let mut lines = Vec::new();
    for minute in minutes {
        for a in 0..accounts {
            for f in ["api", "worker"] {
                for m in ["Errors", "Invocations"] {
                    lines.push(datapoint(
                        &account_id(a),
                        f,
                        m,
                        minute,
                        (a as i64 + minute) as f64,
                    ));
                }
            }
        }
    }
    lines.chunks(per_record).map(|c| c.join("\n")).collect()
}

pub fn account_id(index: usize) -> String {
    format!("{:012}", 100_000_000_000u64 + index as u64)
}

/// Expected sum of `fleet_records` values.
pub fn fleet_sum(accounts: usize, minutes: std::ops::Range<i64>) -> f64 {
    let mut sum = 0.0;
    for minute in minutes {
        for a in 0..accounts {
            sum += 4.0 * (a as i64 + minute) as f64;
        }
    }
    sum
}

/// Runs `fleetlake` with arguments, returning (success, stdout, stderr).
pub fn cli(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fleetlake"))
        .args(args)
        .env("FLEETLAKE_LOG", "warn")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Versions committed to the `metrics` table.
pub fn lake_versions(data_dir: &Path) -> usize {
    std::fs::read_dir(data_dir.join("lake/metrics/_delta_log"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
                .count()
        })
        .unwrap_or(0)
}

/// Waits (bounded) until the lake has more than `versions` commits.
pub fn wait_for_commit_after(data_dir: &Path, versions: usize) {
    let deadline = Instant::now() + WAIT;
    while lake_versions(data_dir) <= versions {
        assert!(Instant::now() < deadline, "no lake commit within {WAIT:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The Python interpreter of the test venv (with the `deltalake` package).
pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("DELTALAKE_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(
        venv.exists(),
        "{} is missing: run scripts/test.sh, which creates the venv with the deltalake package",
        venv.display()
    );
    venv
}

/// `fleetlake query --data-dir DIR --format FORMAT SQL` over the lake alone; its stdout.
pub fn lake_query(data_dir: &Path, format: &str, sql: &str) -> String {
    let dir = data_dir.to_str().unwrap();
    let (ok, out, err) = cli(&["query", "--data-dir", dir, "--format", format, sql]);
    assert!(ok, "{sql}: {err}");
    out
}

/// A producer-made fixture from `tests/fixtures/formats/`.
pub fn fixture(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/formats")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A Firehose request body whose records hold `records` (any bytes).
pub fn firehose_body(request_id: &str, records: &[Vec<u8>]) -> Vec<u8> {
    let records: Vec<_> = records
        .iter()
        .map(|r| serde_json::json!({"data": base64::engine::general_purpose::STANDARD.encode(r)}))
        .collect();
    serde_json::json!({
        "requestId": request_id,
        "timestamp": 1_700_000_000_000i64,
        "records": records,
    })
    .to_string()
    .into_bytes()
}

/// Posts `records` (any bytes) to the endpoint at `path`.
pub fn post_records(
    server: &Server,
    path: &str,
    request_id: &str,
    records: &[Vec<u8>],
) -> (u16, serde_json::Value) {
    post_raw(
        &server.url(path),
        request_id,
        firehose_body(request_id, records),
        false,
        None,
    )
}

/// Runs a Python script with the test venv's interpreter (which has `deltalake`);
/// its stdout parsed as JSON.
///
/// The script ends with `os._exit(0)` once its output is flushed: deltalake 1.6 with
/// pyarrow 26 aborts at interpreter shutdown ("terminate called without an active
/// exception") after the work is done, in about half of the runs here.
pub fn python_json(script: &str, args: &[&Path]) -> serde_json::Value {
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    run_python(script, &args, &[])
}

/// Runs `script` with the venv's Python, ending with `os._exit(0)` (see
/// [`python_json`]); its stdout parsed as JSON.
pub fn run_python(
    script: &str,
    args: &[&std::ffi::OsStr],
    env: &[(&str, &str)],
) -> serde_json::Value {
    let script =
        format!("{script}\nimport os as _os, sys as _sys\n_sys.stdout.flush()\n_os._exit(0)\n");
    let out = Command::new(python())
        .arg("-c")
        .arg(script)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A moto server (the AWS stand-in, from the test venv) on a free loopback port,
/// killed when dropped.
pub struct Moto {
    child: Child,
    pub endpoint: String,
}

impl Moto {
    pub fn start() -> Self {
        let port = free_port();
        let bin = python().with_file_name("moto_server");
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e} (scripts/test.sh installs moto)", bin.display()));
        let endpoint = format!("http://127.0.0.1:{port}");
        wait_for_http(&format!("{endpoint}/moto-api/"), "moto");
        Self { child, endpoint }
    }

    /// Sends `signal` (`STOP`, `CONT`, ...) to the moto process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Runs a Python script (boto3, against this moto as `ENDPOINT`) with `args`;
    /// its stdout parsed as JSON.
    pub fn python(&self, script: &str, args: &[&str]) -> serde_json::Value {
        boto3(&self.endpoint, script, args)
    }
}

/// Environment for a process that talks to a local AWS stand-in: fixed credentials, no
/// instance metadata, no profile files.
pub fn aws_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("AWS_CONFIG_FILE", "/dev/null"),
        ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null"),
    ]
}

/// Runs a Python script with boto3 against `endpoint` (as `ENDPOINT`, and `client(name)`
/// making a client for it) with `args`; its stdout parsed as JSON.
pub fn boto3(endpoint: &str, script: &str, args: &[&str]) -> serde_json::Value {
    let script = format!(
        "import boto3, os\nENDPOINT = os.environ['AWS_STAND_IN']\n\
         def client(name):\n    return boto3.client(name, endpoint_url=ENDPOINT, region_name='us-east-1')\n\
         {script}"
    );
    let args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    let mut env: Vec<(&str, &str)> = aws_env();
    env.push(("AWS_STAND_IN", endpoint));
    run_python(&script, &args, &env)
}

/// A free port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits (bounded) until `url` answers HTTP at all.
fn wait_for_http(url: &str, what: &str) {
    let deadline = Instant::now() + WAIT;
    while client().get(url).send().is_err() {
        assert!(Instant::now() < deadline, "{what} did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// kinesis-local (faithful resharding), from `tests/kinesis-local` (installed by
/// scripts/test.sh), bound to loopback by `loopback.js`; killed when dropped.
pub struct KinesisLocal {
    child: Child,
    pub endpoint: String,
}

impl KinesisLocal {
    pub fn start() -> Self {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kinesis-local");
        let package = dir.join("node_modules/kinesis-local");
        assert!(
            package.join("main.js").exists(),
            "{} is missing: run scripts/test.sh, which installs it",
            package.display()
        );
        let (plain, tls) = (free_port(), free_port());
        let child = Command::new("node")
            .arg("-r")
            .arg(dir.join("loopback.js"))
            .arg(package.join("main.js"))
            .env("KINESIS_MOCK_CERT_PATH", package.join("server.json"))
            .env("KINESIS_MOCK_PLAIN_PORT", plain.to_string())
            .env("KINESIS_MOCK_TLS_PORT", tls.to_string())
            .env("CREATE_STREAM_DURATION", "100ms")
            .env("LOG_LEVEL", "WARN")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start kinesis-local with node");
        let endpoint = format!("http://127.0.0.1:{plain}");
        wait_for_http(&endpoint, "kinesis-local");
        Self { child, endpoint }
    }
}

impl Drop for KinesisLocal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The CloudWatch shim (`cloudwatch_shim.py`) in front of a moto: the Rust SDK's
/// Smithy RPC v2 CBOR translated to the JSON protocol moto speaks; everything else
/// (STS) forwarded as is. Killed when dropped.
pub struct CloudWatchShim {
    child: Child,
    pub endpoint: String,
}

impl CloudWatchShim {
    pub fn start(moto: &Moto) -> Self {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/cloudwatch_shim.py");
        let mut child = Command::new(python())
            .arg(&script)
            .args(["0", &moto.endpoint])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .strip_prefix("ready ")
            .unwrap_or_else(|| panic!("the CloudWatch shim did not start: {line:?}"));
        let endpoint = format!("http://127.0.0.1:{port}");
        Self { child, endpoint }
    }

    /// Sets a test control (`throttle`, `page`, `fail_after`).
    pub fn control(&self, name: &str, value: i64) {
        let response = client()
            .post(format!("{}/_shim/{name}", self.endpoint))
            .body(value.to_string())
            .send()
            .unwrap();
        assert!(response.status().is_success());
    }

    /// CloudWatch calls answered so far, by operation (all access keys).
    pub fn calls(&self) -> std::collections::BTreeMap<String, u64> {
        let stats: serde_json::Value = client()
            .get(format!("{}/_shim/stats", self.endpoint))
            .send()
            .unwrap()
            .json()
            .unwrap();
        let mut out = std::collections::BTreeMap::new();
        for per_key in stats.as_object().unwrap().values() {
            for (op, n) in per_key.as_object().unwrap() {
                *out.entry(op.clone()).or_default() += n.as_u64().unwrap();
            }
        }
        out
    }
}

impl Drop for CloudWatchShim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `probe` until it returns true (bounded by the tests' wait).
pub fn wait_until(what: &str, mut probe: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !probe() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The sum of all samples of metric `name` (any labels) in a Prometheus exposition.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let base = series.split('{').next()?;
            if base == name {
                value.parse::<f64>().ok()
            } else {
                None
            }
        })
        .sum()
}

/// Waits until the alert engine has finished `rounds` more evaluation rounds and its
/// outbox is empty: whatever those rounds decided to send has been sent (or dropped).
/// What a test asserts after this about "nothing more was sent" cannot pass just
/// because no evaluation ran.
pub fn settle_alerting(server: &Server, rounds: u32) {
    const ROUNDS: &str = "fleetlake_rule_group_evaluations_total";
    let start = metric_sum(&server.metrics_text(), ROUNDS);
    wait_until("alert evaluation rounds and an empty outbox", || {
        let text = server.metrics_text();
        metric_sum(&text, ROUNDS) >= start + f64::from(rounds)
            && metric_sum(&text, "fleetlake_outbox_messages") == 0.0
    });
}
