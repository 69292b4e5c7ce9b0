//! CloudWatch's own API as a source: backfill and gap fill with GetMetricData.
//!
//! ```text
//!  ListMetrics ──> metric list (deduplicated, checkpointed)
//!        │
//!  Plan: range, period, stats ──> units (a window of up to a UTC day × up to 500 queries,
//!        │                              ≤ 100,800 datapoints per call)
//!  GetMetricData (paced, retried with backoff, NextToken pages) ──> MetricsBatchBuilder
//!        └──> RowSink (WAL, hot buffer, lake) ──> checkpoint: units done
//! ```
//!
//! Rows are built exactly like streamed ones ([`MetricsBatchBuilder`]): one row per
//! (series, period start) with `count`, `sum`, `min`, `max` from SampleCount, Sum,
//! Minimum and Maximum, percentiles in `stats` under their CloudWatch names (`p99`).
//! GetMetricData returns no unit, so `unit` is NULL. The lake's de-duplication key is
//! the series and the time, not the values or unit, so a backfilled datapoint that the
//! stream already delivered is dropped at commit (the first writer wins) and
//! overlapping backfills are harmless.
//!
//! A unit is marked done in the checkpoint only after the sink's `write` returned, i.e.
//! once its rows are durable; an interrupted job refetches at most the units in flight.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arrow::array::RecordBatch;
use aws_sdk_cloudwatch::Client;
use aws_sdk_cloudwatch::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_cloudwatch::primitives::DateTime;
use aws_sdk_cloudwatch::types::{Dimension, Metric, MetricDataQuery, MetricStat, ScanBy};
use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};

use crate::metric_stream::{BaseStats, MetricsBatchBuilder, SeriesId};
use crate::metrics as m;
use fleetlake_model::retry::RetryPolicy;
use fleetlake_model::{RowSink, SinkError, Table};

/// Queries per GetMetricData call (CloudWatch's limit).
pub const MAX_QUERIES: usize = 500;
/// Datapoints per GetMetricData call before CloudWatch pages with NextToken.
pub const MAX_DATAPOINTS: i64 = 100_800;
/// The base statistics, in the order of their query ids, and the column each fills.
pub const BASE_STATS: [&str; 4] = ["Sum", "SampleCount", "Minimum", "Maximum"];
const DAY_MS: i64 = 86_400_000;

/// What to fetch: the same for every account of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Start of the range, epoch ms, aligned down to the period.
    pub start_ms: i64,
    /// End of the range (exclusive), epoch ms, aligned up to the period.
    pub end_ms: i64,
    /// Period in seconds: 1, 5, 10, 30 (high resolution) or a multiple of 60.
    pub period_s: u32,
    /// Namespaces to list; empty: every namespace.
    pub namespaces: Vec<String>,
    /// Metric names to list; empty: every metric.
    pub metric_names: Vec<String>,
    /// Percentiles to fetch besides the base statistics (`p99`, `p99.9`).
    pub percentiles: Vec<String>,
}

impl Plan {
    /// A checked plan; the range is widened to whole periods.
    pub fn new(
        start_ms: i64,
        end_ms: i64,
        period_s: u32,
        namespaces: Vec<String>,
        metric_names: Vec<String>,
        percentiles: Vec<String>,
    ) -> Result<Self, String> {
        if !(matches!(period_s, 1 | 5 | 10 | 30) || (period_s >= 60 && period_s.is_multiple_of(60)))
        {
            return Err(format!(
                "period {period_s}s: CloudWatch takes 1, 5, 10, 30 or a multiple of 60 seconds"
            ));
        }
        for p in &percentiles {
            if !is_percentile(p) {
                return Err(format!(
                    "percentile {p:?}: expected pNN or pNN.N with NN from 0 to 100, e.g. p99 or p99.9"
                ));
            }
        }
        let stats = BASE_STATS.len() + percentiles.len();
        if stats > MAX_QUERIES {
            return Err(format!("{} percentiles: too many", percentiles.len()));
        }
        let period_ms = i64::from(period_s) * 1000;
        let start_ms = start_ms.div_euclid(period_ms) * period_ms;
        let end_ms = end_ms.div_euclid(period_ms) * period_ms
            + if end_ms.rem_euclid(period_ms) == 0 {
                0
            } else {
                period_ms
            };
        if start_ms < 0 || end_ms <= start_ms {
            return Err("the range is empty: the start must come before the end".into());
        }
        Ok(Self {
            start_ms,
            end_ms,
            period_s,
            namespaces,
            metric_names,
            percentiles,
        })
    }

