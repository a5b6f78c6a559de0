#!/usr/bin/env bash
# test/server.sh: d365sync on a hot standby and after the postmaster's
# death, on a cluster of its own with shared_preload_libraries =
# 'pg_cron,d365sync' (the primary) and a streaming standby made from it
# with pg_basebackup -R.
#
#   1. on the standby every function that talks to Dynamics refuses with
#      SQLSTATE 25006 before its first request (the simulator's request
#      log does not move), no worker runs there, and d365_status() says
#      the server is a standby;
#   2. kill -9 of the postmaster while the worker sends a backlog to a slow
#      simulator: the worker exits within a second or two, the simulator's
#      request log stops growing, pg_ctl start works at once, and the
#      restarted worker sends the rest, nothing twice.  Times are printed
#      as "# ..." lines.
#
# scripts/test.sh runs it with the simulator it started; run alone it
# starts one:
#   bash test/server.sh                    # builds and installs first
#   D365_SKIP_BUILD=1 bash test/server.sh  # uses the installed extension
#
# Prints "ok N - ..." / "not ok N - ..." lines and always exits 0.
set -uo pipefail

DB=d365server
STANDBY_PORT=5433
. "$(dirname "$0")/lib.sh"
t_begin server
t_on_exit() {
    [ -n "${STANDBY:-}" ] && [ -f "$STANDBY/postmaster.pid" ] &&
        (cd "$D365_WORK" && runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$STANDBY" -m immediate stop >/dev/null 2>&1)
}
t_preloaded "$DB" || exit 0

# on_standby [psql args]: psql on the standby's copy of $DB, verbose errors
on_standby() {
    timeout 60 psql -X -q -At -P pager=off -v VERBOSITY=verbose -p "$STANDBY_PORT" -d "$DB" "$@"
}

# requests_since SEQ: entries of the simulator's request log after SEQ
requests_since() {
    simctl requests --since "$1" | /usr/bin/python3 -c 'import json, sys; print(len(json.load(sys.stdin)["requests"]))'
}

simctl reset >/dev/null
t_create_db "$DB" || { notok "set-up: CREATE DATABASE failed"; exit 0; }
{ t_configure_sql; cat <<'SQL'; } | psqlq >"$TMPD/setup.log" 2>&1 || { notok "set-up: configuring failed" "$(tail -n 5 "$TMPD/setup.log")"; exit 0; }
UPDATE d365.settings SET contact_sync_enabled = true, min_score = 10, activity_sync_enabled = true;
CREATE TABLE person (id integer PRIMARY KEY, email text, last_name text,
                     score integer NOT NULL DEFAULT 50);
SELECT d365.d365_attach_contacts('person');
INSERT INTO d365.field_map VALUES ('email', 'emailaddress1'), ('last_name', 'lastname');
INSERT INTO person (id, email, last_name) VALUES (1, 'ada@server.example', 'Lovelace'),
                                                 (2, 'alan@server.example', 'Turing');
SELECT created FROM d365.d365_sync_contacts();
SELECT d365.d365_log_activity(1, 'task', 'Waiting on the primary');
-- pending on the standby: a new contact and an edit
INSERT INTO person (id, email, last_name) VALUES (3, 'grace@server.example', 'Hopper');
UPDATE person SET last_name = 'King' WHERE id = 1;
SQL

# --------------------------------------------------------------------------
# 1. a streaming standby
# --------------------------------------------------------------------------
STANDBY=$D365_WORK/standby
if ! (cd "$D365_WORK" && runuser -u postgres -- "$PG_BIN/pg_basebackup" -D "$STANDBY" -R -X stream \
        --checkpoint=fast -h "$PGHOST" -p "$PGPORT" -U postgres) >"$TMPD/basebackup.log" 2>&1; then
    notok "set-up: pg_basebackup failed" "$(tail -n 5 "$TMPD/basebackup.log")"
    exit 0
fi
echo "port = $STANDBY_PORT" >>"$STANDBY/postgresql.auto.conf"
if ! (cd "$D365_WORK" && runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$STANDBY" -w \
        -l "$D365_WORK/standby.log" start) >/dev/null 2>&1; then
    notok "set-up: the standby did not start" "$(tail -n 5 "$D365_WORK/standby.log")"
    exit 0
fi
for i in $(seq 1 100); do
    [ "$(on_standby -c "SELECT pg_is_in_recovery() AND EXISTS (SELECT FROM person WHERE id = 3)" 2>/dev/null)" = t ] && break
    sleep 0.2
done

seq0=$(simctl last-seq)
out=$(on_standby 2>&1 <<'SQL'
SELECT d365.d365_sync_contact(3);
SELECT * FROM d365.d365_sync_contacts();
SELECT * FROM d365.d365_pull_changes();
SELECT * FROM d365.d365_sync_activities();
SELECT * FROM d365.d365_whoami();
CALL d365.d365_run_job('contacts');
SQL
)
sent=$(requests_since "$seq0")
refusals=$(grep -c '^ERROR:  25006: d365sync sends nothing to Dynamics 365 from a server in recovery$' <<<"$out")
hint=$(grep -c '^HINT:  Run the sync on the primary server' <<<"$out")
workers=$(on_standby -c "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'd365sync worker'" 2>&1)
status=$(on_standby -c "SELECT value FROM d365.d365_status() WHERE item = 'worker'" 2>&1)
diag "standby: $refusals refusals, $sent requests in the simulator's log, worker on the standby: $workers"
if [ "$refusals" = 6 ] && [ "$hint" = 6 ] && [ "$sent" = 0 ] && [ "$workers" = 0 ]; then
    ok "on a streaming standby sync_contact, sync_contacts, pull_changes, sync_activities, whoami and run_job refuse (25006) and send nothing; no worker runs there"
else
    notok "on a standby nothing is sent" "refusals: $refusals (hints $hint), requests: $sent, workers: $workers" "$out"
fi
if [[ "$status" == "not running: this server is a hot standby (in recovery); nothing is sent"* ]]; then
    ok "d365_status() on the standby says so: $status"
else
    notok "d365_status() on the standby says it is a standby" "$status"
fi
(cd "$D365_WORK" && runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$STANDBY" -m fast stop >/dev/null 2>&1)

# --------------------------------------------------------------------------
# 2. the postmaster killed while the worker sends a backlog
# --------------------------------------------------------------------------
psqlq >"$TMPD/backlog.log" 2>&1 <<'SQL'
SELECT created FROM d365.d365_sync_contacts();
INSERT INTO person (id, email, last_name)
SELECT g, 'p' || g || '@server.example', 'Backlog' FROM generate_series(100, 3099) g;
ALTER SYSTEM SET d365sync.batch_size = 10;
SELECT pg_reload_conf();
SQL
# every $batch answered after 300 ms
simctl fault '{"path_regex": "\\$batch", "scope": "outer", "delay_ms": 300, "times": null}' >/dev/null
wait_worker || { notok "set-up: no worker in $DB"; exit 0; }
psqlq -c "UPDATE d365.settings SET realtime = true" >/dev/null
sending=no
for i in $(seq 1 150); do
    [ "$(psqlq -c "SELECT count(*) > 200 FROM person WHERE dynamics365_related_id IS NOT NULL")" = t ] && { sending=yes; break; }
    sleep 0.2
done
pm=$(head -n 1 "$PGDATA/postmaster.pid")
wpid=$(worker_pid)
kill -9 "$pm"
t0=$(now_ms)
gone=timeout
for i in $(seq 1 1000); do
    # gone, or a zombie (exited; its new parent has not reaped it yet)
    st=$(awk '{print $3}' "/proc/$wpid/stat" 2>/dev/null)
    [ -z "$st" ] || [ "$st" = Z ] && { gone=$(( $(now_ms) - t0 )); break; }
    sleep 0.01
done
sleep 0.5
s1=$(simctl last-seq)
sleep 3
s2=$(simctl last-seq)
# pg_ctl start as soon as it works (every 0.5 s, for 20 s)
started=timeout
tries=none
for i in $(seq 1 40); do
    if (cd "$D365_WORK" && runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PGDATA" -w \
            -l "$D365_WORK/postgres.log" start) >"$TMPD/start.out" 2>&1; then
        started=$(( $(now_ms) - t0 ))
        tries=$i
        break
    fi
    sleep 0.5
done
diag "postmaster killed (worker $wpid sending: $sending): worker gone after $gone ms; simulator log +$(( s2 - s1 )) entries between 0.5 s and 3.5 s after; pg_ctl start worked $started ms after the kill (attempt $tries, begun after 3.5 s of watching the log)"
if [ "$sending" = yes ] && [ "$gone" != timeout ] && [ "$gone" -le 2000 ] && [ "$s1" = "$s2" ]; then
    ok "kill -9 of the postmaster: the worker exits in $gone ms and sends nothing more"
else
    notok "kill -9 of the postmaster: the worker exits within 2 s and sends nothing more" \
        "sending: $sending; gone after: $gone ms; simulator log $s1 -> $s2"
fi
if [ "$started" != timeout ] && [ "$started" -le 10000 ]; then
    ok "pg_ctl start works $started ms after the postmaster was killed"
else
    notok "pg_ctl start works soon after the postmaster was killed" "$(tail -n 5 "$TMPD/start.out")"
fi

# the restarted worker sends the rest, nothing twice
simctl clear-faults >/dev/null
wait_server
done_all=no
for i in $(seq 1 300); do
    [ "$(psqlq -c "SELECT count(*) FROM person WHERE dynamics365_related_id IS NULL" 2>/dev/null)" = 0 ] && { done_all=yes; break; }
    sleep 0.2
done
remote=$(simctl rows contact | /usr/bin/python3 -c '
import json, sys
rows = json.load(sys.stdin)["value"]
print(len(rows), len(rows) - len({r.get("emailaddress1") for r in rows}))')
if [ "$done_all" = yes ] && [ "$remote" = "3003 0" ]; then
    ok "after the restart the worker sends the rest of the backlog: 3,003 contacts in the simulator, none twice"
else
    notok "after the restart the worker sends the rest of the backlog, none twice" \
        "all linked: $done_all; simulator contacts, duplicates: $remote"
fi
