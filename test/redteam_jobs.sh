#!/usr/bin/env bash
# test/redteam_jobs.sh: attacks on the job role (d365sync_job), on the row
# capture of mapped tables and on the delete policies of the contact map.
# Every role but the superuser is hostile: the owner of a mapped table or of
# the contact table, an operator, an admin, a writer of a mapped table, the
# owner of the database.
#
# The attacks plant public.evil() (owned by the table owner rtj_owner),
# which notes current_user and session_user in public.evil_log and tries
# ALTER ROLE rtj_owner SUPERUSER.  After each attack: rtj_owner is no
# superuser, evil() never ran as anyone but rtj_owner, and what a user sees
# (the error, the simulator's record, the session's current_user) is what
# the attack's line says.
#
#   1-2  a writer changes only the case of a mapped value in a column with a
#        case-insensitive collation (the capture's WHEN clause once compared
#        with the type's own equality, which calls the two equal): the
#        change reaches Dynamics, for a table map and for the contact table
#   3    the owner's DEFERRABLE INITIALLY DEFERRED constraint trigger, queued
#        by the pull's write of its table, never fires as the caller (the
#        superuser) at the commit of CALL d365_run_job('map-pull')
#   4-5  a failing CALL d365_run_job() (it commits inside) leaves the
#        operator's session as the operator, outside and inside a
#        transaction block
#   6    the owner names d365's capture functions in a trigger of its own
#        (forged arguments, another table): refused
#   7    hostile roles give the job role settings or memberships
#   8    the database's owner sets search_path (and a public operator) for
#        every session: no job runs the owner's operator
#   9    an admin reads a Dynamics record through d365._get_all() by a path
#        that starts as metadata and leaves it
#   10   an operator sets the contact map's delete policies or queues a
#        delete by writing d365's tables: refused
#   11-12 an operator who may not read a lookup's parent table runs the
#        child's map (the lookups read the parent's key and link columns as
#        the job role): d365_sync, d365_pull and CALL d365_load refuse it
#        (42501, the hint names the two columns); with SELECT on those two
#        columns only, the row is sent bound to the parent's record
#   13   an admin who does not own a mapped table adds a column it may not
#        read (out) or write (in) to its map by writing d365.column_map:
#        refused (the capture triggers must follow, which only the owner
#        may re-create)
#   14   an admin points its own map at a table it does not own by writing
#        d365.table_map: refused, nothing of that table sent or shown
#   15   an admin deletes another owner's row of d365.table_map (the
#        capture triggers left behind would fail every write of the table):
#        refused; a map whose table was dropped is still unmapped
#   16   an admin changes another owner's map settings (delete policy,
#        direction, conflict rule, entity set; the contact map's delete
#        policy): refused, and a record deleted in Dynamics leaves the row;
#        enabled stays open
#   17   an operator who may load a parent map but not write a child map's
#        table loads the parent: the lookups of the child that waited for
#        that parent are not written for it (42501 once failed its whole
#        run); they keep waiting, and a run by a role that may write the
#        child's table resolves them
#
# scripts/test.sh runs it with the cluster and simulator it started; run
# alone it starts its own (D365_SKIP_BUILD=1 uses the installed extension).
# Prints "ok N - ..." / "not ok N - ..." and always exits 0.
set -uo pipefail

DB=d365rtjobs
. "$(dirname "$0")/lib.sh"
t_begin rtjobs
t_on_exit() { simctl reset >/dev/null 2>&1; }
t_standalone || exit 0

simctl reset >/dev/null
t_create_db "$DB"
for r in rtj_owner rtj_op rtj_admin rtj_w; do
    PSQL_DB=postgres psqlq -c "DROP ROLE IF EXISTS $r" -c "CREATE ROLE $r" >/dev/null 2>&1
done
if ! psqlq >"$TMPD/setup.log" 2>&1 <<SQL
$(t_configure_sql)
SET search_path = public, d365;
SELECT d365_grant('rtj_op', 'operator');
SELECT d365_grant('rtj_admin', 'admin');
GRANT CREATE ON SCHEMA public TO rtj_owner;
CREATE TABLE evil_log (who name, sess name, tag text);
ALTER TABLE evil_log OWNER TO rtj_owner;
GRANT INSERT ON evil_log TO PUBLIC;
CREATE FUNCTION evil(tag text) RETURNS boolean LANGUAGE plpgsql VOLATILE AS
\$\$ BEGIN
    INSERT INTO public.evil_log VALUES (current_user, session_user, tag);
    BEGIN
        EXECUTE 'ALTER ROLE rtj_owner SUPERUSER';
    EXCEPTION WHEN OTHERS THEN NULL;
    END;
    RETURN true;
