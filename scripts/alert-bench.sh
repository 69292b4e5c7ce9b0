#!/usr/bin/env bash
# Rule evaluation at fleet scale: 100 and 1,000 alert rules over 6,000 accounts with
# 10.08 million datapoints of recent data (6,000 accounts x 4 Lambda functions x 5
# metrics x the last 84 minutes, made as scripts/lake-bench.sh makes them, then
# compacted), evaluated by `fleetlake rules eval`: the same SQL path the service's
# evaluator takes (lake only here: no hot buffer). The rules are the shipped examples'
# kinds (error rate, throttles, p99 duration, concurrency, accounts that stopped
# reporting) with varied thresholds, each over the fleet's last 5 (or 15) minutes.
# Prints a Markdown table.
#
#   scripts/alert-bench.sh [WORK_DIR]
#
# Thresholds are set so that a rule finds a few instances, as real fleet rules do.
#
# Environment: ACCOUNTS (6000), MINUTES (84), FLEETLAKE (the binary; built with
# `cargo build --release` if unset), RULE_COUNTS ("100 1000"), LEAD_MINUTES (3: the
# data ends this many minutes after generation starts, about when evaluation starts
# once it is generated, replayed and compacted; the script prints both times).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-$(mktemp -d /tmp/fleetlake-alert-bench.XXXXXX)}
export ACCOUNTS=${ACCOUNTS:-6000} MINUTES=${MINUTES:-84}
RULE_COUNTS=${RULE_COUNTS:-100 1000}
if [[ -z "${FLEETLAKE:-}" ]]; then
    cargo build --release --bin fleetlake >&2
    FLEETLAKE=$PWD/target/release/fleetlake
fi
LEAD_MINUTES=${LEAD_MINUTES:-3}
END_MS=$(( ($(date +%s) / 60 + LEAD_MINUTES) * 60000 ))
export BASE_MS=$(( END_MS - (MINUTES - 1) * 60000 ))
mkdir -p "$WORK"
GENERATE_ONLY=1 scripts/lake-bench.sh "$WORK" >&2
DATA="$WORK/data"
rm -rf "$DATA"
FLEETLAKE_BUFFER__FLUSH_ROWS=200000 FLEETLAKE_RETENTION__METRICS=0s \
    "$FLEETLAKE" replay --data-dir "$DATA" --format json "$WORK"/input/*.ndjson.gz >&2
FLEETLAKE_RETENTION__METRICS=0s "$FLEETLAKE" compact --data-dir "$DATA" --vacuum-grace 0s >&2

# The registry: every account active, a few retired.
python3 - "$WORK" "$ACCOUNTS" <<'PY'
import json, sys
work, accounts = sys.argv[1], int(sys.argv[2])
with open(f"{work}/accounts.jsonl", "w") as f:
    for a in range(accounts):
        f.write(json.dumps({"account_id": f"{100000000000 + a:012d}", "account_name": f"tenant-{a}",
                            "environment": "prod", "owner_team": f"team-{a % 40}",
                            "lifecycle_state": "retired" if a % 500 == 0 else "active"}) + "\n")
PY
printf '[accounts]\nfile = "%s/accounts.jsonl"\n' "$WORK" > "$WORK/fleetlake.toml"

for n in $RULE_COUNTS; do
    python3 scripts/fleet_rules.py "$WORK/rules-$n.yml" "$n"
    "$FLEETLAKE" rules check --config "$WORK/fleetlake.toml" --data-dir "$DATA" "$WORK/rules-$n.yml" >&2
done

echo "data: $MINUTES minutes ending $(date -u -d @$((END_MS / 1000)) +%H:%M) UTC; evaluation starts $(date -u +%H:%M:%S) UTC" >&2
echo "| rules | SQL statements | alert instances | total | per rule p50 | per rule max | peak RSS |"
echo "|---|---|---|---|---|---|---|"
for n in $RULE_COUNTS; do
    OUT="$WORK/eval-$n.txt"
    START=$(date +%s.%N)
    /usr/bin/time -f "%M" -o "$WORK/rss-$n" \
        "$FLEETLAKE" rules eval --config "$WORK/fleetlake.toml" --data-dir "$DATA" "$WORK/rules-$n.yml" > "$OUT"
    END=$(date +%s.%N)
    python3 - "$OUT" "$n" "$START" "$END" "$(cat "$WORK/rss-$n")" <<'PY'
import re, statistics, sys
out, n, start, end, rss_kb = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
times, instances = [], 0
unit = {"ns": 1e-6, "µs": 1e-3, "us": 1e-3, "ms": 1.0, "s": 1000.0}
for line in open(out):
    m = re.match(r"\S+: (\d+) instance\(s\) in ([\d.]+)(ns|µs|us|ms|s)$", line.strip())
    if m:
        instances += int(m.group(1))
        times.append(float(m.group(2)) * unit[m.group(3)])
assert len(times) == n, (len(times), n)
print(f"| {n} | {n} | {instances} | {end - start:.1f} s | {statistics.median(times):.0f} ms | "
      f"{max(times):.0f} ms | {rss_kb / 1024:.0f} MiB |")
PY
done