    /// Every statistic asked for each metric: the base four, then the percentiles.
    pub fn stats(&self) -> Vec<&str> {
        BASE_STATS
            .iter()
            .copied()
            .chain(self.percentiles.iter().map(String::as_str))
            .collect()
    }

    fn period_ms(&self) -> i64 {
        i64::from(self.period_s) * 1000
    }

    /// The time windows fetched one after the other: UTC days (the lake's partitions)
    /// cut to the range, or runs of whole periods as long as a day when the period
    /// does not divide a day.
    pub fn windows(&self) -> Vec<Range<i64>> {
        let period = self.period_ms();
        let mut out = Vec::new();
        let mut start = self.start_ms;
        while start < self.end_ms {
            let end = if DAY_MS.rem_euclid(period) == 0 {
                (start.div_euclid(DAY_MS) + 1) * DAY_MS
            } else {
                start + (DAY_MS / period).max(1) * period
            };
            let end = end.min(self.end_ms);
            out.push(start..end);
            start = end;
        }
        out
    }

    /// Metrics per call for a window: all their statistics in one call (so a row is
    /// complete when the call returns), at most 500 queries and 100,800 datapoints.
    pub fn metrics_per_call(&self, window: &Range<i64>) -> usize {
        let periods = ((window.end - window.start) / self.period_ms()).max(1);
        let queries = (MAX_DATAPOINTS / periods).clamp(1, MAX_QUERIES as i64) as usize;
        (queries / self.stats().len()).max(1)
    }

    /// The units of work for a list of `metrics` metrics, in the order they are done.
    pub fn units(&self, metrics: usize) -> Vec<Unit> {
        let mut out = Vec::new();
        for window in self.windows() {
            let per_call = self.metrics_per_call(&window);
            let mut first = 0;
            while first < metrics {
                let last = (first + per_call).min(metrics);
                out.push(Unit {
                    window: window.clone(),
                    metrics: first..last,
                });
                first = last;
            }
        }
        out
    }

    /// A stable name for the job (its checkpoint directory): a digest of the plan.
    pub fn id(&self) -> String {
        let text = serde_json::to_string(self).expect("a plan serializes");
        let digest = Md5::digest(text.as_bytes());
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }
}

fn is_percentile(p: &str) -> bool {
    p.strip_prefix('p')
        .filter(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit() || c == '.'))
        .and_then(|n| n.parse::<f64>().ok())
        .is_some_and(|v| (0.0..=100.0).contains(&v))
}

/// One GetMetricData call's worth of work (before NextToken pages).
#[derive(Debug, Clone, PartialEq)]
pub struct Unit {
    /// The time window, epoch ms.
    pub window: Range<i64>,
    /// Indexes into the account's metric list.
    pub metrics: Range<usize>,
}

/// A metric as ListMetrics names it; dimensions in the order it gave them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricRef {
    /// Namespace.
    pub namespace: String,
    /// Metric name.
    pub name: String,
    /// Dimensions (name, value).
    pub dimensions: Vec<(String, String)>,
}

impl MetricRef {
    fn key(&self) -> (String, String, Vec<(String, String)>) {
        let mut dims = self.dimensions.clone();
        dims.sort();
        (self.namespace.clone(), self.name.clone(), dims)
    }

