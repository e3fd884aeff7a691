#!/usr/bin/env bash
# What this machine allows a synchronous 3-node cluster at most, measured without mmts: the
# work every node of such a cluster must do for each transaction, done by plain PostgreSQL
# servers with no replication and no coordination at all.
#
# In a synchronous cluster every write transaction is prepared (PREPARE TRANSACTION) and
# committed (COMMIT PREPARED) on each of the three nodes: two WAL flushes per node, which
# PostgreSQL forces for both, whatever synchronous_commit says. Here three independent servers
# on the same cores each run the tpcb-like transaction that way (one round trip for the whole
# transaction and its PREPARE, one for COMMIT PREPARED), PER_SERVER clients each (CLIENTS/3),
# all at once.
# Each of them commits its own transactions, so the cluster equivalent is their summed TPS / 3
# (every node of a cluster does every transaction): a ceiling for any synchronous 3-node design
# on this machine, which also has to decode, send and apply the changes and carry the votes.
# The same with a plain COMMIT instead of PREPARE + COMMIT PREPARED gives the ceiling without
# two-phase commit. Both against one standalone server running the standard tpcb-like with
# CLIENTS clients (as bench/sync.sh does). Also one client's latency: the same single-row
# UPDATE committed with COMMIT, and with PREPARE TRANSACTION + COMMIT PREPARED.
#
#   bench/ceiling.sh
#   SCALE=10 CLIENTS=6 SECONDS_=20 ROUNDS=2 PORT=26472 bench/ceiling.sh
#   PER_SERVER=4 bench/ceiling.sh     (clients on each of the three servers; default CLIENTS/3)
set -euo pipefail
cd "$(dirname "$0")/.."
SCALE=${SCALE:-10}
CLIENTS=${CLIENTS:-6}
DURATION=${SECONDS_:-20}
ROUNDS=${ROUNDS:-2}
PER_SERVER=${PER_SERVER:-$(((CLIENTS + 2) / 3))}
BASE=${PORT:-26472}
BENCH_NAME=ceiling
. bench/common.sh

echo "==> servers in $DIR: standalone on $BASE, three independent servers on $((BASE + 1))..$((BASE + 3)) (plain PostgreSQL: mmts not loaded)"
for i in 0 1 2 3; do
  start_server "s$i" $((BASE + i)) "shared_preload_libraries = ''"
done
echo "==> pgbench tables (scale $SCALE) on each"
for i in 0 1 2 3; do
  pgbench -q -i -s "$SCALE" -h 127.0.0.1 -p $((BASE + i)) -U postgres postgres >/dev/null 2>&1
done

# The tpcb-like transaction in one round trip, ended by END_ (COMMIT, or PREPARE TRANSACTION
# followed by COMMIT PREPARED in a second one).
script() { # FILE END_
  cat > "$1" <<SQL
\\set aid random(1, 100000 * :scale)
\\set bid random(1, 1 * :scale)
\\set tid random(1, 10 * :scale)
\\set delta random(-5000, 5000)
BEGIN \\; UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid \\; SELECT abalance FROM pgbench_accounts WHERE aid = :aid \\; UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = :tid \\; UPDATE pgbench_branches SET bbalance = bbalance + :delta WHERE bid = :bid \\; INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (:tid, :bid, :aid, :delta, CURRENT_TIMESTAMP) \\; $2
SQL
}
script "$DIR/commit.sql" "COMMIT;"
script "$DIR/twophase.sql" "PREPARE TRANSACTION 'tx_:client_id';
COMMIT PREPARED 'tx_:client_id';"
cat > "$DIR/update-commit.sql" <<SQL
\\set aid random(1, $((SCALE * 100000)))
BEGIN \\; UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = :aid \\; COMMIT;
SQL
cat > "$DIR/update-twophase.sql" <<SQL
\\set aid random(1, $((SCALE * 100000)))
BEGIN \\; UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = :aid \\; PREPARE TRANSACTION 'u';
COMMIT PREPARED 'u';
SQL
chmod a+r "$DIR"/*.sql

pgb() { pgbench -n -h 127.0.0.1 -U postgres "$@" postgres 2>&1; }
tps() { grep -oE '^tps = [0-9.]+' | awk '{ print $3 }'; }
# three SCRIPT: TPS summed over the three servers running SCRIPT at once, divided by 3.
three() {
  local i
  for i in 1 2 3; do pgb -f "$1" -c "$PER_SERVER" -j "$PER_SERVER" -T "$DURATION" -p $((BASE + i)) > "$DIR/three.$i.out" & done
  wait
  cat "$DIR"/three.*.out | tps | awk '{ s += $1 } END { printf "%.1f", s / 3 }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }'; }

rows=()
for r in $(seq "$ROUNDS"); do
  echo "==> round $r of $ROUNDS: standalone tpcb-like, $CLIENTS clients, ${DURATION}s"
  sa=$(pgb -c "$CLIENTS" -j "$CLIENTS" -T "$DURATION" -p "$BASE" | tps)
  echo "==> round $r: three servers at once, each transaction with PREPARE + COMMIT PREPARED, $PER_SERVER clients each, ${DURATION}s"
  tp=$(three "$DIR/twophase.sql")
  echo "==> round $r: three servers at once, each transaction with COMMIT, $PER_SERVER clients each, ${DURATION}s"
  pl=$(three "$DIR/commit.sql")
  rows+=("$(printf '%-6s %12.1f %18s %8s %18s %8s' "$r" "$sa" "$tp" "$(ratio "$tp" "$sa")" "$pl" "$(ratio "$pl" "$sa")")")
done

echo "==> one client, single-row UPDATE, ${DURATION}s each: COMMIT, then PREPARE + COMMIT PREPARED"
lat() { grep -oE '^latency average = [0-9.]+' | awk '{ print $4 }'; }
l1=$(pgb -f "$DIR/update-commit.sql" -c 1 -T "$DURATION" -p "$BASE" | lat)
l2=$(pgb -f "$DIR/update-twophase.sql" -c 1 -T "$DURATION" -p "$BASE" | lat)

echo
echo "Ceiling of a synchronous 3-node cluster on this machine (TPS per cluster transaction = sum / 3):"
printf '%-6s %12s %18s %8s %18s %8s\n' round standalone "3 x 2PC (sum/3)" "/standal" "3 x COMMIT (sum/3)" "/standal"
for row in "${rows[@]}"; do echo "$row"; done
echo
printf '%-52s %8s\n' "one client, UPDATE + COMMIT, latency avg (ms)" "$l1"
printf '%-52s %8s\n' "one client, UPDATE + PREPARE + COMMIT PREPARED (ms)" "$l2"
