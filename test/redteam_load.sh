#!/usr/bin/env bash
# test/redteam_load.sh: the owner of a mapped table is hostile, and the
# initial load (CALL d365_load(map)) reads its table to match Dynamics
# records to unlinked rows and inserts the rest as new rows.  Nothing the
# owner wrote may run then as the role running the load (the superuser, an
# operator) or as d365sync's job role: not a cast of a type of its own
# used by a match column, not a default, a domain's CHECK, a generated
# column or the key's default of the rows inserted (those run as the owner,
# in a security-restricted operation).
#
# The attacks plant public.rtl_evil(tag), owned by the table's owner, that
# notes current_user and whether it could create a temporary table (it
# cannot in a security-restricted operation) in public.rtl_log, and tries
# ALTER ROLE ... SUPERUSER.
#
# scripts/test.sh runs it with the cluster and simulator it started; run
# alone it starts its own (D365_SKIP_BUILD=1 uses the installed extension).
# Prints "ok N - ..." / "not ok N - ..." and always exits 0.
set -uo pipefail

DB=d365rtload
. "$(dirname "$0")/lib.sh"
t_begin rtload
t_on_exit() { simctl reset >/dev/null 2>&1; }
t_standalone || exit 0

simctl reset >/dev/null
t_create_db "$DB"
for r in rtl_owner rtl_op; do
    PSQL_DB=postgres psqlq -c "DROP ROLE IF EXISTS $r" -c "CREATE ROLE $r" >/dev/null 2>&1
done
if ! psqlq >"$TMPD/setup.log" 2>&1 <<SQL
$(t_configure_sql)
SET search_path = public, d365;
SELECT d365_grant('rtl_op', 'operator');
GRANT CREATE ON SCHEMA public TO rtl_owner;
CREATE TABLE rtl_log (who name, tag text, restricted boolean);
ALTER TABLE rtl_log OWNER TO rtl_owner;
GRANT INSERT ON rtl_log TO PUBLIC;
SET ROLE rtl_owner;
CREATE FUNCTION rtl_evil(tag text) RETURNS boolean LANGUAGE plpgsql VOLATILE AS
\$\$ DECLARE r boolean := false; BEGIN
    BEGIN
        CREATE TEMP TABLE rtl_probe (x int);
        DROP TABLE rtl_probe;
    EXCEPTION WHEN OTHERS THEN r := true;
    END;
    INSERT INTO public.rtl_log VALUES (current_user, tag, r);
    BEGIN
        EXECUTE 'ALTER ROLE rtl_owner SUPERUSER';
    EXCEPTION WHEN OTHERS THEN NULL;
    END;
    RETURN true;
END \$\$;
RESET ROLE;
SQL
then
    notok "set-up failed" "$(tail -n 8 "$TMPD/setup.log")"
    exit 0
