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
# The budget sustains about 4 $batches of 100 in flight per user.
# It measures the initial sync for each x-ms-dop-hint in CEIL_HINTS (4:
# the hint matches the budget; 8 and 32: above it), with 1 and 2
# application users (CEIL_USERS; the others in d365.app_users, when this
# version has that table), with and without the budget headers
# (x-ms-ratelimit-time-remaining-xrm-requests and
# x-ms-ratelimit-burst-remaining-xrm-requests), then per-record mode
# (d365sync.batch_size = 1) and a short sync (CEIL_SHORT contacts) at the
# first hint.  It prints contacts/s, the share of the ceiling, throttled
# requests, requests sent while their user was throttled (the simulator
# answers them with a longer Retry-After) and the most requests one user
# had in flight.  It reports numbers; it never fails because they are slow.
#
# Environment:
#   CEIL_LATENCY_MS=40 CEIL_SERVER_MS=20         cost model
#   CEIL_BUDGET_S=12 CEIL_WINDOW_S=3             execution-time budget
#   CEIL_HINTS="4 8 32"                          x-ms-dop-hint of each run
#   CEIL_HEADERS="on off"                        budget headers sent or not
#   CEIL_CONTACTS=6000 CEIL_PER_RECORD=2000      contacts per run (0: skip)
#   CEIL_SHORT=50                                the short sync (0: skip)
#   CEIL_USERS="1 2"                             application users per run (up to 4)
#   CEIL_REPEAT=1                                runs of each configuration
#   CEIL_PRE_SQL=                                SQL before each sync (settings)
#   CEIL_TELL_BUDGET=1                           tell the governor the model's budget and window
#                                                (d365sync.budget_seconds, budget_window_seconds;
#                                                0 for a version without them)
#   CEIL_LOG_DIR=                                keep each run's request log (JSON) there
#   D365_SKIP_BUILD=1                            use the installed extension
set -uo pipefail

BENCH_DIR=$(cd "$(dirname "$0")" && pwd)
. "$BENCH_DIR/../scripts/lib.sh"

LAT=${CEIL_LATENCY_MS:-40}
SRV=${CEIL_SERVER_MS:-20}
BUDGET=${CEIL_BUDGET_S:-12}
WINDOW=${CEIL_WINDOW_S:-3}
HINTS=${CEIL_HINTS:-${CEIL_DOP_HINT:-4 8 32}}
HEADERS=${CEIL_HEADERS:-on off}
N=${CEIL_CONTACTS:-6000}
NPR=${CEIL_PER_RECORD:-2000}
NSHORT=${CEIL_SHORT:-50}
REPEAT=${CEIL_REPEAT:-1}
PRE_SQL=${CEIL_PRE_SQL:-}
if [ "${CEIL_TELL_BUDGET:-1}" = 1 ]; then
    PRE_SQL="SET d365sync.budget_seconds = $BUDGET; SET d365sync.budget_window_seconds = $WINDOW; $PRE_SQL"
fi
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
    --window-s "$WINDOW" --app-user "${POOL_IDS[0]}:$POOL_SECRET" \
    --app-user "${POOL_IDS[1]}:$POOL_SECRET" --app-user "${POOL_IDS[2]}:$POOL_SECRET" || exit 1
psql -X -q -v ON_ERROR_STOP=1 -d postgres -c "CREATE DATABASE $DB" || exit 1
RESULTS=$D365_WORK/ceiling.tsv
: >"$RESULTS"

q() { psql -X -q -At -v ON_ERROR_STOP=1 -P pager=off -d "$DB" "$@"; }

# setup N USERS HINT HEADERS: a fresh extension, an N-contact table (9
# mapped columns), and USERS application users (the settings' one, plus
# the pool's); the simulator's hint, with the budget headers or not.
setup() {
    local n=$1 users=$2 hint=$3 headers=$4
    "$D365_SIMCTL" reset || return 1
    "$D365_SIMCTL" config "{\"log_bodies\": false, \"log_limit\": 10000, \"dop_hint\": $hint,
        \"ratelimit_headers\": $([ "$headers" = on ] && echo true || echo false)}" >/dev/null || return 1
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
    "$D365_SIMCTL" config "{\"exec_budget_s\": $BUDGET}" >/dev/null && "$D365_SIMCTL" reset-stats >/dev/null
}

