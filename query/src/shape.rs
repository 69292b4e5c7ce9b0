//! How a statement reads the `metrics` and `logs` rows: the shape alert rules are
//! recognised by, for evaluating them incrementally (partial aggregates kept as rows
//! arrive) instead of rescanning the lake every round.
//!
//! The statement is planned and optimized twice, with its `now()` pinned at two
//! instants [`DELTA`] apart. Whatever differs between the two plans depends on the
//! time: a literal that moves by exactly `DELTA` in a comparison with a table's `time`
//! column is a window bound relative to now (`time > now() - INTERVAL '5 minutes'`);
//! anything else that moves (`day = current_date`, `date_trunc('hour', now())`) is a
//! dependence on the time this module cannot follow. `DELTA` is more than a day and
//! not a whole number of hours, so that calendar functions of now move by something
//! else.
//!
//! A read of rows is an incremental [`Leaf`] when it is an aggregate (`sum`, `count`,
//! `min`, `max`, `avg`, not `DISTINCT`, not ordered) of row-wise expressions of one
//! table's rows, filtered by row-wise predicates and a window, grouped by row-wise
//! expressions. Whatever is above the leaves (HAVING, joins with `accounts`, outer
//! filters, arithmetic of aggregates) is evaluated over the leaves' results, so it may
//! use `now()` freely.

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use datafusion::common::ScalarValue;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::execution::SessionState;
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{BinaryExpr, Expr, LogicalPlan, Operator};
use fleetlake_model::Table;

/// How far apart the two instants a statement is planned at are: 1 day, 1 hour and
/// 1 second.
pub const DELTA: Duration = Duration::from_secs(86_400 + 3_600 + 1);

/// The first instant (2026-01-05T10:20:30Z, epoch ms); the second is `DELTA` later.
pub(crate) const T0_MS: i64 = 1_767_608_430_000;

/// A third instant, 2028-05-15T03:41:07Z (epoch ms): another year (a leap year, so a
/// year back is 366 days), quarter, month (a month back is 30 days, not 31), ISO week,
/// weekday and time of day. A plan that is the same at the first two instants but
/// not here depends on the calendar (`INTERVAL '1 month'`, `date_trunc('month',
/// now())`), which is not followed.
pub(crate) const T2_MS: i64 = 1_842_579_667_000;

/// Why a plan is not followed when it differs at an instant in another month and year.
const CALENDAR: &str =
    "it depends on the calendar (a month, a year, a week of now()), which is not followed";

/// Why a plan is not followed when its structure differs between the two instants.
const CHANGES: &str = "its plan changes with the time it runs at";

/// Aggregate functions whose partial states merge: what an incremental leaf may use.
const MERGEABLE: [&str; 5] = ["sum", "count", "min", "max", "avg"];

/// Columns whose equality predicates say which rows a leaf reads at all.
const ROUTING_COLUMNS: [&str; 3] = ["namespace", "metric_name", "log_group"];

/// A window of row times relative to the statement's now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Rows after `now - from`...
    pub from: Duration,
    /// ... or at it.
    pub from_inclusive: bool,
    /// Rows before `now - to`, if bounded above...
    pub to: Option<Duration>,
    /// ... or at it.
    pub to_inclusive: bool,
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ago = |d: Duration| {
            if d.is_zero() {
                "now".to_string()
            } else {
                format!("now - {}", humantime::format_duration(d))
            }
        };
        write!(
            f,
            "{}{}, {}{}",
            if self.from_inclusive { "[" } else { "(" },
            ago(self.from),
            self.to.map_or_else(|| "...".to_string(), ago),
            if self.to.is_none_or(|_| !self.to_inclusive) {
                ")"
            } else {
                "]"
            }
        )
    }
}

/// One aggregate over one table's rows in a window: what an incremental evaluator
/// keeps partial states for.
#[derive(Debug, Clone, PartialEq)]
pub struct Leaf {
    /// The table read.
    pub table: Table,
    /// The rows' times it reads.
    pub window: Window,
    /// The aggregates, as the plan shows them (`sum(metrics.sum)`).
    pub aggregates: Vec<String>,
    /// The grouping expressions.
    pub group_by: Vec<String>,
    /// Row predicates besides the window, including the routing ones.
    pub filters: Vec<String>,
    /// `column = 'value'` / `column IN (...)` predicates on [`ROUTING_COLUMNS`]: the
    /// rows the leaf can only ever read (empty: every row of the table).
    pub routes: Vec<(String, BTreeSet<String>)>,
}

