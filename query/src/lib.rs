//! fleetlake's query stage: SQL over the lake plus the hot buffer.
//!
//! ```text
//!  lake (Delta tables) ──┐
//!                        ├─> LakeWithHot ─> DataFusion session ─> HTTP /api/v1/sql,
//!  hot buffer (HotData) ─┘   (one table:                           `fleetlake query`
//!                             union of both)                       (table, CSV, JSON, Arrow)
//! ```
//!
//! Every query gets a fresh session over the latest lake version and the hot rows not
//! in that version, so a datapoint is visible as soon as its write was acknowledged.
//! Queries are read-only: DDL, DML and other statements are refused.

pub mod engine;
pub mod format;
pub mod http;
pub mod metrics;
pub mod table;

pub use engine::{HotData, QueryEngine, QueryError, QueryOutput};
pub use format::{OutputFormat, render};
