//! Decoder for CloudWatch Logs subscription payloads (`formats.md` §3).
//!
//! A record is gzip-compressed JSON (several gzip members, and several JSON objects
//! back to back, are accepted; uncompressed JSON too). Each `DATA_MESSAGE` becomes one
//! row of the `logs` table per log event, with the account id from the event's
//! `extractedFields["@aws.account"]`, else `owner` (account-level policies and
//! centralised delivery name the source account per event), and the region from
//! `extractedFields["@aws.region"]`, else the source's region.
//! `CONTROL_MESSAGE`s (Firehose's and Kinesis's health checks) are counted and dropped.
//! What cannot be read is reported as a [`Problem`] with its byte range (a dead letter);
//! an object that is valid JSON but not a subscription message does not stop the
//! objects after it.

use std::borrow::Cow;
use std::io::Read;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, Date32Builder, ListBuilder, RecordBatch, StringBuilder, TimestampMicrosecondBuilder,
};
use arrow::datatypes::{DataType, Field};
use serde::Deserialize;

use crate::otel::Problem;
use fleetlake_model::schema::{LIST_ELEMENT, day_of_millis, logs_schema};

/// Largest decompressed size of one record: a Kinesis or Firehose record is at most
/// 1 MiB compressed, and log text compresses well, but not this well.
pub const MAX_DECOMPRESSED: usize = 64 * 1024 * 1024;
/// Decompressed log JSON one builder takes before it finishes a batch: further records
/// are reported as problems (kept raw as dead letters). It keeps string columns far
/// below Arrow's 2 GiB offset limit and one write below the WAL's 4 GiB record limit,
/// however well a request compresses.
pub const MAX_INFLATED_PER_BATCH: usize = 1024 * 1024 * 1024;
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
    extracted_fields: Option<ExtractedFields<'a>>,
}

/// The fields of `extractedFields` fleetlake uses; the others are ignored, and so is
/// either of these when it is not a string.
#[derive(Debug, Default, Deserialize)]
struct ExtractedFields<'a> {
    #[serde(rename = "@aws.account", borrow, default)]
    account: MaybeStr<'a>,
    #[serde(rename = "@aws.region", borrow, default)]
    region: MaybeStr<'a>,
}

/// A JSON value that counts only when it is a non-empty string.
#[derive(Debug, Default)]
struct MaybeStr<'a>(Option<Cow<'a, str>>);

impl<'a> MaybeStr<'a> {
    fn get(&self) -> Option<&str> {
        self.0.as_deref().filter(|s| !s.is_empty())
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for MaybeStr<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Value<'a> {
            Str(#[serde(borrow)] Cow<'a, str>),
            Other(serde::de::IgnoredAny),
        }
        Ok(MaybeStr(match Value::deserialize(d)? {
            Value::Str(s) => Some(s),
            Value::Other(_) => None,
        }))
    }
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
    inflated: usize,
    budget: usize,
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
            inflated: 0,
            budget: MAX_INFLATED_PER_BATCH,
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
        if self.inflated >= self.budget {
            outcome.problems.push(Problem {
                span: 0..record.len(),
                reason: format!(
                    "this write already holds {} bytes of decompressed log JSON, the most one \
                     write takes; the record is kept raw",
                    self.inflated
                ),
            });
            return outcome;
        }
        let inflated;
        let json: &[u8] = if record.starts_with(&[0x1f, 0x8b]) {
            let limit = MAX_DECOMPRESSED.min(self.budget - self.inflated);
            let mut out = Vec::with_capacity(record.len().saturating_mul(8).min(limit));
            let read = flate2::read::MultiGzDecoder::new(record)
                .take(limit as u64 + 1)
                .read_to_end(&mut out);
            let over_budget = limit < MAX_DECOMPRESSED;
            let failure = match read {
                Err(e) => Some(format!("invalid gzip: {e}")),
                Ok(n) if n > limit && over_budget => {
                    // Nothing of it is decoded: the record stays whole, raw, and a
                    // replay of its dead letter stores it once.
                    outcome.problems.push(Problem {
                        span: 0..record.len(),
                        reason: format!(
                            "the write would hold over {} bytes of decompressed log JSON with \
                             this record; the record is kept raw",
                            self.budget
                        ),
                    });
                    return outcome;
                }
                Ok(n) if n > limit => Some(format!("decompresses to over {limit} bytes")),
                Ok(_) => None,
            };
            if let Some(reason) = failure {
                // The whole record is kept raw; what did decompress is still decoded.
                outcome.problems.push(Problem {
                    span: 0..record.len(),
                    reason,
                });
                out.truncate(limit);
                self.inflated += out.len();
                inflated = out;
                self.push_json(&inflated, default_region, &mut outcome);
                outcome.problems.truncate(1);
                return outcome;
            }
            inflated = out;
            &inflated
        } else if self.inflated + record.len() > self.budget {
            outcome.problems.push(Problem {
                span: 0..record.len(),
                reason: format!(
                    "the write would hold over {} bytes of log JSON with this record; the \
                     record is kept raw",
                    self.budget
                ),
            });
            return outcome;
        } else {
            record
        };
        self.inflated += json.len();
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

