#!/usr/bin/env bash
# test/faults.sh: contact and activity sync under faults, against the
# Dataverse simulator.  scripts/test.sh runs it after pg_regress with the
# cluster and the simulator it started (PGHOST, PGPORT, PGUSER, D365_SIM_URL,
# D365_SIMCTL exported); run alone it starts its own through scripts/lib.sh:
#   bash test/faults.sh                    # builds and installs first
#   D365_SKIP_BUILD=1 bash test/faults.sh  # uses the installed extension
#
# Scenarios: a 429 storm, 500/503 bursts, request timeouts, malformed JSON
# and HTML error pages, a token expiring mid-run, pg_cancel_backend mid-run,
# SIGKILL of the backend mid-run, two runs at once, activities under faults.
# After each one it checks, from SQL and from the simulator's rows: no
# duplicate remote record, no lost local contact, every failure visible.
#
# Prints one "ok N - ..." or "not ok N - ..." line per scenario, diagnostics
# as "# ..." lines, and always exits 0 (the lines are what count).  Every
# step that could block runs under timeout.
set -uo pipefail

DB=d365faults
NSCEN=9
. "$(dirname "$0")/lib.sh"
t_begin faults
t_standalone || exit 0
export PGHOST PGPORT PGUSER D365_SIM_URL D365_SIMCTL

# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
# (psqlq, simctl, diag, now_ms, wait_server: test/lib.sh)

# sim_stat PYEXPR: a value of "simctl stats" (s is the parsed JSON).
sim_stat() {
    simctl stats | /usr/bin/python3 -c "import json,sys; s=json.load(sys.stdin); print($1)"
}

PROBLEMS=()
SCEN_N=0
SCEN_DESC=
fail() { PROBLEMS+=("$*"); }

begin() {
    SCEN_N=$1
    SCEN_DESC=$2
    PROBLEMS=()
    SCEN_T0=$(now_ms)
}

finish() {
    local p secs
    secs=$(( ($(now_ms) - SCEN_T0) ))
    if [ "${#PROBLEMS[@]}" -eq 0 ]; then
        echo "ok $SCEN_N - $SCEN_DESC"
    else
        echo "not ok $SCEN_N - $SCEN_DESC"
        for p in "${PROBLEMS[@]:0:20}"; do
            diag "$p"
        done
        [ "${#PROBLEMS[@]}" -gt 20 ] && diag "... and $(( ${#PROBLEMS[@]} - 20 )) more problems"
    fi
    diag "scenario $SCEN_N took $(( secs / 1000 )).$(printf '%03d' $(( secs % 1000 ))) s"
}

# fresh: simulator back to its seed state (no rows, faults, throttling or
# changed config) and every local contact unlinked with a clean state.
fresh() {
    simctl clear-faults >/dev/null 2>&1
    simctl reset || return 1
    psqlq <<'SQL'
UPDATE fault_contact SET dynamics365_related_id = NULL, dynamics365_synchronized_on = NULL;
TRUNCATE d365.contact_state;
INSERT INTO d365.contact_state (contact_key) SELECT id::text FROM fault_contact;
DELETE FROM d365.activity;
UPDATE d365.settings SET activity_sync_enabled = false, contact_sync_enabled = true;
SQL
}

# clear_sim_faults: no fault rule, the start-up config (latency, lifetime).
clear_sim_faults() {
    simctl clear-faults || return 1
    simctl config '{"latency_ms": 0, "per_record_ms": 0, "token_lifetime": 3599}' >/dev/null
}

# wait_sim_idle: until no Web API request since $1 (a log seq) is still being
# handled (a request the client gave up on may still run in the simulator).
wait_sim_idle() {
    local since=${1:-0} i
    for i in $(seq 1 100); do
        simctl requests --since "$since" --kind api --copy 2>/dev/null |
            /usr/bin/python3 -c '
import json, sys
busy = [1 for l in sys.stdin if l.strip() and json.loads(l.replace("\\\\", "\\")).get("status") is None]
sys.exit(1 if busy else 0)' && return 0
        sleep 0.1
    done
    return 1
}

# sync_contacts [PRE_SQL]: one d365_sync_contacts() in a new session;
# prints created|updated|unchanged|failed|unlinked|requests.
sync_contacts() {
    psqlq <<SQL
${1:-}
SELECT created, updated, unchanged, failed, unlinked, requests FROM d365.d365_sync_contacts();
SQL
}

# last_run KIND: id|created|failed|requests|throttled|message of the last run.
last_run() {
    psqlq -c "SELECT id, created, failed, requests, throttled, coalesce(message, '') FROM d365.sync_run WHERE kind = '$1' ORDER BY id DESC LIMIT 1"
}

