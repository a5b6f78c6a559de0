#!/usr/bin/env bash
# test/worker_maps.sh: the background worker and the scheduled jobs serve
# the table maps, on a cluster of its own with shared_preload_libraries =
# 'pg_cron,d365sync' and the worker running as an operator
# (d365sync.worker_role holding d365_grant()'s operator set):
#   - a row inserted in a mapped table reaches the simulator with no call
#     (polled with a deadline; the latency is printed, never asserted), a
#     child inserted with its parent in one statement is bound to the
#     parent's record;
#   - a Dynamics edit of a mapped record comes back through the worker's
#     pull (pull_interval);
#   - a failing map (503 for its table; a choice label that is not an
#     option) does not hold up the contacts or another map, d365_status()
#     shows the map's pending rows and errors, and the errors clear once the
#     map works again;
#   - a disabled map is not sent; the map "contact" (the attached contact
#     table) is never a map job: the contact jobs run it;
#   - an operator schedules the map jobs with d365_schedule() and pg_cron's
#     runs succeed;
#   - the update from 0.2 gives the grants made on the old d365_schedule()
#     to the new one.
#
# scripts/test.sh runs it with the simulator it started; run alone it
# starts one:
#   bash test/worker_maps.sh                    # builds and installs first
#   D365_SKIP_BUILD=1 bash test/worker_maps.sh  # uses the installed extension
#
# Prints "ok N - ..." / "not ok N - ..." lines and always exits 0.
set -uo pipefail

DB=d365wmaps
. "$(dirname "$0")/lib.sh"
t_begin wmaps
t_preloaded "$DB" || exit 0
LOG=$D365_WORK/postgres.log

# sim_wait ENTITY PYCOND [SECONDS]: poll the simulator's rows of ENTITY until
# one satisfies PYCOND (r is the row); prints the ms it took, or "timeout"
sim_wait() {
    /usr/bin/python3 - "$D365_SIM_URL" "$1" "$2" "${3:-30}" <<'PY'
import json, sys, time, urllib.request
base, entity, cond, limit = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
t0 = time.time()
while time.time() < t0 + limit:
    with urllib.request.urlopen(base + "/_sim/rows/" + entity, timeout=10) as f:
        rows = json.load(f)["value"]
    if any(eval(cond, {}, {"r": r}) for r in rows):
        print(int((time.time() - t0) * 1000))
        sys.exit(0)
    time.sleep(0.02)
print("timeout")
PY
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

status() {   # status PATTERN: d365_status() lines whose item is LIKE PATTERN
    psqlq -c "SELECT item || ': ' || value FROM d365.d365_status() WHERE item LIKE '$1' ORDER BY 1"
}

PSQL_DB=postgres psqlq -c "CREATE DATABASE $DB" >/dev/null
if ! psqlq >"$TMPD/setup.log" 2>&1 <<SQL
$(t_configure_sql)
CREATE EXTENSION pg_cron;
UPDATE d365.settings SET contact_sync_enabled = true, min_score = 10;
CREATE ROLE wm_owner;
CREATE ROLE wm_worker LOGIN;
CREATE ROLE wm_operator LOGIN;
CREATE TABLE companies (id serial PRIMARY KEY, name text NOT NULL, revenue numeric(12,2), industry text);
CREATE TABLE projects (id serial PRIMARY KEY, title text NOT NULL, stage text,
                       company_id integer REFERENCES companies);
CREATE TABLE lead (id integer PRIMARY KEY, name text, score integer NOT NULL DEFAULT 50);
ALTER TABLE companies OWNER TO wm_owner;
ALTER TABLE projects OWNER TO wm_owner;
SELECT d365.d365_map_table('account', 'companies', 'accounts');
SELECT d365.d365_map_column('account', 'name', 'name');
SELECT d365.d365_map_column('account', 'revenue', 'revenue');
SELECT d365.d365_map_column('account', 'industry', 'industrycode');
SELECT d365.d365_map_table('project', 'projects', 'new_projects');
SELECT d365.d365_map_column('project', 'title', 'new_name');
SELECT d365.d365_map_column('project', 'stage', 'new_stage');
SELECT d365.d365_map_column('project', 'company_id', 'new_accountid');
SELECT d365.d365_attach_contacts('lead');
INSERT INTO d365.field_map VALUES ('name', 'firstname');
-- the worker's role: the operator set, and what the tables' owners give
SELECT d365.d365_grant('wm_worker', 'operator');
SELECT d365.d365_grant('wm_operator', 'operator');
GRANT SELECT, UPDATE ON companies, projects, lead TO wm_worker, wm_operator;
UPDATE d365.settings SET realtime = true;
SQL
then
    notok "set-up: configuring failed" "$(tail -n 8 "$TMPD/setup.log")"
    exit 0
fi
PSQL_DB=postgres psqlq -c "ALTER SYSTEM SET d365sync.worker_role = 'wm_worker'" -c "SELECT pg_reload_conf()" >/dev/null
if ! wait_sql "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE backend_type = 'd365sync worker'
                               AND datname = '$DB' AND usename = 'wm_worker')" 60; then
    notok "set-up: no worker in $DB as wm_worker" "$(grep d365sync "$LOG" | tail -n 5)"
    exit 0
