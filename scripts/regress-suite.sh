#!/usr/bin/env bash
# Prepares PostgreSQL's own regression suite for tests/tests/regress.rs, for the server of
# $MMTS_PG_CONFIG (default: Debian's 15): takes src/test/regress from Debian's source package
# postgresql-N (for 15 from the configured apt sources: the installed version, or the closest
# one the archive still serves; for 17 and 18 from deb.debian.org's pool, as trixie and sid
# list it; Debian has no source of 16 any more), unpacks only what pg_regress needs against a running
# server (sql/, expected/, data/, parallel_schedule, resultmap, regress.c, and contrib/spi's
# autoinc.c and refint.c, which the triggers test loads) and builds regress.so, autoinc.so and
# refint.so with the installed server's headers.
#
# The result goes to $MMTS_REGRESS_DIR (default target/pg-regress/N):
#   suite/      inputdir for pg_regress (--inputdir), the .so files next to it (--dlpath)
#   VERSION     the Debian source version the suite comes from
#   download/   the source package
# Idempotent: a complete suite for the installed server is left alone. Run as root or as a user
# with sudo (only adding deb-src sources and `apt-get update` need root). Everything is left
# readable by the `postgres` OS user, which runs the servers when the tests run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

PG_CONFIG="${MMTS_PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}"
PG_MAJOR=$("$PG_CONFIG" --version | awk '{print $2}' | cut -d. -f1)
dir="${MMTS_REGRESS_DIR:-$PWD/target/pg-regress/$PG_MAJOR}"
suite="$dir/suite"

