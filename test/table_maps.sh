#!/usr/bin/env bash
# test/table_maps.sh: table maps -- companies (accounts), people (contacts
# with a foreign key to companies, the Customer lookup parentcustomerid) and
# projects (the custom table new_projects: a lookup to account, a choice, a
# multi-select choice, money) synced both ways through d365_sync() and
# d365_pull(), read back from the simulator.
#
# scripts/test.sh runs it with the cluster and simulator it started; run
# alone it starts its own:
#   bash test/table_maps.sh                    # builds and installs first
#   D365_SKIP_BUILD=1 bash test/table_maps.sh  # uses the installed extension
# Prints "ok N - ..." / "not ok N - ..." and always exits 0.
set -uo pipefail

DB=d365maps
. "$(dirname "$0")/lib.sh"
t_begin maps
t_on_exit() { simctl reset >/dev/null 2>&1; }
t_standalone || exit 0

simctl reset >/dev/null
t_create_db "$DB"
PSQL_DB=postgres psqlq -c "DROP ROLE IF EXISTS maps_owner" -c "CREATE ROLE maps_owner" >/dev/null 2>&1
if ! psqlq >"$TMPD/setup.log" 2>&1 <<SQL
$(t_configure_sql)
SET search_path = public, d365;
CREATE TABLE companies (id serial PRIMARY KEY, name text NOT NULL, revenue numeric(12,2), industry text);
CREATE TABLE people (id serial PRIMARY KEY, first_name text, last_name text NOT NULL, email text,
                     company_id integer REFERENCES companies);
CREATE TABLE projects (id serial PRIMARY KEY, title text NOT NULL, stage text, services text[],
                       budget numeric, company_id integer REFERENCES companies);
-- the owner's own code on a mapped table: it shows who writes the link columns
CREATE TABLE who_wrote (who name, what text);
GRANT INSERT ON who_wrote TO maps_owner;
CREATE FUNCTION note_writer() RETURNS trigger LANGUAGE plpgsql AS
\$\$ BEGIN INSERT INTO public.who_wrote VALUES (current_user, TG_OP); RETURN NEW; END \$\$;
CREATE TRIGGER note_writer BEFORE UPDATE ON people FOR EACH ROW EXECUTE FUNCTION note_writer();
ALTER TABLE companies OWNER TO maps_owner;
ALTER TABLE people OWNER TO maps_owner;
ALTER TABLE projects OWNER TO maps_owner;
SELECT d365_map_table('account', 'companies', 'accounts');
SELECT d365_map_column('account', 'name', 'name');
SELECT d365_map_column('account', 'revenue', 'revenue');
SELECT d365_map_column('account', 'industry', 'industrycode');
SELECT d365_map_table('person', 'people', 'contacts');
SELECT d365_map_column('person', 'first_name', 'firstname');
SELECT d365_map_column('person', 'last_name', 'lastname');
SELECT d365_map_column('person', 'email', 'emailaddress1');
SELECT d365_map_column('person', 'company_id', 'parentcustomerid');
SELECT d365_map_table('project', 'projects', 'new_projects');
SELECT d365_map_column('project', 'title', 'new_name');
SELECT d365_map_column('project', 'stage', 'new_stage');
SELECT d365_map_column('project', 'services', 'new_services');
SELECT d365_map_column('project', 'budget', 'new_budget');
SELECT d365_map_column('project', 'company_id', 'new_accountid');
SQL
then
    notok "set-up: mapping the tables failed" "$(tail -n 8 "$TMPD/setup.log")"
    exit 0
fi
q() { psqlq -c "SET search_path = public, d365" -c "$1" 2>&1; }
# a Dynamics row's field, by id
sim_field() {
    simctl rows "$1" | python3 -c '
import json, sys
ent, rid, field = sys.argv[1:4]
key = ent + "id"
for r in json.load(sys.stdin)["value"]:
    if r.get(key) == rid:
        v = r.get(field)
        print("" if v is None else v)' "$1" "$2" "$3"
}

# -- 1. what d365_map_table and d365_map_column refuse
out=$(q "SELECT d365_map_column('person', 'email', 'nosuchfield')")
if grep -q 'cannot map column "email" to nosuchfield: Dynamics table contact has no attribute nosuchfield' <<<"$out"; then
    ok "a field Dynamics does not have is refused, checked against its metadata"
else
    notok "a field Dynamics does not have is refused" "$out"
fi
out=$(q "SELECT d365_map_column('person', 'first_name', 'parentcustomerid')")
if grep -q 'attribute parentcustomerid is a lookup: map a column with a foreign key to the key of a mapped table' <<<"$out"; then
    ok "a text column without a foreign key cannot be a lookup"
else
    notok "a text column mapped to a lookup is refused" "$out"
