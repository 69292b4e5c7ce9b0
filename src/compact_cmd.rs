//! `fleetlake compact`: rolls new `metrics` commits up into `metrics_5m` and
//! `metrics_1h`, rewrites each day partition of the lake's tables into few large files
//! sorted as the lake keeps them (merging the roll-ups' partial rows), then removes
//! unreferenced files (vacuum).

use std::time::Duration;

use anyhow::Context;
use fleetlake_aggregate::lake::{CompactStats, TableLake};
use fleetlake_aggregate::rollup::{Roller, Rollup};
use fleetlake_model::Table;

use crate::config::Config;

pub(crate) fn run(config: &Config, min_files: usize, grace: Duration) -> anyhow::Result<()> {
    crate::serve::init_tracing("warn,buoyant_kernel=off,deltalake_core=warn");
    let lake = config.lake_location()?;
    if lake.local_dir().is_some_and(|dir| !dir.is_dir()) {
        anyhow::bail!("{lake}: no lake here");
    }
    let options = config.aggregate_config()?.lake;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let report = |name: &str, stats: CompactStats| {
            println!(
                "{name}: {} partition(s) rewritten, {} files into {}, {} rows; {} unreferenced file(s) removed",
                stats.partitions, stats.files_before, stats.files_after, stats.rows, stats.vacuumed
            );
        };
        if !config.lake.rollup_interval.is_zero() {
            let mut roller = Roller::open(lake.clone(), options.clone())
                .await
                .context("opening the roll-up tables")?;
            let rolled = roller.roll().await.context("rolling up metrics")?;
            for rollup in Rollup::ALL {
                let name = rollup.name();
                println!(
                    "{name}: {} metrics version(s) rolled up into {} row(s)",
                    rolled.versions.get(name).copied().unwrap_or(0),
                    rolled.rows.get(name).copied().unwrap_or(0)
                );
            }
        }
        for table in Table::ALL {
            // Compaction writes no WAL sequence: the writer id only names transactions
            // it never commits.
            let mut lake = TableLake::open_or_create(&lake, table, options.clone(), "compact")
                .await
                .with_context(|| format!("opening table {table}"))?;
            let stats = lake
                .compact(min_files, grace)
                .await
                .with_context(|| format!("compacting table {table}"))?;
            report(table.name(), stats);
        }
        if !config.lake.rollup_interval.is_zero() {
            for rollup in Rollup::ALL {
                let mut lake = TableLake::open_rollup(&lake, rollup, options.clone())
                    .await
                    .with_context(|| format!("opening table {}", rollup.name()))?;
                let stats = lake
                    .compact(min_files, grace)
                    .await
                    .with_context(|| format!("compacting table {}", rollup.name()))?;
                report(rollup.name(), stats);
            }
        }
        Ok(())
    })
}
