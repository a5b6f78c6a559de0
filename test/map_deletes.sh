#!/usr/bin/env bash
# test/map_deletes.sh: deletes both ways for table maps -- on_local_delete
# unlink / deactivate / delete (the Dynamics id kept in d365.pending_delete
# and d365_status() until Dynamics has done it; a DELETE that fails is tried
# again later; 404 counts as done) and on_remote_delete delete (the local
# row deleted as the table's owner), read back from the simulator.
#
#   bash test/map_deletes.sh                    # builds and installs first
#   D365_SKIP_BUILD=1 bash test/map_deletes.sh  # uses the installed extension
# Prints "ok N - ..." / "not ok N - ..." and always exits 0.
set -uo pipefail

DB=d365mapdel
. "$(dirname "$0")/lib.sh"
t_begin mapdel
t_on_exit() { simctl reset >/dev/null 2>&1; }
t_standalone || exit 0

simctl reset >/dev/null
t_create_db "$DB"
PSQL_DB=postgres psqlq -c "DROP ROLE IF EXISTS mapdel_owner" -c "CREATE ROLE mapdel_owner" >/dev/null 2>&1
if ! psqlq >"$TMPD/setup.log" 2>&1 <<SQL
$(t_configure_sql)
SET search_path = public, d365;
CREATE TABLE companies (id serial PRIMARY KEY, name text NOT NULL);
CREATE TABLE people (id serial PRIMARY KEY, last_name text NOT NULL, company_id integer REFERENCES companies);
CREATE TABLE notes (id serial PRIMARY KEY, name text NOT NULL);
-- the owner's own code: who deleted a row
CREATE TABLE who_deleted (who name, what text);
GRANT INSERT ON who_deleted TO mapdel_owner;
CREATE FUNCTION note_delete() RETURNS trigger LANGUAGE plpgsql AS
\$\$ BEGIN INSERT INTO public.who_deleted VALUES (current_user, TG_TABLE_NAME || ' ' || OLD.id); RETURN OLD; END \$\$;
CREATE TRIGGER note_delete BEFORE DELETE ON people FOR EACH ROW EXECUTE FUNCTION note_delete();
ALTER TABLE companies OWNER TO mapdel_owner;
ALTER TABLE people OWNER TO mapdel_owner;
ALTER TABLE notes OWNER TO mapdel_owner;
SELECT d365_map_table('account', 'companies', 'accounts');
SELECT d365_map_column('account', 'name', 'name');
SELECT d365_map_table('person', 'people', 'contacts');
SELECT d365_map_column('person', 'last_name', 'lastname');
SELECT d365_map_column('person', 'company_id', 'parentcustomerid');
SELECT d365_map_table('note', 'notes', 'accounts', 'id');
SQL
then
    notok "set-up: mapping the tables failed" "$(tail -n 8 "$TMPD/setup.log")"
    exit 0
fi
q() { psqlq -c "SET search_path = public, d365" -c "$1" 2>&1; }
sim_field() {
    simctl rows "$1" | python3 -c '
import json, sys
ent, rid, field = sys.argv[1:4]
for r in json.load(sys.stdin)["value"]:
    if r.get(ent + "id") == rid:
        v = r.get(field)
        print("" if v is None else v)
        break
else:
    print("(gone)")' "$1" "$2" "$3"
}

q "INSERT INTO companies (name) VALUES ('Keep Ltd'), ('Erase Me GmbH'), ('Gone Already'), ('Unlinked Co');
   INSERT INTO people (last_name, company_id) VALUES ('Lee', 1), ('Ray', 1), ('Solo', NULL)" >/dev/null
out=$(q "SELECT string_agg(map || ':' || created, ' ') FROM d365_sync()")
if [ "$out" != "account:4 note:0 person:3" ]; then
    notok "set-up: the first sync" "$out"
    exit 0
fi
id_of() { q "SELECT dynamics365_related_id FROM $1 WHERE id = $2"; }
erase=$(id_of companies 2); gone=$(id_of companies 3); unl=$(id_of companies 4)
ray=$(id_of people 2); solo=$(id_of people 3)

# -- 1. unlink (the default): the record stays, nothing pending
q "DELETE FROM companies WHERE id = 4" >/dev/null
out=$(q "SELECT count(*) FROM d365.pending_delete")
sync=$(q "SELECT requests FROM d365_sync('account')")
if [ "$out" = "0" ] && [ "$sync" = "0" ] && [ "$(sim_field account "$unl" name)" = "Unlinked Co" ]; then
    ok "on_local_delete unlink: the Dynamics record stays, nothing is sent or pending"
else
    notok "unlink keeps the record" "$out" "$sync" "$(sim_field account "$unl" name)"
fi