fi
q() { psqlq -v VERBOSITY=verbose -c "SET search_path = public, d365" -c "$1" 2>&1; }
as() { psqlq -v VERBOSITY=verbose -c "SET search_path = public, d365" -c "SET ROLE $1" -c "$2" 2>&1; }
reset_evil() { q "ALTER ROLE rtl_owner NOSUPERUSER; TRUNCATE rtl_log" >/dev/null; }
# ran_as WHAT OUT EXPECT [NEED]: ok when the owner is no superuser, rtl_evil()
# ran as no other role than the owner and always restricted, OUT holds EXPECT
# (a regex) and, when NEED is given, rtl_evil() ran with that tag
ran_as() {
    local what=$1 out=$2 expect=$3 need=${4:-} su ev tags
    su=$(q "SELECT rolsuper FROM pg_roles WHERE rolname = 'rtl_owner'")
    ev=$(q "SELECT coalesce(string_agg(DISTINCT who::text || ':' || tag || ':' || restricted, ','), '') FROM rtl_log
             WHERE who <> 'rtl_owner' OR NOT restricted")
    tags=$(q "SELECT coalesce(string_agg(DISTINCT tag, ','), '') FROM rtl_log")
    if [ "$su" = f ] && [ -z "$ev" ] && grep -Eq "$expect" <<<"$out" &&
       { [ -z "$need" ] || tr ',' '\n' <<<"$tags" | grep -qx "$need"; }; then
        ok "$what"
    else
        notok "$what" "owner superuser: $su; rtl_evil ran as (role:tag:restricted): ${ev:-nobody else}; tags: ${tags:-none}" "$out"
    fi
    reset_evil
}

# -- 1, 2. the owner's code in the rows a load inserts: the key's default,
# a domain's CHECK on a mapped column, a column default, a generated column
simctl edit contact '{"op":"create","id":"c0ffee00-0000-4000-8000-00000000e001","values":{"lastname":"Loaded One"}}' >/dev/null
simctl edit contact '{"op":"create","id":"c0ffee00-0000-4000-8000-00000000e002","values":{"lastname":"Loaded Two"}}' >/dev/null
if q "SET ROLE rtl_owner;
      CREATE SEQUENCE rtl_seq;
      CREATE FUNCTION rtl_next() RETURNS integer LANGUAGE plpgsql AS
        \$\$ BEGIN PERFORM public.rtl_evil('key'); RETURN nextval('public.rtl_seq')::integer; END \$\$;
      CREATE FUNCTION rtl_def() RETURNS text LANGUAGE plpgsql AS
        \$\$ BEGIN PERFORM public.rtl_evil('default'); RETURN 'd'; END \$\$;
      CREATE FUNCTION rtl_gen(text) RETURNS text LANGUAGE plpgsql IMMUTABLE AS
        \$\$ BEGIN PERFORM public.rtl_evil('generated'); RETURN upper(\$1); END \$\$;
      CREATE DOMAIN rtl_name AS text CHECK (public.rtl_evil('domain'));
      CREATE TABLE t_s (id integer PRIMARY KEY DEFAULT public.rtl_next(), name public.rtl_name,
                        note text DEFAULT public.rtl_def(),
                        shout text GENERATED ALWAYS AS (public.rtl_gen(name)) STORED);
      GRANT SELECT, INSERT, UPDATE, DELETE ON t_s TO rtl_op;
      RESET ROLE;
      SELECT d365_map_table('s', 't_s', 'contacts');
      SELECT d365_map_column('s', 'name', 'lastname', 'in');
      UPDATE d365.table_map SET load = true WHERE name = 's';" >"$TMPD/s.log" 2>&1; then
    reset_evil
    out=$(q "CALL d365_load('s')")
    n=$(q "SELECT count(*) FROM t_s WHERE name LIKE 'Loaded%' AND shout = upper(name) AND note = 'd' AND dynamics365_related_id IS NOT NULL")
    tags=$(q "SELECT string_agg(DISTINCT tag, ',' ORDER BY tag) FROM rtl_log")
    if [ "$n" -ge 2 ] && [ "$tags" = "default,domain,generated,key" ]; then
        ran_as "a load (superuser) ran the key's default, the domain's CHECK, the column default and the generated column as the owner, restricted" "$out" "^"
    else
        notok "a load (superuser) inserted the records with the owner's code (rows $n, ran: $tags)" "$out"
        reset_evil
    fi
    simctl edit contact '{"op":"create","id":"c0ffee00-0000-4000-8000-00000000e003","values":{"lastname":"Loaded Three"}}' >/dev/null
    q "DELETE FROM d365.load_state" >/dev/null
    out=$(as rtl_op "CALL d365_load('s')")
    n=$(q "SELECT count(*) FROM t_s WHERE name = 'Loaded Three' AND shout = 'LOADED THREE'")
    if [ "$n" = 1 ]; then
        ran_as "a load (operator) the same" "$out" "^" key
    else
        notok "a load (operator) inserted the new record ($n)" "$out"
        reset_evil
    fi
else
    notok "set-up of the map" "$(tail -n 6 "$TMPD/s.log")"
fi

# -- 3. the owner's trigger writes another record's id into the link column
# of a row the load inserts (a record created in Dynamics after the load):
# the row is not linked to it, and a sync sends nothing to that record
VICTIM=c0ffee00-0000-4000-8000-00000000e0ff
simctl edit contact '{"op":"create","id":"c0ffee00-0000-4000-8000-00000000e004","values":{"lastname":"Forged"}}' >/dev/null
if q "SET ROLE rtl_owner;
      CREATE TABLE t_f (id serial PRIMARY KEY, name text);
      CREATE FUNCTION rtl_forge() RETURNS trigger LANGUAGE plpgsql AS
        \$\$ BEGIN IF NEW.name = 'Forged' THEN NEW.dynamics365_related_id := '$VICTIM'; END IF; RETURN NEW; END \$\$;
      RESET ROLE;
      SELECT d365_map_table('f', 't_f', 'contacts');
      SELECT d365_map_column('f', 'name', 'lastname');
      UPDATE d365.table_map SET load = true WHERE name = 'f';
      SET ROLE rtl_owner;
      CREATE TRIGGER rtl_forge BEFORE INSERT ON t_f FOR EACH ROW EXECUTE FUNCTION public.rtl_forge();" >"$TMPD/f.log" 2>&1; then
    out=$(q "CALL d365_load('f')")
    # the victim: a record that exists once the load is done
    simctl edit contact "{\"op\":\"create\",\"id\":\"$VICTIM\",\"values\":{\"lastname\":\"Victim\"}}" >/dev/null
    state=$(q "SELECT count(*) FROM d365.map_row WHERE map = 'f' AND dynamics_id = '$VICTIM'")
    planted=$(q "SELECT count(*) FROM t_f WHERE name = 'Forged' AND dynamics365_related_id = '$VICTIM'")
    q "UPDATE t_f SET name = 'Forged' WHERE name = 'Forged'" >/dev/null
    seq0=$(simctl last-seq)
    out2=$(q "SELECT * FROM d365_sync('f')")
    sent=$(simctl requests --since "$seq0" --kind api | grep -c "$VICTIM" || true)
    vname=$(simctl rows contact | python3 -c 'import json,sys; print([r.get("lastname") for r in json.load(sys.stdin)["value"] if r.get("contactid") == sys.argv[1]][0])' "$VICTIM")
    if [ "$planted" = 1 ] && [ "$state" = 0 ] && [ "$sent" = 0 ] && [ "$vname" = Victim ] &&
       grep -q "^f|0|0|0|1|" <<<"$out2"; then
        ok "a link the owner's trigger forged during the load is not d365sync's: no state names the victim, a sync fails the row and sends the victim nothing"
    else
        notok "a link forged during the load" "forged rows: $planted; state rows naming the victim: $state; requests naming it: $sent; its last name: $vname" "$out" "$out2"
    fi
else
    notok "set-up of the forged map" "$(tail -n 6 "$TMPD/f.log")"
fi

# -- 4, 5. a match column of the owner's enum, with a cast to json calling
# rtl_evil(): the load's match of each record against the unlinked rows
# compares the column's label, and runs no cast of the owner's.  The enum
# is mapped to lastname, which Dynamics describes with an attribute type
# d365sync does not know (its metadata is data: the simulator's answer,
# one attribute type changed, through a fault rule)
attrs=$(q "SELECT d365._get_cached('EntityDefinitions(LogicalName=''contact'')/Attributes?\$select=LogicalName,AttributeType,AttributeTypeName,IsValidForCreate,IsValidForUpdate,Targets')" | tail -n 1)
body=$(python3 -c '
import json, sys
a = json.loads(sys.argv[1])
for x in a:
    if x.get("LogicalName") == "lastname":
        x["AttributeType"] = "Unknown"
print(json.dumps({"value": a}))' "$attrs")
simctl fault "$(python3 -c 'import json,sys; print(json.dumps({"path_regex": "contact.\\)/Attributes\\?\\$select=LogicalName,AttributeType,AttributeTypeName,IsValidForCreate", "status": 200, "body": sys.argv[1], "content_type": "application/json", "times": None}))' "$body")" >/dev/null
q "DELETE FROM d365.metadata_cache" >/dev/null
simctl edit contact '{"op":"create","id":"c0ffee00-0000-4000-8000-00000000e101","values":{"lastname":"Happy"}}' >/dev/null
if q "SET ROLE rtl_owner;
      CREATE TYPE rtl_mood AS ENUM ('Happy', 'Other');
      CREATE FUNCTION rtl_mood_json(rtl_mood) RETURNS json LANGUAGE plpgsql IMMUTABLE AS
        \$\$ BEGIN PERFORM public.rtl_evil('cast'); RETURN to_json(\$1::text); END \$\$;
      CREATE CAST (rtl_mood AS json) WITH FUNCTION rtl_mood_json(rtl_mood);
      CREATE TABLE t_e (id serial PRIMARY KEY, name rtl_mood);
      GRANT SELECT, INSERT, UPDATE, DELETE ON t_e TO rtl_op;
      GRANT USAGE ON SEQUENCE t_e_id_seq TO rtl_op;
      INSERT INTO t_e (name) VALUES ('Other'), ('Happy');
      RESET ROLE;
      SELECT d365_map_table('e', 't_e', 'contacts');
      SELECT d365_map_column('e', 'name', 'lastname', 'in', true);
      UPDATE d365.table_map SET load = true WHERE name = 'e';" >"$TMPD/e.log" 2>&1; then
    reset_evil
    out=$(q "CALL d365_load('e')")
    ran_as "a match column's cast of the owner's enum to json is not run by a load (superuser)" "$out" "^"
    linked=$(q "SELECT count(*) FROM t_e WHERE name = 'Happy' AND dynamics365_related_id = 'c0ffee00-0000-4000-8000-00000000e101'")
    if [ "$linked" = 1 ]; then
        ok "the load matched the record to the unlinked row by the enum's label"
    else
        notok "the load matched the record to the unlinked row by the enum's label" "linked: $linked" "$out"
    fi
else
    notok "set-up of the enum map" "$(tail -n 6 "$TMPD/e.log")"
fi
simctl clear-faults >/dev/null
