//! Kinesis Data Streams consumer (`formats.md` §5–§6): polling GetRecords per shard,
//! every record through KPL de-aggregation and the stream's [`Format`] decoder, rows
//! and positions into a [`StreamSink`].
//!
//! ```text
//!  ListShards (paged, every discovery interval)
//!     └─> a task per shard whose parents are read to their end
//!            GetShardIterator (AFTER_SEQUENCE_NUMBER of the committed position,
//!                              or the configured start for a new shard)
//!            GetRecords loop ──> Decoder ──> StreamSink::write_positioned(rows,
//!            (backoff on throttling,                      [(stream/shard, last seq)])
//!             renewal of expired iterators)
//!            NextShardIterator = null ──> position SHARD_END: the children start
//! ```
//!
//! Exactly once: nothing is acknowledged to Kinesis; the sink commits each shard's
//! position in the same lake commit as the rows it covers, and on start every shard
//! resumes after its committed position. A table whose lake already holds more than
//! the least committed position (a crash between two tables' commits) is given no
//! rows of the records it holds.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_kinesis::error::{DisplayErrorContext, ProvideErrorMetadata};
use aws_sdk_kinesis::types::ShardIteratorType;
use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::decode::{DecodeStats, Decoder, Format};
use crate::lease::{Lease, LeaseLost, LeaseSettings, LeaseWatch};
use crate::metrics as m;
use fleetlake_model::retry::RetryPolicy;
use fleetlake_model::schema::Table;
use fleetlake_model::sink::{SHARD_END, SinkError, StreamSink, sequence_le};

/// Where a shard with no committed position starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartPosition {
    /// The oldest record the stream keeps.
    TrimHorizon,
    /// Records put after the consumer starts.
    Latest,
    /// Records put at or after this time (epoch milliseconds).
    AtTimestamp(i64),
}

/// One stream to consume.
#[derive(Debug, Clone)]
pub struct StreamConfig {
    /// Stream name (shard keys and metric labels use it).
    pub name: String,
    /// Stream ARN, when configured by ARN (cross-account streams).
    pub arn: Option<String>,
    /// Record format (KPL aggregates are always de-aggregated first).
    pub format: Format,
    /// Region of log events that do not name theirs.
    pub region: Option<String>,
    /// Start of shards without a committed position.
    pub start: StartPosition,
    /// Wait after a GetRecords call that returned nothing (Kinesis asks for ≥ 1 s).
    pub idle_wait: Duration,
    /// Least time between two GetRecords calls on one shard (5 calls/s/shard allowed).
    pub min_call_interval: Duration,
    /// How often shards are listed again (new shards after resharding).
    pub discovery_interval: Duration,
    /// Most records per GetRecords call (at most 10,000).
    pub max_records: i32,
}

impl StreamConfig {
    /// The stream's name from `name_or_arn` (`arn:aws:kinesis:REGION:ACCOUNT:stream/NAME`
    /// or `NAME`), and the ARN if it was one.
    pub fn parse_stream(name_or_arn: &str) -> Result<(String, Option<String>), String> {
        if !name_or_arn.starts_with("arn:") {
            if name_or_arn.is_empty() {
                return Err("the stream name is empty".into());
            }
            return Ok((name_or_arn.to_string(), None));
        }
        let resource = name_or_arn.splitn(6, ':').nth(5).unwrap_or_default();
        match resource.strip_prefix("stream/") {
            Some(name) if !name.is_empty() && !name.contains('/') => {
                Ok((name.to_string(), Some(name_or_arn.to_string())))
            }
            _ => Err(format!(
                "{name_or_arn:?} is not a Kinesis stream ARN (arn:aws:kinesis:REGION:ACCOUNT:stream/NAME)"
            )),
        }
    }

    fn shard_key(&self, shard_id: &str) -> String {
        format!("{}/{shard_id}", self.name)
    }

    fn source(&self) -> String {
        format!("kinesis/{}", self.name)
    }
}

/// A shard as ListShards describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    /// Shard id.
    pub id: String,
    /// The shard it was split from, or one of the two it was merged from.
    pub parent: Option<String>,
    /// The other shard of a merge.
    pub adjacent_parent: Option<String>,
}

impl Shard {
    fn parents(&self) -> impl Iterator<Item = &str> {
        self.parent
            .iter()
            .chain(&self.adjacent_parent)
            .map(String::as_str)
    }
}

/// One page of ListShards.
#[derive(Debug, Clone, Default)]
pub struct ShardsPage {
    /// The shards of this page.
    pub shards: Vec<Shard>,
    /// The token of the next page, if any.
    pub next_token: Option<String>,
}

