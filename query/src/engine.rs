//! One DataFusion session per query over the lake's tables plus the hot buffer.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::error::DataFusionError;
use datafusion::execution::context::SQLOptions;
use datafusion::prelude::{SessionConfig, SessionContext};
use deltalake::DeltaTable;
use fleetlake_aggregate::location::LakeLocation;
use fleetlake_aggregate::rollup::{Rollup, rollup_sql};
use fleetlake_ingest::schema::{Table, conform};

/// Rows held in memory by the aggregate stage, not yet in the lake.
pub trait HotData: Send + Sync + 'static {
    /// The rows of `table` that a query reading lake version `lake_version` of it must
    /// add to what it reads from the lake.
    fn snapshot(&self, table: Table, lake_version: Option<i64>) -> Vec<RecordBatch>;
}

/// Why a query failed.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The SQL is invalid, refused, or failed while running.
    #[error("{0}")]
    Sql(#[source] Box<DataFusionError>),
    /// The lake has no tables (nothing was ever ingested into this data directory).
    #[error("no lake tables under {0}: start `fleetlake serve` with this data directory first")]
    NoTable(String),
    /// The lake could not be read.
    #[error("lake unavailable: {0}")]
    Lake(String),
}

impl QueryError {
    /// Whether the failure is the query's fault (HTTP 400) rather than the service's.
    pub fn is_user_error(&self) -> bool {
        match self {
            Self::Sql(e) => !matches!(
                e.as_ref(),
                DataFusionError::IoError(_)
                    | DataFusionError::ObjectStore(_)
                    | DataFusionError::ParquetError(_)
            ),
            Self::NoTable(_) => false,
            Self::Lake(_) => false,
        }
    }
}

/// A query's result.
#[derive(Debug)]
pub struct QueryOutput {
    /// Schema of the result.
    pub schema: SchemaRef,
    /// Rows of the result.
    pub batches: Vec<RecordBatch>,
}

/// Runs read-only SQL over the lake under a directory, plus hot rows if given.
pub struct QueryEngine {
    lake: LakeLocation,
    hot: Option<Arc<dyn HotData>>,
    tables: tokio::sync::Mutex<HashMap<&'static str, DeltaTable>>,
}

impl std::fmt::Debug for QueryEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueryEngine")
            .field("lake", &self.lake.to_string())
            .field("hot", &self.hot.is_some())
            .finish()
    }
}

impl QueryEngine {
    /// An engine over `lake`; `hot` adds rows not yet committed.
    pub fn new(lake: LakeLocation, hot: Option<Arc<dyn HotData>>) -> Self {
        Self {
            lake,
            hot,
            tables: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

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
            .lake
            .open(table)
            .await
            .map_err(|e| QueryError::Lake(e.to_string()))?
        else {
            return Ok(None);
        };
        cached.insert(table, delta.clone());
        Ok(Some(delta))
    }

    /// Lake table `name` at its latest version and its provider for `ctx` (whose
    /// object stores it joins), or `None` if the lake does not have it.
    async fn provider(
        &self,
        ctx: &SessionContext,
        name: &'static str,
    ) -> Result<Option<(DeltaTable, Arc<dyn datafusion::catalog::TableProvider>)>, QueryError> {
        let Some(delta) = self.latest(name).await? else {
            return Ok(None);
        };
        delta
            .update_datafusion_session(&ctx.state())
            .map_err(|e| QueryError::Lake(e.to_string()))?;
        let provider = delta
            .table_provider()
            .await
            .map_err(|e| QueryError::Lake(e.to_string()))?;
        Ok(Some((delta, provider)))
    }

    /// A session with every table registered: the lake's as of now, plus hot rows.
    pub async fn session(&self) -> Result<SessionContext, QueryError> {
        let config = SessionConfig::new()
            .with_information_schema(true)
            .with_default_catalog_and_schema("fleetlake", "public");
        let ctx = SessionContext::new_with_config(config);
        let mut registered = 0;
        for table in Table::ALL {
            let Some((delta, lake)) = self.provider(&ctx, table.name()).await? else {
                continue;
            };
            let schema = lake.schema();
            let hot = match &self.hot {
                Some(hot) => hot
                    .snapshot(table, delta.version().map(|v| v as i64))
                    .iter()
                    .map(|batch| conform(batch, &schema))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| QueryError::Lake(format!("hot buffer rows of {table}: {e}")))?,
                None => Vec::new(),
            };
            ctx.register_table(
                table.name(),
                Arc::new(crate::table::LakeWithHot::new(lake, hot)),
            )
            .map_err(|e| QueryError::Sql(Box::new(e)))?;
            registered += 1;
        }
        fleetlake_aggregate::rollup::register(&ctx);
        for rollup in Rollup::ALL {
            let Some((_, partials)) = self.provider(&ctx, rollup.name()).await? else {
                continue;
            };
            // The Delta table holds partial rows per bucket until compacted; SQL's
            // table merges them.
            let partials_name = format!("{}_partials", rollup.name());
            let sql_err = |e| QueryError::Sql(Box::new(e));
            ctx.register_table(partials_name.as_str(), partials)
                .map_err(sql_err)?;
            let merged = ctx
                .sql(&rollup_sql(&partials_name, rollup))
                .await
                .map_err(sql_err)?;
            ctx.register_table(rollup.name(), merged.into_view())
                .map_err(sql_err)?;
        }
        if registered == 0 {
            return Err(QueryError::NoTable(self.lake.to_string()));
        }
        Ok(ctx)
    }

    /// Runs one read-only SQL statement.
    pub async fn sql(&self, sql: &str) -> Result<QueryOutput, QueryError> {
        let ctx = self.session().await?;
        let options = SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false);
        let sql_err = |e| QueryError::Sql(Box::new(e));
        let frame = ctx.sql_with_options(sql, options).await.map_err(sql_err)?;
        let schema: SchemaRef = Arc::new(frame.schema().as_arrow().clone());
        let batches = frame.collect().await.map_err(sql_err)?;
        Ok(QueryOutput { schema, batches })
    }
}
