//! The account registry: the platform's account records, one JSON object per account
//! (a JSON array, or JSON lines), loaded at start and reloaded when the file changes.
//!
//! It is the `accounts` table for joins, adds `account_name`, `environment` and
//! `owner_team` to every alert about an account, and keeps accounts that are not
//! `active` (retired, suspended) from paging anyone.
//!
//! Fields besides the standard ones ([`FIELDS`]) become columns of `accounts` too, typed
//! from their values: `BIGINT` if every value is an integer, `DOUBLE` if every value is
//! a number, `BOOLEAN` if every value is `true`/`false`, text otherwise. So a rule can
//! compare with an account's own threshold (`a.error_rate_threshold`), and templates
//! read every field of the alert's account as `$account.<field>`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use arrow::array::{
    ArrayRef, BooleanBuilder, Float64Builder, Int64Builder, RecordBatch, StringBuilder,
};
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

/// At most this many fields besides [`FIELDS`] over the whole registry: each is a
/// column of `accounts`.
pub const MAX_EXTRA_FIELDS: usize = 256;

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
        match self.fields.get("lifecycle_state") {
            None | Some(serde_json::Value::Null) => true,
            Some(serde_json::Value::String(s)) => s.eq_ignore_ascii_case("active"),
            Some(_) => false,
        }
    }
}

/// The registry as loaded at one time.
#[derive(Debug, Default)]
pub struct Snapshot {
    accounts: BTreeMap<String, Account>,
    /// Fields besides [`FIELDS`], by name, with their column types.
    extra: Vec<(String, DataType)>,
    /// The `accounts` table and the number of active accounts, made once: every
    /// rule that joins `accounts` reads the table, every rule's round counts them.
    batch: std::sync::OnceLock<RecordBatch>,
    active: std::sync::OnceLock<usize>,
}

/// What the values of one field have been so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Integer,
    Number,
    Boolean,
    Text,
}

impl Kind {
    fn of(value: &serde_json::Value) -> Option<Kind> {
        match value {
            serde_json::Value::Null => None,
            serde_json::Value::Bool(_) => Some(Kind::Boolean),
            serde_json::Value::Number(n) if n.is_i64() => Some(Kind::Integer),
            serde_json::Value::Number(_) => Some(Kind::Number),
            _ => Some(Kind::Text),
        }
    }

    fn and(self, other: Kind) -> Kind {
        match (self, other) {
            (a, b) if a == b => a,
            (Kind::Integer | Kind::Number, Kind::Integer | Kind::Number) => Kind::Number,
            _ => Kind::Text,
        }
    }

    fn data_type(self) -> DataType {
        match self {
            Kind::Integer => DataType::Int64,
            Kind::Number => DataType::Float64,
            Kind::Boolean => DataType::Boolean,
            Kind::Text => DataType::Utf8,
        }
    }
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
        let mut kinds: BTreeMap<String, Option<Kind>> = BTreeMap::new();
        for record in records {
            if record.account_id.trim().is_empty() {
                return Err(bad(None, "a record has an empty account_id".into()));
            }
            for (name, value) in &record.fields {
                if FIELDS.contains(&name.as_str()) {
                    continue;
                }
                if name.is_empty() {
                    return Err(bad(
                        None,
                        format!(
                            "account {} has a field with an empty name",
                            record.account_id
                        ),
                    ));
                }
                let kind = kinds.entry(name.clone()).or_default();
                if let Some(new) = Kind::of(value) {
                    *kind = Some(kind.map_or(new, |k| k.and(new)));
                }
            }
            if kinds.len() > MAX_EXTRA_FIELDS {
                return Err(bad(
                    None,
                    format!(
                        "more than {MAX_EXTRA_FIELDS} fields besides the standard ones ({}): each is a column of `accounts`",
                        FIELDS.join(", ")
                    ),
                ));
            }
            if let Some(old) = accounts.insert(record.account_id.clone(), record) {
                return Err(bad(
                    None,
                    format!("account {} appears twice", old.account_id),
                ));
            }
        }
        let extra = kinds
            .into_iter()
            .map(|(name, kind)| (name, kind.unwrap_or(Kind::Text).data_type()))
            .collect();
        Ok(Self {
            accounts,
            extra,
            ..Self::default()
        })
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

    /// How many accounts are active (see [`Account::is_active`]).
    pub fn active(&self) -> usize {
        *self
            .active
            .get_or_init(|| self.accounts.values().filter(|a| a.is_active()).count())
    }

