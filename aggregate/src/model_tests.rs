//! Property test of de-duplication and roll-ups against a simple model: datapoints
//! delivered in any order, redelivered any number of times, with flushes, roll-up runs
//! and compactions in between, end as one row per datapoint in `metrics` (the first
//! delivery) and as exact count/sum/min/max (max for percentiles) per series and
//! bucket in `metrics_5m` and `metrics_1h`.

use std::collections::BTreeMap;
use std::time::Duration;

use datafusion::prelude::SessionContext;
use fleetlake_ingest::{Decoder, Format};
use fleetlake_model::{RowSink, Table};
use proptest::prelude::*;

use crate::lake::{LakeOptions, TableLake};
use crate::location::LakeLocation;
use crate::rollup::{Roller, Rollup, rollup_sql};
use crate::{AggregateConfig, Aggregator};

/// One datapoint: account 0..3, metric 0..2, minute 0..150, value.
type Point = (u8, u8, i64, u32);

#[derive(Debug, Clone)]
enum Step {
    /// Deliver these points (indexes into the set, modulo its size), as one write.
    Deliver(Vec<usize>),
    /// Deliver every point (the last step, so each is delivered at least once).
    DeliverAll,
    Flush,
    Roll,
    Compact,
}

const BASE_MS: i64 = 1_764_028_800_000;

fn line(p: &Point) -> String {
    let v = p.3 as f64;
    format!(
        r#"{{"account_id":"{:012}","region":"eu-west-1","namespace":"AWS/Lambda","metric_name":"m{}","dimensions":{{"FunctionName":"f"}},"timestamp":{},"value":{{"count":2.0,"sum":{},"max":{},"min":{},"p99":{}}},"unit":"Count"}}"#,
        p.0,
        p.1,
        BASE_MS + p.2 * 60_000,
        v * 2.0,
        v,
        v / 2.0,
        v + 1.0
    )
}

/// (account, metric, bucket start s) -> (count, sum, min, max, p99).
type Rolled = BTreeMap<(String, String, i64), (f64, f64, f64, f64, f64)>;

fn model(points: &[Point], width_s: i64) -> Rolled {
    let mut rolled = Rolled::new();
    for p in points {
        let t = (BASE_MS + p.2 * 60_000) / 1000;
        let v = p.3 as f64;
        let e = rolled
            .entry((format!("{:012}", p.0), format!("m{}", p.1), t - t % width_s))
            .or_insert((0.0, 0.0, f64::MAX, f64::MIN, f64::MIN));
        e.0 += 2.0;
        e.1 += v * 2.0;
        e.2 = e.2.min(v / 2.0);
        e.3 = e.3.max(v);
        e.4 = e.4.max(v + 1.0);
    }
    rolled
}

async fn rolled_from(ctx: &SessionContext, sql: &str) -> Rolled {
    use arrow::array::AsArray;
    use arrow::datatypes::{Float64Type, Int64Type};
    let frame = ctx
        .sql(&format!(
            "SELECT account_id, metric_name, CAST(to_unixtime(time) AS BIGINT) AS t, count, sum, \
             min, max, stats['p99'] AS p99 FROM ({sql})"
        ))
        .await
        .unwrap();
    let mut rolled = Rolled::new();
    for b in frame.collect().await.unwrap() {
        let text = |i: usize, row: usize| -> String {
            let c = arrow::compute::cast(b.column(i), &arrow::datatypes::DataType::Utf8).unwrap();
            c.as_string::<i32>().value(row).to_string()
        };
        let f = |i: usize, row: usize| b.column(i).as_primitive::<Float64Type>().value(row);
        for row in 0..b.num_rows() {
            let key = (
                text(0, row),
                text(1, row),
                b.column(2).as_primitive::<Int64Type>().value(row),
            );
            let old = rolled.insert(key, (f(3, row), f(4, row), f(5, row), f(6, row), f(7, row)));
            assert!(old.is_none(), "two rows for one series and bucket");
        }
    }
    rolled
}

