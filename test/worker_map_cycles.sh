#!/usr/bin/env bash
# test/worker_map_cycles.sh: the background worker sends the lookups that
# close a cycle of the maps' order, on a cluster of its own with
# shared_preload_libraries = 'pg_cron,d365sync', realtime on:
#   - an account and its primary contact, whose company is that account,
#     committed in one transaction, end linked both ways in Dynamics with
#     no call (the account's run that created it worked, so the worker runs
#     the map again at once and the owed primary contact goes);
#   - two accounts each the other's parent end with both parents set;
#   - once settled the worker sends nothing more (no loop on owed lookups).
# Latencies are printed, never asserted.
#
#   bash test/worker_map_cycles.sh                    # builds and installs first
#   D365_SKIP_BUILD=1 bash test/worker_map_cycles.sh  # uses the installed extension
# Prints "ok N - ..." / "not ok N - ..." lines and always exits 0.
set -uo pipefail

DB=d365wcyc
. "$(dirname "$0")/lib.sh"
t_begin wcyc
t_preloaded "$DB" || exit 0

# sim_value ENTITY ID FIELD: FIELD of the simulator's record ID of ENTITY
sim_value() {
    simctl rows "$1" | python3 -c '
import json, sys
ent, rid, field = sys.argv[1:4]
for r in json.load(sys.stdin)["value"]:
    if r.get(ent + "id") == rid:
        v = r.get(field)
        print("" if v is None else v)
        break
else:
    print("(gone)")' "$1" "$2" "$3"
}
# wait_linked SQL-OF-ID ENTITY FIELD SQL-OF-VALUE [SECONDS]: until the record of the
# first query's id holds the second query's id in FIELD; prints the ms, or "timeout"
wait_linked() {
    local t0 i id want
    t0=$(now_ms)
    for i in $(seq 1 $(( ${5:-30} * 5 ))); do
        id=$(psqlq -c "$1" 2>/dev/null); want=$(psqlq -c "$4" 2>/dev/null)
        if [ -n "$id" ] && [ -n "$want" ] && [ "$(sim_value "$2" "$id" "$3")" = "$want" ]; then
            echo $(( $(now_ms) - t0 )); return
        fi
        sleep 0.2
    done
    echo timeout
}

PSQL_DB=postgres psqlq -c "CREATE DATABASE $DB" >/dev/null
if ! psqlq >"$TMPD/setup.log" 2>&1 <<SQL
$(t_configure_sql)
CREATE TABLE companies (id integer PRIMARY KEY, name text NOT NULL, primary_contact integer,
                        parent_id integer REFERENCES companies);
CREATE TABLE people (id integer PRIMARY KEY, last_name text NOT NULL, company_id integer REFERENCES companies);
ALTER TABLE companies ADD FOREIGN KEY (primary_contact) REFERENCES people;
SELECT d365.d365_map_table('account', 'companies', 'accounts');
SELECT d365.d365_map_table('person', 'people', 'contacts');
SELECT d365.d365_map_column('account', 'name', 'name');
SELECT d365.d365_map_column('account', 'primary_contact', 'primarycontactid');
SELECT d365.d365_map_column('account', 'parent_id', 'parentaccountid');
SELECT d365.d365_map_column('person', 'last_name', 'lastname');
SELECT d365.d365_map_column('person', 'company_id', 'parentcustomerid');
UPDATE d365.settings SET realtime = true;
SQL
then
    notok "set-up: configuring failed" "$(tail -n 8 "$TMPD/setup.log")"
    exit 0
fi
if ! wait_sql "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE backend_type = 'd365sync worker'
                               AND datname = '$DB')" 60; then
    notok "set-up: no worker in $DB" "$(grep d365sync "$D365_WORK/postgres.log" | tail -n 5)"
    exit 0
fi

# 1. account <-> contact in one transaction
psqlq >/dev/null <<'SQL'
BEGIN;
INSERT INTO companies (id, name) VALUES (1, 'Contoso');
INSERT INTO people (id, last_name, company_id) VALUES (1, 'Lee', 1);
UPDATE companies SET primary_contact = 1 WHERE id = 1;
COMMIT;
SQL
ms=$(wait_linked "SELECT dynamics365_related_id FROM companies WHERE id = 1" account _primarycontactid_value \
                 "SELECT dynamics365_related_id FROM people WHERE id = 1")
acc=$(psqlq -c "SELECT dynamics365_related_id FROM companies WHERE id = 1")
lee=$(psqlq -c "SELECT dynamics365_related_id FROM people WHERE id = 1")
diag "worker: COMMIT -> account and contact linked both ways in $ms ms"
if [ "$ms" != timeout ] && [ "$(sim_value contact "$lee" _parentcustomerid_value)" = "$acc" ]; then
    ok "the worker links an account and its primary contact, whose company is that account, both ways ($ms ms)"
else
    notok "the worker settles the account <-> contact cycle" "$ms" "account $acc contact $lee" \
        "company of the contact: $(sim_value contact "$lee" _parentcustomerid_value)" \
        "$(psqlq -c "SELECT item || ': ' || value FROM d365.d365_status() WHERE item LIKE 'map%' OR item LIKE 'worker%'")"
fi

# 2. two accounts each the other's parent
psqlq >/dev/null <<'SQL'
BEGIN;
INSERT INTO companies (id, name) VALUES (2, 'Alpha'), (3, 'Beta');
UPDATE companies SET parent_id = 3 WHERE id = 2;
UPDATE companies SET parent_id = 2 WHERE id = 3;
COMMIT;
SQL
ms=$(wait_linked "SELECT dynamics365_related_id FROM companies WHERE id = 2" account _parentaccountid_value \
                 "SELECT dynamics365_related_id FROM companies WHERE id = 3")
alpha=$(psqlq -c "SELECT dynamics365_related_id FROM companies WHERE id = 2")
beta=$(psqlq -c "SELECT dynamics365_related_id FROM companies WHERE id = 3")
if [ "$ms" != timeout ] && [ "$(sim_value account "$beta" _parentaccountid_value)" = "$alpha" ]; then
    ok "the worker sets the parents of two accounts each the other's parent ($ms ms)"
else
    notok "the worker settles a self-reference cycle" "$ms" "alpha $alpha beta $beta" \
        "beta's parent: $(sim_value account "$beta" _parentaccountid_value)"
fi

# 3. settled: nothing pending, nothing more sent
wait_sql "SELECT value LIKE '0 pending%' FROM d365.d365_status() WHERE item = 'map account'" 10
seq0=$(simctl last-seq)
sleep 3
sent=$(simctl requests --since "$seq0" --kind api | python3 -c '
import json, sys
print(sum(1 for e in json.load(sys.stdin)["requests"] if e["method"] != "GET"))')
st=$(psqlq -c "SELECT value FROM d365.d365_status() WHERE item = 'map account'")
if [ "$sent" = 0 ] && [ "${st%%;*}" = "0 pending (0 to create), 0 failing" ]; then
    ok "once settled nothing is pending and the worker sends nothing more (3 s watched)"
else
    notok "the worker settles" "writes sent in 3 s: $sent" "$st"
fi
