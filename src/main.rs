//! `fleetlake`: command line, configuration and wiring of the stages.
//!
//! ```text
//!  Firehose HTTP ──┐
//!  Kinesis ────────┼─> ingest ─> aggregate (WAL, hot buffer) ─> lake (Delta/Parquet)
//!  CloudWatch API ─┘                   │                            │
//!  (backfill, gap fill)                └──────> query (SQL) <───────┘  HTTP, Postgres, CLI
//! ```
//!
//! The binary only parses flags, loads [`config::Config`], and joins the crates:
//! `fleetlake-ingest` → `fleetlake-aggregate` → lake ← `fleetlake-query`.

mod alert_leases;
mod alerting;
mod backfill;
mod compact_cmd;
mod config;
mod gapfill;
mod query_cmd;
mod replay;
mod rules_cmd;
mod serve;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::{Config, Overrides};

/// mimalloc instead of glibc's malloc: decoding, the hot buffer and DataFusion's
/// scans allocate and free many short-lived buffers; with glibc those large frees go
/// back to the kernel and come back as page faults on the next request or query
/// (see BENCHMARKS.md, "Performance issue").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Fleet-wide CloudWatch telemetry: Firehose in, a Delta Lake of Parquet out, SQL on top.
#[derive(Debug, Parser)]
#[command(name = "fleetlake", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Args)]
struct Common {
    /// TOML configuration file (every key optional).
    #[arg(long, env = "FLEETLAKE_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Data directory: write-ahead log and lake [default: fleetlake-data].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the service: Firehose endpoint, write-ahead log, lake, SQL over HTTP.
    Serve {
        #[command(flatten)]
        common: Common,
        /// HTTP listen address [default: 127.0.0.1:8088]; port 0 picks a free port.
        #[arg(long, value_name = "HOST:PORT")]
        http_addr: Option<std::net::SocketAddr>,
        /// Postgres wire protocol listen address [default: 127.0.0.1:5433]; port 0
        /// picks a free port.
        #[arg(long, value_name = "HOST:PORT")]
        pg_addr: Option<std::net::SocketAddr>,
    },
    /// Run SQL over the lake in a data directory, or ask a running server.
    Query {
        #[command(flatten)]
        common: Common,
        /// Ask the fleetlake server at this URL (e.g. http://127.0.0.1:8088); it also
        /// sees data not yet committed to the lake.
        #[arg(long, value_name = "URL", conflicts_with = "data_dir")]
        server: Option<String>,
        /// Token for the server, when it has users configured.
        #[arg(
            long,
            env = "FLEETLAKE_TOKEN",
            hide_env_values = true,
            requires = "server"
        )]
        token: Option<String>,
        /// Output format.
        #[arg(long, default_value = "table", value_parser = ["table", "csv", "json"])]
        format: String,
        /// The SQL to run, e.g. "SELECT account_id, sum(sum) FROM metrics GROUP BY 1".
        sql: String,
    },
    /// Ingest files of records straight into the lake (the service must not be running
    /// on the same data directory). Gzip is detected; saved Firehose request bodies
    /// are recognised; undecodable input goes to the dead_letters table.
    Replay {
        #[command(flatten)]
        common: Common,
        /// Record format: json (Metric Streams JSON lines), otel1, otel07
        /// (length-delimited OpenTelemetry), cwlogs (CloudWatch Logs subscription JSON).
        #[arg(long, default_value = "json")]
        format: fleetlake_ingest::Format,
        /// Files to ingest.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// Fetch history or fill holes from the sources' own APIs into the lake (the
    /// service must not be running on the same data directory).
    Backfill {
        #[command(subcommand)]
        command: BackfillCommand,
    },
    /// Roll new metrics up into metrics_5m and metrics_1h, rewrite each day partition
    /// of the lake with many files into few large ones, sorted for pruning (merging the
    /// roll-ups' partial rows), then remove files no version within the grace period uses.
    /// Safe beside a running service (a partition it appends to meanwhile is left for
    /// the next run).
    Compact {
        #[command(flatten)]
        common: Common,
        /// Rewrite a partition once it has this many data files.
        #[arg(long, default_value_t = 2)]
        min_files: usize,
        /// Keep replaced files this long for readers of older versions.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        vacuum_grace: std::time::Duration,
    },
    /// Alert rules: check rule files, or evaluate them once against the lake.
    Rules {
        #[command(subcommand)]
        command: RulesCommand,
    },
}