    fn to_sdk(&self) -> Metric {
        Metric::builder()
            .namespace(&self.namespace)
            .metric_name(&self.name)
            .set_dimensions(Some(
                self.dimensions
                    .iter()
                    .map(|(n, v)| Dimension::builder().name(n).value(v).build())
                    .collect(),
            ))
            .build()
    }
}

/// Pacing and retries for one account's calls.
#[derive(Debug, Clone)]
pub struct Limits {
    /// GetMetricData and ListMetrics calls per second (CloudWatch's quota is 50 per
    /// account and region, shared with the account's own dashboards).
    pub calls_per_second: f64,
    /// Datapoints requested per second (the quota is 396,000 for data older than 3 h,
    /// 180,000 for newer).
    pub datapoints_per_second: f64,
    /// Attempts per call before the account is given up (throttling, 5xx, timeouts).
    pub max_attempts: u32,
    /// First wait after a failed attempt; doubled each time, up to 20 s, with full jitter
    /// (each wait drawn between zero and that).
    pub initial_backoff: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            calls_per_second: 10.0,
            datapoints_per_second: 150_000.0,
            max_attempts: 10,
            initial_backoff: Duration::from_millis(200),
        }
    }
}

/// Counts over a job, shared by its accounts (the summary and progress read them).
#[derive(Debug, Default)]
pub struct Counters {
    /// GetMetricData calls answered (pages included).
    pub get_calls: AtomicU64,
    /// ListMetrics calls answered.
    pub list_calls: AtomicU64,
    /// Attempts throttled or failed and retried.
    pub retries: AtomicU64,
    /// Of those, throttled.
    pub throttled: AtomicU64,
    /// Metrics (distinct series) listed.
    pub metrics: AtomicU64,
    /// Datapoints returned (one per statistic and period).
    pub datapoints: AtomicU64,
    /// Rows written to the sink (one per series and period).
    pub rows: AtomicU64,
    /// Units of work of the accounts listed (done or not).
    pub units: AtomicU64,
    /// Of those, units found done in the checkpoint of an earlier run.
    pub units_resumed: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// A counter's value.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// Why an account's backfill stopped.
#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    /// A CloudWatch call failed for good (denied, invalid, or still failing after
    /// the retries).
    #[error("{call} failed after {attempts} attempt(s): {message}")]
    Api {
        /// The call.
        call: &'static str,
        /// Attempts made.
        attempts: u32,
        /// The last error.
        message: String,
    },
    /// The sink refused the rows (the lake or the write-ahead log fails).
    #[error("writing rows: {0}")]
    Sink(SinkError),
    /// The checkpoint could not be read or written.
    #[error("checkpoint {path}: {message}")]
    Checkpoint {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// CloudWatch answered something unusable.
    #[error("unexpected answer: {0}")]
    Answer(String),
}

/// One account and region to backfill, with a client holding its credentials.
pub struct Target {
    /// The account id the rows are tagged with.
    pub account_id: String,
    /// The region the rows are tagged with (the client's region).
    pub region: String,
    /// A CloudWatch client for that account and region.
    pub client: Client,
}

/// Where an account's progress is kept: `<dir>/<account>-<region>.metrics.json` (the
/// metric list, fixed at the first run so that unit numbers keep their meaning) and
/// `<dir>/<account>-<region>.done` (units done, in order).
#[derive(Debug, Clone)]
pub struct Checkpoint {
    dir: PathBuf,
}

impl Checkpoint {
    /// Progress kept under `dir` (created when needed).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn file(&self, target: &str, ext: &str) -> PathBuf {
        self.dir.join(format!("{target}.{ext}"))
    }

    fn load_metrics(&self, target: &str) -> Result<Option<Vec<MetricRef>>, BackfillError> {
        let path = self.file(target, "metrics.json");
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| checkpoint_error(&path, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(checkpoint_error(&path, e)),
        }
    }

