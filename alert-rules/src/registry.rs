//! The account registry: the platform's account records, one JSON object per account
//! (a JSON array, or JSON lines), loaded at start and reloaded when the file changes.
//!
//! It is the `accounts` table for joins, adds `account_name`, `environment` and
//! `owner_team` to every alert about an account, and keeps accounts that are not
//! `active` (retired, suspended) from paging anyone.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use arrow::array::{ArrayRef, RecordBatch, StringBuilder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use serde::{Deserialize, Serialize};

use crate::error::AlertError;

/// The registry's fields, in the order of the `accounts` table's columns.
pub const FIELDS: [&str; 10] = [
    "account_id",
    "account_name",
    "environment",
    "workload_type",
    "owner_team",
    "cost_center",
    "compliance_scope",
    "automation_level",
    "created_by",
    "lifecycle_state",
];

/// The registry fields every alert about an account gets as labels.
pub const LABEL_FIELDS: [&str; 3] = ["account_name", "environment", "owner_team"];

/// One account's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// The 12-digit AWS account id.
    pub account_id: String,
    /// Other fields (`account_name`, `owner_team`, `lifecycle_state`, …), as strings.
    #[serde(flatten)]
    pub fields: BTreeMap<String, serde_json::Value>,
}

impl Account {
    /// Field `name` as text (`account_id` included).
    pub fn get(&self, name: &str) -> Option<String> {
        if name == "account_id" {
            return Some(self.account_id.clone());
        }
        match self.fields.get(name)? {
            serde_json::Value::Null => None,
            serde_json::Value::String(s) => Some(s.clone()),
            other => Some(other.to_string()),
        }
    }

    /// Whether the account may page: its `lifecycle_state` is `active` (or unset).
    pub fn is_active(&self) -> bool {
        self.get("lifecycle_state")
            .is_none_or(|s| s.eq_ignore_ascii_case("active"))
    }
}

/// The registry as loaded at one time.
#[derive(Debug, Default)]
pub struct Snapshot {
    accounts: BTreeMap<String, Account>,
}

impl Snapshot {
    /// Parses a registry file's text: a JSON array of records, or one record per line.
    /// Errors are [`AlertError::Registry`] without a file name (the caller knows it).
    pub fn parse(text: &str) -> Result<Self, AlertError> {
        let bad = |line: Option<usize>, message: String| AlertError::Registry {
            file: PathBuf::new(),
            line,
            message,
        };
        let trimmed = text.trim_start();
        let records: Vec<Account> = if trimmed.starts_with('[') {
            serde_json::from_str(text).map_err(|e| bad(Some(e.line()), e.to_string()))?
        } else {
            let mut records = Vec::new();
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                records
                    .push(serde_json::from_str(line).map_err(|e| bad(Some(i + 1), e.to_string()))?);
            }
            records
        };
        let mut accounts = BTreeMap::new();
        for record in records {
            if record.account_id.trim().is_empty() {
                return Err(bad(None, "a record has an empty account_id".into()));
            }
            if let Some(old) = accounts.insert(record.account_id.clone(), record) {
                return Err(bad(
                    None,
                    format!("account {} appears twice", old.account_id),
                ));
            }
        }
        Ok(Self { accounts })
    }

    /// The record of `account_id`.
    pub fn get(&self, account_id: &str) -> Option<&Account> {
        self.accounts.get(account_id)
    }

    /// Number of accounts.
    pub fn len(&self) -> usize {
        self.accounts.len()
    }

    /// Whether there are no accounts.
    pub fn is_empty(&self) -> bool {
        self.accounts.is_empty()
    }

    /// Every account.
    pub fn accounts(&self) -> impl Iterator<Item = &Account> {
        self.accounts.values()
    }

    /// The `accounts` table.
    pub fn to_batch(&self) -> RecordBatch {
        let columns: Vec<ArrayRef> = FIELDS
            .iter()
            .map(|field| {
                let mut b = StringBuilder::new();
                for account in self.accounts.values() {
                    b.append_option(account.get(field));
                }
                Arc::new(b.finish()) as ArrayRef
            })
            .collect();
        RecordBatch::try_new(schema(), columns).expect("columns match the schema")
    }
}

