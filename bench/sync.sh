#!/usr/bin/env bash
# Cost of synchronous commit: a standalone PostgreSQL against two 3-node mmts clusters, one
# with multimaster.mode = sync (two-phase commit on every live node before COMMIT returns)
# and one with multimaster.mode = async (commit locally, replicate afterwards), in one run.
#
# 1. Throughput: pgbench tpcb-like with the same total client count, for the simple and the
#    extended protocol: CLIENTS against the standalone server, and CLIENTS split over the three
#    nodes of each cluster (writes on all of them at once). Serialization failures (SQLSTATE
#    40001: in sync mode, concurrent updates of one row on two nodes) are retried by pgbench
#    (--max-tries); prints TPS, the ratio to standalone, failed transactions, retries and
#    aborted clients.
#    Also the CPU and the context switches each committed transaction cost, by kind of process
#    (client backends, receivers, walsenders, pgbench), from /proc over the middle of each run.
# 2. Commit latency: one client, one autocommit single-row UPDATE of a random account, against
#    the standalone server and node 1 of the sync cluster; prints both averages and the
#    difference (what two-phase commit across the cluster adds to a commit).
#
#   bench/sync.sh                    (needs mmts installed: scripts/install.sh)
#   SCALE=10 CLIENTS=6 SECONDS_=20 LAT_SECONDS=10 MAX_TRIES=10 PORT=26452 bench/sync.sh
#   LOGS=/tmp/sync-logs bench/sync.sh    (keeps the servers' logs)
#
# Ports: standalone on PORT, sync cluster on PORT+1..PORT+3, async cluster on PORT+4..PORT+6.
set -euo pipefail
cd "$(dirname "$0")/.."
SCALE=${SCALE:-10}
CLIENTS=${CLIENTS:-6}
DURATION=${SECONDS_:-20}
LAT_DURATION=${LAT_SECONDS:-10}
MAX_TRIES=${MAX_TRIES:-10}
BASE=${PORT:-26452}
BENCH_NAME=sync
. bench/common.sh
# LOGS=DIR: keep every server's log there (DIR/<server>.log) when the run ends.
if [ -n "${LOGS:-}" ]; then
  mkdir -p "$LOGS"
  trap 'for d in "$DIR"/*/; do [ -f "$d/server.log" ] && cp "$d/server.log" "$LOGS/$(basename "$d").log"; done; stop_servers' EXIT
fi

# Cluster CLUSTER (sync|async) has nodes 1..3 on ports port CLUSTER 1..3.
first_port() { if [ "$1" = sync ]; then echo $((BASE + 1)); else echo $((BASE + 4)); fi; }
port() { echo $(($(first_port "$1") + $2 - 1)); }
node_conf() { # CLUSTER NODE_ID
  local conns="" i
  for i in 1 2 3; do conns+="${conns:+, }host=127.0.0.1 port=$(port "$1" "$i") user=postgres dbname=postgres"; done
  printf "multimaster.node_id = %s\nmultimaster.conn_strings = '%s'\nmultimaster.mode = %s" "$2" "$conns" "$1"
}
pgb() { pgbench -h 127.0.0.1 -U postgres "$@" postgres; }

echo "==> servers in $DIR: standalone on $BASE, sync cluster on $(port sync 1)..$(port sync 3)," \
  "async cluster on $(port async 1)..$(port async 3)"
start_server standalone "$BASE"
for c in sync async; do
  for i in 1 2 3; do start_server "$c$i" "$(port "$c" "$i")" "$(node_conf "$c" "$i")"; done
done
for c in sync async; do
  for i in 1 2 3; do
    mode=$(q "$(port "$c" "$i")" "SHOW multimaster.mode")
    [ "$mode" = "$c" ] || { echo "node $c$i runs multimaster.mode = $mode" >&2; exit 1; }
  done
done

echo "==> pgbench tables (scale $SCALE) on every node, data loaded on node 1 of each cluster and replicated"
for c in sync async; do
  for i in 1 2 3; do
    p=$(port "$c" "$i")
    # Each node's schema is made locally, before the nodes form a cluster.
    PGOPTIONS="-c multimaster.replicate_ddl=off" pgb -q -i -I dtp -s "$SCALE" -p "$p" >/dev/null 2>&1
    PGOPTIONS="-c multimaster.replicate_ddl=off" q "$p" "CREATE EXTENSION mmts; ALTER TABLE pgbench_history REPLICA IDENTITY FULL"
  done
