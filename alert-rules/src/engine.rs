//! Evaluation, state, routing and the outbox, wired together.
//!
//! Each group runs at its interval; each rule's SQL runs once over the whole fleet.
//! After every rule evaluation, in one step under its group's lock: the instances'
//! states change, notifications are queued in the group's outbox and the transitions
//! for the `alerts` table. At the end of the round the group's state file is written
//! (write, fsync, rename; see [`crate::store`]) when something in it must survive a
//! restart, and nothing that depends on such a change is sent or written before that
//! save holds it. Delivery workers (one per receiver) then post each group's outbox in
//! order and remove each message once its receiver accepted it, so a restart neither
//! re-pages nor forgets; transitions are committed to the lake with the group's
//! application id and the evaluation's sequence number as a Delta application
//! transaction, so none is written twice. Groups share no lock: a round of one group
//! never waits for another's.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Float64Type, SchemaRef};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tracing::{debug, error, info, warn};
use xxhash_rust::xxh3::Xxh3DefaultBuilder;

use fleetlake_model::clock::SharedClock;

use crate::config::{AlertingConfig, ReceiverConfig, ReceiverKind};
use crate::error::AlertError;
use crate::matchers::{Matcher, all_match};
use crate::notify::{self, FleetIncident, Message, RateLimits};
use crate::redact;
use crate::registry::{Account, LABEL_FIELDS, Registry, Snapshot};
use crate::rules::{ALERTNAME, Rule, RuleGroup, VALUE_COLUMN};
use crate::state::{self, AlertState, Instance, Labels, Sample, Transition, state_name};
use crate::store::{self, GroupLeases, GroupState, SharedStates, Silences};
use crate::table::{self, TransitionRow};
use crate::time::{parse_rfc3339, rfc3339};

/// Runs SQL for the evaluator (the query stage, with full access).
///
/// Errors are [`AlertError::Rule`] when the SQL is at fault (it does not parse or
/// plan, names what does not exist, fails on its data or its limits) and
/// [`AlertError::Unavailable`] when the service is (the lake or its store cannot be
/// read, the engine is overloaded): the evaluator keeps the rule's alerts as they are
/// either way, but only the first counts as the rule's failure.
#[async_trait]
pub trait SqlSource: Send + Sync + 'static {
    /// Runs `sql` as of `at_ms` (epoch ms): its `now()` is that instant, whatever the
    /// wall clock says while it runs; the result's rows.
    async fn query(&self, sql: &str, at_ms: i64) -> Result<Vec<RecordBatch>, AlertError>;
    /// Plans `sql` without running it; the result's schema.
    async fn plan(&self, sql: &str) -> Result<SchemaRef, AlertError>;
}

/// Where transitions go (the lake's `alerts` table).
#[async_trait]
pub trait TransitionLog: Send + Sync + 'static {
    /// Commits the transitions of the evaluations `queued` in one commit, leaving out
    /// those committed before (a sequence number at or below the last one committed
    /// under the same application id); the commit records each application id's last
    /// sequence number. A lake that cannot be written is [`AlertError::Unavailable`];
    /// the transitions stay queued and are tried again after the next evaluation.
    async fn append(&self, queued: Vec<Queued>) -> Result<(), AlertError>;
}

/// One evaluation's transitions, queued for the `alerts` table.
#[derive(Debug, Clone)]
pub struct Queued {
    /// The application id of the rule group's state (a Delta application
    /// transaction's `appId`).
    pub app_id: String,
    /// The evaluation's sequence number under that id (rising).
    pub seq: u64,
    /// Its transitions.
    pub rows: RecordBatch,
}

/// The label naming an alert's AWS account.
pub const ACCOUNT_ID: &str = "account_id";

/// A silence: alerts matching it are evaluated and recorded but not notified.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Silence {
    /// Its id.
    pub id: String,
    /// Matchers (all must match).
    pub matchers: Vec<Matcher>,
    /// Start, epoch ms.
    pub starts_at: i64,
    /// End, epoch ms.
    pub ends_at: i64,
    /// Why.
    pub comment: String,
    /// Who.
    pub created_by: String,
}

impl Silence {
    fn silences(&self, labels: &Labels, now: i64) -> bool {
        self.starts_at <= now && now < self.ends_at && all_match(&self.matchers, labels)
    }

    /// The accounts this silence is about, when its matchers pin `account_id` to a list
    /// decided safely (see [`Matcher::exact_values`]): it silences no other account's
    /// alerts, and names no other account. `None` when a matcher on `account_id` may
    /// accept any value, or when there is none (the silence is fleet-wide).
    pub fn accounts(&self) -> Option<BTreeSet<String>> {
        let mut accounts = BTreeSet::new();
        let mut pinned = false;
        for matcher in self.matchers.iter().filter(|m| m.name == ACCOUNT_ID) {
            let values = matcher.exact_values()?;
            // `account_id=""` matches alerts without an account: fleet-wide ones.
            if values.iter().any(|v| v.is_empty()) {
                return None;
            }
            accounts.extend(values.into_iter().map(str::to_string));
            pinned = true;
        }
        pinned.then_some(accounts)
    }

    /// As the HTTP API shows it.
    pub fn to_json(&self, now: i64) -> Value {
        let state = if now < self.starts_at {
            "pending"
        } else if now < self.ends_at {
            "active"
        } else {
            "expired"
        };
        json!({
            "id": self.id,
            "matchers": self.matchers.iter().map(|m| m.to_string()).collect::<Vec<_>>(),
            "startsAt": rfc3339(self.starts_at),
            "endsAt": rfc3339(self.ends_at),
            "comment": self.comment,
            "createdBy": self.created_by,
            "status": {"state": state},
        })
    }
}

/// A fleet incident in progress for one rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Storm {
    key: String,
    since: i64,
    labels: Labels,
    receivers: Vec<String>,
    accounts: usize,
}

/// One rule's instances and fleet incident.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct RuleState {
    instances: BTreeMap<String, Instance>,
    storm: Option<Storm>,
}

/// The alerting stage.
#[derive(Clone)]
pub struct Alerting {
    inner: Arc<Inner>,
}

struct Inner {
    config: AlertingConfig,
    groups: Vec<RuleGroup>,
    clock: SharedClock,
    sql: Arc<dyn SqlSource>,
    log: Arc<dyn TransitionLog>,
    registry: Registry,
    /// One per group, in the order of `groups`, then the files of groups no longer
    /// configured that still have something to deliver.
    slots: Vec<Slot>,
    silences: Mutex<Silences>,
    silences_path: PathBuf,
    /// Silences of `[[alerting.silences]]` (in `silences` too).
    configured_silences: Vec<Silence>,
    /// One change of shared silences at a time.
    silences_saving: tokio::sync::Mutex<()>,
    /// With several instances: shared states and group leases.
    shared: Option<Shared>,
    wake: tokio::sync::Notify,
    client: reqwest::Client,
    limits: RateLimits,
    external_url: String,
    writing: tokio::sync::Mutex<()>,
    /// Each rule's [`RowCache`], by rule key.
    made: Mutex<HashMap<String, RowCache>>,
}

/// A rule's result as the evaluator reads it.
#[derive(Debug)]
pub struct RuleResult {
    /// The group.
    pub group: String,
    /// The rule.
    pub alert: String,
    /// Its instances now, or why the evaluation failed.
    pub samples: Result<Vec<Sample>, AlertError>,
    /// How long the SQL took.
    pub took: Duration,
}

/// What one evaluation of a group came to.
#[derive(Debug, Default)]
pub struct Round {
    /// Rules whose result was applied to their alerts.
    pub evaluated: usize,
    /// Rules that failed on their own terms (SQL, result columns, templates), with why.
    pub rule_errors: Vec<(String, AlertError)>,
    /// Rules not evaluated because the query engine was unavailable.
    pub unavailable: usize,
    /// Not evaluated: another instance holds the group (or its state could not be
    /// loaded).
    pub not_held: bool,
}

/// A rule group's state and where it is saved.
struct Slot {
    /// The group's index in `Inner.groups`; `None` for the file of a group no longer
    /// configured, which only drains (and is deleted once empty).
    group: Option<usize>,
    /// Its file in the data directory.
    path: PathBuf,
    /// Its name in [`SharedStates`].
    name: String,
    state: Mutex<GroupState>,
    /// Whether `state` is the group's: always in a data directory; with shared
    /// states, from taking the group's lease and loading its state until the lease
    /// is gone (or another instance saved a newer version).
    held: AtomicBool,
    /// One save at a time (versions are made in order).
    saving: tokio::sync::Mutex<()>,
    /// Its pending and firing instances at its last round, for the gauges.
    pending: AtomicUsize,
    firing: AtomicUsize,
}

impl Slot {
    fn lock(&self) -> std::sync::MutexGuard<'_, GroupState> {
        self.state.lock().expect("alert state lock")
    }

    fn held(&self) -> bool {
        self.held.load(Ordering::Acquire)
    }
}

/// Rule groups shared by several instances: their states, and which this one holds.
#[derive(Clone)]
pub struct Shared {
    /// Where group states are saved.
    pub states: Arc<dyn SharedStates>,
    /// Which groups this instance evaluates.
    pub leases: Arc<dyn GroupLeases>,
}

/// Whether a message may be sent only once the state that queued it is saved. An
/// Alertmanager refresh (the rule's whole current state, sent every round) need not
/// be: losing it to a crash loses nothing the next round does not send again.
fn needs_save(message: &Message) -> bool {
    message.kind != "alerts"
}

/// How long transitions that need no save of their own (an instance became pending or
/// was dropped while pending) wait for one before they are saved anyway, so that they
/// reach the `alerts` table: a crash in between makes such an instance pending again
/// from the restart (its `for` starts over), which is all it loses.
const PENDING_SAVE_MS: i64 = 15_000;

/// How often a group's state is saved at least, for what the next round would set
/// again after a restart anyway (values, annotations, last seen).
const SAVE_EVERY_MS: i64 = 60_000;

fn rule_key(group: &str, alert: &str) -> String {
    format!("{group}/{alert}")
}

/// What a rule's last evaluation made of each of its rows, so that the next one
/// makes it again only when something it depends on changed. A row is known by a
/// 128-bit hash of its label columns' names and values; its labels and fingerprint
/// depend on those, the registry's record of its account and the rule (which does
/// not change while the service runs), so they are reused while the registry is
/// the same snapshot and the rule's labels are plain text (a label template may read
/// `$value`); its annotations also depend on its value, so they are reused while the
/// value is the same. Entries of rows the last evaluation did not return are dropped.
#[derive(Default)]
pub struct RowCache {
    registry: Option<Arc<Snapshot>>,
    rows: HashMap<u128, Made, Xxh3DefaultBuilder>,
}

/// One row as an evaluation made it.
struct Made {
    fingerprint: Arc<str>,
    labels: Arc<Labels>,
    value: u64,
    annotations: Arc<Labels>,
}

/// The hash that knows a row: its label columns' names and values, an empty or
/// null value as absent (it is not a label).
fn row_key(label_columns: &[(String, ArrayRef)], row: usize) -> u128 {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    for (name, column) in label_columns {
        let column = column.as_string::<i32>();
        hasher.update(name.as_bytes());
        if column.is_valid(row) && !column.value(row).is_empty() {
            hasher.update(&[0xff]);
            hasher.update(column.value(row).as_bytes());
        }
        hasher.update(&[0xfe]);
    }
    hasher.digest128()
}

/// Reads a rule's result rows into samples: `value` is the value, other columns
/// labels; registry fields, the alertname and the rule's labels are added, then the
/// annotations expanded.
pub fn to_samples(
    rule: &Rule,
    batches: &[RecordBatch],
    registry: &Arc<Snapshot>,
) -> Result<Vec<Sample>, AlertError> {
    to_samples_with(rule, batches, registry, &mut RowCache::default())
}

