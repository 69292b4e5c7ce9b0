//! The ingest hot path stage by stage, on the load generator's fleet data, so that a
//! regression shows in the stage where it happens. Throughput in datapoints per
//! second (`Throughput::Elements`), one core.
//!
//! Per Firehose request of 10,000 datapoints (500 records of 20 datapoints; 500
//! accounts × 4 Lambda functions × 5 metrics, one minute):
//! - `decode_json`, `decode_otel1`: records → Arrow rows through the `Decoder` the
//!   endpoints use (no gzip or base64: `decode_aggregate` measures those);
//! - `arrow_build`: appending already-parsed datapoints to the metrics batch builder;
//! - `dedup_insert`: hot buffer insert (key hashing, de-duplication, watermarks);
//! - `wal_append`: Arrow IPC encoding of the rows, one WAL append and its fsync (one
//!   group commit per request).
//!
//! Per flush of 100,000 datapoints (5,000 accounts):
//! - `sort_for_lake`: the lake's row order;
//! - `parquet_encode`: the sorted rows → Parquet with the lake's writer properties
//!   (bytes per datapoint printed once).
//!
//! `cargo bench --bench stages`

#[path = "../src/bin/fleetlake-loadgen/fleet.rs"]
#[allow(dead_code, unreachable_pub)]
mod fleet;

use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use fleetlake_aggregate::buffer::HotBuffer;
use fleetlake_aggregate::lake::{DEFAULT_ROW_GROUP_ROWS, sort_for_lake, writer_properties};
use fleetlake_aggregate::wal::{Wal, encode_rows};
use fleetlake_ingest::metric_stream::{BaseStats, MetricsBatchBuilder, SeriesId};
use fleetlake_ingest::{Decoder, Format};
use fleetlake_model::Table;

use crate::fleet::{Fleet, METRICS};

const REQUEST: u64 = 10_000;
const FLUSH: u64 = 100_000;

fn fleet(accounts: usize) -> Fleet {
    Fleet::new(1, accounts, 4, 4, 1_700_000_040_000, 0, 0.0)
}

fn records(fleet: &Fleet, format: Format, n: u64) -> Vec<Vec<u8>> {
    (0..n)
        .step_by(20)
        .map(|s| match format {
            Format::Otel1 => fleet.otel_record(s..s + 20),
            _ => fleet.json_record(s..s + 20),
        })
        .collect()
}

fn decode(format: Format, records: &[Vec<u8>]) -> Vec<(Table, arrow::array::RecordBatch)> {
    let mut decoder = Decoder::new("bench", format, None);
    for (i, record) in records.iter().enumerate() {
        decoder.push_record(record, &i.to_string(), 0);
    }
    decoder.finish()
}

fn metrics_rows(rows: Vec<(Table, arrow::array::RecordBatch)>) -> arrow::array::RecordBatch {
    rows.into_iter()
        .find(|(t, _)| *t == Table::Metrics)
        .expect("metrics rows")
        .1
}

fn bench(c: &mut Criterion) {
    let small = fleet(500);
    let mut group = c.benchmark_group("stages");
    group.throughput(Throughput::Elements(REQUEST));

    for (name, format) in [
        ("decode_json", Format::MetricsJson),
        ("decode_otel1", Format::Otel1),
    ] {
        let input = records(&small, format, REQUEST);
        group.bench_function(name, |b| {
            b.iter(|| {
                let rows = decode(format, black_box(&input));
                assert_eq!(rows[0].1.num_rows(), REQUEST as usize);
                rows
            })
        });
    }

    let points: Vec<_> = (0..REQUEST).map(|g| small.datapoint(g)).collect();
    let functions: Vec<String> = (0..4).map(Fleet::function_name).collect();
    group.bench_function("arrow_build", |b| {
        b.iter(|| {
            let mut builder = MetricsBatchBuilder::new();
            for d in black_box(&points) {
                let (metric_name, unit) = METRICS[d.metric];
                builder
                    .append(
                        SeriesId {
                            account_id: small.account_id(d.account),
                            region: small.region(d.account),
                            namespace: "AWS/Lambda",
                            metric_name,
                        },
                        d.time_ms,
                        [("FunctionName", functions[d.function].as_str())],
                        Some(unit),
                        BaseStats {
                            count: Some(d.count),
                            sum: Some(d.sum),
                            min: Some(d.min),
                            max: Some(d.max),
                        },
                        d.p99.map(|p| ("p99", p)),
                    )
                    .unwrap();
            }
            builder.finish()
        })
    });

    let rows = decode(
        Format::MetricsJson,
        &records(&small, Format::MetricsJson, REQUEST),
    );
    let batch = metrics_rows(rows.clone());
    group.bench_function("dedup_insert", |b| {
        let mut seq = 0;
        b.iter_batched(
            || HotBuffer::new(Table::Metrics, None),
            |mut buffer| {
                seq += 1;
                let outcome = buffer.insert(seq, black_box(&batch));
                assert_eq!(outcome.visible, REQUEST as usize);
                buffer
            },
            BatchSize::SmallInput,
        )
    });

    let dir = tempfile::tempdir().unwrap();
    let (mut wal, _) = Wal::open(dir.path(), 64 << 20, 0).unwrap();
    group.bench_function("wal_append", |b| {
        b.iter(|| {
            let payload = encode_rows(black_box(&rows)).unwrap();
            wal.append(&payload).unwrap();
            wal.sync().unwrap();
        })
    });

    let big = fleet(5_000);
    let flush = metrics_rows(decode(
        Format::MetricsJson,
        &records(&big, Format::MetricsJson, FLUSH),
    ));
    group.throughput(Throughput::Elements(FLUSH));
    group.bench_function("sort_for_lake", |b| {
        b.iter(|| sort_for_lake(Table::Metrics, black_box(std::slice::from_ref(&flush))).unwrap())
    });
    let sorted = sort_for_lake(Table::Metrics, std::slice::from_ref(&flush)).unwrap();
    let lake_schema = {
        // The files do not store the partition column.
        let day = sorted.schema().index_of("day").unwrap();
        let keep: Vec<usize> = (0..sorted.num_columns()).filter(|&i| i != day).collect();
        sorted.project(&keep).unwrap()
    };
    let encode = |batch: &arrow::array::RecordBatch| {
        let mut out = Vec::new();
        let mut writer = parquet::arrow::ArrowWriter::try_new(
            &mut out,
            batch.schema(),
            Some(writer_properties(3, DEFAULT_ROW_GROUP_ROWS).unwrap()),
        )
        .unwrap();
        writer.write(batch).unwrap();
        writer.close().unwrap();
        out
    };
    eprintln!(
        "parquet_encode: {:.2} bytes per datapoint (one file of {FLUSH} sorted rows, zstd 3)",
        encode(&lake_schema).len() as f64 / FLUSH as f64
    );
    group.bench_function("parquet_encode", |b| {
        b.iter(|| encode(black_box(&lake_schema)))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
