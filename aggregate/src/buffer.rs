//! The hot buffer: datapoints acknowledged since the last lake commit, de-duplicated
//! and queryable.
//!
//! Rows enter in write-ahead-log order ([`HotBuffer::insert`]) and leave in flushes:
//! [`HotBuffer::begin_flush`] moves the open generation aside (still queryable) and
//! hands it to the lake writer, [`HotBuffer::complete_flush`] drops it once committed.
//! The buffer belongs to one owner (the writer); readers get a [`BufferView`]
//! ([`HotBuffer::view`]): an immutable picture of the queryable rows that shares the
//! row chunks with the buffer, so publishing one after every group commit costs a
//! pointer per chunk, not a copy of the rows.
//!
//! De-duplication on (account, region, namespace, metric, dimensions, time):
//! - against the buffer, by an exact set of datapoint keys;
//! - against the lake, by a per-series watermark: the latest time of the series known
//!   to be in the lake. A row after its series' watermark cannot be in the lake. A row
//!   at or before it (a redelivery, or late data) is a *suspect*: it is held back from
//!   queries and checked against the lake when flushed. A series not seen since start
//!   has the lake's overall latest time as watermark.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{BooleanArray, RecordBatch};
use arrow::compute::filter_record_batch;

use fleetlake_model::schema::Table;

use fleetlake_model::keys::{KeyHasher, row_keys};

/// How long the rows of a finished flush stay visible through the buffer, covering a
/// query that loaded the lake just before that commit.
const RECENT_RETENTION: Duration = Duration::from_secs(10);

/// Rows published together: an immutable, shared slice of batches.
type Chunk = Arc<[RecordBatch]>;

#[derive(Debug, Default)]
struct Generation {
    /// Visible rows already in a view, in the chunks the views share.
    chunks: Vec<Chunk>,
    /// Visible rows inserted since the last view.
    pending: Vec<RecordBatch>,
    suspects: Vec<RecordBatch>,
    keys: HashSet<u128, KeyHasher>,
    /// The keys of the suspects (few: redelivered and late rows).
    suspect_keys: HashSet<u128, KeyHasher>,
    /// Latest time of the visible rows (epoch µs).
    max_time: Option<i64>,
    rows: usize,
    suspect_rows: usize,
    bytes: usize,
    first_seq: Option<u64>,
    last_seq: u64,
}

impl Generation {
    /// Moves the pending rows into a chunk of their own.
    fn seal(&mut self) {
        if !self.pending.is_empty() {
            self.chunks
                .push(Arc::from(std::mem::take(&mut self.pending)));
        }
    }

    /// The visible rows.
    fn batches(&self) -> impl Iterator<Item = &RecordBatch> {
        self.chunks
            .iter()
            .flat_map(|c| c.iter())
            .chain(&self.pending)
    }

    fn absorb(&mut self, mut newer: Generation) {
        self.seal();
        newer.seal();
        self.chunks.extend(newer.chunks);
        self.suspects.extend(newer.suspects);
        self.keys.extend(newer.keys);
        self.suspect_keys.extend(newer.suspect_keys);
        self.max_time = self.max_time.max(newer.max_time);
        self.rows += newer.rows;
        self.suspect_rows += newer.suspect_rows;
        self.bytes += newer.bytes;
        self.first_seq = match (self.first_seq, newer.first_seq) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.last_seq = self.last_seq.max(newer.last_seq);
    }
}

/// What one insert did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct InsertOutcome {
    /// Rows now queryable.
    pub visible: usize,
    /// Rows held back until the flush checks them against the lake.
    pub suspects: usize,
    /// Rows dropped as already in the buffer.
    pub duplicates: usize,
}

/// A flush to perform: rows to write and rows to check against the lake first.
#[derive(Debug)]
pub struct FlushJob {
    /// Rows known not to be in the lake.
    pub batches: Vec<RecordBatch>,
    /// Rows that may already be in the lake.
    pub suspects: Vec<RecordBatch>,
    /// The last WAL sequence number the job covers.
    pub seq: u64,
    /// The latest time (epoch µs) of any row in the lake once the job is committed.
    pub max_time: i64,
}

