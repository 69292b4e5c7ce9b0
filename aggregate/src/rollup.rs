//! Roll-ups: `metrics_5m` and `metrics_1h`, maintained incrementally from `metrics`.
//!
//! ```text
//!  metrics (Delta) ──new commits──> Roller ──partial rows──> metrics_5m, metrics_1h (Delta)
//!   flush commits      files they     count, sum, min, max,     one commit per table, with
//!   of every writer    added           stats per 5 min / 1 h     the metrics version covered
//! ```
//!
//! The roller reads the files that flush commits of `metrics` added since the version
//! its roll-up table records (a Delta application transaction, `SOURCE_VERSION_APP_ID`,
//! committed atomically with the rows), aggregates them per series and bucket, and
//! appends the result. Each commit of `metrics` is thus rolled up exactly once, whoever
//! wrote it and however late its datapoints are: a datapoint for a bucket rolled up
//! before becomes one more *partial* row of that bucket. Two instances rolling up the
//! same versions commit the same application id, so Delta's conflict check lets one
//! win and the other skip.
//!
//! A bucket may thus have several partial rows. They merge exactly (count and sum add,
//! min and max take the extreme) and every other statistic (`stats`: percentiles,
//! trimmed means) takes the **max of its inputs**, an upper bound, exact when a bucket
//! has one input. SQL's `metrics_5m` / `metrics_1h` are views that merge partials
//! ([`rollup_sql`]); compaction merges them in the files, so other engines reading the
//! Delta tables see one row per series and bucket once a day partition is compacted.
//! Compaction commits of `metrics` (which move rows, not add them) are skipped.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Float64Array, MapArray, RecordBatch, StringArray,
    StructArray,
};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, FieldRef, Float64Type};
use datafusion::common::{Result as DfResult, ScalarValue};
use datafusion::dataframe::DataFrame;
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, EmitTo, GroupsAccumulator, Signature, Volatility,
};
use datafusion::prelude::SessionContext;
use fleetlake_model::schema::{Table, conform};

use crate::lake::{LakeError, LakeOptions, OPERATION_KEY, TableLake, is_conflict, sort_for_lake};
use crate::location::LakeLocation;

/// Application id of the transaction in a roll-up table carrying the `metrics` version
/// rolled up through.
pub const SOURCE_VERSION_APP_ID: &str = "fleetlake.rollup.metricsVersion";

/// Most `metrics` commits rolled up in one roll-up commit.
const VERSIONS_PER_COMMIT: i64 = 64;

/// A roll-up table of `metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rollup {
    /// `metrics_5m`: 5-minute buckets.
    FiveMinutes,
    /// `metrics_1h`: 1-hour buckets.
    OneHour,
}

impl Rollup {
    /// Every roll-up.
    pub const ALL: [Rollup; 2] = [Rollup::FiveMinutes, Rollup::OneHour];

    /// The table's name in the lake and in SQL.
    pub fn name(self) -> &'static str {
        match self {
            Rollup::FiveMinutes => "metrics_5m",
            Rollup::OneHour => "metrics_1h",
        }
    }

    /// Width of a bucket in seconds.
    pub fn seconds(self) -> u64 {
        match self {
            Rollup::FiveMinutes => 300,
            Rollup::OneHour => 3600,
        }
    }

    /// The Delta table's comment.
    pub fn comment(self) -> &'static str {
        match self {
            Rollup::FiveMinutes => {
                "fleetlake: metrics rolled up per 5 minutes (partial rows until compacted; merge with GROUP BY)"
            }
            Rollup::OneHour => {
                "fleetlake: metrics rolled up per hour (partial rows until compacted; merge with GROUP BY)"
            }
        }
    }
}

/// SQL that rolls rows of `source` (metrics rows, or partial roll-up rows) up into one
/// row per series and bucket of `rollup`, with the metrics schema.
pub fn rollup_sql(source: &str, rollup: Rollup) -> String {
    let bucket = format!(
        "date_bin(INTERVAL '{} seconds', time, TIMESTAMP '1970-01-01T00:00:00Z')",
        rollup.seconds()
    );
    format!(
        "SELECT time, account_id, region, namespace, metric_name, dimensions, unit, count, sum, min, max, stats, \
                CAST(time AS DATE) AS day \
         FROM (SELECT {bucket} AS time, account_id, region, namespace, metric_name, dimensions, unit, \
                      sum(count) AS count, sum(sum) AS sum, min(min) AS min, max(max) AS max, \
                      {STATS_MAX}(stats) AS stats \
               FROM {source} \
               GROUP BY {bucket}, account_id, region, namespace, metric_name, dimensions, unit)"
    )
}

