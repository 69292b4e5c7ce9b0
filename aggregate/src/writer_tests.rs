//! The writer's ordering, with a log that records what happens to it: a write is
//! acknowledged only after its group was appended, fsync'd, applied and published; a
//! failed fsync acknowledges nothing, applies nothing and cuts the group from the log.

use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};

use arrow::array::RecordBatch;
use tokio::sync::{mpsc, oneshot};

use fleetlake_ingest::metric_stream::MetricsBatchBuilder;
use fleetlake_model::Table;

use crate::buffer::HotBuffer;
use crate::positions::Positions;
use crate::wal::WalError;
use crate::writer::{Command, Log, Outlet, Writer};

/// What happened to the fake log, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    Append(u64),
    Sync,
    Rollback(u64),
}

/// A log kept in memory whose fsync waits for the test's go-ahead and can fail.
struct FakeLog {
    events: Arc<Mutex<Vec<Event>>>,
    next: u64,
    /// Each fsync waits for one message: `true` succeeds, `false` fails.
    syncs: std_mpsc::Receiver<bool>,
    /// Told when an fsync starts waiting.
    syncing: std_mpsc::Sender<()>,
}

impl Log for FakeLog {
    type Mark = u64;
    fn mark(&self) -> u64 {
        self.next
    }
    fn append(&mut self, _payload: &[u8]) -> Result<u64, WalError> {
        self.next += 1;
        self.events.lock().unwrap().push(Event::Append(self.next));
        Ok(self.next)
    }
    fn sync(&mut self) -> Result<(), WalError> {
        self.syncing.send(()).unwrap();
        let ok = self.syncs.recv().unwrap_or(false);
        if ok {
            self.events.lock().unwrap().push(Event::Sync);
            Ok(())
        } else {
            Err(WalError::Io {
                path: "fake".into(),
                source: std::io::Error::other("disk full"),
            })
        }
    }
    fn rollback(&mut self, mark: u64) -> Result<(), WalError> {
        self.next = mark;
        self.events.lock().unwrap().push(Event::Rollback(mark));
        Ok(())
    }
    fn remove_through(&mut self, _seq: u64) -> Result<usize, WalError> {
        Ok(0)
    }
}

fn batch(account: &str, minute: i64) -> RecordBatch {
    let line = format!(
        r#"{{"account_id":"{account}","region":"us-east-1","namespace":"AWS/Lambda","metric_name":"Errors","dimensions":{{}},"timestamp":{},"value":{{"count":1,"sum":1,"min":1,"max":1}},"unit":"Count"}}"#,
        minute * 60_000
    );
    let mut b = MetricsBatchBuilder::new();
    assert!(b.push_record(line.as_bytes()).is_empty());
    b.finish()
}

struct Harness {
    commands: mpsc::Sender<Command>,
    outlet: Arc<Outlet>,
    events: Arc<Mutex<Vec<Event>>>,
    syncs: std_mpsc::Sender<bool>,
    syncing: std_mpsc::Receiver<()>,
}

fn start() -> Harness {
    let events = Arc::new(Mutex::new(Vec::new()));
    let (syncs_tx, syncs_rx) = std_mpsc::channel();
    let (syncing_tx, syncing_rx) = std_mpsc::channel();
    let log = FakeLog {
        events: Arc::clone(&events),
        next: 0,
        syncs: syncs_rx,
        syncing: syncing_tx,
    };
    let outlet = Arc::new(Outlet::new(usize::MAX, fleetlake_model::clock::system()));
    let buffers = Table::ALL
        .iter()
        .map(|t| HotBuffer::new(*t, None))
        .collect();
    let writer = Writer::new(
        log,
        buffers,
        Positions::new(),
        vec![Positions::new(); Table::ALL.len()],
        0,
        Arc::clone(&outlet),
    );
    let (commands, queue) = mpsc::channel(16);
    std::thread::spawn(move || writer.run(queue));
    Harness {
        commands,
        outlet,
        events,
        syncs: syncs_tx,
        syncing: syncing_rx,
    }
}

impl Harness {
    fn append(&self, rows: RecordBatch) -> oneshot::Receiver<Result<(), String>> {
        let (done, acked) = oneshot::channel();
        self.commands
            .blocking_send(Command::Append {
                payload: vec![1, 2, 3],
                rows: vec![(Table::Metrics, rows)],
                done,
            })
            .unwrap();
        acked
    }

    fn visible(&self) -> usize {
        self.outlet.published.load().views[Table::Metrics.index()]
            .visible(None)
            .iter()
            .map(RecordBatch::num_rows)
            .sum()
    }
}

