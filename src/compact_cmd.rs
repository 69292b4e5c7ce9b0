//! `fleetlake compact`: rewrites each day partition of the lake's tables into few large
//! files sorted as the lake keeps them, then removes unreferenced files (vacuum).

use std::time::Duration;

use anyhow::Context;
use fleetlake_aggregate::lake::TableLake;
use fleetlake_ingest::Table;

use crate::config::Config;

pub(crate) fn run(config: &Config, min_files: usize, grace: Duration) -> anyhow::Result<()> {
    crate::serve::init_tracing("warn,buoyant_kernel=off,deltalake_core=warn");
    let lake = config.lake_location()?;
    if lake.local_dir().is_some_and(|dir| !dir.is_dir()) {
        anyhow::bail!("{lake}: no lake here");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        for table in Table::ALL {
            let options = config.aggregate_config()?.lake;
            // Compaction writes no WAL sequence: the writer id only names transactions
            // it never commits.
            let mut lake = TableLake::open_or_create(&lake, table, options, "compact")
                .await
                .with_context(|| format!("opening table {table}"))?;
            let stats = lake
                .compact(min_files, grace)
                .await
                .with_context(|| format!("compacting table {table}"))?;
            println!(
                "{table}: {} partition(s) rewritten, {} files into {}, {} rows; {} unreferenced file(s) removed",
                stats.partitions, stats.files_before, stats.files_after, stats.rows, stats.vacuumed
            );
        }
        Ok(())
    })
}
