#!/usr/bin/env bash
# The lake at fleet scale, measured: a fleet's metrics (default 6,000 accounts x 4
# Lambda functions x 5 metrics x 84 minutes = 10.08 million datapoints) replayed into
# the lake in many small commits, as a running service makes them; then bytes per
# datapoint, files per day partition and two queries (one account; a fleet-wide
# GROUP BY), before and after `fleetlake compact`. Prints a Markdown table.
#
#   scripts/lake-bench.sh [WORK_DIR]
#
# Environment: ACCOUNTS (6000), MINUTES (84), BASE_MS (epoch ms of the first minute;
# 2025-11-25T00:00:00Z, so that every minute falls in one day), FLUSH_ROWS (commit size of the replay,
# 200000), RUNS (query repetitions, best kept: 3), FLEETLAKE (the binary; built with
# `cargo build --release` if unset), PYTHON (with the `deltalake` package; the test
# venv's, made by scripts/test.sh, if unset).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-$(mktemp -d /tmp/fleetlake-lake-bench.XXXXXX)}
ACCOUNTS=${ACCOUNTS:-6000}
MINUTES=${MINUTES:-84}
FLUSH_ROWS=${FLUSH_ROWS:-200000}
RUNS=${RUNS:-3}
BASE_MS=${BASE_MS:-1764028800000}
PYTHON=${PYTHON:-$PWD/.venv/bin/python}
mkdir -p "$WORK/input"
DATA="$WORK/data"
rm -rf "$DATA"