fi
out=$(q "SELECT d365_map_column('project', 'budget', 'new_stage')")
if grep -q 'attribute new_stage is a choice: map a text column (labels) or an integer column (values), not numeric' <<<"$out"; then
    ok "a numeric column cannot be a choice"
else
    notok "a numeric column mapped to a choice is refused" "$out"
fi
PSQL_DB=postgres psqlq -c "DROP ROLE IF EXISTS maps_other" -c "CREATE ROLE maps_other" >/dev/null 2>&1
out=$(q "CREATE TABLE not_mine (id int PRIMARY KEY); ALTER TABLE not_mine OWNER TO maps_other;
         GRANT USAGE ON SCHEMA d365 TO maps_owner; GRANT EXECUTE ON FUNCTION d365.d365_map_table(text, regclass, text, name) TO maps_owner;
         SET ROLE maps_owner; SELECT d365_map_table('other', 'not_mine', 'accounts')")
if grep -q 'must be the owner of public.not_mine to map it' <<<"$out"; then
    ok "only the table's owner maps it"
else
    notok "a role that does not own the table cannot map it" "$out"
fi

# -- 2. a child created before its parent waits: pending, not failed
q "INSERT INTO companies (name, revenue, industry) VALUES ('Contoso', 1000.5, 'Consulting'), ('Fabrikam', NULL, NULL);
   INSERT INTO people (first_name, last_name, email, company_id)
   VALUES ('Ann', 'Lee', 'ann@x.test', 1), ('Bob', 'Ray', 'bob@x.test', 2), ('Cy', 'Solo', NULL, NULL);
   INSERT INTO projects (title, stage, services, budget, company_id)
   VALUES ('Rollout', 'Active', '{Training,Consulting}', 5000, 1)" >/dev/null
out=$(q "SELECT * FROM d365_sync('person')")
state=$(q "SELECT string_agg(row_key || ':' || coalesce(last_error, '-'), ',' ORDER BY row_key) FROM d365.map_row WHERE map = 'person'")
linked=$(q "SELECT string_agg(id || ':' || (dynamics365_related_id IS NOT NULL), ',' ORDER BY id) FROM people")
if [ "$(cut -d'|' -f1-6 <<<"$out")" = "person|1|0|0|0|0" ] && [ "$linked" = "1:false,2:false,3:true" ] &&
   [ "$state" = "1:-,2:-,3:-" ]; then
    ok "people whose company is not linked yet wait (not sent, not failed); the one without a company goes"
else
    notok "children of unlinked parents wait" "$out" "$linked" "$state"
fi

# -- 3. d365_sync() goes parents first: companies, then people and projects
out=$(q "SELECT * FROM d365_sync()")
if [ "$(cut -d'|' -f1-6 <<<"$out" | tr '\n' ' ')" = "account|2|0|0|0|0 person|2|0|0|0|0 project|1|0|0|0|0 " ]; then
    ok "d365_sync() sends the companies first, then the people and projects waiting for them"
else
    notok "d365_sync() in dependency order" "$out"
fi
contoso=$(q "SELECT dynamics365_related_id FROM companies WHERE id = 1")
fabrikam=$(q "SELECT dynamics365_related_id FROM companies WHERE id = 2")
ann=$(q "SELECT dynamics365_related_id FROM people WHERE id = 1")
rollout=$(q "SELECT dynamics365_related_id FROM projects WHERE id = 1")
got="$(sim_field account "$contoso" revenue) $(sim_field account "$contoso" industrycode) $(sim_field contact "$ann" _parentcustomerid_value) $(sim_field contact "$ann" '_parentcustomerid_value@Microsoft.Dynamics.CRM.lookuplogicalname')"
if [ "$got" = "1000.5 7 $contoso account" ]; then
    ok "Dynamics holds the account (revenue 1000.5, industry Consulting = 7) and Ann's company (parentcustomerid) is it"
else
    notok "accounts and the Customer lookup in Dynamics" "got: $got" "want: 1000.5 7 $contoso account"
fi
got="$(sim_field new_project "$rollout" _new_accountid_value) $(sim_field new_project "$rollout" new_stage) $(sim_field new_project "$rollout" new_services) $(sim_field new_project "$rollout" new_budget)"
if [ "$got" = "$contoso 100000001 100000000,100000002 5000.0" ]; then
    ok "the project went out with its account (new_AccountId), stage Active and services Consulting, Training"
else
    notok "the custom table's lookup, choice and multi-select in Dynamics" "$got"
fi
binds=$(simctl requests --kind api | python3 -c '
import json, sys
n = 0
for r in json.load(sys.stdin)["requests"]:
    n += sum(1 for p in (r.get("parts") or [r]) if "new_AccountId@odata.bind" in (p.get("body") or ""))
print(n)' 2>/dev/null)
[ -n "$binds" ] && diag "requests binding new_AccountId: $binds"

# -- 4. the link columns were written as the table's owner
who=$(q "SELECT string_agg(DISTINCT who::text, ',') FROM who_wrote")
if [ "$who" = "maps_owner" ]; then
    ok "the people table's own trigger ran as its owner when the sync wrote the link columns"
else
    notok "link columns written as the table's owner" "$who"
fi

# -- 5. nothing changed: nothing sent; the pull's baseline changes nothing
out=$(q "SELECT sum(requests), sum(created + updated) FROM d365_sync()")
out2=$(q "SELECT sum(updated), sum(unchanged) FROM d365_pull()")
if [ "$out" = "0|0" ] && [ "$out2" = "0|6" ]; then
    ok "a second sync sends nothing; the first pull finds all 6 records unchanged"
else
    notok "no request without a change" "$out" "$out2"
fi

# -- 6. changes in Dynamics come back: a contact moved to another company,
# a project's stage and services, an account's industry and revenue
simctl edit contact "{\"op\":\"update\",\"id\":\"$ann\",\"values\":{\"parentcustomerid_account@odata.bind\":\"/accounts($fabrikam)\"}}" >/dev/null
simctl edit new_project "{\"op\":\"update\",\"id\":\"$rollout\",\"values\":{\"new_stage\":100000002,\"new_services\":\"100000003,100000001\"}}" >/dev/null
simctl edit account "{\"op\":\"update\",\"id\":\"$fabrikam\",\"values\":{\"industrycode\":33,\"revenue\":77.25}}" >/dev/null
out=$(q "SELECT string_agg(map || ':' || updated || '/' || failed, ' ') FROM d365_pull()")
local_state=$(q "SELECT (SELECT company_id FROM people WHERE id = 1),
                        (SELECT stage || ' ' || services::text FROM projects WHERE id = 1),
                        (SELECT industry || ' ' || revenue FROM companies WHERE id = 2)")
if [ "$out" = "account:1/0 person:1/0 project:1/0" ] && [ "$local_state" = "2|On Hold {Implementation,Support}|Wholesale 77.25" ]; then
    ok "Ann's new company comes back as people.company_id = 2; stage and services as labels; industry and revenue"
else
    notok "Dynamics changes applied locally" "$out" "$local_state"
fi
out=$(q "SELECT sum(requests) FROM d365_sync()")
if [ "$out" = "0" ]; then
    ok "what the pull applied is not sent back"
else
    notok "no echo after a pull" "$out"
fi

# -- 7. an unknown label fails that row, naming the allowed ones; the rest go
q "UPDATE projects SET stage = 'Bogus'; UPDATE companies SET name = 'Contoso Ltd' WHERE id = 1" >/dev/null
out=$(q "SELECT string_agg(map || ':' || updated || '/' || failed, ' ') FROM d365_sync()")
err=$(q "SELECT last_error FROM d365.map_row WHERE map = 'project'")
if [ "$out" = "account:1/0 person:0/0 project:0/1" ] &&
   [ "$err" = "'Bogus' is not an option of new_stage (column stage); allowed: Proposed, Active, On Hold, Completed" ] &&
   [ "$(sim_field new_project "$rollout" new_stage)" = "100000002" ]; then
    ok "the label 'Bogus' fails its project, naming the allowed labels; the account's change goes"
else
    notok "an unknown label fails its row" "$out" "$err"
fi
q "UPDATE projects SET stage = 'Completed'" >/dev/null
out=$(q "SELECT updated FROM d365_sync('project')")
if [ "$out" = "1" ] && [ "$(sim_field new_project "$rollout" new_stage)" = "100000003" ]; then
    ok "fixed, the project goes out at the next sync (Completed = 100000003)"
else
    notok "a fixed row goes out" "$out"
fi

# -- 8. a local change of the company goes out as a new parentcustomerid
q "UPDATE people SET company_id = 1 WHERE id = 2" >/dev/null
out=$(q "SELECT updated FROM d365_sync('person')")
bob=$(q "SELECT dynamics365_related_id FROM people WHERE id = 2")
if [ "$out" = "1" ] && [ "$(sim_field contact "$bob" _parentcustomerid_value)" = "$contoso" ]; then
    ok "Bob moved to Contoso locally: his contact's parentcustomerid is Contoso's account"
else
    notok "a local foreign key change goes out" "$out"
fi

# -- 9. a record deleted in Dynamics unlinks its row
simctl edit contact "{\"op\":\"delete\",\"id\":\"$bob\"}" >/dev/null
out=$(q "SELECT deleted FROM d365_pull('person')")
link=$(q "SELECT dynamics365_related_id IS NULL FROM people WHERE id = 2")
if [ "$out" = "1" ] && [ "$link" = "t" ]; then
    ok "a contact deleted in Dynamics unlinks its person (change tracking)"
else
    notok "remote delete unlinks" "$out" "$link"
fi

# -- 10. d365._map_capture runs only as d365sync's trigger of a mapped table
out=$(q "CREATE TABLE decoy (id int PRIMARY KEY);
         CREATE TRIGGER t AFTER INSERT ON decoy REFERENCING NEW TABLE AS d365_rows
             FOR EACH STATEMENT EXECUTE FUNCTION d365._map_capture();
         INSERT INTO decoy VALUES (1)")
if grep -q "d365._map_capture() runs only as d365sync's capture trigger of a mapped table" <<<"$out"; then
    ok "the capture function refuses to run from another table's trigger"
else
    notok "the capture function is d365sync's own" "$out"
fi

# -- 10b. the link columns belong to d365sync: a writer cannot point a row
# at another row's Dynamics record (its data would go there)
out=$(q "UPDATE people SET dynamics365_related_id = '$contoso' WHERE id = 3")
if grep -q 'ERROR' <<<"$out" && [ "$(q "SELECT count(*) FROM people WHERE dynamics365_related_id = '$contoso'")" = 0 ]; then
    ok "setting a mapped row's link column by hand is refused (the link guard)"
else
    notok "the link guard on a mapped table" "$out"
fi

# -- 10c. one run of a map at a time: a second skips while the first holds
# the map's row
psqlq -c "BEGIN" -c "SELECT FROM d365.table_map WHERE name = 'account' FOR NO KEY UPDATE" \
      -c "SELECT pg_sleep(4)" -c "COMMIT" >/dev/null 2>&1 &
holder=$!
sleep 1.5
out=$(q "SELECT requests FROM d365_sync('account')")
msg=$(q "SELECT message FROM d365.sync_run WHERE kind = 'map:account' ORDER BY id DESC LIMIT 1")
wait "$holder"
if [ "$out" = "0" ] && [ "$msg" = "skipped: another run of map account is in progress" ]; then
    ok "a sync of a map another run holds skips, and says so"
else
    notok "one run of a map at a time" "$out" "$msg"
fi

# -- 10d. match columns: an unlinked row is linked to the one record with
# its values instead of creating another; several such records fail it
v1=$(simctl -v edit account '{"op":"create","values":{"name":"Old Vendor Name","accountnumber":"V-1"}}' |
     python3 -c 'import json,sys; print(json.load(sys.stdin)["accountid"])')
simctl edit account '{"op":"create","values":{"name":"Twin A","accountnumber":"V-2"}}' >/dev/null
simctl edit account '{"op":"create","values":{"name":"Twin B","accountnumber":"V-2"}}' >/dev/null
n_before=$(simctl rows account | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["value"]))')
out=$(q "CREATE TABLE vendors (code text PRIMARY KEY, name text NOT NULL, number text);
         SELECT d365_map_table('vendor', 'vendors', 'accounts');
         SELECT d365_map_column('vendor', 'name', 'name');
         SELECT d365_map_column('vendor', 'number', 'accountnumber', match => true);
         INSERT INTO vendors VALUES ('a', 'Vendor One', 'v-1'), ('b', 'Vendor Two', 'V-2'), ('c', 'Vendor Three', 'V-3');
         SELECT created || '/' || updated || '/' || failed FROM d365_sync('vendor')" | tail -n 1)
linked=$(q "SELECT string_agg(code || ':' || coalesce(dynamics365_related_id::text, '-'), ' ' ORDER BY code) FROM vendors")
err=$(q "SELECT last_error FROM d365.map_row WHERE map = 'vendor' AND row_key = 'b'")
n_after=$(simctl rows account | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["value"]))')
if [ "$out" = "1/1/1" ] && grep -q "^a:$v1 b:- c:" <<<"$linked" && [ "$(sim_field account "$v1" name)" = "Vendor One" ] &&
   grep -q '^matches 2 Dynamics 365 records (' <<<"$err" && [ "$n_after" = $((n_before + 1)) ]; then
    ok "match columns: v-1 linked to the existing account V-1 (its name updated), V-2 matching two accounts fails, V-3 created"
else
    notok "match columns link instead of creating" "$out" "$linked" "$err" "$n_before -> $n_after"
fi

# -- 11. unmapping removes the triggers, keeps the links
out=$(q "SELECT d365_unmap_table('project');
         SELECT count(*) FROM pg_trigger WHERE tgrelid = 'projects'::regclass AND tgname LIKE 'd365%';
         SELECT count(*) FROM projects WHERE dynamics365_related_id IS NOT NULL;
         SELECT count(*) FROM d365.map_row WHERE map = 'project'")
if [ "$(tr '\n' ' ' <<<"$out")" = " 0 1 0 " ]; then
    ok "d365_unmap_table removes the capture triggers and the state; the link columns stay"
else
    notok "unmap" "$out"
fi
