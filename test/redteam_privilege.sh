#!/usr/bin/env bash
# test/redteam_privilege.sh: what a role holding one set of d365_grant() can
# do with d365sync's own functions and state, beyond its documented entry
# points.  Every role but the superuser may be hostile: an operator (the
# operator set, and SELECT, UPDATE on the application's tables, as
# docs/security.md tells the DBA to grant), an admin, an application.
#
# The link rule: only an id d365sync linked a row to makes it write to that
# Dynamics record.  Attacks:
#   (a) an operator points its own contact at another person's record by
#       writing d365.contact_state (the id, or moving a state row to its
#       key), by an internal function (_contact_keys_moved, _contact_record
#       with a made-up outcome), with the link column written through
#       d365._contact_set_links;
#   (b) the same for a table map (d365.map_row), and a made-up pending
#       delete (d365.map_delete) of another record;
#   (c) an operator calls an internal function to read or send with the
#       application's credentials: d365._get_all() on a path of its choice,
#       a forged activity (a row of d365.activity, or an existing one moved
#       to another contact) sent by d365._send_activity() or the activity
#       sync;
#   (f) an operator chooses what a pull reads (d365.pull_state.delta_link)
#       or what the metadata cache says (a made-up user list names the
#       owner of activities);
#   (d) an admin: the same requests.  An admin links by hand by design
#       (d365_link_contact(); d365_map_table() keeps the links a table had
#       before it was mapped), so it may write the state's ids: (a) and (b)
#       are not run as admin (docs/security.md);
#   (e) an application: the same state and functions.
# Each check looks at what a user would see: the simulator's record, the
# requests it received, the error.
#
# scripts/test.sh runs it with the cluster and simulator it started; run
# alone it starts its own (D365_SKIP_BUILD=1 uses the installed extension).
# Prints "ok N - ..." / "not ok N - ..." and always exits 0.
set -uo pipefail

DB=d365rtpriv
. "$(dirname "$0")/lib.sh"
t_begin rtpriv
t_on_exit() { simctl reset >/dev/null 2>&1; }
t_standalone || exit 0

simctl reset >/dev/null
t_create_db "$DB"
for r in rtp_op rtp_admin rtp_app; do
    PSQL_DB=postgres psqlq -c "DROP ROLE IF EXISTS $r" -c "CREATE ROLE $r" >/dev/null 2>&1
done
if ! psqlq >"$TMPD/setup.log" 2>&1 <<SQL
$(t_configure_sql)
SET search_path = public, d365;
CREATE TABLE person (id integer PRIMARY KEY, last_name text NOT NULL, score integer NOT NULL DEFAULT 50);
UPDATE d365.settings SET contact_sync_enabled = true, activity_sync_enabled = true, realtime = false, min_score = 10;
SELECT d365_attach_contacts('person');
INSERT INTO d365.field_map VALUES ('last_name', 'lastname');
INSERT INTO person (id, last_name) VALUES (1, 'Victim'), (2, 'Mallory');
SELECT created, failed FROM d365_sync_contacts();
CREATE TABLE company (id integer PRIMARY KEY, name text NOT NULL);
SELECT d365_map_table('co', 'company', 'accounts');
SELECT d365_map_column('co', 'name', 'name');
INSERT INTO company VALUES (1, 'Victim Corp'), (2, 'Mallory Ltd');
SELECT * FROM d365_sync('co');
SELECT updated, failed FROM d365_pull_changes();
SELECT d365_grant('rtp_op', 'operator');
SELECT d365_grant('rtp_admin', 'admin');
SELECT d365_grant('rtp_app', 'app');
GRANT SELECT, UPDATE ON person, company TO rtp_op, rtp_admin, rtp_app;
SQL
then
    notok "set-up failed" "$(tail -n 8 "$TMPD/setup.log")"
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
sim_has() {    # sim_has ENTITY ID: 1 when the record exists
    simctl rows "$1" | python3 -c '
import json, sys
ent, rid = sys.argv[1:3]
print(sum(1 for r in json.load(sys.stdin)["value"] if r.get(ent + "id") == rid))' "$1" "$2"
}
VIC=$(q "SELECT dynamics365_related_id FROM person WHERE id = 1")
MAL=$(q "SELECT dynamics365_related_id FROM person WHERE id = 2")
VACC=$(q "SELECT dynamics365_related_id FROM company WHERE id = 1")
MACC=$(q "SELECT dynamics365_related_id FROM company WHERE id = 2")
if [ -z "$VIC" ] || [ -z "$MAL" ] || [ -z "$VACC" ] || [ -z "$MACC" ]; then
    notok "set-up: the rows were not linked" "$(q "SELECT * FROM person; SELECT * FROM company")"
    exit 0
