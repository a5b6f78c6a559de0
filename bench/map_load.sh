#!/usr/bin/env bash
# Initial load benchmark, as root:
#   bash bench/map_load.sh
# Starts a throwaway PostgreSQL 15 cluster and the Dataverse simulator,
# for each cost model in BENCH_MODELS (default "0:0 40:20": none, and the
# throughput benchmark's model of 40 ms of latency per request plus 20 ms
# of server time per record operation, a page read counting as one;
# LATENCY:SERVER in ms), creates accounts in the
# simulator directly (its control API), maps an empty table of companies
# to them with load on, and loads it with CALL d365_load() (committing
# after each page; BENCH_HOW=pull: SELECT d365_pull(), one transaction)
# for each size in BENCH_SIZES (default "20000 100000"):
# rows/s, the backend's CPU time over the load (what the recording costs,
# less sensitive than the seconds to what else runs on the machine),
# requests, pages, and the backend's memory growth over the load
# (bench/memsample.py, RssAnon sampled every 20 ms): its peak and its
# median.  Growth that does not rise with the size shows that the load
# holds a page at a time.  Then "what paging allows": the same records
# read through a d365_fdw foreign table with the load's columns (pages of
# 5,000, the next page asked for while one is read, nothing applied), its
# seconds and rows/s, and the load's rate as a share of it.  Last, the
# floor of recording a page: 5,000 rows and their 5,000 state rows copied
# by two plain INSERTs into tables with the same columns and indexes but no
# trigger and no foreign key (the best of 5), into empty temporary tables
# (no WAL: the least the inserts can cost) and into ordinary tables holding
# the loaded rows (what they cost where a load writes; by INSERT and by
# COPY from a file), beside the time
# paging alone takes per page: a load cannot keep up with paging while
# that floor, with the parsing of the page added, is above it.
# It prints a markdown table; it reports numbers and never fails
# because they are slow.  D365_SKIP_BUILD=1 uses the installed extension.
set -uo pipefail

BENCH_DIR=$(cd "$(dirname "$0")" && pwd)
. "$BENCH_DIR/../scripts/lib.sh"

MODELS=${BENCH_MODELS:-0:0 40:20}
SIZES=${BENCH_SIZES:-20000 100000}
HOW=${BENCH_HOW:-call}
case "$HOW" in
    call) LOAD_SQL="CALL d365.d365_load('company');" ;;
    pull) LOAD_SQL="SELECT created FROM d365.d365_pull('company');" ;;
    *) echo "BENCH_HOW is call or pull" >&2; exit 2 ;;
esac
DB=d365loadbench
SAMPLER_PID=

trap '[ -n "$SAMPLER_PID" ] && kill "$SAMPLER_PID" 2>/dev/null; d365_stop_all; rm -rf "${M:-}"' EXIT
trap 'exit 130' INT TERM

if [ "${D365_SKIP_BUILD:-}" != 1 ]; then
    d365_install_packages || exit 1
    d365_build || exit 1
fi
d365_start_cluster "$DB" >/dev/null || exit 1
d365_start_sim >/dev/null || exit 1
"$D365_SIMCTL" config '{"log_bodies": false, "log_limit": 10000}' >/dev/null || exit 1
M=$(mktemp -d /tmp/d365loadbench.XXXXXX)
chmod 777 "$M"

bpsql() { psql -X -q -At -v ON_ERROR_STOP=1 -P pager=off -d "$DB" "$@"; }
api_requests() {
    "$D365_SIMCTL" stats | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["requests"]["api"])'
}

