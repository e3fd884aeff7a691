#!/usr/bin/env bash
# Installs what building and testing mmts needs: PostgreSQL 15 with its server headers,
# clang (for bindgen), cargo-pgrx 0.18.0, and pgrx's configuration for the system server.
# Idempotent: steps already done are skipped.
set -euo pipefail

PG_MAJOR=15
PGRX_VERSION=0.18.0
export PATH="$HOME/.cargo/bin:$PATH"

step() { printf '==> %s\n' "$*"; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# Debian packages (libfaketime: the tests skew one server's clock). The server and its headers must be the same minor version (PostgreSQL
# 15.19+ has output_plugin_libraries, which mmts needs), so both are installed together.
packages=(postgresql-$PG_MAJOR postgresql-server-dev-$PG_MAJOR libclang-dev clang pkg-config libssl-dev build-essential libfaketime)
installed_version() { dpkg-query -W -f='${Status} ${Version}' "$1" 2>/dev/null | awk '$3 == "installed" {print $4}'; }
missing=()
for p in "${packages[@]}"; do
  [ -n "$(installed_version "$p")" ] || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ] || [ "$(installed_version postgresql-$PG_MAJOR)" != "$(installed_version postgresql-server-dev-$PG_MAJOR)" ]; then
  step "installing Debian packages: ${packages[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >/dev/null
fi
PG_CONFIG=/usr/lib/postgresql/$PG_MAJOR/bin/pg_config
step "PostgreSQL $("$PG_CONFIG" --version | awk '{print $2}') at $("$PG_CONFIG" --bindir)"

if ! command -v cargo >/dev/null; then
  echo "error: cargo not found. mmts needs a Rust toolchain (1.85 or newer) on PATH." >&2
  exit 1
fi

if [ "$(cargo pgrx --version 2>/dev/null | awk '{print $2}')" != "$PGRX_VERSION" ]; then
  step "installing cargo-pgrx $PGRX_VERSION (takes about 7 minutes on 2 cores)"
  cargo install cargo-pgrx --version "$PGRX_VERSION" --locked --quiet
fi

PGRX_CONFIG="${PGRX_HOME:-$HOME/.pgrx}/config.toml"
if ! grep -qs "^pg$PG_MAJOR = \"$PG_CONFIG\"" "$PGRX_CONFIG"; then
  step "configuring pgrx for the system PostgreSQL $PG_MAJOR"
  cargo pgrx init --pg$PG_MAJOR "$PG_CONFIG" >/dev/null
fi
