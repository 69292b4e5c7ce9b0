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
use fleetlake_aggregate::lake::LakeOptions;
use fleetlake_aggregate::{AggregateConfig, Aggregator};
use fleetlake_ingest::firehose::{self, EndpointConfig};
use fleetlake_query::{HotData, QueryEngine};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

use crate::config::Config;

/// The aggregate stage's hot buffer, as the query stage sees it.
struct HotBuffer(Aggregator);

impl HotData for HotBuffer {
    fn snapshot(&self, table: &str, lake_version: Option<i64>) -> Vec<arrow::array::RecordBatch> {
        if table == fleetlake_ingest::schema::METRICS_TABLE {
            self.0.snapshot(lake_version)
        } else {
            Vec::new()
        }
    }
}

/// Delta kernel logs every snapshot load at info, and an expected "not a table yet" at
/// error; fleetlake reports the errors it gets back from it itself.
const DEFAULT_LOG_FILTER: &str = "info,buoyant_kernel=off,deltalake_core=warn";

/// Logs go to stderr; `FLEETLAKE_LOG` (or `RUST_LOG`) sets the filter, `info` by default.
pub(crate) fn init_tracing() {
    let filter = std::env::var("FLEETLAKE_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| DEFAULT_LOG_FILTER.into());
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

pub(crate) fn run(config: Config) -> anyhow::Result<()> {
    init_tracing();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("fleetlake")
        .build()
        .context("starting the async runtime")?
        .block_on(serve(config))
}

async fn serve(config: Config) -> anyhow::Result<()> {
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

    let lake_dir = config.lake_dir();
    let aggregator = Aggregator::open(AggregateConfig {
        wal_dir: config.wal_dir(),
        lake_dir: lake_dir.clone(),
        flush_interval: config.buffer.flush_interval,
        flush_rows: config.buffer.flush_rows,
        max_buffered_rows: config.buffer.max_rows,
        wal_segment_bytes: config.wal.segment_bytes,
        lake: LakeOptions {
            target_file_bytes: config.lake.target_file_bytes,
            zstd_level: config.lake.zstd_level,
        },
    })
    .await
    .context("opening the write-ahead log and the lake")?;

    let engine = Arc::new(QueryEngine::new(
        &lake_dir,
        Some(Arc::new(HotBuffer(aggregator.clone()))),
    ));
    let firehose = firehose::router(
        &config.firehose.path,
        EndpointConfig {
            source: "firehose_metrics".into(),
            access_key: config.firehose.access_key.clone(),
            max_body_bytes: config.firehose.max_body_bytes,
        },
        Arc::new(aggregator.clone()),
    );
    let app = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(move || render_metrics(prometheus.clone())))
        .merge(firehose)
        .merge(fleetlake_query::http::router(engine));

    let listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("binding {}", config.http_addr))?;
    let addr = listener.local_addr()?;
    info!(
        %addr,
        data_dir = %config.data_dir.display(),
        firehose = %config.firehose.path,
        access_key = config.firehose.access_key.is_some(),
        "http listening"
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("serving http")?;
    info!("shutting down: committing buffered data to the lake");
    if let Err(error) = aggregator.flush().await {
        warn!(%error, "final flush failed; the write-ahead log keeps the data for the next start");
    }
    Ok(())
}

async fn health() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        r#"{"status":"ok"}"#,
    )
}

async fn render_metrics(handle: PrometheusHandle) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle.render(),
    )
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}
