//! The property incremental evaluation stands on: for the same deliveries (duplicates,
//! late rows, redeliveries before and after a flush, rows in the lake before it
//! starts), every round's result from partial aggregates is the result of the same
//! statement run as SQL over the lake and the hot buffer at the same instant.

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::util::pretty::pretty_format_batches;
use proptest::prelude::*;

use fleetlake_aggregate::location::LakeLocation;
use fleetlake_aggregate::{AggregateConfig, Aggregator};
use fleetlake_ingest::metric_stream::MetricsBatchBuilder;
use fleetlake_model::{RowSink, Table};

use super::{Incremental, Path};
use crate::access::Principal;
use crate::engine::{HotData, QueryEngine, SideTable};

/// Rules of the shapes fleets write, over the rows [`rows`] makes.
const RULES: [&str; 14] = [
    // Every mergeable aggregate, by account, on one metric.
    "SELECT account_id, sum(sum) AS s, count(*) AS n, min(min) AS lo, max(max) AS hi, avg(sum) AS a \
     FROM metrics WHERE namespace = 'AWS/Lambda' AND metric_name = 'Errors' \
       AND time > now() - INTERVAL '5 minutes' GROUP BY account_id",
    // A ratio of two CASE sums, a HAVING over them.
    "SELECT account_id, \
            sum(CASE WHEN metric_name = 'Errors' THEN sum ELSE 0 END) \
              / nullif(sum(CASE WHEN metric_name = 'Invocations' THEN sum ELSE 0 END), 0) AS ratio \
     FROM metrics WHERE metric_name IN ('Errors', 'Invocations') \
       AND time >= now() - INTERVAL '3 minutes' \
     GROUP BY account_id HAVING sum(CASE WHEN metric_name = 'Errors' THEN sum ELSE 0 END) > 0",
    // No groups: one row even over nothing; a window closed on both sides.
    "SELECT count(*) AS n, sum(sum) AS s FROM metrics \
     WHERE time > now() - INTERVAL '2 minutes' AND time <= now() - INTERVAL '30 seconds'",
    // A dimension as a group, a threshold.
    "SELECT account_id, dimensions['FunctionName'] AS f, max(max) AS m FROM metrics \
     WHERE metric_name = 'Invocations' AND time > now() - INTERVAL '10 minutes' \
     GROUP BY account_id, dimensions['FunctionName'] HAVING max(max) > 4",
    // The threshold in an outer WHERE.
    "SELECT * FROM (SELECT account_id, sum(sum) AS s FROM metrics \
       WHERE time > now() - INTERVAL '1 minute' GROUP BY account_id) WHERE s >= 3",
    // The aggregate of the rule before with its threshold in HAVING: one leaf for both.
    "SELECT account_id, sum(sum) AS s FROM metrics WHERE time > now() - INTERVAL '1 minute' \
     GROUP BY account_id HAVING sum(sum) > 2",
    // Absence: last seen per account, now() above the aggregate (the plan made at
    // each round's instant by moving its literals).
    "SELECT account_id, max(time) AS last FROM metrics WHERE time > now() - INTERVAL '10 minutes' \
     GROUP BY account_id HAVING max(time) < now() - INTERVAL '1 minute'",
    // The shipped absence rule's shape: the registry joined to last seen.
    "SELECT a.account_id, \
            coalesce(extract(epoch FROM now()) - extract(epoch FROM seen.last_seen), 86400.0) AS value \
     FROM accounts a LEFT JOIN ( \
       SELECT account_id, max(time) AS last_seen FROM metrics \
       WHERE time > now() - INTERVAL '1 day' GROUP BY account_id) seen \
       ON seen.account_id = a.account_id \
     WHERE seen.last_seen IS NULL OR seen.last_seen < now() - INTERVAL '2 minutes'",
    // A per-account threshold from the registry, which changes between rounds.
    "SELECT m.account_id, m.s FROM (SELECT account_id, sum(sum) AS s FROM metrics \
       WHERE time > now() - INTERVAL '5 minutes' GROUP BY account_id) m \
     JOIN accounts a ON a.account_id = m.account_id WHERE m.s > a.threshold",
    // No partial state for median: SQL over the recent rows kept in memory.
    "SELECT account_id, median(sum) AS m FROM metrics \
     WHERE time > now() - INTERVAL '4 minutes' GROUP BY account_id",
    // Rows read as rows, in a window.
    "SELECT account_id, metric_name, time, sum FROM metrics \
     WHERE time > now() - INTERVAL '2 minutes' AND sum > 6",
    // now() truncated above the aggregate: planned each round.
    "SELECT account_id, max(time) AS last FROM metrics WHERE time > now() - INTERVAL '10 minutes' \
     GROUP BY account_id HAVING max(time) < date_trunc('minute', now())",
    // The aggregate of rules 4 and 5 over another window: a leaf of its own that
    // folds rows with theirs once.
    "SELECT account_id, sum(sum) AS s FROM metrics WHERE time > now() - INTERVAL '3 minutes' \
     GROUP BY account_id HAVING sum(sum) > 1",
    // Routed on the namespace only, where most leaves route on the metric: its rows
    // filtered, not taken from the rows grouped by metric.
    "SELECT account_id, count(*) AS n FROM metrics \
     WHERE namespace = 'AWS/Lambda' AND time > now() - INTERVAL '2 minutes' GROUP BY account_id",
];

