//! Identity of rows: the series and the de-duplication key, per table.
//!
//! - `metrics`: a series is (account, region, namespace, metric, dimensions); a
//!   datapoint's key adds its time.
//! - `logs`: a series is (account, log group); an event's key adds its event id.
//! - `dead_letters`: a series is the source; a dead letter's key adds its position and
//!   delivery time (a Firehose retry repeats both).
//!
//! Both are hashed with xxh3 over the strings separated by 0xFF, a byte that never
//! occurs in UTF-8, so different field splits cannot collide by concatenation.

use crate::schema::{Table, col, dead_col, logs_col};
use arrow::array::{Array, AsArray, RecordBatch, StringArray};
use arrow::datatypes::TimestampMicrosecondType;
use xxhash_rust::xxh3::{xxh3_64, xxh3_128};

/// A `Hasher` for keys that are already xxh3 hashes ([`RowKey`]'s `series` and
/// `point`): it keeps their low 64 bits instead of hashing them again with SipHash.
#[derive(Debug, Default, Clone, Copy)]
pub struct PreHashed(u64);

impl std::hash::Hasher for PreHashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Not used by u64/u128 keys; fold anything else in so it still works.
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(word))
                .wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
    fn write_u128(&mut self, n: u128) {
        self.0 = n as u64;
    }
}

/// Hash maps and sets keyed by [`RowKey`] hashes.
pub type KeyHasher = std::hash::BuildHasherDefault<PreHashed>;

/// The identity of one row of a `metrics` batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowKey {
    /// Hash of the series.
    pub series: u64,
    /// Hash of the series and the time: the de-duplication key.
    pub point: u128,
    /// The row's time, epoch microseconds.
    pub time: i64,
}

/// Computes the [`RowKey`] of every row of a batch of `table`'s schema.
pub fn row_keys(table: Table, batch: &RecordBatch) -> Vec<RowKey> {
    match table {
        Table::Metrics => metrics_keys(batch),
        Table::Logs => keyed_by(
            batch,
            logs_col::TIME,
            &[logs_col::ACCOUNT_ID, logs_col::LOG_GROUP],
            &[logs_col::EVENT_ID],
            false,
        ),
        Table::DeadLetters => keyed_by(
            batch,
            dead_col::TIME,
            &[dead_col::SOURCE],
            &[dead_col::POSITION],
            true,
        ),
    }
}

/// The column that narrows the lake scan checking redelivered rows (with the time).
pub fn scan_column(table: Table) -> &'static str {
    match table {
        Table::Metrics | Table::Logs => "account_id",
        Table::DeadLetters => "source",
    }
}

/// Keys from string columns: `series` columns make the series, `point` columns (and
/// the time, if `with_time`) the rest of the key.
fn keyed_by(
    batch: &RecordBatch,
    time_col: usize,
    series: &[usize],
    point: &[usize],
    with_time: bool,
) -> Vec<RowKey> {
    let strings = |cols: &[usize]| -> Vec<&StringArray> {
        cols.iter()
            .map(|&i| batch.column(i).as_string::<i32>())
            .collect()
    };
    let (series, point) = (strings(series), strings(point));
    let time = batch
        .column(time_col)
        .as_primitive::<TimestampMicrosecondType>();
    let mut buf = Vec::with_capacity(256);
    (0..batch.num_rows())
        .map(|row| {
            buf.clear();
            for column in &series {
                buf.extend_from_slice(column.value(row).as_bytes());
                buf.push(0xFF);
            }
            let series_hash = xxh3_64(&buf);
            for column in &point {
                buf.extend_from_slice(column.value(row).as_bytes());
                buf.push(0xFF);
            }
            let t = time.value(row);
            if with_time {
                buf.extend_from_slice(&t.to_le_bytes());
            }
            RowKey {
                series: series_hash,
                point: xxh3_128(&buf),
                time: t,
            }
        })
        .collect()
}

fn metrics_keys(batch: &RecordBatch) -> Vec<RowKey> {
    let strings = |i: usize| batch.column(i).as_string::<i32>();
    let account: &StringArray = strings(col::ACCOUNT_ID);
    let region = strings(col::REGION);
    let namespace = strings(col::NAMESPACE);
    let metric = strings(col::METRIC_NAME);
    let dims = batch.column(col::DIMENSIONS).as_map();
    let dim_keys = dims.keys().as_string::<i32>();
    let dim_values = dims.values().as_string::<i32>();
    let offsets = dims.value_offsets();
    let time = batch
        .column(col::TIME)
        .as_primitive::<TimestampMicrosecondType>();
    let mut buf = Vec::with_capacity(256);
    (0..batch.num_rows())
        .map(|row| {
            buf.clear();
            for part in [
                account.value(row),
                region.value(row),
                namespace.value(row),
                metric.value(row),
            ] {
                buf.extend_from_slice(part.as_bytes());
                buf.push(0xFF);
            }
            if !dims.is_null(row) {
                for entry in offsets[row] as usize..offsets[row + 1] as usize {
                    buf.extend_from_slice(dim_keys.value(entry).as_bytes());
                    buf.push(0xFE);
                    buf.extend_from_slice(dim_values.value(entry).as_bytes());
                    buf.push(0xFF);
                }
            }
            let series = xxh3_64(&buf);
            let t = time.value(row);
            buf.extend_from_slice(&t.to_le_bytes());
            RowKey {
                series,
                point: xxh3_128(&buf),
                time: t,
            }
        })
        .collect()
}
