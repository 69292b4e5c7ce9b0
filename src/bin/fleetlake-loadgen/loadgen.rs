//! `fleetlake-loadgen`'s work: a synthetic fleet's metric streams (and optionally its Lambda
//! logs), sent as Firehose HTTP requests, written to files for `replay`, or put on a
//! Kinesis stream, at a chosen rate, with a final report.
//!
//! The data is deterministic for a seed ([`fleet`]): the same flags always produce the
//! same datapoints in the same requests (request ids included), so a run can be
//! repeated against a service and checked with SQL. Work is cut into units of
//! `--records-per-request` × `--datapoints-per-record` datapoints, made by
//! `--generators` threads (or all made before the clock starts with `--pregenerate`),
//! and sent by `--concurrency` senders. With `--rate`, unit `k` is not sent before
//! `k × unit / rate` seconds after the start.
//!
//! Firehose requests are retried as Firehose retries them (429, 5xx and network
//! errors, with backoff, for up to `--retry-for`); any other answer rejects the
//! request's datapoints. `--probe-visibility` sends one extra datapoint each second
//! and asks the service's SQL endpoint until it is returned: the time from its 200 to
//! that answer is the acknowledged-to-visible latency.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use base64::Engine as _;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::fleet::{self, Fleet};

/// Record format of the metric stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LoadFormat {
    /// Metric Streams JSON: newline-separated datapoints.
    Json,
    /// Metric Streams OpenTelemetry 1.0: length-delimited protobuf.
    Otel1,
}

/// Where the data goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Target {
    /// Firehose HTTP endpoint delivery requests to `--url`.
    Firehose,
    /// gzip'd files in `--out`, for `fleetlake replay`.
    Files,
    /// PutRecords on the Kinesis stream `--stream`.
    Kinesis,
}

/// How the final report is printed (on standard output).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum ReportFormat {
    Text,
    Json,
}

/// `fleetlake-loadgen` flags.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Seed of the fleet: account ids, traffic, values, injected-error accounts.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Accounts in the fleet.
    #[arg(long, default_value_t = 6_000)]
    accounts: usize,
    /// Regions the accounts are spread over (1 to 8).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=fleet::MAX_REGIONS as u64))]
    regions: u64,
    /// Lambda functions per account; each reports 5 metrics a minute.
    #[arg(long, default_value_t = 4)]
    functions: usize,
    /// Send this many minutes of the whole fleet.
    #[arg(long, conflicts_with = "datapoints")]
    minutes: Option<u64>,
    /// Send this many datapoints.
    #[arg(long)]
    datapoints: Option<u64>,
    /// Stop after this long (e.g. 60s); with --minutes or --datapoints, whichever
    /// comes first.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// First minute of data: RFC 3339 or epoch milliseconds. Default: so that the
    /// data ends at the current minute (24 hours back when the amount is unknown).
    #[arg(long)]
    start: Option<String>,
    /// Datapoints per second; unlimited when unset.
    #[arg(long)]
    rate: Option<f64>,
    /// Metric stream record format.
    #[arg(long, value_enum, default_value_t = LoadFormat::Json)]
    format: LoadFormat,
    /// CloudWatch Logs events per function and minute (0: no logs).
    #[arg(long, default_value_t = 0)]
    log_events: usize,
    /// Accounts (picked by the seed) whose Errors are raised to --error-rate of
    /// their invocations, for alert rules to find; listed in the report.
    #[arg(long, default_value_t = 0)]
    inject_errors: usize,
    /// Share of invocations that fail in the --inject-errors accounts.
    #[arg(long, default_value_t = 0.25)]
    error_rate: f64,
    /// Where the data goes.
    #[arg(long, value_enum, default_value_t = Target::Firehose)]
    to: Target,
    /// fleetlake's base URL (the endpoint path follows the format:
    /// /firehose/metrics, /firehose/otel, /firehose/logs), or a full endpoint URL.
    #[arg(long, default_value = "http://127.0.0.1:8088")]
    url: String,
    /// Firehose access key sent with each request.
    #[arg(long, env = "FLEETLAKE_FIREHOSE_ACCESS_KEY", hide_env_values = true)]
    access_key: Option<String>,
    /// Requests (or PutRecords calls) in flight at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Threads that make request bodies [default: the machine's cores].
    #[arg(long)]
    generators: Option<usize>,
    /// Make every request before starting the clock, so the sending rate is not
    /// bounded by generation (needs --minutes or --datapoints; holds them in memory).
    #[arg(long)]
    pregenerate: bool,
    /// Records per Firehose request or PutRecords call (at most 500).
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..=500))]
    records_per_request: u64,
    /// Datapoints per record (Metric Streams packs many per record).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=1000))]
    datapoints_per_record: u64,
    /// Keep retrying a request answered 429/5xx (or unanswered) this long.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    retry_for: Duration,
    /// Measure acknowledged-to-visible latency through the SQL endpoint (Firehose).
    #[arg(long)]
    probe_visibility: bool,
    /// Token for the SQL endpoint, when the service has users.
    #[arg(long, env = "FLEETLAKE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Output directory (--to files).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Datapoints per output file (--to files).
    #[arg(long, default_value_t = 1_000_000)]
    datapoints_per_file: u64,
    /// Kinesis stream for metrics (--to kinesis).
    #[arg(long)]
    stream: Option<String>,
    /// Kinesis stream for log payloads (--to kinesis with --log-events).
    #[arg(long)]
    logs_stream: Option<String>,
    /// AWS endpoint URL override (--to kinesis; e.g. a local stand-in).
    #[arg(long)]
    endpoint_url: Option<String>,
    /// AWS region (--to kinesis); the standard chain's when unset.
    #[arg(long)]
    region: Option<String>,
    /// Write the fleet's accounts as an account registry (JSON lines: id, name,
    /// environment, owner team, `active`) to this file, for `[accounts] file`; with
    /// nothing to send (no --minutes, --datapoints or --duration), only that.
    #[arg(long)]
    registry: Option<PathBuf>,
    /// Final report format, printed on standard output.
    #[arg(long, value_enum, default_value_t = ReportFormat::Text)]
    report: ReportFormat,
}

