#!/usr/bin/env bash
# test/map_capture_rows.sh: what the capture triggers of a mapped table note
# in d365.map_change (C row triggers, the UPDATE one behind a WHEN clause
# on the key and the columns the map sends, flushed by statement
# triggers): a statement of no rows notes nothing; a multi-row INSERT or
# UPDATE notes its keys in one queue row; an UPDATE of unmapped columns,
# or of a column mapped in only, notes nothing; a key change notes the new
# key; the WHEN clause follows the column map; d365sync's own writes (links,
# pulled values) note nothing; a rolled-back savepoint's keys are dropped; a
# statement of more than 65,536 rows by a writer with no rights in d365;
# DELETE queues the record's id for the delete policy; TRUNCATE forgets the
# map's state; a partitioned table cannot be mapped; and the trigger
# functions refuse to run from any other trigger.
#
#   bash test/map_capture_rows.sh                    # builds and installs first
#   D365_SKIP_BUILD=1 bash test/map_capture_rows.sh  # uses the installed extension
# Prints "ok N - ..." / "not ok N - ..." and always exits 0.
set -uo pipefail

DB=d365mapcap
. "$(dirname "$0")/lib.sh"
t_begin mapcap
t_on_exit() { simctl reset >/dev/null 2>&1; }
t_standalone || exit 0

simctl reset >/dev/null
t_create_db "$DB"
PSQL_DB=postgres psqlq -c "DROP ROLE IF EXISTS mapcap_writer" -c "CREATE ROLE mapcap_writer" >/dev/null 2>&1
if ! psqlq >"$TMPD/setup.log" 2>&1 <<SQL
$(t_configure_sql)
SET search_path = public, d365;
CREATE TABLE companies (id integer PRIMARY KEY, name text NOT NULL, phone text, city text,
                        visits integer NOT NULL DEFAULT 0);
GRANT SELECT, INSERT, UPDATE, DELETE ON companies TO mapcap_writer;
SELECT d365_map_table('account', 'companies', 'accounts');
SELECT d365_map_column('account', 'name', 'name');
SELECT d365_map_column('account', 'phone', 'telephone1');
SELECT d365_map_column('account', 'city', 'address1_city', 'in');
SQL
then
    notok "set-up: mapping the tables failed" "$(tail -n 8 "$TMPD/setup.log")"
    exit 0
fi
q() { psqlq -c "SET search_path = public, d365" -c "$1" 2>&1; }
# the keys noted for a map, sorted, and the number of queue rows: "1,2,3/1"
noted() {
    q "SELECT coalesce((SELECT string_agg(k, ',' ORDER BY k::integer)
                          FROM d365.map_change c, unnest(c.keys) k WHERE c.map = '$1'), '')
              || '/' || (SELECT count(*) FROM d365.map_change c WHERE c.map = '$1')"
}
clear() { q "TRUNCATE d365.map_change" >/dev/null; }

# -- 1. the triggers: C row triggers and statement flushes, executable by no
# role but their owner (the job role owns the SECURITY DEFINER flush)
out=$(q "SELECT string_agg(tgname || ':' || (SELECT n.nspname || '.' || p.proname FROM pg_proc p
                                            JOIN pg_namespace n ON n.oid = p.pronamespace WHERE p.oid = tgfoid)
                           || CASE WHEN tgtype & 1 = 1 THEN ':row' ELSE ':statement' END, ' ' ORDER BY tgname)
           FROM pg_trigger WHERE tgrelid = 'companies'::regclass AND tgname LIKE 'd365_map_capture%'")
