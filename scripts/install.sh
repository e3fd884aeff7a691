#!/usr/bin/env bash
# Builds mmts (release) and installs it into the system PostgreSQL 15.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config

bash scripts/setup.sh
printf '==> building and installing the mmts extension (cold build: about 3 minutes)\n'
if [ "$(id -u)" -eq 0 ]; then
  cargo pgrx install --release --pg-config "$PG_CONFIG"
else
  cargo pgrx install --release --sudo --pg-config "$PG_CONFIG"
fi
