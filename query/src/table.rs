//! A table that is the lake's Delta table plus the rows of the hot buffer.

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::error::Result;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown, TableType};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::union::UnionExec;

/// The lake's provider for a table, with the hot rows not yet committed to it.
///
/// Filters are reported `Inexact`: both sides may use them to prune, and DataFusion
/// still applies them to the union, so hot rows are filtered like lake rows.
#[derive(Debug)]
pub struct LakeWithHot {
    lake: Arc<dyn TableProvider>,
    hot: Vec<RecordBatch>,
}

impl LakeWithHot {
    /// `hot` must already have the lake provider's schema.
    pub fn new(lake: Arc<dyn TableProvider>, hot: Vec<RecordBatch>) -> Self {
        Self { lake, hot }
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
