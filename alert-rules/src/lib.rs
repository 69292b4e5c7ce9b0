//! fleetlake's alerting stage (to come): rule files whose `expr` is SQL over the fleet,
//! evaluated once per interval over the hot buffer and the lake through `query/`, with
//! Prometheus-style alert states, routed to PagerDuty Events API v2 and
//! Alertmanager-compatible webhooks.
//!
//! Nothing is evaluated yet; this crate holds the place the design gives it so the
//! workspace reads in the order data flows: ingest → aggregate → query → alert-rules.