/// Name of the aggregate that merges `stats` maps, taking each key's max.
pub const STATS_MAX: &str = "fleetlake_stats_max";

/// The `stats` merging aggregate ([`STATS_MAX`]).
pub fn stats_max() -> AggregateUDF {
    AggregateUDF::from(StatsMax {
        signature: Signature::any(1, Volatility::Immutable),
    })
}

/// Registers what roll-up SQL needs in `ctx`.
pub fn register(ctx: &SessionContext) {
    ctx.register_udaf(stats_max());
}

/// Rolls up `frame` (rows with the metrics schema) into `rollup` buckets.
pub async fn aggregate(
    ctx: &SessionContext,
    frame: DataFrame,
    rollup: Rollup,
) -> DfResult<DataFrame> {
    register(ctx);
    let source = format!("fleetlake_rollup_source_{}", rollup.name());
    ctx.register_table(source.as_str(), frame.into_view())?;
    let rolled = ctx.sql(&rollup_sql(&source, rollup)).await;
    ctx.deregister_table(source.as_str())?;
    rolled
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct StatsMax {
    signature: Signature,
}

impl AggregateUDFImpl for StatsMax {
    fn name(&self) -> &str {
        STATS_MAX
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, arg_types: &[DataType]) -> DfResult<DataType> {
        Ok(arg_types[0].clone())
    }
    fn accumulator(&self, args: AccumulatorArgs) -> DfResult<Box<dyn Accumulator>> {
        Ok(Box::new(StatsMaxAccumulator {
            data_type: args.return_field.data_type().clone(),
            max: BTreeMap::new(),
        }))
    }
    fn groups_accumulator_supported(&self, _args: AccumulatorArgs) -> bool {
        true
    }
    fn create_groups_accumulator(
        &self,
        args: AccumulatorArgs,
    ) -> DfResult<Box<dyn GroupsAccumulator>> {
        Ok(Box::new(StatsMaxGroups {
            data_type: args.return_field.data_type().clone(),
            columns: BTreeMap::new(),
            groups: 0,
        }))
    }
    fn state_fields(&self, args: StateFieldsArgs) -> DfResult<Vec<FieldRef>> {
        Ok(vec![Arc::new(Field::new(
            format!("{}[stats]", args.name),
            args.return_field.data_type().clone(),
            true,
        ))])
    }
}

#[derive(Debug)]
struct StatsMaxAccumulator {
    data_type: DataType,
    max: BTreeMap<String, f64>,
}

impl StatsMaxAccumulator {
    fn add(&mut self, maps: &ArrayRef) -> DfResult<()> {
        let Some(maps) = maps.as_map_opt() else {
            return datafusion::common::exec_err!("{STATS_MAX} takes a map of text to float");
        };
        let keys = maps.keys().as_string::<i32>();
        let Some(values) = maps.values().as_primitive_opt::<Float64Type>() else {
            return datafusion::common::exec_err!("{STATS_MAX} takes a map of text to float");
        };
        let offsets = maps.value_offsets();
        for row in 0..maps.len() {
            if maps.is_null(row) {
                continue;
            }
            for i in offsets[row] as usize..offsets[row + 1] as usize {
                if values.is_null(i) {
                    continue;
                }
                let value = values.value(i);
                match self.max.get_mut(keys.value(i)) {
                    Some(max) => *max = max.max(value),
                    None => {
                        self.max.insert(keys.value(i).to_string(), value);
                    }
                }
            }
        }
        Ok(())
    }
}

impl Accumulator for StatsMaxAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> DfResult<()> {
        self.add(&values[0])
    }
    fn merge_batch(&mut self, states: &[ArrayRef]) -> DfResult<()> {
        self.add(&states[0])
    }
    fn state(&mut self) -> DfResult<Vec<ScalarValue>> {
        Ok(vec![self.evaluate()?])
    }
    fn evaluate(&mut self) -> DfResult<ScalarValue> {
        if self.max.is_empty() {
            return ScalarValue::try_from(&self.data_type);
        }
        let DataType::Map(entries, sorted) = &self.data_type else {
            return datafusion::common::exec_err!("{STATS_MAX} returns a map");
        };
        let DataType::Struct(fields) = entries.data_type() else {
            return datafusion::common::exec_err!("{STATS_MAX} returns a map");
        };
        let keys = StringArray::from_iter_values(self.max.keys());
        let values = Float64Array::from_iter_values(self.max.values().copied());
        let entries_array =
            StructArray::try_new(fields.clone(), vec![Arc::new(keys), Arc::new(values)], None)?;
        let map = MapArray::try_new(
            entries.clone(),
            OffsetBuffer::from_lengths([self.max.len()]),
            entries_array,
            None,
            *sorted,
        )?;
        Ok(ScalarValue::Map(Arc::new(map)))
    }
    fn size(&self) -> usize {
        std::mem::size_of_val(self) + self.max.keys().map(|k| k.len() + 48).sum::<usize>()
    }
}

