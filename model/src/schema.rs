//! The data model shared by every stage: the lake's tables and their Arrow schemas.
//!
//! - `metrics`: one row per datapoint ([`metrics_schema`]);
//! - `logs`: one row per CloudWatch Logs event ([`logs_schema`]);
//! - `dead_letters`: one row per record (or part of one) that could not be decoded,
//!   with its raw bytes ([`dead_letters_schema`]).
//!
//! The schemas here are what decoders emit, what the write-ahead log stores, what the
//! hot buffer holds and what the lake's Delta tables are created with. Map and list
//! fields use the names Delta's own Arrow conversion uses (`key_value`, `key`,
//! `value`, `element`) so the lake hands the same schema back.

use std::sync::{Arc, LazyLock};

use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};

/// Name of the metrics table in the lake and in SQL.
pub const METRICS_TABLE: &str = "metrics";
/// Name of the logs table in the lake and in SQL.
pub const LOGS_TABLE: &str = "logs";
/// Name of the dead letters table in the lake and in SQL.
pub const DEAD_LETTERS_TABLE: &str = "dead_letters";
/// Partition column of every table: the UTC day of `time`.
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
/// The list item field name Delta uses.
pub const LIST_ELEMENT: &str = "element";

fn time_field() -> Field {
    Field::new(
        "time",
        DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        false,
    )
}

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
        time_field(),
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

/// Column indexes of [`logs_schema`], in order.
pub mod logs_col {
    /// `time`: the event's timestamp, UTC, microsecond timestamp holding milliseconds.
    pub const TIME: usize = 0;
    /// `account_id`: the account that owns the log group.
    pub const ACCOUNT_ID: usize = 1;
    /// `region`: the log group's region.
    pub const REGION: usize = 2;
    /// `log_group`: the log group name.
    pub const LOG_GROUP: usize = 3;
    /// `log_stream`: the log stream name.
    pub const LOG_STREAM: usize = 4;
    /// `event_id`: CloudWatch Logs' id of the event, unique within the log group.
    pub const EVENT_ID: usize = 5;
    /// `message`: the log message.
    pub const MESSAGE: usize = 6;
    /// `subscription_filters`: the subscription filters that matched the event.
    pub const SUBSCRIPTION_FILTERS: usize = 7;
    /// `day`: partition column, the UTC date of `time`.
    pub const DAY: usize = 8;
}

static LOGS_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        time_field(),
        Field::new("account_id", DataType::Utf8, false),
        Field::new("region", DataType::Utf8, false),
        Field::new("log_group", DataType::Utf8, false),
        Field::new("log_stream", DataType::Utf8, false),
        Field::new("event_id", DataType::Utf8, false),
        Field::new("message", DataType::Utf8, false),
        Field::new(
            "subscription_filters",
            DataType::List(Arc::new(Field::new(LIST_ELEMENT, DataType::Utf8, true))),
            true,
        ),
        Field::new(DAY_COLUMN, DataType::Date32, false),
    ]))
});

/// The Arrow schema of the `logs` table (see the [`logs_col`] indexes).
pub fn logs_schema() -> SchemaRef {
    Arc::clone(&LOGS_SCHEMA)
}

/// Column indexes of [`dead_letters_schema`], in order.
pub mod dead_col {
    /// `time`: when the record was delivered (the Firehose request's timestamp, or
    /// when it was read), UTC.
    pub const TIME: usize = 0;
    /// `source`: the configured source it came through, e.g. `firehose/otel`.
    pub const SOURCE: usize = 1;
    /// `format`: the format it was decoded as.
    pub const FORMAT: usize = 2;
    /// `position`: where in the source: request id and record index, file and line, ...
    pub const POSITION: usize = 3;
    /// `reason`: why it could not be decoded.
    pub const REASON: usize = 4;
    /// `data_base64`: the raw bytes, base64 (standard alphabet, padded).
    pub const DATA_BASE64: usize = 5;
    /// `day`: partition column, the UTC date of `time`.
    pub const DAY: usize = 6;
}

static DEAD_LETTERS_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        time_field(),
        Field::new("source", DataType::Utf8, false),
        Field::new("format", DataType::Utf8, false),
        Field::new("position", DataType::Utf8, false),
        Field::new("reason", DataType::Utf8, false),
        Field::new("data_base64", DataType::Utf8, false),
        Field::new(DAY_COLUMN, DataType::Date32, false),
    ]))
});

/// The Arrow schema of the `dead_letters` table (see the [`dead_col`] indexes).
pub fn dead_letters_schema() -> SchemaRef {
    Arc::clone(&DEAD_LETTERS_SCHEMA)
}

/// The lake's tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    /// `metrics`: one row per datapoint.
    Metrics,
    /// `logs`: one row per log event.
    Logs,
    /// `dead_letters`: undecodable input, kept raw.
    DeadLetters,
}

impl Table {
    /// Every table, in [`Table::index`] order.
    pub const ALL: [Table; 3] = [Table::Metrics, Table::Logs, Table::DeadLetters];

    /// The table's name in the lake and in SQL.
    pub fn name(self) -> &'static str {
        match self {
            Table::Metrics => METRICS_TABLE,
            Table::Logs => LOGS_TABLE,
            Table::DeadLetters => DEAD_LETTERS_TABLE,
        }
    }

    /// The table's Arrow schema.
    pub fn schema(self) -> SchemaRef {
        match self {
            Table::Metrics => metrics_schema(),
            Table::Logs => logs_schema(),
            Table::DeadLetters => dead_letters_schema(),
        }
    }

    /// A small stable number (0, 1, 2), used in the write-ahead log and for indexing.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The table with [`Table::index`] `i`.
    pub fn from_index(i: usize) -> Option<Table> {
        Table::ALL.get(i).copied()
    }
}

impl std::fmt::Display for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
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
