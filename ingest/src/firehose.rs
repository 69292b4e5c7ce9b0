//! Amazon Data Firehose HTTP endpoint delivery (`formats.md` §4), for records of any
//! [`Format`] (one format per endpoint).
//!
//! A request is answered 200 only after its rows are durable in the [`RowSink`]; every
//! failure answers with the protocol's JSON body carrying the request id and an
//! `errorMessage`, so Firehose retries (or, for 413, gives up).
//!
//! Records that cannot be decoded are written to `dead_letters` in the same durable
//! write as the good rows, and the request is answered 200: Firehose would otherwise
//! retry the same undecodable bytes for up to two hours and then drop them. Only a
//! request whose envelope itself is malformed is answered 400.

use std::borrow::Cow;
use std::io::Read;
use std::sync::Arc;
use std::time::Instant;

use fleetlake_model::Clock as _;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine;
use futures::StreamExt;
use serde::Deserialize;
use subtle::ConstantTimeEq;
use tracing::{debug, warn};

use crate::decode::{DecodeStats, Decoder, Format};
use crate::metrics as m;
use fleetlake_model::schema::Table;
use fleetlake_model::sink::{RowSink, SinkError};

/// Header carrying the request id, identical across retries of one request.
pub const REQUEST_ID_HEADER: &str = "x-amz-firehose-request-id";
/// Header carrying the configured access key.
pub const ACCESS_KEY_HEADER: &str = "x-amz-firehose-access-key";
/// Header carrying the ARN of the delivery stream.
pub const SOURCE_ARN_HEADER: &str = "x-amz-firehose-source-arn";
/// Largest request body Firehose sends, before compression (64 MiB).
pub const DEFAULT_MAX_BODY_BYTES: usize = 64 * 1024 * 1024;
/// Most records Firehose puts in one request.
pub const MAX_RECORDS: usize = 10_000;
/// Largest record Firehose sends, decoded; a larger one is kept as a dead letter.
pub const MAX_RECORD_BYTES: usize = 1_024_000;
/// How one Firehose endpoint behaves.
#[derive(Debug, Clone)]
pub struct EndpointConfig {
    /// Name of the source in logs, metrics labels and dead letters.
    pub source: String,
    /// The format of the records.
    pub format: Format,
    /// Region of log events that do not carry one; when `None`, the region of the
    /// delivery stream's ARN (`X-Amz-Firehose-Source-Arn`) is used.
    pub region: Option<String>,
    /// The access key Firehose must send; `None` accepts any request.
    pub access_key: Option<String>,
    /// Largest body accepted, compressed or not, and largest body after gunzip.
    pub max_body_bytes: usize,
    /// Permits for requests being read and decoded at once, shared by every endpoint:
    /// a request that finds none left gets 503 and is retried, so the memory held by
    /// request bodies stays bounded.
    pub in_flight: Arc<tokio::sync::Semaphore>,
}

/// Requests read and decoded at once across all endpoints, by default.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 64;

struct Endpoint {
    config: EndpointConfig,
    sink: Arc<dyn RowSink>,
}

/// An axum router serving one Firehose endpoint at `path`: POST for deliveries, GET
/// for Firehose's health check.
pub fn router(path: &str, config: EndpointConfig, sink: Arc<dyn RowSink>) -> Router {
    let endpoint = Arc::new(Endpoint { config, sink });
    Router::new()
        .route(path, post(deliver).get(health))
        .layer(DefaultBodyLimit::disable())
        .with_state(endpoint)
}

/// A failed delivery: the status Firehose sees and the `errorMessage` it logs.
#[derive(Debug)]
struct Rejection {
    status: StatusCode,
    message: String,
}

