#!/usr/bin/env bash
# The cost of the operations features, as root:
#   bash bench/operations.sh
# Starts a throwaway cluster (pg_cron and pg_stat_statements preloaded) and
# the simulator, attaches a 3,000-contact table (BENCH_N) and reports:
#   - the progress count: how long counting a run's items takes before the
#     run (the pass over the work query that d365.run_progress needs for
#     "remaining"), against the whole initial sync;
#   - pg_stat_statements: entries with a single call after three contact
#     runs, each in a session of its own as pg_cron runs them (a statement
#     whose text changes every run shows up as a new single-call entry);
#   - the pruning of d365.sync_run: the delete after a run, with a month of
#     history at three jobs a minute (130,000 rows).
# It reports numbers; it never fails because they are slow.
set -uo pipefail
BENCH_DIR=$(cd "$(dirname "$0")" && pwd)
. "$BENCH_DIR/../scripts/lib.sh"
N=${BENCH_N:-3000}
DB=d365bench
trap d365_stop_all EXIT

if [ "${D365_SKIP_BUILD:-}" != 1 ]; then
    d365_install_packages || exit 1
    d365_build || exit 1
fi
d365_start_cluster "$DB" || exit 1
sed -i "s/^shared_preload_libraries = 'pg_cron'/shared_preload_libraries = 'pg_cron,pg_stat_statements'/" "$PGDATA/postgresql.conf"
(cd "$D365_WORK" && runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PGDATA" -w \
    -l "$D365_WORK/postgres.log" restart >/dev/null) || exit 1
d365_start_sim || exit 1
"$D365_SIMCTL" config '{"log_bodies": false, "log_limit": 10000}' >/dev/null

q() { psql -X -q -v ON_ERROR_STOP=1 -P pager=off -At -d "$DB" "$@"; }
psql -X -q -d postgres -c "CREATE DATABASE $DB" || exit 1
q <<SQL || exit 1
SET client_min_messages = warning;
CREATE EXTENSION pg_stat_statements;
CREATE EXTENSION d365sync;
CREATE TABLE bench_contact (id bigint PRIMARY KEY, first_name text, last_name text,
                            email text, score integer NOT NULL);
INSERT INTO bench_contact
SELECT g, 'First' || g, 'Last' || g, 'user' || g || '@bench.example', 1 + g % 100
  FROM generate_series(1, $N) g;
UPDATE d365.settings
   SET org_url = '$D365_SIM_URL', authority_url = '$D365_SIM_URL',
       tenant_id = '11111111-1111-1111-1111-111111111111',
       client_id = '22222222-2222-2222-2222-222222222222',
       client_secret = 'sim-secret', contact_sync_enabled = true, min_score = 1;
SELECT d365.d365_attach_contacts('bench_contact');
INSERT INTO d365.field_map VALUES
    ('first_name', 'firstname'), ('last_name', 'lastname'), ('email', 'emailaddress1');
VACUUM ANALYZE bench_contact;
SQL

count_ms=$(q <<'SQL'
SET search_path = pg_catalog;
SELECT d365._contact_work_sql(true) AS w \gset
\timing on
SELECT count(*) FROM (:w) d365_work;
SQL
)
count_ms=$(grep -o 'Time: [0-9.]*' <<<"$count_ms" | tail -1 | cut -d' ' -f2)
start=$(date +%s%N)
q -c "SELECT created FROM d365.d365_sync_contacts()" >/dev/null
sync_ms=$(( ($(date +%s%N) - start) / 1000000 ))
echo "initial sync of $N contacts: $sync_ms ms; counting its items first: $count_ms ms"

q -c "SELECT pg_stat_statements_reset()" >/dev/null
for i in 1 2 3; do
    q -c "UPDATE bench_contact SET last_name = last_name || 'x' WHERE id % 10 = $i" >/dev/null
    q -c "CALL d365.d365_run_job('contacts')" >/dev/null
done
q <<'SQL'
SELECT format('pg_stat_statements after 3 contact runs in 3 sessions: %s entries, %s with a single call, %s naming a temporary table',
              count(*), count(*) FILTER (WHERE calls = 1),
              count(*) FILTER (WHERE query ~* 'd365_contact_outcome|pg_temp'))
  FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
   AND query !~* 'pg_stat_statements';
SQL

q <<'SQL'
INSERT INTO d365.sync_run (kind, started_at, finished_at)
SELECT (ARRAY['contacts', 'activities', 'pull'])[1 + g % 3], t, t
  FROM generate_series(1, 129600) g, LATERAL (SELECT now() - interval '31 days' + g * interval '20 seconds' AS t) x;
VACUUM ANALYZE d365.sync_run;
SQL
for i in 1 2; do
    start=$(date +%s%N)
    n=$(q -c "SELECT d365._prune_runs()")
    ms=$(( ($(date +%s%N) - start) / 1000000 ))
    echo "prune $i of a month of history (130k rows, 3 jobs a minute): $n rows deleted in $ms ms"
done
