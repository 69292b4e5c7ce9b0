//! The writer: one thread that owns the write-ahead log, the hot buffers and the
//! stream positions. Everything that changes them is a [`Command`] on its bounded
//! queue, handled in order; after each change it publishes an immutable [`Published`]
//! snapshot, which queries and admission read without taking a lock (the shape of
//! InfluxDB 3's WAL → queryable buffer).
//!
//! A write is acknowledged only after, in this order: its record is appended to the log
//! with the rest of its group, the log is fsync'd, its rows are applied to the hot
//! buffers, and a snapshot holding them is published. A group whose append or fsync
//! fails is cut from the log and refused as a whole; nothing of it is applied.
//!
//! The flush loop (`flush.rs`) asks the writer for each table's rows and positions at
//! one instant ([`Command::BeginFlush`]), commits them to the lake itself, and tells the
//! writer how that went ([`Command::Committing`], [`Command::Committed`],
//! [`Command::FlushFailed`]); the writer never waits for the lake.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use arrow::array::RecordBatch;
use tokio::sync::{Notify, mpsc, oneshot};
use tracing::{error, warn};

use fleetlake_model::keys::{KeyHasher, row_keys};
use fleetlake_model::{SharedClock, Table};

use crate::buffer::{BufferView, FlushJob, HotBuffer};
use crate::feed::{Feed, FeedItem};
use crate::health::{Faults, Stage};
use crate::lake::OtherCommit;
use crate::metrics as m;
use crate::peers::{Mirror, Published as PeerRows};
use crate::positions::{Positions, advance, least_positions, merge_positions};
use crate::wal::{Mark, Wal, WalError};

/// Rows of any tables, as a write brings them.
pub(crate) type Rows = Vec<(Table, RecordBatch)>;

/// Bound of the writer's queue: writers wait (back-pressure), never an unbounded buffer.
/// Also the most writes one group commit takes.
pub(crate) const QUEUE: usize = 1024;

/// The log the writer appends to: the WAL, or a fake in tests.
pub(crate) trait Log: Send + 'static {
    /// A position in the log to cut back to.
    type Mark: Copy + Send;
    /// Where the log ends now.
    fn mark(&self) -> Self::Mark;
    /// Appends a record (not yet durable); returns its sequence number.
    fn append(&mut self, payload: &[u8]) -> Result<u64, WalError>;
    /// Makes everything appended durable.
    fn sync(&mut self) -> Result<(), WalError>;
    /// Cuts the log back to `mark`.
    fn rollback(&mut self, mark: Self::Mark) -> Result<(), WalError>;
    /// Deletes the segments holding only records through `seq`.
    fn remove_through(&mut self, seq: u64) -> Result<usize, WalError>;
}

impl Log for Wal {
    type Mark = Mark;
    fn mark(&self) -> Mark {
        Wal::mark(self)
    }
    fn append(&mut self, payload: &[u8]) -> Result<u64, WalError> {
        Wal::append(self, payload)
    }
    fn sync(&mut self) -> Result<(), WalError> {
        Wal::sync(self)
    }
    fn rollback(&mut self, mark: Mark) -> Result<(), WalError> {
        Wal::rollback(self, mark)
    }
    fn remove_through(&mut self, seq: u64) -> Result<usize, WalError> {
        Wal::remove_through(self, seq)
    }
}

