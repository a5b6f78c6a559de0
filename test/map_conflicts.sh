#!/usr/bin/env bash
# test/map_conflicts.sh: conflicts of table maps -- updates go with
# If-Match: <ETag>; a record changed in Dynamics since (412), or whose ETag
# is not known, is read and merged field by field: one-side edits flow both
# ways, a field edited on both sides is resolved by the map's conflict
# policy (dynamics_wins, local_wins) and recorded in d365.conflict.  Read
# back from the simulator and its request log.
#
#   bash test/map_conflicts.sh                    # builds and installs first
#   D365_SKIP_BUILD=1 bash test/map_conflicts.sh  # uses the installed extension
# Prints "ok N - ..." / "not ok N - ..." and always exits 0.
set -uo pipefail

DB=d365mapconf
. "$(dirname "$0")/lib.sh"
t_begin mapconf
t_on_exit() { simctl reset >/dev/null 2>&1; }
t_standalone || exit 0

simctl reset >/dev/null
t_create_db "$DB"
PSQL_DB=postgres psqlq -c "DROP ROLE IF EXISTS mapconf_owner" -c "CREATE ROLE mapconf_owner" >/dev/null 2>&1
if ! psqlq >"$TMPD/setup.log" 2>&1 <<SQL
$(t_configure_sql)
SET search_path = public, d365;
CREATE TABLE companies (id serial PRIMARY KEY, name text NOT NULL, revenue numeric(12,2),
                        phone text, web text);
ALTER TABLE companies OWNER TO mapconf_owner;
SELECT d365_map_table('account', 'companies', 'accounts');
SELECT d365_map_column('account', 'name', 'name');
SELECT d365_map_column('account', 'revenue', 'revenue');
SELECT d365_map_column('account', 'phone', 'telephone1');
SELECT d365_map_column('account', 'web', 'websiteurl', 'out');
SQL
then
    notok "set-up: mapping the table failed" "$(tail -n 8 "$TMPD/setup.log")"
    exit 0
fi
q() { psqlq -c "SET search_path = public, d365" -c "$1" 2>&1; }
sim_fields() {
    simctl rows account | python3 -c '
import json, sys
rid = sys.argv[1]
for r in json.load(sys.stdin)["value"]:
    if r.get("accountid") == rid:
        print("|".join("" if r.get(f) is None else str(r.get(f)) for f in sys.argv[2:]))' "$@"
}
edit() { simctl edit account "{\"op\":\"update\",\"id\":\"$1\",\"values\":$2}" >/dev/null; }
# the If-Match headers of the PATCHes of account $1 since request seq $2
if_matches() {
    simctl requests --since "$2" --kind api | python3 -c '
import json, sys
rid = sys.argv[1]
out = []
for r in json.load(sys.stdin)["requests"]:
    for p in (r.get("parts") or [r]):
        if p.get("method") == "PATCH" and rid in (p.get("url") or p.get("path") or ""):
            h = {k.lower(): v for k, v in (p.get("headers") or [])} if isinstance(p.get("headers"), list) \
                else {k.lower(): v for k, v in (p.get("headers") or {}).items()}
            m = h.get("if-match", "-")
            out.append(("etag" if m.startswith("W/") else m) + ":" + str(p.get("status")))
print(" ".join(out))' "$1"
}