#[test]
fn a_write_is_acknowledged_after_fsync_and_once_visible() {
    let h = start();
    let mut acked = h.append(batch("1", 1));
    // The writer is inside fsync now: nothing is acknowledged, nothing visible.
    h.syncing.recv().unwrap();
    assert!(
        acked.try_recv().is_err(),
        "acknowledged before fsync returned"
    );
    assert_eq!(h.visible(), 0, "visible before fsync returned");
    assert_eq!(*h.events.lock().unwrap(), [Event::Append(1)]);
    h.syncs.send(true).unwrap();
    assert_eq!(acked.blocking_recv().unwrap(), Ok(()));
    // At the moment of the acknowledgement the rows were already published.
    assert_eq!(h.visible(), 1);
    assert_eq!(*h.events.lock().unwrap(), [Event::Append(1), Event::Sync]);
    assert_eq!(h.outlet.published.load().applied_seq, 1);
}

#[test]
fn a_failed_fsync_acknowledges_nothing_applies_nothing_and_cuts_the_group() {
    let h = start();
    let first = h.append(batch("1", 1));
    h.syncing.recv().unwrap();
    // Two more writes queue up behind the fsync and form the next group.
    let second = h.append(batch("2", 1));
    let third = h.append(batch("3", 1));
    h.syncs.send(true).unwrap();
    assert_eq!(first.blocking_recv().unwrap(), Ok(()));
    h.syncing.recv().unwrap();
    h.syncs.send(false).unwrap();
    assert!(second.blocking_recv().unwrap().is_err());
    assert!(third.blocking_recv().unwrap().is_err());
    assert_eq!(h.visible(), 1, "a refused write became visible");
    assert_eq!(
        *h.events.lock().unwrap(),
        [
            Event::Append(1),
            Event::Sync,
            Event::Append(2),
            Event::Append(3),
            Event::Rollback(1)
        ]
    );
    assert!(h.outlet.faults.get(crate::health::Stage::Wal).is_some());
    // The log goes on after the cut: the next write reuses the sequence.
    let fourth = h.append(batch("4", 1));
    h.syncing.recv().unwrap();
    h.syncs.send(true).unwrap();
    assert_eq!(fourth.blocking_recv().unwrap(), Ok(()));
    assert_eq!(h.visible(), 2);
    assert!(h.outlet.faults.get(crate::health::Stage::Wal).is_none());
    assert_eq!(h.events.lock().unwrap().last(), Some(&Event::Sync));
    assert_eq!(h.outlet.published.load().applied_seq, 2);
}

#[test]
fn a_flush_takes_the_rows_and_positions_of_one_instant() {
    let h = start();
    let (done, written) = oneshot::channel();
    h.commands
        .blocking_send(Command::Positioned {
            rows: vec![(Table::Metrics, batch("1", 1))],
            positions: vec![("stream/shard-0".into(), "100".into())],
            done,
        })
        .unwrap();
    written.blocking_recv().unwrap();
    let (done, taken) = oneshot::channel();
    h.commands
        .blocking_send(Command::BeginFlush { done })
        .unwrap();
    let flushes = taken.blocking_recv().unwrap();
    let metrics = &flushes[Table::Metrics.index()];
    assert_eq!(
        metrics.job.as_ref().map(|j| j.batches.len()),
        Some(1),
        "the positioned rows are in the flush"
    );
    // Every table commits the positions, rows or not.
    for flush in &flushes {
        assert_eq!(
            flush
                .positions
                .as_ref()
                .and_then(|p| p.get("stream/shard-0")),
            Some(&"100".to_string()),
            "{}",
            flush.table
        );
    }
    // Rows being flushed stay visible until the commit is known.
    assert_eq!(h.visible(), 1);
}

