//! The consumer against an in-memory Kinesis that injects what no stand-in returns:
//! throttling, expired iterators, failed calls, and exact resharding.

use std::collections::VecDeque;
use std::sync::Mutex;

use arrow::array::{AsArray, RecordBatch};

use super::*;
use fleetlake_model::schema::col;

fn datapoint(account: &str, minute: i64) -> Vec<u8> {
    format!(
        r#"{{"account_id":"{account}","region":"us-east-1","namespace":"AWS/Lambda","metric_name":"Errors","dimensions":{{}},"timestamp":{},"value":{{"count":1,"sum":1,"min":1,"max":1}},"unit":"Count"}}"#,
        minute * 60_000
    )
    .into_bytes()
}

struct FakeShard {
    shard: Shard,
    records: Vec<Record>,
    closed: bool,
}

/// Records of shard `s` are datapoints of account `s` at minutes 0.., sequence numbers
/// `s * 1000 + i` (padded to 21 digits, like the real ones).
fn fake_shard(id: &str, parents: &[&str], n: usize, closed: bool) -> FakeShard {
    let index: u64 = id.trim_start_matches("shardId-").parse().unwrap();
    FakeShard {
        shard: Shard {
            id: id.to_string(),
            parent: parents.first().map(|p| p.to_string()),
            adjacent_parent: parents.get(1).map(|p| p.to_string()),
        },
        records: (0..n)
            .map(|i| Record {
                sequence_number: format!("{}{:020}", 4, index * 1000 + i as u64),
                data: datapoint(&format!("{index:012}"), i as i64),
                arrival_ms: 1_700_000_000_000 + i as i64,
            })
            .collect(),
        closed,
    }
}

#[derive(Default)]
struct FakeKinesis {
    shards: Vec<FakeShard>,
    /// Errors GetRecords returns instead of answering, one every third call.
    faults: Mutex<VecDeque<ApiError>>,
    get_records_calls: Mutex<usize>,
    page: usize,
    calls: Mutex<Vec<String>>,
    /// Listings of every shard (ListShards calls without a NextToken).
    listings: Mutex<usize>,
    /// Per shard, the GetRecords calls answered at its end (no record left to return).
    end_reads: Mutex<HashMap<String, usize>>,
}

/// How many more times every open shard must be read at its end before a test takes
/// it that nothing more arrives.
const QUIET_READS: usize = 3;

impl FakeKinesis {
    fn shard(&self, id: &str) -> &FakeShard {
        self.shards.iter().find(|s| s.shard.id == id).unwrap()
    }

    fn listings(&self) -> usize {
        *self.listings.lock().unwrap()
    }

    fn end_reads(&self, id: &str) -> usize {
        self.end_reads.lock().unwrap().get(id).copied().unwrap_or(0)
    }

    /// Waits until the consumers have gone past every point where more records would
    /// have come: the shards listed twice more (by any consumer; a shard to start, or
    /// to start again, would have been started), then every open shard read at its end
    /// `QUIET_READS` more times. A reader writes what a call returned before it makes
    /// the next call, so whatever the first `QUIET_READS - 1` of those reads returned
    /// (a late record, a shard read again from its start) has reached the sink.
    async fn quiesce(&self) {
        let listed = self.listings();
        wait_for("two more listings of the shards", || {
            self.listings() >= listed + 2
        })
        .await;
        let before: Vec<(&str, usize)> = self
            .shards
            .iter()
            .filter(|s| !s.closed)
            .map(|s| (s.shard.id.as_str(), self.end_reads(&s.shard.id)))
            .collect();
        for (id, reads) in before {
            wait_for(
                &format!("{id} read at its end {QUIET_READS} more times"),
                || self.end_reads(id) >= reads + QUIET_READS,
            )
            .await;
        }
    }
}

/// Polls `cond` every 10 ms; panics naming `what` if it does not hold within 60 s (far
/// more than any of these tests needs).
async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..6000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