/// [`to_samples`], reusing what the rule's previous evaluation made of the rows that
/// did not change (`cache`, which is left holding this evaluation's rows).
pub fn to_samples_with(
    rule: &Rule,
    batches: &[RecordBatch],
    registry: &Arc<Snapshot>,
    cache: &mut RowCache,
) -> Result<Vec<Sample>, AlertError> {
    if !cache
        .registry
        .as_ref()
        .is_some_and(|r| Arc::ptr_eq(r, registry))
    {
        cache.rows.clear();
        cache.registry = Some(Arc::clone(registry));
    }
    let labels_fixed = rule.labels.values().all(|t| t.is_static());
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    let mut made = HashMap::with_capacity_and_hasher(rows, Xxh3DefaultBuilder);
    let mut samples = Vec::with_capacity(rows);
    let mut seen = HashSet::with_capacity(rows);
    for batch in batches {
        let schema = batch.schema();
        let value_index = schema
            .index_of(VALUE_COLUMN)
            .map_err(|_| AlertError::Rule(format!("the result has no `{VALUE_COLUMN}` column")))?;
        let values = cast(batch.column(value_index), &DataType::Float64)
            .map_err(|e| AlertError::Rule(format!("`{VALUE_COLUMN}` is not a number: {e}")))?;
        let values = values.as_primitive::<Float64Type>();
        let mut label_columns = Vec::new();
        for (i, field) in schema.fields().iter().enumerate() {
            if i == value_index {
                continue;
            }
            check_label_column(field.name(), field.data_type())?;
            let text = cast(batch.column(i), &DataType::Utf8)
                .map_err(|e| AlertError::Rule(format!("column {}: {e}", field.name())))?;
            label_columns.push((field.name().clone(), text));
        }
        for row in 0..batch.num_rows() {
            if values.is_null(row) {
                continue;
            }
            let value = values.value(row);
            let key = row_key(&label_columns, row);
            let before = cache.rows.remove(&key).filter(|_| labels_fixed);
            let (fingerprint, labels) = match &before {
                Some(m) => (Arc::clone(&m.fingerprint), Arc::clone(&m.labels)),
                None => {
                    let labels = row_labels(rule, &label_columns, row, value, registry)?;
                    (state::fingerprint(&labels).into(), Arc::new(labels))
                }
            };
            if !seen.insert(Arc::clone(&fingerprint)) {
                return Err(AlertError::Rule(format!(
                    "two rows have the same labels {labels:?}: add the column that tells them apart or aggregate"
                )));
            }
            let annotations = match before {
                Some(m) if m.value == value.to_bits() => m.annotations,
                _ => {
                    let account = row_account(&label_columns, row, registry);
                    let mut annotations = Labels::new();
                    for (name, template) in &rule.annotations {
                        let v = template
                            .render_for(&labels, value, account)
                            .map_err(|e| AlertError::Rule(format!("annotation {name}: {e}")))?;
                        annotations.insert(name.clone(), v);
                    }
                    Arc::new(annotations)
                }
            };
            made.insert(
                key,
                Made {
                    fingerprint: Arc::clone(&fingerprint),
                    labels: Arc::clone(&labels),
                    value: value.to_bits(),
                    annotations: Arc::clone(&annotations),
                },
            );
            samples.push(Sample {
                fingerprint,
                labels,
                annotations,
                value,
            });
        }
    }
    cache.rows = made;
    Ok(samples)
}

/// The registry's record of the account a result row is about (its `account_id`
/// column), which its templates read as `$account`.
fn row_account<'a>(
    label_columns: &[(String, ArrayRef)],
    row: usize,
    registry: &'a Snapshot,
) -> Option<&'a Account> {
    let (_, column) = label_columns.iter().find(|(name, _)| name == ACCOUNT_ID)?;
    let column = column.as_string::<i32>();
    column
        .is_valid(row)
        .then(|| registry.get(column.value(row)))
        .flatten()
}

/// The labels of one result row: its label columns, the registry's label fields of
/// its account, the alertname and the rule's labels.
fn row_labels(
    rule: &Rule,
    label_columns: &[(String, ArrayRef)],
    row: usize,
    value: f64,
    registry: &Snapshot,
) -> Result<Labels, AlertError> {
    let mut labels = Labels::new();
    for (name, column) in label_columns {
        let column = column.as_string::<i32>();
        if column.is_valid(row) && !column.value(row).is_empty() {
            labels.insert(name.clone(), column.value(row).to_string());
        }
    }
    let account = row_account(label_columns, row, registry);
    if let Some(account) = account {
        for field in LABEL_FIELDS {
            if !labels.contains_key(field)
                && let Some(v) = account.get(field)
            {
                labels.insert(field.to_string(), v);
            }
        }
    }
    labels.insert(ALERTNAME.into(), rule.alert.clone());
    for (name, template) in &rule.labels {
        let v = template
            .render_for(&labels, value, account)
            .map_err(|e| AlertError::Rule(format!("label {name}: {e}")))?;
        labels.insert(name.clone(), v);
    }
    Ok(labels)
}

/// Whether a column can be a label.
pub fn check_label_column(name: &str, data_type: &DataType) -> Result<(), AlertError> {
    if !crate::rules::is_label_name(name) {
        return Err(AlertError::Rule(format!(
            "column {name:?} is not a valid label name (use AS to rename it)"
        )));
    }
    if data_type.is_nested() {
        return Err(AlertError::Rule(format!(
            "column {name} is {data_type}: labels must be scalar (e.g. dimensions['FunctionName'])"
        )));
    }
    Ok(())
}

impl Inner {
    /// Saves a group's state (deletes the file of a group no longer configured once
    /// it is empty); whether it is durable now. A failure is counted and logged: the
    /// state stays in memory, nothing that waits for the save is sent or written, and
    /// the next round tries again.
    fn save(&self, slot: &Slot, state: &mut GroupState) -> bool {
        let started = Instant::now();
        let result = if slot.group.is_none() && state.drained() {
            store::remove(&slot.path)
        } else {
            store::write_json(&slot.path, &*state)
        };
        metrics::histogram!("fleetlake_alert_state_save_seconds")
            .record(started.elapsed().as_secs_f64());
        match result {
            Ok(()) => {
                state.saved(self.clock.now_ms());
                true
            }
            Err(error) => {
                metrics::counter!("fleetlake_alert_state_save_failures_total").increment(1);
                error!(%error, group = %state.group, "cannot save the alert state; its notifications wait until a save succeeds");
                false
            }
        }
    }

    /// Saves a group's state where it is kept (the file of a group no longer
    /// configured stays in the data directory); whether it is durable now.
    async fn persist(&self, slot: &Slot) -> bool {
        match &self.shared {
            Some(shared) if slot.group.is_some() => {
                self.save_shared(slot, shared.states.as_ref()).await
            }
            _ => {
                let mut p = slot.lock();
                self.save(slot, &mut p)
            }
        }
    }

    /// Saves a held group's state as its next version in `states`. Another
    /// instance's save of that version means the group's lease moved: this instance
    /// lets the group go (the next round loads it again if the lease is back).
    async fn save_shared(&self, slot: &Slot, states: &dyn SharedStates) -> bool {
        let _one = slot.saving.lock().await;
        let started = Instant::now();
        let (version, bytes, next_message, seq, group) = {
            let mut p = slot.lock();
            if !slot.held() {
                return false;
            }
            p.version += 1;
            p.must_save = false;
            match serde_json::to_vec(&*p) {
                Ok(bytes) => (p.version, bytes, p.next_message, p.seq, p.group.clone()),
                Err(e) => {
                    p.must_save = true;
                    error!(group = %p.group, error = %e, "cannot serialize the alert state");
                    return false;
                }
            }
        };
        let result = states.create(&slot.name, version, bytes).await;
        metrics::histogram!("fleetlake_alert_state_save_seconds")
            .record(started.elapsed().as_secs_f64());
        match result {
            Ok(true) => {
                slot.lock()
                    .saved_as_of(next_message, seq, self.clock.now_ms());
                true
            }
            Ok(false) => {
                metrics::counter!("fleetlake_alert_groups_superseded_total").increment(1);
                warn!(%group, version, "another instance saved this rule group's state: its lease moved; letting the group go");
                self.let_go(slot);
                false
            }
            Err(error) => {
                metrics::counter!("fleetlake_alert_state_save_failures_total").increment(1);
                error!(%error, %group, "cannot save the alert state; its notifications wait until a save succeeds");
                slot.lock().must_save = true;
                false
            }
        }
    }

    /// Makes `slot` hold its group's newest saved state (a new one if none was
    /// saved), for this instance took its lease.
    async fn take_up(
        &self,
        slot: &Slot,
        group: &RuleGroup,
        states: &dyn SharedStates,
    ) -> Result<(), AlertError> {
        let saved = states.latest(&slot.name).await?;
        let mut state = match saved {
            Some((version, bytes)) => {
                let mut state =
                    GroupState::from_saved(group, &bytes).map_err(|source| AlertError::State {
                        path: PathBuf::from(&slot.name),
                        source,
                    })?;
                state.version = state.version.max(version);
                state
            }
            None => GroupState::new(&group.name)?,
        };
        state.saved_at_ms = self.clock.now_ms();
        info!(group = %group.name, version = state.version, "evaluating this rule group (its lease is here)");
        *slot.lock() = state;
        slot.held.store(true, Ordering::Release);
        metrics::counter!("fleetlake_alert_groups_taken_total").increment(1);
        Ok(())
    }

    /// With shared states, takes the newest saved silences (and this instance's
    /// configured ones); a failure keeps the ones known.
    async fn refresh_silences(&self) {
        let Some(shared) = &self.shared else {
            return;
        };
        let known = self.silences.lock().expect("silences lock").version;
        match shared.states.latest(store::SILENCES).await {
            Ok(Some((version, bytes))) if version > known => {
                match serde_json::from_slice::<Silences>(&bytes) {
                    Ok(mut saved) => {
                        saved.version = version;
                        Arc::make_mut(&mut saved.list)
                            .extend(self.configured_silences.iter().cloned());
                        let mut current = self.silences.lock().expect("silences lock");
                        if current.version < version {
                            *current = saved;
                        }
                    }
                    Err(error) => {
                        warn!(%error, version, "unreadable shared silences; keeping the ones known")
                    }
                }
            }
            Ok(_) => {}
            Err(error) => warn!(%error, "cannot read the shared silences; keeping the ones known"),
        }
    }

    /// Drops a group's state from memory: another instance holds it.
    fn let_go(&self, slot: &Slot) {
        if slot.held.swap(false, Ordering::AcqRel) {
            let mut p = slot.lock();
            info!(group = %p.group, "no longer evaluating this rule group (its lease is elsewhere)");
            *p = GroupState::default();
            slot.pending.store(0, Ordering::Relaxed);
            slot.firing.store(0, Ordering::Relaxed);
        }
    }

    fn receiver(&self, name: &str) -> Option<&ReceiverConfig> {
        self.config.receivers.iter().find(|r| r.name == name)
    }