/// Latency figures in milliseconds.
#[derive(Debug, Default, Serialize)]
struct Latency {
    samples: usize,
    p50: f64,
    p99: f64,
    max: f64,
}

impl Latency {
    fn of(mut samples: Vec<Duration>) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort();
        let at = |p: f64| {
            let i = ((samples.len() as f64 * p).ceil() as usize).clamp(1, samples.len()) - 1;
            samples[i].as_secs_f64() * 1e3
        };
        Self {
            samples: samples.len(),
            p50: at(0.5),
            p99: at(0.99),
            max: at(1.0),
        }
    }
}

/// What a run did.
#[derive(Debug, Default, Serialize)]
struct Report {
    target: String,
    format: String,
    datapoints_sent: u64,
    datapoints_acknowledged: u64,
    datapoints_rejected: u64,
    log_events_sent: u64,
    log_events_acknowledged: u64,
    requests: u64,
    retries: u64,
    elapsed_s: f64,
    datapoints_per_s: f64,
    latency_ms: Latency,
    #[serde(skip_serializing_if = "Option::is_none")]
    visibility_ms: Option<Latency>,
    first_rejection: Option<String>,
    first_time: String,
    last_time: String,
    error_accounts: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    files: Vec<String>,
}

/// Counters shared by the senders.
#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    acked: AtomicU64,
    rejected: AtomicU64,
    logs_sent: AtomicU64,
    logs_acked: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
    latencies: Mutex<Vec<Duration>>,
    first_rejection: Mutex<Option<String>>,
}

impl Tally {
    fn reject(&self, datapoints: u64, why: String) {
        self.rejected.fetch_add(datapoints, Ordering::Relaxed);
        self.first_rejection
            .lock()
            .expect("tally lock")
            .get_or_insert(why);
    }
}

/// One unit of work: datapoints `range`, as the target wants them.
struct Unit {
    index: u64,
    /// Firehose request id of the metrics request (`-logs` appended for the logs one).
    id: String,
    datapoints: u64,
    log_events: u64,
    /// Firehose: request bodies (metrics, then logs). Files: raw bytes (metrics, then
    /// logs). Kinesis: records (metrics), then log records.
    metrics: Vec<Vec<u8>>,
    logs: Vec<Vec<u8>>,
}

/// The amount of work and how it is cut.
struct Plan {
    fleet: Fleet,
    format: LoadFormat,
    target: Target,
    seed: u64,
    total: Option<u64>,
    unit: u64,
    per_record: u64,
    log_events: usize,
}

impl Plan {
    fn units(&self) -> Option<u64> {
        self.total.map(|t| t.div_ceil(self.unit))
    }

    fn range(&self, k: u64) -> std::ops::Range<u64> {
        let start = k * self.unit;
        let end = (start + self.unit).min(self.total.unwrap_or(u64::MAX));
        start..end
    }

    fn record(&self, range: std::ops::Range<u64>) -> Vec<u8> {
        match self.format {
            LoadFormat::Json => self.fleet.json_record(range),
            LoadFormat::Otel1 => self.fleet.otel_record(range),
        }
    }

    fn records(&self, range: std::ops::Range<u64>) -> Vec<Vec<u8>> {
        (range.start..range.end)
            .step_by(self.per_record as usize)
            .map(|s| self.record(s..(s + self.per_record).min(range.end)))
            .collect()
    }

