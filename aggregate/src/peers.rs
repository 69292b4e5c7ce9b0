//! Rows other instances accepted and have not committed yet: published beside the
//! lake by each instance, followed by every other one, so that SQL and incremental
//! alert evaluation on any instance see every acknowledged row within about two
//! seconds, not at the accepting instance's next flush.
//!
//! While instances follow each other ([`crate::Aggregator::follow_other_writers`]):
//! - each **publishes** the rows it makes visible (its own: not rows it follows) once a
//!   second as one file per table, `_fleetlake/pending/<table>/<writer>/<incarnation>/
//!   <first>-<last>.rows`, where `first..=last` are the feed sequence numbers of the
//!   rows in it (the feed numbers each emission; see [`crate::feed`]) and the
//!   *incarnation* names this process's run of the writer (the feed numbers restart
//!   with each run);
//! - each flush commit says, in its commit info ([`COVER_KEY`]), which of the writer's
//!   published rows it covers: every row of earlier incarnations and, of this one,
//!   every row through feed number `through` (a flush takes all rows visible at one
//!   instant). The writer then deletes the files it covered.
//! - each **follows** the others: every second, after reading their new commits (the
//!   lake tail), it reads the files it has not read and
//!   mirrors their rows ([`Mirror`]): they are shown to SQL with the hot buffer's rows
//!   and go to the feed. When a covering commit of that writer is read, the mirrored
//!   rows it covers leave the mirror, compared by key with the commit's rows: rows of
//!   the commit the mirror did not hold (suspects the writer checked, rows published
//!   before this process joined) go to the feed as the commit's rows; mirrored rows
//!   the commit does not hold (the writer found them already in the lake through a
//!   third writer, or lost them with its process and a stream hands them to another)
//!   are retracted. Every row counts once, as it does in the lake.
//! - a writer's files first read by a follower (it just started, or the writer is a new
//!   incarnation no commit has covered yet) are checked against the lake first: their
//!   rows already committed are not mirrored.
//!
//! Files are written in order and never rewritten, so a follower reads each once; one
//! that is gone when read was covered by a commit, whose rows come through the tail.
//!
//! A run with published rows not yet covered says it is alive at least every
//! [`ALIVE_EVERY`] (a new file, or an `alive` object in its directory). A run silent
//! for [`STALE_AFTER`] is taken for dead: its mirrored rows are retracted and its files
//! no longer read. Its rows are then where the lake has them: a stream's rows it lost
//! come again through the instance that takes the stream over; its WAL's rows come
//! when it restarts and commits them. A run heard from again is joined again (its
//! files read and checked against the lake).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use deltalake::logstore::object_store::{ObjectStore, ObjectStoreExt, path::Path};
use futures::TryStreamExt;

use fleetlake_model::Table;
use fleetlake_model::keys::{KeyHasher, row_keys};
use fleetlake_model::schema::conform;

/// Where published rows go, beside the lake's tables.
pub const PREFIX: &str = "_fleetlake/pending";

/// Commit-info key of what a flush commit covers of its writer's published rows: a JSON
/// object `{"incarnation": "...", "through": n}`.
pub const COVER_KEY: &str = "fleetlake.published";

/// How often a run with published rows not yet covered says it is alive, at least.
pub const ALIVE_EVERY: Duration = Duration::from_secs(10);

/// How long a run may be silent before its followers take it for dead.
pub const STALE_AFTER: Duration = Duration::from_secs(60);

/// How long rows a covering commit took from the mirror stay visible through it,
/// covering a query that loaded the lake just before that commit (as the hot buffer's
/// own flushed rows do).
const COVERED_RETENTION: Duration = Duration::from_secs(10);

/// What a flush commit covers of its writer's published rows (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cover {
    /// The writer's run that committed; every earlier run's rows are covered too.
    pub incarnation: String,
    /// Of this run's rows, those with feed numbers through this one.
    pub through: u64,
}

impl Cover {
    /// As the commit info carries it.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({"incarnation": self.incarnation, "through": self.through})
    }

    /// From the commit info; `None` unless both fields are there.
    pub fn from_json(value: &serde_json::Value) -> Option<Self> {
        Some(Self {
            incarnation: value.get("incarnation")?.as_str()?.to_string(),
            through: value.get("through")?.as_u64()?,
        })
    }

    /// Whether a row of run `incarnation` with feed number `seq` is covered.
    pub fn covers(&self, incarnation: &str, seq: u64) -> bool {
        incarnation < self.incarnation.as_str()
            || (incarnation == self.incarnation && seq <= self.through)
    }
}

/// The name of the writer's run after one named `last` (if any): its start time in hex
/// µs, or one more than the last run's if the clock reads earlier (a host whose clock
/// went back), so that names sort in the order the runs started.
pub(crate) fn next_incarnation(last: Option<&str>) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64;
    let after = last
        .and_then(|l| u64::from_str_radix(l.get(..16)?, 16).ok())
        .map_or(0, |l| l.saturating_add(1));
    format!("{:016x}", now.max(after))
}