/// The latest time of each series in `batches` (rows of `table`): what a flush that
/// wrote them makes known to be in the lake. Computed from the rows at flush time
/// rather than kept per series while they are buffered, which would cost a hash map
/// entry per active series.
pub fn latest_per_series(table: Table, batches: &[RecordBatch]) -> HashMap<u64, i64, KeyHasher> {
    let mut latest: HashMap<u64, i64, KeyHasher> = HashMap::default();
    for batch in batches {
        for key in row_keys(table, batch) {
            let t = latest.entry(key.series).or_insert(key.time);
            *t = (*t).max(key.time);
        }
    }
    latest
}

/// The hot buffer (see the module docs).
#[derive(Debug)]
pub struct HotBuffer {
    table: Table,
    open: Generation,
    flushing: Option<Generation>,
    /// The lake version the flushing generation's commit builds on, once the commit may
    /// have been made: a query reading a later version finds those rows in the lake.
    flushing_base: Option<i64>,
    /// Finished flushes still visible here: lake version, when, rows, their bytes.
    recent: VecDeque<(i64, Instant, Chunk, usize)>,
    watermarks: HashMap<u64, i64, KeyHasher>,
    default_watermark: i64,
    lake_max_time: i64,
}

impl HotBuffer {
    /// An empty buffer for `table` over a lake whose latest row time is
    /// `lake_max_time` (epoch µs; `None` for an empty lake).
    pub fn new(table: Table, lake_max_time: Option<i64>) -> Self {
        let max = lake_max_time.unwrap_or(i64::MIN);
        Self {
            table,
            open: Generation::default(),
            flushing: None,
            flushing_base: None,
            recent: VecDeque::new(),
            watermarks: HashMap::default(),
            default_watermark: max,
            lake_max_time: max,
        }
    }

    /// The table whose rows this buffer holds.
    pub fn table(&self) -> Table {
        self.table
    }

    /// Adds the rows of WAL record `seq`, dropping those already buffered.
    pub fn insert(&mut self, seq: u64, batch: &RecordBatch) -> InsertOutcome {
        self.insert_visible(seq, batch, None).0
    }

    /// As [`HotBuffer::insert`], also returning the rows that became visible (neither
    /// duplicates nor suspects), if any, and adding their keys to `points` if given.
    pub fn insert_visible(
        &mut self,
        seq: u64,
        batch: &RecordBatch,
        mut points: Option<&mut Vec<u128>>,
    ) -> (InsertOutcome, Option<RecordBatch>) {
        self.prune_recent(Instant::now());
        let keys = row_keys(self.table, batch);
        let mut visible = Vec::with_capacity(keys.len());
        let mut suspect = Vec::with_capacity(keys.len());
        let mut outcome = InsertOutcome::default();
        for key in &keys {
            let seen = self
                .flushing
                .as_ref()
                .is_some_and(|g| g.keys.contains(&key.point))
                || !self.open.keys.insert(key.point);
            if seen {
                outcome.duplicates += 1;
                visible.push(false);
                suspect.push(false);
                continue;
            }
            let watermark = self
                .watermarks
                .get(&key.series)
                .copied()
                .unwrap_or(self.default_watermark);
            let is_suspect = key.time <= watermark;
            if is_suspect {
                outcome.suspects += 1;
                self.open.suspect_keys.insert(key.point);
            } else {
                outcome.visible += 1;
                self.open.max_time = self.open.max_time.max(Some(key.time));
                if let Some(points) = points.as_deref_mut() {
                    points.push(key.point);
                }
            }
            visible.push(!is_suspect);
            suspect.push(is_suspect);
        }
        let take = |mask: Vec<bool>, n: usize| -> Option<RecordBatch> {
            if n == 0 {
                None
            } else if n == batch.num_rows() {
                Some(batch.clone())
            } else {
                Some(
                    filter_record_batch(batch, &BooleanArray::from(mask))
                        .expect("mask has the batch's length"),
                )
            }
        };
        let shown = take(visible, outcome.visible);
        if let Some(b) = &shown {
            self.open.bytes += b.get_array_memory_size();
            self.open.pending.push(b.clone());
        }
        if let Some(b) = take(suspect, outcome.suspects) {
            self.open.bytes += b.get_array_memory_size();
            self.open.suspects.push(b);
        }
        self.open.rows += outcome.visible;
        self.open.suspect_rows += outcome.suspects;
        self.open.last_seq = self.open.last_seq.max(seq);
        if outcome.visible + outcome.suspects > 0 {
            self.open.first_seq = Some(self.open.first_seq.map_or(seq, |s| s.min(seq)));
        }
        (outcome, shown)
    }

