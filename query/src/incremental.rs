//! Incremental evaluation of alert rules: each rule's aggregates over a window of
//! `metrics` or `logs` rows are kept as small partial aggregates per time slot,
//! updated as rows become visible, so a round merges slots instead of scanning rows.
//!
//! A rule whose statement is [`Shape::Incremental`] is split, once, at its leaves (see
//! [`crate::shape`]):
//! - each leaf's `Aggregate` becomes a *fold* plan: the same row predicates (the window
//!   bounds taken out), the same groups plus the row's slot, and partial aggregates
//!   (`avg` as `sum` and `count`). Leaves are shared: rules that differ only above
//!   their aggregates (a threshold, a join with `accounts`) read one leaf;
//! - the rest of the plan is kept with each leaf replaced by a table of the leaf's
//!   result; it runs as it is every round (the `accounts` table and any other read
//!   resolved afresh).
//!
//! A slot is a second of row time, split in two: rows exactly on the second, and rows
//! after it within the second. A window bound on a whole second (the round's instant
//! is a whole second, see the alert engine, and the window is whole seconds) then
//! falls on slot boundaries for `>`, `>=`, `<` and `<=` alike, so a round reads exactly
//! the rows SQL would read.
//!
//! Rows come from the write path's feed ([`fleetlake_aggregate::feed`]): every row as
//! it becomes visible to SQL, exactly once (buffer duplicates and redeliveries found in
//! the lake never come). A leaf starts from one read of the lake and the hot buffer
//! (a version of each and the feed position that snapshot holds), then folds the feed's
//! later items. Each fold routes rows by the leaf's `namespace` / `metric_name` /
//! `log_group` predicates first, so a leaf only reads rows of what it filters on.
//!
//! What is not followed here is evaluated as SQL by the caller: a statement of another
//! shape, a plan that uses `now()` above its aggregates, a round at an instant whose
//! window bounds are not whole seconds, or one that reaches before what a leaf holds.
//! Every such path gives the same rows; the property test in this module compares
//! them round by round.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::{
    Array, ArrayRef, AsArray, Int64Array, MutableArrayData, RecordBatch, make_array,
};
use arrow::compute::kernels::cmp::{gt_eq, lt_eq};
use arrow::compute::kernels::numeric::div;
use arrow::compute::{and, cast, concat_batches, filter_record_batch};
use arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef};
use datafusion::catalog::streaming::StreamingTable;
use datafusion::common::tree_node::{Transformed, TreeNodeRecursion};
use datafusion::common::{Column, TableReference};
use datafusion::datasource::{MemTable, provider_as_source};
use datafusion::execution::{SendableRecordBatchStream, SessionState, TaskContext};
use datafusion::logical_expr::utils::{conjunction, split_conjunction};
use datafusion::logical_expr::{
    Aggregate, Expr, Filter, LogicalPlan, LogicalPlanBuilder, Projection, SubqueryAlias, TableScan,
    TableScanBuilder, TableSource,
};
use datafusion::physical_plan::memory::MemoryStream;
use datafusion::physical_plan::streaming::PartitionStream;
use datafusion::physical_plan::{ExecutionPlan, PhysicalExpr, collect};
use datafusion::prelude::col;
use futures::StreamExt;
use tokio::sync::mpsc;

use fleetlake_aggregate::feed::FeedItem;
use fleetlake_model::Table;
use fleetlake_model::schema::conform;

use crate::access::Principal;
use crate::engine::{QueryEngine, QueryError, pin, plan_read_only, sql_instant};
use crate::grouped::{Grouped, Layout, Merge};
use crate::moving::Moving;
use crate::shape::{Leaf, Shape, Window};

/// The slot column added to a leaf's rows.
const SLOT: &str = "__slot";

/// Partial batches a leaf keeps before merging them into one.
#[cfg(not(test))]
const COMPACT_AFTER: usize = 16;
/// Often, so that the property test goes through compactions.
#[cfg(test)]
const COMPACT_AFTER: usize = 2;

/// The batch size of fold and merge plans.
const EMIT_ROWS: usize = 1 << 20;

/// What fold and merge plans run with: batches of [`EMIT_ROWS`].
fn fold_task() -> Arc<TaskContext> {
    static TASK: std::sync::LazyLock<Arc<TaskContext>> = std::sync::LazyLock::new(|| {
        Arc::new(TaskContext::default().with_session_config(
            datafusion::prelude::SessionConfig::new().with_batch_size(EMIT_ROWS),
        ))
    });
    Arc::clone(&TASK)
}

/// Rows folded at a time while a leaf starts from the lake.
#[cfg(not(test))]
const START_CHUNK_ROWS: usize = 256 * 1024;
/// Small, so that the property test starts leaves through several folds (and
/// compactions).
#[cfg(test)]
const START_CHUNK_ROWS: usize = 4;

/// Where rows come from: the write path's feed and hot buffer.
pub trait RowFeed: Send + Sync + 'static {
    /// Every item emitted from now on, and the sequence number of the last item
    /// emitted before.
    fn subscribe(&self) -> (mpsc::UnboundedReceiver<Arc<FeedItem>>, u64);
    /// The hot rows of `table` a reader of lake version `lake_version` must add, and
    /// the feed position that snapshot holds; `None` while that cannot be told (a
    /// flush committing while other writers commit too: a version after the flush's
    /// base may be theirs, not the flush's).
    fn hot(&self, table: Table, lake_version: Option<i64>) -> Option<(u64, Vec<RecordBatch>)>;
}

impl RowFeed for fleetlake_aggregate::Aggregator {
    fn subscribe(&self) -> (mpsc::UnboundedReceiver<Arc<FeedItem>>, u64) {
        fleetlake_aggregate::Aggregator::subscribe(self)
    }

    fn hot(&self, table: Table, lake_version: Option<i64>) -> Option<(u64, Vec<RecordBatch>)> {
        let published = self.published();
        let rows = match published.views.get(table.index()) {
            Some(view) => view.visible_settled(lake_version)?,
            None => Vec::new(),
        };
        Some((published.feed_seq, rows))
    }
}

/// How a rule is evaluated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Path {
    /// From partial aggregates kept as rows arrive: the leaves it reads.
    Incremental(Vec<String>),
    /// As SQL over the recent rows kept in memory (the longest window any such rule
    /// reads), because of `reason`.
    Window {
        /// How far back the rule reads.
        longest: Duration,
        /// Why not from partial aggregates.
        reason: String,
    },
    /// As SQL each round, for `reason`.
    Sql(String),
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Path::Incremental(leaves) => write!(f, "incremental: {}", leaves.join("; and ")),
            Path::Window { longest, reason } => write!(
                f,
                "sql over the last {} of rows in memory: {reason}",
                humantime::format_duration(*longest)
            ),
            Path::Sql(reason) => write!(f, "sql over the lake each round: {reason}"),
        }
    }
}

/// Rows a re-executable source hands out: the leaf's new rows while it folds, or
/// its partials while it merges.
#[derive(Debug)]
struct Rows {
    schema: SchemaRef,
    batches: Mutex<Vec<RecordBatch>>,
}

impl Rows {
    fn new(schema: SchemaRef) -> Arc<Self> {
        Arc::new(Self {
            schema,
            batches: Mutex::new(Vec::new()),
        })
    }

    fn set(&self, batches: Vec<RecordBatch>) {
        *self.batches.lock().unwrap_or_else(|e| e.into_inner()) = batches;
    }

    fn source(self: &Arc<Self>) -> datafusion::error::Result<Arc<dyn TableSource>> {
        let table = StreamingTable::try_new(
            Arc::clone(&self.schema),
            vec![Arc::clone(self) as Arc<dyn PartitionStream>],
        )?;
        Ok(provider_as_source(Arc::new(table)))
    }
}

impl PartitionStream for Rows {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let batches = self
            .batches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        Box::pin(
            MemoryStream::try_new(batches, Arc::clone(&self.schema), None)
                .expect("batches of the source's schema"),
        )
    }
}

/// How a leaf's output column is made from its merged partials.
#[derive(Debug, Clone, Copy)]
enum Finish {
    /// A grouping column.
    Group(usize),
    /// A partial merged as it is (`sum`, `min`, `max`).
    Plain(usize),
    /// A count: 0 where nothing was counted.
    Count(usize),
    /// `avg`: the merged sum over the merged count.
    Avg { sum: usize, count: usize },
}

/// A leaf planned: what to fold rows with, and how to merge.
struct LeafPlan {
    leaf: Leaf,
    /// The leaf's `Aggregate` at the first instant: its identity among rules.
    key: LogicalPlan,
    /// Its output as the rule's plan expects it, the columns named by position.
    output: SchemaRef,
    fold: Arc<dyn ExecutionPlan>,
    fold_input: Arc<Rows>,
    /// The fold's logical plan: leaves with equal ones (a rule's aggregate over 5 and
    /// over 15 minutes) fold rows once and share what comes out.
    fold_key: LogicalPlan,
    /// The table's schema as planned: rows are conformed to it.
    table_schema: SchemaRef,
    /// The table's columns the fold reads (its scan's projection and filters), by
    /// index in `table_schema`, ascending: the only ones copied for it.
    columns: Vec<usize>,
    /// What the fold reads: `columns`, then the slot.
    feed_schema: SchemaRef,
    merge_slots: Arc<dyn ExecutionPlan>,
    merge_groups: Arc<dyn ExecutionPlan>,
    partials_input: Arc<Rows>,
    finish: Vec<Finish>,
    /// Per partial: whether it merges by summing (`sum`, `count`, `avg`'s two), so a
    /// row taken back is subtracted from it; the others (`min`, `max`) stay.
    additive: Vec<bool>,
    /// Every aggregate is `max(time)` over a window open towards now: a group's
    /// latest time says alone whether it has rows in a window, so its partials
    /// compact to one row per group (last seen) instead of one per slot.
    last_seen: bool,
    /// How its partials are held by group, where they are of kinds held so.
    grouped: Option<Arc<Layout>>,
}

/// A leaf's partial aggregates.
enum Partials {
    /// Held by group and slot ([`Grouped`]).
    Grouped(Box<Grouped>),
    /// Batches of `(slot, keys, states)`, merged by DataFusion (every
    /// [`COMPACT_AFTER`] folds, and at each round).
    Batches(Vec<RecordBatch>),
}

impl Partials {
    fn empty(plan: &LeafPlan) -> Self {
        match &plan.grouped {
            Some(layout) => Partials::Grouped(Box::new(Grouped::new(Arc::clone(layout)))),
            None => Partials::Batches(Vec::new()),
        }
    }

    /// Bytes held.
    fn bytes(&self) -> usize {
        match self {
            Partials::Grouped(g) => g.bytes(),
            Partials::Batches(b) => b.iter().map(RecordBatch::get_array_memory_size).sum(),
        }
    }
}

/// A leaf and the partial aggregates it holds.
struct LeafState {
    plan: Arc<LeafPlan>,
    partials: Partials,
    /// The feed position and lake version its start read held: items at or before
    /// them are in its partials already.
    since: (u64, Option<i64>),
    /// The first slot it holds every row of.
    horizon: i64,
    /// The result of the last instant merged.
    cached: Option<(i64, RecordBatch)>,
    /// Why its partials cannot be trusted (a fold failed, or they passed their
    /// bound): the rules reading it run as SQL until it starts again.
    broken: Option<String>,
    /// When it starts again once broken.
    restart: Backoff,
}

/// When something built from the lake and kept up from the feed (a leaf's partials,
/// a window of rows) that can no longer be trusted or kept is built again: what
/// broke it (a fold failing on rows since gone, a burst of groups or rows) may have
/// passed, and the rules reading it need not scan the lake for good. The wait is
/// [`RESTART_AFTER`] from the first round that finds it broken, doubled at each
/// restart, at most a day.
#[derive(Debug, Default)]
struct Backoff {
    /// When it starts again (a round's instant, epoch ms), set by the first round
    /// that finds it broken.
    at: Option<i64>,
    /// How many times it has started again.
    restarts: u32,
    /// A start is reading the lake (without the state's lock).
    running: bool,
}

/// [`Backoff::at`] of a start due at the next round, not counted as a restart.
const AT_ONCE: i64 = i64::MIN;

impl Backoff {
    /// Starts it again at the next round: what broke it (a commit whose rows could
    /// not be read from the feed) is over once the lake is read again, and does not
    /// make later waits longer.
    fn at_once(&mut self) {
        if !self.running {
            self.at = Some(AT_ONCE);
        }
    }

    /// Whether a round at `at_ms` starts it again (counted, and marked running, when
    /// it does); the first call after it broke sets when.
    fn due(&mut self, at_ms: i64) -> bool {
        if self.running {
            return false;
        }
        let wait = RESTART_AFTER
            .saturating_mul(1 << self.restarts.min(10))
            .min(Duration::from_secs(86_400));
        let wait_ms = i64::try_from(wait.as_millis()).unwrap_or(i64::MAX / 2);
        let due = *self.at.get_or_insert(at_ms.saturating_add(wait_ms));
        if at_ms < due {
            return false;
        }
        if due != AT_ONCE {
            self.restarts += 1;
        }
        self.at = None;
        self.running = true;
        ::metrics::counter!("fleetlake_incremental_restarts_total").increment(1);
        true
    }
}

impl LeafState {
    /// Its partials can no longer be trusted, for `reason`: its rules run as SQL
    /// until it starts again.
    fn drop_partials(&mut self, reason: String) {
        tracing::warn!(leaf = %self.plan.leaf, %reason, "incremental aggregate dropped; its rules run as SQL until it starts again");
        ::metrics::counter!("fleetlake_incremental_broken_total").increment(1);
        self.partials = Partials::empty(&self.plan);
        self.cached = None;
        self.broken = Some(reason);
    }