/// One datapoint: account 0..3, metric 0..2, function 0..2, its time relative to the
/// round's instant (ms), value.
type Point = (u8, u8, u8, i64, u32);

#[derive(Debug, Clone)]
enum Step {
    /// Write these points (the rows at the current instant plus their offsets).
    Deliver(Vec<Point>),
    /// Write the `n`-th earlier delivery again, as it was (a redelivery).
    Redeliver(usize),
    /// Commit the hot buffer to the lake.
    Flush,
    /// Move time on by this many seconds, then evaluate every rule both ways.
    Round(u8),
    /// Set every account's threshold in the registry.
    Threshold(u8),
    /// Fold what the feed brought between rounds, as the service does every second.
    Fold,
    /// Write these points to another instance's write path on the same lake.
    DeliverOther(Vec<Point>),
    /// Write the `n`-th earlier delivery (to either instance) again, to the other
    /// instance (a Firehose retry sent elsewhere).
    RedeliverOther(usize),
    /// The other instance commits its hot buffer.
    FlushOther,
    /// The other instance publishes the rows it accepted since (as it does every
    /// second), for this one to mirror before the other's commit.
    PublishOther,
    /// Another engine compacts the lake and vacuums it with no grace before this
    /// instance reads the other's commits: their files are gone when it does.
    VacuumOther,
    /// SQL on this instance counts this many rows (each datapoint once, wherever it
    /// is); not generated.
    Count(usize),
}

fn point() -> impl Strategy<Value = Point> {
    let offset = prop_oneof![
        // On a minute, as CloudWatch's metrics are (most rows).
        3 => (-12i64..=1).prop_map(|m| m * 60_000),
        // Anywhere, to the millisecond, late or a little ahead.
        2 => -700_000i64..5_000,
        // On a window's bound exactly.
        1 => prop_oneof![Just(-60_000i64), Just(-30_000), Just(-120_000), Just(-180_000), Just(-300_000)],
    ];
    (0u8..3, 0u8..2, 0u8..2, offset, 0u32..9)
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    proptest::collection::vec(
        prop_oneof![
            4 => proptest::collection::vec(point(), 1..12).prop_map(Step::Deliver),
            1 => (0usize..8).prop_map(Step::Redeliver),
            1 => Just(Step::Flush),
            3 => (1u8..90).prop_map(Step::Round),
            1 => (0u8..12).prop_map(Step::Threshold),
            1 => Just(Step::Fold),
        ],
        4..20,
    )
}

/// As [`steps`], with another instance writing the same lake: its own rows, retries
/// of rows this instance has (committed or not), and its flushes.
fn steps_with_another_writer() -> impl Strategy<Value = Vec<Step>> {
    proptest::collection::vec(
        prop_oneof![
            3 => proptest::collection::vec(point(), 1..12).prop_map(Step::Deliver),
            2 => proptest::collection::vec(point(), 1..12).prop_map(Step::DeliverOther),
            1 => (0usize..8).prop_map(Step::Redeliver),
            2 => (0usize..8).prop_map(Step::RedeliverOther),
            1 => Just(Step::Flush),
            2 => Just(Step::FlushOther),
            2 => Just(Step::PublishOther),
            1 => Just(Step::VacuumOther),
            3 => (1u8..90).prop_map(Step::Round),
            1 => Just(Step::Fold),
        ],
        4..24,
    )
}

/// A minute boundary, so that minute offsets land on minutes.
const START_MS: i64 = 1_767_608_400_000;

fn rows(points: &[Point], now_ms: i64) -> RecordBatch {
    let mut b = MetricsBatchBuilder::new();
    for (account, metric, function, offset, value) in points {
        let line = format!(
            r#"{{"account_id":"{:012}","region":"eu-west-1","namespace":"AWS/Lambda","metric_name":"{}","dimensions":{{"FunctionName":"f{function}"}},"timestamp":{},"value":{{"count":1,"sum":{value},"min":{value},"max":{value}}},"unit":"Count"}}"#,
            account + 1,
            ["Errors", "Invocations"][*metric as usize],
            now_ms + offset,
        );
        assert!(b.push_record(line.as_bytes()).is_empty(), "{line}");
    }
    b.finish()
}

/// The `accounts` table: four accounts (one never reports) and a threshold each.
fn accounts(threshold: u8) -> RecordBatch {
    use arrow::array::{Float64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    let schema = Arc::new(Schema::new(vec![
        Field::new("account_id", DataType::Utf8, false),
        Field::new("threshold", DataType::Float64, true),
    ]));
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(StringArray::from_iter_values(
                (1..=4).map(|a| format!("{a:012}")),
            )),
            Arc::new(Float64Array::from_iter_values(
                (1..=4).map(|a| f64::from(threshold) + f64::from(a)),
            )),
        ],
    )
    .unwrap()
}

