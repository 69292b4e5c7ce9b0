//! Flushes: each table's hot buffer into its Delta table, one commit per table carrying
//! the WAL sequence and the stream positions its rows cover; then the WAL is truncated
//! as far as every table allows.
//!
//! A flush takes every table's rows and the positions at one instant from the writer
//! ([`Command::BeginFlush`]), checks rows that may already be in the lake, sorts and
//! commits them through the table's [`CommitGate`] (so a maintenance commit of the same
//! table never slips between "the rows may be in the lake now" and "they are, as
//! version V"), and tells the writer. Maintenance never holds the gate while it
//! rewrites files, so a flush waits at most for one of its commits.

use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use tokio::sync::oneshot;
use tracing::{error, info};

use crate::buffer;
use crate::health::Stage;
use crate::lake::{LakeError, sort_for_lake, split_at_time, split_points, without_points};
use crate::metrics as m;
use crate::writer::{Command, TableFlush, Written};
use crate::{Shared, TableSlot};
use fleetlake_model::retry::RetryPolicy;

/// Waits after failed flushes: 0.5 s doubling to 30 s, full jitter.
const RETRY: RetryPolicy =
    RetryPolicy::forever(Duration::from_millis(500), Duration::from_secs(30));

/// Flushes at each interval, or when the writer asks (enough rows, or a write refused
/// for room); after a failure, on a backoff schedule instead.
pub(crate) async fn flush_loop(shared: std::sync::Arc<Shared>) {
    let mut waits = RETRY.waits();
    let mut failing = false;
    loop {
        if failing {
            // The lake refused the last commit: writes are refused meanwhile, so retry
            // on the backoff schedule alone, not at the next interval.
            tokio::time::sleep(waits.next_wait()).await;
        } else {
            tokio::select! {
                _ = tokio::time::sleep(shared.config.flush_interval) => {}
                _ = shared.outlet.flush_now.notified() => {}
            }
        }
        match flush_once(&shared).await {
            Ok(()) => {
                if failing {
                    info!("the lake takes commits again");
                }
                shared.outlet.faults.recover(Stage::Lake);
                failing = false;
                waits.reset();
            }
            Err(error) => {
                ::metrics::counter!(m::FLUSH_FAILURES).increment(1);
                let now = shared.clock.now();
                shared
                    .outlet
                    .faults
                    .fail(Stage::Lake, &error.to_string(), now);
                failing = true;
                error!(%error, "lake flush failed; refusing writes until it succeeds");
            }
        }
    }
}

/// Flushes every table, then truncates the WAL as far as all tables allow.
pub(crate) async fn flush_once(shared: &Shared) -> Result<(), LakeError> {
    let _one_at_a_time = shared.flushing.lock().await;
    flush_locked(shared).await
}

/// One flush of every table; the caller holds the flush lock.
pub(crate) async fn flush_locked(shared: &Shared) -> Result<(), LakeError> {
    let (done, flushes) = oneshot::channel();
    shared.command(Command::BeginFlush { done }).await?;
    let flushes = flushes.await.map_err(|_| LakeError::WriterStopped)?;
    let mut first_error = None;
    for flush in flushes {
        let slot = &shared.tables[flush.table.index()];
        if let Err(error) = flush_table(shared, slot, flush).await {
            error!(table = %slot.table, %error, "lake flush failed");
            first_error.get_or_insert(error);
        }
    }
    shared.command(Command::Truncate).await?;
    first_error.map_or(Ok(()), Err)
}

