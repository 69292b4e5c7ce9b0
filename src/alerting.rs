//! Alerting wired to the other stages: rules run their SQL through the query engine,
//! transitions go to the lake's `alerts` table, the account registry becomes the
//! `accounts` table, and the HTTP API shows alerts and manages silences.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Context;
use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use deltalake::kernel::StructType;
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
use deltalake::protocol::SaveMode;
use fleetlake_aggregate::location::LakeLocation;
use fleetlake_aggregate::store::{CommitMeta, DeltaLake, Lake, WriteSettings};
use fleetlake_alert_rules::engine::ACCOUNT_ID;
use fleetlake_alert_rules::matchers::Matcher;
use fleetlake_alert_rules::{
    AlertError, Alerting, DirStates, GroupLeases, Queued, Registry, RuleGroup, Shared,
    SharedStates, SqlSource, TransitionLog,
};
use fleetlake_ingest::lease::LeaseSettings;
use fleetlake_query::incremental::{Incremental, RowFeed};
use fleetlake_query::{Access, Principal, QueryEngine, QueryError, SideTable};
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::warn;

use crate::alert_leases::{GroupLeaseKeeper, ObjectStates};
use crate::config::Config;

/// How often rows accepted since are folded into the incremental aggregates between
/// rounds.
const FOLD_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// The account registry the configuration names (empty if none).
pub(crate) fn registry(config: &Config) -> anyhow::Result<Registry> {
    match &config.accounts.file {
        Some(file) => Ok(Registry::load(file)?),
        None => Ok(Registry::empty()),
    }
}

/// `engine` with the `accounts` table (the registry now) and the `alerts` table.
pub(crate) fn with_alert_tables(engine: QueryEngine, registry: &Registry) -> QueryEngine {
    let live = registry.clone();
    engine
        .with_table(
            "accounts",
            SideTable::Rows(
                fleetlake_alert_rules::registry::schema(),
                Arc::new(move || live.snapshot().to_batch()),
            ),
        )
        .with_table(
            fleetlake_alert_rules::table::TABLE,
            SideTable::Lake(fleetlake_alert_rules::table::schema()),
        )
}

/// Rule files as configured (`rule_files`), parsed; every problem with its place.
pub(crate) fn load_rules(paths: &[std::path::PathBuf]) -> anyhow::Result<Vec<RuleGroup>> {
    fleetlake_alert_rules::rules::load(paths).map_err(|errors| {
        let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
        anyhow::anyhow!("invalid rule files:\n{}", lines.join("\n"))
    })
}

/// Rules' SQL, run by the query engine with full access.
pub(crate) struct EngineSql {
    engine: Arc<QueryEngine>,
    /// Incremental evaluation, with every rule's SQL to prepare together at the first
    /// round.
    incremental: Option<(Arc<Incremental>, Vec<String>)>,
    prepared: std::sync::atomic::AtomicBool,
}

impl EngineSql {
    /// Every statement as SQL over the lake (and the hot buffer, if the engine has it).
    pub(crate) fn scanning(engine: Arc<QueryEngine>) -> Self {
        Self {
            engine,
            incremental: None,
            prepared: false.into(),
        }
    }