impl fmt::Display for Leaf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} over {} in {}",
            self.aggregates.join(", "),
            self.table.name(),
            self.window
        )?;
        if !self.group_by.is_empty() {
            write!(f, " by {}", self.group_by.join(", "))?;
        }
        for (column, values) in &self.routes {
            let values: Vec<String> = values.iter().map(|v| format!("'{v}'")).collect();
            write!(f, "; only {column} in ({})", values.join(", "))?;
        }
        Ok(())
    }
}

/// How a statement can be evaluated, and why.
#[derive(Debug, Clone, PartialEq)]
pub enum Shape {
    /// It reads no `metrics` or `logs` rows.
    NoRows,
    /// Every read of rows is an incremental [`Leaf`].
    Incremental(Vec<Leaf>),
    /// Every read of rows is bounded by a window relative to now (the longest one
    /// given), but not every one is a leaf, for `reason`.
    Window {
        /// The longest window any read needs.
        longest: Duration,
        /// Why not every read is a leaf.
        reason: String,
    },
    /// Some read of rows has no window relative to now, or the plan depends on the
    /// time in a way not followed here, for `reason`.
    Lake {
        /// Which read, and why.
        reason: String,
    },
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Shape::NoRows => write!(f, "reads no metrics or logs rows"),
            Shape::Incremental(leaves) => {
                let leaves: Vec<String> = leaves.iter().map(ToString::to_string).collect();
                write!(f, "incremental: {}", leaves.join("; and "))
            }
            Shape::Window { longest, reason } => write!(
                f,
                "window of {}: {reason}",
                humantime::format_duration(*longest)
            ),
            Shape::Lake { reason } => write!(f, "lake: {reason}"),
        }
    }
}

/// The shape of `plan` (a statement planned, not optimized, in `state`).
pub fn classify(state: &SessionState, plan: &LogicalPlan) -> datafusion::error::Result<Shape> {
    Ok(classify_pair(state, plan)?.shape)
}

/// A statement's shape with the two optimized plans it was read from, and each
/// leaf's aggregate node in both (in the order of [`Shape::Incremental`]'s leaves).
pub(crate) struct Classified {
    pub shape: Shape,
    /// The plan at the first instant, and at the second.
    pub plans: (LogicalPlan, LogicalPlan),
    /// Each leaf's `Aggregate` node at the first instant and at the second.
    pub leaves: Vec<(LogicalPlan, LogicalPlan)>,
    /// The plan at a third instant in another year and month, and its leaves' nodes.
    pub third: (LogicalPlan, Vec<LogicalPlan>),
}

/// [`classify`], keeping the plans.
pub(crate) fn classify_pair(
    state: &SessionState,
    plan: &LogicalPlan,
) -> datafusion::error::Result<Classified> {
    let at = |ms: i64| -> datafusion::error::Result<LogicalPlan> {
        // Pinning starts the generated names afresh, so both plans name what they
        // extract alike.
        let mut state = state.clone();
        if let Some(at) = chrono::DateTime::from_timestamp_millis(ms) {
            crate::engine::pin(&mut state, at);
        }
        state.optimize(plan)
    };
    let p0 = at(T0_MS)?;
    let p1 = at(T0_MS + DELTA.as_millis() as i64)?;
    let p2 = at(T2_MS)?;
    let mut found = Found::new(DELTA.as_nanos() as i64);
    let mut third = Found::new((T2_MS - T0_MS) * 1_000_000);
    let (shape, leaves, third_leaves) = match walk(&p0, &p1, &mut found) {
        Err(reason) => (Shape::Lake { reason }, Vec::new(), Vec::new()),
        Ok(()) => {
            let elsewhen = walk(&p0, &p2, &mut third);
            let nodes = std::mem::take(&mut found.nodes);
            let third_nodes = std::mem::take(&mut third.nodes);
            let shape = found.shape();
            if elsewhen.is_ok() && third.shape() == shape {
                (shape, nodes, third_nodes)
            } else {
                (
                    Shape::Lake {
                        reason: CALENDAR.into(),
                    },
                    Vec::new(),
                    Vec::new(),
                )
            }
        }
    };
    Ok(Classified {
        shape,
        plans: (p0, p1),
        leaves,
        third: (p2, third_leaves.into_iter().map(|(_, n2)| n2).collect()),
    })
}

