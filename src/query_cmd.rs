//! `fleetlake query`: SQL from the command line, over a data directory's lake or
//! through a running server.

use std::io::Write;

use anyhow::{Context, bail};
use fleetlake_query::{OutputFormat, Principal, QueryEngine, render};

use crate::config::Config;

pub(crate) fn run(
    config: &Config,
    server: Option<&str>,
    token: Option<&str>,
    format: OutputFormat,
    sql: &str,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Room for the deepest expression a statement may have (query.max_expression_depth)
        // to be planned and evaluated: DataFusion recurses once per level.
        .thread_stack_size(fleetlake_query::WORKER_STACK_BYTES)
        .build()
        .context("starting the async runtime")?;
    let out = runtime.block_on(async {
        match server {
            Some(url) => ask_server(url, token, format, sql).await,
            None => {
                // Whoever can read the data directory reads all of it.
                let registry = crate::alerting::registry(config)?;
                let engine = crate::alerting::with_alert_tables(
                    QueryEngine::new(config.lake_location()?, None)
                        .with_limits(config.query.limits()),
                    &registry,
                );
                let output = engine.sql(sql, &Principal::unrestricted("cli")).await?;
                Ok(render(format, &output.schema, &output.batches)?)
            }
        }
    })?;
    std::io::stdout().write_all(&out)?;
    Ok(())
}

async fn ask_server(
    url: &str,
    token: Option<&str>,
    format: OutputFormat,
    sql: &str,
) -> anyhow::Result<Vec<u8>> {
    // A table is drawn locally from the Arrow result; CSV and JSON come as the server
    // writes them.
    let wire = match format {
        OutputFormat::Table | OutputFormat::Arrow => "arrow",
        OutputFormat::Csv => "csv",
        OutputFormat::Json => "json",
    };
    let endpoint = format!(
        "{}{}?format={wire}",
        url.trim_end_matches('/'),
        fleetlake_query::http::SQL_PATH
    );
    let mut request = reqwest::Client::new().post(&endpoint).body(sql.to_string());
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request
        .send()
        .await
        .with_context(|| format!("asking {endpoint}"))?;
    let status = response.status();
    let body = response
        .bytes()
        .await
        .context("reading the server's answer")?;
    if !status.is_success() {
        let message = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        bail!("server answered {status}: {message}");
    }
    if format != OutputFormat::Table {
        return Ok(body.to_vec());
    }
    let reader = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(body), None)
        .context("reading the Arrow result")?;
    let schema = reader.schema();
    let batches = reader.collect::<Result<Vec<_>, _>>()?;
    Ok(render(OutputFormat::Table, &schema, &batches)?)
}
