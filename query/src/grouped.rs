//! A leaf's partial aggregates held by group, for [`crate::incremental`]: each
//! group's keys once, in arrow's row format, known by a dense id; and per slot (half
//! a second of row time) the partial states of the groups it has rows of, by id.
//!
//! Folding rows in hashes each group's keys once (to find its id). A round merges the
//! slots of its window by adding and comparing values at their group's id: no hashing
//! and no copy of the keys but for the groups it returns. Before, the partials were
//! batches of `(slot, keys, states)` that DataFusion re-grouped by their keys at every
//! round and every 16 folds: at a million series, a 15-minute window of 200,000
//! functions is 3 M keyed rows hashed each round. A leaf whose partials are of
//! another kind (a decimal sum, a minimum of text, no grouping) keeps them as batches
//! merged by DataFusion; both give the same rows (tested against each other).

use std::collections::BTreeMap;
use std::hash::BuildHasher;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, Float64Array, Int64Array, PrimitiveArray, RecordBatch, UInt64Array,
};
use arrow::buffer::NullBuffer;
use arrow::compute::cast;
use arrow::datatypes::{
    ArrowPrimitiveType, DataType, Field, Float64Type, Int64Type, Schema, SchemaRef, UInt64Type,
};
use arrow::error::ArrowError;
use arrow::row::{RowConverter, Rows, SortField};
use hashbrown::{DefaultHashBuilder, HashTable};

/// A slot's entries are merged into one per group once they pass twice the groups it
/// had at its last merge plus this.
const MERGE_SLOT_PAST: usize = if cfg!(test) { 3 } else { 4096 };

/// Groups gone from every slot are looked for from this many groups on.
const FORGET_FROM: usize = if cfg!(test) { 4 } else { 4096 };

/// How a partial state merges with another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Merge {
    /// Added (`sum`, `count`, `avg`'s sum and count).
    Sum,
    Min,
    Max,
}

/// How a partial state is held: as the arrow type it has, or as `i64` for
/// timestamps (their minima and maxima).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Repr {
    I64,
    U64,
    F64,
}

impl Repr {
    /// The arrow type its values are read as.
    fn data_type(self) -> DataType {
        match self {
            Repr::I64 => DataType::Int64,
            Repr::U64 => DataType::UInt64,
            Repr::F64 => DataType::Float64,
        }
    }

    fn of(data_type: &DataType, merge: Merge) -> Option<Self> {
        match data_type {
            DataType::Int64 => Some(Repr::I64),
            DataType::Timestamp(_, _) if merge != Merge::Sum => Some(Repr::I64),
            DataType::UInt64 => Some(Repr::U64),
            DataType::Float64 => Some(Repr::F64),
            _ => None,
        }
    }
}

/// A value a partial state holds.
trait Value: Copy + Default {
    /// `self` merged with `other`.
    fn merge(self, other: Self, merge: Merge) -> Self;
}

impl Value for i64 {
    fn merge(self, other: Self, merge: Merge) -> Self {
        // As DataFusion's sum of integers: wrapping.
        match merge {
            Merge::Sum => self.wrapping_add(other),
            Merge::Min => self.min(other),
            Merge::Max => self.max(other),
        }
    }
}

impl Value for u64 {
    fn merge(self, other: Self, merge: Merge) -> Self {
        match merge {
            Merge::Sum => self.wrapping_add(other),
            Merge::Min => self.min(other),
            Merge::Max => self.max(other),
        }
    }
}

impl Value for f64 {
    fn merge(self, other: Self, merge: Merge) -> Self {
        // Minima and maxima in the total order arrow's kernels use (NaN the largest).
        match merge {
            Merge::Sum => self + other,
            Merge::Min => {
                if other.total_cmp(&self).is_lt() {
                    other
                } else {
                    self
                }
            }
            Merge::Max => {
                if other.total_cmp(&self).is_gt() {
                    other
                } else {
                    self
                }
            }
        }
    }
}

/// `values` (with `valid`) merged into `out` at `targets`, one target per value.
fn accumulate<T: Value>(
    merge: Merge,
    out: &mut [T],
    out_valid: &mut [bool],
    targets: &[u32],
    values: &[T],
    valid: &[bool],
) {
    for ((&t, &v), &ok) in targets.iter().zip(values).zip(valid) {
        if !ok {
            continue;
        }
        let t = t as usize;
        if out_valid[t] {
            out[t] = out[t].merge(v, merge);
        } else {
            out[t] = v;
            out_valid[t] = true;
        }
    }
}

