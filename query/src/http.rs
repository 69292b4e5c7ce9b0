//! `POST /api/v1/sql`: the SQL in the body, results as JSON (default), CSV or an Arrow
//! IPC stream (`?format=json|csv|arrow`).
//!
//! With users configured, a request authenticates with `Authorization: Bearer <token>`
//! or basic auth (user and password); otherwise 401 with `WWW-Authenticate`. Status
//! codes follow Prometheus' query API: 400 for invalid SQL or parameters, 422 for a
//! query that went past its memory limit, 503 for one that timed out or a lake that
//! cannot be read.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine;
use datafusion::error::DataFusionError;
use futures::StreamExt;
use serde::Deserialize;
use tracing::debug;

use crate::access::{Access, Principal};
use crate::engine::{QueryEngine, QueryError};
use crate::format::{OutputFormat, render};
use crate::metrics as m;

/// Path of the SQL endpoint.
pub const SQL_PATH: &str = "/api/v1/sql";

#[derive(Clone)]
struct Sql {
    engine: Arc<QueryEngine>,
    access: Arc<Access>,
}

/// Router serving the SQL endpoint.
pub fn router(engine: Arc<QueryEngine>, access: Arc<Access>) -> Router {
    Router::new()
        .route(SQL_PATH, post(run_sql))
        .with_state(Sql { engine, access })
}

#[derive(Debug, Deserialize)]
struct Params {
    format: Option<String>,
}

fn error(status: StatusCode, message: &str) -> Response {
    let body = serde_json::json!({ "error": message }).to_string();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// The caller of a request, or why it is refused.
pub fn authenticate(access: &Access, headers: &HeaderMap) -> Result<Principal, &'static str> {
    if access.is_open() {
        return Ok(Principal::unrestricted("http"));
    }
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return Err("authentication required: send Authorization: Bearer <token> or basic auth");
    };
    let (scheme, credentials) = value.split_once(' ').unwrap_or((value, ""));
    let credentials = credentials.trim();
    let principal = if scheme.eq_ignore_ascii_case("bearer") {
        access.by_token(credentials)
    } else if scheme.eq_ignore_ascii_case("basic") {
        base64::engine::general_purpose::STANDARD
            .decode(credentials)
            .ok()
            .and_then(|raw| String::from_utf8(raw).ok())
            .and_then(|pair| {
                let (user, password) = pair.split_once(':')?;
                access.by_password(user, password)
            })
    } else {
        None
    };
    principal.ok_or("invalid credentials")
}

/// A request refused before any SQL ran (bad `format`, empty body): 400, counted as a
/// failed statement.
fn refused_early(message: &str) -> Response {
    ::metrics::counter!(m::QUERIES, "status" => "error", "protocol" => "http").increment(1);
    error(StatusCode::BAD_REQUEST, message)
}

async fn run_sql(
    State(state): State<Sql>,
    Query(params): Query<Params>,
    headers: HeaderMap,
    sql: String,
) -> Response {
    let started = Instant::now();
    let principal = match authenticate(&state.access, &headers) {
        Ok(principal) => principal,
        Err(message) => {
            ::metrics::counter!(m::QUERIES, "status" => "unauthenticated", "protocol" => "http")
                .increment(1);
            let mut response = error(StatusCode::UNAUTHORIZED, message);
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static(
                    "Bearer realm=\"fleetlake\", Basic realm=\"fleetlake\"",
                ),
            );
            return response;
        }
    };
    let format = match params
        .format
        .as_deref()
        .unwrap_or("json")
        .parse::<OutputFormat>()
    {
        Ok(format) => format,
        Err(message) => return refused_early(&message),
    };
    if sql.trim().is_empty() {
        return refused_early("empty query: send the SQL as the request body");
    }
    let result = match state.engine.admit(&principal) {
        Ok(admitted) => match state.engine.require_lake().await {
            Ok(()) => state
                .engine
                .run_admitted(&sql, &principal, &admitted)
                .await
                .map(|output| (output, admitted)),
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    // The rendered body counts against the statement's memory limit too: past it, the
    // error is the statement's, mapped below like any other.
    let result = result.and_then(|(mut output, admitted)| {
        let body = render(format, &output.schema, &output.batches).map_err(|e| {
            QueryError::Sql(Box::new(DataFusionError::Execution(format!(
                "cannot render result: {e}"
            ))))
        })?;
        output.batches.clear();
        output.reserve(body.len())?;
        Ok((body, output, admitted))
    });
    let response = match result {
        Ok((body, output, admitted)) => {
            ::metrics::counter!(m::QUERIES, "status" => "ok", "protocol" => "http").increment(1);
            // The statement keeps its memory and its place under the caps until
            // the body was handed to the connection: a client that reads slowly
            // holds them, not memory outside every limit.
            let statement = (output, admitted);
            let chunks = futures::stream::iter([Ok::<_, std::convert::Infallible>(
                bytes::Bytes::from(body),
            )])
            .chain(futures::stream::once(async move {
                drop(statement);
                Ok(bytes::Bytes::new())
            }));
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, format.content_type())],
                axum::body::Body::from_stream(chunks),
            )
                .into_response()
        }
        Err(e) => {
            let kind = e.kind();
            let status = StatusCode::from_u16(kind.http_status())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let label = kind.label();
            ::metrics::counter!(m::QUERIES, "status" => label, "protocol" => "http").increment(1);
            debug!(error = %e, user = %principal.name, "query failed");
            let mut response = error(status, &e.to_string());
            if status == StatusCode::TOO_MANY_REQUESTS {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            }
            response
        }
    };
    ::metrics::histogram!(m::QUERY_SECONDS, "protocol" => "http")
        .record(started.elapsed().as_secs_f64());
    response
}
