#!/usr/bin/env bash
# The cost of matching existing Dynamics contacts, as root:
#   bash bench/matching.sh
# Starts a throwaway PostgreSQL 15 cluster and the Dataverse simulator with
# the benchmark's latency model (30 ms per HTTP request + 1 ms per record
# operation; env BENCH_LATENCY_MS, BENCH_PER_RECORD_MS).  Dynamics first
# receives half of N contacts (from another database); then the initial
# sync of all N contacts runs twice, in fresh installations:
#   without match fields  every contact is created (N/2 duplicates)
#   with email as match   N/2 are linked, N/2 created, no duplicate
# and prints a markdown table (seconds, requests, look-ups, created, linked,
# Dynamics contacts).  It reports numbers; it never fails because they are
# slow.
#
# Environment:
#   BENCH_MATCH_SIZE=4000                         contacts (N)
#   BENCH_LATENCY_MS=30 BENCH_PER_RECORD_MS=1     simulator latency model
#   D365_SKIP_BUILD=1                             use the installed extension
set -uo pipefail

BENCH_DIR=$(cd "$(dirname "$0")" && pwd)
. "$BENCH_DIR/../scripts/lib.sh"

N=${BENCH_MATCH_SIZE:-4000}
BENCH_LATENCY_MS=${BENCH_LATENCY_MS:-30}
BENCH_PER_RECORD_MS=${BENCH_PER_RECORD_MS:-1}
trap d365_stop_all EXIT
trap 'exit 130' INT TERM

if [ "${D365_SKIP_BUILD:-}" != 1 ]; then
    d365_install_packages || exit 1
    d365_build || exit 1
fi
d365_start_cluster d365bench || exit 1
d365_start_sim --latency-ms "$BENCH_LATENCY_MS" --per-record-ms "$BENCH_PER_RECORD_MS" || exit 1
"$D365_SIMCTL" config '{"log_bodies": false, "log_limit": 100000}' >/dev/null || exit 1

# install DB ROWS: a fresh database with d365sync configured and an attached,
# mapped table holding contacts 1..ROWS (every other one when ROWS is
# "even": the half that Dynamics has already).
install() {
    local db=$1 rows=$2 filter=true
    [ "$rows" = even ] && { rows=$N; filter="g % 2 = 0"; }
    psql -X -q -d postgres -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db" >/dev/null || return 1
    psql -X -q -v ON_ERROR_STOP=1 -d "$db" >/dev/null <<SQL
CREATE EXTENSION d365sync;
CREATE TABLE person (id integer PRIMARY KEY, first_name text, last_name text,
                     email text, city text, score integer NOT NULL);
INSERT INTO person
SELECT g, 'First' || g, 'Last' || g, 'user' || g || '@bench.example',
       (ARRAY['Berlin', 'Paris', 'Oslo'])[1 + g % 3], 50
  FROM generate_series(1, $rows) g WHERE $filter;
UPDATE d365.settings
   SET org_url = '$D365_SIM_URL', authority_url = '$D365_SIM_URL',
       tenant_id = '11111111-1111-1111-1111-111111111111',
       client_id = '22222222-2222-2222-2222-222222222222',
       client_secret = 'sim-secret', contact_sync_enabled = true, min_score = 1;
SELECT d365.d365_attach_contacts('person');
INSERT INTO d365.field_map VALUES
    ('first_name', 'firstname'), ('last_name', 'lastname'), ('email', 'emailaddress1'),
    ('city', 'address1_city');
SQL
}

# run DB LABEL: the initial sync, timed; one line of the table.
run() {
    local db=$1 label=$2 t0 t1 out lookups total
    "$D365_SIMCTL" clear-requests >/dev/null
    t0=$(date +%s.%N)
    out=$(psql -X -q -At -F ' ' -d "$db" -c "SELECT created, updated, unchanged, failed, requests FROM d365.d365_sync_contacts()")
    t1=$(date +%s.%N)
    lookups=$("$D365_SIMCTL" requests --kind api | /usr/bin/python3 -c \
        'import json,sys; print(sum(1 for r in json.load(sys.stdin)["requests"] if r["method"] == "GET" and "$filter=" in r["path"]))')
    total=$("$D365_SIMCTL" rows contact | /usr/bin/python3 -c 'import json,sys; print(len(json.load(sys.stdin)["value"]))')
    read -r created updated unchanged failed requests <<<"$out"
    printf '| %s | %.2f | %s | %s | %s | %s | %s | %s |\n' "$label" "$(/usr/bin/python3 -c "print($t1 - $t0)")" \
        "$requests" "$lookups" "$created" "$((updated + unchanged))" "$failed" "$total"
}

d365_log "Dynamics receives the $((N / 2)) even-numbered contacts"
install bench_seed even || exit 1
psql -X -q -d bench_seed -c "SELECT d365.d365_sync_contacts()" >/dev/null || exit 1
"$D365_SIMCTL" rows contact | /usr/bin/python3 -c 'import json,sys; print("# contacts in Dynamics:", len(json.load(sys.stdin)))'

echo
echo "Initial sync of $N contacts, $((N / 2)) of them in Dynamics already ($BENCH_LATENCY_MS ms per request, $BENCH_PER_RECORD_MS ms per record)"
echo
echo "| run | seconds | requests | look-ups | created | linked | failed | Dynamics contacts after |"
echo "|---|---|---|---|---|---|---|---|"
install bench_plain "$N" || exit 1
run bench_plain "no match field"
"$D365_SIMCTL" reset >/dev/null
"$D365_SIMCTL" config '{"log_bodies": false, "log_limit": 100000}' >/dev/null
psql -X -q -d bench_seed -c "UPDATE person SET dynamics365_related_id = NULL; UPDATE d365.contact_state SET synced = NULL, synced_seq = 0" >/dev/null
psql -X -q -d bench_seed -c "SELECT d365.d365_sync_contacts()" >/dev/null || exit 1
install bench_match "$N" || exit 1
psql -X -q -d bench_match -c "UPDATE d365.field_map SET match = true WHERE column_name = 'email'" >/dev/null
run bench_match "email is the match field"
