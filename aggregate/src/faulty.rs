//! A [`Lake`] that fails on purpose, for tests: in front of a real one, it makes the
//! next commits fail, land and then report a timeout (the ambiguous outcome of a store
//! that answered too late), or lose a race to another writer that commits first.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::RecordBatch;
use async_trait::async_trait;
use deltalake::DeltaTable;
use deltalake::kernel::Add;

use crate::lake::LakeError;
use crate::store::{CommitMeta, Lake, LakeFile};

/// What happens to one commit (an append or a rewrite).
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// The commit is refused; nothing lands.
    Fail,
    /// The commit lands, then the caller is told it timed out.
    LandThenTimeout,
    /// Another writer commits first (an empty append recording `meta`), then this
    /// commit goes ahead on top of it.
    OtherWriterFirst(CommitMeta),
    /// As `OtherWriterFirst`, holding this commit between the two until the test says
    /// go ([`Hold::go`]).
    OtherWriterFirstThenHold(CommitMeta, Hold),
}

/// A commit held by [`Fault::OtherWriterFirstThenHold`]: the test waits until it is
/// reached, then lets it go.
#[derive(Debug, Clone, Default)]
pub struct Hold {
    reached: Arc<tokio::sync::Notify>,
    go: Arc<tokio::sync::Notify>,
}

impl Hold {
    /// Waits until the commit is held.
    pub async fn reached(&self) {
        self.reached.notified().await;
    }

    /// Lets the held commit go on.
    pub fn go(&self) {
        self.go.notify_one();
    }
}

impl PartialEq for Hold {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.reached, &other.reached)
    }
}

/// The faults still to come, in order, shared between a test and its lakes.
#[derive(Debug, Clone, Default)]
pub struct FaultScript {
    queue: Arc<Mutex<VecDeque<Fault>>>,
    /// Commits attempted through lakes of this script, faulty or not.
    attempts: Arc<Mutex<u64>>,
}

impl FaultScript {
    /// Queues `fault` for the next commit that has none yet.
    pub fn push(&self, fault: Fault) {
        self.queue.lock().expect("fault script").push_back(fault);
    }

    /// Faults not yet used.
    pub fn pending(&self) -> usize {
        self.queue.lock().expect("fault script").len()
    }

    /// Commits attempted so far.
    pub fn attempts(&self) -> u64 {
        *self.attempts.lock().expect("fault script")
    }

    fn next(&self) -> Option<Fault> {
        *self.attempts.lock().expect("fault script") += 1;
        self.queue.lock().expect("fault script").pop_front()
    }
}

/// A [`Lake`] whose commits follow a [`FaultScript`].
#[derive(Debug)]
pub struct FaultyLake {
    inner: Box<dyn Lake>,
    script: FaultScript,
}

impl FaultyLake {
    /// `inner`, with commits following `script`.
    pub fn new(inner: Box<dyn Lake>, script: FaultScript) -> Self {
        Self { inner, script }
    }

    /// Another writer's empty append recording `other`, then (once `hold` lets it go)
    /// this commit on top of it.
    async fn other_writer_first(
        &mut self,
        batches: Vec<RecordBatch>,
        meta: CommitMeta,
        other: CommitMeta,
        hold: Option<Hold>,
    ) -> Result<i64, LakeError> {
        let schema = batches
            .first()
            .map(RecordBatch::schema)
            .ok_or_else(|| self.injected("nothing to append"))?;
        self.inner
            .append(vec![RecordBatch::new_empty(schema)], other)
            .await?;
        if let Some(hold) = hold {
            hold.reached.notify_one();
            hold.go.notified().await;
        }
        self.inner.append(batches, meta).await
    }

    fn injected(&self, what: &str) -> LakeError {
        LakeError::Delta {
            table: self.inner.location().to_string(),
            source: Box::new(deltalake::DeltaTableError::Generic(format!(
                "injected fault: {what}"
            ))),
        }
    }
}

#[async_trait]
impl Lake for FaultyLake {
    fn location(&self) -> &str {
        self.inner.location()
    }

    fn table(&self) -> &DeltaTable {
        self.inner.table()
    }

    async fn refresh(&mut self) -> Result<(), LakeError> {
        self.inner.refresh().await
    }

    async fn app_transaction(&self, app_id: &str) -> Result<Option<i64>, LakeError> {
        self.inner.app_transaction(app_id).await
    }

    async fn append(
        &mut self,
        batches: Vec<RecordBatch>,
        meta: CommitMeta,
    ) -> Result<i64, LakeError> {
        match self.script.next() {
            None => self.inner.append(batches, meta).await,
            Some(Fault::Fail) => Err(self.injected("commit refused")),
            Some(Fault::LandThenTimeout) => {
                self.inner.append(batches, meta).await?;
                Err(self.injected("commit timed out (it landed)"))
            }
            Some(Fault::OtherWriterFirst(other)) => {
                self.other_writer_first(batches, meta, other, None).await
            }
            Some(Fault::OtherWriterFirstThenHold(other, hold)) => {
                self.other_writer_first(batches, meta, other, Some(hold))
                    .await
            }
        }
    }

    async fn rewrite(
        &mut self,
        adds: Vec<Add>,
        removes: &[String],
        meta: CommitMeta,
    ) -> Result<Option<i64>, LakeError> {
        match self.script.next() {
            None | Some(Fault::OtherWriterFirst(_) | Fault::OtherWriterFirstThenHold(..)) => {
                self.inner.rewrite(adds, removes, meta).await
            }
            Some(Fault::Fail) => Err(self.injected("commit refused")),
            Some(Fault::LandThenTimeout) => {
                self.inner.rewrite(adds, removes, meta).await?;
                Err(self.injected("commit timed out (it landed)"))
            }
        }
    }

    async fn delete_days_before(
        &mut self,
        day_column: &str,
        day: i32,
        meta: CommitMeta,
    ) -> Result<usize, LakeError> {
        self.inner.delete_days_before(day_column, day, meta).await
    }

    async fn vacuum(&mut self, grace: Duration) -> Result<usize, LakeError> {
        self.inner.vacuum(grace).await
    }

    fn files(&self) -> Result<Vec<LakeFile>, LakeError> {
        self.inner.files()
    }
}
