# Shared by the benchmark scripts: throw-away servers with mmts preloaded, in a temp dir that
# is removed (and its servers stopped) on exit. Source it after setting BENCH_NAME.
# The servers (and psql, pgbench) are the newest PostgreSQL installed, or MMTS_PG_VERSIONS=<major>,
# or PG_CONFIG=<path> (scripts/postgres.sh), with mmts installed (scripts/install.sh).
source scripts/postgres.sh
BENCH_PG=$(chosen_postgres | head -n1)
BIN=$("$(pg_config_for "$BENCH_PG")" --bindir)
export PATH="$BIN:$PATH"
echo "==> PostgreSQL $("$BIN/postgres" --version | awk '{print $3}') ($BIN)"
PLUGIN_LIST=""
if "$BIN/postgres" --describe-config | grep '^output_plugin_libraries' >/dev/null; then
  PLUGIN_LIST="output_plugin_libraries = 'pgoutput, test_decoding, mmts'"
fi
as_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
DIR=$(mktemp -d "/tmp/mmts-bench-$BENCH_NAME.XXXXXX")
[ "$(id -u)" -eq 0 ] && chown postgres: "$DIR"
stop_servers() {
  for d in "$DIR"/*/; do as_pg "$BIN/pg_ctl" -D "$d" -m immediate stop >/dev/null 2>&1 || true; done
  rm -rf "$DIR"
}
trap stop_servers EXIT

# start_server NAME PORT [EXTRA_CONF]: initdb, mmts settings, start.
start_server() {
  local d="$DIR/$1"
  as_pg "$BIN/initdb" -D "$d" -A trust -U postgres --no-sync >/dev/null
  cat >> "$d/postgresql.conf" <<CONF
port = $2
listen_addresses = '127.0.0.1'
unix_socket_directories = '$DIR'
shared_preload_libraries = 'mmts'
$PLUGIN_LIST
wal_level = logical
track_commit_timestamp = on
max_prepared_transactions = 50
max_wal_senders = 10
max_replication_slots = 10
max_worker_processes = 16
shared_buffers = 256MB
max_wal_size = 4GB
${3:-}
CONF
  as_pg "$BIN/pg_ctl" -D "$d" -l "$d/server.log" -w start >/dev/null
}

# q PORT SQL: one value.
q() { psql -X -q -At -h 127.0.0.1 -p "$1" -U postgres -d postgres -v ON_ERROR_STOP=1 -c "$2"; }

# cpu_snapshot FILE: "pid ticks role switches" for every process on the machine now (CPU ticks,
# user + system; context switches, voluntary + not), with its role from its command line.
cpu_snapshot() {
  ps -eo pid=,args= | awk '
    { pid = $1; role = "other"
      if ($0 ~ /mmts receiver/) role = "receivers"
      else if ($0 ~ /walsender/) role = "walsenders"
      else if ($0 ~ /pgbench/) role = "pgbench"
      else if ($0 ~ /postgres: postgres postgres/) role = "backends"
      else if ($0 ~ /postgres/) role = "other-postgres"
      roles[pid] = role }
    END {
      for (p in roles) {
        f = "/proc/" p "/stat"
        if ((getline line < f) > 0) {
          sub(/.*\) /, "", line); split(line, a, " ")
          s = "/proc/" p "/status"; switches = 0
          while ((getline st < s) > 0) if (st ~ /ctxt_switches:/) { split(st, b, " "); switches += b[2] }
          close(s)
          print p, a[12] + a[13], roles[p], switches
        }
        close(f)
      } }' > "$1"
}

# per_txn BEFORE AFTER TXNS WHAT: per transaction between two snapshots, by role ("backends"
# counts client backends and mmts's signal connections alike): WHAT is cpu (milliseconds of
# CPU) or switches (context switches).
per_txn() {
  awk -v txns="$3" -v hz="$(getconf CLK_TCK)" -v what="$4" '
    BEGIN { col = (what == "cpu") ? 2 : 4; scale = (what == "cpu") ? 1000 / hz : 1 }
    NR == FNR { before[$1] = $col; next }
    { d = $col - (($1 in before) ? before[$1] : 0); by[$3] += d; all += d }
    END {
      if (txns <= 0) { print "n/a"; exit }
      fmt = (what == "cpu") ? "%.2f" : "%.1f"
      out = sprintf("total " fmt ":", all * scale / txns)
      n = split("backends receivers walsenders pgbench other-postgres other", order, " ")
      for (i = 1; i <= n; i++) {
        v = by[order[i]] * scale / txns
        if (v >= ((what == "cpu") ? 0.005 : 0.05)) out = out sprintf(" %s " fmt, order[i], v)
      }
      print out
    }' "$1" "$2"
}
