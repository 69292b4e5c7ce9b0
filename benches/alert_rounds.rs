//! One round of fleet alert rules, incremental against a scan of the lake, in the same
//! run: `cargo bench --bench alert_rounds`.
//!
//! A fleet of `FLEETLAKE_BENCH_ACCOUNTS` accounts (default 6,000) ×
//! `FLEETLAKE_BENCH_FUNCTIONS` Lambda functions (default 2) × 25 metrics (7 functions:
//! 1.05 M series), one datapoint a minute each, `FLEETLAKE_BENCH_MINUTES` minutes (default
//! 10; the last minute stays in the hot buffer, the rest is flushed to the lake). Rules
//! of the shipped kinds (a sum over a threshold, an errors/invocations ratio, a maximum,
//! an account that stopped reporting a metric) over the 25 metrics: 100 rules are one
//! of each kind per metric, 1,000 are ten thresholds of each.
//!
//! Reported (median of `FLEETLAKE_BENCH_ROUNDS` rounds, default 3): a round of 100 rules
//! scanning (each rule's SQL over the lake and the hot buffer, as before incremental
//! evaluation), a round of 100 and of 1,000 rules from partial aggregates, starting the
//! 1,000 rules' leaves from the lake, folding one more minute of the fleet into them
//! (median of `FLEETLAKE_BENCH_FOLDS` minutes, default 3), and the bytes the partials
//! hold.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use fleetlake_aggregate::location::LakeLocation;
use fleetlake_aggregate::{AggregateConfig, Aggregator};
use fleetlake_ingest::metric_stream::MetricsBatchBuilder;
use fleetlake_model::{RowSink, Table};
use fleetlake_query::engine::HotData;
use fleetlake_query::incremental::Incremental;
use fleetlake_query::{Principal, QueryEngine};

const METRICS: usize = 25;
/// A minute boundary.
const START_MS: i64 = 1_767_608_400_000;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Hot(Aggregator);

impl HotData for Hot {
    fn snapshot(&self, table: Table, lake_version: Option<i64>) -> Vec<RecordBatch> {
        self.0.snapshot(table, lake_version)
    }
}

/// Minute `minute` of the fleet, in batches of about 10,000 datapoints.
fn minute(accounts: usize, functions: usize, minute: i64) -> Vec<RecordBatch> {
    let mut out = Vec::new();
    let mut b = MetricsBatchBuilder::new();
    let mut n = 0;
    let time = START_MS + minute * 60_000;
    for account in 0..accounts {
        // Every 50th account stops reporting metric 0 after the first minutes.
        for function in 0..functions {
            for metric in 0..METRICS {
                if metric == 0 && account % 50 == 0 && minute > 2 {
                    continue;
                }
                let value = (account * 7 + function * 3 + metric + minute as usize) % 20;
                let line = format!(
                    r#"{{"account_id":"{:012}","region":"eu-west-1","namespace":"Bench","metric_name":"M{metric}","dimensions":{{"FunctionName":"f{function}"}},"timestamp":{time},"value":{{"count":1,"sum":{value},"min":{value},"max":{value}}},"unit":"Count"}}"#,
                    account + 1
                );
                b.push_record(line.as_bytes());
                n += 1;
                if n % 10_000 == 0 {
                    out.push(std::mem::replace(&mut b, MetricsBatchBuilder::new()).finish());
                }
            }
        }
    }
    out.push(b.finish());
    out
}

/// The rules: `per_kind` thresholds of each kind on each metric.
fn rules(per_kind: usize) -> Vec<String> {
    let mut out = Vec::new();
    for m in 0..METRICS {
        let next = (m + 1) % METRICS;
        for t in 0..per_kind {
            out.push(format!(
                "SELECT account_id, region, dimensions['FunctionName'] AS function, sum(sum) AS value \
                 FROM metrics WHERE namespace = 'Bench' AND metric_name = 'M{m}' \
                   AND time > now() - INTERVAL '5 minutes' \
                 GROUP BY account_id, region, dimensions['FunctionName'] HAVING sum(sum) > {}",
                80 + t
            ));
            out.push(format!(
                "SELECT account_id, function, errors / invocations AS value FROM ( \
                   SELECT account_id, dimensions['FunctionName'] AS function, \
                          sum(CASE WHEN metric_name = 'M{m}' THEN sum END) AS errors, \
                          sum(CASE WHEN metric_name = 'M{next}' THEN sum END) AS invocations \
                   FROM metrics WHERE namespace = 'Bench' AND metric_name IN ('M{m}', 'M{next}') \
                     AND time > now() - INTERVAL '5 minutes' \
                   GROUP BY account_id, dimensions['FunctionName']) \
                 WHERE invocations > 0 AND errors / invocations > {}",
                1.5 + t as f64 / 10.0
            ));
            out.push(format!(
                "SELECT account_id, dimensions['FunctionName'] AS function, max(max) AS value \
                 FROM metrics WHERE namespace = 'Bench' AND metric_name = 'M{m}' \
                   AND time > now() - INTERVAL '10 minutes' \
                 GROUP BY account_id, dimensions['FunctionName'] HAVING max(max) > {}",
                17 + t
            ));
            out.push(format!(
                "SELECT account_id, extract(epoch FROM now()) - extract(epoch FROM max(time)) AS value \
                 FROM metrics WHERE namespace = 'Bench' AND metric_name = 'M{m}' \
                   AND time > now() - INTERVAL '1 hour' \
                 GROUP BY account_id HAVING max(time) < now() - INTERVAL '{} minutes'",
                3 + t
            ));
        }
    }
    out
}