/// What the walk over a pair of plans found.
struct Found {
    /// How far apart (ns) the two instants of the plans walked are.
    delta_ns: i64,
    leaves: Vec<Leaf>,
    /// The aggregate nodes of `leaves`, at both instants.
    nodes: Vec<(LogicalPlan, LogicalPlan)>,
    /// Reads of rows that are not leaves: their window (if any) and why not a leaf.
    others: Vec<(Table, Option<Window>, String)>,
}

impl Found {
    fn new(delta_ns: i64) -> Self {
        Self {
            delta_ns,
            leaves: Vec::new(),
            nodes: Vec::new(),
            others: Vec::new(),
        }
    }

    fn shape(self) -> Shape {
        if let Some((table, _, reason)) = self.others.iter().find(|(_, w, _)| w.is_none()) {
            return Shape::Lake {
                reason: format!(
                    "reads {} without a window relative to now() ({reason})",
                    table.name()
                ),
            };
        }
        if let Some((_, _, reason)) = self.others.first() {
            let longest = self
                .others
                .iter()
                .filter_map(|(_, w, _)| w.map(|w| w.from))
                .chain(self.leaves.iter().map(|l| l.window.from))
                .max()
                .unwrap_or_default();
            return Shape::Window {
                longest,
                reason: reason.clone(),
            };
        }
        if self.leaves.is_empty() {
            Shape::NoRows
        } else {
            Shape::Incremental(self.leaves)
        }
    }
}

/// The table of the lake a scan reads rows of, if `metrics` or `logs`.
fn rows_table(plan: &LogicalPlan) -> Option<Table> {
    let LogicalPlan::TableScan(scan) = plan else {
        return None;
    };
    [Table::Metrics, Table::Logs]
        .into_iter()
        .find(|t| t.name() == scan.table_name.table())
}

/// Walks `p0` and `p1` (one statement planned at two instants) together.
fn walk(p0: &LogicalPlan, p1: &LogicalPlan, found: &mut Found) -> Result<(), String> {
    if std::mem::discriminant(p0) != std::mem::discriminant(p1) {
        return Err(CHANGES.into());
    }
    if let (LogicalPlan::Aggregate(a0), LogicalPlan::Aggregate(a1)) = (p0, p1)
        && let Some((table, below)) = over_rows(&a0.input, &a1.input, found.delta_ns)
    {
        match below.and_then(|chain| leaf(a0, a1, chain)) {
            Ok(leaf) => {
                found.leaves.push(leaf);
                found.nodes.push((p0.clone(), p1.clone()));
            }
            Err((window, reason)) => found.others.push((table, window, reason)),
        }
        // What is below the aggregate is its read of rows.
        return subqueries(p0, p1, found);
    }
    if let Some((table, below)) = over_rows(p0, p1, found.delta_ns) {
        // Rows read without aggregating them (through filters and projections).
        let window = below.ok().and_then(|chain| chain.window);
        found.others.push((
            table,
            window,
            "it reads rows without aggregating them".into(),
        ));
        return subqueries(p0, p1, found);
    }
    let (i0, i1) = (p0.inputs(), p1.inputs());
    if i0.len() != i1.len() {
        return Err(CHANGES.into());
    }
    for (a, b) in i0.into_iter().zip(i1) {
        walk(a, b, found)?;
    }
    subqueries(p0, p1, found)
}

/// The aggregates over rows of `plan` (one optimized plan), in the order [`classify`]
/// finds its leaves: for a statement whose every read is a leaf, its leaves'
/// `Aggregate` nodes at the instant `plan` was planned at.
pub(crate) fn row_aggregates(plan: &LogicalPlan) -> Vec<LogicalPlan> {
    fn visit(plan: &LogicalPlan, out: &mut Vec<LogicalPlan>) {
        let over = |p: &LogicalPlan| over_rows(p, p, 0).is_some();
        if let LogicalPlan::Aggregate(a) = plan
            && over(&a.input)
        {
            out.push(plan.clone());
        } else if !over(plan) {
            for input in plan.inputs() {
                visit(input, out);
            }
        }
        let _ = plan.apply_subqueries(|sub| {
            visit(sub, out);
            Ok(TreeNodeRecursion::Jump)
        });
    }
    let mut out = Vec::new();
    visit(plan, &mut out);
    out
}

