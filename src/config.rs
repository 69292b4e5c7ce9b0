//! Configuration: embedded defaults, then an optional TOML file, then `FLEETLAKE_*`
//! environment variables (nested keys joined by `__`, e.g.
//! `FLEETLAKE_FIREHOSE__ACCESS_KEY`), then command-line flags.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use figment::Figment;
use figment::providers::{Env, Format as _, Serialized, Toml};
use fleetlake_aggregate::location::LakeLocation;
use fleetlake_ingest::Format;
use serde::{Deserialize, Serialize};

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Config {
    /// Directory for the write-ahead log and, unless `lake.dir` says otherwise, the lake.
    pub(crate) data_dir: PathBuf,
    /// Address of the HTTP listener (Firehose, SQL, health, metrics). Port 0 picks one.
    pub(crate) http_addr: SocketAddr,
    /// Address of the Postgres wire protocol listener. Port 0 picks one.
    pub(crate) pg_addr: SocketAddr,
    /// SQL: limits and users, for HTTP and the Postgres protocol.
    pub(crate) query: QueryConfig,
    /// Settings shared by every Firehose endpoint.
    pub(crate) firehose: FirehoseConfig,
    /// Firehose endpoints by name, one per delivery stream if wanted. Four are built
    /// in: `metrics` (JSON), `otel` (OpenTelemetry 1.0), `otel07` (OpenTelemetry 0.7),
    /// `logs` (CloudWatch Logs).
    pub(crate) sources: BTreeMap<String, SourceConfig>,
    /// The hot buffer and its flushes to the lake.
    pub(crate) buffer: BufferConfig,
    /// The write-ahead log.
    pub(crate) wal: WalConfig,
    /// The lake.
    pub(crate) lake: LakeConfig,
    /// How long each table keeps its data.
    pub(crate) retention: RetentionConfig,
    /// Kinesis Data Streams to consume (`[[kinesis]]`, one table per stream).
    pub(crate) kinesis: Vec<KinesisConfig>,
    /// The account registry.
    pub(crate) accounts: AccountsConfig,
    /// Alert rules, receivers, routes, silences, storm control.
    pub(crate) alerting: fleetlake_alert_rules::AlertingConfig,
    /// TLS on the HTTP and Postgres listeners; plain TCP when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) tls: Option<TlsConfig>,
    /// Holes in the metric streams fetched from CloudWatch (GetMetricData).
    pub(crate) gap_fill: GapFillConfig,
}

/// `[gap_fill]`: when an account's metrics stop arriving for a while and then resume
/// (its stream, its Firehose delivery, or fleetlake itself was down longer than the
/// sender retried), the service fetches the missing minutes with GetMetricData, as
/// `fleetlake backfill cloudwatch` does. Whatever did arrive is dropped as a duplicate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct GapFillConfig {
    /// Off by default: each fill costs CloudWatch API calls in the account.
    pub(crate) enabled: bool,
    /// Role assumed in each account through STS (`arn:aws:iam::<account>:role/<name>`);
    /// it needs `cloudwatch:ListMetrics` and `cloudwatch:GetMetricData`. Required when
    /// enabled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) role_name: Option<String>,
    /// CloudWatch and STS endpoint override (VPC endpoints, tests).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) endpoint_url: Option<String>,
    /// Shortest run of missing minutes that counts as a hole.
    #[serde(with = "humantime_serde")]
    pub(crate) min_gap: Duration,
    /// How long after data resumed a hole is fetched, so that late deliveries (Firehose
    /// retries, Kinesis consumers catching up) land first.
    #[serde(with = "humantime_serde")]
    pub(crate) settle: Duration,
    /// How far back holes are looked for; at start the lake's last minute of each
    /// account within it is the edge of a hole left by a stop of fleetlake.
    #[serde(with = "humantime_serde")]
    pub(crate) lookback: Duration,
    /// How often holes are looked for.
    #[serde(with = "humantime_serde")]
    pub(crate) check_interval: Duration,
    /// Period of the fetched datapoints (the metric streams' is one minute).
    #[serde(with = "humantime_serde")]
    pub(crate) period: Duration,
    /// Namespaces to fetch; empty: every namespace ListMetrics finds.
    pub(crate) namespaces: Vec<String>,
    /// Percentiles to fetch besides the base statistics (`p99`).
    pub(crate) percentiles: Vec<String>,
    /// Holes fetched at once.
    pub(crate) concurrency: usize,
    /// CloudWatch calls per second per hole being fetched.
    pub(crate) max_calls_per_second: f64,
    /// Datapoints requested per second per hole being fetched.
    pub(crate) max_datapoints_per_second: f64,
}

impl Default for GapFillConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            role_name: None,
            endpoint_url: None,
            min_gap: Duration::from_secs(300),
            settle: Duration::from_secs(600),
            lookback: Duration::from_secs(24 * 3600),
            check_interval: Duration::from_secs(60),
            period: Duration::from_secs(60),
            namespaces: Vec::new(),
            percentiles: Vec::new(),
            concurrency: 2,
            max_calls_per_second: 5.0,
            max_datapoints_per_second: 50_000.0,
        }
    }
}

impl GapFillConfig {
    /// The backfill plan for the minutes `start_ms..end_ms`.
    pub(crate) fn plan(
        &self,
        start_ms: i64,
        end_ms: i64,
    ) -> Result<fleetlake_ingest::cloudwatch::Plan, String> {
        let period = u32::try_from(self.period.as_secs())
            .ok()
            .filter(|_| self.period.subsec_nanos() == 0)
            .ok_or_else(|| format!("period {:?} is not whole seconds", self.period))?;
        fleetlake_ingest::cloudwatch::Plan::new(
            start_ms,
            end_ms,
            period,
            self.namespaces.clone(),
            Vec::new(),
            self.percentiles.clone(),
        )
    }