    fn make(&self, k: u64) -> Unit {
        let range = self.range(k);
        let datapoints = range.end - range.start;
        let id = format!("loadgen-{}-{k}", self.seed);
        let logs = if self.log_events > 0 {
            self.fleet.log_payloads(range.clone(), self.log_events)
        } else {
            Vec::new()
        };
        let log_events = (logs.len() * self.log_events) as u64;
        let (metrics, logs) = match self.target {
            Target::Firehose => {
                let metrics = firehose_body(&id, &self.records(range));
                let logs = if logs.is_empty() {
                    Vec::new()
                } else {
                    let records: Vec<Vec<u8>> = logs.iter().map(|p| fleet::gzip(p)).collect();
                    vec![firehose_body(&format!("{id}-logs"), &records)]
                };
                (vec![metrics], logs)
            }
            Target::Files => {
                let mut raw = self.record(range);
                if self.format == LoadFormat::Json {
                    raw.push(b'\n');
                }
                // Log payloads are stored as the JSON objects themselves, one per
                // line, as `replay --format cwlogs` reads them.
                let logs = logs
                    .into_iter()
                    .map(|mut payload| {
                        payload.push(b'\n');
                        payload
                    })
                    .collect();
                (vec![raw], logs)
            }
            Target::Kinesis => (
                self.records(range),
                logs.iter().map(|p| fleet::gzip(p)).collect(),
            ),
        };
        Unit {
            index: k,
            id,
            datapoints,
            log_events,
            metrics,
            logs,
        }
    }
}