MARK="$WORK/input/.generated-$ACCOUNTS-$MINUTES-$BASE_MS"
if [[ ! -f "$MARK" ]]; then
rm -f "$WORK"/input/*.ndjson.gz "$WORK"/input/.generated-*
echo "generating $ACCOUNTS accounts x 4 functions x 5 metrics x $MINUTES minutes into $WORK/input" >&2
python3 - "$WORK/input" "$ACCOUNTS" "$MINUTES" "$BASE_MS" <<'EOF'
import gzip, random, sys
out, accounts, minutes, base = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
metrics = [("Invocations", "Count"), ("Errors", "Count"), ("Throttles", "Count"),
           ("Duration", "Milliseconds"), ("ConcurrentExecutions", "Count")]
regions = ["us-east-1", "eu-west-1", "ap-southeast-2"]
rng = random.Random(42)
for start in range(0, minutes, 12):
    with gzip.open(f"{out}/minutes-{start:04d}.ndjson.gz", "wt", compresslevel=1) as f:
        for minute in range(start, min(start + 12, minutes)):
            t = base + minute * 60_000
            lines = []
            for a in range(accounts):
                account = f"{100000000000 + a:012d}"
                region = regions[a % 3]
                for fn in range(4):
                    for name, unit in metrics:
                        n = rng.randint(1, 60)
                        v = round(rng.random() * 500, 1) if name == "Duration" else float(rng.randint(0, n))
                        lines.append(
                            f'{{"metric_stream_name":"fleet","account_id":"{account}","region":"{region}",'
                            f'"namespace":"AWS/Lambda","metric_name":"{name}","dimensions":{{"FunctionName":"fn-{fn}"}},'
                            f'"timestamp":{t},"value":{{"count":{n}.0,"sum":{v * n},"max":{v},"min":{v / 2},"p99":{v}}},'
                            f'"unit":"{unit}"}}')
            f.write("\n".join(lines))
            f.write("\n")
EOF
touch "$MARK"
fi
[[ -z "${GENERATE_ONLY:-}" ]] || exit 0
if [[ -z "${FLEETLAKE:-}" ]]; then
  cargo build --release --locked --bin fleetlake >&2
  FLEETLAKE=$PWD/target/release/fleetlake
fi
POINTS=$((ACCOUNTS * 4 * 5 * MINUTES))

timed() { # prints "seconds peak_rss_kib"; the command's stdout goes to $WORK/last.out
  /usr/bin/time -f "%e %M" -o "$WORK/time" "$@" >"$WORK/last.out" 2>"$WORK/last.err" || {
    cat "$WORK/last.err" >&2
    exit 1
  }
  cat "$WORK/time"
}

echo "replaying $POINTS datapoints (a commit per $FLUSH_ROWS rows)" >&2
read -r REPLAY_S REPLAY_KIB < <(FLEETLAKE_BUFFER__FLUSH_ROWS=$FLUSH_ROWS FLEETLAKE_LAKE__ROLLUP_INTERVAL=1m \
  timed "$FLEETLAKE" replay --data-dir "$DATA" --format json "$WORK"/input/*.ndjson.gz)

ONE_ACCOUNT="SELECT metric_name, count(*) AS n, round(sum(sum), 2) AS s, max(max) AS m FROM metrics WHERE account_id = '100000004242' GROUP BY metric_name ORDER BY metric_name"
FLEET="SELECT account_id, round(sum(sum), 2) AS errors FROM metrics WHERE metric_name = 'Errors' GROUP BY account_id ORDER BY errors DESC, account_id LIMIT 10"
FLEET_1H="SELECT account_id, round(sum(sum), 2) AS errors FROM metrics_1h WHERE metric_name = 'Errors' GROUP BY account_id ORDER BY errors DESC, account_id LIMIT 10"

# Answers are compared before and after compaction (sums rounded: the order of float
# additions changes with the file layout).
best_of() { # best wall time of $RUNS runs of a query
  local best=""
  for _ in $(seq "$RUNS"); do
    read -r s _ < <(timed "$FLEETLAKE" query --data-dir "$DATA" --format csv "$1")
    if [[ -z "$best" ]] || awk "BEGIN{exit !($s < $best)}"; then best=$s; fi
  done
  echo "$best"
}

measure() { # bytes/datapoint, most files in a day partition, bytes (active files only)
  "$PYTHON" - "$DATA/lake/metrics" "$POINTS" <<'EOF'
import collections, os, sys
from deltalake import DeltaTable
files = DeltaTable(sys.argv[1]).file_uris()
size = sum(os.path.getsize(f.removeprefix("file://")) for f in files)
days = collections.Counter(f.split("day=")[1].split("/")[0] for f in files)
print(f"{size / int(sys.argv[2]):.2f} {max(days.values())} {size}")
EOF
}

read -r BPD_BEFORE FILES_BEFORE BYTES_BEFORE < <(measure)
ONE_BEFORE=$(best_of "$ONE_ACCOUNT")
cp "$WORK/last.out" "$WORK/one-account.before.csv"
FLEET_BEFORE=$(best_of "$FLEET")
cp "$WORK/last.out" "$WORK/fleet.before.csv"

echo "compacting (roll-ups first)" >&2
read -r COMPACT_S COMPACT_KIB < <(timed "$FLEETLAKE" compact --data-dir "$DATA" --vacuum-grace 0s)
cat "$WORK/last.out" >&2
read -r BPD_AFTER FILES_AFTER BYTES_AFTER < <(measure)
ONE_AFTER=$(best_of "$ONE_ACCOUNT")
cmp -s "$WORK/last.out" "$WORK/one-account.before.csv" || { echo "one-account answer changed by compaction" >&2; exit 1; }
FLEET_AFTER=$(best_of "$FLEET")
cmp -s "$WORK/last.out" "$WORK/fleet.before.csv" || { echo "fleet answer changed by compaction" >&2; exit 1; }
FLEET_ROLLUP=$(best_of "$FLEET_1H")
cmp -s "$WORK/last.out" "$WORK/fleet.before.csv" || { echo "metrics_1h answer differs from metrics" >&2; exit 1; }

cat <<EOT
$POINTS datapoints ($ACCOUNTS accounts), replay $REPLAY_S s ($(awk "BEGIN{printf \"%.0f\", $POINTS / $REPLAY_S}") datapoints/s, peak RSS $((REPLAY_KIB / 1024)) MiB, a commit per $FLUSH_ROWS rows); compact $COMPACT_S s (peak RSS $((COMPACT_KIB / 1024)) MiB).

| | before compaction | after compaction |
|---|---|---|
| bytes per datapoint on disk (metrics) | $BPD_BEFORE ($BYTES_BEFORE B) | $BPD_AFTER ($BYTES_AFTER B) |
| data files in the day partition | $FILES_BEFORE | $FILES_AFTER |
| one account, 5 metrics summed (\`fleetlake query\`, best of $RUNS) | $ONE_BEFORE s | $ONE_AFTER s |
| fleet-wide GROUP BY account_id, top 10 by errors | $FLEET_BEFORE s | $FLEET_AFTER s |
| the same over \`metrics_1h\` | | $FLEET_ROLLUP s |
EOT
