//! One decoder for every record format, and the dead letters of what it cannot read.
//!
//! A source (Firehose endpoint, replayed file, Kinesis shard) makes a [`Decoder`] for
//! its [`Format`], pushes records into it with their position, and hands the rows of
//! [`Decoder::finish`] to the sink: rows for `metrics` or `logs`, and for
//! `dead_letters` whatever could not be decoded, raw (base64), with the source, the
//! position and the reason. Nothing is dropped silently, and a bad record never stops
//! the records around it.

use std::str::FromStr;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, Date32Builder, RecordBatch, StringBuilder, TimestampMicrosecondBuilder,
};
use base64::Engine;

use crate::cwlogs::LogsBatchBuilder;
use crate::kpl;
use crate::metric_stream::MetricsBatchBuilder;
use crate::otel::{self, OtelVersion};
use fleetlake_model::schema::{Table, day_of_millis, dead_letters_schema};

/// The record formats fleetlake reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// CloudWatch Metric Streams JSON: newline-separated datapoint objects.
    MetricsJson,
    /// CloudWatch Metric Streams OpenTelemetry 1.0.0.
    Otel1,
    /// CloudWatch Metric Streams OpenTelemetry 0.7.0.
    Otel07,
    /// CloudWatch Logs subscription payloads.
    CloudWatchLogs,
}

impl Format {
    /// Every format, in the order the CLI lists them.
    pub const ALL: [Format; 4] = [
        Format::MetricsJson,
        Format::Otel1,
        Format::Otel07,
        Format::CloudWatchLogs,
    ];

    /// The format's name in configuration files and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Format::MetricsJson => "json",
            Format::Otel1 => "otel1",
            Format::Otel07 => "otel07",
            Format::CloudWatchLogs => "cwlogs",
        }
    }

    /// The table its rows go to.
    pub fn table(self) -> Table {
        match self {
            Format::CloudWatchLogs => Table::Logs,
            _ => Table::Metrics,
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "json" | "metrics-json" | "metric-streams-json" => Format::MetricsJson,
            "otel1" | "otel" | "otel-1.0" | "opentelemetry1.0" => Format::Otel1,
            "otel07" | "otel-0.7" | "opentelemetry0.7" => Format::Otel07,
            "cwlogs" | "logs" | "cloudwatch-logs" => Format::CloudWatchLogs,
            _ => {
                let names: Vec<_> = Format::ALL.iter().map(|f| f.name()).collect();
                return Err(format!(
                    "unknown format {s:?}; expected one of {}",
                    names.join(", ")
                ));
            }
        })
    }
}

impl serde::Serialize for Format {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for Format {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Accumulates dead letters into Arrow columns of the [`dead_letters_schema`].
#[derive(Debug)]
pub struct DeadLetterBuilder {
    time: TimestampMicrosecondBuilder,
    source: StringBuilder,
    format: StringBuilder,
    position: StringBuilder,
    reason: StringBuilder,
    data: StringBuilder,
    day: Date32Builder,
    rows: usize,
}

impl Default for DeadLetterBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl DeadLetterBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self {
            time: TimestampMicrosecondBuilder::new().with_timezone("UTC"),
            source: StringBuilder::new(),
            format: StringBuilder::new(),
            position: StringBuilder::new(),
            reason: StringBuilder::new(),
            data: StringBuilder::new(),
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

    /// Keeps `data` as a dead letter. `time_ms` is when it was delivered.
    pub fn push(
        &mut self,
        time_ms: i64,
        source: &str,
        format: &str,
        position: &str,
        reason: &str,
        data: &[u8],
    ) {
        let time_ms = time_ms.clamp(0, 253_402_300_799_999);
        self.time.append_value(time_ms * 1000);
        self.day.append_value(day_of_millis(time_ms));
        self.source.append_value(source);
        self.format.append_value(format);
        self.position.append_value(position);
        self.reason.append_value(reason);
        self.data
            .append_value(base64::engine::general_purpose::STANDARD.encode(data));
        self.rows += 1;
    }

