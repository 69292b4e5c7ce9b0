//! The lake seam: what the write path asks of a table store, as the [`Lake`] trait, and
//! its one implementation over delta-rs ([`DeltaLake`]). Flushes, roll-ups, compaction,
//! retention and the `alerts` table all commit through it; tests put a
//! [`FaultyLake`](crate::faulty::FaultyLake) in front of it to make commits fail, land
//! and then report a timeout, or lose a race to another writer.
//!
//! Reads (scans, the commit history) go to the loaded snapshot, [`Lake::table`].

use std::num::NonZeroU64;
use std::time::Duration;

use arrow::array::RecordBatch;
use async_trait::async_trait;
use datafusion::prelude::{col, lit};
use datafusion::scalar::ScalarValue;
use deltalake::DeltaTable;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::kernel::{Action, Add, Transaction};
use deltalake::parquet::file::properties::WriterProperties;
use deltalake::protocol::{DeltaOperation, SaveMode};

use crate::lake::{LakeError, OPERATION_KEY, is_conflict};

/// What a commit records besides its files: application transactions (id → version:
/// "this commit covers that writer's sequence") and commit-info metadata.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CommitMeta {
    /// Application transactions, set atomically with the commit.
    pub transactions: Vec<(String, i64)>,
    /// Entries of the commit's `commitInfo`.
    pub metadata: Vec<(String, serde_json::Value)>,
}

impl CommitMeta {
    fn properties(self) -> CommitProperties {
        CommitProperties::default()
            .with_application_transactions(
                self.transactions
                    .into_iter()
                    .map(|(app, version)| Transaction::new(app, version))
                    .collect::<Vec<_>>(),
            )
            .with_metadata(self.metadata)
    }
}

/// A data file of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LakeFile {
    /// Path relative to the table's root (`day=2026-12-05/part-….parquet`).
    pub path: String,
    /// Size in bytes.
    pub size: i64,
}

/// One table of the lake, as the write path uses it.
#[async_trait]
pub trait Lake: Send + Sync + std::fmt::Debug {
    /// The table's URL.
    fn location(&self) -> &str;

    /// The loaded snapshot, for reads.
    fn table(&self) -> &DeltaTable;

    /// The loaded version (`None` before the table exists).
    fn version(&self) -> Option<i64> {
        self.table().version().map(|v| v as i64)
    }

    /// Loads the latest version (commits of other writers included).
    async fn refresh(&mut self) -> Result<(), LakeError>;

    /// The version of application `app_id`'s last transaction in the loaded snapshot.
    async fn app_transaction(&self, app_id: &str) -> Result<Option<i64>, LakeError>;

    /// Appends `batches` in one commit recording `meta`; returns the new version.
    async fn append(
        &mut self,
        batches: Vec<RecordBatch>,
        meta: CommitMeta,
    ) -> Result<i64, LakeError>;

    /// Replaces the files at `removes` by `adds` (the same rows, rewritten) in one
    /// no-data-change commit; `None` if another commit removed one of them first.
    async fn rewrite(
        &mut self,
        adds: Vec<Add>,
        removes: &[String],
        meta: CommitMeta,
    ) -> Result<Option<i64>, LakeError>;

    /// Deletes the day partitions before `day` (days since the epoch); returns the data
    /// files removed.
    async fn delete_days_before(
        &mut self,
        day_column: &str,
        day: i32,
        meta: CommitMeta,
    ) -> Result<usize, LakeError>;

    /// Deletes files no version within `grace` references; returns how many.
    async fn vacuum(&mut self, grace: Duration) -> Result<usize, LakeError>;

    /// The data files of the loaded snapshot.
    fn files(&self) -> Result<Vec<LakeFile>, LakeError>;
}

/// How a table's appends are written.
#[derive(Debug, Clone, Default)]
pub struct WriteSettings {
    /// Partition columns.
    pub partition_by: Vec<String>,
    /// Parquet settings (delta-rs's defaults when `None`).
    pub properties: Option<WriterProperties>,
    /// Files are cut near this size.
    pub target_file_bytes: Option<u64>,
}

/// A [`Lake`] over delta-rs.
#[derive(Debug)]
pub struct DeltaLake {
    table: DeltaTable,
    location: String,
    settings: WriteSettings,
}

impl DeltaLake {
    /// The table `table` (loaded from `location`), appended to as `settings` say.
    pub fn new(table: DeltaTable, location: String, settings: WriteSettings) -> Self {
        Self {
            table,
            location,
            settings,
        }
    }

    fn err(&self, source: deltalake::DeltaTableError) -> LakeError {
        LakeError::Delta {
            table: self.location.clone(),
            source: Box::new(source),
        }
    }
}

#[async_trait]
impl Lake for DeltaLake {
    fn location(&self) -> &str {
        &self.location
    }

    fn table(&self) -> &DeltaTable {
        &self.table
    }

    async fn refresh(&mut self) -> Result<(), LakeError> {
        self.table
            .update_incremental(None)
            .await
            .map_err(|e| self.err(e))
    }