    fn validate(&self) -> anyhow::Result<()> {
        if !self.enabled {
            return Ok(());
        }
        if self.role_name.as_deref().is_none_or(str::is_empty) {
            bail!(
                "gap_fill.role_name is required when gap_fill.enabled: the role fleetlake assumes in each account to read its metrics"
            );
        }
        self.plan(0, 60_000)
            .map_err(|e| anyhow::anyhow!("gap_fill: {e}"))?;
        if self.min_gap < Duration::from_secs(60) {
            bail!("gap_fill.min_gap must be at least 1m");
        }
        if self.check_interval.is_zero() || self.lookback.is_zero() {
            bail!("gap_fill.check_interval and gap_fill.lookback must be positive");
        }
        if self.concurrency == 0
            || self.max_calls_per_second <= 0.0
            || self.max_datapoints_per_second <= 0.0
        {
            bail!(
                "gap_fill.concurrency, max_calls_per_second and max_datapoints_per_second must be positive"
            );
        }
        Ok(())
    }
}

/// `[tls]`: a certificate for both listeners. Firehose delivers to HTTPS endpoints only;
/// Postgres clients must then negotiate TLS (`sslmode=require` or stronger).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TlsConfig {
    /// PEM certificate chain, the server's certificate first.
    pub(crate) cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of that certificate.
    pub(crate) key_file: PathBuf,
}

/// `[accounts]`: the account registry (one record per AWS account of the fleet).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct AccountsConfig {
    /// A JSON array, or JSON lines, of account records (`account_id`, `account_name`,
    /// `environment`, `owner_team`, `lifecycle_state`, ...). Unset: no registry.
    pub(crate) file: Option<PathBuf>,
    /// How often the file is checked for changes.
    #[serde(with = "humantime_serde")]
    pub(crate) reload_interval: Duration,
}

impl Default for AccountsConfig {
    fn default() -> Self {
        Self {
            file: None,
            reload_interval: Duration::from_secs(30),
        }
    }
}

/// `[[kinesis]]`: one stream to consume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct KinesisConfig {
    /// Stream name, or ARN (`arn:aws:kinesis:REGION:ACCOUNT:stream/NAME`).
    pub(crate) stream: String,
    /// Region of the stream; the AWS configuration's (or the ARN's) when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) region: Option<String>,
    /// Role to assume for reading (a stream in another account); the standard
    /// credential chain's identity when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) role_arn: Option<String>,
    /// Endpoint URL override (VPC endpoints, tests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) endpoint_url: Option<String>,
    /// Record format: `json`, `otel1`, `otel07` or `cwlogs` (KPL aggregates are always
    /// de-aggregated).
    #[serde(default = "default_kinesis_format")]
    pub(crate) format: Format,
    /// Where shards without a committed position start: `TRIM_HORIZON`, `LATEST` or
    /// `AT_TIMESTAMP` (with `start_timestamp`).
    #[serde(default = "default_start_position")]
    pub(crate) start_position: String,
    /// RFC 3339 time for `AT_TIMESTAMP`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) start_timestamp: Option<String>,
    /// Wait after a GetRecords call that returned nothing.
    #[serde(default = "default_idle_wait", with = "humantime_serde")]
    pub(crate) idle_wait: Duration,
    /// How often shards are listed again (to find new shards after resharding).
    #[serde(default = "default_discovery_interval", with = "humantime_serde")]
    pub(crate) discovery_interval: Duration,
    /// Most records per GetRecords call (1-10000).
    #[serde(default = "default_max_records")]
    pub(crate) max_records: i32,
    /// DynamoDB table of shard leases, for several instances sharing the stream (each
    /// reads the shards it holds a lease for). Unset: this instance reads every shard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) lease_table: Option<String>,
    /// A lease not renewed for this long is taken over by another instance.
    #[serde(default = "default_lease_duration", with = "humantime_serde")]
    pub(crate) lease_duration: Duration,
    /// Endpoint URL override for the lease table's DynamoDB (VPC endpoints, tests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) lease_endpoint_url: Option<String>,
}

fn default_lease_duration() -> Duration {
    Duration::from_secs(10)
}

fn default_kinesis_format() -> Format {
    Format::MetricsJson
}

fn default_start_position() -> String {
    "TRIM_HORIZON".into()
}

fn default_idle_wait() -> Duration {
    Duration::from_secs(1)
}

fn default_discovery_interval() -> Duration {
    Duration::from_secs(30)
}

fn default_max_records() -> i32 {
    10_000
}

impl KinesisConfig {
    /// The consumer's settings, checked; `index` names the entry in errors.
    pub(crate) fn stream_config(
        &self,
        index: usize,
    ) -> anyhow::Result<fleetlake_ingest::kinesis::StreamConfig> {
        use fleetlake_ingest::kinesis::{StartPosition, StreamConfig};
        let at = |key: &str| format!("kinesis[{index}].{key}");
        let (name, arn) = StreamConfig::parse_stream(&self.stream)
            .map_err(|e| anyhow::anyhow!("{}: {e}", at("stream")))?;
        let start = match (self.start_position.as_str(), &self.start_timestamp) {
            ("TRIM_HORIZON", None) => StartPosition::TrimHorizon,
            ("LATEST", None) => StartPosition::Latest,
            ("AT_TIMESTAMP", Some(time)) => {
                let t = humantime::parse_rfc3339_weak(time)
                    .map_err(|e| anyhow::anyhow!("{}: {time:?}: {e}", at("start_timestamp")))?;
                let ms = t
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_err(|_| anyhow::anyhow!("{}: before 1970", at("start_timestamp")))?
                    .as_millis() as i64;
                StartPosition::AtTimestamp(ms)
            }
            ("AT_TIMESTAMP", None) => {
                bail!("{} is required with AT_TIMESTAMP", at("start_timestamp"))
            }
            ("TRIM_HORIZON" | "LATEST", Some(_)) => bail!(
                "{} is only used with start_position = \"AT_TIMESTAMP\"",
                at("start_timestamp")
            ),
            (other, _) => bail!(
                "{}: {other:?} is not one of TRIM_HORIZON, LATEST, AT_TIMESTAMP",
                at("start_position")
            ),
        };
        if !(1..=10_000).contains(&self.max_records) {
            bail!("{} must be between 1 and 10000", at("max_records"));
        }
        if self.discovery_interval.is_zero() {
            bail!("{} must be positive", at("discovery_interval"));
        }
        if self.lease_duration < Duration::from_secs(1) {
            bail!("{} must be at least 1s", at("lease_duration"));
        }
        if self.lease_table.as_deref().is_some_and(str::is_empty) {
            bail!("{} is set but empty", at("lease_table"));
        }
        Ok(StreamConfig {
            name,
            arn,
            format: self.format,
            region: self.region.clone(),
            start,
            idle_wait: self.idle_wait,
            // GetRecords allows 5 calls per second per shard.
            min_call_interval: Duration::from_millis(200),
            discovery_interval: self.discovery_interval,
            max_records: self.max_records,
        })
    }