    /// Finishes the rows added so far into a batch and resets the builder.
    pub fn finish(&mut self) -> RecordBatch {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.time.finish()),
            Arc::new(self.source.finish()),
            Arc::new(self.format.finish()),
            Arc::new(self.position.finish()),
            Arc::new(self.reason.finish()),
            Arc::new(self.data.finish()),
            Arc::new(self.day.finish()),
        ];
        self.rows = 0;
        RecordBatch::try_new(dead_letters_schema(), columns).expect("builders match the schema")
    }
}

/// Counts of what a [`Decoder`] read.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DecodeStats {
    /// Records pushed (user records, after KPL de-aggregation).
    pub records: usize,
    /// Datapoints decoded into `metrics`.
    pub datapoints: usize,
    /// Log events decoded into `logs`.
    pub log_events: usize,
    /// CloudWatch Logs control messages dropped.
    pub control_messages: usize,
    /// Dead letters kept.
    pub dead_letters: usize,
}

impl std::ops::AddAssign for DecodeStats {
    fn add_assign(&mut self, o: Self) {
        self.records += o.records;
        self.datapoints += o.datapoints;
        self.log_events += o.log_events;
        self.control_messages += o.control_messages;
        self.dead_letters += o.dead_letters;
    }
}

/// Decodes records of one format from one source (see the module docs).
#[derive(Debug)]
pub struct Decoder {
    source: String,
    format: Format,
    region: Option<String>,
    metrics: MetricsBatchBuilder,
    logs: LogsBatchBuilder,
    dead: DeadLetterBuilder,
    stats: DecodeStats,
    reasons: Vec<String>,
    line_offset: usize,
    byte_offset: usize,
}

/// Dead-letter reasons a decoder remembers for logging; the rest are only counted.
const KEPT_REASONS: usize = 5;

impl Decoder {
    /// A decoder for records of `format` arriving through `source`; `region` is the
    /// region of log events that do not name theirs.
    pub fn new(source: &str, format: Format, region: Option<&str>) -> Self {
        Self {
            source: source.to_string(),
            format,
            region: region.map(str::to_string),
            metrics: MetricsBatchBuilder::new(),
            logs: LogsBatchBuilder::new(),
            dead: DeadLetterBuilder::new(),
            stats: DecodeStats::default(),
            reasons: Vec::new(),
            line_offset: 0,
            byte_offset: 0,
        }
    }

    /// For a record that is a piece of a larger input (a chunk of a file): the lines
    /// and bytes before it, added to the line and byte numbers of dead-letter
    /// positions.
    pub fn set_offsets(&mut self, lines_before: usize, bytes_before: usize) {
        self.line_offset = lines_before;
        self.byte_offset = bytes_before;
    }

    /// The format decoded.
    pub fn format(&self) -> Format {
        self.format
    }

    /// Counts so far (since the decoder was made).
    pub fn stats(&self) -> DecodeStats {
        self.stats
    }

    /// The first few dead-letter reasons, with their positions, for logs.
    pub fn sample_reasons(&self) -> &[String] {
        &self.reasons
    }

    /// Rows buffered and not yet taken by [`Decoder::finish`].
    pub fn pending_rows(&self) -> usize {
        self.metrics.len() + self.logs.len() + self.dead.len()
    }

    /// Keeps `data` as a dead letter at `position` for `reason`.
    pub fn dead_letter(&mut self, time_ms: i64, position: &str, reason: &str, data: &[u8]) {
        if self.reasons.len() < KEPT_REASONS {
            self.reasons.push(format!("{position}: {reason}"));
        }
        self.dead.push(
            time_ms,
            &self.source,
            self.format.name(),
            position,
            reason,
            data,
        );
        self.stats.dead_letters += 1;
    }