last_run_id() {
    psqlq -c "SELECT coalesce(max(id), 0) FROM d365.sync_run"
}

# check_contacts final|midrun: the invariants, from SQL and the simulator's
# rows; every violation becomes a problem of the scenario.
#   always: no email twice in the simulator; every link points to a
#           simulator contact with that contact's email; nothing below
#           min_score is linked
#   final:  as many simulator contacts as linked local ones; every
#           qualifying contact linked
#   midrun: every qualifying contact that is not linked has its failure
#           recorded (attempts > 0 and last_error)
check_contacts() {
    local final=false out line
    [ "$1" = final ] && final=true
    wait_sim_idle "${SCEN_SEQ:-0}" || fail "the simulator was still handling requests after 10 s"
    out=$(psqlq -v "final=$final" 2>&1 <<'SQL'
TRUNCATE sim_rows;
\copy sim_rows(j) from program '"$D365_SIMCTL" rows contact --copy'
SELECT p FROM faults_problems(:final) p;
SQL
    ) || { fail "the invariant check failed: $out"; return; }
    while IFS= read -r line; do
        [ -n "$line" ] && fail "$line"
    done <<<"$out"
}

# check_activities: every activity synced once, nothing twice in Dynamics.
check_activities() {
    local out line
    wait_sim_idle "${SCEN_SEQ:-0}" || fail "the simulator was still handling requests after 10 s"
    out=$(psqlq 2>&1 <<'SQL'
TRUNCATE sim_act;
\copy sim_act(j) from program '"$D365_SIMCTL" rows phonecall --copy'
SELECT p FROM activity_problems() p;
SQL
    ) || { fail "the activity check failed: $out"; return; }
    while IFS= read -r line; do
        [ -n "$line" ] && fail "$line"
    done <<<"$out"
}

# bg_psql NAME SQL: run SQL in a background psql session whose backend has
# application_name faults_NAME; sets BG_PID (output in $TMPD/NAME.*).
bg_psql() {
    local name=$1 sql=$2
    printf '%s\n' "$sql" >"$TMPD/$name.sql"
    PGAPPNAME="faults_$name" timeout 60 psql -X -q -At -v ON_ERROR_STOP=1 -v VERBOSITY=verbose \
        -P pager=off -d "$DB" -f "$TMPD/$name.sql" >"$TMPD/$name.out" 2>"$TMPD/$name.err" &
    BG_PID=$!
    BG_PIDS+=("$BG_PID")
}

