//! Decoder for CloudWatch Logs subscription payloads (`formats.md` §3).
//!
//! A record is gzip-compressed JSON (several gzip members, and several JSON objects
//! back to back, are accepted; uncompressed JSON too). Each `DATA_MESSAGE` becomes one
//! row of the `logs` table per log event, with the account id from `owner` and the
//! region from the event's `extractedFields["@aws.region"]`, else the source's region.
//! `CONTROL_MESSAGE`s (Firehose's and Kinesis's health checks) are counted and dropped.
//! What cannot be read is reported as a [`Problem`] with its byte range (a dead letter);
//! the objects before it are kept.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Read;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, Date32Builder, ListBuilder, RecordBatch, StringBuilder, TimestampMicrosecondBuilder,
};
use arrow::datatypes::{DataType, Field};
use serde::Deserialize;

use crate::otel::Problem;
use crate::schema::{LIST_ELEMENT, day_of_millis, logs_schema};

/// Largest decompressed size of one record: a Kinesis or Firehose record is at most
/// 1 MiB compressed, and log text compresses well, but not this well.
pub const MAX_DECOMPRESSED: usize = 64 * 1024 * 1024;
/// The region recorded when neither the event nor the source names one.
pub const UNKNOWN_REGION: &str = "unknown";

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireMessage<'a> {
    #[serde(borrow)]
    message_type: Cow<'a, str>,
    #[serde(borrow, default)]
    owner: Cow<'a, str>,
    #[serde(borrow, default)]
    log_group: Cow<'a, str>,
    #[serde(borrow, default)]
    log_stream: Cow<'a, str>,
    #[serde(borrow, default)]
    subscription_filters: Vec<Cow<'a, str>>,
    #[serde(borrow, default)]
    log_events: Vec<WireEvent<'a>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireEvent<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    timestamp: i64,
    #[serde(borrow)]
    message: Cow<'a, str>,
    #[serde(borrow, default)]
    extracted_fields: Option<HashMap<Cow<'a, str>, Cow<'a, str>>>,
}

/// Accumulates log events into Arrow columns of the [`logs_schema`].
#[derive(Debug)]
pub struct LogsBatchBuilder {
    time: TimestampMicrosecondBuilder,
    account_id: StringBuilder,
    region: StringBuilder,
    log_group: StringBuilder,
    log_stream: StringBuilder,
    event_id: StringBuilder,
    message: StringBuilder,
    filters: ListBuilder<StringBuilder>,
    day: Date32Builder,
    rows: usize,
}

impl Default for LogsBatchBuilder {
    fn default() -> Self {
        Self::new()
    }
}

/// What decoding one record produced, besides the rows.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct LogsOutcome {
    /// `DATA_MESSAGE`s decoded.
    pub messages: usize,
    /// `CONTROL_MESSAGE`s dropped.
    pub control_messages: usize,
    /// Log events appended.
    pub events: usize,
    /// Parts that were not decoded.
    pub problems: Vec<Problem>,
}

impl LogsBatchBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self {
            time: TimestampMicrosecondBuilder::new().with_timezone("UTC"),
            account_id: StringBuilder::new(),
            region: StringBuilder::new(),
            log_group: StringBuilder::new(),
            log_stream: StringBuilder::new(),
            event_id: StringBuilder::new(),
            message: StringBuilder::new(),
            filters: ListBuilder::new(StringBuilder::new()).with_field(Arc::new(Field::new(
                LIST_ELEMENT,
                DataType::Utf8,
                true,
            ))),
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

    /// Decodes one subscription record (see the module docs); `default_region` is used
    /// for events that do not carry their region.
    pub fn push_record(&mut self, record: &[u8], default_region: Option<&str>) -> LogsOutcome {
        let mut outcome = LogsOutcome::default();
        let inflated;
        let json: &[u8] = if record.starts_with(&[0x1f, 0x8b]) {
            let mut out = Vec::with_capacity(record.len() * 8);
            let read = flate2::read::MultiGzDecoder::new(record)
                .take(MAX_DECOMPRESSED as u64 + 1)
                .read_to_end(&mut out);
            let failure = match read {
                Err(e) => Some(format!("invalid gzip: {e}")),
                Ok(n) if n > MAX_DECOMPRESSED => {
                    Some(format!("decompresses to over {MAX_DECOMPRESSED} bytes"))
                }
                Ok(_) => None,
            };
            if let Some(reason) = failure {
                // The whole record is kept raw; what did decompress is still decoded.
                outcome.problems.push(Problem {
                    span: 0..record.len(),
                    reason,
                });
                out.truncate(MAX_DECOMPRESSED);
                inflated = out;
                self.push_json(&inflated, default_region, &mut outcome);
                outcome.problems.truncate(1);
                return outcome;
            }
            inflated = out;
            &inflated
        } else {
            record
        };
        let compressed = !std::ptr::eq(json, record);
        self.push_json(json, default_region, &mut outcome);
        if compressed && !outcome.problems.is_empty() {
            // Spans point into the decompressed text, which the record does not hold:
            // one problem keeps the whole (compressed) record, with every reason.
            let reasons: Vec<_> = outcome.problems.drain(..).map(|p| p.reason).collect();
            outcome.problems.push(Problem {
                span: 0..record.len(),
                reason: reasons.join("; "),
            });
        }
        outcome
    }