impl KinesisApi for FakeKinesis {
    fn list_shards<'a>(
        &'a self,
        _stream: &'a StreamConfig,
        next_token: Option<String>,
    ) -> BoxFuture<'a, Result<ShardsPage, ApiError>> {
        // Pages of one shard, to exercise NextToken.
        let at: usize = next_token.map_or(0, |t| t.parse().unwrap());
        if at == 0 {
            *self.listings.lock().unwrap() += 1;
        }
        let shard = self.shards[at].shard.clone();
        let next = (at + 1 < self.shards.len()).then(|| (at + 1).to_string());
        Box::pin(async move {
            Ok(ShardsPage {
                shards: vec![shard],
                next_token: next,
            })
        })
    }

    fn shard_iterator<'a>(
        &'a self,
        _stream: &'a StreamConfig,
        shard_id: &'a str,
        from: IteratorFrom,
    ) -> BoxFuture<'a, Result<String, ApiError>> {
        let shard = self.shard(shard_id);
        let index = match from {
            IteratorFrom::After(seq) => {
                shard
                    .records
                    .iter()
                    .position(|r| r.sequence_number == seq)
                    .expect("a sequence number of the shard")
                    + 1
            }
            IteratorFrom::Start(StartPosition::Latest) => shard.records.len(),
            IteratorFrom::Start(StartPosition::AtTimestamp(ms)) => shard
                .records
                .iter()
                .position(|r| r.arrival_ms >= ms)
                .unwrap_or(shard.records.len()),
            IteratorFrom::Start(StartPosition::TrimHorizon) => 0,
        };
        self.calls
            .lock()
            .unwrap()
            .push(format!("iterator {shard_id} {index}"));
        Box::pin(async move { Ok(format!("{shard_id}:{index}")) })
    }

    fn get_records<'a>(
        &'a self,
        _stream: &'a StreamConfig,
        iterator: &'a str,
        limit: i32,
    ) -> BoxFuture<'a, Result<RecordsPage, ApiError>> {
        let fault = {
            let mut calls = self.get_records_calls.lock().unwrap();
            *calls += 1;
            if calls.is_multiple_of(3) {
                self.faults.lock().unwrap().pop_front()
            } else {
                None
            }
        };
        let (id, index) = iterator.split_once(':').unwrap();
        let index: usize = index.parse().unwrap();
        let shard = self.shard(id);
        if fault.is_none() && index == shard.records.len() {
            *self
                .end_reads
                .lock()
                .unwrap()
                .entry(id.to_string())
                .or_default() += 1;
        }
        let end = (index + self.page.min(limit as usize)).min(shard.records.len());
        let page = RecordsPage {
            records: shard.records[index..end].to_vec(),
            next_iterator: (!(shard.closed && end == shard.records.len()))
                .then(|| format!("{id}:{end}")),
            millis_behind: Some((shard.records.len() - end) as i64 * 1000),
        };
        Box::pin(async move { fault.map_or(Ok(page), Err) })
    }
}

/// One write: rows and the positions they reach.
type Write = (Vec<(Table, RecordBatch)>, Vec<(String, String)>);

#[derive(Default)]
struct FakeSink {
    committed: Vec<(Table, BTreeMap<String, String>)>,
    writes: Mutex<Vec<Write>>,
    /// Writes refused as overloaded before the first is taken.
    overloaded: Mutex<usize>,
    /// Positions reached and carried (see `StreamSink::hold_positions`).
    reached: Mutex<BTreeMap<String, String>>,
    /// A lake shared with other sinks: `commit` publishes the positions reached.
    lake: Option<Arc<Mutex<BTreeMap<String, String>>>>,
}