    /// Rules of the incremental shape from partial aggregates fed by `feed`, the
    /// rest as SQL; `rules` are prepared together at the first round.
    pub(crate) fn incremental(
        engine: Arc<QueryEngine>,
        feed: Arc<dyn RowFeed>,
        rules: Vec<String>,
        window_bytes: usize,
    ) -> Self {
        let incremental =
            Arc::new(Incremental::new(Arc::clone(&engine), feed).with_window_bytes(window_bytes));
        // Rows are folded as they come, not all at the next round: a round then only
        // merges (and folds the last second's rows).
        let folding = Arc::downgrade(&incremental);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(FOLD_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                let Some(incremental) = folding.upgrade() else {
                    return;
                };
                if let Err(error) = incremental.fold_pending().await {
                    warn!(%error, "folding rows into incremental aggregates failed; the next round tries again");
                }
            }
        });
        Self {
            engine,
            incremental: Some((incremental, rules)),
            prepared: false.into(),
        }
    }

    pub(crate) fn engine(&self) -> &QueryEngine {
        &self.engine
    }

    /// `sql` at `at_ms` from partial aggregates, or `None` to run it as SQL.
    async fn partials_result(&self, sql: &str, at_ms: i64) -> Option<Vec<RecordBatch>> {
        use std::sync::atomic::Ordering;
        let (incremental, rules) = self.incremental.as_ref()?;
        if !self.prepared.load(Ordering::Acquire) {
            let rules: Vec<&str> = rules.iter().map(String::as_str).collect();
            match incremental.prepare(&rules, at_ms).await {
                Ok(()) => self.prepared.store(true, Ordering::Release),
                Err(error) => {
                    warn!(%error, "could not prepare incremental evaluation yet; rules run as SQL")
                }
            }
        }
        match incremental.run(sql, at_ms).await {
            Ok(Some(batches)) => {
                metrics::counter!("fleetlake_rule_evaluations_total", "path" => "incremental")
                    .increment(1);
                Some(batches)
            }
            Ok(None) => None,
            Err(error) => {
                warn!(%error, "incremental evaluation failed; the rule runs as SQL this round");
                metrics::counter!("fleetlake_incremental_failures_total").increment(1);
                None
            }
        }
    }
}

/// A query's failure as alerting sees it: the rule's fault (its SQL, its data, its
/// limits), or the service's (the lake unreadable, the engine overloaded), which is no
/// rule's failure.
fn rule_or_outage(e: QueryError) -> AlertError {
    if e.is_user_error() && !matches!(e, QueryError::Busy(_)) {
        AlertError::Rule(e.to_string())
    } else {
        AlertError::Unavailable(e.to_string())
    }
}

#[async_trait]
impl SqlSource for EngineSql {
    async fn query(&self, sql: &str, at_ms: i64) -> Result<Vec<RecordBatch>, AlertError> {
        if let Some(batches) = self.partials_result(sql, at_ms).await {
            return Ok(batches);
        }
        metrics::counter!("fleetlake_rule_evaluations_total", "path" => "sql").increment(1);
        self.engine
            .run_at(sql, &Principal::unrestricted("alerting"), at_ms)
            .await
            .map(|out| out.batches)
            .map_err(rule_or_outage)
    }

    async fn plan(&self, sql: &str) -> Result<SchemaRef, AlertError> {
        self.engine
            .plan(sql, &Principal::unrestricted("alerting"))
            .await
            .map_err(rule_or_outage)
    }
}

/// The lake's `alerts` table; each evaluation's transitions are one commit carrying
/// the evaluation's sequence number, so a retry after a crash commits nothing twice.
pub(crate) struct LakeAlerts {
    lake: LakeLocation,
    table: tokio::sync::Mutex<Option<Box<dyn Lake>>>,
}

impl LakeAlerts {
    pub(crate) fn new(lake: LakeLocation) -> Self {
        Self {
            lake,
            table: tokio::sync::Mutex::new(None),
        }
    }

    async fn open(&self) -> Result<Box<dyn Lake>, AlertError> {
        let name = fleetlake_alert_rules::table::TABLE;
        let mut table = self.lake.open_or_new(name).await.map_err(unavailable)?;
        if table.version().is_none() {
            let schema: StructType = fleetlake_alert_rules::table::schema()
                .as_ref()
                .try_into_kernel()
                .map_err(unavailable)?;
            table = match table
                .create()
                .with_table_name(name)
                .with_comment("fleetlake alert state transitions")
                .with_columns(schema.fields().cloned())
                .with_save_mode(SaveMode::Ignore)
                .await
            {
                Ok(table) => table,
                Err(e) => match self.lake.open(name).await {
                    Ok(Some(table)) => table,
                    _ => return Err(unavailable(e)),
                },
            };
        }
        let location = self.lake.table_url(name).to_string();
        Ok(Box::new(DeltaLake::new(
            table,
            location,
            WriteSettings::default(),
        )))
    }
}