# backend_of NAME: the pid of faults_NAME's backend once it runs a sync
# (up to 10 s); empty when it never did.
backend_of() {
    local i pid
    for i in $(seq 1 200); do
        pid=$(timeout 10 psql -X -q -At -d postgres -c \
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'faults_$1'
               AND state = 'active' AND query LIKE '%d365_sync%' LIMIT 1" 2>/dev/null)
        if [ -n "$pid" ]; then
            echo "$pid"
            return 0
        fi
        kill -0 "$BG_PID" 2>/dev/null || return 1
        sleep 0.05
    done
    return 1
}

# wait_exit PID MAX_MS: poll until PID has exited (sets BG_RC and WAITED_MS);
# returns 1 if it is still running after MAX_MS.
wait_exit() {
    local pid=$1 max=$2 t0
    t0=$(now_ms)
    while kill -0 "$pid" 2>/dev/null; do
        if [ $(( $(now_ms) - t0 )) -ge "$max" ]; then
            WAITED_MS=$(( $(now_ms) - t0 ))
            return 1
        fi
        sleep 0.02
    done
    WAITED_MS=$(( $(now_ms) - t0 ))
    wait "$pid" 2>/dev/null
    BG_RC=$?
    return 0
}

fault() {
    simctl fault "$1" >/dev/null || fail "could not add the fault rule $1"
}

qualifying() {
    psqlq -c "SELECT count(*) FROM fault_contact WHERE score >= (SELECT min_score FROM d365.settings)"
}

# --------------------------------------------------------------------------
# set-up
# --------------------------------------------------------------------------

setup() {
    timeout 60 psql -X -q -v ON_ERROR_STOP=1 -d postgres \
        -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB" || return 1
    psqlq <<'SQL'
SET client_min_messages = warning;
\getenv sim_url D365_SIM_URL
CREATE EXTENSION d365sync;
UPDATE d365.settings
   SET org_url = :'sim_url', authority_url = :'sim_url',
       tenant_id = '11111111-1111-1111-1111-111111111111',
       client_id = '22222222-2222-2222-2222-222222222222',
       client_secret = 'sim-secret',
       contact_sync_enabled = true, min_score = 10;

-- 300 contacts with a unique email each; every 15th scores below min_score
CREATE TABLE fault_contact (
    id         integer PRIMARY KEY,
    first_name text,
    last_name  text,
    email      text NOT NULL UNIQUE,
    score      integer NOT NULL
);
INSERT INTO fault_contact
SELECT g, 'First' || g, 'Fault' || g, 'c' || lpad(g::text, 4, '0') || '@faults.example',
       CASE WHEN g % 15 = 0 THEN 5 ELSE 10 + g % 50 END
  FROM generate_series(1, 300) g;
SELECT d365.d365_attach_contacts('fault_contact');
INSERT INTO d365.field_map VALUES
    ('first_name', 'firstname'), ('last_name', 'lastname'), ('email', 'emailaddress1');

CREATE TABLE sim_rows (j jsonb);
CREATE TABLE sim_act (j jsonb);

CREATE FUNCTION faults_problems(final boolean) RETURNS SETOF text
LANGUAGE sql AS $$
    SELECT format('duplicate remote contact: %s is in the simulator %s times', e, n)
      FROM (SELECT j ->> 'emailaddress1' AS e, count(*) AS n FROM sim_rows
             GROUP BY 1 HAVING count(*) > 1) d
    UNION ALL
    SELECT format('contact %s is linked to %s, which the simulator does not have',
                  c.id, c.dynamics365_related_id)
      FROM fault_contact c
     WHERE c.dynamics365_related_id IS NOT NULL
       AND NOT EXISTS (SELECT FROM sim_rows s
                        WHERE (s.j ->> 'contactid')::uuid = c.dynamics365_related_id)
    UNION ALL
    SELECT format('contact %s (%s) is linked to a simulator contact with email %s',
                  c.id, c.email, s.j ->> 'emailaddress1')
      FROM fault_contact c JOIN sim_rows s ON (s.j ->> 'contactid')::uuid = c.dynamics365_related_id
     WHERE s.j ->> 'emailaddress1' IS DISTINCT FROM c.email
    UNION ALL
    SELECT format('contact %s scores %s, below min_score, but is linked', c.id, c.score)
      FROM fault_contact c
     WHERE c.dynamics365_related_id IS NOT NULL AND c.score < (SELECT min_score FROM d365.settings)
    UNION ALL
    SELECT format('the simulator has %s contacts but %s local contacts are linked', r, l)
      FROM (SELECT (SELECT count(*) FROM sim_rows) AS r,
                   (SELECT count(*) FROM fault_contact WHERE dynamics365_related_id IS NOT NULL) AS l) x
     WHERE final AND r <> l
    UNION ALL
    SELECT format('lost: qualifying contact %s is not linked (attempts %s, last error: %s)',
                  c.id, coalesce(s.attempts, 0), coalesce(s.last_error, 'none'))
      FROM fault_contact c LEFT JOIN d365.contact_state s ON s.contact_key = c.id::text
     WHERE final AND c.dynamics365_related_id IS NULL
       AND c.score >= (SELECT min_score FROM d365.settings)
    UNION ALL
    SELECT format('invisible failure: qualifying contact %s is not linked and d365.contact_state records no failure (attempts %s, last_error %s)',
                  c.id, coalesce(s.attempts, 0), coalesce(s.last_error, 'NULL'))
      FROM fault_contact c LEFT JOIN d365.contact_state s ON s.contact_key = c.id::text
     WHERE NOT final AND c.dynamics365_related_id IS NULL
       AND c.score >= (SELECT min_score FROM d365.settings)
       AND NOT (coalesce(s.attempts, 0) > 0 AND s.last_error IS NOT NULL)
$$;

CREATE FUNCTION activity_problems() RETURNS SETOF text
LANGUAGE sql AS $$
    SELECT format('activity %s is not synced (attempts %s, last error: %s)',
                  a.id, a.attempts, coalesce(a.last_error, 'none'))
      FROM d365.activity a WHERE a.synced_at IS NULL
    UNION ALL
    SELECT format('activity %s (%s) is in the simulator %s times', a.id, a.dynamics_activity_id, x.n)
      FROM d365.activity a
      CROSS JOIN LATERAL (SELECT count(*) AS n FROM sim_act s
                           WHERE (s.j ->> 'activityid')::uuid = a.dynamics_activity_id) x
     WHERE x.n <> 1
    UNION ALL
    SELECT format('duplicate remote phone call: "%s" is in the simulator %s times', subj, n)
      FROM (SELECT j ->> 'subject' AS subj, count(*) AS n FROM sim_act
             GROUP BY 1 HAVING count(*) > 1) d
    UNION ALL
    SELECT format('the simulator has %s phone calls, d365.activity has %s', r, l)
      FROM (SELECT (SELECT count(*) FROM sim_act) AS r, (SELECT count(*) FROM d365.activity) AS l) x
     WHERE r <> l
$$;
SQL
}

if ! setup >"$TMPD/setup.log" 2>&1; then
    sed 's/^/# /' "$TMPD/setup.log"
    for i in $(seq 1 $NSCEN); do echo "not ok $i - set-up: database $DB could not be prepared"; done
    exit 0
fi
QUAL=$(qualifying)
diag "database $DB: 300 contacts, $QUAL qualify (score >= min_score); simulator $D365_SIM_URL"

# The slowed-down runs below: 10 contacts per \$batch, 2 in flight, so that
# a run makes ~15 rounds of requests and takes a few seconds.
SLOW_GUCS="SET d365sync.batch_size = 10; SET d365sync.max_parallel = 2;"

# --------------------------------------------------------------------------
# 1. 429 storm
# --------------------------------------------------------------------------
begin 1 "429 storm with Retry-After: the sync completes and counts throttled responses"
if fresh >/dev/null; then
    SCEN_SEQ=$(simctl last-seq)
    fault '[{"path_regex": "\\$batch", "scope": "outer", "status": 429, "headers": {"Retry-After": "1"},
             "json": {"error": {"code": "0x80072322", "message": "Number of requests exceeded the limit of 6000 over time window of 300 seconds."}},
             "times": 3},
            {"path_regex": "contacts", "scope": "inner", "status": 429, "headers": {"Retry-After": "1"},
             "json": {"error": {"code": "0x80072321", "message": "Combined execution time of incoming requests exceeded limit of 1,200,000 milliseconds over time window of 300 seconds."}},
             "times": 6, "skip": 10}]'
    out=$(sync_contacts 2>&1) || fail "the sync failed: $out"
    diag "run: created|updated|unchanged|failed|unlinked|requests = $out"
    run=$(last_run contacts)
    IFS='|' read -r rid rcreated rfailed rreq rthrottled rmsg <<<"$run"
    diag "d365.sync_run: created $rcreated, failed $rfailed, requests $rreq, throttled $rthrottled, message '$rmsg'"
    fired=$(sim_stat 's["faults_fired"]')
    [ "${fired:-0}" -ge 4 ] || fail "only ${fired:-0} fault rules fired; the storm did not happen"
    [ "${rthrottled:-0}" -gt 0 ] || fail "d365.sync_run.throttled is ${rthrottled:-empty}, expected > 0"
    [ -z "$rmsg" ] || fail "the run's message is '$rmsg'"
    check_contacts final