/// A Firehose HTTP endpoint delivery request body, gzip'd.
fn firehose_body(request_id: &str, records: &[Vec<u8>]) -> Vec<u8> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut json = String::with_capacity(records.iter().map(|r| r.len() * 4 / 3 + 16).sum());
    json.push_str(&format!(
        r#"{{"requestId":"{request_id}","timestamp":{},"records":["#,
        now_ms()
    ));
    for (i, record) in records.iter().enumerate() {
        if i > 0 {
            json.push(',');
        }
        json.push_str(r#"{"data":""#);
        b64.encode_string(record, &mut json);
        json.push_str(r#""}"#);
    }
    json.push_str("]}");
    fleet::gzip(json.as_bytes())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn parse_start(text: &str) -> anyhow::Result<i64> {
    if let Ok(ms) = text.parse::<i64>() {
        return Ok(ms);
    }
    let time = humantime::parse_rfc3339_weak(text)
        .with_context(|| format!("--start {text:?}: expected RFC 3339 or epoch milliseconds"))?;
    Ok(time.duration_since(UNIX_EPOCH)?.as_millis() as i64)
}

fn rfc3339(ms: i64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64))
        .to_string()
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    if args.accounts == 0 || args.functions == 0 {
        bail!("--accounts and --functions must be at least 1");
    }
    let nothing_to_send =
        args.minutes.is_none() && args.datapoints.is_none() && args.duration.is_none();
    if let Some(path) = &args.registry {
        let fleet = Fleet::new(
            args.seed,
            args.accounts,
            args.regions as usize,
            1,
            0,
            0,
            0.0,
        );
        std::fs::write(path, fleet.registry())
            .with_context(|| format!("writing the registry {}", path.display()))?;
        if nothing_to_send {
            return Ok(());
        }
    }
    if nothing_to_send {
        bail!("say how much to send: --minutes, --datapoints or --duration (or only --registry)");
    }
    if args.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        bail!("--rate must be a positive number of datapoints per second");
    }
    if !(0.0..=1.0).contains(&args.error_rate) {
        bail!("--error-rate must be between 0 and 1");
    }
    let per_minute = (args.accounts * args.functions * fleet::METRICS.len()) as u64;
    let total = args
        .datapoints
        .or(args.minutes.map(|m| m * per_minute))
        .or_else(|| {
            args.rate
                .zip(args.duration)
                .map(|(r, d)| (r * d.as_secs_f64()).ceil() as u64)
        });
    let bounded_by_count = args.datapoints.is_some() || args.minutes.is_some();
    if args.pregenerate && !bounded_by_count {
        bail!("--pregenerate needs --minutes or --datapoints");
    }
    let start_ms = match &args.start {
        Some(text) => parse_start(text)?,
        None => {
            let minutes = total.map_or(1440, |t| t.div_ceil(per_minute)) as i64;
            now_ms() - minutes * 60_000
        }
    };
    let fleet = Fleet::new(
        args.seed,
        args.accounts,
        args.regions as usize,
        args.functions,
        start_ms,
        args.inject_errors,
        args.error_rate,
    );
    match args.to {
        Target::Files if args.out.is_none() => bail!("--to files needs --out DIR"),
        Target::Kinesis if args.stream.is_none() => bail!("--to kinesis needs --stream NAME"),
        Target::Kinesis if args.log_events > 0 && args.logs_stream.is_none() => {
            bail!("--log-events with --to kinesis needs --logs-stream NAME")
        }
        _ if args.probe_visibility && args.to != Target::Firehose => {
            bail!("--probe-visibility needs --to firehose")
        }
        _ => {}
    }
    let plan = Arc::new(Plan {
        fleet,
        format: args.format,
        target: args.to,
        seed: args.seed,
        // Without a count, the sequence goes on until --duration ends it.
        total: bounded_by_count.then_some(total).flatten(),
        unit: args.records_per_request * args.datapoints_per_record,
        per_record: args.datapoints_per_record,
        log_events: args.log_events,
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let report = runtime.block_on(drive(&args, plan))?;
    match args.report {
        ReportFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        ReportFormat::Text => print_report(&report),
    }
    if report.datapoints_rejected > 0 {
        bail!(
            "{} datapoints rejected; first: {}",
            report.datapoints_rejected,
            report.first_rejection.as_deref().unwrap_or("?")
        );
    }
    Ok(())
}

fn print_report(r: &Report) {
    println!("target                {} ({})", r.target, r.format);
    println!("data                  {} .. {}", r.first_time, r.last_time);
    println!("datapoints sent       {}", r.datapoints_sent);
    println!("  acknowledged        {}", r.datapoints_acknowledged);
    println!("  rejected            {}", r.datapoints_rejected);
    if r.log_events_sent > 0 {
        println!(
            "log events sent       {} ({} acknowledged)",
            r.log_events_sent, r.log_events_acknowledged
        );
    }
    println!(
        "requests              {} ({} retries)",
        r.requests, r.retries
    );
    println!(
        "elapsed               {:.2} s ({:.0} datapoints/s acknowledged)",
        r.elapsed_s, r.datapoints_per_s
    );
    println!(
        "request latency       p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
        r.latency_ms.p50, r.latency_ms.p99, r.latency_ms.max
    );
    if let Some(v) = &r.visibility_ms {
        println!(
            "ack to visible in SQL p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms ({} probes)",
            v.p50, v.p99, v.max, v.samples
        );
    }
    if let Some(why) = &r.first_rejection {
        println!("first rejection       {why}");
    }
    if !r.error_accounts.is_empty() {
        println!("error accounts        {}", r.error_accounts.join(","));
    }
    for file in &r.files {
        println!("wrote                 {file}");
    }
}

/// Makes the units, sends them, and reports.
async fn drive(args: &Args, plan: Arc<Plan>) -> anyhow::Result<Report> {
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let progress = match plan.total {
        Some(total) => ProgressBar::new(total),
        None => ProgressBar::new(args.duration.map_or(0, |d| d.as_millis() as u64)),
    };
    progress.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {msg}")
            .expect("progress template"),
    );

    // Units come out of the generators in any order.
    let (tx, rx) = tokio::sync::mpsc::channel::<Unit>(args.concurrency.max(1) * 2);
    let next = Arc::new(AtomicU64::new(0));
    let generators = args
        .generators
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let pregenerated = if args.pregenerate {
        let units = plan.units().unwrap_or(0);
        eprintln!("making {units} requests before starting the clock...");
        let made = Mutex::new(Vec::with_capacity(units as usize));
        std::thread::scope(|s| {
            for _ in 0..generators.max(1) {
                s.spawn(|| {
                    loop {
                        let k = next.fetch_add(1, Ordering::Relaxed);
                        if k >= units {
                            break;
                        }
                        let unit = plan.make(k);
                        made.lock().expect("units lock").push(unit);
                    }
                });
            }
        });
        let mut made = made.into_inner().expect("units lock");
        made.sort_by_key(|u| u.index);
        Some(made)
    } else {
        None
    };

    let started = Instant::now();
    let deadline = args.duration.map(|d| started + d);
    let producer = {
        let (plan, stop, tx) = (Arc::clone(&plan), Arc::clone(&stop), tx.clone());
        let next = Arc::clone(&next);
        match pregenerated {
            Some(units) => std::thread::spawn(move || {
                for unit in units {
                    if stop.load(Ordering::Relaxed) || tx.blocking_send(unit).is_err() {
                        break;
                    }
                }
            }),
            None => std::thread::spawn(move || {
                std::thread::scope(|s| {
                    for _ in 0..generators.max(1) {
                        s.spawn(|| {
                            loop {
                                let k = next.fetch_add(1, Ordering::Relaxed);
                                if stop.load(Ordering::Relaxed)
                                    || plan.units().is_some_and(|n| k >= n)
                                {
                                    break;
                                }
                                if tx.blocking_send(plan.make(k)).is_err() {
                                    break;
                                }
                            }
                        });
                    }
                });
            }),
        }
    };
    drop(tx);

    let rate = args.rate;
    let unit_size = plan.unit;
    let pacing = move |k: u64| {
        rate.map(|r| started + Duration::from_secs_f64(k as f64 * unit_size as f64 / r))
    };
    let ticker = {
        let (tally, progress, stop) = (Arc::clone(&tally), progress.clone(), Arc::clone(&stop));
        let bounded = plan.total.is_some();
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let acked = tally.acked.load(Ordering::Relaxed);
                let secs = started.elapsed().as_secs_f64();
                if bounded {
                    progress.set_position(tally.sent.load(Ordering::Relaxed));
                } else {
                    progress.set_position(started.elapsed().as_millis() as u64);
                }
                progress.set_message(format!(
                    "{acked} datapoints acknowledged ({:.0}/s)",
                    acked as f64 / secs.max(1e-3)
                ));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };

    let probe = if args.probe_visibility {
        Some(tokio::spawn(probe_visibility(
            Arc::new(ProbeConfig {
                url: args.url.clone(),
                format: args.format,
                access_key: args.access_key.clone(),
                token: args.token.clone(),
                seed: args.seed,
            }),
            Arc::clone(&stop),
        )))
    } else {
        None
    };

    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let mut files = Vec::new();
    match plan.target {
        Target::Firehose => {
            let client = reqwest::Client::builder()
                .pool_max_idle_per_host(args.concurrency)
                .build()?;
            let endpoint = Arc::new(Endpoints::new(&args.url, plan.format));
            let (access_key, retry_for) = (args.access_key.clone(), args.retry_for);
            let tally = Arc::clone(&tally);
            run_senders(args.concurrency, &rx, deadline, pacing, move |unit| {
                let (client, endpoint, tally) =
                    (client.clone(), Arc::clone(&endpoint), Arc::clone(&tally));
                let access_key = access_key.clone();
                async move {
                    let key = access_key.as_deref();
                    send_firehose(&client, &endpoint, key, retry_for, &tally, unit).await;
                }
            })
            .await?;
        }
        Target::Files => {
            files = write_files(args, &plan, &rx, &tally, deadline).await?;
        }
        Target::Kinesis => {
            let client = kinesis_client(args).await;
            let stream = args.stream.clone().unwrap_or_default();
            let logs_stream = args.logs_stream.clone().unwrap_or_default();
            let (retry_for, plan, tally) = (args.retry_for, Arc::clone(&plan), Arc::clone(&tally));
            run_senders(args.concurrency, &rx, deadline, pacing, move |unit| {
                let (client, plan, tally) = (client.clone(), Arc::clone(&plan), Arc::clone(&tally));
                let (stream, logs_stream) = (stream.clone(), logs_stream.clone());
                async move {
                    put_kinesis(
                        &client,
                        &stream,
                        &logs_stream,
                        &plan,
                        retry_for,
                        &tally,
                        unit,
                    )
                    .await;
                }
            })
            .await?;
        }
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    rx.lock().await.close();
    let _ = tokio::task::spawn_blocking(move || producer.join()).await;
    let _ = ticker.await;
    progress.finish_and_clear();
    let visibility = match probe {
        Some(task) => Some(Latency::of(task.await?)),
        None => None,
    };

    let sent = tally.sent.load(Ordering::Relaxed);
    let acked = tally.acked.load(Ordering::Relaxed);
    let last_ms =
        plan.fleet.start_ms() + (sent.saturating_sub(1) / plan.fleet.per_minute()) as i64 * 60_000;
    let latencies = std::mem::take(&mut *tally.latencies.lock().expect("tally lock"));
    Ok(Report {
        target: format!("{:?}", plan.target).to_lowercase(),
        format: format!("{:?}", plan.format).to_lowercase(),
        datapoints_sent: sent,
        datapoints_acknowledged: acked,
        datapoints_rejected: tally.rejected.load(Ordering::Relaxed),
        log_events_sent: tally.logs_sent.load(Ordering::Relaxed),
        log_events_acknowledged: tally.logs_acked.load(Ordering::Relaxed),
        requests: tally.requests.load(Ordering::Relaxed),
        retries: tally.retries.load(Ordering::Relaxed),
        elapsed_s: elapsed.as_secs_f64(),
        datapoints_per_s: acked as f64 / elapsed.as_secs_f64().max(1e-9),
        latency_ms: Latency::of(latencies),
        visibility_ms: visibility,
        first_rejection: tally.first_rejection.lock().expect("tally lock").clone(),
        first_time: rfc3339(plan.fleet.start_ms()),
        last_time: rfc3339(last_ms),
        error_accounts: plan
            .fleet
            .error_account_ids()
            .iter()
            .map(|s| s.to_string())
            .collect(),
        files,
    })
}

type Units = Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<Unit>>>;

/// Runs `concurrency` senders, each taking the next unit until there are none or
/// `deadline` has passed, and sending it (with `send`) no earlier than `pacing` says.
async fn run_senders<F, Fut>(
    concurrency: usize,
    rx: &Units,
    deadline: Option<Instant>,
    pacing: impl Fn(u64) -> Option<Instant> + Copy + Send + 'static,
    send: F,
) -> anyhow::Result<()>
where
    F: Fn(Unit) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let mut senders = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (rx, send) = (Arc::clone(rx), send.clone());
        senders.push(tokio::spawn(async move {
            loop {
                let Some(unit) = rx.lock().await.recv().await else {
                    break;
                };
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                if let Some(at) = pacing(unit.index) {
                    tokio::time::sleep_until(at.into()).await;
                }
                send(unit).await;
            }
        }));
    }
    for sender in senders {
        sender.await?;
    }
    Ok(())
}

