//! Where alert state lives between rounds: one file per rule group and one for
//! silences, each written whole (write, fsync, rename, fsync the directory).
//!
//! ```text
//!  <state_dir>/groups/<name>-<hash>.json   a group's instances, its outbox, its
//!                                           transitions not yet in the `alerts` table
//!                                           and their sequence numbers
//!  <state_dir>/silences.json               silences
//! ```
//!
//! A round saves only its own group's file, so a group of 71,000 pending instances
//! evaluated every second does not make a 1,000-rule group's round write it too, and a
//! group's state is one unit that can move to whichever instance evaluates the group.
//! Each group's transitions go to the `alerts` table under an application id of its
//! own, made when its file is (`fleetlake.alerts/<group>/<random>`): a file deleted
//! or restored from a backup starts a new id, so its sequence numbers are never
//! mistaken for ones the table already holds. Files of groups no longer configured
//! keep their undelivered notifications and unwritten transitions until both are
//! out, then are deleted. A state file of before group files (`alert-state.json`,
//! one for all groups) is split into group files at start.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::engine::{RuleState, Silence};
use crate::error::AlertError;
use crate::notify::Message;
use crate::rules::RuleGroup;
use crate::table::TransitionRow;

/// The application id of transitions queued before group files: one sequence for
/// every group.
pub const LEGACY_APP_ID: &str = "fleetlake.alerts";

/// The state file of before group files.
const LEGACY_FILE: &str = "alert-state.json";

/// Evaluations' transitions by sequence number, rising.
pub(crate) type Unwritten = Vec<(u64, Vec<TransitionRow>)>;

/// One rule group's state, as its file holds it.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct GroupState {
    /// The group's name (empty for what remains of a state of before group files).
    pub(crate) group: String,
    /// The application id of its transitions in the `alerts` table.
    pub(crate) app_id: String,
    /// Its last save's version in [`SharedStates`] (0 in a data directory).
    #[serde(default)]
    pub(crate) version: u64,
    /// The last sequence number given to an evaluation's transitions.
    pub(crate) seq: u64,
    /// The last outbox message id given.
    pub(crate) next_message: u64,
    /// Its rules' instances, by alert name.
    pub(crate) rules: BTreeMap<String, RuleState>,
    /// Notifications not yet accepted, by receiver, in order.
    pub(crate) outbox: BTreeMap<String, VecDeque<Message>>,
    /// Transitions not yet known to be in the `alerts` table, by sequence number.
    pub(crate) unwritten: Unwritten,
    /// The last message id the file holds: later ones are not delivered until a
    /// save holds them.
    #[serde(skip)]
    pub(crate) saved_through: u64,
    /// The last sequence number the file holds: later ones are not written to the
    /// `alerts` table until a save holds them (a restart would give their numbers
    /// to other transitions, which the table would then take for written).
    #[serde(skip)]
    pub(crate) saved_seq: u64,
    /// When it was last saved (epoch ms).
    #[serde(skip)]
    pub(crate) saved_at_ms: i64,
    /// A change that must survive a restart (an instance fired or resolved, a
    /// notification was queued or delivered, a fleet incident began or ended) is
    /// not saved yet: nothing of the group is sent until it is.
    #[serde(skip)]
    pub(crate) must_save: bool,
}

impl GroupState {
    /// A new group's state, with a new application id.
    pub(crate) fn new(group: &str) -> Result<Self, AlertError> {
        Ok(Self {
            group: group.to_string(),
            app_id: new_app_id(group)?,
            ..Self::default()
        })
    }

    /// Marks what was loaded from its file as saved.
    fn loaded(mut self) -> Self {
        self.saved_through = self.next_message;
        self.saved_seq = self.seq;
        self
    }

    /// Whether nothing is left to send or write.
    pub(crate) fn drained(&self) -> bool {
        self.outbox.values().all(VecDeque::is_empty) && self.unwritten.is_empty()
    }

    /// Counts a save that held everything up to now.
    pub(crate) fn saved(&mut self, now: i64) {
        self.saved_as_of(self.next_message, self.seq, now);
        self.must_save = false;
    }

