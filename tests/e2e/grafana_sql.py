#!/usr/bin/env python3
"""Grafana's PostgreSQL data source query expansion, ported to Python (stdlib only).

A Grafana panel query against the built-in PostgreSQL data source
(`grafana-postgresql-datasource`, formerly `postgres`) reaches the database only after
three rewrites, applied in this order; `expand()` applies the same three:

1. In the browser, template variables are interpolated
   (`templateSrv.replace(rawSql, scopedVars, ds.interpolateVariable)`): `$var`,
   `${var}`, `${var:format}` and `[[var]]`; the panel's scoped variables
   `$__interval` / `$__interval_ms`; the global `$__from` / `$__to`.
   Sources: grafana/grafana
   `public/app/plugins/datasource/grafana-postgresql-datasource/datasource.ts`
   (interpolateVariable), `packages/grafana-sql/src/datasource/SqlDatasource.ts`
   (applyTemplateVariables, metricFindQuery), grafana/scenes
   `packages/scenes/src/variables/interpolation/sceneInterpolator.ts`,
   `.../interpolation/formatRegistry.ts`, `packages/scenes/src/variables/constants.ts`
   (VARIABLE_REGEX), `.../variables/macros/timeMacros.ts` ($__from/$__to),
   `.../variables/variants/MultiValueVariable.ts` (CustomAllValue).
2. In the Grafana server, the SQL engine's global substitutions (`sqleng.Interpolate`):
   `$__interval_ms`, `$__interval`, `$__unixEpochFrom()`, `$__unixEpochTo()`.
   Source: grafana/grafana `pkg/tsdb/grafana-postgresql-datasource/sqleng/sql_engine.go`.
3. The PostgreSQL macro engine (`postgresMacroEngine.Interpolate`): comments are
   stripped (recent Grafana), then every `$__name(args)` is expanded: `$__time`,
   `$__timeEpoch`, `$__timeFilter`, `$__timeFrom`, `$__timeTo`, `$__timeGroup`,
   `$__timeGroupAlias`, `$__unixEpochFilter`, `$__unixEpochNanoFilter`,
   `$__unixEpochNanoFrom`, `$__unixEpochNanoTo`, `$__unixEpochGroup`,
   `$__unixEpochGroupAlias`. Any other `$name(...)` is an error ("unknown macro").
   Source: grafana/grafana `pkg/tsdb/grafana-postgresql-datasource/macros.go`, with
   interval parsing/formatting from grafana/grafana-plugin-sdk-go
   `backend/gtime/gtime.go`. (The PostgreSQL data source has no `$__schema`,
   `$__table` or `$__column` macros; those belong to other data sources.)

Variables passed to `expand()` follow what Grafana hands `interpolateVariable`:

- a `str` is a single selected value: its `'` are doubled and it is inserted WITHOUT
  quotes (`WHERE account_id = '$account'` is how a dashboard quotes it);
- a `list` (what a multi-value variable, or "All" without a custom all value, yields)
  becomes `'a','b'` (each quoted, `'` doubled), for `IN ($var)`;
- an `int`/`float` is inserted as is;
- `Raw("...")` is a custom "All" value, inserted unformatted (Grafana never escapes a
  variable's custom all value); `all_value(dashboard, name)` reads it from a dashboard.

An explicit `${var:format}` bypasses the data source's formatting, as in Grafana
(`sqlstring`, `singlequote`, `doublequote`, `csv`, `pipe`, `json`, `raw`, `glob`,
`text`, `join`, `distributed`, `regex`, `date`; `date` only for `$__from`/`$__to`).

Run `python3 tests/e2e/grafana_sql.py` to check the port against expectations copied
from Grafana's own tests.
"""

from __future__ import annotations

import calendar
import json
import math
import re
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Iterable, Mapping, Sequence, Union

__all__ = [
    "MacroError",
    "Raw",
    "expand",
    "interpolate_variables",
    "sqleng_interpolate",
    "macro_interpolate",
    "strip_sql_comments",
    "parse_interval",
    "format_interval",
    "dashboard_targets",
    "variable_queries",
    "variable_definitions",
    "all_value",
]


class MacroError(ValueError):
    """A macro Grafana would reject (Grafana fails the query with this message)."""


class Raw(str):
    """A value inserted as is: a variable's custom "All" value."""


VariableValue = Union[str, int, float, Sequence[str], Raw]

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_NS_PER_S = 1_000_000_000


# ---------------------------------------------------------------------------
# Go time helpers
# ---------------------------------------------------------------------------


def _utc(t: datetime) -> datetime:
    if t.tzinfo is None:
        return t.replace(tzinfo=timezone.utc)
    return t.astimezone(timezone.utc)


def _unix(t: datetime) -> int:
    """Go's `t.UTC().Unix()`: whole seconds since the epoch, rounded down."""
    d = _utc(t) - _EPOCH
    return d.days * 86_400 + d.seconds


def _unix_nano(t: datetime) -> int:
    """Go's `t.UTC().UnixNano()`."""
    d = _utc(t) - _EPOCH
    return (d.days * 86_400 + d.seconds) * _NS_PER_S + d.microseconds * 1_000


def _unix_milli(t: datetime) -> int:
    d = _utc(t) - _EPOCH
    return (d.days * 86_400 + d.seconds) * 1_000 + d.microseconds // 1_000


def _rfc3339nano(t: datetime) -> str:
    """Go's `t.UTC().Format(time.RFC3339Nano)`: fraction without trailing zeros, `Z`."""
    t = _utc(t)
    s = t.strftime("%Y-%m-%dT%H:%M:%S")
    if t.microsecond:
        s += "." + f"{t.microsecond:06d}".rstrip("0")
    return s + "Z"


def _go_format_float_g(x: float) -> str:
    """Go's `fmt.Sprintf("%v", x)` for a float64: `strconv.FormatFloat(x, 'g', -1, 64)`.

    Shortest digits that round-trip (Python's repr gives the same digits); %e form when
    the decimal exponent is < -4 or >= 6 ("if precision was the shortest possible, use
    precision 6 for this decision", strconv/ftoa.go), with a two-digit exponent at least.
    """
    if x != x:
        return "NaN"
    if x in (float("inf"), float("-inf")):
        return "+Inf" if x > 0 else "-Inf"
    if x == 0:
        return "-0" if str(x).startswith("-") else "0"
    neg = x < 0
    sign, digit_tuple, exponent = Decimal(repr(abs(x))).normalize().as_tuple()
    digits = "".join(map(str, digit_tuple))
    nd = len(digits)
    dp = nd + exponent  # position of the decimal point relative to the digits
    exp = dp - 1
    if exp < -4 or exp >= 6:
        mant = digits[0] + ("." + digits[1:] if nd > 1 else "")
        e_sign = "-" if exp < 0 else "+"
        e_abs = abs(exp)
        out = f"{mant}e{e_sign}{e_abs:02d}"
    elif dp <= 0:
        out = "0." + "0" * (-dp) + digits
    elif dp >= nd:
        out = digits + "0" * (dp - nd)
    else:
        out = digits[:dp] + "." + digits[dp:]
    return ("-" if neg else "") + out


