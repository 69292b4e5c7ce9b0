//! Sessions over the lake's tables plus the hot buffer, per caller and within limits.
//!
//! A session's `fleetlake.public` schema resolves each table when a statement is
//! planned: the latest lake version of it, plus the hot rows not in that version. So
//! one session (a Postgres connection) always reads fresh data, and every table a
//! statement reads is one consistent version. A caller limited to some accounts gets
//! each table through an [`AccountFilter`].

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::{MemTable, SchemaProvider, TableProvider};
use datafusion::common::TableReference;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::config::ConfigOptions;
use datafusion::error::DataFusionError;
use datafusion::execution::context::SQLOptions;
use datafusion::execution::memory_pool::{MemoryPool, MemoryReservation};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::execution::{SendableRecordBatchStream, SessionState, TaskContext};
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::coop::CooperativeExec;
use datafusion::physical_plan::execute_stream;
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::sqlparser::ast::{
    Expr as SqlExpr, FunctionArguments, ObjectName, visit_expressions,
};
use deltalake::DeltaTable;
use fleetlake_aggregate::location::LakeLocation;
use fleetlake_aggregate::rollup::{Rollup, rollup_sql};
use fleetlake_model::ErrorKind;
use fleetlake_model::schema::{Table, conform};
use futures::StreamExt;

use crate::access::Principal;
use crate::guard::{TextLimits, TooComplex, check_plan, check_text};
use crate::limits::{Admission, Busy, Permits, StatementPool, shared_pool};
use crate::table::{ACCOUNT_COLUMN, AccountFilter, LakeWithHot};

/// The catalog every session uses by default (also the Postgres database name).
pub const CATALOG: &str = "fleetlake";
/// The schema holding the lake's tables.
pub const SCHEMA: &str = "public";

/// A table besides the lake's own (`accounts`, `alerts`), named in
/// [`QueryEngine::with_table`].
#[derive(Clone)]
pub enum SideTable {
    /// Rows made when a statement is planned (the account registry's current state):
    /// the columns they always have, then the rows, whose schema may add columns
    /// after those (seen by unrestricted callers only).
    Rows(SchemaRef, Arc<dyn Fn() -> RecordBatch + Send + Sync>),
    /// A Delta table of the lake under this name: empty, with this schema, until it
    /// exists.
    Lake(SchemaRef),
}

impl SideTable {
    fn schema(&self) -> &SchemaRef {
        match self {
            Self::Rows(schema, _) | Self::Lake(schema) => schema,
        }
    }
}

impl std::fmt::Debug for SideTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Rows(schema, _) => write!(f, "Rows({} columns)", schema.fields().len()),
            Self::Lake(schema) => write!(f, "Lake({} columns)", schema.fields().len()),
        }
    }
}

/// Rows held in memory by the aggregate stage, not yet in the lake.
pub trait HotData: Send + Sync + 'static {
    /// The rows of `table` that a query reading lake version `lake_version` of it must
    /// add to what it reads from the lake.
    fn snapshot(&self, table: Table, lake_version: Option<i64>) -> Vec<RecordBatch>;

    /// As [`HotData::snapshot`], `None` while that cannot be told yet (a flush
    /// committing while other writers may commit too): asked again a moment later.
    fn snapshot_settled(
        &self,
        table: Table,
        lake_version: Option<i64>,
    ) -> Option<Vec<RecordBatch>> {
        Some(self.snapshot(table, lake_version))
    }
}

/// How long a query waits for a committing flush to say which version it landed as
/// before it takes the hot rows as if that version were the flush's.
const SETTLE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// What one query, and all of them together, may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueryLimits {
    /// Memory one statement may hold: its operators (sorts and joins spill or fail
    /// past it), its results until sent, and values of amplifying functions.
    pub memory_limit: Option<usize>,
    /// Memory all statements of clients together may hold (one pool for the process).
    pub memory_pool: Option<usize>,
    /// Longest a query may run, results included.
    pub timeout: Option<Duration>,
    /// Statements of clients running at once, overall.
    pub max_concurrent: usize,
    /// Statements running at once per user.
    pub max_concurrent_per_user: usize,
    /// Bounds on a statement's text, checked before it is parsed.
    pub text: TextLimits,
}

impl Default for QueryLimits {
    fn default() -> Self {
        Self {
            memory_limit: Some(2 << 30),
            memory_pool: Some(4 << 30),
            timeout: Some(Duration::from_secs(120)),
            max_concurrent: 32,
            max_concurrent_per_user: 8,
            text: TextLimits::default(),
        }
    }
}