/// A write path over a lake in `dir` that flushes when told.
async fn open(dir: &tempfile::TempDir) -> (Aggregator, LakeLocation) {
    let lake = LakeLocation::local(&dir.path().join("lake")).unwrap();
    let config = AggregateConfig::manual(dir.path().join("wal"), lake.clone());
    (Aggregator::open(config).await.unwrap(), lake)
}

struct Hot(Aggregator);

impl HotData for Hot {
    fn snapshot(&self, table: Table, lake_version: Option<i64>) -> Vec<RecordBatch> {
        self.0.snapshot(table, lake_version)
    }

    fn snapshot_settled(
        &self,
        table: Table,
        lake_version: Option<i64>,
    ) -> Option<Vec<RecordBatch>> {
        self.0.snapshot_settled(table, lake_version)
    }
}

/// Rows as sorted text lines, for comparing results whatever their order.
fn lines(batches: &[RecordBatch]) -> Vec<String> {
    let text = pretty_format_batches(batches).unwrap().to_string();
    let mut lines: Vec<String> = text
        .lines()
        .filter(|l| l.starts_with('|'))
        .skip(1)
        .map(str::to_string)
        .collect();
    lines.sort();
    lines
}

/// `sql` run as SQL over the lake and the hot buffer at `at_ms`, as [`lines`].
async fn scanned(engine: &QueryEngine, sql: &str, at_ms: i64) -> Vec<String> {
    let principal = Principal::unrestricted("test");
    lines(&engine.run_at(sql, &principal, at_ms).await.unwrap().batches)
}

async fn run(
    before: Vec<Point>,
    flush_before: bool,
    steps: Vec<Step>,
) -> Result<(), TestCaseError> {
    run_with(before, flush_before, steps, false).await
}

/// As [`run`]; with `two`, another instance's write path shares the lake, and each
/// follows the other's commits and published rows. What SQL on this instance sees (the
/// lake, this instance's hot rows and the other's published ones) is what its partials
/// must give: a row both instances accepted counts twice until the second flush finds
/// it in the lake, then once.
async fn run_with(
    before: Vec<Point>,
    flush_before: bool,
    steps: Vec<Step>,
    two: bool,
) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let (aggregator, lake) = open(&dir).await;
    let other = if two {
        let config = AggregateConfig::manual(dir.path().join("wal-other"), lake.clone());
        aggregator.follow_other_writers().await.unwrap();
        let other = Aggregator::open(config).await.unwrap();
        // Following, it publishes what it accepts; this instance mirrors it.
        other.follow_other_writers().await.unwrap();
        Some(other)
    } else {
        None
    };
    let other = || {
        other
            .as_ref()
            .expect("steps of another writer only with two")
    };
    let registry = Arc::new(std::sync::Mutex::new(accounts(3)));
    let rows_now = Arc::clone(&registry);
    let metrics_url = lake.table_url(Table::Metrics.name());
    let engine = Arc::new(
        QueryEngine::new(lake, Some(Arc::new(Hot(aggregator.clone())))).with_table(
            "accounts",
            SideTable::Rows(
                accounts(0).schema(),
                Arc::new(move || rows_now.lock().unwrap().clone()),
            ),
        ),
    );
    let mut now = START_MS;
    let mut delivered = vec![rows(&before, now)];
    // Rows in the lake (or the hot buffer) before incremental evaluation starts.
    aggregator
        .write(vec![(Table::Metrics, delivered[0].clone())])
        .await
        .unwrap();
    if flush_before {
        aggregator.flush().await.unwrap();
    }
    let incremental = Incremental::new(Arc::clone(&engine), Arc::new(aggregator.clone()));
    let mut rounds = 0;
    for step in steps.into_iter().chain([Step::Round(1)]) {
        match step {
            Step::Deliver(points) => {
                let batch = rows(&points, now);
                aggregator
                    .write(vec![(Table::Metrics, batch.clone())])
                    .await
                    .unwrap();
                delivered.push(batch);
            }
            Step::Redeliver(n) => {
                let batch = delivered[n % delivered.len()].clone();
                aggregator
                    .write(vec![(Table::Metrics, batch)])
                    .await
                    .unwrap();
            }
            Step::Flush => aggregator.flush().await.unwrap(),
            Step::Threshold(t) => *registry.lock().unwrap() = accounts(t),
            Step::Fold => incremental.fold_pending().await.unwrap(),
            Step::DeliverOther(points) => {
                let batch = rows(&points, now);
                other()
                    .write(vec![(Table::Metrics, batch.clone())])
                    .await
                    .unwrap();
                delivered.push(batch);
            }
            Step::RedeliverOther(n) => {
                let batch = delivered[n % delivered.len()].clone();
                other().write(vec![(Table::Metrics, batch)]).await.unwrap();
            }
            Step::FlushOther => other().flush().await.unwrap(),
            Step::PublishOther => other().publish_now().await,
            Step::Count(n) => {
                let counted = scanned(&engine, "SELECT count(*) AS n FROM metrics", now).await;
                prop_assert_eq!(counted, vec![format!("| {n} |")], "after round {}", rounds);
            }
            Step::VacuumOther => {
                other();
                if let Ok(table) = deltalake::DeltaTable::try_from_url(metrics_url.clone()).await {
                    let (table, _) = table.optimize().await.unwrap();
                    table
                        .vacuum()
                        .with_retention_period(chrono::Duration::zero())
                        .with_enforce_retention_duration(false)
                        .await
                        .unwrap();
                }
            }
            Step::Round(seconds) => {
                // What the other instance committed reaches the feed within a second
                // in the service; here before the round, as SQL reads it.
                aggregator.follow_now().await.unwrap();
                now += i64::from(seconds) * 1000;
                rounds += 1;
                for sql in RULES {
                    let scanned = scanned(&engine, sql, now).await;
                    let folded = incremental
                        .run(sql, now)
                        .await
                        .unwrap()
                        .unwrap_or_else(|| panic!("not incremental: {sql}"));
                    prop_assert_eq!(
                        lines(&folded),
                        scanned,
                        "round {} at {} ms: {}",
                        rounds,
                        now,
                        sql
                    );
                }
            }
        }
    }
    // The rules that differ only above their aggregates (a threshold; the two
    // absence rules) read one leaf each; the median and the rows read recent rows,
    // not leaves.
    let (_, leaves) = incremental.footprint().await;
    prop_assert_eq!(leaves, RULES.len() - 4);
    Ok(())
}