/// Rows of one writer's run, with the feed number of each batch.
#[derive(Debug, Clone)]
pub struct Published {
    /// The writer (its WAL id, as its commits name it).
    pub writer: String,
    /// Its run.
    pub incarnation: String,
    /// The rows, each batch with its feed number, in order.
    pub batches: Vec<(u64, RecordBatch)>,
    /// The de-duplication keys of each batch's rows, when computed (by the follower,
    /// off the writer's thread: [`Published::with_points`]).
    pub points: Vec<Vec<u128>>,
}

impl Published {
    /// With the keys of its rows (of `table`) computed.
    pub(crate) fn with_points(mut self, table: Table) -> Self {
        self.points = self
            .batches
            .iter()
            .map(|(_, b)| row_keys(table, b).iter().map(|k| k.point).collect())
            .collect();
        self
    }
}

/// A published file's place: `<table>/<writer>/<incarnation>/<first>-<last>.rows`.
pub(crate) fn file_path(
    table: Table,
    writer: &str,
    incarnation: &str,
    first: u64,
    last: u64,
) -> Path {
    Path::from(format!(
        "{}/{writer}/{incarnation}/{first:020}-{last:020}.rows",
        table.name()
    ))
}

/// A run's object saying it is alive: `<table>/<writer>/<incarnation>/alive`.
fn alive_path(table: Table, writer: &str, incarnation: &str) -> Path {
    Path::from(format!("{}/{writer}/{incarnation}/alive", table.name()))
}

/// The writer and run of an object of `table` from its path, and for a published
/// file its last feed number (`None` for the `alive` object).
fn parse_object(table: Table, path: &Path) -> Option<(String, String, Option<u64>)> {
    let mut parts = path.parts();
    if parts.next()?.as_ref() != table.name() {
        return None;
    }
    let writer = parts.next()?.as_ref().to_string();
    let incarnation = parts.next()?.as_ref().to_string();
    let name = parts.next()?;
    if parts.next().is_some() {
        return None;
    }
    if name.as_ref() == "alive" {
        return Some((writer, incarnation, None));
    }
    let (_, last) = name.as_ref().strip_suffix(".rows")?.split_once('-')?;
    Some((writer, incarnation, Some(last.parse().ok()?)))
}

const MAGIC: &[u8; 8] = b"FLPEND1\n";

/// A published file's bytes: a magic line, then per batch its feed number (u64 LE),
/// its length (u32 LE) and an Arrow IPC stream of it (in the table's schema).
pub(crate) fn encode(
    table: Table,
    batches: &[(u64, RecordBatch)],
) -> Result<Vec<u8>, arrow::error::ArrowError> {
    let schema = table.schema();
    let mut out = MAGIC.to_vec();
    for (seq, batch) in batches {
        let bytes = crate::wal::encode_batch(&conform(batch, &schema)?)?;
        let len = u32::try_from(bytes.len()).map_err(|_| {
            arrow::error::ArrowError::InvalidArgumentError("batch too large".into())
        })?;
        out.extend_from_slice(&seq.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&bytes);
    }
    Ok(out)
}

