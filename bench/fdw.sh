#!/usr/bin/env bash
# Foreign tables benchmark, as root:
#   bash bench/fdw.sh
# Starts a throwaway PostgreSQL 15 cluster and the Dataverse simulator with
# the latency model of bench/run.sh (30 ms per HTTP request; env
# BENCH_LATENCY_MS), creates 50,000 contacts in the simulator (env
# BENCH_ROWS), and measures:
#   (a) a selective query, 1 % of the rows (numberofchildren = 7): the rows
#       Dataverse sent, requests and time; the same query with a condition
#       that cannot be sent (numberofchildren + 0 = 7) beside it;
#   (b) full scans through a foreign table: 3 columns and every column,
#       rows/s, requests, and the backend's CPU time and memory growth;
#   (c) the sync reading the same rows: the first change-tracking pull
#       (d365_pull_changes, the baseline read of the 3 mapped columns),
#       rows/s and requests.
# It prints a markdown table.  It reports numbers; it never fails because
# they are slow.  D365_SKIP_BUILD=1 uses the installed extension.
set -uo pipefail

BENCH_DIR=$(cd "$(dirname "$0")" && pwd)
. "$BENCH_DIR/../scripts/lib.sh"

BENCH_LATENCY_MS=${BENCH_LATENCY_MS:-30}
ROWS=${BENCH_ROWS:-50000}
DB=d365fdwbench

trap 'd365_stop_all' EXIT
trap 'exit 130' INT TERM

if [ "${D365_SKIP_BUILD:-}" != 1 ]; then
    d365_install_packages || exit 1
    d365_build || exit 1
fi
d365_start_cluster "$DB" >/dev/null || exit 1
d365_start_sim --latency-ms "$BENCH_LATENCY_MS" >/dev/null || exit 1
"$D365_SIMCTL" config '{"log_bodies": false, "log_limit": 10000}' || exit 1
psql -X -q -v ON_ERROR_STOP=1 -d postgres -c "CREATE DATABASE $DB" || exit 1

bpsql() { psql -X -q -At -v ON_ERROR_STOP=1 -P pager=off -d "$DB" "$@"; }

bpsql <<SQL || exit 1
CREATE EXTENSION d365sync;
UPDATE d365.settings
   SET org_url = '$D365_SIM_URL', authority_url = '$D365_SIM_URL',
       tenant_id = '11111111-1111-1111-1111-111111111111',
       client_id = '22222222-2222-2222-2222-222222222222',
       client_secret = 'sim-secret';
CREATE SERVER dataverse FOREIGN DATA WRAPPER d365_fdw;
CREATE SCHEMA dv;
IMPORT FOREIGN SCHEMA dataverse LIMIT TO (contacts) FROM SERVER dataverse INTO dv;
-- an attached contact table with three mapped columns, for the sync's pull
CREATE TABLE person (id bigint PRIMARY KEY, first_name text, last_name text, email text,
                     score integer NOT NULL DEFAULT 0);
SELECT d365.d365_attach_contacts('person');
INSERT INTO d365.field_map VALUES
    ('first_name', 'firstname'), ('last_name', 'lastname'), ('email', 'emailaddress1');
SQL
"$D365_SIMCTL" generate contact "{\"count\": $ROWS, \"values\": {\"firstname\": \"First{i}\",
    \"lastname\": \"Last{i}\", \"emailaddress1\": \"user{i}@bench.example\",
    \"jobtitle\": \"Title {i}\", \"address1_city\": \"City {i}\", \"numberofchildren\": {\"mod\": 100}}}" || exit 1

api_requests() {
    "$D365_SIMCTL" stats | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["requests"]["api"])'
}