    fn load_done(&self, target: &str) -> Result<usize, BackfillError> {
        let path = self.file(target, "done");
        match std::fs::read_to_string(&path) {
            Ok(text) => text.trim().parse().map_err(|e| checkpoint_error(&path, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(checkpoint_error(&path, e)),
        }
    }

    fn save(&self, target: &str, ext: &str, bytes: &[u8]) -> Result<(), BackfillError> {
        let path = self.file(target, ext);
        write_atomic(&path, bytes).map_err(|e| checkpoint_error(&path, e))
    }
}

fn checkpoint_error(path: &Path, e: impl std::fmt::Display) -> BackfillError {
    BackfillError::Checkpoint {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Writes a file so that a crash leaves the old or the new content: a temporary file,
/// fsync, rename, fsync of the directory.
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Spaces calls so that neither calls nor datapoints per second exceed the limits.
struct Pacer {
    next: tokio::time::Instant,
    limits: Limits,
}

impl Pacer {
    fn new(limits: Limits) -> Self {
        Self {
            next: tokio::time::Instant::now(),
            limits,
        }
    }

    async fn wait(&mut self, datapoints: u64) {
        tokio::time::sleep_until(self.next).await;
        let now = tokio::time::Instant::now();
        self.next = now.max(self.next) + spacing(&self.limits, datapoints);
    }
}

/// Time a call of `datapoints` requested datapoints takes from the budget: the longer
/// of one call's share and its datapoints' share.
fn spacing(limits: &Limits, datapoints: u64) -> Duration {
    let calls = 1.0 / limits.calls_per_second.max(1e-3);
    let points = datapoints as f64 / limits.datapoints_per_second.max(1.0);
    Duration::from_secs_f64(calls.max(points))
}

/// Whether a failed call is worth another attempt, and whether it was throttling.
fn classify<E: ProvideErrorMetadata, R>(error: &SdkError<E, R>) -> (bool, bool) {
    const THROTTLING: [&str; 6] = [
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "LimitExceeded",
    ];
    match error {
        SdkError::ServiceError(service) => {
            let code = service.err().code().unwrap_or_default();
            if THROTTLING.contains(&code) {
                (true, true)
            } else {
                let internal = matches!(
                    code,
                    "InternalFailure"
                        | "InternalServiceFault"
                        | "InternalServiceError"
                        | "ServiceUnavailable"
                );
                (internal, false)
            }
        }
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            (true, false)
        }
        _ => (false, false),
    }
}

/// The retry policy of one call: the README's numbers (first wait doubling up to
/// 20 s, full jitter), `max_attempts` attempts in all.
fn retry_policy(limits: &Limits) -> RetryPolicy {
    RetryPolicy::attempts(
        limits.initial_backoff,
        Duration::from_secs(20),
        limits.max_attempts.max(1),
    )
}

/// Runs `call` until it succeeds, fails for good, or runs out of attempts.
async fn retried<T, E, R, F, Fut>(
    name: &'static str,
    limits: &Limits,
    counters: &Counters,
    mut call: F,
) -> Result<T, BackfillError>
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, SdkError<E, R>>>,
{
    let mut waits = retry_policy(limits).waits();
    let mut attempt = 0;
    loop {
        attempt += 1;
        match call().await {
            Ok(value) => return Ok(value),
            Err(error) => {
                let (retry, throttled) = classify(&error);
                if throttled {
                    Counters::add(&counters.throttled, 1);
                    metrics::counter!(m::BACKFILL_THROTTLED, "call" => name).increment(1);
                }
                let wait = if retry { waits.next() } else { None };
                let Some(wait) = wait else {
                    metrics::counter!(m::BACKFILL_ERRORS, "call" => name).increment(1);
                    return Err(BackfillError::Api {
                        call: name,
                        attempts: attempt,
                        message: DisplayErrorContext(&error).to_string(),
                    });
                };
                Counters::add(&counters.retries, 1);
                tracing::debug!(call = name, attempt, error = %DisplayErrorContext(&error), ?wait, "retrying");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// The account's metrics: ListMetrics for each namespace (and metric name) asked,
/// all pages, without repeats, in a stable order.
async fn list_metrics(
    client: &Client,
    plan: &Plan,
    limits: &Limits,
    pacer: &mut Pacer,
    counters: &Counters,
) -> Result<Vec<MetricRef>, BackfillError> {
    let namespaces: Vec<Option<&str>> = if plan.namespaces.is_empty() {
        vec![None]
    } else {
        plan.namespaces.iter().map(|n| Some(n.as_str())).collect()
    };
    let names: Vec<Option<&str>> = if plan.metric_names.is_empty() {
        vec![None]
    } else {
        plan.metric_names.iter().map(|n| Some(n.as_str())).collect()
    };
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for namespace in &namespaces {
        for name in &names {
            let mut token: Option<String> = None;
            loop {
                pacer.wait(0).await;
                let page = retried("ListMetrics", limits, counters, || {
                    client
                        .list_metrics()
                        .set_namespace(namespace.map(str::to_owned))
                        .set_metric_name(name.map(str::to_owned))
                        .set_next_token(token.clone())
                        .send()
                })
                .await?;
                Counters::add(&counters.list_calls, 1);
                metrics::counter!(m::BACKFILL_CALLS, "call" => "ListMetrics").increment(1);
                for metric in page.metrics() {
                    let (Some(ns), Some(metric_name)) = (metric.namespace(), metric.metric_name())
                    else {
                        continue;
                    };
                    let entry = MetricRef {
                        namespace: ns.to_owned(),
                        name: metric_name.to_owned(),
                        dimensions: metric
                            .dimensions()
                            .iter()
                            .filter_map(|d| Some((d.name()?.to_owned(), d.value()?.to_owned())))
                            .collect(),
                    };
                    if seen.insert(entry.key()) {
                        out.push(entry);
                    }
                }
                token = page.next_token().map(str::to_owned);
                if token.is_none() {
                    break;
                }
            }
        }
    }
    out.sort_by_key(MetricRef::key);
    Ok(out)
}

/// Values of one row being assembled: base statistics, then percentiles.
type Values = Vec<Option<f64>>;

/// Fetches one unit (all its NextToken pages) and turns it into metrics rows.
async fn fetch_unit(
    target: &Target,
    plan: &Plan,
    metrics: &[MetricRef],
    unit: &Unit,
    limits: &Limits,
    pacer: &mut Pacer,
    counters: &Counters,
) -> Result<Option<RecordBatch>, BackfillError> {
    let stats = plan.stats();
    let queries: Vec<MetricDataQuery> = unit
        .metrics
        .clone()
        .flat_map(|i| {
            let metric = metrics[i].to_sdk();
            stats.iter().enumerate().map(move |(s, stat)| {
                MetricDataQuery::builder()
                    .id(format!("m{i}_{s}"))
                    .metric_stat(
                        MetricStat::builder()
                            .metric(metric.clone())
                            .period(plan.period_s as i32)
                            .stat(*stat)
                            .build(),
                    )
                    .return_data(true)
                    .build()
            })
        })
        .collect();
    let periods = (unit.window.end - unit.window.start) / plan.period_ms();
    let requested = queries.len() as u64 * periods.max(1) as u64;
    let mut rows: BTreeMap<(usize, i64), Values> = BTreeMap::new();
    let mut token: Option<String> = None;
    loop {
        pacer.wait(requested).await;
        let page = retried("GetMetricData", limits, counters, || {
            target
                .client
                .get_metric_data()
                .set_metric_data_queries(Some(queries.clone()))
                .start_time(DateTime::from_millis(unit.window.start))
                .end_time(DateTime::from_millis(unit.window.end))
                .scan_by(ScanBy::TimestampAscending)
                .set_next_token(token.clone())
                .send()
        })
        .await?;
        Counters::add(&counters.get_calls, 1);
        metrics::counter!(m::BACKFILL_CALLS, "call" => "GetMetricData").increment(1);
        let mut points = 0u64;
        for result in page.metric_data_results() {
            let id = result.id().unwrap_or_default();
            let (metric, stat) = parse_id(id)
                .filter(|(metric, stat)| unit.metrics.contains(metric) && *stat < stats.len())
                .ok_or_else(|| BackfillError::Answer(format!("a result with unknown id {id:?}")))?;
            if result.timestamps().len() != result.values().len() {
                return Err(BackfillError::Answer(format!(
                    "result {id}: {} timestamps but {} values",
                    result.timestamps().len(),
                    result.values().len()
                )));
            }
            for (time, value) in result.timestamps().iter().zip(result.values()) {
                let time_ms = time
                    .to_millis()
                    .map_err(|e| BackfillError::Answer(format!("result {id}: {e}")))?;
                if !unit.window.contains(&time_ms) || !value.is_finite() {
                    continue;
                }
                let slot = rows
                    .entry((metric, time_ms))
                    .or_insert_with(|| vec![None; stats.len()]);
                slot[stat] = Some(*value);
                points += 1;
            }
        }
        Counters::add(&counters.datapoints, points);
        metrics::counter!(m::BACKFILL_DATAPOINTS).increment(points);
        token = page.next_token().map(str::to_owned);
        if token.is_none() {
            break;
        }
    }
    if rows.is_empty() {
        return Ok(None);
    }
    let mut builder = MetricsBatchBuilder::new();
    for ((metric, time_ms), values) in &rows {
        let metric = &metrics[*metric];
        let mut dims: Vec<(&str, &str)> = metric
            .dimensions
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        dims.sort();
        dims.dedup_by(|a, b| a.0 == b.0);
        let mut pcts: Vec<(&str, f64)> = plan
            .percentiles
            .iter()
            .zip(&values[BASE_STATS.len()..])
            .filter_map(|(name, v)| Some((name.as_str(), (*v)?)))
            .collect();
        pcts.sort_by(|a, b| a.0.cmp(b.0));
        builder
            .append(
                SeriesId {
                    account_id: &target.account_id,
                    region: &target.region,
                    namespace: &metric.namespace,
                    metric_name: &metric.name,
                },
                *time_ms,
                dims,
                None,
                BaseStats {
                    sum: values[0],
                    count: values[1],
                    min: values[2],
                    max: values[3],
                },
                pcts,
            )
            .map_err(|e| {
                BackfillError::Answer(format!("{}/{}: {e}", metric.namespace, metric.name))
            })?;
    }
    Ok(Some(builder.finish()))
}

fn parse_id(id: &str) -> Option<(usize, usize)> {
    let (metric, stat) = id.strip_prefix('m')?.split_once('_')?;
    Some((metric.parse().ok()?, stat.parse().ok()?))
}

/// Writes rows, waiting while the sink is over its limits (a flush is under way).
pub async fn write_rows(sink: &dyn RowSink, batch: RecordBatch) -> Result<(), SinkError> {
    let mut waited = Duration::ZERO;
    loop {
        match sink.write(vec![(Table::Metrics, batch.clone())]).await {
            Ok(()) => return Ok(()),
            Err(SinkError::Overloaded(reason)) if waited < Duration::from_secs(600) => {
                tracing::debug!(%reason, "the sink is full; waiting");
                tokio::time::sleep(Duration::from_millis(50)).await;
                waited += Duration::from_millis(50);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Backfills one account and region: lists its metrics (or takes the checkpoint's
/// list), then fetches and writes every unit not yet done, checkpointing after each.
/// `progress(done, total)` is called as units finish; what was done goes to `counters`.
pub async fn backfill_account(
    target: &Target,
    plan: &Plan,
    limits: &Limits,
    checkpoint: Option<&Checkpoint>,
    sink: &dyn RowSink,
    counters: &Counters,
    progress: &(dyn Fn(usize, usize) + Send + Sync),
) -> Result<(), BackfillError> {
    let name = format!("{}-{}", target.account_id, target.region);
    let mut pacer = Pacer::new(limits.clone());
    let saved = match checkpoint {
        Some(c) => c.load_metrics(&name)?,
        None => None,
    };
    let metrics = match saved {
        Some(list) => list,
        None => {
            let list = list_metrics(&target.client, plan, limits, &mut pacer, counters).await?;
            if let Some(c) = checkpoint {
                let json = serde_json::to_vec(&list).expect("metric refs serialize");
                c.save(&name, "metrics.json", &json)?;
            }
            list
        }
    };
    Counters::add(&counters.metrics, metrics.len() as u64);
    let units = plan.units(metrics.len());
    let resumed = match checkpoint {
        Some(c) => c.load_done(&name)?.min(units.len()),
        None => 0,
    };
    Counters::add(&counters.units, units.len() as u64);
    Counters::add(&counters.units_resumed, resumed as u64);
    progress(resumed, units.len());
    for (index, unit) in units.iter().enumerate().skip(resumed) {
        if let Some(batch) =
            fetch_unit(target, plan, &metrics, unit, limits, &mut pacer, counters).await?
        {
            let rows = batch.num_rows() as u64;
            write_rows(sink, batch).await.map_err(BackfillError::Sink)?;
            Counters::add(&counters.rows, rows);
            metrics::counter!(m::BACKFILL_ROWS).increment(rows);
        }
        if let Some(c) = checkpoint {
            c.save(&name, "done", (index + 1).to_string().as_bytes())?;
        }
        progress(index + 1, units.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3_600_000;

    fn plan(start: i64, end: i64, period: u32, pcts: &[&str]) -> Plan {
        Plan::new(
            start,
            end,
            period,
            vec![],
            vec![],
            pcts.iter().map(|p| (*p).to_owned()).collect(),
        )
        .unwrap()
    }

    #[test]
    fn the_range_is_widened_to_whole_periods() {
        let p = plan(61_500, 179_000, 60, &[]);
        assert_eq!((p.start_ms, p.end_ms), (60_000, 180_000));
        let p = plan(60_000, 180_000, 60, &[]);
        assert_eq!((p.start_ms, p.end_ms), (60_000, 180_000));
    }

    #[test]
    fn bad_plans_are_refused_with_the_reason() {
        let err = Plan::new(0, 1, 45, vec![], vec![], vec![]).unwrap_err();
        assert!(err.contains("45s"), "{err}");
        let err = Plan::new(0, 60_000, 60, vec![], vec![], vec!["p101".into()]).unwrap_err();
        assert!(err.contains("p101"), "{err}");
        let err = Plan::new(0, 60_000, 60, vec![], vec![], vec!["tm99".into()]).unwrap_err();
        assert!(err.contains("tm99"), "{err}");
        assert!(Plan::new(120_000, 60_000, 60, vec![], vec![], vec![]).is_err());
        assert!(Plan::new(0, 60_000, 60, vec![], vec![], vec!["p99.9".into()]).is_ok());
    }

    #[test]
    fn windows_are_utc_days_cut_to_the_range() {
        let p = plan(20 * HOUR, 24 * HOUR * 2 + 3 * HOUR, 60, &[]);
        assert_eq!(
            p.windows(),
            vec![
                20 * HOUR..24 * HOUR,
                24 * HOUR..48 * HOUR,
                48 * HOUR..51 * HOUR
            ]
        );
        // 420 s does not divide a day: windows of whole periods instead.
        let p = plan(0, 2 * DAY_MS, 420, &[]);
        let w = p.windows();
        assert!(
            w.iter()
                .all(|w| (w.end - w.start) % 420_000 == 0 || w.end == p.end_ms)
        );
        assert_eq!(w.first().unwrap().start, 0);
        assert_eq!(w.last().unwrap().end, p.end_ms);
    }

    #[test]
    fn calls_stay_within_500_queries_and_100800_datapoints() {
        // A day at one minute: 1,440 periods, 70 queries, 17 metrics of 4 stats.
        let p = plan(0, DAY_MS, 60, &[]);
        assert_eq!(p.metrics_per_call(&(0..DAY_MS)), 17);
        let p = plan(0, DAY_MS, 60, &["p99"]);
        assert_eq!(p.metrics_per_call(&(0..DAY_MS)), 14);
        // An hour: 60 periods, 500 queries (1,680 by datapoints), 125 metrics.
        let p = plan(0, HOUR, 60, &[]);
        assert_eq!(p.metrics_per_call(&(0..HOUR)), 125);
        for p in [
            plan(0, DAY_MS, 60, &["p50", "p90", "p99"]),
            plan(0, HOUR, 1, &[]),
        ] {
            for unit in p.units(1000) {
                let queries = unit.metrics.len() * p.stats().len();
                let periods = (unit.window.end - unit.window.start) / p.period_ms();
                assert!(queries <= MAX_QUERIES, "{queries}");
                assert!(queries as i64 * periods <= MAX_DATAPOINTS, "{unit:?}");
            }
        }
        // Units cover every metric of every window once, in order.
        let p = plan(0, 2 * DAY_MS, 60, &[]);
        let units = p.units(40);
        assert_eq!(units.len(), 2 * 3);
        assert_eq!(units[0].metrics, 0..17);
        assert_eq!(units[2].metrics, 34..40);
        assert_eq!(units[3].window, DAY_MS..2 * DAY_MS);
    }

    #[test]
    fn the_job_id_depends_on_the_plan_only() {
        let a = plan(0, HOUR, 60, &[]);
        assert_eq!(a.id(), plan(0, HOUR, 60, &[]).id());
        assert_ne!(a.id(), plan(0, 2 * HOUR, 60, &[]).id());
        assert_ne!(a.id(), plan(0, HOUR, 60, &["p99"]).id());
        assert_eq!(a.id().len(), 16);
    }

    #[test]
    fn calls_are_spaced_by_calls_and_datapoints_per_second() {
        let limits = Limits::default(); // 10 calls/s, 150,000 datapoints/s
        assert_eq!(spacing(&limits, 0), Duration::from_millis(100));
        assert_eq!(spacing(&limits, 15_000), Duration::from_millis(100));
        // A full call: 68 queries x 1,440 minutes.
        assert_eq!(spacing(&limits, 97_920), Duration::from_secs_f64(0.6528));
    }

    #[test]
    fn query_ids_round_trip() {
        assert_eq!(parse_id("m12_3"), Some((12, 3)));
        assert_eq!(parse_id("x12_3"), None);
        assert_eq!(parse_id("m12"), None);
    }

    #[test]
    fn the_checkpoint_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let c = Checkpoint::new(dir.path().join("job"));
        assert_eq!(c.load_done("a").unwrap(), 0);
        assert_eq!(c.load_metrics("a").unwrap(), None);
        let list = vec![MetricRef {
            namespace: "AWS/EC2".into(),
            name: "CPUUtilization".into(),
            dimensions: vec![("InstanceId".into(), "i-1".into())],
        }];
        c.save("a", "metrics.json", &serde_json::to_vec(&list).unwrap())
            .unwrap();
        c.save("a", "done", b"7").unwrap();
        let c = Checkpoint::new(dir.path().join("job"));
        assert_eq!(c.load_done("a").unwrap(), 7);
        assert_eq!(c.load_metrics("a").unwrap(), Some(list));
        std::fs::write(c.file("a", "done"), "x").unwrap();
        let err = c.load_done("a").unwrap_err().to_string();
        assert!(err.contains("a.done"), "{err}");
    }
}
