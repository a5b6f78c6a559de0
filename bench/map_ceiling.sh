#!/usr/bin/env bash
# Table maps at Dataverse's service-protection ceiling, as root:
#   bash bench/map_ceiling.sh
# The cost model of bench/ceiling.sh (40 ms latency per HTTP request, 20 ms
# of server time per operation, each application user's execution-time
# budget of 4 s/s enforced with 429 and Retry-After over a scaled-down
# window), on an initial sync of two maps: MAPC_ACCOUNTS companies (accounts)
# and MAPC_CONTACTS people (contacts) whose company_id references them (the
# Customer lookup parentcustomerid).  One d365_sync() sends the companies,
# then the people, each bound to its company's record.  It prints records/s
# against the ceiling (200 operations/s per application user), the requests
# the simulator counted, and the operations per $batch request: a lookup is
# part of its record's body, so it costs no request of its own.
# It reports numbers; it never fails because they are slow.
#
# Environment:
#   MAPC_ACCOUNTS=10000 MAPC_CONTACTS=50000    rows
#   MAPC_USERS=2                              application users (1 to 4)
#   CEIL_LATENCY_MS=40 CEIL_SERVER_MS=20 CEIL_BUDGET_S=12 CEIL_WINDOW_S=3 CEIL_DOP_HINT=4
#   D365_SKIP_BUILD=1                         use the installed extension
set -uo pipefail

BENCH_DIR=$(cd "$(dirname "$0")" && pwd)
. "$BENCH_DIR/../scripts/lib.sh"

LAT=${CEIL_LATENCY_MS:-40}
SRV=${CEIL_SERVER_MS:-20}
BUDGET=${CEIL_BUDGET_S:-12}
WINDOW=${CEIL_WINDOW_S:-3}
HINT=${CEIL_DOP_HINT:-4}
NA=${MAPC_ACCOUNTS:-10000}
NC=${MAPC_CONTACTS:-50000}
USERS=${MAPC_USERS:-2}
DB=d365mapceiling
POOL_IDS=(33333333-3333-4333-8333-333333333333 44444444-4444-4444-8444-444444444444
          55555555-5555-4555-8555-555555555555)
POOL_SECRET=pool-secret

trap d365_stop_all EXIT
trap 'exit 130' INT TERM

if [ "${D365_SKIP_BUILD:-}" != 1 ]; then
    d365_install_packages || exit 1
    d365_build || exit 1
fi
d365_start_cluster "$DB" || exit 1
d365_start_sim --latency-ms "$LAT" --per-record-ms "$SRV" --exec-budget-s "$BUDGET" \
    --window-s "$WINDOW" --dop-hint "$HINT" --app-user "${POOL_IDS[0]}:$POOL_SECRET" \
    --app-user "${POOL_IDS[1]}:$POOL_SECRET" --app-user "${POOL_IDS[2]}:$POOL_SECRET" || exit 1
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
CREATE TABLE companies (id integer PRIMARY KEY, name text NOT NULL, website text,
                        employees integer, revenue numeric(14,2), industry text);
CREATE TABLE people (id bigint PRIMARY KEY, first_name text, last_name text NOT NULL,
                     email text, phone text, city text,
                     company_id integer REFERENCES companies);
INSERT INTO companies
SELECT g, 'Company ' || g, 'https://c' || g || '.example', g % 5000, (g % 1000) * 1000.0,
       (ARRAY['Consulting', 'Financial', 'Insurance', 'Wholesale'])[1 + g % 4]
  FROM generate_series(1, $NA) g;
INSERT INTO people
SELECT g, 'First' || g, 'Last' || g, 'user' || g || '@bench.example',
       '+1 555 ' || lpad(g::text, 7, '0'),
       (ARRAY['Berlin', 'Paris', 'Oslo', 'Rome', 'Madrid', 'Lisbon'])[1 + g % 6],
       1 + g % $NA
  FROM generate_series(1, $NC) g;
