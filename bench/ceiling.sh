#!/usr/bin/env bash
# Throughput at Dataverse's service-protection ceiling, as root:
#   bash bench/ceiling.sh
# Starts a throwaway PostgreSQL 15 cluster and the Dataverse simulator with
# a cost model close to Dataverse's: 40 ms latency per HTTP request, 20 ms of
# server time per operation (a $batch runs its operations one after
# another), and each application user's execution-time budget enforced with
# 429 0x80072321 and Retry-After -- at Dataverse's ratio of 4 s of server
# time per second, over a window scaled down from 1,200 s per 300 s to
# 12 s per 3 s so that the ceiling binds within seconds.  The ceiling of n
# application users is n x 4 s/s / 20 ms = 200 x n operations per second.
# It measures the initial sync with 1 and 2 application users (CEIL_USERS; the others
# in d365.app_users, when this version has that table) and in per-record
# mode (d365sync.batch_size = 1), and prints contacts/s, the share of the
# ceiling, throttled requests and the most requests one user had in flight.
# It reports numbers; it never fails because they are slow.
#
# Environment:
#   CEIL_LATENCY_MS=40 CEIL_SERVER_MS=20         cost model
#   CEIL_BUDGET_S=12 CEIL_WINDOW_S=3             execution-time budget
#   CEIL_DOP_HINT=4                              x-ms-dop-hint
#   CEIL_CONTACTS=12000 CEIL_PER_RECORD=2000     contacts per run
#   CEIL_USERS="1 2"                             application users per run (up to 4)
#   D365_SKIP_BUILD=1                            use the installed extension
set -uo pipefail

BENCH_DIR=$(cd "$(dirname "$0")" && pwd)
. "$BENCH_DIR/../scripts/lib.sh"

LAT=${CEIL_LATENCY_MS:-40}
SRV=${CEIL_SERVER_MS:-20}
BUDGET=${CEIL_BUDGET_S:-12}
WINDOW=${CEIL_WINDOW_S:-3}
HINT=${CEIL_DOP_HINT:-4}
N=${CEIL_CONTACTS:-12000}
NPR=${CEIL_PER_RECORD:-2000}
DB=d365ceiling
USER_COUNTS=${CEIL_USERS:-1 2}
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
RESULTS=$D365_WORK/ceiling.tsv
: >"$RESULTS"

q() { psql -X -q -At -v ON_ERROR_STOP=1 -P pager=off -d "$DB" "$@"; }

# setup N USERS: a fresh extension, an N-contact table (9 mapped columns),
# and USERS application users (the settings' one, plus the pool's).
setup() {
    local n=$1 users=$2
    "$D365_SIMCTL" reset || return 1
    "$D365_SIMCTL" config '{"log_bodies": false, "log_limit": 10000}' || return 1
    q <<SQL
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS d365sync CASCADE;
DROP TABLE IF EXISTS ceil_contact;
CREATE EXTENSION d365sync;
CREATE TABLE ceil_contact (
    id bigint PRIMARY KEY, first_name text, last_name text, email text, phone text,
    city text, birthday date, last_seen timestamptz, kids integer, no_email boolean,
    score integer NOT NULL);
INSERT INTO ceil_contact
SELECT g, 'First' || g, 'Last' || g, 'user' || g || '@bench.example',
       '+1 555 ' || lpad(g::text, 7, '0'),
       (ARRAY['Berlin', 'Paris', 'Oslo', 'Rome', 'Madrid', 'Lisbon'])[1 + g % 6],
       date '1950-01-01' + (g % 20000),
       timestamptz '2024-01-01 00:00:00+00' + g * interval '1 minute',
       g % 5, g % 2 = 0, 1 + g % 100
  FROM generate_series(1, $n) g;
UPDATE d365.settings
   SET org_url = '$D365_SIM_URL', authority_url = '$D365_SIM_URL',
       tenant_id = '11111111-1111-1111-1111-111111111111',
       client_id = '22222222-2222-2222-2222-222222222222',
       client_secret = 'sim-secret', contact_sync_enabled = true, min_score = 1;
SELECT d365.d365_attach_contacts('ceil_contact');
INSERT INTO d365.field_map VALUES
    ('first_name', 'firstname'), ('last_name', 'lastname'), ('email', 'emailaddress1'),
    ('phone', 'telephone1'), ('city', 'address1_city'), ('birthday', 'birthdate'),
    ('last_seen', 'lastusedincampaign'), ('kids', 'numberofchildren'),
    ('no_email', 'donotemail');
VACUUM ANALYZE ceil_contact;
SQL
    [ $? -eq 0 ] || return 1
    local u
    for ((u = 1; u < users; u++)); do
        q -c "INSERT INTO d365.app_users (client_id, client_secret) VALUES ('${POOL_IDS[u-1]}', '$POOL_SECRET')" \
            >/dev/null 2>&1 || return 2
    done
    # the budgets start empty for every scenario
    "$D365_SIMCTL" config "{\"exec_budget_s\": $BUDGET}" && "$D365_SIMCTL" reset-stats
}

