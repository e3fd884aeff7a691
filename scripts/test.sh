#!/usr/bin/env bash
# Runs the whole mmts test suite: unit tests of mmts-core, then integration tests that start
# real PostgreSQL servers (several per test) with the freshly built extension installed.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export MMTS_PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
start=$(date +%s)
log=$(mktemp)
trap 'rm -f "$log"' EXIT

bash scripts/install.sh
printf '==> cargo fmt --check\n'
cargo fmt --all -- --check
printf '==> unit tests (mmts-core)\n'
cargo test -p mmts-core 2>&1 | tee -a "$log"
bash scripts/regress-suite.sh
printf '==> integration tests (real PostgreSQL servers)\n'
cargo test -p mmts-tests -- --test-threads="${MMTS_TEST_THREADS:-2}" 2>&1 | tee -a "$log"
passed=$(grep -o '[0-9]* passed' "$log" | awk '{s += $1} END {print s + 0}')
failed=$(grep -o '[0-9]* failed' "$log" | awk '{s += $1} END {print s + 0}')
printf '==> whole suite in %s s\n' "$(( $(date +%s) - start ))"
printf '%s passed, %s failed\n' "$passed" "$failed"