/// Compaction rewrites files on its own table handle and passes the commit gate only to
/// commit: a flush goes through while a merge is under way. (When compaction held the
/// flush's table lock for the whole merge, this flush waited, and Firehose got 503s.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_commits_while_compaction_merges() {
    use std::time::Duration;

    use fleetlake_model::RowSink;

    use crate::lake::pause;
    use crate::location::LakeLocation;
    use crate::{Aggregator, CompactionConfig};

    let (reached, go) = pause::MERGE.get_or_init(Default::default);
    let dir = tempfile::tempdir().unwrap();
    let lake = LakeLocation::local(&dir.path().join("lake")).unwrap();
    let compaction = CompactionConfig {
        interval: Duration::from_millis(50),
        min_files: 2,
        vacuum_grace: Duration::from_secs(3600),
        retention: Default::default(),
    };
    let aggregator = Aggregator::open(test_config(dir.path(), &lake, Some(compaction)))
        .await
        .unwrap();
    // Three small files in one day partition: work for compaction.
    for minute in 0..3 {
        let rows = vec![(Table::Metrics, batch("1", minute))];
        aggregator.write(rows).await.unwrap();
        aggregator.flush().await.unwrap();
    }
    tokio::time::timeout(Duration::from_secs(60), reached.notified())
        .await
        .expect("compaction merged the files and waits before its commit");
    // Compaction is in the middle of its merge: a write and its flush go through.
    aggregator
        .write(vec![(Table::Metrics, batch("2", 5))])
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(30), aggregator.flush())
        .await
        .expect("a flush does not wait for a compaction's merge")
        .unwrap();
    let files = || async {
        deltalake::open_table(lake.table_url(Table::Metrics.name()))
            .await
            .unwrap()
            .get_file_uris()
            .unwrap()
            .count()
    };
    let before = files().await;
    go.notify_one();
    // The rewrite commits on top of the flush (fewer files: the merged ones are one
    // now), and every row is there once.
    let mut merged = false;
    for _ in 0..600 {
        if files().await < before {
            merged = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(merged, "compaction committed after the flush");
    assert_eq!(lake_rows(&lake).await, 4);
}

/// An aggregator's settings for a test in `dir`: nothing flushes or refuses by itself.
fn test_config(
    dir: &std::path::Path,
    lake: &crate::location::LakeLocation,
    compaction: Option<crate::CompactionConfig>,
) -> crate::AggregateConfig {
    crate::AggregateConfig {
        wal_dir: dir.join("wal"),
        lake_location: lake.clone(),
        flush_interval: std::time::Duration::from_secs(3600),
        flush_rows: usize::MAX,
        max_buffered_rows: usize::MAX,
        max_buffered_bytes: usize::MAX,
        wal_segment_bytes: 1 << 20,
        lake: crate::lake::LakeOptions::default(),
        compaction,
        rollup_interval: None,
        follow_interval: std::time::Duration::from_secs(3600),
    }
}

/// The `metrics` table's latest version.
async fn lake_version(lake: &crate::location::LakeLocation) -> Option<i64> {
    deltalake::open_table(lake.table_url(Table::Metrics.name()))
        .await
        .unwrap()
        .version()
        .map(|v| v as i64)
}

/// Rows in the lake's `metrics` table now.
async fn lake_rows(lake: &crate::location::LakeLocation) -> i64 {
    let table = deltalake::open_table(lake.table_url(Table::Metrics.name()))
        .await
        .unwrap();
    let ctx = datafusion::prelude::SessionContext::new();
    table.update_datafusion_session(&ctx.state()).unwrap();
    ctx.register_table("metrics", table.table_provider().await.unwrap())
        .unwrap();
    let rows = ctx
        .sql("SELECT count(*) FROM metrics")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    rows[0]
        .column(0)
        .as_any()
        .downcast_ref::<arrow::array::Int64Array>()
        .unwrap()
        .value(0)
}

/// An aggregator over a fresh lake whose `metrics` store follows `script`.
async fn faulty_aggregator(
    dir: &std::path::Path,
    script: &crate::faulty::FaultScript,
) -> (crate::Aggregator, crate::location::LakeLocation) {
    use crate::faulty::FaultyLake;
    use crate::location::LakeLocation;
    use crate::{Aggregator, LakeWrap, Seams};

    let lake = LakeLocation::local(&dir.join("lake")).unwrap();
    let script = script.clone();
    let wrap: LakeWrap = Arc::new(move |name, store| {
        if name == "metrics" {
            Box::new(FaultyLake::new(store, script.clone()))
        } else {
            store
        }
    });
    let aggregator = Aggregator::open_with(
        test_config(dir, &lake, None),
        Seams {
            lake: Some(wrap),
            ..Seams::default()
        },
    )
    .await
    .unwrap();
    (aggregator, lake)
}

fn visible_rows(batches: &[RecordBatch]) -> usize {
    batches.iter().map(RecordBatch::num_rows).sum()
}

/// A commit the store refuses keeps its rows queryable in the hot buffer, and the
/// next flush commits them, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_commit_keeps_the_rows_and_the_next_flush_commits_them_once() {
    use fleetlake_model::RowSink;

    use crate::faulty::{Fault, FaultScript};

    let dir = tempfile::tempdir().unwrap();
    let script = FaultScript::default();
    let (aggregator, lake) = faulty_aggregator(dir.path(), &script).await;
    aggregator
        .write(vec![(Table::Metrics, batch("1", 1))])
        .await
        .unwrap();
    script.push(Fault::Fail);
    assert!(aggregator.flush().await.is_err());
    assert_eq!(script.pending(), 0, "the flush tried to commit");
    assert_eq!(lake_rows(&lake).await, 0);
    assert_eq!(
        visible_rows(&aggregator.snapshot(Table::Metrics, None)),
        1,
        "refused rows stay queryable"
    );
    // More rows meanwhile: the retry takes both.
    aggregator
        .write(vec![(Table::Metrics, batch("2", 1))])
        .await
        .unwrap();
    aggregator.flush().await.unwrap();
    assert_eq!(lake_rows(&lake).await, 2);
    let latest = lake_version(&lake).await;
    assert_eq!(
        visible_rows(&aggregator.snapshot(Table::Metrics, latest)),
        0,
        "a query reading the new version finds the rows in the lake, not twice"
    );
}

