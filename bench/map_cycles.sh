#!/usr/bin/env bash
# What lookups that close a cycle of the maps' order cost, as root:
#   bash bench/map_cycles.sh
# On the simulator without a cost model (no latency):
#   1. no cycle: CYC_ROWS companies and CYC_ROWS people whose company_id
#      references them (maps company, person).  The initial d365_sync(), the
#      check of its second pass (d365._map_owes_lookups, run for each map
#      after the maps linked rows: it finds no column closing a cycle), and
#      an idle d365_sync();
#   2. a self-reference: CYC_ROWS organisations, each but the first the
#      child of another (parent_id = id / 2, parentaccountid), inserted at
#      once: one d365_sync() creates them all without their parent and its
#      second pass sends the CYC_ROWS - 1 parents as updates; against the
#      same rows with parent_id not mapped (one pass, creates only), and
#      with an update of every row after its create: the second pass's
#      updates are updates of rows just created, whose ETag is not known, so
#      each record is read and merged first (docs/table-maps.md, Conflicts),
#      as for any update of such rows.
# It reports numbers; it never fails because they are slow.
#
# Environment:
#   CYC_ROWS=10000        rows per table
#   CYC_CHECKS=50         calls of the check timed (the mean is printed)
#   D365_SKIP_BUILD=1     use the installed extension
set -uo pipefail

BENCH_DIR=$(cd "$(dirname "$0")" && pwd)
. "$BENCH_DIR/../scripts/lib.sh"

N=${CYC_ROWS:-10000}
CHECKS=${CYC_CHECKS:-50}
DB=d365mapcycles

trap d365_stop_all EXIT
trap 'exit 130' INT TERM

if [ "${D365_SKIP_BUILD:-}" != 1 ]; then
    d365_install_packages || exit 1
    d365_build || exit 1
fi
d365_start_cluster "$DB" || exit 1
d365_start_sim || exit 1
psql -X -q -v ON_ERROR_STOP=1 -d postgres -c "CREATE DATABASE $DB" || exit 1
q() { psql -X -q -At -v ON_ERROR_STOP=1 -P pager=off -d "$DB" "$@"; }

"$D365_SIMCTL" config '{"log_bodies": false, "log_limit": 10000}' || exit 1
q <<SQL || exit 1
SET client_min_messages = warning;
CREATE EXTENSION d365sync;
UPDATE d365.settings
   SET org_url = '$D365_SIM_URL', authority_url = '$D365_SIM_URL',
       tenant_id = '11111111-1111-1111-1111-111111111111',
       client_id = '22222222-2222-2222-2222-222222222222', client_secret = 'sim-secret';
CREATE TABLE companies (id integer PRIMARY KEY, name text NOT NULL, website text);
CREATE TABLE people (id integer PRIMARY KEY, last_name text NOT NULL, email text,
                     company_id integer REFERENCES companies);
CREATE TABLE orgs (id integer PRIMARY KEY, name text NOT NULL, website text,
                   parent_id integer REFERENCES orgs);
CREATE TABLE orgs_flat (id integer PRIMARY KEY, name text NOT NULL, website text,
                        parent_id integer REFERENCES orgs_flat);
SELECT d365.d365_map_table('company', 'companies', 'accounts');
SELECT d365.d365_map_column('company', 'name', 'name');
SELECT d365.d365_map_column('company', 'website', 'websiteurl');
SELECT d365.d365_map_table('person', 'people', 'contacts');
SELECT d365.d365_map_column('person', 'last_name', 'lastname');
SELECT d365.d365_map_column('person', 'email', 'emailaddress1');
SELECT d365.d365_map_column('person', 'company_id', 'parentcustomerid');
SELECT d365.d365_map_table('org', 'orgs', 'accounts');
SELECT d365.d365_map_column('org', 'name', 'name');
SELECT d365.d365_map_column('org', 'website', 'websiteurl');
SELECT d365.d365_map_column('org', 'parent_id', 'parentaccountid');
SELECT d365.d365_map_table('org_flat', 'orgs_flat', 'accounts');
SELECT d365.d365_map_column('org_flat', 'name', 'name');
SELECT d365.d365_map_column('org_flat', 'website', 'websiteurl');
-- run by name only (d365_sync() without a map leaves them out)
UPDATE d365.table_map SET enabled = false WHERE name IN ('org', 'org_flat');
INSERT INTO companies SELECT g, 'Company ' || g, 'https://c' || g || '.example' FROM generate_series(1, $N) g;
INSERT INTO people SELECT g, 'Last' || g, 'user' || g || '@bench.example', g FROM generate_series(1, $N) g;
INSERT INTO orgs SELECT g, 'Org ' || g, 'https://o' || g || '.example', NULLIF(g / 2, 0) FROM generate_series(1, $N) g;
INSERT INTO orgs_flat SELECT g, 'Flat ' || g, 'https://f' || g || '.example', NULLIF(g / 2, 0) FROM generate_series(1, $N) g;
VACUUM ANALYZE companies, people, orgs, orgs_flat;
SQL