/// Why a query failed. [`QueryError::kind`] classifies it, once: the HTTP status,
/// the Postgres SQLSTATE and the `status` label of the query counters all come from
/// the kind.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The SQL is invalid or failed while running (classified by the error's
    /// structure: see [`kind_of`]).
    #[error("{0}")]
    Sql(#[source] Box<DataFusionError>),
    /// Planning failed on a name the caller's catalog does not hold: a table
    /// ([`ErrorKind::UndefinedTable`]) or a function
    /// ([`ErrorKind::UndefinedFunction`]), found by resolving the statement's names
    /// before it was planned. The message is the planner's.
    #[error("{1}")]
    Undefined(ErrorKind, #[source] Box<DataFusionError>),
    /// The query ran past its time limit.
    #[error("canceling statement due to statement timeout ({0:?})")]
    Timeout(Duration),
    /// The client canceled the statement.
    #[error("canceling statement due to user request")]
    Canceled,
    /// The lake has no tables (nothing was ever ingested into this data directory).
    #[error("no lake tables under {0}: start `fleetlake serve` with this data directory first")]
    NoTable(String),
    /// The lake could not be read.
    #[error("lake unavailable: {0}")]
    Lake(String),
    /// The statement is too long or too deep to plan.
    #[error("{0}")]
    TooComplex(#[from] TooComplex),
    /// The statement is not allowed: why (a write, a setting, a privilege), and the
    /// message.
    #[error("{1}")]
    Refused(ErrorKind, String),
    /// Too many statements are running.
    #[error("{0}")]
    Busy(#[from] Busy),
}

impl QueryError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Sql(e) => kind_of(e),
            Self::Undefined(kind, _) | Self::Refused(kind, _) => *kind,
            Self::Timeout(_) => ErrorKind::Timeout,
            Self::Canceled => ErrorKind::Canceled,
            Self::NoTable(_) | Self::Lake(_) => ErrorKind::Unavailable,
            Self::TooComplex(_) => ErrorKind::TooComplex,
            Self::Busy(_) => ErrorKind::Busy,
        }
    }

    /// Whether the failure is the query's fault rather than the service's.
    pub fn is_user_error(&self) -> bool {
        self.kind().is_user_error()
    }
}

/// What kind of failure a DataFusion error is, from its structure (the innermost
/// DataFusion error of its chain).
pub fn kind_of(error: &DataFusionError) -> ErrorKind {
    use datafusion::common::SchemaError;
    use datafusion::sql::sqlparser::parser::ParserError;
    match error.find_root() {
        DataFusionError::SQL(e, _) if matches!(**e, ParserError::RecursionLimitExceeded) => {
            ErrorKind::TooComplex
        }
        DataFusionError::SQL(..) => ErrorKind::Syntax,
        DataFusionError::SchemaError(e, _) => match e.as_ref() {
            SchemaError::FieldNotFound { .. } => ErrorKind::UndefinedColumn,
            SchemaError::AmbiguousReference { .. } => ErrorKind::AmbiguousColumn,
            _ => ErrorKind::Mismatch,
        },
        DataFusionError::Plan(_) => ErrorKind::Mismatch,
        DataFusionError::NotImplemented(_) => ErrorKind::Unsupported,
        DataFusionError::ResourcesExhausted(_) => ErrorKind::OutOfMemory,
        DataFusionError::Execution(_) | DataFusionError::ArrowError(..) => ErrorKind::Data,
        DataFusionError::IoError(_)
        | DataFusionError::ObjectStore(_)
        | DataFusionError::ParquetError(_) => ErrorKind::Unavailable,
        // A table of the lake that could not be resolved (see `LakeSchema::table`).
        DataFusionError::External(e) => match e.downcast_ref::<QueryError>() {
            Some(error) => error.kind(),
            None => ErrorKind::Internal,
        },
        _ => ErrorKind::Internal,
    }
}

/// Plans `statement` in `state`.
///
/// The tables and functions it names are resolved first, against the caller's
/// catalog as DataFusion resolves them: if planning then fails on one the catalog
/// does not hold, the error is [`QueryError::Undefined`] with the planner's message.
/// A table hidden from a caller limited to some accounts is not in its catalog, so it
/// fails exactly as a table that does not exist.
pub async fn plan_statement(
    state: &SessionState,
    statement: DfStatement,
) -> Result<LogicalPlan, QueryError> {
    let undefined = undefined_name(state, &statement);
    state
        .statement_to_plan(statement)
        .await
        .map_err(|e| match undefined {
            Some(kind) if matches!(e.find_root(), DataFusionError::Plan(_)) => {
                QueryError::Undefined(kind, Box::new(e))
            }
            _ => QueryError::Sql(Box::new(e)),
        })
}

/// Parses `sql` (one statement) as the session's dialect and plans it read-only: a
/// statement that would write is refused ([`ErrorKind::ReadOnly`]).
pub async fn plan_read_only(state: &SessionState, sql: &str) -> Result<LogicalPlan, QueryError> {
    let dialect = state.config().options().sql_parser.dialect;
    let statement = state
        .sql_to_statement(sql, &dialect)
        .map_err(|e| QueryError::Sql(Box::new(e)))?;
    let plan = plan_statement(state, statement).await?;
    verify_read_only(&plan)?;
    Ok(plan)
}

/// Refuses a plan that would write (DDL, DML, `SET` of the engine).
pub fn verify_read_only(plan: &LogicalPlan) -> Result<(), QueryError> {
    read_only()
        .verify_plan(plan)
        .map_err(|e| QueryError::Refused(ErrorKind::ReadOnly, e.to_string()))
}

/// The kind of the first name of `statement` the session cannot resolve: a table
/// (or view) not in its catalog, else a function it has not registered.
fn undefined_name(state: &SessionState, statement: &DfStatement) -> Option<ErrorKind> {
    let references = state.resolve_table_references(statement).ok()?;
    let defaults = &state.config().options().catalog;
    let table_missing = references.into_iter().any(|reference| {
        let resolved = reference.resolve(&defaults.default_catalog, &defaults.default_schema);
        // A table function (`generate_series(...)`) is a relation too.
        !state
            .table_functions()
            .contains_key(resolved.table.as_ref())
            && !state
                .schema_for_ref(TableReference::full(
                    Arc::clone(&resolved.catalog),
                    Arc::clone(&resolved.schema),
                    Arc::clone(&resolved.table),
                ))
                .is_ok_and(|schema| schema.table_exist(&resolved.table))
    });
    if table_missing {
        return Some(ErrorKind::UndefinedTable);
    }
    let DfStatement::Statement(statement) = statement else {
        return None;
    };
    let normalize = state
        .config()
        .options()
        .sql_parser
        .enable_ident_normalization;
    let unknown = visit_expressions(statement.as_ref(), |expr| match expr {
        SqlExpr::Function(function)
            if !matches!(function.args, FunctionArguments::None)
                && !is_function(state, &function.name, normalize) =>
        {
            ControlFlow::Break(())
        }
        _ => ControlFlow::Continue(()),
    });
    unknown.is_break().then_some(ErrorKind::UndefinedFunction)
}

