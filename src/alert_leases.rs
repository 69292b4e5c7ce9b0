//! Rule groups shared by several instances: each group is evaluated by the holder of
//! its lease (`alert-group/<name>` in the Kinesis lease table), and its state is kept
//! beside the lake, where whichever instance takes the lease next finds it.
//!
//! Leases work as the Kinesis consumer's shard leases do (`fleetlake_ingest::lease`):
//! conditional writes on a counter, renewed every third of the lease duration, taken
//! from an owner whose counter has not moved for a whole duration. Each instance keeps
//! a heartbeat (`alert-instance/<owner>`) so that every instance knows how many are
//! alive and holds only its share of the groups (one more than its share is given
//! back, a lease per cycle). An instance evaluates a group only while its last renewal
//! is less than two thirds of the duration old, so it stops before another instance
//! may take the lease; and a state save that finds a newer version than the one it
//! loaded (another instance's) makes it let the group go (see
//! `fleetlake_alert_rules::store`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_trait::async_trait;
use deltalake::logstore::object_store::{
    self, ObjectStore, ObjectStoreExt, PutMode, PutOptions, path::Path,
};
use fleetlake_alert_rules::{AlertError, GroupLeases, SharedStates};
use fleetlake_ingest::lease::{LeaseSettings, LeaseWatch};
use futures::TryStreamExt;
use tracing::{info, warn};

/// Key of a rule group's lease.
fn group_key(group: &str) -> String {
    format!("alert-group/{group}")
}

/// Key of an instance's alerting heartbeat.
fn heartbeat_key(owner: &str) -> String {
    format!("alert-instance/{owner}")
}

/// Takes, renews and gives back this instance's share of the rule groups' leases.
pub(crate) struct GroupLeaseKeeper {
    settings: LeaseSettings,
    groups: Vec<String>,
    /// Held group leases: counter and when it was last taken or renewed.
    held: Mutex<HashMap<String, (i64, Instant)>>,
}

impl GroupLeases for GroupLeaseKeeper {
    fn holds(&self, group: &str) -> bool {
        let margin = self.settings.duration * 2 / 3;
        self.held
            .lock()
            .expect("group leases lock")
            .get(group)
            .is_some_and(|(_, at)| at.elapsed() < margin)
    }
}

impl GroupLeaseKeeper {
    /// A keeper of `groups`' leases in `settings`' table.
    pub(crate) fn new(settings: LeaseSettings, groups: Vec<String>) -> Self {
        Self {
            settings,
            groups,
            held: Mutex::default(),
        }
    }

    /// Keeps the leases until the process ends.
    pub(crate) async fn run(self: Arc<Self>) {
        if let Err(error) = self.settings.store.ensure_table().await {
            warn!(%error, "the lease table cannot be made ready; trying again");
        }
        info!(owner = %self.settings.owner, groups = self.groups.len(), "sharing rule groups through leases");
        let mut watch = LeaseWatch::default();
        let mut heartbeat: Option<i64> = None;
        loop {
            if let Err(error) = self.cycle(&mut watch, &mut heartbeat).await {
                metrics::counter!("fleetlake_alert_lease_errors_total").increment(1);
                warn!(%error, "rule group leases: the lease table did not answer; trying again");
            }
            let held = self.held.lock().expect("group leases lock").len();
            metrics::gauge!("fleetlake_alert_groups_held").set(held as f64);
            tokio::time::sleep(self.settings.duration / 3).await;
        }
    }