async fn flush_table(
    shared: &Shared,
    slot: &TableSlot,
    flush: TableFlush,
) -> Result<(), LakeError> {
    let table = slot.table;
    let TableFlush {
        job,
        positions,
        feed_through,
        ..
    } = flush;
    // What of this run's published rows the commit covers (see `peers`).
    let cover = crate::peers::Cover {
        incarnation: shared.incarnation.clone(),
        through: feed_through,
    };
    let mut lake = slot.lake.lock().await;
    let Some(job) = job else {
        if let Some(positions) = positions {
            // No rows, but the streams moved on (records for other tables, control
            // messages): the table commits that it holds everything up to there.
            let empty = vec![RecordBatch::new_empty(table.schema())];
            let mut latest = slot.gate.enter().await;
            lake.append(empty, None, None, Some(&positions), Some(&cover))
                .await?;
            *latest = (*latest).max(lake.version());
            drop(latest);
            let (done, committed) = oneshot::channel();
            shared
                .command(Command::Committed {
                    table,
                    written: None,
                    positions: Some(positions),
                    done,
                })
                .await?;
            committed.await.map_err(|_| LakeError::WriterStopped)?;
            read_others_through_own(shared, slot, &mut lake).await;
            published_covered(shared, table, feed_through);
        }
        return Ok(());
    };
    let started = Instant::now();
    let mut batches = job.batches;
    let mut job_suspects = job.suspects;
    // The suspects are hidden from queries until committed; the rows split off below
    // are already visible.
    let hidden = job_suspects.len();
    // Rows of this writer at or before the latest time another writer committed since
    // may be in the lake through it (a retry sent to the other instance): check them too.
    if let Some(others) = lake.others_max_time().await? {
        let (after, maybe_there) = split_at_time(table, batches, others);
        batches = after;
        job_suspects.extend(maybe_there);
    }
    // Rows the tail found in another writer's commit (the time above covers only the
    // commits read since the last flush asked, which may not be those); forgotten once
    // this flush committed.
    let held = shared.outlet.held[table.index()]
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    if !held.is_empty() {
        let (kept, maybe_there) =
            crate::lake::split_rows(table, batches, |k| !held.contains(&k.point));
        batches = kept;
        job_suspects.extend(maybe_there);
    }
    let mut revealed = Vec::new();
    let mut retracted = Vec::new();
    if !job_suspects.is_empty() {
        let existing = lake.existing_points(&job_suspects).await?;
        // The other writers' rows this check saw reach the feed before any of this
        // flush's retractions, so no reader's count dips below the lake's.
        let others = lake.others_commits(false).await?;
        if !others.is_empty() {
            let through = lake.tailed();
            hand_others(shared, slot, others, through, None).await?;
        }
        let suspects: usize = job_suspects.iter().map(|b| b.num_rows()).sum();
        if !existing.is_empty() {
            ::metrics::counter!(m::DUPLICATES, "table" => table.name(), "stage" => "lake")
                .increment(existing.len() as u64);
        }
        info!(
            %table,
            suspects,
            already_in_lake = existing.len(),
            "checked redelivered rows against the lake"
        );
        let visible = job_suspects.split_off(hidden);
        revealed = without_points(table, job_suspects, &existing);
        batches.extend(revealed.iter().cloned());
        let (kept, dropped) = split_points(table, visible, &existing);
        batches.extend(kept);
        retracted = dropped;
    }
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    let sorted = if rows == 0 {
        // Everything was already in the lake: commit no rows, only the WAL position,
        // so the redelivery is not checked again after a restart.
        vec![RecordBatch::new_empty(table.schema())]
    } else {
        vec![
            sort_for_lake(table, &batches).map_err(|source| LakeError::Arrow {
                table: table.name().into(),
                source,
            })?,
        ]
    };
    let mut latest = slot.gate.enter().await;
    // The version this commit builds on: the handle's own, or a later one that
    // maintenance committed through the gate.
    let base = lake.version().max(*latest);
    shared.command(Command::Committing { table, base }).await?;
    let committing = Instant::now();
    let appended = lake
        .append(
            sorted.clone(),
            Some(job.seq),
            Some(job.max_time),
            positions.as_ref(),
            Some(&cover),
        )
        .await;
    let version = match appended {
        Ok(version) => version,
        Err(error) => {
            drop(latest);
            shared.command(Command::FlushFailed { table }).await?;
            return Err(error);
        }
    };
    *latest = (*latest).max(Some(version));
    if !held.is_empty() {
        shared.outlet.held[table.index()]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|k| !held.contains(k));
    }
    ::metrics::histogram!(m::COMMIT_SECONDS, "table" => table.name())
        .record(committing.elapsed().as_secs_f64());
    let latest_times = buffer::latest_per_series(table, &sorted);
    ::metrics::gauge!(m::FLUSHED_SERIES, "table" => table.name()).set(latest_times.len() as f64);
    let (done, committed) = oneshot::channel();
    shared
        .command(Command::Committed {
            table,
            written: Some(Written {
                version,
                rows: sorted,
                revealed,
                retracted,
                latest: latest_times,
            }),
            positions,
            done,
        })
        .await?;
    committed.await.map_err(|_| LakeError::WriterStopped)?;
    drop(latest);
    read_others_through_own(shared, slot, &mut lake).await;
    drop(lake);
    published_covered(shared, table, feed_through);
    ::metrics::counter!(m::FLUSHED_ROWS, "table" => table.name()).increment(rows as u64);
    ::metrics::histogram!(m::FLUSH_SECONDS, "table" => table.name())
        .record(started.elapsed().as_secs_f64());
    info!(%table, rows, version, wal_seq = job.seq, elapsed = ?started.elapsed(), "committed flush to lake");
    Ok(())
}