    /// Decodes JSON objects back to back, up to the first that does not parse.
    fn push_json(&mut self, json: &[u8], default_region: Option<&str>, outcome: &mut LogsOutcome) {
        let mut stream = serde_json::Deserializer::from_slice(json).into_iter::<WireMessage<'_>>();
        loop {
            let start = stream.byte_offset();
            match stream.next() {
                None => break,
                Some(Ok(message)) => {
                    let span = start..stream.byte_offset();
                    if let Err(reason) = self.push_message(&message, default_region, outcome) {
                        outcome.problems.push(Problem { span, reason });
                    }
                }
                Some(Err(e)) => {
                    outcome.problems.push(Problem {
                        span: start..json.len(),
                        reason: format!("invalid CloudWatch Logs JSON: {e}"),
                    });
                    break;
                }
            }
        }
    }

    fn push_message(
        &mut self,
        message: &WireMessage<'_>,
        default_region: Option<&str>,
        outcome: &mut LogsOutcome,
    ) -> Result<(), String> {
        match message.message_type.as_ref() {
            "CONTROL_MESSAGE" => {
                outcome.control_messages += 1;
                return Ok(());
            }
            "DATA_MESSAGE" => {}
            other => return Err(format!("unknown messageType {other:?}")),
        }
        if message.owner.is_empty() || message.log_group.is_empty() {
            return Err("DATA_MESSAGE without owner or logGroup".into());
        }
        if let Some(bad) = message
            .log_events
            .iter()
            .find(|e| !(0..253_402_300_800_000).contains(&e.timestamp) || e.id.is_empty())
        {
            return Err(format!(
                "log event {:?} has no id or a timestamp ({}) that is not epoch milliseconds",
                bad.id, bad.timestamp
            ));
        }
        for event in &message.log_events {
            let region = event
                .extracted_fields
                .as_ref()
                .and_then(|f| f.get("@aws.region"))
                .map(|r| r.as_ref())
                .filter(|r| !r.is_empty())
                .or(default_region)
                .unwrap_or(UNKNOWN_REGION);
            self.time.append_value(event.timestamp * 1000);
            self.day.append_value(day_of_millis(event.timestamp));
            self.account_id.append_value(&message.owner);
            self.region.append_value(region);
            self.log_group.append_value(&message.log_group);
            self.log_stream.append_value(&message.log_stream);
            self.event_id.append_value(&event.id);
            self.message.append_value(&event.message);
            for filter in &message.subscription_filters {
                self.filters.values().append_value(filter);
            }
            self.filters.append(true);
            self.rows += 1;
        }
        outcome.messages += 1;
        outcome.events += message.log_events.len();
        Ok(())
    }

    /// Finishes the rows added so far into a batch of the [`logs_schema`] and resets
    /// the builder.
    pub fn finish(&mut self) -> RecordBatch {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.time.finish()),
            Arc::new(self.account_id.finish()),
            Arc::new(self.region.finish()),
            Arc::new(self.log_group.finish()),
            Arc::new(self.log_stream.finish()),
            Arc::new(self.event_id.finish()),
            Arc::new(self.message.finish()),
            Arc::new(self.filters.finish()),
            Arc::new(self.day.finish()),
        ];
        self.rows = 0;
        RecordBatch::try_new(logs_schema(), columns).expect("builders match the schema")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::logs_col;
    use arrow::array::AsArray;

    const DATA: &str = r#"{"messageType":"DATA_MESSAGE","owner":"123456789012","logGroup":"/aws/lambda/f","logStream":"s","subscriptionFilters":["fleet"],"logEvents":[{"id":"1","timestamp":1700000000000,"message":"hello"},{"id":"2","timestamp":1700000001000,"message":"world","extractedFields":{"@aws.region":"eu-west-1"}}]}"#;
    const CONTROL: &str = r#"{"messageType":"CONTROL_MESSAGE","owner":"CloudwatchLogs","logGroup":"","logStream":"","subscriptionFilters":[],"logEvents":[{"id":"","timestamp":1741312971934,"message":"CWL CONTROL MESSAGE: Checking health of destination Firehose."}]}"#;

    #[test]
    fn plain_json_objects_back_to_back() {
        let mut b = LogsBatchBuilder::new();
        let record = format!("{DATA}{CONTROL}\n{DATA}");
        let outcome = b.push_record(record.as_bytes(), Some("us-east-1"));
        assert_eq!(outcome.messages, 2);
        assert_eq!(outcome.control_messages, 1);
        assert_eq!(outcome.events, 4);
        assert!(outcome.problems.is_empty());
        let batch = b.finish();
        let region = batch.column(logs_col::REGION).as_string::<i32>();
        assert_eq!(region.value(0), "us-east-1");
        assert_eq!(region.value(1), "eu-west-1");
    }

    #[test]
    fn trailing_garbage_is_a_problem_after_the_good_objects() {
        let mut b = LogsBatchBuilder::new();
        let record = format!("{DATA} {{\"messageType\": 5");
        let outcome = b.push_record(record.as_bytes(), None);
        assert_eq!(outcome.events, 2);
        assert_eq!(outcome.problems.len(), 1);
        assert_eq!(outcome.problems[0].span.start, DATA.len());
        let batch = b.finish();
        assert_eq!(
            batch.column(logs_col::REGION).as_string::<i32>().value(0),
            UNKNOWN_REGION
        );
    }

    #[test]
    fn a_truncated_gzip_keeps_the_whole_record_as_a_problem() {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        enc.write_all(DATA.as_bytes()).unwrap();
        let gz = enc.finish().unwrap();
        let cut = &gz[..gz.len() - 4];
        let mut b = LogsBatchBuilder::new();
        let outcome = b.push_record(cut, None);
        assert_eq!(outcome.problems.len(), 1);
        assert_eq!(outcome.problems[0].span, 0..cut.len());
    }
}