# -- 2. delete: the Dynamics id stays visible until the DELETE succeeded;
# a DELETE answered 500 (every retry of the run) is kept with its error and tried again later
q "UPDATE d365.table_map SET on_local_delete = 'delete' WHERE name = 'account'" >/dev/null
q "DELETE FROM companies WHERE id = 2" >/dev/null
pend=$(q "SELECT row_key || ' ' || dynamics_id || ' ' || action FROM d365.pending_delete")
stat=$(q "SELECT value FROM d365_status() WHERE item = 'pending deletes of map account'")
if [ "$pend" = "2 $erase delete" ] && grep -q "^1 (oldest .*, Dynamics id $erase)$" <<<"$stat"; then
    ok "a deleted company's Dynamics id is visible in d365.pending_delete and d365_status()"
else
    notok "the pending delete is visible" "$pend" "$stat"
fi
simctl fault "{\"method\":\"DELETE\",\"path_regex\":\"accounts.$erase\",\"status\":500,\"times\":null}" >/dev/null
out=$(q "SELECT failed || '/' || deleted FROM d365_sync('account')")
pend=$(q "SELECT attempts || ' ' || last_status || ' ' || (next_attempt_at > now()) FROM d365.pending_delete WHERE dynamics_id = '$erase'")
if [ "$out" = "1/0" ] && [ "$pend" = "1 500 true" ] && [ "$(sim_field account "$erase" name)" = "Erase Me GmbH" ]; then
    ok "a DELETE answered 500 leaves the record and keeps the delete pending (attempt 1, status 500, backed off)"
else
    notok "a failed DELETE stays pending" "$out" "$pend"
fi
out=$(q "SELECT requests FROM d365_sync('account')")
if [ "$out" = "0" ]; then
    ok "during its back-off the delete is not sent again"
else
    notok "back-off of a failed delete" "$out"
fi
simctl clear-faults >/dev/null
q "UPDATE d365.map_delete SET next_attempt_at = now() - interval '1 second'" >/dev/null
out=$(q "SELECT failed || '/' || deleted FROM d365_sync('account')")
left=$(q "SELECT count(*) FROM d365.pending_delete")
stat=$(q "SELECT count(*) FROM d365_status() WHERE item LIKE 'pending deletes%'")
if [ "$out" = "0/1" ] && [ "$left" = "0" ] && [ "$stat" = "0" ] && [ "$(sim_field account "$erase" name)" = "(gone)" ]; then
    ok "tried again later, the DELETE succeeds: the account is gone from Dynamics and nothing is pending"
else
    notok "a failed delete succeeds later" "$out" "$left" "$stat" "$(sim_field account "$erase" name)"
fi

# -- 3. a record deleted in Dynamics already: 404 counts as done
simctl edit account "{\"op\":\"delete\",\"id\":\"$gone\"}" >/dev/null
q "DELETE FROM companies WHERE id = 3" >/dev/null
out=$(q "SELECT failed || '/' || deleted FROM d365_sync('account')")
left=$(q "SELECT count(*) FROM d365.pending_delete")
if [ "$out" = "0/1" ] && [ "$left" = "0" ]; then
    ok "a DELETE answered 404 (deleted in Dynamics already) counts as done"
else
    notok "404 on delete" "$out" "$left"
fi

# -- 4. deactivate: statecode 1, statuscode 2; the record stays
q "UPDATE d365.table_map SET on_local_delete = 'deactivate' WHERE name = 'person'" >/dev/null
q "DELETE FROM people WHERE id = 2" >/dev/null
out=$(q "SELECT failed || '/' || deleted FROM d365_sync('person')")
got="$(sim_field contact "$ray" lastname) $(sim_field contact "$ray" statecode) $(sim_field contact "$ray" statuscode)"
if [ "$out" = "0/1" ] && [ "$got" = "Ray 1 2" ] && [ "$(q "SELECT count(*) FROM d365.pending_delete")" = "0" ]; then
    ok "on_local_delete deactivate: the contact stays in Dynamics, inactive (statecode 1, statuscode 2)"
else
    notok "deactivate" "$out" "$got"
fi

# -- 5. TRUNCATE with delete: every linked row's record goes
q "UPDATE d365.table_map SET on_local_delete = 'delete' WHERE name = 'note'" >/dev/null
q "INSERT INTO notes (name) VALUES ('N1'), ('N2')" >/dev/null
q "SELECT * FROM d365_sync('note')" >/dev/null
n1=$(id_of notes 1)
q "TRUNCATE notes" >/dev/null
pend=$(q "SELECT count(*) FROM d365.pending_delete WHERE map = 'note'")
out=$(q "SELECT deleted FROM d365_sync('note')")
if [ "$pend" = "2" ] && [ "$out" = "2" ] && [ "$(sim_field account "$n1" name)" = "(gone)" ]; then
    ok "TRUNCATE of a map with on_local_delete delete deletes the records of its linked rows"
else
    notok "truncate deletes" "$pend" "$out"
fi

