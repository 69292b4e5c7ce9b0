#!/usr/bin/env bash
# What tenant isolation and the statement limits cost, in one run: the same lake
# queried through the Postgres endpoint by two binaries, alternated, best of RUNS each:
#
#   base  the binary before the isolation work (BASELINE, required)
#   new   this tree's binary (FLEETLAKE; built with `cargo build --release` if unset)
#
# The lake: `fleetlake-loadgen --to files` (ACCOUNTS x FUNCTIONS x 5 metrics x
# MINUTES; LOADGEN, by default `fleetlake-loadgen` beside FLEETLAKE), replayed and
# compacted by the new binary. Queries, as an unrestricted user (`ops`) and as a user
# limited to one account (`tenant`):
#   - one account's metrics (ops names the account; the tenant's scope is it);
#   - the same over the last half of the time range;
#   - a fleet-wide top 10 (ops);
#   - `SELECT 1` (the per-statement cost: admission, memory pool, runtime).
# Prints a Markdown table and writes it to WORK_DIR/results.md.
#
#   BASELINE=/path/to/old/fleetlake scripts/isolation-bench.sh [WORK_DIR]
#
# Environment: ACCOUNTS (6000), FUNCTIONS (4), MINUTES (10), RUNS (5), LOADGEN, PYTHON
# (with psycopg; the test venv's if unset).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-$(mktemp -d /tmp/fleetlake-isolation-bench.XXXXXX)}
ACCOUNTS=${ACCOUNTS:-6000}
FUNCTIONS=${FUNCTIONS:-4}
MINUTES=${MINUTES:-10}
RUNS=${RUNS:-5}
PYTHON=${PYTHON:-$PWD/.venv/bin/python}
: "${BASELINE:?set BASELINE to the binary to compare with}"
if [[ -z "${FLEETLAKE:-}" ]]; then
    cargo build --release --locked --bin fleetlake --bin fleetlake-loadgen >&2
    FLEETLAKE=$PWD/target/release/fleetlake
fi
LOADGEN=${LOADGEN:-$(dirname "$FLEETLAKE")/fleetlake-loadgen}
[[ -x $LOADGEN ]] || {
    echo "no $LOADGEN: build it (cargo build --release --bin fleetlake-loadgen) or set LOADGEN" >&2
    exit 1
}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
rm -rf "$WORK"/{input,lake} "$WORK/results.md"
mkdir -p "$WORK/input"

echo "== input: $ACCOUNTS accounts x $FUNCTIONS functions x $MINUTES minutes" >&2
"$LOADGEN" --seed 1 --accounts "$ACCOUNTS" --functions "$FUNCTIONS" \
    --minutes "$MINUTES" --to files --out "$WORK/input" --report json >/dev/null
