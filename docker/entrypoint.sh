#!/bin/sh
# Initialises the data directory on first start, then runs the server in the foreground.
# MMTS_NODE_ID and MMTS_CONN_STRINGS, when set, become multimaster.node_id / conn_strings.
set -e
BIN=/usr/lib/postgresql/$PG_MAJOR/bin
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  "$BIN/initdb" -D "$PGDATA" -U postgres -A trust --auth-host=trust >/dev/null
  echo "include '/etc/mmts/mmts.conf'" >> "$PGDATA/postgresql.conf"
  # Servers that check output plugins against a list (15.19+, 18.6) must list mmts.
  if "$BIN/postgres" --describe-config | grep -q '^output_plugin_libraries'; then
    echo "output_plugin_libraries = 'pgoutput, test_decoding, mmts'" >> "$PGDATA/postgresql.conf"
  fi
  echo "host replication all all trust" >> "$PGDATA/pg_hba.conf"
  echo "host all all all trust" >> "$PGDATA/pg_hba.conf"
fi
if [ -n "$MMTS_NODE_ID" ]; then
  {
    echo "multimaster.node_id = $MMTS_NODE_ID"
    echo "multimaster.conn_strings = '$MMTS_CONN_STRINGS'"
  } > "$PGDATA/mmts-node.conf"
  grep -q "mmts-node.conf" "$PGDATA/postgresql.conf" || echo "include_if_exists 'mmts-node.conf'" >> "$PGDATA/postgresql.conf"
fi
exec "$BIN/postgres" -D "$PGDATA"
