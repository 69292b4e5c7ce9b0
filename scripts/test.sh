#!/usr/bin/env bash
# The whole test suite, runnable on a fresh machine: installs what the tests need
# (mold for fast links, a Python venv with the deltalake reader), then runs
# formatting and lint checks and every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v mold >/dev/null 2>&1; then
    echo "== installing mold (linker)"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mold >/dev/null
fi

if ! cargo nextest --version >/dev/null 2>&1; then
    echo "== installing cargo-nextest"
    cargo install --locked cargo-nextest
fi

if ! .venv/bin/python -c 'import deltalake, pyarrow' >/dev/null 2>&1; then
    echo "== creating .venv with deltalake and pyarrow (independent lake reader)"
    python3 -m venv .venv
    .venv/bin/pip install --quiet --upgrade pip
    .venv/bin/pip install --quiet 'deltalake>=1.0' 'pyarrow>=15'
fi
export DELTALAKE_PYTHON="$PWD/.venv/bin/python"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== tests"
cargo nextest run --workspace --locked --no-fail-fast