done
# Writes need the mesh (in sync mode, a majority of connected nodes): wait until every node
# streams to both of its peers.
for c in sync async; do
  for i in 1 2 3; do
    until [ "$(q "$(port "$c" "$i")" "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'")" -ge 2 ]; do sleep 0.2; done
  done
done
# mmts aborts a two-phase commit whose votes take longer than multimaster.twopc_min_timeout
# (default 5 s, counted from the PREPARE), and the peers need far longer than that to decode and
# apply the one 1M-row COPY transaction of `pgbench -i` (about 40 s at scale 10 on 2 cores).
# Raise it on the sync cluster for the load only; the benchmark runs with the default.
set_twopc_timeout() { # VALUE|DEFAULT
  local i
  for i in 1 2 3; do
    q "$(port sync "$i")" "ALTER SYSTEM SET multimaster.twopc_min_timeout = $1" >/dev/null
    q "$(port sync "$i")" "SELECT pg_reload_conf()" >/dev/null
  done
}
set_twopc_timeout "'30min'"
pids=()
for c in sync async; do pgb -q -i -I g -s "$SCALE" -p "$(port "$c" 1)" > "$DIR/load-$c.log" 2>&1 & pids+=($!); done
pgb -q -i -s "$SCALE" -p "$BASE" > "$DIR/load-standalone.log" 2>&1 & pids+=($!)
for pid in "${pids[@]}"; do wait "$pid" || { cat "$DIR"/load-*.log >&2; exit 1; }; done
for c in sync async; do
  for i in 2 3; do
    until [ "$(q "$(port "$c" "$i")" "SELECT count(*) FROM pgbench_accounts")" = "$((SCALE * 100000))" ]; do sleep 0.5; done
  done
done
set_twopc_timeout DEFAULT

# wait_quiet CLUSTER: until no node of the cluster is behind a peer (an async cluster may still
# be applying what the last run wrote; that would steal CPU from the next one). At most 120 s.
wait_quiet() {
  local i n=0
  while [ $n -lt 600 ]; do
    local behind=0
    for i in 1 2 3; do
      behind=$((behind + $(q "$(port "$1" "$i")" "SELECT coalesce(max(lag_bytes), 0) FROM mtm.get_nodes_state() WHERE NOT is_self")))
    done
    [ "$behind" -eq 0 ] && return 0
    sleep 0.2
    n=$((n + 1))
  done
  echo "    (cluster $1 still $behind bytes behind after 120 s)"
}

# Numbers from pgbench outputs (summed over the files given).
sum_field() { # REGEX FIELD FILE...: sum of field FIELD of the first line matching REGEX in each file
  local re=$1 f=$2
  shift 2
  awk -v re="$re" -v f="$f" 'FNR == 1 { seen = 0 } !seen && $0 ~ re { s += $f; seen = 1 } END { printf "%s", s + 0 }' "$@"
}
tps() { sum_field '^tps = ' 3 "$@"; }
failed() { sum_field '^number of failed transactions:' 5 "$@"; }
retried() { sum_field '^number of transactions retried:' 5 "$@"; }
retries() { sum_field '^total number of retries:' 5 "$@"; }
aborted() { cat "$@" | grep -c 'aborted in command' || true; }

# run NAME PROTOCOL CLIENTS PORT...: pgbench tpcb-like on every PORT at once, CLIENTS each;
# outputs in $DIR/NAME.<port>.out, and CPU snapshots of the machine 2 s after the start and
# 2 s before the end ($DIR/NAME.cpu0, .cpu1). A run with aborted clients exits non-zero: keep
# going.
run() {
  local name=$1 proto=$2 clients=$3 p
  shift 3
  for p in "$@"; do
    pgb -n -M "$proto" --max-tries="$MAX_TRIES" --failures-detailed -c "$clients" -j "$clients" -T "$DURATION" \
      -p "$p" > "$DIR/$name.$p.out" 2>&1 &
  done
  if [ "$DURATION" -gt 6 ]; then
    sleep 2
    cpu_snapshot "$DIR/$name.cpu0"
    sleep $((DURATION - 4))
    cpu_snapshot "$DIR/$name.cpu1"
  fi
  wait || true
}

per_node=$(( (CLIENTS + 2) / 3 ))
results=()
cpu=()
switches=()
for proto in simple extended; do
  echo "==> $proto protocol: standalone, $CLIENTS clients, ${DURATION}s"
  run "standalone-$proto" "$proto" "$CLIENTS" "$BASE"
  for c in sync async; do
    echo "==> $proto protocol: $c cluster, $per_node clients on each of the 3 nodes at once, ${DURATION}s"
    run "$c-$proto" "$proto" "$per_node" "$(port "$c" 1)" "$(port "$c" 2)" "$(port "$c" 3)"
    wait_quiet "$c"
  done
  sa=$(tps "$DIR/standalone-$proto".*.out)
  for t in standalone sync async; do
    files=("$DIR/$t-$proto".*.out)
    t_tps=$(tps "${files[@]}")
    if [ -f "$DIR/$t-$proto.cpu1" ]; then
      txns=$(awk -v t="$t_tps" -v d="$DURATION" 'BEGIN { print t * (d - 4) }')
      cpu+=("$(printf '%-9s %-11s %s' "$proto" "$t" "$(per_txn "$DIR/$t-$proto.cpu0" "$DIR/$t-$proto.cpu1" "$txns" cpu)")")
      switches+=("$(printf '%-9s %-11s %s' "$proto" "$t" \
        "$(per_txn "$DIR/$t-$proto.cpu0" "$DIR/$t-$proto.cpu1" "$txns" switches)")")
    fi
    results+=("$(printf '%-9s %-11s %10.1f %8.2f %8s %8s %8s %8s' "$proto" "$t" "$t_tps" \
      "$(awk -v a="$t_tps" -v b="$sa" 'BEGIN { print (b > 0 ? a / b : 0) }')" \
      "$(failed "${files[@]}")" "$(retried "${files[@]}")" "$(retries "${files[@]}")" "$(aborted "${files[@]}")")")
  done
done

echo "==> commit latency: 1 client, autocommit single-row UPDATE, ${LAT_DURATION}s each on standalone and sync node 1"
cat > "$DIR/update.sql" <<SQL
\set aid random(1, $((SCALE * 100000)))
UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = :aid;
SQL
chmod a+r "$DIR/update.sql"
latency() { # NAME PORT
  pgb -n -f "$DIR/update.sql" --max-tries="$MAX_TRIES" -c 1 -j 1 -T "$LAT_DURATION" -P "$LAT_DURATION" -p "$2" \
    > "$DIR/lat-$1.out" 2>&1 || true
}
latency standalone "$BASE"
latency sync "$(port sync 1)"
lat() { grep -oE "^latency $1 = [0-9.]+" "$DIR/lat-$2.out" | awk '{print $4}'; }

echo
printf '%-9s %-11s %10s %8s %8s %8s %8s %8s\n' protocol target TPS "/standal" failed retried retries aborted
for r in "${results[@]}"; do echo "$r"; done
echo "(TPS of a cluster: sum over its 3 nodes; failed: transactions that failed after $MAX_TRIES tries;"
echo " retried: transactions that needed a retry (serialization failure); aborted: pgbench clients"
echo " stopped by an error that is not retried)"
if [ ${#cpu[@]} -gt 0 ]; then
  echo
  echo "CPU per committed transaction (ms; every process on the machine, the middle $((DURATION - 4)) s of each run):"
  for r in "${cpu[@]}"; do echo "$r"; done
  echo
  echo "Context switches per committed transaction (every process on the machine, the same interval):"
  for r in "${switches[@]}"; do echo "$r"; done
fi
echo
sa_lat=$(lat average standalone)
sy_lat=$(lat average sync)
printf '%-36s %10s\n' "standalone commit latency avg (ms)" "${sa_lat:-n/a}"
printf '%-36s %10s\n' "sync node 1 commit latency avg (ms)" "${sy_lat:-n/a}"
printf '%-36s %10s\n' "standalone latency stddev (ms)" "$(lat stddev standalone)"
printf '%-36s %10s\n' "sync node 1 latency stddev (ms)" "$(lat stddev sync)"
printf '%-36s %10s\n' "added by sync commit (ms)" \
  "$(awk -v a="${sy_lat:-0}" -v b="${sa_lat:-0}" 'BEGIN { printf "%.3f", a - b }')"
printf '%-36s %10s\n' "failed (standalone / sync)" "$(failed "$DIR/lat-standalone.out") / $(failed "$DIR/lat-sync.out")"

# What went wrong, so that a failure is not just a number: pgbench's aborted clients, and the
# servers' errors and warnings (numbers replaced by N), by server group.
aborts=$(cat "$DIR"/*.out | grep -E 'aborted in command' | sed -E 's/[0-9]+/N/g' | sort | uniq -c | sort -rn | head -5 || true)
if [ -n "$aborts" ]; then
  echo
  echo "pgbench clients aborted (count, message):"
  echo "$aborts"
fi
for g in standalone sync async; do
  errs=$(cat "$DIR/$g"*/server.log | grep -E '^[0-9-]+ [0-9:.]+ [A-Z]+ \[[0-9]+\] (ERROR|WARNING|FATAL|PANIC):' |
    sed -E 's/^[^]]*\] //; s/[0-9]+/N/g' | sort | uniq -c | sort -rn | head -8 || true)
  if [ -n "$errs" ]; then
    echo
    echo "$g server logs, errors and warnings (count, message):"
    echo "$errs"
  fi
done
