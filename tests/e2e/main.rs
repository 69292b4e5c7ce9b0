//! End-to-end tests: the real `fleetlake` binary on port 0, real Firehose requests,
//! kill -9 and restart, SQL answers checked exactly, and the lake read back by the
//! Python `deltalake` package. One test binary; each area is a module.

#![allow(unreachable_pub)]

mod alerting;
mod backfill;
mod bad_input;
mod compaction;
mod durability;
mod faults;
mod firehose;
mod formats;
mod hardening;
mod kinesis;
mod lake_readers;
mod loadgen;
mod postgres;
mod rollups;
mod s3;
mod security;
mod sql;
mod support;
mod tls;