    /// A leaf not started yet.
    fn new(plan: Arc<LeafPlan>) -> Self {
        Self {
            partials: Partials::empty(&plan),
            plan,
            since: (0, None),
            horizon: i64::MAX,
            cached: None,
            broken: None,
            restart: Backoff::default(),
        }
    }
}

/// A rule as prepared.
enum Prepared {
    Incremental {
        /// The plan with each leaf read from a table `__leaf_<index>`, at any
        /// instant (its literals of now() moved).
        outer: Box<Moving>,
        leaves: Vec<usize>,
        /// Its physical plan, made at its first round, when it is the same at every
        /// instant and reads nothing but leaves (`None`: planned each round).
        compiled: tokio::sync::OnceCell<Option<Arc<Compiled>>>,
    },
    /// Every read is a leaf, but the plan above them uses now() in a way a literal
    /// moved does not follow (a date, `date_trunc`): planned at each round's instant,
    /// its leaves' aggregates then replaced by their results.
    Replan {
        leaves: Vec<usize>,
    },
    /// Every read of rows is in a window, not every one a leaf: the statement runs
    /// over the recent rows kept in memory.
    Window {
        tables: Vec<Table>,
        longest: Duration,
    },
    Sql(String),
}

/// Recent rows of one table, for rules that read rows in a window but not only
/// through leaves.
struct RowWindow {
    /// How far back of a round it holds every row.
    longest: Duration,
    /// It holds every row at or after this time (epoch µs).
    horizon_us: i64,
    rows: Vec<RecordBatch>,
    bytes: usize,
    /// As [`LeafState::since`].
    since: (u64, Option<i64>),
    /// Past the byte bound: emptied, and the rules that need it read the lake
    /// until it starts again.
    full: bool,
    /// When it starts again once full.
    restart: Backoff,
}

impl RowWindow {
    /// Adds `batches`, or empties itself when they pass `limit` bytes.
    fn add(&mut self, batches: impl IntoIterator<Item = RecordBatch>, limit: usize) {
        if self.full {
            return;
        }
        for batch in batches {
            self.bytes += batch.get_array_memory_size();
            self.rows.push(batch);
        }
        if self.bytes > limit {
            tracing::warn!(
                bytes = self.bytes,
                limit,
                "recent rows for windowed rules pass their bound; those rules read the lake"
            );
            self.drop_rows();
        }
    }

    /// Empties itself: it can no longer be trusted or kept, and the rules that need it
    /// read the lake until it is read again.
    fn drop_rows(&mut self) {
        self.full = true;
        self.rows = Vec::new();
        self.bytes = 0;
    }

    /// Adds the rows of `table` that feed `items` bring past [`RowWindow::since`], and
    /// takes away one copy of each row they retract.
    fn take_in(&mut self, items: &[Arc<FeedItem>], table: Table, limit: usize) {
        if !self.full
            && let Some(version) = lost_after(items, table, self.since)
        {
            tracing::warn!(
                table = table.name(),
                version,
                "recent rows miss another writer's commit that could not be read; windowed rules read the lake until they are read again"
            );
            self.drop_rows();
            self.restart.at_once();
            return;
        }
        self.add(rows_after(items, table, self.since), limit);
        let taken: Vec<RecordBatch> = retracted_after(items, table, self.since).collect();
        if !taken.is_empty()
            && !self.full
            && let Err(error) = self.retract(table, &taken)
        {
            // Then it cannot be trusted: read again, as when it passes its bound.
            tracing::warn!(%error, "recent rows could not take back rows; windowed rules read the lake");
            self.drop_rows();
        }
    }

    /// Takes away one row per row of `taken` with its key (the window holds it twice):
    /// the copy equal to it where there is one (two instances may have accepted one
    /// datapoint with different values, and the one taken back is the one the lake
    /// does not hold), else any.
    fn retract(&mut self, table: Table, taken: &[RecordBatch]) -> Result<(), QueryError> {
        let schema = table.schema();
        let taken = taken
            .iter()
            .map(|b| conform(b, &schema))
            .collect::<Result<Vec<_>, _>>()
            .map_err(arrow_err)?;
        // Per key, the taken rows (batch, row) not yet matched.
        let mut owed: HashMap<u128, Vec<(usize, usize)>> = HashMap::new();
        for (b, batch) in taken.iter().enumerate() {
            for (r, key) in fleetlake_model::keys::row_keys(table, batch)
                .iter()
                .enumerate()
            {
                owed.entry(key.point).or_default().push((b, r));
            }
        }
        let same_row = |window: &RecordBatch, row: usize, (b, r): (usize, usize)| {
            window
                .columns()
                .iter()
                .zip(taken[b].columns())
                .all(|(w, t)| w.slice(row, 1).as_ref() == t.slice(r, 1).as_ref())
        };
        // Rows read from the lake come in the reader's types (string views).
        let keyed = self
            .rows
            .iter()
            .map(|b| conform(b, &schema))
            .collect::<Result<Vec<_>, _>>()
            .map_err(arrow_err)?;
        let keys: Vec<Vec<u128>> = keyed
            .iter()
            .map(|b| {
                fleetlake_model::keys::row_keys(table, b)
                    .iter()
                    .map(|k| k.point)
                    .collect()
            })
            .collect();
        let mut drop: Vec<Vec<bool>> = keys.iter().map(|k| vec![false; k.len()]).collect();
        // Equal copies first, then any copy with the key for what is left.
        for exact in [true, false] {
            for (i, batch_keys) in keys.iter().enumerate() {
                for (row, key) in batch_keys.iter().enumerate() {
                    if drop[i][row] {
                        continue;
                    }
                    let Some(waiting) = owed.get_mut(key) else {
                        continue;
                    };
                    let found = if exact {
                        waiting.iter().position(|&at| same_row(&keyed[i], row, at))
                    } else {
                        (!waiting.is_empty()).then_some(0)
                    };
                    if let Some(k) = found {
                        waiting.swap_remove(k);
                        drop[i][row] = true;
                    }
                }
            }
            if owed.values().all(Vec::is_empty) {
                break;
            }
        }
        let mut bytes = 0;
        for (batch, drop) in self.rows.iter_mut().zip(drop) {
            if drop.iter().any(|d| *d) {
                let keep: arrow::array::BooleanArray = drop.iter().map(|d| Some(!d)).collect();
                *batch = filter_record_batch(batch, &keep).map_err(arrow_err)?;
            }
            bytes += batch.get_array_memory_size();
        }
        self.rows.retain(|b| b.num_rows() > 0);
        self.bytes = bytes;
        Ok(())
    }

    /// Drops rows before `cut_us` (epoch µs).
    fn prune(&mut self, cut_us: i64) -> Result<(), QueryError> {
        if cut_us <= self.horizon_us {
            return Ok(());
        }
        let mut kept = Vec::with_capacity(self.rows.len());
        let mut bytes = 0;
        for batch in self.rows.drain(..) {
            let Some(time) = batch.column_by_name("time") else {
                continue;
            };
            let micros = cast(time, &DataType::Int64).map_err(arrow_err)?;
            let keep = gt_eq(&micros, &Int64Array::new_scalar(cut_us)).map_err(arrow_err)?;
            let batch = if keep.true_count() == batch.num_rows() {
                batch
            } else {
                filter_record_batch(&batch, &keep).map_err(arrow_err)?
            };
            if batch.num_rows() > 0 {
                bytes += batch.get_array_memory_size();
                kept.push(batch);
            }
        }
        self.rows = kept;
        self.bytes = bytes;
        self.horizon_us = cut_us;
        Ok(())
    }
}

struct State {
    feed: mpsc::UnboundedReceiver<Arc<FeedItem>>,
    /// The last feed item emitted before subscribing, or received since: a start's
    /// snapshot must hold at least this one.
    received: u64,
    leaves: Vec<LeafState>,
    by_key: HashMap<LogicalPlan, usize>,
    rules: HashMap<String, Arc<Prepared>>,
    /// Recent rows per table (by [`Table::index`]) for windowed rules.
    windows: Vec<Option<RowWindow>>,
    /// Starts reading the lake without the lock: while any runs, the items taken off
    /// the feed are kept here too, for each start to fold those its snapshot lacks.
    starting: usize,
    replay: Vec<Arc<FeedItem>>,
    /// The latest round instant the feed was caught up for (epoch ms).
    caught_up_at: i64,
    /// Starts run without the lock so far.
    started: u64,
}

impl State {
    /// A start that ran without the lock is over: the feed items taken off since it
    /// let go of the lock.
    fn started(&mut self) -> Vec<Arc<FeedItem>> {
        self.starting -= 1;
        self.started += 1;
        if self.starting == 0 {
            std::mem::take(&mut self.replay)
        } else {
            self.replay.clone()
        }
    }
}

/// How long after a round finds a leaf broken it starts again (doubled at each
/// restart).
const RESTART_AFTER: Duration = Duration::from_secs(600);

/// How long a start waits for the writer to publish what it has emitted (a moment,
/// unless the writer is stuck).
const PUBLISH_WAIT: Duration = Duration::from_secs(10);

/// Bytes of recent rows kept for windowed rules, per table, unless set.
pub const WINDOW_BYTES: usize = 512 << 20;

/// Incremental evaluation over one query engine and one feed (see the module docs).
pub struct Incremental {
    engine: Arc<QueryEngine>,
    feed: Arc<dyn RowFeed>,
    state: tokio::sync::Mutex<State>,
    window_bytes: usize,
}

impl fmt::Debug for Incremental {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Incremental").finish_non_exhaustive()
    }
}

fn principal() -> Principal {
    Principal::unrestricted("alerting")
}

fn df(e: datafusion::error::DataFusionError) -> QueryError {
    QueryError::Sql(Box::new(e))
}

fn arrow_err(e: arrow::error::ArrowError) -> QueryError {
    df(datafusion::error::DataFusionError::ArrowError(
        Box::new(e),
        None,
    ))
}

/// The slot of a row time (epoch µs): twice the second, plus one if after it.
fn slot_of(micros: i64) -> i64 {
    let second = micros.div_euclid(1_000_000);
    2 * second + i64::from(micros.rem_euclid(1_000_000) != 0)
}

/// The slots a window holds at `at_ms`, as `(first, last)` inclusive; `None` when a
/// bound is not on a whole second.
fn slot_range(window: &Window, at_ms: i64) -> Option<(i64, Option<i64>)> {
    let second = |ago: std::time::Duration| -> Option<i64> {
        let ms = at_ms.checked_sub(i64::try_from(ago.as_millis()).ok()?)?;
        (ms.rem_euclid(1000) == 0 && ago.subsec_nanos().is_multiple_of(1_000_000))
            .then_some(ms.div_euclid(1000))
    };
    let from = second(window.from)?;
    let first = if window.from_inclusive {
        2 * from
    } else {
        2 * from + 1
    };
    let last = match window.to {
        None => None,
        Some(to) => {
            let to = second(to)?;
            Some(if window.to_inclusive {
                2 * to
            } else {
                2 * to - 1
            })
        }
    };
    Some((first, last))
}