/// The endpoint URLs of one run.
struct Endpoints {
    metrics: String,
    logs: String,
}

impl Endpoints {
    fn new(url: &str, format: LoadFormat) -> Self {
        let url = url.trim_end_matches('/');
        let has_path = url
            .split_once("://")
            .map_or(url, |(_, rest)| rest)
            .contains('/');
        let base = if has_path {
            url.rsplit_once("/firehose/").map_or(url, |(b, _)| b)
        } else {
            url
        };
        let metrics = if has_path {
            url.to_string()
        } else {
            match format {
                LoadFormat::Json => format!("{url}/firehose/metrics"),
                LoadFormat::Otel1 => format!("{url}/firehose/otel"),
            }
        };
        Self {
            metrics,
            logs: format!("{base}/firehose/logs"),
        }
    }
}

/// Whether Firehose would retry a request answered with this status.
fn retryable(status: reqwest::StatusCode) -> bool {
    status == reqwest::StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
}

/// POSTs one Firehose body until it is answered for good; returns whether it was
/// acknowledged, and why not.
async fn post_firehose(
    client: &reqwest::Client,
    url: &str,
    request_id: &str,
    access_key: Option<&str>,
    body: &[u8],
    retry_for: Duration,
    tally: &Tally,
) -> Result<(), String> {
    let started = Instant::now();
    let mut backoff = Duration::from_millis(100);
    loop {
        tally.requests.fetch_add(1, Ordering::Relaxed);
        let mut request = client
            .post(url)
            .header("Content-Type", "application/json")
            .header("Content-Encoding", "gzip")
            .header("X-Amz-Firehose-Protocol-Version", "1.0")
            .header("X-Amz-Firehose-Request-Id", request_id)
            .body(body.to_vec());
        if let Some(key) = access_key {
            request = request.header("X-Amz-Firehose-Access-Key", key);
        }
        let failure = match request.send().await {
            Ok(response) if response.status().is_success() => return Ok(()),
            Ok(response) if retryable(response.status()) => format!("HTTP {}", response.status()),
            Ok(response) => {
                let status = response.status();
                let text = response.text().await.unwrap_or_default();
                return Err(format!("{url}: HTTP {status}: {}", text.trim()));
            }
            Err(error) => format!("{error}"),
        };
        if started.elapsed() + backoff > retry_for {
            return Err(format!("{url}: gave up after {retry_for:?}: {failure}"));
        }
        tally.retries.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn send_firehose(
    client: &reqwest::Client,
    endpoints: &Endpoints,
    access_key: Option<&str>,
    retry_for: Duration,
    tally: &Tally,
    unit: Unit,
) {
    let started = Instant::now();
    tally.sent.fetch_add(unit.datapoints, Ordering::Relaxed);
    for body in &unit.metrics {
        match post_firehose(
            client,
            &endpoints.metrics,
            &unit.id,
            access_key,
            body,
            retry_for,
            tally,
        )
        .await
        {
            Ok(()) => {
                tally.acked.fetch_add(unit.datapoints, Ordering::Relaxed);
            }
            Err(why) => tally.reject(unit.datapoints, why),
        }
    }
    tally
        .latencies
        .lock()
        .expect("tally lock")
        .push(started.elapsed());
    for body in &unit.logs {
        tally
            .logs_sent
            .fetch_add(unit.log_events, Ordering::Relaxed);
        let id = format!("{}-logs", unit.id);
        match post_firehose(
            client,
            &endpoints.logs,
            &id,
            access_key,
            body,
            retry_for,
            tally,
        )
        .await
        {
            Ok(()) => {
                tally
                    .logs_acked
                    .fetch_add(unit.log_events, Ordering::Relaxed);
            }
            Err(why) => tally.reject(0, why),
        }
    }
}

/// Writes units to gzip'd files in order of their index, a new file every
/// `--datapoints-per-file` datapoints.
async fn write_files(
    args: &Args,
    plan: &Plan,
    rx: &tokio::sync::Mutex<tokio::sync::mpsc::Receiver<Unit>>,
    tally: &Tally,
    deadline: Option<Instant>,
) -> anyhow::Result<Vec<String>> {
    let dir = args.out.clone().unwrap_or_default();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let ext = match plan.format {
        LoadFormat::Json => "json.gz",
        LoadFormat::Otel1 => "otel.gz",
    };
    let gz = |path: &PathBuf| -> anyhow::Result<flate2::write::GzEncoder<std::io::BufWriter<std::fs::File>>> {
        let file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        Ok(flate2::write::GzEncoder::new(
            std::io::BufWriter::new(file),
            flate2::Compression::fast(),
        ))
    };
    let mut files = Vec::new();
    type Gz = flate2::write::GzEncoder<std::io::BufWriter<std::fs::File>>;
    let mut current: Option<(Gz, Option<Gz>, u64)> = None;
    let mut pending = BTreeMap::new();
    let mut next = 0;
    let mut rx = rx.lock().await;
    while let Some(unit) = rx.recv().await {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        pending.insert(unit.index, unit);
        while let Some(unit) = pending.remove(&next) {
            next += 1;
            if current
                .as_ref()
                .is_none_or(|c| c.2 >= args.datapoints_per_file)
            {
                if let Some((metrics, logs, _)) = current.take() {
                    metrics.finish()?.flush()?;
                    if let Some(logs) = logs {
                        logs.finish()?.flush()?;
                    }
                }
                let n = files
                    .iter()
                    .filter(|f: &&String| !f.contains("logs-"))
                    .count();
                let path = dir.join(format!("part-{n:05}.{ext}"));
                let metrics = gz(&path)?;
                files.push(path.display().to_string());
                let logs = if plan.log_events > 0 {
                    let path = dir.join(format!("logs-{n:05}.json.gz"));
                    files.push(path.display().to_string());
                    Some(gz(&path)?)
                } else {
                    None
                };
                current = Some((metrics, logs, 0));
            }
            let (metrics, logs, count) = current.as_mut().expect("opened above");
            for bytes in &unit.metrics {
                metrics.write_all(bytes)?;
            }
            if let Some(logs) = logs {
                for bytes in &unit.logs {
                    logs.write_all(bytes)?;
                }
            }
            *count += unit.datapoints;
            tally.sent.fetch_add(unit.datapoints, Ordering::Relaxed);
            tally.acked.fetch_add(unit.datapoints, Ordering::Relaxed);
            tally
                .logs_sent
                .fetch_add(unit.log_events, Ordering::Relaxed);
            tally
                .logs_acked
                .fetch_add(unit.log_events, Ordering::Relaxed);
        }
    }
    if let Some((metrics, logs, _)) = current.take() {
        metrics.finish()?.flush()?;
        if let Some(logs) = logs {
            logs.finish()?.flush()?;
        }
    }
    Ok(files)
}

async fn kinesis_client(args: &Args) -> aws_sdk_kinesis::Client {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if let Some(region) = &args.region {
        loader = loader.region(aws_config::Region::new(region.clone()));
    }
    if let Some(url) = &args.endpoint_url {
        loader = loader.endpoint_url(url);
    }
    aws_sdk_kinesis::Client::new(&loader.load().await)
}

/// PutRecords of one unit's records (and log records), retrying failed entries.
async fn put_kinesis(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
    logs_stream: &str,
    plan: &Plan,
    retry_for: Duration,
    tally: &Tally,
    unit: Unit,
) {
    let started = Instant::now();
    tally.sent.fetch_add(unit.datapoints, Ordering::Relaxed);
    let range = plan.range(unit.index);
    // The partition key of each record: the account of its first datapoint.
    let keys: Vec<String> = (range.start..range.end)
        .step_by(plan.per_record as usize)
        .map(|g| {
            plan.fleet
                .account_id(plan.fleet.datapoint(g).account)
                .to_string()
        })
        .collect();
    let sizes: Vec<u64> = (range.start..range.end)
        .step_by(plan.per_record as usize)
        .map(|s| (s + plan.per_record).min(range.end) - s)
        .collect();
    let acked = put_records(client, stream, &unit.metrics, &keys, retry_for, tally).await;
    let acked_datapoints: u64 = sizes
        .iter()
        .zip(&acked)
        .filter(|(_, ok)| **ok)
        .map(|(n, _)| n)
        .sum();
    tally.acked.fetch_add(acked_datapoints, Ordering::Relaxed);
    if acked_datapoints < unit.datapoints {
        tally.reject(
            unit.datapoints - acked_datapoints,
            format!("{stream}: records still failing after {retry_for:?}"),
        );
    }
    tally
        .latencies
        .lock()
        .expect("tally lock")
        .push(started.elapsed());
    if !unit.logs.is_empty() {
        let per = plan.log_events as u64;
        tally
            .logs_sent
            .fetch_add(unit.log_events, Ordering::Relaxed);
        let keys: Vec<String> = (0..unit.logs.len())
            .map(|i| format!("{}-{i}", unit.index))
            .collect();
        let acked = put_records(client, logs_stream, &unit.logs, &keys, retry_for, tally).await;
        let n = acked.iter().filter(|ok| **ok).count() as u64;
        tally.logs_acked.fetch_add(n * per, Ordering::Relaxed);
    }
}

/// Puts records, resending the entries Kinesis failed (throughput exceeded) with
/// backoff until they succeed or `retry_for` passes; returns which succeeded.
async fn put_records(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
    records: &[Vec<u8>],
    keys: &[String],
    retry_for: Duration,
    tally: &Tally,
) -> Vec<bool> {
    use aws_sdk_kinesis::primitives::Blob;
    use aws_sdk_kinesis::types::PutRecordsRequestEntry;
    let started = Instant::now();
    let mut done = vec![false; records.len()];
    let mut backoff = Duration::from_millis(100);
    loop {
        let todo: Vec<usize> = (0..records.len()).filter(|&i| !done[i]).collect();
        if todo.is_empty() {
            return done;
        }
        // At most 500 entries and 5 MiB per call.
        let mut batch = Vec::new();
        let mut bytes = 0;
        for &i in &todo {
            let size = records[i].len() + keys[i].len();
            if batch.len() == 500 || (bytes + size > 5 * 1024 * 1024 && !batch.is_empty()) {
                break;
            }
            bytes += size;
            batch.push(i);
        }
        let entries: Vec<_> = batch
            .iter()
            .filter_map(|&i| {
                PutRecordsRequestEntry::builder()
                    .data(Blob::new(records[i].clone()))
                    .partition_key(&keys[i])
                    .build()
                    .ok()
            })
            .collect();
        tally.requests.fetch_add(1, Ordering::Relaxed);
        let result = client
            .put_records()
            .stream_name(stream)
            .set_records(Some(entries))
            .send()
            .await;
        let mut failed = false;
        match result {
            Ok(output) => {
                for (&i, entry) in batch.iter().zip(output.records()) {
                    if entry.error_code().is_none() {
                        done[i] = true;
                    } else {
                        failed = true;
                    }
                }
            }
            Err(error) => {
                failed = true;
                tracing::debug!(error = %aws_sdk_kinesis::error::DisplayErrorContext(&error), "PutRecords failed");
            }
        }
        if failed {
            if started.elapsed() + backoff > retry_for {
                return done;
            }
            tally.retries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        } else {
            backoff = Duration::from_millis(100);
        }
    }
}

struct ProbeConfig {
    url: String,
    format: LoadFormat,
    access_key: Option<String>,
    token: Option<String>,
    seed: u64,
}

/// Once a second: one datapoint of its own series (account 000000000000, namespace
/// `fleetlake/loadgen`), then SQL every 10 ms until it is returned. Returns the times
/// from each 200 to the answer that had it.
async fn probe_visibility(config: Arc<ProbeConfig>, stop: Arc<AtomicBool>) -> Vec<Duration> {
    let client = reqwest::Client::new();
    let endpoints = Endpoints::new(&config.url, config.format);
    let sql_url = format!(
        "{}/api/v1/sql?format=json",
        endpoints.logs.trim_end_matches("/firehose/logs")
    );
    let tally = Tally::default();
    let mut samples = Vec::new();
    let run = now_ms();
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let tick = Instant::now();
        seq += 1;
        let probe = format!("{run}-{seq}");
        let time_ms = now_ms() - now_ms().rem_euclid(60_000);
        let dims = [("Probe", probe.as_str())];
        let record = match config.format {
            LoadFormat::Json => serde_json::json!({
                "metric_stream_name": "loadgen", "account_id": "000000000000",
                "region": "us-east-1", "namespace": "fleetlake/loadgen",
                "metric_name": "VisibilityProbe", "dimensions": {"Probe": probe},
                "timestamp": time_ms,
                "value": {"count": 1.0, "sum": seq as f64, "max": seq as f64, "min": seq as f64},
                "unit": "Count"
            })
            .to_string()
            .into_bytes(),
            LoadFormat::Otel1 => fleetlake_ingest::otel::encode_v1_record(&[
                fleetlake_ingest::otel::StreamDatapoint {
                    account_id: "000000000000",
                    region: "us-east-1",
                    namespace: "fleetlake/loadgen",
                    metric_name: "VisibilityProbe",
                    dimensions: &dims,
                    unit: "Count",
                    time_ms,
                    count: 1.0,
                    sum: seq as f64,
                    min: seq as f64,
                    max: seq as f64,
                    percentiles: &[],
                },
            ]),
        };
        let id = format!("loadgen-{}-probe-{probe}", config.seed);
        let body = firehose_body(&id, &[record]);
        let posted = post_firehose(
            &client,
            &endpoints.metrics,
            &id,
            config.access_key.as_deref(),
            &body,
            Duration::from_secs(30),
            &tally,
        )
        .await;
        if posted.is_ok() {
            let acked = Instant::now();
            let sql = format!(
                "SELECT count(*) AS n FROM metrics WHERE account_id = '000000000000' \
                 AND metric_name = 'VisibilityProbe' AND dimensions['Probe'] = '{probe}'"
            );
            while acked.elapsed() < Duration::from_secs(30) {
                let mut request = client.post(&sql_url).body(sql.clone());
                if let Some(token) = &config.token {
                    request = request.bearer_auth(token);
                }
                let seen = match request.send().await {
                    Ok(response) => response
                        .json::<Vec<serde_json::Value>>()
                        .await
                        .ok()
                        .and_then(|rows| rows.first().and_then(|r| r["n"].as_u64()))
                        .is_some_and(|n| n > 0),
                    Err(_) => false,
                };
                if seen {
                    samples.push(acked.elapsed());
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        tokio::time::sleep(Duration::from_secs(1).saturating_sub(tick.elapsed())).await;
    }
    samples
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_urls() {
        let e = Endpoints::new("http://127.0.0.1:9/", LoadFormat::Otel1);
        assert_eq!(e.metrics, "http://127.0.0.1:9/firehose/otel");
        assert_eq!(e.logs, "http://127.0.0.1:9/firehose/logs");
        let e = Endpoints::new("http://h:9/firehose/custom", LoadFormat::Json);
        assert_eq!(e.metrics, "http://h:9/firehose/custom");
        assert_eq!(e.logs, "http://h:9/firehose/logs");
    }

    #[test]
    fn latency_percentiles() {
        let l = Latency::of((1..=100).map(Duration::from_millis).collect());
        assert_eq!((l.samples, l.p50, l.p99, l.max), (100, 50.0, 99.0, 100.0));
        assert_eq!(Latency::of(Vec::new()).samples, 0);
    }

    #[test]
    fn start_times() {
        assert_eq!(parse_start("1700000040000").unwrap(), 1_700_000_040_000);
        assert_eq!(
            parse_start("2023-11-14T22:14:00Z").unwrap(),
            1_700_000_040_000
        );
        assert!(parse_start("yesterday").is_err());
    }
}