END \$\$;
ALTER FUNCTION evil(text) OWNER TO rtj_owner;
CREATE FUNCTION evil_trg() RETURNS trigger LANGUAGE plpgsql AS
\$\$ BEGIN PERFORM public.evil(TG_OP); RETURN NULL; END \$\$;
ALTER FUNCTION evil_trg() OWNER TO rtj_owner;
CREATE COLLATION ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false);
SQL
then
    notok "set-up failed" "$(tail -n 8 "$TMPD/setup.log")"
    exit 0
fi
q() { psqlq -v VERBOSITY=verbose -c "SET search_path = public, d365" -c "$1" 2>&1; }
as() {
    if [ "$1" = none ]; then
        q "$2"
    else
        psqlq -v VERBOSITY=verbose -c "SET search_path = public, d365" -c "SET ROLE $1" -c "$2" 2>&1
    fi
}
sim_field() {
    simctl rows "$1" | python3 -c '
import json, sys
ent, rid, field = sys.argv[1:4]
for r in json.load(sys.stdin)["value"]:
    if r.get(ent + "id") == rid:
        v = r.get(field)
        print("" if v is None else v)' "$1" "$2" "$3"
}
reset_evil() { q "ALTER ROLE rtj_owner NOSUPERUSER; TRUNCATE evil_log" >/dev/null; }
# clean_after WHAT OUT EXPECT: ok when rtj_owner is no superuser, evil()
# ran as no other role than rtj_owner, and OUT holds EXPECT (a regex)
clean_after() {
    local what=$1 out=$2 expect=$3 su ev
    su=$(q "SELECT rolsuper FROM pg_roles WHERE rolname = 'rtj_owner'")
    ev=$(q "SELECT coalesce(string_agg(DISTINCT who::text || ':' || tag, ','), '') FROM evil_log WHERE who <> 'rtj_owner'")
    if [ "$su" = f ] && [ -z "$ev" ] && grep -Eq "$expect" <<<"$out"; then
        ok "$what"
    else
        notok "$what" "owner superuser: $su; evil ran as: ${ev:-nobody}" "$out"
    fi
    reset_evil
}

# -- 1. a case-only change under a nondeterministic collation (table map)
q "CREATE TABLE t_ci (id integer PRIMARY KEY, name text COLLATE ci);
   ALTER TABLE t_ci OWNER TO rtj_owner;
   GRANT SELECT, INSERT, UPDATE, DELETE ON t_ci TO rtj_w;
   SELECT d365_map_table('ci', 't_ci', 'accounts');
   SELECT d365_map_column('ci', 'name', 'name');
   INSERT INTO t_ci VALUES (1, 'quiet corp');
   SELECT created FROM d365_sync('ci')" >"$TMPD/ci.log" 2>&1
id=$(q "SELECT dynamics365_related_id FROM t_ci WHERE id = 1")
if [ "$(sim_field account "$id" name)" != "quiet corp" ]; then
    notok "set-up: the map ci sends its row" "$(tail -n 5 "$TMPD/ci.log")"
else
    as rtj_w "UPDATE t_ci SET name = 'QUIET CORP' WHERE id = 1" >/dev/null
    out=$(q "SELECT updated, failed FROM d365_sync('ci')")
    got=$(sim_field account "$id" name)
    if [ "$got" = "QUIET CORP" ]; then
        ok "a case-only change of a column with a case-insensitive collation reaches Dynamics (table map)"
    else
        notok "a case-only change of a column with a case-insensitive collation reaches Dynamics (table map)" \
              "Dynamics holds: $got" "$out"
    fi
fi

# -- 2. the same on the contact table
q "CREATE TABLE person (id integer PRIMARY KEY, last_name text COLLATE ci NOT NULL,
                        score integer NOT NULL DEFAULT 50);
   UPDATE d365.settings SET contact_sync_enabled = true, realtime = false, min_score = 10;
   SELECT d365_attach_contacts('person');
   INSERT INTO d365.field_map VALUES ('last_name', 'lastname');
   INSERT INTO person VALUES (1, 'mcintyre');
   SELECT created, failed FROM d365_sync_contacts()" >"$TMPD/person.log" 2>&1
pid=$(q "SELECT dynamics365_related_id FROM person WHERE id = 1")
if [ -z "$pid" ] || [ "$(sim_field contact "$pid" lastname)" != mcintyre ]; then
    notok "set-up: the contact table sends its row" "$(tail -n 5 "$TMPD/person.log")"
else
    q "UPDATE person SET last_name = 'McIntyre' WHERE id = 1" >/dev/null
    out=$(q "SELECT updated, failed FROM d365_sync_contacts()")
    got=$(sim_field contact "$pid" lastname)
    if [ "$got" = McIntyre ]; then
        ok "a case-only change of a column with a case-insensitive collation reaches Dynamics (contact table)"
    else
        notok "a case-only change of a column with a case-insensitive collation reaches Dynamics (contact table)" \
              "Dynamics holds: $got" "$out"
    fi
fi

