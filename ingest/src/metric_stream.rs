//! Decoder for CloudWatch Metric Streams in the JSON output format.
//!
//! A record holds newline-separated JSON objects, one datapoint each (see
//! `formats.md` §1). Each valid line becomes one row of the [`metrics_schema`]; a bad
//! line is reported as a [`LineError`] and the lines around it are kept.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, Date32Builder, Float64Builder, MapBuilder, MapFieldNames, RecordBatch, StringBuilder,
    TimestampMicrosecondBuilder,
};
use serde::Deserialize;

use crate::schema::{MAP_ENTRIES, day_of_millis, metrics_schema};

/// One metric-stream datapoint as it appears on the wire, borrowing from the record.
#[derive(Debug, Deserialize)]
struct WireDatapoint<'a> {
    #[serde(borrow)]
    account_id: Cow<'a, str>,
    #[serde(borrow)]
    region: Cow<'a, str>,
    #[serde(borrow)]
    namespace: Cow<'a, str>,
    #[serde(borrow)]
    metric_name: Cow<'a, str>,
    #[serde(borrow, default)]
    dimensions: BTreeMap<Cow<'a, str>, Cow<'a, str>>,
    timestamp: i64,
    #[serde(borrow)]
    value: BTreeMap<Cow<'a, str>, f64>,
    #[serde(borrow, default)]
    unit: Option<Cow<'a, str>>,
}

