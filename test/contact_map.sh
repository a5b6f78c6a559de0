#!/usr/bin/env bash
# test/contact_map.sh: the attached contact table is the table map
# "contact" (entity set contacts): its row of d365.table_map and its column
# maps follow the attachment and the field map, d365_map_column('contact',
# ...) writes the field map, the map cannot be changed behind the
# attachment's back, and detaching removes it.  Lookups both ways: a
# contact's foreign key to a mapped accounts table goes out as
# parentcustomerid (parentcustomerid_account@odata.bind, read back from the
# simulator), a contact whose company is not linked yet waits, d365_sync()
# sends the accounts first, a company changed in Dynamics comes back as the
# local foreign key, and an account's foreign key to the contact table
# binds its primary contact; a lookup to a table the mapper cannot read is
# refused; pg_dump/pg_restore keeps it all and the restored database sends
# nothing.
#
# scripts/test.sh runs it with the cluster and simulator it started; run
# alone it starts its own:
#   bash test/contact_map.sh                    # builds and installs first
#   D365_SKIP_BUILD=1 bash test/contact_map.sh  # uses the installed extension
# Prints "ok N - ..." / "not ok N - ..." and always exits 0.
set -uo pipefail

DB=d365contactmap
. "$(dirname "$0")/lib.sh"
t_begin contactmap
t_on_exit() { simctl reset >/dev/null 2>&1; }
t_standalone || exit 0

simctl reset >/dev/null
t_create_db "$DB"
PSQL_DB=postgres psqlq -c "DROP ROLE IF EXISTS cm_owner" -c "CREATE ROLE cm_owner" \
                       -c "DROP ROLE IF EXISTS cm_admin" -c "CREATE ROLE cm_admin" >/dev/null 2>&1
if ! psqlq >"$TMPD/setup.log" 2>&1 <<SQL
$(t_configure_sql)
SET search_path = public, d365;
UPDATE d365.settings SET contact_sync_enabled = true, min_score = 10;
CREATE TABLE accounts (id serial PRIMARY KEY, name text NOT NULL, primary_contact integer);
CREATE TABLE crm_person (id serial PRIMARY KEY, first_name text, last_name text NOT NULL,
                         email text, score integer NOT NULL DEFAULT 50,
                         company_id integer REFERENCES accounts);
GRANT USAGE, CREATE ON SCHEMA public TO cm_owner;
GRANT USAGE ON SCHEMA public TO cm_admin;
ALTER TABLE accounts ADD FOREIGN KEY (primary_contact) REFERENCES crm_person;
-- a table of another role that the contact table's owner may reference, not read
CREATE TABLE hidden_co (id integer PRIMARY KEY, name text);
ALTER TABLE crm_person ADD COLUMN hidden_id integer REFERENCES hidden_co;
ALTER TABLE hidden_co OWNER TO cm_admin;
ALTER TABLE accounts OWNER TO cm_owner;
ALTER TABLE crm_person OWNER TO cm_owner;
SELECT d365_grant('cm_owner', 'admin');
SELECT d365_grant('cm_admin', 'admin');
SET ROLE cm_owner;
SELECT d365_attach_contacts('crm_person');
INSERT INTO d365.field_map (column_name, dynamics_field, match) VALUES ('email', 'emailaddress1', true);
SELECT d365_map_column('contact', 'last_name', 'lastname');
SQL
then
    notok "set-up: attaching the contact table failed" "$(tail -n 8 "$TMPD/setup.log")"
    exit 0