/// The batches of a published file of `table` (see [`encode`]).
pub(crate) fn decode(table: Table, bytes: &[u8]) -> Result<Vec<(u64, RecordBatch)>, String> {
    let mut rest = bytes
        .strip_prefix(MAGIC.as_slice())
        .ok_or("not a published rows file")?;
    let schema = table.schema();
    let mut out = Vec::new();
    while !rest.is_empty() {
        if rest.len() < 12 {
            return Err("truncated batch header".into());
        }
        let seq = u64::from_le_bytes(rest[..8].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(rest[8..12].try_into().expect("4 bytes")) as usize;
        let body = rest.get(12..12 + len).ok_or("truncated batch")?;
        let reader =
            arrow::ipc::reader::StreamReader::try_new(body, None).map_err(|e| e.to_string())?;
        for batch in reader {
            let batch = batch.map_err(|e| e.to_string())?;
            out.push((seq, conform(&batch, &schema).map_err(|e| e.to_string())?));
        }
        rest = &rest[12 + len..];
    }
    Ok(out)
}

/// Splits `batch`, whose rows have keys `points`, into the rows whose key `first`
/// holds for and the others, each with its keys; `None` for a part without rows.
fn split_keyed(
    batch: RecordBatch,
    points: Vec<u128>,
    first: impl Fn(u128) -> bool,
) -> [Option<(RecordBatch, Vec<u128>)>; 2] {
    let mask: Vec<bool> = points.iter().map(|p| first(*p)).collect();
    let yes = mask.iter().filter(|m| **m).count();
    if yes == mask.len() {
        return [(yes > 0).then_some((batch, points)), None];
    }
    if yes == 0 {
        return [None, Some((batch, points))];
    }
    let part = |want: bool| {
        let keep = arrow::array::BooleanArray::from_iter(mask.iter().map(|m| Some(*m == want)));
        let rows = arrow::compute::filter_record_batch(&batch, &keep).expect("a key per row");
        let keys = points
            .iter()
            .zip(&mask)
            .filter(|(_, m)| **m == want)
            .map(|(p, _)| *p)
            .collect();
        Some((rows, keys))
    };
    [part(true), part(false)]
}

/// One mirrored batch.
#[derive(Debug)]
struct Entry {
    /// Its number in the mirror (see [`Mirror::points`]).
    id: u64,
    writer: Arc<str>,
    incarnation: Arc<str>,
    seq: u64,
    batch: RecordBatch,
    /// The keys of `batch`'s rows.
    points: Vec<u128>,
}

/// The rows of one table other writers published and this process has not yet seen
/// committed (see the module docs); the writer's thread owns it.
#[derive(Debug, Default)]
pub(crate) struct Mirror {
    entries: Vec<Entry>,
    /// The de-duplication key of each mirrored row, with the entry holding it: a row
    /// this process accepts after it mirrored another instance's copy takes that copy
    /// out ([`Mirror::take_points`]).
    points: HashMap<u128, u64, KeyHasher>,
    next_id: u64,
    rows: usize,
    /// Rows of other writers' commits (mirrored ones they covered, and those the mirror
    /// lacked), by the version that holds them, kept a moment for queries of earlier
    /// versions.
    covered: VecDeque<(i64, Instant, Arc<[RecordBatch]>)>,
    /// The lake version through which other writers' commits were read.
    through: Option<i64>,
    /// The entries' batches as the last view had them (rebuilt after a change).
    cached: Option<Arc<[RecordBatch]>>,
}

/// The mirrored rows as one snapshot has them (see [`Mirror::view`]).
#[derive(Debug, Clone, Default)]
pub struct MirrorView {
    rows: Option<Arc<[RecordBatch]>>,
    covered: Vec<(i64, Arc<[RecordBatch]>)>,
    through: Option<i64>,
}

impl MirrorView {
    /// The rows a query of lake version `lake_version` adds; `None` while that cannot be
    /// told: the version is after the last one whose commits were read, so a commit
    /// covering mirrored rows may be in it.
    pub fn visible(&self, lake_version: Option<i64>) -> Option<Vec<RecordBatch>> {
        let rows = self.rows.as_deref().unwrap_or_default();
        if rows.is_empty() && self.covered.is_empty() {
            return Some(Vec::new());
        }
        if matches!((lake_version, self.through), (Some(v), t) if t.is_none_or(|t| v > t)) {
            return None;
        }
        Some(self.visible_anyway(lake_version))
    }

    /// As [`MirrorView::visible`], taking the rows as if no commit after the last one
    /// read covered any when it cannot tell.
    pub fn visible_anyway(&self, lake_version: Option<i64>) -> Vec<RecordBatch> {
        let mut out = self.rows.as_deref().unwrap_or_default().to_vec();
        for (version, rows) in &self.covered {
            if lake_version.is_none_or(|v| *version > v) {
                out.extend(rows.iter().cloned());
            }
        }
        out
    }

    /// Rows mirrored and not yet covered.
    pub fn rows(&self) -> usize {
        self.rows
            .as_deref()
            .map_or(0, |b| b.iter().map(RecordBatch::num_rows).sum())
    }
}

impl Mirror {
    /// Mirrors the rows of `published` (of `table`, already filtered by the follower:
    /// none covered, none read before) but those whose key `held` holds (this process
    /// holds the datapoint too, not yet committed: a retry sent to both instances);
    /// returns the rows mirrored, for the feed, and how many were left out.
    ///
    /// A row left out counts once, as this process's own: that copy is committed by
    /// this process's flush, or found in the lake by it (the other instance committed
    /// its copy first, and this one's is taken back then).
    pub(crate) fn add(
        &mut self,
        table: Table,
        published: Published,
        held: Option<&dyn Fn(u128) -> bool>,
    ) -> (Vec<RecordBatch>, usize) {
        let published = if published.points.len() == published.batches.len() {
            published
        } else {
            published.with_points(table)
        };
        let writer: Arc<str> = published.writer.into();
        let incarnation: Arc<str> = published.incarnation.into();
        let mut out = Vec::with_capacity(published.batches.len());
        let mut left_out = 0;
        for ((seq, batch), points) in published.batches.into_iter().zip(published.points) {
            if batch.num_rows() == 0 {
                continue;
            }
            let (batch, points) = match held {
                Some(held) => {
                    let rows = batch.num_rows();
                    let [kept, _] = split_keyed(batch, points, |p| !held(p));
                    left_out += rows - kept.as_ref().map_or(0, |(b, _)| b.num_rows());
                    match kept {
                        Some(kept) => kept,
                        None => continue,
                    }
                }
                None => (batch, points),
            };
            let id = self.next_id;
            self.next_id += 1;
            self.points.extend(points.iter().map(|p| (*p, id)));
            self.rows += batch.num_rows();
            out.push(batch.clone());
            self.entries.push(Entry {
                id,
                writer: Arc::clone(&writer),
                incarnation: Arc::clone(&incarnation),
                seq,
                batch,
                points,
            });
        }
        if !out.is_empty() {
            self.cached = None;
        }
        (out, left_out)
    }

    /// Another writer's commit `version` with `rows` (the keys of each batch in
    /// `points`), covering `cover` of its published rows: takes the covered rows out
    /// and returns the commit's rows the mirror did not hold (new to readers) and the
    /// covered rows the commit does not hold (to retract).
    pub(crate) fn commit(
        &mut self,
        version: i64,
        writer: &str,
        cover: &Cover,
        rows: Vec<RecordBatch>,
        points: Vec<Vec<u128>>,
    ) -> (Vec<RecordBatch>, Vec<RecordBatch>) {
        let covered = self.take_covered(writer, cover);
        if covered.is_empty() {
            return (rows, Vec::new());
        }
        let mirrored: HashSet<u128> = covered
            .iter()
            .flat_map(|e| e.points.iter().copied())
            .collect();
        let committed: HashSet<u128> = points.iter().flatten().copied().collect();
        let new = rows
            .into_iter()
            .zip(points)
            .filter_map(|(batch, points)| {
                let [new, _] = split_keyed(batch, points, |p| !mirrored.contains(&p));
                new.map(|(b, _)| b)
            })
            .collect();
        let (mut gone, mut held) = (Vec::new(), Vec::new());
        for entry in covered {
            let [lacked, holds] =
                split_keyed(entry.batch, entry.points, |p| !committed.contains(&p));
            gone.extend(lacked.map(|(b, _)| b));
            held.extend(holds.map(|(b, _)| b));
        }
        if !held.is_empty() {
            self.covered
                .push_back((version, Instant::now(), Arc::from(held)));
        }
        (new, gone)
    }

    /// As [`Mirror::commit`] for a commit whose rows could not be read: the rows it
    /// covers leave the mirror, and stay a moment for readers of earlier versions (the
    /// commit holds them, unless its writer found one already in the lake).
    pub(crate) fn commit_unread(&mut self, version: i64, writer: &str, cover: &Cover) {
        let covered: Vec<RecordBatch> = self
            .take_covered(writer, cover)
            .into_iter()
            .map(|e| e.batch)
            .collect();
        if !covered.is_empty() {
            self.covered
                .push_back((version, Instant::now(), Arc::from(covered)));
        }
    }

    /// Takes out the mirrored entries of `writer` that `cover` covers.
    fn take_covered(&mut self, writer: &str, cover: &Cover) -> Vec<Entry> {
        self.take_entries(|e| &*e.writer == writer && cover.covers(&e.incarnation, e.seq))
    }

    /// Takes out the entries `which` picks.
    fn take_entries(&mut self, which: impl Fn(&Entry) -> bool) -> Vec<Entry> {
        let (taken, kept): (Vec<Entry>, Vec<Entry>) = std::mem::take(&mut self.entries)
            .into_iter()
            .partition(|e| which(e));
        self.entries = kept;
        if !taken.is_empty() {
            self.cached = None;
        }
        for entry in &taken {
            for point in &entry.points {
                if self.points.get(point) == Some(&entry.id) {
                    self.points.remove(point);
                }
            }
            self.rows -= entry.batch.num_rows();
        }
        taken
    }

    /// Whether no mirrored row is held (nothing to look rows up in).
    pub(crate) fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// Takes out the mirrored rows with one of `points` for key (this process accepted
    /// those datapoints too, after it mirrored the other instance's copies: its own
    /// copies count from now on); returns them, to retract.
    pub(crate) fn take_points(&mut self, points: &[u128]) -> Vec<RecordBatch> {
        let hits: HashSet<u128> = points
            .iter()
            .copied()
            .filter(|p| self.points.contains_key(p))
            .collect();
        let ids: HashSet<u64> = hits.iter().filter_map(|p| self.points.remove(p)).collect();
        if ids.is_empty() {
            return Vec::new();
        }
        let mut taken = Vec::new();
        for entry in std::mem::take(&mut self.entries) {
            if !ids.contains(&entry.id) {
                self.entries.push(entry);
                continue;
            }
            let [kept, gone] = split_keyed(entry.batch, entry.points, |p| !hits.contains(&p));
            if let Some((batch, _)) = gone {
                self.rows -= batch.num_rows();
                taken.push(batch);
            }
            if let Some((batch, points)) = kept {
                self.entries.push(Entry {
                    batch,
                    points,
                    ..entry
                });
            }
        }
        self.cached = None;
        taken
    }

    /// Keeps `rows` of another writer's commit `version` (those the mirror did not hold)
    /// a moment for queries of earlier versions: they went to the feed marked with that
    /// version, so a reader of an earlier one skips them there and finds them here.
    pub(crate) fn committed_elsewhere(&mut self, version: i64, rows: &[RecordBatch]) {
        let rows: Vec<RecordBatch> = rows.iter().filter(|b| b.num_rows() > 0).cloned().collect();
        if !rows.is_empty() {
            self.covered
                .push_back((version, Instant::now(), Arc::from(rows)));
        }
    }

    /// Takes out every mirrored row of `writer`'s run `incarnation` (taken for dead);
    /// returns them, to retract.
    pub(crate) fn forget(&mut self, writer: &str, incarnation: &str) -> Vec<RecordBatch> {
        self.take_entries(|e| &*e.writer == writer && &*e.incarnation == incarnation)
            .into_iter()
            .map(|e| e.batch)
            .collect()
    }

    /// Other writers' commits were read through lake version `version`.
    pub(crate) fn read_through(&mut self, version: Option<i64>) {
        self.through = self.through.max(version);
    }

    /// The mirrored rows as they are now, for a published snapshot.
    pub(crate) fn view(&mut self) -> MirrorView {
        let now = Instant::now();
        while self
            .covered
            .front()
            .is_some_and(|(_, at, _)| now.duration_since(*at) > COVERED_RETENTION)
        {
            self.covered.pop_front();
        }
        let rows = match &self.cached {
            Some(rows) => Arc::clone(rows),
            None => {
                let rows: Arc<[RecordBatch]> =
                    self.entries.iter().map(|e| e.batch.clone()).collect();
                self.cached = Some(Arc::clone(&rows));
                rows
            }
        };
        MirrorView {
            rows: Some(rows),
            covered: self
                .covered
                .iter()
                .map(|(v, _, rows)| (*v, Arc::clone(rows)))
                .collect(),
            through: self.through,
        }
    }

    /// Rows mirrored and not yet covered.
    pub(crate) fn rows(&self) -> usize {
        self.rows
    }
}

/// What a follower of one table has read of other writers' published rows.
#[derive(Debug, Default)]
pub(crate) struct Follower {
    /// Per (writer, run): the last feed number read.
    read: HashMap<(String, String), u64>,
    /// Per writer: the latest cover its commits carried, as the tail read them.
    covers: HashMap<String, Cover>,
    /// Runs taken for dead (silent for [`STALE_AFTER`]): their files are not read.
    dead: HashSet<(String, String)>,
}

/// Files of other writers to read, for one table: the path, writer, run and whether
/// the run is new to this follower (its rows must be checked against the lake).
pub(crate) struct ToRead {
    path: Path,
    writer: String,
    incarnation: String,
    /// The last feed number in it.
    last: u64,
    /// Whether its rows must be checked against the lake first.
    pub(crate) joining: bool,
}

/// Why a published file could not be read.
#[derive(Debug)]
pub(crate) enum ReadFailure {
    /// The store did not answer: try again later.
    Store(String),
    /// The file is not one this version reads: skipped for good.
    Bad(String),
}

impl Follower {
    /// Records a cover read from `writer`'s commit.
    pub(crate) fn covered(&mut self, writer: &str, cover: &Cover) {
        let newer = self
            .covers
            .get(writer)
            .is_none_or(|c| (&c.incarnation, c.through) < (&cover.incarnation, cover.through));
        if newer {
            self.covers.insert(writer.to_string(), cover.clone());
        }
        self.read
            .retain(|(w, i), _| w != writer || i.as_str() >= cover.incarnation.as_str());
    }

    /// The files of `table` in `store` not written by `own` and not read or covered
    /// yet, oldest first, and the runs mirrored before that are now taken for dead (at
    /// `now`: silent for [`STALE_AFTER`]), whose mirrored rows are to be retracted.
    pub(crate) async fn survey(
        &mut self,
        store: &dyn ObjectStore,
        table: Table,
        own: &str,
        now: std::time::SystemTime,
    ) -> Result<(Vec<ToRead>, Vec<(String, String)>), deltalake::logstore::object_store::Error>
    {
        let prefix = Path::from(table.name());
        let listed: Vec<_> = store.list(Some(&prefix)).try_collect().await?;
        let mut heard: HashMap<(String, String), std::time::SystemTime> = HashMap::new();
        let mut files = Vec::new();
        for meta in listed {
            let Some((writer, incarnation, last)) = parse_object(table, &meta.location) else {
                continue;
            };
            if writer == own {
                continue;
            }
            let at = std::time::SystemTime::from(meta.last_modified);
            let latest = heard
                .entry((writer.clone(), incarnation.clone()))
                .or_insert(at);
            *latest = (*latest).max(at);
            if let Some(last) = last {
                files.push((writer, incarnation, last, meta.location));
            }
        }
        let mut died = Vec::new();
        for (run, at) in heard {
            let silent = now.duration_since(at).unwrap_or_default() > STALE_AFTER;
            if silent && !self.dead.contains(&run) {
                if self.read.remove(&run).is_some() {
                    died.push(run.clone());
                }
                self.dead.insert(run);
            } else if !silent && self.dead.remove(&run) {
                // Heard from again: joined again (its files read and checked anew).
                self.read.remove(&run);
            }
        }
        let mut out: Vec<(String, String, u64, Path)> = files
            .into_iter()
            .filter(|(writer, incarnation, _, _)| {
                !self.dead.contains(&(writer.clone(), incarnation.clone()))
            })
            .filter(|(writer, incarnation, last, _)| {
                let covered = self
                    .covers
                    .get(writer)
                    .is_some_and(|c| c.covers(incarnation, *last));
                let read = self
                    .read
                    .get(&(writer.clone(), incarnation.clone()))
                    .is_some_and(|r| *last <= *r);
                !covered && !read
            })
            .collect();
        out.sort();
        let out = out
            .into_iter()
            .map(|(writer, incarnation, last, path)| {
                let covered_run = self
                    .covers
                    .get(&writer)
                    .is_some_and(|c| c.incarnation == incarnation);
                let read_run = self
                    .read
                    .contains_key(&(writer.clone(), incarnation.clone()));
                let joining = !(covered_run || read_run);
                ToRead {
                    path,
                    writer,
                    incarnation,
                    last,
                    joining,
                }
            })
            .collect();
        Ok((out, died))
    }

    /// Reads `file`: its rows not covered and not read before; `None` if it is gone
    /// (covered meanwhile). Nothing is marked read (see [`Follower::mark_read`]).
    pub(crate) async fn read(
        &self,
        store: &dyn ObjectStore,
        table: Table,
        file: &ToRead,
    ) -> Result<Option<Published>, ReadFailure> {
        let failed = |e: deltalake::logstore::object_store::Error| match e {
            deltalake::logstore::object_store::Error::NotFound { .. } => Ok(None),
            e => Err(ReadFailure::Store(format!("{}: {e}", file.path))),
        };
        let got = match store.get(&file.path).await {
            Ok(got) => got,
            Err(e) => return failed(e),
        };
        let bytes = match got.bytes().await {
            Ok(bytes) => bytes,
            Err(e) => return failed(e),
        };
        let batches =
            decode(table, &bytes).map_err(|e| ReadFailure::Bad(format!("{}: {e}", file.path)))?;
        let read = self
            .read
            .get(&(file.writer.clone(), file.incarnation.clone()))
            .copied();
        let cover = self.covers.get(&file.writer);
        let batches: Vec<_> = batches
            .into_iter()
            .filter(|(seq, _)| {
                read.is_none_or(|r| *seq > r)
                    && !cover.is_some_and(|c| c.covers(&file.incarnation, *seq))
            })
            .collect();
        Ok(Some(Published {
            writer: file.writer.clone(),
            incarnation: file.incarnation.clone(),
            batches,
            points: Vec::new(),
        }))
    }

    /// Records that `file`'s rows were handed on (or that it is skipped for good).
    pub(crate) fn mark_read(&mut self, file: &ToRead) {
        let entry = self
            .read
            .entry((file.writer.clone(), file.incarnation.clone()))
            .or_insert(file.last);
        *entry = (*entry).max(file.last);
    }
}

/// This process's published files of one table not yet covered by its commits.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    /// Batches to publish (a failed write keeps them for the next, in order).
    held: Vec<(u64, RecordBatch)>,
    /// Files written: path and last feed number.
    written: Vec<(Path, u64)>,
    /// Feed numbers through which this run's rows are committed.
    covered_through: u64,
    /// Whether earlier runs' files were deleted (after this run's first commit).
    earlier_deleted: bool,
    /// When this run last wrote a file (or said it is alive) for this table.
    heard: Option<Instant>,
}

