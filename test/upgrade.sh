#!/usr/bin/env bash
# test/upgrade.sh: ALTER EXTENSION d365sync UPDATE from every earlier release
# yields the same objects as a fresh install and keeps the user's data.
#
# scripts/test.sh runs it with the cluster and simulator it started (PGHOST,
# PGPORT, PGUSER, D365_SIM_URL, D365_SIMCTL exported); run by itself it
# builds and starts its own (D365_SKIP_BUILD=1: uses what is installed).
# For each path (0.1 -> 0.2, 0.2 -> the current version, 0.1 -> 0.2 -> the
# current version in one ALTER EXTENSION) it:
#   1. installs the old release in a database (from its frozen install
#      script), configures it against the simulator, attaches and maps a
#      contact table, syncs, logs activities (a 0.2 installation also has
#      a second application user and its own history retention, and pulls);
#   2. saves every user row of d365's tables (the columns the old release
#      had);
#   3. runs ALTER EXTENSION d365sync UPDATE [TO the target];
#   4. compares the catalog of schema d365 (test/catalog.sql: functions with
#      volatility, SECURITY DEFINER, SET clauses and bodies; columns, types,
#      defaults; indexes; constraints; triggers, those on the attached table
#      included) with a fresh install of the target that attached the same
#      table;
#   5. checks the saved rows are unchanged and the next sync sends nothing,
#      that (for the current version) the attachment became the table map
#      "contact" whose column map is the field map and d365_sync() sends
#      nothing either, and that the updated installation still creates a
#      new contact.
# Then, for the current version:
#   6. updates a 0.1 installation whose key column was renamed, and
#      attaches it again;
#   7. checks that a generated column mapped in 0.1 is mapped 'out' after
#      the update.
# Prints "ok N - ..." / "not ok N - ..." lines with diagnostics as "# ...".
set -uo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
OLD=d365upgrade_old
NEW=d365upgrade_new
. "$(dirname "$0")/lib.sh"
t_begin upgrade
t_standalone || exit 0
CURRENT=$(sed -n "s/^default_version = '\(.*\)'/\1/p" "$REPO/d365sync.control")
psql_db() { psql -X -v ON_ERROR_STOP=1 -q -d "$@"; }

setup_table() {
    cat <<SQL
CREATE TABLE person (id integer PRIMARY KEY, email text, first_name text,
                     last_name text, score integer);
SELECT d365.d365_attach_contacts('person');
INSERT INTO d365.field_map (column_name, dynamics_field)
VALUES ('email', 'emailaddress1'), ('first_name', 'firstname'), ('last_name', 'lastname');
SQL
}

# what an installation of release $1 in use has done
use_release() {
    cat <<SQL
UPDATE d365.settings
   SET org_url = '$D365_SIM_URL', authority_url = '$D365_SIM_URL',
       tenant_id = '11111111-1111-1111-1111-111111111111',
       client_id = '22222222-2222-2222-2222-222222222222',
       client_secret = 'sim-secret',
       contact_sync_enabled = true, min_score = 10, activity_sync_enabled = true;
$(setup_table)
INSERT INTO person VALUES (1, 'ada@example.com', 'Ada', 'Lovelace', 50),
                          (2, 'alan@example.com', 'Alan', 'Turing', 40),
                          (3, 'grace@example.com', 'Grace', 'Hopper', 5);
SELECT * FROM d365.d365_sync_contacts();
UPDATE person SET last_name = 'King' WHERE id = 1;
SELECT * FROM d365.d365_sync_contacts();
SELECT d365.d365_log_activity(1, 'phonecall', 'Called Ada', '{"direction": "outgoing"}');
SELECT d365.d365_log_activity(2, 'task', 'Send the paper');
SELECT d365.d365_log_activity(3, 'task', 'Not linked yet: stays pending');
SELECT * FROM d365.d365_sync_activities();
SQL
    if [ "$1" != 0.1 ]; then
        cat <<SQL
UPDATE d365.settings SET run_history_retention = '90 days';
UPDATE d365.field_map SET match = true WHERE column_name = 'email';
INSERT INTO d365.app_users (client_id, client_secret, enabled)
VALUES ('33333333-3333-3333-3333-333333333333', 'second-secret', false);
SELECT * FROM d365.d365_pull_changes();
SQL
    fi
}

# the user's rows of every table of d365, in the columns the old release had
save_columns() {
    local db=$1 t
    psql_db "$db" -At -c "SELECT c.relname FROM pg_class c
                           WHERE c.relnamespace = 'd365'::regnamespace AND c.relkind = 'r'
                           ORDER BY 1" >"$TMPD/tables"
    while read -r t; do
        psql_db "$db" -At -c "SELECT string_agg(CASE WHEN atttypid = 'timestamptz'::regtype
                                         THEN format('%I::text', attname) ELSE quote_ident(attname) END, ', ' ORDER BY attnum)
                               FROM pg_attribute WHERE attrelid = 'd365.$t'::regclass
                                AND attnum > 0 AND NOT attisdropped" >"$TMPD/cols.$t"
    done <"$TMPD/tables"
}
dump_rows() {
    local db=$1 t cols
    while read -r t; do
        cols=$(cat "$TMPD/cols.$t")
        echo "== $t"
        psql_db "$db" -At -c "SELECT $cols FROM d365.$t ORDER BY ROW($cols)::text" 2>&1
    done <"$TMPD/tables"
    echo "== person"
    psql_db "$db" -At -c "SELECT * FROM person ORDER BY id"
}

