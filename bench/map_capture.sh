#!/usr/bin/env bash
# What the capture triggers of a table map cost the application, as root:
#   bash bench/map_capture.sh [--quick] [--parts]
# The same measurements as bench/capture.sh (INSERT of N rows in one
# statement, UPDATE of a mapped column, UPDATE of an unmapped column, N/10
# single-row UPDATEs of a mapped column) on a companies table shaped like an
# account (integer key, 6 mapped columns, an unmapped counter), once without
# d365sync and once mapped to accounts with d365_map_table().  Mapping reads
# Dynamics metadata, so it starts the simulator; capture itself makes no
# request.  Best of BENCH_CAPTURE_REPS (default 5) repetitions, alternately
# unmapped and mapped; prints the times and ratios as bench/capture.sh does
# (goals: INSERT and mapped UPDATE at most 2x, unmapped UPDATE at most 1.3x).
# --parts also measures the mapped table with d365sync's triggers taken
# away (the link columns' index only) and with the guard of the link
# columns but no capture triggers, and prints where the time goes.
#
# Environment:
#   BENCH_CAPTURE_ROWS=100000   rows (--quick: 20000)
#   BENCH_CAPTURE_REPS=5        repetitions of each measurement
#   D365_SKIP_BUILD=1           use the installed extension
set -uo pipefail
parts=0
BENCH_DIR=$(cd "$(dirname "$0")" && pwd)
. "$BENCH_DIR/../scripts/lib.sh"
. "$BENCH_DIR/capture.sh"
for arg in "$@"; do
    case $arg in
        --quick) BENCH_CAPTURE_ROWS=${BENCH_CAPTURE_ROWS:-20000} ;;
        --parts) parts=1 ;;
        -h|--help) sed -n '2,20s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "bench/map_capture.sh: unknown argument $arg" >&2; exit 2 ;;
    esac
done

# map_capture_once DB MODE ROWS SINGLE: one round, "MODE KIND MS" per line.
# MODE: base (no d365sync), attached (mapped), index (mapped, then every
# trigger of d365sync's dropped), guard (mapped, the capture triggers
# dropped, the link columns' guard kept).
map_capture_once() {
    local db=$1 mode=$2 rows=$3 single=$4
    local mapped=false drop=none
    [ "$mode" != base ] && mapped=true
    case $mode in
        index) drop="'d365._map_capture()', 'd365._map_capture_row()', 'd365._map_capture_flush()', 'd365._contact_link_guard()'" ;;
        guard) drop="'d365._map_capture()', 'd365._map_capture_row()', 'd365._map_capture_flush()'" ;;
    esac
    psql -X -q -At -v ON_ERROR_STOP=1 -d "$db" 2>&1 <<SQL | sed -n "s/^ms /$mode /p"
SET client_min_messages = warning;
SELECT d365.d365_unmap_table('company') FROM d365.table_map WHERE name = 'company';
DROP TABLE IF EXISTS capture_company;
CREATE TABLE capture_company (
    id        integer PRIMARY KEY,
    name      text NOT NULL, phone text, website text, city text,
    employees integer, revenue numeric(14,2),
    visits    integer NOT NULL DEFAULT 0,
    dynamics365_related_id uuid,
    dynamics365_synchronized_on timestamptz
);
\if $mapped
SELECT d365.d365_map_table('company', 'capture_company', 'accounts');
SELECT d365.d365_map_column('company', c, f)
  FROM (VALUES ('name', 'name'), ('phone', 'telephone1'), ('website', 'websiteurl'),
               ('city', 'address1_city'), ('employees', 'numberofemployees'),
               ('revenue', 'revenue')) m(c, f);
\endif
\if $( [ "$drop" != none ] && echo true || echo false )
SELECT format('DROP TRIGGER %I ON capture_company', tgname) FROM pg_trigger
 WHERE tgrelid = 'capture_company'::regclass AND tgfoid::regprocedure::text IN ($drop) \gexec
\endif
CHECKPOINT;
SELECT clock_timestamp() AS t0 \gset
INSERT INTO capture_company (id, name, phone, website, city, employees, revenue)
SELECT g, 'Company ' || g, '+1 555 ' || lpad(g::text, 7, '0'), 'https://c' || g || '.example',
       (ARRAY['Berlin', 'Paris', 'Oslo', 'Rome', 'Madrid', 'Lisbon'])[1 + g % 6],
       g % 5000, (g % 100000) * 1000.0
  FROM generate_series(1, $rows) g;
