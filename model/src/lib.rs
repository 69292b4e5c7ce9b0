//! fleetlake's data model, shared by every stage and depending on nothing heavy (Arrow,
//! no HTTP server, no AWS SDK, no query engine). See `ARCHITECTURE.md` at the repository
//! root for how the stages use it.
//!
//! - [`schema`]: the lake's tables (`metrics`, `logs`, `dead_letters`) and their Arrow
//!   schemas: what decoders emit, the WAL stores, the hot buffer holds and the lake keeps.
//! - [`keys`]: the identity of a row (its series and its de-duplication key).
//! - [`sink`]: the seams between ingest and the write path ([`sink::RowSink`] for sources
//!   that need a write-ahead log, [`sink::StreamSink`] for replayable streams).
//! - [`clock`]: where "now" comes from, so tests can move time by hand.
//! - [`error`]: error kinds, each with its HTTP status and SQLSTATE.
//! - [`retry`]: the one retry policy (exponential backoff, full jitter).

pub mod clock;
pub mod error;
pub mod keys;
pub mod retry;
pub mod schema;
pub mod sink;

pub use clock::{Clock, SharedClock};
pub use error::ErrorKind;
pub use schema::Table;
pub use sink::{RowSink, SinkError, StreamSink};