else
    fail "could not reset the simulator and the contacts"
fi
finish

# --------------------------------------------------------------------------
# 2. 500/503 bursts
# --------------------------------------------------------------------------
begin 2 "500/503 bursts: every qualifying contact is synced after the run (or one more)"
if fresh >/dev/null; then
    SCEN_SEQ=$(simctl last-seq)
    fault '[{"path_regex": "\\$batch", "scope": "outer", "status": 503, "times": 2,
             "json": {"error": {"code": "0x80040216", "message": "Service Unavailable"}}},
            {"path_regex": "contacts", "scope": "inner", "status": 500, "times": 5, "skip": 20},
            {"path_regex": "contacts", "scope": "inner", "status": 503, "times": 5, "skip": 120},
            {"path_regex": "contacts", "scope": "inner", "status": 500, "times": 3, "skip": 200},
            {"path_regex": "\\$batch", "scope": "outer", "status": 502, "times": 1, "skip": 4,
             "json": {"error": {"code": "0x80040216", "message": "Bad Gateway"}}}]'
    out=$(sync_contacts 2>&1) || fail "the sync failed: $out"
    diag "run 1: created|updated|unchanged|failed|unlinked|requests = $out"
    fired=$(sim_stat 's["faults_fired"]')
    diag "fault rules fired $fired times"
    [ "${fired:-0}" -ge 5 ] || fail "only ${fired:-0} fault rules fired; the bursts did not happen"
    IFS='|' read -r c1 u1 n1 f1 l1 r1 <<<"$out"
    if [ "${f1:-0}" != 0 ]; then
        # failures back off; each must be visible, then one more run
        check_contacts midrun
        sf=$(psqlq -c "SELECT count(*) FROM d365.contact_state WHERE attempts > 0 AND last_error IS NOT NULL")
        [ "$sf" = "$f1" ] || fail "the run reported $f1 failed contacts, d365.contact_state shows $sf"
        psqlq -c "UPDATE d365.contact_state SET next_attempt_at = NULL WHERE attempts > 0" >/dev/null
        out=$(sync_contacts 2>&1) || fail "the second sync failed: $out"
        diag "run 2: created|updated|unchanged|failed|unlinked|requests = $out"
    fi
    check_contacts final
