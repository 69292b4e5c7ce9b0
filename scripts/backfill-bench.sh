#!/usr/bin/env bash
# `fleetlake backfill cloudwatch` throughput: the fetch → rows → write-ahead log → lake
# pipeline against a CloudWatch that answers at once.
#
# The CloudWatch shim (tests/e2e/cloudwatch_shim.py) in synthetic mode plays every
# account: METRICS metrics (Synth/M<i> {Id=<i>}) with a datapoint in every period, no
# moto behind GetMetricData (moto's GetMetricData is quadratic and would measure
# itself). moto answers only STS AssumeRole (one call per account). The backfill runs
# with its pacing limits lifted, so the figure is what fleetlake (and the Python shim,
# which encodes every answer in CBOR) can do, not CloudWatch's quotas (396,000
# datapoints/s per account and region for data older than 3 hours).
#
#   scripts/backfill-bench.sh [WORK_DIR]
#
# Environment: ACCOUNTS (8), METRICS (170: ten GetMetricData calls per account-day),
# DAYS (1), CONCURRENCY (4), FLEETLAKE (the binary; built with `cargo build --release`
# if unset), PYTHON (the test venv's: moto, cbor2).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-$(mktemp -d /tmp/fleetlake-backfill-bench.XXXXXX)}
ACCOUNTS=${ACCOUNTS:-8}
METRICS=${METRICS:-170}
DAYS=${DAYS:-1}
CONCURRENCY=${CONCURRENCY:-4}
PYTHON=${PYTHON:-$PWD/.venv/bin/python}
if [ -z "${FLEETLAKE:-}" ]; then
    cargo build --release --locked --quiet
    FLEETLAKE=$PWD/target/release/fleetlake
fi
mkdir -p "$WORK"
rm -rf "$WORK/data"

port() { "$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
MOTO_PORT=$(port)
"$(dirname "$PYTHON")/moto_server" -H 127.0.0.1 -p "$MOTO_PORT" >"$WORK/moto.log" 2>&1 &
MOTO=$!
coproc SHIM { exec "$PYTHON" tests/e2e/cloudwatch_shim.py 0 "http://127.0.0.1:$MOTO_PORT"; }
SHIM_PID=$SHIM_PID
trap 'kill $MOTO $SHIM_PID 2>/dev/null || true' EXIT
read -r READY SHIM_PORT <&"${SHIM[0]}"
[ "$READY" = ready ]
for _ in $(seq 50); do
    curl -s -o /dev/null "http://127.0.0.1:$MOTO_PORT/moto-api/" && break
    sleep 0.1
done
curl -s -X POST --data "$METRICS" "http://127.0.0.1:$SHIM_PORT/_shim/synthetic" >/dev/null

accounts=$(seq 100000000001 $((100000000000 + ACCOUNTS)) | paste -sd,)
start=2026-01-01T00:00:00Z
end=$(date -u -d "2026-01-01 + $DAYS days" +%Y-%m-%dT%H:%M:%SZ)
echo "== backfill: $ACCOUNTS accounts x $METRICS metrics x $DAYS day(s) at 60 s, 4 statistics"
env AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_EC2_METADATA_DISABLED=true \
    AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/dev/null \
    /usr/bin/time -f 'elapsed %e s, user %U s, system %S s, peak RSS %M KiB' \
    "$FLEETLAKE" backfill cloudwatch --data-dir "$WORK/data" \
    --endpoint-url "http://127.0.0.1:$SHIM_PORT" --region us-east-1 \
    --account "$accounts" --role-name fleetlake-read \
    --start "$start" --end "$end" --concurrency "$CONCURRENCY" \
    --max-calls-per-second 1000 --max-datapoints-per-second 1e9 2>&1 | tee "$WORK/backfill.txt"
echo "== shim calls"
curl -s "http://127.0.0.1:$SHIM_PORT/_shim/stats" | "$PYTHON" -c '
import json, sys
calls = {}
for per_key in json.load(sys.stdin).values():
    for op, n in per_key.items():
        calls[op] = calls.get(op, 0) + n
print(calls)'
echo "== lake"
"$FLEETLAKE" query --data-dir "$WORK/data" \
    "SELECT count(*) AS rows, count(DISTINCT account_id) AS accounts, sum(count) AS samples FROM metrics"
