#!/usr/bin/env bash
# Fuzzes every decoder of untrusted input with cargo-fuzz (libFuzzer), each target for
# a bounded time: the Firehose body parser (all four formats), the record decoders, and
# KPL de-aggregation.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]      (default 60)
#
# Installs cargo-fuzz if missing. libFuzzer's instrumentation needs a nightly compiler:
# the nightly toolchain if rustup has one, else the stable one with RUSTC_BOOTSTRAP=1.
# Seeds come from tests/fixtures/formats; corpora and crashes stay under fuzz/
# (ignored by git). A crash found becomes a regression test in the decoder's module.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_TARGET="${1:-60}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install --locked cargo-fuzz
fi
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    FUZZ=(cargo +nightly fuzz)
else
    export RUSTC_BOOTSTRAP=1
    FUZZ=(cargo fuzz)
fi

# Seeds: a selector byte (the format: 0 json, 1 otel1, 2 otel07, 3 cwlogs) then data.
seed() { # target name selector file
    mkdir -p "fuzz/corpus/$1"
    { printf "\\x$(printf %02x "$3")"; cat "$4"; } > "fuzz/corpus/$1/$2"
}
fixtures=tests/fixtures/formats
seed records otel10 1 "$fixtures/otel10.bin"
seed records otel07 2 "$fixtures/otel07.bin"
seed records cwlogs 3 "$fixtures/cwlogs_data.json.gz"
printf '{"account_id":"111122223333","region":"us-east-1","namespace":"AWS/Lambda","metric_name":"Errors","dimensions":{"FunctionName":"f"},"timestamp":1700000000000,"value":{"count":1,"sum":2,"min":2,"max":2,"p99":2},"unit":"Count"}\n' > /tmp/fleetlake-fuzz-line.json
seed records json 0 /tmp/fleetlake-fuzz-line.json
printf '{"requestId":"r","timestamp":1,"records":[{"data":"%s"}]}' "$(base64 -w0 /tmp/fleetlake-fuzz-line.json)" > /tmp/fleetlake-fuzz-body.json
seed firehose_body json 0 /tmp/fleetlake-fuzz-body.json
mkdir -p fuzz/corpus/kpl && cp "$fixtures"/kpl_*.bin fuzz/corpus/kpl/

for target in firehose_body records kpl; do
    echo "== fuzzing $target for ${SECONDS_PER_TARGET}s"
    "${FUZZ[@]}" run --release "$target" "fuzz/corpus/$target" -- \
        -max_total_time="$SECONDS_PER_TARGET" -max_len=262144 -rss_limit_mb=4096 -print_final_stats=1
done