fi
# back to the honest links after each attack (as the superuser)
restore() {
    q "ALTER TABLE person DISABLE TRIGGER USER; ALTER TABLE company DISABLE TRIGGER USER;
       UPDATE person SET dynamics365_related_id = NULL;
       UPDATE person SET dynamics365_related_id = '$VIC', last_name = 'Victim' WHERE id = 1;
       UPDATE person SET dynamics365_related_id = '$MAL', last_name = 'Mallory' WHERE id = 2;
       UPDATE company SET dynamics365_related_id = NULL;
       UPDATE company SET dynamics365_related_id = '$VACC', name = 'Victim Corp' WHERE id = 1;
       UPDATE company SET dynamics365_related_id = '$MACC', name = 'Mallory Ltd' WHERE id = 2;
       ALTER TABLE person ENABLE TRIGGER USER; ALTER TABLE company ENABLE TRIGGER USER;
       DELETE FROM d365.contact_state; DELETE FROM d365.contact_change;
       INSERT INTO d365.contact_state (contact_key, change_seq, synced_seq, dynamics_id, synced)
       VALUES ('1', 1, 1, '$VIC', '{\"lastname\": \"Victim\"}'), ('2', 1, 1, '$MAL', '{\"lastname\": \"Mallory\"}');
       DELETE FROM d365.map_delete; DELETE FROM d365.map_change; DELETE FROM d365.map_row;
       INSERT INTO d365.map_row (map, row_key, dynamics_id, synced, change_seq, synced_seq)
       VALUES ('co', '1', '$VACC', '{\"name\": \"Victim Corp\"}', 1, 1),
              ('co', '2', '$MACC', '{\"name\": \"Mallory Ltd\"}', 1, 1);
       DELETE FROM d365.activity" >/dev/null
    simctl edit contact "{\"op\":\"update\",\"id\":\"$VIC\",\"values\":{\"lastname\":\"Victim\"}}" >/dev/null
    [ "$(sim_has account "$VACC")" = 1 ] ||
        simctl edit account "{\"op\":\"create\",\"id\":\"$VACC\",\"values\":{\"name\":\"Victim Corp\"}}" >/dev/null
    simctl edit account "{\"op\":\"update\",\"id\":\"$VACC\",\"values\":{\"name\":\"Victim Corp\"}}" >/dev/null
    # Mallory's account holds what the state says was synced: an earlier
    # sync's name there would be an edit made on both sides (a conflict)
    simctl edit account "{\"op\":\"update\",\"id\":\"$MACC\",\"values\":{\"name\":\"Mallory Ltd\"}}" >/dev/null
}
# contact_hijacked ROLE WHAT ATTACK_SQL: the attack as ROLE, then Mallory's
# row changed and the contact sync run (by the superuser: the next sync,
# whoever runs it); ok when the victim's record kept its name
contact_hijacked() {
    local role=$1 what=$2 sql=$3 out sync name
    restore
    out=$(q "SET ROLE $role; $sql")
    q "UPDATE person SET last_name = 'Mallory was here' WHERE id = 2" >/dev/null
    simctl clear-requests >/dev/null
    sync=$(q "SELECT created, updated, failed FROM d365_sync_contacts()")
    name=$(sim_field contact "$VIC" lastname)
    if [ "$name" = "Victim" ]; then
        ok "$what: the victim's record is untouched"
    else
        notok "$what: the sync wrote Mallory's row to the victim's record" "attack: $out" "sync: $sync" \
            "victim's lastname: $name" "$(q "SELECT * FROM person; SELECT contact_key, dynamics_id FROM d365.contact_state")"
    fi
}
map_hijacked() {
    local role=$1 what=$2 sql=$3 out sync name
    restore
    out=$(q "SET ROLE $role; $sql")
    q "UPDATE company SET name = 'Mallory was here' WHERE id = 2" >/dev/null
    simctl clear-requests >/dev/null
    sync=$(q "SELECT created, updated, failed FROM d365_sync('co')")
    name=$(sim_field account "$VACC" name)
    if [ "$name" = "Victim Corp" ]; then
        ok "$what: the victim's record is untouched"
    else
        notok "$what: the map sync wrote Mallory's row to the victim's record" "attack: $out" "sync: $sync" \
            "victim's name: $name" "$(q "SELECT * FROM company; SELECT map, row_key, dynamics_id FROM d365.map_row")"
    fi
}
# the link column: the victim's row unlinked (the guard lets anyone clear
# it), Mallory's row linked to the victim's id through d365's link writer
LINK_C="UPDATE person SET dynamics365_related_id = NULL WHERE id = 1;
        SELECT d365._contact_set_links(ARRAY['2'], ARRAY['$VIC'::uuid], ARRAY['$MAL'::uuid]);"