    async fn cycle(
        &self,
        watch: &mut LeaseWatch,
        heartbeat: &mut Option<i64>,
    ) -> Result<(), fleetlake_ingest::kinesis::ApiError> {
        let store = &self.settings.store;
        let owner = self.settings.owner.as_str();
        let duration = self.settings.duration;
        let me = heartbeat_key(owner);
        *heartbeat = match *heartbeat {
            Some(counter) => store.renew(&me, owner, counter).await?,
            None => None,
        };

        // Renew what is held; a lease renewed by no one else is still ours.
        let held: Vec<(String, i64)> = self
            .held
            .lock()
            .expect("group leases lock")
            .iter()
            .map(|(g, (c, _))| (g.clone(), *c))
            .collect();
        // All at once: an instance holding hundreds of groups renews them within the
        // cycle, not one round trip after another.
        let keys: Vec<String> = held.iter().map(|(group, _)| group_key(group)).collect();
        let renewals = futures::future::join_all(
            keys.iter()
                .zip(&held)
                .map(|(key, (_, counter))| store.renew(key, owner, *counter)),
        )
        .await;
        // Every answer is recorded (a renewal that went through moved the counter)
        // before a failed one ends the cycle.
        let mut failed = None;
        for ((group, _), renewed) in held.into_iter().zip(renewals) {
            let mut map = self.held.lock().expect("group leases lock");
            match renewed {
                Ok(Some(counter)) => {
                    map.insert(group, (counter, Instant::now()));
                }
                Ok(None) => {
                    map.remove(&group);
                    metrics::counter!("fleetlake_alert_leases_lost_total").increment(1);
                    warn!(%group, "rule group lease taken by another instance");
                }
                Err(error) => failed = Some(error),
            }
        }
        if let Some(error) = failed {
            return Err(error);
        }

        let leases = store.list().await?;
        let now = Instant::now();
        watch.observe(&leases, now);
        if heartbeat.is_none() {
            let seen = leases.iter().find(|l| l.key == me).map(|l| l.counter);
            *heartbeat = store.take(&me, owner, seen).await?;
        }
        let live = leases
            .iter()
            .filter(|l| l.key.starts_with("alert-instance/"))
            .filter(|l| l.key == me || watch.is_live(l, duration, now))
            .count()
            .max(1);
        let share = self.groups.len().div_ceil(live);
        let by_key: HashMap<&str, _> = leases.iter().map(|l| (l.key.as_str(), l)).collect();
        for group in &self.groups {
            if self.held.lock().expect("group leases lock").len() >= share {
                break;
            }
            if self
                .held
                .lock()
                .expect("group leases lock")
                .contains_key(group)
            {
                continue;
            }
            let key = group_key(group);
            let taken = match by_key.get(key.as_str()) {
                None => store.take(&key, owner, None).await?,
                Some(lease) if !watch.is_live(lease, duration, now) => {
                    store.take(&key, owner, Some(lease.counter)).await?
                }
                Some(_) => None,
            };
            if let Some(counter) = taken {
                info!(%group, "took the rule group's lease");
                self.held
                    .lock()
                    .expect("group leases lock")
                    .insert(group.clone(), (counter, Instant::now()));
            }
        }
        // More than a share (an instance joined): one lease back per cycle.
        let surplus = {
            let map = self.held.lock().expect("group leases lock");
            (map.len() > share)
                .then(|| map.iter().next().map(|(g, (c, _))| (g.clone(), *c)))
                .flatten()
        };
        if let Some((group, counter)) = surplus {
            self.held.lock().expect("group leases lock").remove(&group);
            if store.release(&group_key(&group), owner, counter).await? {
                info!(%group, share, "gave the rule group's lease back for another instance");
            }
        }
        Ok(())
    }
}

/// [`SharedStates`] in an object store (the lake's bucket): version `v` of a state is
/// `<name>/<v, 20 digits>.json`, written with `If-None-Match: *` (object_store's
/// `PutMode::Create`), so only one writer makes each version.
pub(crate) struct ObjectStates {
    store: Arc<dyn ObjectStore>,
}

impl ObjectStates {
    /// States in `store` (rooted where they go).
    pub(crate) fn new(store: Arc<dyn ObjectStore>) -> Self {
        Self { store }
    }

    async fn versions(&self, name: &str) -> Result<Vec<u64>, object_store::Error> {
        let prefix = Path::from(name);
        let listed: Vec<_> = self.store.list(Some(&prefix)).try_collect().await?;
        let mut versions: Vec<u64> = listed
            .iter()
            .filter_map(|meta| {
                meta.location
                    .filename()?
                    .strip_suffix(".json")?
                    .parse()
                    .ok()
            })
            .collect();
        versions.sort_unstable();
        Ok(versions)
    }
}

fn version_path(name: &str, version: u64) -> Path {
    Path::from(format!("{name}/{version:020}.json"))
}

fn unavailable(e: impl std::fmt::Display) -> AlertError {
    AlertError::Unavailable(format!("rule group state store: {e}"))
}

#[async_trait]
impl SharedStates for ObjectStates {
    async fn latest(&self, name: &str) -> Result<Option<(u64, Vec<u8>)>, AlertError> {
        let Some(&version) = self.versions(name).await.map_err(unavailable)?.last() else {
            return Ok(None);
        };
        let got = self
            .store
            .get(&version_path(name, version))
            .await
            .map_err(unavailable)?;
        let bytes = got.bytes().await.map_err(unavailable)?;
        Ok(Some((version, bytes.to_vec())))
    }

    async fn create(&self, name: &str, version: u64, bytes: Vec<u8>) -> Result<bool, AlertError> {
        let options = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        match self
            .store
            .put_opts(&version_path(name, version), bytes.into(), options)
            .await
        {
            Ok(_) => {}
            Err(object_store::Error::AlreadyExists { .. }) => return Ok(false),
            Err(e) => return Err(unavailable(e)),
        }
        // Older versions than the previous one are not read again.
        if let Ok(versions) = self.versions(name).await {
            for old in versions.into_iter().filter(|v| v + 1 < version) {
                let _ = self.store.delete(&version_path(name, old)).await;
            }
        }
        Ok(true)
    }
}