/// One partial state's values, per entry of a slot (or per group, merged).
#[derive(Debug, Clone)]
enum Values {
    I64(Vec<i64>),
    U64(Vec<u64>),
    F64(Vec<f64>),
}

#[derive(Debug, Clone)]
struct Column {
    values: Values,
    valid: Vec<bool>,
}

impl Column {
    fn new(repr: Repr, len: usize) -> Self {
        let values = match repr {
            Repr::I64 => Values::I64(vec![0; len]),
            Repr::U64 => Values::U64(vec![0; len]),
            Repr::F64 => Values::F64(vec![0.0; len]),
        };
        Self {
            values,
            valid: vec![false; len],
        }
    }

    fn len(&self) -> usize {
        self.valid.len()
    }

    fn bytes(&self) -> usize {
        let values = match &self.values {
            Values::I64(v) => v.capacity() * 8,
            Values::U64(v) => v.capacity() * 8,
            Values::F64(v) => v.capacity() * 8,
        };
        values + self.valid.capacity()
    }

    /// Appends the values of `array` (of this column's representation).
    fn extend(&mut self, array: &ArrayRef, rows: std::ops::Range<usize>) {
        fn push<T: ArrowPrimitiveType>(
            out: &mut Vec<T::Native>,
            valid: &mut Vec<bool>,
            array: &PrimitiveArray<T>,
            rows: std::ops::Range<usize>,
        ) {
            out.extend_from_slice(&array.values()[rows.clone()]);
            valid.extend(rows.map(|i| array.is_valid(i)));
        }
        match &mut self.values {
            Values::I64(v) => push(v, &mut self.valid, array.as_primitive::<Int64Type>(), rows),
            Values::U64(v) => push(v, &mut self.valid, array.as_primitive::<UInt64Type>(), rows),
            Values::F64(v) => push(
                v,
                &mut self.valid,
                array.as_primitive::<Float64Type>(),
                rows,
            ),
        }
    }

    /// Merges `from`'s values into this column at `targets`.
    fn accumulate(&mut self, merge: Merge, targets: &[u32], from: &Column) {
        match (&mut self.values, &from.values) {
            (Values::I64(out), Values::I64(v)) => {
                accumulate(merge, out, &mut self.valid, targets, v, &from.valid);
            }
            (Values::U64(out), Values::U64(v)) => {
                accumulate(merge, out, &mut self.valid, targets, v, &from.valid);
            }
            (Values::F64(out), Values::F64(v)) => {
                accumulate(merge, out, &mut self.valid, targets, v, &from.valid);
            }
            _ => unreachable!("a column merges only with its own representation"),
        }
    }

    /// The values at `ids`, as an array of `data_type`.
    fn array(&self, ids: &[u32], data_type: &DataType) -> Result<ArrayRef, ArrowError> {
        let nulls = NullBuffer::from(
            ids.iter()
                .map(|id| self.valid[*id as usize])
                .collect::<Vec<bool>>(),
        );
        let array: ArrayRef = match &self.values {
            Values::I64(v) => Arc::new(Int64Array::new(
                ids.iter().map(|id| v[*id as usize]).collect(),
                Some(nulls),
            )),
            Values::U64(v) => Arc::new(UInt64Array::new(
                ids.iter().map(|id| v[*id as usize]).collect(),
                Some(nulls),
            )),
            Values::F64(v) => Arc::new(Float64Array::new(
                ids.iter().map(|id| v[*id as usize]).collect(),
                Some(nulls),
            )),
        };
        if array.data_type() == data_type {
            Ok(array)
        } else {
            cast(&array, data_type)
        }
    }
}

/// What a leaf's partials are: their grouping columns and states.
pub(crate) struct Layout {
    converter: RowConverter,
    groups: usize,
    /// Per partial state: how it merges, how it is held, its arrow type.
    states: Vec<(Merge, Repr, DataType)>,
    /// What a merge gives: the grouping columns, then the states.
    merged: SchemaRef,
}

