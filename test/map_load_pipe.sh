#!/usr/bin/env bash
# test/map_load_pipe.sh: the initial load and the pull fetch the next page
# while the current one is recorded -- page N+1 is asked for while page N
# is applied, a page ahead that fails (500, after it was asked for) loses
# nothing and the load goes on from d365.load_state, the client's 429
# back-off and token refresh apply to the page ahead, a cancel while the
# page ahead is in flight (waited for, or while SQL runs) returns at once
# and the same session loads again, and the pages of a change-tracking
# pull are applied in their order.
#
# scripts/test.sh runs it with the cluster and simulator it started; run
# alone it starts its own:
#   bash test/map_load_pipe.sh                    # builds and installs first
#   D365_SKIP_BUILD=1 bash test/map_load_pipe.sh  # uses the installed extension
# Prints "ok N - ..." / "not ok N - ..." and always exits 0.
set -uo pipefail

DB=d365loadpipe
. "$(dirname "$0")/lib.sh"
t_begin loadpipe
t_on_exit() { simctl reset >/dev/null 2>&1; }
t_standalone || exit 0

q() { psqlq -c "SET search_path = public, d365" -c "$1" 2>&1; }

# GETs of the load's pages of accounts (fields, not the ids' read), after
# the first one
PAGE_RE='accounts\\?\\$select=[^&]*name[^&]*&\\$skiptoken'

# a fresh database: 35 accounts in pages of 10 (Contoso, Fabrikam and
# Co1..Co33), companies mapped with load on, an owner's trigger noting
# when each row was inserted or updated (and sleeping at the rows sleep_at
# numbers, for its seconds)
setup() {
    simctl reset >/dev/null
    simctl config '{"max_page_size": 10}' >/dev/null
    simctl generate account '{"count": 33, "values": {"name": "Co{i}"}}' >/dev/null
    t_create_db "$DB"
    psqlq >"$TMPD/setup.log" 2>&1 <<SQL || { notok "set-up failed" "$(tail -n 8 "$TMPD/setup.log")"; exit 0; }
$(t_configure_sql)
SET search_path = public, d365;
CREATE TABLE companies (id serial PRIMARY KEY, name text NOT NULL, revenue numeric(12,2));
CREATE TABLE applied (n serial PRIMARY KEY, name text, op text, at timestamptz);
CREATE TABLE sleep_at (n integer, secs float8);
ALTER TABLE companies OWNER TO pipe_owner;
ALTER TABLE applied OWNER TO pipe_owner;
ALTER TABLE sleep_at OWNER TO pipe_owner;
CREATE FUNCTION note_applied() RETURNS trigger LANGUAGE plpgsql AS
\$\$
DECLARE k integer;
BEGIN
    INSERT INTO public.applied (name, op, at) VALUES (NEW.name, TG_OP, clock_timestamp()) RETURNING n INTO k;
    IF EXISTS (SELECT FROM public.sleep_at s WHERE s.n = k) THEN
        PERFORM pg_sleep((SELECT s.secs FROM public.sleep_at s WHERE s.n = k));
    END IF;
    RETURN NEW;
END
\$\$;
ALTER FUNCTION note_applied() OWNER TO pipe_owner;
CREATE TRIGGER note_applied BEFORE INSERT OR UPDATE ON companies FOR EACH ROW EXECUTE FUNCTION note_applied();
SELECT d365_map_table('account', 'companies', 'accounts');
SELECT d365_map_column('account', 'name', 'name');
SELECT d365_map_column('account', 'revenue', 'revenue');
UPDATE d365.table_map SET load = true;
SQL
}
PSQL_DB=postgres psqlq -c "DROP ROLE IF EXISTS pipe_owner" -c "CREATE ROLE pipe_owner" >/dev/null 2>&1

# the requests the simulator logged since $1 matching the regex $2:
# "arrival-time status" per line
logged() {
    simctl requests --since "$1" | python3 -c '
import json, re, sys
rx = re.compile(sys.argv[1])
for r in json.load(sys.stdin)["requests"]:
    if r["method"] == "GET" and rx.search(r["path"]):
        print(r["time"], r["status"])' "$2"
}
PAGE_PY='accounts\?\$select=[^&]*name[^&]*&\$skiptoken'