/// What a commit of another instance's flush records.
fn another_writers_commit() -> crate::store::CommitMeta {
    crate::store::CommitMeta {
        transactions: vec![("another-writer".into(), 7)],
        metadata: vec![("fleetlake.writer".into(), "another-writer".into())],
    }
}

/// Another writer's commit lands between this flush's start and its commit: the rows
/// go in once, and a query reading the other writer's version (which lacks them) still
/// finds them in the hot buffer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_loses_the_race_to_another_writer_still_lands_once_and_stays_visible() {
    use fleetlake_model::RowSink;

    use crate::faulty::{Fault, FaultScript};

    let dir = tempfile::tempdir().unwrap();
    let script = FaultScript::default();
    let (aggregator, lake) = faulty_aggregator(dir.path(), &script).await;
    aggregator
        .write(vec![(Table::Metrics, batch("1", 1))])
        .await
        .unwrap();
    let before = lake_version(&lake).await.unwrap();
    script.push(Fault::OtherWriterFirst(another_writers_commit()));
    aggregator.flush().await.unwrap();
    let after = lake_version(&lake).await.unwrap();
    assert_eq!(after, before + 2, "the other writer's commit, then ours");
    assert_eq!(lake_rows(&lake).await, 1);
    assert_eq!(
        visible_rows(&aggregator.snapshot(Table::Metrics, Some(before + 1))),
        1,
        "a query at the other writer's version sees the rows through the buffer"
    );
    assert_eq!(
        visible_rows(&aggregator.snapshot(Table::Metrics, Some(after))),
        0
    );
}

/// While a flush commits on top of another writer's commit, a reader of that other
/// commit's version must still get the flushing rows from the buffer: the old rule
/// ("a version after the base holds the flush") gives none, the settled read waits
/// until the flush's version is known and then gives them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_of_another_writers_version_during_a_commit_waits_and_then_sees_the_rows() {
    use fleetlake_model::RowSink;

    use crate::faulty::{Fault, FaultScript, Hold};

    let dir = tempfile::tempdir().unwrap();
    let script = FaultScript::default();
    let (aggregator, lake) = faulty_aggregator(dir.path(), &script).await;
    aggregator
        .write(vec![(Table::Metrics, batch("1", 1))])
        .await
        .unwrap();
    let before = lake_version(&lake).await.unwrap();
    let hold = Hold::default();
    script.push(Fault::OtherWriterFirstThenHold(
        another_writers_commit(),
        hold.clone(),
    ));
    let flushing = {
        let aggregator = aggregator.clone();
        tokio::spawn(async move { aggregator.flush().await })
    };
    hold.reached().await;
    let theirs = lake_version(&lake).await.unwrap();
    assert_eq!(theirs, before + 1, "the other writer's commit landed");
    assert_eq!(
        visible_rows(&aggregator.snapshot(Table::Metrics, Some(theirs))),
        0,
        "the single-writer rule takes their version for the flush's"
    );
    assert!(
        aggregator
            .snapshot_settled(Table::Metrics, Some(theirs))
            .is_none(),
        "not settled while the commit is in flight"
    );
    hold.go();
    flushing.await.unwrap().unwrap();
    assert_eq!(
        aggregator
            .snapshot_settled(Table::Metrics, Some(theirs))
            .map(|b| visible_rows(&b)),
        Some(1),
        "their version lacks the rows: the buffer adds them"
    );
    let ours = lake_version(&lake).await;
    assert_eq!(
        aggregator
            .snapshot_settled(Table::Metrics, ours)
            .map(|b| visible_rows(&b)),
        Some(0)
    );
}