/// What the writer is asked to do.
pub(crate) enum Command {
    /// Make `rows` (encoded as `payload`) durable and visible, then answer.
    Append {
        payload: Vec<u8>,
        rows: Rows,
        done: oneshot::Sender<Result<(), String>>,
    },
    /// Make rows of a replayable stream visible and record the positions they reach
    /// (no log: the stream keeps them), then answer.
    Positioned {
        rows: Rows,
        positions: Vec<(String, String)>,
        done: oneshot::Sender<()>,
    },
    /// Hand every table's rows, and the positions its commit carries, to a flush.
    BeginFlush {
        done: oneshot::Sender<Vec<TableFlush>>,
    },
    /// The flush of `table` is about to commit on top of lake version `base`.
    Committing { table: Table, base: Option<i64> },
    /// The flush of `table` committed: the rows `written` as lake `version` (none for a
    /// commit of positions only), and `positions`.
    Committed {
        table: Table,
        written: Option<Written>,
        positions: Option<Positions>,
        done: oneshot::Sender<()>,
    },
    /// The flush of `table` did not commit; its rows stay for the next one.
    FlushFailed { table: Table },
    /// Other writers committed `commits` to `table`, read through lake version
    /// `through`: emitted to the feed (see [`crate::feed`]), less the rows mirrored
    /// before (see [`crate::peers`]). Answers whether this writer holds rows of them
    /// not yet committed (a retry sent to both instances): its flush takes its copies
    /// back, and should come now. Without `done`, the writer asks for that flush.
    Others {
        table: Table,
        commits: Vec<OtherCommit>,
        through: Option<i64>,
        done: Option<oneshot::Sender<bool>>,
    },
    /// Runs of other writers taken for dead (see [`crate::peers`]): their mirrored rows
    /// are taken back.
    Forget {
        table: Table,
        runs: Vec<(String, String)>,
    },
    /// Rows other writers published and this process has not mirrored yet: shown with
    /// the hot buffer's and emitted (see [`crate::peers`]).
    Mirror {
        table: Table,
        published: Vec<PeerRows>,
        done: Option<oneshot::Sender<()>>,
    },
    /// Delete the log segments every table has committed.
    Truncate,
    /// Carry `positions` (as the lake holds them) in commits from now on.
    HoldPositions {
        positions: Vec<(Table, Positions)>,
        done: oneshot::Sender<()>,
    },
    /// Stop carrying the positions of `keys`.
    DropPositions {
        keys: Vec<String>,
        done: oneshot::Sender<()>,
    },
}

/// Rows a flush wrote, as lake `version`, with the latest time of each series in them.
pub(crate) struct Written {
    pub version: i64,
    pub rows: Vec<RecordBatch>,
    /// The suspects among `rows` (held back from queries) that the lake did not have:
    /// visible from this commit on.
    pub revealed: Vec<RecordBatch>,
    /// Rows that were visible but that the flush found in the lake, committed by
    /// another writer: taken back from the feed.
    pub retracted: Vec<RecordBatch>,
    pub latest: HashMap<u64, i64, KeyHasher>,
}

/// What one table's flush takes: the rows (if any) and the positions to commit (if they
/// moved).
pub(crate) struct TableFlush {
    pub table: Table,
    pub job: Option<FlushJob>,
    pub positions: Option<Positions>,
    /// The last feed number emitted when the flush began: the flush holds every row
    /// of the table emitted through it that earlier flushes did not.
    pub feed_through: u64,
}

/// What the writer publishes after every change.
#[derive(Debug, Default)]
pub struct Published {
    /// Each table's queryable rows, by [`Table::index`].
    pub views: Vec<BufferView>,
    /// The last WAL sequence applied to the buffers.
    pub applied_seq: u64,
    /// The last [`FeedItem::seq`] emitted: the views hold the rows of every item up to it.
    pub feed_seq: u64,
}

impl Published {
    /// Rows and bytes held by all hot buffers.
    pub fn buffered(&self) -> (usize, usize) {
        self.views.iter().fold((0, 0), |(rows, bytes), v| {
            (rows + v.rows(), bytes + v.bytes())
        })
    }
}

/// What the writer shares with everyone else.
#[derive(Debug)]
pub(crate) struct Outlet {
    pub published: ArcSwap<Published>,
    pub faults: Faults,
    /// Woken when the open rows reach `flush_rows`, or a write was refused for room.
    pub flush_now: Notify,
    pub flush_rows: usize,
    pub clock: SharedClock,
    /// Rows as they become visible, for subscribers.
    pub feed: Feed,
    /// Per table (by [`Table::index`]), keys of other writers' commits that this
    /// writer held too: its next flush checks its rows with them against the lake,
    /// whatever their time.
    pub held: Vec<std::sync::Mutex<std::collections::HashSet<u128>>>,
}

impl Outlet {
    pub(crate) fn new(flush_rows: usize, clock: SharedClock) -> Self {
        Self {
            published: ArcSwap::from_pointee(Published::default()),
            faults: Faults::default(),
            flush_now: Notify::new(),
            flush_rows,
            clock,
            feed: Feed::default(),
            held: Table::ALL.iter().map(|_| Default::default()).collect(),
        }
    }
}

