#!/usr/bin/env bash
# test/roles.sh: the roles of d365_grant() on a cluster of its own with
# shared_preload_libraries = 'pg_cron,d365sync':
#   - d365sync.worker_role: the background worker runs its jobs as that
#     role (seen in pg_stat_activity and in what it sends); a role that is
#     missing, a superuser, or without the operator set runs nothing and is
#     named in d365_status() and the server log; without the setting the
#     worker connects as the bootstrap superuser, as before;
#   - the worker pins its settings: ALTER DATABASE ... SET
#     default_transaction_read_only = on, ALTER ROLE ... SET role,
#     statement_timeout and search_path do not stop it;
#   - an operator given d365_grant(..., 'operator') schedules the jobs with
#     d365_schedule() (no pg_read_all_settings for cron.host) and pg_cron's
#     run of its job succeeds.
#
# scripts/test.sh runs it with the simulator it started; run alone it
# starts one:
#   bash test/roles.sh                    # builds and installs first
#   D365_SKIP_BUILD=1 bash test/roles.sh  # uses the installed extension
#
# Prints "ok N - ..." / "not ok N - ..." lines and always exits 0.
set -uo pipefail

RR_REPO=$(cd "$(dirname "$0")/.." && pwd)
DB=d365roles
TMPD=$(mktemp -d /tmp/d365roles.XXXXXX)
chmod 755 "$TMPD"

. "$RR_REPO/scripts/lib.sh"

rr_exit() {
    d365_stop_all
    [ -n "${SIM_WORK:-}" ] && rm -rf "$SIM_WORK"
    rm -rf "$TMPD"
    exit 0
}
trap rr_exit EXIT
trap 'exit 0' INT TERM

n=0
ok() { n=$((n + 1)); echo "ok $n - $*"; }
notok() {
    n=$((n + 1))
    echo "not ok $n - $1"
    shift
    local l
    for l in "$@"; do printf '# %s\n' "$l"; done
}
check() {   # check DESCRIPTION ACTUAL EXPECTED [diagnostics...]
    local what=$1 got=$2 want=$3
    shift 3
    if [ "$got" = "$want" ]; then ok "$what"; else notok "$what" "got: $got" "expected: $want" "$@"; fi
}

if [ -z "${D365_SIM_URL:-}" ]; then
    if [ "${D365_SKIP_BUILD:-}" != 1 ]; then
        d365_build >/dev/null || { notok "set-up: the build failed"; exit 0; }
    fi
    D365_WORK=$(mktemp -d /tmp/d365sync.XXXXXX)
    chmod 755 "$D365_WORK"
    d365_start_sim >/dev/null || { notok "set-up: the simulator did not start"; exit 0; }
    SIM_WORK=$D365_WORK
fi
d365_start_preloaded_cluster "$DB" >"$TMPD/start.log" 2>&1 || {
    notok "set-up: the preloaded cluster did not start" "$(tail -n 5 "$TMPD/start.log")"
    exit 0
}
export PGHOST PGPORT PGUSER D365_SIM_URL D365_SIMCTL
LOG=$D365_WORK/postgres.log

psqlq() {
    timeout 60 psql -X -q -At -v ON_ERROR_STOP=1 -P pager=off -d "${PSQL_DB:-$DB}" "$@"
}

# worker_pid: the d365sync worker connected to $DB, or nothing
worker_pid() {
    PSQL_DB=postgres psqlq -c "SELECT pid FROM pg_stat_activity
                                WHERE backend_type = 'd365sync worker' AND datname = '$DB'" 2>/dev/null
}

# wait_sql QUERY [SECONDS]: until QUERY returns t (default 30 s)
wait_sql() {
    local i
    for i in $(seq 1 $(( ${2:-30} * 5 ))); do
        [ "$(psqlq -c "$1" 2>/dev/null)" = t ] && return 0
        sleep 0.2
    done
    return 1
}

