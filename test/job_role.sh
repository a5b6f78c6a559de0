#!/usr/bin/env bash
# test/job_role.sh: the jobs run as d365sync's own role, d365sync_job, on a
# cluster of its own with shared_preload_libraries = 'pg_cron,d365sync':
#   (a) no role holding a set of d365_grant() but the admin, nor PUBLIC,
#       may EXECUTE an internal function of d365 (names starting with "_")
#       -- from the catalog, and a direct call of each is refused with
#       SQLSTATE 42501 -- but the operator's d365._jobs() and
#       d365._cron_host(), which d365_schedule() calls as its caller;
#   (b) an operator's jobs still work: from psql (d365_sync_contacts(),
#       d365_sync_contact(), d365_sync_activities(), d365_pull_changes(),
#       d365_sync(), d365_pull(), CALL d365_load(), CALL d365_run_job()),
#       from pg_cron (scheduled by the operator with d365_schedule()), and
#       in the background worker running as d365sync.worker_role; the
#       application's d365_update_contact() and d365_log_activity() too;
#       the rows the simulator received show it;
#   (c) the caller's rights on the application's table are still what
#       counts: an operator without UPDATE on the contact table cannot
#       apply a Dynamics edit with d365_pull_changes(), nor one without
#       SELECT send it with d365_sync_contacts();
#   (d) a superuser's call runs d365's work as the job role (a trigger on
#       d365.sync_run records who wrote the run), the table owner's trigger
#       as the owner, and every caller is itself again afterwards, also
#       after a failed CALL d365_run_job() that committed its run; the
#       SECURITY DEFINER functions belong to the job role (the app's
#       d365_log_activity() and the capture trigger write as it).
#
# scripts/test.sh runs it with the simulator it started; run alone it
# starts one:
#   bash test/job_role.sh                    # builds and installs first
#   D365_SKIP_BUILD=1 bash test/job_role.sh  # uses the installed extension
#
# Prints "ok N - ..." / "not ok N - ..." lines and always exits 0.
set -uo pipefail

DB=d365jobrole
. "$(dirname "$0")/lib.sh"
t_begin jobrole
t_preloaded "$DB" || exit 0
LOG=$D365_WORK/postgres.log

check() {   # check DESCRIPTION ACTUAL EXPECTED [diagnostics...]
    local what=$1 got=$2 want=$3
    shift 3
    if [ "$got" = "$want" ]; then ok "$what"; else notok "$what" "got: $got" "expected: $want" "$@"; fi
}

# sim_count ENTITY PYCOND: how many simulator rows of ENTITY satisfy PYCOND
sim_count() {
    /usr/bin/python3 - "$D365_SIM_URL" "$1" "$2" <<'PY'
import json, sys, urllib.request
base, entity, cond = sys.argv[1], sys.argv[2], sys.argv[3]
with urllib.request.urlopen(base + "/_sim/rows/" + entity, timeout=10) as f:
    rows = json.load(f)["value"]
print(sum(1 for r in rows if eval(cond, {}, {"r": r})))
PY
}

# as ROLE SQL...: psql as ROLE (SET ROLE), errors shown, not stopping
as() {
    local role=$1
    shift
    PSQL_STOP=0 psqlq -c "SET ROLE $role" "$@" 2>&1
}