/// The case the property test above reaches only now and then: a row this instance
/// holds, retried to the other instance, which commits it first; this instance's flush
/// then finds it in the lake, and every aggregate and window counts it once again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_both_instances_accepted_counts_once_after_the_second_flush() {
    let row = vec![(0, 0, 0, -1000, 7), (1, 1, 1, -61_000, 8)];
    run_with(
        Vec::new(),
        false,
        vec![
            Step::Deliver(row),
            Step::Round(1),
            Step::RedeliverOther(1),
            Step::FlushOther,
            Step::Round(1),
            Step::Flush,
            Step::Round(1),
            Step::Fold,
            Step::Round(5),
        ],
        true,
    )
    .await
    .unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(6))]
    #[test]
    fn every_round_from_partials_is_the_scan_of_the_same_rows_with_another_writer_on_the_lake(
        before in proptest::collection::vec(point(), 0..20),
        flush_before: bool,
        steps in steps_with_another_writer(),
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(run_with(before, flush_before, steps, true))?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(6))]
    #[test]
    fn every_round_from_partials_is_the_scan_of_the_same_rows(
        before in proptest::collection::vec(point(), 0..20),
        flush_before: bool,
        steps in steps(),
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(run(before, flush_before, steps))?;
    }
}

#[tokio::test]
async fn a_round_off_the_second_or_before_the_start_runs_as_sql() {
    let dir = tempfile::tempdir().unwrap();
    let (aggregator, lake) = open(&dir).await;
    let engine = Arc::new(QueryEngine::new(lake, None));
    let incremental = Incremental::new(Arc::clone(&engine), Arc::new(aggregator));
    let sql = RULES[0];
    assert!(incremental.run(sql, START_MS).await.unwrap().is_some());
    assert!(
        incremental
            .run(sql, START_MS + 500)
            .await
            .unwrap()
            .is_none(),
        "off the second"
    );
    assert!(
        incremental
            .run(sql, START_MS - 3_600_000)
            .await
            .unwrap()
            .is_none(),
        "before what the leaf holds"
    );
    assert!(
        incremental
            .run(sql, START_MS + 60_000)
            .await
            .unwrap()
            .is_some()
    );
    // Another shape is run as SQL, and says why.
    // No partial state for median: over the recent rows in memory, and says why.
    let median = "SELECT account_id, median(sum) FROM metrics \
                  WHERE time > now() - INTERVAL '5 minutes' GROUP BY account_id";
    assert!(incremental.run(median, START_MS).await.unwrap().is_some());
    match Incremental::path(&engine, median).await.unwrap() {
        Path::Window { longest, reason } => {
            assert_eq!(longest, std::time::Duration::from_secs(300));
            assert!(reason.contains("median has no partial state"), "{reason}")
        }
        other => panic!("{other}"),
    }
    // No window at all: the lake.
    let all = "SELECT account_id, sum(sum) FROM metrics GROUP BY account_id";
    assert!(incremental.run(all, START_MS).await.unwrap().is_none());
    match Incremental::path(&engine, all).await.unwrap() {
        Path::Sql(reason) => assert!(reason.contains("without a window"), "{reason}"),
        other => panic!("{other}"),
    }
    // A plan that uses now() above its aggregates as an instant is made at each
    // round's instant without planning it again; one that uses it otherwise (a
    // truncation) is planned each round; their aggregates come from partials alike.
    let above = "SELECT account_id, sum(sum) FROM metrics \
                 WHERE time > now() - INTERVAL '5 minutes' GROUP BY account_id \
                 HAVING max(time) < now() - INTERVAL '1 minute'";
    let truncated = "SELECT account_id, sum(sum) FROM metrics \
                 WHERE time > now() - INTERVAL '5 minutes' GROUP BY account_id \
                 HAVING max(time) < date_trunc('minute', now())";
    for (sql, replanned) in [(above, false), (truncated, true)] {
        match Incremental::path(&engine, sql).await.unwrap() {
            Path::Incremental(leaves) => assert_eq!(
                leaves[0].contains("planned each round"),
                replanned,
                "{leaves:?}"
            ),
            other => panic!("{other}"),
        }
        assert!(incremental.run(sql, START_MS).await.unwrap().is_some());
    }
    match Incremental::path(&engine, RULES[1]).await.unwrap() {
        Path::Incremental(leaves) => assert_eq!(leaves.len(), 1),
        other => panic!("{other}"),
    }
}

