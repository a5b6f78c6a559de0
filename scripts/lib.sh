# scripts/lib.sh: shared set-up for scripts/test.sh, scripts/demo.sh and
# bench/run.sh.  Source it; it defines functions and touches nothing until
# they are called.  Everything it starts is stopped by d365_stop_all (the
# callers install it as an EXIT trap).
#
#   d365_install_packages   apt-get the build and run dependencies (root)
#   d365_build              make && make install against PostgreSQL 15
#   d365_start_cluster DB   throwaway cluster, pg_cron preloaded for DB
#   d365_start_preloaded_cluster DB
#                           the same with d365sync preloaded too: its
#                           background worker serves DB
#   d365_start_sim [args]   the Dataverse simulator on 127.0.0.1 (http+https)
#   d365_start_standalone LOG  build, cluster and simulator for a test/*.sh
#                           run by itself
#   d365_stop_all           stop the simulator and the cluster, remove files
#
# D365_PG_BIN (optional) names another PostgreSQL 15 bin directory, such as a
# private copy made by scripts/pg-sandbox.sh, so that several checkouts can
# build, install and test at once without sharing one installation.

D365_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PG_BIN=${D365_PG_BIN:-/usr/lib/postgresql/15/bin}
PG_CONFIG=$PG_BIN/pg_config
export PG_CONFIG
D365_PACKAGES="postgresql-15 postgresql-server-dev-15 postgresql-15-cron libcurl4-openssl-dev libjansson-dev libipc-run-perl"

d365_log() { printf '==> %s\n' "$*"; }

d365_install_packages() {
    local missing=""
    for p in $D365_PACKAGES; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
    done
    if [ -n "$missing" ]; then
        d365_log "installing packages:$missing"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >/dev/null
        # Name postgresql-15 with its -dev package so server and headers match.
        apt-get install -y -qq $D365_PACKAGES >/dev/null
    else
        d365_log "packages already installed"
    fi
}

# d365_build: builds and installs into the PostgreSQL of PG_BIN.  Without
# D365_PG_BIN that is the system's PostgreSQL 15 (what a fresh machine
# needs); it says so, and how to install into a private copy instead.
d365_build() {
    if [ -z "${D365_PG_BIN:-}" ]; then
        d365_log "building and installing d365sync into the system PostgreSQL ($PG_BIN)"
        d365_log "(to leave it untouched: bash scripts/pg-sandbox.sh DIR, then export D365_PG_BIN=DIR/usr/lib/postgresql/15/bin)"
    else
        d365_log "building and installing d365sync into $PG_BIN/.. (D365_PG_BIN)"
    fi
    # warnings are errors here (a development build), not in a user's build
    make -C "$D365_REPO" -s PG_CONFIG="$PG_CONFIG" with_llvm=no D365_WERROR=1 >/dev/null
    make -C "$D365_REPO" -s PG_CONFIG="$PG_CONFIG" with_llvm=no D365_WERROR=1 install >/dev/null
}

# d365_start_cluster DBNAME [PRELOAD]: initdb + start with pg_cron for
# DBNAME.  PRELOAD is shared_preload_libraries (default pg_cron); when it
# names d365sync, its worker is pointed at DBNAME and LOG lines are kept.
# Sets D365_WORK, PGHOST, PGPORT, PGUSER, PGDATA.
d365_start_cluster() {
    local db=$1 preload=${2:-pg_cron} extra=""
    case ",$preload," in
        *,d365sync,*) extra="d365sync.database_name = '$db'
log_min_messages = log" ;;
        *) extra="log_min_messages = warning" ;;
    esac
    D365_WORK=$(mktemp -d /tmp/d365sync.XXXXXX)
    chmod 755 "$D365_WORK"
    mkdir -p "$D365_WORK/sock"
    chown postgres:postgres "$D365_WORK" "$D365_WORK/sock"
    export PGDATA=$D365_WORK/data PGHOST=$D365_WORK/sock PGPORT=5432 PGUSER=postgres
    d365_log "starting a throwaway PostgreSQL 15 cluster in $D365_WORK"
    (cd "$D365_WORK" && runuser -u postgres -- "$PG_BIN/initdb" -D "$PGDATA" -U postgres \
        --auth=trust --no-sync >"$D365_WORK/initdb.log" 2>&1) || { cat "$D365_WORK/initdb.log"; return 1; }
    cat >>"$PGDATA/postgresql.conf" <<CONF