# -- 6. on_remote_delete delete: the local row is deleted as the table's owner
q "UPDATE d365.table_map SET on_remote_delete = 'delete' WHERE name = 'person'" >/dev/null
q "SELECT * FROM d365_pull('person')" >/dev/null     # the baseline
simctl edit contact "{\"op\":\"delete\",\"id\":\"$solo\"}" >/dev/null
out=$(q "SELECT deleted || '/' || failed FROM d365_pull('person')")
rows=$(q "SELECT string_agg(id::text, ',' ORDER BY id) FROM people")
who=$(q "SELECT string_agg(who || ':' || what, ',') FROM who_deleted WHERE what = 'people 3'")
pend=$(q "SELECT count(*) FROM d365.pending_delete")
if [ "$out" = "1/0" ] && [ "$rows" = "1" ] && [ "$who" = "mapdel_owner:people 3" ] && [ "$pend" = "0" ]; then
    ok "a contact deleted in Dynamics deletes its person here, as the table's owner, and queues no delete back"
else
    notok "on_remote_delete delete" "$out" "$rows" "$who" "$pend"
fi

# -- 7. a row that cannot be deleted (referenced) stays unlinked, with a warning
q "UPDATE d365.table_map SET on_remote_delete = 'delete' WHERE name = 'account'" >/dev/null
q "SELECT * FROM d365_pull('account')" >/dev/null
keep=$(id_of companies 1)
simctl edit account "{\"op\":\"delete\",\"id\":\"$keep\"}" >/dev/null
out=$(q "SELECT deleted || '/' || failed FROM d365_pull('account')" | grep -v WARNING)
state=$(q "SELECT (SELECT count(*) FROM companies WHERE id = 1 AND dynamics365_related_id IS NULL),
                  (SELECT last_error FROM d365.map_row WHERE map = 'account' AND row_key = '1')")
if [ "$out" = "1/1" ] && grep -q '^1|deleted in Dynamics 365, unlinked; the local delete failed: update or delete on table "companies" violates foreign key constraint' <<<"$state"; then
    ok "a company still referenced by a person is unlinked, not deleted, and says why"
else
    notok "a local delete that fails" "$out" "$state"
fi

# -- 8. the sync's caller must be allowed to delete
PSQL_DB=postgres psqlq -c "DROP ROLE IF EXISTS mapdel_runner" -c "CREATE ROLE mapdel_runner" >/dev/null 2>&1
q "GRANT USAGE ON SCHEMA d365 TO mapdel_runner; GRANT SELECT, UPDATE ON people TO mapdel_runner;
   GRANT EXECUTE ON FUNCTION d365._map_remove(text, text), d365._map_owner_sql(text, text, name[]),
                             d365._table_map(text) TO mapdel_runner;
   UPDATE people SET company_id = NULL WHERE id = 1" >/dev/null
q "SELECT d365._map_set_links('person', '{1}', '{NULL}', ARRAY[dynamics365_related_id]) FROM people WHERE id = 1" >/dev/null
out=$(q "SET ROLE mapdel_runner; SELECT d365._map_remove('person', '1')")
if grep -q 'permission denied to delete from table public.people' <<<"$out" && [ "$(q "SELECT count(*) FROM people WHERE id = 1")" = "1" ]; then
    ok "a role without DELETE on the table cannot have d365sync delete a row"
else
    notok "delete needs the caller's DELETE right" "$out"
fi

# -- 9. a link that d365sync did not write never has it delete that record:
# the owner of notes, past the guard, points a row at a company's record
# (notes map to accounts too) and deletes the row
q "INSERT INTO companies (name) VALUES ('Victim AG')" >/dev/null
q "SELECT * FROM d365_sync('account')" >/dev/null
q "INSERT INTO notes (name) VALUES ('Forger')" >/dev/null
q "SELECT * FROM d365_sync('note')" >/dev/null
victim=$(q "SELECT dynamics365_related_id FROM companies WHERE name = 'Victim AG'")
forger=$(q "SELECT dynamics365_related_id FROM notes WHERE name = 'Forger'")
q "SET ROLE mapdel_owner;
   ALTER TABLE notes DISABLE TRIGGER d365_link_guard, DISABLE TRIGGER d365_link_guard_update;
   UPDATE notes SET dynamics365_related_id = '$victim' WHERE name = 'Forger';
   ALTER TABLE notes ENABLE TRIGGER d365_link_guard, ENABLE TRIGGER d365_link_guard_update;
   DELETE FROM notes WHERE name = 'Forger'" >/dev/null
pend=$(q "SELECT string_agg(dynamics_id::text, ',') FROM d365.pending_delete WHERE map = 'note'")
q "SELECT * FROM d365_sync('note')" >/dev/null
if [ -n "$victim" ] && [ -n "$forger" ] && [ "$(sim_field account "$victim" name)" = "Victim AG" ] \
   && [ "$pend" = "$forger" ] && [ "$(sim_field account "$forger" name)" = "(gone)" ]; then
    ok "a forged link on a deleted row queues the record d365sync linked it to, never the forged one (the victim's record stays)"
else
    notok "a forged link must not delete another record" "victim $victim: $(sim_field account "$victim" name)" "pending: $pend (the row's own record: $forger)"
fi