impl Layout {
    /// The layout of partials of `schema` (the slot, `groups` grouping columns, then
    /// one state per entry of `merges`); `None` when one of them is not of a kind held
    /// here, or the aggregate has no grouping (it returns a row even over no rows).
    pub(crate) fn new(schema: &SchemaRef, groups: usize, merges: &[Merge]) -> Option<Self> {
        if groups == 0 || schema.fields().len() != 1 + groups + merges.len() {
            return None;
        }
        let group_fields = &schema.fields()[1..=groups];
        if !group_fields.iter().all(|f| groupable(f.data_type())) {
            return None;
        }
        let sort: Vec<SortField> = group_fields
            .iter()
            .map(|f| SortField::new(f.data_type().clone()))
            .collect();
        if !RowConverter::supports_fields(&sort) {
            return None;
        }
        let states = merges
            .iter()
            .zip(&schema.fields()[1 + groups..])
            .map(|(m, f)| Repr::of(f.data_type(), *m).map(|r| (*m, r, f.data_type().clone())))
            .collect::<Option<Vec<_>>>()?;
        let merged = Arc::new(Schema::new(
            schema.fields()[1..]
                .iter()
                .map(|f| f.as_ref().clone().with_nullable(true))
                .collect::<Vec<Field>>(),
        ));
        Some(Self {
            converter: RowConverter::new(sort).ok()?,
            groups,
            states,
            merged,
        })
    }
}

/// Grouping column types whose row format converts back to the same type.
fn groupable(data_type: &DataType) -> bool {
    matches!(
        data_type,
        DataType::Boolean
            | DataType::Int8
            | DataType::Int16
            | DataType::Int32
            | DataType::Int64
            | DataType::UInt8
            | DataType::UInt16
            | DataType::UInt32
            | DataType::UInt64
            | DataType::Float32
            | DataType::Float64
            | DataType::Utf8
            | DataType::LargeUtf8
            | DataType::Utf8View
            | DataType::Binary
            | DataType::LargeBinary
            | DataType::BinaryView
            | DataType::Date32
            | DataType::Date64
            | DataType::Timestamp(_, _)
    )
}

/// One slot's partial states: an entry per fold that had rows of a group in it,
/// merged into one per group once they double.
#[derive(Debug)]
struct Slot {
    ids: Vec<u32>,
    columns: Vec<Column>,
    /// Entries at the last merge.
    merged: usize,
}

impl Slot {
    fn new(layout: &Layout) -> Self {
        Self {
            ids: Vec::new(),
            columns: layout
                .states
                .iter()
                .map(|(_, repr, _)| Column::new(*repr, 0))
                .collect(),
            merged: 0,
        }
    }

    fn bytes(&self) -> usize {
        self.ids.capacity() * 4 + self.columns.iter().map(Column::bytes).sum::<usize>()
    }
}

/// A leaf's partials, by group and slot.
pub(crate) struct Grouped {
    layout: Arc<Layout>,
    /// Every group's keys, by id.
    keys: Rows,
    /// The ids, by their keys' hash.
    index: HashTable<u32>,
    hasher: DefaultHashBuilder,
    slots: BTreeMap<i64, Slot>,
    /// Groups with entries at the last look for groups without (see
    /// [`Grouped::forget_gone`]).
    live_at_look: usize,
    /// Per group: where a merge of a slot put its entry (`u32::MAX` between merges).
    scratch: Vec<u32>,
    /// The keys of the groups so far, by id, as arrays: a round that returns every
    /// group (as most do) shares them, one that returns some takes from them.
    key_arrays: Option<Vec<ArrayRef>>,
}

impl std::fmt::Debug for Grouped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grouped")
            .field("groups", &self.keys.num_rows())
            .field("slots", &self.slots.len())
            .finish()
    }
}

/// The id of the group whose keys are `row` (hashed `hash`), added to `keys` and
/// `index` when new.
fn intern(
    keys: &mut Rows,
    index: &mut HashTable<u32>,
    hasher: &DefaultHashBuilder,
    row: arrow::row::Row<'_>,
    hash: u64,
) -> Result<u32, ArrowError> {
    let bytes = row.as_ref();
    if let Some(id) = index.find(hash, |id| keys.row(*id as usize).as_ref() == bytes) {
        return Ok(*id);
    }
    let id = u32::try_from(keys.num_rows())
        .map_err(|_| ArrowError::ComputeError("more than 2^32 groups".into()))?;
    keys.push(row);
    index.insert_unique(hash, id, |id| {
        hasher.hash_one(keys.row(*id as usize).as_ref())
    });
    Ok(id)
}

