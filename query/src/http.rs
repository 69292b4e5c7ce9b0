//! `POST /api/v1/sql`: the SQL in the body, results as JSON (default), CSV or Arrow.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::Deserialize;
use tracing::debug;

use crate::engine::{QueryEngine, QueryError};
use crate::format::{OutputFormat, render};
use crate::metrics as m;

/// Path of the SQL endpoint.
pub const SQL_PATH: &str = "/api/v1/sql";

/// Router serving the SQL endpoint.
pub fn router(engine: Arc<QueryEngine>) -> Router {
    Router::new()
        .route(SQL_PATH, post(run_sql))
        .with_state(engine)
}

#[derive(Debug, Deserialize)]
struct Params {
    format: Option<String>,
}

fn error(status: StatusCode, message: &str) -> Response {
    let body = serde_json::json!({ "error": message }).to_string();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn run_sql(
    State(engine): State<Arc<QueryEngine>>,
    Query(params): Query<Params>,
    sql: String,
) -> Response {
    let started = Instant::now();
    let format = match params
        .format
        .as_deref()
        .unwrap_or("json")
        .parse::<OutputFormat>()
    {
        Ok(format) => format,
        Err(message) => return error(StatusCode::BAD_REQUEST, &message),
    };
    if sql.trim().is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "empty query: send the SQL as the request body",
        );
    }
    let result = engine.sql(&sql).await;
    let response = match result {
        Ok(output) => match render(format, &output.schema, &output.batches) {
            Ok(body) => {
                ::metrics::counter!(m::QUERIES, "status" => "ok").increment(1);
                (
                    StatusCode::OK,
                    [(header::CONTENT_TYPE, format.content_type())],
                    body,
                )
                    .into_response()
            }
            Err(e) => {
                ::metrics::counter!(m::QUERIES, "status" => "error").increment(1);
                error(
                    StatusCode::BAD_REQUEST,
                    &format!("cannot render result: {e}"),
                )
            }
        },
        Err(e) => {
            ::metrics::counter!(m::QUERIES, "status" => "error").increment(1);
            let status = match &e {
                e if e.is_user_error() => StatusCode::BAD_REQUEST,
                QueryError::NoTable(_) | QueryError::Lake(_) => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            debug!(error = %e, "query failed");
            error(status, &e.to_string())
        }
    };
    ::metrics::histogram!(m::QUERY_SECONDS).record(started.elapsed().as_secs_f64());
    response
}