fi

# --------------------------------------------------------------------------
# 1. an inserted row reaches Dynamics with no call
# --------------------------------------------------------------------------
psqlq -c "INSERT INTO companies (name, revenue, industry) VALUES ('Contoso', 1000.50, 'Consulting')"
ms=$(sim_wait account "r.get('name') == 'Contoso' and r.get('industrycode') == 7")
diag "map insert: COMMIT -> account in Dynamics in $ms ms"
if [ "$ms" != timeout ] &&
   wait_sql "SELECT dynamics365_related_id IS NOT NULL FROM companies WHERE name = 'Contoso'" 10; then
    ok "a row inserted in a mapped table reaches Dynamics by itself after COMMIT, and is linked ($ms ms)"
else
    notok "a row inserted in a mapped table reaches Dynamics by itself after COMMIT" "got: $ms" \
        "$(status 'worker%')" "$(status 'map%')"
fi
check_runs=$(psqlq -c "SELECT count(*) FROM d365.sync_run WHERE kind = 'map:account' AND created = 1")
if [ "$check_runs" -ge 1 ]; then
    ok "the worker's run is recorded as the map's (kind map:account)"
else
    notok "the worker's run is recorded as the map's (kind map:account)" \
        "$(psqlq -c "SELECT kind, created, message FROM d365.sync_run ORDER BY id")"
fi

# --------------------------------------------------------------------------
# 2. a parent and its child in one statement: the child binds the parent
# --------------------------------------------------------------------------
psqlq >/dev/null <<'SQL'
WITH c AS (INSERT INTO companies (name) VALUES ('Fabrikam') RETURNING id)
INSERT INTO projects (title, stage, company_id) SELECT 'Rollout', 'Active', c.id FROM c;
SQL
ms=$(sim_wait new_project "r.get('new_name') == 'Rollout'")
fab=$(psqlq -c "SELECT dynamics365_related_id FROM companies WHERE name = 'Fabrikam'")
bound=$(sim_count new_project "r.get('new_name') == 'Rollout' and r.get('_new_accountid_value') == '$fab'")
if [ "$ms" != timeout ] && [ -n "$fab" ] && [ "$bound" = 1 ]; then
    ok "a child inserted with its parent in one statement is sent after it, bound to the parent's record ($ms ms)"
else
    notok "a child committed with its parent is sent after it, bound to its record" \
        "project: $ms; Fabrikam's record: $fab; bound: $bound"
fi

# --------------------------------------------------------------------------
# 3. a Dynamics edit comes back through the worker's pull
# --------------------------------------------------------------------------
psqlq -c "UPDATE d365.settings SET pull_interval = '5 seconds'" >/dev/null
if wait_sql "SELECT count(*) = 2 FROM d365.pull_state WHERE entity IN ('map:account', 'map:project')
              AND delta_link IS NOT NULL" 60; then
    contoso=$(psqlq -c "SELECT dynamics365_related_id FROM companies WHERE name = 'Contoso'")
    simctl edit account "{\"op\": \"update\", \"id\": \"$contoso\", \"values\": {\"revenue\": 2500.25}}" >/dev/null
    t0=$(now_ms)
    if wait_sql "SELECT revenue = 2500.25 FROM companies WHERE name = 'Contoso'" 60; then
        ok "a Dynamics edit of a mapped record comes back through the worker's pull ($(( $(now_ms) - t0 )) ms, pull_interval 5 s)"
    else
        notok "a Dynamics edit of a mapped record comes back through the worker's pull" \
            "$(psqlq -c "SELECT revenue FROM companies WHERE name = 'Contoso'")" "$(status 'worker%')"
    fi
