#!/usr/bin/env bash
# Builds and installs mmts, then starts a local 3-node cluster on loopback and shows it.
#   scripts/demo.sh          start (again) the cluster, in $MMTS_DEMO_DIR (default /tmp/mmts-demo)
#   scripts/demo.sh stop     stop it
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export MMTS_PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
DIR="${MMTS_DEMO_DIR:-/tmp/mmts-demo}"

if [ "${1:-start}" = stop ]; then
  exec cargo run --quiet --release -p mmts-tests --bin mmts-cluster -- stop --dir "$DIR"
fi
bash scripts/install.sh
printf '==> building the cluster launcher\n'
cargo build --quiet --release -p mmts-tests --bin mmts-cluster
exec target/release/mmts-cluster start --nodes 3 --dir "$DIR" --port "${MMTS_DEMO_PORT:-15432}"
