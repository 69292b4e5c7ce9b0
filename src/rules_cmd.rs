//! `fleetlake rules check` and `fleetlake rules eval`: rule files checked against the
//! real schema, or evaluated once, without the service.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use fleetlake_alert_rules::SqlSource;
use fleetlake_alert_rules::engine::to_samples;
use fleetlake_model::Clock as _;
use fleetlake_query::QueryEngine;
use fleetlake_query::incremental::Incremental;
use serde_json::json;

use crate::alerting::{EngineSql, load_rules, registry, with_alert_tables};
use crate::config::Config;

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn engine(config: &Config) -> anyhow::Result<(EngineSql, fleetlake_alert_rules::Registry)> {
    let registry = registry(config)?;
    let engine = with_alert_tables(
        QueryEngine::new(config.lake_location()?, None).with_limits(config.query.limits()),
        &registry,
    );
    Ok((EngineSql::scanning(Arc::new(engine)), registry))
}

/// Validates `files`; every problem goes to stderr as `file:line:column: message`.
pub(crate) fn check(config: &Config, files: &[PathBuf]) -> anyhow::Result<()> {
    // Each file on its own first, so that one file's errors do not hide another's;
    // then all together (group names are unique over the files).
    let mut errors = Vec::new();
    let mut groups = Vec::new();
    for file in files {
        match fleetlake_alert_rules::rules::load(std::slice::from_ref(file)) {
            Ok(loaded) => groups.extend(loaded),
            Err(found) => errors.extend(found),
        }
    }
    if errors.is_empty()
        && let Err(found) = fleetlake_alert_rules::rules::load(files)
    {
        errors.extend(found);
    }
    let (sql, _) = engine(config)?;
    let runtime = runtime()?;
    errors.extend(
        runtime
            .block_on(fleetlake_alert_rules::check::check(&groups, &sql))
            .context("checking rules against the lake's schema")?,
    );
    if !errors.is_empty() {
        for e in &errors {
            eprintln!("{e}");
        }
        bail!("{} error(s) in rule files", errors.len());
    }
    // How each rule is evaluated, and why.
    for group in &groups {
        for rule in &group.rules {
            let path = runtime
                .block_on(Incremental::path(sql.engine(), &rule.expr))
                .with_context(|| format!("planning {}/{}", group.name, rule.alert))?;
            println!("{}/{}: {path}", group.name, rule.alert);
        }
    }
    let rules: usize = groups.iter().map(|g| g.rules.len()).sum();
    println!(
        "{} file(s), {} group(s), {rules} rule(s): OK",
        files.len(),
        groups.len()
    );
    Ok(())
}

/// Evaluates `files` once, as of `at` (epoch ms; now if not given), and prints each
/// rule's instances.
pub(crate) fn eval(
    config: &Config,
    files: &[PathBuf],
    format: &str,
    at: Option<i64>,
) -> anyhow::Result<()> {
    let groups = load_rules(files)?;
    let (sql, registry) = engine(config)?;
    let snapshot = registry.snapshot();
    // One instant for every rule, as a round of the service has.
    let at = at.unwrap_or_else(|| fleetlake_model::clock::SystemClock.now_ms());
    let mut out = std::io::stdout().lock();
    let mut failed = 0;
    runtime()?.block_on(async {
        for group in &groups {
            for rule in &group.rules {
                let started = std::time::Instant::now();
                let samples = match sql.query(&rule.expr, at).await {
                    Ok(batches) => to_samples(rule, &batches, &snapshot),
                    Err(e) => Err(e),
                };
                let took = started.elapsed();
                match samples {
                    Ok(samples) if format == "json" => {
                        for s in &samples {
                            writeln!(
                                out,
                                "{}",
                                json!({"group": group.name, "alert": rule.alert, "labels": s.labels, "annotations": s.annotations, "value": s.value})
                            )?;
                        }
                    }
                    Ok(samples) => {
                        writeln!(
                            out,
                            "{}/{}: {} instance(s) in {took:.2?}",
                            group.name,
                            rule.alert,
                            samples.len()
                        )?;
                        for s in &samples {
                            let labels: Vec<String> =
                                s.labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
                            writeln!(out, "  {{{}}} {}", labels.join(", "), s.value)?;
                        }
                    }
                    Err(e) if e.is_unavailable() => {
                        bail!("{}/{}: query engine unavailable: {e}", group.name, rule.alert);
                    }
                    Err(e) => {
                        failed += 1;
                        eprintln!("{}: {}/{}: {e}", rule.expr_position, group.name, rule.alert);
                    }
                }
            }
        }
        anyhow::Ok(())
    })?;
    if failed > 0 {
        bail!("{failed} rule(s) failed to evaluate");
    }
    Ok(())
}
