#!/usr/bin/env bash
# Throughput of a 3-node mmts cluster in async mode (commit locally, replicate afterwards,
# last writer wins) against one standalone PostgreSQL, in one run (bench/sync.sh compares the
# synchronous mode).
#
# pgbench tpcb-like with the same total client count: CLIENTS against the standalone server,
# and CLIENTS split over the three nodes (writes on all of them at once). Prints TPS of both,
# the ratio, the replication lag (p50/p99: every node inserts a probe row every 100 ms during the
# cluster run; a trigger enabled ALWAYS stamps each row with the clock when it is inserted,
# there and on every node that applies it; lag = applied there - inserted at the origin, all on
# one machine's clock), and the write conflicts resolved.
#
#   bench/cluster.sh                 (needs mmts installed: scripts/install.sh)
#   SCALE=10 CLIENTS=6 SECONDS_=30 bench/cluster.sh
#   NODE_CONF="multimaster.async_batch_delay = 0" bench/cluster.sh   (more settings for the nodes)
set -euo pipefail
cd "$(dirname "$0")/.."
SCALE=${SCALE:-10}
CLIENTS=${CLIENTS:-6}
DURATION=${SECONDS_:-20}
BASE=${PORT:-26432}
BENCH_NAME=cluster
. bench/common.sh

conns=""
for i in 1 2 3; do conns+="${conns:+, }host=127.0.0.1 port=$((BASE + i)) user=postgres dbname=postgres"; done
node_conf() {
  printf "multimaster.node_id = %s\nmultimaster.conn_strings = '%s'\nmultimaster.mode = async\n%s" "$1" "$conns" "${NODE_CONF:-}"
}

echo "==> servers in $DIR: standalone on $BASE, cluster on $((BASE + 1))..$((BASE + 3))"
start_server standalone "$BASE"
for i in 1 2 3; do start_server "node$i" $((BASE + i)) "$(node_conf "$i")"; done

echo "==> pgbench tables (scale $SCALE) on every node, data loaded on node 1 and replicated"
for i in 1 2 3; do
  p=$((BASE + i))
  # Each node's schema is made locally, before the nodes form a cluster.
  PGOPTIONS="-c multimaster.replicate_ddl=off" pgbench -q -i -I dtp -s "$SCALE" -h 127.0.0.1 -p "$p" -U postgres postgres >/dev/null 2>&1
  PGOPTIONS="-c multimaster.replicate_ddl=off" q "$p" "CREATE EXTENSION mmts; ALTER TABLE pgbench_history REPLICA IDENTITY FULL;
    CREATE TABLE lag_probe(id bigint PRIMARY KEY, node int NOT NULL, sent_at timestamptz NOT NULL, applied_at timestamptz);
    CREATE FUNCTION stamp() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN NEW.applied_at := clock_timestamp(); RETURN NEW; END';
    CREATE TRIGGER stamp BEFORE INSERT ON lag_probe FOR EACH ROW EXECUTE FUNCTION stamp();
    ALTER TABLE lag_probe ENABLE ALWAYS TRIGGER stamp"
done
for i in 1 2 3; do
  until [ "$(q $((BASE + i)) "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'")" -ge 2 ]; do sleep 0.2; done
done
pgbench -q -i -I g -s "$SCALE" -h 127.0.0.1 -p $((BASE + 1)) -U postgres postgres >/dev/null 2>&1
for i in 2 3; do
  until [ "$(q $((BASE + i)) "SELECT count(*) FROM pgbench_accounts")" = "$((SCALE * 100000))" ]; do sleep 0.5; done
done
pgbench -q -i -s "$SCALE" -h 127.0.0.1 -p "$BASE" -U postgres postgres >/dev/null 2>&1

tps() { grep -oE 'tps = [0-9.]+' "$1" | head -1 | awk '{print $3}'; }
echo "==> standalone: pgbench tpcb-like, $CLIENTS clients, ${DURATION}s"
pgbench -n -c "$CLIENTS" -j "$CLIENTS" -T "$DURATION" -h 127.0.0.1 -p "$BASE" -U postgres postgres > "$DIR/standalone.out" 2>&1
standalone=$(tps "$DIR/standalone.out")

per_node=$(( (CLIENTS + 2) / 3 ))
echo "==> cluster: pgbench tpcb-like on all 3 nodes at once, $per_node clients each, ${DURATION}s"
# One probing session per node (psql \watch), so that probing costs little CPU.
for i in 1 2 3; do
  { echo "INSERT INTO lag_probe(id, node, sent_at) VALUES ((extract(epoch FROM clock_timestamp()) * 1000000)::bigint * 10 + $i, $i, clock_timestamp())"; echo '\watch 0.1'; } |
    timeout "$DURATION" psql -X -q -At -h 127.0.0.1 -p $((BASE + i)) -U postgres -d postgres >/dev/null 2>&1 &
done
for i in 1 2 3; do
  pgbench -n -c "$per_node" -j "$per_node" -T "$DURATION" -h 127.0.0.1 -p $((BASE + i)) -U postgres postgres > "$DIR/node$i.out" 2>&1 &
done
wait
cluster=0
for i in 1 2 3; do cluster=$(awk -v a="$cluster" -v b="$(tps "$DIR/node$i.out")" 'BEGIN { print a + b }'); done
sleep 2 # the last probes arrive
: > "$DIR/lag.txt"
for i in 1 2 3; do
  q $((BASE + i)) "SELECT extract(epoch FROM applied_at - sent_at) * 1000 FROM lag_probe WHERE node <> $i" >> "$DIR/lag.txt"
done
probes=$(q $((BASE + 1)) "SELECT count(*) FROM lag_probe")
sort -n "$DIR/lag.txt" > "$DIR/lag.sorted"
pct() { awk -v p="$1" '{ v[NR] = $1 } END { if (NR == 0) { print "n/a"; exit } i = int(NR * p / 100); if (i < 1) i = 1; printf "%.1f", v[i] }' "$DIR/lag.sorted"; }
conflicts=0
for i in 1 2 3; do conflicts=$((conflicts + $(q $((BASE + i)) "SELECT count(*) FROM mtm.conflicts"))); done

echo
printf '%-28s %10s\n' "standalone TPS" "$standalone"
printf '%-28s %10s\n' "3-node cluster TPS (sum)" "$cluster"
printf '%-28s %10s\n' "ratio cluster/standalone" "$(awk -v c="$cluster" -v s="$standalone" 'BEGIN { printf "%.2f", c / s }')"
printf '%-28s %10s\n' "probes (rows on node 1)" "$probes"
printf '%-28s %10s\n' "replication lag p50 (ms)" "$(pct 50)"
printf '%-28s %10s\n' "replication lag p99 (ms)" "$(pct 99)"
printf '%-28s %10s\n' "conflicts resolved (LWW)" "$conflicts"
