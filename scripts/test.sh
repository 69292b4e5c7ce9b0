#!/usr/bin/env bash
# The whole test suite, runnable on a fresh machine: installs what the tests need
# (cargo-nextest if missing; a Python venv with the deltalake reader as an independent
# reader of the lake, and moto as the AWS stand-in), then runs formatting and lint
# checks and every workspace test.
# Linking needs nothing extra: rustc links with its bundled LLD on x86_64 Linux.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo nextest --version >/dev/null 2>&1; then
    echo "== installing cargo-nextest"
    cargo install --locked cargo-nextest
fi

# deltalake + pyarrow: the independent reader of the lake. moto: Kinesis (and later
# S3, DynamoDB) on loopback. aws-kinesis-agg: KPL aggregates made by the real
# library (it imports six without declaring it).
# psycopg: a real Postgres driver (extended protocol, binary results) for the
# Postgres endpoint; psql (below) is the other client. cbor2: the CloudWatch shim
# (tests/e2e/cloudwatch_shim.py) between the Rust SDK's Smithy RPC v2 CBOR and moto.
if ! .venv/bin/python -c 'import deltalake, pyarrow, moto, aws_kinesis_agg, six, psycopg, cbor2' >/dev/null 2>&1 \
    || [ ! -x .venv/bin/moto_server ]; then
    echo "== creating .venv: deltalake, pyarrow, moto server, aws-kinesis-agg, psycopg, cbor2"
    python3 -m venv .venv
    .venv/bin/pip install --quiet --upgrade pip
    .venv/bin/pip install --quiet 'deltalake>=1.0' 'pyarrow>=15' 'moto[server]>=5,<6' \
        'aws-kinesis-agg>=1.2' six 'psycopg[binary]>=3.1' 'cbor2>=5.6'
fi

# psql, the Postgres command-line client, from Debian.
if ! command -v psql >/dev/null 2>&1; then
    echo "== installing postgresql-client (apt)"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-client >/dev/null
fi
# openssl makes the TLS tests' certificate; chattr (e2fsprogs) makes a directory
# read-only even for root in the fault tests.
for tool in openssl:openssl chattr:e2fsprogs; do
    if ! command -v "${tool%%:*}" >/dev/null 2>&1; then
        echo "== installing ${tool#*:} (apt)"
        SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
        $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${tool#*:}" >/dev/null
    fi
done
# Alertmanager, the real peer alerts are posted to, from Debian.
if ! command -v prometheus-alertmanager >/dev/null 2>&1; then
    echo "== installing prometheus-alertmanager (apt)"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus-alertmanager >/dev/null
fi
export DELTALAKE_PYTHON="$PWD/.venv/bin/python"

# kinesis-local: faithful Kinesis resharding (moto's is wrong), from the npm registry.
if [ ! -f tests/kinesis-local/node_modules/kinesis-local/main.js ]; then
    echo "== installing kinesis-local (npm)"
    npm ci --prefix tests/kinesis-local --no-audit --no-fund --loglevel=error
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== tests"
cargo nextest run --workspace --locked --no-fail-fast
