//! Kinesis consumer throughput per instance, in records and datapoints per second.
//!
//! The real consumer (`fleetlake_ingest::kinesis::run_stream`: shard discovery,
//! GetRecords loops, KPL de-aggregation, Metric Streams JSON decoding) reads 4 shards of
//! an in-memory stream and hands its rows to the hot buffer (key hashing and
//! de-duplication, as the aggregate stage does). Kinesis itself is not in the loop: a
//! real shard serves at most 2 MiB/s and 5 GetRecords calls/s, so this is the ceiling
//! one instance puts on top of what the stream delivers.
//!
//! `cargo bench --bench kinesis_consume`

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::RecordBatch;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use fleetlake_aggregate::buffer::HotBuffer;
use fleetlake_ingest::Format;
use fleetlake_ingest::kinesis::{
    ApiError, IteratorFrom, KinesisApi, Record, RecordsPage, Shard, ShardsPage, StartPosition,
    StreamConfig, run_stream,
};
use fleetlake_model::Table;
use fleetlake_model::sink::{SinkError, StreamSink};
use futures::future::BoxFuture;
use tokio::sync::{Notify, watch};

const SHARDS: usize = 4;
const RECORDS_PER_SHARD: usize = 500;
const LINES_PER_RECORD: usize = 20;
const DATAPOINTS: usize = SHARDS * RECORDS_PER_SHARD * LINES_PER_RECORD;

fn line(account: usize, function: usize, minute: usize) -> String {
    let v = (account * 7 + function * 3 + minute) % 100;
    format!(
        r#"{{"metric_stream_name":"fleet","account_id":"{:012}","region":"us-east-1","namespace":"AWS/Lambda","metric_name":"Invocations","dimensions":{{"FunctionName":"fn-{function}"}},"timestamp":{},"value":{{"count":{v}.0,"sum":{}.5,"max":{v}.0,"min":0.0,"p99":{v}.0}},"unit":"Count"}}"#,
        100_000_000_000 + account,
        1_700_000_040_000 + minute as i64 * 60_000,
        v * 3
    )
}

/// KPL aggregate of `lines` (magic, protobuf AggregatedRecord, MD5), as the KPL makes.
fn kpl(lines: &[String]) -> Vec<u8> {
    use md5::Digest;
    use prost::Message;
    #[derive(Clone, PartialEq, prost::Message)]
    struct Aggregated {
        #[prost(string, repeated, tag = "1")]
        partition_key_table: Vec<String>,
        #[prost(message, repeated, tag = "3")]
        records: Vec<UserRecord>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct UserRecord {
        #[prost(uint64, required, tag = "1")]
        partition_key_index: u64,
        #[prost(bytes = "vec", required, tag = "3")]
        data: Vec<u8>,
    }
    let body = Aggregated {
        partition_key_table: vec!["pk".into()],
        records: lines
            .iter()
            .map(|l| UserRecord {
                partition_key_index: 0,
                data: l.clone().into_bytes(),
            })
            .collect(),
    }
    .encode_to_vec();
    let mut out = vec![0xF3, 0x89, 0x9A, 0xC2];
    out.extend_from_slice(&body);
    out.extend_from_slice(&md5::Md5::digest(&body));
    out
}

/// Shards of records; each record holds 20 datapoints, as lines or as a KPL aggregate.
fn stream(aggregated: bool) -> Vec<Vec<Record>> {
    (0..SHARDS)
        .map(|shard| {
            (0..RECORDS_PER_SHARD)
                .map(|r| {
                    let account = shard * RECORDS_PER_SHARD + r;
                    let lines: Vec<String> = (0..LINES_PER_RECORD)
                        .map(|i| line(account, i % 4, i / 4))
                        .collect();
                    Record {
                        sequence_number: format!("{}", 10_000_000 + r),
                        data: if aggregated {
                            kpl(&lines)
                        } else {
                            lines.join("\n").into_bytes()
                        },
                        arrival_ms: 1_700_000_100_000,
                    }
                })
                .collect()
        })
        .collect()
}

struct MemoryKinesis {
    shards: Vec<Vec<Record>>,
}

impl KinesisApi for MemoryKinesis {
    fn list_shards<'a>(
        &'a self,
        _stream: &'a StreamConfig,
        _next_token: Option<String>,
    ) -> BoxFuture<'a, Result<ShardsPage, ApiError>> {
        let shards = (0..self.shards.len())
            .map(|i| Shard {
                id: format!("shardId-{i:012}"),
                parent: None,
                adjacent_parent: None,
            })
            .collect();
        Box::pin(async move {
            Ok(ShardsPage {
                shards,
                next_token: None,
            })
        })
    }

    fn shard_iterator<'a>(
        &'a self,
        _stream: &'a StreamConfig,
        shard_id: &'a str,
        _from: IteratorFrom,
    ) -> BoxFuture<'a, Result<String, ApiError>> {
        Box::pin(async move { Ok(format!("{shard_id}:0")) })
    }

    fn get_records<'a>(
        &'a self,
        _stream: &'a StreamConfig,
        iterator: &'a str,
        limit: i32,
    ) -> BoxFuture<'a, Result<RecordsPage, ApiError>> {
        let (id, at) = iterator.split_once(':').expect("our iterator");
        let shard = &self.shards[id["shardId-".len()..].parse::<usize>().expect("index")];
        let at: usize = at.parse().expect("offset");
        let end = (at + limit as usize).min(shard.len());
        let page = RecordsPage {
            records: shard[at..end].to_vec(),
            next_iterator: Some(format!("{id}:{end}")),
            millis_behind: Some(0),
        };
        Box::pin(async move { Ok(page) })
    }
}

