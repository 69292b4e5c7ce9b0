//! Decoding throughput per format, on one core: OpenTelemetry 1.0 and 0.7 metric
//! streams and KPL-aggregated JSON in datapoints per second, CloudWatch Logs
//! subscription payloads in log events per second (`Throughput::Elements`).
//!
//! The OpenTelemetry and KPL inputs are the producer-made fixtures of
//! `tests/fixtures/formats/` repeated into Firehose-sized records; the CloudWatch Logs
//! input is generated in the documented shape (gzip level 6, 100 events a record).
//!
//! `cargo bench --bench decode_formats`

use std::hint::black_box;
use std::io::Write;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fleetlake_ingest::{Decoder, Format};

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/fixtures/formats/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

/// Decodes `records` of `format` (through the KPL layer) and checks the row count.
fn decode(format: Format, records: &[Vec<u8>], expected: usize) {
    let mut decoder = Decoder::new("bench", format, Some("us-east-1"));
    for record in records {
        decoder.push_kinesis_record(black_box(record), "bench", 0);
    }
    let stats = decoder.stats();
    assert_eq!(stats.datapoints + stats.log_events, expected);
    assert_eq!(stats.dead_letters, 0);
    black_box(decoder.finish());
}

/// CloudWatch Logs records: `records` gzip payloads of 100 Lambda-like events each.
fn log_records(records: usize) -> Vec<Vec<u8>> {
    (0..records)
        .map(|r| {
            let events: Vec<_> = (0..100)
                .map(|e| {
                    serde_json::json!({
                        "id": format!("{:056}", r * 100 + e),
                        "timestamp": 1_764_000_000_000i64 + (r * 100 + e) as i64,
                        "message": format!(
                            "{{\"level\":\"info\",\"requestId\":\"{r:08x}-{e:04x}\",\"msg\":\"order processed\",\"durationMs\":{},\"items\":{}}}\n",
                            e * 3 % 250,
                            e % 7
                        ),
                    })
                })
                .collect();
            let payload = serde_json::json!({
                "messageType": "DATA_MESSAGE",
                "owner": format!("{:012}", 100_000_000_000u64 + r as u64),
                "logGroup": "/aws/lambda/checkout",
                "logStream": "2025/11/24/[$LATEST]0123456789abcdef",
                "subscriptionFilters": ["fleet"],
                "logEvents": events,
            });
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
            gz.write_all(payload.to_string().as_bytes()).unwrap();
            gz.finish().unwrap()
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    // 250 copies of the 2-message fixture: 1,000 datapoints in a ~330 KB record.
    for (name, format, file) in [
        ("otel_1_0", Format::Otel1, "otel10.bin"),
        ("otel_0_7", Format::Otel07, "otel07.bin"),
    ] {
        let record = fixture(file).repeat(250);
        let records = vec![record; 10];
        group.throughput(Throughput::Elements(10_000));
        group.bench_function(name, |b| b.iter(|| decode(format, &records, 10_000)));
    }
    // KPL aggregates of 3 metric-stream JSON lines each.
    let records = vec![fixture("kpl_metrics.bin"); 3_000];
    group.throughput(Throughput::Elements(9_000));
    group.bench_function("kpl_json", |b| {
        b.iter(|| decode(Format::MetricsJson, &records, 9_000))
    });
    let records = log_records(100);
    group.throughput(Throughput::Elements(10_000));
    group.bench_function("cloudwatch_logs", |b| {
        b.iter(|| decode(Format::CloudWatchLogs, &records, 10_000))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
