#!/usr/bin/env bash
# The Grafana dashboards' queries over a fleet's lake, fleetlake vs DuckDB on the same
# Parquet files, in one run. The lake is made as scripts/lake-bench.sh makes it
# (default 10.08 million datapoints: 6,000 accounts x 4 functions x 5 metrics x 84
# minutes), then compacted. fleetlake answers through its Postgres endpoint (psycopg,
# as Grafana would); DuckDB reads the table's current Parquet files (listed by the
# Python `deltalake` package) with `day` derived from `time`. Each panel query is
# expanded with Grafana's macros for the data's time range (grafana_sql.py) and run
# RUNS times per engine; the best time is kept. Prints a Markdown table.
#
#   scripts/dash-bench.sh [WORK_DIR]
#
# Environment: as scripts/lake-bench.sh (ACCOUNTS, MINUTES, FLUSH_ROWS, FLEETLAKE,
# PYTHON), RUNS (5). Logs panels are skipped: the generated fleet has no logs.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-$(mktemp -d /tmp/fleetlake-dash-bench.XXXXXX)}
RUNS=${RUNS:-5}
PYTHON=${PYTHON:-$PWD/.venv/bin/python}
export ACCOUNTS=${ACCOUNTS:-6000} MINUTES=${MINUTES:-84} FLUSH_ROWS=${FLUSH_ROWS:-200000}
if [[ -z "${FLEETLAKE:-}" ]]; then
    cargo build --release --bin fleetlake >&2
    FLEETLAKE=$PWD/target/release/fleetlake
fi
"$PYTHON" -c 'import duckdb, psycopg, deltalake' 2>/dev/null \
    || "$PYTHON" -m pip install --quiet 'duckdb>=1.1' 'psycopg[binary]>=3.1' 'deltalake>=1.0'

GENERATE_ONLY=1 scripts/lake-bench.sh "$WORK" >&2
DATA="$WORK/data"
rm -rf "$DATA"
echo "replaying $(ls "$WORK"/input/*.ndjson.gz | wc -l) files into $DATA" >&2
FLEETLAKE_BUFFER__FLUSH_ROWS=$FLUSH_ROWS FLEETLAKE_RETENTION__METRICS=0s \
    "$FLEETLAKE" replay --data-dir "$DATA" --format json "$WORK"/input/*.ndjson.gz >&2
FLEETLAKE_RETENTION__METRICS=0s "$FLEETLAKE" compact --data-dir "$DATA" --vacuum-grace 0s >&2

LOG="$WORK/serve.log"
FLEETLAKE_RETENTION__METRICS=0s FLEETLAKE_LAKE__COMPACT_INTERVAL=1d FLEETLAKE_LOG=info \
    "$FLEETLAKE" serve --data-dir "$DATA" --http-addr 127.0.0.1:0 --pg-addr 127.0.0.1:0 2>"$LOG" &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
    grep -q "http listening" "$LOG" && break
    sleep 0.2
done
PG_PORT=$(grep "postgres listening" "$LOG" | sed -E 's/.*addr=[^ ]*:([0-9]+).*/\1/')

"$PYTHON" - "$DATA/lake/metrics" "$PG_PORT" "$RUNS" "$MINUTES" grafana/dashboards/*.json <<'EOF'
import sys, time
from datetime import datetime, timedelta, timezone
from pathlib import Path
import duckdb, psycopg
from deltalake import DeltaTable
sys.path.insert(0, "tests/e2e")
import grafana_sql

table, port, runs, minutes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
dashboards = sys.argv[5:]
files = DeltaTable(table).file_uris()
duck = duckdb.connect()
duck.execute("SET threads = 2")
duck.execute("SET TimeZone = 'UTC'")
duck.execute(f"CREATE VIEW metrics AS SELECT *, CAST(time AS DATE) AS day FROM read_parquet({files!r})")
pg = psycopg.connect(host="127.0.0.1", port=port, user="bench", dbname="fleetlake", autocommit=True)
rows = duck.execute("SELECT count(*) FROM metrics").fetchone()[0]
start = datetime(2025, 11, 25, tzinfo=timezone.utc)
t_from, t_to, interval = start, start + timedelta(minutes=minutes), timedelta(minutes=1)

def best(run):
    times, n = [], None
    for _ in range(runs):
        t = time.perf_counter()
        n = run()
        times.append(time.perf_counter() - t)
    return min(times), n

def fleetlake(sql):
    with pg.cursor() as cur:
        cur.execute(sql)
        return len(cur.fetchall())

def duckdb_(sql):
    return len(duck.execute(sql).fetchall())

print(f"{rows:,} datapoints in {len(files)} Parquet file(s); best of {runs} runs; 2 threads each\n")
print("| dashboard / panel | rows | fleetlake (Postgres protocol) | DuckDB | fleetlake / DuckDB |")
print("|---|---|---|---|---|")
totals = [0.0, 0.0]
for path in dashboards:
    variables = {}
    for name, sql, var in grafana_sql.variable_queries(path):
        values = [str(r[0]) for r in pg.execute(grafana_sql.expand(sql, t_from, t_to, interval, variables)).fetchall()]
        allv = grafana_sql.all_value(path, name) if var.get("includeAll") else None
        variables[name] = (allv if allv is not None else values) if (var.get("multi") or var.get("includeAll")) else (values[0] if values else "")
    for _, panel, _, target in grafana_sql.dashboard_targets(path):
        sql = grafana_sql.expand(target["rawSql"], t_from, t_to, interval, variables)
        if "FROM logs" in sql:
            continue
        f_time, f_rows = best(lambda: fleetlake(sql))
        try:
            d_time, d_rows = best(lambda: duckdb_(sql))
            d_cell, ratio = f"{d_time * 1000:.0f} ms", f"{f_time / d_time:.2f}"
            totals[1] += d_time
            if d_rows != f_rows:
                d_cell += f" ({d_rows} rows)"
        except duckdb.Error as e:
            d_cell, ratio = "n/a: " + str(e).splitlines()[0][:60], "n/a"
        totals[0] += f_time
        print(f"| {Path(path).stem} / {panel} | {f_rows} | {f_time * 1000:.0f} ms | {d_cell} | {ratio} |")
print(f"| **all panels** | | **{totals[0]:.2f} s** | **{totals[1]:.2f} s** | |")
EOF
