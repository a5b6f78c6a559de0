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