#[tokio::test]
async fn a_leaf_started_while_the_writer_is_between_emitting_and_publishing_misses_no_rows() {
    let dir = tempfile::tempdir().unwrap();
    let (aggregator, lake) = open(&dir).await;
    let engine = Arc::new(QueryEngine::new(
        lake,
        Some(Arc::new(Hot(aggregator.clone()))),
    ));
    let feed = Arc::new(Gated {
        inner: aggregator.clone(),
        gate: std::sync::Mutex::new(Gate::Open),
        held_calls: 0.into(),
    });
    let incremental = Incremental::new(Arc::clone(&engine), Arc::clone(&feed) as _);
    let first = RULES[0];
    assert!(incremental.run(first, START_MS).await.unwrap().is_some());
    // The snapshot as it stands, then rows the feed hands over (to the first leaf's
    // round) while the snapshot a new leaf starts from is still that one.
    let stale = super::RowFeed::hot(&aggregator, Table::Metrics, None);
    aggregator
        .write(vec![(
            Table::Metrics,
            rows(&[(0, 1, 0, -1000, 7)], START_MS),
        )])
        .await
        .unwrap();
    // Behind once, then caught up (the writer publishes right after).
    *feed.gate.lock().unwrap() = Gate::Release(stale.expect("a single writer is always settled"));
    let second = RULES[4];
    let at = START_MS + 1000;
    let folded = incremental.run(second, at).await.unwrap().unwrap();
    assert_eq!(lines(&folded), scanned(&engine, second, at).await);
    assert_eq!(lines(&folded).len(), 1, "the row written is in the result");
}

#[tokio::test]
async fn a_broken_leaf_starts_again_once_its_wait_is_over_and_waits_twice_as_long_next_time() {
    breaks_and_starts_again(RULES[5]).await;
}

#[tokio::test]
async fn recent_rows_past_their_bound_are_read_again_once_the_wait_is_over_and_twice_as_late_next_time()
 {
    breaks_and_starts_again(RULES[9]).await;
}

/// `sql`'s state (a leaf's partials, or the recent rows it runs over) passes its
/// bound: the rule runs as SQL until the state starts again, ten minutes after the
/// first round that finds it broken, then twenty after it breaks again.
async fn breaks_and_starts_again(sql: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (aggregator, lake) = open(&dir).await;
    let engine = Arc::new(QueryEngine::new(
        lake,
        Some(Arc::new(Hot(aggregator.clone()))),
    ));
    // Any partial passes a bound of one byte; none at all does not.
    let incremental =
        Incremental::new(Arc::clone(&engine), Arc::new(aggregator.clone())).with_window_bytes(1);
    let minute = 60_000;
    let write = |at: i64| {
        let aggregator = aggregator.clone();
        async move {
            aggregator
                .write(vec![(Table::Metrics, rows(&[(0, 0, 0, -1000, 5)], at))])
                .await
                .unwrap();
            aggregator.flush().await.unwrap();
        }
    };
    let from_partials = |at: i64| {
        let incremental = &incremental;
        async move { incremental.run(sql, at).await.unwrap() }
    };
    let started_again_as_the_scan = |at: i64| {
        let (incremental, engine) = (&incremental, &engine);
        async move {
            let folded = incremental
                .run(sql, at)
                .await
                .unwrap()
                .expect("started again");
            assert_eq!(lines(&folded), scanned(engine, sql, at).await);
        }
    };

    write(START_MS).await;
    assert!(
        from_partials(START_MS).await.is_none(),
        "past its bound: SQL"
    );
    assert!(
        from_partials(START_MS + 9 * minute).await.is_none(),
        "still waiting"
    );
    // Ten minutes on, the row is out of the window: it starts again, and fits.
    started_again_as_the_scan(START_MS + 10 * minute).await;

    // Broken again by a new row: the wait is twice as long.
    let due = START_MS + 10 * minute;
    write(due).await;
    let found = due + 1000;
    assert!(from_partials(found).await.is_none());
    assert!(
        from_partials(found + 10 * minute).await.is_none(),
        "ten minutes are not enough now"
    );
    started_again_as_the_scan(found + 20 * minute).await;
}