impl StreamSink for FakeSink {
    fn write_positioned(
        &self,
        rows: Vec<(Table, RecordBatch)>,
        positions: Vec<(String, String)>,
    ) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move {
            let mut overloaded = self.overloaded.lock().unwrap();
            if *overloaded > 0 {
                *overloaded -= 1;
                return Err(SinkError::Overloaded("full".into()));
            }
            self.reached
                .lock()
                .unwrap()
                .extend(positions.iter().cloned());
            self.writes.lock().unwrap().push((rows, positions));
            Ok(())
        })
    }

    fn committed_positions(&self) -> Vec<(Table, BTreeMap<String, String>)> {
        self.committed.clone()
    }

    fn read_positions(
        &self,
        keys: Vec<String>,
    ) -> BoxFuture<'_, fleetlake_model::sink::PositionsResult> {
        let found = match &self.lake {
            Some(lake) => {
                let mut positions = lake.lock().unwrap().clone();
                positions.retain(|k, _| keys.contains(k));
                vec![(Table::Metrics, positions)]
            }
            None => Vec::new(),
        };
        Box::pin(async move { Ok(found) })
    }

    fn hold_positions(
        &self,
        positions: Vec<(Table, BTreeMap<String, String>)>,
    ) -> BoxFuture<'_, ()> {
        for (_, found) in positions {
            self.reached.lock().unwrap().extend(found);
        }
        Box::pin(async {})
    }

    fn commit_without(&self, keys: Vec<String>) -> BoxFuture<'_, Result<(), SinkError>> {
        if let Some(lake) = &self.lake {
            let reached = self.reached.lock().unwrap().clone();
            lake.lock().unwrap().extend(reached);
        }
        self.reached
            .lock()
            .unwrap()
            .retain(|k, _| !keys.contains(k));
        Box::pin(async { Ok(()) })
    }
}

impl FakeSink {
    /// (account, minute) of every metrics row written, in write order.
    fn points(&self) -> Vec<(String, i64)> {
        let mut out = Vec::new();
        for (rows, _) in self.writes.lock().unwrap().iter() {
            for (table, batch) in rows {
                if *table != Table::Metrics {
                    continue;
                }
                let account = batch.column(col::ACCOUNT_ID).as_string::<i32>();
                let time = batch
                    .column(col::TIME)
                    .as_primitive::<arrow::datatypes::TimestampMicrosecondType>();
                for i in 0..batch.num_rows() {
                    out.push((account.value(i).to_string(), time.value(i) / 60_000_000));
                }
            }
        }
        out
    }

    fn last_position(&self, key: &str) -> Option<String> {
        self.writes
            .lock()
            .unwrap()
            .iter()
            .flat_map(|(_, p)| p.iter())
            .filter(|(k, _)| k == key)
            .map(|(_, s)| s.clone())
            .next_back()
    }
}

fn stream_config() -> StreamConfig {
    StreamConfig {
        name: "fleet".into(),
        arn: None,
        format: Format::MetricsJson,
        region: None,
        start: StartPosition::TrimHorizon,
        idle_wait: Duration::from_millis(5),
        min_call_interval: Duration::ZERO,
        discovery_interval: Duration::from_millis(20),
        max_records: 10_000,
    }
}

/// Runs the consumer until `sink` holds `expected` metrics rows and the consumer has
/// gone past the point where more would have come (see [`FakeKinesis::quiesce`]), then
/// stops it.
async fn consume(api: Arc<FakeKinesis>, sink: Arc<FakeSink>, expected: usize) {
    let (stop, shutdown) = watch::channel(false);
    let consumer = tokio::spawn(run_stream(
        stream_config(),
        Arc::clone(&api) as Arc<dyn KinesisApi>,
        Arc::clone(&sink) as Arc<dyn StreamSink>,
        None,
        shutdown,
    ));
    wait_for(&format!("{expected} metrics rows"), || {
        sink.points().len() >= expected
    })
    .await;
    api.quiesce().await;
    stop.send(true).unwrap();
    consumer.await.unwrap().unwrap();
}

