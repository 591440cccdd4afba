#!/usr/bin/env bash
# A throwaway PostgreSQL server for the test lane that runs against it.
#   bash scripts/postgres.sh start   installs PostgreSQL from Debian packages if it is missing (needs root
#                                    or sudo), starts a private cluster under $STILLROOM_PG_DIR
#                                    (default /tmp/stillroom-pg) on 127.0.0.1:$STILLROOM_PG_PORT
#                                    (default 55432), creates the database stillroom_test and prints its
#                                    SQLAlchemy URL on stdout (everything else goes to stderr)
#   bash scripts/postgres.sh stop    stops that cluster (its files stay until the next start)
# It never touches the system's own cluster.
set -euo pipefail
dir=${STILLROOM_PG_DIR:-/tmp/stillroom-pg}
port=${STILLROOM_PG_PORT:-55432}
log() { echo "postgres.sh: $*" >&2; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }

pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }

install_postgres() {
    [ -n "$(pg_bin)" ] && return 0
    log "installing PostgreSQL from Debian packages (apt-get install postgresql)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2 &&
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >&2 || {
        log "cannot install PostgreSQL here (needs apt-get and root or sudo)"; exit 1; }
}

# initdb and the server refuse to run as root: run them as the postgres user then.
as_owner() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

start() {
    install_postgres
    local bin; bin=$(pg_bin)
    mkdir -p "$dir"
    [ "$(id -u)" = 0 ] && chown postgres: "$dir"
    if [ ! -f "$dir/data/PG_VERSION" ]; then
        as_owner "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 >"$dir/initdb.log" 2>&1 || {
            cat "$dir/initdb.log" >&2; exit 1; }
    fi
    if ! as_owner "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
        as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start \
            -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off" >&2 || {
            cat "$dir/server.log" >&2; exit 1; }
    fi
    as_owner "$bin/psql" -h 127.0.0.1 -p "$port" -U postgres -tAc \
        "SELECT 1 FROM pg_database WHERE datname = 'stillroom_test'" | grep -q 1 ||
        as_owner "$bin/createdb" -h 127.0.0.1 -p "$port" -U postgres stillroom_test
    log "PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port, data in $dir/data"
    echo "postgresql+psycopg://postgres@127.0.0.1:$port/stillroom_test"
}

stop() {
    local bin; bin=$(pg_bin)
    [ -n "$bin" ] && [ -f "$dir/data/PG_VERSION" ] || return 0
    as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >&2 || true
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
