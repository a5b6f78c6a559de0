#!/usr/bin/env bash
# test/progress.sh: a run's progress from shared memory, on a cluster of its
# own with shared_preload_libraries = 'pg_cron,d365sync' (the regression
# suite "operations" tests the path without the preload, through
# pg_stat_activity).
#
# scripts/test.sh runs it with the simulator it started (D365_SIM_URL and
# D365_SIMCTL exported); run alone it starts one:
#   bash test/progress.sh                    # builds and installs first
#   D365_SKIP_BUILD=1 bash test/progress.sh  # uses the installed extension
#
# A slow contact run (one contact per request, each answered after 500 ms)
# runs in one session; another session reads d365.run_progress and
# d365_status().  Prints "ok N - ..." / "not ok N - ..." and always exits 0.
set -uo pipefail

DB=d365progress
BG_PID=
. "$(dirname "$0")/lib.sh"
t_begin progress
t_on_exit() { [ -z "$BG_PID" ] || { kill "$BG_PID" 2>/dev/null; wait "$BG_PID" 2>/dev/null; }; }
t_preloaded "$DB" || exit 0

simctl reset >/dev/null
t_create_db "$DB"
if ! psqlq >"$TMPD/setup.log" 2>&1 <<SQL
$(t_configure_sql)
UPDATE d365.settings SET contact_sync_enabled = true, min_score = 10;
CREATE TABLE person (id integer PRIMARY KEY, email text, score integer NOT NULL);
INSERT INTO person SELECT g, 'p' || g || '@example.com', 50 FROM generate_series(1, 5) g;
SELECT d365.d365_attach_contacts('person');
INSERT INTO d365.field_map VALUES ('email', 'emailaddress1');
SQL
then
    notok "set-up: configuring d365sync failed" "$(tail -n 5 "$TMPD/setup.log")"
    exit 0
fi
"$D365_SIMCTL" fault '{"method": "PATCH", "delay_ms": 500, "times": null}' >/dev/null

PGAPPNAME=progress_run psql -X -q -At -d "$DB" >"$TMPD/run.out" 2>&1 <<'SQL' &
SET d365sync.batch_size = 1;
SET d365sync.max_parallel = 1;
SELECT created, failed FROM d365.d365_sync_contacts();
SQL
BG_PID=$!

seen=
for i in $(seq 1 200); do
    seen=$(psqlq -c "SELECT kind, source, done + failed + coalesce(remaining, -1000), requests > done,
                            pid = (SELECT pid FROM pg_stat_activity WHERE application_name = 'progress_run')
                       FROM d365.run_progress WHERE done >= 1" 2>&1)
    [ -n "$seen" ] && break
    sleep 0.1
done
status=$(psqlq -c "SELECT value FROM d365.d365_status() WHERE item = 'running: contacts'" 2>&1)
if [ "$seen" = "contacts|shared memory|5|t|t" ]; then
    ok "another session sees the run's progress from shared memory (done + failed + remaining = 5 contacts)"
else
    notok "progress from shared memory" "seen: $seen"
fi
if [[ "$status" =~ ^since\ .*\ \(pid\ [0-9]+\):\ [0-9]+\ done,\ 0\ failed,\ [0-9]+\ remaining ]]; then
    ok "d365_status() shows the run in progress: $status"
else
    notok "d365_status() shows the run in progress" "value: $status"
fi
wait "$BG_PID"
BG_PID=
"$D365_SIMCTL" clear-faults >/dev/null
after=$(psqlq -c "SELECT count(*) FROM d365.run_progress" 2>&1)
if [ "$(cat "$TMPD/run.out")" = "5|0" ] && [ "$after" = 0 ]; then
    ok "the run created its 5 contacts and, once over, left no progress slot behind"
else
    notok "the run's end" "run: $(cat "$TMPD/run.out")" "progress rows after: $after"
fi

# a run that ends in an error (a cancel) gives its slot back too
psqlq -c "UPDATE person SET email = 'new' || email" >/dev/null
"$D365_SIMCTL" fault '{"method": "PATCH", "delay_ms": 500, "times": null}' >/dev/null
PGAPPNAME=progress_cancel psql -X -q -At -d "$DB" >"$TMPD/cancel.out" 2>&1 <<'SQL' &
SET d365sync.batch_size = 1;
SET d365sync.max_parallel = 1;
SELECT created, updated FROM d365.d365_sync_contacts();
SQL
BG_PID=$!
running=
for i in $(seq 1 200); do
    running=$(psqlq -c "SELECT count(*) FROM d365.run_progress WHERE done >= 1" 2>&1)
    [ "$running" = 1 ] && break
    sleep 0.1
done
psqlq -c "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE application_name = 'progress_cancel'" >/dev/null
wait "$BG_PID"
BG_PID=
"$D365_SIMCTL" clear-faults >/dev/null
after=$(psqlq -c "SELECT count(*) FROM d365.run_progress" 2>&1)
if [ "$running" = 1 ] && grep -q "canceling statement" "$TMPD/cancel.out" && [ "$after" = 0 ]; then
    ok "a cancelled run's progress is gone with it"
else
    notok "a cancelled run's progress is gone with it" "seen running: $running" \
        "session: $(cat "$TMPD/cancel.out")" "progress rows after: $after"
fi

# a run cancelled inside a PL/pgSQL block that catches the cancel: its
# progress goes with the block's subtransaction, not at the end of the
# transaction
psqlq -c "UPDATE person SET email = 'again' || email" >/dev/null
"$D365_SIMCTL" fault '{"method": "PATCH", "delay_ms": 500, "times": null}' >/dev/null
caught=$(psql -X -q -At -d "$DB" 2>&1 <<'SQL'
SET d365sync.batch_size = 1;
SET d365sync.max_parallel = 1;
SET statement_timeout = '1500ms';
DO $$
DECLARE
    n bigint;
BEGIN
    BEGIN
        PERFORM d365.d365_sync_contacts();
    EXCEPTION WHEN query_canceled THEN
        NULL;
    END;
    SELECT count(*) INTO n FROM d365.run_progress WHERE pid = pg_backend_pid();
    RAISE NOTICE 'progress rows left: %', n;
END;
$$;
SQL
)
"$D365_SIMCTL" clear-faults >/dev/null
if [ "$caught" = "NOTICE:  progress rows left: 0" ]; then
    ok "a run cancelled inside a block that catches the cancel leaves no progress behind"
else
    notok "a run cancelled inside a block that catches the cancel leaves no progress behind" "$caught"
fi
