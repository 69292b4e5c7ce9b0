//! Table providers: the lake's Delta table plus the rows of the hot buffer, and the
//! account filter that limited credentials read every table through.

use std::collections::BTreeSet;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{DFSchema, DataFusionError};
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::error::Result;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown, TableType, col, lit};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::execution_plan::ReplaceChildrenOptions;
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::union::UnionExec;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties};
use deltalake::DeltaTable;

/// The column limited credentials are filtered on.
pub const ACCOUNT_COLUMN: &str = "account_id";

/// The lake's provider for a table at one version, with the hot rows not yet
/// committed to that version.
///
/// Filters are reported `Inexact`: both sides may use them to prune, and DataFusion
/// still applies them to the union, so hot rows are filtered like lake rows.
#[derive(Debug)]
pub struct LakeWithHot {
    delta: Option<DeltaTable>,
    lake: Arc<dyn TableProvider>,
    hot: Vec<RecordBatch>,
}

impl LakeWithHot {
    /// `hot` must already have the lake provider's schema. `delta`, when given, is the
    /// table `lake` reads; its object store is registered in the scanning session.
    pub fn new(
        delta: Option<DeltaTable>,
        lake: Arc<dyn TableProvider>,
        hot: Vec<RecordBatch>,
    ) -> Self {
        Self { delta, lake, hot }
    }
}

#[async_trait]
impl TableProvider for LakeWithHot {
    fn schema(&self) -> SchemaRef {
        self.lake.schema()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if let Some(delta) = &self.delta {
            delta
                .update_datafusion_session(state)
                .map_err(|e| DataFusionError::External(Box::new(e)))?;
        }
        // A limit may only be pushed into a side when no filter runs above it.
        let side_limit = if filters.is_empty() { limit } else { None };
        let lake = self
            .lake
            .scan(state, projection, filters, side_limit)
            .await?;
        if self.hot.is_empty() {
            return Ok(lake);
        }
        let hot = MemorySourceConfig::try_new_exec(
            std::slice::from_ref(&self.hot),
            self.schema(),
            projection.cloned(),
        )?;
        UnionExec::try_new(vec![lake, hot])
    }
}

/// A table as a limited credential sees it: only the rows of its accounts.
///
/// Isolation holds by construction: the scan is an [`AccountScopedExec`], a leaf of
/// the physical plan that yields only the rows of the credential's accounts. None of
/// the caller's expressions is evaluated below it, because
/// - the caller's filters are not pushed into the table (`Unsupported`): they stay
///   above the scan and see only the rows it yields;
/// - the only predicate given to the lake's scan is the account filter itself (for
///   file and row-group pruning); its result does not depend on the caller's SQL;
/// - the plan that reads the table is not a child of the leaf, so physical optimizer
///   rules (filter and dynamic-filter pushdown from joins and top-k, projection
///   pushdown) cannot move the caller's expressions into it, and neither `EXPLAIN`
///   (plans, statistics) nor `EXPLAIN ANALYZE` (rows pruned and filtered) shows it.
#[derive(Debug)]
pub struct AccountFilter {
    inner: Arc<dyn TableProvider>,
    accounts: Arc<BTreeSet<String>>,
    account_index: usize,
}

impl AccountFilter {
    /// `inner` filtered to `accounts`; `None` if it has no `account_id` column.
    pub fn new(inner: Arc<dyn TableProvider>, accounts: Arc<BTreeSet<String>>) -> Option<Self> {
        let account_index = inner.schema().index_of(ACCOUNT_COLUMN).ok()?;
        Some(Self {
            inner,
            accounts,
            account_index,
        })
    }

    fn predicate(&self) -> Expr {
        if self.accounts.is_empty() {
            return lit(false);
        }
        col(ACCOUNT_COLUMN).in_list(
            self.accounts.iter().map(|a| lit(a.as_str())).collect(),
            false,
        )
    }
}

#[async_trait]
impl TableProvider for AccountFilter {
    fn schema(&self) -> SchemaRef {
        self.inner.schema()
    }

    fn table_type(&self) -> TableType {
        self.inner.table_type()
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        // The caller's filters never reach the rows of other accounts: they run above
        // the scan, on what it yields.
        Ok(vec![
            TableProviderFilterPushDown::Unsupported;
            filters.len()
        ])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        // Read the account column even when the query does not ask for it.
        let mut columns: Vec<usize> = match projection {
            Some(p) => p.clone(),
            None => (0..self.schema().fields().len()).collect(),
        };
        let added = !columns.contains(&self.account_index);
        if added {
            columns.push(self.account_index);
        }
        let predicate = self.predicate();
        // Only the account predicate goes into the lake's scan, and no limit: it could
        // stop before the allowed rows.
        let scan = self
            .inner
            .scan(
                state,
                Some(&columns),
                std::slice::from_ref(&predicate),
                None,
            )
            .await?;
        let schema = DFSchema::try_from(scan.schema().as_ref().clone())?;
        let physical = state.create_physical_expr(predicate, &schema)?;
        let filtered: Arc<dyn ExecutionPlan> = Arc::new(FilterExec::try_new(physical, scan)?);
        let scoped = if added {
            let keep = columns.len() - 1;
            let exprs = (0..keep)
                .map(|i| {
                    let field = filtered.schema().field(i).clone();
                    (
                        Arc::new(datafusion::physical_expr::expressions::Column::new(
                            field.name(),
                            i,
                        ))
                            as Arc<dyn datafusion::physical_expr::PhysicalExpr>,
                        field.name().clone(),
                    )
                })
                .collect::<Vec<_>>();
            Arc::new(ProjectionExec::try_new(exprs, filtered)?) as Arc<dyn ExecutionPlan>
        } else {
            filtered
        };
        Ok(Arc::new(AccountScopedExec::new(scoped)))
    }
}