/// The writer's state: only its thread touches it.
pub(crate) struct Writer<L: Log> {
    log: L,
    buffers: Vec<HotBuffer>,
    /// Stream positions reached by the rows in the buffers (and before).
    reached: Positions,
    /// Per table, the positions its lake holds every row up to.
    committed: Vec<Positions>,
    applied_seq: u64,
    /// The last feed item's sequence number.
    feed_seq: u64,
    /// Per table, rows other writers published (see [`crate::peers`]).
    mirrors: Vec<Mirror>,
    outlet: Arc<Outlet>,
}

/// A write waiting in the group being committed.
struct Pending {
    payload: Vec<u8>,
    rows: Rows,
    done: oneshot::Sender<Result<(), String>>,
}

impl<L: Log> Writer<L> {
    /// A writer over `log`, with `buffers` (by table index, replayed records already in
    /// them), the positions reached and committed, and the last applied sequence.
    pub(crate) fn new(
        log: L,
        buffers: Vec<HotBuffer>,
        reached: Positions,
        committed: Vec<Positions>,
        applied_seq: u64,
        outlet: Arc<Outlet>,
    ) -> Self {
        let mirrors = buffers.iter().map(|_| Mirror::default()).collect();
        let mut writer = Self {
            log,
            mirrors,
            buffers,
            reached,
            committed,
            applied_seq,
            feed_seq: 0,
            outlet,
        };
        writer.publish();
        writer
    }