# set_worker_role VALUE: write d365sync.worker_role and reload
set_worker_role() {
    PSQL_DB=postgres psqlq -c "ALTER SYSTEM SET d365sync.worker_role = '$1'" -c "SELECT pg_reload_conf()" >/dev/null
}

# restart_worker: end the worker (a process of this test's cluster); the
# postmaster starts it again, which reads the database's settings anew
restart_worker() {
    local p
    p=$(worker_pid)
    [ -n "$p" ] && PSQL_DB=postgres psqlq -c "SELECT pg_terminate_backend($p)" >/dev/null
}

status_of() {   # status_of ITEM: d365_status()'s value of ITEM
    psqlq -c "SELECT value FROM d365.d365_status() WHERE item = '$1'"
}

PSQL_DB=postgres psqlq -c "CREATE DATABASE $DB" || { notok "set-up: CREATE DATABASE failed"; exit 0; }
psqlq -v sim_url="$D365_SIM_URL" >"$TMPD/setup.log" 2>&1 <<'SQL' || { notok "set-up: configuring failed" "$(tail -n 5 "$TMPD/setup.log")"; exit 0; }
CREATE EXTENSION d365sync;
CREATE EXTENSION pg_cron;
UPDATE d365.settings
   SET org_url = :'sim_url', authority_url = :'sim_url',
       tenant_id = '11111111-1111-1111-1111-111111111111',
       client_id = '22222222-2222-2222-2222-222222222222',
       client_secret = 'sim-secret',
       contact_sync_enabled = true, min_score = 10;
CREATE TABLE lead (id integer PRIMARY KEY, name text, score integer NOT NULL DEFAULT 50);
SELECT d365.d365_attach_contacts('lead');
INSERT INTO d365.field_map VALUES ('name', 'firstname');
CREATE ROLE regress_worker LOGIN;
CREATE ROLE regress_cron_operator LOGIN;
UPDATE d365.settings SET realtime = true;
SQL

# ---------------------------------------------------------------------------
# Without d365sync.worker_role: the bootstrap superuser, as before.
# ---------------------------------------------------------------------------
if wait_sql "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE backend_type = 'd365sync worker' AND datname = '$DB')" 60; then
    check "without d365sync.worker_role the worker connects as the bootstrap superuser" \
        "$(PSQL_DB=postgres psqlq -c "SELECT usename FROM pg_stat_activity WHERE backend_type = 'd365sync worker'")" postgres
else
    notok "set-up: no worker in $DB" "$(tail -n 5 "$LOG")"
    exit 0
fi

# ---------------------------------------------------------------------------
# A role without the operator set runs nothing, and says so.
# ---------------------------------------------------------------------------
set_worker_role regress_worker
if wait_sql "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE backend_type = 'd365sync worker' AND datname = '$DB' AND usename = 'regress_worker')" 60; then
    ok "d365sync.worker_role set and reloaded: the worker connects again as that role"
else
    notok "d365sync.worker_role set and reloaded: the worker connects again as that role" \
        "$(PSQL_DB=postgres psqlq -c "SELECT backend_type, usename, datname FROM pg_stat_activity WHERE backend_type = 'd365sync worker'")" \
        "$(grep 'd365sync' "$LOG" | tail -n 5)"
fi
psqlq -c "INSERT INTO lead VALUES (1, 'Ada')" >/dev/null
if wait_sql "SELECT value LIKE '%does not hold the operator set%d365_grant(''regress_worker'', ''operator'')%' FROM d365.d365_status() WHERE item = 'worker last error'" 30; then
    ok "a worker role without the operator set: d365_status() names the role and the fix"
else
    notok "a worker role without the operator set: d365_status() names the role and the fix" \
        "$(psqlq -c "SELECT item || ': ' || value FROM d365.d365_status() WHERE item LIKE 'worker%'")"
fi
if grep -q "d365sync worker runs no job: role \"regress_worker\" named by d365sync.worker_role does not hold the operator set" "$LOG"; then
    ok "... and the server log"