#[tokio::test]
async fn reads_every_shard_once_through_throttling_expiry_and_failures() {
    let api = Arc::new(FakeKinesis {
        shards: vec![
            fake_shard("shardId-000000000001", &[], 25, false),
            fake_shard("shardId-000000000002", &[], 25, false),
        ],
        faults: Mutex::new(VecDeque::from([
            ApiError::Throttled("ProvisionedThroughputExceededException".into()),
            ApiError::ExpiredIterator("ExpiredIteratorException".into()),
            ApiError::Other("connection reset".into()),
            ApiError::Throttled("ProvisionedThroughputExceededException".into()),
            ApiError::ExpiredIterator("ExpiredIteratorException".into()),
        ])),
        page: 4,
        ..Default::default()
    });
    let sink = Arc::new(FakeSink {
        overloaded: Mutex::new(3),
        ..Default::default()
    });
    consume(Arc::clone(&api), Arc::clone(&sink), 50).await;
    let mut points = sink.points();
    assert_eq!(points.len(), 50, "{points:?}");
    points.sort();
    points.dedup();
    assert_eq!(points.len(), 50, "no record twice");
    assert_eq!(
        sink.last_position("fleet/shardId-000000000001").as_deref(),
        Some("400000000000000001024")
    );
    // Iterators were renewed after the last record read, not from the start.
    assert!(
        api.faults.lock().unwrap().is_empty(),
        "every fault was injected"
    );
    let calls = api.calls.lock().unwrap();
    let renewals: Vec<_> = calls.iter().filter(|c| !c.ends_with(" 0")).collect();
    assert!(renewals.len() >= 2, "{calls:?}");
}

#[tokio::test]
async fn parents_are_read_to_their_end_before_their_children() {
    // 1 splits into 3 and 4; 3 and 2 merge into 5.
    let api = Arc::new(FakeKinesis {
        shards: vec![
            fake_shard("shardId-000000000001", &[], 30, true),
            fake_shard("shardId-000000000002", &[], 10, true),
            fake_shard("shardId-000000000003", &["shardId-000000000001"], 10, true),
            fake_shard("shardId-000000000004", &["shardId-000000000001"], 10, false),
            fake_shard(
                "shardId-000000000005",
                &["shardId-000000000003", "shardId-000000000002"],
                10,
                false,
            ),
        ],
        page: 7,
        ..Default::default()
    });
    let sink = Arc::new(FakeSink::default());
    consume(Arc::clone(&api), Arc::clone(&sink), 70).await;
    let points = sink.points();
    assert_eq!(points.len(), 70);
    let first = |account: &str| points.iter().position(|(a, _)| a == account).unwrap();
    let last = |account: &str| points.iter().rposition(|(a, _)| a == account).unwrap();
    assert!(last("000000000001") < first("000000000003"));
    assert!(last("000000000001") < first("000000000004"));
    assert!(last("000000000003") < first("000000000005"));
    assert!(last("000000000002") < first("000000000005"));
    // Order within a shard (a partition key lives in one shard) is kept.
    for account in ["000000000001", "000000000004"] {
        let minutes: Vec<_> = points
            .iter()
            .filter(|(a, _)| a == account)
            .map(|(_, m)| *m)
            .collect();
        assert!(minutes.windows(2).all(|w| w[0] < w[1]), "{minutes:?}");
    }
    for closed in ["1", "2", "3"] {
        let key = format!("fleet/shardId-00000000000{closed}");
        assert_eq!(sink.last_position(&key).as_deref(), Some(SHARD_END));
    }
}

#[tokio::test]
async fn resumes_after_committed_positions_and_skips_what_a_table_holds() {
    let api = Arc::new(FakeKinesis {
        shards: vec![
            fake_shard("shardId-000000000001", &[], 20, true),
            fake_shard("shardId-000000000002", &["shardId-000000000001"], 20, false),
        ],
        page: 6,
        ..Default::default()
    });
    let seq = |i: u64| format!("4{:020}", 2000 + i);
    // metrics committed shard 2 through record 9, dead_letters only through record 4;
    // shard 1 was read to its end.
    let metrics = BTreeMap::from([
        (
            "fleet/shardId-000000000001".to_string(),
            SHARD_END.to_string(),
        ),
        ("fleet/shardId-000000000002".to_string(), seq(9)),
    ]);
    let dead = BTreeMap::from([
        (
            "fleet/shardId-000000000001".to_string(),
            SHARD_END.to_string(),
        ),
        ("fleet/shardId-000000000002".to_string(), seq(4)),
    ]);
    let sink = Arc::new(FakeSink {
        committed: vec![(Table::Metrics, metrics), (Table::DeadLetters, dead)],
        ..Default::default()
    });
    consume(Arc::clone(&api), Arc::clone(&sink), 10).await;
    let minutes: Vec<i64> = sink.points().iter().map(|(_, m)| *m).collect();
    assert_eq!(minutes, (10..20).collect::<Vec<_>>());
    let calls = api.calls.lock().unwrap();
    assert_eq!(*calls, ["iterator shardId-000000000002 5"]);
    assert_eq!(
        sink.last_position("fleet/shardId-000000000002"),
        Some(seq(19))
    );
}