    /// The stream's region: configured, else the ARN's.
    pub(crate) fn region(&self) -> Option<String> {
        self.region.clone().or_else(|| {
            self.stream
                .starts_with("arn:")
                .then(|| self.stream.split(':').nth(3).map(str::to_string))
                .flatten()
                .filter(|r| !r.is_empty())
        })
    }
}

/// `[firehose]`
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct FirehoseConfig {
    /// Access key Firehose must send in `X-Amz-Firehose-Access-Key`, for every source
    /// that sets none of its own; unset accepts all.
    pub(crate) access_key: Option<String>,
    /// Largest request body, compressed and decompressed, in bytes.
    pub(crate) max_body_bytes: usize,
    /// Requests read and decoded at once, all endpoints together; more get 503 and
    /// Firehose retries them. With `max_body_bytes`, bounds the memory bodies take.
    pub(crate) max_in_flight: usize,
}

/// `[sources.<name>]`: one Firehose HTTP endpoint.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SourceConfig {
    /// URL path of the endpoint.
    pub(crate) path: String,
    /// Record format: `json`, `otel1`, `otel07` or `cwlogs`.
    pub(crate) format: Format,
    /// Access key for this endpoint; `firehose.access_key` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) access_key: Option<String>,
    /// Region of log events that carry none; the delivery stream's region (from
    /// `X-Amz-Firehose-Source-Arn`) when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) region: Option<String>,
    /// Whether the endpoint is served.
    #[serde(default = "enabled")]
    pub(crate) enabled: bool,
}

/// Access keys are secrets: never printed.
impl std::fmt::Debug for FirehoseConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FirehoseConfig")
            .field(
                "access_key",
                &self.access_key.as_ref().map(|_| "<redacted>"),
            )
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_in_flight", &self.max_in_flight)
            .finish()
    }
}

impl std::fmt::Debug for SourceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceConfig")
            .field("path", &self.path)
            .field("format", &self.format)
            .field(
                "access_key",
                &self.access_key.as_ref().map(|_| "<redacted>"),
            )
            .field("region", &self.region)
            .field("enabled", &self.enabled)
            .finish()
    }
}

fn enabled() -> bool {
    true
}

fn builtin_sources() -> BTreeMap<String, SourceConfig> {
    [
        ("metrics", "/firehose/metrics", Format::MetricsJson),
        ("otel", "/firehose/otel", Format::Otel1),
        ("otel07", "/firehose/otel07", Format::Otel07),
        ("logs", "/firehose/logs", Format::CloudWatchLogs),
    ]
    .into_iter()
    .map(|(name, path, format)| {
        (
            name.to_string(),
            SourceConfig {
                path: path.into(),
                format,
                access_key: None,
                region: None,
                enabled: true,
            },
        )
    })
    .collect()
}

/// `[buffer]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct BufferConfig {
    /// Longest time data waits in the hot buffer before a lake commit.
    #[serde(with = "humantime_serde")]
    pub(crate) flush_interval: Duration,
    /// A flush starts early once this many rows (datapoints, log events, dead letters)
    /// are buffered.
    pub(crate) flush_rows: usize,
    /// Above this many buffered rows, Firehose requests get 503 and are retried.
    pub(crate) max_rows: usize,
    /// Above this many bytes in the hot buffer, Firehose requests get 503 (before their
    /// bodies are read) and Kinesis reading waits, until a flush frees the buffer.
    /// With `firehose.max_in_flight` × `firehose.max_body_bytes`, this is what bounds the
    /// service's memory. 0: a quarter of the memory the process may use (its cgroup's
    /// limit, else the machine's).
    pub(crate) max_bytes: u64,
}

/// `[wal]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct WalConfig {
    /// Directory of the log; defaults to `<data_dir>/wal`.
    pub(crate) dir: Option<PathBuf>,
    /// Size at which a segment is sealed, in bytes.
    pub(crate) segment_bytes: u64,
}

/// `[lake]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct LakeConfig {
    /// Directory holding the Delta tables; defaults to `<data_dir>/lake`.
    pub(crate) dir: Option<PathBuf>,
    /// Where the lake lives when not in a local directory: `s3://bucket/prefix`.
    /// Wins over `dir`.
    pub(crate) location: Option<String>,
    /// S3 endpoint override (tests, S3-compatible stores).
    pub(crate) endpoint_url: Option<String>,
    /// Region of the bucket (else the AWS configuration's).
    pub(crate) region: Option<String>,
    /// Further object_store / delta-rs storage options (`AWS_PROFILE`, ...).
    #[serde(deserialize_with = "scalar_strings")]
    pub(crate) storage_options: BTreeMap<String, String>,
    /// Parquet files are cut near this size, in bytes.
    pub(crate) target_file_bytes: u64,
    /// zstd compression level of the Parquet files (1-22).
    pub(crate) zstd_level: i32,
    /// Rows per Parquet row group: smaller groups prune finer and spread a scan over
    /// more cores; larger ones compress better.
    pub(crate) row_group_rows: usize,
    /// How often the service compacts the lake (rewrites day partitions of many small
    /// files into few sorted ones); 0s turns it off (`fleetlake compact` still works).
    #[serde(with = "humantime_serde")]
    pub(crate) compact_interval: Duration,
    /// A day partition is rewritten once it has this many data files.
    pub(crate) compact_min_files: usize,
    /// Files replaced by compaction are deleted once unreferenced for this long
    /// (readers of older versions keep working meanwhile).
    #[serde(with = "humantime_serde")]
    pub(crate) vacuum_grace: Duration,
    /// How often `metrics_5m` and `metrics_1h` roll up new `metrics` commits; 0s turns
    /// roll-ups off.
    #[serde(with = "humantime_serde")]
    pub(crate) rollup_interval: Duration,
}

