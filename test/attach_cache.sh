#!/usr/bin/env bash
# test/attach_cache.sh: the remembered attachment check (src/capture/attach_cache.c)
# never lets a changed attachment through.  One session pushes incoming
# changes (d365_update_contact), so the check is remembered; between two
# pushes of that same session, another session changes the attachment:
#
#   1. a capture trigger disabled: the next push is refused; enabled again,
#      the push after it is applied
#   2. the link guard dropped: refused
#   3. the key column renamed: refused
#   4. within one transaction, a capture trigger dropped after a push:
#      the next push of that transaction is refused
#   5. the table swapped for a view of the same name (the triggers and
#      indexes dropped, the rows moved out, CREATE RULE "_RETURN" makes the
#      table a view):
#      refused, nothing read from the view's code
#
# Prints "ok N - ..." / "not ok N - ..." and always exits 0.
set -uo pipefail

DB=d365attcache
. "$(dirname "$0")/lib.sh"
t_begin attcache
t_on_exit() {
    timeout 60 dropdb --if-exists --force "$DB" >/dev/null 2>&1
}
t_standalone || exit 0

timeout 60 dropdb --if-exists --force "$DB" >/dev/null 2>&1
timeout 60 createdb "$DB" || { notok "set-up: createdb"; exit 0; }
"$D365_SIMCTL" reset >/dev/null
{ t_configure_sql; cat <<'SQL'; } | psqlq >"$TMPD/setup.log" 2>&1 || { notok "set-up failed" "$(tail -n 5 "$TMPD/setup.log")"; exit 0; }
UPDATE d365.settings SET contact_sync_enabled = true, min_score = 1;
CREATE TABLE ac_person (id integer PRIMARY KEY, last_name text, score integer NOT NULL DEFAULT 50);
INSERT INTO ac_person (id, last_name) VALUES (1, 'Lovelace'), (2, 'Hopper');
SELECT d365.d365_attach_contacts('ac_person');
INSERT INTO d365.field_map (column_name, dynamics_field) VALUES ('last_name', 'lastname');
SELECT created FROM d365.d365_sync_contacts();
SQL
ID1=$(psqlq -c "SELECT dynamics365_related_id FROM ac_person WHERE id = 1")

# push NAME: a psql line that pushes a new last name for contact 1 and
# prints "NAME:" and the outcome (the error's text when refused)
push() {
    cat <<SQL
DO \$\$
BEGIN
    PERFORM d365.d365_update_contact('{"contactid": "$ID1", "lastname": "$1"}');
    RAISE NOTICE '$1: applied';
EXCEPTION WHEN OTHERS THEN
    RAISE NOTICE '$1: %', SQLERRM;
END \$\$;
SQL
}
N_OTHER=0
other() {   # another session runs the SQL $1
    N_OTHER=$((N_OTHER + 1))
    printf '%s\n' "$1" >"$TMPD/other$N_OTHER.sql"
    echo "\\! psql -X -q -v ON_ERROR_STOP=1 -d $DB -f $TMPD/other$N_OTHER.sql >>$TMPD/other.log 2>&1"
}

# one session for 1-3 and 5, its pushes and the other session's changes in turn
{
    push warm
    other "ALTER TABLE ac_person DISABLE TRIGGER d365_capture_update"
    push disabled
    other "ALTER TABLE ac_person ENABLE TRIGGER d365_capture_update"
    push enabled
    other "DROP TRIGGER d365_link_guard ON ac_person"
    push guard_dropped
    other "SELECT d365.d365_attach_contacts('ac_person')"
    push attached
    other "ALTER TABLE ac_person RENAME COLUMN id TO person_id"
    push renamed
    other "ALTER TABLE ac_person RENAME COLUMN person_id TO id"
    other "SELECT d365.d365_attach_contacts('ac_person')"
    push attached_again
    echo "BEGIN;"
    push in_transaction
    echo "DROP TRIGGER d365_capture_truncate ON ac_person;"
    push dropped_in_transaction
    echo "ROLLBACK;"
    push after_rollback
    other "CREATE TABLE ac_saved AS SELECT * FROM ac_person;
           CREATE FUNCTION ac_spy() RETURNS integer LANGUAGE sql AS 'INSERT INTO ac_saved (id) VALUES (-1) RETURNING 1';
           DROP TRIGGER d365_capture_update ON ac_person; DROP TRIGGER d365_capture_update_flush ON ac_person;
           DROP TRIGGER d365_capture_insert_flush ON ac_person; DROP TRIGGER d365_capture_delete ON ac_person;
           DROP TRIGGER d365_capture_truncate ON ac_person; DROP TRIGGER d365_link_guard ON ac_person;
           DROP TRIGGER d365_link_guard_update ON ac_person;
           DELETE FROM ac_person;
           ALTER TABLE ac_person DROP CONSTRAINT ac_person_pkey;
           DO \$\$ DECLARE i regclass; BEGIN
               FOR i IN SELECT indexrelid::regclass FROM pg_index WHERE indrelid = 'ac_person'::regclass LOOP
                   EXECUTE 'DROP INDEX ' || i;
               END LOOP; END \$\$;
           VACUUM ac_person;
           CREATE RULE \"_RETURN\" AS ON SELECT TO ac_person DO INSTEAD
               SELECT s.id, s.last_name, s.score, s.dynamics365_related_id, s.dynamics365_synchronized_on
                 FROM ac_saved s WHERE ac_spy() = 1;"
    push view
} | psqlq 2>&1 | sed -n 's/^NOTICE:  //p' >"$TMPD/out"

outcome() { sed -n "s/^$1: //p" "$TMPD/out"; }
broken() { [[ "$(outcome "$1")" == *"attachment of the contact table is broken"* ]]; }
kind=$(psqlq -c "SELECT relkind FROM pg_class WHERE relname = 'ac_person'")

if [ "$(outcome warm)" = applied ] && broken disabled && [ "$(outcome enabled)" = applied ]; then
    ok "a capture trigger disabled by another session between two pushes: the second is refused; enabled again, applied"
else
    notok "a capture trigger disabled by another session between two pushes: the second is refused; enabled again, applied" "$(cat "$TMPD/out")"
fi
if broken guard_dropped && [ "$(outcome attached)" = applied ]; then
    ok "the link guard dropped between two pushes: refused (applied again once attached again)"
else
    notok "the link guard dropped between two pushes: refused (applied again once attached again)" "$(cat "$TMPD/out")"
fi
if broken renamed && [ "$(outcome attached_again)" = applied ]; then
    ok "the key column renamed between two pushes: refused"
else
    notok "the key column renamed between two pushes: refused" "$(cat "$TMPD/out")"
fi
if [ "$(outcome in_transaction)" = applied ] && broken dropped_in_transaction && [ "$(outcome after_rollback)" = applied ]; then
    ok "a capture trigger dropped within the transaction of a push: its next push is refused (and after the rollback applied)"
else
    notok "a capture trigger dropped within the transaction of a push: its next push is refused (and after the rollback applied)" "$(cat "$TMPD/out")"
fi
spied=$(psqlq -c "SELECT count(*) FROM ac_saved WHERE id = -1" 2>&1)
if [ "$kind" = v ] && broken view && [ "$spied" = 0 ]; then
    ok "the table made a view of the same name between two pushes: refused, the view's code never ran"
else
    notok "the table made a view of the same name between two pushes: refused, the view's code never ran" \
        "relkind $kind, spy rows $spied" "$(cat "$TMPD/out")"
fi
