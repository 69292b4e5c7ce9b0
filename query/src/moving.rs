//! A rule's plan above its incremental leaves, made at any instant without planning
//! its SQL again.
//!
//! The part of a rule above its leaves may use `now()` (`s.last_seen < now() -
//! INTERVAL '15 minutes'`, `extract(epoch FROM now()) - ...`). The optimizer folds
//! those into literals, so that plan holds for one instant only, and planning the
//! statement again each round costs milliseconds per rule. But [`crate::shape`] plans
//! every statement at three instants: where the three plans differ only in literals
//! that moved by exactly the time between the instants (a timestamp in any unit, epoch
//! seconds or milliseconds as a number), the plan at another instant is the first one
//! with those literals moved as far. The plan so made is checked against the second
//! and the third before it is trusted; anything else that moves with the time (a date,
//! `date_trunc`) keeps the rule planned at each round.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use arrow::datatypes::{DataType, Field, FieldRef};
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{DataFusionError, ScalarValue};
use datafusion::logical_expr::expr::ScalarFunction;
use datafusion::logical_expr::{
    ColumnarValue, Expr, LogicalPlan, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF,
    ScalarUDFImpl, Signature, Volatility,
};

/// How a literal moves with now(): by `per_ms` of its units per millisecond, or by one
/// unit per `ms_per` milliseconds (seconds).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Rate {
    PerMs(i64),
    Seconds,
}

/// A plan with the literals that move with now() known (see the module docs).
#[derive(Debug, Clone)]
pub(crate) struct Moving {
    /// The plan at instant `at_ms`.
    plan: LogicalPlan,
    at_ms: i64,
    /// The literals that move (their place in [`map_literals`]' walk), and how.
    moves: Vec<(usize, Rate)>,
}

/// `plan` with each literal replaced by `f(its place in the walk, it)`; the walk is
/// the same for every plan of the same structure.
fn map_literals(
    plan: LogicalPlan,
    f: &mut impl FnMut(usize, ScalarValue) -> datafusion::error::Result<ScalarValue>,
) -> datafusion::error::Result<LogicalPlan> {
    map_literal_exprs(plan, &mut |place, literal| match literal {
        Expr::Literal(value, meta) => Ok(Expr::Literal(f(place, value)?, meta)),
        other => Ok(other),
    })
}

/// `plan` with each literal expression replaced by `f(its place in the walk, it)`.
fn map_literal_exprs(
    plan: LogicalPlan,
    f: &mut impl FnMut(usize, Expr) -> datafusion::error::Result<Expr>,
) -> datafusion::error::Result<LogicalPlan> {
    let mut place = 0;
    plan.transform_down_with_subqueries(|node| {
        node.map_expressions(|e| {
            e.transform_down(|e| match e {
                literal @ Expr::Literal(..) => {
                    let here = place;
                    place += 1;
                    Ok(Transformed::yes(f(here, literal)?))
                }
                other => Ok(Transformed::no(other)),
            })
        })
    })
    .map(|t| t.data)
}

fn literals(plan: &LogicalPlan) -> datafusion::error::Result<Vec<ScalarValue>> {
    let mut out = Vec::new();
    map_literals(plan.clone(), &mut |_, v| {
        out.push(v.clone());
        Ok(v)
    })?;
    Ok(out)
}

/// How `v0` (at `t0` ms) moved to `v1` (at `t1`), if it moved as an instant does.
fn rate(v0: &ScalarValue, v1: &ScalarValue, t0: i64, t1: i64) -> Option<Rate> {
    use ScalarValue as S;
    let ms = t1 - t0;
    let by = |d: i64| -> Option<Rate> {
        [1_000_000, 1_000, 1]
            .into_iter()
            .find(|per| ms.checked_mul(*per) == Some(d))
            .map(Rate::PerMs)
            .or_else(|| (ms % 1000 == 0 && d == ms / 1000).then_some(Rate::Seconds))
    };
    match (v0, v1) {
        (S::TimestampNanosecond(Some(a), z0), S::TimestampNanosecond(Some(b), z1)) if z0 == z1 => {
            (b - a == ms * 1_000_000).then_some(Rate::PerMs(1_000_000))
        }
        (S::TimestampMicrosecond(Some(a), z0), S::TimestampMicrosecond(Some(b), z1))
            if z0 == z1 =>
        {
            (b - a == ms * 1_000).then_some(Rate::PerMs(1_000))
        }
        (S::TimestampMillisecond(Some(a), z0), S::TimestampMillisecond(Some(b), z1))
            if z0 == z1 =>
        {
            (b - a == ms).then_some(Rate::PerMs(1))
        }
        (S::TimestampSecond(Some(a), z0), S::TimestampSecond(Some(b), z1)) if z0 == z1 => {
            (ms % 1000 == 0 && b - a == ms / 1000).then_some(Rate::Seconds)
        }
        (S::Int64(Some(a)), S::Int64(Some(b))) => by(b.checked_sub(*a)?),
        (S::Float64(Some(a)), S::Float64(Some(b))) => {
            let d = b - a;
            // Whole numbers only: a fraction of a unit is not exact.
            (d.fract() == 0.0 && d.abs() < 9.0e15 && a.fract() == 0.0).then(|| by(d as i64))?
        }
        _ => None,
    }
}

