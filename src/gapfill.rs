//! The service's gap fill (`[gap_fill]`, off by default): holes in what the metric
//! streams delivered, found by [`fleetlake_ingest::gaps::Coverage`] as data arrives,
//! are fetched from CloudWatch with GetMetricData in the account they belong to (the
//! role `gap_fill.role_name` assumed there) and written through the aggregate stage
//! like streamed rows. What did arrive after all is dropped by the lake's
//! de-duplication, so a fill never double counts.
//!
//! At start, before any source runs, each account's newest minute in the lake (and in
//! the write-ahead log replayed) is marked, so that a stop of fleetlake longer than its
//! senders retried shows as a hole once the accounts deliver again.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arrow::array::{AsArray, Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Int64Type};
use fleetlake_ingest::cloudwatch::{self as cw, Counters, Limits, Target};
use fleetlake_ingest::gaps::{Coverage, Hole};
use fleetlake_model::Clock;
use fleetlake_model::RowSink;
use fleetlake_query::{Principal, QueryEngine};
use futures::StreamExt;
use tracing::{info, warn};

use crate::backfill::rfc3339;
use crate::config::GapFillConfig;

/// Holes handled, by `outcome` (`filled`, `retrying`, `failed`).
pub(crate) const HOLES: &str = "fleetlake_gap_fill_holes_total";
/// Minutes of holes handled, by `outcome`.
pub(crate) const MINUTES: &str = "fleetlake_gap_fill_minutes_total";
/// (account, region) pairs whose delivered minutes are tracked.
pub(crate) const TRACKED: &str = "fleetlake_gap_fill_tracked_accounts";

/// Attempts at one hole before it is given up (logged and counted as failed).
const MAX_ATTEMPTS: u32 = 5;
/// How far before the lake's newest time an account must have delivered to be
/// marked at start.
const SEED_WINDOW_MS: i64 = 15 * 60_000;
/// Longest wait for the lake at start.
const SEED_TIMEOUT: Duration = Duration::from_secs(60);

/// Marks, for each account and region, its newest minute within [`SEED_WINDOW_MS`]
/// before the newest time in the lake and the hot buffer. To be called before any
/// source runs: the newest time must be from before this start. Bounded by
/// [`SEED_TIMEOUT`]; a failure only means a hole across this restart is not found.
pub(crate) async fn seed(engine: &QueryEngine, coverage: &Coverage, lookback: Duration) {
    match tokio::time::timeout(SEED_TIMEOUT, seed_from_lake(engine, coverage, lookback)).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            warn!(%error, "gap fill: could not read the accounts' last minutes from the lake");
        }
        Err(_) => warn!(
            "gap fill: reading the accounts' last minutes from the lake took over {SEED_TIMEOUT:?}; skipped"
        ),
    }
}

async fn seed_from_lake(
    engine: &QueryEngine,
    coverage: &Coverage,
    lookback: Duration,
) -> anyhow::Result<()> {
    let principal = Principal::unrestricted("gap-fill");
    let newest = engine
        .run(
            "SELECT CAST(max(time) AS BIGINT) AS t FROM metrics",
            &principal,
        )
        .await?;
    let newest = match newest.batches.iter().find(|b| b.num_rows() > 0) {
        Some(batch) => int64s(batch, 0)?.iter().next().flatten(),
        None => None,
    };
    let Some(newest) = newest.map(|us| us / 1000) else {
        return Ok(());
    };
    let from = (newest - SEED_WINDOW_MS)
        .max(fleetlake_model::clock::SystemClock.now_ms() - lookback.as_millis() as i64);
    let sql = format!(
        "SELECT account_id, region, CAST(max(time) AS BIGINT) AS t FROM metrics \
         WHERE time >= to_timestamp_millis({from}) GROUP BY account_id, region"
    );
    let output = engine.run(&sql, &principal).await?;
    let mut marked = 0;
    for batch in &output.batches {
        // Strings come as views or plain, depending on the plan.
        let text = |i: usize| arrow::compute::cast(batch.column(i), &DataType::Utf8);
        let (accounts, regions) = (text(0)?, text(1)?);
        let (Some(accounts), Some(regions)) = (
            accounts.as_string_opt::<i32>(),
            regions.as_string_opt::<i32>(),
        ) else {
            anyhow::bail!("unexpected column types: {:?}", batch.schema());
        };
        let times = int64s(batch, 2)?;
        for row in 0..batch.num_rows() {
            coverage.mark(
                accounts.value(row),
                regions.value(row),
                times.value(row) / 1000,
            );
            marked += 1;
        }
    }
    info!(
        accounts = marked,
        "gap fill: marked the accounts' last minutes in the lake"
    );
    Ok(())
}