# upgrade_path FROM TO: steps 1 to 5 for an installation of FROM updated to
# TO (TO = the current version: a plain ALTER EXTENSION d365sync UPDATE,
# which goes through every release between)
upgrade_path() {
    local from=$1 to=$2 path update t
    if [ "$to" = "$CURRENT" ]; then
        update="ALTER EXTENSION d365sync UPDATE"
        path=$(/usr/bin/python3 -c 'import sys; v = sys.argv[1:]; print(" -> ".join(v))' \
                   $(psql_db postgres -At -c "SELECT path FROM pg_extension_update_paths('d365sync')
                                              WHERE source = '$from' AND target = '$to'" | tr -s '-' ' '))
    else
        update="ALTER EXTENSION d365sync UPDATE TO '$to'"
        path="$from -> $to"
    fi

    # -- 1. an installation of $from in use
    "$D365_SIMCTL" reset >/dev/null
    for db in $OLD $NEW; do
        psql -X -q -d postgres -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db" >/dev/null 2>&1
    done
    if ! psql_db $OLD >"$TMPD/old.log" 2>&1 <<SQL
CREATE EXTENSION d365sync VERSION '$from';
$(use_release "$from")
SQL
    then
        notok "$path: a $from installation syncs contacts and activities"
        sed 's/^/# /' "$TMPD/old.log"
        return
    fi
    ok "$path: a $from installation syncs contacts and activities"

    # -- 2. the user's rows, in the columns $from had
    save_columns $OLD
    dump_rows $OLD >"$TMPD/rows.before"

    # -- 3. the update
    if psql_db $OLD -c "$update" >"$TMPD/update.log" 2>&1 &&
       [ "$(psql_db $OLD -At -c "SELECT extversion FROM pg_extension WHERE extname = 'd365sync'")" = "$to" ]; then
        ok "$path: $update reaches $to"
    else
        notok "$path: $update reaches $to"
        sed 's/^/# /' "$TMPD/update.log"
    fi

    # -- 4. the same objects as a fresh install
    psql_db $NEW >"$TMPD/new.log" 2>&1 <<SQL
CREATE EXTENSION d365sync VERSION '$to';
$(setup_table)
SQL
    psql_db $OLD -f "$REPO/test/catalog.sql" >"$TMPD/catalog.old" 2>&1
    psql_db $NEW -f "$REPO/test/catalog.sql" >"$TMPD/catalog.new" 2>&1
    if [ -s "$TMPD/catalog.new" ] && diff -u "$TMPD/catalog.new" "$TMPD/catalog.old" >"$TMPD/catalog.diff"; then
        ok "$path: the updated catalog equals a fresh $to install's ($(wc -l <"$TMPD/catalog.new") objects and attributes)"
    else
        notok "$path: the updated catalog equals a fresh $to install's (diff: fresh -> updated)"
        sed 's/^/# /' "$TMPD/catalog.diff" "$TMPD/new.log" | head -80
    fi

    # -- 5. the data is kept, the next sync sends nothing, new work still flows
    dump_rows $OLD >"$TMPD/rows.after"
    if diff -u "$TMPD/rows.before" "$TMPD/rows.after" >"$TMPD/rows.diff"; then
        ok "$path: every row of d365's $(wc -l <"$TMPD/tables") tables is kept ($(wc -l <"$TMPD/rows.before") lines)"
    else
        notok "$path: every row of d365's tables is kept"
        sed 's/^/# /' "$TMPD/rows.diff" | head -60
    fi

    "$D365_SIMCTL" clear-requests >/dev/null
    counts=$(psql_db $OLD -At -F' ' -c "SELECT created, updated, failed FROM d365.d365_sync_contacts()" \
                                    -c "SELECT created, failed FROM d365.d365_sync_activities()" 2>&1)
    api=$("$D365_SIMCTL" requests --kind api | /usr/bin/python3 -c 'import json,sys; print(len(json.load(sys.stdin)["requests"]))')
    if [ "$counts" = "$(printf '0 0 0\n0 0')" ] && [ "$api" = 0 ]; then
        ok "$path: the next sync sends nothing"
    else
        notok "$path: the next sync sends nothing"
        echo "# counts: $(echo $counts); API requests: $api"
        "$D365_SIMCTL" requests --kind api | /usr/bin/python3 -c 'import json,sys; [print("#", r.get("method"), r.get("path")) for r in json.load(sys.stdin)["requests"]]'
    fi

    if [ "$to" = "$CURRENT" ]; then
        # the attachment became the map "contact", its field map the column map
        maps=$(psql_db $OLD -At -F' ' \
                   -c "SELECT name, local_table, entity_set, key_column, direction, enabled FROM d365.table_map" \
                   -c "SELECT 'column_map' WHERE (SELECT array_agg((\"column\", field, direction, match) ORDER BY \"column\")
                                                    FROM d365.column_map WHERE map = 'contact')
                                                = (SELECT array_agg((column_name, dynamics_field, direction, match) ORDER BY column_name)
                                                    FROM d365.field_map)" \
                   -c "SELECT count(*) FROM d365.column_map" 2>&1)
        "$D365_SIMCTL" clear-requests >/dev/null
        counts=$(psql_db $OLD -At -F' ' -c "SELECT map, created, updated, failed, requests FROM d365.d365_sync()" 2>&1)
        api=$("$D365_SIMCTL" requests --kind api | /usr/bin/python3 -c 'import json,sys; print(len(json.load(sys.stdin)["requests"]))')
        if [ "$maps" = "$(printf 'contact person contacts id both t\ncolumn_map\n3')" ] &&
           [ "$counts" = "contact 0 0 0 0" ] && [ "$api" = 0 ]; then
            ok "$path: the attachment is the map \"contact\" with the field map as its column map; d365_sync() sends nothing"
        else
            notok "$path: the attachment is the map \"contact\" with the field map as its column map; d365_sync() sends nothing"
            echo "# maps: $(echo $maps); d365_sync(): $counts; API requests: $api"
        fi
    fi

    out=$(psql_db $OLD -At -F' ' -c "INSERT INTO person VALUES (4, 'kat@example.com', 'Katherine', 'Johnson', 60)" \
              -c "SELECT created, failed FROM d365.d365_sync_contacts()" \
              -c "SELECT count(*) FROM person WHERE dynamics365_related_id IS NOT NULL" 2>&1)
    if [ "$out" = "$(printf '1 0\n3')" ]; then
        ok "$path: the updated installation creates a new contact"
    else
        notok "$path: the updated installation creates a new contact"
        echo "# $(echo $out)"
    fi
}

upgrade_path 0.1 0.2
upgrade_path 0.2 "$CURRENT"
upgrade_path 0.1 "$CURRENT"

# -- 6. an installation whose attached table lost its key column's name
# (which broke every INSERT under 0.1) updates too: 0.1's triggers go, the
# attachment is reported broken, and attaching under the new name repairs it
psql -X -q -d postgres -c "DROP DATABASE IF EXISTS $OLD WITH (FORCE)" -c "CREATE DATABASE $OLD" >/dev/null 2>&1
out=$(psql_db $OLD -At 2>&1 <<SQL
SET client_min_messages = warning;
CREATE EXTENSION d365sync VERSION '0.1';
CREATE TABLE person (id integer PRIMARY KEY, email text, score integer);
SELECT d365.d365_attach_contacts('person');
ALTER TABLE person RENAME COLUMN id TO person_id;
ALTER EXTENSION d365sync UPDATE;
INSERT INTO person VALUES (1, 'ada@example.com', 50);
SELECT value FROM d365.d365_status() WHERE item = 'attachment';
SELECT d365.d365_attach_contacts('person', 'person_id');
SELECT value FROM d365.d365_status() WHERE item = 'attachment';
SQL
)
if [ "$(echo "$out" | grep -v '^$')" = "$(printf 'broken: key column "id" of public.person was renamed or dropped\nok')" ]; then
    ok "an installation whose key column was renamed updates, reports it, and attaches again"
else
    notok "an installation whose key column was renamed updates, reports it, and attaches again"
    echo "$out" | sed 's/^/# /'
fi

# -- 7. a generated column that 0.1 let be mapped both ways is only sent after
# the update (0.2 maps a generated column with direction 'out' only)
GEN=d365upgrade_gen
psql -X -q -d postgres -c "DROP DATABASE IF EXISTS $GEN" -c "CREATE DATABASE $GEN" >/dev/null
out=$(psql_db $GEN -At 2>&1 <<'SQL'
CREATE EXTENSION d365sync VERSION '0.1';
CREATE TABLE person (id integer PRIMARY KEY, first_name text, last_name text, score integer,
                     full_name text GENERATED ALWAYS AS (first_name || ' ' || last_name) STORED);
SELECT d365.d365_attach_contacts('person');
INSERT INTO d365.field_map (column_name, dynamics_field)
VALUES ('first_name', 'firstname'), ('full_name', 'description');
ALTER EXTENSION d365sync UPDATE;
SELECT string_agg(column_name || '=' || direction, ' ' ORDER BY column_name) FROM d365.field_map;
SQL
)
if [ "$(echo "$out" | tail -n 1)" = "first_name=both full_name=out" ]; then
    ok "a generated column mapped in 0.1 is mapped 'out' after the update"
else
    notok "a generated column mapped in 0.1 is mapped 'out' after the update"
    echo "$out" | sed 's/^/# /'
fi

for db in $OLD $NEW $GEN; do
    psql -X -q -d postgres -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1
done