/// `v` moved from its instant by `ms` milliseconds at `rate`; `None` where that is not
/// exact (a part of a second in seconds).
fn moved(v: &ScalarValue, rate: Rate, ms: i64) -> Option<ScalarValue> {
    use ScalarValue as S;
    let d = match rate {
        Rate::PerMs(per) => ms.checked_mul(per)?,
        Rate::Seconds if ms % 1000 == 0 => ms / 1000,
        Rate::Seconds => return None,
    };
    Some(match v {
        S::TimestampNanosecond(Some(a), z) => {
            S::TimestampNanosecond(Some(a.checked_add(d)?), z.clone())
        }
        S::TimestampMicrosecond(Some(a), z) => {
            S::TimestampMicrosecond(Some(a.checked_add(d)?), z.clone())
        }
        S::TimestampMillisecond(Some(a), z) => {
            S::TimestampMillisecond(Some(a.checked_add(d)?), z.clone())
        }
        S::TimestampSecond(Some(a), z) => S::TimestampSecond(Some(a.checked_add(d)?), z.clone()),
        S::Int64(Some(a)) => S::Int64(Some(a.checked_add(d)?)),
        S::Float64(Some(a)) if d.abs() < (1 << 52) => S::Float64(Some(a + d as f64)),
        _ => return None,
    })
}

impl Moving {
    /// From one statement's plan at three instants (epoch ms), if the three differ
    /// only in literals that move with the instant.
    pub(crate) fn new(plans: [(&LogicalPlan, i64); 3]) -> datafusion::error::Result<Option<Self>> {
        let [(p0, t0), (p1, t1), (p2, t2)] = plans;
        let (l0, l1, l2) = (literals(p0)?, literals(p1)?, literals(p2)?);
        if l0.len() != l1.len() || l0.len() != l2.len() {
            return Ok(None);
        }
        let mut moves = Vec::new();
        for (place, ((v0, v1), v2)) in l0.iter().zip(&l1).zip(&l2).enumerate() {
            if v0 == v1 && v0 == v2 {
                continue;
            }
            match (rate(v0, v1, t0, t1), rate(v0, v2, t0, t2)) {
                (Some(a), Some(b)) if a == b => moves.push((place, a)),
                _ => return Ok(None),
            }
        }
        let moving = Self {
            plan: p0.clone(),
            at_ms: t0,
            moves,
        };
        // Trusted only where it makes the other two plans exactly.
        for (p, t) in [(p1, t1), (p2, t2)] {
            if moving.at(t)?.as_ref() != Some(p) {
                return Ok(None);
            }
        }
        Ok(Some(moving))
    }

    /// The plan, if nothing in it moves with now(): the same at every instant.
    pub(crate) fn fixed(&self) -> Option<&LogicalPlan> {
        self.moves.is_empty().then_some(&self.plan)
    }