/// Two write paths on one lake in `dir`: the lake, "mine" and "theirs".
async fn two_writers(
    dir: &tempfile::TempDir,
) -> (
    crate::location::LakeLocation,
    crate::Aggregator,
    crate::Aggregator,
) {
    let lake = crate::location::LakeLocation::local(&dir.path().join("lake")).unwrap();
    let mut writers = Vec::new();
    for name in ["mine", "theirs"] {
        let config = test_config(&dir.path().join(name), &lake, None);
        writers.push(crate::Aggregator::open(config).await.unwrap());
    }
    let theirs = writers.pop().unwrap();
    (lake, writers.pop().unwrap(), theirs)
}

/// As [`two_writers`], each following the other (commits and published rows), with a
/// subscription to "mine"'s feed.
async fn following_each_other(
    dir: &tempfile::TempDir,
) -> (
    crate::location::LakeLocation,
    crate::Aggregator,
    crate::Aggregator,
    mpsc::UnboundedReceiver<Arc<crate::feed::FeedItem>>,
) {
    let (lake, mine, theirs) = two_writers(dir).await;
    mine.follow_other_writers().await.unwrap();
    theirs.follow_other_writers().await.unwrap();
    let (feed, _) = mine.subscribe();
    (lake, mine, theirs, feed)
}

/// The `metrics` items on `feed` so far: the version that holds them (if marked), whether
/// they are taken back, and how many rows.
fn drain(
    feed: &mut mpsc::UnboundedReceiver<Arc<crate::feed::FeedItem>>,
) -> Vec<(Option<i64>, bool, usize)> {
    let mut items = Vec::new();
    while let Ok(item) = feed.try_recv() {
        if item.table == Table::Metrics {
            items.push((item.committed_as, item.retract, visible_rows(&item.batches)));
        }
    }
    items
}

/// Following other writers: the rows of each of their commits reach the feed once,
/// marked with its version; this writer's own commits and compaction's rewrites (no
/// data change) do not; a row of this writer that the other committed first is
/// retracted by this writer's flush, after the other's commit was emitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_writers_commits_reach_the_feed_once_and_rows_they_had_first_are_retracted() {
    use fleetlake_model::RowSink;

    let dir = tempfile::tempdir().unwrap();
    let (lake, mine, theirs) = two_writers(&dir).await;
    mine.follow_other_writers().await.unwrap();
    let (mut feed, _) = mine.subscribe();

    // Their rows, in two commits.
    theirs
        .write(vec![(Table::Metrics, batch("1", 1))])
        .await
        .unwrap();
    theirs.flush().await.unwrap();
    let first = lake_version(&lake).await.unwrap();
    theirs
        .write(vec![(Table::Metrics, batch("2", 1))])
        .await
        .unwrap();
    theirs.flush().await.unwrap();
    mine.follow_now().await.unwrap();
    assert_eq!(
        drain(&mut feed),
        vec![(Some(first), false, 1), (Some(first + 1), false, 1)]
    );
    // A reader of an earlier version skips those items (marked with later versions)
    // and finds their rows with the hot rows instead.
    let hot_at = |version: i64| {
        visible_rows(
            &mine
                .snapshot_settled(Table::Metrics, Some(version))
                .unwrap(),
        )
    };
    assert_eq!(
        (hot_at(first - 1), hot_at(first), hot_at(first + 1)),
        (2, 1, 0)
    );
    // Asked again: nothing more.
    mine.follow_now().await.unwrap();
    assert!(drain(&mut feed).is_empty());

    // A compaction's rewrite of their files (delta-rs' own here, as another engine's
    // would be) is no new data.
    let table = deltalake::DeltaTable::try_from_url(lake.table_url(Table::Metrics.name()))
        .await
        .unwrap();
    let (_, optimized) = table.optimize().await.unwrap();
    assert_eq!(optimized.num_files_removed, 2, "{optimized:?}");
    mine.follow_now().await.unwrap();
    assert!(drain(&mut feed).is_empty(), "a rewrite is not followed");

    // A row of mine that they commit first (a retry sent to them): emitted as mine,
    // emitted again with their commit, taken back by my flush.
    mine.write(vec![(Table::Metrics, batch("3", 2))])
        .await
        .unwrap();
    theirs
        .write(vec![(Table::Metrics, batch("3", 2))])
        .await
        .unwrap();
    theirs.flush().await.unwrap();
    let theirs_at = lake_version(&lake).await.unwrap();
    mine.flush().await.unwrap();
    assert_eq!(
        drain(&mut feed),
        vec![
            (None, false, 1),
            (Some(theirs_at), false, 1),
            (None, true, 1)
        ],
        "mine, theirs, then mine taken back"
    );
    // My own commit (of nothing new) is not followed; the lake has the row once.
    mine.follow_now().await.unwrap();
    assert!(drain(&mut feed).is_empty());
    assert_eq!(lake_rows(&lake).await, 3);
}

