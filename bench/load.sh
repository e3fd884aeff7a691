#!/usr/bin/env bash
# A user's first bulk load: plain `pgbench -i -s SCALE` (drop, create tables, one COPY
# transaction of SCALE * 100,000 accounts, vacuum, primary keys) against one standalone
# PostgreSQL and against node 1 of a synchronous 3-node mmts cluster with default settings,
# in one run. Prints each step's time as pgbench reports it, the ratio of the totals, and
# checks that every node of the cluster has every row.
#
#   bench/load.sh                    (needs mmts installed: scripts/install.sh)
#   SCALE=10 PORT=26472 bench/load.sh
#   NODE_CONF="multimaster.workers = 4" bench/load.sh   (more settings for the nodes)
set -euo pipefail
cd "$(dirname "$0")/.."
SCALE=${SCALE:-10}
BASE=${PORT:-26472}
BENCH_NAME=load
. bench/common.sh

conns=""
for i in 1 2 3; do conns+="${conns:+, }host=127.0.0.1 port=$((BASE + i)) user=postgres dbname=postgres"; done
node_conf() { printf "multimaster.node_id = %s\nmultimaster.conn_strings = '%s'\n%s" "$1" "$conns" "${NODE_CONF:-}"; }

echo "==> servers in $DIR: standalone on $BASE, synchronous cluster on $((BASE + 1))..$((BASE + 3))"
start_server standalone "$BASE"
for i in 1 2 3; do start_server "node$i" $((BASE + i)) "$(node_conf "$i")"; done
for i in 1 2 3; do q $((BASE + i)) "CREATE EXTENSION mmts" >/dev/null; done
for i in 1 2 3; do
  until [ "$(q $((BASE + i)) "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'")" -ge 2 ]; do sleep 0.2; done
done
# Writes need a majority of online nodes.
for i in 1 2 3; do
  until [ "$(q $((BASE + i)) "SELECT state FROM mtm.get_cluster_state()")" = online ]; do sleep 0.2; done
done

load() { # NAME PORT
  local start end
  start=$(date +%s.%N)
  if pgbench -i -s "$SCALE" -h 127.0.0.1 -p "$2" -U postgres postgres > "$DIR/load-$1.out" 2>&1; then
    end=$(date +%s.%N)
    awk -v a="$start" -v b="$end" 'BEGIN { printf "%.2f", b - a }'
  else
    echo failed
  fi
}
echo "==> pgbench -i -s $SCALE on the standalone server"
sa=$(load standalone "$BASE")
echo "==> pgbench -i -s $SCALE on node 1 of the synchronous cluster (default settings)"
cl=$(load cluster $((BASE + 1)))

echo
printf '%-28s %10s\n' "standalone (s)" "$sa"
grep -E '^done in' "$DIR/load-standalone.out" | sed 's/^/    /'
printf '%-28s %10s\n' "synchronous cluster (s)" "$cl"
grep -E '^done in' "$DIR/load-cluster.out" | sed 's/^/    /' || true
if [ "$cl" = failed ]; then
  echo "pgbench -i on the cluster failed:"
  tail -5 "$DIR/load-cluster.out"
  exit 1
fi
printf '%-28s %10s\n' "cluster / standalone" "$(awk -v a="$cl" -v b="$sa" 'BEGIN { printf "%.2f", a / b }')"
echo "node 1's slots (decoding of the load for nodes 2 and 3):"
q $((BASE + 1)) "SELECT slot_name, 'spilled ' || spill_txns || ' txns, ' || pg_size_pretty(spill_bytes) || '; streamed ' || stream_txns || ' txns, ' || pg_size_pretty(stream_bytes)
  FROM pg_stat_replication_slots ORDER BY 1" | sed 's/^/    /'
echo "the peers' apply of the load once it was prepared on node 1 (their logs):"
for i in 2 3; do
  grep -h "received while it ran" "$DIR/node$i/server.log" | sed -E "s/.*mmts: /    node $i: /" | awk -v rows=$((SCALE * 100000)) '
    { print } match($0, /in [0-9]+ ms/) { ms = substr($0, RSTART + 3, RLENGTH - 6); if (ms > 0) printf "      (%d rows/s)\n", rows * 1000 / ms }'
done
rows=$((SCALE * 100000))
for i in 1 2 3; do
  n=$(q $((BASE + i)) "SELECT count(*) FROM pgbench_accounts")
  k=$(q $((BASE + i)) "SELECT count(*) FROM pg_index WHERE indrelid = 'pgbench_accounts'::regclass AND indisprimary")
  printf '%-28s %10s rows, primary key: %s\n' "node $i pgbench_accounts" "$n" "$k"
  [ "$n" = "$rows" ] && [ "$k" = 1 ] || { echo "node $i does not have the whole load" >&2; exit 1; }
done