echo
echo "Initial load of a table map ($LOAD_SQL): accounts in the simulator (load average $(cut -d' ' -f1-3 /proc/loadavg))"
echo
echo '| accounts | cost model, ms (latency + server) | seconds | rows/s | backend CPU, s | requests | pages | memory growth, peak (MB) | memory growth, median (MB) | paging alone, s | paging alone, rows/s | load / paging | floor of recording a page, temporary / ordinary tables / ordinary by COPY, ms | paging per page, ms |'
echo '|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|'
for model in $MODELS; do
lat=${model%%:*}
srv=${model##*:}
for n in $SIZES; do
    "$D365_SIMCTL" reset >/dev/null
    "$D365_SIMCTL" config "{\"log_bodies\": false, \"log_limit\": 10000, \"latency_ms\": $lat, \"per_record_ms\": $srv}" >/dev/null
    # a database per size (pg_cron keeps a session in the first)
    DB=d365loadbench_$n
    psql -X -q -d postgres -c "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB" >/dev/null 2>&1 || exit 1
    bpsql >/dev/null <<SQL || exit 1
CREATE EXTENSION d365sync;
UPDATE d365.settings
   SET org_url = '$D365_SIM_URL', authority_url = '$D365_SIM_URL',
       tenant_id = '11111111-1111-1111-1111-111111111111',
       client_id = '22222222-2222-2222-2222-222222222222',
       client_secret = 'sim-secret';
CREATE SERVER dataverse FOREIGN DATA WRAPPER d365_fdw;
CREATE FOREIGN TABLE paging (accountid uuid, name text, accountnumber text, telephone1 text,
    address1_city text, numberofemployees integer, revenue numeric)
    SERVER dataverse OPTIONS (entity_set 'accounts');
CREATE TABLE companies (id bigserial PRIMARY KEY, name text NOT NULL, number text,
                        phone text, city text, employees integer, revenue numeric);
SELECT d365.d365_map_table('company', 'companies', 'accounts');
SELECT d365.d365_map_column('company', 'name', 'name');
SELECT d365.d365_map_column('company', 'number', 'accountnumber');
SELECT d365.d365_map_column('company', 'phone', 'telephone1');
SELECT d365.d365_map_column('company', 'city', 'address1_city');
SELECT d365.d365_map_column('company', 'employees', 'numberofemployees');
SELECT d365.d365_map_column('company', 'revenue', 'revenue');
UPDATE d365.table_map SET load = true;
SELECT 1 FROM d365.d365_whoami();
SQL
    # the two seed accounts are there too
    "$D365_SIMCTL" generate account "{\"count\": $((n - 2)), \"values\": {\"name\": \"Company {i}\",
        \"accountnumber\": \"A-{i}\", \"telephone1\": \"+1 555 {i}\", \"address1_city\": \"City {i}\",
        \"numberofemployees\": {\"mod\": 1000}}}" >/dev/null || exit 1
    rm -f "$M"/*
    before=$(api_requests)
    /usr/bin/python3 "$BENCH_DIR/memsample.py" "$M/pid" "$M/ready" "$M/stop" "$M/mem" 20 &
    SAMPLER_PID=$!
    bpsql >"$M/out" 2>"$M/err" <<SQL
\o $M/pid
SELECT pg_backend_pid();
\o
\! i=0; while [ ! -e "$M/ready" ] && [ \$i -lt 6000 ]; do sleep 0.01; i=\$((i+1)); done
\! awk '{print \$14 + \$15}' /proc/\$(cat "$M/pid")/stat >"$M/cpu0"
SELECT clock_timestamp() AS t0 \gset
\o /dev/null
$LOAD_SQL
\o
SELECT round(extract(epoch FROM clock_timestamp() - :'t0'::timestamptz)::numeric, 2) AS secs \gset
\! awk '{print \$14 + \$15}' /proc/\$(cat "$M/pid")/stat >"$M/cpu1"
\! touch "$M/stop"
SELECT :secs, (SELECT count(*) FROM companies), (SELECT pages FROM d365.load_state),
       (SELECT message FROM d365.sync_run ORDER BY id DESC LIMIT 1);
SQL
    rc=$?
    touch "$M/stop"
    wait "$SAMPLER_PID" 2>/dev/null
    SAMPLER_PID=
    after=$(api_requests)
    if [ "$rc" -ne 0 ]; then
        echo "| $n | $lat + $srv | failed: $(head -n 3 "$M/err" | tr '\n' ' ') | | | | | | | | | | | |"
        continue
    fi
    # what paging allows: every record with the load's columns, nothing applied
    psecs=$(bpsql <<'SQL'
SELECT 1 AS ok FROM d365.d365_whoami() \gset
SELECT clock_timestamp() AS t0 \gset
SELECT count(*) AS n FROM (SELECT * FROM paging OFFSET 0) s WHERE s::text IS NOT NULL \gset
SELECT round(extract(epoch FROM clock_timestamp() - :'t0'::timestamptz)::numeric, 2);
SQL
)
    # the floor of recording a page: 5,000 rows and their 5,000 state rows
    # copied by two plain INSERTs into tables with the same columns and
    # indexes (no trigger, no foreign key, nothing converted), the best of
    # 5: into empty temporary tables (no WAL, local buffers: what the
    # inserts cost at the very least), and into ordinary tables holding what
    # the load wrote (what a page's inserts cost where a load writes them;
    # each try rolled back, the commit's WAL flush not counted), there by
    # INSERT and by COPY from a file
    floor=$(bpsql <<SQL
CREATE TEMP TABLE floor_rows (LIKE companies INCLUDING INDEXES);
CREATE TEMP TABLE floor_state (LIKE d365.map_row INCLUDING INDEXES);
CREATE TABLE durable_rows (LIKE companies INCLUDING INDEXES);
CREATE TABLE durable_state (LIKE d365.map_row INCLUDING INDEXES);
INSERT INTO durable_rows SELECT * FROM companies;
INSERT INTO durable_state SELECT * FROM d365.map_row;
VACUUM ANALYZE durable_rows, durable_state;
-- a page more: new keys, new Dynamics ids
CREATE TEMP TABLE next_rows AS SELECT * FROM companies LIMIT 5000;
UPDATE next_rows SET id = id + (SELECT max(id) FROM companies), dynamics365_related_id = gen_random_uuid();
CREATE TEMP TABLE next_state AS SELECT * FROM d365.map_row LIMIT 5000;
UPDATE next_state SET row_key = 'n' || row_key, dynamics_id = gen_random_uuid();
COPY next_rows TO '$M/next_rows.copy';
COPY next_state TO '$M/next_state.copy';
CHECKPOINT;
CREATE TEMP TABLE floor_ms (what text, ms numeric);
DO \$\$
DECLARE t0 timestamptz; i integer; ms numeric[] := '{}'; copy_ms numeric[] := '{}';
BEGIN
    FOR i IN 1..5 LOOP
        t0 := clock_timestamp();
        INSERT INTO floor_rows SELECT * FROM next_rows;
        INSERT INTO floor_state SELECT * FROM next_state;
        INSERT INTO floor_ms VALUES ('temp', 1000 * extract(epoch FROM clock_timestamp() - t0));
        TRUNCATE floor_rows, floor_state;
        BEGIN
            t0 := clock_timestamp();
            INSERT INTO durable_rows SELECT * FROM next_rows;
            INSERT INTO durable_state SELECT * FROM next_state;
            ms := ms || (1000 * extract(epoch FROM clock_timestamp() - t0))::numeric;
            RAISE EXCEPTION USING ERRCODE = 'P0001';
        EXCEPTION WHEN raise_exception THEN
            NULL;
        END;
        BEGIN
            t0 := clock_timestamp();
            COPY durable_rows FROM '$M/next_rows.copy';
            COPY durable_state FROM '$M/next_state.copy';
            copy_ms := copy_ms || (1000 * extract(epoch FROM clock_timestamp() - t0))::numeric;
            RAISE EXCEPTION USING ERRCODE = 'P0001';
        EXCEPTION WHEN raise_exception THEN
            NULL;
        END;
    END LOOP;
    INSERT INTO floor_ms SELECT 'durable', unnest(ms);
    INSERT INTO floor_ms SELECT 'copy', unnest(copy_ms);
END \$\$;
DROP TABLE durable_rows, durable_state;
SELECT round(min(ms) FILTER (WHERE what = 'temp')) || ' / ' || round(min(ms) FILTER (WHERE what = 'durable'))
       || ' / ' || round(min(ms) FILTER (WHERE what = 'copy')) FROM floor_ms;
SQL
)
    IFS='|' read -r secs rows pages msg <"$M/out"
    read -r base peak _ median <"$M/mem"
    printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$(printf "%'d" "$rows")" "$lat + $srv" "$secs" \
        "$(/usr/bin/python3 -c "print(format(round($rows / max($secs, 0.001)), ','))")" \
        "$(/usr/bin/python3 -c "print('%.2f' % (($(cat "$M/cpu1") - $(cat "$M/cpu0")) / $(getconf CLK_TCK)))")" \
        "$((after - before))" "$pages" \
        "$(/usr/bin/python3 -c "print(round(($peak - $base) / 1024.0, 1))")" \
        "$(/usr/bin/python3 -c "print(round((${median:-$base} - $base) / 1024.0, 1))")" \
        "$psecs" "$(/usr/bin/python3 -c "print(format(round($n / max(${psecs:-0}, 0.001)), ','))")" \
        "$(/usr/bin/python3 -c "print('%d %%' % round(100 * ${psecs:-0} / max($secs, 0.001)))")" \
        "$floor" "$(/usr/bin/python3 -c "print(round(1000 * ${psecs:-0} / max($pages, 1)))")"
    [ "$rows" = "$n" ] || echo "(loaded $rows rows for $n accounts: $msg)"
done
done