# measure LABEL SQL: one statement in a fresh session; prints a table row
# with seconds, rows returned by the foreign scan (EXPLAIN ANALYZE), rows/s,
# requests, backend CPU seconds and peak memory growth
measure() {
    local label=$1 sql=$2 before after out
    before=$(api_requests)
    out=$(bpsql <<SQL
CREATE FUNCTION pg_temp.proc(field int) RETURNS bigint LANGUAGE sql AS
\$\$ SELECT split_part(split_part(pg_read_file('/proc/' || pg_backend_pid() || '/stat'), ') ', 2), ' ', field - 2)::bigint \$\$;
CREATE FUNCTION pg_temp.hwm() RETURNS bigint LANGUAGE sql AS
\$\$ SELECT substring(pg_read_file('/proc/' || pg_backend_pid() || '/status') FROM 'VmHWM:\s+(\d+)')::bigint \$\$;
SELECT 1 FROM d365.d365_whoami();
SELECT pg_temp.proc(14) + pg_temp.proc(15) AS cpu0, pg_temp.hwm() AS mem0,
       clock_timestamp() AS t0 \gset
$sql
SELECT round(extract(epoch FROM clock_timestamp() - :'t0')::numeric, 2),
       round((pg_temp.proc(14) + pg_temp.proc(15) - :cpu0) / 100.0, 2),
       round((pg_temp.hwm() - :mem0) / 1024.0, 1);
SQL
)
    after=$(api_requests)
    local rows removed secs cpu mem
    rows=$(sed -n '2p' <<<"$out" | sed 's/.*actual rows=\([0-9]*\).*/\1/')
    removed=$(grep 'Rows Removed by Filter' <<<"$out" | sed 's/.*: *//')
    rows=$((rows + ${removed:-0}))
    IFS='|' read -r secs cpu mem <<<"$(tail -n 1 <<<"$out")"
    printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$label" "$rows" "$secs" \
        "$(/usr/bin/python3 -c "print(format(round($rows / max($secs, 0.001)), ','))")" \
        "$((after - before - 1))" "$cpu" "$mem"
}

# the rows a foreign scan returned, as the first line
scan() {
    echo "SELECT line FROM pg_temp.explain(\$q\$$1\$q\$) line WHERE line ~ 'Foreign Scan|Rows Removed';"
}
explain_fn='CREATE FUNCTION pg_temp.explain(q text) RETURNS SETOF text LANGUAGE plpgsql AS $f$
DECLARE l text; BEGIN FOR l IN EXECUTE $$EXPLAIN (ANALYZE, TIMING OFF) $$ || q LOOP RETURN NEXT l; END LOOP; END $f$;'

echo
echo "Foreign tables: $ROWS contacts in the simulator, ${BENCH_LATENCY_MS} ms per request"
echo
echo '| query | rows from Dataverse | seconds | rows/s | requests | backend CPU s | memory growth (MB) |'
echo '|---|---:|---:|---:|---:|---:|---:|'
measure "1 % of the rows, condition sent (numberofchildren = 7)" \
    "$explain_fn $(scan 'SELECT count(*) FROM dv.contacts WHERE numberofchildren = 7')"
measure "1 % of the rows, condition kept local (numberofchildren + 0 = 7)" \
    "$explain_fn $(scan 'SELECT count(*) FROM dv.contacts WHERE numberofchildren + 0 = 7')"
measure "full scan, 3 columns" \
    "$explain_fn $(scan 'SELECT count(firstname), count(lastname), count(emailaddress1) FROM dv.contacts')"
measure "full scan, every column ($(bpsql -c "SELECT count(*) FROM pg_attribute WHERE attrelid = 'dv.contacts'::regclass AND attnum > 0"))" \
    "$explain_fn $(scan 'SELECT sum(length(c::text)) FROM dv.contacts c')"

# the sync's read of the same rows: the baseline change-tracking pull
before=$(api_requests)
out=$(bpsql 2>&1 <<'SQL'
SELECT clock_timestamp() AS t0 \gset
SELECT unchanged + updated + failed + unlinked FROM d365.d365_pull_changes();
SELECT round(extract(epoch FROM clock_timestamp() - :'t0')::numeric, 2);
SQL
)
after=$(api_requests)
secs=$(tail -n 1 <<<"$out")
echo "| sync: first change-tracking pull, 3 mapped columns ($ROWS rows read, none linked) | $ROWS | $secs | $(/usr/bin/python3 -c "print(format(round($ROWS / max($secs, 0.001)), ','))") | $((after - before)) | | |"
