#!/usr/bin/env bash
# What the change-capture triggers cost the application, as root:
#   bash bench/capture.sh [--quick]
# On a contact table shaped like bench/run.sh's (bigint key, 9 mapped
# columns, a score, an unmapped counter), once without d365sync and once
# attached and mapped, it times:
#   INSERT of N rows in one statement,
#   UPDATE of a mapped column on every row,
#   UPDATE of an unmapped column (neither key, score nor mapped) on every row,
# and, for applications that write one row per statement, the same mapped
# UPDATE as N/10 single-row statements.  Each is repeated (BENCH_CAPTURE_REPS,
# default 5; alternately unattached and attached, so that load from elsewhere
# on the machine falls on both) and the best time of each kind is kept.  It
# prints the times and the ratios attached / unattached, beside the goals
# (INSERT and mapped UPDATE at most 2x, unmapped UPDATE at most 1.3x).  It
# needs no simulator: capture makes no request to Dynamics.
#
# bench/run.sh sources this file and calls capture_bench with its own
# cluster; run alone, it starts a throwaway cluster.
#
# Environment:
#   BENCH_CAPTURE_ROWS=100000   rows (--quick: 20000)
#   BENCH_CAPTURE_REPS=5        repetitions of each measurement
#   BENCH_CAPTURE_VERSION=0.1   measure the triggers of an earlier release
#   D365_SKIP_BUILD=1           use the installed extension

# capture_bench DB RESULTS: appends "capture KIND ROWS BASE_MS ATTACHED_MS"
# lines (tab-separated) to RESULTS and prints them as they come.
capture_bench() {
    local db=$1 results=$2
    local rows=${BENCH_CAPTURE_ROWS:-100000} reps=${BENCH_CAPTURE_REPS:-5}
    local single=$((rows / 10))
    local out=$D365_WORK/capture.$$
    : >"$out"
    psql -X -q -v ON_ERROR_STOP=1 -d "$db" \
         -c "CREATE EXTENSION IF NOT EXISTS d365sync${BENCH_CAPTURE_VERSION:+ VERSION '$BENCH_CAPTURE_VERSION'}" || return 1
    local r mode
    for r in $(seq 1 "$reps"); do
        for mode in base attached; do
            capture_once "$db" "$mode" "$rows" "$single" >>"$out" || return 1
        done
    done
    /usr/bin/python3 - "$out" "$rows" "$single" >>"$results" <<'PY'
import sys
best = {}
for line in open(sys.argv[1]):
    mode, kind, ms = line.split()
    key = (kind, mode)
    best[key] = min(best.get(key, float("inf")), float(ms))
rows, single = sys.argv[2], sys.argv[3]
for kind, n in (("insert", rows), ("mapped", rows), ("unmapped", rows), ("single", single)):
    if (kind, "base") in best and (kind, "attached") in best:
        print("capture\t%s\t%s\t%.1f\t%.1f" % (kind, n, best[(kind, "base")], best[(kind, "attached")]))
PY
    rm -f "$out"
}