    /// Counts a save that held messages up to `next_message` and transitions up to
    /// `seq` (what was queued while it was being written is not saved yet).
    pub(crate) fn saved_as_of(&mut self, next_message: u64, seq: u64, now: i64) {
        self.saved_through = self.saved_through.max(next_message);
        self.saved_seq = self.saved_seq.max(seq);
        self.saved_at_ms = now;
    }

    /// Reads a group's state from what a save wrote; `None` when it is another
    /// group's.
    pub(crate) fn from_saved(group: &RuleGroup, bytes: &[u8]) -> Result<Self, std::io::Error> {
        let state: Self = serde_json::from_slice(bytes)?;
        if state.group != group.name {
            return Err(std::io::Error::other(format!(
                "the state holds group {:?}, not {:?}",
                state.group, group.name
            )));
        }
        let mut state = state.loaded();
        state
            .rules
            .retain(|alert, _| group.rules.iter().any(|r| &r.alert == alert));
        Ok(state)
    }
}

/// Where rule groups' states are kept when several instances share the groups.
#[async_trait]
pub trait SharedStates: Send + Sync + 'static {
    /// The newest version of state `name` (a group's file name) and its bytes.
    async fn latest(&self, name: &str) -> Result<Option<(u64, Vec<u8>)>, AlertError>;
    /// Creates version `version` of state `name`, unless it exists already (another
    /// instance saved it): then `false`. Versions before the previous one may go.
    async fn create(&self, name: &str, version: u64, bytes: Vec<u8>) -> Result<bool, AlertError>;
}

/// Which rule groups this instance evaluates now: with several instances, each group
/// is evaluated by the holder of its lease only.
pub trait GroupLeases: Send + Sync + 'static {
    /// Whether this instance holds `group`'s lease now, with time to spare before
    /// another instance may take it.
    fn holds(&self, group: &str) -> bool;
}

/// [`SharedStates`] in a directory that instances on one host share (a lake on a
/// local disk): version `v` of a state is `<name>/<v, 20 digits>.json`, made by
/// hard-linking a written and fsynced temporary file to that name, which fails when
/// the version exists.
#[derive(Debug, Clone)]
pub struct DirStates {
    dir: PathBuf,
}

impl DirStates {
    /// States under `dir` (made when first written).
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    fn versions(dir: &Path) -> std::io::Result<Vec<u64>> {
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut versions = Vec::new();
        for entry in entries {
            let name = entry?.file_name();
            let name = name.to_string_lossy();
            if let Some(v) = name.strip_suffix(".json").and_then(|v| v.parse().ok()) {
                versions.push(v);
            }
        }
        versions.sort_unstable();
        Ok(versions)
    }
}

#[async_trait]
impl SharedStates for DirStates {
    async fn latest(&self, name: &str) -> Result<Option<(u64, Vec<u8>)>, AlertError> {
        let dir = self.dir.join(name);
        let state = |source| AlertError::State {
            path: dir.clone(),
            source,
        };
        let Some(&version) = Self::versions(&dir).map_err(state)?.last() else {
            return Ok(None);
        };
        let bytes = std::fs::read(dir.join(format!("{version:020}.json"))).map_err(state)?;
        Ok(Some((version, bytes)))
    }

    async fn create(&self, name: &str, version: u64, bytes: Vec<u8>) -> Result<bool, AlertError> {
        use std::io::Write;
        let dir = self.dir.join(name);
        let path = dir.join(format!("{version:020}.json"));
        let state = |source| AlertError::State {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(state)?;
        let random = getrandom::u64().map_err(|e| state(std::io::Error::other(e.to_string())))?;
        let tmp = dir.join(format!(".{version}-{random:016x}.tmp"));
        let written = (|| {
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(&bytes)?;
            file.sync_all()
        })();
        let linked = written.and_then(|()| std::fs::hard_link(&tmp, &path));
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
            Err(e) => return Err(state(e)),
        }
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(state)?;
        for old in Self::versions(&dir).map_err(state)? {
            if old + 1 < version {
                let _ = std::fs::remove_file(dir.join(format!("{old:020}.json")));
            }
        }
        Ok(true)
    }
}

