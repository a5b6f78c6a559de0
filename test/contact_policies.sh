#!/usr/bin/env bash
# test/contact_policies.sh: the map "contact" (the attached contact table)
# honours the settings of its row of d365.table_map as every map does.
#   - enabled = false: the background worker's contact jobs (sync and pull),
#     the scheduled runs (CALL d365_run_job('contacts' | 'pull'),
#     d365_sync_contacts(), d365_pull_changes()) and d365_sync() /
#     d365_pull() without a map pass the contact table by, and
#     d365_status() says so; d365_sync('contact') and d365_pull('contact')
#     still run it; enabled again, the worker sends what waited.
#
# Runs on a cluster of its own with d365sync preloaded (its worker serves
# the test database), and a simulator of its own when run by itself:
#   bash test/contact_policies.sh                    # builds and installs first
#   D365_SKIP_BUILD=1 bash test/contact_policies.sh  # uses the installed extension
# Prints "ok N - ..." / "not ok N - ..." lines and always exits 0.
set -uo pipefail

DB=d365cpolicies
. "$(dirname "$0")/lib.sh"
t_begin cpolicies
t_preloaded "$DB" || exit 0
LOG=$D365_WORK/postgres.log

# sim_wait ENTITY PYCOND [SECONDS]: poll the simulator's rows of ENTITY until
# one satisfies PYCOND (r is the row); prints the ms it took, or "timeout"
sim_wait() {
    /usr/bin/python3 - "$D365_SIM_URL" "$1" "$2" "${3:-30}" <<'PY'
import json, sys, time, urllib.request
base, entity, cond, limit = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
t0 = time.time()
while time.time() < t0 + limit:
    with urllib.request.urlopen(base + "/_sim/rows/" + entity, timeout=10) as f:
        rows = json.load(f)["value"]
    if any(eval(cond, {}, {"r": r}) for r in rows):
        print(int((time.time() - t0) * 1000))
        sys.exit(0)
    time.sleep(0.05)
print("timeout")
PY
}

# sim_rows ENTITY PYEXPR [PYCOND]: PYEXPR of each simulator row of ENTITY
# satisfying PYCOND, one a line, sorted
sim_rows() {
    /usr/bin/python3 - "$D365_SIM_URL" "$1" "$2" "${3:-True}" <<'PY'
import json, sys, urllib.request
base, entity, expr, cond = sys.argv[1:5]
with urllib.request.urlopen(base + "/_sim/rows/" + entity, timeout=10) as f:
    rows = json.load(f)["value"]
print("\n".join(sorted(str(eval(expr, {}, {"r": r})) for r in rows if eval(cond, {}, {"r": r}))))
PY
}

q() { psqlq -c "SET search_path = public, d365" -c "$1" 2>&1; }
status() {   # status PATTERN: d365_status() lines whose item is LIKE PATTERN
    psqlq -c "SELECT item || ': ' || value FROM d365.d365_status() WHERE item LIKE '$1' ORDER BY 1"
}

PSQL_DB=postgres psqlq -c "CREATE DATABASE $DB" >/dev/null
if ! psqlq >"$TMPD/setup.log" 2>&1 <<SQL
$(t_configure_sql)
UPDATE d365.settings SET contact_sync_enabled = true, min_score = 10;
CREATE ROLE cp_owner;
CREATE TABLE companies (id serial PRIMARY KEY, name text NOT NULL);
CREATE TABLE lead (id integer PRIMARY KEY, name text, email text, score integer NOT NULL DEFAULT 50);
ALTER TABLE companies OWNER TO cp_owner;
ALTER TABLE lead OWNER TO cp_owner;
SELECT d365.d365_map_table('account', 'companies', 'accounts');
SELECT d365.d365_map_column('account', 'name', 'name');
SELECT d365.d365_attach_contacts('lead');
INSERT INTO d365.field_map VALUES ('name', 'firstname'), ('email', 'emailaddress1');
INSERT INTO companies (name) VALUES ('Contoso');
INSERT INTO lead (id, name) VALUES (1, 'Ada');
UPDATE d365.settings SET realtime = true, pull_interval = '5 seconds';
SQL
then
    notok "set-up: configuring failed" "$(tail -n 8 "$TMPD/setup.log")"
    exit 0