/// One record of GetRecords.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Sequence number (decimal).
    pub sequence_number: String,
    /// The record's data.
    pub data: Vec<u8>,
    /// When Kinesis received it, epoch milliseconds.
    pub arrival_ms: i64,
}

/// One GetRecords answer.
#[derive(Debug, Clone, Default)]
pub struct RecordsPage {
    /// The records, in order.
    pub records: Vec<Record>,
    /// The iterator for the next call; `None` once a closed shard is read to its end.
    pub next_iterator: Option<String>,
    /// How far behind the tip of the stream the answer is.
    pub millis_behind: Option<i64>,
}

/// Where to take an iterator from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IteratorFrom {
    /// Right after this sequence number.
    After(String),
    /// The configured start for new shards.
    Start(StartPosition),
}

/// Kinesis API errors, by what the consumer does about them.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// Throttled (ProvisionedThroughputExceeded, KMS throttling): back off, retry.
    #[error("throttled: {0}")]
    Throttled(String),
    /// The iterator is older than 5 minutes: take a new one.
    #[error("shard iterator expired: {0}")]
    ExpiredIterator(String),
    /// Anything else (network, permissions, missing stream): back off, retry.
    #[error("{0}")]
    Other(String),
}

/// The Kinesis calls the consumer makes; [`SdkKinesis`] makes them with the AWS SDK.
pub trait KinesisApi: Send + Sync + 'static {
    /// One page of ListShards.
    fn list_shards<'a>(
        &'a self,
        stream: &'a StreamConfig,
        next_token: Option<String>,
    ) -> BoxFuture<'a, Result<ShardsPage, ApiError>>;

    /// GetShardIterator.
    fn shard_iterator<'a>(
        &'a self,
        stream: &'a StreamConfig,
        shard_id: &'a str,
        from: IteratorFrom,
    ) -> BoxFuture<'a, Result<String, ApiError>>;

    /// GetRecords.
    fn get_records<'a>(
        &'a self,
        stream: &'a StreamConfig,
        iterator: &'a str,
        limit: i32,
    ) -> BoxFuture<'a, Result<RecordsPage, ApiError>>;
}

/// [`KinesisApi`] over `aws-sdk-kinesis`.
#[derive(Debug, Clone)]
pub struct SdkKinesis {
    client: aws_sdk_kinesis::Client,
}

impl SdkKinesis {
    /// A consumer client over an SDK client (region, credentials and endpoint set).
    pub fn new(client: aws_sdk_kinesis::Client) -> Self {
        Self { client }
    }
}

/// Error codes of Kinesis that mean "slow down".
const KINESIS_THROTTLING: &[&str] = &[
    "ProvisionedThroughputExceededException",
    "KMSThrottlingException",
    "LimitExceededException",
];

/// An AWS SDK error (any service: they share the smithy error type) by what the
/// consumer does about it; `throttling` lists the service's "slow down" codes.
pub(crate) fn sdk_error<E, R>(
    e: aws_sdk_kinesis::error::SdkError<E, R>,
    throttling: &[&str],
) -> ApiError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    let message = DisplayErrorContext(&e).to_string();
    match e.code() {
        Some(code) if throttling.contains(&code) => ApiError::Throttled(message),
        Some("ExpiredIteratorException") => ApiError::ExpiredIterator(message),
        _ => ApiError::Other(message),
    }
}

fn api_error<E, R>(e: aws_sdk_kinesis::error::SdkError<E, R>) -> ApiError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    sdk_error(e, KINESIS_THROTTLING)
}