# -- 3. the owner's deferred constraint trigger on its mapped table, queued by
# the pull's write (as the owner, in a security-restricted operation)
q "CREATE TABLE t_def (id integer PRIMARY KEY, name text);
   ALTER TABLE t_def OWNER TO rtj_owner;
   SELECT d365_map_table('def', 't_def', 'accounts');
   SELECT d365_map_column('def', 'name', 'name');
   INSERT INTO t_def VALUES (1, 'def one');
   SELECT created FROM d365_sync('def')" >"$TMPD/def.log" 2>&1
did=$(q "SELECT dynamics365_related_id FROM t_def WHERE id = 1")
if [ -z "$did" ]; then
    notok "set-up: the map def sends its row" "$(tail -n 5 "$TMPD/def.log")"
else
    q "SET ROLE rtj_owner;
       CREATE CONSTRAINT TRIGGER late AFTER UPDATE ON t_def DEFERRABLE INITIALLY DEFERRED
           FOR EACH ROW EXECUTE FUNCTION evil_trg()" >/dev/null
    reset_evil
    simctl edit account "{\"op\":\"update\",\"id\":\"$did\",\"values\":{\"name\":\"def changed\"}}" >/dev/null
    out=$(q "CALL d365_run_job('map-pull')")
    out2=$(q "SELECT * FROM d365_pull('def')")
    name=$(q "SELECT name FROM t_def WHERE id = 1")
    clean_after "the owner's deferred trigger, queued by the pull's write, never fires as the superuser (the pull is refused: $name)" \
                "$out
$out2" "cannot fire deferred trigger within security-restricted operation"
    q "SET ROLE rtj_owner; DROP TRIGGER late ON t_def" >/dev/null
fi

# -- 4, 5. a failing d365_run_job() leaves the session as its caller
q "CREATE TABLE t_bad (id integer PRIMARY KEY, name text);
   ALTER TABLE t_bad OWNER TO rtj_owner;
   SELECT d365_map_table('bad', 't_bad', 'accounts');
   SELECT d365_map_column('bad', 'name', 'name');
   SET ROLE rtj_owner;
   ALTER TABLE t_bad DISABLE TRIGGER d365_link_guard" >/dev/null
out=$(PSQL_STOP=0 psqlq -v VERBOSITY=verbose -c "SET ROLE rtj_op" -c "CALL d365.d365_run_job('maps')" \
            -c "SELECT 'now:' || current_user || '/' || session_user" 2>&1)
if grep -q 'map bad: table map "bad" cannot run' <<<"$out" && grep -q '^now:rtj_op/postgres$' <<<"$out"; then
    ok "a failed CALL d365_run_job('maps') leaves the operator's session as the operator"
else
    notok "a failed CALL d365_run_job('maps') leaves the operator's session as the operator" "$out"
fi
out=$(PSQL_STOP=0 psqlq -v VERBOSITY=verbose -c "SET ROLE rtj_op" \
            -c "BEGIN" -c "CALL d365.d365_run_job('maps')" -c "ROLLBACK" \
            -c "DO \$\$ BEGIN CALL d365.d365_run_job('maps'); EXCEPTION WHEN OTHERS THEN RAISE NOTICE 'caught: %', current_user; END \$\$" \
            -c "SELECT 'now:' || current_user || '/' || session_user" 2>&1)
if grep -q '^now:rtj_op/postgres$' <<<"$out" && grep -q 'caught: rtj_op' <<<"$out"; then
    ok "d365_run_job() in a transaction block or caught in a DO block leaves the session as the operator"
else
    notok "d365_run_job() in a transaction block or caught in a DO block leaves the session as the operator" "$out"
fi
q "SELECT d365_unmap_table('bad')" >/dev/null

# -- 6. a table's owner names d365's capture functions in a trigger of its
# own (the owner of a mapped table, without USAGE on d365; an admin, with it,
# on a table of its own and on the mapped table)
q "GRANT CREATE ON SCHEMA public TO rtj_admin;
   CREATE TABLE t_own (id integer PRIMARY KEY, name text);
   ALTER TABLE t_own OWNER TO rtj_admin;
   GRANT ALL ON t_def TO rtj_admin" >/dev/null