# timed SQL: prints "seconds|result"
timed() {
    q <<SQL
SELECT clock_timestamp() AS t0 \gset
SELECT ($1) AS res \gset
SELECT round(extract(epoch FROM clock_timestamp() - :'t0'::timestamptz)::numeric, 3) || '|' || :'res';
SQL
}
# sync_sql MAP-ARG: the d365_sync() call's rows as map:created/updated/failed:requests
sync_sql() {
    echo "(SELECT string_agg(format('%s:%s/%s/%s:%s', map, created, updated, failed, requests), ' ')
             FROM d365.d365_sync(${1:-}))"
}
# check_ms MAP...: the mean time of d365._map_owes_lookups (ms) and how many calls said true
check_ms() {
    local maps
    maps=$(printf "'%s'," "$@"); maps=${maps%,}
    q <<SQL
SELECT clock_timestamp() AS t0 \gset
SELECT count(*) FILTER (WHERE d365._map_owes_lookups(m)) AS owes
  FROM generate_series(1, $CHECKS), unnest(ARRAY[$maps]) m \gset
SELECT round(extract(epoch FROM clock_timestamp() - :'t0'::timestamptz)::numeric * 1000 / ($CHECKS * $#), 3) || '|' || :'owes';
SQL
}

d365_log "1. no cycle: $N companies + $N people"
first=$(timed "$(sync_sql)")
check=$(check_ms company person)
idle=$(timed "$(sync_sql)")

d365_log "2. a self-reference: $N organisations, parent_id = id / 2"
flat=$(timed "$(sync_sql "'org_flat'")")
q -c "UPDATE orgs_flat SET website = website || '/new'" || exit 1
flat_upd=$(timed "$(sync_sql "'org_flat'")")
self=$(timed "$(sync_sql "'org'")")
owing=$(q -c "SELECT count(*) FROM d365.map_row WHERE map = 'org' AND change_seq > synced_seq")
# each run's own time (d365.sync_run): org_flat's create and update, org's two passes
passes=$(q -c "SELECT string_agg(format('%s %s/%s %s s', kind, created, updated,
                      round(extract(epoch FROM finished_at - started_at)::numeric, 1)), '; ' ORDER BY id)
                 FROM d365.sync_run WHERE kind IN ('map:org', 'map:org_flat')")
parents=$("$D365_SIMCTL" rows account | /usr/bin/python3 -c '
import json, sys
print(sum(1 for r in json.load(sys.stdin)["value"] if r.get("_parentaccountid_value")))')
check_self=$(check_ms org)
idle_self=$(timed "$(sync_sql "'org'")")

echo
echo "Lookups closing a cycle: the second pass of d365_sync()"
echo "Simulator without a cost model (no latency); $N rows per table."
echo "PostgreSQL: $("$PG_BIN/postgres" --version)"
echo
echo "| case | seconds | runs (map:created/updated/failed:requests) |"
echo "|---|---:|---|"
echo "| no cycle: initial d365_sync() of $N companies + $N people | ${first%%|*} | ${first#*|} |"
echo "| no cycle: idle d365_sync() | ${idle%%|*} | ${idle#*|} |"
echo "| self-reference not mapped: d365_sync('org_flat'), $N rows | ${flat%%|*} | ${flat#*|} |"
echo "| self-reference not mapped: d365_sync('org_flat') after an UPDATE of the $N rows' website | ${flat_upd%%|*} | ${flat_upd#*|} |"
echo "| self-reference mapped: d365_sync('org'), $N rows, $((N - 1)) parents owed | ${self%%|*} | ${self#*|} |"
echo "| self-reference mapped: idle d365_sync('org') | ${idle_self%%|*} | ${idle_self#*|} |"
echo
echo "check of the second pass (d365._map_owes_lookups), mean of $CHECKS calls:"
echo "  maps without a column closing a cycle (company, person): ${check%%|*} ms per map (said true ${check#*|} times)"
echo "  map org after its sync ($N rows, none owing: every row read): ${check_self%%|*} ms (said true ${check_self#*|} times)"
echo "runs (kind created/updated time): $passes"
echo "after d365_sync('org'): $parents records with a parent account in Dynamics; rows still pending: $owing"