/// The write path's feed, its snapshot held (a start waiting for it spins) until
/// released with a snapshot of the test's choosing, then as it is: as the writer's
/// is for a moment between emitting rows and publishing the snapshot that shows them.
struct Gated {
    inner: Aggregator,
    gate: std::sync::Mutex<Gate>,
    /// Calls of `hot` while held.
    held_calls: std::sync::atomic::AtomicUsize,
}

enum Gate {
    Open,
    Held,
    Release((u64, Vec<RecordBatch>)),
}

impl super::RowFeed for Gated {
    fn subscribe(
        &self,
    ) -> (
        tokio::sync::mpsc::UnboundedReceiver<Arc<fleetlake_aggregate::feed::FeedItem>>,
        u64,
    ) {
        self.inner.subscribe()
    }

    fn hot(&self, table: Table, lake_version: Option<i64>) -> Option<(u64, Vec<RecordBatch>)> {
        let mut gate = self.gate.lock().unwrap();
        match std::mem::replace(&mut *gate, Gate::Open) {
            Gate::Open => self.inner.hot(table, lake_version),
            Gate::Held => {
                *gate = Gate::Held;
                self.held_calls
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Some((0, Vec::new()))
            }
            Gate::Release(snapshot) => Some(snapshot),
        }
    }
}

#[tokio::test]
async fn a_restart_reads_the_lake_without_holding_up_other_rules_and_folds_what_they_took_off_the_feed_meanwhile()
 {
    let leaf_rule = RULES[0];
    let scanned_rule = "SELECT count(*) AS n FROM metrics";
    let minute = 60_000;
    let restart_at = START_MS + 10 * minute;
    let r2 = rows(&[(0, 0, 0, -2000, 3)], restart_at);
    let r3 = rows(&[(1, 0, 1, -1000, 4)], restart_at);

    // The bound: twice what the leaf holds once started again with both rows (one
    // fold each), measured on another lake.
    let bound = {
        let dir = tempfile::tempdir().unwrap();
        let (aggregator, lake) = open(&dir).await;
        let engine = Arc::new(QueryEngine::new(lake, None));
        let incremental = Incremental::new(engine, Arc::new(aggregator.clone()));
        // A round each, at instants a second apart: a round at the instant of the
        // one before would not look at the feed again.
        for (rows, at) in [(&r2, restart_at), (&r3, restart_at + 1000)] {
            aggregator
                .write(vec![(Table::Metrics, rows.clone())])
                .await
                .unwrap();
            assert!(incremental.run(leaf_rule, at).await.unwrap().is_some());
        }
        let (bytes, leaves) = incremental.footprint().await;
        assert_eq!(leaves, 1);
        2 * bytes
    };

    let dir = tempfile::tempdir().unwrap();
    let (aggregator, lake) = open(&dir).await;
    let engine = Arc::new(QueryEngine::new(
        lake,
        Some(Arc::new(Hot(aggregator.clone()))),
    ));
    let feed = Arc::new(Gated {
        inner: aggregator.clone(),
        gate: std::sync::Mutex::new(Gate::Open),
        held_calls: 0.into(),
    });
    let incremental = Arc::new(
        Incremental::new(Arc::clone(&engine), Arc::clone(&feed) as _).with_window_bytes(bound),
    );
    // A burst of groups (a slot per second of five minutes, three accounts) breaks the
    // leaf; it is in the lake, out of the window once the leaf starts again.
    let burst: Vec<Point> = (0..300)
        .flat_map(|s| (0..3).map(move |a| (a, 0, 0, -1000 * i64::from(s), 1)))
        .collect();
    aggregator
        .write(vec![(Table::Metrics, rows(&burst, START_MS))])
        .await
        .unwrap();
    aggregator.flush().await.unwrap();
    assert!(
        incremental
            .run(leaf_rule, START_MS)
            .await
            .unwrap()
            .is_none(),
        "the burst passes the bound of {bound} bytes"
    );

    // Ten minutes on the leaf starts again: from a snapshot holding r2 but not r3,
    // which another rule's round takes off the feed while the start waits.
    aggregator
        .write(vec![(Table::Metrics, r2.clone())])
        .await
        .unwrap();
    let version = engine
        .lake_table(Table::Metrics)
        .await
        .unwrap()
        .and_then(|d| d.version());
    let snapshot = super::RowFeed::hot(&aggregator, Table::Metrics, version.map(|v| v as i64));
    *feed.gate.lock().unwrap() = Gate::Held;
    let restarting = tokio::spawn({
        let incremental = Arc::clone(&incremental);
        async move { incremental.run(leaf_rule, restart_at).await }
    });
    while feed.held_calls.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    aggregator
        .write(vec![(Table::Metrics, r3.clone())])
        .await
        .unwrap();
    // A second later (a round at the same instant would not look at the feed again).
    assert!(
        incremental
            .run(scanned_rule, restart_at + 1000)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        !restarting.is_finished(),
        "another rule's round went on while the start waited for its snapshot"
    );
    *feed.gate.lock().unwrap() =
        Gate::Release(snapshot.expect("a single writer is always settled"));
    let folded = restarting.await.unwrap().unwrap().expect("started again");
    assert_eq!(
        lines(&folded),
        scanned(&engine, leaf_rule, restart_at).await
    );
    assert_eq!(lines(&folded).len(), 2, "both rows are in the result");
}