fi

# --------------------------------------------------------------------------
# 1. enabled (the default): the worker sends and pulls the contact table
# --------------------------------------------------------------------------
ms_ada=$(sim_wait contact "r.get('firstname') == 'Ada'" 60)
ms_co=$(sim_wait account "r.get('name') == 'Contoso'" 60)
if [ "$ms_ada" != timeout ] && [ "$ms_co" != timeout ] &&
   wait_sql "SELECT count(*) = 2 FROM d365.pull_state WHERE entity IN ('contact', 'map:account')
              AND delta_link IS NOT NULL" 60; then
    ok "enabled: the worker sends the contact ($ms_ada ms) and the account, and takes both pulls' baselines"
else
    notok "enabled: the worker sends and pulls the contact table" "contact: $ms_ada; account: $ms_co" \
        "$(q "SELECT entity, delta_link IS NOT NULL FROM d365.pull_state")" "$(status 'worker%')"
    exit 0
fi

# --------------------------------------------------------------------------
# 2. disabled: the worker's contact sync passes it by.  The contact job runs
# before the map jobs in each pass, so once the account committed with it
# reached Dynamics, the contact job has run after that commit.
# --------------------------------------------------------------------------
q "UPDATE d365.table_map SET enabled = false WHERE name = 'contact'" >/dev/null
psqlq >/dev/null <<'SQL'
BEGIN;
INSERT INTO lead (id, name) VALUES (2, 'Bea');
INSERT INTO companies (name) VALUES ('Fabrikam');
COMMIT;
SQL
ms_fab=$(sim_wait account "r.get('name') == 'Fabrikam'" 60)
bea=$(sim_rows contact "r.get('firstname')" "r.get('firstname') == 'Bea'")
if [ "$ms_fab" != timeout ] && [ -z "$bea" ] &&
   [ "$(q "SELECT dynamics365_related_id IS NULL FROM lead WHERE id = 2")" = t ]; then
    ok "disabled: a contact committed with an account is not sent by the worker (the account is, $ms_fab ms)"
else
    notok "disabled: the worker does not send the contact table" "account: $ms_fab; Bea in Dynamics: $bea" \
        "$(status 'worker%')"
fi

line=$(status 'contact sync enabled')
case "$line" in
    "contact sync enabled: false (map contact disabled: enabled = false; contact_sync_enabled = true, min_score = 10)")
        ok "d365_status() says the contact sync is off because the map is disabled" ;;
    *) notok "d365_status() says the contact sync is off because the map is disabled" "$line" ;;
esac

# --------------------------------------------------------------------------
# 3. disabled: the worker's contact pull passes it by (the map's pull goes)
# --------------------------------------------------------------------------
ada=$(q "SELECT dynamics365_related_id FROM lead WHERE id = 1")
contoso=$(q "SELECT dynamics365_related_id FROM companies WHERE name = 'Contoso'")
simctl edit contact "{\"op\": \"update\", \"id\": \"$ada\", \"values\": {\"firstname\": \"Adele\"}}" >/dev/null
pulled=yes
for n in 2 3; do
    # two pulls of the account map after the edit: pull_interval (5 s) has
    # passed for the contact pull too
    simctl edit account "{\"op\": \"update\", \"id\": \"$contoso\", \"values\": {\"name\": \"Contoso $n\"}}" >/dev/null
    wait_sql "SELECT name = 'Contoso $n' FROM companies WHERE id = 1" 60 || pulled=no
done
name=$(q "SELECT name FROM lead WHERE id = 1")
if [ "$pulled" = yes ] && [ "$name" = Ada ]; then
    ok "disabled: a Dynamics edit of a contact is not pulled by the worker (two pulls of the account map came back meanwhile)"
else
    notok "disabled: the worker does not pull the contact table" "account pulls: $pulled; lead 1: $name" \
        "$(status 'worker%')"
fi

# the rest without the worker: no race for the jobs' locks
q "UPDATE d365.settings SET realtime = false, pull_interval = NULL" >/dev/null
sleep 1