/// [`STATS_MAX`] for many groups at once: a column of maxima per statistic name
/// (few: `p99`, `p90`, ...), indexed by group, NaN where a group has none.
#[derive(Debug)]
struct StatsMaxGroups {
    data_type: DataType,
    columns: BTreeMap<String, Vec<f64>>,
    groups: usize,
}

impl StatsMaxGroups {
    fn add(
        &mut self,
        maps: &ArrayRef,
        group_indices: &[usize],
        filter: Option<&BooleanArray>,
        total: usize,
    ) -> DfResult<()> {
        let Some(maps) = maps.as_map_opt() else {
            return datafusion::common::exec_err!("{STATS_MAX} takes a map of text to float");
        };
        let keys = maps.keys().as_string::<i32>();
        let Some(values) = maps.values().as_primitive_opt::<Float64Type>() else {
            return datafusion::common::exec_err!("{STATS_MAX} takes a map of text to float");
        };
        self.groups = self.groups.max(total);
        for column in self.columns.values_mut() {
            column.resize(self.groups, f64::NAN);
        }
        let offsets = maps.value_offsets();
        for (row, &group) in group_indices.iter().enumerate() {
            if maps.is_null(row) || filter.is_some_and(|f| !f.value(row) || f.is_null(row)) {
                continue;
            }
            for i in offsets[row] as usize..offsets[row + 1] as usize {
                if values.is_null(i) {
                    continue;
                }
                let key = keys.value(i);
                if !self.columns.contains_key(key) {
                    self.columns
                        .insert(key.to_string(), vec![f64::NAN; self.groups]);
                }
                let slot = &mut self.columns.get_mut(key).expect("inserted")[group];
                // NaN.max(v) is v: an absent statistic takes the first value.
                *slot = slot.max(values.value(i));
            }
        }
        Ok(())
    }

    /// The maps of the groups `emit_to` takes (they leave the state).
    fn emit(&mut self, emit_to: EmitTo) -> DfResult<ArrayRef> {
        let n = match emit_to {
            EmitTo::All => self.groups,
            EmitTo::First(n) => n,
        };
        let taken: Vec<(String, Vec<f64>)> = self
            .columns
            .iter_mut()
            .map(|(k, column)| (k.clone(), emit_to.take_needed(column)))
            .collect();
        self.groups -= n;
        let DataType::Map(entries, sorted) = &self.data_type else {
            return datafusion::common::exec_err!("{STATS_MAX} returns a map");
        };
        let DataType::Struct(fields) = entries.data_type() else {
            return datafusion::common::exec_err!("{STATS_MAX} returns a map");
        };
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        let mut lengths = Vec::with_capacity(n);
        let mut nulls = Vec::with_capacity(n);
        for group in 0..n {
            let before = keys.len();
            for (k, column) in &taken {
                if !column[group].is_nan() {
                    keys.push(k.as_str());
                    values.push(column[group]);
                }
            }
            lengths.push(keys.len() - before);
            nulls.push(keys.len() > before);
        }
        let entries_array = StructArray::try_new(
            fields.clone(),
            vec![
                Arc::new(StringArray::from(keys)),
                Arc::new(Float64Array::from(values)),
            ],
            None,
        )?;
        Ok(Arc::new(MapArray::try_new(
            entries.clone(),
            OffsetBuffer::from_lengths(lengths),
            entries_array,
            Some(arrow::buffer::NullBuffer::from(nulls)),
            *sorted,
        )?))
    }
}

impl GroupsAccumulator for StatsMaxGroups {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> DfResult<()> {
        self.add(&values[0], group_indices, opt_filter, total_num_groups)
    }
    fn evaluate(&mut self, emit_to: EmitTo) -> DfResult<ArrayRef> {
        self.emit(emit_to)
    }
    fn state(&mut self, emit_to: EmitTo) -> DfResult<Vec<ArrayRef>> {
        Ok(vec![self.emit(emit_to)?])
    }
    fn merge_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        total_num_groups: usize,
    ) -> DfResult<()> {
        self.add(&values[0], group_indices, None, total_num_groups)
    }
    fn convert_to_state(
        &self,
        values: &[ArrayRef],
        opt_filter: Option<&BooleanArray>,
    ) -> DfResult<Vec<ArrayRef>> {
        // A row as its own group: its map is its state (filtered-out rows none).
        let maps = Arc::clone(&values[0]);
        Ok(vec![match opt_filter {
            None => maps,
            Some(filter) => {
                let keep = arrow::compute::prep_null_mask_filter(filter);
                arrow::compute::nullif(&maps, &arrow::compute::not(&keep)?)?
            }
        }])
    }
    fn size(&self) -> usize {
        std::mem::size_of_val(self) + self.columns.len() * self.groups * 8
    }
}