else
    fail "could not reset the simulator and the contacts"
fi
finish

# --------------------------------------------------------------------------
# 3. request timeouts
# --------------------------------------------------------------------------
begin 3 "request timeout (d365sync.request_timeout_ms) on delayed requests: retried, everything synced once"
if fresh >/dev/null; then
    SCEN_SEQ=$(simctl last-seq)
    # the simulator still handles a delayed $batch after the client gave up,
    # so the retry meets contacts that exist already
    fault '[{"path_regex": "\\$batch", "scope": "outer", "delay_ms": 2500, "times": 2}]'
    t0=$(now_ms)
    out=$(sync_contacts "SET d365sync.request_timeout_ms = 1000;" 2>&1) || fail "the sync failed: $out"
    diag "run: created|updated|unchanged|failed|unlinked|requests = $out ($(( $(now_ms) - t0 )) ms)"
    IFS='|' read -r c1 u1 n1 f1 l1 r1 <<<"$out"
    fired=$(sim_stat 's["faults_fired"]')
    [ "${fired:-0}" -ge 2 ] || fail "only ${fired:-0} delays fired"
    [ "${r1:-0}" -gt 4 ] || fail "the run made ${r1:-?} requests: no timed-out request was retried"
    [ "${f1:-1}" = 0 ] || fail "$f1 contacts failed"
    check_contacts final
else
    fail "could not reset the simulator and the contacts"
fi
finish

# --------------------------------------------------------------------------
# 4. malformed JSON, HTML error pages
# --------------------------------------------------------------------------
begin 4 "malformed JSON and text/html error pages: no crash, failures visible in SQL, a later run syncs them"
if fresh >/dev/null; then
    SCEN_SEQ=$(simctl last-seq)
    start0=$(psqlq -c "SELECT pg_postmaster_start_time()")
    # contact 11: malformed JSON in a 200; contact 12: an HTML 400 page
    # (both for good); one $batch answered by an HTML 502 page and one by
    # malformed JSON (both retried)
    fault '[{"method": "PATCH", "scope": "inner", "body_regex": "c0011@", "status": 200,
             "body": "{\"value\": [", "content_type": "application/json", "times": null},
            {"method": "PATCH", "scope": "inner", "body_regex": "c0012@", "status": 400,
             "body": "<html><body><h1>400 Bad Request</h1></body></html>", "content_type": "text/html", "times": null},
            {"path_regex": "\\$batch", "scope": "outer", "status": 502,
             "body": "<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>",
             "content_type": "text/html", "times": 1},
            {"path_regex": "\\$batch", "scope": "outer", "status": 200,
             "body": "{\"responses\": [", "content_type": "application/json", "times": 1}]'
    out=$(psqlq 2>&1 <<'SQL'
SELECT created, updated, unchanged, failed, unlinked, requests FROM d365.d365_sync_contacts();
SELECT 'alive ' || pg_backend_pid();
SQL
    ) || fail "the sync session failed: $out"
    diag "run: $(head -n1 <<<"$out")"
    grep -q '^alive ' <<<"$out" || fail "the backend did not answer after the sync"
    start1=$(psqlq -c "SELECT pg_postmaster_start_time()" 2>&1)
    [ "$start0" = "$start1" ] || fail "the server restarted (a backend crashed): $start0 -> $start1"
    IFS='|' read -r c1 u1 n1 f1 l1 r1 <<<"$(head -n1 <<<"$out")"
    [ "${f1:-0}" -ge 2 ] || fail "the run reported ${f1:-?} failed contacts, expected 2 (contacts 11 and 12)"
    st=$(psqlq -c "SELECT contact_key || ': attempts ' || attempts || ', status ' || coalesce(last_status::text, 'NULL') || ', error ' || coalesce(last_error, 'NULL') FROM d365.contact_state WHERE contact_key IN ('11', '12') ORDER BY contact_key")
    diag "$st"
    bad=$(psqlq -c "SELECT count(*) FROM d365.contact_state WHERE contact_key IN ('11', '12') AND (attempts = 0 OR last_error IS NULL OR next_attempt_at IS NULL)")
    [ "$bad" = 0 ] || fail "$bad of contacts 11 and 12 have no recorded failure"
    sf=$(psqlq -c "SELECT count(*) FROM d365.contact_state WHERE attempts > 0")
    [ "$sf" = "${f1:-}" ] || fail "the run reported ${f1:-?} failed contacts, d365.contact_state shows $sf failing"
    check_contacts midrun
    # a later run, faults gone and the back-off over, syncs them
    clear_sim_faults
    psqlq -c "UPDATE d365.contact_state SET next_attempt_at = NULL WHERE attempts > 0" >/dev/null
    out=$(sync_contacts 2>&1) || fail "the second sync failed: $out"
    diag "run 2: created|updated|unchanged|failed|unlinked|requests = $out"
    left=$(psqlq -c "SELECT count(*) FROM d365.contact_state WHERE attempts > 0")
    [ "$left" = 0 ] || fail "$left contacts still fail after the faults were cleared"
    check_contacts final
