//! Configuration: embedded defaults, then an optional TOML file, then `FLEETLAKE_*`
//! environment variables (nested keys joined by `__`, e.g.
//! `FLEETLAKE_FIREHOSE__ACCESS_KEY`), then command-line flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Config {
    /// Directory for the write-ahead log and, unless `lake.dir` says otherwise, the lake.
    pub(crate) data_dir: PathBuf,
    /// Address of the HTTP listener (Firehose, SQL, health, metrics). Port 0 picks one.
    pub(crate) http_addr: SocketAddr,
    /// The Firehose endpoint for CloudWatch Metric Streams JSON.
    pub(crate) firehose: FirehoseConfig,
    /// The hot buffer and its flushes to the lake.
    pub(crate) buffer: BufferConfig,
    /// The write-ahead log.
    pub(crate) wal: WalConfig,
    /// The lake.
    pub(crate) lake: LakeConfig,
}

/// `[firehose]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct FirehoseConfig {
    /// URL path of the endpoint.
    pub(crate) path: String,
    /// Access key Firehose must send in `X-Amz-Firehose-Access-Key`; unset accepts all.
    pub(crate) access_key: Option<String>,
    /// Largest request body, compressed and decompressed, in bytes.
    pub(crate) max_body_bytes: usize,
}

/// `[buffer]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct BufferConfig {
    /// Longest time data waits in the hot buffer before a lake commit.
    #[serde(with = "humantime_serde")]
    pub(crate) flush_interval: Duration,
    /// A flush starts early once this many datapoints are buffered.
    pub(crate) flush_rows: usize,
    /// Above this many buffered datapoints, Firehose requests get 503 and are retried.
    pub(crate) max_rows: usize,
}

/// `[wal]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct WalConfig {
    /// Directory of the log; defaults to `<data_dir>/wal`.
    pub(crate) dir: Option<PathBuf>,
    /// Size at which a segment is sealed, in bytes.
    pub(crate) segment_bytes: u64,
}

/// `[lake]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct LakeConfig {
    /// Directory holding the Delta tables; defaults to `<data_dir>/lake`.
    pub(crate) dir: Option<PathBuf>,
    /// Parquet files are cut near this size, in bytes.
    pub(crate) target_file_bytes: u64,
    /// zstd compression level of the Parquet files (1-22).
    pub(crate) zstd_level: i32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("fleetlake-data"),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8088)),
            firehose: FirehoseConfig::default(),
            buffer: BufferConfig::default(),
            wal: WalConfig::default(),
            lake: LakeConfig::default(),
        }
    }
}

impl Default for FirehoseConfig {
    fn default() -> Self {
        Self {
            path: "/firehose/metrics".into(),
            access_key: None,
            max_body_bytes: fleetlake_ingest::firehose::DEFAULT_MAX_BODY_BYTES,
        }
    }
}

impl Default for BufferConfig {
    fn default() -> Self {
        Self {
            flush_interval: Duration::from_secs(30),
            flush_rows: 2_000_000,
            max_rows: 8_000_000,
        }
    }
}

impl Default for WalConfig {
    fn default() -> Self {
        Self {
            dir: None,
            segment_bytes: 64 * 1024 * 1024,
        }
    }
}

impl Default for LakeConfig {
    fn default() -> Self {
        Self {
            dir: None,
            target_file_bytes: 256 * 1024 * 1024,
            zstd_level: 3,
        }
    }
}

/// Values given on the command line; each overrides the file and the environment.
#[derive(Debug, Default, Serialize)]
pub(crate) struct Overrides {
    /// `--data-dir`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) data_dir: Option<PathBuf>,
    /// `--http-addr`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) http_addr: Option<SocketAddr>,
}

impl Config {
    /// Loads the configuration: defaults, `file` if given, environment, `overrides`.
    pub(crate) fn load(file: Option<&Path>, overrides: &Overrides) -> anyhow::Result<Self> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.is_file() {
                bail!("config file {} does not exist", path.display());
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        let config: Config = figment
            .merge(
                Env::prefixed("FLEETLAKE_")
                    .split("__")
                    .ignore(&["config", "log"]),
            )
            .merge(Serialized::defaults(overrides))
            .extract()
            .map_err(|e| anyhow::anyhow!(describe_figment_error(e, file)))?;
        config.validate()?;
        Ok(config)
    }