/// The lake could not be read or written: the service's fault, retried later.
fn unavailable(e: impl std::fmt::Display) -> AlertError {
    AlertError::Unavailable(e.to_string())
}

#[async_trait]
impl TransitionLog for LakeAlerts {
    async fn append(&self, queued: Vec<Queued>) -> Result<(), AlertError> {
        let mut guard = self.table.lock().await;
        let mut lake = match guard.take() {
            Some(mut lake) => {
                lake.refresh().await.map_err(unavailable)?;
                lake
            }
            None => self.open().await?,
        };
        // Each rule group's state has its own application id: what the table holds
        // of each, then what is new.
        let mut done: BTreeMap<String, Option<i64>> = BTreeMap::new();
        for q in &queued {
            if !done.contains_key(&q.app_id) {
                let version = lake.app_transaction(&q.app_id).await.map_err(unavailable)?;
                done.insert(q.app_id.clone(), version);
            }
        }
        let fresh: Vec<Queued> = queued
            .into_iter()
            .filter(|q| done[&q.app_id].is_none_or(|v| q.seq as i64 > v))
            .collect();
        if fresh.is_empty() {
            *guard = Some(lake);
            return Ok(());
        }
        let mut last: BTreeMap<String, i64> = BTreeMap::new();
        for q in &fresh {
            let seq = last.entry(q.app_id.clone()).or_default();
            *seq = (*seq).max(q.seq as i64);
        }
        let meta = CommitMeta {
            transactions: last.into_iter().collect(),
            metadata: Vec::new(),
        };
        let rows = fresh.into_iter().map(|q| q.rows).collect();
        lake.append(rows, meta).await.map_err(unavailable)?;
        *guard = Some(lake);
        Ok(())
    }
}

/// Where rule groups' states are kept when instances share them: beside the lake's
/// tables, under `_fleetlake/alerting/groups/`.
const SHARED_STATES: &str = "_fleetlake/alerting/groups";

/// Builds the alerting stage of `serve`. With `leases` (a Kinesis lease table: several
/// instances), each rule group is evaluated by the holder of its lease, with its state
/// beside the lake; the keeper of this instance's leases is returned to be run.
pub(crate) fn open(
    config: &Config,
    engine: Arc<QueryEngine>,
    registry: Registry,
    external_url: String,
    feed: Arc<dyn RowFeed>,
    leases: Option<LeaseSettings>,
) -> anyhow::Result<(Alerting, Option<Arc<GroupLeaseKeeper>>)> {
    let groups = load_rules(&config.alerting.rule_files)?;
    let lake = config.lake_location()?;
    let rules_count: usize = groups.iter().map(|g| g.rules.len()).sum();
    // With several instances on the lake, `feed` follows their commits too (see
    // `follows_other_writers`).
    let sql = if rules_count > 0 && config.alerting.incremental.unwrap_or(true) {
        let rules = groups
            .iter()
            .flat_map(|g| g.rules.iter().map(|r| r.expr.clone()))
            .collect();
        EngineSql::incremental(engine, feed, rules, config.alerting.window_bytes)
    } else {
        EngineSql::scanning(engine)
    };
    // Without rules there is nothing to share.
    let keeper = leases.filter(|_| !groups.is_empty()).map(|settings| {
        Arc::new(GroupLeaseKeeper::new(
            settings,
            groups.iter().map(|g| g.name.clone()).collect(),
        ))
    });
    let shared = match &keeper {
        Some(keeper) => {
            let states: Arc<dyn SharedStates> = match lake.local_dir() {
                // Instances on one host: fsynced files, hard links as the fence.
                Some(dir) => Arc::new(DirStates::new(dir.join(SHARED_STATES))),
                None => Arc::new(ObjectStates::new(
                    lake.object_store(SHARED_STATES)
                        .context("the store of shared rule group states")?,
                )),
            };
            Some(Shared {
                states,
                leases: Arc::clone(keeper) as Arc<dyn GroupLeases>,
            })
        }
        None => None,
    };
    let alerting = Alerting::open(fleetlake_alert_rules::AlertingParts {
        config: config.alerting.clone(),
        groups,
        sql: Arc::new(sql),
        log: Arc::new(LakeAlerts::new(lake)),
        registry,
        state_dir: config.data_dir.join("alerting"),
        external_url,
        clock: fleetlake_model::clock::system(),
        shared,
    })
    .context("starting alerting")?;
    Ok((alerting, keeper))
}