/// `[query]`: limits of every SQL statement (HTTP and Postgres) and who may query.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct QueryConfig {
    /// Longest a statement may run, sending its results included ("0s": no limit).
    #[serde(with = "humantime_serde")]
    pub(crate) timeout: Duration,
    /// Bytes of memory a statement may hold (its operators, its results until sent,
    /// values of functions such as `repeat`); past it, sorts and joins spill or the
    /// statement fails alone (0: no limit).
    pub(crate) memory_limit: u64,
    /// Bytes of memory all clients' statements together may hold: one pool for the
    /// process, each statement's `memory_limit` inside it (0: no limit). Ingest has
    /// its own budget (`buffer.max_bytes`).
    pub(crate) memory_pool: u64,
    /// Clients' statements running at once; one more is refused at once (53300, 429).
    pub(crate) max_concurrent: usize,
    /// Statements one user may run at once.
    pub(crate) max_concurrent_per_user: usize,
    /// Longest statement text, in bytes (54001, 400 past it).
    pub(crate) max_statement_bytes: usize,
    /// Deepest expression: operators chained at one level plus levels of nesting.
    pub(crate) max_expression_depth: usize,
    /// Users (`[[query.users]]`: name, password and/or token, optional accounts). None
    /// configured: open access, for the loopback-only defaults.
    pub(crate) users: Vec<fleetlake_query::User>,
}

impl Default for QueryConfig {
    fn default() -> Self {
        let limits = fleetlake_query::QueryLimits::default();
        Self {
            timeout: limits.timeout.unwrap_or_default(),
            memory_limit: limits.memory_limit.unwrap_or_default() as u64,
            memory_pool: limits.memory_pool.unwrap_or_default() as u64,
            max_concurrent: limits.max_concurrent,
            max_concurrent_per_user: limits.max_concurrent_per_user,
            max_statement_bytes: limits.text.max_bytes,
            max_expression_depth: limits.text.max_depth,
            users: Vec::new(),
        }
    }
}

impl QueryConfig {
    /// The limits as the query engine takes them.
    pub(crate) fn limits(&self) -> fleetlake_query::QueryLimits {
        fleetlake_query::QueryLimits {
            memory_limit: (self.memory_limit > 0).then_some(self.memory_limit as usize),
            memory_pool: (self.memory_pool > 0).then_some(self.memory_pool as usize),
            timeout: (!self.timeout.is_zero()).then_some(self.timeout),
            max_concurrent: self.max_concurrent,
            max_concurrent_per_user: self.max_concurrent_per_user,
            text: fleetlake_query::TextLimits {
                max_bytes: self.max_statement_bytes,
                max_depth: self.max_expression_depth,
            },
        }
    }

    /// The users, checked.
    pub(crate) fn access(&self) -> anyhow::Result<fleetlake_query::Access> {
        Ok(fleetlake_query::Access::new(self.users.clone())?)
    }
}

/// `[retention]`: how long each table keeps its data ("0s": forever). Applied at each
/// compaction run, by whole day partitions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RetentionConfig {
    #[serde(with = "humantime_serde")]
    pub(crate) metrics: Duration,
    #[serde(with = "humantime_serde")]
    pub(crate) metrics_5m: Duration,
    #[serde(with = "humantime_serde")]
    pub(crate) metrics_1h: Duration,
    #[serde(with = "humantime_serde")]
    pub(crate) logs: Duration,
    #[serde(with = "humantime_serde")]
    pub(crate) dead_letters: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        let cloudwatch = fleetlake_aggregate::CompactionConfig::cloudwatch_retention();
        Self {
            metrics: cloudwatch["metrics"],
            metrics_5m: cloudwatch["metrics_5m"],
            metrics_1h: cloudwatch["metrics_1h"],
            logs: cloudwatch["logs"],
            dead_letters: cloudwatch["dead_letters"],
        }
    }
}

impl RetentionConfig {
    fn by_table(&self) -> BTreeMap<String, Duration> {
        [
            ("metrics", self.metrics),
            ("metrics_5m", self.metrics_5m),
            ("metrics_1h", self.metrics_1h),
            ("logs", self.logs),
            ("dead_letters", self.dead_letters),
        ]
        .into_iter()
        .filter(|(_, keep)| !keep.is_zero())
        .map(|(name, keep)| (name.to_string(), keep))
        .collect()
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("fleetlake-data"),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8088)),
            pg_addr: SocketAddr::from(([127, 0, 0, 1], 5433)),
            query: QueryConfig::default(),
            firehose: FirehoseConfig::default(),
            sources: builtin_sources(),
            buffer: BufferConfig::default(),
            wal: WalConfig::default(),
            lake: LakeConfig::default(),
            retention: RetentionConfig::default(),
            kinesis: Vec::new(),
            accounts: AccountsConfig::default(),
            alerting: fleetlake_alert_rules::AlertingConfig::default(),
            tls: None,
            gap_fill: GapFillConfig::default(),
        }
    }
}

impl Default for FirehoseConfig {
    fn default() -> Self {
        Self {
            access_key: None,
            max_body_bytes: fleetlake_ingest::firehose::DEFAULT_MAX_BODY_BYTES,
            max_in_flight: fleetlake_ingest::firehose::DEFAULT_MAX_IN_FLIGHT,
        }
    }
}

impl Default for BufferConfig {
    fn default() -> Self {
        Self {
            flush_interval: Duration::from_secs(30),
            flush_rows: 2_000_000,
            max_rows: 8_000_000,
            max_bytes: 0,
        }
    }
}

impl Default for WalConfig {
    fn default() -> Self {
        Self {
            dir: None,
            segment_bytes: 64 * 1024 * 1024,
        }
    }
}

impl Default for LakeConfig {
    fn default() -> Self {
        Self {
            dir: None,
            location: None,
            endpoint_url: None,
            region: None,
            storage_options: BTreeMap::new(),
            target_file_bytes: 256 * 1024 * 1024,
            zstd_level: 3,
            row_group_rows: fleetlake_aggregate::lake::DEFAULT_ROW_GROUP_ROWS,
            compact_interval: Duration::from_secs(600),
            compact_min_files: 8,
            vacuum_grace: Duration::from_secs(3600),
            rollup_interval: Duration::from_secs(60),
        }
    }
}

/// Values given on the command line; each overrides the file and the environment.
#[derive(Debug, Default, Serialize)]
pub(crate) struct Overrides {
    /// `--data-dir`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) data_dir: Option<PathBuf>,
    /// `--http-addr`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) http_addr: Option<SocketAddr>,
    /// `--pg-addr`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) pg_addr: Option<SocketAddr>,
}