/// What one roll-up run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RollStats {
    /// Partial rows appended, per roll-up table.
    pub rows: BTreeMap<&'static str, usize>,
    /// `metrics` versions rolled up, per roll-up table.
    pub versions: BTreeMap<&'static str, i64>,
}

/// Keeps the roll-up tables up with `metrics`.
#[derive(Debug)]
pub struct Roller {
    lake: LakeLocation,
    tables: Vec<(Rollup, TableLake)>,
}

impl Roller {
    /// Opens (creating if needed) the roll-up tables of `lake`.
    pub async fn open(lake: LakeLocation, options: LakeOptions) -> Result<Self, LakeError> {
        let mut tables = Vec::new();
        for rollup in Rollup::ALL {
            tables.push((
                rollup,
                TableLake::open_rollup(&lake, rollup, options.clone()).await?,
            ));
        }
        Ok(Self { lake, tables })
    }

    /// Rolls up every `metrics` commit not rolled up yet.
    pub async fn roll(&mut self) -> Result<RollStats, LakeError> {
        let mut stats = RollStats::default();
        let source_err = |source| LakeError::Delta {
            table: self.lake.table_url(Table::Metrics.name()).to_string(),
            source: Box::new(source),
        };
        let Some(metrics) = self
            .lake
            .open(Table::Metrics.name())
            .await
            .map_err(source_err)?
        else {
            return Ok(stats);
        };
        let Some(current) = metrics.version() else {
            return Ok(stats);
        };
        let current = current as i64;
        for (rollup, table) in &mut self.tables {
            table.refresh().await?;
            let mut done = table.app_version(SOURCE_VERSION_APP_ID).await?;
            while done.is_none_or(|d| d < current) {
                let (files, through) = match done {
                    // A new roll-up table: everything `metrics` holds now.
                    None => (
                        metrics
                            .get_file_uris()
                            .map_err(source_err)?
                            .collect::<Vec<_>>(),
                        current,
                    ),
                    Some(done) => {
                        let through = (done + VERSIONS_PER_COMMIT).min(current);
                        (added_files(&metrics, done + 1..=through).await?, through)
                    }
                };
                let batches = if files.is_empty() {
                    Vec::new()
                } else {
                    roll_files(&metrics, files, *rollup)
                        .await
                        .map_err(|source| LakeError::Query {
                            table: table.location().to_string(),
                            source: Box::new(source),
                        })?
                };
                let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
                let batch = if rows == 0 {
                    RecordBatch::new_empty(Table::Metrics.schema())
                } else {
                    sort_for_lake(Table::Metrics, &batches).map_err(|source| LakeError::Arrow {
                        table: table.location().to_string(),
                        source,
                    })?
                };
                match table
                    .append_with(
                        vec![batch],
                        vec![(SOURCE_VERSION_APP_ID.to_string(), through)],
                    )
                    .await
                {
                    Ok(_) => {
                        *stats.rows.entry(rollup.name()).or_default() += rows;
                        *stats.versions.entry(rollup.name()).or_default() +=
                            through - done.unwrap_or(-1);
                        done = Some(through);
                    }
                    Err(LakeError::Delta { source, .. }) if is_conflict(&source) => {
                        // Another instance rolled these versions up first.
                        table.refresh().await?;
                        done = table.app_version(SOURCE_VERSION_APP_ID).await?;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(stats)
    }
}

/// URIs of the data files that commits `versions` of `metrics` added with new rows
/// (compaction and retention commits are left out: they add no datapoints).
async fn added_files(
    metrics: &deltalake::DeltaTable,
    versions: std::ops::RangeInclusive<i64>,
) -> Result<Vec<String>, LakeError> {
    use deltalake::kernel::Action;
    let location = metrics.table_url().to_string();
    let err = |source| LakeError::Delta {
        table: location.clone(),
        source: Box::new(source),
    };
    let log = metrics.log_store();
    let root = metrics.table_url().clone();
    let mut files = Vec::new();
    for version in versions {
        let Some(bytes) = log.read_commit_entry(version as u64).await.map_err(err)? else {
            return Err(err(deltalake::DeltaTableError::Generic(format!(
                "commit {version} of metrics is no longer in the Delta log; the roll-ups \
                 cannot catch up past it"
            ))));
        };
        let actions = deltalake::logstore::get_actions(version as u64, &bytes).map_err(err)?;
        let moves_rows = actions.iter().any(
            |a| matches!(a, Action::CommitInfo(info) if info.info.contains_key(OPERATION_KEY)),
        );
        if moves_rows {
            continue;
        }
        for action in actions {
            if let Action::Add(add) = action
                && add.data_change
            {
                let uri = root.join(&add.path).map_err(|e| {
                    err(deltalake::DeltaTableError::Generic(format!(
                        "data file {}: {e}",
                        add.path
                    )))
                })?;
                files.push(uri.to_string());
            }
        }
    }
    Ok(files)
}

/// Rolls up the rows of `files` (Parquet files of `metrics`) into `rollup` buckets.
async fn roll_files(
    metrics: &deltalake::DeltaTable,
    files: Vec<String>,
    rollup: Rollup,
) -> DfResult<Vec<RecordBatch>> {
    let ctx = SessionContext::new();
    metrics
        .update_datafusion_session(&ctx.state())
        .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?;
    let frame = crate::lake::read_data_files(&ctx, Table::Metrics, files).await?;
    let schema = Table::Metrics.schema();
    let batches = aggregate(&ctx, frame, rollup).await?.collect().await?;
    batches
        .iter()
        .map(|b| conform(b, &schema))
        .collect::<Result<_, _>>()
        .map_err(Into::into)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_max_takes_each_keys_max_and_skips_nulls() {
        let schema = Table::Metrics.schema();
        let DataType::Map(entries, sorted) = schema.field_with_name("stats").unwrap().data_type()
        else {
            panic!()
        };
        let data_type = DataType::Map(entries.clone(), *sorted);
        let mut acc = StatsMaxAccumulator {
            data_type: data_type.clone(),
            max: BTreeMap::new(),
        };
        let one = |pairs: &[(&str, f64)]| -> ArrayRef {
            let max = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect::<BTreeMap<_, _>>();
            let mut a = StatsMaxAccumulator {
                data_type: data_type.clone(),
                max,
            };
            a.evaluate().unwrap().to_array().unwrap()
        };
        acc.update_batch(&[one(&[("p99", 5.0), ("p50", 1.0)])])
            .unwrap();
        acc.update_batch(&[one(&[])]).unwrap();
        acc.merge_batch(&[one(&[("p99", 3.0), ("p90", 2.0)])])
            .unwrap();
        assert_eq!(
            acc.max,
            BTreeMap::from([
                ("p50".into(), 1.0),
                ("p90".into(), 2.0),
                ("p99".into(), 5.0)
            ])
        );
        assert_eq!(
            acc.evaluate().unwrap().to_array().unwrap().data_type(),
            &data_type
        );

        // The grouped form: the same maxima per group, groups without any a null map.
        let mut groups = StatsMaxGroups {
            data_type: data_type.clone(),
            columns: BTreeMap::new(),
            groups: 0,
        };
        let rows = arrow::compute::concat(&[
            &one(&[("p99", 5.0), ("p50", 1.0)]),
            &one(&[("p99", 7.0)]),
            &one(&[("p90", 2.0)]),
        ])
        .unwrap();
        groups.update_batch(&[rows], &[0, 0, 2], None, 3).unwrap();
        groups
            .merge_batch(&[one(&[("p99", 3.0)])], &[1], 3)
            .unwrap();
        let out = groups.evaluate(EmitTo::All).unwrap();
        let out = out.as_map();
        let entries = |row: usize| -> Vec<(String, f64)> {
            let m = out.value(row);
            let k = m.column(0).as_string::<i32>();
            let v = m.column(1).as_primitive::<Float64Type>();
            (0..m.len())
                .map(|i| (k.value(i).to_string(), v.value(i)))
                .collect()
        };
        assert_eq!(entries(0), vec![("p50".into(), 1.0), ("p99".into(), 7.0)]);
        assert_eq!(entries(1), vec![("p99".into(), 3.0)]);
        assert_eq!(entries(2), vec![("p90".into(), 2.0)]);
        assert_eq!(out.data_type(), &data_type);
        let mut empty = StatsMaxGroups {
            data_type: data_type.clone(),
            columns: BTreeMap::new(),
            groups: 0,
        };
        empty.update_batch(&[one(&[])], &[0], None, 1).unwrap();
        assert!(empty.evaluate(EmitTo::All).unwrap().is_null(0));
    }
}