    /// Whether a row with de-duplication key `point` is held, visible and not yet
    /// committed: in the open generation, or also in the flushing one with `flushing`.
    pub fn shows(&self, point: u128, flushing: bool) -> bool {
        let shows = |g: &Generation| g.keys.contains(&point) && !g.suspect_keys.contains(&point);
        shows(&self.open) || (flushing && self.flushing.as_ref().is_some_and(shows))
    }

    /// Whether no row is held and not yet committed.
    pub fn holds_none(&self) -> bool {
        self.open.keys.is_empty() && self.flushing.as_ref().is_none_or(|g| g.keys.is_empty())
    }

    /// The first WAL sequence number whose rows are held and not yet committed, if any:
    /// the log must be kept from there on for this table.
    pub fn pending_since(&self) -> Option<u64> {
        let flushing = self.flushing.as_ref().and_then(|g| g.first_seq);
        match (self.open.first_seq, flushing) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Rows held (open and flushing, suspects included).
    pub fn rows(&self) -> usize {
        let flushing = self
            .flushing
            .as_ref()
            .map_or(0, |g| g.rows + g.suspect_rows);
        self.open.rows + self.open.suspect_rows + flushing
    }

    /// Approximate bytes held by the rows: open, flushing, and those of finished flushes
    /// still kept visible (until their retention passes; they are dropped at the next
    /// insert or flush after that).
    pub fn bytes(&self) -> usize {
        let now = Instant::now();
        let recent: usize = self
            .recent
            .iter()
            .filter(|(_, at, _, _)| now.duration_since(*at) <= RECENT_RETENTION)
            .map(|(_, _, _, bytes)| bytes)
            .sum();
        self.open.bytes + self.flushing.as_ref().map_or(0, |g| g.bytes) + recent
    }

    /// Series whose latest committed time is tracked (rows at or before it are checked
    /// against the lake as possible redeliveries).
    pub fn tracked_series(&self) -> usize {
        self.watermarks.len()
    }

    /// Rows of the open generation, which the next flush takes.
    pub fn open_rows(&self) -> usize {
        self.open.rows + self.open.suspect_rows
    }

    /// Moves the open generation into the flushing one (merging with a flush that
    /// failed before) and returns what to write, or `None` if there is nothing.
    pub fn begin_flush(&mut self) -> Option<FlushJob> {
        self.flushing_base = None;
        let open = std::mem::take(&mut self.open);
        let flushing = match self.flushing.take() {
            Some(mut previous) => {
                previous.absorb(open);
                previous
            }
            None => open,
        };
        if flushing.rows + flushing.suspect_rows == 0 {
            // Nothing to write; keep the sequence so the next generation carries it on.
            self.open.last_seq = flushing.last_seq;
            return None;
        }
        let max_time = flushing
            .max_time
            .unwrap_or(i64::MIN)
            .max(self.lake_max_time);
        let mut flushing = flushing;
        flushing.seal();
        let job = FlushJob {
            batches: flushing.batches().cloned().collect(),
            suspects: flushing.suspects.clone(),
            seq: flushing.last_seq,
            max_time,
        };
        self.flushing = Some(flushing);
        Some(job)
    }

    /// Records that the flushing generation is about to be committed on top of lake
    /// version `base`: from then on, a query reading a version after `base` finds its
    /// rows in the lake, not here (the only writer of the table is this process).
    pub fn committing_on(&mut self, base: Option<i64>) {
        self.flushing_base = Some(base.unwrap_or(-1));
    }

    /// Records that the flushing generation is committed as lake `version`, with
    /// `written` the rows that went in.
    pub fn complete_flush(&mut self, version: i64, written: Vec<RecordBatch>) {
        let latest = latest_per_series(self.table, &written);
        self.complete_flush_known(version, written, latest);
    }

    /// As [`HotBuffer::complete_flush`], with `latest` already computed from `written`
    /// by [`latest_per_series`] (outside the buffer's lock).
    pub fn complete_flush_known(
        &mut self,
        version: i64,
        written: Vec<RecordBatch>,
        latest: HashMap<u64, i64, KeyHasher>,
    ) {
        self.flushing_base = None;
        if self.flushing.take().is_none() {
            return;
        }
        // What is in the lake now raises the watermarks: a row at or before its
        // series' latest written time may be a redelivery.
        for (series, time) in latest {
            let w = self.watermarks.entry(series).or_insert(time);
            *w = (*w).max(time);
            self.lake_max_time = self.lake_max_time.max(time);
        }
        let now = Instant::now();
        let bytes = written.iter().map(RecordBatch::get_array_memory_size).sum();
        self.recent
            .push_back((version, now, Arc::from(written), bytes));
        self.prune_recent(now);
    }

    fn prune_recent(&mut self, now: Instant) {
        while self
            .recent
            .front()
            .is_some_and(|(_, at, _, _)| now.duration_since(*at) > RECENT_RETENTION)
        {
            self.recent.pop_front();
        }
    }

    /// The queryable rows for a query that reads lake version `lake_version`: the open
    /// and flushing generations (suspects excluded), plus rows of flushes committed
    /// after that version.
    pub fn snapshot(&mut self, lake_version: Option<i64>) -> Vec<RecordBatch> {
        self.view().visible(lake_version)
    }

    /// An immutable picture of the queryable rows as they are now, for readers on
    /// other threads (see [`BufferView::visible`]).
    pub fn view(&mut self) -> BufferView {
        self.open.seal();
        if let Some(flushing) = &mut self.flushing {
            flushing.seal();
        }
        BufferView {
            open: self.open.chunks.clone(),
            flushing: self
                .flushing
                .as_ref()
                .map(|g| g.chunks.clone())
                .unwrap_or_default(),
            flushing_base: self.flushing_base,
            recent: self
                .recent
                .iter()
                .map(|(version, _, rows, _)| (*version, Arc::clone(rows)))
                .collect(),
            rows: self.rows(),
            bytes: self.bytes(),
            mirror: Default::default(),
        }
    }

    /// Records that the flushing generation's commit failed: its rows stay here, and
    /// no lake version holds them (the next flush takes them again).
    pub fn flush_failed(&mut self) {
        self.flushing_base = None;
    }
}

/// Whether a query reading `lake_version` finds the flushing generation's rows in the
/// lake, the generation being committed on top of `base`.
fn flushing_committed(base: Option<i64>, lake_version: Option<i64>) -> bool {
    matches!((base, lake_version), (Some(base), Some(v)) if v > base)
}

/// The queryable rows of one table's hot buffer at one instant (see
/// [`HotBuffer::view`]); cheap to clone, shared by every reader.
#[derive(Debug, Clone, Default)]
pub struct BufferView {
    open: Vec<Chunk>,
    flushing: Vec<Chunk>,
    flushing_base: Option<i64>,
    recent: Vec<(i64, Chunk)>,
    rows: usize,
    bytes: usize,
    /// Rows other instances published (see [`crate::peers`]).
    mirror: crate::peers::MirrorView,
}

impl BufferView {
    /// This view with other instances' published rows `mirror` shown too.
    pub fn with_mirror(mut self, mirror: crate::peers::MirrorView) -> Self {
        self.mirror = mirror;
        self
    }

