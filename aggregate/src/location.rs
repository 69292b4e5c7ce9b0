//! Where the lake lives: a local directory, or an S3 prefix (`s3://bucket/prefix`).
//!
//! On S3, Delta commits are made safe for several writers by S3's conditional writes
//! (`If-None-Match: *` on the commit file, through object_store): of two writers
//! committing the same version, one wins and the other retries on the new version.
//! Credentials come from the standard AWS chain (environment, profile, instance or
//! task role); an endpoint override serves tests and S3-compatible stores.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Once;

use deltalake::{DeltaTable, DeltaTableBuilder, DeltaTableError};
use url::Url;

/// The root of the lake, under which each table is a directory (or prefix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LakeLocation {
    root: Url,
    storage_options: HashMap<String, String>,
}

fn register_stores() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| deltalake::aws::register_handlers(None));
}

impl LakeLocation {
    /// A lake in a local directory (its tables' directories are made when created).
    pub fn local(dir: &Path) -> std::io::Result<Self> {
        let abs = std::path::absolute(dir)?;
        let root = Url::from_directory_path(&abs).map_err(|()| {
            std::io::Error::other(format!("{} is not an absolute path", abs.display()))
        })?;
        Ok(Self {
            root,
            storage_options: HashMap::new(),
        })
    }

    /// A lake at `location`: `s3://bucket/prefix` (or `s3a://`), `file:///dir`, or a
    /// local path. `storage_options` are object_store / delta-rs keys
    /// (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ALLOW_HTTP`, ...).
    pub fn parse(location: &str, storage_options: HashMap<String, String>) -> Result<Self, String> {
        let mut root = match Url::parse(location) {
            Ok(url) if url.scheme() == "s3" || url.scheme() == "s3a" => {
                if url.host_str().is_none_or(str::is_empty) {
                    return Err(format!("{location}: no bucket in the lake location"));
                }
                url
            }
            Ok(url) if url.scheme() == "file" => {
                let path = url
                    .to_file_path()
                    .map_err(|()| format!("{location}: not a local path"))?;
                return Self::local(&path)
                    .map(|l| l.with_options(storage_options))
                    .map_err(|e| format!("{location}: {e}"));
            }
            Ok(url) if url.scheme().len() > 1 => {
                return Err(format!(
                    "{location}: unsupported lake location scheme {:?} (use s3:// or a local directory)",
                    url.scheme()
                ));
            }
            // A relative path, or a Windows drive letter parsed as a scheme.
            _ => {
                return Self::local(&PathBuf::from(location))
                    .map(|l| l.with_options(storage_options))
                    .map_err(|e| format!("{location}: {e}"));
            }
        };
        if !root.path().ends_with('/') {
            let path = format!("{}/", root.path());
            root.set_path(&path);
        }
        register_stores();
        Ok(Self {
            root,
            storage_options,
        })
    }

    fn with_options(mut self, storage_options: HashMap<String, String>) -> Self {
        self.storage_options = storage_options;
        self
    }

    /// The root URL.
    pub fn root(&self) -> &Url {
        &self.root
    }

    /// The local directory of the lake, if it is local.
    pub fn local_dir(&self) -> Option<PathBuf> {
        (self.root.scheme() == "file")
            .then(|| self.root.to_file_path().ok())
            .flatten()
    }

    /// The storage options tables are opened with.
    pub fn storage_options(&self) -> &HashMap<String, String> {
        &self.storage_options
    }

    /// An object store rooted at `<root>/<prefix>/`, for what the service keeps beside
    /// the tables (in S3: the lake's bucket, with the lake's storage options).
    pub fn object_store(
        &self,
        prefix: &str,
    ) -> Result<std::sync::Arc<dyn deltalake::ObjectStore>, DeltaTableError> {
        let url = self
            .root
            .join(&format!("{prefix}/"))
            .map_err(|e| DeltaTableError::Generic(format!("{prefix}: {e}")))?;
        Ok(DeltaTableBuilder::from_url(url)?
            .with_storage_options(self.storage_options.clone())
            .build_storage()?
            // The store prefixed with the URL's path (the "root" one is the bucket's).
            .object_store(None))
    }

    /// The URL of table `name`.
    pub fn table_url(&self, name: &str) -> Url {
        self.root
            .join(&format!("{name}/"))
            .expect("a table name is a valid relative URL")
    }

    fn builder(&self, name: &str) -> Result<DeltaTableBuilder, DeltaTableError> {
        if let Some(dir) = self.local_dir() {
            std::fs::create_dir_all(dir.join(name))
                .map_err(|e| DeltaTableError::Generic(format!("{}: {e}", dir.display())))?;
        }
        Ok(DeltaTableBuilder::from_url(self.table_url(name))?
            .with_storage_options(self.storage_options.clone()))
    }

    /// Table `name`, loaded at its latest version; `None` if it was never created.
    pub async fn open(&self, name: &str) -> Result<Option<DeltaTable>, DeltaTableError> {
        if let Some(dir) = self.local_dir()
            && !dir.join(name).join("_delta_log").is_dir()
        {
            return Ok(None);
        }
        match self.builder(name)?.load().await {
            Ok(table) => Ok(Some(table)),
            Err(DeltaTableError::NotATable(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Table `name`, loaded if it exists, else unloaded (version `None`) for creating.
    pub async fn open_or_new(&self, name: &str) -> Result<DeltaTable, DeltaTableError> {
        let mut table = self.builder(name)?.build()?;
        match table.load().await {
            Ok(()) | Err(DeltaTableError::NotATable(_)) => Ok(table),
            Err(e) => Err(e),
        }
    }
}

impl std::fmt::Display for LakeLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.local_dir() {
            Some(dir) => write!(f, "{}", dir.display()),
            None => write!(f, "{}", self.root),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_locations_get_a_trailing_slash_and_table_prefixes() {
        let lake = LakeLocation::parse("s3://bucket/fleet/lake", HashMap::new()).unwrap();
        assert_eq!(
            lake.table_url("metrics").as_str(),
            "s3://bucket/fleet/lake/metrics/"
        );
        assert!(lake.local_dir().is_none());
        let bare = LakeLocation::parse("s3://bucket", HashMap::new()).unwrap();
        assert_eq!(bare.table_url("logs").as_str(), "s3://bucket/logs/");
    }

    #[test]
    fn local_paths_and_bad_schemes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lake");
        let lake = LakeLocation::parse(path.to_str().unwrap(), HashMap::new()).unwrap();
        assert_eq!(lake.local_dir().unwrap(), path);
        assert!(
            LakeLocation::parse("gs://bucket/x", HashMap::new())
                .unwrap_err()
                .contains("unsupported")
        );
        assert!(
            LakeLocation::parse("s3:///x", HashMap::new())
                .unwrap_err()
                .contains("no bucket")
        );
    }
}
