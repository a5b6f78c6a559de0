#!/usr/bin/env bash
# test/redteam.sh: attacks on the background worker, on a cluster of its own
# with shared_preload_libraries = 'pg_cron,d365sync'.
#
# The worker connects as the bootstrap superuser.  Whatever the database's
# owner may configure must not turn it against the database:
#   - ALTER DATABASE ... SET search_path = public, pg_catalog with functions
#     planted in public under the exact signatures of pg_catalog's
#     (to_jsonb(anyelement), now()): the worker parsed its own statements
#     with that search_path, ran the planted code as the superuser and
#     handed it the settings row, client secret included;
#   - a pull_interval of centuries overflowed the time of the next pull, and
#     the worker pulled at every pass.
#
# scripts/test.sh runs it with the simulator it started; run alone it
# starts one:
#   bash test/redteam.sh                    # builds and installs first
#   D365_SKIP_BUILD=1 bash test/redteam.sh  # uses the installed extension
#
# Prints "ok N - ..." / "not ok N - ..." lines and always exits 0.
set -uo pipefail

DB=d365redteam
. "$(dirname "$0")/lib.sh"
t_begin redteam
t_preloaded "$DB" || exit 0

t_create_db "$DB" || { notok "set-up: CREATE DATABASE failed"; exit 0; }
{ t_configure_sql; cat <<'SQL'; } | psqlq >"$TMPD/setup.log" 2>&1 || { notok "set-up: configuring failed" "$(tail -n 5 "$TMPD/setup.log")"; exit 0; }
UPDATE d365.settings SET contact_sync_enabled = true, min_score = 10;
CREATE TABLE lead (id integer PRIMARY KEY, name text, score integer NOT NULL DEFAULT 50);
SELECT d365.d365_attach_contacts('lead');
INSERT INTO d365.field_map VALUES ('name', 'firstname');
-- the database's owner (not a superuser) plants pg_catalog look-alikes in
-- public and puts public first in the database's search_path
CREATE ROLE regress_rt_dbowner;
ALTER DATABASE d365redteam OWNER TO regress_rt_dbowner;
GRANT ALL ON SCHEMA public TO regress_rt_dbowner;
SET ROLE regress_rt_dbowner;
CREATE TABLE public.planted_log (what text, who name, su boolean, seen text);
GRANT ALL ON public.planted_log TO PUBLIC;
CREATE FUNCTION public.to_jsonb(x anyelement) RETURNS jsonb LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.planted_log
    SELECT 'to_jsonb', current_user, r.rolsuper, left(x::text, 500)
      FROM pg_catalog.pg_roles r WHERE r.rolname = current_user;
    RETURN pg_catalog.to_jsonb(x);
END $$;
CREATE FUNCTION public.now() RETURNS timestamptz LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.planted_log
    SELECT 'now', current_user, r.rolsuper, NULL
      FROM pg_catalog.pg_roles r WHERE r.rolname = current_user;
    RETURN pg_catalog.now();
END $$;
ALTER DATABASE d365redteam SET search_path = public, pg_catalog;
RESET ROLE;
UPDATE d365.settings SET realtime = true;
SQL

# the worker reads the database's settings when it connects: connect anew
wait_worker || { notok "set-up: no worker in $DB"; exit 0; }
old=$WORKER_PID
PSQL_DB=postgres psqlq -c "SELECT pg_terminate_backend($old)" >/dev/null
wait_worker "$old" || { notok "set-up: the worker did not come back"; exit 0; }

# --------------------------------------------------------------------------
# 1. the database's search_path does not reach the worker's statements
# --------------------------------------------------------------------------
psqlq -c "INSERT INTO lead (id, name) VALUES (1, 'Wendy')"
if wait_sql "SELECT dynamics365_related_id IS NOT NULL FROM lead WHERE id = 1"; then
    planted=$(psqlq -c "SELECT count(*) FROM public.planted_log")
    secret=$(psqlq -c "SELECT count(*) FROM public.planted_log WHERE seen LIKE '%sim-secret%'")
    path=$(psqlq -c "SELECT setting FROM pg_settings WHERE name = 'search_path'")
    if [ "$planted" = 0 ]; then
        ok "ALTER DATABASE SET search_path: the worker sent the contact and ran none of the planted functions (sessions still get: $path)"
    else
        notok "ALTER DATABASE SET search_path: the worker ran planted code $planted times, $secret of them with the client secret" \
            "$(psqlq -c "SELECT what || ' as ' || who || ' su=' || su FROM public.planted_log LIMIT 3")"
    fi
else
    notok "ALTER DATABASE SET search_path: the worker did not send the contact" \
        "$(tail -n 5 "$D365_WORK/postgres.log")"
fi
psqlq -c "ALTER DATABASE $DB RESET search_path"

# --------------------------------------------------------------------------
# 2. a pull_interval of centuries: one pull, then none for a long time
# --------------------------------------------------------------------------
psqlq -c "UPDATE d365.settings SET realtime = false, pull_interval = '178000000 years'"
if wait_sql "SELECT value <> '(none yet)' FROM d365.d365_status() WHERE item = 'worker last pull'"; then
    first=$(psqlq -c "SELECT value FROM d365.d365_status() WHERE item = 'worker last pull'")
    # wake the worker a few times: each pass looks at the next pull's time
    for i in 1 2 3 4; do
        sleep 2
        psqlq -c "UPDATE d365.settings SET min_score = 10 + $i"
    done
    sleep 1
    last=$(psqlq -c "SELECT value FROM d365.d365_status() WHERE item = 'worker last pull'")
    if [ "$first" = "$last" ]; then
        ok "pull_interval of 178000000 years: one pull, none at the passes after it"
    else
        notok "pull_interval of 178000000 years: pulled again ($first, then $last)"
    fi
else
    notok "pull_interval of 178000000 years: no first pull"
fi
psqlq -c "UPDATE d365.settings SET pull_interval = NULL"

# the worker is still there, and the server never restarted
if [ -n "$(worker_pid)" ] && ! grep -q "terminated by signal" "$D365_WORK/postgres.log"; then
    ok "the worker runs on, no backend crashed"
else
    notok "the worker is gone or a backend crashed" "$(grep -m 3 'terminated by signal' "$D365_WORK/postgres.log")"
fi