ex=$(q "SELECT count(*) FROM pg_proc p, pg_roles r
         WHERE p.oid IN ('d365._map_capture_row()'::regprocedure, 'd365._map_capture_flush()'::regprocedure)
           AND NOT r.rolsuper AND r.oid <> p.proowner
           AND has_function_privilege(r.oid, p.oid, 'EXECUTE')")
want="d365_map_capture_delete:d365._map_capture:statement d365_map_capture_insert:d365._map_capture_row:row d365_map_capture_insert_flush:d365._map_capture_flush:statement d365_map_capture_truncate:d365._map_capture:statement d365_map_capture_update:d365._map_capture_row:row d365_map_capture_update_flush:d365._map_capture_flush:statement"
if [ "$out" = "$want" ] && [ "$ex" = "0" ]; then
    ok "a mapped table's INSERT and UPDATE capture is C row triggers and statement flushes that no role may execute"
else
    notok "the capture triggers" "$out" "executable by $ex roles"
fi

# -- 2. a statement of no rows notes nothing
clear
q "INSERT INTO companies SELECT 1, 'x' WHERE false;
   UPDATE companies SET name = 'y' WHERE false" >/dev/null
out=$(noted account)
if [ "$out" = "/0" ]; then
    ok "an INSERT and an UPDATE of no rows note nothing"
else
    notok "a statement of no rows" "$out"
fi

# -- 3. a multi-row INSERT notes its keys in one queue row, as a writer
# with no rights in d365
out=$(q "SET ROLE mapcap_writer;
         INSERT INTO public.companies (id, name, phone, city)
         VALUES (1, 'Alpha', '1', 'Oslo'), (2, 'Beta', '2', 'Rome'), (3, 'Gamma', '3', 'Bonn')")
if [ "$(noted account)" = "1,2,3/1" ]; then
    ok "a three-row INSERT by a writer without rights in d365 notes its three keys in one queue row"
else
    notok "a multi-row INSERT" "$out" "$(noted account)"
fi

# -- 4. an UPDATE of unmapped columns, or of a column mapped in only,
# notes nothing; of a sent column, the rows it changed
clear
q "UPDATE companies SET visits = visits + 1;
   UPDATE companies SET city = 'Paris' WHERE id = 1;
   UPDATE companies SET name = name WHERE id = 2" >/dev/null
a=$(noted account)
q "UPDATE companies SET phone = phone || '0' WHERE id IN (1, 3)" >/dev/null
b=$(noted account)
if [ "$a" = "/0" ] && [ "$b" = "1,3/1" ]; then
    ok "an UPDATE of an unmapped column, a column mapped in only, or to the same value notes nothing; of a sent column, its rows"
else
    notok "UPDATE capture" "$a" "$b"
fi

# -- 4b. INSERT ... ON CONFLICT DO UPDATE: the inserted and the updated
# keys, once, in one queue row
clear
q "INSERT INTO companies (id, name, phone) VALUES (1, 'Alpha', '77'), (4, 'Delta', '4')
   ON CONFLICT (id) DO UPDATE SET phone = EXCLUDED.phone" >/dev/null
if [ "$(noted account)" = "1,4/1" ]; then
    ok "INSERT ... ON CONFLICT DO UPDATE notes the inserted and the updated key in one queue row"
else
    notok "ON CONFLICT DO UPDATE" "$(noted account)"
fi
q "DELETE FROM companies WHERE id = 4" >/dev/null

# -- 5. a key change notes the new key
clear
q "UPDATE companies SET id = 30 WHERE id = 3" >/dev/null
if [ "$(noted account)" = "30/1" ]; then
    ok "a key change notes the new key"
else
    notok "a key change" "$(noted account)"
fi

# -- 6. the WHEN clause follows the column map
clear
q "SELECT d365_map_column('account', 'city', 'address1_city', 'both')" >/dev/null
q "UPDATE companies SET city = 'Lyon' WHERE id = 1" >/dev/null
a=$(noted account)
q "DELETE FROM d365.column_map WHERE map = 'account' AND \"column\" = 'phone'" >/dev/null
clear
q "UPDATE companies SET phone = '9' WHERE id = 2" >/dev/null
b=$(noted account)
when=$(q "SELECT pg_get_triggerdef(oid) FROM pg_trigger
           WHERE tgrelid = 'companies'::regclass AND tgname = 'd365_map_capture_update'")
if [ "$a" = "1/1" ] && [ "$b" = "/0" ] && grep -q "city" <<<"$when" && ! grep -q "phone" <<<"$when"; then
    ok "a column mapped or unmapped later is added to or taken from the WHEN clause"
else
    notok "the WHEN clause follows the column map" "$a" "$b" "$when"
fi
q "SELECT d365_map_column('account', 'phone', 'telephone1')" >/dev/null

# -- 7. d365sync's own writes (the links of the first sync, values pulled
# from Dynamics) note nothing
out=$(q "SELECT created FROM d365_sync('account')")
a=$(noted account)
alpha=$(q "SELECT dynamics365_related_id FROM companies WHERE id = 1")
q "SELECT count(*) FROM d365_pull('account')" >/dev/null
simctl edit account "{\"op\":\"update\",\"id\":\"$alpha\",\"values\":{\"name\":\"Alpha Pulled\"}}" >/dev/null
q "SELECT count(*) FROM d365_pull('account')" >/dev/null
name=$(q "SELECT name FROM companies WHERE id = 1")
b=$(noted account)
if [ "$out" = "3" ] && [ "$a" = "/0" ] && [ "$name" = "Alpha Pulled" ] && [ "$b" = "/0" ]; then
    ok "the sync's link writes and a pulled value are d365sync's own writes: nothing noted"
else
    notok "own writes" "$out" "$a" "$name" "$b"
fi

# -- 7b. an initial load's inserts are d365sync's own writes: nothing noted
clear
out=$(q "CREATE TABLE loaded (id serial PRIMARY KEY, name text);
         SELECT d365_map_table('loaded', 'loaded', 'accounts');
         SELECT d365_map_column('loaded', 'name', 'name');
         UPDATE d365.table_map SET load = true WHERE name = 'loaded';
         SELECT created FROM d365_pull('loaded')")
n=$(q "SELECT count(*) FROM loaded WHERE dynamics365_related_id IS NOT NULL")
if [ "${n:-0}" -ge 5 ] && [ "$(noted loaded)" = "/0" ]; then
    ok "the rows an initial load inserts ($n) are not noted as local changes"
else
    notok "a load's own inserts" "$out" "$n" "$(noted loaded)"
fi
q "SELECT d365_unmap_table('loaded')" >/dev/null

# -- 8. a rolled-back savepoint drops its keys; the enclosing statement's stay
clear
q "BEGIN;
   UPDATE companies SET name = 'Kept' WHERE id = 2;
   SAVEPOINT s;
   UPDATE companies SET name = 'Gone' WHERE id = 30;
   ROLLBACK TO SAVEPOINT s;
   COMMIT" >/dev/null
if [ "$(noted account)" = "2/1" ]; then
    ok "a rolled-back savepoint's keys are dropped, the rest written"
else
    notok "savepoints" "$(noted account)"
fi

# -- 9. a statement of more than 65,536 rows by a writer with no rights in
# d365 (flushed from the row trigger as d365's owner every 65,536 keys)
clear
out=$(q "SET ROLE mapcap_writer;
         INSERT INTO public.companies (id, name) SELECT g, 'Bulk ' || g FROM generate_series(1001, 71000) g")
n=$(q "SELECT count(*) || '/' || count(DISTINCT k) || '/' || (SELECT count(*) FROM d365.map_change)
         FROM d365.map_change c, unnest(c.keys) k")
if [ "$n" = "70000/70000/2" ]; then
    ok "an INSERT of 70,000 rows notes each key once, in two queue rows"
else
    notok "a large statement" "$out" "$n"
fi
q "DELETE FROM companies WHERE id > 1000" >/dev/null

# -- 10. DELETE: the record's id waits in d365.map_delete (delete policy)
q "UPDATE d365.table_map SET on_local_delete = 'deactivate' WHERE name = 'account'" >/dev/null
beta=$(q "SELECT dynamics365_related_id FROM companies WHERE id = 2")
q "DELETE FROM companies WHERE id = 2" >/dev/null
out=$(q "SELECT dynamics_id || ' ' || row_key || ' ' || action FROM d365.map_delete WHERE map = 'account'")
st=$(q "SELECT count(*) FROM d365.map_row WHERE map = 'account' AND row_key = '2'")
if [ -n "$beta" ] && [ "$out" = "$beta 2 deactivate" ] && [ "$st" = "0" ]; then
    ok "a DELETE queues the row's Dynamics id for on_local_delete and forgets its state"
else
    notok "DELETE capture" "$beta" "$out" "$st"
fi
q "DELETE FROM d365.map_delete; UPDATE d365.table_map SET on_local_delete = 'unlink' WHERE name = 'account'" >/dev/null

# -- 11. TRUNCATE forgets the map's state and noted keys
q "UPDATE companies SET name = 'Noted' WHERE id = 1" >/dev/null
q "TRUNCATE companies" >/dev/null
out=$(q "SELECT (SELECT count(*) FROM d365.map_row WHERE map = 'account') || '/'
             || (SELECT count(*) FROM d365.map_change WHERE map = 'account')")
if [ "$out" = "0/0" ]; then
    ok "TRUNCATE forgets the map's rows and noted keys"
else
    notok "TRUNCATE capture" "$out"
fi

# -- 12. a partitioned table cannot be mapped (its unique index on the link
# column would have to hold the partition key): refused whole, nothing left
q "CREATE TABLE parts (id integer PRIMARY KEY, lastname text) PARTITION BY RANGE (id);
   CREATE TABLE parts_low PARTITION OF parts FOR VALUES FROM (1) TO (100)" >/dev/null
out=$(q "SELECT d365_map_table('part', 'parts', 'contacts')")
left=$(q "SELECT (SELECT count(*) FROM pg_trigger WHERE tgrelid IN ('parts'::regclass, 'parts_low'::regclass))
             || '/' || (SELECT count(*) FROM d365.table_map WHERE name = 'part')")
if grep -q "unique constraint on partitioned table must include all partitioning columns" <<<"$out" &&
   [ "$left" = "0/0" ]; then
    ok "mapping a partitioned table is refused whole (no trigger, no map)"
else
    notok "partitioned table" "$out" "$left"
fi

# -- 13. the trigger functions refuse to run from any other trigger
q "CREATE TABLE decoy (id integer PRIMARY KEY, name text)" >/dev/null
r1=$(q "CREATE TRIGGER d365_map_capture_update_flush AFTER UPDATE ON decoy
            FOR EACH STATEMENT EXECUTE FUNCTION d365._map_capture_flush();
        INSERT INTO decoy VALUES (1, 'a'); UPDATE decoy SET name = 'b'")
r2=$(q "CREATE TRIGGER sneaky AFTER INSERT ON companies
            FOR EACH STATEMENT EXECUTE FUNCTION d365._map_capture_flush();
        INSERT INTO companies (id, name) VALUES (7, 'x')")
q "INSERT INTO companies (id, name) VALUES (8, 'y')" >/dev/null
r3=$(q "CREATE TRIGGER sneaky_row AFTER DELETE ON companies
            FOR EACH ROW EXECUTE FUNCTION d365._map_capture_row('1', 'id');
        DELETE FROM companies")
q "DROP TRIGGER IF EXISTS sneaky ON companies; DROP TRIGGER IF EXISTS sneaky_row ON companies" >/dev/null
clear
r4=$(q "CREATE TRIGGER d365_map_capture_insert AFTER INSERT ON decoy
            FOR EACH ROW EXECUTE FUNCTION d365._map_capture_row('1', 'id');
        INSERT INTO decoy VALUES (2, 'c');
        UPDATE companies SET name = 'After decoy' WHERE false")
n=$(q "SELECT count(*) FROM d365.map_change")
if grep -q 'd365._map_capture_flush() cannot run in trigger "d365_map_capture_update_flush" on decoy' <<<"$r1" &&
   grep -q 'd365._map_capture_flush() cannot run in trigger "sneaky" on companies' <<<"$r2" &&
   grep -q 'd365._map_capture_row() cannot run in trigger "sneaky_row" on companies' <<<"$r3" &&
   ! grep -q ERROR <<<"$r4" && [ "$n" = "0" ]; then
    ok "the capture functions refuse to run from another trigger or table; keys a row trigger notes on another table are dropped"
else
    notok "foreign triggers" "$r1" "$r2" "$r3" "$r4" "$n"
fi

# -- 14. unmapping drops every capture trigger
q "DROP TRIGGER d365_map_capture_insert ON decoy" >/dev/null
q "SELECT d365_unmap_table('account')" >/dev/null
out=$(q "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'companies'::regclass")
if [ "$out" = "0" ]; then
    ok "d365_unmap_table drops the capture triggers"
else
    notok "unmap" "$out"
fi
