//! `fleetlake serve`: builds the stages from the configuration and serves HTTP until
//! SIGTERM or Ctrl-C, then flushes the hot buffer to the lake.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use fleetlake_aggregate::Aggregator;
use fleetlake_ingest::firehose::{self, EndpointConfig};
use fleetlake_ingest::kinesis::{self, SdkKinesis};
use fleetlake_ingest::lease::{DynamoLeases, LeaseSettings};
use fleetlake_query::{HotData, QueryEngine};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

use crate::config::{Config, KinesisConfig};

/// The aggregate stage's hot buffer, as the query stage sees it.
struct HotBuffer(Aggregator);

impl HotData for HotBuffer {
    fn snapshot(
        &self,
        table: fleetlake_model::Table,
        lake_version: Option<i64>,
    ) -> Vec<arrow::array::RecordBatch> {
        self.0.snapshot(table, lake_version)
    }

    fn snapshot_settled(
        &self,
        table: fleetlake_model::Table,
        lake_version: Option<i64>,
    ) -> Option<Vec<arrow::array::RecordBatch>> {
        self.0.snapshot_settled(table, lake_version)
    }
}

/// Delta kernel logs every snapshot load at info, and an expected "not a table yet" at
/// error; fleetlake reports the errors it gets back from it itself.
const DEFAULT_LOG_FILTER: &str = "info,buoyant_kernel=off,deltalake_core=warn";