/// `batch` with its slot column added (its `time` read as epoch µs).
fn with_slots(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch, QueryError> {
    let time = batch
        .column_by_name("time")
        .ok_or_else(|| QueryError::Lake("rows without a time column".into()))?;
    let micros = cast(time, &DataType::Int64).map_err(arrow_err)?;
    let slots: Int64Array = micros
        .as_primitive::<Int64Type>()
        .iter()
        .map(|t| t.map(slot_of))
        .collect();
    let mut columns = batch.columns().to_vec();
    columns.push(Arc::new(slots));
    RecordBatch::try_new(Arc::clone(schema), columns).map_err(arrow_err)
}

impl Incremental {
    /// Evaluation over `engine`'s tables, fed by `feed` (subscribed now).
    pub fn new(engine: Arc<QueryEngine>, feed: Arc<dyn RowFeed>) -> Self {
        let (rx, received) = feed.subscribe();
        Self {
            engine,
            feed,
            state: tokio::sync::Mutex::new(State {
                feed: rx,
                received,
                leaves: Vec::new(),
                by_key: HashMap::new(),
                rules: HashMap::new(),
                windows: Table::ALL.iter().map(|_| None).collect(),
                starting: 0,
                replay: Vec::new(),
                caught_up_at: i64::MIN,
                started: 0,
            }),
            window_bytes: WINDOW_BYTES,
        }
    }

    /// Keeps at most `bytes` of recent rows per table for rules evaluated over a
    /// window of rows (past it, those rules read the lake).
    pub fn with_window_bytes(mut self, bytes: usize) -> Self {
        self.window_bytes = bytes;
        self
    }

    /// How `sql` would be evaluated, and why (planning only: nothing is read).
    pub async fn path(engine: &QueryEngine, sql: &str) -> Result<Path, QueryError> {
        Ok(match plan_rule(engine, sql).await? {
            Planned::Sql(reason) => Path::Sql(reason),
            Planned::Window {
                longest, reason, ..
            } => Path::Window { longest, reason },
            Planned::Leaves { leaves, plans } => {
                let refs: Vec<&LeafPlan> = leaves.iter().collect();
                let indices: Vec<usize> = (0..leaves.len()).collect();
                match outer_plan(*plans, &refs, &indices).map_err(df)? {
                    Some(_) => {
                        Path::Incremental(leaves.iter().map(|l| l.leaf.to_string()).collect())
                    }
                    None => Path::Incremental(
                        leaves
                            .iter()
                            .map(|l| {
                                format!(
                                    "{} (planned each round: the plan above it uses now() \
                                     otherwise than as an instant, e.g. a date or date_trunc)",
                                    l.leaf
                                )
                            })
                            .collect(),
                    ),
                }
            }
        })
    }

    /// Prepares `sqls` (rules not prepared yet), starting their new leaves together
    /// from one read of the lake, for rounds from `at_ms` on.
    pub async fn prepare(&self, sqls: &[&str], at_ms: i64) -> Result<(), QueryError> {
        let mut state = self.state.lock().await;
        self.prepare_locked(&mut state, sqls, at_ms).await
    }

    async fn prepare_locked(
        &self,
        state: &mut State,
        sqls: &[&str],
        at_ms: i64,
    ) -> Result<(), QueryError> {
        let first_new = state.leaves.len();
        let known: std::collections::HashSet<String> = state.rules.keys().cloned().collect();
        let prepared = self.prepare_new(state, sqls, at_ms, first_new).await;
        if prepared.is_err() {
            // Forget what could not be prepared or started, so that the next round
            // prepares it again.
            state.leaves.truncate(first_new);
            state.by_key.retain(|_, i| *i < first_new);
            state.rules.retain(|sql, _| known.contains(sql));
        }
        prepared
    }

    async fn prepare_new(
        &self,
        state: &mut State,
        sqls: &[&str],
        at_ms: i64,
        first_new: usize,
    ) -> Result<(), QueryError> {
        for sql in sqls {
            if state.rules.contains_key(*sql) {
                continue;
            }
            let prepared = match plan_rule(&self.engine, sql).await {
                Err(e) if e.is_user_error() => Prepared::Sql(e.to_string()),
                Err(e) => return Err(e),
                Ok(Planned::Sql(reason)) => Prepared::Sql(reason),
                Ok(Planned::Window {
                    tables, longest, ..
                }) => Prepared::Window { tables, longest },
                Ok(Planned::Leaves { leaves, plans }) => {
                    let mut indices = Vec::new();
                    for leaf in leaves {
                        let index = match state.by_key.get(&leaf.key) {
                            Some(i) => *i,
                            None => {
                                let i = state.leaves.len();
                                state.by_key.insert(leaf.key.clone(), i);
                                state.leaves.push(LeafState::new(Arc::new(leaf)));
                                i
                            }
                        };
                        indices.push(index);
                    }
                    let keys: Vec<&LeafPlan> =
                        indices.iter().map(|i| &*state.leaves[*i].plan).collect();
                    match outer_plan(*plans, &keys, &indices).map_err(df)? {
                        Some(outer) => Prepared::Incremental {
                            outer: Box::new(outer),
                            leaves: indices,
                            compiled: tokio::sync::OnceCell::new(),
                        },
                        None => Prepared::Replan { leaves: indices },
                    }
                }
            };
            if let Prepared::Sql(reason) = &prepared {
                tracing::info!(rule = %sql, %reason, "rule is evaluated as SQL each round");
            }
            state.rules.insert(sql.to_string(), Arc::new(prepared));
        }
        if state.leaves.len() > first_new {
            let received = state.received;
            self.start(&mut state.leaves[first_new..], at_ms, received)
                .await?;
        }
        // Recent rows as far back as the longest windowed rule reads.
        let mut needed: Vec<Option<Duration>> = Table::ALL.iter().map(|_| None).collect();
        for prepared in state.rules.values() {
            if let Prepared::Window { tables, longest } = prepared.as_ref() {
                for t in tables {
                    let n = &mut needed[t.index()];
                    *n = Some(n.map_or(*longest, |n| n.max(*longest)));
                }
            }
        }
        for table in Table::ALL {
            let Some(longest) = needed[table.index()] else {
                continue;
            };
            if state.windows[table.index()]
                .as_ref()
                .is_some_and(|w| w.longest >= longest)
            {
                continue;
            }
            // Not held yet, or not as far back: read from the lake again.
            let window = self
                .start_window(table, longest, at_ms, state.received)
                .await?;
            state.windows[table.index()] = Some(window);
        }
        ::metrics::gauge!("fleetlake_incremental_leaves").set(state.leaves.len() as f64);
        Ok(())
    }

    /// The hot rows of `table` a reader of lake version `version` adds, from a
    /// snapshot holding at least feed item `received`, and that snapshot's position.
    /// The writer emits an item a moment before it publishes the snapshot showing
    /// it: a snapshot read in between lacks rows already taken off the feed, which
    /// a start would then miss for good.
    async fn hot_through(
        &self,
        table: Table,
        version: Option<i64>,
        received: u64,
    ) -> Result<(u64, Vec<RecordBatch>), QueryError> {
        let waited = std::time::Instant::now();
        loop {
            let hot = self.feed.hot(table, version);
            let seq = match hot {
                Some((seq, rows)) if seq >= received => return Ok((seq, rows)),
                Some((seq, _)) => seq,
                None => 0,
            };
            if waited.elapsed() > PUBLISH_WAIT {
                return Err(QueryError::Lake(format!(
                    "the writer has not published feed item {received} (its snapshot holds {seq}), or a flush has not landed, within {PUBLISH_WAIT:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Fills `leaves` (new) from the lake and the hot buffer, for rounds from `at_ms`;
    /// `received` is the last feed item taken off the feed.
    async fn start(
        &self,
        leaves: &mut [LeafState],
        at_ms: i64,
        received: u64,
    ) -> Result<(), QueryError> {
        for table in [Table::Metrics, Table::Logs] {
            let mine: Vec<usize> = (0..leaves.len())
                .filter(|i| leaves[*i].plan.leaf.table == table)
                .collect();
            if mine.is_empty() {
                continue;
            }
            let longest = mine
                .iter()
                .map(|i| leaves[*i].plan.leaf.window.from)
                .max()
                .unwrap_or_default();
            // From a whole second at or before the earliest row any of them reads.
            let from_ms = at_ms - i64::try_from(longest.as_millis()).unwrap_or(i64::MAX / 2);
            let from_second = from_ms.div_euclid(1000);
            let horizon = 2 * from_second;
            let delta = self.engine.lake_table(table).await?;
            let version = delta.as_ref().and_then(|d| d.version()).map(|v| v as i64);
            let (feed_seq, hot) = self.hot_through(table, version, received).await?;
            // Before any fold: compaction keeps the slots from the horizon on.
            for i in &mine {
                leaves[*i].since = (feed_seq, version);
                leaves[*i].horizon = horizon;
            }
            let mut chunk: Vec<RecordBatch> = Vec::new();
            let mut chunk_rows = 0;
            if let Some(delta) = delta {
                let mut stream = lake_rows(delta, from_second.saturating_mul(1_000_000)).await?;
                while let Some(batch) = stream.next().await {
                    let batch = batch.map_err(df)?;
                    chunk_rows += batch.num_rows();
                    chunk.push(batch);
                    if chunk_rows >= START_CHUNK_ROWS {
                        fold_into(
                            leaves,
                            &mine,
                            &std::mem::take(&mut chunk),
                            self.window_bytes,
                            false,
                        )
                        .await;
                        chunk_rows = 0;
                    }
                }
            }
            chunk.extend(hot);
            fold_into(leaves, &mine, &chunk, self.window_bytes, false).await;
        }
        Ok(())
    }

    /// Recent rows of `table`, `longest` back from `at_ms`, from the lake and the hot
    /// buffer.
    async fn start_window(
        &self,
        table: Table,
        longest: Duration,
        at_ms: i64,
        received: u64,
    ) -> Result<RowWindow, QueryError> {
        let back = i64::try_from(longest.as_micros()).unwrap_or(i64::MAX / 2);
        let horizon_us = at_ms.saturating_mul(1000).saturating_sub(back);
        let delta = self.engine.lake_table(table).await?;
        let version = delta.as_ref().and_then(|d| d.version()).map(|v| v as i64);
        let (feed_seq, hot) = self.hot_through(table, version, received).await?;
        let mut window = RowWindow {
            longest,
            horizon_us,
            rows: Vec::new(),
            bytes: 0,
            since: (feed_seq, version),
            full: false,
            restart: Backoff::default(),
        };
        if let Some(delta) = delta {
            let mut stream = lake_rows(delta, horizon_us).await?;
            while let Some(batch) = stream.next().await {
                window.add([batch.map_err(df)?], self.window_bytes);
                if window.full {
                    break;
                }
            }
        }
        window.add(hot, self.window_bytes);
        ::metrics::gauge!("fleetlake_incremental_window_bytes", "table" => table.name())
            .set(window.bytes as f64);
        Ok(window)
    }

    /// Folds what the feed brought into every leaf once per round instant: a round at
    /// `at_ms` must hold every row acknowledged before `at_ms`, and a catch-up made
    /// for that instant or a later one (made after it began) holds them. One fold
    /// per instant, not one per rule: a fold's cost is mostly per call.
    async fn catch_up_for(&self, state: &mut State, at_ms: i64) -> Result<(), QueryError> {
        if at_ms <= state.caught_up_at {
            return Ok(());
        }
        state.caught_up_at = at_ms;
        self.catch_up(state).await
    }

    /// Folds what the feed brought since the last call into every leaf.
    async fn catch_up(&self, state: &mut State) -> Result<(), QueryError> {
        let mut items = Vec::new();
        while let Ok(item) = state.feed.try_recv() {
            items.push(item);
        }
        let Some(last) = items.last() else {
            return Ok(());
        };
        state.received = state.received.max(last.seq);
        if state.starting > 0 {
            state.replay.extend(items.iter().cloned());
        }
        for (table, window) in Table::ALL.iter().zip(state.windows.iter_mut()) {
            let Some(window) = window else { continue };
            window.take_in(&items, *table, self.window_bytes);
        }
        for table in [Table::Metrics, Table::Logs] {
            // Leaves that started together skip the same items: fold them together.
            let mut by_since: HashMap<(u64, Option<i64>), Vec<usize>> = HashMap::new();
            for (i, leaf) in state.leaves.iter().enumerate() {
                if leaf.plan.leaf.table == table {
                    by_since.entry(leaf.since).or_default().push(i);
                }
            }
            for (since, mine) in by_since {
                fold_items(
                    &mut state.leaves,
                    &mine,
                    &items,
                    table,
                    since,
                    self.window_bytes,
                )
                .await;
            }
        }
        Ok(())
    }

    /// Folds what the feed brought since the last fold into every aggregate and window
    /// now, between rounds, so that a round has only the last moment's rows left to
    /// fold (the service calls it every second; rounds fold the rest themselves).
    pub async fn fold_pending(&self) -> Result<(), QueryError> {
        let mut state = self.state.lock().await;
        self.catch_up(&mut state).await
    }

    /// Evaluates `sql` at `at_ms` from partial aggregates; `None` when it is to be
    /// evaluated as SQL (see [`Incremental::path`]), this round or always.
    pub async fn run(&self, sql: &str, at_ms: i64) -> Result<Option<Vec<RecordBatch>>, QueryError> {
        let at = sql_instant(at_ms)?;
        let mut state = self.state.lock().await;
        // Whatever this rule's path, the feed does not pile up.
        self.catch_up_for(&mut state, at_ms).await?;
        if !state.rules.contains_key(sql) {
            self.prepare_locked(&mut state, &[sql], at_ms).await?;
            // New leaves start further on than the others: all to one item again.
            self.catch_up(&mut state).await?;
        }
        let prepared = Arc::clone(&state.rules[sql]);
        let leaves = match prepared.as_ref() {
            Prepared::Incremental { leaves, .. } | Prepared::Replan { leaves } => leaves,
            Prepared::Window { tables, longest } => {
                let mut rows = HashMap::new();
                let back = i64::try_from(longest.as_micros()).unwrap_or(i64::MAX / 2);
                let from_us = at_ms.saturating_mul(1000).saturating_sub(back);
                let started = state.started;
                for table in tables {
                    state = self.refill_if_due(state, *table, at_ms).await;
                }
                if state.started != started {
                    // A refill let go of the lock: every window to one feed item again.
                    self.catch_up(&mut state).await?;
                }
                for table in tables {
                    let Some(window) = state.windows[table.index()].as_mut() else {
                        return Ok(None);
                    };
                    if window.full || from_us < window.horizon_us {
                        return Ok(None);
                    }
                    // Keep a minute more than the longest window: rounds of other
                    // groups may be a little behind.
                    let keep = i64::try_from(window.longest.as_micros()).unwrap_or(i64::MAX / 2);
                    window.prune(at_ms.saturating_mul(1000).saturating_sub(keep + 60_000_000))?;
                    rows.insert(table.name(), window.rows.clone());
                }
                drop(state);
                return self.run_over(sql, at, &rows).await.map(Some);
            }
            Prepared::Sql(_) => return Ok(None),
        };
        let mut results = HashMap::new();
        let started = state.started;
        for index in leaves {
            state = self.restart_if_due(state, *index, at_ms).await;
        }
        if state.started != started {
            // A restart let go of the lock: every leaf to one feed item again.
            self.catch_up(&mut state).await?;
        }
        for index in leaves {
            let Some(result) = state.leaves[*index].result(at_ms).await? else {
                return Ok(None);
            };
            results.insert(*index, result);
        }
        if let Prepared::Incremental {
            outer, compiled, ..
        } = prepared.as_ref()
        {
            let leaves = &state.leaves;
            let compiled = compiled
                .get_or_init(|| compile(&self.engine, outer, leaves))
                .await;
            if let Some(compiled) = compiled {
                drop(state);
                let ran = self
                    .within_limit(compiled.run(&self.engine, at_ms, &results))
                    .await?;
                if let Some(rows) = ran {
                    return Ok(Some(rows));
                }
                state = self.state.lock().await;
            }
        }
        let fixed = match prepared.as_ref() {
            // At an instant its literals cannot move to exactly (a part of a second
            // in epoch seconds), planned as Replan is.
            Prepared::Incremental { outer, .. } => outer.at(at_ms).map_err(df)?,
            _ => None,
        };
        let outer = match fixed {
            Some(outer) => outer,
            None => {
                // Planned at this instant; its aggregates over rows are the leaves, in
                // the order they were found when prepared.
                let mut session = self.engine.session(&principal())?.state();
                pin(&mut session, at);
                let planned = plan_read_only(&session, sql).await?;
                let optimized = session.optimize(&planned).map_err(df)?;
                let nodes = crate::shape::row_aggregates(&optimized);
                if nodes.len() != leaves.len() {
                    return Ok(None);
                }
                let plans: Vec<&LeafPlan> =
                    leaves.iter().map(|i| &*state.leaves[*i].plan).collect();
                match substitute(optimized, &nodes, &plans, leaves).map_err(df)? {
                    Some(outer) => outer,
                    None => return Ok(None),
                }
            }
        };
        drop(state);
        let ctx = self.engine.session(&principal())?;
        let mut session = ctx.state();
        pin(&mut session, at);
        let plan = resolve(&ctx, outer, &results).await?;
        self.execute(&session, plan).await.map(Some)
    }

    /// Starts broken leaf `index` again from the lake once its wait is over (see
    /// [`Backoff`]). The lake is read without the lock (rounds of other rules go on
    /// meanwhile; the leaf's own rules run as SQL until it is back).
    async fn restart_if_due<'a>(
        &'a self,
        mut state: tokio::sync::MutexGuard<'a, State>,
        index: usize,
        at_ms: i64,
    ) -> tokio::sync::MutexGuard<'a, State> {
        let leaf = &mut state.leaves[index];
        if leaf.broken.is_none() || !leaf.restart.due(at_ms) {
            return state;
        }
        let mut fresh = [LeafState::new(Arc::clone(&leaf.plan))];
        let received = state.received;
        state.starting += 1;
        drop(state);
        let started = self.start(&mut fresh, at_ms, received).await;
        let mut state = self.state.lock().await;
        let replay = state.started();
        let [mut fresh] = fresh;
        if started.is_ok() {
            let (table, since) = (fresh.plan.leaf.table, fresh.since);
            fold_items(
                std::slice::from_mut(&mut fresh),
                &[0],
                &replay,
                table,
                since,
                self.window_bytes,
            )
            .await;
        }
        let leaf = &mut state.leaves[index];
        leaf.restart.running = false;
        let restarts = leaf.restart.restarts;
        match (started, fresh.broken) {
            (Err(error), _) => {
                let reason = format!("it could not start again: {error}");
                tracing::warn!(leaf = %leaf.plan.leaf, %reason, restarts, "a broken leaf could not start again; its rules run as SQL");
                leaf.broken = Some(reason);
            }
            (Ok(()), Some(reason)) => {
                tracing::warn!(leaf = %leaf.plan.leaf, %reason, restarts, "a broken leaf started again and broke again; its rules run as SQL");
                leaf.broken = Some(reason);
                // Broken by a commit its start did not hold: again at once.
                leaf.restart.at = fresh.restart.at;
            }
            (Ok(()), None) => {
                tracing::info!(leaf = %leaf.plan.leaf, restarts, "a broken leaf started again; its rules run from partials");
                leaf.partials = fresh.partials;
                leaf.since = fresh.since;
                leaf.horizon = fresh.horizon;
                leaf.cached = None;
                leaf.broken = None;
            }
        }
        state
    }

    /// Reads the recent rows of `table` from the lake again once the window that
    /// passed its bound has waited (see [`Backoff`]); without the lock, as a leaf's
    /// restart.
    async fn refill_if_due<'a>(
        &'a self,
        mut state: tokio::sync::MutexGuard<'a, State>,
        table: Table,
        at_ms: i64,
    ) -> tokio::sync::MutexGuard<'a, State> {
        let Some(window) = state.windows[table.index()].as_mut() else {
            return state;
        };
        if !window.full || !window.restart.due(at_ms) {
            return state;
        }
        let longest = window.longest;
        let received = state.received;
        state.starting += 1;
        drop(state);
        let read = self.start_window(table, longest, at_ms, received).await;
        let mut state = self.state.lock().await;
        let replay = state.started();
        let Some(window) = state.windows[table.index()].as_mut() else {
            return state;
        };
        if !window.restart.running {
            // Replaced meanwhile by a longer window.
            return state;
        }
        window.restart.running = false;
        match read {
            Ok(mut fresh) => {
                fresh.restart = std::mem::take(&mut window.restart);
                fresh.take_in(&replay, table, self.window_bytes);
                if fresh.full {
                    tracing::warn!(
                        table = table.name(),
                        restarts = fresh.restart.restarts,
                        "recent rows read again pass their bound again; windowed rules read the lake"
                    );
                } else {
                    tracing::info!(
                        table = table.name(),
                        restarts = fresh.restart.restarts,
                        "recent rows read again; windowed rules run over them"
                    );
                }
                *window = fresh;
            }
            Err(error) => {
                tracing::warn!(table = table.name(), %error, "recent rows could not be read again; windowed rules read the lake");
            }
        }
        state
    }

    /// Runs `sql` at `at` with its reads of `metrics`/`logs` over `rows` instead of
    /// the lake.
    async fn run_over(
        &self,
        sql: &str,
        at: chrono::DateTime<chrono::Utc>,
        rows: &HashMap<&'static str, Vec<RecordBatch>>,
    ) -> Result<Vec<RecordBatch>, QueryError> {
        let ctx = self.engine.session(&principal())?;
        let mut session = ctx.state();
        pin(&mut session, at);
        let planned = plan_read_only(&session, sql).await?;
        let plan = planned
            .transform_up_with_subqueries(|node| {
                let LogicalPlan::TableScan(s) = &node else {
                    return Ok(Transformed::no(node));
                };
                let Some(rows) = rows.get(s.table_name.table()) else {
                    return Ok(Transformed::no(node));
                };
                let schema = s.source.schema();
                let rows = rows
                    .iter()
                    .map(|b| conform(b, &schema))
                    .collect::<Result<Vec<_>, _>>()?;
                let table = MemTable::try_new(schema, vec![rows])?;
                rescan(s, provider_as_source(Arc::new(table)), s.projection.clone())
            })
            .map_err(df)?
            .data;
        self.execute(&session, plan).await
    }

    /// Runs `plan` (planned in `session`) within the engine's limits.
    async fn execute(
        &self,
        session: &SessionState,
        plan: LogicalPlan,
    ) -> Result<Vec<RecordBatch>, QueryError> {
        let admitted = self.engine.internal();
        let run = async {
            let (_, mut stream) = self
                .engine
                .execute(session, plan, &principal(), &admitted)
                .await?;
            let mut batches = Vec::new();
            while let Some(batch) = stream.next().await {
                batches.push(batch.map_err(df)?);
            }
            Ok::<_, QueryError>(batches)
        };
        self.within_limit(run).await
    }

    /// `run`, stopped at the engine's statement timeout.
    async fn within_limit<T>(
        &self,
        run: impl std::future::Future<Output = Result<T, QueryError>>,
    ) -> Result<T, QueryError> {
        match self.engine.limits().timeout {
            Some(limit) => tokio::time::timeout(limit, run)
                .await
                .map_err(|_| QueryError::Timeout(limit))?,
            None => run.await,
        }
    }

    /// How `sql` runs as prepared: `direct` (expressions over one leaf's result),
    /// `compiled`, `planned` (its plan above the leaves each round), `replanned`,
    /// `window` or `sql`; `None` before its first round.
    #[cfg(test)]
    pub(crate) async fn how(&self, sql: &str) -> Option<&'static str> {
        let state = self.state.lock().await;
        Some(match state.rules.get(sql)?.as_ref() {
            Prepared::Incremental { compiled, .. } => match compiled.get()? {
                Some(c) if c.direct.is_some() => "direct",
                Some(_) => "compiled",
                None => "planned",
            },
            Prepared::Replan { .. } => "replanned",
            Prepared::Window { .. } => "window",
            Prepared::Sql(_) => "sql",
        })
    }

    /// Bytes of partial aggregates held, and the number of leaves.
    pub async fn footprint(&self) -> (usize, usize) {
        let state = self.state.lock().await;
        let bytes = state.leaves.iter().map(|l| l.partials.bytes()).sum();
        (bytes, state.leaves.len())
    }
}

/// The rows of lake table `delta` (at the version it holds) from `from_us` on.
async fn lake_rows(
    delta: deltalake::DeltaTable,
    from_us: i64,
) -> Result<SendableRecordBatchStream, QueryError> {
    let provider = delta
        .table_provider()
        .await
        .map_err(|e| QueryError::Lake(e.to_string()))?;
    let since =
        datafusion::common::ScalarValue::TimestampMicrosecond(Some(from_us), Some("UTC".into()));
    datafusion::prelude::SessionContext::new()
        .read_table(provider)
        .map_err(df)?
        .filter(col("time").gt_eq(datafusion::prelude::lit(since)))
        .map_err(df)?
        .execute_stream()
        .await
        .map_err(df)
}

/// The rows of `table` in feed `items` that a state started from the snapshot at
/// `since` (feed position, lake version) does not hold yet.
fn rows_after(
    items: &[Arc<FeedItem>],
    table: Table,
    since: (u64, Option<i64>),
) -> impl Iterator<Item = RecordBatch> + '_ {
    items_after(items, table, since, false)
}

/// The rows of `table` that feed `items` take back (see [`fleetlake_aggregate::feed`])
/// from a state started from the snapshot at `since`.
fn retracted_after(
    items: &[Arc<FeedItem>],
    table: Table,
    since: (u64, Option<i64>),
) -> impl Iterator<Item = RecordBatch> + '_ {
    items_after(items, table, since, true)
}

