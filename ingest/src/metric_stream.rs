//! Decoder for CloudWatch Metric Streams in the JSON output format.
//!
//! A record holds newline-separated JSON objects, one datapoint each (see
//! `formats.md` §1). Each valid line becomes one row of the [`metrics_schema`]; a bad
//! line is reported as a [`LineError`] and the lines around it are kept.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;
use std::ops::Range;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, Date32Builder, Float64Builder, MapBuilder, MapFieldNames, RecordBatch, StringBuilder,
    TimestampMicrosecondBuilder,
};
use serde::Deserialize;
use serde::de::{Deserializer, MapAccess, Visitor};
use smallvec::SmallVec;

use fleetlake_model::schema::{MAP_ENTRIES, day_of_millis, metrics_schema};

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
    dimensions: Entries<'a, Text<'a>>,
    timestamp: i64,
    #[serde(borrow)]
    value: Entries<'a, f64>,
    #[serde(borrow, default)]
    unit: Option<Cow<'a, str>>,
}

/// A JSON string, borrowed from the line unless it has escapes.
#[derive(Debug)]
struct Text<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct TextVisitor<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for TextVisitor<'a> {
            type Value = Text<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v.to_string())))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        d.deserialize_str(TextVisitor(PhantomData))
    }
}

/// The entries of a JSON object (`dimensions`, `value`) sorted by key, the last one
/// kept where a key repeats. A datapoint has a handful, so they stay inline instead
/// of in a map allocated per line.
#[derive(Debug)]
struct Entries<'a, V>(SmallVec<[(Cow<'a, str>, V); 4]>);

impl<V> Default for Entries<'_, V> {
    fn default() -> Self {
        Self(SmallVec::new())
    }
}

impl<'a, V> Entries<'a, V> {
    fn get(&self, key: &str) -> Option<&V> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
}

impl<'de: 'a, 'a, V: Deserialize<'de>> Deserialize<'de> for Entries<'a, V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct EntriesVisitor<'a, V>(PhantomData<(&'a (), V)>);
        impl<'de: 'a, 'a, V: Deserialize<'de>> Visitor<'de> for EntriesVisitor<'a, V> {
            type Value = Entries<'a, V>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut entries: SmallVec<[(Cow<'a, str>, V); 4]> = SmallVec::new();
                while let Some((Text(key), value)) = map.next_entry::<Text<'a>, V>()? {
                    entries.push((key, value));
                }
                // Stable, so of equal keys the later stays later; of a run of them the
                // first slot keeps the last one's value.
                entries.sort_by(|a, b| a.0.cmp(&b.0));
                entries.dedup_by(|later, kept| {
                    let repeated = later.0 == kept.0;
                    if repeated {
                        std::mem::swap(later, kept);
                    }
                    repeated
                });
                Ok(Entries(entries))
            }
        }
        d.deserialize_map(EntriesVisitor(PhantomData))
    }
}

/// Why one line of a record could not be decoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct LineError {
    /// 1-based line number inside the record.
    pub line: usize,
    /// The line's bytes inside the record (kept as a dead letter).
    pub span: Range<usize>,
    /// What is wrong.
    pub message: String,
}

/// The identity of a datapoint: account, region, namespace, metric name.
#[derive(Debug, Clone, Copy)]
pub struct SeriesId<'a> {
    /// The AWS account id.
    pub account_id: &'a str,
    /// The AWS region.
    pub region: &'a str,
    /// The CloudWatch namespace.
    pub namespace: &'a str,
    /// The CloudWatch metric name.
    pub metric_name: &'a str,
}