    async fn app_transaction(&self, app_id: &str) -> Result<Option<i64>, LakeError> {
        let state = self.table.snapshot().map_err(|e| self.err(e))?;
        state
            .transaction_version(self.table.log_store().as_ref(), app_id)
            .await
            .map_err(|e| self.err(e))
    }

    async fn append(
        &mut self,
        batches: Vec<RecordBatch>,
        meta: CommitMeta,
    ) -> Result<i64, LakeError> {
        // One partition from input to file: with more, DataFusion deals the sorted
        // rows round-robin over partitions in 8,192-row batches and delta-rs merges
        // them back by day in arrival order, so files lose the lake's sort order (and
        // with it pruning, compression and compaction's merge of sorted files).
        let one_partition = std::collections::HashMap::from([(
            "datafusion.execution.target_partitions".to_string(),
            "1".to_string(),
        )]);
        let ctx = deltalake::delta_datafusion::DeltaSessionContext::new_with_session_overrides(
            &one_partition,
        )
        .map_err(|e| self.err(e))?
        .into_inner();
        self.table
            .update_datafusion_session(&ctx.state())
            .map_err(|e| self.err(e))?;
        let mut write = self
            .table
            .clone()
            .write(batches)
            .with_session_state(std::sync::Arc::new(ctx.state()))
            .with_save_mode(SaveMode::Append)
            .with_commit_properties(meta.properties());
        if !self.settings.partition_by.is_empty() {
            write = write.with_partition_columns(self.settings.partition_by.clone());
        }
        if let Some(properties) = &self.settings.properties {
            write = write.with_writer_properties(properties.clone());
        }
        if let Some(bytes) = self.settings.target_file_bytes {
            write = write.with_target_file_size(NonZeroU64::new(bytes));
        }
        match write.await {
            Ok(table) => {
                self.table = table;
                Ok(self.version().unwrap_or_default())
            }
            Err(e) => {
                if is_conflict(&e) {
                    // A commit of another writer removed rows this one's snapshot had
                    // (retention), or won the same transaction: a retry must start from
                    // the table as it is now.
                    self.refresh().await?;
                }
                Err(self.err(e))
            }
        }
    }

    async fn rewrite(
        &mut self,
        adds: Vec<Add>,
        removes: &[String],
        meta: CommitMeta,
    ) -> Result<Option<i64>, LakeError> {
        let mut actions: Vec<Action> = adds
            .into_iter()
            .map(|mut add| {
                add.data_change = false;
                Action::Add(add)
            })
            .collect();
        {
            let snapshot = self.table.snapshot().map_err(|e| self.err(e))?;
            let wanted: std::collections::HashSet<&str> =
                removes.iter().map(String::as_str).collect();
            for file in snapshot.log_data() {
                if wanted.contains(file.path().as_ref()) {
                    actions.push(Action::Remove(file.remove_action(false)));
                }
            }
        }
        let target_size = self.settings.target_file_bytes.unwrap_or(0) as i64;
        let commit = CommitBuilder::from(meta.properties())
            .with_actions(actions)
            .build(
                Some(self.table.snapshot().map_err(|e| self.err(e))?),
                self.table.log_store(),
                DeltaOperation::Optimize {
                    predicate: None,
                    target_size,
                },
            )
            .await;
        match commit {
            Ok(_) => {
                self.refresh().await?;
                Ok(self.version())
            }
            Err(e) if is_conflict(&e) => {
                self.refresh().await?;
                Ok(None)
            }
            Err(e) => Err(self.err(e)),
        }
    }

    async fn delete_days_before(
        &mut self,
        day_column: &str,
        day: i32,
        meta: CommitMeta,
    ) -> Result<usize, LakeError> {
        let before = col(day_column).lt(lit(ScalarValue::Date32(Some(day))));
        let (table, metrics) = self
            .table
            .clone()
            .delete()
            .with_predicate(before)
            .with_commit_properties(meta.properties())
            .await
            .map_err(|e| self.err(e))?;
        self.table = table;
        Ok(metrics.num_removed_files)
    }

    async fn vacuum(&mut self, grace: Duration) -> Result<usize, LakeError> {
        let (table, metrics) = self
            .table
            .clone()
            .vacuum()
            .with_retention_period(
                chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::MAX),
            )
            .with_enforce_retention_duration(false)
            .await
            .map_err(|e| self.err(e))?;
        self.table = table;
        Ok(metrics.files_deleted.len())
    }

    fn files(&self) -> Result<Vec<LakeFile>, LakeError> {
        let snapshot = self.table.snapshot().map_err(|e| self.err(e))?;
        Ok(snapshot
            .log_data()
            .into_iter()
            .map(|file| LakeFile {
                path: file.path().to_string(),
                size: file.size(),
            })
            .collect())
    }
}

/// A commit-info entry naming what a commit did (`compact`, `retention`).
pub fn operation(name: &str) -> CommitMeta {
    CommitMeta {
        transactions: Vec::new(),
        metadata: vec![(OPERATION_KEY.to_string(), name.into())],
    }
}