#[test]
fn resume_is_the_least_committed_position() {
    let key = "s/shardId-1";
    let at = |seq: &str| BTreeMap::from([(key.to_string(), seq.to_string())]);
    assert_eq!(resume_of(&[], key), Resume::Start { skip: vec![] });
    // A table whose first commit of the shard failed needs it from the start.
    assert_eq!(
        resume_of(
            &[(Table::Metrics, at("99")), (Table::Logs, BTreeMap::new())],
            key
        ),
        Resume::Start {
            skip: vec![(Table::Metrics, "99".into())]
        }
    );
    assert_eq!(
        resume_of(&[(Table::Metrics, at("99")), (Table::Logs, at("100"))], key),
        Resume::After {
            seq: "99".into(),
            skip: vec![(Table::Logs, "100".into())]
        }
    );
    assert_eq!(
        resume_of(
            &[
                (Table::Metrics, at(SHARD_END)),
                (Table::Logs, at(SHARD_END))
            ],
            key
        ),
        Resume::Ended
    );
    assert_eq!(
        resume_of(
            &[(Table::Metrics, at(SHARD_END)), (Table::Logs, at("7"))],
            key
        ),
        Resume::After {
            seq: "7".into(),
            skip: vec![(Table::Metrics, SHARD_END.into())]
        }
    );
}

#[test]
fn sequence_numbers_order_numerically() {
    assert!(sequence_le("9", "10"));
    assert!(!sequence_le("10", "9"));
    assert!(sequence_le(
        "49590338271490256608559692538361571095921575989136588898",
        SHARD_END
    ));
    assert!(!sequence_le(SHARD_END, "1"));
}

#[test]
fn stream_names_and_arns() {
    assert_eq!(
        StreamConfig::parse_stream("arn:aws:kinesis:eu-west-1:123456789012:stream/fleet-metrics")
            .unwrap(),
        (
            "fleet-metrics".to_string(),
            Some("arn:aws:kinesis:eu-west-1:123456789012:stream/fleet-metrics".to_string())
        )
    );
    assert_eq!(
        StreamConfig::parse_stream("fleet").unwrap(),
        ("fleet".to_string(), None)
    );
    assert!(StreamConfig::parse_stream("arn:aws:s3:::bucket").is_err());
    assert!(StreamConfig::parse_stream("").is_err());
}

/// A lease table in memory, with the conditional semantics of the DynamoDB one.
#[derive(Default)]
struct MemoryLeases {
    items: Mutex<HashMap<String, (Option<String>, i64)>>,
}

impl crate::lease::LeaseStore for MemoryLeases {
    fn ensure_table(&self) -> BoxFuture<'_, Result<(), ApiError>> {
        Box::pin(async { Ok(()) })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<crate::lease::Lease>, ApiError>> {
        let leases = self
            .items
            .lock()
            .unwrap()
            .iter()
            .map(|(key, (owner, counter))| crate::lease::Lease {
                key: key.clone(),
                owner: owner.clone(),
                counter: *counter,
            })
            .collect();
        Box::pin(async move { Ok(leases) })
    }

