//! fleetlake's query stage: SQL over the lake plus the hot buffer, for people, tools
//! and dashboards. `ARCHITECTURE.md` at the repository root shows where it sits.
//!
//! ```text
//!  lake (Delta tables) ──┐                                   ┌─> HTTP /api/v1/sql
//!                        ├─> session per caller ─> DataFusion ┼─> Postgres wire protocol
//!  hot buffer (HotData) ─┘   (tables resolved per             │   (psql, drivers, Grafana)
//!                             statement, account filter)      └─> `fleetlake query`
//! ```
//!
//! A statement reads the latest lake version of each table it names plus the hot rows
//! not in that version, so a datapoint is visible as soon as its write was
//! acknowledged. Queries are read-only (DDL, DML, COPY and other statements are
//! refused), and see only the accounts their credential allows ([`access`]), through
//! a scan no expression of theirs reaches below ([`table::AccountFilter`]). Every
//! statement passes [`guard`] before it is parsed (size, expression depth, settings,
//! `EXPLAIN`) and runs under [`limits`]: one memory pool for all clients with each
//! statement's limit inside it, and caps on statements at once. What this guarantees,
//! and to whom: `SECURITY.md` at the repository's root.

pub mod access;
pub mod bounded;
pub mod engine;
pub mod format;
mod grouped;
pub mod guard;
pub mod http;
pub mod incremental;
pub mod limits;
pub mod metrics;
mod moving;
pub mod pg;
pub mod shape;
pub mod table;
pub mod tls;

pub use access::{Access, Principal, User};
pub use engine::{Admitted, HotData, QueryEngine, QueryError, QueryLimits, QueryOutput, SideTable};
pub use format::{OutputFormat, render};
pub use guard::TextLimits;

/// Stack of each runtime thread that plans and runs statements: room for the deepest
/// expression [`TextLimits`] lets through. Its default, 1,000 levels, plans and runs
/// in an eighth of it in a debug build (between 4 and 8 MiB; tested). Only the pages a
/// thread touches take memory.
pub const WORKER_STACK_BYTES: usize = 64 << 20;
