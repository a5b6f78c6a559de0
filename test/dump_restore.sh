#!/usr/bin/env bash
# test/dump_restore.sh: pg_dump / pg_restore (custom and plain format) and
# pg_dumpall of a database using d365sync keep everything d365sync holds,
# and the restored database carries on where the dumped one stopped.
#
# scripts/test.sh runs it with the cluster and simulator it started (PGHOST,
# PGPORT, PGUSER, D365_SIM_URL, D365_SIMCTL exported); run by itself it
# builds and starts its own (D365_SKIP_BUILD=1: uses what is installed).
#   1. a database in use: settings with the secret, an application user, an
#      attached table whose key column follows a dropped column (its
#      attribute number changes in a restored copy), a field map, linked
#      contacts, activities sent and pending, change tracking state, run
#      history with a failed run, a table map with a column map and linked
#      rows;
#   2. dumps it as a superuser (custom format, plain format, pg_dumpall)
#      and restores each into a fresh database (pg_dumpall: a fresh
#      cluster), stopping at the first error;
#   3. checks every row of d365's tables and of the application's table,
#      the capture triggers, and d365_status() against the source;
#   4. checks that the next sync sends no request (the simulator's request
#      log) and that a later edit is captured and sent as one update.
# Prints "ok N - ..." / "not ok N - ..." lines with diagnostics as "# ...";
# KEEP=1 keeps the databases and files.
set -uo pipefail

. "$(dirname "$0")/lib.sh"
t_begin dump
SRC=d365dump_src
CLUSTER2=""
t_on_exit() {
    if [ -n "$CLUSTER2" ]; then
        runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$CLUSTER2/data" -m immediate stop >/dev/null 2>&1
    fi
    [ -n "${KEEP:-}" ] ||
    for db in $SRC d365dump_custom d365dump_plain d365dump_nomap; do
        psql -X -q -d postgres -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1
    done
}
t_standalone || exit 0
export PATH=$PG_BIN:$PATH

check() {   # check NAME EXPECTED ACTUAL
    if [ "$2" = "$3" ]; then ok "$1"; else notok "$1" "expected: $2" "actual:   $3"; fi
}
psql_db() { psql -X -v ON_ERROR_STOP=1 -q -d "$@"; }
api_requests() {
    "$D365_SIMCTL" requests --kind api | /usr/bin/python3 -c '
import json, sys
for r in json.load(sys.stdin)["requests"]:
    print(r.get("method"), r.get("path"))'
}

# -- 1. a database in use
"$D365_SIMCTL" reset >/dev/null
t_create_db $SRC 2>/dev/null
if ! psql_db $SRC >"$TMPD/src.log" 2>&1 <<SQL
SET client_min_messages = warning;
CREATE EXTENSION d365sync;
UPDATE d365.settings
   SET org_url = '$D365_SIM_URL', authority_url = '$D365_SIM_URL',
       tenant_id = '11111111-1111-1111-1111-111111111111',
       client_id = '22222222-2222-2222-2222-222222222222',
       client_secret = 'sim-secret',
       contact_sync_enabled = true, min_score = 10, activity_sync_enabled = true,
       run_history_retention = '90 days';
INSERT INTO d365.app_users (client_id, client_secret, enabled)
VALUES ('33333333-3333-3333-3333-333333333333', 'second-secret', false);
-- the key column comes after a dropped column: a restored copy numbers it 1
CREATE TABLE person (legacy_id integer, id integer PRIMARY KEY, email text,
                     first_name text, last_name text, score integer);
ALTER TABLE person DROP COLUMN legacy_id;
SELECT d365.d365_attach_contacts('person');
INSERT INTO d365.field_map (column_name, dynamics_field, match)
VALUES ('email', 'emailaddress1', true);
INSERT INTO d365.field_map (column_name, dynamics_field, direction)
VALUES ('first_name', 'firstname', 'both'), ('last_name', 'lastname', 'out');
INSERT INTO d365.activity_type_map VALUES ('call', 'phonecall');
INSERT INTO person VALUES (1, 'ada@example.com', 'Ada', 'Lovelace', 50),
                          (2, 'alan@example.com', 'Alan', 'Turing', 40),
                          (3, 'grace@example.com', 'Grace', 'Hopper', 5);
