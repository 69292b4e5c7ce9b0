//! The `alerts` table: every state transition of every alert instance (and of fleet
//! incidents), for SQL and as Grafana annotations.

use std::sync::{Arc, LazyLock};

use arrow::array::{
    ArrayRef, Float64Builder, MapBuilder, MapFieldNames, RecordBatch, StringBuilder,
    TimestampMicrosecondBuilder,
};
use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};
use serde::{Deserialize, Serialize};

use crate::state::Labels;

/// The table's name in the lake and in SQL.
pub const TABLE: &str = "alerts";
const MAP_ENTRIES: &str = "key_value";

/// One transition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransitionRow {
    /// When (evaluation time, epoch ms).
    pub time: i64,
    /// Rule group.
    pub rule_group: String,
    /// Rule name.
    pub alertname: String,
    /// New state: `pending`, `firing`, `resolved`, `inactive`.
    pub state: String,
    /// State before.
    pub previous_state: String,
    /// The instance's fingerprint (a fleet incident's dedup key).
    pub fingerprint: String,
    /// The account it is about, if its labels name one.
    pub account_id: Option<String>,
    /// Its value (a fleet incident's: the number of accounts).
    pub value: f64,
    /// Labels (shared with the instance they are of).
    pub labels: Arc<Labels>,
    /// Annotations (shared with the instance they are of).
    pub annotations: Arc<Labels>,
    /// Active since (epoch ms).
    pub active_at: i64,
    /// What was sent: receivers, or why nothing (`silenced`, `storm`, `inactive account`).
    pub notification: String,
}

fn time_type() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

fn map_field(name: &str) -> Field {
    let entries = Field::new(
        MAP_ENTRIES,
        DataType::Struct(Fields::from(vec![
            Field::new("key", DataType::Utf8, false),
            Field::new("value", DataType::Utf8, true),
        ])),
        false,
    );
    Field::new(name, DataType::Map(Arc::new(entries), false), true)
}

static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("time", time_type(), false),
        Field::new("rule_group", DataType::Utf8, false),
        Field::new("alertname", DataType::Utf8, false),
        Field::new("state", DataType::Utf8, false),
        Field::new("previous_state", DataType::Utf8, false),
        Field::new("fingerprint", DataType::Utf8, false),
        Field::new("account_id", DataType::Utf8, true),
        Field::new("value", DataType::Float64, true),
        map_field("labels"),
        map_field("annotations"),
        Field::new("active_at", time_type(), false),
        Field::new("notification", DataType::Utf8, false),
    ]))
});

/// Schema of the `alerts` table.
pub fn schema() -> SchemaRef {
    Arc::clone(&SCHEMA)
}

/// `rows` as one batch of the table.
pub fn to_batch(rows: &[TransitionRow]) -> RecordBatch {
    let names = || MapFieldNames {
        entry: MAP_ENTRIES.into(),
        key: "key".into(),
        value: "value".into(),
    };
    let mut time = TimestampMicrosecondBuilder::new().with_timezone("UTC");
    let mut group = StringBuilder::new();
    let mut alertname = StringBuilder::new();
    let mut state = StringBuilder::new();
    let mut previous = StringBuilder::new();
    let mut fingerprint = StringBuilder::new();
    let mut account = StringBuilder::new();
    let mut value = Float64Builder::new();
    let mut labels = MapBuilder::new(Some(names()), StringBuilder::new(), StringBuilder::new());
    let mut annotations =
        MapBuilder::new(Some(names()), StringBuilder::new(), StringBuilder::new());
    let mut active = TimestampMicrosecondBuilder::new().with_timezone("UTC");
    let mut notification = StringBuilder::new();
    for row in rows {
        time.append_value(row.time * 1000);
        group.append_value(&row.rule_group);
        alertname.append_value(&row.alertname);
        state.append_value(&row.state);
        previous.append_value(&row.previous_state);
        fingerprint.append_value(&row.fingerprint);
        account.append_option(row.account_id.as_deref());
        value.append_value(row.value);
        for (map, builder) in [
            (&row.labels, &mut labels),
            (&row.annotations, &mut annotations),
        ] {
            for (k, v) in map.iter() {
                builder.keys().append_value(k);
                builder.values().append_value(v);
            }
            builder.append(true).expect("keys and values match");
        }
        active.append_value(row.active_at * 1000);
        notification.append_value(&row.notification);
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(time.finish()),
        Arc::new(group.finish()),
        Arc::new(alertname.finish()),
        Arc::new(state.finish()),
        Arc::new(previous.finish()),
        Arc::new(fingerprint.finish()),
        Arc::new(account.finish()),
        Arc::new(value.finish()),
        Arc::new(labels.finish()),
        Arc::new(annotations.finish()),
        Arc::new(active.finish()),
        Arc::new(notification.finish()),
    ];
    RecordBatch::try_new(schema(), columns).expect("columns match the alerts schema")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_make_a_batch_of_the_schema() {
        let row = TransitionRow {
            time: 1_000,
            rule_group: "g".into(),
            alertname: "A".into(),
            state: "firing".into(),
            previous_state: "pending".into(),
            fingerprint: "f".into(),
            account_id: Some("1".into()),
            value: 2.0,
            labels: Arc::new(Labels::from([("a".to_string(), "b".to_string())])),
            annotations: Arc::default(),
            active_at: 0,
            notification: "pd".into(),
        };
        let batch = to_batch(&[row.clone(), row]);
        assert_eq!(batch.num_rows(), 2);
        assert_eq!(batch.schema(), schema());
    }
}
