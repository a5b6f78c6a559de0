#!/usr/bin/env bash
# test/sim_state.sh: the simulator used from a user's own database as
# sim/README.md ("From your own database") says, and its --state-file.
#
# scripts/test.sh runs it with the cluster it started; run alone it starts
# its own through test/lib.sh:
#   bash test/sim_state.sh                    # builds and installs first
#   D365_SKIP_BUILD=1 bash test/sim_state.sh  # uses the installed extension
#
# It runs the README's own blocks: the shell block that starts the
# simulator (on two free ports instead of 5580/5581, in a directory of its
# own) and the SQL blocks of settings (http, then https with the
# certificate as CA), in a fresh database.  Then it syncs contacts, takes a
# change-tracking baseline, saves through the control API, edits a row in
# Dynamics, stops the simulator with SIGTERM and starts it again with the
# same state file: the rows are the same, a contact sync sends no request,
# the pull's delta link is still valid (it gets the edit made before the
# stop and unlinks nothing), and later edits and deletes are tracked.
# Prints "ok N - ..." / "not ok N - ..." and always exits 0.
set -uo pipefail

DB=d365simstate
SIM_PID=
. "$(dirname "$0")/lib.sh"
t_begin simstate
t_on_exit() { [ -z "$SIM_PID" ] || { kill "$SIM_PID" 2>/dev/null; wait "$SIM_PID" 2>/dev/null; }; }
t_standalone || exit 0

README=$T_REPO/sim/README.md
SIMDIR=$TMPD/d365sim

# readme_block MARKER: the fenced block after <!-- MARKER --> in sim/README.md
readme_block() {
    python3 - "$README" "$1" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
m = re.search(r"<!-- %s -->\n```[a-z]*\n(.*?)```" % re.escape(sys.argv[2]), text, re.S)
sys.stdout.write(m.group(1) if m else "")
PY
}