else
    notok "the worker's pull takes a baseline of each map" \
        "$(psqlq -c "SELECT entity, delta_link IS NOT NULL FROM d365.pull_state")" "$(status '%')"
fi
psqlq -c "UPDATE d365.settings SET pull_interval = NULL" >/dev/null

# --------------------------------------------------------------------------
# 4. a failing map holds up neither the contacts nor another map
# --------------------------------------------------------------------------
simctl fault '{"path_regex": "new_projects", "status": 503, "times": null}' >/dev/null
psqlq >/dev/null <<'SQL'
BEGIN;
INSERT INTO projects (title, company_id) VALUES ('Blocked', 1);
INSERT INTO companies (name) VALUES ('Northwind');
INSERT INTO lead (id, name) VALUES (1, 'Ada');
COMMIT;
SQL
ms_acc=$(sim_wait account "r.get('name') == 'Northwind'")
ms_lead=$(sim_wait contact "r.get('firstname') == 'Ada'")
failing=no
wait_sql "SELECT EXISTS (SELECT FROM d365.d365_status() WHERE item = 'worker last error'
                          AND value LIKE 'map:project: %503%')" 30 && failing=yes
blocked=$(sim_count new_project "r.get('new_name') == 'Blocked'")
if [ "$ms_acc" != timeout ] && [ "$ms_lead" != timeout ] && [ "$failing" = yes ] && [ "$blocked" = 0 ]; then
    ok "Dynamics answering 503 for one map's table: the other map ($ms_acc ms) and the contact ($ms_lead ms) go, the failing map is the worker's last error"
else
    notok "a failing map holds up neither the contacts nor another map" \
        "account: $ms_acc; contact: $ms_lead; worker's error names map:project: $failing; project sent: $blocked" \
        "$(status 'worker%')"
fi
line=$(status 'map project')
case "$line" in
    "map project: 1 pending (1 to create), 0 failing"*) ok "d365_status() shows the failing map's pending row: $line" ;;
    *) notok "d365_status() shows the failing map's pending row" "$line" ;;
esac
simctl clear-faults >/dev/null
ms=$(sim_wait new_project "r.get('new_name') == 'Blocked'" 90)
if [ "$ms" != timeout ] &&
   wait_sql "SELECT NOT EXISTS (SELECT FROM d365.d365_status() WHERE item = 'worker last error')" 30; then
    ok "once Dynamics answers, the map's row goes ($ms ms after the fault ended) and the worker's last error is cleared"
else
    notok "once Dynamics answers, the map's row goes and the worker's last error is cleared" \
        "sent after: $ms" "$(status 'worker%')" "$(grep 'd365sync worker' "$LOG" | tail -n 5)"
fi
if grep -q 'd365sync worker: map:project job failed' "$LOG" &&
   grep -q 'd365sync worker: map:project job works again' "$LOG"; then
    ok "the server log says once that the map's job failed, and once that it works again"
else
    notok "the server log says that the map's job failed and works again" "$(grep 'd365sync worker' "$LOG" | tail -n 5)"
fi

# a choice label that is not an option fails the row, not the map
psqlq >/dev/null <<'SQL'
UPDATE projects SET stage = 'Done' WHERE title = 'Rollout';
INSERT INTO companies (name) VALUES ('Tailspin');
INSERT INTO lead (id, name) VALUES (2, 'Bob');
SQL
ms_acc=$(sim_wait account "r.get('name') == 'Tailspin'")
ms_lead=$(sim_wait contact "r.get('firstname') == 'Bob'")
if wait_sql "SELECT EXISTS (SELECT FROM d365.d365_status() WHERE item = 'last row error of map project'
              AND value LIKE '%''Done'' is not an option of new_stage (column stage); allowed: %')" 30 &&
   [ "$ms_acc" != timeout ] && [ "$ms_lead" != timeout ]; then
    ok "a label that is not an option: d365_status() names the map's row and why; the other map and the contacts go"
else
    notok "a label that is not an option fails the row, not the other jobs" \
        "account: $ms_acc; contact: $ms_lead" "$(status '%map project')"