_GO_UNITS_NS = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,  # U+00B5 micro sign
    "\u03bcs": 1_000,  # U+03BC Greek small letter mu
    "ms": 1_000_000,
    "s": _NS_PER_S,
    "m": 60 * _NS_PER_S,
    "h": 3600 * _NS_PER_S,
}
_GO_DURATION_PART = re.compile(r"([0-9]*)(?:\.([0-9]*))?([^0-9.]+)")


def _go_parse_duration(s: str) -> int:
    """Go's `time.ParseDuration`, in nanoseconds."""
    orig = s
    neg = False
    if s[:1] in ("-", "+"):
        neg = s[0] == "-"
        s = s[1:]
    if s == "0":
        return 0
    if s == "":
        raise MacroError(f'time: invalid duration "{orig}"')
    total = 0
    pos = 0
    while pos < len(s):
        m = _GO_DURATION_PART.match(s, pos)
        if not m or (m.group(1) == "" and not m.group(2)):
            raise MacroError(f'time: invalid duration "{orig}"')
        whole, frac, unit = m.group(1), m.group(2) or "", m.group(3)
        # the unit ends at the next digit or '.'
        if unit not in _GO_UNITS_NS:
            if unit == "":
                raise MacroError(f'time: missing unit in duration "{orig}"')
            raise MacroError(f'time: unknown unit "{unit}" in duration "{orig}"')
        scale = _GO_UNITS_NS[unit]
        value = int(whole or "0") * scale
        if frac:
            value += int(Decimal("0." + frac) * scale)
        total += value
        pos = m.end()
    return -total if neg else total


def _go_add_date(t: datetime, years: int, months: int, days: int) -> datetime:
    """Go's `t.AddDate(y, m, d)` (out-of-range day/month normalised, e.g. Jan 31 + 1M = Mar 3)."""
    month0 = t.month - 1 + months
    year = t.year + years + month0 // 12
    month = month0 % 12 + 1
    first = t.replace(year=year, month=month, day=1)
    return first + timedelta(days=t.day - 1 + days)


_DATE_UNIT = re.compile(r"^(\d+)([dwMy])$")


def parse_interval(inp: str, now: datetime | None = None) -> int:
    """`gtime.ParseInterval` (grafana-plugin-sdk-go backend/gtime/gtime.go), in nanoseconds.

    Ported from:
        var dateUnitPattern = regexp.MustCompile(`^(\\d+)([dwMy])$`)
        func ParseInterval(inp string) (time.Duration, error) {
            dur, period, err := parse(inp)
            ...
            now := time.Now().UTC()
            switch period {
            case "d": return now.AddDate(0, 0, num).Sub(now), nil
            case "w": return now.AddDate(0, 0, num*7).Sub(now), nil
            case "M": return now.AddDate(0, num, 0).Sub(now), nil
            case "y": return now.AddDate(num, 0, 0).Sub(now), nil
            }
    `d` and `w` are exact in UTC; `M` and `y` depend on `now` (the current UTC time,
    as in Grafana, unless given).
    """
    m = _DATE_UNIT.match(inp)
    if not m:
        return _go_parse_duration(inp)
    num = int(m.group(1))
    period = m.group(2)
    base = _utc(now) if now is not None else datetime.now(timezone.utc)
    if period == "d":
        later = _go_add_date(base, 0, 0, num)
    elif period == "w":
        later = _go_add_date(base, 0, 0, num * 7)
    elif period == "M":
        later = _go_add_date(base, 0, num, 0)
    else:
        later = _go_add_date(base, num, 0, 0)
    d = later - base
    return (d.days * 86_400 + d.seconds) * _NS_PER_S + d.microseconds * 1_000


def format_interval(ns: int) -> str:
    """`gtime.FormatInterval`: the largest whole unit, e.g. 1m, 2h, 3d, 200ms.

    Ported from:
        if inter >= year { return fmt.Sprintf("%dy", inter/year) }
        if inter >= day { return fmt.Sprintf("%dd", inter/day) }
        if inter >= time.Hour { return fmt.Sprintf("%dh", inter/time.Hour) }
        if inter >= time.Minute { return fmt.Sprintf("%dm", inter/time.Minute) }
        if inter >= time.Second { return fmt.Sprintf("%ds", inter/time.Second) }
        if inter >= time.Millisecond { return fmt.Sprintf("%dms", inter/time.Millisecond) }
        return "1ms"
    (The browser formats the panel's `$__interval` with kbn.secondsToHms, which gives
    the same string for every interval Grafana computes.)
    """
    hour = 3600 * _NS_PER_S
    day = 24 * hour
    year = 365 * day
    for unit, suffix in (
        (year, "y"),
        (day, "d"),
        (hour, "h"),
        (60 * _NS_PER_S, "m"),
        (_NS_PER_S, "s"),
        (1_000_000, "ms"),
    ):
        if ns >= unit:
            return f"{ns // unit}{suffix}"
    return "1ms"


def _seconds(ns: int) -> float:
    """Go's `Duration.Seconds()`: `float64(sec) + float64(nsec)/1e9`."""
    sec, nsec = divmod(ns, _NS_PER_S)
    return float(sec) + float(nsec) / 1e9


def _interval_ns(interval: timedelta | int | float | str) -> int:
    if isinstance(interval, timedelta):
        return (interval.days * 86_400 + interval.seconds) * _NS_PER_S + interval.microseconds * 1_000
    if isinstance(interval, str):
        return parse_interval(interval)
    return int(interval * _NS_PER_S)  # seconds


# ---------------------------------------------------------------------------
# Stage 1: the browser's template variable interpolation
# ---------------------------------------------------------------------------

