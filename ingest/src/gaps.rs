//! Holes in what the streams delivered, found as it arrives, for the gap fill.
//!
//! [`Tracked`] wraps the sinks the sources write to: every metrics batch made durable
//! marks its (account, region, minute)s in a [`Coverage`]. A hole is a run of at least
//! `min_gap` of missing minutes between minutes an account did deliver: the account's
//! stream was down (or fleetlake was, longer than the sender retried) and has resumed.
//! [`Coverage::holes`] hands each hole out once; the service then fetches it with
//! GetMetricData ([`crate::cloudwatch`]), and the lake's de-duplication drops whatever
//! of it did arrive after all.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::TimestampMicrosecondType;
use futures::future::BoxFuture;

use fleetlake_model::Table;
use fleetlake_model::schema::col;
use fleetlake_model::sink::{PositionsResult, RowSink, SinkError, StreamSink};

const MINUTE_MS: i64 = 60_000;

/// A run of minutes an account delivered no metrics for, with data on both sides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hole {
    /// The account.
    pub account_id: String,
    /// The region.
    pub region: String,
    /// First missing minute, epoch ms.
    pub start_ms: i64,
    /// The minute data resumed, epoch ms (exclusive end of the hole).
    pub end_ms: i64,
}

/// Minutes (epoch ms / 60,000) covered, as runs: start → end (exclusive). An account
/// that delivers every minute is one run, however long.
#[derive(Debug, Default)]
struct Runs(BTreeMap<i64, i64>);

impl Runs {
    fn insert(&mut self, minute: i64) {
        self.insert_run(minute, minute + 1);
    }

    /// Adds minutes `start..end`, merging with the runs they touch or overlap.
    fn insert_run(&mut self, mut start: i64, mut end: i64) {
        if let Some((&s, &e)) = self.0.range(..=start).next_back()
            && e >= start
        {
            if e >= end {
                return;
            }
            start = s;
        }
        let touched: Vec<(i64, i64)> = self.0.range(start..=end).map(|(&s, &e)| (s, e)).collect();
        for (s, e) in touched {
            self.0.remove(&s);
            end = end.max(e);
        }
        self.0.insert(start, end);
    }
}

/// The minutes each (account, region) delivered metrics for, over a recent window.
#[derive(Debug, Default)]
pub struct Coverage {
    /// `account \x1f region` → runs of minutes.
    minutes: Mutex<HashMap<String, Runs>>,
}

impl Coverage {
    /// An empty coverage.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Marks the minutes of a `metrics` batch as delivered.
    pub fn observe(&self, batch: &RecordBatch) {
        let (Some(times), Some(accounts), Some(regions)) = (
            batch
                .column(col::TIME)
                .as_primitive_opt::<TimestampMicrosecondType>(),
            batch.column(col::ACCOUNT_ID).as_string_opt::<i32>(),
            batch.column(col::REGION).as_string_opt::<i32>(),
        ) else {
            return;
        };
        let mut map = self.minutes.lock().expect("coverage lock");
        let mut key = String::new();
        let mut last: Option<(usize, i64)> = None;
        for row in 0..batch.num_rows() {
            if times.is_null(row) || accounts.is_null(row) || regions.is_null(row) {
                continue;
            }
            let minute = times.value(row).div_euclid(MINUTE_MS * 1000);
            let (account, region) = (accounts.value(row), regions.value(row));
            // Rows of one record share an account and mostly a minute.
            if let Some((prev, prev_minute)) = last
                && prev_minute == minute
                && accounts.value(prev) == account
                && regions.value(prev) == region
            {
                continue;
            }
            last = Some((row, minute));
            key.clear();
            key.push_str(account);
            key.push('\x1f');
            key.push_str(region);
            match map.get_mut(key.as_str()) {
                Some(runs) => runs.insert(minute),
                None => {
                    let mut runs = Runs::default();
                    runs.insert(minute);
                    map.insert(key.clone(), runs);
                }
            }
        }
    }

    /// Marks one minute of an account as delivered (seeding from the lake at start).
    pub fn mark(&self, account_id: &str, region: &str, time_ms: i64) {
        self.minutes
            .lock()
            .expect("coverage lock")
            .entry(format!("{account_id}\x1f{region}"))
            .or_default()
            .insert(time_ms.div_euclid(MINUTE_MS));
    }