impl Config {
    /// Loads the configuration: defaults, `file` if given, environment, `overrides`.
    pub(crate) fn load(file: Option<&Path>, overrides: &Overrides) -> anyhow::Result<Self> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.is_file() {
                bail!("config file {} does not exist", path.display());
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        let config: Config = figment
            .merge(
                Env::prefixed("FLEETLAKE_")
                    .split("__")
                    .ignore(&["config", "log"]),
            )
            .merge(Serialized::defaults(overrides))
            .extract()
            .map_err(|e| anyhow::anyhow!(describe_figment_error(e, file)))?;
        config.validate()?;
        Ok(config)
    }

    /// Parses a TOML document on top of the defaults (no environment), for checks.
    #[cfg(test)]
    pub(crate) fn from_toml(text: &str) -> anyhow::Result<Self> {
        let config: Config = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string(text))
            .extract()
            .map_err(|e| anyhow::anyhow!(describe_figment_error(e, None)))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> anyhow::Result<()> {
        for (index, user) in self.query.users.iter().enumerate() {
            for (key, secret) in [("password", &user.password), ("token", &user.token)] {
                if is_blank(secret) {
                    bail!(
                        "query.users[{index}] ({:?}): {key} is set but empty; an empty secret \
                         is no secret",
                        user.name
                    );
                }
            }
        }
        self.query.access()?;
        for (name, source) in &self.sources {
            if is_blank(&source.access_key) {
                bail!("sources.{name}.access_key is set but empty");
            }
        }
        let mut paths = BTreeMap::new();
        for (name, source) in self.enabled_sources() {
            if !source.path.starts_with('/') {
                bail!(
                    "sources.{name}.path must start with '/', got {:?}",
                    source.path
                );
            }
            if ["/health", "/ready", "/metrics"].contains(&source.path.as_str())
                || source.path.starts_with("/api/")
            {
                bail!(
                    "sources.{name}.path {:?} is taken by fleetlake itself",
                    source.path
                );
            }
            if let Some(other) = paths.insert(source.path.as_str(), name) {
                bail!(
                    "sources.{other} and sources.{name} both use path {:?}",
                    source.path
                );
            }
        }
        let query = &self.query;
        if query.max_concurrent == 0 || query.max_concurrent_per_user == 0 {
            bail!("query.max_concurrent and query.max_concurrent_per_user must be positive");
        }
        if query.max_statement_bytes == 0 || query.max_expression_depth == 0 {
            bail!("query.max_statement_bytes and query.max_expression_depth must be positive");
        }
        if query.memory_pool > 0 && query.memory_limit > query.memory_pool {
            bail!(
                "query.memory_limit ({}) is larger than query.memory_pool ({}): one statement \
                 could never use its limit",
                query.memory_limit,
                query.memory_pool
            );
        }
        if self.firehose.max_body_bytes == 0 {
            bail!("firehose.max_body_bytes must be positive");
        }
        if self.firehose.max_in_flight == 0 {
            bail!("firehose.max_in_flight must be positive");
        }
        if self.query.users.is_empty() {
            for (key, addr) in [("http_addr", self.http_addr), ("pg_addr", self.pg_addr)] {
                if !addr.ip().is_loopback() {
                    bail!(
                        "{key} {addr} is reachable from other hosts, but no [[query.users]] are \
                         configured: anyone there could read every account's data. Add users \
                         (name and password or token), or listen on 127.0.0.1"
                    );
                }
            }
        }
        if is_blank(&self.firehose.access_key) {
            bail!("firehose.access_key is set but empty");
        }
        if !self.http_addr.ip().is_loopback() {
            for (name, source) in self.enabled_sources() {
                if source.access_key.is_none() && self.firehose.access_key.is_none() {
                    bail!(
                        "http_addr {} is reachable from other hosts, but the Firehose endpoint \
                         {} (sources.{name}) has no access key: anyone there could write rows \
                         for any account. Set firehose.access_key (or sources.{name}.access_key), \
                         disable the source (sources.{name}.enabled = false), or listen on \
                         127.0.0.1",
                        self.http_addr,
                        source.path
                    );
                }
            }
        }
        if self.buffer.flush_interval.is_zero() {
            bail!("buffer.flush_interval must be positive");
        }
        if self.buffer.flush_rows == 0 || self.buffer.max_rows < self.buffer.flush_rows {
            bail!(
                "buffer.flush_rows ({}) must be positive and at most buffer.max_rows ({})",
                self.buffer.flush_rows,
                self.buffer.max_rows
            );
        }
        if self.lake.compact_min_files < 2 {
            bail!(
                "lake.compact_min_files must be at least 2, got {}",
                self.lake.compact_min_files
            );
        }
        if !(1..=22).contains(&self.lake.zstd_level) {
            bail!(
                "lake.zstd_level must be between 1 and 22, got {}",
                self.lake.zstd_level
            );
        }
        if self.lake.row_group_rows == 0 {
            bail!("lake.row_group_rows must be at least 1");
        }
        self.alerting.validate()?;
        self.gap_fill.validate()?;
        if self.accounts.reload_interval.is_zero() {
            bail!("accounts.reload_interval must be positive");
        }
        let mut streams = BTreeMap::new();
        for (index, kinesis) in self.kinesis.iter().enumerate() {
            let stream = kinesis.stream_config(index)?;
            if let Some(other) = streams.insert(stream.name.clone(), index) {
                bail!(
                    "kinesis[{other}] and kinesis[{index}] both read stream {:?}",
                    stream.name
                );
            }
        }
        Ok(())
    }

    /// The sources to serve, by name.
    pub(crate) fn enabled_sources(&self) -> impl Iterator<Item = (&str, &SourceConfig)> {
        self.sources
            .iter()
            .filter(|(_, s)| s.enabled)
            .map(|(name, s)| (name.as_str(), s))
    }