#[tokio::test]
async fn a_plan_that_uses_now_above_its_leaves_is_moved_to_each_rounds_instant() {
    let dir = tempfile::tempdir().unwrap();
    let (aggregator, lake) = open(&dir).await;
    let engine = Arc::new(
        QueryEngine::new(lake, Some(Arc::new(Hot(aggregator.clone())))).with_table(
            "accounts",
            SideTable::Rows(accounts(0).schema(), Arc::new(|| accounts(3))),
        ),
    );
    // Accounts 1 to 3 last seen 5 and 3 minutes before the first round; account 4
    // never.
    let seen = [
        (0, 0, 0, -300_000, 1),
        (1, 1, 0, -300_000, 2),
        (2, 0, 1, -180_000, 3),
    ];
    aggregator
        .write(vec![(Table::Metrics, rows(&seen, START_MS))])
        .await
        .unwrap();
    let incremental = Incremental::new(Arc::clone(&engine), Arc::new(aggregator.clone()));
    // The shipped absence rule: `now()` above its leaf as a timestamp (the cut) and as
    // epoch seconds (the value); and the same with `date_trunc`, planned each round.
    for (sql, replanned) in [(RULES[7], false), (RULES[11], true)] {
        match Incremental::path(&engine, sql).await.unwrap() {
            Path::Incremental(leaves) => {
                assert_eq!(
                    leaves[0].contains("planned each round"),
                    replanned,
                    "{leaves:?}"
                )
            }
            other => panic!("{other}"),
        }
        let mut values = Vec::new();
        for seconds in [0, 1, 7, 61, 3_599] {
            let at = START_MS + seconds * 1000;
            let folded = incremental.run(sql, at).await.unwrap().unwrap();
            assert_eq!(
                lines(&folded),
                scanned(&engine, sql, at).await,
                "{sql} at +{seconds} s"
            );
            values.push(lines(&folded));
        }
        if !replanned {
            // The values moved with the instant (seconds since last seen).
            values.dedup();
            assert_eq!(values.len(), 5, "{sql}: {values:?}");
        }
    }
    // Planned once: the absence rule with the registry joined as a physical plan
    // reading the registry's rows at each run; a threshold, and a cut moving with
    // now(), as expressions over the leaf's result.
    let planned_once = [
        (RULES[7], "compiled"),
        (RULES[11], "replanned"),
        (RULES[5], "direct"),
        (RULES[6], "direct"),
        (RULES[1], "direct"),
        (RULES[8], "compiled"),
    ];
    // After the rounds above: rounds move forward.
    for seconds in [3_600, 3_601, 3_661] {
        let at = START_MS + seconds * 1000;
        for (sql, _) in planned_once {
            let folded = incremental
                .run(sql, at)
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("not incremental at +{seconds} s: {sql}"));
            assert_eq!(lines(&folded), scanned(&engine, sql, at).await, "{sql}");
        }
    }
    for (sql, how) in planned_once {
        assert_eq!(incremental.how(sql).await, Some(how), "{sql}");
    }
}

/// A map of strings per row (`None`: a null row; an entry's value may be null).
type MapRows = Vec<Option<Vec<(String, Option<String>)>>>;

