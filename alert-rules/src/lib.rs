//! fleetlake's alerting stage: rules evaluated **once over the whole fleet**.
//! `ARCHITECTURE.md` at the repository root shows where it sits.
//!
//! ```text
//!  rule files (YAML, expr = SQL) ─> every group's interval: SQL over lake + hot buffer
//!    ─> one alert instance per row (value + labels, registry fields added)
//!    ─> states (pending → firing → resolved, `for`, `keep_firing_for`), silences,
//!       storm control (one fleet incident instead of hundreds of pages)
//!    ─> a state file per group + outbox (durable) ─> PagerDuty Events API v2, Alertmanager,
//!                                        Alertmanager webhooks
//!    ─> `alerts` table in the lake (every transition; SQL and Grafana annotations)
//! ```
//!
//! The SQL itself runs in the query stage; this crate sees it through [`SqlSource`],
//! and writes the `alerts` table through [`TransitionLog`]: the binary wires both.
//! Failures are [`AlertError`]s, whose variant says whose fault they are: an outage of
//! the query engine is not counted against the rule that was being evaluated.
//!
//! Every decision by the time of day (evaluation time, `for`, `keep_firing_for`,
//! silences, storm start, outbox retries) asks the [`SharedClock`] given in
//! [`AlertingParts`], so tests move time by hand.
//!
//! [`SharedClock`]: fleetlake_model::clock::SharedClock

pub mod check;
pub mod config;
pub mod engine;
pub mod error;
pub mod matchers;
pub mod notify;
pub mod redact;
pub mod registry;
pub mod rules;
pub mod state;
pub mod store;
pub mod table;
pub mod template;
pub mod time;

pub use config::AlertingConfig;
pub use engine::{Alerting, AlertingParts, Queued, Round, Shared, SqlSource, TransitionLog};
pub use error::AlertError;
pub use registry::Registry;
pub use rules::{RuleError, RuleGroup};
pub use store::{DirStates, GroupLeases, SharedStates};