/// The base statistics of a datapoint.
#[derive(Debug, Clone, Copy, Default)]
pub struct BaseStats {
    /// SampleCount.
    pub count: Option<f64>,
    /// Sum.
    pub sum: Option<f64>,
    /// Minimum.
    pub min: Option<f64>,
    /// Maximum.
    pub max: Option<f64>,
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
        let mut start = 0;
        let ends = memchr::memchr_iter(b'\n', record).chain(std::iter::once(record.len()));
        for (index, end) in ends.enumerate() {
            let span = start..end;
            start = end + 1;
            let line = record[span.clone()].trim_ascii();
            if line.is_empty() {
                continue;
            }
            if let Err(message) = self.push_line(line) {
                errors.push(LineError {
                    line: index + 1,
                    span,
                    message,
                });
            }
        }
        errors
    }

    fn push_line(&mut self, line: &[u8]) -> Result<(), String> {
        // One UTF-8 check for the line; parsing from `&str` then skips the check per
        // string. Invalid UTF-8 is parsed from bytes for serde_json's message.
        let parsed = match std::str::from_utf8(line) {
            Ok(text) => serde_json::from_str::<WireDatapoint<'_>>(text),
            Err(_) => serde_json::from_slice::<WireDatapoint<'_>>(line),
        };
        let dp = parsed.map_err(|e| format!("invalid metric stream JSON: {e}"))?;
        let stat = |name: &str| dp.value.get(name).copied();
        self.append(
            SeriesId {
                account_id: &dp.account_id,
                region: &dp.region,
                namespace: &dp.namespace,
                metric_name: &dp.metric_name,
            },
            dp.timestamp,
            dp.dimensions
                .0
                .iter()
                .map(|(k, v)| (k.as_ref(), v.0.as_ref())),
            dp.unit.as_deref(),
            BaseStats {
                count: stat("count"),
                sum: stat("sum"),
                min: stat("min"),
                max: stat("max"),
            },
            dp.value
                .0
                .iter()
                .filter(|(k, _)| !matches!(k.as_ref(), "count" | "sum" | "min" | "max"))
                .map(|(k, v)| (k.as_ref(), *v)),
        )
    }

    /// Appends one datapoint after checking it. `time_ms` is the start of its period
    /// (epoch milliseconds); `dimensions` and `stats` must come sorted by key, without
    /// repeated keys. Nothing is appended if the check fails.
    #[allow(clippy::too_many_arguments)]
    pub fn append<'d, 's>(
        &mut self,
        id: SeriesId<'_>,
        time_ms: i64,
        dimensions: impl IntoIterator<Item = (&'d str, &'d str)>,
        unit: Option<&str>,
        base: BaseStats,
        stats: impl IntoIterator<Item = (&'s str, f64)>,
    ) -> Result<(), String> {
        if id.account_id.is_empty() {
            return Err("account_id is empty".into());
        }
        if id.region.is_empty() {
            return Err("region is empty".into());
        }
        if id.namespace.is_empty() || id.metric_name.is_empty() {
            return Err("namespace and metric_name must not be empty".into());
        }
        // Epoch milliseconds between 1970 and 9999: anything else is not a CloudWatch time.
        if !(0..253_402_300_800_000).contains(&time_ms) {
            return Err(format!("timestamp {time_ms} is not epoch milliseconds"));
        }
        self.time.append_value(time_ms * 1000);
        self.day.append_value(day_of_millis(time_ms));
        self.account_id.append_value(id.account_id);
        self.region.append_value(id.region);
        self.namespace.append_value(id.namespace);
        self.metric_name.append_value(id.metric_name);
        for (k, v) in dimensions {
            self.dimensions.keys().append_value(k);
            self.dimensions.values().append_value(v);
        }
        self.dimensions
            .append(true)
            .expect("keys and values stay aligned");
        self.unit.append_option(unit);
        self.count.append_option(base.count);
        self.sum.append_option(base.sum);
        self.min.append_option(base.min);
        self.max.append_option(base.max);
        for (k, v) in stats {
            self.stats.keys().append_value(k);
            self.stats.values().append_value(v);
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
        // Builders grow by doubling: without the spare capacity, the rows take up to
        // a third less memory in the hot buffer, where they stay until a flush.
        fn fit(mut array: impl arrow::array::Array + 'static) -> ArrayRef {
            array.shrink_to_fit();
            Arc::new(array)
        }
        let columns: Vec<ArrayRef> = vec![
            fit(self.time.finish()),
            fit(self.account_id.finish()),
            fit(self.region.finish()),
            fit(self.namespace.finish()),
            fit(self.metric_name.finish()),
            fit(self.dimensions.finish()),
            fit(self.unit.finish()),
            fit(self.count.finish()),
            fit(self.sum.finish()),
            fit(self.min.finish()),
            fit(self.max.finish()),
            fit(self.stats.finish()),
            fit(self.day.finish()),
        ];
        self.rows = 0;
        RecordBatch::try_new(metrics_schema(), columns).expect("builders match the schema")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{Float64Type, TimestampMicrosecondType};
    use fleetlake_model::schema::col;

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
        assert_eq!(errors[0].line, 2);
        assert!(errors[0].message.contains("invalid metric stream JSON"));
        assert_eq!(&record.as_bytes()[errors[0].span.clone()], b"not json");
        assert_eq!(errors[1].line, 3);
        assert_eq!(errors[1].message, "account_id is empty");
        let batch = b.finish();
        assert_eq!(batch.num_rows(), 2);
        assert_eq!(batch.column(col::DIMENSIONS).null_count(), 0);
    }

    #[test]
    fn object_entries_come_sorted_with_the_last_of_a_repeated_key() {
        let line = r#"{"account_id":"1","region":"eu-west-1","namespace":"AWS/Lambda","metric_name":"Duration","dimensions":{"Resource":"f:live","FunctionName":"f","Resource":"f:\u0031"},"timestamp":60000,"value":{"p99":9.5,"max":3,"count":2,"sum":4,"min":1,"max":7,"p50":2.5,"p99":8.5}}"#;
        let mut b = MetricsBatchBuilder::new();
        assert_eq!(b.push_record(line.as_bytes()), vec![]);
        let batch = b.finish();
        let dims = batch.column(col::DIMENSIONS).as_map().value(0);
        let keys: Vec<_> = dims.column(0).as_string::<i32>().iter().flatten().collect();
        let values: Vec<_> = dims.column(1).as_string::<i32>().iter().flatten().collect();
        assert_eq!(keys, ["FunctionName", "Resource"]);
        assert_eq!(values, ["f", "f:1"]);
        let max = batch.column(col::MAX).as_primitive::<Float64Type>();
        assert_eq!(max.value(0), 7.0);
        let stats = batch.column(col::STATS).as_map().value(0);
        let keys: Vec<_> = stats
            .column(0)
            .as_string::<i32>()
            .iter()
            .flatten()
            .collect();
        let values: Vec<_> = stats
            .column(1)
            .as_primitive::<Float64Type>()
            .values()
            .to_vec();
        assert_eq!(keys, ["p50", "p99"]);
        assert_eq!(values, [2.5, 8.5]);
    }

    #[test]
    fn invalid_utf8_and_wrong_types_are_line_errors() {
        let mut record = SAMPLE.as_bytes().to_vec();
        record.extend_from_slice(b"\n");
        record.extend_from_slice(&SAMPLE.as_bytes()[..40]);
        record.extend_from_slice(&[0xff, 0xfe]);
        record.extend_from_slice(&SAMPLE.as_bytes()[40..]);
        record.extend_from_slice(b"\n");
        record.extend_from_slice(SAMPLE.replace("20.0", "\"20\"").as_bytes());
        record.extend_from_slice(b"\n");
        record.extend_from_slice(
            SAMPLE
                .replace("{\"InstanceId\":\"i-123456789012\"}", "[]")
                .as_bytes(),
        );
        record.extend_from_slice(b"\n");
        record.extend_from_slice(SAMPLE.as_bytes());
        let mut b = MetricsBatchBuilder::new();
        let errors = b.push_record(&record);
        let lines: Vec<_> = errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, [2, 3, 4], "{errors:?}");
        assert!(
            errors
                .iter()
                .all(|e| e.message.starts_with("invalid metric stream JSON"))
        );
        assert!(
            errors[1].message.contains("expected f64"),
            "{}",
            errors[1].message
        );
        assert!(
            errors[2].message.contains("a JSON object"),
            "{}",
            errors[2].message
        );
        assert_eq!(b.finish().num_rows(), 2);
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