/// Schema of the `accounts` table.
pub fn schema() -> SchemaRef {
    Arc::new(Schema::new(
        FIELDS
            .iter()
            .map(|f| Field::new(*f, DataType::Utf8, *f != "account_id"))
            .collect::<Vec<_>>(),
    ))
}

/// The registry, reloaded when its file changes.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    current: Arc<RwLock<Arc<Snapshot>>>,
    file: Option<PathBuf>,
    modified: Arc<RwLock<Option<SystemTime>>>,
}

impl Registry {
    /// A registry with no accounts (no file configured).
    pub fn empty() -> Self {
        Self::default()
    }

    /// Loads `file`; fails if it cannot be read or parsed.
    pub fn load(file: &Path) -> Result<Self, AlertError> {
        let registry = Self {
            file: Some(file.to_path_buf()),
            ..Self::default()
        };
        registry.reload()?;
        Ok(registry)
    }

    /// The accounts as loaded last.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        Arc::clone(&self.current.read().expect("registry lock"))
    }

    /// Reads the file again if it changed since it was last read. `Ok(true)` when a new
    /// version was loaded; on error the previous version stays.
    pub fn reload(&self) -> Result<bool, AlertError> {
        let Some(file) = &self.file else {
            return Ok(false);
        };
        let unreadable = |e: std::io::Error| AlertError::Registry {
            file: file.clone(),
            line: None,
            message: e.to_string(),
        };
        let modified = std::fs::metadata(file)
            .and_then(|m| m.modified())
            .map_err(unreadable)?;
        if *self.modified.read().expect("registry lock") == Some(modified) {
            return Ok(false);
        }
        let text = std::fs::read_to_string(file).map_err(unreadable)?;
        let snapshot = Snapshot::parse(&text).map_err(|e| match e {
            AlertError::Registry { line, message, .. } => AlertError::Registry {
                file: file.clone(),
                line,
                message,
            },
            other => other,
        })?;
        let count = snapshot.len();
        *self.current.write().expect("registry lock") = Arc::new(snapshot);
        *self.modified.write().expect("registry lock") = Some(modified);
        metrics::gauge!("fleetlake_registry_accounts").set(count as f64);
        Ok(true)
    }

    /// Reloads the file every `period` until the process ends.
    pub fn watch(&self, period: Duration) {
        if self.file.is_none() {
            return;
        }
        let registry = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                match registry.reload() {
                    Ok(true) => tracing::info!(
                        accounts = registry.snapshot().len(),
                        "account registry reloaded"
                    ),
                    Ok(false) => {}
                    Err(error) => {
                        metrics::counter!("fleetlake_registry_reload_errors_total").increment(1);
                        tracing::warn!(%error, "keeping the previous account registry");
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_and_arrays_load_and_reload_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("accounts.jsonl");
        std::fs::write(
            &file,
            "{\"account_id\":\"111111111111\",\"account_name\":\"a\",\"owner_team\":\"payments\",\"lifecycle_state\":\"active\"}\n\
             {\"account_id\":\"222222222222\",\"account_name\":\"b\",\"lifecycle_state\":\"suspended\"}\n",
        )
        .unwrap();
        let registry = Registry::load(&file).unwrap();
        let snap = registry.snapshot();
        assert_eq!(snap.len(), 2);
        assert!(snap.get("111111111111").unwrap().is_active());
        assert!(!snap.get("222222222222").unwrap().is_active());
        let batch = snap.to_batch();
        assert_eq!(batch.num_rows(), 2);
        assert_eq!(batch.schema().field(4).name(), "owner_team");

        // A broken file keeps the previous version.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&file, "{not json\n").unwrap();
        let err = registry.reload().unwrap_err();
        assert!(
            matches!(&err, AlertError::Registry { file: f, line: Some(1), .. } if f == &file),
            "{err:?}"
        );
        assert!(err.to_string().contains("line 1"), "{err}");
        assert_eq!(registry.snapshot().len(), 2);

        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&file, "[{\"account_id\":\"333333333333\"}]").unwrap();
        assert!(registry.reload().unwrap());
        assert_eq!(registry.snapshot().len(), 1);
        assert!(!registry.reload().unwrap());
    }

    #[test]
    fn duplicate_accounts_are_refused() {
        let e = Snapshot::parse("{\"account_id\":\"1\"}\n{\"account_id\":\"1\"}\n").unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
    }
}
