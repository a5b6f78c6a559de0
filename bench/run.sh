#!/usr/bin/env bash
# The d365sync benchmark, as root:
#   bash bench/run.sh [--quick]
# Starts a throwaway PostgreSQL 15 cluster and the Dataverse simulator with a
# latency model (default 30 ms per HTTP request + 1 ms per record operation;
# env BENCH_LATENCY_MS, BENCH_PER_RECORD_MS), then measures the contact sync:
#   (a) initial sync, (b) no-change re-sync, (c) 1 %-changed re-sync
# at 10k and 100k contacts (--quick: 10k only), and the initial sync of a
# 2k-contact sample in per-record mode (batch_size = 1, max_parallel = 1;
# --quick: 1k) for the ratio; then what the change-capture triggers cost
# the application's INSERTs and UPDATEs (bench/capture.sh, 100k rows;
# --quick: 20k).  It prints markdown tables and the target checks.  It
# reports numbers; it never fails because they are slow.
#
# Environment:
#   BENCH_LATENCY_MS=30 BENCH_PER_RECORD_MS=1   simulator latency model
#   BENCH_SIZES="10000 100000"                   batched table sizes
#   BENCH_PER_RECORD_SIZE=2000                   per-record sample
#   BENCH_TIMEOUT=7200                           seconds allowed per sync
#   D365_SKIP_BUILD=1                            use the installed extension
set -uo pipefail

usage() { sed -n '2,19s/^# \{0,1\}//p' "$0"; }

QUICK=0
for arg in "$@"; do
    case $arg in
        --quick) QUICK=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "bench/run.sh: unknown argument $arg" >&2; usage >&2; exit 2 ;;
    esac
done

BENCH_DIR=$(cd "$(dirname "$0")" && pwd)
. "$BENCH_DIR/../scripts/lib.sh"

BENCH_LATENCY_MS=${BENCH_LATENCY_MS:-30}
BENCH_PER_RECORD_MS=${BENCH_PER_RECORD_MS:-1}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-7200}
if [ "$QUICK" = 1 ]; then
    SIZES=${BENCH_SIZES:-10000}
    PR_SIZE=${BENCH_PER_RECORD_SIZE:-1000}
else
    SIZES=${BENCH_SIZES:-10000 100000}
    PR_SIZE=${BENCH_PER_RECORD_SIZE:-2000}
fi
DB=d365bench
SAMPLER_PID=

bench_exit() {
    local rc=$?
    if [ -n "$SAMPLER_PID" ]; then
        kill "$SAMPLER_PID" 2>/dev/null
        wait "$SAMPLER_PID" 2>/dev/null
    fi
    d365_stop_all
    exit "$rc"
}
trap bench_exit EXIT
trap 'exit 130' INT TERM

if [ "${D365_SKIP_BUILD:-}" != 1 ]; then
    d365_install_packages || exit 1
    d365_build || exit 1
fi
d365_start_cluster "$DB" || exit 1
d365_start_sim --latency-ms "$BENCH_LATENCY_MS" --per-record-ms "$BENCH_PER_RECORD_MS" || exit 1

RESULTS=$D365_WORK/bench.tsv
: >"$RESULTS"

bench_psql() {
    psql -X -q -v ON_ERROR_STOP=1 -P pager=off -d "$DB" "$@"
}

psql -X -q -v ON_ERROR_STOP=1 -d postgres -c "CREATE DATABASE $DB" || exit 1

# sim_counts: "api token" requests the simulator has answered so far.
sim_counts() {
    "$D365_SIMCTL" stats | /usr/bin/python3 -c \
        'import json,sys; r=json.load(sys.stdin)["requests"]; print(r["api"], r["token"])'
}

# sim_reset: the simulator back to its seed state, with a request log that
# stays small (no bodies, few entries) however many contacts go through.
sim_reset() {
    "$D365_SIMCTL" reset || return 1
    "$D365_SIMCTL" config '{"log_bodies": false, "log_limit": 10000}' || return 1
}

# setup_contacts N: a fresh extension and an N-contact table, attached,
# mapped (9 columns: first and last name, email, phone, city, a date, a
# timestamptz, an integer, a boolean) and enabled, every score >= 1.
setup_contacts() {
    local n=$1
    sim_reset || return 1
    bench_psql <<SQL
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS d365sync CASCADE;
DROP TABLE IF EXISTS bench_contact;
CREATE EXTENSION d365sync;
CREATE TABLE bench_contact (
    id         bigint PRIMARY KEY,
    first_name text,
    last_name  text,
    email      text,
    phone      text,
    city       text,
    birthday   date,
    last_seen  timestamptz,
    kids       integer,
    no_email   boolean,
    score      integer NOT NULL
);
INSERT INTO bench_contact
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
       client_secret = 'sim-secret',
       contact_sync_enabled = true, min_score = 1;
SELECT d365.d365_attach_contacts('bench_contact');
INSERT INTO d365.field_map VALUES
    ('first_name', 'firstname'), ('last_name', 'lastname'), ('email', 'emailaddress1'),
    ('phone', 'telephone1'), ('city', 'address1_city'), ('birthday', 'birthdate'),
    ('last_seen', 'lastusedincampaign'), ('kids', 'numberofchildren'),
    ('no_email', 'donotemail');
VACUUM ANALYZE bench_contact;
VACUUM ANALYZE d365.contact_state;
SQL
}