    /// Settings of the aggregate stage (WAL, hot buffer, lake).
    pub(crate) fn aggregate_config(&self) -> anyhow::Result<fleetlake_aggregate::AggregateConfig> {
        Ok(fleetlake_aggregate::AggregateConfig {
            wal_dir: self.wal_dir(),
            lake_location: self.lake_location()?,
            flush_interval: self.buffer.flush_interval,
            flush_rows: self.buffer.flush_rows,
            max_buffered_rows: self.buffer.max_rows,
            max_buffered_bytes: match self.buffer.max_bytes {
                0 => available_memory().map_or(4 << 30, |bytes| bytes / 4),
                bytes => bytes,
            } as usize,
            wal_segment_bytes: self.wal.segment_bytes,
            follow_interval: fleetlake_aggregate::FOLLOW_INTERVAL,
            lake: fleetlake_aggregate::lake::LakeOptions {
                target_file_bytes: self.lake.target_file_bytes,
                zstd_level: self.lake.zstd_level,
                row_group_rows: self.lake.row_group_rows,
            },
            compaction: (!self.lake.compact_interval.is_zero()).then_some({
                fleetlake_aggregate::CompactionConfig {
                    interval: self.lake.compact_interval,
                    min_files: self.lake.compact_min_files,
                    vacuum_grace: self.lake.vacuum_grace,
                    retention: self.retention.by_table(),
                }
            }),
            rollup_interval: (!self.lake.rollup_interval.is_zero())
                .then_some(self.lake.rollup_interval),
        })
    }

    /// Where the lake's Delta tables live.
    pub(crate) fn lake_location(&self) -> anyhow::Result<LakeLocation> {
        let mut options: std::collections::HashMap<String, String> = self
            .lake
            .storage_options
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if let Some(endpoint) = &self.lake.endpoint_url {
            options.insert("AWS_ENDPOINT_URL".into(), endpoint.clone());
            if endpoint.starts_with("http://") {
                options
                    .entry("AWS_ALLOW_HTTP".into())
                    .or_insert_with(|| "true".into());
            }
        }
        if let Some(region) = &self.lake.region {
            options.insert("AWS_REGION".into(), region.clone());
        }
        match &self.lake.location {
            Some(location) => LakeLocation::parse(location, options)
                .map_err(|e| anyhow::anyhow!("lake.location: {e}")),
            None => {
                let dir = self.lake_dir();
                LakeLocation::local(&dir)
                    .with_context(|| format!("lake directory {}", dir.display()))
            }
        }
    }

    /// Directory of the lake's Delta tables, when the lake is local.
    pub(crate) fn lake_dir(&self) -> PathBuf {
        self.lake
            .dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("lake"))
    }

    /// Directory of the write-ahead log.
    pub(crate) fn wal_dir(&self) -> PathBuf {
        self.wal
            .dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("wal"))
    }

    /// Makes sure the data directories exist.
    pub(crate) fn prepare_dirs(&self) -> anyhow::Result<()> {
        let lake_dir = self.lake.location.is_none().then(|| self.lake_dir());
        for dir in lake_dir.into_iter().chain([self.wal_dir()]) {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        Ok(())
    }
}

/// A secret that is set but empty (or only blanks): refused at start.
fn is_blank(secret: &Option<String>) -> bool {
    secret.as_deref().is_some_and(|s| s.trim().is_empty())
}

/// Keys whose values are secrets (or may hold one, as a webhook URL's token): never
/// repeated in an error message.
const SECRET_KEYS: [&str; 5] = ["access_key", "password", "token", "routing_key", "url"];

fn describe_figment_error(error: figment::Error, file: Option<&Path>) -> String {
    let mut lines = Vec::new();
    for e in error {
        let mut line = String::from("invalid configuration");
        if let Some(source) = &e.metadata.as_ref().and_then(|m| m.source.clone()) {
            line.push_str(&format!(" in {source}"));
        } else if let Some(path) = file {
            line.push_str(&format!(" in {}", path.display()));
        }
        if !e.path.is_empty() {
            line.push_str(&format!(" at key `{}`", e.path.join(".")));
        }
        // A bad value of a secret key is not repeated: the message names the key only.
        let secret = e
            .path
            .last()
            .is_some_and(|key| SECRET_KEYS.contains(&key.as_str()));
        match &e.kind {
            figment::error::Kind::InvalidType(_, expected)
            | figment::error::Kind::InvalidValue(_, expected)
                if secret =>
            {
                line.push_str(&format!(
                    ": expected {expected} (the value is a secret: not shown)"
                ));
            }
            _ if secret => line.push_str(": invalid value (the value is a secret: not shown)"),
            kind => line.push_str(&format!(": {kind}")),
        }
        lines.push(line);
    }
    lines.join("\n")
}

/// A table of option strings, whose values may also be written as numbers or booleans
/// (`max_retries = 3`; an environment variable `..._MAX_RETRIES=3` arrives as a number).
fn scalar_strings<'de, D>(deserializer: D) -> Result<BTreeMap<String, String>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        Text(String),
        Integer(i64),
        Float(f64),
        Flag(bool),
    }
    let table = BTreeMap::<String, Scalar>::deserialize(deserializer)?;
    Ok(table
        .into_iter()
        .map(|(key, value)| {
            let value = match value {
                Scalar::Text(text) => text,
                Scalar::Integer(n) => n.to_string(),
                Scalar::Float(x) => x.to_string(),
                Scalar::Flag(flag) => flag.to_string(),
            };
            (key, value)
        })
        .collect())
}