impl Rejection {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

/// Now, from the model's wall clock.
fn now_ms() -> i64 {
    fleetlake_model::clock::SystemClock.now_ms()
}

/// The protocol's response: `{"requestId", "timestamp", "errorMessage"?}` as JSON.
fn respond(status: StatusCode, request_id: &str, error: Option<&str>) -> Response {
    let mut body = serde_json::json!({ "requestId": request_id, "timestamp": now_ms() });
    if let Some(message) = error {
        body["errorMessage"] = message.into();
    }
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn health() -> Response {
    respond(StatusCode::OK, "", None)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope<'a> {
    #[serde(borrow, default)]
    request_id: Option<Cow<'a, str>>,
    #[serde(default)]
    timestamp: Option<i64>,
    #[serde(borrow)]
    records: Vec<WireRecord<'a>>,
}

#[derive(Deserialize)]
struct WireRecord<'a> {
    #[serde(borrow)]
    data: Cow<'a, str>,
}

/// What decoding one request produced.
#[derive(Debug)]
pub struct Decoded {
    /// The `requestId` of the body.
    pub request_id: Option<String>,
    /// Records in the request.
    pub records: usize,
    /// The rows, per table, dead letters included.
    pub rows: Vec<(Table, arrow::array::RecordBatch)>,
    /// What the decoder counted.
    pub stats: DecodeStats,
    /// The first few dead-letter reasons, for logs.
    pub reasons: Vec<String>,
}

/// The region of a delivery stream ARN (`arn:aws:firehose:REGION:ACCOUNT:...`).
pub fn arn_region(arn: &str) -> Option<&str> {
    let mut parts = arn.split(':');
    (parts.next() == Some("arn"))
        .then(|| parts.nth(2))
        .flatten()
        .filter(|r| !r.is_empty())
}

/// Decodes an (already decompressed) Firehose request body of `format` records
/// arriving through `source`. A malformed envelope is an error; records that cannot be
/// decoded become dead letters and the rest is kept. `header_request_id` names the
/// request in dead letters when the body has no `requestId`.
pub fn decode_request(
    body: &[u8],
    source: &str,
    format: Format,
    region: Option<&str>,
    header_request_id: &str,
) -> Result<Decoded, String> {
    let envelope: Envelope<'_> =
        serde_json::from_slice(body).map_err(|e| format!("malformed request body: {e}"))?;
    if envelope.records.len() > MAX_RECORDS {
        return Err(format!(
            "{} records in one request, at most {MAX_RECORDS} allowed",
            envelope.records.len()
        ));
    }
    let request_id = envelope.request_id.as_deref().unwrap_or(header_request_id);
    // Retries of a request carry the same timestamp: dead letters of a retry then
    // de-duplicate like any redelivered row.
    let time_ms = envelope.timestamp.unwrap_or_else(now_ms);
    let mut decoder = Decoder::new(source, format, region);
    let mut data = Vec::new();
    for (index, record) in envelope.records.iter().enumerate() {
        data.clear();
        let position = format!("request {request_id} record {index}");
        if let Err(e) =
            base64::engine::general_purpose::STANDARD.decode_vec(&*record.data, &mut data)
        {
            decoder.dead_letter(
                time_ms,
                &position,
                &format!("data is not base64: {e}"),
                record.data.as_bytes(),
            );
            continue;
        }
        if data.len() > MAX_RECORD_BYTES {
            decoder.dead_letter(
                time_ms,
                &position,
                &format!(
                    "record of {} bytes is over Firehose's {MAX_RECORD_BYTES} byte limit",
                    data.len()
                ),
                &data,
            );
            continue;
        }
        decoder.push_record(&data, &position, time_ms);
    }
    Ok(Decoded {
        request_id: envelope.request_id.map(Cow::into_owned),
        records: envelope.records.len(),
        stats: decoder.stats(),
        reasons: decoder.sample_reasons().to_vec(),
        rows: decoder.finish(),
    })
}

fn gunzip(body: &[u8], limit: usize) -> Result<Vec<u8>, Rejection> {
    let mut out = Vec::with_capacity(body.len().saturating_mul(4).min(limit));
    flate2::read::MultiGzDecoder::new(body)
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| Rejection::new(StatusCode::BAD_REQUEST, format!("invalid gzip body: {e}")))?;
    if out.len() > limit {
        return Err(Rejection::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("decompressed body is over the {limit} byte limit"),
        ));
    }
    Ok(out)
}