/// While other writers' commits are followed (see [`crate::feed`]): every
/// `follow_interval`, the rows of their new commits to each table go to the feed, then
/// those they published (see [`crate::peers`]).
pub(crate) async fn tail_loop(shared: std::sync::Weak<Shared>) {
    loop {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        for slot in &shared.tables {
            if let Err(error) = tail_once(&shared, slot, false).await {
                ::metrics::counter!(m::TAIL_FAILURES, "table" => slot.table.name()).increment(1);
                tracing::warn!(table = %slot.table, %error, "reading other writers' commits failed; trying again");
            }
        }
        let interval = shared.config.follow_interval;
        drop(shared);
        tokio::time::sleep(interval).await;
    }
}

/// Hands the rows of other writers' commits to `slot`'s table since the last call to
/// the feed, then the rows other instances published since (see [`crate::peers`]);
/// with `wait`, returns once the writer emitted them (and whatever was handed to it
/// before).
pub(crate) async fn tail_once(
    shared: &Shared,
    slot: &TableSlot,
    wait: bool,
) -> Result<(), LakeError> {
    let mut lake = slot.lake.lock().await;
    let commits = lake.others_commits(true).await?;
    let through = lake.tailed();
    // Sent under the handle's lock: a flush's own reading of the log comes after.
    let (done, emitted) = oneshot::channel();
    let any = !commits.is_empty();
    hand_others(shared, slot, commits, through, Some(done)).await?;
    let mirrored = mirror_published(shared, slot, &mut lake).await;
    drop(lake);
    // Only commits can hold rows this writer holds: without any, the answer is not
    // waited for unless asked.
    if wait || any {
        let held = emitted.await.map_err(|_| LakeError::WriterStopped)?;
        if held {
            // Another writer committed rows this one holds too: its flush takes its
            // copies back now, and the tail (a test's follow) returns after it. A
            // failure is left to the flush loop, which reports and retries it.
            if let Err(error) = flush_once(shared).await {
                tracing::warn!(%error, "the flush after another writer committed rows held here too failed; the flush loop retries it");
                shared.outlet.flush_now.notify_one();
            }
        }
    }
    match mirrored {
        Ok(Some(done)) if wait => done.await.map_err(|_| LakeError::WriterStopped),
        Ok(_) => Ok(()),
        Err(error) => {
            ::metrics::counter!(m::MIRROR_FAILURES, "table" => slot.table.name()).increment(1);
            tracing::warn!(table = %slot.table, %error, "reading other instances' published rows failed; trying again");
            Ok(())
        }
    }
}

/// Hands other writers' `commits` (read through lake version `through`) to the writer,
/// after recording what of their published rows each covers; the caller holds the
/// table's handle.
async fn hand_others(
    shared: &Shared,
    slot: &TableSlot,
    commits: Vec<crate::lake::OtherCommit>,
    through: Option<i64>,
    done: Option<oneshot::Sender<bool>>,
) -> Result<(), LakeError> {
    {
        let mut follower = slot.follower.lock().await;
        for commit in &commits {
            if let (Some(writer), Some(cover)) = (&commit.writer, &commit.cover) {
                follower.covered(writer, cover);
            }
        }
    }
    shared
        .command(Command::Others {
            table: slot.table,
            commits,
            through,
            done,
        })
        .await
}

/// Published files read at once by a follower.
const READ_AT_ONCE: usize = 16;