else
    notok "... and the server log" "$(grep 'd365sync' "$LOG" | tail -n 5)"
fi
check "... and it sent nothing" "$(psqlq -c "SELECT dynamics365_related_id IS NULL FROM lead WHERE id = 1")" t

# ---------------------------------------------------------------------------
# With the operator set (and the table owner's grant): the jobs run as the
# role.
# ---------------------------------------------------------------------------
psqlq -c "SELECT d365.d365_grant('regress_worker', 'operator')" \
      -c "GRANT SELECT, UPDATE ON lead TO regress_worker" >/dev/null
if wait_sql "SELECT dynamics365_related_id IS NOT NULL FROM lead WHERE id = 1" 30; then
    ok "given the operator set, the worker sends the pending contact"
else
    notok "given the operator set, the worker sends the pending contact" \
        "$(psqlq -c "SELECT item || ': ' || value FROM d365.d365_status() WHERE item LIKE 'worker%'")"
fi
check "... and the role's error is gone from d365_status()" \
    "$(psqlq -c "SELECT count(*) FROM d365.d365_status() WHERE item = 'worker last error' AND value LIKE 'worker role:%'")" 0
# the worker's identity, seen by code running in its job: a trigger of the
# application records current_user and session_user
psqlq >/dev/null <<'SQL'
CREATE TABLE public.seen (who name, session_who name, su boolean);
GRANT INSERT ON public.seen TO PUBLIC;
CREATE FUNCTION public.lead_seen() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.seen SELECT current_user, session_user, r.rolsuper
      FROM pg_catalog.pg_roles r WHERE r.rolname = session_user;
    RETURN NULL;
END $$;
CREATE TRIGGER lead_seen AFTER UPDATE OF dynamics365_related_id ON lead
    FOR EACH ROW EXECUTE FUNCTION public.lead_seen();
INSERT INTO lead VALUES (2, 'Bob');
SQL
if wait_sql "SELECT EXISTS (SELECT FROM public.seen)" 30; then
    check "the worker's job runs with session_user the worker role, never a superuser" \
        "$(psqlq -c "SELECT string_agg(DISTINCT session_who || '/' || su, ',') FROM public.seen")" "regress_worker/false"
else
    notok "the worker's job runs with session_user the worker role, never a superuser" "no link written for contact 2"
fi

# ---------------------------------------------------------------------------
# Settings of the database and the role cannot break it.
# ---------------------------------------------------------------------------
psqlq >/dev/null <<SQL
ALTER DATABASE $DB SET default_transaction_read_only = on;
ALTER ROLE regress_worker SET statement_timeout = '1ms';
ALTER ROLE regress_worker SET search_path = public;
CREATE ROLE regress_other;
GRANT regress_other TO regress_worker;
ALTER ROLE regress_worker SET role = 'regress_other';
SQL
restart_worker
sleep 1
psqlq -c "BEGIN READ WRITE" -c "INSERT INTO lead VALUES (3, 'Cy')" -c "COMMIT" >/dev/null
if wait_sql "SELECT dynamics365_related_id IS NOT NULL FROM lead WHERE id = 3" 60; then
    ok "ALTER DATABASE SET default_transaction_read_only, ALTER ROLE SET role, statement_timeout, search_path: the worker still sends"
else
    notok "ALTER DATABASE SET default_transaction_read_only, ALTER ROLE SET role, statement_timeout, search_path: the worker still sends" \
        "$(psqlq -c "SELECT item || ': ' || value FROM d365.d365_status() WHERE item LIKE 'worker%'")" \
        "$(grep 'd365sync' "$LOG" | tail -n 5)"
fi
psqlq >/dev/null <<SQL
SET default_transaction_read_only = off;
ALTER DATABASE $DB RESET default_transaction_read_only;
ALTER ROLE regress_worker RESET ALL;
SQL