impl Grouped {
    pub(crate) fn new(layout: Arc<Layout>) -> Self {
        let keys = layout.converter.empty_rows(0, 0);
        Self {
            layout,
            keys,
            index: HashTable::new(),
            hasher: DefaultHashBuilder::default(),
            slots: BTreeMap::new(),
            live_at_look: 0,
            scratch: Vec::new(),
            key_arrays: None,
        }
    }

    /// Bytes held.
    pub(crate) fn bytes(&self) -> usize {
        self.keys.size()
            + self.index.capacity() * 4
            + self.scratch.capacity() * 4
            + self.slots.values().map(Slot::bytes).sum::<usize>()
            + self
                .key_arrays
                .iter()
                .flatten()
                .map(|a| a.get_array_memory_size())
                .sum::<usize>()
    }

    /// Takes in a fold's partials (`(slot, keys, states)` rows, as the layout says),
    /// dropping slots before `horizon`.
    pub(crate) fn absorb(&mut self, partial: &RecordBatch, horizon: i64) -> Result<(), ArrowError> {
        self.drop_before(horizon)?;
        let n = partial.num_rows();
        if n == 0 {
            return Ok(());
        }
        let groups = self.layout.groups;
        let rows = self
            .layout
            .converter
            .convert_columns(&partial.columns()[1..=groups])?;
        let slots = partial.column(0).as_primitive::<Int64Type>();
        // Rows without a time are in no window; those before the horizon in none a
        // round reads.
        let kept = |i: usize| slots.is_valid(i) && slots.value(i) >= horizon;
        let mut ids = Vec::with_capacity(n);
        for (i, row) in rows.iter().enumerate() {
            if !kept(i) {
                ids.push(u32::MAX);
                continue;
            }
            let hash = self.hasher.hash_one(row.as_ref());
            ids.push(intern(
                &mut self.keys,
                &mut self.index,
                &self.hasher,
                row,
                hash,
            )?);
        }
        let states: Vec<ArrayRef> = partial.columns()[1 + groups..]
            .iter()
            .zip(&self.layout.states)
            .map(|(c, (_, repr, _))| {
                let want = repr.data_type();
                if *c.data_type() == want {
                    Ok(Arc::clone(c))
                } else {
                    cast(c, &want)
                }
            })
            .collect::<Result<_, _>>()?;
        let mut touched: Vec<i64> = Vec::new();
        let mut i = 0;
        while i < n {
            let valid = slots.is_valid(i);
            let slot = slots.value(i);
            let mut end = i + 1;
            while end < n && slots.is_valid(end) == valid && slots.value(end) == slot {
                end += 1;
            }
            if kept(i) {
                let layout = &self.layout;
                let entry = self.slots.entry(slot).or_insert_with(|| Slot::new(layout));
                entry.ids.extend_from_slice(&ids[i..end]);
                for (column, array) in entry.columns.iter_mut().zip(&states) {
                    column.extend(array, i..end);
                }
                if touched.last() != Some(&slot) {
                    touched.push(slot);
                }
            }
            i = end;
        }
        touched.sort_unstable();
        touched.dedup();
        for slot in touched {
            if self
                .slots
                .get(&slot)
                .is_some_and(|s| s.ids.len() > 2 * s.merged + MERGE_SLOT_PAST)
            {
                self.merge_slot(slot);
            }
        }
        Ok(())
    }

    /// Merges slot `at`'s entries into one per group.
    fn merge_slot(&mut self, at: i64) {
        let Some(slot) = self.slots.get_mut(&at) else {
            return;
        };
        self.scratch.resize(self.keys.num_rows(), u32::MAX);
        let mut ids: Vec<u32> = Vec::new();
        let mut targets: Vec<u32> = Vec::with_capacity(slot.ids.len());
        for id in &slot.ids {
            let at = &mut self.scratch[*id as usize];
            if *at == u32::MAX {
                *at = ids.len() as u32;
                ids.push(*id);
            }
            targets.push(*at);
        }
        for id in &ids {
            self.scratch[*id as usize] = u32::MAX;
        }
        let columns = slot
            .columns
            .iter()
            .zip(&self.layout.states)
            .map(|(column, (merge, repr, _))| {
                let mut out = Column::new(*repr, ids.len());
                out.accumulate(*merge, &targets, column);
                out
            })
            .collect();
        slot.merged = ids.len();
        slot.ids = ids;
        slot.columns = columns;
    }