/// The rows of a limited credential's accounts, as a leaf of the plan.
///
/// It runs the plan it wraps (the table's scan under the account filter) without
/// showing it as a child: optimizer rules cannot push anything into it, and `EXPLAIN`
/// shows neither that plan nor its statistics or metrics (which describe every
/// account's rows). Its own statistics are unknown.
#[derive(Debug)]
pub struct AccountScopedExec {
    scan: Arc<dyn ExecutionPlan>,
    properties: Arc<PlanProperties>,
}

impl AccountScopedExec {
    fn new(scan: Arc<dyn ExecutionPlan>) -> Self {
        let properties = Arc::clone(scan.properties());
        Self { scan, properties }
    }
}

impl DisplayAs for AccountScopedExec {
    fn fmt_as(&self, t: DisplayFormatType, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match t {
            DisplayFormatType::Default | DisplayFormatType::Verbose => {
                write!(f, "AccountScopedExec")
            }
            DisplayFormatType::TreeRender => write!(f, ""),
        }
    }
}

impl ExecutionPlan for AccountScopedExec {
    fn name(&self) -> &'static str {
        "AccountScopedExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        Vec::new()
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn replace_children(
        self: Arc<Self>,
        _: Vec<Arc<dyn ExecutionPlan>>,
        _: ReplaceChildrenOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    fn with_new_children(
        self: Arc<Self>,
        _: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        self.scan.execute(partition, context)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use arrow::array::{Float64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use datafusion::datasource::MemTable;
    use datafusion::prelude::SessionContext;

    /// Accounts "100" (3 rows), "200" (2 rows) and "hot-x" (1 row): an id no cast to a
    /// number survives, as in the attack that leaked other accounts' values.
    fn session(allowed: &[&str]) -> SessionContext {
        let schema = Arc::new(Schema::new(vec![
            Field::new(ACCOUNT_COLUMN, DataType::Utf8, false),
            Field::new("value", DataType::Float64, false),
        ]));
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                Arc::new(StringArray::from(vec![
                    "100", "200", "100", "hot-x", "100", "200",
                ])),
                Arc::new(Float64Array::from(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0])),
            ],
        )
        .unwrap();
        let table = Arc::new(MemTable::try_new(schema, vec![vec![batch]]).unwrap());
        let allowed = Arc::new(allowed.iter().map(|a| a.to_string()).collect());
        let filtered = AccountFilter::new(table, allowed).expect("has account_id");
        let ctx = SessionContext::new();
        ctx.register_table("t", Arc::new(filtered)).unwrap();
        ctx
    }

    async fn rows(ctx: &SessionContext, sql: &str) -> Result<Vec<String>> {
        let batches = ctx.sql(sql).await?.collect().await?;
        let text = arrow::util::pretty::pretty_format_batches(&batches)?.to_string();
        Ok(text
            .lines()
            .filter(|l| l.starts_with('|'))
            .skip(1)
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect())
    }

    #[tokio::test]
    async fn only_the_allowed_accounts_rows_come_out() {
        let ctx = session(&["100"]);
        assert_eq!(
            rows(
                &ctx,
                "SELECT account_id, sum(value) FROM t GROUP BY account_id"
            )
            .await
            .unwrap(),
            ["| 100 | 9.0 |"]
        );
        // Without asking for the account column, still only that account's rows.
        assert_eq!(
            rows(&ctx, "SELECT count(*), sum(value) FROM t")
                .await
                .unwrap(),
            ["| 3 | 9.0 |"]
        );
        let none = session(&[]);
        assert_eq!(
            rows(&none, "SELECT count(*) FROM t").await.unwrap(),
            ["| 0 |"]
        );
    }

    #[tokio::test]
    async fn the_caller_s_expressions_never_see_other_accounts_rows() {
        let ctx = session(&["100", "200"]);
        // Evaluated on "hot-x" this cast fails, naming the value: it must only ever see
        // the allowed rows, whatever the optimizer does with the predicate.
        for sql in [
            "SELECT count(*) FROM t WHERE CAST(account_id AS BIGINT) > 0",
            "SELECT count(*) FROM t WHERE CAST(account_id AS BIGINT) > 0 AND value < 100",
            "SELECT count(*) FROM (SELECT CAST(account_id AS BIGINT) AS n FROM t) WHERE n > 0",
            "SELECT count(*) FROM t a JOIN t b ON CAST(a.account_id AS BIGINT) = CAST(b.account_id AS BIGINT)",
        ] {
            let out = rows(&ctx, sql).await;
            assert!(out.is_ok(), "{sql}: {out:?}");
            assert!(!format!("{out:?}").contains("hot-x"), "{sql}: {out:?}");
        }
        assert_eq!(
            rows(
                &ctx,
                "SELECT count(*) FROM t WHERE CAST(account_id AS BIGINT) > 0"
            )
            .await
            .unwrap(),
            ["| 5 |"]
        );
    }

    #[tokio::test]
    async fn explain_shows_the_scoped_leaf_not_the_table_under_it() {
        let ctx = session(&["100"]);
        let plan = rows(&ctx, "EXPLAIN SELECT sum(value) FROM t WHERE value > 1")
            .await
            .unwrap()
            .join("\n");
        assert!(plan.contains("AccountScopedExec"), "{plan}");
        // The table's own scan (and what it knows of every account's rows) is not shown.
        assert!(!plan.contains("DataSourceExec"), "{plan}");
        assert!(!plan.contains("MemoryExec"), "{plan}");
    }
}