async fn read_body(body: Body, headers: &HeaderMap, limit: usize) -> Result<Vec<u8>, Rejection> {
    let too_large = || {
        Rejection::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is over the {limit} byte limit"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        discard(body.into_data_stream(), limit).await;
        return Err(too_large());
    }
    let mut stream = body.into_data_stream();
    let mut bytes = Vec::with_capacity(declared.unwrap_or(0) as usize);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            Rejection::new(
                StatusCode::BAD_REQUEST,
                format!("could not read request body: {e}"),
            )
        })?;
        if bytes.len() + chunk.len() > limit {
            // Found while reading (chunked): the rest is dropped before the answer.
            discard(stream, limit).await;
            return Err(too_large());
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

fn header_str<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

async fn deliver(State(ep): State<Arc<Endpoint>>, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let source = ep.config.source.clone();
    let header_id = header_str(&headers, REQUEST_ID_HEADER)
        .unwrap_or_default()
        .to_string();
    let (status, request_id, error) = match handle(&ep, &headers, body).await {
        Ok(request_id) => (StatusCode::OK, request_id.unwrap_or(header_id), None),
        Err(rejection) => {
            warn!(
                source = %source,
                request_id = %header_id,
                status = rejection.status.as_u16(),
                error = %rejection.message,
                "rejecting firehose request"
            );
            (rejection.status, header_id, Some(rejection.message))
        }
    };
    metrics::counter!(m::REQUESTS, "source" => source.clone(), "status" => status.as_u16().to_string())
        .increment(1);
    metrics::histogram!(m::REQUEST_SECONDS, "source" => source)
        .record(started.elapsed().as_secs_f64());
    respond(status, &request_id, error.as_deref())
}

/// Longest a refused request's body is read (and dropped) before the answer.
const DISCARD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Reads and drops a refused request's body (up to twice `limit` bytes or 64 MiB,
/// Firehose's largest delivery, whichever is more; for at most [`DISCARD_TIMEOUT`])
/// before the answer goes out: a sender still writing its body then reads the
/// refusal, instead of finding the connection closed under it.
async fn discard(mut stream: axum::body::BodyDataStream, limit: usize) {
    let bound = limit.saturating_mul(2).max(64 << 20);
    let _ = tokio::time::timeout(DISCARD_TIMEOUT, async {
        let mut read = 0usize;
        while let Some(Ok(chunk)) = stream.next().await {
            read += chunk.len();
            if read > bound {
                break;
            }
        }
    })
    .await;
}

/// Handles one delivery; returns the body's request id once the data is durable.
async fn handle(
    ep: &Endpoint,
    headers: &HeaderMap,
    body: Body,
) -> Result<Option<String>, Rejection> {
    let _permit = match admit(ep, headers) {
        Ok(permit) => permit,
        Err(rejection) => {
            discard(body.into_data_stream(), ep.config.max_body_bytes).await;
            return Err(rejection);
        }
    };
    read_and_write(ep, headers, body).await
}

/// The checks made before a request's body is read: access key, content type, room
/// in the sink, and a reading slot (held until the request is answered).
fn admit<'e>(
    ep: &'e Endpoint,
    headers: &HeaderMap,
) -> Result<tokio::sync::SemaphorePermit<'e>, Rejection> {
    let source = ep.config.source.as_str();
    if let Some(expected) = &ep.config.access_key {
        let given = headers
            .get(ACCESS_KEY_HEADER)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if !bool::from(given.ct_eq(expected.as_bytes())) {
            let message = if given.is_empty() {
                "missing access key"
            } else {
                "invalid access key"
            };
            return Err(Rejection::new(StatusCode::UNAUTHORIZED, message));
        }
    }
    if let Some(kind) = header_str(headers, header::CONTENT_TYPE.as_str())
        && !kind
            .split(';')
            .next()
            .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
    {
        return Err(Rejection::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("content type {kind:?}: Firehose deliveries are application/json"),
        ));
    }
    ep.sink.admit().map_err(sink_rejection)?;
    ep.config.in_flight.try_acquire().map_err(|_| {
        metrics::counter!(m::REJECTED_IN_FLIGHT, "source" => source.to_string()).increment(1);
        Rejection::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many requests are being read at once; retry later",
        )
    })
}

/// Reads, decodes and writes an admitted delivery.
async fn read_and_write(
    ep: &Endpoint,
    headers: &HeaderMap,
    body: Body,
) -> Result<Option<String>, Rejection> {
    let source = ep.config.source.as_str();
    let limit = ep.config.max_body_bytes;
    let raw = read_body(body, headers, limit).await?;
    metrics::counter!(m::REQUEST_BYTES, "source" => source.to_string()).increment(raw.len() as u64);
    let gzipped = header_str(headers, header::CONTENT_ENCODING.as_str())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("gzip"));
    let format = ep.config.format;
    let region = ep.config.region.clone().or_else(|| {
        header_str(headers, SOURCE_ARN_HEADER)
            .and_then(arn_region)
            .map(str::to_string)
    });
    let header_id = header_str(headers, REQUEST_ID_HEADER)
        .unwrap_or_default()
        .to_string();
    let source_name = source.to_string();
    // Decompression and decoding are CPU work: keep them off the async workers.
    let decoded = tokio::task::spawn_blocking(move || {
        let body = if gzipped { gunzip(&raw, limit)? } else { raw };
        decode_request(&body, &source_name, format, region.as_deref(), &header_id)
            .map_err(|e| Rejection::new(StatusCode::BAD_REQUEST, e))
    })
    .await
    .map_err(|e| {
        Rejection::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("decoder failed: {e}"),
        )
    })??;

    let request_id = decoded.request_id.as_deref().unwrap_or_default();
    // Firehose sends one id in both places, and matches the response's to it.
    let sent_id = header_str(headers, REQUEST_ID_HEADER).unwrap_or_default();
    if !sent_id.is_empty() && !request_id.is_empty() && sent_id != request_id {
        return Err(Rejection::new(
            StatusCode::BAD_REQUEST,
            format!(
                "requestId {request_id:?} of the body is not the {REQUEST_ID_HEADER} header's {sent_id:?}"
            ),
        ));
    }
    let stats = decoded.stats;
    m::record_received(source, stats);
    if !decoded.rows.is_empty()
        && let Err(error) = ep.sink.write(decoded.rows).await
    {
        let reason = match error {
            SinkError::Overloaded(_) => "overloaded",
            SinkError::Unavailable(_) => "unavailable",
        };
        m::record_rejected(source, reason, stats);
        return Err(sink_rejection(error));
    }
    m::record_decoded(source, format.name(), stats);
    if stats.dead_letters > 0 {
        for reason in &decoded.reasons {
            warn!(source, request_id, error = %reason, "kept undecodable input as a dead letter");
        }
        if stats.dead_letters > decoded.reasons.len() {
            warn!(
                source,
                request_id,
                dead_letters = stats.dead_letters,
                "kept undecodable input of the request as dead letters"
            );
        }
    }
    debug!(
        source,
        request_id,
        records = decoded.records,
        datapoints = stats.datapoints,
        log_events = stats.log_events,
        "accepted firehose request"
    );
    Ok(decoded.request_id)
}

