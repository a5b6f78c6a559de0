#!/usr/bin/env bash
# test/redteam_review.sh: attacks on the link columns of mapped tables.
# The table's owner is hostile: it writes a Dynamics id d365sync never
# linked into a row's link column -- past the link guard, which it can
# switch off (ALTER TABLE ... DISABLE TRIGGER) or go round (a BEFORE UPDATE
# trigger of its own changing the link of an UPDATE that does not name the
# link columns: the guard fires for UPDATE OF the link columns only).
# Such a link must never make d365sync write to that record (sync), copy
# that record into the row (pull) or bind a child's lookup to it.
#
# scripts/test.sh runs it with the cluster and simulator it started; run
# alone it starts its own (D365_SKIP_BUILD=1 uses the installed extension).
# Prints "ok N - ..." / "not ok N - ..." and always exits 0.
set -uo pipefail

DB=d365rtreview
. "$(dirname "$0")/lib.sh"
t_begin rtreview
t_on_exit() { simctl reset >/dev/null 2>&1; }
t_standalone || exit 0

VICTIM=dddddddd-0000-4000-8000-00000000a001
simctl reset >/dev/null
t_create_db "$DB"
PSQL_DB=postgres psqlq -c "DROP ROLE IF EXISTS rtr_owner" -c "CREATE ROLE rtr_owner" >/dev/null 2>&1
simctl edit account "{\"op\":\"create\",\"id\":\"$VICTIM\",\"values\":{\"name\":\"Victim Corp\"}}" >/dev/null
if ! psqlq >"$TMPD/setup.log" 2>&1 <<SQL
$(t_configure_sql)
SET search_path = public, d365;
CREATE TABLE rtr_company (id integer PRIMARY KEY, name text NOT NULL, forge boolean NOT NULL DEFAULT false);
CREATE TABLE rtr_person (id integer PRIMARY KEY, last_name text NOT NULL,
                         company_id integer REFERENCES rtr_company);
ALTER TABLE rtr_company OWNER TO rtr_owner;
ALTER TABLE rtr_person OWNER TO rtr_owner;
GRANT CREATE ON SCHEMA public TO rtr_owner;
SELECT d365_map_table('rtr_co', 'rtr_company', 'accounts');
SELECT d365_map_column('rtr_co', 'name', 'name');
SELECT d365_map_table('rtr_pe', 'rtr_person', 'contacts');
SELECT d365_map_column('rtr_pe', 'last_name', 'lastname');
SELECT d365_map_column('rtr_pe', 'company_id', 'parentcustomerid');
INSERT INTO rtr_company (id, name) VALUES (1, 'Acme'), (2, 'Mallory Ltd');
SELECT * FROM d365_sync('rtr_co');
-- the owner's own trigger: an UPDATE that sets "forge" also rewrites the link
SET ROLE rtr_owner;
CREATE FUNCTION public.rtr_forge() RETURNS trigger LANGUAGE plpgsql AS
\$\$ BEGIN
    IF NEW.forge THEN NEW.dynamics365_related_id := '$VICTIM'; NEW.forge := false; END IF;
    RETURN NEW;
END \$\$;
CREATE TRIGGER rtr_forge BEFORE UPDATE ON public.rtr_company FOR EACH ROW EXECUTE FUNCTION public.rtr_forge();
RESET ROLE;
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
        print("" if v is None else v)' "$1" "$2" "$3"
}

# -- 1. the owner's BEFORE trigger writes the victim's id past the guard
out=$(q "SET ROLE rtr_owner; UPDATE rtr_company SET name = 'Mallory Ltd (new)', forge = true WHERE id = 2")
link=$(q "SELECT dynamics365_related_id FROM rtr_company WHERE id = 2")
if [ "$link" = "$VICTIM" ]; then
    diag "the owner's trigger forged the link of row 2 (the guard fires for UPDATE OF the link columns only)"
else
    diag "the forge did not take: $out"
fi
simctl clear-requests >/dev/null
out=$(q "SELECT created, updated, failed FROM d365_sync('rtr_co')")
name=$(sim_field account "$VICTIM" name)
sent=$(simctl requests --kind api | grep -c "$VICTIM")
err=$(q "SELECT last_error FROM d365.map_row WHERE map = 'rtr_co' AND row_key = '2'")
if [ "$name" = "Victim Corp" ] && [ "$sent" = 0 ] && grep -q 'did not link' <<<"$err" &&
   [ "$(cut -d'|' -f3 <<<"$out")" = 1 ]; then
    ok "a forged link of a mapped row is not used: nothing sent to that record, the row fails with the reason"
else
    notok "a forged link of a mapped row sends the row to another record" "sync: $out" \
        "victim's name: $name" "requests naming it: $sent" "state: $err"