    /// The plan with each literal that moves read from `instant` when it runs: the
    /// same plan at every instant, set by [`Instant::set`] before each run. Planned
    /// once, it runs at any instant the literals move to exactly.
    pub(crate) fn parameterised(&self) -> datafusion::error::Result<(LogicalPlan, Instant)> {
        let instant = Instant {
            planned_ms: self.at_ms,
            offset_ms: Arc::new(AtomicI64::new(0)),
            seconds: self.moves.iter().any(|(_, r)| *r == Rate::Seconds),
        };
        let mut next = 0;
        let plan = map_literal_exprs(self.plan.clone(), &mut |place, literal| {
            let Some((at, rate)) = self.moves.get(next) else {
                return Ok(literal);
            };
            let Expr::Literal(value, _) = &literal else {
                return Ok(literal);
            };
            if *at != place {
                return Ok(literal);
            }
            next += 1;
            let udf = ScalarUDF::new_from_impl(Moved {
                name: format!("__moved_{place}"),
                value: value.clone(),
                rate: *rate,
                offset_ms: Arc::clone(&instant.offset_ms),
                signature: Signature::nullary(Volatility::Volatile),
            });
            Ok(Expr::ScalarFunction(ScalarFunction::new_udf(
                Arc::new(udf),
                Vec::new(),
            )))
        })?;
        if next != self.moves.len() {
            return Err(DataFusionError::Internal(
                "a plan above incremental leaves lost a literal".into(),
            ));
        }
        Ok((plan, instant))
    }

    /// The plan at `at_ms`; `None` where a literal cannot move that far exactly.
    pub(crate) fn at(&self, at_ms: i64) -> datafusion::error::Result<Option<LogicalPlan>> {
        if self.moves.is_empty() {
            return Ok(Some(self.plan.clone()));
        }
        let ms = at_ms - self.at_ms;
        let mut next = 0;
        let mut inexact = false;
        let plan = map_literals(self.plan.clone(), &mut |place, value| {
            let Some((at, rate)) = self.moves.get(next) else {
                return Ok(value);
            };
            if *at != place {
                return Ok(value);
            }
            next += 1;
            match moved(&value, *rate, ms) {
                Some(v) => Ok(v),
                None => {
                    inexact = true;
                    Ok(value)
                }
            }
        })?;
        if next != self.moves.len() {
            return Err(DataFusionError::Internal(
                "a plan above incremental leaves lost a literal".into(),
            ));
        }
        Ok((!inexact).then_some(plan))
    }
}

/// The round's instant a [`Moving::parameterised`] plan reads its moving literals at.
#[derive(Debug, Clone)]
pub(crate) struct Instant {
    planned_ms: i64,
    offset_ms: Arc<AtomicI64>,
    /// A literal moves by whole seconds (epoch seconds).
    seconds: bool,
}

impl Instant {
    /// Moves the literals to `at_ms`; false where they cannot move there exactly (a
    /// part of a second in epoch seconds): the plan is not run then.
    pub(crate) fn set(&self, at_ms: i64) -> bool {
        let Some(offset) = at_ms.checked_sub(self.planned_ms) else {
            return false;
        };
        if self.seconds && offset % 1000 != 0 {
            return false;
        }
        self.offset_ms.store(offset, Ordering::SeqCst);
        true
    }
}

/// A literal that moves with now(), as a function of no arguments: its value at the
/// instant planned, moved by the offset its [`Instant`] holds when evaluated.
/// Volatile, so that no optimizer folds it back into a literal.
#[derive(Debug)]
struct Moved {
    name: String,
    value: ScalarValue,
    rate: Rate,
    offset_ms: Arc<AtomicI64>,
    signature: Signature,
}

impl PartialEq for Moved {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.offset_ms, &other.offset_ms)
            && self.name == other.name
            && self.value == other.value
            && self.rate == other.rate
    }
}

impl Eq for Moved {}

impl std::hash::Hash for Moved {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.name.hash(state);
        self.value.hash(state);
    }
}

impl ScalarUDFImpl for Moved {
    fn name(&self) -> &str {
        &self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _: &[DataType]) -> datafusion::error::Result<DataType> {
        Ok(self.value.data_type())
    }

    fn return_field_from_args(&self, _: ReturnFieldArgs) -> datafusion::error::Result<FieldRef> {
        // As the literal it stands for: never null.
        Ok(Arc::new(Field::new(
            self.name(),
            self.value.data_type(),
            self.value.is_null(),
        )))
    }

    fn invoke_with_args(&self, _: ScalarFunctionArgs) -> datafusion::error::Result<ColumnarValue> {
        let ms = self.offset_ms.load(Ordering::SeqCst);
        moved(&self.value, self.rate, ms)
            .map(ColumnarValue::Scalar)
            .ok_or_else(|| {
                DataFusionError::Execution(format!("{} cannot move {ms} ms exactly", self.value))
            })
    }
}