    /// Handles commands until every sender is gone.
    pub(crate) fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut group: Vec<Pending> = Vec::new();
        while let Some(first) = rx.blocking_recv() {
            let mut next = Some(first);
            while let Some(command) = next {
                match command {
                    Command::Append {
                        payload,
                        rows,
                        done,
                    } => {
                        group.push(Pending {
                            payload,
                            rows,
                            done,
                        });
                        if group.len() >= QUEUE {
                            self.commit_group(&mut group);
                        }
                    }
                    other => {
                        // Writes queued before it are answered first.
                        self.commit_group(&mut group);
                        self.handle(other);
                    }
                }
                next = rx.try_recv().ok();
            }
            self.commit_group(&mut group);
        }
    }

    /// Appends the group, fsyncs once, applies, publishes, then acknowledges.
    fn commit_group(&mut self, group: &mut Vec<Pending>) {
        if group.is_empty() {
            return;
        }
        let started = Instant::now();
        let mark = self.log.mark();
        let mut appended = Vec::with_capacity(group.len());
        let mut failure: Option<String> = None;
        for write in group.drain(..) {
            if failure.is_none() {
                match self.log.append(&write.payload) {
                    Ok(seq) => {
                        ::metrics::counter!(m::WAL_BYTES).increment(write.payload.len() as u64);
                        appended.push((seq, write.rows, write.done));
                        continue;
                    }
                    Err(e) => failure = Some(e.to_string()),
                }
            }
            let _ = write.done.send(Err(failure.clone().unwrap_or_default()));
        }
        if failure.is_none() {
            let syncing = Instant::now();
            match self.log.sync() {
                Ok(()) => ::metrics::histogram!(m::WAL_SYNC_SECONDS)
                    .record(syncing.elapsed().as_secs_f64()),
                Err(e) => failure = Some(e.to_string()),
            }
        }
        if let Some(reason) = failure {
            // Nothing of this group is acknowledged, and none of it stays in the log:
            // a partial record would stop replay in front of later ones.
            let cut = self.log.rollback(mark).err();
            error!(error = %reason, cut_failed = ?cut.as_ref().map(ToString::to_string), "write-ahead log append failed");
            let now = self.outlet.clock.now();
            self.outlet.faults.fail(Stage::Wal, &reason, now);
            ::metrics::counter!(m::WAL_FAILURES).increment(1);
            for (_, _, done) in appended {
                let _ = done.send(Err(format!("write-ahead log: {reason}")));
            }
            return;
        }
        self.outlet.faults.recover(Stage::Wal);
        ::metrics::histogram!(m::WAL_GROUP_SECONDS).record(started.elapsed().as_secs_f64());
        ::metrics::histogram!(m::WAL_GROUP_SIZE).record(appended.len() as f64);
        ::metrics::counter!(m::WAL_RECORDS).increment(appended.len() as u64);
        let writes: Vec<(u64, &[(Table, RecordBatch)])> = appended
            .iter()
            .map(|(seq, rows, _)| (*seq, rows.as_slice()))
            .collect();
        let open_rows = self.apply(&writes);
        if let Some((last, _, _)) = appended.last() {
            self.applied_seq = *last;
        }
        self.publish();
        for (_, _, done) in appended {
            let _ = done.send(Ok(()));
        }
        self.maybe_flush(open_rows);
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Append { .. } => unreachable!("appends are grouped by `run`"),
            Command::Positioned {
                rows,
                positions,
                done,
            } => {
                // No log record: the rows ride with the last applied one, which keeps
                // the table's committed WAL sequence and truncation correct.
                let open_rows = self.apply(&[(self.applied_seq, &rows)]);
                advance(&mut self.reached, positions);
                self.publish();
                let _ = done.send(());
                self.maybe_flush(open_rows);
            }
            Command::BeginFlush { done } => {
                let flushes = self
                    .buffers
                    .iter_mut()
                    .zip(&self.committed)
                    .map(|(buffer, committed)| {
                        let merged = merge_positions(committed, &self.reached);
                        TableFlush {
                            table: buffer.table(),
                            job: buffer.begin_flush(),
                            positions: (merged != *committed).then_some(merged),
                            feed_through: self.feed_seq,
                        }
                    })
                    .collect();
                self.publish();
                let _ = done.send(flushes);
            }
            Command::Committing { table, base } => {
                self.buffers[table.index()].committing_on(base);
                self.publish();
            }
            Command::Committed {
                table,
                written,
                positions,
                done,
            } => {
                if let Some(written) = written {
                    if !written.revealed.is_empty() {
                        let points: Vec<u128> = if self.mirrors[table.index()].is_empty() {
                            Vec::new()
                        } else {
                            written
                                .revealed
                                .iter()
                                .flat_map(|b| row_keys(table, b).into_iter().map(|k| k.point))
                                .collect()
                        };
                        self.emit(table, written.revealed, Some(written.version));
                        self.own_after_mirrored(table, &points);
                    }
                    if !written.retracted.is_empty() {
                        self.emit_item(table, written.retracted, None, true, false);
                    }
                    let buffer = &mut self.buffers[table.index()];
                    buffer.complete_flush_known(written.version, written.rows, written.latest);
                    ::metrics::gauge!(m::TRACKED_SERIES, "table" => table.name())
                        .set(buffer.tracked_series() as f64);
                }
                if let Some(positions) = positions {
                    self.committed[table.index()] = positions;
                }
                self.publish();
                let _ = done.send(());
            }
            Command::FlushFailed { table } => {
                self.buffers[table.index()].flush_failed();
                self.publish();
            }
            Command::Others {
                table,
                commits,
                through,
                done,
            } => {
                // The tail asks for a flush at once; a flush's own reading (no `done`)
                // looks only at the rows it does not hold itself.
                let from_tail = done.is_some();
                let mut held = false;
                for commit in commits {
                    let OtherCommit {
                        version,
                        writer,
                        cover,
                        rows,
                        points,
                        lost,
                    } = commit;
                    if lost.is_some() {
                        // Readers keeping state from the feed read the lake again; the
                        // rows this mirror held of it leave (they are in the lake).
                        if let (Some(writer), Some(cover)) = (writer, cover) {
                            self.mirrors[table.index()].commit_unread(version, &writer, &cover);
                        }
                        self.emit_lost(table, version);
                        // Its rows are unknown: the flush checks this writer's rows by
                        // time alone.
                        held |= !self.buffers[table.index()].holds_none();
                        continue;
                    }
                    // Rows this writer holds too (a retry sent to both instances) count
                    // twice until its flush finds them in the lake and takes its copies
                    // back: that flush comes now rather than at the interval.
                    let buffer = &self.buffers[table.index()];
                    if !buffer.holds_none() {
                        let mine: Vec<u128> = points
                            .iter()
                            .flatten()
                            .copied()
                            .filter(|p| buffer.shows(*p, from_tail))
                            .collect();
                        if !mine.is_empty() {
                            held = true;
                            // The flush checks them against the lake whatever their time.
                            self.outlet.held[table.index()]
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .extend(mine);
                        }
                    }
                    let (rows, retracted) = match (writer, cover) {
                        (Some(writer), Some(cover)) => self.mirrors[table.index()]
                            .commit(version, &writer, &cover, rows, points),
                        _ => (rows, Vec::new()),
                    };
                    // The commit's rows first: no reader's count dips below the lake's.
                    if rows.iter().any(|b| b.num_rows() > 0) {
                        self.mirrors[table.index()].committed_elsewhere(version, &rows);
                        self.emit(table, rows, Some(version));
                    }
                    if !retracted.is_empty() {
                        self.emit_item(table, retracted, None, true, false);
                    }
                }
                self.mirrors[table.index()].read_through(through);
                self.publish();
                if held {
                    ::metrics::counter!(m::EARLY_FLUSHES, "table" => table.name()).increment(1);
                }
                match done {
                    Some(done) => {
                        let _ = done.send(held);
                    }
                    None if held => self.outlet.flush_now.notify_one(),
                    None => {}
                }
            }
            Command::Forget { table, runs } => {
                for (writer, incarnation) in runs {
                    let gone = self.mirrors[table.index()].forget(&writer, &incarnation);
                    if !gone.is_empty() {
                        ::metrics::counter!(m::FORGOTTEN_ROWS, "table" => table.name())
                            .increment(gone.iter().map(RecordBatch::num_rows).sum::<usize>() as u64);
                        warn!(%table, %writer, %incarnation, "another instance's run has been silent too long: its unflushed rows are taken back until the lake has them");
                        self.emit_item(table, gone, None, true, false);
                    }
                }
                self.publish();
            }
            Command::Mirror {
                table,
                published,
                done,
            } => {
                for rows in published {
                    // Rows this writer holds too count once, as its own.
                    let buffer = &self.buffers[table.index()];
                    let held = |point: u128| buffer.shows(point, true);
                    let held: Option<&dyn Fn(u128) -> bool> =
                        (!buffer.holds_none()).then_some(&held);
                    let (rows, left_out) = self.mirrors[table.index()].add(table, rows, held);
                    if left_out > 0 {
                        ::metrics::counter!(m::LEFT_OUT_ROWS, "table" => table.name())
                            .increment(left_out as u64);
                    }
                    if !rows.is_empty() {
                        ::metrics::counter!(m::MIRRORED_ROWS, "table" => table.name())
                            .increment(rows.iter().map(RecordBatch::num_rows).sum::<usize>() as u64);
                        self.emit_item(table, rows, None, false, true);
                    }
                }
                self.publish();
                if let Some(done) = done {
                    let _ = done.send(());
                }
            }
            Command::Truncate => {
                let through = self.truncatable_through();
                if through > 0
                    && let Err(error) = self.log.remove_through(through)
                {
                    warn!(%error, "could not remove committed write-ahead log segments");
                }
            }
            Command::HoldPositions { positions, done } => {
                for (table, found) in &positions {
                    self.committed[table.index()]
                        .extend(found.iter().map(|(k, v)| (k.clone(), v.clone())));
                }
                self.reached
                    .extend(least_positions(self.buffers.len(), &positions));
                let _ = done.send(());
            }
            Command::DropPositions { keys, done } => {
                for key in &keys {
                    self.reached.remove(key);
                    for committed in &mut self.committed {
                        committed.remove(key);
                    }
                }
                let _ = done.send(());
            }
        }
    }

    /// Inserts the rows of `writes` (WAL sequence, rows of any tables) into the hot
    /// buffers, counting duplicates; returns the rows the next flush takes.
    fn apply(&mut self, writes: &[(u64, &[(Table, RecordBatch)])]) -> usize {
        let mut open_rows = 0;
        let mut visible = Vec::new();
        for (buffer, mirror) in self.buffers.iter_mut().zip(&self.mirrors) {
            let table = buffer.table();
            let mut duplicates = 0;
            let mut shown = Vec::new();
            // With rows of other instances mirrored, the keys of those made visible here,
            // to take out the mirrored copies of the same datapoints.
            let mut points = (!mirror.is_empty()).then(Vec::new);
            for (seq, rows) in writes {
                for (t, batch) in *rows {
                    if *t == table {
                        let (outcome, visible) =
                            buffer.insert_visible(*seq, batch, points.as_mut());
                        duplicates += outcome.duplicates;
                        shown.extend(visible);
                    }
                }
            }
            if !shown.is_empty() {
                visible.push((table, shown, points.unwrap_or_default()));
            }
            if duplicates > 0 {
                ::metrics::counter!(m::DUPLICATES, "table" => table.name(), "stage" => "buffer")
                    .increment(duplicates as u64);
            }
            open_rows += buffer.open_rows();
        }
        for (table, batches, points) in visible {
            self.emit(table, batches, None);
            self.own_after_mirrored(table, &points);
        }
        open_rows
    }

    /// Rows with keys `points` of `table` became visible here: another instance's copies
    /// of them mirrored before (a retry this instance received after the other's copy
    /// reached it) are taken back, after the emission of this instance's, so that each
    /// counts once.
    fn own_after_mirrored(&mut self, table: Table, points: &[u128]) {
        if points.is_empty() {
            return;
        }
        let taken = self.mirrors[table.index()].take_points(points);
        if !taken.is_empty() {
            ::metrics::counter!(m::LEFT_OUT_ROWS, "table" => table.name())
                .increment(taken.iter().map(RecordBatch::num_rows).sum::<usize>() as u64);
            self.emit_item(table, taken, None, true, true);
        }
    }

    /// Emits `batches` of `table` to the feed (before the snapshot that shows them is
    /// published).
    fn emit(&mut self, table: Table, batches: Vec<RecordBatch>, committed_as: Option<i64>) {
        self.emit_item(table, batches, committed_as, false, false);
    }

    fn emit_item(
        &mut self,
        table: Table,
        batches: Vec<RecordBatch>,
        committed_as: Option<i64>,
        retract: bool,
        mirrored: bool,
    ) {
        self.feed_seq += 1;
        self.outlet.feed.emit(FeedItem {
            seq: self.feed_seq,
            table,
            batches,
            committed_as,
            retract,
            mirrored,
            lost: false,
        });
    }

    /// Tells readers that the rows of another writer's commit `version` of `table`
    /// cannot be had from the feed (see [`FeedItem::lost`]).
    fn emit_lost(&mut self, table: Table, version: i64) {
        self.feed_seq += 1;
        self.outlet
            .feed
            .emit(FeedItem::lost_commit(self.feed_seq, table, version));
    }

    fn maybe_flush(&self, open_rows: usize) {
        if open_rows >= self.outlet.flush_rows {
            self.outlet.flush_now.notify_one();
        }
    }

    /// Publishes the buffers' views and updates the buffer gauges.
    fn publish(&mut self) {
        let views: Vec<BufferView> = self
            .buffers
            .iter_mut()
            .zip(&mut self.mirrors)
            .map(|(buffer, mirror)| buffer.view().with_mirror(mirror.view()))
            .collect();
        for ((buffer, view), mirror) in self.buffers.iter().zip(&views).zip(&self.mirrors) {
            let table = buffer.table().name();
            ::metrics::gauge!(m::BUFFER_ROWS, "table" => table).set(view.rows() as f64);
            ::metrics::gauge!(m::BUFFER_BYTES, "table" => table).set(view.bytes() as f64);
            ::metrics::gauge!(m::MIRROR_ROWS, "table" => table).set(mirror.rows() as f64);
        }
        self.outlet.published.store(Arc::new(Published {
            views,
            applied_seq: self.applied_seq,
            feed_seq: self.feed_seq,
        }));
    }

    /// The WAL sequence through which every table has committed what it holds.
    fn truncatable_through(&self) -> u64 {
        self.buffers
            .iter()
            .filter_map(HotBuffer::pending_since)
            .map(|first| first.saturating_sub(1))
            .fold(self.applied_seq, u64::min)
    }
}