    fn route(&self, labels: &Labels) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for route in &self.config.routes {
            if all_match(&route.matchers, labels) {
                if !out.contains(&route.receiver) {
                    out.push(route.receiver.clone());
                }
                if !route.continue_ {
                    return out;
                }
            }
        }
        if out.is_empty()
            && let Some(d) = &self.config.default_receiver
        {
            out.push(d.clone());
        }
        out
    }

    fn enqueue(
        &self,
        p: &mut GroupState,
        receiver: &str,
        kind: &str,
        body: Value,
        coalesce: Option<String>,
        now: i64,
    ) {
        let queue = p.outbox.entry(receiver.to_string()).or_default();
        if let Some(key) = &coalesce {
            queue.retain(|m| m.coalesce.as_ref() != Some(key));
        }
        p.next_message += 1;
        let message = Message {
            id: p.next_message,
            receiver: receiver.to_string(),
            kind: kind.to_string(),
            body,
            coalesce,
            created_ms: now,
            attempts: 0,
            next_attempt_ms: now,
        };
        p.must_save |= needs_save(&message);
        queue.push_back(message);
        let queued = queue.len();
        outbox_gauge(&p.group, receiver, queued);
    }

    /// Why an instance must not page now, if it must not. Silences are checked at
    /// the moment the round's results are applied, not at the round's instant: a
    /// round reads what was acknowledged until it runs, and a silence made before
    /// its results are applied (under the same lock) mutes them, as Alertmanager
    /// checks silences when it notifies.
    fn muted(
        &self,
        silences: &[Silence],
        labels: &Labels,
        registry: &Snapshot,
        now: i64,
    ) -> Option<&'static str> {
        let now = now.max(self.clock.now_ms());
        if silences.iter().any(|s| s.silences(labels, now)) {
            return Some("silenced");
        }
        let inactive = labels
            .get("account_id")
            .and_then(|a| registry.get(a))
            .is_some_and(|a| !a.is_active());
        inactive.then_some("inactive account")
    }

    fn storm_threshold_exceeded(&self, accounts: usize, registry: &Snapshot) -> bool {
        let by_number = self.config.storm_accounts.is_some_and(|n| accounts > n);
        let active = registry.active();
        let by_share = self
            .config
            .storm_share
            .is_some_and(|share| active > 0 && accounts as f64 > share * active as f64);
        by_number || by_share
    }

    /// Applies one rule's samples to its group's state (`slot`) and queues what
    /// follows; returns the sequence number of the transitions queued for the
    /// `alerts` table, if any.
    fn apply(
        &self,
        slot: &Slot,
        group: &RuleGroup,
        rule: &Rule,
        samples: Vec<Sample>,
        now: i64,
    ) -> Option<u64> {
        let registry = self.registry.snapshot();
        let key = rule_key(&group.name, &rule.alert);
        let silences = Arc::clone(&self.silences.lock().expect("silences lock").list);
        let mut guard = slot.lock();
        let p = &mut *guard;
        let mut rs = p.rules.remove(&rule.alert).unwrap_or_default();
        let transitions = state::apply(
            &mut rs.instances,
            samples,
            now,
            rule.for_,
            rule.keep_firing_for,
            self.config.resend_resolved_for,
        );
        // Firing and resolving must survive a restart; becoming pending or being
        // dropped while pending may wait for a later save.
        let fired = |s: Option<AlertState>| {
            matches!(s, Some(AlertState::Firing) | Some(AlertState::Resolved))
        };
        p.must_save |= transitions.iter().any(|t| fired(t.from) || fired(t.to));
        let mut notes: BTreeMap<String, String> = BTreeMap::new();
        let mut rows = Vec::new();

        // Firing instances that may page.
        let mut eligible = Vec::new();
        for (fp, instance) in &rs.instances {
            if instance.state != AlertState::Firing {
                continue;
            }
            match self.muted(&silences, &instance.labels, &registry, now) {
                Some(why) => {
                    notes.insert(fp.clone(), why.to_string());
                }
                None => eligible.push(fp.clone()),
            }
        }
        let accounts: BTreeSet<String> = eligible
            .iter()
            .map(|fp| {
                rs.instances[fp]
                    .labels
                    .get("account_id")
                    .cloned()
                    .unwrap_or_else(|| fp.clone())
            })
            .collect();
        let storming = self.storm_threshold_exceeded(accounts.len(), &registry);
        let external = self.external_url.clone();

        // Storm start and end.
        if storming && rs.storm.is_none() {
            let mut common: Option<Labels> = None;
            for fp in &eligible {
                let l = &rs.instances[fp].labels;
                common = Some(match common {
                    None => l.as_ref().clone(),
                    Some(c) => c.into_iter().filter(|(k, v)| l.get(k) == Some(v)).collect(),
                });
            }
            let mut labels = common.unwrap_or_default();
            labels.remove("account_id");
            labels.remove("account_name");
            labels.insert(ALERTNAME.into(), rule.alert.clone());
            labels.insert("fleet".into(), "true".into());
            let storm_key = notify::dedup_key(
                &rule.alert,
                &format!("fleet-{}", state::fingerprint(&labels)),
            );
            let receivers = if self.muted(&silences, &labels, &registry, now).is_some() {
                Vec::new()
            } else {
                self.route(&labels)
            };
            let (by_region, by_team) = counts(&rs.instances, &eligible);
            let account_list: Vec<String> = accounts.iter().cloned().collect();
            let incident = FleetIncident {
                labels: &labels,
                accounts: &account_list,
                by_region: &by_region,
                by_team: &by_team,
                instances: eligible.len(),
            };
            for name in &receivers {
                let Some(receiver) = self.receiver(name) else {
                    continue;
                };
                let body = match receiver.kind {
                    ReceiverKind::Pagerduty => notify::pagerduty_fleet_event(
                        receiver, "trigger", &storm_key, &incident, now, &external,
                    ),
                    ReceiverKind::Webhook => notify::webhook_payload(
                        name,
                        &rule.alert,
                        vec![fleet_am_alert(
                            &storm_key, &incident, now, None, now, &external, true,
                        )],
                        &external,
                    ),
                    ReceiverKind::Alertmanager => json!([fleet_am_alert(
                        &storm_key, &incident, now, None, now, &external, false
                    )]),
                };
                let coalesce =
                    (receiver.kind == ReceiverKind::Alertmanager).then(|| storm_key.clone());
                self.enqueue(p, name, "fleet-trigger", body, coalesce, now);
            }
            metrics::counter!("fleetlake_fleet_incidents_total", "alertname" => rule.alert.clone())
                .increment(1);
            warn!(alert = %rule.alert, accounts = accounts.len(), "fleet incident: one notification instead of a page per account");
            rows.push(TransitionRow {
                time: now,
                rule_group: group.name.clone(),
                alertname: rule.alert.clone(),
                state: "firing".into(),
                previous_state: "inactive".into(),
                fingerprint: storm_key.clone(),
                account_id: None,
                value: accounts.len() as f64,
                labels: Arc::new(labels.clone()),
                annotations: Arc::new(Labels::from([(
                    "summary".to_string(),
                    format!("{} firing for {} accounts", rule.alert, accounts.len()),
                )])),
                active_at: now,
                notification: describe(&receivers),
            });
            p.must_save = true;
            rs.storm = Some(Storm {
                key: storm_key,
                since: now,
                labels,
                receivers,
                accounts: accounts.len(),
            });
        } else if !storming && let Some(storm) = rs.storm.take() {
            p.must_save = true;
            let account_list: Vec<String> = Vec::new();
            let empty = BTreeMap::new();
            let incident = FleetIncident {
                labels: &storm.labels,
                accounts: &account_list,
                by_region: &empty,
                by_team: &empty,
                instances: 0,
            };
            for name in &storm.receivers {
                let Some(receiver) = self.receiver(name) else {
                    continue;
                };
                let body = match receiver.kind {
                    ReceiverKind::Pagerduty => notify::pagerduty_fleet_event(
                        receiver,
                        "resolve",
                        &storm.key,
                        &incident,
                        storm.since,
                        &external,
                    ),
                    ReceiverKind::Webhook => notify::webhook_payload(
                        name,
                        &rule.alert,
                        vec![fleet_am_alert(
                            &storm.key,
                            &incident,
                            storm.since,
                            Some(now),
                            now,
                            &external,
                            true,
                        )],
                        &external,
                    ),
                    ReceiverKind::Alertmanager => json!([fleet_am_alert(
                        &storm.key,
                        &incident,
                        storm.since,
                        Some(now),
                        now,
                        &external,
                        false
                    )]),
                };
                let coalesce =
                    (receiver.kind == ReceiverKind::Alertmanager).then(|| storm.key.clone());
                self.enqueue(p, name, "fleet-resolve", body, coalesce, now);
            }
            rows.push(TransitionRow {
                time: now,
                rule_group: group.name.clone(),
                alertname: rule.alert.clone(),
                state: "resolved".into(),
                previous_state: "firing".into(),
                fingerprint: storm.key.clone(),
                account_id: None,
                value: accounts.len() as f64,
                labels: Arc::new(storm.labels.clone()),
                annotations: Arc::default(),
                active_at: storm.since,
                notification: describe(&storm.receivers),
            });
        } else if let Some(storm) = &mut rs.storm {
            storm.accounts = accounts.len();
        }

        // Per-instance triggers (none while a fleet incident stands for them).
        let mut changed: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for fp in &eligible {
            if rs.storm.is_some() {
                notes.insert(fp.clone(), "fleet incident".into());
                continue;
            }
            let instance = rs.instances.get_mut(fp).expect("eligible instances exist");
            if instance.notified {
                continue;
            }
            instance.receivers = self.route(&instance.labels);
            instance.notified = true;
            p.must_save = true;
            notes.insert(fp.clone(), describe(&instance.receivers));
            for name in instance.receivers.clone() {
                let Some(receiver) = self.receiver(&name) else {
                    continue;
                };
                if receiver.kind == ReceiverKind::Pagerduty {
                    let body =
                        notify::pagerduty_event(receiver, "trigger", fp, instance, &external);
                    self.enqueue(p, &name, "trigger", body, None, now);
                }
                changed.entry(name).or_default().push(fp.clone());
            }
        }
        // Resolves go where the triggers went.
        for t in &transitions {
            if t.to != Some(AlertState::Resolved) {
                continue;
            }
            let instance = &rs.instances[&t.fingerprint];
            if !instance.notified {
                continue;
            }
            notes.insert(t.fingerprint.clone(), describe(&instance.receivers));
            for name in &instance.receivers {
                let Some(receiver) = self.receiver(name) else {
                    continue;
                };
                if receiver.kind == ReceiverKind::Pagerduty {
                    let body = notify::pagerduty_event(
                        receiver,
                        "resolve",
                        &t.fingerprint,
                        instance,
                        &external,
                    );
                    self.enqueue(p, name, "resolve", body, None, now);
                }
                changed
                    .entry(name.clone())
                    .or_default()
                    .push(t.fingerprint.clone());
            }
        }
        // Alertmanager receivers get the rule's whole current state each evaluation
        // (Alertmanager resolves what is not sent again); webhooks get the group when
        // it changed.
        let valid_for = 4 * group.interval.max(Duration::from_secs(60)).as_millis() as i64;
        for receiver in &self.config.receivers {
            let name = &receiver.name;
            let mine = |i: &Instance| i.notified && i.receivers.contains(name);
            let alerts = |for_webhook: bool| -> Vec<Value> {
                rs.instances
                    .iter()
                    .filter(|(_, i)| mine(i))
                    .map(|(fp, i)| {
                        let resolved = i.state == AlertState::Resolved;
                        let ends = match (resolved, for_webhook) {
                            (true, _) => i.resolved_at,
                            (false, true) => None,
                            (false, false) => Some(now + valid_for),
                        };
                        notify::AmAlert {
                            fingerprint: fp,
                            labels: &i.labels,
                            annotations: &i.annotations,
                            starts_ms: i.fired_at.unwrap_or(i.active_at),
                            ends_ms: ends,
                            resolved,
                        }
                        .to_json(&external, for_webhook)
                    })
                    .collect()
            };
            match receiver.kind {
                ReceiverKind::Pagerduty => {}
                ReceiverKind::Alertmanager => {
                    let list = alerts(false);
                    if !list.is_empty() {
                        self.enqueue(
                            p,
                            name,
                            "alerts",
                            Value::Array(list),
                            Some(key.clone()),
                            now,
                        );
                    }
                    if let Some(storm) = &rs.storm
                        && storm.receivers.contains(name)
                    {
                        let incident = FleetIncident {
                            labels: &storm.labels,
                            accounts: &[],
                            by_region: &BTreeMap::new(),
                            by_team: &BTreeMap::new(),
                            instances: storm.accounts,
                        };
                        let body = json!([fleet_am_alert(
                            &storm.key,
                            &incident,
                            storm.since,
                            Some(now + valid_for),
                            now,
                            &external,
                            false
                        )]);
                        self.enqueue(p, name, "alerts", body, Some(storm.key.clone()), now);
                    }
                }
                ReceiverKind::Webhook => {
                    if changed.contains_key(name) {
                        let list = alerts(true);
                        let body = notify::webhook_payload(name, &rule.alert, list, &external);
                        self.enqueue(p, name, "webhook", body, None, now);
                    }
                }
            }
        }

        for t in &transitions {
            rows.push(row_of(
                group,
                rule,
                t,
                notes.get(&t.fingerprint).cloned(),
                now,
            ));
        }
        p.rules.insert(rule.alert.clone(), rs);
        (!rows.is_empty()).then(|| {
            p.seq += 1;
            p.unwritten.push((p.seq, rows));
            p.seq
        })
    }

    /// Ends a round of the group of `slot` whose rules were applied at `now`: its
    /// state saved once if it must be, then the deliverers woken. Saved when something
    /// that must survive a restart changed (an instance fired or resolved, a
    /// notification that is not an Alertmanager refresh was queued, a fleet incident
    /// began or ended), within [`PENDING_SAVE_MS`] for transitions waiting for a save,
    /// and every [`SAVE_EVERY_MS`] for the rest (values, annotations, last seen,
    /// which the next round sets again after a restart): a group of a million
    /// instances takes seconds to write, which a round every few seconds cannot pay
    /// when nothing changed.
    async fn commit_round(&self, slot: &Slot, now: i64) {
        let (due, pending, firing) = {
            let p = slot.lock();
            let since = now - p.saved_at_ms;
            let due = p.must_save
                || (p.seq > p.saved_seq && since >= PENDING_SAVE_MS)
                || since >= SAVE_EVERY_MS;
            let (mut pending, mut firing) = (0, 0);
            for rs in p.rules.values() {
                for i in rs.instances.values() {
                    match i.state {
                        AlertState::Pending => pending += 1,
                        AlertState::Firing => firing += 1,
                        AlertState::Resolved => {}
                    }
                }
            }
            (due, pending, firing)
        };
        if due {
            self.persist(slot).await;
        }
        slot.pending.store(pending, Ordering::Relaxed);
        slot.firing.store(firing, Ordering::Relaxed);
        let sum = |count: fn(&Slot) -> &AtomicUsize| -> usize {
            self.slots
                .iter()
                .map(|s| count(s).load(Ordering::Relaxed))
                .sum()
        };
        metrics::gauge!("fleetlake_alerts", "state" => "pending").set(sum(|s| &s.pending) as f64);
        metrics::gauge!("fleetlake_alerts", "state" => "firing").set(sum(|s| &s.firing) as f64);
        self.wake.notify_waiters();
    }

    /// Whether some group has saved transitions not yet in the `alerts` table.
    fn transitions_to_write(&self) -> bool {
        self.slots.iter().filter(|slot| slot.held()).any(|slot| {
            let p = slot.lock();
            p.unwritten
                .first()
                .is_some_and(|(seq, _)| *seq <= p.saved_seq)
        })
    }

    /// Commits the saved transitions of every group to the `alerts` table in one
    /// commit, oldest first within each group. Only saved ones: a restart gives the
    /// numbers of unsaved ones to other transitions.
    async fn write_transitions(&self) {
        let _one = self.writing.lock().await;
        let mut taken: Vec<(usize, String, store::Unwritten)> = Vec::new();
        for (index, slot) in self.slots.iter().enumerate() {
            if !slot.held() {
                continue;
            }
            let p = slot.lock();
            let saved: Vec<_> = p
                .unwritten
                .iter()
                .take_while(|(seq, _)| *seq <= p.saved_seq)
                .cloned()
                .collect();
            if !saved.is_empty() {
                taken.push((index, p.app_id.clone(), saved));
            }
        }
        if taken.is_empty() {
            return;
        }
        // One commit for all of them: a round of 1,000 rules can queue a thousand
        // evaluations' transitions, and a commit costs a read of the table's log.
        let queued = taken
            .iter()
            .flat_map(|(_, app_id, saved)| {
                saved.iter().map(|(seq, rows)| Queued {
                    app_id: app_id.clone(),
                    seq: *seq,
                    rows: table::to_batch(rows),
                })
            })
            .collect();
        match self.log.append(queued).await {
            Ok(()) => {
                // Not saved for this alone: the next save drops them from the file,
                // and until then a restart appends them again, which the table's
                // application transaction (the sequence numbers) turns into nothing.
                for (index, _, saved) in &taken {
                    let last = saved.last().map(|(seq, _)| *seq).unwrap_or_default();
                    let slot = &self.slots[*index];
                    let mut p = slot.lock();
                    p.unwritten.retain(|(s, _)| *s > last);
                    if slot.group.is_none() && p.drained() {
                        self.save(slot, &mut p);
                    }
                }
            }
            Err(error) => {
                metrics::counter!("fleetlake_alert_transition_write_failures_total", "kind" => error.label())
                    .increment(1);
                warn!(%error, kind = error.label(), "alert transitions not committed yet; retrying at the next evaluation");
            }
        }
    }

    /// The next message for `receiver` that may be sent: the front of some group's
    /// queue (each group's in order) that its group's saves allow, the one due
    /// first; with its slot's index.
    fn next_message(&self, receiver: &str) -> Option<(usize, Message)> {
        let mut next: Option<(usize, Message)> = None;
        for (index, slot) in self.slots.iter().enumerate() {
            if !slot.held() {
                continue;
            }
            let p = slot.lock();
            let Some(m) = p.outbox.get(receiver).and_then(VecDeque::front) else {
                continue;
            };
            let sendable = m.id <= p.saved_through || (!needs_save(m) && !p.must_save);
            let sooner = next.as_ref().is_none_or(|(_, n)| {
                (m.next_attempt_ms, m.created_ms) < (n.next_attempt_ms, n.created_ms)
            });
            if sendable && sooner {
                next = Some((index, m.clone()));
            }
        }
        next
    }

    async fn deliver(self: Arc<Self>, receiver: ReceiverConfig) {
        let name = receiver.name.clone();
        let kind = notify::kind_name(receiver.kind);
        let endpoint = receiver.shown_endpoint();
        let secrets = receiver.secrets();
        loop {
            let Some((index, message)) = self.next_message(&name) else {
                let _ = tokio::time::timeout(Duration::from_secs(1), self.wake.notified()).await;
                continue;
            };
            let now = self.clock.now_ms();
            if message.next_attempt_ms > now {
                let wait = Duration::from_millis((message.next_attempt_ms - now) as u64);
                tokio::time::sleep(wait.min(Duration::from_secs(1))).await;
                continue;
            }
            if receiver.kind == ReceiverKind::Pagerduty {
                let key = receiver.routing_key.as_deref().unwrap_or_default();
                let wait = self.limits.wait(key, receiver.rate_limit_per_minute, now);
                if !wait.is_zero() {
                    metrics::counter!("fleetlake_notifications_rate_limited_total", "receiver" => name.clone())
                        .increment(1);
                    tokio::time::sleep(wait).await;
                    continue;
                }
            }
            let outcome = notify::send(&self.client, &receiver, &message.body).await;
            let slot = &self.slots[index];
            let save = {
                let mut guard = slot.lock();
                let p = &mut *guard;
                let queue = p.outbox.entry(name.clone()).or_default();
                let result = match &outcome {
                    Ok(()) => {
                        debug!(receiver = %name, kind = %message.kind, "notification delivered");
                        queue.retain(|m| m.id != message.id);
                        "sent"
                    }
                    Err(why) if !why.is_retryable() => {
                        // The body carries a PagerDuty event's routing key.
                        let body = redact::scrub(&message.body.to_string(), &secrets);
                        error!(receiver = %name, %endpoint, kind = %message.kind, %why, %body, "notification refused; not retried");
                        queue.retain(|m| m.id != message.id);
                        "failed"
                    }
                    Err(why) => {
                        let now = self.clock.now_ms();
                        if now - message.created_ms > self.config.give_up_after.as_millis() as i64 {
                            error!(receiver = %name, %endpoint, kind = %message.kind, %why, "notification dropped after retrying for too long");
                            queue.retain(|m| m.id != message.id);
                            "expired"
                        } else {
                            if let Some(m) = queue.iter_mut().find(|m| m.id == message.id) {
                                m.attempts += 1;
                                let wait = notify::backoff(
                                    m.attempts,
                                    self.config.retry_initial,
                                    self.config.retry_max,
                                );
                                m.next_attempt_ms = now + wait.as_millis() as i64;
                                warn!(receiver = %name, %endpoint, kind = %m.kind, %why, attempts = m.attempts, retry_in = ?wait, "notification failed; will retry");
                            }
                            "retried"
                        }
                    }
                };
                let queued = queue.len();
                outbox_gauge(&p.group, &name, queued);
                metrics::counter!("fleetlake_notifications_total", "receiver" => name.clone(), "type" => kind, "result" => result)
                .increment(1);
                // A message out of the queue is saved at once, so that a restart does not
                // send it again; an Alertmanager refresh is sent again by the next round
                // anyway, and a retry's schedule need not survive a restart.
                let save = result != "retried" && (needs_save(&message) || slot.group.is_none());
                if save {
                    p.must_save = true;
                }
                save
            };
            if save {
                self.persist(slot).await;
            }
        }
    }
}