# ---------------------------------------------------------------------------
# Roles the worker refuses to run as.
# ---------------------------------------------------------------------------
set_worker_role regress_nobody
if wait_sql "SELECT value LIKE 'worker role: role \"regress_nobody\" named by d365sync.worker_role does not exist%' FROM d365.d365_status() WHERE item = 'worker last error'" 30; then
    ok "a worker role that does not exist: named in d365_status()"
else
    notok "a worker role that does not exist: named in d365_status()" \
        "$(psqlq -c "SELECT item || ': ' || value FROM d365.d365_status() WHERE item LIKE 'worker%'")"
fi
set_worker_role postgres
if wait_sql "SELECT value LIKE 'worker role: role \"postgres\" named by d365sync.worker_role is a superuser%' FROM d365.d365_status() WHERE item = 'worker last error'" 30; then
    ok "a superuser as worker role is refused"
else
    notok "a superuser as worker role is refused" \
        "$(psqlq -c "SELECT item || ': ' || value FROM d365.d365_status() WHERE item LIKE 'worker%'")"
fi
check "... and the worker connected to no database meanwhile" \
    "$(PSQL_DB=postgres psqlq -c "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'd365sync worker' AND datname = '$DB'")" 0
set_worker_role ''
if wait_sql "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE backend_type = 'd365sync worker' AND datname = '$DB' AND usename = 'postgres')" 60; then
    ok "d365sync.worker_role reset: the worker is back as the bootstrap superuser"
else
    notok "d365sync.worker_role reset: the worker is back as the bootstrap superuser"
fi
psqlq -c "UPDATE d365.settings SET realtime = false" >/dev/null

# ---------------------------------------------------------------------------
# The operator schedules with pg_cron, and pg_cron's run succeeds.
# ---------------------------------------------------------------------------
psqlq >"$TMPD/cron.log" 2>&1 <<'SQL'
SELECT d365.d365_grant('regress_cron_operator', 'operator');
GRANT SELECT, UPDATE ON lead TO regress_cron_operator;
INSERT INTO lead VALUES (4, 'Dee');
SET ROLE regress_cron_operator;
SELECT job_name FROM d365.d365_schedule(contacts => '* * * * *', activities => NULL, pull => NULL);
RESET ROLE;
SQL
check "the operator schedules the contact job with d365_schedule()" \
    "$(psqlq -c "SELECT username || ' ' || jobname FROM cron.job")" "regress_cron_operator d365-contact-sync" \
    "$(cat "$TMPD/cron.log")"
if wait_sql "SELECT EXISTS (SELECT FROM cron.job_run_details d WHERE d.status IN ('succeeded', 'failed'))" 75; then
    check "pg_cron's run of the operator's job succeeds" \
        "$(psqlq -c "SELECT d.status || ' as ' || d.username FROM cron.job_run_details d ORDER BY d.runid LIMIT 1")" \
        "succeeded as regress_cron_operator" \
        "$(psqlq -c "SELECT return_message FROM cron.job_run_details ORDER BY runid LIMIT 1")"
    check "... and sent the contact" "$(psqlq -c "SELECT dynamics365_related_id IS NOT NULL FROM lead WHERE id = 4")" t
else
    notok "pg_cron's run of the operator's job succeeds" "no run in 75 s" "$(grep -i cron "$LOG" | tail -n 5)"
fi
PSQL_DB=$DB psqlq -c "SET ROLE regress_cron_operator" -c "SELECT d365.d365_unschedule()" >/dev/null 2>&1

# every SECURITY DEFINER function of the catalog is in docs/security.md's
# list, with why
missing=""
for f in $(psqlq -c "SELECT proname FROM pg_proc WHERE pronamespace = 'd365'::regnamespace AND prosecdef ORDER BY 1"); do
    grep -q "\`$f()\`" "$RR_REPO/docs/security.md" || missing="$missing $f"
done
check "docs/security.md lists every SECURITY DEFINER function of d365" "${missing:-none}" none

# no secret in the log
if grep -q 'sim-secret' "$LOG"; then
    notok "the client secret appears nowhere in the server log"
else
    ok "the client secret appears nowhere in the server log"
fi