impl KinesisApi for SdkKinesis {
    fn list_shards<'a>(
        &'a self,
        stream: &'a StreamConfig,
        next_token: Option<String>,
    ) -> BoxFuture<'a, Result<ShardsPage, ApiError>> {
        Box::pin(async move {
            let mut request = self.client.list_shards();
            // With a NextToken, the stream must not be named again.
            request = match (next_token, &stream.arn) {
                (Some(token), _) => request.next_token(token),
                (None, Some(arn)) => request.stream_arn(arn),
                (None, None) => request.stream_name(&stream.name),
            };
            let out = request.send().await.map_err(api_error)?;
            let shards = out
                .shards()
                .iter()
                .map(|s| Shard {
                    id: s.shard_id().to_string(),
                    parent: s.parent_shard_id().map(str::to_string),
                    adjacent_parent: s.adjacent_parent_shard_id().map(str::to_string),
                })
                .collect();
            Ok(ShardsPage {
                shards,
                next_token: out.next_token().map(str::to_string),
            })
        })
    }

    fn shard_iterator<'a>(
        &'a self,
        stream: &'a StreamConfig,
        shard_id: &'a str,
        from: IteratorFrom,
    ) -> BoxFuture<'a, Result<String, ApiError>> {
        Box::pin(async move {
            let mut request = self.client.get_shard_iterator().shard_id(shard_id);
            request = match &stream.arn {
                Some(arn) => request.stream_arn(arn),
                None => request.stream_name(&stream.name),
            };
            request = match from {
                IteratorFrom::After(seq) => request
                    .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
                    .starting_sequence_number(seq),
                IteratorFrom::Start(StartPosition::TrimHorizon) => {
                    request.shard_iterator_type(ShardIteratorType::TrimHorizon)
                }
                IteratorFrom::Start(StartPosition::Latest) => {
                    request.shard_iterator_type(ShardIteratorType::Latest)
                }
                IteratorFrom::Start(StartPosition::AtTimestamp(ms)) => request
                    .shard_iterator_type(ShardIteratorType::AtTimestamp)
                    .timestamp(aws_sdk_kinesis::primitives::DateTime::from_millis(ms)),
            };
            let out = request.send().await.map_err(api_error)?;
            out.shard_iterator()
                .map(str::to_string)
                .ok_or_else(|| ApiError::Other(format!("no iterator returned for {shard_id}")))
        })
    }

    fn get_records<'a>(
        &'a self,
        stream: &'a StreamConfig,
        iterator: &'a str,
        limit: i32,
    ) -> BoxFuture<'a, Result<RecordsPage, ApiError>> {
        Box::pin(async move {
            let mut request = self
                .client
                .get_records()
                .shard_iterator(iterator)
                .limit(limit);
            if let Some(arn) = &stream.arn {
                request = request.stream_arn(arn);
            }
            let out = request.send().await.map_err(api_error)?;
            let records = out
                .records()
                .iter()
                .map(|r| Record {
                    sequence_number: r.sequence_number().to_string(),
                    data: r.data().as_ref().to_vec(),
                    arrival_ms: r
                        .approximate_arrival_timestamp()
                        .and_then(|t| t.to_millis().ok())
                        .unwrap_or_default(),
                })
                .collect();
            Ok(RecordsPage {
                records,
                next_iterator: out.next_shard_iterator().map(str::to_string),
                millis_behind: out.millis_behind_latest(),
            })
        })
    }
}

/// Where a shard resumes, from the positions every table committed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Resume {
    /// Not committed by every table: from the start (the oldest record when some
    /// table committed it, as a table whose first commit failed before a crash needs
    /// every record); `skip` lists the tables that hold records, with their positions.
    Start { skip: Vec<(Table, String)> },
    /// After this sequence number (the least any table committed); `skip` lists the
    /// tables that hold more, with their positions: records up to there give them no
    /// rows.
    After {
        seq: String,
        skip: Vec<(Table, String)>,
    },
    /// Read to its end before, by every table.
    Ended,
}

fn resume_of(committed: &[(Table, BTreeMap<String, String>)], key: &str) -> Resume {
    let held: Vec<(Table, Option<&String>)> = committed
        .iter()
        .map(|(t, positions)| (*t, positions.get(key)))
        .collect();
    let skip_past = |least: Option<&String>| -> Vec<(Table, String)> {
        held.iter()
            .filter_map(|(t, seq)| {
                let seq = (*seq)?;
                least
                    .is_none_or(|least| !sequence_le(seq, least))
                    .then(|| (*t, seq.clone()))
            })
            .collect()
    };
    if held.iter().any(|(_, seq)| seq.is_none()) {
        return Resume::Start {
            skip: skip_past(None),
        };
    }
    let Some(least) = held
        .iter()
        .filter_map(|(_, seq)| *seq)
        .reduce(|a, b| if sequence_le(a, b) { a } else { b })
    else {
        return Resume::Start { skip: Vec::new() };
    };
    if least == SHARD_END {
        return Resume::Ended;
    }
    Resume::After {
        seq: least.clone(),
        skip: skip_past(Some(least)),
    }
}