/// `fleetlake_outbox_messages`: messages waiting, per group and receiver.
fn outbox_gauge(group: &str, receiver: &str, queued: usize) {
    metrics::gauge!("fleetlake_outbox_messages", "group" => group.to_string(), "receiver" => receiver.to_string())
        .set(queued as f64);
}

fn describe(receivers: &[String]) -> String {
    if receivers.is_empty() {
        "no receiver".into()
    } else {
        receivers.join(",")
    }
}

fn counts(
    instances: &BTreeMap<String, Instance>,
    fps: &[String],
) -> (BTreeMap<String, usize>, BTreeMap<String, usize>) {
    let mut by_region = BTreeMap::new();
    let mut by_team = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for fp in fps {
        let labels = &instances[fp].labels;
        let account = labels
            .get("account_id")
            .cloned()
            .unwrap_or_else(|| fp.clone());
        if !seen.insert(account) {
            continue;
        }
        let get = |k: &str| labels.get(k).cloned().unwrap_or_else(|| "unknown".into());
        *by_region.entry(get("region")).or_insert(0) += 1;
        *by_team.entry(get("owner_team")).or_insert(0) += 1;
    }
    (by_region, by_team)
}

fn fleet_am_alert(
    key: &str,
    incident: &FleetIncident<'_>,
    since: i64,
    ends: Option<i64>,
    now: i64,
    external: &str,
    for_webhook: bool,
) -> Value {
    let annotations = Labels::from([
        (
            "summary".to_string(),
            format!(
                "{} firing for {} accounts",
                incident.labels.get(ALERTNAME).cloned().unwrap_or_default(),
                incident.accounts.len().max(incident.instances)
            ),
        ),
        ("accounts".to_string(), incident.accounts.join(",")),
    ]);
    let resolved = ends.is_some_and(|e| e <= now);
    notify::AmAlert {
        fingerprint: key,
        labels: incident.labels,
        annotations: &annotations,
        starts_ms: since,
        ends_ms: ends,
        resolved,
    }
    .to_json(external, for_webhook)
}

fn row_of(
    group: &RuleGroup,
    rule: &Rule,
    t: &Transition,
    note: Option<String>,
    now: i64,
) -> TransitionRow {
    TransitionRow {
        time: now,
        rule_group: group.name.clone(),
        alertname: rule.alert.clone(),
        state: state_name(t.to).into(),
        previous_state: state_name(t.from).into(),
        fingerprint: t.fingerprint.clone(),
        account_id: t.instance.labels.get("account_id").cloned(),
        value: t.instance.value,
        labels: Arc::clone(&t.instance.labels),
        annotations: Arc::clone(&t.instance.annotations),
        active_at: t.instance.active_at,
        notification: match t.to {
            Some(AlertState::Firing) | Some(AlertState::Resolved) => note.unwrap_or_default(),
            _ => String::new(),
        },
    }
}

/// What `Alerting::open` needs.
pub struct AlertingParts {
    /// `[alerting]`.
    pub config: AlertingConfig,
    /// The rules.
    pub groups: Vec<RuleGroup>,
    /// SQL for evaluation.
    pub sql: Arc<dyn SqlSource>,
    /// The `alerts` table.
    pub log: Arc<dyn TransitionLog>,
    /// The account registry.
    pub registry: Registry,
    /// Directory of the state file.
    pub state_dir: PathBuf,
    /// Base URL for links.
    pub external_url: String,
    /// Where "now" comes from (the system clock in the service, a manual one in
    /// tests).
    pub clock: SharedClock,
    /// With several instances: where group states are kept and which groups this
    /// one holds; `None` for one instance (states in `state_dir`).
    pub shared: Option<Shared>,
}