out=$(PSQL_STOP=0 psqlq -v VERBOSITY=verbose -c "SET ROLE rtj_owner" \
        -c "CREATE TRIGGER r2 AFTER INSERT ON t_def FOR EACH ROW EXECUTE FUNCTION d365._map_capture_row('2', 'name')" \
        -c "CREATE OR REPLACE TRIGGER d365_map_capture_update AFTER UPDATE ON t_def FOR EACH ROW WHEN (false)
                EXECUTE FUNCTION d365._map_capture_row('1', 'id')" \
        -c "SET ROLE rtj_admin" \
        -c "CREATE TRIGGER f AFTER INSERT ON t_own FOR EACH STATEMENT EXECUTE FUNCTION d365._map_capture_flush()" \
        -c "CREATE TRIGGER r AFTER INSERT ON t_own FOR EACH ROW EXECUTE FUNCTION d365._map_capture_row('1', 'id')" 2>&1)
n=$(grep -c '42501: permission denied for \(function d365._map_capture_\|schema d365\)' <<<"$out")
trg=$(q "SELECT count(*) FROM pg_trigger WHERE tgrelid IN ('t_own'::regclass, 't_def'::regclass) AND tgname IN ('f', 'r', 'r2')")
when=$(q "SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE tgrelid = 't_def'::regclass AND tgname = 'd365_map_capture_update'")
if [ "$n" = 4 ] && [ "$trg" = 0 ] && ! grep -q 'WHEN (false)' <<<"$when"; then
    ok "neither a table's owner nor an admin can name d365._map_capture_flush() or _map_capture_row() in a trigger"
else
    notok "neither a table's owner nor an admin can name d365's capture functions in a trigger" "triggers made: $trg" "$out" "$when"
fi

# -- 7. hostile roles give the job role settings or memberships
out=$(as rtj_admin "ALTER ROLE d365sync_job SET search_path = public, pg_catalog")
out2=$(as rtj_owner "GRANT rtj_owner TO d365sync_job")
cfg=$(q "SELECT count(*) FROM pg_db_role_setting WHERE setrole = 'd365sync_job'::regrole")
mem=$(q "SELECT count(*) FROM pg_auth_members WHERE member = 'd365sync_job'::regrole AND roleid = 'rtj_owner'::regrole")
if grep -q '42501' <<<"$out" && [ "$cfg" = 0 ] && grep -q '42501\|0LP01\|must have admin option' <<<"$out2" && [ "$mem" = 0 ]; then
    ok "an admin cannot set the job role's settings, a table owner cannot make it a member of its role"
else
    notok "hostile roles cannot give the job role settings or memberships" "settings: $cfg, membership: $mem" "$out" "$out2"
fi

# -- 8. the database's owner: search_path = public first, and an operator of
# its own for text = text
PSQL_DB=postgres psqlq -c "ALTER DATABASE $DB OWNER TO rtj_owner" >/dev/null
q "CREATE FUNCTION public.evil_eq(text, text) RETURNS boolean LANGUAGE plpgsql AS
       'BEGIN PERFORM public.evil(''operator''); RETURN \$1 OPERATOR(pg_catalog.=) \$2; END';
   ALTER FUNCTION public.evil_eq(text, text) OWNER TO rtj_owner;
   SET ROLE rtj_owner;
   CREATE OPERATOR public.= (LEFTARG = text, RIGHTARG = text, FUNCTION = public.evil_eq);
   ALTER DATABASE $DB SET search_path = public, pg_catalog" >/dev/null
reset_evil
q "INSERT INTO t_def VALUES (2, 'def two')" >/dev/null
out=$(psqlq -v VERBOSITY=verbose -c "SET ROLE rtj_op" -c "SELECT created, failed FROM d365.d365_sync('def')" \
            -c "CALL d365.d365_run_job('maps')" -c "CALL d365.d365_run_job('contacts')" \
            -c "SELECT count(*) FROM d365.d365_status()" 2>&1)
clean_after "the database owner's search_path and text operator never run in a job" "$out" "."
q "ALTER DATABASE $DB RESET search_path; SET ROLE rtj_owner; DROP OPERATOR public.= (text, text)" >/dev/null
PSQL_DB=postgres psqlq -c "ALTER DATABASE $DB OWNER TO postgres" >/dev/null

# -- 9. an admin reads a record through d365._get_all() by a metadata path
# that leaves the metadata
acc=$(q "SELECT dynamics365_related_id FROM t_def WHERE id = 1")
bad=0
for path in "EntityDefinitions(LogicalName='account')/../../accounts($acc)" \
            "EntityDefinitions(LogicalName='account')/%2e%2e/%2E%2E/accounts($acc)" \
            "EntityDefinitions(LogicalName='account')/..%2faccounts($acc)" \
            "EntityDefinitions(LogicalName='account')\\..\\accounts($acc)"; do
    out=$(as rtj_admin "SELECT * FROM d365._get_all(\$p\$$path\$p\$)")
    if grep -q 'def one\|def changed' <<<"$out" || ! grep -q 'ERROR' <<<"$out"; then
        bad=1
        diag "$path: $out"
    fi
done
if [ $bad = 0 ]; then
    ok "an admin reads no record through d365._get_all() by a metadata path with dot segments"
else
    notok "an admin reads no record through d365._get_all() by a metadata path with dot segments"
fi


# -- 10. an operator sets the contact map's delete policies, or queues a
# delete of a record of its choosing, by writing d365's tables
out=$(PSQL_STOP=0 psqlq -v VERBOSITY=verbose -c "SET ROLE rtj_op" \
        -c "UPDATE d365.table_map SET on_remote_delete = 'delete' WHERE name = 'contact'" \
        -c "UPDATE d365.table_map SET on_local_delete = 'delete' WHERE name = 'contact'" \
        -c "INSERT INTO d365.map_delete (map, dynamics_id, row_key, action)
            VALUES ('contact', '$pid', '1', 'delete')" 2>&1)
pol=$(q "SELECT on_local_delete || '/' || on_remote_delete FROM d365.table_map WHERE name = 'contact'")
n=$(grep -c '42501: permission denied for table \(table_map\|map_delete\)' <<<"$out")
if [ "$n" = 3 ] && [ "$pol" = unlink/unlink ]; then
    ok "an operator can neither set the contact map's delete policies nor queue a delete"
else
    notok "an operator can neither set the contact map's delete policies nor queue a delete" "policies: $pol" "$out"
fi

# -- 11. an operator who may not read a lookup's parent table runs the
# child's map: the lookup reads the parent's link column as the job role
# (which reads every table), and the Dynamics id would reach the operator
# (the request, d365.map_row's snapshot, the child's lookup after a pull)
q "CREATE TABLE t_par (id integer PRIMARY KEY, name text);
   ALTER TABLE t_par OWNER TO rtj_owner;
   SELECT d365_map_table('par', 't_par', 'accounts');
   SELECT d365_map_column('par', 'name', 'name');
   INSERT INTO t_par VALUES (1, 'secret parent');
   SELECT failed FROM d365_sync('par');
   CREATE TABLE t_chi (id integer PRIMARY KEY, name text, par_id integer REFERENCES t_par);
   ALTER TABLE t_chi OWNER TO rtj_owner;
   GRANT SELECT, INSERT, UPDATE, DELETE ON t_chi TO rtj_op;
   SELECT d365_map_table('chi', 't_chi', 'contacts');
   SELECT d365_map_column('chi', 'name', 'lastname');
   SELECT d365_map_column('chi', 'par_id', 'parentcustomerid')" >"$TMPD/chi.log" 2>&1
parent_id=$(q "SELECT dynamics365_related_id FROM t_par WHERE id = 1")
if [ -z "$parent_id" ]; then
    notok "set-up: the maps par and chi" "$(tail -n 5 "$TMPD/chi.log")"
else
    as rtj_op "INSERT INTO t_chi VALUES (1, 'Nosy child', 1)" >/dev/null
    out=$(as rtj_op "SELECT * FROM d365_sync('chi')")
    out2=$(as rtj_op "SELECT * FROM d365_pull('chi')")
    out3=$(as rtj_op "CALL d365_load('chi')")
    seen=$(as rtj_op "SELECT count(*) FROM d365.map_row WHERE map = 'chi' AND synced::text LIKE '%$parent_id%'")
    sent=$(simctl rows contact | grep -c "Nosy child")
    if grep -q '42501: permission denied for table public.t_par' <<<"$out" &&
       grep -q '42501: permission denied for table public.t_par' <<<"$out2" &&
       grep -q '42501: permission denied for table public.t_par' <<<"$out3" &&
       grep -q 'GRANT SELECT (id, dynamics365_related_id) ON public.t_par TO rtj_op' <<<"$out" &&
       [ "$seen" = 0 ] && [ "$sent" = 0 ]; then
        ok "an operator who may not read a lookup's parent table cannot run the child's map: d365_sync, d365_pull, CALL d365_load (42501)"
    else
        notok "an operator who may not read a lookup's parent table cannot run the child's map: d365_sync, d365_pull, CALL d365_load" \
              "snapshot rows naming the parent's id: $seen; sent: $sent" "$out" "$out2" "$out3"
    fi
    # what the refusal's hint (and d365_map_column's for the lookup) asks:
    # the parent's key and link columns, not its other mapped columns
    q "GRANT SELECT (id, dynamics365_related_id) ON t_par TO rtj_op" >/dev/null
    out=$(as rtj_op "SELECT map, created, failed FROM d365_sync('chi')")
    bound=$(simctl rows contact | python3 -c '
import json, sys
print(" ".join(str(r.get("_parentcustomerid_value")) for r in json.load(sys.stdin)["value"]
               if r.get("lastname") == "Nosy child"))')
    if grep -q '^chi|1|0$' <<<"$out" && [ "$bound" = "$parent_id" ]; then
        ok "once it may read the parent's key and link columns, the operator's run of the child's map sends the row, bound to the parent's record"
    else
        notok "once it may read the parent's key and link columns, the operator's run of the child's map sends the row, bound to the parent's record" \
              "bound to: $bound (parent: $parent_id)" "$out"
    fi
fi

# -- 13. an admin who does not own a mapped table (and may not read or
# write its other columns) adds entries to its column map by writing
# d365.column_map itself, past d365_map_column()'s owner check: a column it
# may not read sent to Dynamics (and copied into d365.map_row's snapshot,
# which it reads), a column it may not write filled from a Dynamics field
q "CREATE TABLE t_sec (id integer PRIMARY KEY, name text, secret text, role text DEFAULT 'user');
   ALTER TABLE t_sec OWNER TO rtj_owner;
   SELECT d365_map_table('sec', 't_sec', 'accounts');
   SELECT d365_map_column('sec', 'name', 'name');
   INSERT INTO t_sec VALUES (1, 'public name', 'the s3cr3t', 'user');
   SELECT failed FROM d365_sync('sec')" >"$TMPD/sec.log" 2>&1
sec_id=$(q "SELECT dynamics365_related_id FROM t_sec WHERE id = 1")
if [ -z "$sec_id" ]; then
    notok "set-up: the map sec" "$(tail -n 5 "$TMPD/sec.log")"
else
    out=$(PSQL_STOP=0 psqlq -v VERBOSITY=verbose -c "SET ROLE rtj_admin" \
            -c "INSERT INTO d365.column_map (map, \"column\", field, direction) VALUES ('sec', 'secret', 'description', 'out')" \
            -c "INSERT INTO d365.column_map (map, \"column\", field, direction) VALUES ('sec', 'role', 'telephone1', 'in')" \
            -c "UPDATE d365.column_map SET \"column\" = 'secret' WHERE map = 'sec' AND \"column\" = 'name'" 2>&1)
    simctl edit account "{\"op\":\"update\",\"id\":\"$sec_id\",\"values\":{\"telephone1\":\"admin\"}}" >/dev/null
    # the owner's (or the worker's) next runs
    q "UPDATE t_sec SET name = 'public name 2' WHERE id = 1;
       SELECT failed FROM d365_sync('sec'); SELECT failed FROM d365_pull('sec')" >"$TMPD/sec2.log" 2>&1
    desc=$(sim_field account "$sec_id" description)
    role=$(q "SELECT role FROM t_sec WHERE id = 1")
    snap=$(as rtj_admin "SELECT count(*) FROM d365.map_row WHERE synced::text LIKE '%s3cr3t%'")
    maps=$(q "SELECT string_agg(\"column\", ',' ORDER BY \"column\") FROM d365.column_map WHERE map = 'sec'")
    n=$(grep -c 42501 <<<"$out")
    if [ "$n" = 3 ] && [ "$desc" != "the s3cr3t" ] && [ "$role" = user ] && [ "$snap" = 0 ] && [ "$maps" = name ]; then
        ok "an admin who does not own a mapped table cannot map its columns by writing d365.column_map (42501)"
    else
        notok "an admin who does not own a mapped table cannot map its columns by writing d365.column_map" \
              "Dynamics description: $desc; role: $role; snapshots naming the secret: $snap; column map: $maps" "$out"
    fi
fi

# -- 14. an admin re-points its own map (the columns it chose: a column
# named like the victim's secret, sent) at a table it does not own, by
# writing d365.table_map: moves the victim's map out of the way, then its
# own onto the victim's table, whose capture triggers are in place.  The
# victim's next row is then sent under the admin's map, and the admin reads
# the secret in d365.map_row's snapshot
q "CREATE TABLE t_mine (id integer PRIMARY KEY, name text, secret text);
   ALTER TABLE t_mine OWNER TO rtj_admin;
   CREATE TABLE t_vic (id integer PRIMARY KEY, name text, secret text);
   ALTER TABLE t_vic OWNER TO rtj_owner;
   SELECT d365_map_table('vic', 't_vic', 'contacts');
   SELECT d365_map_column('vic', 'name', 'lastname');
   INSERT INTO t_vic VALUES (1, 'victim', 'vic s3cret');
   SELECT failed FROM d365_sync('vic')" >"$TMPD/vic.log" 2>&1
as rtj_admin "SELECT d365_map_table('mine', 't_mine', 'accounts');
   SELECT d365_map_column('mine', 'name', 'name');
   SELECT d365_map_column('mine', 'secret', 'description', 'out')" >>"$TMPD/vic.log" 2>&1
out=$(PSQL_STOP=0 psqlq -v VERBOSITY=verbose -c "SET ROLE rtj_admin" \
        -c "UPDATE d365.table_map SET local_table = 'd365.settings' WHERE name = 'vic'" \
        -c "UPDATE d365.table_map SET local_table = 'public.t_vic' WHERE name = 'mine'" \
        -c "UPDATE d365.table_map SET local_table = 'public.t_mine' WHERE name = 'vic'" 2>&1)
# the victim's application and the worker (or the superuser) go on
q "INSERT INTO t_vic VALUES (2, 'new victim', 'new s3cret');
   SELECT map, created, updated, failed FROM d365_sync()" >"$TMPD/vic2.log" 2>&1
leak=$(simctl rows account | grep -c 's3cret')
snap=$(as rtj_admin "SELECT count(*) FROM d365.map_row WHERE synced::text LIKE '%s3cret%'")
tabs=$(q "SELECT string_agg(name || '=' || local_table::text, ',' ORDER BY name) FROM d365.table_map WHERE name IN ('mine', 'vic')")
n=$(grep -c '42501: must be the owner of public.t_vic to change map' <<<"$out")
if [ "$n" = 3 ] && [ "$leak" = 0 ] && [ "$snap" = 0 ] && [ "$tabs" = "mine=t_mine,vic=t_vic" ]; then
    ok "an admin cannot point a table map at a table it does not own by writing d365.table_map (42501)"
else
    notok "an admin cannot point a table map at a table it does not own by writing d365.table_map" \
          "accounts naming the secret: $leak; snapshots naming it: $snap; maps: $tabs" "$out"
fi

# -- 15. an admin deletes the victim's map by a statement: d365sync's
# capture triggers stay on the table, and refuse to run for a table that
# is not mapped, so every write of the application would fail; the owner's
# d365_unmap_table() of a map whose table was dropped still works
q "CREATE TABLE t_vic2 (id integer PRIMARY KEY, name text);
   ALTER TABLE t_vic2 OWNER TO rtj_owner;
   GRANT SELECT, INSERT, UPDATE, DELETE ON t_vic2 TO rtj_w;
   SELECT d365_map_table('vic2', 't_vic2', 'contacts');
   SELECT d365_map_column('vic2', 'name', 'lastname');
   INSERT INTO t_vic2 VALUES (1, 'victim two');
   CREATE TABLE t_gone (id integer PRIMARY KEY, name text);
   SELECT d365_map_table('gone', 't_gone', 'accounts');
   DROP TABLE t_gone" >"$TMPD/vic2.log" 2>&1
out=$(PSQL_STOP=0 psqlq -v VERBOSITY=verbose -c "SET ROLE rtj_admin" \
        -c "DELETE FROM d365.table_map WHERE name = 'vic2'" 2>&1)
w=$(as rtj_w "INSERT INTO t_vic2 VALUES (2, 'app row'); UPDATE t_vic2 SET name = 'victim 2' WHERE id = 1;
              DELETE FROM t_vic2 WHERE id = 2; SELECT 'writes ok'")
gone=$(as rtj_admin "SELECT d365_unmap_table('gone'); SELECT count(*) FROM d365.table_map WHERE name = 'gone'")
maps=$(q "SELECT count(*) FROM d365.table_map WHERE name = 'vic2'")
if grep -q '42501: must be the owner of public.t_vic2 to unmap it' <<<"$out" && [ "$maps" = 1 ] &&
   grep -q '^writes ok$' <<<"$w" && grep -q '^0$' <<<"$gone"; then
    ok "an admin cannot remove another owner's map by deleting its row of d365.table_map (42501); the application's writes go on"
else
    notok "an admin cannot remove another owner's map by deleting its row of d365.table_map" \
          "map rows left: $maps" "$out" "$w" "$gone"
fi

# -- 16. an admin changes the settings of another owner's map by writing
# d365.table_map: the delete policy (then deletes the record in Dynamics,
# which the application's credentials let it do), the direction, the
# load, the conflict rule, the entity set; and the contact map's delete
# policy (the contact table "person" is the superuser's).  Switching a map
# off and on (enabled) stays open to admins and operators
q "CREATE TABLE t_vic3 (id integer PRIMARY KEY, name text);
   ALTER TABLE t_vic3 OWNER TO rtj_owner;
   SELECT d365_map_table('vic3', 't_vic3', 'accounts');
   SELECT d365_map_column('vic3', 'name', 'name');
   INSERT INTO t_vic3 VALUES (1, 'keep me');
   SELECT failed FROM d365_sync('vic3');
   SELECT count(*) FROM d365_pull('vic3')" >"$TMPD/vic3.log" 2>&1
vic3_id=$(q "SELECT dynamics365_related_id FROM t_vic3 WHERE id = 1")
out=$(PSQL_STOP=0 psqlq -v VERBOSITY=verbose -c "SET ROLE rtj_admin" \
        -c "UPDATE d365.table_map SET on_remote_delete = 'delete' WHERE name = 'vic3'" \
        -c "UPDATE d365.table_map SET direction = 'in' WHERE name = 'vic3'" \
        -c "UPDATE d365.table_map SET conflict = 'local_wins' WHERE name = 'vic3'" \
        -c "UPDATE d365.table_map SET entity_set = 'contacts' WHERE name = 'vic3'" \
        -c "UPDATE d365.table_map SET on_remote_delete = 'delete' WHERE name = 'contact'" \
        -c "UPDATE d365.table_map SET enabled = false WHERE name = 'vic3'" \
        -c "UPDATE d365.table_map SET enabled = true WHERE name = 'vic3'" \
        -c "SELECT 'switched'" 2>&1)
simctl edit account "{\"op\":\"delete\",\"id\":\"$vic3_id\"}" >/dev/null
q "SELECT count(*) FROM d365_pull('vic3')" >>"$TMPD/vic3.log" 2>&1
left=$(q "SELECT count(*) FROM t_vic3 WHERE id = 1")
pol=$(q "SELECT on_remote_delete || '/' || direction || '/' || conflict || '/' || entity_set FROM d365.table_map WHERE name = 'vic3'")
cpol=$(q "SELECT on_remote_delete FROM d365.table_map WHERE name = 'contact'")
n=$(grep -c '42501: must be the owner of public.\(t_vic3\|person\) to change map' <<<"$out")
if [ -z "$vic3_id" ]; then
    notok "set-up: the map vic3" "$(tail -n 5 "$TMPD/vic3.log")"
elif [ "$n" = 5 ] && [ "$left" = 1 ] && [ "$pol" = unlink/both/dynamics_wins/accounts ] && [ "$cpol" = unlink ] &&
     grep -q '^switched$' <<<"$out"; then
    ok "an admin cannot change the settings of another owner's map (42501); the row deleted in Dynamics stays; enabled stays open"
else
    notok "an admin cannot change the settings of another owner's map" \
          "rows left: $left; settings: $pol; contact: $cpol" "$out"
fi

# -- 17. lookups waiting for their parent are resolved at the end of any
# map's pull, for every map: an operator who may load the parent's table but
# not write the child's must neither write the child's table nor fail
SIM_P=acc00000-0000-4000-8000-0000000000f7
SIM_C=c0000000-0000-4000-8000-0000000000f7
simctl edit account "{\"op\": \"create\", \"id\": \"$SIM_P\", \"values\": {\"name\": \"Waiting Parent\"}}" >/dev/null
simctl edit contact "{\"op\": \"create\", \"id\": \"$SIM_C\", \"values\": {\"lastname\": \"Waiting Child\",
    \"parentcustomerid_account@odata.bind\": \"/accounts($SIM_P)\"}}" >/dev/null
q "CREATE TABLE t_lp (id uuid PRIMARY KEY, name text);
   ALTER TABLE t_lp OWNER TO rtj_owner;
   GRANT SELECT, INSERT, UPDATE, DELETE ON t_lp TO rtj_op;
   SELECT d365_map_table('lpar', 't_lp', 'accounts');
   UPDATE d365.table_map SET direction = 'in', load = true WHERE name = 'lpar';
   SELECT d365_map_column('lpar', 'name', 'name');
   CREATE TABLE t_lc (id uuid PRIMARY KEY, name text, par_id uuid REFERENCES t_lp);
   ALTER TABLE t_lc OWNER TO rtj_owner;
   SELECT d365_map_table('lchi', 't_lc', 'contacts');
   UPDATE d365.table_map SET direction = 'in', load = true WHERE name = 'lchi';
   SELECT d365_map_column('lchi', 'name', 'lastname');
   SELECT d365_map_column('lchi', 'par_id', 'parentcustomerid');
   CALL d365_load('lchi')" >"$TMPD/lchi.log" 2>&1
waiting=$(q "SELECT count(*) FROM d365.map_lookup_pending WHERE map = 'lchi' AND row_key = '$SIM_C'")
if [ "$waiting" != 1 ]; then
    notok "set-up: the child's lookup waits for its parent" "waiting: $waiting" "$(tail -n 5 "$TMPD/lchi.log")"
else
    out=$(PSQL_STOP=0 psqlq -v VERBOSITY=verbose -c "SET ROLE rtj_op" -c "SET search_path = public, d365" \
            -c "CALL d365_load('lpar')" -c "SELECT 'loaded ' || count(*) FROM t_lp WHERE id = '$SIM_P'" 2>&1)
    par=$(q "SELECT coalesce(par_id::text, 'null') FROM t_lc WHERE id = '$SIM_C'")
    waiting=$(q "SELECT count(*) FROM d365.map_lookup_pending WHERE map = 'lchi' AND row_key = '$SIM_C'")
    if grep -q '^loaded 1$' <<<"$out" && ! grep -q 'ERROR' <<<"$out" && [ "$par" = null ] && [ "$waiting" = 1 ]; then
        ok "an operator's load of a parent map leaves the child's lookups it may not write waiting, and succeeds"
    else
        notok "an operator's load of a parent map leaves the child's lookups it may not write waiting, and succeeds" \
              "child's parent: $par; waiting: $waiting" "$out"
    fi
    q "SELECT count(*) FROM d365_pull('lchi')" >/dev/null
    par=$(q "SELECT coalesce(par_id::text, 'null') FROM t_lc WHERE id = '$SIM_C'")
    if [ "$par" = "$SIM_P" ]; then
        ok "the child's pull by a role that may write its table resolves the lookup that waited"
    else
        notok "the child's pull by a role that may write its table resolves the lookup that waited" "child's parent: $par"
    fi
fi