/// Memory the process may use: its cgroup's limit (v2 `memory.max`, v1
/// `memory.limit_in_bytes`) if one is set, else the machine's (`MemTotal`).
fn available_memory() -> Option<u64> {
    let cgroup = [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .filter_map(|path| std::fs::read_to_string(path).ok())
    .filter_map(|text| text.trim().parse::<u64>().ok())
    // v1 says "no limit" with a number near 2^63.
    .find(|bytes| *bytes < 1 << 60);
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        });
    match (cgroup, total) {
        (Some(limit), Some(total)) => Some(limit.min(total)),
        (limit, total) => limit.or(total),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_parses_and_says_something() {
        let text = include_str!("../config/fleetlake.example.toml");
        let config = Config::from_toml(text).unwrap();
        assert_eq!(
            config.firehose.access_key.as_deref(),
            Some("change-me-to-a-long-random-secret")
        );
        let names: Vec<_> = config.enabled_sources().map(|(n, _)| n).collect();
        assert_eq!(names, ["logs", "metrics", "otel", "prod-logs"]);
        let prod = &config.sources["prod-logs"];
        assert_eq!(prod.format, Format::CloudWatchLogs);
        assert_eq!(prod.region.as_deref(), Some("eu-west-1"));
        assert_eq!(config.sources["metrics"].path, "/firehose/metrics");
        assert_eq!(config.buffer.flush_interval, Duration::from_secs(30));
        assert!(config.gap_fill.enabled);
        assert_eq!(config.gap_fill.role_name.as_deref(), Some("fleetlake-read"));
        assert_eq!(config.lake_dir(), PathBuf::from("/var/lib/fleetlake/lake"));
        assert_eq!(config.wal_dir(), PathBuf::from("/var/lib/fleetlake/wal"));
        assert_eq!(config.kinesis.len(), 2);
        let logs = config.kinesis[1].stream_config(1).unwrap();
        assert_eq!(logs.name, "fleet-logs");
        assert_eq!(logs.format, Format::CloudWatchLogs);
        assert_eq!(config.kinesis[1].region().as_deref(), Some("eu-west-1"));
        assert_eq!(
            config.kinesis[0].stream_config(0).unwrap().max_records,
            10_000
        );
        assert_eq!(
            config.kinesis[0].lease_table.as_deref(),
            Some("fleetlake-leases")
        );
        assert_eq!(config.kinesis[1].lease_table, None);
        assert_eq!(
            config.accounts.file.as_deref(),
            Some(Path::new("/etc/fleetlake/accounts.jsonl"))
        );
        assert_eq!(config.alerting.receivers.len(), 4);
        assert_eq!(config.alerting.routes.len(), 3);
        assert_eq!(config.alerting.storm_accounts, Some(100));
        assert_eq!(config.alerting.silences.len(), 1);
    }

    #[test]
    fn kinesis_streams_are_checked() {
        use fleetlake_ingest::kinesis::StartPosition;
        let parse = |extra: &str| {
            Config::from_toml(&format!("[[kinesis]]\nstream = \"s\"\n{extra}"))
                .map_err(|e| e.to_string())
        };
        let config =
            parse("start_position = \"AT_TIMESTAMP\"\nstart_timestamp = \"2026-11-01T00:00:00Z\"")
                .unwrap();
        let stream = config.kinesis[0].stream_config(0).unwrap();
        assert_eq!(stream.start, StartPosition::AtTimestamp(1_793_491_200_000));
        assert_eq!(stream.format, Format::MetricsJson);
        assert_eq!(stream.idle_wait, Duration::from_secs(1));
        for (extra, message) in [
            ("start_position = \"EARLIEST\"", "kinesis[0].start_position"),
            (
                "start_position = \"AT_TIMESTAMP\"",
                "kinesis[0].start_timestamp is required",
            ),
            (
                "start_timestamp = \"2026-11-01T00:00:00Z\"",
                "only used with",
            ),
            ("max_records = 0", "kinesis[0].max_records"),
            ("format = \"xml\"", "unknown format"),
            ("[[kinesis]]\nstream = \"s\"", "both read stream \"s\""),
        ] {
            let err = parse(extra).unwrap_err();
            assert!(err.contains(message), "{extra}: {err}");
        }
        let err = Config::from_toml("[[kinesis]]\nstream = \"arn:aws:sqs:x\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("kinesis[0].stream"), "{err}");
    }

    #[test]
    fn defaults_listen_on_loopback_only() {
        let config = Config::default();
        assert!(config.http_addr.ip().is_loopback());
        config.validate().unwrap();
    }

    #[test]
    fn gap_fill_is_off_by_default_and_checked_when_on() {
        assert!(!Config::default().gap_fill.enabled);
        let err = Config::from_toml("[gap_fill]\nenabled = true")
            .unwrap_err()
            .to_string();
        assert!(err.contains("gap_fill.role_name is required"), "{err}");
        let err =
            Config::from_toml("[gap_fill]\nenabled = true\nrole_name = \"r\"\nperiod = \"45s\"")
                .unwrap_err()
                .to_string();
        assert!(err.contains("gap_fill: period 45s"), "{err}");
        let err = Config::from_toml(
            "[gap_fill]\nenabled = true\nrole_name = \"r\"\npercentiles = [\"p99\", \"q1\"]",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("percentile \"q1\""), "{err}");
        let config = Config::from_toml(
            "[gap_fill]\nenabled = true\nrole_name = \"fleetlake-read\"\nmin_gap = \"10m\"\npercentiles = [\"p99\"]",
        )
        .unwrap();
        assert_eq!(config.gap_fill.min_gap, Duration::from_secs(600));
        let plan = config.gap_fill.plan(90_000, 150_000).unwrap();
        assert_eq!((plan.start_ms, plan.end_ms), (60_000, 180_000));
    }

    #[test]
    fn other_hosts_need_sql_users() {
        let err = Config::from_toml("http_addr = \"0.0.0.0:8088\"")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("http_addr 0.0.0.0:8088 is reachable from other hosts"),
            "{err}"
        );
        let err = Config::from_toml("pg_addr = \"10.0.0.5:5433\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("no [[query.users]] are configured"), "{err}");
        Config::from_toml(
            "http_addr = \"0.0.0.0:8088\"\npg_addr = \"[::]:5433\"\n\
             [firehose]\naccess_key = \"fh-key\"\n\
             [[query.users]]\nname = \"grafana\"\npassword = \"a-long-secret\"",
        )
        .unwrap();
    }

    #[test]
    fn other_hosts_need_an_access_key_on_every_firehose_path() {
        let users = "[[query.users]]\nname = \"grafana\"\npassword = \"a-long-secret\"\n";
        let custom = "[sources.prod]\npath = \"/ingest/prod\"\nformat = \"json\"\n";
        let builtin = [
            ("logs", "/firehose/logs"),
            ("metrics", "/firehose/metrics"),
            ("otel", "/firehose/otel"),
            ("otel07", "/firehose/otel07"),
            ("prod", "/ingest/prod"),
        ];
        // Every source but one has its own key: the one without is named.
        for (open, path) in builtin {
            let config = |open_line: &str| {
                let mut text = String::from("http_addr = \"0.0.0.0:8088\"\n");
                for (name, _) in builtin {
                    text.push_str(if name == "prod" { custom } else { "" });
                    if name != "prod" {
                        text.push_str(&format!("[sources.{name}]\n"));
                    }
                    if name == open {
                        text.push_str(open_line);
                    } else {
                        text.push_str(&format!("access_key = \"key-{name}\"\n"));
                    }
                }
                text + users
            };
            let err = Config::from_toml(&config("")).unwrap_err().to_string();
            assert!(
                err.contains(&format!(
                    "the Firehose endpoint {path} (sources.{open}) has no access key"
                )) && err.contains("http_addr 0.0.0.0:8088 is reachable from other hosts"),
                "{open}: {err}"
            );
            // Disabled, it is not served: accepted.
            Config::from_toml(&config("enabled = false\n")).unwrap();
        }
        // One key for all, or none needed on loopback (pg_addr alone off loopback).
        Config::from_toml(&format!(
            "http_addr = \"[::]:8088\"\n{custom}[firehose]\naccess_key = \"k\"\n{users}"
        ))
        .unwrap();
        let err = Config::from_toml(&format!("http_addr = \"[::]:8088\"\n{users}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/firehose/logs (sources.logs)"), "{err}");
        Config::from_toml(&format!("pg_addr = \"0.0.0.0:5433\"\n{custom}{users}")).unwrap();
    }

    #[test]
    fn empty_secrets_are_refused() {
        let user = "[[query.users]]\nname = \"grafana\"\n";
        let hook = "[[alerting.receivers]]\nname = \"hook\"\ntype = \"webhook\"\n";
        let pd = "[[alerting.receivers]]\nname = \"pd\"\ntype = \"pagerduty\"\n";
        let key = "routing_key = \"0123456789abcdef0123456789abcdef\"\n";
        for (text, message) in [
            (
                format!("{user}password = \"\""),
                "query.users[0] (\"grafana\"): password is set but empty",
            ),
            (
                format!("{user}token = \"\""),
                "query.users[0] (\"grafana\"): token is set but empty",
            ),
            (
                format!("{user}password = \"pw\"\ntoken = \"  \""),
                "token is set but empty",
            ),
            (
                "[firehose]\naccess_key = \"\"".to_string(),
                "firehose.access_key is set but empty",
            ),
            (
                "[sources.metrics]\naccess_key = \"\"".to_string(),
                "sources.metrics.access_key is set but empty",
            ),
            (
                "[sources.x]\npath = \"/x\"\nformat = \"json\"\naccess_key = \"\"\nenabled = false"
                    .to_string(),
                "sources.x.access_key is set but empty",
            ),
            (format!("{hook}url = \"\""), "url is set but empty"),
            (format!("{pd}{key}url = \"\""), "url is set but empty"),
            (
                format!("{pd}routing_key = \"\""),
                "routing_key is set but empty",
            ),
            (
                format!("{hook}url = \"http://h/x\"\nrouting_key = \"\""),
                "routing_key is set but empty",
            ),
        ] {
            let err = Config::from_toml(&text).unwrap_err().to_string();
            assert!(err.contains(message), "{text}: {err}");
        }
        Config::from_toml(&format!("{user}token = \"t\"\n{pd}{key}")).unwrap();
    }

    #[test]
    fn a_bad_secret_value_is_not_repeated_in_the_error() {
        for (text, key) in [
            ("[firehose]\naccess_key = 86421357", "firehose.access_key"),
            (
                "[[query.users]]\nname = \"a\"\ntoken = 86421357",
                "query.users.0.token",
            ),
            (
                "[[alerting.receivers]]\nname = \"h\"\ntype = \"webhook\"\nurl = 86421357",
                "url",
            ),
        ] {
            let err = Config::from_toml(text).unwrap_err().to_string();
            assert!(!err.contains("86421357"), "{err}");
            assert!(err.contains(key) && err.contains("not shown"), "{err}");
        }
        // Other keys still say what they got.
        let err = Config::from_toml("[buffer]\nflush_rows = \"many\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("many"), "{err}");
    }

    #[test]
    fn secrets_are_not_printed() {
        let config = Config::from_toml(
            "[firehose]\naccess_key = \"fh-secret-1\"\n\
             [sources.prod]\npath = \"/p\"\nformat = \"json\"\naccess_key = \"fh-secret-2\"\n\
             [[query.users]]\nname = \"grafana\"\npassword = \"pw-secret\"\ntoken = \"tok-secret\"\n\
             [[alerting.receivers]]\nname = \"pd\"\ntype = \"pagerduty\"\n\
             routing_key = \"0123456789abcdef0123456789abcdef\"\n\
             [[alerting.receivers]]\nname = \"hook\"\ntype = \"webhook\"\n\
             url = \"https://bot:url-pw@hooks.example.com/T0/url-path-secret?token=url-tok\"",
        )
        .unwrap();
        let printed = format!("{config:?}");
        for secret in [
            "fh-secret-1",
            "fh-secret-2",
            "pw-secret",
            "tok-secret",
            "0123456789abcdef",
            "url-pw",
            "url-path-secret",
            "url-tok",
        ] {
            assert!(!printed.contains(secret), "{secret} in {printed}");
        }
        assert!(printed.contains("<redacted>"));
    }

    #[test]
    fn storage_options_take_numbers_and_flags() {
        let config = Config::from_toml(
            "[lake.storage_options]\nmax_retries = 2\nallow_http = true\ntimeout = \"5s\"",
        )
        .unwrap();
        let options: Vec<_> = config
            .lake
            .storage_options
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        assert_eq!(options, ["allow_http=true", "max_retries=2", "timeout=5s"]);
    }

    #[test]
    fn sources_are_checked() {
        let err = Config::from_toml("[sources.a]\npath = \"/firehose/metrics\"\nformat = \"json\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("both use path"), "{err}");
        let err = Config::from_toml("[sources.a]\npath = \"/x\"\nformat = \"xml\"")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("sources.a.format") && err.contains("unknown format"),
            "{err}"
        );
        let err = Config::from_toml("[sources.a]\npath = \"/x\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("format"), "{err}");
        let config = Config::from_toml("[sources.metrics]\naccess_key = \"k\"").unwrap();
        assert_eq!(config.sources["metrics"].format, Format::MetricsJson);
        assert_eq!(config.sources["metrics"].access_key.as_deref(), Some("k"));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors_that_name_the_key() {
        let err = Config::from_toml("flush_interval = \"1s\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("flush_interval"), "{err}");
        let err = Config::from_toml("[buffer]\nflush_interval = \"soon\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("buffer.flush_interval"), "{err}");
        let err = Config::from_toml("[buffer]\nflush_rows = 10\nmax_rows = 5")
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_rows"), "{err}");
    }
}
