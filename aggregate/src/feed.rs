//! The row feed: every row of `metrics`, `logs` and `dead_letters` at the moment it
//! becomes visible to SQL, exactly once, for readers that keep state as rows arrive
//! (incremental alert evaluation, `query::incremental`).
//!
//! A row becomes visible to SQL in one of two ways, and the writer emits it at that
//! moment, before it publishes the snapshot that shows it:
//! - applied to the hot buffer as new (not a duplicate, not a suspect): emitted with
//!   the group commit (or stream write) that applied it;
//! - a suspect (at or before its series' lake watermark) that the flush found not in
//!   the lake: emitted when the writer learns its commit landed, marked with the lake
//!   version that holds it.
//!
//! Duplicates within the buffer and redeliveries found in the lake are never emitted.
//!
//! With several writers on one lake ([`crate::Aggregator::follow_other_writers`]), two
//! more kinds of item come:
//! - the rows of another writer's commit, once this process reads it (the lake tail),
//!   marked with that version;
//! - *retractions*: rows this process made visible that its flush then found already
//!   in the lake, committed by another writer (a retry sent to the other instance).
//!   They were emitted once from here and come again with the other writer's commit,
//!   so a reader takes them away once: every row counts once after this flush, as it
//!   does in the lake.
//!
//! A commit of another writer whose rows cannot be read one commit at a time (its
//! files vacuumed before this process read it) comes as a *lost* item: no rows, its
//! version, and a reader whose state lacks that version reads the lake again.
//!
//! Each emission has a sequence number; [`Published::feed_seq`](crate::writer::Published)
//! is the last one emitted before that snapshot, so a reader that subscribes and then
//! reads a snapshot knows which items the snapshot already holds (see
//! [`FeedItem::already_in`]). Emission comes a moment before publication: a reader
//! waits for a snapshot whose `feed_seq` reaches the last item emitted before it
//! subscribed ([`Feed::subscribe`] says which) and every item it has received, or
//! the rows in between would be in neither.

use std::sync::{Arc, Mutex};

use arrow::array::RecordBatch;
use tokio::sync::mpsc;

use fleetlake_model::Table;

/// Rows of one table that became visible together.
#[derive(Debug)]
pub struct FeedItem {
    /// The emission's sequence number (1, 2, ...; one per item).
    pub seq: u64,
    /// The table the rows are of.
    pub table: Table,
    /// The rows.
    pub batches: Vec<RecordBatch>,
    /// For suspects found new by a flush, and rows of another writer's commit: the
    /// lake version that holds them.
    pub committed_as: Option<i64>,
    /// The rows are taken back (see the module docs): each was emitted before and is
    /// in the lake through another writer's commit.
    pub retract: bool,
    /// The rows are another instance's, published before its commit (see
    /// [`crate::peers`]).
    pub mirrored: bool,
    /// No rows: those of another writer's commit (`committed_as`) could not be read
    /// (gone from the log, or its files vacuumed after a compaction rewrote them).
    /// A reader whose state lacks that version cannot keep it up from the feed and
    /// must read the lake again (at that version or later).
    pub lost: bool,
}

impl FeedItem {
    /// Emission `seq`: the rows of another writer's commit `version` of `table` cannot
    /// be had from the feed (see [`FeedItem::lost`]).
    pub fn lost_commit(seq: u64, table: Table, version: i64) -> Self {
        Self {
            seq,
            table,
            batches: Vec::new(),
            committed_as: Some(version),
            retract: false,
            mirrored: false,
            lost: true,
        }
    }

    /// Whether a reader that took its rows from the hot snapshot with `feed_seq` and
    /// from the lake at version `lake_version` of this item's table already has these
    /// rows.
    pub fn already_in(&self, feed_seq: u64, lake_version: Option<i64>) -> bool {
        self.seq <= feed_seq
            || matches!((self.committed_as, lake_version), (Some(at), Some(v)) if at <= v)
    }
}

/// The subscribers, and the last sequence number emitted (the writer's thread is the
/// only one that emits).
#[derive(Debug, Default)]
pub(crate) struct Feed {
    inner: Mutex<Subscribers>,
}

#[derive(Debug, Default)]
struct Subscribers {
    senders: Vec<mpsc::UnboundedSender<Arc<FeedItem>>>,
    last: u64,
}

impl Feed {
    /// A receiver of every item emitted from now on, and the sequence number of the
    /// last item emitted before it: a reader's first snapshot must hold at least that
    /// one (the writer publishes it a moment after emitting it), or the rows between
    /// are neither in its snapshot nor on its receiver.
    pub(crate) fn subscribe(&self) -> (mpsc::UnboundedReceiver<Arc<FeedItem>>, u64) {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.senders.push(tx);
        (rx, inner.last)
    }

    /// Sends `item` to every subscriber still listening. The rows are shared with the
    /// hot buffer, so this costs a pointer per batch, not a copy.
    pub(crate) fn emit(&self, item: FeedItem) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.last = item.seq;
        if inner.senders.is_empty() {
            return;
        }
        let item = Arc::new(item);
        inner
            .senders
            .retain(|tx| tx.send(Arc::clone(&item)).is_ok());
    }
}