listen_addresses = ''
unix_socket_directories = '$PGHOST'
shared_preload_libraries = '$preload'
cron.database_name = '$db'
cron.host = '$PGHOST'
cron.use_background_workers = on
max_worker_processes = 16
fsync = off
$extra
CONF
    (cd "$D365_WORK" && runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PGDATA" -w \
        -l "$D365_WORK/postgres.log" start >/dev/null) || { cat "$D365_WORK/postgres.log"; return 1; }
}

# d365_start_preloaded_cluster DBNAME: a cluster with
# shared_preload_libraries = 'pg_cron,d365sync' whose d365sync background
# worker serves DBNAME (the database need not exist yet).  Both kinds of
# cluster are supported set-ups and both are tested.
d365_start_preloaded_cluster() {
    d365_start_cluster "$1" "pg_cron,d365sync"
}

# d365_start_sim [extra simulator flags]: http and https on free ports.
# Sets D365_SIM_URL, D365_SIM_HTTPS_URL, D365_SIM_CA, D365_SIMCTL.
d365_start_sim() {
    d365_log "starting the Dataverse simulator"
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=127.0.0.1 \
        -addext subjectAltName=IP:127.0.0.1 \
        -keyout "$D365_WORK/sim.key" -out "$D365_WORK/sim.crt" >/dev/null 2>&1
    chmod 644 "$D365_WORK/sim.crt"
    /usr/bin/python3 "$D365_REPO/sim/dataverse_sim.py" --port 0 --https-port 0 \
        --cert "$D365_WORK/sim.crt" --key "$D365_WORK/sim.key" \
        --port-file "$D365_WORK/sim.ports" "$@" >"$D365_WORK/sim.log" 2>&1 &
    D365_SIM_PID=$!
    local i
    for i in $(seq 1 100); do
        [ -s "$D365_WORK/sim.ports" ] && break
        sleep 0.1
    done
    [ -s "$D365_WORK/sim.ports" ] || { cat "$D365_WORK/sim.log"; return 1; }
    read -r http_port https_port <"$D365_WORK/sim.ports"
    export D365_SIM_URL=http://127.0.0.1:$http_port
    export D365_SIM_HTTPS_URL=https://127.0.0.1:$https_port
    export D365_SIM_CA=$D365_WORK/sim.crt
    export D365_SIMCTL=$D365_REPO/sim/simctl
    "$D365_SIMCTL" wait >/dev/null
}

# d365_start_standalone LOG: for a shell suite in test/ run by itself (no
# D365_SIM_URL): build and install (unless D365_SKIP_BUILD=1), then a
# cluster whose pg_cron database is another one, as under scripts/test.sh,
# and the simulator.  Output goes to LOG; when something failed it is
# printed as "# ..." lines with "not ok 1 - set-up: ..." and the status is
# non-zero.
d365_start_standalone() {
    local log=$1
    if { [ "${D365_SKIP_BUILD:-}" = 1 ] || d365_build; } >"$log" 2>&1 &&
       { d365_start_cluster postgres && d365_start_sim; } >>"$log" 2>&1; then
        return 0
    fi
    sed 's/^/# /' "$log"
    echo "not ok 1 - set-up: build, cluster or simulator failed"
    return 1
}

d365_stop_all() {
    if [ -n "${D365_SIM_PID:-}" ]; then
        kill "$D365_SIM_PID" 2>/dev/null
        wait "$D365_SIM_PID" 2>/dev/null
        D365_SIM_PID=
    fi
    if [ -n "${D365_WORK:-}" ] && [ -d "$D365_WORK" ]; then
        if [ -f "$D365_WORK/data/postmaster.pid" ]; then
            (cd "$D365_WORK" && runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$D365_WORK/data" \
                -m immediate stop >/dev/null 2>&1)
        fi
        [ -n "${D365_KEEP_WORK:-}" ] || rm -rf "$D365_WORK"
    fi
}