/// Logs go to stderr; `FLEETLAKE_LOG` (or `RUST_LOG`) sets the filter, `default`
/// otherwise.
pub(crate) fn init_tracing(default: &str) {
    let filter = std::env::var("FLEETLAKE_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| default.into());
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

pub(crate) fn run(config: Config) -> anyhow::Result<()> {
    init_tracing(DEFAULT_LOG_FILTER);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("fleetlake")
        // Room for the deepest expression a statement may have (query.max_expression_depth)
        // to be planned and evaluated: DataFusion recurses once per level.
        .thread_stack_size(fleetlake_query::WORKER_STACK_BYTES)
        .build()
        .context("starting the async runtime")?
        .block_on(serve(config))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    // Before anything is announced: a SIGTERM from then on shuts down gracefully.
    let shutdown = shutdown_signal().context("installing signal handlers")?;
    fleetlake_query::pg::check_randomness()?;
    config.prepare_dirs()?;
    let prometheus = PrometheusBuilder::new()
        .install_recorder()
        .context("installing the metrics recorder")?;
    fleetlake_ingest::metrics::describe();
    fleetlake_query::metrics::describe();
    let upkeep = prometheus.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });

    let lake = config.lake_location()?;
    let aggregator = Aggregator::open(config.aggregate_config()?)
        .await
        .context("opening the write-ahead log and the lake")?;

    let registry = crate::alerting::registry(&config)?;
    registry.watch(config.accounts.reload_interval);
    let engine = Arc::new(crate::alerting::with_alert_tables(
        QueryEngine::new(lake, Some(Arc::new(HotBuffer(aggregator.clone()))))
            .with_limits(config.query.limits()),
        &registry,
    ));
    let teams = registry.clone();
    let access = Arc::new(config.query.access()?.with_teams(Arc::new(
        move |wanted: &[String]| {
            teams
                .snapshot()
                .accounts()
                .filter(|a| a.get("owner_team").is_some_and(|t| wanted.contains(&t)))
                .map(|a| a.account_id.clone())
                .collect()
        },
    )));
    let consumers_running = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let checks = Arc::new(Checks {
        aggregator: aggregator.clone(),
        consumers_running: Arc::clone(&consumers_running),
        consumers_configured: config.kinesis.len(),
    });
    let ready_checks = Arc::clone(&checks);
    let mut app = Router::new()
        .route("/health", get(move || health(Arc::clone(&checks))))
        .route("/ready", get(move || ready(Arc::clone(&ready_checks))))
        .route("/metrics", get(move || render_metrics(prometheus.clone())))
        .merge(fleetlake_query::http::router(
            Arc::clone(&engine),
            Arc::clone(&access),
        ));
    // With the gap fill on, the sources' sinks note which minutes each account delivered.
    let coverage = config
        .gap_fill
        .enabled
        .then(fleetlake_ingest::gaps::Coverage::new);
    if let Some(coverage) = &coverage {
        crate::gapfill::seed(&engine, coverage, config.gap_fill.lookback).await;
    }
    // One sink for Firehose (rows) and Kinesis (rows with positions).
    let (sink, stream_sink): (
        Arc<dyn fleetlake_model::RowSink>,
        Arc<dyn fleetlake_model::sink::StreamSink>,
    ) = match &coverage {
        Some(coverage) => {
            let tracked = Arc::new(fleetlake_ingest::gaps::Tracked::new(
                Arc::new(aggregator.clone()),
                Arc::clone(coverage),
            ));
            (tracked.clone(), tracked)
        }
        None => {
            let plain = Arc::new(aggregator.clone());
            (plain.clone(), plain)
        }
    };
    let in_flight = Arc::new(tokio::sync::Semaphore::new(config.firehose.max_in_flight));
    for (name, source) in config.enabled_sources() {
        let access_key = source
            .access_key
            .clone()
            .or_else(|| config.firehose.access_key.clone());
        info!(
            source = name,
            path = %source.path,
            format = %source.format,
            access_key = access_key.is_some(),
            "firehose endpoint"
        );
        app = app.merge(firehose::router(
            &source.path,
            EndpointConfig {
                source: format!("firehose/{name}"),
                format: source.format,
                region: source.region.clone(),
                access_key,
                max_body_bytes: config.firehose.max_body_bytes,
                in_flight: Arc::clone(&in_flight),
            },
            Arc::clone(&sink),
        ));
    }

    let (stop_consumers, consumers_stop) = tokio::sync::watch::channel(false);
    let mut consumers = tokio::task::JoinSet::new();
    for (index, kinesis) in config.kinesis.iter().enumerate() {
        let stream = kinesis.stream_config(index)?;
        info!(
            stream = %stream.name,
            format = %stream.format,
            region = ?kinesis.region(),
            role = ?kinesis.role_arn,
            endpoint = ?kinesis.endpoint_url.as_deref().map(fleetlake_alert_rules::redact::url),
            "kinesis stream"
        );
        let base = aws_config_for(kinesis, kinesis.endpoint_url.as_deref()).await;
        let api = Arc::new(SdkKinesis::new(aws_sdk_kinesis::Client::new(&base)));
        let leases = match &kinesis.lease_table {
            Some(table) => {
                let dynamo = aws_config_for(kinesis, kinesis.lease_endpoint_url.as_deref()).await;
                let owner = instance_id();
                info!(stream = %stream.name, table, %owner, "sharing the stream through leases");
                Some(LeaseSettings {
                    store: Arc::new(DynamoLeases::new(
                        aws_sdk_dynamodb::Client::new(&dynamo),
                        table,
                    )),
                    owner,
                    duration: kinesis.lease_duration,
                })
            }
            None => None,
        };
        let sink = Arc::clone(&stream_sink);
        let stop = consumers_stop.clone();
        let running = Running::start(&consumers_running);
        consumers.spawn(async move {
            let _running = running;
            if let Err(lost) = kinesis::run_stream(stream, api, sink, leases, stop).await {
                // Fencing: what this instance buffered of that shard must not be
                // committed, since its new owner reads it again. Firehose data is safe
                // in the write-ahead log.
                error!(%lost, "exiting without a final commit");
                std::process::exit(3);
            }
        });
    }

    let (http_tls, pg_tls) = match &config.tls {
        Some(tls) => {
            use fleetlake_query::tls::{ALPN_HTTP1, ALPN_POSTGRES, server_config};
            let load = |alpn| {
                server_config(&tls.cert_file, &tls.key_file, &[alpn])
                    .context("loading the TLS certificate and key ([tls])")
            };
            (Some(load(ALPN_HTTP1)?), Some(load(ALPN_POSTGRES)?))
        }
        None => (None, None),
    };
    let pg_listener = tokio::net::TcpListener::bind(config.pg_addr)
        .await
        .with_context(|| format!("binding {} (postgres)", config.pg_addr))?;
    info!(
        addr = %pg_listener.local_addr()?,
        users = if access.is_open() { "open access" } else { "configured" },
        tls = pg_tls.is_some(),
        "postgres listening"
    );
    let pg = tokio::spawn(fleetlake_query::pg::serve(
        pg_listener,
        Arc::clone(&engine),
        Arc::clone(&access),
        pg_tls,
    ));

    let listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("binding {}", config.http_addr))?;
    let addr = listener.local_addr()?;

    let external_url = config.alerting.external_url.clone().unwrap_or_else(|| {
        let scheme = if http_tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{addr}")
    });
    // With a Kinesis lease table several instances share the lake: rule groups are
    // shared through leases in the same table.
    let alert_leases = match config.kinesis.iter().find(|k| k.lease_table.is_some()) {
        Some(kinesis) => {
            let dynamo = aws_config_for(kinesis, kinesis.lease_endpoint_url.as_deref()).await;
            Some(LeaseSettings {
                store: Arc::new(DynamoLeases::new(
                    aws_sdk_dynamodb::Client::new(&dynamo),
                    kinesis.lease_table.as_deref().unwrap_or_default(),
                )),
                owner: instance_id(),
                duration: kinesis.lease_duration,
            })
        }
        None => None,
    };
    if alert_leases.is_some()
        && !config.alerting.rule_files.is_empty()
        && config.alerting.incremental != Some(false)
    {
        // Several instances share the lake: incremental rules take in the rows the
        // others commit (and take back this one's rows they committed first).
        aggregator
            .follow_other_writers()
            .await
            .context("following other instances' commits to the lake")?;
    }
    let (alerting, alert_keeper) = crate::alerting::open(
        &config,
        Arc::clone(&engine),
        registry,
        external_url,
        Arc::new(aggregator.clone()),
        alert_leases,
    )?;
    info!(
        groups = alerting.groups().len(),
        rules = alerting
            .groups()
            .iter()
            .map(|g| g.rules.len())
            .sum::<usize>(),
        receivers = config.alerting.receivers.len(),
        "alerting"
    );
    let mut alert_tasks = alerting.start();
    if let Some(keeper) = alert_keeper {
        alert_tasks.spawn(keeper.run());
    }
    if let Some(coverage) = coverage {
        info!(
            role = ?config.gap_fill.role_name,
            min_gap = ?config.gap_fill.min_gap,
            settle = ?config.gap_fill.settle,
            "gap fill on"
        );
        alert_tasks.spawn(crate::gapfill::run_task(
            config.gap_fill.clone(),
            coverage,
            Arc::new(aggregator.clone()),
        ));
    }
    let app = app.merge(crate::alerting::router(alerting, Arc::clone(&access)));
    info!(
        %addr,
        tls = http_tls.is_some(),
        data_dir = %config.data_dir.display(),
        "http listening"
    );
    match http_tls {
        Some(tls) => axum::serve(fleetlake_query::tls::TlsListener::new(listener, tls), app)
            .with_graceful_shutdown(shutdown)
            .await
            .context("serving https")?,
        None => axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
            .context("serving http")?,
    }
    pg.abort();
    alert_tasks.abort_all();
    let _ = stop_consumers.send(true);
    while consumers.join_next().await.is_some() {}
    info!("shutting down: committing buffered data to the lake");
    if let Err(error) = aggregator.flush().await {
        warn!(%error, "final flush failed; the write-ahead log keeps the data for the next start");
    }
    Ok(())
}