async fn run(points: Vec<Point>, steps: Vec<Step>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let lake = LakeLocation::local(&dir.path().join("lake")).unwrap();
    let options = LakeOptions::default();
    let aggregator = Aggregator::open(AggregateConfig::manual(
        dir.path().join("wal"),
        lake.clone(),
    ))
    .await
    .unwrap();
    let mut roller = Roller::open(lake.clone(), options.clone()).await.unwrap();
    let deliver = |indexes: Vec<usize>| {
        let mut decoder = Decoder::new("test", Format::MetricsJson, None);
        let body: Vec<String> = indexes.iter().map(|&i| line(&points[i])).collect();
        decoder.push_record(body.join("\n").as_bytes(), "0", 0);
        decoder.finish()
    };
    let all: Vec<usize> = (0..points.len()).collect();
    for step in steps
        .into_iter()
        .chain([Step::DeliverAll, Step::Flush, Step::Roll])
    {
        match step {
            Step::DeliverAll => aggregator.write(deliver(all.clone())).await.unwrap(),
            Step::Deliver(picks) => {
                let indexes = picks.iter().map(|i| i % points.len()).collect();
                aggregator.write(deliver(indexes)).await.unwrap()
            }
            Step::Flush => aggregator.flush().await.unwrap(),
            Step::Roll => {
                roller.roll().await.unwrap();
            }
            Step::Compact => {
                let mut metrics =
                    TableLake::open_or_create(&lake, Table::Metrics, options.clone(), "compact")
                        .await
                        .unwrap();
                metrics.compact(2, Duration::from_secs(3600)).await.unwrap();
                for rollup in Rollup::ALL {
                    let mut table = TableLake::open_rollup(&lake, rollup, options.clone())
                        .await
                        .unwrap();
                    table.compact(2, Duration::from_secs(3600)).await.unwrap();
                }
            }
        }
    }

    let ctx = SessionContext::new();
    crate::rollup::register(&ctx);
    for name in ["metrics", "metrics_5m", "metrics_1h"] {
        let table = lake.open(name).await.unwrap().unwrap();
        table.update_datafusion_session(&ctx.state()).unwrap();
        ctx.register_table(name, table.table_provider().await.unwrap())
            .unwrap();
    }
    // Every datapoint once, with its own values.
    prop_assert_eq!(
        rolled_from(&ctx, "SELECT * FROM metrics").await,
        model(&points, 60)
    );
    prop_assert_eq!(
        rolled_from(&ctx, &rollup_sql("metrics_5m", Rollup::FiveMinutes)).await,
        model(&points, 300)
    );
    prop_assert_eq!(
        rolled_from(&ctx, &rollup_sql("metrics_1h", Rollup::OneHour)).await,
        model(&points, 3600)
    );
    Ok(())
}

fn points() -> impl Strategy<Value = Vec<Point>> {
    prop::collection::btree_map((0u8..3, 0u8..2, 0i64..150), 0u32..1000, 1..40)
        .prop_map(|m| m.into_iter().map(|((a, b, c), v)| (a, b, c, v)).collect())
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec(
        prop_oneof![
            4 => prop::collection::vec(0usize..1000, 1..20).prop_map(Step::Deliver),
            3 => Just(Step::Flush),
            2 => Just(Step::Roll),
            2 => Just(Step::Compact),
        ],
        0..16,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn deduplication_and_rollups_match_the_model(points in points(), steps in steps()) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(run(points, steps))?;
    }
}

/// The sequence where a roll-up could count rows twice: a roll-up, then compaction
/// rewriting rolled-up files, then another roll-up; and a redelivery after a flush.
#[test]
fn compaction_between_rollups_counts_nothing_twice() {
    let points: Vec<Point> = (0..30)
        .map(|i| ((i % 3) as u8, (i % 2) as u8, i as i64 * 7, i))
        .collect();
    let steps = vec![
        Step::Deliver((0..15).collect()),
        Step::Flush,
        Step::Roll,
        Step::DeliverAll,
        Step::Flush,
        Step::Compact,
        Step::Roll,
        Step::Compact,
        Step::Roll,
    ];
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(run(points, steps))
        .unwrap();
}