PSQL_DB=postgres psqlq -c "CREATE DATABASE $DB" >/dev/null
if ! psqlq >"$TMPD/setup.log" 2>&1 <<SQL
$(t_configure_sql)
CREATE EXTENSION pg_cron;
UPDATE d365.settings SET contact_sync_enabled = true, activity_sync_enabled = true, min_score = 10;
CREATE ROLE jr_owner;
CREATE ROLE jr_monitor;
CREATE ROLE jr_operator LOGIN;
CREATE ROLE jr_admin;
CREATE ROLE jr_app;
CREATE ROLE jr_worker LOGIN;
CREATE ROLE jr_noupdate;
CREATE ROLE jr_noselect;
CREATE TABLE lead (id integer PRIMARY KEY, name text, score integer NOT NULL DEFAULT 50);
CREATE TABLE companies (id serial PRIMARY KEY, name text NOT NULL, revenue numeric(12,2));
ALTER TABLE lead OWNER TO jr_owner;
ALTER TABLE companies OWNER TO jr_owner;
SELECT d365.d365_attach_contacts('lead');
INSERT INTO d365.field_map VALUES ('name', 'firstname');
SELECT d365.d365_map_table('account', 'companies', 'accounts');
SELECT d365.d365_map_column('account', 'name', 'name');
SELECT d365.d365_map_column('account', 'revenue', 'revenue');
SELECT d365.d365_grant('jr_monitor', 'monitor');
SELECT d365.d365_grant('jr_operator', 'operator');
SELECT d365.d365_grant('jr_admin', 'admin');
SELECT d365.d365_grant('jr_app', 'app');
SELECT d365.d365_grant('jr_worker', 'operator');
SELECT d365.d365_grant('jr_noupdate', 'operator');
SELECT d365.d365_grant('jr_noselect', 'operator');
GRANT SELECT, UPDATE ON lead, companies TO jr_operator, jr_worker, jr_app;
GRANT SELECT ON lead TO jr_noupdate;
-- who runs code: the table owner's trigger, and a trigger on d365's run
-- history (a superuser's test fixture) that sees d365's own work
CREATE TABLE public.seen (what text, who name, session_who name);
GRANT INSERT ON public.seen TO PUBLIC;
CREATE FUNCTION public.jr_seen() RETURNS trigger LANGUAGE plpgsql AS \$\$
BEGIN
    INSERT INTO public.seen VALUES (TG_ARGV[0], current_user, session_user);
    RETURN NULL;
END \$\$;
ALTER FUNCTION public.jr_seen() OWNER TO jr_owner;
CREATE TRIGGER jr_seen AFTER UPDATE OF dynamics365_related_id ON lead
    FOR EACH ROW EXECUTE FUNCTION public.jr_seen('owner trigger');
SQL
then
    notok "set-up: configuring failed" "$(tail -n 8 "$TMPD/setup.log")"
    exit 0
fi

# ---------------------------------------------------------------------------
# (a) the catalog and direct calls
# ---------------------------------------------------------------------------
check "the job role exists: NOLOGIN, no superuser, BYPASSRLS, no member" \
    "$(psqlq -c "SELECT rolcanlogin || ' ' || rolsuper || ' ' || rolbypassrls || ' ' ||
                        (SELECT count(*) FROM pg_auth_members m WHERE m.roleid = r.oid)
                   FROM pg_roles r WHERE rolname = 'd365sync_job'")" "false false true 0"
for set in monitor operator app; do
    want=""
    [ "$set" = operator ] && want="_cron_host,_jobs"
    check "catalog: the $set set holds EXECUTE on no internal function of d365${want:+ but $want}" \
        "$(psqlq -c "SELECT coalesce(string_agg(p.proname, ',' ORDER BY p.proname), '')
                       FROM pg_proc p
                      WHERE p.pronamespace = 'd365'::regnamespace AND p.proname LIKE '\\_%'
                        AND has_function_privilege('jr_$set', p.oid, 'EXECUTE')")" "$want"
done
check "catalog: PUBLIC holds EXECUTE on no function of d365" \
    "$(psqlq -c "SELECT count(*) FROM pg_proc p
                  WHERE p.pronamespace = 'd365'::regnamespace
                    AND (p.proacl IS NULL OR EXISTS (SELECT FROM aclexplode(p.proacl) a WHERE a.grantee = 0))")" 0
check "catalog: the job role holds EXECUTE on every internal function but the trigger functions" \
    "$(psqlq -c "SELECT count(*) FROM pg_proc p
                  WHERE p.pronamespace = 'd365'::regnamespace AND p.proname LIKE '\\_%'
                    AND p.prorettype <> 'trigger'::regtype
                    AND NOT has_function_privilege('d365sync_job', p.oid, 'EXECUTE')")" 0

# Each internal function called directly, with NULL arguments (a text for
# a polymorphic one), as each role: every call refused with 42501 but the
# operator's two.
psqlq >/dev/null <<'SQL'
CREATE TABLE public.jr_call (role_name name, routine regprocedure, sqlstate text);
GRANT INSERT ON public.jr_call TO PUBLIC;
CREATE FUNCTION public.jr_calls() RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    p record;
    args text;
    state text;
BEGIN
    FOR p IN SELECT f.oid, f.oid::regprocedure AS sig, f.prokind, f.proargtypes
               FROM pg_proc f
              WHERE f.pronamespace = 'd365'::regnamespace AND f.proname LIKE '\_%'
                AND f.prorettype <> 'trigger'::regtype LOOP
        -- a value of each type (a strict function called with a NULL
        -- constant is folded to NULL by the planner, never called)
        SELECT coalesce(string_agg(
                   CASE WHEN t.typname IN ('anyelement', 'anynonarray', 'anycompatible') THEN '''x''::text'
                        WHEN t.typname = 'anyarray' THEN '''{x}''::text[]'
                        WHEN t.typcategory = 'A' THEN format('''{}''::%s', format_type(t.oid, NULL))
                        WHEN t.typcategory IN ('S', 'U') AND t.typtype = 'b'
                             THEN format('%L::%s', CASE t.typname WHEN 'bytea' THEN '\x00' WHEN 'jsonb' THEN '{}'
                                                                  WHEN 'json' THEN '{}' WHEN 'uuid' THEN gen_random_uuid()::text
                                                                  ELSE 'x' END, format_type(t.oid, NULL))
                        WHEN t.typcategory = 'N' THEN format('''1''::%s', format_type(t.oid, NULL))
                        WHEN t.typcategory = 'B' THEN 'true'
                        WHEN t.typcategory = 'D' THEN format('now()::%s', format_type(t.oid, NULL))
                        WHEN t.typname = 'regclass' THEN '''pg_class''::regclass'
                        WHEN t.typname = 'regprocedure' THEN '''now()''::regprocedure'
                        WHEN t.typname = 'regtype' THEN '''text''::regtype'
                        WHEN t.typname = 'regrole' THEN 'current_user::regrole'
                        ELSE format('NULL::%s', format_type(t.oid, NULL)) END, ', ' ORDER BY a.n), '')
          INTO args
          FROM unnest(p.proargtypes::oid[]) WITH ORDINALITY a(t, n) JOIN pg_type t ON t.oid = a.t;
        BEGIN
            EXECUTE format(CASE WHEN p.prokind = 'p' THEN 'CALL %s(%s)' ELSE 'SELECT %s(%s)' END,
                           regexp_replace(p.sig::text, '\(.*$', ''), args);
            state := '00000';
        EXCEPTION WHEN OTHERS THEN
            GET STACKED DIAGNOSTICS state = RETURNED_SQLSTATE;
        END;
        INSERT INTO public.jr_call VALUES (current_user, p.sig, state);
    END LOOP;
END $$;
GRANT EXECUTE ON FUNCTION public.jr_calls() TO PUBLIC;
CREATE ROLE jr_nobody;
SQL
for role in jr_monitor jr_operator jr_app jr_nobody; do
    as "$role" -c "SELECT public.jr_calls()" >"$TMPD/calls-$role.log"
done
for role in jr_monitor jr_operator jr_app jr_nobody; do
    want=""
    [ "$role" = jr_operator ] && want="d365._cron_host() 00000,d365._jobs() 00000"
    check "a direct call of each internal function as $role is refused with 42501${want:+ (but the two d365_schedule() calls)}" \
        "$(psqlq -c "SELECT coalesce(string_agg(routine::text || ' ' || sqlstate, ',' ORDER BY routine::text), '')
                       FROM public.jr_call WHERE role_name = '$role' AND sqlstate <> '42501'")" "$want" \
        "$(head -n 5 "$TMPD/calls-$role.log")"
done
check "... every internal function was called (as each of the 4 roles)" \
    "$(psqlq -c "SELECT count(*) = 4 * (SELECT count(*) FROM pg_proc p WHERE p.pronamespace = 'd365'::regnamespace
                                           AND p.proname LIKE '\\_%' AND p.prorettype <> 'trigger'::regtype)
                   FROM public.jr_call")" t
cron_host=$(psqlq -c "SELECT current_setting('cron.host', true)")
check "the operator's two internal functions take no argument and change nothing: d365._jobs() lists the jobs, d365._cron_host() a setting" \
    "$(as jr_operator -At -c "SELECT count(*) || ' ' || d365._cron_host() FROM d365._jobs()" | tail -n 1)" \
    "5 $cron_host"

# ---------------------------------------------------------------------------
# (b) the operator's jobs from psql
# ---------------------------------------------------------------------------
psqlq -c "INSERT INTO lead VALUES (1, 'Ada'), (2, 'Bob')" -c "INSERT INTO companies (name, revenue) VALUES ('Contoso', 10)" >/dev/null
out=$(as jr_operator -At -c "SELECT created FROM d365.d365_sync_contacts()")
check "operator: d365_sync_contacts() creates the contacts" "$(echo "$out" | tail -n 1)" 2 "$out"
check "... the simulator received them" "$(sim_count contact "r.get('firstname') in ('Ada', 'Bob')")" 2
psqlq -c "UPDATE lead SET name = 'Ada Lovelace' WHERE id = 1" >/dev/null
out=$(as jr_operator -At -c "SELECT d365.d365_sync_contact(1) IS NOT NULL")
check "operator: d365_sync_contact(1) sends one contact" "$(echo "$out" | tail -n 1)" t "$out"
check "... the simulator has the new name" "$(sim_count contact "r.get('firstname') == 'Ada Lovelace'")" 1
out=$(as jr_operator -At -c "SELECT map || ' ' || created FROM d365.d365_sync('account')")
check "operator: d365_sync('account') sends the mapped table" "$(echo "$out" | tail -n 1)" "account 1" "$out"
check "... the simulator received the account" "$(sim_count account "r.get('name') == 'Contoso'")" 1
out=$(as jr_operator -c "SELECT count(*) FROM d365.d365_pull('account')" -c "CALL d365.d365_load('account')")
check "operator: d365_pull('account') and CALL d365_load('account') run" "$(echo "$out" | grep -c ERROR)" 0 "$out"
contoso=$(psqlq -c "SELECT dynamics365_related_id FROM companies WHERE name = 'Contoso'")
simctl edit account "{\"op\": \"update\", \"id\": \"$contoso\", \"values\": {\"revenue\": 2500.25}}" >/dev/null
out=$(as jr_operator -c "SELECT count(*) FROM d365.d365_pull('account')")
check "operator: d365_pull('account') applies a Dynamics edit of the account" \
    "$(psqlq -c "SELECT revenue FROM companies WHERE name = 'Contoso'")" 2500.25 "$out"
out=$(as jr_operator -c "SELECT count(*) FROM d365.d365_pull_changes()")
ada=$(psqlq -c "SELECT dynamics365_related_id FROM lead WHERE id = 1")
simctl edit contact "{\"op\": \"update\", \"id\": \"$ada\", \"values\": {\"firstname\": \"Ada King\"}}" >/dev/null
out="$out $(as jr_operator -c "SELECT updated FROM d365.d365_pull_changes()")"
check "operator: d365_pull_changes() applies a Dynamics edit of a contact" \
    "$(psqlq -c "SELECT name FROM lead WHERE id = 1")" "Ada King" "$out"
out=$(as jr_app -At -c "SELECT d365.d365_log_activity(1, 'phonecall', 'Called as the app') > 0")
check "app: d365_log_activity() logs an activity" "$(echo "$out" | tail -n 1)" t "$out"
out=$(as jr_operator -At -c "SELECT created FROM d365.d365_sync_activities()")
check "operator: d365_sync_activities() sends it" "$(sim_count phonecall "r.get('subject') == 'Called as the app'")" 1 "$out"
out=$(as jr_app -At -c "SELECT d365.d365_update_contact(jsonb_build_object('contactid', '$ada', 'firstname', 'Ada B.'))")
check "app: d365_update_contact() applies a pushed row" "$(psqlq -c "SELECT name FROM lead WHERE id = 1")" "Ada B." "$out"
psqlq -c "INSERT INTO lead VALUES (3, 'Cy')" -c "INSERT INTO companies (name) VALUES ('Fabrikam')" >/dev/null
for job in contacts activities pull maps map-pull; do
    out=$(as jr_operator -c "CALL d365.d365_run_job('$job')")
    check "operator: CALL d365_run_job('$job') succeeds" "$(echo "$out" | grep -c 'ERROR')" 0 "$out"
done
check "... and sent what was pending" \
    "$(sim_count contact "r.get('firstname') == 'Cy'") $(sim_count account "r.get('name') == 'Fabrikam'")" "1 1"
check "the operator is itself again after its jobs" \
    "$(as jr_operator -At -c "SELECT count(*) FROM d365.d365_sync_contacts()" -c "SELECT current_user" | tail -n 1)" jr_operator

# ---------------------------------------------------------------------------
# (c) the caller's rights on the application's table
# ---------------------------------------------------------------------------
bob=$(psqlq -c "SELECT dynamics365_related_id FROM lead WHERE id = 2")
simctl edit contact "{\"op\": \"update\", \"id\": \"$bob\", \"values\": {\"firstname\": \"Robert\"}}" >/dev/null
out=$(as jr_noupdate -c "SELECT updated, failed FROM d365.d365_pull_changes()")
check "an operator without UPDATE on the contact table does not apply a Dynamics edit" \
    "$(psqlq -c "SELECT name FROM lead WHERE id = 2")" Bob "$out"
if echo "$out" | grep -q 'permission denied'; then
    ok "... and is told: permission denied"
else
    notok "... and is told: permission denied" "$out"
fi
out=$(as jr_operator -c "SELECT updated FROM d365.d365_pull_changes()")
check "... the edit stayed for an operator who may apply it" "$(psqlq -c "SELECT name FROM lead WHERE id = 2")" Robert "$out"
psqlq -c "INSERT INTO lead VALUES (4, 'Dee')" >/dev/null
out=$(as jr_noselect -c "SELECT created FROM d365.d365_sync_contacts()")
check "an operator without SELECT on the contact table sends nothing of it" \
    "$(sim_count contact "r.get('firstname') == 'Dee'")" 0 "$out"
if echo "$out" | grep -q 'permission denied for table public.lead'; then
    ok "... and is told: permission denied for table public.lead"
else
    notok "... and is told: permission denied for table public.lead" "$out"
fi

# ---------------------------------------------------------------------------
# (d) a superuser's call runs d365's work as the job role
# ---------------------------------------------------------------------------
psqlq >/dev/null <<'SQL'
CREATE TRIGGER jr_seen AFTER INSERT ON d365.sync_run
    FOR EACH ROW EXECUTE FUNCTION public.jr_seen('run recorded');
TRUNCATE public.seen;
INSERT INTO lead VALUES (5, 'Eve');
SQL
out=$(psqlq -c "SELECT created FROM d365.d365_sync_contacts()" -c "SELECT current_user" 2>&1)
# Dee (left unsent above) and Eve
check "superuser: d365_sync_contacts() sends, and the superuser is itself again" "$(echo "$out" | tr '\n' ' ')" "2 postgres "
check "... d365's work ran as the job role (the run recorded by d365sync_job), the owner's trigger as the owner" \
    "$(psqlq -c "SELECT string_agg(DISTINCT what || ': ' || who || '/' || session_who, ', ') FROM public.seen")" \
    "owner trigger: jr_owner/postgres, run recorded: d365sync_job/postgres"
psqlq -c "TRUNCATE public.seen" -c "INSERT INTO lead VALUES (6, 'Fay')" >/dev/null
out=$(as jr_operator -c "CALL d365.d365_run_job('contacts')")
check "operator: CALL d365_run_job() records its run as the job role" \
    "$(psqlq -c "SELECT string_agg(DISTINCT what || ': ' || who || '/' || session_who, ', ') FROM public.seen WHERE what = 'run recorded'")" \
    "run recorded: d365sync_job/postgres" "$out"
# a run that fails: the client secret has expired
psqlq -c "UPDATE d365.settings SET client_secret = 'an-expired-secret'" -c "INSERT INTO lead VALUES (7, 'Gus')" >/dev/null
last_run=$(psqlq -c "SELECT max(id) FROM d365.sync_run")
out=$(as jr_operator -c "CALL d365.d365_run_job('contacts')" -c "SELECT 'now ' || current_user")
psqlq -c "UPDATE d365.settings SET client_secret = 'sim-secret'" >/dev/null
if echo "$out" | grep -q 'd365sync contacts run failed' &&
   [ "$(psqlq -c "SELECT count(*) FROM d365.sync_run WHERE id > $last_run AND message LIKE 'failed:%'")" = 1 ]; then
    ok "a failing CALL d365_run_job() raises after committing its run"
else
    notok "a failing CALL d365_run_job() raises after committing its run" "$out"
fi
check "... and leaves the session as the operator, not the job role" "$(echo "$out" | grep '^now ' | tail -n 1)" "now jr_operator" "$out"
psqlq -c "DROP TRIGGER jr_seen ON d365.sync_run" >/dev/null

# the SECURITY DEFINER functions belong to the job role: none runs as a
# superuser; an application's d365_log_activity() writes the log as it
check "every SECURITY DEFINER function of d365 belongs to the job role" \
    "$(psqlq -c "SELECT count(*) || ' ' || count(*) FILTER (WHERE proowner <> 'd365sync_job'::regrole)
                   FROM pg_proc WHERE pronamespace = 'd365'::regnamespace AND prosecdef")" \
    "$(psqlq -c "SELECT count(*) FROM pg_proc WHERE pronamespace = 'd365'::regnamespace AND prosecdef") 0"
psqlq >/dev/null <<'SQL'
TRUNCATE public.seen;
CREATE TRIGGER jr_seen AFTER INSERT ON d365.activity
    FOR EACH ROW EXECUTE FUNCTION public.jr_seen('activity logged');
CREATE TRIGGER jr_seen AFTER INSERT ON d365.contact_change
    FOR EACH ROW EXECUTE FUNCTION public.jr_seen('change noted');
SQL
out=$(as jr_app -c "SELECT d365.d365_log_activity(1, 'phonecall', 'Logged as the app') > 0" -c "RESET ROLE" \
      -c "SET ROLE jr_owner" -c "UPDATE lead SET name = 'Ada C.' WHERE id = 1")
check "the app's d365_log_activity() and the capture trigger of a writer's update run as the job role" \
    "$(psqlq -c "SELECT string_agg(DISTINCT what || ': ' || who, ', ') FROM public.seen")" \
    "activity logged: d365sync_job, change noted: d365sync_job" "$out"
psqlq -c "DROP TRIGGER jr_seen ON d365.activity" -c "DROP TRIGGER jr_seen ON d365.contact_change" >/dev/null

# ---------------------------------------------------------------------------
# (b) pg_cron, scheduled by the operator
# ---------------------------------------------------------------------------
psqlq -c "INSERT INTO lead VALUES (8, 'Hal')" -c "INSERT INTO companies (name) VALUES ('Northwind')" >/dev/null
out=$(as jr_operator -c "SELECT job_name FROM d365.d365_schedule(contacts => '* * * * *', activities => NULL, pull => NULL, maps => '* * * * *')")
check "the operator schedules the contact and map jobs" \
    "$(psqlq -c "SELECT string_agg(username || ' ' || jobname, ', ' ORDER BY jobname) FROM cron.job")" \
    "jr_operator d365-contact-sync, jr_operator d365-map-sync" "$out"
if wait_sql "SELECT count(DISTINCT d.jobid) = 2 FROM cron.job_run_details d WHERE d.status IN ('succeeded', 'failed')" 90; then
    check "pg_cron's runs of the operator's jobs succeed" \
        "$(psqlq -c "SELECT string_agg(DISTINCT d.status || ' as ' || d.username, ', ') FROM cron.job_run_details d")" \
        "succeeded as jr_operator" \
        "$(psqlq -c "SELECT string_agg(return_message, '; ') FROM cron.job_run_details")"
    check "... and sent the contact and the account" \
        "$(sim_count contact "r.get('firstname') == 'Hal'") $(sim_count account "r.get('name') == 'Northwind'")" "1 1"
else
    notok "pg_cron's runs of the operator's jobs succeed" "no runs in 90 s" "$(grep -i cron "$LOG" | tail -n 5)"
fi
as jr_operator -c "SELECT d365.d365_unschedule()" >/dev/null

# ---------------------------------------------------------------------------
# (b) the background worker as d365sync.worker_role (an operator)
# ---------------------------------------------------------------------------
psqlq -c "UPDATE d365.settings SET realtime = true" >/dev/null
PSQL_DB=postgres psqlq -c "ALTER SYSTEM SET d365sync.worker_role = 'jr_worker'" -c "SELECT pg_reload_conf()" >/dev/null
if wait_sql "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE backend_type = 'd365sync worker'
                             AND datname = '$DB' AND usename = 'jr_worker')" 60; then
    psqlq -c "TRUNCATE public.seen" -c "INSERT INTO lead VALUES (9, 'Ivy')" \
          -c "INSERT INTO companies (name) VALUES ('Worker Co')" >/dev/null
    if wait_sql "SELECT dynamics365_related_id IS NOT NULL FROM lead WHERE id = 9" 30 &&
       wait_sql "SELECT dynamics365_related_id IS NOT NULL FROM companies WHERE name = 'Worker Co'" 30; then
        ok "the worker (as jr_worker, an operator) sends a contact and a mapped row"
    else
        notok "the worker (as jr_worker, an operator) sends a contact and a mapped row" \
            "$(psqlq -c "SELECT item || ': ' || value FROM d365.d365_status() WHERE item LIKE 'worker%'")" \
            "$(grep d365sync "$LOG" | tail -n 5)"
    fi
    check "... the simulator received them" \
        "$(sim_count contact "r.get('firstname') == 'Ivy'") $(sim_count account "r.get('name') == 'Worker Co'")" "1 1"
    check "... the owner's trigger ran as the owner, in the worker role's session" \
        "$(psqlq -c "SELECT string_agg(DISTINCT who || '/' || session_who, ',') FROM public.seen")" "jr_owner/jr_worker"
else
    notok "set-up: no worker in $DB as jr_worker" "$(grep d365sync "$LOG" | tail -n 5)"
fi
PSQL_DB=postgres psqlq -c "ALTER SYSTEM RESET d365sync.worker_role" -c "SELECT pg_reload_conf()" >/dev/null