    /// The rows a query that reads lake version `lake_version` must add to the lake's.
    pub fn visible(&self, lake_version: Option<i64>) -> Vec<RecordBatch> {
        let mut out = self.own_visible(lake_version);
        out.extend(self.mirror.visible_anyway(lake_version));
        out
    }

    /// As [`BufferView::visible`], but `None` while that cannot be told for sure: a
    /// flush is committing on top of a version before `lake_version`, and whether
    /// `lake_version` is that commit or another writer's is only known once the
    /// writer records the version it landed as (a moment later). With one writer it
    /// is always the flush's; with several instances on the lake it may not be. The
    /// same for other instances' published rows (see [`crate::peers::MirrorView`]).
    pub fn visible_settled(&self, lake_version: Option<i64>) -> Option<Vec<RecordBatch>> {
        if flushing_committed(self.flushing_base, lake_version) {
            return None;
        }
        let mirrored = self.mirror.visible(lake_version)?;
        let mut out = self.own_visible(lake_version);
        out.extend(mirrored);
        Some(out)
    }

    /// This writer's rows a reader of `lake_version` adds to the lake's.
    fn own_visible(&self, lake_version: Option<i64>) -> Vec<RecordBatch> {
        let mut out: Vec<RecordBatch> = self.open.iter().flat_map(|c| c.iter().cloned()).collect();
        if !flushing_committed(self.flushing_base, lake_version) {
            out.extend(self.flushing.iter().flat_map(|c| c.iter().cloned()));
        }
        for (version, rows) in &self.recent {
            if lake_version.is_none_or(|v| *version > v) {
                out.extend(rows.iter().cloned());
            }
        }
        out
    }

