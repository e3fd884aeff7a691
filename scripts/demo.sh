#!/usr/bin/env bash
# Builds and installs mmts, then starts a local 3-node cluster on loopback and shows it.
#   scripts/demo.sh          start (again) the cluster, in $MMTS_DEMO_DIR (default /tmp/mmts-demo)
#   scripts/demo.sh stop     stop it
# The servers are the newest PostgreSQL installed (15 from Debian if none), or
# MMTS_PG_VERSIONS=<major> (installed first if missing), or PG_CONFIG=<path>.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/postgres.sh
export PATH="$HOME/.cargo/bin:$PATH"
DIR="${MMTS_DEMO_DIR:-/tmp/mmts-demo}"

if [ "${1:-start}" = stop ]; then
  exec cargo run --quiet --release -p mmts-tests --bin mmts-cluster -- stop --dir "$DIR"
fi
mapfile -t versions < <(chosen_postgres)
if [ ${#versions[@]} -ne 1 ]; then
  echo "error: the demo runs on one PostgreSQL version; MMTS_PG_VERSIONS names ${#versions[@]}" >&2
  exit 1
fi
MMTS_PG_VERSIONS=${versions[0]} bash scripts/install.sh
export MMTS_PG_CONFIG
MMTS_PG_CONFIG=$(pg_config_for "${versions[0]}")
printf '==> building the cluster launcher\n'
cargo build --quiet --release -p mmts-tests --bin mmts-cluster
exec target/release/mmts-cluster start --nodes 3 --dir "$DIR" --port "${MMTS_DEMO_PORT:-15432}"