step() { printf '==> regress suite: %s\n' "$*"; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

if [ "$PG_MAJOR" = 15 ]; then
  installed=$(dpkg-query -W -f='${Version}' "postgresql-$PG_MAJOR" 2>/dev/null || true)
else
  installed=$("$PG_CONFIG" --version | awk '{print $2}')
fi
if [ -z "$installed" ]; then
  echo "error: postgresql-$PG_MAJOR is not installed (run scripts/setup.sh first)" >&2
  exit 1
fi
pg_regress="$("$PG_CONFIG" --pkglibdir)/pgxs/src/test/regress/pg_regress"
if [ ! -x "$pg_regress" ]; then
  echo "error: $pg_regress is missing (Debian package postgresql-server-dev-$PG_MAJOR)" >&2
  exit 1
fi

# The suite is complete once the stamp names the installed server: regress.so is built against
# its headers, so a new server minor version rebuilds it (and may fetch a newer suite).
# RECIPE changes whenever this script prepares the suite differently.
RECIPE=2
stamp="$dir/READY"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$installed recipe $RECIPE" ] && [ -f "$suite/regress.so" ] && [ -f "$suite/refint.so" ]; then
  step "ready in $suite ($(cat "$dir/VERSION") for server $installed)"
  exit 0
fi
mkdir -p "$dir"

pkgdir="$dir/download"
mkdir -p "$pkgdir"
orig="" version=""
if [ "$PG_MAJOR" != 15 ]; then
  # From the pool of deb.debian.org, as the first of these suites lists it, checked against
  # the index's SHA-256.
  for dist in trixie sid; do
    entry=$(curl -fsS -m 60 "http://deb.debian.org/debian/dists/$dist/main/source/Sources.xz" | xz -d |
      awk -v pkg="postgresql-$PG_MAJOR" '
        /^Package: / { on = ($2 == pkg) }
        on && /^Version: / { version = $2 }
        on && /^Directory: / { directory = $2 }
        on && /^Checksums-Sha256:/ { sums = 1; next }
        on && sums && /^ / { if ($3 ~ /\.orig\.tar\./) { sha = $1; file = $3 } next }
        { sums = 0 }
        END { if (file != "") print version, directory, file, sha }') || true
    [ -n "$entry" ] && break
  done
  if [ -z "$entry" ]; then
    echo "error: Debian lists no source package postgresql-$PG_MAJOR (trixie, sid)" >&2
    exit 1
  fi
  read -r version directory file sha <<<"$entry"
  orig="$pkgdir/$file"
  if [ ! -f "$orig" ] || ! echo "$sha  $orig" | sha256sum -c --status; then
    step "downloading $file ($version)"
    curl -fsS -m 600 -o "$orig.part" "http://deb.debian.org/debian/$directory/$file"
    echo "$sha  $orig.part" | sha256sum -c --status || { echo "error: $file: checksum mismatch" >&2; exit 1; }
    mv "$orig.part" "$orig"
  fi
else
  # 1. Debian source packages: a deb-src twin of every configured Debian source.
  have_deb_src() { grep -rqsE '^(Types:.*\bdeb-src\b|deb-src[[:space:]])' /etc/apt/sources.list /etc/apt/sources.list.d/; }
  if ! have_deb_src; then
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
      step "adding deb-src sources (/etc/apt/sources.list.d/debian-src.sources)"
      sed -E 's/^Types:.*/Types: deb-src/' /etc/apt/sources.list.d/debian.sources |
        as_root tee /etc/apt/sources.list.d/debian-src.sources >/dev/null
    elif grep -qsE '^deb[[:space:]]' /etc/apt/sources.list; then
      step "adding deb-src sources (/etc/apt/sources.list.d/debian-src.list)"
      sed -nE 's/^deb([[:space:]])/deb-src\1/p' /etc/apt/sources.list |
        as_root tee /etc/apt/sources.list.d/debian-src.list >/dev/null
    else
      echo "error: no Debian apt sources found to add deb-src lines for" >&2
      exit 1
    fi
  fi
  available() { apt-cache showsrc "postgresql-$PG_MAJOR" 2>/dev/null | awk '/^Version:/ {print $2}' | sort -u; }
  if [ -z "$(available)" ]; then
    step "apt-get update (source package lists)"
    as_root apt-get update -qq
  fi
  versions=$(available)
  if [ -z "$versions" ]; then
    echo "error: apt serves no source package postgresql-$PG_MAJOR" >&2
    exit 1
  fi

  # 2. Candidates, closest first: the installed version, then older ones (newest first), then
  # newer ones (oldest first). The archive may list a version whose files it no longer serves
  # (the security pocket), so each is tried in turn.
  older=$(while read -r v; do if dpkg --compare-versions "$v" lt "$installed"; then echo "$v"; fi; done <<<"$versions" |
    sort -V -r)
  newer=$(while read -r v; do if dpkg --compare-versions "$v" gt "$installed"; then echo "$v"; fi; done <<<"$versions" |
    sort -V)
  candidates=$( (grep -xF "$installed" <<<"$versions" || true; echo "$older"; echo "$newer") | sed '/^$/d')

  # 3. Download (as ourselves: no root needed) unless already there.
  apt_opts=(-qq --download-only)
  [ "$(id -u)" -ne 0 ] || apt_opts+=(-o APT::Sandbox::User=root)
  for v in $candidates; do
    upstream=${v%-*}
    upstream=${upstream#*:}
    orig=$(ls "$pkgdir"/postgresql-${PG_MAJOR}_"$upstream".orig.tar.* 2>/dev/null | head -n1 || true)
    if [ -z "$orig" ]; then
      step "downloading source package postgresql-$PG_MAJOR=$v"
      if ! (cd "$pkgdir" && apt-get source "${apt_opts[@]}" "postgresql-$PG_MAJOR=$v" 2>&1 | sed 's/^/    /'; exit "${PIPESTATUS[0]}"); then
        step "postgresql-$PG_MAJOR=$v is listed but not served; trying the next closest"
        continue
      fi
      orig=$(ls "$pkgdir"/postgresql-${PG_MAJOR}_"$upstream".orig.tar.* 2>/dev/null | head -n1 || true)
    fi
    if [ -n "$orig" ]; then
      version=$v
      break
    fi
  done
  if [ -z "$version" ]; then
    echo "error: none of the listed postgresql-$PG_MAJOR source packages could be downloaded" >&2
    exit 1
  fi
  [ "$version" = "$installed" ] || step "the suite comes from $version (server: $installed)"
fi

# 4. Unpack only the regression suite (Debian's patches do not touch src/test/regress).
step "unpacking src/test/regress from $(basename "$orig")"
rm -rf "$suite" "$dir/unpack"
mkdir -p "$dir/unpack"
tar -tf "$orig" |
  grep -E '^[^/]+/(src/test/regress/((sql|expected|input|output|data)/|(parallel_schedule|regress\.c|resultmap)$)|contrib/spi/(autoinc|refint)\.c$)' \
    | grep -v '/$' >"$dir/unpack.list"
tar -xf "$orig" --no-same-owner -C "$dir/unpack" -T "$dir/unpack.list"
mv "$dir"/unpack/*/src/test/regress "$suite"
mv "$dir"/unpack/*/contrib/spi/autoinc.c "$dir"/unpack/*/contrib/spi/refint.c "$suite/"
rm -rf "$dir/unpack" "$dir/unpack.list"
echo "$version" >"$dir/VERSION"

# 5. The C functions the suite's SQL loads (from --dlpath), built for this server.
step "building regress.so, autoinc.so, refint.so with the headers of PostgreSQL $("$PG_CONFIG" --version | awk '{print $2}')"
# refint reports what it cascades (REFINT_VERBOSE), as the triggers test expects.
for lib in regress autoinc refint; do
  cc -O2 -fPIC -shared -Wall -Wno-unused-parameter -Wno-missing-field-initializers -DREFINT_VERBOSE \
    -I"$("$PG_CONFIG" --includedir-server)" -o "$suite/$lib.so" "$suite/$lib.c"
done

# 6. Readable (directories traversable) by the server user.
chmod -R a+rX "$dir"
if [ "$(id -u)" -eq 0 ] && id postgres >/dev/null 2>&1 &&
  ! runuser -u postgres -- test -r "$suite/regress.so" -a -r "$suite/sql/test_setup.sql"; then
  echo "error: the postgres user cannot read $suite (a parent directory is closed to others?)" >&2
  exit 1
fi

echo "$installed recipe $RECIPE" >"$stamp"
step "ready in $suite ($version for server $installed; $(grep -c '' "$suite/parallel_schedule") schedule lines)"
