//! Decode + aggregate throughput of CloudWatch Metric Streams JSON delivered through
//! Firehose, in datapoints per second (`Throughput::Elements`).
//!
//! Stages measured on one Firehose request of 10,000 datapoints (500 records of 20
//! lines, as a delivery stream batches them): gunzip + envelope + base64 + JSON decode
//! into Arrow; the same plus insertion into the hot buffer (key hashing and
//! de-duplication); and the sort the lake writer applies before Parquet.
//!
//! `cargo bench --bench decode_aggregate`

use std::hint::black_box;
use std::io::{Read, Write};

use base64::Engine;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fleetlake_aggregate::buffer::HotBuffer;
use fleetlake_aggregate::lake::sort_for_lake;
use fleetlake_ingest::Format;
use fleetlake_ingest::firehose::{Decoded, decode_request};
use fleetlake_model::Table;

const DATAPOINTS: usize = 10_000;

/// A deterministic fleet slice: 500 accounts × 4 functions × 5 metrics, one minute.
fn request_body() -> Vec<u8> {
    let metrics = [
        "Invocations",
        "Errors",
        "Duration",
        "Throttles",
        "ConcurrentExecutions",
    ];
    let mut lines = Vec::with_capacity(DATAPOINTS);
    for account in 0..500u64 {
        for function in 0..4 {
            for (m, metric) in metrics.iter().enumerate() {
                let v = (account * 7 + function * 3 + m as u64) % 100;
                lines.push(format!(
                    r#"{{"metric_stream_name":"fleet","account_id":"{:012}","region":"us-east-1","namespace":"AWS/Lambda","metric_name":"{metric}","dimensions":{{"FunctionName":"fn-{function}"}},"timestamp":1700000040000,"value":{{"count":{v}.0,"sum":{}.5,"max":{v}.0,"min":0.0,"p99":{v}.0}},"unit":"Count"}}"#,
                    100_000_000_000 + account,
                    v * 3
                ));
            }
        }
    }
    let records: Vec<_> = lines
        .chunks(20)
        .map(|c| {
            serde_json::json!({"data": base64::engine::general_purpose::STANDARD.encode(c.join("\n"))})
        })
        .collect();
    let body = serde_json::json!({"requestId": "bench", "timestamp": 1, "records": records});
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
    gz.write_all(body.to_string().as_bytes()).unwrap();
    gz.finish().unwrap()
}

fn gunzip(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(body)
        .read_to_end(&mut out)
        .unwrap();
    out
}

fn decode(body: &[u8]) -> Decoded {
    decode_request(body, "bench", Format::MetricsJson, None, "bench").unwrap()
}

fn bench(c: &mut Criterion) {
    let gz = request_body();
    let mut group = c.benchmark_group("metric_stream_json");
    group.throughput(Throughput::Elements(DATAPOINTS as u64));
    group.bench_function("gunzip_decode", |b| {
        b.iter(|| {
            let decoded = decode(&gunzip(black_box(&gz)));
            assert_eq!(decoded.stats.datapoints, DATAPOINTS);
            decoded
        })
    });
    group.bench_function("gunzip_decode_buffer", |b| {
        let mut seq = 0;
        b.iter_batched(
            || HotBuffer::new(Table::Metrics, None),
            |mut buffer| {
                seq += 1;
                let decoded = decode(&gunzip(black_box(&gz)));
                let outcome = buffer.insert(seq, &decoded.rows[0].1);
                assert_eq!(outcome.visible, DATAPOINTS);
                buffer
            },
            criterion::BatchSize::SmallInput,
        )
    });
    let batch = decode(&gunzip(&gz)).rows.remove(0).1;
    group.bench_function("sort_for_lake", |b| {
        b.iter(|| sort_for_lake(Table::Metrics, black_box(std::slice::from_ref(&batch))).unwrap())
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