/// Why one line of a record could not be decoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LineError {
    /// The line is not a JSON object of the metric-stream shape.
    #[error("line {line}: invalid metric stream JSON: {message}")]
    Json {
        /// 1-based line number inside the record.
        line: usize,
        /// The parser's message.
        message: String,
    },
    /// The line parsed but a required field is empty or out of range.
    #[error("line {line}: {message}")]
    Invalid {
        /// 1-based line number inside the record.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

/// Accumulates datapoints into Arrow columns of the [`metrics_schema`].
#[derive(Debug)]
pub struct MetricsBatchBuilder {
    time: TimestampMicrosecondBuilder,
    account_id: StringBuilder,
    region: StringBuilder,
    namespace: StringBuilder,
    metric_name: StringBuilder,
    dimensions: MapBuilder<StringBuilder, StringBuilder>,
    unit: StringBuilder,
    count: Float64Builder,
    sum: Float64Builder,
    min: Float64Builder,
    max: Float64Builder,
    stats: MapBuilder<StringBuilder, Float64Builder>,
    day: Date32Builder,
    rows: usize,
}

fn map_names() -> MapFieldNames {
    MapFieldNames {
        entry: MAP_ENTRIES.to_string(),
        key: "key".to_string(),
        value: "value".to_string(),
    }
}

impl Default for MetricsBatchBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl MetricsBatchBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self {
            time: TimestampMicrosecondBuilder::new().with_timezone("UTC"),
            account_id: StringBuilder::new(),
            region: StringBuilder::new(),
            namespace: StringBuilder::new(),
            metric_name: StringBuilder::new(),
            dimensions: MapBuilder::new(
                Some(map_names()),
                StringBuilder::new(),
                StringBuilder::new(),
            ),
            unit: StringBuilder::new(),
            count: Float64Builder::new(),
            sum: Float64Builder::new(),
            min: Float64Builder::new(),
            max: Float64Builder::new(),
            stats: MapBuilder::new(
                Some(map_names()),
                StringBuilder::new(),
                Float64Builder::new(),
            ),
            day: Date32Builder::new(),
            rows: 0,
        }
    }

    /// Rows added so far.
    pub fn len(&self) -> usize {
        self.rows
    }

    /// Whether no row was added.
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Decodes the newline-separated metric-stream JSON of one record, appending every
    /// valid line and returning the errors of the others.
    pub fn push_record(&mut self, record: &[u8]) -> Vec<LineError> {
        let mut errors = Vec::new();
        for (index, line) in record.split(|b| *b == b'\n').enumerate() {
            let line = line.trim_ascii();
            if line.is_empty() {
                continue;
            }
            if let Err(error) = self.push_line(line, index + 1) {
                errors.push(error);
            }
        }
        errors
    }

    fn push_line(&mut self, line: &[u8], number: usize) -> Result<(), LineError> {
        let dp: WireDatapoint<'_> = serde_json::from_slice(line).map_err(|e| LineError::Json {
            line: number,
            message: e.to_string(),
        })?;
        let invalid = |message: &str| LineError::Invalid {
            line: number,
            message: message.to_string(),
        };
        if dp.account_id.is_empty() {
            return Err(invalid("account_id is empty"));
        }
        if dp.region.is_empty() {
            return Err(invalid("region is empty"));
        }
        if dp.namespace.is_empty() || dp.metric_name.is_empty() {
            return Err(invalid("namespace and metric_name must not be empty"));
        }
        // Epoch milliseconds between 1970 and 9999: anything else is not a CloudWatch time.
        if !(0..253_402_300_800_000).contains(&dp.timestamp) {
            return Err(invalid("timestamp is not epoch milliseconds"));
        }
        self.time.append_value(dp.timestamp * 1000);
        self.day.append_value(day_of_millis(dp.timestamp));
        self.account_id.append_value(&dp.account_id);
        self.region.append_value(&dp.region);
        self.namespace.append_value(&dp.namespace);
        self.metric_name.append_value(&dp.metric_name);
        for (k, v) in &dp.dimensions {
            self.dimensions.keys().append_value(k);
            self.dimensions.values().append_value(v);
        }
        self.dimensions
            .append(true)
            .expect("keys and values stay aligned");
        self.unit.append_option(dp.unit.as_deref());
        let stat = |name: &str| dp.value.get(name).copied();
        self.count.append_option(stat("count"));
        self.sum.append_option(stat("sum"));
        self.min.append_option(stat("min"));
        self.max.append_option(stat("max"));
        for (k, v) in &dp.value {
            if !matches!(k.as_ref(), "count" | "sum" | "min" | "max") {
                self.stats.keys().append_value(k);
                self.stats.values().append_value(*v);
            }
        }
        self.stats
            .append(true)
            .expect("keys and values stay aligned");
        self.rows += 1;
        Ok(())
    }

    /// Finishes the rows added so far into a batch of the [`metrics_schema`] and resets
    /// the builder.
    pub fn finish(&mut self) -> RecordBatch {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.time.finish()),
            Arc::new(self.account_id.finish()),
            Arc::new(self.region.finish()),
            Arc::new(self.namespace.finish()),
            Arc::new(self.metric_name.finish()),
            Arc::new(self.dimensions.finish()),
            Arc::new(self.unit.finish()),
            Arc::new(self.count.finish()),
            Arc::new(self.sum.finish()),
            Arc::new(self.min.finish()),
            Arc::new(self.max.finish()),
            Arc::new(self.stats.finish()),
            Arc::new(self.day.finish()),
        ];
        self.rows = 0;
        RecordBatch::try_new(metrics_schema(), columns).expect("builders match the schema")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::col;
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{Float64Type, TimestampMicrosecondType};

    const SAMPLE: &str = r#"{"metric_stream_name":"MyMetricStream","account_id":"1234567890","region":"us-east-1","namespace":"AWS/EC2","metric_name":"DiskWriteOps","dimensions":{"InstanceId":"i-123456789012"},"timestamp":1611929698000,"value":{"count":3.0,"sum":20.0,"max":18.0,"min":0.0,"p99":17.56,"p99.9":17.8764,"TM(25%:75%)":16.43},"unit":"Seconds"}"#;

    #[test]
    fn decodes_the_documented_sample() {
        let mut b = MetricsBatchBuilder::new();
        assert!(b.push_record(SAMPLE.as_bytes()).is_empty());
        let batch = b.finish();
        assert_eq!(batch.num_rows(), 1);
        let time = batch
            .column(col::TIME)
            .as_primitive::<TimestampMicrosecondType>();
        assert_eq!(time.value(0), 1_611_929_698_000_000);
        assert_eq!(
            batch.column(col::ACCOUNT_ID).as_string::<i32>().value(0),
            "1234567890"
        );
        assert_eq!(
            batch.column(col::UNIT).as_string::<i32>().value(0),
            "Seconds"
        );
        let sum = batch.column(col::SUM).as_primitive::<Float64Type>();
        assert_eq!(sum.value(0), 20.0);
        let dims = batch.column(col::DIMENSIONS).as_map();
        assert_eq!(
            dims.value(0).column(0).as_string::<i32>().value(0),
            "InstanceId"
        );
        let stats = batch.column(col::STATS).as_map();
        let keys = stats.value(0).column(0).as_string::<i32>().clone();
        let names: Vec<_> = keys.iter().flatten().collect();
        assert_eq!(names, vec!["TM(25%:75%)", "p99", "p99.9"]);
        let day = batch
            .column(col::DAY)
            .as_primitive::<arrow::datatypes::Date32Type>();
        assert_eq!(day.value(0), 18656);
    }

    #[test]
    fn bad_lines_are_reported_and_good_lines_kept() {
        let record = format!(
            "{SAMPLE}\nnot json\n{}\n\n{SAMPLE}\n",
            SAMPLE.replace("\"1234567890\"", "\"\"")
        );
        let mut b = MetricsBatchBuilder::new();
        let errors = b.push_record(record.as_bytes());
        assert_eq!(errors.len(), 2);
        assert!(matches!(errors[0], LineError::Json { line: 2, .. }));
        assert!(matches!(errors[1], LineError::Invalid { line: 3, .. }));
        let batch = b.finish();
        assert_eq!(batch.num_rows(), 2);
        assert_eq!(batch.column(col::DIMENSIONS).null_count(), 0);
    }

    #[test]
    fn missing_dimensions_and_unit_are_allowed() {
        let line = r#"{"account_id":"1","region":"eu-west-1","namespace":"AWS/Lambda","metric_name":"Errors","timestamp":60000,"value":{"count":1,"sum":0,"min":0,"max":0}}"#;
        let mut b = MetricsBatchBuilder::new();
        assert!(b.push_record(line.as_bytes()).is_empty());
        let batch = b.finish();
        assert!(batch.column(col::UNIT).is_null(0));
        assert_eq!(batch.column(col::DIMENSIONS).as_map().value_length(0), 0);
    }
}