    /// Every group's keys as arrays, by id (converted once, and as groups come).
    fn key_arrays(&mut self) -> Result<&[ArrayRef], ArrowError> {
        let groups = self.keys.num_rows();
        let have = self.key_arrays.as_ref().map_or(0, |k| k[0].len());
        if have < groups || self.key_arrays.is_none() {
            let new = self
                .layout
                .converter
                .convert_rows((have..groups).map(|id| self.keys.row(id)))?;
            let arrays = match self.key_arrays.take() {
                None => new,
                Some(old) => old
                    .iter()
                    .zip(&new)
                    .map(|(o, n)| arrow::compute::concat(&[o.as_ref(), n.as_ref()]))
                    .collect::<Result<_, _>>()?,
            };
            self.key_arrays = Some(arrays);
        }
        Ok(self.key_arrays.as_deref().unwrap_or_default())
    }

    /// Drops the slots before `horizon`, and the groups then left without entries.
    fn drop_before(&mut self, horizon: i64) -> Result<(), ArrowError> {
        if self
            .slots
            .first_key_value()
            .is_none_or(|(at, _)| *at >= horizon)
        {
            return Ok(());
        }
        self.slots = self.slots.split_off(&horizon);
        self.forget_gone()
    }

    /// Forgets the groups no slot has entries of (a function deleted, an ephemeral
    /// dimension), renumbering the others, once the groups have doubled since the
    /// last look and a quarter or more of them are gone.
    fn forget_gone(&mut self) -> Result<(), ArrowError> {
        let groups = self.keys.num_rows();
        if groups < FORGET_FROM || groups < 2 * self.live_at_look {
            return Ok(());
        }
        let mut live = vec![false; groups];
        for slot in self.slots.values() {
            for id in &slot.ids {
                live[*id as usize] = true;
            }
        }
        let count = live.iter().filter(|l| **l).count();
        self.live_at_look = count;
        if count * 4 > groups * 3 {
            return Ok(());
        }
        let mut renumbered = vec![u32::MAX; groups];
        let mut keys = self
            .layout
            .converter
            .empty_rows(count, self.keys.size() / groups.max(1) * count);
        let mut index = HashTable::with_capacity(count);
        for (old, _) in live.iter().enumerate().filter(|(_, l)| **l) {
            let row = self.keys.row(old);
            let hash = self.hasher.hash_one(row.as_ref());
            renumbered[old] = intern(&mut keys, &mut index, &self.hasher, row, hash)?;
        }
        for slot in self.slots.values_mut() {
            for id in &mut slot.ids {
                *id = renumbered[*id as usize];
            }
        }
        self.keys = keys;
        self.index = index;
        self.scratch = Vec::new();
        self.key_arrays = None;
        Ok(())
    }

