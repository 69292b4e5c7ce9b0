//! The `metrics` data model shared by every stage: one row per datapoint.
//!
//! The Arrow schema here is what decoders emit, what the write-ahead log stores, what
//! the hot buffer holds and what the lake's `metrics` Delta table is created with. Map
//! fields use the names Delta's own Arrow conversion uses (`key_value`, `key`,
//! `value`) so the lake hands the same schema back.

use std::sync::{Arc, LazyLock};

use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};

/// Name of the metrics table in the lake and in SQL.
pub const METRICS_TABLE: &str = "metrics";
/// Partition column of the metrics table: the UTC day of `time`.
pub const DAY_COLUMN: &str = "day";
/// Milliseconds in a day, for computing the `day` partition from epoch milliseconds.
pub const MILLIS_PER_DAY: i64 = 86_400_000;

/// Column indexes of [`metrics_schema`], in order.
pub mod col {
    /// `time`: start of the period, UTC, microsecond timestamp holding whole milliseconds.
    pub const TIME: usize = 0;
    /// `account_id`: the AWS account the datapoint belongs to.
    pub const ACCOUNT_ID: usize = 1;
    /// `region`: the AWS region of the datapoint.
    pub const REGION: usize = 2;
    /// `namespace`: CloudWatch namespace, e.g. `AWS/Lambda`.
    pub const NAMESPACE: usize = 3;
    /// `metric_name`: CloudWatch metric name.
    pub const METRIC_NAME: usize = 4;
    /// `dimensions`: map of dimension name to value, keys sorted.
    pub const DIMENSIONS: usize = 5;
    /// `unit`: CloudWatch unit name.
    pub const UNIT: usize = 6;
    /// `count`: SampleCount of the period.
    pub const COUNT: usize = 7;
    /// `sum`: Sum of the period.
    pub const SUM: usize = 8;
    /// `min`: Minimum of the period.
    pub const MIN: usize = 9;
    /// `max`: Maximum of the period.
    pub const MAX: usize = 10;
    /// `stats`: extra statistics (`p99`, `TM(25%:75%)`, ...), keys sorted.
    pub const STATS: usize = 11;
    /// `day`: partition column, the UTC date of `time`.
    pub const DAY: usize = 12;
}

/// The map entry field names Delta uses.
pub const MAP_ENTRIES: &str = "key_value";

fn map_field(name: &str, value: DataType) -> Field {
    let entries = Field::new(
        MAP_ENTRIES,
        DataType::Struct(Fields::from(vec![
            Field::new("key", DataType::Utf8, false),
            Field::new("value", value, true),
        ])),
        false,
    );
    Field::new(name, DataType::Map(Arc::new(entries), false), true)
}

static METRICS_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new(
            "time",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
        Field::new("account_id", DataType::Utf8, false),
        Field::new("region", DataType::Utf8, false),
        Field::new("namespace", DataType::Utf8, false),
        Field::new("metric_name", DataType::Utf8, false),
        map_field("dimensions", DataType::Utf8),
        Field::new("unit", DataType::Utf8, true),
        Field::new("count", DataType::Float64, true),
        Field::new("sum", DataType::Float64, true),
        Field::new("min", DataType::Float64, true),
        Field::new("max", DataType::Float64, true),
        map_field("stats", DataType::Float64),
        Field::new(DAY_COLUMN, DataType::Date32, false),
    ]))
});

/// The Arrow schema of the `metrics` table (see the [`col`] indexes).
pub fn metrics_schema() -> SchemaRef {
    Arc::clone(&METRICS_SCHEMA)
}

/// The UTC day number (days since 1970-01-01) of an epoch-milliseconds instant.
pub fn day_of_millis(ms: i64) -> i32 {
    ms.div_euclid(MILLIS_PER_DAY) as i32
}

/// Casts the columns of `batch` to the types of the same-named fields of `target`
/// (for instance `Utf8View` read back from Parquet to `Utf8`, or map entry names), in
/// `target`'s order. Fails if a column is missing or cannot be cast.
pub fn conform(
    batch: &arrow::array::RecordBatch,
    target: &SchemaRef,
) -> Result<arrow::array::RecordBatch, arrow::error::ArrowError> {
    if batch.schema().fields() == target.fields() {
        return Ok(batch.clone());
    }
    let columns = target
        .fields()
        .iter()
        .map(|field| {
            let column = batch.column_by_name(field.name()).ok_or_else(|| {
                arrow::error::ArrowError::SchemaError(format!("missing column {}", field.name()))
            })?;
            if column.data_type() == field.data_type() {
                Ok(Arc::clone(column))
            } else {
                arrow::compute::cast(column, field.data_type())
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    arrow::array::RecordBatch::try_new_with_options(
        Arc::clone(target),
        columns,
        &arrow::array::RecordBatchOptions::new().with_row_count(Some(batch.num_rows())),
    )
}