    fn take<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        seen: Option<i64>,
    ) -> BoxFuture<'a, Result<Option<i64>, ApiError>> {
        let mut items = self.items.lock().unwrap();
        let current = items.get(key).map(|(_, c)| *c);
        let out = (current == seen).then(|| {
            let next = current.unwrap_or(0) + 1;
            items.insert(key.to_string(), (Some(owner.to_string()), next));
            next
        });
        Box::pin(async move { Ok(out) })
    }

    fn renew<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        counter: i64,
    ) -> BoxFuture<'a, Result<Option<i64>, ApiError>> {
        let mut items = self.items.lock().unwrap();
        let out = match items.get_mut(key) {
            Some((Some(o), c)) if o == owner && *c == counter => {
                *c += 1;
                Some(*c)
            }
            _ => None,
        };
        Box::pin(async move { Ok(out) })
    }

    fn release<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        counter: i64,
    ) -> BoxFuture<'a, Result<bool, ApiError>> {
        let mut items = self.items.lock().unwrap();
        let out = match items.get_mut(key) {
            Some((o, c)) if o.as_deref() == Some(owner) && *c == counter => {
                *o = None;
                *c += 1;
                true
            }
            _ => false,
        };
        Box::pin(async move { Ok(out) })
    }
}

impl MemoryLeases {
    fn owned_by(&self, owner: &str) -> usize {
        self.items
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, (o, _))| !k.starts_with("instance/") && o.as_deref() == Some(owner))
            .count()
    }
}

fn leases(store: &Arc<MemoryLeases>, owner: &str) -> Option<LeaseSettings> {
    Some(LeaseSettings {
        store: Arc::clone(store) as Arc<dyn crate::lease::LeaseStore>,
        owner: owner.into(),
        duration: Duration::from_millis(300),
    })
}

fn four_open_shards() -> Arc<FakeKinesis> {
    Arc::new(FakeKinesis {
        shards: (1..=4)
            .map(|i| fake_shard(&format!("shardId-00000000000{i}"), &[], 10, false))
            .collect(),
        page: 5,
        ..Default::default()
    })
}

#[tokio::test]
async fn two_consumers_split_the_shards_through_the_lease_table() {
    let api = four_open_shards();
    let store = Arc::new(MemoryLeases::default());
    let (stop, shutdown) = watch::channel(false);
    let sinks = [Arc::new(FakeSink::default()), Arc::new(FakeSink::default())];
    let consumers: Vec<_> = ["a", "b"]
        .iter()
        .zip(&sinks)
        .map(|(owner, sink)| {
            tokio::spawn(run_stream(
                stream_config(),
                Arc::clone(&api) as Arc<dyn KinesisApi>,
                Arc::clone(sink) as Arc<dyn StreamSink>,
                leases(&store, owner),
                shutdown.clone(),
            ))
        })
        .collect();
    wait_for("40 metrics rows", || {
        sinks.iter().map(|s| s.points().len()).sum::<usize>() >= 40
    })
    .await;
    api.quiesce().await;
    stop.send(true).unwrap();
    for consumer in consumers {
        consumer.await.unwrap().unwrap();
    }
    let mut all: Vec<_> = sinks.iter().flat_map(|s| s.points()).collect();
    assert_eq!(all.len(), 40);
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 40, "a shard was read by both");
    // Each took its share: two shards each.
    for sink in &sinks {
        let accounts: std::collections::BTreeSet<_> =
            sink.points().into_iter().map(|(a, _)| a).collect();
        assert_eq!(accounts.len(), 2, "{accounts:?}");
    }
}

#[tokio::test]
async fn a_lease_taken_away_ends_the_consumer() {
    let api = four_open_shards();
    let store = Arc::new(MemoryLeases::default());
    let sink = Arc::new(FakeSink::default());
    let (_stop, shutdown) = watch::channel(false);
    let consumer = tokio::spawn(run_stream(
        stream_config(),
        api,
        Arc::clone(&sink) as Arc<dyn StreamSink>,
        leases(&store, "a"),
        shutdown,
    ));
    let key = "fleet/shardId-000000000001";
    wait_for("the lease of shard 1 taken", || {
        store.items.lock().unwrap().contains_key(key)
    })
    .await;
    // Another instance takes it (as if "a" had missed its renewals).
    use crate::lease::LeaseStore;
    let mut stolen = false;
    for _ in 0..100 {
        let seen = store.items.lock().unwrap()[key].1;
        if store
            .take(key, "thief", Some(seen))
            .await
            .unwrap()
            .is_some()
        {
            stolen = true;
            break;
        }
    }
    assert!(stolen, "renewed in between every time");
    let outcome = tokio::time::timeout(Duration::from_secs(20), consumer)
        .await
        .expect("the consumer ends")
        .unwrap();
    assert_eq!(outcome.unwrap_err().key, key);
}