    /// Schema of the `accounts` table: [`schema`]'s columns, then the extra fields.
    pub fn schema(&self) -> SchemaRef {
        let mut fields: Vec<Field> = schema()
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        fields.extend(
            self.extra
                .iter()
                .map(|(name, data_type)| Field::new(name, data_type.clone(), true)),
        );
        Arc::new(Schema::new(fields))
    }

    /// The `accounts` table.
    pub fn to_batch(&self) -> RecordBatch {
        self.batch.get_or_init(|| self.make_batch()).clone()
    }

    fn make_batch(&self) -> RecordBatch {
        let text = |field: &str| {
            let mut b = StringBuilder::new();
            for account in self.accounts.values() {
                b.append_option(account.get(field));
            }
            Arc::new(b.finish()) as ArrayRef
        };
        let mut columns: Vec<ArrayRef> = FIELDS.iter().map(|field| text(field)).collect();
        for (name, data_type) in &self.extra {
            let values = || self.accounts.values().map(|a| a.fields.get(name));
            let column: ArrayRef = match data_type {
                DataType::Int64 => {
                    let mut b = Int64Builder::new();
                    values().for_each(|v| b.append_option(v.and_then(|v| v.as_i64())));
                    Arc::new(b.finish())
                }
                DataType::Float64 => {
                    let mut b = Float64Builder::new();
                    values().for_each(|v| b.append_option(v.and_then(|v| v.as_f64())));
                    Arc::new(b.finish())
                }
                DataType::Boolean => {
                    let mut b = BooleanBuilder::new();
                    values().for_each(|v| b.append_option(v.and_then(|v| v.as_bool())));
                    Arc::new(b.finish())
                }
                _ => text(name),
            };
            columns.push(column);
        }
        RecordBatch::try_new(self.schema(), columns).expect("columns match the schema")
    }
}

/// Schema of the `accounts` table's standard columns (every registry has them; extra
/// fields follow, see [`Snapshot::schema`]).
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
    fn extra_fields_are_typed_columns() {
        use arrow::array::{Array, AsArray};
        use arrow::datatypes::{Float64Type, Int64Type};
        let snap = Snapshot::parse(concat!(
            r#"{"account_id":"1","owner_team":"payments","tier":"gold","error_rate_threshold":0.02,"max_functions":10,"paging":true,"tags":{"a":1}}"#,
            "\n",
            r#"{"account_id":"2","tier":3,"error_rate_threshold":1,"max_functions":null,"paging":false,"note":null}"#,
            "\n",
        ))
        .unwrap();
        let schema = snap.schema();
        let types: Vec<(&str, DataType)> = schema.fields()[FIELDS.len()..]
            .iter()
            .map(|f| (f.name().as_str(), f.data_type().clone()))
            .collect();
        assert_eq!(
            types,
            [
                ("error_rate_threshold", DataType::Float64),
                ("max_functions", DataType::Int64),
                ("note", DataType::Utf8),
                ("paging", DataType::Boolean),
                ("tags", DataType::Utf8),
                ("tier", DataType::Utf8),
            ]
        );
        let batch = snap.to_batch();
        assert_eq!(batch.num_columns(), FIELDS.len() + 6);
        let column = |name: &str| batch.column_by_name(name).unwrap().clone();
        let threshold = column("error_rate_threshold");
        assert_eq!(
            threshold.as_primitive::<Float64Type>().values(),
            &[0.02, 1.0]
        );
        let max = column("max_functions");
        assert_eq!(max.as_primitive::<Int64Type>().value(0), 10);
        assert!(max.is_null(1));
        let tier = column("tier");
        assert_eq!(tier.as_string::<i32>().value(0), "gold");
        assert_eq!(tier.as_string::<i32>().value(1), "3");
        assert_eq!(column("tags").as_string::<i32>().value(0), r#"{"a":1}"#);
        assert!(column("paging").as_boolean().value(0));
        // The standard fields stay text whatever their values.
        let owner = batch
            .schema()
            .field_with_name("owner_team")
            .unwrap()
            .clone();
        assert_eq!(owner.data_type(), &DataType::Utf8);

        let many: String = (0..=MAX_EXTRA_FIELDS)
            .map(|i| format!("{{\"account_id\":\"{i}\",\"f{i}\":1}}\n"))
            .collect();
        let e = Snapshot::parse(&many).unwrap_err();
        assert!(e.to_string().contains("more than 256 fields"), "{e}");
    }

    #[test]
    fn duplicate_accounts_are_refused() {
        let e = Snapshot::parse("{\"account_id\":\"1\"}\n{\"account_id\":\"1\"}\n").unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
    }
}