/// Rows another instance accepted reach this one's feed and SQL before that instance
/// flushes (through its published rows, `peers`), and count once after its commit:
/// the commit adds only what was not mirrored (a suspect it checked), takes back what
/// it found already in the lake, and a follower that joins late mirrors only rows the
/// lake does not have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_another_instance_accepted_are_seen_before_its_flush_and_count_once_after() {
    use deltalake::logstore::object_store::ObjectStoreExt;
    use fleetlake_model::RowSink;

    let dir = tempfile::tempdir().unwrap();
    let (lake, mine, theirs, mut feed) = following_each_other(&dir).await;
    let visible_at =
        |version| visible_rows(&mine.snapshot_settled(Table::Metrics, version).unwrap());

    // Two rows accepted there, published, mirrored here: in the feed and in SQL.
    theirs
        .write(vec![(Table::Metrics, batch("1", 1))])
        .await
        .unwrap();
    theirs
        .write(vec![(Table::Metrics, batch("2", 1))])
        .await
        .unwrap();
    theirs.publish_now().await;
    mine.follow_now().await.unwrap();
    assert_eq!(drain(&mut feed), vec![(None, false, 2)]);
    let before = lake_version(&lake).await;
    assert_eq!(visible_at(before), 2);
    // Read again: nothing more.
    theirs.publish_now().await;
    mine.follow_now().await.unwrap();
    assert!(drain(&mut feed).is_empty());

    // Their flush commits both: nothing new here, and SQL of the new version finds
    // them in the lake only.
    theirs.flush().await.unwrap();
    mine.follow_now().await.unwrap();
    assert!(
        drain(&mut feed).is_empty(),
        "mirrored rows are not emitted again"
    );
    let committed = lake_version(&lake).await;
    assert_eq!(visible_at(committed), 0);
    assert_eq!(
        visible_at(before),
        2,
        "a reader of the version before still has them"
    );
    assert_eq!(lake_rows(&lake).await, 2);

    // A row committed here first and then accepted there (a retry sent to them):
    // mirrored (twice for a moment), then taken back with their commit, which lacks it.
    mine.write(vec![(Table::Metrics, batch("3", 2))])
        .await
        .unwrap();
    mine.flush().await.unwrap();
    theirs
        .write(vec![(Table::Metrics, batch("3", 2))])
        .await
        .unwrap();
    theirs.publish_now().await;
    mine.follow_now().await.unwrap();
    assert_eq!(drain(&mut feed), vec![(None, false, 1), (None, false, 1)]);
    theirs.flush().await.unwrap();
    mine.follow_now().await.unwrap();
    assert_eq!(drain(&mut feed), vec![(None, true, 1)], "taken back once");
    assert_eq!(visible_at(lake_version(&lake).await), 0);
    assert_eq!(lake_rows(&lake).await, 3);

    // Their covered files are deleted.
    let store = lake.object_store(crate::peers::PREFIX).unwrap();
    let mut waited = 0;
    loop {
        let listed: Vec<_> = futures::TryStreamExt::try_collect(store.list(None))
            .await
            .unwrap();
        if listed.is_empty() {
            break;
        }
        waited += 1;
        assert!(waited < 500, "covered files stay: {listed:?}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }

    // A file this version cannot read is skipped (and counted); the others are read.
    store
        .put(
            &crate::peers::file_path(Table::Metrics, "broken", "0", 1, 1),
            b"garbage".to_vec().into(),
        )
        .await
        .unwrap();
    // A writer's file first read by a follower: the rows the lake has are not mirrored.
    let file =
        crate::peers::encode(Table::Metrics, &[(1, batch("1", 1)), (2, batch("4", 1))]).unwrap();
    store
        .put(
            &crate::peers::file_path(Table::Metrics, "elsewhere", "0", 1, 2),
            file.into(),
        )
        .await
        .unwrap();
    mine.follow_now().await.unwrap();
    assert_eq!(
        drain(&mut feed),
        vec![(None, false, 1)],
        "only account 4's row"
    );
    assert_eq!(visible_at(lake_version(&lake).await), 1);
}

/// An instance whose run goes silent (killed, never restarted) while its published
/// rows are mirrored: once silent for `STALE_AFTER` by this instance's clock, its rows
/// are taken back (the lake does not have them), and its files are not read again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_instances_mirrored_rows_are_taken_back() {
    use fleetlake_model::RowSink;
    use fleetlake_model::clock::ManualClock;

    let dir = tempfile::tempdir().unwrap();
    let lake = crate::location::LakeLocation::local(&dir.path().join("lake")).unwrap();
    let clock = ManualClock::at(fleetlake_model::clock::system().now_ms());
    let seams = crate::Seams {
        clock: clock.clone(),
        ..Default::default()
    };
    let mine =
        crate::Aggregator::open_with(test_config(&dir.path().join("mine"), &lake, None), seams)
            .await
            .unwrap();
    let theirs = crate::Aggregator::open(test_config(&dir.path().join("theirs"), &lake, None))
        .await
        .unwrap();
    mine.follow_other_writers().await.unwrap();
    theirs.follow_other_writers().await.unwrap();
    let (mut feed, _) = mine.subscribe();
    theirs
        .write(vec![(Table::Metrics, batch("1", 1))])
        .await
        .unwrap();
    theirs.publish_now().await;
    mine.follow_now().await.unwrap();
    assert_eq!(drain(&mut feed), vec![(None, false, 1)]);

    // Not yet silent long enough: nothing changes.
    clock.advance(crate::peers::STALE_AFTER / 2);
    mine.follow_now().await.unwrap();
    assert!(drain(&mut feed).is_empty());
    // Silent for longer: taken back once, and not mirrored again.
    clock.advance(crate::peers::STALE_AFTER);
    mine.follow_now().await.unwrap();
    assert_eq!(drain(&mut feed), vec![(None, true, 1)]);
    let version = lake_version(&lake).await;
    assert_eq!(
        visible_rows(&mine.snapshot_settled(Table::Metrics, version).unwrap()),
        0
    );
    mine.follow_now().await.unwrap();
    assert!(drain(&mut feed).is_empty());
}