impl Alerting {
    /// Loads the state files (see [`crate::store`]) and prepares evaluation and
    /// delivery.
    pub fn open(parts: AlertingParts) -> Result<Self, AlertError> {
        parts.config.validate()?;
        // With shared states the data directory holds no group's state: what it holds
        // (from before several instances) drains as the files of removed groups do.
        let shared = parts.shared.is_some();
        let local_groups: &[RuleGroup] = if shared { &[] } else { &parts.groups };
        let loaded = store::load(&parts.state_dir, local_groups)?;
        let mut silences = loaded.silences;
        // Silences from the configuration are replaced at each start.
        let list = Arc::make_mut(&mut silences.list);
        list.retain(|s| !s.id.starts_with("config-"));
        let now = parts.clock.now_ms();
        for (i, s) in parts.config.silences.iter().enumerate() {
            list.push(Silence {
                id: format!("config-{i}"),
                matchers: s.matchers.clone(),
                starts_at: s
                    .starts_at
                    .as_deref()
                    .map(parse_rfc3339)
                    .transpose()?
                    .unwrap_or(now),
                ends_at: parse_rfc3339(&s.ends_at)?,
                comment: s.comment.clone(),
                created_by: s.created_by.clone(),
            });
        }
        // What the files hold counts as saved now (a pending instance of a new group
        // waits as long for its first save as for any other).
        let slot = |group: Option<usize>, path: PathBuf, mut state: GroupState, held: bool| {
            state.saved_at_ms = now;
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().trim_end_matches(".json").to_string())
                .unwrap_or_default();
            Slot {
                group,
                path,
                name,
                state: Mutex::new(state),
                held: AtomicBool::new(held),
                saving: tokio::sync::Mutex::new(()),
                pending: AtomicUsize::new(0),
                firing: AtomicUsize::new(0),
            }
        };
        let mut slots: Vec<Slot> = if shared {
            // Taken up at a round that finds this instance holding the group's lease.
            let dir = parts.state_dir.join("groups");
            parts
                .groups
                .iter()
                .enumerate()
                .map(|(index, g)| {
                    let path = dir.join(store::group_file(&g.name));
                    slot(Some(index), path, GroupState::default(), false)
                })
                .collect()
        } else {
            loaded
                .groups
                .into_iter()
                .enumerate()
                .map(|(index, (path, state))| slot(Some(index), path, state, true))
                .collect()
        };
        slots.extend(
            loaded
                .orphans
                .into_iter()
                .map(|orphan| slot(None, orphan.path, orphan.state, true)),
        );
        for slot in &slots {
            let p = slot.lock();
            for (receiver, queue) in &p.outbox {
                if !parts.config.receivers.iter().any(|r| &r.name == receiver) && !queue.is_empty()
                {
                    warn!(group = %p.group, %receiver, messages = queue.len(), "queued notifications for a receiver no longer configured are kept but not sent");
                }
            }
        }
        let client = reqwest::Client::builder()
            .user_agent(concat!("fleetlake/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| AlertError::Config {
                at: "alerting.receivers".into(),
                message: format!("cannot build the HTTP client: {e}"),
            })?;
        Ok(Self {
            inner: Arc::new(Inner {
                config: parts.config,
                groups: parts.groups,
                clock: parts.clock,
                sql: parts.sql,
                log: parts.log,
                registry: parts.registry,
                slots,
                configured_silences: silences
                    .list
                    .iter()
                    .filter(|s| s.id.starts_with("config-"))
                    .cloned()
                    .collect(),
                silences: Mutex::new(silences),
                silences_saving: tokio::sync::Mutex::new(()),
                silences_path: loaded.silences_path,
                shared: parts.shared,
                wake: tokio::sync::Notify::new(),
                client,
                limits: RateLimits::default(),
                external_url: parts.external_url,
                writing: tokio::sync::Mutex::new(()),
                made: Mutex::default(),
            }),
        })
    }

    /// The rule groups.
    pub fn groups(&self) -> &[RuleGroup] {
        &self.inner.groups
    }

    /// Starts the evaluation loops and the delivery workers.
    pub fn start(&self) -> tokio::task::JoinSet<()> {
        let mut tasks = tokio::task::JoinSet::new();
        for receiver in self.inner.config.receivers.clone() {
            tasks.spawn(Arc::clone(&self.inner).deliver(receiver));
        }
        for index in 0..self.inner.groups.len() {
            let this = self.clone();
            tasks.spawn(async move {
                let group = &this.inner.groups[index];
                info!(group = %group.name, rules = group.rules.len(), interval = ?group.interval, "evaluating rule group");
                let mut tick = tokio::time::interval(group.interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                loop {
                    tick.tick().await;
                    this.evaluate_group(index).await;
                }
            });
        }
        let this = self.clone();
        tasks.spawn(async move { this.inner.write_transitions().await });
        tasks
    }

    /// Runs one rule's SQL as of `at_ms` and reads its instances, without changing
    /// any state.
    pub async fn run_rule(&self, group: &RuleGroup, rule: &Rule, at_ms: i64) -> RuleResult {
        let started = Instant::now();
        let samples = match self.inner.sql.query(&rule.expr, at_ms).await {
            Ok(batches) => {
                let key = rule_key(&group.name, &rule.alert);
                let made = || self.inner.made.lock().expect("row cache lock");
                let mut cache = made().remove(&key).unwrap_or_default();
                let samples =
                    to_samples_with(rule, &batches, &self.inner.registry.snapshot(), &mut cache);
                made().insert(key, cache);
                samples
            }
            Err(e) => Err(e),
        };
        RuleResult {
            group: group.name.clone(),
            alert: rule.alert.clone(),
            samples,
            took: started.elapsed(),
        }
    }

    /// Evaluates group `index` once, now: one instant, the clock's time when the
    /// round starts, is the time of every transition of the round and (to the whole
    /// second) every rule's `now()` in SQL, so rules of one group agree on their windows however long the
    /// round takes (as Prometheus evaluates a group at one timestamp). A rule that fails keeps its alerts as they were (none resolves, none
    /// starts); a failure of the rule's own is counted against it
    /// (`fleetlake_rule_evaluation_failures_total`), an outage of the query engine is
    /// not (`fleetlake_rule_evaluation_unavailable_total`).
    pub async fn evaluate_group(&self, index: usize) -> Round {
        let group = &self.inner.groups[index];
        let slot = &self.inner.slots[index];
        let mut round = Round::default();
        if let Some(shared) = &self.inner.shared {
            if !shared.leases.holds(&group.name) {
                self.inner.let_go(slot);
                round.not_held = true;
                return round;
            }
            if !slot.held()
                && let Err(error) = self
                    .inner
                    .take_up(slot, group, shared.states.as_ref())
                    .await
            {
                metrics::counter!("fleetlake_alert_state_load_failures_total").increment(1);
                warn!(group = %group.name, %error, "cannot load the rule group's state; not evaluating it until it can");
                round.not_held = true;
                return round;
            }
            self.inner.refresh_silences().await;
        }
        let started = Instant::now();
        let now = self.inner.clock.now_ms();
        // SQL's now() is the round's start to the whole second: windows relative to
        // it fall on whole seconds, which incremental evaluation needs to read
        // exactly what a scan would. Transitions and silences keep the exact time.
        let at = now.div_euclid(1000) * 1000;
        for rule in &group.rules {
            let result = self.run_rule(group, rule, at).await;
            metrics::histogram!("fleetlake_rule_evaluation_seconds", "group" => group.name.clone())
                .record(result.took.as_secs_f64());
            match result.samples {
                Ok(samples) => {
                    round.evaluated += 1;
                    self.inner.apply(slot, group, rule, samples, now);
                }
                Err(error) if error.is_unavailable() => {
                    round.unavailable += 1;
                    metrics::counter!("fleetlake_rule_evaluation_unavailable_total", "group" => group.name.clone())
                        .increment(1);
                    warn!(group = %group.name, alert = %rule.alert, %error, "query engine unavailable; the rule's alerts stay as they were until it answers");
                }
                Err(error) => {
                    metrics::counter!("fleetlake_rule_evaluation_failures_total", "group" => group.name.clone(), "alert" => rule.alert.clone())
                        .increment(1);
                    warn!(group = %group.name, alert = %rule.alert, %error, kind = error.label(), "rule evaluation failed; its alerts stay as they were");
                    round.rule_errors.push((rule.alert.clone(), error));
                }
            }
        }
        if round.evaluated > 0 {
            self.inner.commit_round(slot, now).await;
        }
        metrics::histogram!("fleetlake_rule_group_duration_seconds", "group" => group.name.clone())
            .record(started.elapsed().as_secs_f64());
        metrics::counter!("fleetlake_rule_group_evaluations_total", "group" => group.name.clone())
            .increment(1);
        if self.inner.transitions_to_write() {
            self.inner.write_transitions().await;
        }
        round
    }

    /// Active and recently resolved instances of every group, as the HTTP API shows
    /// them: with several instances, the groups another instance evaluates as their
    /// last save has them.
    pub async fn all_alerts(&self, fingerprint: Option<&str>) -> Vec<Value> {
        let Some(shared) = &self.inner.shared else {
            return self.alerts(fingerprint);
        };
        let mut out = Vec::new();
        for slot in &self.inner.slots {
            let Some(group) = slot.group.map(|g| &self.inner.groups[g]) else {
                continue;
            };
            if slot.held() {
                let p = slot.lock();
                for (alert, rs) in &p.rules {
                    push_alerts(&mut out, &rule_key(&group.name, alert), rs, fingerprint);
                }
                continue;
            }
            let saved = match shared.states.latest(&slot.name).await {
                Ok(Some((_, bytes))) => GroupState::from_saved(group, &bytes)
                    .map_err(|e| AlertError::Unavailable(e.to_string())),
                Ok(None) => continue,
                Err(error) => Err(error),
            };
            match saved {
                Ok(state) => {
                    for (alert, rs) in &state.rules {
                        push_alerts(&mut out, &rule_key(&group.name, alert), rs, fingerprint);
                    }
                }
                Err(error) => {
                    warn!(group = %group.name, %error, "cannot read the rule group's saved state; its alerts are left out")
                }
            }
        }
        out
    }

    /// Active and recently resolved instances of the groups this instance holds.
    pub fn alerts(&self, fingerprint: Option<&str>) -> Vec<Value> {
        let mut out = Vec::new();
        for slot in &self.inner.slots {
            let Some(group) = slot.group.map(|g| &self.inner.groups[g]) else {
                continue;
            };
            let p = slot.lock();
            for (alert, rs) in &p.rules {
                let key = rule_key(&group.name, alert);
                push_alerts(&mut out, &key, rs, fingerprint);
            }
        }
        out
    }
}

/// Adds a rule's instances (those of `fingerprint`, or all) and fleet incident to
/// `out`, as the HTTP API shows them.
fn push_alerts(out: &mut Vec<Value>, key: &str, rs: &RuleState, fingerprint: Option<&str>) {
    {
        for (fp, i) in &rs.instances {
            if fingerprint.is_some_and(|f| f != fp) {
                continue;
            }
            out.push(json!({
                "rule": key,
                "fingerprint": fp,
                "state": i.state.as_str(),
                "labels": i.labels,
                "annotations": i.annotations,
                "value": i.value,
                "activeAt": rfc3339(i.active_at),
                "firedAt": i.fired_at.map(rfc3339),
                "resolvedAt": i.resolved_at.map(rfc3339),
                "receivers": i.receivers,
                "notified": i.notified,
            }));
        }
        if let Some(storm) = &rs.storm
            && fingerprint.is_none_or(|f| f == storm.key)
        {
            out.push(json!({
                "rule": key,
                "fingerprint": storm.key,
                "state": "firing",
                "fleet": true,
                "labels": storm.labels,
                "accounts": storm.accounts,
                "activeAt": rfc3339(storm.since),
                "receivers": storm.receivers,
            }));
        }
    }
}

impl Alerting {
    /// The silences `visible` keeps (a caller limited to some accounts sees only those
    /// about its accounts), as the HTTP API shows them.
    pub async fn silences(&self, visible: impl Fn(&Silence) -> bool) -> Vec<Value> {
        self.inner.refresh_silences().await;
        let now = self.inner.clock.now_ms();
        let list = Arc::clone(&self.inner.silences.lock().expect("silences lock").list);
        list.iter()
            .filter(|s| visible(s))
            .map(|s| s.to_json(now))
            .collect()
    }

    /// Adds a silence; returns its id.
    pub async fn add_silence(
        &self,
        matchers: Vec<Matcher>,
        starts_at: Option<i64>,
        ends_at: i64,
        comment: String,
        created_by: String,
    ) -> Result<String, AlertError> {
        if matchers.is_empty() {
            return Err(AlertError::Invalid(
                "a silence needs at least one matcher".into(),
            ));
        }
        let now = self.inner.clock.now_ms();
        let starts_at = starts_at.unwrap_or(now);
        if ends_at <= starts_at || ends_at <= now {
            return Err(AlertError::Invalid(
                "endsAt must be after startsAt and in the future".into(),
            ));
        }
        self.change_silences(|silences| {
            silences.next += 1;
            let id = format!("s{}-{}", now, silences.next);
            let list = Arc::make_mut(&mut silences.list);
            list.push(Silence {
                id: id.clone(),
                matchers: matchers.clone(),
                starts_at,
                ends_at,
                comment: comment.clone(),
                created_by: created_by.clone(),
            });
            // Expired silences are kept a day for the record, then dropped.
            list.retain(|s| s.ends_at > now - 86_400_000);
            Some(id)
        })
        .await
        .map(|id| id.expect("a silence was added"))
    }

    /// Ends silence `id` now; false if there is no such silence.
    pub async fn expire_silence(&self, id: &str) -> Result<bool, AlertError> {
        let now = self.inner.clock.now_ms();
        self.change_silences(|silences| {
            let list = Arc::make_mut(&mut silences.list);
            let s = list.iter_mut().find(|s| s.id == id)?;
            s.ends_at = s.ends_at.min(now);
            Some(())
        })
        .await
        .map(|done| done.is_some())
    }