/// Over a limit: 503, Firehose retries later. Not durable: 500, Firehose retries too.
fn sink_rejection(error: SinkError) -> Rejection {
    match error {
        SinkError::Overloaded(msg) => Rejection::new(StatusCode::SERVICE_UNAVAILABLE, msg),
        SinkError::Unavailable(msg) => Rejection::new(StatusCode::INTERNAL_SERVER_ERROR, msg),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(records: &[&str]) -> String {
        let records: Vec<_> = records
            .iter()
            .map(|r| {
                serde_json::json!({"data": base64::engine::general_purpose::STANDARD.encode(r)})
            })
            .collect();
        serde_json::json!({"requestId": "req-1", "timestamp": 1, "records": records}).to_string()
    }

    const LINE: &str = r#"{"account_id":"111122223333","region":"us-east-1","namespace":"AWS/Lambda","metric_name":"Errors","dimensions":{"FunctionName":"f"},"timestamp":1700000000000,"value":{"count":1,"sum":2,"min":2,"max":2},"unit":"Count"}"#;

    fn decode(body: &str) -> Result<Decoded, String> {
        decode_request(body.as_bytes(), "test", Format::MetricsJson, None, "hdr")
    }

    #[test]
    fn decodes_records_and_keeps_good_lines() {
        let body = envelope(&[&format!("{LINE}\n{LINE}\n"), "garbage\n"]);
        let decoded = decode(&body).unwrap();
        assert_eq!(decoded.request_id.as_deref(), Some("req-1"));
        assert_eq!(decoded.records, 2);
        assert_eq!(decoded.stats.datapoints, 2);
        assert_eq!(decoded.stats.dead_letters, 1);
        assert_eq!(decoded.rows[0].0, Table::Metrics);
        assert_eq!(decoded.rows[0].1.num_rows(), 2);
        assert_eq!(decoded.rows[1].0, Table::DeadLetters);
        assert!(
            decoded.reasons[0].starts_with("request req-1 record 1 line 1:"),
            "{:?}",
            decoded.reasons
        );
    }

    #[test]
    fn invalid_base64_is_a_dead_letter_not_a_bad_request() {
        let body = r#"{"timestamp":1,"records":[{"data":"!!!"}]}"#;
        let decoded = decode(body).unwrap();
        assert_eq!(decoded.stats.datapoints, 0);
        assert_eq!(decoded.stats.dead_letters, 1);
        assert_eq!(decoded.rows.len(), 1);
        assert_eq!(decoded.rows[0].0, Table::DeadLetters);
        assert!(decoded.reasons[0].starts_with("request hdr record 0:"));
    }

    #[test]
    fn malformed_envelope_is_an_error() {
        assert!(decode("{\"records\": 5}").is_err());
        assert!(decode("not json").is_err());
    }

    #[test]
    fn region_of_a_delivery_stream_arn() {
        assert_eq!(
            arn_region("arn:aws:firehose:eu-west-1:123456789012:deliverystream/logs"),
            Some("eu-west-1")
        );
        assert_eq!(arn_region("nonsense"), None);
    }

    #[test]
    fn gunzip_enforces_the_limit() {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&vec![b'a'; 10_000]).unwrap();
        let gz = enc.finish().unwrap();
        assert_eq!(gunzip(&gz, 10_000).unwrap().len(), 10_000);
        let err = gunzip(&gz, 9_999).unwrap_err();
        assert_eq!(err.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(
            gunzip(b"nope", 100).unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
    }
}