    /// Rows held (open and flushing, suspects included).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Approximate bytes held (see [`HotBuffer::bytes`]).
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetlake_ingest::metric_stream::MetricsBatchBuilder;

    fn batch(points: &[(&str, i64)]) -> RecordBatch {
        let mut b = MetricsBatchBuilder::new();
        for (fname, minute) in points {
            let line = format!(
                r#"{{"account_id":"1","region":"r","namespace":"N","metric_name":"M","dimensions":{{"F":"{fname}"}},"timestamp":{},"value":{{"count":1,"sum":1,"min":1,"max":1}}}}"#,
                minute * 60_000
            );
            assert!(b.push_record(line.as_bytes()).is_empty());
        }
        b.finish()
    }

    fn rows(batches: &[RecordBatch]) -> usize {
        batches.iter().map(|b| b.num_rows()).sum()
    }

    #[test]
    fn duplicates_within_the_buffer_are_dropped() {
        let mut buf = HotBuffer::new(Table::Metrics, None);
        let o = buf.insert(1, &batch(&[("a", 1), ("a", 1), ("b", 1)]));
        assert_eq!(
            o,
            InsertOutcome {
                visible: 2,
                suspects: 0,
                duplicates: 1
            }
        );
        let o = buf.insert(2, &batch(&[("a", 1), ("a", 2)]));
        assert_eq!(
            o,
            InsertOutcome {
                visible: 1,
                suspects: 0,
                duplicates: 1
            }
        );
        assert_eq!(rows(&buf.snapshot(None)), 3);
    }

    #[test]
    fn flushing_rows_still_deduplicate_and_stay_visible() {
        let mut buf = HotBuffer::new(Table::Metrics, None);
        buf.insert(1, &batch(&[("a", 1)]));
        let job = buf.begin_flush().unwrap();
        assert_eq!(job.seq, 1);
        assert_eq!(job.max_time, 60_000_000);
        let o = buf.insert(2, &batch(&[("a", 1), ("a", 2)]));
        assert_eq!(o.duplicates, 1);
        assert_eq!(rows(&buf.snapshot(None)), 2);
        buf.complete_flush(5, job.batches);
        // A query on lake version 5 already sees the flushed row there.
        assert_eq!(rows(&buf.snapshot(Some(5))), 1);
        assert_eq!(rows(&buf.snapshot(Some(4))), 2);
    }