/// Consumes `stream` until `shutdown` turns true. With `leases`, only the shards this
/// instance holds a lease for are read (see [`crate::lease`]); a lease taken away ends
/// the consumer with [`LeaseLost`].
pub async fn run_stream(
    stream: StreamConfig,
    api: Arc<dyn KinesisApi>,
    sink: Arc<dyn StreamSink>,
    leases: Option<LeaseSettings>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), LeaseLost> {
    let stream = Arc::new(stream);
    let mut committed = sink.committed_positions();
    info!(stream = %stream.name, format = %stream.format, leases = leases.is_some(), "kinesis consumer starting");
    let mut coordinator = match leases {
        Some(settings) => {
            // Only shards held by this instance are carried in its commits.
            let prefix = format!("{}/", stream.name);
            let ours: Vec<String> = committed
                .iter()
                .flat_map(|(_, p)| p.keys())
                .filter(|k| k.starts_with(&prefix))
                .cloned()
                .collect();
            while let Err(error) = sink.commit_without(ours.clone()).await {
                warn!(stream = %stream.name, %error, "could not commit before joining the lease table; retrying");
                if sleep_or_shutdown(Duration::from_secs(1), &mut shutdown).await {
                    return Ok(());
                }
            }
            match Coordinator::start(settings, &stream, &mut shutdown).await {
                Some(c) => Some(c),
                None => return Ok(()),
            }
        }
        None => None,
    };
    let mut shards: HashMap<String, (Shard, State)> = HashMap::new();
    let (done_tx, mut done_rx) = mpsc::channel::<String>(64);
    let mut tasks = JoinSet::new();
    // Per reader: its own stop signal, and word that it has stopped (after its last
    // write), for handing a shard to another instance.
    let mut readers: HashMap<String, (watch::Sender<bool>, oneshot::Receiver<()>)> = HashMap::new();
    let mut backoff =
        RetryPolicy::forever(Duration::from_millis(500), Duration::from_secs(30)).waits();
    let mut next_list = tokio::time::Instant::now();
    // The first leases are taken a renewal interval after joining, so that instances
    // started together see each other's heartbeats and split the shards.
    let mut lease_tick = tokio::time::Instant::now()
        + coordinator
            .as_ref()
            .map_or(Duration::ZERO, |c| c.settings.duration / 3);
    let outcome = loop {
        if tokio::time::Instant::now() >= next_list {
            next_list = tokio::time::Instant::now() + stream.discovery_interval;
            match list_all_shards(api.as_ref(), &stream).await {
                Ok(listed) => {
                    backoff.reset();
                    for shard in listed {
                        shards
                            .entry(shard.id.clone())
                            .or_insert((shard, State::Waiting));
                    }
                    metrics::gauge!(m::KINESIS_SHARDS, "stream" => stream.name.clone())
                        .set(shards.len() as f64);
                }
                Err(error) => {
                    metrics::counter!(m::KINESIS_ERRORS, "stream" => stream.name.clone(), "call" => "ListShards")
                        .increment(1);
                    let wait = backoff.next_wait();
                    warn!(stream = %stream.name, %error, retry_in = ?wait, "listing shards failed");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => continue,
                        _ = shutdown.changed() => break Ok(()),
                    }
                }
            }
        }
        let mut allowed: Option<Vec<String>> = None;
        if let Some(c) = coordinator.as_mut()
            && tokio::time::Instant::now() >= lease_tick
        {
            lease_tick = tokio::time::Instant::now() + c.settings.duration / 3;
            match c.tick(&stream, sink.as_ref(), &mut shards).await {
                Ok((taken, give_up)) => {
                    if let Some(id) = give_up
                        && let Some((stop, stopped)) = readers.remove(&id)
                    {
                        let _ = stop.send(true);
                        let _ = stopped.await;
                        if let Some((_, state)) = shards.get_mut(&id) {
                            *state = State::Waiting;
                        }
                        c.give_back(&stream, sink.as_ref(), &id, "balance").await;
                    }
                    if !taken.is_empty() {
                        // Positions of the shards just taken, as their last owner left them.
                        match sink.read_positions(taken.clone()).await {
                            Ok(found) => {
                                sink.hold_positions(found.clone()).await;
                                for (table, positions) in found {
                                    match committed.iter_mut().find(|(t, _)| *t == table) {
                                        Some((_, known)) => known.extend(positions),
                                        None => committed.push((table, positions)),
                                    }
                                }
                            }
                            Err(error) => {
                                warn!(stream = %stream.name, %error, "could not read positions of taken leases; retrying");
                                c.release_unstarted(&taken);
                            }
                        }
                    }
                }
                Err(lost) => break Err(lost),
            }
            allowed = Some(c.held_shards());
        } else if let Some(c) = coordinator.as_ref() {
            allowed = Some(c.held_shards());
        }
        // Start every shard whose parents are read to their end (or gone from the
        // stream, past its retention), and that this instance may read.
        let ids: Vec<String> = shards.keys().cloned().collect();
        for id in ids {
            let (shard, state) = &shards[&id];
            if *state != State::Waiting || allowed.as_ref().is_some_and(|held| !held.contains(&id))
            {
                continue;
            }
            let parents_done = shard
                .parents()
                .all(|p| shards.get(p).is_none_or(|(_, s)| *s == State::Done));
            if !parents_done {
                continue;
            }
            let shard = shard.clone();
            match resume_of(&committed, &stream.shard_key(&shard.id)) {
                Resume::Ended => {
                    debug!(stream = %stream.name, shard = %shard.id, "shard was read to its end before");
                    shards.get_mut(&id).expect("listed").1 = State::Done;
                    if let Some(c) = coordinator.as_mut() {
                        c.give_back(&stream, sink.as_ref(), &id, "ended before")
                            .await;
                    }
                    // Its children may be ready now: look again at once.
                    let _ = done_tx.try_send(String::new());
                }
                resume => {
                    shards.get_mut(&id).expect("listed").1 = State::Reading;
                    let (stop, stop_rx) = watch::channel(false);
                    let (stopped_tx, stopped) = oneshot::channel();
                    readers.insert(id.clone(), (stop, stopped));
                    let reader = read_shard(
                        Arc::clone(&stream),
                        Arc::clone(&api),
                        Arc::clone(&sink),
                        shard,
                        resume,
                        done_tx.clone(),
                        stop_rx,
                    );
                    tasks.spawn(async move {
                        reader.await;
                        let _ = stopped_tx.send(());
                    });
                }
            }
        }
        let until = match &coordinator {
            Some(_) => next_list.min(lease_tick),
            None => next_list,
        };
        tokio::select! {
            _ = tokio::time::sleep_until(until) => {}
            Some(id) = done_rx.recv() => {
                if let Some((_, state)) = shards.get_mut(&id) {
                    *state = State::Done;
                }
                readers.remove(&id);
                if let Some(c) = coordinator.as_mut() {
                    // Released once its end is committed (by this commit), so no one
                    // takes it over to read its tail again.
                    c.give_back(&stream, sink.as_ref(), &id, "read to its end").await;
                }
            }
            _ = shutdown.changed() => break Ok(()),
        }
    };
    for (stop, _) in readers.values() {
        let _ = stop.send(true);
    }
    while tasks.join_next().await.is_some() {}
    info!(stream = %stream.name, "kinesis consumer stopped");
    outcome
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    Waiting,
    Reading,
    Done,
}