fi

# -- 2. the pull does not copy the victim's record into the forged row
simctl edit account "{\"op\":\"update\",\"id\":\"$VICTIM\",\"values\":{\"name\":\"Victim Corp 2\"}}" >/dev/null
out=$(q "SELECT updated, failed FROM d365_pull('rtr_co')")
row=$(q "SELECT name FROM rtr_company WHERE id = 2")
if [ "$row" = "Mallory Ltd (new)" ]; then
    ok "an incoming change of the record is not written into the row that forged its link"
else
    notok "the pull wrote another record into the forged row" "pull: $out" "row 2: $row"
fi

# -- 3. a child's lookup is never bound to the forged parent's record
q "INSERT INTO rtr_person VALUES (1, 'Child', 2)" >/dev/null
simctl clear-requests >/dev/null
out=$(q "SELECT created, updated, failed FROM d365_sync('rtr_pe')")
bound=$(simctl requests --kind api | grep -c "accounts($VICTIM)")
if [ "$bound" = 0 ]; then
    ok "a child of the forged row is not bound to the forged record"
else
    notok "a child's lookup was bound to the forged record" "$out"
fi

# -- 4. the same with the guard switched off by the owner
out=$(q "SET ROLE rtr_owner; DROP TRIGGER rtr_forge ON rtr_company;
         ALTER TABLE rtr_company DISABLE TRIGGER d365_link_guard, DISABLE TRIGGER d365_link_guard_update;
         UPDATE rtr_company SET dynamics365_related_id = NULL WHERE id = 2;
         INSERT INTO rtr_company (id, name, dynamics365_related_id) VALUES (3, 'Eve', '$VICTIM');
         UPDATE rtr_company SET dynamics365_related_id = '$VICTIM' WHERE id = 3;
         ALTER TABLE rtr_company ENABLE TRIGGER d365_link_guard, ENABLE TRIGGER d365_link_guard_update")
simctl clear-requests >/dev/null
out=$(q "SELECT created, updated, failed FROM d365_sync('rtr_co')")
name=$(sim_field account "$VICTIM" name)
sent=$(simctl requests --kind api | grep -c "$VICTIM")
if [ "$name" = "Victim Corp 2" ] && [ "$sent" = 0 ]; then
    ok "a row inserted with a forged link while the guard was off sends nothing to that record"
else
    notok "a forged link inserted with the guard off reached the record" "sync: $out" \
        "victim's name: $name" "requests naming it: $sent"
fi

# -- 5. the real links keep working both ways
q "UPDATE rtr_company SET name = 'Acme Inc' WHERE id = 1" >/dev/null
q "SELECT * FROM d365_sync('rtr_co')" >/dev/null
acme=$(q "SELECT dynamics365_related_id FROM rtr_company WHERE id = 1")
if [ -n "$acme" ] && [ "$(sim_field account "$acme" name)" = "Acme Inc" ]; then
    simctl edit account "{\"op\":\"update\",\"id\":\"$acme\",\"values\":{\"name\":\"Acme Worldwide\"}}" >/dev/null
    q "SELECT * FROM d365_pull('rtr_co')" >/dev/null
    if [ "$(q "SELECT name FROM rtr_company WHERE id = 1")" = "Acme Worldwide" ]; then
        ok "a link d365sync wrote still syncs both ways"
    else
        notok "a real link no longer receives incoming changes" "$(q "SELECT * FROM rtr_company")"
    fi
else
    notok "a real link no longer sends" "$acme" "$(q "SELECT * FROM d365.map_row WHERE map = 'rtr_co'")"
fi

# -- 6. links that were there before the table was mapped are the mapper's
q "CREATE TABLE rtr_pre (id integer PRIMARY KEY, name text, dynamics365_related_id uuid)" >/dev/null
acme=$(q "SELECT dynamics365_related_id FROM rtr_company WHERE id = 1")
q "SELECT d365_unmap_table('rtr_pe'); SELECT d365_unmap_table('rtr_co');
   INSERT INTO rtr_pre VALUES (1, 'Acme Pre', '$acme');
   SELECT d365_map_table('rtr_pre', 'rtr_pre', 'accounts'); SELECT d365_map_column('rtr_pre', 'name', 'name')" >/dev/null
out=$(q "SELECT created, updated, failed FROM d365_sync('rtr_pre')")
if [ "$(sim_field account "$acme" name)" = "Acme Pre" ]; then
    ok "a row linked before its table was mapped is trusted: it updates its record"
else
    notok "a row linked before mapping" "$out" "$(q "SELECT * FROM d365.map_row WHERE map = 'rtr_pre'")"
fi

# -- 7. row security of the table's owner: its policy is the owner's code and
# must not run with the rights of a role that runs the sync (a non-superuser
# operator or worker role; superusers are never bound by row security)
PSQL_DB=postgres psqlq -c "DROP ROLE IF EXISTS rtr_op" -c "CREATE ROLE rtr_op" >/dev/null 2>&1
out=$(q "GRANT USAGE ON SCHEMA d365 TO rtr_op;
   GRANT ALL ON ALL TABLES IN SCHEMA d365 TO rtr_op; GRANT ALL ON ALL SEQUENCES IN SCHEMA d365 TO rtr_op;
   GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA d365 TO rtr_op;
   CREATE TABLE rtr_rls (id integer PRIMARY KEY, name text); ALTER TABLE rtr_rls OWNER TO rtr_owner;
   SELECT d365_map_table('rtr_rls', 'rtr_rls', 'accounts'); SELECT d365_map_column('rtr_rls', 'name', 'name');
   GRANT SELECT, INSERT, UPDATE ON rtr_rls TO rtr_op;
   SET ROLE rtr_owner;
   CREATE FUNCTION public.rtr_spy() RETURNS boolean LANGUAGE plpgsql AS
     \$\$ BEGIN RAISE WARNING 'rtr_spy runs as %', current_user; RETURN true; END \$\$;
   CREATE POLICY rtr_all ON rtr_rls USING (public.rtr_spy());
   ALTER TABLE rtr_rls ENABLE ROW LEVEL SECURITY;
   RESET ROLE;
   INSERT INTO rtr_rls VALUES (1, 'Policy Co');
   SELECT * FROM d365_sync('rtr_rls');
   UPDATE rtr_rls SET name = 'Policy Co 2';")
pol=$(q "SELECT dynamics365_related_id FROM rtr_rls WHERE id = 1")
simctl clear-requests >/dev/null
out=$(q "SET ROLE rtr_op; SELECT created, updated, failed FROM d365_sync('rtr_rls')")
sent=$(simctl requests --kind api | grep -c 'Policy Co 2')
if ! grep -q 'rtr_spy runs as rtr_op' <<<"$out" && grep -q 'row-level security of public.rtr_rls applies to role "rtr_op"' <<<"$out" &&
   [ "$sent" = 0 ]; then
    ok "a sync run by a role bound by the table's row security is refused before the owner's policy runs, nothing sent"
else
    notok "the table owner's row-security policy ran as the role running the sync" "$out" "requests with the row: $sent"
fi
simctl edit account "{\"op\":\"update\",\"id\":\"$pol\",\"values\":{\"name\":\"Policy Remote\"}}" >/dev/null
out=$(q "SET ROLE rtr_op; SELECT updated, failed FROM d365_pull('rtr_rls')")
if ! grep -q 'rtr_spy runs as rtr_op' <<<"$out" && grep -q 'row-level security' <<<"$out"; then
    ok "a pull run by a role bound by the table's row security is refused before the owner's policy runs"
else
    notok "the table owner's row-security policy ran as the role running the pull" "$out"
fi
# ... and the same for the contact table, synced and pulled by its engine
out=$(q "CREATE TABLE rtr_contact (id integer PRIMARY KEY, last_name text, score integer NOT NULL DEFAULT 50);
   ALTER TABLE rtr_contact OWNER TO rtr_owner;
   SELECT d365_attach_contacts('rtr_contact');
   INSERT INTO d365.field_map VALUES ('last_name', 'lastname');
   GRANT SELECT, UPDATE ON rtr_contact TO rtr_op;
   SET ROLE rtr_owner;
   CREATE POLICY rtr_c ON rtr_contact USING (public.rtr_spy());
   ALTER TABLE rtr_contact ENABLE ROW LEVEL SECURITY;
   RESET ROLE;
   INSERT INTO rtr_contact VALUES (1, 'Contactson');
   UPDATE d365.settings SET contact_sync_enabled = true, min_score = 10;
   SELECT * FROM d365_sync_contacts();
   SELECT * FROM d365_pull_changes();
   UPDATE rtr_contact SET last_name = 'Contactson 2';")
cid=$(q "SELECT dynamics365_related_id FROM rtr_contact WHERE id = 1")
simctl edit contact "{\"op\":\"update\",\"id\":\"$cid\",\"values\":{\"firstname\":\"Remote\"}}" >/dev/null
simctl clear-requests >/dev/null
out=$(q "SET ROLE rtr_op; SELECT created, failed FROM d365_sync_contacts()")
out2=$(q "SET ROLE rtr_op; SELECT updated, failed FROM d365_pull_changes()")
sent=$(simctl requests --kind api | grep -c 'Contactson 2')
if ! grep -q 'rtr_spy runs as rtr_op' <<<"$out$out2" && [ "$sent" = 0 ] &&
   grep -q 'row-level security of public.rtr_contact applies to role "rtr_op"' <<<"$out" &&
   grep -q 'row-level security of public.rtr_contact applies to role "rtr_op"' <<<"$out2"; then
    ok "the contact sync and pull run by a role bound by the contact table's row security are refused before its policy runs"
else
    notok "the contact table owner's policy ran as the role running the contact jobs" "$out" "$out2" "requests with the row: $sent" "link: $cid"
fi

# -- 10. a next link that leads back to a page already read ends the read with
# an error instead of looping for ever (a foreign-table scan, a map's pull)
simctl reset >/dev/null
simctl fault '{"method":"GET","path_regex":"/accounts","status":200,"times":null,"json":{"value":[{"accountid":"a0000000-0000-4000-8000-0000000000aa","name":"Loop"}],"@odata.nextLink":"accounts?$select=accountid,name&$skiptoken=same"}}' >/dev/null
out=$(psqlq -c "SET statement_timeout = '20s'" -c "CREATE SERVER rtr_dv FOREIGN DATA WRAPPER d365_fdw" \
    -c "CREATE SCHEMA rtr_dv" -c "CREATE FOREIGN TABLE rtr_dv.accounts (accountid uuid, name text) SERVER rtr_dv OPTIONS (entity_set 'accounts')" \
    -c "SELECT count(*) FROM rtr_dv.accounts" 2>&1)
gets=$(simctl requests --kind api | grep -c '/accounts')
out2=$(q "SET statement_timeout = '20s'; SELECT updated, failed FROM d365_pull('rtr_pre')")
simctl clear-faults >/dev/null
if grep -q 'Dynamics 365 sent a next link that was followed already' <<<"$out" &&
   grep -q 'Dynamics 365 sent a next link that was followed already' <<<"$out2" && [ "$gets" -le 4 ]; then
    ok "a next link back to a page already read stops the scan and the pull with an error ($gets requests)"
else
    notok "a looping next link keeps the read going" "scan: $out" "requests: $gets" "pull: $out2"
fi

# -- 11. a next link to another host is refused without the token, and the
# error says where the address came from (not only the pull's delta link)
simctl fault '{"method":"GET","path_regex":"/accounts","status":200,"times":null,"json":{"value":[{"accountid":"a0000000-0000-4000-8000-0000000000ab","name":"Away"}],"@odata.nextLink":"http://127.0.0.2:9/api/data/v9.2/accounts?$skiptoken=away"}}' >/dev/null
out=$(psqlq -c "SELECT count(*) FROM rtr_dv.accounts" 2>&1)
simctl clear-faults >/dev/null
if grep -q "refusing to send the access token outside the organization's Web API" <<<"$out" &&
   grep -q 'HINT:.*next link' <<<"$out"; then
    ok "a next link to another host is refused, and the hint names the next link"
else
    notok "a next link to another host: refusal or hint" "$out"
fi

# -- 12. the guard holds for every way of writing rows: ON CONFLICT DO UPDATE,
# MERGE (its UPDATE and its INSERT), COPY, and the second link column
out=$(psqlq -v ON_ERROR_STOP=0 2>&1 <<'SQL'
INSERT INTO rtr_contact (id, last_name) VALUES (1, 'x')
    ON CONFLICT (id) DO UPDATE SET dynamics365_related_id = 'eeeeeeee-0000-4000-8000-000000000001';
MERGE INTO rtr_contact c USING (VALUES (1)) v(id) ON c.id = v.id
    WHEN MATCHED THEN UPDATE SET dynamics365_related_id = 'eeeeeeee-0000-4000-8000-000000000002';
MERGE INTO rtr_contact c USING (VALUES (77)) v(id) ON c.id = v.id
    WHEN NOT MATCHED THEN INSERT (id, last_name, dynamics365_related_id)
    VALUES (77, 'm', 'eeeeeeee-0000-4000-8000-000000000003');
COPY rtr_contact (id, last_name, dynamics365_related_id) FROM stdin;
78	c	eeeeeeee-0000-4000-8000-000000000004
\.
UPDATE rtr_contact SET dynamics365_synchronized_on = now() + interval '1 day' WHERE id = 1;
SELECT 'forged:' || count(*) FROM rtr_contact WHERE dynamics365_related_id::text LIKE 'eeeeeeee%' OR id IN (77, 78);
SQL
)
if [ "$(grep -c 'is written by d365sync only' <<<"$out")" = 5 ] && grep -q 'forged:0' <<<"$out"; then
    ok "the link guard refuses ON CONFLICT DO UPDATE, MERGE's UPDATE and INSERT, COPY and the synchronized_on column"
else
    notok "a way of writing rows passes the link guard" "$out"
fi