SELECT d365.d365_map_table('company', 'companies', 'accounts');
SELECT d365.d365_map_column('company', c, f)
  FROM (VALUES ('name', 'name'), ('website', 'websiteurl'), ('employees', 'numberofemployees'),
               ('revenue', 'revenue'), ('industry', 'industrycode')) m(c, f);
SELECT d365.d365_map_table('person', 'people', 'contacts');
SELECT d365.d365_map_column('person', c, f)
  FROM (VALUES ('first_name', 'firstname'), ('last_name', 'lastname'), ('email', 'emailaddress1'),
               ('phone', 'telephone1'), ('city', 'address1_city'),
               ('company_id', 'parentcustomerid')) m(c, f);
VACUUM ANALYZE companies;
VACUUM ANALYZE people;
SQL
for ((u = 1; u < USERS; u++)); do
    q -c "INSERT INTO d365.app_users (client_id, client_secret) VALUES ('${POOL_IDS[u-1]}', '$POOL_SECRET')" >/dev/null || exit 1
done
"$D365_SIMCTL" config "{\"exec_budget_s\": $BUDGET}" && "$D365_SIMCTL" reset-stats || exit 1

d365_log "initial sync of $NA companies and $NC people, $USERS application user(s)"
out=$(q <<'SQL'
SELECT clock_timestamp() AS t0 \gset
SELECT string_agg(format('%s:%s:%s:%s', map, created, failed, requests), ' ') AS runs FROM d365.d365_sync() \gset
SELECT round(extract(epoch FROM clock_timestamp() - :'t0'::timestamptz)::numeric, 3) AS secs \gset
SELECT count(*) FILTER (WHERE p.dynamics365_related_id IS NOT NULL) AS linked FROM people p \gset
\echo RESULT :secs :linked :runs
SQL
)
res=$(grep '^RESULT ' <<<"$out")
[ -n "$res" ] || { echo "the sync failed"; echo "$out" | head -n 20; exit 1; }
read -r _ secs linked runs <<<"$res"
stats=$("$D365_SIMCTL" stats | /usr/bin/python3 -c '
import json, sys
d = json.load(sys.stdin)
u = d["users"]
print(sum(x["requests"] for x in u.values()), sum(x["throttled"] for x in u.values()),
      max([x["max_inflight"] for x in u.values()] or [0]))')
read -r req thr mx <<<"$stats"
# the people's parentcustomerid in Dynamics: every contact bound to an account
bound=$("$D365_SIMCTL" rows contact | /usr/bin/python3 -c '
import json, sys
print(sum(1 for r in json.load(sys.stdin)["value"] if r.get("_parentcustomerid_value")))')

echo
echo "Table maps at the service-protection ceiling"
echo "Cost model: ${LAT} ms latency per HTTP request, ${SRV} ms server time per operation,"
echo "execution-time budget ${BUDGET} s per ${WINDOW} s per application user, x-ms-dop-hint ${HINT}."
echo "PostgreSQL: $("$PG_BIN/postgres" --version)"
echo
/usr/bin/python3 - "$secs" "$NA" "$NC" "$USERS" "$SRV" "$BUDGET" "$WINDOW" "$req" "$thr" "$mx" "$bound" "$runs" <<'PY'
import sys
secs, na, nc, users, srv, budget, window = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), \
    int(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6]), float(sys.argv[7])
req, thr, mx, bound, runs = int(sys.argv[8]), int(sys.argv[9]), int(sys.argv[10]), int(sys.argv[11]), sys.argv[12]
ceil = users * budget / window / (srv / 1000.0)
records = na + nc
rate = records / secs if secs else 0
print("| records | seconds | records/s | ceiling (ops/s) | % of ceiling | requests | throttled | operations per request | contacts bound to an account |")
print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
print("| %s (%s accounts + %s contacts) | %.1f | %.0f | %.0f | %.0f %% | %d | %d | %.1f | %s |" % (
    "{:,}".format(records), "{:,}".format(na), "{:,}".format(nc), secs, rate, ceil,
    100.0 * rate / ceil, req, thr, records / req if req else 0, "{:,}".format(bound)))
print()
print("runs (map:created:failed:requests): " + runs)
PY
