//! Functions whose result can be far larger than their arguments (`repeat`, `lpad`,
//! `rpad`, `array_repeat`, `array_resize`, `range`, `generate_series`), bounded by
//! the statement's memory limit before they allocate.
//!
//! DataFusion's memory pool counts what operators hold (sorts, joins, aggregations),
//! not the values an expression makes: `repeat('x', 300000000)` would allocate 300 MB
//! outside any limit. Each of these functions is registered in every session wrapped
//! in [`Bounded`], which works out the size of the result from the arguments and
//! fails with a resources error past the limit, before anything is allocated. Other
//! functions make results in proportion to their inputs.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, IntervalMonthDayNanoArray};
use arrow::compute::cast;
use arrow::compute::kernels::length::length;
use arrow::datatypes::{DataType, FieldRef, Int64Type, TimeUnit};
use datafusion::common::Result;
use datafusion::logical_expr::simplify::{ExprSimplifyResult, SimplifyContext};
use datafusion::logical_expr::sort_properties::{ExprProperties, SortProperties};
use datafusion::logical_expr::{
    ColumnarValue, Documentation, Expr, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF,
    ScalarUDFImpl, Signature,
};
use datafusion::prelude::SessionContext;

use crate::limits::over_limit;

/// How a function's result size follows from its arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Growth {
    /// `repeat(text, n)`: the text's bytes `n` times.
    Repeat,
    /// `lpad`/`rpad(text, n, ...)`: `n` characters of up to 4 bytes.
    Pad,
    /// `array_repeat(value, n)`, `array_resize(array, n, ...)`: `n` elements.
    Elements,
    /// `range`/`generate_series(start, stop[, step])`.
    Series,
}

/// The functions wrapped, by name.
const BOUNDED: &[(&str, Growth)] = &[
    ("repeat", Growth::Repeat),
    ("lpad", Growth::Pad),
    ("rpad", Growth::Pad),
    ("array_repeat", Growth::Elements),
    ("array_resize", Growth::Elements),
    ("range", Growth::Series),
    ("generate_series", Growth::Series),
];

/// Bytes counted per element of a list.
const ELEMENT_BYTES: u128 = 16;

/// A function that fails instead of making a result over `limit` bytes.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct Bounded {
    inner: ScalarUDF,
    growth: Growth,
    limit: usize,
}

/// Replaces this session's amplifying functions with ones bounded by `limit` bytes.
pub fn register(ctx: &SessionContext, limit: usize) {
    for (name, growth) in BOUNDED {
        if let Some(inner) = ctx.state().scalar_functions().get(*name) {
            let bounded = Bounded {
                inner: inner.as_ref().clone(),
                growth: *growth,
                limit,
            };
            ctx.register_udf(ScalarUDF::new_from_impl(bounded));
        }
    }
}

fn int64(array: &ArrayRef) -> Result<Vec<i64>> {
    let cast = cast(array, &DataType::Int64)?;
    let values = cast.as_primitive::<Int64Type>();
    Ok((0..values.len())
        .map(|i| {
            if values.is_valid(i) {
                values.value(i)
            } else {
                0
            }
        })
        .collect())
}

fn byte_lengths(array: &ArrayRef) -> Result<Vec<i64>> {
    match array.data_type() {
        DataType::Utf8View | DataType::BinaryView => int64(&length(&cast(
            array,
            &if matches!(array.data_type(), DataType::Utf8View) {
                DataType::LargeUtf8
            } else {
                DataType::LargeBinary
            },
        )?)?),
        DataType::Utf8
        | DataType::LargeUtf8
        | DataType::Binary
        | DataType::LargeBinary
        | DataType::FixedSizeBinary(_) => int64(&length(array)?),
        DataType::Dictionary(_, value) => byte_lengths(&cast(array, value)?),
        _ => Ok(vec![0; array.len()]),
    }
}

/// Nanoseconds of the time since the epoch in `array` (dates and timestamps), wide
/// enough for any date.
fn nanos(array: &ArrayRef) -> Result<Vec<i128>> {
    let (raw, unit): (ArrayRef, i128) = match array.data_type() {
        DataType::Timestamp(unit, _) => (
            Arc::clone(array),
            match unit {
                TimeUnit::Second => 1_000_000_000,
                TimeUnit::Millisecond => 1_000_000,
                TimeUnit::Microsecond => 1_000,
                TimeUnit::Nanosecond => 1,
            },
        ),
        _ => (cast(array, &DataType::Date32)?, 86_400_000_000_000),
    };
    let raw = cast(&raw, &DataType::Int64)?;
    Ok(int64(&raw)?.into_iter().map(|v| v as i128 * unit).collect())
}