    /// Changes the silences by `change` (which returns `None` when it changed
    /// nothing) and saves them; in effect only once saved.
    /// With shared states, the silences are one more shared state (`silences`): the
    /// change is made to the newest version and saved as the next one, again from the
    /// newest if another instance saved that first.
    async fn change_silences<T>(
        &self,
        mut change: impl FnMut(&mut Silences) -> Option<T>,
    ) -> Result<Option<T>, AlertError> {
        let failed = |error: &AlertError| {
            metrics::counter!("fleetlake_alert_state_save_failures_total").increment(1);
            error!(%error, "cannot save the silences; the change is not made");
        };
        let Some(shared) = &self.inner.shared else {
            let mut guard = self.inner.silences.lock().expect("silences lock");
            let mut changed = guard.clone();
            let Some(out) = change(&mut changed) else {
                return Ok(None);
            };
            store::write_json(&self.inner.silences_path, &changed).inspect_err(failed)?;
            *guard = changed;
            return Ok(Some(out));
        };
        let _one = self.inner.silences_saving.lock().await;
        for _ in 0..8 {
            self.inner.refresh_silences().await;
            let mut changed = self.inner.silences.lock().expect("silences lock").clone();
            let Some(out) = change(&mut changed) else {
                return Ok(None);
            };
            changed.version += 1;
            let mut saved = changed.clone();
            Arc::make_mut(&mut saved.list).retain(|s| !s.id.starts_with("config-"));
            let bytes =
                serde_json::to_vec(&saved).map_err(|e| AlertError::Unavailable(e.to_string()))?;
            if shared
                .states
                .create(store::SILENCES, changed.version, bytes)
                .await
                .inspect_err(failed)?
            {
                *self.inner.silences.lock().expect("silences lock") = changed;
                return Ok(Some(out));
            }
        }
        Err(AlertError::Unavailable(
            "the silences kept changing on other instances; try again".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::path::Path;

    use arrow::array::{Float64Array, StringArray};
    use arrow::datatypes::{Field, Schema};
    use fleetlake_model::clock::{Clock, ManualClock};

    /// 2026-11-28T15:00:00Z.
    const T0: i64 = 1_795_878_000_000;
    const MINUTE: Duration = Duration::from_secs(60);

    /// What the fake query engine answers.
    enum Answer {
        /// One row per account: `account_id`, `value`.
        Rows(Vec<(&'static str, f64)>),
        /// Rows without a `value` column: the rule is wrong.
        NoValue,
        /// The engine is down.
        Down,
    }

    struct FakeSql {
        answer: Mutex<Answer>,
        /// The instant each query was asked to run at, in order.
        asked: Mutex<Vec<i64>>,
        /// A clock each query moves on by a while: a slow engine.
        slow: Mutex<Option<(Arc<ManualClock>, Duration)>>,
    }

    impl FakeSql {
        fn new() -> Self {
            Self {
                answer: Mutex::new(Answer::Rows(Vec::new())),
                asked: Mutex::default(),
                slow: Mutex::default(),
            }
        }

        fn answer(&self, answer: Answer) {
            *self.answer.lock().unwrap() = answer;
        }
    }

    #[async_trait]
    impl SqlSource for FakeSql {
        async fn query(&self, _sql: &str, at_ms: i64) -> Result<Vec<RecordBatch>, AlertError> {
            self.asked.lock().unwrap().push(at_ms);
            if let Some((clock, took)) = &*self.slow.lock().unwrap() {
                clock.advance(*took);
            }
            let (accounts, values): (Vec<&str>, Option<Vec<f64>>) =
                match &*self.answer.lock().unwrap() {
                    Answer::Rows(rows) => {
                        let (accounts, values) = rows.iter().copied().unzip();
                        (accounts, Some(values))
                    }
                    Answer::NoValue => (vec!["111111111111"], None),
                    Answer::Down => {
                        return Err(AlertError::Unavailable(
                            "lake unavailable: connection refused".into(),
                        ));
                    }
                };
            let mut fields = vec![Field::new("account_id", DataType::Utf8, false)];
            let mut columns: Vec<ArrayRef> = vec![Arc::new(StringArray::from(accounts))];
            if let Some(values) = values {
                fields.push(Field::new(VALUE_COLUMN, DataType::Float64, false));
                columns.push(Arc::new(Float64Array::from(values)));
            }
            Ok(vec![
                RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap(),
            ])
        }

        async fn plan(&self, _sql: &str) -> Result<SchemaRef, AlertError> {
            unreachable!("evaluation does not plan")
        }
    }

    /// The `alerts` table: the states of the transitions committed, the sequence
    /// numbers each commit held, and each application id's last sequence number
    /// (what is at or below it is left out, as the lake does).
    #[derive(Default)]
    struct FakeLog(
        Mutex<Vec<(String, String)>>,
        Mutex<Vec<Vec<u64>>>,
        Mutex<BTreeMap<String, u64>>,
    );

    #[async_trait]
    impl TransitionLog for FakeLog {
        async fn append(&self, queued: Vec<Queued>) -> Result<(), AlertError> {
            let mut done = self.2.lock().unwrap();
            let queued: Vec<Queued> = queued
                .into_iter()
                .filter(|q| done.get(&q.app_id).is_none_or(|d| q.seq > *d))
                .collect();
            for q in &queued {
                done.insert(q.app_id.clone(), q.seq);
            }
            self.1
                .lock()
                .unwrap()
                .push(queued.iter().map(|q| q.seq).collect());
            for Queued { rows, .. } in queued {
                let column = |name: &str| {
                    rows.column_by_name(name)
                        .unwrap()
                        .as_string::<i32>()
                        .iter()
                        .map(|v| v.unwrap_or_default().to_string())
                        .collect::<Vec<_>>()
                };
                let from = column("previous_state");
                let to = column("state");
                self.0.lock().unwrap().extend(from.into_iter().zip(to));
            }
            Ok(())
        }
    }

    struct Harness {
        alerting: Alerting,
        clock: Arc<ManualClock>,
        sql: Arc<FakeSql>,
        log: Arc<FakeLog>,
        yaml: String,
        dir: tempfile::TempDir,
    }

    fn receiver(name: &str, kind: ReceiverKind) -> ReceiverConfig {
        ReceiverConfig {
            name: name.into(),
            kind,
            url: Some("http://127.0.0.1:9".into()),
            routing_key: (kind == ReceiverKind::Pagerduty).then(|| "r".repeat(32)),
            rate_limit_per_minute: 120,
            timeout: Duration::from_secs(1),
        }
    }

    /// One group (interval 1m) of one rule with `for: {for_}`; PagerDuty and an
    /// Alertmanager get every alert.
    fn harness(for_: &str) -> Harness {
        harness_of(&format!(
            "groups:\n  - name: g\n    interval: 1m\n    rules:\n      - alert: Errors\n        expr: SELECT account_id, 1.0 AS value FROM metrics\n        for: {for_}\n"
        ))
    }

    /// The rule file `yaml`; PagerDuty and an Alertmanager get every alert.
    fn harness_of(yaml: &str) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::at(T0);
        let sql = Arc::new(FakeSql::new());
        let log = Arc::new(FakeLog::default());
        let alerting = open_alerting(yaml, dir.path(), &clock, &sql, &log, None);
        Harness {
            alerting,
            clock,
            sql,
            log,
            yaml: yaml.to_string(),
            dir,
        }
    }

    fn open_alerting(
        yaml: &str,
        dir: &Path,
        clock: &Arc<ManualClock>,
        sql: &Arc<FakeSql>,
        log: &Arc<FakeLog>,
        shared: Option<Shared>,
    ) -> Alerting {
        let groups = crate::rules::parse(Path::new("t.rules.yml"), yaml).unwrap();
        let route = |receiver: &str, continue_: bool| crate::config::RouteConfig {
            matchers: Vec::new(),
            receiver: receiver.into(),
            continue_,
        };
        let config = AlertingConfig {
            receivers: vec![
                receiver("pd", ReceiverKind::Pagerduty),
                receiver("am", ReceiverKind::Alertmanager),
            ],
            routes: vec![route("pd", true), route("am", false)],
            ..AlertingConfig::default()
        };
        Alerting::open(AlertingParts {
            config,
            groups,
            sql: sql.clone(),
            log: log.clone(),
            registry: Registry::empty(),
            state_dir: dir.to_path_buf(),
            external_url: "http://fleetlake".into(),
            clock: clock.clone(),
            shared,
        })
        .unwrap()
    }

    impl Harness {
        async fn round(&self) -> Round {
            self.alerting.evaluate_group(0).await
        }

        /// A restart: the state as its files hold it.
        fn reopen(&mut self) {
            self.alerting = open_alerting(
                &self.yaml,
                self.dir.path(),
                &self.clock,
                &self.sql,
                &self.log,
                None,
            );
        }

        /// What the deliverer of `receiver` would send next (kind and body).
        fn sendable(&self, receiver: &str) -> Option<Message> {
            self.alerting.inner.next_message(receiver).map(|(_, m)| m)
        }

        /// The bytes of each group's state file, by file name.
        fn files(&self) -> BTreeMap<String, Vec<u8>> {
            std::fs::read_dir(self.dir.path().join("groups"))
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|x| x == "json"))
                .map(|p| {
                    let name = p.file_name().unwrap().to_string_lossy().to_string();
                    (name, std::fs::read(&p).unwrap())
                })
                .collect()
        }

        /// `(state, activeAt, firedAt)` of every instance.
        fn states(&self) -> Vec<(String, Value, Value)> {
            self.alerting
                .alerts(None)
                .into_iter()
                .map(|a| {
                    (
                        a["state"].as_str().unwrap().to_string(),
                        a["activeAt"].clone(),
                        a["firedAt"].clone(),
                    )
                })
                .collect()
        }

        /// The PagerDuty events queued: `event_action` of each.
        fn pages(&self) -> Vec<String> {
            self.outbox("pd")
                .iter()
                .map(|m| m.body["event_action"].as_str().unwrap().to_string())
                .collect()
        }

        /// The Alertmanager messages queued (coalesced: at most one per rule).
        fn alertmanager(&self) -> Vec<Message> {
            self.outbox("am")
        }

        /// The messages queued for `receiver`, in every group.
        fn outbox(&self, receiver: &str) -> Vec<Message> {
            let mut out = Vec::new();
            for slot in &self.alerting.inner.slots {
                out.extend(
                    slot.lock()
                        .outbox
                        .get(receiver)
                        .into_iter()
                        .flatten()
                        .cloned(),
                );
            }
            out
        }

        fn transitions(&self) -> Vec<(String, String)> {
            self.log.0.lock().unwrap().clone()
        }
    }

    fn pair(from: &str, to: &str) -> (String, String) {
        (from.to_string(), to.to_string())
    }

    #[tokio::test]
    async fn inactive_then_pending_then_firing_after_for_then_resolved() {
        let h = harness("2m");
        h.sql.answer(Answer::Rows(vec![("111111111111", 5.0)]));
        h.round().await;
        let active_at = json!(rfc3339(T0));
        assert_eq!(
            h.states(),
            [("pending".into(), active_at.clone(), Value::Null)]
        );
        assert!(h.pages().is_empty());

        h.clock.advance(MINUTE);
        h.round().await;
        assert_eq!(h.states()[0].0, "pending", "1m is not yet `for: 2m`");
        assert!(h.pages().is_empty());

        h.clock.advance(MINUTE);
        h.round().await;
        let fired_at = json!(rfc3339(T0 + 120_000));
        assert_eq!(h.states(), [("firing".into(), active_at.clone(), fired_at)]);
        assert_eq!(h.pages(), ["trigger"]);

        h.sql.answer(Answer::Rows(Vec::new()));
        h.clock.advance(MINUTE);
        h.round().await;
        assert_eq!(h.states()[0].0, "resolved");
        assert_eq!(h.pages(), ["trigger", "resolve"]);
        assert_eq!(
            h.transitions(),
            [
                pair("inactive", "pending"),
                pair("pending", "firing"),
                pair("firing", "resolved")
            ]
        );
    }

    #[tokio::test]
    async fn a_rounds_transitions_of_every_rule_are_one_commit() {
        let rule = |name: &str| {
            format!(
                "      - alert: {name}\n        expr: SELECT account_id, 1.0 AS value FROM metrics\n        for: 0s\n"
            )
        };
        let h = harness_of(&format!(
            "groups:\n  - name: g\n    interval: 1m\n    rules:\n{}{}{}",
            rule("A"),
            rule("B"),
            rule("C")
        ));
        h.sql.answer(Answer::Rows(vec![("111111111111", 1.0)]));
        h.round().await;
        h.clock.advance(Duration::from_secs(60));
        h.sql.answer(Answer::Rows(Vec::new()));
        h.round().await;
        // Each rule's transitions have their own sequence number; a round commits
        // them together (a thousand rules are not a thousand commits).
        assert_eq!(*h.log.1.lock().unwrap(), vec![vec![1, 2, 3], vec![4, 5, 6]]);
        assert_eq!(h.transitions().len(), 6);
    }

    #[tokio::test]
    async fn every_rule_of_a_round_is_evaluated_at_the_rounds_instant() {
        let h = harness_of(
            "groups:\n  - name: g\n    interval: 1m\n    rules:\n      - alert: A\n        expr: SELECT account_id, 1.0 AS value FROM metrics\n      - alert: B\n        expr: SELECT account_id, 2.0 AS value FROM metrics\n",
        );
        // Each query takes 40 s of the clock: without one instant per round, rule B
        // would look at a window 40 s later than rule A's.
        *h.sql.slow.lock().unwrap() = Some((h.clock.clone(), Duration::from_secs(40)));
        h.sql.answer(Answer::Rows(vec![("111111111111", 5.0)]));
        h.round().await;
        assert_eq!(*h.sql.asked.lock().unwrap(), [T0, T0]);
        let active_at = json!(rfc3339(T0));
        let states = h.states();
        assert_eq!(states.len(), 2);
        assert!(
            states
                .iter()
                .all(|(state, at, _)| state == "firing" && *at == active_at),
            "{states:?}"
        );
        // The next round starts when the clock says, after the slow one.
        let next = h.clock.now_ms();
        assert_eq!(next, T0 + 80_000);
        h.round().await;
        assert_eq!(*h.sql.asked.lock().unwrap(), [T0, T0, next, next]);
    }

    #[tokio::test]
    async fn pending_that_clears_before_for_never_notifies() {
        let h = harness("5m");
        h.sql.answer(Answer::Rows(vec![("111111111111", 5.0)]));
        for _ in 0..4 {
            h.round().await;
            h.clock.advance(MINUTE);
        }
        assert_eq!(h.states()[0].0, "pending");
        h.sql.answer(Answer::Rows(Vec::new()));
        h.round().await;
        assert!(h.states().is_empty());
        h.clock.advance(10 * MINUTE);
        h.round().await;
        assert!(h.pages().is_empty());
        assert!(h.alertmanager().is_empty());
        assert_eq!(
            h.transitions(),
            [pair("inactive", "pending"), pair("pending", "inactive")]
        );
    }

    #[tokio::test]
    async fn a_firing_alert_pages_once_and_is_sent_to_alertmanager_every_round() {
        let h = harness("0s");
        h.sql.answer(Answer::Rows(vec![("111111111111", 5.0)]));
        let mut last_id = 0;
        for round in 0..5 {
            h.round().await;
            assert_eq!(
                h.pages(),
                ["trigger"],
                "round {round}: PagerDuty is paged once"
            );
            // Alertmanager gets the rule's state each round, valid for 4 intervals from
            // now: the newest message replaces the one still waiting.
            let am = h.alertmanager();
            assert_eq!(am.len(), 1, "round {round}");
            assert!(am[0].id > last_id);
            last_id = am[0].id;
            let now = T0 + round * 60_000;
            assert_eq!(am[0].created_ms, now);
            assert_eq!(am[0].body[0]["endsAt"], json!(rfc3339(now + 4 * 60_000)));
            h.clock.advance(MINUTE);
        }
        // Resolved: sent as such for `resend_resolved_for` (15m), then forgotten.
        h.sql.answer(Answer::Rows(Vec::new()));
        let resolved_at = h.clock.now_ms();
        h.round().await;
        assert_eq!(h.pages(), ["trigger", "resolve"]);
        h.clock.advance(10 * MINUTE);
        h.round().await;
        let am = h.alertmanager();
        assert_eq!(am[0].body[0]["endsAt"], json!(rfc3339(resolved_at)));
        let id = am[0].id;
        h.clock.advance(10 * MINUTE);
        h.round().await;
        assert!(h.states().is_empty());
        assert_eq!(h.alertmanager()[0].id, id, "nothing new once forgotten");
    }

    #[tokio::test]
    async fn an_engine_outage_keeps_states_and_is_not_a_rule_error() {
        let h = harness("2m");
        h.sql.answer(Answer::Rows(vec![
            ("111111111111", 5.0),
            ("222222222222", 7.0),
        ]));
        h.round().await;
        h.clock.advance(2 * MINUTE);
        h.sql.answer(Answer::Rows(vec![("111111111111", 5.0)]));
        h.round().await;
        // 111 fires; 222 is gone (it never fired).
        assert_eq!(h.states().len(), 1);
        assert_eq!(h.pages(), ["trigger"]);
        let before = h.states();
        let transitions = h.transitions();

        h.sql.answer(Answer::Down);
        for _ in 0..3 {
            h.clock.advance(MINUTE);
            let round = h.round().await;
            assert_eq!(round.unavailable, 1);
            assert_eq!(round.evaluated, 0);
            assert!(round.rule_errors.is_empty(), "{:?}", round.rule_errors);
        }
        assert_eq!(h.states(), before, "an outage resolves nothing");
        assert_eq!(h.pages(), ["trigger"]);
        assert_eq!(h.transitions(), transitions);

        // Back: still the same alert, not paged again.
        h.sql.answer(Answer::Rows(vec![("111111111111", 5.0)]));
        h.clock.advance(MINUTE);
        let round = h.round().await;
        assert_eq!((round.evaluated, round.unavailable), (1, 0));
        assert_eq!(h.states(), before);
        assert_eq!(h.pages(), ["trigger"]);
    }

    #[tokio::test]
    async fn an_outage_does_not_restart_a_pending_alert() {
        let h = harness("2m");
        h.sql.answer(Answer::Rows(vec![("111111111111", 5.0)]));
        h.round().await;
        h.sql.answer(Answer::Down);
        h.clock.advance(MINUTE);
        h.round().await;
        h.sql.answer(Answer::Rows(vec![("111111111111", 5.0)]));
        h.clock.advance(MINUTE);
        h.round().await;
        assert_eq!(
            h.states()[0].0,
            "firing",
            "active since T0, `for` has passed"
        );
        assert_eq!(h.states()[0].1, json!(rfc3339(T0)));
    }

    #[tokio::test]
    async fn a_bad_rule_is_reported_as_the_rules_failure() {
        let h = harness("0s");
        h.sql.answer(Answer::Rows(vec![("111111111111", 5.0)]));
        h.round().await;
        h.sql.answer(Answer::NoValue);
        h.clock.advance(MINUTE);
        let round = h.round().await;
        assert_eq!((round.evaluated, round.unavailable), (0, 0));
        let [(alert, error)] = &round.rule_errors[..] else {
            panic!("{:?}", round.rule_errors);
        };
        assert_eq!(alert, "Errors");
        assert!(
            matches!(error, AlertError::Rule(m) if m.contains("no `value` column")),
            "{error:?}"
        );
        // Its alerts stay as they were.
        assert_eq!(h.states()[0].0, "firing");
        assert_eq!(h.pages(), ["trigger"]);
    }

    #[tokio::test]
    async fn a_silence_mutes_until_it_ends_by_the_clock() {
        let h = harness("0s");
        let ends = T0 + 10 * 60_000;
        let id = h
            .alerting
            .add_silence(
                vec![Matcher::parse("account_id=\"111111111111\"").unwrap()],
                None,
                ends,
                "maintenance".into(),
                "test".into(),
            )
            .await
            .unwrap();
        assert_eq!(
            h.alerting.silences(|_| true).await[0]["status"]["state"],
            "active"
        );
        h.sql.answer(Answer::Rows(vec![("111111111111", 5.0)]));
        h.round().await;
        assert_eq!(h.states()[0].0, "firing");
        assert!(h.pages().is_empty(), "silenced");
        h.clock.advance(9 * MINUTE);
        h.round().await;
        assert!(h.pages().is_empty(), "still silenced");
        h.clock.advance(MINUTE);
        h.round().await;
        assert_eq!(h.pages(), ["trigger"], "the silence ended at {ends}");
        assert_eq!(
            h.alerting.silences(|_| true).await[0]["status"]["state"],
            "expired"
        );
        // A silence in the past is refused.
        let late = h
            .alerting
            .add_silence(
                vec![Matcher::parse("account_id=\"1\"").unwrap()],
                None,
                ends,
                String::new(),
                String::new(),
            )
            .await;
        assert!(matches!(late, Err(AlertError::Invalid(_))), "{late:?}");
        assert!(h.alerting.expire_silence(&id).await.unwrap());
    }

    #[tokio::test]
    async fn a_silence_that_begins_while_a_round_runs_mutes_its_results() {
        // The round's instant is T0; its query takes 5 s (a slow lake), and the
        // silence begins 1 s in: made before the round's results are applied, as a
        // user who silences and then sends data would have it.
        let h = harness("0s");
        *h.sql.slow.lock().unwrap() = Some((h.clock.clone(), Duration::from_secs(5)));
        h.alerting
            .add_silence(
                vec![Matcher::parse("account_id=\"111111111111\"").unwrap()],
                Some(T0 + 1000),
                T0 + 3_600_000,
                "maintenance".into(),
                "test".into(),
            )
            .await
            .unwrap();
        h.sql.answer(Answer::Rows(vec![("111111111111", 5.0)]));
        h.round().await;
        assert_eq!(h.sql.asked.lock().unwrap().as_slice(), [T0]);
        assert_eq!(h.states()[0].0, "firing");
        assert!(
            h.pages().is_empty(),
            "silenced when its results were applied"
        );
    }

    fn silence(matchers: &[&str]) -> Silence {
        Silence {
            id: "s".into(),
            matchers: matchers
                .iter()
                .map(|m| Matcher::parse(m).unwrap())
                .collect(),
            starts_at: 0,
            ends_at: 1,
            comment: String::new(),
            created_by: String::new(),
        }
    }

    #[test]
    fn a_silence_names_its_accounts_only_when_its_matchers_pin_them() {
        let accounts = |matchers: &[&str]| {
            silence(matchers)
                .accounts()
                .map(|set| set.into_iter().collect::<Vec<_>>())
        };
        assert_eq!(
            accounts(&["account_id=\"111\"", "alertname=\"X\""]).unwrap(),
            ["111"]
        );
        assert_eq!(
            accounts(&["account_id=~\"222|111\""]).unwrap(),
            ["111", "222"]
        );
        assert_eq!(
            accounts(&["account_id=\"111\"", "account_id=~\"111|333\""]).unwrap(),
            ["111", "333"],
            "every account named counts, not only those matched"
        );
        for fleet_wide in [
            &["alertname=\"X\""][..],
            &["account_id!=\"111\""],
            &["account_id=\"111\"", "account_id!=\"222\""],
            &["account_id=~\"1.*\""],
            &["account_id=\"\""],
        ] {
            assert_eq!(accounts(fleet_wide), None, "{fleet_wide:?}");
        }
    }

    /// One result row of account, region and value.
    fn result_row(account: &str, region: Option<&str>, value: f64) -> Vec<RecordBatch> {
        let schema = Arc::new(Schema::new(vec![
            Field::new("account_id", DataType::Utf8, false),
            Field::new("region", DataType::Utf8, true),
            Field::new(VALUE_COLUMN, DataType::Float64, false),
        ]));
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(vec![account])),
            Arc::new(StringArray::from(vec![region])),
            Arc::new(Float64Array::from(vec![value])),
        ];
        vec![RecordBatch::try_new(schema, columns).unwrap()]
    }