fi
q() { psqlq -c "SET search_path = public, d365" -c "$1" 2>&1; }
qas() { psqlq -c "SET search_path = public, d365" -c "SET ROLE $1" -c "$2" 2>&1; }
# the column map of "contact" as d365.column_map shows it, and the field map
column_maps() { q "SELECT string_agg(format('%s=%s/%s/%s', \"column\", field, direction, match), ' ' ORDER BY \"column\")
                     FROM d365.column_map WHERE map = 'contact'"; }
field_map() { q "SELECT string_agg(format('%s=%s/%s/%s', column_name, dynamics_field, direction, match), ' ' ORDER BY column_name)
                   FROM d365.field_map"; }

# -- 1. attaching made the map row, the field map shows as its column maps
row=$(q "SELECT name, local_table, entity_set, key_column, direction, enabled FROM d365.table_map")
cols=$(column_maps)
if [ "$row" = "contact|crm_person|contacts|id|both|t" ] &&
   [ "$cols" = "email=emailaddress1/both/t last_name=lastname/both/f" ] && [ "$cols" = "$(field_map)" ]; then
    ok "attaching makes the table map \"contact\" (crm_person, contacts, key id) and the field map its column maps"
else
    notok "the map row and column maps after attach" "$row" "$cols" "$(field_map)"
fi

# -- 2. d365_map_column('contact', ...) adds a field map entry, checked
# against the metadata as any field map entry is
out=$(qas cm_owner "SELECT d365_map_column('contact', 'first_name', 'firstname', 'out')")
cols=$(column_maps)
fm=$(q "SELECT dynamics_field || '/' || direction FROM d365.field_map WHERE column_name = 'first_name'")
if [ "$fm" = "firstname/out" ] && [ "$cols" = "$(field_map)" ] &&
   grep -q 'first_name=firstname/out/f' <<<"$cols"; then
    ok "d365_map_column('contact', 'first_name', 'firstname', 'out') adds the field map entry and its column map"
else
    notok "d365_map_column('contact', ...) writes the field map" "$out" "$fm" "$cols"
fi
out=$(qas cm_owner "SELECT d365_map_column('contact', 'first_name', 'nosuchfield')")
if grep -q 'Dynamics field "nosuchfield" does not exist on contact' <<<"$out" &&
   [ "$(q "SELECT dynamics_field FROM d365.field_map WHERE column_name = 'first_name'")" = "firstname" ]; then
    ok "a field contact does not have is refused by the field map's check; the entry stays"
else
    notok "a bad field for the contact map is refused" "$out"
fi
q "DELETE FROM d365.field_map WHERE column_name = 'first_name'" >/dev/null
if [ "$(column_maps)" = "$(field_map)" ]; then
    ok "deleting a field map entry deletes its column map"
else
    notok "column maps follow a delete of the field map" "$(column_maps)" "$(field_map)"
fi

# -- 3. hostile shapes: a role that does not own the contact table cannot
# map it or its columns; the map cannot be changed behind the attachment
out=$(qas cm_admin "SELECT d365_map_column('contact', 'first_name', 'firstname')")
if grep -q 'must be the owner of public.crm_person to map its columns' <<<"$out" &&
   [ -z "$(q "SELECT 1 FROM d365.field_map WHERE column_name = 'first_name'")" ]; then
    ok "an admin that does not own the contact table cannot map its columns (d365_map_column('contact', ...))"
else
    notok "a non-owner maps a contact column" "$out"
fi
out=$(qas cm_admin "SELECT d365_map_table('people', 'crm_person', 'contacts')")
if grep -q 'must be the owner of public.crm_person to map it' <<<"$out"; then
    ok "an admin that does not own the contact table cannot map it under another name"
else
    notok "a non-owner maps the contact table" "$out"
fi
out=$(qas cm_owner "SELECT d365_map_table('people', 'crm_person', 'contacts')")
if grep -q 'crm_person is the attached contact table' <<<"$out"; then
    ok "its owner cannot map it a second time either"
else
    notok "the contact table mapped twice" "$out"
fi
out1=$(qas cm_admin "UPDATE d365.table_map SET local_table = 'accounts' WHERE name = 'contact'")
out2=$(qas cm_admin "INSERT INTO d365.column_map VALUES ('contact', 'first_name', 'firstname')")
out3=$(qas cm_admin "DELETE FROM d365.table_map WHERE name = 'contact'")
out4=$(qas cm_owner "SELECT d365_unmap_table('contact')")
row=$(q "SELECT local_table FROM d365.table_map WHERE name = 'contact'")
if grep -q 'the table map "contact" is the attached contact table' <<<"$out1" &&
   grep -q 'the column map of map "contact" is the field map of the contact table' <<<"$out2" &&
   grep -q 'the table map "contact" is the attached contact table' <<<"$out3" &&
   grep -q 'd365_detach_contacts() removes it' <<<"$out4" && [ "$row" = "crm_person" ] &&
   [ "$(q "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'crm_person'::regclass")" -ge 3 ]; then
    ok "the map \"contact\" is not rewritten, extended or deleted behind the attachment (nor unmapped: its triggers stay)"
else
    notok "writes to the contact map are refused" "$out1" "$out2" "$out3" "$out4" "$row"
fi

# -- 4. d365_sync() runs the map through the contact engine; switched off,
# d365_sync() passes it by
q "INSERT INTO crm_person (first_name, last_name, email) VALUES ('Ada', 'Lovelace', 'ada@x.test')" >/dev/null
out=$(q "SELECT map, created, failed FROM d365_sync()")
if [ "$out" = "contact|1|0" ] && [ -n "$(q "SELECT dynamics365_related_id FROM crm_person WHERE id = 1")" ]; then
    ok "d365_sync() runs the map \"contact\" with the contact engine (1 created)"
else
    notok "d365_sync() and the contact map" "$out"
fi
q "UPDATE crm_person SET last_name = 'King'" >/dev/null
out=$(qas cm_admin "UPDATE d365.table_map SET enabled = false WHERE name = 'contact'; SELECT count(*) FROM d365_sync()")
out2=$(q "UPDATE d365.table_map SET enabled = true WHERE name = 'contact'; SELECT map, updated FROM d365_sync()")
if [ "$(tail -n1 <<<"$out")" = "0" ] && [ "$out2" = "contact|1" ]; then
    ok "switched off (enabled = false), d365_sync() passes the contact map by; on again, it sends the change"
else
    notok "enabled of the contact map" "$out" "$out2"
fi

# -- 5. detaching removes the map and its column maps; attaching again
# makes them again
q "SELECT d365_detach_contacts()" >/dev/null
n=$(q "SELECT (SELECT count(*) FROM d365.table_map) || '/' || (SELECT count(*) FROM d365.column_map)")
q "SELECT d365_attach_contacts('crm_person'); INSERT INTO d365.field_map VALUES ('email', 'emailaddress1')" >/dev/null
n2=$(q "SELECT (SELECT count(*) FROM d365.table_map WHERE name = 'contact') || '/' || (SELECT count(*) FROM d365.column_map)")
if [ "$n" = "0/0" ] && [ "$n2" = "1/1" ]; then
    ok "detaching removes the map \"contact\" and its column maps; attaching again makes them"
else
    notok "detach removes the map" "$n" "$n2"
fi

# -- 6. a lookup to a table the mapper cannot read is refused
q "SELECT d365_map_table('hidden', 'hidden_co', 'accounts')" >/dev/null
out=$(qas cm_owner "SELECT d365_map_column('contact', 'hidden_id', 'parentcustomerid')")
if grep -q 'permission denied to map column "hidden_id" to a lookup of public.hidden_co' <<<"$out" &&
   [ -z "$(q "SELECT 1 FROM d365.field_map WHERE column_name = 'hidden_id'")" ]; then
    ok "the contact table's owner cannot map a foreign key to a mapped table it cannot read"
else
    notok "a lookup to an unreadable table" "$out"
fi
q "SELECT d365_unmap_table('hidden')" >/dev/null

# -- 7. accounts + contacts: the foreign key maps to parentcustomerid
out=$(qas cm_owner "SELECT d365_map_table('account', 'accounts', 'accounts');
                    SELECT d365_map_column('account', 'name', 'name');
                    SELECT d365_map_column('contact', 'company_id', 'parentcustomerid')")
fm=$(q "SELECT dynamics_field FROM d365.field_map WHERE column_name = 'company_id'")
cm=$(q "SELECT field FROM d365.column_map WHERE map = 'contact' AND \"column\" = 'company_id'")
if [ "$fm" = "parentcustomerid_account@odata.bind" ] && [ "$cm" = "$fm" ]; then
    ok "d365_map_column('contact', 'company_id', 'parentcustomerid'): the foreign key to accounts binds parentcustomerid_account"
else
    notok "mapping the contact's foreign key to parentcustomerid" "$out" "$fm" "$cm"
fi
sim_field() {
    simctl rows "$1" | python3 -c '
import json, sys
ent, rid, field = sys.argv[1:4]
for r in json.load(sys.stdin)["value"]:
    if r.get(ent + "id") == rid:
        v = r.get(field)
        print("" if v is None else v)' "$1" "$2" "$3"
}
out=$(q "SELECT count(*) FROM d365_validate_mapping() WHERE column_name = 'company_id'")
if [ "$out" = "0" ]; then
    ok "d365_validate_mapping() finds nothing wrong with the foreign key bound to parentcustomerid"
else
    notok "d365_validate_mapping() and a foreign-key lookup" "$(q "SELECT * FROM d365_validate_mapping()")"
fi
# a contact whose company is not in Dynamics yet: waits, not failed
q "INSERT INTO accounts (name) VALUES ('Contoso'), ('Fabrikam');
   INSERT INTO crm_person (first_name, last_name, email, company_id) VALUES ('Bob', 'Ray', 'bob@x.test', 1)" >/dev/null
out=$(q "SELECT created, failed FROM d365_sync('contact')")
st=$(q "SELECT coalesce(s.last_error, '-') || '/' || (p.dynamics365_related_id IS NULL)
          FROM crm_person p LEFT JOIN d365.contact_state s ON s.contact_key = p.id::text WHERE p.id = 2")
pend=$(q "SELECT value FROM d365_status() WHERE item = 'contacts to create'")
if [ "$out" = "0|0" ] && [ "$st" = "-/true" ] && [ "$pend" = "1" ]; then
    ok "a contact created before its account waits: not sent, not failed, no error; d365_status() counts it to create"
else
    notok "a contact waits for its account" "$out" "$st" "pending: $pend"
fi
out=$(q "SELECT string_agg(map || ':' || created || '/' || failed, ' ') FROM d365_sync()")
contoso=$(q "SELECT dynamics365_related_id FROM accounts WHERE id = 1")
bob=$(q "SELECT dynamics365_related_id FROM crm_person WHERE id = 2")
got=$(sim_field contact "$bob" _parentcustomerid_value)
if [ "$out" = "account:2/0 contact:1/0" ] && [ -n "$contoso" ] && [ "$got" = "$contoso" ] &&
   [ "$(sim_field contact "$bob" '_parentcustomerid_value@Microsoft.Dynamics.CRM.lookuplogicalname')" = "account" ]; then
    ok "d365_sync() sends the accounts first, then the contact: its parentcustomerid in Dynamics is Contoso's account"
else
    notok "accounts then contacts, parentcustomerid in Dynamics" "$out" "contoso: $contoso" "got: $got"
fi
out=$(q "SELECT sum(requests) FROM d365_sync()")
if [ "$out" = "0" ]; then
    ok "nothing changed: the next d365_sync() sends nothing"
else
    notok "no request without a change" "$out"
fi

# -- 8. a company changed in Dynamics comes back as the local foreign key;
# one d365sync has not linked fails that contact, saying which
fabrikam=$(q "SELECT dynamics365_related_id FROM accounts WHERE id = 2")
q "SELECT * FROM d365_pull()" >/dev/null
simctl edit contact "{\"op\":\"update\",\"id\":\"$bob\",\"values\":{\"parentcustomerid_account@odata.bind\":\"/accounts($fabrikam)\"}}" >/dev/null
out=$(q "SELECT string_agg(map || ':' || updated || '/' || failed, ' ') FROM d365_pull()")
fk=$(q "SELECT company_id FROM crm_person WHERE id = 2")
echo_=$(q "SELECT sum(requests) FROM d365_sync()")
if [ "$out" = "account:0/0 contact:1/0" ] && [ "$fk" = "2" ] && [ "$echo_" = "0" ]; then
    ok "Bob moved to Fabrikam in Dynamics: the pull sets crm_person.company_id = 2, and nothing is sent back"
else
    notok "a company reassignment comes back as the local foreign key" "$out" "$fk" "$echo_"
fi
simctl edit contact "{\"op\":\"update\",\"id\":\"$bob\",\"values\":{\"parentcustomerid_account@odata.bind\":\"/accounts(acc00000-0000-4000-8000-000000000002)\"}}" >/dev/null
out=$(q "SELECT string_agg(map || ':' || updated || '/' || failed, ' ') FROM d365_pull()")
err=$(q "SELECT last_error FROM d365.contact_state WHERE contact_key = '2'")
if [ "$(tail -n1 <<<"$out")" = "account:0/0 contact:0/1" ] && [ "$(q "SELECT company_id FROM crm_person WHERE id = 2")" = "2" ] &&
   grep -q 'record acc00000-0000-4000-8000-000000000002 is linked to no row of map "account"' <<<"$err"; then
    ok "a company d365sync has not linked fails the contact's incoming change, naming the record; the foreign key stays"
else
    notok "an incoming lookup to an unlinked record" "$out" "$err"
fi

# -- 9. another map's foreign key to the contact table binds the contact's record
out=$(qas cm_owner "SELECT d365_map_column('account', 'primary_contact', 'primarycontactid')")
q "UPDATE accounts SET primary_contact = 2 WHERE id = 1" >/dev/null
out=$(q "SELECT string_agg(map || ':' || updated || '/' || failed, ' ') FROM d365_sync()")
got=$(sim_field account "$contoso" _primarycontactid_value)
if [ "$out" = "account:2/0 contact:0/0" ] && [ "$got" = "$bob" ] &&
   [ -z "$(sim_field account "$fabrikam" _primarycontactid_value)" ]; then
    ok "accounts.primary_contact (a foreign key to the contact table) goes out as Contoso's primarycontactid = Bob's contact"
else
    notok "a lookup to the contact table" "$out" "got: $got" "bob: $bob"
fi

# -- 10. the push (d365_update_contact) of an application role without
# rights on d365's tables makes the incoming lookup local too
PSQL_DB=postgres psqlq -c "DROP ROLE IF EXISTS cm_app" -c "CREATE ROLE cm_app" >/dev/null 2>&1
out=$(q "SELECT d365_grant('cm_app', 'app'); GRANT USAGE ON SCHEMA public TO cm_app;
         GRANT SELECT, UPDATE ON crm_person TO cm_app;
         SET ROLE cm_app;
         SELECT d365_update_contact(jsonb_build_object('contactid', '$bob', '_parentcustomerid_value', '$contoso'))")
if [ "$(tail -n1 <<<"$out")" = '{"company_id": 1}' ] && [ "$(q "SELECT company_id FROM crm_person WHERE id = 2")" = "1" ] &&
   [ "$(q "SELECT sum(requests) FROM d365_sync('contact')")" = "0" ]; then
    ok "d365_update_contact() by an application role: Contoso's record becomes company_id = 1, not sent back"
else
    notok "the push of a lookup" "$out"
fi

# -- 11. pg_dump / pg_restore: the field map with its lookup is restored
# (before the foreign keys exist), the map rows are made again, and the
# restored database's next sync sends nothing
RESTORED=${DB}_restored
PSQL_DB=postgres psqlq -c "DROP DATABASE IF EXISTS $RESTORED" -c "CREATE DATABASE $RESTORED" >/dev/null 2>&1
out=$( { "$PG_BIN/pg_dump" -Fc -d "$DB" -f "$TMPD/db.dump" && "$PG_BIN/pg_restore" --exit-on-error -d "$RESTORED" "$TMPD/db.dump"; } 2>&1)
maps_sql="SELECT string_agg(format('%s:%s=%s', map, \"column\", field), ' ' ORDER BY map, \"column\") FROM d365.column_map
          UNION ALL SELECT string_agg(format('%s:%s', name, local_table), ' ' ORDER BY name) FROM d365.table_map"
before=$(psqlq -c "$maps_sql" 2>&1)
after=$(PSQL_DB=$RESTORED psqlq -c "$maps_sql" 2>&1)
simctl clear-requests >/dev/null
sent=$(PSQL_DB=$RESTORED psqlq -c "SELECT sum(requests) FROM d365.d365_sync()" 2>&1)
if [ -z "$out" ] && [ "$before" = "$after" ] && [ "$sent" = "0" ] && grep -q 'contact:company_id=parentcustomerid_account@odata.bind' <<<"$after"; then
    ok "pg_dump/pg_restore keeps the contact map, its lookup and the account map; the restored database's next sync sends nothing"
else
    notok "dump and restore with the contact map's lookup" "$out" "before: $before" "after:  $after" "sent: $sent"
fi
PSQL_DB=postgres psqlq -c "DROP DATABASE IF EXISTS $RESTORED WITH (FORCE)" >/dev/null 2>&1