# measure LABEL USERS N MODE [PRE_SQL]
measure() {
    local label=$1 users=$2 n=$3 mode=$4 pre=${5:-}
    setup "$n" "$users"
    case $? in
        0) ;;
        2) echo "    $label: skipped (this version has no d365.app_users)"
           printf '%s\t%s\t%s\t%s\tSKIPPED\n' "$label" "$users" "$n" "$mode" >>"$RESULTS"
           return 0 ;;
        *) echo "    $label: set-up failed"; return 1 ;;
    esac
    local out
    out=$(q <<SQL
$pre
SELECT clock_timestamp() AS t0 \gset
SELECT created, failed FROM d365.d365_sync_contacts() \gset r_
SELECT round(extract(epoch FROM clock_timestamp() - :'t0'::timestamptz)::numeric, 3) AS secs \gset
\echo RESULT :secs :r_created :r_failed
SQL
)
    local res secs created failed
    res=$(grep '^RESULT ' <<<"$out")
    if [ -z "$res" ]; then
        echo "    $label: the sync failed"; echo "$out" | head -n 20
        printf '%s\t%s\t%s\t%s\tFAILED\n' "$label" "$users" "$n" "$mode" >>"$RESULTS"
        return 1
    fi
    read -r _ secs created failed <<<"$res"
    local stats
    stats=$("$D365_SIMCTL" stats | /usr/bin/python3 -c '
import json, sys
u = json.load(sys.stdin)["users"]
req = sum(x["requests"] for x in u.values())
thr = sum(x["throttled"] for x in u.values())
mx = max([x["max_inflight"] for x in u.values()] or [0])
print(req, thr, mx, len([x for x in u.values() if x["requests"]]))')
    local req thr mx active
    read -r req thr mx active <<<"$stats"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$label" "$users" "$n" "$mode" \
        "$secs" "$created" "$failed" "$req" "$thr" "$mx" "$active" >>"$RESULTS"
    printf '    %-28s %8.3f s  created %s failed %s  requests %s throttled %s  max in flight per user %s  users that sent %s\n' \
        "$label" "$secs" "$created" "$failed" "$req" "$thr" "$mx" "$active"
}

echo
echo "d365sync at the service-protection ceiling"
echo "Cost model: ${LAT} ms latency per HTTP request, ${SRV} ms server time per operation"
echo "(a \$batch runs its operations one after another), execution-time budget ${BUDGET} s"
echo "per ${WINDOW} s per application user (Dataverse: 1,200 s per 300 s, the same 4 s/s),"
echo "x-ms-dop-hint ${HINT}; simulator on 127.0.0.1."
echo "PostgreSQL: $("$PG_BIN/postgres" --version)"
echo

for u in $USER_COUNTS; do
    d365_log "initial sync, $u application user(s)"
    measure "batched, $u user$([ "$u" -gt 1 ] && echo s)" "$u" "$N" batched
done
d365_log "initial sync, per-record mode"
measure "per-record, 1 user" 1 "$NPR" per-record "SET d365sync.batch_size = 1;"

echo
/usr/bin/python3 - "$RESULTS" "$SRV" "$BUDGET" "$WINDOW" <<'PY'
import sys
path, srv, budget, window = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
per_user = budget / window / (srv / 1000.0)
cps_by = {}
print("| scenario | contacts | seconds | contacts/s | ceiling (ops/s) | % of ceiling | requests | throttled | max in flight per user |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for line in open(path):
    p = line.rstrip("\n").split("\t")
    label, users, n = p[0], int(p[1]), int(p[2])
    if p[4] in ("FAILED", "SKIPPED"):
        print("| %s | %s | %s | – | – | – | – | – | – |" % (label, "{:,}".format(n), p[4].lower()))
        continue
    secs, created, failed, req, thr, mx = float(p[4]), int(p[5]), int(p[6]), int(p[7]), int(p[8]), int(p[9])
    cps = created / secs if secs > 0 else 0.0
    cps_by[label] = cps
    ceil = per_user * users
    print("| %s | %s | %.2f | %.0f | %.0f | %.0f %% | %d | %d (%.1f %%) | %d |" % (
        label, "{:,}".format(created), secs, cps, ceil, 100.0 * cps / ceil, req + thr, thr,
        100.0 * thr / (req + thr) if req + thr else 0.0, mx))
one, two = cps_by.get("batched, 1 user"), cps_by.get("batched, 2 users")
if one and two:
    print()
    print("2 application users / 1: %.2fx" % (two / one))
PY