fi
psqlq -c "UPDATE projects SET stage = 'Completed' WHERE title = 'Rollout'" >/dev/null
if wait_sql "SELECT NOT EXISTS (SELECT FROM d365.d365_status() WHERE item LIKE 'last % error of map project')" 30; then
    ok "... and the map's error lines are gone once the row is sent"
else
    notok "... and the map's error lines are gone once the row is sent" "$(status '%map project')"
fi

# --------------------------------------------------------------------------
# 5. a disabled map is not sent; "contact" is never a map job
# --------------------------------------------------------------------------
psqlq >/dev/null <<'SQL'
UPDATE d365.table_map SET enabled = false WHERE name = 'project';
INSERT INTO projects (title, company_id) VALUES ('Paused', 1);
INSERT INTO companies (name) VALUES ('Adatum');
SQL
ms=$(sim_wait account "r.get('name') == 'Adatum'")
sleep 2
paused=$(sim_count new_project "r.get('new_name') == 'Paused'")
line=$(status 'map project')
if [ "$ms" != timeout ] && [ "$paused" = 0 ] &&
   [ "$(psqlq -c "SELECT dynamics365_related_id IS NULL FROM projects WHERE title = 'Paused'")" = t ]; then
    ok "a disabled map is not sent while the other map is (status: $line)"
else
    notok "a disabled map is not sent" "account: $ms; paused project in Dynamics: $paused" "$line"
fi
psqlq >/dev/null <<'SQL'
UPDATE d365.table_map SET enabled = true WHERE name = 'project';
INSERT INTO companies (name) VALUES ('Litware');
SQL
ms=$(sim_wait new_project "r.get('new_name') == 'Paused'" 60)
if [ "$ms" != timeout ]; then
    ok "enabled again, its pending row goes ($ms ms)"
else
    notok "enabled again, its pending row goes" "$(status 'map project')"
fi
got=$(psqlq <<'SQL'
SELECT string_agg(name || '/' || enabled, ',' ORDER BY name) FROM d365.table_map;
SELECT string_agg(name, ',' ORDER BY name) FROM d365._map_jobs(true);
SELECT string_agg(name, ',' ORDER BY name) FROM d365._map_jobs(false);
SELECT count(*) FROM d365.sync_run WHERE kind IN ('map:contact', 'map-pull:contact');
SQL
)
if [ "$(echo "$got" | tr '\n' ' ')" = "account/true,contact/true,project/true account,project account,project 0 " ]; then
    ok "the map contact (the attached contact table) is not a map job: the contact jobs run it, once"
else
    notok "the map contact is not a map job" "$got"
fi

# --------------------------------------------------------------------------
# 6. an operator schedules the map jobs with pg_cron; the runs succeed
# --------------------------------------------------------------------------
last_run=$(psqlq -c "SELECT coalesce(max(id), 0) FROM d365.sync_run")
psqlq >"$TMPD/cron.log" 2>&1 <<'SQL'
UPDATE d365.settings SET realtime = false;
INSERT INTO companies (name) VALUES ('Cron Company');
SET ROLE wm_operator;
SELECT job_name || ' ' || schedule || ' ' || command
  FROM d365.d365_schedule(contacts => NULL, activities => NULL, maps => '* * * * *', map_pull => '* * * * *');
RESET ROLE;
SQL
check=$(psqlq -c "SELECT string_agg(username || ' ' || jobname || ' ' || command, '; ' ORDER BY jobname) FROM cron.job")
if [ "$check" = "wm_operator d365-map-pull CALL d365.d365_run_job('map-pull'); wm_operator d365-map-sync CALL d365.d365_run_job('maps')" ]; then
    ok "the operator schedules the map jobs with d365_schedule(maps =>, map_pull =>)"
else
    notok "the operator schedules the map jobs with d365_schedule()" "$check" "$(cat "$TMPD/cron.log")"