#[derive(Debug, Subcommand)]
enum BackfillCommand {
    /// CloudWatch metrics through GetMetricData, for a set of accounts, regions,
    /// namespaces and metrics over a time range, written with the same
    /// de-duplication key as streamed data (overlaps are harmless). Progress is
    /// checkpointed: the same command again resumes where an interrupted run stopped.
    Cloudwatch {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: Box<backfill::Args>,
    },
}

#[derive(Debug, Subcommand)]
enum RulesCommand {
    /// Validate rule files: YAML, each rule's SQL planned against fleetlake's tables
    /// (the lake in the data directory, and the account registry), templates. Errors
    /// name the file and line; the exit status is non-zero if there is any.
    Check {
        #[command(flatten)]
        common: Common,
        /// Rule files.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// Evaluate rule files once against the lake in the data directory and print the
    /// alert instances each rule returns (labels and value); changes no state and
    /// sends nothing.
    Eval {
        #[command(flatten)]
        common: Common,
        /// Output format.
        #[arg(long, default_value = "table", value_parser = ["table", "json"])]
        format: String,
        /// Evaluate as of this instant (RFC 3339, e.g. 2026-12-06T03:00:00Z) instead of
        /// now: every rule's `now()` is that time, as in one round of the service. The
        /// lake is read as it is now, so a rule without an upper time bound also sees
        /// rows after the instant.
        #[arg(long, value_name = "TIME", value_parser = parse_instant)]
        at: Option<i64>,
        /// Rule files.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
}

/// An RFC 3339 instant SQL's `now()` can hold, in epoch milliseconds.
fn parse_instant(text: &str) -> Result<i64, String> {
    let ms = fleetlake_alert_rules::time::parse_rfc3339(text).map_err(|e| e.to_string())?;
    fleetlake_query::engine::sql_instant(ms).map_err(|e| format!("{text:?}: {e}"))?;
    Ok(ms)
}

fn load(
    common: &Common,
    http_addr: Option<std::net::SocketAddr>,
    pg_addr: Option<std::net::SocketAddr>,
) -> anyhow::Result<Config> {
    let overrides = Overrides {
        data_dir: common.data_dir.clone(),
        http_addr,
        pg_addr,
    };
    Config::load(common.config.as_deref(), &overrides)
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve {
            common,
            http_addr,
            pg_addr,
        } => load(&common, http_addr, pg_addr).and_then(serve::run),
        Command::Query {
            common,
            server,
            token,
            format,
            sql,
        } => load(&common, None, None).and_then(|config| {
            let format = format.parse().map_err(anyhow::Error::msg)?;
            query_cmd::run(&config, server.as_deref(), token.as_deref(), format, &sql)
        }),
        Command::Replay {
            common,
            format,
            files,
        } => load(&common, None, None).and_then(|config| replay::run(&config, format, &files)),
        Command::Compact {
            common,
            min_files,
            vacuum_grace,
        } => load(&common, None, None)
            .and_then(|config| compact_cmd::run(&config, min_files, vacuum_grace)),
        Command::Backfill {
            command: BackfillCommand::Cloudwatch { common, args },
        } => load(&common, None, None).and_then(|config| backfill::run(&config, *args)),
        Command::Rules { command } => match command {
            RulesCommand::Check { common, files } => {
                load(&common, None, None).and_then(|config| rules_cmd::check(&config, &files))
            }
            RulesCommand::Eval {
                common,
                format,
                at,
                files,
            } => load(&common, None, None)
                .and_then(|config| rules_cmd::eval(&config, &files, &format, at)),
        },
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
