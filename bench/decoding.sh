#!/usr/bin/env bash
# Decoding throughput of the mmts output plugin against pgoutput, on one server, same WAL.
#
# One workload (pgbench tpcb-like transactions, plus bulk inserts) is decoded through three
# slots: `pgoutput`, `mmts` speaking the pgoutput protocol, and `mmts` speaking its own
# protocol. Each slot is peeked ROUNDS times (alternating, so caching favours none); the
# best time of each is reported with throughput and the ratio to pgoutput (>= 1.0: mmts is
# at least as fast).
#
#   bench/decoding.sh            (needs mmts installed: scripts/install.sh)
#   SCALE=10 TXNS=20000 ROUNDS=5 bench/decoding.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SCALE=${SCALE:-5}
TXNS=${TXNS:-20000}
ROUNDS=${ROUNDS:-5}
PORT=${PORT:-25499}
BENCH_NAME=decoding
. bench/common.sh

echo "==> server in $DIR (port $PORT)"
start_server data "$PORT" "logical_decoding_work_mem = 256MB"
PSQL=(psql -X -q -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -v ON_ERROR_STOP=1)

"${PSQL[@]}" -c "SELECT 1" >/dev/null
echo "==> pgbench -i -s $SCALE, then slots, then $TXNS tpcb-like transactions and bulk inserts"
pgbench -q -i -s "$SCALE" -h 127.0.0.1 -p "$PORT" -U postgres postgres >/dev/null 2>&1
"${PSQL[@]}" <<SQL
CREATE TABLE bulk(id bigint PRIMARY KEY, t timestamptz, payload text);
CREATE PUBLICATION bench FOR ALL TABLES;
SELECT 'slot' FROM pg_create_logical_replication_slot('s_pgoutput', 'pgoutput');
SELECT 'slot' FROM pg_create_logical_replication_slot('s_mmts_pgoutput', 'mmts');
SELECT 'slot' FROM pg_create_logical_replication_slot('s_mmts_native', 'mmts');
SQL
pgbench -n -c 2 -j 2 -t $((TXNS / 2)) -h 127.0.0.1 -p "$PORT" -U postgres postgres >/dev/null
"${PSQL[@]}" -c "INSERT INTO bulk SELECT g, now(), md5(g::text) FROM generate_series(1, 200000) g"
wal=$("${PSQL[@]}" -At -c "SELECT pg_size_pretty(pg_current_wal_lsn() - confirmed_flush_lsn) FROM pg_replication_slots WHERE slot_name = 's_pgoutput'")
echo "    WAL to decode: $wal"

PGO_OPTS="'proto_version', '1', 'publication_names', 'bench'"
declare -A SQL_OF=(
  [pgoutput]="SELECT count(*), sum(length(data)) FROM pg_logical_slot_peek_binary_changes('s_pgoutput', NULL, NULL, $PGO_OPTS)"
  [mmts-pgoutput]="SELECT count(*), sum(length(data)) FROM pg_logical_slot_peek_binary_changes('s_mmts_pgoutput', NULL, NULL, $PGO_OPTS)"
  [mmts-native]="SELECT count(*), sum(length(data)) FROM pg_logical_slot_peek_binary_changes('s_mmts_native', NULL, NULL, 'mmts_protocol', '1')"
)
declare -A BEST MSGS BYTES
for ((r = 1; r <= ROUNDS; r++)); do
  echo "==> round $r/$ROUNDS"
  for k in pgoutput mmts-pgoutput mmts-native; do
    start=$(date +%s%N)
    out=$("${PSQL[@]}" -At -F ' ' -c "${SQL_OF[$k]}")
    ms=$(( ($(date +%s%N) - start) / 1000000 ))
    MSGS[$k]=${out% *}; BYTES[$k]=${out#* }
    if [ -z "${BEST[$k]:-}" ] || [ "$ms" -lt "${BEST[$k]}" ]; then BEST[$k]=$ms; fi
    printf '    %-14s %6d ms\n' "$k" "$ms"
  done
done

echo
printf '%-14s %10s %10s %12s %14s %8s\n' plugin messages MB "best ms" "messages/s" ratio
for k in pgoutput mmts-pgoutput mmts-native; do
  ms=${BEST[$k]}; [ "$ms" -gt 0 ] || ms=1
  awk -v k="$k" -v m="${MSGS[$k]}" -v b="${BYTES[$k]}" -v ms="$ms" -v base="${BEST[pgoutput]}" \
    'BEGIN { printf "%-14s %10d %10.1f %12d %14.0f %8.2f\n", k, m, b / 1048576, ms, m / (ms / 1000), base / ms }'
done
echo "(ratio = pgoutput time / plugin time, same WAL; mmts-native decodes all tables, text values)"
