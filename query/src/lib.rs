//! fleetlake's query stage: SQL over the lake plus the hot buffer, for people, tools
//! and dashboards.
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
//! refused), bounded in memory and time, and see only the accounts their credential
//! allows ([`access`]).

pub mod access;
pub mod engine;
pub mod format;
pub mod http;
pub mod metrics;
pub mod pg;
pub mod table;
pub mod tls;

pub use access::{Access, Principal, User};
pub use engine::{HotData, QueryEngine, QueryError, QueryLimits, QueryOutput, SideTable};
pub use format::{OutputFormat, render};