else
    fail "could not reset the simulator and the contacts"
fi
finish

# --------------------------------------------------------------------------
# 5. token expiring mid-run
# --------------------------------------------------------------------------
begin 5 "access token expiring mid-run: the run completes after one token refresh"
if fresh >/dev/null; then
    SCEN_SEQ=$(simctl last-seq)
    simctl config '{"latency_ms": 150}' >/dev/null
    tok0=$(sim_stat 's["requests"]["token"]')
    bg_psql s5 "$SLOW_GUCS
SELECT created, updated, unchanged, failed, unlinked, requests FROM d365.d365_sync_contacts();"
    if pid=$(backend_of s5); then
        sleep 0.6
        kill -0 "$BG_PID" 2>/dev/null || fail "the run ended before the token could expire mid-run"
        simctl expire-tokens >/dev/null
        wait_exit "$BG_PID" 30000 || fail "the run did not end within 30 s"
        [ "${BG_RC:-1}" = 0 ] || fail "the run failed (psql exit ${BG_RC:-?}): $(cat "$TMPD/s5.err")"
        diag "run: created|updated|unchanged|failed|unlinked|requests = $(cat "$TMPD/s5.out")"
        tok1=$(sim_stat 's["requests"]["token"]')
        n401=$(simctl requests --since "$SCEN_SEQ" --kind api --copy | grep -c '"status": *401')
        diag "token requests: $(( tok1 - tok0 )); API requests answered 401: $n401"
        [ "$n401" -ge 1 ] || fail "no request was refused with 401: the token did not expire mid-run"
        [ $(( tok1 - tok0 )) = 2 ] || fail "$(( tok1 - tok0 )) token requests, expected 2 (the first token and one refresh)"
        IFS='|' read -r c1 u1 n1 f1 l1 r1 <"$TMPD/s5.out"
        [ "${f1:-1}" = 0 ] || fail "${f1:-?} contacts failed"
    else
        fail "the sync's backend was not seen running: $(cat "$TMPD/s5.err")"
        wait_exit "$BG_PID" 30000
    fi
    clear_sim_faults
    check_contacts final
else
    fail "could not reset the simulator and the contacts"
fi
finish

# --------------------------------------------------------------------------
# 6. pg_cancel_backend mid-run
# --------------------------------------------------------------------------
begin 6 "pg_cancel_backend mid-run: SQLSTATE 57014 within 2 s, a clean rerun links every contact once"
if fresh >/dev/null; then
    SCEN_SEQ=$(simctl last-seq)
    simctl config '{"latency_ms": 200}' >/dev/null
    bg_psql s6 "$SLOW_GUCS
SELECT created, updated, unchanged, failed, unlinked, requests FROM d365.d365_sync_contacts();"
    if pid=$(backend_of s6); then
        sleep 1
        kill -0 "$BG_PID" 2>/dev/null || fail "the run ended within 1 s; it could not be cancelled mid-run"
        psqlq -c "SELECT pg_cancel_backend($pid)" >/dev/null
        if wait_exit "$BG_PID" 10000; then
            diag "psql ended $WAITED_MS ms after pg_cancel_backend: $(tr '\n' ' ' <"$TMPD/s6.err")"
            [ "$WAITED_MS" -le 2000 ] || fail "the cancel took $WAITED_MS ms (> 2 s)"
            grep -q '57014' "$TMPD/s6.err" || fail "psql did not get SQLSTATE 57014: $(cat "$TMPD/s6.err" "$TMPD/s6.out")"
        else
            fail "the backend ignored pg_cancel_backend for 10 s"
            wait_exit "$BG_PID" 30000
        fi
        linked=$(psqlq -c "SELECT count(*) FROM fault_contact WHERE dynamics365_related_id IS NOT NULL")
        remote=$(sim_stat 's["rows"].get("contact", 0)')
        diag "after the cancel: $linked linked locally, $remote contacts in the simulator"
    else
        fail "the sync's backend was not seen running: $(cat "$TMPD/s6.err")"
        wait_exit "$BG_PID" 30000
    fi
    clear_sim_faults
    out=$(sync_contacts 2>&1) || fail "the clean rerun failed: $out"
    diag "clean rerun: created|updated|unchanged|failed|unlinked|requests = $out"
    check_contacts final