/// Another writer's commits whose files a compaction rewrote and a vacuum deleted
/// before this writer read them cannot be followed one commit at a time (their files
/// would read as empty): each comes to the feed as lost, marked with its version and
/// without rows, so readers keeping state read the lake again; rows of theirs this
/// writer mirrored leave the mirror with the commit that covers them; a commit read
/// in time afterwards comes as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_writers_commits_vacuumed_before_they_were_read_come_as_lost() {
    use fleetlake_model::RowSink;

    let dir = tempfile::tempdir().unwrap();
    let (lake, mine, theirs, mut feed) = following_each_other(&dir).await;
    let mut items = move || {
        let mut items = Vec::new();
        while let Ok(item) = feed.try_recv() {
            if item.table == Table::Metrics {
                items.push((item.committed_as, item.lost, visible_rows(&item.batches)));
            }
        }
        items
    };
    // One row of theirs mirrored here, then committed; another committed.
    theirs
        .write(vec![(Table::Metrics, batch("1", 1))])
        .await
        .unwrap();
    theirs.publish_now().await;
    mine.follow_now().await.unwrap();
    assert_eq!(items(), vec![(None, false, 1)]);
    theirs.flush().await.unwrap();
    let first = lake_version(&lake).await.unwrap();
    theirs
        .write(vec![(Table::Metrics, batch("2", 1))])
        .await
        .unwrap();
    theirs.flush().await.unwrap();

    // Rewritten and vacuumed with no grace before this writer reads them.
    let table = deltalake::DeltaTable::try_from_url(lake.table_url(Table::Metrics.name()))
        .await
        .unwrap();
    let (table, optimized) = table.optimize().await.unwrap();
    assert_eq!(optimized.num_files_removed, 2, "{optimized:?}");
    let (_, vacuumed) = table
        .vacuum()
        .with_retention_period(chrono::Duration::zero())
        .with_enforce_retention_duration(false)
        .await
        .unwrap();
    assert_eq!(vacuumed.files_deleted.len(), 2, "{vacuumed:?}");

    mine.follow_now().await.unwrap();
    assert_eq!(
        items(),
        vec![(Some(first), true, 0), (Some(first + 1), true, 0)]
    );
    // The mirrored row is in the lake from `first` on, and with the hot rows before.
    let hot_at = |version: i64| {
        visible_rows(
            &mine
                .snapshot_settled(Table::Metrics, Some(version))
                .unwrap(),
        )
    };
    assert_eq!((hot_at(first - 1), hot_at(first)), (1, 0));

    // A commit read in time is followed as before.
    theirs
        .write(vec![(Table::Metrics, batch("3", 1))])
        .await
        .unwrap();
    theirs.flush().await.unwrap();
    let third = lake_version(&lake).await.unwrap();
    mine.follow_now().await.unwrap();
    assert_eq!(items(), vec![(Some(third), false, 1)]);
}