# grafana/scenes packages/scenes/src/variables/constants.ts:
#   export const VARIABLE_REGEX = /\$(\w+)|\[\[(\w+?)(?::(\w+))?\]\]|\${(\w+)(?:\.([^:^\}]+))?(?::([^\}]+))?}/g;
VARIABLE_REGEX = re.compile(
    r"\$(\w+)|\[\[(\w+?)(?::(\w+))?\]\]|\$\{(\w+)(?:\.([^:^\}]+))?(?::([^\}]+))?\}",
    re.ASCII,
)


def _quote_literal(value: object) -> str:
    # public/app/plugins/datasource/grafana-postgresql-datasource/PostgresQueryModel.ts:
    #   quoteLiteral(value: string) { return "'" + value.replace(/'/g, "''") + "'"; }
    return "'" + _js_string(value).replace("'", "''") + "'"


def _js_string(value: object) -> str:
    """JavaScript's String(value) for the values a variable can hold."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e21:
            return str(int(value))
        return repr(value)
    if isinstance(value, (list, tuple)):
        return ",".join(_js_string(v) for v in value)
    return str(value)


def _postgres_interpolate_variable(value: object) -> str:
    """PostgresDatasource.interpolateVariable (the format function SQL panels use).

    grafana/grafana public/app/plugins/datasource/grafana-postgresql-datasource/datasource.ts:
        interpolateVariable = (value: string | string[] | number, variable: VariableWithMultiSupport) => {
          if (typeof value === 'string') {
            // For single string values, just escape quotes (don't add outer quotes)
            // The quotes are provided by the query template: WHERE x = '$var'
            return String(value).replace(/'/g, "''");
          }
          if (typeof value === 'number') { return value; }
          if (Array.isArray(value)) {
            const quotedValues = value.map((v) => this.getQueryModel().quoteLiteral(v));
            return quotedValues.join(',');
          }
          return value;
        };
    (Older releases, via packages/grafana-sql/src/datasource/SqlDatasource.ts, quoted a
    *string* value too when the variable was multi or includeAll; a multi-value
    variable's value is an array in Grafana's scenes, so `IN ($var)` reads the same.)
    """
    if isinstance(value, str):
        return value.replace("'", "''")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _js_string(value)
    if isinstance(value, (list, tuple)):
        return ",".join(_quote_literal(v) for v in value)
    return _js_string(value)


_SQL_ESCAPE_MAP = {"'": "''", '"': '\\"'}
_REGEX_SPECIAL = re.compile(r"[\\^$*+?.()|[\]{}/]")


def _format_value(value: object, fmt: str, name: str) -> str:
    """grafana/scenes formatRegistry.ts formatters for an explicit `${var:format}`."""
    args = fmt.split(":")
    fid, args = args[0], args[1:]
    is_list = isinstance(value, (list, tuple))
    if fid == "raw":
        return _js_string(value)
    if fid == "sqlstring":
        # const SQL_ESCAPE_MAP = { "'": "''", '"': '\\"' };
        # return map(value, (v) => `'${replace(v, /'|"/g, (m) => SQL_ESCAPE_MAP[m] ?? '')}'`).join(',')
        def q(v: object) -> str:
            return "'" + re.sub(r"'|\"", lambda m: _SQL_ESCAPE_MAP[m.group(0)], _js_string(v)) + "'"

        return ",".join(q(v) for v in value) if is_list else q(value)
    if fid == "singlequote":
        def sq(v: object) -> str:
            return "'" + _js_string(v).replace("'", "\\'") + "'"

        return ",".join(sq(v) for v in value) if is_list else sq(value)
    if fid == "doublequote":
        def dq(v: object) -> str:
            return '"' + _js_string(v).replace('"', '\\"') + '"'

        return ",".join(dq(v) for v in value) if is_list else dq(value)
    if fid == "csv":
        return ",".join(_js_string(v) for v in value) if is_list else _js_string(value)
    if fid == "pipe":
        return "|".join(_js_string(v) for v in value) if is_list else _js_string(value)
    if fid == "join":
        sep = args[0] if args else ","
        return sep.join(_js_string(v) for v in value) if is_list else _js_string(value)
    if fid == "json":
        if isinstance(value, str):
            return value
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    if fid == "glob":
        if is_list and len(value) > 1:
            return "{" + ",".join(_js_string(v) for v in value) + "}"
        return _js_string(value)
    if fid == "text":
        return " + ".join(_js_string(v) for v in value) if is_list else _js_string(value)
    if fid == "distributed":
        if is_list:
            return ",".join(_js_string(v) if i == 0 else f"{name}={_js_string(v)}" for i, v in enumerate(value))
        return _js_string(value)
    if fid == "regex":
        def esc(v: object) -> str:
            return _REGEX_SPECIAL.sub(lambda m: "\\" + m.group(0), _js_string(v))

        if is_list:
            return esc(value[0]) if len(value) == 1 else "(" + "|".join(esc(v) for v in value) + ")"
        return esc(value)
    if fid == "date":
        if isinstance(value, (int, float)):
            ms = int(value)
        else:
            ms = int(str(value))
        arg = args[0] if args else "iso"
        if arg == "ms":
            return _js_string(value)
        if arg == "seconds":
            # `${Math.round(nrValue! / 1000)}`: halves round up
            return str(math.floor(ms / 1000 + 0.5))
        if arg == "iso":
            t = _EPOCH + timedelta(milliseconds=ms)
            return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"
        raise ValueError(f"date format {':'.join(args)!r} is not supported by this port")
    raise ValueError(f"variable format {fid!r} is not supported by this port")


def interpolate_variables(
    sql: str,
    variables: Mapping[str, VariableValue] | None = None,
    scoped: Mapping[str, object] | None = None,
    _default_format: str | None = None,
) -> str:
    """Stage 1: `templateSrv.replace(sql, scopedVars, ds.interpolateVariable)`.

    `scoped` holds the scoped/global variables (`__interval`, `__interval_ms`,
    `__from`, `__to`), looked up before `variables`, like scopedVars before dashboard
    variables in sceneInterpolator.lookupFormatVariable. A name found in neither is
    left as written (sceneInterpolator: `if (!variable) { return match; }`).

    grafana/scenes sceneInterpolator.ts:
        return target.replace(VARIABLE_REGEX, (match, var1, var2, fmt2, var3, fieldPath, fmt3) => {
          const variableName = var1 || var2 || var3;
          const fmt = fmt2 || fmt3 || format;
          ...
          const value = formatValue(sceneObject, variable, variable.getValue(fieldPath), fmt);
    """
    variables = variables or {}
    scoped = scoped or {}

    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(4)
        fmt = m.group(3) or m.group(6)
        if name in scoped:
            value = scoped[name]
        elif name in variables:
            value = variables[name]
        else:
            return m.group(0)
        if value is None:
            return ""
        if isinstance(value, Raw):
            # CustomAllValue.formatter(): returns this._value for every format but
            # text/percentencode/queryparam; formatValue() then interpolates it again
            # (with no format function, i.e. the default glob format).
            if fmt == "text":
                return "All"
            others = {k: v for k, v in variables.items() if k != name}
            return interpolate_variables(str(value), others, scoped, "glob")
        fmt = fmt or _default_format
        if fmt:
            return _format_value(value, fmt, name)
        return _postgres_interpolate_variable(value)

    return VARIABLE_REGEX.sub(repl, sql)


# ---------------------------------------------------------------------------
# Stage 2: sqleng.Interpolate, the global substitutions of every SQL data source
# ---------------------------------------------------------------------------


def sqleng_interpolate(sql: str, time_from: datetime, time_to: datetime, interval_ns: int) -> str:
    """grafana/grafana pkg/tsdb/grafana-postgresql-datasource/sqleng/sql_engine.go:

        var Interpolate = func(query backend.DataQuery, timeRange backend.TimeRange, timeInterval string, sql string) string {
            interval := query.Interval
            sql = strings.ReplaceAll(sql, "$__interval_ms", strconv.FormatInt(interval.Milliseconds(), 10))
            sql = strings.ReplaceAll(sql, "$__interval", gtime.FormatInterval(interval))
            sql = strings.ReplaceAll(sql, "$__unixEpochFrom()", fmt.Sprintf("%d", timeRange.From.UTC().Unix()))
            sql = strings.ReplaceAll(sql, "$__unixEpochTo()", fmt.Sprintf("%d", timeRange.To.UTC().Unix()))
            return sql
        }
    """
    sql = sql.replace("$__interval_ms", str(interval_ns // 1_000_000))
    sql = sql.replace("$__interval", format_interval(interval_ns))
    sql = sql.replace("$__unixEpochFrom()", str(_unix(time_from)))
    sql = sql.replace("$__unixEpochTo()", str(_unix(time_to)))
    return sql


# ---------------------------------------------------------------------------
# Stage 3: the PostgreSQL macro engine
# ---------------------------------------------------------------------------


def _is_dollar_tag_char(c: str) -> bool:
    # func isDollarTagChar(b byte) bool {
    #     return (b >= 'a' && b <= 'z') || (b >= 'A' && b <= 'Z') || (b >= '0' && b <= '9') || b == '_'
    # }
    return ("a" <= c <= "z") or ("A" <= c <= "Z") or ("0" <= c <= "9") or c == "_"


def strip_sql_comments(sql: str) -> str:
    """`stripSQLComments` of pkg/tsdb/grafana-postgresql-datasource/macros.go.

    "removes SQL line comments (--) and block comments (/* */) from the query string.
    It is quote-aware: comment sequences inside single-quoted string literals,
    double-quoted identifiers, and dollar-quoted strings are preserved verbatim."
    Recent Grafana calls it first in postgresMacroEngine.Interpolate ("so that only
    macros present in executable SQL are evaluated"); releases before it kept
    comments (and expanded macros inside them), and the newest keep an inert
    SQLCommenter tag (`/*k='v',...*/` with no macro in it).
    """
    out: list[str] = []
    i, n = 0, len(sql)

    def consume_quoted(i: int, q: str) -> int:
        out.append(q)
        i += 1
        while i < n:
            if sql[i] == q:
                out.append(sql[i])
                i += 1
                if i < n and sql[i] == q:
                    out.append(sql[i])
                    i += 1
                else:
                    break
            else:
                out.append(sql[i])
                i += 1
        return i

    def consume_dollar_quoted(i: int, closing: str) -> int:
        out.append(closing)
        i += len(closing)
        while i < n:
            if sql.startswith(closing, i):
                out.append(closing)
                i += len(closing)
                break
            out.append(sql[i])
            i += 1
        return i

    while i < n:
        c = sql[i]
        if c == "$":
            j = i + 1
            if j < n and sql[j] == "$":
                i = consume_dollar_quoted(i, "$$")
            elif j < n and _is_dollar_tag_char(sql[j]) and not ("0" <= sql[j] <= "9"):
                k = j + 1
                while k < n and _is_dollar_tag_char(sql[k]):
                    k += 1
                if k < n and sql[k] == "$":
                    i = consume_dollar_quoted(i, sql[i : k + 1])
                else:
                    out.append(c)  # not a dollar-quote (e.g. a Grafana macro $__timeFrom())
                    i += 1
            else:
                out.append(c)  # not a dollar-quote (e.g. $1 positional parameter)
                i += 1
        elif c == "'":
            i = consume_quoted(i, "'")
        elif c == '"':
            i = consume_quoted(i, '"')
        elif i + 1 < n and c == "/" and sql[i + 1] == "*":
            i += 2
            while i + 1 < n:
                if sql[i] == "*" and sql[i + 1] == "/":
                    i += 2
                    break
                i += 1
            else:
                # unterminated block comment: Go's loop leaves i at n-1 and the
                # outer loop copies that last byte
                pass
        elif i + 1 < n and c == "-" and sql[i + 1] == "-":
            while i < n and sql[i] != "\n":
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


# const rsIdentifier = `([_a-zA-Z0-9]+)`
# const sExpr = `\$` + rsIdentifier + `\(([^\)]*)\)`
_MACRO_RE = re.compile(r"\$([_a-zA-Z0-9]+)\(([^\)]*)\)")


def _setup_fillmode(fill: str) -> None:
    # sqleng.SetupFillmode: "NULL" -> null, "previous" -> previous, else a float
    # ("error parsing fill value %v"). The fill itself is applied to Grafana's result
    # frame, never to the SQL, so only the validation is ported.
    if fill in ("NULL", "previous"):
        return
    try:
        float(fill)
    except ValueError:
        raise MacroError(f"error parsing fill value {fill}") from None


def _evaluate_macro(
    name: str, args: list[str], time_from: datetime, time_to: datetime, timescaledb: bool, now: datetime | None
) -> str:
    """postgresMacroEngine.evaluateMacro (pkg/tsdb/grafana-postgresql-datasource/macros.go)."""
    if name == "__time":
        # return fmt.Sprintf("%s AS \"time\"", args[0]), nil
        if not args:
            raise MacroError(f"missing time column argument for macro {name}")
        return f'{args[0]} AS "time"'
    if name == "__timeEpoch":
        # return fmt.Sprintf("extract(epoch from %s) as \"time\"", args[0]), nil
        if not args:
            raise MacroError(f"missing time column argument for macro {name}")
        return f'extract(epoch from {args[0]}) as "time"'
    if name == "__timeFilter":
        # return fmt.Sprintf("%s BETWEEN '%s' AND '%s'", args[0],
        #     timeRange.From.UTC().Format(time.RFC3339Nano), timeRange.To.UTC().Format(time.RFC3339Nano)), nil
        if not args:
            raise MacroError(f"missing time column argument for macro {name}")
        return f"{args[0]} BETWEEN '{_rfc3339nano(time_from)}' AND '{_rfc3339nano(time_to)}'"
    if name == "__timeFrom":
        # return fmt.Sprintf("'%s'", timeRange.From.UTC().Format(time.RFC3339Nano)), nil
        return f"'{_rfc3339nano(time_from)}'"
    if name == "__timeTo":
        return f"'{_rfc3339nano(time_to)}'"
    if name in ("__timeGroup", "__unixEpochGroup"):
        # if len(args) < 2 { return "", fmt.Errorf("macro %v needs time column and interval and optional fill value", name) }
        # interval, err := gtime.ParseInterval(strings.Trim(args[1], `'`))
        # if err != nil { return "", fmt.Errorf("error parsing interval %v", args[1]) }
        # if len(args) == 3 { err := sqleng.SetupFillmode(query, interval, args[2]) ... }
        if len(args) < 2:
            raise MacroError(f"macro {name} needs time column and interval and optional fill value")
        try:
            interval = parse_interval(args[1].strip("'"), now)
        except MacroError:
            raise MacroError(f"error parsing interval {args[1]}") from None
        if len(args) == 3:
            _setup_fillmode(args[2])
        secs = _seconds(interval)
        if name == "__unixEpochGroup":
            # return fmt.Sprintf("floor((%s)/%v)*%v", args[0], interval.Seconds(), interval.Seconds()), nil
            g = _go_format_float_g(secs)
            return f"floor(({args[0]})/{g})*{g}"
        if timescaledb:
            # return fmt.Sprintf("time_bucket('%.3fs',%s)", interval.Seconds(), args[0]), nil
            return f"time_bucket('{secs:.3f}s',{args[0]})"
        # return fmt.Sprintf("floor(extract(epoch from %s)/%v)*%v", args[0], interval.Seconds(), interval.Seconds()), nil
        g = _go_format_float_g(secs)
        return f"floor(extract(epoch from {args[0]})/{g})*{g}"
    if name in ("__timeGroupAlias", "__unixEpochGroupAlias"):
        # tg, err := m.evaluateMacro(timeRange, query, "__timeGroup", args)
        # if err == nil { return tg + " AS \"time\"", nil }
        base = name[: -len("Alias")]
        return _evaluate_macro(base, args, time_from, time_to, timescaledb, now) + ' AS "time"'
    if name == "__unixEpochFilter":
        # return fmt.Sprintf("%s >= %d AND %s <= %d", args[0], timeRange.From.UTC().Unix(), args[0], timeRange.To.UTC().Unix()), nil
        if not args:
            raise MacroError(f"missing time column argument for macro {name}")
        return f"{args[0]} >= {_unix(time_from)} AND {args[0]} <= {_unix(time_to)}"
    if name == "__unixEpochNanoFilter":
        if not args:
            raise MacroError(f"missing time column argument for macro {name}")
        return f"{args[0]} >= {_unix_nano(time_from)} AND {args[0]} <= {_unix_nano(time_to)}"
    if name == "__unixEpochNanoFrom":
        return str(_unix_nano(time_from))
    if name == "__unixEpochNanoTo":
        return str(_unix_nano(time_to))
    # default: return "", fmt.Errorf("unknown macro %q", name)
    raise MacroError(f'unknown macro "{name}"')


def macro_interpolate(
    sql: str,
    time_from: datetime,
    time_to: datetime,
    *,
    timescaledb: bool = False,
    strip_comments: bool = True,
    now: datetime | None = None,
) -> str:
    """postgresMacroEngine.Interpolate (pkg/tsdb/grafana-postgresql-datasource/macros.go):

        sql = stripSQLComments(sql)
        rExp, _ := regexp.Compile(sExpr)
        sql = m.ReplaceAllStringSubmatchFunc(rExp, sql, func(groups []string) string {
            // detect if $__timeGroup is supposed to add AS time for pre 5.3 compatibility
            // if there is a ',' directly after the macro call $__timeGroup is probably used
            // in the old way. Inside window function ORDER BY $__timeGroup will be followed
            // by ')'
            if groups[1] == "__timeGroup" {
                if index := strings.Index(sql, groups[0]); index >= 0 {
                    index += len(groups[0])
                    // check for character after macro expression
                    if len(sql) > index && sql[index] == ',' {
                        groups[1] = "__timeGroupAlias"
                    }
                }
            }
            args := strings.Split(groups[2], ",")
            for i, arg := range args {
                args[i] = strings.Trim(arg, " ")
            }
            res, err := m.evaluateMacro(timeRange, query, groups[1], args)
            ...
    Note `strings.Index` finds the FIRST occurrence of the macro text, so every
    identical `$__timeGroup(...)` follows the character after the first one.
    """
    if strip_comments:
        sql = strip_sql_comments(sql)
    original = sql

    def repl(m: re.Match[str]) -> str:
        whole, name, arg_text = m.group(0), m.group(1), m.group(2)
        if name == "__timeGroup":
            index = original.find(whole)
            if index >= 0:
                index += len(whole)
                if len(original) > index and original[index] == ",":
                    name = "__timeGroupAlias"
        args = [a.strip(" ") for a in arg_text.split(",")]
        return _evaluate_macro(name, args, time_from, time_to, timescaledb, now)

    return _MACRO_RE.sub(repl, sql)


# ---------------------------------------------------------------------------
# All three stages
# ---------------------------------------------------------------------------


def expand(
    sql: str,
    time_from: datetime,
    time_to: datetime,
    interval: timedelta | str | int | float,
    variables: Mapping[str, VariableValue] | None = None,
    *,
    timescaledb: bool = False,
    strip_comments: bool = True,
    now: datetime | None = None,
) -> str:
    """The SQL Grafana sends to the database for a panel query `sql`.

    `time_from`/`time_to` is the dashboard's time range (Grafana sends it in whole
    milliseconds), `interval` the panel's `$__interval` (a timedelta, seconds, or a
    Grafana interval string like "1m"); `variables` as described in the module
    docstring. Naive datetimes are taken as UTC.
    """
    interval_ns = _interval_ns(interval)
    scoped: dict[str, object] = {
        # SceneQueryRunner's request.scopedVars:
        #   __interval: { text: interval, value: interval },
        #   __interval_ms: { text: intervalMs.toString(), value: intervalMs },
        "__interval": format_interval(interval_ns),
        "__interval_ms": interval_ns // 1_000_000,
        # timeMacros.ts TimeFromAndToMacro: timeRange.state.value.from.valueOf()
        "__from": _unix_milli(time_from),
        "__to": _unix_milli(time_to),
    }
    sql = interpolate_variables(sql, variables, scoped)
    sql = sqleng_interpolate(sql, time_from, time_to, interval_ns)
    return macro_interpolate(
        sql, time_from, time_to, timescaledb=timescaledb, strip_comments=strip_comments, now=now
    )


# ---------------------------------------------------------------------------
# Dashboards
# ---------------------------------------------------------------------------


def _load(path: str | Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _walk_panels(panels: Iterable[dict]) -> Iterable[dict]:
    for p in panels or []:
        yield p
        # a collapsed row keeps its panels inside it
        if p.get("type") == "row" and p.get("panels"):
            yield from _walk_panels(p["panels"])


def dashboard_targets(path: str | Path) -> list[tuple[str, str, str, dict]]:
    """(dashboard title, panel title, panel type, target) for every query of every panel,
    including the panels of collapsed rows (and of schema-v1 `rows`)."""
    dash = _load(path)
    title = dash.get("title", "")
    panels = list(dash.get("panels") or [])
    for row in dash.get("rows") or []:  # pre-5.0 schema
        panels.extend(row.get("panels") or [])
    out = []
    for p in _walk_panels(panels):
        if p.get("type") == "row":
            continue
        for t in p.get("targets") or []:
            out.append((title, p.get("title", ""), p.get("type", ""), t))
    return out


def _variable_sql(var: dict) -> str:
    q = var.get("query")
    if isinstance(q, dict):  # SQL variable editor's query object
        return q.get("rawSql") or q.get("query") or ""
    return q or var.get("definition") or ""


def variable_queries(path: str | Path) -> list[tuple[str, str, dict]]:
    """(name, SQL, variable) for every query-type template variable of a dashboard."""
    dash = _load(path)
    return [
        (v["name"], _variable_sql(v), v)
        for v in (dash.get("templating") or {}).get("list") or []
        if v.get("type") == "query"
    ]


def variable_definitions(path: str | Path) -> dict[str, dict]:
    """name -> the template variable's JSON, for every variable of a dashboard."""
    dash = _load(path)
    return {v["name"]: v for v in (dash.get("templating") or {}).get("list") or []}


def all_value(path: str | Path, name: str) -> Raw | None:
    """The custom "All" value of variable `name` as `Raw`, or None if it has none (then
    "All" means the list of every option, which `expand()` takes as a list)."""
    v = variable_definitions(path)[name]
    if v.get("includeAll") and v.get("allValue"):
        return Raw(v["allValue"])
    return None


# ---------------------------------------------------------------------------
# Self-check: expectations copied from Grafana's tests
# ---------------------------------------------------------------------------


def _self_check() -> int:
    checks = 0

    def eq(got: object, want: object, what: str) -> None:
        nonlocal checks
        if got != want:
            raise AssertionError(f"{what}:\n  got  {got!r}\n  want {want!r}")
        checks += 1

    def mi(sql: str, frm: datetime, to: datetime, ts: bool = False) -> str:
        return macro_interpolate(sql, frm, to, timescaledb=ts)

    # pkg/tsdb/grafana-postgresql-datasource/macros_test.go, TestMacroEngine,
    # "Given a time range between 2018-04-12 00:00 and 2018-04-12 00:05"
    frm = datetime(2018, 4, 12, 18, 0, 0, tzinfo=timezone.utc)
    to = frm + timedelta(minutes=5)
    eq(mi("select $__time(time_column)", frm, to), 'select time_column AS "time"', "__time")
    eq(mi("select min($__time(time_column))", frm, to), 'select min(time_column AS "time")', "__time in aggregation")
    eq(
        mi("WHERE $__timeFilter(time_column)", frm, to),
        "WHERE time_column BETWEEN '2018-04-12T18:00:00Z' AND '2018-04-12T18:05:00Z'",
        "__timeFilter",
    )
    eq(mi("select $__timeFrom()", frm, to), "select '2018-04-12T18:00:00Z'", "__timeFrom")
    eq(mi("select $__timeTo()", frm, to), "select '2018-04-12T18:05:00Z'", "__timeTo")
    eq(
        mi("SELECT $__timeGroup(time_column,'5m'), value", frm, to),
        'SELECT floor(extract(epoch from time_column)/300)*300 AS "time", value',
        "__timeGroup pre 5.3 compatibility",
    )
    eq(
        mi("SELECT $__timeGroup(time_column,'5m') as time, value", frm, to),
        "SELECT floor(extract(epoch from time_column)/300)*300 as time, value",
        "__timeGroup pre 5.3 compatibility, aliased",
    )
    eq(mi("SELECT $__timeGroup(time_column,'5m')", frm, to), "SELECT floor(extract(epoch from time_column)/300)*300", "__timeGroup")
    eq(
        mi("SELECT $__timeGroupAlias(time_column,'5m')", frm, to),
        'SELECT floor(extract(epoch from time_column)/300)*300 AS "time"',
        "__timeGroupAlias",
    )
    eq(mi("$__timeGroup(time_column , '5m')", frm, to), "floor(extract(epoch from time_column)/300)*300", "__timeGroup spaces")
    eq(
        mi("$__timeGroupAlias(time_column , '5m')", frm, to),
        'floor(extract(epoch from time_column)/300)*300 AS "time"',
        "__timeGroupAlias spaces",
    )
    eq(mi("GROUP BY $__timeGroup(time_column,'5m')", frm, to, True), "GROUP BY time_bucket('300.000s',time_column)", "timescaledb")
    eq(mi("GROUP BY $__timeGroup(time_column , '5m')", frm, to, True), "GROUP BY time_bucket('300.000s',time_column)", "timescaledb spaces")
    eq(mi("GROUP BY $__timeGroup(time_column , '12d')", frm, to, True), "GROUP BY time_bucket('1036800.000s',time_column)", "timescaledb 12d")
    eq(mi("GROUP BY $__timeGroup(time_column , '20ms')", frm, to, True), "GROUP BY time_bucket('0.020s',time_column)", "timescaledb 20ms")
    eq(mi("select $__unixEpochFilter(time)", frm, to), f"select time >= {1523556000} AND time <= {1523556300}", "__unixEpochFilter")
    eq(
        mi("select $__unixEpochNanoFilter(time)", frm, to),
        "select time >= 1523556000000000000 AND time <= 1523556300000000000",
        "__unixEpochNanoFilter",
    )
    eq(mi("select $__unixEpochNanoFrom()", frm, to), "select 1523556000000000000", "__unixEpochNanoFrom")
    eq(mi("select $__unixEpochNanoTo()", frm, to), "select 1523556300000000000", "__unixEpochNanoTo")
    eq(
        mi("SELECT $__unixEpochGroup(time_column+time_adjustment,'5m')", frm, to),
        "SELECT floor((time_column+time_adjustment)/300)*300",
        "__unixEpochGroup",
    )
    eq(
        mi("SELECT $__unixEpochGroupAlias(time_column+time_adjustment,'5m')", frm, to),
        'SELECT floor((time_column+time_adjustment)/300)*300 AS "time"',
        "__unixEpochGroupAlias",
    )
    # "Given a time range between 1960-02-01 07:00 and 1965-02-03 08:00"
    frm = datetime(1960, 2, 1, 7, 0, 0, tzinfo=timezone.utc)
    to = datetime(1965, 2, 3, 8, 0, 0, tzinfo=timezone.utc)
    eq(
        mi("WHERE $__timeFilter(time_column)", frm, to),
        "WHERE time_column BETWEEN '1960-02-01T07:00:00Z' AND '1965-02-03T08:00:00Z'",
        "__timeFilter before 1970",
    )
    # the Go test formats from.Unix() / from.UnixNano(); calendar.timegm is the same count
    f_s, t_s = calendar.timegm(frm.utctimetuple()), calendar.timegm(to.utctimetuple())
    eq(f_s, -312915600, "1960-02-01T07:00:00Z in Unix seconds")
    eq(mi("select $__unixEpochFilter(time)", frm, to), f"select time >= {f_s} AND time <= {t_s}", "__unixEpochFilter before 1970")
    eq(
        mi("select $__unixEpochNanoFilter(time)", frm, to),
        f"select time >= {f_s * 10**9} AND time <= {t_s * 10**9}",
        "__unixEpochNanoFilter before 1970",
    )
    # "Given a time range between 1960-02-01 07:00:00.5 and 1980-02-03 08:00:00.5"
    frm = datetime(1960, 2, 1, 7, 0, 0, 500_000, tzinfo=timezone.utc)
    to = datetime(1980, 2, 3, 8, 0, 0, 500_000, tzinfo=timezone.utc)
    eq(_rfc3339nano(frm), "1960-02-01T07:00:00.5Z", "RFC3339Nano with fraction")
    eq(_rfc3339nano(to), "1980-02-03T08:00:00.5Z", "RFC3339Nano with fraction")
    eq(
        mi("WHERE $__timeFilter(time_column)", frm, to),
        "WHERE time_column BETWEEN '1960-02-01T07:00:00.5Z' AND '1980-02-03T08:00:00.5Z'",
        "__timeFilter with fractional seconds",
    )
    # unknown macros fail the query: default: fmt.Errorf("unknown macro %q", name)
    try:
        mi("SELECT $__nope(x)", frm, to)
    except MacroError as e:
        eq(str(e), 'unknown macro "__nope"', "unknown macro")
    else:
        raise AssertionError("unknown macro must fail")

    # macros_test.go TestStripSQLComments
    for inp, want in [
        ("SELECT 1 -- a comment", "SELECT 1 "),
        ("SELECT /* a comment */ 1", "SELECT  1"),
        ("SELECT /*\n  multiline\n  comment\n*/ 1", "SELECT  1"),
        ("SELECT '-- not a comment' AS label", "SELECT '-- not a comment' AS label"),
        ("SELECT '/* not a comment */' AS label", "SELECT '/* not a comment */' AS label"),
        ('SELECT "col -- name" FROM t', 'SELECT "col -- name" FROM t'),
        ('SELECT "col /* name */" FROM t', 'SELECT "col /* name */" FROM t'),
        ("SELECT 'it''s fine -- not a comment' AS v", "SELECT 'it''s fine -- not a comment' AS v"),
        ('SELECT "col ""-- name""" FROM t', 'SELECT "col ""-- name""" FROM t'),
        ("SELECT '-- in string' AS a -- real comment", "SELECT '-- in string' AS a "),
        ("SELECT '/* in string */' AS a /* real comment */", "SELECT '/* in string */' AS a "),
        ("SELECT col FROM t WHERE col > 1", "SELECT col FROM t WHERE col > 1"),
        ("SELECT 1 -- comment\nFROM t", "SELECT 1 \nFROM t"),
        ("SELECT $$ -- not a comment $$", "SELECT $$ -- not a comment $$"),
        ("SELECT $$ /* not a comment */ $$", "SELECT $$ /* not a comment */ $$"),
        ("SELECT $body$ -- not a comment $body$", "SELECT $body$ -- not a comment $body$"),
        ("SELECT $__timeFrom() -- comment", "SELECT $__timeFrom() "),
        ("SELECT $1 -- comment", "SELECT $1 "),
    ]:
        eq(strip_sql_comments(inp), want, f"stripSQLComments {inp!r}")

    # sqleng/sql_engine_test.go "Handle interpolating $__interval and $__interval_ms"
    frm = datetime(2018, 4, 12, 18, 0, 0, tzinfo=timezone.utc)
    to = frm + timedelta(minutes=5)
    text = "$__interval $__timeGroupAlias(time,$__interval) $__interval_ms"
    eq(sqleng_interpolate(text, frm, to, 600 * _NS_PER_S), "10m $__timeGroupAlias(time,10m) 600000", "10m interval")
    eq(sqleng_interpolate(text, frm, to, 4 * _NS_PER_S), "4s $__timeGroupAlias(time,4s) 4000", "4s interval")
    eq(sqleng_interpolate(text, frm, to, 200_000_000), "200ms $__timeGroupAlias(time,200ms) 200", "200ms interval")
    eq(sqleng_interpolate("select $__unixEpochFrom()", frm, to, 60 * _NS_PER_S), "select 1523556000", "__unixEpochFrom")
    eq(sqleng_interpolate("select $__unixEpochTo()", frm, to, 60 * _NS_PER_S), "select 1523556300", "__unixEpochTo")

    # grafana-postgresql-datasource/interpolationTruthTable.test.ts (ds.interpolateVariable)
    for raw_sql, variables, want in [
        ("SELECT * FROM host_status WHERE host = $host", {"host": "server01"}, "SELECT * FROM host_status WHERE host = server01"),
        ("SELECT * FROM host_status WHERE host = '$host'", {"host": "server01"}, "SELECT * FROM host_status WHERE host = 'server01'"),
        ("SELECT * FROM latency WHERE latency_ms < $threshold", {"threshold": 150}, "SELECT * FROM latency WHERE latency_ms < 150"),
        ("SELECT * FROM host_status WHERE host IN ($host)", {"host": ["srv1", "srv2"]}, "SELECT * FROM host_status WHERE host IN ('srv1','srv2')"),
        ("SELECT * FROM host_status WHERE host IN (${host:sqlstring})", {"host": ["srv1", "srv2"]}, "SELECT * FROM host_status WHERE host IN ('srv1','srv2')"),
        ("SELECT * FROM host_status WHERE host IN ('$host')", {"host": ["srv1", "srv2"]}, "SELECT * FROM host_status WHERE host IN (''srv1','srv2'')"),
        ("SELECT * FROM latency WHERE latency_ms IN (${latency:csv})", {"latency": [50, 75]}, "SELECT * FROM latency WHERE latency_ms IN (50,75)"),
        ("SELECT * FROM hosts WHERE hostname = $hostname", {"hostname": ["app1"]}, "SELECT * FROM hosts WHERE hostname = 'app1'"),
        ("SELECT * FROM regions WHERE region IN ($region)", {"region": ["us", "eu"]}, "SELECT * FROM regions WHERE region IN ('us','eu')"),
        ("SELECT * FROM hosts WHERE hostname ILIKE '%$host%'", {"host": "app1"}, "SELECT * FROM hosts WHERE hostname ILIKE '%app1%'"),
        (
            "SELECT * FROM metrics WHERE $__timeFilter(ts) AND region IN ($region)",
            {"region": ["us", "eu"]},
            "SELECT * FROM metrics WHERE $__timeFilter(ts) AND region IN ('us','eu')",
        ),
        (
            "SELECT $__timeGroupAlias(ts, $bucket) AS time, avg(v) FROM metrics GROUP BY 1",
            {"bucket": "5m"},
            "SELECT $__timeGroupAlias(ts, 5m) AS time, avg(v) FROM metrics GROUP BY 1",
        ),
        ("SELECT * FROM users WHERE name = '$user'", {"user": "O'Brien"}, "SELECT * FROM users WHERE name = 'O''Brien'"),
        (
            "SELECT * FROM users WHERE name IN ($users)",
            {"users": ["O'Brien", "D'Angelo"]},
            "SELECT * FROM users WHERE name IN ('O''Brien','D''Angelo')",
        ),
        ('SELECT * FROM "$schema"."$table"', {"schema": "public", "table": "orders"}, 'SELECT * FROM "public"."orders"'),
        ("SELECT * FROM metrics LIMIT ${limit:csv} OFFSET ${offset:csv}", {"limit": 100, "offset": 200}, "SELECT * FROM metrics LIMIT 100 OFFSET 200"),
    ]:
        eq(interpolate_variables(raw_sql, variables), want, f"interpolateVariable {raw_sql!r}")
    # [[var]] syntax; a custom all value is inserted unformatted (scenes CustomAllValue);
    # an unknown variable is left as written
    eq(interpolate_variables("x = '[[v]]'", {"v": "a'b"}), "x = 'a''b'", "[[var]]")
    eq(interpolate_variables("x IN ($v)", {"v": Raw("x")}), "x IN (x)", "custom all value")
    eq(interpolate_variables("x = $nope", {}), "x = $nope", "unknown variable")

    # the three stages together
    frm = datetime(2026, 3, 1, 0, 0, tzinfo=timezone.utc)
    to = datetime(2026, 3, 1, 6, 0, 0, 123_000, tzinfo=timezone.utc)
    eq(
        expand(
            "SELECT $__timeGroupAlias(time, $__interval), count(*) * 1000.0 / $__interval_ms AS v FROM metrics "
            "WHERE $__timeFilter(time) AND day BETWEEN CAST($__timeFrom() AS DATE) AND CAST($__timeTo() AS DATE) "
            "AND account_id = '$account' AND region IN ($region) AND $__from < ${__to:date:seconds}000 GROUP BY 1 ORDER BY 1",
            frm,
            to,
            timedelta(minutes=5),
            {"account": "111122223333", "region": ["us-east-1", "eu-west-1"]},
        ),
        'SELECT floor(extract(epoch from time)/300)*300 AS "time", count(*) * 1000.0 / 300000 AS v FROM metrics '
        "WHERE time BETWEEN '2026-03-01T00:00:00Z' AND '2026-03-01T06:00:00.123Z' "
        "AND day BETWEEN CAST('2026-03-01T00:00:00Z' AS DATE) AND CAST('2026-03-01T06:00:00.123Z' AS DATE) "
        "AND account_id = '111122223333' AND region IN ('us-east-1','eu-west-1') AND 1772323200000 < 1772344800000 GROUP BY 1 ORDER BY 1",
        "expand",
    )
    eq(expand("$__timeGroup(t, 1h)", frm, to, "1m"), "floor(extract(epoch from t)/3600)*3600", "1h bucket")
    eq(expand("$__timeGroup(t, 12d)", frm, to, "1m"), "floor(extract(epoch from t)/1.0368e+06)*1.0368e+06", "Go %v float")
    eq(_go_format_float_g(0.02), "0.02", "Go %v float")
    eq(_go_format_float_g(0.00001), "1e-05", "Go %v float")
    eq(_go_format_float_g(123456.0), "123456", "Go %v float")
    eq(parse_interval("1h30m"), 5400 * _NS_PER_S, "time.ParseDuration")
    eq(parse_interval("1.5s"), 1_500_000_000, "time.ParseDuration")
    eq(parse_interval("1M", now=datetime(2026, 1, 31, tzinfo=timezone.utc)), 31 * 86_400 * _NS_PER_S, "1M from Jan 31")
    eq(format_interval(90 * _NS_PER_S), "1m", "FormatInterval")
    return checks


if __name__ == "__main__":
    n = _self_check()
    print(f"grafana_sql self-check: {n} passed, 0 failed")