/// The hot buffer's insert (hashing, de-duplication) behind the stream seam; tells when
/// all datapoints arrived.
struct BufferSink {
    buffer: Mutex<HotBuffer>,
    rows: AtomicUsize,
    all_in: Notify,
}

impl StreamSink for BufferSink {
    fn write_positioned(
        &self,
        rows: Vec<(Table, RecordBatch)>,
        _positions: Vec<(String, String)>,
    ) -> BoxFuture<'_, Result<(), SinkError>> {
        let mut inserted = 0;
        {
            let mut buffer = self.buffer.lock().expect("buffer");
            for (_, batch) in &rows {
                let outcome = buffer.insert(1, batch);
                inserted += outcome.visible + outcome.suspects;
            }
        }
        if self.rows.fetch_add(inserted, Ordering::SeqCst) + inserted >= DATAPOINTS {
            self.all_in.notify_one();
        }
        Box::pin(async { Ok(()) })
    }

    fn committed_positions(&self) -> Vec<(Table, BTreeMap<String, String>)> {
        Vec::new()
    }

    fn read_positions(
        &self,
        _keys: Vec<String>,
    ) -> BoxFuture<'_, fleetlake_model::sink::PositionsResult> {
        Box::pin(async { Ok(Vec::new()) })
    }

    fn hold_positions(
        &self,
        _positions: Vec<(Table, BTreeMap<String, String>)>,
    ) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    fn commit_without(&self, _keys: Vec<String>) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async { Ok(()) })
    }
}

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("kinesis_consume");
    group.throughput(Throughput::Elements(DATAPOINTS as u64));
    group.sample_size(20);
    for (name, aggregated) in [("json_records", false), ("kpl_aggregates", true)] {
        let api = Arc::new(MemoryKinesis {
            shards: stream(aggregated),
        });
        group.bench_function(name, |b| {
            b.iter_batched(
                || {
                    Arc::new(BufferSink {
                        buffer: Mutex::new(HotBuffer::new(Table::Metrics, None)),
                        rows: AtomicUsize::new(0),
                        all_in: Notify::new(),
                    })
                },
                |sink| {
                    runtime.block_on(async {
                        let (stop, shutdown) = watch::channel(false);
                        let consumer = tokio::spawn(run_stream(
                            StreamConfig {
                                name: "bench".into(),
                                arn: None,
                                format: Format::MetricsJson,
                                region: None,
                                start: StartPosition::TrimHorizon,
                                idle_wait: Duration::from_millis(1),
                                min_call_interval: Duration::ZERO,
                                discovery_interval: Duration::from_secs(60),
                                max_records: 100,
                            },
                            Arc::clone(&api) as Arc<dyn KinesisApi>,
                            Arc::clone(&sink) as Arc<dyn StreamSink>,
                            None,
                            shutdown,
                        ));
                        sink.all_in.notified().await;
                        stop.send(true).expect("consumer listening");
                        consumer
                            .await
                            .expect("consumer ran")
                            .expect("no leases to lose");
                    });
                    sink
                },
                BatchSize::PerIteration,
            );
        });
    }
    group.finish();
    println!(
        "{DATAPOINTS} datapoints in {} records per iteration ({LINES_PER_RECORD} per record): \
         records/s = datapoints/s / {LINES_PER_RECORD}",
        SHARDS * RECORDS_PER_SHARD
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
