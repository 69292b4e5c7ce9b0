//! What fails now, as `/health`, `/ready` and admission see it: each stage's last
//! failure, read without locks.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;

use crate::metrics as m;

/// A stage that fails now: its last error, since when, how many attempts in a row.
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    /// The last error.
    pub error: String,
    /// When the first failure of this run of failures happened.
    pub since: std::time::SystemTime,
    /// Failed attempts since then.
    pub failures: u64,
}

/// The aggregate stage's health: what fails (nothing when `None`) and how full the hot
/// buffer is.
#[derive(Debug, Clone)]
pub struct Health {
    /// The write-ahead log's last group commit failed (a full or read-only disk): writes
    /// are refused until one succeeds.
    pub wal: Option<Fault>,
    /// The lake refused the last flush (store errors, a read-only directory): writes are
    /// refused, and the flush retried with backoff, until one succeeds.
    pub lake: Option<Fault>,
    /// Rows in the hot buffers.
    pub buffered_rows: usize,
    /// Above this many, writes are refused until a flush makes room.
    pub max_buffered_rows: usize,
}

/// A stage of the write path that can fail on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    Wal,
    Lake,
}

impl Stage {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Stage::Wal => "wal",
            Stage::Lake => "lake",
        }
    }
}

/// The current fault of each stage. Written by the one task that drives the stage (the
/// writer for the WAL, the flush loop for the lake), read by anyone.
#[derive(Debug, Default)]
pub(crate) struct Faults {
    wal: ArcSwapOption<Fault>,
    lake: ArcSwapOption<Fault>,
}

impl Faults {
    fn slot(&self, stage: Stage) -> &ArcSwapOption<Fault> {
        match stage {
            Stage::Wal => &self.wal,
            Stage::Lake => &self.lake,
        }
    }

    pub(crate) fn get(&self, stage: Stage) -> Option<Fault> {
        self.slot(stage).load_full().map(|f| (*f).clone())
    }

    /// Records that `stage` failed with `error` at `now`.
    pub(crate) fn fail(&self, stage: Stage, error: &str, now: std::time::SystemTime) {
        let slot = self.slot(stage);
        let fault = match slot.load_full() {
            Some(previous) => Fault {
                error: error.to_string(),
                since: previous.since,
                failures: previous.failures + 1,
            },
            None => Fault {
                error: error.to_string(),
                since: now,
                failures: 1,
            },
        };
        slot.store(Some(Arc::new(fault)));
        ::metrics::gauge!(m::STAGE_UP, "stage" => stage.name()).set(0.0);
    }

    pub(crate) fn recover(&self, stage: Stage) {
        if self.slot(stage).swap(None).is_some() {
            ::metrics::gauge!(m::STAGE_UP, "stage" => stage.name()).set(1.0);
        }
    }
}

/// Samples the process's resident memory for `/metrics` each second, while `alive`
/// says so.
pub(crate) async fn sample_memory(alive: impl Fn() -> bool) {
    while alive() {
        if let Some(bytes) = resident_bytes() {
            ::metrics::gauge!(m::RESIDENT_BYTES).set(bytes as f64);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The process's resident set size (`VmRSS` of `/proc/self/status`).
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