    #[test]
    fn rows_made_again_follow_their_value_the_registry_and_label_templates() {
        let groups = crate::rules::parse(
            Path::new("t.rules.yml"),
            r#"groups:
  - name: g
    rules:
      - alert: Plain
        expr: SELECT 1
        labels:
          severity: page
        annotations:
          summary: "{{ $labels.account_name }} at {{ $value }} ({{ $account.tier }})"
      - alert: Banded
        expr: SELECT 1
        labels:
          band: "{{ if gt $value 5.0 }}high{{ else }}low{{ end }}"
"#,
        )
        .unwrap();
        let (plain, banded) = (&groups[0].rules[0], &groups[0].rules[1]);
        let registry = |name: &str, tier: &str| {
            Arc::new(
                Snapshot::parse(&format!(
                    r#"{{"account_id":"111111111111","account_name":"{name}","tier":"{tier}"}}"#
                ))
                .unwrap(),
            )
        };
        let (one, uno) = (registry("one", "gold"), registry("uno", "silver"));
        let (mut plain_made, mut banded_made) = (RowCache::default(), RowCache::default());
        // Each evaluation with its rule's cache makes what one without it makes.
        let mut made = |rule: &Rule, rows: &[RecordBatch], registry: &Arc<Snapshot>| {
            let cache = if rule.alert == "Plain" {
                &mut plain_made
            } else {
                &mut banded_made
            };
            let samples = to_samples_with(rule, rows, registry, cache).unwrap();
            assert_eq!(samples, to_samples(rule, rows, registry).unwrap());
            samples.into_iter().next().unwrap()
        };
        let summary = |s: &Sample| s.annotations["summary"].clone();

        let first = made(plain, &result_row("111111111111", None, 1.0), &one);
        assert_eq!(summary(&first), "one at 1 (gold)");
        let again = made(plain, &result_row("111111111111", None, 1.0), &one);
        assert!(
            Arc::ptr_eq(&first.labels, &again.labels)
                && Arc::ptr_eq(&first.annotations, &again.annotations),
            "an unchanged row is not made again"
        );
        let moved = made(plain, &result_row("111111111111", None, 2.0), &one);
        assert_eq!(summary(&moved), "one at 2 (gold)");
        assert!(Arc::ptr_eq(&first.labels, &moved.labels));
        let renamed = made(plain, &result_row("111111111111", None, 2.0), &uno);
        assert_eq!(summary(&renamed), "uno at 2 (silver)");
        assert_eq!(renamed.labels["account_name"], "uno");
        assert_ne!(renamed.fingerprint, moved.fingerprint);
        // An empty column is no label, a value is.
        let placed = made(
            plain,
            &result_row("111111111111", Some("eu-west-1"), 2.0),
            &uno,
        );
        assert_eq!(placed.labels["region"], "eu-west-1");
        let empty = made(plain, &result_row("111111111111", Some(""), 2.0), &uno);
        assert_eq!(empty.fingerprint, renamed.fingerprint);

        // A label template may read the value: labels are made again each time.
        let low = made(banded, &result_row("111111111111", None, 1.0), &one);
        let high = made(banded, &result_row("111111111111", None, 9.0), &one);
        assert_eq!(
            (&*low.labels["band"], &*high.labels["band"]),
            ("low", "high")
        );
    }

    fn two_groups() -> Harness {
        harness_of(
            "groups:\n  - name: fast\n    interval: 1m\n    rules:\n      - alert: A\n        expr: SELECT account_id, 1.0 AS value FROM metrics\n        for: 0s\n  - name: slow\n    interval: 1m\n    rules:\n      - alert: B\n        expr: SELECT account_id, 1.0 AS value FROM metrics\n        for: 5m\n",
        )
    }