/// Walks the subqueries of `p0`'s and `p1`'s expressions together.
fn subqueries(p0: &LogicalPlan, p1: &LogicalPlan, found: &mut Found) -> Result<(), String> {
    let collect = |p: &LogicalPlan| {
        let mut out = Vec::new();
        let _ = p.apply_subqueries(|sub| {
            out.push(sub.clone());
            Ok(TreeNodeRecursion::Jump)
        });
        out
    };
    let (s0, s1) = (collect(p0), collect(p1));
    if s0.len() != s1.len() {
        return Err(CHANGES.into());
    }
    for (a, b) in s0.iter().zip(&s1) {
        walk(a, b, found)?;
    }
    Ok(())
}

/// Row-wise nodes down to a scan of rows: what an aggregate reads.
struct Chain {
    table: Table,
    window: Option<Window>,
    /// Row predicates other than the window bounds.
    filters: Vec<Expr>,
}

/// A chain read, or why it cannot be (with the window, if known).
type ChainResult = Result<Chain, (Option<Window>, String)>;

/// `p0`/`p1` as a chain of filters and projections down to a scan of `metrics` or
/// `logs`, if it is one: the table, and the chain read.
fn over_rows(p0: &LogicalPlan, p1: &LogicalPlan, delta_ns: i64) -> Option<(Table, ChainResult)> {
    let mut node = p0;
    loop {
        if let Some(table) = rows_table(node) {
            return Some((
                table,
                Chain::of(p0, p1, delta_ns).map_err(|reason| (None, reason)),
            ));
        }
        match node {
            LogicalPlan::Filter(f) => node = &f.input,
            LogicalPlan::Projection(p) => node = &p.input,
            LogicalPlan::SubqueryAlias(a) => node = &a.input,
            _ => return None,
        }
    }
}

impl Chain {
    /// Reads the chain `p0`/`p1` (see [`over_rows`]): its window and row predicates.
    fn of(p0: &LogicalPlan, p1: &LogicalPlan, delta_ns: i64) -> Result<Chain, String> {
        let mut bounds = Bounds {
            delta_ns,
            ..Bounds::default()
        };
        let mut filters = Vec::new();
        let (mut n0, mut n1) = (p0, p1);
        loop {
            let conjuncts = |p: &LogicalPlan| -> Vec<Expr> {
                match p {
                    LogicalPlan::Filter(f) => split_conjunction(&f.predicate)
                        .into_iter()
                        .cloned()
                        .collect(),
                    LogicalPlan::TableScan(s) => s
                        .filters
                        .iter()
                        .flat_map(split_conjunction)
                        .cloned()
                        .collect(),
                    _ => Vec::new(),
                }
            };
            let (c0, c1) = (conjuncts(n0), conjuncts(n1));
            if c0.len() != c1.len() {
                return Err("its filters change with the time it runs at".into());
            }
            for (e0, e1) in c0.into_iter().zip(c1) {
                row_wise(&e0)?;
                if e0 == e1 {
                    if !filters.contains(&e0) {
                        filters.push(e0);
                    }
                } else {
                    bounds.add(&e0, &e1)?;
                }
            }
            if let (LogicalPlan::Projection(a), LogicalPlan::Projection(b)) = (n0, n1) {
                if a.expr != b.expr {
                    return Err("it computes rows from the time it runs at".into());
                }
                for e in &a.expr {
                    row_wise(e)?;
                    // Windows are on the rows' own time.
                    if let Expr::Alias(alias) = e
                        && alias.name == "time"
                        && !matches!(alias.expr.as_ref(), Expr::Column(c) if c.name == "time")
                    {
                        return Err("it computes a time column of its own".into());
                    }
                }
            }
            if let Some(table) = rows_table(n0) {
                // A bound both in a filter and pushed down into the scan is found
                // twice, the same both times.
                return Ok(Chain {
                    table,
                    window: bounds.window(),
                    filters,
                });
            }
            let (i0, i1) = (n0.inputs(), n1.inputs());
            match (i0.first(), i1.first()) {
                (Some(a), Some(b)) if i0.len() == 1 && i1.len() == 1 => (n0, n1) = (*a, *b),
                _ => return Err(CHANGES.into()),
            }
        }
    }
}