# measure KIND SIZE LABEL [PRE_SQL]: one d365_sync_contacts() run from a psql
# session whose backend a sampler watches; appends a line to $RESULTS.
measure() {
    local kind=$1 size=$2 label=$3 pre=${4:-}
    local m=$D365_WORK/m.$$.$RANDOM
    mkdir -p "$m"
    local before after
    before=$(sim_counts) || return 1
    /usr/bin/python3 "$BENCH_DIR/memsample.py" "$m/pid" "$m/ready" "$m/stop" "$m/mem" 20 &
    SAMPLER_PID=$!
    timeout "$BENCH_TIMEOUT" psql -X -q -At -v ON_ERROR_STOP=1 -P pager=off -d "$DB" \
        >"$m/out" 2>"$m/err" <<SQL
\o $m/pid
SELECT pg_backend_pid();
\o
\! i=0; while [ ! -e "$m/ready" ] && [ \$i -lt 6000 ]; do sleep 0.01; i=\$((i+1)); done
$pre
SELECT clock_timestamp() AS t0 \gset
SELECT created, updated, unchanged, failed, unlinked, requests FROM d365.d365_sync_contacts() \gset r_
SELECT round(extract(epoch FROM clock_timestamp() - :'t0'::timestamptz)::numeric, 3) AS secs \gset
\! touch "$m/stop"
\echo RESULT :secs :r_created :r_updated :r_unchanged :r_failed :r_unlinked :r_requests
SQL
    local rc=$?
    touch "$m/stop"
    wait "$SAMPLER_PID" 2>/dev/null
    SAMPLER_PID=
    after=$(sim_counts) || return 1
    local res
    res=$(grep '^RESULT ' "$m/out")
    if [ "$rc" -ne 0 ] || [ -z "$res" ]; then
        echo "    $label: the sync failed (psql exit $rc):"
        sed 's/^/    | /' "$m/err" | head -n 20
        printf '%s\t%s\t%s\tFAILED\n' "$kind" "$size" "$label" >>"$RESULTS"
        return 1
    fi
    local secs created updated unchanged failed unlinked requests
    read -r _ secs created updated unchanged failed unlinked requests <<<"$res"
    local b_api b_tok a_api a_tok base peak samples
    read -r b_api b_tok <<<"$before"
    read -r a_api a_tok <<<"$after"
    read -r base peak samples _ <"$m/mem"
    local simreq=$(( (a_api - b_api) + (a_tok - b_tok) ))
    local processed=$((created + updated + unchanged + failed + unlinked))
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
        "$kind" "$size" "$label" "$secs" "$processed" "$created" "$updated" "$failed" \
        "$requests" "$simreq" "$base" "$peak" "$samples" >>"$RESULTS"
    printf '    %-34s %8.3f s  created %s updated %s unchanged %s failed %s  requests %s (simulator: %s api + %s token)  RssAnon %s -> %s kB (%s samples)\n' \
        "$label" "$secs" "$created" "$updated" "$unchanged" "$failed" "$requests" \
        "$((a_api - b_api))" "$((a_tok - b_tok))" "$base" "$peak" "$samples"
    [ "$requests" = "$simreq" ] ||
        echo "    note: the function counted $requests requests, the simulator $simreq"
    rm -rf "$m"
}

linked_count() {
    bench_psql -At -c "SELECT count(*) FILTER (WHERE dynamics365_related_id IS NOT NULL) || ' of ' || count(*) FROM bench_contact"
}

echo
echo "d365sync benchmark$([ "$QUICK" = 1 ] && echo ' (--quick)')"
echo "Simulator latency model: ${BENCH_LATENCY_MS} ms per HTTP request + ${BENCH_PER_RECORD_MS} ms per record operation"
echo "(a \$batch pays the per-record cost once per operation); the simulator runs on 127.0.0.1."
echo "PostgreSQL: $("$PG_BIN/postgres" --version)"
echo "Batched mode: the defaults of d365sync.batch_size and d365sync.max_parallel;"
echo "per-record mode: SET d365sync.batch_size = 1; SET d365sync.max_parallel = 1."
echo

for n in $SIZES; do
    d365_log "$n contacts: setting up"
    setup_contacts "$n" >/dev/null || { echo "set-up of $n contacts failed"; continue; }
    d365_log "$n contacts: running the syncs"
    measure initial "$n" "initial sync, $n" || continue
    echo "    linked after the initial sync: $(linked_count)"
    measure nochange "$n" "no-change re-sync, $n"
    bench_psql -c "UPDATE bench_contact SET email = 'changed' || id || '@bench.example' WHERE id % 100 = 0" >/dev/null
    measure changed "$n" "1%-changed re-sync, $n"
done

d365_log "$PR_SIZE contacts, per-record mode: setting up"
if setup_contacts "$PR_SIZE" >/dev/null; then
    d365_log "$PR_SIZE contacts, per-record mode: running the initial sync"
    measure perrecord "$PR_SIZE" "per-record initial sync, $PR_SIZE" \
        "SET d365sync.batch_size = 1; SET d365sync.max_parallel = 1;"
    echo "    linked after the per-record sync: $(linked_count)"
fi

# What the capture triggers cost the application's writes (bench/capture.sh)
. "$BENCH_DIR/capture.sh"
[ "$QUICK" = 1 ] && BENCH_CAPTURE_ROWS=${BENCH_CAPTURE_ROWS:-20000}
d365_log "change capture: ${BENCH_CAPTURE_ROWS:-100000} rows, attached and not"
capture_bench "$DB" "$D365_WORK/capture.tsv" || echo "    the capture benchmark failed"

echo
/usr/bin/python3 "$BENCH_DIR/report.py" "$RESULTS" "$BENCH_LATENCY_MS" "$BENCH_PER_RECORD_MS"
capture_report "$D365_WORK/capture.tsv"
