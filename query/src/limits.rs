//! What statements may use together: one memory pool for the whole process with each
//! statement's limit inside it, and caps on statements running at once, overall and
//! per user.
//!
//! The pool is the queries' alone: ingest (the write-ahead log and the hot buffer)
//! keeps its own byte budget, so queries at their limits never refuse a Firehose
//! delivery. Errors name only the statement's own use, never what other statements
//! hold: how full the shared pool is would tell one tenant about another's queries.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use datafusion::error::{DataFusionError, Result};
use datafusion::execution::memory_pool::{
    GreedyMemoryPool, MemoryConsumer, MemoryLimit, MemoryPool, MemoryReservation,
    UnboundedMemoryPool,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The pool every admitted statement takes its memory from.
pub(crate) fn shared_pool(bytes: Option<usize>) -> Arc<dyn MemoryPool> {
    match bytes {
        Some(bytes) => Arc::new(GreedyMemoryPool::new(bytes)),
        None => Arc::new(UnboundedMemoryPool::default()),
    }
}

/// One statement's share of the shared pool: at most `limit` bytes, and only what
/// the shared pool still has.
#[derive(Debug)]
pub struct StatementPool {
    shared: Arc<dyn MemoryPool>,
    limit: Option<usize>,
    used: AtomicUsize,
}

impl StatementPool {
    /// A statement's pool inside `shared`, limited to `limit` bytes.
    pub(crate) fn new(shared: Arc<dyn MemoryPool>, limit: Option<usize>) -> Arc<Self> {
        Arc::new(Self {
            shared,
            limit,
            used: AtomicUsize::new(0),
        })
    }

    /// A reservation for the statement's results, counted like its operators' memory.
    pub(crate) fn results(self: &Arc<Self>) -> MemoryReservation {
        MemoryConsumer::new("results").register(&(Arc::clone(self) as Arc<dyn MemoryPool>))
    }

    /// The statement's limit, if any.
    pub fn limit(&self) -> Option<usize> {
        self.limit
    }
}

impl std::fmt::Display for StatementPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "statement(used: {})", self.used.load(Ordering::Relaxed))
    }
}

/// The message of a statement past its own limit.
pub(crate) fn over_limit(limit: usize, what: &str, bytes: usize) -> DataFusionError {
    DataFusionError::ResourcesExhausted(format!(
        "statement memory limit of {} reached: {what} needed {} more",
        human(limit),
        human(bytes)
    ))
}

fn human(bytes: usize) -> String {
    const MIB: usize = 1 << 20;
    if bytes >= MIB {
        format!("{:.1} MiB", bytes as f64 / MIB as f64)
    } else {
        format!("{bytes} bytes")
    }
}

impl MemoryPool for StatementPool {
    fn name(&self) -> &str {
        "statement"
    }

    fn register(&self, consumer: &MemoryConsumer) {
        self.shared.register(consumer);
    }

    fn unregister(&self, consumer: &MemoryConsumer) {
        self.shared.unregister(consumer);
    }

    fn grow(&self, reservation: &MemoryReservation, additional: usize) {
        self.used.fetch_add(additional, Ordering::Relaxed);
        self.shared.grow(reservation, additional);
    }

    fn shrink(&self, reservation: &MemoryReservation, shrink: usize) {
        self.used.fetch_sub(shrink, Ordering::Relaxed);
        self.shared.shrink(reservation, shrink);
    }

    fn try_grow(&self, reservation: &MemoryReservation, additional: usize) -> Result<()> {
        let limit = self.limit.unwrap_or(usize::MAX);
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(additional).filter(|total| *total <= limit)
            })
            .map_err(|_| over_limit(limit, reservation.consumer().name(), additional))?;
        if self.shared.try_grow(reservation, additional).is_err() {
            self.used.fetch_sub(additional, Ordering::Relaxed);
            // Not the shared pool's message: how much the others hold is theirs.
            return Err(DataFusionError::ResourcesExhausted(
                "the server's memory for queries is in use by other statements: \
                 try again shortly"
                    .into(),
            ));
        }
        Ok(())
    }

    fn reserved(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn memory_limit(&self) -> MemoryLimit {
        match self.limit {
            Some(limit) => MemoryLimit::Finite(limit),
            None => MemoryLimit::Unknown,
        }
    }
}

