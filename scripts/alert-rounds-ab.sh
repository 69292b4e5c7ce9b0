#!/usr/bin/env bash
# The alert_rounds bench (benches/alert_rounds.rs) of two builds in one run,
# alternated, and each figure's ratio new / baseline. Any bench that prints its
# figures as `| name | time |` rows works the same (alert_engine does).
#
#   scripts/alert-rounds-ab.sh BASELINE_BENCH NEW_BENCH [RUNS]
#
# BASELINE_BENCH and NEW_BENCH are bench executables, as `cargo bench --bench
# alert_rounds --no-run` prints them (target/release/deps/alert_rounds-*), of the two
# trees. RUNS (default 2) runs of each, alternated (baseline first in odd runs, new
# first in even ones); each figure is the median over the runs. The bench's own
# settings (FLEETLAKE_BENCH_ACCOUNTS, _FUNCTIONS, _MINUTES, _ROUNDS, _FOLDS) pass
# through. Prints a Markdown table.
set -euo pipefail
BASE=${1:?baseline bench executable}
NEW=${2:?new bench executable}
RUNS=${3:-2}
OUT=$(mktemp -d /tmp/fleetlake-alert-rounds-ab.XXXXXX)
for ((r = 1; r <= RUNS; r++)); do
    if ((r % 2)); then order="base new"; else order="new base"; fi
    for which in $order; do
        bin=$BASE
        [[ $which == new ]] && bin=$NEW
        echo "alert-rounds-ab: run $r, $which" >&2
        (cd "$OUT" && "$bin" > "$OUT/$which.$r.md" 2> "$OUT/$which.$r.log")
    done
done
python3 - "$OUT" "$RUNS" <<'EOF'
import re, statistics, sys
out, runs = sys.argv[1], int(sys.argv[2])

def figures(path):
    rows = {}
    for line in open(path):
        m = re.match(r"\| (.+?) \| ([0-9.]+)(ms|s|µs) \|$", line.strip())
        if m:
            scale = {"s": 1000.0, "ms": 1.0, "µs": 0.001}[m.group(3)]
            rows[m.group(1)] = float(m.group(2)) * scale
    return rows

base = [figures(f"{out}/base.{r}.md") for r in range(1, runs + 1)]
new = [figures(f"{out}/new.{r}.md") for r in range(1, runs + 1)]
print(open(f"{out}/new.1.md").readline().strip())
print()
print("| figure | baseline | new | new / baseline |")
print("|---|---|---|---|")
for name in base[0]:
    if not all(name in f for f in base + new):
        continue
    b = statistics.median(f[name] for f in base)
    n = statistics.median(f[name] for f in new)
    print(f"| {name} | {b:,.1f} ms | {n:,.1f} ms | {n / b:.2f} |")
print()
print(f"(median of {runs} runs each, alternated; outputs in {out})")
EOF