    /// Holes of at least `min_gap_ms` that ended (data resumed) at least `settle_ms`
    /// before `now_ms` and began no earlier than `lookback_ms` before it. Each is
    /// returned once: its minutes count as covered from then on. Minutes older than
    /// the lookback are forgotten.
    pub fn holes(
        &self,
        now_ms: i64,
        min_gap_ms: i64,
        settle_ms: i64,
        lookback_ms: i64,
    ) -> Vec<Hole> {
        let oldest = (now_ms - lookback_ms).div_euclid(MINUTE_MS);
        let settled = (now_ms - settle_ms).div_euclid(MINUTE_MS);
        let min_gap = (min_gap_ms / MINUTE_MS).max(1);
        let mut out = Vec::new();
        let mut map = self.minutes.lock().expect("coverage lock");
        map.retain(|key, runs| {
            runs.0.retain(|_, end| *end > oldest);
            let mut found = Vec::new();
            for ((_, a), (b, _)) in runs.0.iter().zip(runs.0.iter().skip(1)) {
                // Missing minutes a .. b-1.
                if b - a >= min_gap && *b <= settled {
                    found.push((*a, *b));
                }
            }
            for &(start, end) in &found {
                runs.insert_run(start, end);
                let (account, region) = key.split_once('\x1f').unwrap_or((key, ""));
                out.push(Hole {
                    account_id: account.to_owned(),
                    region: region.to_owned(),
                    start_ms: start * MINUTE_MS,
                    end_ms: end * MINUTE_MS,
                });
            }
            !runs.0.is_empty()
        });
        out.sort_by(|a, b| (a.start_ms, &a.account_id).cmp(&(b.start_ms, &b.account_id)));
        out
    }

    /// (account, region) pairs tracked.
    pub fn len(&self) -> usize {
        self.minutes.lock().expect("coverage lock").len()
    }

    /// Whether nothing is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The `metrics` batches of a write (cheap copies: arrays are shared).
fn metrics_of(rows: &[(Table, RecordBatch)]) -> Vec<RecordBatch> {
    rows.iter()
        .filter(|(table, _)| *table == Table::Metrics)
        .map(|(_, batch)| batch.clone())
        .collect()
}

/// A sink that records in a [`Coverage`] which minutes each account delivered, once
/// the inner sink took them.
pub struct Tracked<S: ?Sized> {
    inner: Arc<S>,
    coverage: Arc<Coverage>,
}

impl<S: ?Sized> Tracked<S> {
    /// `inner`, tracked into `coverage`.
    pub fn new(inner: Arc<S>, coverage: Arc<Coverage>) -> Self {
        Self { inner, coverage }
    }
}

impl<S: RowSink + ?Sized> RowSink for Tracked<S> {
    fn write(&self, rows: Vec<(Table, RecordBatch)>) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move {
            let metrics = metrics_of(&rows);
            self.inner.write(rows).await?;
            metrics
                .iter()
                .for_each(|batch| self.coverage.observe(batch));
            Ok(())
        })
    }

    fn admit(&self) -> Result<(), SinkError> {
        self.inner.admit()
    }
}

