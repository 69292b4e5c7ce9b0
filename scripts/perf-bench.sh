#!/usr/bin/env bash
# fleetlake against DuckDB, in one run, on one fleet's CloudWatch Metric Streams JSON
# (default 6,000 accounts x 4 Lambda functions x 5 metrics x 10 minutes = 1.2 million
# datapoints, gzip'd NDJSON made by `fleetlake-loadgen --to files`):
#
#   1. input      `fleetlake-loadgen --to files`
#   2. fleetlake  `replay` of the files into a fresh lake (a commit per FLUSH_ROWS rows,
#                 as a running service makes them), then `compact`: wall time and peak
#                 RSS of each; bytes per datapoint of the `metrics` table's active files
#                 before and after compaction
#   3. DuckDB     read_json -> COPY ... ORDER BY (the lake's sort order) -> one zstd
#                 Parquet file, in a process of its own: wall time, peak RSS, bytes per
#                 datapoint. p99 goes into a `stats` MAP, as in fleetlake's schema.
#   4. queries    a fleet-wide top 10, a full GROUP BY account_id and one account's
#                 metrics, best of RUNS after a warm-up: fleetlake through a running
#                 server's Postgres endpoint, DuckDB over the same (compacted) Parquet
#                 files, and DuckDB over its own file; answers compared (the run fails
#                 if they differ); peak RSS of the server and of each DuckDB process
#   5. Firehose   `fleetlake serve` (WAL on) fed by `fleetlake-loadgen --to firehose` at full rate
#                 for SUSTAIN: acknowledged rate, request latency, committed rate (to the
#                 server's exit after SIGTERM, which commits what it buffered), peak RSS;
#                 count(*) in the lake must equal the acknowledged datapoints. Then a
#                 fresh server at half the acknowledged rate for 30 s with
#                 --probe-visibility: 200 -> visible in SQL, p50/p99.
#   6. the Markdown table for BENCHMARKS.md, printed and written to WORK_DIR/results.md
#
#   scripts/perf-bench.sh [WORK_DIR]
#
# Environment: ACCOUNTS (6000), FUNCTIONS (4), MINUTES (10), SUSTAIN (60s),
# SUSTAIN_MINUTES (300 fleet-minutes made for the sustained run: 36 M datapoints), RUNS (5),
# SEED (1), FLUSH_ROWS (replay commit size, 200000), STEP_TIMEOUT (seconds any one step
# may take, 1800), FLEETLAKE (the binary; built with `cargo build --release` if unset,
# with `fleetlake-loadgen`), LOADGEN (`fleetlake-loadgen` beside FLEETLAKE if unset),
# PYTHON (with deltalake, pyarrow, psycopg; the test venv's if unset; duckdb is
# installed into it when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-$(mktemp -d /tmp/fleetlake-perf-bench.XXXXXX)}
ACCOUNTS=${ACCOUNTS:-6000}
FUNCTIONS=${FUNCTIONS:-4}
MINUTES=${MINUTES:-10}
SUSTAIN=${SUSTAIN:-60s}
SUSTAIN_S=${SUSTAIN%s}
SUSTAIN_MINUTES=${SUSTAIN_MINUTES:-300}
RUNS=${RUNS:-5}
SEED=${SEED:-1}
FLUSH_ROWS=${FLUSH_ROWS:-200000}
STEP_TIMEOUT=${STEP_TIMEOUT:-1800}
VISIBILITY_S=30
PYTHON=${PYTHON:-$PWD/.venv/bin/python}
if [[ -z "${FLEETLAKE:-}" ]]; then
    cargo build --release --locked --bin fleetlake --bin fleetlake-loadgen >&2
    FLEETLAKE=$PWD/target/release/fleetlake
fi
LOADGEN=${LOADGEN:-$(dirname "$FLEETLAKE")/fleetlake-loadgen}
[[ -x $LOADGEN ]] || {
    echo "perf-bench: no $LOADGEN: build it (cargo build --release --bin fleetlake-loadgen) or set LOADGEN" >&2
    exit 1
}
"$PYTHON" -c 'import duckdb, psycopg, deltalake' 2>/dev/null \
    || "$PYTHON" -m pip install --quiet 'duckdb>=1.1' 'psycopg[binary]>=3.1' 'deltalake>=1.0'

mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
rm -rf "$WORK"/{input,fl,fh,fh-vis,duck,results,logs} "$WORK/results.md"
mkdir -p "$WORK"/{input,duck/tmp,results,logs}
R=$WORK/results # one JSON file per measurement; the table is made from them at the end
say() { echo "perf-bench: $*" >&2; }
fail() { echo "perf-bench: FAILED: $*" >&2; exit 1; }

# Background servers are stopped whatever happens.
SERVERS=()
cleanup() {
    local p
    for p in ${SERVERS[@]+"${SERVERS[@]}"}; do kill "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# timed NAME CMD...: runs CMD (bounded by STEP_TIMEOUT) under /usr/bin/time, stdout to
# logs/NAME.out, stderr to logs/NAME.err; sets WALL (s) and PEAK_KIB.
timed() {
    local name=$1
    shift
    if ! timeout "$STEP_TIMEOUT" /usr/bin/time -f '%e %M' -o "$WORK/logs/$name.time" "$@" \
        >"$WORK/logs/$name.out" 2>"$WORK/logs/$name.err"; then
        tail -n 30 "$WORK/logs/$name.err" >&2
        cat "$WORK/logs/$name.time" >&2 2>/dev/null || true
        fail "$name (logs in $WORK/logs/$name.*)"
    fi
    # GNU time writes "Command exited with non-zero status" etc. before the format line.
    local line
    line=$(grep -E '^[0-9]+(\.[0-9]+)? [0-9]+$' "$WORK/logs/$name.time" | tail -n 1) \
        || fail "$name: cannot parse /usr/bin/time output: $(cat "$WORK/logs/$name.time")"
    read -r WALL PEAK_KIB <<<"$line"
}

# json_report RAW OUT: the JSON object a command printed on stdout (the whole output,
# or else the last one, pretty-printed or not, that starts a line) into OUT.
json_report() {
    "$PYTHON" - "$1" "$2" <<'EOF' || fail "no JSON report in $1"
import json, re, sys
raw = open(sys.argv[1]).read()
report = None
for start in reversed([0] + [m.start() + 1 for m in re.finditer(r"\n(?=\s*\{)", raw)]):
    try:
        report, _ = json.JSONDecoder().raw_decode(raw[start:].lstrip())
        break
    except ValueError:
        pass
if not isinstance(report, dict):
    sys.exit(1)
json.dump(report, open(sys.argv[2], "w"))
EOF
}

# loadgen_firehose NAME SECONDS ARGS...: `fleetlake-loadgen ... --to firehose --report
# json` bounded by SECONDS; its report into results/NAME.json. loadgen exits with an
# error when datapoints were rejected (after retrying): the run goes on with its report
# (the rejected count is in the table), and fails only without one.
loadgen_firehose() {
    local name=$1 limit=$2
    shift 2
    if ! timeout "$limit" "$LOADGEN" "$@" --to firehose --report json \
        >"$WORK/logs/$name.out" 2>"$WORK/logs/$name.err"; then
        tail -n 5 "$WORK/logs/$name.err" >&2
        json_report "$WORK/logs/$name.out" "$R/$name.json"
        say "WARNING: loadgen ($name) exited with an error; its report says" \
            "$(jget "$R/$name.json" datapoints_rejected) datapoints rejected"
        return
    fi
    json_report "$WORK/logs/$name.out" "$R/$name.json"
}

# jget FILE KEY[.KEY...]: one value of a JSON file (fails if missing).
jget() {
    "$PYTHON" -c '
import json, sys
v = json.load(open(sys.argv[1]))
for k in sys.argv[2].split("."):
    v = v[k]
print(v)' "$1" "$2" || fail "no $2 in $1"
}

# jput FILE KEY=VALUE...: writes a JSON object of numbers (or strings).
jput() {
    local file=$1
    shift
    "$PYTHON" -c '
import json, sys
def value(s):
    for t in (int, float):
        try:
            return t(s)
        except ValueError:
            pass
    return s
json.dump({k: value(v) for k, v in (a.split("=", 1) for a in sys.argv[2:])}, open(sys.argv[1], "w"))' "$file" "$@"
}

# Servers: start_server NAME DATA_DIR [VAR=VALUE...] sets SERVER_PID, HTTP_ADDR, PG_PORT;
# stop_server PID sends SIGTERM and waits (bounded) for the exit, which commits every
# buffered row; it fails if the server exits with an error.
start_server() {
    local name=$1 dir=$2
    shift 2
    local log=$WORK/logs/$name.serve.log
    env FLEETLAKE_LOG=info "$@" \
        "$FLEETLAKE" serve --data-dir "$dir" --http-addr 127.0.0.1:0 --pg-addr 127.0.0.1:0 2>"$log" &
    SERVER_PID=$!
    SERVERS+=("$SERVER_PID")
    local i
    for i in $(seq 1 300); do
        grep -q "http listening" "$log" && break
        alive "$SERVER_PID" || { tail -n 20 "$log" >&2; fail "server $name exited at start"; }
        sleep 0.1
    done
    grep -q "http listening" "$log" || fail "server $name did not log its address within 30 s ($log)"
    HTTP_ADDR=$(grep "http listening" "$log" | sed -E 's/.*addr=([^ ]+).*/\1/' | head -n 1)
    PG_PORT=$(grep "postgres listening" "$log" | sed -E 's/.*addr=[^ ]*:([0-9]+).*/\1/' | head -n 1)
    [[ $HTTP_ADDR =~ ^[0-9.]+:[0-9]+$ && $PG_PORT =~ ^[0-9]+$ ]] \
        || fail "server $name: cannot read its addresses from $log"
    say "server $name: pid $SERVER_PID, http $HTTP_ADDR, postgres port $PG_PORT"
}
alive() { [[ -e /proc/$1 ]] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null; }
vmhwm_kib() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }
stop_server() {
    local pid=$1 deadline=$((SECONDS + 600)) status=0
    kill -TERM "$pid"
    while alive "$pid"; do
        ((SECONDS < deadline)) || fail "server $pid still running 600 s after SIGTERM"
        sleep 0.05
    done
    wait "$pid" || status=$?
    ((status == 0)) || fail "server $pid exited with status $status after SIGTERM"
}