/// Caps on statements running at once.
#[derive(Debug)]
pub(crate) struct Admission {
    overall: Arc<Semaphore>,
    overall_cap: usize,
    per_user_cap: usize,
    per_user: Mutex<HashMap<String, Arc<Semaphore>>>,
}

/// A statement's places under the caps, given back when it is dropped (after its
/// last row was sent).
#[derive(Debug)]
pub struct Permits {
    _overall: OwnedSemaphorePermit,
    _user: OwnedSemaphorePermit,
}

/// Why a statement was not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Busy {
    /// The whole server runs its most statements.
    #[error("too many statements running on this server (at most {0} at once): try again shortly")]
    Server(usize),
    /// This user runs its most statements.
    #[error("too many statements running for user {user:?} (at most {cap} at once)")]
    User {
        /// The user.
        user: String,
        /// Their cap.
        cap: usize,
    },
}

impl Drop for Permits {
    fn drop(&mut self) {
        ::metrics::gauge!(crate::metrics::RUNNING).decrement(1.0);
    }
}

impl Admission {
    pub(crate) fn new(overall: usize, per_user: usize) -> Self {
        Self {
            overall: Arc::new(Semaphore::new(overall)),
            overall_cap: overall,
            per_user_cap: per_user,
            per_user: Mutex::new(HashMap::new()),
        }
    }

    /// Places for one statement of `user`, or why there is none. Never waits: a
    /// client past its cap is told so at once.
    pub(crate) fn admit(&self, user: &str) -> std::result::Result<Permits, Busy> {
        let user_permit = {
            let mut users = self.per_user.lock().unwrap_or_else(|e| e.into_inner());
            // Users with nothing running are forgotten, so the map stays as small as
            // the set of users with statements running. The permit is taken under the
            // lock, so a semaphore is never forgotten between lookup and acquire.
            users.retain(|_, s| s.available_permits() < self.per_user_cap);
            let semaphore = users
                .entry(user.to_string())
                .or_insert_with(|| Arc::new(Semaphore::new(self.per_user_cap)));
            Arc::clone(semaphore)
                .try_acquire_owned()
                .map_err(|_| Busy::User {
                    user: user.to_string(),
                    cap: self.per_user_cap,
                })?
        };
        let overall = Arc::clone(&self.overall)
            .try_acquire_owned()
            .map_err(|_| Busy::Server(self.overall_cap))?;
        ::metrics::gauge!(crate::metrics::RUNNING).increment(1.0);
        Ok(Permits {
            _overall: overall,
            _user: user_permit,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_statement_stops_at_its_own_limit_and_at_the_shared_pool() {
        let shared = shared_pool(Some(1000));
        let a = StatementPool::new(Arc::clone(&shared), Some(600));
        let b = StatementPool::new(Arc::clone(&shared), Some(600));
        let ra = a.results();
        let rb = b.results();
        ra.try_grow(500).unwrap();
        let err = ra.try_grow(200).unwrap_err().to_string();
        assert!(err.contains("statement memory limit"), "{err}");
        assert_eq!(a.reserved(), 500);
        rb.try_grow(400).unwrap();
        // b is within its own limit, but the shared pool has 100 left.
        let err = rb.try_grow(150).unwrap_err().to_string();
        assert!(err.contains("in use by other statements"), "{err}");
        assert!(!err.contains("500"), "no word of what others hold: {err}");
        assert_eq!(b.reserved(), 400);
        assert_eq!(shared.reserved(), 900);
        drop(ra);
        assert_eq!(shared.reserved(), 400);
        rb.try_grow(150).unwrap();
    }

    #[test]
    fn caps_count_statements_per_user_and_overall() {
        let admission = Admission::new(3, 2);
        let a1 = admission.admit("a").unwrap();
        let _a2 = admission.admit("a").unwrap();
        assert!(matches!(admission.admit("a"), Err(Busy::User { .. })));
        let _b1 = admission.admit("b").unwrap();
        assert_eq!(admission.admit("c").unwrap_err(), Busy::Server(3));
        drop(a1);
        let _c1 = admission.admit("c").unwrap();
        assert!(matches!(admission.admit("a"), Err(Busy::Server(3))));
    }
}