/// The AWS configuration for one stream's clients: the standard chain, then the
/// stream's region and `endpoint`, then its role if it names one.
async fn aws_config_for(kinesis: &KinesisConfig, endpoint: Option<&str>) -> aws_config::SdkConfig {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if let Some(region) = kinesis.region() {
        loader = loader.region(aws_config::Region::new(region));
    }
    if let Some(url) = endpoint {
        loader = loader.endpoint_url(url);
    }
    let base = loader.load().await;
    match &kinesis.role_arn {
        Some(role) => {
            let provider = aws_config::sts::AssumeRoleProvider::builder(role)
                .session_name("fleetlake")
                .configure(&base)
                .build()
                .await;
            base.into_builder()
                .credentials_provider(aws_sdk_kinesis::config::SharedCredentialsProvider::new(
                    provider,
                ))
                .build()
        }
        None => base,
    }
}

/// This instance's name in lease tables: host, process and start time, so that a
/// restarted instance is a new owner and its old leases simply expire.
fn instance_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "fleetlake".into());
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    format!("{host}-{}-{started}", std::process::id())
}

/// What `/health` and `/ready` look at.
struct Checks {
    aggregator: Aggregator,
    consumers_running: Arc<std::sync::atomic::AtomicUsize>,
    consumers_configured: usize,
}