LINK_M="UPDATE company SET dynamics365_related_id = NULL WHERE id = 1;
        SELECT d365._map_set_links('co', ARRAY['2'], ARRAY['$VACC'::uuid], ARRAY['$MACC'::uuid]);"

for who in op admin; do
    role=rtp_$who
  if [ "$who" = op ]; then
    # (a) contacts
    contact_hijacked $role "$who: contact_state.dynamics_id and the link written" \
        "$LINK_C UPDATE d365.contact_state SET dynamics_id = '$VIC' WHERE contact_key = '2'"
    contact_hijacked $role "$who: the victim's state row moved to its own key" \
        "$LINK_C DELETE FROM d365.contact_state WHERE contact_key = '2';
         UPDATE d365.contact_state SET contact_key = '2' WHERE contact_key = '1'"
    contact_hijacked $role "$who: a state row inserted with the victim's id" \
        "$LINK_C DELETE FROM d365.contact_state WHERE contact_key = '2';
         INSERT INTO d365.contact_state (contact_key, change_seq, synced_seq, dynamics_id) VALUES ('2', 1, 1, '$VIC')"
    contact_hijacked $role "$who: d365._contact_keys_moved() called directly" \
        "$LINK_C SELECT d365._contact_keys_moved(ARRAY['1'], ARRAY['2'])"
    contact_hijacked $role "$who: d365._contact_record() called with a made-up 'link' outcome" \
        "UPDATE person SET dynamics365_related_id = NULL WHERE id IN (1, 2);
         UPDATE d365.contact_state SET dynamics_id = NULL WHERE contact_key = '2';
         SELECT * FROM d365._contact_record(ARRAY['2'],
             ARRAY[(SELECT jsonb_build_object('action', 'link', 'id', '$VIC', 'seq', 1,
                                              'generation', s.generation, 'base', s.generation,
                                              'values', '{}'::jsonb, 'matched', true)::text
                      FROM d365.contact_state s WHERE s.contact_key = '2')],
             ARRAY[200], ARRAY[NULL::text], ARRAY[NULL::text])"
    # (b) table maps
    map_hijacked $role "$who: map_row.dynamics_id and the link written" \
        "$LINK_M UPDATE d365.map_row SET dynamics_id = '$VACC' WHERE map = 'co' AND row_key = '2'"
    map_hijacked $role "$who: the victim's map_row moved to its own key" \
        "$LINK_M DELETE FROM d365.map_row WHERE map = 'co' AND row_key = '2';
         UPDATE d365.map_row SET row_key = '2' WHERE map = 'co' AND row_key = '1'"
    restore
    out=$(q "SET ROLE $role; INSERT INTO d365.map_delete (map, dynamics_id, row_key, action)
             VALUES ('co', '$VACC', '99', 'delete')")
    sync=$(q "SELECT created, updated, failed FROM d365_sync('co')")
    if [ "$(sim_has account "$VACC")" = 1 ]; then
        ok "$who: a made-up pending delete of another record is refused, the record stays"
    else
        notok "$who: a made-up row of d365.map_delete deleted the victim's account" "attack: $out" "sync: $sync"
    fi
  fi

    # (c) requests with the application's credentials
    out=$(q "SET ROLE $role; SELECT count(*) FROM d365._get_all('contacts?\$select=lastname')")
    if grep -q 'permission denied' <<<"$out"; then
        ok "$who: d365._get_all() does not read Dynamics records for it"
    else
        notok "$who: d365._get_all() read the contacts with the application's credentials" "$out"
    fi
    restore
    simctl clear-requests >/dev/null
    out=$(q "SET ROLE $role;
             INSERT INTO d365.activity (contact_key, activity_type, subject) VALUES ('1', 'phonecall', 'forged by $who');
             SELECT d365._send_activity(currval('d365.activity_id_seq'), true)")
    sent=$(simctl requests --kind api | grep -c "forged by $who")
    if [ "$who" = admin ] && grep -q 'permission denied for function _send_activity' <<<"$out" && [ "$sent" = 0 ]; then
        ok "$who: d365._send_activity() is not its to call"
    elif [ "$who" = op ] && grep -q 'permission denied' <<<"$out" && [ "$sent" = 0 ]; then
        ok "$who: no activity of its making is sent"
    else
        notok "$who: an activity of its making was sent to the victim's record" "$out" "requests: $sent"
    fi
done

# (c) an operator edits an activity the application logged: another
# contact, another text, another Dynamics id
restore
q "SET ROLE rtp_app; SELECT d365_log_activity(2, 'phonecall', 'Mallory called') > 0" >/dev/null
q "UPDATE d365.activity SET next_attempt_at = NULL" >/dev/null
out=$(q "SET ROLE rtp_op; UPDATE d365.activity SET contact_key = '1', subject = 'forged subject'")
simctl clear-requests >/dev/null
sync=$(q "SELECT * FROM d365_sync_activities()")
sent=$(simctl requests --kind api | grep -c "forged subject")
if grep -q 'permission denied' <<<"$out" && [ "$sent" = 0 ]; then
    ok "op: a logged activity cannot be moved to another contact or rewritten"
else
    notok "op: a rewritten activity was sent" "$out" "sync: $sync" "requests: $sent"
fi

# (f) what a pull reads and what the metadata cache says
restore
out=$(q "SET ROLE rtp_op; UPDATE d365.pull_state
            SET delta_link = regexp_replace(delta_link, '(/api/data/[^/]+/).*\$', '\1accounts?\$select=name,telephone1')
          WHERE delta_link IS NOT NULL RETURNING entity")
simctl clear-requests >/dev/null
pull=$(q "SELECT updated, failed FROM d365_pull_changes()")
sent=$(simctl requests --kind api | grep -c 'accounts?\$select=name,telephone1')
# the operator writes no state (the jobs do, as the job role): refused
# outright; a delta link written by anyone else but d365sync is refused too
# (sql/privilege_matrix.sql, as an admin)
if grep -q 'permission denied for table pull_state' <<<"$out" && [ "$sent" = 0 ]; then
    ok "op: a delta link of its choosing is refused; the pull reads only what Dynamics linked"
else
    notok "op: the pull read a path the operator chose" "$out" "pull: $pull" "requests: $sent"
fi
FAKE=99999999-0000-4000-8000-000000000001
USERS='systemusers?$select=systemuserid,internalemailaddress,fullname,accessmode,isdisabled'
out=$(q "SET ROLE rtp_op; DELETE FROM d365.metadata_cache WHERE path = '$USERS';
         INSERT INTO d365.metadata_cache (path, fetched_at, body)
         VALUES ('$USERS', now(), '[{\"systemuserid\": \"$FAKE\", \"internalemailaddress\": \"ceo@example.com\"}]')")
who=$(q "SELECT d365._user_id('ceo@example.com')")
if grep -q 'permission denied for table metadata_cache' <<<"$out" && [ "$who" != "$FAKE" ]; then
    ok "op: a made-up metadata cache is refused; users are looked up in Dynamics"
else
    notok "op: the metadata cache holds what the operator wrote" "$out" "ceo@example.com is user: $who"
fi

# (e) the application
restore
out=$(q "SET ROLE rtp_app; UPDATE d365.contact_state SET dynamics_id = '$VIC' WHERE contact_key = '2'")
out2=$(q "SET ROLE rtp_app; SELECT d365._contact_set_links(ARRAY['2'], ARRAY['$VIC'::uuid], ARRAY['$MAL'::uuid])")
out3=$(q "SET ROLE rtp_app; SELECT count(*) FROM d365._get_all('contacts')")
out4=$(q "SET ROLE rtp_app; SELECT d365._send_activity(1, true)")
if grep -q 'permission denied' <<<"$out" && grep -q 'permission denied' <<<"$out2" &&
   grep -q 'permission denied' <<<"$out3" && grep -q 'permission denied' <<<"$out4"; then
    ok "app: no write of the sync state, no link writer, no request of its choosing"
else
    notok "app: reached d365's state or requests" "$out" "$out2" "$out3" "$out4"
fi

# the honest paths still work for the operator: its sync sends Mallory's
# change to Mallory's record, its map sync likewise
restore
q "UPDATE person SET last_name = 'Mallory 2' WHERE id = 2; UPDATE company SET name = 'Mallory Ltd 2' WHERE id = 2" >/dev/null
out=$(q "SET ROLE rtp_op; SELECT created, updated, failed FROM d365_sync_contacts(); SELECT created, updated, failed FROM d365_sync('co')")
if [ "$(sim_field contact "$MAL" lastname)" = "Mallory 2" ] && [ "$(sim_field account "$MACC" name)" = "Mallory Ltd 2" ]; then
    ok "op: its contact and map syncs still send each row to its own record"
else
    notok "op: the honest syncs failed" "$out" "$(sim_field contact "$MAL" lastname)" "$(sim_field account "$MACC" name)"
fi
simctl edit contact "{\"op\":\"update\",\"id\":\"$MAL\",\"values\":{\"lastname\":\"Mallory 3\"}}" >/dev/null
out=$(q "DELETE FROM d365.metadata_cache; SET ROLE rtp_op;
         SELECT updated, failed FROM d365_pull_changes();
         RESET ROLE; SELECT d365._user_id('sam@contoso.example') IS NOT NULL")
if [ "$(q "SELECT last_name FROM person WHERE id = 2")" = "Mallory 3" ] &&
   [ "$(q "SELECT count(*) FROM d365.pull_state WHERE delta_link IS NOT NULL")" -ge 1 ] &&
   [ "$(tail -n 1 <<<"$out")" = t ] && [ "$(q "SELECT count(*) > 0 FROM d365.metadata_cache")" = t ]; then
    ok "op: its pull applies the change and keeps the delta link; metadata it needs is fetched and cached"
else
    notok "op: the honest pull or metadata fetch failed" "$out" "$(q "SELECT * FROM person WHERE id = 2")"
fi
# an admin links by hand: documented (d365_link_contact)
restore
out=$(q "SET ROLE rtp_admin; UPDATE person SET dynamics365_related_id = NULL WHERE id = 1;
         UPDATE person SET dynamics365_related_id = NULL WHERE id = 2;
         SELECT d365_link_contact(2, '$VIC'::uuid)")
if grep -q 'ERROR' <<<"$out"; then
    notok "admin: d365_link_contact() no longer links by hand" "$out"
else
    ok "admin: d365_link_contact() links by hand"
fi