# -- 1. page 2 is asked for while page 1 is recorded; pages go in order
setup
q "INSERT INTO sleep_at VALUES (5, 0.5)" >/dev/null
seq0=$(simctl last-seq)
out=$(q "CALL d365_load('account')")
req2=$(logged "$seq0" "$PAGE_PY" | head -n 1 | cut -d' ' -f1)
over=$(q "SELECT '$req2'::timestamptz < max(at) FILTER (WHERE n <= 10),
                 min(at) FILTER (WHERE n > 10) > max(at) FILTER (WHERE n <= 10),
                 count(*), count(DISTINCT name) FROM applied")
rows=$(q "SELECT count(*), count(DISTINCT dynamics365_related_id) FROM companies")
if [ -n "$req2" ] && [ "$over" = "t|t|35|35" ] && [ "$rows" = "35|35" ]; then
    ok "page 2 was asked for while page 1 was being recorded (at $req2), and recorded after it: 35 rows for 35 records"
else
    notok "the next page is fetched while the current one is recorded" "$out" "page 2 asked for at: $req2" "$over" "$rows"
fi

# -- 2. the page ahead fails (500, no retry left): the pages before it are
#       kept, the load goes on from its position, nothing twice; no secret
#       in what the failure says
setup
q "ALTER DATABASE $DB SET d365sync.max_retries = 0" >/dev/null
simctl fault "{\"method\": \"GET\", \"path_regex\": \"$PAGE_RE\", \"skip\": 1, \"times\": 1, \"status\": 500,
               \"json\": {\"error\": {\"code\": \"0x80040216\", \"message\": \"An unexpected error occurred.\"}}}" >/dev/null
out=$(q "CALL d365_load('account')")
state=$(q "SELECT pages, records, finished_at IS NULL, next_link LIKE '%skiptoken%' FROM d365.load_state")
kept=$(q "SELECT count(*) FROM companies")
msg=$(q "SELECT message FROM d365.sync_run WHERE kind = 'map-pull:account' ORDER BY id DESC LIMIT 1")
seq0=$(simctl last-seq)
out2=$(q "CALL d365_load('account')")
again=$(logged "$seq0" "$PAGE_PY" | wc -l)
rows=$(q "SELECT count(*), count(DISTINCT dynamics365_related_id) FROM companies")
done_state=$(q "SELECT pages, records, finished_at IS NOT NULL FROM d365.load_state")
if [ "$state" = "2|20|t|t" ] && [ "$kept" = 20 ] && [ "$msg" = "failed: Dynamics 365: An unexpected error occurred." ] && grep -q 'HTTP status 500, Dynamics error code 0x80040216' <<<"$out" &&
   ! grep -qi 'sim-secret\|bearer\|authorization' <<<"$out$msg" &&
   [ "$again" = 2 ] && [ "$rows" = "35|35" ] && [ "$done_state" = "4|35|t" ]; then
    ok "page 3 failing after it was asked for ahead keeps pages 1-2 (20 rows, the next link of page 3), says '$msg' without a secret; the next CALL reads pages 3 and 4 only: 35 rows for 35 records"
else
    notok "a failed page ahead loses nothing and the load goes on" "$out" "state=$state kept=$kept msg=$msg" "$out2" "again=$again rows=$rows done=$done_state"
fi

# the same with d365_pull(): one transaction, all or nothing, then whole
setup
q "ALTER DATABASE $DB SET d365sync.max_retries = 0" >/dev/null
simctl fault "{\"method\": \"GET\", \"path_regex\": \"$PAGE_RE\", \"skip\": 1, \"times\": 1, \"status\": 500,
               \"json\": {\"error\": {\"code\": \"0x80040216\", \"message\": \"An unexpected error occurred.\"}}}" >/dev/null
out=$(q "SELECT map, created, failed FROM d365_pull('account')")
kept=$(q "SELECT count(*) FROM companies")
out2=$(q "SELECT map, created, failed FROM d365_pull('account')")
rows=$(q "SELECT count(*), count(DISTINCT dynamics365_related_id) FROM companies")
if grep -q 'HTTP status 500, Dynamics error code 0x80040216' <<<"$out" && [ "$kept" = 0 ] && [ "$(tail -n 1 <<<"$out2")" = "account|35|0" ] &&
   [ "$rows" = "35|35" ]; then
    ok "d365_pull() with a failing page ahead records nothing and the next d365_pull() loads the 35 records once"
else
    notok "d365_pull() with a failing page ahead" "$out" "kept=$kept" "$out2" "$rows"
fi

# -- 3. 429 and 401 on pages asked for ahead: the client's back-off and token
#       refresh, the load whole
setup
simctl fault "{\"method\": \"GET\", \"path_regex\": \"$PAGE_RE\", \"times\": 1, \"status\": 429,
               \"headers\": {\"Retry-After\": \"1\"},
               \"json\": {\"error\": {\"code\": \"0x80072322\", \"message\": \"Number of requests exceeded the limit.\"}}}" >/dev/null
simctl fault "{\"method\": \"GET\", \"path_regex\": \"$PAGE_RE\", \"skip\": 1, \"times\": 1, \"status\": 401,
               \"json\": {\"error\": {\"code\": \"0x80040220\", \"message\": \"The token has expired.\"}}}" >/dev/null
seq0=$(simctl last-seq)
out=$(q "CALL d365_load('account')")
statuses=$(logged "$seq0" "$PAGE_PY" | cut -d' ' -f2 | tr '\n' ' ')
rows=$(q "SELECT count(*), count(DISTINCT dynamics365_related_id) FROM companies")
msg=$(q "SELECT message FROM d365.sync_run WHERE kind = 'map-pull:account' ORDER BY id DESC LIMIT 1")
if [ "$statuses" = "429 200 401 200 200 " ] && [ "$rows" = "35|35" ] &&
   [ "$msg" = "loaded map account: 35 record(s) in 4 page(s)" ]; then
    ok "a 429 (Retry-After) and a 401 on pages asked for ahead are retried by the client (a new token): 35 rows for 35 records"
else
    notok "throttling and token refresh apply to the page ahead" "$out" "statuses: $statuses" "$rows" "$msg"
fi

# -- 4. a cancel while the page ahead is waited for returns at once; the
#       pages before it are kept
setup
simctl fault "{\"method\": \"GET\", \"path_regex\": \"$PAGE_RE\", \"times\": 1, \"delay_ms\": 30000}" >/dev/null
PSQL_STOP=0 psqlq -c "CALL d365.d365_load('account')" >"$TMPD/c4.log" 2>&1 &
LPID=$!
bg $LPID
if wait_sql "SELECT EXISTS (SELECT FROM d365.load_state WHERE pages = 1)" 20; then
    sleep 0.3
    pid=$(psqlq -c "SELECT pid FROM pg_stat_activity WHERE query LIKE '%CALL d365.d365_load%' AND pid <> pg_backend_pid()")
    t0=$(now_ms)
    psqlq -c "SELECT pg_cancel_backend($pid)" >/dev/null
    wait $LPID
    took=$(( $(now_ms) - t0 ))
else
    took=99999
fi
state=$(q "SELECT pages, records, finished_at IS NULL FROM d365.load_state")
kept=$(q "SELECT count(*) FROM companies")
if grep -q 'canceling statement due to user request' "$TMPD/c4.log" && [ "$took" -le 2000 ] &&
   [ "$state" = "1|10|t" ] && [ "$kept" = 10 ]; then
    ok "a cancel while waiting for page 2 (asked for ahead, held 30 s by the server) returns in $took ms; page 1 is kept"
else
    notok "a cancel during the wait for a page ahead" "$(cat "$TMPD/c4.log")" "took=$took ms" "state=$state kept=$kept"
fi

# -- 5. a cancel while page 2 is recorded and page 3 is in flight returns at
#       once; the same session then loads the rest, one row per record
setup
simctl fault "{\"method\": \"GET\", \"path_regex\": \"$PAGE_RE\", \"skip\": 1, \"times\": 1, \"delay_ms\": 30000}" >/dev/null
q "INSERT INTO sleep_at VALUES (15, 30)" >/dev/null
PSQL_STOP=0 psqlq >"$TMPD/c5.log" 2>&1 <<'SQL' &
CALL d365.d365_load('account');
SELECT 'cancelled at', clock_timestamp();
CALL d365.d365_load('account');
SELECT 'rows', count(*), count(DISTINCT dynamics365_related_id) FROM public.companies;
SQL
LPID=$!
bg $LPID
pid=
if wait_sql "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE wait_event = 'PgSleep' AND query LIKE '%CALL d365.d365_load%')" 20; then
    pid=$(psqlq -c "SELECT pid FROM pg_stat_activity WHERE wait_event = 'PgSleep' AND query LIKE '%CALL d365.d365_load%'")
    inflight=$(simctl requests | python3 -c '
import json, re, sys
print(sum(1 for r in json.load(sys.stdin)["requests"] if r["method"] == "GET" and re.search(sys.argv[1], r["path"])))' "$PAGE_PY")
    t0=$(psqlq -c "SELECT clock_timestamp()")
    psqlq -c "SELECT pg_cancel_backend($pid)" >/dev/null
fi
wait $LPID
took=$(q "SELECT round(extract(epoch FROM (substring('$(grep '^cancelled at' "$TMPD/c5.log")' FROM '\|(.*)\$')::timestamptz - '${t0:-infinity}'::timestamptz)) * 1000)")
state=$(q "SELECT pages, records, finished_at IS NOT NULL FROM d365.load_state")
if [ -n "$pid" ] && [ "${inflight:-0}" = 2 ] && grep -q 'canceling statement due to user request' "$TMPD/c5.log" &&
   [ -n "$took" ] && [ "$took" -le 2000 ] && grep -q '^rows|35|35$' "$TMPD/c5.log" && [ "$state" = "4|35|t" ]; then
    ok "a cancel while page 2 was recorded and page 3 was in flight (held by the server) returned in $took ms; the same session loaded the rest: 35 rows for 35 records"
else
    notok "a cancel while SQL runs with a page ahead in flight" "$(cat "$TMPD/c5.log")" "pid=$pid inflight=${inflight:-} took=$took state=$state"
fi

# -- 6. a change-tracking pull of several pages applies them in their order
setup
q "CALL d365_load('account')" >/dev/null
q "TRUNCATE applied" >/dev/null
ids=$(simctl rows account | python3 -c '
import json, sys
print(" ".join(r["accountid"] for r in json.load(sys.stdin)["value"]))')
order=()
for id in $ids; do order=("$id" "${order[@]}"); done    # edited last to first
for id in "${order[@]}"; do
    simctl edit account "{\"op\": \"update\", \"id\": \"$id\", \"values\": {\"revenue\": 7}}" >/dev/null
done
seq0=$(simctl last-seq)
out=$(q "SELECT map, updated, failed FROM d365_pull('account')")
pages=$(simctl requests --since "$seq0" | python3 -c '
import json, sys
print(sum(1 for r in json.load(sys.stdin)["requests"] if r["method"] == "GET" and "/accounts" in r["path"]))')
expect=$(printf "%s\n" "${order[@]}" | awk '{ printf "(%s%s%s, %d)%s", "\x27", $1, "\x27", int((NR - 1) / 10), "," }' | sed 's/,$//')
inorder=$(q "WITH e(id, page) AS (VALUES $expect),
                  a AS (SELECT e.page, a.n FROM applied a JOIN companies c ON c.name = a.name
                          JOIN e ON e.id::uuid = c.dynamics365_related_id WHERE a.op = 'UPDATE')
             SELECT count(*), bool_and(NOT EXISTS (SELECT FROM a b WHERE b.page > a.page AND b.n < a.n)) FROM a")
if [ "$out" = "account|35|0" ] && [ "$pages" = 4 ] && [ "$inorder" = "35|t" ]; then
    ok "a pull of 35 changes in 4 pages applies every page after the one before it"
else
    notok "a pull's pages are applied in order" "$out" "pages=$pages" "$inorder"
fi

