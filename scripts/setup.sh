#!/usr/bin/env bash
# Installs what building and testing mmts needs, for the PostgreSQL major versions given as
# arguments (default 15): each server with its headers (see postgres.sh), clang (for bindgen),
# cargo-pgrx 0.18.0, and pgrx's configuration for each server. `PG_CONFIG=<path>` uses that
# server instead (one version). Idempotent: steps already done are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/postgres.sh

PGRX_VERSION=0.18.0
export PATH="$HOME/.cargo/bin:$PATH"
versions=("${@:-15}")

# Debian packages (libfaketime: the tests skew one server's clock).
packages=(libclang-dev clang pkg-config libssl-dev build-essential libfaketime python3)
installed_version() { dpkg-query -W -f='${Status} ${Version}' "$1" 2>/dev/null | awk '$3 == "installed" {print $4}'; }
missing=()
for p in "${packages[@]}"; do
  [ -n "$(installed_version "$p")" ] || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  step "installing Debian packages: ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
  echo "error: cargo not found. mmts needs a Rust toolchain (1.85 or newer) on PATH." >&2
  exit 1
fi
if [ "$(cargo pgrx --version 2>/dev/null | awk '{print $2}')" != "$PGRX_VERSION" ]; then
  step "installing cargo-pgrx $PGRX_VERSION (takes about 7 minutes on 2 cores)"
  cargo install cargo-pgrx --version "$PGRX_VERSION" --locked --quiet
fi

PGRX_CONFIG="${PGRX_HOME:-$HOME/.pgrx}/config.toml"
for n in "${versions[@]}"; do
  if [ -z "${PG_CONFIG:-}" ]; then
    if [ -z "$(pg_config_of "$n")" ] && ! apt-cache show "postgresql-server-dev-$n" >/dev/null 2>&1; then
      as_root apt-get update -qq
    fi
    ensure_postgres "$n"
  fi
  pg_config=$(pg_config_for "$n")
  step "PostgreSQL $("$pg_config" --version | awk '{print $2}') at $("$pg_config" --bindir)"
  if ! grep -qs "^pg$n = \"$pg_config\"" "$PGRX_CONFIG"; then
    step "configuring pgrx for PostgreSQL $n"
    cargo pgrx init "--pg$n" "$pg_config" >/dev/null
  fi
done