impl<S: StreamSink + ?Sized> StreamSink for Tracked<S> {
    fn write_positioned(
        &self,
        rows: Vec<(Table, RecordBatch)>,
        positions: Vec<(String, String)>,
    ) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move {
            let metrics = metrics_of(&rows);
            self.inner.write_positioned(rows, positions).await?;
            metrics
                .iter()
                .for_each(|batch| self.coverage.observe(batch));
            Ok(())
        })
    }

    fn committed_positions(&self) -> Vec<(Table, std::collections::BTreeMap<String, String>)> {
        self.inner.committed_positions()
    }

    fn read_positions(&self, keys: Vec<String>) -> BoxFuture<'_, PositionsResult> {
        self.inner.read_positions(keys)
    }

    fn hold_positions(
        &self,
        positions: Vec<(Table, std::collections::BTreeMap<String, String>)>,
    ) -> BoxFuture<'_, ()> {
        self.inner.hold_positions(positions)
    }

    fn commit_without(&self, keys: Vec<String>) -> BoxFuture<'_, Result<(), SinkError>> {
        self.inner.commit_without(keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metric_stream::{BaseStats, MetricsBatchBuilder, SeriesId};

    const T: i64 = 1_767_657_600_000; // 2026-01-06T00:00:00Z

    fn batch(rows: &[(&str, i64)]) -> RecordBatch {
        let mut b = MetricsBatchBuilder::new();
        for (account, minute) in rows {
            for metric in ["A", "B"] {
                b.append(
                    SeriesId {
                        account_id: account,
                        region: "us-east-1",
                        namespace: "N",
                        metric_name: metric,
                    },
                    T + minute * MINUTE_MS,
                    [],
                    None,
                    BaseStats::default(),
                    [],
                )
                .unwrap();
            }
        }
        b.finish()
    }

    #[test]
    fn a_run_of_missing_minutes_between_data_is_a_hole_once() {
        let c = Coverage::default();
        let minutes: Vec<(&str, i64)> = (0..10)
            .chain(20..25)
            .map(|m| ("111111111111", m))
            .chain((0..25).map(|m| ("222222222222", m)))
            .collect();
        c.observe(&batch(&minutes));
        let now = T + 30 * MINUTE_MS;
        let holes = c.holes(now, 5 * MINUTE_MS, 0, 3_600_000);
        assert_eq!(
            holes,
            vec![Hole {
                account_id: "111111111111".into(),
                region: "us-east-1".into(),
                start_ms: T + 10 * MINUTE_MS,
                end_ms: T + 20 * MINUTE_MS,
            }]
        );
        // Handed out once.
        assert!(c.holes(now, 5 * MINUTE_MS, 0, 3_600_000).is_empty());
    }

    #[test]
    fn short_unsettled_and_old_holes_are_left_alone() {
        let c = Coverage::default();
        c.observe(&batch(&[
            ("1", 0),
            ("1", 3),
            ("1", 10),
            ("1", 200),
            ("1", 210),
        ]));
        let now = T + 212 * MINUTE_MS;
        // 0 → 3, 3 → 10 and 10 → 200 began before the lookback (60 minutes from
        // now); 200 → 210 has not settled.
        let holes = c.holes(now, 5 * MINUTE_MS, 5 * MINUTE_MS, 60 * MINUTE_MS);
        assert!(holes.is_empty(), "{holes:?}");
        let holes = c.holes(
            now + 3 * MINUTE_MS,
            5 * MINUTE_MS,
            5 * MINUTE_MS,
            300 * MINUTE_MS,
        );
        assert_eq!(holes.len(), 1, "{holes:?}");
        assert_eq!(holes[0].start_ms, T + 201 * MINUTE_MS);
        // The forgotten minutes do not come back.
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn runs_merge_whatever_order_minutes_come_in() {
        let mut r = Runs::default();
        for m in [5, 3, 4, 10, 12, 11, 1, 2, 0, 7] {
            r.insert(m);
        }
        assert_eq!(
            r.0.iter().map(|(&s, &e)| (s, e)).collect::<Vec<_>>(),
            vec![(0, 6), (7, 8), (10, 13)]
        );
        r.insert_run(6, 10);
        assert_eq!(
            r.0.iter().map(|(&s, &e)| (s, e)).collect::<Vec<_>>(),
            vec![(0, 13)]
        );
        r.insert(4);
        assert_eq!(r.0.len(), 1);
    }

    #[test]
    fn a_seeded_minute_closes_a_hole_across_a_restart() {
        let c = Coverage::default();
        c.mark("1", "us-east-1", T + 5 * MINUTE_MS + 30_000);
        c.observe(&batch(&[("1", 40)]));
        let holes = c.holes(T + 41 * MINUTE_MS, 5 * MINUTE_MS, 0, 3_600_000);
        assert_eq!(holes.len(), 1);
        assert_eq!(
            (holes[0].start_ms, holes[0].end_ms),
            (T + 6 * MINUTE_MS, T + 40 * MINUTE_MS)
        );
    }
}