/// Elements of each row's series.
fn series(arrays: &[ArrayRef], rows: usize) -> Result<Vec<u128>> {
    let temporal = arrays.first().is_some_and(|a| {
        matches!(
            a.data_type(),
            DataType::Date32 | DataType::Date64 | DataType::Timestamp(..)
        )
    });
    if temporal {
        let (Some(start), Some(stop), Some(step)) = (arrays.first(), arrays.get(1), arrays.get(2))
        else {
            return Ok(vec![0; rows]);
        };
        let (start, stop) = (nanos(start)?, nanos(stop)?);
        let step = cast(
            step,
            &DataType::Interval(arrow::datatypes::IntervalUnit::MonthDayNano),
        )?;
        let Some(step) = step.as_any().downcast_ref::<IntervalMonthDayNanoArray>() else {
            return Ok(vec![0; rows]);
        };
        const DAY: i128 = 86_400_000_000_000;
        return Ok((0..rows)
            .map(|i| {
                let interval = step.value(i);
                // The shortest a month can be: the most elements.
                let width = (interval.months as i128 * 28 * DAY
                    + interval.days as i128 * DAY
                    + interval.nanoseconds as i128)
                    .unsigned_abs();
                let span = (stop[i] - start[i]).unsigned_abs();
                span.checked_div(width).map_or(0, |n| n + 1)
            })
            .collect());
    }
    if !arrays.first().is_some_and(|a| a.data_type().is_integer()) {
        return Ok(vec![0; rows]);
    }
    let column = |i: usize, default: i64| -> Result<Vec<i64>> {
        match arrays.get(i) {
            Some(array) => int64(array),
            None => Ok(vec![default; rows]),
        }
    };
    let (start, stop, step) = match arrays.len() {
        1 => (vec![0; rows], column(0, 0)?, vec![1; rows]),
        _ => (column(0, 0)?, column(1, 0)?, column(2, 1)?),
    };
    Ok((0..rows)
        .map(|i| {
            let span = (stop[i] as i128 - start[i] as i128).unsigned_abs();
            span.checked_div(step[i].unsigned_abs() as u128)
                .map_or(0, |n| n + 1)
        })
        .collect())
}

impl Bounded {
    /// Bytes the result of a call with `args` would take, at least.
    fn result_bytes(&self, args: &ScalarFunctionArgs) -> Result<u128> {
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let rows = arrays.first().map_or(args.number_rows, |a| a.len());
        let count = |i: usize| -> Result<Vec<i64>> {
            match arrays.get(i) {
                Some(array) => int64(array),
                None => Ok(vec![0; rows]),
            }
        };
        let positive = |n: i64| n.max(0) as u128;
        Ok(match self.growth {
            Growth::Repeat => {
                let (text, times) = (
                    arrays
                        .first()
                        .map(byte_lengths)
                        .transpose()?
                        .unwrap_or_default(),
                    count(1)?,
                );
                text.iter()
                    .zip(&times)
                    .map(|(len, n)| positive(*len) * positive(*n))
                    .sum()
            }
            Growth::Pad => count(1)?.into_iter().map(|n| positive(n) * 4).sum(),
            Growth::Elements => count(1)?
                .into_iter()
                .map(|n| positive(n) * ELEMENT_BYTES)
                .sum(),
            Growth::Series => series(&arrays, rows)?
                .into_iter()
                .map(|n| n * ELEMENT_BYTES / 2)
                .sum(),
        })
    }
}

impl ScalarUDFImpl for Bounded {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn aliases(&self) -> &[String] {
        self.inner.aliases()
    }

    fn schema_name(&self, args: &[Expr]) -> Result<String> {
        self.inner.inner().schema_name(args)
    }

    fn signature(&self) -> &Signature {
        self.inner.signature()
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        self.inner.return_type(arg_types)
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        self.inner.return_field_from_args(args)
    }

    fn is_strict(&self) -> bool {
        self.inner.inner().is_strict()
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let bytes = self.result_bytes(&args)?;
        if bytes > self.limit as u128 {
            return Err(over_limit(
                self.limit,
                self.inner.name(),
                usize::try_from(bytes).unwrap_or(usize::MAX),
            ));
        }
        self.inner.invoke_with_args(args)
    }

    fn simplify(&self, args: Vec<Expr>, info: &SimplifyContext) -> Result<ExprSimplifyResult> {
        self.inner.simplify(args, info)
    }

    fn short_circuits(&self) -> bool {
        self.inner.short_circuits()
    }

    fn output_ordering(&self, inputs: &[ExprProperties]) -> Result<SortProperties> {
        self.inner.output_ordering(inputs)
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        self.inner.coerce_types(arg_types)
    }

    fn documentation(&self) -> Option<&Documentation> {
        self.inner.documentation()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn run(ctx: &SessionContext, sql: &str) -> Result<usize> {
        let batches = ctx.sql(sql).await?.collect().await?;
        Ok(batches.iter().map(|b| b.num_rows()).sum())
    }

    #[tokio::test]
    async fn amplifying_functions_stop_at_the_limit_before_allocating() {
        let ctx = SessionContext::new();
        register(&ctx, 1 << 20);
        for sql in [
            "SELECT repeat('x', 300000000)",
            "SELECT repeat('ab', 20000000000)",
            "SELECT lpad('x', 300000000)",
            "SELECT rpad('x', 300000000, 'yz')",
            "SELECT array_repeat(1, 100000000)",
            "SELECT range(1, 10000000000)",
            "SELECT generate_series(0, 100000000, 1)",
            "SELECT range(TIMESTAMP '1970-01-01', TIMESTAMP '2100-01-01', INTERVAL '1 second')",
            "SELECT range(DATE '0001-01-01', DATE '9999-12-31', INTERVAL '1 day')",
            "SELECT repeat(v, 1000) FROM (VALUES (repeat('x', 2000)), ('y')) t(v)",
        ] {
            let err = match run(&ctx, sql).await {
                Ok(rows) => panic!("{sql}: {rows} rows"),
                Err(e) => e.to_string(),
            };
            assert!(err.contains("statement memory limit"), "{sql}: {err}");
        }
        // Within the limit they work as before.
        for sql in [
            "SELECT repeat('x', 1000)",
            "SELECT lpad('x', 10, '0')",
            "SELECT range(1, 1000)",
            "SELECT range(DATE '2026-01-01', DATE '2026-12-31', INTERVAL '1 day')",
            "SELECT array_repeat('a', 3)",
        ] {
            assert_eq!(run(&ctx, sql).await.unwrap(), 1, "{sql}");
        }
        let batches = ctx
            .sql("SELECT repeat('ab', 3) AS r")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let value = arrow::util::display::array_value_to_string(batches[0].column(0), 0).unwrap();
        assert_eq!(value, "ababab");
    }
}