/// The name of the silences in [`SharedStates`] (no group's file name: those end in
/// a hash).
pub const SILENCES: &str = "silences";

/// Silences, as `silences.json` holds them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Silences {
    /// The last number given to a silence's id.
    pub(crate) next: u64,
    /// Its version in [`SharedStates`] (0 in a data directory).
    #[serde(default)]
    pub(crate) version: u64,
    /// The silences (shared with the rounds that read them).
    pub(crate) list: Arc<Vec<Silence>>,
}

/// A group state file that belongs to no configured group: its outbox and
/// transitions are delivered, then it is deleted.
pub(crate) struct Orphan {
    /// Its file.
    pub(crate) path: PathBuf,
    /// What it holds.
    pub(crate) state: GroupState,
}

/// What [`load`] found.
pub(crate) struct Loaded {
    /// Each configured group's state, in the order of the groups.
    pub(crate) groups: Vec<(PathBuf, GroupState)>,
    /// States of groups no longer configured, with something left to deliver.
    pub(crate) orphans: Vec<Orphan>,
    /// The silences.
    pub(crate) silences: Silences,
    /// Where they are saved.
    pub(crate) silences_path: PathBuf,
}

/// The file name of group `name`'s state: its name made safe for a file name (at
/// most 48 characters), then a hash of the whole name.
pub(crate) fn group_file(name: &str) -> String {
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(48)
        .collect();
    format!(
        "{safe}-{:016x}.json",
        xxhash_rust::xxh3::xxh3_64(name.as_bytes())
    )
}

fn new_app_id(group: &str) -> Result<String, AlertError> {
    let random = getrandom::u64()
        .map_err(|e| AlertError::Invalid(format!("no random source for an application id: {e}")))?;
    Ok(format!("{LEGACY_APP_ID}/{group}/{random:016x}"))
}

/// Writes `path` by `write`-ing a temporary file beside it, fsyncing it and renaming
/// it over `path` (then fsyncing the directory).
pub(crate) fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut dyn std::io::Write) -> std::io::Result<()>,
) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    // Written as it is serialized: a state of many instances is tens of megabytes,
    // which need not be held in memory first.
    let mut file = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp)?);
    write(&mut file)?;
    file.flush()?;
    file.get_ref().sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    sync_dir(path)
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

/// Writes `value` as JSON to `path`, atomically.
pub(crate) fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), AlertError> {
    write_atomically(path, |out| {
        serde_json::to_writer(out, value).map_err(std::io::Error::other)
    })
    .map_err(|source| AlertError::State {
        path: path.to_path_buf(),
        source,
    })
}

