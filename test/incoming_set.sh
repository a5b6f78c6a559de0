#!/usr/bin/env bash
# test/incoming_set.sh: a page of the contact pull applied as a set.
#
#   1. Three contacts edited in Dynamics arrive in one page: they are
#      written by one UPDATE per set of columns written (the table's
#      statement trigger fires twice: last names; first name and kids), as
#      the table's owner in a security-restricted operation (the trigger
#      sees the owner and cannot create a temporary table), the counts are
#      those of the rows one by one, and the next sync sends nothing back.
#   2. A page where one row holds a value its column cannot hold: that row
#      fails alone (WARNING, last_error), the others are applied.
#   3. A page whose contacts have nothing new: nothing is written.
#   4. The attachment is checked for every page: with a capture trigger
#      dropped, the next pull is refused and writes nothing.
#
# Prints "ok N - ..." / "not ok N - ..." and always exits 0.
set -uo pipefail

DB=d365iset
. "$(dirname "$0")/lib.sh"
t_begin iset
t_on_exit() {
    timeout 60 dropdb --if-exists --force "$DB" >/dev/null 2>&1
    psql -X -q -d postgres -c "DROP ROLE IF EXISTS iset_owner" >/dev/null 2>&1
}
t_standalone || exit 0

timeout 60 dropdb --if-exists --force "$DB" >/dev/null 2>&1
timeout 60 createdb "$DB" || { notok "set-up: createdb"; exit 0; }
psql -X -q -d postgres -c "DROP ROLE IF EXISTS iset_owner" -c "CREATE ROLE iset_owner" >/dev/null 2>&1
"$D365_SIMCTL" reset >/dev/null
{ t_configure_sql; cat <<'SQL'; } | psqlq >"$TMPD/setup.log" 2>&1 || { notok "set-up failed" "$(tail -n 5 "$TMPD/setup.log")"; exit 0; }
UPDATE d365.settings SET contact_sync_enabled = true, min_score = 1;
CREATE TABLE iset_person (id integer PRIMARY KEY, first_name text, last_name text,
                          kids smallint, score integer NOT NULL DEFAULT 50);
INSERT INTO iset_person (id, first_name, last_name, kids)
SELECT g, 'First' || g, 'Last' || g, 1 FROM generate_series(1, 6) g;
CREATE TABLE iset_log (who name, restricted boolean, rows integer);
ALTER TABLE iset_person OWNER TO iset_owner;
ALTER TABLE iset_log OWNER TO iset_owner;
CREATE FUNCTION iset_stmt() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    restricted boolean := false;
    n integer;
BEGIN
    SELECT count(*) INTO n FROM new_rows;
    BEGIN
        CREATE TEMP TABLE iset_probe (x int);
        DROP TABLE iset_probe;
    EXCEPTION WHEN insufficient_privilege THEN
        restricted := true;
    END;
    INSERT INTO public.iset_log VALUES (current_user, restricted, n);
    RETURN NULL;
END $$;
ALTER FUNCTION iset_stmt() OWNER TO iset_owner;
CREATE TRIGGER iset_stmt AFTER UPDATE ON iset_person REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION iset_stmt();
SELECT d365.d365_attach_contacts('iset_person');
INSERT INTO d365.field_map (column_name, dynamics_field) VALUES
    ('first_name', 'firstname'), ('last_name', 'lastname'), ('kids', 'numberofchildren');
SELECT created FROM d365.d365_sync_contacts();
SELECT updated FROM d365.d365_pull_changes();
SQL

edit() {   # edit KEY JSON-VALUES: an edit made in Dynamics
    psqlq -c "SELECT json_build_object('op', 'update', 'id', dynamics365_related_id, 'values', '$2'::json)
                FROM iset_person WHERE id = $1" | "$D365_SIMCTL" edit contact - >/dev/null
}