# ---------------------------------------------------------------------------------
# 1. Input: gzip'd Metric Streams JSON files.
# ---------------------------------------------------------------------------------
INPUT_SOURCE="fleetlake-loadgen"
say "input: fleetlake-loadgen, $ACCOUNTS accounts x $FUNCTIONS functions x $MINUTES minutes"
timed loadgen-files "$LOADGEN" --seed "$SEED" --accounts "$ACCOUNTS" \
    --functions "$FUNCTIONS" --minutes "$MINUTES" --to files --out "$WORK/input" --report json
json_report "$WORK/logs/loadgen-files.out" "$R/input.json"
DATAPOINTS=$(jget "$R/input.json" datapoints_sent)
INPUT_FILES=("$WORK"/input/*.json.gz)
[[ -e ${INPUT_FILES[0]} ]] || fail "no $WORK/input/*.json.gz"
INPUT_BYTES=$(cat "${INPUT_FILES[@]}" | wc -c)
say "input: $DATAPOINTS datapoints in ${#INPUT_FILES[@]} files, $INPUT_BYTES bytes gzip'd"

# lake_stats NAME: bytes and row count of the `metrics` table's active files, and the
# first account in the data, into results/NAME.json.
lake_stats() {
    "$PYTHON" - "$WORK/fl/lake/metrics" "$R/$1.json" <<'EOF'
import json, os, sys
import pyarrow.compute as pc
from deltalake import DeltaTable
table = DeltaTable(sys.argv[1])
files = [f.removeprefix("file://") for f in table.file_uris()]
accounts = table.to_pyarrow_dataset().to_table(columns=["account_id"]).column("account_id")
json.dump({"bytes": sum(os.path.getsize(f) for f in files), "files": len(files),
           "rows": len(accounts), "version": table.version(),
           "first_account": pc.min(accounts).as_py()}, open(sys.argv[2], "w"))
EOF
}

# ---------------------------------------------------------------------------------
# 2. fleetlake: replay the files into a fresh lake, then compact it. Retention is off:
#    the input's timestamps may be older than the default 15 days.
# ---------------------------------------------------------------------------------
say "fleetlake replay ($DATAPOINTS datapoints, a commit per $FLUSH_ROWS rows)"
timed replay env FLEETLAKE_BUFFER__FLUSH_ROWS="$FLUSH_ROWS" FLEETLAKE_LAKE__ROLLUP_INTERVAL=1m \
    FLEETLAKE_RETENTION__METRICS=0s \
    "$FLEETLAKE" replay --data-dir "$WORK/fl" --format json "${INPUT_FILES[@]}"
jput "$R/replay.json" wall_s="$WALL" peak_kib="$PEAK_KIB"
lake_stats lake-before
[[ $(jget "$R/lake-before.json" rows) == "$DATAPOINTS" ]] \
    || fail "replay: $(jget "$R/lake-before.json" rows) rows in metrics, $DATAPOINTS datapoints in the input"

say "fleetlake compact (roll-ups, merge, vacuum)"
timed compact env FLEETLAKE_RETENTION__METRICS=0s \
    "$FLEETLAKE" compact --data-dir "$WORK/fl" --vacuum-grace 0s
jput "$R/compact.json" wall_s="$WALL" peak_kib="$PEAK_KIB"
lake_stats lake-after
[[ $(jget "$R/lake-after.json" rows) == "$DATAPOINTS" ]] \
    || fail "compact: $(jget "$R/lake-after.json" rows) rows in metrics after compaction, $DATAPOINTS before"
FIRST_ACCOUNT=$(jget "$R/lake-after.json" first_account)

# ---------------------------------------------------------------------------------
# 3. DuckDB: the same files to one sorted zstd Parquet file with fleetlake's columns,
#    in a process of its own (its peak RSS is DuckDB's).
# ---------------------------------------------------------------------------------
say "DuckDB read_json -> COPY sorted zstd Parquet"
timed duck-copy "$PYTHON" - "$WORK" "$R/duck-copy-inner.json" <<'EOF'
import json, sys, time
import duckdb
work, out = sys.argv[1], sys.argv[2]
con = duckdb.connect()
con.execute("SET threads = 2")
con.execute("SET TimeZone = 'UTC'")
con.execute(f"SET temp_directory = '{work}/duck/tmp'")
started = time.perf_counter()
rows = con.execute(f"""
COPY (
    SELECT epoch_ms("timestamp")::TIMESTAMPTZ AS time, account_id, region, namespace, metric_name,
           dimensions, unit, value.count AS "count", value.sum AS "sum", value.min AS "min",
           value.max AS "max",
           CASE WHEN value.p99 IS NULL THEN MAP {{}}::MAP(VARCHAR, DOUBLE)
                ELSE MAP {{'p99': value.p99}} END AS stats
    FROM read_json('{work}/input/*.json.gz', format = 'newline_delimited', columns = {{
        metric_stream_name: 'VARCHAR', account_id: 'VARCHAR', region: 'VARCHAR',
        namespace: 'VARCHAR', metric_name: 'VARCHAR', dimensions: 'MAP(VARCHAR, VARCHAR)',
        "timestamp": 'BIGINT',
        value: 'STRUCT("count" DOUBLE, "sum" DOUBLE, "max" DOUBLE, "min" DOUBLE, p99 DOUBLE)',
        unit: 'VARCHAR'}})
    ORDER BY account_id, namespace, metric_name, dimensions, region, time
) TO '{work}/duck/metrics.parquet' (FORMAT parquet, COMPRESSION zstd)
""").fetchone()[0]
json.dump({"rows": rows, "copy_s": time.perf_counter() - started,
           "version": duckdb.__version__}, open(out, "w"))
EOF
jput "$R/duck-copy.json" wall_s="$WALL" peak_kib="$PEAK_KIB" \
    bytes="$(stat -c %s "$WORK/duck/metrics.parquet")" \
    rows="$(jget "$R/duck-copy-inner.json" rows)" copy_s="$(jget "$R/duck-copy-inner.json" copy_s)"
[[ $(jget "$R/duck-copy.json" rows) == "$DATAPOINTS" ]] \
    || fail "DuckDB wrote $(jget "$R/duck-copy.json" rows) rows, $DATAPOINTS datapoints in the input"
DUCKDB_VERSION=$(jget "$R/duck-copy-inner.json" version)

# ---------------------------------------------------------------------------------
# 4. Queries, best of RUNS after one warm-up run: fleetlake through its Postgres
#    endpoint (tables loaded in the running server), DuckDB over the lake's current
#    files (listed by `deltalake`, `day` derived from `time`), DuckDB over its own file.
#    Each engine in its own process; the answers are compared afterwards.
# ---------------------------------------------------------------------------------
cat >"$WORK/logs/queries.py" <<'EOF'
import json, sys, time
engine, target, out, runs, account = sys.argv[1:6]
queries = {
    "top10": "SELECT account_id, sum(sum) AS errors FROM metrics WHERE metric_name = 'Errors' "
             "GROUP BY account_id ORDER BY errors DESC LIMIT 10",
    "accounts": "SELECT account_id, count(*), sum(sum) FROM metrics GROUP BY account_id",
    "one_account": "SELECT metric_name, sum(sum), max(max) FROM metrics "
                   f"WHERE account_id = '{account}' GROUP BY metric_name",
}
if engine == "fleetlake":
    import psycopg
    pg = psycopg.connect(host="127.0.0.1", port=int(target), user="bench", dbname="fleetlake",
                         autocommit=True)
    def run(sql):
        with pg.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall()
else:
    import duckdb
    from deltalake import DeltaTable
    con = duckdb.connect()
    con.execute("SET threads = 2")
    con.execute("SET TimeZone = 'UTC'")
    files = DeltaTable(target).file_uris() if engine == "duckdb-lake" else [target]
    con.execute(f"CREATE VIEW metrics AS SELECT *, CAST(time AS DATE) AS day FROM read_parquet({files!r})")
    def run(sql):
        return con.execute(sql).fetchall()
results = {}
for name, sql in queries.items():
    run(sql)  # warm-up
    best = None
    for _ in range(int(runs)):
        started = time.perf_counter()
        rows = run(sql)
        elapsed = time.perf_counter() - started
        best = elapsed if best is None else min(best, elapsed)
    results[name] = {"best_s": best, "rows": [list(r) for r in rows]}
json.dump(results, open(out, "w"))
EOF

say "queries: fleetlake (Postgres endpoint), best of $RUNS"
start_server queries "$WORK/fl" FLEETLAKE_RETENTION__METRICS=0s FLEETLAKE_LAKE__COMPACT_INTERVAL=1d
timeout "$STEP_TIMEOUT" "$PYTHON" "$WORK/logs/queries.py" fleetlake "$PG_PORT" "$R/q-fleetlake.json" \
    "$RUNS" "$FIRST_ACCOUNT" || fail "fleetlake queries"
jput "$R/q-fleetlake-mem.json" peak_kib="$(vmhwm_kib "$SERVER_PID")"
stop_server "$SERVER_PID"

say "queries: DuckDB over the lake's files, best of $RUNS"
timed q-duckdb-lake "$PYTHON" "$WORK/logs/queries.py" duckdb-lake "$WORK/fl/lake/metrics" \
    "$R/q-duckdb-lake.json" "$RUNS" "$FIRST_ACCOUNT"
jput "$R/q-duckdb-lake-mem.json" peak_kib="$PEAK_KIB"
say "queries: DuckDB over its own file, best of $RUNS"
timed q-duckdb-own "$PYTHON" "$WORK/logs/queries.py" duckdb-own "$WORK/duck/metrics.parquet" \
    "$R/q-duckdb-own.json" "$RUNS" "$FIRST_ACCOUNT"
jput "$R/q-duckdb-own-mem.json" peak_kib="$PEAK_KIB"

# Same answers (sums to a relative 1e-9: the order of float additions differs; for the
# top 10, accounts tied with the 10th value may differ).
"$PYTHON" - "$R" <<'EOF' || fail "the engines' answers differ (see above)"
import json, math, sys
r = sys.argv[1]
load = lambda name: json.load(open(f"{r}/q-{name}.json"))
reference = load("duckdb-lake")
def close(a, b):
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-6)
    return a == b
def same_rows(a, b):
    return len(a) == len(b) and all(len(x) == len(y) and all(map(close, x, y)) for x, y in zip(a, b))
def check(query, rows, ref):
    if not ref:
        return "no rows"
    if query == "top10":
        if len(rows) != len(ref) or not all(close(x[1], y[1]) for x, y in zip(rows, ref)):
            return "different sums"
        last = ref[-1][1]
        keep = lambda rs: {a for a, v in rs if not close(v, last)}
        return None if keep(rows) == keep(ref) else "different accounts"
    rows, ref = sorted(rows), sorted(ref)
    if same_rows(rows, ref):
        return None
    if len(rows) != len(ref):
        return f"{len(rows)} rows against {len(ref)}"
    x, y = next((x, y) for x, y in zip(rows, ref) if not same_rows([x], [y]))
    return f"first different row {x} against {y}"
bad = False
for engine in ("fleetlake", "duckdb-own"):
    answers = load(engine)
    for query, ref in reference.items():
        problem = check(query, answers[query]["rows"], ref["rows"])
        if problem:
            bad = True
            print(f"{query}: {engine} against DuckDB on the lake's files: {problem}\n"
                  f"  {engine}: {answers[query]['rows'][:10]}\n  duckdb-lake: {ref['rows'][:10]}",
                  file=sys.stderr)
sys.exit(1 if bad else 0)
EOF
say "queries: same answers from fleetlake, DuckDB on the lake's files and DuckDB on its own file"

# ---------------------------------------------------------------------------------
# 5. Firehose + WAL, sustained: loadgen at full rate for SUSTAIN against a fresh server
#    (default configuration: WAL on, group-commit fsync before each 200), then SIGTERM;
#    committed = acknowledged datapoints / (loadgen start -> server exit). Then a fresh
#    server at half the acknowledged rate: visibility of probe datapoints in SQL.
# ---------------------------------------------------------------------------------
say "Firehose: loadgen at full rate for ${SUSTAIN_S}s"
start_server firehose "$WORK/fh" FLEETLAKE_RETENTION__METRICS=0s
# The requests are made before loadgen's clock starts (--pregenerate): making them
# costs about as much CPU as fleetlake spends taking them in, and both share the
# two cores. SUSTAIN_MINUTES fleet-minutes are made; sending stops at SUSTAIN.
loadgen_firehose firehose $((SUSTAIN_S + 900)) --seed "$SEED" --accounts "$ACCOUNTS" \
    --functions "$FUNCTIONS" --pregenerate --minutes "$SUSTAIN_MINUTES" \
    --duration "${SUSTAIN_S}s" --url "http://$HTTP_ADDR"
SENT_END=$(date +%s.%N)
HWM=$(vmhwm_kib "$SERVER_PID")
stop_server "$SERVER_PID"
EXITED=$(date +%s.%N)
# Committed: loadgen's first request to the server's exit after SIGTERM (which
# commits whatever is still buffered).
STARTED=$(awk "BEGIN {printf \"%.3f\", $SENT_END - $(jget "$R/firehose.json" elapsed_s)}")
ACKED=$(jget "$R/firehose.json" datapoints_acknowledged)
COUNT=$(timeout "$STEP_TIMEOUT" "$FLEETLAKE" query --data-dir "$WORK/fh" --format csv \
    "SELECT count(*) FROM metrics" | tail -n 1 | tr -d '\r"')
[[ $COUNT == "$ACKED" ]] || fail "Firehose: count(*) = $COUNT in the lake, $ACKED datapoints acknowledged"
jput "$R/firehose-server.json" peak_kib="$HWM" committed_s="$(awk "BEGIN {printf \"%.3f\", $EXITED - $STARTED}")" \
    shutdown_s="$(awk "BEGIN {printf \"%.3f\", $EXITED - $SENT_END}")" count="$COUNT"
say "Firehose: $ACKED datapoints acknowledged, all in the lake"

HALF=$("$PYTHON" -c 'import sys; print(max(1, int(int(sys.argv[1]) / float(sys.argv[2]) / 2)))' \
    "$ACKED" "$(jget "$R/firehose.json" elapsed_s)")
say "Firehose: visibility probes at $HALF datapoints/s for ${VISIBILITY_S}s"
start_server visibility "$WORK/fh-vis" FLEETLAKE_RETENTION__METRICS=0s
loadgen_firehose visibility $((VISIBILITY_S + 600)) --seed "$SEED" --accounts "$ACCOUNTS" \
    --functions "$FUNCTIONS" --rate "$HALF" --duration "${VISIBILITY_S}s" --probe-visibility \
    --url "http://$HTTP_ADDR"
jput "$R/visibility-rate.json" rate="$HALF"
stop_server "$SERVER_PID"

# ---------------------------------------------------------------------------------
# 6. The table.
# ---------------------------------------------------------------------------------
export BENCH_POINTS=$DATAPOINTS BENCH_RUNS=$RUNS BENCH_SUSTAIN_S=$SUSTAIN_S BENCH_VISIBILITY_S=$VISIBILITY_S \
    BENCH_FLUSH_ROWS=$FLUSH_ROWS BENCH_INPUT_SOURCE=$INPUT_SOURCE BENCH_INPUT_FILES=${#INPUT_FILES[@]} \
    BENCH_INPUT_BYTES=$INPUT_BYTES BENCH_NPROC=$(nproc) BENCH_DATE=$(date -u +%Y-%m-%d) \
    BENCH_VERSION="$("$FLEETLAKE" --version)" BENCH_COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    BENCH_SHAPE="$ACCOUNTS accounts × $FUNCTIONS functions × 5 metrics × $MINUTES minutes, seed $SEED" \
    BENCH_CPU="$(grep -m 1 '^model name' /proc/cpuinfo | sed -E 's/^model name[[:space:]]*:[[:space:]]*//')"
"$PYTHON" - "$R" "$WORK/results.md" <<'EOF'
import json, os, sys
r, out = sys.argv[1], sys.argv[2]
env = os.environ
def load(name):
    path = f"{r}/{name}.json"
    return json.load(open(path)) if os.path.exists(path) else None
points, runs = int(env["BENCH_POINTS"]), int(env["BENCH_RUNS"])
def rate(x):
    return f"{x / 1e6:.2f} M dp/s" if x >= 1e6 else f"{x / 1e3:.0f} k dp/s"
def mib(kib):
    return f"{kib / 1024 / 1024:.2f} GiB" if kib >= 1024 * 1024 else f"{kib / 1024:.0f} MiB"
def ms(s):
    return f"{s * 1000:.0f} ms" if s >= 0.01 else f"{s * 1000:.1f} ms"
replay, compact, duck = load("replay"), load("compact"), load("duck-copy")
before, after = load("lake-before"), load("lake-after")
fh, fh_server, vis = load("firehose"), load("firehose-server"), load("visibility")
vis_rate = load("visibility-rate")
q = {e: load(f"q-{e}") for e in ("fleetlake", "duckdb-lake", "duckdb-own")}
mem = {e: load(f"q-{e}-mem") for e in ("fleetlake", "duckdb-lake", "duckdb-own")}
rows = [
    (f"ingest: files → sorted zstd Parquet (fleetlake `replay`, a commit per {int(env['BENCH_FLUSH_ROWS']):,} "
     "rows; DuckDB `read_json` → `COPY ... ORDER BY`)",
     f"{rate(points / replay['wall_s'])} ({replay['wall_s']:.2f} s, peak RSS {mib(replay['peak_kib'])})",
     f"{rate(points / duck['wall_s'])} ({duck['wall_s']:.2f} s, of which COPY {duck['copy_s']:.2f} s; "
     f"peak RSS {mib(duck['peak_kib'])})",
     f"{replay['wall_s'] / duck['wall_s']:.2f}", "—"),
    ("+ `compact` (roll-ups, merge, vacuum); ratio: replay + compact against DuckDB",
     f"{compact['wall_s']:.2f} s, peak RSS {mib(compact['peak_kib'])}; replay + compact "
     f"{rate(points / (replay['wall_s'] + compact['wall_s']))}",
     "—", f"{(replay['wall_s'] + compact['wall_s']) / duck['wall_s']:.2f}", "—"),
]
acked, lat = fh["datapoints_acknowledged"], fh["latency_ms"]
rows.append((f"ingest: Firehose + WAL, sustained {env['BENCH_SUSTAIN_S']} s at full rate "
    "(loadgen on the same cores, requests made before its clock starts)",
    f"acknowledged {rate(acked / fh['elapsed_s'])}, committed {rate(acked / fh_server['committed_s'])} "
    f"({acked:,} dp, loadgen start → server exit {fh_server['committed_s']:.1f} s); "
    f"latency p50 {lat['p50']:.0f} ms / p99 {lat['p99']:.0f} ms; {fh['datapoints_rejected']:,} rejected; "
    f"peak RSS {mib(fh_server['peak_kib'])}", "—", "—", "—"))
rows.append(("bytes per datapoint on disk (fleetlake: the `metrics` table's active files)",
     f"{before['bytes'] / points:.2f} before compaction ({before['files']} file{'s' if before['files'] != 1 else ''}), "
     f"{after['bytes'] / points:.2f} after ({after['files']} file{'s' if after['files'] != 1 else ''})",
     f"{duck['bytes'] / points:.2f} (1 file)", f"{after['bytes'] / duck['bytes']:.2f}", "—"))
labels = {
    "top10": "fleet-wide top 10 accounts by Errors (`GROUP BY account_id ORDER BY errors DESC LIMIT 10`)",
    "accounts": "fleet-wide `count(*), sum(sum) GROUP BY account_id` (all rows fetched)",
    "one_account": "one account: `sum(sum), max(max) GROUP BY metric_name`",
}
for name, label in labels.items():
    f, d, o = (q[e][name]["best_s"] for e in ("fleetlake", "duckdb-lake", "duckdb-own"))
    rows.append((f"query: {label}", ms(f), ms(d), f"{f / d:.2f}", ms(o)))
rows.append(("peak RSS during the queries (fleetlake: the server's VmHWM; DuckDB: its process)",
     mib(mem["fleetlake"]["peak_kib"]), mib(mem["duckdb-lake"]["peak_kib"]),
     f"{mem['fleetlake']['peak_kib'] / mem['duckdb-lake']['peak_kib']:.2f}", mib(mem["duckdb-own"]["peak_kib"])))
v = vis["visibility_ms"]
rows.append((f"visibility: 200 → row returned by SQL, at half the acknowledged rate for "
    f"{env['BENCH_VISIBILITY_S']} s",
    f"p50 {v['p50']:.0f} ms / p99 {v['p99']:.0f} ms (max {v['max']:.0f} ms, {v['samples']} probes, "
    f"loadgen --rate {vis_rate['rate']:,})", "—", "—", "—"))
version = json.load(open(f"{r}/duck-copy-inner.json"))["version"]
lines = [
    f"Machine: `nproc` = {env['BENCH_NPROC']}, {env['BENCH_CPU']}; DuckDB {version} (Python, "
    f"`SET threads = 2`); {env['BENCH_VERSION']} (tree at {env['BENCH_COMMIT']}); {env['BENCH_DATE']}.",
    f"Input: {points:,} datapoints ({env['BENCH_SHAPE']}), {env['BENCH_INPUT_FILES']} gzip'd NDJSON files, "
    f"{int(env['BENCH_INPUT_BYTES']):,} bytes; input: {env['BENCH_INPUT_SOURCE']}.",
    f"Queries: best of {runs} after a warm-up; fleetlake through its Postgres endpoint (psycopg, rows "
    "fetched), DuckDB over the lake's compacted files (same answers checked) and over its own file.",
    "",
    "| | fleetlake | DuckDB | fleetlake / DuckDB | DuckDB on its own Parquet |",
    "|---|---|---|---|---|",
] + ["| " + " | ".join(row) + " |" for row in rows]
text = "\n".join(lines) + "\n"
open(out, "w").write(text)
print(text)
EOF
say "table written to $WORK/results.md"
