# Shared by the benchmark scripts: throw-away servers with mmts preloaded, in a temp dir that
# is removed (and its servers stopped) on exit. Source it after setting BENCH_NAME.
BIN=/usr/lib/postgresql/15/bin
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
output_plugin_libraries = 'pgoutput, test_decoding, mmts'
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
