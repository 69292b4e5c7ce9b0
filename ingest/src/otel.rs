//! Decoder for CloudWatch Metric Streams in the OpenTelemetry 1.0.0 and 0.7.0 formats
//! (`formats.md` §2).
//!
//! A record holds one or more `ExportMetricsServiceRequest` messages, each preceded by
//! its length as a varint. Every summary datapoint becomes one row of the `metrics`
//! table: account id and region from the resource attributes, namespace, metric name
//! and dimensions from the datapoint (attributes in 1.0, flat labels in 0.7), quantile
//! 0.0 as `min`, 1.0 as `max`, other quantiles in `stats` (`p99`, `p99.9`, ...), and the
//! UCUM unit mapped back to its CloudWatch name.
//!
//! The two versions differ on the wire only in the datapoint's dimension field, so the
//! version is configured per source, never guessed. A message that cannot be decoded,
//! or whose datapoints cannot all be attributed, is reported as a [`Problem`] with its
//! byte range (kept as a dead letter); the messages around it are decoded.

use std::borrow::Cow;
use std::ops::Range;

use prost::Message;

use crate::metric_stream::{BaseStats, MetricsBatchBuilder, SeriesId};

/// Which OpenTelemetry format a source sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtelVersion {
    /// OpenTelemetry 0.7.0 (`instrumentation_library_metrics`, `double_summary`, labels).
    V07,
    /// OpenTelemetry 1.0.0 (`scope_metrics`, `summary`, attributes).
    V1,
}

/// Part of a record that was not (fully) decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// The bytes concerned, inside the record.
    pub span: Range<usize>,
    /// What went wrong.
    pub reason: String,
}

/// What decoding one record produced, besides the rows.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct OtelOutcome {
    /// Messages decoded.
    pub messages: usize,
    /// Datapoints appended.
    pub datapoints: usize,
    /// Parts that were not decoded.
    pub problems: Vec<Problem>,
}