else
    fail "could not reset the simulator and the contacts"
fi
finish

# --------------------------------------------------------------------------
# 7. SIGKILL of the backend mid-run
# --------------------------------------------------------------------------
begin 7 "backend killed with SIGKILL mid-run: after the restart a clean rerun links every contact once"
if fresh >/dev/null; then
    SCEN_SEQ=$(simctl last-seq)
    simctl config '{"latency_ms": 200}' >/dev/null
    bg_psql s7 "$SLOW_GUCS
SELECT created, updated, unchanged, failed, unlinked, requests FROM d365.d365_sync_contacts();"
    if pid=$(backend_of s7); then
        sleep 1
        kill -0 "$BG_PID" 2>/dev/null || fail "the run ended within 1 s; it could not be killed mid-run"
        kill -9 "$pid" 2>/dev/null || fail "could not kill backend $pid"
        wait_exit "$BG_PID" 30000 || fail "psql did not end within 30 s of the kill"
        diag "psql: $(tr '\n' ' ' <"$TMPD/s7.err")"
        if wait_server; then
            remote=$(sim_stat 's["rows"].get("contact", 0)')
            linked=$(psqlq -c "SELECT count(*) FROM fault_contact WHERE dynamics365_related_id IS NOT NULL")
            diag "after the restart: $linked linked locally, $remote contacts in the simulator"
        else
            fail "the server did not accept connections within 60 s of the kill"
        fi
    else
        fail "the sync's backend was not seen running: $(cat "$TMPD/s7.err")"
        wait_exit "$BG_PID" 30000
    fi
    clear_sim_faults
    out=$(sync_contacts 2>&1) || fail "the clean rerun failed: $out"
    diag "clean rerun: created|updated|unchanged|failed|unlinked|requests = $out"
    check_contacts final
else
    fail "could not reset the simulator and the contacts"
fi
finish

# --------------------------------------------------------------------------
# 8. two runs at once
# --------------------------------------------------------------------------
begin 8 "two runs at once: one is recorded as skipped, nothing is created twice"
if fresh >/dev/null; then
    SCEN_SEQ=$(simctl last-seq)
    simctl config '{"latency_ms": 200}' >/dev/null
    run0=$(last_run_id)
    bg_psql s8a "$SLOW_GUCS
SELECT created, updated, unchanged, failed, unlinked, requests FROM d365.d365_sync_contacts();"
    pid_a=$BG_PID
    if backend_of s8a >/dev/null; then
        sleep 0.3
        bg_psql s8b "$SLOW_GUCS
SELECT created, updated, unchanged, failed, unlinked, requests FROM d365.d365_sync_contacts();"
        pid_b=$BG_PID
        wait_exit "$pid_a" 40000 || fail "the first run did not end within 40 s"
        rc_a=${BG_RC:-?}
        wait_exit "$pid_b" 40000 || fail "the second run did not end within 40 s"
        rc_b=${BG_RC:-?}
        diag "run A (psql exit $rc_a): $(cat "$TMPD/s8a.out" "$TMPD/s8a.err" | tr '\n' ' ')"
        diag "run B (psql exit $rc_b): $(cat "$TMPD/s8b.out" "$TMPD/s8b.err" | tr '\n' ' ')"
        [ "$rc_a" = 0 ] && [ "$rc_b" = 0 ] || fail "a run failed"
        runs=$(psqlq -c "SELECT id || ': created ' || created || ', message ' || coalesce(message, 'NULL') FROM d365.sync_run WHERE kind = 'contacts' AND id > $run0 ORDER BY id")
        diag "$runs"
        nskip=$(psqlq -c "SELECT count(*) FROM d365.sync_run WHERE kind = 'contacts' AND id > $run0 AND message LIKE 'skipped%'")
        nrun=$(psqlq -c "SELECT count(*) FROM d365.sync_run WHERE kind = 'contacts' AND id > $run0")
        [ "$nskip" = 1 ] && [ "$nrun" = 2 ] || fail "$nrun runs recorded, $nskip of them skipped; expected 2 and 1"
    else
        fail "the first sync's backend was not seen running: $(cat "$TMPD/s8a.err")"
        wait_exit "$pid_a" 30000
    fi
    clear_sim_faults
    check_contacts final
