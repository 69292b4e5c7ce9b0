#!/usr/bin/env bash
# Fleet alerting under ingest, end to end (issue 26): ingest at full rate with and
# without 1,000 rules loaded, time from a breaching datapoint's 200 to the fake
# PagerDuty's receipt with ingest at half rate, and the rules' round time meanwhile.
# What it does and its settings: scripts/fleet_alert_bench.py. Prints a Markdown table.
#
#   scripts/fleet-alert-bench.sh [WORK_DIR]
#
# Environment: FLEETLAKE (the binary; `cargo build --release` with fleetlake-loadgen
# if unset), LOADGEN (beside FLEETLAKE if unset), PYTHON (python3), and the settings
# listed in scripts/fleet_alert_bench.py (ACCOUNTS, FUNCTIONS, RULES, INTERVAL, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-$(mktemp -d /tmp/fleetlake-fleet-alert-bench.XXXXXX)}
if [[ -z "${FLEETLAKE:-}" ]]; then
    cargo build --release --locked --bin fleetlake --bin fleetlake-loadgen >&2
    FLEETLAKE=$PWD/target/release/fleetlake
fi
LOADGEN=${LOADGEN:-$(dirname "$FLEETLAKE")/fleetlake-loadgen}
[[ -x $LOADGEN ]] || { echo "fleet-alert-bench: no $LOADGEN (cargo build --release --bin fleetlake-loadgen)" >&2; exit 1; }
mkdir -p "$WORK"
export FLEETLAKE LOADGEN
exec "${PYTHON:-python3}" scripts/fleet_alert_bench.py "$WORK"