/// Fails for what cannot be computed from one row alone: volatile functions,
/// subqueries, window functions.
fn row_wise(expr: &Expr) -> Result<(), String> {
    let mut problem = None;
    let _ = expr.apply(|e| {
        let found = match e {
            Expr::ScalarSubquery(_) | Expr::Exists(_) | Expr::InSubquery(_) => {
                Some("a subquery filters its rows")
            }
            Expr::WindowFunction(_) => Some("it uses a window function over rows"),
            Expr::AggregateFunction(_) => Some("it nests aggregates"),
            e if e.is_volatile_node() => Some("it uses a volatile function over rows"),
            _ => None,
        };
        if let Some(found) = found {
            problem = Some(found.to_string());
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    problem.map_or(Ok(()), Err)
}

/// The aggregate `a0`/`a1` over the rows of `chain` as a leaf, or why it is not one
/// (with the window it reads in).
fn leaf(
    a0: &datafusion::logical_expr::Aggregate,
    a1: &datafusion::logical_expr::Aggregate,
    chain: Chain,
) -> Result<Leaf, (Option<Window>, String)> {
    let Some(window) = chain.window else {
        return Err((None, "no lower bound on time relative to now()".into()));
    };
    aggregate_leaf(a0, a1, chain, window).map_err(|reason| (Some(window), reason))
}

fn aggregate_leaf(
    a0: &datafusion::logical_expr::Aggregate,
    a1: &datafusion::logical_expr::Aggregate,
    chain: Chain,
    window: Window,
) -> Result<Leaf, String> {
    if a0.group_expr != a1.group_expr || a0.aggr_expr != a1.aggr_expr {
        return Err("its aggregates or groups change with the time it runs at".into());
    }
    for e in &a0.group_expr {
        if matches!(e, Expr::GroupingSet(_)) {
            return Err("it groups by grouping sets (ROLLUP, CUBE)".into());
        }
        row_wise(e)?;
    }
    let mut aggregates = Vec::new();
    for e in &a0.aggr_expr {
        let inner = match e {
            Expr::Alias(a) => a.expr.as_ref(),
            e => e,
        };
        let Expr::AggregateFunction(f) = inner else {
            return Err(format!("{inner} is not an aggregate function"));
        };
        let name = f.func.name().to_ascii_lowercase();
        if !MERGEABLE.contains(&name.as_str()) {
            return Err(format!(
                "{name} has no partial state to merge (incremental: {})",
                MERGEABLE.join(", ")
            ));
        }
        if f.params.distinct {
            return Err(format!(
                "{name}(DISTINCT ...) has no partial state to merge"
            ));
        }
        if !f.params.order_by.is_empty() {
            return Err(format!("{name}(... ORDER BY ...) depends on row order"));
        }
        for arg in f.params.args.iter().chain(f.params.filter.as_deref()) {
            row_wise(arg)?;
        }
        aggregates.push(inner.to_string());
    }
    let routes = chain.filters.iter().filter_map(route).collect();
    Ok(Leaf {
        table: chain.table,
        window,
        aggregates,
        group_by: a0.group_expr.iter().map(ToString::to_string).collect(),
        filters: chain.filters.iter().map(ToString::to_string).collect(),
        routes,
    })
}

/// A predicate `column = 'v'` or `column IN ('v', ...)` on a routing column.
fn route(expr: &Expr) -> Option<(String, BTreeSet<String>)> {
    let text = |e: &Expr| match e {
        Expr::Literal(
            ScalarValue::Utf8(Some(v))
            | ScalarValue::Utf8View(Some(v))
            | ScalarValue::LargeUtf8(Some(v)),
            _,
        ) => Some(v.clone()),
        _ => None,
    };
    let column = |e: &Expr| match e {
        Expr::Column(c) if ROUTING_COLUMNS.contains(&c.name.as_str()) => Some(c.name.clone()),
        _ => None,
    };
    match expr {
        Expr::BinaryExpr(BinaryExpr {
            left,
            op: Operator::Eq,
            right,
        }) => {
            let (c, v) = column(left)
                .zip(text(right))
                .or_else(|| column(right).zip(text(left)))?;
            Some((c, BTreeSet::from([v])))
        }
        Expr::InList(list) if !list.negated => {
            let c = column(&list.expr)?;
            let values: Option<BTreeSet<String>> = list.list.iter().map(text).collect();
            Some((c, values?))
        }
        // The optimizer writes a short IN list as equalities joined by OR.
        Expr::BinaryExpr(BinaryExpr {
            op: Operator::Or, ..
        }) => {
            let mut routes = split_disjunction(expr).into_iter().map(route);
            let (c, mut values) = routes.next()??;
            for next in routes {
                let (other, more) = next?;
                if other != c {
                    return None;
                }
                values.extend(more);
            }
            Some((c, values))
        }
        _ => None,
    }
}

/// `a OR b OR c` as `[a, b, c]`.
fn split_disjunction(expr: &Expr) -> Vec<&Expr> {
    match expr {
        Expr::BinaryExpr(BinaryExpr {
            left,
            op: Operator::Or,
            right,
        }) => {
            let mut out = split_disjunction(left);
            out.extend(split_disjunction(right));
            out
        }
        e => vec![e],
    }
}

/// Window bounds found in the pairs of conjuncts that differ between the instants.
#[derive(Default)]
struct Bounds {
    /// How far apart (ns) the two instants are.
    delta_ns: i64,
    from: Option<(Duration, bool)>,
    to: Option<(Duration, bool)>,
}

impl Bounds {
    /// Adds the bound `e0` is at the first instant and `e1` at the second, or fails:
    /// the conjunct depends on the time some other way.
    fn add(&mut self, e0: &Expr, e1: &Expr) -> Result<(), String> {
        let other = || "it uses now() other than as a window bound on time".to_string();
        let (Some((op, v0)), Some((op1, v1))) = (time_comparison(e0), time_comparison(e1)) else {
            return Err(other());
        };
        if op != op1 || v1 - v0 != self.delta_ns {
            return Err(other());
        }
        let ago = T0_MS * 1_000_000 - v0;
        if ago < 0 {
            return Err("it bounds time by an instant after now()".into());
        }
        let ago = Duration::from_nanos(ago as u64);
        match op {
            // Of two lower bounds the later (smaller `ago`) binds; of two upper
            // bounds, the earlier.
            Operator::Gt | Operator::GtEq => {
                let inclusive = op == Operator::GtEq;
                // At one instant, the exclusive bound binds.
                if self
                    .from
                    .is_none_or(|(d, i)| ago < d || (ago == d && i && !inclusive))
                {
                    self.from = Some((ago, inclusive));
                }
            }
            Operator::Lt | Operator::LtEq => {
                let inclusive = op == Operator::LtEq;
                if self
                    .to
                    .is_none_or(|(d, i)| ago > d || (ago == d && i && !inclusive))
                {
                    self.to = Some((ago, inclusive));
                }
            }
            _ => return Err(other()),
        }
        Ok(())
    }

    fn window(&self) -> Option<Window> {
        let (from, from_inclusive) = self.from?;
        Some(Window {
            from,
            from_inclusive,
            to: self.to.map(|(d, _)| d),
            to_inclusive: self.to.is_some_and(|(_, i)| i),
        })
    }
}

/// A timestamp type that holds every microsecond.
fn fine_time(t: &arrow::datatypes::DataType) -> bool {
    use arrow::datatypes::{DataType, TimeUnit};
    matches!(
        t,
        DataType::Timestamp(TimeUnit::Microsecond | TimeUnit::Nanosecond, _)
    )
}

/// `time OP literal` (either way round, through casts of the column): the operator as
/// if the column were on the left and the literal in epoch ns.
fn time_comparison(expr: &Expr) -> Option<(Operator, i64)> {
    let Expr::BinaryExpr(BinaryExpr { left, op, right }) = expr else {
        return None;
    };
    let is_time = |e: &Expr| {
        let mut e = e;
        loop {
            match e {
                // Only casts that keep every microsecond: a coarser one compares
                // truncated times, which windows of row times cannot follow.
                Expr::Cast(c) if fine_time(c.field.data_type()) => e = c.expr.as_ref(),
                Expr::TryCast(c) if fine_time(c.field.data_type()) => e = c.expr.as_ref(),
                Expr::Column(c) => return c.name == "time",
                _ => return false,
            }
        }
    };
    let (op, literal) = if is_time(left) {
        (*op, right.as_ref())
    } else if is_time(right) {
        (op.swap()?, left.as_ref())
    } else {
        return None;
    };
    let Expr::Literal(value, _) = literal else {
        return None;
    };
    let ns = match value {
        ScalarValue::TimestampNanosecond(Some(v), _) => *v,
        ScalarValue::TimestampMicrosecond(Some(v), _) => v.checked_mul(1_000)?,
        ScalarValue::TimestampMillisecond(Some(v), _) => v.checked_mul(1_000_000)?,
        ScalarValue::TimestampSecond(Some(v), _) => v.checked_mul(1_000_000_000)?,
        _ => return None,
    };
    Some((op, ns))
}

#[cfg(test)]
mod tests {
    use super::*;

    use fleetlake_aggregate::location::LakeLocation;

    use crate::engine::QueryEngine;

    async fn shape(sql: &str) -> Shape {
        let dir = tempfile::tempdir().unwrap();
        let engine = QueryEngine::new(LakeLocation::local(dir.path()).unwrap(), None);
        engine.shape(sql).await.unwrap()
    }

    async fn leaves(sql: &str) -> Vec<Leaf> {
        match shape(sql).await {
            Shape::Incremental(leaves) => leaves,
            other => panic!("{sql}: {other}"),
        }
    }

    fn minutes(m: u64) -> Duration {
        Duration::from_secs(60 * m)
    }

    fn routes(leaf: &Leaf) -> Vec<(&str, Vec<&str>)> {
        leaf.routes
            .iter()
            .map(|(c, v)| (c.as_str(), v.iter().map(String::as_str).collect()))
            .collect()
    }

    #[tokio::test]
    async fn the_shipped_rules_are_incremental() {
        // LambdaThrottled.
        let leaf = &leaves(
            "SELECT account_id, region, dimensions['FunctionName'] AS function, sum(sum) AS value \
             FROM metrics WHERE namespace = 'AWS/Lambda' AND metric_name = 'Throttles' \
               AND time > now() - INTERVAL '5 minutes' \
             GROUP BY account_id, region, dimensions['FunctionName'] HAVING sum(sum) > 10",
        )
        .await[0];
        assert_eq!(leaf.table, Table::Metrics);
        assert_eq!(
            leaf.window,
            Window {
                from: minutes(5),
                from_inclusive: false,
                to: None,
                to_inclusive: false
            }
        );
        assert_eq!(leaf.group_by.len(), 3, "{leaf}");
        assert_eq!(leaf.aggregates.len(), 1, "{leaf}");
        assert!(leaf.aggregates[0].starts_with("sum("), "{leaf}");
        assert_eq!(
            routes(leaf),
            [
                ("namespace", vec!["AWS/Lambda"]),
                ("metric_name", vec!["Throttles"])
            ]
        );

        // LambdaErrorRateHigh: sums of CASE in a subquery, a ratio and a filter above.
        let leaf = &leaves(
            "SELECT account_id, region, function, errors / invocations AS value FROM ( \
               SELECT account_id, region, dimensions['FunctionName'] AS function, \
                      sum(CASE WHEN metric_name = 'Errors' THEN sum END) AS errors, \
                      sum(CASE WHEN metric_name = 'Invocations' THEN sum END) AS invocations \
               FROM metrics \
               WHERE namespace = 'AWS/Lambda' AND metric_name IN ('Errors', 'Invocations') \
                 AND cardinality(dimensions) = 1 AND dimensions['FunctionName'] IS NOT NULL \
                 AND time > now() - INTERVAL '5 minutes' \
               GROUP BY account_id, region, dimensions['FunctionName']) \
             WHERE invocations >= 20 AND errors / invocations > 0.05",
        )
        .await[0];
        assert_eq!(leaf.window.from, minutes(5));
        assert_eq!(leaf.aggregates.len(), 2, "{leaf}");
        assert!(
            routes(leaf).contains(&("metric_name", vec!["Errors", "Invocations"])),
            "{leaf}"
        );

        // LogErrorBurst: count(*) of logs matching patterns.
        let leaf = &leaves(
            "SELECT account_id, region, log_group, count(*) AS value FROM logs \
             WHERE time > now() - INTERVAL '5 minutes' \
               AND (message LIKE '%ERROR%' OR message LIKE '%Exception%') \
             GROUP BY account_id, region, log_group HAVING count(*) > 100",
        )
        .await[0];
        assert_eq!(leaf.table, Table::Logs);
        assert!(leaf.routes.is_empty(), "{leaf}");
        assert!(leaf.filters.iter().any(|f| f.contains("ERROR")), "{leaf}");

        // Absence: last seen per account over a day, joined with accounts above.
        let leaf = &leaves(
            "SELECT a.account_id, \
                    coalesce(extract(epoch FROM now()) - extract(epoch FROM seen.last_seen), 86400.0) AS value \
             FROM (VALUES ('111111111111')) a(account_id) \
             LEFT JOIN (SELECT account_id, max(time) AS last_seen FROM metrics \
                        WHERE time > now() - INTERVAL '1 day' GROUP BY account_id) seen \
               ON seen.account_id = a.account_id \
             WHERE seen.last_seen IS NULL OR seen.last_seen < now() - INTERVAL '15 minutes'",
        )
        .await[0];
        assert_eq!(leaf.window.from, Duration::from_secs(86_400));
        assert!(leaf.aggregates[0].starts_with("max("), "{leaf}");
    }

    #[tokio::test]
    async fn windows_bounded_on_both_sides_and_two_reads() {
        let all = leaves(
            "SELECT e.account_id, e.n / l.n AS value FROM \
               (SELECT account_id, count(*) AS n FROM metrics \
                WHERE time >= now() - INTERVAL '10 minutes' AND time < now() - INTERVAL '1 minute' \
                GROUP BY account_id) e \
             JOIN (SELECT account_id, count(*) AS n FROM logs \
                   WHERE now() - INTERVAL '1 hour' < time GROUP BY account_id) l \
             ON e.account_id = l.account_id",
        )
        .await;
        assert_eq!(all.len(), 2, "{all:?}");
        let metrics = all.iter().find(|l| l.table == Table::Metrics).unwrap();
        assert_eq!(
            metrics.window,
            Window {
                from: minutes(10),
                from_inclusive: true,
                to: Some(minutes(1)),
                to_inclusive: false
            }
        );
        assert_eq!(metrics.window.to_string(), "[now - 10m, now - 1m)");
        let logs = all.iter().find(|l| l.table == Table::Logs).unwrap();
        assert_eq!(logs.window.from, minutes(60));
        assert!(!logs.window.from_inclusive);
    }

    #[tokio::test]
    async fn what_is_not_incremental_says_why() {
        for (sql, path, why) in [
            (
                "SELECT account_id, median(max) AS value FROM metrics \
                 WHERE time > now() - INTERVAL '15 minutes' GROUP BY account_id",
                "window of 15m",
                "median has no partial state",
            ),
            (
                "SELECT account_id, max AS value FROM metrics \
                 WHERE time > now() - INTERVAL '5 minutes' AND max > 100",
                "window of 5m",
                "without aggregating",
            ),
            (
                "SELECT account_id, \
                        sum(CASE WHEN time > now() - INTERVAL '1 minute' THEN sum END) AS value \
                 FROM metrics WHERE time > now() - INTERVAL '5 minutes' GROUP BY account_id",
                "window of 5m",
                "change with the time",
            ),
            (
                "SELECT account_id, sum(sum) AS value FROM metrics GROUP BY account_id",
                "lake",
                "without a window",
            ),
            // A month back is 31 days in January, 30 in May: not one window.
            (
                "SELECT account_id, sum(sum) AS value FROM metrics \
                 WHERE time > now() - INTERVAL '1 month' GROUP BY account_id",
                "lake",
                "calendar",
            ),
            // The same at two instants a day apart, not in another month.
            (
                "SELECT account_id, sum(sum) AS value FROM metrics \
                 WHERE time > now() - INTERVAL '5 minutes' GROUP BY account_id \
                 HAVING extract(month FROM now()) = 1",
                "lake",
                "calendar",
            ),
            // A coarser cast compares truncated times.
            (
                "SELECT account_id, sum(sum) AS value FROM metrics \
                 WHERE CAST(time AS TIMESTAMP(0)) > now() - INTERVAL '5 minutes' GROUP BY account_id",
                "lake",
                "other than as a window bound",
            ),
            (
                "SELECT account_id, sum(sum) AS value FROM metrics \
                 WHERE day = current_date GROUP BY account_id",
                "lake",
                "other than as a window bound",
            ),
            (
                "SELECT account_id, sum(sum) AS value FROM metrics \
                 WHERE time > date_trunc('hour', now()) GROUP BY account_id",
                "lake",
                "other than as a window bound",
            ),
            (
                "SELECT account_id, sum(sum) AS value FROM metrics \
                 WHERE time > now() + INTERVAL '1 minute' GROUP BY account_id",
                "lake",
                "after now()",
            ),
        ] {
            let shape = shape(sql).await.to_string();
            assert!(
                shape.starts_with(path) && shape.contains(why),
                "{sql}: {shape}"
            );
        }
        assert_eq!(shape("SELECT 1.0 AS value").await, Shape::NoRows);
        // A volatile filter is never taken for a row predicate of a leaf.
        let volatile = shape(
            "SELECT account_id, sum(sum) AS value FROM metrics \
             WHERE time > now() - INTERVAL '5 minutes' AND random() < 0.5 GROUP BY account_id",
        )
        .await;
        assert!(!matches!(volatile, Shape::Incremental(_)), "{volatile}");
    }
}