#[tokio::test]
async fn a_late_instance_gets_its_share_handed_over_without_a_record_read_twice() {
    let api = four_open_shards();
    let store = Arc::new(MemoryLeases::default());
    let lake = Arc::new(Mutex::new(BTreeMap::new()));
    let sink = |_| {
        Arc::new(FakeSink {
            lake: Some(Arc::clone(&lake)),
            ..Default::default()
        })
    };
    let sinks = [sink(0), sink(1)];
    let (stop, shutdown) = watch::channel(false);
    let start = |owner: &str, sink: &Arc<FakeSink>| {
        tokio::spawn(run_stream(
            stream_config(),
            Arc::clone(&api) as Arc<dyn KinesisApi>,
            Arc::clone(sink) as Arc<dyn StreamSink>,
            leases(&store, owner),
            shutdown.clone(),
        ))
    };
    let first = start("a", &sinks[0]);
    wait_for("40 metrics rows read by \"a\"", || {
        sinks[0].points().len() >= 40
    })
    .await;
    assert_eq!(store.owned_by("a"), 4);
    let second = start("b", &sinks[1]);
    wait_for("two leases handed over from \"a\" to \"b\"", || {
        store.owned_by("b") == 2 && store.owned_by("a") == 2
    })
    .await;
    // "b" has read the shards it took to their end, where "a" left them.
    api.quiesce().await;
    assert_eq!((store.owned_by("a"), store.owned_by("b")), (2, 2));
    stop.send(true).unwrap();
    first.await.unwrap().unwrap();
    second.await.unwrap().unwrap();
    // "b" went on from what "a" committed before handing over: nothing read twice.
    assert_eq!(sinks[0].points().len(), 40);
    assert_eq!(sinks[1].points().len(), 0);
}

#[tokio::test]
async fn children_start_at_their_first_record_and_ended_leases_are_released() {
    // LATEST skips what the parent held before the start, never the child's records.
    let api = Arc::new(FakeKinesis {
        shards: vec![
            fake_shard("shardId-000000000001", &[], 5, true),
            fake_shard("shardId-000000000002", &["shardId-000000000001"], 5, false),
        ],
        page: 2,
        ..Default::default()
    });
    let store = Arc::new(MemoryLeases::default());
    let sink = Arc::new(FakeSink::default());
    let (stop, shutdown) = watch::channel(false);
    let mut config = stream_config();
    config.start = StartPosition::Latest;
    let consumer = tokio::spawn(run_stream(
        config,
        Arc::clone(&api) as Arc<dyn KinesisApi>,
        Arc::clone(&sink) as Arc<dyn StreamSink>,
        leases(&store, "a"),
        shutdown,
    ));
    wait_for("5 metrics rows", || sink.points().len() >= 5).await;
    wait_for("the parent's lease released", || {
        store
            .items
            .lock()
            .unwrap()
            .get("fleet/shardId-000000000001")
            .is_some_and(|(owner, _)| owner.is_none())
    })
    .await;
    api.quiesce().await;
    stop.send(true).unwrap();
    consumer.await.unwrap().unwrap();
    let accounts: Vec<_> = sink.points().into_iter().map(|(a, _)| a).collect();
    assert_eq!(accounts, vec!["000000000002".to_string(); 5]);
    // The parent's lease went back once its end was committed.
    let items = store.items.lock().unwrap();
    assert_eq!(items["fleet/shardId-000000000001"].0, None);
    assert_eq!(items["fleet/shardId-000000000002"].0.as_deref(), Some("a"));
}