fn median(mut runs: Vec<Duration>) -> Duration {
    runs.sort();
    runs[runs.len() / 2]
}

async fn round_scanning(engine: &QueryEngine, rules: &[String], at: i64) -> (Duration, usize) {
    let started = Instant::now();
    let principal = Principal::unrestricted("bench");
    let mut rows = 0;
    for sql in rules {
        let out = engine.run_at(sql, &principal, at).await.expect("rule runs");
        rows += out.batches.iter().map(RecordBatch::num_rows).sum::<usize>();
    }
    (started.elapsed(), rows)
}

async fn round_incremental(inc: &Incremental, rules: &[String], at: i64) -> (Duration, usize) {
    let started = Instant::now();
    let mut rows = 0;
    for sql in rules {
        let out = inc
            .run(sql, at)
            .await
            .expect("rule runs")
            .expect("rule is incremental");
        rows += out.iter().map(RecordBatch::num_rows).sum::<usize>();
    }
    (started.elapsed(), rows)
}

async fn bench() {
    let accounts = env("FLEETLAKE_BENCH_ACCOUNTS", 6_000);
    let functions = env("FLEETLAKE_BENCH_FUNCTIONS", 2);
    let series = accounts * functions * METRICS;
    let minutes = env("FLEETLAKE_BENCH_MINUTES", 10) as i64;
    let rounds = env("FLEETLAKE_BENCH_ROUNDS", 3);
    let dir = tempfile::tempdir().expect("temp dir");
    let lake = LakeLocation::local(&dir.path().join("lake")).expect("lake");
    let aggregator = Aggregator::open(AggregateConfig::manual(
        dir.path().join("wal"),
        lake.clone(),
    ))
    .await
    .expect("aggregator");
    let started = Instant::now();
    let mut datapoints = 0;
    for m in 0..minutes {
        for batch in minute(accounts, functions, m) {
            datapoints += batch.num_rows();
            aggregator
                .write(vec![(Table::Metrics, batch)])
                .await
                .expect("write");
        }
        if m + 2 == minutes {
            aggregator.flush().await.expect("flush");
        }
    }
    eprintln!(
        "fleet: {accounts} accounts, {series} series, {datapoints} datapoints over {minutes} minutes, written in {:?}",
        started.elapsed()
    );
    let engine = Arc::new(QueryEngine::new(
        lake,
        Some(Arc::new(Hot(aggregator.clone()))),
    ));
    let at = START_MS + minutes * 60_000;
    let few = rules(1);
    let many = rules(10);

    let inc = Incremental::new(Arc::clone(&engine), Arc::new(aggregator.clone()));
    let started = Instant::now();
    let refs: Vec<&str> = many.iter().map(String::as_str).collect();
    inc.prepare(&refs, at).await.expect("prepare");
    let prepare = started.elapsed();
    let (bytes, leaves) = inc.footprint().await;

    let mut scanned = Vec::new();
    let mut inc_few = Vec::new();
    let mut inc_many = Vec::new();
    let mut rows = (0, 0);
    for r in 0..rounds {
        let at = at + r as i64 * 1000;
        let (t, n) = round_scanning(&engine, &few, at).await;
        scanned.push(t);
        rows.0 = n;
        let (t, n) = round_incremental(&inc, &few, at).await;
        inc_few.push(t);
        rows.1 = n;
        inc_many.push(round_incremental(&inc, &many, at).await.0);
    }
    assert_eq!(rows.0, rows.1, "both paths find the same instances");
    // More minutes of the fleet, each folded by the next round.
    let folds = env("FLEETLAKE_BENCH_FOLDS", 3);
    eprintln!("folding {folds} more minutes");
    let mut fold_and_round = Vec::new();
    let mut round_after = Vec::new();
    for f in 0..folds {
        for batch in minute(accounts, functions, minutes + f as i64) {
            aggregator
                .write(vec![(Table::Metrics, batch)])
                .await
                .expect("write");
        }
        let next = at + (f as i64 + 1) * 60_000;
        fold_and_round.push(round_incremental(&inc, &many[..1], next).await.0);
        round_after.push(round_incremental(&inc, &many, next).await.0);
    }
    let fold_and_round = median(fold_and_round);
    let round_after = median(round_after);

    let s = median(scanned);
    let f = median(inc_few);
    let m = median(inc_many);
    println!(
        "{accounts} accounts, {series} series, {datapoints} datapoints over {minutes} minutes\n"
    );
    println!("| measure | time |");
    println!("|---|---|");
    println!("| 100 rules, scanning (before) | {s:.2?} |");
    println!("| 100 rules, incremental | {f:.2?} |");
    println!("| 1,000 rules, incremental | {m:.2?} |");
    println!(
        "| scanning / incremental, 100 rules | {:.1}× |",
        s.as_secs_f64() / f.as_secs_f64()
    );
    println!("| start 1,000 rules' leaves from the lake | {prepare:.2?} |");
    println!("| fold one more minute of the fleet + 1 rule | {fold_and_round:.2?} |");
    println!("| 1,000 rules after that minute | {round_after:.2?} |");
    println!(
        "| partials held: {leaves} leaves | {:.1} MiB ({:.1} KiB per rule of 1,000; {:.0} bytes per leaf and series) |",
        bytes as f64 / (1 << 20) as f64,
        bytes as f64 / 1024.0 / many.len() as f64,
        bytes as f64 / leaves.max(1) as f64 / series as f64
    );
    println!("instances found per round (100 rules): {}", rows.0);
}

fn main() {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(bench());
}