/// The version of the first commit of `table` that feed `items` say could not be read
/// (see [`FeedItem::lost`]) and that a state started from the snapshot at `since` does
/// not hold: such a state cannot be kept up from the feed. Only the lake holds such a
/// commit's rows (a hot snapshot after the item does not), so only the version the
/// state read of the lake tells.
fn lost_after(
    items: &[Arc<FeedItem>],
    table: Table,
    (_, version): (u64, Option<i64>),
) -> Option<i64> {
    items
        .iter()
        .filter(|item| item.table == table && item.lost)
        .filter_map(|item| item.committed_as)
        .find(|at| version.is_none_or(|read| *at > read))
}

fn items_after(
    items: &[Arc<FeedItem>],
    table: Table,
    (seq, version): (u64, Option<i64>),
    retract: bool,
) -> impl Iterator<Item = RecordBatch> + '_ {
    items
        .iter()
        .filter(move |item| {
            item.table == table && item.retract == retract && !item.already_in(seq, version)
        })
        .flat_map(|item| item.batches.iter().cloned())
}

/// Folds what feed `items` bring to leaves `mine` (started from the snapshot at
/// `since`): their rows, then what they take back.
async fn fold_items(
    leaves: &mut [LeafState],
    mine: &[usize],
    items: &[Arc<FeedItem>],
    table: Table,
    since: (u64, Option<i64>),
    limit: usize,
) {
    if let Some(version) = lost_after(items, table, since) {
        let reason = format!(
            "the rows of another writer's commit {version} of {table} could not be read from the feed (vacuumed or cleaned up before this instance read it)"
        );
        for i in mine {
            let leaf = &mut leaves[*i];
            if leaf.broken.is_none() {
                leaf.drop_partials(reason.clone());
                leaf.restart.at_once();
            }
        }
        return;
    }
    let rows: Vec<RecordBatch> = rows_after(items, table, since).collect();
    fold_into(leaves, mine, &rows, limit, false).await;
    let taken: Vec<RecordBatch> = retracted_after(items, table, since).collect();
    fold_into(leaves, mine, &taken, limit, true).await;
}

