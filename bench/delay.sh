#!/usr/bin/env bash
# One client's synchronous commit when the links between the nodes are slow: a standalone
# server against a synchronous 3-node cluster whose every link goes through the test
# harness's proxy (tests/src/proxy.rs), on loopback and then delayed DELAY_MS each way, in one
# run (tests/src/bin/mmts-link-delay.rs). Prints each one's commit latency (average, p50,
# p99) and what the cluster adds over standalone, in round trips between two nodes. The
# harness's servers run with fsync = off, so WAL flushes cost next to nothing here and the
# figure is the protocol's round trips.
#
#   bench/delay.sh                   (needs mmts installed: scripts/install.sh)
#   DELAY_MS=5 SECONDS_=10 bench/delay.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DELAY_MS=${DELAY_MS:-5}
DURATION=${SECONDS_:-10}
source scripts/postgres.sh
BENCH_PG=$(chosen_postgres | head -n1)
export MMTS_PG_CONFIG
MMTS_PG_CONFIG=$(pg_config_for "$BENCH_PG")
echo "==> PostgreSQL $("$("$MMTS_PG_CONFIG" --bindir)/postgres" --version | awk '{print $3}')"
echo "==> building the harness (cargo build --release -p mmts-tests)"
cargo build -q --release -p mmts-tests --bin mmts-link-delay
exec target/release/mmts-link-delay --delay-ms "$DELAY_MS" --seconds "$DURATION"