# --------------------------------------------------------------------------
# 4. disabled: the scheduled runs pass it by, recorded with the reason
# --------------------------------------------------------------------------
seq0=$(simctl last-seq)
q "CALL d365.d365_run_job('contacts')" >"$TMPD/job.log" 2>&1
q "CALL d365.d365_run_job('pull')" >>"$TMPD/job.log" 2>&1
sc=$(q "SELECT created, updated, failed FROM d365.d365_sync_contacts()")
pc=$(q "SELECT updated, unchanged, failed FROM d365.d365_pull_changes()")
runs=$(q "SELECT kind || ': ' || message FROM (SELECT * FROM d365.sync_run ORDER BY id DESC LIMIT 4) r ORDER BY id")
expect="contacts: map contact is disabled (enabled = false in d365.table_map): only d365_sync('contact') and d365_pull('contact') run it
pull: map contact is disabled (enabled = false in d365.table_map): only d365_sync('contact') and d365_pull('contact') run it
contacts: map contact is disabled (enabled = false in d365.table_map): only d365_sync('contact') and d365_pull('contact') run it
pull: map contact is disabled (enabled = false in d365.table_map): only d365_sync('contact') and d365_pull('contact') run it"
sent=$(simctl requests --since "$seq0" --kind api | grep -c '"contacts' || true)
if [ "$runs" = "$expect" ] && [ "$sc" = "0|0|0" ] && [ "$pc" = "0|0|0" ] && [ "$sent" = 0 ] &&
   [ "$(q "SELECT name FROM lead WHERE id = 1")" = Ada ] && ! grep -q ERROR "$TMPD/job.log"; then
    ok "disabled: CALL d365_run_job('contacts'|'pull'), d365_sync_contacts() and d365_pull_changes() do nothing and record why"
else
    notok "disabled: the scheduled runs pass the contact table by" "$runs" "sync_contacts: $sc; pull_changes: $pc; requests for contacts: $sent" \
        "$(cat "$TMPD/job.log")"
fi

s=$(q "SELECT string_agg(map || ':' || created, ' ' ORDER BY map) FROM d365.d365_sync()")
p=$(q "SELECT string_agg(map, ' ' ORDER BY map) FROM d365.d365_pull()")
if [ "$s" = "account:0" ] && [ "$p" = "account" ] && [ -z "$(sim_rows contact "r.get('firstname')" "r.get('firstname') == 'Bea'")" ]; then
    ok "disabled: d365_sync() and d365_pull() without a map leave out the map contact"
else
    notok "disabled: d365_sync() and d365_pull() without a map leave out the map contact" "sync: $s" "pull: $p"
fi

# --------------------------------------------------------------------------
# 5. disabled: a call naming the map runs it
# --------------------------------------------------------------------------
s=$(q "SELECT map, created FROM d365.d365_sync('contact')")
p=$(q "SELECT map, updated FROM d365.d365_pull('contact')")
bea=$(sim_rows contact "r.get('firstname')" "r.get('firstname') == 'Bea'")
if [ "$s" = "contact|1" ] && [ "$bea" = Bea ] && [ "$p" = "contact|1" ] &&
   [ "$(q "SELECT name FROM lead WHERE id = 1")" = Adele ]; then
    ok "disabled: d365_sync('contact') sends Bea and d365_pull('contact') brings Ada's edit (Adele)"
else
    notok "disabled: d365_sync('contact') and d365_pull('contact') run the map" "sync: $s; Bea: $bea" "pull: $p" \
        "$(q "SELECT name FROM lead WHERE id = 1")"
fi

# --------------------------------------------------------------------------
# 6. enabled again: the worker sends the contact table again
# --------------------------------------------------------------------------
q "UPDATE d365.table_map SET enabled = true WHERE name = 'contact'" >/dev/null
q "UPDATE d365.settings SET realtime = true" >/dev/null
q "INSERT INTO lead (id, name) VALUES (3, 'Cy')" >/dev/null
ms=$(sim_wait contact "r.get('firstname') == 'Cy'" 60)
line=$(status 'contact sync enabled')
if [ "$ms" != timeout ] && [ "$line" = "contact sync enabled: true (contact_sync_enabled = true, min_score = 10)" ]; then
    ok "enabled again: the worker sends a new contact ($ms ms) and d365_status() shows contact sync on"
else
    notok "enabled again: the worker sends the contact table" "Cy: $ms" "$line"
fi
q "UPDATE d365.settings SET realtime = false" >/dev/null