fn map_rows() -> impl Strategy<Value = MapRows> {
    let entry = ("[a-c]{1,2}", proptest::option::of("[x-z]{0,3}"));
    proptest::collection::vec(
        proptest::option::weighted(0.8, proptest::collection::vec(entry, 0..4)),
        1..24,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Grouping rows by value takes maps, lists and structs of them as arrow's
    /// `take` does, sliced or not.
    #[test]
    fn taking_nested_columns_is_arrows_take(rows in map_rows(), picks in proptest::collection::vec(any::<u16>(), 0..40), cut in 0usize..4) {
        use arrow::array::{Array, ArrayRef, Int32Builder, ListBuilder, MapBuilder, StringBuilder, StructArray, UInt32Array};
        use arrow::datatypes::{DataType, Field};
        let mut maps = MapBuilder::new(None, StringBuilder::new(), StringBuilder::new());
        let mut lists = ListBuilder::new(Int32Builder::new());
        for row in &rows {
            match row {
                Some(entries) => {
                    for (k, v) in entries {
                        maps.keys().append_value(k);
                        maps.values().append_option(v.as_deref());
                        lists.values().append_value(k.len() as i32);
                    }
                    maps.append(true).unwrap();
                    lists.append(true);
                }
                None => {
                    maps.append(false).unwrap();
                    lists.append(false);
                }
            }
        }
        let map: ArrayRef = Arc::new(maps.finish());
        let list: ArrayRef = Arc::new(lists.finish());
        let structs: ArrayRef = Arc::new(StructArray::from(vec![
            (Arc::new(Field::new("m", map.data_type().clone(), true)), Arc::clone(&map)),
            (Arc::new(Field::new("l", list.data_type().clone(), true)), Arc::clone(&list)),
        ]));
        let cut = cut.min(rows.len() - 1);
        let len = rows.len() - cut;
        let indices = UInt32Array::from(
            picks.iter().map(|p| (*p as usize % len) as u32).collect::<Vec<_>>(),
        );
        for array in [map, list, structs] {
            let array = array.slice(cut, len);
            let ours = super::take_column(&array, &indices).unwrap();
            let arrows = arrow::compute::take(&array, &indices, None).unwrap();
            prop_assert_eq!(ours.data_type(), &arrows.data_type().clone());
            prop_assert_eq!(&ours, &arrows, "{:?}", array.data_type());
            prop_assert!(!matches!(ours.data_type(), DataType::Null));
        }
    }
}

/// A commit whose rows could not be read breaks a state that read an earlier lake
/// version, whatever hot snapshot it read (the rows are in no snapshot), and no state
/// that read that version or a later one.
#[test]
fn a_lost_commit_is_told_by_the_lake_version_a_state_read() {
    let lost = |table, version| {
        Arc::new(fleetlake_aggregate::feed::FeedItem::lost_commit(
            5, table, version,
        ))
    };
    let items = [lost(Table::Logs, 9), lost(Table::Metrics, 7)];
    assert_eq!(
        super::lost_after(&items, Table::Metrics, (10, Some(6))),
        Some(7)
    );
    assert_eq!(
        super::lost_after(&items, Table::Metrics, (1, None)),
        Some(7)
    );
    assert_eq!(
        super::lost_after(&items, Table::Metrics, (1, Some(7))),
        None
    );
    assert_eq!(
        super::lost_after(&items, Table::Logs, (10, Some(8))),
        Some(9)
    );
}

/// Commits of the other instance whose files are vacuumed before this one reads them
/// (and a row of theirs mirrored here before): every aggregate and window reads the
/// lake again at the next round and gives the scan's result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_other_instances_commits_vacuumed_before_they_were_read_are_read_from_the_lake() {
    run_with(
        vec![(2, 0, 1, -2000, 3)],
        true,
        vec![
            Step::Round(1),
            Step::DeliverOther(vec![(0, 0, 0, -1000, 7)]),
            Step::PublishOther,
            Step::Round(1),
            Step::FlushOther,
            Step::DeliverOther(vec![(1, 1, 1, -61_000, 8)]),
            Step::FlushOther,
            Step::VacuumOther,
            Step::Round(1),
            Step::DeliverOther(vec![(1, 0, 1, -3000, 5)]),
            Step::FlushOther,
            Step::Round(2),
        ],
        true,
    )
    .await
    .unwrap();
}

/// A datapoint this instance holds, retried to the other: the other's published copy
/// is left out here (this instance's counts), and once the other commits it, this
/// instance's flush follows at once and takes its copy back. A datapoint the other
/// holds, retried to this instance after its copy was mirrored here: the mirrored copy
/// is taken back as this instance's becomes visible. Every round counts each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_retried_to_the_other_instance_counts_once_in_every_round() {
    run_with(
        Vec::new(),
        false,
        vec![
            Step::Deliver(vec![(0, 0, 0, -1000, 7)]),
            Step::Round(1),
            Step::Count(1),
            Step::RedeliverOther(1),
            Step::PublishOther,
            Step::Round(1),
            Step::Count(1),
            Step::FlushOther,
            Step::Round(1),
            Step::Count(1),
            Step::DeliverOther(vec![(1, 1, 1, -2000, 3)]),
            Step::PublishOther,
            Step::Round(1),
            Step::Count(2),
            // The other order: the other's copy mirrored here first, then the retry
            // reaches this instance.
            Step::Redeliver(2),
            Step::Round(1),
            Step::Count(2),
            Step::FlushOther,
            Step::Round(1),
            Step::Count(2),
            Step::Flush,
            Step::Round(1),
            Step::Count(2),
        ],
        true,
    )
    .await
    .unwrap();
}

/// Rows the other instance published are in the rounds before its commit, and once
/// after it: those it committed are not counted again, and one it found already in the
/// lake (a retry of a row this instance committed) is taken back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_the_other_instance_published_count_once_after_its_commit() {
    let rows = vec![(0, 0, 0, -1000, 7), (1, 1, 1, -61_000, 8)];
    run_with(
        Vec::new(),
        false,
        vec![
            Step::DeliverOther(rows.clone()),
            Step::PublishOther,
            Step::Round(1),
            Step::FlushOther,
            Step::Round(1),
            Step::Deliver(vec![(2, 0, 1, -2000, 3)]),
            Step::Flush,
            Step::RedeliverOther(2),
            Step::PublishOther,
            Step::Round(1),
            Step::FlushOther,
            Step::Round(1),
            Step::Fold,
            Step::Round(5),
        ],
        true,
    )
    .await
    .unwrap();
}
