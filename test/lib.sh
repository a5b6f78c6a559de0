# test/lib.sh: what the shell suites in test/ share.  Source it at the top
# of a suite (scripts/test.sh skips it: it is not a suite).  It sources
# scripts/lib.sh and defines, touching nothing until they are called:
#
#   t_begin NAME        TMPD (a private directory), the ok/notok counter and
#                       an EXIT trap (t_exit) that stops what the suite
#                       started and always exits 0
#   t_on_exit           defined by a suite that needs more cleaning up; the
#                       trap calls it first
#   ok TEXT / notok TEXT [DIAG...] / diag [LINES...]
#                       "ok N - ..." / "not ok N - ..." / "# ..." lines
#                       (diag without arguments reads standard input)
#   now_ms              the time in ms
#   t_standalone        run by itself (no D365_SIM_URL): build (unless
#                       D365_SKIP_BUILD=1), a cluster whose pg_cron database
#                       is another one (as under scripts/test.sh) and the
#                       simulator; stopped at exit.  Under scripts/test.sh:
#                       nothing, the suite uses the cluster and simulator
#                       it was given.  Returns non-zero (with a "not ok"
#                       line) when the set-up failed.
#   t_preloaded DB      a cluster of the suite's own with d365sync preloaded
#                       (its worker serves DB), and a simulator of its own
#                       when run by itself; both stopped at exit
#   psqlq [ARGS]        psql on $DB (or $PSQL_DB): unaligned, tuples only,
#                       stops at the first error (PSQL_STOP=0: it does not),
#                       bounded by PSQL_TIMEOUT seconds (60)
#   simctl ARGS         the simulator's control client, bounded
#   t_configure_sql     the SQL that creates the extension and points it at
#                       the simulator (a psql variable sim_url is not
#                       needed: the URL is in the text)
#   t_create_db DB      DROP DATABASE IF EXISTS + CREATE DATABASE
#   worker_pid [DB]     the d365sync worker connected to DB ($DB), or nothing
#   wait_worker [NOT_PID]
#                       until a worker other than NOT_PID serves $DB (60 s);
#                       sets WORKER_PID
#   wait_sql QUERY [SECONDS]
#                       until QUERY returns t (30 s)
#   wait_server         until the cluster accepts connections (60 s)
#   bg PID              remember a background process: killed at exit

T_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
. "$T_REPO/scripts/lib.sh"

T_N=0
T_OWN_CLUSTER=0
T_SIM_WORK=
BG_PIDS=()

ok() { T_N=$((T_N + 1)); echo "ok $T_N - $*"; }

notok() {
    T_N=$((T_N + 1))
    echo "not ok $T_N - $1"
    shift
    [ $# -eq 0 ] || diag "$@"
}

diag() {
    local a l
    if [ $# -eq 0 ]; then
        sed 's/^/# /' | head -n "${DIAG_MAX:-40}"
        return
    fi
    for a in "$@"; do
        while IFS= read -r l; do printf '# %s\n' "$l"; done <<<"$a"
    done
}

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }

bg() { BG_PIDS+=("$1"); }

t_exit() {
    local p
    declare -F t_on_exit >/dev/null && t_on_exit
    for p in "${BG_PIDS[@]}"; do
        kill "$p" 2>/dev/null
        wait "$p" 2>/dev/null
    done
    [ "$T_OWN_CLUSTER" = 1 ] && d365_stop_all
    [ -n "$T_SIM_WORK" ] && rm -rf "$T_SIM_WORK"
    [ -n "${KEEP:-}" ] || rm -rf "$TMPD"
    exit 0
}

# t_begin NAME: see the header
t_begin() {
    TMPD=$(mktemp -d "/tmp/d365$1.XXXXXX")
    chmod 755 "$TMPD"
    trap t_exit EXIT
    trap 'exit 0' INT TERM
}

t_standalone() {
    [ -z "${D365_SIM_URL:-}" ] || return 0
    T_OWN_CLUSTER=1
    d365_start_standalone "$TMPD/start.log"
}

t_preloaded() {
    if [ -z "${D365_SIM_URL:-}" ]; then
        if [ "${D365_SKIP_BUILD:-}" != 1 ]; then
            d365_build >"$TMPD/build.log" 2>&1 ||
                { notok "set-up: the build failed" "$(tail -n 20 "$TMPD/build.log")"; return 1; }
        fi
        T_OWN_CLUSTER=1
        D365_WORK=$(mktemp -d /tmp/d365sync.XXXXXX)
        chmod 755 "$D365_WORK"
        T_SIM_WORK=$D365_WORK
        d365_start_sim >"$TMPD/sim.log" 2>&1 ||
            { notok "set-up: the simulator did not start" "$(tail -n 5 "$TMPD/sim.log")"; return 1; }
    fi
    T_OWN_CLUSTER=1
    d365_start_preloaded_cluster "$1" >"$TMPD/start.log" 2>&1 || {
        notok "set-up: the preloaded cluster did not start" "$(tail -n 5 "$TMPD/start.log")"
        return 1
    }
    export PGHOST PGPORT PGUSER D365_SIM_URL D365_SIMCTL
}

psqlq() {
    local stop=()
    [ "${PSQL_STOP:-1}" = 1 ] && stop=(-v ON_ERROR_STOP=1)
    timeout "${PSQL_TIMEOUT:-60}" psql -X -q -At "${stop[@]}" -P pager=off -d "${PSQL_DB:-$DB}" "$@"
}

simctl() { timeout 30 "$D365_SIMCTL" "$@"; }

t_configure_sql() {
    cat <<SQL
CREATE EXTENSION IF NOT EXISTS d365sync CASCADE;
UPDATE d365.settings
   SET org_url = '$D365_SIM_URL', authority_url = '$D365_SIM_URL',
       tenant_id = '11111111-1111-1111-1111-111111111111',
       client_id = '22222222-2222-2222-2222-222222222222',
       client_secret = 'sim-secret';
SQL
}

t_create_db() {
    PSQL_DB=postgres psqlq -c "DROP DATABASE IF EXISTS $1" -c "CREATE DATABASE $1" >/dev/null
}

worker_pid() {
    PSQL_DB=postgres psqlq -c "SELECT pid FROM pg_stat_activity
                                WHERE backend_type = 'd365sync worker'
                                  AND datname = '${1:-$DB}'" 2>/dev/null
}

wait_worker() {
    local i p
    for i in $(seq 1 300); do
        p=$(worker_pid)
        if [ -n "$p" ] && [ "$p" != "${1:-}" ]; then
            WORKER_PID=$p
            return 0
        fi
        sleep 0.2
    done
    return 1
}

wait_sql() {
    local i
    for i in $(seq 1 $(( ${2:-30} * 5 ))); do
        [ "$(psqlq -c "$1" 2>/dev/null)" = t ] && return 0
        sleep 0.2
    done
    return 1
}

wait_server() {
    local i
    for i in $(seq 1 300); do
        PSQL_DB=postgres PSQL_TIMEOUT=5 psqlq -c 'SELECT 1' >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    return 1
}