/// Mirrors the rows other instances published of `slot`'s table and this process has
/// not read (see [`crate::peers`]); the caller holds the table's handle, whose
/// commits through its tailed version were handed on. Returns a receiver answered once
/// the writer showed them.
async fn mirror_published(
    shared: &Shared,
    slot: &TableSlot,
    lake: &mut crate::lake::TableLake,
) -> Result<Option<oneshot::Receiver<()>>, String> {
    let Some(publisher) = shared.publisher.get() else {
        return Ok(None);
    };
    let table = slot.table;
    let store = publisher.store.as_ref();
    let mut follower = slot.follower.lock().await;
    let (files, died) = follower
        .survey(store, table, &shared.writer_id, shared.clock.now())
        .await
        .map_err(|e| e.to_string())?;
    if !died.is_empty() {
        shared
            .command(Command::Forget { table, runs: died })
            .await
            .map_err(|e| e.to_string())?;
    }
    // Files are marked read only once their rows are handed on: a failure leaves them
    // (and every later one) for the next pass.
    let mut read = Vec::new();
    let mut failure = None;
    // Several GETs at once: a follower joining a writer with many files (a long
    // flush interval) holds the table's handle for a round trip per batch of them,
    // not per file.
    let fetched: Vec<_> = {
        use futures::StreamExt as _;
        let follower = &*follower;
        let files = &files;
        futures::stream::iter(0..files.len())
            .map(|i| follower.read(store, table, &files[i]))
            .buffered(READ_AT_ONCE)
            .collect()
            .await
    };
    for (file, fetched) in files.into_iter().zip(fetched) {
        match fetched {
            Ok(rows) => read.push((file, rows)),
            Err(crate::peers::ReadFailure::Bad(error)) => {
                ::metrics::counter!(m::MIRROR_FAILURES, "table" => table.name()).increment(1);
                tracing::warn!(%table, %error, "skipping a published rows file this version cannot read");
                follower.mark_read(&file);
            }
            Err(crate::peers::ReadFailure::Store(error)) => {
                failure = Some(error);
                break;
            }
        }
    }
    // Runs this process has seen no commit of: rows they may have committed before
    // are in the lake already (one check for all of them).
    let joining: Vec<RecordBatch> = read
        .iter()
        .filter(|(file, _)| file.joining)
        .flat_map(|(_, rows)| {
            rows.iter()
                .flat_map(|r| r.batches.iter().map(|(_, b)| b.clone()))
        })
        .collect();
    let existing = if joining.is_empty() {
        Default::default()
    } else {
        match lake.existing_points(&joining).await {
            Ok(existing) => existing,
            Err(error) => {
                // The joining files wait for the next pass; the others go on.
                read.retain(|(file, _)| !file.joining);
                failure.get_or_insert(error.to_string());
                Default::default()
            }
        }
    };
    let mut published = Vec::new();
    for (file, rows) in &mut read {
        let Some(mut rows) = rows.take() else {
            continue;
        };
        if file.joining && !existing.is_empty() {
            rows.batches = rows
                .batches
                .into_iter()
                .flat_map(|(seq, batch)| {
                    without_points(table, vec![batch], &existing)
                        .into_iter()
                        .map(move |b| (seq, b))
                })
                .collect();
        }
        if !rows.batches.is_empty() {
            // Keyed here, not on the writer's thread.
            published.push(rows.with_points(table));
        }
    }
    let shown = if published.is_empty() {
        None
    } else {
        let (done, shown) = oneshot::channel();
        shared
            .command(Command::Mirror {
                table,
                published,
                done: Some(done),
            })
            .await
            .map_err(|e| e.to_string())?;
        Some(shown)
    };
    for (file, _) in &read {
        follower.mark_read(file);
    }
    match failure {
        Some(error) if shown.is_none() => Err(error),
        Some(error) => {
            ::metrics::counter!(m::MIRROR_FAILURES, "table" => table.name()).increment(1);
            tracing::warn!(%table, %error, "reading other instances' published rows failed; trying again");
            Ok(shown)
        }
        None => Ok(shown),
    }
}

/// After this writer's commit, while following: hands on other writers' commits up to
/// it, so readers of the new version need not wait for the next tail to know which
/// mirrored rows it holds (see [`crate::peers::MirrorView::visible`]). A failure is
/// left to the tail.
async fn read_others_through_own(
    shared: &Shared,
    slot: &TableSlot,
    lake: &mut crate::lake::TableLake,
) {
    if !shared.following.load(std::sync::atomic::Ordering::Acquire) {
        return;
    }
    let handed = match lake.others_commits(false).await {
        Ok(commits) => {
            let through = lake.tailed();
            hand_others(shared, slot, commits, through, None).await
        }
        Err(error) => Err(error),
    };
    if let Err(error) = handed {
        ::metrics::counter!(m::TAIL_FAILURES, "table" => slot.table.name()).increment(1);
        tracing::warn!(table = %slot.table, %error, "reading other writers' commits after a flush failed; the tail will");
    }
}

/// This run's commit of `table` covered its published rows through feed number
/// `through`: the files go (in the background).
fn published_covered(shared: &Shared, table: fleetlake_model::Table, through: u64) {
    if let Some(publisher) = shared.publisher.get() {
        let publisher = std::sync::Arc::clone(publisher);
        tokio::spawn(async move { publisher.committed(table, through).await });
    }
}

/// Publishes this process's rows for the other instances each `interval` (see
/// [`crate::peers`]), until the feed closes.
pub(crate) async fn publish_loop(
    publisher: std::sync::Weak<crate::peers::Publisher>,
    interval: Duration,
) {
    loop {
        tokio::time::sleep(interval).await;
        let Some(publisher) = publisher.upgrade() else {
            return;
        };
        if !publisher.publish_new().await {
            return;
        }
    }
}