/// Folds `rows` (of the leaves' table, as the lake or the feed has them) into the
/// leaves `mine` of `leaves`, each reading only the rows its routes allow and the
/// columns its fold reads. Leaves with the same fold plan fold once. A leaf whose
/// fold fails, or whose partials pass `limit` bytes, is marked broken (its rules run
/// as SQL); the others go on.
///
/// With `retract`, the rows are taken back instead: each is in the leaf twice (see
/// [`fleetlake_aggregate::feed`]), so its sums and counts lose it once and its minima
/// and maxima, which a second copy did not move, stay.
async fn fold_into(
    leaves: &mut [LeafState],
    mine: &[usize],
    rows: &[RecordBatch],
    limit: usize,
    retract: bool,
) {
    let rows: Vec<&RecordBatch> = rows.iter().filter(|b| b.num_rows() > 0).collect();
    if rows.is_empty() || mine.is_empty() {
        return;
    }
    let live: Vec<usize> = mine
        .iter()
        .copied()
        .filter(|i| leaves[*i].broken.is_none())
        .collect();
    // Every leaf of a table was planned against the same schema unless the lake's
    // changed in between: the rows are conformed, given slots and copied once per
    // schema, with the columns any of its leaves reads.
    let mut inputs: Vec<FoldInput> = Vec::new();
    for i in &live {
        let plan = &leaves[*i].plan;
        match inputs
            .iter_mut()
            .find(|f| f.table_schema == plan.table_schema)
        {
            Some(input) => input.read(plan),
            None => {
                let mut input = FoldInput::new(Arc::clone(&plan.table_schema));
                input.read(plan);
                inputs.push(input);
            }
        }
    }
    for input in &mut inputs {
        input.conform(&rows);
    }
    let inputs = inputs;
    // What each fold plan made of the rows, for the leaves that share it.
    let mut folded: Vec<(usize, Result<Option<RecordBatch>, String>)> = Vec::new();
    for i in live {
        let shared = folded
            .iter()
            .find(|(j, _)| leaves[*j].plan.fold_key == leaves[i].plan.fold_key)
            .map(|(_, out)| out.clone());
        let out = match shared {
            Some(out) => out,
            None => {
                let plan = Arc::clone(&leaves[i].plan);
                let input = inputs
                    .iter()
                    .find(|f| f.table_schema == plan.table_schema)
                    .expect("an input per schema");
                let out = input.fold(&plan).await.map_err(|e| e.to_string());
                folded.push((i, out.clone()));
                out
            }
        };
        let leaf = &mut leaves[i];
        let out = match out {
            Ok(Some(partial)) if retract => {
                leaf.plan.taken_back(&partial).map_err(|e| e.to_string())
            }
            out => out,
        };
        let absorbed = match out {
            Ok(partial) => leaf.absorb(partial).await.map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        let bytes = leaf.partials.bytes();
        let broken = match absorbed {
            Err(e) => Some(format!("a fold failed: {e}")),
            Ok(()) if bytes > limit => Some(format!(
                "its partials hold {bytes} bytes, past the bound of {limit}"
            )),
            Ok(()) => None,
        };
        if let Some(reason) = broken {
            leaf.drop_partials(reason);
        }
    }
}

/// The rows of one fold, for the leaves planned against one table schema.
struct FoldInput {
    table_schema: SchemaRef,
    /// The columns any of the leaves reads, with `time` and their routing columns,
    /// by index in `table_schema`.
    columns: BTreeSet<usize>,
    /// Per routing column, how many leaves route on it and on which values.
    routes: BTreeMap<String, (usize, BTreeSet<String>)>,
    /// The routing column most leaves route on (chosen when the rows come), and the
    /// values they route on: the rows are grouped by it.
    route: Option<(String, BTreeSet<String>)>,
    /// The rows, conformed to `columns` and given their slots.
    rows: Result<FoldRows, String>,
}

/// Rows as a fold reads them.
#[derive(Default)]
struct FoldRows {
    /// The rows as they came, conformed, with slots.
    parts: Vec<RecordBatch>,
    /// The rows of the routed values, grouped by value in one batch (one copy of
    /// the rows leaves read), and where each value's rows are in it.
    routed: Option<(RecordBatch, HashMap<String, std::ops::Range<usize>>)>,
}

impl FoldInput {
    fn new(table_schema: SchemaRef) -> Self {
        let mut columns = BTreeSet::new();
        columns.extend(table_schema.index_of("time").ok());
        Self {
            table_schema,
            columns,
            routes: BTreeMap::new(),
            route: None,
            rows: Ok(FoldRows::default()),
        }
    }

    /// Adds what `plan`'s fold reads.
    fn read(&mut self, plan: &LeafPlan) {
        self.columns.extend(plan.columns.iter().copied());
        for (column, values) in &plan.leaf.routes {
            self.columns.extend(self.table_schema.index_of(column).ok());
            let (leaves, all) = self.routes.entry(column.clone()).or_default();
            *leaves += 1;
            all.extend(values.iter().cloned());
        }
    }

    /// Conforms `rows` to the columns read, with slots, and groups the routed ones.
    fn conform(&mut self, rows: &[&RecordBatch]) {
        // The first of the columns most leaves route on; leaves that do not route
        // on it filter the rows themselves.
        self.route = self
            .routes
            .iter()
            .rev()
            .max_by_key(|(_, (leaves, _))| *leaves)
            .map(|(column, (_, values))| (column.clone(), values.clone()));
        let made = (|| {
            let fields: Vec<Field> = self
                .columns
                .iter()
                .map(|i| self.table_schema.field(*i).clone())
                .collect();
            let read = Arc::new(Schema::new(fields.clone()));
            let mut with_slot = fields;
            with_slot.push(Field::new(SLOT, DataType::Int64, true));
            let with_slot = Arc::new(Schema::new(with_slot));
            let mut parts = Vec::with_capacity(rows.len());
            for batch in rows {
                let batch = conform(batch, &read).map_err(arrow_err)?;
                parts.push(with_slots(&batch, &with_slot)?);
            }
            let routed = match &self.route {
                Some((column, values)) => Some(group_by_value(&parts, column, values)?),
                None => None,
            };
            Ok::<_, QueryError>(FoldRows { parts, routed })
        })();
        self.rows = made.map_err(|e| e.to_string());
    }

    /// What `plan`'s fold makes of the rows its routes allow: its partials, `None`
    /// when it reads none of them.
    async fn fold(&self, plan: &LeafPlan) -> Result<Option<RecordBatch>, QueryError> {
        let rows = self
            .rows
            .as_ref()
            .map_err(|e| QueryError::Lake(e.clone()))?;
        let on_grouped = self.route.as_ref().and_then(|(routed_on, _)| {
            plan.leaf
                .routes
                .iter()
                .find(|(column, _)| column == routed_on)
        });
        let batches: Vec<RecordBatch> = match (on_grouped, plan.leaf.routes.first()) {
            (Some((_, values)), _) => {
                let (grouped, ranges) = rows.routed.as_ref().expect("grouped when routed");
                values
                    .iter()
                    .filter_map(|v| ranges.get(v))
                    .map(|r| grouped.slice(r.start, r.len()))
                    .collect()
            }
            (None, Some((column, values))) => rows
                .parts
                .iter()
                .map(|part| {
                    let keep = value_in(part, column, values)?;
                    filter_record_batch(part, &keep).map_err(arrow_err)
                })
                .collect::<Result<_, _>>()?,
            (None, None) => rows.parts.clone(),
        };
        // The leaf's columns and the slot, by position in the rows read.
        let mut positions: Vec<usize> = plan
            .columns
            .iter()
            .map(|c| self.columns.iter().position(|x| x == c).expect("read"))
            .collect();
        positions.push(self.columns.len());
        let input = batches
            .iter()
            .filter(|b| b.num_rows() > 0)
            .map(|b| {
                let columns = positions.iter().map(|p| Arc::clone(b.column(*p))).collect();
                RecordBatch::try_new(Arc::clone(&plan.feed_schema), columns).map_err(arrow_err)
            })
            .collect::<Result<Vec<_>, _>>()?;
        if input.is_empty() {
            return Ok(None);
        }
        plan.fold_input.set(input);
        let out = collect(Arc::clone(&plan.fold), fold_task()).await;
        plan.fold_input.set(Vec::new());
        owned(&out.map_err(df)?, &plan.partials_input.schema)
    }
}

/// The rows of `parts` whose `column` is one of `values`, grouped by value in one
/// batch, and the rows of each value in it.
fn group_by_value(
    parts: &[RecordBatch],
    column: &str,
    values: &BTreeSet<String>,
) -> Result<(RecordBatch, HashMap<String, std::ops::Range<usize>>), QueryError> {
    let mut by_value: HashMap<&str, Vec<u32>> =
        values.iter().map(|v| (v.as_str(), Vec::new())).collect();
    let mut texts = Vec::with_capacity(parts.len());
    for part in parts {
        let array = part
            .column_by_name(column)
            .ok_or_else(|| QueryError::Lake(format!("rows without a {column} column")))?;
        texts.push(cast(array, &DataType::Utf8).map_err(arrow_err)?);
    }
    let mut first_row = 0u32;
    for text in &texts {
        // Runs of one value (a delivery is mostly one metric after another) look
        // the value up once.
        let mut last: Option<(&str, bool)> = None;
        for (row, value) in text.as_string::<i32>().iter().enumerate() {
            let Some(value) = value else { continue };
            let known = match last {
                Some((v, known)) if v == value => known,
                _ => {
                    let known = by_value.contains_key(value);
                    last = Some((value, known));
                    known
                }
            };
            if known && let Some(rows) = by_value.get_mut(value) {
                rows.push(first_row + row as u32);
            }
        }
        first_row += text.len() as u32;
    }
    let mut order = Vec::new();
    let mut ranges = HashMap::new();
    for v in values {
        let rows = &by_value[v.as_str()];
        ranges.insert(v.clone(), order.len()..order.len() + rows.len());
        order.extend_from_slice(rows);
    }
    let schema = parts
        .first()
        .map(RecordBatch::schema)
        .unwrap_or_else(|| Arc::new(Schema::empty()));
    // Concatenated, then taken (`take_column`: a map's entries in one take), where
    // `interleave` extends them row by row.
    let all = concat_batches(&schema, parts).map_err(arrow_err)?;
    let order = arrow::array::UInt32Array::from(order);
    let columns = all
        .columns()
        .iter()
        .map(|c| take_column(c, &order))
        .collect::<Result<Vec<_>, _>>()
        .map_err(arrow_err)?;
    let grouped = RecordBatch::try_new(all.schema(), columns).map_err(arrow_err)?;
    Ok((grouped, ranges))
}

/// `array`'s rows at `indices` (which hold no nulls). Lists and maps take their
/// entries with one `take` of the entries (arrow's `take` extends a list's entries
/// row by row: most of a fold's time for the `dimensions` map); other types are
/// arrow's `take`.
fn take_column(
    array: &ArrayRef,
    indices: &arrow::array::UInt32Array,
) -> Result<ArrayRef, arrow::error::ArrowError> {
    use arrow::array::{ListArray, MapArray, StructArray};
    use arrow::buffer::{NullBuffer, OffsetBuffer};
    let nulls = |n: Option<&NullBuffer>| {
        n.filter(|n| n.null_count() > 0).map(|n| {
            indices
                .values()
                .iter()
                .map(|i| n.is_valid(*i as usize))
                .collect::<NullBuffer>()
        })
    };
    // The entries' indices of the rows taken, and the offsets of their lists.
    let entries = |offsets: &[i32]| {
        let mut taken = Vec::with_capacity(indices.len());
        let mut new_offsets = Vec::with_capacity(indices.len() + 1);
        new_offsets.push(0i32);
        for i in indices.values() {
            let (start, end) = (offsets[*i as usize], offsets[*i as usize + 1]);
            taken.extend(start as u32..end as u32);
            new_offsets.push(taken.len() as i32);
        }
        (
            arrow::array::UInt32Array::from(taken),
            OffsetBuffer::new(new_offsets.into()),
        )
    };
    Ok(match array.data_type() {
        DataType::Map(field, ordered) => {
            let map = array.as_map();
            let (taken, offsets) = entries(map.value_offsets());
            let values: ArrayRef = Arc::new(map.entries().clone());
            let values = take_column(&values, &taken)?;
            Arc::new(MapArray::try_new(
                Arc::clone(field),
                offsets,
                values.as_struct().clone(),
                nulls(map.nulls()),
                *ordered,
            )?)
        }
        DataType::List(field) => {
            let list = array.as_list::<i32>();
            let (taken, offsets) = entries(list.value_offsets());
            Arc::new(ListArray::try_new(
                Arc::clone(field),
                offsets,
                take_column(list.values(), &taken)?,
                nulls(list.nulls()),
            )?)
        }
        DataType::Struct(fields) => {
            let s = array.as_struct();
            let columns = s
                .columns()
                .iter()
                .map(|c| take_column(c, indices))
                .collect::<Result<Vec<_>, _>>()?;
            Arc::new(StructArray::try_new(
                fields.clone(),
                columns,
                nulls(s.nulls()),
            )?)
        }
        _ => arrow::compute::take(array, indices, None)?,
    })
}

/// Where `batch`'s `column` is one of `values`.
fn value_in(
    batch: &RecordBatch,
    column: &str,
    values: &BTreeSet<String>,
) -> Result<arrow::array::BooleanArray, QueryError> {
    let array = batch
        .column_by_name(column)
        .ok_or_else(|| QueryError::Lake(format!("rows without a {column} column")))?;
    let text = cast(array, &DataType::Utf8).map_err(arrow_err)?;
    Ok(text
        .as_string::<i32>()
        .iter()
        .map(|v| Some(v.is_some_and(|v| values.contains(v))))
        .collect())
}

impl LeafPlan {
    /// What `partial` (a fold of rows taken back) does to the partials: its sums and
    /// counts negated, its minima and maxima null; `None` when it changes nothing.
    fn taken_back(&self, partial: &RecordBatch) -> Result<Option<RecordBatch>, QueryError> {
        if !self.additive.iter().any(|a| *a) {
            return Ok(None);
        }
        let first = partial.num_columns() - self.additive.len();
        let columns = partial
            .columns()
            .iter()
            .enumerate()
            .map(|(i, column)| match i.checked_sub(first) {
                None => Ok(Arc::clone(column)),
                Some(p) if self.additive[p] => {
                    arrow::compute::kernels::numeric::neg(column).map_err(arrow_err)
                }
                Some(_) => Ok(arrow::array::new_null_array(
                    column.data_type(),
                    column.len(),
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        RecordBatch::try_new(partial.schema(), columns)
            .map(Some)
            .map_err(arrow_err)
    }
}

impl LeafState {
    /// Takes in what a fold made (see [`FoldInput::fold`]).
    async fn absorb(&mut self, partial: Option<RecordBatch>) -> Result<(), QueryError> {
        let Some(partial) = partial else {
            return Ok(());
        };
        self.cached = None;
        let batches = match &mut self.partials {
            Partials::Grouped(grouped) => {
                return grouped.absorb(&partial, self.horizon).map_err(arrow_err);
            }
            Partials::Batches(batches) => batches,
        };
        batches.push(partial);
        if batches.len() > COMPACT_AFTER {
            self.compact().await?;
        }
        Ok(())
    }

    /// Merges the partials into one batch per slot and group, dropping slots before
    /// the horizon.
    async fn compact(&mut self) -> Result<(), QueryError> {
        let Partials::Batches(batches) = &self.partials else {
            return Ok(());
        };
        let kept = select(batches, self.horizon, None)?;
        if !self.plan.last_seen {
            let schema = Arc::clone(&self.plan.partials_input.schema);
            let merged = self.merge(&self.plan.merge_slots, kept).await?;
            // Merging may widen a type (a decimal sum); the partials keep theirs.
            self.partials = Partials::Batches(owned(&merged, &schema)?.into_iter().collect());
            return Ok(());
        }
        // One row per group, in the slot of its latest time.
        let merged = self.merge(&self.plan.merge_groups, kept).await?;
        let schema = Arc::clone(&self.plan.partials_input.schema);
        let groups = self
            .plan
            .finish
            .iter()
            .filter(|f| matches!(f, Finish::Group(_)))
            .count();
        let mut partials = Vec::with_capacity(1);
        for batch in merged {
            let latest = cast(batch.column(groups), &DataType::Int64).map_err(arrow_err)?;
            let slots: Int64Array = latest
                .as_primitive::<Int64Type>()
                .iter()
                .map(|t| t.map(slot_of))
                .collect();
            let mut columns: Vec<ArrayRef> = vec![Arc::new(slots)];
            columns.extend(batch.columns().iter().cloned());
            let columns = columns
                .iter()
                .zip(schema.fields())
                .map(|(c, f)| cast(c, f.data_type()).map_err(arrow_err))
                .collect::<Result<Vec<_>, _>>()?;
            partials.push(RecordBatch::try_new(Arc::clone(&schema), columns).map_err(arrow_err)?);
        }
        self.partials = Partials::Batches(owned(&partials, &schema)?.into_iter().collect());
        Ok(())
    }

    async fn merge(
        &self,
        plan: &Arc<dyn ExecutionPlan>,
        partials: Vec<RecordBatch>,
    ) -> Result<Vec<RecordBatch>, QueryError> {
        self.plan.partials_input.set(partials);
        let out = collect(Arc::clone(plan), fold_task()).await.map_err(df);
        self.plan.partials_input.set(Vec::new());
        out
    }

    /// The leaf's result at `at_ms`, as the rule's plan expects it; `None` when the
    /// window's bounds are not whole seconds or reach before what the leaf holds.
    async fn result(&mut self, at_ms: i64) -> Result<Option<RecordBatch>, QueryError> {
        if let Some((at, batch)) = &self.cached
            && *at == at_ms
        {
            return Ok(Some(batch.clone()));
        }
        if self.broken.is_some() {
            return Ok(None);
        }
        let Some((first, last)) = slot_range(&self.plan.leaf.window, at_ms) else {
            return Ok(None);
        };
        if first < self.horizon {
            return Ok(None);
        }
        let merged = match &mut self.partials {
            Partials::Grouped(grouped) => grouped.merged(first, last).map_err(arrow_err)?,
            Partials::Batches(batches) => {
                let selected = select(batches, first, last)?;
                let merged = self.merge(&self.plan.merge_groups, selected).await?;
                concat_batches(
                    &merged
                        .first()
                        .map_or_else(|| Arc::new(Schema::empty()), |b| b.schema()),
                    &merged,
                )
                .map_err(arrow_err)?
            }
        };
        let schema = Arc::clone(&self.plan.output);
        let batch = if merged.num_columns() == 0 {
            RecordBatch::new_empty(schema)
        } else {
            finish(&merged, &self.plan.finish, &schema)?
        };
        // Slots before the window's start are not needed again by this leaf (rounds
        // move forward); keep a minute in hand for a round a little behind.
        self.horizon = self.horizon.max(first - 120);
        self.cached = Some((at_ms, batch.clone()));
        Ok(Some(batch))
    }
}

/// The partials of slots `first..=last` of `batches`.
fn select(
    batches: &[RecordBatch],
    first: i64,
    last: Option<i64>,
) -> Result<Vec<RecordBatch>, QueryError> {
    let mut out = Vec::new();
    for batch in batches {
        let slots = batch.column(0);
        let mut keep = gt_eq(slots, &Int64Array::new_scalar(first)).map_err(arrow_err)?;
        if let Some(last) = last {
            let below = lt_eq(slots, &Int64Array::new_scalar(last)).map_err(arrow_err)?;
            keep = and(&keep, &below).map_err(arrow_err)?;
        }
        let kept = filter_record_batch(batch, &keep).map_err(arrow_err)?;
        if kept.num_rows() > 0 {
            out.push(kept);
        }
    }
    Ok(out)
}

/// The leaf's output columns from merged partials (`__g…`, `__p…` in order).
fn finish(
    merged: &RecordBatch,
    finish: &[Finish],
    schema: &SchemaRef,
) -> Result<RecordBatch, QueryError> {
    let groups = finish
        .iter()
        .filter(|f| matches!(f, Finish::Group(_)))
        .count();
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(finish.len());
    for (f, field) in finish.iter().zip(schema.fields()) {
        let column = match *f {
            Finish::Group(g) => Arc::clone(merged.column(g)),
            Finish::Plain(p) => Arc::clone(merged.column(groups + p)),
            Finish::Count(p) => {
                let counts =
                    cast(merged.column(groups + p), &DataType::Int64).map_err(arrow_err)?;
                let counts: Int64Array = counts
                    .as_primitive::<Int64Type>()
                    .iter()
                    .map(|c| Some(c.unwrap_or(0)))
                    .collect();
                Arc::new(counts)
            }
            Finish::Avg { sum, count } => {
                let s = cast(merged.column(groups + sum), &DataType::Float64).map_err(arrow_err)?;
                let c =
                    cast(merged.column(groups + count), &DataType::Float64).map_err(arrow_err)?;
                div(&s, &c).map_err(arrow_err)?
            }
        };
        columns.push(cast(&column, field.data_type()).map_err(arrow_err)?);
    }
    RecordBatch::try_new(Arc::clone(schema), columns).map_err(arrow_err)
}

/// `batch`'s columns cast to `schema`'s types (merging may widen a decimal sum).
fn conform_columns(batch: &RecordBatch, schema: &SchemaRef) -> Result<Vec<ArrayRef>, QueryError> {
    batch
        .columns()
        .iter()
        .zip(schema.fields())
        .map(|(c, f)| {
            if c.data_type() == f.data_type() {
                Ok(Arc::clone(c))
            } else {
                cast(c, f.data_type()).map_err(arrow_err)
            }
        })
        .collect()
}

/// An operator's output `batches` as one batch of `schema` in buffers of its own, to
/// be kept as partials. An aggregate emits its groups at once, then slices them into
/// batches (of [`EMIT_ROWS`] here, so mostly one): a slice would count the whole
/// buffer against the bound, and keep it alive, so a column whose buffers hold much
/// more than its rows is copied; string views point into the rows folded (whole
/// batches of the feed) and are compacted. `None` when there are no rows.
fn owned(batches: &[RecordBatch], schema: &SchemaRef) -> Result<Option<RecordBatch>, QueryError> {
    let batches: Vec<&RecordBatch> = batches.iter().filter(|b| b.num_rows() > 0).collect();
    let Some(first) = batches.first() else {
        return Ok(None);
    };
    // Two or more are copied by concatenating.
    let one = match batches.as_slice() {
        [one] => (*one).clone(),
        _ => concat_batches(&first.schema(), batches.iter().copied()).map_err(arrow_err)?,
    };
    let columns = conform_columns(&one, schema)?
        .into_iter()
        .map(|c| match c.data_type() {
            DataType::Utf8View => Ok(Arc::new(c.as_string_view().gc()) as ArrayRef),
            DataType::BinaryView => Ok(Arc::new(c.as_binary_view().gc()) as ArrayRef),
            _ if wasteful(&c) => {
                let data = c.to_data();
                let mut out = MutableArrayData::new(vec![&data], false, c.len());
                out.try_extend(0, 0, c.len()).map_err(arrow_err)?;
                Ok(make_array(out.freeze()))
            }
            _ => Ok(c),
        })
        .collect::<Result<Vec<_>, QueryError>>()?;
    RecordBatch::try_new(Arc::clone(schema), columns)
        .map(Some)
        .map_err(arrow_err)
}

/// Whether `column`'s buffers hold more than twice what its rows use (a slice of a
/// larger array).
fn wasteful(column: &ArrayRef) -> bool {
    match column.to_data().get_slice_memory_size() {
        Ok(used) => column.get_array_memory_size() > 2 * used + 4096,
        Err(_) => true,
    }
}

/// A rule's plan at the two instants (leaves in place), and its leaves' aggregates at both.
type RulePlans = (
    LogicalPlan,
    LogicalPlan,
    Vec<(LogicalPlan, LogicalPlan)>,
    (LogicalPlan, Vec<LogicalPlan>),
);

/// A rule planned, before its leaves are registered.
enum Planned {
    Leaves {
        leaves: Vec<LeafPlan>,
        /// The rule's plan at the two instants, leaves in place.
        plans: Box<RulePlans>,
    },
    /// Every read of rows is in a window, not every one a leaf.
    Window {
        tables: Vec<Table>,
        longest: Duration,
        reason: String,
    },
    Sql(String),
}

/// The lake tables of rows (`metrics`, `logs`) `plan` reads.
fn rows_tables(plan: &LogicalPlan) -> Vec<Table> {
    let mut out = Vec::new();
    let _ = plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(s) = node
            && let Some(t) = [Table::Metrics, Table::Logs]
                .into_iter()
                .find(|t| t.name() == s.table_name.table())
            && !out.contains(&t)
        {
            out.push(t);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    out
}

async fn plan_rule(engine: &QueryEngine, sql: &str) -> Result<Planned, QueryError> {
    engine.check_text(sql)?;
    let ctx = engine.session(&principal())?;
    let state = ctx.state();
    let plan = plan_read_only(&state, sql).await?;
    let classified = crate::shape::classify_pair(&state, &plan).map_err(df)?;
    let window = |longest: Duration, reason: String| Planned::Window {
        tables: rows_tables(&plan),
        longest,
        reason,
    };
    let leaves = match &classified.shape {
        Shape::Incremental(leaves) => leaves,
        Shape::Window { longest, reason } => return Ok(window(*longest, reason.clone())),
        other => return Ok(Planned::Sql(other.to_string())),
    };
    let mut fold_state = state.clone();
    let options = fold_state.config_mut().options_mut();
    options.execution.target_partitions = 1;
    // An aggregate's groups in one batch, not slices of one (see `owned`).
    options
        .set("datafusion.execution.batch_size", &EMIT_ROWS.to_string())
        .map_err(df)?;
    let mut planned = Vec::new();
    for (leaf, (a0, a1)) in leaves.iter().zip(&classified.leaves) {
        match plan_leaf(&fold_state, leaf, a0, a1).await {
            Ok(Ok(p)) => planned.push(p),
            Ok(Err(reason)) => {
                let longest = leaves
                    .iter()
                    .map(|l| l.window.from)
                    .max()
                    .unwrap_or_default();
                return Ok(window(longest, format!("{leaf}: {reason}")));
            }
            Err(e) => return Err(df(e)),
        }
    }
    let (p0, p1) = classified.plans;
    Ok(Planned::Leaves {
        leaves: planned,
        plans: Box::new((p0, p1, classified.leaves, classified.third)),
    })
}

/// Plans the fold and merges of one leaf; `Ok(Err(reason))` when its aggregates have
/// no partial form here.
async fn plan_leaf(
    state: &SessionState,
    leaf: &Leaf,
    a0: &LogicalPlan,
    a1: &LogicalPlan,
) -> datafusion::error::Result<Result<LeafPlan, String>> {
    use datafusion::functions_aggregate::count::count_udaf;
    use datafusion::functions_aggregate::expr_fn::{max, min, sum};
    use datafusion::functions_aggregate::sum::sum_udaf;
    let (LogicalPlan::Aggregate(g0), LogicalPlan::Aggregate(g1)) = (a0, a1) else {
        return Ok(Err("not an aggregate".into()));
    };
    if g0
        .group_expr
        .iter()
        .any(|e| matches!(e, Expr::GroupingSet(_)))
    {
        return Ok(Err("it groups by grouping sets".into()));
    }
    let Some(scan) = bottom_scan(&g0.input) else {
        return Ok(Err("no scan under the aggregate".into()));
    };
    let table_schema = scan.source.schema();
    let columns = scan_columns(scan);
    let mut fields: Vec<Field> = columns
        .iter()
        .map(|i| table_schema.field(*i).clone())
        .collect();
    fields.push(Field::new(SLOT, DataType::Int64, true));
    let feed_schema = Arc::new(Schema::new(fields));
    let fold_input = Rows::new(Arc::clone(&feed_schema));
    let input = match with_slot(&g0.input, &g1.input, &fold_input.source()?, &columns) {
        Ok(input) => input,
        Err(datafusion::error::DataFusionError::Plan(reason)) => return Ok(Err(reason)),
        Err(e) => return Err(e),
    };
    let (slot_q, _) = input.schema().qualified_field_with_unqualified_name(SLOT)?;
    let mut group_expr = vec![Expr::Column(Column::new(slot_q.cloned(), SLOT))];
    group_expr.extend(g0.group_expr.iter().cloned());
    // Positional names: an aggregate's output may hold two columns of one name with
    // different qualifiers, which one table cannot.
    let output = Arc::new(Schema::new(
        g0.schema
            .as_arrow()
            .fields()
            .iter()
            .enumerate()
            .map(|(i, f)| f.as_ref().clone().with_name(format!("c{i}")))
            .collect::<Vec<_>>(),
    ));
    let groups = g0.group_expr.len();
    let mut partial = Vec::new();
    let mut merges: Vec<Merge> = Vec::new();
    let mut additive: Vec<bool> = Vec::new();
    let mut finish: Vec<Finish> = (0..groups).map(Finish::Group).collect();
    for (j, e) in g0.aggr_expr.iter().enumerate() {
        let inner = match e {
            Expr::Alias(a) => a.expr.as_ref(),
            e => e,
        };
        let Expr::AggregateFunction(f) = inner else {
            return Ok(Err(format!("{inner} is not an aggregate function")));
        };
        let name = f.func.name().to_ascii_lowercase();
        let out_type = output.field(groups + j).data_type();
        let mut push = |expr: Expr, merge: Merge| {
            let p = partial.len();
            partial.push(expr.alias(format!("__p{p}")));
            merges.push(merge);
            additive.push(merge == Merge::Sum);
            p
        };
        match name.as_str() {
            "sum" => finish.push(Finish::Plain(push(inner.clone(), Merge::Sum))),
            "min" => finish.push(Finish::Plain(push(inner.clone(), Merge::Min))),
            "max" => finish.push(Finish::Plain(push(inner.clone(), Merge::Max))),
            "count" => finish.push(Finish::Count(push(inner.clone(), Merge::Sum))),
            "avg" => {
                if *out_type != DataType::Float64 {
                    return Ok(Err(format!("avg returning {out_type} is not merged here")));
                }
                let mut s = f.clone();
                s.func = sum_udaf();
                let mut c = f.clone();
                c.func = count_udaf();
                let s_arg = s.params.args.first().cloned();
                if let Some(arg) = s_arg {
                    // A sum of integers can overflow where avg does not.
                    s.params.args = vec![datafusion::prelude::cast(arg, DataType::Float64)];
                }
                let sum_at = push(Expr::AggregateFunction(s), Merge::Sum);
                let count_at = push(Expr::AggregateFunction(c), Merge::Sum);
                finish.push(Finish::Avg {
                    sum: sum_at,
                    count: count_at,
                });
            }
            other => return Ok(Err(format!("{other} has no partial state here"))),
        }
    }
    let last_seen = leaf.window.to.is_none()
        && !g0.aggr_expr.is_empty()
        && g0.aggr_expr.iter().all(|e| {
            let inner = match e {
                Expr::Alias(a) => a.expr.as_ref(),
                e => e,
            };
            matches!(inner, Expr::AggregateFunction(f)
                if f.func.name().eq_ignore_ascii_case("max")
                    && matches!(f.params.args.as_slice(), [Expr::Column(c)] if c.name == "time"))
        });
    let fold_plan =
        LogicalPlan::Aggregate(Aggregate::try_new(Arc::new(input), group_expr, partial)?);
    let fold = state.create_physical_plan(&fold_plan).await?;
    let fold_key = fold_plan;
    // The partials' own schema: slot, groups and partials by position.
    let fold_schema = fold.schema();
    let mut fields = vec![Field::new(SLOT, DataType::Int64, true)];
    for g in 0..groups {
        fields.push(Field::new(
            format!("__g{g}"),
            fold_schema.field(1 + g).data_type().clone(),
            true,
        ));
    }
    for p in 0..merges.len() {
        fields.push(Field::new(
            format!("__p{p}"),
            fold_schema.field(1 + groups + p).data_type().clone(),
            true,
        ));
    }
    let partials_input = Rows::new(Arc::new(Schema::new(fields)));
    // Held by group where the states are of kinds merged here; a `max(time)` of a
    // window open towards now compacts to one row per group instead (`last_seen`).
    let grouped = if last_seen {
        None
    } else {
        Layout::new(&partials_input.schema, groups, &merges).map(Arc::new)
    };
    let merge_plan = |by_slot: bool| -> datafusion::error::Result<LogicalPlan> {
        let mut keys = Vec::new();
        if by_slot {
            keys.push(col(SLOT));
        }
        keys.extend((0..groups).map(|g| col(format!("__g{g}"))));
        let aggs: Vec<Expr> = merges
            .iter()
            .enumerate()
            .map(|(p, merge)| {
                let state = col(format!("__p{p}"));
                match merge {
                    Merge::Sum => sum(state),
                    Merge::Min => min(state),
                    Merge::Max => max(state),
                }
                .alias(format!("__p{p}"))
            })
            .collect();
        LogicalPlanBuilder::scan("__partials", partials_input.source()?, None)?
            .aggregate(keys, aggs)?
            .build()
    };
    let merge_slots = state.create_physical_plan(&merge_plan(true)?).await?;
    let merge_groups = state.create_physical_plan(&merge_plan(false)?).await?;
    Ok(Ok(LeafPlan {
        leaf: leaf.clone(),
        key: a0.clone(),
        output,
        fold,
        fold_input,
        fold_key,
        table_schema,
        columns,
        feed_schema,
        merge_slots,
        merge_groups,
        partials_input,
        finish,
        additive,
        last_seen,
        grouped,
    }))
}

/// The scan at the bottom of a chain of filters, projections and aliases.
fn bottom_scan(plan: &LogicalPlan) -> Option<&TableScan> {
    match plan {
        LogicalPlan::TableScan(s) => Some(s),
        LogicalPlan::Filter(f) => bottom_scan(&f.input),
        LogicalPlan::Projection(p) => bottom_scan(&p.input),
        LogicalPlan::SubqueryAlias(a) => bottom_scan(&a.input),
        _ => None,
    }
}

/// The columns of its table `scan` reads, by index, ascending: those it projects and
/// those its filters name.
fn scan_columns(scan: &TableScan) -> Vec<usize> {
    let schema = scan.source.schema();
    let mut columns: BTreeSet<usize> = match &scan.projection {
        Some(p) => p.iter().copied().collect(),
        None => (0..schema.fields().len()).collect(),
    };
    for filter in &scan.filters {
        for c in filter.column_refs() {
            columns.extend(schema.index_of(&c.name).ok());
        }
    }
    columns.into_iter().collect()
}

/// The chain `n0` (with `n1`, the same at the second instant) reading from `feed`
/// (the table's `columns`, then the slot) instead of its table, carrying the slot
/// column up, without its window bounds (the conjuncts that differ between the
/// instants).
fn with_slot(
    n0: &LogicalPlan,
    n1: &LogicalPlan,
    feed: &Arc<dyn TableSource>,
    columns: &[usize],
) -> datafusion::error::Result<LogicalPlan> {
    // Why the chain cannot be read from the feed, as a planning error.
    let not = |why: &str| datafusion::error::DataFusionError::Plan(why.into());
    let same = |c0: Vec<&Expr>, c1: Vec<&Expr>| -> Option<Vec<Expr>> {
        (c0.len() == c1.len()).then(|| {
            c0.into_iter()
                .zip(c1)
                .filter(|(a, b)| a == b)
                .map(|(a, _)| a.clone())
                .collect()
        })
    };
    let filtered = |kept: Vec<Expr>,
                    input: LogicalPlan|
     -> datafusion::error::Result<LogicalPlan> {
        Ok(match conjunction(kept) {
            Some(predicate) => LogicalPlan::Filter(Filter::try_new(predicate, Arc::new(input))?),
            None => input,
        })
    };
    Ok(match (n0, n1) {
        (LogicalPlan::TableScan(s0), LogicalPlan::TableScan(s1)) => {
            let slot = columns.len();
            let projection = match &s0.projection {
                Some(p) => {
                    let mut read =
                        p.iter()
                            .map(|i| {
                                columns.iter().position(|c| c == i).ok_or_else(|| {
                                    not("its scan projects a column it does not read")
                                })
                            })
                            .collect::<datafusion::error::Result<Vec<_>>>()?;
                    read.push(slot);
                    Some(read)
                }
                None => None,
            };
            let scan = LogicalPlan::TableScan(
                TableScanBuilder::new(s0.table_name.clone(), Arc::clone(feed))
                    .with_projection(projection)
                    .build()?,
            );
            let c0 = s0.filters.iter().flat_map(split_conjunction).collect();
            let c1 = s1.filters.iter().flat_map(split_conjunction).collect();
            let Some(kept) = same(c0, c1) else {
                return Err(not("its filters change with the time"));
            };
            filtered(kept, scan)?
        }
        (LogicalPlan::Filter(f0), LogicalPlan::Filter(f1)) => {
            let input = with_slot(&f0.input, &f1.input, feed, columns)?;
            let Some(kept) = same(
                split_conjunction(&f0.predicate),
                split_conjunction(&f1.predicate),
            ) else {
                return Err(not("its filters change with the time"));
            };
            filtered(kept, input)?
        }
        (LogicalPlan::Projection(p0), LogicalPlan::Projection(p1)) => {
            let input = with_slot(&p0.input, &p1.input, feed, columns)?;
            let (q, _) = input.schema().qualified_field_with_unqualified_name(SLOT)?;
            let mut exprs = p0.expr.clone();
            exprs.push(Expr::Column(Column::new(q.cloned(), SLOT)));
            LogicalPlan::Projection(Projection::try_new(exprs, Arc::new(input))?)
        }
        (LogicalPlan::SubqueryAlias(a0), LogicalPlan::SubqueryAlias(a1)) => {
            let input = with_slot(&a0.input, &a1.input, feed, columns)?;
            LogicalPlan::SubqueryAlias(SubqueryAlias::try_new(Arc::new(input), a0.alias.clone())?)
        }
        _ => {
            return Err(not(
                "it reads rows through more than filters and projections",
            ));
        }
    })
}

/// The name of the table leaf `index` is read from in a rule's plan.
fn leaf_table(index: usize) -> String {
    format!("__leaf_{index}")
}

/// The leaf a table named by [`leaf_table`] holds; `None` for any other table.
fn leaf_index(table: &str) -> Option<usize> {
    table.strip_prefix("__leaf_")?.parse().ok()
}

/// `scan` reading `source` instead, with `projection`, its filters and fetch kept.
fn rescan(
    scan: &TableScan,
    source: Arc<dyn TableSource>,
    projection: Option<Vec<usize>>,
) -> datafusion::error::Result<Transformed<LogicalPlan>> {
    Ok(Transformed::yes(LogicalPlan::TableScan(
        TableScanBuilder::new(scan.table_name.clone(), source)
            .with_projection(projection)
            .with_filters(scan.filters.clone())
            .with_fetch(scan.fetch)
            .build()?,
    )))
}

/// The rule's plan with every leaf's aggregate read from its leaf table, made at any
/// instant from its plans at [`crate::shape`]'s three (see [`Moving`]); `None` when it
/// depends on now() otherwise.
fn outer_plan(
    (p0, p1, nodes, (p2, n2)): RulePlans,
    leaves: &[&LeafPlan],
    indices: &[usize],
) -> datafusion::error::Result<Option<Moving>> {
    use crate::shape::{DELTA, T0_MS, T2_MS};
    let (n0, n1): (Vec<LogicalPlan>, Vec<LogicalPlan>) = nodes.into_iter().unzip();
    let o0 = substitute(p0, &n0, leaves, indices)?;
    let o1 = substitute(p1, &n1, leaves, indices)?;
    let o2 = substitute(p2, &n2, leaves, indices)?;
    let t1 = T0_MS + DELTA.as_millis() as i64;
    match (o0, o1, o2) {
        (Some(o0), Some(o1), Some(o2)) => Moving::new([(&o0, T0_MS), (&o1, t1), (&o2, T2_MS)]),
        _ => Ok(None),
    }
}

/// `plan` with each of `nodes` (leaves' aggregates, in subqueries too) read from its
/// leaf's table; `None` if not every one was found.
fn substitute(
    plan: LogicalPlan,
    nodes: &[LogicalPlan],
    leaves: &[&LeafPlan],
    indices: &[usize],
) -> datafusion::error::Result<Option<LogicalPlan>> {
    let mut replaced = vec![false; nodes.len()];
    let out = plan
        .transform_down_with_subqueries(|node| {
            // Each node once, in order: a rule may read one aggregate twice.
            for (i, found) in nodes.iter().enumerate() {
                if !replaced[i] && &node == found {
                    replaced[i] = true;
                    return Ok(Transformed::new(
                        placeholder(leaves[i], indices[i])?,
                        true,
                        TreeNodeRecursion::Jump,
                    ));
                }
            }
            Ok(Transformed::no(node))
        })?
        .data;
    Ok(replaced.iter().all(|r| *r).then_some(out))
}

/// A scan of leaf `index`'s table, with the columns named and qualified as its
/// aggregate's output.
fn placeholder(leaf: &LeafPlan, index: usize) -> datafusion::error::Result<LogicalPlan> {
    let LogicalPlan::Aggregate(agg) = &leaf.key else {
        unreachable!("a leaf's key is its aggregate");
    };
    let name = leaf_table(index);
    let empty = MemTable::try_new(Arc::clone(&leaf.output), vec![Vec::new()])?;
    let scan = LogicalPlan::TableScan(
        TableScanBuilder::new(name.as_str(), provider_as_source(Arc::new(empty))).build()?,
    );
    let exprs: Vec<Expr> = agg
        .schema
        .iter()
        .enumerate()
        .map(|(i, (q, f))| {
            Expr::Column(Column::new(
                Some(TableReference::bare(name.as_str())),
                format!("c{i}"),
            ))
            .alias_qualified(q.cloned(), f.name())
        })
        .collect();
    Ok(LogicalPlan::Projection(Projection::try_new(
        exprs,
        Arc::new(scan),
    )?))
}

/// A rule's plan above its leaves that reads nothing but leaves and side tables made
/// of rows (the registry's `accounts`), planned once down to its physical plan, its
/// literals of now() read from the round's instant: a round hands it the leaves'
/// results and runs it, without planning, optimizing or a session per round (about a
/// millisecond a rule otherwise, a second a round for a thousand rules).
struct Compiled {
    plan: Arc<dyn ExecutionPlan>,
    /// The source of each leaf it reads.
    inputs: Vec<(usize, Arc<Rows>)>,
    /// The side tables it reads, filled with their rows at each run.
    side: Vec<(String, Arc<Rows>)>,
    /// Where its moving literals read the round's instant.
    instant: Option<crate::moving::Instant>,
    /// The plan as expressions over one leaf's result, where it is no more than
    /// filters and projections of it.
    direct: Option<Direct>,
    /// What it runs with: the engine's memory limit for a statement, in a pool of its
    /// own (one run at a time holds it, and frees all of it at the end).
    task: Arc<TaskContext>,
    /// One run at a time (two groups may hold the same rule; the sources and the
    /// instant are shared).
    running: tokio::sync::Mutex<()>,
}

/// `outer`'s [`Compiled`] form, or `None` where it reads a table other than its
/// leaves and side tables made of rows.
async fn compile(
    engine: &QueryEngine,
    outer: &Moving,
    leaves: &[LeafState],
) -> Option<Arc<Compiled>> {
    use datafusion::execution::memory_pool::MemoryPool;
    use datafusion::execution::runtime_env::RuntimeEnvBuilder;
    let (plan, instant) = match outer.fixed() {
        Some(plan) => (plan.clone(), None),
        None => match outer.parameterised() {
            Ok((plan, instant)) => (plan, Some(instant)),
            Err(error) => {
                tracing::debug!(%error, "a rule's plan above its leaves is planned each round");
                return None;
            }
        },
    };
    let mut inputs: Vec<(usize, Arc<Rows>)> = Vec::new();
    let mut side: Vec<(String, Arc<Rows>)> = Vec::new();
    let mut others = false;
    let _ = plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(s) = node {
            let table = s.table_name.table();
            match leaf_index(table).filter(|i| *i < leaves.len()) {
                Some(i) => {
                    if !inputs.iter().any(|(j, _)| *j == i) {
                        inputs.push((i, Rows::new(Arc::clone(&leaves[i].plan.output))));
                    }
                }
                None if engine.side_rows(table).is_some() => {
                    if !side.iter().any(|(t, _)| t == table) {
                        side.push((table.to_string(), Rows::new(s.source.schema())));
                    }
                }
                None => others = true,
            }
        }
        Ok(TreeNodeRecursion::Continue)
    });
    if others {
        return None;
    }
    let planned = async {
        let plan = plan
            .transform_up_with_subqueries(|node| {
                let LogicalPlan::TableScan(s) = &node else {
                    return Ok(Transformed::no(node));
                };
                let table = s.table_name.table();
                let rows = match leaf_index(table) {
                    Some(leaf) => inputs.iter().find(|(i, _)| Some(*i) == Some(leaf)),
                    None => None,
                }
                .map(|(_, rows)| rows)
                .or_else(|| side.iter().find(|(t, _)| t == table).map(|(_, rows)| rows));
                let Some(rows) = rows else {
                    return Ok(Transformed::no(node));
                };
                rescan(s, rows.source()?, s.projection.clone())
            })?
            .data;
        let mut session = engine
            .session(&principal())
            .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?
            .state();
        let options = session.config_mut().options_mut();
        options.execution.target_partitions = 1;
        // A plan run again must hold nothing of its last run (see
        // `reset_plan_states`); dynamic filters would.
        options.set(
            "datafusion.optimizer.enable_dynamic_filter_pushdown",
            "false",
        )?;
        let physical = session.create_physical_plan(&plan).await?;
        let admitted = engine.internal();
        let runtime = RuntimeEnvBuilder::from_runtime_env(session.runtime_env())
            .with_memory_pool(Arc::clone(admitted.pool()) as Arc<dyn MemoryPool>)
            .build_arc()?;
        let task = Arc::new(TaskContext::from(&session).with_runtime(runtime));
        Ok::<_, datafusion::error::DataFusionError>((physical, task))
    };
    match planned.await {
        Ok((plan, task)) => {
            let direct = if side.is_empty() {
                Direct::of(&plan, &inputs)
            } else {
                None
            };
            Some(Arc::new(Compiled {
                plan,
                inputs,
                side,
                instant,
                direct,
                task,
                running: tokio::sync::Mutex::new(()),
            }))
        }
        Err(error) => {
            tracing::debug!(%error, "a rule's plan above its leaves is planned each round");
            None
        }
    }
}

impl Compiled {
    /// Runs the plan at `at_ms` over the leaves' `results` (by leaf index); `None`
    /// when it cannot run as compiled this time (a side table's columns changed, an
    /// instant its literals cannot move to exactly): the caller plans it then.
    async fn run(
        &self,
        engine: &QueryEngine,
        at_ms: i64,
        results: &HashMap<usize, RecordBatch>,
    ) -> Result<Option<Vec<RecordBatch>>, QueryError> {
        let _one = self.running.lock().await;
        if let Some(instant) = &self.instant
            && !instant.set(at_ms)
        {
            return Ok(None);
        }
        if let Some(direct) = &self.direct {
            let result = results
                .get(&direct.leaf)
                .ok_or_else(|| QueryError::Lake(format!("no result for leaf {}", direct.leaf)))?;
            return direct
                .run(result)
                .map(|batch| Some(vec![batch]))
                .map_err(df);
        }
        for (table, rows) in &self.side {
            let Some(batch) = engine.side_rows(table) else {
                return Ok(None);
            };
            if batch.schema().fields() != rows.schema.fields() {
                return Ok(None);
            }
            rows.set(vec![batch]);
        }
        for (i, rows) in &self.inputs {
            let result = results
                .get(i)
                .ok_or_else(|| QueryError::Lake(format!("no result for leaf {i}")))?;
            rows.set(vec![result.clone()]);
        }
        let out = match datafusion::physical_plan::execution_plan::reset_plan_states(Arc::clone(
            &self.plan,
        )) {
            Ok(plan) => collect(plan, Arc::clone(&self.task)).await.map_err(df),
            Err(e) => Err(df(e)),
        };
        for (_, rows) in &self.inputs {
            rows.set(Vec::new());
        }
        for (_, rows) in &self.side {
            rows.set(Vec::new());
        }
        out.map(Some)
    }
}

/// A physical plan that is only filters and projections over one leaf's result, as
/// those expressions: evaluated over the result as it is, without streams or tasks
/// (the rules of a fleet are mostly a threshold over an aggregate, and a thousand of
/// them run every round).
struct Direct {
    leaf: usize,
    /// The columns the leaf's scan reads.
    scan: Option<Vec<usize>>,
    /// From the scan up.
    steps: Vec<Step>,
}

enum Step {
    /// Keeps the rows where the predicate is true, then the columns projected.
    Filter(Arc<dyn PhysicalExpr>, Option<Vec<usize>>),
    /// New columns of this schema.
    Project(Vec<Arc<dyn PhysicalExpr>>, SchemaRef),
}

impl Direct {
    /// `plan` as [`Direct`] steps, if it is no more than filters and projections over
    /// one of `inputs`.
    fn of(plan: &Arc<dyn ExecutionPlan>, inputs: &[(usize, Arc<Rows>)]) -> Option<Self> {
        use datafusion::physical_plan::filter::FilterExec;
        use datafusion::physical_plan::projection::ProjectionExec;
        use datafusion::physical_plan::streaming::StreamingTableExec;
        let mut steps = Vec::new();
        let mut node = Arc::clone(plan);
        loop {
            if node.fetch().is_some() {
                return None;
            }
            let any: &dyn ExecutionPlan = node.as_ref();
            if let Some(f) = any.downcast_ref::<FilterExec>() {
                steps.push(Step::Filter(
                    Arc::clone(f.predicate()),
                    f.projection().as_ref().map(|p| p.to_vec()),
                ));
                node = Arc::clone(f.input());
            } else if let Some(p) = any.downcast_ref::<ProjectionExec>() {
                steps.push(Step::Project(
                    p.expr().iter().map(|e| Arc::clone(&e.expr)).collect(),
                    p.schema(),
                ));
                node = Arc::clone(p.input());
            } else if let Some(s) = any.downcast_ref::<StreamingTableExec>() {
                let [stream] = s.partitions().as_slice() else {
                    return None;
                };
                if s.limit().is_some() {
                    return None;
                }
                let (leaf, _) = inputs
                    .iter()
                    .find(|(_, rows)| std::ptr::addr_eq(Arc::as_ptr(rows), Arc::as_ptr(stream)))?;
                steps.reverse();
                return Some(Self {
                    leaf: *leaf,
                    scan: s.projection().as_ref().map(|p| p.to_vec()),
                    steps,
                });
            } else {
                return None;
            }
        }
    }

    /// The plan's rows over `result`, the leaf's.
    fn run(&self, result: &RecordBatch) -> datafusion::error::Result<RecordBatch> {
        let mut batch = match &self.scan {
            Some(columns) => result.project(columns)?,
            None => result.clone(),
        };
        for step in &self.steps {
            batch = match step {
                Step::Filter(predicate, projection) => {
                    let keep = predicate.evaluate(&batch)?.into_array(batch.num_rows())?;
                    let keep = keep.as_boolean_opt().ok_or_else(|| {
                        datafusion::error::DataFusionError::Internal(
                            "a filter that is not boolean".into(),
                        )
                    })?;
                    let kept = match projection {
                        Some(columns) => batch.project(columns)?,
                        None => batch,
                    };
                    filter_record_batch(&kept, keep)?
                }
                Step::Project(exprs, schema) => {
                    let rows = batch.num_rows();
                    let columns = exprs
                        .iter()
                        .map(|e| e.evaluate(&batch)?.into_array(rows))
                        .collect::<datafusion::error::Result<Vec<_>>>()?;
                    RecordBatch::try_new_with_options(
                        Arc::clone(schema),
                        columns,
                        &arrow::array::RecordBatchOptions::new().with_row_count(Some(rows)),
                    )?
                }
            };
        }
        Ok(batch)
    }
}

/// `outer` with each leaf table holding this round's `results` and every other table
/// read as it is now.
async fn resolve(
    ctx: &datafusion::prelude::SessionContext,
    outer: LogicalPlan,
    results: &HashMap<usize, RecordBatch>,
) -> Result<LogicalPlan, QueryError> {
    let mut names = Vec::new();
    outer
        .apply_with_subqueries(|node| {
            if let LogicalPlan::TableScan(s) = node
                && !s.table_name.table().starts_with("__leaf_")
            {
                names.push(s.table_name.clone());
            }
            Ok(TreeNodeRecursion::Continue)
        })
        .map_err(df)?;
    let mut providers = HashMap::new();
    for name in names {
        let provider = ctx.table_provider(name.clone()).await.map_err(df)?;
        providers.insert(name, provider_as_source(provider));
    }
    outer
        .transform_up_with_subqueries(|node| {
            let LogicalPlan::TableScan(s) = &node else {
                return Ok(Transformed::no(node));
            };
            let source = match s.table_name.table().strip_prefix("__leaf_") {
                Some(_) => {
                    let batch = leaf_index(s.table_name.table())
                        .and_then(|i| results.get(&i))
                        .ok_or_else(|| {
                            datafusion::error::DataFusionError::Internal(format!(
                                "no result for {}",
                                s.table_name
                            ))
                        })?;
                    let table = MemTable::try_new(batch.schema(), vec![vec![batch.clone()]])?;
                    provider_as_source(Arc::new(table))
                }
                None => match providers.get(&s.table_name) {
                    Some(source) => Arc::clone(source),
                    None => return Ok(Transformed::no(node)),
                },
            };
            let projection = same_columns(s, &source.schema())?;
            rescan(s, source, projection)
        })
        .map(|t| t.data)
        .map_err(df)
}

/// The projection of `scan` over a table whose columns are now `now`: the same
/// columns by name (a side table's columns can change while a rule's plan is kept),
/// or an error if one is gone or changed its type.
fn same_columns(
    scan: &TableScan,
    now: &SchemaRef,
) -> datafusion::error::Result<Option<Vec<usize>>> {
    let before = scan.source.schema();
    if before.fields() == now.fields() {
        return Ok(scan.projection.clone());
    }
    let read: Vec<usize> = match &scan.projection {
        Some(p) => p.clone(),
        None => (0..before.fields().len()).collect(),
    };
    read.into_iter()
        .map(|i| {
            let field = before.field(i);
            match now.index_of(field.name()) {
                Ok(j) if now.field(j).data_type() == field.data_type() => Ok(j),
                _ => Err(datafusion::error::DataFusionError::Plan(format!(
                    "column {} of {} changed since the rule was prepared",
                    field.name(),
                    scan.table_name
                ))),
            }
        })
        .collect::<datafusion::error::Result<Vec<_>>>()
        .map(Some)
}

#[cfg(test)]
#[path = "incremental_tests.rs"]
mod tests;