    /// Parses a TOML document on top of the defaults (no environment), for checks.
    #[cfg(test)]
    pub(crate) fn from_toml(text: &str) -> anyhow::Result<Self> {
        let config: Config = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string(text))
            .extract()
            .map_err(|e| anyhow::anyhow!(describe_figment_error(e, None)))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> anyhow::Result<()> {
        if !self.firehose.path.starts_with('/') {
            bail!(
                "firehose.path must start with '/', got {:?}",
                self.firehose.path
            );
        }
        if self.firehose.max_body_bytes == 0 {
            bail!("firehose.max_body_bytes must be positive");
        }
        if self.buffer.flush_interval.is_zero() {
            bail!("buffer.flush_interval must be positive");
        }
        if self.buffer.flush_rows == 0 || self.buffer.max_rows < self.buffer.flush_rows {
            bail!(
                "buffer.flush_rows ({}) must be positive and at most buffer.max_rows ({})",
                self.buffer.flush_rows,
                self.buffer.max_rows
            );
        }
        if !(1..=22).contains(&self.lake.zstd_level) {
            bail!(
                "lake.zstd_level must be between 1 and 22, got {}",
                self.lake.zstd_level
            );
        }
        if self.access_key_is_empty() {
            bail!("firehose.access_key is set but empty");
        }
        Ok(())
    }

    fn access_key_is_empty(&self) -> bool {
        self.firehose
            .access_key
            .as_deref()
            .is_some_and(str::is_empty)
    }

    /// Directory of the lake's Delta tables.
    pub(crate) fn lake_dir(&self) -> PathBuf {
        self.lake
            .dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("lake"))
    }

    /// Directory of the write-ahead log.
    pub(crate) fn wal_dir(&self) -> PathBuf {
        self.wal
            .dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("wal"))
    }

    /// Makes sure the data directories exist.
    pub(crate) fn prepare_dirs(&self) -> anyhow::Result<()> {
        for dir in [self.lake_dir(), self.wal_dir()] {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        Ok(())
    }
}

fn describe_figment_error(error: figment::Error, file: Option<&Path>) -> String {
    let mut lines = Vec::new();
    for e in error {
        let mut line = String::from("invalid configuration");
        if let Some(source) = &e.metadata.as_ref().and_then(|m| m.source.clone()) {
            line.push_str(&format!(" in {source}"));
        } else if let Some(path) = file {
            line.push_str(&format!(" in {}", path.display()));
        }
        if !e.path.is_empty() {
            line.push_str(&format!(" at key `{}`", e.path.join(".")));
        }
        line.push_str(&format!(": {}", e.kind));
        lines.push(line);
    }
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_parses_and_says_something() {
        let text = include_str!("../config/fleetlake.example.toml");
        let config = Config::from_toml(text).unwrap();
        assert_eq!(config.firehose.path, "/firehose/metrics");
        assert_eq!(
            config.firehose.access_key.as_deref(),
            Some("change-me-to-a-long-random-secret")
        );
        assert_eq!(config.buffer.flush_interval, Duration::from_secs(30));
        assert_eq!(config.lake_dir(), PathBuf::from("/var/lib/fleetlake/lake"));
        assert_eq!(config.wal_dir(), PathBuf::from("/var/lib/fleetlake/wal"));
    }

    #[test]
    fn defaults_listen_on_loopback_only() {
        let config = Config::default();
        assert!(config.http_addr.ip().is_loopback());
        config.validate().unwrap();
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors_that_name_the_key() {
        let err = Config::from_toml("flush_interval = \"1s\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("flush_interval"), "{err}");
        let err = Config::from_toml("[buffer]\nflush_interval = \"soon\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("buffer.flush_interval"), "{err}");
        let err = Config::from_toml("[buffer]\nflush_rows = 10\nmax_rows = 5")
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_rows"), "{err}");
    }
}