SELECT * FROM d365.d365_sync_contacts();
UPDATE person SET last_name = 'King' WHERE id = 1;
SELECT * FROM d365.d365_sync_contacts();
SELECT d365.d365_log_activity(1, 'call', 'Called Ada', '{"direction": "outgoing"}');
SELECT d365.d365_log_activity(3, 'task', 'Not linked: stays pending');
SELECT * FROM d365.d365_sync_activities();
SELECT * FROM d365.d365_pull_changes();
-- a table map, its key after a dropped column too
CREATE TABLE companies (legacy_id integer, id integer PRIMARY KEY, name text NOT NULL);
ALTER TABLE companies DROP COLUMN legacy_id;
SELECT d365.d365_map_table('account', 'companies', 'accounts');
SELECT d365.d365_map_column('account', 'name', 'name');
-- each restored copy renames the same Dynamics account: for the copies
-- after the first, that is an edit made on both sides, and the edit made
-- here is to win
UPDATE d365.table_map SET conflict = 'local_wins' WHERE name = 'account';
INSERT INTO companies VALUES (1, 'Contoso'), (2, 'Fabrikam');
SELECT * FROM d365.d365_sync('account');
SQL
then
    notok "set-up: a database using d365sync"
    sed 's/^/# /' "$TMPD/src.log"
    exit 0
fi
# a failed run in the history (the organisation unreachable for one run)
psql_db $SRC -c "UPDATE d365.settings SET org_url = 'http://127.0.0.1:9'" \
             -c "UPDATE person SET first_name = 'Augusta Ada' WHERE id = 1" >/dev/null 2>&1
psql_db $SRC -c "SELECT * FROM d365.d365_sync_contacts()" >/dev/null 2>&1
psql_db $SRC -c "UPDATE d365.settings SET org_url = '$D365_SIM_URL'" \
             -c "UPDATE d365.contact_state SET next_attempt_at = NULL" \
             -c "SELECT * FROM d365.d365_sync_contacts()" >/dev/null 2>&1