/// A flush larger than DataFusion's batch size keeps the lake's row order in its file
/// (delta-rs' write plan once dealt 8,192-row slices over the machine's cores and
/// wrote them back in arrival order), cut in row groups of the configured size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushed_files_keep_the_lake_sort_order() {
    use arrow::array::AsArray;
    let dir = tempfile::tempdir().unwrap();
    let lake = LakeLocation::local(&dir.path().join("lake")).unwrap();
    let options = LakeOptions {
        row_group_rows: 16_384,
        ..LakeOptions::default()
    };
    let mut table = TableLake::open_or_create(&lake, Table::Metrics, options, "t")
        .await
        .unwrap();
    // 10,000 accounts × 8 minutes, delivered minute by minute: far from sorted. The
    // runtime has two workers, as the service's does on two cores.
    let mut decoder = Decoder::new("test", Format::MetricsJson, None);
    for minute in 0..8 {
        let lines: Vec<String> = (0..10_000).map(|a| line(&(0, 0, minute, a))).collect();
        let lines: Vec<String> = lines
            .iter()
            .enumerate()
            .map(|(a, l)| l.replacen("\"000000000000\"", &format!("\"{:012}\"", 9_999 - a), 1))
            .collect();
        decoder.push_record(lines.join("\n").as_bytes(), "0", 0);
    }
    let rows: Vec<_> = decoder.finish().into_iter().map(|(_, b)| b).collect();
    let sorted = crate::lake::sort_for_lake(Table::Metrics, &rows).unwrap();
    assert_eq!(sorted.num_rows(), 80_000);
    table
        .append(vec![sorted], None, None, None, None)
        .await
        .unwrap();
    let files: Vec<String> = table.file_uris().unwrap();
    assert_eq!(files.len(), 1);
    let path = files[0].strip_prefix("file://").unwrap_or(&files[0]);
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
        std::fs::File::open(path).unwrap(),
    )
    .unwrap();
    let groups: Vec<i64> = reader
        .metadata()
        .row_groups()
        .iter()
        .map(|g| g.num_rows())
        .collect();
    assert_eq!(groups, [16_384, 16_384, 16_384, 16_384, 14_464]);
    let reader = reader.build().unwrap();
    let mut keys = Vec::new();
    for batch in reader {
        let batch = batch.unwrap();
        let account = batch.column_by_name("account_id").unwrap();
        let time = batch.column_by_name("time").unwrap();
        let time = time.as_primitive::<arrow::datatypes::TimestampMicrosecondType>();
        for i in 0..batch.num_rows() {
            keys.push((
                account.as_string_view_opt().map_or_else(
                    || account.as_string::<i32>().value(i).to_string(),
                    |a| a.value(i).to_string(),
                ),
                time.value(i),
            ));
        }
    }
    assert_eq!(keys.len(), 80_000);
    let breaks = keys.windows(2).filter(|w| w[0] > w[1]).count();
    assert_eq!(breaks, 0, "rows out of the lake's order");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    /// `sort_for_lake` orders metrics rows from several batches by account_id,
    /// namespace, metric_name, dimensions, region, time, and keeps every row once.
    #[test]
    fn metrics_rows_sort_in_lake_order(
        rows in proptest::collection::vec(
            (0u8..5, 0u8..2, 0u8..3, 0u8..3, 0u8..2, 0i64..4, 0u32..1000),
            1..300,
        ),
        cut in 1usize..4,
    ) {
        use arrow::array::AsArray;
        let line = |r: &(u8, u8, u8, u8, u8, i64, u32)| {
            let dims = match r.3 {
                0 => r#"{}"#.to_string(),
                1 => r#"{"FunctionName":"f"}"#.to_string(),
                _ => r#"{"FunctionName":"f","Resource":"f:1"}"#.to_string(),
            };
            format!(
                r#"{{"account_id":"{:012}","region":"{}","namespace":"AWS/N{}","metric_name":"m{}","dimensions":{dims},"timestamp":{},"value":{{"count":1.0,"sum":{},"max":1.0,"min":1.0}},"unit":"Count"}}"#,
                r.0, ["eu-west-1", "us-east-1"][r.4 as usize], r.1, r.2, BASE_MS + r.5 * 60_000, r.6
            )
        };
        let batches: Vec<_> = rows
            .chunks(rows.len().div_ceil(cut))
            .map(|chunk| {
                let mut decoder = Decoder::new("test", Format::MetricsJson, None);
                let text: Vec<String> = chunk.iter().map(line).collect();
                decoder.push_record(text.join("\n").as_bytes(), "0", 0);
                decoder.finish().remove(0).1
            })
            .collect();
        // The packed key, and the per-column ranks used when they do not fit one.
        for sorted in [
            crate::lake::sort_for_lake(Table::Metrics, &batches).unwrap(),
            crate::lake::sort_metrics_packing(&batches, 0).unwrap(),
        ] {
        prop_assert_eq!(sorted.num_rows(), rows.len());
        let s = |i: usize| sorted.column(i).as_string::<i32>();
        let dims = sorted.column(fleetlake_model::schema::col::DIMENSIONS).as_map();
        let time = sorted
            .column(fleetlake_model::schema::col::TIME)
            .as_primitive::<arrow::datatypes::TimestampMicrosecondType>();
        let key = |i: usize| {
            let d: Vec<(String, String)> = (dims.value_offsets()[i] as usize
                ..dims.value_offsets()[i + 1] as usize)
                .map(|e| {
                    (
                        dims.keys().as_string::<i32>().value(e).to_string(),
                        dims.values().as_string::<i32>().value(e).to_string(),
                    )
                })
                .collect();
            (
                s(fleetlake_model::schema::col::ACCOUNT_ID).value(i).to_string(),
                s(fleetlake_model::schema::col::NAMESPACE).value(i).to_string(),
                s(fleetlake_model::schema::col::METRIC_NAME).value(i).to_string(),
                d,
                s(fleetlake_model::schema::col::REGION).value(i).to_string(),
                time.value(i),
            )
        };
        for i in 1..sorted.num_rows() {
            prop_assert!(key(i - 1) <= key(i), "row {} before row {}", i - 1, i);
        }
        let sum = |b: &arrow::array::RecordBatch| -> f64 {
            b.column(fleetlake_model::schema::col::SUM)
                .as_primitive::<arrow::datatypes::Float64Type>()
                .values()
                .iter()
                .sum()
        };
        let before: f64 = batches.iter().map(sum).sum();
        prop_assert_eq!(sum(&sorted), before);
        }
    }
}