# -- 1. one page, one UPDATE, as the owner, restricted; no echo
psqlq -c "TRUNCATE iset_log" >/dev/null
edit 1 '{"lastname": "Lovelace"}'
edit 2 '{"firstname": "Robert", "numberofchildren": 3}'
edit 3 '{"lastname": "Hopper"}'
out=$(psqlq -c "SELECT updated || '/' || unchanged || '/' || failed FROM d365.d365_pull_changes()" 2>"$TMPD/warn")
log=$(psqlq -c "SELECT string_agg(who || ':' || restricted || ':' || rows, ',' ORDER BY rows) FROM iset_log" 2>&1)
vals=$(psqlq -c "SELECT string_agg(id || '=' || first_name || ' ' || last_name || ' ' || kids, ',' ORDER BY id)
                   FROM iset_person WHERE id <= 3" 2>&1)
"$D365_SIMCTL" clear-requests >/dev/null
sent=$(psqlq -c "SELECT created + updated FROM d365.d365_sync_contacts()" 2>&1)
reqs=$("$D365_SIMCTL" requests --kind api --copy | grep -c PATCH)
if [ "$out" = "3/0/0" ] && [ "$log" = "iset_owner:true:1,iset_owner:true:2" ] \
   && [ "$vals" = "1=First1 Lovelace 1,2=Robert Last2 3,3=First3 Hopper 1" ] \
   && [ "$sent" = 0 ] && [ "$reqs" = 0 ]; then
    ok "a page of three edits is one UPDATE per set of columns, as the table's owner in a security-restricted operation, and nothing is sent back"
else
    notok "a page of three edits is one UPDATE per set of columns, as the table's owner in a security-restricted operation, and nothing is sent back" \
        "pull: $out" "statement trigger: $log" "rows: $vals" "sync sent: $sent, PATCH requests: $reqs"
fi

# -- 2. one value does not fit: that row fails alone
psqlq -c "TRUNCATE iset_log" >/dev/null
edit 4 '{"lastname": "Turing"}'
edit 5 '{"numberofchildren": 70000}'
edit 6 '{"firstname": "Grace"}'
out=$(psqlq -c "SELECT updated || '/' || unchanged || '/' || failed FROM d365.d365_pull_changes()" 2>"$TMPD/warn")
vals=$(psqlq -c "SELECT string_agg(id || '=' || first_name || ' ' || last_name || ' ' || kids, ',' ORDER BY id)
                   FROM iset_person WHERE id >= 4" 2>&1)
err=$(psqlq -c "SELECT last_error_code || ' ' || last_error FROM d365.contact_state WHERE contact_key = '5'" 2>&1)
if [ "$out" = "2/0/1" ] && [ "$vals" = "4=First4 Turing 1,5=First5 Last5 1,6=Grace Last6 1" ] \
   && [[ "$err" == 22003\ *numberofchildren*kids* ]] && grep -q "contact 5 was not applied" "$TMPD/warn"; then
    ok "a value its column cannot hold fails its row alone, the rest of the page is applied"
else
    notok "a value its column cannot hold fails its row alone, the rest of the page is applied" \
        "pull: $out" "rows: $vals" "state of 5: $err" "$(cat "$TMPD/warn")"
fi

# -- 3. nothing new: nothing written
psqlq -c "TRUNCATE iset_log" >/dev/null
psqlq -c "DELETE FROM d365.pull_state" >/dev/null
out=$(psqlq -c "SELECT updated || '/' || unchanged || '/' || failed FROM d365.d365_pull_changes()" 2>"$TMPD/warn")
log=$(psqlq -c "SELECT count(*) FROM iset_log" 2>&1)
if [ "$out" = "0/5/1" ] && [ "$log" = 0 ]; then
    ok "a new baseline with nothing new writes nothing (the row that does not fit fails again)"
else
    notok "a new baseline with nothing new writes nothing (the row that does not fit fails again)" \
        "pull: $out" "statements: $log"
fi

# -- 4. the attachment is checked for every page
edit 1 '{"lastname": "Byron"}'
psqlq -c "DROP TRIGGER d365_capture_update ON iset_person" >/dev/null 2>&1
out=$(psqlq -c "SELECT updated FROM d365.d365_pull_changes()" 2>&1)
vals=$(psqlq -c "SELECT last_name FROM iset_person WHERE id = 1" 2>&1)
if [[ "$out" == *"attachment of the contact table is broken"* ]] && [ "$vals" = Lovelace ]; then
    ok "with a capture trigger dropped, the pull is refused and writes nothing"
else
    notok "with a capture trigger dropped, the pull is refused and writes nothing" "pull: $out" "last name: $vals"
fi