q "INSERT INTO companies (name, revenue, phone, web) VALUES ('Contoso', 100, '555-0100', 'contoso.test')" >/dev/null
q "SELECT * FROM d365_sync('account')" >/dev/null
acc=$(q "SELECT dynamics365_related_id FROM companies WHERE id = 1")
q "SELECT * FROM d365_pull('account')" >/dev/null
etag=$(q "SELECT etag FROM d365.map_row WHERE map = 'account' AND row_key = '1'")
if [ -n "$acc" ] && [[ "$etag" == W/\"* ]]; then
    ok "the pull remembers the record's ETag ($etag)"
else
    notok "the ETag is kept" "$acc" "$etag"
fi

# -- 1. one-side edits flow both ways; the pull leaves a row with local
# changes to the sync's merge
q "UPDATE companies SET name = 'Contoso Ltd' WHERE id = 1" >/dev/null
edit "$acc" '{"revenue": 250.5}'
q "SELECT * FROM d365_pull('account')" >/dev/null
loc=$(q "SELECT name || '|' || revenue FROM companies WHERE id = 1")
if [ "$loc" = "Contoso Ltd|100.00" ]; then
    ok "a pull does not touch a row whose local change is not sent yet"
else
    notok "the pull defers to the merge" "$loc"
fi
seq=$(simctl last-seq)
out=$(q "SELECT updated || '/' || failed FROM d365_sync('account')")
loc=$(q "SELECT name || '|' || revenue FROM companies WHERE id = 1")
rem=$(sim_fields "$acc" name revenue)
hdr=$(if_matches "$acc" "$seq")
confl=$(q "SELECT count(*) FROM d365.conflict")
if [ "$out" = "1/0" ] && [ "$loc" = "Contoso Ltd|250.50" ] && [ "$rem" = "Contoso Ltd|250.5" ] &&
   [ "$hdr" = "etag:412 etag:204" ] && [ "$confl" = "0" ]; then
    ok "name edited here, revenue in Dynamics: the update with the old ETag meets 412, the merge sends the name and applies the revenue; no conflict"
else
    notok "one-side edits flow both ways" "$out" "local $loc" "dynamics $rem" "If-Match $hdr" "conflicts $confl"
fi

# -- 2. both sides edit the name: dynamics_wins (the default), recorded
q "SELECT * FROM d365_pull('account')" >/dev/null
q "UPDATE companies SET name = 'Contoso Local', phone = '555-0111' WHERE id = 1" >/dev/null
edit "$acc" '{"name": "Contoso Remote"}'
out=$(q "SELECT updated || '/' || failed FROM d365_sync('account')")
loc=$(q "SELECT name || '|' || phone FROM companies WHERE id = 1")
rem=$(sim_fields "$acc" name telephone1)
confl=$(q "SELECT map || ' ' || row_key || ' ' || (dynamics_id = '$acc') || ' ' || \"column\" || ' ' || field || ' ' ||
                  local_value || ' ' || dynamics_value || ' ' || base_value || ' ' || resolution FROM d365.conflict")
if [ "$out" = "1/0" ] && [ "$loc" = "Contoso Remote|555-0111" ] && [ "$rem" = "Contoso Remote|555-0111" ] &&
   [ "$confl" = 'account 1 true name name "Contoso Local" "Contoso Remote" "Contoso Ltd" dynamics_wins' ]; then
    ok "both sides edit the name: Dynamics wins here too, the phone (local only) goes out, the conflict is recorded with the three values"
else
    notok "dynamics_wins" "$out" "local $loc" "dynamics $rem" "$confl"
fi

# -- 3. local_wins; the ETag is unknown after d365sync's own update, so the
# record is read first (no 412)
q "UPDATE d365.table_map SET conflict = 'local_wins' WHERE name = 'account'" >/dev/null
etag=$(q "SELECT coalesce(etag, '(none)') FROM d365.map_row WHERE map = 'account'")
q "UPDATE companies SET name = 'Mine', web = 'mine.test' WHERE id = 1" >/dev/null
edit "$acc" '{"name": "Theirs", "telephone1": "555-0199"}'
seq=$(simctl last-seq)
out=$(q "SELECT updated || '/' || failed FROM d365_sync('account')")
loc=$(q "SELECT name || '|' || phone || '|' || web FROM companies WHERE id = 1")
rem=$(sim_fields "$acc" name telephone1 websiteurl)
hdr=$(if_matches "$acc" "$seq")
confl=$(q "SELECT local_value::text || ' ' || dynamics_value::text || ' ' || base_value::text || ' ' || resolution FROM d365.conflict ORDER BY id DESC LIMIT 1")
if [ "$etag" = "(none)" ] && [ "$out" = "1/0" ] && [ "$loc" = "Mine|555-0199|mine.test" ] &&
   [ "$rem" = "Mine|555-0199|mine.test" ] && [ "$hdr" = "etag:204" ] &&
   [ "$confl" = '"Mine" "Theirs" "Contoso Remote" local_wins' ]; then
    ok "local_wins: the local name goes out with the ETag just read, the phone edited in Dynamics comes back, the conflict is recorded"
else
    notok "local_wins" "etag $etag" "$out" "local $loc" "dynamics $rem" "If-Match $hdr" "$confl"
fi

# -- 4. nothing left to send: the next sync and pull change nothing
out=$(q "SELECT requests FROM d365_sync('account')")
out2=$(q "SELECT updated FROM d365_pull('account')")
loc=$(q "SELECT name || '|' || phone FROM companies WHERE id = 1")
if [ "$out" = "0" ] && [ "$out2" = "0" ] && [ "$loc" = "Mine|555-0199" ] &&
   [ "$(q "SELECT count(*) FROM d365.conflict")" = "2" ]; then
    ok "after the merges the next sync sends nothing and the pull changes nothing"
else
    notok "settled after merging" "$out" "$out2" "$loc"
fi

# -- 5. an ETag is data: one holding a line break is not sent as a header
q "UPDATE companies SET phone = '555-0123' WHERE id = 1" >/dev/null
q "SELECT * FROM d365_sync('account')" >/dev/null          # own update: ETag unknown
q "UPDATE companies SET phone = '555-0124' WHERE id = 1" >/dev/null
python3 - "$acc" >"$TMPD/fault.json" <<'PY'
import json, sys
acc = sys.argv[1]
rec = {"@odata.etag": 'W/"1"\r\nX-Injected: yes', "accountid": acc, "name": "Mine",
       "revenue": 250.5, "telephone1": "555-0123"}
print(json.dumps({"method": "GET", "path_regex": "accounts\\?.*filter", "status": 200,
                  "json": {"value": [rec]}, "times": 1}))
PY
simctl fault "$(cat "$TMPD/fault.json")" >/dev/null
seq=$(simctl last-seq)
out=$(q "SELECT updated || '/' || failed FROM d365_sync('account')")
hdr=$(if_matches "$acc" "$seq")
inj=$(simctl requests --since "$seq" --kind api | grep -ci 'x-injected')
if [ "$out" = "1/0" ] && [ "$hdr" = "*:204" ] && [ "$inj" = "0" ] &&
   [ "$(sim_fields "$acc" telephone1)" = "555-0124" ]; then
    ok "an ETag holding a line break is not an ETag: the update goes with If-Match: *, no header of Dynamics' making"
else
    notok "a hostile ETag" "$out" "If-Match $hdr" "x-injected seen $inj times"
fi

# -- 6. who may see and clear conflicts: an operator (the operator set and
# UPDATE on the table) runs the merging sync, records the conflict and may
# review and delete it, not rewrite it; the local apply runs as the
# table's owner; a monitor sees how many in d365_status(), not the values
PSQL_DB=postgres psqlq -c "DROP ROLE IF EXISTS mapconf_op" -c "CREATE ROLE mapconf_op" \
    -c "DROP ROLE IF EXISTS mapconf_mon" -c "CREATE ROLE mapconf_mon" >/dev/null 2>&1
q "UPDATE d365.table_map SET conflict = 'dynamics_wins' WHERE name = 'account';
   SELECT d365_grant('mapconf_op', 'operator'); SELECT d365_grant('mapconf_mon', 'monitor');
   GRANT SELECT, UPDATE ON companies TO mapconf_op;
   CREATE TABLE mc_log (who name, id integer, phone text);
   ALTER TABLE mc_log OWNER TO mapconf_owner;
   CREATE FUNCTION mc_watch() RETURNS trigger LANGUAGE plpgsql AS \$f\$
   BEGIN
       INSERT INTO public.mc_log VALUES (current_user, NEW.id, NEW.phone);
       IF NEW.phone = '555-6666' THEN
           RAISE EXCEPTION 'this phone is refused here' USING ERRCODE = 'insufficient_privilege';
       END IF;
       RETURN NEW;
   END \$f\$;
   ALTER FUNCTION mc_watch() OWNER TO mapconf_owner;
   CREATE TRIGGER mc_watch BEFORE UPDATE ON companies FOR EACH ROW EXECUTE FUNCTION mc_watch()" >/dev/null
q "SELECT * FROM d365_pull('account')" >/dev/null
q "UPDATE companies SET name = 'Op Local' WHERE id = 1; DELETE FROM mc_log" >/dev/null
edit "$acc" '{"name": "Op Remote", "telephone1": "555-0150"}'
out=$(q "SET ROLE mapconf_op; SELECT updated || '/' || unchanged || '/' || failed FROM d365_sync('account')" 2>&1)
who=$(q "SELECT string_agg(DISTINCT who::text, ',') FROM mc_log")
loc=$(q "SELECT name || '|' || phone FROM companies WHERE id = 1")
seen=$(q "SET ROLE mapconf_op; SELECT resolution FROM d365.conflict ORDER BY id DESC LIMIT 1")
rewrite=$(q "SET ROLE mapconf_op; UPDATE d365.conflict SET resolution = 'local_wins'" 2>&1)
mon=$(q "SET ROLE mapconf_mon; SELECT value FROM d365_status() WHERE item = 'conflicts of map account'")
monread=$(q "SET ROLE mapconf_mon; SELECT count(*) FROM d365.conflict" 2>&1)
cleared=$(q "SET ROLE mapconf_op; DELETE FROM d365.conflict WHERE map = 'account' RETURNING id" | wc -l)
if [ "$out" = "0/1/0" ] && [ "$who" = "mapconf_owner" ] && [ "$loc" = "Op Remote|555-0150" ] &&
   [ "$seen" = "dynamics_wins" ] && grep -q "permission denied for table conflict" <<<"$rewrite" &&
   grep -q "^3 (2 dynamics_wins, 1 local_wins; newest " <<<"$mon" &&
   grep -q "permission denied for table conflict" <<<"$monread" && [ "$cleared" = "3" ]; then
    ok "an operator's sync merges (the owner's trigger runs as the owner) and records the conflict; the operator reads and deletes conflicts but cannot rewrite one; a monitor sees the count only"
else
    notok "conflicts and roles" "$out" "trigger ran as: $who" "local $loc" "seen $seen" "rewrite: $rewrite" \
        "monitor: $mon" "monitor reads: $monread" "cleared $cleared"
fi

# -- 7. what cannot be applied fails that row alone: a Dynamics revenue too
# large for the column (row 2), a phone the owner's trigger refuses with
# an error of its choosing (row 3); row 1 merges in the same sync
q "INSERT INTO companies (name, revenue, phone) VALUES ('Two', 1, '555-0002'), ('Three', 1, '555-0003')" >/dev/null
q "SELECT * FROM d365_sync('account')" >/dev/null
q "SELECT * FROM d365_pull('account')" >/dev/null
acc2=$(q "SELECT dynamics365_related_id FROM companies WHERE id = 2")
acc3=$(q "SELECT dynamics365_related_id FROM companies WHERE id = 3")
q "UPDATE companies SET web = 'edited.test'" >/dev/null
edit "$acc" '{"revenue": 77}'
edit "$acc2" '{"revenue": 10000000000000}'
edit "$acc3" '{"telephone1": "555-6666"}'
out=$(q "SELECT updated || '/' || failed FROM d365_sync('account')" 2>&1)
loc=$(q "SELECT string_agg(id || ':' || revenue || ':' || phone, ' ' ORDER BY id) FROM companies")
err=$(q "SELECT string_agg(row_key || ':' || (next_attempt_at > now()) || ':' || last_error, ' | ' ORDER BY row_key)
           FROM d365.map_row WHERE map = 'account' AND last_error IS NOT NULL")
web=$(sim_fields "$acc3" websiteurl)
if [ "$(tail -n 1 <<<"$out")" = "1/2" ] && [ "$loc" = "1:77.00:555-0150 2:1.00:555-0002 3:1.00:555-0003" ] &&
   grep -q "^2:true:Dynamics changes not applied: numeric field overflow | 3:true:Dynamics changes not applied: this phone is refused here$" <<<"$err" &&
   [ "$web" = "edited.test" ]; then
    ok "a Dynamics value the column cannot hold and one the owner's trigger refuses fail their rows alone (error, back-off); the third row merges"
else
    notok "a row that cannot be merged fails alone" "$out" "local $loc" "errors $err" "web of 3: $web"
fi

# -- 8. an ETag is validated where it is used, too: an operator who may
# write d365.map_row cannot put a header of its own into a request
q "UPDATE companies SET phone = '555-0177' WHERE id = 1" >/dev/null
q "SELECT * FROM d365_pull('account')" >/dev/null
q "SET ROLE mapconf_op; UPDATE d365.map_row SET etag = E'W/\"9\"\\r\\nX-Injected: yes' WHERE map = 'account' AND row_key = '1'" >/dev/null
seq=$(simctl last-seq)
out=$(q "SET ROLE mapconf_op; SELECT updated || '/' || failed FROM d365_sync('account')" 2>&1)
hdr=$(if_matches "$acc" "$seq")
inj=$(simctl requests --since "$seq" --kind api | grep -ci 'x-injected')
if [ "$(tail -n 1 <<<"$out")" = "1/0" ] && [ "$hdr" = "etag:204" ] && [ "$inj" = "0" ] &&
   [ "$(sim_fields "$acc" telephone1)" = "555-0177" ]; then
    ok "an ETag written into d365.map_row by an operator is not sent: the record is read first and the update carries the ETag just read"
else
    notok "a forged ETag in map_row" "$out" "If-Match $hdr" "x-injected seen $inj times"
fi

# -- 9. matching and merging share the look-up stage: an unlinked row found
# by its match column and a linked row read to merge go in one GET
found=$(simctl -v edit account '{"op":"create","values":{"name":"Matched Co","accountnumber":"N-1"}}' |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["accountid"])')
q "ALTER TABLE companies ADD COLUMN num text;
   SELECT d365_map_column('account', 'num', 'accountnumber', match => true)" >/dev/null
q "SELECT * FROM d365_sync('account')" >/dev/null      # nothing pending for row 1: its ETag stays unknown
q "UPDATE companies SET name = 'Mixed Local' WHERE id = 1;
   INSERT INTO companies (name, num) VALUES ('Matcher', 'N-1')" >/dev/null
edit "$acc" '{"revenue": 88}'
seq=$(simctl last-seq)
out=$(q "SELECT created || '/' || updated || '/' || failed FROM d365_sync('account')" 2>&1)
gets=$(simctl requests --since "$seq" --kind api | python3 -c '
import json, sys
n = 0
for r in json.load(sys.stdin)["requests"]:
    for p in (r.get("parts") or [r]):
        if p.get("method") == "GET" and "filter" in (p.get("url") or p.get("path") or ""):
            n += 1
print(n)')
loc=$(q "SELECT string_agg(id || ':' || name || ':' || coalesce(revenue::text, '-') || ':' || coalesce(dynamics365_related_id::text, '-'), ' ' ORDER BY id)
           FROM companies WHERE id = 1 OR num = 'N-1'")
if [ "$(tail -n 1 <<<"$out")" = "0/2/0" ] && [ "$gets" = "1" ] &&
   [ "$loc" = "1:Mixed Local:88.00:$acc 4:Matcher:-:$found" ] &&
   [ "$(sim_fields "$acc" name revenue)" = "Mixed Local|88.0" ] && [ "$(sim_fields "$found" name)" = "Matcher" ]; then
    ok "one GET finds the unlinked row's record by its match column and reads the linked row's record to merge: both go through"
else
    notok "match and merge in one look-up" "$out" "GETs $gets" "$loc" "found $found" "dynamics $(sim_fields "$acc" name revenue) $(sim_fields "$found" name)"
fi