/// Row identity ([`fleetlake_model::keys`]) of decoded rows.
mod keys {
    use fleetlake_ingest::metric_stream::MetricsBatchBuilder;
    use fleetlake_model::Table;
    use fleetlake_model::keys::{RowKey, row_keys};

    fn keys(lines: &str) -> Vec<RowKey> {
        let mut b = MetricsBatchBuilder::new();
        assert!(b.push_record(lines.as_bytes()).is_empty());
        row_keys(Table::Metrics, &b.finish())
    }

    fn line(account: &str, dims: &str, ts: i64, sum: f64, unit: &str) -> String {
        format!(
            r#"{{"account_id":"{account}","region":"us-east-1","namespace":"AWS/Lambda","metric_name":"Errors","dimensions":{dims},"timestamp":{ts},"value":{{"count":1,"sum":{sum},"min":0,"max":1}},"unit":"{unit}"}}"#
        )
    }

    #[test]
    fn key_ignores_values_and_unit_but_not_identity() {
        let k = keys(
            &[
                line("1", r#"{"FunctionName":"a"}"#, 60_000, 1.0, "Count"),
                line("1", r#"{"FunctionName":"a"}"#, 60_000, 9.0, "None"),
                line("1", r#"{"FunctionName":"a"}"#, 120_000, 1.0, "Count"),
                line("1", r#"{"FunctionName":"b"}"#, 60_000, 1.0, "Count"),
                line("2", r#"{"FunctionName":"a"}"#, 60_000, 1.0, "Count"),
                line("1", r#"{"Function":"Namea"}"#, 60_000, 1.0, "Count"),
            ]
            .join("\n"),
        );
        assert_eq!(k[0], k[1]);
        assert_eq!(k[0].series, k[2].series);
        assert_ne!(k[0].point, k[2].point);
        for other in &k[3..] {
            assert_ne!(k[0].series, other.series);
        }
    }

    #[test]
    fn dimension_order_on_the_wire_does_not_matter() {
        let k = keys(
            &[
                line("1", r#"{"A":"1","B":"2"}"#, 60_000, 1.0, "Count"),
                line("1", r#"{"B":"2","A":"1"}"#, 60_000, 1.0, "Count"),
            ]
            .join("\n"),
        );
        assert_eq!(k[0], k[1]);
    }
}