/// A datapoint both instances accepted (a retry sent to the other): this writer's copy
/// stands for it and the other's published copy is left out of the mirror; when the
/// other commits it first, this writer flushes at once (nobody asks it to here) and
/// takes its copy back. It counts once, but for the moment between that commit and
/// this flush.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_both_instances_hold_counts_once_and_the_second_flushes_at_the_first_commit() {
    use fleetlake_model::RowSink;

    let dir = tempfile::tempdir().unwrap();
    let (lake, mine, theirs, mut feed) = following_each_other(&dir).await;
    mine.write(vec![(Table::Metrics, batch("1", 1))])
        .await
        .unwrap();
    theirs
        .write(vec![
            (Table::Metrics, batch("1", 1)),
            (Table::Metrics, batch("2", 1)),
        ])
        .await
        .unwrap();
    theirs.publish_now().await;
    mine.follow_now().await.unwrap();
    assert_eq!(
        drain(&mut feed),
        vec![(None, false, 1), (None, false, 1)],
        "mine, then only their other row"
    );
    let settled = |version| visible_rows(&mine.snapshot_settled(Table::Metrics, version).unwrap());
    assert_eq!(settled(None), 2);

    // Their commit holds both: the mirrored row is not emitted again, the one left out
    // is new to readers; my flush follows by itself (the tail makes it and returns
    // after it) and takes my copy back.
    theirs.flush().await.unwrap();
    let theirs_at = lake_version(&lake).await.unwrap();
    mine.follow_now().await.unwrap();
    assert_eq!(
        drain(&mut feed),
        vec![(Some(theirs_at), false, 1), (None, true, 1)]
    );
    assert_eq!(lake_rows(&lake).await, 2);
    let latest = lake_version(&lake).await;
    assert!(latest > Some(theirs_at), "my flush committed its position");
    assert_eq!(settled(latest), 0);

    // The other order: their copy mirrored here first, then mine accepted: mine counts
    // from then on, and theirs is taken back at once.
    theirs
        .write(vec![(Table::Metrics, batch("3", 1))])
        .await
        .unwrap();
    theirs.publish_now().await;
    mine.follow_now().await.unwrap();
    assert_eq!(drain(&mut feed), vec![(None, false, 1)]);
    mine.write(vec![(Table::Metrics, batch("3", 1))])
        .await
        .unwrap();
    assert_eq!(drain(&mut feed), vec![(None, false, 1), (None, true, 1)]);
    assert_eq!(settled(latest), 1);
}

/// A row this writer holds as a suspect (late: at or before its series' latest
/// committed time, so hidden until its flush checks the lake) does not hide another
/// instance's published copy of it: the mirrored copy counts until this writer's flush
/// reveals its own, and is taken back then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspect_held_here_does_not_hide_the_other_instances_copy() {
    use fleetlake_model::RowSink;

    let dir = tempfile::tempdir().unwrap();
    let (lake, mine, theirs, mut feed) = following_each_other(&dir).await;
    mine.write(vec![(Table::Metrics, batch("1", 5))])
        .await
        .unwrap();
    mine.flush().await.unwrap();
    assert_eq!(drain(&mut feed), vec![(None, false, 1)]);
    // Minute 3 of the same series: late, a suspect here.
    mine.write(vec![(Table::Metrics, batch("1", 3))])
        .await
        .unwrap();
    assert!(drain(&mut feed).is_empty(), "a suspect is not shown");
    theirs
        .write(vec![(Table::Metrics, batch("1", 3))])
        .await
        .unwrap();
    theirs.publish_now().await;
    mine.follow_now().await.unwrap();
    assert_eq!(
        drain(&mut feed),
        vec![(None, false, 1)],
        "their copy is mirrored"
    );
    let settled = |version| visible_rows(&mine.snapshot_settled(Table::Metrics, version).unwrap());
    assert_eq!(settled(lake_version(&lake).await), 1);
    // My flush finds it new and reveals mine; theirs is taken back.
    mine.flush().await.unwrap();
    let mine_at = lake_version(&lake).await.unwrap();
    assert_eq!(
        drain(&mut feed),
        vec![(Some(mine_at), false, 1), (None, true, 1)]
    );
    assert_eq!(settled(Some(mine_at)), 0);
}
