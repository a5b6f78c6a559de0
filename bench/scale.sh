#!/usr/bin/env bash
# Incoming changes on a large contact table, as root:
#   bash bench/scale.sh
# Starts a throwaway PostgreSQL 15 cluster and the Dataverse simulator,
# attaches a table of N contacts (1,000,000 by default) and links every one
# of them the way a completed initial sync leaves them: the link columns
# (written with the link guard disabled for that one statement), and in
# d365.contact_state the id, the synced snapshot and sequence.  (Sending a
# million contacts through the simulator first would measure the simulator.)
# Then it times (the link column has the unique index attach makes; the
# attachment counts as broken without it):
#   push call    d365_update_contact() for a random linked contact (ms/call)
#   pull apply   d365._pull_record() on pages of 5,000 changed rows (rows/s)
#   re-sync      d365_sync_contacts() with nothing changed (s)
# and prints a markdown table.  It reports numbers; it never fails because
# they are slow.
#
# Environment:
#   BENCH_SCALE_ROWS=1000000     contacts (N)
#   BENCH_PUSH_CALLS=1000        push calls timed
#   BENCH_PULL_PAGES=1           pages of 5,000 rows applied
#   D365_SKIP_BUILD=1            use the installed extension
set -uo pipefail

BENCH_DIR=$(cd "$(dirname "$0")" && pwd)
. "$BENCH_DIR/../scripts/lib.sh"

N=${BENCH_SCALE_ROWS:-1000000}
CALLS=${BENCH_PUSH_CALLS:-1000}
PAGES=${BENCH_PULL_PAGES:-1}
DB=d365scale
trap d365_stop_all EXIT
trap 'exit 130' INT TERM

if [ "${D365_SKIP_BUILD:-}" != 1 ]; then
    d365_install_packages || exit 1
    d365_build || exit 1
fi
d365_start_cluster "$DB" || exit 1
d365_start_sim || exit 1

q() { psql -X -q -At -v ON_ERROR_STOP=1 -P pager=off -d "$DB" "$@"; }

d365_log "$N contacts, attached, mapped and linked"
psql -X -q -d postgres -c "CREATE DATABASE $DB" >/dev/null || exit 1
q >/dev/null <<SQL || exit 1
CREATE EXTENSION d365sync;
UPDATE d365.settings
   SET org_url = '$D365_SIM_URL', authority_url = '$D365_SIM_URL',
       tenant_id = '11111111-1111-1111-1111-111111111111',
       client_id = '22222222-2222-2222-2222-222222222222',
       client_secret = 'sim-secret', contact_sync_enabled = true, min_score = 1;
CREATE TABLE person (id integer PRIMARY KEY, first_name text, last_name text,
                     email text, city text, score integer NOT NULL);
INSERT INTO person
SELECT g, 'First' || g, 'Last' || g, 'user' || g || '@bench.example',
       (ARRAY['Berlin', 'Paris', 'Oslo'])[1 + g % 3], 50
  FROM generate_series(1, $N) g;
SELECT d365.d365_attach_contacts('person');
INSERT INTO d365.field_map (column_name, dynamics_field) VALUES
    ('first_name', 'firstname'), ('last_name', 'lastname'),
    ('email', 'emailaddress1'), ('city', 'address1_city');
-- what the initial sync leaves: the id, the snapshot, the sequence
DO \$\$
BEGIN
    EXECUTE format('INSERT INTO d365.contact_state (contact_key, change_seq, synced_seq, generation, synced, dynamics_id)
                    SELECT c.id::text, 1, 1, 1, %s, d365._contact_guid(c.id::text, 1) FROM person c',
                   d365._contact_values_expr());
END \$\$;
ALTER TABLE person DISABLE TRIGGER d365_link_guard, DISABLE TRIGGER d365_link_guard_update;
UPDATE person c SET dynamics365_related_id = s.dynamics_id, dynamics365_synchronized_on = now()
  FROM d365.contact_state s WHERE s.contact_key = c.id::text;
ALTER TABLE person ENABLE TRIGGER d365_link_guard, ENABLE TRIGGER d365_link_guard_update;
VACUUM ANALYZE person;
VACUUM ANALYZE d365.contact_state;
SQL

# push CALLS: ms per d365_update_contact() call (a changed last name)
push() {
    q <<SQL
CREATE TEMP TABLE t (ms float8);
DO \$\$
DECLARE
    id integer;
    t0 timestamptz;
BEGIN
    FOR i IN 1 .. $1 LOOP
        id := 1 + floor(random() * $N)::integer;
        t0 := clock_timestamp();
        PERFORM d365.d365_update_contact(jsonb_build_object(
            'contactid', d365._contact_guid(id::text, 1), 'lastname', 'Pushed' || i));
        INSERT INTO t VALUES (extract(epoch FROM clock_timestamp() - t0) * 1000);
    END LOOP;
END \$\$;
SELECT round(avg(ms)::numeric, 2) || ' (p95 ' ||
       round(percentile_cont(0.95) WITHIN GROUP (ORDER BY ms)::numeric, 2) || ')' FROM t;
SQL
}

# pull PAGES: rows/s of d365._pull_record() over pages of 5,000 changed rows
pull() {
    q <<SQL
CREATE TEMP TABLE t (rows int, s float8);
DO \$\$
DECLARE
    page json;
    t0 timestamptz;
BEGIN
    FOR p IN 1 .. $1 LOOP
        SELECT json_agg(json_build_object('contactid', d365._contact_guid(id::text, 1),
                                          'lastname', 'Pulled' || p || '-' || id))
          INTO page
          -- 5,000 different contacts (change tracking names a record once a page)
          FROM (SELECT g AS id FROM generate_series(1, $N) g ORDER BY random() LIMIT 5000) r;
        t0 := clock_timestamp();
        PERFORM d365._pull_record(page);
        INSERT INTO t VALUES (5000, extract(epoch FROM clock_timestamp() - t0));
    END LOOP;
END \$\$;
SELECT round(sum(rows) / sum(s)) FROM t;
SQL
}

# resync: seconds of d365_sync_contacts() with nothing pending
resync() {
    q -c "SELECT d365.d365_sync_contacts()" >/dev/null
    local t0 t1
    t0=$(date +%s.%N)
    out=$(q -c "SELECT created + updated + failed FROM d365.d365_sync_contacts()")
    t1=$(date +%s.%N)
    /usr/bin/python3 -c "print('%.2f (%s sent)' % ($t1 - $t0, '$out'))"
}

echo
echo "Incoming changes and the no-change re-sync at $N linked contacts"
echo
echo "| contacts | push call, ms (p95) | pull apply, rows/s | no-change re-sync, s |"
echo "|---|---|---|---|"
echo "| $N | $(push "$CALLS") | $(pull "$PAGES") | $(resync) |"