/// Protobuf messages shared by both versions (`opentelemetry/proto/common` and
/// `resource`), with only the fields fleetlake reads.
mod common {
    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct Resource {
        #[prost(message, repeated, tag = "1")]
        pub(super) attributes: Vec<KeyValue>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct KeyValue {
        #[prost(string, tag = "1")]
        pub(super) key: String,
        #[prost(message, optional, tag = "2")]
        pub(super) value: Option<AnyValue>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct AnyValue {
        #[prost(oneof = "Value", tags = "1, 2, 3, 4, 5, 6, 7")]
        pub(super) value: Option<Value>,
    }

    #[derive(Clone, PartialEq, prost::Oneof)]
    pub(super) enum Value {
        #[prost(string, tag = "1")]
        String(String),
        #[prost(bool, tag = "2")]
        Bool(bool),
        #[prost(int64, tag = "3")]
        Int(i64),
        #[prost(double, tag = "4")]
        Double(f64),
        #[prost(message, tag = "5")]
        Array(ArrayValue),
        #[prost(message, tag = "6")]
        KvList(KeyValueList),
        #[prost(bytes, tag = "7")]
        Bytes(Vec<u8>),
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct ArrayValue {
        #[prost(message, repeated, tag = "1")]
        pub(super) values: Vec<AnyValue>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct KeyValueList {
        #[prost(message, repeated, tag = "1")]
        pub(super) values: Vec<KeyValue>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct ValueAtQuantile {
        #[prost(double, tag = "1")]
        pub(super) quantile: f64,
        #[prost(double, tag = "2")]
        pub(super) value: f64,
    }
}

/// OpenTelemetry 1.0.0 metrics messages.
mod v1 {
    use super::common::{KeyValue, Resource, ValueAtQuantile};

    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct ExportMetricsServiceRequest {
        #[prost(message, repeated, tag = "1")]
        pub(super) resource_metrics: Vec<ResourceMetrics>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct ResourceMetrics {
        #[prost(message, optional, tag = "1")]
        pub(super) resource: Option<Resource>,
        #[prost(message, repeated, tag = "2")]
        pub(super) scope_metrics: Vec<ScopeMetrics>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct ScopeMetrics {
        #[prost(message, repeated, tag = "2")]
        pub(super) metrics: Vec<Metric>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct Metric {
        #[prost(string, tag = "1")]
        pub(super) name: String,
        #[prost(string, tag = "3")]
        pub(super) unit: String,
        #[prost(message, optional, tag = "11")]
        pub(super) summary: Option<Summary>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct Summary {
        #[prost(message, repeated, tag = "1")]
        pub(super) data_points: Vec<SummaryDataPoint>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct SummaryDataPoint {
        #[prost(message, repeated, tag = "7")]
        pub(super) attributes: Vec<KeyValue>,
        #[prost(fixed64, tag = "2")]
        pub(super) start_time_unix_nano: u64,
        #[prost(fixed64, tag = "3")]
        pub(super) time_unix_nano: u64,
        #[prost(fixed64, tag = "4")]
        pub(super) count: u64,
        #[prost(double, tag = "5")]
        pub(super) sum: f64,
        #[prost(message, repeated, tag = "6")]
        pub(super) quantile_values: Vec<ValueAtQuantile>,
    }
}

/// OpenTelemetry 0.7.0 metrics messages.
mod v07 {
    use super::common::{Resource, ValueAtQuantile};

    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct ExportMetricsServiceRequest {
        #[prost(message, repeated, tag = "1")]
        pub(super) resource_metrics: Vec<ResourceMetrics>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct ResourceMetrics {
        #[prost(message, optional, tag = "1")]
        pub(super) resource: Option<Resource>,
        #[prost(message, repeated, tag = "2")]
        pub(super) instrumentation_library_metrics: Vec<InstrumentationLibraryMetrics>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct InstrumentationLibraryMetrics {
        #[prost(message, repeated, tag = "2")]
        pub(super) metrics: Vec<Metric>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct Metric {
        #[prost(string, tag = "1")]
        pub(super) name: String,
        #[prost(string, tag = "3")]
        pub(super) unit: String,
        #[prost(message, optional, tag = "11")]
        pub(super) double_summary: Option<DoubleSummary>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct DoubleSummary {
        #[prost(message, repeated, tag = "1")]
        pub(super) data_points: Vec<DoubleSummaryDataPoint>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct DoubleSummaryDataPoint {
        #[prost(message, repeated, tag = "1")]
        pub(super) labels: Vec<StringKeyValue>,
        #[prost(fixed64, tag = "2")]
        pub(super) start_time_unix_nano: u64,
        #[prost(fixed64, tag = "3")]
        pub(super) time_unix_nano: u64,
        #[prost(fixed64, tag = "4")]
        pub(super) count: u64,
        #[prost(double, tag = "5")]
        pub(super) sum: f64,
        #[prost(message, repeated, tag = "6")]
        pub(super) quantile_values: Vec<ValueAtQuantile>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct StringKeyValue {
        #[prost(string, tag = "1")]
        pub(super) key: String,
        #[prost(string, tag = "2")]
        pub(super) value: String,
    }
}

/// A string form of an attribute value; composite values have none.
fn value_str(value: Option<&common::AnyValue>) -> Option<Cow<'_, str>> {
    match value?.value.as_ref()? {
        common::Value::String(s) => Some(Cow::Borrowed(s)),
        common::Value::Bool(b) => Some(Cow::Owned(b.to_string())),
        common::Value::Int(i) => Some(Cow::Owned(i.to_string())),
        common::Value::Double(d) => Some(Cow::Owned(d.to_string())),
        _ => None,
    }
}

/// Account and region of a resource.
#[derive(Debug, Default)]
struct Origin<'a> {
    account_id: Option<Cow<'a, str>>,
    region: Option<Cow<'a, str>>,
}

fn origin(resource: Option<&common::Resource>) -> Origin<'_> {
    let mut origin = Origin::default();
    for kv in resource
        .map(|r| r.attributes.as_slice())
        .unwrap_or_default()
    {
        match kv.key.as_str() {
            "cloud.account.id" => origin.account_id = value_str(kv.value.as_ref()),
            "cloud.region" => origin.region = value_str(kv.value.as_ref()),
            _ => {}
        }
    }
    origin
}

/// The CloudWatch unit name of a UCUM unit as Metric Streams writes them; an unknown
/// unit is kept as it is.
pub fn cloudwatch_unit(ucum: &str) -> Cow<'_, str> {
    let (base, per_second) = match ucum.strip_suffix("/s") {
        Some(base) => (base, true),
        None => (ucum, false),
    };
    let name = match base {
        "s" => "Seconds",
        "ms" => "Milliseconds",
        "us" | "µs" => "Microseconds",
        "By" => "Bytes",
        "kBy" | "KBy" => "Kilobytes",
        "MBy" => "Megabytes",
        "GBy" => "Gigabytes",
        "TBy" => "Terabytes",
        "bit" => "Bits",
        "kbit" | "kBit" | "Kbit" => "Kilobits",
        "MBit" | "Mbit" => "Megabits",
        "GBit" | "Gbit" => "Gigabits",
        "TBit" | "Tbit" => "Terabits",
        "%" => "Percent",
        "{Count}" | "{count}" => "Count",
        "1" | "" => "None",
        _ => return Cow::Borrowed(ucum),
    };
    if per_second {
        Cow::Owned(format!("{name}/Second"))
    } else {
        Cow::Borrowed(name)
    }
}

/// The statistic name of a quantile: 0.99 → `p99`, 0.999 → `p99.9`, 0.5 → `p50`.
pub fn quantile_name(quantile: f64) -> String {
    let percent = (quantile * 100.0 * 1e6).round() / 1e6;
    format!("p{percent}")
}

/// `amazonaws.com/AWS/EC2/CPUUtilization` → (`AWS/EC2`, `CPUUtilization`).
fn split_metric_name(name: &str) -> Option<(&str, &str)> {
    let rest = name.strip_prefix("amazonaws.com/").unwrap_or(name);
    rest.rsplit_once('/')
}

/// One summary datapoint, version-independent.
struct Point<'a> {
    namespace: Option<Cow<'a, str>>,
    metric_name: Option<Cow<'a, str>>,
    dimensions: Vec<(Cow<'a, str>, Cow<'a, str>)>,
    start_ns: u64,
    end_ns: u64,
    count: u64,
    sum: f64,
    quantiles: &'a [common::ValueAtQuantile],
}

/// Appends the datapoints of one metric; returns how many failed and the first reason.
struct Emitter<'b> {
    out: &'b mut MetricsBatchBuilder,
    appended: usize,
    failed: usize,
    first_failure: Option<String>,
}

impl Emitter<'_> {
    fn fail(&mut self, reason: String) {
        self.failed += 1;
        self.first_failure.get_or_insert(reason);
    }

    fn emit(&mut self, origin: &Origin<'_>, metric: &str, unit: &str, mut p: Point<'_>) {
        let Some(account_id) = origin.account_id.as_deref() else {
            return self.fail("resource has no cloud.account.id attribute".into());
        };
        let Some(region) = origin.region.as_deref() else {
            return self.fail("resource has no cloud.region attribute".into());
        };
        let split = split_metric_name(metric);
        let namespace = p
            .namespace
            .as_deref()
            .filter(|s| !s.is_empty())
            .or(split.map(|s| s.0));
        let metric_name = p
            .metric_name
            .as_deref()
            .filter(|s| !s.is_empty())
            .or(split.map(|s| s.1));
        let (Some(namespace), Some(metric_name)) = (namespace, metric_name) else {
            return self.fail(format!(
                "metric {metric:?} has no namespace and metric name"
            ));
        };
        p.dimensions.sort();
        p.dimensions.dedup_by(|a, b| a.0 == b.0);
        let (mut min, mut max) = (None, None);
        let mut stats: Vec<(String, f64)> = Vec::new();
        for q in p.quantiles {
            if q.quantile == 0.0 {
                min = Some(q.value);
            } else if q.quantile == 1.0 {
                max = Some(q.value);
            } else {
                stats.push((quantile_name(q.quantile), q.value));
            }
        }
        stats.sort_by(|a, b| a.0.cmp(&b.0));
        stats.dedup_by(|a, b| a.0 == b.0);
        let start_ns = if p.start_ns > 0 { p.start_ns } else { p.end_ns };
        let result = self.out.append(
            SeriesId {
                account_id,
                region,
                namespace,
                metric_name,
            },
            (start_ns / 1_000_000) as i64,
            p.dimensions.iter().map(|(k, v)| (k.as_ref(), v.as_ref())),
            (!unit.is_empty()).then(|| cloudwatch_unit(unit)).as_deref(),
            BaseStats {
                count: Some(p.count as f64),
                sum: Some(p.sum),
                min,
                max,
            },
            stats.iter().map(|(k, v)| (k.as_str(), *v)),
        );
        match result {
            Ok(()) => self.appended += 1,
            Err(reason) => self.fail(format!("metric {metric:?}: {reason}")),
        }
    }
}

fn emit_v1(request: &v1::ExportMetricsServiceRequest, emitter: &mut Emitter<'_>) {
    for rm in &request.resource_metrics {
        let origin = origin(rm.resource.as_ref());
        for metric in rm.scope_metrics.iter().flat_map(|s| &s.metrics) {
            let Some(summary) = &metric.summary else {
                emitter.fail(format!("metric {:?} is not a summary", metric.name));
                continue;
            };
            for dp in &summary.data_points {
                let mut point = Point {
                    namespace: None,
                    metric_name: None,
                    dimensions: Vec::new(),
                    start_ns: dp.start_time_unix_nano,
                    end_ns: dp.time_unix_nano,
                    count: dp.count,
                    sum: dp.sum,
                    quantiles: &dp.quantile_values,
                };
                for kv in &dp.attributes {
                    match kv.key.as_str() {
                        "Namespace" => point.namespace = value_str(kv.value.as_ref()),
                        "MetricName" => point.metric_name = value_str(kv.value.as_ref()),
                        "Dimensions" => {
                            if let Some(common::Value::KvList(list)) =
                                kv.value.as_ref().and_then(|v| v.value.as_ref())
                            {
                                for d in &list.values {
                                    if let Some(v) = value_str(d.value.as_ref()) {
                                        point.dimensions.push((Cow::Borrowed(&d.key), v));
                                    }
                                }
                            }
                        }
                        other => {
                            if let Some(v) = value_str(kv.value.as_ref()) {
                                point.dimensions.push((Cow::Borrowed(other), v));
                            }
                        }
                    }
                }
                emitter.emit(&origin, &metric.name, &metric.unit, point);
            }
        }
    }
}

fn emit_v07(request: &v07::ExportMetricsServiceRequest, emitter: &mut Emitter<'_>) {
    for rm in &request.resource_metrics {
        let origin = origin(rm.resource.as_ref());
        for metric in rm
            .instrumentation_library_metrics
            .iter()
            .flat_map(|s| &s.metrics)
        {
            let Some(summary) = &metric.double_summary else {
                emitter.fail(format!("metric {:?} is not a double summary", metric.name));
                continue;
            };
            for dp in &summary.data_points {
                let mut point = Point {
                    namespace: None,
                    metric_name: None,
                    dimensions: Vec::new(),
                    start_ns: dp.start_time_unix_nano,
                    end_ns: dp.time_unix_nano,
                    count: dp.count,
                    sum: dp.sum,
                    quantiles: &dp.quantile_values,
                };
                for label in &dp.labels {
                    let value = Cow::Borrowed(label.value.as_str());
                    match label.key.as_str() {
                        "Namespace" => point.namespace = Some(value),
                        "MetricName" => point.metric_name = Some(value),
                        key => point.dimensions.push((Cow::Borrowed(key), value)),
                    }
                }
                emitter.emit(&origin, &metric.name, &metric.unit, point);
            }
        }
    }
}

/// One datapoint as a metric stream sends it, to be encoded as OpenTelemetry 1.0
/// ([`encode_v1_record`]): for load generators and tests that need what AWS sends.
#[derive(Debug, Clone, Copy)]
pub struct StreamDatapoint<'a> {
    /// `cloud.account.id` of the resource.
    pub account_id: &'a str,
    /// `cloud.region` of the resource.
    pub region: &'a str,
    /// CloudWatch namespace, e.g. `AWS/Lambda`.
    pub namespace: &'a str,
    /// CloudWatch metric name.
    pub metric_name: &'a str,
    /// Dimension name and value pairs.
    pub dimensions: &'a [(&'a str, &'a str)],
    /// CloudWatch unit name (`Count`, `Milliseconds`, ...), sent as its UCUM code.
    pub unit: &'a str,
    /// Start of the period, epoch milliseconds.
    pub time_ms: i64,
    /// SampleCount (whole on the wire: OpenTelemetry's count is an integer).
    pub count: f64,
    /// Sum.
    pub sum: f64,
    /// Minimum (quantile 0.0).
    pub min: f64,
    /// Maximum (quantile 1.0).
    pub max: f64,
    /// Other configured percentiles: (quantile, value), e.g. (0.99, 812.0).
    pub percentiles: &'a [(f64, f64)],
}

/// The UCUM code Metric Streams sends for a CloudWatch unit name; unknown names are
/// sent as they are (the inverse of [`cloudwatch_unit`]).
fn ucum_unit(unit: &str) -> std::borrow::Cow<'_, str> {
    let (base, per_second) = match unit.strip_suffix("/Second") {
        Some(base) => (base, true),
        None => (unit, false),
    };
    let code = match base {
        "Seconds" => "s",
        "Milliseconds" => "ms",
        "Microseconds" => "us",
        "Bytes" => "By",
        "Kilobytes" => "kBy",
        "Megabytes" => "MBy",
        "Gigabytes" => "GBy",
        "Terabytes" => "TBy",
        "Bits" => "bit",
        "Kilobits" => "kbit",
        "Megabits" => "MBit",
        "Gigabits" => "GBit",
        "Terabits" => "Tbit",
        "Percent" => "%",
        "Count" => "{Count}",
        "None" => "1",
        _ => return Cow::Borrowed(unit),
    };
    if per_second {
        Cow::Owned(format!("{code}/s"))
    } else {
        Cow::Borrowed(code)
    }
}

fn string_kv(key: &str, value: &str) -> common::KeyValue {
    common::KeyValue {
        key: key.to_string(),
        value: Some(common::AnyValue {
            value: Some(common::Value::String(value.to_string())),
        }),
    }
}

/// Encodes datapoints as one OpenTelemetry 1.0 Metric Streams record: a
/// length-delimited `ExportMetricsServiceRequest` with one `ResourceMetrics` per run
/// of datapoints of the same account and region, metric names
/// `amazonaws.com/<Namespace>/<MetricName>`, and `Namespace`, `MetricName` and
/// `Dimensions` (a kvlist) as datapoint attributes, as AWS sends them.
pub fn encode_v1_record(points: &[StreamDatapoint<'_>]) -> Vec<u8> {
    let mut request = v1::ExportMetricsServiceRequest::default();
    for point in points {
        let same_origin = request.resource_metrics.last().is_some_and(|rm| {
            let origin = origin(rm.resource.as_ref());
            origin.account_id.as_deref() == Some(point.account_id)
                && origin.region.as_deref() == Some(point.region)
        });
        if !same_origin {
            request.resource_metrics.push(v1::ResourceMetrics {
                resource: Some(common::Resource {
                    attributes: vec![
                        string_kv("cloud.provider", "aws"),
                        string_kv("cloud.account.id", point.account_id),
                        string_kv("cloud.region", point.region),
                    ],
                }),
                scope_metrics: vec![v1::ScopeMetrics::default()],
            });
        }
        let rm = request.resource_metrics.last_mut().expect("pushed above");
        let start_ns = point.time_ms as u64 * 1_000_000;
        let mut quantile_values = vec![common::ValueAtQuantile {
            quantile: 0.0,
            value: point.min,
        }];
        quantile_values.extend(
            point
                .percentiles
                .iter()
                .map(|&(quantile, value)| common::ValueAtQuantile { quantile, value }),
        );
        quantile_values.push(common::ValueAtQuantile {
            quantile: 1.0,
            value: point.max,
        });
        let dimensions = common::KeyValueList {
            values: point
                .dimensions
                .iter()
                .map(|(k, v)| string_kv(k, v))
                .collect(),
        };
        rm.scope_metrics[0].metrics.push(v1::Metric {
            name: format!("amazonaws.com/{}/{}", point.namespace, point.metric_name),
            unit: ucum_unit(point.unit).into_owned(),
            summary: Some(v1::Summary {
                data_points: vec![v1::SummaryDataPoint {
                    attributes: vec![
                        string_kv("Namespace", point.namespace),
                        string_kv("MetricName", point.metric_name),
                        common::KeyValue {
                            key: "Dimensions".into(),
                            value: Some(common::AnyValue {
                                value: Some(common::Value::KvList(dimensions)),
                            }),
                        },
                    ],
                    start_time_unix_nano: start_ns,
                    time_unix_nano: start_ns + 60_000_000_000,
                    count: point.count.max(0.0) as u64,
                    sum: point.sum,
                    quantile_values,
                }],
            }),
        });
    }
    request.encode_length_delimited_to_vec()
}

/// Largest length prefix [`whole_messages_len`] waits for: a metric stream record is at
/// most 1 MiB, so a larger declared length is corruption, not a long message.
pub const MAX_MESSAGE_BYTES: u64 = 64 * 1024 * 1024;

/// The length of the longest prefix of `buf` made of whole length-delimited messages
/// (for reading a long input in pieces). When the framing is broken (an invalid length
/// prefix, or one over [`MAX_MESSAGE_BYTES`]) nothing after it can be framed again, so
/// the whole of `buf` is returned for the decoder to keep as a dead letter instead of
/// waiting for more input.
pub fn whole_messages_len(buf: &[u8]) -> usize {
    let mut cut = 0;
    loop {
        let mut rest = &buf[cut..];
        let before = rest.len();
        let len = match prost::encoding::decode_varint(&mut rest) {
            Ok(len) => len,
            // A varint cut by the end of the buffer: wait for the rest.
            Err(_) if before < 10 && buf[cut..].iter().all(|b| b & 0x80 != 0) => return cut,
            Err(_) => return buf.len(),
        };
        if len > MAX_MESSAGE_BYTES {
            return buf.len();
        }
        if len > rest.len() as u64 {
            return cut;
        }
        cut += (before - rest.len()) + len as usize;
        if cut == buf.len() {
            return cut;
        }
    }
}

/// Decodes the length-delimited `ExportMetricsServiceRequest` messages of one record
/// into `out`.
pub fn decode_record(
    version: OtelVersion,
    record: &[u8],
    out: &mut MetricsBatchBuilder,
) -> OtelOutcome {
    let mut outcome = OtelOutcome::default();
    let mut offset = 0;
    while offset < record.len() {
        let mut rest = &record[offset..];
        let before = rest.len();
        let len = match prost::encoding::decode_varint(&mut rest) {
            Ok(len) => len,
            Err(e) => {
                outcome.problems.push(Problem {
                    span: offset..record.len(),
                    reason: format!("bad length prefix at byte {offset}: {e}"),
                });
                break;
            }
        };
        let start = offset + (before - rest.len());
        if len > rest.len() as u64 {
            outcome.problems.push(Problem {
                span: offset..record.len(),
                reason: format!(
                    "message at byte {offset} declares {len} bytes, only {} remain",
                    rest.len()
                ),
            });
            break;
        }
        let span = start..start + len as usize;
        offset = span.end;
        let bytes = &record[span.clone()];
        let mut emitter = Emitter {
            out,
            appended: 0,
            failed: 0,
            first_failure: None,
        };
        let decoded = match version {
            OtelVersion::V1 => v1::ExportMetricsServiceRequest::decode(bytes)
                .map(|request| emit_v1(&request, &mut emitter)),
            OtelVersion::V07 => v07::ExportMetricsServiceRequest::decode(bytes)
                .map(|request| emit_v07(&request, &mut emitter)),
        };
        let (appended, failed, first_failure) =
            (emitter.appended, emitter.failed, emitter.first_failure);
        match decoded {
            Ok(()) => {
                outcome.messages += 1;
                outcome.datapoints += appended;
                if failed > 0 {
                    outcome.problems.push(Problem {
                        span,
                        reason: format!(
                            "{failed} datapoint(s) of this message not stored ({appended} stored): {}",
                            first_failure.unwrap_or_default()
                        ),
                    });
                }
            }
            Err(e) => outcome.problems.push(Problem {
                span,
                reason: format!("not an ExportMetricsServiceRequest: {e}"),
            }),
        }
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_map_back_to_cloudwatch_names() {
        for (ucum, cw) in [
            ("s", "Seconds"),
            ("us", "Microseconds"),
            ("ms", "Milliseconds"),
            ("By", "Bytes"),
            ("kBy", "Kilobytes"),
            ("MBy", "Megabytes"),
            ("GBy", "Gigabytes"),
            ("TBy", "Terabytes"),
            ("bit", "Bits"),
            ("kbit", "Kilobits"),
            ("MBit", "Megabits"),
            ("GBit", "Gigabits"),
            ("Tbit", "Terabits"),
            ("%", "Percent"),
            ("{Count}", "Count"),
            ("1", "None"),
            ("By/s", "Bytes/Second"),
            ("{Count}/s", "Count/Second"),
            ("GBit/s", "Gigabits/Second"),
            ("furlongs", "furlongs"),
        ] {
            assert_eq!(cloudwatch_unit(ucum), cw, "{ucum}");
        }
    }

    #[test]
    fn encoded_records_decode_to_the_same_datapoints() {
        let dims = [("FunctionName", "fn-0")];
        let point = |account_id, metric_name, unit, sum| StreamDatapoint {
            account_id,
            region: "eu-west-1",
            namespace: "AWS/Lambda",
            metric_name,
            dimensions: &dims,
            unit,
            time_ms: 1_700_000_040_000,
            count: 12.0,
            sum,
            min: 1.5,
            max: 9.0,
            percentiles: &[(0.99, 8.5)],
        };
        let mut record = encode_v1_record(&[
            point("111111111111", "Duration", "Milliseconds", 40.0),
            point("111111111111", "Invocations", "Count", 12.0),
        ]);
        record.extend(encode_v1_record(&[point(
            "222222222222",
            "Throughput",
            "Bytes/Second",
            7.0,
        )]));
        let mut out = MetricsBatchBuilder::new();
        let outcome = decode_record(OtelVersion::V1, &record, &mut out);
        assert_eq!((outcome.messages, outcome.datapoints), (2, 3));
        assert!(outcome.problems.is_empty(), "{:?}", outcome.problems);
        let batch = out.finish();
        let time = batch.column(fleetlake_model::schema::col::TIME);
        let time = time
            .as_any()
            .downcast_ref::<arrow::array::TimestampMicrosecondArray>()
            .unwrap();
        assert!(time.values().iter().all(|&t| t == 1_700_000_040_000_000));
        let batch = batch.project(&(1..=11).collect::<Vec<_>>()).unwrap();
        let text = arrow::util::pretty::pretty_format_batches(&[batch])
            .unwrap()
            .to_string();
        let expected = [
            "+--------------+-----------+------------+-------------+----------------------+--------------+-------+------+-----+-----+------------+",
            "| account_id   | region    | namespace  | metric_name | dimensions           | unit         | count | sum  | min | max | stats      |",
            "+--------------+-----------+------------+-------------+----------------------+--------------+-------+------+-----+-----+------------+",
            "| 111111111111 | eu-west-1 | AWS/Lambda | Duration    | {FunctionName: fn-0} | Milliseconds | 12.0  | 40.0 | 1.5 | 9.0 | {p99: 8.5} |",
            "| 111111111111 | eu-west-1 | AWS/Lambda | Invocations | {FunctionName: fn-0} | Count        | 12.0  | 12.0 | 1.5 | 9.0 | {p99: 8.5} |",
            "| 222222222222 | eu-west-1 | AWS/Lambda | Throughput  | {FunctionName: fn-0} | Bytes/Second | 12.0  | 7.0  | 1.5 | 9.0 | {p99: 8.5} |",
            "+--------------+-----------+------------+-------------+----------------------+--------------+-------+------+-----+-----+------------+",
        ];
        assert_eq!(text, expected.join("\n"));
    }

    #[test]
    fn quantile_names() {
        assert_eq!(quantile_name(0.99), "p99");
        assert_eq!(quantile_name(0.999), "p99.9");
        assert_eq!(quantile_name(0.5), "p50");
        assert_eq!(quantile_name(0.9999), "p99.99");
    }

    #[test]
    fn whole_messages_prefix() {
        assert_eq!(whole_messages_len(&[2, 0, 0, 3, 0]), 3);
        assert_eq!(whole_messages_len(&[2, 0, 0]), 3);
        assert_eq!(whole_messages_len(&[]), 0);
        assert_eq!(whole_messages_len(&[0x80]), 0);
        // Broken framing hands everything over at once instead of waiting for more.
        let garbage = [0xffu8; 12];
        assert_eq!(whole_messages_len(&garbage), 12);
        let mut huge = vec![2, 0, 0];
        prost::encoding::encode_varint(MAX_MESSAGE_BYTES + 1, &mut huge);
        huge.push(0);
        assert_eq!(whole_messages_len(&huge), huge.len());
    }

    #[test]
    fn metric_name_fallback() {
        assert_eq!(
            split_metric_name("amazonaws.com/AWS/EC2/CPUUtilization"),
            Some(("AWS/EC2", "CPUUtilization"))
        );
    }

    #[test]
    fn a_truncated_message_is_a_problem_and_earlier_ones_stay() {
        let request = v1::ExportMetricsServiceRequest {
            resource_metrics: vec![],
        };
        let mut record = Vec::new();
        request.encode_length_delimited(&mut record).unwrap();
        record.extend_from_slice(&[0x05, 0x0a]);
        let mut out = MetricsBatchBuilder::new();
        let outcome = decode_record(OtelVersion::V1, &record, &mut out);
        assert_eq!(outcome.messages, 1);
        assert_eq!(outcome.problems.len(), 1);
        assert_eq!(outcome.problems[0].span, 1..3);
    }
}
