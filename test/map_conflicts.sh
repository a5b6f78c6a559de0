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
