#!/usr/bin/env bash
# Builds mmts (release) and installs it into PostgreSQL servers:
#   PG_CONFIG=<path>            that server;
#   MMTS_PG_VERSIONS="16 18"    these major versions (installed first if missing, see postgres.sh);
#   neither                     the newest installed server, or PostgreSQL 15 from Debian if none.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/postgres.sh
export PATH="$HOME/.cargo/bin:$PATH"

mapfile -t versions < <(chosen_postgres)
bash scripts/setup.sh "${versions[@]}"
for n in "${versions[@]}"; do
  pg_config=$(pg_config_for "$n")
  step "building and installing mmts for PostgreSQL $n (cold build: about 3 minutes)"
  sudo=()
  [ "$(id -u)" -eq 0 ] || [ -w "$("$pg_config" --pkglibdir)" ] || sudo=(--sudo)
  PGRX_PG_CONFIG_PATH=$pg_config cargo pgrx install --release "${sudo[@]}" --pg-config "$pg_config" \
    --no-default-features --features "pg$n"
  # Servers run as the postgres OS user.
  as_root chmod a+r "$("$pg_config" --pkglibdir)/mmts.so" "$("$pg_config" --sharedir)"/extension/mmts*
done