/// Deletes `path` (and makes that durable); a file already gone is fine.
pub(crate) fn remove(path: &Path) -> Result<(), AlertError> {
    let state = |source| AlertError::State {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::remove_file(path) {
        Ok(()) => sync_dir(path).map_err(state),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(state(e)),
    }
}

fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, AlertError> {
    let unreadable = |source: std::io::Error| AlertError::State {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| unreadable(std::io::Error::from(e))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(unreadable(e)),
    }
}

/// The state file of before group files.
#[derive(Deserialize)]
struct LegacyState {
    seq: u64,
    next_message: u64,
    /// By `<group>/<alert>`.
    rules: BTreeMap<String, RuleState>,
    outbox: BTreeMap<String, VecDeque<Message>>,
    unwritten: Unwritten,
    silences: Vec<Silence>,
}

/// Splits a state file of before group files into group files, then deletes it.
/// Its outbox and unwritten transitions (queued under [`LEGACY_APP_ID`]'s sequence)
/// become a file of their own that drains like a removed group's. Run again after a
/// crash half way, it writes the same files again.
fn migrate(dir: &Path, groups_dir: &Path, groups: &[RuleGroup]) -> Result<(), AlertError> {
    let path = dir.join(LEGACY_FILE);
    let Some(mut legacy) = read_json::<LegacyState>(&path)? else {
        return Ok(());
    };
    for group in groups {
        let mut state = GroupState::new(&group.name)?;
        for rule in &group.rules {
            if let Some(rs) = legacy
                .rules
                .remove(&format!("{}/{}", group.name, rule.alert))
            {
                state.rules.insert(rule.alert.clone(), rs);
            }
        }
        if !state.rules.is_empty() {
            write_json(&groups_dir.join(group_file(&group.name)), &state)?;
        }
    }
    let rest = GroupState {
        group: String::new(),
        app_id: LEGACY_APP_ID.to_string(),
        seq: legacy.seq,
        next_message: legacy.next_message,
        outbox: legacy.outbox,
        unwritten: legacy.unwritten,
        ..GroupState::default()
    };
    if !rest.drained() {
        write_json(&groups_dir.join("legacy.json"), &rest)?;
    }
    let silences = Silences {
        next: legacy.next_message,
        version: 0,
        list: Arc::new(legacy.silences),
    };
    write_json(&dir.join("silences.json"), &silences)?;
    remove(&path)?;
    info!(path = %path.display(), "alert state split into one file per rule group");
    Ok(())
}

/// Loads the state of every group in `groups` (a new one for a group without a
/// file), the silences, and the files of groups no longer configured that still
/// have something to deliver (the others are deleted). Rules no longer configured are
/// forgotten (their alerts no longer exist).
pub(crate) fn load(dir: &Path, groups: &[RuleGroup]) -> Result<Loaded, AlertError> {
    let groups_dir = dir.join("groups");
    std::fs::create_dir_all(&groups_dir).map_err(|source| AlertError::State {
        path: groups_dir.clone(),
        source,
    })?;
    migrate(dir, &groups_dir, groups)?;
    let silences_path = dir.join("silences.json");
    let silences = read_json(&silences_path)?.unwrap_or_default();

    let mut loaded = Vec::with_capacity(groups.len());
    let mut mine = BTreeSet::new();
    for group in groups {
        let path = groups_dir.join(group_file(&group.name));
        let state = match read_json::<GroupState>(&path)? {
            Some(state) if state.group == group.name => {
                let mut state = state.loaded();
                state
                    .rules
                    .retain(|alert, _| group.rules.iter().any(|r| &r.alert == alert));
                state
            }
            Some(other) => {
                return Err(AlertError::State {
                    path,
                    source: std::io::Error::other(format!(
                        "the file holds group {:?}, not {:?}",
                        other.group, group.name
                    )),
                });
            }
            None => GroupState::new(&group.name)?,
        };
        mine.insert(path.clone());
        loaded.push((path, state));
    }

    let mut orphans = Vec::new();
    let entries = std::fs::read_dir(&groups_dir).map_err(|source| AlertError::State {
        path: groups_dir.clone(),
        source,
    })?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json") && !mine.contains(p))
        .collect();
    paths.sort();
    for path in paths {
        let Some(state) = read_json::<GroupState>(&path)? else {
            continue;
        };
        let mut state = state.loaded();
        state.rules.clear();
        if state.drained() {
            remove(&path)?;
            continue;
        }
        for (receiver, queue) in &state.outbox {
            if !queue.is_empty() {
                warn!(group = %state.group, %receiver, messages = queue.len(), "a rule group no longer configured still has notifications queued: delivering them");
            }
        }
        orphans.push(Orphan { path, state });
    }
    Ok(Loaded {
        groups: loaded,
        orphans,
        silences,
        silences_path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_files_are_safe_distinct_and_bounded() {
        let a = group_file("lambda/errors ../x");
        assert!(a.starts_with("lambda_errors____x-") && a.ends_with(".json"));
        assert!(!a.contains('/'));
        assert_ne!(group_file("a/b"), group_file("a_b"));
        assert!(group_file(&"é".repeat(500)).len() < 80);
        assert_eq!(group_file("g"), group_file("g"));
    }
}
