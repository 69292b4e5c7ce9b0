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
#   BASELINE=/path/to/old/fleetlake scripts/perf-bench.sh [WORK_DIR]
#
# With BASELINE, every fleetlake figure (replay + compact, the queries, the Firehose
# sustained run, the visibility probe) is measured for both binaries in the same run,
# in ROUNDS rounds; each round runs each stage once per binary, baseline and new
# alternated (baseline first in odd rounds, new first in even ones). Both binaries get
# the same input, made by the new `fleetlake-loadgen` (the baseline may still be one
# with a `loadgen` subcommand); only serve, replay, compact and query go through the
# binary under test. In a round, both visibility runs use the same rate: half the
# lower of the two acknowledged rates. DuckDB's part runs once. One more table:
# figure, baseline, new, new / baseline, each the median over the rounds (with the
# range). With ROUNDS > 1, each fleetlake number of the main table is the median of
# that number over the rounds.
#
# Environment: ACCOUNTS (6000), FUNCTIONS (4), MINUTES (10), SUSTAIN (60s),
# SUSTAIN_MINUTES (300 fleet-minutes made for the sustained run: 36 M datapoints), RUNS (5),
# SEED (1), FLUSH_ROWS (replay commit size, 200000), STEP_TIMEOUT (seconds any one step
# may take, 1800), FLEETLAKE (the binary; built with `cargo build --release` if unset,
# with `fleetlake-loadgen`), LOADGEN (`fleetlake-loadgen` beside FLEETLAKE if unset),
# BASELINE (a fleetlake binary to compare with; unset: none), ROUNDS (3 with BASELINE,
# else 1), PYTHON (with deltalake, pyarrow, psycopg; the test venv's if unset; duckdb is
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
BASELINE=${BASELINE:-}
[[ -x $LOADGEN ]] || {
    echo "perf-bench: no $LOADGEN: build it (cargo build --release --bin fleetlake-loadgen) or set LOADGEN" >&2
    exit 1
}
# The binaries under test: "new" (FLEETLAKE) and, with BASELINE, "base".
declare -A BIN=([new]=$FLEETLAKE)
if [[ -n $BASELINE ]]; then
    [[ -x $BASELINE ]] || { echo "perf-bench: BASELINE=$BASELINE is not an executable" >&2; exit 1; }
    BIN[base]=$BASELINE
    ROUNDS=${ROUNDS:-3}
else
    ROUNDS=${ROUNDS:-1}
fi
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || { echo "perf-bench: ROUNDS must be a positive integer" >&2; exit 1; }
"$PYTHON" -c 'import duckdb, psycopg, deltalake' 2>/dev/null \
    || "$PYTHON" -m pip install --quiet 'duckdb>=1.1' 'psycopg[binary]>=3.1' 'deltalake>=1.0'

mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
rm -rf "$WORK"/{input,fl,fh,fh-vis,base,duck,results,logs} "$WORK/results.md"
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