/// Whether the session has a function of `name`, looked up as DataFusion's planner
/// does: a compound name as written, a simple one normalized.
fn is_function(state: &SessionState, name: &ObjectName, normalize: bool) -> bool {
    let name = match name.0.as_slice() {
        [part] => match part.as_ident() {
            Some(ident) if ident.quote_style.is_none() && normalize => {
                ident.value.to_ascii_lowercase()
            }
            Some(ident) => ident.value.clone(),
            None => return true,
        },
        _ => name.to_string(),
    };
    // Planned by the SQL planner itself, not looked up.
    matches!(
        name.as_str(),
        "unnest" | "unnest_outer" | "make_map" | "map"
    ) || state.scalar_functions().contains_key(&name)
        || state.aggregate_functions().contains_key(&name)
        || state.window_functions().contains_key(&name)
        || state.higher_order_functions().contains_key(&name)
}

/// A query's result.
#[derive(Debug)]
pub struct QueryOutput {
    /// Schema of the result.
    pub schema: SchemaRef,
    /// Rows of the result.
    pub batches: Vec<RecordBatch>,
    /// The result's memory, counted against the statement's limit until dropped.
    reservation: MemoryReservation,
}

impl QueryOutput {
    /// Counts `bytes` more of this result (its rendering) against the statement's
    /// limit.
    pub fn reserve(&mut self, bytes: usize) -> Result<(), QueryError> {
        self.reservation
            .try_grow(bytes)
            .map_err(|e| QueryError::Sql(Box::new(e)))
    }
}

/// A statement let in: its places under the caps on concurrent statements and its
/// memory pool. Dropped when its last row was sent.
#[derive(Debug)]
pub struct Admitted {
    _permits: Option<Permits>,
    pool: Arc<StatementPool>,
}

impl Admitted {
    /// The statement's memory pool.
    pub fn pool(&self) -> &Arc<StatementPool> {
        &self.pool
    }
}

/// Runs read-only SQL over the lake, plus hot rows if given.
#[derive(Debug)]
pub struct QueryEngine {
    lake: Arc<Lake>,
    side: Arc<Vec<(&'static str, SideTable)>>,
    limits: QueryLimits,
    /// The memory of clients' statements, all together.
    pool: Arc<dyn MemoryPool>,
    admission: Arc<Admission>,
}

/// The lake's tables, reloaded as queries need them.
struct Lake {
    location: LakeLocation,
    hot: Option<Arc<dyn HotData>>,
    tables: tokio::sync::Mutex<HashMap<&'static str, DeltaTable>>,
    seen: AtomicBool,
}

impl std::fmt::Debug for Lake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lake")
            .field("location", &self.location.to_string())
            .field("hot", &self.hot.is_some())
            .finish()
    }
}

impl Lake {
    /// Table `table` at its latest version, or `None` if the lake does not have it.
    async fn latest(&self, table: &'static str) -> Result<Option<DeltaTable>, QueryError> {
        let mut cached = self.tables.lock().await;
        if let Some(delta) = cached.get_mut(table) {
            delta
                .load()
                .await
                .map_err(|e| QueryError::Lake(e.to_string()))?;
            return Ok(Some(delta.clone()));
        }
        let Some(delta) = self
            .location
            .open(table)
            .await
            .map_err(|e| QueryError::Lake(e.to_string()))?
        else {
            return Ok(None);
        };
        self.seen.store(true, Ordering::Relaxed);
        cached.insert(table, delta.clone());
        Ok(Some(delta))
    }

    /// Lake table `name` at its latest version with the hot rows it lacks; while the
    /// lake does not have it yet, an empty table of `schema` (plus hot rows).
    async fn provider(
        &self,
        name: &'static str,
        schema: SchemaRef,
        hot_of: Option<Table>,
    ) -> Result<Arc<dyn TableProvider>, QueryError> {
        let delta = self.latest(name).await?;
        let lake: Arc<dyn TableProvider> = match &delta {
            Some(delta) => delta
                .table_provider()
                .await
                .map_err(|e| QueryError::Lake(e.to_string()))?,
            None => Arc::new(
                MemTable::try_new(schema, vec![Vec::new()])
                    .map_err(|e| QueryError::Sql(Box::new(e)))?,
            ),
        };
        let schema = lake.schema();
        let version = delta.as_ref().and_then(|d| d.version()).map(|v| v as i64);
        let hot = match (&self.hot, hot_of) {
            (Some(hot), Some(table)) => settled_snapshot(hot.as_ref(), table, version)
                .await
                .iter()
                .map(|batch| conform(batch, &schema))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| QueryError::Lake(format!("hot buffer rows of {table}: {e}")))?,
            _ => Vec::new(),
        };
        Ok(Arc::new(LakeWithHot::new(delta, lake, hot)))
    }
}