    #[test]
    fn a_query_sees_flushing_rows_once_whichever_lake_version_it_reads() {
        let mut buf = HotBuffer::new(Table::Metrics, None);
        buf.insert(1, &batch(&[("a", 1), ("b", 1)]));
        let job = buf.begin_flush().unwrap();
        buf.committing_on(Some(3));
        // The commit may or may not have landed: version 3 lacks the rows, 4 has them.
        assert_eq!(rows(&buf.snapshot(Some(3))), 2);
        assert_eq!(rows(&buf.snapshot(Some(4))), 0);
        buf.complete_flush(4, job.batches);
        assert_eq!(rows(&buf.snapshot(Some(3))), 2);
        assert_eq!(rows(&buf.snapshot(Some(4))), 0);
        // A failed commit leaves the rows flushing; the retry builds on a new base.
        buf.insert(2, &batch(&[("c", 2)]));
        let _failed = buf.begin_flush().unwrap();
        buf.committing_on(Some(4));
        assert_eq!(rows(&buf.snapshot(Some(4))), 1);
        buf.begin_flush().unwrap();
        assert_eq!(rows(&buf.snapshot(Some(5))), 1, "not committing yet");
    }

    /// With other writers on the lake, a version after a committing flush's base may
    /// be theirs: until the flush's version is known, a settled read waits.
    #[test]
    fn which_rows_a_version_after_a_committing_flush_lacks_is_told_once_it_landed() {
        let mut buf = HotBuffer::new(Table::Metrics, None);
        buf.insert(1, &batch(&[("a", 1), ("b", 1)]));
        let job = buf.begin_flush().unwrap();
        buf.committing_on(Some(3));
        let view = buf.view();
        assert_eq!(view.visible_settled(Some(3)).map(|b| rows(&b)), Some(2));
        assert_eq!(
            view.visible_settled(Some(4)),
            None,
            "4 may be another writer's"
        );
        // Another writer's commit was 4; the flush landed as 5.
        buf.complete_flush(5, job.batches);
        let view = buf.view();
        assert_eq!(view.visible_settled(Some(4)).map(|b| rows(&b)), Some(2));
        assert_eq!(view.visible_settled(Some(5)).map(|b| rows(&b)), Some(0));
    }

    #[test]
    fn rows_at_or_before_the_lake_watermark_are_suspects() {
        let mut buf = HotBuffer::new(Table::Metrics, Some(2 * 60_000_000));
        let o = buf.insert(1, &batch(&[("a", 1), ("a", 2), ("a", 3)]));
        assert_eq!(
            o,
            InsertOutcome {
                visible: 1,
                suspects: 2,
                duplicates: 0
            }
        );
        assert_eq!(rows(&buf.snapshot(None)), 1);
        let job = buf.begin_flush().unwrap();
        assert_eq!(rows(&job.suspects), 2);
        buf.complete_flush(1, job.batches);
        // Series "a" is now known up to minute 3; "b" falls back to the lake maximum.
        let o = buf.insert(2, &batch(&[("a", 3), ("a", 4), ("b", 2), ("b", 3)]));
        assert_eq!(
            o,
            InsertOutcome {
                visible: 2,
                suspects: 2,
                duplicates: 0
            }
        );
    }

    #[test]
    fn a_failed_flush_is_retried_with_newer_rows() {
        let mut buf = HotBuffer::new(Table::Metrics, None);
        buf.insert(1, &batch(&[("a", 1)]));
        let _failed = buf.begin_flush().unwrap();
        buf.insert(2, &batch(&[("a", 2)]));
        let job = buf.begin_flush().unwrap();
        assert_eq!(job.seq, 2);
        assert_eq!(rows(&job.batches), 2);
        assert_eq!(buf.pending_since(), Some(1));
        buf.complete_flush(1, job.batches);
        assert!(buf.begin_flush().is_none());
        assert_eq!(buf.rows(), 0);
        assert_eq!(buf.pending_since(), None);
    }
}