    /// Decodes one record found at `position` (request and record index, file and
    /// line, ...), delivered at `time_ms`. What cannot be decoded becomes dead letters.
    pub fn push_record(&mut self, data: &[u8], position: &str, time_ms: i64) {
        self.stats.records += 1;
        match self.format {
            Format::MetricsJson => {
                let before = self.metrics.len();
                let errors = self.metrics.push_record(data);
                self.stats.datapoints += self.metrics.len() - before;
                for e in errors {
                    self.dead_letter(
                        time_ms,
                        &format!("{position} line {}", e.line + self.line_offset),
                        &e.message,
                        &data[e.span],
                    );
                }
            }
            Format::Otel1 | Format::Otel07 => {
                let version = if self.format == Format::Otel1 {
                    OtelVersion::V1
                } else {
                    OtelVersion::V07
                };
                let outcome = otel::decode_record(version, data, &mut self.metrics);
                self.stats.datapoints += outcome.datapoints;
                let base = self.byte_offset;
                for p in outcome.problems {
                    self.dead_letter(
                        time_ms,
                        &format!(
                            "{position} bytes {}..{}",
                            base + p.span.start,
                            base + p.span.end
                        ),
                        &p.reason,
                        &data[p.span],
                    );
                }
            }
            Format::CloudWatchLogs => {
                let outcome = self.logs.push_record(data, self.region.as_deref());
                self.stats.log_events += outcome.events;
                self.stats.control_messages += outcome.control_messages;
                let base = self.byte_offset;
                for p in outcome.problems {
                    let at = if p.span == (0..data.len()) {
                        position.to_string()
                    } else {
                        format!(
                            "{position} bytes {}..{}",
                            base + p.span.start,
                            base + p.span.end
                        )
                    };
                    self.dead_letter(time_ms, &at, &p.reason, &data[p.span]);
                }
            }
        }
    }

    /// Decodes one Kinesis record: KPL aggregates are split into their user records
    /// (`position/sub-sequence`), anything else is one record.
    pub fn push_kinesis_record(&mut self, data: &[u8], position: &str, time_ms: i64) {
        match kpl::deaggregate(data) {
            kpl::Deaggregated::Plain(data) => self.push_record(data, position, time_ms),
            kpl::Deaggregated::Aggregated(records) => {
                for record in records {
                    let at = format!("{position}/{}", record.sub_sequence);
                    self.push_record(&record.data, &at, time_ms);
                }
            }
        }
    }

    /// Takes the rows decoded so far, per table (tables without rows are left out).
    pub fn finish(&mut self) -> Vec<(Table, RecordBatch)> {
        let mut out = Vec::with_capacity(2);
        if !self.metrics.is_empty() {
            out.push((Table::Metrics, self.metrics.finish()));
        }
        if !self.logs.is_empty() {
            out.push((Table::Logs, self.logs.finish()));
        }
        if !self.dead.is_empty() {
            out.push((Table::DeadLetters, self.dead.finish()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_parse_by_name_and_alias() {
        for f in Format::ALL {
            assert_eq!(f.name().parse::<Format>().unwrap(), f);
        }
        assert_eq!("logs".parse::<Format>().unwrap(), Format::CloudWatchLogs);
        let err = "xml".parse::<Format>().unwrap_err();
        assert!(err.contains("json, otel1, otel07, cwlogs"), "{err}");
    }

    #[test]
    fn bad_lines_become_dead_letters_with_their_bytes() {
        let good = r#"{"account_id":"1","region":"r","namespace":"N","metric_name":"M","timestamp":60000,"value":{"count":1,"sum":1,"min":1,"max":1}}"#;
        let mut d = Decoder::new("firehose/metrics", Format::MetricsJson, None);
        d.push_record(
            format!("{good}\nnope\n{good}").as_bytes(),
            "request r record 0",
            5,
        );
        assert_eq!(d.stats().datapoints, 2);
        assert_eq!(d.stats().dead_letters, 1);
        let rows = d.finish();
        assert_eq!(rows.len(), 2);
        let (table, dead) = &rows[1];
        assert_eq!(*table, Table::DeadLetters);
        use arrow::array::AsArray;
        use fleetlake_model::schema::dead_col;
        let col = |i| dead.column(i).as_string::<i32>().value(0).to_string();
        assert_eq!(col(dead_col::POSITION), "request r record 0 line 2");
        assert_eq!(col(dead_col::DATA_BASE64), "bm9wZQ==");
        assert_eq!(col(dead_col::SOURCE), "firehose/metrics");
        assert_eq!(col(dead_col::FORMAT), "json");
    }
}