fi
if wait_sql "SELECT count(DISTINCT j.jobname) = 2 FROM cron.job_run_details d JOIN cron.job j USING (jobid)
              WHERE d.status IN ('succeeded', 'failed')" 150; then
    runs=$(psqlq -c "SELECT string_agg(DISTINCT j.jobname || ' ' || d.status || ' as ' || d.username, '; ')
                       FROM cron.job_run_details d JOIN cron.job j USING (jobid)")
    if [ "$runs" = "d365-map-pull succeeded as wm_operator; d365-map-sync succeeded as wm_operator" ] &&
       [ "$(psqlq -c "SELECT dynamics365_related_id IS NOT NULL FROM companies WHERE name = 'Cron Company'")" = t ]; then
        ok "pg_cron's runs of the operator's map jobs succeed, and sent the new company"
    else
        notok "pg_cron's runs of the operator's map jobs succeed" "$runs" \
            "$(psqlq -c "SELECT return_message FROM cron.job_run_details")" \
            "$(psqlq -c "SELECT kind, created, updated, failed, message FROM d365.sync_run WHERE id > $last_run")" \
            "$(psqlq -c "SELECT * FROM companies")"
    fi
else
    notok "pg_cron's runs of the operator's map jobs succeed" "no run in 150 s" "$(grep -i cron "$LOG" | tail -n 5)"
fi
kinds=$(psqlq -c "SELECT string_agg(DISTINCT kind, ',') FROM d365.sync_run WHERE id > $last_run")
skipped=$(psqlq -c "SELECT count(*) FROM d365.sync_run WHERE id > $last_run AND message LIKE 'skipped:%'")
case "$kinds" in
    *map-pull:account*map-pull:project*map:account*map:project*)
        if [ "$skipped" = 0 ]; then
            ok "the scheduled runs are the maps' own (kinds $kinds); the sync and the pull scheduled at the same minute wait for one another, none skipped"
        else
            notok "the sync and the pull scheduled at the same minute skip none of their maps" \
                "$(psqlq -c "SELECT kind, message FROM d365.sync_run WHERE id > $last_run")"
        fi ;;
    *) notok "the scheduled runs are the maps' own" "$kinds" ;;
esac
psqlq -c "SET ROLE wm_operator" -c "SELECT d365.d365_unschedule()" >/dev/null 2>&1

# a broken map fails the map job, not the other maps
psqlq >/dev/null <<'SQL'
ALTER TABLE projects RENAME COLUMN stage TO stage_gone;
INSERT INTO companies (name) VALUES ('By Hand');
SQL
out=$(PSQL_STOP=0 psqlq -c "SET ROLE wm_operator" -c "CALL d365.d365_run_job('maps')" 2>&1)
if grep -q 'ERROR:  d365sync maps run failed: map project: ' <<<"$out" &&
   [ "$(psqlq -c "SELECT dynamics365_related_id IS NOT NULL FROM companies WHERE name = 'By Hand'")" = t ]; then
    ok "CALL d365_run_job('maps') with a broken map: the other map's run is committed, the error names the map"
else
    notok "CALL d365_run_job('maps') with a broken map: the other map's run is committed, the error names the map" \
        "$out" "$(psqlq -c "SELECT kind, message FROM d365.sync_run ORDER BY id DESC LIMIT 3")"
fi
psqlq -c "ALTER TABLE projects RENAME COLUMN stage_gone TO stage" >/dev/null

# --------------------------------------------------------------------------
# 7. the update from 0.2 keeps the grants made on d365_schedule()
# --------------------------------------------------------------------------
t_create_db d365wmaps_upd
got=$(PSQL_DB=d365wmaps_upd psqlq 2>&1 <<'SQL'
CREATE EXTENSION d365sync VERSION '0.2';
GRANT EXECUTE ON FUNCTION d365.d365_schedule(text, text, text) TO wm_operator WITH GRANT OPTION;
ALTER EXTENSION d365sync UPDATE;
SELECT has_function_privilege('wm_operator', 'd365.d365_schedule(text, text, text, text, text)', 'EXECUTE WITH GRANT OPTION'),
       has_function_privilege('wm_worker', 'd365.d365_schedule(text, text, text, text, text)', 'EXECUTE');
SQL
)
if [ "$got" = "t|f" ]; then
    ok "the update from 0.2 gives the grants made on d365_schedule(contacts, activities, pull) to the new d365_schedule()"
else
    notok "the update from 0.2 keeps the grants made on d365_schedule()" "$got"
fi
PSQL_DB=postgres psqlq -c "DROP DATABASE d365wmaps_upd" >/dev/null 2>&1

if grep -q 'sim-secret' "$LOG"; then
    notok "the client secret appears nowhere in the server log"
else
    ok "the client secret appears nowhere in the server log"
fi