# measure LABEL USERS N MODE HINT HEADERS [PRE_SQL]
measure() {
    local label=$1 users=$2 n=$3 mode=$4 hint=$5 headers=$6 pre="$PRE_SQL ${7:-}"
    setup "$n" "$users" "$hint" "$headers"
    case $? in
        0) ;;
        2) echo "    $label: skipped (this version has no d365.app_users)"
           printf '%s\t%s\t%s\t%s\t%s\t%s\tSKIPPED\n' "$label" "$users" "$n" "$mode" "$hint" "$headers" >>"$RESULTS"
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
        printf '%s\t%s\t%s\t%s\t%s\t%s\tFAILED\n' "$label" "$users" "$n" "$mode" "$hint" "$headers" >>"$RESULTS"
        return 1
    fi
    read -r _ secs created failed <<<"$res"
    [ -n "${CEIL_LOG_DIR:-}" ] && "$D365_SIMCTL" requests --kind api \
        >"$CEIL_LOG_DIR/$mode-$hint-$headers-$users.json"
    local stats
    stats=$("$D365_SIMCTL" stats | /usr/bin/python3 -c '
import json, sys
u = json.load(sys.stdin)["users"]
req = sum(x["requests"] for x in u.values())
thr = sum(x["throttled"] for x in u.values())
swt = sum(x.get("sent_while_throttled", 0) for x in u.values())
mx = max([x["max_inflight"] for x in u.values()] or [0])
print(req, thr, mx, len([x for x in u.values() if x["requests"]]), swt)')
    local req thr mx active swt
    read -r req thr mx active swt <<<"$stats"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$label" "$users" "$n" "$mode" \
        "$hint" "$headers" "$secs" "$created" "$failed" "$req" "$thr" "$mx" "$active" "$swt" >>"$RESULTS"
    printf '    %-34s %8.3f s  created %s failed %s  requests %s throttled %s (%s while throttled)  max in flight per user %s  users that sent %s\n' \
        "$label" "$secs" "$created" "$failed" "$req" "$thr" "$swt" "$mx" "$active"
}

echo
echo "d365sync at the service-protection ceiling"
echo "Cost model: ${LAT} ms latency per HTTP request, ${SRV} ms server time per operation"
echo "(a \$batch runs its operations one after another), execution-time budget ${BUDGET} s"
echo "per ${WINDOW} s per application user (Dataverse: 1,200 s per 300 s, the same 4 s/s),"
echo "x-ms-dop-hint ${HINTS}; budget headers ${HEADERS}; simulator on 127.0.0.1."
echo "PostgreSQL: $("$PG_BIN/postgres" --version); load average: $(cut -d' ' -f1-3 /proc/loadavg)"
echo

FIRST_HINT=${HINTS%% *}
FIRST_HEADERS=${HEADERS%% *}
for ((rep = 1; rep <= REPEAT; rep++)); do
    if [ "$N" -gt 0 ]; then
        for hint in $HINTS; do
            for headers in $HEADERS; do
                for u in $USER_COUNTS; do
                    d365_log "initial sync, hint $hint, headers $headers, $u application user(s)"
                    measure "hint $hint, headers $headers, $u user$([ "$u" -gt 1 ] && echo s)" \
                        "$u" "$N" batched "$hint" "$headers"
                done
            done
        done
    fi
    if [ "$NPR" -gt 0 ]; then
        d365_log "initial sync, per-record mode"
        measure "per-record, hint $FIRST_HINT, 1 user" 1 "$NPR" per-record "$FIRST_HINT" \
            "$FIRST_HEADERS" "SET d365sync.batch_size = 1;"
    fi
    if [ "$NSHORT" -gt 0 ]; then
        d365_log "short sync"
        measure "short sync, hint $FIRST_HINT, 1 user" 1 "$NSHORT" short "$FIRST_HINT" "$FIRST_HEADERS"
    fi
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"

echo
/usr/bin/python3 - "$RESULTS" "$SRV" "$BUDGET" "$WINDOW" <<'PY'
import sys
path, srv, budget, window = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
per_user = budget / window / (srv / 1000.0)
print("| scenario | contacts | seconds | contacts/s | ceiling (ops/s) | % of ceiling | requests | throttled | sent while throttled | max in flight per user |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for line in open(path):
    p = line.rstrip("\n").split("\t")
    label, users, n = p[0], int(p[1]), int(p[2])
    if p[6] in ("FAILED", "SKIPPED"):
        print("| %s | %s | %s | – | – | – | – | – | – | – |" % (label, "{:,}".format(n), p[6].lower()))
        continue
    secs, created, failed, req, thr, mx, swt = (float(p[6]), int(p[7]), int(p[8]), int(p[9]),
                                                int(p[10]), int(p[11]), int(p[13]))
    cps = created / secs if secs > 0 else 0.0
    ceil = per_user * users
    print("| %s | %s | %.2f | %.0f | %.0f | %.0f %% | %d | %d (%.1f %%) | %d | %d |" % (
        label, "{:,}".format(created), secs, cps, ceil, 100.0 * cps / ceil, req + thr, thr,
        100.0 * thr / (req + thr) if req + thr else 0.0, swt, mx))
PY