    /// Decodes JSON objects back to back. A JSON value that is not a subscription
    /// message is a problem of its own; invalid JSON is a problem from there to the end.
    fn push_json(&mut self, json: &[u8], default_region: Option<&str>, outcome: &mut LogsOutcome) {
        let mut stream = serde_json::Deserializer::from_slice(json).into_iter::<WireMessage<'_>>();
        loop {
            let start = stream.byte_offset();
            match stream.next() {
                None => return,
                Some(Ok(message)) => {
                    let span = start..stream.byte_offset();
                    if let Err(reason) = self.push_message(&message, default_region, outcome) {
                        outcome.problems.push(Problem { span, reason });
                    }
                }
                Some(Err(e)) if e.classify() == serde_json::error::Category::Data => {
                    // Valid JSON of the wrong shape: the typed stream cannot go on past
                    // it, so the rest is split into values first and decoded one by one.
                    self.push_values(&json[start..], start, default_region, outcome);
                    return;
                }
                Some(Err(e)) => {
                    outcome.problems.push(Problem {
                        span: start..json.len(),
                        reason: format!("invalid CloudWatch Logs JSON: {e}"),
                    });
                    return;
                }
            }
        }
    }

    /// The slow path of [`Self::push_json`]: each JSON value of `json` (found at
    /// `base` of the record) decoded on its own.
    fn push_values(
        &mut self,
        json: &[u8],
        base: usize,
        default_region: Option<&str>,
        outcome: &mut LogsOutcome,
    ) {
        let mut values =
            serde_json::Deserializer::from_slice(json).into_iter::<serde::de::IgnoredAny>();
        loop {
            let start = values.byte_offset();
            match values.next() {
                None => return,
                Some(Ok(_)) => {
                    let end = values.byte_offset();
                    let start = start
                        + json[start..end]
                            .iter()
                            .take_while(|b| b.is_ascii_whitespace())
                            .count();
                    let span = base + start..base + end;
                    let result = serde_json::from_slice::<WireMessage<'_>>(&json[start..end])
                        .map_err(|e| format!("not a CloudWatch Logs subscription message: {e}"))
                        .and_then(|message| self.push_message(&message, default_region, outcome));
                    if let Err(reason) = result {
                        outcome.problems.push(Problem { span, reason });
                    }
                }
                Some(Err(e)) => {
                    outcome.problems.push(Problem {
                        span: base + start..base + json.len(),
                        reason: format!("invalid CloudWatch Logs JSON: {e}"),
                    });
                    return;
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
            let fields = event.extracted_fields.as_ref();
            let account = fields
                .and_then(|f| f.account.get())
                .unwrap_or(&message.owner);
            let region = fields
                .and_then(|f| f.region.get())
                .or(default_region)
                .unwrap_or(UNKNOWN_REGION);
            self.time.append_value(event.timestamp * 1000);
            self.day.append_value(day_of_millis(event.timestamp));
            self.account_id.append_value(account);
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
        self.inflated = 0;
        RecordBatch::try_new(logs_schema(), columns).expect("builders match the schema")
    }
}

/// The length of the longest prefix of `json` made of whole JSON values (for reading a
/// long input of subscription objects in pieces). Invalid JSON cannot be split further,
/// so then the whole of `json` is returned for the decoder to keep as a dead letter.
pub fn whole_objects_len(json: &[u8]) -> usize {
    let mut values =
        serde_json::Deserializer::from_slice(json).into_iter::<serde::de::IgnoredAny>();
    let mut cut = 0;
    loop {
        match values.next() {
            None => return json.len(),
            Some(Ok(_)) => cut = values.byte_offset(),
            Some(Err(e)) if e.is_eof() => return cut,
            Some(Err(_)) => return json.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::AsArray;
    use fleetlake_model::schema::logs_col;

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

    fn gzip(text: &str) -> Vec<u8> {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        enc.write_all(text.as_bytes()).unwrap();
        enc.finish().unwrap()
    }

    #[test]
    fn account_and_region_from_extracted_fields() {
        let record = r#"{"messageType":"DATA_MESSAGE","owner":"999999999999","logGroup":"g","logStream":"s","subscriptionFilters":[],"logEvents":[{"id":"1","timestamp":1700000000000,"message":"m","extractedFields":{"@aws.account":"123456789012","@aws.region":"eu-west-1","@aws.other":{"nested":true}}},{"id":"2","timestamp":1700000000000,"message":"m","extractedFields":{"@aws.account":"","@aws.region":7}}]}"#;
        let mut b = LogsBatchBuilder::new();
        let outcome = b.push_record(record.as_bytes(), Some("us-east-2"));
        assert!(outcome.problems.is_empty(), "{:?}", outcome.problems);
        let batch = b.finish();
        let account = batch.column(logs_col::ACCOUNT_ID).as_string::<i32>();
        let region = batch.column(logs_col::REGION).as_string::<i32>();
        assert_eq!(
            (account.value(0), region.value(0)),
            ("123456789012", "eu-west-1")
        );
        // Empty or non-string fields fall back to owner and the source's region.
        assert_eq!(
            (account.value(1), region.value(1)),
            ("999999999999", "us-east-2")
        );
    }

    #[test]
    fn a_message_of_the_wrong_shape_does_not_stop_the_ones_after_it() {
        let wrong = r#"{"messageType":"DATA_MESSAGE","owner":"1","logGroup":"g","logEvents":[{"id":5,"timestamp":1,"message":"m"}]}"#;
        let record = format!("{DATA}\n{wrong}\n[1,2]{DATA}");
        let mut b = LogsBatchBuilder::new();
        let outcome = b.push_record(record.as_bytes(), None);
        assert_eq!(outcome.events, 4);
        assert_eq!(outcome.messages, 2);
        let spans: Vec<_> = outcome.problems.iter().map(|p| p.span.clone()).collect();
        let at = DATA.len() + 1;
        assert_eq!(
            spans,
            [
                at..at + wrong.len(),
                at + wrong.len() + 1..at + wrong.len() + 6
            ]
        );
        assert!(outcome.problems[0].reason.contains("not a CloudWatch Logs"));
        // Gzip'd, the whole record is the dead letter, with every reason.
        let outcome = b.push_record(&gzip(&record), None);
        assert_eq!(outcome.events, 4);
        assert_eq!(outcome.problems.len(), 1);
        assert!(outcome.problems[0].reason.contains("; "));
    }

    #[test]
    fn records_past_the_write_budget_are_kept_raw_not_decoded() {
        let mut b = LogsBatchBuilder::new();
        b.budget = DATA.len() * 2 + DATA.len() / 2;
        let gz = gzip(DATA);
        assert_eq!(b.push_record(&gz, None).events, 2);
        assert_eq!(b.push_record(DATA.as_bytes(), None).events, 2);
        // The third would pass the budget: nothing of it is decoded.
        let outcome = b.push_record(&gz, None);
        assert_eq!(outcome.events, 0);
        assert_eq!(outcome.problems.len(), 1);
        assert_eq!(outcome.problems[0].span, 0..gz.len());
        assert!(outcome.problems[0].reason.contains("kept raw"));
        let outcome = b.push_record(DATA.as_bytes(), None);
        assert_eq!((outcome.events, outcome.problems.len()), (0, 1));
        assert_eq!(b.finish().num_rows(), 4);
        // A new batch starts with the whole budget.
        assert_eq!(b.push_record(&gz, None).events, 2);
    }

    #[test]
    fn whole_objects_prefix() {
        let two = format!("{DATA}\n{CONTROL}");
        assert_eq!(whole_objects_len(two.as_bytes()), two.len());
        let cut = format!("{DATA}\n{}", &CONTROL[..20]);
        assert_eq!(whole_objects_len(cut.as_bytes()), DATA.len());
        assert_eq!(whole_objects_len(b"  "), 2);
        assert_eq!(whole_objects_len(b"{} ]x"), 5);
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