SELECT 'ms insert ' || round(extract(epoch FROM clock_timestamp() - :'t0'::timestamptz)::numeric * 1000, 1);
VACUUM ANALYZE capture_company;
CHECKPOINT;
SELECT clock_timestamp() AS t0 \gset
UPDATE capture_company SET phone = phone || '0';
SELECT 'ms mapped ' || round(extract(epoch FROM clock_timestamp() - :'t0'::timestamptz)::numeric * 1000, 1);
VACUUM capture_company;
CHECKPOINT;
SELECT clock_timestamp() AS t0 \gset
UPDATE capture_company SET visits = visits + 1;
SELECT 'ms unmapped ' || round(extract(epoch FROM clock_timestamp() - :'t0'::timestamptz)::numeric * 1000, 1);
VACUUM capture_company;
CHECKPOINT;
SELECT clock_timestamp() AS t0 \gset
DO \$\$
BEGIN
    FOR i IN 1 .. $single LOOP
        UPDATE capture_company SET name = 'One' || i WHERE id = i;
    END LOOP;
END;
\$\$;
SELECT 'ms single ' || round(extract(epoch FROM clock_timestamp() - :'t0'::timestamptz)::numeric * 1000, 1);
SELECT d365.d365_unmap_table('company') FROM d365.table_map WHERE name = 'company';
DROP TABLE capture_company;
TRUNCATE d365.map_change;
SQL
}

trap d365_stop_all EXIT
if [ "${D365_SKIP_BUILD:-}" != 1 ]; then
    d365_install_packages || exit 1
    d365_build || exit 1
fi
d365_start_cluster d365mapcapture || exit 1
d365_start_sim >/dev/null || exit 1
psql -X -q -d postgres -c "CREATE DATABASE d365mapcapture" || exit 1
psql -X -q -v ON_ERROR_STOP=1 -d d365mapcapture <<SQL || exit 1
CREATE EXTENSION d365sync CASCADE;
UPDATE d365.settings SET org_url = '$D365_SIM_URL', authority_url = '$D365_SIM_URL',
       tenant_id = '11111111-1111-1111-1111-111111111111',
       client_id = '22222222-2222-2222-2222-222222222222', client_secret = 'sim-secret';
SQL
rows=${BENCH_CAPTURE_ROWS:-100000}
reps=${BENCH_CAPTURE_REPS:-5}
single=$((rows / 10))
d365_log "map capture: $rows rows, $reps repetitions"
out=$D365_WORK/map_capture.raw
: >"$out"
modes="base attached"
[ "$parts" = 1 ] && modes="base index guard attached"
for r in $(seq 1 "$reps"); do
    for mode in $modes; do
        map_capture_once d365mapcapture "$mode" "$rows" "$single" >>"$out" || exit 1
    done
done
/usr/bin/python3 - "$out" "$rows" "$single" >"$D365_WORK/map_capture.tsv" <<'PY'
import sys
best = {}
for line in open(sys.argv[1]):
    mode, kind, ms = line.split()
    best[(kind, mode)] = min(best.get((kind, mode), float("inf")), float(ms))
rows, single = sys.argv[2], sys.argv[3]
for kind, n in (("insert", rows), ("mapped", rows), ("unmapped", rows), ("single", single)):
    if (kind, "base") in best and (kind, "attached") in best:
        print("capture\t%s\t%s\t%.1f\t%.1f" % (kind, n, best[(kind, "base")], best[(kind, "attached")]))
PY
echo
[ "$parts" = 1 ] && /usr/bin/python3 - "$out" <<'PY'
import sys
best = {}
for line in open(sys.argv[1]):
    mode, kind, ms = line.split()
    best[(kind, mode)] = min(best.get((kind, mode), float("inf")), float(ms))
print("Where the time goes: the mapped table with d365sync's triggers dropped (index),")
print("with the link guard only (guard), and whole (attached); ms and ratio to base.")
print()
print("| statement | base | index | guard | attached |")
print("|---|---:|---:|---:|---:|")
for kind in ("insert", "mapped", "unmapped", "single"):
    b = best.get((kind, "base"))
    if not b:
        continue
    cells = ["%.1f" % b] + ["%.1f (%.2fx)" % (best[(kind, m)], best[(kind, m)] / b)
                            for m in ("index", "guard", "attached") if (kind, m) in best]
    print("| %s | %s |" % (kind, " | ".join(cells)))
print()
PY
capture_report "$D365_WORK/map_capture.tsv" | sed 's/attached (9 mapped columns)/mapped to accounts (6 mapped columns)/; s/unattached (ms) | attached (ms)/unmapped (ms) | mapped (ms)/'