echo "== replay and compact" >&2
FLEETLAKE_RETENTION__METRICS=0s "$FLEETLAKE" replay --data-dir "$WORK/lake" --format json \
    "$WORK"/input/*.json.gz >/dev/null 2>&1
FLEETLAKE_RETENTION__METRICS=0s "$FLEETLAKE" compact --data-dir "$WORK/lake" \
    --vacuum-grace 0s >/dev/null 2>&1

"$PYTHON" - "$WORK" "$BASELINE" "$FLEETLAKE" "$RUNS" <<'EOF'
import os, re, subprocess, sys, threading, time
import psycopg

work, base, new, runs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
lake = os.path.join(work, "lake")

def serve(binary, config):
    env = dict(os.environ, FLEETLAKE_RETENTION__METRICS="0s", FLEETLAKE_LOG="info",
               FLEETLAKE_LAKE__ROLLUP_INTERVAL="0s")
    proc = subprocess.Popen([binary, "serve", "--config", config, "--data-dir", lake,
                             "--http-addr", "127.0.0.1:0", "--pg-addr", "127.0.0.1:0"],
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline:
        line = proc.stderr.readline()
        m = re.search(r"postgres listening addr=127\.0\.0\.1:(\d+)", line)
        if m:
            # Keep reading the log: a full pipe would stop the server at its next line.
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, int(m.group(1))
    raise SystemExit(f"{binary} did not start")

def connect(port, user):
    return psycopg.connect(host="127.0.0.1", port=port, user=user, password=user + "-pw",
                           dbname="fleetlake", autocommit=True)

first = None
config = os.path.join(work, "users.toml")
def write_config(account):
    with open(config, "w") as f:
        f.write(f'''
[[query.users]]
name = "ops"
password = "ops-pw"

[[query.users]]
name = "tenant"
password = "tenant-pw"
accounts = ["{account}"]
''')

# The first account and the time range, from the lake.
write_config("000000000000")
proc, port = serve(new, config)
with connect(port, "ops") as c:
    first, lo, hi = c.execute(
        "SELECT min(account_id), min(time), max(time) FROM metrics").fetchone()
    mid = lo + (hi - lo) / 2
proc.terminate(); proc.wait()
write_config(first)
since = mid.strftime("%Y-%m-%dT%H:%M:%SZ")

queries = [
    ("one account, ops (WHERE account_id)", "ops",
     f"SELECT metric_name, sum(sum), max(max) FROM metrics WHERE account_id = '{first}' GROUP BY 1 ORDER BY 1"),
    ("one account, tenant (its scope)", "tenant",
     "SELECT metric_name, sum(sum), max(max) FROM metrics GROUP BY 1 ORDER BY 1"),
    ("half the time, ops", "ops",
     f"SELECT metric_name, sum(sum) FROM metrics WHERE account_id = '{first}' AND time >= TIMESTAMP '{since}' GROUP BY 1 ORDER BY 1"),
    ("half the time, tenant", "tenant",
     f"SELECT metric_name, sum(sum) FROM metrics WHERE time >= TIMESTAMP '{since}' GROUP BY 1 ORDER BY 1"),
    ("fleet top 10, ops", "ops",
     "SELECT account_id, sum(sum) AS s FROM metrics WHERE metric_name = 'Errors' GROUP BY 1 ORDER BY s DESC, 1 LIMIT 10"),
]
best = {}
answers = {}
for round_ in range(2):
    for name, binary in [("new", new), ("base", base)] if round_ == 0 else [("base", base), ("new", new)]:
        proc, port = serve(binary, config)
        conns = {u: connect(port, u) for u in ("ops", "tenant")}
        for label, user, sql in queries:
            conns[user].execute(sql).fetchall()  # warm-up
            for _ in range(runs):
                t = time.perf_counter()
                rows = conns[user].execute(sql).fetchall()
                ms = (time.perf_counter() - t) * 1000
                key = (label, name)
                best[key] = min(best.get(key, ms), ms)
            answers.setdefault(label, {})[name] = rows
        t = time.perf_counter()
        for _ in range(200):
            conns["ops"].execute("SELECT 1").fetchall()
        ms = (time.perf_counter() - t) * 1000 / 200
        best[("SELECT 1 (mean of 200)", name)] = min(best.get(("SELECT 1 (mean of 200)", name), ms), ms)
        for c in conns.values():
            c.close()
        proc.terminate(); proc.wait()

for label, by in answers.items():
    if by["new"] != by["base"]:
        raise SystemExit(f"{label}: the binaries answer differently")
for a, b in [("one account, ops (WHERE account_id)", "one account, tenant (its scope)"),
             ("half the time, ops", "half the time, tenant")]:
    if answers[a]["new"] != answers[b]["new"]:
        raise SystemExit(f"{a} and {b} answer differently")

labels = [q[0] for q in queries] + ["SELECT 1 (mean of 200)"]
out = ["| query | before (ms) | after (ms) | after / before |", "|---|---|---|---|"]
for label in labels:
    b, n = best[(label, "base")], best[(label, "new")]
    out.append(f"| {label} | {b:.1f} | {n:.1f} | {n / b:.2f} |")
table = "\n".join(out)
print(table)
open(os.path.join(work, "results.md"), "w").write(table + "\n")
EOF