else
    fail "could not reset the simulator and the contacts"
fi
finish

# --------------------------------------------------------------------------
# 9. activities under faults
# --------------------------------------------------------------------------
begin 9 "activities under a 500 burst and a cancel: after a clean rerun each one exists once in Dynamics"
if fresh >/dev/null; then
    SCEN_SEQ=$(simctl last-seq)
    out=$(sync_contacts 2>&1) || fail "the contact sync failed: $out"
    # 50 phone calls logged while activity sync is off: they stay pending
    n=$(psqlq 2>&1 <<'SQL'
UPDATE d365.settings SET activity_sync_enabled = false;
SELECT count(d365.d365_log_activity(c.id, 'phonecall', 'Fault call ' || c.id,
                                    jsonb_build_object('direction', 'outgoing', 'duration_minutes', 5)))
  FROM (SELECT id FROM fault_contact WHERE dynamics365_related_id IS NOT NULL ORDER BY id LIMIT 50) c;
SELECT count(*) FROM d365.activity WHERE synced_at IS NULL;
UPDATE d365.settings SET activity_sync_enabled = true;
SQL
    ) || fail "logging the activities failed: $n"
    diag "logged and pending: $(tr '\n' ' ' <<<"$n")"
    fault '[{"path_regex": "\\$batch", "scope": "outer", "status": 503, "times": 1, "skip": 1},
            {"path_regex": "phonecalls", "scope": "inner", "status": 500, "times": 6, "skip": 4},
            {"path_regex": "phonecalls", "scope": "inner", "status": 500, "times": 4, "skip": 60}]'
    simctl config '{"latency_ms": 150}' >/dev/null
    bg_psql s9 "SET d365sync.batch_size = 4; SET d365sync.max_parallel = 1;
SELECT created, failed, requests FROM d365.d365_sync_activities();"
    if pid=$(backend_of s9); then
        sleep 1
        kill -0 "$BG_PID" 2>/dev/null || fail "the activity run ended within 1 s; it could not be cancelled mid-run"
        psqlq -c "SELECT pg_cancel_backend($pid)" >/dev/null
        if wait_exit "$BG_PID" 10000; then
            diag "psql ended $WAITED_MS ms after pg_cancel_backend: $(tr '\n' ' ' <"$TMPD/s9.err")"
            [ "$WAITED_MS" -le 2000 ] || fail "the cancel took $WAITED_MS ms (> 2 s)"
            grep -q '57014' "$TMPD/s9.err" || fail "psql did not get SQLSTATE 57014: $(cat "$TMPD/s9.err" "$TMPD/s9.out")"
        else
            fail "the backend ignored pg_cancel_backend for 10 s"
            wait_exit "$BG_PID" 30000
        fi
        diag "phone calls in the simulator after the cancel: $(sim_stat 's["rows"].get("phonecall", 0)')"
    else
        fail "the activity sync's backend was not seen running: $(cat "$TMPD/s9.err")"
        wait_exit "$BG_PID" 30000
    fi
    # the burst goes on (what is left of it) at full speed
    simctl config '{"latency_ms": 0}' >/dev/null
    out=$(psqlq -c "SELECT created, failed, requests FROM d365.d365_sync_activities()" 2>&1) ||
        fail "the activity run under faults failed: $out"
    diag "run under faults: created|failed|requests = $out"
    # failures (if any) are visible
    inv=$(psqlq -c "SELECT count(*) FROM d365.activity WHERE synced_at IS NULL AND (attempts = 0 OR last_error IS NULL)")
    [ "$inv" = 0 ] || fail "$inv pending activities record no failure after the run"
    diag "fault rules fired $(sim_stat 's["faults_fired"]') times"
    clear_sim_faults
    psqlq -c "UPDATE d365.activity SET next_attempt_at = NULL WHERE synced_at IS NULL" >/dev/null
    out=$(psqlq -c "SELECT created, failed, requests FROM d365.d365_sync_activities()" 2>&1) ||
        fail "the clean activity rerun failed: $out"
    diag "clean rerun: created|failed|requests = $out"
    check_activities
    open=$(psqlq 2>/dev/null <<'SQL'
SELECT count(*) FROM sim_act WHERE (j ->> 'statecode') IS DISTINCT FROM '1';
SQL
    )
    diag "phone calls in the simulator that are not completed (statecode <> 1): ${open:-?}"
    check_contacts final
else
    fail "could not reset the simulator and the contacts"
fi
finish

simctl clear-faults >/dev/null 2>&1
simctl reset >/dev/null 2>&1
exit 0