#[derive(Clone)]
struct Api {
    alerting: Alerting,
    access: Arc<Access>,
}

fn reply(status: StatusCode, body: Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn error(status: StatusCode, message: &str) -> Response {
    metrics::counter!("fleetlake_alert_api_errors_total", "status" => status.as_u16().to_string())
        .increment(1);
    reply(status, json!({"status": "error", "error": message}))
}

/// Why a request is refused.
enum Refused {
    /// No or bad credentials.
    Unauthenticated(&'static str),
    /// A limited credential asked for a fleet-wide change.
    Forbidden,
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        match self {
            Self::Unauthenticated(why) => {
                let mut response = error(StatusCode::UNAUTHORIZED, why);
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer realm=\"fleetlake\""),
                );
                response
            }
            Self::Forbidden => error(
                StatusCode::FORBIDDEN,
                "a credential limited to some accounts cannot change silences",
            ),
        }
    }
}

impl Api {
    fn caller(&self, headers: &HeaderMap) -> Result<Principal, Refused> {
        fleetlake_query::http::authenticate(&self.access, headers).map_err(Refused::Unauthenticated)
    }

    /// Silences act on the whole fleet: only unrestricted callers may change them.
    fn fleet_caller(&self, headers: &HeaderMap) -> Result<Principal, Refused> {
        let principal = self.caller(headers)?;
        if principal.accounts.is_some() {
            return Err(Refused::Forbidden);
        }
        Ok(principal)
    }
}

/// `/api/v1/alerts`, `/api/v1/rules`, `/api/v1/silences`.
pub(crate) fn router(alerting: Alerting, access: Arc<Access>) -> Router {
    Router::new()
        .route("/api/v1/alerts", get(list_alerts))
        .route("/api/v1/rules", get(list_rules))
        .route("/api/v1/silences", get(list_silences).post(add_silence))
        .route("/api/v1/silences/{id}", delete(expire_silence))
        .with_state(Api { alerting, access })
}

/// Whether `principal` sees what concerns `account` (alerts, silences): an
/// unrestricted caller everything, a limited one its accounts only (and nothing
/// without an account).
fn sees_account(principal: &Principal, account: Option<&str>) -> bool {
    match &principal.accounts {
        None => true,
        Some(allowed) => account.is_some_and(|id| allowed.contains(id)),
    }
}

async fn list_alerts(State(api): State<Api>, headers: HeaderMap) -> Response {
    let principal = match api.caller(&headers) {
        Ok(p) => p,
        Err(refused) => return refused.into_response(),
    };
    let alerts: Vec<Value> = api
        .alerting
        .all_alerts(None)
        .await
        .into_iter()
        .filter(|a| sees_account(&principal, a["labels"][ACCOUNT_ID].as_str()))
        .collect();
    reply(
        StatusCode::OK,
        json!({"status": "success", "data": {"alerts": alerts}}),
    )
}

