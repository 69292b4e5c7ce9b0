//! Amazon Data Firehose HTTP endpoint delivery (`formats.md` §4), for CloudWatch
//! Metric Streams JSON records.
//!
//! A request is answered 200 only after its datapoints are durable in the
//! [`DatapointSink`]; every failure answers with the protocol's JSON body carrying the
//! request id and an `errorMessage`, so Firehose retries (or, for 413, gives up).

use std::borrow::Cow;
use std::io::Read;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine;
use serde::Deserialize;
use subtle::ConstantTimeEq;
use tracing::{debug, warn};

use crate::metric_stream::MetricsBatchBuilder;
use crate::metrics as m;
use crate::sink::{DatapointSink, SinkError};

/// Header carrying the request id, identical across retries of one request.
pub const REQUEST_ID_HEADER: &str = "x-amz-firehose-request-id";
/// Header carrying the configured access key.
pub const ACCESS_KEY_HEADER: &str = "x-amz-firehose-access-key";
/// Largest request body Firehose sends, before compression (64 MiB).
pub const DEFAULT_MAX_BODY_BYTES: usize = 64 * 1024 * 1024;
/// Most records Firehose puts in one request.
pub const MAX_RECORDS: usize = 10_000;
/// Bad lines logged one by one per request; the rest are only counted.
const LOGGED_BAD_LINES: usize = 5;

/// How one Firehose endpoint behaves.
#[derive(Debug, Clone)]
pub struct EndpointConfig {
    /// Name of the source in logs and metrics labels.
    pub source: String,
    /// The access key Firehose must send; `None` accepts any request.
    pub access_key: Option<String>,
    /// Largest body accepted, compressed or not, and largest body after gunzip.
    pub max_body_bytes: usize,
}

struct Endpoint {
    config: EndpointConfig,
    sink: Arc<dyn DatapointSink>,
}

/// An axum router serving one Firehose endpoint at `path`: POST for deliveries, GET
/// for Firehose's health check.
pub fn router(path: &str, config: EndpointConfig, sink: Arc<dyn DatapointSink>) -> Router {
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

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
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
    /// The valid datapoints.
    pub batch: arrow::array::RecordBatch,
    /// Lines or records that could not be decoded, described.
    pub bad: Vec<String>,
}

/// Decodes an (already decompressed) Firehose request body of metric-stream JSON
/// records. A malformed envelope is an error; malformed records or lines are listed in
/// [`Decoded::bad`] and the rest kept.
pub fn decode_request(body: &[u8]) -> Result<Decoded, String> {
    let envelope: Envelope<'_> =
        serde_json::from_slice(body).map_err(|e| format!("malformed request body: {e}"))?;
    if envelope.records.len() > MAX_RECORDS {
        return Err(format!(
            "{} records in one request, at most {MAX_RECORDS} allowed",
            envelope.records.len()
        ));
    }
    let mut builder = MetricsBatchBuilder::new();
    let mut bad = Vec::new();
    let mut data = Vec::new();
    for (index, record) in envelope.records.iter().enumerate() {
        data.clear();
        if let Err(e) =
            base64::engine::general_purpose::STANDARD.decode_vec(&*record.data, &mut data)
        {
            bad.push(format!("record {index}: data is not base64: {e}"));
            continue;
        }
        for error in builder.push_record(&data) {
            bad.push(format!("record {index}: {error}"));
        }
    }
    Ok(Decoded {
        request_id: envelope.request_id.map(Cow::into_owned),
        records: envelope.records.len(),
        batch: builder.finish(),
        bad,
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
        return Err(too_large());
    }
    match axum::body::to_bytes(body, limit).await {
        Ok(bytes) => Ok(bytes.to_vec()),
        Err(e) => {
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(err) = source {
                if err.is::<http_body_util::LengthLimitError>() {
                    return Err(too_large());
                }
                source = err.source();
            }
            Err(Rejection::new(
                StatusCode::BAD_REQUEST,
                format!("could not read request body: {e}"),
            ))
        }
    }
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

/// Handles one delivery; returns the body's request id once the data is durable.
async fn handle(
    ep: &Endpoint,
    headers: &HeaderMap,
    body: Body,
) -> Result<Option<String>, Rejection> {
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
    let limit = ep.config.max_body_bytes;
    let raw = read_body(body, headers, limit).await?;
    metrics::counter!(m::REQUEST_BYTES, "source" => source.to_string()).increment(raw.len() as u64);
    let gzipped = header_str(headers, header::CONTENT_ENCODING.as_str())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("gzip"));
    // Decompression and decoding are CPU work: keep them off the async workers.
    let decoded = tokio::task::spawn_blocking(move || {
        let body = if gzipped { gunzip(&raw, limit)? } else { raw };
        decode_request(&body).map_err(|e| Rejection::new(StatusCode::BAD_REQUEST, e))
    })
    .await
    .map_err(|e| {
        Rejection::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("decoder failed: {e}"),
        )
    })??;

    let request_id = decoded.request_id.as_deref().unwrap_or_default();
    metrics::counter!(m::RECORDS, "source" => source.to_string()).increment(decoded.records as u64);
    if !decoded.bad.is_empty() {
        metrics::counter!(m::BAD_LINES, "source" => source.to_string())
            .increment(decoded.bad.len() as u64);
        for problem in decoded.bad.iter().take(LOGGED_BAD_LINES) {
            warn!(source, request_id, error = %problem, "skipping undecodable datapoint");
        }
        if decoded.bad.len() > LOGGED_BAD_LINES {
            warn!(
                source,
                request_id,
                skipped = decoded.bad.len(),
                "skipped undecodable datapoints in request"
            );
        }
    }
    let rows = decoded.batch.num_rows();
    if rows > 0 {
        ep.sink.write(decoded.batch).await.map_err(|e| match e {
            SinkError::Overloaded(msg) => Rejection::new(StatusCode::SERVICE_UNAVAILABLE, msg),
            SinkError::Unavailable(msg) => Rejection::new(StatusCode::INTERNAL_SERVER_ERROR, msg),
        })?;
    }
    metrics::counter!(m::DATAPOINTS, "source" => source.to_string()).increment(rows as u64);
    debug!(source, request_id, rows, "accepted firehose request");
    Ok(decoded.request_id)
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

    #[test]
    fn decodes_records_and_keeps_good_lines() {
        let body = envelope(&[&format!("{LINE}\n{LINE}\n"), "garbage\n"]);
        let decoded = decode_request(body.as_bytes()).unwrap();
        assert_eq!(decoded.request_id.as_deref(), Some("req-1"));
        assert_eq!(decoded.records, 2);
        assert_eq!(decoded.batch.num_rows(), 2);
        assert_eq!(decoded.bad.len(), 1);
        assert!(
            decoded.bad[0].starts_with("record 1: line 1"),
            "{:?}",
            decoded.bad
        );
    }

    #[test]
    fn invalid_base64_is_a_bad_record_not_a_bad_request() {
        let body = r#"{"requestId":"r","timestamp":1,"records":[{"data":"!!!"}]}"#;
        let decoded = decode_request(body.as_bytes()).unwrap();
        assert_eq!(decoded.batch.num_rows(), 0);
        assert_eq!(decoded.bad.len(), 1);
    }

    #[test]
    fn malformed_envelope_is_an_error() {
        assert!(decode_request(b"{\"records\": 5}").is_err());
        assert!(decode_request(b"not json").is_err());
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