/// Column `index` of `batch` as BIGINTs (times cast to epoch µs in the SQL).
fn int64s(batch: &RecordBatch, index: usize) -> anyhow::Result<&Int64Array> {
    batch
        .column(index)
        .as_primitive_opt::<Int64Type>()
        .with_context(|| format!("unexpected column type: {:?}", batch.schema()))
}

/// The gap fill, to run as a task: looks for holes in `coverage` every
/// `check_interval` and fetches them into `sink`; runs until aborted.
pub(crate) async fn run_task(
    config: GapFillConfig,
    coverage: Arc<Coverage>,
    sink: Arc<dyn RowSink>,
) {
    metrics::describe_counter!(HOLES, "Holes in the metric streams handled, by outcome");
    metrics::describe_counter!(MINUTES, "Minutes of holes handled, by outcome");
    metrics::describe_gauge!(
        TRACKED,
        "(account, region) pairs whose delivered minutes the gap fill tracks"
    );
    let base = crate::backfill::base_config(None, config.endpoint_url.as_deref()).await;
    let limits = Limits {
        calls_per_second: config.max_calls_per_second,
        datapoints_per_second: config.max_datapoints_per_second,
        ..Limits::default()
    };
    let mut retries: Vec<(Hole, u32)> = Vec::new();
    let mut ticks = tokio::time::interval(config.check_interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let ms = |d: Duration| d.as_millis() as i64;
        let now = fleetlake_model::clock::SystemClock.now_ms();
        let mut work: Vec<(Hole, u32)> = coverage
            .holes(
                now,
                ms(config.min_gap),
                ms(config.settle),
                ms(config.lookback),
            )
            .into_iter()
            .map(|h| (h, 0))
            .collect();
        metrics::gauge!(TRACKED).set(coverage.len() as f64);
        work.append(&mut retries);
        if work.is_empty() {
            continue;
        }
        let results: Vec<((Hole, u32), Result<u64, String>)> = futures::stream::iter(work)
            .map(|(hole, attempts)| {
                let (config, base, limits, sink) = (&config, &base, &limits, &sink);
                async move {
                    let result = fill(config, base, limits, sink.as_ref(), &hole).await;
                    ((hole, attempts + 1), result)
                }
            })
            .buffer_unordered(config.concurrency)
            .collect()
            .await;
        for ((hole, attempts), result) in results {
            let minutes = ((hole.end_ms - hole.start_ms) / 60_000) as u64;
            let outcome = match &result {
                Ok(rows) => {
                    info!(
                        account = %hole.account_id,
                        region = %hole.region,
                        from = %rfc3339(hole.start_ms),
                        to = %rfc3339(hole.end_ms),
                        rows,
                        "gap fill: hole fetched from CloudWatch"
                    );
                    "filled"
                }
                Err(error) if attempts < MAX_ATTEMPTS => {
                    warn!(account = %hole.account_id, region = %hole.region, attempts, %error,
                        "gap fill: fetching a hole failed; trying again at the next check");
                    retries.push((hole.clone(), attempts));
                    "retrying"
                }
                Err(error) => {
                    warn!(account = %hole.account_id, region = %hole.region, attempts, %error,
                        from = %rfc3339(hole.start_ms), to = %rfc3339(hole.end_ms),
                        "gap fill: giving up on a hole; `fleetlake backfill cloudwatch` can fetch it");
                    "failed"
                }
            };
            metrics::counter!(HOLES, "outcome" => outcome).increment(1);
            metrics::counter!(MINUTES, "outcome" => outcome).increment(minutes);
        }
    }
}

/// Fetches one hole; the rows written.
async fn fill(
    config: &GapFillConfig,
    base: &aws_config::SdkConfig,
    limits: &Limits,
    sink: &dyn RowSink,
    hole: &Hole,
) -> Result<u64, String> {
    let plan = config.plan(hole.start_ms, hole.end_ms)?;
    let target = Target {
        client: crate::backfill::cloudwatch_client(
            base,
            &hole.account_id,
            &hole.region,
            config.role_name.as_deref(),
        )
        .await,
        account_id: hole.account_id.clone(),
        region: hole.region.clone(),
    };
    let counters = Counters::default();
    cw::backfill_account(&target, &plan, limits, None, sink, &counters, &|_, _| {})
        .await
        .map_err(|e| e.to_string())?;
    Ok(Counters::get(&counters.rows))
}
