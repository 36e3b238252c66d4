#!/usr/bin/env bash
# A throw-away PostgreSQL for the tests: installs Debian's `postgresql` when its server binaries
# are missing, creates a cluster in a temporary directory, starts it on a free loopback port and
# exports its URL as CXGW_TEST_POSTGRES_URL. The cluster is stopped and its directory removed at
# the end, also when a command fails.
#
#   scripts/postgres.sh CMD [ARGS...]   # runs CMD with the URL exported, then removes the cluster
#   source scripts/postgres.sh          # defines postgres_start and postgres_stop (scripts/test.sh)
#
# initdb and pg_ctl refuse to run as root: as root the server runs as the `postgres` system user
# (created by the package), otherwise as the calling user. The cluster needs a password (SCRAM),
# so the URL carries a secret just like a production one, which the redaction tests rely on.
# fsync is off: the cluster lives for one test run, and durability across power loss is
# PostgreSQL's own business, not what these tests check.

postgres_bindir() {
  local dir
  for dir in /usr/lib/postgresql/*/bin; do
    if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then
      echo "$dir"
      return 0
    fi
  done
  return 1
}

postgres_install() {
  postgres_bindir >/dev/null && return 0
  local sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
      echo "postgres: the postgresql package is missing and installing it needs root" >&2
      return 1
    fi
    sudo=(sudo)
  fi
  "${sudo[@]}" apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq postgresql >/dev/null &&
    postgres_bindir >/dev/null
}

# Runs a server program as the cluster's owner.
postgres_as_owner() {
  if [ "$(id -u)" -eq 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

postgres_free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

postgres_start() {
  postgres_install || return 1
  local bindir
  bindir=$(postgres_bindir) || return 1
  if [ "$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then
    useradd --system --home-dir /nonexistent --shell /usr/sbin/nologin postgres || return 1
  fi
  CXGW_POSTGRES_DIR=$(mktemp -d "${TMPDIR:-/tmp}/cxgw-postgres.XXXXXX") || return 1
  if [ "$(id -u)" -eq 0 ]; then
    chown postgres: "$CXGW_POSTGRES_DIR" || return 1
  fi
  local password
  password=$(head -c 18 /dev/urandom | base64 | tr '+/' '-_')
  (umask 077 && echo "$password" >"$CXGW_POSTGRES_DIR/pwfile")
  if [ "$(id -u)" -eq 0 ]; then chown postgres: "$CXGW_POSTGRES_DIR/pwfile"; fi
  if ! postgres_as_owner "$bindir/initdb" --pgdata="$CXGW_POSTGRES_DIR/data" --username=cxgw \
    --pwfile="$CXGW_POSTGRES_DIR/pwfile" --auth=scram-sha-256 --no-sync --encoding=UTF8 \
    --locale=C >"$CXGW_POSTGRES_DIR/initdb.log" 2>&1; then
    echo "postgres: initdb failed:" >&2
    cat "$CXGW_POSTGRES_DIR/initdb.log" >&2
    postgres_stop
    return 1
  fi
  rm -f "$CXGW_POSTGRES_DIR/pwfile"
  # The port is free when asked but could be taken before the server binds it: try a few.
  local attempt port
  for attempt in 1 2 3 4 5; do
    port=$(postgres_free_port) || break
    if postgres_as_owner "$bindir/pg_ctl" --pgdata="$CXGW_POSTGRES_DIR/data" --wait \
      --timeout=60 --log="$CXGW_POSTGRES_DIR/server.log" \
      -o "-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories=$CXGW_POSTGRES_DIR -c fsync=off -c max_connections=300" \
      start >/dev/null; then
      export CXGW_TEST_POSTGRES_URL="postgres://cxgw:${password}@127.0.0.1:${port}/postgres"
      echo "postgres: cluster running on 127.0.0.1:${port} in ${CXGW_POSTGRES_DIR}"
      return 0
    fi
  done
  echo "postgres: the server did not start:" >&2
  tail -n 20 "$CXGW_POSTGRES_DIR/server.log" >&2
  postgres_stop
  return 1
}

postgres_stop() {
  [ -n "${CXGW_POSTGRES_DIR:-}" ] && [ -d "$CXGW_POSTGRES_DIR" ] || return 0
  local bindir
  if bindir=$(postgres_bindir) && [ -f "$CXGW_POSTGRES_DIR/data/postmaster.pid" ]; then
    postgres_as_owner "$bindir/pg_ctl" --pgdata="$CXGW_POSTGRES_DIR/data" --mode=immediate \
      --wait stop >/dev/null 2>&1
  fi
  rm -rf "$CXGW_POSTGRES_DIR"
  unset CXGW_POSTGRES_DIR CXGW_TEST_POSTGRES_URL
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -uo pipefail
  if [ $# -eq 0 ]; then
    echo "usage: scripts/postgres.sh CMD [ARGS...]" >&2
    exit 2
  fi
  trap postgres_stop EXIT
  trap 'exit 130' INT TERM
  postgres_start || exit 1
  "$@"
fi