/// This instance's part in the lease table of one stream.
struct Coordinator {
    settings: LeaseSettings,
    heartbeat: (String, i64),
    /// Shard leases held: key → counter.
    held: HashMap<String, i64>,
    /// When each held lease was last taken or renewed.
    renewed: HashMap<String, std::time::Instant>,
    watch: LeaseWatch,
}

impl Coordinator {
    /// Makes the table and this instance's heartbeat; `None` on shutdown.
    async fn start(
        settings: LeaseSettings,
        stream: &StreamConfig,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<Self> {
        let key = crate::lease::heartbeat_key(&settings.owner);
        let mut backoff =
            RetryPolicy::forever(Duration::from_millis(500), Duration::from_secs(30)).waits();
        loop {
            let attempt = async {
                settings.store.ensure_table().await?;
                let seen = settings
                    .store
                    .list()
                    .await?
                    .into_iter()
                    .find(|l| l.key == key)
                    .map(|l| l.counter);
                settings
                    .store
                    .take(&key, &settings.owner, seen)
                    .await?
                    .ok_or_else(|| ApiError::Other(format!("heartbeat {key} is in use")))
            };
            match attempt.await {
                Ok(counter) => {
                    info!(stream = %stream.name, owner = %settings.owner, "joined the lease table");
                    return Some(Self {
                        heartbeat: (key, counter),
                        held: HashMap::new(),
                        renewed: HashMap::new(),
                        watch: LeaseWatch::default(),
                        settings,
                    });
                }
                Err(error) => {
                    let wait = backoff.next_wait();
                    warn!(stream = %stream.name, %error, retry_in = ?wait, "joining the lease table failed");
                    if sleep_or_shutdown(wait, shutdown).await {
                        return None;
                    }
                }
            }
        }
    }

    fn held_shards(&self) -> Vec<String> {
        self.held
            .keys()
            .filter_map(|k| k.rsplit_once('/').map(|(_, id)| id.to_string()))
            .collect()
    }

    fn release_unstarted(&mut self, keys: &[String]) {
        for key in keys {
            self.held.remove(key);
        }
    }

    /// Gives shard `id` (no reader running) back to the lease table: commits what was
    /// read of it and stops carrying its position (one step, see
    /// [`StreamSink::commit_without`]), then releases its lease.
    async fn give_back(
        &mut self,
        stream: &StreamConfig,
        sink: &dyn StreamSink,
        id: &str,
        why: &str,
    ) {
        let key = stream.shard_key(id);
        let Some(counter) = self.held.remove(&key) else {
            return;
        };
        if let Err(error) = sink.commit_without(vec![key.clone()]).await {
            // Keep it: the next flush commits it; the lease stays ours meanwhile.
            warn!(%key, %error, "could not commit before giving a shard's lease back");
            self.held.insert(key, counter);
            return;
        }
        self.renewed.remove(&key);
        match self
            .settings
            .store
            .release(&key, &self.settings.owner, counter)
            .await
        {
            Ok(true) => info!(stream = %stream.name, shard = %id, why, "released lease"),
            Ok(false) => warn!(%key, "lease changed before its release"),
            // Not released: it expires, and its position is committed.
            Err(error) => warn!(%key, %error, "releasing a lease failed"),
        }
    }

    /// Renews what is held, then takes unowned or expired leases of readable shards up
    /// to this instance's share; returns the keys taken, and a shard being read to give
    /// up when this instance holds more than its share.
    async fn tick(
        &mut self,
        stream: &StreamConfig,
        sink: &dyn StreamSink,
        shards: &mut HashMap<String, (Shard, State)>,
    ) -> Result<(Vec<String>, Option<String>), LeaseLost> {
        let store = Arc::clone(&self.settings.store);
        let owner = self.settings.owner.clone();
        let mut renew = vec![self.heartbeat.clone()];
        renew.extend(self.held.iter().map(|(k, c)| (k.clone(), *c)));
        for (key, counter) in renew {
            match store.renew(&key, &owner, counter).await {
                Ok(Some(next)) => {
                    if key == self.heartbeat.0 {
                        self.heartbeat.1 = next;
                    } else {
                        self.renewed.insert(key.clone(), std::time::Instant::now());
                        self.held.insert(key, next);
                    }
                }
                Ok(None) => return Err(LeaseLost { key }),
                // Not lost yet: renewed at the next tick, within the duration.
                Err(error) => warn!(%key, %error, "renewing a lease failed"),
            }
        }
        // Not renewed for two thirds of the duration (failed calls, or this loop held
        // up): another instance may take it before we notice, so stop here.
        let limit = self.settings.duration * 2 / 3;
        if let Some(key) = self
            .held
            .keys()
            .find(|k| self.renewed.get(*k).is_none_or(|at| at.elapsed() > limit))
        {
            return Err(LeaseLost { key: key.clone() });
        }
        let leases = match store.list().await {
            Ok(leases) => leases,
            Err(error) => {
                warn!(stream = %stream.name, %error, "listing leases failed");
                return Ok((Vec::new(), None));
            }
        };
        let now = std::time::Instant::now();
        self.watch.observe(&leases, now);
        let duration = self.settings.duration;
        let live_instances = leases
            .iter()
            .filter(|l| l.key.starts_with("instance/") && self.watch.is_live(l, duration, now))
            .count()
            .max(1);
        // Parents read by other instances: done once every table committed their end.
        let unknown_parents: Vec<String> = shards
            .values()
            .filter(|(_, s)| *s == State::Waiting)
            .flat_map(|(shard, _)| shard.parents().map(str::to_string).collect::<Vec<_>>())
            .filter(|p| shards.get(p).is_some_and(|(_, s)| *s != State::Done))
            .filter(|p| !self.held.contains_key(&stream.shard_key(p)))
            .collect();
        if !unknown_parents.is_empty() {
            let keys: Vec<String> = unknown_parents
                .iter()
                .map(|p| stream.shard_key(p))
                .collect();
            if let Ok(found) = sink.read_positions(keys).await {
                for parent in &unknown_parents {
                    if resume_of(&found, &stream.shard_key(parent)) == Resume::Ended
                        && let Some((_, state)) = shards.get_mut(parent)
                    {
                        *state = State::Done;
                    }
                }
            }
        }
        let open = shards.values().filter(|(_, s)| *s != State::Done).count();
        let share = open.div_ceil(live_instances);
        let by_key: HashMap<&str, &Lease> = leases.iter().map(|l| (l.key.as_str(), l)).collect();
        let mut taken = Vec::new();
        let mut ready: Vec<&Shard> = shards
            .values()
            .filter(|(_, s)| *s == State::Waiting)
            .map(|(shard, _)| shard)
            .filter(|shard| {
                shard
                    .parents()
                    .all(|p| shards.get(p).is_none_or(|(_, s)| *s == State::Done))
            })
            .collect();
        ready.sort_by(|a, b| a.id.cmp(&b.id));
        for shard in ready {
            if self.held.len() >= share {
                break;
            }
            let key = stream.shard_key(&shard.id);
            if self.held.contains_key(&key) {
                continue;
            }
            let lease = by_key.get(key.as_str());
            if lease.is_some_and(|l| self.watch.is_live(l, duration, now)) {
                continue;
            }
            match store.take(&key, &owner, lease.map(|l| l.counter)).await {
                Ok(Some(counter)) => {
                    info!(stream = %stream.name, shard = %shard.id, previous = ?lease.and_then(|l| l.owner.clone()), "took lease");
                    self.renewed.insert(key.clone(), std::time::Instant::now());
                    self.held.insert(key.clone(), counter);
                    taken.push(key);
                }
                Ok(None) => debug!(%key, "another instance took the lease first"),
                Err(error) => warn!(%key, %error, "taking a lease failed"),
            }
        }
        // Over its share (another instance joined): give one shard up per tick.
        let give_up = (self.held.len() > share)
            .then(|| {
                let mut reading: Vec<&String> = shards
                    .iter()
                    .filter(|(id, (_, s))| {
                        *s == State::Reading && self.held.contains_key(&stream.shard_key(id))
                    })
                    .map(|(id, _)| id)
                    .collect();
                reading.sort();
                reading.last().map(|id| (*id).clone())
            })
            .flatten();
        Ok((taken, give_up))
    }
}

async fn list_all_shards(
    api: &dyn KinesisApi,
    stream: &StreamConfig,
) -> Result<Vec<Shard>, ApiError> {
    let mut all = Vec::new();
    let mut token = None;
    loop {
        let page = api.list_shards(stream, token).await?;
        all.extend(page.shards);
        match page.next_token {
            Some(next) if !next.is_empty() => token = Some(next),
            _ => return Ok(all),
        }
    }
}

/// Reads one shard from `resume` to its end (or until shutdown).
async fn read_shard(
    stream: Arc<StreamConfig>,
    api: Arc<dyn KinesisApi>,
    sink: Arc<dyn StreamSink>,
    shard: Shard,
    resume: Resume,
    done: mpsc::Sender<String>,
    mut shutdown: watch::Receiver<bool>,
) {
    let key = stream.shard_key(&shard.id);
    let source = stream.source();
    let labels = [("stream", stream.name.clone()), ("shard", shard.id.clone())];
    let _lag = LagGauge(labels.clone());
    let (mut last_seq, mut skip, from_oldest) = match resume {
        Resume::After { seq, skip } => (Some(seq), skip, false),
        Resume::Start { skip } => {
            let some_table_has_it = !skip.is_empty();
            (None, skip, some_table_has_it)
        }
        Resume::Ended => (None, Vec::new(), false),
    };
    // Children of a split or merge start at their first record, whatever the stream's
    // start (as the KCL does): their records follow the parents'. LATEST is pinned to
    // a time, so that renewing the iterator before a record arrives skips nothing.
    let start = match stream.start {
        _ if from_oldest || shard.parents().next().is_some() => StartPosition::TrimHorizon,
        StartPosition::Latest => StartPosition::AtTimestamp(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or_default(),
        ),
        start => start,
    };
    info!(stream = %stream.name, shard = %shard.id, after = ?last_seq, "reading shard");
    let mut failures = 0;
    let mut iterator: Option<String> = None;
    let mut backoff =
        RetryPolicy::forever(Duration::from_millis(200), Duration::from_secs(10)).waits();
    loop {
        if *shutdown.borrow() {
            return;
        }
        let it = match iterator.take() {
            Some(it) => it,
            None => {
                let from = match &last_seq {
                    Some(seq) => IteratorFrom::After(seq.clone()),
                    None => IteratorFrom::Start(start),
                };
                match api.shard_iterator(&stream, &shard.id, from).await {
                    Ok(it) => it,
                    Err(error) => {
                        metrics::counter!(m::KINESIS_ERRORS, "stream" => stream.name.clone(), "call" => "GetShardIterator")
                            .increment(1);
                        let wait = backoff.next_wait();
                        warn!(stream = %stream.name, shard = %shard.id, %error, retry_in = ?wait, "getting a shard iterator failed");
                        if sleep_or_shutdown(wait, &mut shutdown).await {
                            return;
                        }
                        continue;
                    }
                }
            }
        };
        let page = match api.get_records(&stream, &it, stream.max_records).await {
            Ok(page) => page,
            Err(ApiError::Throttled(error)) => {
                metrics::counter!(m::KINESIS_THROTTLED, &labels).increment(1);
                let wait = backoff.next_wait();
                debug!(stream = %stream.name, shard = %shard.id, %error, retry_in = ?wait, "throttled");
                iterator = Some(it);
                if sleep_or_shutdown(wait, &mut shutdown).await {
                    return;
                }
                continue;
            }
            Err(ApiError::ExpiredIterator(error)) => {
                metrics::counter!(m::KINESIS_ITERATOR_RENEWALS, &labels).increment(1);
                debug!(stream = %stream.name, shard = %shard.id, %error, "renewing an expired iterator");
                continue;
            }
            Err(ApiError::Other(error)) => {
                metrics::counter!(m::KINESIS_ERRORS, "stream" => stream.name.clone(), "call" => "GetRecords")
                    .increment(1);
                let wait = backoff.next_wait();
                warn!(stream = %stream.name, shard = %shard.id, %error, retry_in = ?wait, "GetRecords failed");
                // The iterator stays valid for 5 minutes: retry it, and take a new one
                // only after repeated failures (it may be what is wrong).
                failures += 1;
                if failures < 3 {
                    iterator = Some(it);
                }
                if sleep_or_shutdown(wait, &mut shutdown).await {
                    return;
                }
                continue;
            }
        };
        failures = 0;
        backoff.reset();
        if let Some(behind) = page.millis_behind {
            metrics::gauge!(m::KINESIS_MILLIS_BEHIND, &labels).set(behind as f64);
        }
        let ended = page.next_iterator.is_none();
        let reached = if ended {
            Some(SHARD_END.to_string())
        } else {
            page.records.last().map(|r| r.sequence_number.clone())
        };
        if let Some(reached) = reached {
            let (rows, stats, bytes) = decode_page(&stream, &source, &shard.id, &page, &mut skip);
            m::record_received(&source, stats);
            if !write(
                sink.as_ref(),
                rows,
                vec![(key.clone(), reached)],
                &mut shutdown,
            )
            .await
            {
                return;
            }
            m::record_decoded(&source, stream.format.name(), stats);
            metrics::counter!(m::KINESIS_RECORDS, &labels).increment(page.records.len() as u64);
            metrics::counter!(m::KINESIS_BYTES, &labels).increment(bytes as u64);
            if let Some(last) = page.records.last() {
                last_seq = Some(last.sequence_number.clone());
            }
        }
        if ended {
            info!(stream = %stream.name, shard = %shard.id, "shard read to its end");
            let _ = done.send(shard.id.clone()).await;
            return;
        }
        iterator = page.next_iterator;
        let wait = if page.records.is_empty() {
            stream.idle_wait
        } else {
            stream.min_call_interval
        };
        if sleep_or_shutdown(wait, &mut shutdown).await {
            return;
        }
    }
}

/// Decodes a page; records up to a `skip` position give that table no rows.
fn decode_page(
    stream: &StreamConfig,
    source: &str,
    shard_id: &str,
    page: &RecordsPage,
    skip: &mut Vec<(Table, String)>,
) -> (Vec<(Table, arrow::array::RecordBatch)>, DecodeStats, usize) {
    let mut decoder = Decoder::new(source, stream.format, stream.region.as_deref());
    let mut held_back = Vec::new();
    let mut stats = DecodeStats::default();
    let mut bytes = 0;
    for record in &page.records {
        bytes += record.data.len();
        let position = format!("{shard_id} {}", record.sequence_number);
        // A table drops out of `skip` once past the position it holds.
        skip.retain(|(_, held)| sequence_le(&record.sequence_number, held));
        if skip.is_empty() {
            decoder.push_kinesis_record(&record.data, &position, record.arrival_ms);
            continue;
        }
        // Some tables already hold this record's rows (committed before a crash).
        let mut own = Decoder::new(source, stream.format, stream.region.as_deref());
        own.push_kinesis_record(&record.data, &position, record.arrival_ms);
        stats += own.stats();
        held_back.extend(
            own.finish()
                .into_iter()
                .filter(|(table, _)| !skip.iter().any(|(t, _)| t == table)),
        );
    }
    stats += decoder.stats();
    let mut rows = decoder.finish();
    rows.extend(held_back);
    (rows, stats, bytes)
}

/// Zeroes a shard's `millis_behind_latest` gauge when its reader stops here (the shard
/// ended, its lease went to another instance, shutdown), so `/metrics` does not keep a
/// stale lag for a shard this instance no longer reads.
struct LagGauge([(&'static str, String); 2]);

impl Drop for LagGauge {
    fn drop(&mut self) {
        metrics::gauge!(m::KINESIS_MILLIS_BEHIND, &self.0).set(0.0);
    }
}

/// Writes until the sink takes it; `false` on shutdown.
async fn write(
    sink: &dyn StreamSink,
    rows: Vec<(Table, arrow::array::RecordBatch)>,
    positions: Vec<(String, String)>,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    let mut backoff =
        RetryPolicy::forever(Duration::from_millis(100), Duration::from_secs(5)).waits();
    loop {
        match sink.write_positioned(rows.clone(), positions.clone()).await {
            Ok(()) => return true,
            Err(SinkError::Overloaded(_)) => {}
            Err(SinkError::Unavailable(error)) => {
                warn!(%error, "could not buffer kinesis records; retrying");
            }
        }
        if sleep_or_shutdown(backoff.next_wait(), shutdown).await {
            return false;
        }
    }
}

/// Sleeps for `wait`; `true` if shutdown came first.
async fn sleep_or_shutdown(wait: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    if *shutdown.borrow() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(wait) => *shutdown.borrow(),
        _ = shutdown.changed() => true,
    }
}

#[cfg(test)]
#[path = "kinesis_tests.rs"]
mod tests;