    #[tokio::test]
    async fn a_round_saves_its_own_groups_file_and_only_when_it_must() {
        let h = two_groups();
        let (fast, slow) = (store::group_file("fast"), store::group_file("slow"));
        h.sql.answer(Answer::Rows(vec![("111111111111", 1.0)]));
        // A fires: its group is saved (before anything is sent), the other is not.
        h.alerting.evaluate_group(0).await;
        let files = h.files();
        assert!(
            files.contains_key(&fast) && !files.contains_key(&slow),
            "{:?}",
            files.keys()
        );
        assert_eq!(h.transitions(), [pair("inactive", "firing")]);
        // B becomes pending: no save of its own, and its transition is not written
        // before one holds it.
        h.alerting.evaluate_group(1).await;
        assert!(!h.files().contains_key(&slow));
        assert_eq!(h.transitions().len(), 1);
        // A round of A with nothing but a new value neither saves nor holds back the
        // Alertmanager refresh it queues.
        h.clock.advance(Duration::from_secs(10));
        h.sql.answer(Answer::Rows(vec![("111111111111", 2.0)]));
        h.alerting.evaluate_group(0).await;
        assert_eq!(h.files()[&fast], files[&fast]);
        let refresh = h.sendable("am").expect("the refresh may go");
        assert_eq!(refresh.kind, "alerts");
        assert_eq!(refresh.body[0]["annotations"], json!({}));
        // 15 s after the pending transition B's group is saved and it is written.
        h.clock.advance(Duration::from_secs(5));
        h.alerting.evaluate_group(1).await;
        assert!(h.files().contains_key(&slow));
        assert_eq!(h.files()[&fast], files[&fast]);
        assert_eq!(
            h.transitions(),
            [pair("inactive", "firing"), pair("inactive", "pending")]
        );
        // A minute after its last save a group is saved whatever happened.
        h.clock.advance(Duration::from_secs(50));
        h.alerting.evaluate_group(0).await;
        assert_ne!(h.files()[&fast], files[&fast]);
    }

    #[tokio::test]
    async fn nothing_is_sent_or_written_before_the_change_behind_it_is_saved() {
        let h = harness("0s");
        // The group's file cannot be written: a directory stands where it goes.
        let path = h.dir.path().join("groups").join(store::group_file("g"));
        std::fs::create_dir_all(path.join("in-the-way")).unwrap();
        h.sql.answer(Answer::Rows(vec![("111111111111", 1.0)]));
        h.round().await;
        assert_eq!(h.pages(), ["trigger"]);
        assert!(h.sendable("pd").is_none() && h.sendable("am").is_none());
        assert!(h.transitions().is_empty());
        // The next round saves it; then the page goes and the transition is written.
        std::fs::remove_dir_all(&path).unwrap();
        h.clock.advance(MINUTE);
        h.round().await;
        let page = h.sendable("pd").expect("saved: the page may go");
        assert_eq!(page.body["event_action"], "trigger");
        assert_eq!(h.transitions(), [pair("inactive", "firing")]);
    }

    #[tokio::test]
    async fn a_restart_keeps_instances_outbox_and_sequence_and_a_lost_file_a_new_app_id() {
        let mut h = harness("0s");
        h.sql.answer(Answer::Rows(vec![("111111111111", 1.0)]));
        h.round().await;
        let first = h.log.2.lock().unwrap().clone();
        assert_eq!(first.len(), 1);
        let app_id = first.keys().next().unwrap().clone();
        assert!(app_id.starts_with("fleetlake.alerts/g/"), "{app_id}");
        h.reopen();
        assert_eq!(h.states()[0].0, "firing");
        assert_eq!(h.pages(), ["trigger"], "kept, not queued again");
        h.clock.advance(MINUTE);
        h.sql.answer(Answer::Rows(Vec::new()));
        h.round().await;
        assert_eq!(h.pages(), ["trigger", "resolve"]);
        assert_eq!(
            *h.log.2.lock().unwrap(),
            BTreeMap::from([(app_id.clone(), 2)])
        );
        // A state file lost (or restored from an old backup) starts a new
        // application id: its first transitions are not taken for written ones.
        std::fs::remove_dir_all(h.dir.path().join("groups")).unwrap();
        h.reopen();
        h.clock.advance(MINUTE);
        h.sql.answer(Answer::Rows(vec![("111111111111", 1.0)]));
        h.round().await;
        let done = h.log.2.lock().unwrap().clone();
        assert_eq!(done.len(), 2);
        assert!(
            done.iter().any(|(id, seq)| id != &app_id && *seq == 1),
            "{done:?}"
        );
        assert_eq!(h.transitions().len(), 3);
    }

    #[tokio::test]
    async fn a_state_file_of_before_group_files_is_split_and_its_queues_drained() {
        let dir = tempfile::tempdir().unwrap();
        let yaml = "groups:\n  - name: g\n    interval: 1m\n    rules:\n      - alert: Errors\n        expr: SELECT account_id, 1.0 AS value FROM metrics\n        for: 0s\n";
        let labels = Labels::from([
            ("alertname".to_string(), "Errors".to_string()),
            ("account_id".to_string(), "111111111111".to_string()),
        ]);
        let fp = state::fingerprint(&labels);
        let instance = json!({
            "labels": labels, "annotations": {}, "value": 1.0, "state": "firing",
            "active_at": T0, "fired_at": T0, "resolved_at": null, "last_seen": T0,
            "keep_firing_since": null, "receivers": ["pd"], "notified": true,
        });
        let row = table::TransitionRow {
            time: T0,
            rule_group: "g".into(),
            alertname: "Errors".into(),
            state: "firing".into(),
            previous_state: "inactive".into(),
            fingerprint: fp.clone(),
            account_id: Some("111111111111".into()),
            value: 1.0,
            labels: Arc::new(labels.clone()),
            annotations: Arc::default(),
            active_at: T0,
            notification: "pd".into(),
        };
        let message = json!({
            "id": 7, "receiver": "pd", "kind": "trigger", "body": {"event_action": "trigger"},
            "coalesce": null, "created_ms": T0, "attempts": 0, "next_attempt_ms": T0,
        });
        let legacy = json!({
            "seq": 41,
            "next_message": 7,
            "rules": {"g/Errors": {"instances": {fp.clone(): instance}, "storm": null},
                      "gone/Old": {"instances": {}, "storm": null}},
            "outbox": {"pd": [message]},
            "unwritten": [[41, [row]]],
            "silences": [{"id": "s1", "matchers": ["account_id=\"1\""],
                          "starts_at": T0, "ends_at": T0 + 3_600_000,
                          "comment": "", "created_by": "me"}],
        });
        std::fs::write(dir.path().join("alert-state.json"), legacy.to_string()).unwrap();
        let clock = ManualClock::at(T0 + 60_000);
        let sql = Arc::new(FakeSql::new());
        let log = Arc::new(FakeLog::default());
        let h = Harness {
            alerting: open_alerting(yaml, dir.path(), &clock, &sql, &log, None),
            clock,
            sql,
            log,
            yaml: yaml.into(),
            dir,
        };
        assert!(!h.dir.path().join("alert-state.json").exists());
        assert_eq!(h.states()[0].0, "firing");
        assert_eq!(h.alerting.silences(|_| true).await.len(), 1);
        // The old page is still to be sent (it was saved); a round does not page again.
        assert_eq!(h.sendable("pd").unwrap().id, 7);
        h.sql.answer(Answer::Rows(vec![("111111111111", 1.0)]));
        h.round().await;
        assert_eq!(h.pages(), ["trigger"]);
        // The old transitions go under the old application id and sequence; the
        // rest of the old file stays until its page is out.
        assert_eq!(h.log.2.lock().unwrap().get(store::LEGACY_APP_ID), Some(&41));
        assert_eq!(h.transitions(), [pair("inactive", "firing")]);
        assert!(h.files().contains_key("legacy.json"));

        // A group no longer configured with only transitions left: written, then its
        // file is deleted.
        let gone = json!({
            "group": "gone", "app_id": "fleetlake.alerts/gone/1", "seq": 3, "next_message": 0,
            "rules": {}, "outbox": {}, "unwritten": [[3, legacy["unwritten"][0][1].clone()]],
        });
        let path = h.dir.path().join("groups").join(store::group_file("gone"));
        std::fs::write(&path, gone.to_string()).unwrap();
        let mut h = h;
        h.reopen();
        h.clock.advance(MINUTE);
        h.round().await;
        assert_eq!(
            h.log.2.lock().unwrap().get("fleetlake.alerts/gone/1"),
            Some(&3)
        );
        assert!(!path.exists());
    }

    /// Group leases switched by hand: which instance holds every group.
    struct Holder(Mutex<&'static str>, &'static str);

    impl GroupLeases for Holder {
        fn holds(&self, _group: &str) -> bool {
            let held = *self.0.lock().unwrap();
            held == self.1 || held == "both"
        }
    }

    #[tokio::test]
    async fn a_group_moves_between_instances_with_its_state_and_a_stale_holder_is_fenced() {
        let yaml = "groups:\n  - name: g\n    interval: 1m\n    rules:\n      - alert: Errors\n        expr: SELECT account_id, 1.0 AS value FROM metrics\n        for: 0s\n";
        let shared_dir = tempfile::tempdir().unwrap();
        let states: Arc<dyn SharedStates> =
            Arc::new(store::DirStates::new(shared_dir.path().to_path_buf()));
        let clock = ManualClock::at(T0);
        let sql = Arc::new(FakeSql::new());
        let log = Arc::new(FakeLog::default());
        let instance = |name: &'static str| {
            let leases = Arc::new(Holder(Mutex::new(""), name));
            let dir = tempfile::tempdir().unwrap();
            let alerting = open_alerting(
                yaml,
                dir.path(),
                &clock,
                &sql,
                &log,
                Some(Shared {
                    states: Arc::clone(&states),
                    leases: leases.clone(),
                }),
            );
            (alerting, leases, dir)
        };
        let (a, a_leases, _a_dir) = instance("a");
        let (b, b_leases, _b_dir) = instance("b");
        let hold = |who: &'static str| {
            *a_leases.0.lock().unwrap() = who;
            *b_leases.0.lock().unwrap() = who;
        };
        let outbox = |alerting: &Alerting| -> Vec<String> {
            alerting.inner.slots[0]
                .lock()
                .outbox
                .get("pd")
                .into_iter()
                .flatten()
                .map(|m| m.body["event_action"].as_str().unwrap().to_string())
                .collect()
        };
        // Silences made on one instance are the other's too, whichever changes them.
        let id = a
            .add_silence(
                vec![Matcher::parse("account_id=\"222222222222\"").unwrap()],
                None,
                T0 + 3_600_000,
                "maintenance".into(),
                "test".into(),
            )
            .await
            .unwrap();
        assert_eq!(b.silences(|_| true).await[0]["id"], id);
        assert!(b.expire_silence(&id).await.unwrap());
        assert_eq!(a.silences(|_| true).await[0]["status"]["state"], "expired");

        hold("a");
        sql.answer(Answer::Rows(vec![("111111111111", 1.0)]));
        assert!(b.evaluate_group(0).await.not_held);
        assert_eq!(a.evaluate_group(0).await.evaluated, 1);
        assert_eq!(outbox(&a), ["trigger"]);
        assert!(
            a.inner.next_message("pd").is_some(),
            "saved: the page may go"
        );
        // b shows the alerts a evaluates, as a saved them.
        assert!(b.alerts(None).is_empty());
        assert_eq!(b.all_alerts(None).await, a.alerts(None));

        // The lease moves to b: b goes on from a's saved state (the page still
        // queued, the instance firing), a lets the group go.
        hold("b");
        clock.advance(MINUTE);
        assert!(a.evaluate_group(0).await.not_held);
        assert!(a.inner.next_message("pd").is_none() && a.alerts(None).is_empty());
        assert_eq!(b.evaluate_group(0).await.evaluated, 1);
        assert_eq!(outbox(&b), ["trigger"], "not paged again");
        assert_eq!(b.alerts(None)[0]["state"], "firing");

        // Both think they hold it (b's lease ran out without b knowing): a takes the
        // group up from b's save and resolves it; b's next save finds a's version,
        // and b lets go, sending nothing.
        hold("both");
        clock.advance(MINUTE);
        sql.answer(Answer::Rows(Vec::new()));
        assert_eq!(a.evaluate_group(0).await.evaluated, 1);
        assert_eq!(outbox(&a), ["trigger", "resolve"]);
        b.evaluate_group(0).await;
        assert!(!b.inner.slots[0].held(), "fenced by a's save");
        assert!(b.inner.next_message("pd").is_none());
        // Transitions went once each under the group's one application id.
        assert_eq!(
            log.0.lock().unwrap().clone(),
            [pair("inactive", "firing"), pair("firing", "resolved")]
        );
        assert_eq!(log.2.lock().unwrap().len(), 1);
    }
}