# loadgen_firehose NAME OUT SECONDS ARGS...: `fleetlake-loadgen ... --to firehose
# --report json` bounded by SECONDS, logs in logs/NAME.*; its report into OUT. loadgen
# exits with an error when datapoints were rejected (after retrying): the run goes on
# with its report (the rejected count is in the table), and fails only without one.
loadgen_firehose() {
    local name=$1 out=$2 limit=$3
    shift 3
    if ! timeout "$limit" "$LOADGEN" "$@" --to firehose --report json \
        >"$WORK/logs/$name.out" 2>"$WORK/logs/$name.err"; then
        tail -n 5 "$WORK/logs/$name.err" >&2
        json_report "$WORK/logs/$name.out" "$out"
        say "WARNING: loadgen ($name) exited with an error; its report says" \
            "$(jget "$out" datapoints_rejected) datapoints rejected"
        return
    fi
    json_report "$WORK/logs/$name.out" "$out"
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

# Servers: start_server NAME DATA_DIR [VAR=VALUE...] starts `$FL serve` (FL: the binary
# under test) and sets SERVER_PID, HTTP_ADDR, PG_PORT;
# stop_server PID sends SIGTERM and waits (bounded) for the exit, which commits every
# buffered row; it fails if the server exits with an error.
start_server() {
    local name=$1 dir=$2
    shift 2
    local log=$WORK/logs/$name.serve.log
    env FLEETLAKE_LOG=info "$@" \
        "$FL" serve --data-dir "$dir" --http-addr 127.0.0.1:0 --pg-addr 127.0.0.1:0 2>"$log" &
    SERVER_PID=$!
    SERVERS+=("$SERVER_PID")
    for _ in $(seq 1 300); do
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
# 1. Input: gzip'd Metric Streams JSON files, made by the new loadgen (whatever the
#    binaries under test).
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

# lake_stats LAKE OUT: bytes and row count of the `metrics` table's active files in the
# lake of data directory LAKE, and the first account in the data, into OUT.
lake_stats() {
    "$PYTHON" - "$1/lake/metrics" "$2" <<'EOF'
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

# Rounds: in round K, each stage runs once per binary, in the order `order K` gives
# (baseline first in odd rounds, new first in even ones). Each binary has its own
# data directories: the new one's under WORK (fl, fh, fh-vis), the baseline's under
# WORK/base. Results of binary B in round K go to results/B/K/; the main table reads
# results/*.json, the new binary's figures (medians over the rounds).
order() {
    if [[ -z ${BIN[base]:-} ]]; then
        echo new
    elif (($1 % 2 == 1)); then
        echo base new
    else
        echo new base
    fi
}
home_of() { if [[ $1 == new ]]; then echo "$WORK"; else echo "$WORK/base"; fi; }
# at B K: selects binary B in round K: FL (the binary), HOME_DIR (its data
# directories), RR (its results), TAG (for log names).
at() {
    FL=${BIN[$1]}
    HOME_DIR=$(home_of "$1")
    RR=$R/$1/$2
    TAG=$1-$2
    mkdir -p "$RR" "$HOME_DIR"
}

# ---------------------------------------------------------------------------------
# 2. fleetlake: replay the files into a fresh lake, then compact it. Retention is off:
#    the input's timestamps may be older than the default 15 days.
# ---------------------------------------------------------------------------------
replay_compact() {
    local fl=$HOME_DIR/fl
    rm -rf "$fl"
    say "fleetlake replay [$TAG] ($DATAPOINTS datapoints, a commit per $FLUSH_ROWS rows)"
    timed "replay-$TAG" env FLEETLAKE_BUFFER__FLUSH_ROWS="$FLUSH_ROWS" FLEETLAKE_LAKE__ROLLUP_INTERVAL=1m \
        FLEETLAKE_RETENTION__METRICS=0s \
        "$FL" replay --data-dir "$fl" --format json "${INPUT_FILES[@]}"
    jput "$RR/replay.json" wall_s="$WALL" peak_kib="$PEAK_KIB"
    lake_stats "$fl" "$RR/lake-before.json"
    [[ $(jget "$RR/lake-before.json" rows) == "$DATAPOINTS" ]] \
        || fail "replay [$TAG]: $(jget "$RR/lake-before.json" rows) rows in metrics, $DATAPOINTS datapoints in the input"

    say "fleetlake compact [$TAG] (roll-ups, merge, vacuum)"
    timed "compact-$TAG" env FLEETLAKE_RETENTION__METRICS=0s \
        "$FL" compact --data-dir "$fl" --vacuum-grace 0s
    jput "$RR/compact.json" wall_s="$WALL" peak_kib="$PEAK_KIB"
    lake_stats "$fl" "$RR/lake-after.json"
    [[ $(jget "$RR/lake-after.json" rows) == "$DATAPOINTS" ]] \
        || fail "compact [$TAG]: $(jget "$RR/lake-after.json" rows) rows in metrics after compaction, $DATAPOINTS before"
}

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

# fleetlake_queries: the queries through the Postgres endpoint of a server on the lake
# replay_compact made (tables loaded in the running server), best of RUNS.
fleetlake_queries() {
    say "queries [$TAG]: fleetlake (Postgres endpoint), best of $RUNS"
    start_server "queries-$TAG" "$HOME_DIR/fl" FLEETLAKE_RETENTION__METRICS=0s FLEETLAKE_LAKE__COMPACT_INTERVAL=1d
    timeout "$STEP_TIMEOUT" "$PYTHON" "$WORK/logs/queries.py" fleetlake "$PG_PORT" "$RR/q-fleetlake.json" \
        "$RUNS" "$FIRST_ACCOUNT" || fail "fleetlake queries [$TAG]"
    jput "$RR/q-fleetlake-mem.json" peak_kib="$(vmhwm_kib "$SERVER_PID")"
    stop_server "$SERVER_PID"
}

# 2 and 4 (fleetlake's part), round by round. The first account (for the one-account
# query) is the same in every lake: the input is.
FIRST_ACCOUNT=
for ((k = 1; k <= ROUNDS; k++)); do
    for b in $(order "$k"); do
        at "$b" "$k"
        replay_compact
        [[ -n $FIRST_ACCOUNT ]] || FIRST_ACCOUNT=$(jget "$RR/lake-after.json" first_account)
        [[ $(jget "$RR/lake-after.json" first_account) == "$FIRST_ACCOUNT" ]] \
            || fail "compact [$TAG]: first account $(jget "$RR/lake-after.json" first_account), not $FIRST_ACCOUNT"
    done
    for b in $(order "$k"); do
        at "$b" "$k"
        fleetlake_queries
    done
done

# ---------------------------------------------------------------------------------
# 3. DuckDB: the same files to one sorted zstd Parquet file with fleetlake's columns,
#    in a process of its own (its peak RSS is DuckDB's). Once per run.
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

# ---------------------------------------------------------------------------------
# 4. Queries, best of RUNS after one warm-up run: fleetlake through its Postgres
#    endpoint (above, in the rounds), DuckDB over the new binary's lake's current
#    files (its last round's; listed by `deltalake`, `day` derived from `time`), DuckDB
#    over its own file. Each engine in its own process; the answers are compared
#    afterwards.
# ---------------------------------------------------------------------------------
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
# Every fleetlake answer (each binary, each round) is checked.
FLEETLAKE_ANSWERS=()
for b in "${!BIN[@]}"; do
    for ((k = 1; k <= ROUNDS; k++)); do
        FLEETLAKE_ANSWERS+=("fleetlake-$b-$k=$R/$b/$k/q-fleetlake.json")
    done
done
"$PYTHON" - "$R/q-duckdb-lake.json" "duckdb-own=$R/q-duckdb-own.json" "${FLEETLAKE_ANSWERS[@]}" \
    <<'EOF' || fail "the engines' answers differ (see above)"
import json, math, sys
reference = json.load(open(sys.argv[1]))
others = [a.split("=", 1) for a in sys.argv[2:]]
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
for engine, path in others:
    answers = json.load(open(path))
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
#    server at half the acknowledged rate (with BASELINE: half the lower of the two
#    binaries' in the round): visibility of probe datapoints in SQL.
# ---------------------------------------------------------------------------------
firehose_sustained() {
    say "Firehose [$TAG]: loadgen at full rate for ${SUSTAIN_S}s"
    rm -rf "$HOME_DIR/fh"
    start_server "firehose-$TAG" "$HOME_DIR/fh" FLEETLAKE_RETENTION__METRICS=0s
    # The requests are made before loadgen's clock starts (--pregenerate): making them
    # costs about as much CPU as fleetlake spends taking them in, and both share the
    # two cores. SUSTAIN_MINUTES fleet-minutes are made; sending stops at SUSTAIN.
    loadgen_firehose "firehose-$TAG" "$RR/firehose.json" $((SUSTAIN_S + 900)) --seed "$SEED" \
        --accounts "$ACCOUNTS" --functions "$FUNCTIONS" --pregenerate --minutes "$SUSTAIN_MINUTES" \
        --duration "${SUSTAIN_S}s" --url "http://$HTTP_ADDR"
    local sent_end hwm exited started acked count
    sent_end=$(date +%s.%N)
    hwm=$(vmhwm_kib "$SERVER_PID")
    stop_server "$SERVER_PID"
    exited=$(date +%s.%N)
    # Committed: loadgen's first request to the server's exit after SIGTERM (which
    # commits whatever is still buffered).
    started=$(awk "BEGIN {printf \"%.3f\", $sent_end - $(jget "$RR/firehose.json" elapsed_s)}")
    acked=$(jget "$RR/firehose.json" datapoints_acknowledged)
    count=$(timeout "$STEP_TIMEOUT" "$FL" query --data-dir "$HOME_DIR/fh" --format csv \
        "SELECT count(*) FROM metrics" | tail -n 1 | tr -d '\r"')
    [[ $count == "$acked" ]] || fail "Firehose [$TAG]: count(*) = $count in the lake, $acked datapoints acknowledged"
    jput "$RR/firehose-server.json" peak_kib="$hwm" committed_s="$(awk "BEGIN {printf \"%.3f\", $exited - $started}")" \
        shutdown_s="$(awk "BEGIN {printf \"%.3f\", $exited - $sent_end}")" count="$count"
    say "Firehose [$TAG]: $acked datapoints acknowledged, all in the lake"
}

# visibility RATE: a fresh server fed at RATE with --probe-visibility.
visibility() {
    say "Firehose [$TAG]: visibility probes at $1 datapoints/s for ${VISIBILITY_S}s"
    rm -rf "$HOME_DIR/fh-vis"
    start_server "visibility-$TAG" "$HOME_DIR/fh-vis" FLEETLAKE_RETENTION__METRICS=0s
    loadgen_firehose "visibility-$TAG" "$RR/visibility.json" $((VISIBILITY_S + 600)) --seed "$SEED" \
        --accounts "$ACCOUNTS" --functions "$FUNCTIONS" --rate "$1" --duration "${VISIBILITY_S}s" \
        --probe-visibility --url "http://$HTTP_ADDR"
    jput "$RR/visibility-rate.json" rate="$1"
    stop_server "$SERVER_PID"
}

for ((k = 1; k <= ROUNDS; k++)); do
    HALF=
    for b in $(order "$k"); do
        at "$b" "$k"
        firehose_sustained
        half=$("$PYTHON" -c 'import sys; print(max(1, int(int(sys.argv[1]) / float(sys.argv[2]) / 2)))' \
            "$(jget "$RR/firehose.json" datapoints_acknowledged)" "$(jget "$RR/firehose.json" elapsed_s)")
        if [[ -z $HALF ]] || ((half < HALF)); then HALF=$half; fi
    done
    for b in $(order "$k"); do
        at "$b" "$k"
        visibility "$HALF"
    done
done

# The new binary's figures for the main table: results/NAME.json, each number the
# median of that number over the rounds (with one round, the round's).
"$PYTHON" - "$R/new" "$R" "$ROUNDS" <<'EOF'
import json, os, statistics, sys
src, out, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
def merge(values):
    first = values[0]
    if isinstance(first, dict):
        return {k: merge([v[k] for v in values]) for k in first}
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return statistics.median_low(values)  # counts stay whole
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return statistics.median(values)
    return first
for name in sorted(os.listdir(f"{src}/1")):
    values = [json.load(open(f"{src}/{k}/{name}")) for k in range(1, rounds + 1)]
    json.dump(merge(values), open(f"{out}/{name}", "w"))
EOF

# ---------------------------------------------------------------------------------
# 6. The table.
# ---------------------------------------------------------------------------------
BENCH_NPROC=$(nproc)
BENCH_DATE=$(date -u +%Y-%m-%d)
BENCH_VERSION=$("$FLEETLAKE" --version)
BENCH_COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
BENCH_CPU=$(grep -m 1 '^model name' /proc/cpuinfo | sed -E 's/^model name[[:space:]]*:[[:space:]]*//')
export BENCH_POINTS=$DATAPOINTS BENCH_RUNS=$RUNS BENCH_SUSTAIN_S=$SUSTAIN_S BENCH_VISIBILITY_S=$VISIBILITY_S \
    BENCH_FLUSH_ROWS=$FLUSH_ROWS BENCH_ROUNDS=$ROUNDS BENCH_INPUT_SOURCE=$INPUT_SOURCE BENCH_INPUT_FILES=${#INPUT_FILES[@]} \
    BENCH_INPUT_BYTES=$INPUT_BYTES BENCH_NPROC BENCH_DATE BENCH_VERSION BENCH_COMMIT BENCH_CPU \
    BENCH_SHAPE="$ACCOUNTS accounts × $FUNCTIONS functions × 5 metrics × $MINUTES minutes, seed $SEED"
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
    "fetched), DuckDB over the lake's compacted files (same answers checked) and over its own file."
    + (f" fleetlake: each number is its median over {env['BENCH_ROUNDS']} rounds."
       if int(env["BENCH_ROUNDS"]) > 1 else ""),
    "",
    "| | fleetlake | DuckDB | fleetlake / DuckDB | DuckDB on its own Parquet |",
    "|---|---|---|---|---|",
] + ["| " + " | ".join(row) + " |" for row in rows]
text = "\n".join(lines) + "\n"
open(out, "w").write(text)
print(text)
EOF
say "table written to $WORK/results.md"

# ---------------------------------------------------------------------------------
# 7. With BASELINE: baseline against new, figure by figure, each the median over the
#    rounds of that round's figure (range in brackets); appended to results.md.
# ---------------------------------------------------------------------------------
[[ -n $BASELINE ]] || exit 0
BENCH_BASE_VERSION=$("$BASELINE" --version)
export BENCH_BASELINE=$BASELINE BENCH_NEW=$FLEETLAKE BENCH_BASE_VERSION
"$PYTHON" - "$R" "$WORK/results.md" <<'EOF'
import json, os, statistics, sys
r, out = sys.argv[1], sys.argv[2]
env = os.environ
points, rounds = int(env["BENCH_POINTS"]), int(env["BENCH_ROUNDS"])
def figures(d):
    load = lambda name: json.load(open(f"{d}/{name}.json"))
    replay, compact = load("replay"), load("compact")
    before, after = load("lake-before"), load("lake-after")
    q, qmem = load("q-fleetlake"), load("q-fleetlake-mem")
    fh, fh_server, vis = load("firehose"), load("firehose-server"), load("visibility")
    acked = fh["datapoints_acknowledged"]
    return [
        ("replay: wall time", "s", replay["wall_s"]),
        ("replay: datapoints/s", "rate", points / replay["wall_s"]),
        ("replay: peak RSS", "kib", replay["peak_kib"]),
        ("compact: wall time", "s", compact["wall_s"]),
        ("compact: peak RSS", "kib", compact["peak_kib"]),
        ("replay + compact: wall time", "s", replay["wall_s"] + compact["wall_s"]),
        ("bytes per datapoint before compaction", "bpd", before["bytes"] / points),
        ("bytes per datapoint after compaction", "bpd", after["bytes"] / points),
        ("query: fleet-wide top 10 by Errors (best of RUNS)", "q", q["top10"]["best_s"]),
        ("query: GROUP BY account_id, all rows fetched (best of RUNS)", "q", q["accounts"]["best_s"]),
        ("query: one account's metrics (best of RUNS)", "q", q["one_account"]["best_s"]),
        ("queries: server peak RSS (VmHWM)", "kib", qmem["peak_kib"]),
        ("Firehose sustained: acknowledged", "rate", acked / fh["elapsed_s"]),
        ("Firehose sustained: committed (loadgen start → server exit)", "rate",
         acked / fh_server["committed_s"]),
        ("Firehose sustained: request latency p50", "ms", fh["latency_ms"]["p50"]),
        ("Firehose sustained: request latency p99", "ms", fh["latency_ms"]["p99"]),
        ("Firehose sustained: datapoints rejected", "n", fh["datapoints_rejected"]),
        ("Firehose sustained: SIGTERM → exit", "s", fh_server["shutdown_s"]),
        ("Firehose sustained: server peak RSS (VmHWM)", "kib", fh_server["peak_kib"]),
        ("visibility: 200 → row returned by SQL, p50", "ms", vis["visibility_ms"]["p50"]),
        ("visibility: 200 → row returned by SQL, p99", "ms", vis["visibility_ms"]["p99"]),
        ("visibility: probe run's rate (the same for both in a round)", "rate",
         json.load(open(f"{d}/visibility-rate.json"))["rate"]),
    ]
def fmt(kind, x):
    if kind == "s":
        return f"{x:.2f} s"
    if kind == "q":
        return f"{x * 1000:.0f} ms" if x >= 0.01 else f"{x * 1000:.1f} ms"
    if kind == "ms":
        return f"{x:.0f} ms"
    if kind == "rate":
        return f"{x / 1e6:.2f} M dp/s" if x >= 1e6 else f"{x / 1e3:.1f} k dp/s"
    if kind == "kib":
        return f"{x / 1024 / 1024:.2f} GiB" if x >= 1024 * 1024 else f"{x / 1024:.0f} MiB"
    if kind == "bpd":
        return f"{x:.2f}"
    return f"{x:,.0f}"
per = {b: [figures(f"{r}/{b}/{k}") for k in range(1, rounds + 1)] for b in ("base", "new")}
def cell(b, i):
    kind = per[b][0][i][1]
    values = [f[i][2] for f in per[b]]
    m = statistics.median(values)
    text = fmt(kind, m)
    if rounds > 1:
        text += f" ({fmt(kind, min(values))} – {fmt(kind, max(values))})"
    return m, text
rows = []
for i, (label, _, _) in enumerate(per["new"][0]):
    b, btext = cell("base", i)
    n, ntext = cell("new", i)
    ratio = f"{n / b:.2f}" if b else ("1.00" if n == b else "—")
    rows.append(f"| {label} | {btext} | {ntext} | {ratio} |")
lines = [
    "",
    f"Baseline against new in the same run, on the same input (made by fleetlake-loadgen): "
    f"{rounds} round{'s' if rounds != 1 else ''}, each stage run by both binaries in each round, "
    "alternated (baseline first in odd rounds, new first in even ones); each figure is the "
    "median over the rounds" + (" (range in brackets)" if rounds > 1 else "") + ".",
    f"Baseline: `{env['BENCH_BASELINE']}` ({env['BENCH_BASE_VERSION']}); new: `{env['BENCH_NEW']}` "
    f"({env['BENCH_VERSION']}, tree at {env['BENCH_COMMIT']}).",
    "",
    "| figure | baseline | new | new / baseline |",
    "|---|---|---|---|",
] + rows
text = "\n".join(lines) + "\n"
open(out, "a").write(text)
print(text)
EOF
say "baseline against new appended to $WORK/results.md"