/// This process's publishing: its store, writer, run and per-table outboxes.
#[derive(Debug)]
pub(crate) struct Publisher {
    pub(crate) store: Arc<dyn ObjectStore>,
    pub(crate) writer: String,
    pub(crate) incarnation: String,
    outboxes: std::sync::Mutex<Vec<Outbox>>,
    /// This process's feed; one publication at a time takes from it.
    items: tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<Arc<crate::feed::FeedItem>>>,
}

impl Publisher {
    /// Publishes the rows of `items` (this process's feed) to `store`.
    pub(crate) fn new(
        store: Arc<dyn ObjectStore>,
        writer: String,
        incarnation: String,
        items: tokio::sync::mpsc::UnboundedReceiver<Arc<crate::feed::FeedItem>>,
    ) -> Self {
        Self {
            store,
            writer,
            incarnation,
            outboxes: std::sync::Mutex::new(Table::ALL.iter().map(|_| Outbox::default()).collect()),
            items: tokio::sync::Mutex::new(items),
        }
    }

    /// Publishes the rows made visible since the last time; `false` once the feed is
    /// closed (the aggregator is gone).
    pub(crate) async fn publish_new(&self) -> bool {
        let mut items = self.items.lock().await;
        let mut open = true;
        loop {
            match items.try_recv() {
                Ok(item) => self.hold(&item),
                Err(tokio::sync::mpsc::error::TryRecvError::Empty) => break,
                Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        self.publish().await;
        open
    }

    fn outboxes(&self) -> std::sync::MutexGuard<'_, Vec<Outbox>> {
        self.outboxes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes this process's own rows of `item` (made visible here, not followed).
    fn hold(&self, item: &crate::feed::FeedItem) {
        if item.committed_as.is_some() || item.retract || item.mirrored {
            return;
        }
        let mut outboxes = self.outboxes();
        let outbox = &mut outboxes[item.table.index()];
        if item.seq <= outbox.covered_through {
            return;
        }
        outbox
            .held
            .extend(item.batches.iter().map(|b| (item.seq, b.clone())));
    }

    /// Writes each table's held rows as one file.
    async fn publish(&self) {
        for table in Table::ALL {
            let held = {
                let mut outboxes = self.outboxes();
                let outbox = &mut outboxes[table.index()];
                let covered = outbox.covered_through;
                outbox.held.retain(|(seq, _)| *seq > covered);
                std::mem::take(&mut outbox.held)
            };
            let (Some(first), Some(last)) = (held.first().map(|h| h.0), held.last().map(|h| h.0))
            else {
                self.say_alive(table).await;
                continue;
            };
            let path = file_path(table, &self.writer, &self.incarnation, first, last);
            let rows: usize = held.iter().map(|(_, b)| b.num_rows()).sum();
            let written = match encode(table, &held) {
                Ok(bytes) => self
                    .store
                    .put(&path, bytes.into())
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            let covered_meanwhile = {
                let mut outboxes = self.outboxes();
                let outbox = &mut outboxes[table.index()];
                match written {
                    Ok(_) => {
                        ::metrics::counter!(crate::metrics::PUBLISHED_ROWS, "table" => table.name())
                            .increment(rows as u64);
                        outbox.written.push((path, last));
                        outbox.heard = Some(Instant::now());
                        // A commit covered it while it was being written.
                        (last <= outbox.covered_through).then_some(outbox.covered_through)
                    }
                    Err(error) => {
                        ::metrics::counter!(crate::metrics::PUBLISH_FAILURES, "table" => table.name())
                            .increment(1);
                        tracing::warn!(%table, %error, "could not publish unflushed rows for other instances; trying again");
                        // Kept, in order, in front of what came meanwhile.
                        let mut later = std::mem::take(&mut outbox.held);
                        outbox.held = held;
                        outbox.held.append(&mut later);
                        None
                    }
                }
            };
            if let Some(through) = covered_meanwhile {
                self.committed(table, through).await;
            }
        }
    }

    /// With files of `table` not yet covered and nothing new to write: tells the
    /// followers this run is alive, every [`ALIVE_EVERY`].
    async fn say_alive(&self, table: Table) {
        {
            let outboxes = self.outboxes();
            let outbox = &outboxes[table.index()];
            let due = outbox.heard.is_none_or(|at| at.elapsed() >= ALIVE_EVERY);
            if outbox.written.is_empty() || !due {
                return;
            }
        }
        let path = alive_path(table, &self.writer, &self.incarnation);
        match self.store.put(&path, Vec::new().into()).await {
            Ok(_) => self.outboxes()[table.index()].heard = Some(Instant::now()),
            Err(error) => {
                ::metrics::counter!(crate::metrics::PUBLISH_FAILURES, "table" => table.name())
                    .increment(1);
                tracing::warn!(%table, %error, "could not tell other instances this one is alive; trying again");
            }
        }
    }

    /// This run's commit of `table` covered its rows through feed number `through`:
    /// deletes the files covered (and, once, those of earlier runs).
    pub(crate) async fn committed(&self, table: Table, through: u64) {
        let (done, earlier) = {
            let mut outboxes = self.outboxes();
            let outbox = &mut outboxes[table.index()];
            outbox.covered_through = outbox.covered_through.max(through);
            let (done, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut outbox.written)
                .into_iter()
                .partition(|(_, last)| *last <= through);
            outbox.written = kept;
            let earlier = !std::mem::replace(&mut outbox.earlier_deleted, true);
            (done, earlier)
        };
        let mut paths: Vec<Path> = done.into_iter().map(|(path, _)| path).collect();
        if earlier {
            let prefix = Path::from(format!("{}/{}", table.name(), self.writer));
            match self.store.list(Some(&prefix)).try_collect::<Vec<_>>().await {
                Ok(listed) => paths.extend(listed.into_iter().map(|m| m.location).filter(|p| {
                    parse_object(table, p).is_some_and(|(_, inc, _)| inc < self.incarnation)
                })),
                Err(error) => {
                    tracing::warn!(%table, %error, "could not list earlier runs' published rows");
                    self.outboxes()[table.index()].earlier_deleted = false;
                }
            }
        }
        for path in paths {
            match self.store.delete(&path).await {
                Ok(()) | Err(deltalake::logstore::object_store::Error::NotFound { .. }) => {}
                Err(error) => {
                    tracing::warn!(%path, %error, "could not delete covered published rows; trying after the next commit");
                    // Kept: the next commit's pass deletes it (its number is covered).
                    self.outboxes()[table.index()].written.push((path, 0));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(account: &str, minutes: &[i64]) -> RecordBatch {
        let mut b = fleetlake_ingest::metric_stream::MetricsBatchBuilder::new();
        for minute in minutes {
            let line = format!(
                r#"{{"account_id":"{account}","region":"r","namespace":"N","metric_name":"M","dimensions":{{}},"timestamp":{},"value":{{"count":1,"sum":1,"min":1,"max":1}}}}"#,
                minute * 60_000
            );
            assert!(b.push_record(line.as_bytes()).is_empty());
        }
        b.finish()
    }

    fn count(batches: &[RecordBatch]) -> usize {
        batches.iter().map(RecordBatch::num_rows).sum()
    }

    #[test]
    fn a_published_file_reads_back_with_its_feed_numbers() {
        let batches = vec![(3, rows("1", &[1, 2])), (5, rows("2", &[3]))];
        let bytes = encode(Table::Metrics, &batches).unwrap();
        let back = decode(Table::Metrics, &bytes).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!((back[0].0, back[0].1.num_rows()), (3, 2));
        assert_eq!((back[1].0, back[1].1.num_rows()), (5, 1));
        assert!(decode(Table::Metrics, &bytes[..bytes.len() - 3]).is_err());
        assert!(decode(Table::Metrics, b"garbage").is_err());
        let path = file_path(Table::Metrics, "w", "i", 3, 5);
        assert_eq!(
            parse_object(Table::Metrics, &path),
            Some(("w".into(), "i".into(), Some(5)))
        );
        assert_eq!(parse_object(Table::Logs, &path), None);
        assert_eq!(
            parse_object(Table::Metrics, &alive_path(Table::Metrics, "w", "i")),
            Some(("w".into(), "i".into(), None))
        );
    }

    /// [`Mirror::commit`] of `rows` to the metrics table.
    fn commit(
        mirror: &mut Mirror,
        version: i64,
        writer: &str,
        cover: &Cover,
        rows: Vec<RecordBatch>,
    ) -> (Vec<RecordBatch>, Vec<RecordBatch>) {
        let points: Vec<Vec<u128>> = rows
            .iter()
            .map(|b| {
                row_keys(Table::Metrics, b)
                    .iter()
                    .map(|k| k.point)
                    .collect()
            })
            .collect();
        mirror.commit(version, writer, cover, rows, points)
    }

    #[test]
    fn rows_this_process_holds_too_are_left_out() {
        let mut mirror = Mirror::default();
        let mine: HashSet<u128> = row_keys(Table::Metrics, &rows("1", &[2, 3]))
            .into_iter()
            .map(|k| k.point)
            .collect();
        let held = |point: u128| mine.contains(&point);
        let (added, left_out) = mirror.add(
            Table::Metrics,
            Published {
                writer: "p".into(),
                incarnation: "b".into(),
                batches: vec![(1, rows("1", &[1, 2])), (2, rows("1", &[3]))],
                points: Vec::new(),
            },
            Some(&held),
        );
        assert_eq!((count(&added), left_out), (1, 2));
        mirror.read_through(Some(0));
        assert_eq!(count(&mirror.view().visible(Some(0)).unwrap()), 1);
        // Their commit of all three: the two left out are new to readers (this
        // process's copies go with its next flush), the one mirrored is not.
        let cover = Cover {
            incarnation: "b".into(),
            through: 2,
        };
        let (new, gone) = commit(&mut mirror, 1, "p", &cover, vec![rows("1", &[1, 2, 3])]);
        assert_eq!((count(&new), count(&gone)), (2, 0));
        assert_eq!(mirror.rows(), 0);
    }

    #[test]
    fn a_covering_commit_takes_its_rows_out_adds_what_the_mirror_lacked_and_retracts_what_it_lacks()
    {
        let mut mirror = Mirror::default();
        let (added, _) = mirror.add(
            Table::Metrics,
            Published {
                writer: "p".into(),
                incarnation: "b".into(),
                batches: vec![
                    (1, rows("1", &[1, 2])),
                    (2, rows("1", &[3])),
                    (4, rows("1", &[4])),
                ],
                points: Vec::new(),
            },
            None,
        );
        assert_eq!(count(&added), 4);
        mirror.add(
            Table::Metrics,
            Published {
                writer: "q".into(),
                incarnation: "a".into(),
                batches: vec![(1, rows("2", &[1]))],
                points: Vec::new(),
            },
            None,
        );
        let view = mirror.view();
        assert_eq!(view.rows(), 5);
        // Not yet told which commits were read: a query of version 0 must wait.
        assert!(view.visible(Some(0)).is_none());
        mirror.read_through(Some(0));
        assert_eq!(count(&mirror.view().visible(Some(0)).unwrap()), 5);

        // p's commit 1 covers feed numbers through 2: it holds time 1 and 3 of those,
        // not 2 (found in the lake), and a suspect at time 9 the mirror never held.
        let cover = Cover {
            incarnation: "b".into(),
            through: 2,
        };
        let (new, gone) = commit(&mut mirror, 1, "p", &cover, vec![rows("1", &[1, 3, 9])]);
        assert_eq!(count(&new), 1, "the suspect is new");
        assert_eq!(count(&gone), 1, "time 2 is retracted");
        mirror.read_through(Some(1));
        let view = mirror.view();
        assert_eq!(view.rows(), 2, "feed number 4 of p and q's row stay");
        assert_eq!(count(&view.visible(Some(1)).unwrap()), 2);
        assert_eq!(
            count(&view.visible(Some(0)).unwrap()),
            4,
            "a reader of version 0 still needs the two committed rows"
        );
        assert!(view.visible(Some(2)).is_none());

        // A later run's commit covers everything of the earlier runs.
        let (new, gone) = commit(
            &mut mirror,
            2,
            "p",
            &Cover {
                incarnation: "c".into(),
                through: 0,
            },
            vec![rows("1", &[4])],
        );
        assert!(new.is_empty() && gone.is_empty());
        assert_eq!(mirror.rows(), 1);
        // A writer the mirror holds nothing of: all its commit's rows are new.
        let (new, gone) = commit(&mut mirror, 3, "r", &cover, vec![rows("3", &[1])]);
        assert_eq!((count(&new), count(&gone)), (1, 0));
    }

    #[test]
    fn a_run_is_named_after_the_last_even_when_the_clock_went_back() {
        let first = next_incarnation(None);
        let ahead = format!(
            "{:016x}",
            u64::from_str_radix(&first, 16).unwrap() + 3_600_000_000
        );
        let next = next_incarnation(Some(&ahead));
        assert!(next > ahead, "{next} after {ahead}");
        assert!(next_incarnation(Some(&first)) > first);
        assert!(next_incarnation(Some("garbage")) >= first);
    }

    #[test]
    fn covers_order_runs_then_feed_numbers() {
        let cover = Cover {
            incarnation: "0002".into(),
            through: 10,
        };
        assert!(cover.covers("0001", 1_000));
        assert!(cover.covers("0002", 10));
        assert!(!cover.covers("0002", 11));
        assert!(!cover.covers("0003", 1));
        assert_eq!(Cover::from_json(&cover.to_json()), Some(cover));
    }
}