# capture_once DB MODE ROWS SINGLE: one round of the four measurements on a
# fresh table, "MODE KIND MS" per line.
capture_once() {
    local db=$1 mode=$2 rows=$3 single=$4
    local attach=false
    [ "$mode" = attached ] && attach=true
    psql -X -q -At -v ON_ERROR_STOP=1 -d "$db" 2>&1 <<SQL | sed -n "s/^ms /$mode /p"
SET client_min_messages = warning;
SELECT d365.d365_detach_contacts();
DROP TABLE IF EXISTS capture_contact;
TRUNCATE d365.contact_state;
SELECT to_regclass('d365.contact_change') IS NOT NULL AS has_queue \gset
\if :has_queue
TRUNCATE d365.contact_change;
\endif
CREATE TABLE capture_contact (
    id         bigint PRIMARY KEY,
    first_name text, last_name text, email text, phone text, city text,
    birthday   date, last_seen timestamptz, kids integer, no_email boolean,
    score      integer NOT NULL,
    visits     integer NOT NULL DEFAULT 0,
    dynamics365_related_id uuid,
    dynamics365_synchronized_on timestamptz
);
\if $attach
SELECT d365.d365_attach_contacts('capture_contact');
INSERT INTO d365.field_map VALUES
    ('first_name', 'firstname'), ('last_name', 'lastname'), ('email', 'emailaddress1'),
    ('phone', 'telephone1'), ('city', 'address1_city'), ('birthday', 'birthdate'),
    ('last_seen', 'lastusedincampaign'), ('kids', 'numberofchildren'),
    ('no_email', 'donotemail');
\endif
CHECKPOINT;
SELECT clock_timestamp() AS t0 \gset
INSERT INTO capture_contact (id, first_name, last_name, email, phone, city, birthday,
                             last_seen, kids, no_email, score)
SELECT g, 'First' || g, 'Last' || g, 'user' || g || '@bench.example',
       '+1 555 ' || lpad(g::text, 7, '0'),
       (ARRAY['Berlin', 'Paris', 'Oslo', 'Rome', 'Madrid', 'Lisbon'])[1 + g % 6],
       date '1950-01-01' + (g % 20000),
       timestamptz '2024-01-01 00:00:00+00' + g * interval '1 minute',
       g % 5, g % 2 = 0, 1 + g % 100
  FROM generate_series(1, $rows) g;
SELECT 'ms insert ' || round(extract(epoch FROM clock_timestamp() - :'t0'::timestamptz)::numeric * 1000, 1);
VACUUM ANALYZE capture_contact;
CHECKPOINT;
SELECT clock_timestamp() AS t0 \gset
UPDATE capture_contact SET email = 'new.' || email;
SELECT 'ms mapped ' || round(extract(epoch FROM clock_timestamp() - :'t0'::timestamptz)::numeric * 1000, 1);
VACUUM capture_contact;
CHECKPOINT;
SELECT clock_timestamp() AS t0 \gset
UPDATE capture_contact SET visits = visits + 1;
SELECT 'ms unmapped ' || round(extract(epoch FROM clock_timestamp() - :'t0'::timestamptz)::numeric * 1000, 1);
VACUUM capture_contact;
CHECKPOINT;
SELECT clock_timestamp() AS t0 \gset
DO \$\$
BEGIN
    FOR i IN 1 .. $single LOOP
        UPDATE capture_contact SET first_name = 'One' || i WHERE id = i;
    END LOOP;
END;
\$\$;
SELECT 'ms single ' || round(extract(epoch FROM clock_timestamp() - :'t0'::timestamptz)::numeric * 1000, 1);
SELECT d365.d365_detach_contacts();
DROP TABLE capture_contact;
TRUNCATE d365.contact_state;
SELECT to_regclass('d365.contact_change') IS NOT NULL AS has_queue \gset
\if :has_queue
TRUNCATE d365.contact_change;
\endif
SQL
}

# capture_report RESULTS: the capture table and the goals, in markdown.
capture_report() {
    /usr/bin/python3 - "$1" <<'PY'
import sys
goals = {"insert": 2.0, "mapped": 2.0, "unmapped": 1.3, "single": None}
names = {"insert": "INSERT, one statement",
         "mapped": "UPDATE of a mapped column, one statement",
         "unmapped": "UPDATE of an unmapped column, one statement",
         "single": "UPDATE of a mapped column, one row per statement"}
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.startswith("capture\t")]
if not rows:
    sys.exit(0)
print("Change capture: the same table without d365sync and attached (9 mapped columns);")
print("best of the repetitions.")
print()
print("| statement | rows | unattached (ms) | attached (ms) | ratio | goal |")
print("|---|---:|---:|---:|---:|---|")
for _, kind, n, base, att in rows:
    ratio = float(att) / float(base) if float(base) > 0 else float("inf")
    goal = goals.get(kind)
    verdict = ("<= %.1fx: %s" % (goal, "met" if ratio <= goal else "NOT met")) if goal else "(reported)"
    print("| %s | %s | %s | %s | %.2fx | %s |" % (names.get(kind, kind), n, base, att, ratio, verdict))
print()
PY
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -uo pipefail
    BENCH_DIR=$(cd "$(dirname "$0")" && pwd)
    . "$BENCH_DIR/../scripts/lib.sh"
    for arg in "$@"; do
        case $arg in
            --quick) BENCH_CAPTURE_ROWS=${BENCH_CAPTURE_ROWS:-20000} ;;
            -h|--help) sed -n '2,24s/^# \{0,1\}//p' "$0"; exit 0 ;;
            *) echo "bench/capture.sh: unknown argument $arg" >&2; exit 2 ;;
        esac
    done
    trap d365_stop_all EXIT
    if [ "${D365_SKIP_BUILD:-}" != 1 ]; then
        d365_install_packages || exit 1
        d365_build || exit 1
    fi
    d365_start_cluster d365capture || exit 1
    psql -X -q -d postgres -c "CREATE DATABASE d365capture" || exit 1
    d365_log "capture: ${BENCH_CAPTURE_ROWS:-100000} rows, ${BENCH_CAPTURE_REPS:-5} repetitions"
    capture_bench d365capture "$D365_WORK/capture.tsv" || exit 1
    echo
    capture_report "$D365_WORK/capture.tsv"
fi