/// Counts a running Kinesis consumer while it lives.
struct Running(Arc<std::sync::atomic::AtomicUsize>);

impl Running {
    fn start(count: &Arc<std::sync::atomic::AtomicUsize>) -> Self {
        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Self(Arc::clone(count))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// How long `/ready` waits for the WAL directory and the lake's store.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

fn fault_json(fault: &Option<fleetlake_aggregate::Fault>) -> serde_json::Value {
    match fault {
        None => serde_json::json!({"ok": true}),
        Some(fault) => serde_json::json!({
            "ok": false,
            "error": fault.error,
            "since": humantime::format_rfc3339_seconds(fault.since).to_string(),
            "failures": fault.failures,
        }),
    }
}

fn check_response(ok: bool, checks: serde_json::Value) -> axum::response::Response {
    let status = if ok {
        axum::http::StatusCode::OK
    } else {
        axum::http::StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "status": if ok { "ok" } else { "unhealthy" },
        "checks": checks,
    });
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// Liveness: 503 while the write-ahead log or the lake fails (writes are refused
/// then), 200 otherwise.
async fn health(checks: Arc<Checks>) -> axum::response::Response {
    let health = checks.aggregator.health();
    let ok = health.wal.is_none() && health.lake.is_none();
    check_response(
        ok,
        serde_json::json!({
            "wal": fault_json(&health.wal),
            "lake": fault_json(&health.lake),
        }),
    )
}

/// Readiness: what `/health` checks, and the WAL directory takes a durable write, the
/// lake's store answers, every Kinesis consumer runs and the hot buffer has room.
async fn ready(checks: Arc<Checks>) -> axum::response::Response {
    let health = checks.aggregator.health();
    let probe = checks.aggregator.probe(PROBE_TIMEOUT).await;
    let running = checks
        .consumers_running
        .load(std::sync::atomic::Ordering::SeqCst);
    let sources_ok = running == checks.consumers_configured;
    let room = health.buffered_rows < health.max_buffered_rows;
    let ok = health.wal.is_none() && health.lake.is_none() && probe.is_ok() && sources_ok && room;
    check_response(
        ok,
        serde_json::json!({
            "wal": fault_json(&health.wal),
            "lake": fault_json(&health.lake),
            "probe": match &probe {
                Ok(()) => serde_json::json!({"ok": true}),
                Err(error) => serde_json::json!({"ok": false, "error": error}),
            },
            "kinesis": {
                "ok": sources_ok,
                "consumers_running": running,
                "consumers_configured": checks.consumers_configured,
            },
            "buffer": {
                "ok": room,
                "rows": health.buffered_rows,
                "max_rows": health.max_buffered_rows,
            },
        }),
    )
}

async fn render_metrics(handle: PrometheusHandle) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle.render(),
    )
}

/// Resolves at SIGTERM or SIGINT; the handlers are installed when this is called.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = interrupt.recv() => {}
        }
    })
}