    /// The groups with entries in slots `first..=last`, their partial states merged:
    /// the grouping columns, then the states, as DataFusion's merge of the same
    /// partials gives them.
    pub(crate) fn merged(
        &mut self,
        first: i64,
        last: Option<i64>,
    ) -> Result<RecordBatch, ArrowError> {
        let groups = self.keys.num_rows();
        let mut present = vec![false; groups];
        let mut out: Vec<Column> = self
            .layout
            .states
            .iter()
            .map(|(_, repr, _)| Column::new(*repr, groups))
            .collect();
        let selected: Box<dyn Iterator<Item = &Slot>> = match last {
            Some(last) if last < first => Box::new(std::iter::empty()),
            Some(last) => Box::new(self.slots.range(first..=last).map(|(_, s)| s)),
            None => Box::new(self.slots.range(first..).map(|(_, s)| s)),
        };
        for slot in selected {
            for id in &slot.ids {
                present[*id as usize] = true;
            }
            for ((column, from), (merge, _, _)) in
                out.iter_mut().zip(&slot.columns).zip(&self.layout.states)
            {
                column.accumulate(*merge, &slot.ids, from);
            }
        }
        let ids: Vec<u32> = present
            .iter()
            .enumerate()
            .filter(|(_, p)| **p)
            .map(|(id, _)| id as u32)
            .collect();
        let keys = self.key_arrays()?;
        let mut columns: Vec<ArrayRef> = if ids.len() == groups {
            keys.to_vec()
        } else {
            let at = arrow::array::UInt32Array::from(ids.clone());
            keys.iter()
                .map(|k| arrow::compute::take(k.as_ref(), &at, None))
                .collect::<Result<_, _>>()?
        };
        for (column, (_, _, data_type)) in out.iter().zip(&self.layout.states) {
            debug_assert_eq!(column.len(), groups);
            columns.push(column.array(&ids, data_type)?);
        }
        RecordBatch::try_new(Arc::clone(&self.layout.merged), columns)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use arrow::array::{StringArray, TimestampMicrosecondArray};
    use arrow::datatypes::TimeUnit;
    use proptest::prelude::*;

    use super::*;

    /// A partial row: slot, two keys, then a sum (f64), a maximum (i64), a count and
    /// a minimum (a timestamp); `None` is a null state.
    type Row = (i64, u8, i64, Option<i64>, Option<i64>, i64, Option<i64>);

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("__slot", DataType::Int64, true),
            Field::new("__g0", DataType::Utf8, true),
            Field::new("__g1", DataType::Int64, true),
            Field::new("__p0", DataType::Float64, true),
            Field::new("__p1", DataType::Int64, true),
            Field::new("__p2", DataType::Int64, true),
            Field::new(
                "__p3",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                true,
            ),
        ]))
    }

    const MERGES: [Merge; 4] = [Merge::Sum, Merge::Max, Merge::Sum, Merge::Min];

    fn batch(rows: &[Row]) -> RecordBatch {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| format!("account-{}", r.1)),
            )),
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.2))),
            Arc::new(Float64Array::from_iter(
                rows.iter().map(|r| r.3.map(|v| v as f64)),
            )),
            Arc::new(Int64Array::from_iter(rows.iter().map(|r| r.4))),
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.5))),
            Arc::new(
                TimestampMicrosecondArray::from_iter(rows.iter().map(|r| r.6)).with_timezone("UTC"),
            ),
        ];
        RecordBatch::try_new(schema(), columns).unwrap()
    }

    /// What merging the rows of slots `first..=last` gives, one line per group, sorted.
    fn reference(rows: &[Row], first: i64, last: i64) -> Vec<String> {
        let mut groups: BTreeMap<(u8, i64), [Option<i64>; 4]> = BTreeMap::new();
        for r in rows.iter().filter(|r| (first..=last).contains(&r.0)) {
            let g = groups.entry((r.1, r.2)).or_default();
            let merge = |acc: Option<i64>, v: Option<i64>, f: fn(i64, i64) -> i64| match (acc, v) {
                (Some(a), Some(v)) => Some(f(a, v)),
                (a, v) => a.or(v),
            };
            g[0] = merge(g[0], r.3, |a, b| a + b);
            g[1] = merge(g[1], r.4, i64::max);
            g[2] = merge(g[2], Some(r.5), |a, b| a + b);
            g[3] = merge(g[3], r.6, i64::min);
        }
        groups
            .into_iter()
            .map(|((a, b), s)| format!("account-{a} {b} {s:?}"))
            .collect()
    }

    fn lines(batch: &RecordBatch) -> Vec<String> {
        let int = |c: usize, i: usize| {
            let c = cast(batch.column(c), &DataType::Int64).unwrap();
            let c = c.as_primitive::<Int64Type>();
            c.is_valid(i).then(|| c.value(i))
        };
        let floats = batch.column(2).as_primitive::<Float64Type>();
        let mut out: Vec<String> = (0..batch.num_rows())
            .map(|i| {
                let sum = floats.is_valid(i).then(|| floats.value(i) as i64);
                let states = [sum, int(3, i), int(4, i), int(5, i)];
                format!(
                    "{} {} {states:?}",
                    batch.column(0).as_string::<i32>().value(i),
                    int(1, i).unwrap()
                )
            })
            .collect();
        out.sort();
        out
    }

    fn row() -> impl Strategy<Value = Row> {
        (
            0i64..8,
            0u8..6,
            0i64..3,
            proptest::option::of(-5i64..5),
            proptest::option::of(-5i64..5),
            0i64..3,
            proptest::option::of(0i64..1000),
        )
    }

    proptest! {
        /// Folds of partials (a group more than once in a fold and in a slot, null
        /// states, horizons moving on) merge as a plain merge of the rows kept does,
        /// over any range of slots, across slot merges and groups forgotten.
        #[test]
        fn merged_by_id_is_the_merge_of_the_rows(
            folds in proptest::collection::vec(
                (proptest::collection::vec(row(), 0..12), 0i64..3), 1..12),
            ranges in proptest::collection::vec((0i64..9, 0i64..9), 1..6),
        ) {
            let layout = Layout::new(&schema(), 2, &MERGES).expect("held by group");
            let mut grouped = Grouped::new(Arc::new(layout));
            let mut kept: Vec<Row> = Vec::new();
            let mut horizon = 0;
            for (rows, moved) in folds {
                horizon += moved;
                grouped.absorb(&batch(&rows), horizon).unwrap();
                kept.retain(|r| r.0 >= horizon);
                kept.extend(rows.into_iter().filter(|r| r.0 >= horizon));
                for (a, b) in &ranges {
                    let first = horizon + a;
                    let last = first + b;
                    let merged = grouped.merged(first, Some(last)).unwrap();
                    prop_assert_eq!(lines(&merged), reference(&kept, first, last));
                }
                let open = grouped.merged(horizon, None).unwrap();
                prop_assert_eq!(lines(&open), reference(&kept, horizon, i64::MAX));
            }
        }
    }

    #[test]
    fn groups_gone_from_every_slot_are_forgotten() {
        let layout = Layout::new(&schema(), 2, &MERGES).expect("held by group");
        let mut grouped = Grouped::new(Arc::new(layout));
        let old: Vec<Row> = (0..6)
            .flat_map(|a| (0..3).map(move |b| (0, a, b, Some(1), Some(1), 1, Some(1))))
            .collect();
        grouped.absorb(&batch(&old), 0).unwrap();
        assert_eq!(grouped.keys.num_rows(), 18);
        let new = [
            (5, 2, 1, Some(4), Some(7), 2, None),
            (6, 5, 0, None, Some(-3), 1, Some(9)),
        ];
        grouped.absorb(&batch(&new), 5).unwrap();
        // 16 of 18 gone: forgotten, the two left renumbered.
        assert_eq!(grouped.keys.num_rows(), 2);
        assert_eq!(
            lines(&grouped.merged(5, None).unwrap()),
            reference(&new, 5, i64::MAX)
        );
        assert_eq!(
            lines(&grouped.merged(0, Some(4)).unwrap()),
            Vec::<String>::new()
        );
        // A group seen again gets an id again.
        grouped.absorb(&batch(&old[..1]), 5).unwrap();
        assert_eq!(grouped.keys.num_rows(), 2);
        grouped
            .absorb(&batch(&[(7, 0, 0, Some(1), None, 1, None)]), 5)
            .unwrap();
        assert_eq!(grouped.keys.num_rows(), 3);
    }

    #[test]
    fn kinds_not_held_by_group_are_left_to_datafusion() {
        let with = |data_type: DataType, merge: Merge, groups: usize| {
            let mut fields = vec![Field::new("__slot", DataType::Int64, true)];
            fields.extend((0..groups).map(|g| Field::new(format!("__g{g}"), DataType::Utf8, true)));
            fields.push(Field::new("__p0", data_type, true));
            Layout::new(&Arc::new(Schema::new(fields)), groups, &[merge]).is_some()
        };
        assert!(with(DataType::Float64, Merge::Sum, 1));
        assert!(with(DataType::Int64, Merge::Max, 2));
        assert!(!with(DataType::Decimal128(38, 2), Merge::Sum, 1));
        assert!(!with(DataType::Utf8, Merge::Min, 1));
        assert!(!with(
            DataType::Timestamp(TimeUnit::Microsecond, None),
            Merge::Sum,
            1
        ));
        // No grouping: an aggregate over no rows is still a row.
        assert!(!with(DataType::Float64, Merge::Sum, 0));
    }
}