/// The hot rows of `table` a reader of `version` adds, once the hot data can tell
/// (see [`HotData::snapshot_settled`]; a flush's commit ends within moments), or after
/// [`SETTLE_WAIT`] as the single-writer rule has them.
async fn settled_snapshot(
    hot: &dyn HotData,
    table: Table,
    version: Option<i64>,
) -> Vec<RecordBatch> {
    let waited = std::time::Instant::now();
    loop {
        if let Some(rows) = hot.snapshot_settled(table, version) {
            return rows;
        }
        if waited.elapsed() > SETTLE_WAIT {
            tracing::warn!(%table, ?version, "a flush's commit did not land within {SETTLE_WAIT:?}; hot rows taken as if this version held it");
            return hot.snapshot(table, version);
        }
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}

/// Makes joins (and unnest) yield to the runtime between output batches.
///
/// A join can make millions of batches out of one input batch without ever returning
/// `Pending`; a cross join under a filter that keeps nothing then spins in one poll.
/// Such a query could not be timed out or canceled, and it would hold the runtime's
/// threads, so even a cancel request could not be accepted. Wrapped in
/// `CooperativeExec`, each output batch spends Tokio's task budget instead.
#[derive(Debug)]
struct YieldingJoins;

impl PhysicalOptimizerRule for YieldingJoins {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        plan.transform_up(|node| {
            let name = node.name();
            if name.contains("Join") || name == "UnnestExec" {
                Ok(Transformed::yes(
                    Arc::new(CooperativeExec::new(node)) as Arc<dyn ExecutionPlan>
                ))
            } else {
                Ok(Transformed::no(node))
            }
        })
        .map(|t| t.data)
    }

    fn name(&self) -> &str {
        "fleetlake_yielding_joins"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// What a table name in `fleetlake.public` stands for.
#[derive(Debug, Clone, Copy)]
enum Entry {
    Table(Table),
    Partials(Rollup),
    Rollup(Rollup),
    /// Index into the engine's side tables.
    Side(usize),
}

impl Entry {
    fn all(side: &[(&'static str, SideTable)]) -> Vec<(String, Entry)> {
        let mut all: Vec<(String, Entry)> = Table::ALL
            .iter()
            .map(|t| (t.name().to_string(), Entry::Table(*t)))
            .collect();
        for rollup in Rollup::ALL {
            all.push((rollup.name().to_string(), Entry::Rollup(rollup)));
            all.push((partials_name(rollup), Entry::Partials(rollup)));
        }
        for (i, (name, _)) in side.iter().enumerate() {
            all.push((name.to_string(), Entry::Side(i)));
        }
        all
    }

    fn has_accounts(self, side: &[(&'static str, SideTable)]) -> bool {
        match self {
            Entry::Table(table) => table.schema().column_with_name(ACCOUNT_COLUMN).is_some(),
            Entry::Partials(_) | Entry::Rollup(_) => true,
            Entry::Side(i) => side[i]
                .1
                .schema()
                .column_with_name(ACCOUNT_COLUMN)
                .is_some(),
        }
    }
}

fn partials_name(rollup: Rollup) -> String {
    format!("{}_partials", rollup.name())
}

/// `fleetlake.public` as one caller sees it.
#[derive(Debug)]
struct LakeSchema {
    lake: Arc<Lake>,
    side: Arc<Vec<(&'static str, SideTable)>>,
    principal: Principal,
}

impl LakeSchema {
    fn entries(&self) -> Vec<(String, Entry)> {
        Entry::all(&self.side)
            .into_iter()
            .filter(|(_, e)| self.principal.accounts.is_none() || e.has_accounts(&self.side))
            .collect()
    }

    /// `provider` as this caller may see it.
    fn scoped(&self, provider: Arc<dyn TableProvider>) -> Option<Arc<dyn TableProvider>> {
        match &self.principal.accounts {
            None => Some(provider),
            Some(accounts) => AccountFilter::new(provider, Arc::clone(accounts))
                .map(|f| Arc::new(f) as Arc<dyn TableProvider>),
        }
    }

    async fn resolve(&self, entry: Entry) -> Result<Option<Arc<dyn TableProvider>>, QueryError> {
        let provider = match entry {
            Entry::Table(table) => Some(
                self.lake
                    .provider(table.name(), table.schema(), Some(table))
                    .await?,
            ),
            Entry::Partials(rollup) | Entry::Rollup(rollup) => Some(
                self.lake
                    .provider(rollup.name(), Table::Metrics.schema(), None)
                    .await?,
            ),
            Entry::Side(i) => match &self.side[i] {
                (name, SideTable::Lake(schema)) => {
                    Some(self.lake.provider(name, Arc::clone(schema), None).await?)
                }
                (_, SideTable::Rows(declared, rows)) => {
                    // The rows' own schema: the declared columns and any more they
                    // have now (the registry's extra fields). A caller limited to
                    // some accounts sees the declared ones only: what else an
                    // operator keeps about an account is not the tenant's to read.
                    let mut batch = rows();
                    if self.principal.accounts.is_some() {
                        let declared: Vec<usize> = (0..declared.fields().len()).collect();
                        batch = batch
                            .project(&declared)
                            .map_err(|e| QueryError::Sql(Box::new(e.into())))?;
                    }
                    let table = MemTable::try_new(batch.schema(), vec![vec![batch]])
                        .map_err(|e| QueryError::Sql(Box::new(e)))?;
                    Some(Arc::new(table) as Arc<dyn TableProvider>)
                }
            },
        };
        let Some(provider) = provider.and_then(|p| self.scoped(p)) else {
            return Ok(None);
        };
        let Entry::Rollup(rollup) = entry else {
            return Ok(Some(provider));
        };
        // The Delta table holds partial rows per bucket until compacted; the SQL table
        // is a view merging them.
        let sql_err = |e| QueryError::Sql(Box::new(e));
        let planner = SessionContext::new();
        fleetlake_aggregate::rollup::register(&planner);
        let partials = partials_name(rollup);
        planner
            .register_table(partials.as_str(), provider)
            .map_err(sql_err)?;
        let merged = planner
            .sql(&rollup_sql(&partials, rollup))
            .await
            .map_err(sql_err)?;
        Ok(Some(merged.into_view()))
    }
}

#[async_trait]
impl SchemaProvider for LakeSchema {
    fn table_names(&self) -> Vec<String> {
        self.entries().into_iter().map(|(name, _)| name).collect()
    }

    async fn table(&self, name: &str) -> datafusion::error::Result<Option<Arc<dyn TableProvider>>> {
        let Some((_, entry)) = self.entries().into_iter().find(|(n, _)| n == name) else {
            return Ok(None);
        };
        self.resolve(entry).await.map_err(|e| match e {
            QueryError::Sql(e) => *e,
            other => DataFusionError::External(Box::new(other)),
        })
    }

    fn table_exist(&self, name: &str) -> bool {
        self.entries().iter().any(|(n, _)| n == name)
    }
}

impl QueryEngine {
    /// An engine over `lake`; `hot` adds rows not yet committed.
    pub fn new(lake: LakeLocation, hot: Option<Arc<dyn HotData>>) -> Self {
        Self {
            lake: Arc::new(Lake {
                location: lake,
                hot,
                tables: tokio::sync::Mutex::new(HashMap::new()),
                seen: AtomicBool::new(false),
            }),
            side: Arc::new(Vec::new()),
            limits: QueryLimits::default(),
            pool: shared_pool(QueryLimits::default().memory_pool),
            admission: Arc::new(Admission::new(
                QueryLimits::default().max_concurrent,
                QueryLimits::default().max_concurrent_per_user,
            )),
        }
    }

    /// The same engine with one more table, `name`, in every session; a caller limited
    /// to some accounts sees it filtered on `account_id` (or not at all if it has no
    /// such column).
    pub fn with_table(mut self, name: &'static str, table: SideTable) -> Self {
        let mut side = self.side.as_ref().clone();
        side.retain(|(n, _)| *n != name);
        side.push((name, table));
        self.side = Arc::new(side);
        self
    }

    /// The rows side table `name` holds now, as an unrestricted caller reads them;
    /// `None` unless it is made of rows ([`SideTable::Rows`]).
    pub fn side_rows(&self, name: &str) -> Option<RecordBatch> {
        self.side.iter().find_map(|(n, table)| match table {
            SideTable::Rows(_, rows) if *n == name => Some(rows()),
            _ => None,
        })
    }

    /// The same engine with `limits` for every query.
    pub fn with_limits(mut self, limits: QueryLimits) -> Self {
        self.limits = limits;
        self.pool = shared_pool(limits.memory_pool);
        self.admission = Arc::new(Admission::new(
            limits.max_concurrent,
            limits.max_concurrent_per_user,
        ));
        self
    }

    /// Refuses `sql` if it is too long or may nest too deep to plan safely.
    pub fn check_text(&self, sql: &str) -> Result<(), QueryError> {
        Ok(check_text(sql, self.limits.text)?)
    }

    /// Lets one statement of a client (HTTP, Postgres) in, within the caps on
    /// statements running at once, with its memory from the shared pool; fails at once
    /// past a cap.
    pub fn admit(&self, principal: &Principal) -> Result<Admitted, QueryError> {
        let permits = self.admission.admit(&principal.name)?;
        Ok(Admitted {
            _permits: Some(permits),
            pool: StatementPool::new(Arc::clone(&self.pool), self.statement_limit()),
        })
    }

    /// A statement of the service itself (alert rules, gap fill, the CLI): the
    /// per-statement limit, outside the clients' caps and pool.
    pub(crate) fn internal(&self) -> Admitted {
        Admitted {
            _permits: None,
            pool: StatementPool::new(shared_pool(None), self.statement_limit()),
        }
    }

    fn statement_limit(&self) -> Option<usize> {
        match (self.limits.memory_limit, self.limits.memory_pool) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Runs `plan`, planned in `state` for `principal`, with the statement's memory
    /// from `admitted`: the schema of its result and its rows as they come.
    pub async fn execute(
        &self,
        state: &SessionState,
        plan: LogicalPlan,
        principal: &Principal,
        admitted: &Admitted,
    ) -> Result<(SchemaRef, SendableRecordBatchStream), QueryError> {
        check_plan(&plan, principal.accounts.is_some())
            .map_err(|(kind, message)| QueryError::Refused(kind, message))?;
        let sql_err = |e| QueryError::Sql(Box::new(e));
        let schema: SchemaRef = Arc::new(plan.schema().as_arrow().clone());
        let physical = state.create_physical_plan(&plan).await.map_err(sql_err)?;
        let runtime = RuntimeEnvBuilder::from_runtime_env(state.runtime_env())
            .with_memory_pool(Arc::clone(&admitted.pool) as Arc<dyn MemoryPool>)
            .build_arc()
            .map_err(sql_err)?;
        let task = Arc::new(TaskContext::from(state).with_runtime(runtime));
        let stream = execute_stream(physical, task).map_err(sql_err)?;
        Ok((schema, stream))
    }

    /// The limits every query runs under.
    pub fn limits(&self) -> QueryLimits {
        self.limits
    }

    /// A session for `principal`: the lake's tables as it may see them, and the
    /// memory limit. Tables resolve to their latest version when a statement is
    /// planned, so a session can be kept (one per Postgres connection).
    pub fn session(&self, principal: &Principal) -> Result<SessionContext, QueryError> {
        let config = SessionConfig::new()
            .with_information_schema(true)
            .with_default_catalog_and_schema(CATALOG, SCHEMA);
        // Statements run with a runtime of their own: see `execute`.
        let runtime = RuntimeEnvBuilder::new()
            .build_arc()
            .map_err(|e| QueryError::Sql(Box::new(e)))?;
        let state = SessionStateBuilder::new()
            .with_config(config)
            .with_runtime_env(runtime)
            .with_default_features()
            .with_physical_optimizer_rule(Arc::new(YieldingJoins))
            .build();
        let ctx = SessionContext::new_with_state(state);
        let catalog = ctx
            .catalog(CATALOG)
            .ok_or_else(|| QueryError::Lake(format!("no catalog {CATALOG}")))?;
        catalog
            .register_schema(
                SCHEMA,
                Arc::new(LakeSchema {
                    lake: Arc::clone(&self.lake),
                    side: Arc::clone(&self.side),
                    principal: principal.clone(),
                }),
            )
            .map_err(|e| QueryError::Sql(Box::new(e)))?;
        fleetlake_aggregate::rollup::register(&ctx);
        if let Some(limit) = self.statement_limit() {
            crate::bounded::register(&ctx, limit);
        }
        Ok(ctx)
    }

    /// Lake table `table` at its latest version, if the lake has it.
    pub(crate) async fn lake_table(&self, table: Table) -> Result<Option<DeltaTable>, QueryError> {
        self.lake.latest(table.name()).await
    }

    /// Fails with [`QueryError::NoTable`] while the lake has no table at all.
    pub async fn require_lake(&self) -> Result<(), QueryError> {
        if self.lake.seen.load(Ordering::Relaxed) {
            return Ok(());
        }
        for table in Table::ALL {
            if self.lake.latest(table.name()).await?.is_some() {
                return Ok(());
            }
        }
        Err(QueryError::NoTable(self.lake.location.to_string()))
    }

    /// Plans one read-only SQL statement for `principal` without running it; the
    /// schema of its result. Tables the lake does not have yet plan as empty tables
    /// of their schema, so this checks SQL against the real schema on any lake.
    pub async fn plan(&self, sql: &str, principal: &Principal) -> Result<SchemaRef, QueryError> {
        self.check_text(sql)?;
        let ctx = self.session(principal)?;
        let plan = plan_read_only(&ctx.state(), sql).await?;
        Ok(Arc::new(plan.schema().as_arrow().clone()))
    }

    /// How `sql` reads the `metrics` and `logs` rows (see [`crate::shape`]), planned
    /// with full access.
    pub async fn shape(&self, sql: &str) -> Result<crate::shape::Shape, QueryError> {
        self.check_text(sql)?;
        let ctx = self.session(&Principal::unrestricted("shape"))?;
        let state = ctx.state();
        let plan = plan_read_only(&state, sql).await?;
        crate::shape::classify(&state, &plan).map_err(|e| QueryError::Sql(Box::new(e)))
    }

    /// Runs one read-only SQL statement for `principal`, within the limits; fails
    /// with [`QueryError::NoTable`] while the lake has no table at all (a data
    /// directory nothing was ever ingested into).
    pub async fn sql(&self, sql: &str, principal: &Principal) -> Result<QueryOutput, QueryError> {
        self.require_lake().await?;
        self.run(sql, principal).await
    }

    /// Runs one read-only SQL statement for `principal`, within the limits; tables
    /// the lake does not have yet read as empty. For the service's own statements:
    /// clients' go through [`QueryEngine::admit`] and [`QueryEngine::run_admitted`].
    pub async fn run(&self, sql: &str, principal: &Principal) -> Result<QueryOutput, QueryError> {
        let admitted = self.internal();
        self.run_admitted(sql, principal, &admitted).await
    }

    /// Runs one read-only SQL statement for `principal` as [`QueryEngine::run`] does,
    /// with the statement's clock pinned at `at_ms` (epoch ms): `now()`,
    /// `current_date` and `current_time` answer that instant, so statements
    /// evaluated "at" one instant (an alert round, `rules eval --at`) agree on it
    /// whatever the wall clock does while they run. The tables are read as they are
    /// now: this moves no data back in time.
    pub async fn run_at(
        &self,
        sql: &str,
        principal: &Principal,
        at_ms: i64,
    ) -> Result<QueryOutput, QueryError> {
        let at = sql_instant(at_ms)?;
        let admitted = self.internal();
        self.run_pinned(sql, principal, &admitted, Some(at)).await
    }

    /// Runs one read-only SQL statement for `principal` as `admitted`, results held
    /// in the statement's memory.
    pub async fn run_admitted(
        &self,
        sql: &str,
        principal: &Principal,
        admitted: &Admitted,
    ) -> Result<QueryOutput, QueryError> {
        self.run_pinned(sql, principal, admitted, None).await
    }

    /// [`QueryEngine::run_admitted`], with the statement's `now()` at `at` if given
    /// (else the time it is planned).
    async fn run_pinned(
        &self,
        sql: &str,
        principal: &Principal,
        admitted: &Admitted,
        at: Option<chrono::DateTime<chrono::Utc>>,
    ) -> Result<QueryOutput, QueryError> {
        self.check_text(sql)?;
        let ctx = self.session(principal)?;
        let sql_err = |e| QueryError::Sql(Box::new(e));
        let run = async {
            let mut state = ctx.state();
            if let Some(at) = at {
                pin(&mut state, at);
            }
            let plan = plan_read_only(&state, sql).await?;
            let (schema, mut stream) = self.execute(&state, plan, principal, admitted).await?;
            let reservation = admitted.pool.results();
            let mut batches = Vec::new();
            while let Some(batch) = stream.next().await {
                let batch = batch.map_err(sql_err)?;
                reservation
                    .try_grow(batch.get_array_memory_size())
                    .map_err(sql_err)?;
                batches.push(batch);
            }
            Ok(QueryOutput {
                schema,
                batches,
                reservation,
            })
        };
        match self.limits.timeout {
            Some(limit) => tokio::time::timeout(limit, run)
                .await
                .map_err(|_| QueryError::Timeout(limit))?,
            None => run.await,
        }
    }
}

/// `at_ms` (epoch ms) as an instant a statement's `now()` can be pinned at: SQL's
/// `now()` is a nanosecond timestamp, 1677-09-21 to 2262-04-11.
pub fn sql_instant(at_ms: i64) -> Result<chrono::DateTime<chrono::Utc>, QueryError> {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(at_ms)
        .filter(|at| at.timestamp_nanos_opt().is_some())
        .ok_or_else(|| {
            QueryError::Refused(
                ErrorKind::Data,
                format!(
                    "{at_ms} ms since the epoch is outside the times SQL can hold (1677-09-21 to 2262-04-11)"
                ),
            )
        })
}

/// Starts a statement in `state` whose `now()`, `current_date` and `current_time` are
/// `at` (and whose generated names start afresh).
pub(crate) fn pin(state: &mut SessionState, at: chrono::DateTime<chrono::Utc>) {
    state.mark_start_execution();
    state.execution_props_mut().query_execution_start_time = Some(at);
}

fn read_only() -> SQLOptions {
    SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine(dir: &tempfile::TempDir, limits: QueryLimits) -> QueryEngine {
        QueryEngine::new(LakeLocation::local(dir.path()).unwrap(), None).with_limits(limits)
    }

    async fn failure(engine: &QueryEngine, principal: &Principal, sql: &str) -> QueryError {
        match engine.run(sql, principal).await {
            Ok(output) => panic!("{sql}: answered {:?}", output.batches),
            Err(error) => error,
        }
    }

    #[tokio::test]
    async fn each_failure_has_the_kind_its_structure_says() {
        let dir = tempfile::tempdir().unwrap();
        let engine = engine(&dir, QueryLimits::default());
        let ops = Principal::unrestricted("ops");
        for (sql, kind, sqlstate) in [
            ("SELEC 1", ErrorKind::Syntax, "42601"),
            (
                "SELECT no_such_column FROM metrics",
                ErrorKind::UndefinedColumn,
                "42703",
            ),
            (
                "SELECT * FROM no_such_table",
                ErrorKind::UndefinedTable,
                "42P01",
            ),
            (
                "SELECT * FROM nosuch.metrics",
                ErrorKind::UndefinedTable,
                "42P01",
            ),
            (
                "SELECT no_such_function(value) FROM metrics",
                ErrorKind::UndefinedFunction,
                "42883",
            ),
            (
                "SELECT count(*) FROM (SELECT no_such_function(1) AS x) AS t",
                ErrorKind::UndefinedFunction,
                "42883",
            ),
            ("SELECT 1 / 0", ErrorKind::Data, "22000"),
            ("SELECT CAST('x' AS INT)", ErrorKind::Data, "22000"),
            ("SELECT 'a' + 1", ErrorKind::Mismatch, "42804"),
            ("CREATE TABLE t (a INT)", ErrorKind::ReadOnly, "25006"),
        ] {
            let error = failure(&engine, &ops, sql).await;
            assert_eq!(error.kind(), kind, "{sql}: {error}");
            assert_eq!(error.kind().sqlstate(), sqlstate, "{sql}");
            assert_eq!(error.kind().label(), kind.label(), "{sql}");
        }
        // Names that only look unknown to the catalog plan as usual.
        for sql in [
            "SELECT count(*) FROM generate_series(1, 3)",
            "WITH t AS (SELECT 1 AS a) SELECT a FROM t",
            "SELECT table_name FROM information_schema.tables",
            "SELECT row_number() OVER () FROM metrics",
        ] {
            engine.run(sql, &ops).await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_hidden_table_fails_as_one_that_does_not_exist() {
        let dir = tempfile::tempdir().unwrap();
        let engine = engine(&dir, QueryLimits::default());
        let tenant = Principal::limited_to("tenant", ["100000000001".to_string()]);
        let hidden = Table::ALL
            .into_iter()
            .find(|t| t.schema().column_with_name(ACCOUNT_COLUMN).is_none())
            .expect("a table without accounts")
            .name();
        let ops = Principal::unrestricted("ops");
        engine
            .run(&format!("SELECT count(*) FROM {hidden}"), &ops)
            .await
            .unwrap();
        let seen = failure(&engine, &tenant, &format!("SELECT * FROM {hidden}")).await;
        let missing = failure(&engine, &tenant, "SELECT * FROM no_such_table").await;
        assert_eq!(seen.kind(), ErrorKind::UndefinedTable);
        assert_eq!(missing.kind(), ErrorKind::UndefinedTable);
        assert_eq!(
            seen.to_string().replace(hidden, "no_such_table"),
            missing.to_string()
        );
        let explain = failure(&engine, &tenant, "EXPLAIN VERBOSE SELECT 1").await;
        assert_eq!(explain.kind().sqlstate(), "42501");
        assert_eq!(explain.kind().http_status(), 403);
    }

    #[tokio::test]
    async fn a_limited_caller_sees_only_the_declared_columns_of_a_side_table() {
        use arrow::array::{Float64Array, StringArray};
        use arrow::datatypes::{DataType, Field, Schema};
        let dir = tempfile::tempdir().unwrap();
        let declared = Arc::new(Schema::new(vec![Field::new(
            ACCOUNT_COLUMN,
            DataType::Utf8,
            false,
        )]));
        let rows = Arc::new(|| {
            let schema = Arc::new(Schema::new(vec![
                Field::new(ACCOUNT_COLUMN, DataType::Utf8, false),
                Field::new("risk_score", DataType::Float64, true),
            ]));
            RecordBatch::try_new(
                schema,
                vec![
                    Arc::new(StringArray::from(vec!["100000000001", "100000000002"])),
                    Arc::new(Float64Array::from(vec![0.9, 0.1])),
                ],
            )
            .unwrap()
        });
        let engine = engine(&dir, QueryLimits::default())
            .with_table("accounts", SideTable::Rows(declared, rows));
        let ops = Principal::unrestricted("ops");
        let out = engine
            .run("SELECT account_id, risk_score FROM accounts", &ops)
            .await
            .unwrap();
        assert_eq!(
            out.batches.iter().map(RecordBatch::num_rows).sum::<usize>(),
            2
        );
        let tenant = Principal::limited_to("tenant", ["100000000001".to_string()]);
        let out = engine.run("SELECT * FROM accounts", &tenant).await.unwrap();
        assert_eq!(out.schema.fields().len(), 1);
        assert_eq!(
            out.batches.iter().map(RecordBatch::num_rows).sum::<usize>(),
            1
        );
        let hidden = failure(&engine, &tenant, "SELECT risk_score FROM accounts").await;
        assert_eq!(hidden.kind(), ErrorKind::UndefinedColumn);
    }

    #[tokio::test]
    async fn a_pinned_statement_reads_its_own_now() {
        use arrow::array::AsArray;
        use arrow::datatypes::{Date32Type, Int64Type};
        let dir = tempfile::tempdir().unwrap();
        let engine = engine(&dir, QueryLimits::default());
        let ops = Principal::unrestricted("ops");
        // 2021-03-04T05:06:07.089Z, long before the wall clock.
        let at = 1_614_834_367_089_i64;
        let clock = "SELECT CAST(now() AS BIGINT) AS ns, current_date AS d";
        let window = "SELECT count(*) AS recent FROM generate_series(1, 3) \
                      WHERE now() < TIMESTAMP '2022-01-01T00:00:00Z'";
        let pinned = engine.run_at(clock, &ops, at).await.unwrap();
        let batch = &pinned.batches[0];
        assert_eq!(
            batch.column(0).as_primitive::<Int64Type>().value(0),
            at * 1_000_000
        );
        // 18,690 days after 1970-01-01 is 2021-03-04.
        assert_eq!(
            batch.column(1).as_primitive::<Date32Type>().value(0),
            18_690
        );
        let recent = |out: QueryOutput| {
            out.batches[0]
                .column(0)
                .as_primitive::<Int64Type>()
                .value(0)
        };
        assert_eq!(recent(engine.run_at(window, &ops, at).await.unwrap()), 3);
        // Unpinned, the same statements read the wall clock: past 2022, no rows pass.
        let wall = engine.run(clock, &ops).await.unwrap();
        assert!(
            wall.batches[0]
                .column(0)
                .as_primitive::<Int64Type>()
                .value(0)
                > at * 1_000_000
        );
        assert_eq!(recent(engine.run(window, &ops).await.unwrap()), 0);
        // An instant no calendar holds is the caller's error, not a crash.
        for at in [i64::MAX, 10_000_000_000_000] {
            let error = engine.run_at("SELECT now()", &ops, at).await.unwrap_err();
            assert_eq!(error.kind(), ErrorKind::Data, "{at}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn limits_have_kinds_of_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let ops = Principal::unrestricted("ops");

        let timed = engine(
            &dir,
            QueryLimits {
                timeout: Some(Duration::from_millis(50)),
                ..QueryLimits::default()
            },
        );
        let timeout = failure(
            &timed,
            &ops,
            "SELECT count(*) FROM generate_series(1, 100000) a, generate_series(1, 100000) b",
        )
        .await;
        assert_eq!(timeout.kind(), ErrorKind::Timeout);
        let canceled = QueryError::Canceled;
        assert_eq!(timeout.kind().sqlstate(), "57014");
        assert_eq!(canceled.kind().sqlstate(), "57014");
        assert_eq!(timeout.kind().label(), "timeout");
        assert_eq!(canceled.kind().label(), "canceled");
        assert_ne!(timeout.kind().http_status(), canceled.kind().http_status());

        let small = engine(
            &dir,
            QueryLimits {
                memory_limit: Some(1 << 20),
                ..QueryLimits::default()
            },
        );
        let memory = failure(
            &small,
            &ops,
            "SELECT value FROM generate_series(1, 1000000)",
        )
        .await;
        assert_eq!(memory.kind(), ErrorKind::OutOfMemory, "{memory}");
        assert_eq!(memory.kind().sqlstate(), "53200");
        assert_eq!(memory.kind().http_status(), 422);

        let one = engine(
            &dir,
            QueryLimits {
                max_concurrent: 1,
                ..QueryLimits::default()
            },
        );
        let _running = one.admit(&ops).unwrap();
        let busy = one.admit(&ops).unwrap_err();
        assert_eq!(busy.kind(), ErrorKind::Busy);
        assert_eq!(busy.kind().sqlstate(), "53300");
        assert_eq!(busy.kind().http_status(), 429);
    }
}