async fn list_rules(State(api): State<Api>, headers: HeaderMap) -> Response {
    if let Err(refused) = api.caller(&headers) {
        return refused.into_response();
    }
    let groups: Vec<Value> = api
        .alerting
        .groups()
        .iter()
        .map(|g| {
            json!({
                "name": g.name,
                "file": g.file.display().to_string(),
                "interval": g.interval.as_secs_f64(),
                "rules": g.rules.iter().map(|r| json!({
                    "name": r.alert,
                    "query": r.expr,
                    "duration": r.for_.as_secs_f64(),
                    "keepFiringFor": r.keep_firing_for.as_secs_f64(),
                    "labels": texts(&r.labels),
                    "annotations": texts(&r.annotations),
                    "type": "alerting",
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    reply(
        StatusCode::OK,
        json!({"status": "success", "data": {"groups": groups}}),
    )
}

fn texts(
    templates: &std::collections::BTreeMap<String, fleetlake_alert_rules::template::Template>,
) -> Value {
    templates
        .iter()
        .map(|(k, t)| (k.clone(), Value::String(t.text().to_string())))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

async fn list_silences(State(api): State<Api>, headers: HeaderMap) -> Response {
    let principal = match api.caller(&headers) {
        Ok(p) => p,
        Err(refused) => return refused.into_response(),
    };
    // As alerts: a limited caller sees the silences about its accounts only (their
    // matchers pin `account_id` to its accounts); fleet-wide ones, or ones that may
    // concern another account, are hidden.
    let silences = api
        .alerting
        .silences(|silence| {
            principal.accounts.is_none()
                || silence.accounts().is_some_and(|accounts| {
                    !accounts.is_empty()
                        && accounts.iter().all(|a| sees_account(&principal, Some(a)))
                })
        })
        .await;
    reply(StatusCode::OK, Value::Array(silences))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SilenceBody {
    /// As text (`owner_team="payments"`) or as Alertmanager's API has them
    /// (`{"name", "value", "isRegex", "isEqual"}`).
    matchers: Vec<Matcher>,
    #[serde(default)]
    starts_at: Option<String>,
    ends_at: String,
    #[serde(default)]
    comment: String,
    #[serde(default)]
    created_by: String,
}

async fn add_silence(State(api): State<Api>, headers: HeaderMap, body: String) -> Response {
    let principal = match api.fleet_caller(&headers) {
        Ok(p) => p,
        Err(refused) => return refused.into_response(),
    };
    let body: SilenceBody = match serde_json::from_str(&body) {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("invalid silence: {e}")),
    };
    let parsed = (|| -> Result<_, AlertError> {
        let matchers = body.matchers;
        let starts = body
            .starts_at
            .as_deref()
            .map(fleetlake_alert_rules::time::parse_rfc3339)
            .transpose()?;
        let ends = fleetlake_alert_rules::time::parse_rfc3339(&body.ends_at)?;
        Ok((matchers, starts, ends))
    })();
    let (matchers, starts, ends) = match parsed {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("invalid silence: {e}")),
    };
    let created_by = if body.created_by.is_empty() {
        principal.name
    } else {
        body.created_by
    };
    match api
        .alerting
        .add_silence(matchers, starts, ends, body.comment, created_by)
        .await
    {
        Ok(id) => reply(StatusCode::OK, json!({"silenceID": id})),
        Err(e @ (AlertError::State { .. } | AlertError::Unavailable(_))) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("the silence is not made: {e}"),
        ),
        Err(e) => error(StatusCode::BAD_REQUEST, &format!("invalid silence: {e}")),
    }
}

async fn expire_silence(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(refused) = api.fleet_caller(&headers) {
        return refused.into_response();
    }
    match api.alerting.expire_silence(&id).await {
        Ok(true) => reply(StatusCode::OK, json!({"status": "success"})),
        Ok(false) => error(StatusCode::NOT_FOUND, &format!("no silence with id {id:?}")),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("the silence is not expired: {e}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use fleetlake_query::limits::Busy;

    use super::*;

    #[test]
    fn query_failures_are_the_rules_or_the_services() {
        let rule = rule_or_outage(QueryError::Timeout(Duration::from_secs(30)));
        assert!(matches!(rule, AlertError::Rule(_)), "{rule:?}");
        for outage in [
            QueryError::Lake("s3: connection refused".into()),
            QueryError::Busy(Busy::Server(8)),
        ] {
            let e = rule_or_outage(outage);
            assert!(e.is_unavailable(), "{e:?}");
        }
    }
}