# the README's values, replaced by this run's: ports, directory, repository, database
PORTS=$(python3 -c '
import socket
s = [socket.socket() for _ in range(2)]
for x in s: x.bind(("127.0.0.1", 0))
print(" ".join(str(x.getsockname()[1]) for x in s))')
read -r HP SP <<<"$PORTS"
subst() {
    sed -e "s#/var/tmp/d365sim#$SIMDIR#g" -e "s#/path/to/d365sync#$T_REPO#g" \
        -e "s#127\.0\.0\.1:5580#127.0.0.1:$HP#g" -e "s#127\.0\.0\.1:5581#127.0.0.1:$SP#g" \
        -e "s#--port 5580 --https-port 5581#--port $HP --https-port $SP#" \
        -e "s#DATABASE myapp #DATABASE $DB #"
}
START=$(readme_block sim-start | subst)
HTTP_SQL=$(readme_block sim-settings:\ http | subst)
HTTPS_SQL=$(readme_block sim-settings:\ https | subst)
if [ -z "$START" ] || [ -z "$HTTP_SQL" ] || [ -z "$HTTPS_SQL" ]; then
    notok "sim/README.md has the blocks <!-- sim-start -->, <!-- sim-settings: http --> and <!-- sim-settings: https -->"
    exit 0
fi
# the restart: in the README's directory, the command that starts the
# simulator (from /usr/bin/python3 on)
RESTART="cd $SIMDIR
$(sed -n '/^\/usr\/bin\/python3/,$p' <<<"$START")"
SIMURL=http://127.0.0.1:$HP
sctl() { timeout 30 "$T_REPO/sim/simctl" --url "$SIMURL" "$@"; }

# start_sim SCRIPT: run the README's shell lines; SIM_PID is the simulator
start_sim() {
    mkdir -p "$SIMDIR"
    local here=$PWD
    eval "$1" >>"$TMPD/start-sim.out" 2>&1
    SIM_PID=$!
    cd "$here" || return 1
    sctl wait >/dev/null 2>&1
}

# stop_sim: SIGTERM, the exit status of the simulator
stop_sim() {
    kill "$SIM_PID" 2>/dev/null
    wait "$SIM_PID"
    local rc=$?
    SIM_PID=
    return $rc
}

# 1-2: the documented start and settings, from a fresh database
if ! start_sim "$START"; then
    notok "the simulator starts as sim/README.md says" "$(cat "$TMPD/start-sim.out" "$SIMDIR/sim.log" 2>/dev/null)"
    exit 0
fi
t_create_db "$DB"
out=$(psqlq 2>&1 <<SQL
CREATE EXTENSION d365sync;
SET search_path = public, d365;
$HTTP_SQL
SQL
)
if [ "$out" = "0a000000-0000-4000-8000-000000000001|5e5e0000-0000-4000-8000-000000000001" ]; then
    ok "sim/README.md's settings (org_url, authority_url, credentials) reach the simulator over http from a fresh database"
else
    notok "sim/README.md's http settings" "$out"
    exit 0
fi
seq0=$(sctl last-seq)
out=$(psqlq 2>&1 <<SQL
SET search_path = public, d365;
$HTTPS_SQL
SQL
)
scheme=$(sctl requests --since "$seq0" --kind api --copy | python3 -c '
import json, sys
print(",".join(sorted({json.loads(l.replace("\\\\", "\\"))["scheme"] for l in sys.stdin})))')
if [ "$out" = "0a000000-0000-4000-8000-000000000001|5e5e0000-0000-4000-8000-000000000001" ] &&
   [ "$scheme" = https ]; then
    ok "sim/README.md's https settings (d365sync.ca_file = the simulator's certificate) reach it over https"
else
    notok "sim/README.md's https settings" "whoami: $out" "schemes seen: $scheme"
fi

# 3: contacts synced, a change-tracking baseline, an edit pulled, a save
out=$(psqlq 2>&1 <<'SQL'
UPDATE d365.settings SET contact_sync_enabled = true, min_score = 10;
CREATE TABLE person (id integer PRIMARY KEY, email text, last_name text, score integer NOT NULL);
INSERT INTO person SELECT g, 'p' || g || '@example.com', 'Person' || g, 50
  FROM generate_series(1, 5) g;
SELECT d365.d365_attach_contacts('person');
INSERT INTO d365.field_map VALUES ('email', 'emailaddress1'), ('last_name', 'lastname');
SELECT created, failed FROM d365.d365_sync_contacts();
SELECT failed, unlinked FROM d365.d365_pull_changes();
SQL
)
# which Dynamics contacts are persons 1, 2, 3
id_of() { psqlq -c "SELECT dynamics365_related_id FROM person WHERE id = $1"; }
C1=$(id_of 1); C2=$(id_of 2); C3=$(id_of 3)
sctl edit contact "{\"op\": \"update\", \"id\": \"$C1\", \"values\": {\"lastname\": \"Edited before the save\"}}" >/dev/null
pull1=$(psqlq -c "SELECT updated, failed, unlinked FROM d365.d365_pull_changes()" 2>&1)
save=$(sctl -v save 2>&1)
leftover=$(find "$SIMDIR" -name '*.tmp' | wc -l)
if [[ "$out" == *"5|0"* ]] && [ "$pull1" = "1|0|0" ] && [[ "$save" == *"\"rows\": "* ]] &&
   [ -s "$SIMDIR/state.json" ] && [ "$leftover" = 0 ]; then
    ok "5 contacts synced and an edit pulled; simctl save wrote the state file (no temporary file left)"
else
    notok "sync, pull and save" "set-up: $out" "pull: $pull1" "save: $save" "tmp files: $leftover"
fi

# 4: an edit after the save, then a clean stop: the stop saves it
sctl edit contact "{\"op\": \"update\", \"id\": \"$C2\", \"values\": {\"lastname\": \"Edited before the stop\"}}" >/dev/null
sctl rows contact --copy >"$TMPD/rows.before"
stop_sim
rc=$?
if [ "$rc" = 0 ] && grep -q "saved [0-9]* rows to $SIMDIR/state.json" "$SIMDIR/sim.log" &&
   grep -q "Edited before the stop" "$SIMDIR/state.json"; then
    ok "SIGTERM stops the simulator cleanly (status 0) and saves the edit made after the last save"
else
    notok "a clean stop saves" "exit status $rc" "$(tail -n 5 "$SIMDIR/sim.log")"
fi

# 5: the restart holds the same rows
if ! start_sim "$RESTART"; then
    notok "the simulator starts again with its state file" "$(cat "$TMPD/start-sim.out" "$SIMDIR/sim.log" 2>/dev/null | tail -n 10)"
    exit 0
fi
sctl rows contact --copy >"$TMPD/rows.after"
n=$(wc -l <"$TMPD/rows.after")
if grep -q "loaded [0-9]* rows from $SIMDIR/state.json" "$SIMDIR/sim.log" &&
   [ "$n" = 5 ] && cmp -s "$TMPD/rows.before" "$TMPD/rows.after"; then
    ok "after a restart with the state file the simulator holds the same 5 contacts (ids, values, versions)"
else
    notok "the restart holds the same rows" "$(tail -n 3 "$SIMDIR/sim.log")" "$(diff "$TMPD/rows.before" "$TMPD/rows.after" | head -n 6)"
fi

# 6: a contact sync after the restart sends no Web API request
seq0=$(sctl last-seq)
sync=$(psqlq -c "SELECT created, updated, failed, unlinked FROM d365.d365_sync_contacts()" 2>&1)
napi=$(sctl requests --since "$seq0" --kind api --copy | wc -l)
if [[ "$seq0" =~ ^[0-9]+$ ]] && [ "$sync" = "0|0|0|0" ] && [ "$napi" = 0 ]; then
    ok "a contact sync after the restart sends no Web API request and unlinks nothing"
else
    notok "sync after the restart" "run: $sync" "api requests: $napi"
fi

# 7: the pull's delta link survived: it gets the edit made before the stop
seq0=$(sctl last-seq)
pull2=$(psqlq -c "SELECT updated, failed, unlinked FROM d365.d365_pull_changes()" 2>&1)
reqs=$(sctl requests --since "$seq0" --kind api --copy)
delta=$(grep -c 'deltatoken' <<<"$reqs")
bad=$(grep -c '"status":4' <<<"$reqs")
local2=$(psqlq -c "SELECT last_name FROM person WHERE id = 2")
linked=$(psqlq -c "SELECT count(*) FROM person WHERE dynamics365_related_id IS NOT NULL")
if [ "$pull2" = "1|0|0" ] && [ "$delta" -ge 1 ] && [ "$bad" = 0 ] &&
   [ "$local2" = "Edited before the stop" ] && [ "$linked" = 5 ]; then
    ok "the pull after the restart follows its old delta link: 1 update (made before the stop), nothing unlinked, 5 links"
else
    notok "the pull after the restart" "pull: $pull2" "delta requests: $delta, 4xx: $bad" "person 2: $local2" "linked: $linked" "$(head -c 600 <<<"$reqs")"
fi

# 8: change tracking goes on after the restart: an edit and a delete
sctl edit contact "{\"op\": \"update\", \"id\": \"$C1\", \"values\": {\"lastname\": \"Edited after the restart\"}}" >/dev/null
sctl edit contact "{\"op\": \"delete\", \"id\": \"$C3\"}" >/dev/null
pull3=$(psqlq -c "SELECT updated, failed, unlinked FROM d365.d365_pull_changes()" 2>&1)
state=$(psqlq -c "SELECT string_agg(id || ':' || coalesce(last_name, '') || ':' || (dynamics365_related_id IS NOT NULL), ',' ORDER BY id) FROM person WHERE id IN (1, 3)")
if [ "$pull3" = "1|0|1" ] && [ "$state" = "1:Edited after the restart:true,3:Person3:false" ]; then
    ok "after the restart an edit and a delete in Dynamics are tracked: 1 updated, 1 unlinked"
else
    notok "change tracking after the restart" "pull: $pull3" "persons 1 and 3: $state"
fi

# 9: a local change after the restart goes out as usual
psqlq -c "UPDATE person SET email = 'new4@example.com' WHERE id = 4" >/dev/null
sync=$(psqlq -c "SELECT created, updated, failed FROM d365.d365_sync_contacts()" 2>&1)
C4=$(id_of 4)
remote=$(sctl rows contact --copy | grep -c "\"contactid\":\"$C4\".*new4@example.com\|new4@example.com.*\"contactid\":\"$C4\"")
if [ "$sync" = "0|1|0" ] && [ "$remote" = 1 ]; then
    ok "a local change after the restart is sent (1 updated) and lands on the same Dynamics contact"
else
    notok "a local change after the restart" "run: $sync" "remote rows with the new email: $remote"
fi
stop_sim

# 10: a file that is not simulator data: refused, left alone
echo '{"something": "else"}' >"$TMPD/other.json"
cp "$TMPD/other.json" "$TMPD/other.copy"
timeout 30 /usr/bin/python3 "$T_REPO/sim/dataverse_sim.py" --port 0 \
    --state-file "$TMPD/other.json" >"$TMPD/bad.out" 2>&1
rc=$?
if [ "$rc" = 2 ] && grep -q "cannot load the state file $TMPD/other.json: not a simulator state file" "$TMPD/bad.out" &&
   cmp -s "$TMPD/other.json" "$TMPD/other.copy"; then
    ok "a state file that is not simulator data: the simulator refuses to start (status 2, says why) and leaves it alone"
else
    notok "a foreign state file" "exit status $rc" "$(cat "$TMPD/bad.out")"
fi