out=$(psql_db $SRC -At -c "SELECT (SELECT count(*) FILTER (WHERE dynamics365_related_id IS NOT NULL) FROM person)
                             + (SELECT count(*) FILTER (WHERE dynamics365_related_id IS NOT NULL) FROM companies)" \
                       -c "SELECT count(*) FROM d365.sync_run WHERE message LIKE 'failed%'" \
                       -c "SELECT count(*) FROM d365.activity WHERE synced_at IS NULL" 2>&1)
check "set-up: 2 contacts and 2 mapped companies linked, a failed run recorded, 1 activity pending" "$(printf '4\n1\n1')" "$out"

# every row of d365's tables (all columns, the secrets included: a
# superuser reads them) and of the application's table
dump_rows() {
    local db=$1 t
    for t in settings app_users contact_source field_map contact_state contact_change \
             activity activity_type_map activity_mapper sync_run pull_state \
             table_map column_map map_row map_change metadata_cache; do
        echo "== $t"
        psql_db "$db" -At -c "SELECT t::text FROM d365.$t t ORDER BY 1" 2>&1
    done
    echo "== sequences"
    psql_db "$db" -At -c "SELECT last_value FROM d365.sync_run_id_seq" \
                      -c "SELECT last_value FROM d365.activity_id_seq" 2>&1
    echo "== person"
    psql_db "$db" -At -c "SELECT p::text FROM person p ORDER BY id" 2>&1
    echo "== companies"
    psql_db "$db" -At -c "SELECT c::text FROM companies c ORDER BY id" 2>&1
    echo "== triggers"
    psql_db "$db" -At -c "SELECT tgrelid::regclass, tgname, tgenabled, pg_get_triggerdef(t.oid) FROM pg_trigger t
                           WHERE tgrelid IN ('person'::regclass, 'companies'::regclass) AND NOT tgisinternal ORDER BY tgrelid::regclass::text, tgname" 2>&1 |
        sed 's/EXECUTE FUNCTION d365._contact_capture_\(row\|delete\)(.*)/EXECUTE FUNCTION d365._contact_capture_\1(key)/'
}
status() { psql_db "$1" -At -F' | ' -c "SELECT item, value FROM d365.d365_status()" 2>&1; }
dump_rows $SRC >"$TMPD/rows.src"
status $SRC >"$TMPD/status.src"
grep -q 'sim-secret' "$TMPD/rows.src" || notok "set-up: the secret is among the rows compared"

# -- 2.-4. each way of dumping and restoring
verify() {   # verify DB HOW [PSQL-ENV...]: checks 3 and 4 on a restored database
    local db=$1 how=$2
    dump_rows "$db" >"$TMPD/rows.$how"
    if diff -u "$TMPD/rows.src" "$TMPD/rows.$how" >"$TMPD/rows.diff"; then
        ok "$how: settings (secret included), application users, attachment, field map, links, sync state, change queue, activities, type map, run history, change tracking and the capture triggers are kept ($(wc -l <"$TMPD/rows.src") lines)"
    else
        notok "$how: every row and the capture triggers are kept"
        sed 's/^/# /' "$TMPD/rows.diff" | head -40
    fi
    status "$db" | grep -v '^worker |' >"$TMPD/status.$how"
    if diff -u <(grep -v '^worker |' "$TMPD/status.src") "$TMPD/status.$how" >"$TMPD/status.diff"; then
        ok "$how: d365_status() says what it said before the dump"
    else
        notok "$how: d365_status() says what it said before the dump"
        sed 's/^/# /' "$TMPD/status.diff"
    fi

    "$D365_SIMCTL" clear-requests >/dev/null
    out=$(psql_db "$db" -At -F' ' -c "SELECT created, updated, failed FROM d365.d365_sync_contacts()" \
                                  -c "SELECT created, failed FROM d365.d365_sync_activities()" \
                                  -c "SELECT created, updated, failed FROM d365.d365_sync('account')" 2>&1)
    check "$how: the next sync sends no request (contacts 0 0 0, activities 0 0, table map 0 0 0; simulator's log empty)" \
          "0 0 0;0 0;0 0 0;requests:" "$(echo "$out" | tr '\n' ';')requests:$(api_requests | tr '\n' ' ')"

    "$D365_SIMCTL" clear-requests >/dev/null
    out=$(psql_db "$db" -At -F' ' -c "UPDATE person SET email = 'ada.$how@example.com' WHERE id = 1" \
                                  -c "SELECT created, updated, failed FROM d365.d365_sync_contacts()" 2>&1)
    id=$(psql_db "$db" -At -c "SELECT dynamics365_related_id FROM person WHERE id = 1")
    sent=$("$D365_SIMCTL" requests --kind api | /usr/bin/python3 -c '
import json, sys
for r in json.load(sys.stdin)["requests"]:
    print(r.get("method"), r.get("path"), json.dumps(r.get("body"), sort_keys=True))' | sed 's/batch_[0-9a-f-]*/batch/')
    if [ "$out" = "0 1 0" ] && echo "$sent" | grep -q "$id" && echo "$sent" | grep -q "ada.$how@example.com"; then
        ok "$how: an edit after the restore is captured and sent as one update of the linked record"
        out=$(psql_db "$db" -At -F' ' -c "UPDATE companies SET name = 'Contoso $how' WHERE id = 1" \
                                      -c "SELECT created, updated, failed FROM d365.d365_sync('account')" 2>&1)
        check "$how: an edit of a mapped table after the restore is sent as one update" "0 1 0" "$out"
    else
        notok "$how: an edit after the restore is captured and sent as one update of the linked record"
        echo "# counts: $out"; echo "$sent" | sed 's/^/# /' | head -10
    fi
}

restore_db() { t_create_db "$1" 2>/dev/null; }

# custom format, pg_restore stopping at the first error
restore_db d365dump_custom
if pg_dump -Fc -d $SRC -f "$TMPD/src.dump" 2>"$TMPD/dump.log" &&
   pg_restore --exit-on-error -d d365dump_custom "$TMPD/src.dump" >"$TMPD/restore.log" 2>&1; then
    ok "custom format: pg_dump -Fc and pg_restore --exit-on-error succeed"
    verify d365dump_custom custom
else
    notok "custom format: pg_dump -Fc and pg_restore --exit-on-error succeed"
    sed 's/^/# /' "$TMPD/dump.log" "$TMPD/restore.log" | head -20
fi

# a restore that lost the field map (as 0.2's did, or pg_restore -j when the
# map's COPY is refused): d365_status() says so
restore_db d365dump_nomap
pg_restore -l "$TMPD/src.dump" | grep -v 'TABLE DATA d365 field_map ' >"$TMPD/nomap.list"
if pg_restore --exit-on-error -L "$TMPD/nomap.list" -d d365dump_nomap "$TMPD/src.dump" >"$TMPD/restore.log" 2>&1; then
    out=$(psql_db d365dump_nomap -At -c "SELECT value FROM d365.d365_status() WHERE item = 'mapped fields'" 2>&1)
    check "without its field map, the restored database's d365_status() says so loudly" \
          "0 -- WARNING: contacts are linked but no field is mapped, so nothing is sent or received; restore d365.field_map (see \"Backup and restore\" in docs/operations.md) or map the fields again" "$out"
else
    notok "without its field map, the restored database's d365_status() says so loudly" "$(cat "$TMPD/restore.log")"
fi

# plain format, psql stopping at the first error
restore_db d365dump_plain
if pg_dump -Fp -d $SRC -f "$TMPD/src.sql" 2>"$TMPD/dump.log" &&
   psql -X -q -v ON_ERROR_STOP=1 -d d365dump_plain -f "$TMPD/src.sql" >"$TMPD/restore.log" 2>&1; then
    ok "plain format: pg_dump and psql -v ON_ERROR_STOP=1 succeed"
    verify d365dump_plain plain
else
    notok "plain format: pg_dump and psql -v ON_ERROR_STOP=1 succeed"
    sed 's/^/# /' "$TMPD/dump.log" "$TMPD/restore.log" | head -20
fi

# pg_dumpall (roles and the database) into a fresh cluster
others=$(psql -X -At -d postgres -c "SELECT string_agg(format('--exclude-database=%s', datname), ' ')
                                        FROM pg_database WHERE datname <> '$SRC' AND datallowconn")
CLUSTER2=$TMPD/cluster2
mkdir -p "$CLUSTER2/sock" && chown -R postgres:postgres "$CLUSTER2"
if pg_dumpall $others -f "$TMPD/all.sql" 2>"$TMPD/dump.log" &&
   (cd "$CLUSTER2" && runuser -u postgres -- "$PG_BIN/initdb" -D "$CLUSTER2/data" -U postgres \
        --auth=trust --no-sync >"$TMPD/initdb.log" 2>&1) &&
   cat >>"$CLUSTER2/data/postgresql.conf" <<CONF &&
listen_addresses = ''
unix_socket_directories = '$CLUSTER2/sock'
port = 5432
fsync = off
CONF
   (cd "$CLUSTER2" && runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$CLUSTER2/data" -w \
        -l "$CLUSTER2/postgres.log" start >/dev/null 2>&1) &&
   sed '/^CREATE ROLE postgres;$/d' "$TMPD/all.sql" >"$TMPD/all2.sql" &&
   PGHOST=$CLUSTER2/sock psql -X -q -v ON_ERROR_STOP=1 -d postgres -f "$TMPD/all2.sql" >"$TMPD/restore.log" 2>&1; then
    ok "pg_dumpall into a fresh cluster, psql -v ON_ERROR_STOP=1, succeeds"
    PGHOST=$CLUSTER2/sock verify $SRC dumpall
else
    notok "pg_dumpall into a fresh cluster, psql -v ON_ERROR_STOP=1, succeeds"
    sed "s/^/# /" "$TMPD/dump.log" "$TMPD/restore.log" "$CLUSTER2/postgres.log" 2>/dev/null | tail -20
fi
